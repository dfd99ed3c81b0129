//! Mutual TLS between sidecars, as Istio configures it.
//!
//! - A workload is in the mesh's mTLS when its proxy holds a mesh identity, announced
//!   with Istio's label `security.istio.io/tlsMode: istio` (a weft proxy with an
//!   `identity` section adds it; `weft envoy-bootstrap --join-token` does for Envoy).
//! - Its endpoints carry `envoy.transport_socket_match: {tlsMode: istio}`; a client that
//!   is itself in the mesh gets `transport_socket_matches` on its clusters (auto mTLS:
//!   mTLS to endpoints that can take it, plaintext to the others), the server's SPIFFE
//!   ids as URI SAN matchers, certificates from SDS `default` / `ROOTCA`.
//! - Inbound listeners follow the workload's PeerAuthentication (workload selector >
//!   namespace > root namespace, UNSET inherits, `portLevelMtls` on selector policies):
//!   STRICT takes only mTLS, PERMISSIVE (the default) mTLS and plaintext on the same port
//!   (told apart by the first bytes), DISABLE only plaintext.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{transport_socket, TransportSocket};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, FilterChainMatch, ListenerFilter};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::{self, CombinedCertificateValidationContext},
    subject_alt_name_matcher::SanType,
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, SubjectAltNameMatcher,
    UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
use envoy_types::pb::google::protobuf::{value, BoolValue, Struct, Value};
use envoy_types::util::pack_any;
use weft_api::spec::MtlsMode;
use weft_api::Spec;

use super::model::MeshView;

/// Istio's label marking a workload whose proxy does mesh mTLS.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// Endpoint metadata namespace read by `transport_socket_matches`.
pub const SOCKET_MATCH: &str = "envoy.transport_socket_match";

/// Whether a workload with these labels does mesh mTLS.
pub fn in_mesh(labels: &BTreeMap<String, String>) -> bool {
    labels.get(TLS_MODE_LABEL).is_some_and(|v| v == "istio")
}

/// The SPIFFE id of a workload.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    let sa = if service_account.is_empty() { "default" } else { service_account };
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{sa}")
}

/// `{tlsMode: istio}`, the endpoint metadata auto mTLS matches on.
pub fn tls_mode_istio() -> Struct {
    Struct { fields: [("tlsMode".to_string(), Value { kind: Some(value::Kind::StringValue("istio".into())) })].into() }
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig { name: name.into(), sds_config: Some(weft_xds::build::ads()) }
}

/// ALPN of mesh mTLS for opaque TCP, as Istio sets it: `istio-peer-exchange` (each side
/// then writes one metadata frame first, `weft_xds::peer::tcp_frame`) and `istio`.
pub const TCP_ALPN: &[&str] = &[weft_xds::peer::TCP_EXCHANGE_ALPN, "istio"];

fn common(sans: &[String], alpn: &[&str]) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds("default")],
        validation_context_type: Some(common_tls_context::ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_typed_subject_alt_names: sans
                        .iter()
                        .map(|s| SubjectAltNameMatcher {
                            san_type: SanType::Uri as i32,
                            matcher: Some(StringMatcher {
                                match_pattern: Some(string_matcher::MatchPattern::Exact(s.clone())),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds("ROOTCA")),
                ..Default::default()
            },
        )),
        alpn_protocols: alpn.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

fn socket(any: envoy_types::pb::google::protobuf::Any) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any)),
    }
}

/// The client side of mesh mTLS (Istio's ISTIO_MUTUAL): the proxy's own certificate,
/// the server verified against the trust bundle and `sans`.
pub fn istio_mutual(sans: &[String], sni: &str, alpn: &[&str]) -> TransportSocket {
    socket(pack_any(UpstreamTlsContext {
        sni: sni.into(),
        common_tls_context: Some(common(sans, alpn)),
        ..Default::default()
    }))
}

