//! The publish path, shared by `POST /api/v1/channels/{channel}/messages`,
//! `POST /api/v1/messages` and the WebSocket `publish` frame: the per-subject rate limit, then
//! the group commit ([`crate::commit`]), which assigns offsets, and delivery after it.
//!
//! [`submit`] queues a publish and returns once it has its place in the commit order; the
//! [`Pending`] it returns resolves after the commit. A WebSocket connection pipelines publishes
//! by submitting each in turn and awaiting the answers later. Once a [`Pending`] resolves Ok the
//! message is durable. Delivery belongs to the service, not to the request: the committer hands
//! committed messages to the local subscribers and the publisher task even if the request was
//! dropped (timeout, client disconnect). If a PUBLISH is abandoned anyway, every replica's head
//! check finds the offset and subscribers read it from history: delivered late, never lost.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::{
    rate_limit::Limited,
    state::AppState,
    store::{StoreError, batch::NewMessage, messages::Appended},
    telemetry::otel,
};

use crate::commit::{CommitError, Ticket};

/// Why a publish was not committed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// `limits.publish_per_subject` (or the caller's own per-connection limit).
    #[error("{0}")]
    RateLimited(Limited),
    /// The channel does not exist and the subject has `limits.channels_per_subject` already.
    #[error(
        "`{subject}` has created {limit} channels (limits.channels_per_subject); publish to an existing channel, or wait for retention to remove empty ones"
    )]
    ChannelLimit { subject: String, limit: u32 },
    /// The idempotency key was used within the window for other data.
    #[error("this Idempotency-Key was used for other data on `{channel}` within the last {window}")]
    KeyReused { channel: String, window: String },
    /// Compare-and-publish failed: the channel is not at the expected offset.
    #[error("`{channel}` is at offset {last_id}, not the expected {expected}")]
    Conflict {
        channel: String,
        expected: i64,
        last_id: i64,
    },
    /// The commit queue stayed full for `publish.queue_wait`, or the service is stopping.
    #[error("{0}")]
    Unavailable(CommitError),
    #[error(transparent)]
    Store(std::sync::Arc<StoreError>),
}

impl PublishError {
    /// An answer the store's contract rules out: reported as an internal error, not hidden.
    fn broken(what: String) -> Self {
        Self::Store(std::sync::Arc::new(StoreError::Corrupt(what)))
    }
}

impl From<CommitError> for PublishError {
    fn from(err: CommitError) -> Self {
        match err {
            CommitError::Store(err) => Self::Store(err),
            err => Self::Unavailable(err),
        }
    }
}

/// One message to publish.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub channel: &'a str,
    pub data: &'a RawValue,
    /// Commit only if the channel's last offset is this (compare-and-publish).
    pub expected_last_id: Option<i64>,
    /// A retry with this key within `publish.idempotency_window` returns the original.
    pub idempotency_key: Option<&'a str>,
}

/// What the publisher learns: the message's offset and commit time.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Published {
    pub channel: String,
    pub id: i64,
    pub created_at: DateTime<Utc>,
    /// A retry with the same `Idempotency-Key`: this is the original message, not a new one.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}

/// A submitted publish (or batch), answered after its commit.
pub struct Pending {
    ticket: Ticket,
    context: Context,
}

/// What explains a refusal.
struct Context {
    /// Each message's channel and expectation.
    messages: Vec<(Box<str>, Option<i64>)>,
    creator: Box<str>,
    quota: u32,
    window: std::time::Duration,
}

/// A batch item that was refused, and why (the other items were not stored either).
#[derive(Debug, thiserror::Error)]
#[error("messages[{index}]: {error}")]
pub struct BatchError {
    pub index: usize,
    pub error: PublishError,
}

impl Pending {
    /// The one message's outcome.
    pub async fn published(self) -> Result<Published, PublishError> {
        let mut all = self.published_all().await.map_err(|e| e.error)?;
        all.pop()
            .ok_or_else(|| PublishError::broken("a commit answered nothing".into()))
    }

