//! The lab's HTTP/1.1 client, for the load generator and the kubelet's httpGet probes: hyper's
//! client connection over a socket the lab connects itself, so it still sees what the wire did —
//! which local socket carried a request (to join it with the Service proxy's connection record),
//! whether the connection was fresh or reused, whether any response byte had arrived (a
//! byte-counting IO wrapper), and reset vs. orderly close vs. short body.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::{header, Method, Request, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::task::AbortOnDropHandle;

/// Largest header block accepted; our servers send a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;
/// Largest body accepted.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// A request as the lab sends it (built once, sent as often as needed).
#[derive(Debug, Clone)]
pub struct Call {
    method: Method,
    host: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    close: bool,
}

/// A GET with extra headers; `close` asks the server to close the connection after it.
pub fn get(host: &str, path: &str, headers: &[(&str, &str)], close: bool) -> Call {
    let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Call { method: Method::GET, host: host.to_string(), path: path.to_string(), headers, body: Bytes::new(), close }
}

/// A POST of `body` (with its Content-Length) with extra headers.
pub fn post(host: &str, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>, close: bool) -> Call {
    Call { method: Method::POST, body: body.into(), ..get(host, path, headers, close) }
}

/// Any method; an unknown one is an error naming it.
pub fn call(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Call, HttpError> {
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|_| HttpError::Malformed(format!("method `{method}`")))?;
    Ok(Call { method, body: body.into(), ..get(host, path, headers, false) })
}

