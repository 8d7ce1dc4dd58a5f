//! The webhook API: `POST/GET /api/v1/webhooks`, `GET/DELETE /api/v1/webhooks/{id}`, and the
//! dead deliveries of a webhook (`GET …/{id}/dead-deliveries`, `POST …/retry`).
//!
//! Every route needs a token with the `admin` claim. With `auth.mode = disabled` there is no
//! token to check, and the API is refused (403) unless `webhooks.allow_unauthenticated_api`
//! says otherwise: a webhook makes relay send data anywhere its URL says, which an open port
//! must not offer by accident. Secrets are accepted, stored and used for signing, never
//! returned. URLs are checked against `webhooks.allowed_hosts`, resolved, before anything is
//! stored (and again at every delivery, by the dispatcher).

use std::time::Duration;

use axum::{
    extract::{Path, State},
    http::StatusCode,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    http::{
        auth::Caller,
        error::{ApiError, AppJson, AppQuery, ErrorBody},
    },
    state::AppState,
    store::outbox::{CreateError, DeadDelivery, Deleted, Source, WebhookInfo},
    webhooks::{self, RawSpec, WebhookSpec},
};

/// How long creating a webhook may spend resolving its host.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// 403 unless the caller may manage webhooks.
fn require_admin(state: &AppState, caller: &Caller) -> Result<(), ApiError> {
    match &caller.0 {
        Some(p) if p.admin => Ok(()),
        Some(p) => Err(ApiError::Forbidden(format!(
            "`{}` may not manage webhooks: the token has no `admin` claim",
            p.sub
        ))),
        None if state.settings.webhooks.allow_unauthenticated_api => Ok(()),
        None => Err(ApiError::Forbidden(
            "the webhook API needs auth.mode = required and a token with the `admin` claim \
             (webhooks.allow_unauthenticated_api = true opens it without authentication)"
                .to_owned(),
        )),
    }
}

fn webhook_id(id: &str) -> Result<&str, ApiError> {
    if webhooks::valid_id(id) {
        Ok(id)
    } else {
        Err(ApiError::Validation(format!(
            "a webhook id is 1 to {} of A-Z a-z 0-9 _ -",
            webhooks::MAX_ID_LEN
        )))
    }
}

/// Body of `POST /api/v1/webhooks`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateWebhook {
    /// `http://` or `https://` URL (visible ASCII, no credentials, no fragment) whose host
    /// `webhooks.allowed_hosts` allows; every address it resolves to is checked.
    pub url: String,
    /// 1 to 100 channel patterns: a channel name, or a prefix ending in `*` (`orders:*`, `*`).
    pub channels: Vec<String>,
    /// 16 to 256 printable ASCII characters; signs every request (`X-Relay-Signature`) and is
    /// never returned.
    pub secret: String,
    /// Request timeout in milliseconds (100 to webhooks.max_timeout; webhooks.timeout when
    /// absent).
    #[schema(value_type = Option<u64>)]
    pub timeout_ms: Option<serde_json::Number>,
    /// Attempts before a delivery is dead (1 to 100; webhooks.max_attempts when absent).
    #[schema(value_type = Option<u32>)]
    pub max_attempts: Option<serde_json::Number>,
}

/// A webhook, as listed (the secret is never returned).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub channels: Vec<String>,
    pub timeout_ms: u64,
    pub max_attempts: u32,
    /// `api` (created here) or `config` (`[[webhooks.endpoints]]`; delete it there).
    pub source: Source,
    pub created_at: DateTime<Utc>,
}

