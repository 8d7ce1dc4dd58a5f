//! The listener: one task per replica that owns the dedicated pub/sub connection (Redis, or the
//! in-process broker of embedded mode; see [`super::broker`]).
//!
//! It SUBSCRIBEs a channel when the first local session subscribes and UNSUBSCRIBEs when the last
//! one leaves (never PSUBSCRIBE to everything), turns every Redis message into one encoded frame
//! and fans it out through the [`ChannelRegistry`]. Sessions talk to it only through a bounded
//! command queue, so the registry has a single owner and needs no lock.
//!
//! Messages carrying an offset go through the channel's [`Sequencer`]: duplicates are dropped,
//! reordering is undone, and gaps are filled from Postgres, so subscribers see consecutive
//! offsets.
//!
//! If the connection drops, the listener keeps serving commands (answering subscribes with
//! `unavailable`), reconnects with exponential backoff and jitter, resubscribes every channel
//! that still has local subscribers, and catches each one up from Postgres, so clients that stayed
//! connected through the outage miss nothing that was committed meanwhile.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    config::{HistorySettings, RedisSettings},
    lifecycle::Lifecycle,
    protocol::{Envelope, ServerFrame},
    store::messages::StoredMessage,
    telemetry::otel,
};

use super::{
    PubSubError,
    broker::{Incoming, Sink, Source, Stream},
    outbox::{Outgoing, Replay, SessionOutbox},
    registry::{ChannelRegistry, FanOut},
    sequencer::Sequencer,
};

/// Rows read per query when catching up after a reconnect or filling a gap.
const CATCH_UP_PAGE: i64 = 1000;

/// Requests from sessions to the listener.
#[derive(Debug)]
pub enum Command {
    /// Add the outbox to the channel once Redis confirmed the subscription, then queue
    /// `subscribed` (or a replay, or an `unavailable` error frame) into it.
    Subscribe {
        channel: Box<str>,
        outbox: Arc<SessionOutbox>,
        /// Replay stored messages after this offset before live ones.
        since: Option<i64>,
        /// Ok carries the offset live delivery continues after.
        reply: oneshot::Sender<Result<i64, PubSubError>>,
    },
    /// Remove the outbox from the channel and queue `unsubscribed` into it.
    Unsubscribe {
        channel: Box<str>,
        outbox: Arc<SessionOutbox>,
    },
    /// The session ended: forget it everywhere, silently.
    Leave {
        channels: Vec<Box<str>>,
        outbox: Arc<SessionOutbox>,
    },
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
}

/// What the listener reads history from.
#[derive(Clone)]
pub struct HistorySource {
    pub store: crate::store::MessageStore,
    pub settings: HistorySettings,
    /// Upper bound for one Postgres read.
    pub timeout: Duration,
}

pub struct Listener {
    source: Source,
    settings: RedisSettings,
    history: HistorySource,
    registry: ChannelRegistry,
    commands: mpsc::Receiver<Command>,
    status: Arc<ListenerStatus>,
    lifecycle: Lifecycle,
    sink: Option<Sink>,
    /// Channels left without subscribers by fan-out pruning, to UNSUBSCRIBE.
    orphaned: Vec<Box<str>>,
    invalid_payloads: RateLimitedWarning,
}

impl Listener {
    pub fn new(
        source: Source,
        settings: RedisSettings,
        history: HistorySource,
        commands: mpsc::Receiver<Command>,
        status: Arc<ListenerStatus>,
        lifecycle: Lifecycle,
    ) -> Self {
        Self {
            source,
            settings,
            history,
            registry: ChannelRegistry::new(),
            commands,
            status,
            lifecycle,
            sink: None,
            orphaned: Vec::new(),
            invalid_payloads: RateLimitedWarning::new(Duration::from_secs(10)),
        }
    }

