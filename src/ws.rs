//! WebSocket sessions: `GET /ws?channels=a,b`.
//!
//! Each connection is one task (started by axum's upgrade, tracked by the app's `TaskTracker`)
//! that selects over four event sources: frames from the client, its [`SessionOutbox`] filled by
//! the Redis fan-out, a keepalive timer, and shutdown. Everything waiting in the outbox is written
//! with one flush. Frames and close codes are documented in `docs/protocol.md`.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Extension,
    extract::{
        RawQuery, State,
        ws::{
            CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
        },
    },
    response::Response,
};
use futures_util::SinkExt;

use crate::{
    access_log::{AccessContext, EntryKind, SessionStats},
    history,
    http::{error::ApiError, middleware::RequestId},
    protocol::{ClientFrame, QuerySubscription, ServerFrame, parse_subscription_query},
    publish,
    pubsub::{
        PubSubError, SessionOutbox,
        outbox::{Drained, Outgoing},
    },
    state::AppState,
};

/// Close codes (see docs/protocol.md).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const IDLE_TIMEOUT: u16 = 4000;
    pub const SLOW_CONSUMER: u16 = 4008;
}

/// Consecutive invalid frames tolerated before closing with 1008: a client that only sends
/// garbage is broken or hostile, and every bad frame costs an error frame.
const MAX_CONSECUTIVE_BAD_FRAMES: u32 = 32;

/// Validate the query, then upgrade. Refusals happen before the upgrade, as JSON errors.
#[utoipa::path(
    get,
    path = "/ws",
    tag = "realtime",
    description = "WebSocket upgrade. `channels=a,b` subscribes at connect, `since.<channel>=<offset>` resumes; frames in docs/protocol.md.",
    params(("channels" = Option<String>, Query, description = "Comma-separated channels to subscribe to")),
    responses(
        (status = 101, description = "Switching protocols: the WebSocket session starts"),
        (status = 400, description = "Invalid channels or not a WebSocket request", body = crate::http::error::ErrorBody),
        (status = 503, description = "Shutting down", body = crate::http::error::ErrorBody),
    )
)]
pub async fn upgrade(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    access: Option<Extension<AccessContext>>,
    RawQuery(query): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    if state.lifecycle.is_draining() {
        return Err(ApiError::Unavailable("server is shutting down".to_owned()));
    }
    let channels = parse_subscription_query(query.as_deref()).map_err(ApiError::Validation)?;
    let cfg = &state.settings.ws;
    if channels.len() > cfg.max_subscriptions {
        return Err(ApiError::Validation(format!(
            "at most {} channels per connection",
            cfg.max_subscriptions
        )));
    }
    let ws = ws?;
    // Count the session from now, so a shutdown starting before the upgrade completes waits.
    let task = state.lifecycle.task_guard("ws_session");
    let ws = ws
        .read_buffer_size(cfg.read_buffer_bytes)
        .write_buffer_size(cfg.read_buffer_bytes)
        .max_message_size(cfg.max_message_bytes)
        .max_frame_size(cfg.max_message_bytes);
    let access = access.map(|Extension(access)| access);
    // axum stores the returned future inside its own upgrade task, next to its upgrade state;
    // boxing it keeps that task small (see docs/performance.md, memory per connection).
    Ok(ws.on_upgrade(move |socket| {
        Box::pin(async move {
            Session::new(state, request_id, access)
                .run(socket, channels)
                .await;
            drop(task);
        })
    }))
}

