//! Workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

use crate::IdentityError;

/// Trust domain when none is configured (Istio's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity in Istio's SPIFFE form.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// An identity from its parts; each is checked (SPIFFE character rules).
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, IdentityError> {
        let input = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        let bad = |reason: String| IdentityError::InvalidSpiffeId { input: input.clone(), reason };
        check_trust_domain(trust_domain).map_err(bad)?;
        check_segment("namespace", namespace).map_err(bad)?;
        check_segment("service account", service_account).map_err(bad)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// Parses `spiffe://td/ns/NS/sa/SA`.
    pub fn parse(input: &str) -> Result<Self, IdentityError> {
        let bad =
            |reason: &str| IdentityError::InvalidSpiffeId { input: input.to_string(), reason: reason.to_string() };
        let rest = input.strip_prefix("spiffe://").ok_or_else(|| bad("must start with spiffe://"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| bad("has no path; expected /ns/<namespace>/sa/<sa>"))?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa),
            _ => Err(bad("path must be /ns/<namespace>/sa/<service-account>")),
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The URI (same as `to_string()`).
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

/// SPIFFE: a trust domain is lowercase letters, digits, `.`, `-` and `_`.
fn check_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("the trust domain is empty".into());
    }
    if td.len() > 255 {
        return Err("the trust domain is longer than 255 characters".into());
    }
    match td.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))) {
        Some(c) => {
            Err(format!("the trust domain may hold only lowercase letters, digits, '.', '-' and '_', not {c:?}"))
        }
        None => Ok(()),
    }
}

/// SPIFFE: a path segment is letters, digits, `.`, `-` and `_`, and not `.` or `..`.
fn check_segment(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if s == "." || s == ".." {
        return Err(format!("the {what} may not be {s:?}"));
    }
    match s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))) {
        Some(c) => Err(format!("the {what} may hold only letters, digits, '.', '-' and '_', not {c:?}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_istio_identities() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/bookinfo/sa/reviews").expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "bookinfo");
        assert_eq!(id.service_account(), "reviews");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/bookinfo/sa/reviews");
        assert_eq!(SpiffeId::new("cluster.local", "bookinfo", "reviews").expect("valid"), id);
    }

    #[test]
    fn refuses_malformed_identities_with_the_reason() {
        for (input, reason) in [
            ("http://cluster.local/ns/a/sa/b", "must start with spiffe://"),
            ("spiffe://cluster.local", "has no path"),
            ("spiffe://cluster.local/ns/a", "path must be"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "path must be"),
            ("spiffe://Cluster.Local/ns/a/sa/b", "lowercase"),
            ("spiffe:///ns/a/sa/b", "trust domain is empty"),
            ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
            ("spiffe://cluster.local/ns/a/sa/..", "may not be"),
            ("spiffe://cluster.local/ns/a/sa/b%20c", "not '%'"),
        ] {
            let err = SpiffeId::parse(input).expect_err(input).to_string();
            assert!(err.contains(reason), "{input}: {err} should contain {reason:?}");
        }
    }
}
