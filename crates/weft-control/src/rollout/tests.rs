//! The rollout controller against hand-made statistics ([`FixedStats`]) and an
//! in-memory store: every decision (advance, hold, roll back, promote, wait on a
//! VirtualService the rollout does not own, resume after a restart) checked on the
//! VirtualService it writes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use weft_api::{Kind, Spec};

use super::staged::{self, StagedPhase};
use super::*;
use crate::meshstats::{FixedStats, Reporter, Selector, WindowStats};

const T0: u64 = 1_000_000_000;
const S: u64 = 1000;

fn sample() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples/rollouts/reviews-rollout.yaml"))
        .unwrap()
}

fn dr() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples/bookinfo/networking/destination-rule-all.yaml"),
    )
    .unwrap()
}

fn canary_sel() -> Selector {
    Selector {
        reporter: Reporter::Destination,
        destination_service: Some("reviews.default.svc.cluster.local".into()),
        destination_version: Some("v3".into()),
        ..Selector::default()
    }
}

/// `requests` requests, `errors` of them 5xx, all at or under `ms` milliseconds.
fn window(requests: f64, errors: f64, ms: f64) -> WindowStats {
    WindowStats {
        requests,
        errors,
        latency_ms: vec![(ms, requests), (f64::INFINITY, requests)],
        covered: Duration::from_secs(10),
    }
}

fn stats(w: WindowStats) -> SharedStats {
    Arc::new(FixedStats { windows: vec![(canary_sel(), w)], edges: vec![] })
}

fn setup(w: WindowStats, persist: Arc<dyn RolloutStateStore>) -> (Arc<ResourceStore>, Arc<RolloutController>) {
    let store = ResourceStore::in_memory();
    let r = store.apply(&format!("{}\n---\n{}", dr(), sample()), Path::new("t.yaml"));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let c = RolloutController::new(store.clone(), stats(w), persist, "cluster.local");
    (store, c)
}

/// (subset, weight) of the first HTTP route of the VirtualService `reviews`.
fn weights(store: &ResourceStore) -> Vec<(String, i64)> {
    let snap = store.snapshot();
    let vs = snap.resources.iter().find(|r| r.kind == Kind::VirtualService && r.meta.name == "reviews");
    let Some(Spec::VirtualService(vs)) = vs.map(|r| &r.spec) else { return vec![] };
    vs.http[0]
        .route
        .iter()
        .map(|d| (d.destination.subset.clone().unwrap_or_default(), d.weight.unwrap_or(100)))
        .collect()
}

fn state(c: &RolloutController) -> RolloutState {
    c.states().rollouts["default/reviews"].clone()
}

fn w(pairs: &[(&str, i64)]) -> Vec<(String, i64)> {
    pairs.iter().map(|(s, w)| (s.to_string(), *w)).collect()
}

#[test]
fn a_healthy_canary_advances_through_every_step_and_is_promoted() {
    let (store, c) = setup(window(100.0, 0.0, 20.0), Arc::new(MemoryStateStore::default()));
    c.reconcile(T0);
    assert_eq!(weights(&store), w(&[("v1", 95), ("v3", 5)]));
    let vs = store.snapshot().resources.into_iter().find(|r| r.kind == Kind::VirtualService).unwrap();
    assert!(routing::owned_by(&vs, "default", "reviews"), "{:?}", vs.meta);
    // Steps pause 30 s, intervals are 10 s: three passing intervals per step.
    let expected = [[95, 5], [80, 20], [50, 50]];
    let mut t = T0;
    for (i, want) in expected.iter().enumerate() {
        for _ in 0..2 {
            t += 10 * S;
            c.reconcile(t);
            assert_eq!(weights(&store), w(&[("v1", want[0]), ("v3", want[1])]), "step {} held", i + 1);
        }
        t += 10 * S;
        c.reconcile(t);
    }
    assert_eq!(weights(&store), w(&[("v3", 100)]));
    assert_eq!(state(&c).phase, Phase::Progressing);
    t += 30 * S;
    c.reconcile(t);
    let s = state(&c);
    assert_eq!(s.phase, Phase::Succeeded);
    assert_eq!(weights(&store), w(&[("v3", 100)]));
    let advanced: Vec<&str> = s.events.iter().filter(|e| e.reason == "Advanced").map(|e| e.message.as_str()).collect();
    assert_eq!(advanced.len(), 3, "{:#?}", s.events);
    assert!(
        advanced[0].contains("step 1/4 passed (success rate 100.0%, p99 20 ms over 100 requests)")
            && advanced[0].contains("step 2/4: 20% of requests to v3"),
        "{}",
        advanced[0]
    );
    assert!(s.events.last().unwrap().message.contains("all traffic to v3"), "{:#?}", s.events.last());
}

