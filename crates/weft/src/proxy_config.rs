//! `weft proxy-config PROXY [listeners|routes|clusters|endpoints|secrets] [-o table|json|yaml]`:
//! what the control plane serves one proxy, from `GET /api/v1/proxies/{id}/config`.

use anyhow::bail;
use serde_json::Value;

use crate::ops::{call, urlencode};

/// The types, as the CLI names them and as the API keys them.
const TYPES: [(&str, &str); 5] = [
    ("listeners", "Listener"),
    ("routes", "RouteConfiguration"),
    ("clusters", "Cluster"),
    ("endpoints", "ClusterLoadAssignment"),
    ("secrets", "Secret"),
];

/// Runs the command.
pub async fn run(server: &str, proxy: &str, what: Option<&str>, output: &str) -> anyhow::Result<()> {
    let (status, v) = call(server, "GET", &format!("/api/v1/proxies/{}/config", urlencode(proxy)), None).await?;
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
        _ => render(&["NAME", "KIND"], list.iter().map(|x| vec![s(&x["name"]), s(&x["kind"])]).collect()),
    }
}
