use super::*;

fn round_trip(text: &str) -> String {
    let node = parse_document(text).unwrap().unwrap();
    emit(&node)
}

#[test]
fn plain_scalars_resolve_with_yaml_1_1_rules_like_kubernetes() {
    assert_eq!(resolve_plain("0644"), Resolved::Int(0o644));
    assert_eq!(resolve_plain("0x1F"), Resolved::Int(31));
    assert_eq!(resolve_plain("0b101"), Resolved::Int(5));
    assert_eq!(resolve_plain("12_000"), Resolved::Int(12000));
    assert_eq!(resolve_plain("-7"), Resolved::Int(-7));
    assert_eq!(resolve_plain("yes"), Resolved::Bool(true));
    assert_eq!(resolve_plain("Off"), Resolved::Bool(false));
    assert_eq!(resolve_plain("~"), Resolved::Null);
    assert_eq!(resolve_plain("1.5e3"), Resolved::Float(1500.0));
    assert_eq!(resolve_plain("08"), Resolved::Float(8.0), "not octal, so Go falls back to a float");
    assert_eq!(resolve_plain("100m"), Resolved::Str("100m"));
    assert_eq!(resolve_plain("2024-01-01"), Resolved::Str("2024-01-01"));
    assert_eq!(resolve_plain("v1.2"), Resolved::Str("v1.2"));
}

#[test]
fn source_scalars_print_back_with_their_own_text_and_style() {
    let text = "a: 0644\nb: yes\nc: '0644'\nd: \"yes\"\ne: 'it''s'\nf: |\n  line one\n  line two\ng: >-\n  folded\n  text\nh:\ni: 1.0\n\"quoted key\": x\n";
    let out = round_trip(text);
    assert_eq!(
        out,
        "a: 0644\nb: yes\nc: '0644'\nd: \"yes\"\ne: 'it''s'\nf: |\n  line one\n  line two\ng: folded text\nh:\ni: 1.0\n\"quoted key\": x\n"
    );
}

#[test]
fn created_strings_are_quoted_when_a_reader_could_take_them_for_something_else() {
    let mut m = Map::new();
    for (i, s) in [
        "yes",
        "on",
        "y",
        "0644",
        "1e3",
        "*",
        "",
        "a: b",
        "x #y",
        "100m",
        "128Mi",
        "--proxy-uid",
        "$(POD_NAME)",
        "2024-01-01",
        "1:20",
        "null",
        "'q'",
    ]
    .iter()
    .enumerate()
    {
        m.insert(&format!("k{i}"), Node::str(*s));
    }
    let out = emit(&Node::Map(m.clone()));
    assert!(out.contains("k0: 'yes'\n") && out.contains("k1: 'on'\n") && out.contains("k2: 'y'\n"), "{out}");
    assert!(out.contains("k3: '0644'\n") && out.contains("k4: '1e3'\n") && out.contains("k5: '*'\n"), "{out}");
    assert!(out.contains("k6: ''\n") && out.contains("k7: 'a: b'\n") && out.contains("k8: 'x #y'\n"), "{out}");
    assert!(out.contains("k9: 100m\n") && out.contains("k10: 128Mi\n") && out.contains("k11: --proxy-uid\n"), "{out}");
    assert!(out.contains("k12: $(POD_NAME)\n") && out.contains("k13: '2024-01-01'\n"), "{out}");
    assert!(out.contains("k14: '1:20'\n") && out.contains("k15: 'null'\n") && out.contains("k16: '''q'''\n"), "{out}");
    // And every one reads back as the same string.
    let back = parse_document(&out).unwrap().unwrap();
    let back = back.as_map().unwrap();
    for (k, v) in m.iter() {
        let got = back.get(&k.text).unwrap().as_scalar().unwrap();
        assert_eq!(got.resolve(), v.as_scalar().unwrap().resolve(), "{}", k.text);
    }
}

#[test]
fn multi_line_strings_print_as_literal_blocks_that_read_back_exactly() {
    for s in [
        "a\nb\n",
        "a\nb",
        "a\n\nb\n\n\n",
        "first\n  indented\n\ttab\n",
        " leading\nspace",
        "\nnewline first",
        "crlf\r\n",
    ] {
        let mut m = Map::new();
        m.insert("v", Node::str(s));
        let seq = Node::Seq(vec![Node::str(s), Node::Map(m.clone())]);
        let mut top = Map::new();
        top.insert("list", seq);
        top.insert("v", Node::str(s));
        let out = emit(&Node::Map(top));
        let back = parse_document(&out).unwrap().unwrap();
        let back = back.as_map().unwrap();
        assert_eq!(back.get("v").unwrap().text(), Some(s), "{out}");
        let list = back.get("list").unwrap().as_seq().unwrap();
        assert_eq!(list[0].text(), Some(s), "{out}");
        assert_eq!(list[1].as_map().unwrap().get("v").unwrap().text(), Some(s), "{out}");
    }
}

#[test]
fn nested_collections_print_in_kubectl_style_and_read_back() {
    let text = "spec:\n  containers:\n  - name: a\n    ports:\n    - containerPort: 80\n    args: []\n  - - x\n    - y\n  - {}\n  empty: {}\nlist:\n- 1\n- [a, b]\n";
    let out = round_trip(text);
    assert_eq!(
        out,
        "spec:\n  containers:\n  - name: a\n    ports:\n    - containerPort: 80\n    args: []\n  - - x\n    - y\n  - {}\n  empty: {}\nlist:\n- 1\n- - a\n  - b\n"
    );
    assert_eq!(parse_document(&out).unwrap(), parse_document(text).unwrap());
}

#[test]
fn json_round_trip_keeps_types() {
    let v = serde_json::json!({"a": "yes", "b": 1, "c": 1.5, "d": true, "e": null, "f": ["0644", 8], "g": {}});
    assert_eq!(Node::from_json(&v).to_json().unwrap(), v);
    let yaml = parse_document("a: 0644\nb: yes\nc: '1'\nd: ~\n").unwrap().unwrap();
    assert_eq!(yaml.to_json().unwrap(), serde_json::json!({"a": 420, "b": true, "c": "1", "d": null}));
}

#[test]
fn bad_yaml_reports_its_line_and_hostile_yaml_is_refused() {
    let e = parse_document("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
    assert!(e.line >= 1, "{e:?}");
    let e = parse_document("a: 1\na: 2\n").unwrap_err();
    assert_eq!(e.line, 1);
    assert!(e.message.contains("duplicate key `a`"), "{e:?}");
    let bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\n";
    assert!(parse_document(bomb).unwrap_err().message.contains("nodes"));
    let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    assert!(parse_document(&deep).unwrap_err().message.contains("nesting"));
}
