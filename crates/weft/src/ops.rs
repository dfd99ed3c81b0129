//! The operator commands that talk to a running control plane's JSON API:
//! `apply`, `get`, `delete`, `proxy-status`, `proxy-config`.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The admin token given with `--token-file`.
static ADMIN_TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the admin token the API calls send (`weft --token-file`).
pub fn set_admin_token(token: String) {
    let _ = ADMIN_TOKEN.set(token);
}

/// The admin token for `addr`: `--token-file`, else `WEFT_TOKEN`, else the token of the
/// running `weft up` when `addr` is its API, else that of a running `weft control`
/// without `--data-dir` serving `addr` (`crate::ephemeral`).
pub fn admin_token(addr: &str) -> Option<String> {
    if let Some(t) = ADMIN_TOKEN.get() {
        return Some(t.clone());
    }
    if let Some(t) = std::env::var("WEFT_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
        return Some(t.trim().to_string());
    }
    let up = crate::local::running().filter(|m| m.api.trim_start_matches("http://").trim_end_matches('/') == addr);
    match up {
        Some(mesh) => std::fs::read_to_string(mesh.admin_token_file?).ok().map(|t| t.trim().to_string()),
        // A `weft control` without --data-dir on this machine.
        None => crate::ephemeral::admin_token_for(addr),
    }
}

/// One request to the API; returns the status and the JSON body.
pub async fn call(server: &str, method: &str, path: &str, body: Option<String>) -> anyhow::Result<(u16, Value)> {
    let addr = server.trim_start_matches("http://").trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| {
        format!("cannot reach the control plane at {addr} (is `weft control` running? --server / WEFT_SERVER)")
    })?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", addr);
    if let Some(token) = admin_token(addr) {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req.header("content-type", "application/yaml").body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = tx.send_request(req).await?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let v: Value =
        serde_json::from_slice(&bytes).with_context(|| format!("the control plane answered {status} with non-JSON"))?;
    if status == 401 {
        bail!(
            "{}",
            v["error"].as_str().unwrap_or("the control plane wants its admin token (--token-file, WEFT_TOKEN)")
        );
    }
    Ok((status, v))
}

pub fn files_text(files: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    for f in files {
        if f.as_os_str() == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading standard input")?;
            out.push((PathBuf::from("<stdin>"), text));
        } else if f.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(f)
                .with_context(|| format!("{}: cannot read", f.display()))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")))
                .collect();
            entries.sort();
            out.extend(files_text(&entries)?);
        } else {
            let text = std::fs::read_to_string(f).with_context(|| format!("{}: cannot read", f.display()))?;
            out.push((f.clone(), text));
        }
    }
    Ok(out)
}

/// `weft apply -f` / `weft delete -f`: sends each file; prints what was accepted and
/// every error. Fails when anything was rejected.
pub async fn change(server: &str, files: &[PathBuf], delete: bool) -> anyhow::Result<()> {
    let mut failed = false;
    for (path, text) in files_text(files)? {
        let endpoint = if delete { "/api/v1/delete" } else { "/api/v1/apply" };
        let source = urlencode(&path.display().to_string());
        if !delete {
            unapplied_warnings(&path, &text);
        }
        let (_, v) = call(server, "POST", &format!("{endpoint}?source={source}"), Some(text)).await?;
        // A resource annotated `weft.dev/staged: "true"` is staged, not configured.
        let done = match (delete, v["staged"].is_string()) {
            (true, _) => "deleted",
            (false, true) => "staged (weft rollout status)",
            (false, false) => "configured",
        };
        for k in v["accepted"].as_array().into_iter().flatten() {
            println!("{} {done}", k.as_str().unwrap_or_default());
        }
        for e in v["errors"].as_array().into_iter().flatten() {
            failed = true;
            eprintln!("error: {}", e.as_str().unwrap_or_default());
        }
    }
    if failed {
        bail!("some resources were rejected (see above); the others were applied");
    }
    Ok(())
}

/// `weft apply --staged`: how a staged change is rolled out.
#[derive(clap::Args, Debug, Clone)]
pub struct StagedArgs {
    /// Stage the change: the control plane serves it to a canary share of the proxies it
    /// affects first, compares their requests with the others' for an interval, then
    /// applies it everywhere or reverts it (VirtualService, DestinationRule and
    /// AuthorizationPolicy; also asked by the annotation `weft.dev/staged: "true"`).
    #[arg(long)]
    pub staged: bool,
    /// With --staged: share of the affected workloads that get the change first, percent.
    #[arg(long, requires = "staged", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub canary_percent: Option<u32>,
    /// With --staged: how long the canaries run before the comparison (e.g. `30s`).
    #[arg(long, requires = "staged")]
    pub interval: Option<String>,
}

