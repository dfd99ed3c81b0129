//! A position-aware YAML (and therefore JSON) reader.
//!
//! Each document is read from the `yaml-rust2` event stream into a
//! [`serde_json::Value`] while recording, for every field path
//! (`spec.http[0].route[1].weight`), the line and column where it starts.
//! Typed deserialization then runs on the `Value`, and any error path is
//! mapped back to a source position through [`PosIndex`].

use std::collections::HashMap;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// 1-based line and column of a node in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

/// Field path (as `serde_path_to_error` prints it) to source position.
#[derive(Debug, Default, Clone)]
pub struct PosIndex {
    map: HashMap<String, Pos>,
    /// Position of the document's first node.
    pub root: Pos,
}

impl PosIndex {
    /// Position of `path`, or of its nearest recorded ancestor.
    pub fn lookup(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.map.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.root,
            }
        }
    }

    /// Exact position of `path`, if recorded.
    pub fn get(&self, path: &str) -> Option<Pos> {
        self.map.get(path).copied()
    }
}

/// A YAML syntax or structure problem, with its position.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    /// Where the problem was found.
    pub pos: Pos,
    /// Field path of the enclosing node (may be empty).
    pub path: String,
    /// What went wrong.
    pub message: String,
}

/// One document of a multi-document stream.
#[derive(Debug, Clone)]
pub struct Document {
    /// The document as JSON.
    pub value: Value,
    /// Positions of every field.
    pub index: PosIndex,
}

/// Splits `text` into documents at `---` lines and reads each one separately,
/// so that a syntax error in one document does not hide the others.
/// Empty documents (comments only) are dropped.
pub fn read_documents(text: &str) -> Vec<Result<Document, SyntaxError>> {
    let mut out = Vec::new();
    for (offset, chunk) in split_documents(text) {
        if chunk.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
            continue;
        }
        match read_one(&chunk, offset) {
            Ok(Some(doc)) => out.push(Ok(doc)),
            Ok(None) => {}
            Err(e) => out.push(Err(e)),
        }
    }
    out
}

/// Returns (line offset, text) for each `---`-separated chunk. Lines of other
/// chunks are blanked rather than removed so markers keep their line numbers
/// relative to the chunk start.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut chunks = Vec::new();
    let mut start = 0usize;
    let mut cur = String::new();
    for (i, line) in text.lines().enumerate() {
        let is_sep = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        let is_end = line == "..." || line.starts_with("... ");
        if is_sep || is_end {
            chunks.push((start, std::mem::take(&mut cur)));
            start = i + 1;
            if is_sep {
                // Keep inline content after `--- ` (rare) on the same line.
                let rest = line.get(4..).unwrap_or("");
                if !rest.trim().is_empty() && !rest.trim_start().starts_with('#') {
                    start = i;
                    cur.push_str(&" ".repeat(4));
                    cur.push_str(rest);
                    cur.push('\n');
                }
            }
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    chunks.push((start, cur));
    chunks
}

fn pos(m: &Marker, line_offset: usize) -> Pos {
    Pos { line: m.line() + line_offset, column: m.col() + 1 }
}

/// Deepest nesting accepted (protects the stack from hostile input).
const MAX_DEPTH: usize = 64;
/// Most nodes one document may expand to, aliases included (protects memory
/// from "billion laughs" alias bombs).
const MAX_NODES: usize = 1_000_000;

struct Reader<'a> {
    parser: Parser<std::str::Chars<'a>>,
    depth: usize,
    nodes: usize,
    offset: usize,
    index: PosIndex,
    anchors: HashMap<usize, Value>,
    peeked: Option<(Event, Marker)>,
}

