//! Validation beyond shape, following Istio's admission webhook.
//!
//! Each check reports an [`Issue`] with the field path relative to the
//! document (`spec.http[0].route[1].weight`); the parser maps paths to lines.

mod gateway_api;
mod rollout;
mod slo;
mod traffic;

use crate::spec::{
    common::{Duration, Percent, PortSelector, StringMatch, TargetRef, PROTOCOLS},
    AuthorizationPolicy, AuthzAction, Gateway, LabelSelector, LocalWorkload, PeerAuthentication, RequestAuthentication,
    ServiceEntry, ServiceSpec, Sidecar, TargetPort, Telemetry, WorkloadEntry,
};
use crate::Spec;

/// One validation finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Issue {
    /// Field path relative to the document.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// What was expected.
    pub hint: Option<String>,
}

/// Collects issues.
#[derive(Default)]
pub(crate) struct V {
    pub issues: Vec<Issue>,
}

impl V {
    pub fn err(&mut self, path: impl Into<String>, message: impl Into<String>, hint: impl Into<Option<String>>) {
        self.issues.push(Issue { path: path.into(), message: message.into(), hint: hint.into() });
    }

    pub fn port(&mut self, path: &str, port: u32) {
        if !(1..=65535).contains(&port) {
            self.err(path, format!("port {port} is out of range"), "expected 1..=65535".to_string());
        }
    }

    pub fn port_selector(&mut self, path: &str, p: &Option<PortSelector>) {
        if let Some(p) = p {
            self.port(&format!("{path}.number"), p.number);
        }
    }

    pub fn percent(&mut self, path: &str, p: &Option<Percent>) {
        if let Some(p) = p {
            self.percent_value(&format!("{path}.value"), p.value);
        }
    }

    pub fn percent_value(&mut self, path: &str, v: f64) {
        if !(0.0..=100.0).contains(&v) {
            self.err(path, format!("percentage {v} is out of range"), "expected 0..=100".to_string());
        }
    }

    /// Durations must be at least 1ms (Istio's rule).
    pub fn duration(&mut self, path: &str, d: &Option<Duration>) {
        if let Some(d) = d {
            if d.0 < std::time::Duration::from_millis(1) {
                self.err(path, format!("duration {d} is too short"), "expected at least 1ms".to_string());
            }
        }
    }

    pub fn string_match(&mut self, path: &str, m: &Option<StringMatch>) {
        if let Some(StringMatch::Regex(r)) = m {
            self.regex(&format!("{path}.regex"), r);
        }
    }

    pub fn regex(&mut self, path: &str, r: &str) {
        if let Err(e) = regex::Regex::new(r) {
            let first = e.to_string().lines().last().unwrap_or("").trim().to_string();
            self.err(path, format!("invalid regular expression `{r}`: {first}"), "expected RE2 syntax".to_string());
        }
    }

    pub fn dns_label(&mut self, path: &str, what: &str, s: &str) {
        if !is_dns_label(s) {
            self.err(
                path,
                format!("{what} `{s}` is not a valid DNS label"),
                "expected lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters".to_string(),
            );
        }
    }

    pub fn non_empty(&mut self, path: &str, what: &str, s: &str) {
        if s.trim().is_empty() {
            self.err(path, format!("{what} must not be empty"), None);
        }
    }

    pub fn export_to(&mut self, path: &str, list: &[String]) {
        for (i, e) in list.iter().enumerate() {
            if e != "." && e != "*" && e != "~" && !is_dns_label(e) {
                self.err(
                    format!("{path}[{i}]"),
                    format!("invalid exportTo value `{e}`"),
                    "expected `.`, `*` or a namespace name".to_string(),
                );
            }
        }
    }

