//! `weft proxy-config PROXY secrets` against a running `weft control` with a CA: for a
//! weft proxy and for a stock Envoy (both with mesh identities), the certificate each
//! actually serves (`default`: serial, validity, SPIFFE id) and the `ROOTCA` it trusts,
//! read from the proxy's own config dump, never with a private key.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, BufReader};
use weft_identity::cert::{certs_from_pem, CertInfo};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::envoy::Envoy;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
/// The control plane's admin token (`--api-token-file`), which the CLI sends (`WEFT_TOKEN`).
const ADMIN_TOKEN: &str = "weft-admin.proxy-config-secrets-test";

const COLUMNS: [&str; 8] =
    ["RESOURCE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE", "SPIFFE ID"];

async fn weft(args: &[&str]) -> (i32, String, String) {
    let o = tokio::process::Command::new(WEFT).args(args).env("WEFT_TOKEN", ADMIN_TOKEN).output().await.unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Starts `weft control` with a CA in `data`; returns it with its xDS and API addresses.
async fn start_control(data: &Path) -> (tokio::process::Child, SocketAddr, String) {
    // The admin token where the control plane keeps it, known to the CLI (WEFT_TOKEN).
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(data.join("admin-token"), ADMIN_TOKEN).unwrap();
    let mut control = tokio::process::Command::new(WEFT)
        .arg("control")
        .arg("--data-dir")
        .arg(data)
        .args(["--xds", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(control.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap().unwrap();
    let xds: SocketAddr = line.split("xDS on ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    let api = line.split("API on ").nth(1).unwrap().trim().to_string();
    (control, xds, api)
}

async fn token(api: &str, sa: &str) -> String {
    let (code, out, err) =
        weft(&["token", "create", "--namespace", "default", "--service-account", sa, "--server", api, "-o", "json"])
            .await;
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["token"].as_str().unwrap().to_string()
}

/// The table's rows as column -> cell maps (cells are separated by two spaces or more).
fn rows(table: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(header, COLUMNS, "Istio's columns plus the SPIFFE id:\n{table}");
    lines
        .map(|l| {
            let cells = l.split("  ").map(str::trim).filter(|c| !c.is_empty());
            header.iter().map(|h| h.to_string()).zip(cells.map(str::to_string)).collect()
        })
        .collect()
}

/// Polls `weft proxy-config PROXY secrets` until both secrets are ACTIVE.
async fn active_secrets(api: &str, proxy: &str, admin: Option<String>) -> String {
    let mut args = vec!["proxy-config", proxy, "secrets", "--server", api];
    if let Some(a) = &admin {
        args.extend(["--admin", a.as_str()]);
    }
    let mut last = String::new();
    for _ in 0..100 {
        let (code, out, err) = weft(&args).await;
        if code == 0 && out.lines().filter(|l| l.contains(" ACTIVE ")).count() == 2 {
            return out;
        }
        last = format!("exit {code}\n{out}{err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("secrets of {proxy} never both ACTIVE:\n{last}");
}

/// Checks the `default` and `ROOTCA` rows: the workload certificate for `sa`, valid now,
/// and the CA's root.
fn check(table: &str, sa: &str, root: &CertInfo) -> String {
    let rows = rows(table);
    let default = rows.iter().find(|r| r["RESOURCE NAME"] == "default").unwrap_or_else(|| panic!("{table}"));
    assert_eq!(default["TYPE"], "Cert Chain", "{table}");
    assert_eq!(default["STATUS"], "ACTIVE", "{table}");
    assert_eq!(default["VALID CERT"], "true", "{table}");
    assert_eq!(default["SPIFFE ID"], format!("spiffe://cluster.local/ns/default/sa/{sa}"), "{table}");
    let not_after: SystemTime = humantime::parse_rfc3339(&default["NOT AFTER"]).unwrap();
    let not_before: SystemTime = humantime::parse_rfc3339(&default["NOT BEFORE"]).unwrap();
    assert!(not_before <= SystemTime::now() && SystemTime::now() < not_after, "{table}");
    assert!(default["SERIAL NUMBER"].chars().all(|c| c.is_ascii_hexdigit()), "{table}");
    let rootca = rows.iter().find(|r| r["RESOURCE NAME"] == "ROOTCA").unwrap_or_else(|| panic!("{table}"));
    assert_eq!(rootca["TYPE"], "CA", "{table}");
    assert_eq!(rootca["VALID CERT"], "true", "{table}");
    assert_eq!(rootca["SERIAL NUMBER"], root.serial.to_ascii_lowercase().trim_start_matches('0'), "{table}");
    default["SERIAL NUMBER"].clone()
}

/// The filters of the Envoy listener that terminates mTLS with SDS secrets.
const MTLS_FILTERS: &str = r#"      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: mtls
          cluster: weft_ads"#;

#[tokio::test]
async fn secrets_show_the_served_certificate_of_a_weft_proxy_and_of_envoy() {
    let data = tempfile::tempdir().unwrap();
    let (_control, xds, api) = start_control(data.path()).await;
    let root_pem = std::fs::read_to_string(data.path().join("root-cert.pem")).unwrap();
    let root = CertInfo::parse(&certs_from_pem(&root_pem, "root").unwrap()[0]).unwrap();

    // A weft proxy with a mesh identity: its certificate comes from a CSR, not from SDS,
    // so only the proxy itself can show it.
    let web = token(&api, "web").await;
    let text = format!(
        "node:\n  id: web.default\n  name: web\n  namespace: default\n  service_account: web\nxds:\n  address: http://{xds}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\nidentity:\n  token: \"{web}\"\n"
    );
    let proxy = ProxyHandle::start(Bootstrap::parse(&text, Path::new("bootstrap.yaml")).unwrap()).await.unwrap();
    assert!(proxy.wait_ready(Duration::from_secs(20)).await, "the weft proxy never became ready");
    let table = active_secrets(&api, "web", None).await;
    let serial = check(&table, "web", &root);
    // The serial is the one of the certificate the proxy presents.
    let dump: serde_json::Value =
        weft_testkit::http::get_h1(proxy.admin_addr(), "admin", "/config_dump").await.unwrap().json().unwrap();
    assert!(!dump.to_string().contains("PRIVATE KEY"), "the config dump must not carry the key");
    let (code, json, err) = weft(&["proxy-config", "web", "secrets", "-o", "json", "--server", &api]).await;
    assert_eq!(code, 0, "{err}");
    assert!(!json.contains("PRIVATE KEY") && !json.contains("private_key"), "{json}");
    let listed: serde_json::Value = serde_json::from_str(&json).unwrap();
    let chain = listed.as_array().unwrap().iter().find(|s| s["name"] == "default").unwrap()["secret"]
        ["tls_certificate"]["certificate_chain"]["inline_bytes"]
        .as_str()
        .unwrap()
        .to_string();
    use base64::Engine as _;
    let pem = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(chain).unwrap()).unwrap();
    let leaf = CertInfo::parse(&certs_from_pem(&pem, "chain").unwrap()[0]).unwrap();
    assert_eq!(leaf.serial.to_ascii_lowercase().trim_start_matches('0'), serial);

    // A stock Envoy with a join token: the control plane makes its key and serves both
    // secrets over SDS; the table reads Envoy's own config dump.
    let gw = token(&api, "gateway").await;
    let envoy = Envoy::start(&weft_testkit::envoy::sds_mtls_bootstrap(xds, &gw, MTLS_FILTERS)).await.unwrap();
    let table = active_secrets(&api, "envoy-gw", Some(envoy.admin().to_string())).await;
    check(&table, "gateway", &root);
    let (code, json, _) = weft(&[
        "proxy-config",
        "envoy-gw",
        "secrets",
        "-o",
        "json",
        "--server",
        &api,
        "--admin",
        &envoy.admin().to_string(),
    ])
    .await;
    assert_eq!(code, 0);
    assert!(!json.contains("PRIVATE KEY") && !json.contains("private_key"), "{json}");

    // Without an announced admin address the error says what to do.
    let (code, _, err) = weft(&["proxy-config", "envoy-gw", "secrets", "--server", &api]).await;
    assert_ne!(code, 0);
    assert!(err.contains("--admin"), "{err}");
}
