//! Every Istio sample in the repository's conformance set (`samples/`, see
//! `samples/README.md`) parses without error, and parsed values match what the files say.

use std::time::Duration;

use weft_api::spec::{AuthzAction, ClientTlsMode, MtlsMode, SimpleLb, StringMatch, TargetPort};
use weft_api::{parse_dir, parse_file, Kind, Parsed, Resource, Spec};
use weft_testkit::conformance_dir;

fn file(rel: &str) -> Parsed {
    let p = parse_file(&conformance_dir().join(rel));
    assert!(p.errors.is_empty(), "{rel}: {:#?}", p.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>());
    p
}

fn find<'a>(p: &'a Parsed, kind: Kind, name: &str) -> &'a Resource {
    p.resources
        .iter()
        .find(|r| r.kind == kind && r.meta.name == name)
        .unwrap_or_else(|| panic!("{kind} {name} not found"))
}

#[test]
fn every_conformance_file_parses_without_errors() {
    let p = parse_dir(&conformance_dir());
    let errs: Vec<String> = p.errors.iter().map(|e| e.to_string()).collect();
    assert!(errs.is_empty(), "{errs:#?}");
    assert!(p.resources.len() > 60, "only {} resources", p.resources.len());
    // Bookinfo's Deployments and ServiceAccounts are skipped, not errors.
    assert!(p.skipped.iter().any(|s| s.kind == "Deployment" && s.name == "reviews-v2"));
    assert!(p.skipped.iter().any(|s| s.kind == "ServiceAccount" && s.name == "bookinfo-reviews"));
    for k in [
        Kind::Service,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::ServiceEntry,
        Kind::Gateway,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
    ] {
        assert!(p.resources.iter().any(|r| r.kind == k), "no {k} parsed");
    }
}

#[test]
fn weights_are_parsed() {
    let p = file("bookinfo/networking/virtual-service-reviews-80-20.yaml");
    let Spec::VirtualService(vs) = &find(&p, Kind::VirtualService, "reviews").spec else { panic!() };
    let w: Vec<_> = vs.http[0].route.iter().map(|d| (d.destination.subset.clone(), d.weight)).collect();
    assert_eq!(w, vec![(Some("v1".into()), Some(80)), (Some("v2".into()), Some(20))]);
    assert_eq!(vs.hosts, vec!["reviews".to_string()]);
}

#[test]
fn header_matches_and_first_match_order_are_kept() {
    let p = file("bookinfo/networking/virtual-service-reviews-test-v2.yaml");
    let Spec::VirtualService(vs) = &find(&p, Kind::VirtualService, "reviews").spec else { panic!() };
    assert_eq!(vs.http.len(), 2);
    assert_eq!(vs.http[0].matches[0].headers.get("end-user"), Some(&StringMatch::Exact("jason".into())));
    assert_eq!(vs.http[0].route[0].destination.subset.as_deref(), Some("v2"));
    assert!(vs.http[1].matches.is_empty(), "second route is the default route");
}

#[test]
fn gateway_uri_matches_are_parsed() {
    let p = file("bookinfo/networking/bookinfo-gateway.yaml");
    let Spec::Gateway(gw) = &find(&p, Kind::Gateway, "bookinfo-gateway").spec else { panic!() };
    assert_eq!(gw.selector.get("istio").map(String::as_str), Some("ingressgateway"));
    assert_eq!(gw.servers[0].port.number, 8080);
    let Spec::VirtualService(vs) = &find(&p, Kind::VirtualService, "bookinfo").spec else { panic!() };
    let uris: Vec<_> = vs.http[0].matches.iter().filter_map(|m| m.uri.clone()).collect();
    assert_eq!(uris[0], StringMatch::Exact("/productpage".into()));
    assert_eq!(uris[1], StringMatch::Prefix("/static".into()));
    assert_eq!(vs.http[0].route[0].destination.port.map(|p| p.number), Some(9080));
}

