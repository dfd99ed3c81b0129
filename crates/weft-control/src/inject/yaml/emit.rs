//! Printing a [`Node`] back as block YAML: source scalars in their own style, created
//! strings quoted only where a YAML 1.1 or 1.2 reader could misread them.

use super::{resolve_plain, Node, Resolved, Scalar, Style};

/// Prints a document in block style (two-space indent, sequences under a key at the
/// key's indentation, as kubectl prints them), ending with a newline.
pub fn emit(node: &Node) -> String {
    let mut out = String::new();
    match node {
        Node::Scalar(s) => emit_scalar_line(&mut out, "", s, 0),
        _ => emit_block(&mut out, node, 0),
    }
    out
}

/// Writes a non-empty mapping or sequence at `indent` (line by line).
fn emit_block(out: &mut String, node: &Node, indent: usize) {
    let pad = " ".repeat(indent);
    match node {
        Node::Map(m) if !m.entries.is_empty() => {
            for (k, v) in &m.entries {
                let key = format!("{pad}{}:", key_text(k));
                emit_value(out, &key, v, indent, indent + 2);
            }
        }
        Node::Seq(items) if !items.is_empty() => {
            for item in items {
                let dash = format!("{pad}-");
                match item {
                    Node::Map(m) if !m.entries.is_empty() => nested_after_dash(out, item, &dash, indent),
                    Node::Seq(s) if !s.is_empty() => nested_after_dash(out, item, &dash, indent),
                    _ => emit_value(out, &dash, item, indent, indent + 2),
                }
            }
        }
        // Empty collections only reach here at the top level.
        Node::Map(_) => out.push_str("{}\n"),
        Node::Seq(_) => out.push_str("[]\n"),
        Node::Scalar(s) => emit_scalar_line(out, "", s, indent),
    }
}

/// `- key: v` / `- - x`: the nested block printed two columns in, its first line's
/// indentation replaced by the dash.
fn nested_after_dash(out: &mut String, item: &Node, dash: &str, indent: usize) {
    let mut inner = String::new();
    emit_block(&mut inner, item, indent + 2);
    let first = inner.get(indent + 2..).unwrap_or("");
    out.push_str(dash);
    out.push(' ');
    out.push_str(first);
}

/// `prefix` is `key:` or `-`; the value follows on the same line (scalars, empty
/// collections) or on the next lines.
fn emit_value(out: &mut String, prefix: &str, v: &Node, indent: usize, child: usize) {
    match v {
        Node::Scalar(s) => emit_scalar_line(out, prefix, s, child),
        Node::Map(m) if m.entries.is_empty() => {
            out.push_str(prefix);
            out.push_str(" {}\n");
        }
        Node::Seq(s) if s.is_empty() => {
            out.push_str(prefix);
            out.push_str(" []\n");
        }
        Node::Map(_) => {
            out.push_str(prefix);
            out.push('\n');
            emit_block(out, v, child);
        }
        Node::Seq(_) => {
            out.push_str(prefix);
            out.push('\n');
            // A sequence under a key sits at the key's indentation; under a dash, deeper.
            let at = if prefix.trim_start().starts_with('-') { child } else { indent };
            emit_block(out, v, at);
        }
    }
}

/// Writes `prefix value` (or a block scalar whose lines sit at `child`).
fn emit_scalar_line(out: &mut String, prefix: &str, s: &Scalar, child: usize) {
    let sep = if prefix.is_empty() { "" } else { " " };
    match scalar_repr(s) {
        Repr::Inline(t) if t.is_empty() => {
            out.push_str(prefix);
            out.push('\n');
        }
        Repr::Inline(t) => {
            out.push_str(prefix);
            out.push_str(sep);
            out.push_str(&t);
            out.push('\n');
        }
        Repr::Literal => {
            let body = s.text.trim_end_matches('\n');
            let trailing = s.text.len() - body.len();
            let chomp = match trailing {
                0 => "-",
                1 => "",
                _ => "+",
            };
            out.push_str(prefix);
            out.push_str(sep);
            out.push('|');
            out.push_str(chomp);
            out.push('\n');
            let pad = " ".repeat(child);
            for line in body.split('\n') {
                if !line.is_empty() {
                    out.push_str(&pad);
                    out.push_str(line);
                }
                out.push('\n');
            }
            for _ in 1..trailing {
                out.push('\n');
            }
        }
    }
}

