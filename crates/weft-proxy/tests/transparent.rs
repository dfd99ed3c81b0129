//! Transparent mode: inside a fresh network namespace, iptables REDIRECTs the app's
//! outbound connections to the proxy's capture listener; the proxy recovers the original
//! destination (SO_ORIGINAL_DST) and hands the connection to the listener claiming it
//! (`use_original_dst` + `bind_to_port: false`), exactly as Envoy does in Istio sidecars.
//! Needs root for the namespace and iptables (CI runs as root).

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_testkit::echo::{EchoServer, TcpEchoServer};
use weft_testkit::http::get_h1;
use weft_xds::build::{self, Routes};
use weft_xds::type_url;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e} (run scripts/setup.sh)"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn redirected_connections_reach_the_listener_of_their_original_destination() {
    assert!(nix::unistd::Uid::effective().is_root(), "transparent-mode tests need root (network namespace + iptables)");
    // The namespace is per thread: everything below runs on this thread's runtime, and the
    // `ip`/`iptables` children it spawns inherit the namespace.
    let t = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        run("ip", &["link", "set", "lo", "up"]);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(scenario());
    });
    t.join().expect("transparent scenario failed");
}

async fn scenario() {
    let mesh = Mesh::start().await;
    let reviews = EchoServer::start("reviews").await;
    let tcp = TcpEchoServer::start().await;
    let mut capture = build::tcp_listener("virtualOutbound", "127.0.0.1:0".parse().unwrap(), "blackhole");
    capture.use_original_dst = Some(BoolValue { value: true });
    let hcm = build::http_connection_manager(
        "reviews",
        Routes::Inline(Box::new(rc(
            "reviews",
            vec![vhost("reviews", &["*"], vec![route("r", prefix("/"), to("reviews"))])],
        ))),
        None,
        &[],
    );
    let mut http_virtual = build::http_listener("127.1.2.3_80", "127.1.2.3:80".parse().unwrap(), hcm);
    http_virtual.bind_to_port = Some(BoolValue { value: false });
    let mut tcp_virtual = build::tcp_listener("0.0.0.0_5000", "0.0.0.0:5000".parse().unwrap(), "tcp-echo");
    tcp_virtual.bind_to_port = Some(BoolValue { value: false });
    // Inbound capture (Istio's virtualInbound): no hand-off, but the original_dst listener
    // filter makes the original destination port select the filter chain.
    let mut inbound = build::tcp_listener("virtualInbound", "127.0.0.1:0".parse().unwrap(), "blackhole");
    let mut by_port = build::tcp_listener("x", "127.0.0.1:0".parse().unwrap(), "tcp-echo").filter_chains.remove(0);
    by_port.filter_chain_match = Some(envoy_types::pb::envoy::config::listener::v3::FilterChainMatch {
        destination_port: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 7070 }),
        ..Default::default()
    });
    inbound.filter_chains.insert(0, by_port);
    inbound.listener_filters.push(envoy_types::pb::envoy::config::listener::v3::ListenerFilter {
        name: "envoy.filters.listener.original_dst".into(),
        ..Default::default()
    });
    mesh.set(
        type_url::LISTENER,
        vec![pack_any(capture), pack_any(http_virtual), pack_any(tcp_virtual), pack_any(inbound)],
    );
    mesh.set(
        type_url::CLUSTER,
        vec![
            pack_any(build::eds_cluster("reviews", false)),
            pack_any(build::eds_cluster("tcp-echo", false)),
            pack_any(build::eds_cluster("blackhole", false)),
        ],
    );
    mesh.set(
        type_url::ENDPOINT,
        vec![
            pack_any(build::cla("reviews", &[(reviews.addr, 1, HealthStatus::Healthy)])),
            pack_any(build::cla("tcp-echo", &[(tcp.addr, 1, HealthStatus::Healthy)])),
            pack_any(build::cla("blackhole", &[])),
        ],
    );
    let proxy = mesh.proxy("transparent", false).await;
    mesh.synced_all(&proxy).await;
    let capture_addr = proxy.listener_addr("virtualOutbound", WAIT).await.unwrap();
    let port = capture_addr.port().to_string();
    let inbound_port = proxy.listener_addr("virtualInbound", WAIT).await.unwrap().port().to_string();
    run(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "127.1.2.4",
            "--dport",
            "7070",
            "-j",
            "REDIRECT",
            "--to-ports",
            &inbound_port,
        ],
    );
    for dport in ["80", "5000"] {
        run(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                "127.1.2.3",
                "--dport",
                dport,
                "-j",
                "REDIRECT",
                "--to-ports",
                &port,
            ],
        );
    }

    // The app dials the service address; the proxy answers from the listener claiming it.
    let r = get_h1("127.1.2.3:80".parse().unwrap(), "reviews", "/captured").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-echo-server"), Some("reviews"));
    assert_eq!(reviews.requests(), 1);

    // Any IP on port 5000 falls to the 0.0.0.0:5000 virtual listener (TCP proxy).
    let dst: SocketAddr = "127.1.2.3:5000".parse().unwrap();
    let mut s = tokio::net::TcpStream::connect(dst).await.unwrap();
    s.write_all(b"through the capture").await.unwrap();
    let mut buf = vec![0u8; 19];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"through the capture");
    assert_eq!(tcp.connections(), 1, "the TCP echo server was not reached through the proxy");

    // Inbound: the chain for original port 7070 forwards to the app.
    let mut s = tokio::net::TcpStream::connect("127.1.2.4:7070").await.unwrap();
    s.write_all(b"inbound by port").await.unwrap();
    let mut buf = vec![0u8; 15];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("no echo: chain not chosen by original port")
        .unwrap();
    assert_eq!(&buf, b"inbound by port");
    assert_eq!(tcp.connections(), 2);
}
