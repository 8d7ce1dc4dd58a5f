//! The delivery guarantee at its edges, tried as an outside client would: repeated
//! subscribes, outside publishers, long broker outages with retention running, lost tails,
//! replays bigger than the outbox, huge offsets, and a pub/sub core that dies.

use std::time::Duration;

use futures_util::StreamExt;

use relay::app::StartupError;
use serde_json::{Value, json};

use crate::helpers::{
    Backend, OwnRedis, TestApp, WsClient, spawn_app, spawn_app_on, spawn_app_with, wait_for_status,
};

/// Read frames of `channel` until offset `upto` is covered: message ids, with a gap frame
/// recorded as `-from` (its range must be followed by `to + 1`). Panics on disorder.
async fn read_through(ws: &mut WsClient, channel: &str, after: i64, upto: i64) -> Vec<i64> {
    let mut at = after;
    let mut seen = Vec::new();
    while at < upto {
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.recv_json())
            .await
            .expect("the stream completes");
        if frame["channel"] != channel {
            continue;
        }
        match frame["type"].as_str() {
            Some("message") => {
                let id = frame["id"].as_i64().expect("a sequenced message");
                assert_eq!(id, at + 1, "out of order or duplicate after {at}: {frame}");
                at = id;
                seen.push(id);
            }
            Some("gap") => {
                let (from, to) = (
                    frame["from"].as_i64().unwrap(),
                    frame["to"].as_i64().unwrap(),
                );
                assert_eq!(from, at + 1, "a gap must start at the hole: {frame}");
                assert!(to >= from);
                at = to;
                seen.push(-from);
            }
            _ => panic!("unexpected frame while catching up: {frame}"),
        }
    }
    seen
}

async fn repeated_subscribe_with_since_delivers_nothing_twice(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    for i in 1..=5 {
        app.publish("x", json!(i)).await;
    }
    let mut ws = app.connect_ws("").await;
    let subscribe = json!({"type": "subscribe", "channel": "x", "since": 0});
    ws.send_json(subscribe.clone()).await;
    let subscribed = ws.expect_type("subscribed").await;
    assert_eq!(
        (
            subscribed["last_id"].as_i64(),
            subscribed["recovered"].as_bool()
        ),
        (Some(5), Some(true))
    );
    assert_eq!(read_through(&mut ws, "x", 0, 5).await, [1, 2, 3, 4, 5]);
    ws.send_json(subscribe).await;
    let again = ws.expect_type("subscribed").await;
    assert_eq!(again["last_id"], 5, "{again}");
    ws.expect_silence(Duration::from_millis(300)).await;
    app.publish("x", json!(6)).await;
    assert_eq!(ws.expect_type("message").await["id"], 6);
    ws.expect_silence(Duration::from_millis(300)).await;
}

