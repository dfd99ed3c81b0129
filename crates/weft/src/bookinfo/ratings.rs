//! ratings: `GET /ratings/{id}` answers `{"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}`
//! (Istio's `ratings.js`); `POST /ratings/{id}` with a JSON body replaces the ratings of
//! that product in memory (v1; v2 answers 501 as Istio's database-backed version does);
//! `GET /health`. The versions Istio uses to demonstrate failures behave the same:
//! `v-faulty` answers half the requests with 503, `v-delayed` delays half by 7 s,
//! `v-unavailable` alternates a minute up and a minute of 503s, `v-unhealthy` alternates
//! fifteen minutes healthy and fifteen minutes failing both `/ratings` and `/health`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::{json_response, method_not_allowed, not_found, random_u64};

/// Largest accepted POST body.
const MAX_BODY: usize = 64 * 1024;

/// The ratings service's state.
pub struct Ratings {
    version: String,
    started: Instant,
    /// Ratings posted per product id (v1).
    posted: Mutex<HashMap<i64, Value>>,
}

impl Ratings {
    /// A ratings service of `version`.
    pub fn new(version: &str) -> Self {
        Ratings { version: version.to_owned(), started: Instant::now(), posted: Mutex::new(HashMap::new()) }
    }

    /// `v-unavailable` flips every minute, `v-unhealthy` every fifteen minutes, both
    /// starting available.
    fn unavailable(&self) -> bool {
        let period = match self.version.as_str() {
            "v-unavailable" => 60,
            "v-unhealthy" => 900,
            _ => return false,
        };
        (self.started.elapsed().as_secs() / period) % 2 == 1
    }

    fn healthy(&self) -> bool {
        self.version != "v-unhealthy" || !self.unavailable()
    }

    async fn ratings_of(&self, id: i64) -> Value {
        if let Some(posted) = self.posted.lock().await.get(&id) {
            return json!({ "id": id, "ratings": posted });
        }
        json!({ "id": id, "ratings": { "Reviewer1": 5, "Reviewer2": 4 } })
    }
}

/// Answers one request.
pub async fn handle(state: std::sync::Arc<Ratings>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let target = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    if req.uri().path() == "/health" {
        if req.method() != Method::GET {
            return method_not_allowed();
        }
        return if state.healthy() {
            json_response(StatusCode::OK, r#"{"status":"Ratings is healthy"}"#)
        } else {
            json_response(StatusCode::INTERNAL_SERVER_ERROR, r#"{"status":"Ratings is not healthy"}"#)
        };
    }
    if !target.starts_with("/ratings/") {
        return not_found();
    }
    // As `req.url.split('/').pop()` then `parseInt`: the last segment, query included.
    let id = parse_int_prefix(target.rsplit('/').next().unwrap_or(""));
    match *req.method() {
        Method::GET => get(&state, id).await,
        Method::POST => post(&state, id, req).await,
        _ => method_not_allowed(),
    }
}

async fn get(state: &Ratings, id: Option<i64>) -> Response<Full<Bytes>> {
    let Some(id) = id else {
        return json_response(StatusCode::BAD_REQUEST, r#"{"error":"please provide numeric product ID"}"#);
    };
    match state.version.as_str() {
        "v-faulty" if random_u64() & 1 == 0 => return unavailable(),
        "v-delayed" if random_u64() & 1 == 0 => tokio::time::sleep(Duration::from_secs(7)).await,
        "v-unavailable" | "v-unhealthy" if state.unavailable() => return unavailable(),
        _ => {}
    }
    json_response(StatusCode::OK, state.ratings_of(id).await.to_string())
}

async fn post(state: &Ratings, id: Option<i64>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(id) = id else {
        return json_response(StatusCode::BAD_REQUEST, r#"{"error":"please provide numeric product ID"}"#);
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return json_response(StatusCode::BAD_REQUEST, r#"{"error":"please provide valid ratings JSON"}"#),
    };
    let Ok(ratings) = serde_json::from_slice::<Value>(&body) else {
        return json_response(StatusCode::BAD_REQUEST, r#"{"error":"please provide valid ratings JSON"}"#);
    };
    if state.version == "v2" {
        return json_response(
            StatusCode::NOT_IMPLEMENTED,
            r#"{"error":"Post not implemented for database backed ratings"}"#,
        );
    }
    state.posted.lock().await.insert(id, ratings);
    json_response(StatusCode::OK, state.ratings_of(id).await.to_string())
}

fn unavailable() -> Response<Full<Bytes>> {
    json_response(StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"Service unavailable"}"#)
}

/// JavaScript's `parseInt(s)`: leading blanks, an optional sign, then the leading digits;
/// `None` (NaN) when there are none.
fn parse_int_prefix(s: &str) -> Option<i64> {
    let s = s.trim_start();
    let (negative, rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let digits: &str = &rest[..rest.bytes().take_while(u8::is_ascii_digit).count()];
    let value: i64 = digits.parse().ok()?;
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::parse_int_prefix;

    #[test]
    fn product_ids_parse_like_javascript_parse_int() {
        assert_eq!(parse_int_prefix("0"), Some(0));
        assert_eq!(parse_int_prefix("12abc"), Some(12));
        assert_eq!(parse_int_prefix("7?x=1"), Some(7));
        assert_eq!(parse_int_prefix("-3"), Some(-3));
        assert_eq!(parse_int_prefix("abc"), None);
        assert_eq!(parse_int_prefix(""), None);
        assert_eq!(parse_int_prefix("-"), None);
    }
}
