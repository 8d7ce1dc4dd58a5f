//! The publish path, shared by `POST /api/v1/channels/{channel}/messages` and the WebSocket
//! `publish` frame: commit to Postgres first (which assigns the offset), PUBLISH to Redis after.
//!
//! Once [`publish`] returns Ok the message is durable. The PUBLISH belongs to the service, not to
//! the request: it is handed to the publisher task, which retries it, so it survives the request
//! being dropped (timeout, client disconnect). If it is abandoned anyway, every replica's head
//! check finds the offset and subscribers read it from history: delivered late, never lost.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use tracing::Instrument;

use crate::{
    rate_limit::Limited,
    state::AppState,
    store::{
        StoreError,
        messages::{AppendOptions, Appended},
    },
};

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
    #[error(transparent)]
    Store(#[from] StoreError),
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

/// Publish `data` on `channel` for `subject` (`None` without authentication): the per-subject
/// rate limit, then the commit (which enforces the subject's channel quota), then the PUBLISH.
pub async fn publish(
    state: &AppState,
    message: Message<'_>,
    subject: Option<&str>,
) -> Result<Published, PublishError> {
    let Message {
        channel,
        data,
        expected_last_id,
        idempotency_key,
    } = message;
    state
        .limits
        .check_publish(subject)
        .map_err(PublishError::RateLimited)?;
    // The span's context travels in the Redis envelope: deliveries on every replica join it.
    let span = tracing::info_span!("publish", channel, id = tracing::field::Empty);
    async {
        let creator = subject.unwrap_or("");
        let quota = state.settings.limits.channels_per_subject;
        let window = state.settings.publish.idempotency_window;
        let options = AppendOptions {
            creator,
            max_channels: quota,
            expected_last_id,
            idempotency: idempotency_key.map(|key| (key, window)),
        };
        let appended = state.store.append(channel, data, options).await?;
        let (id, created_at) = match appended {
            Appended::Stored { offset, created_at } => (offset, created_at),
            // Committed and handed to the publisher the first time: nothing more to do.
            Appended::Replayed { offset, created_at } => {
                metrics::counter!("relay_publish_replays_total").increment(1);
                tracing::Span::current().record("id", offset);
                return Ok(Published {
                    channel: channel.to_owned(),
                    id: offset,
                    created_at,
                    replayed: true,
                });
            }
            Appended::KeyReused => {
                return Err(PublishError::KeyReused {
                    channel: channel.to_owned(),
                    window: humantime::format_duration(window).to_string(),
                });
            }
            Appended::ChannelLimit => {
                metrics::counter!("relay_rate_limited_total", "limit" => "channels_per_subject")
                    .increment(1);
                return Err(PublishError::ChannelLimit {
                    subject: creator.to_owned(),
                    limit: quota,
                });
            }
            Appended::Conflict { last_offset } => {
                metrics::counter!("relay_publish_conflicts_total").increment(1);
                return Err(PublishError::Conflict {
                    channel: channel.to_owned(),
                    expected: expected_last_id.unwrap_or_default(),
                    last_id: last_offset,
                });
            }
        };
        tracing::Span::current().record("id", id);
        state.pubsub.publish_committed(channel, data, id);
        Ok(Published {
            channel: channel.to_owned(),
            id,
            created_at,
            replayed: false,
        })
    }
    .instrument(span)
    .await
}
