//! Kubernetes `Secret`s served over SDS for `credentialName`, as Istio serves them.
//!
//! - Names: `kubernetes://<name>` (a Secret in the proxy's namespace) and
//!   `kubernetes://<ns>/<name>` give the certificate chain and key (an SDS
//!   `tls_certificate`); `kubernetes://<name>-cacert` (and `kubernetes://<ns>/<name>-cacert`)
//!   give the CA a MUTUAL server verifies clients with, or a DestinationRule verifies the
//!   server with (an SDS `validation_context`): from a Secret named `<name>-cacert` when
//!   one exists, else from the `ca.crt`/`cacert` key of `<name>`.
//! - Who gets them: gateway proxies (node id `router~...`) in the Secret's namespace,
//!   as Istio's SDS authorization allows; sidecars never (Istio reads `credentialName`
//!   at gateways only). A gateway of another namespace gets a Secret only in its
//!   `kubernetes://<ns>/<name>` form and only when a ReferenceGrant in the Secret's
//!   namespace lets a `gateway.networking.k8s.io` Gateway of the proxy's namespace refer
//!   to it (Istio's `SecretAllowed`), which is what a cross-namespace `certificateRefs`
//!   needs ([`gateway_secrets`]).
//! - Rotation: a changed Secret is a store change; [`crate::secrets::SecretSource`]
//!   pushes the new content under the same name, and proxies use it for new handshakes.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, TlsCertificate,
};
use weft_api::{Kind, Resource, Spec};

/// Istio's prefix of SDS names that refer to Kubernetes Secrets.
pub const PREFIX: &str = "kubernetes://";
/// Istio's suffix of the SDS name of a credential's CA.
pub const CA_SUFFIX: &str = "-cacert";

/// The SDS name of a `credentialName` (`name`, `ns/name`, or already `kubernetes://...`).
pub fn sds_name(credential: &str) -> String {
    if credential.starts_with(PREFIX) {
        credential.to_string()
    } else {
        format!("{PREFIX}{credential}")
    }
}

/// The SDS name of the CA of a `credentialName`.
pub fn sds_ca_name(credential: &str) -> String {
    format!("{}{CA_SUFFIX}", sds_name(credential))
}

/// The SDS secrets of the Secrets in `namespace`, by SDS name (both the short and the
/// `ns/name` forms). A Secret whose content is unusable (rejected when applied) is absent.
pub fn secrets_in(resources: &[Resource], namespace: &str) -> BTreeMap<String, Secret> {
    let mut certs: BTreeMap<String, Secret> = BTreeMap::new();
    let mut own_ca: BTreeMap<String, String> = BTreeMap::new();
    let mut key_ca: BTreeMap<String, String> = BTreeMap::new();
    for r in resources.iter().filter(|r| r.kind == Kind::Secret && r.meta.namespace == namespace) {
        let Spec::Secret(s) = &r.spec else { continue };
        let Ok(m) = s.tls() else { continue };
        let name = &r.meta.name;
        if let (Some(chain), Some(key)) = (&m.cert_chain, &m.private_key) {
            let secret = Secret {
                name: String::new(),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: Some(inline(chain)),
                    private_key: Some(inline(key)),
                    ..Default::default()
                })),
            };
            certs.insert(name.clone(), secret);
        }
        if let Some(ca) = &m.ca {
            if m.cert_chain.is_none() && name.ends_with(CA_SUFFIX) {
                own_ca.insert(name.clone(), ca.clone());
            } else {
                key_ca.insert(format!("{name}{CA_SUFFIX}"), ca.clone());
            }
        }
    }
    // A `<name>-cacert` Secret wins over the `ca.crt` of `<name>`.
    for (name, ca) in own_ca {
        key_ca.insert(name, ca);
    }
    let mut out = BTreeMap::new();
    let mut put = |name: &str, s: &Secret| {
        for full in [format!("{PREFIX}{name}"), format!("{PREFIX}{namespace}/{name}")] {
            out.insert(full.clone(), Secret { name: full, r#type: s.r#type.clone() });
        }
    };
    for (name, s) in &certs {
        put(name, s);
    }
    for (name, ca) in &key_ca {
        let s = Secret {
            name: String::new(),
            r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: Some(inline(ca)),
                ..Default::default()
            })),
        };
        put(name, &s);
    }
    out
}

