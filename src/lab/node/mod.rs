//! The node: the kubelet's pod worker, its prober, and turning a pod spec into a process.

pub mod kubelet;
pub mod pod_spec;
pub mod prober;
pub mod runtime;
