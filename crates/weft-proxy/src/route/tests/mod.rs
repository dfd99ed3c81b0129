//! Unit tests of routing, building `RouteConfiguration` protos in code.
#![allow(deprecated, clippy::unwrap_used)]

mod actions;
mod errors;
mod fault;
mod headers;
mod matching;
mod retry;

use envoy_types::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route as RouteProto,
    RouteAction as RouteActionProto, RouteConfiguration, RouteMatch, VirtualHost,
};

use super::RouteTable;

/// Request parts for `method uri` with `headers`.
pub(super) fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

pub(super) fn rc(vhosts: Vec<VirtualHost>) -> RouteConfiguration {
    RouteConfiguration { name: "rc".into(), virtual_hosts: vhosts, ..Default::default() }
}

pub(super) fn vhost(name: &str, domains: &[&str], routes: Vec<RouteProto>) -> VirtualHost {
    VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes,
        ..Default::default()
    }
}

pub(super) fn prefix(p: &str) -> RouteMatch {
    RouteMatch { path_specifier: Some(PathSpecifier::Prefix(p.into())), ..Default::default() }
}

pub(super) fn forward(cluster: &str) -> RouteActionProto {
    RouteActionProto { cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())), ..Default::default() }
}

/// A route named `name` matching `m` and forwarding to cluster `name`.
pub(super) fn route(name: &str, m: RouteMatch) -> RouteProto {
    route_with(name, m, forward(name))
}

pub(super) fn route_with(name: &str, m: RouteMatch, ra: RouteActionProto) -> RouteProto {
    RouteProto { name: name.into(), r#match: Some(m), action: Some(Action::Route(ra)), ..Default::default() }
}

/// A table with one `*` virtual host holding `routes`.
pub(super) fn table(routes: Vec<RouteProto>) -> RouteTable {
    RouteTable::compile(&rc(vec![vhost("vh", &["*"], routes)])).unwrap()
}

/// The name of the route selected for `method uri headers` on host `h`, if any.
pub(super) fn pick(t: &RouteTable, h: &str, method: &str, uri: &str, headers: &[(&str, &str)]) -> Option<String> {
    t.select_with_random(h, &parts(method, uri, headers), 0).map(|r| r.name.to_string())
}

pub(super) fn exact_path(p: &str) -> RouteMatch {
    RouteMatch { path_specifier: Some(PathSpecifier::Path(p.into())), ..Default::default() }
}
