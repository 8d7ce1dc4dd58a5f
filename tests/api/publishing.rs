//! The write path: group commit, the batch API, pipelined WebSocket publishes and a full commit
//! queue, against real Postgres and Redis (and the embedded backends, where the contract is the
//! same).

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, spawn_app_on, spawn_app_with};

async fn post_batch(app: &TestApp, body: Value) -> reqwest::Response {
    app.http
        .post(app.url("/api/v1/messages"))
        .json(&body)
        .send()
        .await
        .expect("request")
}

async fn history_ids(app: &TestApp, channel: &str) -> Vec<i64> {
    let page: Value = app
        .get(&format!("/api/v1/channels/{channel}/messages?limit=1000"))
        .await
        .json()
        .await
        .unwrap();
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect()
}

async fn a_batch_commits_all_its_items_in_order_or_none(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    let mut sub = app.subscribed_ws(&["ba", "bb"]).await;
    let res = post_batch(
        &app,
        json!({"messages": [
            {"channel": "ba", "data": 1},
            {"channel": "bb", "data": {"x": 1}},
            {"channel": "ba", "data": 2},
        ]}),
    )
    .await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    let got: Vec<(String, i64)> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["channel"].as_str().unwrap().to_owned(),
                m["id"].as_i64().unwrap(),
            )
        })
        .collect();
    let want = [("ba", 1), ("bb", 1), ("ba", 2)].map(|(c, i)| (c.to_owned(), i));
    assert_eq!(got, want);
    for _ in 0..3 {
        sub.expect_type("message").await;
    }

    // One invalid item: 400 naming it, nothing stored.
    let res = post_batch(
        &app,
        json!({"messages": [{"channel": "ba", "data": 3}, {"channel": "b b", "data": 4}]}),
    )
    .await;
    assert_eq!(res.status(), 400);
    let err: Value = res.json().await.unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("messages[1]"),
        "{err}"
    );
    // A refused item (compare-and-publish, seeing the items before it): 409, nothing stored.
    let res = post_batch(
        &app,
        json!({"messages": [
            {"channel": "ba", "data": 3, "expected_last_id": 2},
            {"channel": "bb", "data": 4, "expected_last_id": 7},
        ]}),
    )
    .await;
    assert_eq!(res.status(), 409);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["code"], "conflict");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("messages[1]"),
        "{err}"
    );
    assert_eq!(history_ids(&app, "ba").await, [1, 2]);
    assert_eq!(history_ids(&app, "bb").await, [1]);
    sub.expect_silence(Duration::from_millis(300)).await;

    // Empty and oversized batches are refused.
    assert_eq!(
        post_batch(&app, json!({"messages": []})).await.status(),
        400
    );
    let many: Vec<Value> = (0..=app.settings.publish.max_batch_messages)
        .map(|i| json!({"channel": "ba", "data": i}))
        .collect();
    assert_eq!(
        post_batch(&app, json!({"messages": many})).await.status(),
        400
    );
    assert_eq!(post_batch(&app, json!([1, 2])).await.status(), 400);
    assert_eq!(
        post_batch(&app, json!({"messages": [["ba", 1]]}))
            .await
            .status(),
        400
    );
}

async fn a_retried_batch_returns_the_original_offsets(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    let body = json!({"messages": [
        {"channel": "ka", "data": 1, "idempotency_key": "k1"},
        {"channel": "ka", "data": 2, "idempotency_key": "k2"},
    ]});
    let first: Value = post_batch(&app, body.clone()).await.json().await.unwrap();
    let replicas = if backend == Backend::Services {
        vec![app.spawn_replica().await]
    } else {
        Vec::new()
    };
    for target in std::iter::once(&app).chain(&replicas) {
        let res = post_batch(target, body.clone()).await;
        assert_eq!(res.status(), 201);
        let again: Value = res.json().await.unwrap();
        for i in 0..2 {
            assert_eq!(again["messages"][i]["id"], first["messages"][i]["id"]);
            assert_eq!(again["messages"][i]["replayed"], true, "{again}");
        }
    }
    assert_eq!(history_ids(&app, "ka").await, [1, 2]);
    // The same key with other data refuses the whole batch.
    let res = post_batch(
        &app,
        json!({"messages": [
            {"channel": "ka", "data": 3},
            {"channel": "ka", "data": "other", "idempotency_key": "k1"},
        ]}),
    )
    .await;
    assert_eq!(res.status(), 422);
    assert_eq!(history_ids(&app, "ka").await, [1, 2]);
}

