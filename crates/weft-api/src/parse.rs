//! Documents in, [`Resource`]s, [`Skipped`]s and [`ApiError`]s out.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::validate::{self, Issue};
use crate::yaml::{self, PosIndex};
use crate::{ApiError, Kind, ObjectMeta, Parsed, Resource, ResourceKey, Skipped, Source, Spec};

/// API groups owned by weft: any kind/version in them must be known.
const OUR_GROUPS: &[&str] =
    &["networking.istio.io", "security.istio.io", "telemetry.istio.io", "weft.dev", crate::spec::gateway_api::GROUP];

const TOP_LEVEL: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];
/// A Secret's top level: no `spec`, its content beside `metadata`.
const SECRET_TOP_LEVEL: &[&str] = &["apiVersion", "kind", "metadata", "type", "data", "stringData", "immutable"];

/// Kubernetes object metadata as written; fields weft does not use are accepted and dropped.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    generate_name: Option<Value>,
    #[serde(default)]
    uid: Option<Value>,
    #[serde(default)]
    resource_version: Option<Value>,
    #[serde(default)]
    generation: Option<Value>,
    #[serde(default)]
    creation_timestamp: Option<Value>,
    #[serde(default)]
    deletion_timestamp: Option<Value>,
    #[serde(default)]
    deletion_grace_period_seconds: Option<Value>,
    #[serde(default)]
    managed_fields: Option<Value>,
    #[serde(default)]
    owner_references: Option<Value>,
    #[serde(default)]
    finalizers: Option<Value>,
    #[serde(default)]
    self_link: Option<Value>,
}

/// Per-document context: where errors go and how paths map to lines.
struct Ctx<'a> {
    file: &'a Path,
    index: &'a PosIndex,
    /// Path prefix of this object inside the document (`items[3]` in a List).
    prefix: String,
    resource: Option<String>,
    errors: Vec<ApiError>,
}

impl Ctx<'_> {
    fn full(&self, path: &str) -> String {
        match (self.prefix.is_empty(), path.is_empty()) {
            (true, _) => path.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}.{path}", self.prefix),
        }
    }

    fn error(&mut self, path: &str, message: impl Into<String>, hint: Option<String>) {
        let pos = self.index.lookup(&self.full(path));
        self.errors.push(ApiError {
            file: self.file.to_path_buf(),
            line: pos.line,
            column: pos.column,
            resource: self.resource.clone(),
            field: path.to_string(),
            message: message.into(),
            hint,
        });
    }

    fn issue(&mut self, i: Issue) {
        self.error(&i.path, i.message, i.hint);
    }

    /// Deserializes `v` (found at `base`) into `T`, turning serde's error into an [`ApiError`].
    fn de<T: DeserializeOwned>(&mut self, v: &Value, base: &str) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(v) {
            Ok(t) => Some(t),
            Err(e) => {
                let inner = e.path().to_string();
                let inner = if inner == "." { String::new() } else { inner };
                let at = value_at(v, &inner);
                let mut path = join(base, &inner);
                let raw = e.into_inner().to_string();
                let (message, hint) = explain(&raw, &mut path, at);
                self.error(&path, message, hint);
                None
            }
        }
    }
}

/// The value at a serde_path_to_error path (`a.b[0].c`), if it can be found.
fn value_at<'v>(root: &'v Value, path: &str) -> Option<&'v Value> {
    let mut cur = root;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            cur = cur.get(key)?;
        }
        for idx in rest.split(['[', ']']).filter(|x| !x.is_empty()) {
            cur = cur.get(idx.parse::<usize>().ok()?)?;
        }
    }
    Some(cur)
}

pub(crate) fn parse_text(text: &str, file: &Path, default_ns: &str) -> Parsed {
    let mut out = Parsed::default();
    for doc in yaml::read_documents(text) {
        match doc {
            Err(e) => out.errors.push(ApiError {
                file: file.to_path_buf(),
                line: e.pos.line,
                column: e.pos.column,
                resource: None,
                field: e.path,
                message: e.message,
                hint: Some("fix the YAML syntax; indentation must use spaces".into()),
            }),
            Ok(doc) => parse_object(&doc.value, &doc.index, String::new(), file, default_ns, &mut out),
        }
    }
    reject_duplicates(&mut out);
    out
}