#[test]
fn a_failing_canary_rolls_back_after_failure_threshold_intervals_before_the_next_step() {
    // 20% errors: below the 99% success rate.
    let (store, c) = setup(window(100.0, 20.0, 20.0), Arc::new(MemoryStateStore::default()));
    c.reconcile(T0);
    c.reconcile(T0 + 10 * S);
    let s = state(&c);
    assert_eq!((s.phase, s.failures), (Phase::Progressing, 1));
    assert_eq!(weights(&store), w(&[("v1", 95), ("v3", 5)]), "one failure of two holds the step");
    assert!(s.events.last().unwrap().message.contains("success rate 80.0% < 99%"), "{:?}", s.events.last());
    c.reconcile(T0 + 20 * S);
    let s = state(&c);
    assert_eq!(s.phase, Phase::RolledBack);
    assert_eq!(weights(&store), w(&[("v1", 100)]));
    let last = s.events.last().unwrap();
    assert_eq!(last.reason, "RolledBack");
    assert!(
        last.message.contains("2 consecutive failed intervals") && last.message.contains("80.0%"),
        "{}",
        last.message
    );
    // Over: nothing moves any more.
    c.reconcile(T0 + 60 * S);
    assert_eq!(state(&c).phase, Phase::RolledBack);
}

#[test]
fn a_slow_canary_fails_on_p99_latency() {
    let (_store, c) = setup(window(100.0, 0.0, 900.0), Arc::new(MemoryStateStore::default()));
    c.reconcile(T0);
    c.reconcile(T0 + 10 * S);
    let s = state(&c);
    assert_eq!(s.failures, 1);
    assert!(s.events.last().unwrap().message.contains("p99 latency"), "{:?}", s.events.last());
}

#[test]
fn too_few_requests_are_neither_a_pass_nor_a_failure() {
    // minRequests is 10: 5 requests, all failing, judge nothing.
    let (store, c) = setup(window(5.0, 5.0, 20.0), Arc::new(MemoryStateStore::default()));
    c.reconcile(T0);
    for i in 1..=10 {
        c.reconcile(T0 + i * 10 * S);
    }
    let s = state(&c);
    assert_eq!((s.phase, s.step, s.failures, s.passes), (Phase::Progressing, 0, 0, 0));
    assert_eq!(weights(&store), w(&[("v1", 95), ("v3", 5)]));
    assert_eq!(s.last.as_ref().unwrap().verdict, "inconclusive");
    assert_eq!(s.events.iter().filter(|e| e.reason == "Inconclusive").count(), 1, "said once: {:#?}", s.events);
}

#[test]
fn a_user_virtual_service_for_the_host_is_reported_and_never_overwritten() {
    let (store, c) = setup(window(100.0, 0.0, 20.0), Arc::new(MemoryStateStore::default()));
    let user = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews-mine\nspec:\n  hosts: [reviews.default.svc.cluster.local]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v2}\n";
    store.apply(user, Path::new("user.yaml"));
    c.reconcile(T0);
    let s = state(&c);
    assert_eq!(s.phase, Phase::Waiting);
    assert!(s.conflict.as_deref().unwrap().contains("VirtualService default/reviews-mine"), "{:?}", s.conflict);
    assert!(weights(&store).is_empty(), "the rollout wrote nothing");
    c.reconcile(T0 + 60 * S);
    assert_eq!(state(&c).step, 0, "no analysis while waiting");
    // The same name as the rollout's, written by a person: not overwritten either.
    let same_name = user.replace("reviews-mine", "reviews");
    store.delete(user, Path::new("user.yaml"));
    store.apply(&same_name, Path::new("user.yaml"));
    c.reconcile(T0 + 70 * S);
    assert_eq!(weights(&store), w(&[("v2", 100)]));
    assert_eq!(state(&c).phase, Phase::Waiting);
    store.delete(&same_name, Path::new("user.yaml"));
    c.reconcile(T0 + 80 * S);
    assert_eq!(state(&c).phase, Phase::Progressing);
    assert_eq!(weights(&store), w(&[("v1", 95), ("v3", 5)]));
}

