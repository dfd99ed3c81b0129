use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::{route::Action, FilterConfig, Route as RouteProto};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{fault_delay::FaultDelaySecifier, FaultDelay};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{fault_abort::ErrorType, FaultAbort, HttpFault};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use envoy_types::util::pack_any;

use super::*;
use crate::route::{Abort, FaultDecision, FaultPolicy};

fn fault(delay_pct: Option<(u32, i32)>, abort: Option<(ErrorType, u32, i32)>) -> HttpFault {
    HttpFault {
        delay: delay_pct.map(|(n, d)| FaultDelay {
            percentage: Some(FractionalPercent { numerator: n, denominator: d }),
            fault_delay_secifier: Some(FaultDelaySecifier::FixedDelay(PbDuration { seconds: 2, nanos: 0 })),
        }),
        abort: abort.map(|(e, n, d)| FaultAbort {
            percentage: Some(FractionalPercent { numerator: n, denominator: d }),
            error_type: Some(e),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn decide_at_0_50_and_100_percent() {
    let zero = FaultPolicy::compile(&fault(Some((0, 0)), Some((ErrorType::HttpStatus(503), 0, 0)))).unwrap();
    for r in 0..200 {
        assert_eq!(zero.decide(r, r), FaultDecision::default());
    }
    let full = FaultPolicy::compile(&fault(Some((100, 0)), Some((ErrorType::HttpStatus(503), 100, 0)))).unwrap();
    for r in [0, 1, 99, u64::MAX] {
        let d = full.decide(r, r);
        assert_eq!(d.delay, Some(Duration::from_secs(2)));
        assert_eq!(d.abort, Some(Abort::Http(http::StatusCode::SERVICE_UNAVAILABLE)));
    }
    // 50% as 5000/10000 for the delay and 500000/1000000 for the abort, independent randoms.
    let half = FaultPolicy::compile(&fault(Some((5000, 1)), Some((ErrorType::GrpcStatus(14), 500_000, 2)))).unwrap();
    assert_eq!(half.decide(4999, 1_000_000).delay, Some(Duration::from_secs(2)));
    assert_eq!(half.decide(5000, 0).delay, None);
    assert_eq!(half.decide(0, 499_999).abort, Some(Abort::Grpc(14)));
    assert_eq!(half.decide(0, 500_000).abort, None);
    let delayed = (0..10_000u64).filter(|r| half.decide(*r, 0).delay.is_some()).count();
    assert_eq!(delayed, 5000);
}

#[test]
fn from_any_checks_type_url_and_fault_is_read_from_route_config() {
    let f = fault(None, Some((ErrorType::HttpStatus(418), 100, 0)));
    assert!(FaultPolicy::from_any(&pack_any(f.clone())).is_ok());
    let wrong = pack_any(FractionalPercent::default());
    assert!(FaultPolicy::from_any(&wrong).unwrap_err().contains("expected"));

    let mut r = route("f", prefix("/f"));
    r.typed_per_filter_config.insert("envoy.filters.http.fault".into(), pack_any(f.clone()));
    let mut disabled = route("off", prefix("/off"));
    disabled.typed_per_filter_config.insert(
        "envoy.filters.http.fault".into(),
        pack_any(FilterConfig { config: None, is_optional: false, disabled: true }),
    );
    let mut vh = vhost("vh", &["*"], vec![r, disabled, route("inherit", prefix("/"))]);
    vh.typed_per_filter_config
        .insert("envoy.filters.http.fault".into(), pack_any(fault(None, Some((ErrorType::HttpStatus(500), 100, 0)))));
    let t = RouteTable::compile(&rc(vec![vh])).unwrap();
    let abort = |p: &str| {
        t.select_with_random("h", &parts("GET", p, &[]), 0).unwrap().fault.as_ref().and_then(|f| f.decide(0, 0).abort)
    };
    assert_eq!(abort("/f"), Some(Abort::Http(http::StatusCode::IM_A_TEAPOT)));
    assert_eq!(abort("/off"), None);
    assert_eq!(abort("/x"), Some(Abort::Http(http::StatusCode::INTERNAL_SERVER_ERROR)));
}

#[test]
fn unsupported_fault_fields_are_rejected() {
    let mut f = fault(None, Some((ErrorType::HttpStatus(503), 100, 0)));
    f.upstream_cluster = "c".into();
    assert!(FaultPolicy::compile(&f).unwrap_err().contains("upstream_cluster"));
    let bad_status = fault(None, Some((ErrorType::HttpStatus(700), 100, 0)));
    assert!(FaultPolicy::compile(&bad_status).unwrap_err().contains("abort.http_status"));
    // A bad fault config is a route compile error naming the filter.
    let mut r: RouteProto = route("f", prefix("/"));
    r.typed_per_filter_config.insert("envoy.filters.http.fault".into(), pack_any(bad_status));
    let err = RouteTable::compile(&rc(vec![vhost("vh", &["*"], vec![r])])).unwrap_err();
    assert_eq!(err.field, "virtual_hosts[0].routes[0].typed_per_filter_config[envoy.filters.http.fault]");
    assert!(matches!(route("x", prefix("/")).action, Some(Action::Route(_))));
}

#[test]
fn fault_headers_restrict_which_requests_are_faulted() {
    use envoy_types::pb::envoy::config::route::v3::{header_matcher::HeaderMatchSpecifier, HeaderMatcher};
    let mut f = fault(None, Some((ErrorType::HttpStatus(503), 100, 0)));
    f.headers = vec![HeaderMatcher {
        name: "x-chaos".into(),
        header_match_specifier: Some(HeaderMatchSpecifier::ExactMatch("on".into())),
        ..Default::default()
    }];
    let p = FaultPolicy::compile(&f).unwrap();
    assert!(p.applies_to(&parts("GET", "/", &[("x-chaos", "on")]).headers));
    assert!(!p.applies_to(&parts("GET", "/", &[]).headers));
}
