//! Rollouts end to end. Against `weft control` (a real process with a data directory):
//! a rollout moved on by hand resumes at its step after the control plane restarts. With
//! `weft up` Bookinfo and steady traffic through the ingress (the analysis reads the
//! proxies' own metrics): a healthy reviews-v3 canary is promoted through every step; a
//! failing one (its sidecar answers 500 to most requests, a `RateLimit` with status 500)
//! is rolled back before its next step within a budget of failed user requests; an abort
//! restores the stable routing; a staged AuthorizationPolicy that denies a needed caller
//! is reverted after reaching only the canary proxies, and a harmless one reaches all.
//! A staged VirtualService routing reviews to a subset that does not exist reaches only
//! reviews' caller (productpage) and is reverted.
//! The healthy canary is promoted the same way when its sidecar is a stock Envoy (judged
//! from its callers' metrics: Envoy has no Istio metrics of its own).

#![allow(clippy::unwrap_used)]

#[path = "support/up_mesh.rs"]
mod up_mesh;

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use up_mesh::{UpMesh, WEFT};

const DR: &str = "samples/bookinfo/networking/destination-rule-all.yaml";

fn repo(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

/// A Rollout of reviews v1 -> v3 with `steps` (weight, pause seconds) and short intervals.
fn rollout(steps: &[(u32, u32)], interval: &str, min_requests: u32) -> String {
    let steps: String = steps.iter().map(|(w, p)| format!("  - weight: {w}\n    pause: {p}s\n")).collect();
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: Rollout\nmetadata:\n  name: reviews\nspec:\n  host: reviews\n  stable: {{subset: v1}}\n  canary: {{subset: v3}}\n  steps:\n{steps}  analysis:\n    interval: {interval}\n    failureThreshold: 2\n    minRequests: {min_requests}\n    successRate: {{min: 95}}\n    latencyP99: {{max: 2000}}\n"
    )
}

