use super::*;

fn bad_heads(chunks: &[&[u8]]) -> Option<u32> {
    let mut scan = Scan::new_head(0);
    chunks.iter().find_map(|c| scan.feed(c))
}

#[test]
fn crlf_heads_pass_and_bare_lf_is_found() {
    assert_eq!(bad_heads(&[b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]), None);
    assert_eq!(bad_heads(&[b"GET / HTTP/1.1\nHost: x\n\n"]), Some(0));
    assert_eq!(bad_heads(&[b"GET / HTTP/1.1\r\nHost: x\n\r\n"]), Some(0));
    // Split anywhere, even between CR and LF.
    assert_eq!(bad_heads(&[b"GET / HTTP/1.1\r", b"\nHost: x\r\n\r", b"\n"]), None);
}

#[test]
fn pipelined_heads_are_counted_past_bodies() {
    let two = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\na\nb\ncGET /b HTTP/1.1\nHost: x\n\n";
    assert_eq!(bad_heads(&[two]), Some(1));
    let chunked: &[u8] =
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\na\nb\r\n0\r\nT: v\r\n\r\nGET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\n\n";
    assert_eq!(bad_heads(&[chunked]), Some(2));
    for split in 1..chunked.len() {
        assert_eq!(bad_heads(&[&chunked[..split], &chunked[split..]]), Some(2), "split at {split}");
    }
    // Leading empty lines between requests are allowed.
    assert_eq!(bad_heads(&[b"GET / HTTP/1.1\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n"]), None);
}

#[test]
fn what_the_scan_cannot_follow_turns_it_off() {
    // HTTP/2 prior knowledge, upgrades and CONNECT carry other bytes afterwards.
    assert_eq!(bad_heads(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\n\n\x00\x00"]), None);
    assert_eq!(bad_heads(&[b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n\n\n"]), None);
    assert_eq!(bad_heads(&[b"CONNECT a:1 HTTP/1.1\r\n\r\n\n\n"]), None);
    // Conflicting framing is hyper's to refuse.
    assert_eq!(bad_heads(&[b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx\n\n"]), None);
    assert_eq!(bad_heads(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n\n\n"]), None);
}

#[test]
fn admit_refuses_the_bad_request_and_all_after_it() {
    let check = HeadCheck::default();
    check.bad_from.store(1, Ordering::Release);
    assert!(check.admit());
    assert!(!check.admit());
    assert!(!check.admit());
}

#[test]
fn runs_stop_at_the_first_cr_or_lf_at_any_offset() {
    for len in 0..40 {
        for at in 0..=len {
            for stop in [b'\r', b'\n'] {
                let mut bytes = vec![b'a'; len];
                if at < len {
                    bytes[at] = stop;
                }
                assert_eq!(line_run(&bytes), at, "len {len}, {stop} at {at}");
            }
        }
    }
    // Bytes next to CR and LF in value (0x0b, 0x0c, 0x0e, 0x8a, 0x8d) are ordinary.
    assert_eq!(line_run(b"\x0b\x0c\x0e\x8a\x8d\x09\x00\xffabcdefgh\r"), 16);
}

#[test]
fn a_bare_lf_after_a_long_value_is_found_in_any_split() {
    let value = "A".repeat(500);
    let good = format!("GET / HTTP/1.1\r\nx-envoy-peer-metadata: {value}\r\nHost: x\r\n\r\n");
    let bad = format!("GET / HTTP/1.1\r\nx-envoy-peer-metadata: {value}\nHost: x\r\n\r\n");
    let cr_inside = format!("GET / HTTP/1.1\r\nx-a: {value}\r{value}\nHost: x\r\n\r\n");
    for split in [1, 7, 8, 9, 17, 33, 200, 520, 540] {
        for (head, want) in [(&good, None), (&bad, Some(0)), (&cr_inside, Some(0))] {
            let b = head.as_bytes();
            assert_eq!(bad_heads(&[&b[..split], &b[split..]]), want, "split at {split}: {head:.40}");
        }
    }
}