    fn selector_and_targets(
        &mut self,
        sel: &Option<LabelSelector>,
        one: &Option<TargetRef>,
        many: &[TargetRef],
        ns: &str,
    ) {
        if sel.is_some() && (one.is_some() || !many.is_empty()) {
            self.err(
                "spec.selector",
                "selector and targetRef/targetRefs are mutually exclusive",
                "use one of them".to_string(),
            );
        }
        if one.is_some() && !many.is_empty() {
            self.err("spec.targetRef", "targetRef and targetRefs are mutually exclusive", "use targetRefs".to_string());
        }
        let refs = one
            .iter()
            .map(|t| ("spec.targetRef".to_string(), t))
            .chain(many.iter().enumerate().map(|(i, t)| (format!("spec.targetRefs[{i}]"), t)));
        for (p, t) in refs {
            let ok = matches!(
                (t.group.as_str(), t.kind.as_str()),
                ("gateway.networking.k8s.io", "Gateway" | "GatewayClass")
                    | ("", "Service")
                    | ("core", "Service")
                    | ("networking.istio.io", "ServiceEntry")
            );
            if !ok {
                self.err(
                    format!("{p}.kind"),
                    format!("unsupported target `{}` `{}`", t.group, t.kind),
                    "expected group gateway.networking.k8s.io kind Gateway, or group \"\" kind Service".to_string(),
                );
            }
            self.non_empty(&format!("{p}.name"), "target name", &t.name);
            if let Some(tns) = &t.namespace {
                if tns != ns {
                    self.err(
                        format!("{p}.namespace"),
                        format!("targetRef namespace `{tns}` differs from the policy's namespace `{ns}`"),
                        "a policy can only target resources in its own namespace".to_string(),
                    );
                }
            }
        }
        if let Some(s) = sel {
            for k in s.match_labels.keys() {
                if k.is_empty() {
                    self.err("spec.selector.matchLabels", "label keys must not be empty", None);
                }
            }
        }
    }
}

/// Validates a name and namespace.
pub(crate) fn metadata(name: &str, namespace: Option<&str>) -> Vec<Issue> {
    let mut v = V::default();
    if name.is_empty() || name.len() > 253 || !name.split('.').all(is_dns_label) {
        v.err(
            "metadata.name",
            format!("invalid name `{name}`"),
            "expected a DNS-1123 subdomain: lowercase letters, digits, '-' and '.'".to_string(),
        );
    }
    if let Some(ns) = namespace {
        v.dns_label("metadata.namespace", "namespace", ns);
    }
    v.issues
}

/// Validates a typed spec in the resource's namespace.
pub(crate) fn spec(spec: &Spec, ns: &str) -> Vec<Issue> {
    let mut v = V::default();
    match spec {
        Spec::Service(s) => service(&mut v, s),
        Spec::VirtualService(vs) => traffic::virtual_service(&mut v, vs),
        Spec::DestinationRule(dr) => traffic::destination_rule(&mut v, dr),
        Spec::ServiceEntry(se) => service_entry(&mut v, se),
        Spec::WorkloadEntry(we) => workload_entry(&mut v, "spec", we),
        Spec::Sidecar(s) => sidecar(&mut v, s),
        Spec::Gateway(g) => gateway(&mut v, g),
        Spec::PeerAuthentication(pa) => peer_authentication(&mut v, pa),
        Spec::AuthorizationPolicy(ap) => authorization_policy(&mut v, ap, ns),
        Spec::RequestAuthentication(ra) => request_authentication(&mut v, ra, ns),
        Spec::Telemetry(t) => telemetry(&mut v, t, ns),
        Spec::LocalWorkload(l) => local_workload(&mut v, l),
        Spec::EnvoyFilter(ef) => envoy_filter(&mut v, ef),
        Spec::RateLimit(rl) => rate_limit(&mut v, rl),
        Spec::ServiceLevelObjective(o) => slo::service_level_objective(&mut v, o),
        Spec::Rollout(r) => rollout::rollout(&mut v, r),
        Spec::GatewayClass(c) => gateway_api::gateway_class(&mut v, c),
        Spec::KubernetesGateway(g) => gateway_api::gateway(&mut v, g),
        Spec::HttpRoute(r) => gateway_api::http_route(&mut v, r),
        Spec::GrpcRoute(r) => gateway_api::grpc_route(&mut v, r),
        Spec::TcpRoute(r) => gateway_api::l4_route(&mut v, &r.parent_refs, &[], &r.rules),
        Spec::TlsRoute(r) => gateway_api::l4_route(&mut v, &r.parent_refs, &r.hostnames, &r.rules),
        Spec::ReferenceGrant(g) => gateway_api::reference_grant(&mut v, g),
        Spec::Secret(s) => secret(&mut v, s),
    }
    v.issues
}

