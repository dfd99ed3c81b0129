#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use weft_testkit::pki::TestCa;

use super::*;

const HOST: &str = "weft-control.weft-system.svc";

/// A CA that signs serving certificates for [`HOST`].
fn pki() -> TestCa {
    TestCa::new("webhook test CA")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

async fn load_err(cert: &Path, key: &Path) -> String {
    ReloadingCert::load(cert, key).await.map(|_| ()).unwrap_err().to_string()
}

#[tokio::test]
async fn unreadable_missing_and_garbled_files_are_named_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki().leaf(&[HOST], 1);
    let cert = write(dir.path(), "tls.crt", &cert);
    let key = write(dir.path(), "tls.key", &key);
    let missing = dir.path().join("nope.crt");

    let e = load_err(&missing, &key).await;
    assert!(e.starts_with(&format!("{}: cannot read the webhook certificate", missing.display())), "{e}");
    let e = load_err(&cert, &missing).await;
    assert!(e.starts_with(&format!("{}: cannot read the webhook private key", missing.display())), "{e}");

    // The files swapped: no certificate in the key file, no key in the certificate file.
    let e = load_err(&key, &key).await;
    assert!(e.contains("tls.key: no PEM CERTIFICATE block"), "{e}");
    let e = load_err(&cert, &cert).await;
    assert!(e.contains("tls.crt: no PEM private key"), "{e}");

    let garbled =
        write(dir.path(), "garbled.crt", "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n");
    let e = load_err(&garbled, &key).await;
    assert!(e.contains("garbled.crt: invalid webhook certificate"), "{e}");
    let garbled_key =
        write(dir.path(), "garbled.key", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
    let e = load_err(&cert, &garbled_key).await;
    assert!(e.contains("garbled.key: invalid webhook private key"), "{e}");
}

#[tokio::test]
async fn a_key_of_another_certificate_is_a_mismatch_naming_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let (cert, _) = pki.leaf(&[HOST], 1);
    let (_, other_key) = pki.leaf(&[HOST], 2);
    let cert = write(dir.path(), "tls.crt", &cert);
    let key = write(dir.path(), "tls.key", &other_key);
    let e = load_err(&cert, &key).await;
    assert_eq!(
        e,
        format!(
            "{}: the private key does not match the certificate in {} (the wrong pair, or a rotation caught half-way)",
            key.display(),
            cert.display()
        )
    );
}

#[tokio::test]
async fn a_ca_certificate_first_in_the_chain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let (leaf, key) = pki.leaf(&[HOST], 1);
    let cert = write(dir.path(), "tls.crt", &format!("{}{leaf}", pki.pem()));
    let key = write(dir.path(), "tls.key", &key);
    let e = load_err(&cert, &key).await;
    assert!(e.contains("the first certificate is a CA"), "{e}");
}

#[tokio::test]
async fn reload_takes_a_new_pair_and_keeps_the_old_one_through_a_half_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let (cert1, key1) = pki.leaf(&[HOST], 1);
    let (cert2, key2) = pki.leaf(&[HOST], 2);
    let cert = write(dir.path(), "tls.crt", &cert1);
    let key = write(dir.path(), "tls.key", &key1);
    let certs = ReloadingCert::load(&cert, &key).await.unwrap();
    assert_eq!(certs.serial(), "01");
    assert!(!certs.reload().await.unwrap(), "unchanged files are not a reload");

    // The certificate is written before the key: the pair does not match yet.
    write(dir.path(), "tls.crt", &cert2);
    let e = certs.reload().await.unwrap_err();
    assert!(matches!(e, WebhookTlsError::Mismatch { .. }), "{e}");
    assert_eq!(certs.serial(), "01", "the previous pair stays in force");

    write(dir.path(), "tls.key", &key2);
    assert!(certs.reload().await.unwrap());
    assert_eq!(certs.serial(), "02");

    // A deleted file (Secret being re-mounted) keeps the pair in force too.
    std::fs::remove_file(&key).unwrap();
    assert!(matches!(certs.reload().await.unwrap_err(), WebhookTlsError::Read { .. }));
    assert_eq!(certs.serial(), "02");
}