/// Outside publishers reach relay through Redis, so this is a Redis-only test.
#[tokio::test]
async fn an_outside_publisher_cannot_take_offsets() {
    let app = spawn_app().await;
    app.publish("x", json!("one")).await;
    app.publish("x", json!("two")).await;
    let mut ws = app.subscribed_ws(&["x"]).await;
    app.redis_publish("x", r#"{"data":"outside","id":4}"#).await;
    app.redis_publish("x", r#"{"data":"forged","id":3,"origin":"elsewhere"}"#)
        .await;
    assert_eq!(
        ws.recv_json().await,
        json!({"type":"message","channel":"x","data":"outside","id":null})
    );
    assert_eq!(
        ws.recv_json().await,
        json!({"type":"message","channel":"x","data":"forged","id":null})
    );
    for n in 3..=4 {
        assert_eq!(app.publish("x", json!(n)).await, n);
        let frame = ws.expect_type("message").await;
        assert_eq!((frame["id"].as_i64(), &frame["data"]), (Some(n), &json!(n)));
    }
}

/// The issue's scenario: a subscriber saw message 1, then Redis is down while 1,500 messages
/// are published over HTTP on another replica with retention keeping 500. When Redis returns the subscriber is
/// told exactly which offsets are gone, gets the rest in order, and is never closed.
#[tokio::test]
async fn a_long_outage_with_retention_is_filled_and_signalled_never_silent() {
    let (app, redis) = OwnRedis::spawn_app_on_own_redis_with(|s| {
        s.history.max_per_channel = 500;
        s.history.prune_interval = Duration::from_millis(100);
        s.history.head_check_interval = Duration::from_millis(500);
        s.ws.outbox_capacity = 64;
    })
    .await;
    let port = redis.port;
    // On another replica: the publishing replica's own subscribers get every commit at once,
    // outage or not (local-first delivery).
    let other = app.spawn_replica().await;
    let mut sub = other.subscribed_ws(&["long"]).await;
    app.publish("long", json!(1)).await;
    assert_eq!(sub.expect_type("message").await["id"], 1);

    drop(redis);
    wait_for_status(&app, "/readyz", 503).await;
    for n in 2..=1501 {
        assert_eq!(app.publish("long", json!(n)).await, n);
    }
    // Let retention prune below the newest 500.
    let pool = app.db_pool().await;
    let oldest = || async {
        sqlx::query_scalar::<_, i64>(r#"SELECT min("offset") FROM messages WHERE channel = 'long'"#)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let mut pruned = false;
    for _ in 0..300 {
        if oldest().await > 1000 {
            pruned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(pruned, "retention did not prune within 30 s");

    let redis = OwnRedis::start(port);
    redis.wait_up().await;
    let seen = read_through(&mut sub, "long", 1, 1501).await;
    assert_eq!(
        seen[0],
        -2,
        "the first thing after 1 is the gap from 2: {:?}",
        &seen[..3]
    );
    assert_eq!(*seen.last().unwrap(), 1501);
    // Retention may run on during the catch-up (more gaps, each checked by read_through), but
    // every message still retained arrived.
    let retained = oldest().await;
    let delivered: Vec<i64> = seen.iter().copied().filter(|s| *s >= retained).collect();
    assert_eq!(delivered, (retained..=1501).collect::<Vec<_>>());
    // Live delivery continues on the same connection.
    app.publish("long", json!(1502)).await;
    assert_eq!(sub.expect_type("message").await["id"], 1502);
}

/// Without retention the same outage is caught up completely, over many history pages, into
/// an outbox far smaller than the backlog.
#[tokio::test]
async fn catch_up_after_an_outage_spans_many_pages_and_never_closes_the_client() {
    let (app, redis) = OwnRedis::spawn_app_on_own_redis_with(|s| s.ws.outbox_capacity = 16).await;
    let port = redis.port;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(app.subscribed_ws(&["wide"]).await);
    }
    drop(redis);
    wait_for_status(&app, "/readyz", 503).await;
    for n in 1..=1200 {
        app.publish("wide", json!(n)).await;
    }
    let redis = OwnRedis::start(port);
    redis.wait_up().await;
    for sub in &mut subs {
        let seen = read_through(sub, "wide", 0, 1200).await;
        assert_eq!(seen, (1..=1200).collect::<Vec<i64>>());
    }
    drop(redis);
}

/// A committed message whose PUBLISH never happens (the request was dropped, the publisher gave
/// up) on a channel that stays quiet still reaches its subscribers, through the head check.
async fn a_lost_tail_on_a_quiet_channel_is_delivered(backend: Backend) {
    let app = spawn_app_on(backend, |s| {
        s.history.head_check_interval = Duration::from_millis(300)
    })
    .await;
    app.publish("quiet", json!("seen")).await;
    let mut ws = app.subscribed_ws(&["quiet"]).await;
    commit_without_publish(&app, "quiet", json!("lost tail")).await;
    let frame = tokio::time::timeout(Duration::from_secs(5), ws.expect_type("message"))
        .await
        .expect("the tail arrives within the head-check bound");
    assert_eq!(
        (frame["id"].as_i64(), &frame["data"]),
        (Some(2), &json!("lost tail"))
    );
}

/// Append to history behind relay's back, as a commit whose PUBLISH was abandoned.
async fn commit_without_publish(app: &TestApp, channel: &str, data: Value) {
    if app.settings.database.url.is_empty() {
        let store = &app.store;
        let data = serde_json::value::to_raw_value(&data).unwrap();
        store
            .append(channel, &data, Default::default())
            .await
            .unwrap();
        return;
    }
    let pool = app.db_pool().await;
    sqlx::query(
        r#"WITH next AS (UPDATE channels SET last_offset = last_offset + 1 WHERE name = $1 RETURNING last_offset)
           INSERT INTO messages (channel, "offset", data) SELECT $1, last_offset, $2::jsonb FROM next"#,
    )
    .bind(channel)
    .bind(data)
    .execute(&pool)
    .await
    .unwrap();
}

/// A `since` replay of far more than the outbox holds is paced into the connection.
async fn a_big_since_replay_is_paced_not_a_slow_consumer(backend: Backend) {
    let app = spawn_app_on(backend, |s| s.ws.outbox_capacity = 8).await;
    for n in 1..=1500 {
        app.publish("big", json!(n)).await;
    }
    let mut ws = app.connect_ws("?channels=big&since.big=0").await;
    let subscribed = ws.expect_type("subscribed").await;
    assert_eq!(subscribed["recovered"], true);
    assert_eq!(read_through(&mut ws, "big", 0, 1500).await.len(), 1500);
    app.publish("big", json!("live")).await;
    assert_eq!(ws.expect_type("message").await["id"], 1501);
}

async fn huge_offsets_are_refused_without_harm(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    let mut ws = app.connect_ws("").await;
    for since in ["9223372036854775807", "9007199254740992", "1e300", "-1"] {
        ws.send_text(&format!(
            r#"{{"type":"subscribe","channel":"x","since":{since}}}"#
        ))
        .await;
        assert_eq!(
            ws.expect_type("error").await["code"],
            "invalid_frame",
            "{since}"
        );
    }
    ws.send_json(json!({"type": "ping"})).await;
    ws.expect_type("pong").await;
    let since = "9223372036854775807";
    assert_eq!(
        app.get(&format!("/ws?channels=x&since.x={since}"))
            .await
            .status(),
        400
    );
    assert_eq!(
        app.get(&format!("/api/v1/channels/x/messages?since={since}"))
            .await
            .status(),
        400
    );
    let sse = app
        .http
        .get(app.url("/sse?channels=x"))
        .header("last-event-id", since)
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 400);
    // The channel still works.
    ws.send_json(json!({"type": "subscribe", "channel": "x", "since": 9007199254740991_i64}))
        .await;
    let subscribed = ws.expect_type("subscribed").await;
    assert_eq!(subscribed["recovered"], false, "{subscribed}");
    assert_eq!(app.publish("x", json!(1)).await, 1);
    assert_eq!(ws.expect_type("message").await["id"], 1);
}

/// A pub/sub core that panics is noticed: the service stops with an error (the orchestrator
/// restarts it) instead of staying alive and unready for ever.
#[tokio::test]
async fn a_panicking_pubsub_core_stops_the_service_with_an_error() {
    let mut app = spawn_app().await;
    let mut ws = app.subscribed_ws(&["doomed"]).await;
    app.pubsub.inject_core_panic().await;
    match app.wait_stopped().await {
        Err(StartupError::TaskFailed { task }) => assert_eq!(task, "pubsub_core"),
        other => panic!("expected TaskFailed, got {other:?}"),
    }
    assert!(app.lifecycle.is_draining());
    assert_eq!(ws.expect_close().await, 1001);
}

/// Two replicas, one of which loses its PUBLISHes: the other's subscribers still get every
/// message, in order, through gap detection.
#[tokio::test]
async fn subscribers_of_both_replicas_see_every_offset_once() {
    let app = spawn_app_with(|s| s.history.head_check_interval = Duration::from_millis(300)).await;
    let other = app.spawn_replica().await;
    let mut a = app.subscribed_ws(&["mix"]).await;
    let mut b = other.subscribed_ws(&["mix"]).await;
    for n in 1..=50 {
        if n % 7 == 0 {
            commit_without_publish(&app, "mix", json!(n)).await;
        } else {
            app.publish("mix", json!(n)).await;
        }
    }
    assert_eq!(
        read_through(&mut a, "mix", 0, 50).await,
        (1..=50).collect::<Vec<_>>()
    );
    assert_eq!(
        read_through(&mut b, "mix", 0, 50).await,
        (1..=50).collect::<Vec<_>>()
    );
}

crate::on_both_backends!(
    repeated_subscribe_with_since_delivers_nothing_twice,
    a_lost_tail_on_a_quiet_channel_is_delivered,
    a_big_since_replay_is_paced_not_a_slow_consumer,
    huge_offsets_are_refused_without_harm,
);

/// WebSocket publishers on two replicas keep publishing at 100 msg/s each through a 3 s Redis
/// SIGKILL: nothing is refused, and every subscriber on both replicas gets every message of both
/// channels in order once Redis is back.
#[tokio::test]
async fn websocket_publishes_are_accepted_through_a_redis_sigkill_and_reach_every_replica() {
    let (a, redis) =
        OwnRedis::spawn_app_on_own_redis_with(|s| s.limits.publish_per_connection = 0).await;
    let port = redis.port;
    let b = a.spawn_replica().await;
    let per_publisher: i64 = 500;
    let mut readers = Vec::new();
    for (r, app) in [&a, &b].into_iter().enumerate() {
        let mut sub = app.subscribed_ws(&["out:a", "out:b"]).await;
        // Read as it arrives, so the latency measured is the delivery's.
        readers.push(tokio::spawn(async move {
            let mut next = [1i64, 1i64];
            // Worst latency of messages published on this replica, and on the other.
            let mut worst = [0u64, 0u64];
            while next.iter().any(|n| *n <= per_publisher) {
                let frame = tokio::time::timeout(Duration::from_secs(30), sub.stream.next())
                    .await
                    .expect("every message arrives")
                    .expect("open")
                    .expect("a frame");
                let tokio_tungstenite::tungstenite::Message::Text(text) = frame else {
                    continue;
                };
                let frame: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(frame["type"], "message", "unexpected {frame}");
                let i = usize::from(frame["channel"] == "out:b");
                assert_eq!(frame["id"], next[i], "in order, no gap: {frame}");
                next[i] += 1;
                let latency = now_ms().saturating_sub(frame["data"]["sent"].as_u64().unwrap());
                let elsewhere = usize::from(i != r);
                worst[elsewhere] = worst[elsewhere].max(latency);
            }
            worst
        }));
    }
    let started = std::time::Instant::now();
    let publish = |app: &TestApp, channel: &'static str| {
        let url = app.ws_url("");
        tokio::spawn(async move {
            let (stream, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let mut ws = WsClient { stream };
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for n in 0..per_publisher {
                tick.tick().await;
                ws.send_json(json!({"type": "publish", "channel": channel, "data": {"n": n, "sent": now_ms()}}))
                    .await;
            }
            // Publishes have no reply on success: a refusal would be an error frame before the pong.
            ws.send_json(json!({"type": "ping"})).await;
            let frame = ws.recv_json().await;
            assert_eq!(frame["type"], "pong", "a publish was refused: {frame}");
        })
    };
    let publishers = [publish(&a, "out:a"), publish(&b, "out:b")];
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(redis); // SIGKILL
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _redis = OwnRedis::start(port);
    for p in publishers {
        p.await.unwrap();
    }
    let (mut local, mut remote) = (0, 0);
    for r in readers {
        let [on_publisher, elsewhere] = r.await.unwrap();
        local = local.max(on_publisher);
        remote = remote.max(elsewhere);
    }
    println!(
        "2 × {per_publisher} WebSocket publishes through a 3 s Redis SIGKILL: all delivered on both \
         replicas in {:?}; worst publish-to-delivery latency {local} ms on the publishing replica, \
         {remote} ms on the other",
        started.elapsed()
    );
    // Local-first delivery: the outage does not reach subscribers of the publishing replica
    // (3 s of it would, through Redis).
    assert!(
        local < 1500,
        "the publishing replica's subscribers waited {local} ms"
    );
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
