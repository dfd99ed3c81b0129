//! `weft control --kubernetes` against a real kube-apiserver (`weft_testkit::kube`, built
//! by scripts/setup.sh): Istio's CRDs from `manifests/crds/istio.yaml`, objects applied
//! with kubectl, the control plane's Kubernetes source watching them into its store, and
//! what it writes back.
//!
//! Skipped (with the reason) only when scripts/setup.sh tried and failed to build the
//! API server; without the binaries and without that record, the tests fail with the
//! setup hint.

use std::sync::Arc;
use std::time::Duration;

use weft_api::Kind;
use weft_control::kubernetes::{KubernetesConfig, KubernetesSource, WATCHED};
use weft_control::registry::Registry;
use weft_control::source::MeshXdsSource;
use weft_control::store::ResourceStore;
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_testkit::kube::KubeApiServer;
use weft_xds::{type_url, NodeInfo};

const WAIT: Duration = Duration::from_secs(60);

/// One API server at a time: each is etcd plus a kube-apiserver, too heavy to start
/// several at once on a small machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The API server with Istio's CRDs established (and the guard that keeps other tests
/// waiting), or None (skip) when it cannot be built here.
async fn api_server() -> Option<(KubeApiServer, tokio::sync::MutexGuard<'static, ()>)> {
    if let Some(why) = weft_testkit::kube::unavailable() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let guard = ONE_AT_A_TIME.lock().await;
    let k = KubeApiServer::start().await.expect("kube-apiserver starts");
    let crds = std::fs::read_to_string(weft_testkit::workspace_root().join("manifests/crds/istio.yaml"))
        .expect("manifests/crds/istio.yaml");
    k.apply(&crds).await.expect("Istio's CRDs apply");
    k.kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "crd", "-l", "app.kubernetes.io/part-of=weft"])
        .await
        .expect("Istio's CRDs established");
    // Too large for client-side apply's annotation: server-side, as the Gateway API's docs say.
    let gwapi = std::fs::read_to_string(weft_testkit::workspace_root().join("manifests/crds/gateway-api.yaml"))
        .expect("manifests/crds/gateway-api.yaml");
    k.kubectl_stdin(&["apply", "--server-side", "-f", "-"], Some(&gwapi)).await.expect("the Gateway API's CRDs apply");
    k.kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"])
        .await
        .expect("the Gateway API's CRDs established");
    Some((k, guard))
}

/// A store fed by the Kubernetes source, once every watch has listed.
async fn follow(k: &KubeApiServer) -> (Arc<ResourceStore>, KubernetesSource) {
    let store = ResourceStore::in_memory();
    let source = KubernetesSource::start(&KubernetesConfig { kubeconfig: Some(k.kubeconfig.clone()) }, store.clone())
        .await
        .expect("a Kubernetes client");
    let mut synced = source.synced();
    tokio::time::timeout(WAIT, synced.wait_for(|n| *n == WATCHED.len()))
        .await
        .expect("every watch lists within a minute")
        .expect("the source runs");
    (store, source)
}

