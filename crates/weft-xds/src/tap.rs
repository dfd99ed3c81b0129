//! The tap stream between a proxy and the control plane (`weft tap`): the proxy dials
//! the control plane's xDS port and opens `weft.tap.v1.TapService/Stream`, a
//! bidirectional stream on which the control plane sends tap commands (start with a
//! filter, stop) and the proxy sends the events of matching requests. No port is opened
//! on the proxy.
//!
//! The first update of a stream names the proxy (`node_id`, as in its xDS `Node`); the
//! stream carries the same credential as the proxy's xDS stream (its client certificate
//! on the TLS port, or `authorization` metadata), which the control plane checks against
//! that node's admitted xDS stream. Events carry no header values.
//!
//! The messages and the tonic service are written by hand (no protobuf compiler at build
//! time), like the certificate service.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// gRPC service name.
pub const SERVICE_NAME: &str = "weft.tap.v1.TapService";
/// Path of the one (bidirectional streaming) method.
pub const STREAM_PATH: &str = "/weft.tap.v1.TapService/Stream";

/// Which requests a tap wants. Empty strings and 0 match everything.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct TapFilter {
    /// Path prefix (`:path` starts with it).
    #[prost(string, tag = "1")]
    pub path_prefix: String,
    /// Method, exactly (`GET`).
    #[prost(string, tag = "2")]
    pub method: String,
    /// Authority, exactly (`reviews:9080`).
    #[prost(string, tag = "3")]
    pub authority: String,
    /// Response status, exactly.
    #[prost(uint32, tag = "4")]
    pub status: u32,
    /// `inbound` or `outbound`.
    #[prost(string, tag = "5")]
    pub direction: String,
}

/// Control plane -> proxy: start (a filter) or stop tap `tap_id`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TapCommand {
    /// The tap, unique on this control plane.
    #[prost(uint64, tag = "1")]
    pub tap_id: u64,
    /// Start with this filter (absent: stop).
    #[prost(message, optional, tag = "2")]
    pub start: Option<TapFilter>,
}

/// One side of a tapped hop.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct TapPeer {
    /// Workload (`unknown` when not known).
    #[prost(string, tag = "1")]
    pub workload: String,
    /// Namespace.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// SPIFFE id proven by mTLS (`unknown` without).
    #[prost(string, tag = "3")]
    pub principal: String,
}

/// One finished request a tap matched. Never header values.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TapEvent {
    /// The tap it matched.
    #[prost(uint64, tag = "1")]
    pub tap_id: u64,
    /// `inbound` or `outbound`.
    #[prost(string, tag = "2")]
    pub direction: String,
    /// Source workload.
    #[prost(message, optional, tag = "3")]
    pub source: Option<TapPeer>,
    /// Destination workload.
    #[prost(message, optional, tag = "4")]
    pub destination: Option<TapPeer>,
    /// Destination service host.
    #[prost(string, tag = "5")]
    pub service: String,
    /// Method.
    #[prost(string, tag = "6")]
    pub method: String,
    /// Authority.
    #[prost(string, tag = "7")]
    pub authority: String,
    /// Path (without the query string: queries can carry credentials).
    #[prost(string, tag = "8")]
    pub path: String,
    /// Response status (0: none was sent).
    #[prost(uint32, tag = "9")]
    pub status: u32,
    /// From request start to the end of the response, in microseconds.
    #[prost(uint64, tag = "10")]
    pub latency_us: u64,
    /// Envoy response flags (`-` when none).
    #[prost(string, tag = "11")]
    pub flags: String,
    /// The hop was mutual TLS (inbound: the caller's certificate was verified; outbound:
    /// the upstream's was).
    #[prost(bool, tag = "12")]
    pub mtls: bool,
    /// The proxy's request id.
    #[prost(string, tag = "13")]
    pub request_id: String,
    /// When the request started, milliseconds since the Unix epoch.
    #[prost(uint64, tag = "14")]
    pub start_unix_ms: u64,
}

/// Proxy -> control plane.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TapUpdate {
    /// The proxy's node id (first update of a stream; empty afterwards).
    #[prost(string, tag = "1")]
    pub node_id: String,
    /// A matched request.
    #[prost(message, optional, tag = "2")]
    pub event: Option<TapEvent>,
    /// Events the proxy dropped since its previous update (its queue was full).
    #[prost(uint64, tag = "3")]
    pub dropped: u64,
}

/// What the control plane does with a tap stream: given the caller's credentials and
/// the proxy's updates, the commands to send it.
pub trait TapHandler: Send + Sync + 'static {
    /// A proxy opened a stream.
    fn open(&self, caller: crate::Caller, updates: Streaming<TapUpdate>) -> ReceiverStream<Result<TapCommand, Status>>;
}

/// The tonic service of a [`TapHandler`].
pub struct TapServer<H> {
    handler: Arc<H>,
}

impl<H> Clone for TapServer<H> {
    fn clone(&self) -> Self {
        TapServer { handler: self.handler.clone() }
    }
}

impl<H: TapHandler> TapServer<H> {
    /// The service for `handler`, to mount on the xDS port.
    pub fn new(handler: Arc<H>) -> Self {
        TapServer { handler }
    }
}

impl<H> tonic::server::NamedService for TapServer<H> {
    const NAME: &'static str = SERVICE_NAME;
}

impl<H, B> Service<http::Request<B>> for TapServer<H>
where
    H: TapHandler,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let handler = self.handler.clone();
        match req.uri().path() {
            STREAM_PATH => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.streaming(Open(handler), req).await)
            }),
            other => {
                let status = Status::unimplemented(format!("{other} is not a method of {SERVICE_NAME}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

struct Open<H>(Arc<H>);

impl<H: TapHandler> tonic::server::StreamingService<TapUpdate> for Open<H> {
    type Response = TapCommand;
    type ResponseStream = ReceiverStream<Result<TapCommand, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<TapUpdate>>) -> Self::Future {
        let remote_addr = request.remote_addr();
        let (metadata, extensions, updates) = request.into_parts();
        let commands = self.0.open(crate::Caller { remote_addr, metadata, extensions }, updates);
        Box::pin(async move { Ok(Response::new(commands)) })
    }
}

/// Opens the tap stream on `channel` with the `authorization` metadata of the proxy's
/// xDS streams, if any: `updates` go to the control plane (the first one naming the
/// node), the commands come back.
pub async fn open(
    channel: Channel,
    authorization: Option<String>,
    updates: impl tokio_stream::Stream<Item = TapUpdate> + Send + 'static,
) -> Result<Streaming<TapCommand>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static(STREAM_PATH);
    let mut request = Request::new(updates);
    if let Some(value) = authorization {
        let value = value.parse().map_err(|_| Status::invalid_argument("the credential is not valid metadata"))?;
        request.metadata_mut().insert("authorization", value);
    }
    let response = grpc.streaming(request, path, tonic_prost::ProstCodec::default()).await?;
    Ok(response.into_inner())
}
