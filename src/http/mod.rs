//! The HTTP surface: routes and the middleware stack around them.
//!
//! Layers, outermost first: request id → trace span → access log and metrics → JSON error shape
//! → per-address rate limit → panic catcher → CORS → body limit → timeout → compression → routes. The order matters: the request
//! id exists before anything logs, and errors produced by inner layers (413, 408, panics) still
//! get the JSON shape and the id.

pub mod access;
pub mod admin;
pub mod apidoc;
pub mod around;
pub mod auth;
pub mod batch;
pub mod error;
pub mod health;
pub mod limits;
pub mod messages;
pub mod middleware;
pub mod realtime;
pub mod serve;
pub mod webhooks;

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

use crate::{config::HttpSettings, state::AppState};

/// Every documented route. Registering through `OpenApiRouter` keeps the OpenAPI document and
/// the router one list: a route cannot exist undocumented, or be documented but missing.
pub fn api_routes() -> utoipa_axum::router::OpenApiRouter<AppState> {
    use utoipa::OpenApi as _;
    use utoipa_axum::routes;
    let routes = utoipa_axum::router::OpenApiRouter::with_openapi(apidoc::ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(realtime::upgrade))
        .routes(routes!(messages::list_messages, messages::publish_message))
        .routes(routes!(batch::publish_batch))
        .routes(routes!(webhooks::create_webhook, webhooks::list_webhooks))
        .routes(routes!(webhooks::get_webhook, webhooks::delete_webhook))
        .routes(routes!(webhooks::list_dead_deliveries))
        .routes(routes!(webhooks::retry_dead_deliveries))
        .routes(routes!(webhooks::retry_dead_delivery));
    #[cfg(feature = "sse")]
    let routes = routes.routes(routes!(realtime::stream));
    routes
}

/// The OpenAPI document served at `/api-docs/openapi.json` by a server with these limits.
pub fn openapi(limits: &apidoc::ApiLimits) -> utoipa::openapi::OpenApi {
    let mut doc = api_routes().into_openapi();
    apidoc::constrain(&mut doc, limits);
    doc
}

/// Build the router with every route and layer.
pub fn router(state: AppState) -> Router {
    let http = state.settings.http.clone();
    let ws_limits = (
        state.settings.ws.max_connections,
        state.settings.ws.max_connections_per_ip,
    );
    let access_log = around::AroundLayer(access::RecordHttp(state.clone()));
    let rate_limit = around::AroundLayer(limits::RateLimitHttp(state.clone()));
    let trace = middleware::trace_layer(&state.settings);
    let (api, mut openapi) = api_routes().split_for_parts();
    apidoc::constrain(&mut openapi, &apidoc::ApiLimits::from(&*state.settings));
    #[cfg(feature = "demo")]
    let api = api.merge(crate::demo::routes(
        &state.settings.demo,
        std::sync::Arc::clone(&state.auth),
    ));
    let openapi = std::sync::Arc::new(openapi);
    api.route(
        "/api-docs/openapi.json",
        get(move || {
            let openapi = std::sync::Arc::clone(&openapi);
            async move { axum::Json(openapi) }
        }),
    )
    .with_state(state)
    // One `Router::layer` call: each one wraps every route in another boxed service.
    .layer(
        ServiceBuilder::new()
            .layer(axum::Extension(health::ReadinessCache::new()))
            .layer(axum::Extension(limits::ConnectionLimits::new(
                ws_limits.0,
                ws_limits.1,
            )))
            .layer(SetSensitiveRequestHeadersLayer::new([
                header::AUTHORIZATION,
                header::COOKIE,
                header::PROXY_AUTHORIZATION,
            ]))
            .layer(around::AroundLayer(middleware::RequestIds))
            .layer(trace)
            .layer(access_log)
            .layer(around::AroundLayer(error::JsonErrors))
            .layer(rate_limit)
            .layer(CatchPanicLayer::custom(error::panic_response))
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
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                HeaderName::from_static("x-request-id"),
            ])
            .expose_headers([HeaderName::from_static("x-request-id")]),
    )
}
