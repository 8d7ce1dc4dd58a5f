//! Health endpoints for orchestrators.
//!
//! * `GET /healthz` — liveness: the process serves HTTP. No dependency checks, so a Redis or
//!   Postgres outage never gets healthy pods restarted.
//! * `GET /readyz` — readiness: Postgres answers `SELECT 1`, Redis answers `PING`, the pub/sub
//!   listener is connected, and shutdown has not begun. Checks run concurrently, each within
//!   `health.check_timeout`.
//!
//! The admin port's `/metrics` evaluates the same checks at scrape time ([`Readiness`]), so
//! Prometheus sees `relay_ready` and each dependency's state without probing the public port.
//!
//! `/readyz` is on the public port, so it must not be an amplifier: the dependency round trips
//! are shared — concurrent requests wait for one check, and its result is reused for
//! `health.cache_ttl`. The body names what failed, never the driver's error text (that goes to the
//! log).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Extension, Json, extract::State, http::StatusCode, response::IntoResponse};
use serde::Serialize;
use serde_json::json;

use crate::state::AppState;

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "Alive", body = serde_json::Value, example = json!({"status": "ok"}))))]
pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

#[derive(Debug, Clone, Serialize)]
struct Check {
    status: &'static str,
    latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
}

async fn check<E: std::fmt::Display>(
    name: &'static str,
    budget: Duration,
    fut: impl Future<Output = Result<(), E>>,
) -> Check {
    let started = Instant::now();
    let result = tokio::time::timeout(budget, fut).await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let error = match result {
        Ok(Ok(())) => None,
        Ok(Err(err)) => {
            tracing::warn!(check = name, %err, "readiness check failed");
            Some("error")
        }
        Err(_) => {
            tracing::warn!(check = name, ?budget, "readiness check timed out");
            Some("timeout")
        }
    };
    Check {
        status: if error.is_none() { "ok" } else { "fail" },
        latency_ms,
        error,
    }
}

/// The last round of dependency checks, shared by every `/readyz` of the app (an extension of
/// its router).
#[derive(Debug, Default)]
pub struct ReadinessCache {
    last: tokio::sync::Mutex<Option<(Instant, Check, Check)>>,
}

impl ReadinessCache {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// History and broker checks, at most one round per `health.cache_ttl`; callers arriving
    /// during a round wait for it instead of starting their own.
    async fn checks(&self, state: &AppState) -> (Check, Check) {
        let mut last = self.last.lock().await;
        if let Some((at, history, broker)) = &*last
            && at.elapsed() < state.settings.health.cache_ttl
        {
            return (history.clone(), broker.clone());
        }
        let budget = state.settings.health.check_timeout;
        let history = check("history", budget, state.store.ping());
        let broker = check("broker", budget, state.pubsub.ping());
        let (history, broker) = tokio::join!(history, broker);
        *last = Some((Instant::now(), history.clone(), broker.clone()));
        (history, broker)
    }
}

/// One evaluation of readiness: what `/readyz` answers, and what `/metrics` reports as
/// `relay_ready`, `relay_dependency_up{dependency}` and `relay_pubsub_listener_connected`.
pub struct Readiness {
    /// `postgres`/`redis`, or in embedded mode `memory_history`/`memory_broker`.
    history: (String, Check),
    broker: (String, Check),
    listener_ok: bool,
    draining: bool,
    embedded: bool,
    backends: (&'static str, &'static str),
}

impl Readiness {
    /// Run (or reuse, within `health.cache_ttl`) the dependency checks.
    pub async fn evaluate(state: &AppState, cache: &ReadinessCache) -> Self {
        let (history, broker) = cache.checks(state).await;
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
        Self {
            history: (name("history", history_backend), history),
            broker: (name("broker", broker_backend), broker),
            listener_ok: state.pubsub.is_listening(),
            draining: state.lifecycle.is_draining(),
            embedded: history_backend == "memory" || broker_backend == "memory",
            backends: (history_backend, broker_backend),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.history.1.error.is_none()
            && self.broker.1.error.is_none()
            && self.listener_ok
            && !self.draining
    }

    /// The readiness gauges, set at scrape time from this evaluation.
    pub fn record_metrics(&self) {
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        metrics::gauge!("relay_ready").set(flag(self.is_ready()));
        metrics::gauge!("relay_pubsub_listener_connected").set(flag(self.listener_ok));
        metrics::gauge!("relay_shutting_down").set(flag(self.draining));
        for (name, check) in [&self.history, &self.broker] {
            metrics::gauge!("relay_dependency_up", "dependency" => name.clone())
                .set(flag(check.error.is_none()));
            metrics::gauge!("relay_dependency_check_seconds", "dependency" => name.clone())
                .set(check.latency_ms / 1000.0);
        }
    }

    fn body(&self) -> serde_json::Value {
        let ready = self.is_ready();
        let mut checks = serde_json::Map::new();
        checks.insert(self.history.0.clone(), json!(self.history.1));
        checks.insert(self.broker.0.clone(), json!(self.broker.1));
        checks.insert(
            "pubsub_listener".to_owned(),
            json!({ "status": if self.listener_ok { "ok" } else { "fail" } }),
        );
        json!({
            "status": if ready { "ok" } else { "unavailable" },
            "shutting_down": self.draining,
            "embedded": self.embedded,
            "backends": { "history": self.backends.0, "broker": self.backends.1 },
            "checks": checks,
        })
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
pub async fn readyz(
    State(state): State<AppState>,
    Extension(readiness): Extension<Arc<ReadinessCache>>,
) -> impl IntoResponse {
    let readiness = Readiness::evaluate(&state, &readiness).await;
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness.body()))
}
