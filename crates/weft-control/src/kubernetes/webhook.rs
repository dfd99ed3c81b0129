//! Registers the control plane's `/inject` webhook with the API server (`weft control
//! --kubernetes --webhook ...`), as istiod keeps its `istio-sidecar-injector`: a
//! `MutatingWebhookConfiguration` named [`CONFIGURATION_NAME`] whose `caBundle` is the CA
//! of the webhook's serving certificate, created when missing and updated when it
//! differs, and kept in step when the serving certificate (or the CA file) changes.
//!
//! The webhooks are Istio's for the default revision (its `sidecarInjectorWebhook`
//! chart with `enableNamespacesByDefault: false`), so the same labels opt in and out:
//!
//! | namespace | pod label `sidecar.istio.io/inject` | injected |
//! |---|---|---|
//! | `istio-injection=enabled` | absent or `"true"` | yes |
//! | `istio-injection=enabled` | `"false"` | no |
//! | `istio.io/rev=default` (no `istio-injection`) | not `"false"` | yes |
//! | neither label | `"true"` (and no `istio.io/rev` on the pod), or pod label `istio.io/rev=default` | yes |
//! | neither label | absent | no |
//! | `istio-injection=disabled` | anything | no |
//!
//! The `sidecar.istio.io/inject: "false"` annotation (Istio's older form) and
//! `hostNetwork` pods are left alone by the webhook itself ([`crate::inject::pod`]).
//! Every webhook: `CREATE` of `v1` `pods`, `failurePolicy` as configured (Istio's
//! `Fail` by default), `sideEffects: None`, `admissionReviewVersions: [v1]`,
//! `reinvocationPolicy: Never`, `timeoutSeconds: 10`. The client configuration is the
//! webhook's URL for a control plane outside the cluster, or its Service inside.
//!
//! RBAC: `admissionregistration.k8s.io mutatingwebhookconfigurations get, create, update`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, PostParams};
use kube::Client;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::webhook_tls::ReloadingCert;

/// Name of the `MutatingWebhookConfiguration` (Istio's is `istio-sidecar-injector`).
pub const CONFIGURATION_NAME: &str = "weft-sidecar-injector";
/// The revision weft answers for (`istio.io/rev` values that select it).
pub const DEFAULT_REVISION: &str = "default";
/// How often the serving certificate is compared with what was registered.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How often the configuration is read back from the API server and repaired.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);

/// How the API server reaches the webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookClient {
    /// `clientConfig.url` (a control plane outside the cluster): `https://host:port/inject`.
    Url(String),
    /// `clientConfig.service` (inside the cluster): the Service in front of the webhook.
    Service {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Its port (Istio's istiod Service: 443, to the pods' 15017).
        port: u16,
    },
}

/// What gets registered.
#[derive(Debug, Clone)]
pub struct WebhookRegistration {
    /// The configuration's name ([`CONFIGURATION_NAME`]).
    pub name: String,
    /// How the API server reaches the webhook.
    pub client: WebhookClient,
    /// A PEM file with the CA bundle to register (e.g. a cert-manager Secret's `ca.crt`),
    /// re-read on every check; None: the last certificate of the serving chain (its
    /// issuer, or the certificate itself when self-signed).
    pub ca_bundle: Option<PathBuf>,
    /// `Fail` (Istio's default: no pod starts without its sidecar) or `Ignore`.
    pub failure_policy: String,
    /// The `istio.io/rev` value that selects this control plane.
    pub revision: String,
}

impl WebhookRegistration {
    /// Istio's defaults with `client`.
    pub fn new(client: WebhookClient) -> Self {
        WebhookRegistration {
            name: CONFIGURATION_NAME.into(),
            client,
            ca_bundle: None,
            failure_policy: "Fail".into(),
            revision: DEFAULT_REVISION.into(),
        }
    }

