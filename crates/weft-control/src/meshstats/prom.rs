//! [`MeshStats`] over a user's Prometheus (`weft control --prometheus URL`): the same
//! questions asked in PromQL over the Istio standard metrics Prometheus scrapes from the
//! proxies (`increase(istio_requests_total[W])`, by `le` for the latency histogram), so
//! a mesh that already runs Prometheus needs no second copy of its history.
//!
//! `MeshStats` is synchronous; each call waits for its queries (each bounded by the
//! timeout). On a multi-threaded runtime the wait happens in `block_in_place`, elsewhere
//! on a helper thread. A query that fails answers as no data (logged).
//! Prometheus's `increase` extrapolates to the window's edges, so its totals are
//! estimates, not exact counts.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::series::{edges_of, Point, SeriesKey, BOUNDS_MS};
use super::{Edge, MeshStats, Reporter, Selector, WindowStats};

/// Largest query answer read.
const MAX_ANSWER: usize = 32 << 20;
/// Labels an edge is grouped by.
const EDGE_LABELS: &str = "reporter, source_workload, source_workload_namespace, destination_service, destination_service_namespace, destination_workload, destination_workload_namespace, destination_version, connection_security_policy";

/// A series' labels.
type Labels = HashMap<String, String>;

/// Mesh statistics read from Prometheus.
pub struct PromStats {
    base: String,
    timeout: Duration,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl PromStats {
    /// Reads from the Prometheus at `url` (`http://HOST:PORT[/prefix]`).
    pub fn new(url: &str, timeout: Duration) -> Result<PromStats, String> {
        let base = url.trim_end_matches('/').to_string();
        let uri: http::Uri = base.parse().map_err(|e| format!("--prometheus {url:?}: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(format!("--prometheus {url:?}: expected http://HOST:PORT"));
        }
        // No idle connections kept: a query may run on a short-lived helper runtime.
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http();
        Ok(PromStats { base, timeout, client })
    }

    /// Runs an instant query: the result vector as (labels, value).
    fn query(&self, promql: &str) -> Vec<(Labels, f64)> {
        let url = format!("{}/api/v1/query?query={}", self.base, encode(promql));
        match self.get(url) {
            Ok(v) => v["data"]["result"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| Some((labels(&r["metric"]), sample(&r["value"])?)))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, %promql, "Prometheus query failed");
                Vec::new()
            }
        }
    }

    /// Runs a range query: per series, (labels, [(time, value)]).
    fn query_range(&self, promql: &str, start: u64, end: u64, step: u64) -> Vec<(Labels, Vec<(u64, f64)>)> {
        let url =
            format!("{}/api/v1/query_range?query={}&start={start}&end={end}&step={step}", self.base, encode(promql));
        match self.get(url) {
            Ok(v) => v["data"]["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    let points = r["values"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| Some((p[0].as_f64()? as u64, sample(p)?)))
                        .collect();
                    (labels(&r["metric"]), points)
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, %promql, "Prometheus range query failed");
                Vec::new()
            }
        }
    }

    fn get(&self, url: String) -> Result<Value, String> {
        let client = self.client.clone();
        let timeout = self.timeout;
        wait(async move {
            let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
            let fetch = async {
                let resp = client.get(uri).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER);
                let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
                let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("status {status}, not JSON: {e}"))?;
                if v["status"] != "success" {
                    return Err(format!("status {status}: {}", v["error"]));
                }
                Ok(v)
            };
            tokio::time::timeout(timeout, fetch).await.map_err(|_| "timed out".to_string())?
        })
    }
}

impl MeshStats for PromStats {
    fn window(&self, sel: &Selector, window: Duration) -> WindowStats {
        let w = window.as_secs().max(1);
        let m = matchers(sel, "");
        let total = |extra: &str| {
            let q = format!("sum(increase(istio_requests_total{{{}}}[{w}s]))", join(&m, extra));
            self.query(&q).first().map(|(_, v)| *v).unwrap_or(0.0)
        };
        let requests = total("");
        let errors = total("response_code=~\"5..\"");
        let q = format!("sum by (le) (increase(istio_request_duration_milliseconds_bucket{{{m}}}[{w}s]))");
        let buckets: Vec<(String, f64)> =
            self.query(&q).into_iter().map(|(l, v)| (l.get("le").cloned().unwrap_or_default(), v)).collect();
        WindowStats { requests, errors, latency_ms: histogram(&buckets, requests), covered: window }
    }

