//! `weft load`: Fortio's `load` for Istio's tasks (circuit breaking, rate limiting), on the
//! benchmark harness's generator (`weft_bench::fortio`). Run it inside a workload with
//! `weft exec fortio -- weft load -c 2 -qps 0 -n 20 http://httpbin:8000/get`: it then
//! goes through that workload's sidecar (`HTTP_PROXY`, absolute-form requests), as
//! Fortio's calls go through its pod's sidecar.

use std::time::Duration;

use anyhow::{bail, Context as _};
use weft_bench::fortio::{self, FortioOptions};
use weft_bench::load::Target;

use crate::bookinfo::ProxyConfig;

/// Flags of `weft load` (Fortio's names: `-c`, `-n`, `-qps`, `-t`, `-H`; `-qps` and
/// `-loglevel` may be written with one dash, as Fortio's Go flags are).
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Connections, each with one call in flight (Fortio's `-c`).
    #[arg(short = 'c', default_value_t = 8)]
    pub conns: usize,
    /// Total calls (Fortio's `-n`); without it the run lasts `-t`.
    #[arg(short = 'n')]
    pub calls: Option<u64>,
    /// Calls per second over all connections; 0: as fast as possible (Fortio's `-qps`).
    #[arg(long = "qps", default_value_t = 8.0)]
    pub qps: f64,
    /// How long to run without `-n`, e.g. `5s` (Fortio's `-t`).
    #[arg(short = 't', default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Extra request header `Name: value` (repeatable).
    #[arg(short = 'H')]
    pub headers: Vec<String>,
    /// Accepted for Fortio compatibility (`Warning`, `Info`, ...); weft load prints only
    /// its summary.
    #[arg(long = "loglevel")]
    pub loglevel: Option<String>,
    /// The URL: `http://host[:port]/path`.
    pub url: String,
}

/// Runs the load and prints Fortio's summary; fails when the URL or flags are bad, not
/// when calls fail (the codes say that).
pub async fn run(args: LoadArgs, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    let opts = options(&args, env).await?;
    let what = match opts.calls {
        Some(n) => format!("for exactly {n} calls"),
        None => format!("for {:?}", opts.duration),
    };
    let rate = if opts.qps > 0.0 { format!("{} qps", opts.qps) } else { "max qps".into() };
    println!("Fortio-compatible weft load: {} via {}", args.url, opts.target.addr);
    println!("Starting at {rate} with {} connection(s) {what}", opts.conns);
    let result = fortio::run(opts).await?;
    println!("Ended after {:?} : {} calls.", result.elapsed, result.calls());
    print!("{}", result.summary());
    Ok(())
}

/// Resolves the URL, the proxy (`HTTP_PROXY`/`http_proxy` unless `NO_PROXY` names the
/// host) and the headers.
async fn options(args: &LoadArgs, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<FortioOptions> {
    let uri: hyper::Uri = args.url.trim().parse().with_context(|| format!("{:?} is not a URL", args.url))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(s) => bail!("{:?}: scheme {s} is not supported (http:// only)", args.url),
        None => bail!("{:?}: expected http://host[:port]/path", args.url),
    }
    let authority = uri.authority().context("the URL has no host")?;
    if authority.as_str().contains('@') {
        bail!("{:?}: user info is not supported", args.url);
    }
    let host = authority.host().trim_matches(['[', ']']).to_ascii_lowercase();
    let port = authority.port_u16().unwrap_or(80);
    let non_empty = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let proxy = match non_empty("HTTP_PROXY").or_else(|| non_empty("http_proxy")) {
        Some(url) => {
            let no_proxy = non_empty("NO_PROXY").or_else(|| non_empty("no_proxy"));
            Some(ProxyConfig::parse(&url, no_proxy.as_deref()).with_context(|| format!("HTTP_PROXY {url:?}"))?)
        }
        None => None,
    };
    let (connect, target_uri) = match proxy.filter(|p| p.applies_to(&host)) {
        Some(p) => (p.address, uri.clone()),
        None => {
            let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            (format!("{}:{port}", authority.host()), path.parse().context("bad path")?)
        }
    };
    let addr = tokio::net::lookup_host(&connect)
        .await
        .with_context(|| format!("resolving {connect}"))?
        .next()
        .with_context(|| format!("{connect} has no address"))?;
    let mut headers = Vec::new();
    for h in &args.headers {
        let Some((k, v)) = h.split_once(':') else { bail!("-H {h:?}: expected `Name: value`") };
        let (k, v) = (k.trim(), v.trim());
        if hyper::header::HeaderName::from_bytes(k.as_bytes()).is_err()
            || hyper::header::HeaderValue::from_str(v).is_err()
        {
            bail!("-H {h:?}: not a valid header");
        }
        headers.push((k.to_string(), v.to_string()));
    }
    if args.conns == 0 {
        bail!("-c must be at least 1");
    }
    if !args.qps.is_finite() || args.qps < 0.0 {
        bail!("-qps must be 0 (as fast as possible) or more");
    }
    Ok(FortioOptions {
        target: Target { addr, uri: target_uri },
        host: authority.as_str().to_string(),
        headers,
        conns: args.conns,
        calls: args.calls,
        qps: args.qps,
        duration: args.duration,
    })
}