fn read_one(chunk: &str, offset: usize) -> Result<Option<Document>, SyntaxError> {
    let mut r = Reader {
        parser: Parser::new_from_str(chunk),
        depth: 0,
        nodes: 0,
        offset,
        index: PosIndex::default(),
        anchors: HashMap::new(),
        peeked: None,
    };
    loop {
        let (ev, m) = r.next("")?;
        match ev {
            Event::StreamStart | Event::DocumentStart => continue,
            Event::StreamEnd | Event::DocumentEnd => return Ok(None),
            ev => {
                r.index.root = pos(&m, offset);
                let value = r.node(ev, m, String::new())?;
                // Anything after the first document inside a chunk is an error.
                loop {
                    let (ev, m) = r.next("")?;
                    match ev {
                        Event::DocumentEnd => continue,
                        Event::StreamEnd => break,
                        _ => {
                            return Err(SyntaxError {
                                pos: pos(&m, offset),
                                path: String::new(),
                                message: "unexpected content after the end of the document".into(),
                            })
                        }
                    }
                }
                return Ok(Some(Document { value, index: r.index }));
            }
        }
    }
}

impl Reader<'_> {
    fn next(&mut self, path: &str) -> Result<(Event, Marker), SyntaxError> {
        if let Some(p) = self.peeked.take() {
            return Ok(p);
        }
        self.parser.next_token().map_err(|e| SyntaxError {
            pos: pos(e.marker(), self.offset),
            path: path.to_string(),
            message: format!("invalid YAML: {}", e.info()),
        })
    }

    fn node(&mut self, ev: Event, m: Marker, path: String) -> Result<Value, SyntaxError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(SyntaxError {
                pos: pos(&m, self.offset),
                path,
                message: format!("document expands to more than {MAX_NODES} nodes"),
            });
        }
        if self.depth >= MAX_DEPTH {
            return Err(SyntaxError {
                pos: pos(&m, self.offset),
                path,
                message: format!("nesting deeper than {MAX_DEPTH} levels"),
            });
        }
        self.depth += 1;
        let v = self.node_inner(ev, m, path);
        self.depth -= 1;
        v
    }

    fn node_inner(&mut self, ev: Event, m: Marker, path: String) -> Result<Value, SyntaxError> {
        match ev {
            Event::Scalar(s, style, anchor, _tag) => {
                let v = scalar(s, style);
                if anchor > 0 {
                    self.anchors.insert(anchor, v.clone());
                }
                Ok(v)
            }
            Event::Alias(id) => {
                let v = self.anchors.get(&id).cloned().ok_or_else(|| SyntaxError {
                    pos: pos(&m, self.offset),
                    path: path.clone(),
                    message: "alias refers to an unknown anchor".into(),
                })?;
                self.nodes += count_nodes(&v);
                if self.nodes > MAX_NODES {
                    return Err(SyntaxError {
                        pos: pos(&m, self.offset),
                        path,
                        message: format!("aliases expand to more than {MAX_NODES} nodes"),
                    });
                }
                Ok(v)
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (ev, im) = self.next(&path)?;
                    if ev == Event::SequenceEnd {
                        break;
                    }
                    let p = format!("{path}[{}]", items.len());
                    self.index.map.insert(p.clone(), pos(&im, self.offset));
                    items.push(self.node(ev, im, p)?);
                }
                let v = Value::Array(items);
                if anchor > 0 {
                    self.anchors.insert(anchor, v.clone());
                }
                Ok(v)
            }
            Event::MappingStart(anchor, _) => {
                let mut map = Map::new();
                loop {
                    let (ev, km) = self.next(&path)?;
                    if ev == Event::MappingEnd {
                        break;
                    }
                    let key = match ev {
                        Event::Scalar(s, _, _, _) => s,
                        _ => {
                            return Err(SyntaxError {
                                pos: pos(&km, self.offset),
                                path,
                                message: "mapping keys must be plain strings".into(),
                            })
                        }
                    };
                    let p = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                    if map.contains_key(&key) {
                        return Err(SyntaxError {
                            pos: pos(&km, self.offset),
                            path: p,
                            message: format!("duplicate key `{key}`"),
                        });
                    }
                    self.index.map.insert(p.clone(), pos(&km, self.offset));
                    let (vev, vm) = self.next(&p)?;
                    let v = self.node(vev, vm, p)?;
                    map.insert(key, v);
                }
                let v = Value::Object(map);
                if anchor > 0 {
                    self.anchors.insert(anchor, v.clone());
                }
                Ok(v)
            }
            other => Err(SyntaxError {
                pos: pos(&m, self.offset),
                path,
                message: format!("unexpected YAML event {other:?}"),
            }),
        }
    }
}

