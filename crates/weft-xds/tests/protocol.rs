//! The server against a hand-driven gRPC client, checking the xDS protocol rules an
//! Envoy relies on (nonces, ACK/NACK, no push loops, delta bookkeeping).
#![allow(clippy::unwrap_used)] // test crate: a failed unwrap is a failed test

mod common;

use std::collections::HashMap;

use common::*;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Streaming;
use weft_xds::type_url::{CLUSTER, LISTENER, ROUTE};
use weft_xds::{content_version, resource_name};

struct Raw<Req, Resp> {
    tx: mpsc::UnboundedSender<Req>,
    rx: Streaming<Resp>,
}

impl<Req, Resp> Raw<Req, Resp> {
    fn send(&self, request: Req) {
        self.tx.send(request).unwrap();
    }

    async fn recv(&mut self) -> Resp {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no response in time")
            .expect("stream failed")
            .expect("stream ended")
    }
}

async fn sotw(server: &RunningServer) -> Raw<DiscoveryRequest, DiscoveryResponse> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", server.addr)).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let rx = client.stream_aggregated_resources(UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
    Raw { tx, rx }
}

async fn delta(server: &RunningServer) -> Raw<DeltaDiscoveryRequest, DeltaDiscoveryResponse> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", server.addr)).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let rx = client.delta_aggregated_resources(UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
    Raw { tx, rx }
}

fn req(type_url: &str, version: &str, nonce: &str, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(node_info().to_node()),
        type_url: type_url.to_string(),
        version_info: version.to_string(),
        response_nonce: nonce.to_string(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    }
}

fn names(type_url: &str, response: &DiscoveryResponse) -> Vec<String> {
    response.resources.iter().map(|a| resource_name(type_url, a).unwrap()).collect()
}

/// A pure ACK gets no answer, and a change made while a response is un-ACKed is sent
/// only after the ACK (the CDS request is a barrier: its answer comes first).
#[tokio::test]
async fn sotw_ack_is_not_answered_and_updates_wait_for_ack() {
    let source = basic_source();
    let server = RunningServer::start(source.clone(), any_port()).await;
    let mut raw = sotw(&server).await;
    raw.send(req(LISTENER, "", "", &[]));
    let first = raw.recv().await;
    assert_eq!((first.type_url.as_str(), first.version_info.as_str()), (LISTENER, "1"));
    assert_eq!(names(LISTENER, &first), ["l1"]);

    source.set_one(LISTENER, listener("l2")).unwrap();
    raw.send(req(CLUSTER, "", "", &[]));
    let barrier = raw.recv().await;
    assert_eq!(barrier.type_url, CLUSTER, "LDS v2 was pushed before the ACK of v1");

    raw.send(req(LISTENER, "1", &first.nonce, &[]));
    let second = raw.recv().await;
    assert_eq!((second.type_url.as_str(), second.version_info.as_str()), (LISTENER, "2"));
    assert_eq!(names(LISTENER, &second), ["l1", "l2"]);

    raw.send(req(LISTENER, "2", &second.nonce, &[]));
    raw.send(req(CLUSTER, "1", &barrier.nonce, &[]));
    raw.send(req(ROUTE, "", "", &["l1"]));
    let next = raw.recv().await;
    assert_eq!(next.type_url, ROUTE, "a pure ACK was answered");
    server.wait_acked(LISTENER, "2").await;
    server.stop().await;
}

/// A request with a stale nonce does not change the subscription; the ACK of the
/// latest response does.
#[tokio::test]
async fn sotw_stale_nonce_is_ignored() {
    let server = RunningServer::start(basic_source(), any_port()).await;
    let mut raw = sotw(&server).await;
    raw.send(req(ROUTE, "", "", &["l1"]));
    let first = raw.recv().await;
    assert_eq!(names(ROUTE, &first), ["l1"]);
    raw.send(req(ROUTE, "1", "stale", &["l1", "l2"]));
    raw.send(req(CLUSTER, "", "", &[]));
    assert_eq!(raw.recv().await.type_url, CLUSTER, "stale request was answered");
    raw.send(req(ROUTE, "1", &first.nonce, &["l1", "l2"]));
    let second = raw.recv().await;
    assert_eq!(second.type_url, ROUTE);
    assert_eq!(names(ROUTE, &second), ["l1", "l2"]);
    server.stop().await;
}

