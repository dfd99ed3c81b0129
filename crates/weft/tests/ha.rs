//! Replicas on etcd (issue 15): a real 3-member etcd cluster on loopback, three
//! `weft control --store etcd://...` processes, and two sidecars (a caller and a callee,
//! mTLS STRICT) that know all three replicas, with a steady stream of requests between
//! them the whole time:
//!
//! - kill -9 the replica the callee is connected to: no request fails, the callee is
//!   SYNCED on another replica (its registration never vanished meanwhile);
//! - a VirtualService applied through one replica reaches a proxy on another;
//! - kill -9 one etcd member: nothing changes, changes still apply;
//! - stop every replica past the proxies' certificate renewal time: traffic and mTLS keep
//!   working on the last config and certificates; when one replica is started again both
//!   proxies are SYNCED on it within 1 s of it accepting connections (from the replica's
//!   own ACK times), resumed with the versions they hold (nothing pushed again); with all
//!   replicas back the proxies renew their certificates (signed by the same, shared CA).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use weft_identity::cert::{certs_from_pem, CertInfo};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::get_via_proxy;
use weft_testkit::net::reserve_addr;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
const WAIT: Duration = Duration::from_secs(30);
/// Certificates live this long, so a renewal falls due while every replica is down.
const CERT_TTL: &str = "40s";

const MESH: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\nspec:\n  selector:\n    app: reviews\n  ports:\n  - name: http\n    port: 9080\n    targetPort: http\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: default\nspec:\n  mtls:\n    mode: STRICT\n";

fn virtual_service(tag: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n  - headers:\n      response:\n        set:\n          x-ha: {tag}\n    route:\n    - destination:\n        host: reviews\n")
}

/// A control-plane replica: its process, fixed xDS address and API address.
struct Replica {
    child: Option<Child>,
    xds: SocketAddr,
    api: String,
    data: PathBuf,
}

