//! Prometheus metrics: the process-wide recorder and the list of what relay measures.
//!
//! Code records through the `metrics` macros wherever something happens; this module installs
//! the recorder once per process (tests start many apps in one process, so installation is
//! idempotent) and renders the text format for `GET /metrics` on the admin port.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets in seconds: fine below 10 ms where relay normally is.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Install the recorder (first call) and return the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let recorder = match builder
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            {
                Ok(builder) => builder.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        "relay_http_requests_total",
        "HTTP requests by method, route and status"
    );
    describe_histogram!(
        "relay_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency by method and route"
    );
    describe_gauge!("relay_ws_connections", "Open WebSocket connections");
    describe_gauge!("relay_sse_connections", "Open SSE streams");
    describe_gauge!(
        "relay_subscriptions",
        "Local channel subscriptions (connection x channel)"
    );
    describe_gauge!(
        "relay_redis_channels",
        "Channels this replica is SUBSCRIBEd to in Redis"
    );
    describe_counter!(
        "relay_messages_published_total",
        "Messages PUBLISHed to Redis by this replica"
    );
    describe_counter!(
        "relay_messages_delivered_total",
        "Messages queued to local subscribers (one per subscriber)"
    );
    describe_counter!(
        "relay_messages_dropped_total",
        "Messages not delivered: slow_consumer, subscriber_gone, duplicate, invalid_payload"
    );
    describe_counter!(
        "relay_slow_consumer_disconnects_total",
        "Subscribers whose outbox overflowed"
    );
    describe_counter!(
        "relay_ws_slow_consumer_closes_total",
        "WebSockets closed with 4008"
    );
    describe_counter!(
        "relay_sse_slow_consumer_closes_total",
        "SSE streams ended as slow consumers"
    );
    describe_counter!(
        "relay_redis_reconnects_total",
        "Reconnects of the Redis pub/sub listener"
    );
    describe_counter!(
        "relay_redis_invalid_payloads_total",
        "Redis payloads that were not envelopes"
    );
    describe_histogram!(
        "relay_listener_lag_seconds",
        Unit::Seconds,
        "Time from PUBLISH to the listener receiving the message"
    );
    describe_counter!(
        "relay_listener_queue_full_total",
        "Times a session waited for the listener's full command queue"
    );
    describe_counter!(
        "relay_duplicates_dropped_total",
        "Messages dropped by the sequencer as already delivered"
    );
    describe_counter!(
        "relay_gaps_declared_total",
        "Holes in a channel's offsets handed to its subscribers to read from history"
    );
    describe_counter!(
        "relay_gaps_signalled_total",
        "Gap frames sent because history could not provide a range, by reason"
    );
    describe_counter!(
        "relay_history_pages_read_total",
        "History pages read for replays and gap fills (shared between connections)"
    );
    describe_counter!(
        "relay_listener_ingest_stalls_total",
        "Broker connections dropped because the pub/sub core fell behind"
    );
    describe_counter!(
        "relay_listener_io_backlog_total",
        "Times the pub/sub core's I/O requests waited for a full queue"
    );
    describe_counter!(
        "relay_publish_failures_total",
        "PUBLISH attempts that failed after the commit (retried)"
    );
    describe_counter!(
        "relay_publish_abandoned_total",
        "Committed messages not PUBLISHed (queue_full, attempts, broker_down, shutting_down); head checks deliver them"
    );
    describe_counter!(
        "relay_history_pruned_total",
        "Messages deleted by retention"
    );
    describe_counter!(
        "relay_access_log_entries_total",
        "Access-log entries written, by sink"
    );
    describe_counter!(
        "relay_access_log_dropped_total",
        "Access-log entries dropped (queue or sink full, sink failed)"
    );
    describe_counter!(
        "relay_access_log_sink_errors_total",
        "Failed access-log sink writes, by sink"
    );
    describe_counter!(
        "relay_connections_refused_total",
        "Realtime connections refused at the door, by reason (replica_full, per_ip)"
    );
    describe_counter!(
        "relay_rate_limited_total",
        "Requests, publishes and channel creations refused by a [limits] rate or quota, by limit"
    );
    describe_gauge!(
        "relay_rate_limit_keys",
        "Subjects and addresses the keyed rate limiters currently remember"
    );
    describe_counter!(
        "relay_publish_replays_total",
        "Publishes answered with the original message because their Idempotency-Key was seen within the window"
    );
    describe_counter!(
        "relay_publish_conflicts_total",
        "Compare-and-publish requests refused because the channel was not at expected_last_id"
    );
    describe_counter!(
        "relay_channels_removed_total",
        "Channels removed by retention after all their messages were pruned"
    );
    describe_counter!(
        "relay_task_failures_total",
        "Critical tasks that stopped before shutdown, by task (each one exits the process)"
    );
    describe_gauge!(
        "relay_db_pool_connections",
        "Postgres pool connections by state"
    );
    describe_webhooks();
}

/// The webhook dispatcher's metrics (docs/webhooks.md); registered at zero by
/// `crate::dispatcher::register_metrics`.
fn describe_webhooks() {
    describe_counter!(
        "relay_webhook_deliveries_attempted_total",
        "Webhook requests sent"
    );
    describe_counter!(
        "relay_webhook_deliveries_succeeded_total",
        "Webhook requests answered 2xx"
    );
    describe_counter!(
        "relay_webhook_deliveries_failed_total",
        "Failed webhook attempts by reason (status, network, timeout, refused)"
    );
    describe_counter!(
        "relay_webhook_deliveries_dead_total",
        "Webhook deliveries that became dead (final status or attempts exhausted)"
    );
    describe_counter!(
        "relay_webhook_deliveries_released_total",
        "Webhook claims given back unfinished at shutdown"
    );
    describe_counter!(
        "relay_webhook_deliveries_dropped_total",
        "Webhook deliveries not recorded because the memory outbox was full (embedded mode)"
    );
    describe_counter!(
        "relay_webhook_store_errors_total",
        "Failed outbox claims or outcome writes (retried; leases expire)"
    );
    describe_histogram!(
        "relay_webhook_delivery_duration_seconds",
        Unit::Seconds,
        "Time of one webhook attempt, connection to response"
    );
    describe_gauge!(
        "relay_webhook_deliveries_in_flight",
        "Webhook requests in flight on this replica"
    );
    describe_gauge!(
        "relay_webhook_queue_depth",
        "Pending webhook deliveries in the outbox (shared by all replicas with Postgres)"
    );
    describe_gauge!(
        "relay_webhook_dead_deliveries",
        "Dead webhook deliveries kept for listing and retry"
    );
}

/// Periodic housekeeping the Prometheus recorder needs (draining histogram buckets).
pub async fn upkeep(handle: PrometheusHandle, lifecycle: crate::lifecycle::Lifecycle) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = lifecycle.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}
