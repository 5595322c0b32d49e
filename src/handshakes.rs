//! Handshakes under way on a listening port, as the kernel's socket diagnostics (`sock_diag`, what
//! `ss` reads) report them: the connections whose SYN was answered and whose ACK has not yet
//! made them a queued connection. Readable without privileges, in the caller's network namespace.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::Socket;

/// The kernel's `TCP_NEW_SYN_RECV`: a request socket (a handshake under way on a listener).
const TCP_NEW_SYN_RECV: u32 = 12;

/// How long the kernel's reply may take (a dump always ends; this bounds the wait regardless).
const REPLY_BOUND: Duration = Duration::from_millis(200);

/// How many handshakes under way have `listener` as their local end.
pub fn under_way(listener: SocketAddr) -> io::Result<usize> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    socket2::SockRef::from(&socket).set_read_timeout(Some(REPLY_BOUND))?;
    // A v6 wildcard listener also takes v4 connections.
    let families: &[u8] = if listener.is_ipv4() { &[AF_INET] } else { &[AF_INET, AF_INET6] };
    let mut count = 0;
    for &family in families {
        count += dump(&socket, family, listener)?;
    }
    Ok(count)
}

/// Whether a listener bound to `bound` takes connections to `local` (a v4 address may come
/// v4-mapped).
fn listens_on(bound: IpAddr, local: IpAddr) -> bool {
    let local = match local {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(local, IpAddr::V4),
        v4 => v4,
    };
    bound.is_unspecified() || bound == local
}

fn dump(socket: &Socket, family: u8, listener: SocketAddr) -> io::Result<usize> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let request = InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::SYN_RECV | StateFlags::from_bits_retain(1 << TCP_NEW_SYN_RECV),
        socket_id: if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() },
    };
    let mut message = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    message.finalize();
    let mut out = vec![0; message.buffer_len()];
    message.serialize(&mut out);
    socket.send(&out, 0)?;

    let mut count = 0;
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut buffer[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let reply = NetlinkMessage::<SockDiagMessage>::deserialize(&buffer[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag reply: {e}")))?;
            let length = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let id = &response.header.socket_id;
                    if id.source_port == listener.port() && listens_on(listener.ip(), id.source_address) {
                        count += 1;
                    }
                }
                NetlinkPayload::Done(_) => return Ok(count),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    #[test]
    fn a_handshake_is_counted_until_it_becomes_a_queued_connection() {
        // TCP_DEFER_ACCEPT keeps a handshake under way until its client sends data.
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        let secs: libc::c_int = 5;
        // SAFETY: a valid fd and an int option of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&secs as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        socket.listen(16).unwrap();
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(under_way(addr).unwrap(), 0);
        let mut clients: Vec<TcpStream> =
            (0..3).map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).unwrap()).collect();
        let _elsewhere = TcpStream::connect(other.local_addr().unwrap()).unwrap();
        assert_eq!(under_way(addr).unwrap(), 3, "three handshakes wait for data");
        clients[0].write_all(b"x").unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(2);
        while under_way(addr).unwrap() != 2 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(under_way(addr).unwrap(), 2, "the one that sent data is queued now");
        // A wildcard listener on the same port counts the same handshakes.
        assert_eq!(under_way(SocketAddr::new("0.0.0.0".parse().unwrap(), addr.port())).unwrap(), 2);
        assert_eq!(under_way(SocketAddr::new("127.0.0.2".parse().unwrap(), addr.port())).unwrap(), 0);
    }
}
