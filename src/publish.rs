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

use crate::{state::AppState, store::StoreError};

/// What the publisher learns: the message's offset and commit time.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Published {
    pub channel: String,
    pub id: i64,
    pub created_at: DateTime<Utc>,
}

pub async fn publish(
    state: &AppState,
    channel: &str,
    data: &RawValue,
) -> Result<Published, StoreError> {
    // The span's context travels in the Redis envelope: deliveries on every replica join it.
    let span = tracing::info_span!("publish", channel, id = tracing::field::Empty);
    async {
        let (id, created_at) = state.store.append(channel, data).await?;
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
