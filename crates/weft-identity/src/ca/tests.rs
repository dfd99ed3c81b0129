use std::os::unix::fs::PermissionsExt as _;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use x509_parser::extensions::ParsedExtension;

use super::*;

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).expect("valid id")
}

fn csr(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(&key).expect("csr").pem().expect("pem")
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.to_string().try_into().expect("ia5"))
}

/// Leaf and intermediates of an issued chain (the root dropped), DER.
fn presented(issued: &Issued) -> Vec<CertificateDer<'static>> {
    let mut chain = certs_from_pem(&issued.cert_chain().concat(), "chain").expect("pem");
    chain.pop();
    chain
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn self_signed_ca_is_created_with_private_files_and_reloaded_unchanged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let ca = Ca::load_or_create(&dir, "cluster.local").expect("create");
    assert_eq!(mode(&dir), 0o700, "data directory must be private");
    assert_eq!(mode(&dir.join("root-key.pem")), 0o600, "CA key must be 0600");
    assert!(dir.join("root-cert.pem").is_file());
    let bundle = ca.trust_bundle();
    assert_eq!(bundle.len(), 1);

    let reloaded = Ca::load_or_create(&dir, "cluster.local").expect("reload");
    assert_eq!(reloaded.trust_bundle(), bundle, "reload must keep the same root");
    // A leaf from the reloaded CA verifies against the first instance's bundle.
    let issued = reloaded.sign_csr(&csr(vec![]), &id("default", "web"), Duration::from_secs(600)).expect("sign");
    verify_chain(&presented(&issued), &bundle).expect("leaf chains to the persisted root");
}

#[test]
fn a_ca_key_readable_by_others_is_restricted_on_load() {
    let tmp = tempfile::tempdir().expect("tempdir");
    Ca::load_or_create(tmp.path(), "cluster.local").expect("create");
    let key = tmp.path().join("root-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    Ca::load_or_create(tmp.path(), "cluster.local").expect("reload");
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn leaf_carries_the_spiffe_uri_usages_and_short_backdated_validity() {
    let ca = Ca::ephemeral("cluster.local").expect("ca");
    let before = SystemTime::now();
    let issued = ca.sign_csr(&csr(vec![]), &id("bookinfo", "reviews"), Duration::from_secs(3600)).expect("sign");
    let der = presented(&issued).remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
    let info = CertInfo::parse(&der).expect("info");
    assert_eq!(info.uris, vec!["spiffe://cluster.local/ns/bookinfo/sa/reviews".to_string()]);
    assert!(!info.is_ca);
    let lifetime = info.not_after.duration_since(before).expect("after");
    assert!(lifetime > Duration::from_secs(3590) && lifetime <= Duration::from_secs(3601), "{lifetime:?}");
    let backdate = before.duration_since(info.not_before).expect("backdated");
    assert!(backdate >= Duration::from_secs(59) && backdate <= Duration::from_secs(62), "{backdate:?}");
    let mut saw_ku = false;
    let mut saw_eku = false;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::KeyUsage(ku) => {
                saw_ku = true;
                assert!(ku.digital_signature() && ku.key_encipherment());
                assert!(!ku.key_cert_sign());
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                saw_eku = true;
                assert!(eku.server_auth && eku.client_auth);
            }
            _ => {}
        }
    }
    assert!(saw_ku && saw_eku, "key usage and extended key usage must be present");
    assert_eq!(issued.chain_pems.len(), 1, "self-signed CA: the chain after the leaf is the root");
}

