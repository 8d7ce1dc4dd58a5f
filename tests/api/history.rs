//! Message history: the publish API, gapless offsets, recovery with `since`, retention.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{
    Backend, OwnRedis, TestApp, WsClient, spawn_app, spawn_app_on, spawn_app_with, wait_for_status,
};

async fn message_count(app: &TestApp) -> i64 {
    let pool = app.db_pool().await;
    let n = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

async fn publish_returns_201_with_the_offset_and_delivers_it(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    let mut ws = app.subscribed_ws(&["orders"]).await;
    let res = app
        .post_message("orders", json!({"sku": "A1", "qty": 2}))
        .await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["channel"], "orders");
    assert_eq!(body["id"], 1);
    assert!(
        body["created_at"].as_str().is_some_and(|t| t.contains('T')),
        "{body}"
    );
    let frame = ws.expect_type("message").await;
    assert_eq!(frame["id"], 1);
    assert_eq!(frame["data"], json!({"sku": "A1", "qty": 2}));
    assert_eq!(app.publish("orders", json!(null)).await, 2);
    assert_eq!(
        app.publish("other", json!("x")).await,
        1,
        "offsets are per channel"
    );
}

#[tokio::test]
async fn rejected_publishes_touch_neither_postgres_nor_redis() {
    let app = spawn_app().await;
    let mut ws = app.subscribed_ws(&["c"]).await;
    let url = app.url("/api/v1/channels/c/messages");
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            app.http
                .post(app.url("/api/v1/channels/bad%20name/messages"))
                .json(&json!({"data": 1})),
            400,
            "invalid_input",
        ),
        (
            app.http
                .post(&url)
                .header("content-type", "application/json")
                .body("{nope"),
            400,
            "bad_request",
        ),
        (
            app.http.post(&url).json(&json!({"payload": 1})),
            400,
            "bad_request",
        ),
        (app.http.post(&url).json(&json!([1, 2])), 400, "bad_request"),
        (
            app.http
                .post(&url)
                .header("content-type", "text/plain")
                .body(r#"{"data":1}"#),
            415,
            "unsupported_media_type",
        ),
        (
            app.http
                .post(&url)
                .json(&json!({"data": "x".repeat(2 * 1024 * 1024)})),
            413,
            "payload_too_large",
        ),
        // What Postgres `jsonb` cannot store is the client's mistake (400), not a 500.
        (
            app.http.post(&url).json(&json!({"data": {"k": "a\u{0}b"}})),
            400,
            "invalid_input",
        ),
        (
            app.http
                .post(&url)
                .header("content-type", "application/json")
                .body(r#"{"data":"\udc00"}"#),
            400,
            "invalid_input",
        ),
        (
            app.http
                .post(&url)
                .header("content-type", "application/json")
                .body(r#"{"data":[1e131072]}"#),
            400,
            "invalid_input",
        ),
    ];
    for (request, status, code) in cases {
        let res = request.send().await.unwrap();
        assert_eq!(res.status(), status);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["request_id"].is_string());
    }
    for query in [
        "limit=0",
        "limit=100000",
        "since=-1",
        "since=-9223372036854775808",
        "since=9007199254740992",
        "limit=abc",
    ] {
        let res = app
            .get(&format!("/api/v1/channels/c/messages?{query}"))
            .await;
        assert_eq!(res.status(), 400, "{query}");
        assert_eq!(
            res.json::<Value>().await.unwrap()["error"]["code"],
            "invalid_input",
            "{query}"
        );
    }
    assert_eq!(message_count(&app).await, 0);
    ws.expect_silence(Duration::from_millis(300)).await;
}

