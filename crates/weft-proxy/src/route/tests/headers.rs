use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::BoolValue;

use super::*;

fn hvo(k: &str, v: &str, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: k.into(), value: v.into(), ..Default::default() }),
        append_action: action as i32,
        ..Default::default()
    }
}

fn values(h: &http::HeaderMap, k: &str) -> Vec<String> {
    h.get_all(k).iter().map(|v| v.to_str().unwrap().to_string()).collect()
}

/// Applies route-level request edits `add`/`remove` to a request with `headers`.
fn edit(add: Vec<HeaderValueOption>, remove: &[&str], headers: &[(&str, &str)]) -> http::HeaderMap {
    let mut r = route("a", prefix("/"));
    r.request_headers_to_add = add;
    r.request_headers_to_remove = remove.iter().map(|s| s.to_string()).collect();
    let t = table(vec![r]);
    let route = t.select_with_random("h", &parts("GET", "/", headers), 0).unwrap();
    let mut p = parts("GET", "/", headers);
    route.rewrite_request(&mut p);
    p.headers
}

#[test]
fn append_if_exists_or_add_appends_a_value() {
    let h = edit(vec![hvo("x-a", "2", HeaderAppendAction::AppendIfExistsOrAdd)], &[], &[("x-a", "1")]);
    assert_eq!(values(&h, "x-a"), ["1", "2"]);
    let h = edit(vec![hvo("x-a", "2", HeaderAppendAction::AppendIfExistsOrAdd)], &[], &[]);
    assert_eq!(values(&h, "x-a"), ["2"]);
}

#[test]
fn add_if_absent_only_adds_missing_headers() {
    let h = edit(vec![hvo("x-a", "2", HeaderAppendAction::AddIfAbsent)], &[], &[("x-a", "1")]);
    assert_eq!(values(&h, "x-a"), ["1"]);
    let h = edit(vec![hvo("x-a", "2", HeaderAppendAction::AddIfAbsent)], &[], &[]);
    assert_eq!(values(&h, "x-a"), ["2"]);
}

#[test]
fn overwrite_if_exists_or_add_replaces_all_values() {
    let h = edit(vec![hvo("x-a", "3", HeaderAppendAction::OverwriteIfExistsOrAdd)], &[], &[("x-a", "1"), ("x-a", "2")]);
    assert_eq!(values(&h, "x-a"), ["3"]);
    let h = edit(vec![hvo("x-a", "3", HeaderAppendAction::OverwriteIfExistsOrAdd)], &[], &[]);
    assert_eq!(values(&h, "x-a"), ["3"]);
}

#[test]
fn overwrite_if_exists_never_adds() {
    let h = edit(vec![hvo("x-a", "3", HeaderAppendAction::OverwriteIfExists)], &[], &[("x-a", "1")]);
    assert_eq!(values(&h, "x-a"), ["3"]);
    let h = edit(vec![hvo("x-a", "3", HeaderAppendAction::OverwriteIfExists)], &[], &[]);
    assert!(values(&h, "x-a").is_empty());
}

#[test]
fn deprecated_append_bool_maps_to_append_or_overwrite() {
    let mut o = hvo("x-a", "2", HeaderAppendAction::AppendIfExistsOrAdd);
    o.append = Some(BoolValue { value: false });
    assert_eq!(values(&edit(vec![o.clone()], &[], &[("x-a", "1")]), "x-a"), ["2"]);
    o.append = Some(BoolValue { value: true });
    assert_eq!(values(&edit(vec![o], &[], &[("x-a", "1")]), "x-a"), ["1", "2"]);
}