    pub async fn run(mut self) {
        let mut stream: Option<Stream> = None;
        let mut backoff = Backoff::new(
            self.settings.reconnect_min_delay,
            self.settings.reconnect_max_delay,
        );
        let mut reconnect_at = tokio::time::Instant::now();
        let mut ever_connected = false;
        loop {
            let connected = stream.is_some();
            let next_gap = self.registry.next_gap().map(|(deadline, _)| deadline);
            tokio::select! {
                _ = self.lifecycle.cancelled() => break,
                command = self.commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => break,
                },
                msg = next_message(&mut stream), if connected => match msg {
                    Some(msg) => self.on_message(msg.channel(), msg.payload()),
                    None => {
                        tracing::warn!("Redis pub/sub connection lost; reconnecting");
                        self.sink = None;
                    }
                },
                _ = sleep_until_opt(next_gap) => self.fill_due_gaps().await,
                _ = tokio::time::sleep_until(reconnect_at), if !connected => {
                    match self.connect().await {
                        Ok(new_stream) => {
                            stream = Some(new_stream);
                            backoff.reset();
                            if ever_connected {
                                metrics::counter!("relay_redis_reconnects_total").increment(1);
                                tracing::info!(channels = self.registry.channel_count(), "Redis pub/sub reconnected and resubscribed");
                                self.catch_up_all().await;
                            } else {
                                tracing::info!("Redis pub/sub listener connected");
                            }
                            ever_connected = true;
                        }
                        Err(err) => {
                            let delay = backoff.next_delay();
                            tracing::warn!(%err, retry_in = ?delay, "Redis pub/sub connect failed");
                            reconnect_at = tokio::time::Instant::now() + delay;
                        }
                    }
                }
            }
            if !self.orphaned.is_empty() {
                self.release_orphaned().await;
            }
            // A failed command drops the sink; make the stream follow so we reconnect.
            if self.sink.is_none() && stream.is_some() {
                stream = None;
            }
            if stream.is_none() && self.status.is_connected() {
                self.status.connected.store(false, Ordering::Relaxed);
                reconnect_at = tokio::time::Instant::now() + backoff.next_delay();
            }
            self.publish_gauges();
        }
        self.status.connected.store(false, Ordering::Relaxed);
        tracing::debug!("Redis listener stopped");
    }

    /// Connect and resubscribe every channel that has local subscribers.
    async fn connect(&mut self) -> Result<Stream, PubSubError> {
        let (mut sink, stream) =
            tokio::time::timeout(self.settings.connect_timeout, self.source.connect())
                .await
                .map_err(|_| PubSubError::Timeout)??;
        let channels: Vec<String> = self
            .registry
            .channels()
            .map(|c| self.redis_channel(c))
            .collect();
        for chunk in channels.chunks(512) {
            self.with_timeout(sink.subscribe(chunk)).await?;
        }
        self.sink = Some(sink);
        self.status.connected.store(true, Ordering::Relaxed);
        Ok(stream)
    }

    async fn with_timeout<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, PubSubError> {
        Ok(tokio::time::timeout(self.settings.command_timeout, fut)
            .await
            .map_err(|_| PubSubError::Timeout)??)
    }

    fn redis_channel(&self, channel: &str) -> String {
        format!("{}{}", self.settings.channel_prefix, channel)
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Subscribe {
                channel,
                outbox,
                since,
                reply,
            } => {
                let result = self.subscribe(&channel, &outbox).await;
                match (&result, since) {
                    (Ok(last), None) => {
                        outbox.push(ServerFrame::subscribed(&channel, *last));
                    }
                    (Ok(last), Some(since)) => {
                        outbox.push(Outgoing::Replay(Box::new(Replay {
                            channel: channel.clone(),
                            since,
                            upto: *last,
                        })));
                    }
                    (Err(err), _) => {
                        outbox.push(ServerFrame::error(
                            "unavailable",
                            &format!("cannot subscribe to `{channel}` right now: {err}"),
                        ));
                    }
                }
                // The session may have gone meanwhile; nothing to do then.
                let _ = reply.send(result);
            }
            Command::Unsubscribe { channel, outbox } => {
                if self.registry.remove(&channel, &outbox) {
                    self.unsubscribe_redis(&channel).await;
                }
                outbox.push(ServerFrame::unsubscribed(&channel));
            }
            Command::Leave { channels, outbox } => {
                outbox.close();
                for channel in channels {
                    if self.registry.remove(&channel, &outbox) {
                        self.unsubscribe_redis(&channel).await;
                    }
                }
            }
        }
    }

    /// Make sure Redis delivers the channel and its sequencer is initialised, then add the
    /// outbox. Returns the offset live delivery to this outbox continues after.
    async fn subscribe(
        &mut self,
        channel: &str,
        outbox: &Arc<SessionOutbox>,
    ) -> Result<i64, PubSubError> {
        if outbox.is_closed() {
            return Err(PubSubError::SessionClosed);
        }
        if !self.registry.has_subscribers(channel) {
            let redis_channel = self.redis_channel(channel);
            let Some(mut sink) = self.sink.clone() else {
                return Err(PubSubError::Disconnected);
            };
            if let Err(err) = self
                .with_timeout(sink.subscribe(std::slice::from_ref(&redis_channel)))
                .await
            {
                // The connection is in an unknown state; start over.
                self.sink = None;
                return Err(err);
            }
            // Read the head only now that Redis delivers: anything committed later arrives
            // live, anything earlier is history. Either way nothing falls in between.
            let position = self.history.store.position(channel);
            let last = match tokio::time::timeout(self.history.timeout, position).await {
                Ok(Ok(position)) => position.last_offset,
                Ok(Err(err)) => {
                    return Err(self.abandon(channel, PubSubError::History(err.to_string())));
                }
                Err(_) => {
                    return Err(self.abandon(
                        channel,
                        PubSubError::History("Postgres did not answer in time".into()),
                    ));
                }
            };
            self.registry.open(
                channel,
                Sequencer::new(last, self.history.settings.gap_wait),
            );
        }
        self.registry.add(channel, outbox);
        Ok(self
            .registry
            .sequencer(channel)
            .map(Sequencer::last)
            .unwrap_or_default())
    }

    /// A subscribe failed after SUBSCRIBE: release the Redis subscription again.
    fn abandon(&mut self, channel: &str, err: PubSubError) -> PubSubError {
        self.orphaned.push(channel.into());
        err
    }

    async fn unsubscribe_redis(&mut self, channel: &str) {
        let Some(mut sink) = self.sink.clone() else {
            return; // Not connected: the reconnect only resubscribes channels still in use.
        };
        let redis_channel = self.redis_channel(channel);
        if let Err(err) = self.with_timeout(sink.unsubscribe(&redis_channel)).await {
            tracing::warn!(%err, channel, "UNSUBSCRIBE failed; reconnecting");
            self.sink = None;
        }
    }

    fn on_message(&mut self, full_channel: &str, payload: &[u8]) {
        let Some(channel) = full_channel.strip_prefix(&*self.settings.channel_prefix) else {
            return;
        };
        if !self.registry.has_subscribers(channel) {
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
        // Join the publisher's trace when it sent one (only then: spans per message cost).
        let span = envelope.traceparent.as_deref().map(|traceparent| {
            let span = tracing::info_span!("fan_out", channel, id = envelope.id);
            otel::set_parent_from_traceparent(&span, traceparent);
            span
        });
        let _entered = span.as_ref().map(tracing::Span::enter);
        let frame = ServerFrame::message(channel, envelope.data, envelope.id);
        let result = match envelope.id {
            Some(id) => {
                let (result, duplicate) =
                    self.registry
                        .deliver_sequenced(channel, id, frame, Instant::now());
                if duplicate {
                    metrics::counter!("relay_duplicates_dropped_total").increment(1);
                    metrics::counter!("relay_messages_dropped_total", "reason" => "duplicate")
                        .increment(1);
                }
                result
            }
            None => self.registry.fan_out(channel, &frame),
        };
        self.account(channel, result);
    }

    fn account(&mut self, channel: &str, result: FanOut) {
        metrics::counter!("relay_messages_delivered_total").increment(result.delivered as u64);
        if result.overflowed > 0 {
            metrics::counter!("relay_slow_consumer_disconnects_total")
                .increment(result.overflowed as u64);
            metrics::counter!("relay_messages_dropped_total", "reason" => "slow_consumer")
                .increment(result.overflowed as u64);
        }
        if result.rejected > 0 {
            metrics::counter!("relay_messages_dropped_total", "reason" => "subscriber_gone")
                .increment(result.rejected as u64);
        }
        if result.now_empty {
            // Pruning removed the last (departed) subscriber. Unsubscribing needs an `.await`,
            // which the main loop does right after this step.
            self.orphaned.push(channel.into());
        }
    }

    async fn read_stored(
        &self,
        channel: &str,
        after: i64,
        upto: i64,
    ) -> Result<Vec<StoredMessage>, PubSubError> {
        let read = self
            .history
            .store
            .read_range(channel, after, upto, CATCH_UP_PAGE);
        match tokio::time::timeout(self.history.timeout, read).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(err)) => Err(PubSubError::History(err.to_string())),
            Err(_) => Err(PubSubError::History(
                "Postgres did not answer in time".to_owned(),
            )),
        }
    }

    /// Fill every gap whose wait is over from Postgres.
    async fn fill_due_gaps(&mut self) {
        let now = Instant::now();
        while let Some((deadline, channel)) = self.registry.next_gap() {
            if deadline > now {
                break;
            }
            let channel: Box<str> = channel.into();
            let Some((after, upto)) = self
                .registry
                .sequencer(&channel)
                .and_then(Sequencer::gap_range)
            else {
                break;
            };
            match self.read_stored(&channel, after, upto).await {
                Ok(rows) => {
                    let frames = rows
                        .iter()
                        .map(|m| {
                            (
                                m.offset,
                                ServerFrame::message(&channel, &m.data, Some(m.offset)),
                            )
                        })
                        .collect();
                    let (result, skipped) =
                        self.registry.fill_gap(&channel, frames, Instant::now());
                    metrics::counter!("relay_gap_fills_total").increment(1);
                    if skipped {
                        metrics::counter!("relay_gaps_skipped_total").increment(1);
                        tracing::warn!(
                            channel = &*channel,
                            after,
                            upto,
                            "offsets missing from history too; skipped"
                        );
                    }
                    self.account(&channel, result);
                }
                Err(err) => {
                    tracing::warn!(channel = &*channel, %err, "gap fill failed; retrying");
                    self.registry.postpone_gap(&channel, Instant::now());
                }
            }
        }
    }

    /// After a reconnect, deliver what was committed while the listener was not receiving.
    async fn catch_up_all(&mut self) {
        let channels: Vec<Box<str>> = self.registry.channels().map(Into::into).collect();
        for channel in channels {
            while let Some(after) = self.registry.sequencer(&channel).map(Sequencer::last) {
                let rows = match self.read_stored(&channel, after, i64::MAX).await {
                    Ok(rows) => rows,
                    Err(err) => {
                        tracing::warn!(channel = &*channel, %err, "catch-up after reconnect failed");
                        break;
                    }
                };
                let count = rows.len();
                for m in rows {
                    let frame = ServerFrame::message(&channel, &m.data, Some(m.offset));
                    let (result, _) =
                        self.registry
                            .deliver_sequenced(&channel, m.offset, frame, Instant::now());
                    self.account(&channel, result);
                }
                if count > 0 {
                    metrics::counter!("relay_catch_up_messages_total").increment(count as u64);
                    tracing::info!(
                        channel = &*channel,
                        count,
                        "caught up from Postgres after reconnect"
                    );
                }
                if (count as i64) < CATCH_UP_PAGE {
                    break;
                }
            }
        }
    }

    /// UNSUBSCRIBE channels whose last subscriber was pruned during fan-out.
    async fn release_orphaned(&mut self) {
        while let Some(channel) = self.orphaned.pop() {
            if !self.registry.has_subscribers(&channel) {
                self.unsubscribe_redis(&channel).await;
            }
        }
    }

    fn publish_gauges(&self) {
        metrics::gauge!("relay_redis_channels").set(self.registry.channel_count() as f64);
        metrics::gauge!("relay_subscriptions").set(self.registry.subscription_count() as f64);
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

async fn next_message(stream: &mut Option<Stream>) -> Option<Incoming> {
    match stream {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
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
