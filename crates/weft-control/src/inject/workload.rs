//! The workload a pod belongs to, as Istio names it for `WORKLOAD_NAME` (its injector's
//! `GetDeployMetaFromPod`): the `source_workload` / `destination_workload` of the pod's
//! metrics is its Deployment (or StatefulSet, DaemonSet, Job, CronJob), never the pod.

use super::yaml::{Map, Node, Resolved};

/// An `ownerReferences` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// `kind`, e.g. `ReplicaSet`.
    pub kind: String,
    /// `name`, e.g. `reviews-v2-7d9c8f6b5`.
    pub name: String,
    /// `controller: true`.
    pub controller: bool,
}

/// The workload name of a pod: for a pod whose name is generated (`generateName` set),
/// its controller's name, with a ReplicaSet's `pod-template-hash` suffix removed (the
/// Deployment) and a CronJob's `-<8 to 10 digit timestamp>` Job suffix removed; otherwise
/// (a bare pod, or no controller) the pod's own name. Empty when the pod has no name yet.
pub fn workload_name(
    name: &str,
    generate_name: &str,
    owners: &[Owner],
    labels: &std::collections::BTreeMap<String, String>,
) -> String {
    let controller = owners.iter().find(|o| o.controller).filter(|_| !generate_name.is_empty());
    let Some(owner) = controller else { return name.to_string() };
    let label = |k: &str| labels.get(k).map(String::as_str).filter(|v| !v.is_empty());
    match owner.kind.as_str() {
        "ReplicaSet" => match label("pod-template-hash") {
            Some(hash) => {
                owner.name.strip_suffix(hash).and_then(|n| n.strip_suffix('-')).unwrap_or(&owner.name).to_string()
            }
            None => owner.name.clone(),
        },
        "Job" => match label("job-name") {
            Some(job) => cron_job(job).unwrap_or(&owner.name).to_string(),
            None => owner.name.clone(),
        },
        _ => owner.name.clone(),
    }
}

/// The CronJob of a Job named `<cronjob>-<8 to 10 digits>`.
fn cron_job(job: &str) -> Option<&str> {
    let (base, stamp) = job.rsplit_once('-')?;
    let digits = (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit());
    (digits && !base.is_empty()).then_some(base)
}

/// [`workload_name`] of a Pod object (or pod template) from its `metadata`.
pub fn of_pod(pod: &Map) -> String {
    let Some(meta) = pod.get("metadata").and_then(Node::as_map) else { return String::new() };
    let text = |m: &Map, k: &str| m.get(k).and_then(Node::text).unwrap_or("").to_string();
    let owners: Vec<Owner> = meta
        .get("ownerReferences")
        .and_then(Node::as_seq)
        .map(|refs| {
            refs.iter()
                .filter_map(Node::as_map)
                .map(|r| Owner {
                    kind: text(r, "kind"),
                    name: text(r, "name"),
                    controller: matches!(
                        r.get("controller").and_then(Node::as_scalar).map(|s| s.resolve()),
                        Some(Resolved::Bool(true))
                    ),
                })
                .collect()
        })
        .unwrap_or_default();
    let labels = meta
        .get("labels")
        .and_then(Node::as_map)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.text.clone(), v.text()?.to_string()))).collect())
        .unwrap_or_default();
    workload_name(&text(meta, "name"), &text(meta, "generateName"), &owners, &labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(kind: &str, name: &str) -> Vec<Owner> {
        vec![Owner { kind: kind.into(), name: name.into(), controller: true }]
    }

    fn labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn deployment_pods_are_named_by_their_deployment() {
        let rs = owner("ReplicaSet", "reviews-v2-7d9c8f6b5");
        let hash = labels(&[("pod-template-hash", "7d9c8f6b5")]);
        assert_eq!(workload_name("reviews-v2-7d9c8f6b5-zxgzm", "reviews-v2-7d9c8f6b5-", &rs, &hash), "reviews-v2");
        // A ReplicaSet not made by a Deployment (no hash label) names the workload itself.
        assert_eq!(workload_name("", "web-", &owner("ReplicaSet", "web"), &labels(&[])), "web");
    }

    #[test]
    fn statefulset_daemonset_and_job_pods_are_named_by_their_controller() {
        let none = labels(&[]);
        assert_eq!(workload_name("db-0", "db-", &owner("StatefulSet", "db"), &none), "db");
        assert_eq!(workload_name("", "agent-", &owner("DaemonSet", "agent"), &none), "agent");
        let job = labels(&[("job-name", "migrate")]);
        assert_eq!(workload_name("", "migrate-", &owner("Job", "migrate"), &job), "migrate");
        let cron = labels(&[("job-name", "backup-28461230")]);
        assert_eq!(workload_name("", "backup-28461230-", &owner("Job", "backup-28461230"), &cron), "backup");
        let short = labels(&[("job-name", "backup-1234")]);
        assert_eq!(workload_name("", "x-", &owner("Job", "backup-1234"), &short), "backup-1234", "not a timestamp");
    }

    #[test]
    fn bare_pods_and_pods_without_a_controller_keep_their_name() {
        let none = labels(&[]);
        assert_eq!(workload_name("debug", "", &[], &none), "debug");
        // An owner without generateName: Istio only follows generated names.
        assert_eq!(workload_name("pinned", "", &owner("ReplicaSet", "rs"), &none), "pinned");
        let not_controller = vec![Owner { kind: "ReplicaSet".into(), name: "rs".into(), controller: false }];
        assert_eq!(workload_name("p-abc", "p-", &not_controller, &none), "p-abc");
    }

    #[test]
    fn reads_owner_references_from_pod_metadata() {
        let pod = Node::from_json(&serde_json::json!({
            "metadata": {
                "generateName": "ratings-v1-5f9699cfdf-",
                "labels": {"app": "ratings", "pod-template-hash": "5f9699cfdf"},
                "ownerReferences": [
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "ratings-v1-5f9699cfdf", "controller": true}
                ]
            }
        }));
        assert_eq!(of_pod(pod.as_map().unwrap()), "ratings-v1");
    }
}
