//! kube-proxy for one Service port, in user space: an L4 proxy on the Service's ClusterIP.
//!
//! Mirrors iptables mode where it matters for the race:
//! - each new connection goes to a random routable endpoint of the (lagged) view;
//! - an established connection stays on its pod until either end closes (conntrack), whatever
//!   the endpoints do meanwhile; a FIN is passed on as a FIN and a reset as a reset;
//! - a pod whose address no longer accepts looks refused to the client: the accepted socket is
//!   closed with SO_LINGER 0 before any byte (iptables would have the client's SYN answered by
//!   a RST; after the accept that is the closest a user-space proxy can get);
//! - no endpoint at all: refused (kube-proxy installs a REJECT rule);
//! - a pod whose sandbox is torn down (pod gone) has no address any more: connections to it
//!   hang, as SYNs to a vanished pod IP do while the node fails to resolve its neighbour, and
//!   then fail ("no route to host" after ARP gives up, ~3 s).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use crate::lab::api::cluster::{ser_ms, Clock, Cluster};
use crate::lab::api::endpoint_slice::{Endpoint, Slice};

/// How the proxy handled a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Connected to the pod and spliced.
    Spliced,
    /// The pod's address refused: the client got a reset before any byte.
    Refused,
    /// No routable endpoint: refused.
    NoEndpoints,
    /// The pod is gone: nothing answered for a while, then the connection failed.
    Blackholed,
}

/// How a spliced connection ended: which side closed or reset first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    ClientClosed,
    PodClosed,
    ClientReset,
    PodReset,
    /// A FIN or RST from one side or the other: conntrack (the kernel node) does not say which.
    Closed,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnRecord {
    pub client: SocketAddr,
    #[serde(serialize_with = "ser_ms", rename = "accepted_ms")]
    pub accepted: Duration,
    pub pod: Option<String>,
    pub outcome: Outcome,
    /// When and how it ended (spliced connections only).
    pub end: Option<(Duration, End)>,
}

/// Everything the proxy did, for attribution.
#[derive(Debug, Default)]
pub struct ProxyLog {
    records: Mutex<Vec<ConnRecord>>,
    by_client: Mutex<HashMap<SocketAddr, Vec<usize>>>,
}

impl ProxyLog {
    fn push(&self, r: ConnRecord) -> usize {
        let client = r.client;
        let mut recs = self.records.lock().unwrap();
        recs.push(r);
        let idx = recs.len() - 1;
        self.by_client.lock().unwrap().entry(client).or_default().push(idx);
        idx
    }

    fn set(&self, idx: usize, f: impl FnOnce(&mut ConnRecord)) {
        if let Some(r) = self.records.lock().unwrap().get_mut(idx) {
            f(r);
        }
    }

    /// The connection a client socket had open at `at` (client ports are reused over time).
    pub fn lookup(&self, client: SocketAddr, at: Duration) -> Option<ConnRecord> {
        let idxs = self.by_client.lock().unwrap().get(&client).cloned()?;
        let recs = self.records.lock().unwrap();
        idxs.iter().rev().map(|i| &recs[*i]).find(|r| r.accepted <= at + Duration::from_millis(5)).cloned()
    }

    pub fn records(&self) -> Vec<ConnRecord> {
        self.records.lock().unwrap().clone()
    }
}

/// kube-proxy's choice for new connections: ready endpoints, or else terminating ones that still
/// serve (the fallback added with EndpointSlice terminating conditions).
pub fn routable(slice: &[Endpoint]) -> Vec<&Endpoint> {
    let ready: Vec<&Endpoint> = slice.iter().filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    slice.iter().filter(|e| e.serving && e.terminating).collect()
}

pub struct ServiceProxy {
    pub service: String,
    pub addr: SocketAddr,
    pub log: Arc<ProxyLog>,
    /// The accept loop; dropping the proxy stops it.
    _task: AbortOnDropHandle<()>,
}

