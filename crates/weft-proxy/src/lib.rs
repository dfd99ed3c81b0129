//! The weft sidecar proxy. Its only input is xDS; see ARCHITECTURE.md for the stages.
//!
//! A connection is a straight line through the modules, in this order:
//! [`listener`] (accept, original destination) -> [`detect`] (sniff when the chains need
//! it) -> [`http`] (routing, faults) or [`tcp`] -> [`http`]'s forward (balance, retries,
//! timeouts) -> [`cluster`] (endpoints, pools) -> [`report`] (metrics, access log).
//! [`config`] turns xDS into the immutable snapshots all of them read.

pub mod admin;
pub mod bootstrap;
pub mod cluster;
pub mod coalesce;
pub mod config;
pub mod conn;
pub mod context;
pub mod control_channel;
pub mod detect;
pub mod dump;
pub mod error;
pub mod hash;
pub mod http;
pub mod io;
pub mod jwt;
pub mod listener;
pub mod memory;
pub mod net;
pub mod orig_dst;
pub mod proto;
pub mod proxy;
pub mod ratelimit;
pub mod rbac;
pub mod report;
pub mod route;
pub mod run;
pub mod tcp;
pub mod telemetry;
pub mod tls;