/// The server side: the proxy's certificate, client certificates required and verified
/// against the trust bundle (any mesh identity; authorization decides who may call).
pub fn inbound_mtls(alpn: &[&str]) -> TransportSocket {
    socket(pack_any(DownstreamTlsContext {
        common_tls_context: Some(common(&[], alpn)),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    }))
}

/// The filter chains of an inbound listener in `mode`, from its one plaintext chain.
pub fn inbound_chains(plain: FilterChain, mode: MtlsMode, http: bool) -> Vec<FilterChain> {
    let alpn: &[&str] = if http { &["h2", "http/1.1"] } else { TCP_ALPN };
    let tls = FilterChain {
        name: "mtls".into(),
        filter_chain_match: Some(FilterChainMatch { transport_protocol: "tls".into(), ..Default::default() }),
        transport_socket: Some(inbound_mtls(alpn)),
        ..plain.clone()
    };
    let raw = FilterChain {
        name: "plaintext".into(),
        filter_chain_match: Some(FilterChainMatch { transport_protocol: "raw_buffer".into(), ..Default::default() }),
        ..plain.clone()
    };
    match mode {
        MtlsMode::Strict => vec![tls],
        MtlsMode::Disable => vec![plain],
        MtlsMode::Permissive | MtlsMode::Unset => vec![tls, raw],
    }
}

/// Plaintext, spelled out (Envoy needs a socket in every `transport_socket_matches` entry).
pub fn raw_buffer() -> TransportSocket {
    use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
    TransportSocket {
        name: "envoy.transport_sockets.raw_buffer".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(RawBuffer::default()))),
    }
}

/// The TLS inspector Envoy needs to match chains on `transport_protocol`.
pub fn tls_inspector() -> ListenerFilter {
    use envoy_types::pb::envoy::config::listener::v3::listener_filter::ConfigType;
    use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
    ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        config_type: Some(ConfigType::TypedConfig(pack_any(TlsInspector::default()))),
        ..Default::default()
    }
}

/// The effective PeerAuthentication mode of a workload (`namespace`, `labels`) on its
/// port `port`, with Istio's precedence; PERMISSIVE when nothing says otherwise.
pub fn peer_mode(view: &MeshView<'_>, namespace: &str, labels: &BTreeMap<String, String>, port: u32) -> MtlsMode {
    let root = view.mesh.root_namespace.as_str();
    let mut workload: Option<(&weft_api::Resource, &weft_api::spec::PeerAuthentication)> = None;
    let mut ns_level = None;
    let mut mesh_level = None;
    let mut policies: Vec<&weft_api::Resource> =
        view.mesh.resources.iter().filter(|r| matches!(r.spec, Spec::PeerAuthentication(_))).collect();
    // Istio picks the oldest on ties; weft has no creation time, so the name decides.
    policies.sort_by(|a, b| (&a.meta.namespace, &a.meta.name).cmp(&(&b.meta.namespace, &b.meta.name)));
    for r in policies {
        let Spec::PeerAuthentication(pa) = &r.spec else { continue };
        match &pa.selector {
            Some(sel) if r.meta.namespace == namespace => {
                let matches = sel.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v));
                if matches && workload.is_none() {
                    workload = Some((r, pa));
                }
            }
            None if r.meta.namespace == namespace && ns_level.is_none() => ns_level = Some(pa),
            None if r.meta.namespace == root && mesh_level.is_none() => mesh_level = Some(pa),
            _ => {}
        }
    }
    let mode_of = |pa: Option<&weft_api::spec::PeerAuthentication>| {
        pa.and_then(|p| p.mtls.and_then(|m| m.mode)).filter(|m| *m != MtlsMode::Unset)
    };
    let port_level = workload
        .and_then(|(_, pa)| pa.port_level_mtls.get(&port.to_string()).and_then(|m| m.mode))
        .filter(|m| *m != MtlsMode::Unset);
    port_level
        .or_else(|| mode_of(workload.map(|(_, pa)| pa)))
        .or_else(|| mode_of(ns_level))
        .or_else(|| mode_of(mesh_level))
        .unwrap_or(MtlsMode::Permissive)
}
