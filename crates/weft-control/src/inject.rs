//! Kubernetes sidecar injection, Istio's way (`istioctl kube-inject` and the sidecar
//! injector webhook): a `weft-init` init container that installs the capture rules
//! (`weft iptables`) and a `weft-proxy` container (`weft proxy`, bootstrap from the
//! downward API), plus Istio's projected token volume and a status annotation.
//!
//! - [`inject_manifests`]: `weft inject` — multi-document YAML in, the same YAML out with
//!   every workload's pod template injected (Deployment, StatefulSet, DaemonSet,
//!   ReplicaSet, ReplicationController, Job, CronJob, Pod, and `*List` items); other
//!   documents are copied byte for byte; rewritten ones keep key order, scalar styles
//!   and their leading comments ([`yaml`]).
//! - [`webhook::review`]: the mutating admission webhook (`POST /inject` on the API): an
//!   AdmissionReview v1 for a Pod in, an AdmissionReview with a JSON patch out.
//!
//! Both use [`pod::inject`], so they inject the same thing.

pub mod pod;
pub mod webhook;
pub mod workload;
pub mod yaml;

use std::path::Path;

use self::pod::Outcome;
use self::yaml::{Map, Node};

/// Annotation recording what was injected (its presence makes injection a no-op).
pub const STATUS_ANNOTATION: &str = "sidecar.weft.dev/status";
/// The proxy container.
pub const PROXY_CONTAINER: &str = "weft-proxy";
/// The capture init container.
pub const INIT_CONTAINER: &str = "weft-init";
/// The projected service-account token volume (Istio's name).
pub const TOKEN_VOLUME: &str = "istio-token";
/// Where the token volume is mounted in the proxy.
pub const TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// The token's file name in [`TOKEN_DIR`].
pub const TOKEN_FILE: &str = "istio-token";

/// The `control_plane` value (`weft control --inject-control-plane bound`) that stands
/// for the control plane's own bound xDS address, known once it listens.
pub const BOUND_CONTROL_PLANE: &str = "bound";

/// What gets injected.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// Image of both containers (its entrypoint is `weft`).
    pub image: String,
    /// The control plane's xDS address as pods reach it (`host:port` or a URL).
    pub control_plane: String,
    /// The proxy as a Kubernetes native sidecar (an init container with
    /// `restartPolicy: Always`) unless a pod's annotation says otherwise.
    pub native_sidecar: bool,
    /// UID (and GID) the proxy runs as; its traffic is never captured.
    pub proxy_uid: u32,
    /// Cluster DNS domain, in the node id.
    pub cluster_domain: String,
    /// SPIFFE trust domain of the workload identity.
    pub trust_domain: String,
    /// The mesh root (PEM) written into the bootstrap (`identity.root_cert`): the proxy
    /// verifies an `https://` control plane (15012) with it on its first connection, or
    /// checks the root a plaintext one answers with. None: trust on first use.
    pub root_cert: Option<String>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            image: format!("ghcr.io/weft-mesh/weft:{}", env!("CARGO_PKG_VERSION")),
            control_plane: "weft-control.weft-system.svc:15010".into(),
            native_sidecar: false,
            proxy_uid: 1337,
            cluster_domain: "cluster.local".into(),
            trust_domain: weft_identity::DEFAULT_TRUST_DOMAIN.into(),
            root_cert: None,
        }
    }
}

impl InjectConfig {
    /// The xDS URL written in the bootstrap.
    pub fn xds_url(&self) -> String {
        if self.control_plane.starts_with("http://") || self.control_plane.starts_with("https://") {
            self.control_plane.clone()
        } else {
            format!("http://{}", self.control_plane)
        }
    }
}

/// Why a manifest could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The YAML itself is broken.
    #[error("{file}:{line}:{column}: invalid YAML: {message}")]
    Yaml {
        /// Source name.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser expected.
        message: String,
    },
    /// A workload cannot be injected.
    #[error("{file}:{line}: document {index} ({kind} {name:?}): {message}")]
    Workload {
        /// Source name.
        file: String,
        /// 1-based line where the document starts.
        line: usize,
        /// 1-based document index in the file.
        index: usize,
        /// Its kind.
        kind: String,
        /// Its name.
        name: String,
        /// What is wrong and what was expected.
        message: String,
    },
}

/// The injected manifests and a note per workload left unchanged.
#[derive(Debug, Default)]
pub struct Injected {
    /// The output YAML.
    pub text: String,
    /// `document 3 (Deployment "x"): opted out by ...`.
    pub notes: Vec<String>,
}

/// One `---`-separated part of a stream.
struct Chunk<'a> {
    /// The separator line before it (with its newline), empty for the first.
    separator: &'a str,
    /// The document's text.
    body: &'a str,
    /// 1-based line of the body's first line.
    line: usize,
}