/// Waits until `check` holds for the store (re-checked on every store change).
async fn wait_store(store: &ResourceStore, what: &str, check: impl Fn(&ResourceStore) -> bool) {
    let mut changes = store.subscribe();
    let found = tokio::time::timeout(WAIT, async {
        while !check(store) {
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok() && check(store), "{what}: not seen within {WAIT:?}");
}

fn has(store: &ResourceStore, kind: Kind, ns: &str, name: &str) -> bool {
    store.snapshot().resources.iter().any(|r| r.kind == kind && r.meta.namespace == ns && r.meta.name == name)
}

const REVIEWS: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 80
    - destination: {host: reviews, subset: v2}
      weight: 20
";

#[tokio::test]
async fn resources_applied_with_kubectl_reach_the_store_and_deletions_leave_it() {
    let Some((k, _one)) = api_server().await else { return };
    let (store, _source) = follow(&k).await;
    k.apply(REVIEWS).await.expect("kubectl apply");
    wait_store(&store, "Service and VirtualService reviews", |s| {
        has(s, Kind::Service, "default", "reviews") && has(s, Kind::VirtualService, "default", "reviews")
    })
    .await;
    let vs = store.snapshot().resources.into_iter().find(|r| r.kind == Kind::VirtualService).expect("the VS");
    assert!(format!("{:?}", vs.spec).contains("v2"), "the spec read from the API server: {:?}", vs.spec);

    k.kubectl(&["delete", "virtualservice", "reviews"]).await.expect("kubectl delete");
    wait_store(&store, "VirtualService reviews removed", |s| !has(s, Kind::VirtualService, "default", "reviews")).await;
    assert!(has(&store, Kind::Service, "default", "reviews"), "the Service stays");
}

const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1-abc
  namespace: default
  labels: {app: reviews, version: v1}
spec:
  serviceAccountName: bookinfo-reviews
  containers:
  - name: reviews
    image: docker.io/istio/examples-bookinfo-reviews-v1:1.20.3
    ports: [{name: http, containerPort: 9080}]
";

/// Writes a Pod's status as a kubelet would: its IP, running, and ready or not.
async fn set_pod_status(k: &KubeApiServer, name: &str, ip: &str, ready: bool) {
    let patch = serde_json::json!({ "status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{ "ip": ip }],
        "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }],
    }});
    k.kubectl(&["patch", "pod", name, "--subresource=status", "--type=merge", "-p", &patch.to_string()])
        .await
        .expect("kubectl patch --subresource=status");
}

fn endpoints(source: &MeshXdsSource) -> Vec<String> {
    cluster_endpoints(source, "outbound|9080||reviews.default.svc.cluster.local")
}

/// The endpoint addresses a client in `default` gets for `cluster`.
fn cluster_endpoints(source: &MeshXdsSource, cluster: &str) -> Vec<String> {
    let node =
        NodeInfo { id: "client".into(), name: "client".into(), namespace: "default".into(), ..Default::default() }
            .to_node();
    let types = source.proxy_resources(&node);
    let Some((_, by_name)) = types.get(type_url::ENDPOINT) else { return Vec::new() };
    let Some(any) = by_name.get(cluster) else { return Vec::new() };
    let cla: envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment =
        prost::Message::decode(any.value.as_slice()).expect("a ClusterLoadAssignment");
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(ep)) => {
                ep.address.as_ref().map(|a| format!("{a:?}"))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn ready_pods_are_service_endpoints_before_any_proxy_connects() {
    let Some((k, _one)) = api_server().await else { return };
    let (store, _source) = follow(&k).await;
    k.apply(REVIEWS).await.expect("kubectl apply");
    k.apply(POD).await.expect("kubectl apply the pod");
    wait_store(&store, "Service reviews", |s| has(s, Kind::Service, "default", "reviews")).await;
    let mesh = MeshXdsSource::new(store.clone(), Registry::new(), ProxyMode::Explicit, MeshConfig::default());
    // Scheduled but not running: no endpoint.
    assert!(!has(&store, Kind::WorkloadEntry, "default", "pod.reviews-v1-abc"));
    assert!(endpoints(&mesh).is_empty(), "{:?}", endpoints(&mesh));

    set_pod_status(&k, "reviews-v1-abc", "10.244.0.7", true).await;
    wait_store(&store, "the ready pod's workload", |s| has(s, Kind::WorkloadEntry, "default", "pod.reviews-v1-abc"))
        .await;
    let eps = endpoints(&mesh);
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert!(eps[0].contains("10.244.0.7") && eps[0].contains("9080"), "{eps:?}");

    // Not ready any more: out of the endpoints, as a kubelet's readiness probe decides.
    set_pod_status(&k, "reviews-v1-abc", "10.244.0.7", false).await;
    wait_store(&store, "the unready pod's workload removed", |s| {
        !has(s, Kind::WorkloadEntry, "default", "pod.reviews-v1-abc")
    })
    .await;
    assert!(endpoints(&mesh).is_empty(), "{:?}", endpoints(&mesh));
}

/// `kubectl get vs NAME -o json`'s status.
async fn vs_status(k: &KubeApiServer, name: &str) -> serde_json::Value {
    let out = k.kubectl(&["get", "virtualservice", name, "-o", "json"]).await.expect("kubectl get");
    let obj: serde_json::Value = serde_json::from_str(&out).expect("JSON from kubectl");
    obj["status"].clone()
}

async fn wait_vs_status(k: &KubeApiServer, name: &str, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = vs_status(k, name).await;
        if check(&status) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: status is {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_invalid_virtual_service_gets_a_status_naming_the_field_and_loses_it_when_fixed() {
    let Some((k, _one)) = api_server().await else { return };
    let (store, _source) = follow(&k).await;
    let broken = REVIEWS.replace("weight: 20", "weight: twenty");
    k.apply(&broken).await.expect("the open CRD schema takes it; weft judges it");

    wait_vs_status(&k, "reviews", "an error condition", |s| s["conditions"][0]["status"] == "False").await;
    let status = vs_status(&k, "reviews").await;
    let message = status["conditions"][0]["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("spec.http[0].route[1].weight"), "the condition names the field: {status}");
    assert_eq!(status["validationMessages"][0]["type"]["code"], "IST0106", "{status}");
    assert_eq!(status["validationMessages"][0]["level"], "ERROR", "{status}");
    assert!(!has(&store, Kind::VirtualService, "default", "reviews"), "an invalid VirtualService is not in force");
    let shown = k.kubectl(&["get", "virtualservice", "reviews", "-o", "yaml"]).await.expect("kubectl get -o yaml");
    assert!(shown.contains("validationMessages") && shown.contains("weight"), "{shown}");

    k.apply(REVIEWS).await.expect("the fixed VirtualService");
    wait_store(&store, "the fixed VirtualService", |s| has(s, Kind::VirtualService, "default", "reviews")).await;
    wait_vs_status(&k, "reviews", "the condition turns True and the messages go", |s| {
        s["conditions"][0]["status"] == "True" && s.get("validationMessages").is_none_or(|v| v.is_null())
    })
    .await;
}

fn lease(identity: &str) -> weft_control::kubernetes::lease::LeaseConfig {
    weft_control::kubernetes::lease::LeaseConfig {
        namespace: "default".into(),
        name: "weft-control".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(4),
        retry: Duration::from_millis(200),
    }
}

async fn wait_leader(rx: &mut tokio::sync::watch::Receiver<bool>, who: &str) {
    tokio::time::timeout(WAIT, rx.wait_for(|l| *l))
        .await
        .unwrap_or_else(|_| panic!("{who} never led"))
        .expect("the election runs");
}

async fn holder(k: &KubeApiServer) -> String {
    k.kubectl(&["get", "lease", "weft-control", "-o", "jsonpath={.spec.holderIdentity}"]).await.expect("get lease")
}

#[tokio::test]
async fn lease_leadership_moves_to_the_other_replica_when_the_leader_goes() {
    use weft_control::kubernetes::lease::LeaseElection;
    let Some((k, _one)) = api_server().await else { return };
    let client = weft_control::kubernetes::client(Some(&k.kubeconfig)).await.expect("a client");

    let a = LeaseElection::start(client.clone(), lease("replica-a"));
    let mut a_leads = a.is_leader();
    wait_leader(&mut a_leads, "replica-a").await;
    let b = LeaseElection::start(client.clone(), lease("replica-b"));
    let mut b_leads = b.is_leader();
    assert_eq!(holder(&k).await, "replica-a");

    // A leader that stops releases the Lease: the other takes over.
    a.stop().await;
    wait_leader(&mut b_leads, "replica-b after replica-a stopped").await;
    assert_eq!(holder(&k).await, "replica-b");

    // A leader that dies (no release): the other waits out the lease duration, then leads.
    let c = LeaseElection::start(client.clone(), lease("replica-c"));
    let mut c_leads = c.is_leader();
    assert!(!*c_leads.borrow(), "replica-c does not lead while replica-b renews");
    drop(b);
    wait_leader(&mut c_leads, "replica-c after replica-b died").await;
    assert_eq!(holder(&k).await, "replica-c");
}

#[tokio::test]
async fn tokens_from_the_token_request_api_are_verified_with_the_api_servers_published_keys() {
    use weft_control::k8s_tokens::{KeySource, KubernetesTokenConfig, KubernetesTokens};
    let Some((k, _one)) = api_server().await else { return };
    k.kubectl(&["create", "serviceaccount", "bookinfo-reviews"]).await.expect("a service account");
    k.kubectl(&["create", "serviceaccount", "bookinfo-ratings"]).await.expect("another");
    // The keys as docs/kubernetes.md tells operators to save them.
    let jwks = k.kubectl(&["get", "--raw", "/openid/v1/jwks"]).await.expect("the issuer's keys");
    let file = k.dir().join("jwks.json");
    std::fs::write(&file, jwks).expect("write jwks.json");
    let tokens = KubernetesTokens::new(KubernetesTokenConfig {
        issuer: weft_testkit::kube::SA_ISSUER.into(),
        keys: KeySource::File(file),
        audiences: vec!["istio-ca".into()],
    })
    .expect("a verifier");

    let reviews = k.create_token("default", "bookinfo-reviews", "istio-ca", 600).await.expect("TokenRequest");
    let grant = tokens.verify_token(&reviews).expect("a projected-style token is accepted");
    assert_eq!((grant.namespace.as_str(), grant.service_account.as_str()), ("default", "bookinfo-reviews"));
    let ratings = k.create_token("default", "bookinfo-ratings", "istio-ca", 600).await.expect("TokenRequest");
    assert_eq!(tokens.verify_token(&ratings).expect("accepted").service_account, "bookinfo-ratings");
    let other_audience = k.create_token("default", "bookinfo-reviews", "vault", 600).await.expect("TokenRequest");
    let refused = tokens.verify_token(&other_audience).expect_err("another audience is refused");
    assert!(refused.to_string().to_lowercase().contains("aud"), "{refused}");
}

const DB: &str = "apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec:
  ports: [{name: tcp-pg, port: 5432, targetPort: 6432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-manual
  namespace: default
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: tcp-pg, port: 6432, protocol: TCP}]
endpoints:
- addresses: [10.9.0.1]
  conditions: {ready: true}
- addresses: [10.9.0.2]
- addresses: [10.9.0.3]
  conditions: {ready: false}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-abcde
  namespace: default
  labels: {kubernetes.io/service-name: reviews, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}
addressType: IPv4
ports: [{name: http, port: 9080, protocol: TCP}]
endpoints:
- addresses: [10.9.9.9]
";

#[tokio::test]
async fn services_without_a_selector_get_their_endpoint_slices_and_pods_stay_the_source_with_one() {
    let Some((k, _one)) = api_server().await else { return };
    let (store, _source) = follow(&k).await;
    k.apply(REVIEWS).await.expect("kubectl apply reviews");
    k.apply(DB).await.expect("kubectl apply the Service and its slices");
    let mesh = MeshXdsSource::new(store.clone(), Registry::new(), ProxyMode::Explicit, MeshConfig::default());
    let db = "outbound|5432||db.default.svc.cluster.local";
    wait_store(&store, "the slice's endpoints", |s| {
        has(s, Kind::Service, "default", "db") && has(s, Kind::WorkloadEntry, "default", "eps.db-manual.1")
    })
    .await;
    let mut eps = cluster_endpoints(&mesh, db);
    eps.sort();
    assert_eq!(eps.len(), 2, "the ready (and unknown-readiness) endpoints only: {eps:?}");
    assert!(eps[0].contains("10.9.0.1") && eps[0].contains("6432"), "{eps:?}");
    assert!(eps[1].contains("10.9.0.2"), "{eps:?}");
    // A Service with a selector keeps its Pods as the source: the controller's slice is not read.
    assert!(endpoints(&mesh).is_empty(), "reviews has no ready pod: {:?}", endpoints(&mesh));

    // The slice changes: the endpoints follow; the slice goes: so do they.
    let patch = r#"{"endpoints":[{"addresses":["10.9.0.7"],"conditions":{"ready":true}}]}"#;
    k.kubectl(&["patch", "endpointslice", "db-manual", "--type=merge", "-p", patch]).await.expect("patch the slice");
    wait_store(&store, "the changed slice", |s| !has(s, Kind::WorkloadEntry, "default", "eps.db-manual.1")).await;
    let eps = cluster_endpoints(&mesh, db);
    assert!(eps.len() == 1 && eps[0].contains("10.9.0.7"), "{eps:?}");
    k.kubectl(&["delete", "endpointslice", "db-manual"]).await.expect("delete the slice");
    wait_store(&store, "the slice's endpoints removed", |s| !has(s, Kind::WorkloadEntry, "default", "eps.db-manual.0"))
        .await;
    assert!(cluster_endpoints(&mesh, db).is_empty());
    assert!(has(&store, Kind::Service, "default", "db"), "the Service stays");
}

#[tokio::test]
async fn namespace_labels_are_followed_and_namespaces_put_nothing_in_the_store() {
    let Some((k, _one)) = api_server().await else { return };
    let (store, source) = follow(&k).await;
    let before = store.snapshot().resources.len();
    k.kubectl(&["create", "namespace", "shop"]).await.expect("create namespace");
    k.kubectl(&["label", "namespace", "shop", "istio-injection=enabled"]).await.expect("label it");
    let mut labels = source.namespaces();
    let injection = |m: &weft_control::kubernetes::NamespaceLabels, v: Option<&str>| {
        m.get("shop").is_some_and(|l| l.get("istio-injection").map(String::as_str) == v)
    };
    tokio::time::timeout(WAIT, labels.wait_for(|m| injection(m, Some("enabled"))))
        .await
        .expect("the label is seen")
        .expect("the source runs");
    assert!(labels.borrow().contains_key("default"), "every namespace is listed: {:?}", labels.borrow());
    k.kubectl(&["label", "namespace", "shop", "istio-injection-"]).await.expect("unlabel it");
    tokio::time::timeout(WAIT, labels.wait_for(|m| injection(m, None)))
        .await
        .expect("the removed label is seen")
        .expect("the source runs");
    assert_eq!(store.snapshot().resources.len(), before, "namespaces are no resources");
}

const GATEWAY_API: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: weft}
spec: {controllerName: istio.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: weft
  listeners:
  - {name: http, port: 80, protocol: HTTP, hostname: "*.example.com"}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{name: gw}]
  hostnames: [reviews.example.com]
  rules:
  - backendRefs: [{name: reviews, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: orphan, namespace: default}
spec:
  parentRefs: [{name: nowhere}]
  rules:
  - backendRefs: [{name: reviews, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: db, namespace: default}
spec:
  parentRefs: [{name: gw}]
  rules:
  - backendRefs: [{name: reviews, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-shop, namespace: default}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service}]
"#;

async fn get_json(k: &KubeApiServer, what: &[&str]) -> serde_json::Value {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["-o", "json"]);
    let out = k.kubectl(&args).await.expect("kubectl get");
    serde_json::from_str(&out).expect("JSON from kubectl")
}

async fn wait_json(k: &KubeApiServer, what: &[&str], desc: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let obj = get_json(k, what).await;
        if check(&obj["status"]) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{desc}: status is {}", obj["status"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn condition<'a>(conds: &'a serde_json::Value, kind: &str) -> &'a serde_json::Value {
    conds.as_array().and_then(|c| c.iter().find(|c| c["type"] == kind)).unwrap_or(&serde_json::Value::Null)
}

#[tokio::test]
async fn gateway_api_objects_applied_with_kubectl_are_served_and_get_istios_status() {
    let Some((k, _one)) = api_server().await else { return };
    let (store, mut source) = follow(&k).await;
    source.write_gateway_status(Vec::new, "cluster.local".into());
    k.apply(REVIEWS).await.expect("kubectl apply reviews");
    k.apply(GATEWAY_API).await.expect("kubectl apply the Gateway API objects");
    wait_store(&store, "every Gateway API kind", |s| {
        has(s, Kind::GatewayClass, "default", "weft")
            && has(s, Kind::KubernetesGateway, "default", "gw")
            && has(s, Kind::HttpRoute, "default", "reviews")
            && has(s, Kind::TcpRoute, "default", "db")
            && has(s, Kind::ReferenceGrant, "default", "from-shop")
    })
    .await;
    // Served: the route is the gateway's virtual host, as Istio's conversion makes it.
    let c = weft_control::gwapi::convert(&store.snapshot().resources, "cluster.local");
    assert!(
        c.resources
            .iter()
            .any(|r| r.kind == Kind::VirtualService && format!("{:?}", r.spec).contains("reviews.example.com")),
        "{:#?}",
        c.resources
    );

    wait_json(&k, &["gatewayclass", "weft"], "the class accepted", |s| {
        condition(&s["conditions"], "Accepted")["status"] == "True"
    })
    .await;
    wait_json(&k, &["gateway", "gw"], "the Gateway accepted", |s| {
        condition(&s["conditions"], "Accepted")["status"] == "True"
    })
    .await;
    let gw = get_json(&k, &["gateway", "gw"]).await;
    let programmed = condition(&gw["status"]["conditions"], "Programmed");
    assert_eq!(programmed["status"], "False", "no gateway proxy is connected: {gw}");
    assert_eq!(programmed["reason"], "AddressNotAssigned", "{gw}");
    assert_eq!(programmed["observedGeneration"], gw["metadata"]["generation"], "{gw}");
    assert!(programmed["lastTransitionTime"].is_string(), "{gw}");
    let listener = &gw["status"]["listeners"][0];
    assert_eq!(listener["name"], "http", "{gw}");
    assert_eq!(listener["attachedRoutes"], 1, "the HTTPRoute attaches; the TCPRoute cannot: {gw}");

    wait_json(&k, &["httproute", "reviews"], "the route accepted by gw", |s| {
        s["parents"][0]["controllerName"] == "istio.io/gateway-controller"
            && condition(&s["parents"][0]["conditions"], "Accepted")["status"] == "True"
            && condition(&s["parents"][0]["conditions"], "ResolvedRefs")["status"] == "True"
    })
    .await;
    wait_json(&k, &["httproute", "orphan"], "the orphan route not accepted", |s| {
        condition(&s["parents"][0]["conditions"], "Accepted")["status"] == "False"
    })
    .await;
    wait_json(&k, &["tcproute", "db"], "the TCP route refused by an HTTP listener", |s| {
        condition(&s["parents"][0]["conditions"], "Accepted")["status"] == "False"
    })
    .await;

    // An edit: the conditions follow the new generation.
    k.kubectl(&[
        "patch",
        "httproute",
        "reviews",
        "--type=merge",
        "-p",
        r#"{"spec":{"hostnames":["ratings.example.com"]}}"#,
    ])
    .await
    .expect("kubectl patch");
    wait_json(&k, &["httproute", "reviews"], "observedGeneration 2", |s| {
        condition(&s["parents"][0]["conditions"], "Accepted")["observedGeneration"] == 2
    })
    .await;

    // Deleted from the cluster: out of the store.
    k.kubectl(&["delete", "httproute", "reviews"]).await.expect("kubectl delete");
    wait_store(&store, "the route removed", |s| !has(s, Kind::HttpRoute, "default", "reviews")).await;
    wait_json(&k, &["gateway", "gw"], "the listener counts no route", |s| s["listeners"][0]["attachedRoutes"] == 0)
        .await;
}
