//! Access log: one JSON line per request or TCP connection, with the fields of Envoy's
//! and Istio's default JSON format.
//!
//! [`AccessLog::log`] never blocks the data path: it serializes the record and hands
//! the line to a bounded channel; a background task writes it. When the writer falls
//! behind, lines are dropped and counted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// Lines buffered between the data path and the writer before lines are dropped.
pub const CHANNEL_CAPACITY: usize = 4096;

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// The process's standard output (Envoy's `/dev/stdout`, Istio's default).
    Stdout,
    /// Appended to a file, created if missing.
    File(PathBuf),
    /// Logging disabled.
    Off,
}

/// Which side of the mesh wrote a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The client-side proxy (`reporter: source`).
    Outbound,
    /// The server-side proxy (`reporter: destination`).
    Inbound,
}

/// What the core knows about one finished request or TCP connection. `None` fields are
/// written as JSON `null`, as Envoy does for missing values.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    /// When the request (or connection) started.
    pub start_time: SystemTime,
    /// HTTP method; `None` for TCP.
    pub method: Option<String>,
    /// Original path with query; `None` for TCP.
    pub path: Option<String>,
    /// `HTTP/1.1`, `HTTP/2` or `TCP`.
    pub protocol: String,
    /// Response status; 0 when none was sent (TCP, or the request failed before).
    pub response_code: u16,
    /// Envoy response flags, `"-"` when none.
    pub response_flags: String,
    /// Why the response code was chosen (Envoy's `response_code_details`).
    pub response_code_details: Option<String>,
    /// Body bytes received from the downstream.
    pub bytes_received: u64,
    /// Body bytes sent to the downstream.
    pub bytes_sent: u64,
    /// Total time from start to the last byte sent.
    pub duration: Duration,
    /// Time the upstream took to answer (headers received), if there was one.
    pub upstream_service_time: Option<Duration>,
    /// `x-forwarded-for` request header.
    pub x_forwarded_for: Option<String>,
    /// `user-agent` request header.
    pub user_agent: Option<String>,
    /// `x-request-id` request header.
    pub request_id: Option<String>,
    /// `:authority` / `host`.
    pub authority: Option<String>,
    /// Address of the upstream endpoint used.
    pub upstream_host: Option<SocketAddr>,
    /// Name of the upstream cluster.
    pub upstream_cluster: Option<String>,
    /// Name of the matched route.
    pub route_name: Option<String>,
    /// Peer address of the downstream connection.
    pub downstream_remote_address: Option<SocketAddr>,
    /// Local address of the downstream connection.
    pub downstream_local_address: Option<SocketAddr>,
    /// TLS SNI requested by the downstream.
    pub requested_server_name: Option<String>,
    /// Which proxy wrote the record.
    pub direction: Direction,
    /// Why the connection was terminated, when the proxy terminated it.
    pub connection_termination_details: Option<String>,
    /// Why connecting or TLS to the upstream failed.
    pub upstream_transport_failure_reason: Option<String>,
    /// The RBAC filters' dynamic metadata (`shadow_engine_result`, ...,
    /// `access_log_hint`), written as the object `rbac` when not empty.
    pub rbac: Vec<crate::rbac::MetadataEntry>,
}

/// Errors creating an access log.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    /// The log file could not be opened for appending.
    #[error("cannot open access log file {path}: {source}; check the directory exists and is writable")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A non-blocking access log. Cheap to clone; all clones feed the same writer.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<Msg>>,
    drops: Arc<Drops>,
}

/// Dropped-line accounting shared by the loggers and the writer task.
#[derive(Debug, Default)]
struct Drops {
    count: AtomicU64,
    metric: OnceLock<Counter>,
}

#[derive(Debug)]
enum Msg {
    Line(String),
    Flush(oneshot::Sender<()>),
}

#[derive(Serialize)]
struct Line<'a> {
    start_time: String,
    method: Option<&'a str>,
    path: Option<&'a str>,
    protocol: &'a str,
    response_code: u16,
    response_flags: &'a str,
    response_code_details: Option<&'a str>,
    connection_termination_details: Option<&'a str>,
    upstream_transport_failure_reason: Option<&'a str>,
    bytes_received: u64,
    bytes_sent: u64,
    duration: u64,
    upstream_service_time: Option<u64>,
    x_forwarded_for: Option<&'a str>,
    user_agent: Option<&'a str>,
    request_id: Option<&'a str>,
    authority: Option<&'a str>,
    upstream_host: Option<String>,
    upstream_cluster: Option<&'a str>,
    route_name: Option<&'a str>,
    downstream_remote_address: Option<String>,
    downstream_local_address: Option<String>,
    requested_server_name: Option<&'a str>,
    direction: &'static str,
    reporter: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rbac: Option<std::collections::BTreeMap<&'a str, &'a str>>,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    fn reporter(self) -> &'static str {
        match self {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        }
    }
}

impl AccessLog {
    /// Opens the sink and starts the writer task. Must be called inside a Tokio runtime
    /// unless `sink` is [`Sink::Off`].
    pub fn new(sink: Sink) -> Result<Self, AccessLogError> {
        Self::with_capacity(sink, CHANNEL_CAPACITY)
    }