fn count_nodes(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(count_nodes).sum::<usize>(),
        Value::Object(o) => 1 + o.values().map(count_nodes).sum::<usize>(),
        _ => 1,
    }
}

/// YAML 1.2 core schema resolution for plain scalars; quoted scalars are strings.
fn scalar(s: String, style: TScalarStyle) -> Value {
    if style != TScalarStyle::Plain {
        return Value::String(s);
    }
    match s.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(&s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = s.parse::<i64>() {
            return Value::Number(i.into());
        }
        if let Ok(u) = s.parse::<u64>() {
            return Value::Number(u.into());
        }
    }
    if looks_like_float(digits) {
        if let Some(n) = s.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(s)
}

fn looks_like_float(s: &str) -> bool {
    let mut seen_digit = false;
    let mut seen_dot = false;
    let mut seen_exp = false;
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'0'..=b'9' => seen_digit = true,
            b'.' if !seen_dot && !seen_exp => seen_dot = true,
            b'e' | b'E' if seen_digit && !seen_exp => {
                seen_exp = true;
                if matches!(b.get(i + 1), Some(b'+' | b'-')) {
                    i += 1;
                }
            }
            _ => return false,
        }
        i += 1;
    }
    seen_digit && (seen_dot || seen_exp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_recorded_per_field_and_item() {
        let docs = read_documents("# c\na: 1\nb:\n  - x: true\n  - y: \"2\"\n---\nc: 1.5\n");
        assert_eq!(docs.len(), 2);
        let d0 = docs[0].as_ref().map_err(|e| e.message.clone());
        let d0 = d0.as_ref().map_err(String::as_str);
        let Ok(d0) = d0 else { panic!("{d0:?}") };
        assert_eq!(d0.index.get("a").map(|p| p.line), Some(2));
        assert_eq!(d0.index.get("b[1].y").map(|p| (p.line, p.column)), Some((5, 5)));
        assert_eq!(d0.value["b"][0]["x"], Value::Bool(true));
        assert_eq!(d0.value["b"][1]["y"], Value::String("2".into()));
        let Ok(d1) = &docs[1] else { panic!() };
        assert_eq!(d1.index.get("c").map(|p| p.line), Some(7));
        assert_eq!(d1.value["c"].as_f64(), Some(1.5));
    }

    #[test]
    fn syntax_error_in_one_document_keeps_the_others() {
        let docs = read_documents("a: [1\n---\nb: 2\n");
        assert!(docs[0].is_err());
        assert!(docs[1].is_ok());
    }

    #[test]
    fn deep_nesting_and_alias_bombs_are_errors_not_crashes() {
        for n in [100, 5000] {
            let deep = format!("{}1{}", "[".repeat(n), "]".repeat(n));
            let docs = read_documents(&deep);
            let Err(e) = &docs[0] else { panic!("deep nesting accepted") };
            assert!(e.message.contains("nesting deeper") || e.message.contains("recursion limit"), "{}", e.message);
        }

        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..8 {
            let prev = if i == 0 { "a".to_string() } else { format!("b{}", i - 1) };
            bomb.push_str(&format!(
                "b{i}: &b{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        let docs = read_documents(&bomb);
        let Err(e) = &docs[0] else { panic!("alias bomb accepted") };
        assert!(e.message.contains("expand"), "{}", e.message);
    }

    #[test]
    fn aliases_are_expanded() {
        let docs = read_documents("a: &l {app: x}\nb: *l\n");
        let Ok(d) = &docs[0] else { panic!() };
        assert_eq!(d.value["b"]["app"], Value::String("x".into()));
    }

    #[test]
    fn duplicate_key_is_an_error_with_its_line() {
        let docs = read_documents("a: 1\nb: 2\na: 3\n");
        let Err(e) = &docs[0] else { panic!() };
        assert_eq!(e.pos.line, 3);
        assert!(e.message.contains("duplicate key `a`"));
    }
}