/// `protocol::check_storable` accepts exactly the JSON Postgres `jsonb` stores: asked of
/// Postgres itself, around every limit it has.
#[tokio::test]
async fn storable_data_is_exactly_what_postgres_stores() {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(crate::helpers::postgres_url())
        .await
        .unwrap();
    let mut cases: Vec<String> = [
        r#""plain""#,
        r#""\u0000""#,
        r#""a\u0000""#,
        r#""\\u0000""#,
        r#"{"k\u0000":1}"#,
        r#""\ud83d\ude00""#,
        r#""\ud83d""#,
        r#""\ude00""#,
        r#""\ud83dx""#,
        r#""\ud83d\n""#,
        r#""\ud83d\ud83d\ude00""#,
        r#"["\ud83d", 1]"#,
        r#""\u00e9\\""#,
        "0",
        "-0",
        "0.0",
        "12345678901234567890123456789",
        "1e-400",
        "-1.5E+400",
        "0e1000000",
        "0e-16383",
        "0e-16384",
        "0.0e-16383",
        "0e1073741822",
        "0e1073741823",
        "1e1073741823",
        "1e-1073741823",
        "1e99999999999999999999",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    for (mantissa, exponents) in [
        ("1", [131_070, 131_071, 131_072, -16_382, -16_383, -16_384]),
        (
            "9.99",
            [131_069, 131_070, 131_071, -16_381, -16_382, -16_383],
        ),
        (
            "0.0001",
            [131_073, 131_074, 131_075, -16_378, -16_379, -16_380],
        ),
        (
            "1230",
            [131_067, 131_068, 131_069, -16_382, -16_383, -16_384],
        ),
        (
            "-0.5",
            [131_071, 131_072, 131_073, -16_381, -16_382, -16_383],
        ),
    ] {
        for e in exponents {
            cases.push(format!("{mantissa}e{e}"));
            cases.push(format!("[{mantissa}E{e:+}]"));
        }
    }
    for case in &cases {
        assert!(
            serde_json::from_str::<&serde_json::value::RawValue>(case).is_ok(),
            "{case}"
        );
        let stored = sqlx::query("SELECT $1::text::jsonb")
            .bind(case)
            .execute(&mut conn)
            .await
            .is_ok();
        assert_eq!(
            relay::protocol::check_storable(case).is_ok(),
            stored,
            "{case}: Postgres {}",
            if stored { "stores it" } else { "refuses it" }
        );
    }
}

#[tokio::test]
async fn concurrent_publishers_on_two_replicas_give_gapless_in_order_delivery() {
    let app1 = spawn_app().await;
    let app2 = app1.spawn_replica().await;
    let mut on1 = app1.subscribed_ws(&["busy"]).await;
    let mut on2 = app2.subscribed_ws(&["busy"]).await;
    let mut publishers = Vec::new();
    for task in 0..8 {
        let target = if task % 2 == 0 {
            app1.url("")
        } else {
            app2.url("")
        };
        let http = app1.http.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..200 {
                let res = http
                    .post(format!("{target}/api/v1/channels/busy/messages"))
                    .json(&json!({"data": {"task": task, "i": i}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    for ws in [&mut on1, &mut on2] {
        for expected in 1..=1600 {
            let frame = ws.expect_type("message").await;
            assert_eq!(frame["id"], expected);
        }
        ws.expect_silence(Duration::from_millis(300)).await;
    }
}

async fn collect_ids(ws: &mut WsClient, until: i64) -> Vec<i64> {
    let mut ids = Vec::new();
    while ids.last().is_none_or(|last| *last < until) {
        ids.push(ws.expect_type("message").await["id"].as_i64().unwrap());
    }
    ids
}

async fn reconnecting_with_since_mid_burst_misses_nothing_and_repeats_nothing(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    let total = 300;
    let mut first = app.subscribed_ws(&["burst"]).await;
    let http = app.http.clone();
    let url = app.url("/api/v1/channels/burst/messages");
    let publisher = tokio::spawn(async move {
        for i in 0..total {
            let res = http
                .post(&url)
                .json(&json!({"data": i}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 201);
        }
    });
    // Read part of the burst, then drop the connection mid-stream.
    let before = collect_ids(&mut first, 50).await;
    drop(first);
    let since = *before.last().unwrap();
    let mut second = app.connect_ws("").await;
    second
        .send_json(json!({"type": "subscribe", "channel": "burst", "since": since}))
        .await;
    let subscribed = second.expect_type("subscribed").await;
    assert_eq!(subscribed["recovered"], true, "{subscribed}");
    assert!(subscribed["last_id"].as_i64().unwrap() >= since);
    let after = collect_ids(&mut second, total).await;
    publisher.await.unwrap();
    let all: Vec<i64> = before.into_iter().chain(after).collect();
    assert_eq!(all, (1..=total).collect::<Vec<_>>());
    second.expect_silence(Duration::from_millis(300)).await;
}

async fn since_in_the_query_string_replays_before_live(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    for i in 1..=5 {
        app.publish("q", json!(i)).await;
    }
    let mut ws = app.connect_ws("?channels=q&since.q=2").await;
    let subscribed = ws.expect_type("subscribed").await;
    assert_eq!(
        (
            subscribed["last_id"].as_i64(),
            subscribed["recovered"].as_bool()
        ),
        (Some(5), Some(true))
    );
    app.publish("q", json!(6)).await;
    assert_eq!(collect_ids(&mut ws, 6).await, vec![3, 4, 5, 6]);
}

async fn history_api_pages_with_a_cursor(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    for i in 1..=25 {
        app.publish("pages", json!({"n": i})).await;
    }
    let mut since = 0;
    let mut seen = Vec::new();
    loop {
        let page: Value = app
            .get(&format!(
                "/api/v1/channels/pages/messages?since={since}&limit=10"
            ))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(page["last_id"], 25);
        for m in page["messages"].as_array().unwrap() {
            assert_eq!(m["data"]["n"], m["id"]);
            assert!(m["created_at"].is_string());
            seen.push(m["id"].as_i64().unwrap());
        }
        since = page["next_since"].as_i64().unwrap();
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
    }
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
    let empty: Value = app
        .get("/api/v1/channels/never-used/messages")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(empty["messages"], json!([]));
    assert_eq!(empty["last_id"], 0);
}

#[tokio::test]
async fn retention_prunes_and_since_older_than_history_says_so() {
    let app = spawn_app_with(|s| s.history.max_per_channel = 10).await;
    for i in 1..=25 {
        app.publish("kept", json!(i)).await;
    }
    app.publish("aged", json!("old")).await;
    app.publish("aged", json!("new")).await;
    let pool = app.db_pool().await;
    sqlx::query("UPDATE messages SET created_at = now() - interval '30 days' WHERE channel = 'aged' AND \"offset\" = 1")
        .execute(&pool)
        .await
        .unwrap();
    let mut settings = app.settings.history.clone();
    settings.prune_batch = 4; // several batches
    let deleted = relay::retention::prune_once(
        &relay::store::MessageStore::Postgres(pool.clone()),
        &settings,
        &relay::lifecycle::Lifecycle::new(),
    )
    .await
    .unwrap();
    assert_eq!(deleted, 15 + 1);

    let page: Value = app
        .get("/api/v1/channels/kept/messages?since=0")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["truncated"], true);
    assert_eq!(page["oldest_id"], 16);
    assert_eq!(page["messages"][0]["id"], 16);
    let aged: Value = app
        .get("/api/v1/channels/aged/messages")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(aged["messages"].as_array().unwrap().len(), 1);
    assert_eq!(aged["messages"][0]["data"], "new");

    let mut ws = app.connect_ws("").await;
    ws.send_json(json!({"type": "subscribe", "channel": "kept", "since": 3}))
        .await;
    let subscribed = ws.expect_type("subscribed").await;
    assert_eq!(subscribed["recovered"], false);
    assert_eq!(subscribed["oldest_id"], 16);
    assert_eq!(
        collect_ids(&mut ws, 25).await,
        (16..=25).collect::<Vec<_>>()
    );
    pool.close().await;
}

async fn sse_resumes_from_last_event_id(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    for i in 1..=4 {
        app.publish("s", json!(i)).await;
    }
    let mut res = app
        .http
        .get(app.url("/sse?channels=s"))
        .header("Last-Event-ID", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    app.publish("s", json!(5)).await;
    let mut text = String::new();
    let ids = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let chunk = res.chunk().await.unwrap().expect("stream open");
            text.push_str(&String::from_utf8_lossy(&chunk));
            let ids: Vec<i64> = text
                .lines()
                .filter_map(|l| l.strip_prefix("id: "))
                .map(|id| id.parse().unwrap())
                .collect();
            if ids.last() == Some(&5) {
                return ids;
            }
        }
    })
    .await
    .expect("events within 5s");
    assert_eq!(ids, vec![3, 4, 5]);
    assert!(text.contains("event: subscribed"), "{text}");
    let bad = app
        .http
        .get(app.url("/sse?channels=s"))
        .header("Last-Event-ID", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn subscribers_get_every_message_committed_during_a_redis_outage() {
    let (app, redis) = OwnRedis::spawn_app_on_own_redis().await;
    let port = redis.port;
    let mut ws = app.subscribed_ws(&["outage"]).await;
    for i in 1..=5 {
        app.publish("outage", json!(i)).await;
    }
    assert_eq!(collect_ids(&mut ws, 5).await, vec![1, 2, 3, 4, 5]);

    drop(redis);
    wait_for_status(&app, "/readyz", 503).await;
    // Publishers keep writing over HTTP: every message is committed (201) though PUBLISH fails.
    for i in 6..=20 {
        app.publish("outage", json!(i)).await;
    }
    let redis = OwnRedis::start(port);
    redis.wait_up().await;
    wait_for_status(&app, "/readyz", 200).await;
    app.publish("outage", json!(21)).await;
    assert_eq!(collect_ids(&mut ws, 21).await, (6..=21).collect::<Vec<_>>());
    ws.expect_silence(Duration::from_millis(500)).await;
}

/// Compare-and-publish: `expected_last_id` commits only at that offset, over HTTP and
/// WebSocket; of concurrent publishers expecting the same offset exactly one wins.
async fn compare_and_publish_commits_only_at_the_expected_offset(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    let url = app.url("/api/v1/channels/doc/messages");
    let post = |body: Value| {
        let (http, url) = (app.http.clone(), url.clone());
        async move { http.post(url).json(&body).send().await.unwrap() }
    };
    let mut sub = app.subscribed_ws(&["doc"]).await;
    let created = post(json!({"data": 1, "expected_last_id": 0})).await;
    assert_eq!(created.status(), 201);
    let lost = post(json!({"data": 2, "expected_last_id": 0})).await;
    assert_eq!(lost.status(), 409);
    let body: Value = lost.json().await.unwrap();
    assert_eq!(body["error"]["code"], "conflict");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at offset 1"),
        "{body}"
    );
    assert_eq!(
        post(json!({"data": 2, "expected_last_id": 1}))
            .await
            .status(),
        201
    );
    assert_eq!(
        post(json!({"data": 3, "expected_last_id": null}))
            .await
            .status(),
        201
    );
    for bad in [
        json!(-1),
        json!("3"),
        json!(9_007_199_254_740_992_i64),
        json!(1.5),
    ] {
        let res = post(json!({"data": 0, "expected_last_id": bad})).await;
        assert_eq!(res.status(), 400, "{bad}");
    }

    // Twenty publishers race for offset 4.
    let racers: Vec<_> = (0..20)
        .map(|i| tokio::spawn(post(json!({"data": {"racer": i}, "expected_last_id": 3}))))
        .collect();
    let mut won = 0;
    for racer in racers {
        match racer.await.unwrap().status().as_u16() {
            201 => won += 1,
            409 => {}
            other => panic!("status {other}"),
        }
    }
    assert_eq!(won, 1, "exactly one publisher wins the race");

    // Over WebSocket: a `conflict` error frame, or the message at the expected offset.
    let mut ws = app.connect_ws("").await;
    ws.send_json(json!({"type": "publish", "channel": "doc", "data": 0, "expected_last_id": 2}))
        .await;
    let frame = ws.expect_type("error").await;
    assert_eq!(frame["code"], "conflict", "{frame}");
    ws.send_json(json!({"type": "publish", "channel": "doc", "data": 5, "expected_last_id": -1}))
        .await;
    assert_eq!(ws.expect_type("error").await["code"], "invalid_frame");
    ws.send_json(json!({"type": "publish", "channel": "doc", "data": 5, "expected_last_id": 4}))
        .await;
    assert_eq!(collect_ids(&mut sub, 5).await, vec![1, 2, 3, 4, 5]);
    sub.expect_silence(Duration::from_millis(300)).await;
}

/// `Idempotency-Key`: a retry within the window returns the original offset and stores nothing,
/// also when the retries race and (on services) on another replica; another body with the same
/// key is 422.
async fn idempotent_publishes_are_stored_once(backend: Backend) {
    let app = spawn_app_on(backend, |s| {
        s.publish.idempotency_window = Duration::from_secs(2);
        s.limits.publish_per_connection = 0;
    })
    .await;
    let post = |app: &TestApp, channel: &str, key: &str, data: Value| {
        let req = app
            .http
            .post(app.url(&format!("/api/v1/channels/{channel}/messages")))
            .header("idempotency-key", key)
            .json(&json!({ "data": data }));
        async move { req.send().await.unwrap() }
    };
    let id_of = |res: reqwest::Response| async move {
        assert_eq!(res.status(), 201);
        let replayed = res.headers()["idempotent-replayed"].to_str().unwrap() == "true";
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["replayed"].as_bool().unwrap_or(false), replayed);
        (body["id"].as_i64().unwrap(), replayed)
    };
    let mut sub = app.subscribed_ws(&["orders"]).await;
    assert_eq!(
        id_of(post(&app, "orders", "k1", json!(1)).await).await,
        (1, false)
    );
    assert_eq!(
        id_of(post(&app, "orders", "k1", json!(1)).await).await,
        (1, true)
    );
    let reused = post(&app, "orders", "k1", json!(2)).await;
    assert_eq!(reused.status(), 422);
    let body: Value = reused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "idempotency_key_reused");
    // Equal JSON is the same body, whatever the key order.
    assert_eq!(
        id_of(post(&app, "orders", "k2", json!({"a": 1, "b": [2]})).await).await,
        (2, false)
    );
    let reordered = app
        .http
        .post(app.url("/api/v1/channels/orders/messages"))
        .header("idempotency-key", "k2")
        .header("content-type", "application/json")
        .body(r#"{"data": {"b": [2], "a": 1}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(id_of(reordered).await, (2, true));
    // Keys belong to their channel.
    assert_eq!(
        id_of(post(&app, "other", "k1", json!(1)).await).await,
        (1, false)
    );
    for bad in ["", "a b", &"x".repeat(256)] {
        assert_eq!(
            post(&app, "orders", bad, json!(1)).await.status(),
            400,
            "{bad:?}"
        );
    }

    // Racing retries: one message, every answer its offset.
    let racers: Vec<_> = (0..10)
        .map(|_| tokio::spawn(post(&app, "orders", "k3", json!(3))))
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for racer in racers {
        ids.insert(id_of(racer.await.unwrap()).await.0);
    }
    assert_eq!(ids.into_iter().collect::<Vec<_>>(), [3]);
    if backend == Backend::Services {
        let other = app.spawn_replica().await;
        assert_eq!(
            id_of(post(&other, "orders", "k3", json!(3)).await).await,
            (3, true)
        );
    }

    // Over WebSocket: a repeat stores and delivers nothing; other data is refused.
    let mut ws = app.connect_ws("").await;
    for _ in 0..2 {
        ws.send_json(
            json!({"type": "publish", "channel": "orders", "data": 4, "idempotency_key": "k4"}),
        )
        .await;
    }
    ws.send_json(
        json!({"type": "publish", "channel": "orders", "data": 5, "idempotency_key": "k4"}),
    )
    .await;
    assert_eq!(
        ws.expect_type("error").await["code"],
        "idempotency_key_reused"
    );
    assert_eq!(collect_ids(&mut sub, 4).await, vec![1, 2, 3, 4]);
    sub.expect_silence(Duration::from_millis(300)).await;

    // After the window the key is free again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        id_of(post(&app, "orders", "k1", json!(1)).await).await,
        (5, false)
    );
}

crate::on_both_backends!(
    idempotent_publishes_are_stored_once,
    compare_and_publish_commits_only_at_the_expected_offset,
    publish_returns_201_with_the_offset_and_delivers_it,
    reconnecting_with_since_mid_burst_misses_nothing_and_repeats_nothing,
    since_in_the_query_string_replays_before_live,
    history_api_pages_with_a_cursor,
    sse_resumes_from_last_event_id,
);
