//! The listener: the thin I/O shell around the delivery [`Core`], one per replica.
//!
//! Three tasks, joined by bounded queues, so that nothing in the fan-out path ever awaits Redis
//! or Postgres:
//!
//! * the **core task** owns the [`Core`] (channel registry, sequencing, recovery decisions). It
//!   takes [`Event`]s from one inbox — session commands, broker messages, I/O answers — fans
//!   messages out, and hands the I/O the core asks for to the two tasks below with `try_send`
//!   (what does not fit waits in a backlog bounded by the number of channels).
//! * the **broker task** owns the pub/sub connection (Redis, or the in-process broker): it
//!   connects with backoff, forwards every received message to the inbox, and runs
//!   SUBSCRIBE/UNSUBSCRIBE. If the inbox stays full for [`INGEST_STALL`] it drops the connection
//!   rather than let the driver buffer without bound; the reconnect's head checks recover what
//!   was lost from history.
//! * the **heads task** reads channels' committed heads from history (subscribe positions,
//!   resynchronisation after a reconnect, the periodic tail check).

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{
    config::RedisSettings,
    core::{Action, Core, Stats},
    history::HistoryReader,
    lifecycle::Lifecycle,
    protocol::{Envelope, ServerFrame},
    telemetry::otel,
};

use super::{
    CommittedMessage, PubSubError,
    broker::{Incoming, Sink, Source, Stream},
    outbox::SessionOutbox,
};

/// Events waiting for the core task. Senders wait when it is full: sessions (backpressure on
/// subscribing, counted) and the broker reader (up to [`INGEST_STALL`]).
pub const INBOX: usize = 8192;
/// Subscription commands waiting for the broker task.
const CONTROL_QUEUE: usize = 1024;
/// Head reads waiting for the heads task (each is a batch of channels).
const HEADS_QUEUE: usize = 64;
/// Events the core task handles before it looks at timers and I/O again.
const BATCH: usize = 256;
/// How long the broker reader waits for room in a full inbox before it gives up the
/// connection (and with it the driver's unbounded buffer).
pub const INGEST_STALL: Duration = Duration::from_secs(5);
/// How soon the core task retries I/O requests that found their queue full.
const BACKLOG_RETRY: Duration = Duration::from_millis(10);
/// Channels per SUBSCRIBE command when resubscribing after a reconnect.
const SUBSCRIBE_CHUNK: usize = 512;

/// Everything the core task reacts to.
#[derive(Debug)]
pub enum Event {
    Subscribe {
        channel: Box<str>,
        outbox: Arc<SessionOutbox>,
        since: Option<i64>,
    },
    Unsubscribe {
        channel: Box<str>,
        outbox: Arc<SessionOutbox>,
    },
    /// The session ended: forget it everywhere, silently.
    Leave {
        channels: Vec<Box<str>>,
        outbox: Arc<SessionOutbox>,
    },
    Connected,
    Disconnected,
    Message(Incoming),
    Subscribed {
        channels: Vec<Arc<str>>,
        ok: bool,
    },
    Heads(Vec<(Arc<str>, Option<i64>)>),
    /// Messages this replica just committed: delivered to local subscribers at once, without
    /// the round trip through the broker (whose echo is then dropped by offset).
    Committed(Arc<[CommittedMessage]>),
    /// Test hook: make the core task panic, to prove supervision.
    Panic,
}

/// Shared, read-only view of the listener for readiness checks.
#[derive(Debug, Default)]
pub struct ListenerStatus {
    connected: AtomicBool,
}

impl ListenerStatus {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn set(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }
}

/// The queues between the three tasks; created by [`start`].
pub struct Listener {
    pub inbox: mpsc::Sender<Event>,
    pub status: Arc<ListenerStatus>,
}

/// Start the core, broker and heads tasks.
pub fn start(
    source: Source,
    settings: RedisSettings,
    core: Core<SessionOutbox>,
    history: HistoryReader,
    replica: u64,
    lifecycle: &Lifecycle,
) -> Listener {
    let (inbox, inbox_rx) = mpsc::channel(INBOX);
    let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let (heads, heads_rx) = mpsc::channel(HEADS_QUEUE);
    let status = Arc::new(ListenerStatus::default());
    let core_task = CoreTask {
        core,
        inbox: inbox_rx,
        control,
        heads,
        backlog: VecDeque::new(),
        prefix: settings.channel_prefix.clone(),
        replica,
        invalid_payloads: RateLimitedWarning::new(Duration::from_secs(10)),
        lifecycle: lifecycle.clone(),
    };
    lifecycle.spawn_critical("pubsub_core", core_task.run());
    let broker = BrokerTask {
        source,
        settings,
        inbox: inbox.clone(),
        control: control_rx,
        status: Arc::clone(&status),
        lifecycle: lifecycle.clone(),
    };
    lifecycle.spawn_critical("pubsub_broker", broker.run());
    lifecycle.spawn_critical(
        "pubsub_heads",
        read_heads(history, heads_rx, inbox.clone(), lifecycle.clone()),
    );
    Listener { inbox, status }
}

