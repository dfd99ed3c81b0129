//! What `/config_dump` and `/clusters` show: the running configuration, summarised
//! from the accepted resources and the compiled clusters, and the secrets in use in
//! Envoy's `SecretsConfigDump` shape (certificates only, never the private key).

use base64::Engine as _;
use serde_json::{json, Value};
use weft_identity::cert::cert_pem;
use weft_identity::Identity;
use weft_xds::ClientStatus;

use crate::cluster::Health;
use crate::config::{ChainKind, ProxySnapshot, RouteSource};

/// Envoy's type URL of the secrets section of a config dump.
pub const SECRETS_CONFIG_DUMP: &str = "type.googleapis.com/envoy.admin.v3.SecretsConfigDump";

/// JSON view of everything the proxy runs, with versions and xDS state; `identity` is
/// the mesh identity it serves, if any (dumped under `configs` as Envoy does).
pub fn config_dump(s: &ProxySnapshot, xds: &ClientStatus, identity: Option<&Identity>) -> Value {
    let listeners: Vec<Value> = s
        .listeners
        .values()
        .map(|l| {
            let chains: Vec<Value> = l
                .chains
                .iter()
                .chain(l.default_chain.iter())
                .map(|c| {
                    let kind = match &c.kind {
                        ChainKind::Http(h) => json!({
                            "type": "http",
                            "route_config": match &h.routes { RouteSource::Rds(n) => n.clone(), RouteSource::Inline(t) => format!("inline:{}", t.name()) },
                            "fault": h.fault.is_some(),
                            "upgrades": h.upgrades,
                        }),
                        ChainKind::Tcp(t) => json!({"type": "tcp", "clusters": format!("{:?}", t.clusters)}),
                    };
                    json!({
                        "name": c.name,
                        "match": {
                            "destination_port": c.matcher.destination_port,
                            "transport_protocol": c.matcher.transport_protocol,
                            "application_protocols": c.matcher.application_protocols,
                            "server_names": c.matcher.server_names,
                        },
                        "filter": kind,
                    })
                })
                .collect();
            json!({
                "name": l.name,
                "address": l.address.to_string(),
                "bind_to_port": l.bind,
                "use_original_dst": l.use_original_dst,
                "direction": format!("{:?}", l.direction),
                "filter_chains": chains,
            })
        })
        .collect();
    let routes: Vec<Value> = s
        .raw
        .routes
        .values()
        .map(|rc| {
            let vhosts: Vec<Value> = rc
                .virtual_hosts
                .iter()
                .map(|vh| {
                    json!({
                        "name": vh.name,
                        "domains": vh.domains,
                        "routes": vh.routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({"name": rc.name, "virtual_hosts": vhosts})
        })
        .collect();
    let clusters: Vec<Value> = s
        .clusters
        .values()
        .map(|c| {
            let ejected = c.ejected();
            json!({
                "name": c.config.name,
                "discovery": format!("{:?}", c.config.discovery),
                "lb_policy": format!("{:?}", c.config.lb),
                "protocol": format!("{:?}", c.config.protocol),
                "connect_timeout_ms": c.config.connect_timeout.as_millis() as u64,
                "endpoints": c.endpoints().iter().map(|e| json!({
                    "address": e.addr.to_string(),
                    "weight": e.weight,
                    "health": format!("{:?}", e.health),
                    "outlier_ejected": ejected.contains(&e.addr),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let age = s.built_at.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs_f64());
    json!({
        "versions": s.versions,
        "config_age_seconds": age,
        "xds": {
            "connected": xds.connected,
            "connects": xds.connects,
            "acked": xds.acked,
            "nacks": xds.nacks,
            "last_nack": xds.last_nack,
        },
        "listeners": listeners,
        "routes": routes,
        "clusters": clusters,
        "configs": [secrets_dump(identity)],
    })
}

/// Envoy's `SecretsConfigDump` for the mesh identity: `default` (the certificate chain
/// this proxy presents, leaf first; the private key is never dumped) and `ROOTCA` (the
/// roots it trusts), PEM in `inline_bytes` as Envoy dumps SDS secrets. Empty without an
/// identity.
pub fn secrets_dump(identity: Option<&Identity>) -> Value {
    let mut secrets = Vec::new();
    if let Some(id) = identity {
        let pem = |ders: &mut dyn Iterator<Item = &[u8]>| {
            let text: String = ders.map(cert_pem).collect();
            base64::engine::general_purpose::STANDARD.encode(text)
        };
        let chain = pem(&mut id.certified_key.cert.iter().map(|c| c.as_ref()));
        let roots = pem(&mut id.roots.roots.iter().map(|c| c.as_ref()));
        secrets.push(json!({
            "name": crate::tls::DEFAULT_SECRET,
            "version_info": id.serial,
            "secret": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": crate::tls::DEFAULT_SECRET,
                "tls_certificate": { "certificate_chain": { "inline_bytes": chain } },
            },
        }));
        secrets.push(json!({
            "name": crate::tls::ROOT_SECRET,
            "version_info": id.roots.version.to_string(),
            "secret": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": crate::tls::ROOT_SECRET,
                "validation_context": { "trusted_ca": { "inline_bytes": roots } },
            },
        }));
    }
    json!({ "@type": SECRETS_CONFIG_DUMP, "dynamic_active_secrets": secrets })
}

/// Envoy-style `/clusters` text: one line per endpoint fact.
pub fn clusters_text(s: &ProxySnapshot) -> String {
    let mut out = String::new();
    for c in s.clusters.values() {
        let ejected = c.ejected();
        for e in c.endpoints() {
            // Envoy's flags: `healthy`, or the reasons a host is out.
            let health = match e.health {
                _ if ejected.contains(&e.addr) => "/failed_outlier_check",
                Health::Healthy => "healthy",
                Health::Degraded => "/degraded_eds_health",
                Health::Unhealthy => "/failed_eds_health",
            };
            let p = format!("{}::{}", c.config.name, e.addr);
            out.push_str(&format!("{p}::health_flags::{health}\n"));
            out.push_str(&format!("{p}::weight::{}\n", e.weight));
            out.push_str(&format!("{p}::rq_active::{}\n", e.load.in_flight()));
            out.push_str(&format!("{p}::ewma_rtt_ms::{:.3}\n", e.load.ewma().as_secs_f64() * 1000.0));
        }
    }
    out
}
