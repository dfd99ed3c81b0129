//! The read gate of [`UpstreamStream`]: after a `Pending`, the transport is read again
//! only once its own waker fired.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;

use crate::cluster::{Connector, UpstreamStream};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A waker counting its wake-ups.
struct Count(AtomicUsize);

impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A plain upstream connection and the server's end of it.
async fn connected() -> (UpstreamStream, tokio::net::TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (up, peer) = tokio::join!(Connector::Plain.connect(addr, TIMEOUT), listener.accept());
    (up.unwrap(), peer.unwrap().0)
}

/// Reads polled without a wake-up of the transport's own do not go down to it; the
/// transport's wake-up (the socket became readable) reaches the reading task, and the
/// next read returns the bytes.
#[tokio::test]
async fn an_upstream_read_after_pending_waits_for_the_transports_own_wake_up() {
    let (mut up, mut peer) = connected().await;
    let count = Arc::new(Count(AtomicUsize::new(0)));
    let task = Waker::from(count.clone());
    let mut cx = Context::from_waker(&task);
    let mut bytes = [0u8; 16];
    for _ in 0..3 {
        assert!(Pin::new(&mut up).poll_read(&mut cx, &mut ReadBuf::new(&mut bytes)).is_pending());
    }
    assert_eq!(up.transport_reads(), 1, "read the transport again without its wake-up");
    peer.write_all(b"HTTP/1.1").await.unwrap();
    tokio::time::timeout(TIMEOUT, async {
        while count.0.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the socket's readiness wakes the reading task");
    let mut buf = ReadBuf::new(&mut bytes);
    assert!(matches!(Pin::new(&mut up).poll_read(&mut cx, &mut buf), Poll::Ready(Ok(()))));
    assert_eq!(buf.filled(), b"HTTP/1.1");
    assert_eq!(up.transport_reads(), 2);
}

/// Reads that return data do not hold the next read back, and the end of the stream
/// reaches the reader.
#[tokio::test]
async fn upstream_reads_that_return_data_go_straight_through() {
    use tokio::io::AsyncReadExt;
    let (mut up, mut peer) = connected().await;
    peer.write_all(b"abc").await.unwrap();
    drop(peer);
    let mut got = Vec::new();
    tokio::time::timeout(TIMEOUT, up.read_to_end(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, b"abc");
}
