//! Client and server over real tonic on loopback, in both SotW and delta modes.
#![allow(clippy::unwrap_used)] // test crate: a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;

use common::*;
use weft_xds::type_url::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use weft_xds::{Backoff, XdsMode, DEFAULT_MAX_BACKOFF};

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// All four types arrive, the server filters RDS/EDS to the requested names, and the
/// server lists the connection with its node identity and ACKed versions.
async fn initial_sync_of_all_four_types(mode: XdsMode) {
    let server = RunningServer::start(basic_source(), any_port()).await;
    let handler = MemHandler::new();
    let mut client = RunningClient::start(server.addr, mode, handler.clone());
    for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        server.wait_acked(t, "1").await;
    }
    let state = handler.snapshot();
    assert_eq!(state.names(LISTENER), set(&["l1"]));
    assert_eq!(state.names(CLUSTER), set(&["c1"]));
    assert_eq!(state.names(ENDPOINT), set(&["c1"]));
    // Only route l1 is wanted (listener l1); the source also has l2.
    assert_eq!(state.names(ROUTE), set(&["l1"]));
    // SotW responses of wildcard types are full state; nothing else is.
    for (type_url, full_state) in &state.full_state {
        let expected = mode == XdsMode::Sotw && (type_url == LISTENER || type_url == CLUSTER);
        assert_eq!(*full_state, expected, "{type_url}");
    }
    let status = client.wait_status("all acked", |s| s.acked.len() == 4).await;
    assert!(status.connected);
    assert_eq!(status.connects, 1);
    assert_eq!(status.nacks, 0);
    let conns = server.server.connections();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].mode, mode);
    assert_eq!(conns[0].node.as_ref(), Some(&node_info()));
    client.stop().await;
    server.stop().await;
}

/// A changed resource is pushed, applied and ACKed with the new version on both sides.
async fn change_is_pushed_and_acked(mode: XdsMode) {
    let source = basic_source();
    let server = RunningServer::start(source.clone(), any_port()).await;
    let handler = MemHandler::new();
    let mut client = RunningClient::start(server.addr, mode, handler.clone());
    server.wait_acked(ROUTE, "1").await;
    source.set_one(ROUTE, route("l1", "v2")).unwrap();
    server.wait_acked(ROUTE, "2").await;
    let state = handler.snapshot();
    assert_eq!(state.resources[ROUTE]["l1"], route("l1", "v2"));
    let status = client.wait_status("route v2 acked", |s| s.acked.get(ROUTE).map(String::as_str) == Some("2")).await;
    assert_eq!(status.nacks, 0);
    // Both route responses (the initial one and the change) are counted, each type apart.
    assert_eq!(status.updates.get(ROUTE), Some(&2));
    assert_eq!(status.updates.get(LISTENER), Some(&1));
    let conn = &server.server.connections()[0];
    assert_eq!(conn.types[ROUTE].acked_version.as_deref(), Some("2"));
    assert_eq!(conn.types[ROUTE].sent_version.as_deref(), Some("2"));
    client.stop().await;
    server.stop().await;
}

