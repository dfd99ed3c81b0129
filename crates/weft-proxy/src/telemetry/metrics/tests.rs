use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

use super::*;

fn workload(name: &str, ns: &str) -> Arc<WorkloadInfo> {
    Arc::new(WorkloadInfo {
        workload: name.into(),
        namespace: ns.into(),
        app: name.trim_end_matches("-v1").into(),
        version: "v1".into(),
        principal: format!("spiffe://cluster.local/ns/{ns}/sa/{name}"),
        cluster: "east".into(),
        service_account: name.into(),
        canonical_service: name.trim_end_matches("-v1").into(),
        canonical_revision: "v1".into(),
    })
}

fn request_labels() -> RequestLabels {
    RequestLabels {
        reporter: Reporter::Source,
        source: workload("productpage-v1", "bookinfo"),
        destination: workload("reviews-v1", "bookinfo"),
        service: Arc::new(ServiceInfo {
            host: "reviews.bookinfo.svc.cluster.local".into(),
            name: "reviews".into(),
            namespace: "bookinfo".into(),
        }),
        protocol: RequestProtocol::Http,
        response_code: 200,
        grpc_status: None,
        response_flags: Cow::Borrowed("-"),
        security_policy: SecurityPolicy::MutualTls,
    }
}

fn tcp_labels() -> TcpLabels {
    let r = request_labels();
    TcpLabels {
        reporter: Reporter::Destination,
        source: r.source,
        destination: r.destination,
        service: r.service,
        response_flags: Cow::Borrowed("-"),
        security_policy: SecurityPolicy::None,
    }
}

/// A registry with every kind of series populated, including a label value that needs
/// escaping.
fn populated() -> Metrics {
    let m = Metrics::new();
    let http = request_labels();
    m.record_request(&http, Duration::from_millis(7), 120, 4096);
    m.record_request(&http, Duration::from_millis(300), 0, 10);
    let grpc = RequestLabels {
        protocol: RequestProtocol::Grpc,
        grpc_status: Some(14),
        response_code: 503,
        response_flags: Cow::Borrowed("UF,URX"),
        source: Arc::new(WorkloadInfo { workload: "we\"ird\\name\nx".into(), ..WorkloadInfo::default() }),
        ..request_labels()
    };
    m.record_request(&grpc, Duration::from_micros(300), 5, 5);
    let tcp = tcp_labels();
    m.tcp_opened(&tcp);
    m.tcp_bytes(&tcp, 100, 7);
    m.tcp_bytes(&tcp, 50, 3);
    m.tcp_closed(&tcp);
    let p = m.proxy();
    p.set_xds_connected(true);
    p.xds_nack("type.googleapis.com/envoy.config.cluster.v3.Cluster");
    p.config_applied("type.googleapis.com/envoy.config.cluster.v3.Cluster", "v1");
    p.upstream_retry("outbound|9080||reviews.bookinfo.svc.cluster.local");
    p.upstream_cx_opened("outbound|9080||reviews.bookinfo.svc.cluster.local");
    p.set_cert_expiry(UNIX_EPOCH + Duration::from_secs(1_900_000_000));
    p.access_log_dropped().inc();
    m
}

/// One parsed sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).map(parse_sample).collect()
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line.find(['{', ' ']).unwrap();
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next().unwrap();
            match c {
                '}' => {
                    rest = &body[i + 1..];
                    break;
                }
                ',' => {}
                '=' => {
                    assert_eq!(chars.next().unwrap().1, '"');
                    let mut value = String::new();
                    loop {
                        match chars.next().unwrap().1 {
                            '"' => break,
                            '\\' => match chars.next().unwrap().1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        }
    }
    let value = rest.trim().parse().unwrap();
    Sample { name, labels, value }
}

fn find<'a>(samples: &'a [Sample], name: &str, pred: impl Fn(&Sample) -> bool) -> &'a Sample {
    samples.iter().find(|s| s.name == name && pred(s)).unwrap_or_else(|| panic!("no sample {name} matching"))
}

fn promtool() -> Option<PathBuf> {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let local = workspace.join(".tools/bin/promtool");
    if local.is_file() {
        return Some(local);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("promtool")).find(|p| p.is_file()))
}

#[test]
fn encoded_output_passes_promtool_check_metrics() {
    let promtool = promtool().expect("promtool not found: run scripts/setup.sh");
    let text = populated().encode();
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Exit 1 is a parse error. Exit 3 lists lint problems; the only one allowed is the
    // base-unit lint on the name Istio mandates for the duration histogram.
    let allowed = "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";
    let problems: Vec<&str> = report.lines().map(str::trim).filter(|l| !l.is_empty() && *l != allowed).collect();
    let code = out.status.code();
    assert!(
        (code == Some(0) || code == Some(3)) && problems.is_empty(),
        "promtool exit {code:?}: {report}\n---\n{text}"
    );
}

