//! The downstream HTTP/2 server's own logic, against raw client bytes.

use super::*;

#[test]
fn connection_specific_headers_are_stripped_from_responses() {
    let mut h = HeaderMap::new();
    h.insert(CONNECTION, HeaderValue::from_static("close, x-hop"));
    h.insert("x-hop", HeaderValue::from_static("1"));
    h.insert(TE, HeaderValue::from_static("trailers"));
    h.insert("x-kept", HeaderValue::from_static("1"));
    strip_connection_headers(&mut h);
    assert_eq!(h.len(), 1);
    assert!(h.contains_key("x-kept"));
}

/// The client preface, an empty SETTINGS frame, then a GET's HEADERS (END_STREAM,
/// END_HEADERS) for each stream id of `streams`.
fn client_bytes(preface: bool, streams: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    if preface {
        b.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        b.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    }
    // :method GET, :scheme http, :path /, :authority "a" (a literal).
    let block = [0x82, 0x86, 0x84, 0x41, 0x01, b'a'];
    for &id in streams {
        b.extend_from_slice(&[0, 0, block.len() as u8, 0x1, 0x5, 0, 0, 0, id]);
        b.extend_from_slice(&block);
    }
    b
}

/// A stream counting its reads.
struct CountingIo {
    io: tokio::io::DuplexStream,
    reads: Arc<std::sync::atomic::AtomicUsize>,
}

impl AsyncRead for CountingIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Counts the streams opened; answers each at once with an empty 200 (`answer`), or
/// never (the stream waits, as on a slow upstream).
struct Answer {
    opened: Arc<std::sync::atomic::AtomicUsize>,
    answer: bool,
}

impl NewStream for Answer {
    fn open(&mut self, _: Request<RecvStream>, mut respond: SendResponse<Bytes>) -> StreamFuture {
        self.opened.fetch_add(1, Ordering::SeqCst);
        if !self.answer {
            return Box::pin(async move {
                std::future::pending::<()>().await;
                drop(respond);
            });
        }
        Box::pin(async move {
            respond.send_response(Response::new(()), true).expect("response");
        })
    }
}

type TestServer = Server<CountingIo, Answer>;

/// A server over a duplex (answering its streams: `answer`), its client end, and its
/// read and stream counts.
fn test_server(
    answer: bool,
) -> (TestServer, tokio::io::DuplexStream, Arc<std::sync::atomic::AtomicUsize>, Arc<std::sync::atomic::AtomicUsize>) {
    let (client, io) = tokio::io::duplex(64 * 1024);
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server =
        Server::new(CountingIo { io, reads: reads.clone() }, 16 * 1024, Answer { opened: opened.clone(), answer });
    (server, client, reads, opened)
}

/// Polls `server` until `n` streams were opened; returns the streams opened and the
/// reads made by the poll that got there.
async fn poll_until_opened(
    server: &mut TestServer,
    reads: &std::sync::atomic::AtomicUsize,
    opened: &std::sync::atomic::AtomicUsize,
    n: usize,
) -> (usize, usize) {
    poll_fn(|cx| {
        let before = reads.load(Ordering::SeqCst);
        assert!(Pin::new(&mut *server).poll(cx).is_pending(), "the connection stays open");
        let now = opened.load(Ordering::SeqCst);
        if now >= n {
            Poll::Ready((now, reads.load(Ordering::SeqCst) - before))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// A request read alone is accepted, answered and written out without a second
/// `poll_accept` just to learn that h2 holds no other stream: three reads (the
/// request, `Pending`, and the poll that writes the answer), not four.
#[tokio::test]
async fn a_request_read_alone_costs_no_second_poll_of_the_connection() {
    use tokio::io::AsyncWriteExt;
    let (mut server, mut client, reads, opened) = test_server(true);
    client.write_all(&client_bytes(true, &[1])).await.expect("write");
    assert_eq!(poll_until_opened(&mut server, &reads, &opened, 1).await.0, 1);
    client.write_all(&client_bytes(false, &[3])).await.expect("write");
    let (streams, reads_in_poll) = poll_until_opened(&mut server, &reads, &opened, 2).await;
    assert_eq!(streams, 2);
    assert_eq!(reads_in_poll, 3, "one read with the request, one to Pending, one in the poll that answers");
}

/// Requests that arrive together are all accepted in the poll that reads them, while
/// the first ones wait on their answers.
#[tokio::test]
async fn requests_read_together_are_all_accepted_at_once() {
    use tokio::io::AsyncWriteExt;
    let (mut server, mut client, reads, opened) = test_server(false);
    client.write_all(&client_bytes(true, &[1])).await.expect("write");
    assert_eq!(poll_until_opened(&mut server, &reads, &opened, 1).await.0, 1);
    client.write_all(&client_bytes(false, &[3, 5, 7])).await.expect("write");
    assert_eq!(poll_until_opened(&mut server, &reads, &opened, 2).await.0, 4, "all three in one poll");
}

/// Header blocks are counted where they end, however the bytes are split: a HEADERS
/// frame continued by a CONTINUATION is one block, DATA and SETTINGS are none.
#[test]
fn header_blocks_are_counted_across_reads() {
    let mut bytes = client_bytes(true, &[1]);
    // HEADERS without END_HEADERS, then its CONTINUATION with it.
    bytes.extend_from_slice(&[0, 0, 2, 0x1, 0x1, 0, 0, 0, 3, 0x82, 0x86]);
    bytes.extend_from_slice(&[0, 0, 1, 0x9, 0x4, 0, 0, 0, 3, 0x84]);
    // DATA with END_HEADERS's bit set (it means nothing there), then an empty HEADERS.
    bytes.extend_from_slice(&[0, 0, 3, 0x0, 0x4, 0, 0, 0, 3, 1, 2, 3]);
    bytes.extend_from_slice(&[0, 0, 0, 0x1, 0x4, 0, 0, 0, 5]);
    for chunk in [1, 2, 5, 9, 10, 64, bytes.len()] {
        let mut sniffed = Sniffed::new((), Arc::new(ReadTally::default()));
        for piece in bytes.chunks(chunk) {
            sniffed.follow(piece);
        }
        assert_eq!(sniffed.blocks, 3, "split every {chunk} bytes");
        assert_eq!(sniffed.payload_left + sniffed.head_len, 0);
    }
}

#[test]
fn the_date_is_an_http_date() {
    let v = date::now();
    assert!(httpdate::parse_http_date(v.to_str().unwrap()).is_ok(), "{v:?}");
}
