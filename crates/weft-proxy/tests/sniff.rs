//! Protocol sniffing end to end: a real rustls ClientHello larger than 1 KiB, split over
//! two TLS records sent in two writes, must still have its SNI read, so the connection
//! reaches the filter chain whose `server_names` name it (TLS passthrough to a TCP
//! backend, as Istio's `tls` routes and SNI-routed egress do).

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use envoy_types::pb::envoy::config::listener::v3::FilterChainMatch;
use envoy_types::util::pack_any;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_testkit::echo::BannerServer;
use weft_xds::{build, type_url};

/// ALPN protocols offered to make the ClientHello large (many real clients send
/// post-quantum key shares instead; the effect on the hello's size is the same).
const ALPN_PROTOCOLS: usize = 60;
/// Largest TLS record payload the client sends: the hello needs two records.
const MAX_FRAGMENT: usize = 1024;

/// The TLS records of a rustls ClientHello for `sni`, padded past 1 KiB with ALPN names.
fn client_hello_records(sni: &str) -> Vec<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = (0..ALPN_PROTOCOLS).map(|i| format!("padding-protocol-{i:03}").into_bytes()).collect();
    config.max_fragment_size = Some(MAX_FRAGMENT);
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut bytes = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut bytes).unwrap();
    }
    // Split at record boundaries: type (1), version (2), length (2), payload.
    let mut records = Vec::new();
    let mut rest = bytes.as_slice();
    while rest.len() >= 5 {
        let len = 5 + usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        let (record, tail) = rest.split_at(len);
        records.push(record.to_vec());
        rest = tail;
    }
    assert!(rest.is_empty(), "trailing bytes after the last record");
    records
}

/// Sends the hello for `sni` record by record and returns what comes back: the
/// backend's greeting followed by the echoed hello, or less if the proxy closed.
async fn send_hello(proxy: SocketAddr, sni: &str, want: usize) -> (Vec<u8>, Vec<u8>) {
    let records = client_hello_records(sni);
    let hello = records.concat();
    assert!(hello.len() > 1024, "ClientHello of {} bytes is not larger than 1 KiB", hello.len());
    assert_eq!(records.len(), 2, "ClientHello should span two records");
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.set_nodelay(true).unwrap();
    for record in &records {
        s.write_all(record).await.unwrap();
        s.flush().await.unwrap();
    }
    let mut got = vec![0u8; want + hello.len()];
    let mut n = 0;
    let _ = tokio::time::timeout(WAIT, async {
        while n < got.len() {
            match s.read(&mut got[n..]).await {
                Ok(0) | Err(_) => return,
                Ok(k) => n += k,
            }
        }
    })
    .await;
    got.truncate(n);
    (got, hello)
}

fn sni_chain(server_name: &str, cluster: &str) -> envoy_types::pb::envoy::config::listener::v3::FilterChain {
    let mut chain = build::tcp_listener("x", "127.0.0.1:0".parse().unwrap(), cluster).filter_chains.remove(0);
    chain.filter_chain_match = Some(FilterChainMatch {
        server_names: vec![server_name.into()],
        transport_protocol: "tls".into(),
        ..Default::default()
    });
    chain
}

#[tokio::test]
async fn a_two_record_client_hello_over_1k_reaches_the_chain_its_sni_names() {
    let mesh = Mesh::start().await;
    let alpha = BannerServer::start("alpha backend\n").await;
    let beta = BannerServer::start("beta backend\n").await;
    clusters(&mesh, &[("alpha", vec![alpha.addr]), ("beta", vec![beta.addr])], false);
    let mut listener = build::tcp_listener("sni", "127.0.0.1:0".parse().unwrap(), "alpha");
    listener.filter_chains = vec![sni_chain("alpha.example", "alpha"), sni_chain("beta.example", "beta")];
    mesh.set(type_url::LISTENER, vec![pack_any(listener)]);
    let proxy = mesh.proxy("sniff-sni", false).await;
    mesh.synced_all(&proxy).await;
    let addr = proxy.listener_addr("sni", WAIT).await.unwrap();

    for (sni, greeting) in [("beta.example", &b"beta backend\n"[..]), ("alpha.example", &b"alpha backend\n"[..])] {
        let (got, hello) = send_hello(addr, sni, greeting.len()).await;
        assert!(
            got.starts_with(greeting),
            "{sni}: expected {:?} first, got {:?}",
            String::from_utf8_lossy(greeting),
            String::from_utf8_lossy(&got[..got.len().min(64)])
        );
        // Passthrough: the backend received the hello unchanged (and echoed it).
        assert!(got[greeting.len()..] == hello[..], "{sni}: the backend did not get the whole hello intact");
    }
    assert_eq!((alpha.connections(), beta.connections()), (1, 1));
}
