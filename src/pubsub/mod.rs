//! Cross-replica fan-out over Redis pub/sub (or, in embedded mode, an in-process broker).
//!
//! * [`broker`]: the seam between relay and the broker — Redis, or an in-process queue.
//! * [`listener`]: the one task per replica that owns the broker connection and the
//!   [`registry`] of local subscribers, orders each channel ([`sequencer`]) and fans each message
//!   out.
//! * [`outbox`]: the bounded per-session queue the fan-out pushes into.
//! * [`PubSub`]: the handle sessions and handlers use — subscribe, unsubscribe, publish — kept in
//!   the app state. Publishing uses a separate multiplexed connection, created once and shared.

pub mod broker;
pub mod listener;
pub mod outbox;
pub mod registry;
pub mod sequencer;

use std::sync::Arc;

use redis::aio::ConnectionManagerConfig;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use crate::{config::RedisSettings, lifecycle::Lifecycle, protocol::Envelope, telemetry::otel};

use listener::{Command, Listener};
pub use listener::{HistorySource, ListenerStatus};
pub use outbox::SessionOutbox;

/// Commands waiting for the listener. Senders wait when it is full (backpressure on the
/// subscribing sessions, never on the fan-out); each time that happens is counted.
const COMMAND_QUEUE: usize = 4096;

/// Committed messages whose PUBLISH failed, waiting to be retried. When full, further ones are
/// dropped and counted: they are durable, and subscribers get them through gap fill or the
/// listener's catch-up after a reconnect.
const REPUBLISH_QUEUE: usize = 1024;
/// Attempts per queued message, with exponential backoff from 100 ms.
const REPUBLISH_ATTEMPTS: u32 = 6;

/// Errors at the Redis boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PubSubError {
    #[error("Redis error: {0}")]
    Redis(Arc<redis::RedisError>),
    #[error("Redis did not answer in time")]
    Timeout,
    #[error("not connected to Redis (reconnecting)")]
    Disconnected,
    #[error("the pub/sub listener has stopped")]
    ListenerStopped,
    #[error("the session is closing")]
    SessionClosed,
    #[error("history unavailable: {0}")]
    History(String),
}

impl From<redis::RedisError> for PubSubError {
    fn from(err: redis::RedisError) -> Self {
        Self::Redis(Arc::new(err))
    }
}

/// Handle to the replica's pub/sub machinery; cheap to clone.
#[derive(Clone)]
pub struct PubSub {
    commands: mpsc::Sender<Command>,
    republish: mpsc::Sender<Republish>,
    status: Arc<ListenerStatus>,
    publisher: broker::Publisher,
    prefix: Arc<str>,
    command_timeout: std::time::Duration,
    lifecycle: Lifecycle,
}

