//! A deliberately small HTTP/1.1 client on plain tokio sockets, for the load generator and the
//! kubelet's httpGet probes. Small so the lab sees exactly what the wire did: which local socket
//! carried a request (to join it with the Service proxy's connection record), whether the
//! connection was fresh or reused, and reset vs. orderly close vs. short body.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest header block accepted; our servers send a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;
/// Largest body accepted.
const MAX_BODY: usize = 4 * 1024 * 1024;

#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    pub local: SocketAddr,
    pub last_used: Instant,
    /// Requests completed on this connection.
    pub uses: u32,
    buf: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The server lets the connection be reused.
    pub keep_alive: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// What went wrong on the wire. `got_bytes`: part of a response had arrived.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("connection reset")]
    Reset { got_bytes: bool },
    #[error("connection closed before the response was complete")]
    Closed { got_bytes: bool },
    #[error("body shorter than Content-Length")]
    BodyIncomplete,
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("{0}")]
    Io(io::Error),
}

fn is_reset(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted)
}

/// Request bytes for a GET with extra headers.
pub fn get(host: &str, path: &str, headers: &[(&str, &str)], close: bool) -> Vec<u8> {
    let mut s = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: graceful-lab\r\nAccept: */*\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        s.push_str("Connection: close\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Result<Conn, HttpError> {
        Conn::connect_traced(addr).await.1
    }

    /// Connects from a socket bound first, so the local address is known even when the connect
    /// itself fails (a peer that resets at once surfaces as a connect error).
    pub async fn connect_traced(addr: SocketAddr) -> (Option<SocketAddr>, Result<Conn, HttpError>) {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        };
        let socket = match socket {
            Ok(s) => s,
            Err(e) => return (None, Err(HttpError::Connect(e))),
        };
        // Loopback targets: bind the loopback source the kernel would pick anyway.
        let source: SocketAddr = match addr {
            SocketAddr::V4(a) if a.ip().is_loopback() => "127.0.0.1:0".parse().unwrap(),
            SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
            SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
        };
        if let Err(e) = socket.bind(source) {
            return (None, Err(HttpError::Connect(e)));
        }
        let local = socket.local_addr().ok();
        let stream = match socket.connect(addr).await {
            Ok(s) => s,
            Err(e) => return (local, Err(HttpError::Connect(e))),
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok().or(local);
        let Some(local_addr) = local else {
            return (None, Err(HttpError::Connect(io::Error::other("no local address"))));
        };
        (local, Ok(Conn { stream, local: local_addr, last_used: Instant::now(), uses: 0, buf: Vec::new() }))
    }

    /// True when the peer has closed (or sent something unasked): not safe to reuse. Good
    /// clients check this before reusing a pooled connection.
    pub fn is_stale(&self) -> bool {
        let mut probe = [0u8; 1];
        match self.stream.try_read(&mut probe) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => !self.buf.is_empty(),
            _ => true,
        }
    }

    /// Sends one request and reads one response. No timeout here: callers bound it.
    pub async fn send(&mut self, request: &[u8]) -> Result<Response, HttpError> {
        if let Err(e) = self.stream.write_all(request).await {
            return Err(if is_reset(&e) { HttpError::Reset { got_bytes: false } } else { HttpError::Io(e) });
        }
        let resp = self.read_response().await?;
        self.uses += 1;
        self.last_used = Instant::now();
        Ok(resp)
    }

    /// Reads more bytes into the buffer; Ok(false) on EOF.
    async fn fill(&mut self, got_bytes: bool) -> Result<bool, HttpError> {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e) if is_reset(&e) => Err(HttpError::Reset { got_bytes }),
            Err(e) => Err(HttpError::Io(e)),
        }
    }

    async fn read_response(&mut self) -> Result<Response, HttpError> {
        loop {
            let (status, headers, head_len) = loop {
                if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                    let (status, headers) = parse_head(&self.buf[..end])?;
                    break (status, headers, end + 4);
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(HttpError::Malformed("header block too large".into()));
                }
                let got = !self.buf.is_empty();
                if !self.fill(got).await? {
                    return Err(HttpError::Closed { got_bytes: got });
                }
            };
            self.buf.drain(..head_len);
            // Interim 1xx responses precede the real one.
            if (100..200).contains(&status) {
                continue;
            }
            let find_h = |name: &str| {
                headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.to_ascii_lowercase())
            };
            let close = find_h("connection").is_some_and(|v| v.contains("close"));
            let chunked = find_h("transfer-encoding").is_some_and(|v| v.contains("chunked"));
            let length = find_h("content-length").map(|v| v.trim().parse::<usize>());
            let body = if status == 204 || status == 304 {
                Vec::new()
            } else if chunked {
                self.read_chunked().await?
            } else if let Some(len) = length {
                let len = len.map_err(|_| HttpError::Malformed("bad Content-Length".into()))?;
                if len > MAX_BODY {
                    return Err(HttpError::Malformed("body too large".into()));
                }
                while self.buf.len() < len {
                    match self.fill(true).await {
                        Ok(true) => {}
                        Ok(false) | Err(HttpError::Reset { .. }) => return Err(HttpError::BodyIncomplete),
                        Err(e) => return Err(e),
                    }
                }
                self.buf.drain(..len).collect()
            } else {
                // No length: the body runs to the end of the connection.
                while self.fill(true).await? {
                    if self.buf.len() > MAX_BODY {
                        return Err(HttpError::Malformed("body too large".into()));
                    }
                }
                return Ok(Response { status, headers, body: std::mem::take(&mut self.buf), keep_alive: false });
            };
            return Ok(Response { status, headers, body, keep_alive: !close });
        }
    }

    async fn read_chunked(&mut self) -> Result<Vec<u8>, HttpError> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                if !self.fill(true).await.map_err(|_| HttpError::BodyIncomplete)? {
                    return Err(HttpError::BodyIncomplete);
                }
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| HttpError::Malformed(format!("bad chunk size `{size_text}`")))?;
            self.buf.drain(..line_end + 2);
            if body.len() + size > MAX_BODY {
                return Err(HttpError::Malformed("body too large".into()));
            }
            // The chunk plus its CRLF (the last chunk is followed by an empty trailer line).
            while self.buf.len() < size + 2 {
                if !self.fill(true).await.map_err(|_| HttpError::BodyIncomplete)? {
                    return Err(HttpError::BodyIncomplete);
                }
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
            if size == 0 {
                return Ok(body);
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(head: &[u8]) -> Result<(u16, Vec<(String, String)>), HttpError> {
    let text = std::str::from_utf8(head).map_err(|_| HttpError::Malformed("header block is not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed(format!("status line `{status_line}`")));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| HttpError::Malformed(format!("status line `{status_line}`")))?;
    let mut headers = Vec::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    // HTTP/1.0 closes unless it says keep-alive; treat it as closing.
    if version == "HTTP/1.0" && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("connection")) {
        headers.push(("Connection".into(), "close".into()));
    }
    Ok((status, headers))
}

/// One request on a fresh connection that is closed afterwards (how the kubelet probes).
pub async fn get_once(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Response, HttpError> {
    let mut conn = Conn::connect(addr).await?;
    conn.send(&get(host, path, headers, true)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn serve_once(reply: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(reply).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn reads_content_length_and_chunked() {
        let addr = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").await;
        let r = get_once(addr, "x", "/", &[]).await.unwrap();
        assert_eq!((r.status, r.body.as_slice(), r.keep_alive), (200, &b"hello"[..], true));
        let addr = serve_once(b"HTTP/1.1 503 No\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").await;
        let r = get_once(addr, "x", "/", &[]).await.unwrap();
        assert_eq!((r.status, r.body.as_slice(), r.keep_alive), (503, &b"abcde"[..], false));
    }

    #[tokio::test]
    async fn short_body_and_early_close_are_told_apart() {
        let addr = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nhello").await;
        assert!(matches!(get_once(addr, "x", "/", &[]).await, Err(HttpError::BodyIncomplete)));
        let addr = serve_once(b"").await;
        assert!(matches!(get_once(addr, "x", "/", &[]).await, Err(HttpError::Closed { got_bytes: false })));
    }

    #[tokio::test]
    async fn reset_before_any_byte_is_a_reset() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            s.set_zero_linger().unwrap();
            drop(s);
        });
        let r = get_once(addr, "x", "/", &[]).await;
        assert!(
            matches!(r, Err(HttpError::Reset { got_bytes: false }) | Err(HttpError::Closed { got_bytes: false })),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn stale_connection_is_detected() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            drop(s);
        });
        let conn = Conn::connect(addr).await.unwrap();
        server.await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(conn.is_stale());
    }
}
