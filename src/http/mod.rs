//! The HTTP surface: routes and the middleware stack around them.
//!
//! Layers, outermost first: request id → trace span → access log and metrics → JSON error shape
//! → panic catcher → CORS → body limit → timeout → compression → routes. The order matters: the request
//! id exists before anything logs, and errors produced by inner layers (413, 408, panics) still
//! get the JSON shape and the id.

pub mod admin;
pub mod error;
pub mod health;
pub mod messages;
pub mod middleware;

use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::{HeaderName, HeaderValue, Method, StatusCode, header},
    routing::get,
};
use tower::ServiceBuilder;
use tower_http::{
    catch_panic::CatchPanicLayer,
    compression::CompressionLayer,
    cors::{AllowOrigin, CorsLayer},
    limit::RequestBodyLimitLayer,
    sensitive_headers::SetSensitiveRequestHeadersLayer,
    timeout::TimeoutLayer,
};

use crate::{config::HttpSettings, sse, state::AppState, ws};

/// Build the router with every route and layer.
pub fn router(state: AppState) -> Router {
    let http = state.settings.http.clone();
    let access_log = axum::middleware::from_fn_with_state(
        state.clone(),
        crate::access_log::middleware::record_http,
    );
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/ws", get(ws::upgrade))
        .route("/sse", get(sse::stream))
        .route(
            "/api/v1/channels/{channel}/messages",
            get(messages::list_messages).post(messages::publish_message),
        )
        .merge(crate::demo::routes(&state.settings.demo))
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(SetSensitiveRequestHeadersLayer::new([
                    header::AUTHORIZATION,
                    header::COOKIE,
                    header::PROXY_AUTHORIZATION,
                ]))
                .layer(axum::middleware::from_fn(middleware::request_id))
                .layer(middleware::trace_layer())
                .layer(access_log)
                .layer(axum::middleware::from_fn(middleware::json_errors))
                .layer(CatchPanicLayer::custom(middleware::panic_response))
                .option_layer(cors_layer(&http))
                .layer(RequestBodyLimitLayer::new(http.max_body_bytes))
                .layer(DefaultBodyLimit::max(http.max_body_bytes))
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    http.request_timeout,
                ))
                .layer(CompressionLayer::new()),
        )
}

fn cors_layer(http: &HttpSettings) -> Option<CorsLayer> {
    if http.cors_allowed_origins.is_empty() {
        return None;
    }
    let origin = if http.cors_allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Validated at startup, so every entry parses.
        AllowOrigin::list(
            http.cors_allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                HeaderName::from_static("x-request-id"),
            ])
            .expose_headers([HeaderName::from_static("x-request-id")]),
    )
}
