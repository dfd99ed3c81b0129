use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, retry_policy::RetryBackOff, HeaderMatcher, RetryPolicy as RetryPolicyProto,
};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use http::StatusCode;

use crate::error::{ErrorKind, ProxyError};
use crate::route::RetryPolicy;

fn policy(retry_on: &str) -> RetryPolicy {
    RetryPolicy::compile(
        &RetryPolicyProto {
            retry_on: retry_on.into(),
            retriable_status_codes: vec![418],
            retriable_headers: vec![HeaderMatcher {
                name: "x-retry-me".into(),
                header_match_specifier: Some(HeaderMatchSpecifier::PresentMatch(true)),
                ..Default::default()
            }],
            ..Default::default()
        },
        "retry_policy",
    )
    .unwrap()
}

fn hdrs(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, http::HeaderValue::from_static(v));
    }
    h
}

fn status(p: &RetryPolicy, code: u16) -> bool {
    p.retry_on_response(StatusCode::from_u16(code).unwrap(), &http::HeaderMap::new())
}

#[test]
fn status_tokens_decision_table() {
    // (token, statuses retried, statuses not retried)
    let table: &[(&str, &[u16], &[u16])] = &[
        ("5xx", &[500, 502, 503, 504, 599], &[200, 409, 418, 499]),
        ("gateway-error", &[502, 503, 504], &[500, 501, 409]),
        ("retriable-4xx", &[409], &[400, 404, 500]),
        ("retriable-status-codes", &[418], &[500, 409]),
        ("reset", &[], &[500, 503]),
        ("connect-failure", &[], &[503]),
        ("refused-stream", &[], &[503]),
        ("", &[], &[500]),
    ];
    for (token, yes, no) in table {
        let p = policy(token);
        for c in *yes {
            assert!(status(&p, *c), "{token} should retry {c}");
        }
        for c in *no {
            assert!(!status(&p, *c), "{token} should not retry {c}");
        }
    }
}

#[test]
fn grpc_tokens_read_grpc_status_from_headers() {
    let table = [
        ("cancelled", "1"),
        ("deadline-exceeded", "4"),
        ("resource-exhausted", "8"),
        ("internal", "13"),
        ("unavailable", "14"),
    ];
    for (token, code) in table {
        let p = policy(token);
        assert!(p.retry_on_response(StatusCode::OK, &hdrs(&[("grpc-status", code)])), "{token}");
        for (_, other) in table.iter().filter(|(t, _)| *t != token) {
            assert!(!p.retry_on_response(StatusCode::OK, &hdrs(&[("grpc-status", other)])), "{token} vs {other}");
        }
        assert!(!p.retry_on_response(StatusCode::OK, &hdrs(&[("grpc-status", "0")])));
        assert!(!p.retry_on_response(StatusCode::OK, &http::HeaderMap::new()));
    }
}

#[test]
fn retriable_headers_and_ratelimited_responses() {
    let p = policy("retriable-headers");
    assert!(p.retry_on_response(StatusCode::OK, &hdrs(&[("x-retry-me", "1")])));
    assert!(!p.retry_on_response(StatusCode::OK, &http::HeaderMap::new()));
    // x-envoy-ratelimited is retried only under envoy-ratelimited, even on a 503 with 5xx.
    let p = policy("5xx");
    assert!(!p.retry_on_response(StatusCode::SERVICE_UNAVAILABLE, &hdrs(&[("x-envoy-ratelimited", "true")])));
    let p = policy("envoy-ratelimited");
    assert!(p.retry_on_response(StatusCode::TOO_MANY_REQUESTS, &hdrs(&[("x-envoy-ratelimited", "true")])));
}

