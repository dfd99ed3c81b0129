//! Service-account tokens verified by the API server itself (`weft control --kubernetes`),
//! as istiod's CA does (`security/pkg/k8s/tokenreview`): every Kubernetes token a proxy
//! presents (its projected token, audience `istio-ca`) goes into a TokenReview
//! (`authentication.k8s.io/v1`, `spec.audiences` = the accepted audiences); the API
//! server checks signature, issuer, audience, expiry, and that the service account (and
//! the pod the token is bound to) still exist. The identity is what the review answers:
//! `status.user.username` `system:serviceaccount:<namespace>:<name>` in the group
//! `system:serviceaccounts`, with the bound pod from `status.user.extra`
//! (`authentication.kubernetes.io/pod-name`) named in the log.
//!
//! Refused: a review that is not `authenticated` (with the API server's reason: expired,
//! wrong audience, unknown key, deleted pod...), a user that is no service account, an
//! answer for none of the accepted audiences. The certificate service then signs only
//! the granted identity's SPIFFE id, and the xDS admission only lets the node claim it.
//! The API server unreachable is `UNAVAILABLE` (the proxy retries), not a refusal.
//!
//! The control plane's own credential needs `authentication.k8s.io tokenreviews create`
//! (`system:auth-delegator` has it).

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::OnceCell;
use weft_identity::service::{CredentialVerifier, VerifyFuture};
use weft_identity::{Credential, Grant, IdentityError};

use super::KubernetesConfig;

/// How long a review may take before the request is answered `UNAVAILABLE`.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// The group every service account's user is in.
const SERVICE_ACCOUNTS_GROUP: &str = "system:serviceaccounts";
/// The `extra` key naming the pod a bound token belongs to.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";

/// Verifies Kubernetes tokens with the API server's TokenReview (the certificate
/// service's and the xDS admission's [`CredentialVerifier`] in `--kubernetes` mode).
pub struct TokenReviewer {
    cfg: KubernetesConfig,
    client: OnceCell<Client>,
    audiences: Vec<String>,
}

/// Who a token belongs to, as the API server reviewed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The pod the token is bound to, when it is a bound (projected) token.
    pub pod: Option<String>,
}

impl TokenReviewer {
    /// A reviewer reaching the API server as `cfg` says (the client is made on first
    /// use), accepting tokens for any of `audiences`.
    pub fn new(cfg: KubernetesConfig, audiences: Vec<String>) -> TokenReviewer {
        TokenReviewer { cfg, client: OnceCell::new(), audiences }
    }

    /// A reviewer over a client already made.
    pub fn with_client(client: Client, audiences: Vec<String>) -> TokenReviewer {
        TokenReviewer { cfg: KubernetesConfig::default(), client: OnceCell::new_with(Some(client)), audiences }
    }

    /// Who `token` belongs to, or why it is refused.
    pub async fn review(&self, token: &str) -> Result<Reviewed, IdentityError> {
        let client = self
            .client
            .get_or_try_init(|| super::client(self.cfg.kubeconfig.as_deref()))
            .await
            .map_err(|e| unavailable(format!("cannot reach the Kubernetes API server to review the token: {e}")))?;
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_string(), audiences: Some(self.audiences.clone()) },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(client.clone());
        let answer = tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
            .await
            .map_err(|_| unavailable(format!("the Kubernetes TokenReview did not answer within {REVIEW_TIMEOUT:?}")))?
            .map_err(|e| match &e {
                kube::Error::Api(s) if s.code == 401 || s.code == 403 => unavailable(format!(
                    "the control plane may not create TokenReviews ({e}): its credential needs \
                     `authentication.k8s.io tokenreviews create` (e.g. the system:auth-delegator ClusterRole)"
                )),
                _ => unavailable(format!("Kubernetes TokenReview failed: {e}")),
            })?;
        reviewed(answer.status.unwrap_or_default(), &self.audiences)
    }
}

impl CredentialVerifier for TokenReviewer {
    fn verify<'a>(&'a self, credential: &'a Credential) -> VerifyFuture<'a> {
        Box::pin(async move {
            let who = self.review(credential.token()).await?;
            let username = format!("system:serviceaccount:{}:{}", who.namespace, who.service_account);
            let token_id = match &who.pod {
                Some(pod) => format!("k8s-tokenreview:{username} pod {pod}"),
                None => format!("k8s-tokenreview:{username}"),
            };
            Ok(Grant { namespace: who.namespace, service_account: who.service_account, token_id })
        })
    }
}

