//! VirtualService and DestinationRule checks.

use super::V;
use crate::spec::{
    Destination, DestinationRule, HttpRoute, LoadBalancerSettings, RouteDestination, TrafficPolicy, VirtualService,
};

pub(crate) fn virtual_service(v: &mut V, vs: &VirtualService) {
    if vs.hosts.is_empty() {
        v.err(
            "spec.hosts",
            "at least one host is required",
            "list the service hosts this VirtualService routes, e.g. `reviews`".to_string(),
        );
    }
    for (i, h) in vs.hosts.iter().enumerate() {
        v.non_empty(&format!("spec.hosts[{i}]"), "host", h);
        if h.contains('/') {
            v.err(
                format!("spec.hosts[{i}]"),
                format!("host `{h}` must not contain `/`"),
                "namespaces are not allowed in VirtualService hosts".to_string(),
            );
        }
    }
    for (i, g) in vs.gateways.iter().enumerate() {
        v.non_empty(&format!("spec.gateways[{i}]"), "gateway", g);
    }
    if vs.http.is_empty() && vs.tcp.is_empty() && vs.tls.is_empty() {
        v.err("spec", "no routes", "add at least one of `http`, `tcp` or `tls`".to_string());
    }
    for (i, r) in vs.http.iter().enumerate() {
        http_route(v, &format!("spec.http[{i}]"), r);
    }
    for (i, r) in vs.tcp.iter().enumerate() {
        let path = format!("spec.tcp[{i}]");
        for (j, m) in r.matches.iter().enumerate() {
            if let Some(p) = m.port {
                v.port(&format!("{path}.match[{j}].port"), p);
            }
        }
        l4_destinations(v, &path, &r.route);
    }
    for (i, r) in vs.tls.iter().enumerate() {
        let path = format!("spec.tls[{i}]");
        if r.matches.is_empty() {
            v.err(format!("{path}.match"), "a TLS route needs at least one match", "set match[].sniHosts".to_string());
        }
        for (j, m) in r.matches.iter().enumerate() {
            if m.sni_hosts.is_empty() {
                v.err(format!("{path}.match[{j}].sniHosts"), "at least one SNI host is required", None);
            }
            if let Some(p) = m.port {
                v.port(&format!("{path}.match[{j}].port"), p);
            }
        }
        l4_destinations(v, &path, &r.route);
    }
    v.export_to("spec.exportTo", &vs.export_to);
}