/// A Secret: every `data` value is base64 and the TLS keys Istio reads hold PEM.
fn secret(v: &mut V, s: &crate::spec::SecretSpec) {
    use base64::Engine as _;
    for (k, val) in &s.data {
        let compact: String = val.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        if let Err(e) = base64::engine::general_purpose::STANDARD.decode(compact.as_bytes()) {
            v.err(
                format!("data.{k}"),
                format!("not valid base64: {e}"),
                Some("use `stringData` for plain text".into()),
            );
            return;
        }
    }
    if let Err(e) = s.tls() {
        v.err(e.field, e.message, e.hint);
    }
}

/// RFC 1123 label.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn protocol(v: &mut V, path: &str, p: &Option<String>) {
    if let Some(p) = p {
        if !PROTOCOLS.iter().any(|k| k.eq_ignore_ascii_case(p)) {
            v.err(path, format!("unknown protocol `{p}`"), format!("expected one of {}", PROTOCOLS.join(", ")));
        }
    }
}

fn service(v: &mut V, s: &ServiceSpec) {
    let multi = s.ports.len() > 1;
    let mut names = Vec::new();
    for (i, p) in s.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        v.port(&format!("{path}.port"), p.port);
        match &p.name {
            None if multi => v.err(
                format!("{path}.name"),
                "port name is required when a Service has more than one port",
                "name ports `http`, `grpc-web`, `tcp-db`, ... (the prefix declares the protocol)".to_string(),
            ),
            Some(n) => {
                if names.contains(n) {
                    v.err(format!("{path}.name"), format!("duplicate port name `{n}`"), None);
                }
                names.push(n.clone());
            }
            None => {}
        }
        match &p.target_port {
            Some(TargetPort::Number(n)) => v.port(&format!("{path}.targetPort"), *n),
            Some(TargetPort::Name(n)) if n.is_empty() || n.len() > 15 => v.err(
                format!("{path}.targetPort"),
                format!("invalid target port name `{n}`"),
                "expected a port number or a container port name of at most 15 characters".to_string(),
            ),
            _ => {}
        }
        if let Some(proto) = &p.protocol {
            if !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP") {
                v.err(
                    format!("{path}.protocol"),
                    format!("unknown protocol `{proto}`"),
                    "expected TCP, UDP or SCTP".to_string(),
                );
            }
        }
    }
}

fn service_entry(v: &mut V, se: &ServiceEntry) {
    if se.hosts.is_empty() {
        v.err("spec.hosts", "at least one host is required", None);
    }
    for (i, h) in se.hosts.iter().enumerate() {
        v.non_empty(&format!("spec.hosts[{i}]"), "host", h);
    }
    let mut names = Vec::new();
    for (i, p) in se.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        v.port(&format!("{path}.number"), p.number);
        if let Some(t) = p.target_port {
            v.port(&format!("{path}.targetPort"), t);
        }
        protocol(v, &format!("{path}.protocol"), &p.protocol);
        if p.name.as_deref().is_none_or(str::is_empty) {
            v.err(format!("{path}.name"), "a port name is required (Istio validates it as a DNS-1123 label)", None);
        }
        if let Some(n) = &p.name {
            if names.contains(n) {
                v.err(format!("{path}.name"), format!("duplicate port name `{n}`"), None);
            }
            names.push(n.clone());
        }
    }
    if !se.endpoints.is_empty() && se.workload_selector.is_some() {
        v.err("spec.workloadSelector", "workloadSelector and endpoints are mutually exclusive", None);
    }
    if se.resolution == Some(crate::spec::Resolution::Static) {
        for (i, e) in se.endpoints.iter().enumerate() {
            if e.address.as_deref().unwrap_or("").is_empty() {
                v.err(format!("spec.endpoints[{i}].address"), "STATIC resolution needs an endpoint address", None);
            }
        }
    }
    for (i, e) in se.endpoints.iter().enumerate() {
        workload_entry(v, &format!("spec.endpoints[{i}]"), e);
    }
    v.export_to("spec.exportTo", &se.export_to);
}