/// `weft rollout status reviews -o json` through `run`.
fn status(run: impl Fn(&[&str]) -> (bool, String)) -> serde_json::Value {
    let (ok, out) = run(&["rollout", "status", "reviews", "-o", "json"]);
    assert!(ok, "weft rollout status: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

// ---------------------------------------------------------------------------------------
// weft control restart
// ---------------------------------------------------------------------------------------

struct Control {
    child: std::process::Child,
    api: String,
    /// The admin token file in the data directory (the CLI's `--token-file`).
    token_file: std::path::PathBuf,
}

impl Control {
    fn start(dir: &Path, data: &Path) -> Control {
        let mut child = std::process::Command::new(WEFT)
            .args(["control", "--dir"])
            .arg(dir)
            .arg("--data-dir")
            .arg(data)
            .args(["--xds", "127.0.0.1:0", "--api", "127.0.0.1:0"])
            .env("WEFT_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while out.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        let line = String::from_utf8(line).unwrap();
        let api = line.split("API on ").nth(1).unwrap_or_else(|| panic!("{line}")).trim().to_string();
        Control { child, api, token_file: data.join("admin-token") }
    }

    fn weft(&self, args: &[&str]) -> (bool, String) {
        let o = std::process::Command::new(WEFT)
            .args(args)
            .env("WEFT_SERVER", &self.api)
            .env("WEFT_TOKEN", std::fs::read_to_string(&self.token_file).unwrap_or_default().trim())
            .output()
            .unwrap();
        (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    }

    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let exit =
            weft_testkit::process::wait_exit(&mut self.child, Duration::from_secs(60), "weft control after SIGTERM");
        assert!(exit.success(), "weft control exited with {exit}");
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[test]
fn a_restarted_control_plane_resumes_the_rollout_at_its_step() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::copy(repo(DR), dir.path().join("dr.yaml")).unwrap();
    // Hour-long pauses: only `promote` moves it, so the step after the restart can only
    // come from the saved state.
    std::fs::write(dir.path().join("rollout.yaml"), rollout(&[(5, 3600), (20, 3600), (100, 3600)], "1s", 1)).unwrap();
    let cp = Control::start(dir.path(), data.path());
    let s = UpMesh::wait_for("the rollout starts", || status(|a| cp.weft(a)), |s| s["phase"] == "Progressing");
    assert_eq!(s["step"], 1, "{s}");
    let (ok, out) = cp.weft(&["rollout", "promote", "reviews"]);
    assert!(ok && out.contains("promoted by hand at step 1/3"), "{out}");
    let (ok, out) = cp.weft(&["rollout", "status", "reviews"]);
    assert!(ok && out.contains("step:     2/3: 20% of requests to v3"), "{out}");
    let (ok, vs) = cp.weft(&["get", "vs", "reviews", "-o", "json"]);
    assert!(ok && vs.contains("rollout:"), "the rollout's VirtualService, from source `rollout`: {vs}");
    cp.stop();
    assert!(data.path().join("rollouts.json").is_file());

    let cp = Control::start(dir.path(), data.path());
    let s = status(|a| cp.weft(a));
    assert_eq!((s["phase"].as_str(), s["step"].as_u64()), (Some("Progressing"), Some(2)), "{s}");
    assert_eq!(s["traffic"], "20% of requests to v3", "{s}");
    let events: Vec<String> = s["events"].as_array().unwrap().iter().map(|e| e["reason"].to_string()).collect();
    assert!(events.iter().any(|e| e.contains("Advanced")), "{events:?}");
    // The restarted control plane writes the step's VirtualService again.
    let vs = UpMesh::wait_for(
        "the VirtualService is written again",
        || cp.weft(&["get", "vs", "reviews", "-o", "json"]).1,
        |vs| vs.contains("rollout:"),
    );
    assert!(vs.contains("reviews"), "{vs}");
    cp.stop();
}

// ---------------------------------------------------------------------------------------
// weft up Bookinfo with traffic
// ---------------------------------------------------------------------------------------

/// Requests through the ingress until dropped: counts pages, and pages where productpage
/// could not get reviews (what a user sees of a failing reviews call).
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(ingress: &str) -> Traffic {
        let (stop, sent, failed) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s, n, f, addr) = (stop.clone(), sent.clone(), failed.clone(), ingress.to_string());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let page = get(&addr, "/productpage");
                n.fetch_add(1, Ordering::Relaxed);
                if !page.starts_with("HTTP/1.1 200") || page.contains("reviews are currently unavailable") {
                    f.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(40));
            }
        });
        Traffic { stop, sent, failed, thread: Some(thread) }
    }

    fn counts(&self) -> (u64, u64) {
        (self.sent.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP/1.1 GET (connection closed after it): the whole answer as text.
fn get(addr: &str, path: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits up to `limit` for the rollout's phase to be `phase`.
fn wait_phase(mesh: &UpMesh, phase: &str, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = status(|a| mesh.weft(a));
        if s["phase"] == phase {
            return s;
        }
        assert!(Instant::now() < deadline, "not {phase} within {limit:?}: {s:#}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Polls until `check` holds, up to `limit`.
fn wait_until<T: std::fmt::Debug>(
    limit: Duration,
    what: &str,
    mut probe: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let v = probe();
        if check(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}; last: {v:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The reviews routes productpage's sidecar is served: (subset, weight) pairs.
fn reviews_weights(mesh: &UpMesh) -> String {
    let pod = mesh.pod_name("productpage-v1");
    mesh.weft(&["proxy-config", &pod, "routes", "-o", "json"]).1
}

#[test]
fn a_healthy_canary_is_promoted_through_every_step() {
    healthy_canary_is_promoted(&[]);
}

#[test]
fn a_healthy_canary_behind_an_envoy_sidecar_is_promoted_the_same_way() {
    let envoy = weft_testkit::envoy::binary();
    healthy_canary_is_promoted(&["--envoy-sidecar", "reviews-v3", "--envoy", &envoy.to_string_lossy()]);
}

fn healthy_canary_is_promoted(extra: &[&str]) {
    let mut args = vec!["--stats-interval", "1s"];
    args.extend_from_slice(extra);
    let mesh = UpMesh::start(None, &args, 6);
    mesh.apply(&repo(DR));
    let _traffic = Traffic::start(&mesh.ingress);
    mesh.apply_yaml(&rollout(&[(20, 20), (50, 20), (100, 20)], "20s", 3));
    let s = wait_phase(&mesh, "Succeeded", Duration::from_secs(240));
    let reasons: Vec<&str> = s["events"].as_array().unwrap().iter().filter_map(|e| e["reason"].as_str()).collect();
    assert_eq!(reasons.iter().filter(|r| **r == "Advanced").count(), 2, "{s:#}");
    assert!(reasons.contains(&"Promoted") && !reasons.contains(&"RolledBack"), "{s:#}");
    let last = &s["last"];
    assert_eq!(last["verdict"], "pass", "{s:#}");
    assert!(last["requests"].as_f64().unwrap() >= 3.0, "measured from real traffic: {s:#}");
    mesh.wait_config("productpage-v1", "routes", |c| {
        c.contains("outbound|9080|v3|reviews") && !c.contains("outbound|9080|v1|reviews")
    });
    let _ = reviews_weights(&mesh);
}

/// A RateLimit with status 500 on reviews-v3's sidecar: most requests to the canary fail.
const FAULTY_V3: &str = "apiVersion: weft.dev/v1alpha1\nkind: RateLimit\nmetadata:\n  name: break-reviews-v3\nspec:\n  selector:\n    matchLabels: {app: reviews, version: v3}\n  requestsPerUnit: 1\n  unit: hour\n  status: 500\n";

#[test]
fn a_failing_canary_is_rolled_back_before_its_next_step_within_the_failure_budget() {
    let mesh = UpMesh::start(None, &["--stats-interval", "1s"], 6);
    mesh.apply(&repo(DR));
    mesh.apply_yaml(FAULTY_V3);
    let traffic = Traffic::start(&mesh.ingress);
    let (sent0, failed0) = traffic.counts();
    // The configured budget: at most 20 failed canary requests over the rollout.
    let budget = 20;
    let spec = rollout(&[(20, 60), (50, 60), (100, 60)], "10s", 2)
        .replace("    minRequests: 2\n", &format!("    minRequests: 2\n    maxFailedRequests: {budget}\n"));
    mesh.apply_yaml(&spec);
    let s = wait_phase(&mesh, "RolledBack", Duration::from_secs(120));
    let (sent, failed) = traffic.counts();
    let (sent, failed) = (sent - sent0, failed - failed0);
    assert_eq!(s["step"], 1, "rolled back at its first step: {s:#}");
    let reasons: Vec<&str> = s["events"].as_array().unwrap().iter().filter_map(|e| e["reason"].as_str()).collect();
    assert!(!reasons.contains(&"Advanced"), "{s:#}");
    let msg = s["events"].as_array().unwrap().last().unwrap()["message"].as_str().unwrap().to_string();
    assert!(msg.contains("all traffic back to v1"), "{msg}");
    // Users saw fewer failed pages than the budget (productpage retries a failed reviews
    // call once, so a page fails only when both calls did).
    println!("{failed} of {sent} pages failed (budget {budget}); {msg}");
    assert!(failed < budget, "{failed} of {sent} pages failed, budget {budget}: {s:#}");
    mesh.wait_config("productpage-v1", "routes", |c| {
        c.contains("outbound|9080|v1|reviews") && !c.contains("outbound|9080|v3|reviews")
    });
    drop(traffic);
}

#[test]
fn an_abort_restores_the_stable_routing() {
    let mesh = UpMesh::start(None, &["--stats-interval", "1s"], 6);
    mesh.apply(&repo(DR));
    mesh.apply_yaml(&rollout(&[(50, 3600), (100, 3600)], "2s", 1));
    mesh.wait_config("productpage-v1", "routes", |c| c.contains("outbound|9080|v3|reviews"));
    let (ok, out) = mesh.weft(&["rollout", "abort", "reviews"]);
    assert!(ok && out.contains("Aborted"), "{out}");
    mesh.wait_config("productpage-v1", "routes", |c| {
        c.contains("outbound|9080|v1|reviews") && !c.contains("outbound|9080|v3|reviews")
    });
    let s = status(|a| mesh.weft(a));
    assert_eq!(s["phase"], "Aborted", "{s:#}");
}

const DENY_PRODUCTPAGE: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: reviews-policy\nspec:\n  selector:\n    matchLabels: {app: reviews}\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/default/sa/bookinfo-productpage]\n";

#[test]
fn a_staged_policy_denying_a_needed_caller_is_reverted_and_a_harmless_one_reaches_all() {
    let mesh = UpMesh::start(None, &["--stats-interval", "1s"], 6);
    let _traffic = Traffic::start(&mesh.ingress);
    let staged = |yaml: &str| {
        let mut child = mesh
            .weft_command(&["apply", "--staged", "--canary-percent", "25", "--interval", "20s", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
        let o = child.wait_with_output().unwrap();
        let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "{out}");
        out
    };
    let staged_state = |name: &str| -> serde_json::Value {
        let (_, out) = mesh.weft(&["rollout", "status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["staged"].as_array().unwrap().iter().find(|s| s["name"] == name).cloned().unwrap_or_default()
    };
    let out = staged(DENY_PRODUCTPAGE);
    assert!(out.contains("served to 1 of 3 affected workloads"), "{out}");
    let name = "staged/AuthorizationPolicy/default/reviews-policy";
    let s = staged_state(name);
    let canary = s["canary"][0][1].as_str().unwrap().to_string();
    // Only the canary's proxy has the policy (an RBAC filter); the other reviews do not.
    mesh.wait_config(&canary, "listeners", |c| c.contains("envoy.filters.http.rbac"));
    for other in ["reviews-v1", "reviews-v2", "reviews-v3"].iter().filter(|w| **w != canary) {
        let (_, c) = mesh.weft(&["proxy-config", &mesh.pod_name(other), "listeners", "-o", "json"]);
        assert!(!c.contains("envoy.filters.http.rbac"), "{other} got the staged policy");
    }
    let s = wait_until(
        Duration::from_secs(90),
        "the bad policy is judged",
        || staged_state(name),
        |s| s["phase"] != "Canary" && !s.is_null(),
    );
    assert_eq!(s["phase"], "Reverted", "{s:#}");
    mesh.wait_config(&canary, "listeners", |c| !c.contains("envoy.filters.http.rbac"));
    let (_, ap) = mesh.weft(&["get", "ap"]);
    assert!(!ap.contains("reviews-policy"), "never in the store: {ap}");

    // A harmless policy (denies a caller that does not exist) reaches every proxy.
    let harmless =
        DENY_PRODUCTPAGE.replace("reviews-policy", "reviews-harmless").replace("bookinfo-productpage", "nobody");
    staged(&harmless);
    let name = "staged/AuthorizationPolicy/default/reviews-harmless";
    let s = UpMesh::wait_for(
        "the harmless policy is judged",
        || staged_state(name),
        |s| s["phase"] != "Canary" && !s.is_null(),
    );
    assert_eq!(s["phase"], "Promoted", "{s:#}");
    for w in ["reviews-v1", "reviews-v2", "reviews-v3"] {
        mesh.wait_config(w, "listeners", |c| c.contains("envoy.filters.http.rbac"));
    }
}

#[test]
fn a_staged_route_to_a_missing_subset_is_reverted_after_reaching_only_the_callers() {
    let mesh = UpMesh::start(None, &["--stats-interval", "1s"], 6);
    mesh.apply(&repo(DR));
    let _traffic = Traffic::start(&mesh.ingress);
    // The gatherer has seen who calls reviews (productpage) before the change is staged.
    let (ok, out) = mesh.weft(&["dashboard"]);
    assert!(ok, "{out}");
    let api =
        out.split("http://").nth(1).and_then(|u| u.split('/').next()).unwrap_or_else(|| panic!("{out}")).to_string();
    wait_until(
        Duration::from_secs(60),
        "productpage -> reviews in the graph",
        || get(&api, "/api/v1/graph"),
        |g| g.contains("productpage-v1") && g.contains("reviews.default.svc.cluster.local"),
    );
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v9}\n";
    let stage = |yaml: &str| {
        let mut child = mesh
            .weft_command(&["apply", "--staged", "--interval", "20s", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
        let o = child.wait_with_output().unwrap();
        let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "{out}");
        out
    };
    let out = stage(vs);
    assert!(out.contains("served to 1 of 1 affected workloads first (productpage-v1.default)"), "{out}");
    // Only productpage's sidecar routes reviews to v9.
    mesh.wait_config("productpage-v1", "routes", |c| c.contains("outbound|9080|v9|reviews"));
    let (_, c) = mesh.weft(&["proxy-config", &mesh.pod_name("reviews-v2"), "routes", "-o", "json"]);
    assert!(!c.contains("|v9|"), "reviews-v2 got the staged route");
    let name = "staged/VirtualService/default/reviews";
    let staged_state = || -> serde_json::Value {
        let (_, out) = mesh.weft(&["rollout", "status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["staged"].as_array().unwrap().iter().find(|s| s["name"] == name).cloned().unwrap_or_default()
    };
    let s = wait_until(Duration::from_secs(90), "the route is judged", staged_state, |s| {
        !s.is_null() && s["phase"] != "Canary"
    });
    assert_eq!(s["phase"], "Reverted", "{s:#}");
    mesh.wait_config("productpage-v1", "routes", |c| !c.contains("|v9|"));
    let (_, vss) = mesh.weft(&["get", "vs"]);
    assert!(!vss.contains("reviews"), "never in the store: {vss}");
}
