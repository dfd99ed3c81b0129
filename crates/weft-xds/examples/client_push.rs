//! ADS client cost per pushed change (a benchmark, not a test): N SotW clients in this
//! process, an [`AdsServer`] in a child process (this same binary, `serve`), and K route
//! changes. For each change it reports the CPU time this process (the clients only)
//! spent from the push until every client's handler had the new routes, per client.
//!
//! `cargo run --release -p weft-xds --example client_push -- 2000 --changes 20`
//!
//! The handler does what `crates/weft/examples/xds_scale.rs`'s does (and what a proxy's
//! store does at least): decodes each RouteConfiguration it gets and checks where it
//! routes. Under callgrind (`valgrind --tool=callgrind --collect-atstart=no
//! target/release/examples/client_push 500 --changes 5 --callgrind`) the example
//! switches instrumentation on for the change windows only (`callgrind_control -i`), so
//! the count is the clients' instructions per change.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{HeaderValueOption, RuntimeFractionalPercent};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, route_match, Decorator, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost,
};
use envoy_types::util::pack_any;
use prost::Message;
use weft_xds::type_url::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use weft_xds::{
    AdsClient, AdsServer, Any, Backoff, ClientConfig, NodeInfo, ResourceHandler, ResourceUpdate, StaticSource, XdsMode,
};

/// Route configuration names every client subscribes to (as the scale benchmark's).
const ROUTE_NAMES: [&str; 2] = ["weft-outbound", "9080"];
/// `Probe::have` before any routes arrived.
const NONE: u64 = u64::MAX;
const SERVICES: [&str; 4] = ["details", "productpage", "ratings", "reviews"];

/// Decodes every route configuration it gets and records when `reviews` goes to the
/// subset of the current change.
struct Probe {
    /// The change number every client should reach.
    want: Arc<AtomicU64>,
    /// The change this client has (`NONE` before the first routes).
    have: AtomicU64,
    done: Arc<AtomicUsize>,
}

impl ResourceHandler for Probe {
    fn type_urls(&self) -> Vec<&'static str> {
        vec![CLUSTER, ENDPOINT, LISTENER, ROUTE]
    }

    fn apply(&self, type_url: &str, update: ResourceUpdate) -> Result<(), String> {
        if type_url != ROUTE {
            return Ok(());
        }
        let want = self.want.load(Ordering::Acquire);
        let cluster = subset_cluster(want);
        let mut routed = false;
        for (_, any) in &update.upserts {
            let rc = RouteConfiguration::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
            routed |= routes_to(&rc, &cluster);
        }
        // `have` starts at NONE: the initial routes (change 0) count too.
        let had = if routed { self.have.swap(want, Ordering::AcqRel) } else { want };
        if had == NONE || had < want {
            self.done.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    fn interest(&self, type_url: &str) -> Option<BTreeSet<String>> {
        match type_url {
            ROUTE => Some(ROUTE_NAMES.iter().map(|s| s.to_string()).collect()),
            ENDPOINT => {
                Some(SERVICES.iter().map(|s| format!("outbound|9080||{s}.default.svc.cluster.local")).collect())
            }
            _ => None,
        }
    }
}

fn routes_to(rc: &RouteConfiguration, cluster: &str) -> bool {
    rc.virtual_hosts.iter().flat_map(|vh| &vh.routes).any(|r| match &r.action {
        Some(route::Action::Route(a)) => {
            matches!(&a.cluster_specifier, Some(route_action::ClusterSpecifier::Cluster(c)) if c == cluster)
        }
        _ => false,
    })
}

/// The cluster `reviews` routes to at change `k` (0: the initial `v1`).
fn subset_cluster(k: u64) -> String {
    let subset = match k {
        0 => "v1",
        k if k % 2 == 1 => "v2",
        _ => "v3",
    };
    format!("outbound|9080|{subset}|reviews.default.svc.cluster.local")
}

/// A route configuration shaped like the translator's for Bookinfo: a virtual host per
/// service with Istio's domain forms, one route each with a retry policy.
fn route_config(name: &str, change: u64) -> Any {
    let virtual_hosts = SERVICES
        .iter()
        .map(|svc| {
            let fqdn = format!("{svc}.default.svc.cluster.local");
            let domains = [svc.to_string(), format!("{svc}.default"), format!("{svc}.default.svc"), fqdn.clone()]
                .into_iter()
                .flat_map(|d| [format!("{d}:9080"), d])
                .collect();
            let cluster = if *svc == "reviews" { subset_cluster(change) } else { format!("outbound|9080||{fqdn}") };
            VirtualHost {
                name: format!("{fqdn}:9080"),
                domains,
                routes: vec![Route {
                    name: "default".to_string(),
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_string())),
                        runtime_fraction: None::<RuntimeFractionalPercent>,
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster)),
                        retry_policy: Some(RetryPolicy {
                            retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
                                .to_string(),
                            retriable_status_codes: vec![503],
                            ..Default::default()
                        }),
                        ..Default::default()
                    })),
                    decorator: Some(Decorator { operation: format!("{fqdn}:9080/*"), ..Default::default() }),
                    request_headers_to_add: Vec::<HeaderValueOption>::new(),
                    ..Default::default()
                }],
                ..Default::default()
            }
        })
        .collect();
    pack_any(RouteConfiguration { name: name.to_string(), virtual_hosts, ..Default::default() })
}

