//! Status conditions as Istio writes them: Gateway `Accepted`/`Programmed`, listener
//! `Accepted`/`Conflicted`/`Programmed`/`ResolvedRefs` with `supportedKinds` and
//! `attachedRoutes`, and a route's `parents[]` with `Accepted`/`ResolvedRefs`.
//! `Programmed` of a Gateway depends on the connected proxies: [`super::Conversion`]
//! leaves it `Unknown` and the API fills it in ([`programmed`]).

use serde_json::{json, Value};
use weft_api::spec::gateway_api::{Listener, ParentReference, TlsModeType, CONTROLLER, GROUP};
use weft_api::KubernetesGateway;

/// One condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Type, e.g. `Accepted`.
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// Reason, e.g. `NoMatchingParent`.
    pub reason: String,
    /// Message.
    pub message: String,
}

/// The conditions of a listener being decided.
#[derive(Debug, Clone)]
pub(super) struct ListenerConditions {
    /// `Conflicted: True` with its reason, when the listener conflicts.
    pub conflicted: Option<Condition>,
    /// `ResolvedRefs: False` with its reason, when a reference is bad.
    pub resolved_refs: Option<Condition>,
    /// Route kinds given in `allowedRoutes.kinds` the protocol does not carry.
    pub invalid_kinds: bool,
}

impl Condition {
    /// A `True` condition.
    pub fn yes(kind: &str, reason: &str, message: &str) -> Condition {
        Condition { kind: kind.into(), status: "True", reason: reason.into(), message: message.into() }
    }

    /// A `False` condition.
    pub fn no(kind: &str, reason: &str, message: &str) -> Condition {
        Condition { kind: kind.into(), status: "False", reason: reason.into(), message: message.into() }
    }

    /// As Kubernetes writes it.
    pub fn json(&self) -> Value {
        json!({"type": self.kind, "status": self.status, "reason": self.reason, "message": self.message})
    }
}

impl ListenerConditions {
    pub(super) fn new(l: &Listener) -> ListenerConditions {
        let invalid_kinds =
            l.allowed_routes.as_ref().is_some_and(|a| a.kinds.iter().any(|k| !supported(l).contains(&k.kind.as_str())));
        ListenerConditions { conflicted: None, resolved_refs: None, invalid_kinds }
    }

    /// Whether the listener is programmed on the gateway.
    pub(super) fn serves(&self) -> bool {
        self.conflicted.is_none() && self.resolved_refs.is_none()
    }
}

/// Route kinds a listener's protocol carries.
fn supported(l: &Listener) -> &'static [&'static str] {
    match l.protocol.as_str() {
        "HTTP" | "HTTPS" => &["HTTPRoute", "GRPCRoute"],
        "TLS" if l.tls.as_ref().is_some_and(|t| t.mode == Some(TlsModeType::Passthrough)) => &["TLSRoute"],
        "TLS" => &["TLSRoute", "TCPRoute"],
        "TCP" => &["TCPRoute"],
        _ => &[],
    }
}

/// The kinds a listener admits: `allowedRoutes.kinds` it supports, else all it supports.
fn admitted(l: &Listener) -> Vec<&'static str> {
    let listed: Vec<&str> = l
        .allowed_routes
        .as_ref()
        .map(|a| {
            a.kinds.iter().filter(|k| k.group.as_deref().is_none_or(|g| g == GROUP)).map(|k| k.kind.as_str()).collect()
        })
        .unwrap_or_default();
    let all = supported(l);
    if l.allowed_routes.as_ref().is_some_and(|a| !a.kinds.is_empty()) {
        all.iter().copied().filter(|k| listed.contains(k)).collect()
    } else {
        all.to_vec()
    }
}

/// Whether a listener admits routes of `kind`.
pub(super) fn kind_allowed(l: &Listener, kind: &str) -> bool {
    admitted(l).contains(&kind)
}

/// `Conflicted` for each listener: another protocol family on its port
/// (`ProtocolConflict`), or the same port, protocol and hostname (`HostnameConflict`).
pub(super) fn conflicts(ls: &[Listener]) -> Vec<Option<Condition>> {
    let family = |p: &str| match p {
        "HTTP" => 0,
        "HTTPS" | "TLS" => 1,
        _ => 2,
    };
    ls.iter()
        .enumerate()
        .map(|(i, l)| {
            let same_port = ls.iter().enumerate().filter(|(j, o)| *j != i && o.port == l.port);
            let mut out = None;
            for (_, o) in same_port {
                if family(&o.protocol) != family(&l.protocol) {
                    out = Some(Condition::yes("Conflicted", "ProtocolConflict", "Protocol conflict"));
                    break;
                }
                if o.protocol == l.protocol && o.hostname == l.hostname {
                    out = Some(Condition::yes("Conflicted", "HostnameConflict", "Hostname conflict"));
                }
            }
            out
        })
        .collect()
}

