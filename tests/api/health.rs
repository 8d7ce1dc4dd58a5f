use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{spawn_app, spawn_app_unready, spawn_app_with};

#[tokio::test]
async fn healthz_is_ok() {
    let app = spawn_app().await;
    let res = app.get("/healthz").await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        serde_json::json!({"status": "ok"})
    );
}

#[tokio::test]
async fn readyz_reports_each_dependency() {
    let app = spawn_app().await;
    let res = app.get("/readyz").await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["checks"]["postgres"]["status"], "ok");
    assert_eq!(body["checks"]["redis"]["status"], "ok");
    assert!(body["checks"]["redis"]["latency_ms"].is_number());
}

#[tokio::test]
async fn readyz_is_503_when_redis_is_unreachable() {
    // Port 1 refuses connections: startup still succeeds, readiness says why it is not ready.
    let app =
        spawn_app_unready(|s| s.redis.url = relay::config::SecretUrl::new("redis://127.0.0.1:1"))
            .await;
    let res = app.get("/readyz").await;
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["checks"]["postgres"]["status"], "ok");
    assert_eq!(body["checks"]["redis"]["status"], "fail");
    // What failed, never the driver's error text (that is logged).
    let error = body["checks"]["redis"]["error"].as_str().unwrap();
    assert!(["error", "timeout"].contains(&error), "{body}");
    // Liveness does not depend on Redis.
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn migrations_are_applied() {
    let app = spawn_app().await;
    let pool = app.db_pool().await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, relay::store::MIGRATOR.iter().count());
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('channels', 'messages')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 2);
    pool.close().await;
}

#[tokio::test]
async fn request_id_is_generated_or_echoed() {
    let app = spawn_app().await;
    let res = app.get("/healthz").await;
    let generated = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");

    let res = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "abc-123");

    // Ids that are unsafe to log are replaced.
    let res = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "a b\"c")
        .send()
        .await
        .unwrap();
    assert_ne!(res.headers()["x-request-id"], "a b\"c");
}

async fn assert_error_shape(res: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status(), status);
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(body["error"]["request_id"], request_id.as_str());
    body
}

#[tokio::test]
async fn errors_have_one_json_shape() {
    let app = spawn_app().await;
    assert_error_shape(app.get("/no/such/route").await, 404, "not_found").await;
    let res = app.http.delete(app.url("/healthz")).send().await.unwrap();
    assert_error_shape(res, 405, "method_not_allowed").await;
    let big = vec![b'x'; app.settings.http.max_body_bytes + 1];
    let res = app
        .http
        .post(app.url("/healthz"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_error_shape(res, 413, "payload_too_large").await;
    // A plain HTTP GET on the WebSocket route is refused with the same shape: 426 naming the
    // protocol to upgrade to (a bad query is reported first, as 400).
    let res = app.get("/ws?channels=a").await;
    assert_eq!(res.headers()["upgrade"], "websocket");
    assert_eq!(res.headers()["sec-websocket-version"], "13");
    assert_error_shape(res, 426, "upgrade_required").await;
    let res = app
        .http
        .get(app.url("/ws"))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "8")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["sec-websocket-version"], "13");
    assert_error_shape(res, 426, "upgrade_required").await;
    for query in ["channels=bad%20name", "channels=", "channels=a,,b"] {
        let res = app.get(&format!("/ws?{query}")).await;
        assert_error_shape(res, 400, "invalid_input").await;
    }
}

/// A client that sends half a request line and stalls is disconnected after
/// `http.header_timeout`, while everyone else is served as usual.
#[tokio::test]
async fn a_client_stalling_in_the_request_head_is_disconnected() {
    let app = spawn_app_with(|s| s.http.header_timeout = Duration::from_millis(500)).await;
    let mut stalled = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stalled.write_all(b"GET /healthz HT").await.unwrap();
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 512];
        // Whatever hyper says first (if anything), the connection must end.
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a stalled request head kept its connection for 5 s"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed before the timeout"
    );
    assert_eq!(app.get("/healthz").await.status(), 200);
}