fn parse_object(value: &Value, index: &PosIndex, prefix: String, file: &Path, default_ns: &str, out: &mut Parsed) {
    let mut ctx = Ctx { file, index, prefix, resource: None, errors: Vec::new() };
    let line = index.lookup(&ctx.full("")).line;
    let Some(obj) = value.as_object() else {
        ctx.error(
            "",
            format!("expected a Kubernetes object, found {}", type_name(value)),
            Some("a document is a mapping with apiVersion, kind, metadata and spec".into()),
        );
        out.errors.append(&mut ctx.errors);
        return;
    };
    let api_version = required_str(&mut ctx, obj, "apiVersion");
    let kind_str = required_str(&mut ctx, obj, "kind");
    let (Some(api_version), Some(kind_str)) = (api_version, kind_str) else {
        out.errors.append(&mut ctx.errors);
        return;
    };
    let name = obj.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("").to_string();

    if kind_str == "List" && api_version == "v1" {
        match obj.get("items") {
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let p = ctx.full(&format!("items[{i}]"));
                    parse_object(item, index, p, file, default_ns, out);
                }
            }
            _ => ctx.error("items", "a List needs an `items` sequence", Some("expected `items: [...]`".into())),
        }
        out.errors.append(&mut ctx.errors);
        return;
    }

    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version.as_str()),
    };
    // `Gateway` is Istio's or the Gateway API's, told apart by the group.
    let known = Kind::ALL
        .into_iter()
        .find(|k| k.as_str() == kind_str && k.group() == group)
        .or_else(|| Kind::ALL.into_iter().find(|k| k.as_str() == kind_str));
    let kind = if OUR_GROUPS.contains(&group) {
        match known {
            Some(k) if k.group() == group => {
                if !k.versions().contains(&version) {
                    ctx.error(
                        "apiVersion",
                        format!("unsupported apiVersion `{api_version}` for {k}"),
                        Some(format!("supported: {}", k.api_versions().join(", "))),
                    );
                }
                k
            }
            Some(k) => {
                ctx.error(
                    "apiVersion",
                    format!("{k} is not in API group `{group}`"),
                    Some(format!("use apiVersion {}", k.api_versions().join(" or "))),
                );
                k
            }
            None => {
                let in_group: Vec<&str> = Kind::ALL.iter().filter(|k| k.group() == group).map(|k| k.as_str()).collect();
                let hint = nearest(&kind_str, &in_group)
                    .map(|n| format!("did you mean `{n}`?"))
                    .unwrap_or_else(|| format!("weft supports {} in {group}", in_group.join(", ")));
                ctx.error("kind", format!("unsupported kind `{kind_str}` in `{group}`"), Some(hint));
                out.errors.append(&mut ctx.errors);
                return;
            }
        }
    } else if api_version == "v1" && known == Some(Kind::Service) {
        Kind::Service
    } else if api_version == "v1" && known == Some(Kind::Secret) {
        Kind::Secret
    } else {
        let namespace =
            obj.get("metadata").and_then(|m| m.get("namespace")).and_then(Value::as_str).unwrap_or(default_ns);
        let namespace = namespace.to_string();
        out.skipped.push(Skipped { api_version, kind: kind_str, name, namespace, file: file.to_path_buf(), line });
        return;
    };

    let ns = obj.get("metadata").and_then(|m| m.get("namespace")).and_then(Value::as_str).unwrap_or(default_ns);
    ctx.resource = Some(if name.is_empty() { kind.as_str().to_string() } else { format!("{kind} {ns}/{name}") });

    let top_level = if kind == Kind::Secret { SECRET_TOP_LEVEL } else { TOP_LEVEL };
    for key in obj.keys() {
        if !top_level.contains(&key.as_str()) {
            ctx.error(key, format!("unknown field `{key}`"), Some(suggest(key, top_level)));
        }
    }

    let meta = match obj.get("metadata") {
        None => {
            ctx.error(
                "metadata",
                "missing required field `metadata`",
                Some("expected `metadata: {name: ..., namespace: ...}`".into()),
            );
            None
        }
        Some(m) => ctx.de::<Metadata>(m, "metadata"),
    };
    if let Some(m) = &meta {
        for i in validate::metadata(&m.name, m.namespace.as_deref()) {
            ctx.issue(i);
        }
    }

    let empty = Value::Object(serde_json::Map::new());
    // A Secret's content is at the top level: read it as its spec.
    let secret_value = (kind == Kind::Secret).then(|| {
        let content = obj.iter().filter(|(k, v)| SECRET_TOP_LEVEL[3..].contains(&k.as_str()) && !v.is_null());
        Value::Object(content.map(|(k, v)| (k.clone(), v.clone())).collect())
    });
    let spec_value = match (&secret_value, obj.get("spec")) {
        (Some(v), _) => v,
        (None, None | Some(Value::Null)) => &empty,
        (None, Some(v)) => v,
    };
    let spec = parse_spec(&mut ctx, kind, spec_value);
    if let Some(spec) = &spec {
        let namespace = meta.as_ref().and_then(|m| m.namespace.clone()).unwrap_or_else(|| default_ns.into());
        for i in validate::spec(spec, &namespace) {
            ctx.issue(i);
        }
        if let (Spec::DestinationRule(_), Some(m)) = (spec, &meta) {
            if let Some(v) = m.annotations.get(crate::spec::RETRY_BUDGET_ANNOTATION) {
                if let Err(e) = crate::spec::RetryBudget::parse(v) {
                    let path = format!("metadata.annotations.{}", crate::spec::RETRY_BUDGET_ANNOTATION);
                    ctx.error(&path, e, Some("weft's retry budget extension, see docs/resources.md".into()));
                }
            }
        }
    }

    match (meta, spec) {
        (Some(m), Some(spec)) if ctx.errors.is_empty() => out.resources.push(Resource {
            api_version,
            kind,
            meta: ObjectMeta {
                name: m.name,
                namespace: m.namespace.unwrap_or_else(|| default_ns.into()),
                labels: m.labels,
                annotations: m.annotations,
            },
            spec,
            source: Source { file: file.to_path_buf(), line },
        }),
        _ => out.errors.append(&mut ctx.errors),
    }
}

