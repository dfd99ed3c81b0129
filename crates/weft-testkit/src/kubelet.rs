//! What the test API server ([`crate::kube::KubeApiServer`]) runs without: the
//! ReplicaSet controller and a kubelet, played just far enough for a mesh to run on it.
//!
//! - [`Kubelet::replicate`] does the Deployment and ReplicaSet controllers' part: for
//!   every Deployment of a namespace, a ReplicaSet `<deployment>-<hash>` (owned by the
//!   Deployment) and one Pod `<replicaset>-<suffix>` (owned by the ReplicaSet, labelled
//!   `pod-template-hash`, `serviceAccountName` defaulted to `default` as the ServiceAccount
//!   admission plugin the harness runs without would) created through the API. [`Injection`] says whether the Pod is
//!   created as given (an admission webhook may mutate it) or first passed through the
//!   caller's injection (`weft inject`'s code).
//! - [`Kubelet::run`] does the kubelet's part for a Pod as the API server returns it:
//!   a network namespace joined to a bridge with the pod's IP (`10.252.R.x/24`, the
//!   bridge's host side `.1`), an `/etc/hosts` naming the cluster's Services by their
//!   cluster IPs (as cluster DNS would; the Service range is routed into the namespace so
//!   sidecars capture it), the projected service-account tokens from the TokenRequest API
//!   mounted at their `mountPath` in the containers' own mount namespaces, the
//!   environment with the downward API and `$(VAR)` expansion; init containers run to
//!   completion in order, then the containers start as processes (what each image runs is
//!   the caller's [`Images`] mapping) as their `runAsUser`/`runAsGroup`. When every
//!   container with an HTTP readiness probe answers it, the Pod's status gets `podIP`,
//!   phase `Running` and `Ready`, as a kubelet writes it.
//!
//! Needs root (namespaces, a bridge, mounts, `setpriv`), iproute2 and util-linux.
//! Everything is removed on drop: processes killed, namespaces, the bridge and its
//! FORWARD rule deleted. The token mount points are created on the host when missing
//! (empty directories, left in place).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::kube::KubeApiServer;

/// The first two octets of the pod networks: `10.252.R.0/24`.
const SUBNET: [u8; 2] = [10, 252];
/// The test API server's `--service-cluster-ip-range`.
pub const SERVICE_RANGE: &str = "10.0.0.0/24";
/// How long a Pod may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// How the Pods [`Kubelet::replicate`] creates are injected.
pub enum Injection {
    /// Created as the template says; the API server's admission webhooks (weft's
    /// `/inject`, when registered) do what they do.
    Webhook,
    /// Passed through this function first (a Pod's JSON in, the injected Pod out), as
    /// `kubectl apply -f <(weft inject -f pod.yaml)` would create it.
    Client(Injector),
}

/// Injects one Pod: its JSON in, the injected Pod out.
pub type Injector = Box<dyn Fn(&Value) -> anyhow::Result<Value> + Send + Sync>;

/// What a container's image runs: `(image, command, args)` to the argv to execute, or
/// None for an image the test does not know (the pod then fails to start).
pub type Images = Box<dyn Fn(&str, &[String], &[String]) -> Option<Vec<String>> + Send + Sync>;

/// A Pod the kubelet runs.
pub struct RunningPod {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its IP on the pod network.
    pub ip: Ipv4Addr,
    /// The network namespace (under /run/netns).
    pub netns: String,
    /// Where its containers' logs are (`<container>.log`).
    pub log_dir: PathBuf,
    children: Vec<Child>,
}

impl RunningPod {
    /// A command run inside the pod's network namespace (`kubectl exec`'s place), as root.
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, program]);
        c.kill_on_drop(true);
        c
    }

    /// The log of one container.
    pub fn log(&self, container: &str) -> String {
        std::fs::read_to_string(self.log_dir.join(format!("{container}.log"))).unwrap_or_default()
    }
}

/// The emulated kubelet (and ReplicaSet controller) of one test.
pub struct Kubelet {
    images: Images,
    bridge: String,
    subnet: u8,
    forward_rule: bool,
    next_host: u8,
    dir: tempfile::TempDir,
    pods: Vec<RunningPod>,
}

fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running `{}`", args.join(" ")))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Kubelet {
    /// Creates the pod network (a bridge on a free `10.252.R.0/24`).
    pub fn new(images: Images) -> anyhow::Result<Kubelet> {
        let used = run(&["ip", "-4", "-o", "addr", "show"])?;
        let links = run(&["ip", "-o", "link", "show"])?;
        let start = (std::process::id() % 251) as u8;
        let subnet = (0..=255u16)
            .map(|i| start.wrapping_add(i as u8))
            .find(|r| {
                !used.contains(&format!(" {}.{}.{r}.", SUBNET[0], SUBNET[1])) && !links.contains(&format!(": kbr{r}:"))
            })
            .context("no free 10.252.x.0/24 subnet for the pod network")?;
        let bridge = format!("kbr{subnet}");
        let mut k = Kubelet {
            images,
            bridge: bridge.clone(),
            subnet,
            forward_rule: false,
            next_host: 2,
            dir: tempfile::tempdir()?,
            pods: Vec::new(),
        };
        let host = k.host_address();
        run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        run(&["ip", "addr", "add", &format!("{host}/24"), "dev", &bridge])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        k.forward_rule = run(&["iptables", "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT"]).is_ok();
        Ok(k)
    }

    /// The host's address on the pod network (where pods reach the control plane).
    pub fn host_address(&self) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET[0], SUBNET[1], self.subnet, 1)
    }

    /// The pods running.
    pub fn pods(&self) -> &[RunningPod] {
        &self.pods
    }

    /// The running pod whose name starts with `prefix`.
    pub fn pod(&self, prefix: &str) -> Option<&RunningPod> {
        self.pods.iter().find(|p| p.name.starts_with(prefix))
    }

    /// Plays the Deployment and ReplicaSet controllers for every Deployment in
    /// `namespace`: a ReplicaSet and one Pod each, created through the API. The names of
    /// the Pods created.
    pub async fn replicate(
        &self,
        api: &KubeApiServer,
        namespace: &str,
        injection: &Injection,
    ) -> anyhow::Result<Vec<String>> {
        let list: Value =
            serde_json::from_str(&api.kubectl(&["get", "deployments", "-n", namespace, "-o", "json"]).await?)?;
        let mut names = Vec::new();
        for d in list["items"].as_array().into_iter().flatten() {
            let dname = d["metadata"]["name"].as_str().context("a Deployment without a name")?;
            let template = &d["spec"]["template"];
            let hash = template_hash(template);
            let rs_name = format!("{dname}-{hash}");
            let mut pod_meta = template["metadata"].clone();
            if !pod_meta.is_object() {
                pod_meta = json!({});
            }
            pod_meta["labels"]["pod-template-hash"] = json!(hash);
            let mut selector = d["spec"]["selector"].clone();
            selector["matchLabels"]["pod-template-hash"] = json!(hash);
            let rs = json!({
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {
                    "name": rs_name,
                    "namespace": namespace,
                    "labels": pod_meta["labels"],
                    "ownerReferences": [owner(d, "apps/v1", "Deployment")],
                },
                "spec": {
                    "replicas": 1,
                    "selector": selector,
                    "template": { "metadata": pod_meta, "spec": template["spec"] },
                },
            });
            let rs: Value = serde_json::from_str(
                &api.kubectl_stdin(&["create", "-o", "json", "-f", "-"], Some(&rs.to_string())).await?,
            )?;
            let mut meta = pod_meta.clone();
            let pod_name = format!("{rs_name}-{}", suffix(&rs_name));
            meta["name"] = json!(pod_name);
            meta["namespace"] = json!(namespace);
            meta["ownerReferences"] = json!([owner(&rs, "apps/v1", "ReplicaSet")]);
            let mut pod = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"] });
            // The ServiceAccount admission plugin's defaulting (the harness runs without it).
            if pod["spec"]["serviceAccountName"].as_str().is_none_or(str::is_empty) {
                pod["spec"]["serviceAccountName"] = json!("default");
            }
            if let Injection::Client(inject) = injection {
                pod = inject(&pod).with_context(|| format!("injecting pod {pod_name}"))?;
            }
            api.kubectl_stdin(&["create", "-f", "-"], Some(&pod.to_string())).await?;
            names.push(pod_name);
        }
        Ok(names)
    }

    /// Runs the Pod `name` as a kubelet would and writes its status once it is ready.
    pub async fn run(&mut self, api: &KubeApiServer, namespace: &str, name: &str) -> anyhow::Result<&RunningPod> {
        let pod: Value =
            serde_json::from_str(&api.kubectl(&["get", "pod", name, "-n", namespace, "-o", "json"]).await?)?;
        let host = self.next_host;
        if host == 255 {
            bail!("more than 252 pods");
        }
        self.next_host += 1;
        let ip = Ipv4Addr::new(SUBNET[0], SUBNET[1], self.subnet, host);
        let netns = format!("{}-{}", self.bridge, name.chars().take(40).collect::<String>());
        let pod_dir = self.dir.path().join(name);
        std::fs::create_dir_all(&pod_dir)?;
        self.network(&netns, ip, &hosts(api, name, ip).await?)?;
        let mut running = RunningPod {
            name: name.to_string(),
            namespace: namespace.to_string(),
            ip,
            netns: netns.clone(),
            log_dir: pod_dir.clone(),
            children: Vec::new(),
        };
        let volumes = self.volumes(api, &pod, &pod_dir).await?;
        let spec = &pod["spec"];
        let host_ip = self.host_address();
        for c in spec["initContainers"].as_array().into_iter().flatten() {
            // A native sidecar (restartPolicy Always) keeps running; others run to completion.
            let mut child = self.start(&running, &pod, c, ip, host_ip, &volumes)?;
            if c["restartPolicy"] == "Always" {
                running.children.push(child);
                continue;
            }
            let cname = c["name"].as_str().unwrap_or_default();
            let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
                .await
                .with_context(|| format!("init container {cname} of {name} did not finish"))??;
            if !status.success() {
                bail!("init container {cname} of {name} failed ({status}): {}", running.log(cname));
            }
        }
        for c in spec["containers"].as_array().into_iter().flatten() {
            let child = self.start(&running, &pod, c, ip, host_ip, &volumes)?;
            running.children.push(child);
        }
        let probes: Vec<(String, u16, String)> = spec["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["restartPolicy"] == "Always")
            .chain(spec["containers"].as_array().into_iter().flatten())
            .filter_map(|c| {
                let get = &c["readinessProbe"]["httpGet"];
                let port = get["port"].as_u64().and_then(|p| u16::try_from(p).ok())?;
                Some((
                    c["name"].as_str().unwrap_or_default().to_string(),
                    port,
                    get["path"].as_str().unwrap_or("/").to_string(),
                ))
            })
            .collect();
        self.pods.push(running);
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        for (container, port, path) in probes {
            while !probe(ip, port, &path).await {
                if tokio::time::Instant::now() > deadline {
                    let p = self.pods.last().map(|p| p.log(&container)).unwrap_or_default();
                    bail!(
                        "{name}: container {container} not ready (GET {path} on :{port}) within {READY_TIMEOUT:?}: {p}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        write_ready(api, namespace, name, ip, self.host_address()).await?;
        self.pods.last().context("the pod just started")
    }

    fn network(&self, netns: &str, ip: Ipv4Addr, hosts: &str) -> anyhow::Result<()> {
        let host = ip.octets()[3];
        let veth = format!("kv{}h{host}", self.subnet);
        run(&["ip", "netns", "add", netns])?;
        run(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", netns])?;
        run(&["ip", "link", "set", &veth, "master", &self.bridge, "up"])?;
        run(&["ip", "-n", netns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        run(&["ip", "-n", netns, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", netns, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", netns, "route", "add", SERVICE_RANGE, "dev", "eth0"])?;
        let dir = PathBuf::from("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("hosts"), hosts)?;
        Ok(())
    }

    /// The pod's projected volumes written to files: volume name to directory.
    async fn volumes(&self, api: &KubeApiServer, pod: &Value, dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
        let mut out = BTreeMap::new();
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
        let sa = pod["spec"]["serviceAccountName"].as_str().filter(|s| !s.is_empty()).unwrap_or("default");
        for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
            let Some(vname) = v["name"].as_str() else { continue };
            // Only projected volumes are made (the processes share the host's files:
            // an emptyDir over /tmp would only hide them).
            if !v["projected"].is_object() {
                continue;
            }
            let vdir = dir.join("volumes").join(vname);
            std::fs::create_dir_all(&vdir)?;
            for source in v["projected"]["sources"].as_array().into_iter().flatten() {
                let t = &source["serviceAccountToken"];
                let Some(path) = t["path"].as_str() else { continue };
                let audience = t["audience"].as_str().unwrap_or(crate::kube::SA_ISSUER);
                let seconds = t["expirationSeconds"].as_u64().and_then(|s| u32::try_from(s).ok()).unwrap_or(3600);
                let token = api.create_token(ns, sa, audience, seconds.max(600)).await.with_context(|| {
                    format!("TokenRequest for {ns}/{sa} (create the ServiceAccount before the pod runs)")
                })?;
                std::fs::write(vdir.join(path), token)?;
            }
            out.insert(vname.to_string(), vdir);
        }
        Ok(out)
    }

    /// Starts one container as a process in the pod's namespaces.
    fn start(
        &self,
        pod: &RunningPod,
        obj: &Value,
        c: &Value,
        ip: Ipv4Addr,
        host_ip: Ipv4Addr,
        volumes: &BTreeMap<String, PathBuf>,
    ) -> anyhow::Result<Child> {
        let cname = c["name"].as_str().unwrap_or_default();
        let image = c["image"].as_str().unwrap_or_default();
        let strings = |v: &Value| -> Vec<String> {
            v.as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_string).collect()
        };
        let env = environment(obj, c, ip, host_ip);
        let expand = |s: &String| expand_vars(s, &env);
        let command: Vec<String> = strings(&c["command"]).iter().map(expand).collect();
        let args: Vec<String> = strings(&c["args"]).iter().map(expand).collect();
        let argv = (self.images)(image, &command, &args)
            .with_context(|| format!("{}: no process known for image {image} (container {cname})", pod.name))?;
        // In the pod's network namespace (`ip netns exec` also gives the process its own
        // mount namespace, with the pod's /etc/hosts): mount the volumes, drop to the
        // container's user, run.
        let mut script = String::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let (Some(vname), Some(path)) = (m["name"].as_str(), m["mountPath"].as_str()) else { continue };
            let Some(src) = volumes.get(vname) else { continue };
            std::fs::create_dir_all(path).with_context(|| format!("mount point {path}"))?;
            script.push_str(&format!("mount --bind {} {} && ", quote(&src.display().to_string()), quote(path)));
        }
        let sc = &c["securityContext"];
        let uid = sc["runAsUser"].as_u64().unwrap_or(0);
        let gid = sc["runAsGroup"].as_u64().unwrap_or(uid);
        script.push_str(&format!("exec setpriv --reuid={uid} --regid={gid} --clear-groups -- \"$@\""));
        if uid == 0 {
            script = script.replace(&format!("setpriv --reuid={uid} --regid={gid} --clear-groups -- "), "");
        }
        let log = std::fs::File::create(pod.log_dir.join(format!("{cname}.log")))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pod.netns, "sh", "-c", &script, "sh"]).args(&argv);
        cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).envs(env.iter().map(|(k, v)| (k, v)));
        cmd.current_dir(&pod.log_dir);
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).kill_on_drop(true);
        cmd.spawn().with_context(|| format!("starting container {cname} of {}", pod.name))
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for p in &mut self.pods {
            for c in &mut p.children {
                let _ = c.start_kill();
            }
        }
        for p in std::mem::take(&mut self.pods) {
            let _ = run(&["ip", "netns", "del", &p.netns]);
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&p.netns));
        }
        if self.forward_rule {
            let b = self.bridge.clone();
            let _ = run(&["iptables", "-D", "FORWARD", "-i", &b, "-o", &b, "-j", "ACCEPT"]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}

/// `/etc/hosts` of a pod: itself, and every Service with a cluster IP by its names
/// (short names in their own namespace only, as a pod's DNS search path would have it
/// for pods of that namespace).
async fn hosts(api: &KubeApiServer, pod: &str, ip: Ipv4Addr) -> anyhow::Result<String> {
    let list: Value = serde_json::from_str(&api.kubectl(&["get", "services", "-A", "-o", "json"]).await?)?;
    let mut out = format!("127.0.0.1 localhost\n::1 localhost\n{ip} {pod}\n");
    for s in list["items"].as_array().into_iter().flatten() {
        let (Some(name), Some(ns)) = (s["metadata"]["name"].as_str(), s["metadata"]["namespace"].as_str()) else {
            continue;
        };
        let Some(vip) = s["spec"]["clusterIP"].as_str().filter(|v| v.parse::<Ipv4Addr>().is_ok()) else { continue };
        out.push_str(&format!("{vip} {name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}.{ns} {name}\n"));
    }
    Ok(out)
}

/// A container's environment: its `env` with the downward API's fields and `$(VAR)`
/// references to earlier entries expanded, as the kubelet builds it.
fn environment(pod: &Value, c: &Value, ip: Ipv4Addr, host_ip: Ipv4Addr) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> =
        vec![("HOSTNAME".into(), pod["metadata"]["name"].as_str().unwrap_or_default().into())];
    for e in c["env"].as_array().into_iter().flatten() {
        let Some(name) = e["name"].as_str() else { continue };
        let value = if let Some(v) = e["value"].as_str() {
            expand_vars(v, &env)
        } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            field(pod, path, ip, host_ip)
        } else {
            String::new()
        };
        env.retain(|(k, _)| k != name);
        env.push((name.to_string(), value));
    }
    env
}

