//! Kubernetes core `v1` `Secret`: TLS material for Gateway and DestinationRule
//! `credentialName`, with the keys Istio accepts.
//!
//! A Secret has no `spec`: its `type`, `data` (base64) and `stringData` (plain text) are
//! top-level fields. The parser reads them into [`SecretSpec`] and the validator decodes
//! them ([`SecretSpec::tls`]), so a bad base64 value or PEM block is an error naming the
//! file, line and field (`data.tls.crt`) when the Secret is applied, not when a gateway
//! asks for it.
//!
//! Keys (Istio's `credentialName` rules):
//! - `kubernetes.io/tls`: `tls.crt`, `tls.key`, optional `ca.crt`;
//! - generic (`Opaque`): `cert`/`key`/`cacert`, or `tls.crt`/`tls.key`/`ca.crt`;
//! - a Secret holding only a CA (`ca.crt` or `cacert`) is a CA secret, e.g. the
//!   `<name>-cacert` Secret Istio reads the client CA of a MUTUAL server from.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The Secret `type` of TLS secrets.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// A Secret's top-level content (there is no `spec` in a Secret).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretSpec {
    /// `kubernetes.io/tls`, `Opaque` (the default) or another type.
    #[serde(default, rename = "type")]
    pub secret_type: Option<String>,
    /// Base64-encoded values by key.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    /// Plain-text values by key (they win over `data`, as in Kubernetes).
    #[serde(default)]
    pub string_data: BTreeMap<String, String>,
    /// Whether the Secret may change (accepted; weft re-reads any change).
    #[serde(default)]
    pub immutable: Option<bool>,
}

/// The PEM material of a Secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsMaterial {
    /// Certificate chain (PEM), leaf first.
    pub cert_chain: Option<String>,
    /// Private key (PEM).
    pub private_key: Option<String>,
    /// CA bundle (PEM) for verifying peers.
    pub ca: Option<String>,
}

/// A value that is not usable, with the field it is in (`data.tls.crt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretError {
    /// Field path, e.g. `data.tls.crt`.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// What to do.
    pub hint: Option<String>,
}

/// What a key holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Cert,
    Key,
    Ca,
}

/// Keys Istio reads, by secret type: (key, part).
const TLS_KEYS: &[(&str, Part)] = &[("tls.crt", Part::Cert), ("tls.key", Part::Key), ("ca.crt", Part::Ca)];
const GENERIC_KEYS: &[(&str, Part)] = &[
    ("cert", Part::Cert),
    ("key", Part::Key),
    ("cacert", Part::Ca),
    ("tls.crt", Part::Cert),
    ("tls.key", Part::Key),
    ("ca.crt", Part::Ca),
];

impl SecretSpec {
    /// The Secret's type (`Opaque` when unset).
    pub fn kind(&self) -> &str {
        self.secret_type.as_deref().unwrap_or("Opaque")
    }

    /// The value of `key`, decoded: `stringData` first, then base64 `data`. `Err` names
    /// the field.
    fn value(&self, key: &str) -> Result<Option<(String, String)>, SecretError> {
        if let Some(v) = self.string_data.get(key) {
            return Ok(Some((format!("stringData.{key}"), v.clone())));
        }
        let Some(raw) = self.data.get(key) else { return Ok(None) };
        let field = format!("data.{key}");
        let compact: String = raw.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD.decode(compact.as_bytes()).map_err(|e| SecretError {
            field: field.clone(),
            message: format!("not valid base64: {e}"),
            hint: Some("`data` values are base64 (`base64 -w0 tls.crt`); use `stringData` for plain PEM text".into()),
        })?;
        let text = String::from_utf8(bytes).map_err(|_| SecretError {
            field: field.clone(),
            message: "decodes to bytes that are not text (PEM expected)".into(),
            hint: Some("encode the PEM file itself, not a DER (binary) certificate or key".into()),
        })?;
        Ok(Some((field, text)))
    }