fn parse_spec(ctx: &mut Ctx<'_>, kind: Kind, v: &Value) -> Option<Spec> {
    let p = "spec";
    Some(match kind {
        Kind::Service => Spec::Service(ctx.de(v, p)?),
        Kind::VirtualService => Spec::VirtualService(ctx.de(v, p)?),
        Kind::DestinationRule => Spec::DestinationRule(ctx.de(v, p)?),
        Kind::ServiceEntry => Spec::ServiceEntry(ctx.de(v, p)?),
        Kind::WorkloadEntry => Spec::WorkloadEntry(ctx.de(v, p)?),
        Kind::Sidecar => Spec::Sidecar(ctx.de(v, p)?),
        Kind::Gateway => Spec::Gateway(ctx.de(v, p)?),
        Kind::PeerAuthentication => Spec::PeerAuthentication(ctx.de(v, p)?),
        Kind::AuthorizationPolicy => Spec::AuthorizationPolicy(ctx.de(v, p)?),
        Kind::RequestAuthentication => Spec::RequestAuthentication(ctx.de(v, p)?),
        Kind::Telemetry => Spec::Telemetry(ctx.de(v, p)?),
        Kind::LocalWorkload => Spec::LocalWorkload(ctx.de(v, p)?),
        Kind::EnvoyFilter => Spec::EnvoyFilter(ctx.de(v, p)?),
        Kind::RateLimit => Spec::RateLimit(ctx.de(v, p)?),
        Kind::ServiceLevelObjective => Spec::ServiceLevelObjective(ctx.de(v, p)?),
        Kind::Rollout => Spec::Rollout(ctx.de(v, p)?),
        Kind::GatewayClass => Spec::GatewayClass(ctx.de(v, p)?),
        Kind::KubernetesGateway => Spec::KubernetesGateway(ctx.de(v, p)?),
        Kind::HttpRoute => Spec::HttpRoute(ctx.de(v, p)?),
        Kind::GrpcRoute => Spec::GrpcRoute(ctx.de(v, p)?),
        Kind::TcpRoute => Spec::TcpRoute(ctx.de(v, p)?),
        Kind::TlsRoute => Spec::TlsRoute(ctx.de(v, p)?),
        Kind::ReferenceGrant => Spec::ReferenceGrant(ctx.de(v, p)?),
        Kind::Secret => Spec::Secret(ctx.de(v, "")?),
    })
}

fn required_str(ctx: &mut Ctx<'_>, obj: &serde_json::Map<String, Value>, key: &str) -> Option<String> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(other) => {
            ctx.error(key, format!("expected a non-empty string, found {}", type_name(other)), None);
            None
        }
        None => {
            ctx.error("", format!("missing required field `{key}`"), Some(format!("every document needs `{key}`")));
            None
        }
    }
}

/// Rejects the second and later definitions of the same resource.
pub(crate) fn reject_duplicates(p: &mut Parsed) {
    let mut seen: HashMap<ResourceKey, Source> = HashMap::new();
    let mut kept = Vec::with_capacity(p.resources.len());
    for r in std::mem::take(&mut p.resources) {
        let key = r.key();
        if let Some(first) = seen.get(&key) {
            p.errors.push(ApiError {
                file: r.source.file.clone(),
                line: r.source.line,
                column: 1,
                resource: Some(key.to_string()),
                field: "metadata.name".into(),
                message: format!("duplicate resource {key}"),
                hint: Some(format!(
                    "first defined at {}:{}; rename one or remove it",
                    first.file.display(),
                    first.line
                )),
            });
        } else {
            seen.insert(key, r.source.clone());
            kept.push(r);
        }
    }
    p.resources = kept;
}

