//! The Redis listener: one task per replica that owns the dedicated pub/sub connection.
//!
//! It SUBSCRIBEs a channel when the first local session subscribes and UNSUBSCRIBEs when the last
//! one leaves (never PSUBSCRIBE to everything), turns every Redis message into one encoded frame
//! and fans it out through the [`ChannelRegistry`]. Sessions talk to it only through a bounded
//! command queue, so the registry has a single owner and needs no lock.
//!
//! If the connection drops, the listener keeps serving commands (answering subscribes with
//! `unavailable`), reconnects with exponential backoff and jitter, and resubscribes every channel
//! that still has local subscribers; connected clients stay connected throughout.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{mpsc, oneshot};

use crate::{
    config::RedisSettings,
    lifecycle::Lifecycle,
    protocol::{Envelope, ServerFrame},
};

use super::{PubSubError, outbox::SessionOutbox, registry::ChannelRegistry};

/// Requests from sessions to the listener.
#[derive(Debug)]
pub enum Command {
    /// Add the outbox to the channel once Redis confirmed the subscription, then queue
    /// `subscribed` (or an `unavailable` error frame) into it.
    Subscribe {
        channel: Box<str>,
        outbox: Arc<SessionOutbox>,
        reply: oneshot::Sender<Result<(), PubSubError>>,
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

pub struct Listener {
    client: redis::Client,
    settings: RedisSettings,
    registry: ChannelRegistry,
    commands: mpsc::Receiver<Command>,
    status: Arc<ListenerStatus>,
    lifecycle: Lifecycle,
    sink: Option<PubSubSink>,
    /// Channels left without subscribers by fan-out pruning, to UNSUBSCRIBE.
    orphaned: Vec<Box<str>>,
    invalid_payloads: RateLimitedWarning,
}

impl Listener {
    pub fn new(
        client: redis::Client,
        settings: RedisSettings,
        commands: mpsc::Receiver<Command>,
        status: Arc<ListenerStatus>,
        lifecycle: Lifecycle,
    ) -> Self {
        Self {
            client,
            settings,
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
        let mut stream: Option<PubSubStream> = None;
        let mut backoff = Backoff::new(
            self.settings.reconnect_min_delay,
            self.settings.reconnect_max_delay,
        );
        let mut reconnect_at = tokio::time::Instant::now();
        let mut ever_connected = false;
        loop {
            let connected = stream.is_some();
            tokio::select! {
                _ = self.lifecycle.cancelled() => break,
                command = self.commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => break,
                },
                msg = next_message(&mut stream), if connected => match msg {
                    Some(msg) => self.on_message(&msg),
                    None => {
                        tracing::warn!("Redis pub/sub connection lost; reconnecting");
                        self.sink = None;
                    }
                },
                _ = tokio::time::sleep_until(reconnect_at), if !connected => {
                    match self.connect().await {
                        Ok(new_stream) => {
                            stream = Some(new_stream);
                            backoff.reset();
                            if ever_connected {
                                metrics::counter!("relay_redis_reconnects_total").increment(1);
                                tracing::info!(channels = self.registry.channel_count(), "Redis pub/sub reconnected and resubscribed");
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
    async fn connect(&mut self) -> Result<PubSubStream, PubSubError> {
        let pubsub = tokio::time::timeout(
            self.settings.connect_timeout,
            self.client.get_async_pubsub(),
        )
        .await
        .map_err(|_| PubSubError::Timeout)??;
        let (mut sink, stream) = pubsub.split();
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
                reply,
            } => {
                let result = self.subscribe(&channel, &outbox).await;
                let frame = match &result {
                    Ok(()) => ServerFrame::subscribed(&channel),
                    Err(err) => ServerFrame::error(
                        "unavailable",
                        &format!("cannot subscribe to `{channel}` right now: {err}"),
                    ),
                };
                outbox.push(frame);
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

    async fn subscribe(
        &mut self,
        channel: &str,
        outbox: &Arc<SessionOutbox>,
    ) -> Result<(), PubSubError> {
        if outbox.is_closed() {
            return Err(PubSubError::SessionClosed);
        }
        if !self.registry.has_subscribers(channel) {
            let redis_channel = self.redis_channel(channel);
            let Some(mut sink) = self.sink.clone() else {
                return Err(PubSubError::Disconnected);
            };
            if let Err(err) = self.with_timeout(sink.subscribe(&redis_channel)).await {
                // The connection is in an unknown state; start over.
                self.sink = None;
                return Err(err);
            }
        }
        self.registry.add(channel, outbox);
        Ok(())
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

    fn on_message(&mut self, msg: &redis::Msg) {
        let Some(channel) = msg
            .get_channel_name()
            .strip_prefix(&*self.settings.channel_prefix)
        else {
            return;
        };
        if !self.registry.has_subscribers(channel) {
            return; // Arrived right after the last local subscriber left.
        }
        let envelope = match Envelope::parse(msg.get_payload_bytes()) {
            Ok(envelope) => envelope,
            Err(err) => {
                metrics::counter!("relay_redis_invalid_payloads_total").increment(1);
                self.invalid_payloads.warn(|suppressed| {
                    tracing::warn!(channel, %err, suppressed, "skipping Redis payload that is not a relay envelope");
                });
                return;
            }
        };
        let frame = ServerFrame::message(channel, envelope.data, envelope.id);
        let result = self.registry.fan_out(channel, &frame);
        metrics::counter!("relay_messages_delivered_total").increment(result.delivered as u64);
        if result.overflowed > 0 {
            metrics::counter!("relay_slow_consumer_disconnects_total")
                .increment(result.overflowed as u64);
        }
        if result.now_empty {
            // Pruning removed the last (departed) subscriber. Unsubscribing needs an `.await`,
            // which the main loop does right after this message.
            self.orphaned.push(channel.into());
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

async fn next_message(stream: &mut Option<PubSubStream>) -> Option<redis::Msg> {
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
