//! Authentication and channel permissions, end to end: tokens over the HTTP API, WebSocket
//! (bearer header, `?token=`, handshake frame) and SSE; expiry, refresh and key rotation; the
//! `Origin` check; `relay token`; production refusing `auth.mode = disabled`.

use std::{path::PathBuf, process::Command, time::Duration};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use relay::config::{AuthMode, Secret, Settings};
use serde_json::{Value, json};

use crate::{
    config::load_env,
    helpers::{Backend, TestApp, WsClient, spawn_app_on},
};

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

/// POST `{"data":1}` to `url` with `token` as the bearer.
pub async fn post_as(app: &TestApp, url: &str, token: &str) -> reqwest::Response {
    app.http
        .post(url)
        .bearer_auth(token)
        .json(&json!({"data": 1}))
        .send()
        .await
        .expect("request")
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/auth")
        .join(name)
}

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

pub fn required(s: &mut Settings) {
    s.auth.mode = AuthMode::Required;
    s.auth.hs256_secret = Secret::new(SECRET);
}

async fn auth_app(customise: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_on(Backend::Embedded, |s| {
        required(s);
        customise(s);
    })
    .await
}

pub fn claims(sub: &str, ttl: u64, channels: Value) -> Value {
    json!({ "sub": sub, "exp": now() + ttl, "channels": channels })
}

pub fn hs256(claims: &Value) -> String {
    sign(
        claims,
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
}

pub fn sign(claims: &Value, alg: Algorithm, kid: Option<&str>, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn ec_key(name: &str) -> EncodingKey {
    EncodingKey::from_ec_pem(&std::fs::read(fixture(name)).unwrap()).unwrap()
}

pub fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(fixture("rs256.key.pem")).unwrap()).unwrap()
}

fn chat() -> Value {
    json!({ "subscribe": ["chat:*", "news"], "publish": ["chat:room1"], "history": ["chat:*"] })
}

/// Open a WebSocket with extra headers; Err is the HTTP status of a refused upgrade.
async fn ws_with(app: &TestApp, query: &str, headers: &[(&str, &str)]) -> Result<WsClient, u16> {
    app.try_connect_ws(query, headers).await
}

async fn ws_bearer(app: &TestApp, query: &str, token: &str) -> Result<WsClient, u16> {
    ws_with(app, query, &[("authorization", &format!("Bearer {token}"))]).await
}