impl Call {
    fn request(&self) -> Result<Request<Full<Bytes>>, HttpError> {
        let mut b = Request::builder()
            .method(self.method.clone())
            .uri(self.path.as_str())
            .header(header::HOST, self.host.as_str())
            .header(header::USER_AGENT, "graceful-lab")
            .header(header::ACCEPT, "*/*");
        for (k, v) in &self.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        if self.close {
            b = b.header(header::CONNECTION, "close");
        }
        b.body(Full::new(self.body.clone())).map_err(|e| HttpError::Malformed(format!("request: {e}")))
    }
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

/// The I/O error under a hyper error, if the wire caused it.
fn io_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

/// What hyper reports before the response head, in the lab's terms.
fn head_error(e: hyper::Error, got_bytes: bool) -> HttpError {
    match io_cause(&e) {
        Some(io) if is_reset(io) => HttpError::Reset { got_bytes },
        _ if e.is_incomplete_message() || e.is_canceled() || e.is_closed() => HttpError::Closed { got_bytes },
        _ if e.is_parse() || e.is_parse_status() => HttpError::Malformed(e.to_string()),
        Some(io) => HttpError::Io(io::Error::new(io.kind(), e.to_string())),
        None => HttpError::Closed { got_bytes },
    }
}

/// The socket as hyper reads and writes it, shared with the connection so a pooled connection
/// can be checked for a peer close, counting the bytes read.
struct Wire {
    stream: Arc<TcpStream>,
    read: Arc<AtomicU64>,
}

impl AsyncRead for Wire {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            match self.stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    self.read.fetch_add(n as u64, Ordering::Relaxed);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Wire {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The socket closes when the last handle drops; nothing to half-close before that.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    stream: Arc<TcpStream>,
    /// Bytes read from the socket so far (all requests).
    read: Arc<AtomicU64>,
    /// hyper's connection task; dropping the Conn ends it.
    _driver: AbortOnDropHandle<()>,
    pub local: SocketAddr,
    pub last_used: Instant,
    /// Requests completed on this connection.
    pub uses: u32,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("local", &self.local).field("uses", &self.uses).finish()
    }
}

/// The source address the kernel routes `to` from (a UDP connect sends nothing), port 0; the
/// unspecified address when there is no route (the connect then fails and says so).
fn routed_source(to: SocketAddr) -> SocketAddr {
    let unspecified: SocketAddr = match to {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
    };
    std::net::UdpSocket::bind(unspecified)
        .and_then(|u| u.connect(to).and_then(|_| u.local_addr()))
        .map(|a| SocketAddr::new(a.ip(), 0))
        .unwrap_or(unspecified)
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
        // Bind the source address the kernel would pick anyway (by route), so the socket's
        // full address is known even when the connect fails (the kernel node's records are
        // keyed by it).
        let source: SocketAddr = match addr {
            SocketAddr::V4(a) if a.ip().is_loopback() => "127.0.0.1:0".parse().unwrap(),
            _ => routed_source(addr),
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
        (local, Conn::handshake(stream, local_addr).await)
    }

    /// A client connection over a socket connected elsewhere (the tests' std sockets).
    pub async fn over(stream: TcpStream) -> Result<Conn, HttpError> {
        let local = stream.local_addr().map_err(HttpError::Connect)?;
        Conn::handshake(stream, local).await
    }

    /// Ends the connection and waits (bounded) until hyper has let go of the socket, so it is
    /// closed when this returns, whatever runtime runs it.
    pub async fn close(self) {
        let Conn { sender, _driver: driver, .. } = self;
        drop(sender);
        let _ = tokio::time::timeout(Duration::from_secs(1), driver).await;
    }

    async fn handshake(stream: TcpStream, local: SocketAddr) -> Result<Conn, HttpError> {
        let stream = Arc::new(stream);
        let read = Arc::new(AtomicU64::new(0));
        let wire = Wire { stream: stream.clone(), read: read.clone() };
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(MAX_HEAD.max(8192))
            .handshake(TokioIo::new(wire))
            .await
            .map_err(|e| head_error(e, false))?;
        let driver = AbortOnDropHandle::new(tokio::spawn(async move {
            let _ = connection.await;
        }));
        Ok(Conn { sender, stream, read, _driver: driver, local, last_used: Instant::now(), uses: 0 })
    }

    /// True when the peer has closed (or sent something unasked): not safe to reuse. Good
    /// clients check this before reusing a pooled connection. Reads the socket directly: an EOF
    /// or reset stays readable, so hyper's own idle read cannot hide it.
    pub fn is_stale(&self) -> bool {
        if self.sender.is_closed() {
            return true;
        }
        let mut probe = [0u8; 1];
        !matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends one request and reads one response. No timeout here: callers bound it.
    pub async fn send(&mut self, call: &Call) -> Result<Response, HttpError> {
        let before = self.read.load(Ordering::Relaxed);
        let got_bytes = || self.read.load(Ordering::Relaxed) > before;
        let request = call.request()?;
        if self.sender.ready().await.is_err() {
            return Err(HttpError::Closed { got_bytes: false });
        }
        let resp = self.sender.send_request(request).await.map_err(|e| head_error(e, got_bytes()))?;
        let status = resp.status().as_u16();
        let http10 = resp.version() == Version::HTTP_10;
        let headers: Vec<(String, String)> = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let framed = resp.headers().contains_key(header::CONTENT_LENGTH)
            || resp.headers().get(header::TRANSFER_ENCODING).is_some_and(|v| v.as_bytes().ends_with(b"chunked"));
        let body = match Limited::new(resp.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes().to_vec(),
            Err(e) => return Err(body_error(e, framed)),
        };
        let says_close = headers.iter().any(|(k, v)| k == "connection" && v.to_ascii_lowercase().contains("close"));
        let says_keep_alive = headers.iter().any(|(k, _)| k == "connection");
        let no_body = status == 204 || status == 304;
        // HTTP/1.0 closes unless it says otherwise.
        let keep_alive = (framed || no_body) && !says_close && (!http10 || says_keep_alive);
        self.uses += 1;
        self.last_used = Instant::now();
        Ok(Response { status, headers, body, keep_alive })
    }
}

/// A body cut short: framed (Content-Length, chunked) → incomplete; one that runs to the end of
/// the connection ends by a reset only.
fn body_error(e: Box<dyn std::error::Error + Send + Sync>, framed: bool) -> HttpError {
    if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
        return HttpError::Malformed("body too large".into());
    }
    match io_cause(e.as_ref()) {
        Some(io) if !framed && is_reset(io) => HttpError::Reset { got_bytes: true },
        _ => HttpError::BodyIncomplete,
    }
}

/// One GET on a fresh connection that is closed afterwards (how the kubelet probes).
pub fn get_once<'a>(
    addr: SocketAddr,
    host: &'a str,
    path: &'a str,
    headers: &'a [(&'a str, &'a str)],
) -> impl Future<Output = Result<Response, HttpError>> + 'a {
    call_once(addr, get(host, path, headers, true))
}

/// One request on a fresh connection, closed before this returns.
pub async fn call_once(addr: SocketAddr, call: Call) -> Result<Response, HttpError> {
    let mut conn = Conn::connect(addr).await?;
    let r = conn.send(&call).await;
    conn.close().await;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
