use super::*;

fn key(reporter: Reporter, src: &str, dst: &str, mtls: bool) -> SeriesKey {
    SeriesKey {
        reporter,
        source_workload: src.into(),
        source_namespace: "default".into(),
        destination_service: "reviews.default.svc.cluster.local".into(),
        destination_service_namespace: "default".into(),
        destination_workload: dst.into(),
        destination_workload_namespace: "default".into(),
        destination_version: "v1".into(),
        mtls,
    }
}

fn delta(requests: u32, errors: u32, fast: u32) -> Delta {
    // `fast` requests at or under 10 ms, the rest under 100 ms.
    let mut le = [0; NB];
    for (i, b) in BOUNDS_MS.iter().enumerate() {
        le[i] = if *b >= 100.0 {
            requests
        } else if *b >= 10.0 {
            fast
        } else {
            0
        };
    }
    Delta { requests, errors, denied: 0, le }
}

#[test]
fn windows_add_up_only_the_slots_inside_them() {
    let t0 = 1_000_000;
    let mut s = SeriesStore::new(t0, 10);
    let k = key(Reporter::Destination, "productpage-v1", "reviews-v1", true);
    s.add(&k, t0, &delta(10, 1, 5));
    s.add(&k, t0 + 600, &delta(20, 0, 20));
    let sel = Selector { destination_service: Some(k.destination_service.clone()), ..Default::default() };
    // 5 minutes: only the second sample.
    let w = s.window(&sel, t0 + 601, Duration::from_secs(300));
    assert_eq!((w.requests, w.errors), (20.0, 0.0));
    // 29 whole 10 s steps and 1 s of the current one.
    assert_eq!(w.covered, Duration::from_secs(291));
    // 1 hour: both; 25 of the 30 at or under 10 ms, so the median is inside (5, 10].
    let w = s.window(&sel, t0 + 601, Duration::from_secs(3600));
    assert_eq!((w.requests, w.errors), (30.0, 1.0));
    assert_eq!(w.covered, Duration::from_secs(601));
    assert_eq!(w.latency_ms.last(), Some(&(f64::INFINITY, 30.0)));
    assert!(w.quantile_ms(0.5).is_some_and(|q| q > 5.0 && q <= 10.0));
    // 3 days and 28 days use the coarser tiers and still see both.
    for days in [3, 28] {
        let w = s.window(&sel, t0 + 601, Duration::from_secs(days * 86400));
        assert_eq!(w.requests, 30.0, "{days} days");
    }
    // Another reporter or service: nothing.
    let src = Selector { reporter: Reporter::Source, ..sel.clone() };
    assert_eq!(s.window(&src, t0 + 601, Duration::from_secs(3600)).requests, 0.0);
}

#[test]
fn old_slots_are_overwritten_not_counted() {
    let t0 = 1_000_000;
    let mut s = SeriesStore::new(t0, 10);
    let k = key(Reporter::Destination, "a", "b", false);
    s.add(&k, t0, &delta(7, 0, 7));
    // Exactly one ring later the fine slot is reused; the hour window sees only the new one.
    s.add(&k, t0 + 3600, &delta(3, 0, 3));
    let w = s.window(&Selector::default(), t0 + 3600, Duration::from_secs(3600));
    assert_eq!(w.requests, 3.0);
}

#[test]
fn a_series_takes_the_memory_docs_dashboard_md_states() {
    assert_eq!(std::mem::size_of::<Slot>(), 92);
    assert_eq!(SERIES_BYTES, 1464 * 92);
}

#[test]
fn the_series_cap_refuses_and_counts_new_series() {
    let mut s = SeriesStore::new(0, 2);
    for w in ["a", "b", "c", "c"] {
        s.add(&key(Reporter::Destination, w, "x", false), 100, &delta(1, 0, 1));
    }
    assert_eq!(s.len(), 2);
    assert_eq!(s.dropped(), 2);
    s.sweep(100 + 28 * 86400);
    assert!(s.is_empty(), "series idle for 28 days are dropped");
}

#[test]
fn edges_prefer_the_destination_reporter_and_keep_source_only_edges() {
    let mut s = SeriesStore::new(0, 10);
    let now = 1000;
    s.add(&key(Reporter::Destination, "pp", "reviews-v1", true), now, &delta(10, 0, 10));
    s.add(&key(Reporter::Source, "pp", "reviews-v1", false), now, &delta(11, 0, 11));
    s.add(&key(Reporter::Source, "pp", "unknown", false), now, &delta(4, 4, 4));
    let e = s.edges(now, Duration::from_secs(300));
    assert_eq!(e.len(), 2, "{e:#?}");
    let v1 = e.iter().find(|e| e.destination_workload == "reviews-v1").unwrap();
    assert_eq!((v1.stats.requests, v1.mtls), (10.0, true));
    let unknown = e.iter().find(|e| e.destination_workload == "unknown").unwrap();
    assert_eq!((unknown.stats.requests, unknown.stats.errors, unknown.mtls), (4.0, 4.0, false));
}

#[test]
fn chart_points_cover_the_window_oldest_first() {
    let mut s = SeriesStore::new(0, 10);
    let k = key(Reporter::Destination, "a", "b", false);
    s.add(&k, 990, &delta(5, 0, 5));
    s.add(&k, 1055, &delta(6, 1, 6));
    let p = s.series(&Selector::default(), 1059, Duration::from_secs(300), Duration::from_secs(60));
    assert_eq!(p.len(), 5);
    assert!(p.windows(2).all(|w| w[0].start < w[1].start));
    let total: f64 = p.iter().map(|p| p.stats.requests).sum();
    assert_eq!(total, 11.0);
    assert_eq!(p.last().map(|p| p.stats.requests), Some(6.0));
}