#[test]
fn output_is_classic_text_with_total_suffixed_counters() {
    let text = populated().encode();
    assert!(!text.contains("# EOF"), "OpenMetrics EOF marker leaked");
    assert!(!text.contains("# UNIT"));
    for counter in [
        "istio_requests_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "weft_xds_nacks_total",
        "weft_xds_updates_total",
        "weft_upstream_rq_retry_total",
    ] {
        assert!(text.contains(&format!("# TYPE {counter} counter\n")), "{counter} not typed as counter:\n{text}");
        assert!(!text.contains(&format!("{counter}_total")));
    }
    for hist in ["istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"] {
        assert!(text.contains(&format!("# TYPE {hist} histogram\n")));
    }
}

#[test]
fn request_labels_land_with_istio_names_and_values() {
    let samples = parse_samples(&populated().encode());
    let s =
        find(&samples, "istio_requests_total", |s| s.labels.get("response_code").map(String::as_str) == Some("200"));
    assert_eq!(s.value, 2.0);
    let expected: BTreeMap<String, String> = [
        ("reporter", "source"),
        ("source_workload", "productpage-v1"),
        ("source_workload_namespace", "bookinfo"),
        ("source_principal", "spiffe://cluster.local/ns/bookinfo/sa/productpage-v1"),
        ("source_app", "productpage"),
        ("source_version", "v1"),
        ("source_cluster", "east"),
        ("source_canonical_service", "productpage"),
        ("source_canonical_revision", "v1"),
        ("destination_workload", "reviews-v1"),
        ("destination_workload_namespace", "bookinfo"),
        ("destination_principal", "spiffe://cluster.local/ns/bookinfo/sa/reviews-v1"),
        ("destination_app", "reviews"),
        ("destination_version", "v1"),
        ("destination_cluster", "east"),
        ("destination_canonical_service", "reviews"),
        ("destination_canonical_revision", "v1"),
        ("destination_service", "reviews.bookinfo.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "bookinfo"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("grpc_response_status", ""),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(s.labels, expected);

    let g = find(&samples, "istio_requests_total", |s| {
        s.labels.get("request_protocol").map(String::as_str) == Some("grpc")
    });
    assert_eq!(g.labels["response_code"], "503");
    assert_eq!(g.labels["grpc_response_status"], "14");
    assert_eq!(g.labels["response_flags"], "UF,URX");
    // Escaped on the wire, intact after parsing; defaults are Istio's.
    assert_eq!(g.labels["source_workload"], "we\"ird\\name\nx");
    assert_eq!(g.labels["source_app"], "unknown");
    assert_eq!(g.labels["source_canonical_revision"], "latest");
}

fn buckets_of(samples: &[Sample], name: &str, code: &str) -> Vec<(String, f64)> {
    samples
        .iter()
        .filter(|s| {
            s.name == format!("{name}_bucket") && s.labels.get("response_code").map(String::as_str) == Some(code)
        })
        .map(|s| (s.labels["le"].clone(), s.value))
        .collect()
}

#[test]
fn duration_histogram_uses_istio_buckets_in_milliseconds() {
    let samples = parse_samples(&populated().encode());
    let buckets = buckets_of(&samples, "istio_request_duration_milliseconds", "200");
    let les: Vec<f64> = buckets.iter().filter(|(le, _)| le != "+Inf").map(|(le, _)| le.parse().unwrap()).collect();
    assert_eq!(les, DURATION_BUCKETS_MS.to_vec());
    assert_eq!(buckets.last().unwrap().0, "+Inf");
    // 7 ms and 300 ms, cumulative.
    let count_at = |le: f64| buckets.iter().find(|(l, _)| l.parse::<f64>().ok() == Some(le)).unwrap().1;
    assert_eq!(count_at(5.0), 0.0);
    assert_eq!(count_at(10.0), 1.0);
    assert_eq!(count_at(250.0), 1.0);
    assert_eq!(count_at(500.0), 2.0);
    let sum = find(&samples, "istio_request_duration_milliseconds_sum", |s| s.labels["response_code"] == "200");
    assert!((sum.value - 307.0).abs() < 1e-6, "sum {}", sum.value);
}

#[test]
fn size_histograms_use_powers_of_ten_up_to_1e9() {
    let samples = parse_samples(&populated().encode());
    for name in ["istio_request_bytes", "istio_response_bytes"] {
        let les: Vec<f64> = buckets_of(&samples, name, "200")
            .iter()
            .filter(|(le, _)| le != "+Inf")
            .map(|(le, _)| le.parse().unwrap())
            .collect();
        assert_eq!(les, SIZE_BUCKETS_BYTES.to_vec(), "{name}");
    }
    let resp = buckets_of(&samples, "istio_response_bytes", "200");
    let at = |le: &str| resp.iter().find(|(l, _)| l == le).unwrap().1;
    // Responses of 10 and 4096 bytes.
    assert_eq!(at("1.0"), 0.0);
    assert_eq!(at("10.0"), 1.0);
    assert_eq!(at("10000.0"), 2.0);
}

#[test]
fn tcp_metrics_accumulate_and_carry_tcp_labels() {
    let samples = parse_samples(&populated().encode());
    let sent = find(&samples, "istio_tcp_sent_bytes_total", |_| true);
    assert_eq!(sent.value, 150.0);
    assert_eq!(find(&samples, "istio_tcp_received_bytes_total", |_| true).value, 10.0);
    assert_eq!(find(&samples, "istio_tcp_connections_opened_total", |_| true).value, 1.0);
    assert_eq!(find(&samples, "istio_tcp_connections_closed_total", |_| true).value, 1.0);
    assert_eq!(sent.labels["reporter"], "destination");
    assert_eq!(sent.labels["request_protocol"], "tcp");
    assert_eq!(sent.labels["connection_security_policy"], "none");
    assert_eq!(sent.labels["destination_service_name"], "reviews");
    assert!(!sent.labels.contains_key("response_code"));
    assert!(!sent.labels.contains_key("grpc_response_status"));
}

#[test]
fn proxy_health_series_reflect_calls() {
    let m = populated();
    let cluster = "outbound|9080||reviews.bookinfo.svc.cluster.local";
    m.proxy().upstream_cx_opened(cluster);
    m.proxy().upstream_cx_closed(cluster);
    m.proxy().upstream_cx_opened(cluster);
    let samples = parse_samples(&m.encode());
    assert_eq!(find(&samples, "weft_xds_connected", |_| true).value, 1.0);
    let cds = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    let nacks = find(&samples, "weft_xds_nacks_total", |_| true);
    assert_eq!((nacks.labels["type"].as_str(), nacks.value), (cds, 1.0));
    assert_eq!(find(&samples, "weft_xds_updates_total", |_| true).value, 1.0);
    let active = find(&samples, "weft_upstream_cx_active", |_| true);
    assert_eq!((active.labels["cluster"].as_str(), active.value), (cluster, 2.0));
    assert_eq!(find(&samples, "weft_upstream_rq_retry_total", |_| true).value, 1.0);
    assert_eq!(find(&samples, "weft_cert_expiry_timestamp_seconds", |_| true).value, 1_900_000_000.0);
    assert_eq!(find(&samples, "weft_access_log_dropped_total", |_| true).value, 1.0);
}

#[tokio::test(start_paused = true)]
async fn config_version_follows_updates_and_age_is_computed_at_scrape() {
    let m = Metrics::new();
    m.proxy().config_applied("lds", "1");
    tokio::time::advance(Duration::from_secs(30)).await;
    let samples = parse_samples(&m.encode());
    let age = find(&samples, "weft_config_age_seconds", |s| s.labels["type"] == "lds");
    assert!((age.value - 30.0).abs() < 0.01, "age {}", age.value);

    m.proxy().config_applied("lds", "2");
    m.proxy().config_applied("cds", "7");
    tokio::time::advance(Duration::from_secs(5)).await;
    let samples = parse_samples(&m.encode());
    let versions: Vec<(&str, &str)> = samples
        .iter()
        .filter(|s| s.name == "weft_config_version")
        .map(|s| (s.labels["type"].as_str(), s.labels["version"].as_str()))
        .collect();
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert!(versions.contains(&("lds", "2")) && versions.contains(&("cds", "7")));
    let age = find(&samples, "weft_config_age_seconds", |s| s.labels["type"] == "lds");
    assert!((age.value - 5.0).abs() < 0.01, "age {}", age.value);
    assert_eq!(find(&samples, "weft_xds_updates_total", |s| s.labels["type"] == "lds").value, 2.0);
}

#[test]
fn label_sets_beyond_the_cap_fold_peers_into_unknown() {
    let m = Metrics::with_max_series(2);
    for i in 0..50 {
        let labels = RequestLabels { source: workload(&format!("attacker-{i}"), "evil"), ..request_labels() };
        m.record_request(&labels, Duration::from_millis(1), 1, 1);
    }
    let samples = parse_samples(&m.encode());
    let series: Vec<&Sample> = samples.iter().filter(|s| s.name == "istio_requests_total").collect();
    assert_eq!(series.len(), 3, "2 kept + 1 folded: {series:?}");
    let folded = series.iter().find(|s| s.labels["source_workload"] == "unknown").unwrap();
    assert_eq!(folded.value, 48.0);
    assert_eq!(folded.labels["destination_workload"], "unknown");
    assert_eq!(folded.labels["destination_service_name"], "reviews");
    assert_eq!(find(&samples, "weft_metrics_series_overflow_total", |_| true).value, 48.0);
    let total: f64 = series.iter().map(|s| s.value).sum();
    assert_eq!(total, 50.0);
}

#[test]
fn folded_label_sets_count_an_overflow_at_every_recording() {
    let m = Metrics::with_max_series(1);
    m.record_request(&request_labels(), Duration::from_millis(1), 1, 1);
    // The same label set (the same shared workloads) three times beyond the cap: each
    // recording is folded and counted, none is remembered by identity.
    let beyond = RequestLabels { source: workload("late", "evil"), ..request_labels() };
    for _ in 0..3 {
        m.record_request(&beyond, Duration::from_millis(1), 1, 1);
    }
    let samples = parse_samples(&m.encode());
    assert_eq!(find(&samples, "weft_metrics_series_overflow_total", |_| true).value, 3.0);
    let folded = find(&samples, "istio_requests_total", |s| s.labels["source_workload"] == "unknown");
    assert_eq!(folded.value, 3.0);
}

#[test]
fn series_found_by_identity_are_those_of_the_labels_content() {
    let m = Metrics::new();
    let labels = request_labels();
    m.record_request(&labels, Duration::from_millis(1), 1, 1);
    m.record_request(&labels, Duration::from_millis(1), 1, 1);
    // Equal content held by other `Arc`s (a peer decoded again): the same series.
    let copy = RequestLabels { source: Arc::new((*labels.source).clone()), ..labels.clone() };
    m.record_request(&copy, Duration::from_millis(1), 1, 1);
    // The peer's metadata changed (new version label): its own series, not the cached one.
    let mut moved = (*labels.source).clone();
    moved.version = "v9".into();
    let moved = RequestLabels { source: Arc::new(moved), ..labels.clone() };
    m.record_request(&moved, Duration::from_millis(1), 1, 1);
    let samples = parse_samples(&m.encode());
    let series: Vec<&Sample> = samples.iter().filter(|s| s.name == "istio_requests_total").collect();
    assert_eq!(series.len(), 2, "{series:?}");
    assert_eq!(find(&samples, "istio_requests_total", |s| s.labels["source_version"] == "v9").value, 1.0);
    assert_eq!(find(&samples, "istio_requests_total", |s| s.labels["source_version"] != "v9").value, 3.0);
}

#[test]
fn the_identity_cache_stays_bounded() {
    let m = Metrics::new();
    for i in 0..(ID_CACHE_ENTRIES * 2 + 3) {
        let labels = RequestLabels { source: workload(&format!("w{i}"), "ns"), ..request_labels() };
        m.record_request(&labels, Duration::from_millis(1), 1, 1);
        assert!(m.request_ids.read().unwrap().len() <= ID_CACHE_ENTRIES);
    }
}

/// The identity cache keys by address: its entries keep their workloads alive, so a
/// workload freed by everyone else cannot lend its address to another one (which would
/// then be counted under the first one's series).
#[test]
fn a_freed_workloads_address_never_names_its_series() {
    let m = Metrics::new();
    let shared = request_labels();
    let labels = |name: &str| RequestLabels { source: workload(name, "ns"), ..shared.clone() };
    // The content cache keeps this first `a`; the copies below are kept by identity only.
    m.record_request(&labels("a"), Duration::from_millis(1), 1, 1);
    for i in 0..50 {
        m.record_request(&labels("a"), Duration::from_millis(1), 1, 1);
        // The copy of `a` is dropped: the next workload is allocated where the
        // allocator finds room, often the address just freed.
        m.record_request(&labels(&format!("w{i}")), Duration::from_millis(1), 1, 1);
    }
    let samples = parse_samples(&m.encode());
    assert_eq!(find(&samples, "istio_requests_total", |s| s.labels["source_workload"] == "a").value, 51.0);
    for i in 0..50 {
        let name = format!("w{i}");
        assert_eq!(
            find(&samples, "istio_requests_total", |s| s.labels["source_workload"] == name).value,
            1.0,
            "{name}"
        );
    }
}
