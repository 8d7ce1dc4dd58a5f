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
    /// The `101` answer, and the socket once hyper has sent it.
    pub fn accept(self) -> (Response, impl Future<Output = Option<Upgraded>> + Send) {
        let mut response = Response::new(axum::body::Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept);
        let on_upgrade = self.on_upgrade;
        let upgraded = async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(err) => {
                    tracing::debug!(%err, "WebSocket upgrade failed");
                    return None;
                }
            };
            match hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<TcpStream>>(upgraded)
            {
                Ok(parts) => Some(Upgraded {
                    stream: parts.io.into_inner(),
                    early: parts.read_buf,
                }),
                Err(_) => {
                    // Only possible if the router is served by something other than
                    // `http::serve` (which always hands hyper a plain `TcpStream`).
                    tracing::error!("WebSocket upgrade on a connection that is not a TcpStream");
                    None
                }
            }
        };
        (response, upgraded)
    }
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
}
