//! `weft up` end to end, as a user runs it: the real binary starts the whole Bookinfo
//! mesh (control plane, sidecars, apps, ingress gateway); curl drives requests through
//! the ingress; `weft apply` / `weft delete` (finding the control plane by themselves)
//! apply every sample of Istio's `samples/bookinfo/networking`, and each must behave as
//! the Istio task describing it says. Then SIGTERM, and nothing may be left behind.
//!
//! The same scenario runs in explicit mode and in `--transparent` mode (network
//! namespaces; needs root, which CI has).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

fn samples() -> PathBuf {
    weft_testkit::conformance_dir().join("bookinfo/networking")
}

/// A running `weft up`.
struct Mesh {
    child: Child,
    state: tempfile::TempDir,
    ingress: String,
    /// Workload name -> its address (from the summary `weft up` prints).
    workloads: BTreeMap<String, String>,
    /// The temporary directory `weft up` made (from the `logs` line).
    run_dir: PathBuf,
    /// transparent mode: the bridge.
    bridge: Option<String>,
    transparent: bool,
    output: Vec<String>,
    started: Instant,
}

impl Mesh {
    fn start(transparent: bool) -> Mesh {
        Mesh::start_with(transparent, &[])
    }

    fn start_with(transparent: bool, extra: &[&str]) -> Mesh {
        let state = tempfile::tempdir().unwrap();
        let port = weft_testkit::net::reserve_port();
        let mut cmd = Command::new(WEFT);
        cmd.args(["up", "--api", "127.0.0.1:0", "--xds", "127.0.0.1:0", "--ingress-port", &port.to_string()])
            .args(["--access-log", "off"])
            .args(extra)
            .env("WEFT_STATE_DIR", state.path())
            .env("WEFT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if transparent {
            cmd.arg("--transparent");
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("weft up | {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut output = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let done = line.starts_with("Ctrl-C stops everything");
                    output.push(line);
                    if done {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("weft up did not report ready within 180 s: {output:#?}");
                }
            }
        }
        // Keep draining stdout so weft up never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        let mut workloads = BTreeMap::new();
        let mut run_dir = PathBuf::new();
        let mut bridge = None;
        let mut in_workloads = false;
        for l in &output {
            let words: Vec<&str> = l.split_whitespace().collect();
            if l.trim_start().starts_with("logs") {
                run_dir = PathBuf::from(words[1]).parent().unwrap().to_path_buf();
            }
            if l.trim_start().starts_with("network") {
                bridge = words.iter().find(|w| w.starts_with("weftbr")).map(|s| s.to_string());
            }
            if in_workloads && words.len() >= 2 && l.starts_with("    ") {
                workloads.insert(words[0].to_string(), words[1].to_string());
            }
            if l.trim_start().starts_with("workloads:") {
                in_workloads = true;
            }
        }
        if extra.contains(&"-f") {
            assert!(!workloads.is_empty(), "workloads announced: {output:#?}");
        } else {
            assert_eq!(workloads.len(), 6, "six Bookinfo workloads announced: {output:#?}");
        }
        assert!(run_dir.file_name().unwrap().to_string_lossy().starts_with("weft-up-"), "{run_dir:?}");
        assert_eq!(bridge.is_some(), transparent, "{output:#?}");
        Mesh {
            child,
            state,
            ingress: format!("127.0.0.1:{port}"),
            workloads,
            run_dir,
            bridge,
            transparent,
            output,
            started: Instant::now(),
        }
    }

    fn weft(&self, args: &[&str]) -> (bool, String) {
        // No --server: the CLI finds the control plane through the state file.
        let o = Command::new(WEFT)
            .args(args)
            .env("WEFT_STATE_DIR", self.state.path())
            .env_remove("WEFT_SERVER")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        (o.status.success(), text)
    }

    fn apply(&self, sample: &str) {
        println!("[{:?}] weft apply -f {sample}", self.started.elapsed());
        let (ok, out) = self.weft(&["apply", "-f", samples().join(sample).to_str().unwrap()]);
        assert!(ok, "weft apply -f {sample}: {out}");
    }