#[test]
fn csr_for_an_identity_the_credential_does_not_grant_is_refused() {
    let ca = Ca::ephemeral("cluster.local").expect("ca");
    let granted = id("default", "web");
    for sans in [
        vec![uri("spiffe://cluster.local/ns/kube-system/sa/admin")],
        vec![uri("spiffe://cluster.local/ns/default/sa/web"), uri("spiffe://cluster.local/ns/default/sa/db")],
        vec![SanType::DnsName("web.default.svc".try_into().expect("dns"))],
    ] {
        let err = ca.sign_csr(&csr(sans.clone()), &granted, Duration::from_secs(60)).expect_err("must refuse");
        assert!(matches!(err, IdentityError::IdentityNotGranted { .. }), "{sans:?}: {err}");
        assert!(err.to_string().contains("grants only spiffe://cluster.local/ns/default/sa/web"), "{err}");
    }
    // Asking for exactly the granted identity, or for nothing, is fine.
    ca.sign_csr(&csr(vec![uri("spiffe://cluster.local/ns/default/sa/web")]), &granted, Duration::from_secs(60))
        .expect("granted identity");
    // An identity of another trust domain is never signed.
    let foreign = SpiffeId::new("other.domain", "default", "web").expect("id");
    let err = ca.sign_csr(&csr(vec![]), &foreign, Duration::from_secs(60)).expect_err("foreign domain");
    assert!(err.to_string().contains("outside this CA's trust domain"), "{err}");
}

#[test]
fn csr_whose_signature_does_not_verify_is_refused() {
    let ca = Ca::ephemeral("cluster.local").expect("ca");
    let pem = csr(vec![]);
    let mut der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .expect("csr der")
        .as_ref()
        .to_vec();
    // The signature BIT STRING ends the DER: flip its last byte.
    let last = der.len() - 1;
    der[last] ^= 0x55;
    let tampered = crate::cert::pem_block("CERTIFICATE REQUEST", &der);
    let err = ca.sign_csr(&tampered, &id("default", "web"), Duration::from_secs(60)).expect_err("tampered");
    assert!(err.to_string().contains("signature does not verify"), "{err}");
    let err = ca.sign_csr("not a csr", &id("default", "web"), Duration::from_secs(60)).expect_err("garbage");
    assert!(matches!(err, IdentityError::CsrRefused(_)), "{err}");
}

use rustls::pki_types::pem::PemObject as _;

/// An organisation root and an intermediate under it, in Istio's cacerts layout.
fn write_cacerts(dir: &Path, with_chain: bool) -> CertificateDer<'static> {
    let root_key = KeyPair::generate().expect("key");
    let mut root_params = CertificateParams::default();
    root_params.distinguished_name.push(rcgen::DnType::CommonName, "Example Corp Root");
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = root_params.self_signed(&root_key).expect("root");
    let root_issuer = Issuer::new(root_params, root_key);
    let int_key = KeyPair::generate().expect("key");
    let mut int_params = CertificateParams::default();
    int_params.distinguished_name.push(rcgen::DnType::CommonName, "Example Corp mesh intermediate");
    int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    int_params.use_authority_key_identifier_extension = true;
    let int = int_params.signed_by(&int_key, &root_issuer).expect("intermediate");
    std::fs::write(dir.join("ca-cert.pem"), int.pem()).expect("write");
    std::fs::write(dir.join("ca-key.pem"), int_key.serialize_pem()).expect("write");
    std::fs::write(dir.join("root-cert.pem"), root.pem()).expect("write");
    if with_chain {
        std::fs::write(dir.join("cert-chain.pem"), format!("{}{}", int.pem(), root.pem())).expect("write");
    }
    root.der().clone()
}

#[test]
fn plug_in_ca_chains_workload_leaves_to_the_organisation_root() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let org_root = write_cacerts(tmp.path(), true);
    let ca = Ca::plug_in(tmp.path(), "cluster.local").expect("plug-in CA");
    assert_eq!(ca.trust_bundle(), vec![org_root.clone()], "the bundle is the organisation's root");
    let issued = ca.sign_csr(&csr(vec![]), &id("default", "web"), Duration::from_secs(600)).expect("sign");
    assert_eq!(issued.chain_pems.len(), 2, "leaf, then intermediate, then root");
    assert_eq!(certs_from_pem(&issued.chain_pems[1], "root").expect("pem")[0], org_root);
    let presented = presented(&issued);
    assert_eq!(presented.len(), 2, "leaf and intermediate are presented");
    verify_chain(&presented, std::slice::from_ref(&org_root)).expect("chains to the organisation root");
    // Without the intermediate the leaf does not chain: the intermediate is what links them.
    assert!(verify_chain(&presented[..1], &[org_root]).is_err());
    // A plug-in CA's root is the organisation's to rotate.
    assert!(ca.rotate_root().is_err());
}

