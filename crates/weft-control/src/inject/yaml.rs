//! A YAML tree for rewriting Kubernetes manifests without changing what they mean.
//!
//! Kubernetes reads YAML with YAML 1.1 rules (`yes` is a boolean, `0644` an octal
//! integer), most Rust YAML libraries with YAML 1.2 rules, so a manifest that goes through
//! a 1.2 parse and print can change meaning. This tree keeps every scalar's source text
//! and style (plain, quoted, block) and prints it back the same way; only scalars weft
//! creates get their style chosen here, quoted whenever a YAML 1.1 or 1.2 reader could
//! take them for something other than a string. Mapping key order is kept. Comments and
//! anchors are not (aliases are expanded).

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// How a scalar is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Unquoted: its type follows from its text (YAML 1.1 rules, as Kubernetes reads it).
    Plain,
    /// `'single quoted'`: a string.
    Single,
    /// `"double quoted"`: a string.
    Double,
    /// `|` block: a string.
    Literal,
    /// `>` block: a string (printed back as a literal block, same value).
    Folded,
    /// A string created by weft: printed plain when unambiguous, quoted otherwise.
    Auto,
}

/// A scalar: its text (the value, after unescaping) and how it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    /// The value's text.
    pub text: String,
    /// Its style.
    pub style: Style,
}

/// What a scalar means.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved<'a> {
    /// `null`, `~` or nothing.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i128),
    /// A float.
    Float(f64),
    /// A string.
    Str(&'a str),
}

/// A YAML node.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A scalar.
    Scalar(Scalar),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in source order.
    Map(Map),
}

/// A mapping with its keys in source order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Map {
    entries: Vec<(Scalar, Node)>,
}

/// A YAML problem with its position in the document's chunk.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    /// 0-based line within the chunk.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What went wrong.
    pub message: String,
}

impl Scalar {
    /// A string weft creates (style chosen when printed).
    pub fn str(s: impl Into<String>) -> Scalar {
        Scalar { text: s.into(), style: Style::Auto }
    }

    /// An integer.
    pub fn int(i: i64) -> Scalar {
        Scalar { text: i.to_string(), style: Style::Plain }
    }

    /// A boolean.
    pub fn bool(b: bool) -> Scalar {
        Scalar { text: b.to_string(), style: Style::Plain }
    }

    /// What the scalar means, as Kubernetes reads it.
    pub fn resolve(&self) -> Resolved<'_> {
        match self.style {
            Style::Plain => resolve_plain(&self.text),
            _ => Resolved::Str(&self.text),
        }
    }

    /// The scalar's text when it is a string, a number or a boolean (annotation values,
    /// names); `None` for null.
    pub fn value_text(&self) -> Option<&str> {
        match self.resolve() {
            Resolved::Null => None,
            _ => Some(&self.text),
        }
    }
}

impl Node {
    /// A string node weft creates.
    pub fn str(s: impl Into<String>) -> Node {
        Node::Scalar(Scalar::str(s))
    }

    /// An integer node.
    pub fn int(i: i64) -> Node {
        Node::Scalar(Scalar::int(i))
    }

    /// A boolean node.
    pub fn bool(b: bool) -> Node {
        Node::Scalar(Scalar::bool(b))
    }

    /// A sequence of strings weft creates.
    pub fn strs<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Node {
        Node::Seq(items.into_iter().map(Node::str).collect())
    }

