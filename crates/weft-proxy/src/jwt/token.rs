//! A JWT taken apart (header, payload, signature) with the checks Envoy makes before the
//! signature: format, time and audiences; and the statuses with Envoy's texts.

use base64::Engine as _;
use serde_json::Value;

/// Envoy's verification status (jwt_verify_lib), with its text as [`Status::text`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Verified.
    Ok,
    /// No token where one was required.
    JwtMissed,
    /// `nbf` is in the future.
    JwtNotYetValid,
    /// `exp` has passed (or is missing with `require_expiration`).
    JwtExpired,
    /// Not three dot-separated parts.
    JwtBadFormat,
    /// Header not base64url.
    JwtHeaderParseErrorBadBase64,
    /// Header not a JSON object.
    JwtHeaderParseErrorBadJson,
    /// Header without a string `alg`.
    JwtHeaderBadAlg,
    /// `alg` not supported.
    JwtHeaderNotImplementedAlg,
    /// Payload not base64url.
    JwtPayloadParseErrorBadBase64,
    /// Payload not a JSON object.
    JwtPayloadParseErrorBadJson,
    /// Signature not base64url.
    JwtSignatureParseErrorBadBase64,
    /// No key verified the signature.
    JwtVerificationFail,
    /// The token's issuer has no provider (here).
    JwtUnknownIssuer,
    /// `aud` does not name an allowed audience.
    JwtAudienceNotAllowed,
    /// No JWKS key fits the token's `kid` / `alg`.
    JwksKidAlgMismatch,
    /// The remote JWKS could not be fetched.
    JwksFetchFail,
}

/// A parsed token.
#[derive(Debug, Clone)]
pub(crate) struct Jwt {
    pub(crate) alg: jsonwebtoken::Algorithm,
    pub(crate) kid: Option<String>,
    signing_input: String,
    payload_b64: String,
    pub(crate) signature_b64: String,
    claims: serde_json::Map<String, Value>,
}

impl Status {
    /// Envoy's text for the status (the body of its 401/403 answer).
    pub fn text(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::JwtMissed => "Jwt is missing",
            Status::JwtNotYetValid => "Jwt not yet valid",
            Status::JwtExpired => "Jwt is expired",
            Status::JwtBadFormat => "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
            Status::JwtHeaderParseErrorBadBase64 => "Jwt header is an invalid Base64url encoded",
            Status::JwtHeaderParseErrorBadJson => "Jwt header is an invalid JSON",
            Status::JwtHeaderBadAlg => "Jwt header [alg] field is required and must be a string",
            Status::JwtHeaderNotImplementedAlg => "Jwt header [alg] is not supported",
            Status::JwtPayloadParseErrorBadBase64 => "Jwt payload is an invalid Base64url encoded",
            Status::JwtPayloadParseErrorBadJson => "Jwt payload is an invalid JSON",
            Status::JwtSignatureParseErrorBadBase64 => "Jwt signature is an invalid Base64url encoded",
            Status::JwtVerificationFail => "Jwt verification fails",
            Status::JwtUnknownIssuer => "Jwt issuer is not configured",
            Status::JwtAudienceNotAllowed => "Audiences in Jwt are not allowed",
            Status::JwksKidAlgMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
            Status::JwksFetchFail => "Jwks remote fetch is failed",
        }
    }

    /// The HTTP status of Envoy's answer: 403 for audiences, else 401.
    pub fn http_status(self) -> u16 {
        match self {
            Status::JwtAudienceNotAllowed => 403,
            _ => 401,
        }
    }

    /// Envoy's `response_code_details`: `jwt_authn_access_denied{<text with _>}`.
    pub fn details(self) -> String {
        format!("jwt_authn_access_denied{{{}}}", self.text().replace(' ', "_"))
    }
}

