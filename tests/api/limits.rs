//! Per-client limits end to end: publish rate per connection and per subject, HTTP requests per
//! address, the channel quota per subject, and retention removing empty channels without ever
//! moving a channel's offsets backwards.

use std::time::Duration;

use relay::config::Settings;
use serde_json::{Value, json};

use crate::{
    auth::{claims, hs256, post_as, required},
    helpers::{Backend, TestApp, spawn_app_on},
};

fn anyone() -> Value {
    json!({ "subscribe": ["*"], "publish": ["*"], "history": ["*"] })
}

async fn limited_app(backend: Backend, customise: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_on(backend, |s| {
        required(s);
        customise(s);
    })
    .await
}

fn messages_url(app: &TestApp, channel: &str) -> String {
    app.url(&format!("/api/v1/channels/{channel}/messages"))
}

async fn rate_limited_total(app: &TestApp, limit: &str) -> f64 {
    app.metrics()
        .await
        .sum("relay_rate_limited_total", &[("limit", limit)])
}

#[tokio::test]
async fn a_fast_websocket_publisher_is_rate_limited_alone_and_stays_connected() {
    let app = limited_app(Backend::Embedded, |s| s.limits.publish_per_connection = 5).await;
    let token = hs256(&claims("alice", 600, anyone()));
    let mut sub = app
        .connect_ws(&format!("?channels=room&token={token}"))
        .await;
    sub.expect_type("subscribed").await;
    let before = rate_limited_total(&app, "publish_per_connection").await;

    let mut fast = app.connect_ws(&format!("?token={token}")).await;
    for i in 0..20 {
        fast.send_json(json!({"type": "publish", "channel": "room", "data": i}))
            .await;
    }
    fast.send_json(json!({"type": "ping"})).await;
    let mut refused = 0;
    loop {
        let frame = fast.recv_json().await;
        match frame["type"].as_str() {
            Some("pong") => break,
            Some("error") => {
                assert_eq!(frame["code"], "rate_limited", "{frame}");
                refused += 1;
            }
            _ => panic!("unexpected {frame}"),
        }
    }
    // A burst of the rate passes (plus what refilled meanwhile); the rest is refused.
    assert!((10..=15).contains(&refused), "refused {refused} of 20");

    // Another connection of the same subject has its own bucket.
    let mut other = app.connect_ws(&format!("?token={token}")).await;
    other
        .send_json(json!({"type": "publish", "channel": "room", "data": "other"}))
        .await;

    // The subscriber gets exactly the accepted publishes, in order, then the other's.
    let mut last = -1;
    for _ in 0..(20 - refused) {
        let frame = sub.expect_type("message").await;
        let n = frame["data"].as_i64().unwrap();
        assert!(n > last, "in order");
        last = n;
    }
    assert_eq!(sub.expect_type("message").await["data"], "other");
    assert_eq!(
        rate_limited_total(&app, "publish_per_connection").await - before,
        f64::from(refused)
    );
}

#[tokio::test]
async fn publishes_are_limited_per_subject_over_http_and_websocket_together() {
    let app = limited_app(Backend::Embedded, |s| {
        s.limits.publish_per_subject = 4;
        s.limits.publish_per_connection = 0;
    })
    .await;
    let alice = hs256(&claims("alice", 600, anyone()));
    let bob = hs256(&claims("bob", 600, anyone()));
    let url = messages_url(&app, "prices");
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(post_as(&app, &url, &alice).await);
    }
    let created = statuses.iter().filter(|r| r.status() == 201).count();
    assert!((4..=5).contains(&created), "{created} of 8 passed");
    let refusal = statuses
        .into_iter()
        .find(|r| r.status() == 429)
        .expect("a 429");
    let retry_after: u64 = refusal.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after));
    let body: Value = refusal.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");

    // The same subject's WebSocket shares the bucket...
    let mut ws = app.connect_ws(&format!("?token={alice}")).await;
    ws.send_json(json!({"type": "publish", "channel": "prices", "data": 1}))
        .await;
    assert_eq!(ws.expect_type("error").await["code"], "rate_limited");
    // ...another subject does not.
    assert_eq!(post_as(&app, &url, &bob).await.status(), 201);
    // The bucket refills: after a second alice publishes again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post_as(&app, &url, &alice).await.status(), 201);
}

