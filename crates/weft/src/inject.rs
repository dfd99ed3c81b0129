//! `weft inject`: Istio's `istioctl kube-inject` for weft. Reads Kubernetes manifests
//! (files or stdin), writes them with the sidecar added to every workload's pod template
//! (`weft_control::inject`); what it left alone, and why, goes to stderr.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use weft_control::inject::{inject_manifests, InjectConfig};

/// Flags of `weft inject`.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// Manifest files (YAML or JSON, multi-document); `-` or none reads stdin.
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<PathBuf>,
    /// Write here instead of stdout.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Image of the injected containers (entrypoint `weft`).
    #[arg(long, default_value_t = InjectConfig::default().image)]
    pub image: String,
    /// The control plane's xDS address as pods reach it.
    #[arg(long, default_value_t = InjectConfig::default().control_plane)]
    pub control_plane: String,
    /// Inject the proxy as a Kubernetes native sidecar (init container with
    /// `restartPolicy: Always`); a pod's `sidecar.istio.io/nativeSidecar` annotation wins.
    #[arg(long)]
    pub native_sidecar: bool,
    /// UID (and GID) of the proxy; its traffic is not captured.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The mesh root (PEM file, e.g. the control plane's `<data-dir>/root-cert.pem`)
    /// written into the bootstrap: the proxy verifies the control plane with it
    /// (`--control-plane https://HOST:15012`), or checks the root a plaintext one sends.
    #[arg(long)]
    pub root_cert: Option<PathBuf>,
}

/// Runs the command.
pub fn run(a: &InjectArgs) -> anyhow::Result<()> {
    let cfg = InjectConfig {
        image: a.image.clone(),
        control_plane: a.control_plane.clone(),
        native_sidecar: a.native_sidecar,
        proxy_uid: a.proxy_uid,
        root_cert: match &a.root_cert {
            Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("--root-cert {}", p.display()))?),
            None => None,
        },
        ..InjectConfig::default()
    };
    let stdin = [PathBuf::from("-")];
    let files: &[PathBuf] = if a.files.is_empty() { &stdin } else { &a.files };
    let mut out = String::new();
    for f in files {
        let (text, name) = if f == Path::new("-") {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading stdin")?;
            (s, PathBuf::from("<stdin>"))
        } else {
            (std::fs::read_to_string(f).with_context(|| format!("{}: cannot read", f.display()))?, f.clone())
        };
        let injected = inject_manifests(&text, &name, &cfg)?;
        for note in &injected.notes {
            eprintln!("weft inject: {note}");
        }
        if !out.is_empty() && !injected.text.is_empty() {
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str("---\n");
        }
        out.push_str(&injected.text);
    }
    match &a.output {
        Some(path) => std::fs::write(path, out).with_context(|| format!("{}: cannot write", path.display()))?,
        None => std::io::stdout().lock().write_all(out.as_bytes()).context("writing stdout")?,
    }
    Ok(())
}
