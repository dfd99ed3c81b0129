//! The Kubernetes rights `weft control --kubernetes` needs, as ONE list derived from
//! what the code does: `list`/`watch` on every kind in [`WATCHED`], `patch` on the
//! `status` subresource of the kinds whose status it writes ([`Watched::writes_status`],
//! a JSON merge patch in [`super::status`]), plus the fixed [`EXTRAS`] (token reviews,
//! the injection webhook's registration) and the namespaced Lease rights of the leader
//! election ([`LEASE_RULE`], in the Lease's namespace only).
//!
//! [`manifest`] renders them as the install manifest's `manifests/install/rbac.yaml`
//! (ClusterRole, Role and their bindings to the `weft-control` ServiceAccount); a unit
//! test fails when that file and this code disagree. Regenerate it with
//! `cargo run -p weft -- kubernetes-rbac > manifests/install/rbac.yaml`.

use std::collections::{BTreeMap, BTreeSet};

use super::{Watched, WATCHED};

/// Namespace of the install (ServiceAccount, Deployment, Lease).
pub const NAMESPACE: &str = "weft-system";
/// Name of the ServiceAccount, ClusterRole, Role and bindings.
pub const NAME: &str = "weft-control";
/// The install manifest this module generates, relative to the workspace root.
pub const MANIFEST_PATH: &str = "manifests/install/rbac.yaml";

/// One RBAC rule: API group, resources (or `resource/subresource`), verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// API group (`""`: the core group).
    pub group: &'static str,
    /// Resources the verbs apply to.
    pub resources: &'static [&'static str],
    /// Verbs granted.
    pub verbs: &'static [&'static str],
}

/// Rights used outside the watches, cluster-wide.
pub const EXTRAS: &[Rule] = &[
    // Service-account tokens presented to the CA are checked with TokenReview.
    Rule { group: "authentication.k8s.io", resources: &["tokenreviews"], verbs: &["create"] },
    // The control plane registers its `/inject` webhook and keeps its caBundle current
    // (`kubernetes::webhook`: read, create when missing, replace when it differs).
    Rule {
        group: "admissionregistration.k8s.io",
        resources: &["mutatingwebhookconfigurations"],
        verbs: &["get", "create", "update"],
    },
];

/// The leader election's rights on Leases ([`super::lease`]: `get`, `create`, and
/// `update` with the resourceVersion read), in the Lease's namespace only (a Role).
pub const LEASE_RULE: Rule =
    Rule { group: "coordination.k8s.io", resources: &["leases"], verbs: &["get", "create", "update"] };

/// The verb the status writer uses on `<plural>/status` (a merge patch).
const STATUS_VERB: &str = "patch";
/// The verbs a watch needs (the `kube` watcher lists, then watches).
const WATCH_VERBS: &[&str] = &["list", "watch"];

/// A cluster-wide rule set, merged: one entry per (group, verbs) with its resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedRule {
    /// API group.
    pub group: String,
    /// Resources, sorted.
    pub resources: Vec<String>,
    /// Verbs, in Kubernetes' usual order (get, list, watch, create, update, patch).
    pub verbs: Vec<String>,
}

/// The ClusterRole's rules: [`WATCHED`] and [`EXTRAS`], merged and sorted.
pub fn cluster_rules() -> Vec<MergedRule> {
    cluster_rules_of(WATCHED, EXTRAS)
}

fn cluster_rules_of(watched: &[Watched], extras: &[Rule]) -> Vec<MergedRule> {
    let mut rights: BTreeMap<(String, String), BTreeSet<&'static str>> = BTreeMap::new();
    for w in watched {
        let entry = rights.entry((w.group.to_string(), w.plural.to_string())).or_default();
        entry.extend(WATCH_VERBS);
        if w.writes_status() {
            rights.entry((w.group.to_string(), format!("{}/status", w.plural))).or_default().insert(STATUS_VERB);
        }
    }
    for r in extras {
        for res in r.resources {
            rights.entry((r.group.to_string(), res.to_string())).or_default().extend(r.verbs);
        }
    }
    merge(rights)
}

/// The Role's rules (Leases in the Lease's namespace).
pub fn lease_rules() -> Vec<MergedRule> {
    let mut rights: BTreeMap<(String, String), BTreeSet<&'static str>> = BTreeMap::new();
    for res in LEASE_RULE.resources {
        rights.entry((LEASE_RULE.group.to_string(), res.to_string())).or_default().extend(LEASE_RULE.verbs);
    }
    merge(rights)
}

fn merge(rights: BTreeMap<(String, String), BTreeSet<&'static str>>) -> Vec<MergedRule> {
    let mut by: BTreeMap<(String, Vec<String>), Vec<String>> = BTreeMap::new();
    for ((group, resource), verbs) in rights {
        let mut verbs: Vec<String> = verbs.into_iter().map(String::from).collect();
        verbs.sort_by_key(|v| verb_rank(v));
        by.entry((group, verbs)).or_default().push(resource);
    }
    by.into_iter().map(|((group, verbs), resources)| MergedRule { group, resources, verbs }).collect()
}

fn verb_rank(verb: &str) -> (usize, String) {
    const ORDER: &[&str] = &["get", "list", "watch", "create", "update", "patch", "delete"];
    (ORDER.iter().position(|v| *v == verb).unwrap_or(ORDER.len()), verb.to_string())
}