async fn a_websocket_pipeline_of_1000_publishes_gets_1000_acks_in_order(backend: Backend) {
    let app = spawn_app_on(backend, |s| s.limits.publish_per_connection = 0).await;
    let mut sub = app.subscribed_ws(&["pipe"]).await;
    let mut publisher = app.connect_ws("").await;
    let n = 1000;
    // Sent without waiting for any answer; the server reads on as commits free room.
    let send = async {
        for i in 0..n {
            let reference = if i % 2 == 0 {
                json!(i)
            } else {
                json!(format!("r{i}"))
            };
            publisher
                .send_json(
                    json!({"type": "publish", "channel": "pipe", "data": i, "ref": reference}),
                )
                .await;
        }
        publisher
    };
    let mut publisher = send.await;
    for i in 0..n {
        let ack = publisher.expect_type("ack").await;
        let reference = if i % 2 == 0 {
            json!(i)
        } else {
            json!(format!("r{i}"))
        };
        assert_eq!(ack["ref"], reference, "{ack}");
        assert_eq!(ack["channel"], "pipe");
        assert_eq!(ack["id"], i + 1, "acks in order, offsets in order: {ack}");
    }
    for i in 0..n {
        let frame = sub.expect_type("message").await;
        assert_eq!(
            (frame["id"].as_i64(), frame["data"].as_i64()),
            (Some(i + 1), Some(i))
        );
    }
}

async fn errors_of_pipelined_publishes_carry_their_ref_in_order(backend: Backend) {
    let app = spawn_app_on(backend, |s| s.limits.publish_per_connection = 0).await;
    let mut ws = app.connect_ws("").await;
    ws.send_json(json!({"type": "publish", "channel": "er", "data": 1, "ref": "a"}))
        .await;
    ws.send_json(
        json!({"type": "publish", "channel": "er", "data": 2, "ref": "b", "expected_last_id": 0}),
    )
    .await;
    ws.send_json(
        json!({"type": "publish", "channel": "er", "data": 3, "ref": 7, "expected_last_id": 1}),
    )
    .await;
    ws.send_json(json!({"type": "publish", "channel": "b b", "data": 4, "ref": "bad"}))
        .await;
    ws.send_json(json!({"type": "publish", "channel": "er", "data": 5, "ref": [1]}))
        .await;
    ws.send_json(json!({"type": "ping"})).await;
    let ack = ws.expect_type("ack").await;
    assert_eq!(
        (ack["ref"].clone(), ack["id"].clone()),
        (json!("a"), json!(1))
    );
    let conflict = ws.expect_type("error").await;
    assert_eq!(conflict["code"], "conflict", "{conflict}");
    assert_eq!(conflict["ref"], "b");
    let ack = ws.expect_type("ack").await;
    assert_eq!(
        (ack["ref"].clone(), ack["id"].clone()),
        (json!(7), json!(2))
    );
    let invalid = ws.expect_type("error").await;
    assert_eq!(invalid["ref"], "bad", "{invalid}");
    let invalid = ws.expect_type("error").await;
    assert!(
        invalid.get("ref").is_none(),
        "an invalid ref is not echoed: {invalid}"
    );
    ws.expect_type("pong").await;
}

crate::on_both_backends!(
    a_batch_commits_all_its_items_in_order_or_none,
    a_retried_batch_returns_the_original_offsets,
    a_websocket_pipeline_of_1000_publishes_gets_1000_acks_in_order,
    errors_of_pipelined_publishes_carry_their_ref_in_order,
);

