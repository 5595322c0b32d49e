//! The EndpointSlice and Service objects as the lab plays them: what the controller publishes
//! and every proxy reads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::lab::api::cluster::Pod;

/// One endpoint with the EndpointSlice conditions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub pod: String,
    pub addr: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

pub type Slice = Arc<Vec<Endpoint>>;

/// A Service port as the lab plays it.
#[derive(Debug, Clone)]
pub struct ServicePort {
    /// `svc-backend` (port name appended when a Service has several ports).
    pub service: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub port: u16,
    pub target: IntOrString,
    pub publish_not_ready: bool,
}

impl ServicePort {
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.namespace == self.namespace && self.selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
    }

    pub fn target_port(&self, pod: &Pod) -> Option<u16> {
        match &self.target {
            IntOrString::Int(p) => u16::try_from(*p).ok(),
            IntOrString::String(name) => match name.parse::<u16>() {
                Ok(p) => Some(p),
                Err(_) => pod.named_ports.get(name).copied(),
            },
        }
    }
}
