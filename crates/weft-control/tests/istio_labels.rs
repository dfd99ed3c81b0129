//! Istio's standard metric labels, label for label, from both reporters: a control plane
//! with its CA, a client sidecar (`productpage-v1`) and a server sidecar (`reviews-v2`,
//! serving the `reviews` HTTP service and the `db` TCP service), mTLS between them. Each
//! proxy's `/stats/prometheus` must carry exactly the label values Istio's proxies write:
//! the Deployment (not the pod) as workload, the service FQDN (not the Host header) on
//! the server side, the principals the certificates proved, the security policy as each
//! reporter knows it, and the same for TCP, a route miss (`NR`) and a fault abort (`FI`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_control::control::ControlPlane;
use weft_control::identity::IdentityConfig;
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::{grpc_call, grpc_call_with_headers, EchoServer, GrpcEchoServer, TcpEchoServer};
use weft_testkit::http::{get_h1, get_via_proxy};
use weft_testkit::net::{reserve_addr, reserve_consecutive, reserve_port};

const WAIT: Duration = Duration::from_secs(30);
const REVIEWS: &str = "reviews.default.svc.cluster.local";
const DB: &str = "db.default.svc.cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews";

type Labels = BTreeMap<String, String>;

/// A weft sidecar with a mesh identity for the workload `workload` (pod `<workload>-abcde`).
async fn sidecar(cp: &ControlPlane, workload: &str, app: &str, sa: &str, extra: &str) -> ProxyHandle {
    let token = mesh::join_token(cp, "default", sa).await;
    let text = format!(
        "node:\n  id: sidecar~127.0.0.1~{workload}-abcde.default~default.svc.cluster.local\n  cluster: {app}.default\n  name: {workload}-abcde\n  workload_name: {workload}\n  namespace: default\n  service_account: {sa}\n  labels:\n    app: {app}\n    version: v{}\n  outbound: {}\n{extra}xds:\n  address: http://{}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n",
        &workload[workload.len() - 1..],
        reserve_addr(),
        cp.xds_addr,
    );
    let b = Bootstrap::parse(&text, Path::new("sidecar.yaml")).unwrap();
    let p = ProxyHandle::start(b).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "{workload} never became ready");
    p
}

/// The label sets of `metric` series on `p`'s metrics page.
async fn series(p: &ProxyHandle, metric: &str) -> Vec<Labels> {
    let text = get_h1(p.metrics_addr(), "m", "/stats/prometheus").await.unwrap().text();
    text.lines()
        .filter_map(|l| l.strip_prefix(metric)?.strip_prefix('{'))
        .map(|l| parse_labels(l.rsplit_once('}').map_or(l, |(labels, _)| labels)))
        .collect()
}

/// `a="x",b="y\"z"` -> {a: x, b: y"z}.
fn parse_labels(text: &str) -> Labels {
    let mut out = Labels::new();
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
        out.insert(name.trim_start_matches(',').to_string(), value);
        rest = &after[end..];
    }
    out
}

