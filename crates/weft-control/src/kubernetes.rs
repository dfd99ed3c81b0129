//! Kubernetes as a configuration source (`weft control --kubernetes`): the control plane
//! watches the API server with the `kube` crate and keeps the store in step with it.
//!
//! - Istio's resources (networking, security, telemetry CRDs, [`WATCHED`]), the Gateway
//!   API kinds weft supports and `v1` Services are read as objects and parsed by
//!   `weft-api`, exactly as a file would be, so validation is the same; an invalid object
//!   is left out (its last good version, if any, stays in force, as with a broken file)
//!   and, for Istio's kinds, the errors are written into its `status` ([`status`]), as
//!   Istio's analysis writes `validationMessages`. The Gateway API objects get the
//!   conditions Istio writes (computed by [`crate::gwapi`]; written by [`gwstatus`]).
//! - Pods become workloads: a running, ready Pod with an IP is a `WorkloadEntry` named
//!   `pod.<name>` in its namespace (labels, IP, service account, named container ports;
//!   an injected Pod also carries Istio's `security.istio.io/tlsMode: istio`, as Istio's
//!   injector labels it, so clients reach it with mTLS), so Services have endpoints
//!   before and independently of proxies connecting; a proxy that connects adds what only
//!   it knows (its registration, as without Kubernetes).
//! - EndpointSlices give the endpoints of Services without a selector, as istiod reads
//!   them ([`slices`]); a Service with a selector keeps its Pods as the source.
//! - Namespaces are followed for their labels ([`KubernetesSource::namespaces`]); a
//!   Namespace event removes nothing from the store (the objects in a deleted namespace
//!   go through their own watches).
//! - Every watch relists after a gap (the `kube` watcher): what the relist no longer
//!   shows is removed from the store.

pub mod gwstatus;
pub mod lease;
pub mod rbac;
pub mod slices;
pub mod status;
pub mod tokenreview;
pub mod webhook;

use std::collections::{BTreeMap, BTreeSet};
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
    /// What the objects become.
    pub role: Role,
}

/// What weft makes of a watched kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Each object is the weft resource of this kind (parsed as a file would be).
    Resource(Kind),
    /// Pods: ready ones are `WorkloadEntry`s `pod.<name>`.
    Pods,
    /// EndpointSlices of Services without a selector: `WorkloadEntry`s ([`slices`]).
    EndpointSlices,
    /// Namespaces: their labels, nothing in the store.
    Namespaces,
}

/// Whether and how weft writes an object's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusWrite {
    /// Never.
    None,
    /// Validation results (`validationMessages`, a `Reconciled` condition): Istio's kinds.
    Validation,
    /// The Gateway API conditions Istio writes ([`gwstatus`]).
    GatewayApi,
}

const GWAPI: &str = weft_api::spec::gateway_api::GROUP;

/// The kinds `weft control --kubernetes` watches.
pub const WATCHED: &[Watched] = &[
    Watched { group: "", version: "v1", kind: "Service", plural: "services", role: Role::Resource(Kind::Service) },
    Watched { group: "", version: "v1", kind: "Pod", plural: "pods", role: Role::Pods },
    Watched { group: "", version: "v1", kind: "Namespace", plural: "namespaces", role: Role::Namespaces },
    Watched {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        role: Role::EndpointSlices,
    },
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
        role: Role::Resource(Kind::EnvoyFilter),
    },
    istio("security.istio.io", "PeerAuthentication", "peerauthentications", Kind::PeerAuthentication),
    istio("security.istio.io", "AuthorizationPolicy", "authorizationpolicies", Kind::AuthorizationPolicy),
    istio("security.istio.io", "RequestAuthentication", "requestauthentications", Kind::RequestAuthentication),
    istio("telemetry.istio.io", "Telemetry", "telemetries", Kind::Telemetry),
    // The Gateway API, at the versions of manifests/crds/gateway-api.yaml (v1.3.0).
    gwapi("v1", "GatewayClass", "gatewayclasses", Kind::GatewayClass),
    gwapi("v1", "Gateway", "gateways", Kind::KubernetesGateway),
    gwapi("v1", "HTTPRoute", "httproutes", Kind::HttpRoute),
    gwapi("v1", "GRPCRoute", "grpcroutes", Kind::GrpcRoute),
    gwapi("v1alpha2", "TCPRoute", "tcproutes", Kind::TcpRoute),
    gwapi("v1alpha2", "TLSRoute", "tlsroutes", Kind::TlsRoute),
    gwapi("v1beta1", "ReferenceGrant", "referencegrants", Kind::ReferenceGrant),
];

const fn istio(group: &'static str, kind: &'static str, plural: &'static str, weft: Kind) -> Watched {
    Watched { group, version: "v1", kind, plural, role: Role::Resource(weft) }
}

