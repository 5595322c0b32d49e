//! Shared helpers for black-box tests: spawn the real binary on loopback (process.rs), talk
//! HTTP/1.1 through the lab's client.
#![allow(dead_code)]

pub mod grpc_receiver;
pub mod host;
pub mod image;
pub mod lab_run;
pub mod process;
pub mod procs;

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use graceful::lab::network::http_client::{self, Conn, HttpError};
use nix::sys::signal::Signal;
pub use process::Process;

pub const BIN: &str = env!("CARGO_BIN_EXE_graceful");

/// A running role, killed on drop (the shared harness in process.rs, plus its addresses).
pub struct Proc {
    pub process: Process,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

/// The harness's fields (`child`, `pid`, `log`) and methods read through a `Proc`.
impl std::ops::Deref for Proc {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// Starts `graceful <role>` on ephemeral loopback ports and waits (bounded) until it serves.
pub fn spawn(role: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
    spawn_with(Command::new(BIN), role, args, env)
}

/// Same, with a prepared command (e.g. a wrapper such as `unshare`).
pub fn spawn_with(mut cmd: Command, role: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
    cmd.arg(role)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(args)
        .env("GRACEFUL_TELEMETRY__LOG_FORMAT", "json")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut process = Process::spawn(cmd).expect("spawn graceful");
    match process.wait_serving(Duration::from_secs(15)) {
        Ok(l) => Proc { process, addr: l.listen, admin: l.admin },
        Err(e) => panic!("{role} {e}"),
    }
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.process.pid
    }

    /// `sig` as a raw number (libc::SIGTERM …), for the tests' brevity.
    pub fn signal(&self, sig: i32) {
        self.process.signal(Signal::try_from(sig).expect("a signal number"));
    }

    /// Waits for exit, at most `bound`.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(bound).map(|(status, _)| status)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

/// One request on a fresh connection.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    let mut s = connect(addr)?;
    request(&mut s, "GET", path, "")
}

pub fn post(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<Response> {
    let mut s = connect(addr)?;
    request(&mut s, "POST", path, body)
}

pub fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

thread_local! {
    /// One current-thread runtime per test thread for the client below, built once.
    static RUNTIME: std::cell::OnceCell<tokio::runtime::Runtime> = const { std::cell::OnceCell::new() };
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    RUNTIME.with(|rt| {
        rt.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime"))
            .block_on(f)
    })
}

/// The client's error as an io::Error of the matching kind (tests compare kinds).
fn io_error(e: HttpError) -> std::io::Error {
    use std::io::{Error, ErrorKind};
    match e {
        HttpError::Connect(io) | HttpError::Io(io) => io,
        HttpError::Reset { .. } => Error::new(ErrorKind::ConnectionReset, e.to_string()),
        HttpError::Closed { .. } | HttpError::BodyIncomplete => Error::new(ErrorKind::UnexpectedEof, e.to_string()),
        HttpError::Malformed(_) => Error::new(ErrorKind::InvalidData, e.to_string()),
    }
}

/// Sends one request on `s` (keep-alive) through the lab's HTTP client (hyper) and reads one
/// response; `s` stays open for the next request.
pub fn request(s: &mut TcpStream, method: &str, path: &str, body: &str) -> std::io::Result<Response> {
    // The client runs on a duplicate of the socket; O_NONBLOCK is shared with `s`, so it is
    // restored before returning.
    let dup = s.try_clone()?;
    dup.set_nonblocking(true)?;
    let result = block_on(async {
        let stream = tokio::net::TcpStream::from_std(dup)?;
        let mut conn = Conn::over(stream).await.map_err(io_error)?;
        let headers = [("content-type", "application/json")];
        let call = http_client::call(method, "test", path, &headers, body.to_string()).map_err(io_error)?;
        let sent = tokio::time::timeout(Duration::from_secs(20), conn.send(&call)).await;
        conn.close().await;
        match sent {
            Ok(r) => r.map_err(io_error),
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    });
    s.set_nonblocking(false)?;
    let r = result?;
    Ok(Response {
        status: r.status,
        headers: r.headers.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect(),
        body: String::from_utf8_lossy(&r.body).into_owned(),
    })
}

/// Polls `f` until it returns true or `bound` passes.
pub fn eventually(bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Waits for a child with piped stdout and stderr at most `limit`, killing it past that; returns status, stdout, stderr.
pub fn wait_bounded(mut child: Child, limit: Duration) -> (ExitStatus, String, String) {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let s = child.wait().unwrap();
            let (o, e) = (out_t.join().unwrap(), err_t.join().unwrap());
            panic!("still running after {limit:?} ({s}); stdout:\n{o}\nstderr:\n{e}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, out_t.join().unwrap(), err_t.join().unwrap())
}
