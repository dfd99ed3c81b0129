//! Field paths of a resource document, as analyze messages and errors spell them
//! (`spec.http[0].route[1].weight`): what the field-coverage tests walk (docs/testing.md).

use std::fmt;

use serde_json::Value;

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Segment {
    /// An object key.
    Key(String),
    /// A list index.
    Index(usize),
}

/// A field path from the document's root.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FieldPath(pub Vec<Segment>);

impl FieldPath {
    /// The path with every list index written `[]`: the field, whichever entry holds it.
    pub fn normalized(&self) -> String {
        render(&self.0, true)
    }

    /// This path and every ancestor, longest first.
    pub fn ancestors(&self) -> impl Iterator<Item = FieldPath> + '_ {
        (1..=self.0.len()).rev().map(|n| FieldPath(self.0[..n].to_vec()))
    }

    /// The path with `seg` appended.
    pub fn child(&self, seg: Segment) -> FieldPath {
        let mut p = self.0.clone();
        p.push(seg);
        FieldPath(p)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&render(&self.0, false))
    }
}

/// Every node under `root` (objects, lists, their entries and scalars), parents
/// before children, each with its path below `prefix`.
pub fn paths(root: &Value, prefix: &FieldPath) -> Vec<FieldPath> {
    let mut out = Vec::new();
    walk(root, prefix, &mut out);
    out
}

/// The node at `path`, if any.
pub fn get<'a>(root: &'a Value, path: &FieldPath) -> Option<&'a Value> {
    path.0.iter().try_fold(root, |v, seg| match seg {
        Segment::Key(k) => v.as_object()?.get(k),
        Segment::Index(i) => v.as_array()?.get(*i),
    })
}

/// The node at `path`, if any, to change.
pub fn get_mut<'a>(root: &'a mut Value, path: &FieldPath) -> Option<&'a mut Value> {
    path.0.iter().try_fold(root, |v, seg| match seg {
        Segment::Key(k) => v.as_object_mut()?.get_mut(k),
        Segment::Index(i) => v.as_array_mut()?.get_mut(*i),
    })
}

/// Removes the node at `path` (a key from its object, an entry from its list);
/// false when there is no such node.
pub fn remove(root: &mut Value, path: &FieldPath) -> bool {
    let Some((last, parent)) = path.0.split_last() else { return false };
    let Some(parent) = get_mut(root, &FieldPath(parent.to_vec())) else { return false };
    match (last, parent) {
        (Segment::Key(k), Value::Object(m)) => m.remove(k).is_some(),
        (Segment::Index(i), Value::Array(a)) if *i < a.len() => {
            a.remove(*i);
            true
        }
        _ => false,
    }
}

fn walk(v: &Value, at: &FieldPath, out: &mut Vec<FieldPath>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let p = at.child(Segment::Key(k.clone()));
                out.push(p.clone());
                walk(child, &p, out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                let p = at.child(Segment::Index(i));
                out.push(p.clone());
                walk(child, &p, out);
            }
        }
        _ => {}
    }
}

fn render(segs: &[Segment], normalized: bool) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Segment::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Segment::Index(_) if normalized => s.push_str("[]"),
            Segment::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_render_as_errors_do_and_removal_takes_one_node() {
        let mut v = serde_json::json!({"spec": {"http": [{"route": [{"weight": 1}, {"weight": 2}]}]}});
        let all: Vec<String> = paths(&v, &FieldPath::default()).iter().map(|p| p.to_string()).collect();
        assert!(all.contains(&"spec.http[0].route[1].weight".to_string()), "{all:?}");
        let p =
            paths(&v, &FieldPath::default()).into_iter().find(|p| p.to_string() == "spec.http[0].route[0]").unwrap();
        assert_eq!(p.normalized(), "spec.http[].route[]");
        assert!(remove(&mut v, &p));
        assert_eq!(v, serde_json::json!({"spec": {"http": [{"route": [{"weight": 2}]}]}}));
    }
}
