//! Server-Sent Events: `GET /sse?channels=a,b`, a streaming response fed by the same fan-out as
//! WebSockets.
//!
//! Each stream owns a [`SessionOutbox`]; the response body polls it and turns each queued frame
//! into an event (`event: message`, `data:` the same JSON frame a WebSocket client gets, `id:`
//! the message offset). A browser reconnecting sends `Last-Event-ID`, which resumes a
//! single-channel stream like `since` (multi-channel streams resume with `since.<channel>=N` in
//! the URL). Keepalive comments keep proxies from timing out the stream; it ends when the server
//! shuts down or the client goes away (then `Drop` releases the subscriptions).

use std::{collections::VecDeque, convert::Infallible, sync::Arc};

use axum::{
    extract::{RawQuery, State},
    http::HeaderMap,
    response::sse::{Event, KeepAlive, Sse},
};
use futures_util::Stream;

use crate::{
    history::{self, ReplayCursor},
    http::error::ApiError,
    lifecycle::Lifecycle,
    protocol::{ServerFrame, parse_subscription_query},
    pubsub::{
        PubSub, SessionOutbox,
        outbox::{Drained, Outgoing},
    },
    state::AppState,
};

/// Server-Sent Events stream of the listed channels.
#[utoipa::path(
    get,
    path = "/sse",
    tag = "realtime",
    description = "`event: message` with the WebSocket message frame as data and the offset as id; `Last-Event-ID` resumes a single-channel stream. See docs/protocol.md.",
    params(("channels" = String, Query, description = "Comma-separated channels (at least one)")),
    responses(
        (status = 200, description = "text/event-stream", content_type = "text/event-stream"),
        (status = 400, description = "Invalid channels or Last-Event-ID", body = crate::http::error::ErrorBody),
        (status = 503, description = "Shutting down or Redis unavailable", body = crate::http::error::ErrorBody),
    )
)]
pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    if state.lifecycle.is_draining() {
        return Err(ApiError::Unavailable("server is shutting down".to_owned()));
    }
    let mut subs = parse_subscription_query(query.as_deref()).map_err(ApiError::Validation)?;
    if subs.is_empty() {
        return Err(ApiError::Validation(
            "give at least one channel: /sse?channels=a,b".to_owned(),
        ));
    }
    if subs.len() > state.settings.ws.max_subscriptions {
        return Err(ApiError::Validation(format!(
            "at most {} channels per stream",
            state.settings.ws.max_subscriptions
        )));
    }
    if let Some(last_event_id) = headers.get("last-event-id") {
        let id = last_event_id
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|id| *id >= 0)
            .ok_or_else(|| {
                ApiError::Validation("Last-Event-ID must be a message offset".to_owned())
            })?;
        // Offsets are per channel, so the id only means something for a single-channel stream.
        if let [only] = subs.as_mut_slice() {
            only.since = Some(id);
        }
    }
    let mut session = SseSession {
        pubsub: state.pubsub.clone(),
        lifecycle: state.lifecycle.clone(),
        store: state.store.clone(),
        outbox: Arc::new(SessionOutbox::new(state.settings.ws.outbox_capacity)),
        channels: Vec::with_capacity(subs.len()),
        queued: VecDeque::new(),
        ready: VecDeque::new(),
        replay: None,
        finished: false,
    };
    metrics::gauge!("relay_sse_connections").increment(1.0);
    for sub in &subs {
        session
            .pubsub
            .subscribe(&sub.channel, &session.outbox, sub.since)
            .await
            .map_err(|e| {
                ApiError::Unavailable(format!("cannot subscribe to `{}`: {e}", sub.channel))
            })?;
        session.channels.push(sub.channel.as_str().into());
    }
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
    store: crate::store::MessageStore,
    outbox: Arc<SessionOutbox>,
    channels: Vec<Box<str>>,
    /// Drained from the outbox, not yet turned into events.
    queued: VecDeque<Outgoing>,
    /// Frames to emit before looking at `queued` again (replayed history).
    ready: VecDeque<ServerFrame>,
    replay: Option<ReplayCursor>,
    finished: bool,
}

impl SseSession {
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Some(to_event(&frame));
            }
            if let Some(cursor) = &mut self.replay {
                match cursor.next_page().await {
                    Ok(Some(frames)) => self.ready.extend(frames),
                    Ok(None) => self.replay = None,
                    Err(err) => {
                        self.ready.push_back(cursor.failure_frame(&err));
                        self.replay = None;
                    }
                }
                continue;
            }
            match self.queued.pop_front() {
                Some(Outgoing::Frame(frame)) => return Some(to_event(&frame)),
                Some(Outgoing::Replay(replay)) => {
                    let (first, cursor) = history::start_replay(&self.store, &replay).await;
                    self.ready.extend(first);
                    self.replay = cursor;
                    continue;
                }
                None => {}
            }
            if self.finished {
                return None;
            }
            tokio::select! {
                _ = self.lifecycle.cancelled() => return None,
                _ = self.outbox.ready() => {
                    if self.outbox.drain_into(&mut self.queued) == Drained::Overflowed {
                        // Tell the client why, then end the stream; it can reconnect and resume.
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
