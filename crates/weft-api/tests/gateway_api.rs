//! Gateway API kinds: accepted apiVersions, told apart from Istio's Gateway by group, and
//! refused with the file, line and field of the mistake.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use weft_api::{parse_str, Kind};

#[test]
fn gateway_api_kinds_parse_in_every_served_version_and_gateway_is_told_apart_by_group() {
    let text = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec: {selector: {istio: ingressgateway}, servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}]}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: HTTPRoute
metadata: {name: r}
spec: {parentRefs: [{name: gw}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec: {rules: [{matches: [{method: {service: echo.Echo}}]}]}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: t}
spec: {rules: [{backendRefs: [{name: db, port: 3306}]}]}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: s}
spec: {hostnames: [a.example], rules: [{backendRefs: [{name: db, port: 443}]}]}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: g, namespace: other}
spec: {from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}], to: [{group: '', kind: Service}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: istio}
spec: {controllerName: istio.io/gateway-controller}
";
    let p = parse_str(text, Path::new("gw.yaml"));
    assert!(p.errors.is_empty(), "{:#?}", p.errors);
    let kinds: Vec<Kind> = p.resources.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        [
            Kind::KubernetesGateway,
            Kind::Gateway,
            Kind::HttpRoute,
            Kind::GrpcRoute,
            Kind::TcpRoute,
            Kind::TlsRoute,
            Kind::ReferenceGrant,
            Kind::GatewayClass
        ]
    );
}

#[test]
fn gateway_api_mistakes_are_refused_with_file_line_and_field() {
    let cases = [
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  gatewayClassName: istio\n  listeners:\n  - {name: http, port: 80, protocol: UDP}\n",
            7,
            "spec.listeners[0].protocol",
            "unsupported protocol `UDP`",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  gatewayClassName: istio\n  listeners:\n  - {name: https, port: 443, protocol: HTTPS}\n",
            7,
            "spec.listeners[0].tls",
            "tls is required for protocol HTTPS",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  rules:\n  - matches:\n    - path: {type: PathPrefix, value: api}\n",
            7,
            "spec.rules[0].matches[0].path.value",
            "does not start with `/`",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  rules:\n  - backendRefs:\n    - {name: foo, port: 80, wieght: 3}\n",
            7,
            "spec.rules[0].backendRefs[0].wieght",
            "unknown field `wieght`",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  rules:\n  - filters:\n    - type: RequestRedirect\n      requestRedirect: {statusCode: 305}\n",
            8,
            "spec.rules[0].filters[0].requestRedirect.statusCode",
            "unsupported status code 305",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  rules:\n  - filters:\n    - type: URLRewrite\n      requestHeaderModifier: {set: [{name: a, value: b}]}\n",
            7,
            "spec.rules[0].filters[0]",
            "a URLRewrite filter sets exactly its own field",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  rules:\n  - backendRefs: [{name: foo}]\n",
            6,
            "spec.rules[0].backendRefs[0].port",
            "port is required",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v9\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {}\n",
            1,
            "apiVersion",
            "unsupported apiVersion",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  hostnames: [10.0.0.1]\n",
            5,
            "spec.hostnames[0]",
            "invalid hostname",
        ),
    ];
    for (text, line, field, message) in cases {
        let p = parse_str(text, Path::new("bad.yaml"));
        assert!(p.resources.is_empty(), "{text}: accepted");
        let e = p.errors.iter().find(|e| e.field == field).unwrap_or_else(|| panic!("{text}: {:#?}", p.errors));
        assert_eq!(e.line, line, "{e}");
        assert!(e.message.contains(message), "{e}");
        assert!(e.to_string().starts_with("bad.yaml:"), "{e}");
    }
}
