//! `weft slo rules`: the ServiceLevelObjectives as Prometheus recording and alerting
//! rules; and the SLO flags of `weft control` (docs/slo.md).

use std::path::PathBuf;

use anyhow::{bail, Context as _};

/// `weft control`'s SLO flags.
#[derive(clap::Args)]
pub struct SloArgs {
    /// POST every SLO alert's firing and resolved notifications as JSON to this
    /// http:// URL (beside an SLO's own `spec.alert.webhook`).
    #[arg(long, env = "WEFT_ALERT_WEBHOOK")]
    alert_webhook: Option<String>,
    /// How often SLOs are evaluated.
    #[arg(long, env = "WEFT_SLO_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    slo_interval: std::time::Duration,
}

/// `weft slo ...`.
#[derive(clap::Subcommand)]
pub enum SloCommand {
    /// Write Prometheus recording and alerting rules equivalent to the SLOs (over
    /// istio_requests_total and istio_request_duration_milliseconds_bucket,
    /// reporter="destination"), for `rule_files` of your own Prometheus.
    Rules {
        /// Files or directories with ServiceLevelObjectives (and the DestinationRules
        /// their subsets name); without: the running control plane's.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// Mesh DNS domain short service names resolve in.
        #[arg(long, default_value = "cluster.local")]
        domain: String,
        /// The control plane's API (default: the running `weft up`, else 127.0.0.1:15014).
        #[arg(long, env = "WEFT_SERVER")]
        server: Option<String>,
    },
}

impl SloArgs {
    /// The control plane's SLO settings.
    pub fn config(&self) -> anyhow::Result<weft_control::slo::SloConfig> {
        if let Some(url) = &self.alert_webhook {
            weft_api::spec::slo::check_webhook(url).map_err(|e| anyhow::anyhow!("--alert-webhook: {e}"))?;
        }
        if self.slo_interval.is_zero() {
            bail!("--slo-interval must be longer than 0s");
        }
        Ok(weft_control::slo::SloConfig {
            interval: self.slo_interval,
            webhook: self.alert_webhook.clone(),
            stats: None,
        })
    }
}

/// Runs `weft slo ...`.
pub async fn run(cmd: SloCommand) -> anyhow::Result<()> {
    match cmd {
        SloCommand::Rules { files, domain, server } => {
            let text = if files.is_empty() {
                let (status, v) =
                    crate::ops::call(&crate::local::server(server), "GET", "/api/v1/slos/rules", None).await?;
                if status != 200 {
                    bail!("{}", v["error"].as_str().unwrap_or("the control plane refused"));
                }
                v["rules"].as_str().context("the control plane sent no rules")?.to_string()
            } else {
                let mut parsed = weft_api::Parsed::default();
                for (path, text) in crate::ops::files_text(&files)? {
                    parsed.extend(weft_api::parse_str(&text, &path));
                }
                if !parsed.errors.is_empty() {
                    for e in &parsed.errors {
                        eprintln!("error: {e}");
                    }
                    bail!("fix the errors above first");
                }
                if !parsed.resources.iter().any(|r| r.kind == weft_api::Kind::ServiceLevelObjective) {
                    bail!("no ServiceLevelObjective in the given files");
                }
                weft_control::slo::rules::rules_yaml(&parsed.resources, &domain).map_err(|e| anyhow::anyhow!(e))?
            };
            print!("{text}");
            Ok(())
        }
    }
}