fn workload_entry(v: &mut V, path: &str, we: &WorkloadEntry) {
    if we.address.is_none() && we.network.is_none() {
        v.err(format!("{path}.address"), "address is required", "set an IP address or DNS name".to_string());
    }
    for (name, port) in &we.ports {
        v.port(&format!("{path}.ports.{name}"), *port);
    }
    if let Some(sa) = &we.service_account {
        v.dns_label(&format!("{path}.serviceAccount"), "service account", sa);
    }
}

fn sidecar(v: &mut V, s: &Sidecar) {
    for (i, l) in s.ingress.iter().enumerate() {
        let path = format!("spec.ingress[{i}]");
        match &l.port {
            None => v.err(format!("{path}.port"), "ingress listener needs a port", None),
            Some(p) => {
                v.port(&format!("{path}.port.number"), p.number);
                protocol(v, &format!("{path}.port.protocol"), &p.protocol);
            }
        }
    }
    if s.egress.is_empty() && !s.ingress.is_empty() {
        // Istio allows this (defaults to the mesh config), nothing to report.
    }
    for (i, l) in s.egress.iter().enumerate() {
        let path = format!("spec.egress[{i}]");
        if let Some(p) = &l.port {
            v.port(&format!("{path}.port.number"), p.number);
            protocol(v, &format!("{path}.port.protocol"), &p.protocol);
        }
        if l.hosts.is_empty() {
            v.err(
                format!("{path}.hosts"),
                "egress listener needs at least one host",
                "expected `namespace/dnsName`, e.g. `./*` or `istio-system/*`".to_string(),
            );
        }
        for (j, h) in l.hosts.iter().enumerate() {
            match h.split_once('/') {
                Some((ns, host)) if !ns.is_empty() && !host.is_empty() => {}
                _ => v.err(
                    format!("{path}.hosts[{j}]"),
                    format!("egress host `{h}` is not in `namespace/dnsName` form"),
                    "expected e.g. `./*`, `istio-system/*` or `*/reviews.default.svc.cluster.local`".to_string(),
                ),
            }
        }
    }
}

fn gateway(v: &mut V, g: &Gateway) {
    if g.servers.is_empty() {
        v.err("spec.servers", "at least one server is required", None);
    }
    for (i, s) in g.servers.iter().enumerate() {
        let path = format!("spec.servers[{i}]");
        v.port(&format!("{path}.port.number"), s.port.number);
        protocol(v, &format!("{path}.port.protocol"), &s.port.protocol);
        // Istio's validateServerPort: a server port has a name and a protocol.
        if s.port.name.as_deref().is_none_or(str::is_empty) {
            v.err(format!("{path}.port.name"), "a server port needs a name (Istio requires it)", None);
        }
        if s.port.protocol.as_deref().is_none_or(str::is_empty) {
            v.err(
                format!("{path}.port.protocol"),
                "a server port needs a protocol",
                "HTTP, HTTPS, HTTP2, GRPC, TCP, TLS, MONGO, REDIS or MYSQL".to_string(),
            );
        }
        if s.hosts.is_empty() {
            v.err(format!("{path}.hosts"), "at least one host is required", "use `*` for any host".to_string());
        }
        for (j, h) in s.hosts.iter().enumerate() {
            v.non_empty(&format!("{path}.hosts[{j}]"), "host", h);
        }
        let proto = s.port.protocol.as_deref().unwrap_or("").to_ascii_uppercase();
        if proto == "HTTPS" && s.tls.is_none() {
            v.err(
                format!("{path}.tls"),
                "an HTTPS server needs `tls`",
                "set tls.mode and tls.credentialName".to_string(),
            );
        }
        if let Some(tls) = &s.tls {
            use crate::spec::ServerTlsMode::*;
            if matches!(tls.mode, Some(Simple | Mutual | OptionalMutual))
                && tls.credential_name.is_none()
                && tls.credential_names.is_empty()
                && (tls.server_certificate.is_none() || tls.private_key.is_none())
            {
                v.err(
                    format!("{path}.tls"),
                    "SIMPLE/MUTUAL TLS needs a certificate",
                    "set credentialName, or serverCertificate and privateKey".to_string(),
                );
            }
        }
    }
}

