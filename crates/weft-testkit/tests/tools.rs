//! Tool lookup and the promtool wrapper.

use weft_testkit::tools;

#[test]
fn require_finds_installed_tools() {
    for name in ["curl", "h2load", "promtool"] {
        let path = tools::require(name);
        assert!(path.is_file(), "{name}: {}", path.display());
    }
}

#[test]
#[should_panic(expected = "no-such-tool-xyz not found: run scripts/setup.sh")]
fn require_panics_with_the_setup_hint_when_missing() {
    tools::require("no-such-tool-xyz");
}

#[tokio::test]
async fn promtool_accepts_valid_metrics() {
    let text = "# HELP istio_requests_total Requests.\n\
                # TYPE istio_requests_total counter\n\
                istio_requests_total{response_code=\"200\"} 3\n";
    tools::promtool_check_metrics(text).await.unwrap();
}

#[tokio::test]
async fn promtool_rejects_malformed_metrics() {
    let err = tools::promtool_check_metrics("# TYPE x counter\nx{ 1\n").await.unwrap_err();
    assert!(err.to_string().contains("promtool check metrics failed"), "{err:#}");
}