async fn error_code(res: reqwest::Response) -> String {
    let body: Value = res.json().await.unwrap();
    body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn http_api_needs_a_token_with_the_right_permissions() {
    let app = auth_app(|_| {}).await;
    let url = app.url("/api/v1/channels/chat:room1/messages");
    let res = app
        .http
        .post(&url)
        .json(&json!({"data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert_eq!(error_code(res).await, "unauthorized");

    let forged = sign(
        &claims("alice", 60, chat()),
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(b"another-secret-another-secret-another").unwrap(),
    );
    let res = post_as(&app, &url, &forged).await;
    assert_eq!(res.status(), 401);

    let token = hs256(&claims("alice", 60, chat()));
    let res = post_as(&app, &url, &token).await;
    assert_eq!(res.status(), 201);
    let other = app.url("/api/v1/channels/chat:room2/messages");
    let res = post_as(&app, &other, &token).await;
    assert_eq!(res.status(), 403);
    assert_eq!(error_code(res).await, "forbidden");

    let res = app.http.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let news = app.url("/api/v1/channels/news/messages");
    let res = app
        .http
        .get(&news)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403, "subscribe does not imply history");
    assert_eq!(app.http.get(&news).send().await.unwrap().status(), 401);
}

#[tokio::test]
async fn invalid_tokens_get_401_before_the_upgrade() {
    let app = auth_app(|_| {}).await;
    assert_eq!(
        ws_bearer(&app, "?channels=news", "garbage").await.err(),
        Some(401)
    );
    assert_eq!(
        ws_with(&app, "?channels=news&token=garbage", &[])
            .await
            .err(),
        Some(401)
    );
    let expired = hs256(&json!({"sub": "a", "exp": now() - 120}));
    assert_eq!(ws_bearer(&app, "", &expired).await.err(), Some(401));

    // SSE: no handshake frame, so no token is a 401 too; a forbidden channel is a 403.
    let token = hs256(&claims("alice", 60, chat()));
    assert_eq!(app.get("/sse?channels=news").await.status(), 401);
    let res = app
        .http
        .get(app.url("/sse?channels=secret"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(error_code(res).await, "forbidden");
    let res = app.get(&format!("/sse?channels=news&token={token}")).await;
    assert_eq!(res.status(), 200);
    let res = app
        .http
        .get(app.url("/sse?channels=chat:x"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn websocket_query_and_header_tokens_check_every_channel() {
    let app = auth_app(|_| {}).await;
    let token = hs256(&claims("alice", 60, chat()));
    let mut ws = ws_with(&app, &format!("?channels=news,secret&token={token}"), &[])
        .await
        .unwrap();
    // The error (immediate) and the confirmation (from the broker) come in either order.
    let frames = [ws.recv_json().await, ws.recv_json().await];
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "subscribed" && f["channel"] == "news"),
        "{frames:?}"
    );
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "error" && f["code"] == "forbidden"),
        "{frames:?}"
    );

    let mut ws = ws_bearer(&app, "", &token).await.unwrap();
    ws.send_json(json!({"type": "subscribe", "channel": "other"}))
        .await;
    assert_eq!(ws.expect_type("error").await["code"], "forbidden");
    ws.send_json(json!({"type": "publish", "channel": "chat:room2", "data": 1}))
        .await;
    assert_eq!(ws.expect_type("error").await["code"], "forbidden");
    // The connection stays, and what is allowed works.
    ws.send_json(json!({"type": "subscribe", "channel": "chat:room1"}))
        .await;
    ws.expect_type("subscribed").await;
    ws.send_json(json!({"type": "publish", "channel": "chat:room1", "data": {"k": 1}}))
        .await;
    let msg = ws.expect_type("message").await;
    assert_eq!(msg["data"], json!({"k": 1}));
}

#[tokio::test]
async fn handshake_frame_authenticates_a_browser_websocket() {
    let app = auth_app(|_| {}).await;
    let token = hs256(&claims("alice", 60, chat()));
    // Query subscriptions wait for the handshake frame.
    let mut ws = ws_with(&app, "?channels=chat:a", &[]).await.unwrap();
    ws.expect_silence(Duration::from_millis(200)).await;
    ws.send_json(json!({"type": "auth", "token": token})).await;
    let ok = ws.expect_type("authenticated").await;
    assert_eq!(ok["sub"], "alice");
    assert_eq!(ws.expect_type("subscribed").await["channel"], "chat:a");
    ws.send_json(json!({"type": "ping"})).await;
    ws.expect_type("pong").await;
}

#[tokio::test]
async fn failed_handshake_frames_close_with_4001() {
    let app = auth_app(|s| s.auth.handshake_timeout = Duration::from_millis(300)).await;
    let mut ws = ws_with(&app, "", &[]).await.unwrap();
    ws.send_json(json!({"type": "auth", "token": "forged.token.here"}))
        .await;
    assert_eq!(ws.expect_close().await, 4001);

    let mut ws = ws_with(&app, "", &[]).await.unwrap();
    ws.send_json(json!({"type": "subscribe", "channel": "news"}))
        .await;
    assert_eq!(
        ws.expect_close().await,
        4001,
        "no frame before the auth frame"
    );

    let mut ws = ws_with(&app, "", &[]).await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(ws.expect_close().await, 4001, "handshake timeout");
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn expiring_tokens_warn_refresh_and_close() {
    // A warning window longer than the token's life: the warning comes at once.
    let app = auth_app(|s| s.auth.expiry_warning = Duration::from_secs(30)).await;
    let short = hs256(&claims("alice", 2, chat()));
    let mut ws = ws_bearer(&app, "?channels=chat:a,news", &short)
        .await
        .unwrap();
    let frames = [
        ws.recv_json().await,
        ws.recv_json().await,
        ws.recv_json().await,
    ];
    let warning = frames
        .iter()
        .find(|f| f["type"] == "token_expiring")
        .unwrap_or_else(|| panic!("no token_expiring in {frames:?}"));
    assert!(warning["exp"].as_u64().unwrap() <= now() + 2);
    assert_eq!(
        frames.iter().filter(|f| f["type"] == "subscribed").count(),
        2
    );

    // A token for someone else is refused; the old one stays in force.
    ws.send_json(json!({"type": "refresh", "token": hs256(&claims("mallory", 600, chat()))}))
        .await;
    assert_eq!(ws.expect_type("error").await["code"], "unauthorized");
    // The new token's permissions replace the old ones: `news` is no longer allowed.
    let fresh = hs256(&claims("alice", 600, json!({"subscribe": ["chat:*"]})));
    ws.send_json(json!({"type": "refresh", "token": fresh}))
        .await;
    assert_eq!(ws.expect_type("authenticated").await["sub"], "alice");
    assert_eq!(ws.expect_type("unsubscribed").await["channel"], "news");
    // Well past the first token's exp, the connection is still open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ws.send_json(json!({"type": "ping"})).await;
    ws.expect_type("pong").await;

    // Without a refresh: closed with 4003 at exp.
    let mut ws = ws_bearer(&app, "", &hs256(&claims("bob", 2, chat())))
        .await
        .unwrap();
    ws.expect_type("token_expiring").await;
    assert_eq!(ws.expect_close().await, 4003);
}

#[tokio::test]
async fn keys_rotate_by_kid_with_pem_and_jwks_files() {
    let app = auth_app(|s| {
        s.auth.hs256_kid = "hs-1".to_owned();
        s.auth.key_files = vec![
            fixture("es256-a.pem"),
            fixture("rs256.pem"),
            fixture("jwks.json"),
        ];
    })
    .await;
    let c = claims("alice", 60, chat());
    let accepted = [
        (
            "ES256 PEM, kid = file stem",
            sign(
                &c,
                Algorithm::ES256,
                Some("es256-a"),
                &ec_key("es256-a.key.pem"),
            ),
        ),
        (
            "RS256 PEM",
            sign(&c, Algorithm::RS256, Some("rs256"), &rsa_key()),
        ),
        (
            "JWKS key es-a",
            sign(
                &c,
                Algorithm::ES256,
                Some("es-a"),
                &ec_key("es256-a.key.pem"),
            ),
        ),
        (
            "JWKS key es-b (the rotated-in key)",
            sign(
                &c,
                Algorithm::ES256,
                Some("es-b"),
                &ec_key("es256-b.key.pem"),
            ),
        ),
        (
            "JWKS RSA key",
            sign(&c, Algorithm::RS256, Some("rs-jwks"), &rsa_key()),
        ),
        (
            "HS256 secret by its kid",
            sign(
                &c,
                Algorithm::HS256,
                Some("hs-1"),
                &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
            ),
        ),
    ];
    for (what, token) in accepted {
        let res = app
            .http
            .get(app.url("/api/v1/channels/chat:a/messages"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{what}");
    }
    let refused = [
        (
            "the wrong key for a kid",
            sign(
                &c,
                Algorithm::ES256,
                Some("es-a"),
                &ec_key("es256-b.key.pem"),
            ),
        ),
        (
            "an unknown kid",
            sign(
                &c,
                Algorithm::ES256,
                Some("retired"),
                &ec_key("es256-a.key.pem"),
            ),
        ),
        (
            "the HS256 secret under another kid",
            sign(
                &c,
                Algorithm::HS256,
                Some("es-a"),
                &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
            ),
        ),
    ];
    for (what, token) in refused {
        assert_eq!(ws_bearer(&app, "", &token).await.err(), Some(401), "{what}");
    }
}

#[tokio::test]
async fn audience_issuer_alg_none_and_forgeries_are_refused() {
    let app = auth_app(|s| {
        s.auth.audience = "relay".to_owned();
        s.auth.issuer = "https://id.example".to_owned();
        s.auth.key_files = vec![fixture("rs256.pem")];
    })
    .await;
    let base = |aud: &str, iss: &str| json!({"sub": "a", "exp": now() + 60, "aud": aud, "iss": iss, "channels": chat()});
    let get = |token: String| {
        let req = app
            .http
            .get(app.url("/api/v1/channels/chat:a/messages"))
            .bearer_auth(token);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get(hs256(&base("relay", "https://id.example"))).await, 200);
    assert_eq!(get(hs256(&base("other", "https://id.example"))).await, 401);
    assert_eq!(
        get(hs256(&base("relay", "https://evil.example"))).await,
        401
    );
    assert_eq!(
        get(hs256(&json!({"sub": "a", "exp": now() + 60}))).await,
        401,
        "aud missing"
    );

    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none_header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64.encode(base("relay", "https://id.example").to_string());
    assert_eq!(get(format!("{none_header}.{body}.")).await, 401, "alg none");
    // The classic confusion: the RSA public key used as an HS256 secret.
    let public_pem = std::fs::read(fixture("rs256.pem")).unwrap();
    let confused = sign(
        &base("relay", "https://id.example"),
        Algorithm::HS256,
        Some("rs256"),
        &EncodingKey::from_secret(&public_pem).unwrap(),
    );
    assert_eq!(get(confused).await, 401, "RS256 key as HS256 secret");
    // A valid token with its payload swapped.
    let good = hs256(&base("relay", "https://id.example"));
    let mut parts: Vec<&str> = good.split('.').collect();
    let admin = b64.encode(json!({"sub": "admin", "exp": now() + 60, "aud": "relay", "iss": "https://id.example", "channels": {"publish": ["*"]}}).to_string());
    parts[1] = &admin;
    assert_eq!(get(parts.join(".")).await, 401, "tampered payload");
}

#[tokio::test]
async fn origin_is_checked_before_the_upgrade() {
    let app = spawn_app_on(Backend::Embedded, |s| {
        s.ws.allowed_origins = vec!["https://app.example".to_owned()];
    })
    .await;
    let own = format!("http://{}", app.addr);
    assert!(ws_with(&app, "", &[("origin", &own)]).await.is_ok());
    assert!(
        ws_with(&app, "", &[("origin", "https://app.example")])
            .await
            .is_ok()
    );
    assert!(
        ws_with(&app, "", &[]).await.is_ok(),
        "no Origin: not a browser"
    );
    assert_eq!(
        ws_with(&app, "", &[("origin", "https://evil.example")])
            .await
            .err(),
        Some(403)
    );
    let res = app
        .http
        .get(app.url("/sse?channels=news"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);

    let any = spawn_app_on(Backend::Embedded, |s| {
        s.ws.allowed_origins = vec!["*".to_owned()]
    })
    .await;
    assert!(
        ws_with(&any, "", &[("origin", "https://evil.example")])
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn demo_token_route_exists_only_when_opted_in() {
    let app = auth_app(|s| s.demo.token_enabled = true).await;
    let res = app.get("/demo/token").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let body: Value = res.json().await.unwrap();
    let token = body["token"].as_str().unwrap();
    let mut ws = ws_with(&app, "", &[]).await.unwrap();
    ws.send_json(json!({"type": "auth", "token": token})).await;
    ws.expect_type("authenticated").await;

    let off = auth_app(|s| s.demo.token_enabled = false).await;
    assert_eq!(off.get("/demo/token").await.status(), 404);
    // Auth disabled (the local config): no token to hand out.
    let local = spawn_app_on(Backend::Embedded, |_| {}).await;
    assert_eq!(local.get("/demo/token").await.status(), 404);
}

fn relay(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relay"));
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("APP_ENV");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn production_refuses_disabled_auth_and_keyless_required() {
    let err = load_env("production", &[("APP__AUTH__MODE", "disabled")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("auth.mode"), "{err}");
    assert_eq!(
        load_env("local", &[]).unwrap().auth.mode,
        AuthMode::Disabled
    );
    assert_eq!(
        load_env("production", &[]).unwrap().auth.mode,
        AuthMode::Required
    );
    let err = load_env("local", &[("APP__AUTH__HS256_SECRET", "short")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("auth.hs256_secret"), "{err}");

    let prod = [
        ("APP_ENV", "production"),
        ("APP__AUTH__HS256_SECRET", SECRET),
    ];
    let out = relay(
        &["check-config"],
        &[prod[0], prod[1], ("APP__AUTH__MODE", "disabled")],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.mode"));
    let out = relay(&["check-config"], &[prod[0]]);
    assert!(!out.status.success(), "required without a key");
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.hs256_secret"));
    let out = relay(
        &["check-config"],
        &[
            prod[0],
            ("APP__AUTH__HS256_SECRET", SECRET),
            ("APP__AUTH__KEY_FILES", "/nonexistent/key.pem"),
        ],
    );
    assert!(!out.status.success(), "a missing key file");
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.key_files"));

    let out = relay(&["check-config"], &prod);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains(SECRET), "the secret never prints");
    let printed: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(printed["auth"]["hs256_secret"], "***");
}

#[tokio::test]
async fn relay_token_prints_a_token_the_server_accepts() {
    let out = relay(
        &[
            "token",
            "--sub",
            "alice",
            "--subscribe",
            "chat:*",
            "--subscribe",
            "news",
            "--publish",
            "chat:room1",
            "--history",
            "chat:*",
            "--ttl",
            "1h",
        ],
        &[("APP__AUTH__HS256_SECRET", SECRET)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    let key = jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let data = jsonwebtoken::decode::<Value>(&token, &key, &validation).unwrap();
    assert_eq!(data.claims["sub"], "alice");
    assert_eq!(
        data.claims["channels"],
        json!({"subscribe": ["chat:*", "news"], "publish": ["chat:room1"], "history": ["chat:*"]})
    );
    let exp = data.claims["exp"].as_u64().unwrap();
    assert!((now() + 3500..=now() + 3600).contains(&exp));

    let app = auth_app(|_| {}).await;
    let res = app
        .http
        .post(app.url("/api/v1/channels/chat:room1/messages"))
        .bearer_auth(&token)
        .json(&json!({"data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);

    let bad = relay(
        &["token", "--sub", "a", "--subscribe", "a*b"],
        &[("APP__AUTH__HS256_SECRET", SECRET)],
    );
    assert!(!bad.status.success());
}

/// Every access-log entry of an authenticated request names its subject: HTTP API, SSE and
/// WebSocket alike (and the query token stays redacted).
#[tokio::test]
async fn access_log_entries_name_the_subject() {
    let dir = std::env::temp_dir().join(format!("relay-subject-{}", uuid::Uuid::new_v4().simple()));
    let file = dir.join("access.log");
    let path = file.clone();
    let mut app = auth_app(|s| {
        s.access_log.sinks = vec![relay::config::AccessLogSinkKind::File];
        s.access_log.file_path = path;
    })
    .await;
    let all = json!({ "subscribe": ["*"], "publish": ["*"], "history": ["*"] });
    let alice = hs256(&claims("alice", 600, all.clone()));
    let bob = hs256(&claims("bob", 600, all.clone()));
    let carol = hs256(&claims("carol", 600, all));
    let url = app.url("/api/v1/channels/logged/messages");
    assert_eq!(post_as(&app, &url, &alice).await.status(), 201);
    let mut sse = app
        .http
        .get(app.url(&format!("/sse?channels=logged&token={bob}")))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    assert!(sse.chunk().await.unwrap().is_some());
    drop(sse);
    let mut ws = app
        .connect_ws(&format!("?channels=logged&token={carol}"))
        .await;
    ws.expect_type("subscribed").await;
    assert_eq!(
        app.get("/api/v1/channels/logged/messages").await.status(),
        401
    );
    drop(ws);
    app.shutdown().await;

    let text = std::fs::read_to_string(&file).expect("file sink wrote");
    let entries: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let subject_of = |kind: &str, method: &str| {
        entries
            .iter()
            .filter(|e| e["kind"] == kind && e["method"] == method && e["route"] != "/readyz")
            .map(|e| e["subject"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(subject_of("http", "POST"), [json!("alice")]);
    assert_eq!(subject_of("sse", "GET"), [json!("bob")]);
    assert_eq!(subject_of("websocket", "GET"), [json!("carol")]);
    assert_eq!(
        subject_of("http", "GET"),
        [Value::Null],
        "the 401 has no subject"
    );
    assert!(
        !text.contains(&bob) && !text.contains(&carol),
        "query tokens are redacted"
    );
    let _ = std::fs::remove_dir_all(dir);
}
