//! The Gateway API kinds: what the upstream CRDs' schemas and CEL rules refuse, refused
//! with the field's path (a Kubernetes API server would refuse them at admission).

use std::collections::BTreeSet;

use super::V;
use crate::spec::gateway_api::{
    BackendRef, FromNamespaces, GatewayClass, GrpcRouteSpec, HeaderModifier, HttpRouteFilter, HttpRouteSpec,
    KubernetesGateway, L4RouteRule, ParentReference, PathMatchType, PathModifier, PathModifierType, ReferenceGrant,
    TlsModeType, ValueMatchType,
};

const PROTOCOLS: &[&str] = &["HTTP", "HTTPS", "TLS", "TCP"];
const ROUTE_KINDS: &[&str] = &["HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute"];
const HTTP_FILTERS: &[&str] =
    &["RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite", "RequestMirror"];
const GRPC_FILTERS: &[&str] = &["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror"];
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
/// Largest weight the CRDs accept.
const MAX_WEIGHT: u32 = 1_000_000;

pub(super) fn gateway_class(v: &mut V, c: &GatewayClass) {
    v.non_empty("spec.controllerName", "controllerName", &c.controller_name);
}

pub(super) fn gateway(v: &mut V, g: &KubernetesGateway) {
    v.non_empty("spec.gatewayClassName", "gatewayClassName", &g.gateway_class_name);
    for (i, a) in g.addresses.iter().enumerate() {
        let p = format!("spec.addresses[{i}]");
        if let Some(t) = &a.address_type {
            if !matches!(t.as_str(), "IPAddress" | "Hostname" | "NamedAddress") {
                v.err(format!("{p}.type"), format!("unknown address type `{t}`"), one_of(&["IPAddress", "Hostname"]));
            }
        }
        v.non_empty(&format!("{p}.value"), "address", &a.value);
    }
    let mut names = BTreeSet::new();
    for (i, l) in g.listeners.iter().enumerate() {
        let p = format!("spec.listeners[{i}]");
        if !names.insert(l.name.as_str()) {
            v.err(
                format!("{p}.name"),
                format!("duplicate listener name `{}`", l.name),
                "listener names are unique".to_string(),
            );
        }
        if !is_section_name(&l.name) {
            v.err(format!("{p}.name"), format!("invalid listener name `{}`", l.name), dns_hint());
        }
        v.port(&format!("{p}.port"), l.port);
        if !PROTOCOLS.contains(&l.protocol.as_str()) {
            v.err(format!("{p}.protocol"), format!("unsupported protocol `{}`", l.protocol), one_of(PROTOCOLS));
        }
        if let Some(h) = &l.hostname {
            hostname(v, &format!("{p}.hostname"), h);
        }
        match (l.protocol.as_str(), &l.tls) {
            ("HTTP" | "TCP", Some(_)) => {
                v.err(format!("{p}.tls"), format!("tls must not be set for protocol {}", l.protocol), None)
            }
            ("HTTPS" | "TLS", None) => v.err(
                format!("{p}.tls"),
                format!("tls is required for protocol {}", l.protocol),
                "expected `tls: {mode: Terminate, certificateRefs: [{name: <secret>}]}`".to_string(),
            ),
            (proto, Some(t)) => {
                let mode = t.mode.unwrap_or(TlsModeType::Terminate);
                if proto == "HTTPS" && mode == TlsModeType::Passthrough {
                    v.err(
                        format!("{p}.tls.mode"),
                        "an HTTPS listener terminates TLS",
                        "use protocol TLS for Passthrough".to_string(),
                    );
                }
                for (j, c) in t.certificate_refs.iter().enumerate() {
                    v.non_empty(&format!("{p}.tls.certificateRefs[{j}].name"), "name", &c.name);
                }
            }
            _ => {}
        }
        if let Some(ar) = &l.allowed_routes {
            if let Some(ns) = &ar.namespaces {
                let selector = ns.from == Some(FromNamespaces::Selector);
                if selector != ns.selector.is_some() {
                    v.err(
                        format!("{p}.allowedRoutes.namespaces.selector"),
                        "selector is set exactly when `from` is Selector",
                        None,
                    );
                }
            }
            for (j, k) in ar.kinds.iter().enumerate() {
                if !ROUTE_KINDS.contains(&k.kind.as_str()) {
                    v.err(
                        format!("{p}.allowedRoutes.kinds[{j}].kind"),
                        format!("unknown route kind `{}`", k.kind),
                        one_of(ROUTE_KINDS),
                    );
                }
            }
        }
    }
}