    /// The TLS material of the Secret, every present value checked as PEM. A
    /// `kubernetes.io/tls` Secret needs `tls.crt` and `tls.key`; a generic one needs a
    /// certificate and key together, or a CA alone.
    pub fn tls(&self) -> Result<TlsMaterial, SecretError> {
        let keys = if self.kind() == TLS_SECRET_TYPE { TLS_KEYS } else { GENERIC_KEYS };
        let mut out = TlsMaterial::default();
        let mut cert_field = None;
        let mut key_field = None;
        for (key, part) in keys {
            let Some((field, text)) = self.value(key)? else { continue };
            let slot = match part {
                Part::Cert => &mut out.cert_chain,
                Part::Key => &mut out.private_key,
                Part::Ca => &mut out.ca,
            };
            if slot.is_some() {
                continue; // `cert` wins over `tls.crt` (Istio reads them in this order)
            }
            match part {
                Part::Key => check_key(&field, &text)?,
                Part::Cert | Part::Ca => check_certs(&field, &text)?,
            }
            *slot = Some(text);
            match part {
                Part::Cert => cert_field = Some(field),
                Part::Key => key_field = Some(field),
                Part::Ca => {}
            }
        }
        let (cert_name, key_name, all) = if self.kind() == TLS_SECRET_TYPE {
            ("tls.crt", "tls.key", "`tls.crt` and `tls.key`")
        } else {
            ("cert", "key", "`cert` and `key` (or `tls.crt` and `tls.key`)")
        };
        match (&out.cert_chain, &out.private_key) {
            (Some(_), None) => Err(SecretError {
                field: format!("data.{key_name}"),
                message: format!("missing: {} has a certificate but no private key", cert_field.unwrap_or_default()),
                hint: Some(format!("a TLS secret holds {all}")),
            }),
            (None, Some(_)) => Err(SecretError {
                field: format!("data.{cert_name}"),
                message: format!("missing: {} has a private key but no certificate", key_field.unwrap_or_default()),
                hint: Some(format!("a TLS secret holds {all}")),
            }),
            (None, None) if self.kind() == TLS_SECRET_TYPE => Err(SecretError {
                field: "data".into(),
                message: "a kubernetes.io/tls Secret needs `tls.crt` and `tls.key`".into(),
                hint: None,
            }),
            _ => Ok(out),
        }
    }

    /// Whether the Secret holds TLS material at all (any key Istio reads).
    pub fn has_tls_keys(&self) -> bool {
        let keys = if self.kind() == TLS_SECRET_TYPE { TLS_KEYS } else { GENERIC_KEYS };
        keys.iter().any(|(k, _)| self.data.contains_key(*k) || self.string_data.contains_key(*k))
    }
}

/// One PEM block: its label and the 1-based line (in the value) it starts at.
struct Block {
    label: String,
    line: usize,
    body: String,
}

/// The PEM blocks of `text`, or an error naming the line in the value.
fn blocks(field: &str, text: &str) -> Result<Vec<Block>, SecretError> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let n = i + 1;
        if let Some(label) = line.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")) {
            if let Some(b) = &open {
                return Err(pem_error(
                    field,
                    n,
                    format!("BEGIN inside the {} block opened on line {}", b.label, b.line),
                ));
            }
            open = Some(Block { label: label.to_string(), line: n, body: String::new() });
        } else if let Some(label) = line.strip_prefix("-----END ").and_then(|l| l.strip_suffix("-----")) {
            let Some(b) = open.take() else {
                return Err(pem_error(field, n, format!("END {label} without a BEGIN")));
            };
            if b.label != label {
                return Err(pem_error(
                    field,
                    n,
                    format!("END {label} closes the BEGIN {} of line {}", b.label, b.line),
                ));
            }
            let decoded = base64::engine::general_purpose::STANDARD.decode(b.body.as_bytes());
            match decoded {
                Ok(d) if !d.is_empty() => out.push(b),
                Ok(_) => return Err(pem_error(field, b.line, format!("the {} block is empty", b.label))),
                Err(e) => {
                    return Err(pem_error(field, b.line, format!("the {} block is not valid base64: {e}", b.label)))
                }
            }
        } else if let Some(b) = &mut open {
            if !line.contains(':') {
                b.body.push_str(line);
            }
        }
    }
    if let Some(b) = open {
        return Err(pem_error(field, b.line, format!("the {} block has no END line", b.label)));
    }
    Ok(out)
}

fn pem_error(field: &str, line: usize, what: String) -> SecretError {
    SecretError {
        field: field.to_string(),
        message: format!("bad PEM at line {line} of the value: {what}"),
        hint: Some("paste the whole PEM file, BEGIN and END lines included".into()),
    }
}

