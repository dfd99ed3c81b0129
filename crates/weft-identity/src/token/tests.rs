use std::os::unix::fs::PermissionsExt as _;

use super::*;

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn a_token_grants_its_namespace_and_service_account() {
    let issuer = TokenIssuer::ephemeral().expect("issuer");
    let t = issuer.create("bookinfo", "reviews", HOUR).expect("token");
    assert!(t.token.starts_with("weft-jt1."));
    let grant = issuer.verify(&t.token).expect("valid");
    assert_eq!(grant.namespace, "bookinfo");
    assert_eq!(grant.service_account, "reviews");
    assert_eq!(grant.token_id, t.id);
    assert_eq!(
        grant.spiffe_id("cluster.local").expect("id").to_string(),
        "spiffe://cluster.local/ns/bookinfo/sa/reviews"
    );
}

#[test]
fn an_expired_token_is_refused_with_its_id() {
    let issuer = TokenIssuer::ephemeral().expect("issuer");
    let now = unix(SystemTime::now());
    let token = issuer
        .sign(&Payload { id: "00aa".into(), ns: "default".into(), sa: "web".into(), iat: now - 7200, exp: now - 3600 })
        .expect("sign");
    let err = issuer.verify(&token).expect_err("expired");
    assert!(matches!(err, IdentityError::TokenExpired { ref id, .. } if id == "00aa"), "{err}");
    assert!(err.to_string().contains("token 00aa expired at"), "{err}");
}

#[test]
fn a_tampered_token_is_refused() {
    let issuer = TokenIssuer::ephemeral().expect("issuer");
    let t = issuer.create("default", "web", HOUR).expect("token");
    // Same signature, payload rewritten to another service account.
    let parts: Vec<&str> = t.token.split('.').collect();
    let mut payload: serde_json::Value = serde_json::from_slice(&B64.decode(parts[1]).expect("b64")).expect("json");
    payload["sa"] = "admin".into();
    let forged = format!("{}.{}.{}", parts[0], B64.encode(payload.to_string()), parts[2]);
    assert!(matches!(issuer.verify(&forged), Err(IdentityError::TokenSignature)));
    // A token from another control plane (another key).
    let other = TokenIssuer::ephemeral().expect("issuer");
    assert!(matches!(other.verify(&t.token), Err(IdentityError::TokenSignature)));
    // Garbage.
    for bad in ["", "weft-jt1.abc", "weft-jt2.a.b", "weft-jt1.!!.!!", "a.b.c.d"] {
        let err = issuer.verify(bad).expect_err(bad);
        assert!(matches!(err, IdentityError::TokenMalformed(_) | IdentityError::TokenSignature), "{bad}: {err}");
    }
}

#[test]
fn a_revoked_token_is_refused_after_a_restart_and_by_another_process() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let issuer = TokenIssuer::load_or_create(tmp.path()).expect("issuer");
    assert_eq!(std::fs::metadata(tmp.path().join("token-key")).expect("key").permissions().mode() & 0o777, 0o600);
    let a = issuer.create("default", "web", HOUR).expect("token");
    let b = issuer.create("default", "web", HOUR).expect("token");
    assert!(issuer.revoke(&a.id, None).expect("revoke"));
    assert!(!issuer.revoke(&a.id, None).expect("again"), "second revoke reports it already was");
    let err = issuer.verify(&a.token).expect_err("revoked");
    assert!(err.to_string().contains(&format!("token {} is revoked", a.id)), "{err}");
    issuer.verify(&b.token).expect("the other token still works");

    // Same data directory, same key and revocations after a restart.
    let restarted = TokenIssuer::load_or_create(tmp.path()).expect("reload");
    assert!(matches!(restarted.verify(&a.token), Err(IdentityError::TokenRevoked { .. })));
    restarted.verify(&b.token).expect("key persisted");

    // A revocation written by another issuer on the same directory (the CLI while the
    // control plane runs) reaches the running one.
    assert!(restarted.revoke(&b.id, None).expect("revoke b"));
    assert!(matches!(issuer.verify(&b.token), Err(IdentityError::TokenRevoked { .. })));
}

#[test]
fn kubernetes_tokens_are_recognised_but_not_supported_yet() {
    let issuer = TokenIssuer::ephemeral().expect("issuer");
    let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDp3ZWIifQ.c2ln";
    let cred = Credential::from_bearer(jwt).expect("classified");
    assert_eq!(cred.kind(), "k8s-sa-token");
    let err = issuer.verify_credential(&cred).expect_err("unsupported");
    assert!(err.to_string().contains("not supported without Kubernetes"), "{err}");
    let t = issuer.create("default", "web", HOUR).expect("token");
    let cred = Credential::from_bearer(&t.token).expect("classified");
    assert_eq!(cred.kind(), "join-token");
    issuer.verify_credential(&cred).expect("join token verifies");
    assert!(Credential::from_bearer("hunter2").is_err());
}

#[test]
fn tokens_are_only_issued_for_valid_names() {
    let issuer = TokenIssuer::ephemeral().expect("issuer");
    assert!(issuer.create("Bad Namespace", "web", HOUR).is_err());
    assert!(issuer.create("default", "", HOUR).is_err());
    assert!(issuer.create("default", "web", Duration::ZERO).is_err());
}

#[test]
fn token_ttls_over_the_maximum_are_refused_and_absurd_ones_do_not_overflow() {
    let issuer = TokenIssuer::ephemeral().expect("issuer");
    assert_eq!(issuer.max_ttl(), DEFAULT_MAX_TOKEN_TTL);
    assert!(issuer.create("default", "web", DEFAULT_MAX_TOKEN_TTL).is_ok(), "the maximum itself is granted");
    for ttl in [
        DEFAULT_MAX_TOKEN_TTL + Duration::from_secs(1),
        Duration::from_secs(99_999_999_999_999),
        Duration::from_secs(u64::MAX),
        Duration::MAX,
    ] {
        let err = issuer.create("default", "web", ttl).expect_err("over the maximum");
        assert!(matches!(err, IdentityError::TtlTooLong { what: "token", .. }), "{err}");
        assert!(err.to_string().contains("max allowed TTL 7776000s (--max-token-ttl)"), "{err}");
    }
    let short = TokenIssuer::ephemeral().expect("issuer").with_max_ttl(HOUR);
    assert!(short.create("default", "web", HOUR * 2).is_err());
    assert!(short.create("default", "web", HOUR).is_ok());
    // Even a maximum too large for the clock refuses cleanly instead of panicking.
    let unbounded = TokenIssuer::ephemeral().expect("issuer").with_max_ttl(Duration::MAX);
    let err = unbounded.create("default", "web", Duration::MAX).expect_err("past the clock's range");
    assert!(matches!(err, IdentityError::TtlTooLong { .. }), "{err}");
}
