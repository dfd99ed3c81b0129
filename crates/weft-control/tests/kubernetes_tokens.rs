//! `weft control --kubernetes`: service-account tokens verified by the real API server's
//! TokenReview (`weft_testkit::kube`, built by scripts/setup.sh). Tokens come from the
//! TokenRequest API (`kubectl create token`, what the kubelet projects into a pod); an
//! expired one is signed with the API server's own service-account key (TokenRequest
//! will not issue one shorter than ten minutes), next to a fresh one signed the same way
//! that is accepted, so the refusal is the expiry's. A token bound to a pod (what the
//! kubelet projects) stops working once the pod is deleted. xDS streams are admitted
//! only for the service account the review proves; without the API server both the
//! certificate service and xDS answer UNAVAILABLE.
//!
//! Skipped (with the reason) only when scripts/setup.sh tried and failed to build the
//! API server; without the binaries and without that record, the tests fail with the
//! setup hint.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::time::SystemTime;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use weft_control::control::ControlPlane;
use weft_control::identity::IdentityConfig;
use weft_control::kubernetes::KubernetesConfig;
use weft_identity::service::CertificateClient;
use weft_identity::{Credential, IdentityError, SpiffeId};
use weft_testkit::kube::{KubeApiServer, SA_ISSUER};
use weft_xds::{type_url, NodeInfo};

/// One API server at a time (each is etcd plus a kube-apiserver).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NAMESPACE: &str = "bookinfo";

/// The API server with namespace `bookinfo` and its service accounts `bookinfo-reviews`
/// and `bookinfo-ratings`, or None (skip) when it cannot be built here.
async fn api_server() -> Option<(KubeApiServer, tokio::sync::MutexGuard<'static, ()>)> {
    if let Some(why) = weft_testkit::kube::unavailable() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let guard = ONE_AT_A_TIME.lock().await;
    let k = KubeApiServer::start().await.expect("kube-apiserver starts");
    k.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: bookinfo-reviews, namespace: {NAMESPACE}}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: bookinfo-ratings, namespace: {NAMESPACE}}}\n"
    ))
    .await
    .expect("namespace and service accounts");
    Some((k, guard))
}

/// A control plane whose CA reviews Kubernetes tokens (audience `istio-ca`) with `k`.
async fn control_plane(k: &KubeApiServer, data: &std::path::Path) -> ControlPlane {
    let mut identity = IdentityConfig::new(data);
    identity.token_review =
        Some((KubernetesConfig { kubeconfig: Some(k.kubeconfig.clone()) }, vec!["istio-ca".to_string()]));
    mesh::control_plane(None, identity).await
}