impl Jwt {
    /// Takes a compact JWS apart, with Envoy's format errors.
    pub(crate) fn parse(token: &str) -> Result<Jwt, Status> {
        let parts: Vec<&str> = token.split('.').collect();
        let [header, payload, signature] = parts.as_slice() else { return Err(Status::JwtBadFormat) };
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header_bytes =
            b64.decode(header.trim_end_matches('=')).map_err(|_| Status::JwtHeaderParseErrorBadBase64)?;
        let header_json: serde_json::Map<String, Value> =
            serde_json::from_slice(&header_bytes).map_err(|_| Status::JwtHeaderParseErrorBadJson)?;
        let alg = header_json.get("alg").and_then(Value::as_str).ok_or(Status::JwtHeaderBadAlg)?;
        let alg = match alg {
            "RS256" => jsonwebtoken::Algorithm::RS256,
            "RS384" => jsonwebtoken::Algorithm::RS384,
            "RS512" => jsonwebtoken::Algorithm::RS512,
            "PS256" => jsonwebtoken::Algorithm::PS256,
            "PS384" => jsonwebtoken::Algorithm::PS384,
            "PS512" => jsonwebtoken::Algorithm::PS512,
            "ES256" => jsonwebtoken::Algorithm::ES256,
            "ES384" => jsonwebtoken::Algorithm::ES384,
            "HS256" => jsonwebtoken::Algorithm::HS256,
            "HS384" => jsonwebtoken::Algorithm::HS384,
            "HS512" => jsonwebtoken::Algorithm::HS512,
            "EdDSA" => jsonwebtoken::Algorithm::EdDSA,
            _ => return Err(Status::JwtHeaderNotImplementedAlg),
        };
        let kid = match header_json.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(Status::JwtHeaderParseErrorBadJson),
        };
        let payload_bytes =
            b64.decode(payload.trim_end_matches('=')).map_err(|_| Status::JwtPayloadParseErrorBadBase64)?;
        let claims: serde_json::Map<String, Value> =
            serde_json::from_slice(&payload_bytes).map_err(|_| Status::JwtPayloadParseErrorBadJson)?;
        // Types of the registered claims, as Envoy checks them.
        for k in ["iss", "sub"] {
            if claims.get(k).is_some_and(|v| !v.is_string()) {
                return Err(Status::JwtPayloadParseErrorBadJson);
            }
        }
        for k in ["exp", "nbf", "iat"] {
            if claims.get(k).is_some_and(|v| !v.is_number()) {
                return Err(Status::JwtPayloadParseErrorBadJson);
            }
        }
        b64.decode(signature.trim_end_matches('=')).map_err(|_| Status::JwtSignatureParseErrorBadBase64)?;
        Ok(Jwt {
            alg,
            kid,
            signing_input: format!("{header}.{payload}"),
            payload_b64: payload.to_string(),
            signature_b64: signature.trim_end_matches('=').to_string(),
            claims,
        })
    }

    /// `iss`.
    pub(crate) fn iss(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }

    /// The signed part (`header.payload`).
    pub(crate) fn signing_input(&self) -> &[u8] {
        self.signing_input.as_bytes()
    }

    /// The payload as sent (base64url).
    pub(crate) fn payload_b64(&self) -> &str {
        &self.payload_b64
    }

    /// `exp` / `nbf` against `now` with `skew` seconds of tolerance.
    pub(crate) fn check_time(&self, now: u64, skew: u64, require_exp: bool) -> Status {
        let secs = |k: &str| self.claims.get(k).and_then(Value::as_f64).map(|f| f.max(0.0) as u64);
        if let Some(nbf) = secs("nbf") {
            if now.saturating_add(skew) < nbf {
                return Status::JwtNotYetValid;
            }
        }
        match secs("exp") {
            Some(exp) if now > exp.saturating_add(skew) => Status::JwtExpired,
            None if require_exp => Status::JwtExpired,
            _ => Status::Ok,
        }
    }

    /// Whether `aud` names one of `allowed` (scheme and trailing `/` ignored, as Envoy).
    pub(crate) fn audience_allowed(&self, allowed: &[String]) -> bool {
        let norm = |s: &str| {
            let s = s.strip_prefix("http://").or_else(|| s.strip_prefix("https://")).unwrap_or(s);
            s.trim_end_matches('/').to_string()
        };
        let allowed: Vec<String> = allowed.iter().map(|a| norm(a)).collect();
        let aud: Vec<&str> = match self.claims.get("aud") {
            Some(Value::String(a)) => vec![a.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        aud.iter().any(|a| allowed.contains(&norm(a)))
    }

    /// The claims, with the `space_delimited` string claims split into lists (Envoy's
    /// `normalize_payload_in_metadata`).
    pub(crate) fn claims_normalized(&self, space_delimited: &[String]) -> serde_json::Map<String, Value> {
        let mut claims = self.claims.clone();
        for name in space_delimited {
            if let Some(Value::String(s)) = claims.get(name) {
                let list = s.split(' ').filter(|p| !p.is_empty()).map(|p| Value::String(p.to_string())).collect();
                claims.insert(name.clone(), Value::Array(list));
            }
        }
        claims
    }
}
