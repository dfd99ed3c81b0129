#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{data_source, http_uri, DataSource, HttpUri};
use envoy_types::pb::envoy::config::route::v3::{route_match, RouteMatch};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    jwt_provider, jwt_requirement, requirement_rule, JwtAuthentication, JwtProvider, JwtRequirement, RemoteJwks,
    RequirementRule,
};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use envoy_types::util::pack_any;
use serde_json::json;
use weft_testkit::jwt::{JwksServer, JwtSigner};

use super::{JwtFilter, Status};
use crate::rbac::RequestAuth;

const ISS: &str = "https://issuer.example";

fn config(jwks: jwt_provider::JwksSourceSpecifier, requires: JwtRequirement) -> JwtAuthentication {
    let provider = JwtProvider { issuer: ISS.into(), jwks_source_specifier: Some(jwks), ..Default::default() };
    JwtAuthentication {
        providers: HashMap::from([("p".to_string(), provider)]),
        rules: vec![RequirementRule {
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/secure".into())),
                ..Default::default()
            }),
            requirement_type: Some(requirement_rule::RequirementType::Requires(requires)),
        }],
        ..Default::default()
    }
}

fn provider_p() -> JwtRequirement {
    JwtRequirement { requires_type: Some(jwt_requirement::RequiresType::ProviderName("p".into())) }
}

fn inline(jwks: String) -> jwt_provider::JwksSourceSpecifier {
    jwt_provider::JwksSourceSpecifier::LocalJwks(DataSource {
        specifier: Some(data_source::Specifier::InlineString(jwks)),
        ..Default::default()
    })
}

fn parts(path: &str, token: Option<&str>) -> http::request::Parts {
    let mut b = http::Request::builder().uri(path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(()).unwrap().into_parts().0
}

async fn run(f: &JwtFilter, path: &str, token: Option<&str>) -> Result<http::request::Parts, Status> {
    let mut p = parts(path, token);
    f.authenticate(&mut p, "svc").await.map(|_| p).map_err(|d| d.status)
}

#[tokio::test]
async fn provider_requirement_needs_a_token_and_fills_request_auth() {
    let signer = JwtSigner::es256("k").unwrap();
    let f = JwtFilter::from_any(&pack_any(config(inline(signer.jwks()), provider_p())), "jwt").unwrap();
    assert_eq!(run(&f, "/secure", None).await.unwrap_err(), Status::JwtMissed);
    // Paths no rule matches are not checked.
    assert!(run(&f, "/open", None).await.is_ok());
    let token = signer.token(ISS, "alice", 60, json!({"aud": ["a", "b"], "azp": "web", "scope": "x y"})).unwrap();
    let p = run(&f, "/secure", Some(&token)).await.unwrap();
    let auth = p.extensions.get::<RequestAuth>().unwrap();
    assert_eq!(auth.principal.as_deref(), Some("https://issuer.example/alice"));
    assert_eq!(auth.audiences, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(auth.presenter.as_deref(), Some("web"));
    assert!(p.headers.get("authorization").is_none(), "token removed without forward");
    // Not yet valid, and within the default 60 s clock skew.
    let later = signer.sign(&json!({"iss": ISS, "sub": "a", "nbf": weft_testkit::jwt::now() + 600})).unwrap();
    assert_eq!(run(&f, "/secure", Some(&later)).await.unwrap_err(), Status::JwtNotYetValid);
    let skewed = signer.token(ISS, "alice", -30, json!({})).unwrap();
    assert!(run(&f, "/secure", Some(&skewed)).await.is_ok());
    // A key with another kid.
    let other = JwtSigner::es256("other-kid").unwrap();
    let t = other.token(ISS, "alice", 60, json!({})).unwrap();
    assert_eq!(run(&f, "/secure", Some(&t)).await.unwrap_err(), Status::JwksKidAlgMismatch);
}

#[tokio::test]
async fn remote_jwks_is_fetched_once_and_cached() {
    let signer = JwtSigner::es256("k").unwrap();
    let server = JwksServer::start(signer.jwks()).await.unwrap();
    let remote = RemoteJwks {
        http_uri: Some(HttpUri {
            uri: server.uri(),
            http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster("jwks".into())),
            timeout: Some(PbDuration { seconds: 2, nanos: 0 }),
        }),
        cache_duration: Some(PbDuration { seconds: 300, nanos: 0 }),
        ..Default::default()
    };
    let f = JwtFilter::from_any(
        &pack_any(config(jwt_provider::JwksSourceSpecifier::RemoteJwks(remote), provider_p())),
        "jwt",
    )
    .unwrap();
    let token = signer.token(ISS, "alice", 60, json!({})).unwrap();
    for _ in 0..3 {
        assert!(run(&f, "/secure", Some(&token)).await.is_ok());
    }
    assert_eq!(server.hits(), 1, "cached for cache_duration");

    // An unreachable key server: tokens fail with Envoy's fetch status.
    let dead = weft_testkit::net::reserve_addr();
    let remote = RemoteJwks {
        http_uri: Some(HttpUri {
            uri: format!("http://{dead}/jwks"),
            timeout: Some(PbDuration { seconds: 1, nanos: 0 }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let f = JwtFilter::from_any(
        &pack_any(config(jwt_provider::JwksSourceSpecifier::RemoteJwks(remote), provider_p())),
        "jwt",
    )
    .unwrap();
    assert_eq!(run(&f, "/secure", Some(&token)).await.unwrap_err(), Status::JwksFetchFail);
}

#[test]
fn unsupported_fields_are_refused_with_their_path() {
    let signer = JwtSigner::es256("k").unwrap();
    let mut cfg = config(inline(signer.jwks()), provider_p());
    cfg.providers.get_mut("p").unwrap().max_lifetime = Some(PbDuration { seconds: 1, nanos: 0 });
    let (field, msg) = JwtFilter::from_any(&pack_any(cfg), "jwt").unwrap_err();
    assert_eq!(field, "providers[p].max_lifetime", "{msg}");

    let cfg = config(
        inline(signer.jwks()),
        JwtRequirement { requires_type: Some(jwt_requirement::RequiresType::ProviderName("nope".into())) },
    );
    let (field, _) = JwtFilter::from_any(&pack_any(cfg), "jwt").unwrap_err();
    assert_eq!(field, "rules[0].requires.provider_name");

    let remote = RemoteJwks {
        http_uri: Some(HttpUri { uri: "https://keys.example/jwks".into(), ..Default::default() }),
        ..Default::default()
    };
    let cfg = config(jwt_provider::JwksSourceSpecifier::RemoteJwks(remote), provider_p());
    let (field, _) = JwtFilter::from_any(&pack_any(cfg), "jwt").unwrap_err();
    assert_eq!(field, "providers[p].remote_jwks.http_uri.uri");
}
