//! The load generator and echo application of the benchmark harness, as a library so
//! that `weft load` (Fortio's `load` for Istio's tasks) runs the same generator.
#![forbid(unsafe_code)]

pub mod echo;
pub mod fortio;
pub mod load;
