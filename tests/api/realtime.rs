//! The realtime core: WebSocket and SSE fan-out through real Redis, across replicas.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{
    Backend, OwnRedis, TestApp, WsClient, spawn_app, spawn_app_on, wait_for_status,
};

fn message(channel: &str, data: Value, id: i64) -> Value {
    json!({"type": "message", "channel": channel, "data": data, "id": id})
}

async fn two_clients_on_one_channel_both_receive(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    let mut a = app.subscribed_ws(&["room"]).await;
    let mut b = app.subscribed_ws(&["room"]).await;
    a.send_json(json!({"type": "publish", "channel": "room", "data": {"hello": "world"}}))
        .await;
    let expected = message("room", json!({"hello": "world"}), 1);
    assert_eq!(a.recv_json().await, expected);
    assert_eq!(b.recv_json().await, expected);
}

#[tokio::test]
async fn messages_cross_replicas_and_come_from_any_redis_publisher() {
    let app1 = spawn_app().await;
    let app2 = app1.spawn_replica().await;
    let mut on1 = app1.subscribed_ws(&["news"]).await;
    let mut on2 = app2.connect_ws("").await;
    on2.send_json(json!({"type": "publish", "channel": "news", "data": [1, 2, 3]}))
        .await;
    assert_eq!(on1.recv_json().await, message("news", json!([1, 2, 3]), 1));

    // Any other program PUBLISHing the envelope (unknown fields ignored). Offsets belong to
    // relay: an outside `id` is not honoured, the message arrives without one.
    app1.redis_publish(
        "news",
        r#"{"data":{"from":"redis-cli"},"id":42,"extra":true}"#,
    )
    .await;
    assert_eq!(
        on1.recv_json().await,
        json!({"type": "message", "channel": "news", "data": {"from": "redis-cli"}, "id": null})
    );
}

