//! The certificate service, wire-compatible with Istio's
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` (what istio-agent and
//! ztunnel call): a CSR and a validity in, `[leaf, intermediates..., root]` PEMs out.
//! The credential travels in the `authorization: Bearer <token>` metadata.
//!
//! The messages and the tonic service are written by hand (two messages, one unary
//! method): no protobuf compiler at build time.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{Ca, Credential, IdentityError, TokenIssuer};

/// gRPC service name.
pub const SERVICE_NAME: &str = "istio.v1.auth.IstioCertificateService";
/// Path of the one method.
pub const CREATE_CERTIFICATE_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded PKCS#10 certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested validity in seconds (0 or less: the CA's default).
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Optional metadata (Istio: impersonated identity, cluster id); unused by weft.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates: the leaf first, the root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// What the service does with a request: the CA, the token issuer and TTL bounds.
pub struct CertificateAuthority {
    ca: Arc<Ca>,
    tokens: Arc<TokenIssuer>,
    default_ttl: Duration,
    max_ttl: Duration,
    stats: CertificateStats,
}

/// What the certificate service counted since start (the control plane exports them as
/// Istio's `citadel_server_*` metrics).
#[derive(Debug, Default)]
pub struct CertificateStats {
    csrs: AtomicU64,
    issued: AtomicU64,
}

impl CertificateAuthority {
    /// Leaves live `default_ttl` unless the request asks for another TTL; one over
    /// `max_ttl` (raised to `default_ttl` if lower) is refused, as Istio's CA does.
    pub fn new(ca: Arc<Ca>, tokens: Arc<TokenIssuer>, default_ttl: Duration, max_ttl: Duration) -> Self {
        CertificateAuthority {
            ca,
            tokens,
            default_ttl,
            max_ttl: max_ttl.max(default_ttl),
            stats: CertificateStats::default(),
        }
    }

    /// Requests received and certificates issued by [`CertificateAuthority::create_certificate`].
    pub fn stats(&self) -> &CertificateStats {
        &self.stats
    }

    /// The CA.
    pub fn ca(&self) -> &Arc<Ca> {
        &self.ca
    }

    /// The token issuer.
    pub fn tokens(&self) -> &Arc<TokenIssuer> {
        &self.tokens
    }

    /// Verifies the credential (the `authorization` value), then signs the CSR for the
    /// identity it grants; the chain to return. Counts the request, and the certificate
    /// when one is issued ([`CertificateAuthority::stats`]).
    pub fn create_certificate(
        &self,
        authorization: Option<&str>,
        req: &IstioCertificateRequest,
    ) -> Result<Vec<String>, IdentityError> {
        self.stats.csrs.fetch_add(1, Ordering::Relaxed);
        let chain = self.sign_request(authorization, req)?;
        self.stats.issued.fetch_add(1, Ordering::Relaxed);
        Ok(chain)
    }

    fn sign_request(
        &self,
        authorization: Option<&str>,
        req: &IstioCertificateRequest,
    ) -> Result<Vec<String>, IdentityError> {
        let Some(auth) = authorization else {
            return Err(IdentityError::TokenMalformed(
                "no credential: send `authorization: Bearer <join token>`".into(),
            ));
        };
        let token = auth.strip_prefix("Bearer ").or_else(|| auth.strip_prefix("bearer ")).ok_or_else(|| {
            IdentityError::TokenMalformed("the authorization metadata must be `Bearer <token>`".into())
        })?;
        let credential = Credential::from_bearer(token)?;
        let grant = self.tokens.verify_credential(&credential)?;
        let identity = grant.spiffe_id(self.ca.trust_domain())?;
        // Istio's CA: no TTL (0 or negative) gets the default; one over the maximum is
        // refused with INVALID_ARGUMENT ("requested TTL ... is greater than the max
        // allowed TTL ..."), so a workload never holds a shorter certificate than it
        // planned its renewal for without being told.
        let ttl = match u64::try_from(req.validity_duration) {
            Ok(0) | Err(_) => self.default_ttl,
            Ok(secs) => {
                let requested = Duration::from_secs(secs);
                if requested > self.max_ttl {
                    return Err(IdentityError::TtlTooLong {
                        what: "certificate",
                        requested,
                        max: self.max_ttl,
                        flag: "--max-cert-ttl",
                    });
                }
                requested
            }
        };
        let issued = self.ca.sign_csr(&req.csr, &identity, ttl)?;
        info!(%identity, serial = %issued.serial, ttl_s = ttl.as_secs(), token = %grant.token_id,
              credential = credential.kind(), "certificate issued");
        Ok(issued.cert_chain())
    }

    /// The tonic service, to mount on a gRPC server.
    pub fn service(self: &Arc<Self>) -> CertificateServer {
        CertificateServer { authority: self.clone() }
    }
}

impl CertificateStats {
    /// Certificate signing requests received, refused ones included.
    pub fn csrs(&self) -> u64 {
        self.csrs.load(Ordering::Relaxed)
    }

    /// Certificates issued.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }
}

/// The tonic service of a [`CertificateAuthority`].
#[derive(Clone)]
pub struct CertificateServer {
    authority: Arc<CertificateAuthority>,
}

impl tonic::server::NamedService for CertificateServer {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for CertificateServer
where
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
        let authority = self.authority.clone();
        match req.uri().path() {
            CREATE_CERTIFICATE_PATH => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(Create(authority), req).await)
            }),
            other => {
                let status = Status::unimplemented(format!("{other} is not a method of {SERVICE_NAME}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

struct Create(Arc<CertificateAuthority>);

impl tonic::server::UnaryService<IstioCertificateRequest> for Create {
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<Response<IstioCertificateResponse>, Status>;

    fn call(&mut self, request: Request<IstioCertificateRequest>) -> Self::Future {
        let authority = self.0.clone();
        Box::pin(async move {
            let peer = request.remote_addr();
            let auth = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
            match authority.create_certificate(auth.as_deref(), request.get_ref()) {
                Ok(cert_chain) => Ok(Response::new(IstioCertificateResponse { cert_chain })),
                Err(e) => {
                    warn!(peer = ?peer, error = %e, "certificate request refused");
                    Err(e.to_status())
                }
            }
        })
    }
}

/// Client of the certificate service.
#[derive(Clone)]
pub struct CertificateClient {
    grpc: tonic::client::Grpc<Channel>,
}

impl CertificateClient {
    /// A client on `channel`.
    pub fn new(channel: Channel) -> Self {
        CertificateClient { grpc: tonic::client::Grpc::new(channel) }
    }

    /// A client of `endpoint` (`http://host:port`) that connects on first use and
    /// reconnects as needed. Several control-plane replicas separated by commas: each
    /// request goes to one that is reachable (a balanced channel over all of them).
    pub fn connect_lazy(endpoint: &str) -> Result<Self, IdentityError> {
        let mut endpoints = Vec::new();
        for one in endpoint.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let ep = Endpoint::from_shared(one.to_string())
                .map_err(|e| IdentityError::Service {
                    code: tonic::Code::InvalidArgument,
                    message: format!("endpoint {one:?}: {e}"),
                })?
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(15));
            endpoints.push(ep);
        }
        match endpoints.len() {
            0 => Err(IdentityError::Service {
                code: tonic::Code::InvalidArgument,
                message: format!("endpoint {endpoint:?}: no address"),
            }),
            1 => Ok(CertificateClient::new(endpoints.remove(0).connect_lazy())),
            _ => Ok(CertificateClient::new(Channel::balance_list(endpoints.into_iter()))),
        }
    }

    /// Sends `csr_pem` with `credential`; the PEM chain (leaf first, root last).
    pub async fn create_certificate(
        &mut self,
        credential: &Credential,
        csr_pem: String,
        ttl: Option<Duration>,
    ) -> Result<Vec<String>, IdentityError> {
        let msg = IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: ttl.map(|t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0),
            metadata: None,
        };
        let mut request = Request::new(msg);
        let bearer = format!("Bearer {}", credential.token()).parse().map_err(|_| {
            IdentityError::TokenMalformed("the credential holds characters not allowed in metadata".into())
        })?;
        request.metadata_mut().insert("authorization", bearer);
        let status = |s: Status| IdentityError::Service { code: s.code(), message: s.message().to_string() };
        self.grpc
            .ready()
            .await
            .map_err(|e| IdentityError::Service { code: tonic::Code::Unavailable, message: e.to_string() })?;
        let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE_PATH);
        let reply: Response<IstioCertificateResponse> =
            self.grpc.unary(request, path, tonic_prost::ProstCodec::default()).await.map_err(status)?;
        let chain = reply.into_inner().cert_chain;
        if chain.is_empty() {
            return Err(IdentityError::Certificate("the certificate service answered an empty chain".into()));
        }
        Ok(chain)
    }
}