/// A NACK is recorded with its text and the rejected version is not sent again.
#[tokio::test]
async fn sotw_nack_is_recorded_and_not_answered() {
    let source = basic_source();
    let server = RunningServer::start(source.clone(), any_port()).await;
    let mut raw = sotw(&server).await;
    raw.send(req(LISTENER, "", "", &[]));
    let first = raw.recv().await;
    let mut nack = req(LISTENER, "", &first.nonce, &[]);
    nack.error_detail = Some(rpc::Status { code: 3, message: "listener l1: bad filter".to_string(), details: vec![] });
    raw.send(nack);
    raw.send(req(CLUSTER, "", "", &[]));
    assert_eq!(raw.recv().await.type_url, CLUSTER, "NACKed version was re-sent");
    let conn = &server.server.connections()[0];
    let status = &conn.types[LISTENER];
    let nack = status.last_nack.as_ref().expect("NACK recorded");
    assert_eq!(nack.error, "listener l1: bad filter");
    assert_eq!(nack.version, "1");
    assert_eq!(nack.nonce, first.nonce);
    assert_eq!(status.acked_version, None);
    // A fix at the source is sent.
    source.set_one(LISTENER, listener("l2")).unwrap();
    let fixed = raw.recv().await;
    assert_eq!((fixed.type_url.as_str(), fixed.version_info.as_str()), (LISTENER, "2"));
    server.stop().await;
}

/// The first request of a stream must identify its node.
#[tokio::test]
async fn first_request_without_node_is_rejected() {
    let server = RunningServer::start(basic_source(), any_port()).await;
    let mut raw = sotw(&server).await;
    let mut request = req(LISTENER, "", "", &[]);
    request.node = None;
    raw.send(request);
    let status = tokio::time::timeout(WAIT, raw.rx.message())
        .await
        .expect("no answer")
        .expect_err("request without node accepted");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(server.server.connections().is_empty());
    server.stop().await;
}

fn dreq(type_url: &str, subscribe: &[&str], initial: &[(&str, String)]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node_info().to_node()),
        type_url: type_url.to_string(),
        resource_names_subscribe: subscribe.iter().map(|n| n.to_string()).collect(),
        initial_resource_versions: initial.iter().map(|(n, v)| (n.to_string(), v.clone())).collect::<HashMap<_, _>>(),
        ..Default::default()
    }
}

/// Empty initial subscribe is a wildcard for LDS; resources the client already has at
/// the same version are not resent and ones that no longer exist are removed.
#[tokio::test]
async fn delta_initial_versions_skip_unchanged_and_remove_gone() {
    let source = basic_source();
    source.set(LISTENER, vec![listener("l1"), listener("l2")]).unwrap();
    let server = RunningServer::start(source, any_port()).await;
    let mut raw = delta(&server).await;
    raw.send(dreq(LISTENER, &[], &[("l1", content_version(&listener("l1"))), ("gone", "old".to_string())]));
    let response = raw.recv().await;
    let sent: Vec<&str> = response.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(sent, ["l2"]);
    assert_eq!(response.resources[0].version, content_version(&listener("l2")));
    assert_eq!(response.removed_resources, ["gone"]);
    assert_eq!(response.system_version_info, "2");
    server.stop().await;
}

/// A subscribed name that does not exist is reported in removed_resources, and sent
/// once it appears; an unsubscribed name is no longer updated.
#[tokio::test]
async fn delta_missing_names_and_unsubscribe() {
    let source = basic_source();
    let server = RunningServer::start(source.clone(), any_port()).await;
    let mut raw = delta(&server).await;
    raw.send(dreq(ROUTE, &["l1", "later"], &[]));
    let first = raw.recv().await;
    let sent: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(sent, ["l1"]);
    assert_eq!(first.removed_resources, ["later"]);

    raw.send(DeltaDiscoveryRequest {
        type_url: ROUTE.to_string(),
        response_nonce: first.nonce.clone(),
        resource_names_unsubscribe: vec!["l1".to_string()],
        ..Default::default()
    });
    server.wait_acked(ROUTE, "1").await;
    source.set_one(ROUTE, route("l1", "v2")).unwrap();
    source.set_one(ROUTE, route("later", "v1")).unwrap();
    let next = raw.recv().await;
    let sent: Vec<&str> = next.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(sent, ["later"], "unsubscribed l1 was updated");
    assert!(next.removed_resources.is_empty());
    server.stop().await;
}

