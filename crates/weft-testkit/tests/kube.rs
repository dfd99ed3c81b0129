//! The envtest-like harness (`weft_testkit::kube`): a real kube-apiserver on etcd that
//! kubectl talks to. Skipped (with the reason) only when scripts/setup.sh could not build
//! the API server.

use weft_testkit::kube::KubeApiServer;

#[tokio::test]
async fn kubectl_creates_a_namespace_and_a_pod_and_reads_them_back() {
    if let Some(why) = weft_testkit::kube::unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let k = KubeApiServer::start().await.expect("kube-apiserver starts");
    let version = k.kubectl(&["version", "-o", "json"]).await.expect("kubectl version");
    let version: serde_json::Value = serde_json::from_str(&version).expect("JSON");
    assert_eq!(version["serverVersion"]["gitVersion"], weft_testkit::kube::KUBE_VERSION, "{version}");

    k.kubectl(&["create", "namespace", "bookinfo"]).await.expect("create namespace");
    k.apply(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: details\n  namespace: bookinfo\n  labels: {app: details}\nspec:\n  containers:\n  - name: details\n    image: docker.io/istio/examples-bookinfo-details-v1:1.20.3\n",
    )
    .await
    .expect("kubectl apply of a Pod");
    let pod = k.kubectl(&["get", "pod", "details", "-n", "bookinfo", "-o", "json"]).await.expect("get pod");
    let pod: serde_json::Value = serde_json::from_str(&pod).expect("JSON");
    assert_eq!(pod["metadata"]["labels"]["app"], "details", "{pod}");
    assert_eq!(pod["spec"]["containers"][0]["name"], "details", "{pod}");
    // No kubelet: the pod stays Pending with no node, as with envtest.
    assert_eq!(pod["status"]["phase"], "Pending", "{pod}");
    let namespaces = k.kubectl(&["get", "namespaces", "-o", "name"]).await.expect("get namespaces");
    assert!(namespaces.lines().any(|l| l == "namespace/bookinfo"), "{namespaces}");
}
