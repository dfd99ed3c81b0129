//! The weft sidecar proxy. Its only input is xDS; see ARCHITECTURE.md for the stages.
//!
//! A request is a straight line through the modules, in this order:
//! `listener` -> `detect` -> `route` -> `cluster` (balance, pool) -> `forward` ->
//! `telemetry`.

pub mod error;
pub mod route;
