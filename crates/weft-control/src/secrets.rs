//! SDS: TLS secrets served over ADS with Istio's names, next to the mesh's other xDS.
//!
//! - `ROOTCA`: a validation context holding the CA's trust bundle (every root trusted
//!   now: during a root rotation, old and new). Served to every proxy; a weft proxy feeds
//!   it to its certificate manager, so a rotation needs no restart.
//! - `default`: the workload's certificate chain and private key, **only for Envoy nodes**
//!   (user agent `envoy`), which cannot send a CSR. The control plane generates that key:
//!   the documented trade-off of running stock Envoy as a data plane. It is issued only
//!   when the node's metadata carries a valid join token (`WEFT_JOIN_TOKEN`) and for the
//!   identity that token grants; renewed at half life, one key per node.
//! - `kubernetes://<name>`, `kubernetes://<ns>/<name>` and their `-cacert` CAs: the
//!   Kubernetes `Secret`s of a gateway's namespace, for `credentialName`, only to gateway
//!   proxies of that namespace ([`crate::credentials`]).
//!
//! [`SecretSource`] wraps the [`MeshXdsSource`]: Secret requests are answered here, every
//! other type by the mesh, and changes of either (or a due renewal) wake the xDS server.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource, Node};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, TlsCertificate,
};
use envoy_types::pb::google::protobuf::value::Kind;
use prost::Message as _;
use tokio::sync::watch;
use weft_identity::service::CertificateAuthority;
use weft_identity::SpiffeId;
use weft_xds::type_url::SECRET;
use weft_xds::{content_version, Any, XdsSource};

use crate::source::MeshXdsSource;

/// Name of the workload certificate secret (Istio's).
pub const DEFAULT_SECRET: &str = "default";
/// Name of the trust bundle secret (Istio's).
pub const ROOT_SECRET: &str = "ROOTCA";
/// Node metadata key carrying an Envoy's join token.
pub const JOIN_TOKEN_KEY: &str = "WEFT_JOIN_TOKEN";

/// A [`XdsSource`]: the mesh's resources plus SDS secrets.
pub struct SecretSource {
    mesh: Arc<MeshXdsSource>,
    authority: Arc<CertificateAuthority>,
    ttl: Duration,
    /// Envoy workload certificates by node id.
    envoy: Mutex<HashMap<String, EnvoyCert>>,
    /// Nodes already warned about (no or bad token), so pushes do not repeat it.
    warned: Mutex<HashSet<String>>,
    changes: watch::Sender<u64>,
}

struct EnvoyCert {
    identity: SpiffeId,
    secret: Any,
    renew_at: SystemTime,
    not_after: SystemTime,
}

impl SecretSource {
    /// Secrets from `authority` over `mesh`; Envoy certificates live `ttl`. Spawns the
    /// task that forwards changes and schedules renewals.
    pub fn new(mesh: Arc<MeshXdsSource>, authority: Arc<CertificateAuthority>, ttl: Duration) -> Arc<Self> {
        let me = Arc::new(SecretSource {
            mesh,
            authority,
            ttl,
            envoy: Mutex::new(HashMap::new()),
            warned: Mutex::new(HashSet::new()),
            changes: watch::channel(0).0,
        });
        let weak = Arc::downgrade(&me);
        let mut mesh_rx = me.mesh.changes();
        let mut ca_rx = me.authority.ca().changes();
        // Renewals are checked at a tenth of the TTL (between 250 ms and 30 s).
        let tick = (ttl / 10).clamp(Duration::from_millis(250), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            loop {
                let bump = tokio::select! {
                    r = mesh_rx.changed() => if r.is_err() { return } else { true },
                    r = ca_rx.changed() => if r.is_err() { return } else { true },
                    _ = interval.tick() => {
                        let Some(me) = weak.upgrade() else { return };
                        me.renewals_due()
                    }
                };
                let Some(me) = weak.upgrade() else { return };
                if bump {
                    me.changes.send_modify(|v| *v += 1);
                }
            }
        });
        me
    }

    /// The secrets `node` may have, by name.
    pub fn secrets(&self, node: &Node) -> BTreeMap<String, Any> {
        let mut out = BTreeMap::new();
        let bundle = self.authority.ca().trust_bundle_pem();
        let root = Secret {
            name: ROOT_SECRET.into(),
            r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: Some(inline(bundle.into_bytes())),
                ..Default::default()
            })),
        };
        out.insert(ROOT_SECRET.to_string(), pack(&root));
        if node.user_agent_name == "envoy" {
            if let Some(any) = self.envoy_certificate(node) {
                out.insert(DEFAULT_SECRET.to_string(), any);
            }
        }
        if let Ok(info) = weft_xds::NodeInfo::from_node(node) {
            if info.is_gateway() {
                let snap = self.mesh.store().snapshot();
                for (name, s) in crate::credentials::gateway_secrets(&snap.resources, &info.namespace) {
                    out.insert(name, pack(&s));
                }
            }
        }
        out
    }

    /// The `default` secret of an Envoy node: cached per node, re-issued at half life
    /// (or when its identity changes); `None` without a valid join token.
    fn envoy_certificate(&self, node: &Node) -> Option<Any> {
        let identity = match self.envoy_identity(node) {
            Ok(id) => id,
            Err(e) => {
                if self.warned.lock().unwrap_or_else(PoisonError::into_inner).insert(format!("{}|{e}", node.id)) {
                    tracing::warn!(node = %node.id, error = %e, "no workload certificate for this Envoy");
                }
                return None;
            }
        };
        let now = SystemTime::now();
        let mut certs = self.envoy.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = certs.get(&node.id) {
            if c.identity == identity && now < c.renew_at {
                return Some(c.secret.clone());
            }
        }
        let (key_pem, issued) = match self.authority.ca().issue_with_key(&identity, self.ttl) {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(node = %node.id, %identity, error = %e, "cannot issue an Envoy certificate");
                return None;
            }
        };
        // Envoy presents leaf and intermediates; the root comes from ROOTCA.
        let chain: String = std::iter::once(issued.leaf_pem.clone())
            .chain(issued.chain_pems.iter().take(issued.chain_pems.len().saturating_sub(1)).cloned())
            .collect();
        let secret = Secret {
            name: DEFAULT_SECRET.into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(inline(chain.into_bytes())),
                private_key: Some(inline(key_pem.into_bytes())),
                ..Default::default()
            })),
        };
        let any = pack(&secret);
        let life = issued.not_after.duration_since(now).unwrap_or_default();
        tracing::info!(node = %node.id, %identity, serial = %issued.serial, "Envoy workload certificate issued (key generated by the control plane)");
        certs.retain(|_, c| c.not_after > now);
        certs.insert(
            node.id.clone(),
            EnvoyCert { identity, secret: any.clone(), renew_at: now + life / 2, not_after: issued.not_after },
        );
        Some(any)
    }

    /// The identity an Envoy's join token grants.
    fn envoy_identity(&self, node: &Node) -> Result<SpiffeId, String> {
        let token = node
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(JOIN_TOKEN_KEY))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.as_str()),
                _ => None,
            })
            .ok_or_else(|| format!("node metadata has no {JOIN_TOKEN_KEY} (create one with `weft token create`)"))?;
        let grant = self.authority.tokens().verify(token).map_err(|e| e.to_string())?;
        grant.spiffe_id(self.authority.ca().trust_domain()).map_err(|e| e.to_string())
    }

    /// Whether a cached Envoy certificate reached its renewal time.
    fn renewals_due(&self) -> bool {
        let now = SystemTime::now();
        self.envoy.lock().unwrap_or_else(PoisonError::into_inner).values().any(|c| now >= c.renew_at)
    }
}

