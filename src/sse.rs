//! The Server-Sent Events transport: a thin [`Transport`] that turns the session's frames into
//! events of a streaming response (`event:` the frame kind, `data:` the same JSON a WebSocket
//! client gets, `id:` the offset).
//!
//! The session runs in its own tracked task and hands events to the response body through a
//! small bounded channel; a client that stops reading fills it, and after `ws.write_timeout`
//! the session ends as a slow consumer with a final `event: error` (`slow_consumer`). Keepalive
//! comments come from axum's `KeepAlive`. The stream itself (query, `Last-Event-ID`, refusals)
//! is set up in `http::realtime`.

use std::{convert::Infallible, time::Duration};

use axum::response::sse::Event;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    core::Frames,
    protocol::ServerFrame,
    session::{End, Inbound, Session, Transport, close_code},
};

/// Events buffered between the session and the response body.
const EVENT_BUFFER: usize = 64;

pub struct SseTransport {
    events: mpsc::Sender<Result<Event, Infallible>>,
    write_timeout: Duration,
}

/// A transport and the response body it feeds.
pub fn channel(
    write_timeout: Duration,
) -> (
    SseTransport,
    impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
) {
    let (events, body) = mpsc::channel(EVENT_BUFFER);
    let transport = SseTransport {
        events,
        write_timeout,
    };
    (transport, ReceiverStream::new(body))
}

impl Transport for SseTransport {
    async fn send(&mut self, frames: &mut Frames) -> Result<(), End> {
        let send_all = async {
            for frame in frames.drain(..) {
                self.events.send(Ok(to_event(&frame))).await?;
            }
            Ok::<_, mpsc::error::SendError<_>>(())
        };
        match tokio::time::timeout(self.write_timeout, send_all).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Close(close_code::SLOW_CONSUMER, "write timeout")),
        }
    }

    async fn recv(&mut self) -> Inbound {
        // SSE clients send nothing; all there is to learn is that they went away.
        self.events.closed().await;
        Inbound::End(End::Gone)
    }

    async fn keepalive(&mut self) -> Result<(), End> {
        Ok(())
    }

    async fn close(&mut self, code: u16, _reason: &'static str) {
        if code == close_code::SLOW_CONSUMER {
            // Tell the client why, then end the stream; it can reconnect and resume.
            metrics::counter!("relay_sse_slow_consumer_closes_total").increment(1);
            let frame = ServerFrame::error(
                "slow_consumer",
                "the stream fell too far behind and was closed",
            );
            let _ = self.events.try_send(Ok(to_event(&frame)));
        } else if code == close_code::TOKEN_EXPIRED {
            // SSE cannot refresh in-band: the client reconnects with a new token.
            let frame = ServerFrame::error(
                "token_expired",
                "the token expired; reconnect with a new one",
            );
            let _ = self.events.try_send(Ok(to_event(&frame)));
        }
    }
}

/// Serve one SSE stream to its end (the body ends when the transport is dropped).
pub async fn serve(mut session: Session, mut transport: SseTransport) {
    metrics::gauge!("relay_sse_connections").increment(1.0);
    session.run(&mut transport).await;
    metrics::gauge!("relay_sse_connections").decrement(1.0);
}

fn to_event(frame: &ServerFrame) -> Event {
    let event = Event::default()
        .event(frame.kind.as_str())
        .data(frame.text.as_str());
    match frame.id {
        Some(id) => event.id(id.to_string()),
        None => event,
    }
}