fn check_certs(field: &str, text: &str) -> Result<(), SecretError> {
    let b = blocks(field, text)?;
    if b.is_empty() {
        return Err(SecretError {
            field: field.to_string(),
            message: "no PEM certificate (no `-----BEGIN CERTIFICATE-----` line)".into(),
            hint: Some("give the certificate in PEM form".into()),
        });
    }
    if let Some(other) = b.iter().find(|b| b.label != "CERTIFICATE") {
        return Err(pem_error(field, other.line, format!("expected CERTIFICATE blocks, found {}", other.label)));
    }
    Ok(())
}

fn check_key(field: &str, text: &str) -> Result<(), SecretError> {
    let b = blocks(field, text)?;
    let keys: Vec<&Block> = b.iter().filter(|b| b.label.ends_with("PRIVATE KEY")).collect();
    match keys.as_slice() {
        [_] => Ok(()),
        [] => Err(SecretError {
            field: field.to_string(),
            message: "no PEM private key (no `-----BEGIN ... PRIVATE KEY-----` line)".into(),
            hint: Some("give the private key in PEM form (PKCS#8, PKCS#1 or SEC1)".into()),
        }),
        [_, second, ..] => Err(pem_error(field, second.line, "a second private key".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBAA==\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIBAA==\n-----END PRIVATE KEY-----\n";

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn tls_secret_reads_its_three_keys_from_data() {
        let s = SecretSpec {
            secret_type: Some(TLS_SECRET_TYPE.into()),
            data: [("tls.crt", CERT), ("tls.key", KEY), ("ca.crt", CERT)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), b64(v)))
                .collect(),
            ..Default::default()
        };
        let m = s.tls().unwrap();
        assert_eq!(m.cert_chain.as_deref(), Some(CERT));
        assert_eq!(m.private_key.as_deref(), Some(KEY));
        assert_eq!(m.ca.as_deref(), Some(CERT));
    }

    #[test]
    fn generic_secret_takes_istio_keys_and_string_data() {
        let s = SecretSpec {
            string_data: [("cert", CERT), ("key", KEY), ("cacert", CERT)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let m = s.tls().unwrap();
        assert!(m.cert_chain.is_some() && m.private_key.is_some() && m.ca.is_some());
        let ca_only = SecretSpec { data: [("ca.crt".to_string(), b64(CERT))].into(), ..Default::default() };
        assert_eq!(ca_only.tls().unwrap().ca.as_deref(), Some(CERT));
    }

    #[test]
    fn bad_values_name_the_field_and_the_line() {
        let s = SecretSpec { data: [("cert".to_string(), "%%%".to_string())].into(), ..Default::default() };
        let e = s.tls().unwrap_err();
        assert_eq!(e.field, "data.cert");
        assert!(e.message.contains("base64"), "{e:?}");
        let broken = "-----BEGIN CERTIFICATE-----\nMIIBAA==\n-----END PRIVATE KEY-----\n";
        let s = SecretSpec {
            string_data: [("tls.crt".to_string(), broken.to_string()), ("tls.key".to_string(), KEY.to_string())].into(),
            ..Default::default()
        };
        let e = s.tls().unwrap_err();
        assert_eq!(e.field, "stringData.tls.crt");
        assert!(e.message.contains("line 3"), "{e:?}");
        let s = SecretSpec {
            secret_type: Some(TLS_SECRET_TYPE.into()),
            data: [("tls.crt".to_string(), b64(CERT))].into(),
            ..Default::default()
        };
        assert_eq!(s.tls().unwrap_err().field, "data.tls.key");
        let s = SecretSpec { string_data: [("key".to_string(), CERT.to_string())].into(), ..Default::default() };
        assert!(s.tls().unwrap_err().message.contains("no PEM private key"));
    }

    #[test]
    fn a_bad_secret_is_rejected_with_file_line_and_field() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata: {name: gw, namespace: istio-system}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: not*base64\n  tls.key: eA==\n";
        let p = crate::parse_str(text, std::path::Path::new("secret.yaml"));
        assert!(p.resources.is_empty());
        let e = p.errors[0].to_string();
        assert!(e.starts_with("secret.yaml:6:"), "{e}");
        assert!(e.contains("Secret istio-system/gw: data.tls.crt: not valid base64"), "{e}");
        let unknown = "apiVersion: v1\nkind: Secret\nmetadata: {name: gw}\nspec: {}\n";
        let p = crate::parse_str(unknown, std::path::Path::new("s.yaml"));
        assert!(p.errors[0].to_string().contains("unknown field `spec`"), "{:?}", p.errors);
    }
}
