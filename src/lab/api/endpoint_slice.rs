//! The EndpointSlice and Service objects as the lab plays them: what the controller publishes
//! and every proxy reads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::lab::api::cluster::Pod;
use crate::lab::api::manifest::namespace_of;

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
    /// The Service's name (`svc-backend`).
    pub service: String,
    /// Which of the Service's ports, when it has several (its name, else its number).
    pub port_label: Option<String>,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub port: u16,
    pub target: IntOrString,
    pub publish_not_ready: bool,
}

impl ServicePort {
    /// Every port of a Service, as the lab plays each one.
    pub fn of_service(s: &Service) -> Result<Vec<ServicePort>> {
        let name = s.metadata.name.clone().unwrap_or_default();
        let spec = s.spec.clone().unwrap_or_default();
        let multi = spec.ports.as_ref().map(|p| p.len()).unwrap_or(0) > 1;
        spec.ports
            .iter()
            .flatten()
            .map(|p| {
                Ok(ServicePort {
                    service: name.clone(),
                    port_label: multi.then(|| p.name.clone().unwrap_or_else(|| p.port.to_string())),
                    namespace: namespace_of(&s.metadata),
                    selector: spec.selector.clone().unwrap_or_default(),
                    port: u16::try_from(p.port).with_context(|| format!("Service/{name}: port {}", p.port))?,
                    target: p.target_port.clone().unwrap_or(IntOrString::Int(p.port)),
                    publish_not_ready: spec.publish_not_ready_addresses == Some(true),
                })
            })
            .collect()
    }

    /// `svc-backend`, or `svc-backend:http` for one port of a multi-port Service.
    pub fn label(&self) -> String {
        match &self.port_label {
            Some(port) => format!("{}:{port}", self.service),
            None => self.service.clone(),
        }
    }

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
