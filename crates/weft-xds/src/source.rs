//! Where an [`crate::AdsServer`] gets resources from.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::watch;

use crate::type_url::{resolves_aliases, resource_name};
use crate::vhds::VhostIndex;
use crate::XdsError;

/// Resources served by an [`crate::AdsServer`].
pub trait XdsSource: Send + Sync + 'static {
    /// Current resources of a type for this node: (version, resources by name).
    fn resources(&self, node: &Node, type_url: &str) -> (String, BTreeMap<String, Any>);
    /// A receiver that changes whenever any resource may have changed.
    fn changes(&self) -> watch::Receiver<u64>;
    /// The version [`XdsSource::resources`] would return now. A push to many streams
    /// asks it first and copies the resources only of types whose version moved, so a
    /// change of one type never costs every stream a copy of the others (a large EDS).
    ///
    /// The default calls [`XdsSource::resources`]; a source that can tell the version
    /// without copying overrides it.
    fn version(&self, node: &Node, type_url: &str) -> String {
        self.resources(node, type_url).0
    }
    /// Resolves subscribed names (delta, subscriptions by name): per requested name, the
    /// resource it names (its own name and body) or `None` when there is none, with the
    /// type's version. For most types a name resolves to the resource of that name; for
    /// VHDS ([`resolves_aliases`]) a `<route configuration>/<host>` alias resolves to the
    /// virtual host of that route configuration whose domains match the host.
    ///
    /// The default looks the names up in [`XdsSource::resources`]; a source with many
    /// resources overrides it to answer without copying them all.
    fn lookup(&self, node: &Node, type_url: &str, names: &BTreeSet<String>) -> (String, Resolved) {
        let (version, all) = self.resources(node, type_url);
        let index = resolves_aliases(type_url).then(|| VhostIndex::from_resources(&all));
        let resolved = names
            .iter()
            .map(|n| {
                let name = match &index {
                    Some(index) => index.resolve(n),
                    None => Some(n.as_str()),
                };
                let found = name.and_then(|name| all.get(name).map(|any| (name.to_string(), any.clone())));
                (n.clone(), found)
            })
            .collect();
        (version, resolved)
    }
    /// Every type of `node`'s resources as of now, for a stream to answer all its types
    /// from (one look-up per change and stream instead of one per type and request);
    /// `None`: the stream asks [`XdsSource::version`], [`XdsSource::resources`] and
    /// [`XdsSource::lookup`] per type.
    ///
    /// `memo` belongs to the stream and lives as long as it: a source keeps there what it
    /// derives from the node (its parsed metadata), so that work is done once per
    /// stream. The server takes a new snapshot whenever [`XdsSource::changes`] ticks.
    fn snapshot(&self, node: &Node, memo: &mut NodeMemo) -> Option<Arc<dyn XdsSnapshot>> {
        let _ = (node, memo);
        None
    }
}

/// Requested name -> the resource it resolves to (its name and body), if any.
pub type Resolved = BTreeMap<String, Option<(String, Any)>>;

/// What a source keeps per stream about the stream's node (see [`XdsSource::snapshot`]).
pub type NodeMemo = Option<Arc<dyn std::any::Any + Send + Sync>>;

/// One node's resources at one moment (see [`XdsSource::snapshot`]). Each method
/// answers `None` for a type the snapshot does not hold (the stream then asks the source).
pub trait XdsSnapshot: Send + Sync + 'static {
    /// The version of a type, as [`XdsSource::version`].
    fn version(&self, type_url: &str) -> Option<String>;
    /// All resources of a type, as [`XdsSource::resources`].
    fn resources(&self, type_url: &str) -> Option<(String, BTreeMap<String, Any>)>;
    /// Subscribed names resolved, as [`XdsSource::lookup`].
    fn lookup(&self, type_url: &str, names: &BTreeSet<String>) -> Option<(String, Resolved)>;
}

/// What a stream answers from: the source, the stream's node and, if the source gave
/// one, a snapshot of that node's resources.
pub(crate) struct Current<'a> {
    pub(crate) source: &'a dyn XdsSource,
    pub(crate) node: &'a Node,
    pub(crate) snapshot: Option<&'a dyn XdsSnapshot>,
}

impl Current<'_> {
    pub(crate) fn version(&self, type_url: &str) -> String {
        self.snapshot.and_then(|s| s.version(type_url)).unwrap_or_else(|| self.source.version(self.node, type_url))
    }

    pub(crate) fn resources(&self, type_url: &str) -> (String, BTreeMap<String, Any>) {
        self.snapshot.and_then(|s| s.resources(type_url)).unwrap_or_else(|| self.source.resources(self.node, type_url))
    }

    pub(crate) fn lookup(&self, type_url: &str, names: &BTreeSet<String>) -> (String, Resolved) {
        self.snapshot
            .and_then(|s| s.lookup(type_url, names))
            .unwrap_or_else(|| self.source.lookup(self.node, type_url, names))
    }
}

/// Same resources for every node, set by hand (tests, `weft up` bootstrap).
///
/// Each type has its own version: a counter, bumped by every change of that type and
/// returned as a decimal string. Types never set have version `"0"` and no resources.
#[derive(Clone)]
pub struct StaticSource {
    inner: Arc<Mutex<BTreeMap<String, TypeResources>>>,
    changes: Arc<watch::Sender<u64>>,
}

#[derive(Default)]
struct TypeResources {
    version: u64,
    resources: BTreeMap<String, Any>,
}

impl Default for StaticSource {
    fn default() -> Self {
        Self::new()
    }
}

impl StaticSource {
    /// An empty source.
    pub fn new() -> Self {
        StaticSource { inner: Arc::default(), changes: Arc::new(watch::channel(0).0) }
    }

    /// Replaces all resources of `type_url`. Fails (changing nothing) if a resource is
    /// of another type or has no decodable name.
    pub fn set(&self, type_url: &str, resources: Vec<Any>) -> Result<(), XdsError> {
        let mut named = BTreeMap::new();
        for any in resources {
            let name = resource_name(type_url, &any).map_err(XdsError::InvalidResource)?;
            named.insert(name, any);
        }
        self.update(type_url, |map| *map = named);
        Ok(())
    }

    /// Adds or replaces one resource of `type_url`.
    pub fn set_one(&self, type_url: &str, resource: Any) -> Result<(), XdsError> {
        let name = resource_name(type_url, &resource).map_err(XdsError::InvalidResource)?;
        self.update(type_url, |map| {
            map.insert(name, resource);
        });
        Ok(())
    }

    /// Removes one resource; returns whether it existed (the version bumps only then).
    pub fn remove(&self, type_url: &str, name: &str) -> bool {
        let exists = {
            let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            inner.get(type_url).is_some_and(|t| t.resources.contains_key(name))
        };
        if exists {
            self.update(type_url, |map| {
                map.remove(name);
            });
        }
        exists
    }

    /// Current version of a type.
    pub fn version(&self, type_url: &str) -> String {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.get(type_url).map_or(0, |t| t.version).to_string()
    }

    fn update(&self, type_url: &str, change: impl FnOnce(&mut BTreeMap<String, Any>)) {
        {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = inner.entry(type_url.to_string()).or_default();
            change(&mut entry.resources);
            entry.version += 1;
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl XdsSource for StaticSource {
    fn resources(&self, _node: &Node, type_url: &str) -> (String, BTreeMap<String, Any>) {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match inner.get(type_url) {
            Some(t) => (t.version.to_string(), t.resources.clone()),
            None => ("0".to_string(), BTreeMap::new()),
        }
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
