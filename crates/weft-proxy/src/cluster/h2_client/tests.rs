//! The client's own pieces against bare h2 peers: the body pipe, the request id's HPACK
//! name, the content-length rule.

use super::*;

fn lengths(values: &[&'static str]) -> Option<u64> {
    let mut h = HeaderMap::new();
    for v in values {
        h.append(CONTENT_LENGTH, HeaderValue::from_static(v));
    }
    content_length(&h)
}

/// The last frame of a body is handed to h2 at once: the pipe finishes while the
/// peer's window is still closed, and h2 sends the data once the peer opens it.
#[tokio::test]
async fn a_bodys_last_frame_does_not_wait_for_send_window() {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let mut conn = h2::server::handshake(server_io).await.expect("server handshake");
        let (_req, mut respond) = conn.accept().await.expect("a request").expect("accepted");
        let tx = respond.send_response(Response::new(()), false).expect("response head");
        let mut pipe = Pipe::new(crate::http::body::full(&b"0123456789"[..]), tx, "test body failed");
        let finished = poll_fn(|cx| Poll::Ready(Pin::new(&mut pipe).poll(cx).is_ready())).await;
        tokio::spawn(async move { poll_fn(|cx| conn.poll_closed(cx)).await });
        finished
    });
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(0);
    let (mut sender, mut conn) = builder.handshake::<_, Bytes>(client_io).await.expect("client handshake");
    let (open, mut opened) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut open_once = Some(&mut opened);
        poll_fn(|cx| {
            if let Some(rx) = open_once.as_mut() {
                if Pin::new(&mut **rx).poll(cx).is_ready() {
                    open_once = None;
                    conn.set_initial_window_size(65_535).expect("window setting");
                }
            }
            Pin::new(&mut conn).poll(cx)
        })
        .await
    });
    let (response, _) = sender.send_request(Request::new(()), true).expect("request sent");
    let mut body = response.await.expect("response head").into_body();
    assert!(server.await.expect("server task"), "the pipe finished with the window closed");
    open.send(()).expect("client connection running");
    let data = body.data().await.expect("a data frame").expect("data");
    assert_eq!(&data[..], b"0123456789");
}

/// Sends three GETs carrying sensitive request ids (as `http::forward` marks them)
/// through `send` (over an [`H2Sender`]) or, for `through_sender == false`, straight
/// through h2's handle; returns the HEADERS blocks' sizes as written, in order, and
/// the ids the peer received.
async fn three_requests(through_sender: bool) -> (Vec<usize>, Vec<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (client_io, tap_in) = tokio::io::duplex(64 * 1024);
    let (tap_out, server_io) = tokio::io::duplex(64 * 1024);
    let wire = Arc::new(std::sync::Mutex::new(Vec::new()));
    // The tap: client to server recorded, server to client passed through.
    let (mut in_read, mut in_write) = tokio::io::split(tap_in);
    let (mut out_read, mut out_write) = tokio::io::split(tap_out);
    let record = wire.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = in_read.read(&mut buf).await {
            record.lock().expect("wire").extend_from_slice(&buf[..n]);
            if out_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move { tokio::io::copy(&mut out_read, &mut in_write).await });
    let server = tokio::spawn(async move {
        let mut conn = h2::server::handshake(server_io).await.expect("server handshake");
        let mut ids = Vec::new();
        for _ in 0..3 {
            let (req, mut respond) = conn.accept().await.expect("a request").expect("accepted");
            ids.push(req.headers()[X_REQUEST_ID].to_str().expect("ascii").to_owned());
            respond.send_response(Response::new(()), true).expect("response");
        }
        tokio::spawn(async move { poll_fn(|cx| conn.poll_closed(cx)).await });
        ids
    });
    let (tx, conn) = h2::client::handshake(client_io).await.expect("client handshake");
    tokio::spawn(conn);
    let addr: SocketAddr = ([127, 0, 0, 1], 80).into();
    let sender = H2Sender::new(tx);
    for n in 0..3 {
        let mut id = HeaderValue::from_str(&format!("0f6c3d52-9e0b-4c3e-8d7a-5b1e2f00000{n}")).expect("id");
        id.set_sensitive(true);
        let req = Request::get("http://upstream.test/").header(X_REQUEST_ID, id).body(()).expect("request");
        if through_sender {
            let req = req.map(|()| crate::http::body::full(Bytes::new()));
            let tx = sender.clone().ready().await.expect("ready");
            send(tx, addr, req, true).await.expect("response");
        } else {
            let mut tx = sender.tx.clone().ready().await.expect("ready");
            let (response, _) = tx.send_request(req, true).expect("sent");
            response.await.expect("response");
        }
    }
    let ids = server.await.expect("server task");
    // The frames after the client preface: 9-byte heads, then payloads.
    let wire = wire.lock().expect("wire").clone();
    let mut frames = &wire[24..];
    let mut blocks = Vec::new();
    while frames.len() >= 9 {
        let len = usize::from(frames[0]) << 16 | usize::from(frames[1]) << 8 | usize::from(frames[2]);
        if frames.len() < 9 + len {
            break;
        }
        if frames[3] == 0x1 {
            blocks.push(len);
        }
        frames = &frames[9 + len..];
    }
    (blocks, ids)
}

/// The request id's name goes into the connection's HPACK table with the first
/// request; later ids, still never-indexed literals, name it by index (its Huffman
/// code, 9 bytes, is no longer sent), and the peer receives the same ids.
#[tokio::test]
async fn request_ids_after_the_first_name_their_header_by_index() {
    let (plain, plain_ids) = three_requests(false).await;
    let (sent, ids) = three_requests(true).await;
    assert_eq!(ids, plain_ids, "the same ids arrive");
    assert_eq!(plain.len(), 3);
    assert_eq!(sent.len(), 3);
    assert_eq!(plain[1], plain[2], "{plain:?}");
    assert!(sent[1] + 8 <= plain[1], "the second id names its header by index: {sent:?} against {plain:?}");
    assert_eq!(sent[1], sent[2], "{sent:?}");
}

#[test]
fn content_length_follows_hypers_rule() {
    assert_eq!(lengths(&[]), None);
    assert_eq!(lengths(&["42"]), Some(42));
    assert_eq!(lengths(&["42", "42"]), Some(42));
    assert_eq!(lengths(&["42, 42"]), Some(42));
    assert_eq!(lengths(&["42", "43"]), None);
    assert_eq!(lengths(&["42,43"]), None);
    assert_eq!(lengths(&["+42"]), None);
    assert_eq!(lengths(&[""]), None);
    assert_eq!(lengths(&["99999999999999999999"]), None);
}