    /// The mapping, if this is one.
    pub fn as_map(&self) -> Option<&Map> {
        match self {
            Node::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The mapping, if this is one.
    pub fn as_map_mut(&mut self) -> Option<&mut Map> {
        match self {
            Node::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The sequence, if this is one.
    pub fn as_seq(&self) -> Option<&Vec<Node>> {
        match self {
            Node::Seq(s) => Some(s),
            _ => None,
        }
    }

    /// The sequence, if this is one.
    pub fn as_seq_mut(&mut self) -> Option<&mut Vec<Node>> {
        match self {
            Node::Seq(s) => Some(s),
            _ => None,
        }
    }

    /// The scalar, if this is one.
    pub fn as_scalar(&self) -> Option<&Scalar> {
        match self {
            Node::Scalar(s) => Some(s),
            _ => None,
        }
    }

    /// A scalar's text (see [`Scalar::value_text`]).
    pub fn text(&self) -> Option<&str> {
        self.as_scalar().and_then(Scalar::value_text)
    }

    /// Whether this is null (a plain `null`, `~` or empty scalar).
    pub fn is_null(&self) -> bool {
        matches!(self.as_scalar().map(Scalar::resolve), Some(Resolved::Null))
    }

    /// The node as JSON (Kubernetes' reading of the YAML). Fails on values JSON cannot
    /// hold (`.inf`, `.nan`).
    pub fn to_json(&self) -> Result<serde_json::Value, String> {
        use serde_json::Value;
        Ok(match self {
            Node::Scalar(s) => match s.resolve() {
                Resolved::Null => Value::Null,
                Resolved::Bool(b) => Value::Bool(b),
                Resolved::Int(i) => {
                    if let Ok(v) = i64::try_from(i) {
                        Value::from(v)
                    } else if let Ok(v) = u64::try_from(i) {
                        Value::from(v)
                    } else {
                        return Err(format!("integer {} does not fit in 64 bits", s.text));
                    }
                }
                Resolved::Float(f) => serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| format!("{} cannot be written in JSON", s.text))?,
                Resolved::Str(t) => Value::String(t.to_string()),
            },
            Node::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect::<Result<_, _>>()?),
            Node::Map(m) => {
                let mut out = serde_json::Map::new();
                for (k, v) in &m.entries {
                    out.insert(k.text.clone(), v.to_json()?);
                }
                Value::Object(out)
            }
        })
    }

    /// A node from JSON (strings keep their string type whatever their text).
    pub fn from_json(v: &serde_json::Value) -> Node {
        use serde_json::Value;
        let plain = |t: String| Node::Scalar(Scalar { text: t, style: Style::Plain });
        match v {
            Value::Null => plain("null".into()),
            Value::Bool(b) => plain(b.to_string()),
            Value::Number(n) => plain(n.to_string()),
            Value::String(s) => Node::Scalar(Scalar { text: s.clone(), style: Style::Double }),
            Value::Array(a) => Node::Seq(a.iter().map(Node::from_json).collect()),
            Value::Object(o) => Node::Map(Map {
                entries: o
                    .iter()
                    .map(|(k, v)| (Scalar { text: k.clone(), style: Style::Double }, Node::from_json(v)))
                    .collect(),
            }),
        }
    }
}

impl Map {
    /// An empty mapping.
    pub fn new() -> Map {
        Map::default()
    }

    /// A mapping of weft-created keys, in this order.
    pub fn of<K: Into<String>>(entries: impl IntoIterator<Item = (K, Node)>) -> Map {
        Map { entries: entries.into_iter().map(|(k, v)| (Scalar::str(k), v)).collect() }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries.iter().find(|(k, _)| k.text == key).map(|(_, v)| v)
    }

    /// The value of `key`.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Node> {
        self.entries.iter_mut().find(|(k, _)| k.text == key).map(|(_, v)| v)
    }

    /// Sets `key` (in place when present, else appended).
    pub fn insert(&mut self, key: &str, value: Node) {
        match self.get_mut(key) {
            Some(v) => *v = value,
            None => self.entries.push((Scalar::str(key), value)),
        }
    }

    /// Sets `key`; when absent it goes just before `before` (or at the end).
    pub fn insert_before(&mut self, key: &str, value: Node, before: &str) {
        if let Some(v) = self.get_mut(key) {
            *v = value;
            return;
        }
        let at = self.entries.iter().position(|(k, _)| k.text == before).unwrap_or(self.entries.len());
        self.entries.insert(at, (Scalar::str(key), value));
    }

    /// The value of `key`, created as an empty mapping (at the end, or before `before`)
    /// when absent or null. `None` when present but not a mapping.
    pub fn map_entry(&mut self, key: &str, before: Option<&str>) -> Option<&mut Map> {
        let missing = self.get(key).is_none_or(Node::is_null);
        if missing {
            match before {
                Some(b) => self.insert_before(key, Node::Map(Map::new()), b),
                None => self.insert(key, Node::Map(Map::new())),
            }
        }
        self.get_mut(key).and_then(Node::as_map_mut)
    }

    /// The value of `key`, created as an empty sequence when absent or null. `None`
    /// when present but not a sequence.
    pub fn seq_entry(&mut self, key: &str, before: Option<&str>) -> Option<&mut Vec<Node>> {
        let missing = self.get(key).is_none_or(Node::is_null);
        if missing {
            match before {
                Some(b) => self.insert_before(key, Node::Seq(Vec::new()), b),
                None => self.insert(key, Node::Seq(Vec::new())),
            }
        }
        self.get_mut(key).and_then(Node::as_seq_mut)
    }

    /// Entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&Scalar, &Node)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

/// YAML 1.1 resolution of a plain scalar, as Kubernetes' YAML reader (go-yaml v2) does it.
pub fn resolve_plain(s: &str) -> Resolved<'_> {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Resolved::Null,
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => {
            return Resolved::Bool(true)
        }
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False" | "FALSE" => {
            return Resolved::Bool(false)
        }
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Resolved::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Resolved::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Resolved::Float(f64::NAN),
        _ => {}
    }
    if !s.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '.')) {
        return Resolved::Str(s);
    }
    let plain: String = s.chars().filter(|c| *c != '_').collect();
    if let Some(i) = parse_int(&plain) {
        return Resolved::Int(i);
    }
    if is_float(&plain) {
        if let Ok(f) = plain.parse::<f64>() {
            return Resolved::Float(f);
        }
    }
    Resolved::Str(s)
}