fn join(base: &str, rest: &str) -> String {
    match (base.is_empty(), rest.is_empty()) {
        (_, true) => base.to_string(),
        (true, false) => rest.to_string(),
        (false, false) if rest.starts_with('[') => format!("{base}{rest}"),
        (false, false) => format!("{base}.{rest}"),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a sequence",
        Value::Object(_) => "a mapping",
    }
}

/// Backquoted names in a serde message: "expected one of `a`, `b`".
fn backquoted(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

/// Turns serde's message into (message, hint), fixing `path` for missing and unknown fields.
fn explain(raw: &str, path: &mut String, at: Option<&Value>) -> (String, Option<String>) {
    if let Some(rest) = raw.strip_prefix("unknown field ") {
        let names = backquoted(rest);
        let field = names.first().copied().unwrap_or("");
        let expected = names.get(1..).unwrap_or(&[]);
        if path != field && !path.ends_with(&format!(".{field}")) {
            *path = join(path, field);
        }
        let hint = if expected.is_empty() { "this object has no fields".to_string() } else { suggest(field, expected) };
        return (format!("unknown field `{field}`"), Some(hint));
    }
    if let Some(rest) = raw.strip_prefix("unknown variant ") {
        let names = backquoted(rest);
        let value = names.first().copied().unwrap_or("");
        let expected = names.get(1..).unwrap_or(&[]);
        // A oneof written as a mapping (`uri: {exct: /x}`): the variant is a key.
        if at.and_then(|v| v.get(value)).is_some() {
            *path = join(path, value);
            return (format!("unknown field `{value}`"), Some(suggest(value, expected)));
        }
        // A oneof written as a plain string (`uri: /api`). Istio's enum values
        // are upper case, oneof keys are camelCase.
        let oneof = !expected.is_empty() && expected.iter().all(|n| n.starts_with(|c: char| c.is_ascii_lowercase()));
        if oneof && at.is_some_and(Value::is_string) {
            let list = expected.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
            return (
                format!("wrong type: found string {value:?}"),
                Some(format!("expected a mapping with exactly one of {list}")),
            );
        }
        let list = expected.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        let hint = match nearest(value, expected) {
            Some(n) => format!("did you mean `{n}`? expected one of {list}"),
            None => format!("expected one of {list}"),
        };
        return (format!("unknown value `{value}`"), Some(hint));
    }
    if let Some(rest) = raw.strip_prefix("missing field ") {
        let field = backquoted(rest).first().copied().unwrap_or("").to_string();
        *path = join(path, &field);
        return (format!("missing required field `{field}`"), Some(format!("add `{field}`")));
    }
    if let Some(rest) = raw.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return (format!("wrong type: found {found}"), Some(format!("expected {}", friendly(expected))));
        }
    }
    if let Some(rest) = raw.strip_prefix("invalid value: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return (format!("invalid value: {found}"), Some(format!("expected {}", friendly(expected))));
        }
    }
    (raw.to_string(), None)
}

fn friendly(expected: &str) -> String {
    match expected {
        "u32" | "u64" | "u16" => "a non-negative integer".into(),
        "i64" | "i32" => "an integer".into(),
        "f64" => "a number".into(),
        "a string" | "a sequence" | "a map" | "a boolean" => expected.into(),
        e if e.starts_with("struct ") => "a mapping".into(),
        "enum StringMatch" => "a mapping with exactly one of `exact`, `prefix`, `regex`".into(),
        "enum HttpBody" => "a mapping with exactly one of `string`, `bytes`".into(),
        e if e.starts_with("enum ") => "a mapping with one key".into(),
        e => e.into(),
    }
}

/// "did you mean `x`?" or "expected one of ...".
pub(crate) fn suggest(word: &str, candidates: &[&str]) -> String {
    match nearest(word, candidates) {
        Some(n) => format!("did you mean `{n}`?"),
        None => {
            format!("expected one of {}", candidates.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", "))
        }
    }
}

/// The candidate closest to `word` by edit distance, if close enough.
pub(crate) fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let lw = word.to_ascii_lowercase();
    if let Some(c) = candidates.iter().find(|c| c.to_ascii_lowercase() == lw) {
        return Some(c);
    }
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(&lw, &c.to_ascii_lowercase()), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}
