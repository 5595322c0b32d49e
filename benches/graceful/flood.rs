//! Memory after a connection flood: does a pod give back what a burst of connections took?
//! glibc keeps freed heap in its arenas; the binary trims it once open connections fall well
//! below their peak (src/memory.rs). Measured: idle RSS, the peak while every connection is open
//! and has been answered once, and RSS a few seconds after they all closed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::procs::{Proc, Spec};

/// The binary checks every 2 s whether to trim; give it two chances.
const SETTLE: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize)]
pub struct Flood {
    pub connections: usize,
    pub idle_rss_kib: u64,
    pub peak_rss_kib: u64,
    pub after_rss_kib: u64,
    pub settle_ms: u64,
}

impl Flood {
    /// The share of what the flood added that was given back (1.0: all of it).
    pub fn returned(&self) -> f64 {
        let grown = self.peak_rss_kib.saturating_sub(self.idle_rss_kib) as f64;
        if grown <= 0.0 {
            return 1.0;
        }
        self.peak_rss_kib.saturating_sub(self.after_rss_kib) as f64 / grown
    }
}

pub fn measure(spec: &Spec, connections: usize) -> Result<Flood> {
    raise_fd_limit(connections as u64 + 256);
    let p = Proc::start(spec)?;
    std::thread::sleep(Duration::from_millis(300));
    let idle = p.mem()?.rss_kib;
    let mut open = Vec::with_capacity(connections);
    for i in 0..connections {
        let mut s = TcpStream::connect_timeout(&p.listen, Duration::from_secs(2))
            .with_context(|| format!("connection {i} of {connections}"))?;
        s.write_all(b"GET /api/data?work_ms=0 HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        open.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for s in &mut open {
        // One answer per connection, so each holds the buffers a served connection holds.
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        s.set_read_timeout(Some(left))?;
        let mut buf = [0u8; 512];
        let _ = s.read(&mut buf);
    }
    let peak = p.mem()?.rss_kib;
    drop(open);
    std::thread::sleep(SETTLE);
    let after = p.mem()?.rss_kib;
    Ok(Flood {
        connections,
        idle_rss_kib: idle,
        peak_rss_kib: peak,
        after_rss_kib: after,
        settle_ms: SETTLE.as_millis() as u64,
    })
}

/// The flood's client sockets live in this process: lift its soft open-files limit (often 1024).
fn raise_fd_limit(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < want {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard);
        }
    }
}
