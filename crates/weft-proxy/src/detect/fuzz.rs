//! Property tests (fuzzing on stable, bounded to run in `cargo test`): `classify` never
//! panics on any prefix, and TLS, HTTP/2 and HTTP/1 prefixes are told apart right, on
//! every prefix length.

use proptest::prelude::*;

use super::{classify, Verdict, H2_PREFACE, METHODS};

fn config() -> ProptestConfig {
    // `PROPTEST_CASES` raises the count for a longer local run.
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// A TLS record holding a ClientHello, with SNI `name` when given.
fn client_hello(name: Option<&str>, extra_ext: &[u8]) -> Vec<u8> {
    let mut exts = Vec::new();
    if let Some(name) = name {
        let name = name.as_bytes();
        let mut sni = Vec::new();
        sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        exts.extend_from_slice(&[0, 0]);
        exts.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        exts.extend_from_slice(&sni);
    }
    exts.extend_from_slice(&[0xfe, 0xfe]);
    exts.extend_from_slice(&(extra_ext.len() as u16).to_be_bytes());
    exts.extend_from_slice(extra_ext);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn is_http1(v: &Verdict, version: &str) -> bool {
    matches!(v, Verdict::Done(d) if d.transport == "raw_buffer" && d.application == [version])
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes_classify_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
        let _ = classify(&bytes);
    }

    #[test]
    fn anything_after_a_tls_record_header_never_panics(rest in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut b = vec![0x16, 3, 1];
        b.extend_from_slice(&rest);
        let v = classify(&b);
        prop_assert!(matches!(&v, Verdict::NeedMore) || matches!(&v, Verdict::Done(d) if d.transport == "tls"), "{v:?}");
    }

    #[test]
    fn a_client_hello_is_tls_with_its_sni_and_its_prefixes_need_more(
        name in "[a-z0-9]{1,20}(\\.[a-z0-9]{1,20}){0,3}",
        with_sni in any::<bool>(),
        extra in proptest::collection::vec(any::<u8>(), 0..200),
        cut in any::<prop::sample::Index>(),
    ) {
        let rec = client_hello(with_sni.then_some(name.as_str()), &extra);
        match classify(&rec) {
            Verdict::Done(d) => {
                prop_assert_eq!(d.transport, "tls");
                prop_assert_eq!(d.server_name, with_sni.then_some(name));
            }
            v => prop_assert!(false, "{v:?}"),
        }
        let cut = cut.index(rec.len());
        prop_assert_eq!(classify(&rec[..cut]), Verdict::NeedMore, "prefix of {} bytes", cut);
    }

    #[test]
    fn an_http1_request_line_is_http1_and_its_prefixes_need_more(
        method in prop::sample::select(METHODS.iter().copied().filter(|m| *m != "PRI").collect::<Vec<_>>()),
        target in "/[!-~]{0,40}",
        version in prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0"]),
        rest in proptest::collection::vec(any::<u8>(), 0..64),
        cut in any::<prop::sample::Index>(),
    ) {
        let line = format!("{method} {target} {version}\r\n");
        let mut req = line.clone().into_bytes();
        req.extend_from_slice(&rest);
        let v = classify(&req);
        prop_assert!(is_http1(&v, if version == "HTTP/1.1" { "http/1.1" } else { "http/1.0" }), "{v:?}");
        let cut = cut.index(line.len() - 1);
        prop_assert_eq!(classify(&line.as_bytes()[..cut]), Verdict::NeedMore, "prefix {:?}", &line[..cut]);
    }

    #[test]
    fn the_h2_preface_is_h2c_and_its_prefixes_need_more(
        rest in proptest::collection::vec(any::<u8>(), 0..64),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut b = H2_PREFACE.to_vec();
        b.extend_from_slice(&rest);
        let v = classify(&b);
        prop_assert!(matches!(&v, Verdict::Done(d) if d.application == ["h2c"]), "{v:?}");
        prop_assert_eq!(classify(&H2_PREFACE[..cut.index(H2_PREFACE.len())]), Verdict::NeedMore);
    }
}