#[test]
fn plug_in_ca_whose_key_or_root_does_not_fit_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_cacerts(tmp.path(), false);
    Ca::plug_in(tmp.path(), "cluster.local").expect("cert-chain.pem is optional under the root directly");

    let other = KeyPair::generate().expect("key");
    std::fs::write(tmp.path().join("ca-key.pem"), other.serialize_pem()).expect("write");
    let err = Ca::plug_in(tmp.path(), "cluster.local").err().expect("wrong key");
    assert!(err.to_string().contains("ca-key.pem is not the key of ca-cert.pem"), "{err}");

    let tmp2 = tempfile::tempdir().expect("tempdir");
    write_cacerts(tmp2.path(), true);
    let stranger = Ca::ephemeral("cluster.local").expect("other root");
    std::fs::write(tmp2.path().join("root-cert.pem"), stranger.trust_bundle_pem()).expect("write");
    let err = Ca::plug_in(tmp2.path(), "cluster.local").err().expect("wrong root");
    assert!(err.to_string().contains("does not verify against root-cert.pem"), "{err}");
}

#[test]
fn root_rotation_trusts_old_and_new_roots_during_the_overlap() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = Ca::load_or_create(tmp.path(), "cluster.local").expect("ca");
    let mut changes = ca.changes();
    let old_root = ca.trust_bundle()[0].clone();
    let ttl = Duration::from_secs(600);
    let old_leaf = presented(&ca.sign_csr(&csr(vec![]), &id("default", "a"), ttl).expect("sign"));

    ca.begin_root_rotation().expect("begin");
    assert!(changes.has_changed().expect("open"), "announcing a root changes the bundle");
    changes.borrow_and_update();
    let bundle = ca.trust_bundle();
    assert_eq!(bundle.len(), 2, "new root is trusted before anything is signed with it");
    let still_old = presented(&ca.sign_csr(&csr(vec![]), &id("default", "a"), ttl).expect("sign"));
    verify_chain(&still_old, std::slice::from_ref(&old_root)).expect("still signing with the old root");

    ca.complete_root_rotation().expect("complete");
    assert!(changes.has_changed().expect("open"));
    let bundle = ca.trust_bundle();
    assert_eq!(bundle.len(), 2, "old and new roots during the overlap");
    let new_root = bundle[0].clone();
    assert_ne!(new_root, old_root);
    let new_leaf = presented(&ca.sign_csr(&csr(vec![]), &id("default", "b"), ttl).expect("sign"));
    verify_chain(&old_leaf, &bundle).expect("old leaf verifies during the overlap");
    verify_chain(&new_leaf, &bundle).expect("new leaf verifies during the overlap");
    assert!(verify_chain(&new_leaf, std::slice::from_ref(&old_root)).is_err(), "new leaf is signed by the new root");

    // The overlap survives a restart.
    let reloaded = Ca::load_or_create(tmp.path(), "cluster.local").expect("reload");
    assert_eq!(reloaded.trust_bundle(), bundle);

    assert_eq!(reloaded.retire_previous_roots().expect("retire"), 1);
    assert_eq!(reloaded.trust_bundle(), vec![new_root]);
    assert!(verify_chain(&old_leaf, &reloaded.trust_bundle()).is_err(), "old root no longer trusted");
    verify_chain(&new_leaf, &reloaded.trust_bundle()).expect("new leaf still verifies");
}
