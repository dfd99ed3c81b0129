//! Istio's HTTP peer metadata exchange for a stock Envoy, through route header edits.
//!
//! weft's proxy exchanges `x-envoy-peer-metadata-id` / `x-envoy-peer-metadata` itself
//! (`weft_proxy::telemetry::peer`). A stock Envoy has no `peer_metadata` filter, so the
//! control plane computes the Envoy's own header values from its node metadata
//! ([`weft_xds::peer::PeerMetadata::from_node`]) and writes them as header edits:
//!
//! - outbound (RDS route configurations): `request_headers_to_add` with the two headers
//!   (replacing any the application sent), `response_headers_to_remove` of both, so the
//!   application never sees the peer's;
//! - inbound (the inline route configuration of every inbound HTTP connection manager):
//!   `request_headers_to_remove` of both, `response_headers_to_add` with the two headers.
//!
//! The Envoy reports no Istio metrics itself; its weft peers then report its workload,
//! namespace, app and version, and nothing mesh-internal reaches its application.
//! Gateways are left alone. The values depend on the node's own name and id, so such a
//! translation is not shared between nodes (see `source::shape`).

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, TrafficDirection};
use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::util::pack_any;
use prost::Message as _;
use weft_xds::peer::{PeerMetadata, METADATA_HEADER, METADATA_ID_HEADER};
use weft_xds::NodeInfo;

use super::ProxyXds;

/// Node `user_agent_name` of a stock Envoy (Envoy sets it itself).
pub const ENVOY_USER_AGENT: &str = "envoy";

const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// Whether a node with this `user_agent_name` needs the exchange written as header edits.
pub fn needs_header_edits(user_agent_name: &str, node: &NodeInfo) -> bool {
    user_agent_name == ENVOY_USER_AGENT && !node.is_gateway()
}

/// Adds the exchange's header edits for `node` to its translation.
pub fn add_header_edits(out: &mut ProxyXds, node: &NodeInfo) {
    let adds = own_headers(node);
    let names = [METADATA_ID_HEADER.to_string(), METADATA_HEADER.to_string()];
    for rc in &mut out.routes {
        rc.request_headers_to_add.extend(adds.iter().cloned());
        rc.response_headers_to_remove.extend(names.iter().cloned());
    }
    let inbound = |rc: &mut RouteConfiguration| {
        rc.request_headers_to_remove.extend(names.iter().cloned());
        rc.response_headers_to_add.extend(adds.iter().cloned());
    };
    for l in out.listeners.iter_mut().filter(|l| l.traffic_direction == TrafficDirection::Inbound as i32) {
        for f in l.filter_chains.iter_mut().flat_map(|c| c.filters.iter_mut()) {
            let Some(filter::ConfigType::TypedConfig(any)) = f.config_type.as_mut() else { continue };
            if any.type_url != HCM_TYPE {
                continue;
            }
            // The translator packed it a moment ago; one that does not decode is left as is.
            let Ok(mut hcm) = HttpConnectionManager::decode(any.value.as_slice()) else { continue };
            if let Some(RouteSpecifier::RouteConfig(rc)) = hcm.route_specifier.as_mut() {
                inbound(rc);
                *any = pack_any(hcm);
            }
        }
    }
}

/// Whether a node is a stock Envoy (sidecar or gateway).
pub fn is_envoy(user_agent_name: &str) -> bool {
    user_agent_name == ENVOY_USER_AGENT
}

/// Removes `istio-peer-exchange` from every ALPN list of a stock Envoy's translation:
/// without Istio's `metadata_exchange` filter it would negotiate the protocol and then
/// pass the peer's metadata frame to its application as data. Without it, TLS settles on
/// `istio` and neither side writes a frame.
pub fn strip_tcp_exchange(out: &mut ProxyXds) {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    use envoy_types::pb::envoy::config::core::v3::TransportSocket;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{DownstreamTlsContext, UpstreamTlsContext};
    const UPSTREAM: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
    const DOWNSTREAM: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
    let keep = |alpn: &mut Vec<String>| alpn.retain(|p| p != weft_xds::peer::TCP_EXCHANGE_ALPN);
    let fix = |ts: &mut TransportSocket| {
        let Some(ConfigType::TypedConfig(any)) = ts.config_type.as_mut() else { return };
        if any.type_url == UPSTREAM {
            if let Ok(mut tls) = UpstreamTlsContext::decode(any.value.as_slice()) {
                if let Some(c) = tls.common_tls_context.as_mut() {
                    keep(&mut c.alpn_protocols);
                }
                *any = pack_any(tls);
            }
        } else if any.type_url == DOWNSTREAM {
            if let Ok(mut tls) = DownstreamTlsContext::decode(any.value.as_slice()) {
                if let Some(c) = tls.common_tls_context.as_mut() {
                    keep(&mut c.alpn_protocols);
                }
                *any = pack_any(tls);
            }
        }
    };
    for c in &mut out.clusters {
        if let Some(ts) = c.transport_socket.as_mut() {
            fix(ts);
        }
        for m in &mut c.transport_socket_matches {
            if let Some(ts) = m.transport_socket.as_mut() {
                fix(ts);
            }
        }
    }
    for l in &mut out.listeners {
        for fc in &mut l.filter_chains {
            if let Some(ts) = fc.transport_socket.as_mut() {
                fix(ts);
            }
        }
    }
}

