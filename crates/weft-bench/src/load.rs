//! The load generator: open-loop at a fixed rate with coordinated-omission correction
//! (HTTP/1.1 and gRPC unary over h2c), and closed-loop maximum throughput.
//!
//! Open loop: the rate is split over the connections; request `k` of connection `i` is
//! *intended* at `start + (k * conns + i) / rps`. Its latency runs from the intended time
//! whenever the connection was still busy then (the wait for the previous answer is the
//! system's doing: that is the correction), and from the actual send otherwise (so the
//! generator's timer resolution is not charged to the system). HTTP/1.1 carries one request
//! at a time per connection; gRPC calls are multiplexed, each sent at its intended time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpStream;

use crate::echo::BODY_LEN;

/// What to send where.
#[derive(Clone, Debug)]
pub struct Target {
    /// Where the load generator connects.
    pub addr: SocketAddr,
    /// The URI of every request (absolute form: `http://echo:9080/`).
    pub uri: http::Uri,
}

/// Latency summary of one measured run, in microseconds.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// The outcome of one run.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct RunResult {
    /// Requests answered correctly (200 / grpc-status 0 with the 1 KiB body) in the window.
    pub ok: u64,
    /// Failed requests (connection errors, other statuses, short bodies) in the window.
    pub errors: u64,
    /// Length of the measured window.
    pub seconds: f64,
    /// Achieved rate of correct answers.
    pub rps: f64,
    pub latency_us: Latency,
}

struct Tally {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Tally {
        Tally { hist: latency_histogram(), ok: 0, errors: 0, first_error: None }
    }

    fn record(&mut self, outcome: Result<Duration, String>) {
        match outcome {
            Ok(d) => {
                self.ok += 1;
                let _ = self.hist.record((d.as_nanos() as u64).max(1));
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.hist.add(&other.hist);
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn result(self, seconds: f64) -> anyhow::Result<RunResult> {
        let us = |ns: u64| ns as f64 / 1000.0;
        let h = &self.hist;
        anyhow::ensure!(
            self.ok > 0,
            "no request succeeded ({} errors; first: {})",
            self.errors,
            self.first_error.unwrap_or_default()
        );
        // More than 0.1% failures means the scenario is broken, not slow.
        anyhow::ensure!(
            self.errors * 1000 <= self.ok + self.errors,
            "{} of {} requests failed (first: {})",
            self.errors,
            self.ok + self.errors,
            self.first_error.unwrap_or_default()
        );
        Ok(RunResult {
            ok: self.ok,
            errors: self.errors,
            seconds,
            rps: self.ok as f64 / seconds,
            latency_us: Latency {
                p50: us(h.value_at_quantile(0.5)),
                p90: us(h.value_at_quantile(0.9)),
                p99: us(h.value_at_quantile(0.99)),
                p999: us(h.value_at_quantile(0.999)),
                max: us(h.max()),
                mean: h.mean() / 1000.0,
            },
        })
    }
}

/// A latency histogram in nanoseconds: 1 ns to 60 s at 3 significant digits.
pub(crate) fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant, valid histogram bounds")
}

/// Runs `f` on a thread of its own with a single-threaded runtime (the load generator
/// must not share worker threads with anything else in this process).
pub(crate) async fn on_own_thread<T: Send + 'static>(
    f: impl FnOnce() -> futures::future::BoxFuture<'static, anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(f()));
        let _ = tx.send(result);
    });
    rx.await.map_err(|_| anyhow::anyhow!("load generator thread panicked"))?
}

