//! xDS transport shared by the proxy and the control plane: ADS client and server,
//! type URLs, versions, nonces, ACK/NACK, delta bookkeeping, reconnect with backoff.
//!
//! - [`AdsClient`] runs one aggregated stream (state of the world or delta) against a
//!   control plane and feeds a [`ResourceHandler`] that owns the proxy's state.
//! - [`AdsServer`] serves resources from a [`XdsSource`] to any number of ADS clients
//!   (weft proxies and Envoy; proxyless gRPC clients are not served yet: no
//!   `api_listener` Listeners) and tracks what each connection ACKed.
//! - [`NodeInfo`] is the workload identity a proxy announces in its `Node` metadata.
//!
//! # Protocol choices (Envoy's xDS protocol document is the reference)
//!
//! - SotW server: one response in flight per type; the next one waits for its ACK or
//!   NACK. A request whose nonce is not the latest sent is stale and ignored. A response
//!   is sent when the source version or the requested names differ from the last
//!   response, never for a pure ACK, and always for the first request of a type on a
//!   stream. Empty names (or `*`) mean wildcard for LDS and CDS only.
//! - Delta server: per-resource versions are [`content_version`] hashes; a response
//!   carries only resources whose version differs from what the peer holds (seeded from
//!   `initial_resource_versions`) and removals, including subscribed names that do not
//!   exist. The first wildcard response is sent even if empty so the peer can finish
//!   initialising. Subscription changes are honoured whatever their nonce. Named
//!   subscriptions are answered through [`XdsSource::lookup`] (no copy of the whole
//!   type). VHDS names are aliases ([`type_url::resolves_aliases`]): `<route
//!   configuration>/<host>` is answered with the matching virtual host (named `<route
//!   configuration>/<vhost>`, the request in `aliases`), or with a body-less resource
//!   named and aliased by the request when nothing matches, as Envoy expects.
//! - Client: the node is sent on the first request of each stream; ACK and NACK carry
//!   the answered nonce; a SotW NACK carries the last accepted version; on reconnect the
//!   client re-subscribes with its current interest and last accepted versions. The
//!   delta client also re-reads interest when the handler says it changed outside an
//!   update ([`ResourceHandler::interest_changes`]: a request asked for a host), and drops
//!   from the handler what it unsubscribes (the server says nothing more about it).
#![forbid(unsafe_code)]

pub mod build;
pub mod canon;
pub mod client;
pub mod domains;
pub mod error;
pub mod node;
pub mod peer;
pub mod ports;
pub mod server;
pub mod source;
pub mod tap;
pub mod type_url;
pub mod vhds;

pub use client::{
    AdsClient, Backoff, ClientConfig, ClientStatus, ResourceHandler, ResourceUpdate, XdsTransport, DEFAULT_MAX_BACKOFF,
};
pub use error::XdsError;
pub use node::{NodeInfo, PortInfo};
pub use server::{
    AdmitFuture, AdsServer, AdsService, Caller, ConnectionStatus, NackInfo, StreamAdmission, TypeStatus, XdsObserver,
};
pub use source::{NodeMemo, Resolved, StaticSource, XdsSnapshot, XdsSource};
pub use type_url::resource_name;

/// Re-export of Envoy's `Node`.
pub use envoy_types::pb::envoy::config::core::v3::Node;
/// Re-export of the protobuf `Any` used by every xDS resource (envoy-types' own type).
pub use envoy_types::pb::google::protobuf::Any;

/// Which ADS variant a stream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XdsMode {
    /// `StreamAggregatedResources`: every response carries the full state of its type
    /// (for wildcard types) or of the requested names.
    #[default]
    Sotw,
    /// `DeltaAggregatedResources`: only changed resources and removals are sent.
    Delta,
}

/// Content hash used as a per-resource version in delta xDS (FNV-1a 64, hex).
///
/// Stable across processes and Rust versions so a restarted server recognises the
/// versions a reconnecting client announces in `initial_resource_versions`.
pub fn content_version(any: &Any) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for byte in any.type_url.as_bytes().iter().chain(any.value.iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(PRIME);
    }
    format!("{hash:016x}")
}
