//! JWT helpers: an ES256 signing key generated per test with its JWKS, tokens signed
//! with it, and a JWKS server on `127.0.0.1:0` that counts its fetches.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

/// An ES256 key pair: signs tokens, publishes its public key as a JWKS.
pub struct JwtSigner {
    kid: String,
    key: jsonwebtoken::EncodingKey,
    jwk: Value,
}

/// A JWKS HTTP server (any path answers the document); dropped with the test runtime.
pub struct JwksServer {
    /// Bound address.
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl JwtSigner {
    /// A fresh P-256 key with key id `kid`.
    pub fn es256(kid: &str) -> anyhow::Result<JwtSigner> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let key = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())?;
        let raw = pair.public_key_raw();
        anyhow::ensure!(raw.len() == 65 && raw[0] == 4, "unexpected P-256 public key encoding");
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..65]),
        });
        Ok(JwtSigner { kid: kid.to_string(), key, jwk })
    }

    /// `{"keys": [<public key>]}`.
    pub fn jwks(&self) -> String {
        json!({ "keys": [self.jwk] }).to_string()
    }

    /// A token with these claims.
    pub fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.key)?)
    }

    /// A token of `iss` for `sub`, expiring `exp_in` seconds from now (negative:
    /// already expired), with `extra` claims merged in.
    pub fn token(&self, iss: &str, sub: &str, exp_in: i64, extra: Value) -> anyhow::Result<String> {
        let mut claims = json!({ "iss": iss, "sub": sub, "iat": now(), "exp": now() + exp_in });
        if let (Some(c), Value::Object(e)) = (claims.as_object_mut(), extra) {
            c.extend(e);
        }
        self.sign(&claims)
    }
}

impl JwksServer {
    /// Serves `body` as `application/json` on every path.
    pub async fn start(body: String) -> anyhow::Result<JwksServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicUsize::new(0));
        let (body, counter) = (Bytes::from(body), hits.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (body, counter) = (body.clone(), counter.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let resp = Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(body.clone()))
                            .map_err(|e| e.to_string());
                        async move { Ok::<_, Infallible>(resp.unwrap_or_default()) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Ok(JwksServer { addr, hits })
    }

    /// `http://127.0.0.1:PORT/jwks.json`.
    pub fn uri(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    /// Requests served so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}