/// Go's `strconv.ParseInt(s, 0, 64)` / `ParseUint`: sign, then `0x`, `0o`, `0b` or a
/// leading `0` (octal) prefix, else decimal.
fn parse_int(s: &str) -> Option<i128> {
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (radix, body) = if let Some(r) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        (16, r)
    } else if let Some(r) = digits.strip_prefix("0o").or_else(|| digits.strip_prefix("0O")) {
        (8, r)
    } else if let Some(r) = digits.strip_prefix("0b").or_else(|| digits.strip_prefix("0B")) {
        (2, r)
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, &digits[1..])
    } else {
        (10, digits)
    };
    if body.is_empty() || !body.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = i128::from_str_radix(body, radix).ok()?;
    let v = if neg { -v } else { v };
    (v >= i128::from(i64::MIN) && v <= i128::from(u64::MAX)).then_some(v)
}

/// `^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`
fn is_float(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some(("", frac)) => digits(frac),
        Some((int, frac)) => digits(int) && (frac.is_empty() || digits(frac)),
        None => digits(mantissa),
    };
    let exp_ok = exp.is_none_or(|e| digits(e.strip_prefix(['-', '+']).unwrap_or(e)));
    mantissa_ok && exp_ok
}

// ---------------------------------------------------------------------------------------
// Reading

/// Deepest nesting accepted (protects the stack from hostile input).
const MAX_DEPTH: usize = 64;
/// Most nodes one document may expand to, aliases included (alias bombs).
const MAX_NODES: usize = 1_000_000;

/// Reads one document (a chunk between `---` lines). `Ok(None)` for an empty document.
pub fn parse_document(chunk: &str) -> Result<Option<Node>, SyntaxError> {
    let mut r = Reader { parser: Parser::new_from_str(chunk), depth: 0, nodes: 0, anchors: Vec::new() };
    loop {
        let (ev, m) = r.next()?;
        match ev {
            Event::StreamStart | Event::DocumentStart => continue,
            Event::StreamEnd | Event::DocumentEnd => return Ok(None),
            ev => {
                let node = r.node(ev, m)?;
                loop {
                    let (ev, m) = r.next()?;
                    match ev {
                        Event::DocumentEnd => continue,
                        Event::StreamEnd => return Ok(Some(node)),
                        _ => return Err(err(&m, "unexpected content after the end of the document")),
                    }
                }
            }
        }
    }
}

