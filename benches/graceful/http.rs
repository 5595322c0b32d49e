//! Probes and idle keep-alive connections through the lab's HTTP client
//! (`graceful::lab::network::http_client`, hyper underneath), driven by one small runtime.

use std::cell::OnceCell;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use graceful::lab::network::http_client::{self, Conn, HttpError};

thread_local! {
    /// One current-thread runtime for the benchmark's own requests, built once: probing
    /// readiness must not pay for a runtime per request.
    static RUNTIME: OnceCell<tokio::runtime::Runtime> = const { OnceCell::new() };
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    RUNTIME.with(|rt| {
        rt.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime"))
            .block_on(f)
    })
}

fn io_error(e: HttpError) -> io::Error {
    io::Error::other(e.to_string())
}

/// One GET on a fresh connection (`Connection: close`), bounded by `timeout`; returns the status.
pub fn get_once(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<u16> {
    let host = addr.to_string();
    block_on(async {
        match tokio::time::timeout(timeout, http_client::get_once(addr, &host, path, &[])).await {
            Ok(r) => r.map(|r| r.status).map_err(io_error),
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    })
}

/// A connection that did one request and then stays open, idle, as a keep-alive client leaves it.
pub struct KeepAlive {
    conn: Conn,
}

impl KeepAlive {
    pub fn open(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(KeepAlive, u16)> {
        let host = addr.to_string();
        block_on(async {
            let once = async {
                let mut conn = Conn::connect(addr).await?;
                let r = conn.send(&http_client::get(&host, path, &[], false)).await?;
                Ok::<_, HttpError>((KeepAlive { conn }, r.status))
            };
            match tokio::time::timeout(timeout, once).await {
                Ok(r) => r.map_err(io_error),
                Err(_) => Err(io::ErrorKind::TimedOut.into()),
            }
        })
    }

    /// Whether the server has closed its side (EOF or reset) by now.
    pub fn closed_by_server(&self) -> bool {
        self.conn.is_stale()
    }
}