const fn gwapi(version: &'static str, kind: &'static str, plural: &'static str, weft: Kind) -> Watched {
    Watched { group: GWAPI, version, kind, plural, role: Role::Resource(weft) }
}

impl Watched {
    /// The `kube` crate's description of the kind.
    pub fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(self.group, self.version, self.kind), self.plural)
    }

    /// Whether weft writes the objects' status, and what (the RBAC rules need
    /// `<plural>/status` `patch` for those that are written).
    pub fn status_write(&self) -> StatusWrite {
        match self.role {
            Role::Resource(Kind::ReferenceGrant) => StatusWrite::None,
            Role::Resource(_) if self.group == GWAPI => StatusWrite::GatewayApi,
            Role::Resource(_) if !self.group.is_empty() => StatusWrite::Validation,
            _ => StatusWrite::None,
        }
    }

    /// Whether weft writes the objects' status at all.
    pub fn writes_status(&self) -> bool {
        self.status_write() != StatusWrite::None
    }

    /// Whether the kind is cluster-scoped (Namespace, GatewayClass).
    pub fn cluster_scoped(&self) -> bool {
        matches!(self.role, Role::Namespaces | Role::Resource(Kind::GatewayClass))
    }
}

/// Settings of the Kubernetes source.
#[derive(Debug, Clone, Default)]
pub struct KubernetesConfig {
    /// A kubeconfig file (`--kubeconfig`); None: the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
}

/// Labels of every Namespace, by name.
pub type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

