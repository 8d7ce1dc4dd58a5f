//! The batch API: `POST /api/v1/messages` with `{"messages":[{"channel":…,"data":…},…]}`
//! publishes up to `publish.max_batch_messages` messages, on any channels, atomically: all are
//! committed in one group (see [`crate::commit`]) or none is. The answer lists the
//! offsets in request order.
//!
//! Each item may carry `expected_last_id` (compare-and-publish, seeing the items before it)
//! and `idempotency_key` (a retried batch returns the original offsets). Every item is
//! validated before anything is queued: one invalid item refuses the whole request.

use axum::{extract::State, http::StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{
    auth::Action,
    http::{
        auth::Caller,
        error::{ApiError, AppJson, ErrorBody},
    },
    protocol::{check_data, check_expected_last_id, check_idempotency_key, validate_channel},
    publish::{self, Published},
    state::AppState,
};

/// Body of a batch publish.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct BatchRequest {
    /// At most `publish.max_batch_messages` (1000 by default); the body at most
    /// `http.max_body_bytes`.
    pub messages: Vec<BatchItem>,
}

/// One message of a batch.
#[derive(Debug, utoipa::ToSchema)]
pub struct BatchItem {
    /// Channel name: 1-128 characters of A-Z a-z 0-9 _ - : .
    pub channel: String,
    #[schema(value_type = crate::http::apidoc::MessageData)]
    pub data: Box<RawValue>,
    /// Compare-and-publish: only if the channel's last offset is this, counting the items
    /// before this one; otherwise `409 conflict` and nothing of the batch is stored.
    #[schema(value_type = Option<crate::http::apidoc::Offset>)]
    pub expected_last_id: Option<i64>,
    /// 1-255 visible ASCII characters: within publish.idempotency_window a retry returns the
    /// original offset of this item instead of storing it again.
    pub idempotency_key: Option<String>,
}

/// By hand, because serde's derive also reads a struct from an array; other fields are
/// ignored, as in the single publish.
impl<'de> Deserialize<'de> for BatchItem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Item;
        impl<'de> serde::de::Visitor<'de> for Item {
            type Value = BatchItem;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"an object {"channel": …, "data": <JSON>}"#)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<BatchItem, A::Error> {
                use serde::de::Error;
                let (mut channel, mut data, mut expected, mut key) = (None, None, None, None);
                while let Some(field) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let duplicate = match &*field {
                        "channel" => channel.replace(map.next_value::<String>()?).is_some(),
                        "data" => data.replace(map.next_value::<Box<RawValue>>()?).is_some(),
                        "expected_last_id" => {
                            let n = map.next_value::<Option<serde_json::Number>>()?;
                            let n = crate::protocol::expected_last_id_of(n)?;
                            expected.replace(n).is_some()
                        }
                        "idempotency_key" => {
                            key.replace(map.next_value::<Option<String>>()?).is_some()
                        }
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            false
                        }
                    };
                    if duplicate {
                        return Err(A::Error::custom(format!("duplicate field `{field}`")));
                    }
                }
                Ok(BatchItem {
                    channel: channel.ok_or_else(|| A::Error::missing_field("channel"))?,
                    data: data.ok_or_else(|| A::Error::missing_field("data"))?,
                    expected_last_id: expected.flatten(),
                    idempotency_key: key.flatten(),
                })
            }
        }
        d.deserialize_map(Item)
    }
}

/// The offsets of a batch, in request order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchPublished {
    pub messages: Vec<Published>,
}

/// Publish several messages at once, atomically: all stored (with consecutive offsets per
/// channel, in request order) or none.
#[utoipa::path(
    post,
    path = "/api/v1/messages",
    tag = "messages",
    request_body(
        content = BatchRequest,
        description = "`{\"messages\": [{\"channel\": …, \"data\": <JSON>}, …]}`: 1 to publish.max_batch_messages (1000) items, at most `http.max_body_bytes`",
    ),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "All stored (durable) and being delivered; items that repeat an `idempotency_key` answer with the original (`replayed: true`)", body = BatchPublished),
        (status = 400, description = "An invalid item (the message names it as `messages[i]`), no items, or more than publish.max_batch_messages; nothing was stored", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token (auth.mode = required)", body = ErrorBody,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token may not publish on one of the channels", body = ErrorBody),
        (status = 408, description = "No answer within http.request_timeout", body = ErrorBody),
        (status = 409, description = "An item's `expected_last_id` is not its channel's last offset (`conflict`); nothing was stored", body = ErrorBody),
        (status = 413, description = "Body larger than http.max_body_bytes", body = ErrorBody),
        (status = 415, description = "Body is not `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "An item's `idempotency_key` was used for other data within publish.idempotency_window (`idempotency_key_reused`); nothing was stored", body = ErrorBody),
        (status = 429, description = "A rate limit (`rate_limited`, with Retry-After; a batch counts as many publishes as it has items) or the channel quota (`channel_limit`)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a retry can succeed (rate limits only)"))),
        (status = 500, description = "Internal error (logged; the message says nothing more)", body = ErrorBody),
        (status = 503, description = "Message store unavailable, or the commit queue stayed full for publish.queue_wait (`unavailable`)", body = ErrorBody),
    )
)]
pub async fn publish_batch(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<BatchRequest>,
) -> Result<(StatusCode, AppJson<BatchPublished>), ApiError> {
    let max = state.settings.publish.max_batch_messages;
    if body.messages.is_empty() || body.messages.len() > max {
        return Err(ApiError::Validation(format!(
            "`messages` must hold 1 to {max} items (publish.max_batch_messages)"
        )));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for (index, item) in body.messages.iter().enumerate() {
        let invalid = |reason: String| ApiError::Validation(format!("messages[{index}]: {reason}"));
        validate_channel(&item.channel).map_err(|e| invalid(e.to_string()))?;
        caller.require(Action::Publish, &item.channel)?;
        check_data(&item.data).map_err(|e| invalid(e.to_string()))?;
        check_expected_last_id(item.expected_last_id).map_err(invalid)?;
        check_idempotency_key(item.idempotency_key.as_deref()).map_err(invalid)?;
        messages.push(publish::Message {
            channel: &item.channel,
            data: &item.data,
            expected_last_id: item.expected_last_id,
            idempotency_key: item.idempotency_key.as_deref(),
        });
    }
    let refused = |err: publish::BatchError| -> ApiError {
        let index = err.index;
        match ApiError::from(err.error) {
            // Name the item in answers that are about one.
            ApiError::Conflict(m) => ApiError::Conflict(format!("messages[{index}]: {m}")),
            ApiError::KeyReused(m) => ApiError::KeyReused(format!("messages[{index}]: {m}")),
            ApiError::ChannelLimit(m) => ApiError::ChannelLimit(format!("messages[{index}]: {m}")),
            other => other,
        }
    };
    let pending = publish::submit_batch(&state, &messages, caller.subject())
        .await
        .map_err(refused)?;
    let published = pending.published_all().await.map_err(refused)?;
    Ok((
        StatusCode::CREATED,
        AppJson(BatchPublished {
            messages: published,
        }),
    ))
}