    /// Like [`AccessLog::new`] with a chosen channel capacity (at least 1).
    pub fn with_capacity(sink: Sink, capacity: usize) -> Result<Self, AccessLogError> {
        let drops = Arc::new(Drops::default());
        let out: Box<dyn AsyncWrite + Send + Unpin> = match sink {
            Sink::Off => {
                return Ok(Self { tx: None, drops });
            }
            Sink::Stdout => Box::new(tokio::io::stdout()),
            Sink::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|source| AccessLogError::Open { path, source })?;
                Box::new(tokio::fs::File::from_std(file))
            }
        };
        let (tx, rx) = mpsc::channel(capacity.max(1));
        tokio::spawn(write_lines(rx, out, drops.clone()));
        Ok(Self { tx: Some(tx), drops })
    }

    /// Also counts dropped lines (from now on) in `counter`, e.g.
    /// [`super::ProxyHealth::access_log_dropped`]. Only the first counter given is used.
    pub fn count_drops_in(self, counter: Counter) -> Self {
        let _ = self.drops.metric.set(counter);
        self
    }

    /// True when lines go somewhere (not `off`): callers skip building records otherwise.
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one record; never waits. Drops (and counts) the line if the writer is
    /// behind or gone.
    pub fn log(&self, record: &AccessRecord) {
        let Some(tx) = &self.tx else { return };
        let line = match to_json_line(record) {
            Ok(line) => line,
            Err(e) => {
                tracing::warn!(error = %e, "access log record not serializable");
                self.drops.add();
                return;
            }
        };
        if tx.try_send(Msg::Line(line)).is_err() {
            self.drops.add();
        }
    }

    /// Waits until every line queued before this call is written and flushed.
    pub async fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (ack, done) = oneshot::channel();
        if tx.send(Msg::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.drops.count.load(Ordering::Relaxed)
    }
}

impl Drops {
    fn add(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = self.metric.get() {
            c.inc();
        }
    }
}

/// Serializes one record as a JSON line (with the trailing newline).
pub fn to_json_line(r: &AccessRecord) -> Result<String, serde_json::Error> {
    let line = Line {
        start_time: rfc3339_millis(r.start_time),
        method: r.method.as_deref(),
        path: r.path.as_deref(),
        protocol: &r.protocol,
        response_code: r.response_code,
        response_flags: &r.response_flags,
        response_code_details: r.response_code_details.as_deref(),
        connection_termination_details: r.connection_termination_details.as_deref(),
        upstream_transport_failure_reason: r.upstream_transport_failure_reason.as_deref(),
        bytes_received: r.bytes_received,
        bytes_sent: r.bytes_sent,
        duration: millis(r.duration),
        upstream_service_time: r.upstream_service_time.map(millis),
        x_forwarded_for: r.x_forwarded_for.as_deref(),
        user_agent: r.user_agent.as_deref(),
        request_id: r.request_id.as_deref(),
        authority: r.authority.as_deref(),
        upstream_host: r.upstream_host.map(|a| a.to_string()),
        upstream_cluster: r.upstream_cluster.as_deref(),
        route_name: r.route_name.as_deref(),
        downstream_remote_address: r.downstream_remote_address.map(|a| a.to_string()),
        downstream_local_address: r.downstream_local_address.map(|a| a.to_string()),
        requested_server_name: r.requested_server_name.as_deref(),
        direction: r.direction.as_str(),
        reporter: r.direction.reporter(),
        rbac: (!r.rbac.is_empty()).then(|| r.rbac.iter().map(|(k, v)| (&**k, &**v)).collect()),
    };
    let mut s = serde_json::to_string(&line)?;
    s.push('\n');
    Ok(s)
}

/// Formats a time as RFC 3339 UTC with milliseconds, e.g. `2024-05-01T12:00:00.123Z`.
/// Times before the Unix epoch are clamped to it.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let ms = since.subsec_millis();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`, for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Writes queued lines in batches: everything already queued is gathered into one buffer
/// and written with one `write_all` + flush. A failed batch is counted as dropped and
/// discarded, so a broken sink neither grows memory nor stalls the data path.
async fn write_lines(mut rx: mpsc::Receiver<Msg>, mut out: Box<dyn AsyncWrite + Send + Unpin>, drops: Arc<Drops>) {
    let mut warned = false;
    let mut batch: Vec<u8> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut acks = Vec::new();
        let mut lines = 0u64;
        while let Some(msg) = next {
            match msg {
                Msg::Line(line) => {
                    batch.extend_from_slice(line.as_bytes());
                    lines += 1;
                }
                Msg::Flush(ack) => acks.push(ack),
            }
            next = rx.try_recv().ok();
        }
        if lines > 0 {
            let written = match out.write_all(&batch).await {
                Ok(()) => out.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                if !warned {
                    tracing::warn!(error = %e, "access log write failed; dropping lines");
                    warned = true;
                }
                for _ in 0..lines {
                    drops.add();
                }
            }
            batch.clear();
            // Do not keep a huge buffer around after a burst.
            batch.shrink_to(64 * 1024);
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
}

#[cfg(test)]
mod tests;