/// The SDS secrets a gateway proxy of `namespace` may read: those of its own namespace
/// ([`secrets_in`]) and, in their `ns/name` form only, those of other namespaces that a
/// ReferenceGrant opens to Gateways of `namespace` (the grant names the Secret, or its
/// `-cacert` base, or no name at all).
pub fn gateway_secrets(resources: &[Resource], namespace: &str) -> BTreeMap<String, Secret> {
    let mut out = secrets_in(resources, namespace);
    let grants = crate::gwapi::Grants::of(resources);
    let others: std::collections::BTreeSet<&str> = resources
        .iter()
        .filter(|r| r.kind == Kind::Secret && r.meta.namespace != namespace)
        .map(|r| r.meta.namespace.as_str())
        .collect();
    for ns in others {
        let prefix = format!("{PREFIX}{ns}/");
        for (full, s) in secrets_in(resources, ns) {
            let Some(name) = full.strip_prefix(&prefix) else { continue };
            let base = name.strip_suffix(CA_SUFFIX).unwrap_or(name);
            let from = (weft_api::spec::gateway_api::GROUP, "Gateway", namespace);
            if grants.allows(from, ("", "Secret", ns), name) || grants.allows(from, ("", "Secret", ns), base) {
                out.insert(full, s);
            }
        }
    }
    out
}

fn inline(pem: &str) -> DataSource {
    DataSource { specifier: Some(data_source::Specifier::InlineBytes(pem.as_bytes().to_vec())), ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBAA==\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIBAA==\n-----END PRIVATE KEY-----\n";

    fn parse(text: &str) -> Vec<Resource> {
        let p = weft_api::parse_str(text, std::path::Path::new("s.yaml"));
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        p.resources
    }

    fn secret(ns: &str, name: &str, keys: &[(&str, &str)]) -> String {
        let data: Vec<String> = keys.iter().map(|(k, v)| format!("  {k}: {v:?}")).collect();
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\nstringData:\n{}\n---\n",
            data.join("\n")
        )
    }

    #[test]
    fn names_follow_istio_and_stay_in_their_namespace() {
        let text = [
            secret("istio-system", "gw", &[("tls.crt", CERT), ("tls.key", KEY), ("ca.crt", CERT)]),
            secret("istio-system", "client-cacert", &[("cacert", CERT)]),
            secret("other", "elsewhere", &[("cert", CERT), ("key", KEY)]),
        ]
        .concat();
        let rs = parse(&text);
        let got: Vec<String> = secrets_in(&rs, "istio-system").into_keys().collect();
        assert_eq!(
            got,
            [
                "kubernetes://client-cacert",
                "kubernetes://gw",
                "kubernetes://gw-cacert",
                "kubernetes://istio-system/client-cacert",
                "kubernetes://istio-system/gw",
                "kubernetes://istio-system/gw-cacert",
            ]
        );
        assert_eq!(secrets_in(&rs, "other").len(), 2);
        assert_eq!(sds_name("gw"), "kubernetes://gw");
        assert_eq!(sds_ca_name("ns/gw"), "kubernetes://ns/gw-cacert");
        assert_eq!(sds_name("kubernetes://gw"), "kubernetes://gw");
    }

    fn grant(ns: &str, from_ns: &str, name: Option<&str>) -> String {
        let name = name.map(|n| format!(", name: {n}")).unwrap_or_default();
        format!(
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: g-{from_ns}, namespace: {ns}}}\n\
             spec:\n  from:\n  - {{group: gateway.networking.k8s.io, kind: Gateway, namespace: {from_ns}}}\n\
             \x20 to:\n  - {{group: \"\", kind: Secret{name}}}\n---\n"
        )
    }

    #[test]
    fn a_gateway_reads_another_namespace_s_secret_only_through_a_reference_grant() {
        let certs = [("tls.crt", CERT), ("tls.key", KEY), ("ca.crt", CERT)];
        let base = [secret("certs", "shop", &certs), secret("certs", "other", &certs)].concat();
        let names = |text: &str, ns: &str| -> Vec<String> { gateway_secrets(&parse(text), ns).into_keys().collect() };
        // Without a grant, a gateway of `gw` reads nothing of `certs`.
        assert!(names(&base, "gw").is_empty());
        // A grant naming `shop` opens `certs/shop` (and its CA), in the `ns/name` form only.
        let text = [base.clone(), grant("certs", "gw", Some("shop"))].concat();
        assert_eq!(names(&text, "gw"), ["kubernetes://certs/shop", "kubernetes://certs/shop-cacert"]);
        // Only to Gateways of the namespace the grant names.
        assert!(names(&text, "elsewhere").is_empty());
        // A grant without a name opens every Secret of its namespace.
        let text = [base.clone(), grant("certs", "gw", None)].concat();
        assert_eq!(names(&text, "gw").len(), 4);
        // A grant in another namespace than the Secret's opens nothing.
        let text = [base, grant("gw", "gw", None)].concat();
        assert!(names(&text, "gw").is_empty());
        // The gateway's own namespace is unaffected.
        assert_eq!(names(&text, "certs").len(), 8);
    }
}
