//! Compiles an HTTP connection manager's `tracing` field (Envoy's
//! `HttpConnectionManager.Tracing`) into a [`TracingConfig`]: the provider spans go to,
//! the sampling percentages and the custom tags.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{grpc_service, http_uri};
use envoy_types::pb::envoy::config::trace::v3::tracing::http::ConfigType;
use envoy_types::pb::envoy::config::trace::v3::{OpenTelemetryConfig, ZipkinConfig};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing;
use envoy_types::pb::envoy::r#type::tracing::v3::custom_tag;
use envoy_types::pb::envoy::r#type::v3::Percent;
use http::HeaderName;
use prost::Name;

use crate::proto::{decode, opt_duration};

/// Sampling percentages are kept in ten-thousandths, as Envoy evaluates them.
pub const SAMPLING_DENOMINATOR: u64 = 10_000;

/// Envoy's default `max_path_tag_length`.
pub const DEFAULT_MAX_PATH_TAG_LENGTH: usize = 256;

/// How long one export may take when the provider names no timeout.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// A compiled `HttpConnectionManager.tracing`.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// Where spans go; `None` propagates and samples but reports nothing (Istio's
    /// `disableSpanReporting`).
    pub provider: Option<Arc<Provider>>,
    /// `random_sampling` in ten-thousandths (Envoy's default: 100%).
    pub random_sampling: u64,
    /// `client_sampling` (requests carrying `x-client-trace-id`), ten-thousandths.
    pub client_sampling: u64,
    /// `overall_sampling`: the cap applied after the others, ten-thousandths.
    pub overall_sampling: u64,
    /// Longest `http.url` tag, in bytes.
    pub max_path_tag_length: usize,
    /// Tags added to every span.
    pub custom_tags: Vec<CustomTag>,
}

/// A tracing provider: the collector cluster and the wire format.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Provider {
    /// `provider.name` (for logs).
    pub name: String,
    /// The CDS cluster whose endpoints receive the spans.
    pub cluster: String,
    /// The wire format and its settings.
    pub sink: Sink,
    /// `service.name` of the spans (empty: the proxy's own, see `Tracer`).
    pub service_name: String,
    /// Per-export timeout.
    pub timeout: Duration,
}

/// How spans are sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sink {
    /// OTLP over gRPC: `TraceService/Export` to the cluster, with this `:authority`.
    OtlpGrpc {
        /// `envoy_grpc.authority`, else the cluster name (Envoy's default).
        authority: String,
    },
    /// OTLP over HTTP, protobuf body, `POST` to the URI's path.
    OtlpHttp {
        /// The `Host` header (the URI's authority).
        host: String,
        /// The request path, usually `/v1/traces`.
        path: String,
    },
    /// Zipkin v2 JSON, `POST` to `collector_endpoint`.
    Zipkin {
        /// `collector_hostname`, else the cluster name.
        host: String,
        /// `collector_endpoint`, e.g. `/api/v2/spans`.
        path: String,
        /// New traces get 128-bit ids (else 64-bit, as Envoy's Zipkin tracer).
        trace_id_128bit: bool,
        /// A server span reuses its caller's span id (Zipkin's default; Istio turns it off).
        shared_span_context: bool,
    },
}

/// Envoy's `CustomTag`, the kinds weft supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomTag {
    /// A fixed value.
    Literal {
        /// Tag name.
        tag: String,
        /// Value.
        value: String,
    },
    /// An environment variable of the proxy, read when the configuration is compiled.
    Environment {
        /// Tag name.
        tag: String,
        /// The variable's value, else the default; `None`: no tag.
        value: Option<String>,
    },
    /// A request header.
    RequestHeader {
        /// Tag name.
        tag: String,
        /// Header to read.
        name: HeaderName,
        /// Value when the header is absent (empty: no tag).
        default_value: String,
    },
}