fn vhost(name: &str, domains: &[&str], tag: &str) -> envoy_types::pb::google::protobuf::Any {
    use envoy_types::pb::envoy::config::route::v3::VirtualHost;
    envoy_types::util::pack_any(VirtualHost {
        name: name.to_string(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        request_headers_to_remove: vec![tag.to_string()],
        ..Default::default()
    })
}

/// VHDS as Envoy specifies it: a `<route configuration>/<host>` alias is answered with
/// the virtual host whose domains match (named `<route configuration>/<vhost>`, the
/// alias in `aliases`); an unknown host with a body-less resource named and aliased by
/// the request; a second alias of a vhost the peer holds is answered again; a change
/// of a subscribed vhost is pushed once, carrying no stale alias answers.
#[tokio::test]
async fn vhds_aliases_resolve_by_domain_and_unknown_hosts_get_an_empty_resource() {
    use weft_xds::type_url::VIRTUAL_HOST;
    let source = basic_source();
    source
        .set(
            VIRTUAL_HOST,
            vec![
                vhost("9080/reviews:9080", &["reviews", "reviews:9080", "reviews.default.svc.cluster.local:9080"], "a"),
                vhost("9080/ratings:9080", &["ratings:9080"], "a"),
            ],
        )
        .unwrap();
    let server = RunningServer::start(source.clone(), any_port()).await;
    let mut raw = delta(&server).await;
    raw.send(dreq(VIRTUAL_HOST, &["9080/reviews:9080", "9080/nope:9080"], &[]));
    let first = raw.recv().await;
    let mut by_name: HashMap<&str, &envoy_types::pb::envoy::service::discovery::v3::Resource> =
        first.resources.iter().map(|r| (r.name.as_str(), r)).collect();
    assert_eq!(by_name.len(), 2, "{first:?}");
    let found = by_name.remove("9080/reviews:9080").unwrap();
    assert!(found.resource.is_some() && found.aliases.is_empty(), "alias equal to the name needs no alias: {found:?}");
    let missing = by_name.remove("9080/nope:9080").unwrap();
    assert!(missing.resource.is_none(), "unknown host answered without a body");
    assert_eq!(missing.aliases, ["9080/nope:9080"]);
    assert!(first.removed_resources.is_empty());

    // Another authority of the same vhost: answered with the vhost and the alias.
    raw.send(DeltaDiscoveryRequest {
        type_url: VIRTUAL_HOST.to_string(),
        response_nonce: first.nonce.clone(),
        resource_names_subscribe: vec!["9080/reviews.default.svc.cluster.local:9080".to_string()],
        ..Default::default()
    });
    let second = raw.recv().await;
    assert_eq!(second.resources.len(), 1, "{second:?}");
    assert_eq!(second.resources[0].name, "9080/reviews:9080");
    assert_eq!(second.resources[0].aliases, ["9080/reviews.default.svc.cluster.local:9080"]);

    // A change of the subscribed vhost is pushed; an unsubscribed one never is.
    raw.send(DeltaDiscoveryRequest {
        type_url: VIRTUAL_HOST.to_string(),
        response_nonce: second.nonce.clone(),
        ..Default::default()
    });
    source.set_one(VIRTUAL_HOST, vhost("9080/ratings:9080", &["ratings:9080"], "b")).unwrap();
    source
        .set_one(
            VIRTUAL_HOST,
            vhost("9080/reviews:9080", &["reviews", "reviews:9080", "reviews.default.svc.cluster.local:9080"], "b"),
        )
        .unwrap();
    let third = raw.recv().await;
    let names: Vec<&str> = third.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["9080/reviews:9080"], "{third:?}");
    assert!(third.resources[0].aliases.is_empty(), "aliases already answered are not repeated");
    server.stop().await;
}