/// Why the event loop ended: close with a code, or the peer is already gone.
enum End {
    Close(u16, &'static str),
    Gone,
}

struct Session {
    state: AppState,
    outbox: Arc<SessionOutbox>,
    subscriptions: Vec<Box<str>>,
    request_id: RequestId,
    bad_frames: u32,
    /// For the session's access-log entry.
    access: Option<AccessContext>,
    traffic: Traffic,
}

/// What crossed the socket, for the access log.
#[derive(Debug, Default)]
struct Traffic {
    frames_in: u64,
    frames_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    /// Every channel subscribed during the session (capped, it is only for the log).
    channels: Vec<String>,
}

/// Channels remembered per session for its log entry.
const LOGGED_CHANNELS: usize = 32;

impl Session {
    fn new(state: AppState, request_id: RequestId, access: Option<AccessContext>) -> Self {
        let outbox = Arc::new(SessionOutbox::new(state.settings.ws.outbox_capacity));
        Self {
            state,
            outbox,
            subscriptions: Vec::new(),
            request_id,
            bad_frames: 0,
            access,
            traffic: Traffic::default(),
        }
    }

    async fn run(mut self, mut socket: WebSocket, initial: Vec<QuerySubscription>) {
        let started = Instant::now();
        metrics::gauge!("relay_ws_connections").increment(1.0);
        tracing::debug!(
            request_id = &*self.request_id.0,
            "WebSocket session started"
        );
        for sub in &initial {
            Box::pin(self.subscribe(&sub.channel, sub.since)).await;
        }
        let end = self.event_loop(&mut socket).await;
        let code = match end {
            End::Close(code, reason) => {
                let frame = CloseFrame {
                    code,
                    reason: reason.into(),
                };
                // The client may not be reading; do not let the goodbye hang the task.
                let write_timeout = self.state.settings.ws.write_timeout;
                let _ =
                    tokio::time::timeout(write_timeout, socket.send(Message::Close(Some(frame))))
                        .await;
                Some(code)
            }
            End::Gone => None,
        };
        if code == Some(close_code::SLOW_CONSUMER) {
            metrics::counter!("relay_ws_slow_consumer_closes_total").increment(1);
        }
        metrics::gauge!("relay_ws_connections").decrement(1.0);
        if let Some(access) = &self.access {
            let traffic = std::mem::take(&mut self.traffic);
            let stats = SessionStats {
                frames_in: traffic.frames_in,
                frames_out: traffic.frames_out,
                channels: traffic.channels,
                close_code: code,
            };
            let entry = access.entry(
                EntryKind::Websocket,
                101,
                (traffic.bytes_in, traffic.bytes_out),
                Some(stats),
            );
            self.state.access_log.record(entry);
        }
        tracing::debug!(
            request_id = &*self.request_id.0,
            close_code = code,
            duration_ms = started.elapsed().as_millis() as u64,
            "WebSocket session ended"
        );
        // `Drop` releases the subscriptions.
    }

