//! Load sources: the built-in open-model generator and k6.

pub mod generator;
pub mod k6;
