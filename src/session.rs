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

use bytes::Bytes;
use tungstenite::Utf8Bytes;

use crate::{
    auth::{Action, Principal},
    core::{
        Frames,
        subscriptions::{Announce, Subscriptions},
    },
    history::{HistoryError, Page},
    protocol::{ClientFrame, ServerFrame},
    publish::{self, PublishError},
    pubsub::{
        PubSubError, SessionOutbox,
        outbox::{DirectWrite, Drained, Outgoing},
    },
    rate_limit::ConnectionLimiter,
    state::AppState,
};

/// Close codes (see docs/protocol.md).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    /// The client broke the WebSocket framing rules (RFC 6455 §7.4.1).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
    pub const IDLE_TIMEOUT: u16 = 4000;
    /// The handshake frame was missing, late, not an `auth` frame, or its token was refused.
    pub const AUTH_FAILED: u16 = 4001;
    /// The token expired without a `refresh`.
    pub const TOKEN_EXPIRED: u16 = 4003;
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
    /// The client sent a close frame (with this code): answer it, and end.
    ClientClosed(Option<u16>),
    Gone,
}

/// What the client sent.
#[derive(Debug)]
pub enum Inbound {
    Text(Utf8Bytes),
    /// A frame the protocol does not accept (a binary frame).
    Unsupported,
    /// A ping: answer with a pong carrying `payload`.
    Ping(Bytes),
    /// Proof of life without content (pongs).
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
    /// Answer a ping the client sent.
    fn pong(&mut self, _payload: Bytes) -> impl Future<Output = Result<(), End>> + Send {
        std::future::ready(Ok(()))
    }
    /// Say goodbye with `code`, best effort and bounded in time.
    fn close(&mut self, code: u16, reason: &'static str) -> impl Future<Output = ()> + Send;
    /// Answer the client's close frame (echoing its code), best effort and bounded in time.
    fn close_reply(&mut self, _code: Option<u16>) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
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
    /// The authenticated `sub`, for the access log.
    pub subject: Option<String>,
}

/// What the connection may do. Decided by the transport's HTTP side (a token in the request,
/// or none), then changed only by the session (handshake frame, refresh).
#[derive(Debug, Clone)]
pub enum Access {
    /// `auth.mode = disabled`: nothing is checked, exactly as without authentication.
    Open,
    /// A WebSocket opened without a token: until an `auth` frame is accepted (within
    /// `auth.handshake_timeout`) no other frame is; query subscriptions wait for it.
    AwaitingToken,
    /// Every subscribe and publish is checked against this principal until its `exp`. Boxed:
    /// connections without a token do not carry its room.
    Granted(Box<Principal>),
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
    access: Access,
    /// Subscriptions asked for before the handshake frame; made once it is accepted.
    pending: Vec<(String, Option<i64>)>,
    /// Handshake deadline, or the next expiry step of the token; `None` without auth. The
    /// event loop owns the timer itself and re-arms it when `deadline_changed`.
    auth_deadline: Option<tokio::time::Instant>,
    deadline_changed: bool,
    /// `token_expiring` was sent for the current token.
    warned: bool,
    /// `limits.publish_per_connection`, made on the first publish (`None`: off, or no publish
    /// yet); boxed, so subscribe-only connections do not carry it.
    publish_limit: Option<Box<ConnectionLimiter>>,
    /// A direct write left the rest of a frame with the transport: write before waiting.
    unfinished: bool,
    /// Publishes waiting for their commit, answered in the order they were sent; boxed and
    /// created on the first publish, so subscribe-only connections do not carry it.
    publishes: Option<Box<Publishes>>,
}

/// The answers of in-flight publishes: an `ack` or error frame, or nothing (a publish without
/// `ref` that succeeded).
type Publishes = futures_util::stream::FuturesOrdered<
    futures_util::future::BoxFuture<'static, Option<ServerFrame>>,
>;

impl Session {
    /// A session without authentication checks ([`Access::Open`]).
    pub fn new(state: AppState) -> Self {
        Self::with_access(state, Access::Open)
    }

    pub fn with_access(state: AppState, access: Access) -> Self {
        let capacity = state.settings.ws.outbox_capacity;
        let mut session = Self {
            outbox: Arc::new(
                SessionOutbox::new(capacity).with_max_bytes(state.settings.ws.outbox_max_bytes),
            ),
            // A replaying channel holds at most as many live frames as the outbox would.
            subs: Subscriptions::new(capacity),
            publish_limit: None,
            state,
            queued: VecDeque::new(),
            announces: VecDeque::new(),
            read: None,
            out: Frames::new(),
            bad_frames: 0,
            traffic: Traffic::default(),
            access,
            pending: Vec::new(),
            auth_deadline: None,
            deadline_changed: false,
            warned: false,
            publishes: None,
            unfinished: false,
        };
        session.arm_auth_timer();
        session
    }

