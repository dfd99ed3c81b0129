//! Proxy memory against mesh size: one weft sidecar (delta xDS, on demand, with a mesh
//! identity) talking to 2 services while the control plane holds `n`.

use std::time::Duration;

use crate::load::{self, Target};
use crate::procs::{free_port, Pinning};
use crate::stack::{spawn_weft, wait_ready, wait_through, weft_bootstrap, Apps, Control, Proxy, Tools};

/// `n` Services `svc-0..svc-<n-1>` (HTTP port 9080); `svc-0` and `svc-1` backed by
/// WorkloadEntries pointing at the echo application.
pub fn mesh(n: usize, apps: Apps) -> String {
    let mut docs: Vec<String> = (0..n)
        .map(|i| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: default}}\nspec:\n  selector: {{app: svc-{i}}}\n  ports: [{{name: http, port: 9080}}]\n")
        })
        .collect();
    for i in 0..2.min(n) {
        docs.push(format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: svc-{i}-a, namespace: default}}\nspec:\n  address: {}\n  labels: {{app: svc-{i}}}\n  ports: {{http: {}}}\n",
            apps.h1.ip(),
            apps.h1.port()
        ));
    }
    docs.join("---\n")
}

/// RSS of a sidecar talking to 2 services in a mesh of `n`.
pub async fn proxy_memory(tools: &Tools, pin: &Pinning, apps: Apps, n: usize) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::Builder::new().prefix("weft-bench-mesh-").tempdir()?;
    let control = Control::start(&tools.weft, dir.path(), &mesh(n, apps), pin, tools.quiet_control).await?;
    let token = control.token("client").await?;
    let (admin, metrics, outbound) = (free_port()?, free_port()?, free_port()?);
    let b = weft_bootstrap("client", "client", control.xds, &token, &[], None, outbound, admin, metrics, "delta");
    let mut proc = spawn_weft(tools, dir.path(), "client", &b, pin, 1)?;
    let ready_ms = wait_ready(&mut proc, admin).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_ready = proc.stats()?;
    let mut proxies = vec![Proxy {
        role: "client",
        proc,
        admin: Some(admin),
        metrics: Some(metrics),
        stats_socket: None,
        ready_ms: Some(ready_ms),
    }];
    let mut sent = 0;
    for svc in ["svc-0", "svc-1"] {
        let target = Target { addr: outbound, uri: format!("http://{svc}:9080/").parse()? };
        wait_through(&target, false, &mut proxies).await?;
        sent += load::h1_fixed_rate(&target, 200, 4, Duration::from_secs(2)).await?.ok;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = proxies[0].proc.stats()?;
    let (_, dump) = crate::procs::get(admin, "/config_dump").await?;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap_or_default();
    let vhosts: usize = dump["routes"]
        .as_array()
        .map_or(0, |rs| rs.iter().map(|r| r["virtual_hosts"].as_array().map_or(0, Vec::len)).sum());
    let clusters = dump["clusters"].as_array().map_or(0, Vec::len);
    drop(control);
    Ok(serde_json::json!({
        "services": n,
        "mode": "delta on demand, mTLS identity",
        "ready_ms": ready_ms,
        "requests": sent,
        "rss_mib": { "ready": at_ready.rss_kib as f64 / 1024.0, "after_requests": after.rss_kib as f64 / 1024.0, "peak": after.hwm_kib as f64 / 1024.0 },
        "held": { "virtual_hosts": vhosts, "clusters": clusters },
    }))
}
