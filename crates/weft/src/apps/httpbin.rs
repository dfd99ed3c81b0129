//! httpbin: the endpoints of kennethreitz/httpbin that Istio's tasks call, answered the way
//! it answers them (Flask's sorted, two-space-indented JSON; header names title-cased as
//! Werkzeug reports them; the "environment" headers such as `X-Forwarded-For` hidden from
//! `/headers` unless `?show_env=1`):
//!
//! - `GET /status/{codes}`: that status; `codes` may be a comma list, each `code[:weight]`,
//!   one chosen at random by weight (as httpbin does);
//! - `/delay/{n}`: answers like `/anything` after `min(n, 10)` seconds;
//! - `/headers`, `/ip`, `/user-agent`, `/uuid`, `/get`, `/anything[/...]`, `/`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderValue;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::response;

/// httpbin's longest delay.
const MAX_DELAY: f64 = 10.0;
/// The largest request body read (`/anything`).
const MAX_BODY: usize = 1 << 20;
/// Headers httpbin treats as the environment's: hidden unless `show_env` is given.
const ENV_HEADERS: [&str; 15] = [
    "x-varnish",
    "x-request-start",
    "x-heroku-queue-depth",
    "x-real-ip",
    "x-forwarded-proto",
    "x-forwarded-protocol",
    "x-forwarded-ssl",
    "x-heroku-queue-wait-time",
    "x-forwarded-for",
    "x-heroku-dynos-in-use",
    "x-forwarded-port",
    "x-request-id",
    "via",
    "total-route-time",
    "connect-time",
];

/// Answers one request from `peer`.
pub async fn handle(req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(2, '/').collect();
    match (segments[0], segments.get(1).copied()) {
        ("", None) => index(),
        ("status", Some(codes)) => status(codes),
        ("delay", Some(n)) => delay(req, peer, n).await,
        ("headers", None) => json_ok(&json!({ "headers": headers(&req, show_env(&req)) })),
        ("ip", None) => json_ok(&json!({ "origin": origin(req.headers(), peer) })),
        ("user-agent", None) => {
            let ua = req.headers().get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or("");
            json_ok(&json!({ "user-agent": ua }))
        }
        ("uuid", None) => json_ok(&json!({ "uuid": uuid_v4() })),
        ("get", None) if matches!(*req.method(), Method::GET | Method::HEAD) => json_ok(&get_like(&req, peer)),
        ("get", None) => method_not_allowed(),
        ("anything", _) => anything(req, peer).await,
        _ => not_found(),
    }
}

/// `/status/{codes}`.
fn status(codes: &str) -> Response<Full<Bytes>> {
    let code = if codes.contains(',') {
        let mut choices = Vec::new();
        for choice in codes.split(',') {
            let (code, weight) = match choice.split_once(':') {
                Some((c, w)) => (c, w.trim().parse::<f64>().ok()),
                None => (choice, Some(1.0)),
            };
            match (code.trim().parse::<u16>(), weight) {
                (Ok(c), Some(w)) if w.is_finite() && w >= 0.0 => choices.push((c, w)),
                _ => return invalid_status(),
            }
        }
        weighted_choice(&choices, rand::random::<f64>())
    } else {
        codes.trim().parse::<u16>().ok()
    };
    let Some(status) = code.and_then(|c| StatusCode::from_u16(c).ok()) else {
        return invalid_status();
    };
    let mut resp = response(status, "text/html; charset=utf-8", "");
    let h = resp.headers_mut();
    match status.as_u16() {
        301 | 302 | 303 | 305 | 307 => {
            h.insert("location", HeaderValue::from_static("/redirect/1"));
        }
        401 => {
            h.insert("www-authenticate", HeaderValue::from_static("Basic realm=\"Fake Realm\""));
        }
        407 => {
            h.insert("proxy-authenticate", HeaderValue::from_static("Basic realm=\"Fake Realm\""));
        }
        418 => {
            h.insert("x-more-info", HeaderValue::from_static("http://tools.ietf.org/html/rfc2324"));
            *resp.body_mut() = Full::new(Bytes::from_static(b"\n    -=[ teapot ]=-\n"));
        }
        _ => {}
    }
    resp
}

/// Picks from `(code, weight)` with `r` in [0, 1), as httpbin's `weighted_choice`.
fn weighted_choice(choices: &[(u16, f64)], r: f64) -> Option<u16> {
    let total: f64 = choices.iter().map(|c| c.1).sum();
    if total <= 0.0 {
        return choices.first().map(|c| c.0);
    }
    let mut upto = 0.0;
    let target = r * total;
    for &(code, weight) in choices {
        upto += weight;
        if target < upto {
            return Some(code);
        }
    }
    choices.last().map(|c| c.0)
}

fn invalid_status() -> Response<Full<Bytes>> {
    response(StatusCode::BAD_REQUEST, "text/html; charset=utf-8", "Invalid status code")
}