/// A handler error is sent as a NACK carrying its text; the ACKed version stays the
/// previous one on both sides and the rejected resource is not applied.
async fn handler_error_is_nacked(mode: XdsMode) {
    let source = basic_source();
    let server = RunningServer::start(source.clone(), any_port()).await;
    let handler = MemHandler::new();
    let mut client = RunningClient::start(server.addr, mode, handler.clone());
    server.wait_acked(LISTENER, "1").await;
    handler.reject("bad");
    source.set_one(LISTENER, listener("bad")).unwrap();
    let mut changes = server.server.status_changes();
    let nack = tokio::time::timeout(WAIT, async {
        loop {
            let found = server
                .server
                .connections()
                .iter()
                .find_map(|c| c.types.get(LISTENER).and_then(|t| t.last_nack.clone()).map(|n| (n, t_acked(c))));
            if let Some(found) = found {
                return found;
            }
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("server never saw a NACK");
    let (nack, acked) = nack;
    assert!(nack.error.contains("bad is not acceptable"), "{nack:?}");
    assert_eq!(nack.version, "2");
    assert_eq!(acked.as_deref(), Some("1"));
    let status = client.wait_status("nack counted", |s| s.nacks == 1).await;
    assert_eq!(status.acked.get(LISTENER).map(String::as_str), Some("1"));
    assert!(status.last_nack.unwrap_or_default().contains("bad is not acceptable"));
    assert_eq!(handler.snapshot().names(LISTENER), set(&["l1"]));
    client.stop().await;
    server.stop().await;
}

fn t_acked(c: &weft_xds::ConnectionStatus) -> Option<String> {
    c.types.get(LISTENER).and_then(|t| t.acked_version.clone())
}

/// A new listener widens the handler's RDS interest; the client updates its
/// subscription and the server sends the newly wanted route.
async fn interest_change_subscribes_new_route(mode: XdsMode) {
    let source = basic_source();
    let server = RunningServer::start(source.clone(), any_port()).await;
    let handler = MemHandler::new();
    let client = RunningClient::start(server.addr, mode, handler.clone());
    server.wait_acked(ROUTE, "1").await;
    assert_eq!(handler.snapshot().names(ROUTE), set(&["l1"]));
    source.set_one(LISTENER, listener("l2")).unwrap();
    let state = handler.wait("route l2", |s| s.names(ROUTE) == set(&["l1", "l2"])).await;
    assert_eq!(state.resources[ROUTE]["l2"], route("l2", "v1"));
    client.stop().await;
    server.stop().await;
}

/// A listener removed at the source is removed from the handler (delta
/// `removed_resources`; SotW absence from the full state). In delta mode the route it
/// named, no longer wanted, is unsubscribed and dropped from the handler too.
async fn removal_propagates(mode: XdsMode) {
    let source = basic_source();
    source.set(LISTENER, vec![listener("l1"), listener("l2")]).unwrap();
    let server = RunningServer::start(source.clone(), any_port()).await;
    let handler = MemHandler::new();
    let client = RunningClient::start(server.addr, mode, handler.clone());
    server.wait_acked(LISTENER, "2").await;
    assert!(source.remove(LISTENER, "l2"));
    let state = handler.wait("l2 removed", |s| s.names(LISTENER) == set(&["l1"])).await;
    assert_eq!(state.removals.first(), Some(&(LISTENER.to_string(), "l2".to_string())));
    server.wait_acked(LISTENER, "3").await;
    if mode == XdsMode::Delta {
        let state = handler.wait("route l2 dropped", |s| s.names(ROUTE) == set(&["l1"])).await;
        assert_eq!(state.removals[1..], [(ROUTE.to_string(), "l2".to_string())]);
    }
    client.stop().await;
    server.stop().await;
}

/// The server goes away and comes back on the same address: the client reconnects
/// with backoff and resyncs (including a change made meanwhile); the handler never
/// saw a removal. In delta mode unchanged resources are not resent.
async fn reconnect_after_server_restart(mode: XdsMode) {
    let source = basic_source();
    let server = RunningServer::start(source.clone(), any_port()).await;
    let addr = server.addr;
    let handler = MemHandler::new();
    let mut client = RunningClient::start(addr, mode, handler.clone());
    for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        server.wait_acked(t, "1").await;
    }
    server.stop().await;
    client.wait_status("disconnected", |s| !s.connected).await;
    let before = handler.snapshot();
    assert_eq!(before.names(LISTENER), set(&["l1"]), "state kept while disconnected");
    source.set_one(LISTENER, listener("l2")).unwrap();

    let server = RunningServer::start(source.clone(), addr).await;
    server.wait_acked(LISTENER, "2").await;
    server.wait_acked(ROUTE, "1").await;
    let state = handler.wait("resynced", |s| s.names(ROUTE) == set(&["l1", "l2"])).await;
    assert_eq!(state.names(LISTENER), set(&["l1", "l2"]));
    assert!(state.removals.is_empty(), "removals: {:?}", state.removals);
    let status = client.wait_status("reconnected", |s| s.connected && s.connects >= 2).await;
    assert_eq!(status.nacks, 0);
    if mode == XdsMode::Delta {
        let resent: Vec<_> = state.applied[before.applied.len()..]
            .iter()
            .flat_map(|(t, names)| names.iter().map(move |n| (t.clone(), n.clone())))
            .collect();
        assert_eq!(
            resent,
            vec![(LISTENER.to_string(), "l2".to_string()), (ROUTE.to_string(), "l2".to_string())],
            "only new resources are sent after reconnect"
        );
    }
    client.stop().await;
    server.stop().await;
}

/// A control plane restarted with the same resources (or another replica translating the
/// same bytes): the client resumes with the versions it holds and nothing is pushed
/// again, and a SotW server counts it as holding them (ACKed).
async fn reconnect_with_unchanged_resources_pushes_nothing(mode: XdsMode) {
    let source = basic_source();
    let server = RunningServer::start(source.clone(), any_port()).await;
    let addr = server.addr;
    let mut client = RunningClient::start(addr, mode, MemHandler::new());
    for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        server.wait_acked(t, "1").await;
    }
    let before = client.wait_status("synced", |s| s.acked.len() == 4).await;
    server.stop().await;
    client.wait_status("disconnected", |s| !s.connected).await;

    let server = RunningServer::start(source.clone(), addr).await;
    let after = client.wait_status("reconnected", |s| s.connected && s.connects >= 2).await;
    if mode == XdsMode::Sotw {
        for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
            server.wait_acked(t, "1").await;
        }
        assert_eq!(client.status.borrow().updates, before.updates, "pushed again");
    }
    // (Delta: the known resources are not resent; wildcard types get an empty answer.)
    let _ = after;
    // And a real change still reaches it.
    source.set_one(LISTENER, listener("l2")).unwrap();
    server.wait_acked(LISTENER, "2").await;
    client.stop().await;
    server.stop().await;
}

