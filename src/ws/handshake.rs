//! The WebSocket opening handshake (RFC 6455 §4.2) on relay's own HTTP server: check the upgrade
//! request, answer `101 Switching Protocols`, and hand over the raw TCP socket.
//!
//! relay takes the socket itself (rather than a library's WebSocket type) so that its framing
//! and its writes are its own (see [`super::codec`] and [`super::writer`]). The socket is the
//! `TcpStream` that `http::serve` accepted: hyper keeps it behind a type-erased upgrade, and
//! `hyper_util`'s `downcast` gives it back with whatever the client sent after its request.

use axum::{
    http::{Extensions, HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
};
use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a request is not a WebSocket upgrade relay accepts.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// `Connection: Upgrade` or `Upgrade: websocket` is missing: not an upgrade at all.
    #[error("not a WebSocket upgrade request")]
    NotAnUpgrade,
    #[error("unsupported WebSocket version")]
    Version,
    #[error("`Sec-WebSocket-Key` header missing")]
    KeyMissing,
    /// The connection cannot be upgraded (HTTP/2 without extended CONNECT, say).
    #[error("this connection cannot be upgraded")]
    NotUpgradable,
}

/// A valid upgrade request, ready to be answered.
pub struct Upgrade {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// The socket after the handshake, and the bytes the client sent after its request.
pub struct Upgraded {
    pub stream: TcpStream,
    pub early: Bytes,
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl Upgrade {
    /// Check the request's upgrade headers and take its upgrade handle.
    pub fn from_request(
        headers: &HeaderMap,
        extensions: &mut Extensions,
    ) -> Result<Self, HandshakeError> {
        if !has_token(headers, header::CONNECTION, "upgrade")
            || !has_token(headers, header::UPGRADE, "websocket")
        {
            return Err(HandshakeError::NotAnUpgrade);
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v != "13")
        {
            return Err(HandshakeError::Version);
        }
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(HandshakeError::KeyMissing)?;
        let accept = HeaderValue::try_from(accept_key(key.as_bytes()))
            .map_err(|_| HandshakeError::KeyMissing)?;
        let on_upgrade = extensions
            .remove::<OnUpgrade>()
            .ok_or(HandshakeError::NotUpgradable)?;
        Ok(Self { accept, on_upgrade })
    }
}

/// `Sec-WebSocket-Accept` for `key`: base64 of the SHA-1 of the key and the protocol's GUID.
fn accept_key(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let digest = Sha1::new().chain_update(key).chain_update(GUID).finalize();
    base64::engine::general_purpose::STANDARD.encode(digest)
}

impl Upgrade {
    /// The `101` answer, and the handle to the socket once hyper has sent it.
    pub fn accept(self) -> (Response, PendingUpgrade) {
        let mut response = Response::new(axum::body::Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept);
        (response, PendingUpgrade(self.on_upgrade))
    }
}

/// The socket of an answered upgrade, not handed over yet.
///
/// A small handle rather than a future: the session task keeps its arguments for its whole
/// life, and the hand-over's future is only needed until it completes.
pub struct PendingUpgrade(OnUpgrade);

impl PendingUpgrade {
    /// Wait until hyper has sent the `101`, and take the socket.
    pub async fn finish(self) -> Option<Upgraded> {
        let upgraded = match self.0.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                tracing::debug!(%err, "WebSocket upgrade failed");
                return None;
            }
        };
        match hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<TcpStream>>(upgraded) {
            Ok(parts) => {
                let stream = parts.io.into_inner();
                forget_hyper_wakers(&stream);
                Some(Upgraded {
                    stream,
                    early: parts.read_buf,
                })
            }
            Err(_) => {
                // Only possible if the router is served by something other than `http::serve`
                // (which always hands hyper a plain `TcpStream`).
                tracing::error!("WebSocket upgrade on a connection that is not a TcpStream");
                None
            }
        }
    }
}

/// Drop the wakers hyper's connection task left in the socket's readiness slots.
///
/// hyper waited for the client's next request with `poll_read`, which parks its task's waker in
/// the socket's read slot, and that waker keeps the finished task's whole cell (about 3.7 KiB)
/// allocated until something replaces it. A session that waited with `readable()` (a waiter of
/// its own, never that slot) left it there for the life of an idle WebSocket. The session reads
/// with `poll_read` now, but the hand-over does not rely on it: polling both directions once with
/// a no-op waker swaps the old one out. If the socket is ready instead, the readiness event that
/// made it ready has already taken and dropped the old waker.
fn forget_hyper_wakers(stream: &TcpStream) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let _ = stream.poll_read_ready(&mut cx);
    let _ = stream.poll_write_ready(&mut cx);
}

#[cfg(test)]
mod tests {
    /// The example of RFC 6455 §1.3.
    #[test]
    fn accept_key_of_the_rfc() {
        assert_eq!(
            super::accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    /// A waker parked by `poll_read` (as hyper's connection task does) is released: its task's
    /// memory is not kept alive by an idle socket.
    #[tokio::test]
    async fn hyper_waker_is_released() {
        use std::{
            sync::Arc,
            task::{Context, Wake, Waker},
        };
        use tokio::io::{AsyncRead, ReadBuf};

        struct Counted;
        impl Wake for Counted {
            fn wake(self: Arc<Self>) {}
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let task = Arc::new(Counted);
        let waker = Waker::from(Arc::clone(&task));
        let mut byte = [0u8; 1];
        let parked = std::pin::Pin::new(&mut server).poll_read(
            &mut Context::from_waker(&waker),
            &mut ReadBuf::new(&mut byte),
        );
        assert!(parked.is_pending(), "nothing was sent yet");
        drop(waker);
        assert_eq!(Arc::strong_count(&task), 2, "the socket holds the waker");

        super::forget_hyper_wakers(&server);
        assert_eq!(Arc::strong_count(&task), 1, "the socket let go of it");
        drop(client);
    }
}
