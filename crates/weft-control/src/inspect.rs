//! What `weft proxy-config` shows: each xDS resource a proxy is served, decoded and
//! summarised as JSON (the fields an operator reads: addresses, filter chains, virtual
//! hosts and routes with their actions, cluster policies, endpoints with health,
//! secrets by kind). Unknown or undecodable payloads are reported as such, never dropped.

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Address};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, redirect_action, route, route_action, route_match, Route, RouteConfiguration,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
use envoy_types::pb::google::protobuf::{Any, Duration};
use prost::{Message, Name};
use serde_json::{json, Value};
use weft_xds::type_url;

/// A JSON summary of one resource of `type_url`.
pub fn describe(type_url: &str, any: &Any) -> Value {
    let bytes = any.value.as_slice();
    let decoded = match type_url {
        type_url::LISTENER => Listener::decode(bytes).map(|l| listener(&l)),
        type_url::ROUTE => RouteConfiguration::decode(bytes).map(|r| route_config(&r)),
        type_url::CLUSTER => Cluster::decode(bytes).map(|c| cluster_of(&c)),
        type_url::ENDPOINT => ClusterLoadAssignment::decode(bytes).map(|c| endpoints(&c)),
        type_url::SECRET => Secret::decode(bytes).map(|s| secret_of(&s)),
        other => return json!({"type": other, "bytes": bytes.len()}),
    };
    decoded.unwrap_or_else(|e| json!({"error": format!("cannot decode {}: {e}", type_url::short(type_url))}))
}

fn addr(a: Option<&Address>) -> Value {
    match a.and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => match &s.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(p)) => json!(format!("{}:{p}", s.address)),
            Some(socket_address::PortSpecifier::NamedPort(p)) => json!(format!("{}:{p}", s.address)),
            None => json!(s.address),
        },
        Some(address::Address::Pipe(p)) => json!(format!("unix:{}", p.path)),
        Some(_) => json!("(other address kind)"),
        None => Value::Null,
    }
}

fn dur(d: Option<&Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(format!("{}s", d.seconds as f64 + f64::from(d.nanos) / 1e9)))
}

fn listener(l: &Listener) -> Value {
    json!({
        "name": l.name,
        "address": addr(l.address.as_ref()),
        "use_original_dst": l.use_original_dst.as_ref().map(|b| b.value),
        "traffic_direction": l.traffic_direction,
        "listener_filters": l.listener_filters.iter().map(|f| f.name.clone()).collect::<Vec<_>>(),
        "filter_chains": l.filter_chains.iter().map(chain).collect::<Vec<_>>(),
        "default_filter_chain": l.default_filter_chain.as_ref().map(chain),
    })
}

fn chain(fc: &FilterChain) -> Value {
    let m = fc.filter_chain_match.clone().unwrap_or_default();
    json!({
        "name": fc.name,
        "match": {
            "destination_port": m.destination_port.map(|p| p.value),
            "server_names": m.server_names,
            "transport_protocol": m.transport_protocol,
            "application_protocols": m.application_protocols,
        },
        "tls": fc.transport_socket.as_ref().map(|t| t.name.clone()),
        "filters": fc.filters.iter().map(network_filter).collect::<Vec<_>>(),
    })
}

fn network_filter(f: &Filter) -> Value {
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        return json!({"name": f.name});
    };
    if any.type_url == HttpConnectionManager::type_url() {
        if let Ok(h) = HttpConnectionManager::decode(any.value.as_slice()) {
            let routes = match &h.route_specifier {
                Some(RouteSpecifier::Rds(r)) => json!({"rds": r.route_config_name}),
                Some(RouteSpecifier::RouteConfig(rc)) => json!({"inline": route_config(rc)}),
                _ => Value::Null,
            };
            return json!({
                "name": f.name,
                "stat_prefix": h.stat_prefix,
                "routes": routes,
                "http_filters": h.http_filters.iter().map(|f| f.name.clone()).collect::<Vec<_>>(),
                "tracing": h.tracing.as_ref().map(|t| json!({
                    "provider": t.provider.as_ref().map(|p| p.name.clone()),
                    "random_sampling": t.random_sampling.as_ref().map(|p| p.value),
                    "custom_tags": t.custom_tags.iter().map(|c| c.tag.clone()).collect::<Vec<_>>(),
                })),
            });
        }
    }
    if any.type_url == TcpProxy::type_url() {
        if let Ok(t) = TcpProxy::decode(any.value.as_slice()) {
            let target = match &t.cluster_specifier {
                Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => json!({"cluster": c}),
                Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => json!({"weighted_clusters":
                    w.clusters.iter().map(|c| json!({"name": c.name, "weight": c.weight})).collect::<Vec<_>>()}),
                None => Value::Null,
            };
            return json!({"name": f.name, "stat_prefix": t.stat_prefix, "target": target});
        }
    }
    json!({"name": f.name, "type": any.type_url})
}