    fn edges(&self, window: Duration) -> Vec<Edge> {
        let w = window.as_secs().max(1);
        let by = |extra: &str| {
            let q = format!("sum by ({EDGE_LABELS}) (increase(istio_requests_total{{{extra}}}[{w}s])) > 0");
            self.query(&q)
        };
        let mut per: HashMap<SeriesKey, WindowStats> = HashMap::new();
        for (l, v) in by("") {
            if let Some(k) = key(&l) {
                per.entry(k).or_default().requests += v;
            }
        }
        for (l, v) in by("response_code=~\"5..\"") {
            if let Some(k) = key(&l) {
                per.entry(k).or_default().errors += v;
            }
        }
        let q = format!("sum by ({EDGE_LABELS}, le) (increase(istio_request_duration_milliseconds_bucket[{w}s])) > 0");
        let mut buckets: HashMap<SeriesKey, Vec<(String, f64)>> = HashMap::new();
        for (l, v) in self.query(&q) {
            if let Some(k) = key(&l) {
                buckets.entry(k).or_default().push((l.get("le").cloned().unwrap_or_default(), v));
            }
        }
        for (k, s) in per.iter_mut() {
            s.latency_ms = histogram(buckets.get(k).map(Vec::as_slice).unwrap_or(&[]), s.requests);
            s.covered = window;
        }
        edges_of(per.into_iter())
    }

    fn series(&self, sel: &Selector, window: Duration, step: Duration) -> Vec<Point> {
        let step = step.as_secs().max(10);
        let end = unix_now();
        let start = end.saturating_sub(window.as_secs());
        let m = matchers(sel, "");
        let range = |q: String| self.query_range(&q, start, end, step);
        let one = |q: String| -> HashMap<u64, f64> { range(q).into_iter().flat_map(|(_, p)| p).collect() };
        let requests = one(format!("sum(increase(istio_requests_total{{{m}}}[{step}s]))"));
        let errors =
            one(format!("sum(increase(istio_requests_total{{{}}}[{step}s]))", join(&m, "response_code=~\"5..\"")));
        let mut le: HashMap<u64, Vec<(String, f64)>> = HashMap::new();
        for (l, points) in
            range(format!("sum by (le) (increase(istio_request_duration_milliseconds_bucket{{{m}}}[{step}s]))"))
        {
            let bound = l.get("le").cloned().unwrap_or_default();
            for (t, v) in points {
                le.entry(t).or_default().push((bound.clone(), v));
            }
        }
        let mut times: Vec<u64> = requests.keys().copied().collect();
        times.sort_unstable();
        times
            .into_iter()
            .map(|t| {
                let r = requests.get(&t).copied().unwrap_or(0.0);
                let stats = WindowStats {
                    requests: r,
                    errors: errors.get(&t).copied().unwrap_or(0.0),
                    latency_ms: histogram(le.get(&t).map(Vec::as_slice).unwrap_or(&[]), r),
                    covered: Duration::from_secs(step),
                };
                Point { start: t.saturating_sub(step), step, stats, denied: 0.0 }
            })
            .collect()
    }

    fn denials(&self, window: Duration) -> Vec<(SeriesKey, f64)> {
        let w = window.as_secs().max(1);
        let q = format!(
            "sum by ({EDGE_LABELS}) (increase(istio_requests_total{{reporter=\"destination\",response_code=\"403\",response_flags=\"-\"}}[{w}s])) > 0"
        );
        let mut out: Vec<(SeriesKey, f64)> =
            self.query(&q).into_iter().filter_map(|(l, v)| Some((key(&l)?, v))).collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out
    }
}

/// Runs `f` to completion from synchronous code, on or off a tokio runtime.
fn wait<T: Send + 'static>(f: impl Future<Output = Result<T, String>> + Send + 'static) -> Result<T, String> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(f))
        }
        _ => std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(f)
        })
        .join()
        .map_err(|_| "the query thread panicked".to_string())?,
    }
}

