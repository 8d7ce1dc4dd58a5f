//! Shutdown: the built binary with a real SIGTERM, and the fatal shutdown that follows a
//! critical task's death.

use std::time::{Duration, Instant};

use relay::app::StartupError;

use crate::helpers::{Metrics, RelayProcess, create_database, spawn_app_with};

#[tokio::test]
async fn sigterm_turns_readiness_off_then_exits_zero_within_the_deadline() {
    let db = create_database().await;
    let mut relay = RelayProcess::start(&[
        ("APP__DATABASE__URL", db.url.clone()),
        ("APP__SHUTDOWN__READINESS_GRACE", "1s".into()),
        ("APP__SHUTDOWN__DRAIN_TIMEOUT", "5s".into()),
    ]);
    relay.wait_ready().await;
    let readyz = format!("http://{}/readyz", relay.addr);

    relay.terminate();
    let signalled = Instant::now();
    // The signal is handled asynchronously, so a request racing it may still see 200; readiness
    // must turn off well inside the 1 s grace while the server keeps answering.
    let body = loop {
        let res = crate::helpers::http_client()
            .get(&readyz)
            .send()
            .await
            .expect("still serving during the readiness grace");
        if res.status() == 503 {
            break res.json::<serde_json::Value>().await.unwrap();
        }
        assert!(
            signalled.elapsed() < Duration::from_millis(500),
            "readiness still on {:?} after SIGTERM",
            signalled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(body["shutting_down"], true);

    // readiness grace + drain deadline + flush, with a margin for process start-up noise.
    let status = relay.wait_exit(Duration::from_secs(1 + 5 + 5 + 2)).await;
    assert!(status.success(), "exit status {status}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(1),
        "the readiness grace was honoured"
    );
}

/// Embedded mode as a newcomer runs it: `relay serve` with no Postgres and no Redis URL.
#[tokio::test]
async fn relay_serve_without_urls_runs_embedded_end_to_end() {
    // No database URL in the environment and an empty Redis URL: the local config's defaults.
    let mut relay = RelayProcess::start(&[("APP__REDIS__URL", String::new())]);
    relay.wait_ready().await;
    let http = crate::helpers::http_client();
    let ready = relay.get_json("/readyz").await;
    assert_eq!(ready["embedded"], true, "{ready}");
    assert_eq!(
        ready["backends"],
        serde_json::json!({"history": "memory", "broker": "memory"})
    );

    let (stream, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?channels=hello", relay.addr))
            .await
            .unwrap();
    let mut ws = crate::helpers::WsClient { stream };
    ws.expect_type("subscribed").await;
    ws.send_json(serde_json::json!({"type": "publish", "channel": "hello", "data": "over ws"}))
        .await;
    assert_eq!(ws.expect_type("message").await["data"], "over ws");
    let res = http
        .post(format!(
            "http://{}/api/v1/channels/hello/messages",
            relay.addr
        ))
        .json(&serde_json::json!({"data": "over http"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(ws.expect_type("message").await["id"], 2);
    let history = relay.get_json("/api/v1/channels/hello/messages").await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 2);

    relay.terminate();
    let status = relay.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn a_dead_critical_task_turns_readiness_off_and_stops_the_app_with_an_error() {
    // The fatal shutdown skips the readiness grace, so the listener closes at once and only a
    // /readyz already in flight can answer. To hold one there, the app gets one pooled
    // connection, which a publish holds while it waits for the test's lock on `channels`: the
    // readiness check then waits for the pool.
    let mut app = spawn_app_with(|s| {
        s.database.max_connections = 1;
        s.database.acquire_timeout = Duration::from_secs(10);
        s.health.check_timeout = Duration::from_secs(10);
        // This /readyz must really check, not answer from the last round.
        s.health.cache_ttl = Duration::ZERO;
    })
    .await;
    let pool = app.db_pool().await;
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE channels IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let publish = tokio::spawn(
        app.http
            .post(app.url("/api/v1/channels/held/messages"))
            .json(&serde_json::json!({"data": 1}))
            .send(),
    );
    let waiting = "SELECT count(*) FROM pg_stat_activity \
        WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let mut blocked = 0;
    for _ in 0..100 {
        blocked = sqlx::query_scalar::<_, i64>(waiting)
            .fetch_one(&pool)
            .await
            .unwrap();
        if blocked > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        blocked > 0,
        "the publish waits for the lock, holding the pool"
    );
    let readyz = tokio::spawn(app.http.get(app.url("/readyz")).send());
    // Nothing signals that the request reached its handler; on this runtime's one thread half a
    // second is plenty.
    tokio::time::sleep(Duration::from_millis(500)).await;

    app.lifecycle
        .spawn_critical("lifecycle_test_doomed", async {
            panic!("invariant broken")
        });
    tokio::time::timeout(Duration::from_secs(5), app.lifecycle.cancelled())
        .await
        .expect("the failure cancels the lifecycle");
    assert!(app.lifecycle.is_draining());
    lock.commit().await.unwrap();

    let res = readyz
        .await
        .unwrap()
        .expect("the in-flight /readyz is answered");
    assert_eq!(res.status(), 503);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["shutting_down"], true, "{body}");
    let _ = publish.await;

    let err = app
        .wait_stopped()
        .await
        .expect_err("the app stops with an error");
    assert!(
        matches!(
            err,
            StartupError::TaskFailed {
                task: "lifecycle_test_doomed"
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "critical task `lifecycle_test_doomed` stopped unexpectedly"
    );
    // The admin port is closed now; read the app's registry directly.
    let metrics = Metrics::parse(&app.registry.handle().render());
    assert_eq!(
        metrics.sum(
            "relay_task_failures_total",
            &[("task", "lifecycle_test_doomed")]
        ),
        1.0
    );
    pool.close().await;
}