impl TracingConfig {
    /// Compiles `HttpConnectionManager.tracing`. Errors are `(field, message)` with the
    /// field relative to `tracing`.
    pub fn compile(t: &Tracing) -> Result<TracingConfig, (String, String)> {
        let provider = match &t.provider {
            None => None,
            Some(p) => Some(Arc::new(compile_provider(p).map_err(|(f, m)| (join("provider", &f), m))?)),
        };
        let max_path_tag_length = t.max_path_tag_length.map_or(DEFAULT_MAX_PATH_TAG_LENGTH, |v| v.value as usize);
        let mut custom_tags = Vec::with_capacity(t.custom_tags.len());
        for (i, tag) in t.custom_tags.iter().enumerate() {
            custom_tags.push(compile_tag(tag).map_err(|(f, m)| (join(&format!("custom_tags[{i}]"), &f), m))?);
        }
        Ok(TracingConfig {
            provider,
            random_sampling: percent(t.random_sampling.as_ref(), "random_sampling")?,
            client_sampling: percent(t.client_sampling.as_ref(), "client_sampling")?,
            overall_sampling: percent(t.overall_sampling.as_ref(), "overall_sampling")?,
            max_path_tag_length,
            custom_tags,
        })
    }
}

/// An `envoy.type.v3.Percent` (unset: 100%) in ten-thousandths.
fn percent(p: Option<&Percent>, field: &str) -> Result<u64, (String, String)> {
    let Some(p) = p else { return Ok(SAMPLING_DENOMINATOR) };
    if !(0.0..=100.0).contains(&p.value) {
        return Err((format!("{field}.value"), format!("{} is outside 0..=100 (a percentage)", p.value)));
    }
    Ok((p.value * 100.0).round() as u64)
}

fn compile_provider(
    p: &envoy_types::pb::envoy::config::trace::v3::tracing::Http,
) -> Result<Provider, (String, String)> {
    let Some(ConfigType::TypedConfig(any)) = &p.config_type else {
        return Err(("typed_config".into(), format!("tracing provider {:?} needs a typed_config", p.name)));
    };
    let at = |f: &str| join("typed_config", f);
    if any.type_url == OpenTelemetryConfig::type_url() {
        let c = decode::<OpenTelemetryConfig>(any).map_err(|m| ("typed_config".to_string(), m))?;
        let (cluster, sink, timeout) = match (&c.grpc_service, &c.http_service) {
            (Some(g), None) => {
                let Some(grpc_service::TargetSpecifier::EnvoyGrpc(e)) = &g.target_specifier else {
                    return Err((
                        at("grpc_service"),
                        "only envoy_grpc is supported (google_grpc is not); name the collector cluster in envoy_grpc.cluster_name".into(),
                    ));
                };
                if e.cluster_name.is_empty() {
                    return Err((
                        at("grpc_service.envoy_grpc.cluster_name"),
                        "missing: name the collector's cluster".into(),
                    ));
                }
                let authority = if e.authority.is_empty() { e.cluster_name.clone() } else { e.authority.clone() };
                (e.cluster_name.clone(), Sink::OtlpGrpc { authority }, opt_duration(g.timeout.as_ref()))
            }
            (None, Some(h)) => {
                let Some(uri) = &h.http_uri else {
                    return Err((at("http_service.http_uri"), "missing: set uri and cluster".into()));
                };
                let cluster = match &uri.http_upstream_type {
                    Some(http_uri::HttpUpstreamType::Cluster(c)) if !c.is_empty() => c.clone(),
                    _ => {
                        return Err((
                            at("http_service.http_uri.cluster"),
                            "missing: name the collector's cluster".into(),
                        ))
                    }
                };
                let (host, path) = split_uri(&uri.uri).map_err(|m| (at("http_service.http_uri.uri"), m))?;
                (cluster, Sink::OtlpHttp { host, path }, opt_duration(uri.timeout.as_ref()))
            }
            (Some(_), Some(_)) => {
                return Err((at("grpc_service"), "set either grpc_service or http_service, not both".into()));
            }
            (None, None) => {
                return Err((
                    at("grpc_service"),
                    "missing: set grpc_service (OTLP/gRPC) or http_service (OTLP/HTTP)".into(),
                ));
            }
        };
        if c.exporter.is_some() {
            return Err((
                at("exporter"),
                "custom exporters are not supported; use grpc_service or http_service".into(),
            ));
        }
        return Ok(Provider {
            name: p.name.clone(),
            cluster,
            sink,
            service_name: c.service_name.clone(),
            timeout: timeout.filter(|d| !d.is_zero()).unwrap_or(DEFAULT_EXPORT_TIMEOUT),
        });
    }
    if any.type_url == ZipkinConfig::type_url() {
        let c = decode::<ZipkinConfig>(any).map_err(|m| ("typed_config".to_string(), m))?;
        if c.collector_cluster.is_empty() {
            return Err((at("collector_cluster"), "missing: name the collector's cluster".into()));
        }
        if c.collector_endpoint.is_empty() || !c.collector_endpoint.starts_with('/') {
            return Err((
                at("collector_endpoint"),
                format!("{:?} is not a path; expected e.g. \"/api/v2/spans\"", c.collector_endpoint),
            ));
        }
        // 0 is Envoy's deprecated default, treated as JSON; HTTP_PROTO (2) and GRPC (3) are not supported.
        if c.collector_endpoint_version > 1 {
            return Err((
                at("collector_endpoint_version"),
                format!("{} is not supported; use HTTP_JSON", c.collector_endpoint_version),
            ));
        }
        let host = if c.collector_hostname.is_empty() { c.collector_cluster.clone() } else { c.collector_hostname };
        return Ok(Provider {
            name: p.name.clone(),
            cluster: c.collector_cluster,
            sink: Sink::Zipkin {
                host,
                path: c.collector_endpoint,
                trace_id_128bit: c.trace_id_128bit,
                shared_span_context: c.shared_span_context.is_none_or(|b| b.value),
            },
            service_name: String::new(),
            timeout: DEFAULT_EXPORT_TIMEOUT,
        });
    }
    Err((
        "typed_config".into(),
        format!(
            "unsupported tracing provider {:?} ({}); expected {} or {}",
            p.name,
            any.type_url,
            OpenTelemetryConfig::type_url(),
            ZipkinConfig::type_url()
        ),
    ))
}

