//! Kubernetes as a configuration source (`weft control --kubernetes`): the control plane
//! watches the API server with the `kube` crate and keeps the store in step with it.
//!
//! - Istio's resources (networking, security, telemetry CRDs, [`WATCHED`]) and `v1`
//!   Services are read as objects and parsed by `weft-api`, exactly as a file would be, so
//!   validation is the same; an invalid object is left out (its last good version, if
//!   any, stays in force, as with a broken file) and the errors are written into its
//!   `status` ([`status`]), as Istio's analysis writes `validationMessages`.
//! - Pods become workloads: a running, ready Pod with an IP is a `WorkloadEntry` named
//!   `pod.<name>` in its namespace (labels, IP, service account, named container ports),
//!   so Services have endpoints before and independently of proxies connecting; a proxy
//!   that connects adds what only it knows (its registration, as without Kubernetes).
//! - Every watch relists after a gap (the `kube` watcher): what the relist no longer
//!   shows is removed from the store.
//!
//! Not read (yet): EndpointSlices (endpoints come from Pods, so Services without a
//! selector have none), Namespaces, the Gateway API kinds.

pub mod lease;
pub mod rbac;
pub mod status;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use weft_api::{Kind, ResourceKey};

use crate::store::ResourceStore;

/// One watched kind: its group, version, kind and plural, and what it becomes.
#[derive(Debug, Clone, Copy)]
pub struct Watched {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// Version read.
    pub version: &'static str,
    /// Kubernetes kind.
    pub kind: &'static str,
    /// Resource (plural) name.
    pub plural: &'static str,
    /// The weft kind the objects become.
    pub weft: Kind,
}

/// The kinds `weft control --kubernetes` watches.
pub const WATCHED: &[Watched] = &[
    Watched { group: "", version: "v1", kind: "Service", plural: "services", weft: Kind::Service },
    Watched { group: "", version: "v1", kind: "Pod", plural: "pods", weft: Kind::WorkloadEntry },
    istio("networking.istio.io", "VirtualService", "virtualservices", Kind::VirtualService),
    istio("networking.istio.io", "DestinationRule", "destinationrules", Kind::DestinationRule),
    istio("networking.istio.io", "Gateway", "gateways", Kind::Gateway),
    istio("networking.istio.io", "ServiceEntry", "serviceentries", Kind::ServiceEntry),
    istio("networking.istio.io", "Sidecar", "sidecars", Kind::Sidecar),
    istio("networking.istio.io", "WorkloadEntry", "workloadentries", Kind::WorkloadEntry),
    Watched {
        group: "networking.istio.io",
        version: "v1alpha3",
        kind: "EnvoyFilter",
        plural: "envoyfilters",
        weft: Kind::EnvoyFilter,
    },
    istio("security.istio.io", "PeerAuthentication", "peerauthentications", Kind::PeerAuthentication),
    istio("security.istio.io", "AuthorizationPolicy", "authorizationpolicies", Kind::AuthorizationPolicy),
    istio("security.istio.io", "RequestAuthentication", "requestauthentications", Kind::RequestAuthentication),
    istio("telemetry.istio.io", "Telemetry", "telemetries", Kind::Telemetry),
];

const fn istio(group: &'static str, kind: &'static str, plural: &'static str, weft: Kind) -> Watched {
    Watched { group, version: "v1", kind, plural, weft }
}

impl Watched {
    fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(self.group, self.version, self.kind), self.plural)
    }

    fn is_pod(&self) -> bool {
        self.group.is_empty() && self.kind == "Pod"
    }

    /// Whether weft writes validation results into the objects' status (Istio's kinds).
    fn writes_status(&self) -> bool {
        !self.group.is_empty()
    }
}

/// Settings of the Kubernetes source.
#[derive(Debug, Clone, Default)]
pub struct KubernetesConfig {
    /// A kubeconfig file (`--kubeconfig`); None: the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
}

/// The running watches.
pub struct KubernetesSource {
    tasks: Vec<JoinHandle<()>>,
    synced: watch::Receiver<usize>,
}

impl KubernetesSource {
    /// Connects (kubeconfig or in-cluster) and starts watching [`WATCHED`] into `store`.
    pub async fn start(cfg: &KubernetesConfig, store: Arc<ResourceStore>) -> Result<KubernetesSource, String> {
        let client = client(cfg.kubeconfig.as_deref()).await?;
        Ok(Self::start_with(client, store))
    }

