//! reviews: `GET /reviews/{id}` answers two reviews as JSON (Istio's `LibertyRestEndpoint`),
//! with `podname` (so a caller sees which version answered) and `clustername`. v1 has no
//! ratings; v2 (black stars) and v3 (red stars) call ratings, forwarding the trace headers
//! and `end-user`, and report `"Ratings service is currently unavailable"` when it fails.
//! The ratings call times out after 10 s with black stars and 2.5 s otherwise, as Istio's
//! images do. `GET /health` answers `{"status": "Reviews is healthy"}`.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tracing::warn;

use super::client::{copy_headers, HttpClient, REVIEWS_FORWARD};
use super::{json_response, method_not_allowed, not_found, BookinfoConfig, Upstream};

/// What a failed ratings call leaves in each review.
pub const RATINGS_UNAVAILABLE: &str = "Ratings service is currently unavailable";

/// The reviews service's settings.
pub struct Reviews {
    ratings_enabled: bool,
    star_color: String,
    pod_name: String,
    cluster_name: String,
    ratings: Upstream,
    ratings_timeout: Duration,
    client: HttpClient,
}

#[derive(Serialize)]
struct ReviewsReply<'a> {
    id: String,
    podname: &'a str,
    clustername: &'a str,
    reviews: [Review<'a>; 2],
}

#[derive(Serialize)]
struct Review<'a> {
    reviewer: &'static str,
    text: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rating: Option<Rating<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Rating<'a> {
    Stars { stars: i64, color: &'a str },
    Error { error: &'static str },
}

impl Reviews {
    /// The reviews service described by `config`.
    pub fn new(config: &BookinfoConfig, client: HttpClient) -> Self {
        Reviews {
            ratings_enabled: config.ratings_enabled,
            star_color: config.star_color.clone(),
            pod_name: config.pod_name.clone(),
            cluster_name: config.cluster_name.clone(),
            ratings: config.ratings.clone(),
            ratings_timeout: if config.star_color == "black" {
                Duration::from_secs(10)
            } else {
                Duration::from_millis(2500)
            },
            client,
        }
    }

    /// The stars of Reviewer1 and Reviewer2, `None` for each the ratings service did not give.
    async fn fetch_ratings(&self, id: i32, incoming: &hyper::HeaderMap) -> (Option<i64>, Option<i64>) {
        let mut headers = copy_headers(incoming, REVIEWS_FORWARD);
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let path = format!("/ratings/{id}");
        let reply = match self.client.get(&self.ratings, &path, headers, self.ratings_timeout).await {
            Ok(r) if r.status == StatusCode::OK => r,
            Ok(r) => {
                warn!("unable to contact ratings at {}: status {}", self.ratings.authority, r.status);
                return (None, None);
            }
            Err(e) => {
                warn!("unable to contact ratings: {e:#}");
                return (None, None);
            }
        };
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(&reply.body) else {
            warn!("ratings at {} answered something other than JSON", self.ratings.authority);
            return (None, None);
        };
        let stars = |who: &str| json.get("ratings").and_then(|r| r.get(who)).and_then(|v| v.as_i64());
        (stars("Reviewer1"), stars("Reviewer2"))
    }

    fn rating(&self, stars: Option<i64>) -> Option<Rating<'_>> {
        if !self.ratings_enabled {
            return None;
        }
        Some(match stars {
            Some(stars) => Rating::Stars { stars, color: &self.star_color },
            None => Rating::Error { error: RATINGS_UNAVAILABLE },
        })
    }
}

/// Answers one request.
pub async fn handle(state: Arc<Reviews>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == "/health" {
        return json_response(StatusCode::OK, r#"{"status": "Reviews is healthy"}"#);
    }
    let Some(id) = path.strip_prefix("/reviews/").and_then(|id| id.parse::<i32>().ok()) else {
        return not_found();
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return method_not_allowed();
    }
    let (stars1, stars2) =
        if state.ratings_enabled { state.fetch_ratings(id, req.headers()).await } else { (None, None) };
    let reply = ReviewsReply {
        id: id.to_string(),
        podname: &state.pod_name,
        clustername: &state.cluster_name,
        reviews: [
            Review {
                reviewer: "Reviewer1",
                text: "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!",
                rating: state.rating(stars1),
            },
            Review {
                reviewer: "Reviewer2",
                text: "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare.",
                rating: state.rating(stars2),
            },
        ],
    };
    json_response(StatusCode::OK, serde_json::to_string(&reply).unwrap_or_default())
}