#[test]
fn a_restarted_controller_resumes_at_the_step_it_reached() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rollouts.json");
    let (store, c) = setup(window(100.0, 0.0, 20.0), Arc::new(FileStateStore::new(file.clone())));
    c.reconcile(T0);
    for i in 1..=3 {
        c.reconcile(T0 + i * 10 * S);
    }
    assert_eq!(weights(&store), w(&[("v1", 80), ("v3", 20)]));
    drop(c);
    drop(store);
    // A new process: a new store (the rollout's VirtualService was never in a file) and
    // the state file.
    let (store, c) = setup(window(100.0, 0.0, 20.0), Arc::new(FileStateStore::new(file)));
    assert!(weights(&store).is_empty());
    c.reconcile(T0 + 35 * S);
    let s = state(&c);
    assert_eq!((s.phase, s.step), (Phase::Progressing, 1));
    assert_eq!(weights(&store), w(&[("v1", 80), ("v3", 20)]));
    // Its clock kept: step 2 started at T0 + 30 s, so it advances at T0 + 60 s.
    c.reconcile(T0 + 45 * S);
    c.reconcile(T0 + 55 * S);
    assert_eq!(state(&c).step, 1);
    c.reconcile(T0 + 65 * S);
    assert_eq!(weights(&store), w(&[("v1", 50), ("v3", 50)]));
}

#[test]
fn pause_holds_promote_skips_and_abort_restores_stable() {
    let (store, c) = setup(window(100.0, 0.0, 20.0), Arc::new(MemoryStateStore::default()));
    c.reconcile(T0);
    c.command("default", "reviews", Command::Pause, T0 + S).unwrap();
    for i in 1..=6 {
        c.reconcile(T0 + i * 10 * S);
    }
    assert_eq!((state(&c).phase, state(&c).step), (Phase::Paused, 0));
    let e = c.command("default", "reviews", Command::Pause, T0 + 61 * S).unwrap_err();
    assert!(matches!(e, CommandError::Refused(_)), "{e}");
    c.command("default", "reviews", Command::Promote { full: false }, T0 + 62 * S).unwrap();
    assert_eq!(weights(&store), w(&[("v1", 80), ("v3", 20)]), "promote: next step at once");
    c.command("default", "reviews", Command::Resume, T0 + 63 * S).unwrap();
    assert_eq!(state(&c).phase, Phase::Progressing);
    c.command("default", "reviews", Command::Abort, T0 + 64 * S).unwrap();
    assert_eq!(weights(&store), w(&[("v1", 100)]), "abort: all traffic to stable at once");
    let s = state(&c);
    assert_eq!(s.phase, Phase::Aborted);
    assert!(s.events.last().unwrap().message.contains("aborted by hand at step 2/4"), "{:?}", s.events.last());
    assert!(matches!(c.command("default", "nope", Command::Abort, T0), Err(CommandError::NotFound(_))));
    // Resume after the end starts again; promote --full ends it on the canary.
    c.command("default", "reviews", Command::Resume, T0 + 70 * S).unwrap();
    assert_eq!(weights(&store), w(&[("v1", 95), ("v3", 5)]));
    c.command("default", "reviews", Command::Promote { full: true }, T0 + 71 * S).unwrap();
    assert_eq!((state(&c).phase, weights(&store)), (Phase::Succeeded, w(&[("v3", 100)])));
}

#[test]
fn a_changed_rollout_starts_again_at_step_one() {
    let (store, c) = setup(window(100.0, 0.0, 20.0), Arc::new(MemoryStateStore::default()));
    c.reconcile(T0);
    for i in 1..=3 {
        c.reconcile(T0 + i * 10 * S);
    }
    assert_eq!(state(&c).step, 1);
    store.apply(&sample().replace("subset: v3", "subset: v2"), Path::new("t.yaml"));
    c.reconcile(T0 + 31 * S);
    let s = state(&c);
    assert_eq!((s.step, s.events.last().unwrap().reason.as_str()), (0, "Restarted"));
    assert_eq!(weights(&store), w(&[("v1", 95), ("v2", 5)]));
}

#[tokio::test]
async fn the_loop_writes_routing_only_while_leader() {
    let (store, c) = setup(window(100.0, 0.0, 20.0), Arc::new(MemoryStateStore::default()));
    let (leader, rx) = tokio::sync::watch::channel(false);
    let task = c.spawn(rx);
    tokio::time::sleep(TICK * 4).await;
    assert!(weights(&store).is_empty(), "a follower writes nothing");
    leader.send_replace(true);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while weights(&store).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the leader never wrote the routing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(weights(&store), w(&[("v1", 95), ("v3", 5)]));
    task.abort();
}