fn peer_authentication(v: &mut V, pa: &PeerAuthentication) {
    if !pa.port_level_mtls.is_empty() && pa.selector.is_none() {
        v.err(
            "spec.portLevelMtls",
            "portLevelMtls needs a workload selector",
            "add spec.selector.matchLabels".to_string(),
        );
    }
    for k in pa.port_level_mtls.keys() {
        match k.parse::<u32>() {
            Ok(p) => v.port(&format!("spec.portLevelMtls.{k}"), p),
            Err(_) => v.err(
                format!("spec.portLevelMtls.{k}"),
                format!("`{k}` is not a port number"),
                "expected 1..=65535".to_string(),
            ),
        }
    }
}

fn authorization_policy(v: &mut V, ap: &AuthorizationPolicy, ns: &str) {
    v.selector_and_targets(&ap.selector, &ap.target_ref, &ap.target_refs, ns);
    match ap.action {
        AuthzAction::Deny | AuthzAction::Audit if ap.rules.is_empty() => v.err(
            "spec.rules",
            format!(
                "{} policy has no rules and would never match",
                if ap.action == AuthzAction::Deny { "DENY" } else { "AUDIT" }
            ),
            "add rules, or use an ALLOW policy with no rules to deny everything".to_string(),
        ),
        AuthzAction::Custom if ap.provider.is_none() => v.err(
            "spec.provider",
            "CUSTOM action needs a provider",
            "set provider.name to an extension provider from the mesh config".to_string(),
        ),
        _ => {}
    }
    if ap.provider.is_some() && ap.action != AuthzAction::Custom {
        v.err("spec.provider", "provider is only allowed with action CUSTOM", None);
    }
    for (i, r) in ap.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        for (j, f) in r.from.iter().enumerate() {
            if f.source == Default::default() {
                v.err(
                    format!("{path}.from[{j}].source"),
                    "source has no fields",
                    "set principals, namespaces, ipBlocks, ...".to_string(),
                );
            }
        }
        for (j, t) in r.to.iter().enumerate() {
            let op = &t.operation;
            if op == &Default::default() {
                v.err(
                    format!("{path}.to[{j}].operation"),
                    "operation has no fields",
                    "set hosts, ports, methods or paths".to_string(),
                );
            }
            for (k, p) in op.ports.iter().chain(op.not_ports.iter()).enumerate() {
                match p.parse::<u32>() {
                    Ok(n) if (1..=65535).contains(&n) => {}
                    _ => v.err(
                        format!("{path}.to[{j}].operation.ports[{k}]"),
                        format!("invalid port `{p}`"),
                        "expected a port number 1..=65535 as a string".to_string(),
                    ),
                }
            }
        }
        for (j, c) in r.when.iter().enumerate() {
            let cp = format!("{path}.when[{j}]");
            v.non_empty(&format!("{cp}.key"), "condition key", &c.key);
            if c.values.is_empty() && c.not_values.is_empty() {
                v.err(cp, "condition needs values or notValues", None);
            }
        }
    }
}