    fn delete(&self, sample: &str) {
        println!("[{:?}] weft delete -f {sample}", self.started.elapsed());
        let (ok, out) = self.weft(&["delete", "-f", samples().join(sample).to_str().unwrap()]);
        assert!(ok, "weft delete -f {sample}: {out}");
    }

    /// curl through the ingress: (status, body).
    fn curl(&self, path: &str, headers: &[&str]) -> (u16, String) {
        let mut c = Command::new(weft_testkit::tools::require("curl"));
        c.args(["-s", "-m", "20", "-w", "\n%{http_code}"]);
        for h in headers {
            c.args(["-H", h]);
        }
        let o = c.arg(format!("http://{}{path}", self.ingress)).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// The reviews version that answered, from the JSON API's `podname`; its stars must
    /// agree with it (none for v1, black for v2, red for v3).
    fn reviews_version(&self, user: Option<&str>) -> String {
        match self.reviews_state(user) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`Mesh::reviews_version`] without panicking (for conditions still converging).
    fn reviews_state(&self, user: Option<&str>) -> Result<String, String> {
        let header = user.map(|u| format!("end-user: {u}"));
        let headers: Vec<&str> = header.iter().map(String::as_str).collect();
        let (code, body) = self.curl("/api/v1/products/0/reviews", &headers);
        if code != 200 {
            return Err(format!("status {code}: {body}"));
        }
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        let pod = v["podname"].as_str().ok_or_else(|| format!("no podname: {body}"))?;
        let version = pod.split('-').nth(1).ok_or_else(|| format!("podname {pod}"))?;
        let color = v["reviews"][0]["rating"]["color"].as_str();
        let consistent = match version {
            "v1" => v["reviews"][0].get("rating").is_none(),
            "v2" => color == Some("black"),
            "v3" => color == Some("red"),
            _ => false,
        };
        if consistent {
            Ok(version.to_string())
        } else {
            Err(format!("{version} answered with the wrong stars (or none): {body}"))
        }
    }

    /// [`Mesh::versions`], or None while answers are inconsistent (still converging).
    fn try_versions(&self, n: usize, user: Option<&str>) -> Option<BTreeMap<String, usize>> {
        let mut out = BTreeMap::new();
        for _ in 0..n {
            *out.entry(self.reviews_state(user).ok()?).or_default() += 1;
        }
        Some(out)
    }

    fn versions(&self, n: usize, user: Option<&str>) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for _ in 0..n {
            *out.entry(self.reviews_version(user)).or_default() += 1;
        }
        out
    }

    /// Waits until `check` holds (configuration reaches every proxy asynchronously).
    fn eventually(&self, what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(Instant::now() < deadline, "{what}: not true after 30 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn metrics(&self, workload: &str) -> String {
        let ip = &self.workloads[workload];
        let o = Command::new(weft_testkit::tools::require("curl"))
            .args(["-s", "-m", "5", &format!("http://{ip}:15020/stats/prometheus")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// SIGTERM, then checks that nothing is left: processes, files, state, network.
    fn stop_and_check_nothing_left(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "weft up did not stop within 60 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "weft up exit status {status}");
        assert!(!self.run_dir.exists(), "{} left behind", self.run_dir.display());
        assert!(!self.state.path().join("up.json").exists(), "state file left behind");
        let marker = self.run_dir.to_string_lossy().into_owned();
        let mut leftovers = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains(&marker) {
                    leftovers.push(cmdline);
                }
            }
        }
        assert!(leftovers.is_empty(), "processes left behind: {leftovers:#?}");
        // Explicit mode: the apps' loopback addresses answer nothing any more (in
        // transparent mode the addresses are gone with the bridge, checked below; a
        // connection attempt would leave the machine by the default route).
        for (name, ip) in self.workloads.iter().filter(|_| !self.transparent) {
            let addr: std::net::SocketAddr = format!("{ip}:9080").parse().unwrap();
            assert!(
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
                "{name} still listening on {addr}"
            );
        }
        if let Some(bridge) = &self.bridge {
            let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
            let netns = String::from_utf8_lossy(&netns.stdout);
            assert!(!netns.contains(bridge.as_str()), "namespaces left behind: {netns}");
            let link = Command::new("ip").args(["link", "show", bridge]).output().unwrap();
            assert!(!link.status.success(), "bridge {bridge} left behind");
            let rules = Command::new("iptables").args(["-S"]).output().unwrap();
            let rules = String::from_utf8_lossy(&rules.stdout);
            assert!(!rules.contains(bridge.as_str()), "host iptables rules left behind: {rules}");
            let etc: Vec<_> = std::fs::read_dir("/etc/netns")
                .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            assert!(!etc.iter().any(|n| n.starts_with(bridge.as_str())), "/etc/netns entries left behind: {etc:?}");
        }
        let _ = &self.output;
    }
}

impl Drop for Mesh {
    /// A failed test must not leave a mesh running: SIGTERM (full teardown), then kill.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
        }
    }
}

