//! Request matchers of a route: path, headers, query parameters, cookies, gRPC and
//! runtime fraction, with Envoy's semantics (`RouteMatch`, `HeaderMatcher`,
//! `QueryParameterMatcher`, `StringMatcher`).
// Deprecated proto fields are read on purpose: Envoy still honours them.
#![allow(deprecated)]

use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
    route_match::PathSpecifier, CookieMatcher, HeaderMatcher as HeaderMatcherProto, QueryParameterMatcher, RouteMatch,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatcher, StringMatcher as StringMatcherProto,
};
use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent};
use regex::Regex;

/// Upper bound on the compiled size of one regex (RE2's default program size is
/// similar in spirit: refuse pathological patterns instead of using unbounded memory).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A compiled `RouteMatch`.
#[derive(Debug, Clone)]
pub(crate) struct RouteMatcher {
    pub(crate) path: PathMatch,
    case_sensitive: bool,
    headers: Vec<HeaderMatcher>,
    query: Vec<QueryMatcher>,
    cookies: Vec<CookieMatch>,
    grpc: bool,
    fraction: Option<Fraction>,
}

/// How the path (without query) is matched.
#[derive(Debug, Clone)]
pub(crate) enum PathMatch {
    /// `prefix`.
    Prefix(String),
    /// `path`: the whole path.
    Exact(String),
    /// `safe_regex`: the whole path must match.
    Regex(Regex),
    /// `path_separated_prefix`: the path equals the prefix or continues with `/`.
    SeparatedPrefix(String),
    /// `connect_matcher`: any CONNECT request.
    Connect,
}

/// A compiled `StringMatcher`.
#[derive(Debug, Clone)]
pub(crate) enum StringMatch {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    Regex(Regex),
}

/// A compiled `HeaderMatcher`.
#[derive(Debug, Clone)]
pub(crate) struct HeaderMatcher {
    name: String,
    /// `name` parsed once (None for a pseudo header or a name no header can have): a
    /// `&str` name is parsed at every lookup.
    header: Option<http::HeaderName>,
    kind: HeaderMatchKind,
    invert: bool,
    missing_as_empty: bool,
}

#[derive(Debug, Clone)]
enum HeaderMatchKind {
    /// Deprecated `exact_match`: an empty value only checks presence (Envoy's rule).
    LegacyExact(String),
    String(StringMatch),
    Range(i64, i64),
    Present(bool),
}

/// A compiled `QueryParameterMatcher`.
#[derive(Debug, Clone)]
struct QueryMatcher {
    name: String,
    value: Option<StringMatch>,
}

/// A compiled `CookieMatcher`.
#[derive(Debug, Clone)]
struct CookieMatch {
    name: String,
    value: StringMatch,
    invert: bool,
}

/// A fraction `numerator / denominator` (numerator clamped to the denominator).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Fraction {
    pub(crate) numerator: u64,
    pub(crate) denominator: u64,
}

/// The request as the matchers see it.
pub(crate) struct RequestView<'a> {
    pub(crate) authority: &'a str,
    pub(crate) parts: &'a http::request::Parts,
}

