//! Property tests (fuzzing on stable, bounded to run in `cargo test`) of the parser and
//! validator: arbitrary text and mutated Istio documents give resources or errors that
//! name the file and a line inside it, never a panic.

use std::path::Path;

use proptest::prelude::*;
use weft_api::parse_str;

const FILE: &str = "fuzz/mesh.yaml";

/// Valid documents of the kinds users write (one multi-document file).
const SEED: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: shop
spec:
  selector: {app: reviews}
  ports:
  - name: http
    port: 9080
    targetPort: 9080
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
      uri: {regex: "^/api/v[0-9]+"}
    fault:
      delay: {percentage: {value: 10}, fixedDelay: 2s}
    route:
    - destination: {host: reviews, subset: v2}
      weight: 80
    - destination: {host: reviews, subset: v3}
      weight: 20
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: "5xx,connect-failure"}
    timeout: 10s
  - route:
    - destination: {host: reviews, subset: v1, port: {number: 9080}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool: {http: {http1MaxPendingRequests: 10, maxRequestsPerConnection: 1}}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}
    tls: {mode: ISTIO_MUTUAL}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: web
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["*.example.com"]
    tls: {mode: SIMPLE, credentialName: web-cert}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin
spec:
  hosts: [httpbin.org]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  resolution: DNS
  location: MESH_EXTERNAL
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews
  namespace: shop
spec:
  selector:
    matchLabels: {app: reviews}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/productpage"]}
    to:
    - operation: {methods: [GET], paths: ["/reviews/*"]}
    when:
    - key: request.headers[x-token]
      values: ["abc"]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: shop
spec:
  selector:
    matchLabels: {app: reviews}
  mtls: {mode: STRICT}
  portLevelMtls:
    9080: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt
  namespace: shop
spec:
  jwtRules:
  - issuer: https://issuer.example.com
    jwksUri: https://issuer.example.com/jwks.json
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata:
  name: default
  namespace: shop
spec:
  egress:
  - hosts: ["./*", "istio-system/*"]
"#;

/// Tokens that matter to YAML or to the validator, spliced into documents.
const TOKENS: &[&str] = &[
    ":",
    ": ",
    "- ",
    "-",
    "{",
    "}",
    "[",
    "]",
    ",",
    "#",
    "&a ",
    "*a",
    "<<: *a",
    "!!binary ",
    "!!str ",
    "!foo ",
    "~",
    "null",
    "true",
    "\"",
    "'",
    "|",
    ">",
    "\t",
    "\n",
    "\n  ",
    "\n---\n",
    "---",
    "...",
    "%YAML 1.2\n",
    "? ",
    "1e999",
    "-1",
    "0x10",
    "99999999999999999999",
    "4294967296",
    "65536",
    "-0",
    ".nan",
    "1.5",
    "1h",
    "-5s",
    "999999999999s",
    "0s",
    "abc",
    "weight: ",
    "subset: ",
    "port: ",
    "number: ",
    "kind: ",
    "spec: ",
    "metadata: ",
    "name: ",
    "hosts: ",
    "regex: ",
    "(",
    "\\",
    "é",
    "\u{0}",
    "\u{feff}",
    "\r\n",
];

#[derive(Debug, Clone)]
enum Edit {
    Insert(prop::sample::Index, String),
    Delete(prop::sample::Index, usize),
    DuplicateLine(prop::sample::Index),
    DropLine(prop::sample::Index),
    Indent(prop::sample::Index, usize),
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![prop::sample::select(TOKENS).prop_map(str::to_string), "\\PC{0,6}"]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<prop::sample::Index>(), token()).prop_map(|(i, t)| Edit::Insert(i, t)),
        (any::<prop::sample::Index>(), 1usize..12).prop_map(|(i, n)| Edit::Delete(i, n)),
        any::<prop::sample::Index>().prop_map(Edit::DuplicateLine),
        any::<prop::sample::Index>().prop_map(Edit::DropLine),
        (any::<prop::sample::Index>(), 0usize..6).prop_map(|(i, n)| Edit::Indent(i, n)),
    ]
}

/// The nearest char boundary at or before `i`.
fn boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut s = text.to_string();
    for e in edits {
        match e {
            Edit::Insert(i, t) => {
                let at = boundary(&s, i.index(s.len() + 1));
                s.insert_str(at, t);
            }
            Edit::Delete(i, n) => {
                if s.is_empty() {
                    continue;
                }
                let start = boundary(&s, i.index(s.len()));
                let end = boundary(&s, (start + n).min(s.len()));
                s.replace_range(start..end, "");
            }
            Edit::DuplicateLine(i) | Edit::DropLine(i) | Edit::Indent(i, _) => {
                let mut lines: Vec<String> = s.split('\n').map(str::to_string).collect();
                let at = i.index(lines.len());
                match e {
                    Edit::DuplicateLine(_) => lines.insert(at, lines[at].clone()),
                    Edit::DropLine(_) => {
                        lines.remove(at);
                    }
                    Edit::Indent(_, n) => lines[at] = format!("{}{}", " ".repeat(*n), lines[at].trim_start()),
                    _ => {}
                }
                s = lines.join("\n");
            }
        }
    }
    s
}

/// Parses `text`; every error names the file and a line of it.
fn check(text: &str) -> Result<(), TestCaseError> {
    let parsed = parse_str(text, Path::new(FILE));
    let lines = text.split('\n').count().max(1);
    for e in &parsed.errors {
        prop_assert_eq!(e.file.as_path(), Path::new(FILE));
        prop_assert!(e.line >= 1 && e.line <= lines + 1, "line {} of {}: {}", e.line, lines, e);
        prop_assert!(e.to_string().starts_with(&format!("{FILE}:{}:", e.line)), "{}", e);
        prop_assert!(!e.message.is_empty(), "{}", e);
    }
    Ok(())
}

fn config() -> ProptestConfig {
    // `PROPTEST_CASES` raises the count for a longer local run.
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_gives_errors_with_file_and_line_never_a_panic(text in "\\PC{0,300}") {
        check(&text)?;
    }

    #[test]
    fn token_soup_gives_errors_with_file_and_line_never_a_panic(
        tokens in proptest::collection::vec(token(), 0..60),
    ) {
        check(&tokens.concat())?;
    }

    #[test]
    fn mutated_istio_documents_give_resources_or_located_errors_never_a_panic(
        edits in proptest::collection::vec(edit(), 1..8),
    ) {
        check(&apply(SEED, &edits))?;
    }
}

#[test]
fn the_seed_parses_cleanly() {
    let parsed = parse_str(SEED, Path::new(FILE));
    let errors: Vec<String> = parsed.errors.iter().map(ToString::to_string).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(parsed.resources.len(), 9);
}

#[test]
fn an_alias_bomb_is_refused_or_parsed_without_blowing_up() {
    let mut bomb = String::from(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  labels:\n    l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n",
    );
    for i in 1..12 {
        let prev = format!("*l{}", i - 1);
        bomb.push_str(&format!("    l{i}: &l{i} [{}]\n", [prev.as_str(); 10].join(", ")));
    }
    let parsed = parse_str(&bomb, Path::new(FILE));
    assert!(parsed.resources.is_empty());
    assert!(!parsed.errors.is_empty());
}
