//! graceful: shows and solves the Kubernetes graceful-shutdown race.
pub mod backend;
pub mod cli;
pub mod config;
pub mod frontend;
pub mod identity;
pub mod lab;
pub mod lifecycle;
pub mod log_format;
pub mod metrics;
pub mod otlp_receiver;
pub mod probe;
pub mod server;
pub mod startup;
pub mod telemetry;
pub mod upstream;
