//! `weft tap deploy/NAME|svc/NAME`: live requests of a workload or service, one line
//! each (Linkerd's `tap`), from the control plane's `GET /api/v1/tap` stream.

use std::io::Write as _;

use anyhow::{bail, Context as _};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::ops::urlencode;

/// What `weft tap` asks for.
#[derive(Debug, Clone, clap::Args)]
pub struct TapArgs {
    /// deploy/NAME (a workload's proxies) or svc/NAME (the proxies a Service selects).
    pub target: String,
    /// Namespace of the target.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Only requests whose path starts with this.
    #[arg(long)]
    pub path: Option<String>,
    /// Only requests with this method.
    #[arg(long)]
    pub method: Option<String>,
    /// Only requests for this authority.
    #[arg(long)]
    pub authority: Option<String>,
    /// Only responses with this status.
    #[arg(long)]
    pub status: Option<u16>,
    /// Only inbound (`in`) or outbound (`out`) requests.
    #[arg(long, value_parser = ["in", "out"])]
    pub direction: Option<String>,
    /// Events per second shown; more are dropped and counted.
    #[arg(long, default_value_t = 100)]
    pub max_rps: u32,
    /// Output format: text or json (the API's lines as they come).
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
    /// The control plane's API (default: the running `weft up`, else 127.0.0.1:15014).
    #[arg(long, env = "WEFT_SERVER")]
    pub server: Option<String>,
}

/// The query string of `GET /api/v1/tap` for `args`.
pub fn query(args: &TapArgs) -> String {
    let mut q = vec![
        format!("target={}", urlencode(&args.target)),
        format!("namespace={}", urlencode(&args.namespace)),
        format!("max_rps={}", args.max_rps),
    ];
    let optional = [
        ("path", args.path.clone()),
        ("method", args.method.clone()),
        ("authority", args.authority.clone()),
        ("status", args.status.map(|s| s.to_string())),
        ("direction", args.direction.clone()),
    ];
    q.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| format!("{k}={}", urlencode(&v)))));
    q.join("&")
}

/// Streams the tap until the control plane ends it or the user interrupts.
pub async fn run(server: &str, args: &TapArgs) -> anyhow::Result<()> {
    let addr = server.trim_start_matches("http://").trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| {
        format!("cannot reach the control plane at {addr} (is `weft control` running? --server / WEFT_SERVER)")
    })?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::get(format!("/api/v1/tap?{}", query(args))).header("host", addr);
    if let Some(token) = crate::ops::admin_token(addr) {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req.body(Full::new(Bytes::new()))?;
    let resp = tx.send_request(req).await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    if status != 200 {
        let bytes = body.collect().await?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        bail!("tap refused ({status}): {}", v["error"].as_str().unwrap_or("no reason given"));
    }
    let json = args.output == "json";
    let mut buf = Vec::new();
    let mut out = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        buf.extend_from_slice(&data);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let v: Value = serde_json::from_slice(&line).context("the control plane sent a line that is not JSON")?;
            let text = if json { v.to_string() } else { render(&v) };
            if !text.is_empty() {
                writeln!(out, "{text}")?;
                out.flush()?;
            }
        }
    }
    Ok(())
}

/// One line of text for one line of the stream (Linkerd's tap format on one line).
pub fn render(v: &Value) -> String {
    if let Some(t) = v.get("tap") {
        let n = t["proxies"].as_array().map_or(0, Vec::len);
        return format!("# tapping {n} prox{} (max {} events/s)", if n == 1 { "y" } else { "ies" }, t["max_rps"]);
    }
    if let Some(d) = v.get("dropped") {
        return format!("# dropped {d} events over the rate limit or queues ({} in all)", v["total_dropped"]);
    }
    let Some(e) = v.get("event") else { return String::new() };
    let s = |k: &str| e[k].as_str().unwrap_or("-").to_string();
    let peer = |p: &Value| match (p["workload"].as_str(), p["namespace"].as_str()) {
        (Some(w), Some(n)) if w != "unknown" => format!("{w}.{n}"),
        _ => p["principal"].as_str().unwrap_or("unknown").to_string(),
    };
    format!(
        "req id={} proxy={} src={} dst={} tls={} :method={} :authority={} :path={} rsp :status={} latency={:.1}ms flags={}",
        s("request_id"),
        if e["direction"] == "inbound" { "in" } else { "out" },
        peer(&e["source"]),
        peer(&e["destination"]),
        e["tls"].as_bool().unwrap_or(false),
        s("method"),
        s("authority"),
        s("path"),
        e["status"],
        e["latency_ms"].as_f64().unwrap_or(0.0),
        s("flags"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_an_event_like_linkerd_tap() {
        let v = serde_json::json!({"event": {
            "request_id": "abc", "direction": "inbound",
            "source": {"workload": "productpage-v1", "namespace": "default", "principal": "spiffe://x"},
            "destination": {"workload": "reviews-v2", "namespace": "default", "principal": "spiffe://y"},
            "tls": true, "method": "GET", "authority": "reviews:9080", "path": "/reviews/1",
            "status": 200, "latency_ms": 1.24, "flags": "-"}});
        assert_eq!(
            render(&v),
            "req id=abc proxy=in src=productpage-v1.default dst=reviews-v2.default tls=true :method=GET :authority=reviews:9080 :path=/reviews/1 rsp :status=200 latency=1.2ms flags=-"
        );
    }
}
