//! The publish path, shared by `POST /api/v1/channels/{channel}/messages` and the WebSocket
//! `publish` frame: commit to Postgres first (which assigns the offset), PUBLISH to Redis after.
//!
//! Once [`publish`] returns Ok the message is durable. If the PUBLISH fails, it is retried in the
//! background; subscribers also recover it through gap fill or the listener's catch-up, so it is
//! delivered late rather than lost.

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
        state.pubsub.publish_committed(channel, data, id).await;
        Ok(Published {
            channel: channel.to_owned(),
            id,
            created_at,
        })
    }
    .instrument(span)
    .await
}
