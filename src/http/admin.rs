//! The admin router, served on `server.admin_port`: operator endpoints kept off the public API.
//!
//! * `GET /metrics` — Prometheus text format.
//! * `GET /healthz` — liveness, so the admin port can be probed on its own.

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::state::AppState;

pub fn router(state: AppState, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(super::health::healthz))
        .with_state((state, metrics))
}

async fn render(State((state, metrics)): State<(AppState, PrometheusHandle)>) -> impl IntoResponse {
    // Gauges that are cheaper to read at scrape time than to maintain.
    if let Some(pool) = state.store.pool() {
        let idle = pool.num_idle() as f64;
        metrics::gauge!("relay_db_pool_connections", "state" => "idle").set(idle);
        metrics::gauge!("relay_db_pool_connections", "state" => "in_use")
            .set(f64::from(pool.size()) - idle);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
}