fn routes(change: u64) -> Vec<Any> {
    ROUTE_NAMES.iter().map(|n| route_config(n, change)).collect()
}

/// Run time (ns) of every thread of this process so far (`/proc/self/task/*/schedstat`).
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The child: an ADS server with one listener, cluster and the routes; each line on
/// stdin is a change number to publish.
async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let source = StaticSource::new();
    source.set(
        LISTENER,
        vec![pack_any(envoy_types::pb::envoy::config::listener::v3::Listener {
            name: "weft-outbound".to_string(),
            ..Default::default()
        })],
    )?;
    source.set(
        CLUSTER,
        vec![pack_any(envoy_types::pb::envoy::config::cluster::v3::Cluster {
            name: "outbound|9080||reviews.default.svc.cluster.local".to_string(),
            ..Default::default()
        })],
    )?;
    source.set(ROUTE, routes(0))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let server = AdsServer::new(Arc::new(source.clone()));
    tokio::spawn(server.serve(listener, std::future::pending()));
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin()));
    while let Some(line) = lines.next_line().await? {
        source.set(ROUTE, routes(line.trim().parse()?))?;
    }
    Ok(())
}

fn callgrind(on: bool) {
    let pid = std::process::id().to_string();
    let arg = if on { "--instr=on" } else { "--instr=off" };
    let _ = std::process::Command::new("callgrind_control").args([arg, &pid]).output();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        return serve().await;
    }
    let n: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let changes: u64 = match args.iter().position(|a| a == "--changes") {
        Some(i) => args.get(i + 1).map(|s| s.parse()).transpose()?.unwrap_or(10),
        None => 10,
    };
    let use_callgrind = args.iter().any(|a| a == "--callgrind");
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("serve")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut to_server = child.stdin.take().ok_or("no stdin")?;
    let mut addr = String::new();
    std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut addr)?;
    let address = format!("http://{}", addr.trim());

    let want = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    for i in 0..n {
        let node = NodeInfo {
            id: format!("sim-{i}"),
            name: format!("productpage-{i}"),
            namespace: "default".into(),
            labels: [("app".to_string(), "productpage".to_string())].into(),
            ..NodeInfo::default()
        };
        let handler = Arc::new(Probe { want: want.clone(), have: AtomicU64::new(NONE), done: done.clone() });
        let client = AdsClient::new(
            ClientConfig { address: address.clone(), node, mode: XdsMode::Sotw, backoff: Backoff::default() },
            handler,
        );
        tokio::spawn(client.run(std::future::pending()));
    }
    let started = Instant::now();
    while done.load(Ordering::Acquire) < n {
        if started.elapsed() > Duration::from_secs(300) {
            return Err("initial sync incomplete".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut per_client_us = Vec::new();
    for k in 1..=changes {
        done.store(0, Ordering::Release);
        want.store(k, Ordering::Release);
        if use_callgrind {
            callgrind(true);
        }
        let before = cpu_ns();
        writeln!(to_server, "{k}")?;
        to_server.flush()?;
        let t0 = Instant::now();
        while done.load(Ordering::Acquire) < n {
            if t0.elapsed() > Duration::from_secs(300) {
                return Err(format!("change {k} incomplete").into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let used = cpu_ns() - before;
        if use_callgrind {
            callgrind(false);
        }
        per_client_us.push(used as f64 / 1000.0 / n as f64);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = child.kill();
    let mut sorted = per_client_us.clone();
    sorted.sort_by(f64::total_cmp);
    let size: usize = routes(1).iter().map(|a| a.value.len()).sum();
    println!(
        "{}",
        serde_json::json!({
            "clients": n,
            "changes": changes,
            "route_bytes": size,
            "cpu_us_per_client_per_change": per_client_us,
            "median_us": sorted.get(sorted.len() / 2),
        })
    );
    Ok(())
}