fn http_route(v: &mut V, path: &str, r: &HttpRoute) {
    let actions = [
        (!r.route.is_empty(), "route"),
        (r.redirect.is_some(), "redirect"),
        (r.direct_response.is_some(), "directResponse"),
        (r.delegate.is_some(), "delegate"),
    ];
    let set: Vec<&str> = actions.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect();
    match set.len() {
        0 => v.err(
            format!("{path}.route"),
            "HTTP route has no destination",
            "set `route` (with at least one destination), `redirect`, `directResponse` or `delegate`".to_string(),
        ),
        1 => {}
        _ => v.err(
            format!("{path}.{}", set[1]),
            format!("`{}` and `{}` cannot be used together", set[0], set[1]),
            "an HTTP route has exactly one action".to_string(),
        ),
    }
    for (j, m) in r.matches.iter().enumerate() {
        let mp = format!("{path}.match[{j}]");
        v.string_match(&format!("{mp}.uri"), &m.uri);
        v.string_match(&format!("{mp}.scheme"), &m.scheme);
        v.string_match(&format!("{mp}.method"), &m.method);
        v.string_match(&format!("{mp}.authority"), &m.authority);
        for (k, sm) in m.headers.iter() {
            v.string_match(&format!("{mp}.headers.{k}"), &Some(sm.clone()));
        }
        for (k, sm) in m.query_params.iter() {
            v.string_match(&format!("{mp}.queryParams.{k}"), &Some(sm.clone()));
        }
        for (k, sm) in m.without_headers.iter() {
            v.string_match(&format!("{mp}.withoutHeaders.{k}"), &Some(sm.clone()));
        }
        if let Some(p) = m.port {
            v.port(&format!("{mp}.port"), p);
        }
    }
    let weights: Vec<(String, Option<i64>, &Destination)> =
        r.route.iter().enumerate().map(|(i, d)| (format!("{path}.route[{i}]"), d.weight, &d.destination)).collect();
    weighted(v, &format!("{path}.route"), &weights);
    if let Some(t) = &r.timeout {
        // Non-negative by construction; 0s disables the timeout.
        let _ = t;
    }
    if let Some(rt) = &r.retries {
        if rt.attempts < 0 {
            v.err(
                format!("{path}.retries.attempts"),
                format!("attempts {} is negative", rt.attempts),
                "expected 0 or more".to_string(),
            );
        }
        v.duration(&format!("{path}.retries.perTryTimeout"), &rt.per_try_timeout);
        v.duration(&format!("{path}.retries.backoff"), &rt.backoff);
    }
    if let Some(f) = &r.fault {
        let fp = format!("{path}.fault");
        if f.delay.is_none() && f.abort.is_none() {
            v.err(&fp, "fault needs `delay` or `abort`", None);
        }
        if let Some(d) = &f.delay {
            let dp = format!("{fp}.delay");
            if d.fixed_delay.is_none() && d.exponential_delay.is_none() {
                v.err(format!("{dp}.fixedDelay"), "delay needs `fixedDelay`", "e.g. `fixedDelay: 5s`".to_string());
            }
            v.duration(&format!("{dp}.fixedDelay"), &d.fixed_delay);
            v.percent(&format!("{dp}.percentage"), &d.percentage);
            if let Some(p) = d.percent {
                if !(0..=100).contains(&p) {
                    v.err(
                        format!("{dp}.percent"),
                        format!("percentage {p} is out of range"),
                        "expected 0..=100".to_string(),
                    );
                }
            }
        }
        if let Some(a) = &f.abort {
            let ap = format!("{fp}.abort");
            match (a.http_status, &a.grpc_status, &a.http2_error) {
                (None, None, None) => {
                    v.err(format!("{ap}.httpStatus"), "abort needs `httpStatus`, `grpcStatus` or `http2Error`", None)
                }
                (Some(s), _, _) if !(200..=599).contains(&s) => v.err(
                    format!("{ap}.httpStatus"),
                    format!("HTTP status {s} is out of range"),
                    "expected 200..=599".to_string(),
                ),
                _ => {}
            }
            v.percent(&format!("{ap}.percentage"), &a.percentage);
        }
    }
    if let Some(m) = &r.mirror {
        destination(v, &format!("{path}.mirror"), m);
    }
    for (i, m) in r.mirrors.iter().enumerate() {
        destination(v, &format!("{path}.mirrors[{i}].destination"), &m.destination);
        v.percent(&format!("{path}.mirrors[{i}].percentage"), &m.percentage);
    }
    v.percent(&format!("{path}.mirrorPercentage"), &r.mirror_percentage);
    if let Some(p) = r.mirror_percent {
        if p > 100 {
            v.err(
                format!("{path}.mirrorPercent"),
                format!("percentage {p} is out of range"),
                "expected 0..=100".to_string(),
            );
        }
    }
    if let Some(rd) = &r.redirect {
        if let Some(c) = rd.redirect_code {
            if !(300..=399).contains(&c) {
                v.err(
                    format!("{path}.redirect.redirectCode"),
                    format!("redirect code {c} is not a 3xx status"),
                    "expected 300..=399 (default 301)".to_string(),
                );
            }
        }
        if let Some(p) = rd.port {
            v.port(&format!("{path}.redirect.port"), p);
        }
    }
    if let Some(dr) = &r.direct_response {
        if !(200..=599).contains(&dr.status) {
            v.err(
                format!("{path}.directResponse.status"),
                format!("HTTP status {} is out of range", dr.status),
                "expected 200..=599".to_string(),
            );
        }
    }
    if let Some(rw) = &r.rewrite {
        if let Some(rr) = &rw.uri_regex_rewrite {
            v.regex(&format!("{path}.rewrite.uriRegexRewrite.match"), &rr.pattern);
            if rw.uri.is_some() {
                v.err(
                    format!("{path}.rewrite.uriRegexRewrite"),
                    "uri and uriRegexRewrite are mutually exclusive",
                    None,
                );
            }
        }
    }
    if let Some(c) = &r.cors_policy {
        for (i, o) in c.allow_origins.iter().enumerate() {
            v.string_match(&format!("{path}.corsPolicy.allowOrigins[{i}]"), &Some(o.clone()));
        }
    }
}

fn l4_destinations(v: &mut V, path: &str, route: &[RouteDestination]) {
    if route.is_empty() {
        v.err(
            format!("{path}.route"),
            "route has no destination",
            "add at least one `route` entry with a `destination`".to_string(),
        );
    }
    let weights: Vec<(String, Option<i64>, &Destination)> =
        route.iter().enumerate().map(|(i, d)| (format!("{path}.route[{i}]"), d.weight, &d.destination)).collect();
    weighted(v, &format!("{path}.route"), &weights);
}

/// Weights in 0..=100, summing to 100 when there is more than one destination.
fn weighted(v: &mut V, path: &str, dests: &[(String, Option<i64>, &Destination)]) {
    let mut sum = 0i64;
    for (p, w, d) in dests {
        destination(v, &format!("{p}.destination"), d);
        if let Some(w) = w {
            if !(0..=100).contains(w) {
                v.err(format!("{p}.weight"), format!("weight {w} is out of range"), "expected 0..=100".to_string());
            }
            sum += w;
        }
    }
    if dests.len() > 1 && sum != 100 {
        v.err(
            path,
            format!("weights sum to {sum}"),
            "the weights of all destinations of a route must sum to 100".to_string(),
        );
    }
}

