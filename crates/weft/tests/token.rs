//! `weft token create|revoke` as an operator runs them: against a running
//! `weft control --data-dir` through its API, and offline on the data directory.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use weft_identity::manager::CertManagerConfig;
use weft_identity::{CertManager, CredentialSource, IdentityError, SpiffeId, TokenIssuer};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

async fn weft(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let o = tokio::process::Command::new(WEFT).args(args).output().await?;
    Ok((
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn a_token_from_the_cli_gets_a_certificate_until_it_is_revoked() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let data_dir = data.path().join("weft-data");
    let mut control = tokio::process::Command::new(WEFT)
        .arg("control")
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--xds", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(control.stdout.take().context("stdout")?).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await??.context("no banner")?;
    let xds: SocketAddr = line.split("xDS on ").nth(1).and_then(|s| s.split(',').next()).context("xds")?.parse()?;
    let api = line.split("API on ").nth(1).context("api")?.trim().to_string();
    // The API wants the admin token the control plane generated in its data directory.
    let token_file = data_dir.join("admin-token");
    let tf = token_file.to_str().context("path")?;
    let (code, _, err) =
        weft(&["token", "create", "-n", "default", "--service-account", "web", "--server", &api]).await?;
    assert_ne!(code, 0, "minting a token without the admin credential must fail");
    assert!(err.contains("admin credential"), "{err}");
    let key_mode = std::fs::metadata(data_dir.join("root-key.pem"))?.permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600, "CA key created private");

    let (code, out, err) = weft(&[
        "token",
        "create",
        "--namespace",
        "default",
        "--service-account",
        "web",
        "--ttl",
        "1h",
        "--server",
        &api,
        "--token-file",
        tf,
        "-o",
        "json",
    ])
    .await?;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let token = v["token"].as_str().context("token")?.to_string();
    let id = v["id"].as_str().context("id")?.to_string();
    assert_eq!(v["identity"], "spiffe://cluster.local/ns/default/sa/web");

    let web = SpiffeId::new("cluster.local", "default", "web")?;
    let cfg = CertManagerConfig::new(format!("http://{xds}"), CredentialSource::JoinToken(token), web.clone());
    let mgr = CertManager::start(cfg.clone()).await?;
    assert_eq!(mgr.current().id, web);

    let (code, out, err) = weft(&["token", "revoke", &id, "--server", &api, "--token-file", tf]).await?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("token {id} revoked"));
    let refused = CertManager::start(cfg).await.err().context("revoked token must be refused")?;
    assert!(matches!(refused, IdentityError::Service { code: tonic::Code::Unauthenticated, .. }), "{refused}");

    // Root rotation from the CLI: two roots trusted after `begin`, one after `retire`;
    // an unknown step is refused with the expected ones.
    let (code, out, err) = weft(&["ca-rotate", "begin", "--server", &api, "--token-file", tf]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("begin done; 2 root(s)"), "{out}");
    let (code, out, err) = weft(&["ca-rotate", "complete", "--server", &api, "--token-file", tf]).await?;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = weft(&["ca-rotate", "retire", "--server", &api, "--token-file", tf]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 root(s)"), "{out}");
    let (code, _, err) = weft(&["ca-rotate", "sideways", "--server", &api, "--token-file", tf]).await?;
    assert_ne!(code, 0);
    assert!(err.contains("begin"), "{err}");
    Ok(())
}

#[tokio::test]
async fn tokens_can_be_managed_offline_on_the_data_directory() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let dir = data.path().to_str().context("utf-8 path")?;
    let (code, out, err) =
        weft(&["token", "create", "-n", "shop", "--service-account", "cart", "--data-dir", dir]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("for namespace shop, service account cart"), "{err}");
    let token = out.trim().to_string();
    let issuer = TokenIssuer::load_or_create(data.path())?;
    let grant = issuer.verify(&token)?;
    assert_eq!((grant.namespace.as_str(), grant.service_account.as_str()), ("shop", "cart"));

    let (code, _, err) = weft(&["token", "revoke", &grant.token_id, "--data-dir", dir]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(matches!(issuer.verify(&token), Err(IdentityError::TokenRevoked { .. })));

    let (code, _, err) =
        weft(&["token", "create", "-n", "Bad NS", "--service-account", "x", "--data-dir", dir]).await?;
    assert_ne!(code, 0);
    assert!(err.contains("namespace"), "{err}");

    // Over the maximum (90 days offline): refused with the bound, no token printed.
    for ttl in ["91d", "3000000years"] {
        let (code, out, err) =
            weft(&["token", "create", "-n", "shop", "--service-account", "cart", "--ttl", ttl, "--data-dir", dir])
                .await?;
        assert_ne!(code, 0, "{ttl}: {out}");
        assert!(out.is_empty(), "{out}");
        assert!(err.contains("is greater than the max allowed TTL 7776000s"), "{ttl}: {err}");
    }
    Ok(())
}