#[test]
fn faults_delays_and_timeouts_are_parsed() {
    let p = file("bookinfo/networking/virtual-service-ratings-test-delay.yaml");
    let Spec::VirtualService(vs) = &find(&p, Kind::VirtualService, "ratings").spec else { panic!() };
    let delay = vs.http[0].fault.as_ref().and_then(|f| f.delay.as_ref()).expect("delay");
    assert_eq!(delay.fixed_delay.map(|d| d.0), Some(Duration::from_secs(7)));
    assert_eq!(delay.percentage.map(|p| p.value), Some(100.0));

    let p = file("bookinfo/networking/fault-injection-details-v1.yaml");
    let Spec::VirtualService(vs) = &find(&p, Kind::VirtualService, "details").spec else { panic!() };
    let abort = vs.http[0].fault.as_ref().and_then(|f| f.abort.as_ref()).expect("abort");
    assert_eq!(abort.http_status, Some(555));

    let p = file("tasks/traffic-management/request-timeouts-reviews-timeout-0.5s.yaml");
    let Spec::VirtualService(vs) = &find(&p, Kind::VirtualService, "reviews").spec else { panic!() };
    assert_eq!(vs.http[0].timeout.map(|d| d.0), Some(Duration::from_millis(500)));

    let p = file("tasks/traffic-management/request-timeouts-ratings-delay-2s.yaml");
    let Spec::VirtualService(vs) = &find(&p, Kind::VirtualService, "ratings").spec else { panic!() };
    let delay = vs.http[0].fault.as_ref().and_then(|f| f.delay.as_ref()).expect("delay");
    assert_eq!(delay.percent, Some(100));
}

#[test]
fn subsets_and_traffic_policies_are_parsed() {
    let p = file("bookinfo/networking/destination-rule-all-mtls.yaml");
    let Spec::DestinationRule(dr) = &find(&p, Kind::DestinationRule, "ratings").spec else { panic!() };
    let names: Vec<_> = dr.subsets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["v1", "v2", "v2-mysql", "v2-mysql-vm"]);
    assert_eq!(dr.subsets[0].labels.get("version").map(String::as_str), Some("v1"));
    let tls = dr.traffic_policy.as_ref().and_then(|t| t.tls.as_ref()).expect("tls");
    assert_eq!(tls.mode, ClientTlsMode::IstioMutual);

    let p = file("bookinfo/networking/destination-rule-reviews.yaml");
    let Spec::DestinationRule(dr) = &find(&p, Kind::DestinationRule, "reviews").spec else { panic!() };
    let lb = dr.traffic_policy.as_ref().and_then(|t| t.load_balancer.as_ref()).expect("lb");
    assert_eq!(lb.simple, Some(SimpleLb::Random));

    let p = file("tasks/traffic-management/circuit-breaking-httpbin-destination-rule.yaml");
    let Spec::DestinationRule(dr) = &find(&p, Kind::DestinationRule, "httpbin").spec else { panic!() };
    let tp = dr.traffic_policy.as_ref().expect("policy");
    let od = tp.outlier_detection.as_ref().expect("outlier");
    assert_eq!(od.base_ejection_time.map(|d| d.0), Some(Duration::from_secs(180)));
    assert_eq!(od.interval.map(|d| d.0), Some(Duration::from_secs(1)));
    assert_eq!(od.consecutive_5xx_errors, Some(1));
    let http = tp.connection_pool.as_ref().and_then(|c| c.http.as_ref()).expect("http pool");
    assert_eq!(http.http1_max_pending_requests, Some(1));
}

#[test]
fn services_ports_and_selectors_are_parsed() {
    let p = file("tasks/traffic-management/mirroring-httpbin-service.yaml");
    let Spec::Service(s) = &find(&p, Kind::Service, "httpbin").spec else { panic!() };
    assert_eq!(s.ports[0].port, 8000);
    assert_eq!(s.ports[0].target_port, Some(TargetPort::Number(80)));
    assert_eq!(s.selector.get("app").map(String::as_str), Some("httpbin"));

    let p = file("bookinfo/platform/kube/bookinfo.yaml");
    let r = find(&p, Kind::Service, "productpage");
    assert_eq!(r.meta.namespace, "default");
    let Spec::Service(s) = &r.spec else { panic!() };
    assert_eq!(s.ports[0].name.as_deref(), Some("http"));
    assert_eq!(s.ports[0].port, 9080);
}

