//! The WebSocket transport: a thin [`Transport`] over the raw upgraded TCP socket. Everything
//! the protocol decides (frames, subscriptions, replay, limits) is the [`Session`]'s; this module
//! only moves frames, pings and the close handshake, each write bounded by `ws.write_timeout`.
//!
//! * [`handshake`]: the upgrade request and the `101` answer (refusals before the upgrade are
//!   `http::realtime`'s);
//! * [`codec`]: the client's frames, and the server's control frames;
//! * [`writer`]: the write half, shared with the fan-out for direct writes.
//!
//! Frames and close codes are documented in `docs/protocol.md`.

pub mod codec;
pub mod handshake;
pub mod writer;

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::{Bytes, BytesMut};
use tokio::net::tcp::OwnedReadHalf;

use crate::{
    access_log::{AccessContext, AccessLog, EntryKind, SessionStats},
    config::Settings,
    core::Frames,
    protocol::QuerySubscription,
    session::{End, Inbound, Session, Transport, close_code},
};

use codec::{Decoder, Event};
use handshake::{PendingUpgrade, Upgraded};
use writer::WsWriter;

/// An upgraded WebSocket connection.
pub struct WsTransport {
    read: OwnedReadHalf,
    /// Bytes read and not decoded yet; empty (no allocation) between messages.
    buf: BytesMut,
    decoder: Decoder,
    writer: Arc<WsWriter>,
    /// `ws.read_buffer_bytes`, `ws.write_timeout` and `ws.idle_timeout`, shared rather than
    /// copied into every connection.
    settings: Arc<Settings>,
    last_seen: Instant,
}

impl WsTransport {
    /// The transport, and its write half for the session's outbox (direct writes).
    pub fn new(upgraded: Upgraded, settings: &Arc<Settings>) -> (Self, Arc<WsWriter>) {
        let (read, write) = upgraded.stream.into_split();
        let writer = Arc::new(WsWriter::new(write));
        let transport = Self {
            read,
            buf: BytesMut::from(&upgraded.early[..]),
            decoder: Decoder::new(settings.ws.max_message_bytes),
            writer: Arc::clone(&writer),
            settings: Arc::clone(settings),
            last_seen: Instant::now(),
        };
        (transport, writer)
    }

    /// One write of `bufs` (after what a direct write left), bounded by `ws.write_timeout`: a
    /// client that accepts no bytes that long is a slow consumer.
    async fn write(&self, bufs: &mut [Bytes]) -> Result<(), End> {
        match tokio::time::timeout(self.settings.ws.write_timeout, self.writer.write_all(bufs))
            .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Close(close_code::SLOW_CONSUMER, "write timeout")),
        }
    }

    /// The next decoded event, reading from the socket as needed.
    async fn next_event(&mut self) -> Result<Event, End> {
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(event)) => return Ok(event),
                Ok(None) => {}
                Err(err) => return Err(End::Close(err.close_code(), err.reason())),
            }
            match std::future::poll_fn(|cx| self.poll_read(cx)).await {
                Ok(0) | Err(_) => return Err(End::Gone),
                Ok(_) => {}
            }
        }
    }

    /// Read what the socket has into `buf`. The room for it is reserved only while the poll
    /// runs: a connection waiting for input keeps no read buffer. (And no future either:
    /// `readable()` would add its waiter, 168 bytes, to every idle connection's task.)
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.buf.reserve(self.settings.ws.read_buffer_bytes);
        let polled = tokio_util::io::poll_read_buf(Pin::new(&mut self.read), cx, &mut self.buf);
        if polled.is_pending() && self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        polled
    }
}

impl Transport for WsTransport {
    async fn send(&mut self, frames: &mut Frames) -> Result<(), End> {
        let mut bufs: smallvec::SmallVec<[Bytes; 1]> =
            frames.drain(..).map(|frame| frame.wire).collect();
        self.write(&mut bufs).await
    }

    async fn recv(&mut self) -> Inbound {
        let event = self.next_event().await;
        self.last_seen = Instant::now();
        match event {
            Err(end) => Inbound::End(end),
            Ok(Event::Text(text)) => Inbound::Text(text.into()),
            Ok(Event::Binary) => Inbound::Unsupported,
            Ok(Event::Ping(payload)) => Inbound::Ping(payload),
            Ok(Event::Pong) => Inbound::Alive,
            // The client closed: the session echoes its close and ends.
            Ok(Event::Close(code)) => Inbound::End(End::ClientClosed(code)),
        }
    }

    async fn pong(&mut self, payload: Bytes) -> Result<(), End> {
        self.write(&mut [codec::pong(&payload)]).await
    }

    async fn keepalive(&mut self) -> Result<(), End> {
        if self.last_seen.elapsed() >= self.settings.ws.idle_timeout {
            return Err(End::Close(close_code::IDLE_TIMEOUT, "idle timeout"));
        }
        self.write(&mut [codec::ping()]).await
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        // The client may not be reading; the write is bounded, and failing it changes nothing.
        let _ = self.write(&mut [codec::close(Some(code), reason)]).await;
    }

    async fn close_reply(&mut self, code: Option<u16>) {
        let _ = self.write(&mut [codec::close(code, "")]).await;
    }
}

/// One WebSocket connection from its `101` to its end, as a single task: wait for the socket,
/// subscribe the channels of the query, serve, and write the session's access-log entry.
/// `held` (the connection's slot) is released when it ends.
///
/// Everything the task keeps is a parameter here, stored once in the task; inner futures borrow
/// it. Moving a value into a nested future instead would give it a second slot in the task
/// (generator layout), and this task is most of an idle connection's memory.
pub async fn serve(
    upgraded: PendingUpgrade,
    mut session: Session,
    initial: Vec<QuerySubscription>,
    access: Option<(AccessContext, AccessLog)>,
    held: impl Send,
) {
    let Some(upgraded) = upgraded.finish().await else {
        return;
    };
    let (mut transport, writer) = WsTransport::new(upgraded, session.settings());
    session.set_direct(writer);
    let started = Instant::now();
    metrics::gauge!("relay_ws_connections").increment(1.0);
    for sub in &initial {
        Box::pin(session.subscribe(&sub.channel, sub.since)).await;
    }
    drop(initial);
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
    drop(held);
}