    /// The one authorisation check of both transports: may this connection do `action` on
    /// `channel`? Err is the message of the `forbidden` answer.
    pub fn authorise(&self, action: Action, channel: &str) -> Result<(), String> {
        match &self.access {
            Access::Open => Ok(()),
            Access::Granted(p) if p.allows(action, channel) => Ok(()),
            Access::Granted(p) => Err(format!(
                "`{}` may not {} `{channel}`",
                p.sub,
                action.as_str()
            )),
            Access::AwaitingToken => Err("not authenticated yet".to_owned()),
        }
    }

    pub fn settings(&self) -> &Arc<crate::config::Settings> {
        &self.state.settings
    }

    /// Let the delivery core write this connection's frames itself while the session waits
    /// with nothing to do (WebSocket; see `ws::writer`).
    pub fn set_direct(&self, writer: Arc<dyn DirectWrite>) {
        self.outbox.set_direct(writer);
    }

    /// Take the direct-write lane back (before any write of the session's own, and before
    /// applying what the outbox holds): what the fan-out delivered moves the streams on.
    fn reclaim(&mut self) {
        if let Some(written) = self.outbox.reclaim() {
            // The rest of a frame the socket took only in part goes out with the next write.
            self.unfinished |= written.unfinished;
            self.subs.absorb(&written.lane);
            self.traffic.frames_out += written.frames;
            self.traffic.bytes_out += written.bytes;
        }
    }

    /// [`reclaim`](Self::reclaim), then take what the outbox holds.
    fn drain(&mut self) -> Drained {
        self.reclaim();
        self.outbox.drain_into(&mut self.queued)
    }

    /// The authenticated subject, if any.
    pub fn subject(&self) -> Option<&str> {
        match &self.access {
            Access::Granted(p) => Some(&p.sub),
            _ => None,
        }
    }

    /// Set the timer for the current access: the handshake deadline, or the token's warning
    /// (`auth.expiry_warning` before `exp`) and then its expiry.
    fn arm_auth_timer(&mut self) {
        let auth = &self.state.settings.auth;
        let now = tokio::time::Instant::now();
        let deadline = match &self.access {
            Access::Open => None,
            Access::AwaitingToken => Some(deadline(now, auth.handshake_timeout)),
            Access::Granted(p) => {
                let left = p.expires_in();
                Some(if self.warned {
                    deadline(now, left)
                } else {
                    deadline(now, left.saturating_sub(auth.expiry_warning))
                })
            }
        };
        self.auth_deadline = deadline;
        self.deadline_changed = true;
    }

    fn on_auth_timer(&mut self) -> Result<(), End> {
        match &self.access {
            Access::Open => {
                self.auth_deadline = None;
                self.deadline_changed = true;
                Ok(())
            }
            Access::AwaitingToken => {
                Err(End::Close(close_code::AUTH_FAILED, "no auth frame in time"))
            }
            Access::Granted(p) if !self.warned && !p.expires_in().is_zero() => {
                self.reply(ServerFrame::token_expiring(p.exp));
                self.warned = true;
                self.arm_auth_timer();
                Ok(())
            }
            Access::Granted(_) => Err(End::Close(close_code::TOKEN_EXPIRED, "token expired")),
        }
    }

    /// The handshake frame: the only frame accepted while [`Access::AwaitingToken`].
    async fn on_handshake(&mut self, text: &str) -> Result<(), End> {
        const REFUSED: End = End::Close(close_code::AUTH_FAILED, "authentication failed");
        let Ok(ClientFrame::Auth { token }) = ClientFrame::parse(text) else {
            return Err(End::Close(
                close_code::AUTH_FAILED,
                "the first frame must be {\"type\":\"auth\",\"token\":…}",
            ));
        };
        let principal = match self.state.auth.verify(&token) {
            Ok(p) => p,
            Err(err) => {
                tracing::debug!(%err, "WebSocket handshake frame refused");
                return Err(REFUSED);
            }
        };
        self.reply(ServerFrame::authenticated(&principal.sub, principal.exp));
        self.access = Access::Granted(Box::new(principal));
        self.warned = false;
        self.arm_auth_timer();
        for (channel, since) in std::mem::take(&mut self.pending) {
            Box::pin(self.subscribe(&channel, since)).await;
        }
        Ok(())
    }