/// PromQL label matchers for `sel`.
fn matchers(sel: &Selector, extra: &str) -> String {
    let reporter = match sel.reporter {
        Reporter::Destination => "destination",
        Reporter::Source => "source",
    };
    let mut m = vec![format!("reporter=\"{reporter}\"")];
    for (label, v) in [
        ("destination_service", &sel.destination_service),
        ("destination_service_namespace", &sel.destination_namespace),
        ("destination_workload", &sel.destination_workload),
        ("destination_version", &sel.destination_version),
        ("source_workload", &sel.source_workload),
        ("source_workload_namespace", &sel.source_namespace),
    ] {
        if let Some(v) = v {
            m.push(format!("{label}=\"{}\"", quote(v)));
        }
    }
    join(&m.join(","), extra)
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a},{b}"),
    }
}

/// A PromQL string literal's inside.
fn quote(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn labels(v: &Value) -> Labels {
    v.as_object().into_iter().flatten().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect()
}

/// `[time, "value"]` -> value.
fn sample(v: &Value) -> Option<f64> {
    v.get(1)?.as_str()?.parse::<f64>().ok().filter(|x| x.is_finite())
}

fn key(l: &Labels) -> Option<SeriesKey> {
    let get = |k: &str| l.get(k).cloned().unwrap_or_else(|| "unknown".to_string());
    let reporter = match l.get("reporter").map(String::as_str) {
        Some("destination") => Reporter::Destination,
        Some("source") => Reporter::Source,
        _ => return None,
    };
    Some(SeriesKey {
        reporter,
        source_workload: get("source_workload"),
        source_namespace: get("source_workload_namespace"),
        destination_service: get("destination_service"),
        destination_service_namespace: get("destination_service_namespace"),
        destination_workload: get("destination_workload"),
        destination_workload_namespace: get("destination_workload_namespace"),
        destination_version: get("destination_version"),
        mtls: l.get("connection_security_policy").map(String::as_str) == Some("mutual_tls"),
    })
}

/// Cumulative buckets by `le` -> Istio's bounds (missing ones carried from the bound
/// below), ending at `+Inf` = `requests`; empty without requests.
fn histogram(buckets: &[(String, f64)], requests: f64) -> Vec<(f64, f64)> {
    if requests <= 0.0 {
        return Vec::new();
    }
    let mut by_bound: Vec<(f64, f64)> =
        buckets.iter().filter_map(|(le, v)| Some((le.parse::<f64>().ok()?, *v))).collect();
    by_bound.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out = Vec::with_capacity(BOUNDS_MS.len() + 1);
    let mut carried = 0.0;
    for b in BOUNDS_MS {
        if let Some((_, v)) = by_bound.iter().find(|(le, _)| (le - b).abs() <= b * 1e-9) {
            carried = *v;
        }
        out.push((b, carried.min(requests)));
    }
    out.push((f64::INFINITY, requests));
    out
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_become_quoted_matchers() {
        let sel =
            Selector { reporter: Reporter::Source, destination_service: Some("a\"b".into()), ..Default::default() };
        assert_eq!(
            matchers(&sel, "response_code=~\"5..\""),
            "reporter=\"source\",destination_service=\"a\\\"b\",response_code=~\"5..\""
        );
        assert_eq!(encode("sum(x{a=\"b\"})"), "sum%28x%7Ba%3D%22b%22%7D%29");
    }

    #[test]
    fn histograms_follow_istios_bounds() {
        let h = histogram(&[("10".into(), 4.0), ("100".into(), 9.0), ("+Inf".into(), 10.0)], 10.0);
        assert_eq!(h.len(), BOUNDS_MS.len() + 1);
        assert_eq!(h[3], (10.0, 4.0));
        assert_eq!(h[6], (100.0, 9.0));
        assert_eq!(h.last(), Some(&(f64::INFINITY, 10.0)));
        assert!(histogram(&[], 0.0).is_empty());
        assert!(PromStats::new("ftp://x", Duration::from_secs(1)).is_err());
    }
}
