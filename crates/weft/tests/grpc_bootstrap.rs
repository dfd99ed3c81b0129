//! `weft grpc-bootstrap --fetch-certs` against a running `weft control --data-dir`: the
//! files grpcio's `file_watcher` provider reads hold a certificate of the mesh CA for
//! the workload's SPIFFE id, and the bootstrap names them.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use weft_identity::cert::{certs_from_pem, spiffe_id_of};

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
async fn grpc_bootstrap_fetches_a_mesh_certificate_with_a_join_token() -> anyhow::Result<()> {
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
    let tf = data_dir.join("admin-token");
    let (code, out, err) = weft(&[
        "token",
        "create",
        "-n",
        "shop",
        "--service-account",
        "client",
        "--server",
        &api,
        "--token-file",
        tf.to_str().context("path")?,
        "-o",
        "json",
    ])
    .await?;
    assert_eq!(code, 0, "{err}");
    let token = serde_json::from_str::<serde_json::Value>(&out)?["token"].as_str().context("token")?.to_string();

    let certs = data.path().join("certs");
    let certs_arg = certs.to_str().context("path")?;
    let xds_arg = xds.to_string();
    let args = ["grpc-bootstrap", "--name", "client", "--namespace", "shop", "--service-account", "client"];
    let (code, out, err) = weft(
        &[&args[..], &["--xds", &xds_arg, "--join-token", &token, "--cert-dir", certs_arg, "--fetch-certs"]].concat(),
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    let b: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(b["certificate_providers"]["default"]["config"]["private_key_file"], format!("{certs_arg}/key.pem"));
    let leaf = certs_from_pem(&std::fs::read_to_string(certs.join("cert-chain.pem"))?, "chain")?;
    assert_eq!(spiffe_id_of(&leaf[0])?.uri(), "spiffe://cluster.local/ns/shop/sa/client");
    let root = std::fs::read_to_string(certs.join("root-cert.pem"))?;
    assert_eq!(root.trim(), std::fs::read_to_string(data_dir.join("root-cert.pem"))?.trim());
    assert_eq!(std::fs::metadata(certs.join("key.pem"))?.permissions().mode() & 0o777, 0o600);

    // A token of another identity is refused, and nothing is printed.
    let (code, out, err) = weft(
        &[
            &["grpc-bootstrap", "--name", "client", "--namespace", "shop", "--service-account", "other"][..],
            &["--xds", &xds_arg, "--join-token", &token, "--cert-dir", certs_arg, "--fetch-certs"],
        ]
        .concat(),
    )
    .await?;
    assert_ne!(code, 0);
    assert!(out.is_empty() && err.contains("certificate"), "{out}{err}");
    Ok(())
}