/// How long a connection to a vanished pod address hangs before it fails: Linux gives up
/// resolving a neighbour after 3 probes 1 s apart and reports the host unreachable.
pub const BLACKHOLE_HOLD: Duration = Duration::from_secs(3);
/// Connect timeout to a pod (loopback answers at once; this only bounds pathologies).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

impl ServiceProxy {
    pub async fn start(
        service: &str,
        bind: SocketAddr,
        view: watch::Receiver<Slice>,
        cluster: Arc<Cluster>,
    ) -> std::io::Result<ServiceProxy> {
        let listener = match TcpListener::bind(bind).await {
            Ok(l) => l,
            // A privileged Service port (80) without root, or a port something on this machine
            // holds on every address: any port on the same ClusterIP (pods reach it by name).
            Err(e) if matches!(e.kind(), std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::AddrInUse) => {
                TcpListener::bind(SocketAddr::new(bind.ip(), 0)).await?
            }
            Err(e) => return Err(e),
        };
        let addr = listener.local_addr()?;
        let log = Arc::new(ProxyLog::default());
        let task = AbortOnDropHandle::new(tokio::spawn(accept_loop(listener, view, cluster, log.clone())));
        Ok(ServiceProxy { service: service.to_string(), addr, log, _task: task })
    }
}

async fn accept_loop(listener: TcpListener, view: watch::Receiver<Slice>, cluster: Arc<Cluster>, log: Arc<ProxyLog>) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let now = cluster.clock.now();
        let slice = view.borrow().clone();
        let choice = {
            let candidates = routable(&slice);
            if candidates.is_empty() {
                None
            } else {
                let i = rand::rng().random_range(0..candidates.len());
                Some(candidates[i].clone())
            }
        };
        let Some(ep) = choice else {
            log.push(ConnRecord { client: peer, accepted: now, pod: None, outcome: Outcome::NoEndpoints, end: None });
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        };
        let gone = cluster.pod(&ep.pod).is_some_and(|p| p.gone.is_some_and(|g| g <= now));
        let idx = log.push(ConnRecord {
            client: peer,
            accepted: now,
            pod: Some(ep.pod.clone()),
            outcome: if gone { Outcome::Blackholed } else { Outcome::Spliced },
            end: None,
        });
        let log = log.clone();
        let cluster = cluster.clone();
        tokio::spawn(async move {
            if gone {
                blackhole(client).await;
                return;
            }
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(ep.addr)).await {
                Ok(Ok(upstream)) => {
                    let _ = upstream.set_nodelay(true);
                    let (end, at) = splice(client, upstream, &cluster.clock).await;
                    log.set(idx, |r| r.end = Some((at, end)));
                }
                _ => {
                    log.set(idx, |r| r.outcome = Outcome::Refused);
                    let _ = client.set_zero_linger();
                    drop(client);
                }
            }
        });
    }
}

/// Swallows what the client sends and never answers; after the hold, resets.
async fn blackhole(mut client: TcpStream) {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(BLACKHOLE_HOLD, async {
        while let Ok(n) = client.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let _ = client.set_zero_linger();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Pod,
}

/// Copies one direction; on EOF passes the FIN on. Errors name the socket that failed and when.
async fn pump<R, W>(
    mut r: R,
    mut w: W,
    from: Side,
    to: Side,
    first_eof: &Mutex<Option<(Side, Duration)>>,
    clock: &Clock,
) -> Result<(), (Side, Duration)>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf).await.map_err(|_| (from, clock.now()))?;
        if n == 0 {
            first_eof.lock().unwrap().get_or_insert((from, clock.now()));
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await.map_err(|_| (to, clock.now()))?;
    }
}

