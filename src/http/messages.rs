//! The message API: publish to a channel and page through its history.
//!
//! * `POST /api/v1/channels/{channel}/messages` with `{"data": <JSON>}` → `201` with the assigned
//!   offset. Durable once answered (see [`crate::publish`]).
//! * `GET /api/v1/channels/{channel}/messages?since=<offset>&limit=<n>` → messages with offset
//!   greater than `since`, oldest first, and the cursor for the next page.
//!
//! Input is validated before anything touches Postgres or Redis. With `auth.mode = required`
//! both need `Authorization: Bearer` (401 without) whose token allows `publish` / `history` on
//! the channel (403 otherwise).

use axum::{
    extract::{Path, State},
    http::StatusCode,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{
    auth::Action,
    http::{
        auth::Caller,
        error::{ApiError, AppJson, AppQuery, ErrorBody},
    },
    protocol::{MAX_OFFSET, check_data, check_expected_last_id, validate_channel},
    publish::{self, PublishError, Published},
    state::AppState,
    store::StoreError,
};

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        std::sync::Arc::new(err).into()
    }
}

/// A commit's error is shared by every publish of its batch.
impl From<std::sync::Arc<StoreError>> for ApiError {
    fn from(err: std::sync::Arc<StoreError>) -> Self {
        if err.is_data_rejected() {
            return Self::Validation("`data` cannot be stored".to_owned());
        }
        match &*err {
            StoreError::Query(
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed,
            ) => Self::Unavailable("the message store is unavailable".to_owned()),
            _ => Self::internal(err.to_string()),
        }
    }
}

impl From<PublishError> for ApiError {
    fn from(err: PublishError) -> Self {
        match err {
            PublishError::RateLimited(limited) => Self::RateLimited(limited),
            err @ PublishError::ChannelLimit { .. } => Self::ChannelLimit(err.to_string()),
            err @ PublishError::Conflict { .. } => Self::Conflict(err.to_string()),
            err @ PublishError::KeyReused { .. } => Self::KeyReused(err.to_string()),
            PublishError::Unavailable(err) => Self::Unavailable(err.to_string()),
            PublishError::Store(err) => err.into(),
        }
    }
}

fn channel_name(channel: &str) -> Result<&str, ApiError> {
    validate_channel(channel).map_err(|e| ApiError::Validation(e.to_string()))
}

/// Body of a publish request.
#[derive(Debug, utoipa::ToSchema)]
pub struct PublishRequest {
    #[schema(value_type = crate::http::apidoc::MessageData)]
    pub data: Box<RawValue>,
    /// Compare-and-publish: store the message only if the channel's last offset is this
    /// (0 for a channel never published to); otherwise `409 conflict` and nothing is stored.
    #[schema(value_type = Option<crate::http::apidoc::Offset>)]
    pub expected_last_id: Option<i64>,
}

/// The channel in the path; its `pattern` and length come from `crate::http::apidoc`.
const CHANNEL_PARAM: &str = "Channel name: 1-128 characters of A-Z a-z 0-9 _ - : .";

/// By hand, because serde's derive also reads a struct from an array: `[1]` would publish `1`.
/// The body must be the object `{"data": …, "expected_last_id": …}` (other fields are ignored).
impl<'de> Deserialize<'de> for PublishRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Body;
        impl<'de> serde::de::Visitor<'de> for Body {
            type Value = PublishRequest;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"an object {"data": …}"#)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<PublishRequest, A::Error> {
                let mut data = None;
                let mut expected_last_id = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "data" if data.replace(map.next_value()?).is_some() => {
                            return Err(serde::de::Error::duplicate_field("data"));
                        }
                        "data" => {}
                        "expected_last_id" => {
                            if expected_last_id.is_some() {
                                return Err(serde::de::Error::duplicate_field("expected_last_id"));
                            }
                            let n = map.next_value::<Option<serde_json::Number>>()?;
                            expected_last_id = Some(crate::protocol::expected_last_id_of(n)?);
                        }
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                let data = data.ok_or_else(|| serde::de::Error::missing_field("data"))?;
                Ok(PublishRequest {
                    data,
                    expected_last_id: expected_last_id.flatten(),
                })
            }
        }
        d.deserialize_map(Body)
    }
}