#[test]
fn removal_happens_before_addition_and_empty_values_are_skipped() {
    let h = edit(
        vec![hvo("x-a", "new", HeaderAppendAction::AppendIfExistsOrAdd)],
        &["x-a", "x-gone"],
        &[("x-a", "old"), ("x-gone", "1")],
    );
    assert_eq!(values(&h, "x-a"), ["new"]);
    assert!(!h.contains_key("x-gone"));
    let h = edit(vec![hvo("x-e", "", HeaderAppendAction::AppendIfExistsOrAdd)], &[], &[]);
    assert!(!h.contains_key("x-e"));
    let mut keep = hvo("x-e", "", HeaderAppendAction::AppendIfExistsOrAdd);
    keep.keep_empty_value = true;
    let h = edit(vec![keep], &[], &[]);
    assert_eq!(values(&h, "x-e"), [""]);
    // %% is a literal percent sign.
    let h = edit(vec![hvo("x-p", "100%%", HeaderAppendAction::AppendIfExistsOrAdd)], &[], &[]);
    assert_eq!(values(&h, "x-p"), ["100%"]);
}

fn levels(most_specific_wins: bool) -> RouteTable {
    let ow = |v: &str| {
        vec![
            hvo("x-level", v, HeaderAppendAction::OverwriteIfExistsOrAdd),
            hvo("x-trail", v, HeaderAppendAction::AppendIfExistsOrAdd),
        ]
    };
    let mut r = route("a", prefix("/"));
    r.request_headers_to_add = ow("route");
    r.response_headers_to_add = ow("route");
    let mut vh = vhost("vh", &["*"], vec![r]);
    vh.request_headers_to_add = ow("vhost");
    vh.response_headers_to_add = ow("vhost");
    vh.response_headers_to_remove = vec!["x-upstream".into()];
    RouteTable::compile(&RouteConfiguration {
        request_headers_to_add: ow("config"),
        response_headers_to_add: ow("config"),
        most_specific_header_mutations_wins: most_specific_wins,
        ..rc(vec![vh])
    })
    .unwrap()
}

#[test]
fn levels_apply_route_then_vhost_then_config_so_config_wins() {
    let t = levels(false);
    let r = t.select_with_random("h", &parts("GET", "/", &[]), 0).unwrap();
    let mut p = parts("GET", "/", &[]);
    r.rewrite_request(&mut p);
    assert_eq!(values(&p.headers, "x-level"), ["config"]);
    assert_eq!(values(&p.headers, "x-trail"), ["route", "vhost", "config"]);
    let mut resp = http::HeaderMap::new();
    resp.insert("x-upstream", http::HeaderValue::from_static("1"));
    r.edit_response_headers(&mut resp);
    assert_eq!(values(&resp, "x-level"), ["config"]);
    assert!(!resp.contains_key("x-upstream"));
}

#[test]
fn most_specific_header_mutations_wins_reverses_the_order() {
    let t = levels(true);
    let r = t.select_with_random("h", &parts("GET", "/", &[]), 0).unwrap();
    let mut p = parts("GET", "/", &[]);
    r.rewrite_request(&mut p);
    assert_eq!(values(&p.headers, "x-level"), ["route"]);
    assert_eq!(values(&p.headers, "x-trail"), ["config", "vhost", "route"]);
}

#[test]
fn a_forward_route_says_whether_its_edits_remove_x_forwarded_proto() {
    // Forwarding sets `x-forwarded-proto` again (a hashed lookup per request) only after
    // a route whose edits may have removed it.
    let removes = |route_level: &[&str], vhost_level: &[&str]| {
        let mut r = route("a", prefix("/"));
        r.request_headers_to_remove = route_level.iter().map(|s| s.to_string()).collect();
        let mut vh = vhost("all", &["*"], vec![r]);
        vh.request_headers_to_remove = vhost_level.iter().map(|s| s.to_string()).collect();
        let t = RouteTable::compile(&rc(vec![vh])).unwrap();
        let route = t.select_with_random("h", &parts("GET", "/", &[]), 0).unwrap();
        match &route.action {
            crate::route::RouteAction::Forward(f) => f.removes_x_forwarded_proto,
            other => panic!("not a forward action: {other:?}"),
        }
    };
    assert!(removes(&["x-forwarded-proto"], &[]));
    assert!(removes(&["x-a"], &["X-Forwarded-Proto"]));
    assert!(!removes(&["x-forwarded-host"], &["x-a"]));
    assert!(!removes(&[], &[]));
}
