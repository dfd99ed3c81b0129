//! `weft slo rules`: the Prometheus rules written for the sample SLOs pass `promtool
//! check rules`, and `promtool test rules` (tests/data/slo-promtool-test.yaml) proves their
//! burn-rate alerts fire and resolve as the SRE workbook intends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use weft_control::slo::rules::rules_yaml;

fn sample_rules() -> String {
    let dir = weft_testkit::conformance_dir();
    let mut parsed = weft_api::Parsed::default();
    for f in ["slo/bookinfo-slos.yaml", "bookinfo/networking/destination-rule-all.yaml"] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        parsed.extend(weft_api::parse_str(&text, Path::new(f)));
    }
    assert!(parsed.errors.is_empty(), "{:#?}", parsed.errors);
    rules_yaml(&parsed.resources, "cluster.local").unwrap()
}

fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(weft_testkit::tools::require("promtool")).args(args).current_dir(dir).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn the_rules_for_the_sample_slos_pass_promtool_check_rules() {
    let rules = sample_rules();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), &rules).unwrap();
    let (ok, out) = promtool(&["check", "rules", "rules.yaml"], dir.path());
    assert!(ok, "{out}\n{rules}");
    // One group per SLO: 6 ratio records (5 burn windows + the SLO window), the budget
    // record and 3 alerts.
    assert!(out.contains("SUCCESS: 20 rules found"), "{out}");
    assert!(rules.contains("destination_version=\"v3\""), "the subset becomes its version label:\n{rules}");
}

#[test]
fn promtool_test_rules_proves_the_burn_rate_alerts_fire_and_resolve() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), sample_rules()).unwrap();
    let test = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/slo-promtool-test.yaml"))
        .unwrap();
    std::fs::write(dir.path().join("test.yaml"), test).unwrap();
    let (ok, out) = promtool(&["test", "rules", "test.yaml"], dir.path());
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}
