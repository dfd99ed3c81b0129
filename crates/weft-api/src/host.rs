//! Istio host-name semantics: short names resolve in a namespace, `*` wildcards.

/// Fully qualifies `host` in `namespace`: `reviews` becomes
/// `reviews.default.svc.cluster.local`, `reviews.prod` becomes
/// `reviews.prod.svc.cluster.local`. Names that already contain a dot beyond
/// that (FQDNs such as `www.google.com`) and wildcards are returned unchanged.
pub fn fqdn(host: &str, namespace: &str, domain: &str) -> String {
    if host.is_empty() || host.starts_with('*') || host.contains('/') {
        return host.to_string();
    }
    let dots = host.matches('.').count();
    if dots == 0 {
        format!("{host}.{namespace}.svc.{domain}")
    } else if dots == 1 && !host.ends_with('.') && looks_like_namespace(host) {
        format!("{host}.svc.{domain}")
    } else if host.ends_with(".svc") {
        format!("{host}.{domain}")
    } else {
        host.to_string()
    }
}

/// `name.ns` (two DNS labels, no TLD-like second part) is a Kubernetes short form.
fn looks_like_namespace(host: &str) -> bool {
    let Some((_, ns)) = host.split_once('.') else {
        return false;
    };
    // Treat common TLDs as FQDNs ("example.com" is not namespace "com").
    !matches!(ns, "com" | "org" | "net" | "io" | "dev" | "local" | "internal" | "edu" | "gov")
}

/// Whether `pattern` covers `host`: exact (case-insensitive), `*` (everything),
/// or `*.suffix` (any host ending in `.suffix`).
pub fn matches(pattern: &str, host: &str) -> bool {
    let p = pattern.to_ascii_lowercase();
    let h = host.to_ascii_lowercase();
    if p == "*" || p == h {
        return true;
    }
    if let Some(suffix) = p.strip_prefix('*') {
        if let Some(hs) = h.strip_prefix('*') {
            // A wildcard host is covered by a wider wildcard pattern.
            return hs.ends_with(suffix);
        }
        return h.ends_with(suffix) && h.len() > suffix.len();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_resolve_in_the_namespace() {
        assert_eq!(fqdn("reviews", "default", "cluster.local"), "reviews.default.svc.cluster.local");
        assert_eq!(fqdn("httpbin.foo", "bar", "cluster.local"), "httpbin.foo.svc.cluster.local");
        assert_eq!(fqdn("a.b.svc", "x", "cluster.local"), "a.b.svc.cluster.local");
    }

    #[test]
    fn fqdns_and_wildcards_are_untouched() {
        assert_eq!(fqdn("www.googleapis.com", "default", "cluster.local"), "www.googleapis.com");
        assert_eq!(fqdn("example.com", "default", "cluster.local"), "example.com");
        assert_eq!(fqdn("*", "default", "cluster.local"), "*");
        assert_eq!(fqdn("*.foo.svc.cluster.local", "default", "cluster.local"), "*.foo.svc.cluster.local");
        assert_eq!(
            fqdn("reviews.default.svc.cluster.local", "x", "cluster.local"),
            "reviews.default.svc.cluster.local"
        );
    }

    #[test]
    fn wildcard_matching() {
        assert!(matches("*", "anything.example.com"));
        assert!(matches("*.ns.svc.cluster.local", "a.ns.svc.cluster.local"));
        assert!(!matches("*.ns.svc.cluster.local", "a.other.svc.cluster.local"));
        assert!(!matches("*.ns.svc.cluster.local", ".ns.svc.cluster.local"));
        assert!(matches("Reviews.default.svc.cluster.local", "reviews.default.svc.cluster.local"));
        assert!(!matches("reviews.default.svc.cluster.local", "ratings.default.svc.cluster.local"));
        assert!(matches("*.com", "*.example.com"));
    }
}
