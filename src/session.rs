//! The session core, shared by WebSocket and SSE: one client connection's subscriptions, its
//! outbox, paced history replay, per-connection limits, and the one place where an
//! authorisation check plugs in.
//!
//! A [`Session`] reaches its connection only through the small [`Transport`] trait (send these
//! frames, what did the client send, keep alive, close with this code), so it never imports
//! `ws` or `sse`. Its event loop ([`Session::run`]) selects over the client, the outbox filled
//! by the delivery core, an in-flight history read, a keepalive timer and shutdown.
//!
//! History is replayed *into* the connection, never pushed into its outbox: the session reads
//! one page (from the shared [`HistoryReader`]), writes it, and only then reads the next, so a
//! `since` replay, a catch-up after a broker outage or a gap fill runs at the client's pace and
//! can never make it a slow consumer. Which page to read, what to hold and what to signal is
//! decided by [`Subscriptions`] in the pure core.

use std::{collections::VecDeque, pin::Pin, sync::Arc, time::Duration};

use axum::extract::ws::Utf8Bytes;

use crate::{
    core::{
        Frames,
        subscriptions::{Announce, Subscriptions},
    },
    history::{HistoryError, Page},
    protocol::{ClientFrame, ServerFrame},
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
/// Attempts at one history read before its range is signalled as a gap.
const READ_ATTEMPTS: u32 = 3;
/// Channels remembered per session for its log entry.
const LOGGED_CHANNELS: usize = 32;

/// Why a session ends: close with a code, or the peer is already gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Close(u16, &'static str),
    Gone,
}

/// What the client sent.
#[derive(Debug)]
pub enum Inbound {
    Text(Utf8Bytes),
    /// A frame the protocol does not accept (a binary frame).
    Unsupported,
    /// Proof of life without content (pings, pongs, close handshakes).
    Alive,
    /// The connection ended (or must end with this code).
    End(End),
}

/// A connection as the session sees it.
pub trait Transport: Send {
    /// Write `frames`, draining them (a frame's bytes are shared by every subscriber, so moving
    /// them saves a reference-count round trip per delivery), and flush; an error ends the
    /// session.
    fn send(&mut self, frames: &mut Frames) -> impl Future<Output = Result<(), End>> + Send;
    /// The next thing the client sent. Transports without client frames (SSE) never return.
    fn recv(&mut self) -> impl Future<Output = Inbound> + Send;
    /// Called every `ws.ping_interval`: ping, and close idle clients.
    fn keepalive(&mut self) -> impl Future<Output = Result<(), End>> + Send;
    /// Say goodbye with `code`, best effort and bounded in time.
    fn close(&mut self, code: u16, reason: &'static str) -> impl Future<Output = ()> + Send;
}

/// What crossed the connection, for the access log.
#[derive(Debug, Default)]
pub struct Traffic {
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Every channel subscribed during the session (capped, it is only for the log).
    pub channels: Vec<String>,
}

/// How a session ended.
#[derive(Debug)]
pub struct Report {
    /// The close code sent, if the connection was still there to receive one.
    pub close_code: Option<u16>,
    pub traffic: Traffic,
}

/// A history read in flight, owned by the session so that `select!` can drop and re-poll it.
type Read = Pin<Box<dyn Future<Output = ReadDone> + Send>>;

enum ReadDone {
    Oldest(Announce, Result<i64, HistoryError>),
    Page(Arc<str>, (i64, i64), Result<Page, HistoryError>),
}

pub struct Session {
    state: AppState,
    outbox: Arc<SessionOutbox>,
    subs: Subscriptions,
    /// Items drained from the outbox, not applied yet.
    queued: VecDeque<Outgoing>,
    /// `since` subscriptions waiting for their announcement.
    announces: VecDeque<Announce>,
    read: Option<Read>,
    /// Frames ready for the transport.
    out: Frames,
    bad_frames: u32,
    traffic: Traffic,
}

impl Session {
    pub fn new(state: AppState) -> Self {
        let capacity = state.settings.ws.outbox_capacity;
        Self {
            outbox: Arc::new(SessionOutbox::new(capacity)),
            // A replaying channel holds at most as many live frames as the outbox would.
            subs: Subscriptions::new(capacity),
            state,
            queued: VecDeque::new(),
            announces: VecDeque::new(),
            read: None,
            out: Frames::new(),
            bad_frames: 0,
            traffic: Traffic::default(),
        }
    }