pub(super) fn http_route(v: &mut V, r: &HttpRouteSpec) {
    parents(v, &r.parent_refs);
    hostnames(v, &r.hostnames);
    for (i, rule) in r.rules.iter().enumerate() {
        let p = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            let mp = format!("{p}.matches[{j}]");
            if let Some(path) = &m.path {
                let value = path.value.as_deref().unwrap_or("/");
                match path.match_type.unwrap_or(PathMatchType::PathPrefix) {
                    PathMatchType::RegularExpression => v.regex(&format!("{mp}.path.value"), value),
                    _ if !value.starts_with('/') => {
                        v.err(format!("{mp}.path.value"), format!("path `{value}` does not start with `/`"), None)
                    }
                    _ if value.contains("//") || value.contains("/./") || value.contains("/../") => v.err(
                        format!("{mp}.path.value"),
                        format!("path `{value}` must not contain `//`, `/./` or `/../`"),
                        None,
                    ),
                    _ => {}
                }
            }
            header_matches(v, &format!("{mp}.headers"), &m.headers);
            header_matches(v, &format!("{mp}.queryParams"), &m.query_params);
            if let Some(method) = &m.method {
                if !METHODS.contains(&method.as_str()) {
                    v.err(format!("{mp}.method"), format!("unknown method `{method}`"), one_of(METHODS));
                }
            }
        }
        let prefix_only = !rule.matches.is_empty()
            && rule.matches.iter().all(|m| {
                m.path
                    .as_ref()
                    .is_none_or(|p| p.match_type.unwrap_or(PathMatchType::PathPrefix) == PathMatchType::PathPrefix)
            });
        filters(v, &format!("{p}.filters"), &rule.filters, HTTP_FILTERS, prefix_only || rule.matches.is_empty());
        let redirect = rule.filters.iter().any(|f| f.request_redirect.is_some());
        if redirect && !rule.backend_refs.is_empty() {
            v.err(
                format!("{p}.backendRefs"),
                "a rule with a RequestRedirect filter has no backendRefs",
                "remove the backendRefs or the redirect".to_string(),
            );
        }
        backends(v, &format!("{p}.backendRefs"), &rule.backend_refs);
        if let Some(t) = &rule.timeouts {
            if let (Some(req), Some(backend)) = (t.request, t.backend_request) {
                if !req.0.is_zero() && backend.0 > req.0 {
                    v.err(
                        format!("{p}.timeouts.backendRequest"),
                        format!("backendRequest {backend} is longer than request {req}"),
                        "backendRequest must not exceed request".to_string(),
                    );
                }
            }
        }
    }
}

pub(super) fn grpc_route(v: &mut V, r: &GrpcRouteSpec) {
    parents(v, &r.parent_refs);
    hostnames(v, &r.hostnames);
    for (i, rule) in r.rules.iter().enumerate() {
        let p = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            let mp = format!("{p}.matches[{j}]");
            if let Some(method) = &m.method {
                if method.service.is_none() && method.method.is_none() {
                    v.err(format!("{mp}.method"), "one of service or method must be set", None);
                }
                if method.match_type == Some(ValueMatchType::RegularExpression) {
                    for (f, x) in [("service", &method.service), ("method", &method.method)] {
                        if let Some(x) = x {
                            v.regex(&format!("{mp}.method.{f}"), x);
                        }
                    }
                }
            }
            header_matches(v, &format!("{mp}.headers"), &m.headers);
        }
        let fs: Vec<HttpRouteFilter> = rule.filters.iter().map(HttpRouteFilter::from).collect();
        filters(v, &format!("{p}.filters"), &fs, GRPC_FILTERS, false);
        backends(v, &format!("{p}.backendRefs"), &rule.backend_refs);
    }
}

pub(super) fn l4_route(v: &mut V, parent_refs: &[ParentReference], names: &[String], rules: &[L4RouteRule]) {
    parents(v, parent_refs);
    hostnames(v, names);
    if rules.is_empty() {
        v.err("spec.rules", "at least one rule is required", "expected `rules: [{backendRefs: [...]}]`".to_string());
    }
    for (i, rule) in rules.iter().enumerate() {
        backends(v, &format!("spec.rules[{i}].backendRefs"), &rule.backend_refs);
    }
}

pub(super) fn reference_grant(v: &mut V, g: &ReferenceGrant) {
    if g.from.is_empty() {
        v.err("spec.from", "at least one `from` entry is required", None);
    }
    if g.to.is_empty() {
        v.err("spec.to", "at least one `to` entry is required", None);
    }
    for (i, f) in g.from.iter().enumerate() {
        v.non_empty(&format!("spec.from[{i}].kind"), "kind", &f.kind);
        v.dns_label(&format!("spec.from[{i}].namespace"), "namespace", &f.namespace);
    }
    for (i, t) in g.to.iter().enumerate() {
        v.non_empty(&format!("spec.to[{i}].kind"), "kind", &t.kind);
    }
}

