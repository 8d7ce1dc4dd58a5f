//! Test harness: start the real relay in-process on `127.0.0.1:0` with its own fresh Postgres
//! database and its own Redis channel prefix, and talk to it over the network.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use futures_util::{SinkExt, StreamExt};
use relay::{
    app::{Application, StartupError},
    config::{LoadOptions, SecretUrl, Settings},
    lifecycle::Lifecycle,
};
use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

pub use crate::services::{postgres_url, redis_url};

/// An HTTP client for tests. reqwest is built with rustls and no crypto provider of its own
/// (relay's webhook client brings ring), so the process's provider is installed first: a
/// client built before it would panic.
pub fn http_client() -> reqwest::Client {
    relay::tls::install_crypto_provider();
    reqwest::Client::new()
}

/// Settings as the `local` environment would load them, pointed at the test services.
pub fn base_settings() -> Settings {
    let opts = LoadOptions {
        dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config"),
        app_env: "local".to_owned(),
        env: Default::default(),
    };
    let mut settings = Settings::load(&opts).expect("the shipped config must load");
    settings.server.port = 0;
    settings.server.admin_port = 0;
    // Tests that check the access log turn sinks on; the rest keep the output readable.
    settings.access_log.sinks = Vec::new();
    settings.redis.url = SecretUrl::new(redis_url());
    settings.redis.channel_prefix = format!("test:{}:", uuid::Uuid::new_v4().simple());
    settings.shutdown.readiness_grace = Duration::ZERO;
    settings.shutdown.drain_timeout = Duration::from_secs(5);
    settings.log.level = "warn".to_owned();
    settings
}

/// A fresh, empty database, dropped when this goes out of scope.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        drop_database(std::mem::take(&mut self.name));
    }
}

/// Create an empty database. Panics, naming the service, if Postgres is down.
pub async fn create_database() -> TestDatabase {
    let admin_url = postgres_url();
    let mut conn = PgConnection::connect(admin_url)
        .await
        .unwrap_or_else(|e| panic!("Postgres is not reachable at {admin_url} ({e})"));
    let name = format!("relay_test_{}", uuid::Uuid::new_v4().simple());
    conn.execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
        .await
        .expect("create test database");
    let mut url = url::Url::parse(admin_url).expect("TEST_DATABASE_URL is a URL");
    url.set_path(&name);
    TestDatabase {
        name,
        url: url.to_string(),
    }
}

fn drop_database(name: String) {
    // Drop runs outside any runtime guarantee; use a private one on a plain thread.
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let mut conn = PgConnection::connect(postgres_url()).await.ok()?;
            conn.execute(sqlx::AssertSqlSafe(format!(
                r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
            )))
            .await
            .ok()
        })
    })
    .join();
}

async fn check_redis() {
    let url = redis_url();
    let client = redis::Client::open(url).expect("TEST_REDIS_URL is a Redis URL");
    let result = tokio::time::timeout(
        Duration::from_secs(3),
        client.get_multiplexed_async_connection(),
    )
    .await;
    if !matches!(result, Ok(Ok(_))) {
        panic!("Redis is not reachable at {url}");
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub settings: Settings,
    /// The database, owned by the first replica of a test (dropped with it).
    _db: Option<TestDatabase>,
    pub db_url: String,
    pub lifecycle: Lifecycle,
    /// The app's pub/sub handle (test hooks).
    pub pubsub: relay::pubsub::PubSub,
    /// The app's message store (to commit behind relay's back in tests).
    pub store: relay::store::MessageStore,
    pub http: reqwest::Client,
    /// The app's own metrics (readable after the admin port closed).
    pub registry: relay::telemetry::metrics::Registry,
    /// `run_until_stopped`, whose result [`TestApp::wait_stopped`] hands back.
    server: Option<tokio::task::JoinHandle<Result<(), StartupError>>>,
}

/// Start relay with default test settings and wait until it is ready.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Start relay after `customise` adjusted the settings, and wait until it is ready.
pub async fn spawn_app_with(customise: impl FnOnce(&mut Settings)) -> TestApp {
    let app = spawn_app_unready(customise).await;
    app.wait_ready().await;
    app
}

/// Start relay without waiting for readiness (for tests of unhealthy dependencies).
pub async fn spawn_app_unready(customise: impl FnOnce(&mut Settings)) -> TestApp {
    check_redis().await;
    let db = create_database().await;
    let mut settings = base_settings();
    settings.database.url = SecretUrl::new(db.url.clone());
    customise(&mut settings);
    start(settings, Some(db)).await
}

/// Which backends a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Postgres and Redis: the production setup.
    Services,
    /// Embedded mode: history in memory, in-process broker.
    Embedded,
}

