//! Writing the exposition format: label encoding with escaping, and the conversion from
//! prometheus-client's OpenMetrics output to the classic text format.

use std::fmt::{self, Write as _};

use prometheus_client::encoding::LabelSetEncoder;

/// Encodes one label. prometheus-client writes label values verbatim, so values (which
/// may come from peers) are escaped here as the text format requires.
pub(super) fn label(enc: &mut LabelSetEncoder, key: &str, value: &str) -> fmt::Result {
    label_parts(enc, &[key], value)
}

pub(super) fn label_parts(enc: &mut LabelSetEncoder, key: &[&str], value: &str) -> fmt::Result {
    let mut label_enc = enc.encode_label();
    let mut key_enc = label_enc.encode_label_key()?;
    for part in key {
        key_enc.write_str(part)?;
    }
    let mut value_enc = key_enc.encode_label_value()?;
    write_escaped(&mut value_enc, value)?;
    value_enc.finish()
}

/// Writes `value` escaping `\`, `"` and newlines as the exposition formats require.
fn write_escaped(w: &mut impl fmt::Write, value: &str) -> fmt::Result {
    let mut rest = value;
    while let Some(i) = rest.find(['\\', '"', '\n']) {
        w.write_str(&rest[..i])?;
        w.write_str(match rest.as_bytes()[i] {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            _ => "\\n",
        })?;
        rest = &rest[i + 1..];
    }
    w.write_str(rest)
}

/// Rewrites prometheus-client's OpenMetrics output into the classic text format that
/// `promtool check metrics` and every Prometheus version parse: counter families are
/// named with their `_total` suffix, `# UNIT` and `# EOF` lines are dropped, and
/// OpenMetrics-only types map to their classic equivalents.
pub(super) fn openmetrics_to_text(open: &str) -> String {
    let mut out = String::with_capacity(open.len() + 256);
    let mut pending_help: Option<(&str, &str)> = None;
    for line in open.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name, help));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, ty) = match ty {
                "counter" if !name.ends_with("_total") => ("_total", "counter"),
                "counter" => ("", "counter"),
                "gauge" | "histogram" | "summary" => ("", ty),
                "info" | "stateset" => ("", "gauge"),
                _ => ("", "untyped"),
            };
            if let Some((help_name, help)) = pending_help.take() {
                if help_name == name {
                    let _ = writeln!(out, "# HELP {name}{suffix} {help}");
                }
            }
            let _ = writeln!(out, "# TYPE {name}{suffix} {ty}");
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}