#[tokio::test]
async fn http_requests_are_limited_per_address_and_probes_are_exempt() {
    let app = spawn_app_on(Backend::Embedded, |s| s.limits.http_per_ip = 5).await;
    let before = rate_limited_total(&app, "http_per_ip").await;
    let mut codes = Vec::new();
    for _ in 0..15 {
        codes.push(
            app.get("/api/v1/channels/x/messages")
                .await
                .status()
                .as_u16(),
        );
    }
    let refused = codes.iter().filter(|c| **c == 429).count();
    assert!(refused >= 8, "{codes:?}");
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");
    for _ in 0..20 {
        assert_eq!(app.get("/healthz").await.status(), 200);
        assert_eq!(app.get("/readyz").await.status(), 200);
    }
    assert_eq!(
        rate_limited_total(&app, "http_per_ip").await - before,
        refused as f64
    );
}

async fn channel_quota_and_empty_channel_removal(backend: Backend) {
    let app = limited_app(backend, |s| {
        s.limits.channels_per_subject = 3;
        s.limits.publish_per_subject = 0;
        s.limits.publish_per_connection = 0;
    })
    .await;
    let alice = hs256(&claims("alice", 600, anyone()));
    let bob = hs256(&claims("bob", 600, anyone()));
    for channel in ["q1", "q2", "q3"] {
        assert_eq!(
            post_as(&app, &messages_url(&app, channel), &alice)
                .await
                .status(),
            201
        );
    }
    let refused = post_as(&app, &messages_url(&app, "q4"), &alice).await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "channel_limit");
    // Existing channels take publishes; other subjects have their own quota.
    assert_eq!(
        post_as(&app, &messages_url(&app, "q1"), &alice)
            .await
            .status(),
        201
    );
    assert_eq!(
        post_as(&app, &messages_url(&app, "q4"), &bob)
            .await
            .status(),
        201
    );
    let mut ws = app.connect_ws(&format!("?token={alice}")).await;
    ws.send_json(json!({"type": "publish", "channel": "q5", "data": 1}))
        .await;
    assert_eq!(ws.expect_type("error").await["code"], "channel_limit");

    // q2 (at offset 1) ages out and is removed; its name keeps its place.
    let mut sub = app.connect_ws(&format!("?channels=q2&token={alice}")).await;
    assert_eq!(sub.expect_type("subscribed").await["last_id"], 1);
    age_out(&app, "q2").await;
    retention_round(&app).await;
    retention_round(&app).await;
    assert!(!channel_exists(&app, "q2").await, "q2 was removed");
    assert!(channel_exists(&app, "q1").await && channel_exists(&app, "q3").await);
    // alice has room again, and q2 goes on at 2: the live subscriber gets it as the next offset.
    let res = post_as(&app, &messages_url(&app, "q2"), &alice).await;
    assert_eq!(res.status(), 201);
    assert_eq!(res.json::<Value>().await.unwrap()["id"], 2);
    let frame = sub.expect_type("message").await;
    assert_eq!(frame["id"], 2, "{frame}");
    let page: Value = app
        .http
        .get(messages_url(&app, "q2"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["oldest_id"], 2);
    assert_eq!(page["last_id"], 2);
}

/// Make every message of `channel` older than any retention.
async fn age_out(app: &TestApp, channel: &str) {
    match &app.store {
        relay::store::MessageStore::Postgres(pool) => {
            sqlx::query(
                "UPDATE messages SET created_at = now() - interval '3650 days' WHERE channel = $1",
            )
            .bind(channel)
            .execute(pool)
            .await
            .unwrap();
        }
        relay::store::MessageStore::Memory(log) => {
            log.backdate(channel, Duration::from_secs(3650 * 86_400));
        }
    }
}

async fn retention_round(app: &TestApp) {
    relay::retention::prune_once(
        &app.store,
        &app.settings.history,
        &relay::lifecycle::Lifecycle::new(),
    )
    .await
    .unwrap();
}

async fn channel_exists(app: &TestApp, channel: &str) -> bool {
    match &app.store {
        relay::store::MessageStore::Postgres(pool) => {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM channels WHERE name = $1")
                .bind(channel)
                .fetch_one(pool)
                .await
                .unwrap()
                == 1
        }
        relay::store::MessageStore::Memory(log) => log.has_channel(channel),
    }
}

mod embedded {
    use super::*;

    #[tokio::test]
    async fn the_channel_quota_holds_and_removed_channels_keep_their_offsets() {
        channel_quota_and_empty_channel_removal(Backend::Embedded).await;
    }
}

mod on_services {
    use super::*;

    #[tokio::test]
    async fn the_channel_quota_holds_and_removed_channels_keep_their_offsets() {
        channel_quota_and_empty_channel_removal(Backend::Services).await;
    }
}
