//! The HTTP error boundary: one error type, mapped to JSON once.
//!
//! Every failure a client can see — handler errors, axum rejections, 404/405, body limits,
//! timeouts, panics — leaves as `{"error":{"code":"…","message":"…","request_id":"…"}}`. Handlers
//! return [`ApiError`] and use `?`; the [`JsonErrors`] layer rewrites the few responses
//! produced outside handlers (router fallbacks, tower-http layers) into the same shape, and
//! [`panic_response`] does the same for panics. Internal details are logged here, once, and
//! never sent to the client.
//!
//! The request id in the body comes from [`crate::http::middleware`], which owns it; nothing
//! there depends on this module.

use axum::{
    Json,
    body::Body,
    extract::{
        Request,
        rejection::{JsonRejection, QueryRejection},
    },
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

use crate::{
    http::{
        around::{After, Around},
        middleware::current_request_id,
    },
    ws::handshake::HandshakeError,
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Validation(String),
    #[error("{0}")]
    NotFound(String),
    /// No token, or one that failed verification (401, with `WWW-Authenticate: Bearer`).
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token whose permissions do not cover the request (403).
    #[error("{0}")]
    Forbidden(String),
    #[error("request body is larger than the limit")]
    PayloadTooLarge,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unavailable(String),
    /// A rate limit of `[limits]` (429 with `Retry-After`).
    #[error("{0}")]
    RateLimited(crate::rate_limit::Limited),
    /// The subject has created `limits.channels_per_subject` channels (429).
    #[error("{0}")]
    ChannelLimit(String),
    /// Compare-and-publish lost: `expected_last_id` is not the channel's last offset (409).
    #[error("{0}")]
    Conflict(String),
    /// An `Idempotency-Key` reused for another body within the window (422).
    #[error("{0}")]
    KeyReused(String),
    /// A plain HTTP request (or an unsupported WebSocket version) on the WebSocket route: 426
    /// with `Upgrade: websocket` and `Sec-WebSocket-Version: 13`, which say what to send instead.
    #[error("{0}")]
    UpgradeRequired(String),
    /// An axum rejection that keeps its own status (e.g. a failed WebSocket upgrade).
    #[error("{message}")]
    Rejected { status: StatusCode, message: String },
    /// Anything the client cannot fix; the detail is logged, not returned.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    pub fn internal(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Internal(err.into())
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Validation(_) => (StatusCode::BAD_REQUEST, "invalid_input"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::ChannelLimit(_) => (StatusCode::TOO_MANY_REQUESTS, "channel_limit"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::KeyReused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
            Self::UpgradeRequired(_) => (StatusCode::UPGRADE_REQUIRED, "upgrade_required"),
            Self::Rejected { status, .. } => (*status, code_for(*status)),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail<'a> {
    pub code: &'a str,
    pub message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Build the standard error response; also used by middleware for non-handler errors.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code,
            message,
            request_id: current_request_id(),
        },
    };
    (status, Json(body)).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let Self::Internal(source) = &self {
            tracing::error!(error = %source, "request failed");
        }
        let mut res = error_response(status, code, &self.to_string());
        let headers = res.headers_mut();
        match &self {
            // RFC 6750: tell the client which scheme is expected.
            Self::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // Whole seconds (RFC 9110), rounded up so a client that waits them succeeds.
            Self::RateLimited(limited) => {
                let secs = limited.retry_after.as_secs_f64().ceil().max(1.0) as u64;
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            // RFC 9110 §15.5.22 (426 names the protocol in `Upgrade`, itself listed in
            // `Connection`) and RFC 6455 §4.4 (the versions the server speaks).
            Self::UpgradeRequired(_) => {
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
                headers.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            _ => {}
        }
        res
    }
}

/// Stable machine-readable code for an HTTP status, for errors not produced by [`ApiError`].
pub fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_input",
        StatusCode::UPGRADE_REQUIRED => "upgrade_required",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

/// Rewrites error responses produced outside handlers (router 404/405, tower-http's 408 and
/// 413, axum rejections with text bodies) into the JSON error shape ([`super::around`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonErrors;

impl Around for JsonErrors {
    type Carry = ();

    fn before(&self, _: &mut Request) -> Result<(), Response> {
        Ok(())
    }

    fn after(&self, (): (), res: Response) -> After {
        let status = res.status();
        if !(status.is_client_error() || status.is_server_error()) {
            return After::Ready(res);
        }
        if super::middleware::has_content_type(&res, "application/json") {
            return After::Ready(res);
        }
        After::Later(Box::pin(rewrite_as_json(res)))
    }
}

async fn rewrite_as_json(res: Response) -> Response {
    let status = res.status();
    let (parts, body) = res.into_parts();
    // Bodies here are short texts from axum or tower-http; keep them as the message for 4xx,
    // never for 5xx (they could carry internals).
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = if status.is_client_error() && !text.trim().is_empty() {
        text.trim().to_owned()
    } else {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    };
    let mut rewritten = error_response(status, code_for(status), &message);
    // Keep headers such as `allow` (405) and the request id.
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rewritten
}

/// Panics become a 500 in the standard shape; the panic message is logged, not sent.
pub fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    let detail = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = detail, "handler panicked");
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
    )
}

impl From<HandshakeError> for ApiError {
    fn from(err: HandshakeError) -> Self {
        match err {
            // Not an upgrade at all: the request is fine, the protocol is not.
            HandshakeError::NotAnUpgrade => Self::UpgradeRequired(
                "this endpoint speaks WebSocket only: send an upgrade request (`Connection: \
                 Upgrade`, `Upgrade: websocket`, `Sec-WebSocket-Version: 13`, `Sec-WebSocket-Key`)"
                    .to_owned(),
            ),
            HandshakeError::Version => Self::UpgradeRequired(
                "unsupported WebSocket version: send `Sec-WebSocket-Version: 13`".to_owned(),
            ),
            HandshakeError::KeyMissing => Self::BadRequest(err.to_string()),
            HandshakeError::NotUpgradable => Self::UpgradeRequired(
                "this connection cannot be upgraded to a WebSocket (use HTTP/1.1)".to_owned(),
            ),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => Self::UnsupportedMediaType(
                "expected a request with `Content-Type: application/json`".to_owned(),
            ),
            JsonRejection::BytesRejection(_)
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Self::PayloadTooLarge
            }
            other => Self::BadRequest(other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::Validation(rejection.body_text())
    }
}

/// `axum::Json`, but its rejection is an [`ApiError`], so bad bodies get the standard shape.
#[derive(Debug, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct AppJson<T>(pub T);

impl<T: Serialize> IntoResponse for AppJson<T> {
    fn into_response(self) -> Response {
        Json(self.0).into_response()
    }
}

/// `axum::extract::Query` with [`ApiError`] as rejection.
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct AppQuery<T>(pub T);