/// Istio's reading of a review's status (`getTokenReviewResult`).
fn reviewed(status: TokenReviewStatus, audiences: &[String]) -> Result<Reviewed, IdentityError> {
    let refused = |m: String| IdentityError::TokenRefused(format!("Kubernetes service-account token: {m}"));
    if let Some(error) = status.error.as_deref().filter(|e| !e.is_empty()) {
        return Err(refused(format!("the API server's TokenReview refuses it: {error}")));
    }
    if status.authenticated != Some(true) {
        return Err(refused("the API server's TokenReview does not authenticate it".into()));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    if !user.groups.iter().flatten().any(|g| g == SERVICE_ACCOUNTS_GROUP) {
        return Err(refused(format!("user {username:?} is not a service account")));
    }
    // The API server answers with the audiences the token is valid for among those asked.
    if let Some(got) = &status.audiences {
        if !audiences.is_empty() && !got.iter().any(|a| audiences.contains(a)) {
            return Err(refused(format!("audience is not {}", audiences.join(" or "))));
        }
    }
    let parts: Vec<&str> = username.split(':').collect();
    let ["system", "serviceaccount", namespace, service_account] = parts[..] else {
        return Err(refused(format!("user {username:?} is not system:serviceaccount:<namespace>:<name>")));
    };
    if namespace.is_empty() || service_account.is_empty() {
        return Err(refused(format!("user {username:?} is not system:serviceaccount:<namespace>:<name>")));
    }
    let pod = user.extra.as_ref().and_then(|e| e.get(POD_NAME)).and_then(|v| v.first()).cloned();
    Ok(Reviewed { namespace: namespace.to_string(), service_account: service_account.to_string(), pod })
}

fn unavailable(message: String) -> IdentityError {
    IdentityError::Service { code: tonic::Code::Unavailable, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(username: &str, groups: &[&str], audiences: &[&str]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.into()),
                groups: Some(groups.iter().map(|g| g.to_string()).collect()),
                extra: Some([(POD_NAME.to_string(), vec!["reviews-v1-5b4d9".to_string()])].into()),
                ..Default::default()
            }),
            error: None,
        }
    }

    fn aud() -> Vec<String> {
        vec!["istio-ca".into()]
    }

    #[test]
    fn an_authenticated_service_account_is_its_namespace_account_and_bound_pod() {
        let who = reviewed(
            status(
                "system:serviceaccount:bookinfo:reviews",
                &["system:serviceaccounts", "system:authenticated"],
                &["istio-ca"],
            ),
            &aud(),
        )
        .expect("reviewed");
        assert_eq!(
            who,
            Reviewed {
                namespace: "bookinfo".into(),
                service_account: "reviews".into(),
                pod: Some("reviews-v1-5b4d9".into())
            }
        );
    }

    #[test]
    fn unauthenticated_users_other_than_service_accounts_and_other_audiences_are_refused() {
        let mut s = status("system:serviceaccount:bookinfo:reviews", &["system:serviceaccounts"], &["istio-ca"]);
        s.authenticated = Some(false);
        s.error = Some("token has expired".into());
        let e = reviewed(s, &aud()).expect_err("unauthenticated");
        assert!(e.to_string().contains("token has expired"), "{e}");
        assert!(e.is_credential_refusal());
        let e = reviewed(status("admin", &["system:masters"], &["istio-ca"]), &aud()).expect_err("a user");
        assert!(e.to_string().contains("not a service account"), "{e}");
        let e = reviewed(status("system:serviceaccount:a:b", &["system:serviceaccounts"], &["other"]), &aud())
            .expect_err("another audience");
        assert!(e.to_string().contains("audience is not istio-ca"), "{e}");
        let e = reviewed(status("system:serviceaccount:a", &["system:serviceaccounts"], &["istio-ca"]), &aud())
            .expect_err("a malformed username");
        assert!(e.to_string().contains("system:serviceaccount:<namespace>:<name>"), "{e}");
    }
}
