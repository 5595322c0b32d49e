//! The cluster network: pod and Service addresses, kube-proxy, the HTTP client on loopback.

pub mod dns;
pub mod http_client;
pub mod ipam;
pub mod kernel_proxy;
pub mod service_proxy;

/// For unit tests: an HTTP/1.1 server on 127.0.0.1 that answers every request on a keep-alive
/// connection with 200 and `body`.
#[cfg(test)]
pub(crate) async fn fixed_http_server(body: &'static str) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, task)
}
