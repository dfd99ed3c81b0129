//! Envoy's virtual host domain matching, shared by the proxy's route tables and the
//! server's VHDS resolution, so both pick the same virtual host for a Host header.

use std::collections::HashMap;

/// Virtual host domains, each naming a `T` (a virtual host's index, name, ...). A lookup
/// tries, in Envoy's order: the exact domain, the longest `*suffix`, the longest
/// `prefix*` (a wildcard matches at least one character), then (for a host with a port
/// and no match) the same without the port, then `*`. Domains compare
/// case-insensitively.
#[derive(Debug, Clone)]
pub struct Domains<T> {
    exact: HashMap<String, T>,
    /// `*suffix` domains as (suffix, value), longest first.
    suffixes: Vec<(String, T)>,
    /// `prefix*` domains as (prefix, value), longest first.
    prefixes: Vec<(String, T)>,
    /// The `*` domain.
    any: Option<T>,
}

impl<T> Default for Domains<T> {
    fn default() -> Self {
        Domains { exact: HashMap::new(), suffixes: Vec::new(), prefixes: Vec::new(), any: None }
    }
}

impl<T> Domains<T> {
    /// Indexes `(domain, value)` pairs. When two values claim one domain, the first (in
    /// iteration order) keeps it.
    pub fn new(domains: impl IntoIterator<Item = (String, T)>) -> Self {
        let mut d = Domains::default();
        for (domain, value) in domains {
            let domain = domain.to_ascii_lowercase();
            if domain == "*" {
                d.any.get_or_insert(value);
            } else if let Some(s) = domain.strip_prefix('*') {
                d.suffixes.push((s.to_string(), value));
            } else if let Some(p) = domain.strip_suffix('*') {
                d.prefixes.push((p.to_string(), value));
            } else {
                d.exact.entry(domain).or_insert(value);
            }
        }
        // Stable sorts: among equal lengths the first claimed stays first.
        d.suffixes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        d.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        d
    }

    /// The value whose domain matches `authority` (a Host or `:authority`, with or
    /// without a port). With `ignore_port` (Envoy's `ignore_port_in_host_matching`) the
    /// port is stripped before matching. An authority already in lowercase (the proxy's
    /// request path lowercases it once) is matched as it is, without a copy.
    pub fn lookup(&self, authority: &str, ignore_port: bool) -> Option<&T> {
        let lower: std::borrow::Cow<'_, str> = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            authority.to_ascii_lowercase().into()
        } else {
            authority.into()
        };
        let host: &str = &lower;
        let stripped = strip_port(host);
        if ignore_port {
            return self.find(stripped).or(self.any.as_ref());
        }
        self.find(host)
            .or_else(|| (stripped.len() != host.len()).then(|| self.find(stripped)).flatten())
            .or(self.any.as_ref())
    }

    /// The value of the `*` domain, if any.
    pub fn any(&self) -> Option<&T> {
        self.any.as_ref()
    }

    /// Exact, then suffix, then prefix match of a lowercase host.
    fn find(&self, host: &str) -> Option<&T> {
        if let Some(v) = self.exact.get(host) {
            return Some(v);
        }
        // A wildcard matches at least one character.
        let suffix = self.suffixes.iter().find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()));
        if let Some((_, v)) = suffix {
            return Some(v);
        }
        let prefix = self.prefixes.iter().find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str()));
        prefix.map(|(_, v)| v)
    }
}

/// Strips a trailing `:port` from a host (IPv6 literals keep their brackets; an
/// unbracketed IPv6 address is left whole).
pub fn strip_port(host: &str) -> &str {
    let colon = if host.starts_with('[') {
        host.rfind("]:").map(|i| i + 1)
    } else {
        host.rfind(':').filter(|_| host.matches(':').count() == 1)
    };
    match colon {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_names_and_bracketed_ipv6_only() {
        assert_eq!(strip_port("reviews:9080"), "reviews");
        assert_eq!(strip_port("reviews"), "reviews");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("host:http"), "host:http");
    }

    #[test]
    fn envoy_order_exact_suffix_prefix_port_then_any() {
        let d = Domains::new(
            [("Exact.com", 1), ("*.com", 2), ("*.b.com", 3), ("api.*", 4), ("*", 5), ("exact.com", 6), ("p:80", 7)]
                .map(|(d, v)| (d.to_string(), v)),
        );
        assert_eq!(d.lookup("EXACT.com", false), Some(&1), "case-insensitive, first claim keeps it");
        assert_eq!(d.lookup("a.b.com", false), Some(&3), "longest suffix");
        assert_eq!(d.lookup("x.com", false), Some(&2));
        assert_eq!(d.lookup(".com", false), Some(&5), "a wildcard matches at least one character");
        assert_eq!(d.lookup("api.internal", false), Some(&4));
        assert_eq!(d.lookup("exact.com:8080", false), Some(&1), "port stripped when nothing matched");
        assert_eq!(d.lookup("p:80", false), Some(&7));
        assert_eq!(d.lookup("p:80", true), Some(&5), "ignore_port strips first");
        assert_eq!(d.lookup("other", false), Some(&5));
        assert_eq!(Domains::new([("a".to_string(), 1)]).lookup("b", false), None);
    }
}