fn request_authentication(v: &mut V, ra: &RequestAuthentication, ns: &str) {
    v.selector_and_targets(&ra.selector, &ra.target_ref, &ra.target_refs, ns);
    for (i, r) in ra.jwt_rules.iter().enumerate() {
        let path = format!("spec.jwtRules[{i}]");
        v.non_empty(&format!("{path}.issuer"), "issuer", &r.issuer);
        if r.jwks.is_some() && r.jwks_uri.is_some() {
            v.err(format!("{path}.jwks"), "jwks and jwksUri are mutually exclusive", None);
        }
        if let Some(u) = &r.jwks_uri {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                v.err(
                    format!("{path}.jwksUri"),
                    format!("invalid URL `{u}`"),
                    "expected an http:// or https:// URL".to_string(),
                );
            }
        }
        v.duration(&format!("{path}.timeout"), &r.timeout);
    }
}

fn telemetry(v: &mut V, t: &Telemetry, ns: &str) {
    v.selector_and_targets(&t.selector, &t.target_ref, &t.target_refs, ns);
    let providers = |v: &mut V, path: &str, list: &[crate::spec::ExtensionProvider]| {
        for (j, p) in list.iter().enumerate() {
            v.non_empty(&format!("{path}.providers[{j}].name"), "provider name", &p.name);
        }
    };
    for (i, tr) in t.tracing.iter().enumerate() {
        let path = format!("spec.tracing[{i}]");
        if let Some(p) = tr.random_sampling_percentage {
            v.percent_value(&format!("{path}.randomSamplingPercentage"), p);
        }
        providers(v, &path, &tr.providers);
        if tr.providers.len() > 1 {
            v.err(
                format!("{path}.providers"),
                format!("{} tracing providers in one rule", tr.providers.len()),
                "Istio supports a single provider per tracing rule: keep one".to_string(),
            );
        }
        for (name, tag) in &tr.custom_tags {
            let at = format!("{path}.customTags.{name}");
            if name.trim().is_empty() {
                v.err(&at, "custom tag name must not be empty", None);
            }
            let set = [tag.literal.is_some(), tag.environment.is_some(), tag.header.is_some()];
            if set.iter().filter(|s| **s).count() != 1 {
                v.err(&at, "a custom tag needs exactly one of literal, environment or header", None);
            }
            if let Some(e) = &tag.environment {
                v.non_empty(&format!("{at}.environment.name"), "environment variable name", &e.name);
            }
            if let Some(h) = &tag.header {
                v.non_empty(&format!("{at}.header.name"), "header name", &h.name);
            }
        }
    }
    let mut modes = std::collections::BTreeSet::new();
    for (i, tr) in t.tracing.iter().enumerate() {
        if !modes.insert(format!("{:?}", tr.mode())) {
            v.err(
                format!("spec.tracing[{i}].match.mode"),
                "two tracing rules for the same mode",
                "use one rule per mode (CLIENT, SERVER or CLIENT_AND_SERVER)".to_string(),
            );
        }
    }
    for (i, al) in t.access_logging.iter().enumerate() {
        let path = format!("spec.accessLogging[{i}]");
        providers(v, &path, &al.providers);
        if let Some(f) = &al.filter {
            v.non_empty(&format!("{path}.filter.expression"), "filter expression", &f.expression);
        }
    }
    for (i, m) in t.metrics.iter().enumerate() {
        let path = format!("spec.metrics[{i}]");
        providers(v, &path, &m.providers);
        v.duration(&format!("{path}.reportingInterval"), &m.reporting_interval);
        for (j, o) in m.overrides.iter().enumerate() {
            let at = format!("{path}.overrides[{j}]");
            if let Some(sel) = &o.matches {
                if sel.metric.is_some() && sel.custom_metric.is_some() {
                    v.err(format!("{at}.match"), "metric and customMetric are mutually exclusive", None);
                }
            }
            for (tag, op) in &o.tag_overrides {
                let tp = format!("{at}.tagOverrides.{tag}");
                if tag.trim().is_empty() {
                    v.err(&tp, "tag name must not be empty", None);
                }
                match (op.operation, &op.value) {
                    (Some(crate::spec::TagOperation::Remove), Some(_)) => {
                        v.err(format!("{tp}.value"), "REMOVE takes no value", None)
                    }
                    (Some(crate::spec::TagOperation::Upsert) | None, None) => v.err(
                        format!("{tp}.value"),
                        "UPSERT needs a value",
                        "set value (a CEL expression), or operation: REMOVE".to_string(),
                    ),
                    _ => {}
                }
            }
        }
    }
}

