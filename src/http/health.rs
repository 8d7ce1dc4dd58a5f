//! Health endpoints for orchestrators.
//!
//! * `GET /healthz` — liveness: the process serves HTTP. No dependency checks, so a Redis or
//!   Postgres outage never gets healthy pods restarted.
//! * `GET /readyz` — readiness: Postgres answers `SELECT 1`, Redis answers `PING`, the pub/sub
//!   listener is connected, and shutdown has not begun. Checks run concurrently, each within
//!   `health.check_timeout`.

use std::time::{Duration, Instant};

use axum::{Json, extract::State, http::StatusCode, response::IntoResponse};
use serde::Serialize;
use serde_json::json;

use crate::state::AppState;

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "Alive", body = serde_json::Value, example = json!({"status": "ok"}))))]
pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

#[derive(Debug, Serialize)]
struct Check {
    status: &'static str,
    latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn check<E: std::fmt::Display>(
    budget: Duration,
    fut: impl Future<Output = Result<(), E>>,
) -> Check {
    let started = Instant::now();
    let result = tokio::time::timeout(budget, fut).await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let error = match result {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(err.to_string()),
        Err(_) => Some(format!("no answer within {budget:?}")),
    };
    Check {
        status: if error.is_none() { "ok" } else { "fail" },
        latency_ms,
        error,
    }
}

/// Readiness: Postgres, Redis and the pub/sub listener answer, and no shutdown is under way.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready; each check with its latency", body = serde_json::Value),
        (status = 503, description = "Not ready (a dependency failed or shutting down)", body = serde_json::Value),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let budget = state.settings.health.check_timeout;
    let history = check(budget, state.store.ping());
    let broker = check(budget, state.pubsub.ping());
    let (history, broker) = tokio::join!(history, broker);
    let listener_ok = state.pubsub.is_listening();
    let draining = state.lifecycle.is_draining();
    let ready = history.error.is_none() && broker.error.is_none() && listener_ok && !draining;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Checks are named after the backend in use: `postgres`/`redis`, or in embedded mode
    // `memory_history`/`memory_broker`.
    let history_backend = state.store.backend();
    let broker_backend = state.pubsub.backend();
    let name = |role: &str, backend: &str| {
        if backend == "memory" {
            format!("memory_{role}")
        } else {
            backend.to_owned()
        }
    };
    let mut checks = serde_json::Map::new();
    checks.insert(name("history", history_backend), json!(history));
    checks.insert(name("broker", broker_backend), json!(broker));
    checks.insert(
        "pubsub_listener".to_owned(),
        json!({ "status": if listener_ok { "ok" } else { "fail" } }),
    );
    let body = json!({
        "status": if ready { "ok" } else { "unavailable" },
        "shutting_down": draining,
        "embedded": history_backend == "memory" || broker_backend == "memory",
        "backends": { "history": history_backend, "broker": broker_backend },
        "checks": checks,
    });
    (status, Json(body))
}
