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

use crate::{Ca, Credential, Grant, IdentityError, SpiffeId, TokenIssuer};

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

/// Verifies credentials the token issuer does not know: Kubernetes service-account
/// tokens (the control plane checks them against the cluster issuer's keys, or asks the
/// API server's TokenReview, hence a future).
pub trait CredentialVerifier: Send + Sync + 'static {
    /// What `credential` grants, or why it is refused.
    fn verify<'a>(&'a self, credential: &'a Credential) -> VerifyFuture<'a>;
}

/// The future a [`CredentialVerifier`] answers with.
pub type VerifyFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Grant, IdentityError>> + Send + 'a>>;

/// What a caller of the control channel (certificate service, xDS) presented.
#[derive(Clone, Debug, Default)]
pub struct CallerCredentials {
    /// The `authorization` metadata (`Bearer <join token or Kubernetes token>`).
    pub authorization: Option<String>,
    /// The SPIFFE id of the client certificate verified by a TLS listener.
    pub client_identity: Option<SpiffeId>,
}

/// Who a caller proved to be, and with what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    /// Namespace and service account granted.
    pub grant: Grant,
    /// `client-certificate`, `join-token` or `k8s-sa-token`.
    pub kind: &'static str,
}

/// `token_id` of a grant proven by a client certificate.
pub const CLIENT_CERTIFICATE: &str = "client-certificate";

