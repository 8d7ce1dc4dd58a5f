//! The admin router, served on `server.admin_port`: operator endpoints kept off the public API.
//!
//! * `GET /metrics` — Prometheus text format.
//! * `GET /healthz` — liveness, so the admin port can be probed on its own.
//!
//! Some gauges describe state rather than events, and are read when Prometheus scrapes instead
//! of being maintained on every change: the Postgres pool, readiness and each dependency (the
//! same checks as `/readyz`, with its cache), and the size of the history.

use std::sync::Arc;

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use metrics_exporter_prometheus::PrometheusHandle;

use super::health::{Readiness, ReadinessCache};
use crate::state::AppState;

#[derive(Clone)]
struct Admin {
    state: AppState,
    metrics: PrometheusHandle,
    readiness: Arc<ReadinessCache>,
}

pub fn router(state: AppState, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(super::health::healthz))
        .with_state(Admin {
            state,
            metrics,
            readiness: ReadinessCache::new(),
        })
}

async fn render(State(admin): State<Admin>) -> impl IntoResponse {
    // `axum::serve` runs this handler in its own task: scope it to the app's recorder.
    let lifecycle = admin.state.lifecycle.clone();
    lifecycle.with_metrics(scrape(admin)).await
}

async fn scrape(admin: Admin) -> impl IntoResponse {
    let state = &admin.state;
    if let Some(pool) = state.store.pool() {
        let idle = pool.num_idle() as f64;
        metrics::gauge!("relay_db_pool_connections", "state" => "idle").set(idle);
        metrics::gauge!("relay_db_pool_connections", "state" => "in_use")
            .set(f64::from(pool.size()) - idle);
    }
    let budget = state.settings.health.check_timeout;
    let (readiness, size) = tokio::join!(
        Readiness::evaluate(state, &admin.readiness),
        tokio::time::timeout(budget, state.store.history_size()),
    );
    readiness.record_metrics();
    match size {
        Ok(Ok(size)) => {
            metrics::gauge!("relay_history_messages").set(size.messages as f64);
            metrics::gauge!("relay_history_channels").set(size.channels as f64);
            metrics::gauge!("relay_history_bytes").set(size.bytes as f64);
        }
        // The last value stays; relay_dependency_up says whether Postgres answers.
        Ok(Err(err)) => tracing::debug!(%err, "cannot read the history size"),
        Err(_) => tracing::debug!(?budget, "reading the history size timed out"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        admin.metrics.render(),
    )
}
