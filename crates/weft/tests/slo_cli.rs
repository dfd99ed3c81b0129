//! `weft slo rules` and the SLO flags of `weft control`, as an operator runs them: the
//! rules for files or for the running control plane pass `promtool check rules`; a bad
//! SLO or webhook is a precise error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

fn promtool_check(rules: &[u8]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
    let out = Command::new(weft_testkit::tools::require("promtool"))
        .args(["check", "rules", "rules.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn slo_rules_from_files_pass_promtool_and_bad_slos_are_refused_with_their_line() {
    let samples = weft_testkit::conformance_dir();
    let out = Command::new(WEFT)
        .args(["slo", "rules", "-f"])
        .arg(samples.join("slo/bookinfo-slos.yaml"))
        .arg("-f")
        .arg(samples.join("bookinfo/networking/destination-rule-all.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let (ok, report) = promtool_check(&out.stdout);
    assert!(ok && report.contains("20 rules found"), "{report}\n{}", String::from_utf8_lossy(&out.stdout));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: weft.dev/v1alpha1\nkind: ServiceLevelObjective\nmetadata: {name: x}\nspec:\n  service: ratings\n  sli: {successRate: {}}\n  target: 99.9\n  window: 28days\n",
    )
    .unwrap();
    let out = Command::new(WEFT).args(["slo", "rules", "-f"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("{}:8", bad.display())) && text(&out).contains("spec.window"),
        "{}",
        text(&out)
    );

    // A subset no DestinationRule defines: refused, not widened to the whole service.
    let out =
        Command::new(WEFT).args(["slo", "rules", "-f"]).arg(samples.join("slo/bookinfo-slos.yaml")).output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("reviews-v3-latency") && text(&out).contains("subset"), "{}", text(&out));
}

#[test]
fn an_https_alert_webhook_stops_weft_control_with_a_precise_error() {
    let out = Command::new(WEFT)
        .args([
            "control",
            "--api",
            "127.0.0.1:0",
            "--xds",
            "127.0.0.1:0",
            "--alert-webhook",
            "https://alerts.example/x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("--alert-webhook") && text(&out).contains("https"), "{}", text(&out));
}

#[test]
fn slo_rules_without_files_come_from_the_running_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(weft_testkit::conformance_dir().join("slo/bookinfo-slos.yaml"), dir.path().join("slos.yaml"))
        .unwrap();
    std::fs::copy(
        weft_testkit::conformance_dir().join("bookinfo/networking/destination-rule-all.yaml"),
        dir.path().join("dr.yaml"),
    )
    .unwrap();
    let api = weft_testkit::net::reserve_addr();
    let xds = weft_testkit::net::reserve_addr();
    let mut control = Command::new(WEFT)
        .args(["control", "--insecure-dev", "--dir"])
        .arg(dir.path())
        .args(["--api", &api.to_string(), "--xds", &xds.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let out = Command::new(WEFT).args(["slo", "rules", "--server", &api.to_string()]).output().unwrap();
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = control.kill();
    let _ = control.wait();
    assert!(out.status.success(), "{}", text(&out));
    let (ok, report) = promtool_check(&out.stdout);
    assert!(ok && report.contains("20 rules found"), "{report}");
    assert!(Path::new(WEFT).exists());
}