/// Starts a replica on `xds`; its process, API address and the moment its xDS port first
/// accepted a connection (probed every 2 ms from the spawn on).
async fn start_replica(store: &str, xds: SocketAddr, data: &Path) -> (Child, String, SystemTime) {
    let mut child = Command::new(WEFT)
        .args(["control", "--store", store, "--lease-ttl", "4s", "--cert-ttl", CERT_TTL])
        .arg("--data-dir")
        .arg(data)
        // One admin token for every replica (as one Secret mounted in each pod).
        .arg("--api-token-file")
        .arg(admin_token_file())
        .args(["--xds", &xds.to_string(), "--api", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let accepting = loop {
        if tokio::net::TcpStream::connect(xds).await.is_ok() {
            break SystemTime::now();
        }
        assert!(tokio::time::Instant::now() < deadline, "the replica on {xds} never accepted");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().unwrap();
    let bound: SocketAddr = line.split("xDS on ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    assert_eq!(bound, xds);
    let api = line.split("API on ").nth(1).unwrap().trim().to_string();
    (child, api, accepting)
}

const ADMIN_TOKEN: &str = "ha-test-admin-token";

/// The admin token file the replicas share, written once per test process.
fn admin_token_file() -> PathBuf {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("weft-ha-admin-{}", std::process::id()));
        std::fs::write(&path, ADMIN_TOKEN).unwrap();
        path
    })
    .clone()
}

async fn kill9(child: &mut Child) {
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

async fn weft(args: &[&str]) -> String {
    let o = Command::new(WEFT).args(args).env("WEFT_TOKEN", ADMIN_TOKEN).output().await.unwrap();
    assert!(o.status.success(), "weft {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn apply(api: &str, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("r.yaml");
    std::fs::write(&f, text).unwrap();
    weft(&["apply", "-f", f.to_str().unwrap(), "--server", api]).await;
}

async fn api_get(api: &str, path: &str) -> serde_json::Value {
    let mut req = weft_testkit::http::request(http::Method::GET, api, path, bytes::Bytes::new()).unwrap();
    req.headers_mut().insert(http::header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
    let r = weft_testkit::http::send_h1(api.parse().unwrap(), req).await.unwrap();
    assert_eq!(r.status, 200, "{path}: {:?}", r.body);
    serde_json::from_slice(&r.body).unwrap()
}

/// Whether proxy `id` is connected to the replica at `api` with every type SYNCED (the
/// list through any replica holds every replica's proxies, each naming its replica).
async fn synced_on(api: &str, id: &str) -> bool {
    let v = api_get(api, "/api/v1/proxies").await;
    v["proxies"].as_array().is_some_and(|ps| {
        ps.iter().any(|p| {
            p["id"] == id
                && p["replica"]["api"] == api
                && ["Cluster", "Listener", "ClusterLoadAssignment"].iter().all(|t| p["types"][*t]["status"] == "SYNCED")
        })
    })
}

/// When the replica at `api` saw proxy `id` ACK (or resume) the last of its types:
/// the listing's time minus the config's age.
async fn synced_at(api: &str, id: &str) -> SystemTime {
    let asked = SystemTime::now();
    let v = api_get(api, "/api/v1/proxies").await;
    let p = v["proxies"].as_array().unwrap().iter().find(|p| p["id"] == id).unwrap().clone();
    let youngest = p["types"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|t| t["config_age_seconds"].as_f64())
        .fold(f64::MAX, f64::min);
    asked - Duration::from_secs_f64(youngest)
}

/// Waits until `cond` holds, polling every 100 ms for at most [`WAIT`].
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn proxy(
    xds: &[SocketAddr],
    name: &str,
    token: &str,
    app: Option<SocketAddr>,
    outbound: SocketAddr,
) -> ProxyHandle {
    let (labels, ports, inbound) = match app {
        Some(a) => (
            "{app: reviews}",
            format!("  ports:\n  - {{name: http, port: {}, protocol: TCP}}\n", a.port()),
            format!("  inbound: \"{}\"\n", reserve_addr()),
        ),
        None => ("{app: productpage}", String::new(), String::new()),
    };
    let addresses: Vec<String> = xds.iter().map(|a| format!("http://{a}")).collect();
    let text = format!(
        "node:\n  id: {name}.default\n  name: {name}\n  namespace: default\n  service_account: {name}\n  labels: {labels}\n{ports}{inbound}  outbound: \"{outbound}\"\nxds:\n  address: [{}]\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\nidentity:\n  token: \"{token}\"\n",
        addresses.join(", ")
    );
    let p = ProxyHandle::start(Bootstrap::parse(&text, Path::new("bootstrap.yaml")).unwrap()).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "{name} never became ready");
    p
}

/// The serial and expiry of the certificate `p` presents (from its admin config dump).
async fn certificate(p: &ProxyHandle) -> (String, SystemTime) {
    let admin = p.admin_addr();
    let r = weft_testkit::http::get_h1(admin, &admin.to_string(), "/config_dump").await.unwrap();
    let dump: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let secrets = dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["@type"].as_str().is_some_and(|t| t.ends_with("SecretsConfigDump")))
        .unwrap()["dynamic_active_secrets"]
        .clone();
    let default = secrets.as_array().unwrap().iter().find(|s| s["name"] == "default").unwrap().clone();
    use base64::Engine as _;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(default["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"].as_str().unwrap())
        .unwrap();
    let certs = certs_from_pem(&String::from_utf8(pem).unwrap(), "chain").unwrap();
    let info = CertInfo::parse(&certs[0]).unwrap();
    (default["version_info"].as_str().unwrap().to_string(), info.not_after)
}

#[tokio::test]
async fn replicas_on_etcd_survive_replica_member_and_full_outages_without_a_failed_request() {
    let mut etcd = weft_testkit::etcd::EtcdCluster::start(3).await;
    let store = etcd.store_url();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas = Vec::new();
    for d in &dirs {
        let xds = reserve_addr();
        let (child, api, _) = start_replica(&store, xds, d.path()).await;
        replicas.push(Replica { child: Some(child), xds, api, data: d.path().to_path_buf() });
    }
    let xds: Vec<SocketAddr> = replicas.iter().map(|r| r.xds).collect();
    // Resources go in through replica 0; tokens come from replica 1 (same key everywhere).
    apply(&replicas[0].api, MESH).await;
    let token = |sa: &'static str, api: String| async move {
        let out = weft(&[
            "token",
            "create",
            "--namespace",
            "default",
            "--service-account",
            sa,
            "--server",
            &api,
            "-o",
            "json",
        ])
        .await;
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["token"].as_str().unwrap().to_string()
    };
    let app = EchoServer::start("reviews-v1").await;
    let callee =
        proxy(&xds, "reviews-v1", &token("reviews-v1", replicas[1].api.clone()).await, Some(app.addr), reserve_addr())
            .await;
    let out = reserve_addr();
    let caller =
        proxy(&xds, "productpage-v1", &token("productpage-v1", replicas[2].api.clone()).await, None, out).await;
    // Every replica sees both workloads, whichever it is connected to.
    for r in &replicas {
        eventually("every replica to see both workloads", || async {
            let v = api_get(&r.api, "/api/v1/registry").await;
            let ids: Vec<&str> = v["workloads"].as_array().unwrap().iter().filter_map(|w| w["id"].as_str()).collect();
            ids.contains(&"reviews-v1.default") && ids.contains(&"productpage-v1.default")
        })
        .await;
    }

    // Steady load, mTLS (STRICT) from caller to callee; remember the x-ha header seen.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let tag = Arc::new(Mutex::new(String::new()));
    let load = tokio::spawn({
        let (stop, sent, failures, tag) = (stop.clone(), sent.clone(), failures.clone(), tag.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                sent.fetch_add(1, Ordering::Relaxed);
                match get_via_proxy(out, "http://reviews:9080/").await {
                    Ok(r) if r.status == 200 => {
                        *tag.lock().unwrap() = r.header("x-ha").unwrap_or("").to_string();
                    }
                    Ok(r) => failures.lock().unwrap().push(format!("status {}: {}", r.status, r.text())),
                    Err(e) => failures.lock().unwrap().push(format!("error {e}")),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let progress = |n: u64| {
        let sent = sent.clone();
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            let target = sent.load(Ordering::Relaxed) + n;
            while sent.load(Ordering::Relaxed) < target {
                assert!(tokio::time::Instant::now() < deadline, "the load stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let no_failures = |when: &str| {
        let f = failures.lock().unwrap();
        assert!(
            f.is_empty(),
            "{when}: {} of {} requests failed: {:?}",
            f.len(),
            sent.load(Ordering::Relaxed),
            &f[..f.len().min(5)]
        );
    };
    progress(20).await;
    no_failures("before any failure");

    // 1. kill -9 the replica the callee is on: it moves, nothing fails.
    let mut on = None;
    for (i, r) in replicas.iter().enumerate() {
        if synced_on(&r.api, "reviews-v1.default").await {
            on = Some(i);
        }
    }
    let dead = on.expect("the callee is connected to a replica");
    let before = callee.xds_status().borrow().clone();
    kill9(replicas[dead].child.as_mut().unwrap()).await;
    replicas[dead].child = None;
    let alive: Vec<usize> = (0..3).filter(|i| *i != dead).collect();
    eventually("the callee SYNCED on another replica", || async {
        for i in &alive {
            if synced_on(&replicas[*i].api, "reviews-v1.default").await {
                return true;
            }
        }
        false
    })
    .await;
    eventually("the caller SYNCED on a live replica", || async {
        for i in &alive {
            if synced_on(&replicas[*i].api, "productpage-v1.default").await {
                return true;
            }
        }
        false
    })
    .await;
    progress(50).await;
    no_failures("after kill -9 of a replica");
    // The replica it reconnected to translates the same bytes: resumed with the versions
    // it held, nothing was pushed again.
    let after = callee.xds_status().borrow().clone();
    assert!(after.connects > before.connects, "the callee never reconnected");
    assert_eq!(after.acked, before.acked, "the new replica serves other versions");
    assert_eq!(after.updates, before.updates, "the callee was pushed its configuration again");

    // 2. A VirtualService through the replica the caller is not on reaches the caller.
    let mut caller_on = alive[0];
    for i in &alive {
        if synced_on(&replicas[*i].api, "productpage-v1.default").await {
            caller_on = *i;
        }
    }
    let via = *alive.iter().find(|i| **i != caller_on).unwrap_or(&caller_on);
    apply(&replicas[via].api, &virtual_service("one")).await;
    eventually("the caller to apply the VirtualService from another replica", || async {
        *tag.lock().unwrap() == "one"
    })
    .await;

    // 3. kill -9 one etcd member: no effect; changes still go through.
    etcd.kill(0).await;
    apply(&replicas[caller_on].api, &virtual_service("two")).await;
    eventually("a change with one etcd member down", || async { *tag.lock().unwrap() == "two" }).await;
    progress(50).await;
    no_failures("after kill -9 of an etcd member");

    // 4. Every replica down past the certificates' renewal time: traffic and mTLS go on.
    let (serial, not_after) = certificate(&caller).await;
    for r in replicas.iter_mut() {
        if let Some(mut c) = r.child.take() {
            kill9(&mut c).await;
        }
    }
    // Renewal falls due at half of the remaining life; wait until it has passed (with
    // its 10% jitter) while no replica can answer.
    let lifetime = not_after.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(lifetime.mul_f64(0.6)).await;
    assert_eq!(certificate(&caller).await.0, serial, "renewed with every replica down?");
    progress(50).await;
    no_failures("with every replica down");
    let xds_before = (callee.xds_status().borrow().clone(), caller.xds_status().borrow().clone());
    // One replica comes back first: both proxies must be SYNCED on it within 1 s of it
    // accepting connections (their reconnect delay is capped at 500 ms and a round tries
    // every address), resumed with the versions they hold.
    let back = &mut replicas[via];
    let (child, api, ready_at) = start_replica(&store, back.xds, &back.data).await;
    back.child = Some(child);
    back.api = api.clone();
    let mut resynced = Vec::new();
    for id in ["reviews-v1.default", "productpage-v1.default"] {
        eventually(&format!("{id} SYNCED on the first replica back"), || synced_on(&api, id)).await;
        let at = synced_at(&api, id).await;
        // Before the probe saw the port accept is possible (a proxy's connect raced it).
        let after = at.duration_since(ready_at).map_or_else(|e| -e.duration().as_secs_f64(), |d| d.as_secs_f64());
        resynced.push((id, after));
    }
    println!("SYNCED after the first replica accepted connections (s): {resynced:?}");
    for (id, after) in &resynced {
        assert!(*after < 1.0, "{id} SYNCED {after:.3} s after a replica accepted connections (want < 1 s)");
    }
    // Resumed: the same translation, so nothing was pushed again.
    let xds_after = (callee.xds_status().borrow().clone(), caller.xds_status().borrow().clone());
    for (before, after, who) in [(&xds_before.0, &xds_after.0, "callee"), (&xds_before.1, &xds_after.1, "caller")] {
        assert!(after.connects > before.connects, "the {who} never reconnected");
        assert_eq!(after.acked, before.acked, "the {who} runs other versions after the outage");
        assert_eq!(after.updates, before.updates, "the {who} was pushed its configuration again");
    }
    for r in replicas.iter_mut().filter(|r| r.child.is_none()) {
        let (child, api, _) = start_replica(&store, r.xds, &r.data).await;
        r.child = Some(child);
        r.api = api;
    }
    eventually("the caller renewed its certificate once replicas are back", || async {
        certificate(&caller).await.0 != serial
    })
    .await;
    eventually("the callee and caller SYNCED again", || async {
        let mut callee_ok = false;
        let mut caller_ok = false;
        for r in &replicas {
            callee_ok |= synced_on(&r.api, "reviews-v1.default").await;
            caller_ok |= synced_on(&r.api, "productpage-v1.default").await;
        }
        callee_ok && caller_ok
    })
    .await;
    progress(50).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    no_failures("at the end");
    drop(callee);
    drop(caller);
}