fn string_match(m: &StringMatcher) -> String {
    let ic = if m.ignore_case { " (ignore case)" } else { "" };
    match &m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(s)) => format!("exact {s}{ic}"),
        Some(string_matcher::MatchPattern::Prefix(s)) => format!("prefix {s}{ic}"),
        Some(string_matcher::MatchPattern::Suffix(s)) => format!("suffix {s}{ic}"),
        Some(string_matcher::MatchPattern::Contains(s)) => format!("contains {s}{ic}"),
        Some(string_matcher::MatchPattern::SafeRegex(r)) => format!("regex {}", r.regex),
        _ => "any".into(),
    }
}

fn route_config(rc: &RouteConfiguration) -> Value {
    let vhosts: Vec<Value> = rc
        .virtual_hosts
        .iter()
        .map(|vh| {
            json!({
                "name": vh.name,
                "domains": vh.domains,
                "routes": vh.routes.iter().map(route_of).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"name": rc.name, "virtual_hosts": vhosts, "vhds": rc.vhds.is_some()})
}

/// A route's match in one line (`prefix /api`, plus headers).
fn route_match_text(r: &Route) -> String {
    let Some(m) = &r.r#match else { return "(none)".into() };
    let path = match &m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(p)) => format!("prefix {p}"),
        Some(route_match::PathSpecifier::Path(p)) => format!("path {p}"),
        Some(route_match::PathSpecifier::SafeRegex(r)) => format!("regex {}", r.regex),
        Some(route_match::PathSpecifier::PathSeparatedPrefix(p)) => format!("path prefix {p}"),
        _ => "any".into(),
    };
    let headers = m.headers.iter().map(|h| {
        let how = match &h.header_match_specifier {
            Some(header_matcher::HeaderMatchSpecifier::StringMatch(s)) => string_match(s),
            Some(header_matcher::HeaderMatchSpecifier::PresentMatch(p)) => format!("present {p}"),
            _ => "matches".into(),
        };
        format!("{}{} {how}", if h.invert_match { "!" } else { "" }, h.name)
    });
    std::iter::once(path).chain(headers).collect::<Vec<_>>().join(", ")
}

fn route_of(r: &Route) -> Value {
    let action = match &r.action {
        Some(route::Action::Route(a)) => {
            let target = match &a.cluster_specifier {
                Some(route_action::ClusterSpecifier::Cluster(c)) => json!({"cluster": c}),
                Some(route_action::ClusterSpecifier::WeightedClusters(w)) => json!({"weighted_clusters":
                    w.clusters.iter().map(|c| json!({"name": c.name, "weight": c.weight.as_ref().map(|w| w.value)})).collect::<Vec<_>>()}),
                Some(route_action::ClusterSpecifier::ClusterHeader(h)) => json!({"cluster_header": h}),
                _ => Value::Null,
            };
            json!({
                "route": target,
                "timeout": dur(a.timeout.as_ref()),
                "retries": a.retry_policy.as_ref().map(|p| json!({
                    "retry_on": p.retry_on,
                    "num_retries": p.num_retries.as_ref().map(|n| n.value),
                    "per_try_timeout": dur(p.per_try_timeout.as_ref()),
                })),
                "prefix_rewrite": (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone()),
                "mirrors": a.request_mirror_policies.iter().map(|m| m.cluster.clone()).collect::<Vec<_>>(),
            })
        }
        Some(route::Action::Redirect(rd)) => json!({"redirect": {
            "host": rd.host_redirect,
            "path": match &rd.path_rewrite_specifier {
                Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => json!(p),
                Some(redirect_action::PathRewriteSpecifier::PrefixRewrite(p)) => json!(format!("prefix {p}")),
                _ => Value::Null,
            },
            "code": rd.response_code,
        }}),
        Some(route::Action::DirectResponse(d)) => json!({"direct_response": d.status}),
        _ => Value::Null,
    };
    json!({
        "name": r.name,
        "match": route_match_text(r),
        "action": action,
        "filters": r.typed_per_filter_config.keys().cloned().collect::<Vec<_>>(),
    })
}

