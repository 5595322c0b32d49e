//! The public listener, bound by us so that closing it loses no connection the kernel accepted.
//!
//! actix-server drops a connection at three points when it stops: the kernel's accept queue
//! (reset when the listening socket closes), a worker's hand-over channel (a worker that is
//! shutting down drops what is queued there) and a connection whose request has not been read
//! yet (closed as idle). So before actix is told to stop:
//! 1. a BPF filter makes the socket drop new SYNs (the client retries its SYN a second later and
//!    meets a closed port: refused, never accepted); handshakes already under way complete
//!    (where the kernel refuses the filter, as some do without CAP_NET_ADMIN, `hand_over_paused`
//!    pauses actix's accept loop and fills a zero-length queue with a connection of ours instead);
//! 2. marker connections (the only SYNs the filter lets through) follow everything queued, one
//!    per worker: once a worker has opened its marker, its channel holds nothing older;
//! 3. we wait until every accepted connection has started its first request (or stayed silent
//!    past a bound). Only then does actix close the socket.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use socket2::{Domain, SockFilter, Socket, Type};

/// The kernel's accept queue length (the default `somaxconn`).
const BACKLOG: i32 = 4096;
/// How long the whole hand-over may hold the close (connections that send nothing, markers).
pub const HAND_OVER_BOUND: Duration = Duration::from_millis(250);

pub struct PublicListener {
    /// Our handle on the socket actix accepts from (a `dup`): filter and queue length.
    socket: Socket,
    local: SocketAddr,
}

/// Marker connections in flight: local port → the worker thread that opened it, once it has.
#[derive(Default)]
pub struct Markers {
    /// Set once markers exist: until then a new connection costs no lock and no syscall.
    armed: AtomicBool,
    ports: Mutex<HashMap<u16, Option<String>>>,
}

impl Markers {
    /// Called for every new connection: true (and noted) when it is one of ours.
    pub fn opened(&self, peer: impl FnOnce() -> Option<SocketAddr>) -> bool {
        if !self.armed.load(Ordering::SeqCst) {
            return false;
        }
        let Some(peer) = peer() else { return false };
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        match ports.get_mut(&peer.port()) {
            Some(slot) if peer.ip().is_loopback() => {
                *slot = Some(std::thread::current().name().unwrap_or("worker").to_string());
                true
            }
            _ => false,
        }
    }

    /// Notes marker connections about to be opened from `ports`.
    fn expect(&self, ports: impl IntoIterator<Item = u16>) {
        let mut known = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        known.extend(ports.into_iter().map(|p| (p, None)));
        self.armed.store(true, Ordering::SeqCst);
    }

    fn workers_seen(&self) -> usize {
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports.values().flatten().collect::<HashSet<_>>().len()
    }

    fn seen(&self, port: u16) -> bool {
        self.ports.lock().unwrap_or_else(|e| e.into_inner()).get(&port).is_some_and(Option::is_some)
    }
}

/// File descriptors kept free of public connections: the admin listener (liveness probes), logs,
/// the exporter and upstream connections must still work when the public listener is flooded.
const RESERVED_FDS: u64 = 64;

/// Connections each public worker may hold, leaving [`RESERVED_FDS`] for everything else.
pub fn max_connections_per_worker(workers: usize) -> usize {
    let limit = raise_fd_limit();
    (limit.saturating_sub(RESERVED_FDS) / workers.max(1) as u64).clamp(16, 25_000) as usize
}

/// Raises the soft open-files limit to the hard one (what most servers do) and returns it.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain get/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

/// Binds `addr`; returns the listener for actix and our handle on the same socket.
pub fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, PublicListener)> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    let ours = socket.try_clone()?;
    let local = ours.local_addr()?.as_socket().unwrap_or(addr);
    Ok((socket.into(), PublicListener { socket: ours, local }))
}

/// Classic BPF: accept anything that is not a SYN, and SYNs from `allowed` source ports.
fn syn_filter(allowed: &[u16]) -> Vec<SockFilter> {
    const LDH_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const LDB_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    // A TCP socket filter sees the packet from the TCP header on: source port at 0, flags at 13.
    let n = allowed.len();
    let mut prog = vec![SockFilter::new(LDH_ABS, 0, 0, 0)];
    for (i, port) in allowed.iter().enumerate() {
        // Jump to "accept" (after the remaining checks, the flag load and the jset).
        let to_accept = (n - i - 1 + 2) as u8;
        prog.push(SockFilter::new(JEQ_K, to_accept, 0, u32::from(*port)));
    }
    prog.push(SockFilter::new(LDB_ABS, 0, 0, 13));
    prog.push(SockFilter::new(JSET_K, 1, 0, 0x02));
    prog.push(SockFilter::new(RET_K, 0, 0, u32::MAX));
    prog.push(SockFilter::new(RET_K, 0, 0, 0));
    prog
}

