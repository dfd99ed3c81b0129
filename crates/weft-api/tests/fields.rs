//! The maximal resources in `tests/data/fields/` set every field of every kind weft
//! parses: a field added to a spec struct without an entry there fails here, so the
//! field-coverage test (`weft-control --test fields_applied`) walks it too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;
use weft_api::fields::{FieldPath, Segment};
use weft_api::{parse_str, yaml, Kind};

fn data(kind: Kind) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fields")
        .join(format!("{}.yaml", kind.id().to_ascii_lowercase()))
}

/// Walks the typed value (every field written out) beside the YAML it was read from:
/// a field of the typed value the YAML does not write goes to `missing`, one it writes
/// to `set`. A YAML scalar read into a structured value (a duration) ends the walk.
fn compare(typed: &Value, written: &Value, at: &FieldPath, set: &mut BTreeSet<String>, missing: &mut BTreeSet<String>) {
    match (typed, written) {
        (Value::Object(t), Value::Object(w)) => {
            for (k, tv) in t {
                let p = at.child(Segment::Key(k.clone()));
                match w.get(k) {
                    Some(wv) => {
                        set.insert(p.normalized());
                        compare(tv, wv, &p, set, missing);
                    }
                    None => {
                        missing.insert(p.normalized());
                    }
                }
            }
        }
        (Value::Array(t), Value::Array(w)) => {
            for (i, (tv, wv)) in t.iter().zip(w).enumerate() {
                compare(tv, wv, &at.child(Segment::Index(i)), set, missing);
            }
        }
        _ => {}
    }
}

/// `missing` is set by some document: at the same place, at a place with the same last
/// three steps (the same struct under the same parent field, e.g.
/// `portLevelSettings[].tls.sni` at the top or in a subset: the translator shares the
/// code), or under another key of the same map (a map's keys are data, like
/// `customTags.<name>`: one entry sets its value type's fields).
fn covered(missing: &str, set: &BTreeSet<String>) -> bool {
    let m: Vec<&str> = missing.split('.').collect();
    set.iter().any(|s| {
        let s: Vec<&str> = s.split('.').collect();
        let tail = m.len().min(3);
        let same_tail = s.len() >= tail && s[s.len() - tail..] == m[m.len() - tail..];
        let differ: Vec<usize> = (0..m.len()).filter(|&i| s.get(i) != Some(&m[i])).collect();
        same_tail || (s.len() == m.len() && differ.len() == 1 && differ[0] + 1 < m.len())
    })
}

#[test]
fn every_field_of_every_kind_is_set_by_a_maximal_resource() {
    let mut unset = Vec::new();
    for kind in Kind::ALL {
        let path = data(kind);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let parsed = parse_str(&text, &path);
        if !parsed.errors.is_empty() {
            let errors: Vec<String> = parsed.errors.iter().map(|e| e.to_string()).collect();
            unset.push(format!("{kind}: invalid: {}", errors.join("; ")));
            continue;
        }
        assert!(parsed.skipped.is_empty(), "{kind}: {:?}", parsed.skipped);
        let docs: Vec<yaml::Document> = yaml::read_documents(&text).into_iter().map(|d| d.unwrap()).collect();
        assert_eq!(docs.len(), parsed.resources.len(), "{kind}: one resource per document");
        let (mut set, mut missing) = (BTreeSet::new(), BTreeSet::new());
        for (r, doc) in parsed.resources.iter().zip(&docs) {
            assert_eq!(r.kind, kind, "{}: every document is a {kind}", path.display());
            // A Secret's content is at the top level (it has no spec).
            if kind == Kind::Secret {
                compare(&r.spec.to_json(), &doc.value, &FieldPath(Vec::new()), &mut set, &mut missing);
                continue;
            }
            let spec = FieldPath(vec![Segment::Key("spec".into())]);
            compare(&r.spec.to_json(), &doc.value["spec"], &spec, &mut set, &mut missing);
        }
        unset.extend(missing.iter().filter(|m| !covered(m, &set)).map(|p| format!("{kind} {p}")));
    }
    assert!(
        unset.is_empty(),
        "fields no maximal resource in tests/data/fields sets (add them there), or invalid files:\n{}",
        unset.join("\n")
    );
}
