//! The public listener, bound by us so that closing it loses no connection the kernel accepted.
//!
//! actix-server drops a connection at three points when it stops: the kernel's accept queue
//! (reset when the listening socket closes), the worker's hand-over channel (dropped by a worker
//! that is shutting down) and a connection whose request has not been read yet (closed as idle).
//! So before actix is told to stop: a BPF filter makes the socket drop new SYNs (the client
//! retries its SYN and then meets a closed port: refused, never accepted), then we wait until
//! the accept queue is empty and every accepted connection has started its first request (or
//! stayed silent past a bound). Only then does actix close the socket.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use socket2::{Domain, SockFilter, Socket, Type};

/// The kernel's accept queue length (the default `somaxconn`).
const BACKLOG: i32 = 4096;
/// How long a connection that sent nothing yet may hold the close.
pub const SILENT_CONNECTION_BOUND: Duration = Duration::from_millis(250);

pub struct PublicListener {
    /// Our handle on the socket actix accepts from (a `dup`): filter and queue length.
    socket: Socket,
}

/// Binds `addr`; returns the listener for actix and our handle on the same socket.
pub fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, PublicListener)> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    let ours = socket.try_clone()?;
    Ok((socket.into(), PublicListener { socket: ours }))
}

impl PublicListener {
    /// Step 1: new SYNs are dropped from now on; established connections are not affected.
    pub fn refuse_new(&self) -> std::io::Result<()> {
        // One classic-BPF instruction: `ret #0` (keep 0 bytes = drop every packet).
        const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
        self.socket.attach_filter(&[SockFilter::new(BPF_RET_K, 0, 0, 0)])
    }

    /// Connections the kernel completed that nobody has accepted yet.
    pub fn queued(&self) -> usize {
        // For a listening socket, tcpi_unacked is the accept queue's length.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: a valid fd, a buffer of the size passed.
        let rc = unsafe {
            libc::getsockopt(
                self.socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            info.tcpi_unacked as usize
        } else {
            0
        }
    }

    /// Step 2: waits until nothing is queued in the kernel and no accepted connection is still
    /// waiting for its first request to be read, twice in a row (the hand-over from actix's
    /// accept thread to a worker is not observable), at most `bound`.
    pub async fn wait_handed_over(&self, unread: &AtomicUsize, bound: Duration) -> (usize, usize) {
        let deadline = tokio::time::Instant::now() + bound;
        let mut quiet = 0;
        loop {
            let (queued, fresh) = (self.queued(), unread.load(Ordering::SeqCst));
            quiet = if queued == 0 && fresh == 0 { quiet + 1 } else { 0 };
            if quiet >= 2 || tokio::time::Instant::now() >= deadline {
                return (queued, fresh);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}