    /// [`KubernetesSource::start`] with a client already made.
    pub fn start_with(client: Client, store: Arc<ResourceStore>) -> KubernetesSource {
        Self::start_led(client, store, crate::leader::Leadership::always())
    }

    /// [`KubernetesSource::start_with`] as one of several replicas: every replica
    /// watches, only the one `leader` elects writes status back.
    pub fn start_led(client: Client, store: Arc<ResourceStore>, leader: crate::leader::Leadership) -> KubernetesSource {
        let (synced_tx, synced) = watch::channel(0usize);
        let synced_tx = Arc::new(synced_tx);
        let tasks = WATCHED
            .iter()
            .map(|w| tokio::spawn(follow(client.clone(), *w, store.clone(), synced_tx.clone(), leader.clone())))
            .collect();
        KubernetesSource { tasks, synced }
    }

    /// Ticks with how many watches have completed their first list (of [`WATCHED`]).
    pub fn synced(&self) -> watch::Receiver<usize> {
        self.synced.clone()
    }

    /// Stops every watch.
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for KubernetesSource {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A client from `kubeconfig` (its current context), or from the in-cluster service
/// account when None.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| format!("{}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => kube::Config::incluster().map_err(|e| {
            format!("not running in a Kubernetes pod ({e}): give --kubeconfig FILE to reach a cluster from outside")
        })?,
    };
    Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

/// Follows one kind until aborted: every object into the store, deletions out.
async fn follow(
    client: Client,
    w: Watched,
    store: Arc<ResourceStore>,
    synced: Arc<watch::Sender<usize>>,
    leader: crate::leader::Leadership,
) {
    let ar = w.api_resource();
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let mut events = watcher(api).boxed();
    // Keys this watch put in the store, and those seen by the relist in progress.
    let mut owned: BTreeSet<ResourceKey> = BTreeSet::new();
    let mut relist: Option<BTreeSet<ResourceKey>> = None;
    let mut first_sync = true;
    let status = w.writes_status().then(|| status::StatusWriter::new(client.clone(), ar.clone(), leader));
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => relist = Some(BTreeSet::new()),
            Ok(Event::InitApply(obj)) | Ok(Event::Apply(obj)) => {
                let Some(key) = key_of(&w, &obj) else { continue };
                let present = apply_object(&w, &obj, &key, &store, status.as_ref()).await;
                if present {
                    owned.insert(key.clone());
                    if let Some(seen) = &mut relist {
                        seen.insert(key);
                    }
                } else if owned.remove(&key) {
                    store.delete_keys(std::slice::from_ref(&key));
                }
            }
            Ok(Event::InitDone) => {
                if let Some(seen) = relist.take() {
                    let gone: Vec<ResourceKey> = owned.difference(&seen).cloned().collect();
                    if !gone.is_empty() {
                        store.delete_keys(&gone);
                    }
                    owned = seen;
                }
                if first_sync {
                    first_sync = false;
                    synced.send_modify(|n| *n += 1);
                    tracing::info!(kind = w.kind, objects = owned.len(), "kubernetes: listed");
                }
            }
            Ok(Event::Delete(obj)) => {
                if let Some(key) = key_of(&w, &obj) {
                    if owned.remove(&key) {
                        store.delete_keys(std::slice::from_ref(&key));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(kind = w.kind, error = %e, "kubernetes: watch failed; retrying{}", rbac::watch_hint(&e))
            }
        }
    }
}

fn watcher(api: Api<DynamicObject>) -> impl futures::Stream<Item = Result<Event<DynamicObject>, watcher::Error>> {
    watcher::watcher(api, watcher::Config::default()).default_backoff()
}

/// The store key an object maps to.
fn key_of(w: &Watched, obj: &DynamicObject) -> Option<ResourceKey> {
    let name = obj.metadata.name.clone()?;
    let namespace = obj.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = if w.is_pod() { format!("pod.{name}") } else { name };
    Some(ResourceKey { kind: w.weft, namespace, name })
}