    /// The configuration to register with `ca_bundle_pem` as `caBundle`.
    pub fn desired(&self, ca_bundle_pem: &str) -> Result<MutatingWebhookConfiguration, String> {
        let ca = base64::engine::general_purpose::STANDARD.encode(ca_bundle_pem);
        let client = match &self.client {
            WebhookClient::Url(url) => json!({ "url": url, "caBundle": ca }),
            WebhookClient::Service { namespace, name, port } => json!({
                "service": { "namespace": namespace, "name": name, "port": port, "path": "/inject" },
                "caBundle": ca,
            }),
        };
        let expr = |key: &str, op: &str, values: &[&str]| {
            if values.is_empty() {
                json!({ "key": key, "operator": op })
            } else {
                json!({ "key": key, "operator": op, "values": values })
            }
        };
        let rev = self.revision.as_str();
        let not_opted_out = expr(INJECT_LABEL, "NotIn", &["false"]);
        // (name, namespaceSelector, objectSelector), as Istio's chart writes them.
        let hooks = [
            (
                "rev.namespace.sidecar-injector.weft.dev",
                vec![expr(REV_LABEL, "In", &[rev]), expr(NAMESPACE_LABEL, "DoesNotExist", &[])],
                vec![not_opted_out.clone()],
            ),
            (
                "rev.object.sidecar-injector.weft.dev",
                vec![expr(REV_LABEL, "DoesNotExist", &[]), expr(NAMESPACE_LABEL, "DoesNotExist", &[])],
                vec![not_opted_out.clone(), expr(REV_LABEL, "In", &[rev])],
            ),
            (
                "namespace.sidecar-injector.weft.dev",
                vec![expr(NAMESPACE_LABEL, "In", &["enabled"])],
                vec![not_opted_out.clone()],
            ),
            (
                "object.sidecar-injector.weft.dev",
                vec![expr(NAMESPACE_LABEL, "DoesNotExist", &[]), expr(REV_LABEL, "DoesNotExist", &[])],
                vec![expr(INJECT_LABEL, "In", &["true"]), expr(REV_LABEL, "DoesNotExist", &[])],
            ),
        ];
        let webhooks: Vec<Value> = hooks
            .into_iter()
            .map(|(name, ns, obj)| {
                json!({
                    "name": name,
                    "clientConfig": client,
                    "rules": [{
                        "operations": ["CREATE"],
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "scope": "*",
                    }],
                    "namespaceSelector": { "matchExpressions": ns },
                    "objectSelector": { "matchExpressions": obj },
                    "failurePolicy": self.failure_policy,
                    "matchPolicy": "Equivalent",
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "reinvocationPolicy": "Never",
                    "timeoutSeconds": 10,
                })
            })
            .collect();
        let doc = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {
                "name": self.name,
                "labels": { "app": "sidecar-injector", "app.kubernetes.io/part-of": "weft" },
            },
            "webhooks": webhooks,
        });
        serde_json::from_value(doc).map_err(|e| format!("webhook configuration: {e}"))
    }

    /// The CA bundle to register now (PEM): the `ca_bundle` file, or the last
    /// certificate of the serving chain.
    pub fn ca_bundle_pem(&self, certs: &ReloadingCert) -> Result<String, String> {
        if let Some(path) = &self.ca_bundle {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            if !text.contains("-----BEGIN CERTIFICATE-----") {
                return Err(format!("{}: no PEM CERTIFICATE block for the webhook's caBundle", path.display()));
            }
            return Ok(text);
        }
        let chain = certs.chain();
        let last = chain.last().ok_or("the webhook serving certificate file holds no certificate")?;
        Ok(pem("CERTIFICATE", last))
    }
}

/// Pod label (and annotation) opting in or out (`"true"`/`"false"`).
const INJECT_LABEL: &str = "sidecar.istio.io/inject";
/// Namespace label (`enabled`/`disabled`).
const NAMESPACE_LABEL: &str = "istio-injection";
/// Namespace or pod label naming the control-plane revision.
const REV_LABEL: &str = "istio.io/rev";

