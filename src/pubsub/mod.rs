//! Cross-replica fan-out over Redis pub/sub (or, in embedded mode, an in-process broker): the
//! I/O around the delivery [`crate::core`].
//!
//! * [`broker`]: the seam between relay and the broker — Redis, or an in-process queue.
//! * [`listener`]: the core task, the broker task and the heads task, joined by bounded queues.
//! * [`outbox`]: the bounded per-session queue the fan-out pushes into.
//! * [`PubSub`]: the handle sessions and handlers use — subscribe, unsubscribe, publish — kept in
//!   the app state. Publishing uses a separate multiplexed connection, created once and shared,
//!   driven by the service-owned publisher task.

pub mod broker;
pub mod listener;
pub mod outbox;

use std::{sync::Arc, time::Duration};

use futures_util::{StreamExt, stream::FuturesUnordered};
use redis::aio::ConnectionManagerConfig;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::{
    config::RedisSettings, core::CoreSettings, history::HistoryReader, lifecycle::Lifecycle,
    protocol::Envelope, telemetry::otel,
};

use listener::Event;
pub use listener::ListenerStatus;
pub use outbox::SessionOutbox;

/// Committed messages waiting for their PUBLISH. When full, further ones are not published and
/// are counted: they are durable, and every replica's periodic head check delivers them.
const PUBLISH_QUEUE: usize = 8192;
/// PUBLISHes in flight at once (pipelined on the shared connection).
const PUBLISH_IN_FLIGHT: usize = 64;
/// Attempts per message, with exponential backoff from 100 ms.
const PUBLISH_ATTEMPTS: u32 = 6;

/// Errors at the Redis boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PubSubError {
    #[error("Redis error: {0}")]
    Redis(Arc<redis::RedisError>),
    #[error("Redis did not answer in time")]
    Timeout,
    #[error("the pub/sub listener has stopped")]
    ListenerStopped,
    #[error("redis.tls_ca_file: {0}")]
    TlsCaFile(#[source] crate::tls::CaFileError),
}

impl From<redis::RedisError> for PubSubError {
    fn from(err: redis::RedisError) -> Self {
        Self::Redis(Arc::new(err))
    }
}

/// Handle to the replica's pub/sub machinery; cheap to clone.
#[derive(Clone)]
pub struct PubSub {
    inbox: mpsc::Sender<Event>,
    committed: mpsc::Sender<Committed>,
    status: Arc<ListenerStatus>,
    publisher: broker::Publisher,
    prefix: Arc<str>,
    command_timeout: Duration,
    lifecycle: Lifecycle,
}