enum Repr {
    Inline(String),
    Literal,
}

fn key_text(k: &Scalar) -> String {
    match scalar_repr(k) {
        Repr::Inline(t) if !t.is_empty() => t,
        _ => double_quoted(&k.text),
    }
}

fn scalar_repr(s: &Scalar) -> Repr {
    let t = &s.text;
    match s.style {
        Style::Plain if !t.contains('\n') && !t.contains(is_special) => Repr::Inline(t.clone()),
        Style::Plain => Repr::Inline(double_quoted(t)),
        Style::Single if single_ok(t) => Repr::Inline(format!("'{}'", t.replace('\'', "''"))),
        Style::Single | Style::Double => Repr::Inline(double_quoted(t)),
        // Blocks and created strings: a block when it keeps the text, else the simplest.
        Style::Literal | Style::Folded | Style::Auto => {
            if literal_ok(t) {
                Repr::Literal
            } else if plain_ok(t) {
                Repr::Inline(t.clone())
            } else if single_ok(t) {
                Repr::Inline(format!("'{}'", t.replace('\'', "''")))
            } else {
                Repr::Inline(double_quoted(t))
            }
        }
    }
}

/// Characters that must be escaped (printed only in double quotes).
fn is_special(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t') || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}')
}

fn single_ok(t: &str) -> bool {
    !t.contains(['\n', '\t']) && !t.contains(is_special) && t.trim() == t
}

/// A `|` block keeps the text exactly: several lines, no escapes needed, and a first
/// line that does not start with a space (that would need an indentation indicator).
fn literal_ok(t: &str) -> bool {
    t.contains('\n')
        && !t.starts_with([' ', '\n', '\t'])
        && !t.contains(is_special)
        && !t.contains('\r')
        && !t.trim_end_matches('\n').is_empty()
}

/// Whether a string may be printed unquoted and read back as the same string by YAML 1.1
/// and 1.2 readers alike.
fn plain_ok(t: &str) -> bool {
    if t.is_empty() || t.trim() != t || t.contains(is_special) || t.contains(['\n', '\t', '#']) {
        return false;
    }
    if t.contains(": ") || t.ends_with(':') || t.starts_with("---") || t.starts_with("...") {
        return false;
    }
    let Some(first) = t.chars().next() else { return false };
    let indicator = matches!(
        first,
        '-' | '?'
            | ':'
            | ','
            | '['
            | ']'
            | '{'
            | '}'
            | '&'
            | '*'
            | '!'
            | '|'
            | '>'
            | '\''
            | '"'
            | '%'
            | '@'
            | '`'
            | '<'
    );
    // `--flag` is a plain scalar (a dash followed by a non-space is not an indicator).
    let dash_ok = first == '-' && t.chars().nth(1).is_some_and(|c| c != ' ' && c != '-');
    let flag_ok = t.starts_with("--") && t.chars().nth(2).is_some_and(|c| c.is_ascii_alphanumeric());
    if indicator && !dash_ok && !flag_ok {
        return false;
    }
    if !matches!(resolve_plain(t), Resolved::Str(_)) {
        return false;
    }
    // YAML 1.2 `.5`-style floats and 1.1 readers' timestamps and base-60 numbers.
    let second = t.chars().nth(1);
    let numeric = first.is_ascii_digit()
        || (matches!(first, '.' | '+' | '-') && second.is_some_and(|c| c.is_ascii_digit() || c == '.'));
    if numeric || first == '.' {
        let rest_alpha = t.trim_start_matches(|c: char| c.is_ascii_digit());
        let unit = !rest_alpha.is_empty()
            && rest_alpha.chars().all(|c| c.is_ascii_alphabetic())
            && !t.starts_with("0x")
            && !t.starts_with("0o")
            && !t.starts_with("0b");
        return unit;
    }
    true
}

fn double_quoted(t: &str) -> String {
    let mut s = String::with_capacity(t.len() + 2);
    s.push('"');
    for c in t.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\t' => s.push_str("\\t"),
            '\r' => s.push_str("\\r"),
            c if is_special(c) => s.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => s.push(c),
        }
    }
    s.push('"');
    s
}
