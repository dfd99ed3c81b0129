//! What the SotW and delta streams share: registering the peer, the loop over requests
//! and source changes, type URL checks, nonces, recording ACKs and NACKs, sending and
//! reporting responses. A [`Variant`] supplies only what differs: how a request changes
//! a type's subscription and which response brings the peer up to date.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};

use super::{NackInfo, Registration, Shared};
use crate::source::{Current, NodeMemo, XdsSnapshot};
use crate::XdsMode;

/// One ADS variant (state of the world or delta): its messages, its per-type state, and
/// the two decisions that differ between variants.
pub(super) trait Variant: Send + 'static {
    /// Request message.
    type Request: prost::Message + Default + Send + 'static;
    /// Response message.
    type Response: Send + 'static;
    /// Per-type state of one stream.
    type State: Default + Send;
    /// The variant, as connections report it.
    const MODE: XdsMode;

    /// The node a (first) request carries.
    fn node(request: &Self::Request) -> Option<Node>;
    /// The type URL a request is about.
    fn type_url(request: &Self::Request) -> &str;
    /// Applies a request to the state of its type (`new`: the first request of this type
    /// on the stream): its subscription change and the ACK or NACK it carries.
    fn receive(state: &mut Self::State, type_url: &str, request: Self::Request, new: bool) -> Received;
    /// The response, numbered `nonce`, that brings the peer up to date with `source`,
    /// with its version; `None` when there is nothing to send now. Records what it sends
    /// in `state`.
    fn respond(
        state: &mut Self::State,
        source: &Current<'_>,
        type_url: &str,
        nonce: u64,
    ) -> Option<(Self::Response, String)>;
}

/// What a request said, as far as the shared bookkeeping cares.
pub(super) struct Received {
    /// The ACK or NACK it carries for a response this stream sent.
    pub(super) reply: Option<Reply>,
    /// Whether to answer it (false for a stale request: the peer will answer the latest
    /// response first).
    pub(super) push: bool,
}

/// An ACK or NACK of one response.
pub(super) struct Reply {
    /// Nonce of the response it answers.
    pub(super) nonce: String,
    /// Version of the response it answers.
    pub(super) sent_version: String,
    /// Version the peer says it runs (recorded on an ACK).
    pub(super) acked_version: String,
    /// The peer's error: a NACK.
    pub(super) error: Option<envoy_types::pb::google::rpc::Status>,
}

/// One open stream: per-type state, and what answering needs.
struct Stream<V: Variant> {
    /// Per subscribed type URL (in URL order: clusters, endpoints, listeners, routes).
    types: BTreeMap<String, Subscription<V::State>>,
    link: Link<V>,
}

/// One subscribed type of a stream.
#[derive(Default)]
struct Subscription<S> {
    /// The variant's state of the type.
    state: S,
    /// The snapshot's version last recorded in the connection's status
    /// (`TypeStatus::current_version`), so an unchanged one costs no status update.
    recorded: Option<String>,
}

/// What a stream answers with: the peer's registration, the source's resources for it
/// and the response channel.
struct Link<V: Variant> {
    registration: Registration,
    tx: mpsc::Sender<Result<V::Response, Status>>,
    nonce: u64,
    /// The source's change counter (what [`Link::snapshot`] is current with).
    changes: watch::Receiver<u64>,
    /// What the source derived from this stream's node (see `XdsSource::snapshot`).
    memo: NodeMemo,
    /// The node's resources as of a value of `changes`: every type of a push, and the
    /// requests answered until the next change, are served from one look-up.
    snapshot: Option<(u64, Option<Arc<dyn XdsSnapshot>>)>,
}

impl<V: Variant> Stream<V> {
    /// Handles one request (subscription change, ACK or NACK) and answers it if needed.
    async fn on_request(&mut self, request: V::Request) -> Result<(), Status> {
        let type_url = V::type_url(&request).to_string();
        if type_url.is_empty() {
            return Err(Status::invalid_argument("xDS request without a type_url"));
        }
        let new = !self.types.contains_key(&type_url);
        if new {
            self.types.insert(type_url.clone(), Subscription::default());
        }
        let Some(subscription) = self.types.get_mut(&type_url) else {
            return Ok(());
        };
        let received = V::receive(&mut subscription.state, &type_url, request, new);
        if let Some(reply) = received.reply {
            record_reply(&self.link.registration, &type_url, reply);
        }
        if received.push {
            self.link.push(&type_url, subscription, None).await
        } else {
            Ok(())
        }
    }

    /// Re-sends, per subscribed type, what changed at the source (seen at `changed_at`).
    async fn push_all(&mut self, changed_at: Instant) -> Result<(), Status> {
        // In place: no copy of the type URLs, no look-up per type.
        for (type_url, subscription) in self.types.iter_mut() {
            self.link.push(type_url, subscription, Some(changed_at)).await?;
        }
        Ok(())
    }
}

