//! `weft inject` on real-world manifests (Istio's Bookinfo, Kubernetes' guestbook and
//! documentation examples, kube-prometheus' node-exporter, a `kind: List`), compared with
//! golden files: `tests/inject/<case>.in.yaml` -> `<case>.out.yaml`, extra flags in
//! `<case>.args` (the image is pinned to `ghcr.io/weft-mesh/weft:golden` so goldens do not
//! change with the crate version). `WEFT_UPDATE_GOLDEN=1 cargo test -p weft --test inject` rewrites the
//! goldens; otherwise a mismatch fails with a diff. Also: idempotence, stdin, several
//! files, errors, and a proxy started from the `WEFT_BOOTSTRAP_YAML` the injection sets.

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use weft_xds::{AdsServer, StaticSource};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject")
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(WEFT)
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn inject_ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = run(args, stdin);
    assert!(out.status.success(), "weft inject {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The first differing lines of two texts, with a little context.
fn diff(want: &str, got: &str) -> String {
    let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    let first = w.iter().zip(&g).position(|(a, b)| a != b).unwrap_or(w.len().min(g.len()));
    let from = first.saturating_sub(3);
    let mut out = format!("first difference at line {}:\n", first + 1);
    for l in w.iter().skip(from).take(10) {
        out.push_str(&format!("-{l}\n"));
    }
    for l in g.iter().skip(from).take(10) {
        out.push_str(&format!("+{l}\n"));
    }
    out
}

fn cases() -> Vec<(String, PathBuf)> {
    let mut cases: Vec<(String, PathBuf)> = std::fs::read_dir(cases_dir())
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name()?.to_str()?.strip_suffix(".in.yaml")?.to_string();
            Some((name, p))
        })
        .collect();
    cases.sort();
    cases
}

fn case_args(name: &str) -> Vec<String> {
    let mut args = vec!["--image".to_string(), "ghcr.io/weft-mesh/weft:golden".to_string()];
    if let Ok(s) = std::fs::read_to_string(cases_dir().join(format!("{name}.args"))) {
        args.extend(s.split_whitespace().map(str::to_string));
    }
    args
}