/// `count` of `n` draws with weight `p` is within 4.5 standard deviations (a false
/// failure once in ~150,000 runs).
fn within(count: usize, n: usize, p: f64) -> bool {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (count as f64 - mean).abs() <= 4.5 * sd + 0.5
}

fn run_every_bookinfo_task(mesh: &Mesh) {
    // Before any rule: productpage through the ingress, reviews round-robin over v1, v2, v3.
    let (code, page) = mesh.curl("/productpage", &[]);
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("The Comedy of Errors") && page.contains("Book Details"), "{page}");
    let seen = mesh.versions(30, None);
    assert_eq!(seen.len(), 3, "all three reviews versions answer without rules: {seen:?}");
    // Paths the gateway's VirtualService does not route: 404 from the gateway.
    assert_eq!(mesh.curl("/not-routed", &[]).0, 404);

    // Request routing: everything to v1.
    mesh.apply("destination-rule-all.yaml");
    mesh.apply("virtual-service-all-v1.yaml");
    mesh.eventually("virtual-service-all-v1 routes reviews to v1", || {
        mesh.try_versions(5, None).is_some_and(|v| v.keys().eq(["v1"]))
    });
    assert_eq!(mesh.versions(40, None).keys().collect::<Vec<_>>(), ["v1"]);

    // Request routing by user identity: jason (logged in, or end-user header) to v2.
    mesh.apply("virtual-service-reviews-test-v2.yaml");
    mesh.eventually("jason reaches v2", || mesh.reviews_state(Some("jason")).is_ok_and(|v| v == "v2"));
    assert_eq!(mesh.versions(10, Some("jason")).keys().collect::<Vec<_>>(), ["v2"]);
    assert_eq!(mesh.versions(10, Some("alice")).keys().collect::<Vec<_>>(), ["v1"]);
    login_as_jason_shows_black_stars(mesh);

    // Fault injection, delay: jason's ratings call is delayed 7 s; reviews v2 waits
    // (10 s timeout) but productpage gives up after 3 s and one retry.
    mesh.apply("virtual-service-ratings-test-delay.yaml");
    mesh.eventually("the delay applies to jason", || {
        let t = Instant::now();
        let (_, page) = mesh.curl("/productpage", &["end-user: jason"]);
        page.contains("Sorry, product reviews are currently unavailable for this book.")
            && t.elapsed() >= Duration::from_secs(5)
    });
    let (_, page) = mesh.curl("/productpage", &[]);
    assert!(page.contains("Book Reviews") && !page.contains("Sorry"), "other users are not delayed: {page}");

    // Fault injection, abort: jason's ratings calls get HTTP 500.
    mesh.apply("virtual-service-ratings-test-abort.yaml");
    mesh.eventually("the abort applies to jason", || {
        mesh.curl("/productpage", &["end-user: jason"]).1.contains("Ratings service is currently unavailable")
    });
    let (_, page) = mesh.curl("/productpage", &[]);
    assert!(!page.contains("Ratings service is currently unavailable"), "only jason is aborted: {page}");
    mesh.delete("virtual-service-ratings-test-abort.yaml");

    // Fault injection on details: every call aborted with 555.
    mesh.apply("fault-injection-details-v1.yaml");
    mesh.eventually("details aborts", || mesh.curl("/productpage", &[]).1.contains("Error fetching product details!"));
    mesh.delete("fault-injection-details-v1.yaml");
    mesh.apply("destination-rule-all.yaml");
    mesh.eventually("details answers again", || {
        let (_, page) = mesh.curl("/productpage", &[]);
        page.contains("Book Details") && !page.contains("Error fetching product details!")
    });

    // Traffic shifting: weighted splits, counted over 200 requests each.
    mesh.apply("virtual-service-all-v1.yaml");
    for (sample, split) in [
        ("virtual-service-reviews-50-v3.yaml", [("v1", 0.5), ("v3", 0.5)]),
        ("virtual-service-reviews-80-20.yaml", [("v1", 0.8), ("v2", 0.2)]),
        ("virtual-service-reviews-90-10.yaml", [("v1", 0.9), ("v2", 0.1)]),
        ("virtual-service-reviews-v2-v3.yaml", [("v2", 0.5), ("v3", 0.5)]),
    ] {
        mesh.apply(sample);
        let (second, p) = split[1];
        mesh.eventually(&format!("{sample} reaches {second}"), || {
            mesh.try_versions(20, None).is_some_and(|v| v.contains_key(second))
        });
        let n = 200;
        let got = mesh.versions(n, None);
        let total: usize = got.values().sum();
        assert_eq!(total, n);
        let allowed: Vec<&str> = split.iter().map(|(v, _)| *v).collect();
        assert!(got.keys().all(|k| allowed.contains(&k.as_str())), "{sample}: {got:?}");
        let count = got.get(second).copied().unwrap_or(0);
        assert!(within(count, n, p), "{sample}: {count}/{n} to {second}, expected about {p}: {got:?}");
    }
    mesh.apply("virtual-service-reviews-v3.yaml");
    mesh.eventually("everything to v3", || mesh.try_versions(10, None).is_some_and(|v| v.keys().eq(["v3"])));
    assert_eq!(mesh.versions(30, None).keys().collect::<Vec<_>>(), ["v3"]);

    // ratings v2 (a database-backed version) is not deployed: with the ratings-db rules,
    // reviews v3 gets no healthy ratings endpoint, as it would in Istio without it.
    mesh.apply("virtual-service-ratings-db.yaml");
    mesh.eventually("ratings v2 has no endpoint", || {
        mesh.curl("/productpage", &[]).1.contains("Ratings service is currently unavailable")
    });
    mesh.apply("virtual-service-all-v1.yaml");

    // Mutual TLS: the DestinationRules asking for ISTIO_MUTUAL keep everything working,
    // and the server sidecars see the callers' SPIFFE identities over mTLS.
    mesh.apply("destination-rule-all-mtls.yaml");
    mesh.apply("virtual-service-reviews-v2-v3.yaml");
    mesh.eventually("reviews v2/v3 answer with their stars over ISTIO_MUTUAL", || {
        (0..10).all(|_| mesh.reviews_state(None).is_ok_and(|v| v != "v1"))
    });
    let (code, page) = mesh.curl("/productpage", &[]);
    assert_eq!(code, 200);
    assert!(page.contains("Book Details") && !page.contains("unavailable"), "{page}");
    let m = mesh.metrics("productpage-v1");
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total")
            && l.contains("reporter=\"destination\"")
            && l.contains("connection_security_policy=\"mutual_tls\"")
            && l.contains(
                "source_principal=\"spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account\""
            )
            // Workloads are the LocalWorkloads (not their instances), the service its FQDN.
            && l.contains("source_workload=\"istio-ingressgateway\"")
            && l.contains("destination_workload=\"productpage-v1\"")
            && l.contains("destination_service=\"productpage.default.svc.cluster.local\"")
            && l.contains("destination_service_namespace=\"default\"")
            && l.contains("destination_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\"")),
        "productpage sees the ingress gateway's identity over mTLS:\n{m}"
    );
    let m = mesh.metrics("ratings-v1");
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total")
            && l.contains("reporter=\"destination\"")
            && l.contains("connection_security_policy=\"mutual_tls\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-reviews\"")),
        "ratings sees reviews' identity over mTLS:\n{m}"
    );

    // The other samples are accepted (their behaviour needs hosts outside this machine,
    // privileged ports or workloads Bookinfo does not run).
    for sample in ["bookinfo-gateway2.yaml", "destination-rule-reviews.yaml", "egress-rule-google-apis.yaml"] {
        mesh.apply(sample);
    }
    mesh.eventually("reviews still answer with RANDOM load balancing", || {
        mesh.reviews_state(None).is_ok_and(|v| v != "v1")
    });

    // STRICT mTLS mesh-wide (applied from standard input): the ingress and every hop keep
    // working, a plaintext client reaching a sidecar's inbound side is refused.
    let ratings = &mesh.workloads["ratings-v1"];
    let inbound = if mesh.transparent { format!("{ratings}:9080") } else { format!("{ratings}:15006") };
    let plaintext = || {
        let o = Command::new(weft_testkit::tools::require("curl"))
            .args(["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{inbound}/ratings/0")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(plaintext(), "200", "PERMISSIVE accepts plaintext");
    let mut apply = Command::new(WEFT)
        .args(["apply", "-f", "-"])
        .env("WEFT_STATE_DIR", mesh.state.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    apply
        .stdin
        .take()
        .unwrap()
        .write_all(b"apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n")
        .unwrap();
    assert!(apply.wait().unwrap().success(), "weft apply -f - (standard input)");
    mesh.eventually("STRICT refuses plaintext", || plaintext() != "200");
    let (code, page) = mesh.curl("/productpage", &[]);
    assert_eq!(code, 200);
    assert!(page.contains("Book Details") && page.contains("Book Reviews") && !page.contains("unavailable"), "{page}");
}

fn login_as_jason_shows_black_stars(mesh: &Mesh) {
    let jar = mesh.state.path().join("cookies");
    let jar = jar.to_str().unwrap();
    let curl = weft_testkit::tools::require("curl");
    // curl -s -m 20 EXTRA... http://<ingress><path>: its exit success and body.
    let run = |extra: &[&str], path: &str| {
        let o = Command::new(&curl)
            .args(["-s", "-m", "20"])
            .args(extra)
            .arg(format!("http://{}{path}", mesh.ingress))
            .output()
            .unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    assert!(run(&["-c", jar, "-d", "username=jason&passwd=jason"], "/login").0);
    let (_, page) = run(&["-b", jar], "/productpage");
    assert!(page.contains("jason") && page.contains("<font color=\"black\">"), "jason sees v2's black stars: {page}");
    assert!(run(&["-b", jar, "-c", jar], "/logout").0);
    let (_, page) = run(&["-b", jar], "/productpage");
    assert!(!page.contains("<font color="), "after logout, v1 without stars: {page}");
}

#[test]
fn explicit_mode_runs_every_bookinfo_task_and_tears_down() {
    let mut mesh = Mesh::start(false);
    run_every_bookinfo_task(&mesh);
    // Operators name proxies by workload, as the summary lists them.
    let (ok, out) = mesh.weft(&["proxy-config", "ratings-v1", "listeners"]);
    assert!(
        ok && out.contains("inbound|9080") && out.contains("tls"),
        "STRICT: the inbound listener takes mTLS: {out}"
    );
    let (ok, out) = mesh.weft(&["proxy-config", "reviews", "listeners"]);
    assert!(!ok && out.contains("several proxies"), "{out}");
    // A second `weft up` refuses to start beside the running one.
    let o = Command::new(WEFT)
        .args(["up", "--api", "127.0.0.1:0"])
        .env("WEFT_STATE_DIR", mesh.state.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already running"), "{}", String::from_utf8_lossy(&o.stderr));
    mesh.stop_and_check_nothing_left();
}

#[test]
fn transparent_mode_runs_every_bookinfo_task_and_tears_down() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (network namespaces, bridge, iptables); CI runs as root"
    );
    let mut mesh = Mesh::start(true);
    run_every_bookinfo_task(&mesh);
    // The app has no idea a mesh exists: inside productpage's namespace, a Service applied
    // after start resolves by name and its plain HTTP call is captured and routed.
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: stars, namespace: default}\nspec:\n  selector: {app: ratings}\n  ports: [{name: http, port: 9080}]\n";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stars.yaml"), svc).unwrap();
    let (ok, out) = mesh.weft(&["apply", "-f", dir.path().join("stars.yaml").to_str().unwrap()]);
    assert!(ok, "{out}");
    let ns = format!("{}-productpage-v1", mesh.bridge.as_deref().unwrap());
    let curl = weft_testkit::tools::require("curl");
    mesh.eventually("a new Service answers by name inside a workload's namespace", || {
        let o = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&curl)
            .args(["-s", "-m", "5", "http://stars:9080/ratings/0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).contains("\"ratings\"")
    });
    mesh.stop_and_check_nothing_left();
}