/// A CSR for `sa` in [`NAMESPACE`] (what the proxy claims).
fn csr(sa: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    let uri = format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{sa}");
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// Asks `cp`'s certificate service for `claimed`'s certificate with `token`.
async fn certificate(cp: &ControlPlane, token: &str, claimed: &str) -> Result<Vec<String>, IdentityError> {
    let mut client = CertificateClient::connect_lazy(&format!("http://{}", cp.xds_addr)).unwrap();
    client.create_certificate(&Credential::KubernetesServiceAccountToken(token.to_string()), csr(claimed), None).await
}

/// A token for `sa` signed with the API server's service-account key, expiring `exp_in`
/// seconds from now (negative: in the past), with the claims TokenRequest writes.
async fn forged(k: &KubeApiServer, sa: &str, exp_in: i64) -> String {
    let uid = k
        .kubectl(&["get", "serviceaccount", sa, "-n", NAMESPACE, "-o", "jsonpath={.metadata.uid}"])
        .await
        .expect("the service account's uid");
    let jwks: serde_json::Value =
        serde_json::from_str(&k.kubectl(&["get", "--raw", "/openid/v1/jwks"]).await.expect("the JWKS")).unwrap();
    let kid = jwks["keys"][0]["kid"].as_str().expect("a key id").to_string();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    let iat = now.min(now + exp_in) - 3600;
    let claims = json!({
        "iss": SA_ISSUER,
        "sub": format!("system:serviceaccount:{NAMESPACE}:{sa}"),
        "aud": ["istio-ca"],
        "iat": iat, "nbf": iat, "exp": now + exp_in,
        "kubernetes.io": {"namespace": NAMESPACE, "serviceaccount": {"name": sa, "uid": uid.trim()}},
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid);
    let key = jsonwebtoken::EncodingKey::from_ec_pem(k.sa_key_pem.as_bytes()).expect("the ES256 key");
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn refused(result: Result<Vec<String>, IdentityError>, code: tonic::Code, says: &str) {
    match result {
        Err(IdentityError::Service { code: got, message }) => {
            eprintln!("refused as expected: {got:?}: {message}");
            assert_eq!(got, code, "{message}");
            assert!(message.contains(says), "the refusal should say {says:?}: {message}");
        }
        other => panic!("expected {code:?} saying {says:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_token_from_token_request_gets_the_certificate_of_its_service_account() {
    let Some((k, _one)) = api_server().await else { return };
    let data = tempfile::tempdir().unwrap();
    let cp = control_plane(&k, data.path()).await;
    let token = k.create_token(NAMESPACE, "bookinfo-reviews", "istio-ca", 600).await.expect("a token");

    let chain = certificate(&cp, &token, "bookinfo-reviews").await.expect("a certificate for the token");
    let leaf = weft_identity::cert::certs_from_pem(&chain[0], "leaf").unwrap().remove(0);
    let id = weft_identity::cert::spiffe_id_of(&leaf).expect("a SPIFFE id");
    assert_eq!(id, SpiffeId::new("cluster.local", NAMESPACE, "bookinfo-reviews").unwrap());
    cp.shutdown().await;
}

#[tokio::test]
async fn tokens_of_another_account_expired_for_another_audience_or_unsigned_are_refused() {
    let Some((k, _one)) = api_server().await else { return };
    let data = tempfile::tempdir().unwrap();
    let cp = control_plane(&k, data.path()).await;

    // The proxy claims reviews with the token of ratings: the review proves ratings.
    let ratings = k.create_token(NAMESPACE, "bookinfo-ratings", "istio-ca", 600).await.expect("a token");
    refused(
        certificate(&cp, &ratings, "bookinfo-reviews").await,
        tonic::Code::PermissionDenied,
        "the credential grants only spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings",
    );

    // Signed by the cluster's key: accepted while valid, refused once expired.
    let fresh = forged(&k, "bookinfo-reviews", 600).await;
    certificate(&cp, &fresh, "bookinfo-reviews").await.expect("a valid token signed like TokenRequest's");
    let expired = forged(&k, "bookinfo-reviews", -600).await;
    refused(certificate(&cp, &expired, "bookinfo-reviews").await, tonic::Code::Unauthenticated, "expired");

    // A real token for another audience.
    let other = k.create_token(NAMESPACE, "bookinfo-reviews", "other-audience", 600).await.expect("a token");
    refused(certificate(&cp, &other, "bookinfo-reviews").await, tonic::Code::Unauthenticated, "audience");

    // Signed by a key the cluster does not know.
    let stranger = {
        let pair = rcgen::KeyPair::generate().unwrap();
        let key = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let claims = json!({"iss": SA_ISSUER, "sub": "system:serviceaccount:bookinfo:bookinfo-reviews",
            "aud": ["istio-ca"], "iat": now, "exp": now + 600});
        jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256), &claims, &key).unwrap()
    };
    refused(certificate(&cp, &stranger, "bookinfo-reviews").await, tonic::Code::Unauthenticated, "TokenReview");
    cp.shutdown().await;
}

#[tokio::test]
async fn a_token_bound_to_a_pod_is_refused_once_the_pod_is_deleted() {
    let Some((k, _one)) = api_server().await else { return };
    let data = tempfile::tempdir().unwrap();
    let cp = control_plane(&k, data.path()).await;
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: reviews-v1-bound, namespace: {NAMESPACE}}}\nspec:\n  serviceAccountName: bookinfo-reviews\n  containers: [{{name: reviews, image: docker.io/istio/examples-bookinfo-reviews-v1:1.20.2}}]\n"
    );
    k.kubectl_stdin(&["create", "-f", "-"], Some(&pod)).await.expect("the pod");
    // What the kubelet projects: a token bound to the pod.
    let args = ["create", "token", "bookinfo-reviews", "-n", NAMESPACE, "--audience=istio-ca", "--duration=600s"];
    let bound = ["--bound-object-kind=Pod", "--bound-object-name=reviews-v1-bound"];
    let token = k.kubectl(&[&args[..], &bound[..]].concat()).await.expect("a bound token").trim().to_string();
    certificate(&cp, &token, "bookinfo-reviews").await.expect("a certificate while the pod exists");

    k.kubectl(&["delete", "pod", "reviews-v1-bound", "-n", NAMESPACE, "--wait=true"]).await.expect("deleted");
    // The API server caches a successful authentication for 10 s (its token cache), so
    // the review turns within that; the first refusal is checked.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let answer = loop {
        let answer = certificate(&cp, &token, "bookinfo-reviews").await;
        if answer.is_err() || tokio::time::Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    refused(answer, tonic::Code::Unauthenticated, "service account token has been invalidated");
    cp.shutdown().await;
}

