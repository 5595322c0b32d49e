//! Just enough HTTP/1.1 over a std `TcpStream` for probes and idle keep-alive connections: no
//! client library between the measurement and the socket.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One GET on a fresh connection (`Connection: close`); returns the status code.
pub fn get_once(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    read_response(&mut s)
}

/// A connection that did one request and then stays open, idle, as a keep-alive client leaves it.
pub struct KeepAlive {
    stream: TcpStream,
}

impl KeepAlive {
    pub fn open(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(KeepAlive, u16)> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
        let status = read_response(&mut s)?;
        Ok((KeepAlive { stream: s }, status))
    }

    /// Whether the server has closed its side (EOF or reset) by now.
    pub fn closed_by_server(&self) -> bool {
        let _ = self.stream.set_nonblocking(true);
        let mut b = [0u8; 64];
        let closed = match (&self.stream).read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(_) => true,
        };
        let _ = self.stream.set_nonblocking(false);
        closed
    }
}

/// Reads one response with a `Content-Length` body; returns its status.
fn read_response(s: &mut TcpStream) -> io::Result<u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the response head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no status line"))?;
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "response without Content-Length"))?;
    let mut have = buf.len() - head_end;
    while have < len {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed in the body"));
        }
        have += n;
    }
    Ok(status)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