    async fn event_loop(&mut self, socket: &mut WebSocket) -> End {
        let cfg = self.state.settings.ws.clone();
        let lifecycle = self.state.lifecycle.clone();
        let outbox = Arc::clone(&self.outbox);
        let mut batch = VecDeque::new();
        let mut last_seen = Instant::now();
        let keepalive = tokio::time::sleep(cfg.ping_interval);
        // Created once: re-creating it per wake-up would re-register with the token each time.
        let cancelled = lifecycle.cancelled();
        tokio::pin!(keepalive, cancelled);
        loop {
            tokio::select! {
                _ = &mut cancelled => return End::Close(close_code::GOING_AWAY, "server shutting down"),
                _ = outbox.ready() => {
                    if !cfg.coalesce_delay.is_zero() {
                        // Boxed so connections without coalescing do not carry the timer.
                        Box::pin(tokio::time::sleep(cfg.coalesce_delay)).await;
                    }
                    // Boxed (one small allocation per wake-up) so the write path's timers and
                    // futures are not part of every idle connection's task.
                    let flushed = Box::pin(self.flush_outbox(socket, &mut batch, cfg.write_timeout)).await;
                    if let Some(end) = flushed {
                        return end;
                    }
                }
                incoming = socket.recv() => {
                    last_seen = Instant::now();
                    match incoming {
                        None => return End::Gone,
                        Some(Err(err)) => return if is_too_big(err) {
                            End::Close(close_code::TOO_BIG, "message too big")
                        } else {
                            End::Gone
                        },
                        Some(Ok(Message::Text(text))) => {
                            self.traffic.frames_in += 1;
                            self.traffic.bytes_in += text.len() as u64;
                            // Boxed: frame handling (publish, subscribe) needs large futures
                            // that would otherwise bloat every idle connection's task.
                            Box::pin(self.on_text(&text)).await
                        }
                        Some(Ok(Message::Binary(_))) => self.bad_frame(ServerFrame::error(
                            "unsupported_binary",
                            "binary frames are not supported; send JSON text frames",
                        )),
                        // tungstenite answers pings itself; pongs only prove liveness.
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        // tungstenite queued the close reply; the next read completes the handshake.
                        Some(Ok(Message::Close(_))) => {}
                    }
                    if self.bad_frames >= MAX_CONSECUTIVE_BAD_FRAMES {
                        return End::Close(close_code::POLICY, "too many invalid frames");
                    }
                }
                _ = &mut keepalive => {
                    if last_seen.elapsed() >= cfg.idle_timeout {
                        return End::Close(close_code::IDLE_TIMEOUT, "idle timeout");
                    }
                    let ping = Box::pin(tokio::time::timeout(cfg.write_timeout, socket.send(Message::Ping(Default::default()))));
                    match ping.await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return End::Gone,
                        Err(_) => return End::Close(close_code::SLOW_CONSUMER, "write timeout"),
                    }
                    keepalive.as_mut().reset(tokio::time::Instant::now() + cfg.ping_interval);
                }
            }
        }
    }

    /// Write everything queued, with one flush per batch, until the outbox is empty.
    async fn flush_outbox(
        &mut self,
        socket: &mut WebSocket,
        batch: &mut VecDeque<Outgoing>,
        write_timeout: Duration,
    ) -> Option<End> {
        loop {
            if self.outbox.drain_into(batch) == Drained::Overflowed {
                return Some(End::Close(close_code::SLOW_CONSUMER, "slow consumer"));
            }
            if batch.is_empty() {
                return None;
            }
            while let Some(item) = batch.pop_front() {
                let written = match item {
                    Outgoing::Frame(frame) => {
                        self.traffic.count_out(&frame);
                        feed(socket, frame, write_timeout).await
                    }
                    Outgoing::Replay(replay) => {
                        Box::pin(self.replay(socket, &replay, write_timeout)).await
                    }
                };
                if let Err(end) = written {
                    return Some(end);
                }
            }
            if let Err(end) = flush(socket, write_timeout).await {
                return Some(end);
            }
            // Pushes that arrived during the write are picked up by the next iteration.
        }
    }

    /// Send `subscribed` and the stored history of a `since` subscription, page by page.
    async fn replay(
        &mut self,
        socket: &mut WebSocket,
        replay: &crate::pubsub::outbox::Replay,
        write_timeout: Duration,
    ) -> Result<(), End> {
        let (first, cursor) = history::start_replay(&self.state.store, replay).await;
        for frame in first {
            self.traffic.count_out(&frame);
            feed(socket, frame, write_timeout).await?;
        }
        let Some(mut cursor) = cursor else {
            return Ok(());
        };
        loop {
            match cursor.next_page().await {
                Ok(Some(frames)) => {
                    for frame in frames {
                        self.traffic.count_out(&frame);
                        feed(socket, frame, write_timeout).await?;
                    }
                    flush(socket, write_timeout).await?;
                }
                Ok(None) => return Ok(()),
                Err(err) => return feed(socket, cursor.failure_frame(&err), write_timeout).await,
            }
        }
    }

    fn reply(&self, frame: ServerFrame) {
        self.outbox.push(frame);
    }

    fn bad_frame(&mut self, frame: ServerFrame) {
        self.bad_frames += 1;
        self.reply(frame);
    }