fn chunks(text: &str) -> Vec<Chunk<'_>> {
    let mut out = Vec::new();
    let mut separator = "";
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_sep = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if is_sep {
            out.push(Chunk { separator, body: &text[start..offset], line: start_line });
            // Content after `--- ` on the same line (rare) stays with the document.
            let rest = bare[3..].trim();
            if rest.is_empty() || rest.starts_with('#') {
                separator = line;
                start = offset + line.len();
                start_line = i + 2;
            } else {
                separator = "---\n";
                start = offset + 4;
                start_line = i + 1;
            }
        }
        offset += line.len();
    }
    out.push(Chunk { separator, body: &text[start..], line: start_line });
    out
}

/// Injects every workload in `text` (multi-document YAML or JSON); `file` names the
/// source in errors.
pub fn inject_manifests(text: &str, file: &Path, cfg: &InjectConfig) -> Result<Injected, InjectError> {
    let file_name = file.display().to_string();
    let mut out = Injected::default();
    for (i, chunk) in chunks(text).into_iter().enumerate() {
        let index = i + 1;
        out.text.push_str(chunk.separator);
        let parsed = yaml::parse_document(chunk.body).map_err(|e| InjectError::Yaml {
            file: file_name.clone(),
            line: chunk.line + e.line,
            column: e.column,
            message: e.message,
        })?;
        let Some(mut node) = parsed else {
            out.text.push_str(chunk.body);
            continue;
        };
        let ctx = DocContext { file: &file_name, line: chunk.line, index };
        if inject_object(&mut node, cfg, &ctx, &mut out.notes)? {
            // Keep the comments heading the document.
            for l in chunk.body.split_inclusive('\n') {
                let t = l.trim();
                if !(t.is_empty() || t.starts_with('#')) {
                    break;
                }
                out.text.push_str(l);
            }
            out.text.push_str(&yaml::emit(&node));
        } else {
            out.text.push_str(chunk.body);
            if !chunk.body.is_empty() && !chunk.body.ends_with('\n') {
                out.text.push('\n');
            }
        }
    }
    Ok(out)
}

struct DocContext<'a> {
    file: &'a str,
    line: usize,
    index: usize,
}

/// Where a workload kind keeps its pod template, or `None` for kinds left alone.
fn template_path(api_version: &str, kind: &str) -> Option<&'static [&'static str]> {
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    match (group, kind) {
        ("", "Pod") => Some(&[]),
        ("", "ReplicationController") => Some(&["spec", "template"]),
        ("apps" | "extensions", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => {
            Some(&["spec", "template"])
        }
        ("batch", "Job") => Some(&["spec", "template"]),
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Injects one object (recursing into `*List` items); true when it changed.
fn inject_object(
    node: &mut Node,
    cfg: &InjectConfig,
    ctx: &DocContext<'_>,
    notes: &mut Vec<String>,
) -> Result<bool, InjectError> {
    let Some(obj) = node.as_map_mut() else { return Ok(false) };
    let kind = obj.get("kind").and_then(Node::text).unwrap_or("").to_string();
    let api_version = obj.get("apiVersion").and_then(Node::text).unwrap_or("").to_string();
    if kind.ends_with("List") {
        let mut changed = false;
        if let Some(items) = obj.get_mut("items").and_then(Node::as_seq_mut) {
            for item in items {
                changed |= inject_object(item, cfg, ctx, notes)?;
            }
        }
        return Ok(changed);
    }
    let Some(path) = template_path(&api_version, &kind) else { return Ok(false) };
    let meta = obj.get("metadata").and_then(Node::as_map);
    let name = meta
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(Node::text)
        .unwrap_or("")
        .to_string();
    let namespace = meta.and_then(|m| m.get("namespace")).and_then(Node::text).map(str::to_string);
    // WORKLOAD_NAME: a Pod's controller (or the Pod), else the workload object itself.
    let workload = if path.is_empty() {
        workload::of_pod(obj)
    } else {
        meta.and_then(|m| m.get("name")).and_then(Node::text).unwrap_or("").to_string()
    };
    let fail = |message: String| InjectError::Workload {
        file: ctx.file.to_string(),
        line: ctx.line,
        index: ctx.index,
        kind: kind.clone(),
        name: name.clone(),
        message,
    };
    let mut template: &mut Map = obj;
    let mut at = String::new();
    for key in path {
        at.push_str(key);
        template = template.get_mut(key).and_then(Node::as_map_mut).ok_or_else(|| {
            fail(format!("{at} is missing or not a mapping: a {kind} needs a pod template at {}", path.join(".")))
        })?;
        at.push('.');
    }
    match pod::inject(template, cfg, namespace.as_deref(), &workload, &at).map_err(fail)? {
        Outcome::Injected => Ok(true),
        Outcome::Skipped(why) => {
            notes.push(format!("{}: document {} ({kind} {name:?}): {why}", ctx.file, ctx.index));
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests;
