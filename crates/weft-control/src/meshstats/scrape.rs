//! Reading one proxy's `/stats/prometheus` page: the `istio_requests_total` and
//! `istio_request_duration_milliseconds_bucket` samples, turned into counter increases
//! since the previous page of the same proxy, added up per [`SeriesKey`].
//!
//! Bad input never panics: a line that does not parse is skipped, and a proxy's page
//! with more than `max_lines` distinct samples has the rest ignored (counted).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use super::series::{Delta, SeriesKey, BOUNDS_MS};
use super::Reporter;

const REQUESTS: &str = "istio_requests_total";
const DURATION: &str = "istio_request_duration_milliseconds_bucket";

/// What the previous page of one proxy said: sample (hashed metric name and labels) ->
/// value.
#[derive(Debug, Default)]
pub struct TargetState {
    last: HashMap<u64, f64>,
    /// Whether a page was read before (the first page is only a baseline: counters that
    /// grew before the control plane looked are not attributed to this moment).
    pub primed: bool,
}

/// Counter increases of one page.
#[derive(Debug, Default)]
pub struct PageDeltas {
    /// Per aggregated series.
    pub deltas: HashMap<SeriesKey, Delta>,
    /// Samples ignored because the proxy's page had too many.
    pub ignored: u64,
}

impl TargetState {
    /// Reads `page`, remembering its values, and returns the increases since the last
    /// one. Samples first seen on a primed target count from zero (a new series starts
    /// at zero); a value below the previous one is a counter reset (counts from zero).
    pub fn read(&mut self, page: &str, max_lines: usize) -> PageDeltas {
        let mut out = PageDeltas::default();
        let mut seen: HashMap<u64, f64> = HashMap::with_capacity(self.last.len());
        for line in page.lines() {
            let is_requests = line.starts_with(REQUESTS) && line[REQUESTS.len()..].starts_with('{');
            let is_duration = line.starts_with(DURATION) && line[DURATION.len()..].starts_with('{');
            if !is_requests && !is_duration {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.trim().parse::<f64>() else { continue };
            if !value.is_finite() || value < 0.0 {
                continue;
            }
            let id = hash(series);
            if seen.len() >= max_lines && !seen.contains_key(&id) {
                out.ignored += 1;
                continue;
            }
            seen.insert(id, value);
            let prev = self.last.get(&id).copied();
            let inc = match prev {
                Some(p) if value >= p => value - p,
                Some(_) => value,
                None if self.primed => value,
                None => 0.0,
            };
            if inc <= 0.0 {
                continue;
            }
            let Some(labels) = series.split_once('{').and_then(|(_, l)| l.strip_suffix('}')) else { continue };
            let labels = parse_labels(labels);
            let Some(key) = series_key(&labels) else { continue };
            let n = inc.round().min(f64::from(u32::MAX)) as u32;
            let d = out.deltas.entry(key).or_default();
            if is_requests {
                d.requests = d.requests.saturating_add(n);
                let code = labels.get("response_code").map(String::as_str).unwrap_or("");
                if code.starts_with('5') {
                    d.errors = d.errors.saturating_add(n);
                }
                if code == "403"
                    && labels.get("reporter").map(String::as_str) == Some("destination")
                    && labels.get("response_flags").is_none_or(|f| *f == "-")
                {
                    d.denied = d.denied.saturating_add(n);
                }
            } else if let Some(i) = labels.get("le").and_then(|le| bucket_index(le)) {
                d.le[i] = d.le[i].saturating_add(n);
            }
        }
        self.last = seen;
        self.primed = true;
        out
    }
}

fn hash(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// The index of the bucket bound `le` among [`BOUNDS_MS`]; None for `+Inf` or a bound
/// Istio does not use.
fn bucket_index(le: &str) -> Option<usize> {
    let v: f64 = le.parse().ok()?;
    BOUNDS_MS.iter().position(|b| (b - v).abs() <= b * 1e-9)
}

fn series_key(l: &HashMap<&str, String>) -> Option<SeriesKey> {
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

/// `a="x",b="y\"z"` -> {a: x, b: y"z} (Prometheus text format escapes `\\`, `\"`, `\n`).
fn parse_labels(text: &str) -> HashMap<&str, String> {
    let mut out = HashMap::new();
    let mut rest = text;
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(name.trim_start_matches(',').trim(), value);
        rest = &after[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: &str = r#"reporter="destination",source_workload="productpage-v1",source_workload_namespace="default",destination_workload="reviews-v2",destination_workload_namespace="default",destination_version="v2",destination_service="reviews.default.svc.cluster.local",destination_service_namespace="default",connection_security_policy="mutual_tls""#;

    fn page(ok: u32, err: u32, denied: u32, fast: u32) -> String {
        format!(
            "# TYPE istio_requests_total counter\nistio_requests_total{{{L},response_code=\"200\",response_flags=\"-\"}} {ok}\nistio_requests_total{{{L},response_code=\"503\",response_flags=\"UF\"}} {err}\nistio_requests_total{{{L},response_code=\"403\",response_flags=\"-\"}} {denied}\nistio_request_duration_milliseconds_bucket{{{L},response_code=\"200\",le=\"10.0\"}} {fast}\nistio_request_duration_milliseconds_bucket{{{L},response_code=\"200\",le=\"+Inf\"}} {ok}\nistio_request_duration_milliseconds_sum{{{L}}} 5\nnot a metric line\nistio_requests_total{{broken 1\n"
        )
    }

    #[test]
    fn the_first_page_is_a_baseline_and_later_ones_give_increases() {
        let mut t = TargetState::default();
        assert!(t.read(&page(10, 1, 0, 5), 100).deltas.is_empty());
        let d = t.read(&page(15, 3, 2, 9), 100);
        assert_eq!(d.deltas.len(), 1);
        let (k, v) = d.deltas.iter().next().unwrap();
        assert_eq!(k.source_workload, "productpage-v1");
        assert!(k.mtls);
        assert_eq!((v.requests, v.errors, v.denied), (9, 2, 2));
        assert_eq!(v.le[3], 4, "the 10 ms bucket");
        // A counter reset (proxy restarted) counts from zero.
        let d = t.read(&page(2, 0, 0, 2), 100);
        assert_eq!(d.deltas.values().next().map(|v| v.requests), Some(2));
    }

    #[test]
    fn a_page_over_the_line_cap_is_cut_and_counted() {
        let mut t = TargetState::default();
        let d = t.read(&page(1, 1, 1, 1), 2);
        assert_eq!(d.ignored, 4);
    }

    #[test]
    fn escaped_label_values_are_read() {
        let l = parse_labels(r#"a="x\"y",b="z\\w",c="""#);
        assert_eq!(l["a"], "x\"y");
        assert_eq!(l["b"], "z\\w");
        assert_eq!(l["c"], "");
    }
}
