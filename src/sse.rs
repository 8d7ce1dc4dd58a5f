//! Server-Sent Events: `GET /sse?channels=a,b`, a streaming response fed by the same fan-out as
//! WebSockets.
//!
//! Each stream owns a [`SessionOutbox`]; the response body polls it and turns each queued frame
//! into an event (`event: message`, `data:` the same JSON frame a WebSocket client gets, `id:`
//! the message id when there is one). Keepalive comments keep proxies from timing out the
//! stream; it ends when the server shuts down or the client goes away (then `Drop` releases
//! the subscriptions).

use std::{collections::VecDeque, convert::Infallible, sync::Arc};

use axum::{
    extract::State,
    response::sse::{Event, KeepAlive, Sse},
};
use futures_util::Stream;
use serde::Deserialize;

use crate::{
    http::error::{ApiError, AppQuery},
    lifecycle::Lifecycle,
    protocol::{ServerFrame, parse_channel_list},
    pubsub::{PubSub, SessionOutbox, outbox::Drained},
    state::AppState,
};

#[derive(Debug, Deserialize)]
pub struct SseParams {
    #[serde(default)]
    channels: Option<String>,
}

pub async fn stream(
    State(state): State<AppState>,
    AppQuery(params): AppQuery<SseParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    if state.lifecycle.is_draining() {
        return Err(ApiError::Unavailable("server is shutting down".to_owned()));
    }
    let channels = parse_channel_list(params.channels.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::Validation(e.to_string()))?;
    if channels.is_empty() {
        return Err(ApiError::Validation(
            "give at least one channel: /sse?channels=a,b".to_owned(),
        ));
    }
    if channels.len() > state.settings.ws.max_subscriptions {
        return Err(ApiError::Validation(format!(
            "at most {} channels per stream",
            state.settings.ws.max_subscriptions
        )));
    }
    let mut session = SseSession {
        pubsub: state.pubsub.clone(),
        lifecycle: state.lifecycle.clone(),
        outbox: Arc::new(SessionOutbox::new(state.settings.ws.outbox_capacity)),
        channels: Vec::with_capacity(channels.len()),
        pending: VecDeque::new(),
        finished: false,
    };
    for channel in &channels {
        session
            .pubsub
            .subscribe(channel, &session.outbox)
            .await
            .map_err(|e| ApiError::Unavailable(format!("cannot subscribe to `{channel}`: {e}")))?;
        session.channels.push(channel.as_str().into());
    }
    metrics::gauge!("relay_sse_connections").increment(1.0);
    let events = futures_util::stream::unfold(session, |mut session| async move {
        let event = session.next_event().await?;
        Some((Ok(event), session))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(state.settings.sse.keepalive_interval)))
}

struct SseSession {
    pubsub: PubSub,
    lifecycle: Lifecycle,
    outbox: Arc<SessionOutbox>,
    channels: Vec<Box<str>>,
    pending: VecDeque<ServerFrame>,
    finished: bool,
}

impl SseSession {
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(to_event(&frame));
            }
            if self.finished {
                return None;
            }
            tokio::select! {
                _ = self.lifecycle.cancelled() => return None,
                _ = self.outbox.ready() => {
                    if self.outbox.drain_into(&mut self.pending) == Drained::Overflowed {
                        // Tell the client why, then end the stream; it can reconnect.
                        self.finished = true;
                        metrics::counter!("relay_sse_slow_consumer_closes_total").increment(1);
                        let frame = ServerFrame::error("slow_consumer", "the stream fell too far behind and was closed");
                        return Some(to_event(&frame));
                    }
                }
            }
        }
    }
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

impl Drop for SseSession {
    fn drop(&mut self) {
        metrics::gauge!("relay_sse_connections").decrement(1.0);
        self.pubsub
            .leave(std::mem::take(&mut self.channels), Arc::clone(&self.outbox));
    }
}