/// `http://host[:port]/path` -> (host[:port], /path).
fn split_uri(uri: &str) -> Result<(String, String), String> {
    let parsed: http::Uri = uri.parse().map_err(|e| format!("{uri:?} is not a URI: {e}"))?;
    let Some(authority) = parsed.authority() else {
        return Err(format!("{uri:?} needs a host, e.g. \"http://otel-collector:4318/v1/traces\""));
    };
    let path = parsed.path_and_query().map_or("/", |p| p.as_str());
    Ok((authority.as_str().to_string(), if path.is_empty() { "/".into() } else { path.to_string() }))
}

fn compile_tag(t: &envoy_types::pb::envoy::r#type::tracing::v3::CustomTag) -> Result<CustomTag, (String, String)> {
    if t.tag.is_empty() {
        return Err(("tag".into(), "a custom tag needs a name".into()));
    }
    let tag = t.tag.clone();
    Ok(match &t.r#type {
        Some(custom_tag::Type::Literal(l)) => CustomTag::Literal { tag, value: l.value.clone() },
        Some(custom_tag::Type::Environment(e)) => {
            if e.name.is_empty() {
                return Err(("environment.name".into(), "missing: name the environment variable".into()));
            }
            let value = std::env::var(&e.name).ok().or_else(|| Some(e.default_value.clone()).filter(|d| !d.is_empty()));
            CustomTag::Environment { tag, value }
        }
        Some(custom_tag::Type::RequestHeader(h)) => {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| ("request_header.name".to_string(), format!("{:?} is not a header name", h.name)))?;
            CustomTag::RequestHeader { tag, name, default_value: h.default_value.clone() }
        }
        // Metadata and formatter-value tags need the route's and cluster's metadata or
        // Envoy's formatter, which weft does not have: rejected rather than dropped.
        Some(custom_tag::Type::Metadata(_)) => {
            return Err(("metadata".into(), "metadata custom tags are not supported by weft".into()))
        }
        Some(custom_tag::Type::Value(_)) => {
            return Err(("value".into(), "formatter-value custom tags are not supported by weft".into()))
        }
        None => return Err(("type".into(), "one of literal, environment or request_header is required".into())),
    })
}

fn join(a: &str, b: &str) -> String {
    if b.is_empty() {
        a.to_string()
    } else {
        format!("{a}.{b}")
    }
}