/// What the service does with a request: the CA, the token issuer and TTL bounds.
pub struct CertificateAuthority {
    ca: Arc<Ca>,
    tokens: Arc<TokenIssuer>,
    kubernetes: Option<Arc<dyn CredentialVerifier>>,
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
            kubernetes: None,
            default_ttl,
            max_ttl: max_ttl.max(default_ttl),
            stats: CertificateStats::default(),
        }
    }

    /// The authority with Kubernetes service-account tokens verified by `verifier`
    /// (without one they are refused as unsupported).
    pub fn with_kubernetes(mut self, verifier: Arc<dyn CredentialVerifier>) -> Self {
        self.kubernetes = Some(verifier);
        self
    }

    /// Who the caller is: a client certificate of this trust domain (verified by the TLS
    /// listener) wins; else the bearer credential (join token, or Kubernetes token when
    /// a verifier is set).
    pub async fn authenticate(&self, caller: &CallerCredentials) -> Result<Authenticated, IdentityError> {
        if let Some(id) = &caller.client_identity {
            if id.trust_domain() != self.ca.trust_domain() {
                return Err(IdentityError::TokenMalformed(format!(
                    "client certificate {id} is not of trust domain {}",
                    self.ca.trust_domain()
                )));
            }
            let grant = Grant {
                namespace: id.namespace().to_string(),
                service_account: id.service_account().to_string(),
                token_id: CLIENT_CERTIFICATE.to_string(),
            };
            return Ok(Authenticated { grant, kind: CLIENT_CERTIFICATE });
        }
        let Some(auth) = caller.authorization.as_deref() else {
            return Err(IdentityError::TokenMalformed(
                "no credential: send `authorization: Bearer <join token>` or a client certificate".into(),
            ));
        };
        let token = auth.strip_prefix("Bearer ").or_else(|| auth.strip_prefix("bearer ")).ok_or_else(|| {
            IdentityError::TokenMalformed("the authorization metadata must be `Bearer <token>`".into())
        })?;
        let credential = Credential::from_bearer(token)?;
        let grant = match (&credential, &self.kubernetes) {
            (Credential::KubernetesServiceAccountToken(_), Some(k8s)) => k8s.verify(&credential).await?,
            _ => self.tokens.verify_credential(&credential)?,
        };
        Ok(Authenticated { grant, kind: credential.kind() })
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
    pub async fn create_certificate(
        &self,
        authorization: Option<&str>,
        req: &IstioCertificateRequest,
    ) -> Result<Vec<String>, IdentityError> {
        let caller = CallerCredentials { authorization: authorization.map(str::to_string), client_identity: None };
        self.create_certificate_for(&caller, req).await
    }

    /// [`CertificateAuthority::create_certificate`] for a caller that may also have
    /// proven a client certificate (renewals over mTLS need no token).
    pub async fn create_certificate_for(
        &self,
        caller: &CallerCredentials,
        req: &IstioCertificateRequest,
    ) -> Result<Vec<String>, IdentityError> {
        self.stats.csrs.fetch_add(1, Ordering::Relaxed);
        let chain = self.sign_request(caller, req).await?;
        self.stats.issued.fetch_add(1, Ordering::Relaxed);
        Ok(chain)
    }

    async fn sign_request(
        &self,
        caller: &CallerCredentials,
        req: &IstioCertificateRequest,
    ) -> Result<Vec<String>, IdentityError> {
        let Authenticated { grant, kind } = self.authenticate(caller).await?;
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
              credential = kind, "certificate issued");
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
            let tls = request.extensions().get::<crate::channel::TlsPeer>().cloned();
            let peer = request.remote_addr().or(tls.as_ref().and_then(|t| t.remote_addr));
            let caller = CallerCredentials {
                authorization: request
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                client_identity: tls.and_then(|t| t.identity),
            };
            match authority.create_certificate_for(&caller, request.get_ref()).await {
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
    grpcs: Vec<tonic::client::Grpc<Channel>>,
    next: usize,
}

impl CertificateClient {
    /// A client on `channel`.
    pub fn new(channel: Channel) -> Self {
        CertificateClient::over(vec![channel])
    }

    /// A client of `endpoint` (`http://host:port`) that connects on first use and
    /// reconnects as needed. Several control-plane replicas separated by commas: each
    /// request goes to one that is reachable (a balanced channel over all of them).
    pub fn connect_lazy(endpoint: &str) -> Result<Self, IdentityError> {
        let channels = Self::split(endpoint)?.into_iter().map(|one| Ok(Self::endpoint(&one)?.connect_lazy()));
        Ok(CertificateClient::over(channels.collect::<Result<Vec<_>, IdentityError>>()?))
    }

    /// A client of `endpoint` (`https://host:port`, several separated by commas) over TLS
    /// with `config` (the server verified as it says; a client certificate if it has
    /// one), connected on first use.
    pub fn connect_lazy_tls(endpoint: &str, config: rustls::ClientConfig) -> Result<Self, IdentityError> {
        let mut channels = Vec::new();
        for one in Self::split(endpoint)? {
            let ep = Self::endpoint(&crate::channel::plain_uri(&one))?;
            channels.push(crate::channel::tls_channel_lazy(ep, config.clone()));
        }
        Ok(CertificateClient::over(channels))
    }

    /// The addresses of a comma-separated list; an error when there is none.
    fn split(endpoint: &str) -> Result<Vec<String>, IdentityError> {
        let all: Vec<String> =
            endpoint.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_string).collect();
        if all.is_empty() {
            return Err(IdentityError::Service {
                code: tonic::Code::InvalidArgument,
                message: format!("endpoint {endpoint:?}: no address"),
            });
        }
        Ok(all)
    }

    /// A client trying `channels` in turn: a request that cannot reach one (Unavailable)
    /// goes to the next, and the one that answered is asked first next time.
    fn over(channels: Vec<Channel>) -> Self {
        CertificateClient { grpcs: channels.into_iter().map(tonic::client::Grpc::new).collect(), next: 0 }
    }

    fn endpoint(endpoint: &str) -> Result<Endpoint, IdentityError> {
        let ep = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| IdentityError::Service {
                code: tonic::Code::InvalidArgument,
                message: format!("endpoint {endpoint:?}: {e}"),
            })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15));
        Ok(ep)
    }

    /// Sends `csr_pem` with `credential`; the PEM chain (leaf first, root last).
    pub async fn create_certificate(
        &mut self,
        credential: &Credential,
        csr_pem: String,
        ttl: Option<Duration>,
    ) -> Result<Vec<String>, IdentityError> {
        self.request_certificate(Some(credential), csr_pem, ttl).await
    }

    /// Sends `csr_pem` with `credential` if any (over mTLS the client certificate is
    /// the credential); the PEM chain (leaf first, root last).
    pub async fn request_certificate(
        &mut self,
        credential: Option<&Credential>,
        csr_pem: String,
        ttl: Option<Duration>,
    ) -> Result<Vec<String>, IdentityError> {
        let msg = IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: ttl.map(|t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0),
            metadata: None,
        };
        let bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = match credential {
            Some(credential) => Some(format!("Bearer {}", credential.token()).parse().map_err(|_| {
                IdentityError::TokenMalformed("the credential holds characters not allowed in metadata".into())
            })?),
            None => None,
        };
        let status = |s: Status| IdentityError::Service { code: s.code(), message: s.message().to_string() };
        let n = self.grpcs.len().max(1);
        let mut last = IdentityError::Service { code: tonic::Code::Unavailable, message: "no address".into() };
        let mut reply = None;
        for i in 0..n {
            let idx = (self.next + i) % n;
            let Some(grpc) = self.grpcs.get_mut(idx) else { break };
            let mut request = Request::new(msg.clone());
            if let Some(b) = &bearer {
                request.metadata_mut().insert("authorization", b.clone());
            }
            if let Err(e) = grpc.ready().await {
                last = IdentityError::Service { code: tonic::Code::Unavailable, message: e.to_string() };
                continue;
            }
            let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE_PATH);
            match grpc.unary(request, path, tonic_prost::ProstCodec::default()).await {
                Ok(r) => {
                    self.next = idx;
                    reply = Some(r);
                    break;
                }
                // Unreachable replica: try the next one.
                Err(s) if s.code() == tonic::Code::Unavailable => last = status(s),
                Err(s) => return Err(status(s)),
            }
        }
        let Some(reply): Option<Response<IstioCertificateResponse>> = reply else { return Err(last) };
        let chain = reply.into_inner().cert_chain;
        if chain.is_empty() {
            return Err(IdentityError::Certificate("the certificate service answered an empty chain".into()));
        }
        Ok(chain)
    }
}