/// `weft apply --staged -f ...`: sends all files as one staged change.
pub async fn apply_staged(server: &str, files: &[PathBuf], args: &StagedArgs) -> anyhow::Result<()> {
    let texts = files_text(files)?;
    let text: Vec<String> = texts.iter().map(|(_, t)| t.clone()).collect();
    let source = texts.first().map(|(p, _)| urlencode(&p.display().to_string())).unwrap_or_default();
    let mut path = format!("/api/v1/apply?staged=true&source={source}");
    if let Some(p) = args.canary_percent {
        path.push_str(&format!("&canaryPercent={p}"));
    }
    if let Some(i) = &args.interval {
        weft_api::spec::Duration::parse(i).map_err(|e| anyhow::anyhow!("--interval {i:?}: {e}"))?;
        path.push_str(&format!("&interval={}", urlencode(i)));
    }
    let (_, v) = call(server, "POST", &path, Some(text.join("\n---\n"))).await?;
    for e in v["errors"].as_array().into_iter().flatten() {
        eprintln!("error: {}", e.as_str().unwrap_or_default());
    }
    let Some(name) = v["staged"].as_str() else { bail!("nothing was staged") };
    for k in v["accepted"].as_array().into_iter().flatten() {
        println!("{} staged", k.as_str().unwrap_or_default());
    }
    if let Some(m) = v["event"]["message"].as_str() {
        println!("{name}: {m}");
    }
    println!("follow it with `weft rollout status`");
    Ok(())
}

/// Prints, as warnings, what `weft analyze` reports as accepted but not applied by weft
/// (its `WFT` codes: a file's own settings, needing no other resource to judge).
fn unapplied_warnings(path: &std::path::Path, text: &str) {
    let parsed = weft_api::parse_str(text, path);
    for m in weft_api::analyze::analyze(&parsed.resources)
        .iter()
        .filter(|m| m.code.starts_with("WFT") && !m.code.starts_with("WFT002"))
    {
        eprintln!("warning: {m}");
    }
    for m in weft_api::analyze::unapplied_kinds(&parsed.skipped) {
        eprintln!("warning: {m}");
    }
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `weft get KIND [NAME]`.
pub async fn get(server: &str, kind: &str, name: Option<&str>, output: &str) -> anyhow::Result<()> {
    let json = output == "json";
    let mut path = format!("/api/v1/resources?kind={}", urlencode(kind));
    if let Some(n) = name {
        path.push_str(&format!("&name={}", urlencode(n)));
    }
    let (status, v) = call(server, "GET", &path, None).await?;
    if status != 200 {
        bail!("{}", v["error"].as_str().unwrap_or("request failed"));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if output == "yaml" {
        print!("{}", as_yaml(&v)?);
        return Ok(());
    }
    println!("{:<16} {:<28} {:<22} SOURCE", "NAMESPACE", "NAME", "KIND");
    for i in v["items"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<28} {:<22} {}",
            i["namespace"].as_str().unwrap_or_default(),
            i["name"].as_str().unwrap_or_default(),
            i["kind"].as_str().unwrap_or_default(),
            i["source"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

/// The items of a `/api/v1/resources` answer as Kubernetes objects in YAML documents
/// (`apiVersion`, `kind`, `metadata`, `spec`, and `status` where the control plane has one).
fn as_yaml(v: &serde_json::Value) -> anyhow::Result<String> {
    let mut out = String::new();
    for i in v["items"].as_array().into_iter().flatten() {
        let mut metadata = serde_json::json!({"name": i["name"], "namespace": i["namespace"]});
        if i["labels"].as_object().is_some_and(|l| !l.is_empty()) {
            metadata["labels"] = i["labels"].clone();
        }
        let mut doc = serde_json::json!({
            "apiVersion": i["apiVersion"], "kind": i["kind"], "metadata": metadata, "spec": i["spec"],
        });
        if !i["status"].is_null() {
            doc["status"] = i["status"].clone();
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&doc)?);
    }
    Ok(out)
}

/// `weft proxy-status [-o json]`.
pub async fn proxy_status(server: &str, json: bool) -> anyhow::Result<()> {
    let (_, v) = call(server, "GET", "/api/v1/proxies", None).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if let Some(e) = v["replicasError"].as_str() {
        eprintln!("warning: only this replica's proxies are listed: {e}");
    }
    println!("{:<44} {:<8} {:<9} {:<9} {:<9} {:<9} {:<6} REPLICA", "NAME", "KIND", "CDS", "LDS", "EDS", "RDS", "AGE");
    for p in v["proxies"].as_array().into_iter().flatten() {
        let t = |k: &str| p["types"][k]["status"].as_str().unwrap_or("-").to_string();
        let age = ["Cluster", "Listener"]
            .iter()
            .filter_map(|k| p["types"][*k]["config_age_seconds"].as_f64())
            .fold(None::<f64>, |a, b| Some(a.map_or(b, |a| a.min(b))));
        let name = format!("{}.{}", p["name"].as_str().unwrap_or("?"), p["namespace"].as_str().unwrap_or("?"));
        println!(
            "{:<44} {:<8} {:<9} {:<9} {:<9} {:<9} {:<6} {}",
            name,
            p["kind"].as_str().unwrap_or("-"),
            t("Cluster"),
            t("Listener"),
            t("ClusterLoadAssignment"),
            t("RouteConfiguration"),
            age.map(|a| format!("{a:.0}s")).unwrap_or_else(|| "-".into()),
            // With replicas on etcd: the xDS address of the replica the proxy is on.
            p["replica"]["xds"].as_str().unwrap_or("-")
        );
    }
    Ok(())
}

/// `weft ca-rotate STEP`.
pub async fn ca_rotate(server: &str, step: &str) -> anyhow::Result<()> {
    let (status, v) = call(server, "POST", &format!("/api/v1/ca/rotate?step={}", urlencode(step)), None).await?;
    if status != 200 {
        bail!("{}", v["error"].as_str().unwrap_or("the control plane refused the rotation step"));
    }
    println!("root rotation: {step} done; {} root(s) trusted", v["roots"]);
    Ok(())
}
