//! No request lost at the listener's close: a connection the kernel accepted is served, or the
//! client is refused. Many clients open a new connection per request while SIGTERM closes the
//! listener; a request that connected and got no response is lost.
//!
//! `cargo test --test listener_close -- --ignored --nocapture` runs the 200-round loop and prints
//! counts; `LISTENER_CLOSE_BIN=/path/to/graceful` points it at another build (to compare), `ROUNDS=n` changes the count,
//! `LISTENER_CLOSE_UNPRIVILEGED=1` runs the binary with no capabilities as uid 65532.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const CLIENTS: usize = 50;

#[derive(Default, Debug)]
struct Round {
    served: usize,
    refused: usize,
    lost: usize,
    exit: Option<i32>,
}

/// One request on a new connection: Some(true) served, Some(false) lost, None refused.
fn one(addr: SocketAddr) -> Option<bool> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if let Err(e) = s.write_all(b"GET /api/data?work_ms=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n") {
        eprintln!("lost: write {e}");
        return Some(false);
    }
    let mut text = Vec::new();
    let read = s.read_to_end(&mut text);
    let ok = text.starts_with(b"HTTP/1.1 200");
    if !ok {
        eprintln!(
            "lost: read {read:?}, {} bytes: {:?}",
            text.len(),
            String::from_utf8_lossy(&text[..text.len().min(40)])
        );
    }
    Some(ok)
}

/// Runs `bin` directly, or as a pod that drops every capability runs it (uid 65532, no
/// capabilities): where the kernel then refuses the SYN filter, the close takes the paused-accept
/// fallback.
fn command(bin: &str, unprivileged: bool) -> Command {
    if unprivileged {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            "65532",
            "--regid",
            "65532",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            bin,
        ]);
        c
    } else {
        Command::new(bin)
    }
}

fn round(bin: &str, unprivileged: bool) -> Round {
    let mut backend = spawn_with(command(bin, unprivileged), "backend", &["--drain-delay", "300ms"], &[]);
    let addr = backend.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, counts) = (stop.clone(), counts.clone());
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(5);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    match one(addr) {
                        Some(true) => counts[0].fetch_add(1, Ordering::Relaxed),
                        Some(false) => counts[2].fetch_add(1, Ordering::Relaxed),
                        None => {
                            counts[1].fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    backend.signal(libc::SIGTERM);
    let status = backend.wait_exit(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    Round {
        served: counts[0].load(Ordering::Relaxed),
        refused: counts[1].load(Ordering::Relaxed),
        lost: counts[2].load(Ordering::Relaxed),
        exit: status.and_then(|s| s.code()),
    }
}

#[test]
fn no_request_is_lost_when_the_listener_closes() {
    for _ in 0..3 {
        let r = round(BIN, false);
        assert_eq!(r.lost, 0, "{r:?}");
        assert_eq!(r.exit, Some(0), "{r:?}");
        assert!(r.served > 0 && r.refused > 0, "{r:?}");
    }
}

/// Without capabilities (a pod that drops ALL): on kernels that then refuse the SYN filter (this
/// machine's does), the close plugs a zero-length accept queue. What may still be lost is a rare
/// handshake under way at the very shrink: 2 of 200 rounds lost one request each here. Without the
/// plug every round lost one, sometimes two (62 in 60 rounds); without any fallback, 3 rounds lost
/// 1, 10 and 17.
#[test]
fn without_capabilities_at_most_the_last_connection_is_lost() {
    if !nix::unistd::geteuid().is_root() || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped: needs root and setpriv (util-linux) to drop to uid 65532");
        return;
    }
    // A copy where uid 65532 may run it: the build's own path may sit under a private folder.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("graceful");
    std::fs::copy(BIN, &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    for _ in 0..3 {
        let r = round(bin.to_str().unwrap(), true);
        assert!(r.lost <= 1, "{r:?}");
        assert_eq!(r.exit, Some(0), "{r:?}");
        assert!(r.served > 0 && r.refused > 0, "{r:?}");
    }
}

#[test]
#[ignore = "200 rounds (~3 min): run by hand to measure"]
fn listener_close_loop_200() {
    let bin = std::env::var("LISTENER_CLOSE_BIN").unwrap_or_else(|_| BIN.to_string());
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(200);
    let (mut bad_rounds, mut lost, mut served) = (0, 0, 0);
    for i in 0..rounds {
        let r = round(&bin, std::env::var_os("LISTENER_CLOSE_UNPRIVILEGED").is_some());
        lost += r.lost;
        served += r.served;
        if r.lost > 0 || r.exit != Some(0) {
            bad_rounds += 1;
            println!("round {i}: {r:?}");
        }
    }
    println!("listener close: {bad_rounds}/{rounds} rounds lost requests; {lost} lost of {served} served");
    assert_eq!(bad_rounds, 0);
}
