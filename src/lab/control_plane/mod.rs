//! The control plane's controllers: Deployment rollouts, ReplicaSet pod creation, EndpointSlices.

pub mod deployment;
pub mod endpointslice;
pub mod replicaset;
