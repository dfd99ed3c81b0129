//! productpage: the front end (Istio's `productpage.py`). `/productpage` renders the book
//! with its details and reviews (stars, or the error each call left); `/api/v1/products...`
//! is the JSON API; `/login` (form field `username`) and `/logout` set and clear the `user`
//! cookie, which turns into an `end-user` header on the calls to details and reviews.
//!
//! Calls: details and ratings once with a 3 s timeout; reviews with a 3 s timeout and one
//! more attempt (Istio keeps this "bug" on purpose for its fault-injection task), then
//! "Sorry, product reviews are currently unavailable for this book.". Every call carries
//! the headers of `client::PRODUCTPAGE_FORWARD` that came in; like Istio's productpage
//! (whose OpenTelemetry B3 propagator injects only a context it extracted), it never
//! invents trace ids: the sidecars start traces and decide sampling.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, COOKIE, LOCATION, REFERER, SET_COOKIE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::Value;
use tracing::warn;

use super::client::{copy_headers, HttpClient, PRODUCTPAGE_FORWARD};
use super::productpage_html::{index_page, product_page, PageData};
use super::{json_response, method_not_allowed, not_found, response, BookinfoConfig, Upstream};

/// Timeout of each call to details, reviews and ratings.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Attempts at reviews before giving up.
const REVIEWS_ATTEMPTS: usize = 2;
/// Largest accepted login form.
const MAX_FORM: usize = 64 * 1024;

/// What productpage shows when details failed.
pub const DETAILS_UNAVAILABLE: &str = "Sorry, product details are currently unavailable for this book.";
/// What productpage shows when reviews failed twice.
pub const REVIEWS_UNAVAILABLE: &str = "Sorry, product reviews are currently unavailable for this book.";
/// What the ratings API answers when ratings failed.
pub const RATINGS_UNAVAILABLE: &str = "Sorry, product ratings are currently unavailable for this book.";

/// The productpage service's settings.
pub struct Productpage {
    details: Upstream,
    reviews: Upstream,
    ratings: Upstream,
    client: HttpClient,
}

/// The one book on sale.
#[derive(Serialize)]
pub struct Product {
    /// Product id.
    pub id: u32,
    /// Title.
    pub title: &'static str,
    /// Summary, as trusted HTML.
    #[serde(rename = "descriptionHtml")]
    pub description_html: &'static str,
}

/// The catalogue: one play.
pub const PRODUCTS: [Product; 1] = [Product {
    id: 0,
    title: "The Comedy of Errors",
    description_html: "<a href=\"https://en.wikipedia.org/wiki/The_Comedy_of_Errors\">Wikipedia Summary</a>: The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is his shortest and one of his most farcical comedies, with a major part of the humour coming from slapstick and mistaken identity, in addition to puns and word play.",
}];

/// An upstream answer as productpage sees it: 200 with JSON, or a status and no body.
struct Fetched {
    status: StatusCode,
    json: Option<Value>,
}

impl Productpage {
    /// The productpage described by `config`.
    pub fn new(config: &BookinfoConfig, client: HttpClient) -> Self {
        Productpage {
            details: config.details.clone(),
            reviews: config.reviews.clone(),
            ratings: config.ratings.clone(),
            client,
        }
    }

    async fn fetch(&self, upstream: &Upstream, path: &str, headers: &HeaderMap) -> Fetched {
        match self.client.get(upstream, path, headers.clone(), CALL_TIMEOUT).await {
            Ok(reply) if reply.status == StatusCode::OK => match serde_json::from_slice(&reply.body) {
                Ok(json) => Fetched { status: StatusCode::OK, json: Some(json) },
                Err(e) => {
                    warn!("http://{}{path}: the answer is not JSON: {e}", upstream.authority);
                    Fetched { status: StatusCode::INTERNAL_SERVER_ERROR, json: None }
                }
            },
            Ok(reply) => Fetched { status: reply.status, json: None },
            Err(e) => {
                warn!("{e:#}");
                Fetched { status: StatusCode::INTERNAL_SERVER_ERROR, json: None }
            }
        }
    }

