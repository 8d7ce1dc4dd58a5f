//! Access log, metrics and tracing: what operators see.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use relay::telemetry::metrics::{Kind, METRICS, Startup};

use crate::helpers::{OwnRedis, RelayProcess, create_database, spawn_app, spawn_app_with};

#[tokio::test]
async fn every_request_and_session_gets_exactly_one_entry_in_file_and_postgres() {
    let dir = std::env::temp_dir().join(format!("relay-access-{}", uuid::Uuid::new_v4().simple()));
    let file = dir.join("access.log");
    let path = file.clone();
    let mut app = spawn_app_with(|s| {
        s.access_log.sinks = vec![
            relay::config::AccessLogSinkKind::File,
            relay::config::AccessLogSinkKind::Postgres,
        ];
        s.access_log.file_path = path;
        s.access_log.flush_interval = Duration::from_secs(60); // only size or shutdown flushes
    })
    .await;
    let mut ids = BTreeSet::new();
    for i in 0..25 {
        let id = format!("req-{i}");
        let res = app
            .http
            .get(app.url(&format!("/healthz?token=s3cret&n={i}")))
            .header("x-request-id", &id)
            .send()
            .await
            .unwrap();
        assert_eq!(res.headers()["x-request-id"], id.as_str());
        ids.insert(id);
    }
    // One WebSocket session, closed by the shutdown.
    let mut ws = app.subscribed_ws(&["logged"]).await;
    ws.send_json(json!({"type": "ping"})).await;
    ws.expect_type("pong").await;
    // One SSE stream, ended by the client.
    let mut sse = app
        .http
        .get(app.url("/sse?channels=logged,other"))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    assert!(sse.chunk().await.unwrap().is_some(), "first event");
    drop(sse);
    app.shutdown().await;

    let text = std::fs::read_to_string(&file).expect("file sink wrote");
    let entries: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    // The harness polls /readyz before handing the app over; those entries are not ours.
    let http: Vec<&Value> = entries
        .iter()
        .filter(|e| e["kind"] == "http" && e["route"] != "/readyz")
        .collect();
    let logged: BTreeSet<String> = http
        .iter()
        .map(|e| e["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(http.len(), 25, "exactly one entry per request");
    assert_eq!(logged, ids);
    let sample = http[0];
    assert_eq!(sample["log"], "access");
    assert_eq!(sample["method"], "GET");
    assert_eq!(sample["route"], "/healthz");
    assert_eq!(sample["status"], 200);
    assert!(
        sample["path"].as_str().unwrap().contains("token=REDACTED"),
        "{sample}"
    );
    assert!(!text.contains("s3cret"), "secrets never reach the log");
    assert!(sample["bytes_out"].as_u64().unwrap() > 0);
    assert_eq!(sample["client_ip"], "127.0.0.1");
    let sessions: Vec<&Value> = entries
        .iter()
        .filter(|e| e["kind"] == "websocket")
        .collect();
    assert_eq!(sessions.len(), 1);
    let streams: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "sse").collect();
    assert_eq!(streams.len(), 1, "one entry per SSE stream");
    assert_eq!(
        streams[0]["session"]["channels"],
        json!(["logged", "other"])
    );
    assert!(streams[0]["session"]["frames_out"].as_u64().unwrap() >= 1);
    assert!(streams[0]["bytes_out"].as_u64().unwrap() > 0);
    assert_eq!(sessions[0]["session"]["close_code"], 1001);
    assert_eq!(sessions[0]["session"]["channels"], json!(["logged"]));
    assert_eq!(sessions[0]["session"]["frames_in"], 1);
    assert!(sessions[0]["session"]["frames_out"].as_u64().unwrap() >= 2);

    let pool = app.db_pool().await;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT request_id, kind FROM access_log WHERE route IS DISTINCT FROM '/readyz' ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    let db_ids: BTreeSet<String> = rows
        .iter()
        .filter(|(_, k)| k == "http")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(rows.iter().filter(|(_, k)| k == "http").count(), 25);
    assert_eq!(db_ids, ids);
    assert_eq!(rows.iter().filter(|(_, k)| k == "websocket").count(), 1);
    pool.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_stalled_sink_drops_entries_instead_of_slowing_requests() {
    let app = spawn_app_with(|s| {
        s.access_log.sinks = vec![relay::config::AccessLogSinkKind::Postgres];
        s.access_log.queue_capacity = 16;
        s.access_log.batch_size = 4;
        s.access_log.flush_interval = Duration::from_millis(10);
    })
    .await;
    let dropped_before = app
        .metrics()
        .await
        .sum("relay_access_log_dropped_total", &[("sink", "postgres")]);
    // Stall the sink: its INSERTs wait on this lock for as long as the transaction is open.
    let pool = app.db_pool().await;
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE access_log IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();

    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..300 {
        let t = Instant::now();
        assert_eq!(app.get("/healthz").await.status(), 200);
        slowest = slowest.max(t.elapsed());
    }
    // Blocking on the log would stall every request behind the lock; a generous bound suffices.
    assert!(
        slowest < Duration::from_secs(2),
        "a request waited {slowest:?} for the log"
    );
    let dropped = app
        .metrics()
        .await
        .sum("relay_access_log_dropped_total", &[("sink", "postgres")]);
    assert!(
        dropped > dropped_before,
        "drops are counted ({dropped_before} -> {dropped})"
    );
    lock.rollback().await.unwrap();
    eprintln!(
        "300 requests with a stalled sink took {:?}",
        started.elapsed()
    );
    pool.close().await;
}

/// Issue 17: each app has its own registry, so apps sharing a process (these tests) never see
/// each other's counts, including what a WebSocket session (run in axum's upgrade task) and the
/// startup sequence record.
#[tokio::test]
async fn each_app_counts_only_its_own_traffic() {
    let busy = spawn_app().await;
    let quiet = spawn_app().await;
    let mut ws = busy.subscribed_ws(&["own"]).await;
    for i in 0..4 {
        busy.publish("own", json!(i)).await;
        ws.expect_type("message").await;
    }
    let busy_m = busy
        .metrics_when(|m| m.sum("relay_messages_delivered_total", &[]) >= 4.0)
        .await;
    let quiet_m = quiet.metrics().await;
    assert_eq!(busy_m.sum("relay_messages_published_total", &[]), 4.0);
    assert_eq!(busy_m.sum("relay_messages_delivered_total", &[]), 4.0);
    assert_eq!(busy_m.sum("relay_ws_connections", &[]), 1.0);
    assert_eq!(quiet_m.sum("relay_messages_published_total", &[]), 0.0);
    assert_eq!(quiet_m.sum("relay_messages_delivered_total", &[]), 0.0);
    assert_eq!(quiet_m.sum("relay_ws_connections", &[]), 0.0);
    // Both registries hold every startup series (the startup sequence ran in its app's scope).
    assert!(quiet_m.has("relay_publish_queue_full_total"));
    assert!(busy_m.has("relay_task_failures_total"));
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_move_with_traffic() {
    let app = spawn_app().await;
    let before = app.metrics().await;
    let mut ws = app.subscribed_ws(&["m"]).await;
    for i in 0..5 {
        app.publish("m", json!(i)).await;
        ws.expect_type("message").await;
    }
    for _ in 0..3 {
        app.get("/healthz").await;
    }
    let delivered_before = before.sum("relay_messages_delivered_total", &[]);
    let after = app
        .metrics_when(|m| m.sum("relay_messages_delivered_total", &[]) - delivered_before >= 5.0)
        .await;
    let moved =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    // Each app has its own registry, so the counts are exact.
    assert_eq!(
        moved(
            "relay_http_requests_total",
            &[("route", "/healthz"), ("status", "200")]
        ),
        3.0
    );
    assert_eq!(
        moved(
            "relay_http_requests_total",
            &[
                ("route", "/api/v1/channels/{channel}/messages"),
                ("status", "201")
            ]
        ),
        5.0
    );
    assert_eq!(moved("relay_messages_published_total", &[]), 5.0);
    assert_eq!(moved("relay_messages_delivered_total", &[]), 5.0);
    assert_eq!(
        moved(
            "relay_http_request_duration_seconds_count",
            &[("route", "/healthz")]
        ),
        3.0
    );
    assert!(after.has("relay_ws_connections"));
    assert!(after.has("relay_subscriptions"));
    assert!(after.has("relay_db_pool_connections"));
    assert!(after.has("relay_listener_lag_seconds_count"));
    // The admin port is separate from the API: /metrics is not public.
    assert_eq!(app.get("/metrics").await.status(), 404);
}

/// Every metric name the code records: the string literal that opens a `counter!`, `gauge!` or
/// `histogram!` call anywhere in `src/`. Read from the source, so a new metric cannot be left
/// out of the checks below.
fn metric_names_in_source() -> BTreeSet<String> {
    fn walk(dir: &std::path::Path, files: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src/") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut names = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read a source file");
        for mac in ["counter!(", "gauge!(", "histogram!("] {
            for (at, _) in text.match_indices(mac) {
                if text[..at].ends_with("describe_") {
                    continue;
                }
                let rest = text[at + mac.len()..].trim_start();
                // A name passed in a variable (the registration loop) is not a literal.
                let Some(literal) = rest.strip_prefix('"') else {
                    continue;
                };
                let name = &literal[..literal.find('"').expect("a closed string literal")];
                assert!(
                    name.starts_with("relay_"),
                    "{}: metric `{name}` lacks the relay_ prefix",
                    file.display()
                );
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// Issue 17: every gauge and counter is in `/metrics` from startup (0 or its real value), with
/// the label values known in advance, so dashboards show 0 instead of "no data" and `rate()`
/// sees a counter's first increment. A separate process, so no other test's traffic can have
/// created a series first; scraped before any request reached the API port.
#[tokio::test]
async fn every_metric_in_the_source_is_exported_by_a_fresh_process() {
    let in_source = metric_names_in_source();
    assert!(in_source.len() > 40, "found only {in_source:?}");
    let listed: BTreeSet<String> = METRICS.iter().map(|m| m.name.to_owned()).collect();
    let unlisted: Vec<&String> = in_source.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "recorded but missing from telemetry::metrics::METRICS (help text, startup series): {unlisted:?}"
    );
    let unused: Vec<&String> = listed.difference(&in_source).collect();
    assert!(
        unused.is_empty(),
        "listed in METRICS but recorded nowhere: {unused:?}"
    );

    let db = create_database().await;
    let relay = RelayProcess::start(&[
        ("APP__DATABASE__URL", db.url.clone()),
        ("APP__ACCESS_LOG__SINKS", "stdout".into()),
    ]);
    let fresh = relay.metrics().await;
    // Labelled by requests (method, route, status): they cannot exist before one.
    let per_request = [
        "relay_http_requests_total",
        "relay_http_request_duration_seconds",
    ];
    let mut missing = Vec::new();
    for metric in METRICS {
        let sample = match metric.kind {
            Kind::Histogram => format!("{}_count", metric.name),
            Kind::Counter | Kind::Gauge => metric.name.to_owned(),
        };
        if per_request.contains(&metric.name) {
            assert!(!fresh.has(&sample), "{sample} before any request?");
            continue;
        }
        if !fresh.has(&sample) {
            missing.push(sample.clone());
        }
        if let Startup::Each(key, values) = metric.startup {
            for value in values {
                if fresh.get(&sample, &[(key, value)]).is_none() {
                    missing.push(format!("{sample}{{{key}=\"{value}\"}}"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in /metrics of a fresh process: {missing:?}"
    );
    // Series whose labels come from the configuration or the running tasks, with real values.
    assert_eq!(
        fresh.get(
            "relay_access_log_dropped_total",
            &[("reason", "sink_failed"), ("sink", "stdout")]
        ),
        Some(0.0)
    );
    assert_eq!(
        fresh.get("relay_task_failures_total", &[("task", "pubsub_core")]),
        Some(0.0)
    );
    assert!(
        fresh
            .get("relay_dependency_up", &[("dependency", "postgres")])
            .is_some()
    );
    assert!(
        fresh
            .get("relay_dependency_up", &[("dependency", "redis")])
            .is_some()
    );
    assert_eq!(fresh.get("relay_ws_connections", &[]), Some(0.0));
    assert_eq!(fresh.get("relay_history_messages", &[]), Some(0.0));

    relay.wait_ready().await;
    let after = relay.metrics().await;
    for name in per_request {
        let sample = if name.ends_with("_seconds") {
            format!("{name}_count")
        } else {
            name.to_owned()
        };
        assert!(after.has(&sample), "{sample} after the first request");
    }
}

/// The state gauges read at scrape time follow the service: readiness, each dependency, the
/// listener and the size of history, in a process of its own on a private Redis.
#[tokio::test]
async fn readiness_dependencies_and_history_size_are_gauges() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let redis = OwnRedis::start(port);
    redis.wait_up().await;
    let db = create_database().await;
    let mut relay = RelayProcess::start(&[
        ("APP__DATABASE__URL", db.url.clone()),
        ("APP__REDIS__URL", redis.url()),
        ("APP__REDIS__RECONNECT_MAX_DELAY", "300ms".into()),
        ("APP__REDIS__COMMAND_TIMEOUT", "500ms".into()),
        ("APP__HEALTH__CACHE_TTL", "0s".into()),
        ("APP__SHUTDOWN__READINESS_GRACE", "2s".into()),
    ]);
    relay.wait_ready().await;
    for i in 0..3 {
        let res = crate::helpers::http_client()
            .post(format!(
                "http://{}/api/v1/channels/sized-{i}/messages",
                relay.addr
            ))
            .json(&json!({"data": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
    }
    let up = relay.metrics().await;
    let value = |m: &crate::helpers::Metrics, name: &str, labels: &[(&str, &str)]| {
        m.get(name, labels)
            .unwrap_or_else(|| panic!("{name}{labels:?} in /metrics"))
    };
    assert_eq!(value(&up, "relay_ready", &[]), 1.0);
    assert_eq!(value(&up, "relay_pubsub_listener_connected", &[]), 1.0);
    assert_eq!(value(&up, "relay_shutting_down", &[]), 0.0);
    assert_eq!(
        value(&up, "relay_dependency_up", &[("dependency", "redis")]),
        1.0
    );
    assert_eq!(
        value(&up, "relay_dependency_up", &[("dependency", "postgres")]),
        1.0
    );
    // A new table is counted exactly (never analysed yet).
    assert_eq!(value(&up, "relay_history_messages", &[]), 3.0);
    assert_eq!(value(&up, "relay_history_channels", &[]), 3.0);
    assert!(value(&up, "relay_history_bytes", &[]) > 0.0);
    assert_eq!(value(&up, "relay_messages_committed_total", &[]), 3.0);

    drop(redis);
    let started = Instant::now();
    let down = loop {
        let m = relay.metrics().await;
        if m.get("relay_pubsub_listener_connected", &[]) == Some(0.0)
            && m.get("relay_dependency_up", &[("dependency", "redis")]) == Some(0.0)
        {
            break m;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the gauges did not see Redis go"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(value(&down, "relay_ready", &[]), 0.0);
    assert_eq!(
        value(&down, "relay_dependency_up", &[("dependency", "postgres")]),
        1.0
    );

    // The admin port keeps serving through the readiness grace, and says so.
    relay.terminate();
    let signalled = Instant::now();
    loop {
        let m = relay.metrics().await;
        if m.get("relay_shutting_down", &[]) == Some(1.0) {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "relay_shutting_down still 0 after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(relay.wait_exit(Duration::from_secs(15)).await.success());
}

/// Issue 17: with the default configuration each request is written to stdout once, as its
/// access-log entry; `log.request_lines = true` adds the trace layer's "request finished" line.
/// In `pretty` (the local default) and `json` (production) format.
#[tokio::test]
async fn one_line_per_request_by_default_and_the_request_line_on_request() {
    let start = |format: &str, request_lines: Option<&str>| {
        let mut env = vec![
            ("APP__REDIS__URL", String::new()),
            ("APP__ACCESS_LOG__SINKS", "stdout".to_owned()),
            ("APP__ACCESS_LOG__FLUSH_INTERVAL", "50ms".to_owned()),
            ("APP__LOG__FORMAT", format.to_owned()),
        ];
        if let Some(on) = request_lines {
            env.push(("APP__LOG__REQUEST_LINES", on.to_owned()));
        }
        RelayProcess::start(&env)
    };
    let mut runs = [
        ("pretty", None, start("pretty", None)),
        ("json", None, start("json", None)),
        ("json", Some("true"), start("json", Some("true"))),
        ("pretty", Some("true"), start("pretty", Some("true"))),
    ];
    for (format, lines, relay) in &mut runs {
        relay.wait_ready().await;
        let http = crate::helpers::http_client();
        for i in 0..3 {
            let id = format!("one-line-{format}-{}-{i}", lines.is_some());
            let res = http
                .get(format!("http://{}/healthz", relay.addr))
                .header("x-request-id", &id)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
        }
        relay.terminate();
        assert!(relay.wait_exit(Duration::from_secs(15)).await.success());
    }
    for (format, lines, relay) in &runs {
        for i in 0..3 {
            let id = format!("one-line-{format}-{}-{i}", lines.is_some());
            let found = relay.lines_with(&id);
            let access: Vec<&String> = found
                .iter()
                .filter(|l| l.starts_with(r#"{"log":"access","#))
                .collect();
            assert_eq!(access.len(), 1, "one access entry for {id}: {found:#?}");
            let finished = found
                .iter()
                .filter(|l| l.contains("request finished"))
                .count();
            match lines {
                None => assert_eq!(found.len(), 1, "{format}: one line for {id}: {found:#?}"),
                Some(_) => {
                    assert_eq!(
                        finished, 1,
                        "{format}: the request line for {id}: {found:#?}"
                    );
                    assert_eq!(found.len(), 2, "{format}: {found:#?}");
                }
            }
        }
    }
}

/// One span as the test collector saw it.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    name: String,
    trace_id: String,
    instance: String,
}

/// A minimal OTLP/HTTP collector: decodes `POST /v1/traces` protobuf bodies.
async fn start_collector() -> (String, Arc<Mutex<Vec<ReceivedSpan>>>) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let spans = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&spans);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = Arc::clone(&sink);
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut spans = sink.lock().unwrap();
                for resource in request.resource_spans {
                    let instance = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.instance.id")
                        .map(|kv| format!("{:?}", kv.value))
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            spans.push(ReceivedSpan {
                                name: span.name,
                                trace_id: span
                                    .trace_id
                                    .iter()
                                    .map(|b| format!("{b:02x}"))
                                    .collect(),
                                instance: instance.clone(),
                            });
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), spans)
}

#[tokio::test]
async fn one_trace_spans_http_publish_on_one_replica_and_delivery_on_another() {
    let (collector, spans) = start_collector().await;
    let db = create_database().await;
    let prefix = format!("test:{}:", uuid::Uuid::new_v4().simple());
    let env = [
        ("APP__DATABASE__URL", db.url.clone()),
        ("APP__REDIS__CHANNEL_PREFIX", prefix),
        ("APP__TELEMETRY__OTLP_ENDPOINT", collector),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ];
    let mut a = RelayProcess::start(&env);
    let mut b = RelayProcess::start(&env);
    a.wait_ready().await;
    b.wait_ready().await;

    let (stream, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?channels=traced", b.addr))
            .await
            .unwrap();
    let mut ws = crate::helpers::WsClient { stream };
    ws.expect_type("subscribed").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let res = crate::helpers::http_client()
        .post(format!("http://{}/api/v1/channels/traced/messages", a.addr))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"data": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(ws.expect_type("message").await["data"], "hello");
    drop(ws);
    a.terminate();
    b.terminate();
    assert!(a.wait_exit(Duration::from_secs(15)).await.success());
    assert!(b.wait_exit(Duration::from_secs(15)).await.success());

    let spans = spans.lock().unwrap().clone();
    let in_trace: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let publish = in_trace
        .iter()
        .find(|s| s.name == "publish")
        .unwrap_or_else(|| panic!("publish span in {spans:?}"));
    let fan_out = in_trace
        .iter()
        .find(|s| s.name == "fan_out")
        .unwrap_or_else(|| panic!("fan_out span in {spans:?}"));
    assert!(
        in_trace.iter().any(|s| s.name == "http_request"),
        "{spans:?}"
    );
    assert_ne!(
        publish.instance, fan_out.instance,
        "delivery happened on the other replica"
    );
}

/// `sampling_ratio = 0`: a client's `traceparent` with the sampled flag is obeyed from a trusted
/// peer only; an untrusted client cannot switch tracing on.
#[tokio::test]
async fn only_trusted_peers_can_force_sampling_with_traceparent() {
    let (collector, spans) = start_collector().await;
    let env = |trusted: &str| {
        [
            ("APP__TELEMETRY__OTLP_ENDPOINT", collector.clone()),
            ("APP__TELEMETRY__SAMPLING_RATIO", "0".to_owned()),
            ("APP__TELEMETRY__TRUSTED_TRACE_PEERS", trusted.to_owned()),
            ("APP__REDIS__URL", String::new()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ]
    };
    let mut untrusting = RelayProcess::start(&env(""));
    let mut trusting = RelayProcess::start(&env("127.0.0.1/32"));
    untrusting.wait_ready().await;
    trusting.wait_ready().await;
    let forced = "0af7651916cd43dd8448eb211c80319c";
    let refused = "1bf7651916cd43dd8448eb211c80319d";
    for (relay, trace_id) in [(&trusting, forced), (&untrusting, refused)] {
        let res = crate::helpers::http_client()
            .post(format!("http://{}/api/v1/channels/t/messages", relay.addr))
            .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .json(&json!({"data": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
    }
    untrusting.terminate();
    trusting.terminate();
    assert!(
        untrusting
            .wait_exit(Duration::from_secs(15))
            .await
            .success()
    );
    assert!(trusting.wait_exit(Duration::from_secs(15)).await.success());

    let spans = spans.lock().unwrap().clone();
    assert!(
        spans
            .iter()
            .any(|s| s.trace_id == forced && s.name == "http_request"),
        "the trusted peer's sampled traceparent is followed: {spans:?}"
    );
    assert!(
        !spans.iter().any(|s| s.trace_id == refused),
        "an untrusted client's sampled flag is ignored: {spans:?}"
    );
}