fn destination(v: &mut V, path: &str, d: &Destination) {
    v.non_empty(&format!("{path}.host"), "destination host", &d.host);
    if let Some(s) = &d.subset {
        v.dns_label(&format!("{path}.subset"), "subset name", s);
    }
    v.port_selector(&format!("{path}.port"), &d.port);
}

pub(crate) fn destination_rule(v: &mut V, dr: &DestinationRule) {
    v.non_empty("spec.host", "host", &dr.host);
    if let Some(tp) = &dr.traffic_policy {
        traffic_policy(v, "spec.trafficPolicy", tp);
    }
    let mut names: Vec<&str> = Vec::new();
    for (i, s) in dr.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        v.dns_label(&format!("{path}.name"), "subset name", &s.name);
        if names.contains(&s.name.as_str()) {
            v.err(
                format!("{path}.name"),
                format!("duplicate subset `{}`", s.name),
                "subset names must be unique".to_string(),
            );
        }
        names.push(&s.name);
        if let Some(tp) = &s.traffic_policy {
            traffic_policy(v, &format!("{path}.trafficPolicy"), tp);
        }
    }
    v.export_to("spec.exportTo", &dr.export_to);
}

fn traffic_policy(v: &mut V, path: &str, tp: &TrafficPolicy) {
    load_balancer(v, &format!("{path}.loadBalancer"), &tp.load_balancer);
    pool_and_outlier(v, path, &tp.connection_pool, &tp.outlier_detection);
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let pp = format!("{path}.portLevelSettings[{i}]");
        match &p.port {
            None => v.err(format!("{pp}.port"), "port-level settings need a port", "set port.number".to_string()),
            Some(ps) => v.port(&format!("{pp}.port.number"), ps.number),
        }
        load_balancer(v, &format!("{pp}.loadBalancer"), &p.load_balancer);
        pool_and_outlier(v, &pp, &p.connection_pool, &p.outlier_detection);
    }
}

fn load_balancer(v: &mut V, path: &str, lb: &Option<LoadBalancerSettings>) {
    let Some(lb) = lb else { return };
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        v.err(path, "`simple` and `consistentHash` are mutually exclusive", None);
    }
    if let Some(ch) = &lb.consistent_hash {
        let keys = [
            ch.http_header_name.is_some(),
            ch.http_cookie.is_some(),
            ch.use_source_ip.is_some(),
            ch.http_query_parameter_name.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if keys != 1 {
            v.err(
                format!("{path}.consistentHash"),
                "consistent hash needs exactly one key",
                "set one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".to_string(),
            );
        }
    }
}

fn pool_and_outlier(
    v: &mut V,
    path: &str,
    pool: &Option<crate::spec::ConnectionPoolSettings>,
    od: &Option<crate::spec::OutlierDetection>,
) {
    if let Some(pool) = pool {
        if let Some(tcp) = &pool.tcp {
            let tp = format!("{path}.connectionPool.tcp");
            if let Some(m) = tcp.max_connections {
                non_negative(v, &format!("{tp}.maxConnections"), m);
            }
            v.duration(&format!("{tp}.connectTimeout"), &tcp.connect_timeout);
            v.duration(&format!("{tp}.idleTimeout"), &tcp.idle_timeout);
            v.duration(&format!("{tp}.maxConnectionDuration"), &tcp.max_connection_duration);
            if let Some(k) = &tcp.tcp_keepalive {
                v.duration(&format!("{tp}.tcpKeepalive.time"), &k.time);
                v.duration(&format!("{tp}.tcpKeepalive.interval"), &k.interval);
            }
        }
        if let Some(h) = &pool.http {
            let hp = format!("{path}.connectionPool.http");
            for (n, val) in [
                ("http1MaxPendingRequests", h.http1_max_pending_requests),
                ("http2MaxRequests", h.http2_max_requests),
                ("maxRequestsPerConnection", h.max_requests_per_connection),
                ("maxRetries", h.max_retries),
                ("maxConcurrentStreams", h.max_concurrent_streams),
            ] {
                if let Some(x) = val {
                    non_negative(v, &format!("{hp}.{n}"), x);
                }
            }
            v.duration(&format!("{hp}.idleTimeout"), &h.idle_timeout);
        }
    }
    if let Some(o) = od {
        let op = format!("{path}.outlierDetection");
        v.duration(&format!("{op}.interval"), &o.interval);
        v.duration(&format!("{op}.baseEjectionTime"), &o.base_ejection_time);
        for (n, val) in [("maxEjectionPercent", o.max_ejection_percent), ("minHealthPercent", o.min_health_percent)] {
            if let Some(p) = val {
                if !(0..=100).contains(&p) {
                    v.err(
                        format!("{op}.{n}"),
                        format!("percentage {p} is out of range"),
                        "expected 0..=100".to_string(),
                    );
                }
            }
        }
        if let Some(c) = o.consecutive_errors {
            non_negative(v, &format!("{op}.consecutiveErrors"), c);
        }
    }
}

fn non_negative(v: &mut V, path: &str, x: i64) {
    if x < 0 {
        v.err(path, format!("value {x} is negative"), "expected 0 or more".to_string());
    }
}