impl XdsSource for SecretSource {
    fn resources(&self, node: &Node, type_url: &str) -> (String, BTreeMap<String, Any>) {
        if type_url != SECRET {
            return self.mesh.resources(node, type_url);
        }
        let secrets = self.secrets(node);
        let digest: String = secrets.iter().map(|(n, a)| format!("{n}={};", content_version(a))).collect();
        let version = content_version(&Any { type_url: SECRET.to_string(), value: digest.into_bytes() });
        (version, secrets)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn version(&self, node: &Node, type_url: &str) -> String {
        if type_url != SECRET {
            return self.mesh.version(node, type_url);
        }
        self.resources(node, type_url).0
    }

    fn lookup(&self, node: &Node, type_url: &str, names: &BTreeSet<String>) -> (String, weft_xds::Resolved) {
        if type_url != SECRET {
            // By name from the mesh's cached translation, without copying the whole type.
            return self.mesh.lookup(node, type_url, names);
        }
        let (version, all) = self.resources(node, type_url);
        let resolved = names.iter().map(|n| (n.clone(), all.get(n).map(|any| (n.clone(), any.clone())))).collect();
        (version, resolved)
    }

    /// The mesh's snapshot for every type but SDS, which is still asked per request.
    fn snapshot(&self, node: &Node, memo: &mut weft_xds::NodeMemo) -> Option<Arc<dyn weft_xds::XdsSnapshot>> {
        let mesh = self.mesh.snapshot(node, memo)?;
        Some(Arc::new(WithoutSecrets(mesh)))
    }
}

/// A mesh snapshot that leaves SDS to [`SecretSource`].
struct WithoutSecrets(Arc<dyn weft_xds::XdsSnapshot>);

impl weft_xds::XdsSnapshot for WithoutSecrets {
    fn version(&self, type_url: &str) -> Option<String> {
        (type_url != SECRET).then(|| self.0.version(type_url)).flatten()
    }

    fn resources(&self, type_url: &str) -> Option<(String, BTreeMap<String, Any>)> {
        (type_url != SECRET).then(|| self.0.resources(type_url)).flatten()
    }

    fn lookup(&self, type_url: &str, names: &BTreeSet<String>) -> Option<(String, weft_xds::Resolved)> {
        (type_url != SECRET).then(|| self.0.lookup(type_url, names)).flatten()
    }
}

fn inline(bytes: Vec<u8>) -> DataSource {
    DataSource { specifier: Some(data_source::Specifier::InlineBytes(bytes)), ..Default::default() }
}

fn pack(secret: &Secret) -> Any {
    Any { type_url: SECRET.to_string(), value: secret.encode_to_vec() }
}