#[test]
fn service_entries_and_tcp_routes_are_parsed() {
    let p = file("bookinfo/networking/egress-rule-google-apis.yaml");
    let Spec::ServiceEntry(se) = &find(&p, Kind::ServiceEntry, "googleapis").spec else { panic!() };
    assert_eq!(se.hosts, vec!["www.googleapis.com".to_string()]);
    assert_eq!(se.ports.iter().map(|p| p.number).collect::<Vec<_>>(), [80, 443]);
    assert_eq!(se.resolution, Some(weft_api::spec::Resolution::Dns));

    let p = file("tasks/traffic-management/tcp-echo-20-v2.yaml");
    let Spec::VirtualService(vs) = &find(&p, Kind::VirtualService, "tcp-echo").spec else { panic!() };
    assert_eq!(vs.tcp[0].matches[0].port, Some(31400));
    assert_eq!(vs.tcp[0].route.iter().map(|r| r.weight).collect::<Vec<_>>(), [Some(80), Some(20)]);
}

#[test]
fn authorization_rules_and_peer_authentication_are_parsed() {
    let p = file("tasks/security/authz-deny-method-get-unless-x-token-admin.yaml");
    let r = find(&p, Kind::AuthorizationPolicy, "deny-method-get");
    assert_eq!(r.meta.namespace, "foo");
    let Spec::AuthorizationPolicy(ap) = &r.spec else { panic!() };
    assert_eq!(ap.action, AuthzAction::Deny);
    assert_eq!(ap.rules[0].to[0].operation.methods, ["GET"]);
    assert_eq!(ap.rules[0].when[0].key, "request.headers[x-token]");
    assert_eq!(ap.rules[0].when[0].not_values, ["admin"]);
    let sel = ap.selector.as_ref().expect("selector");
    assert_eq!(sel.match_labels.get("app").map(String::as_str), Some("httpbin"));

    let p = file("tasks/security/authz-http-details-viewer.yaml");
    let Spec::AuthorizationPolicy(ap) = &find(&p, Kind::AuthorizationPolicy, "details-viewer").spec else { panic!() };
    assert_eq!(ap.action, AuthzAction::Allow);
    assert_eq!(ap.rules[0].from[0].source.principals, ["cluster.local/ns/default/sa/bookinfo-productpage"]);

    let p = file("tasks/security/authz-http-deny-all.yaml");
    let Spec::AuthorizationPolicy(ap) = &find(&p, Kind::AuthorizationPolicy, "deny-all").spec else { panic!() };
    assert!(ap.rules.is_empty() && ap.selector.is_none());

    let p = file("tasks/security/authz-dry-run-deny-path-headers.yaml");
    let r = find(&p, Kind::AuthorizationPolicy, "deny-path-headers");
    assert_eq!(r.meta.annotations.get("istio.io/dry-run").map(String::as_str), Some("true"));

    let p = file("tasks/security/mtls-migration-namespace-foo-strict.yaml");
    let Spec::PeerAuthentication(pa) = &find(&p, Kind::PeerAuthentication, "default").spec else { panic!() };
    assert_eq!(pa.mtls.and_then(|m| m.mode), Some(MtlsMode::Strict));
}

#[test]
fn mirroring_is_parsed() {
    let p = file("tasks/traffic-management/mirroring-mirror-v2.yaml");
    let Spec::VirtualService(vs) = &find(&p, Kind::VirtualService, "httpbin").spec else { panic!() };
    let m = vs.http[0].mirror.as_ref().expect("mirror");
    assert_eq!((m.host.as_str(), m.subset.as_deref()), ("httpbin", Some("v2")));
    assert_eq!(vs.http[0].mirror_percentage.map(|p| p.value), Some(100.0));
}

/// Every prefix of every sample (cut mid-token, mid-document) yields resources
/// and errors, never a panic, and every error has a line inside the text.
#[test]
fn truncated_samples_never_panic_and_errors_point_inside_the_text() {
    let mut files = Vec::new();
    let mut stack = vec![conformance_dir()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read conformance dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                files.push(p);
            }
        }
    }
    assert!(files.len() > 40);
    let mut errors_seen = 0;
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read sample");
        let lines = text.lines().count().max(1);
        for cut in (0..text.len()).step_by(13).filter(|c| text.is_char_boundary(*c)) {
            let p = weft_api::parse_str(&text[..cut], &f);
            for e in &p.errors {
                assert!(e.line >= 1 && e.line <= lines + 1, "{e} (file has {lines} lines)");
            }
            errors_seen += p.errors.len();
        }
    }
    assert!(errors_seen > 0, "truncation must produce some errors");
}