impl PubSub {
    /// Create the Redis clients (lazily connected, so startup does not fail while Redis is
    /// down; readiness reports it) and start the listener and publisher tasks.
    pub fn start(
        settings: &RedisSettings,
        core: CoreSettings,
        history: HistoryReader,
        lifecycle: &Lifecycle,
    ) -> Result<Self, PubSubError> {
        let (publisher, source) = broker::open(
            settings,
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(settings.connect_timeout))
                .set_response_timeout(Some(settings.command_timeout))
                .set_number_of_retries(1)
                .set_max_delay(settings.reconnect_max_delay),
        )?;
        let listener = listener::start(source, settings.clone(), core, history, lifecycle);
        let (committed, committed_rx) = mpsc::channel(PUBLISH_QUEUE);
        let pubsub = Self {
            inbox: listener.inbox,
            committed,
            status: listener.status,
            publisher,
            prefix: settings.channel_prefix.as_str().into(),
            command_timeout: settings.command_timeout,
            lifecycle: lifecycle.clone(),
        };
        lifecycle.spawn_critical(
            "publisher",
            pubsub.clone().publish_committed_loop(committed_rx),
        );
        Ok(pubsub)
    }

    async fn send(&self, event: Event) -> Result<(), PubSubError> {
        match self.inbox.try_send(event) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(event)) => {
                metrics::counter!("relay_listener_queue_full_total").increment(1);
                self.inbox
                    .send(event)
                    .await
                    .map_err(|_| PubSubError::ListenerStopped)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PubSubError::ListenerStopped),
        }
    }

    /// Ask to subscribe `outbox` to `channel`. The answer arrives in the outbox, ordered before
    /// any message of the channel: `Subscribed` once the broker confirmed and the channel's head
    /// is known, or `SubscribeFailed`.
    pub async fn subscribe(
        &self,
        channel: &str,
        outbox: &Arc<SessionOutbox>,
        since: Option<i64>,
    ) -> Result<(), PubSubError> {
        self.send(Event::Subscribe {
            channel: channel.into(),
            outbox: Arc::clone(outbox),
            since,
        })
        .await
    }

    /// Unsubscribe; an `Unsubscribed` item is queued after the last message of the channel.
    pub async fn unsubscribe(
        &self,
        channel: &str,
        outbox: &Arc<SessionOutbox>,
    ) -> Result<(), PubSubError> {
        self.send(Event::Unsubscribe {
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
        match self.inbox.try_send(Event::Leave { channels, outbox }) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                metrics::counter!("relay_listener_queue_full_total").increment(1);
                let inbox = self.inbox.clone();
                self.lifecycle.spawn("pubsub_leave", async move {
                    let _ = inbox.send(event).await;
                });
            }
        }
    }

    /// PUBLISH the envelope `{"data":…,"id":…}` to the channel on every replica (`id` only for
    /// committed messages, which are then marked as relay's own).
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

    /// Hand a committed message to the service's publisher task. Never waits, and the request
    /// that committed it may go away now (timeout, client disconnect): the PUBLISH belongs to the
    /// service. If the queue is full the message is counted and left to the head checks.
    pub fn publish_committed(&self, channel: &str, data: &RawValue, id: i64) {
        let job = Committed {
            channel: channel.into(),
            data: data.to_owned(),
            id,
            traceparent: otel::traceparent(&tracing::Span::current()),
        };
        let reason = match self.committed.try_send(job) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => "queue_full",
            Err(mpsc::error::TrySendError::Closed(_)) => "shutting_down",
        };
        metrics::counter!("relay_publish_abandoned_total", "reason" => reason).increment(1);
    }

    /// The publisher task: PUBLISH committed messages, up to [`PUBLISH_IN_FLIGHT`] at once, each
    /// retried with backoff.
    async fn publish_committed_loop(self, mut jobs: mpsc::Receiver<Committed>) {
        let mut in_flight = FuturesUnordered::new();
        loop {
            let room = in_flight.len() < PUBLISH_IN_FLIGHT;
            tokio::select! {
                _ = self.lifecycle.cancelled() => break,
                job = jobs.recv(), if room => match job {
                    Some(job) => in_flight.push(self.publish_with_retries(job)),
                    None => break,
                },
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            }
        }
        // Unpublished messages are durable: every replica's head check delivers them.
        tracing::debug!(left = in_flight.len() + jobs.len(), "publisher stopped");
    }

    async fn publish_with_retries(&self, job: Committed) {
        let span = tracing::info_span!("republish", channel = &*job.channel, id = job.id);
        if let Some(traceparent) = &job.traceparent {
            otel::set_parent_from_traceparent(&span, traceparent);
        }
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=PUBLISH_ATTEMPTS {
            let published = tracing::Instrument::instrument(
                self.publish(&job.channel, &job.data, Some(job.id)),
                span.clone(),
            );
            match published.await {
                Ok(()) => return,
                Err(err) => {
                    metrics::counter!("relay_publish_failures_total").increment(1);
                    // Retry only a blip of the publishing connection. While the listener is
                    // disconnected too, Redis is down: the reconnect's head checks deliver
                    // everything committed meanwhile, paced, whereas retries would all land in
                    // one live burst the moment Redis is back.
                    let reason = if attempt == PUBLISH_ATTEMPTS {
                        Some("attempts")
                    } else if !self.is_listening() {
                        Some("broker_down")
                    } else {
                        None
                    };
                    if let Some(reason) = reason {
                        metrics::counter!("relay_publish_abandoned_total", "reason" => reason)
                            .increment(1);
                        tracing::debug!(%err, channel = &*job.channel, id = job.id, reason, "PUBLISH abandoned; subscribers get it through the head checks");
                        return;
                    }
                    tracing::debug!(%err, attempt, "PUBLISH after commit failed; retrying");
                }
            }
            tokio::select! {
                _ = self.lifecycle.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay *= 2;
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

    /// Test hook: make the pub/sub core task panic, to prove that a dead critical task stops
    /// the service instead of leaving it alive and unready.
    #[doc(hidden)]
    pub async fn inject_core_panic(&self) {
        let _ = self.send(Event::Panic).await;
    }
}

/// A committed message waiting for its PUBLISH.
struct Committed {
    channel: Box<str>,
    data: Box<RawValue>,
    id: i64,
    /// The publish request's trace, so late PUBLISHes stay in it.
    traceparent: Option<String>,
}
