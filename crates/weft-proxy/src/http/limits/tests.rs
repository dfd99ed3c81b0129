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

/// Feeds `bytes` in three reads split at every pair of offsets (and byte by byte) and
/// checks each gives `want`: lines read in place and lines kept across reads must agree.
fn assert_any_split(bytes: &[u8], want: Option<u32>) {
    let one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(bad_heads(&one_by_one), want, "byte by byte");
    for i in 0..=bytes.len() {
        for j in i..=bytes.len() {
            assert_eq!(bad_heads(&[&bytes[..i], &bytes[i..j], &bytes[j..]]), want, "split at {i}, {j}");
        }
    }
}

#[test]
fn framing_headers_are_read_whatever_the_reads_split() {
    // Content-Length frames a body whose CRLF lines would end a head of their own if it
    // were missed: the bare LF is then in head 2, not 1.
    let framed: &[u8] =
        b"POST /a HTTP/1.1\r\nHost: x\r\ncontent-LENGTH: 8\r\n\r\nAAAA\r\n\r\nGET /b HTTP/1.1\nHost: x\n\n";
    assert_any_split(framed, Some(1));
    // A CR ending one read and its LF starting the next, inside and at the end of a head.
    assert_eq!(
        bad_heads(&[b"POST /a HTTP/1.1\r", b"\nContent-Length: 8\r", b"\n\r", b"\nAAAA\r\n\r\nGET /b\n\n"]),
        Some(1)
    );
    // A CR inside a line keeps it one line, read (and framed) the same however split.
    let cr_inside: &[u8] =
        b"POST /a HTTP/1.1\r\nx-a: b\rc\r\nContent-Length: 8\r\n\r\nAAAA\r\n\r\nGET /b HTTP/1.1\nHost: x\n\n";
    assert_any_split(cr_inside, Some(1));
    // Upgrade (the whole name, not its first byte) stops the scan.
    assert_any_split(b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n\n\n", None);
    assert_any_split(b"GET / HTTP/1.1\r\nUpgrades: h2c\r\n\r\n\n\n", Some(1));
    // A framing header too long to read turns the scan off; another long line does not.
    let pad = " ".repeat(60);
    let long_cl = format!("POST /a HTTP/1.1\r\nContent-Length:{pad}8\r\n\r\nAAAA\r\n\r\nGET /b\n\n");
    assert_any_split(long_cl.as_bytes(), None);
    let long_other =
        format!("POST /a HTTP/1.1\r\nContent-Type:{pad}x\r\nContent-Length: 8\r\n\r\nAAAA\r\n\r\nGET /b\n\n");
    assert_any_split(long_other.as_bytes(), Some(1));
}
