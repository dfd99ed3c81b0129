//! tcp-echo: Istio's `samples/tcp-echo` server. Every line a client sends comes back as
//! `<prefix> <line>` (the TCP traffic shifting task tells v1 from v2 by the prefixes
//! `one` and `two`); each connection is logged on stdout.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;
use tracing::debug;

/// The longest line echoed; a longer one ends the connection.
const MAX_LINE: u64 = 64 * 1024;

/// Serves `listener` until the process ends.
pub async fn serve(listener: TcpListener, prefix: &str) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            super::access_log(&format!("connection from {peer}"));
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = match AsyncReadExt::take(&mut lines, MAX_LINE).read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let reply = [prefix.as_bytes(), b" ", &line[..n]].concat();
                super::access_log(&format!("request: {}", String::from_utf8_lossy(&line).trim_end()));
                if write.write_all(&reply).await.is_err() || line.last() != Some(&b'\n') {
                    break;
                }
            }
        });
    }
}
