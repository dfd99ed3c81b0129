//! Header add/remove lists of a route, virtual host or route configuration, applied
//! the way Envoy's `HeaderParser::evaluateHeaders` does: removals first, then
//! overwrites, then appends; `ADD_IF_ABSENT` and `OVERWRITE_IF_EXISTS` look at the
//! headers as they were before this level's additions.
// Deprecated proto fields are read on purpose: Envoy still honours them.
#![allow(deprecated)]

use envoy_types::pb::envoy::config::core::v3::{header_value_option::HeaderAppendAction, HeaderValueOption};
use http::{HeaderMap, HeaderName, HeaderValue};

/// Envoy's `HeaderValueOption.append_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    /// Append a value (a new entry) when the header exists, add it otherwise.
    AppendIfExistsOrAdd,
    /// Add only when the header is absent.
    AddIfAbsent,
    /// Replace all values, or add.
    OverwriteIfExistsOrAdd,
    /// Replace all values only when the header exists.
    OverwriteIfExists,
}

/// One level of header edits (route, virtual host or route configuration).
#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    remove: Vec<HeaderName>,
    add: Vec<HeaderAdd>,
}

#[derive(Debug, Clone)]
struct HeaderAdd {
    name: HeaderName,
    value: HeaderValue,
    action: AppendAction,
}

impl HeaderEdits {
    /// Compiles `*_headers_to_add` / `*_headers_to_remove`; `add_at` and `remove_at`
    /// are the field paths used in errors.
    pub(crate) fn compile(
        add: &[HeaderValueOption],
        remove: &[String],
        add_at: &str,
        remove_at: &str,
    ) -> Result<HeaderEdits, (String, String)> {
        let mut edits = HeaderEdits::default();
        for (i, r) in remove.iter().enumerate() {
            let at = format!("{remove_at}[{i}]");
            edits.remove.push(modifiable_name(r, &at)?);
        }
        for (i, opt) in add.iter().enumerate() {
            let at = format!("{add_at}[{i}]");
            let Some(h) = &opt.header else {
                return Err((format!("{at}.header"), "header is required".into()));
            };
            let name = modifiable_name(&h.key, &format!("{at}.header.key"))?;
            let raw = if !h.raw_value.is_empty() {
                if !h.value.is_empty() {
                    return Err((format!("{at}.header"), "only one of value and raw_value may be set".into()));
                }
                h.raw_value.clone()
            } else {
                literal_value(&h.value, &format!("{at}.header.value"))?.into_bytes()
            };
            let action = match (&opt.append, HeaderAppendAction::try_from(opt.append_action)) {
                (Some(_), Ok(a)) if a != HeaderAppendAction::AppendIfExistsOrAdd => {
                    return Err((
                        format!("{at}.append"),
                        "append and append_action are both set; use append_action only".into(),
                    ))
                }
                (Some(b), _) if b.value => AppendAction::AppendIfExistsOrAdd,
                (Some(_), _) => AppendAction::OverwriteIfExistsOrAdd,
                (None, Ok(HeaderAppendAction::AppendIfExistsOrAdd)) => AppendAction::AppendIfExistsOrAdd,
                (None, Ok(HeaderAppendAction::AddIfAbsent)) => AppendAction::AddIfAbsent,
                (None, Ok(HeaderAppendAction::OverwriteIfExistsOrAdd)) => AppendAction::OverwriteIfExistsOrAdd,
                (None, Ok(HeaderAppendAction::OverwriteIfExists)) => AppendAction::OverwriteIfExists,
                (None, Err(_)) => {
                    return Err((format!("{at}.append_action"), format!("unknown append_action {}", opt.append_action)))
                }
            };
            // Envoy skips empty values unless keep_empty_value is set.
            if raw.is_empty() && !opt.keep_empty_value {
                continue;
            }
            let value = HeaderValue::from_bytes(&raw)
                .map_err(|_| (format!("{at}.header.value"), "not a valid HTTP header value".to_string()))?;
            edits.add.push(HeaderAdd { name, value, action });
        }
        Ok(edits)
    }

    /// True when this level removes `name` from the request or response.
    pub(crate) fn removes(&self, name: &HeaderName) -> bool {
        self.remove.contains(name)
    }

    /// True when this level changes nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }

    /// Applies this level to `headers`.
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        for r in &self.remove {
            headers.remove(r);
        }
        let mut overwrite: Vec<&HeaderAdd> = Vec::new();
        let mut append: Vec<&HeaderAdd> = Vec::new();
        for a in &self.add {
            match a.action {
                AppendAction::AppendIfExistsOrAdd => append.push(a),
                AppendAction::AddIfAbsent => {
                    if !headers.contains_key(&a.name) {
                        append.push(a);
                    }
                }
                AppendAction::OverwriteIfExists => {
                    if headers.contains_key(&a.name) {
                        overwrite.push(a);
                    }
                }
                AppendAction::OverwriteIfExistsOrAdd => overwrite.push(a),
            }
        }
        for a in overwrite {
            headers.insert(a.name.clone(), a.value.clone());
        }
        for a in append {
            headers.append(a.name.clone(), a.value.clone());
        }
    }
}

/// A header name that Envoy lets routes modify (not `:`-prefixed, not `host`).
fn modifiable_name(name: &str, at: &str) -> Result<HeaderName, (String, String)> {
    if name.starts_with(':') || name.eq_ignore_ascii_case("host") {
        return Err((at.to_string(), format!("{name:?}: ':'-prefixed and host headers may not be modified")));
    }
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| (at.to_string(), format!("{name:?} is not a valid header name")))
}

/// The literal value of a header: `%%` is a literal `%`; any other `%` starts an Envoy
/// substitution command, which weft does not evaluate, so it is rejected.
fn literal_value(v: &str, at: &str) -> Result<String, (String, String)> {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '%' {
            if chars.peek() == Some(&'%') {
                chars.next();
            } else {
                return Err((
                    at.to_string(),
                    format!("{v:?}: %COMMAND% substitutions are not supported; write %% for a literal %"),
                ));
            }
        }
        out.push(c);
    }
    Ok(out)
}
