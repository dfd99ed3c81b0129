//! Transparent mode's network: a bridge with a private /24 that only exists on this
//! machine, one network namespace per workload joined to it by a veth pair, and in each
//! namespace an `/etc/hosts` naming the mesh's services (as cluster DNS would). Nothing is
//! routed off the machine: namespaces have a route to the bridge's subnet and to the
//! service address range only. Every object is named after the bridge so that teardown
//! (and the cleanup of a crashed run) finds them all.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _};

/// The first two octets of the bridges' subnets: `10.250.R.0/24`.
const SUBNET: [u8; 2] = [10, 250];
/// The range service addresses are taken from when a Service has no `clusterIP`
/// (reserved, never routed anywhere: only captured by the sidecars).
pub const SERVICE_RANGE: &str = weft_control::vip::SERVICE_RANGE;

/// The network of one `weft up --transparent`.
pub struct Network {
    /// Bridge name (`weftbrR`).
    pub bridge: String,
    /// Third octet of the subnet.
    pub subnet: u8,
    namespaces: Vec<String>,
    forward_rule: bool,
}

/// One workload's namespace.
#[derive(Debug, Clone)]
pub struct Namespace {
    /// Name under /run/netns.
    pub name: String,
    /// Its address on the bridge.
    pub ip: Ipv4Addr,
}

fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running `{}` (is iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn hosts_dir(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

impl Network {
    /// Creates the bridge on a /24 no interface of this machine uses.
    pub fn create() -> anyhow::Result<Network> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("--transparent needs root (network namespaces, a bridge and iptables rules)");
        }
        let used = run(&["ip", "-4", "-o", "addr", "show"])?;
        let links = run(&["ip", "-o", "link", "show"])?;
        let start: u8 = rand::random();
        let subnet = (0..=255u16)
            .map(|i| start.wrapping_add(i as u8))
            .find(|r| {
                let prefix = format!(" {}.{}.{r}.", SUBNET[0], SUBNET[1]);
                !used.contains(&prefix) && !links.contains(&format!(": weftbr{r}:"))
            })
            .context("no free 10.250.x.0/24 subnet for the bridge")?;
        let bridge = format!("weftbr{subnet}");
        let mut net = Network { bridge: bridge.clone(), subnet, namespaces: Vec::new(), forward_rule: false };
        let host = net.address(1);
        let setup = || -> anyhow::Result<()> {
            run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
            run(&["ip", "addr", "add", &format!("{host}/24"), "dev", &bridge])?;
            run(&["ip", "link", "set", &bridge, "up"])?;
            Ok(())
        };
        if let Err(e) = setup() {
            net.teardown();
            return Err(e);
        }
        // With br_netfilter, bridged packets cross the host's FORWARD chain; a DROP policy
        // there (Docker sets one) would cut the namespaces off from each other.
        net.forward_rule = run(&["iptables", "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT"]).is_ok();
        Ok(net)
    }

    /// `10.250.R.host`.
    pub fn address(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET[0], SUBNET[1], self.subnet, host)
    }

    /// The host's address on the bridge.
    pub fn host_address(&self) -> Ipv4Addr {
        self.address(1)
    }

    /// The network namespace `add` makes for `workload`.
    pub fn namespace_name(&self, workload: &str) -> String {
        format!("{}-{}", self.bridge, workload.chars().take(40).collect::<String>())
    }

    /// Creates namespace number `index` (address `.index+2`) for `workload`, with `hosts`
    /// as its `/etc/hosts`.
    pub fn add(&mut self, index: usize, workload: &str, hosts: &str) -> anyhow::Result<Namespace> {
        let host = u8::try_from(index + 2).ok().filter(|h| *h < 255).context("more than 252 workloads")?;
        let ip = self.address(host);
        // /run/netns names are free-form; keep them short and recognisable.
        let name = self.namespace_name(workload);
        let veth = format!("wv{}h{host}", self.subnet);
        run(&["ip", "netns", "add", &name])?;
        self.namespaces.push(name.clone());
        run(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &name])?;
        run(&["ip", "link", "set", &veth, "master", &self.bridge, "up"])?;
        run(&["ip", "-n", &name, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        run(&["ip", "-n", &name, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &name, "route", "add", SERVICE_RANGE, "dev", "eth0"])?;
        let dir = hosts_dir(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("hosts"), hosts).with_context(|| format!("writing {}/hosts", dir.display()))?;
        Ok(Namespace { name, ip })
    }

    /// Rewrites every namespace's `/etc/hosts` (in place: `ip netns exec` bind-mounted
    /// the file into running apps, so the same inode must change).
    pub fn update_hosts(&self, hosts: &str) {
        for ns in &self.namespaces {
            let path = hosts_dir(ns).join("hosts");
            if std::fs::read_to_string(&path).is_ok_and(|old| old == hosts) {
                continue;
            }
            if let Err(e) = std::fs::write(&path, hosts) {
                tracing::warn!("updating {}: {e}", path.display());
            }
        }
    }

    /// Removes every namespace (their veths go with them), the bridge, the FORWARD rule
    /// and the hosts files. Returns what could not be removed.
    pub fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for ns in std::mem::take(&mut self.namespaces) {
            if let Err(e) = run(&["ip", "netns", "del", &ns]) {
                errors.push(e.to_string());
            }
            let _ = std::fs::remove_dir_all(hosts_dir(&ns));
        }
        if self.forward_rule {
            let b = self.bridge.clone();
            if let Err(e) = run(&["iptables", "-D", "FORWARD", "-i", &b, "-o", &b, "-j", "ACCEPT"]) {
                errors.push(e.to_string());
            }
            self.forward_rule = false;
        }
        if run(&["ip", "link", "show", &self.bridge]).is_ok() {
            if let Err(e) = run(&["ip", "link", "del", &self.bridge]) {
                errors.push(e.to_string());
            }
        }
        errors
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for e in self.teardown() {
            tracing::warn!("teardown: {e}");
        }
    }
}