/// The kernel's TCP_INFO for a socket.
fn tcp_info(socket: &impl AsRawFd) -> Option<libc::tcp_info> {
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd, a buffer of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info)
}

impl PublicListener {
    /// Where a marker connects: the listener's own address, loopback for a wildcard.
    fn marker_target(&self) -> SocketAddr {
        let ip = match self.local.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, self.local.port())
    }

    /// A socket bound for a marker connection (its port names it before it connects).
    fn marker_socket(&self) -> Option<(Socket, u16)> {
        let target = self.marker_target();
        let socket = Socket::new(Domain::for_address(target), Type::STREAM, None).ok()?;
        socket.bind(&SocketAddr::new(target.ip(), 0).into()).ok()?;
        let port = socket.local_addr().ok()?.as_socket()?.port();
        Some((socket, port))
    }

    /// Connections the kernel completed that nobody has accepted yet.
    pub fn queued(&self) -> usize {
        // For a listening socket, tcpi_unacked is the accept queue's length.
        tcp_info(&self.socket).map_or(0, |info| info.tcpi_unacked as usize)
    }

    /// Handshakes under way on the listener (0 where the kernel will not say: the check is lost,
    /// not the close; said once).
    fn handshakes_under_way(&self) -> usize {
        static SAID: AtomicBool = AtomicBool::new(false);
        crate::handshakes::under_way(self.local).unwrap_or_else(|e| {
            if !SAID.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot count the listener's handshakes under way (sock_diag); closing without that check");
            }
            0
        })
    }

    /// Steps 1–3 of the module's sequence, all within [`HAND_OVER_BOUND`]. Returns what was left
    /// (queued in the kernel, accepted but silent) when the bound ran out, or the kernel's refusal
    /// of the SYN filter (then nothing has changed yet: see [`PublicListener::hand_over_paused`]).
    pub async fn hand_over(
        &self,
        markers: &Markers,
        workers: usize,
        unread: &AtomicUsize,
    ) -> std::io::Result<(usize, usize)> {
        let deadline = tokio::time::Instant::now() + HAND_OVER_BOUND;
        let target = self.marker_target();
        // Sockets bound first, so the filter can name their ports. A few spares: the accept
        // thread skips a worker that is at its connection limit.
        let sockets: Vec<(Socket, u16)> = (0..workers * 3).filter_map(|_| self.marker_socket()).collect();
        markers.expect(sockets.iter().map(|(_, p)| *p));
        let ports: Vec<u16> = sockets.iter().map(|(_, p)| *p).collect();
        self.socket.attach_filter(&syn_filter(&ports))?;
        let mut open: Vec<TcpStream> = Vec::new();
        for (socket, port) in sockets {
            if markers.workers_seen() >= workers || tokio::time::Instant::now() >= deadline {
                break;
            }
            // Loopback: the handshake completes inside connect().
            if socket.connect_timeout(&target.into(), Duration::from_millis(50)).is_err() {
                continue;
            }
            open.push(socket.into());
            while !markers.seen(port) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let left = loop {
            let (queued, fresh) = (self.queued(), unread.load(Ordering::SeqCst));
            if (queued == 0 && fresh == 0) || tokio::time::Instant::now() >= deadline {
                break (queued, fresh);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        drop(open);
        Ok(left)
    }

    /// The hand-over without a socket filter (some kernels refuse one on a TCP socket to a
    /// process without CAP_NET_ADMIN, as in a pod that drops ALL capabilities). An accept queue
    /// of length 0 holds one completed connection, and the kernel drops every SYN while it is
    /// full (the client retries a second later and meets a closed port: refused). So, with
    /// actix's accept loop paused and the queue empty, a connection of ours is queued (the plug,
    /// returned: keep it until the listener is closed), and only then is the queue shrunk to 0;
    /// whatever came first, actix takes before the next try. Then every accepted connection gets
    /// to start its request. What can still be lost: a client whose handshake was under way at
    /// the very instant of the shrink (its ACK dropped: it believes it is connected), or the
    /// queue's clients when the bound runs out.
    pub async fn hand_over_paused<P, R>(
        &self,
        pause: impl Fn() -> P,
        resume: impl Fn() -> R,
        markers: &Markers,
        unread: &AtomicUsize,
    ) -> ((usize, usize), Option<TcpStream>)
    where
        P: std::future::Future<Output = ()>,
        R: std::future::Future<Output = ()>,
    {
        let deadline = tokio::time::Instant::now() + HAND_OVER_BOUND;
        loop {
            let plug = self.plug_the_queue(&pause, &resume, markers, deadline).await;
            // Nothing can pass a full queue: give the workers a moment to take what their
            // hand-over channels hold (not counted as unread until a worker opens them).
            tokio::time::sleep(Duration::from_millis(5)).await;
            let (queued, fresh) = loop {
                let (queued, fresh) = (self.queued(), unread.load(Ordering::SeqCst));
                if fresh == 0 || tokio::time::Instant::now() >= deadline {
                    break (queued, fresh);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            // Accepted by actix after all (its accept thread acted on the pause late): then the
            // slot may hold a client again, and the plugging starts over while time is left.
            let taken = plug.as_ref().is_some_and(|(_, port)| markers.seen(*port));
            if !taken || tokio::time::Instant::now() >= deadline {
                let ours = usize::from(plug.is_some() && !taken);
                return ((queued.saturating_sub(ours), fresh), plug.map(|(stream, _)| stream));
            }
        }
    }

    /// Pauses actix and fills the zero-length queue's slot with a plug, by the deadline.
    async fn plug_the_queue<P, R>(
        &self,
        pause: &impl Fn() -> P,
        resume: &impl Fn() -> R,
        markers: &Markers,
        deadline: tokio::time::Instant,
    ) -> Option<(TcpStream, u16)>
    where
        P: std::future::Future<Output = ()>,
        R: std::future::Future<Output = ()>,
    {
        loop {
            pause().await;
            // The accept thread acts on the command just after it is acknowledged.
            spin_until(ACCEPT_THREAD_SETTLES, || false).await;
            if self.queued() == 0 {
                if let Some((plug, port)) = self.plug(markers).await {
                    // Shrunk only with the plug queued: a full queue drops the ACK of a handshake
                    // under way, and its client (connected, as it believes) is lost at the close.
                    if let Err(e) = self.socket.listen(0) {
                        tracing::warn!(error = %e, "cannot shrink the listener's accept queue");
                    }
                    // Alone in the queue, and an accept loop that had not yet paused would take
                    // it within moments.
                    if self.queued() == 1 && !spin_until(PLUG_HELD, || markers.seen(port)).await {
                        // A handshake that crossed the shrink would lose its ACK to the full
                        // queue: the queue is made long again below, so the ACK lands there, and
                        // actix takes it before another try (while there is time for one).
                        let late = tokio::time::Instant::now() + LAST_TRY >= deadline;
                        if late || self.handshakes_under_way() == 0 {
                            return Some((plug, port));
                        }
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            // Clients came first: actix takes them (and whoever comes meanwhile, the plug too),
            // then the loop pauses it again.
            let _ = self.socket.listen(BACKLOG);
            resume().await;
            spin_until(Duration::from_millis(2), || self.queued() == 0).await;
        }
    }

    /// Connects to the listener while nothing is accepted, and returns the connection once it is
    /// in the accept queue: a queued connection acknowledges a byte at once (a SYN dropped on a
    /// full queue never completes; a handshake whose ACK was dropped leaves no socket on our
    /// side). Registered as a marker, should actix accept it.
    async fn plug(&self, markers: &Markers) -> Option<(TcpStream, u16)> {
        let (socket, port) = self.marker_socket()?;
        markers.expect([port]);
        socket.set_nonblocking(true).ok()?;
        match socket.connect(&self.marker_target().into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(_) => return None,
        }
        // Local: the handshake completes within microseconds, unless the SYN was dropped.
        let established = || tcp_info(&socket).is_some_and(|i| i32::from(i.tcpi_state) == TCP_ESTABLISHED);
        if !spin_until(PLUG_ANSWERS, established).await {
            return None;
        }
        socket.send(b"\n").ok()?;
        if !spin_until(PLUG_ANSWERS, || tcp_info(&socket).is_some_and(|i| i.tcpi_unacked == 0)).await {
            return None;
        }
        Some((socket.into(), port))
    }
}

/// How long the accept thread may take to act on a pause.
const ACCEPT_THREAD_SETTLES: Duration = Duration::from_micros(300);
/// Time a last try of the plugging needs (pause, plug, shrink), at least.
const LAST_TRY: Duration = Duration::from_millis(20);
/// How long the plug is watched for an accept loop that had not yet paused.
const PLUG_HELD: Duration = Duration::from_millis(2);
/// How long a local handshake, or the acknowledgement of a byte, may take.
const PLUG_ANSWERS: Duration = Duration::from_millis(2);
/// `TCP_ESTABLISHED` in the kernel's `tcpi_state`.
const TCP_ESTABLISHED: i32 = 1;

/// Waits until `done` or `bound` has passed, yielding to the runtime in between: tokio's timer
/// ticks in whole milliseconds, and these waits are shorter.
async fn spin_until(bound: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + bound;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() >= until {
            return false;
        }
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_drops_syns_except_from_markers() {
        let (_actix_side, ours) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let target = ours.marker_target();
        let marker = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        marker.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        let port = marker.local_addr().unwrap().as_socket().unwrap().port();
        ours.socket.attach_filter(&syn_filter(&[port])).unwrap();
        assert!(marker.connect_timeout(&target.into(), Duration::from_millis(500)).is_ok(), "marker passes");
        let other = TcpStream::connect_timeout(&target, Duration::from_millis(300));
        assert!(other.is_err(), "an ordinary SYN is dropped");
        assert_eq!(ours.queued(), 1, "the marker waits in the accept queue");
    }
}