#[test]
fn error_kinds_decision_table() {
    use ErrorKind::*;
    let retried = |token: &str, kind: ErrorKind| policy(token).retry_on_error(&ProxyError::new(kind, "t"));
    for token in ["5xx", "gateway-error", "reset"] {
        for kind in [ConnectFailure, UpstreamReset, RefusedStream, UpstreamTerminated, PerTryTimeout] {
            assert!(retried(token, kind), "{token} should retry {kind:?}");
        }
        for kind in [Timeout, Overflow, NoRoute, NoHealthyUpstream, DownstreamClosed, FaultAbort, RetriesExhausted] {
            assert!(!retried(token, kind), "{token} should not retry {kind:?}");
        }
    }
    assert!(retried("connect-failure", ConnectFailure));
    assert!(!retried("connect-failure", UpstreamReset));
    assert!(!retried("connect-failure", PerTryTimeout));
    assert!(retried("refused-stream", RefusedStream));
    assert!(!retried("refused-stream", UpstreamReset));
    assert!(!retried("retriable-4xx", UpstreamReset));
    let p = policy("reset-before-request");
    assert!(p.retry_on_error(&ProxyError::new(UpstreamReset, "t").not_sent()));
    assert!(!p.retry_on_error(&ProxyError::new(UpstreamReset, "t")));
}

#[test]
fn backoff_defaults_and_bounds() {
    let p = policy("5xx");
    assert_eq!(p.num_retries, 1);
    assert_eq!(p.base_interval, Duration::from_millis(25));
    assert_eq!(p.max_interval, Duration::from_millis(250));
    // Upper bound of attempt n is min(25ms * 2^n, 250ms), exclusive.
    let bounds = [25u64, 50, 100, 200, 250, 250, 250];
    for (attempt, bound) in bounds.iter().enumerate() {
        let attempt = attempt as u32;
        let max = (0..1000u64).map(|r| p.backoff(attempt, r)).max().unwrap();
        assert_eq!(max, Duration::from_millis(bound - 1), "attempt {attempt}");
        assert_eq!(p.backoff(attempt, *bound), Duration::ZERO);
    }
    // Huge attempt numbers do not overflow.
    assert!(p.backoff(200, u64::MAX) < Duration::from_millis(250));
}

#[test]
fn backoff_configured_intervals() {
    let p = RetryPolicy::compile(
        &RetryPolicyProto {
            retry_back_off: Some(RetryBackOff {
                base_interval: Some(PbDuration { seconds: 0, nanos: 100_000_000 }),
                max_interval: None,
            }),
            ..Default::default()
        },
        "rp",
    )
    .unwrap();
    assert_eq!(p.max_interval, Duration::from_secs(1));
    assert_eq!(p.backoff(0, 99), Duration::from_millis(99));
    assert_eq!(p.backoff(5, 999), Duration::from_millis(999));
    let err = RetryPolicy::compile(
        &RetryPolicyProto {
            retry_back_off: Some(RetryBackOff {
                base_interval: Some(PbDuration { seconds: 1, nanos: 0 }),
                max_interval: Some(PbDuration { seconds: 0, nanos: 5 }),
            }),
            ..Default::default()
        },
        "rp",
    )
    .unwrap_err();
    assert_eq!(err.0, "rp.retry_back_off.max_interval");
}

#[test]
fn retriable_request_headers_gate_retries() {
    let p = RetryPolicy::compile(
        &RetryPolicyProto {
            retry_on: "5xx".into(),
            retriable_request_headers: vec![
                HeaderMatcher {
                    name: ":method".into(),
                    header_match_specifier: Some(HeaderMatchSpecifier::ExactMatch("GET".into())),
                    ..Default::default()
                },
                HeaderMatcher {
                    name: "x-idempotent".into(),
                    header_match_specifier: Some(HeaderMatchSpecifier::PresentMatch(true)),
                    ..Default::default()
                },
            ],
            ..Default::default()
        },
        "rp",
    )
    .unwrap();
    let req = |m: &str, h: &[(&str, &str)]| super::parts(m, "/", h);
    assert!(p.request_is_retriable(&req("GET", &[])));
    assert!(p.request_is_retriable(&req("POST", &[("x-idempotent", "1")])));
    assert!(!p.request_is_retriable(&req("POST", &[])));
    assert!(policy("5xx").request_is_retriable(&req("POST", &[])));
}