fn parents(v: &mut V, refs: &[ParentReference]) {
    for (i, r) in refs.iter().enumerate() {
        let p = format!("spec.parentRefs[{i}]");
        v.non_empty(&format!("{p}.name"), "name", &r.name);
        if !r.is_gateway() && !r.is_service() {
            v.err(
                format!("{p}.kind"),
                format!(
                    "unsupported parent `{}` `{}`",
                    r.group.as_deref().unwrap_or(crate::spec::gateway_api::GROUP),
                    r.kind.as_deref().unwrap_or("Gateway")
                ),
                "expected a Gateway (group gateway.networking.k8s.io) or a Service (group \"\")".to_string(),
            );
        }
        if let Some(port) = r.port {
            v.port(&format!("{p}.port"), port);
        }
    }
}

fn hostnames(v: &mut V, names: &[String]) {
    for (i, h) in names.iter().enumerate() {
        hostname(v, &format!("spec.hostnames[{i}]"), h);
    }
}

/// A Gateway API hostname: a DNS name, optionally `*.` first; never an IP address.
fn hostname(v: &mut V, path: &str, h: &str) {
    let rest = h.strip_prefix("*.").unwrap_or(h);
    let valid = !rest.is_empty()
        && h.len() <= 253
        && rest.split('.').all(super::is_dns_label)
        && rest.parse::<std::net::IpAddr>().is_err();
    if !valid {
        v.err(
            path,
            format!("invalid hostname `{h}`"),
            "expected a lower-case DNS name such as `foo.example.com` or `*.example.com`, not an IP address"
                .to_string(),
        );
    }
}

fn header_matches(v: &mut V, path: &str, ms: &[crate::spec::gateway_api::HttpHeaderMatch]) {
    let mut seen = BTreeSet::new();
    for (i, m) in ms.iter().enumerate() {
        v.non_empty(&format!("{path}[{i}].name"), "name", &m.name);
        if !seen.insert(m.name.to_ascii_lowercase()) {
            v.err(format!("{path}[{i}].name"), format!("`{}` is matched twice", m.name), None);
        }
        if m.match_type == Some(ValueMatchType::RegularExpression) {
            v.regex(&format!("{path}[{i}].value"), &m.value);
        }
    }
}

fn filters(v: &mut V, path: &str, fs: &[HttpRouteFilter], allowed: &[&str], prefix_match: bool) {
    let mut seen = BTreeSet::new();
    for (i, f) in fs.iter().enumerate() {
        let p = format!("{path}[{i}]");
        if !allowed.contains(&f.filter_type.as_str()) {
            v.err(format!("{p}.type"), format!("unsupported filter type `{}`", f.filter_type), one_of(allowed));
            continue;
        }
        let set: Vec<&str> = [
            ("RequestHeaderModifier", f.request_header_modifier.is_some()),
            ("ResponseHeaderModifier", f.response_header_modifier.is_some()),
            ("RequestRedirect", f.request_redirect.is_some()),
            ("URLRewrite", f.url_rewrite.is_some()),
            ("RequestMirror", f.request_mirror.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, s)| s.then_some(n))
        .collect();
        if set != [f.filter_type.as_str()] {
            v.err(
                &p,
                format!("a {} filter sets exactly its own field", f.filter_type),
                format!("expected `{}` and no other", lower_first(&f.filter_type)),
            );
        }
        if f.filter_type != "RequestMirror" && !seen.insert(f.filter_type.as_str()) {
            v.err(format!("{p}.type"), format!("{} is given twice", f.filter_type), None);
        }
        for (name, m) in [
            ("requestHeaderModifier", &f.request_header_modifier),
            ("responseHeaderModifier", &f.response_header_modifier),
        ] {
            if let Some(m) = m {
                header_modifier(v, &format!("{p}.{name}"), m);
            }
        }
        if let Some(r) = &f.request_redirect {
            if let Some(s) = &r.scheme {
                if s != "http" && s != "https" {
                    v.err(
                        format!("{p}.requestRedirect.scheme"),
                        format!("unknown scheme `{s}`"),
                        one_of(&["http", "https"]),
                    );
                }
            }
            if let Some(code) = r.status_code {
                if ![301, 302, 303, 307, 308].contains(&code) {
                    v.err(
                        format!("{p}.requestRedirect.statusCode"),
                        format!("unsupported status code {code}"),
                        "expected 301, 302, 303, 307 or 308".to_string(),
                    );
                }
            }
            if let Some(port) = r.port {
                v.port(&format!("{p}.requestRedirect.port"), port);
            }
            if let Some(h) = &r.hostname {
                hostname(v, &format!("{p}.requestRedirect.hostname"), h);
            }
            if let Some(m) = &r.path {
                path_modifier(v, &format!("{p}.requestRedirect.path"), m, prefix_match);
            }
        }
        if let Some(r) = &f.url_rewrite {
            if let Some(h) = &r.hostname {
                hostname(v, &format!("{p}.urlRewrite.hostname"), h);
            }
            if let Some(m) = &r.path {
                path_modifier(v, &format!("{p}.urlRewrite.path"), m, prefix_match);
            }
        }
        if let Some(m) = &f.request_mirror {
            v.non_empty(&format!("{p}.requestMirror.backendRef.name"), "name", &m.backend_ref.name);
            if m.backend_ref.kind.as_deref().is_none_or(|k| k == "Service") && m.backend_ref.port.is_none() {
                v.err(format!("{p}.requestMirror.backendRef.port"), "port is required for a Service", None);
            }
            if let Some(pct) = m.percent {
                if pct > 100 {
                    v.err(format!("{p}.requestMirror.percent"), format!("{pct} is above 100"), None);
                }
            }
        }
    }
    if seen.contains("RequestRedirect") && seen.contains("URLRewrite") {
        v.err(path, "RequestRedirect and URLRewrite cannot be used together", None);
    }
}

