//! The message API: publish to a channel and page through its history.
//!
//! * `POST /api/v1/channels/{channel}/messages` with `{"data": <JSON>}` → `201` with the assigned
//!   offset. Durable once answered (see [`crate::publish`]).
//! * `GET /api/v1/channels/{channel}/messages?since=<offset>&limit=<n>` → messages with offset
//!   greater than `since`, oldest first, and the cursor for the next page.
//!
//! Input is validated before anything touches Postgres or Redis.

use axum::{
    extract::{Path, State},
    http::StatusCode,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{
    http::error::{ApiError, AppJson, AppQuery},
    protocol::validate_channel,
    publish::{self, Published},
    state::AppState,
    store::{self, StoreError},
};

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Query(
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed,
            ) => Self::Unavailable("the message store is unavailable".to_owned()),
            other => Self::internal(other),
        }
    }
}

fn channel_name(channel: &str) -> Result<&str, ApiError> {
    validate_channel(channel).map_err(|e| ApiError::Validation(e.to_string()))
}

/// Body of a publish request.
#[derive(Debug, Deserialize)]
pub struct PublishRequest {
    pub data: Box<RawValue>,
}

pub async fn publish_message(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    AppJson(body): AppJson<PublishRequest>,
) -> Result<(StatusCode, AppJson<Published>), ApiError> {
    let channel = channel_name(&channel)?;
    let published = publish::publish(&state, channel, &body.data).await?;
    Ok((StatusCode::CREATED, AppJson(published)))
}

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    #[serde(default)]
    pub since: Option<i64>,
    #[serde(default)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct HistoryMessage {
    pub id: i64,
    pub data: Box<RawValue>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize)]
pub struct HistoryPage {
    pub channel: String,
    pub messages: Vec<HistoryMessage>,
    /// Pass as `since` to get the next page.
    pub next_since: i64,
    /// More messages exist after this page.
    pub has_more: bool,
    /// The channel's newest offset.
    pub last_id: i64,
    /// The oldest offset still retained.
    pub oldest_id: i64,
    /// Messages after `since` were pruned by retention: this page starts later than asked.
    pub truncated: bool,
}

pub async fn list_messages(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    AppQuery(query): AppQuery<HistoryQuery>,
) -> Result<AppJson<HistoryPage>, ApiError> {
    let channel = channel_name(&channel)?;
    let max = state.settings.history.max_page_size;
    let limit = query
        .limit
        .unwrap_or(state.settings.history.default_page_size);
    if !(1..=max).contains(&limit) {
        return Err(ApiError::Validation(format!(
            "`limit` must be between 1 and {max}"
        )));
    }
    let since = query.since.unwrap_or(0);
    if since < 0 {
        return Err(ApiError::Validation(
            "`since` must be a non-negative offset".to_owned(),
        ));
    }
    let position = store::messages::position(&state.db, channel).await?;
    let mut rows = store::messages::read_since(&state.db, channel, since, limit + 1).await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_since = rows.last().map_or(since, |m| m.offset);
    Ok(AppJson(HistoryPage {
        channel: channel.to_owned(),
        truncated: since + 1 < position.oldest_offset && since < position.last_offset,
        messages: rows
            .into_iter()
            .map(|m| HistoryMessage {
                id: m.offset,
                data: m.data,
                created_at: m.created_at,
            })
            .collect(),
        next_since,
        has_more,
        last_id: position.last_offset,
        oldest_id: position.oldest_offset,
    }))
}