#[tokio::test]
async fn a_message_published_right_after_subscribed_is_never_lost() {
    let app = spawn_app().await;
    let mut ws = app.connect_ws("").await;
    for i in 0..100 {
        let channel = format!("ack-{i}");
        ws.send_json(json!({"type": "subscribe", "channel": channel}))
            .await;
        assert_eq!(
            ws.expect_type("subscribed").await["channel"],
            channel.as_str()
        );
        app.redis_publish(&channel, &format!(r#"{{"data":{i}}}"#))
            .await;
        let got = ws.expect_type("message").await;
        assert_eq!(got["channel"], channel.as_str());
        assert_eq!(got["data"], i);
    }
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_releases_the_redis_subscription() {
    let app = spawn_app().await;
    let mut a = app.subscribed_ws(&["topic"]).await;
    let mut b = app.subscribed_ws(&["topic"]).await;
    // One replica, one Redis subscription however many local subscribers.
    assert_eq!(app.redis_numsub("topic").await, 1);

    a.send_json(json!({"type": "unsubscribe", "channel": "topic"}))
        .await;
    assert_eq!(a.expect_type("unsubscribed").await["channel"], "topic");
    assert_eq!(app.redis_numsub("topic").await, 1, "b still listens");
    app.redis_publish("topic", r#"{"data":"only b"}"#).await;
    assert_eq!(b.expect_type("message").await["data"], "only b");
    a.expect_silence(Duration::from_millis(300)).await;

    // The last local subscriber leaving (here: disconnecting) really UNSUBSCRIBEs.
    drop(b);
    let mut numsub = 1;
    for _ in 0..100 {
        numsub = app.redis_numsub("topic").await;
        if numsub == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(numsub, 0);
}

async fn one_thousand_messages_arrive_in_order_at_every_subscriber(backend: Backend) {
    // One connection publishes as fast as it can: ordering, not the publish limit, is tested.
    let app = spawn_app_on(backend, |s| s.limits.publish_per_connection = 0).await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(app.subscribed_ws(&["seq"]).await);
    }
    let mut publisher = app.connect_ws("").await;
    for i in 0..1000 {
        publisher
            .send_json(json!({"type": "publish", "channel": "seq", "data": {"n": i}}))
            .await;
    }
    for sub in &mut subs {
        for i in 0..1000 {
            let frame = sub.expect_type("message").await;
            assert_eq!(frame["data"]["n"], i);
        }
    }
}

/// A client whose socket receive buffer is tiny and who never reads.
async fn connect_non_reading(app: &TestApp, query: &str) -> WsClient {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(app.addr).await.unwrap();
    let (stream, _) = tokio_tungstenite::client_async(
        app.ws_url(query),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .unwrap();
    WsClient { stream }
}

async fn a_slow_consumer_is_disconnected_while_healthy_clients_get_everything(backend: Backend) {
    let app = spawn_app_on(backend, |s| {
        s.ws.outbox_capacity = 8;
        s.ws.write_timeout = Duration::from_secs(30);
    })
    .await;
    let mut slow = connect_non_reading(&app, "?channels=firehose").await;
    let mut healthy = app.subscribed_ws(&["firehose"]).await;
    // Make sure the slow client is subscribed before flooding (it reads just this frame).
    slow.expect_type("subscribed").await;

    let dropped = |m: crate::helpers::Metrics| {
        m.sum(
            "relay_messages_dropped_total",
            &[("reason", "slow_consumer")],
        )
    };
    let dropped_before = dropped(app.metrics().await);
    let blob = "x".repeat(64 * 1024);
    let total = 300;
    let reader = tokio::spawn(async move {
        for i in 0..total {
            let frame = healthy.expect_type("message").await;
            assert_eq!(frame["data"]["n"], i);
        }
        healthy
    });
    for i in 0..total {
        app.publish("firehose", json!({"n": i, "blob": blob})).await;
    }
    let _healthy = reader
        .await
        .expect("healthy client received all messages in order");
    // The slow client now reads: whatever was buffered, then the slow-consumer close.
    assert_eq!(slow.expect_close().await, 4008);
    // This app's own registry: exactly the one slow consumer, nothing from other tests.
    assert_eq!(
        dropped(app.metrics().await) - dropped_before,
        1.0,
        "the drop is counted once"
    );
}

/// A client that stops reading for a while fills its socket through the fan-out's direct
/// writes; the frame that no longer fits goes to the session, which must wait for room and
/// then write the rest, in order. (The direct write bypasses tokio's readiness tracking, so
/// the session's own write must not depend on that readiness being current.)
async fn a_client_that_pauses_reading_gets_everything_in_order(backend: Backend) {
    let app = spawn_app_on(backend, |s| {
        s.ws.outbox_capacity = 10_000;
        s.ws.outbox_max_bytes = 64 * 1024 * 1024;
        s.ws.write_timeout = Duration::from_secs(30);
    })
    .await;
    let mut paused = connect_non_reading(&app, "?channels=burst").await;
    paused.expect_type("subscribed").await;
    let blob = "x".repeat(16 * 1024);
    let total = 200; // 3.2 MiB: far more than a 4 KiB receive buffer and the send buffer hold
    for i in 0..total {
        app.publish("burst", json!({"n": i, "blob": blob})).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..total {
        let frame = paused.expect_type("message").await;
        assert_eq!(frame["data"]["n"], i);
    }
    // Still served: the next message comes straight through.
    app.publish("burst", json!({"n": total})).await;
    assert_eq!(paused.expect_type("message").await["data"]["n"], total);
}

/// The outbox is bounded in bytes too: a non-reading client of big messages is closed long
/// before `ws.outbox_capacity` frames pile up.
async fn the_outbox_byte_bound_closes_a_slow_consumer_of_big_messages(backend: Backend) {
    let app = spawn_app_on(backend, |s| {
        s.ws.outbox_capacity = 10_000;
        s.ws.outbox_max_bytes = 256 * 1024;
        s.ws.write_timeout = Duration::from_secs(30);
    })
    .await;
    let mut slow = connect_non_reading(&app, "?channels=big").await;
    let mut healthy = app.subscribed_ws(&["big"]).await;
    slow.expect_type("subscribed").await;
    let blob = "x".repeat(64 * 1024);
    let total = 60; // 3.8 MiB in all: far below 10,000 frames, far above 256 KiB
    let reader = tokio::spawn(async move {
        for i in 0..total {
            assert_eq!(healthy.expect_type("message").await["data"]["n"], i);
        }
    });
    for i in 0..total {
        app.publish("big", json!({"n": i, "blob": blob})).await;
    }
    reader
        .await
        .expect("the healthy client received everything");
    assert_eq!(slow.expect_close().await, 4008);
}

async fn bad_frames_get_error_frames_and_the_connection_stays_open(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    let mut ws = app.connect_ws("").await;
    let cases: &[(&str, &str)] = &[
        ("{not json", "invalid_json"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (r#"{"type":"subscribe"}"#, "invalid_frame"),
        (
            r#"{"type":"subscribe","channel":"no spaces"}"#,
            "invalid_channel",
        ),
        (r#"{"type":"publish","channel":"x"}"#, "invalid_frame"),
        (r#"{"type":"subscribe","channel":""}"#, "invalid_channel"),
    ];
    for (text, code) in cases {
        ws.send_text(text).await;
        let frame = ws.expect_type("error").await;
        assert_eq!(frame["code"], *code, "{text}: {frame}");
        assert!(frame["message"].is_string());
    }
    ws.stream
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(ws.expect_type("error").await["code"], "unsupported_binary");
    ws.send_json(json!({"type": "ping"})).await;
    ws.expect_type("pong").await;
}

async fn too_many_subscriptions_get_an_error_frame(backend: Backend) {
    let app = spawn_app_on(backend, |s| s.ws.max_subscriptions = 2).await;
    let mut ws = app.subscribed_ws(&["a", "b"]).await;
    ws.send_json(json!({"type": "subscribe", "channel": "c"}))
        .await;
    assert_eq!(
        ws.expect_type("error").await["code"],
        "too_many_subscriptions"
    );
    // Re-subscribing to a channel already held is fine.
    ws.send_json(json!({"type": "subscribe", "channel": "a"}))
        .await;
    ws.expect_type("subscribed").await;
}

async fn an_oversized_frame_closes_with_1009(backend: Backend) {
    let app = spawn_app_on(backend, |s| s.ws.max_message_bytes = 1024).await;
    let mut ws = app.connect_ws("").await;
    let big = json!({"type": "publish", "channel": "x", "data": "y".repeat(4096)});
    ws.send_json(big).await;
    assert_eq!(ws.expect_close().await, 1009);
}

#[tokio::test]
async fn garbage_redis_payloads_are_skipped_and_the_listener_keeps_going() {
    let app = spawn_app().await;
    let mut ws = app.subscribed_ws(&["g"]).await;
    for garbage in [
        "not json",
        "{\"id\":1}",
        "[1,2]",
        "{\"data\":",
        "\u{0}\u{1}",
    ] {
        app.redis_publish("g", garbage).await;
    }
    app.redis_publish("g", r#"{"data":"fine"}"#).await;
    assert_eq!(ws.expect_type("message").await["data"], "fine");
}

async fn shutdown_closes_websockets_with_1001_within_the_deadline(backend: Backend) {
    let mut app = spawn_app_on(backend, |_| {}).await;
    let mut a = app.subscribed_ws(&["bye"]).await;
    let mut b = app.connect_ws("").await;
    let deadline = app.settings.shutdown.drain_timeout;
    let closes = tokio::spawn(async move { (a.expect_close().await, b.expect_close().await) });
    let took = app.shutdown().await;
    assert_eq!(closes.await.unwrap(), (1001, 1001));
    assert!(took < deadline, "shutdown took {took:?}");
}

async fn sse_receives_the_same_messages_as_websocket(backend: Backend) {
    let app = spawn_app_on(backend, |_| {}).await;
    let mut ws = app.subscribed_ws(&["feed"]).await;
    let res = app
        .http
        .get(app.url("/sse?channels=feed"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut res = res;
    app.publish("feed", json!({"k": 1})).await;
    let ws_frame = ws.expect_type("message").await;

    let mut text = String::new();
    let event = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let chunk = res.chunk().await.expect("chunk").expect("stream open");
            text.push_str(&String::from_utf8_lossy(&chunk));
            if let Some(pos) = text.find("event: message") {
                let rest = &text[pos..];
                if let Some(end) = rest.find("\n\n") {
                    return rest[..end].to_owned();
                }
            }
        }
    })
    .await
    .expect("SSE message within 5s");
    let data = event
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("data line");
    assert_eq!(serde_json::from_str::<Value>(data).unwrap(), ws_frame);
    assert!(event.lines().any(|l| l == "id: 1"), "{event}");
}

#[tokio::test]
async fn sse_rejects_bad_channel_lists() {
    let app = spawn_app().await;
    assert_eq!(app.get("/sse").await.status(), 400);
    assert_eq!(app.get("/sse?channels=a%20b").await.status(), 400);
}

#[tokio::test]
async fn clients_stay_connected_through_a_redis_restart() {
    let (app, redis) = OwnRedis::spawn_app_on_own_redis().await;
    let port = redis.port;
    let prefix = app.settings.redis.channel_prefix.clone();
    let mut sub = app.subscribed_ws(&["survivor"]).await;
    let mut publisher = app.connect_ws("").await;
    redis
        .publish(&format!("{prefix}survivor"), r#"{"data":"before"}"#)
        .await;
    assert_eq!(sub.expect_type("message").await["data"], "before");

    drop(redis);
    wait_for_status(&app, "/readyz", 503).await;
    // Publishing while Redis is down is accepted (committed to Postgres), never hangs.
    publisher
        .send_json(json!({"type": "publish", "channel": "survivor", "data": 1}))
        .await;
    // Subscribing to a new channel during the outage answers at once with an error frame.
    publisher
        .send_json(json!({"type": "subscribe", "channel": "other"}))
        .await;
    assert_eq!(publisher.expect_type("error").await["code"], "unavailable");

    let redis = OwnRedis::start(port);
    redis.wait_up().await;
    wait_for_status(&app, "/readyz", 200).await;
    // The message published during the outage reaches the subscriber that stayed connected.
    let caught_up = sub.expect_type("message").await;
    assert_eq!(
        (caught_up["id"].as_i64(), &caught_up["data"]),
        (Some(1), &json!(1))
    );
    // The listener resubscribed: messages flow to the client that stayed connected.
    redis
        .publish(&format!("{prefix}survivor"), r#"{"data":"after"}"#)
        .await;
    assert_eq!(sub.expect_type("message").await["data"], "after");
    // And the shared publishing connection recovered too.
    publisher
        .send_json(json!({"type": "publish", "channel": "survivor", "data": "via ws"}))
        .await;
    assert_eq!(sub.expect_type("message").await["data"], "via ws");
}

crate::on_both_backends!(
    two_clients_on_one_channel_both_receive,
    one_thousand_messages_arrive_in_order_at_every_subscriber,
    a_slow_consumer_is_disconnected_while_healthy_clients_get_everything,
    a_client_that_pauses_reading_gets_everything_in_order,
    the_outbox_byte_bound_closes_a_slow_consumer_of_big_messages,
    bad_frames_get_error_frames_and_the_connection_stays_open,
    too_many_subscriptions_get_an_error_frame,
    an_oversized_frame_closes_with_1009,
    shutdown_closes_websockets_with_1001_within_the_deadline,
    sse_receives_the_same_messages_as_websocket,
);

/// Realtime connections are bounded per replica (503 before the upgrade) and per client
/// address (429), WebSocket and SSE together, and a closed connection gives its slot back.
#[tokio::test]
async fn connections_are_bounded_per_replica_and_per_address() {
    let app = crate::helpers::spawn_app_with(|s| s.ws.max_connections = 2).await;
    let first = app.subscribed_ws(&["a"]).await;
    let _second = app.subscribed_ws(&["a"]).await;
    assert_eq!(
        app.try_connect_ws("?channels=a", &[]).await.err(),
        Some(503)
    );
    assert_eq!(app.get("/sse?channels=a").await.status(), 503);
    drop(first);
    let mut reopened = None;
    for _ in 0..50 {
        if let Ok(ws) = app.try_connect_ws("?channels=a", &[]).await {
            reopened = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reopened.is_some(), "the closed connection's slot came back");

    let app = crate::helpers::spawn_app_with(|s| s.ws.max_connections_per_ip = 1).await;
    let _only = app.subscribed_ws(&["a"]).await;
    assert_eq!(
        app.try_connect_ws("?channels=a", &[]).await.err(),
        Some(429)
    );
    let res = app.get("/sse?channels=a").await;
    assert_eq!(res.status(), 429);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_requests");
}

/// A channel big enough to be split over threads (here: one subscriber per shard, two helper
/// threads) still gives every subscriber every message once, in order, from both directions
/// (this replica's own messages and an outside replica's through Redis).
#[tokio::test]
async fn a_channel_written_from_several_threads_keeps_every_subscriber_in_order() {
    let app = spawn_app_on(Backend::Services, |s| {
        s.ws.fanout_shard = 1;
        s.ws.fanout_threads = 2;
    })
    .await;
    let other = app.spawn_replica().await;
    let mut subscribers = Vec::new();
    for _ in 0..6 {
        subscribers.push(app.subscribed_ws(&["big"]).await);
    }
    const MESSAGES: i64 = 100;
    for i in 0..MESSAGES {
        let via = if i % 2 == 0 { &app } else { &other };
        assert_eq!(via.publish("big", json!(i)).await, i + 1);
    }
    for ws in &mut subscribers {
        for i in 0..MESSAGES {
            assert_eq!(ws.recv_json().await, message("big", json!(i), i + 1));
        }
    }
}
