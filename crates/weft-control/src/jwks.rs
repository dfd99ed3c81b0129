//! The control plane's JWKS fetcher (Istio's istiod JWT key resolver): the `jwksUri`s of
//! RequestAuthentications are fetched here and inlined into the proxies' JWT filters,
//! so proxies (weft's or Envoy) need no route to the key server.
//!
//! A URI is fetched as soon as a resource names it, then every `refresh` interval
//! (Istio's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`, 20 minutes by default). A failed
//! fetch keeps the last good document; each change of the fetched set bumps
//! [`JwksResolver::changes`], which re-pushes the proxies.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

/// Istio's default refresh interval.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(20 * 60);
/// Timeout of one fetch (Istio's JWT rule default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted.
const MAX_BYTES: usize = 1 << 20;

/// Fetches and caches JWKS documents by URI.
pub struct JwksResolver {
    docs: ArcSwap<BTreeMap<String, String>>,
    wanted: Mutex<BTreeSet<String>>,
    wake: Arc<Notify>,
    changes: watch::Sender<u64>,
    timeout: Duration,
}

impl JwksResolver {
    /// A resolver refreshing every `refresh`; spawns its task (ends when dropped).
    pub fn start(refresh: Duration, timeout: Duration) -> Arc<JwksResolver> {
        let me = Arc::new(JwksResolver {
            docs: ArcSwap::from_pointee(BTreeMap::new()),
            wanted: Mutex::new(BTreeSet::new()),
            wake: Arc::new(Notify::new()),
            changes: watch::channel(0).0,
            timeout,
        });
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            loop {
                let Some(me) = weak.upgrade() else { return };
                me.fetch_all().await;
                let wake = me.wake.clone();
                drop(me);
                // Wake for a new URI, or refresh on the interval.
                let _ = tokio::time::timeout(refresh, wake.notified()).await;
            }
        });
        me
    }

    /// Declares the URIs in use; new ones are fetched now, forgotten ones dropped.
    pub fn want(&self, uris: BTreeSet<String>) {
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        if *wanted != uris {
            let new = uris.iter().any(|u| !wanted.contains(u));
            *wanted = uris;
            if new {
                self.wake.notify_one();
            }
        }
    }

    /// The documents fetched so far, by URI.
    pub fn snapshot(&self) -> Arc<BTreeMap<String, String>> {
        self.docs.load_full()
    }

    /// Bumped whenever [`JwksResolver::snapshot`] changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The version of the current snapshot.
    pub fn version(&self) -> u64 {
        *self.changes.borrow()
    }

    async fn fetch_all(&self) {
        let uris: Vec<String> = self.wanted.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        let old = self.docs.load_full();
        let mut docs = BTreeMap::new();
        for uri in uris {
            match tokio::time::timeout(self.timeout, fetch(&uri)).await {
                Ok(Ok(doc)) => {
                    debug!(%uri, "JWKS fetched");
                    docs.insert(uri, doc);
                }
                Ok(Err(e)) => {
                    warn!(%uri, error = %e, "JWKS fetch failed; keeping the last good keys, if any");
                    if let Some(d) = old.get(&uri) {
                        docs.insert(uri, d.clone());
                    }
                }
                Err(_) => {
                    warn!(%uri, "JWKS fetch timed out; keeping the last good keys, if any");
                    if let Some(d) = old.get(&uri) {
                        docs.insert(uri, d.clone());
                    }
                }
            }
        }
        if docs != *old {
            self.docs.store(Arc::new(docs));
            self.changes.send_modify(|v| *v += 1);
        }
    }
}

/// GETs `uri` (http://) and checks the body is a JWKS (`{"keys": [...]}`).
async fn fetch(uri: &str) -> Result<String, String> {
    let parsed: http::Uri = uri.parse().map_err(|_| format!("invalid URI {uri:?}"))?;
    if parsed.scheme_str() != Some("http") {
        return Err("only http:// JWKS URIs can be fetched by weft's control plane; use `jwks` inline".into());
    }
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = client.get(parsed).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_BYTES);
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    let text = String::from_utf8(bytes.to_vec()).map_err(|_| "the JWKS is not UTF-8".to_string())?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("the JWKS is not JSON: {e}"))?;
    if !v.get("keys").is_some_and(serde_json::Value::is_array) {
        return Err("the document has no `keys` list".into());
    }
    Ok(text)
}
