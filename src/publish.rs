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

use crate::{rate_limit::Limited, state::AppState, store::StoreError};

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
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the publisher learns: the message's offset and commit time.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Published {
    pub channel: String,
    pub id: i64,
    pub created_at: DateTime<Utc>,
}

/// Publish `data` on `channel` for `subject` (`None` without authentication): the per-subject
/// rate limit, then the commit (which enforces the subject's channel quota), then the PUBLISH.
pub async fn publish(
    state: &AppState,
    channel: &str,
    data: &RawValue,
    subject: Option<&str>,
) -> Result<Published, PublishError> {
    state
        .limits
        .check_publish(subject)
        .map_err(PublishError::RateLimited)?;
    // The span's context travels in the Redis envelope: deliveries on every replica join it.
    let span = tracing::info_span!("publish", channel, id = tracing::field::Empty);
    async {
        let creator = subject.unwrap_or("");
        let quota = state.settings.limits.channels_per_subject;
        let Some((id, created_at)) = state.store.append(channel, data, creator, quota).await?
        else {
            metrics::counter!("relay_rate_limited_total", "limit" => "channels_per_subject")
                .increment(1);
            return Err(PublishError::ChannelLimit {
                subject: creator.to_owned(),
                limit: quota,
            });
        };
        tracing::Span::current().record("id", id);
        state.pubsub.publish_committed(channel, data, id);
        Ok(Published {
            channel: channel.to_owned(),
            id,
            created_at,
        })
    }
    .instrument(span)
    .await
}