    async fn details(&self, id: &str, headers: &HeaderMap) -> (StatusCode, Value) {
        let f = self.fetch(&self.details, &format!("/details/{id}"), headers).await;
        with_error(f, DETAILS_UNAVAILABLE)
    }

    async fn reviews(&self, id: &str, headers: &HeaderMap) -> (StatusCode, Value) {
        let path = format!("/reviews/{id}");
        let mut last = None;
        for _ in 0..REVIEWS_ATTEMPTS {
            let f = self.fetch(&self.reviews, &path, headers).await;
            if f.json.is_some() {
                return with_error(f, REVIEWS_UNAVAILABLE);
            }
            last = Some(f);
        }
        let f = last.unwrap_or(Fetched { status: StatusCode::INTERNAL_SERVER_ERROR, json: None });
        with_error(f, REVIEWS_UNAVAILABLE)
    }

    async fn ratings(&self, id: &str, headers: &HeaderMap) -> (StatusCode, Value) {
        let f = self.fetch(&self.ratings, &format!("/ratings/{id}"), headers).await;
        with_error(f, RATINGS_UNAVAILABLE)
    }
}

/// Answers one request.
pub async fn handle(state: Arc<Productpage>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    match path.as_str() {
        "/" | "/index.html" if get => response(StatusCode::OK, "text/html; charset=utf-8", index_page()),
        "/health" if get => response(StatusCode::OK, "text/html; charset=utf-8", "Product page is healthy"),
        "/login" if req.method() == Method::POST => login(req).await,
        "/logout" if get => logout(&req),
        "/productpage" if get => front(&state, &req).await,
        "/api/v1/products" if get => {
            json_response(StatusCode::OK, serde_json::to_string(&PRODUCTS).unwrap_or_default())
        }
        "/" | "/index.html" | "/health" | "/login" | "/logout" | "/productpage" | "/api/v1/products" => {
            method_not_allowed()
        }
        _ => match api_route(&path) {
            Some(_) if !get => method_not_allowed(),
            Some((id, what)) => {
                let headers = forward_headers(req.headers());
                let (status, json) = match what {
                    ApiRoute::Details => state.details(id, &headers).await,
                    ApiRoute::Reviews => state.reviews(id, &headers).await,
                    ApiRoute::Ratings => state.ratings(id, &headers).await,
                };
                json_response(status, json.to_string())
            }
            None => not_found(),
        },
    }
}

enum ApiRoute {
    Details,
    Reviews,
    Ratings,
}

/// `/api/v1/products/{id}[/reviews|/ratings]`.
fn api_route(path: &str) -> Option<(&str, ApiRoute)> {
    let rest = path.strip_prefix("/api/v1/products/")?;
    let (id, what) = match rest.split_once('/') {
        None => (rest, ApiRoute::Details),
        Some((id, "reviews")) => (id, ApiRoute::Reviews),
        Some((id, "ratings")) => (id, ApiRoute::Ratings),
        Some(_) => return None,
    };
    (!id.is_empty()).then_some((id, what))
}

async fn front(state: &Productpage, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let user = user_cookie(req.headers());
    let headers = forward_headers(req.headers());
    let (details_status, details) = state.details("0", &headers).await;
    let (reviews_status, reviews) = state.reviews("0", &headers).await;
    let page = product_page(&PageData {
        user: user.as_deref(),
        product: &PRODUCTS[0],
        details_status,
        details: &details,
        reviews_status,
        reviews: &reviews,
    });
    response(StatusCode::OK, "text/html; charset=utf-8", page)
}

async fn login(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let query_user = req.uri().query().and_then(|q| form_value(q, "username"));
    let back = redirect_target(req.headers());
    let form = match Limited::new(req.into_body(), MAX_FORM).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return response(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", "login form too large\n"),
    };
    let user = form_value(&String::from_utf8_lossy(&form), "username").or(query_user).filter(|u| !u.is_empty());
    let cookie = match &user {
        Some(u) => format!("user={}; Path=/", percent_encode(u)),
        None => clear_cookie(),
    };
    redirect(&back, &cookie)
}

