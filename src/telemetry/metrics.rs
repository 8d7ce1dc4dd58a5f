//! Prometheus metrics: each app's recorder and the list of what relay measures.
//!
//! Code records through the `metrics` macros wherever something happens. Each app builds its own
//! [`Registry`] and hands its recorder to the lifecycle, which scopes every task of the app to it
//! (`Lifecycle::with_metrics`); `GET /metrics` on the admin port renders that registry. Apps
//! sharing a process (the integration tests) therefore never see each other's counts, and tests
//! assert exact values.
//!
//! [`METRICS`] is the one list of every metric relay exports, with its help text and the label
//! values known before anything happens. [`Registry::new`] registers each of those series at
//! startup, so `/metrics` shows every gauge and counter from the first scrape, 0 or its real
//! value: dashboards show 0 instead of "no data", and `rate()`/`increase()` see a counter's
//! first increment (a series that appears already at 1 has no earlier sample to rise from).
//! Labels that only requests produce (HTTP method, route and status) cannot be listed; those
//! series appear with the first request, which the orchestrator's probes make within seconds.
//! `tests/api/observability.rs` reads `src/` for metric names, so a metric missing from the list
//! (or from a fresh `/metrics`) fails the suite.

use std::sync::Arc;

use metrics::{Recorder, Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Latency buckets in seconds: fine below 10 ms where relay normally is.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Messages per group commit: powers of two up to `publish.commit_max_messages`' default.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The series of a metric that exist from startup.
#[derive(Debug, Clone, Copy)]
pub enum Startup {
    /// One series without labels.
    Plain,
    /// One series per value of this label.
    Each(&'static str, &'static [&'static str]),
    /// Labelled by what happens (a request's route and status, a configured sink, a task's
    /// name): registered where those values become known, by the code that names them.
    Dynamic,
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub startup: Startup,
}

const fn counter(name: &'static str, help: &'static str, startup: Startup) -> Metric {
    Metric {
        name,
        kind: Kind::Counter,
        help,
        startup,
    }
}

const fn gauge(name: &'static str, help: &'static str, startup: Startup) -> Metric {
    Metric {
        name,
        kind: Kind::Gauge,
        help,
        startup,
    }
}

const fn histogram(name: &'static str, help: &'static str, startup: Startup) -> Metric {
    Metric {
        name,
        kind: Kind::Histogram,
        help,
        startup,
    }
}

use Startup::{Dynamic, Each, Plain};

/// Every metric relay exports. Keep in step with the code that records them (a test checks).
pub const METRICS: &[Metric] = &[
    // HTTP
    counter(
        "relay_http_requests_total",
        "HTTP requests by method, route and status",
        Dynamic,
    ),
    histogram(
        "relay_http_request_duration_seconds",
        "HTTP request latency by method and route",
        Dynamic,
    ),
    // Connections
    gauge("relay_ws_connections", "Open WebSocket connections", Plain),
    gauge("relay_sse_connections", "Open SSE streams", Plain),
    gauge(
        "relay_subscriptions",
        "Local channel subscriptions (connection x channel)",
        Plain,
    ),
    gauge(
        "relay_redis_channels",
        "Channels this replica is SUBSCRIBEd to in Redis",
        Plain,
    ),
    counter(
        "relay_connections_refused_total",
        "Realtime connections refused at the door, by reason (replica_full, per_ip)",
        Each("reason", &["replica_full", "per_ip"]),
    ),
    // Delivery
    counter(
        "relay_messages_delivered_total",
        "Messages queued to local subscribers (one per subscriber)",
        Plain,
    ),
    counter(
        "relay_messages_dropped_total",
        "Messages not delivered: slow_consumer, subscriber_gone, duplicate, invalid_payload",
        Each(
            "reason",
            &[
                "slow_consumer",
                "subscriber_gone",
                "duplicate",
                "invalid_payload",
            ],
        ),
    ),
    counter(
        "relay_slow_consumer_disconnects_total",
        "Subscribers whose outbox overflowed",
        Plain,
    ),
    counter(
        "relay_ws_slow_consumer_closes_total",
        "WebSockets closed with 4008",
        Plain,
    ),
    counter(
        "relay_sse_slow_consumer_closes_total",
        "SSE streams ended as slow consumers",
        Plain,
    ),
    counter(
        "relay_duplicates_dropped_total",
        "Messages dropped by the sequencer as already delivered",
        Plain,
    ),
    counter(
        "relay_own_echoes_total",
        "This replica's own messages echoed back by the broker after local delivery (expected, dropped by offset)",
        Plain,
    ),
    counter(
        "relay_gaps_declared_total",
        "Holes in a channel's offsets handed to its subscribers to read from history",
        Plain,
    ),
    counter(
        "relay_gaps_signalled_total",
        "Gap frames sent because history could not provide a range, by reason",
        Each("reason", &["history_unavailable"]),
    ),
    counter(
        "relay_history_pages_read_total",
        "History pages read for replays and gap fills (shared between connections)",
        Plain,
    ),
    counter(
        "relay_local_delivery_skipped_total",
        "Committed messages not handed to local subscribers at once (queue_full, shutting_down); the broker's echo or the head checks deliver them",
        Each("reason", &["queue_full", "shutting_down"]),
    ),
    // The pub/sub listener and Redis
    gauge(
        "relay_pubsub_listener_connected",
        "1 while the pub/sub listener holds a live broker connection (read at scrape time)",
        Plain,
    ),
    counter(
        "relay_redis_reconnects_total",
        "Reconnects of the Redis pub/sub listener",
        Plain,
    ),
    counter(
        "relay_redis_invalid_payloads_total",
        "Redis payloads that were not envelopes",
        Plain,
    ),
    histogram(
        "relay_listener_lag_seconds",
        "Time from PUBLISH to the listener receiving the message",
        Plain,
    ),
    counter(
        "relay_listener_queue_full_total",
        "Times a session waited for the listener's full command queue",
        Plain,
    ),
    counter(
        "relay_listener_ingest_stalls_total",
        "Broker connections dropped because the pub/sub core fell behind",
        Plain,
    ),
    counter(
        "relay_listener_io_backlog_total",
        "Times the pub/sub core's I/O requests waited for a full queue",
        Plain,
    ),
    counter(
        "relay_memory_broker_full_total",
        "Times the embedded broker's queue was full and a PUBLISH waited",
        Plain,
    ),
    // Publishing
    counter(
        "relay_messages_committed_total",
        "Messages committed to history by this replica (publishes that got an offset)",
        Plain,
    ),
    counter(
        "relay_messages_published_total",
        "Messages PUBLISHed to Redis by this replica",
        Plain,
    ),
    histogram(
        "relay_publish_commit_seconds",
        "Duration of one group commit (one transaction for many publishes)",
        Plain,
    ),
    histogram(
        "relay_publish_batch_messages",
        "Messages per group commit",
        Plain,
    ),
    gauge(
        "relay_publish_queue_messages",
        "Messages waiting for a group commit",
        Plain,
    ),
    counter(
        "relay_publish_queue_waits_total",
        "Publishes that found the commit queue full and waited for room",
        Plain,
    ),
    counter(
        "relay_publish_queue_full_total",
        "Publishes refused (503 / unavailable) because the commit queue stayed full for publish.queue_wait",
        Plain,
    ),
    counter(
        "relay_publish_commit_failures_total",
        "Messages whose commit failed (Postgres error); their publishers got an error",
        Plain,
    ),
    counter(
        "relay_publish_failures_total",
        "PUBLISH attempts that failed after the commit (retried)",
        Plain,
    ),
    counter(
        "relay_publish_abandoned_total",
        "Committed messages not PUBLISHed (queue_full, attempts, broker_down, shutting_down); head checks deliver them",
        Each(
            "reason",
            &["queue_full", "attempts", "broker_down", "shutting_down"],
        ),
    ),
    counter(
        "relay_publish_replays_total",
        "Publishes answered with the original message because their Idempotency-Key was seen within the window",
        Plain,
    ),
    counter(
        "relay_publish_conflicts_total",
        "Compare-and-publish requests refused because the channel was not at expected_last_id",
        Plain,
    ),
    // Limits
    counter(
        "relay_rate_limited_total",
        "Requests, publishes and channel creations refused by a [limits] rate or quota, by limit",
        Each(
            "limit",
            &[
                "publish_per_connection",
                "publish_per_subject",
                "http_per_ip",
                "channels_per_subject",
            ],
        ),
    ),
    gauge(
        "relay_rate_limit_keys",
        "Subjects and addresses the keyed rate limiters currently remember",
        Plain,
    ),
    // History
    counter(
        "relay_history_pruned_total",
        "Messages deleted by retention",
        Plain,
    ),
    counter(
        "relay_channels_removed_total",
        "Channels removed by retention after all their messages were pruned",
        Plain,
    ),
    gauge(
        "relay_history_messages",
        "Messages in history, all replicas together (Postgres: the planner's estimate once the table was analysed; read at scrape time)",
        Plain,
    ),
    gauge(
        "relay_history_channels",
        "Channels in history, all replicas together (estimated like relay_history_messages)",
        Plain,
    ),
    gauge(
        "relay_history_bytes",
        "Size of the message history on disk with its indexes (Postgres; embedded: the data held in memory)",
        Plain,
    ),
    gauge(
        "relay_db_pool_connections",
        "Postgres pool connections by state (read at scrape time; absent in embedded mode)",
        Dynamic,
    ),
    // Webhooks (docs/webhooks.md)
    counter(
        "relay_webhook_deliveries_attempted_total",
        "Webhook requests sent",
        Plain,
    ),
    counter(
        "relay_webhook_deliveries_succeeded_total",
        "Webhook requests answered 2xx",
        Plain,
    ),
    counter(
        "relay_webhook_deliveries_failed_total",
        "Failed webhook attempts by reason (status, network, timeout, refused)",
        Each("reason", &["status", "network", "timeout", "refused"]),
    ),
    counter(
        "relay_webhook_deliveries_dead_total",
        "Webhook deliveries that became dead (final status or attempts exhausted)",
        Plain,
    ),
    counter(
        "relay_webhook_deliveries_released_total",
        "Webhook claims given back unfinished at shutdown",
        Plain,
    ),
    counter(
        "relay_webhook_deliveries_dropped_total",
        "Webhook deliveries not recorded because the memory outbox was full (embedded mode)",
        Each("reason", &["outbox_full"]),
    ),
    counter(
        "relay_webhook_store_errors_total",
        "Failed outbox claims or outcome writes (retried; leases expire)",
        Plain,
    ),
    histogram(
        "relay_webhook_delivery_duration_seconds",
        "Time of one webhook attempt, connection to response",
        Plain,
    ),
    gauge(
        "relay_webhook_deliveries_in_flight",
        "Webhook requests in flight on this replica",
        Plain,
    ),
    gauge(
        "relay_webhook_queue_depth",
        "Pending webhook deliveries in the outbox (shared by all replicas with Postgres)",
        Plain,
    ),
    gauge(
        "relay_webhook_dead_deliveries",
        "Dead webhook deliveries kept for listing and retry",
        Plain,
    ),
    // Health
    gauge(
        "relay_ready",
        "1 while /readyz would answer 200 (dependencies up, listener connected, not shutting down)",
        Plain,
    ),
    gauge(
        "relay_dependency_up",
        "1 while the dependency answers its readiness check, by dependency (postgres, redis; memory_history, memory_broker when embedded)",
        Dynamic,
    ),
    gauge(
        "relay_dependency_check_seconds",
        "Duration of the last readiness check of the dependency",
        Dynamic,
    ),
    gauge(
        "relay_shutting_down",
        "1 from the start of a shutdown (readiness grace and drain) until exit",
        Plain,
    ),
    counter(
        "relay_task_failures_total",
        "Critical tasks that stopped before shutdown, by task (each one exits the process)",
        Dynamic,
    ),
    // Access log
    counter(
        "relay_access_log_entries_total",
        "Access-log entries written, by sink",
        Dynamic,
    ),
    counter(
        "relay_access_log_dropped_total",
        "Access-log entries dropped (queue or sink full, sink failed)",
        Dynamic,
    ),
    counter(
        "relay_access_log_sink_errors_total",
        "Failed access-log sink writes, by sink",
        Dynamic,
    ),
];

/// The entry of `name` in [`METRICS`].
pub fn find(name: &str) -> Option<&'static Metric> {
    METRICS.iter().find(|m| m.name == name)
}

/// One app's metrics: its own Prometheus recorder and the handle that renders it.
#[derive(Clone)]
pub struct Registry {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
}

impl Registry {
    /// A fresh registry with relay's buckets, every metric of [`METRICS`] described and its
    /// startup series registered.
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("relay_publish_batch_messages".into()),
                    BATCH_BUCKETS,
                )
            });
        // The buckets are constants; a rejection would be a bug caught by every test.
        let recorder = match builder {
            Ok(builder) => builder.build_recorder(),
            Err(err) => {
                tracing::error!(%err, "histogram buckets rejected; using the defaults");
                PrometheusBuilder::new().build_recorder()
            }
        };
        let recorder = Arc::new(recorder);
        metrics::with_local_recorder(&*recorder, || {
            describe();
            register_startup();
        });
        let handle = recorder.handle();
        Self { recorder, handle }
    }

    /// The recorder, for `Lifecycle::with_recorder`.
    pub fn recorder(&self) -> Arc<dyn Recorder + Send + Sync> {
        self.recorder.clone()
    }

    /// Renders the text format and runs the recorder's upkeep.
    pub fn handle(&self) -> &PrometheusHandle {
        &self.handle
    }

    /// Also make this the process-wide recorder, for a process that runs one app (`relay
    /// serve`): what is recorded outside the app's tasks (a value dropped by the runtime rather
    /// than by its task) still lands here. False if a recorder was installed already.
    pub fn install_global(&self) -> bool {
        metrics::set_global_recorder(Arc::clone(&self.recorder)).is_ok()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

fn describe() {
    for metric in METRICS {
        let (name, help) = (metric.name, metric.help);
        match metric.kind {
            Kind::Counter => describe_counter!(name, help),
            Kind::Gauge => describe_gauge!(name, help),
            Kind::Histogram if name.ends_with("_seconds") => {
                describe_histogram!(name, Unit::Seconds, help);
            }
            Kind::Histogram => describe_histogram!(name, help),
        }
    }
}

/// Register every series [`METRICS`] knows before anything happens, with 0.
fn register_startup() {
    for metric in METRICS {
        let label_sets: Vec<Vec<metrics::Label>> = match metric.startup {
            Plain => vec![Vec::new()],
            Each(key, values) => values
                .iter()
                .map(|value| vec![metrics::Label::new(key, *value)])
                .collect(),
            Dynamic => Vec::new(),
        };
        for labels in label_sets {
            let name = metric.name;
            match metric.kind {
                Kind::Counter => metrics::counter!(name, labels).increment(0),
                Kind::Gauge => metrics::gauge!(name, labels).increment(0.0),
                // Registered is enough: the exporter renders it with zero counts.
                Kind::Histogram => {
                    let _ = metrics::histogram!(name, labels);
                }
            }
        }
    }
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
