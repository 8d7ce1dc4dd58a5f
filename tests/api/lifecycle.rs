//! Process-level shutdown: the built binary, a real SIGTERM.

use std::time::{Duration, Instant};

use crate::helpers::{RelayProcess, create_database};

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
    let res = reqwest::get(&readyz)
        .await
        .expect("still serving during the readiness grace");
    assert_eq!(res.status(), 503);
    let body: serde_json::Value = res.json().await.unwrap();
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
    let http = reqwest::Client::new();
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