impl Namespace {
    /// A command running `program` inside the namespace (`ip netns exec`, which also
    /// mounts the namespace's `/etc/hosts`).
    pub fn command(&self, program: &std::ffi::OsStr) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.arg("netns").arg("exec").arg(&self.name).arg(program);
        c
    }
}

/// `/etc/hosts` for the namespaces: every Service by short, namespaced and full name.
pub fn hosts_file(services: &BTreeMap<(String, String), Ipv4Addr>, domain: &str) -> String {
    let mut out = String::from("127.0.0.1 localhost\n::1 localhost\n");
    for ((ns, name), ip) in services {
        out.push_str(&format!("{ip} {name}.{ns}.svc.{domain} {name}.{ns}.svc {name}.{ns}"));
        // Short names resolve in the default namespace only (a pod's search path).
        if ns == "default" {
            out.push_str(&format!(" {name}"));
        }
        out.push('\n');
    }
    out
}

/// Service addresses: a Service's first IPv4 `clusterIP`, else one from
/// [`SERVICE_RANGE`], as the control plane allocates them (`weft_control::vip`), so the
/// address a name resolves to is the one its outbound listener matches.
pub fn service_addresses(resources: &[weft_api::Resource]) -> BTreeMap<(String, String), Ipv4Addr> {
    weft_control::vip::service_addresses(resources)
        .into_iter()
        .filter_map(|(key, ips)| {
            ips.iter().find_map(|ip| match ip {
                std::net::IpAddr::V4(v4) => Some((key.clone(), *v4)),
                std::net::IpAddr::V6(_) => None,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_services_like_cluster_dns() {
        let mut s = BTreeMap::new();
        s.insert(("default".to_string(), "reviews".to_string()), Ipv4Addr::new(240, 240, 0, 1));
        s.insert(("shop".to_string(), "cart".to_string()), Ipv4Addr::new(10, 96, 0, 9));
        let h = hosts_file(&s, "cluster.local");
        assert!(
            h.contains("240.240.0.1 reviews.default.svc.cluster.local reviews.default.svc reviews.default reviews\n")
        );
        assert!(h.contains("10.96.0.9 cart.shop.svc.cluster.local cart.shop.svc cart.shop\n"), "{h}");
    }
}