impl<V: Variant> Link<V> {
    /// Sends the response the variant says a type needs, if any, and reports it (to
    /// the connection's status and the server's observer; `changed_at`: when the source
    /// change that called for it was seen, for the convergence time).
    async fn push(
        &mut self,
        type_url: &str,
        subscription: &mut Subscription<V::State>,
        changed_at: Option<Instant>,
    ) -> Result<(), Status> {
        let started = Instant::now();
        let registration = &self.registration;
        let source = registration.shared.source.as_ref();
        let generation = *self.changes.borrow();
        if self.snapshot.as_ref().is_none_or(|(g, _)| *g != generation) {
            self.snapshot = Some((generation, source.snapshot(&registration.node, &mut self.memo)));
        }
        let snapshot = self.snapshot.as_ref().and_then(|(_, s)| s.as_deref());
        // What the proxy should run now, recorded for `TypeStatus::current_version` when
        // it moved (from the snapshot only: a source without one may copy every resource
        // to tell its version, and the variant asks for it again).
        let looked = snapshot.and_then(|s| s.version(type_url)).filter(|v| subscription.recorded.as_ref() != Some(v));
        let current = Current { source, node: &registration.node, snapshot };
        let nonce = self.nonce + 1;
        let Some((response, version)) = V::respond(&mut subscription.state, &current, type_url, nonce) else {
            if let Some(looked) = looked {
                subscription.recorded = Some(looked.clone());
                self.registration.update(type_url, |t| t.current_version = Some(looked));
            }
            return Ok(());
        };
        self.nonce = nonce;
        self.tx.send(Ok(response)).await.map_err(|_| Status::cancelled("peer went away"))?;
        let sent = Instant::now();
        self.registration.shared.observer.pushed(
            type_url,
            sent.duration_since(started),
            changed_at.map(|at| sent.duration_since(at)),
        );
        if looked.is_some() {
            subscription.recorded.clone_from(&looked);
        }
        self.registration.update(type_url, |t| {
            t.sent_version = Some(version);
            t.sent_nonce = Some(nonce.to_string());
            if looked.is_some() {
                t.current_version = looked;
            }
        });
        Ok(())
    }
}

/// Runs one stream until the peer leaves, the server stops or a request is invalid:
/// register the peer from its first request, then serve requests and source changes.
pub(super) async fn drive<V: Variant>(
    shared: Arc<Shared>,
    caller: super::Caller,
    mut requests: Streaming<V::Request>,
    tx: mpsc::Sender<Result<V::Response, Status>>,
) {
    let changes = shared.source.changes();
    let mut stop = shared.stop.subscribe();
    let first = tokio::select! {
        first = requests.message() => first,
        () = stopped(&mut stop) => return,
    };
    let first = match first {
        Ok(Some(first)) => first,
        Ok(None) | Err(_) => return,
    };
    let node = V::node(&first);
    let mut peer = caller.remote_addr;
    if let (Some(admission), Some(n)) = (&shared.admission, &node) {
        match admission.admit(n, &caller).await {
            Ok(addr) => peer = addr.or(peer),
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
    }
    let registration = match Registration::new(shared, node, peer, V::MODE) {
        Ok(r) => r,
        Err(status) => {
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
    let link = Link::<V> { registration, tx, nonce: 0, changes, memo: None, snapshot: None };
    let mut stream = Stream::<V> { types: BTreeMap::new(), link };
    if stream.on_request(first).await.is_err() {
        return;
    }
    let mut source_open = true;
    loop {
        let result = tokio::select! {
            request = requests.message() => match request {
                Ok(Some(request)) => stream.on_request(request).await,
                Ok(None) | Err(_) => return,
            },
            changed = stream.link.changes.changed(), if source_open => {
                source_open = changed.is_ok();
                stream.push_all(Instant::now()).await
            }
            () = stopped(&mut stop) => return,
        };
        if let Err(status) = result {
            let _ = stream.link.tx.send(Err(status)).await;
            return;
        }
    }
}

/// Registers an ACK or NACK of one response.
fn record_reply(registration: &Registration, type_url: &str, reply: Reply) {
    match reply.error {
        Some(status) => {
            tracing::warn!(node = %registration.node.id, type_url, nonce = %reply.nonce, error = %status.message, "NACK");
            registration.shared.observer.rejected(type_url);
            registration.update(type_url, |t| {
                t.last_nack = Some(NackInfo { version: reply.sent_version, nonce: reply.nonce, error: status.message });
            });
        }
        None => registration.update(type_url, |t| {
            t.acked_version = Some(reply.acked_version);
            t.acked_at = Some(SystemTime::now());
        }),
    }
}

/// Resolves once the server is stopping.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the server is gone: stop too.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}