/// TCP Services sharing a port (as several databases share 3306) in transparent mode:
/// the capture tells them apart by the address each name resolves to, so each client
/// connection reaches the workloads of the Service it named, as with Istio's
/// `<VIP>_<port>` listeners.
#[test]
fn transparent_mode_tells_tcp_services_sharing_a_port_apart() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (network namespaces, bridge, iptables); CI runs as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let echo = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: {name}}}\n  ports: [{{name: tcp, port: 9000}}]\n---\n\
             apiVersion: weft.dev/v1alpha1\nkind: LocalWorkload\nmetadata: {{name: {name}}}\nspec:\n  labels: {{app: {name}}}\n  \
             command: [weft, demo, tcp-echo, \"9000\", --address=$(WEFT_APP_ADDRESS), --prefix={name}]\n  ports: [{{name: tcp, port: 9000}}]\n---\n"
        )
    };
    let sleep = "apiVersion: weft.dev/v1alpha1\nkind: LocalWorkload\nmetadata: {name: sleep}\nspec:\n  labels: {app: sleep}\n  command: [weft, demo, sleep]\n";
    std::fs::write(dir.path().join("mesh.yaml"), format!("{}{}{sleep}", echo("db-one"), echo("db-two"))).unwrap();
    let mut mesh = Mesh::start_with(true, &["-f", dir.path().to_str().unwrap()]);
    let ns = format!("{}-sleep", mesh.bridge.as_deref().unwrap());
    // One line over a fresh connection to NAME:9000, as an app would send it.
    let ask = |name: &str| {
        let script = format!("exec 3<>/dev/tcp/{name}/9000; echo hello >&3; timeout 5 head -1 <&3");
        let o = Command::new("ip").args(["netns", "exec", &ns, "bash", "-c", &script]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    mesh.eventually("both TCP Services answer by name", || {
        ask("db-one") == "db-one hello" && ask("db-two") == "db-two hello"
    });
    for _ in 0..5 {
        assert_eq!(ask("db-two"), "db-two hello");
        assert_eq!(ask("db-one"), "db-one hello");
    }
    mesh.stop_and_check_nothing_left();
}

/// A workload that exits on its own (a job) takes its sidecar with it, and it only
/// started once that sidecar was ready: the job records what the sidecar's readiness
/// endpoint answered when the job began.
#[test]
fn a_job_starts_after_its_sidecar_is_ready_and_its_exit_stops_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let curl = weft_testkit::tools::require("curl");
    std::fs::write(
        dir.path().join("job.yaml"),
        format!(
            r#"apiVersion: weft.dev/v1alpha1
kind: LocalWorkload
metadata:
  name: migrate
  namespace: batch
spec:
  labels: {{app: migrate}}
  serviceAccount: migrator
  command: [sh, -c]
  args: ["{curl} -s -o /dev/null -w '%{{http_code}}' http://$(POD_IP):15020/healthz/ready > $(OUT); sleep 2"]
  env:
    OUT: {seen}
  ports:
  - name: http
    port: 8000
"#,
            curl = curl.display(),
            seen = seen.display()
        ),
    )
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut child = Command::new(WEFT)
        .args(["up", "-f", dir.path().to_str().unwrap(), "--api", "127.0.0.1:0", "--xds", "127.0.0.1:0"])
        .args(["--ingress-port", &weft_testkit::net::reserve_port().to_string()])
        .env("WEFT_STATE_DIR", state.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("weft up | {line}");
            let _ = tx.send(line);
        }
    });
    let mut ip = None;
    let mut exited = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !exited {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("weft up output");
        if line.trim_start().starts_with("migrate ") {
            ip = line.split_whitespace().nth(1).map(str::to_string);
        }
        exited = line.contains("migrate exited");
    }
    assert_eq!(std::fs::read_to_string(&seen).unwrap(), "200", "the job started before its sidecar was ready");
    let ip = ip.expect("the job's address in the summary");
    let health: std::net::SocketAddr = format!("{ip}:15020").parse().unwrap();
    let gone = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect_timeout(&health, Duration::from_millis(200)).is_ok() {
        assert!(Instant::now() < gone, "the sidecar outlived its job by 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(child.try_wait().unwrap().is_none(), "weft up keeps running after a job ends");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = weft_testkit::process::wait_exit(&mut child, Duration::from_secs(60), "weft up after SIGTERM");
    assert!(status.success(), "weft up exited with {status}");
}

/// The pids of `parent`'s children whose command line contains every word of `words`.
fn children_running(parent: u32, words: &[&str]) -> Vec<i32> {
    let list = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap_or_default();
    list.split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            words.iter().all(|w| cmdline.contains(w))
        })
        .collect()
}

