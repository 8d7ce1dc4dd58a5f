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
    config::RedisSettings,
    core::{Core, CoreSettings, fanout::Fanout},
    history::HistoryReader,
    lifecycle::Lifecycle,
    protocol::Envelope,
    telemetry::otel,
};

use listener::Event;
pub use listener::ListenerStatus;
pub use outbox::SessionOutbox;

/// Committed batches waiting for their PUBLISH (each at most `publish.commit_max_messages`).
/// When full, further ones are not published and are counted: they are durable, and every
/// replica's periodic head check delivers them.
const PUBLISH_QUEUE: usize = 1024;
/// Batches being PUBLISHed at once, each as one pipeline on the shared connection.
const PUBLISH_IN_FLIGHT: usize = 16;
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
    committed: mpsc::Sender<Arc<[CommittedMessage]>>,
    status: Arc<ListenerStatus>,
    publisher: broker::Publisher,
    prefix: Arc<str>,
    command_timeout: Duration,
    /// This replica's id in its envelopes (see [`Envelope::replica`]).
    replica: u64,
    lifecycle: Lifecycle,
}

impl PubSub {
    /// Create the Redis clients (lazily connected, so startup does not fail while Redis is
    /// down; readiness reports it) and start the listener and publisher tasks.
    pub fn start(
        settings: &RedisSettings,
        core: CoreSettings,
        fanout: Fanout,
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
        // Random per process, below 2^53 so that every JSON reader keeps it exact.
        let replica = fastrand::u64(..1 << 53);
        let listener = listener::start(
            source,
            settings.clone(),
            Core::with_fanout(core, fanout),
            history,
            replica,
            lifecycle,
        );
        let (committed, committed_rx) = mpsc::channel(PUBLISH_QUEUE);
        let pubsub = Self {
            inbox: listener.inbox,
            committed,
            status: listener.status,
            publisher,
            prefix: settings.channel_prefix.as_str().into(),
            command_timeout: settings.command_timeout,
            replica,
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

    /// The envelope of a committed message.
    fn envelope(&self, data: &RawValue, id: i64, traceparent: Option<&str>) -> String {
        Envelope {
            data,
            id: Some(id),
            origin: Some(crate::protocol::RELAY_ORIGIN.into()),
            traceparent: traceparent.map(Into::into),
            ts: Some(chrono::Utc::now().timestamp_micros()),
            replica: Some(self.replica),
        }
        .encode()
    }

    /// Deliver committed messages: to this replica's subscribers at once (local-first), and to
    /// every other replica through the publisher task. Never waits, and the request that
    /// committed them may go away now (timeout, client disconnect): delivery belongs to the
    /// service. What finds a queue full is counted and left to the broker's echo or the head
    /// checks: durable, so delivered late, never lost.
    pub fn publish_batch(&self, messages: Vec<CommittedMessage>) {
        let messages: Arc<[CommittedMessage]> = messages.into();
        match self.inbox.try_send(Event::Committed(Arc::clone(&messages))) {
            // Embedded mode: there is no other replica, and the broker would only echo.
            Ok(()) if self.publisher.backend() == "memory" => return,
            Ok(()) => {}
            Err(err) => {
                let reason = match err {
                    mpsc::error::TrySendError::Full(_) => "queue_full",
                    mpsc::error::TrySendError::Closed(_) => "shutting_down",
                };
                metrics::counter!("relay_local_delivery_skipped_total", "reason" => reason)
                    .increment(messages.len() as u64);
            }
        }
        let n = messages.len() as u64;
        let reason = match self.committed.try_send(messages) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => "queue_full",
            Err(mpsc::error::TrySendError::Closed(_)) => "shutting_down",
        };
        metrics::counter!("relay_publish_abandoned_total", "reason" => reason).increment(n);
    }

    /// The publisher task: PUBLISH committed batches, up to [`PUBLISH_IN_FLIGHT`] at once, each
    /// as one pipeline, retried with backoff.
    async fn publish_committed_loop(self, mut jobs: mpsc::Receiver<Arc<[CommittedMessage]>>) {
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

    async fn publish_with_retries(&self, batch: Arc<[CommittedMessage]>) {
        let first = &batch[0];
        let span = tracing::info_span!(
            "republish",
            channel = &*first.channel,
            id = first.id,
            messages = batch.len()
        );
        if let Some(traceparent) = &first.traceparent {
            otel::set_parent_from_traceparent(&span, traceparent);
        }
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=PUBLISH_ATTEMPTS {
            // Each envelope is stamped when sent, so the lag metric counts the retries.
            let commands: Vec<(String, String)> = batch
                .iter()
                .map(|m| {
                    let payload = self.envelope(&m.data, m.id, m.traceparent.as_deref());
                    (format!("{}{}", self.prefix, m.channel), payload)
                })
                .collect();
            let published =
                tokio::time::timeout(self.command_timeout, self.publisher.publish_all(commands));
            let result = match tracing::Instrument::instrument(published, span.clone()).await {
                Ok(result) => result,
                Err(_) => Err(PubSubError::Timeout),
            };
            match result {
                Ok(()) => {
                    metrics::counter!("relay_messages_published_total")
                        .increment(batch.len() as u64);
                    return;
                }
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
                            .increment(batch.len() as u64);
                        tracing::debug!(%err, messages = batch.len(), reason, "PUBLISH abandoned; subscribers get it through the head checks");
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

/// A message this replica committed, on its way to delivery.
#[derive(Debug)]
pub struct CommittedMessage {
    pub channel: Box<str>,
    pub data: Box<RawValue>,
    pub id: i64,
    /// The publish request's trace, so late PUBLISHes stay in it.
    pub traceparent: Option<String>,
}
