//! The part of Istio's `MeshConfig` weft reads (`weft control --mesh-config FILE`, or
//! `weft up --tracing`): the tracing extension providers Telemetry resources name, the
//! mesh's default tracing providers and sampling, `enableTracing`, and the root namespace.
//!
//! ```yaml
//! enableTracing: true
//! defaultConfig:
//!   tracing: {sampling: 10}
//! defaultProviders:
//!   tracing: [otel]
//! extensionProviders:
//! - name: otel
//!   opentelemetry:
//!     service: opentelemetry-collector.observability.svc.cluster.local
//!     port: 4317
//! - name: zipkin
//!   zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
//! ```
//!
//! Any other field, or an extension provider of another kind, is an error naming its
//! line and path: weft would not apply it, so it does not accept it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// Istio's default `defaultConfig.tracing.sampling` (percent).
pub const DEFAULT_SAMPLING: f64 = 1.0;

/// What the translator takes from the mesh config for tracing.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshTracing {
    /// `extensionProviders` of a tracing kind, by name.
    pub providers: BTreeMap<String, TracingProvider>,
    /// `defaultProviders.tracing`: used when no Telemetry names a provider.
    pub default_providers: Vec<String>,
    /// `defaultConfig.tracing.sampling`: percent used when no Telemetry sets one.
    pub default_sampling: f64,
    /// `enableTracing` (default true): false turns the default providers off (Telemetry
    /// resources still apply).
    pub enable_tracing: bool,
}

/// A tracing extension provider.
#[derive(Debug, Clone, PartialEq)]
pub enum TracingProvider {
    /// OTLP over gRPC, or over HTTP (protobuf) when `http` is set.
    OpenTelemetry {
        /// Collector host (a mesh service, a ServiceEntry host, a DNS name or an IP).
        service: String,
        /// Collector port.
        port: u16,
        /// OTLP/HTTP instead of gRPC.
        http: Option<OtlpHttp>,
    },
    /// Zipkin v2 JSON over HTTP.
    Zipkin {
        /// Collector host.
        service: String,
        /// Collector port.
        port: u16,
        /// Path (default `/api/v2/spans`).
        path: String,
        /// Longest path tag (Envoy's `max_path_tag_length`; None: Envoy's 256).
        max_tag_length: Option<u32>,
    },
}

/// OTLP/HTTP settings.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpHttp {
    /// Request path, e.g. `/v1/traces`.
    pub path: String,
    /// Export request timeout.
    pub timeout: Option<std::time::Duration>,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
}

