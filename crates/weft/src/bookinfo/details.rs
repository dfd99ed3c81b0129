//! details: `GET /details/{id}` answers the book's details as JSON (Istio's `details.rb`):
//! a non-numeric id is a 400 with `{"error": "please provide numeric product id"}`;
//! `GET /health` answers `{"status": "Details is healthy"}`.

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use super::{json_response, method_not_allowed, not_found};

/// One book's details, fields in the order Istio's service writes them.
#[derive(Serialize)]
struct BookDetails {
    id: i64,
    author: &'static str,
    year: u32,
    #[serde(rename = "type")]
    kind: &'static str,
    pages: u32,
    publisher: &'static str,
    language: &'static str,
    #[serde(rename = "ISBN-10")]
    isbn10: &'static str,
    #[serde(rename = "ISBN-13")]
    isbn13: &'static str,
}

/// Answers one request.
pub async fn handle(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == "/health" {
        return json_response(StatusCode::OK, r#"{"status":"Details is healthy"}"#);
    }
    if path != "/details" && !path.starts_with("/details/") {
        return not_found();
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return method_not_allowed();
    }
    // Like Ruby's `path.split('/')`: trailing empty parts are dropped, the last part is the id.
    let last = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    match last.trim().parse::<i64>() {
        Ok(id) => json_response(StatusCode::OK, book_details(id)),
        Err(_) => json_response(StatusCode::BAD_REQUEST, r#"{"error":"please provide numeric product id"}"#),
    }
}

fn book_details(id: i64) -> String {
    let details = BookDetails {
        id,
        author: "William Shakespeare",
        year: 1595,
        kind: "paperback",
        pages: 200,
        publisher: "PublisherA",
        language: "English",
        isbn10: "1234567890",
        isbn13: "123-1234567890",
    };
    serde_json::to_string(&details).unwrap_or_default()
}