fn header_modifier(v: &mut V, path: &str, m: &HeaderModifier) {
    let mut names = BTreeSet::new();
    for (what, list) in [("set", &m.set), ("add", &m.add)] {
        for (i, h) in list.iter().enumerate() {
            v.non_empty(&format!("{path}.{what}[{i}].name"), "header name", &h.name);
            if !names.insert((what, h.name.to_ascii_lowercase())) {
                v.err(format!("{path}.{what}[{i}].name"), format!("header `{}` is given twice", h.name), None);
            }
        }
    }
}

fn path_modifier(v: &mut V, path: &str, m: &PathModifier, prefix_match: bool) {
    match m.modifier_type {
        PathModifierType::ReplaceFullPath => {
            if m.replace_full_path.is_none() || m.replace_prefix_match.is_some() {
                v.err(path, "ReplaceFullPath sets replaceFullPath only", None);
            }
        }
        PathModifierType::ReplacePrefixMatch => {
            if m.replace_prefix_match.is_none() || m.replace_full_path.is_some() {
                v.err(path, "ReplacePrefixMatch sets replacePrefixMatch only", None);
            }
            if !prefix_match {
                v.err(
                    format!("{path}.type"),
                    "ReplacePrefixMatch needs every match of the rule to be a PathPrefix",
                    "use ReplaceFullPath, or PathPrefix matches".to_string(),
                );
            }
        }
    }
    for value in [&m.replace_full_path, &m.replace_prefix_match].into_iter().flatten() {
        if !value.starts_with('/') {
            v.err(path, format!("`{value}` does not start with `/`"), None);
        }
    }
}

fn backends(v: &mut V, path: &str, refs: &[BackendRef]) {
    for (i, b) in refs.iter().enumerate() {
        v.non_empty(&format!("{path}[{i}].name"), "name", &b.name);
        if b.kind.as_deref().is_none_or(|k| k == "Service") && b.port.is_none() {
            v.err(format!("{path}[{i}].port"), "port is required for a Service backend", None);
        }
        if let Some(port) = b.port {
            v.port(&format!("{path}[{i}].port"), port);
        }
        if let Some(w) = b.weight {
            if w > MAX_WEIGHT {
                v.err(format!("{path}[{i}].weight"), format!("weight {w} is above {MAX_WEIGHT}"), None);
            }
        }
    }
}

/// A listener name (`SectionName`): a DNS subdomain.
fn is_section_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(super::is_dns_label)
}

fn dns_hint() -> String {
    "expected lowercase letters, digits, '-' and '.'".to_string()
}

fn one_of(list: &[&str]) -> String {
    format!("expected one of {}", list.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", "))
}

fn lower_first(s: &str) -> String {
    match s {
        "URLRewrite" => "urlRewrite".into(),
        _ => {
            let mut c = s.chars();
            c.next().map(|f| f.to_ascii_lowercase().to_string() + c.as_str()).unwrap_or_default()
        }
    }
}