/// The two headers with the node's own values (replacing what the application sent).
fn own_headers(node: &NodeInfo) -> Vec<HeaderValueOption> {
    let one = |key: &str, value: String| HeaderValueOption {
        header: Some(HeaderValue { key: key.into(), value, ..Default::default() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    };
    vec![one(METADATA_ID_HEADER, node.id.clone()), one(METADATA_HEADER, PeerMetadata::from_node(node).encode())]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::collections::BTreeMap;
    use std::path::Path;

    use weft_xds::PortInfo;

    use super::*;
    use crate::registry::Registry;
    use crate::translate::{translate, MeshConfig, ProxyMode};

    #[test]
    fn a_stock_envoy_is_not_offered_the_tcp_exchange() {
        use envoy_types::pb::envoy::config::cluster::v3::Cluster;
        use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
        use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener};
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
            DownstreamTlsContext, UpstreamTlsContext,
        };
        let tcp = crate::translate::mtls::TCP_ALPN;
        let mut out = ProxyXds {
            clusters: vec![Cluster {
                transport_socket: Some(crate::translate::mtls::istio_mutual(&[], "sni", tcp)),
                ..Default::default()
            }],
            listeners: vec![Listener {
                filter_chains: vec![FilterChain {
                    transport_socket: Some(crate::translate::mtls::inbound_mtls(tcp)),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        strip_tcp_exchange(&mut out);
        let any = |ts: &Option<envoy_types::pb::envoy::config::core::v3::TransportSocket>| match ts
            .as_ref()
            .and_then(|t| t.config_type.clone())
        {
            Some(ConfigType::TypedConfig(a)) => a,
            _ => panic!("typed config"),
        };
        let up = UpstreamTlsContext::decode(any(&out.clusters[0].transport_socket).value.as_slice()).unwrap();
        assert_eq!(up.common_tls_context.unwrap().alpn_protocols, vec!["istio".to_string()]);
        let down =
            DownstreamTlsContext::decode(any(&out.listeners[0].filter_chains[0].transport_socket).value.as_slice())
                .unwrap();
        assert_eq!(down.common_tls_context.unwrap().alpn_protocols, vec!["istio".to_string()]);
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\n\
                           spec:\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080}]\n";

    fn envoy_node() -> NodeInfo {
        NodeInfo {
            id: "sidecar~127.0.0.9~reviews-v2-abcde.default~default.svc.cluster.local".into(),
            cluster: "Kubernetes".into(),
            name: "reviews-v2-abcde".into(),
            namespace: "default".into(),
            labels: BTreeMap::from([("app".into(), "reviews".into()), ("version".into(), "v2".into())]),
            service_account: "bookinfo-reviews".into(),
            ports: vec![PortInfo { name: "http".into(), port: 9080, protocol: "TCP".into(), app_protocol: None }],
            inbound: Some("127.0.0.9:15006".parse().unwrap()),
            ..NodeInfo::default()
        }
    }

    fn inline_routes(x: &ProxyXds, listener: &str) -> RouteConfiguration {
        let l = x.listener(listener).unwrap();
        let Some(filter::ConfigType::TypedConfig(any)) = &l.filter_chains[0].filters[0].config_type else { panic!() };
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        let Some(RouteSpecifier::RouteConfig(rc)) = hcm.route_specifier else { panic!("not inline") };
        rc
    }

    fn added(headers: &[HeaderValueOption]) -> BTreeMap<String, String> {
        headers.iter().filter_map(|h| h.header.as_ref()).map(|h| (h.key.clone(), h.value.clone())).collect()
    }

    #[test]
    fn envoy_sends_its_metadata_and_strips_the_peers_in_both_directions() {
        let parsed = weft_api::parse_str(SERVICE, Path::new("t.yaml"));
        let mesh = MeshConfig { resources: parsed.resources, ..MeshConfig::default() };
        let node = envoy_node();
        let mut x = translate(&mesh, &Registry::new().snapshot(), &node, ProxyMode::Explicit);
        let before = inline_routes(&x, "inbound|9080");
        assert!(before.response_headers_to_add.is_empty(), "a weft node gets no edits");
        assert!(needs_header_edits("envoy", &node));
        assert!(!needs_header_edits("weft", &node));
        add_header_edits(&mut x, &node);

        let outbound = x.route("9080").unwrap();
        let sent = added(&outbound.request_headers_to_add);
        assert_eq!(sent[METADATA_ID_HEADER], node.id);
        let meta = PeerMetadata::decode(sent[METADATA_HEADER].as_bytes()).unwrap();
        assert_eq!(
            (meta.namespace.as_str(), meta.label("app"), meta.label("version")),
            ("default", Some("reviews"), Some("v2"))
        );
        assert!(outbound
            .request_headers_to_add
            .iter()
            .all(|h| h.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32));
        assert_eq!(outbound.response_headers_to_remove, [METADATA_ID_HEADER, METADATA_HEADER]);
        let explicit = x.route(crate::translate::OUTBOUND).unwrap();
        assert_eq!(added(&explicit.request_headers_to_add), sent, "the explicit HTTP proxy's routes too");

        let inbound = inline_routes(&x, "inbound|9080");
        assert_eq!(inbound.request_headers_to_remove, [METADATA_ID_HEADER, METADATA_HEADER]);
        assert_eq!(added(&inbound.response_headers_to_add), sent);
    }
}