pub(crate) async fn h1_connect(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn h1_request(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    uri: &http::Uri,
) -> Result<(), String> {
    let req = Request::get(uri.clone()).body(Empty::new()).map_err(|e| e.to_string())?;
    sender.ready().await.map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    if status != StatusCode::OK || body.len() != BODY_LEN {
        return Err(format!("status {status}, {} body bytes: {}", body.len(), String::from_utf8_lossy(&body)));
    }
    Ok(())
}

/// HTTP/1.1 open loop at `rps` over `conns` connections for `duration`.
pub async fn h1_fixed_rate(target: &Target, rps: u32, conns: usize, duration: Duration) -> anyhow::Result<RunResult> {
    let target = target.clone();
    on_own_thread(move || {
        Box::pin(async move {
            let mut senders = Vec::with_capacity(conns);
            for _ in 0..conns {
                senders.push(h1_connect(target.addr).await?);
            }
            let period = Duration::from_secs_f64(conns as f64 / f64::from(rps));
            let start = Instant::now() + Duration::from_millis(10);
            let end = start + duration;
            let mut tasks = tokio::task::JoinSet::new();
            for (i, mut sender) in senders.into_iter().enumerate() {
                let uri = target.uri.clone();
                let offset = period.mul_f64(i as f64 / conns as f64);
                let addr = target.addr;
                tasks.spawn(async move {
                    let mut tally = Tally::new();
                    let mut busy_until = start;
                    for k in 0u32.. {
                        let intended = start + offset + period * k;
                        if intended >= end {
                            break;
                        }
                        tokio::time::sleep_until(intended.into()).await;
                        let sent = Instant::now();
                        let from = if busy_until > intended { intended } else { sent };
                        let outcome = h1_request(&mut sender, &uri).await;
                        let done = Instant::now();
                        busy_until = done;
                        if outcome.is_err() {
                            if let Ok(s) = h1_connect(addr).await {
                                sender = s;
                            }
                        }
                        tally.record(outcome.map(|()| done - from));
                    }
                    tally
                });
            }
            let mut all = Tally::new();
            while let Some(t) = tasks.join_next().await {
                all.merge(t?);
            }
            all.result(duration.as_secs_f64())
        })
    })
    .await
}

/// HTTP/1.1 closed loop: `conns` connections each sending the next request as soon as
/// the previous answer is in, for `duration`.
pub async fn h1_max(target: &Target, conns: usize, duration: Duration) -> anyhow::Result<RunResult> {
    let target = target.clone();
    on_own_thread(move || {
        Box::pin(async move {
            let mut senders = Vec::with_capacity(conns);
            for _ in 0..conns {
                senders.push(h1_connect(target.addr).await?);
            }
            let start = Instant::now();
            let end = start + duration;
            let mut tasks = tokio::task::JoinSet::new();
            for mut sender in senders {
                let uri = target.uri.clone();
                let addr = target.addr;
                tasks.spawn(async move {
                    let mut tally = Tally::new();
                    while Instant::now() < end {
                        let sent = Instant::now();
                        let outcome = h1_request(&mut sender, &uri).await;
                        if outcome.is_err() {
                            if let Ok(s) = h1_connect(addr).await {
                                sender = s;
                            }
                        }
                        tally.record(outcome.map(|()| sent.elapsed()));
                    }
                    tally
                });
            }
            let mut all = Tally::new();
            while let Some(t) = tasks.join_next().await {
                all.merge(t?);
            }
            all.result(start.elapsed().as_secs_f64())
        })
    })
    .await
}

type GrpcSender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

async fn h2_connect(addr: SocketAddr) -> anyhow::Result<GrpcSender> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// The request message of every call: 16 bytes.
fn grpc_request() -> Bytes {
    let mut b = BytesMut::with_capacity(5 + 16);
    b.put_u8(0);
    b.put_u32(16);
    b.put_slice(&[b'q'; 16]);
    b.freeze()
}

async fn grpc_call(mut sender: GrpcSender, uri: http::Uri, message: Bytes) -> Result<(), String> {
    let req = Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(message))
        .map_err(|e| e.to_string())?;
    sender.ready().await.map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let collected = resp.into_body().collect().await.map_err(|e| e.to_string())?;
    let grpc_status = collected.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.as_bytes().to_vec());
    let body = collected.to_bytes();
    if status != StatusCode::OK || grpc_status.as_deref() != Some(b"0") || body.len() != 5 + BODY_LEN {
        return Err(format!(
            "status {status}, grpc-status {:?}, {} body bytes",
            grpc_status.map(|s| String::from_utf8_lossy(&s).to_string()),
            body.len()
        ));
    }
    Ok(())
}

