use super::*;

fn http_record() -> AccessRecord {
    AccessRecord {
        start_time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        method: Some("GET".into()),
        path: Some("/reviews/0?x=1".into()),
        protocol: "HTTP/1.1".into(),
        response_code: 200,
        response_flags: "-".into(),
        response_code_details: Some("via_upstream".into()),
        bytes_received: 12,
        bytes_sent: 345,
        duration: Duration::from_micros(15_900),
        upstream_service_time: Some(Duration::from_millis(11)),
        x_forwarded_for: Some("10.0.0.9".into()),
        user_agent: Some("curl/8.5.0".into()),
        request_id: Some("3f1c2c5e-0000-4000-8000-000000000001".into()),
        authority: Some("reviews:9080".into()),
        upstream_host: Some("10.1.2.3:9080".parse().unwrap()),
        upstream_cluster: Some("outbound|9080||reviews.default.svc.cluster.local".into()),
        route_name: Some("default".into()),
        downstream_remote_address: Some("127.0.0.1:51234".parse().unwrap()),
        downstream_local_address: Some("127.0.0.1:15001".parse().unwrap()),
        requested_server_name: None,
        direction: Direction::Outbound,
        connection_termination_details: None,
        upstream_transport_failure_reason: None,
        rbac: Vec::new(),
    }
}

fn tcp_record() -> AccessRecord {
    AccessRecord {
        method: None,
        path: None,
        protocol: "TCP".into(),
        response_code: 0,
        response_flags: "UF".into(),
        response_code_details: None,
        upstream_service_time: None,
        x_forwarded_for: None,
        user_agent: None,
        request_id: None,
        authority: None,
        route_name: None,
        direction: Direction::Inbound,
        connection_termination_details: Some("upstream connect refused".into()),
        upstream_transport_failure_reason: Some("connection refused".into()),
        ..http_record()
    }
}

fn read_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("invalid JSON {l:?}: {e}")))
        .collect()
}

#[tokio::test]
async fn writes_one_json_line_per_record_with_envoy_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = AccessLog::new(Sink::File(path.clone())).unwrap();
    log.log(&http_record());
    log.log(&tcp_record());
    log.flush().await;
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 2);

    let h = &lines[0];
    for field in [
        "start_time",
        "method",
        "path",
        "protocol",
        "response_code",
        "response_flags",
        "bytes_received",
        "bytes_sent",
        "duration",
        "upstream_service_time",
        "x_forwarded_for",
        "user_agent",
        "request_id",
        "authority",
        "upstream_host",
        "upstream_cluster",
        "route_name",
        "downstream_remote_address",
        "downstream_local_address",
        "direction",
        "reporter",
        "connection_termination_details",
    ] {
        assert!(h.get(field).is_some(), "missing field {field}: {h}");
    }
    assert_eq!(h["start_time"], "2023-11-14T22:13:20.123Z");
    assert_eq!(h["method"], "GET");
    assert_eq!(h["path"], "/reviews/0?x=1");
    assert_eq!(h["response_code"], 200);
    assert_eq!(h["bytes_received"], 12);
    assert_eq!(h["bytes_sent"], 345);
    assert_eq!(h["duration"], 15);
    assert_eq!(h["upstream_service_time"], 11);
    assert_eq!(h["upstream_host"], "10.1.2.3:9080");
    assert_eq!(h["downstream_local_address"], "127.0.0.1:15001");
    assert_eq!(h["direction"], "outbound");
    assert_eq!(h["reporter"], "source");
    assert!(h["connection_termination_details"].is_null());

    let t = &lines[1];
    assert_eq!(t["protocol"], "TCP");
    assert!(t["method"].is_null() && t["path"].is_null());
    assert_eq!(t["response_code"], 0);
    assert_eq!(t["response_flags"], "UF");
    assert_eq!(t["direction"], "inbound");
    assert_eq!(t["reporter"], "destination");
    assert_eq!(t["connection_termination_details"], "upstream connect refused");
}

#[tokio::test]
async fn appends_to_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    std::fs::write(&path, "{\"earlier\":true}\n").unwrap();
    let log = AccessLog::new(Sink::File(path.clone())).unwrap();
    log.log(&http_record());
    log.flush().await;
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["earlier"], true);
}

// On a current-thread runtime the writer cannot run until the test yields, so the
// channel's state is deterministic.
#[tokio::test(flavor = "current_thread")]
async fn full_channel_drops_and_counts_instead_of_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let metric = Counter::default();
    let log = AccessLog::with_capacity(Sink::File(path.clone()), 2).unwrap().count_drops_in(metric.clone());
    for _ in 0..5 {
        log.log(&http_record());
    }
    assert_eq!(log.dropped(), 3);
    assert_eq!(metric.get(), 3);
    log.flush().await;
    assert_eq!(read_lines(&path).len(), 2);
}

#[test]
fn unopenable_file_is_a_precise_error() {
    let err = AccessLog::new(Sink::File("/nonexistent-weft-dir/access.log".into())).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent-weft-dir/access.log"), "{msg}");
}

#[test]
fn rfc3339_millis_formats_known_instants() {
    assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    // Leap day.
    assert_eq!(rfc3339_millis(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
    assert_eq!(rfc3339_millis(UNIX_EPOCH + Duration::from_millis(253_402_300_799_999)), "9999-12-31T23:59:59.999Z");
    assert_eq!(rfc3339_millis(UNIX_EPOCH - Duration::from_secs(5)), "1970-01-01T00:00:00.000Z");
}

#[tokio::test]
async fn failed_writes_are_counted_as_dropped() {
    let metric = Counter::default();
    // Every write to /dev/full fails with ENOSPC.
    let log = AccessLog::new(Sink::File("/dev/full".into())).unwrap().count_drops_in(metric.clone());
    log.log(&http_record());
    log.log(&tcp_record());
    log.flush().await;
    log.log(&http_record());
    log.flush().await;
    assert_eq!(log.dropped(), 3);
    assert_eq!(metric.get(), 3);
}
