//! The WebSocket transport: a thin [`Transport`] over an upgraded axum socket. Everything the
//! protocol decides (frames, subscriptions, replay, limits) is the [`Session`]'s; this file only
//! moves text frames, pings and the close handshake, each write bounded by `ws.write_timeout`.
//!
//! The upgrade itself (query validation, refusals before the upgrade) is in
//! `http::realtime`; frames and close codes are documented in `docs/protocol.md`.

use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;

use crate::{
    access_log::{AccessContext, AccessLog, EntryKind, SessionStats},
    config::WsSettings,
    core::Frames,
    protocol::QuerySubscription,
    session::{End, Inbound, Session, Transport, close_code},
};

/// An upgraded WebSocket connection.
pub struct WsTransport {
    socket: WebSocket,
    write_timeout: Duration,
    idle_timeout: Duration,
    last_seen: Instant,
}

impl WsTransport {
    pub fn new(socket: WebSocket, settings: &WsSettings) -> Self {
        Self {
            socket,
            write_timeout: settings.write_timeout,
            idle_timeout: settings.idle_timeout,
            last_seen: Instant::now(),
        }
    }
}

/// A write bounded by `timeout`: a client that accepts no bytes that long is a slow consumer.
async fn bounded(
    timeout: Duration,
    write: impl Future<Output = Result<(), axum::Error>>,
) -> Result<(), End> {
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Gone),
        Err(_) => Err(End::Close(close_code::SLOW_CONSUMER, "write timeout")),
    }
}

impl Transport for WsTransport {
    async fn send(&mut self, frames: &mut Frames) -> Result<(), End> {
        let timeout = self.write_timeout;
        for frame in frames.drain(..) {
            bounded(timeout, self.socket.feed(Message::Text(frame.text))).await?;
        }
        bounded(timeout, self.socket.flush()).await
    }

    async fn recv(&mut self) -> Inbound {
        let incoming = self.socket.recv().await;
        self.last_seen = Instant::now();
        match incoming {
            None => Inbound::End(End::Gone),
            Some(Err(err)) => Inbound::End(read_error(err)),
            Some(Ok(Message::Text(text))) => Inbound::Text(text),
            Some(Ok(Message::Binary(_))) => Inbound::Unsupported,
            // tungstenite answers pings itself (the pong goes out with the next read or write).
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Inbound::Alive,
            // The client closed: tungstenite queued the close reply. Send it now, since nothing
            // else may be written after a close (a frame of the outbox would fail and drop the
            // connection without the reply), and end the session.
            Some(Ok(Message::Close(_))) => {
                let _ = bounded(self.write_timeout, self.socket.flush()).await;
                Inbound::End(End::Gone)
            }
        }
    }

    async fn keepalive(&mut self) -> Result<(), End> {
        if self.last_seen.elapsed() >= self.idle_timeout {
            return Err(End::Close(close_code::IDLE_TIMEOUT, "idle timeout"));
        }
        let ping = self.socket.send(Message::Ping(Default::default()));
        bounded(self.write_timeout, ping).await
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        // The client may not be reading; do not let the goodbye hang the task.
        let close = self.socket.send(Message::Close(Some(frame)));
        let _ = bounded(self.write_timeout, close).await;
    }
}

/// Run one WebSocket session to its end: subscribe the channels of the query, serve, and
/// write the session's access-log entry.
pub async fn serve(
    mut session: Session,
    mut transport: WsTransport,
    initial: Vec<QuerySubscription>,
    access: Option<(AccessContext, AccessLog)>,
) {
    let started = Instant::now();
    metrics::gauge!("relay_ws_connections").increment(1.0);
    for sub in &initial {
        Box::pin(session.subscribe(&sub.channel, sub.since)).await;
    }
    let report = session.run(&mut transport).await;
    drop(session);
    if report.close_code == Some(close_code::SLOW_CONSUMER) {
        metrics::counter!("relay_ws_slow_consumer_closes_total").increment(1);
    }
    metrics::gauge!("relay_ws_connections").decrement(1.0);
    if let Some((access, log)) = access {
        let traffic = report.traffic;
        let stats = SessionStats {
            frames_in: traffic.frames_in,
            frames_out: traffic.frames_out,
            channels: traffic.channels,
            close_code: report.close_code,
        };
        let mut entry = access.entry(
            EntryKind::Websocket,
            101,
            (traffic.bytes_in, traffic.bytes_out),
            Some(stats),
        );
        entry.subject = report.subject;
        log.record(entry);
    }
    tracing::debug!(
        close_code = report.close_code,
        duration_ms = started.elapsed().as_millis() as u64,
        "WebSocket session ended"
    );
}

/// How a failed read ends the session. A client that broke the rules is told which one with
/// the RFC 6455 close code (tungstenite still writes after a read error); a connection that is
/// simply gone gets nothing.
fn read_error(err: axum::Error) -> End {
    use tungstenite::{Error, error::ProtocolError};
    match err.into_inner().downcast_ref::<Error>() {
        Some(Error::Capacity(_)) => End::Close(close_code::TOO_BIG, "message too big"),
        Some(Error::Utf8(_)) => End::Close(close_code::INVALID_PAYLOAD, "text frame is not UTF-8"),
        // The peer vanished mid-frame: nobody left to tell.
        Some(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => End::Gone,
        Some(Error::Protocol(_)) => End::Close(close_code::PROTOCOL_ERROR, "protocol error"),
        _ => End::Gone,
    }
}