/// Waits for a `metric` series on `p` whose labels include `key`, and returns its labels.
async fn series_with(p: &ProxyHandle, metric: &str, key: &[(&str, &str)]) -> Labels {
    let deadline = Instant::now() + WAIT;
    loop {
        let all = series(p, metric).await;
        if let Some(found) = all.iter().find(|l| key.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))) {
            return found.clone();
        }
        assert!(Instant::now() < deadline, "no {metric} series with {key:?} in {all:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `source_*` / `destination_*` workload labels of a workload: [workload, app,
/// version, principal, canonical service, canonical revision]; a peer known only by its
/// certificate has the SPIFFE id's namespace.
fn workload(prefix: &str, w: &[&str; 6]) -> Labels {
    let [workload, app, version, principal, canonical_service, canonical_revision] = *w;
    let namespace = match (workload, principal) {
        ("unknown", "unknown") => "unknown",
        _ => "default",
    };
    [
        ("workload", workload),
        ("workload_namespace", namespace),
        ("principal", principal),
        ("app", app),
        ("version", version),
        ("cluster", if workload == "unknown" { "unknown" } else { "Kubernetes" }),
        ("canonical_service", canonical_service),
        ("canonical_revision", canonical_revision),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{prefix}_{k}"), v.to_string()))
    .collect()
}

fn expected(source: &[&str; 6], destination: &[&str; 6], service: [&str; 3], rest: &[(&str, &str)]) -> Labels {
    let mut l = workload("source", source);
    l.extend(workload("destination", destination));
    for (k, v) in [("destination_service", service[0]), ("destination_service_name", service[1])] {
        l.insert(k.into(), v.into());
    }
    l.insert("destination_service_namespace".into(), service[2].into());
    l.extend(rest.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    l
}

fn client(principal: &str) -> [&str; 6] {
    ["productpage-v1", "productpage", "v1", principal, "productpage", "v1"]
}

fn server(principal: &str) -> [&str; 6] {
    ["reviews-v2", "reviews", "v2", principal, "reviews", "v2"]
}

fn unknown(principal: &str) -> [&str; 6] {
    ["unknown", "unknown", "unknown", principal, "unknown", "latest"]
}

fn assert_labels(what: &str, got: &Labels, want: &Labels) {
    let diff: Vec<String> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}: got {:?}, want {v:?}", got.get(k)))
        .chain(got.keys().filter(|k| !want.contains_key(*k)).map(|k| format!("{k}: unexpected label")))
        .collect();
    assert!(diff.is_empty(), "{what}:\n  {}\nall labels: {got:#?}", diff.join("\n  "));
}

/// Sends `payload` through the TCP listener at `addr` and reads the echo back.
async fn tcp_round_trip(addr: SocketAddr, payload: &[u8]) -> Result<Vec<u8>, std::io::Error> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(payload).await?;
    let mut buf = vec![0; payload.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf)).await.map_err(std::io::Error::other)??;
    Ok(buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_reporters_write_istios_standard_labels_for_http_tcp_and_local_replies() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = EchoServer::start("reviews-app").await;
    let db_app = TcpEchoServer::start().await;
    let grpc_app = GrpcEchoServer::start("reviews-grpc").await;
    let db_port = reserve_port();
    // reviews (HTTP and gRPC ports) and db (TCP) select the server workload, ghost none; a fault on
    // /fault; a DENY on /denied (restricted to the HTTP port: on TCP ports Istio drops the
    // HTTP fields of a DENY rule and denies everything); the client's Sidecar binds an
    // egress listener for db.
    let resources = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: 9080, targetPort: {http}}}, {{name: grpc, port: 9090, targetPort: {grpc}}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: default}}\nspec:\n  selector: {{app: reviews}}\n  ports: [{{name: tcp-db, port: {db_port}, targetPort: {tcp}}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n  - match: [{{uri: {{prefix: /fault}}}}]\n    fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}\n    route: [{{destination: {{host: reviews}}}}]\n  - route: [{{destination: {{host: reviews}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: productpage, namespace: default}}\nspec:\n  workloadSelector: {{labels: {{app: productpage}}}}\n  egress:\n  - port: {{number: {db_port}, protocol: TCP, name: tcp-db}}\n    bind: 127.0.0.1\n    hosts: [\"./db.default.svc.cluster.local\"]\n  - hosts: [\"*/*\"]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: ghost, namespace: default}}\nspec:\n  selector: {{app: ghost}}\n  ports: [{{name: http, port: 9080}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-denied, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  action: DENY\n  rules: [{{to: [{{operation: {{ports: [\"{http}\"], paths: [/denied]}}}}]}}]\n",
        http = app.addr.port(),
        tcp = db_app.addr.port(),
        grpc = grpc_app.addr.port(),
    );
    std::fs::write(dir.path().join("mesh.yaml"), resources).unwrap();
    let mut identity = IdentityConfig::new(data.path());
    identity.cert_ttl = Duration::from_secs(3600);
    let cp = mesh::control_plane(Some(dir.path()), identity).await;

    let inbound = reserve_consecutive(3);
    let ports = format!(
        "  ports:\n  - {{name: http, port: {}, protocol: TCP}}\n  - {{name: tcp-db, port: {}, protocol: TCP}}\n  - {{name: grpc, port: {}, protocol: TCP}}\n  inbound: {inbound}\n",
        app.addr.port(),
        db_app.addr.port(),
        grpc_app.addr.port()
    );
    let reviews = sidecar(&cp, "reviews-v2", "reviews", "bookinfo-reviews", &ports).await;
    let productpage = sidecar(&cp, "productpage-v1", "productpage", "bookinfo-productpage", "").await;
    let out = productpage.listener_addr("weft-outbound", WAIT).await.unwrap();

    // HTTP through both sidecars, with a Host header that is not the service FQDN.
    let deadline = Instant::now() + WAIT;
    while !get_via_proxy(out, "http://reviews:9080/ok").await.is_ok_and(|r| r.status == 200) {
        assert!(Instant::now() < deadline, "reviews never answered through both sidecars");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reviews_svc = [REVIEWS, "reviews", "default"];
    let ok =
        [("request_protocol", "http"), ("response_code", "200"), ("grpc_response_status", ""), ("response_flags", "-")];
    let key = [("reporter", "source"), ("response_code", "200")];
    let got = series_with(&productpage, "istio_requests_total", &key).await;
    let mut want = expected(&client(CLIENT_ID), &server(SERVER_ID), reviews_svc, &ok);
    want.extend([("reporter".into(), "source".into()), ("connection_security_policy".into(), "unknown".into())]);
    assert_labels("source reporter, 200", &got, &want);

    let key = [("reporter", "destination"), ("response_code", "200")];
    let got = series_with(&reviews, "istio_requests_total", &key).await;
    let mut want = expected(&client(CLIENT_ID), &server(SERVER_ID), reviews_svc, &ok);
    want.extend([
        ("reporter".into(), "destination".into()),
        ("connection_security_policy".into(), "mutual_tls".into()),
    ]);
    assert_labels("destination reporter, 200", &got, &want);

    // Plaintext straight to the server's inbound port (PERMISSIVE), from no workload:
    // no principal on either side, policy `none`, the service still from the metadata.
    let plain = get_h1(inbound, "localhost", "/plain").await.unwrap();
    assert_eq!(plain.status, 200);
    let key = [("reporter", "destination"), ("connection_security_policy", "none")];
    let got = series_with(&reviews, "istio_requests_total", &key).await;
    let mut want = expected(&unknown("unknown"), &server("unknown"), reviews_svc, &ok);
    want.extend([("reporter".into(), "destination".into()), ("connection_security_policy".into(), "none".into())]);
    assert_labels("destination reporter, plaintext", &got, &want);

    // A fault abort: the client's sidecar answers for the route's service.
    assert_eq!(get_via_proxy(out, "http://reviews:9080/fault").await.unwrap().status, 418);
    let key = [("reporter", "source"), ("response_code", "418")];
    let got = series_with(&productpage, "istio_requests_total", &key).await;
    let fi = [
        ("request_protocol", "http"),
        ("response_code", "418"),
        ("grpc_response_status", ""),
        ("response_flags", "FI"),
    ];
    // No upstream connection, so no mTLS hop: the client's own principal is unknown too.
    let mut want = expected(&client("unknown"), &unknown("unknown"), reviews_svc, &fi);
    want.extend([("reporter".into(), "source".into()), ("connection_security_policy".into(), "unknown".into())]);
    assert_labels("source reporter, fault abort", &got, &want);

    // An authorization denial on the server side: a 403 without a flag (as Envoy's RBAC
    // filter), reported by the server's sidecar for the service the request was for.
    assert_eq!(get_via_proxy(out, "http://reviews:9080/denied").await.unwrap().status, 403);
    let denied =
        [("request_protocol", "http"), ("response_code", "403"), ("grpc_response_status", ""), ("response_flags", "-")];
    let key = [("reporter", "destination"), ("response_code", "403")];
    let got = series_with(&reviews, "istio_requests_total", &key).await;
    let mut want = expected(&client(CLIENT_ID), &server(SERVER_ID), reviews_svc, &denied);
    want.extend([
        ("reporter".into(), "destination".into()),
        ("connection_security_policy".into(), "mutual_tls".into()),
    ]);
    assert_labels("destination reporter, RBAC denial", &got, &want);
    let key = [("reporter", "source"), ("response_code", "403")];
    let got = series_with(&productpage, "istio_requests_total", &key).await;
    let mut want = expected(&client(CLIENT_ID), &server(SERVER_ID), reviews_svc, &denied);
    want.extend([("reporter".into(), "source".into()), ("connection_security_policy".into(), "unknown".into())]);
    assert_labels("source reporter, RBAC denial upstream", &got, &want);

    // No endpoint: the client's sidecar answers 503 UH for the service.
    assert_eq!(get_via_proxy(out, "http://ghost:9080/").await.unwrap().status, 503);
    let key = [("reporter", "source"), ("response_code", "503")];
    let got = series_with(&productpage, "istio_requests_total", &key).await;
    let uh = [
        ("request_protocol", "http"),
        ("response_code", "503"),
        ("grpc_response_status", ""),
        ("response_flags", "UH"),
    ];
    let ghost = ["ghost.default.svc.cluster.local", "ghost", "default"];
    let mut want = expected(&client("unknown"), &unknown("unknown"), ghost, &uh);
    want.extend([("reporter".into(), "source".into()), ("connection_security_policy".into(), "unknown".into())]);
    assert_labels("source reporter, no healthy upstream", &got, &want);

    // No route: a 404 with NR, the destination known only by its Host header (verbatim).
    assert_eq!(get_via_proxy(out, "http://nosuch:9080/").await.unwrap().status, 404);
    let key = [("reporter", "source"), ("response_code", "404")];
    let got = series_with(&productpage, "istio_requests_total", &key).await;
    let nr = [
        ("request_protocol", "http"),
        ("response_code", "404"),
        ("grpc_response_status", ""),
        ("response_flags", "NR"),
    ];
    let mut want = expected(&client("unknown"), &unknown("unknown"), ["nosuch:9080", "nosuch:9080", "unknown"], &nr);
    want.extend([("reporter".into(), "source".into()), ("connection_security_policy".into(), "unknown".into())]);
    assert_labels("source reporter, no route", &got, &want);

    // gRPC: the status from the trailers, or from the headers of a trailers-only answer.
    let reply = grpc_call(out, "reviews:9090", "/echo.Echo/Unary", vec![Bytes::from_static(b"hi")]).await.unwrap();
    assert_eq!(reply.trailers.get("grpc-status").and_then(|v| v.to_str().ok()), Some("0"), "{reply:?}");
    let failed = grpc_call_with_headers(out, "reviews:9090", "/echo.Echo/Fail", &[("x-grpc-status", "7")], vec![])
        .await
        .unwrap();
    assert_eq!(failed.headers.get("grpc-status").and_then(|v| v.to_str().ok()), Some("7"), "{failed:?}");
    for (status, reporter, proxy, policy) in [
        ("0", "source", &productpage, "unknown"),
        ("7", "source", &productpage, "unknown"),
        ("0", "destination", &reviews, "mutual_tls"),
        ("7", "destination", &reviews, "mutual_tls"),
    ] {
        let key = [("reporter", reporter), ("grpc_response_status", status)];
        let got = series_with(proxy, "istio_requests_total", &key).await;
        let grpc = [("request_protocol", "grpc"), ("response_code", "200"), ("response_flags", "-")];
        let mut want = expected(&client(CLIENT_ID), &server(SERVER_ID), reviews_svc, &grpc);
        want.extend([
            ("reporter".into(), reporter.into()),
            ("grpc_response_status".into(), status.into()),
            ("connection_security_policy".into(), policy.into()),
        ]);
        assert_labels(&format!("{reporter} reporter, grpc-status {status}"), &got, &want);
    }

    // TCP through both sidecars (the Sidecar's egress listener on the client side).
    let egress = productpage.listener_addr(&format!("127.0.0.1_{db_port}"), WAIT).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while tcp_round_trip(egress, b"ping").await.ok().as_deref() != Some(b"ping".as_slice()) {
        assert!(Instant::now() < deadline, "db never echoed through both sidecars");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let db_svc = [DB, "db", "default"];
    // Istio's TCP metadata exchange (ALPN istio-peer-exchange) names the peer's workload
    // on both sides; the principals are what the certificates proved.
    let key = [("reporter", "source"), ("destination_service", DB)];
    let got = series_with(&productpage, "istio_tcp_connections_opened_total", &key).await;
    let mut want = expected(&client(CLIENT_ID), &server(SERVER_ID), db_svc, &[("request_protocol", "tcp")]);
    want.extend([
        ("reporter".into(), "source".into()),
        ("response_flags".into(), "-".into()),
        ("connection_security_policy".into(), "unknown".into()),
    ]);
    assert_labels("source reporter, tcp opened", &got, &want);
    let key = [("reporter", "destination"), ("destination_service", DB)];
    let got = series_with(&reviews, "istio_tcp_connections_closed_total", &key).await;
    let mut want = expected(&client(CLIENT_ID), &server(SERVER_ID), db_svc, &[("request_protocol", "tcp")]);
    want.extend([
        ("reporter".into(), "destination".into()),
        ("response_flags".into(), "-".into()),
        ("connection_security_policy".into(), "mutual_tls".into()),
    ]);
    assert_labels("destination reporter, tcp closed", &got, &want);
    // The app is gone: the server's sidecar cannot connect (UF). The connection is still
    // counted as opened (at its close), with the same labels as its close.
    drop(db_app);
    let _ = tcp_round_trip(egress, b"ping").await;
    let key = [("reporter", "destination"), ("destination_service", DB), ("response_flags", "UF")];
    let closed = series_with(&reviews, "istio_tcp_connections_closed_total", &key).await;
    let opened = series_with(&reviews, "istio_tcp_connections_opened_total", &key).await;
    assert_labels("destination reporter, tcp upstream refused: opened like closed", &opened, &closed);

    // Never an address split into name and namespace.
    for p in [&productpage, &reviews] {
        for l in series(p, "istio_tcp_sent_bytes_total").await {
            assert!(!l["destination_service_name"].chars().all(|c| c.is_ascii_digit()), "{l:#?}");
        }
    }
}
