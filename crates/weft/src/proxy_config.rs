//! `weft proxy-config PROXY [listeners|routes|clusters|endpoints|secrets] [-o table|json|yaml]`:
//! what the control plane serves one proxy, from `GET /api/v1/proxies/{id}/config`; and,
//! for `secrets`, what the proxy itself holds, from its admin `/config_dump` (Envoy's
//! `SecretsConfigDump`, as `istioctl proxy-config secret` reads it), at the admin address
//! the proxy announced (`WEFT_ADMIN`) or `--admin`.

use std::time::SystemTime;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use weft_identity::cert::{certs_from_pem, CertInfo};

use crate::ops::{call, urlencode};

/// Envoy's type URL of the secrets section of a config dump.
const SECRETS_CONFIG_DUMP: &str = "type.googleapis.com/envoy.admin.v3.SecretsConfigDump";

/// The types, as the CLI names them and as the API keys them.
const TYPES: [(&str, &str); 5] = [
    ("listeners", "Listener"),
    ("routes", "RouteConfiguration"),
    ("clusters", "Cluster"),
    ("endpoints", "ClusterLoadAssignment"),
    ("secrets", "Secret"),
];

/// Runs the command; `admin` overrides the admin address the proxy announced.
pub async fn run(
    server: &str,
    proxy: &str,
    what: Option<&str>,
    output: &str,
    admin: Option<&str>,
) -> anyhow::Result<()> {
    let (status, mut v) = call(server, "GET", &format!("/api/v1/proxies/{}/config", urlencode(proxy)), None).await?;
    if status != 200 {
        bail!("{}", v["error"].as_str().unwrap_or("request failed"));
    }
    let chosen: Vec<(&str, &str)> = match what {
        None => TYPES.to_vec(),
        Some(w) => match TYPES.iter().find(|(cli, _)| *cli == w) {
            Some(t) => vec![*t],
            None => bail!("unknown type {w:?}: expected listeners, routes, clusters, endpoints or secrets"),
        },
    };
    if chosen.iter().any(|(cli, _)| *cli == "secrets") {
        // The secrets the proxy holds (its certificate is not served by the control
        // plane to weft proxies): replace the control plane's view with the proxy's.
        let node_id = v["id"].as_str().unwrap_or(proxy).to_string();
        match proxy_secrets(server, &node_id, admin).await {
            Ok(list) => v["resources"]["Secret"] = json!({"version": "-", "resources": list}),
            Err(e) if what == Some("secrets") => return Err(e),
            Err(e) => eprintln!("secrets: {e:#}; showing what the control plane serves"),
        }
    }
    let resources = |api_key: &str| v["resources"][api_key]["resources"].as_array().cloned().unwrap_or_default();
    match output {
        "json" | "yaml" => {
            let out: Value = if chosen.len() == 1 {
                Value::Array(resources(chosen[0].1))
            } else {
                chosen.iter().map(|(cli, key)| ((*cli).to_string(), Value::Array(resources(key)))).collect()
            };
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print!("{}", serde_yaml_ng::to_string(&out)?);
            }
        }
        _ => {
            for (i, (cli, key)) in chosen.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                let version = v["resources"][*key]["version"].as_str().unwrap_or("-");
                if chosen.len() > 1 {
                    println!("# {cli} (version {version})");
                }
                print!("{}", table(cli, &resources(key)));
            }
        }
    }
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Rows padded into columns.
fn render(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| if i + 1 == n { c } else { format!("{c:<w$}", w = widths[i]) })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
            + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

fn target(action: &Value) -> String {
    if let Some(r) = action.get("route") {
        if let Some(c) = r.get("cluster") {
            return s(c);
        }
        if let Some(w) = r.get("weighted_clusters").and_then(Value::as_array) {
            return w.iter().map(|c| format!("{} {}%", s(&c["name"]), s(&c["weight"]))).collect::<Vec<_>>().join(", ");
        }
    }
    if let Some(r) = action.get("redirect") {
        return format!("redirect {} {}", s(&r["host"]), s(&r["path"]));
    }
    if let Some(d) = action.get("direct_response") {
        return format!("direct response {}", s(d));
    }
    "-".into()
}