/// A subscription command for the broker task.
#[derive(Debug)]
enum Control {
    Subscribe(Arc<str>),
    Unsubscribe(Arc<str>),
}

impl From<Control> for Action {
    fn from(control: Control) -> Self {
        match control {
            Control::Subscribe(channel) => Action::Subscribe(channel),
            Control::Unsubscribe(channel) => Action::Unsubscribe(channel),
        }
    }
}

struct CoreTask {
    core: Core<SessionOutbox>,
    inbox: mpsc::Receiver<Event>,
    control: mpsc::Sender<Control>,
    heads: mpsc::Sender<Vec<Arc<str>>>,
    /// Actions the I/O queues had no room for yet; at most a few per channel.
    backlog: VecDeque<Action>,
    prefix: String,
    /// This replica's id in envelopes: its own messages come back as echoes.
    replica: u64,
    invalid_payloads: RateLimitedWarning,
    lifecycle: Lifecycle,
}

impl CoreTask {
    async fn run(mut self) {
        // One timer, moved only when the core's next deadline changes: registering a fresh one
        // per event would churn the runtime's timer wheel (and wake parked workers) per message.
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        loop {
            let backlogged = !self.backlog.is_empty();
            // The I/O queues were full: try again shortly.
            let deadline = match self.core.next_deadline() {
                Some(d) if backlogged => Some(d.min(Instant::now() + BACKLOG_RETRY)),
                None if backlogged => Some(Instant::now() + BACKLOG_RETRY),
                d => d,
            };
            if deadline != armed {
                if let Some(deadline) = deadline {
                    timer.as_mut().reset(deadline.into());
                }
                armed = deadline;
            }
            tokio::select! {
                _ = self.lifecycle.cancelled() => break,
                event = self.inbox.recv() => match event {
                    Some(event) => self.handle(event),
                    None => break,
                },
                _ = &mut timer, if armed.is_some() => armed = None,
            }
            for _ in 1..BATCH {
                match self.inbox.try_recv() {
                    Ok(event) => self.handle(event),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if self.core.next_deadline().is_some_and(|d| d <= now) {
                self.core.tick(now);
            }
            self.dispatch();
            record(self.core.take_stats());
            metrics::gauge!("relay_redis_channels").set(self.core.channel_count() as f64);
            metrics::gauge!("relay_subscriptions").set(self.core.subscription_count() as f64);
        }
        tracing::debug!("pub/sub core stopped");
    }

    fn handle(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Subscribe {
                channel,
                outbox,
                since,
            } => self.core.subscribe(&channel, &outbox, since),
            Event::Unsubscribe { channel, outbox } => self.core.unsubscribe(&channel, &outbox),
            Event::Leave { channels, outbox } => {
                outbox.close();
                self.core.leave(&channels, &outbox);
            }
            Event::Connected => {
                self.backlog.clear();
                self.core.broker_up(now);
            }
            Event::Disconnected => {
                self.backlog.clear();
                self.core.broker_down();
            }
            Event::Message(msg) => self.on_message(msg.channel(), msg.payload(), now),
            Event::Subscribed { channels, ok } => {
                for channel in channels {
                    self.core.subscribe_result(&channel, ok);
                }
            }
            Event::Heads(heads) => self.core.heads(heads, now),
            Event::Committed(messages) => {
                for m in messages.iter() {
                    if self.core.is_tracked(&m.channel) {
                        let frame = ServerFrame::message(&m.channel, &m.data, Some(m.id));
                        self.core.own_message(&m.channel, m.id, frame, now);
                    }
                }
            }
            Event::Panic => panic!("test hook: pub/sub core panic requested"),
        }
    }

    fn on_message(&mut self, full_channel: &str, payload: &[u8], now: Instant) {
        let Some(channel) = full_channel.strip_prefix(&*self.prefix) else {
            return;
        };
        if !self.core.is_tracked(channel) {
            return; // Arrived right after the last local subscriber left.
        }
        let envelope = match Envelope::parse(payload) {
            Ok(envelope) => envelope,
            Err(err) => {
                metrics::counter!("relay_redis_invalid_payloads_total").increment(1);
                metrics::counter!("relay_messages_dropped_total", "reason" => "invalid_payload")
                    .increment(1);
                self.invalid_payloads.warn(|suppressed| {
                    tracing::warn!(channel, %err, suppressed, "skipping Redis payload that is not a relay envelope");
                });
                return;
            }
        };
        if let Some(ts) = envelope.ts {
            let lag_us = chrono::Utc::now()
                .timestamp_micros()
                .saturating_sub(ts)
                .max(0);
            metrics::histogram!("relay_listener_lag_seconds").record(lag_us as f64 / 1e6);
        }
        let id = envelope.offset();
        // Join the publisher's trace when it sent one (only then: spans per message cost).
        let span = envelope.traceparent.as_deref().map(|traceparent| {
            let span = tracing::info_span!("fan_out", channel, id);
            otel::set_parent_from_traceparent(&span, traceparent);
            span
        });
        let _entered = span.as_ref().map(tracing::Span::enter);
        let frame = ServerFrame::message(channel, envelope.data, id);
        match id {
            Some(id) if envelope.replica == Some(self.replica) => {
                self.core.own_message(channel, id, frame, now);
            }
            _ => self.core.message(channel, id, frame, now),
        }
    }

    /// Hand the core's I/O requests to the broker and heads tasks, never waiting.
    fn dispatch(&mut self) {
        while let Some(action) = self.backlog.pop_front().or_else(|| self.core.poll_action()) {
            let control = |c: Control| self.control.try_send(c).map_err(|e| e.into_inner().into());
            let sent = match action {
                Action::Subscribe(channel) => control(Control::Subscribe(channel)),
                Action::Unsubscribe(channel) => control(Control::Unsubscribe(channel)),
                Action::ReadHeads(channels) => self
                    .heads
                    .try_send(channels)
                    .map_err(|e| Action::ReadHeads(e.into_inner())),
            };
            if let Err(action) = sent {
                metrics::counter!("relay_listener_io_backlog_total").increment(1);
                self.backlog.push_front(action);
                return;
            }
        }
    }
}

/// The core's counters, into metrics.
fn record(stats: Stats) {
    if stats == Stats::default() {
        return;
    }
    metrics::counter!("relay_messages_delivered_total").increment(stats.delivered);
    if stats.slow_consumers > 0 {
        metrics::counter!("relay_slow_consumer_disconnects_total").increment(stats.slow_consumers);
        metrics::counter!("relay_messages_dropped_total", "reason" => "slow_consumer")
            .increment(stats.slow_consumers);
    }
    if stats.subscribers_gone > 0 {
        metrics::counter!("relay_messages_dropped_total", "reason" => "subscriber_gone")
            .increment(stats.subscribers_gone);
    }
    if stats.duplicates > 0 {
        metrics::counter!("relay_duplicates_dropped_total").increment(stats.duplicates);
        metrics::counter!("relay_messages_dropped_total", "reason" => "duplicate")
            .increment(stats.duplicates);
    }
    if stats.gaps > 0 {
        metrics::counter!("relay_gaps_declared_total").increment(stats.gaps);
    }
    if stats.echoes > 0 {
        metrics::counter!("relay_own_echoes_total").increment(stats.echoes);
    }
}

struct BrokerTask {
    source: Source,
    settings: RedisSettings,
    inbox: mpsc::Sender<Event>,
    control: mpsc::Receiver<Control>,
    status: Arc<ListenerStatus>,
    lifecycle: Lifecycle,
}

impl BrokerTask {
    async fn run(mut self) {
        let mut backoff = Backoff::new(
            self.settings.reconnect_min_delay,
            self.settings.reconnect_max_delay,
        );
        let mut ever_connected = false;
        loop {
            let connect =
                tokio::time::timeout(self.settings.connect_timeout, self.source.connect());
            let connected = tokio::select! {
                _ = self.lifecycle.cancelled() => break,
                result = connect => result.map_err(|_| PubSubError::Timeout).and_then(|r| r),
            };
            let (sink, stream) = match connected {
                Ok(connection) => connection,
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%err, retry_in = ?delay, "broker connect failed");
                    if self.pause(delay).await {
                        break;
                    }
                    continue;
                }
            };
            backoff.reset();
            // Commands queued for the previous connection are moot: the core resubscribes.
            while self.control.try_recv().is_ok() {}
            self.status.set(true);
            if ever_connected {
                metrics::counter!("relay_redis_reconnects_total").increment(1);
                tracing::info!(
                    "broker reconnected; resubscribing and checking every channel's head"
                );
            } else {
                tracing::info!("pub/sub listener connected");
            }
            ever_connected = true;
            if self.inbox.send(Event::Connected).await.is_err() {
                break;
            }
            let reason = self.serve(sink, stream).await;
            self.status.set(false);
            let Some(reason) = reason else { break };
            tracing::warn!(reason, "broker connection lost; reconnecting");
            if self.inbox.send(Event::Disconnected).await.is_err() {
                break;
            }
            if self.pause(backoff.next_delay()).await {
                break;
            }
        }
        self.status.set(false);
        tracing::debug!("broker task stopped");
    }

    /// Sleep, or return true if shutdown started meanwhile.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.lifecycle.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
        }
    }

    /// Move messages and commands until the connection fails (`Some(reason)`) or shutdown.
    async fn serve(&mut self, mut sink: Sink, mut stream: Stream) -> Option<&'static str> {
        loop {
            tokio::select! {
                _ = self.lifecycle.cancelled() => return None,
                msg = stream.next() => {
                    let Some(msg) = msg else { return Some("connection closed") };
                    if !stream.buffers_without_bound() {
                        // In-process: waiting here makes the publishers wait; nothing piles up.
                        if self.inbox.send(Event::Message(msg)).await.is_err() {
                            return None;
                        }
                        continue;
                    }
                    match tokio::time::timeout(INGEST_STALL, self.inbox.send(Event::Message(msg))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return None,
                        Err(_) => {
                            metrics::counter!("relay_listener_ingest_stalls_total").increment(1);
                            return Some("the core fell behind; dropping the connection to bound buffering");
                        }
                    }
                }
                command = self.control.recv() => {
                    let command = command?;
                    if let Err(err) = self.execute(&mut sink, command).await {
                        tracing::warn!(%err, "subscription command failed");
                        return Some("subscription command failed");
                    }
                }
            }
        }
    }

    /// Run `first` and every command queued behind it, SUBSCRIBEs in batches.
    async fn execute(&mut self, sink: &mut Sink, first: Control) -> Result<(), PubSubError> {
        let mut next = Some(first);
        let mut subscribe: Vec<Arc<str>> = Vec::new();
        while let Some(command) = next.take() {
            match command {
                Control::Subscribe(channel) => subscribe.push(channel),
                Control::Unsubscribe(channel) => {
                    self.subscribe(sink, std::mem::take(&mut subscribe)).await?;
                    let name = format!("{}{}", self.settings.channel_prefix, channel);
                    self.bounded(sink.unsubscribe(&name)).await?;
                }
            }
            if subscribe.len() < SUBSCRIBE_CHUNK {
                next = self.control.try_recv().ok();
            }
        }
        self.subscribe(sink, subscribe).await
    }

    async fn subscribe(
        &mut self,
        sink: &mut Sink,
        channels: Vec<Arc<str>>,
    ) -> Result<(), PubSubError> {
        if channels.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = channels
            .iter()
            .map(|c| format!("{}{}", self.settings.channel_prefix, c))
            .collect();
        let result = self.bounded(sink.subscribe(&names)).await;
        let ok = result.is_ok();
        // The core must hear the answer either way; the inbox may be full for a while.
        let _ = self.inbox.send(Event::Subscribed { channels, ok }).await;
        result
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, PubSubError> {
        Ok(tokio::time::timeout(self.settings.command_timeout, fut)
            .await
            .map_err(|_| PubSubError::Timeout)??)
    }
}