/// Start relay on `backend` and wait until it is ready.
pub async fn spawn_app_on(backend: Backend, customise: impl FnOnce(&mut Settings)) -> TestApp {
    match backend {
        Backend::Services => spawn_app_with(customise).await,
        Backend::Embedded => {
            let mut settings = base_settings();
            settings.database.url = SecretUrl::new("");
            settings.redis.url = SecretUrl::new("");
            customise(&mut settings);
            let app = start(settings, None).await;
            app.wait_ready().await;
            app
        }
    }
}

/// Generate one test per backend from `async fn name(backend: Backend)`, in modules
/// `on_services` and `embedded`: the contract is the same for both.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_services {
            $(#[tokio::test]
            async fn $name() {
                super::$name($crate::helpers::Backend::Services).await
            })*
        }
        mod embedded {
            $(#[tokio::test]
            async fn $name() {
                super::$name($crate::helpers::Backend::Embedded).await
            })*
        }
    };
}

async fn start(settings: Settings, db: Option<TestDatabase>) -> TestApp {
    let app = Application::build(settings.clone())
        .await
        .expect("app builds");
    let addr = app.local_addr();
    let admin_addr = app.admin_addr();
    let lifecycle = app.lifecycle();
    let pubsub = app.state().pubsub.clone();
    let store = app.state().store.clone();
    let registry = app.metrics();
    let server = tokio::spawn(app.run_until_stopped());
    TestApp {
        addr,
        admin_addr,
        db_url: settings.database.url.expose().to_owned(),
        settings,
        _db: db,
        lifecycle,
        pubsub,
        store,
        http: http_client(),
        registry,
        server: Some(server),
    }
}

impl TestApp {
    /// Another replica of the same deployment: same database, same Redis and prefix.
    pub async fn spawn_replica(&self) -> TestApp {
        let app = start(self.settings.clone(), None).await;
        app.wait_ready().await;
        app
    }