/// Splices until both directions are done; a reset on one side becomes a reset on the other.
/// Returns who ended it and when the first side closed or failed (not when the other followed).
/// Hand-written on purpose: tokio's copy_bidirectional turns a peer's reset into an orderly
/// close and says neither who ended nor when, which is exactly what the race is about.
async fn splice(client: TcpStream, upstream: TcpStream, clock: &Clock) -> (End, Duration) {
    let first_eof = Mutex::new(None);
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let result = tokio::try_join!(
        pump(&mut cr, &mut uw, Side::Client, Side::Pod, &first_eof, clock),
        pump(&mut ur, &mut cw, Side::Pod, Side::Client, &first_eof, clock)
    );
    let client = cr.reunite(cw).ok();
    let upstream = ur.reunite(uw).ok();
    match result {
        Ok(_) => match *first_eof.lock().unwrap() {
            Some((Side::Pod, at)) => (End::PodClosed, at),
            Some((Side::Client, at)) => (End::ClientClosed, at),
            None => (End::ClientClosed, clock.now()),
        },
        Err((Side::Pod, at)) => {
            if let Some(c) = client {
                let _ = c.set_zero_linger();
            }
            (End::PodReset, at)
        }
        Err((Side::Client, at)) => {
            if let Some(u) = upstream {
                let _ = u.set_zero_linger();
            }
            (End::ClientReset, at)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::api::cluster::Clock;
    use crate::lab::network::http_client;

    fn ep(pod: &str, addr: SocketAddr, ready: bool) -> Endpoint {
        Endpoint { pod: pod.into(), addr, ready, serving: ready, terminating: !ready }
    }

    #[tokio::test]
    async fn routes_keeps_connections_and_refuses_dead_pods() {
        let cluster = Arc::new(Cluster::new(Clock::new()));
        let (a, server) = crate::lab::network::fixed_http_server("a").await;
        let (tx, rx) = watch::channel::<Slice>(Arc::new(vec![ep("a", a, true)]));
        let proxy = ServiceProxy::start("svc", "127.0.0.1:0".parse().unwrap(), rx, cluster.clone()).await.unwrap();

        let mut conn = http_client::Conn::connect(proxy.addr).await.unwrap();
        let r = conn.send(&http_client::get("svc", "/", &[], false)).await.unwrap();
        assert_eq!(r.body, b"a");
        let rec = proxy.log.lookup(conn.local, cluster.clock.now()).unwrap();
        assert_eq!((rec.pod.as_deref(), rec.outcome), (Some("a"), Outcome::Spliced));

        // The endpoint leaves and a dead address takes its place: the open connection stays on
        // its pod (conntrack), a new one is refused.
        let dead: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        tx.send(Arc::new(vec![ep("b", dead, true)])).unwrap();
        let r = conn.send(&http_client::get("svc", "/", &[], false)).await.unwrap();
        assert_eq!(r.body, b"a");
        let fresh = http_client::get_once(proxy.addr, "svc", "/", &[]).await;
        assert!(
            matches!(
                fresh,
                Err(http_client::HttpError::Reset { got_bytes: false })
                    | Err(http_client::HttpError::Closed { got_bytes: false })
            ),
            "{fresh:?}"
        );

        // No endpoints: refused too.
        tx.send(Arc::new(vec![])).unwrap();
        assert!(http_client::get_once(proxy.addr, "svc", "/", &[]).await.is_err());
        let outcomes: Vec<Outcome> = proxy.log.records().iter().map(|r| r.outcome).collect();
        assert!(outcomes.contains(&Outcome::Refused) && outcomes.contains(&Outcome::NoEndpoints), "{outcomes:?}");
        server.abort();
    }

    #[tokio::test]
    async fn pod_reset_reaches_the_client_as_reset() {
        let cluster = Arc::new(Cluster::new(Clock::new()));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            s.set_zero_linger().unwrap();
            drop(s);
        });
        let (_tx, rx) = watch::channel::<Slice>(Arc::new(vec![ep("a", a, true)]));
        let proxy = ServiceProxy::start("svc", "127.0.0.1:0".parse().unwrap(), rx, cluster.clone()).await.unwrap();
        let r = http_client::get_once(proxy.addr, "svc", "/", &[]).await;
        assert!(matches!(r, Err(http_client::HttpError::Reset { .. })), "{r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rec = &proxy.log.records()[0];
        assert_eq!(rec.end.map(|e| e.1), Some(End::PodReset));
    }
}