/// Publish a message: stored with the channel's next offset, then delivered to every subscriber
/// on every replica.
#[utoipa::path(
    post,
    path = "/api/v1/channels/{channel}/messages",
    tag = "messages",
    params(
        ("channel" = String, Path, description = CHANNEL_PARAM),
        ("Idempotency-Key" = Option<String>, Header, description = "1-255 visible ASCII characters: a retry with the same key within publish.idempotency_window (5 min) returns the original offset instead of storing a second message, on any replica"),
    ),
    request_body(
        content = PublishRequest,
        description = "`{\"data\": <JSON>}`, at most `http.max_body_bytes` (1 MiB by default)",
    ),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Stored (durable) and being delivered; with a repeated `Idempotency-Key`, the original message (`replayed: true`)", body = Published,
            headers(("Idempotent-Replayed" = String, description = "`true` when this answers a retry with the original message"))),
        (status = 400, description = "Invalid channel, a body that is not `{\"data\": <JSON>}`, or `data` that cannot be stored", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token (auth.mode = required)", body = ErrorBody,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token may not publish on this channel", body = ErrorBody),
        (status = 408, description = "No answer within http.request_timeout", body = ErrorBody),
        (status = 413, description = "Body larger than http.max_body_bytes", body = ErrorBody),
        (status = 422, description = "`Idempotency-Key` already used for other data on this channel within publish.idempotency_window (`idempotency_key_reused`)", body = ErrorBody),
        (status = 409, description = "Compare-and-publish: `expected_last_id` is not the channel's last offset (`conflict`; nothing was stored)", body = ErrorBody),
        (status = 415, description = "Body is not `Content-Type: application/json`", body = ErrorBody),
        (status = 429, description = "A rate limit (`rate_limited`, with Retry-After) or the subject's channel quota (`channel_limit`)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a retry can succeed (rate limits only)"))),
        (status = 500, description = "Internal error (logged; the message says nothing more)", body = ErrorBody),
        (status = 503, description = "Message store unavailable", body = ErrorBody),
    )
)]
pub async fn publish_message(
    State(state): State<AppState>,
    caller: Caller,
    Path(channel): Path<String>,
    headers: axum::http::HeaderMap,
    AppJson(body): AppJson<PublishRequest>,
) -> Result<
    (
        StatusCode,
        [(&'static str, &'static str); 1],
        AppJson<Published>,
    ),
    ApiError,
> {
    let channel = channel_name(&channel)?;
    caller.require(Action::Publish, channel)?;
    check_data(&body.data).map_err(|e| ApiError::Validation(e.to_string()))?;
    check_expected_last_id(body.expected_last_id).map_err(ApiError::Validation)?;
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .filter(|k| crate::protocol::valid_idempotency_key(k))
                .ok_or_else(|| {
                    ApiError::Validation(format!(
                        "`Idempotency-Key` must be 1 to {} visible ASCII characters",
                        crate::protocol::MAX_IDEMPOTENCY_KEY
                    ))
                })?,
        ),
    };
    let message = publish::Message {
        channel,
        data: &body.data,
        expected_last_id: body.expected_last_id,
        idempotency_key,
    };
    let published = publish::publish(&state, message, caller.subject()).await?;
    let replayed = [(
        "idempotent-replayed",
        if published.replayed { "true" } else { "false" },
    )];
    Ok((StatusCode::CREATED, replayed, AppJson(published)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Return messages with an offset greater than this.
    #[serde(default)]
    pub since: Option<i64>,
    /// Page size: at most `history.max_page_size` (1000 by default); `history.default_page_size`
    /// when absent.
    #[serde(default)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HistoryMessage {
    pub id: i64,
    #[schema(value_type = crate::http::apidoc::MessageData)]
    pub data: Box<RawValue>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
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

/// Page through a channel's stored messages, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/channels/{channel}/messages",
    tag = "messages",
    params(("channel" = String, Path, description = CHANNEL_PARAM), HistoryQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of history", body = HistoryPage),
        (status = 400, description = "Invalid channel, since or limit", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token (auth.mode = required)", body = ErrorBody,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token may not read this channel's history", body = ErrorBody),
        (status = 408, description = "No answer within http.request_timeout", body = ErrorBody),
        (status = 500, description = "Internal error (logged; the message says nothing more)", body = ErrorBody),
        (status = 503, description = "Message store unavailable", body = ErrorBody),
    )
)]
pub async fn list_messages(
    State(state): State<AppState>,
    caller: Caller,
    Path(channel): Path<String>,
    AppQuery(query): AppQuery<HistoryQuery>,
) -> Result<AppJson<HistoryPage>, ApiError> {
    let channel = channel_name(&channel)?;
    caller.require(Action::History, channel)?;
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
    if !(0..=MAX_OFFSET).contains(&since) {
        return Err(ApiError::Validation(format!(
            "`since` must be an offset between 0 and {MAX_OFFSET}"
        )));
    }
    let position = state.store.position(channel).await?;
    let mut rows = state.store.read_since(channel, since, limit + 1).await?;
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