/// Puts `obj` in force, or reports why not; whether the store now holds something for it
/// (false: a Pod that is not ready, or an object never valid).
async fn apply_object(
    w: &Watched,
    obj: &DynamicObject,
    key: &ResourceKey,
    store: &ResourceStore,
    status: Option<&status::StatusWriter>,
) -> bool {
    let text = if w.is_pod() {
        match pod_workload(obj) {
            Some(we) => we,
            None => return false,
        }
    } else {
        object_text(w, obj)
    };
    let source = PathBuf::from(format!(
        "kubernetes:{}/{}/{}",
        w.kind,
        key.namespace,
        obj.metadata.name.as_deref().unwrap_or("")
    ));
    let parsed = weft_api::parse_str(&text, &source);
    let ok = parsed.errors.is_empty() && parsed.resources.len() == 1;
    let kept = !ok && store.is_applied(key);
    if ok {
        store.apply_parsed(parsed.resources);
    } else {
        for e in &parsed.errors {
            tracing::warn!(kind = w.kind, "kubernetes: rejected: {e}");
        }
    }
    if let Some(status) = status {
        status.report(obj, &parsed.errors, kept).await;
    }
    ok || kept
}

/// The object as weft-api reads it: apiVersion, kind, metadata (without the server's
/// bookkeeping) and spec; status is weft's own output and never input.
fn object_text(w: &Watched, obj: &DynamicObject) -> String {
    let mut meta = json!({ "name": obj.metadata.name, "namespace": obj.metadata.namespace });
    if let Some(labels) = &obj.metadata.labels {
        meta["labels"] = json!(labels);
    }
    if let Some(annotations) = &obj.metadata.annotations {
        // kubectl's copy of the whole object is no input.
        let mut a = annotations.clone();
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
        if !a.is_empty() {
            meta["annotations"] = json!(a);
        }
    }
    let api_version = if w.group.is_empty() { w.version.to_string() } else { format!("{}/{}", w.group, w.version) };
    let mut doc = json!({ "apiVersion": api_version, "kind": w.kind, "metadata": meta });
    if let Some(spec) = obj.data.get("spec") {
        doc["spec"] = spec.clone();
    }
    // Pretty, so errors point at a line of their own.
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// A ready Pod as a WorkloadEntry (JSON), or None when it takes no traffic: no IP yet,
/// not running, not ready, or terminating.
fn pod_workload(obj: &DynamicObject) -> Option<String> {
    let value = serde_json::to_value(obj).ok()?;
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(value).ok()?;
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ip = status.pod_ip.clone().filter(|ip| !ip.is_empty())?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    let ports: serde_json::Map<String, Value> = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| Some((p.name.clone()?, json!(p.container_port))))
        .collect();
    let sa = spec.service_account_name.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone()?;
    let doc = json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": { "name": format!("pod.{name}"), "namespace": pod.metadata.namespace },
        "spec": {
            "address": ip,
            "labels": pod.metadata.labels.clone().unwrap_or_default(),
            "serviceAccount": sa,
            "ports": ports,
        },
    });
    serde_json::to_string_pretty(&doc).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ready: &str, phase: &str) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": "reviews-v2-7f9", "namespace": "bookinfo", "labels": { "app": "reviews", "version": "v2" } },
            "spec": {
                "serviceAccountName": "bookinfo-reviews",
                "containers": [{ "name": "reviews", "image": "x", "ports": [{ "name": "http", "containerPort": 9080 }, { "containerPort": 9999 }] }],
            },
            "status": { "phase": phase, "podIP": "10.244.1.5", "conditions": [{ "type": "Ready", "status": ready }] },
        }))
        .expect("a pod object")
    }

    #[test]
    fn a_ready_pod_is_a_workload_entry_with_its_labels_ip_account_and_named_ports() {
        let text = pod_workload(&pod("True", "Running")).expect("a workload");
        let parsed = weft_api::parse_str(&text, Path::new("pod"));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let r = &parsed.resources[0];
        assert_eq!((r.meta.namespace.as_str(), r.meta.name.as_str()), ("bookinfo", "pod.reviews-v2-7f9"));
        let weft_api::Spec::WorkloadEntry(we) = &r.spec else { panic!("not a WorkloadEntry: {:?}", r.spec) };
        assert_eq!(we.address.as_deref(), Some("10.244.1.5"));
        assert_eq!(we.service_account.as_deref(), Some("bookinfo-reviews"));
        assert_eq!(we.labels.get("version").map(String::as_str), Some("v2"));
        assert_eq!(we.ports.get("http"), Some(&9080));
        assert_eq!(we.ports.len(), 1, "unnamed ports are not listed: {:?}", we.ports);
    }

    #[test]
    fn pods_that_are_not_ready_or_not_running_are_no_workloads() {
        assert!(pod_workload(&pod("False", "Running")).is_none());
        assert!(pod_workload(&pod("True", "Pending")).is_none());
        assert!(pod_workload(&pod("True", "Succeeded")).is_none());
    }
}
