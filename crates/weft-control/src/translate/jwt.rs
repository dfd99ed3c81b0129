//! RequestAuthentication -> Envoy's JWT filter (`envoy.filters.http.jwt_authn`) first in
//! the proxy's inbound HTTP connection managers (before RBAC), with Istio's mapping
//! (istio/istio `pilot/pkg/security/authn`):
//!
//! - Selection as for AuthorizationPolicy: root namespace without selector: every
//!   workload; the workload's namespace without selector: every workload there;
//!   `selector.matchLabels`: workloads with those labels. `targetRef(s)` address
//!   gateways and waypoints and are skipped for sidecars. The rules of every selecting
//!   policy are merged and sorted by issuer.
//! - Rule `i` becomes provider `origins-i`: `issuer`, `audiences`, `fromHeaders`
//!   (`prefix` -> `value_prefix`), `fromParams`, `fromCookies`, `forwardOriginalToken`
//!   -> `forward`, `outputPayloadToHeader` -> `forward_payload_header`,
//!   `outputClaimToHeaders` -> `claim_to_headers`, `payload_in_metadata: payload`, and
//!   `scope` / `permission` normalized as space-delimited claims.
//! - Keys: `jwks` inline; `jwksUri` fetched by the control plane (Istio's default,
//!   `PILOT_JWT_ENABLE_REMOTE_JWKS=false`) and inlined as `local_jwks` from
//!   [`MeshConfig::jwks`]; until the keys are fetched, or when fetching fails, a JWKS
//!   no token can match is inlined, so tokens of that issuer are refused (401) and
//!   requests without a token still pass, as Istio does. A rule with neither `jwks` nor
//!   `jwksUri` (OpenID discovery in Istio) gets the same placeholder.
//! - Requirement, on prefix `/`: one provider: `requires_any [origins-0, allow_missing]`;
//!   several: `requires_any [origins-0, ..., requires_all [requires_any [origins-i,
//!   allow_missing] ...]]`. So a request without a token passes (a policy with
//!   `requestPrincipals` is how one requires a token), and a present token must be valid.
//!   `bypass_cors_preflight: true`.
//!
//! [`MeshConfig::jwks`]: super::MeshConfig::jwks

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource};
use envoy_types::pb::envoy::config::route::v3::{route_match, RouteMatch};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    jwt_provider, jwt_requirement, requirement_rule, JwtAuthentication, JwtClaimToHeader, JwtHeader, JwtProvider,
    JwtRequirement, JwtRequirementAndList, JwtRequirementOrList, RequirementRule,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::util::pack_any;
use weft_api::spec::{JwtRule, RequestAuthentication};
use weft_api::{ObjectMeta, Spec};

use super::model::MeshView;

/// Name of the JWT filter.
pub const FILTER_NAME: &str = "envoy.filters.http.jwt_authn";
/// Key of the verified payload in the filter's metadata (Istio's).
pub const PAYLOAD_KEY: &str = "payload";
/// A JWKS with one RSA key whose private half nobody has: inlined while a `jwksUri`
/// is not (yet) fetched, so tokens of that issuer fail verification.
pub const UNUSABLE_JWKS: &str = concat!(
    r#"{"keys":[{"kty":"RSA","alg":"RS256","use":"sig","kid":"weft-unavailable","e":"AQAB","n":""#,
    "8F2yVqdZglwKXhF6i_8MyPVVbTEcUxoaatnCK3qxzXyXeB7IGdW6Zq0_9XzFm8dZ5emuYGP0z4H5wtwKwCxjya89QJUkuJbCdvPCYK17ako2uAxnIctO_tXlplfQiVS-s6xLgpyLXy8P-DqA5k5qnz3L9sbMi9LrC-f_oXcsFtT4prvu_onPJ9AX4Stx2lYTJHjLKgIizCacywMZVxsqGcDY1CCWc5D2Ejd9kcb5GS89e40S82Atoj4egiar5TcBSJ2NFiXxsXnETAbvkYCtpilRbuiBPq2ctXAMp-6N2AtUGuafM4qHu1LBOd7c0rKPNWn7Qf4I3DTW7hGyadvHsQ",
    r#""}]}"#
);

/// The JWT filter of one proxy's inbound HTTP listeners.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InboundJwt {
    /// The filter, when a RequestAuthentication selects the proxy.
    pub filter: Option<HttpFilter>,
}