#[test]
fn replicas_run_on_a_local_etcd_and_a_killed_replica_goes_unnoticed() {
    let mut mesh = Mesh::start_with(false, &["--replicas", "3"]);
    assert!(
        mesh.output.iter().any(|l| l.trim_start().starts_with("replicas") && l.contains("2 more")),
        "{:#?}",
        mesh.output
    );
    assert!(mesh.output.iter().any(|l| l.trim_start().starts_with("etcd")), "{:#?}", mesh.output);
    let up = mesh.child.id();
    assert_eq!(children_running(up, &["etcd", "--initial-cluster"]).len(), 3, "three etcd members");
    // etcd over TLS, asking for client certificates; the replicas present theirs.
    assert_eq!(children_running(up, &["etcd", "--client-cert-auth", "https://"]).len(), 3, "etcd over TLS");
    let replicas = children_running(up, &["control", "--store", "etcds://", "--etcd-cert"]);
    assert_eq!(replicas.len(), 2, "two child replicas beside the one in weft up");
    mesh.eventually("the product page answers", || mesh.curl("/productpage", &[]).0 == 200);

    // kill -9 one replica: every request still answers.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(replicas[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    for i in 0..40 {
        let (status, _) = mesh.curl("/productpage", &[]);
        assert_eq!(status, 200, "request {i} after the replica was killed");
    }
    // A change still reaches every proxy (through the replicas left).
    mesh.apply("destination-rule-all.yaml");
    mesh.apply("virtual-service-all-v1.yaml");
    mesh.eventually("reviews v1 only", || mesh.try_versions(20, None).is_some_and(|v| v.keys().eq(["v1"])));
    mesh.stop_and_check_nothing_left();
}
