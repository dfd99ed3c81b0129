//! Alert notifications: each firing or resolved transition is POSTed as JSON to the
//! SLO's webhook and the control plane's `--alert-webhook`, by one background task
//! through a bounded queue (a full queue drops and counts), each POST with a timeout
//! and a few retries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Notifications waiting to be sent, at most.
const QUEUE: usize = 1024;
/// Timeout of one POST.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per URL (with 1 s, 2 s between them).
const ATTEMPTS: u32 = 3;

/// One notification and where it goes.
#[derive(Debug, Clone)]
pub struct Notification {
    /// `http://` URLs.
    pub urls: Vec<String>,
    /// The JSON body.
    pub body: Value,
}

/// What happened to notifications so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// POSTs answered 2xx.
    pub sent: u64,
    /// POSTs given up after the last attempt.
    pub failed: u64,
    /// Notifications dropped because the queue was full.
    pub dropped: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// The sending side; the task ends when it is dropped.
pub struct Notifier {
    tx: mpsc::Sender<Notification>,
    counters: Arc<Counters>,
}

impl Notifier {
    /// Starts the sending task (needs a Tokio runtime).
    pub fn start() -> Notifier {
        let (tx, mut rx) = mpsc::channel::<Notification>(QUEUE);
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        tokio::spawn(async move {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            while let Some(n) = rx.recv().await {
                let body = Bytes::from(n.body.to_string());
                for url in &n.urls {
                    if post(&client, url, body.clone()).await {
                        c.sent.fetch_add(1, Ordering::Relaxed);
                    } else {
                        c.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Notifier { tx, counters }
    }

    /// Queues `n`; drops it (counted) when the queue is full.
    pub fn send(&self, n: Notification) {
        if self.tx.try_send(n).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            warn!("alert notification dropped: the queue is full");
        }
    }

    /// Counts so far.
    pub fn counts(&self) -> Counts {
        Counts {
            sent: self.counters.sent.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
        }
    }
}

/// POSTs `body` to `url`, retrying; true once answered 2xx.
async fn post(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    body: Bytes,
) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        warn!(%url, "alert webhook is not a valid URI");
        return false;
    };
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
        }
        let req = http::Request::post(uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "weft-control")
            .body(Full::new(body.clone()));
        let Ok(req) = req else { return false };
        match tokio::time::timeout(TIMEOUT, client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => {
                debug!(%url, "alert notification sent");
                return true;
            }
            Ok(Ok(resp)) => warn!(%url, status = %resp.status(), attempt, "alert webhook refused the notification"),
            Ok(Err(e)) => warn!(%url, error = %e, attempt, "alert webhook unreachable"),
            Err(_) => warn!(%url, attempt, "alert webhook timed out"),
        }
    }
    false
}