/// `manifests/install/rbac.yaml`: the ClusterRole and Role from the rules above, bound to
/// the `weft-control` ServiceAccount of `weft-system`.
pub fn manifest() -> String {
    let mut out = String::new();
    out.push_str(
        "# Generated from crates/weft-control/src/kubernetes/rbac.rs (the kinds `weft control\n\
         # --kubernetes` watches, the status it writes, and the fixed extras): do not edit.\n\
         # Regenerate: cargo run -p weft -- kubernetes-rbac > manifests/install/rbac.yaml\n",
    );
    out.push_str(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {NAME}\n  labels: {{app.kubernetes.io/part-of: weft}}\nrules:\n"
    ));
    out.push_str(&rules_yaml(&cluster_rules()));
    out.push_str(&format!(
        "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {NAME}\n  labels: {{app.kubernetes.io/part-of: weft}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {NAME}}}\nsubjects:\n- {{kind: ServiceAccount, name: {NAME}, namespace: {NAMESPACE}}}\n"
    ));
    out.push_str(&format!(
        "---\n# Leader election: the Lease lives in the control plane's namespace.\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: {NAME}\n  namespace: {NAMESPACE}\n  labels: {{app.kubernetes.io/part-of: weft}}\nrules:\n"
    ));
    out.push_str(&rules_yaml(&lease_rules()));
    out.push_str(&format!(
        "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: {NAME}\n  namespace: {NAMESPACE}\n  labels: {{app.kubernetes.io/part-of: weft}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {NAME}}}\nsubjects:\n- {{kind: ServiceAccount, name: {NAME}, namespace: {NAMESPACE}}}\n"
    ));
    out
}

fn rules_yaml(rules: &[MergedRule]) -> String {
    let list = |items: &[String]| items.iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", ");
    rules
        .iter()
        .map(|r| {
            format!(
                "- apiGroups: [\"{}\"]\n  resources: [{}]\n  verbs: [{}]\n",
                r.group,
                list(&r.resources),
                list(&r.verbs)
            )
        })
        .collect()
}

/// A hint for an error from the API server that is a refusal (403): which file grants
/// the rights. Empty for other errors. Appended to the log line of the failed call.
pub(crate) fn hint(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            " (forbidden: the control plane's service account lacks this right; the install's \
             ClusterRole/Role {NAME} ({MANIFEST_PATH}) grants exactly what weft uses)"
        ),
        _ => String::new(),
    }
}

/// [`hint`] for a watcher's error (a list or watch the API server refused).
pub(crate) fn watch_hint(e: &kube::runtime::watcher::Error) -> String {
    use kube::runtime::watcher::Error;
    match e {
        Error::InitialListFailed(e) | Error::WatchStartFailed(e) | Error::WatchFailed(e) => hint(e),
        Error::WatchError(s) if s.code == 403 => hint(&kube::Error::Api(s.clone())),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_install_manifest_grants_exactly_what_the_code_uses() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(MANIFEST_PATH);
        let file = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            file == manifest(),
            "{} disagrees with crates/weft-control/src/kubernetes/rbac.rs (WATCHED, EXTRAS, LEASE_RULE).\n\
             Regenerate it: cargo run -p weft -- kubernetes-rbac > {MANIFEST_PATH}\n--- generated ---\n{}",
            path.display(),
            manifest()
        );
    }

    #[test]
    fn every_watched_kind_is_listed_and_watched_and_status_is_patched_only_where_written() {
        let rules = cluster_rules();
        let grants = |group: &str, resource: &str, verb: &str| {
            rules.iter().any(|r| {
                r.group == group && r.resources.iter().any(|x| x == resource) && r.verbs.iter().any(|v| v == verb)
            })
        };
        for w in WATCHED {
            assert!(grants(w.group, w.plural, "list") && grants(w.group, w.plural, "watch"), "{}", w.kind);
            assert!(!grants(w.group, w.plural, "get"), "{}: no get is used", w.kind);
            let status = format!("{}/status", w.plural);
            assert_eq!(grants(w.group, &status, "patch"), w.writes_status(), "{}", w.kind);
            assert!(!grants(w.group, &status, "update"), "{}: status is patched, never updated", w.kind);
        }
        assert!(grants("authentication.k8s.io", "tokenreviews", "create"));
        assert!(
            !rules.iter().any(|r| r.group == "coordination.k8s.io"),
            "Leases are namespaced: a Role, not the ClusterRole"
        );
        assert_eq!(lease_rules()[0].verbs, ["get", "create", "update"]);
    }

    #[test]
    fn rules_merge_by_group_and_verbs() {
        let pick = |kind: &str| *WATCHED.iter().find(|w| w.group.is_empty() && w.kind == kind).expect("watched");
        let watched = [pick("Service"), pick("Pod")];
        let extras = [Rule { group: "", resources: &["services"], verbs: &["get"] }];
        let rules = cluster_rules_of(&watched, &extras);
        assert_eq!(rules.len(), 2, "{rules:?}");
        assert!(rules.contains(&MergedRule {
            group: String::new(),
            resources: vec!["pods".into()],
            verbs: vec!["list".into(), "watch".into()],
        }));
        assert!(rules.contains(&MergedRule {
            group: String::new(),
            resources: vec!["services".into()],
            verbs: vec!["get".into(), "list".into(), "watch".into()],
        }));
    }
}