/// Creates or updates the configuration to `desired`: `Ok(true)` when it was written,
/// `Ok(false)` when the API server already had it.
pub async fn apply(client: &Client, desired: &MutatingWebhookConfiguration) -> Result<bool, kube::Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let name = desired.metadata.name.clone().unwrap_or_default();
    let Some(current) = api.get_opt(&name).await? else {
        api.create(&PostParams::default(), desired).await?;
        return Ok(true);
    };
    let same = serde_json::to_value(&current.webhooks).ok() == serde_json::to_value(&desired.webhooks).ok()
        && desired
            .metadata
            .labels
            .iter()
            .flatten()
            .all(|(k, v)| current.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
    if same {
        return Ok(false);
    }
    let mut next = desired.clone();
    next.metadata = current.metadata.clone();
    let mut labels = current.metadata.labels.clone().unwrap_or_default();
    labels.extend(desired.metadata.labels.clone().unwrap_or_default());
    next.metadata.labels = Some(labels);
    api.replace(&name, &PostParams::default(), &next).await?;
    Ok(true)
}

/// Keeps the configuration registered until aborted: at once, whenever the CA bundle
/// changes (checked every [`CHECK_INTERVAL`]) and every [`RESYNC_INTERVAL`] (someone
/// may have edited or deleted it). Failures are logged and retried at the next check.
pub fn spawn(client: Client, registration: WebhookRegistration, certs: Arc<ReloadingCert>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut registered: Option<String> = None;
        let mut since_resync = Duration::ZERO;
        loop {
            match registration.ca_bundle_pem(&certs) {
                Ok(bundle) if registered.as_deref() != Some(&bundle) || since_resync >= RESYNC_INTERVAL => {
                    since_resync = Duration::ZERO;
                    match register(&client, &registration, &bundle).await {
                        Ok(()) => registered = Some(bundle),
                        Err(e) => {
                            registered = None;
                            tracing::warn!(name = %registration.name, error = %e,
                                "webhook configuration not registered; retrying");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "webhook caBundle unreadable; keeping the registered one"),
            }
            tokio::time::sleep(CHECK_INTERVAL).await;
            since_resync += CHECK_INTERVAL;
        }
    })
}

async fn register(client: &Client, registration: &WebhookRegistration, bundle: &str) -> Result<(), String> {
    let desired = registration.desired(bundle)?;
    match apply(client, &desired).await {
        Ok(true) => {
            tracing::info!(name = %registration.name, client = ?registration.client, "webhook configuration registered");
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 403 => Err(format!(
            "{} (the control plane's credential needs admissionregistration.k8s.io \
             mutatingwebhookconfigurations get, create, update)",
            s.message
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// DER to PEM (64-character lines).
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_has_istios_selectors_and_the_ca_bundle() {
        let reg = WebhookRegistration::new(WebhookClient::Service {
            namespace: "weft-system".into(),
            name: "weft-control".into(),
            port: 443,
        });
        let mwc = reg.desired("-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n").expect("valid");
        let v = serde_json::to_value(&mwc).expect("json");
        assert_eq!(v["metadata"]["name"], "weft-sidecar-injector");
        let hooks = v["webhooks"].as_array().expect("webhooks");
        assert_eq!(hooks.len(), 4);
        for h in hooks {
            assert_eq!(h["sideEffects"], "None");
            assert_eq!(h["failurePolicy"], "Fail");
            assert_eq!(h["admissionReviewVersions"], json!(["v1"]));
            assert_eq!(h["clientConfig"]["service"]["path"], "/inject");
            let ca = base64::engine::general_purpose::STANDARD
                .decode(h["clientConfig"]["caBundle"].as_str().expect("caBundle"))
                .expect("base64");
            assert!(String::from_utf8_lossy(&ca).starts_with("-----BEGIN CERTIFICATE-----"));
        }
        let ns = hooks.iter().find(|h| h["name"] == "namespace.sidecar-injector.weft.dev").expect("namespace hook");
        assert_eq!(
            ns["namespaceSelector"]["matchExpressions"][0],
            json!({"key": "istio-injection", "operator": "In", "values": ["enabled"]})
        );
    }
}
