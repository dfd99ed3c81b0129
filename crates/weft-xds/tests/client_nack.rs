//! The client NACKs what it cannot use, naming type and resource.
#![allow(clippy::unwrap_used)] // test crate: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use common::*;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use weft_xds::type_url::{CLUSTER, LISTENER};
use weft_xds::{AdsServer, Any, XdsMode, XdsSource};

/// Serves an undecodable listener named `l1` (and nothing else).
struct GarbageSource(watch::Sender<u64>);

impl XdsSource for GarbageSource {
    fn resources(&self, _node: &Node, type_url: &str) -> (String, BTreeMap<String, Any>) {
        let mut resources = BTreeMap::new();
        if type_url == LISTENER {
            let garbage = Any { type_url: LISTENER.to_string(), value: vec![0x0a, 0xff, 0xff, 0xff] };
            resources.insert("l1".to_string(), garbage);
        }
        ("7".to_string(), resources)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

async fn undecodable_resource_is_nacked(mode: XdsMode, resource_label: &str) {
    let listener = tokio::net::TcpListener::bind(any_port()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = AdsServer::new(Arc::new(GarbageSource(watch::channel(0).0)));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    let handler = MemHandler::new();
    let mut client = RunningClient::start(addr, mode, handler.clone());
    let status = client.wait_status("nack", |s| s.nacks >= 1).await;
    let error = status.last_nack.unwrap_or_default();
    assert!(error.contains("Listener"), "{error}");
    assert!(error.contains(resource_label), "{error}");
    assert!(error.contains("cannot decode"), "{error}");
    assert!(!status.acked.contains_key(LISTENER));
    assert!(status.acked.contains_key(CLUSTER), "other types are still ACKed");
    assert!(handler.snapshot().names(LISTENER).is_empty());
    client.stop().await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn sotw_undecodable_resource_is_nacked() {
    undecodable_resource_is_nacked(XdsMode::Sotw, "#0").await;
}

#[tokio::test]
async fn delta_undecodable_resource_is_nacked() {
    undecodable_resource_is_nacked(XdsMode::Delta, "l1").await;
}

const UNKNOWN: &str = "type.googleapis.com/example.Unknown";

/// Answers the first request of each stream with a response of an unknown type and
/// forwards every later request's (type, nonce, error) to the test.
struct UnknownTypeServer(mpsc::UnboundedSender<(String, String, Option<String>)>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for UnknownTypeServer {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut requests = request.into_inner();
        let seen = self.0.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut first = true;
            while let Ok(Some(r)) = requests.message().await {
                if first {
                    first = false;
                    let response = DiscoveryResponse {
                        type_url: UNKNOWN.to_string(),
                        version_info: "1".to_string(),
                        nonce: "n1".to_string(),
                        ..Default::default()
                    };
                    let _ = tx.send(Ok(response)).await;
                } else {
                    let _ = seen.send((r.type_url, r.response_nonce, r.error_detail.map(|e| e.message)));
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut requests = request.into_inner();
        let seen = self.0.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut first = true;
            while let Ok(Some(r)) = requests.message().await {
                if first {
                    first = false;
                    let response = DeltaDiscoveryResponse {
                        type_url: UNKNOWN.to_string(),
                        nonce: "n1".to_string(),
                        ..Default::default()
                    };
                    let _ = tx.send(Ok(response)).await;
                } else {
                    let _ = seen.send((r.type_url, r.response_nonce, r.error_detail.map(|e| e.message)));
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn unknown_type_is_nacked(mode: XdsMode) {
    let listener = tokio::net::TcpListener::bind(any_port()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(UnknownTypeServer(seen_tx)))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    let client = RunningClient::start(addr, mode, MemHandler::new());
    let nack = tokio::time::timeout(WAIT, async {
        loop {
            match seen.recv().await {
                Some((type_url, nonce, Some(error))) if type_url == UNKNOWN => return (nonce, error),
                Some(_) => {}
                None => panic!("server gone"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(nack.0, "n1");
    assert!(nack.1.contains(UNKNOWN), "{}", nack.1);
    client.stop().await;
    let _ = stop.send(());
    let _ = task.await;
}

#[tokio::test]
async fn sotw_unknown_type_is_nacked() {
    unknown_type_is_nacked(XdsMode::Sotw).await;
}

#[tokio::test]
async fn delta_unknown_type_is_nacked() {
    unknown_type_is_nacked(XdsMode::Delta).await;
}