#[test]
fn the_ab_and_mirror_steps_write_a_header_match_and_a_mirror() {
    let store = ResourceStore::in_memory();
    let ab = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples/rollouts/reviews-rollout-ab.yaml"),
    )
    .unwrap();
    store.apply(&format!("{}\n---\n{ab}", dr()), Path::new("t.yaml"));
    let c = RolloutController::new(
        store.clone(),
        stats(window(100.0, 0.0, 20.0)),
        Arc::new(MemoryStateStore::default()),
        "cluster.local",
    );
    let vs = |store: &ResourceStore| {
        let snap = store.snapshot();
        let r = snap.resources.into_iter().find(|r| r.kind == Kind::VirtualService).unwrap();
        let Spec::VirtualService(vs) = r.spec else { unreachable!() };
        vs
    };
    c.reconcile(T0);
    let m = vs(&store);
    assert_eq!(m.http[0].route[0].destination.subset.as_deref(), Some("v1"));
    assert_eq!(m.http[0].mirror.as_ref().and_then(|d| d.subset.as_deref()), Some("v3"));
    for i in 1..=3 {
        c.reconcile(T0 + i * 10 * S);
    }
    let m = vs(&store);
    assert!(m.http[0].matches[0].headers.contains_key("end-user"), "{m:?}");
    assert_eq!(m.http[0].route[0].destination.subset.as_deref(), Some("v3"));
    assert_eq!(m.http[1].route[0].destination.subset.as_deref(), Some("v1"));
}

fn ap_text() -> String {
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-pp\nspec:\n  selector:\n    matchLabels: {app: reviews}\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/default/sa/bookinfo-productpage]\n".into()
}

fn reviews_workloads() -> Vec<staged::ProxyWorkload> {
    ["v1", "v2", "v3"]
        .iter()
        .map(|v| {
            let labels = [("app".to_string(), "reviews".to_string()), ("version".to_string(), v.to_string())];
            ("default".to_string(), format!("reviews-{v}"), labels.into_iter().collect())
        })
        .chain(std::iter::once(("default".to_string(), "productpage-v1".to_string(), Default::default())))
        .collect()
}

fn server_sel(w: &str) -> Selector {
    Selector {
        reporter: Reporter::Destination,
        destination_workload: Some(w.into()),
        destination_namespace: Some("default".into()),
        ..Selector::default()
    }
}

#[test]
fn a_staged_policy_goes_to_a_canary_workload_first_then_everywhere_or_nowhere() {
    for (canary_errors, promoted) in [(0.0, true), (50.0, false)] {
        let store = ResourceStore::in_memory();
        let stats_for = |canary: &str, errors: f64| -> SharedStats {
            let windows = ["reviews-v1", "reviews-v2", "reviews-v3"]
                .iter()
                .map(|w| {
                    let e = if *w == canary { errors } else { 0.0 };
                    (server_sel(w), window(100.0, e, 10.0))
                })
                .collect();
            Arc::new(FixedStats { windows, edges: vec![] })
        };
        // Which workload is the canary is decided at staging: find it first.
        let probe = staged::begin(
            &ap_text(),
            &weft_api::parse_str(&ap_text(), Path::new("ap")).resources,
            &reviews_workloads(),
            &Default::default(),
            25,
            Duration::from_secs(10),
            T0,
        )
        .unwrap();
        assert_eq!(probe.canary.len(), 1, "25% of 3 affected workloads: one");
        assert_eq!(probe.rest.len(), 2, "productpage is not affected: {:?}", probe.rest);
        let canary = probe.canary[0].1.clone();
        let c = RolloutController::new(
            store.clone(),
            stats_for(&canary, canary_errors),
            Arc::new(MemoryStateStore::default()),
            "cluster.local",
        );
        let s = c.stage(&ap_text(), Path::new("ap"), &reviews_workloads(), 25, Duration::from_secs(10), T0).unwrap();
        assert_eq!(s.canary, probe.canary);
        let view = c.staging.view().expect("a staged view");
        assert!(view.canary.contains(&("default".to_string(), canary.clone())));
        assert_eq!(view.overlay.len(), 1);
        assert!(store.snapshot().resources.is_empty(), "not in the store while staged");
        assert!(c.stage(&ap_text(), Path::new("ap"), &reviews_workloads(), 25, Duration::from_secs(10), T0).is_err());
        c.reconcile(T0 + 5 * S);
        assert!(c.staging.view().is_some(), "still comparing");
        c.reconcile(T0 + 10 * S);
        assert!(c.staging.view().is_none());
        let st = c.states().staged[&s.name].clone();
        let in_store = store.snapshot().resources.iter().any(|r| r.kind == Kind::AuthorizationPolicy);
        assert_eq!(in_store, promoted);
        if promoted {
            assert_eq!(st.phase, StagedPhase::Promoted);
        } else {
            assert_eq!(st.phase, StagedPhase::Reverted);
            let msg = &st.events.last().unwrap().message;
            assert!(msg.contains("canary 50.0% success") && msg.contains("others 100.0% success"), "{msg}");
        }
    }
}

