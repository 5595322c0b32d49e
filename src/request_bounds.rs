//! Bounds on one request's life that actix does not give: a body that stops arriving, and a
//! client that hung up while its request was still being worked on.

use std::os::fd::RawFd;
use std::time::Duration;

use actix_web::dev::{Payload, ServiceRequest};
use actix_web::web::{Bytes, BytesMut};
use actix_web::HttpMessage;
use futures_util::StreamExt;

/// Largest body read up front; larger bodies are refused with 413 (ours are a few KiB).
pub const MAX_BODY: usize = 1024 * 1024;
/// A request shorter than this never pays for a disconnect check.
const FIRST_CHECK: Duration = Duration::from_millis(50);
const CHECK_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// The body did not arrive within the bound (408).
    TooSlow,
    /// Larger than [`MAX_BODY`] (413).
    TooLarge,
    /// The client closed or the framing was broken (400).
    Broken,
}

fn has_body(req: &ServiceRequest) -> bool {
    let headers = req.headers();
    let length = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    length.is_some_and(|n| n > 0) || headers.contains_key("transfer-encoding")
}

/// Reads the whole body within `bound` and puts it back for the handler, so a slow sender holds
/// neither a worker's attention nor the drain longer than `bound`.
pub async fn read_body(req: &mut ServiceRequest, bound: Duration) -> Result<(), BodyError> {
    if !has_body(req) {
        return Ok(());
    }
    let mut payload = req.take_payload();
    let read = async {
        let mut buf = BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|_| BodyError::Broken)?;
            if buf.len() + chunk.len() > MAX_BODY {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    let body: Bytes = tokio::time::timeout(bound, read).await.map_err(|_| BodyError::TooSlow)??;
    req.set_payload(Payload::from(body));
    Ok(())
}

/// The peer's socket, recorded when the connection opens.
#[derive(Clone, Copy, Debug)]
pub struct PeerSocket(pub RawFd);

fn peer_hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one pollfd, timeout 0; the fd stays open while its request is being served.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Resolves once the client has closed its side of the connection (checked every 50 ms after
/// the first 50 ms, so short requests cost nothing).
pub async fn client_gone(peer: Option<PeerSocket>) {
    let Some(PeerSocket(fd)) = peer else { return std::future::pending().await };
    tokio::time::sleep(FIRST_CHECK).await;
    loop {
        if peer_hung_up(fd) {
            return;
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
}
