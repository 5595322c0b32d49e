//! Shared helpers for black-box tests: spawn the real binary on loopback, talk raw HTTP/1.1.
#![allow(dead_code)]

pub mod process;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

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

/// Sends one request on `s` (keep-alive) and reads one response framed by Content-Length.
pub fn request(s: &mut TcpStream, method: &str, path: &str, body: &str) -> std::io::Result<Response> {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut status_line = String::new();
    if reader.read_line(&mut status_line)? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before a response"));
    }
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut buf = vec![0; len];
    reader.read_exact(&mut buf)?;
    Ok(Response { status, headers, body: String::from_utf8_lossy(&buf).into_owned() })
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