#[test]
fn only_routing_and_policy_kinds_can_be_staged() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  ports: [{port: 80}]\n";
    let r = weft_api::parse_str(svc, Path::new("s")).resources;
    let e =
        staged::begin(svc, &r, &reviews_workloads(), &Default::default(), 25, Duration::from_secs(10), T0).unwrap_err();
    assert!(e.0.contains("cannot be staged"), "{e}");
}

#[test]
fn without_the_canarys_own_metrics_the_callers_view_is_judged() {
    // A stock Envoy canary reports nothing; its callers' sidecars report 40% errors.
    let callers = Selector { reporter: Reporter::Source, ..canary_sel() };
    let stats: SharedStats =
        Arc::new(FixedStats { windows: vec![(callers, window(100.0, 40.0, 20.0))], edges: vec![] });
    let store = ResourceStore::in_memory();
    store.apply(&format!("{}\n---\n{}", dr(), sample()), Path::new("t.yaml"));
    let c = RolloutController::new(store.clone(), stats, Arc::new(MemoryStateStore::default()), "cluster.local");
    c.reconcile(T0);
    c.reconcile(T0 + 10 * S);
    let s = state(&c);
    assert_eq!(s.failures, 1, "{:#?}", s.events);
    assert!(s.last.unwrap().summary.contains("success rate 60.0%"));
}

#[test]
fn the_failed_request_budget_rolls_back_before_the_failure_threshold() {
    let store = ResourceStore::in_memory();
    let spec = sample().replace("    minRequests: 10\n", "    minRequests: 10\n    maxFailedRequests: 15\n");
    let r = store.apply(&format!("{}\n---\n{spec}", dr()), Path::new("t.yaml"));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // 20 failures in the first interval: over the budget of 15 at once, although
    // failureThreshold (2) would wait for a second failed interval.
    let c = RolloutController::new(
        store.clone(),
        stats(window(100.0, 20.0, 20.0)),
        Arc::new(MemoryStateStore::default()),
        "cluster.local",
    );
    c.reconcile(T0);
    c.reconcile(T0 + 10 * S);
    let s = state(&c);
    assert_eq!(s.phase, Phase::RolledBack, "{:#?}", s.events);
    assert!(s.events.last().unwrap().message.contains("20 failed canary requests, over maxFailedRequests 15"));
    assert_eq!(weights(&store), w(&[("v1", 100)]));
}

#[test]
fn a_staged_routing_change_goes_to_the_hosts_callers() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v9}\n";
    let edge = |src: &str, dst: &str| crate::meshstats::Edge {
        source_workload: src.into(),
        source_namespace: "default".into(),
        destination_service: dst.into(),
        ..Default::default()
    };
    let stats: SharedStats = Arc::new(FixedStats {
        windows: vec![],
        edges: vec![
            edge("productpage-v1", "reviews.default.svc.cluster.local"),
            edge("reviews-v2", "ratings.default.svc.cluster.local"),
        ],
    });
    let c = RolloutController::new(
        ResourceStore::in_memory(),
        stats,
        Arc::new(MemoryStateStore::default()),
        "cluster.local",
    );
    let s = c.stage(vs, Path::new("vs"), &reviews_workloads(), 25, Duration::from_secs(10), T0).unwrap();
    assert_eq!(s.canary, vec![("default".to_string(), "productpage-v1".to_string())]);
    assert!(s.rest.is_empty(), "only productpage calls reviews: {:?}", s.rest);
    assert!(!s.reporter_destination, "measured as clients");
}