fn table(kind: &str, list: &[Value]) -> String {
    match kind {
        "listeners" => {
            let mut rows = Vec::new();
            for l in list {
                let chains = l["filter_chains"].as_array().cloned().unwrap_or_default();
                for c in chains.iter().chain(l.get("default_filter_chain").filter(|d| !d.is_null())) {
                    let m = &c["match"];
                    let how = [
                        m["destination_port"].as_u64().map(|p| format!("port {p}")),
                        m["transport_protocol"].as_str().filter(|t| !t.is_empty()).map(str::to_string),
                        m["application_protocols"]
                            .as_array()
                            .filter(|a| !a.is_empty())
                            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(",")),
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" ");
                    let dest = c["filters"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|f| match (f["routes"].get("rds"), f.get("target")) {
                            (Some(r), _) => format!("Route: {}", s(r)),
                            (None, Some(t)) if !t.is_null() => {
                                format!("Cluster: {}", target(&serde_json::json!({"route": t})))
                            }
                            _ => s(&f["name"]),
                        })
                        .collect::<Vec<_>>()
                        .join("; ");
                    rows.push(vec![
                        s(&l["name"]),
                        s(&l["address"]),
                        if how.is_empty() { "ALL".into() } else { how },
                        dest,
                    ]);
                }
            }
            render(&["NAME", "ADDRESS", "MATCH", "DESTINATION"], rows)
        }
        "routes" => {
            let mut rows = Vec::new();
            for rc in list {
                for vh in rc["virtual_hosts"].as_array().into_iter().flatten() {
                    let domains =
                        vh["domains"].as_array().map(|d| d.iter().map(s).collect::<Vec<_>>()).unwrap_or_default();
                    let shown = match domains.len() {
                        0 => "-".to_string(),
                        1 | 2 => domains.join(", "),
                        n => format!("{} + {} more", domains[0], n - 1),
                    };
                    for r in vh["routes"].as_array().into_iter().flatten() {
                        rows.push(vec![s(&rc["name"]), shown.clone(), s(&r["match"]), target(&r["action"])]);
                    }
                }
            }
            render(&["NAME", "DOMAINS", "MATCH", "ACTION"], rows)
        }
        "clusters" => {
            let rows = list
                .iter()
                .map(|c| {
                    let cb = &c["circuit_breakers"];
                    let od = &c["outlier_detection"];
                    vec![
                        s(&c["name"]),
                        s(&c["type"]),
                        s(&c["lb_policy"]),
                        if cb.is_null() { "-".into() } else { format!("max_requests={}", s(&cb["max_requests"])) },
                        if od.is_null() {
                            "-".into()
                        } else {
                            format!("5xx={} eject={}", s(&od["consecutive_5xx"]), s(&od["base_ejection_time"]))
                        },
                        s(&c["tls"]),
                    ]
                })
                .collect();
            render(&["NAME", "TYPE", "LB", "CIRCUIT BREAKERS", "OUTLIER", "TLS"], rows)
        }
        "endpoints" => {
            let mut rows = Vec::new();
            for cla in list {
                for e in cla["endpoints"].as_array().into_iter().flatten() {
                    rows.push(vec![s(&e["address"]), s(&e["health"]), s(&e["weight"]), s(&cla["cluster_name"])]);
                }
            }
            render(&["ENDPOINT", "STATUS", "WEIGHT", "CLUSTER"], rows)
        }
        "secrets" if list.iter().all(|x| x.get("secret").is_some()) => secrets_table(list, SystemTime::now()),
        _ => render(&["NAME", "KIND"], list.iter().map(|x| vec![s(&x["name"]), s(&x["kind"])]).collect()),
    }
}