fn local_workload(v: &mut V, l: &LocalWorkload) {
    let mut names = Vec::new();
    for (i, p) in l.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        v.non_empty(&format!("{path}.name"), "port name", &p.name);
        if names.contains(&p.name) {
            v.err(format!("{path}.name"), format!("duplicate port name `{}`", p.name), None);
        }
        names.push(p.name.clone());
        v.port(&format!("{path}.port"), p.port);
        protocol(v, &format!("{path}.protocol"), &p.protocol);
    }
    if let Some(sa) = &l.service_account {
        v.dns_label("spec.serviceAccount", "service account", sa);
    }
}

/// EnvoyFilter: the local rate limit configurations weft applies must be valid (the
/// patches weft does not apply are accepted and reported by `analyze`, WFT0010).
fn envoy_filter(v: &mut V, ef: &crate::spec::EnvoyFilter) {
    for r in ef.rate_limit_patches() {
        if let Err((path, message)) = r {
            v.err(
                path,
                message,
                "see Envoy's LocalRateLimit (envoy.extensions.filters.http.local_ratelimit.v3)".to_string(),
            );
        }
    }
}

/// weft.dev RateLimit: a limit (requestsPerUnit + unit, or tokenBucket), valid ports,
/// path prefixes starting with `/`, an error status.
fn rate_limit(v: &mut V, rl: &crate::spec::RateLimit) {
    match (&rl.requests_per_unit, &rl.unit, &rl.token_bucket) {
        (Some(n), Some(_), None) => {
            if *n == 0 {
                v.err("spec.requestsPerUnit", "requestsPerUnit must be at least 1", None);
            }
        }
        (None, None, Some(b)) => {
            let check = crate::spec::ratelimit::check_bucket(
                b.max_tokens,
                b.tokens_per_fill,
                b.fill_interval,
                "spec.tokenBucket",
            );
            if let Err((path, message)) = check {
                let path = path
                    .replace("max_tokens", "maxTokens")
                    .replace("tokens_per_fill", "tokensPerFill")
                    .replace("fill_interval", "fillInterval");
                v.err(path, message, None);
            }
        }
        (Some(_), None, None) => {
            v.err("spec.unit", "requestsPerUnit needs a unit", "expected `second`, `minute` or `hour`".to_string())
        }
        (None, Some(_), None) => v.err("spec.requestsPerUnit", "unit needs requestsPerUnit", None),
        (None, None, None) => {
            v.err("spec", "a limit is required", "set requestsPerUnit and unit, or tokenBucket".to_string())
        }
        _ => v.err("spec.tokenBucket", "give either requestsPerUnit/unit or tokenBucket, not both", None),
    }
    for (i, m) in rl.matches.iter().enumerate() {
        if let Some(p) = m.port {
            v.port(&format!("spec.match[{i}].port"), p);
        }
        if let Some(p) = &m.path_prefix {
            if !p.starts_with('/') {
                v.err(format!("spec.match[{i}].pathPrefix"), format!("{p:?} does not start with `/`"), None);
            }
        }
    }
    if let Some(s) = rl.status {
        if !(400..=599).contains(&s) {
            v.err(
                "spec.status",
                format!("{s} is not an error status"),
                "expected 400..=599 (Envoy uses 429 below 400)".to_string(),
            );
        }
    }
    for k in rl.response_headers.iter().flat_map(|h| h.keys()) {
        if k.is_empty() || k.starts_with(':') || http_name_invalid(k) {
            v.err(format!("spec.responseHeaders.{k}"), format!("{k:?} is not a header name weft may add"), None);
        }
    }
}

fn http_name_invalid(k: &str) -> bool {
    !k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b))
}