fn cluster_of(c: &Cluster) -> Value {
    let kind = match &c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => {
            cluster::DiscoveryType::try_from(*t).map(|t| t.as_str_name().to_string()).unwrap_or_else(|_| t.to_string())
        }
        Some(cluster::ClusterDiscoveryType::ClusterType(t)) => t.name.clone(),
        None => "STATIC".into(),
    };
    let lb = cluster::LbPolicy::try_from(c.lb_policy).map(|p| p.as_str_name().to_string()).unwrap_or_default();
    let weft_lb = c
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get("weft"))
        .and_then(|s| s.fields.get("lb_policy"))
        .and_then(|v| match &v.kind {
            Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        });
    let thresholds = c.circuit_breakers.as_ref().and_then(|cb| cb.thresholds.first());
    json!({
        "name": c.name,
        "type": kind,
        "lb_policy": weft_lb.unwrap_or(lb),
        "connect_timeout": dur(c.connect_timeout.as_ref()),
        "eds_service_name": c.eds_cluster_config.as_ref().map(|e| e.service_name.clone()),
        "circuit_breakers": thresholds.map(|t| json!({
            "max_connections": t.max_connections.as_ref().map(|v| v.value),
            "max_pending_requests": t.max_pending_requests.as_ref().map(|v| v.value),
            "max_requests": t.max_requests.as_ref().map(|v| v.value),
            "max_retries": t.max_retries.as_ref().map(|v| v.value),
        })),
        "outlier_detection": c.outlier_detection.as_ref().map(|o| json!({
            "consecutive_5xx": o.consecutive_5xx.as_ref().map(|v| v.value),
            "consecutive_gateway_failure": o.consecutive_gateway_failure.as_ref().map(|v| v.value),
            "interval": dur(o.interval.as_ref()),
            "base_ejection_time": dur(o.base_ejection_time.as_ref()),
            "max_ejection_percent": o.max_ejection_percent.as_ref().map(|v| v.value),
        })),
        "tls": c.transport_socket.as_ref().map(|t| t.name.clone()),
    })
}

fn endpoints(cla: &ClusterLoadAssignment) -> Value {
    let list: Vec<Value> = cla
        .endpoints
        .iter()
        .flat_map(|l| {
            l.lb_endpoints.iter().map(move |e| {
                let address = match &e.host_identifier {
                    Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => addr(ep.address.as_ref()),
                    _ => Value::Null,
                };
                let health = envoy_types::pb::envoy::config::core::v3::HealthStatus::try_from(e.health_status)
                    .map(|h| h.as_str_name().to_string())
                    .unwrap_or_else(|_| e.health_status.to_string());
                json!({
                    "address": address,
                    "health": health,
                    "weight": e.load_balancing_weight.as_ref().map(|w| w.value),
                    "priority": l.priority,
                })
            })
        })
        .collect();
    json!({"cluster_name": cla.cluster_name, "endpoints": list})
}

fn secret_of(s: &Secret) -> Value {
    let kind = match &s.r#type {
        Some(secret::Type::TlsCertificate(_)) => "tls_certificate",
        Some(secret::Type::ValidationContext(_)) => "validation_context",
        Some(secret::Type::SessionTicketKeys(_)) => "session_ticket_keys",
        Some(secret::Type::GenericSecret(_)) => "generic_secret",
        None => "empty",
    };
    // Key material is never shown.
    json!({"name": s.name, "kind": kind})
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::util::pack_any;
    use std::net::SocketAddr;

    #[test]
    fn describes_listeners_routes_clusters_and_endpoints() {
        let a: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let l = weft_xds::build::http_listener(
            "weft-outbound",
            a,
            weft_xds::build::http_connection_manager("out", weft_xds::build::Routes::Rds("r".into()), None, &[]),
        );
        let v = describe(type_url::LISTENER, &pack_any(l));
        assert_eq!(v["address"], "127.0.0.1:15001");
        assert_eq!(v["filter_chains"][0]["filters"][0]["routes"]["rds"], "r");
        let c = weft_xds::build::eds_cluster("outbound|9080||reviews", false);
        let v = describe(type_url::CLUSTER, &pack_any(c));
        assert_eq!(v["type"], "EDS");
        let cla = weft_xds::build::cla("outbound|9080||reviews", &[(a, 3, Default::default())]);
        let v = describe(type_url::ENDPOINT, &pack_any(cla));
        assert_eq!(v["endpoints"][0]["address"], "127.0.0.1:15001");
        assert_eq!(v["endpoints"][0]["weight"], 3);
        let bad = Any { type_url: type_url::ROUTE.into(), value: vec![0xff, 0xff] };
        assert!(describe(type_url::ROUTE, &bad)["error"].as_str().unwrap().contains("cannot decode"));
    }
}