/// The file as written (Istio's field names).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    #[serde(default)]
    enable_tracing: Option<bool>,
    #[serde(default)]
    root_namespace: Option<String>,
    #[serde(default)]
    default_config: Option<DefaultConfig>,
    #[serde(default)]
    default_providers: Option<DefaultProviders>,
    #[serde(default)]
    extension_providers: Vec<ExtensionProvider>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DefaultConfig {
    #[serde(default)]
    tracing: Option<ProxyTracing>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ProxyTracing {
    #[serde(default)]
    sampling: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DefaultProviders {
    #[serde(default)]
    tracing: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ExtensionProvider {
    name: String,
    #[serde(default)]
    opentelemetry: Option<OtelProvider>,
    #[serde(default)]
    zipkin: Option<ZipkinProvider>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OtelProvider {
    service: String,
    port: u16,
    #[serde(default)]
    http: Option<OtelHttpFile>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OtelHttpFile {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    headers: Vec<HeaderFile>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HeaderFile {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ZipkinProvider {
    service: String,
    port: u16,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    max_tag_length: Option<u32>,
}

/// The mesh config a file gives.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshConfigFile {
    /// Tracing.
    pub tracing: MeshTracing,
    /// `rootNamespace`, when set.
    pub root_namespace: Option<String>,
}

impl Default for MeshTracing {
    fn default() -> Self {
        MeshTracing {
            providers: BTreeMap::new(),
            default_providers: Vec::new(),
            default_sampling: DEFAULT_SAMPLING,
            enable_tracing: true,
        }
    }
}

impl MeshTracing {
    /// The mesh default provider (the first of `defaultProviders.tracing`), unless
    /// `enableTracing: false`.
    pub fn default_provider(&self) -> Option<&str> {
        if !self.enable_tracing {
            return None;
        }
        self.default_providers.first().map(String::as_str)
    }
}

impl MeshTracing {
    /// One collector as the mesh's default provider, from a URL: `otlp://HOST:PORT`
    /// (OTLP/gRPC), `otlp+http://HOST:PORT[/PATH]` (OTLP/HTTP protobuf, default path
    /// `/v1/traces`) or `zipkin://HOST:PORT[/PATH]` (Zipkin v2 JSON, default
    /// `/api/v2/spans`), sampling `sampling` percent (`weft up --tracing`).
    pub fn from_url(url: &str, sampling: f64) -> Result<MeshTracing, String> {
        let expected = "expected otlp://HOST:PORT, otlp+http://HOST:PORT/PATH or zipkin://HOST:PORT";
        let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("`{url}`: {expected}"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        let (host, port) = authority.rsplit_once(':').ok_or_else(|| format!("`{url}`: missing port ({expected})"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 =
            port.parse().ok().filter(|p| *p != 0).ok_or_else(|| format!("`{url}`: port `{port}` is not 1..=65535"))?;
        check_target("the collector", host, port)?;
        if !(0.0..=100.0).contains(&sampling) {
            return Err(format!("sampling {sampling} is out of range (expected 0..=100)"));
        }
        let service = host.to_string();
        let (name, provider) = match scheme {
            "otlp" | "otlp+grpc" => {
                if path.is_some_and(|p| p != "/") {
                    return Err(format!("`{url}`: OTLP/gRPC takes no path (use otlp+http:// for OTLP/HTTP)"));
                }
                ("otel", TracingProvider::OpenTelemetry { service, port, http: None })
            }
            "otlp+http" => {
                let path = path.filter(|p| *p != "/").unwrap_or("/v1/traces").to_string();
                let http = OtlpHttp { path, timeout: None, headers: Vec::new() };
                ("otel", TracingProvider::OpenTelemetry { service, port, http: Some(http) })
            }
            "zipkin" => {
                let path = path.filter(|p| *p != "/").unwrap_or("/api/v2/spans").to_string();
                ("zipkin", TracingProvider::Zipkin { service, port, path, max_tag_length: None })
            }
            other => return Err(format!("`{url}`: unknown scheme `{other}` ({expected})")),
        };
        Ok(MeshTracing {
            providers: BTreeMap::from([(name.to_string(), provider)]),
            default_providers: vec![name.to_string()],
            default_sampling: sampling,
            enable_tracing: true,
        })
    }
}

impl TracingProvider {
    /// Collector host and port.
    pub fn target(&self) -> (&str, u16) {
        match self {
            TracingProvider::OpenTelemetry { service, port, .. } | TracingProvider::Zipkin { service, port, .. } => {
                (service, *port)
            }
        }
    }
}

impl MeshConfigFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<MeshConfigFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a MeshConfig YAML document: errors say `line L column C: PATH: what`.
    pub fn parse(text: &str) -> Result<MeshConfigFile, String> {
        // serde_yaml_ng's messages name the path (`extensionProviders[0].zipkin: ...`).
        let file: File = match serde_yaml_ng::from_str::<Option<File>>(text) {
            Ok(f) => f.unwrap_or_default(),
            Err(e) => {
                let at = e.location().map(|l| format!("line {} column {}: ", l.line(), l.column()));
                let msg = e.to_string();
                // The location is given first, not appended.
                let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                let hint = if msg.contains("unknown field") {
                    " (weft reads enableTracing, rootNamespace, defaultConfig.tracing.sampling, defaultProviders.tracing and opentelemetry/zipkin extensionProviders)"
                } else {
                    ""
                };
                return Err(format!("{}{msg}{hint}", at.unwrap_or_default()));
            }
        };
        let mut tracing = MeshTracing { enable_tracing: file.enable_tracing.unwrap_or(true), ..MeshTracing::default() };
        if let Some(s) = file.default_config.and_then(|d| d.tracing).and_then(|t| t.sampling) {
            if !(0.0..=100.0).contains(&s) {
                return Err(format!(
                    "defaultConfig.tracing.sampling: percentage {s} is out of range (expected 0..=100)"
                ));
            }
            tracing.default_sampling = s;
        }
        for (i, p) in file.extension_providers.into_iter().enumerate() {
            let at = format!("extensionProviders[{i}]");
            if p.name.trim().is_empty() {
                return Err(format!("{at}.name: provider name must not be empty"));
            }
            let provider = match (p.opentelemetry, p.zipkin) {
                (Some(o), None) => {
                    let http = match o.http {
                        None => None,
                        Some(h) => Some(OtlpHttp {
                            path: h.path.unwrap_or_else(|| "/v1/traces".into()),
                            timeout: match h.timeout {
                                None => None,
                                Some(t) => Some(
                                    weft_api::spec::Duration::parse(&t)
                                        .map_err(|e| format!("{at}.opentelemetry.http.timeout: {e}"))?
                                        .0,
                                ),
                            },
                            headers: h.headers.into_iter().map(|h| (h.name, h.value)).collect(),
                        }),
                    };
                    check_target(&format!("{at}.opentelemetry"), &o.service, o.port)?;
                    TracingProvider::OpenTelemetry { service: o.service, port: o.port, http }
                }
                (None, Some(z)) => {
                    check_target(&format!("{at}.zipkin"), &z.service, z.port)?;
                    TracingProvider::Zipkin {
                        service: z.service,
                        port: z.port,
                        path: z.path.unwrap_or_else(|| "/api/v2/spans".into()),
                        max_tag_length: z.max_tag_length,
                    }
                }
                _ => {
                    return Err(format!(
                    "{at}: provider `{}` needs exactly one of `opentelemetry` or `zipkin` (the kinds weft supports)",
                    p.name
                ))
                }
            };
            if tracing.providers.insert(p.name.clone(), provider).is_some() {
                return Err(format!("{at}.name: duplicate provider name `{}`", p.name));
            }
        }
        let defaults = file.default_providers.map(|d| d.tracing).unwrap_or_default();
        for (i, name) in defaults.iter().enumerate() {
            if !tracing.providers.contains_key(name) {
                return Err(format!(
                    "defaultProviders.tracing[{i}]: provider `{name}` is not among extensionProviders (known: {})",
                    tracing.providers.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
        if defaults.len() > 1 {
            return Err("defaultProviders.tracing: Istio uses a single tracing provider: keep one".into());
        }
        tracing.default_providers = defaults;
        if let Some(ns) = &file.root_namespace {
            if ns.is_empty() {
                return Err("rootNamespace: must not be empty".into());
            }
        }
        Ok(MeshConfigFile { tracing, root_namespace: file.root_namespace })
    }
}

fn check_target(at: &str, service: &str, port: u16) -> Result<(), String> {
    if service.trim().is_empty() || service.contains(['/', ' ', ':']) && service.parse::<std::net::IpAddr>().is_err() {
        return Err(format!("{at}.service: `{service}` is not a host name or IP address"));
    }
    if port == 0 {
        return Err(format!("{at}.port: port 0 is out of range (expected 1..=65535)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_mesh_config_tracing_subset_parses() {
        let f = MeshConfigFile::parse(
            "enableTracing: true
defaultConfig:
  tracing: {sampling: 10}
defaultProviders:
  tracing: [otel]
extensionProviders:
- name: otel
  opentelemetry:
    service: opentelemetry-collector.observability.svc.cluster.local
    port: 4317
- name: otel-http
  opentelemetry:
    service: collector.example.com
    port: 4318
    http: {path: /v1/traces, timeout: 5s, headers: [{name: x-tenant, value: books}]}
- name: zipkin
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411, maxTagLength: 128}
",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let t = &f.tracing;
        assert_eq!(t.default_sampling, 10.0);
        assert_eq!(t.default_provider(), Some("otel"));
        assert_eq!(
            t.providers["zipkin"],
            TracingProvider::Zipkin {
                service: "zipkin.istio-system.svc.cluster.local".into(),
                port: 9411,
                path: "/api/v2/spans".into(),
                max_tag_length: Some(128)
            }
        );
        let TracingProvider::OpenTelemetry { http: Some(h), .. } = &t.providers["otel-http"] else {
            panic!("{:?}", t.providers["otel-http"])
        };
        assert_eq!(h.timeout, Some(std::time::Duration::from_secs(5)));
        assert_eq!(h.headers, vec![("x-tenant".to_string(), "books".to_string())]);
    }

    #[test]
    fn tracing_urls_become_a_default_provider() {
        let t = MeshTracing::from_url("otlp://127.0.0.1:4317", 100.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.default_provider(), Some("otel"));
        assert_eq!(
            t.providers["otel"],
            TracingProvider::OpenTelemetry { service: "127.0.0.1".into(), port: 4317, http: None }
        );
        let t = MeshTracing::from_url("otlp+http://collector:4318", 50.0).unwrap_or_else(|e| panic!("{e}"));
        let TracingProvider::OpenTelemetry { http: Some(h), .. } = &t.providers["otel"] else { panic!() };
        assert_eq!(h.path, "/v1/traces");
        assert_eq!(t.default_sampling, 50.0);
        let t = MeshTracing::from_url("zipkin://localhost:9411", 1.0).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(&t.providers["zipkin"], TracingProvider::Zipkin { path, .. } if path == "/api/v2/spans"));
        for bad in ["jaeger://h:1", "otlp://h", "otlp://h:0", "otlp://h:4317/v1/traces", "h:4317"] {
            assert!(MeshTracing::from_url(bad, 1.0).is_err(), "{bad}");
        }
        assert!(MeshTracing::from_url("otlp://h:1", 101.0).unwrap_err().contains("out of range"));
    }

    #[test]
    fn bad_mesh_config_errors_name_line_and_field() {
        let e = MeshConfigFile::parse(
            "extensionProviders:\n- name: otel\n  opentelemetry:\n    service: c\n    prot: 4317\n",
        )
        .unwrap_err();
        assert!(e.starts_with("line 5 column 5: extensionProviders[0].opentelemetry: unknown field `prot`"), "{e}");
        let e = MeshConfigFile::parse("defaultProviders: {tracing: [nope]}\n").unwrap_err();
        assert!(e.contains("defaultProviders.tracing[0]: provider `nope` is not among extensionProviders"), "{e}");
        let e = MeshConfigFile::parse("extensionProviders:\n- name: ext\n  envoyExtAuthzHttp: {service: a, port: 1}\n")
            .unwrap_err();
        assert!(e.contains("unknown field `envoyExtAuthzHttp`"), "{e}");
        let e = MeshConfigFile::parse("defaultConfig: {tracing: {sampling: 150}}\n").unwrap_err();
        assert!(e.contains("percentage 150 is out of range"), "{e}");
        let e =
            MeshConfigFile::parse("extensionProviders:\n- name: z\n  zipkin: {service: z, port: 70000}\n").unwrap_err();
        assert!(e.starts_with("line 3 column"), "{e}");
        assert!(e.contains("extensionProviders[0].zipkin.port"), "{e}");
    }
}