    async fn on_text(&mut self, text: &str) {
        let frame = match ClientFrame::parse(text) {
            Ok(frame) => frame,
            Err(err) => return self.bad_frame(ServerFrame::error(err.code(), &err.to_string())),
        };
        self.bad_frames = 0;
        match frame {
            ClientFrame::Subscribe { channel, since } => self.subscribe(&channel, since).await,
            ClientFrame::Unsubscribe { channel } => self.unsubscribe(&channel).await,
            ClientFrame::Publish { channel, data } => {
                // Refused while this replica has no Redis connection: an interactive publisher
                // gets a definite answer and can retry (the HTTP API accepts durably instead).
                if !self.state.pubsub.is_listening() {
                    return self.reply(ServerFrame::error(
                        "unavailable",
                        "not connected to Redis; publish again shortly",
                    ));
                }
                if let Err(err) = publish::publish(&self.state, &channel, data).await {
                    tracing::warn!(%err, channel = &*channel, "publish over WebSocket failed");
                    self.reply(ServerFrame::error(
                        "unavailable",
                        "publish failed: message store unavailable",
                    ));
                }
            }
            ClientFrame::Ping => self.reply(ServerFrame::pong()),
        }
    }

    async fn subscribe(&mut self, channel: &str, since: Option<i64>) {
        let already = self.subscriptions.iter().any(|c| &**c == channel);
        if !already && self.subscriptions.len() >= self.state.settings.ws.max_subscriptions {
            return self.reply(ServerFrame::error(
                "too_many_subscriptions",
                &format!(
                    "at most {} subscriptions per connection",
                    self.state.settings.ws.max_subscriptions
                ),
            ));
        }
        match self
            .state
            .pubsub
            .subscribe(channel, &self.outbox, since)
            .await
        {
            Ok(_) if !already => {
                self.subscriptions.push(channel.into());
                if self.traffic.channels.len() < LOGGED_CHANNELS
                    && !self.traffic.channels.iter().any(|c| c == channel)
                {
                    self.traffic.channels.push(channel.to_owned());
                }
            }
            Ok(_) => {}
            // The listener queued the error frame itself.
            Err(PubSubError::ListenerStopped) => {
                self.reply(ServerFrame::error("unavailable", "server is shutting down"))
            }
            Err(_) => {}
        }
    }

    async fn unsubscribe(&mut self, channel: &str) {
        let Some(pos) = self.subscriptions.iter().position(|c| &**c == channel) else {
            // Idempotent: not subscribed is already the requested state.
            return self.reply(ServerFrame::unsubscribed(channel));
        };
        self.subscriptions.swap_remove(pos);
        if self
            .state
            .pubsub
            .unsubscribe(channel, &self.outbox)
            .await
            .is_err()
        {
            self.reply(ServerFrame::unsubscribed(channel));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let channels = std::mem::take(&mut self.subscriptions);
        self.state.pubsub.leave(channels, Arc::clone(&self.outbox));
    }
}

impl Traffic {
    fn count_out(&mut self, frame: &ServerFrame) {
        self.frames_out += 1;
        self.bytes_out += frame.text.len() as u64;
    }
}

async fn feed(
    socket: &mut WebSocket,
    frame: crate::protocol::ServerFrame,
    write_timeout: Duration,
) -> Result<(), End> {
    match tokio::time::timeout(write_timeout, socket.feed(Message::Text(frame.text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Gone),
        Err(_) => Err(End::Close(close_code::SLOW_CONSUMER, "write timeout")),
    }
}

async fn flush(socket: &mut WebSocket, write_timeout: Duration) -> Result<(), End> {
    match tokio::time::timeout(write_timeout, socket.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Gone),
        Err(_) => Err(End::Close(close_code::SLOW_CONSUMER, "write timeout")),
    }
}

/// tungstenite reports an oversized message as a capacity error.
fn is_too_big(err: axum::Error) -> bool {
    matches!(
        err.into_inner().downcast_ref::<tungstenite::Error>(),
        Some(tungstenite::Error::Capacity(_))
    )
}