/// The proxy's secrets from its own config dump: `dynamic_active_secrets` (status
/// `ACTIVE`) then `dynamic_warming_secrets` (`WARMING`), each entry as dumped with a
/// `status` added. Private keys are never shown (Envoy dumps them redacted, weft not at all).
async fn proxy_secrets(server: &str, node_id: &str, admin: Option<&str>) -> anyhow::Result<Vec<Value>> {
    let admin = match admin {
        Some(a) => a.to_string(),
        None => {
            let (_, list) = call(server, "GET", "/api/v1/proxies", None).await?;
            let announced = list["proxies"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["id"] == node_id)
                .and_then(|p| p["admin"].as_str().map(str::to_string));
            announced.with_context(|| {
                format!("proxy {node_id:?} announced no admin address (WEFT_ADMIN); pass --admin HOST:PORT")
            })?
        }
    };
    let dump = admin_get(&admin, "/config_dump").await?;
    let section = dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["@type"] == SECRETS_CONFIG_DUMP)
        .with_context(|| format!("the config dump of {admin} has no secrets section"))?;
    let mut out = Vec::new();
    for (key, status) in [("dynamic_active_secrets", "ACTIVE"), ("dynamic_warming_secrets", "WARMING")] {
        for entry in section[key].as_array().into_iter().flatten() {
            let mut entry = entry.clone();
            if let Some(secret) = entry.get_mut("secret").and_then(Value::as_object_mut) {
                if let Some(tls) = secret.get_mut("tls_certificate").and_then(Value::as_object_mut) {
                    tls.remove("private_key");
                }
            }
            entry["status"] = json!(status);
            out.push(entry);
        }
    }
    Ok(out)
}

/// `GET path` on a proxy's admin server, as JSON.
async fn admin_get(admin: &str, path: &str) -> anyhow::Result<Value> {
    let addr = admin.trim_start_matches("http://").trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach the proxy's admin server at {addr}"))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder().uri(path).header("host", addr).body(Empty::<Bytes>::new())?;
    let resp = tx.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{addr}{path} answered {status}: {}", String::from_utf8_lossy(&bytes).trim());
    }
    serde_json::from_slice(&bytes).with_context(|| format!("{addr}{path} answered with non-JSON"))
}

/// Istio's `proxy-config secret` table plus the SPIFFE id: one row per secret, the
/// first certificate of its chain (`Cert Chain`) or trust bundle (`CA`).
fn secrets_table(list: &[Value], now: SystemTime) -> String {
    let rows = list
        .iter()
        .map(|x| {
            let secret = &x["secret"];
            let (kind, data) = if let Some(tls) = secret.get("tls_certificate") {
                ("Cert Chain", &tls["certificate_chain"])
            } else if let Some(vc) = secret.get("validation_context") {
                ("CA", &vc["trusted_ca"])
            } else {
                ("-", &Value::Null)
            };
            let cert = data_source(data).and_then(|pem| first_cert(&pem));
            let (valid, serial, not_after, not_before, spiffe) = match &cert {
                Some(c) => (
                    (c.not_before <= now && now < c.not_after).to_string(),
                    istio_serial(&c.serial),
                    rfc3339(c.not_after),
                    rfc3339(c.not_before),
                    c.uris.iter().find(|u| u.starts_with("spiffe://")).cloned().unwrap_or_else(|| "-".into()),
                ),
                None => ("false".into(), "-".into(), "-".into(), "-".into(), "-".into()),
            };
            vec![s(&x["name"]), kind.into(), s(&x["status"]), valid, serial, not_after, not_before, spiffe]
        })
        .collect();
    render(
        &["RESOURCE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE", "SPIFFE ID"],
        rows,
    )
}

/// The PEM text of an Envoy `DataSource` as dumped (`inline_bytes` base64, or
/// `inline_string`).
fn data_source(v: &Value) -> Option<String> {
    if let Some(b64) = v["inline_bytes"].as_str() {
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        return String::from_utf8(bytes).ok();
    }
    v["inline_string"].as_str().map(str::to_string)
}

fn first_cert(pem: &str) -> Option<CertInfo> {
    let certs = certs_from_pem(pem, "certificate").ok()?;
    CertInfo::parse(certs.first()?).ok()
}

/// A serial as Istio prints it: lowercase hex without leading zeros.
fn istio_serial(hex: &str) -> String {
    let trimmed = hex.to_ascii_lowercase().trim_start_matches('0').to_string();
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
