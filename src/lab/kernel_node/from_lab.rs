//! The lab's EndpointSlice view (`api::endpoint_slice`) turned into what kube-proxy programs
//! here, so `--node kernel` can feed the same slices the user-space proxy reads.

use std::net::SocketAddr;

use anyhow::{bail, Result};

use super::service_model::{Endpoint, ServicePort};
use crate::lab::api::endpoint_slice;

/// One Service port with its slice. Pod addresses in a kernel node are IPv4 from the pod CIDR;
/// anything else is an error naming the pod.
pub fn service_port(
    port: &endpoint_slice::ServicePort,
    node_port: Option<u16>,
    slice: &[endpoint_slice::Endpoint],
) -> Result<ServicePort> {
    let endpoints = slice
        .iter()
        .map(|e| match e.addr {
            SocketAddr::V4(a) => Ok(Endpoint {
                ip: *a.ip(),
                port: a.port(),
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
            }),
            SocketAddr::V6(a) => bail!("{}: endpoint {} of pod {} is not IPv4", port.label(), a, e.pod),
        })
        .collect::<Result<_>>()?;
    Ok(ServicePort {
        name: port.port_label.clone().unwrap_or_else(|| port.port.to_string()),
        port: port.port,
        node_port,
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use std::net::Ipv4Addr;

    fn lab_port() -> endpoint_slice::ServicePort {
        endpoint_slice::ServicePort {
            service: "svc-backend".into(),
            port_label: None,
            namespace: "default".into(),
            selector: Default::default(),
            port: 80,
            target: IntOrString::String("http".into()),
            publish_not_ready: false,
        }
    }

    fn lab_endpoint(pod: &str, addr: &str, ready: bool) -> endpoint_slice::Endpoint {
        endpoint_slice::Endpoint {
            pod: pod.into(),
            addr: addr.parse().unwrap(),
            ready,
            serving: true,
            terminating: !ready,
        }
    }

    #[test]
    fn conditions_and_each_pods_own_port_carry_over() {
        let slice = [lab_endpoint("a", "10.244.0.2:5000", true), lab_endpoint("b", "10.244.0.3:5005", false)];
        let p = service_port(&lab_port(), Some(30080), &slice).unwrap();
        assert_eq!((p.name.as_str(), p.port, p.node_port), ("80", 80, Some(30080)));
        assert_eq!(
            p.endpoints,
            vec![
                Endpoint::ready(Ipv4Addr::new(10, 244, 0, 2), 5000),
                Endpoint::serving_terminating(Ipv4Addr::new(10, 244, 0, 3), 5005)
            ]
        );
    }

    #[test]
    fn an_ipv6_endpoint_is_an_error_naming_the_pod() {
        let e = service_port(&lab_port(), None, &[lab_endpoint("pod-x", "[::1]:5000", true)]).unwrap_err().to_string();
        assert!(e.contains("svc-backend") && e.contains("pod-x"), "{e}");
    }
}
