use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{grpc_service, http_uri, GrpcService, HttpService, HttpUri};
use envoy_types::pb::envoy::config::trace::v3::tracing::http::ConfigType;
use envoy_types::pb::envoy::config::trace::v3::tracing::Http as TracingHttp;
use envoy_types::pb::envoy::config::trace::v3::{OpenTelemetryConfig, ZipkinConfig};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing;
use envoy_types::pb::envoy::r#type::tracing::v3::{custom_tag, CustomTag as PbCustomTag};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::Any;
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use prost::{Message, Name};

use super::context::{parse_b3_single, parse_traceparent, Incoming, Outgoing};
use super::*;

fn any<M: Message + Name>(m: &M) -> Any {
    Any { type_url: M::type_url(), value: m.encode_to_vec() }
}

fn otel_grpc(cluster: &str) -> TracingHttp {
    let cfg = OpenTelemetryConfig {
        grpc_service: Some(GrpcService {
            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(grpc_service::EnvoyGrpc {
                cluster_name: cluster.into(),
                ..Default::default()
            })),
            ..Default::default()
        }),
        service_name: "reviews.default".into(),
        ..Default::default()
    };
    TracingHttp { name: "otel".into(), config_type: Some(ConfigType::TypedConfig(any(&cfg))) }
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    h
}

#[test]
fn config_reads_otel_grpc_provider_and_sampling() {
    let t = Tracing {
        provider: Some(otel_grpc("outbound|4317||otel.istio-system.svc.cluster.local")),
        random_sampling: Some(Percent { value: 1.0 }),
        ..Default::default()
    };
    let c = TracingConfig::compile(&t).unwrap();
    assert_eq!(c.random_sampling, 100);
    assert_eq!(c.overall_sampling, 10_000, "unset percentages are Envoy's 100%");
    let p = c.provider.unwrap();
    assert_eq!(p.cluster, "outbound|4317||otel.istio-system.svc.cluster.local");
    assert!(matches!(&p.sink, Sink::OtlpGrpc { authority } if authority == &p.cluster));
    assert_eq!(c.max_path_tag_length, 256);
}