impl From<WebhookInfo> for Webhook {
    fn from(w: WebhookInfo) -> Self {
        Self {
            id: w.id,
            url: w.url,
            channels: w.channels,
            timeout_ms: u64::try_from(w.timeout.as_millis()).unwrap_or(u64::MAX),
            max_attempts: w.max_attempts,
            source: w.source,
            created_at: w.created_at,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookList {
    pub webhooks: Vec<Webhook>,
}

/// A dead delivery: every attempt failed, or the receiver refused it for good.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadDeliveryView {
    /// The delivery id (`X-Relay-Delivery`), a UUID.
    pub id: String,
    pub channel: String,
    /// The message's offset in its channel.
    pub message_id: i64,
    pub attempts: u32,
    /// The last response's status, if the last attempt got one.
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub published_at: DateTime<Utc>,
    pub dead_at: DateTime<Utc>,
}

impl From<DeadDelivery> for DeadDeliveryView {
    fn from(d: DeadDelivery) -> Self {
        Self {
            id: d.id.to_string(),
            channel: d.channel,
            message_id: d.offset,
            attempts: d.attempts,
            last_status: d.last_status,
            last_error: d.last_error,
            published_at: d.published_at,
            dead_at: d.dead_at,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadDeliveryList {
    pub deliveries: Vec<DeadDeliveryView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Retried {
    /// Dead deliveries made pending again (with a fresh budget of attempts).
    pub retried: u64,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadQuery {
    /// At most this many, oldest first (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

/// A JSON number that is an integer in `range` (`1000.0` counts: JSON Schema's `integer`).
fn integer_in(
    n: Option<&serde_json::Number>,
    range: std::ops::RangeInclusive<u64>,
    message: impl FnOnce() -> String,
) -> Result<Option<u64>, ApiError> {
    let Some(n) = n else { return Ok(None) };
    let value = n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
            .map(|f| f as u64)
    });
    match value {
        Some(v) if range.contains(&v) => Ok(Some(v)),
        _ => Err(ApiError::Validation(message())),
    }
}

/// Create a webhook: deliveries start with the next message published on a matching channel.
#[utoipa::path(
    post,
    path = "/api/v1/webhooks",
    tag = "webhooks",
    request_body(content = CreateWebhook, description = "`{\"url\", \"channels\": [\"orders:*\", \"news\"], \"secret\"}`, optionally `timeout_ms` and `max_attempts`"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created; the secret is not returned", body = Webhook),
        (status = 400, description = "Invalid URL, pattern, secret, timeout or attempts, or a host webhooks.allowed_hosts does not allow (`invalid_input`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token has no `admin` claim, or auth is disabled (see webhooks.allow_unauthenticated_api)", body = ErrorBody),
        (status = 409, description = "webhooks.max_webhooks exist already (`conflict`)", body = ErrorBody),
        (status = 413, description = "Body larger than http.max_body_bytes", body = ErrorBody),
        (status = 415, description = "Body is not `Content-Type: application/json`", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn create_webhook(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<serde_json::Map<String, serde_json::Value>>,
) -> Result<(StatusCode, AppJson<Webhook>), ApiError> {
    require_admin(&state, &caller)?;
    // Through a map: a struct would also be read from a JSON array.
    let body: CreateWebhook = serde_json::from_value(serde_json::Value::Object(body))
        .map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))?;
    let settings = &state.settings.webhooks;
    let max_timeout = u64::try_from(settings.max_timeout.as_millis()).unwrap_or(u64::MAX);
    let min_timeout = u64::try_from(webhooks::MIN_TIMEOUT.as_millis()).unwrap_or(0);
    let timeout = integer_in(body.timeout_ms.as_ref(), min_timeout..=max_timeout, || {
        format!("`timeout_ms` must be an integer between {min_timeout} and {max_timeout}")
    })?;
    let max_attempts = integer_in(
        body.max_attempts.as_ref(),
        1..=u64::from(webhooks::MAX_ATTEMPTS),
        || {
            format!(
                "`max_attempts` must be an integer between 1 and {}",
                webhooks::MAX_ATTEMPTS
            )
        },
    )?;
    let raw = RawSpec {
        url: &body.url,
        channels: &body.channels,
        secret: &body.secret,
        timeout: timeout.map(Duration::from_millis),
        max_attempts: max_attempts.and_then(|n| u32::try_from(n).ok()),
    };
    let spec =
        WebhookSpec::parse(raw, settings).map_err(|e| ApiError::Validation(e.to_string()))?;
    state
        .webhook_hosts
        .check_url(&spec.url, RESOLVE_TIMEOUT)
        .await
        .map_err(|why| ApiError::Validation(webhooks::InvalidWebhook::Host(why).to_string()))?;
    let created = state
        .outbox
        .create(
            &webhooks::new_id(),
            &spec,
            Source::Api,
            settings.max_webhooks,
        )
        .await
        .map_err(|err| match err {
            err @ CreateError::Limit(_) => ApiError::Conflict(err.to_string()),
            CreateError::Store(err) => err.into(),
        })?;
    tracing::info!(webhook = %created.id, url = %created.url, subject = caller.subject().unwrap_or(""), "webhook created");
    Ok((StatusCode::CREATED, AppJson(created.into())))
}

/// Every webhook, oldest first (secrets are never returned).
#[utoipa::path(
    get,
    path = "/api/v1/webhooks",
    tag = "webhooks",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The webhooks", body = WebhookList),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token has no `admin` claim, or auth is disabled", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn list_webhooks(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<AppJson<WebhookList>, ApiError> {
    require_admin(&state, &caller)?;
    let webhooks = state.outbox.list().await?;
    Ok(AppJson(WebhookList {
        webhooks: webhooks.into_iter().map(Webhook::from).collect(),
    }))
}

/// One webhook.
#[utoipa::path(
    get,
    path = "/api/v1/webhooks/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The webhook", body = Webhook),
        (status = 400, description = "Not a webhook id", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token has no `admin` claim, or auth is disabled", body = ErrorBody),
        (status = 404, description = "No such webhook", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn get_webhook(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<AppJson<Webhook>, ApiError> {
    require_admin(&state, &caller)?;
    let id = webhook_id(&id)?;
    match state.outbox.get(id).await? {
        Some(w) => Ok(AppJson(w.into())),
        None => Err(ApiError::NotFound(format!("no webhook `{id}`"))),
    }
}

/// Delete a webhook and its pending and dead deliveries (in-flight ones may still arrive).
#[utoipa::path(
    delete,
    path = "/api/v1/webhooks/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Not a webhook id", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token has no `admin` claim, or auth is disabled", body = ErrorBody),
        (status = 404, description = "No such webhook", body = ErrorBody),
        (status = 409, description = "Defined by configuration (`[[webhooks.endpoints]]`): remove it there", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn delete_webhook(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    require_admin(&state, &caller)?;
    let id = webhook_id(&id)?;
    match state.outbox.delete(id).await? {
        Deleted::Deleted => {
            tracing::info!(webhook = %id, subject = caller.subject().unwrap_or(""), "webhook deleted");
            Ok(StatusCode::NO_CONTENT)
        }
        Deleted::NotFound => Err(ApiError::NotFound(format!("no webhook `{id}`"))),
        Deleted::Configured => Err(ApiError::Conflict(format!(
            "webhook `{id}` is defined by configuration (webhooks.endpoints): remove it there"
        ))),
    }
}

/// The oldest dead deliveries of a webhook.
#[utoipa::path(
    get,
    path = "/api/v1/webhooks/{id}/dead-deliveries",
    tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id"), DeadQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Dead deliveries, oldest first", body = DeadDeliveryList),
        (status = 400, description = "Not a webhook id, or `limit` out of range", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token has no `admin` claim, or auth is disabled", body = ErrorBody),
        (status = 404, description = "No such webhook", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn list_dead_deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    AppQuery(query): AppQuery<DeadQuery>,
) -> Result<AppJson<DeadDeliveryList>, ApiError> {
    require_admin(&state, &caller)?;
    let id = webhook_id(&id)?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::Validation(
            "`limit` must be between 1 and 1000".to_owned(),
        ));
    }
    if state.outbox.get(id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no webhook `{id}`")));
    }
    let dead = state.outbox.dead(id, limit).await?;
    Ok(AppJson(DeadDeliveryList {
        deliveries: dead.into_iter().map(DeadDeliveryView::from).collect(),
    }))
}

/// Make every dead delivery of a webhook pending again, each with a fresh budget of attempts.
#[utoipa::path(
    post,
    path = "/api/v1/webhooks/{id}/dead-deliveries/retry",
    tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "How many were made pending", body = Retried),
        (status = 400, description = "Not a webhook id", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token has no `admin` claim, or auth is disabled", body = ErrorBody),
        (status = 404, description = "No such webhook", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn retry_dead_deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<AppJson<Retried>, ApiError> {
    require_admin(&state, &caller)?;
    let id = webhook_id(&id)?;
    if state.outbox.get(id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no webhook `{id}`")));
    }
    let retried = state.outbox.retry_dead(id, None).await?;
    Ok(AppJson(Retried { retried }))
}

/// Make one dead delivery pending again, with a fresh budget of attempts.
#[utoipa::path(
    post,
    path = "/api/v1/webhooks/{id}/dead-deliveries/{delivery}/retry",
    tag = "webhooks",
    params(
        ("id" = String, Path, description = "Webhook id"),
        ("delivery" = String, Path, description = "Delivery id (`X-Relay-Delivery`)"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Made pending", body = Retried),
        (status = 400, description = "Not a webhook id or delivery id", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "The token has no `admin` claim, or auth is disabled", body = ErrorBody),
        (status = 404, description = "No such dead delivery of this webhook", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    )
)]
pub async fn retry_dead_delivery(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, delivery)): Path<(String, String)>,
) -> Result<AppJson<Retried>, ApiError> {
    require_admin(&state, &caller)?;
    let id = webhook_id(&id)?;
    // Hyphenated only, as the OpenAPI document says (the parser takes other forms too).
    let delivery = Some(&delivery)
        .filter(|d| d.len() == 36)
        .and_then(|d| Uuid::try_parse(d).ok())
        .ok_or_else(|| ApiError::Validation("the delivery id is a hyphenated UUID".to_owned()))?;
    match state.outbox.retry_dead(id, Some(delivery)).await? {
        0 => Err(ApiError::NotFound(format!(
            "no dead delivery `{delivery}` of webhook `{id}`"
        ))),
        retried => Ok(AppJson(Retried { retried })),
    }
}
