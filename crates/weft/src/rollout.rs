//! `weft rollout status|promote|pause|resume|abort NAME`: the control plane's rollouts
//! (`/api/v1/rollouts`) and staged changes, with the events that say why each moved.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::{local, ops};

/// Subcommands of `weft rollout`.
#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Phase, step, traffic, last measurement and events of one rollout (without NAME:
    /// every rollout and staged change).
    Status {
        /// The Rollout's name.
        name: Option<String>,
        /// Output format: text or json.
        #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
        #[command(flatten)]
        target: Target,
    },
    /// Next step now (with --full: all traffic to the canary now, the rollout done).
    Promote {
        /// The Rollout's name.
        name: String,
        /// Skip every remaining step.
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Hold the rollout at its step: the routing stays, no analysis.
    Pause {
        /// The Rollout's name.
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Continue a paused rollout (a finished one starts again at step 1).
    Resume {
        /// The Rollout's name.
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Stop the rollout: all traffic back to the stable subset.
    Abort {
        /// The Rollout's name.
        name: String,
        #[command(flatten)]
        target: Target,
    },
}

/// Which rollout's control plane.
#[derive(Args)]
pub struct Target {
    /// Namespace of the Rollout.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// The control plane's API (default: the running `weft up`, else 127.0.0.1:15014).
    #[arg(long, env = "WEFT_SERVER")]
    server: Option<String>,
}

/// Runs a `weft rollout` subcommand.
pub async fn run(cmd: RolloutCommand) -> anyhow::Result<()> {
    let (action, name, target, full) = match cmd {
        RolloutCommand::Status { name, output, target } => return status(name, &output, target).await,
        RolloutCommand::Promote { name, full, target } => ("promote", name, target, full),
        RolloutCommand::Pause { name, target } => ("pause", name, target, false),
        RolloutCommand::Resume { name, target } => ("resume", name, target, false),
        RolloutCommand::Abort { name, target } => ("abort", name, target, false),
    };
    let server = local::server(target.server);
    let path = format!(
        "/api/v1/rollouts/{}/{}/{action}{}",
        ops::urlencode(&target.namespace),
        ops::urlencode(&name),
        if full { "?full=true" } else { "" }
    );
    let (code, v) = ops::call(&server, "POST", &path, None).await?;
    if code != 200 {
        bail!("{}", v["error"].as_str().unwrap_or("the control plane refused"));
    }
    println!("rollout {}/{name}: {}", target.namespace, v["phase"].as_str().unwrap_or("?"));
    if let Some(e) = v["event"].as_object() {
        println!("  {}: {}", e["reason"].as_str().unwrap_or_default(), e["message"].as_str().unwrap_or_default());
    }
    Ok(())
}

async fn status(name: Option<String>, output: &str, target: Target) -> anyhow::Result<()> {
    let server = local::server(target.server);
    let path = match &name {
        Some(n) => format!("/api/v1/rollouts/{}/{}", ops::urlencode(&target.namespace), ops::urlencode(n)),
        None => "/api/v1/rollouts".to_string(),
    };
    let (code, v) = ops::call(&server, "GET", &path, None).await?;
    if code != 200 {
        bail!("{}", v["error"].as_str().unwrap_or("the control plane refused"));
    }
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match name {
        Some(_) => print_rollout(&v),
        None => {
            let rollouts = v["rollouts"].as_array().cloned().unwrap_or_default();
            let staged = v["staged"].as_array().cloned().unwrap_or_default();
            if rollouts.is_empty() && staged.is_empty() {
                println!("no rollouts and no staged changes");
            }
            for r in &rollouts {
                print_rollout(r);
            }
            for s in &staged {
                print_staged(s);
            }
        }
    }
    Ok(())
}

fn print_rollout(r: &Value) {
    let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
    println!("Rollout {}/{}  host {}  {} -> {}", s("namespace"), s("name"), s("host"), s("stable"), s("canary"));
    println!("  phase:    {}", s("phase"));
    if r["step"].is_number() {
        println!("  step:     {}/{}: {}", r["step"], r["steps"], s("traffic"));
        println!("  failures: {}/{} (interval {})", r["failures"], r["failureThreshold"], s("interval"));
    }
    if let Some(c) = r["conflict"].as_str() {
        println!("  waiting:  {c}");
    }
    if let Some(l) = r["last"].as_object() {
        println!("  last:     {} ({})", l["verdict"].as_str().unwrap_or("-"), l["summary"].as_str().unwrap_or("-"));
    }
    print_events(&r["events"]);
}

fn print_staged(s: &Value) {
    let names = |k: &str| -> String {
        s[k].as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| Some(format!("{}.{}", w.get(1)?.as_str()?, w.get(0)?.as_str()?)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("Staged {}  phase {}", s["name"].as_str().unwrap_or("-"), s["phase"].as_str().unwrap_or("-"));
    let resources: Vec<&str> = s["resources"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    println!("  resources: {}", resources.join(", "));
    println!("  canary:    {}", names("canary"));
    println!("  others:    {}", names("rest"));
    if let Some(l) = s["last"].as_str() {
        println!("  last:      {l}");
    }
    print_events(&s["events"]);
}

fn print_events(events: &Value) {
    let Some(list) = events.as_array().filter(|l| !l.is_empty()) else { return };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    println!("  events:");
    for e in list {
        let ago = now.saturating_sub(e["at_ms"].as_u64().unwrap_or(now)) / 1000;
        println!(
            "    {:>5}s ago  {:<14} {}",
            ago,
            e["reason"].as_str().unwrap_or_default(),
            e["message"].as_str().unwrap_or_default()
        );
    }
}
