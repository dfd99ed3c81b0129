//! `weft iptables`: the traffic capture of transparent mode, as Istio's `istio-iptables`
//! init step sets it up in a workload's network namespace (REDIRECT mode).
//!
//! Inbound TCP (all ports, or `--inbound-ports`) is redirected to the proxy's inbound
//! capture port 15006, except the proxy's own ports; outbound TCP (all destinations, or
//! `--outbound-ip-ranges`) to 15001, except the proxy's own traffic (its UID/GID) and
//! loopback. The rules are applied atomically with `iptables-restore --noflush`;
//! `--cleanup` removes them; `--dry-run` prints them instead.

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

/// The proxy's ports that are never captured inbound (Istio's: health, metrics, status).
const DEFAULT_EXCLUDED_INBOUND: [u16; 3] = [15020, 15021, 15090];
/// The chains weft creates (Istio's names, so existing runbooks apply).
const CHAINS: [&str; 4] = ["ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT"];

/// What to capture.
#[derive(Debug, Clone, clap::Args)]
pub struct IptablesArgs {
    /// UID the proxy runs as (its own traffic is never captured).
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// GID the proxy runs as (defaults to the UID).
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    /// Port of the proxy's outbound capture listener.
    #[arg(long, default_value_t = 15001)]
    pub outbound_capture_port: u16,
    /// Port of the proxy's inbound capture listener.
    #[arg(long, default_value_t = 15006)]
    pub inbound_capture_port: u16,
    /// Inbound ports to capture: `*` for all, or a comma-separated list.
    #[arg(long, default_value = "*")]
    pub inbound_ports: String,
    /// Inbound ports never captured (added to 15020, 15021, 15090).
    #[arg(long, default_value = "")]
    pub exclude_inbound_ports: String,
    /// Outbound destinations to capture: `*` for all, or comma-separated CIDRs.
    #[arg(long, default_value = "*")]
    pub outbound_ip_ranges: String,
    /// Outbound destinations never captured (comma-separated CIDRs).
    #[arg(long, default_value = "")]
    pub exclude_outbound_ip_ranges: String,
    /// Outbound ports never captured.
    #[arg(long, default_value = "")]
    pub exclude_outbound_ports: String,
    /// Print the rules (iptables-restore format) instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove weft's rules and chains instead of adding them.
    #[arg(long)]
    pub cleanup: bool,
}

fn ports(list: &str, flag: &str) -> anyhow::Result<Vec<u16>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|p| p.parse::<u16>().with_context(|| format!("{flag}: {p:?} is not a port number (1-65535)")))
        .collect()
}

fn cidrs(list: &str, flag: &str) -> anyhow::Result<Vec<String>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|c| {
            let (ip, len) = c.split_once('/').unwrap_or((c, "32"));
            let ip: std::net::Ipv4Addr =
                ip.parse().with_context(|| format!("{flag}: {c:?} is not an IPv4 address or CIDR"))?;
            match len.parse::<u8>() {
                Ok(l) if l <= 32 => Ok(format!("{ip}/{l}")),
                _ => bail!("{flag}: {c:?} has a bad prefix length (0-32)"),
            }
        })
        .collect()
}