/// Publishers on 20 channels, over HTTP, the batch API and pipelined WebSockets, on two
/// replicas at once: every subscriber on either replica sees each channel gapless and in order.
#[tokio::test]
async fn concurrent_publishers_on_many_channels_across_two_replicas_stay_gapless() {
    let a = spawn_app_with(|s| s.limits.publish_per_connection = 0).await;
    let b = a.spawn_replica().await;
    let channels: Vec<String> = (0..20).map(|i| format!("many{i}")).collect();
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    let mut subs = vec![a.subscribed_ws(&names).await, b.subscribed_ws(&names).await];
    let per_publisher = 50;
    let mut tasks = Vec::new();
    for (p, app) in [&a, &b, &a, &b].into_iter().enumerate() {
        let http = app.http.clone();
        let base = app.url("");
        let channels = channels.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_publisher {
                let channel = &channels[(i + p) % channels.len()];
                let res = http
                    .post(format!("{base}/api/v1/channels/{channel}/messages"))
                    .json(&json!({"data": {"p": p, "i": i}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
                let items: Vec<Value> = channels
                    .iter()
                    .map(|c| json!({"channel": c, "data": {"p": p, "i": i}}))
                    .collect();
                let res = http
                    .post(format!("{base}/api/v1/messages"))
                    .json(&json!({ "messages": items }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
            }
        }));
    }
    for app in [&a, &b] {
        let mut ws = app.connect_ws("").await;
        let channels = channels.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_publisher * 4 {
                let channel = &channels[i % channels.len()];
                ws.send_json(json!({"type": "publish", "channel": channel, "data": i, "ref": i}))
                    .await;
            }
            for _ in 0..per_publisher * 4 {
                ws.expect_type("ack").await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // 4 publishers × 50 × (1 single + 20 batched) + 2 × 200 WebSocket publishes.
    let total = 4 * per_publisher * 21 + 2 * per_publisher * 4;
    for sub in &mut subs {
        let mut next = std::collections::HashMap::new();
        for _ in 0..total {
            let frame = sub.expect_type("message").await;
            let channel = frame["channel"].as_str().unwrap().to_owned();
            let expected = next.entry(channel).or_insert(1);
            assert_eq!(frame["id"], *expected, "gapless, in order: {frame}");
            *expected += 1;
        }
        sub.expect_silence(Duration::from_millis(300)).await;
    }
}

/// With the commit held up (a test transaction owns the channel's lock), a second publish finds
/// the queue full, waits `publish.queue_wait`, and is refused with 503 — counted — while the
/// first is committed once the lock is released.
#[tokio::test]
async fn a_full_commit_queue_refuses_with_503_and_counts_it() {
    let app = spawn_app_with(|s| {
        s.publish.commit_max_messages = 1;
        s.publish.max_batch_messages = 1;
        s.publish.queue_capacity = 1;
        s.publish.queue_wait = Duration::from_millis(200);
    })
    .await;
    let pool = app.db_pool().await;
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('held', 7243))")
        .execute(&mut *holder)
        .await
        .unwrap();
    let before = app
        .metrics()
        .await
        .sum("relay_publish_queue_full_total", &[]);
    let first = {
        let http = app.http.clone();
        let url = app.url("/api/v1/channels/held/messages");
        tokio::spawn(async move { http.post(url).json(&json!({"data": 1})).send().await })
    };
    // The first one is queued (and waits for the lock) before the second arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = app.post_message("held", json!(2)).await;
    assert_eq!(second.status(), 503);
    let err: Value = second.json().await.unwrap();
    assert_eq!(err["error"]["code"], "unavailable", "{err}");
    let mut ws = app.connect_ws("").await;
    ws.send_json(json!({"type": "publish", "channel": "held", "data": 3, "ref": "q"}))
        .await;
    let refused = ws.expect_type("error").await;
    assert_eq!(
        (refused["code"].clone(), refused["ref"].clone()),
        (json!("unavailable"), json!("q"))
    );
    let after = app
        .metrics()
        .await
        .sum("relay_publish_queue_full_total", &[]);
    assert_eq!(after, before + 2.0, "counted: {before} → {after}");
    holder.rollback().await.unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), 201);
    assert_eq!(history_ids(&app, "held").await, [1]);
}