impl InboundJwt {
    /// The filter the RequestAuthentications selecting `view`'s proxy call for.
    pub fn new(view: &MeshView<'_>) -> InboundJwt {
        let mut rules: Vec<&JwtRule> = Vec::new();
        for r in &view.mesh.resources {
            let Spec::RequestAuthentication(ra) = &r.spec else { continue };
            if selects(view, &r.meta, ra) {
                rules.extend(ra.jwt_rules.iter());
            }
        }
        if rules.is_empty() {
            return InboundJwt::default();
        }
        rules.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        let cfg = config(&rules, &view.mesh.jwks);
        InboundJwt {
            filter: Some(HttpFilter {
                name: FILTER_NAME.into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(cfg))),
                ..Default::default()
            }),
        }
    }

    /// Puts the filter first in `hcm`'s chain (call after the RBAC filters are placed).
    pub fn apply_http(&self, hcm: &mut HttpConnectionManager) {
        if let Some(f) = &self.filter {
            hcm.http_filters.insert(0, f.clone());
        }
    }
}

/// The `jwksUri`s of every RequestAuthentication in `resources` (what the control plane
/// must fetch).
pub fn jwks_uris(resources: &[weft_api::Resource]) -> BTreeSet<String> {
    resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::RequestAuthentication(ra) => Some(ra),
            _ => None,
        })
        .flat_map(|ra| ra.jwt_rules.iter().filter(|j| j.jwks.is_none()).filter_map(|j| j.jwks_uri.clone()))
        .collect()
}

fn selects(view: &MeshView<'_>, meta: &ObjectMeta, ra: &RequestAuthentication) -> bool {
    if ra.target_ref.is_some() || !ra.target_refs.is_empty() {
        return false;
    }
    let root = meta.namespace == view.mesh.root_namespace;
    if !root && meta.namespace != view.node.namespace {
        return false;
    }
    match &ra.selector {
        None => true,
        Some(sel) => sel.match_labels.iter().all(|(k, v)| view.node.labels.get(k) == Some(v)),
    }
}

fn config(rules: &[&JwtRule], fetched: &std::collections::BTreeMap<String, String>) -> JwtAuthentication {
    let mut providers = HashMap::new();
    let mut inner_and = Vec::new();
    let mut outer_or = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let name = format!("origins-{i}");
        let jwks = match (&rule.jwks, &rule.jwks_uri) {
            (Some(j), _) => j.clone(),
            (None, Some(uri)) => fetched.get(uri).cloned().unwrap_or_else(|| UNUSABLE_JWKS.to_string()),
            (None, None) => UNUSABLE_JWKS.to_string(),
        };
        let provider = JwtProvider {
            issuer: rule.issuer.clone(),
            audiences: rule.audiences.clone(),
            forward: rule.forward_original_token.unwrap_or(false),
            forward_payload_header: rule.output_payload_to_header.clone().unwrap_or_default(),
            payload_in_metadata: PAYLOAD_KEY.into(),
            normalize_payload_in_metadata: Some(jwt_provider::NormalizePayload {
                space_delimited_claims: vec!["permission".into(), "scope".into()],
            }),
            from_headers: rule
                .from_headers
                .iter()
                .map(|h| JwtHeader { name: h.name.clone(), value_prefix: h.prefix.clone().unwrap_or_default() })
                .collect(),
            from_params: rule.from_params.clone(),
            from_cookies: rule.from_cookies.clone(),
            claim_to_headers: rule
                .output_claim_to_headers
                .iter()
                .map(|c| JwtClaimToHeader {
                    header_name: c.header.clone(),
                    claim_name: c.claim.clone(),
                    ..Default::default()
                })
                .collect(),
            jwks_source_specifier: Some(jwt_provider::JwksSourceSpecifier::LocalJwks(DataSource {
                specifier: Some(data_source::Specifier::InlineString(jwks)),
                ..Default::default()
            })),
            ..Default::default()
        };
        providers.insert(name.clone(), provider);
        inner_and.push(any_of(vec![provider_req(&name), allow_missing()]));
        outer_or.push(provider_req(&name));
    }
    let requires = if inner_and.len() == 1 {
        inner_and.remove(0)
    } else {
        outer_or.push(JwtRequirement {
            requires_type: Some(jwt_requirement::RequiresType::RequiresAll(JwtRequirementAndList {
                requirements: inner_and,
            })),
        });
        any_of(outer_or)
    };
    JwtAuthentication {
        providers,
        rules: vec![RequirementRule {
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            requirement_type: Some(requirement_rule::RequirementType::Requires(requires)),
        }],
        bypass_cors_preflight: true,
        ..Default::default()
    }
}

fn provider_req(name: &str) -> JwtRequirement {
    JwtRequirement { requires_type: Some(jwt_requirement::RequiresType::ProviderName(name.into())) }
}

fn allow_missing() -> JwtRequirement {
    JwtRequirement { requires_type: Some(jwt_requirement::RequiresType::AllowMissing(Default::default())) }
}

fn any_of(requirements: Vec<JwtRequirement>) -> JwtRequirement {
    JwtRequirement {
        requires_type: Some(jwt_requirement::RequiresType::RequiresAny(JwtRequirementOrList { requirements })),
    }
}
