//! The API server's part: the store every controller reads and writes, and manifest admission.

pub mod cluster;
pub mod endpoint_slice;
pub mod manifest;
pub mod signal;