/// The heads task: answer [`Action::ReadHeads`] from history, one batch at a time.
async fn read_heads(
    history: HistoryReader,
    mut requests: mpsc::Receiver<Vec<Arc<str>>>,
    inbox: mpsc::Sender<Event>,
    lifecycle: Lifecycle,
) {
    loop {
        let channels = tokio::select! {
            _ = lifecycle.cancelled() => return,
            channels = requests.recv() => match channels { Some(c) => c, None => return },
        };
        let answers = match history.heads(&channels).await {
            Ok(heads) => channels
                .into_iter()
                .zip(heads.into_iter().map(Some))
                .collect(),
            Err(err) => {
                tracing::warn!(%err, channels = channels.len(), "cannot read channel heads");
                channels.into_iter().map(|c| (c, None)).collect()
            }
        };
        if inbox.send(Event::Heads(answers)).await.is_err() {
            return;
        }
    }
}

/// Exponential backoff with jitter, between `min` and `max`.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            attempt: 0,
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    /// "Equal jitter": half the exponential delay plus a random half, so replicas that lost
    /// Redis together do not reconnect in lockstep.
    fn next_delay(&mut self) -> Duration {
        let exp = self
            .min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        exp / 2 + exp.mul_f64(fastrand::f64() / 2.0)
    }
}

/// Logs a warning at most once per period, reporting how many were suppressed in between.
#[derive(Debug)]
struct RateLimitedWarning {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedWarning {
    fn new(period: Duration) -> Self {
        Self {
            period,
            last: None,
            suppressed: 0,
        }
    }

    fn warn(&mut self, log: impl FnOnce(u64)) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < self.period)
        {
            self.suppressed += 1;
            return;
        }
        log(self.suppressed);
        self.last = Some(now);
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
