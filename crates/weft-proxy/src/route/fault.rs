//! Fault injection of a route (`envoy.extensions.filters.http.fault.v3.HTTPFault`,
//! found in `typed_per_filter_config["envoy.filters.http.fault"]`).

use std::time::Duration;

use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{fault_abort::ErrorType, HttpFault};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use super::matcher::{Fraction, HeaderMatcher};
use super::to_duration;

/// A compiled fault policy.
#[derive(Debug, Clone)]
pub struct FaultPolicy {
    delay: Option<(Duration, Fraction)>,
    abort: Option<(Abort, Fraction)>,
    headers: Vec<HeaderMatcher>,
}

/// The faults to inject into one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FaultDecision {
    /// Delay the request by this much before forwarding it.
    pub delay: Option<Duration>,
    /// Answer locally instead of forwarding.
    pub abort: Option<Abort>,
}

/// How an aborted request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// An HTTP response with this status.
    Http(http::StatusCode),
    /// A gRPC trailers-only response with this `grpc-status` (HTTP 200).
    Grpc(u32),
}

impl FaultPolicy {
    /// Compiles an `HTTPFault`. Fields that would change behaviour and that weft does
    /// not implement (header-controlled faults, rate limits, upstream cluster and
    /// downstream node filters, max active faults, custom abort bodies) are rejected.
    pub fn compile(f: &HttpFault) -> Result<FaultPolicy, String> {
        if f.response_rate_limit.is_some() {
            return Err("response_rate_limit is not supported".into());
        }
        if !f.upstream_cluster.is_empty() {
            return Err("upstream_cluster is not supported".into());
        }
        if !f.downstream_nodes.is_empty() {
            return Err("downstream_nodes is not supported".into());
        }
        if f.max_active_faults.is_some() {
            return Err("max_active_faults is not supported".into());
        }
        let delay = match &f.delay {
            None => None,
            Some(d) => {
                let dur = match &d.fault_delay_secifier {
                    Some(FaultDelaySecifier::FixedDelay(fd)) => {
                        to_duration(fd, "delay.fixed_delay").map_err(|(a, m)| format!("{a}: {m}"))?
                    }
                    Some(FaultDelaySecifier::HeaderDelay(_)) => {
                        return Err("delay.header_delay is not supported".into())
                    }
                    None => return Err("delay.fixed_delay is required".into()),
                };
                Some((dur, fraction(d.percentage.as_ref(), "delay.percentage")?))
            }
        };
        let abort = match &f.abort {
            None => None,
            Some(a) => {
                if !a.response_body.is_empty() {
                    return Err("abort.response_body is not supported".into());
                }
                let kind = match &a.error_type {
                    Some(ErrorType::HttpStatus(s)) => {
                        let code = u16::try_from(*s)
                            .ok()
                            .filter(|c| (200..600).contains(c))
                            .and_then(|c| http::StatusCode::from_u16(c).ok())
                            .ok_or_else(|| format!("abort.http_status: {s} is not in [200, 600)"))?;
                        Abort::Http(code)
                    }
                    Some(ErrorType::GrpcStatus(s)) => Abort::Grpc(*s),
                    Some(ErrorType::HeaderAbort(_)) => return Err("abort.header_abort is not supported".into()),
                    None => return Err("abort.error_type is required".into()),
                };
                Some((kind, fraction(a.percentage.as_ref(), "abort.percentage")?))
            }
        };
        let headers = f
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| HeaderMatcher::compile(h, &format!("headers[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|(a, m)| format!("{a}: {m}"))?;
        Ok(FaultPolicy { delay, abort, headers })
    }

    /// Decodes and compiles a packed `HTTPFault` (the type URL is checked).
    pub fn from_any(any: &Any) -> Result<FaultPolicy, String> {
        if any.type_url != HttpFault::type_url() {
            return Err(format!("expected {}, got {}", HttpFault::type_url(), any.type_url));
        }
        let f = HttpFault::decode(any.value.as_slice()).map_err(|e| format!("cannot decode HTTPFault: {e}"))?;
        FaultPolicy::compile(&f)
    }

    /// Whether the fault applies to a request with these headers (`HTTPFault.headers`:
    /// all must match; none configured means every request).
    pub fn applies_to(&self, headers: &http::HeaderMap) -> bool {
        self.headers.iter().all(|m| m.matches_headers(headers))
    }

    /// Decides the faults of one request: the delay fires when
    /// `r1 % denominator < numerator` of the delay percentage, the abort likewise with
    /// `r2` (Envoy's `featureEnabled`). An unset percentage is 0 %, as in Envoy.
    pub fn decide(&self, r1: u64, r2: u64) -> FaultDecision {
        FaultDecision {
            delay: self.delay.as_ref().and_then(|(d, f)| f.hit(r1).then_some(*d)),
            abort: self.abort.as_ref().and_then(|(a, f)| f.hit(r2).then_some(*a)),
        }
    }
}

fn fraction(fp: Option<&envoy_types::pb::envoy::r#type::v3::FractionalPercent>, at: &str) -> Result<Fraction, String> {
    match fp {
        None => Ok(Fraction { numerator: 0, denominator: 100 }),
        Some(fp) => Fraction::compile(fp, at).map_err(|(a, m)| format!("{a}: {m}")),
    }
}