    /// Subscribe (the same path for the query string and for frames): the answer arrives
    /// through the outbox. This is where an authorisation check belongs.
    pub async fn subscribe(&mut self, channel: &str, since: Option<i64>) {
        let max = self.state.settings.ws.max_subscriptions;
        if !self.subs.contains(channel) && self.subs.len() >= max {
            return self.reply(ServerFrame::error(
                "too_many_subscriptions",
                &format!("at most {max} subscriptions per connection"),
            ));
        }
        self.subs.request(channel);
        if self.traffic.channels.len() < LOGGED_CHANNELS
            && !self.traffic.channels.iter().any(|c| c == channel)
        {
            self.traffic.channels.push(channel.to_owned());
        }
        if let Err(err) = self
            .state
            .pubsub
            .subscribe(channel, &self.outbox, since)
            .await
        {
            tracing::warn!(%err, channel, "cannot hand the subscribe to the listener");
            self.reply(ServerFrame::error("unavailable", "server is shutting down"));
        }
    }

    async fn unsubscribe(&mut self, channel: &str) {
        if !self.subs.contains(channel) {
            // Idempotent: not subscribed is already the requested state.
            return self.reply(ServerFrame::unsubscribed(channel));
        }
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

    /// Wait until every subscription requested so far is answered. Err names the first
    /// channel that could not be subscribed (SSE refuses the stream with 503 then).
    pub async fn confirm_subscriptions(&mut self, within: Duration) -> Result<(), String> {
        let requested = self.subs.channels();
        let wait = async {
            loop {
                self.apply_queued();
                if let Some(failed) = requested.iter().find(|c| !self.subs.contains(c)) {
                    return Err(format!("cannot subscribe to `{failed}` right now"));
                }
                if !self.subs.any_pending() {
                    return Ok(());
                }
                self.outbox.ready().await;
                if self.outbox.drain_into(&mut self.queued) == Drained::Overflowed {
                    return Err("the stream fell behind before it started".to_owned());
                }
            }
        };
        tokio::time::timeout(within, wait)
            .await
            .unwrap_or_else(|_| Err("the subscription was not confirmed in time".to_owned()))
    }

    fn reply(&self, frame: ServerFrame) {
        self.outbox.reply(frame);
    }

    fn bad_frame(&mut self, frame: ServerFrame) {
        self.bad_frames += 1;
        self.reply(frame);
    }

    /// Serve the connection until it ends. Dropping the session afterwards releases every
    /// subscription.
    pub async fn run(&mut self, transport: &mut impl Transport) -> Report {
        let end = self.event_loop(transport).await;
        let close_code = match end {
            End::Close(code, reason) => {
                // Boxed: the goodbye's timer is not part of every idle connection's task.
                Box::pin(transport.close(code, reason)).await;
                Some(code)
            }
            End::Gone => None,
        };
        Report {
            close_code,
            traffic: std::mem::take(&mut self.traffic),
        }
    }

    async fn event_loop(&mut self, transport: &mut impl Transport) -> End {
        let ping_interval = self.state.settings.ws.ping_interval;
        let lifecycle = self.state.lifecycle.clone();
        let keepalive = tokio::time::sleep(ping_interval);
        // Created once: re-creating it per wake-up would re-register with the token each time.
        let cancelled = lifecycle.cancelled();
        tokio::pin!(keepalive, cancelled);
        loop {
            tokio::select! {
                _ = &mut cancelled => return End::Close(close_code::GOING_AWAY, "server shutting down"),
                ready = self.next_output() => {
                    if let Err(end) = ready {
                        return end;
                    }
                    let coalesce = self.state.settings.ws.coalesce_delay;
                    if !coalesce.is_zero() {
                        // Boxed so connections without coalescing do not carry the timer.
                        Box::pin(tokio::time::sleep(coalesce)).await;
                        self.drain_now();
                    }
                    for frame in &self.out {
                        self.traffic.frames_out += 1;
                        self.traffic.bytes_out += frame.text.len() as u64;
                    }
                    // Boxed (one small allocation per wake-up) so the write path's futures
                    // are not part of every idle connection's task.
                    let sent = Box::pin(transport.send(&mut self.out)).await;
                    if self.out.spilled() {
                        // A burst grew the buffer; give it back rather than keep it idle.
                        self.out = Frames::new();
                    }
                    if let Err(end) = sent {
                        return end;
                    }
                }
                inbound = transport.recv() => match inbound {
                    Inbound::Text(text) => {
                        self.traffic.frames_in += 1;
                        self.traffic.bytes_in += text.len() as u64;
                        // Boxed: frame handling (publish, subscribe) needs large futures that
                        // would otherwise bloat every idle connection's task.
                        Box::pin(self.on_text(&text)).await;
                        if self.bad_frames >= MAX_CONSECUTIVE_BAD_FRAMES {
                            return End::Close(close_code::POLICY, "too many invalid frames");
                        }
                    }
                    Inbound::Unsupported => {
                        self.bad_frame(ServerFrame::error(
                            "unsupported_binary",
                            "binary frames are not supported; send JSON text frames",
                        ));
                        if self.bad_frames >= MAX_CONSECUTIVE_BAD_FRAMES {
                            return End::Close(close_code::POLICY, "too many invalid frames");
                        }
                    }
                    Inbound::Alive => {}
                    Inbound::End(end) => return end,
                },
                _ = &mut keepalive => {
                    if let Err(end) = Box::pin(transport.keepalive()).await {
                        return end;
                    }
                    keepalive.as_mut().reset(tokio::time::Instant::now() + ping_interval);
                }
            }
        }
    }

    /// Take whatever the outbox holds now, without waiting (after a coalescing pause).
    fn drain_now(&mut self) {
        if self.outbox.drain_into(&mut self.queued) == Drained::Items {
            self.apply_queued();
        }
    }

    fn apply_queued(&mut self) {
        while let Some(item) = self.queued.pop_front() {
            if let Some(announce) = self.subs.apply(item, &mut self.out) {
                self.announces.push_back(announce);
            }
        }
    }

    /// Wait until there are frames to send: from the outbox, or from a history read. Cancel
    /// safe: drained items and the read in flight are kept in `self`.
    async fn next_output(&mut self) -> Result<(), End> {
        loop {
            self.apply_queued();
            if !self.out.is_empty() {
                return Ok(());
            }
            if self.read.is_none() {
                self.read = self.start_read();
            }
            if self.read.is_none() {
                // The common case: nothing to read from history, only the outbox to wait for.
                self.outbox.ready().await;
                if self.outbox.drain_into(&mut self.queued) == Drained::Overflowed {
                    return Err(End::Close(close_code::SLOW_CONSUMER, "slow consumer"));
                }
                continue;
            }
            tokio::select! {
                _ = self.outbox.ready() => {
                    if self.outbox.drain_into(&mut self.queued) == Drained::Overflowed {
                        return Err(End::Close(close_code::SLOW_CONSUMER, "slow consumer"));
                    }
                }
                done = poll_read(&mut self.read) => {
                    self.read = None;
                    self.finish_read(done);
                }
            }
        }
    }

    /// The next history read this connection needs: announcements first, then fills.
    fn start_read(&mut self) -> Option<Read> {
        if let Some(announce) = self.announces.pop_front() {
            let history = self.state.history.clone();
            return Some(Box::pin(async move {
                let oldest = with_retries(|| history.oldest(&announce.channel)).await;
                ReadDone::Oldest(announce, oldest)
            }));
        }
        let (channel, window) = self.subs.next_read()?;
        let history = self.state.history.clone();
        Some(Box::pin(async move {
            let page = with_retries(|| history.page(&channel, window)).await;
            ReadDone::Page(channel, window, page)
        }))
    }

    fn finish_read(&mut self, done: ReadDone) {
        match done {
            ReadDone::Oldest(announce, oldest) => {
                if let Err(err) = &oldest {
                    tracing::warn!(%err, channel = &*announce.channel, "cannot read history for a since-subscription");
                }
                self.subs.announce(&announce, oldest.ok(), &mut self.out);
            }
            ReadDone::Page(channel, window, Ok(page)) => {
                self.subs.on_page(&channel, window, &page, &mut self.out);
            }
            ReadDone::Page(channel, _, Err(err)) => {
                tracing::warn!(%err, channel = &*channel, "history unavailable; signalling the range as a gap");
                metrics::counter!("relay_gaps_signalled_total", "reason" => "history_unavailable")
                    .increment(1);
                self.out.push(ServerFrame::error(
                    "history_unavailable",
                    &format!(
                        "cannot read history of `{channel}`; the missing range follows as a gap"
                    ),
                ));
                self.subs.on_unreadable(&channel, &mut self.out);
            }
        }
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
                // Refused while this replica has no broker connection: an interactive publisher
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
}

impl Drop for Session {
    fn drop(&mut self) {
        self.state
            .pubsub
            .leave(self.subs.channels(), Arc::clone(&self.outbox));
    }
}

async fn poll_read(read: &mut Option<Read>) -> ReadDone {
    match read {
        Some(read) => read.await,
        None => std::future::pending().await,
    }
}

/// A history read, retried with a short backoff before it counts as unavailable.
async fn with_retries<T, F: Future<Output = Result<T, HistoryError>>>(
    mut read: impl FnMut() -> F,
) -> Result<T, HistoryError> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match read().await {
            Ok(value) => return Ok(value),
            Err(err) if attempt >= READ_ATTEMPTS => return Err(err),
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
        }
    }
}

impl From<PubSubError> for End {
    fn from(_: PubSubError) -> Self {
        End::Close(close_code::GOING_AWAY, "server shutting down")
    }
}