/// Fortio writes `-qps 0` and `-loglevel Warning` with one dash; clap wants two.
pub fn fortio_flags(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let args: Vec<_> = args.into_iter().collect();
    let is_load = args.iter().skip(1).find(|a| !a.to_string_lossy().starts_with('-')).is_some_and(|a| a == "load");
    if !is_load {
        return args;
    }
    args.into_iter()
        .map(|a| match a.to_str() {
            Some(s) if s == "-qps" || s.starts_with("-qps=") || s == "-loglevel" || s.starts_with("-loglevel=") => {
                format!("-{s}").into()
            }
            _ => a,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str) -> LoadArgs {
        LoadArgs {
            conns: 2,
            calls: Some(4),
            qps: 0.0,
            duration: Duration::from_secs(1),
            headers: vec!["x-a: b".into()],
            loglevel: None,
            url: url.into(),
        }
    }

    #[tokio::test]
    async fn goes_through_http_proxy_in_absolute_form_unless_no_proxy() {
        let env = |k: &str| match k {
            "HTTP_PROXY" => Some("http://127.0.0.9:15001".to_string()),
            "NO_PROXY" => Some("localhost,127.0.0.1".to_string()),
            _ => None,
        };
        let o = options(&args("http://httpbin:8000/get"), env).await.unwrap();
        assert_eq!(o.target.addr.to_string(), "127.0.0.9:15001");
        assert_eq!(o.target.uri.to_string(), "http://httpbin:8000/get");
        assert_eq!(o.host, "httpbin:8000");
        let o = options(&args("http://127.0.0.1:8000/x?y=1"), env).await.unwrap();
        assert_eq!(o.target.addr.to_string(), "127.0.0.1:8000");
        assert_eq!(o.target.uri.to_string(), "/x?y=1");
    }

    #[tokio::test]
    async fn bad_urls_and_flags_are_errors() {
        for url in ["httpbin:8000/get", "https://httpbin/", "http://u@h/", "::"] {
            assert!(options(&args(url), |_| None).await.is_err(), "{url}");
        }
        let mut a = args("http://127.0.0.1:1/");
        a.headers = vec!["nocolon".into()];
        assert!(options(&a, |_| None).await.is_err());
        let mut a = args("http://127.0.0.1:1/");
        a.conns = 0;
        assert!(options(&a, |_| None).await.is_err());
    }

    #[test]
    fn single_dash_fortio_flags_are_rewritten_for_load_only() {
        let os = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(
            fortio_flags(os(&["weft", "load", "-c", "2", "-qps", "0", "-loglevel", "Warning", "http://h/"])),
            os(&["weft", "load", "-c", "2", "--qps", "0", "--loglevel", "Warning", "http://h/"])
        );
        assert_eq!(fortio_flags(os(&["weft", "exec", "x", "--", "-qps"])), os(&["weft", "exec", "x", "--", "-qps"]));
    }
}