/// The first answer of an ADS stream opened as `sa`'s pod with `token` as bearer (what
/// an injected proxy sends), or the status it was refused with.
async fn xds_stream(cp: &ControlPlane, sa: &str, token: &str) -> Result<DiscoveryResponse, tonic::Status> {
    let node = NodeInfo {
        id: format!("sidecar~127.0.0.9~{sa}-5b4d9.{NAMESPACE}~{NAMESPACE}.svc.cluster.local"),
        cluster: format!("{sa}.{NAMESPACE}"),
        name: format!("{sa}-5b4d9"),
        namespace: NAMESPACE.into(),
        service_account: sa.into(),
        instance_ips: vec!["127.0.0.9".into()],
        ..NodeInfo::default()
    };
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", cp.xds_addr)).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(DiscoveryRequest { node: Some(node.to_node()), type_url: type_url::LISTENER.into(), ..Default::default() })
        .unwrap();
    let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let first = async {
        let mut responses = client.stream_aggregated_resources(request).await?.into_inner();
        match responses.message().await? {
            Some(r) => Ok(r),
            None => Err(tonic::Status::unknown("stream closed without a response")),
        }
    };
    let first = tokio::time::timeout(std::time::Duration::from_secs(30), first).await.expect("an answer");
    drop(tx);
    first
}

#[tokio::test]
async fn xds_streams_are_admitted_only_for_the_service_account_the_review_proves() {
    let Some((k, _one)) = api_server().await else { return };
    let data = tempfile::tempdir().unwrap();
    let cp = control_plane(&k, data.path()).await;
    let reviews = k.create_token(NAMESPACE, "bookinfo-reviews", "istio-ca", 600).await.expect("a token");
    let ratings = k.create_token(NAMESPACE, "bookinfo-ratings", "istio-ca", 600).await.expect("a token");

    xds_stream(&cp, "bookinfo-reviews", &reviews).await.expect("its own service account is admitted");
    let status = xds_stream(&cp, "bookinfo-reviews", &ratings).await.expect_err("another service account's token");
    eprintln!("refused as expected: {status:?}");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("\"bookinfo-reviews\"") && status.message().contains("\"bookinfo-ratings\""),
        "the reason names the claim and the proof: {}",
        status.message()
    );
    let expired = forged(&k, "bookinfo-reviews", -600).await;
    let status = xds_stream(&cp, "bookinfo-reviews", &expired).await.expect_err("an expired token");
    eprintln!("refused as expected: {status:?}");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("expired"), "{}", status.message());
    cp.shutdown().await;
}

/// Without the API server, the proxy is told to retry (UNAVAILABLE), not that its token is
/// bad, on its certificate request and its xDS stream.
#[tokio::test]
async fn an_unreachable_api_server_is_unavailable_not_a_refusal() {
    let Some((k, _one)) = api_server().await else { return };
    let token = k.create_token(NAMESPACE, "bookinfo-reviews", "istio-ca", 600).await.expect("a token");
    let data = tempfile::tempdir().unwrap();
    let cp = control_plane(&k, data.path()).await;
    certificate(&cp, &token, "bookinfo-reviews").await.expect("a certificate while the API server runs");
    drop(k);
    refused(certificate(&cp, &token, "bookinfo-reviews").await, tonic::Code::Unavailable, "TokenReview");
    let status = xds_stream(&cp, "bookinfo-reviews", &token).await.expect_err("no review, no stream");
    eprintln!("refused as expected: {status:?}");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("TokenReview"), "{}", status.message());
    cp.shutdown().await;
}