/// The running watches.
pub struct KubernetesSource {
    client: Client,
    store: Arc<ResourceStore>,
    tasks: Vec<JoinHandle<()>>,
    synced: watch::Receiver<usize>,
    namespaces: watch::Receiver<NamespaceLabels>,
    shared: Arc<Shared>,
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
        let (ns_tx, namespaces) = watch::channel(NamespaceLabels::new());
        let shared = Arc::new(Shared { synced: synced_tx, namespaces: ns_tx, observed: Default::default(), leader });
        let tasks =
            WATCHED.iter().map(|w| tokio::spawn(follow(client.clone(), *w, store.clone(), shared.clone()))).collect();
        KubernetesSource { client, store, tasks, synced, namespaces, shared }
    }

    /// Ticks with how many watches have completed their first list (of [`WATCHED`]).
    pub fn synced(&self) -> watch::Receiver<usize> {
        self.synced.clone()
    }

    /// The labels of every Namespace (Istio's `istio-injection`, `topology.istio.io/network`
    /// and the like), kept current by the Namespace watch.
    pub fn namespaces(&self) -> watch::Receiver<NamespaceLabels> {
        self.namespaces.clone()
    }

    /// Starts writing the Gateway API objects' status as Istio does ([`gwstatus`]):
    /// `connections` lists the connected proxies (a Gateway is `Programmed` when one of
    /// its proxies is), `domain` is the cluster domain. Singleton work: with several
    /// replicas, only the leader should run it.
    pub fn write_gateway_status(
        &mut self,
        connections: impl Fn() -> Vec<weft_xds::server::ConnectionStatus> + Send + Sync + 'static,
        domain: String,
    ) {
        let writer =
            gwstatus::GatewayStatusWriter::new(self.client.clone(), self.store.clone(), self.shared.clone(), domain);
        self.tasks.push(tokio::spawn(writer.run(Box::new(connections))));
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

/// What the watches share.
struct Shared {
    synced: watch::Sender<usize>,
    namespaces: watch::Sender<NamespaceLabels>,
    /// The Gateway API objects as last seen by their watches (what
    /// [`gwstatus`] compares with, so it needs no `get` rights).
    observed: std::sync::Mutex<BTreeMap<ResourceKey, Observed>>,
    /// Status (validation and the Gateway API's) is written by the leader only.
    leader: crate::leader::Leadership,
}

/// A Gateway API object as its watch last saw it.
#[derive(Debug, Clone)]
struct Observed {
    uid: String,
    generation: i64,
    status: Value,
}

impl Shared {
    fn observed(&self) -> std::sync::MutexGuard<'_, BTreeMap<ResourceKey, Observed>> {
        // Every write is a single insert or remove: a poisoned map is still consistent.
        self.observed.lock().unwrap_or_else(|p| p.into_inner())
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

/// An object's identity in its kind: namespace (empty when cluster-scoped) and name.
type ObjectId = (String, String);

/// Follows one kind until aborted: every object into the store, deletions out.
async fn follow(client: Client, w: Watched, store: Arc<ResourceStore>, shared: Arc<Shared>) {
    let ar = w.api_resource();
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let mut events = watcher(api).boxed();
    // The store keys each object put there, and the objects the relist in progress saw.
    let mut owned: BTreeMap<ObjectId, BTreeSet<ResourceKey>> = BTreeMap::new();
    let mut relist: Option<BTreeSet<ObjectId>> = None;
    let mut first_sync = true;
    let status = (w.status_write() == StatusWrite::Validation)
        .then(|| status::StatusWriter::new(client.clone(), ar.clone(), shared.leader.clone()));
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => relist = Some(BTreeSet::new()),
            Ok(Event::InitApply(obj)) | Ok(Event::Apply(obj)) => {
                let Some(id) = object_id(&obj) else { continue };
                if let Some(seen) = &mut relist {
                    seen.insert(id.clone());
                }
                if w.role == Role::Namespaces {
                    let labels = obj.metadata.labels.clone().unwrap_or_default();
                    shared.namespaces.send_if_modified(|m| m.insert(id.1.clone(), labels.clone()) != Some(labels));
                    continue;
                }
                if let (StatusWrite::GatewayApi, Role::Resource(kind)) = (w.status_write(), w.role) {
                    // Before the store has it, so the status writer finds it.
                    let key = ResourceKey { kind, namespace: namespace_of(&id), name: id.1.clone() };
                    let seen = Observed {
                        uid: obj.metadata.uid.clone().unwrap_or_default(),
                        generation: obj.metadata.generation.unwrap_or(0),
                        status: obj.data.get("status").cloned().unwrap_or_default(),
                    };
                    shared.observed().insert(key, seen);
                }
                let held = apply_object(&w, &obj, &id, &store, status.as_ref()).await;
                let before = owned.remove(&id).unwrap_or_default();
                let gone: Vec<ResourceKey> = before.difference(&held).cloned().collect();
                if !gone.is_empty() {
                    store.delete_keys(&gone);
                }
                if !held.is_empty() {
                    owned.insert(id, held);
                }
            }
            Ok(Event::InitDone) => {
                if let Some(seen) = relist.take() {
                    if w.role == Role::Namespaces {
                        shared.namespaces.send_if_modified(|m| {
                            let before = m.len();
                            m.retain(|name, _| seen.contains(&(String::new(), name.clone())));
                            m.len() != before
                        });
                    }
                    let stale: Vec<ObjectId> = owned.keys().filter(|id| !seen.contains(*id)).cloned().collect();
                    let gone: Vec<ResourceKey> = stale.iter().filter_map(|id| owned.remove(id)).flatten().collect();
                    if !gone.is_empty() {
                        store.delete_keys(&gone);
                    }
                }
                if first_sync {
                    first_sync = false;
                    shared.synced.send_modify(|n| *n += 1);
                    tracing::info!(kind = w.kind, objects = owned.len(), "kubernetes: listed");
                }
            }
            Ok(Event::Delete(obj)) => {
                let Some(id) = object_id(&obj) else { continue };
                if w.role == Role::Namespaces {
                    shared.namespaces.send_if_modified(|m| m.remove(&id.1).is_some());
                    continue;
                }
                if let Role::Resource(kind) = w.role {
                    shared.observed().remove(&ResourceKey { kind, namespace: namespace_of(&id), name: id.1.clone() });
                }
                if let Some(keys) = owned.remove(&id) {
                    store.delete_keys(&keys.into_iter().collect::<Vec<_>>());
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

fn object_id(obj: &DynamicObject) -> Option<ObjectId> {
    Some((obj.metadata.namespace.clone().unwrap_or_default(), obj.metadata.name.clone()?))
}

/// Puts `obj` in force, or reports why not; the store keys it now holds (none: a Pod
/// that is not ready, a slice of no selector-less Service, an object never valid).
async fn apply_object(
    w: &Watched,
    obj: &DynamicObject,
    id: &ObjectId,
    store: &ResourceStore,
    status: Option<&status::StatusWriter>,
) -> BTreeSet<ResourceKey> {
    let texts: Vec<String> = match w.role {
        Role::Pods => pod_workload(obj).into_iter().collect(),
        Role::EndpointSlices => slices::workload_entries(obj),
        Role::Resource(_) => vec![object_text(w, obj)],
        Role::Namespaces => Vec::new(),
    };
    let source = PathBuf::from(format!("kubernetes:{}/{}/{}", w.kind, namespace_of(id), id.1));
    let mut held = BTreeSet::new();
    let mut errors = Vec::new();
    let mut resources = Vec::new();
    for text in &texts {
        let parsed = weft_api::parse_str(text, &source);
        if parsed.errors.is_empty() && parsed.resources.len() == 1 {
            resources.extend(parsed.resources);
        } else {
            errors.extend(parsed.errors);
        }
    }
    for e in &errors {
        tracing::warn!(kind = w.kind, "kubernetes: rejected: {e}");
    }
    // A single object that does not validate keeps its last good version in force.
    let kept = match w.role {
        Role::Resource(kind) if !errors.is_empty() => {
            let key = ResourceKey { kind, namespace: namespace_of(id), name: id.1.clone() };
            store.is_applied(&key).then_some(key)
        }
        _ => None,
    };
    if !resources.is_empty() {
        held.extend(store.apply_parsed(resources));
    }
    if let Some(status) = status {
        status.report(obj, &errors, kept.is_some()).await;
    }
    held.extend(kept);
    held
}

/// The namespace weft files an object under (`default` for cluster-scoped ones, as a
/// file without `metadata.namespace`).
fn namespace_of(id: &ObjectId) -> String {
    if id.0.is_empty() {
        "default".into()
    } else {
        id.0.clone()
    }
}

/// The label weft's selector-less Services select their EndpointSlices' endpoints by.
pub const SLICE_SERVICE_LABEL: &str = "endpointslices.weft.dev/service";

/// The object as weft-api reads it: apiVersion, kind, metadata (without the server's
/// bookkeeping) and spec; status is weft's own output and never input. A Service without
/// a selector (not `ExternalName`) gets one on [`SLICE_SERVICE_LABEL`], which the
/// endpoints of its EndpointSlices carry ([`slices`]).
fn object_text(w: &Watched, obj: &DynamicObject) -> String {
    let mut meta = json!({ "name": obj.metadata.name });
    if let Some(ns) = &obj.metadata.namespace {
        meta["namespace"] = json!(ns);
    }
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
        let mut spec = spec.clone();
        if w.role == Role::Resource(Kind::Service) {
            selectorless_service(&mut spec, obj.metadata.name.as_deref().unwrap_or_default());
        }
        doc["spec"] = spec;
    }
    // Pretty, so errors point at a line of their own.
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// Gives a Service without a selector the one its EndpointSlices' endpoints match.
fn selectorless_service(spec: &mut Value, name: &str) {
    let Some(spec) = spec.as_object_mut() else { return };
    let external = spec.get("type").and_then(Value::as_str) == Some("ExternalName");
    let has_selector = spec.get("selector").and_then(Value::as_object).is_some_and(|s| !s.is_empty());
    if !external && !has_selector {
        spec.insert("selector".into(), json!({ SLICE_SERVICE_LABEL: name }));
    }
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
    let mut labels = pod.metadata.labels.clone().unwrap_or_default();
    if injected(&pod) {
        labels.entry(TLS_MODE_LABEL.into()).or_insert_with(|| "istio".into());
    }
    let doc = json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": { "name": format!("pod.{name}"), "namespace": pod.metadata.namespace },
        "spec": {
            "address": ip,
            "labels": labels,
            "serviceAccount": sa,
            "ports": ports,
        },
    });
    serde_json::to_string_pretty(&doc).ok()
}

/// Istio's label on injected pods, which auto mTLS matches endpoints on.
const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// Whether a Pod runs a sidecar: weft's (or Istio's) injection annotation, or the
/// proxy container (also as a native sidecar).
fn injected(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("sidecar.weft.dev/status") || a.contains_key("sidecar.istio.io/status"));
    let proxy = |c: &k8s_openapi::api::core::v1::Container| c.name == "weft-proxy" || c.name == "istio-proxy";
    let spec = pod.spec.as_ref();
    annotated || spec.is_some_and(|s| s.containers.iter().any(proxy) || s.init_containers.iter().flatten().any(proxy))
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
    fn an_injected_pod_is_an_mtls_endpoint_and_a_plain_one_is_not() {
        let labels = |obj: &DynamicObject| {
            let parsed = weft_api::parse_str(&pod_workload(obj).expect("a workload"), Path::new("pod"));
            let weft_api::Spec::WorkloadEntry(we) = &parsed.resources[0].spec else { panic!("not a WorkloadEntry") };
            we.labels.clone()
        };
        let plain = pod("True", "Running");
        assert_eq!(labels(&plain).get(TLS_MODE_LABEL), None);
        let mut injected = plain.clone();
        injected.metadata.annotations = Some([("sidecar.weft.dev/status".to_string(), "{}".to_string())].into());
        assert_eq!(labels(&injected).get(TLS_MODE_LABEL).map(String::as_str), Some("istio"));
    }

    #[test]
    fn pods_that_are_not_ready_or_not_running_are_no_workloads() {
        assert!(pod_workload(&pod("False", "Running")).is_none());
        assert!(pod_workload(&pod("True", "Pending")).is_none());
        assert!(pod_workload(&pod("True", "Succeeded")).is_none());
    }
}