impl RouteMatcher {
    /// Compiles a `RouteMatch`; `at` is the field path of the match (for errors).
    pub(crate) fn compile(m: &RouteMatch, at: &str) -> Result<RouteMatcher, (String, String)> {
        if m.tls_context.is_some() {
            return Err(unsupported(at, "tls_context"));
        }
        if !m.dynamic_metadata.is_empty() {
            return Err(unsupported(at, "dynamic_metadata"));
        }
        if !m.filter_state.is_empty() {
            return Err(unsupported(at, "filter_state"));
        }
        let case_sensitive = m.case_sensitive.as_ref().is_none_or(|b| b.value);
        let fold = |s: &str| {
            if case_sensitive {
                s.to_string()
            } else {
                s.to_ascii_lowercase()
            }
        };
        let path = match &m.path_specifier {
            None => {
                return Err((
                    format!("{at}.path_specifier"),
                    "one of prefix, path, safe_regex, path_separated_prefix or connect_matcher is required".into(),
                ))
            }
            Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(fold(p)),
            Some(PathSpecifier::Path(p)) => PathMatch::Exact(fold(p)),
            Some(PathSpecifier::SafeRegex(r)) => PathMatch::Regex(compile_regex(r, &format!("{at}.safe_regex"))?),
            Some(PathSpecifier::PathSeparatedPrefix(p)) => {
                if p.ends_with('/') || p.contains(['?', '#']) {
                    return Err((
                        format!("{at}.path_separated_prefix"),
                        format!("{p:?} must not end with '/' nor contain '?' or '#'"),
                    ));
                }
                PathMatch::SeparatedPrefix(fold(p))
            }
            Some(PathSpecifier::ConnectMatcher(_)) => PathMatch::Connect,
            Some(PathSpecifier::PathMatchPolicy(_)) => return Err(unsupported(at, "path_match_policy")),
        };
        let headers = m
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| HeaderMatcher::compile(h, &format!("{at}.headers[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let query = m
            .query_parameters
            .iter()
            .enumerate()
            .map(|(i, q)| QueryMatcher::compile(q, &format!("{at}.query_parameters[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let cookies = m
            .cookies
            .iter()
            .enumerate()
            .map(|(i, c)| CookieMatch::compile(c, &format!("{at}.cookies[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let fraction = match &m.runtime_fraction {
            None => None,
            Some(rf) => Some(match &rf.default_value {
                Some(fp) => Fraction::compile(fp, &format!("{at}.runtime_fraction.default_value"))?,
                // Envoy: an unset default_value is 0%.
                None => Fraction { numerator: 0, denominator: 100 },
            }),
        };
        Ok(RouteMatcher { path, case_sensitive, headers, query, cookies, grpc: m.grpc.is_some(), fraction })
    }

    /// Whether the request matches; `random` feeds `runtime_fraction`.
    pub(crate) fn matches(&self, req: &RequestView<'_>, random: u64) -> bool {
        if !self.path_matches(req.parts) {
            return false;
        }
        if self.grpc && !is_grpc(&req.parts.headers) {
            return false;
        }
        if !self.headers.iter().all(|h| h.matches_request(req)) {
            return false;
        }
        if !self.query.is_empty() {
            let params = parse_query(req.parts.uri.query().unwrap_or(""));
            if !self.query.iter().all(|q| q.matches(&params)) {
                return false;
            }
        }
        if !self.cookies.is_empty() {
            let cookies = parse_cookies(&req.parts.headers);
            if !self.cookies.iter().all(|c| c.matches(&cookies)) {
                return false;
            }
        }
        match self.fraction {
            Some(f) => f.hit(random),
            None => true,
        }
    }

    fn path_matches(&self, parts: &http::request::Parts) -> bool {
        let path = parts.uri.path();
        let folded;
        let p = if self.case_sensitive {
            path
        } else {
            folded = path.to_ascii_lowercase();
            &folded
        };
        match &self.path {
            PathMatch::Prefix(pre) => p.starts_with(pre.as_str()),
            PathMatch::Exact(e) => p == e,
            // Envoy: case_sensitive has no effect on safe_regex.
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::SeparatedPrefix(pre) => {
                p.starts_with(pre.as_str()) && (p.len() == pre.len() || p.as_bytes().get(pre.len()) == Some(&b'/'))
            }
            PathMatch::Connect => parts.method == http::Method::CONNECT,
        }
    }

    /// The length of the path prefix that `prefix_rewrite` replaces.
    pub(crate) fn matched_len(&self, path: &str) -> usize {
        match &self.path {
            PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) => p.len().min(path.len()),
            _ => path.len(),
        }
    }
}

impl StringMatch {
    /// Compiles a `StringMatcher`.
    pub(crate) fn compile(m: &StringMatcherProto, at: &str) -> Result<StringMatch, (String, String)> {
        let ic = m.ignore_case;
        let fold = |s: &String| {
            if ic {
                s.to_ascii_lowercase()
            } else {
                s.clone()
            }
        };
        Ok(match &m.match_pattern {
            None => {
                return Err((
                    format!("{at}.match_pattern"),
                    "one of exact, prefix, suffix, contains or safe_regex is required".into(),
                ))
            }
            Some(MatchPattern::Exact(s)) => StringMatch::Exact(fold(s), ic),
            Some(MatchPattern::Prefix(s)) => StringMatch::Prefix(fold(s), ic),
            Some(MatchPattern::Suffix(s)) => StringMatch::Suffix(fold(s), ic),
            Some(MatchPattern::Contains(s)) => StringMatch::Contains(fold(s), ic),
            Some(MatchPattern::SafeRegex(r)) => {
                if ic {
                    // Envoy rejects ignore_case with safe_regex.
                    return Err((
                        format!("{at}.ignore_case"),
                        "ignore_case has no effect on safe_regex and is rejected; use (?i) in the regex".into(),
                    ));
                }
                StringMatch::Regex(compile_regex(r, &format!("{at}.safe_regex"))?)
            }
            Some(MatchPattern::Custom(_)) => return Err(unsupported(at, "custom")),
        })
    }

    /// Whether `value` matches.
    pub(crate) fn matches(&self, value: &str) -> bool {
        let fold = |ic: bool| {
            if ic {
                std::borrow::Cow::Owned(value.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(value)
            }
        };
        match self {
            StringMatch::Exact(s, ic) => fold(*ic) == s.as_str(),
            StringMatch::Prefix(s, ic) => fold(*ic).starts_with(s.as_str()),
            StringMatch::Suffix(s, ic) => fold(*ic).ends_with(s.as_str()),
            StringMatch::Contains(s, ic) => fold(*ic).contains(s.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }
}

impl HeaderMatcher {
    /// Compiles a `HeaderMatcher`.
    pub(crate) fn compile(h: &HeaderMatcherProto, at: &str) -> Result<HeaderMatcher, (String, String)> {
        let name = h.name.to_ascii_lowercase();
        if name.is_empty() {
            return Err((format!("{at}.name"), "header name must not be empty".into()));
        }
        let kind = match &h.header_match_specifier {
            // Envoy: no specifier means "present".
            None => HeaderMatchKind::Present(true),
            Some(HeaderMatchSpecifier::ExactMatch(s)) => HeaderMatchKind::LegacyExact(s.clone()),
            Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => {
                HeaderMatchKind::String(StringMatch::Regex(compile_regex(r, &format!("{at}.safe_regex_match"))?))
            }
            Some(HeaderMatchSpecifier::RangeMatch(r)) => {
                if r.start >= r.end {
                    return Err((
                        format!("{at}.range_match"),
                        format!("start {} must be less than end {}", r.start, r.end),
                    ));
                }
                HeaderMatchKind::Range(r.start, r.end)
            }
            Some(HeaderMatchSpecifier::PresentMatch(b)) => HeaderMatchKind::Present(*b),
            Some(HeaderMatchSpecifier::PrefixMatch(s)) => {
                HeaderMatchKind::String(StringMatch::Prefix(s.clone(), false))
            }
            Some(HeaderMatchSpecifier::SuffixMatch(s)) => {
                HeaderMatchKind::String(StringMatch::Suffix(s.clone(), false))
            }
            Some(HeaderMatchSpecifier::ContainsMatch(s)) => {
                HeaderMatchKind::String(StringMatch::Contains(s.clone(), false))
            }
            Some(HeaderMatchSpecifier::StringMatch(s)) => {
                HeaderMatchKind::String(StringMatch::compile(s, &format!("{at}.string_match"))?)
            }
        };
        let header = http::HeaderName::from_bytes(name.as_bytes()).ok();
        Ok(HeaderMatcher {
            name,
            header,
            kind,
            invert: h.invert_match,
            missing_as_empty: h.treat_missing_header_as_empty,
        })
    }

    /// Matches against a request, pseudo headers included.
    pub(crate) fn matches_request(&self, req: &RequestView<'_>) -> bool {
        let pseudo;
        let value = match self.name.as_str() {
            ":method" => Some(req.parts.method.as_str()),
            ":authority" => Some(req.authority),
            ":path" => {
                pseudo = req.parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
                Some(pseudo.as_str())
            }
            ":scheme" => Some(request_scheme(req.parts)),
            _ => return self.matches_headers(&req.parts.headers),
        };
        self.decide(value)
    }

    /// Matches against a header map (multiple values are joined with `,`, as Envoy does).
    pub(crate) fn matches_headers(&self, headers: &http::HeaderMap) -> bool {
        let Some(name) = &self.header else { return self.decide(None) };
        let all = headers.get_all(name);
        let mut values = all.iter();
        let (Some(first), second) = (values.next(), values.next()) else { return self.decide(None) };
        if second.is_none() {
            // One value (the usual case): matched in place, no copy when it is UTF-8.
            return self.decide(Some(&String::from_utf8_lossy(first.as_bytes())));
        }
        let joined =
            all.iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect::<Vec<_>>().join(",");
        self.decide(Some(&joined))
    }

    fn decide(&self, value: Option<&str>) -> bool {
        let value = match value {
            Some(v) => v,
            None if self.missing_as_empty => "",
            None => {
                // Envoy: a missing header fails every matcher except `present_match`,
                // whatever invert_match says.
                return match self.kind {
                    HeaderMatchKind::Present(p) => p == self.invert,
                    _ => false,
                };
            }
        };
        let m = match &self.kind {
            HeaderMatchKind::LegacyExact(s) => s.is_empty() || value == s,
            HeaderMatchKind::String(s) => s.matches(value),
            HeaderMatchKind::Range(start, end) => value.parse::<i64>().is_ok_and(|v| v >= *start && v < *end),
            HeaderMatchKind::Present(p) => *p,
        };
        m != self.invert
    }
}

impl QueryMatcher {
    fn compile(q: &QueryParameterMatcher, at: &str) -> Result<QueryMatcher, (String, String)> {
        if q.name.is_empty() {
            return Err((format!("{at}.name"), "query parameter name must not be empty".into()));
        }
        let value = match &q.query_parameter_match_specifier {
            None | Some(QueryParameterMatchSpecifier::PresentMatch(_)) => None,
            Some(QueryParameterMatchSpecifier::StringMatch(s)) => {
                Some(StringMatch::compile(s, &format!("{at}.string_match"))?)
            }
        };
        Ok(QueryMatcher { name: q.name.clone(), value })
    }

    fn matches(&self, params: &[(String, String)]) -> bool {
        // Envoy: the first value of the parameter is matched.
        match params.iter().find(|(k, _)| *k == self.name) {
            None => false,
            Some((_, v)) => self.value.as_ref().is_none_or(|m| m.matches(v)),
        }
    }
}

impl CookieMatch {
    fn compile(c: &CookieMatcher, at: &str) -> Result<CookieMatch, (String, String)> {
        let Some(sm) = &c.string_match else {
            return Err((format!("{at}.string_match"), "string_match is required".into()));
        };
        Ok(CookieMatch {
            name: c.name.clone(),
            value: StringMatch::compile(sm, &format!("{at}.string_match"))?,
            invert: c.invert_match,
        })
    }

    fn matches(&self, cookies: &[(String, String)]) -> bool {
        match cookies.iter().find(|(k, _)| *k == self.name) {
            None => false,
            Some((_, v)) => self.value.matches(v) != self.invert,
        }
    }
}

impl Fraction {
    /// 0%: never hit.
    pub(crate) const NEVER: Fraction = Fraction { numerator: 0, denominator: 100 };

    /// Compiles a `FractionalPercent`.
    pub(crate) fn compile(fp: &FractionalPercent, at: &str) -> Result<Fraction, (String, String)> {
        let denominator = match DenominatorType::try_from(fp.denominator) {
            Ok(DenominatorType::Hundred) => 100,
            Ok(DenominatorType::TenThousand) => 10_000,
            Ok(DenominatorType::Million) => 1_000_000,
            Err(_) => return Err((format!("{at}.denominator"), format!("unknown denominator {}", fp.denominator))),
        };
        Ok(Fraction { numerator: u64::from(fp.numerator).min(denominator), denominator })
    }

    /// Envoy's `featureEnabled`: `random % denominator < numerator`.
    pub(crate) fn hit(&self, random: u64) -> bool {
        random % self.denominator < self.numerator
    }

    /// The fraction in percent (0..=100).
    pub(crate) fn percent(&self) -> f64 {
        self.numerator as f64 * 100.0 / self.denominator as f64
    }
}

/// The error tuple for a field weft does not implement.
pub(crate) fn unsupported(at: &str, field: &str) -> (String, String) {
    (
        format!("{at}.{field}"),
        format!("{field} is not supported by weft; remove it (accepting it would silently change behaviour)"),
    )
}

/// Compiles an Envoy `RegexMatcher` so that it matches the whole input.
pub(crate) fn compile_regex(r: &RegexMatcher, at: &str) -> Result<Regex, (String, String)> {
    compile_regex_str(&format!("^(?:{})$", r.regex), &r.regex, &format!("{at}.regex"))
}

/// Compiles an Envoy `RegexMatcher` for search (used by `regex_rewrite`).
pub(crate) fn compile_search_regex(r: &RegexMatcher, at: &str) -> Result<Regex, (String, String)> {
    compile_regex_str(&r.regex, &r.regex, &format!("{at}.regex"))
}

fn compile_regex_str(pattern: &str, shown: &str, at: &str) -> Result<Regex, (String, String)> {
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| (at.to_string(), format!("invalid regex {shown:?}: {e}")))
}

/// Envoy's gRPC request test: content-type `application/grpc` or `application/grpc+...`
/// / `application/grpc;...`.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| {
        ct == "application/grpc" || ct.starts_with("application/grpc+") || ct.starts_with("application/grpc;")
    })
}

/// The request scheme: the URI's, else `x-forwarded-proto`, else `http`.
pub(crate) fn request_scheme(parts: &http::request::Parts) -> &str {
    if let Some(s) = parts.uri.scheme_str() {
        return s;
    }
    parts.headers.get(super::X_FORWARDED_PROTO).and_then(|v| v.to_str().ok()).unwrap_or("http")
}

/// Splits a query string into decoded `(name, value)` pairs, in order.
pub(crate) fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(kv), String::new()),
        })
        .collect()
}

fn parse_cookies(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        })
        .collect()
}

/// Decodes `%XX` escapes; invalid escapes are kept as they are.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
