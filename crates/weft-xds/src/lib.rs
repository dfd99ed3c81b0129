//! xDS transport shared by the proxy and the control plane: ADS client and server,
//! type URLs, versions, nonces, ACK/NACK, delta bookkeeping, reconnect with backoff.