/// The nat table rules, in `iptables-restore` format (without `*nat` / `COMMIT`).
pub fn rules(a: &IptablesArgs) -> anyhow::Result<Vec<String>> {
    let uid = a.proxy_uid;
    let gid = a.proxy_gid.unwrap_or(uid);
    let mut excluded_in: Vec<u16> = DEFAULT_EXCLUDED_INBOUND.to_vec();
    excluded_in.extend(ports(&a.exclude_inbound_ports, "--exclude-inbound-ports")?);
    let capture_in =
        if a.inbound_ports.trim() == "*" { None } else { Some(ports(&a.inbound_ports, "--inbound-ports")?) };
    let capture_out = if a.outbound_ip_ranges.trim() == "*" {
        None
    } else {
        Some(cidrs(&a.outbound_ip_ranges, "--outbound-ip-ranges")?)
    };
    let excluded_out = cidrs(&a.exclude_outbound_ip_ranges, "--exclude-outbound-ip-ranges")?;
    let excluded_out_ports = ports(&a.exclude_outbound_ports, "--exclude-outbound-ports")?;

    let mut r: Vec<String> = CHAINS.iter().map(|c| format!(":{c} - [0:0]")).collect();
    r.push(format!("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}", a.outbound_capture_port));
    r.push(format!("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}", a.inbound_capture_port));
    // Inbound.
    match &capture_in {
        Some(list) if list.is_empty() => {}
        _ => r.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".into()),
    }
    match &capture_in {
        None => {
            for p in &excluded_in {
                r.push(format!("-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN"));
            }
            r.push("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".into());
        }
        Some(list) => {
            for p in list.iter().filter(|p| !excluded_in.contains(p)) {
                r.push(format!("-A ISTIO_INBOUND -p tcp --dport {p} -j ISTIO_IN_REDIRECT"));
            }
        }
    }
    // Outbound.
    r.push("-A OUTPUT -p tcp -j ISTIO_OUTPUT".into());
    for p in &excluded_out_ports {
        r.push(format!("-A ISTIO_OUTPUT -p tcp --dport {p} -j RETURN"));
    }
    // The proxy's own connections to a local app through loopback (Istio's 127.0.0.6).
    r.push("-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN".into());
    // An app calling its own pod IP goes through the inbound path.
    r.push(format!("-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner {uid} -j ISTIO_IN_REDIRECT"));
    r.push(format!("-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner {uid} -j RETURN"));
    r.push(format!("-A ISTIO_OUTPUT -m owner --uid-owner {uid} -j RETURN"));
    r.push(format!("-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner {gid} -j ISTIO_IN_REDIRECT"));
    r.push(format!("-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner {gid} -j RETURN"));
    r.push(format!("-A ISTIO_OUTPUT -m owner --gid-owner {gid} -j RETURN"));
    r.push("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN".into());
    for c in &excluded_out {
        r.push(format!("-A ISTIO_OUTPUT -d {c} -j RETURN"));
    }
    match &capture_out {
        None => r.push("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into()),
        Some(list) => {
            for c in list {
                r.push(format!("-A ISTIO_OUTPUT -d {c} -j ISTIO_REDIRECT"));
            }
        }
    }
    Ok(r)
}

/// Runs the command.
pub fn run(a: &IptablesArgs) -> anyhow::Result<()> {
    if a.cleanup {
        return cleanup(a.dry_run);
    }
    let text = format!("*nat\n{}\nCOMMIT\n", rules(a)?.join("\n"));
    if a.dry_run {
        print!("{text}");
        return Ok(());
    }
    let exists = Command::new("iptables")
        .args(["-t", "nat", "-S", "ISTIO_OUTPUT"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if exists {
        bail!("capture rules are already installed in this network namespace; run `weft iptables --cleanup` first");
    }
    let mut child = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run iptables-restore (install iptables; weft iptables needs root / CAP_NET_ADMIN)")?;
    child.stdin.take().context("iptables-restore stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore refused the rules (already applied? run `weft iptables --cleanup` first): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    eprintln!(
        "weft iptables: capture installed (outbound -> {}, inbound -> {})",
        a.outbound_capture_port, a.inbound_capture_port
    );
    Ok(())
}

/// Removes the jumps into weft's chains and the chains themselves (missing ones are fine).
fn cleanup(dry_run: bool) -> anyhow::Result<()> {
    let steps: Vec<Vec<&str>> = vec![
        vec!["-t", "nat", "-D", "PREROUTING", "-p", "tcp", "-j", "ISTIO_INBOUND"],
        vec!["-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", "ISTIO_OUTPUT"],
    ];
    let mut all: Vec<Vec<&str>> = steps;
    for c in CHAINS {
        all.push(vec!["-t", "nat", "-F", c]);
    }
    for c in CHAINS {
        all.push(vec!["-t", "nat", "-X", c]);
    }
    for args in all {
        if dry_run {
            println!("iptables {}", args.join(" "));
            continue;
        }
        // A rule or chain that is not there is what cleanup wants: ignore failures.
        let _ = Command::new("iptables").args(&args).stderr(Stdio::null()).status();
    }
    Ok(())
}