/// gRPC unary (HTTP/2) open loop at `rps` over `conns` connections for `duration`.
pub async fn grpc_fixed_rate(target: &Target, rps: u32, conns: usize, duration: Duration) -> anyhow::Result<RunResult> {
    let target = target.clone();
    on_own_thread(move || {
        Box::pin(async move {
            let mut senders = Vec::with_capacity(conns);
            for _ in 0..conns {
                senders.push(h2_connect(target.addr).await?);
            }
            let message = grpc_request();
            let period = Duration::from_secs_f64(1.0 / f64::from(rps));
            let start = Instant::now() + Duration::from_millis(10);
            let end = start + duration;
            let mut calls = tokio::task::JoinSet::new();
            let mut tally = Tally::new();
            for k in 0u32.. {
                let intended = start + period * k;
                if intended >= end {
                    break;
                }
                tokio::time::sleep_until(intended.into()).await;
                while let Some(done) = calls.try_join_next() {
                    tally.record(done?);
                }
                let sender = senders[k as usize % conns].clone();
                let (uri, message) = (target.uri.clone(), message.clone());
                calls.spawn(async move {
                    let sent = Instant::now();
                    grpc_call(sender, uri, message).await.map(|()| sent.elapsed())
                });
            }
            while let Some(done) = calls.join_next().await {
                tally.record(done?);
            }
            tally.result(duration.as_secs_f64())
        })
    })
    .await
}

/// Plain GETs over HTTP/2 (h2c) closed loop: `conns` connections, each with one request
/// in flight at a time (h2load's `-m 1`), until `stop` flips true. Returns the tally of
/// the whole run.
pub async fn h2_until(
    target: &Target,
    conns: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<RunResult> {
    closed_loop_until(target, conns, stop, true).await
}

/// HTTP/1.1 closed loop over `conns` connections until `stop` flips true.
pub async fn h1_until(
    target: &Target,
    conns: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<RunResult> {
    closed_loop_until(target, conns, stop, false).await
}

async fn closed_loop_until(
    target: &Target,
    conns: usize,
    stop: tokio::sync::watch::Receiver<bool>,
    h2: bool,
) -> anyhow::Result<RunResult> {
    let target = target.clone();
    on_own_thread(move || {
        Box::pin(async move {
            let start = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..conns {
                let (uri, addr, stop) = (target.uri.clone(), target.addr, stop.clone());
                tasks.spawn(async move {
                    let mut tally = Tally::new();
                    let mut conn: Option<GetSender> = None;
                    while !*stop.borrow() {
                        let sender = match conn.as_mut() {
                            Some(s) => s,
                            None => match GetSender::connect(addr, h2).await {
                                Ok(s) => conn.insert(s),
                                Err(e) => {
                                    tally.record(Err(e.to_string()));
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                    continue;
                                }
                            },
                        };
                        let sent = Instant::now();
                        let outcome = sender.get(&uri).await;
                        if outcome.is_err() {
                            conn = None;
                        }
                        tally.record(outcome.map(|()| sent.elapsed()));
                    }
                    tally
                });
            }
            let mut all = Tally::new();
            while let Some(t) = tasks.join_next().await {
                all.merge(t?);
            }
            all.result(start.elapsed().as_secs_f64())
        })
    })
    .await
}

/// One load-generator connection for plain GETs, HTTP/1.1 or h2c.
enum GetSender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl GetSender {
    async fn connect(addr: SocketAddr, h2: bool) -> anyhow::Result<GetSender> {
        if !h2 {
            return Ok(GetSender::H1(h1_connect(addr).await?));
        }
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(GetSender::H2(sender))
    }

    async fn get(&mut self, uri: &http::Uri) -> Result<(), String> {
        let resp = match self {
            GetSender::H1(s) => return h1_request(s, uri).await,
            GetSender::H2(s) => {
                let req = Request::get(uri.clone()).body(Empty::new()).map_err(|e| e.to_string())?;
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await.map_err(|e| e.to_string())?
            }
        };
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        if status != StatusCode::OK || body.len() != BODY_LEN {
            return Err(format!("status {status}, {} body bytes: {}", body.len(), String::from_utf8_lossy(&body)));
        }
        Ok(())
    }
}