    /// A pool on the test database, for assertions.
    pub async fn db_pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.db_url)
            .await
            .expect("connect to the test database")
    }

    /// POST a message through the HTTP API; returns the response.
    pub async fn post_message(&self, channel: &str, data: Value) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/api/v1/channels/{channel}/messages")))
            .json(&serde_json::json!({ "data": data }))
            .send()
            .await
            .expect("request")
    }

    /// Publish over HTTP and return the assigned id, asserting 201.
    pub async fn publish(&self, channel: &str, data: Value) -> i64 {
        let res = self.post_message(channel, data).await;
        assert_eq!(res.status(), 201, "{:?}", res.text().await);
        res.json::<Value>().await.unwrap()["id"].as_i64().unwrap()
    }

    /// The metrics once `settled` holds of them, or after 5 s as they are. The core records
    /// its counters after each batch of events, so `relay_messages_delivered_total` may trail
    /// a frame the fan-out already wrote to the client.
    pub async fn metrics_when(&self, settled: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let metrics = self.metrics().await;
            if settled(&metrics) || tokio::time::Instant::now() >= deadline {
                return metrics;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// GET the admin port's `/metrics` and parse it.
    pub async fn metrics(&self) -> Metrics {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.admin_addr))
            .send()
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics body");
        Metrics::parse(&text)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{}", self.addr, query)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.expect("request")
    }

    /// Poll /readyz until it answers 200 (the Redis listener connects in the background).
    pub async fn wait_ready(&self) {
        for _ in 0..100 {
            if let Ok(res) = self.http.get(self.url("/readyz")).send().await
                && res.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("relay did not become ready within 5s");
    }

    /// Open a WebSocket with extra request headers; Err is the HTTP status of a refusal.
    pub async fn try_connect_ws(
        &self,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, u16> {
        use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
        let mut req = self.ws_url(query).into_client_request().expect("a ws URL");
        for (name, value) in headers {
            req.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                value.parse().expect("a header value"),
            );
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((stream, _)) => Ok(WsClient { stream }),
            Err(tungstenite::Error::Http(res)) => Err(res.status().as_u16()),
            Err(other) => panic!("unexpected WebSocket error: {other}"),
        }
    }

    pub async fn connect_ws(&self, query: &str) -> WsClient {
        let (stream, _) = tokio_tungstenite::connect_async(self.ws_url(query))
            .await
            .expect("ws connect");
        WsClient { stream }
    }

    /// Connect and wait for `subscribed` for each listed channel.
    pub async fn subscribed_ws(&self, channels: &[&str]) -> WsClient {
        let mut ws = self
            .connect_ws(&format!("?channels={}", channels.join(",")))
            .await;
        for _ in channels {
            ws.expect_type("subscribed").await;
        }
        ws
    }

    /// PUBLISH straight to Redis, as another program would.
    pub async fn redis_publish(&self, channel: &str, payload: &str) {
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(format!("{}{}", self.settings.redis.channel_prefix, channel))
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    /// Subscribers Redis counts for the channel (all replicas with this prefix).
    pub async fn redis_numsub(&self, channel: &str) -> i64 {
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(format!("{}{}", self.settings.redis.channel_prefix, channel))
            .query_async(&mut conn)
            .await
            .unwrap();
        n
    }

    /// Graceful shutdown that keeps the database (plain `shutdown` drops it with the app), so
    /// the same deployment can be started again with [`Stopped::restart`].
    pub async fn shutdown_keeping_data(mut self) -> Stopped {
        let mut settings = self.settings.clone();
        settings.server.port = self.addr.port();
        let db = self._db.take();
        self.shutdown().await;
        Stopped { settings, db }
    }

    /// Trigger graceful shutdown and wait for the server to finish.
    pub async fn shutdown(&mut self) -> Duration {
        let started = std::time::Instant::now();
        self.lifecycle.cancel();
        if let Some(server) = self.server.take()
            && let Err(err) = server.await.expect("server task")
        {
            panic!("server failed: {err}");
        }
        started.elapsed()
    }

    /// Wait, up to 20 s, for the app to stop by itself, and return how `run_until_stopped` ended.
    pub async fn wait_stopped(&mut self) -> Result<(), StartupError> {
        let server = self.server.take().expect("the app is running");
        tokio::time::timeout(Duration::from_secs(20), server)
            .await
            .expect("the app stopped within 20s")
            .expect("server task")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.lifecycle.cancel();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// A stopped instance whose database (if it owned it) is kept for a restart.
pub struct Stopped {
    settings: Settings,
    db: Option<TestDatabase>,
}

impl Stopped {
    /// Start again on the same port with the same database and Redis prefix, as a restarted
    /// process looks to its clients; waits until ready.
    pub async fn restart(self) -> TestApp {
        let app = start(self.settings, self.db).await;
        app.wait_ready().await;
        app
    }
}

pub struct WsClient {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    pub async fn send_json(&mut self, value: Value) {
        self.stream
            .send(Message::Text(value.to_string().into()))
            .await
            .expect("ws send");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream
            .send(Message::Text(text.into()))
            .await
            .expect("ws send");
    }

    /// Next message of any kind, within 5 s.
    pub async fn next_message(&mut self) -> Option<Message> {
        match tokio::time::timeout(Duration::from_secs(5), self.stream.next()).await {
            Ok(Some(Ok(msg))) => Some(msg),
            Ok(_) => None,
            Err(_) => panic!("no WebSocket message within 5s"),
        }
    }

    /// Next JSON text frame, skipping pings/pongs, within 5 s.
    pub async fn recv_json(&mut self) -> Value {
        loop {
            match self.next_message().await {
                Some(Message::Text(text)) => {
                    return serde_json::from_str(&text).expect("server sends JSON");
                }
                Some(Message::Ping(_) | Message::Pong(_)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    pub async fn expect_type(&mut self, ty: &str) -> Value {
        let frame = self.recv_json().await;
        assert_eq!(frame["type"], ty, "unexpected frame {frame}");
        frame
    }

    /// Read until the server's close frame; returns its code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            match self.next_message().await {
                Some(Message::Close(Some(frame))) => return frame.code.into(),
                Some(Message::Close(None)) | None => {
                    panic!("connection ended without a close code")
                }
                Some(_) => continue,
            }
        }
    }

    /// Assert nothing but pings arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(msg) = tokio::time::timeout_at(deadline, self.stream.next()).await {
            match msg {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected silence, got {other:?}"),
            }
        }
    }
}

/// A private `redis-server` on a fixed port, so the test can kill and restart it.
pub struct OwnRedis {
    pub port: u16,
    child: std::process::Child,
}

impl OwnRedis {
    pub fn start(port: u16) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (see README: Test)");
        Self { port, child }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A private Redis on a free port and an app using it, with fast reconnects, so a test can
    /// kill Redis and restart it on the same port.
    pub async fn spawn_app_on_own_redis() -> (TestApp, OwnRedis) {
        Self::spawn_app_on_own_redis_with(|_| {}).await
    }

    /// [`OwnRedis::spawn_app_on_own_redis`] after `customise` adjusted the settings.
    pub async fn spawn_app_on_own_redis_with(
        customise: impl FnOnce(&mut Settings),
    ) -> (TestApp, OwnRedis) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let redis = OwnRedis::start(port);
        redis.wait_up().await;
        let url = redis.url();
        let app = spawn_app_with(|s| {
            s.redis.url = SecretUrl::new(url);
            s.redis.reconnect_min_delay = Duration::from_millis(50);
            s.redis.reconnect_max_delay = Duration::from_millis(300);
            s.redis.command_timeout = Duration::from_millis(500);
            customise(s);
        })
        .await;
        (app, redis)
    }

    pub async fn wait_up(&self) {
        let client = redis::Client::open(self.url()).unwrap();
        if !answers_ping(&client).await {
            panic!("private redis-server did not start on port {}", self.port);
        }
    }

    pub async fn publish(&self, channel: &str, payload: &str) -> i64 {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a Redis server answers `PING` through `client` within 5 s.
pub async fn answers_ping(client: &redis::Client) -> bool {
    for _ in 0..100 {
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await
            && redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

pub async fn wait_for_status(app: &TestApp, path: &str, status: u16) {
    for _ in 0..200 {
        if app.get(path).await.status() == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} did not turn {status} within 10s");
}

/// Prometheus text format, parsed strictly enough to catch a malformed exposition.
pub struct Metrics {
    samples: Vec<Sample>,
}

/// Name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line `{line}`"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in `{line}`"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("bad labels in `{line}`"));
                    let labels = body
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair
                                .split_once("=\"")
                                .unwrap_or_else(|| panic!("bad label in `{line}`"));
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), Vec::new()),
            };
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name in `{line}`"
            );
            samples.push((name, labels, value));
        }
        Self { samples }
    }

    /// Sum of the samples of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }

    /// The value of the series `name` whose labels include all of `labels`, if there is one.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| *v)
    }
}

