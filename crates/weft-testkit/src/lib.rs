//! Test helpers shared by weft's integration tests: echo servers (HTTP/1.1, h2c, gRPC,
//! WebSocket upgrade, TCP, server-first banner), small HTTP clients, a throwaway CA, and a harness that
//! runs a real Envoy. Every server binds `127.0.0.1:0` and exposes the bound address.
//!
//! This is a dev-only crate: helpers panic with a setup hint when a required tool is
//! missing, and return `anyhow` errors for everything that can fail at run time.

pub mod echo;
pub mod envoy;
pub mod etcd;
pub mod http;
pub mod jwt;
pub mod kube;
pub mod kubelet;
pub mod net;
pub mod open;
pub mod pki;
pub mod process;
pub mod tools;
pub mod xds;

use std::path::PathBuf;

/// Root of the cargo workspace (the directory holding `.tools/` and `scripts/`).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.ancestors().nth(2).map(PathBuf::from).unwrap_or(manifest)
}

/// `<workspace>/samples`: Istio's samples and task files, copied into the repository
/// with their provenance and licence (`samples/README.md`), the test data every
/// conformance test reads.
///
/// # Panics
/// When the directory is missing: a test never passes without its data.
pub fn conformance_dir() -> PathBuf {
    let dir = workspace_root().join("samples");
    assert!(dir.join("bookinfo").is_dir(), "Istio's samples missing at {} (part of the repository)", dir.display());
    dir
}

/// The text of `samples/<rel>` (see [`conformance_dir`]).
///
/// # Panics
/// Naming the path, when the file cannot be read.
pub fn conformance(rel: &str) -> String {
    let path = conformance_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}