/// A control plane away long enough for an uncapped backoff to grow to tens of seconds:
/// with the default backoff every delay drawn stays within its cap
/// ([`DEFAULT_MAX_BACKOFF`], 500 ms), and
/// when the server returns the pending attempt reconnects (no further delay is drawn).
#[tokio::test]
async fn default_backoff_reconnects_within_its_cap_after_a_long_outage() {
    let source = basic_source();
    let server = RunningServer::start(source.clone(), any_port()).await;
    let addr = server.addr;
    let mut client = RunningClient::start_with(addr, XdsMode::Sotw, MemHandler::new(), Backoff::default());
    server.wait_acked(LISTENER, "1").await;
    server.stop().await;

    // Eight failed attempts: an uncapped 250 ms x 2^n backoff would be at 32 s by now.
    let mut drawn = Vec::new();
    while drawn.len() < 8 {
        client.status.changed().await.unwrap();
        let status = client.status.borrow_and_update().clone();
        assert!(!status.connected, "connected with the server down");
        if let Some(delay) = status.next_retry {
            assert!(delay <= DEFAULT_MAX_BACKOFF, "attempt {} waits {delay:?}, over the cap", drawn.len());
            assert!(delay <= std::time::Duration::from_millis(500), "attempt {} waits {delay:?}", drawn.len());
            drawn.push(delay);
        }
    }
    assert!(drawn.iter().any(|d| *d != drawn[0]), "no jitter: {drawn:?}");

    let server = RunningServer::start(source, addr).await;
    let mut later = 0;
    let status = loop {
        let status = client.status.borrow_and_update().clone();
        if status.connected {
            break status;
        }
        let changed = tokio::time::timeout(WAIT, client.status.changed()).await;
        changed.expect("not reconnected within the wait").unwrap();
        if client.status.borrow().next_retry.is_some() {
            later += 1;
        }
    };
    assert_eq!(status.connects, 2);
    assert!(later <= 1, "{later} more delays drawn after the server was back");
    server.wait_acked(LISTENER, "1").await;
    client.stop().await;
    server.stop().await;
}

macro_rules! both_modes {
    ($($scenario:ident),* $(,)?) => {
        mod sotw {
            use super::*;
            $(#[tokio::test] async fn $scenario() { super::$scenario(XdsMode::Sotw).await })*
        }
        mod delta {
            use super::*;
            $(#[tokio::test] async fn $scenario() { super::$scenario(XdsMode::Delta).await })*
        }
    };
}

both_modes!(
    initial_sync_of_all_four_types,
    change_is_pushed_and_acked,
    handler_error_is_nacked,
    interest_change_subscribes_new_route,
    removal_propagates,
    reconnect_after_server_restart,
    reconnect_with_unchanged_resources_pushes_nothing,
);
