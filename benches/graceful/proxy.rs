//! The lab's user-space Service proxy (`graceful::lab::network::service_proxy`) in front of one backend,
//! run the way the lab runs it: a 2-worker tokio runtime, one ready endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use graceful::lab::api::cluster::{Clock, Cluster, Pod};
use graceful::lab::api::endpoint_slice::{Endpoint, Slice};
use graceful::lab::network::ipam::{Mode, Net};
use graceful::lab::network::service_proxy::ServiceProxy;
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    proxy: Option<ServiceProxy>,
    _view: watch::Sender<Slice>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    pub fn start(backend: SocketAddr) -> Result<Proxy> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("svc-proxy")
            .build()
            .context("tokio runtime for the Service proxy")?;
        let pod = "backend-bench-0";
        let cluster = Arc::new(Cluster::new(Clock::new()));
        // The proxy routes only to pods the "API server" knows and that are not gone.
        cluster.add_pod(Pod {
            labels: BTreeMap::from([("app".to_string(), "backend".to_string())]),
            ip: backend.ip(),
            running: true,
            started: true,
            ready: true,
            ready_since: Some(Duration::ZERO),
            ..Pod::new(pod, "backend", "bench", Net::new(Mode::SharedLoopback).pod(&[])?)
        });
        let endpoint = Endpoint { pod: pod.into(), addr: backend, ready: true, serving: true, terminating: false };
        let (tx, rx) = watch::channel::<Slice>(Arc::new(vec![endpoint]));
        let proxy = rt
            .block_on(ServiceProxy::start("svc-backend", "127.0.0.1:0".parse()?, rx, cluster))
            .context("starting the Service proxy")?;
        Ok(Proxy { addr: proxy.addr, proxy: Some(proxy), _view: tx, rt: Some(rt) })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        drop(self.proxy.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}