/// A listener's status.
pub(super) fn listener(l: &Listener, attached: usize, c: &ListenerConditions) -> Value {
    let kinds: Vec<Value> = admitted(l).iter().map(|k| json!({"group": GROUP, "kind": k})).collect();
    let mut conditions = vec![Condition::yes("Accepted", "Accepted", "No errors found")];
    conditions
        .push(c.conflicted.clone().unwrap_or_else(|| Condition::no("Conflicted", "NoConflicts", "No errors found")));
    conditions.push(if c.serves() {
        Condition::yes("Programmed", "Programmed", "No errors found")
    } else {
        Condition::no("Programmed", "Invalid", "The listener is not served: see its other conditions")
    });
    conditions.push(match (&c.resolved_refs, c.invalid_kinds) {
        (Some(bad), _) => bad.clone(),
        (None, true) => Condition::no("ResolvedRefs", "InvalidRouteKinds", "Invalid route kinds"),
        (None, false) => Condition::yes("ResolvedRefs", "ResolvedRefs", "No errors found"),
    });
    json!({
        "name": l.name,
        "supportedKinds": kinds,
        "attachedRoutes": attached,
        "conditions": conditions.iter().map(Condition::json).collect::<Vec<_>>(),
    })
}

/// A Gateway's status; `Programmed` is `Unknown` until [`programmed`] decides it.
pub(super) fn gateway(g: &KubernetesGateway, listeners: Vec<Value>) -> Value {
    let unsupported: Vec<&str> = g
        .addresses
        .iter()
        .filter(|a| a.address_type.as_deref().is_some_and(|t| t != "Hostname"))
        .map(|a| a.value.as_str())
        .collect();
    let accepted = if unsupported.is_empty() {
        Condition::yes("Accepted", "Accepted", "Resource accepted")
    } else {
        Condition::no(
            "Accepted",
            "UnsupportedAddress",
            &format!("only Hostname addresses naming a gateway Service are supported, not {}", unsupported.join(", ")),
        )
    };
    let programmed = Condition {
        kind: "Programmed".into(),
        status: "Unknown",
        reason: "Pending".into(),
        message: "Waiting for controller".into(),
    };
    json!({
        "conditions": [accepted.json(), programmed.json()],
        "listeners": listeners,
    })
}

/// Fills in a Gateway's `Programmed` (whether a gateway proxy it selects is connected,
/// with the addresses of those that are).
pub fn programmed(status: &mut Value, addresses: &[String]) {
    let cond = if addresses.is_empty() {
        Condition::no(
            "Programmed",
            "AddressNotAssigned",
            "No gateway proxy selected by this Gateway is connected to the control plane",
        )
    } else {
        Condition::yes("Programmed", "Programmed", "Resource programmed, assigned to the connected gateway proxies")
    };
    if let Some(list) = status.get_mut("conditions").and_then(Value::as_array_mut) {
        list.retain(|c| c["type"] != "Programmed");
        list.push(cond.json());
    }
    status["addresses"] = addresses.iter().map(|a| json!({"type": "IPAddress", "value": a})).collect();
}

/// A Gateway whose class weft does not serve: left `Pending`, as Kubernetes leaves a
/// Gateway no controller picks up.
pub(super) fn unknown_class(class: &str) -> Value {
    let message = format!(
        "gatewayClassName `{class}` is not served by weft: use `istio`, or a GatewayClass whose controllerName is {CONTROLLER}"
    );
    json!({"conditions": [
        {"type": "Accepted", "status": "Unknown", "reason": "Pending", "message": message},
        {"type": "Programmed", "status": "Unknown", "reason": "Pending", "message": "Waiting for controller"},
    ]})
}

/// One `parents[]` entry of a route's status.
pub(super) fn route_parent(
    parent: &ParentReference,
    route_ns: &str,
    accepted: Result<(), (String, String)>,
    refs: &Option<(String, String)>,
) -> Value {
    let mut parent_ref = json!({
        "group": parent.group.clone().unwrap_or_else(|| if parent.is_service() { String::new() } else { GROUP.into() }),
        "kind": parent.kind.clone().unwrap_or_else(|| "Gateway".into()),
        "name": parent.name,
        "namespace": parent.namespace.clone().unwrap_or_else(|| route_ns.to_string()),
    });
    if let Some(s) = &parent.section_name {
        parent_ref["sectionName"] = json!(s);
    }
    if let Some(p) = parent.port {
        parent_ref["port"] = json!(p);
    }
    let accepted = match accepted {
        Ok(()) => Condition::yes("Accepted", "Accepted", "Route was valid"),
        Err((reason, message)) => Condition::no("Accepted", &reason, &message),
    };
    let resolved = match refs {
        None => Condition::yes("ResolvedRefs", "ResolvedRefs", "All references resolved"),
        Some((reason, message)) => Condition::no("ResolvedRefs", reason, message),
    };
    json!({
        "parentRef": parent_ref,
        "controllerName": CONTROLLER,
        "conditions": [accepted.json(), resolved.json()],
    })
}
