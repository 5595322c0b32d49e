//! The node: the kubelet's pod worker, its prober, turning a pod spec into a process, and the run's
//! process group (nothing a run starts outlives it).

pub mod kubelet;
pub mod oci;
pub mod pod_spec;
pub mod prober;
pub mod run_group;
pub mod runtime;