#[test]
fn config_reads_otel_http_and_zipkin_providers() {
    let cfg = OpenTelemetryConfig {
        http_service: Some(HttpService {
            http_uri: Some(HttpUri {
                uri: "http://otel:4318/v1/traces".into(),
                http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster("otel".into())),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let t = Tracing {
        provider: Some(TracingHttp { name: "h".into(), config_type: Some(ConfigType::TypedConfig(any(&cfg))) }),
        ..Default::default()
    };
    let p = TracingConfig::compile(&t).unwrap().provider.unwrap();
    assert_eq!(p.sink, Sink::OtlpHttp { host: "otel:4318".into(), path: "/v1/traces".into() });

    let z = ZipkinConfig {
        collector_cluster: "zipkin".into(),
        collector_endpoint: "/api/v2/spans".into(),
        collector_endpoint_version: 1,
        shared_span_context: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
        ..Default::default()
    };
    let t = Tracing {
        provider: Some(TracingHttp { name: "z".into(), config_type: Some(ConfigType::TypedConfig(any(&z))) }),
        ..Default::default()
    };
    let p = TracingConfig::compile(&t).unwrap().provider.unwrap();
    assert_eq!(
        p.sink,
        Sink::Zipkin {
            host: "zipkin".into(),
            path: "/api/v2/spans".into(),
            trace_id_128bit: false,
            shared_span_context: false
        }
    );
}

#[test]
fn config_rejects_bad_providers_sampling_and_tags_precisely() {
    let unknown = Tracing {
        provider: Some(TracingHttp {
            name: "dd".into(),
            config_type: Some(ConfigType::TypedConfig(Any {
                type_url: "type.googleapis.com/envoy.config.trace.v3.DatadogConfig".into(),
                value: vec![],
            })),
        }),
        ..Default::default()
    };
    let (field, msg) = TracingConfig::compile(&unknown).unwrap_err();
    assert_eq!(field, "provider.typed_config");
    assert!(msg.contains("unsupported tracing provider") && msg.contains("DatadogConfig"), "{msg}");

    let (field, msg) =
        TracingConfig::compile(&Tracing { provider: Some(otel_grpc("")), ..Default::default() }).unwrap_err();
    assert_eq!(field, "provider.typed_config.grpc_service.envoy_grpc.cluster_name");
    assert!(msg.contains("missing"), "{msg}");

    let z = ZipkinConfig { collector_endpoint: "/api/v2/spans".into(), ..Default::default() };
    let t = Tracing {
        provider: Some(TracingHttp { name: "z".into(), config_type: Some(ConfigType::TypedConfig(any(&z))) }),
        ..Default::default()
    };
    assert_eq!(TracingConfig::compile(&t).unwrap_err().0, "provider.typed_config.collector_cluster");

    for bad in [-1.0, 100.5, f64::NAN] {
        let t = Tracing { random_sampling: Some(Percent { value: bad }), ..Default::default() };
        let (field, msg) = TracingConfig::compile(&t).unwrap_err();
        assert_eq!(field, "random_sampling.value");
        assert!(msg.contains("outside 0..=100"), "{msg}");
    }

    let t = Tracing {
        custom_tags: vec![PbCustomTag {
            tag: "h".into(),
            r#type: Some(custom_tag::Type::RequestHeader(custom_tag::Header {
                name: "bad header".into(),
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    assert_eq!(TracingConfig::compile(&t).unwrap_err().0, "custom_tags[0].request_header.name");
    // A metadata tag weft cannot fill is rejected, not silently dropped.
    let t = Tracing {
        custom_tags: vec![PbCustomTag {
            tag: "m".into(),
            r#type: Some(custom_tag::Type::Metadata(Default::default())),
        }],
        ..Default::default()
    };
    let (field, msg) = TracingConfig::compile(&t).unwrap_err();
    assert_eq!(field, "custom_tags[0].metadata");
    assert!(msg.contains("not supported"), "{msg}");
}

#[test]
fn traceparent_is_parsed_and_malformed_ones_are_absent() {
    let (ids, sampled) = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    assert_eq!(ids.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    assert_eq!(ids.span_id, 0x00f067aa0ba902b7);
    assert!(sampled);
    for bad in [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "garbage",
        "",
    ] {
        assert!(parse_traceparent(bad).is_none(), "{bad}");
    }
    // A later version may carry more fields.
    assert!(parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-xyz").is_some());
}

#[test]
fn b3_single_and_multi_are_parsed() {
    let s = parse_b3_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90").unwrap();
    let ids = s.ids.unwrap();
    assert_eq!(ids.trace_id, 0x80f198ee56343ba864fe8b2a57d3eff7);
    assert_eq!(ids.parent_id, Some(0x05e3ac9a4f6e3b90));
    assert_eq!(s.sampled, Some(true));
    assert!(s.b3_single);
    let deny = parse_b3_single("0").unwrap();
    assert_eq!((deny.ids, deny.sampled), (None, Some(false)));
    assert!(parse_b3_single("d").unwrap().debug);
    assert!(parse_b3_single("xyz-e457b5a2e4d86bd1").is_none());

    let m = Incoming::read(&headers(&[
        ("x-b3-traceid", "463ac35c9f6413ad"),
        ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ("x-b3-parentspanid", "0020000000000001"),
        ("x-b3-sampled", "0"),
    ]));
    let ids = m.ids.unwrap();
    assert_eq!(ids.trace_id, 0x463ac35c9f6413ad);
    assert_eq!(ids.span_id, 0xa2fb4a1d1a96d312);
    assert_eq!(m.sampled, Some(false));
    // Debug forces sampling.
    let d = Incoming::read(&headers(&[("x-b3-sampled", "0"), ("x-b3-flags", "1")]));
    assert_eq!((d.ids, d.sampled, d.debug), (None, Some(true), true));
    // traceparent wins over B3; a duplicated header is malformed.
    let both = Incoming::read(&headers(&[
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        ("x-b3-traceid", "463ac35c9f6413ad"),
        ("x-b3-spanid", "a2fb4a1d1a96d312"),
    ]));
    assert_eq!(both.ids.unwrap().trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    let dup = Incoming::read(&headers(&[
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ]));
    assert_eq!(dup, Incoming::default());
}

#[test]
fn outgoing_context_writes_w3c_and_b3_and_round_trips() {
    let out = Outgoing {
        trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
        span_id: 0x1111111111111111,
        parent_id: Some(0x00f067aa0ba902b7),
        sampled: true,
        debug: false,
        tracestate: Some(HeaderValue::from_static("rojo=00f067aa0ba902b7")),
        b3_single: true,
    };
    let mut h = headers(&[("x-b3-flags", "1")]);
    out.write(&mut h);
    assert_eq!(h["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01");
    assert_eq!(h["tracestate"], "rojo=00f067aa0ba902b7");
    assert_eq!(h["x-b3-traceid"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(h["x-b3-spanid"], "1111111111111111");
    assert_eq!(h["x-b3-parentspanid"], "00f067aa0ba902b7");
    assert_eq!(h["x-b3-sampled"], "1");
    assert!(!h.contains_key("x-b3-flags"));
    assert_eq!(h["b3"], "4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-1-00f067aa0ba902b7");
    let back = Incoming::read(&h);
    assert_eq!(back.ids.unwrap().span_id, 0x1111111111111111);
    assert_eq!(back.sampled, Some(true));
    // Values new with each request leave an HTTP/2 hop as never-indexed literals (they
    // would churn the HPACK table); the stable ones stay indexable.
    for unique in ["traceparent", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "b3"] {
        assert!(h[unique].is_sensitive(), "{unique} would be indexed");
    }
    assert!(!h["x-b3-sampled"].is_sensitive());
}

#[test]
fn sampling_follows_the_request_id_like_envoy() {
    let cfg = |pct: u64| TracingConfig {
        provider: None,
        random_sampling: pct,
        client_sampling: 10_000,
        overall_sampling: 10_000,
        max_path_tag_length: 256,
        custom_tags: vec![],
    };
    let h = HeaderMap::new();
    // 0x00000fa0 = 4000: sampled at 50% (4000 < 5000), not at 30%.
    assert!(decide(&cfg(5000), &h, "00000fa0-0000-4000-8000-000000000000"));
    assert!(!decide(&cfg(3000), &h, "00000fa0-0000-4000-8000-000000000000"));
    // Every proxy that sees the same request id decides the same.
    let id = format!("{:032x}", 0x1234_5678_u128 << 96);
    let first = decide(&cfg(3000), &h, &id);
    assert!((0..20).all(|_| decide(&cfg(3000), &h, &id) == first));
    // A UUID another Envoy marked sampled ('9' at position 14) stays sampled at 0%.
    assert!(decide(&cfg(0), &h, "ffffffff-0000-9000-8000-000000000000"));
    assert!(!decide(&cfg(0), &h, "ffffffff-0000-4000-8000-000000000000"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Arbitrary trace headers never panic, and whatever was read writes back as
    /// well-formed headers.
    #[test]
    fn arbitrary_trace_headers_never_panic(
        values in proptest::collection::vec((0usize..9, "[ -~]{0,70}"), 0..8),
        ids in proptest::collection::vec("[0-9a-f]{0,33}", 4),
    ) {
        let names = ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid",
            "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "x-request-id"];
        let mut h = HeaderMap::new();
        for (i, v) in &values {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.append(names[*i], v);
            }
        }
        if let Ok(v) = HeaderValue::from_str(&format!("00-{}-{}-{}", ids[0], ids[1], ids[2])) {
            h.append("traceparent", v);
        }
        if let Ok(v) = HeaderValue::from_str(&format!("{}-{}-1-{}", ids[0], ids[1], ids[3])) {
            h.append("b3", v);
        }
        let inc = Incoming::read(&h);
        let cfg = TracingConfig {
            provider: None, random_sampling: 3000, client_sampling: 10_000, overall_sampling: 10_000,
            max_path_tag_length: 256, custom_tags: vec![],
        };
        let rid = h.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let sampled = inc.sampled.unwrap_or_else(|| decide(&cfg, &h, &rid));
        let out = Outgoing {
            trace_id: inc.ids.map_or(1, |i| i.trace_id),
            span_id: 2,
            parent_id: inc.ids.map(|i| i.span_id),
            sampled,
            debug: inc.debug,
            tracestate: inc.tracestate.clone(),
            b3_single: inc.b3_single,
        };
        out.write(&mut h);
        let again = Incoming::read(&h);
        prop_assert_eq!(again.ids.map(|i| i.span_id), Some(2));
        prop_assert_eq!(again.sampled, Some(sampled));
    }
}

#[test]
fn otlp_and_zipkin_encodings_carry_ids_kind_and_tags() {
    let provider = Arc::new(Provider {
        name: "p".into(),
        cluster: "c".into(),
        sink: Sink::OtlpGrpc { authority: "c".into() },
        service_name: String::new(),
        timeout: std::time::Duration::from_secs(1),
    });
    let now = std::time::SystemTime::now();
    let s = SpanRecord {
        provider,
        service_name: "reviews.default".into(),
        trace_id: 0xabc,
        span_id: 0x10,
        parent_id: Some(0x20),
        name: "reviews.default.svc.cluster.local:9080/*".into(),
        kind: SpanKind::Server,
        start: now,
        end: now + std::time::Duration::from_millis(3),
        tags: vec![("http.status_code".into(), "503".into()), ("error".into(), "true".into())],
        error: true,
        shared: false,
        tracestate: String::new(),
        local_addr: "127.0.0.1:15006".parse().unwrap(),
        remote_addr: "127.0.0.2:40000".parse().unwrap(),
    };
    let req = export::otlp_request(std::slice::from_ref(&s));
    let span = &req.resource_spans[0].scope_spans[0].spans[0];
    assert_eq!(span.trace_id, 0xabc_u128.to_be_bytes().to_vec());
    assert_eq!(span.parent_span_id, 0x20_u64.to_be_bytes().to_vec());
    assert_eq!(span.kind, 2);
    assert_eq!(span.status.as_ref().map(|s| s.code), Some(2));
    let json: serde_json::Value = serde_json::from_slice(&export::zipkin_json(&[s])).unwrap();
    assert_eq!(json[0]["traceId"], "0000000000000abc");
    assert_eq!(json[0]["id"], "0000000000000010");
    assert_eq!(json[0]["parentId"], "0000000000000020");
    assert_eq!(json[0]["kind"], "SERVER");
    assert_eq!(json[0]["duration"], 3000);
    assert_eq!(json[0]["localEndpoint"]["serviceName"], "reviews.default");
    assert_eq!(json[0]["tags"]["error"], "true");
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_instead_of_waiting() {
    let metrics = Arc::new(TraceMetrics::detached());
    let (tracer, _worker) = Tracer::new(LocalNode::default(), metrics.clone(), 2);
    let provider = Arc::new(Provider {
        name: "p".into(),
        cluster: "c".into(),
        sink: Sink::OtlpGrpc { authority: "c".into() },
        service_name: String::new(),
        timeout: std::time::Duration::from_secs(1),
    });
    let now = std::time::SystemTime::now();
    let span = SpanRecord {
        provider,
        service_name: "s".into(),
        trace_id: 1,
        span_id: 1,
        parent_id: None,
        name: "n".into(),
        kind: SpanKind::Client,
        start: now,
        end: now,
        tags: vec![],
        error: false,
        shared: false,
        tracestate: String::new(),
        local_addr: "127.0.0.1:1".parse().unwrap(),
        remote_addr: "127.0.0.1:2".parse().unwrap(),
    };
    for _ in 0..5 {
        tracer.submit(span.clone());
    }
    assert_eq!(metrics.queue_len(), 2);
    assert_eq!(metrics.dropped_count("queue_full"), 3);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Arbitrary tracing blocks (any percentages, strings and provider bytes) compile or
    /// fail with an error; they never panic.
    #[test]
    fn arbitrary_tracing_config_never_panics(
        pct in proptest::option::of(proptest::num::f64::ANY),
        cluster in ".{0,12}",
        uri in ".{0,30}",
        header in ".{0,12}",
        bytes in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..64),
        kind in 0u8..4,
    ) {
        let provider = match kind {
            0 => Some(TracingHttp { name: "r".into(), config_type: Some(ConfigType::TypedConfig(Any { type_url: OpenTelemetryConfig::type_url(), value: bytes })) }),
            1 => Some(TracingHttp { name: "r".into(), config_type: Some(ConfigType::TypedConfig(Any { type_url: ZipkinConfig::type_url(), value: bytes })) }),
            2 => Some(TracingHttp { name: "h".into(), config_type: Some(ConfigType::TypedConfig(any(&OpenTelemetryConfig {
                http_service: Some(HttpService { http_uri: Some(HttpUri { uri, http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(cluster)), ..Default::default() }), ..Default::default() }),
                ..Default::default()
            }))) }),
            _ => Some(otel_grpc(&cluster)),
        };
        let t = Tracing {
            provider,
            random_sampling: pct.map(|value| Percent { value }),
            custom_tags: vec![PbCustomTag {
                tag: "t".into(),
                r#type: Some(custom_tag::Type::RequestHeader(custom_tag::Header { name: header, ..Default::default() })),
            }],
            ..Default::default()
        };
        let _ = TracingConfig::compile(&t);
    }
}