#[test]
fn real_world_manifests_match_their_golden_files_and_reinjecting_changes_nothing() {
    let update = std::env::var_os("WEFT_UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    let cases = cases();
    assert!(cases.len() >= 9, "cases: {cases:?}");
    for (name, input) in &cases {
        let extra = case_args(name);
        let mut args: Vec<&str> = vec!["-f", input.to_str().unwrap()];
        args.extend(extra.iter().map(String::as_str));
        let got = inject_ok(&args, None);
        let golden = cases_dir().join(format!("{name}.out.yaml"));
        if update {
            std::fs::write(&golden, &got).unwrap();
        } else {
            let want = std::fs::read_to_string(&golden)
                .unwrap_or_else(|_| panic!("{} missing: run with WEFT_UPDATE_GOLDEN=1", golden.display()));
            if want != got {
                failures.push(format!("{name}: output differs from {}\n{}", golden.display(), diff(&want, &got)));
            }
        }
        // Idempotent: injecting the output again gives it back byte for byte.
        let again = inject_ok(&extra.iter().map(String::as_str).collect::<Vec<_>>(), Some(&got));
        if again != got {
            failures.push(format!("{name}: not idempotent\n{}", diff(&got, &again)));
        }
        // Every document of the output is valid YAML.
        for d in serde_yaml_ng::Deserializer::from_str(&got) {
            if let Err(e) = yaml_value(d) {
                failures.push(format!("{name}: output is not valid YAML: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn yaml_value(d: serde_yaml_ng::Deserializer<'_>) -> Result<serde_yaml_ng::Value, serde_yaml_ng::Error> {
    serde::Deserialize::deserialize(d)
}

/// The documents of a YAML stream as JSON values (empty documents dropped).
fn docs(text: &str) -> Vec<serde_json::Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| yaml_value(d).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).unwrap())
        .collect()
}

fn containers(pod_spec: &serde_json::Value, key: &str) -> Vec<String> {
    pod_spec[key]
        .as_array()
        .map(|l| l.iter().map(|c| c["name"].as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn bookinfo_deployments_get_the_sidecar_and_everything_else_is_kept() {
    let input = std::fs::read_to_string(cases_dir().join("bookinfo.in.yaml")).unwrap();
    let out = inject_ok(&["-f", cases_dir().join("bookinfo.in.yaml").to_str().unwrap()], None);
    let (before, after) = (docs(&input), docs(&out));
    assert_eq!(before.len(), after.len());
    let mut deployments = 0;
    for (b, a) in before.iter().zip(&after) {
        if b["kind"] != "Deployment" {
            assert_eq!(a, b, "non-workloads are unchanged");
            continue;
        }
        deployments += 1;
        let spec = &a["spec"]["template"]["spec"];
        assert_eq!(containers(spec, "initContainers"), ["weft-init"]);
        let app = containers(&b["spec"]["template"]["spec"], "containers");
        assert_eq!(containers(spec, "containers"), [vec!["weft-proxy".to_string()], app.clone()].concat());
        assert_eq!(a["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"], app[0]);
        // Everything but the pod template is untouched.
        let mut a2 = a.clone();
        let mut b2 = b.clone();
        a2["spec"]["template"] = serde_json::Value::Null;
        b2["spec"]["template"] = serde_json::Value::Null;
        assert_eq!(a2, b2);
        // The app containers are unchanged.
        assert_eq!(
            spec["containers"].as_array().unwrap()[1..],
            b["spec"]["template"]["spec"]["containers"].as_array().unwrap()[..]
        );
    }
    assert_eq!(deployments, 6, "details, ratings, reviews v1-v3, productpage");
}

#[test]
fn stdin_and_dash_read_the_manifest_and_several_files_are_joined() {
    let path = cases_dir().join("guestbook.in.yaml");
    let from_file = inject_ok(&["-f", path.to_str().unwrap()], None);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(inject_ok(&[], Some(&text)), from_file);
    assert_eq!(inject_ok(&["-f", "-"], Some(&text)), from_file);

    let cron = cases_dir().join("cronjob.in.yaml");
    let both = inject_ok(&["-f", path.to_str().unwrap(), "-f", cron.to_str().unwrap()], None);
    let cron_out = inject_ok(&["-f", cron.to_str().unwrap()], None);
    assert_eq!(both, format!("{from_file}---\n{cron_out}"));

    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.yaml");
    let out = run(&["-f", path.to_str().unwrap(), "-o", out_path.to_str().unwrap()], None);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&out_path).unwrap(), from_file);
}

#[test]
fn flags_set_the_image_control_plane_and_proxy_uid() {
    let path = cases_dir().join("opt-out-pod.in.yaml");
    let text = std::fs::read_to_string(path).unwrap().replace("sidecar.istio.io/inject: \"false\"", "team: a");
    let out = inject_ok(
        &["--image", "registry.example/weft:dev", "--control-plane", "cp.mesh:15010", "--proxy-uid", "2000"],
        Some(&text),
    );
    let pod = &docs(&out)[0];
    let init = &pod["spec"]["initContainers"][0];
    assert_eq!(init["image"], "registry.example/weft:dev");
    assert_eq!(init["args"][1], "--proxy-uid=2000");
    let proxy = &pod["spec"]["containers"][0];
    assert_eq!(proxy["securityContext"]["runAsUser"], 2000);
    let bootstrap = proxy["env"][4]["value"].as_str().unwrap();
    assert!(bootstrap.contains("address: \"http://cp.mesh:15010\""), "{bootstrap}");
}

#[test]
fn skipped_workloads_are_reported_on_stderr_and_errors_name_file_line_and_document() {
    let path = cases_dir().join("node-exporter-hostnetwork.in.yaml");
    let out = run(&["-f", path.to_str().unwrap()], None);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("document 1 (DaemonSet \"node-exporter\"): hostNetwork pods are not injected"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\n    replicas: 1\n").unwrap();
    let out = run(&["-f", bad.to_str().unwrap()], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:9:", bad.display())) && err.contains("invalid YAML"), "{err}");

    std::fs::write(&bad, "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\nspec:\n  replicas: 1\n").unwrap();
    let out = run(&["-f", bad.to_str().unwrap()], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:5: document 2 (Deployment \"x\"): spec.template is missing", bad.display())),
        "{err}"
    );
}

#[tokio::test]
async fn the_proxy_reads_its_bootstrap_from_weft_bootstrap_yaml() {
    let out = tokio::process::Command::new(WEFT)
        .arg("proxy")
        .env("WEFT_BOOTSTRAP_YAML", "node:\n  id: a\nxds:\n  address: http://127.0.0.1:1\n  mode: turbo\n")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("$WEFT_BOOTSTRAP_YAML:5: field `xds.mode`"), "{err}");

    let server = AdsServer::new(Arc::new(StaticSource::new()));
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds = sock.local_addr().unwrap();
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(sock, std::future::pending()).await });
    let text = format!(
        "node:\n  id: sidecar~10.0.0.7~web-1.shop~shop.svc.cluster.local\n  name: web-1\n  namespace: shop\nxds:\n  address: http://{xds}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\n"
    );
    let _child = tokio::process::Command::new(WEFT)
        .arg("proxy")
        .env("WEFT_BOOTSTRAP_YAML", text)
        .env_remove("WEFT_BOOTSTRAP")
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut seen = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if server.connections().iter().any(|c| c.node_id == "sidecar~10.0.0.7~web-1.shop~shop.svc.cluster.local") {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "the proxy never connected with the node from WEFT_BOOTSTRAP_YAML");
}