/// The `relay` binary running as a child process.
pub struct RelayProcess {
    pub child: std::process::Child,
    pub addr: String,
    /// The admin port's address (`/metrics`).
    pub admin: String,
    /// Every line the process has written to stdout so far.
    pub stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// The API and admin addresses of relay's "listening" line, in either log format.
fn listening_addrs(line: &str) -> Option<(String, String)> {
    if let Ok(v) = serde_json::from_str::<Value>(line) {
        if v["message"] != "listening" {
            return None;
        }
        let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        return Some((field("addr"), field("admin")));
    }
    // `pretty`: `... listening addr=127.0.0.1:1234 admin=127.0.0.1:5678`, with ANSI styling.
    let plain = strip_ansi(line);
    if !plain.contains(" listening ") {
        return None;
    }
    let field = |k: &str| {
        plain
            .split_whitespace()
            .find_map(|word| word.strip_prefix(k))
            .unwrap_or_default()
            .to_owned()
    };
    Some((field("addr="), field("admin=")))
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl RelayProcess {
    /// Start `relay serve` with these variables on top of a test-friendly base (ports 0, JSON
    /// logs), and wait for its "listening" line to learn the addresses.
    pub fn start(env: &[(&str, String)]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_relay"));
        command
            .arg("serve")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("APP__SERVER__PORT", "0")
            .env("APP__SERVER__ADMIN_PORT", "0")
            .env("APP__REDIS__URL", redis_url())
            .env("APP__LOG__FORMAT", "json")
            .env("APP__LOG__LEVEL", "info")
            .env("APP__ACCESS_LOG__SINKS", "")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start relay");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addrs) = listening_addrs(&line) {
                    let _ = tx.send(addrs);
                }
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let Ok((addr, admin)) = rx.recv_timeout(Duration::from_secs(30)) else {
            // Not left running after the test: nothing else would stop it.
            let _ = child.kill();
            let _ = child.wait();
            panic!("relay did not log its \"listening\" line (at info level) within 30s");
        };
        Self {
            child,
            addr,
            admin,
            stdout: lines,
        }
    }

    /// GET the admin port's `/metrics` and parse it.
    pub async fn metrics(&self) -> Metrics {
        let text = reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics body");
        Metrics::parse(&text)
    }

    /// The stdout lines containing `needle` (ANSI styling removed).
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|l| strip_ansi(l))
            .filter(|l| l.contains(needle))
            .collect()
    }

    pub async fn wait_ready(&self) {
        let http = http_client();
        for _ in 0..200 {
            if http
                .get(format!("http://{}/readyz", self.addr))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("relay process at {} did not become ready", self.addr);
    }

    /// GET `path` and parse the JSON body.
    pub async fn get_json(&self, path: &str) -> Value {
        http_client()
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("JSON body")
    }

    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Wait for the process to exit, at most `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < within,
                "relay did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