    /// `refresh`: a new token for the same subject replaces the old one and its permissions;
    /// channels it no longer allows are unsubscribed. A refused refresh leaves the old token
    /// in force (until its `exp`).
    async fn refresh(&mut self, token: &str) {
        let Access::Granted(current) = &self.access else {
            return;
        };
        let principal = match self.state.auth.verify(token) {
            Ok(p) if p.sub == current.sub => p,
            Ok(_) => {
                return self.reply(ServerFrame::error(
                    "unauthorized",
                    "a refresh token must have the same `sub`",
                ));
            }
            Err(err) => return self.reply(ServerFrame::error("unauthorized", &err.to_string())),
        };
        self.reply(ServerFrame::authenticated(&principal.sub, principal.exp));
        self.access = Access::Granted(Box::new(principal));
        self.warned = false;
        self.arm_auth_timer();
        for channel in self.subs.channels() {
            if self.authorise(Action::Subscribe, &channel).is_err() {
                self.unsubscribe(&channel).await;
            }
        }
    }

    /// Subscribe (the same path for the query string and for frames): the answer arrives
    /// through the outbox. Checked against the principal first (`forbidden` otherwise).
    pub async fn subscribe(&mut self, channel: &str, since: Option<i64>) {
        if matches!(self.access, Access::AwaitingToken) {
            self.pending.push((channel.to_owned(), since));
            return;
        }
        if let Err(message) = self.authorise(Action::Subscribe, channel) {
            return self.reply(ServerFrame::error("forbidden", &message));
        }
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
                if self.drain() == Drained::Overflowed {
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

    fn unknown_frame(&mut self, ty: &str) {
        let err = crate::protocol::FrameError::UnknownType(ty.to_owned());
        self.bad_frame(ServerFrame::error(err.code(), &err.to_string()));
    }

    fn bad_frame(&mut self, frame: ServerFrame) {
        self.bad_frames += 1;
        self.answer_now(frame);
    }

    /// Reply after the answers of the publishes still in flight, so that a connection's
    /// answers keep the order of its frames.
    fn answer_now(&mut self, frame: ServerFrame) {
        match &mut self.publishes {
            Some(publishes) if !publishes.is_empty() => {
                publishes.push_back(Box::pin(std::future::ready(Some(frame))));
            }
            _ => self.reply(frame),
        }
    }

    /// Whether another frame may be read: not while `ws.max_publishes_in_flight` publishes
    /// wait for their commit (the client's further frames wait in TCP: backpressure).
    fn can_read(&self) -> bool {
        self.publishes
            .as_ref()
            .is_none_or(|p| p.len() < self.state.settings.ws.max_publishes_in_flight)
    }

    /// Serve the connection until it ends. Dropping the session afterwards releases every
    /// subscription.
    pub async fn run(&mut self, transport: &mut impl Transport) -> Report {
        let end = self.event_loop(transport).await;
        // The session writes from here on.
        self.reclaim();
        let close_code = match end {
            End::Close(code, reason) => {
                if closes_for_client_error(code) {
                    // The answers to the frames that led here (their error frames) are queued;
                    // send them before the close, so it never looks unexplained.
                    self.drain_now();
                    for frame in &self.out {
                        self.traffic.frames_out += 1;
                        self.traffic.bytes_out += frame.text.len() as u64;
                    }
                    let _ = Box::pin(transport.send(&mut self.out)).await;
                }
                // Boxed: the goodbye's timer is not part of every idle connection's task.
                Box::pin(transport.close(code, reason)).await;
                Some(code)
            }
            End::ClientClosed(code) => {
                Box::pin(transport.close_reply(code)).await;
                None
            }
            End::Gone => None,
        };
        Report {
            close_code,
            traffic: std::mem::take(&mut self.traffic),
            subject: self.subject().map(str::to_owned),
        }
    }

    async fn event_loop(&mut self, transport: &mut impl Transport) -> End {
        let ping_interval = self.state.settings.ws.ping_interval;
        let lifecycle = self.state.lifecycle.clone();
        let keepalive = tokio::time::sleep(ping_interval);
        // Created once: re-creating it per wake-up would re-register with the token each time.
        let cancelled = lifecycle.cancelled();
        tokio::pin!(keepalive, cancelled);
        // Boxed and optional: connections without authentication carry no timer.
        let mut auth_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            if std::mem::take(&mut self.deadline_changed) {
                auth_timer = self
                    .auth_deadline
                    .map(|d| Box::pin(tokio::time::sleep_until(d)));
            }
            tokio::select! {
                _ = &mut cancelled => return End::Close(close_code::GOING_AWAY, "server shutting down"),
                ready = self.next_output() => {
                    if let Err(end) = ready {
                        return end;
                    }
                    if self.out.is_empty() && !self.unfinished {
                        continue; // Only room to read again.
                    }
                    self.unfinished = false;
                    let coalesce = self.state.settings.ws.coalesce_delay;
                    if !coalesce.is_zero() {
                        // Boxed so connections without coalescing do not carry the timer.
                        Box::pin(tokio::time::sleep(coalesce)).await;
                        self.drain_now();
                    }
                    self.reclaim();
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
                inbound = transport.recv(), if self.can_read() => match inbound {
                    Inbound::Text(text) => {
                        self.traffic.frames_in += 1;
                        self.traffic.bytes_in += text.len() as u64;
                        // Boxed: frame handling (publish, subscribe) needs large futures that
                        // would otherwise bloat every idle connection's task.
                        if let Err(end) = Box::pin(self.on_text(&text)).await {
                            return end;
                        }
                        if self.bad_frames >= MAX_CONSECUTIVE_BAD_FRAMES {
                            return End::Close(close_code::POLICY, "too many invalid frames");
                        }
                    }
                    // Not the `auth` frame the handshake waits for.
                    Inbound::Unsupported if matches!(self.access, Access::AwaitingToken) => {
                        return End::Close(
                            close_code::AUTH_FAILED,
                            "the first frame must be {\"type\":\"auth\",\"token\":…}",
                        );
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
                    Inbound::Ping(payload) => {
                        self.reclaim();
                        if let Err(end) = Box::pin(transport.pong(payload)).await {
                            return end;
                        }
                    }
                    Inbound::Alive => {}
                    Inbound::End(end) => return end,
                },
                _ = poll_timer(&mut auth_timer) => {
                    if let Err(end) = self.on_auth_timer() {
                        return end;
                    }
                }
                _ = &mut keepalive => {
                    self.reclaim();
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
        if self.drain() == Drained::Items {
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
            if !self.out.is_empty() || self.unfinished {
                return Ok(());
            }
            if self.read.is_none() {
                self.read = self.start_read();
            }
            if self.read.is_none() && self.publishes.as_ref().is_none_or(|p| p.is_empty()) {
                // The common case: nothing to read from history, only the outbox to wait for.
                // Until something needs the session, the fan-out writes live frames itself
                // (not while coalescing, which exists to gather frames into one write).
                if self.state.settings.ws.coalesce_delay.is_zero() {
                    self.reclaim();
                    self.outbox.arm(self.subs.lane());
                }
                self.outbox.ready().await;
                if self.drain() == Drained::Overflowed {
                    return Err(End::Close(close_code::SLOW_CONSUMER, "slow consumer"));
                }
                continue;
            }
            tokio::select! {
                _ = self.outbox.ready() => {
                    if self.drain() == Drained::Overflowed {
                        return Err(End::Close(close_code::SLOW_CONSUMER, "slow consumer"));
                    }
                }
                // A publish's answer is a frame to send like any other.
                Some(answer) = next_answer(&mut self.publishes) => {
                    if let Some(frame) = answer {
                        self.outbox.reply(frame);
                    } else if self.publishes.as_ref().is_some_and(|p| {
                        p.len() + 1 == self.state.settings.ws.max_publishes_in_flight
                    }) {
                        // Room for another publish: back to the event loop, which reads again.
                        return Ok(());
                    }
                }
                done = poll_read(&mut self.read), if self.read.is_some() => {
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

    async fn on_text(&mut self, text: &str) -> Result<(), End> {
        if matches!(self.access, Access::AwaitingToken) {
            return self.on_handshake(text).await;
        }
        let frame = match ClientFrame::parse(text) {
            Ok(frame) => frame,
            Err(err) => {
                // An invalid publish's error names it by its `ref` when that much is readable.
                let reference = crate::protocol::frame_ref(text);
                let frame =
                    ServerFrame::error_for(err.code(), &err.to_string(), reference.as_deref());
                self.bad_frame(frame);
                return Ok(());
            }
        };
        self.bad_frames = 0;
        match frame {
            ClientFrame::Subscribe { channel, since } => self.subscribe(&channel, since).await,
            ClientFrame::Unsubscribe { channel } => self.unsubscribe(&channel).await,
            ClientFrame::Auth { token } | ClientFrame::Refresh { token }
                if matches!(self.access, Access::Granted(_)) =>
            {
                self.refresh(&token).await
            }
            // Without authentication these frames do not exist, exactly as before it did.
            ClientFrame::Auth { .. } => self.unknown_frame("auth"),
            ClientFrame::Refresh { .. } => self.unknown_frame("refresh"),
            ClientFrame::Publish {
                channel,
                data,
                expected_last_id,
                idempotency_key,
                reference,
            } => {
                let reference = reference.map(|r| r.to_owned());
                if let Err(message) = self.authorise(Action::Publish, &channel) {
                    let frame = ServerFrame::error_for("forbidden", &message, reference.as_deref());
                    self.answer_now(frame);
                    return Ok(());
                }
                // Accepted while this replica has no broker connection, as over HTTP: once
                // Postgres committed it the message is durable, and every replica's catch-up
                // delivers it when Redis is back.
                if self.publish_limit.is_none() {
                    self.publish_limit = self.state.limits.connection_limiter().map(Box::new);
                }
                if let Some(Err(limited)) = self.publish_limit.as_ref().map(|l| l.check()) {
                    let message = limited.to_string();
                    let frame =
                        ServerFrame::error_for("rate_limited", &message, reference.as_deref());
                    self.answer_now(frame);
                    return Ok(());
                }
                let subject = self.subject();
                let message = publish::Message {
                    channel: &channel,
                    data,
                    expected_last_id,
                    idempotency_key: idempotency_key.as_deref(),
                };
                // Waits only for room in the commit queue (publish.queue_wait): the commit
                // itself is awaited beside the connection's other work.
                match publish::submit(&self.state, message, subject).await {
                    Err(err) => {
                        let frame = publish_error_frame(&err, &channel, reference.as_deref());
                        self.answer_now(frame);
                    }
                    Ok(pending) => {
                        let channel: Box<str> = (*channel).into();
                        let answer = async move {
                            match pending.published().await {
                                Ok(p) => reference
                                    .map(|r| ServerFrame::ack(&r, &p.channel, p.id, p.replayed)),
                                Err(err) => {
                                    Some(publish_error_frame(&err, &channel, reference.as_deref()))
                                }
                            }
                        };
                        self.publishes
                            .get_or_insert_default()
                            .push_back(Box::pin(answer));
                    }
                }
            }
            // After the answers of earlier publishes: a ping is how a client knows they are done.
            ClientFrame::Ping => self.answer_now(ServerFrame::pong()),
        }
        Ok(())
    }
}

/// The error frame of a publish that failed.
fn publish_error_frame(
    err: &PublishError,
    channel: &str,
    reference: Option<&serde_json::value::RawValue>,
) -> ServerFrame {
    let (code, message) = match err {
        PublishError::RateLimited(limited) => ("rate_limited", limited.to_string()),
        PublishError::ChannelLimit { .. } => ("channel_limit", err.to_string()),
        PublishError::Conflict { .. } => ("conflict", err.to_string()),
        PublishError::KeyReused { .. } => ("idempotency_key_reused", err.to_string()),
        PublishError::Store(store) if store.is_data_rejected() => (
            "invalid_frame",
            "invalid `publish` frame: `data` cannot be stored".to_owned(),
        ),
        PublishError::Unavailable(err) => ("unavailable", format!("publish refused: {err}")),
        PublishError::Store(store) => {
            tracing::warn!(err = %store, channel, "publish over WebSocket failed");
            (
                "unavailable",
                "publish failed: message store unavailable".to_owned(),
            )
        }
    };
    ServerFrame::error_for(code, &message, reference)
}

/// The next answer of an in-flight publish; pending while there is none.
async fn next_answer(publishes: &mut Option<Box<Publishes>>) -> Option<Option<ServerFrame>> {
    use futures_util::StreamExt;
    match publishes {
        Some(publishes) if !publishes.is_empty() => publishes.next().await,
        _ => std::future::pending().await,
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.state
            .pubsub
            .leave(self.subs.channels(), Arc::clone(&self.outbox));
    }
}

/// Closes caused by what the client sent, after which its pending answers are still worth
/// sending. Not a slow consumer (it would not read them) nor shutdown (bounded by the drain).
fn closes_for_client_error(code: u16) -> bool {
    use close_code::*;
    matches!(
        code,
        POLICY | TOO_BIG | PROTOCOL_ERROR | INVALID_PAYLOAD | AUTH_FAILED
    )
}

/// `now + after`, saturating: a token's `exp` is the issuer's number and may be as far away as
/// `u64::MAX` seconds, where `Instant + Duration` would panic.
fn deadline(now: tokio::time::Instant, after: Duration) -> tokio::time::Instant {
    now.checked_add(after)
        .unwrap_or_else(|| now + crate::config::MAX_DURATION)
}

async fn poll_read(read: &mut Option<Read>) -> ReadDone {
    match read {
        Some(read) => read.await,
        None => std::future::pending().await,
    }
}

async fn poll_timer(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(timer) => timer.as_mut().await,
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