    /// Every message's outcome in order, or the first refusal.
    pub async fn published_all(self) -> Result<Vec<Published>, BatchError> {
        let Self { ticket, context } = self;
        let outcomes = ticket.outcomes().await.map_err(|e| BatchError {
            index: 0,
            error: e.into(),
        })?;
        // A refused item aborts the others: report the refusal itself.
        if let Some(index) = outcomes.iter().position(|o| {
            !matches!(
                o,
                Appended::Stored { .. } | Appended::Replayed { .. } | Appended::Aborted
            )
        }) {
            let (channel, expected) = &context.messages[index];
            let error = context.refusal(channel, *expected, outcomes[index]);
            return Err(BatchError { index, error });
        }
        let mut published = Vec::with_capacity(outcomes.len());
        for ((channel, _), outcome) in context.messages.into_iter().zip(outcomes) {
            let (id, created_at, replayed) = match outcome {
                Appended::Stored { offset, created_at } => (offset, created_at, false),
                Appended::Replayed { offset, created_at } => {
                    metrics::counter!("relay_publish_replays_total").increment(1);
                    (offset, created_at, true)
                }
                _ => {
                    let error =
                        PublishError::broken("a group was aborted without a refusal".into());
                    return Err(BatchError {
                        index: published.len(),
                        error,
                    });
                }
            };
            published.push(Published {
                channel: channel.into(),
                id,
                created_at,
                replayed,
            });
        }
        Ok(published)
    }
}

impl Context {
    fn refusal(&self, channel: &str, expected: Option<i64>, outcome: Appended) -> PublishError {
        match outcome {
            Appended::KeyReused => PublishError::KeyReused {
                channel: channel.to_owned(),
                window: humantime::format_duration(self.window).to_string(),
            },
            Appended::ChannelLimit => {
                metrics::counter!("relay_rate_limited_total", "limit" => "channels_per_subject")
                    .increment(1);
                PublishError::ChannelLimit {
                    subject: self.creator.to_string(),
                    limit: self.quota,
                }
            }
            Appended::Conflict { last_offset } => {
                metrics::counter!("relay_publish_conflicts_total").increment(1);
                PublishError::Conflict {
                    channel: channel.to_owned(),
                    expected: expected.unwrap_or_default(),
                    last_id: last_offset,
                }
            }
            Appended::Stored { .. } | Appended::Replayed { .. } | Appended::Aborted => {
                PublishError::broken(format!("{outcome:?} is not a refusal"))
            }
        }
    }
}

/// Queue one publish by `subject` (`None` without authentication) for the group commit: the
/// per-subject rate limit, then room in the queue (up to `publish.queue_wait`). Publishes
/// submitted one after another are committed in that order.
pub async fn submit(
    state: &AppState,
    message: Message<'_>,
    subject: Option<&str>,
) -> Result<Pending, PublishError> {
    submit_batch(state, std::slice::from_ref(&message), subject)
        .await
        .map_err(|e| e.error)
}

/// Queue `messages` as one group: committed all together, or none of them.
pub async fn submit_batch(
    state: &AppState,
    messages: &[Message<'_>],
    subject: Option<&str>,
) -> Result<Pending, BatchError> {
    let refuse = |error| BatchError { index: 0, error };
    state
        .limits
        .check_publishes(subject, messages.len())
        .map_err(|limited| refuse(PublishError::RateLimited(limited)))?;
    let creator: Box<str> = subject.unwrap_or("").into();
    let new: Vec<NewMessage> = messages
        .iter()
        .map(|m| NewMessage {
            channel: m.channel.into(),
            data: m.data.to_owned(),
            creator: creator.clone(),
            expected_last_id: m.expected_last_id,
            idempotency_key: m.idempotency_key.map(Into::into),
        })
        .collect();
    // The trace context travels in the Redis envelope: deliveries on every replica join it.
    let traceparent = otel::traceparent(&tracing::Span::current());
    let ticket = state
        .committer
        .submit(new, traceparent)
        .await
        .map_err(|e| refuse(e.into()))?;
    let context = Context {
        messages: messages
            .iter()
            .map(|m| (m.channel.into(), m.expected_last_id))
            .collect(),
        creator,
        quota: state.settings.limits.channels_per_subject,
        window: state.settings.publish.idempotency_window,
    };
    Ok(Pending { ticket, context })
}

/// Publish one message and wait for its commit.
pub async fn publish(
    state: &AppState,
    message: Message<'_>,
    subject: Option<&str>,
) -> Result<Published, PublishError> {
    let span = tracing::info_span!(
        "publish",
        channel = message.channel,
        id = tracing::field::Empty
    );
    let published = tracing::Instrument::instrument(
        async { submit(state, message, subject).await?.published().await },
        span.clone(),
    )
    .await?;
    span.record("id", published.id);
    Ok(published)
}