/// `/delay/{n}`: seconds, fractional allowed, at most 10.
async fn delay(req: Request<Incoming>, peer: SocketAddr, n: &str) -> Response<Full<Bytes>> {
    let secs = match n.trim().parse::<f64>() {
        Ok(s) if s.is_finite() => s.clamp(0.0, MAX_DELAY),
        _ => return response(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", "delay must be a number\n"),
    };
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (mut doc, _) = with_body(req, peer).await;
    if let Value::Object(m) = &mut doc {
        m.remove("json");
        m.remove("method");
    }
    json_ok(&doc)
}

/// `/anything[/...]`: everything about the request.
async fn anything(req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    match with_body(req, peer).await {
        (doc, true) => json_ok(&doc),
        (_, false) => response(StatusCode::PAYLOAD_TOO_LARGE, "text/plain; charset=utf-8", "body too large\n"),
    }
}

/// `/get`'s document.
fn get_like<B>(req: &Request<B>, peer: SocketAddr) -> Value {
    json!({
        "args": args(req),
        "headers": headers(req, show_env(req)),
        "origin": origin(req.headers(), peer),
        "url": url(req),
    })
}

/// `/anything`'s document, and whether the body was read whole.
async fn with_body(req: Request<Incoming>, peer: SocketAddr) -> (Value, bool) {
    let mut doc = get_like(&req, peer);
    let method = req.method().to_string();
    let is_json = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return (doc, false),
    };
    let data = String::from_utf8_lossy(&body).into_owned();
    let parsed = if is_json { serde_json::from_slice::<Value>(&body).ok() } else { None };
    if let Value::Object(m) = &mut doc {
        m.insert("data".into(), Value::String(data));
        m.insert("files".into(), json!({}));
        m.insert("form".into(), json!({}));
        m.insert("json".into(), parsed.unwrap_or(Value::Null));
        m.insert("method".into(), Value::String(method));
    }
    (doc, true)
}

/// The request's headers as httpbin shows them: title-cased names, repeated headers
/// joined with commas, sorted.
fn headers<B>(req: &Request<B>, show_env: bool) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in req.headers() {
        if !show_env && ENV_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.entry(title_case(name.as_str()))
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    out
}

/// Python's `str.title()`, as Werkzeug applies it to header names: a letter is upper case
/// after anything that is not a letter, lower case otherwise (`x-b3-traceid` ->
/// `X-B3-Traceid`).
fn title_case(name: &str) -> String {
    let mut prev_letter = false;
    name.chars()
        .map(|c| {
            let out = if prev_letter { c.to_ascii_lowercase() } else { c.to_ascii_uppercase() };
            prev_letter = c.is_ascii_alphabetic();
            out
        })
        .collect()
}

fn show_env<B>(req: &Request<B>) -> bool {
    req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv.split('=').next() == Some("show_env")))
}

/// The caller: `X-Forwarded-For` when present (httpbin's rule), else the peer's address.
fn origin(headers: &HeaderMap, peer: SocketAddr) -> String {
    headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| peer.ip().to_string())
}

/// Query arguments; a repeated one becomes a list.
fn args<B>(req: &Request<B>) -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    for pair in req.uri().query().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k), Value::String(percent_decode(v)));
        match out.get_mut(&k) {
            Some(Value::Array(a)) => a.push(v),
            Some(prev) => *prev = Value::Array(vec![prev.clone(), v]),
            None => {
                out.insert(k, v);
            }
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL the client asked for: `http://<Host><path?query>`.
fn url<B>(req: &Request<B>) -> String {
    if req.uri().scheme().is_some() {
        return req.uri().to_string();
    }
    let host = req.headers().get("host").and_then(|v| v.to_str().ok()).unwrap_or("localhost");
    let target = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("http://{host}{target}")
}

fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

fn index() -> Response<Full<Bytes>> {
    response(
        StatusCode::OK,
        "text/html; charset=utf-8",
        "<!DOCTYPE html>\n<html><head><title>httpbin (weft demo)</title></head><body>\n<h1>httpbin (weft demo)</h1>\n<ul>\n<li>/status/:code (also 200,503 or 200:3,503:1, chosen at random)</li>\n<li>/delay/:n (at most 10 s)</li>\n<li>/headers, /ip, /user-agent, /uuid, /get, /anything</li>\n</ul>\n</body></html>\n",
    )
}

fn json_ok(v: &Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_string_pretty(v).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    let mut resp = response(StatusCode::OK, "application/json", text);
    resp.headers_mut().insert("access-control-allow-origin", HeaderValue::from_static("*"));
    resp.headers_mut().insert("access-control-allow-credentials", HeaderValue::from_static("true"));
    resp
}

fn not_found() -> Response<Full<Bytes>> {
    response(StatusCode::NOT_FOUND, "text/html; charset=utf-8", "<h1>Not Found</h1>\n")
}

fn method_not_allowed() -> Response<Full<Bytes>> {
    response(StatusCode::METHOD_NOT_ALLOWED, "text/html; charset=utf-8", "<h1>Method Not Allowed</h1>\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_are_title_cased_like_werkzeug() {
        assert_eq!(title_case("x-b3-traceid"), "X-B3-Traceid");
        assert_eq!(title_case("user-agent"), "User-Agent");
        assert_eq!(title_case("x-envoy-attempt-count"), "X-Envoy-Attempt-Count");
        assert_eq!(title_case("b3x"), "B3X");
    }

    #[test]
    fn weighted_choice_follows_the_weights() {
        let c = [(200, 3.0), (503, 1.0)];
        assert_eq!(weighted_choice(&c, 0.0), Some(200));
        assert_eq!(weighted_choice(&c, 0.74), Some(200));
        assert_eq!(weighted_choice(&c, 0.76), Some(503));
        assert_eq!(weighted_choice(&c, 0.999), Some(503));
        assert_eq!(weighted_choice(&[(200, 0.0)], 0.5), Some(200));
    }

    #[test]
    fn bad_status_lists_are_400() {
        for bad in ["abc", "200,x", "200:x,503", "99999", "200:-1,503"] {
            assert_eq!(status(bad).status(), StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(status("418").status().as_u16(), 418);
        assert_eq!(status("503,503").status().as_u16(), 503);
    }

    #[test]
    fn query_args_decode_and_repeat() {
        let req = Request::get("/get?a=1&a=2&b=x%20y+z&c").body(()).unwrap();
        let a = args(&req);
        assert_eq!(a["a"], json!(["1", "2"]));
        assert_eq!(a["b"], json!("x y z"));
        assert_eq!(a["c"], json!(""));
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn uuid_is_version_4() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
