//! `weft iptables`: the rules it writes (dry run) and, in a fresh network namespace, that
//! they capture an application's outbound connection to the proxy's port with the
//! original destination kept, exempt the proxy's own UID, and are removed by `--cleanup`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

fn weft(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(WEFT).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e} (run scripts/setup.sh)"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into()
}

#[test]
fn dry_run_prints_istio_style_rules_for_the_chosen_ports_and_ranges() {
    let (code, out, err) = weft(&[
        "iptables",
        "--dry-run",
        "--proxy-uid",
        "2000",
        "--inbound-ports",
        "9080,15020",
        "--exclude-outbound-ip-ranges",
        "10.96.0.0/12",
        "--exclude-outbound-ports",
        "5432",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"*nat"));
    assert_eq!(lines.last(), Some(&"COMMIT"));
    assert!(lines.contains(&"-A ISTIO_INBOUND -p tcp --dport 9080 -j ISTIO_IN_REDIRECT"), "{out}");
    assert!(!out.contains("--dport 15020 -j ISTIO_IN_REDIRECT"), "the proxy's own port is never captured: {out}");
    assert!(lines.contains(&"-A ISTIO_OUTPUT -m owner --uid-owner 2000 -j RETURN"), "{out}");
    assert!(lines.contains(&"-A ISTIO_OUTPUT -d 10.96.0.0/12 -j RETURN"), "{out}");
    assert!(lines.contains(&"-A ISTIO_OUTPUT -p tcp --dport 5432 -j RETURN"), "{out}");
    assert_eq!(lines.iter().filter(|l| l.ends_with("-j ISTIO_REDIRECT")).count(), 1, "{out}");
    for (flag, value, expect) in [
        ("--inbound-ports", "80,http", "not a port number"),
        ("--exclude-outbound-ip-ranges", "10.0.0.0/40", "prefix length"),
        ("--outbound-ip-ranges", "example.com", "not an IPv4"),
    ] {
        let (code, _, err) = weft(&["iptables", "--dry-run", flag, value]);
        assert_ne!(code, 0);
        assert!(err.contains(flag) && err.contains(expect), "{err}");
    }
}

fn original_dst(s: &TcpStream) -> SocketAddr {
    let a = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::OriginalDst).unwrap();
    SocketAddr::from((std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), u16::from_be(a.sin_port)))
}

#[test]
fn rules_capture_outbound_to_the_proxy_exempt_its_uid_and_clean_up() {
    assert!(nix::unistd::Uid::effective().is_root(), "needs root (network namespace + iptables); CI runs as root");
    let t = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        run("ip", &["link", "set", "lo", "up"]);
        run("ip", &["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        run("ip", &["addr", "add", "10.9.0.1/24", "dev", "v0"]);
        run("ip", &["link", "set", "v0", "up"]);
        run("ip", &["link", "set", "v1", "up"]);
        let proxy = TcpListener::bind("0.0.0.0:15001").unwrap();
        let dest: SocketAddr = "10.9.0.77:80".parse().unwrap();

        // Our UID (0) is not the proxy's: the app's connection is captured.
        let (code, _, err) = weft(&["iptables"]);
        assert_eq!(code, 0, "{err}");
        let saved = run("iptables-save", &["-t", "nat"]);
        assert!(saved.contains("-A OUTPUT -p tcp -j ISTIO_OUTPUT"), "{saved}");
        let _app = TcpStream::connect_timeout(&dest, Duration::from_secs(2)).expect("captured connection");
        let (accepted, _) = proxy.accept().unwrap();
        assert_eq!(original_dst(&accepted), dest, "the proxy learns where the app was going");
        // Installing twice is refused with a hint, not duplicated.
        let (code, _, err) = weft(&["iptables"]);
        assert_ne!(code, 0);
        assert!(err.contains("--cleanup"), "{err}");

        // Cleanup leaves nothing of weft's behind.
        let (code, _, err) = weft(&["iptables", "--cleanup"]);
        assert_eq!(code, 0, "{err}");
        let saved = run("iptables-save", &["-t", "nat"]);
        assert!(!saved.contains("ISTIO"), "{saved}");

        // With the proxy running as our UID, our own connection is exempt.
        let (code, _, err) = weft(&["iptables", "--proxy-uid", "0"]);
        assert_eq!(code, 0, "{err}");
        proxy.set_nonblocking(true).unwrap();
        let direct = TcpStream::connect_timeout(&dest, Duration::from_millis(500));
        assert!(direct.is_err(), "the proxy's own traffic must not be captured");
        assert!(proxy.accept().is_err(), "nothing reached the capture port");
        weft(&["iptables", "--cleanup"]);
    });
    t.join().expect("capture scenario failed");
}