fn logout(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    redirect(&redirect_target(req.headers()), &clear_cookie())
}

fn clear_cookie() -> String {
    "user=; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Path=/".into()
}

/// Back where the form was (the `Referer`), as Istio's productpage does; `productpage`
/// when the browser sent none.
fn redirect_target(headers: &HeaderMap) -> String {
    headers.get(REFERER).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()).unwrap_or("productpage").to_owned()
}

fn redirect(location: &str, cookie: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<!doctype html>\n<html lang=en>\n<title>Redirecting...</title>\n<h1>Redirecting...</h1>\n<p>You should be redirected automatically to the target URL: <a href=\"{0}\">{0}</a>. If not, click the link.\n",
        super::productpage_html::escape(location)
    );
    let mut resp = response(StatusCode::FOUND, "text/html; charset=utf-8", body);
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(cookie) {
        resp.headers_mut().insert(SET_COOKIE, v);
    }
    resp
}

/// The headers productpage sends upstream for a request with `incoming` headers: the
/// forward list (no trace ids made up when none came in: a made-up `x-b3-sampled: 1`
/// would force the next sidecar to sample), and `end-user` from the `user` cookie (or
/// the incoming `end-user` header).
pub fn forward_headers(incoming: &HeaderMap) -> HeaderMap {
    let mut out = copy_headers(incoming, PRODUCTPAGE_FORWARD);
    let end_user = HeaderName::from_static("end-user");
    let from_cookie = user_cookie(incoming).and_then(|u| HeaderValue::from_bytes(u.as_bytes()).ok());
    if let Some(v) = from_cookie.or_else(|| incoming.get(&end_user).cloned()) {
        out.insert(end_user, v);
    }
    out
}

/// The signed-in user: the `user` cookie, percent-decoded.
fn user_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().strip_prefix("user="))
        .map(|v| percent_decode(v.trim_matches('"')))
        .rfind(|u| !u.is_empty())
}

/// `(status, body)` for the page and the API: the JSON on success, else `{"error": message}`.
fn with_error(f: Fetched, message: &str) -> (StatusCode, Value) {
    match f.json {
        Some(json) => (f.status, json),
        None => (f.status, serde_json::json!({ "error": message })),
    }
}

/// The value of `name` in an `application/x-www-form-urlencoded` string.
fn form_value(form: &str, name: &str) -> Option<String> {
    form.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(&k.replace('+', " ")) == name).then(|| percent_decode(&v.replace('+', " ")))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Everything but unreserved characters percent-encoded (a safe cookie value).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_forms_and_cookies_round_trip_any_user_name() {
        assert_eq!(form_value("username=jason&passwd=x", "username").as_deref(), Some("jason"));
        assert_eq!(form_value("passwd=x&username=J%C3%A9r%C3%B4me+B", "username").as_deref(), Some("Jérôme B"));
        assert_eq!(form_value("passwd=x", "username"), None);
        let name = "a b;c=d\"é";
        assert_eq!(percent_decode(&percent_encode(name)), name);
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, HeaderValue::from_static("session=1; user=a%20b; other=2"));
        assert_eq!(user_cookie(&headers).as_deref(), Some("a b"));
    }

    #[test]
    fn api_routes_take_one_path_segment_as_the_id() {
        assert!(matches!(api_route("/api/v1/products/0"), Some(("0", ApiRoute::Details))));
        assert!(matches!(api_route("/api/v1/products/7/reviews"), Some(("7", ApiRoute::Reviews))));
        assert!(matches!(api_route("/api/v1/products/7/ratings"), Some(("7", ApiRoute::Ratings))));
        assert!(api_route("/api/v1/products/7/other").is_none());
        assert!(api_route("/api/v1/products/").is_none());
    }
}