impl PubSub {
    /// Create the Redis clients (lazily connected, so startup does not fail while Redis is
    /// down; readiness reports it) and start the listener task through `lifecycle`.
    pub fn start(
        settings: &RedisSettings,
        history: HistorySource,
        lifecycle: &Lifecycle,
    ) -> Result<Self, PubSubError> {
        let (publisher, source) = broker::open(
            settings.url.expose(),
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(settings.connect_timeout))
                .set_response_timeout(Some(settings.command_timeout))
                .set_number_of_retries(1)
                .set_max_delay(settings.reconnect_max_delay),
        )?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let status = Arc::new(ListenerStatus::default());
        let listener = Listener::new(
            source,
            settings.clone(),
            history,
            rx,
            Arc::clone(&status),
            lifecycle.clone(),
        );
        lifecycle.spawn("redis_listener", listener.run());
        let (republish, republish_rx) = mpsc::channel(REPUBLISH_QUEUE);
        let pubsub = Self {
            commands: tx,
            republish,
            status,
            publisher,
            prefix: settings.channel_prefix.as_str().into(),
            command_timeout: settings.command_timeout,
            lifecycle: lifecycle.clone(),
        };
        lifecycle.spawn(
            "redis_republisher",
            pubsub.clone().republisher(republish_rx),
        );
        Ok(pubsub)
    }

    async fn send(&self, command: Command) -> Result<(), PubSubError> {
        match self.commands.try_send(command) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(command)) => {
                metrics::counter!("relay_listener_queue_full_total").increment(1);
                self.commands
                    .send(command)
                    .await
                    .map_err(|_| PubSubError::ListenerStopped)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PubSubError::ListenerStopped),
        }
    }

    /// Subscribe `outbox` to `channel`. When this returns Ok, Redis has confirmed the
    /// subscription and a `subscribed` frame (or, with `since`, a replay of stored history) is
    /// queued in the outbox ahead of any live message of the channel; on error an `unavailable`
    /// error frame is queued instead. Ok carries the offset live delivery continues after.
    pub async fn subscribe(
        &self,
        channel: &str,
        outbox: &Arc<SessionOutbox>,
        since: Option<i64>,
    ) -> Result<i64, PubSubError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Subscribe {
            channel: channel.into(),
            outbox: Arc::clone(outbox),
            since,
            reply,
        })
        .await?;
        answer.await.map_err(|_| PubSubError::ListenerStopped)?
    }

    /// Unsubscribe; an `unsubscribed` frame is queued after the last message of the channel.
    pub async fn unsubscribe(
        &self,
        channel: &str,
        outbox: &Arc<SessionOutbox>,
    ) -> Result<(), PubSubError> {
        self.send(Command::Unsubscribe {
            channel: channel.into(),
            outbox: Arc::clone(outbox),
        })
        .await
    }

    /// Forget a finished session. Callable from `Drop`: it never waits; if the queue is full
    /// the hand-over continues in a tracked task.
    pub fn leave(&self, channels: Vec<Box<str>>, outbox: Arc<SessionOutbox>) {
        outbox.close();
        if channels.is_empty() {
            return;
        }
        match self.commands.try_send(Command::Leave { channels, outbox }) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(command)) => {
                metrics::counter!("relay_listener_queue_full_total").increment(1);
                let commands = self.commands.clone();
                self.lifecycle.spawn("pubsub_leave", async move {
                    let _ = commands.send(command).await;
                });
            }
        }
    }

    /// PUBLISH the envelope `{"data":…,"id":…}` to the channel on every replica.
    pub async fn publish(
        &self,
        channel: &str,
        data: &RawValue,
        id: Option<i64>,
    ) -> Result<(), PubSubError> {
        let payload = Envelope {
            data,
            id,
            origin: id.map(|_| crate::protocol::RELAY_ORIGIN.into()),
            traceparent: otel::traceparent(&tracing::Span::current()).map(Into::into),
            ts: Some(chrono::Utc::now().timestamp_micros()),
        }
        .encode();
        let redis_channel = format!("{}{}", self.prefix, channel);
        let publish = self.publisher.publish(redis_channel, payload);
        tokio::time::timeout(self.command_timeout, publish)
            .await
            .map_err(|_| PubSubError::Timeout)??;
        metrics::counter!("relay_messages_published_total").increment(1);
        Ok(())
    }

    /// PUBLISH a committed message; if that fails, queue it for retries in the background
    /// (bounded: when the queue is full the message is left to gap fill and catch-up).
    pub async fn publish_committed(&self, channel: &str, data: &RawValue, id: i64) {
        let Err(err) = self.publish(channel, data, Some(id)).await else {
            return;
        };
        metrics::counter!("relay_publish_failures_total").increment(1);
        tracing::warn!(%err, channel, id, "PUBLISH after commit failed; retrying in the background");
        let job = Republish {
            channel: channel.into(),
            data: data.to_owned(),
            id,
        };
        if self.republish.try_send(job).is_err() {
            metrics::counter!("relay_republish_dropped_total").increment(1);
        }
    }

    /// The bounded retry job for [`PubSub::publish_committed`].
    async fn republisher(self, mut jobs: mpsc::Receiver<Republish>) {
        loop {
            let job = tokio::select! {
                _ = self.lifecycle.cancelled() => return,
                job = jobs.recv() => match job { Some(job) => job, None => return },
            };
            let mut delay = std::time::Duration::from_millis(100);
            for attempt in 1..=REPUBLISH_ATTEMPTS {
                tokio::select! {
                    _ = self.lifecycle.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                match self.publish(&job.channel, &job.data, Some(job.id)).await {
                    Ok(()) => break,
                    Err(err) if attempt == REPUBLISH_ATTEMPTS => {
                        metrics::counter!("relay_republish_dropped_total").increment(1);
                        tracing::warn!(%err, channel = &*job.channel, id = job.id, "giving up re-publishing; subscribers recover it from history");
                    }
                    Err(_) => delay *= 2,
                }
            }
        }
    }

    /// Round trip to the broker on the shared connection (readiness).
    pub async fn ping(&self) -> Result<(), PubSubError> {
        tokio::time::timeout(self.command_timeout, self.publisher.ping())
            .await
            .map_err(|_| PubSubError::Timeout)?
    }

    /// `"redis"` or `"memory"` (embedded mode).
    pub fn backend(&self) -> &'static str {
        self.publisher.backend()
    }

    /// Whether the listener currently holds a live pub/sub connection.
    pub fn is_listening(&self) -> bool {
        self.status.is_connected()
    }
}

/// A committed message waiting to be re-published.
struct Republish {
    channel: Box<str>,
    data: Box<RawValue>,
    id: i64,
}