fn field(pod: &Value, path: &str, ip: Ipv4Addr, host_ip: Ipv4Addr) -> String {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    match path {
        "status.podIP" => ip.to_string(),
        "status.hostIP" => host_ip.to_string(),
        "spec.nodeName" => "kubelet-emulated".into(),
        "spec.serviceAccountName" => {
            pod["spec"]["serviceAccountName"].as_str().filter(|s| !s.is_empty()).unwrap_or("default").into()
        }
        "metadata.name" => text(&pod["metadata"]["name"]),
        "metadata.namespace" => text(&pod["metadata"]["namespace"]),
        "metadata.uid" => text(&pod["metadata"]["uid"]),
        other => {
            let label = |prefix: &str, map: &str| {
                other
                    .strip_prefix(prefix)
                    .map(|k| k.trim_start_matches("['").trim_end_matches("']"))
                    .map(|k| text(&pod["metadata"][map][k]))
            };
            label("metadata.labels", "labels")
                .or_else(|| label("metadata.annotations", "annotations"))
                .unwrap_or_default()
        }
    }
}

/// Kubernetes' `$(VAR)` expansion: defined names replaced, `$$` an escaped `$`, others kept.
pub fn expand_vars(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(end) = after.strip_prefix('(').and_then(|a| a.find(')')) {
            let name = &after[1..=end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&rest[i..i + end + 3]),
            }
            rest = &after[end + 2..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `GET http://ip:port{path}` answers 2xx or 3xx (a kubelet's HTTP probe).
async fn probe(ip: Ipv4Addr, port: u16, path: &str) -> bool {
    let addr = std::net::SocketAddr::from((ip, port));
    let Ok(Ok(r)) =
        tokio::time::timeout(Duration::from_secs(1), crate::http::get_h1(addr, &ip.to_string(), path)).await
    else {
        return false;
    };
    (200..400).contains(&r.status.as_u16())
}

/// The status a kubelet writes for a running, ready pod.
async fn write_ready(api: &KubeApiServer, ns: &str, name: &str, ip: Ipv4Addr, host_ip: Ipv4Addr) -> anyhow::Result<()> {
    let now = rfc3339_now();
    let cond = |t: &str| json!({ "type": t, "status": "True", "lastTransitionTime": now });
    let patch = json!({ "status": {
        "phase": "Running",
        "podIP": ip.to_string(),
        "podIPs": [{ "ip": ip.to_string() }],
        "hostIP": host_ip.to_string(),
        "startTime": now,
        "conditions": [cond("PodScheduled"), cond("Initialized"), cond("ContainersReady"), cond("Ready")],
    }});
    api.kubectl(&["patch", "pod", name, "-n", ns, "--subresource=status", "--type=merge", "-p", &patch.to_string()])
        .await?;
    Ok(())
}

/// Now as RFC 3339 UTC seconds (`2026-01-02T03:04:05Z`).
fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn owner(obj: &Value, api_version: &str, kind: &str) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// A stable 10-character hash of a pod template (`pod-template-hash`), from the
/// alphabet Kubernetes uses for generated names.
fn template_hash(template: &Value) -> String {
    name_chars(fnv(template.to_string().as_bytes()), 10)
}

/// A 5-character suffix for a pod name.
fn suffix(seed: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    name_chars(fnv(format!("{seed}{nanos}").as_bytes()), 5)
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn name_chars(mut n: u64, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..len)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_paren_expands_defined_names_and_keeps_the_rest() {
        let env = vec![("A".to_string(), "1".to_string()), ("B".to_string(), "x".to_string())];
        assert_eq!(expand_vars("$(A)-$(B)-$(C)-$$(A)-$", &env), "1-x-$(C)-$(A)-$");
    }

    #[test]
    fn the_downward_api_gives_the_pods_fields() {
        let pod = json!({ "metadata": { "name": "p", "namespace": "ns", "labels": { "app": "a" } }, "spec": {} });
        let c = json!({ "env": [
            { "name": "POD", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
            { "name": "IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
            { "name": "APP", "valueFrom": { "fieldRef": { "fieldPath": "metadata.labels['app']" } } },
            { "name": "ID", "value": "$(POD).$(IP)" },
        ]});
        let env = environment(&pod, &c, Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(10, 1, 2, 1));
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("ID"), Some("p.10.1.2.3"));
        assert_eq!(get("APP"), Some("a"));
        assert_eq!(template_hash(&pod).len(), 10);
    }
}