struct Reader<'a> {
    parser: Parser<std::str::Chars<'a>>,
    depth: usize,
    nodes: usize,
    anchors: Vec<(usize, Node)>,
}

fn err(m: &Marker, message: impl Into<String>) -> SyntaxError {
    SyntaxError { line: m.line().saturating_sub(1), column: m.col() + 1, message: message.into() }
}

fn count(n: &Node) -> usize {
    match n {
        Node::Scalar(_) => 1,
        Node::Seq(s) => 1 + s.iter().map(count).sum::<usize>(),
        Node::Map(m) => 1 + m.entries.iter().map(|(_, v)| 1 + count(v)).sum::<usize>(),
    }
}

impl Reader<'_> {
    fn next(&mut self) -> Result<(Event, Marker), SyntaxError> {
        self.parser.next_token().map_err(|e| err(e.marker(), e.info().to_string()))
    }

    fn remember(&mut self, anchor: usize, node: &Node) {
        if anchor > 0 {
            self.anchors.push((anchor, node.clone()));
        }
    }

    fn node(&mut self, ev: Event, m: Marker) -> Result<Node, SyntaxError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(err(&m, format!("the document expands to more than {MAX_NODES} nodes")));
        }
        if self.depth >= MAX_DEPTH {
            return Err(err(&m, format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        self.depth += 1;
        let n = self.node_inner(ev, m);
        self.depth -= 1;
        n
    }

    fn node_inner(&mut self, ev: Event, m: Marker) -> Result<Node, SyntaxError> {
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let n = Node::Scalar(scalar(text, style, tag.as_ref()));
                self.remember(anchor, &n);
                Ok(n)
            }
            Event::Alias(id) => {
                let n = self
                    .anchors
                    .iter()
                    .rev()
                    .find(|(a, _)| *a == id)
                    .map(|(_, n)| n.clone())
                    .ok_or_else(|| err(&m, "alias refers to an unknown anchor"))?;
                self.nodes += count(&n);
                if self.nodes > MAX_NODES {
                    return Err(err(&m, format!("aliases expand to more than {MAX_NODES} nodes")));
                }
                Ok(n)
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (ev, im) = self.next()?;
                    if ev == Event::SequenceEnd {
                        break;
                    }
                    items.push(self.node(ev, im)?);
                }
                let n = Node::Seq(items);
                self.remember(anchor, &n);
                Ok(n)
            }
            Event::MappingStart(anchor, _) => {
                let mut map = Map::new();
                loop {
                    let (ev, km) = self.next()?;
                    if ev == Event::MappingEnd {
                        break;
                    }
                    let key = match ev {
                        Event::Scalar(text, style, _, tag) => scalar(text, style, tag.as_ref()),
                        _ => return Err(err(&km, "mapping keys must be scalars")),
                    };
                    if map.get(&key.text).is_some() {
                        return Err(err(&km, format!("duplicate key `{}`", key.text)));
                    }
                    let (vev, vm) = self.next()?;
                    let v = self.node(vev, vm)?;
                    map.entries.push((key, v));
                }
                let n = Node::Map(map);
                self.remember(anchor, &n);
                Ok(n)
            }
            other => Err(err(&m, format!("unexpected YAML event {other:?}"))),
        }
    }
}

fn scalar(text: String, style: TScalarStyle, tag: Option<&yaml_rust2::parser::Tag>) -> Scalar {
    let is_str_tag = tag.is_some_and(|t| t.suffix == "str");
    let style = match style {
        TScalarStyle::SingleQuoted => Style::Single,
        TScalarStyle::DoubleQuoted => Style::Double,
        TScalarStyle::Literal => Style::Literal,
        TScalarStyle::Folded => Style::Folded,
        _ if is_str_tag => Style::Double,
        _ => Style::Plain,
    };
    Scalar { text, style }
}

mod emit;
pub use emit::emit;

#[cfg(test)]
mod tests;
