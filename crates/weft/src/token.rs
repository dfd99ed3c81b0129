//! `weft token create|revoke`: join tokens, through the running control plane's API
//! (`--server`, the default) or directly on its data directory (`--data-dir`, when the
//! control plane is not running; a running one picks up revocations written there).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use serde_json::json;
use weft_identity::TokenIssuer;

use crate::ops;

/// Subcommands of `weft token`.
#[derive(Subcommand)]
pub enum TokenCommand {
    /// Issue a join token granting one namespace and service account. Prints the token
    /// on stdout (its id and expiry on stderr).
    Create {
        /// Namespace granted.
        #[arg(long, short = 'n')]
        namespace: String,
        /// Service account granted.
        #[arg(long)]
        service_account: String,
        /// Validity, e.g. `24h`, `30m`, `7d`.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Output: the token alone, or json (id, token, identity, expiresAt).
        #[arg(short = 'o', long, default_value = "token", value_parser = ["token", "json"])]
        output: String,
        #[command(flatten)]
        target: Target,
    },
    /// Revoke a token by id: certificate requests with it are refused from now on
    /// (certificates already issued stay valid until they expire).
    Revoke {
        /// Token id (printed by `weft token create`).
        id: String,
        #[command(flatten)]
        target: Target,
    },
}

/// Where tokens are managed.
#[derive(clap::Args)]
pub struct Target {
    /// The control plane's API (default: the running `weft up`, else 127.0.0.1:15014).
    #[arg(long, env = "WEFT_SERVER", conflicts_with = "data_dir")]
    server: Option<String>,
    /// Work on the control plane's data directory instead of its API.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Runs a `weft token` subcommand.
pub async fn run(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create { namespace, service_account, ttl, output, target } => {
            let v = match &target.data_dir {
                Some(dir) => {
                    let issuer = TokenIssuer::load_or_create(dir)?;
                    let t = issuer.create(&namespace, &service_account, ttl)?;
                    let expires = t.expires.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                    json!({"id": t.id, "token": t.token, "namespace": namespace, "serviceAccount": service_account,
                           "expiresAt": expires})
                }
                None => {
                    let body = json!({"namespace": namespace, "serviceAccount": service_account,
                                      "ttlSeconds": ttl.as_secs().max(1)});
                    let (status, v) = ops::call(
                        &crate::local::server(target.server.clone()),
                        "POST",
                        "/api/v1/tokens",
                        Some(body.to_string()),
                    )
                    .await?;
                    if status != 200 {
                        bail!("{}", v["error"].as_str().unwrap_or("the control plane refused the token"));
                    }
                    v
                }
            };
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let token = v["token"].as_str().context("the answer has no token")?;
                eprintln!(
                    "token {} for namespace {namespace}, service account {service_account}; expires in {}",
                    v["id"].as_str().unwrap_or("?"),
                    humantime::format_duration(ttl)
                );
                println!("{token}");
            }
            Ok(())
        }
        TokenCommand::Revoke { id, target } => {
            let already = match &target.data_dir {
                Some(dir) => !TokenIssuer::load_or_create(dir)?.revoke(&id, None)?,
                None => {
                    let path = format!("/api/v1/tokens/{id}/revoke");
                    let (status, v) =
                        ops::call(&crate::local::server(target.server.clone()), "POST", &path, None).await?;
                    if status != 200 {
                        bail!("{}", v["error"].as_str().unwrap_or("the control plane refused the revocation"));
                    }
                    v["alreadyRevoked"].as_bool().unwrap_or(false)
                }
            };
            println!("token {id} {}", if already { "was already revoked" } else { "revoked" });
            Ok(())
        }
    }
}
