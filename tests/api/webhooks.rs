//! Outbound webhooks end to end: a real receiver (a small axum server on an unused loopback
//! port, started by each test) and relay on real Postgres (and embedded mode where the
//! contract is the same): retries, signatures, final statuses, dead deliveries and their retry,
//! the in-flight bound, two replicas sharing the outbox, a SIGKILLed process, atomic batches,
//! shutdown releasing claims, the API's refusals, and the receiver snippets of
//! docs/webhooks.md verifying a real signature.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    http::{HeaderMap, StatusCode},
};
use relay::{
    config::{Secret, Settings, WebhookEndpoint},
    webhooks::signature,
};
use serde_json::{Value, json};

use crate::{
    auth::{SECRET, hs256, now, required},
    helpers::{Backend, RelayProcess, TestApp, create_database, redis_url, spawn_app_on},
};

pub const HOOK_SECRET: &str = "receiver-secret-0123456789";

/// How the receiver answers.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The first this many requests get `fail_status` (500 unless set)...
    pub fail_first: usize,
    pub fail_status: u16,
    /// ...with this `Retry-After`, if any.
    pub retry_after: Option<&'static str>,
    /// Then every request gets this.
    pub status: u16,
    /// Each request is answered after this long.
    pub delay: Duration,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            fail_first: 0,
            fail_status: 500,
            retry_after: None,
            status: 200,
            delay: Duration::ZERO,
        }
    }
}

/// One request the receiver answered.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub delivery: String,
    pub signature: String,
    pub attempt: String,
    pub body: Bytes,
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

#[derive(Default)]
struct ReceiverState {
    plan: Mutex<Plan>,
    seen: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    answered: Mutex<Vec<Recorded>>,
}

/// A webhook receiver on `127.0.0.1:<unused port>`.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<ReceiverState>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(plan: Plan) -> Self {
        let state = Arc::new(ReceiverState::default());
        *state.plan.lock().unwrap() = plan;
        let shared = Arc::clone(&state);
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let state = Arc::clone(&shared);
                async move { state.answer(headers, body).await }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn set_plan(&self, plan: Plan) {
        *self.state.plan.lock().unwrap() = plan;
    }

    /// Requests answered so far.
    pub fn answered(&self) -> Vec<Recorded> {
        self.state.answered.lock().unwrap().clone()
    }

    /// Answered with 2xx.
    pub fn delivered(&self) -> Vec<Recorded> {
        self.answered()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }

    /// The most requests that were being answered at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Wait (up to `within`) until `done` holds for what was answered.
    pub async fn wait_for(&self, within: Duration, done: impl Fn(&[Recorded]) -> bool) {
        let started = Instant::now();
        loop {
            if done(&self.answered()) {
                return;
            }
            assert!(
                started.elapsed() < within,
                "the receiver did not get what was expected within {within:?}; got {} requests",
                self.answered().len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ReceiverState {
    async fn answer(
        self: Arc<Self>,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, [(&'static str, &'static str); 1]) {
        let at = Instant::now();
        let n = self.seen.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let plan = self.plan.lock().unwrap().clone();
        // Counted down even when the client hangs up and this future is dropped.
        struct Leaving<'a>(&'a AtomicUsize);
        impl Drop for Leaving<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let leaving = Leaving(&self.in_flight);
        tokio::time::sleep(plan.delay).await;
        let failing = n < plan.fail_first;
        let status = if failing {
            plan.fail_status
        } else {
            plan.status
        };
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        self.answered.lock().unwrap().push(Recorded {
            delivery: header("x-relay-delivery"),
            signature: header("x-relay-signature"),
            attempt: header("x-relay-attempt"),
            body,
            status,
            at,
        });
        drop(leaving);
        let retry_after = plan.retry_after.filter(|_| failing).unwrap_or("");
        (
            StatusCode::from_u16(status).unwrap(),
            [("retry-after", retry_after)],
        )
    }
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn admin_token() -> String {
    hs256(&json!({ "sub": "ops", "exp": now() + 600, "admin": true }))
}

fn publisher_token() -> String {
    hs256(&json!({
        "sub": "app", "exp": now() + 600,
        "channels": { "publish": ["*"], "subscribe": ["*"], "history": ["*"] }
    }))
}

/// Auth on, loopback allowed, fast polling and retries.
pub fn fast(s: &mut Settings) {
    required(s);
    s.webhooks.allowed_hosts = vec!["127.0.0.1".to_owned()];
    s.webhooks.poll_interval = Duration::from_millis(50);
    s.webhooks.retry_min_delay = Duration::from_millis(20);
    s.webhooks.retry_max_delay = Duration::from_millis(100);
}

/// POST /api/v1/webhooks as an admin; returns the response.
pub async fn create_webhook(app: &TestApp, body: Value) -> reqwest::Response {
    app.http
        .post(app.url("/api/v1/webhooks"))
        .bearer_auth(admin_token())
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// A webhook for `channels` at `url`; returns its id.
pub async fn webhook(app: &TestApp, url: &str, channels: &[&str], extra: Value) -> String {
    let mut body = json!({ "url": url, "channels": channels, "secret": HOOK_SECRET });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let res = create_webhook(app, body).await;
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    let created: Value = res.json().await.unwrap();
    created["id"].as_str().unwrap().to_owned()
}

async fn publish(app: &TestApp, channel: &str, data: Value) -> i64 {
    let res = app
        .http
        .post(app.url(&format!("/api/v1/channels/{channel}/messages")))
        .bearer_auth(publisher_token())
        .json(&json!({ "data": data }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    res.json::<Value>().await.unwrap()["id"].as_i64().unwrap()
}

async fn publish_batch(app: &TestApp, items: Value) -> reqwest::Response {
    app.http
        .post(app.url("/api/v1/messages"))
        .bearer_auth(publisher_token())
        .json(&json!({ "messages": items }))
        .send()
        .await
        .unwrap()
}

async fn get_admin(app: &TestApp, path: &str) -> (u16, Value) {
    let res = app
        .http
        .get(app.url(path))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn post_admin(app: &TestApp, path: &str) -> (u16, Value) {
    let res = app
        .http
        .post(app.url(path))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Poll `path` as an admin until `done` holds for its JSON, up to `within`.
async fn wait_json(
    app: &TestApp,
    path: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let (_, body) = get_admin(app, path).await;
        if done(&body) {
            return body;
        }
        assert!(
            started.elapsed() < within,
            "{path} never satisfied the condition: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn verify(r: &Recorded) {
    let now = chrono::Utc::now().timestamp();
    signature::verify(HOOK_SECRET.as_bytes(), &r.signature, &r.body, now, 300)
        .unwrap_or_else(|e| panic!("signature `{}` does not verify: {e}", r.signature));
}

async fn retries_until_delivered_with_valid_signatures(backend: Backend) {
    let receiver = Receiver::start(Plan {
        fail_first: 2,
        ..Plan::default()
    })
    .await;
    let app = spawn_app_on(backend, fast).await;
    webhook(&app, &receiver.url(), &["orders:*"], json!({})).await;
    let id = publish(&app, "orders:1", json!({"total": 42})).await;
    publish(&app, "other", json!(1)).await;
    receiver
        .wait_for(Duration::from_secs(10), |r| {
            r.iter().any(|r| r.status == 200)
        })
        .await;
    // Nothing more comes once delivered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answered = receiver.answered();
    assert_eq!(
        answered.len(),
        3,
        "two failures, then the success: {answered:?}"
    );
    assert_eq!(receiver.delivered().len(), 1, "exactly one success");
    let delivery = &answered[0].delivery;
    assert!(uuid::Uuid::parse_str(delivery).is_ok(), "{delivery}");
    for (n, r) in answered.iter().enumerate() {
        assert_eq!(
            &r.delivery, delivery,
            "the same delivery id on every attempt"
        );
        assert_eq!(r.attempt, (n + 1).to_string());
        verify(r);
        let body = r.json();
        assert_eq!(body["channel"], "orders:1");
        assert_eq!(body["id"], id);
        assert_eq!(body["data"], json!({"total": 42}));
        assert!(
            body["published_at"]
                .as_str()
                .is_some_and(|t| t.contains('T'))
        );
    }
    let metrics = app.metrics().await;
    assert_eq!(
        metrics.sum("relay_webhook_deliveries_succeeded_total", &[]),
        1.0
    );
    assert!(metrics.has("relay_webhook_delivery_duration_seconds_bucket"));
}

async fn final_status_is_not_retried_and_dead_deliveries_can_be_retried(backend: Backend) {
    let receiver = Receiver::start(Plan {
        status: 400,
        ..Plan::default()
    })
    .await;
    let app = spawn_app_on(backend, fast).await;
    let hook = webhook(&app, &receiver.url(), &["news"], json!({"max_attempts": 5})).await;
    publish(&app, "news", json!("hello")).await;
    let dead_path = format!("/api/v1/webhooks/{hook}/dead-deliveries");
    let dead = wait_json(&app, &dead_path, Duration::from_secs(10), |b| {
        b["deliveries"].as_array().is_some_and(|d| d.len() == 1)
    })
    .await;
    let entry = &dead["deliveries"][0];
    assert_eq!(entry["attempts"], 1, "a 400 is final: {entry}");
    assert_eq!(entry["last_status"], 400);
    assert_eq!(entry["channel"], "news");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.answered().len(), 1, "no retry after a 400");

    // The receiver is fixed; the dead delivery is retried through the API.
    receiver.set_plan(Plan::default());
    let delivery = entry["id"].as_str().unwrap();
    let (status, body) = post_admin(&app, &format!("{dead_path}/{delivery}/retry")).await;
    assert_eq!((status, body["retried"].clone()), (200, json!(1)));
    receiver
        .wait_for(Duration::from_secs(10), |r| {
            r.iter().any(|r| r.status == 200)
        })
        .await;
    assert_eq!(
        receiver.delivered()[0].delivery,
        delivery,
        "the same delivery id"
    );
    wait_json(&app, &dead_path, Duration::from_secs(5), |b| {
        b["deliveries"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let (status, _) = post_admin(&app, &format!("{dead_path}/{delivery}/retry")).await;
    assert_eq!(status, 404, "no longer dead");
    let (status, body) = post_admin(&app, &format!("{dead_path}/retry")).await;
    assert_eq!((status, body["retried"].clone()), (200, json!(0)));
}

async fn an_unreachable_receiver_is_retried_then_dead(backend: Backend) {
    let app = spawn_app_on(backend, fast).await;
    let url = format!("http://127.0.0.1:{}/hook", closed_port());
    let hook = webhook(&app, &url, &["news"], json!({"max_attempts": 3})).await;
    let before = app
        .metrics()
        .await
        .sum("relay_webhook_deliveries_dead_total", &[]);
    publish(&app, "news", json!(1)).await;
    let dead_path = format!("/api/v1/webhooks/{hook}/dead-deliveries");
    let dead = wait_json(&app, &dead_path, Duration::from_secs(10), |b| {
        b["deliveries"].as_array().is_some_and(|d| d.len() == 1)
    })
    .await;
    let entry = &dead["deliveries"][0];
    assert_eq!(entry["attempts"], 3, "{entry}");
    assert_eq!(entry["last_status"], Value::Null);
    assert!(
        entry["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{entry}"
    );
    let metrics = app.metrics().await;
    assert_eq!(
        metrics.sum("relay_webhook_deliveries_dead_total", &[]),
        before + 1.0
    );
    assert_eq!(
        metrics.sum(
            "relay_webhook_deliveries_failed_total",
            &[("reason", "network")]
        ),
        3.0
    );
}

async fn retry_after_is_honoured(backend: Backend) {
    let receiver = Receiver::start(Plan {
        fail_first: 1,
        fail_status: 429,
        retry_after: Some("1"),
        ..Plan::default()
    })
    .await;
    let app = spawn_app_on(backend, |s| {
        fast(s);
        // The backoff alone would retry within 100 ms; Retry-After asks for a second.
        s.webhooks.retry_max_delay = Duration::from_secs(5);
    })
    .await;
    webhook(&app, &receiver.url(), &["limited"], json!({})).await;
    publish(&app, "limited", json!(1)).await;
    receiver
        .wait_for(Duration::from_secs(10), |r| {
            r.iter().any(|r| r.status == 200)
        })
        .await;
    let answered = receiver.answered();
    assert_eq!(answered.len(), 2, "one 429, then the success");
    let waited = answered[1].at - answered[0].at;
    assert!(
        waited >= Duration::from_millis(950),
        "retried after {waited:?}, before Retry-After"
    );
    assert!(waited < Duration::from_secs(4), "retried after {waited:?}");
}

crate::on_both_backends!(
    retry_after_is_honoured,
    retries_until_delivered_with_valid_signatures,
    final_status_is_not_retried_and_dead_deliveries_can_be_retried,
    an_unreachable_receiver_is_retried_then_dead,
);

/// 500 messages to a receiver that sleeps: never more than `webhooks.max_in_flight` at once.
#[tokio::test]
async fn in_flight_deliveries_never_exceed_the_bound() {
    const BOUND: usize = 8;
    let receiver = Receiver::start(Plan {
        delay: Duration::from_millis(20),
        ..Plan::default()
    })
    .await;
    let app = spawn_app_on(Backend::Services, |s| {
        fast(s);
        s.webhooks.max_in_flight = BOUND;
    })
    .await;
    webhook(&app, &receiver.url(), &["load:*"], json!({})).await;
    for batch in 0..5 {
        let items: Vec<Value> = (0..100)
            .map(|i| json!({"channel": format!("load:{}", i % 10), "data": batch * 100 + i}))
            .collect();
        assert_eq!(publish_batch(&app, json!(items)).await.status(), 201);
    }
    receiver
        .wait_for(Duration::from_secs(60), |r| r.len() >= 500)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answered = receiver.answered();
    assert_eq!(answered.len(), 500, "each once");
    let max = receiver.max_in_flight();
    assert!(max <= BOUND, "{max} in flight at once, bound {BOUND}");
    assert!(max >= 2, "deliveries run concurrently (max {max})");
    let mut seen: Vec<i64> = answered
        .iter()
        .map(|r| r.json()["data"].as_i64().unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..500).collect::<Vec<_>>());
}

/// Two replicas dispatch the same outbox: every delivery succeeds exactly once.
#[tokio::test]
async fn two_replicas_deliver_each_delivery_once() {
    let receiver = Receiver::start(Plan {
        delay: Duration::from_millis(2),
        ..Plan::default()
    })
    .await;
    let a = spawn_app_on(Backend::Services, |s| {
        fast(s);
        s.webhooks.max_in_flight = 4;
    })
    .await;
    let b = a.spawn_replica().await;
    webhook(&a, &receiver.url(), &["*"], json!({})).await;
    for i in 0..100 {
        let app = if i % 2 == 0 { &a } else { &b };
        publish(app, &format!("c{}", i % 7), json!(i)).await;
    }
    receiver
        .wait_for(Duration::from_secs(30), |r| r.len() >= 100)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = receiver.delivered();
    let mut ids: Vec<&str> = delivered.iter().map(|r| r.delivery.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(delivered.len(), 100, "no delivery twice");
    assert_eq!(ids.len(), 100);
    let pool = a.db_pool().await;
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM webhook_deliveries")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

/// The real binary, SIGKILLed while deliveries are in flight, then started again: every
/// delivery completes (at least once).
#[tokio::test]
async fn a_killed_process_leaves_no_delivery_behind() {
    let receiver = Receiver::start(Plan {
        delay: Duration::from_millis(300),
        ..Plan::default()
    })
    .await;
    let db = create_database().await;
    let prefix = format!("test:{}:", uuid::Uuid::new_v4().simple());
    let env = [
        ("APP__DATABASE__URL", db.url.clone()),
        ("APP__REDIS__URL", redis_url().to_owned()),
        ("APP__REDIS__CHANNEL_PREFIX", prefix),
        ("APP__WEBHOOKS__ALLOWED_HOSTS", "127.0.0.1".to_owned()),
        (
            "APP__WEBHOOKS__ALLOW_UNAUTHENTICATED_API",
            "true".to_owned(),
        ),
        ("APP__WEBHOOKS__MAX_IN_FLIGHT", "4".to_owned()),
        ("APP__WEBHOOKS__TIMEOUT", "1s".to_owned()),
        ("APP__WEBHOOKS__MAX_TIMEOUT", "1s".to_owned()),
        ("APP__WEBHOOKS__LEASE", "2s".to_owned()),
        ("APP__WEBHOOKS__POLL_INTERVAL", "100ms".to_owned()),
        ("APP__WEBHOOKS__RETRY_MIN_DELAY", "50ms".to_owned()),
        ("APP__WEBHOOKS__RETRY_MAX_DELAY", "200ms".to_owned()),
    ];
    let mut first = RelayProcess::start(&env);
    first.wait_ready().await;
    let http = crate::helpers::http_client();
    let res = http
        .post(format!("http://{}/api/v1/webhooks", first.addr))
        .json(&json!({"url": receiver.url(), "channels": ["k:*"], "secret": HOOK_SECRET}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    let items: Vec<Value> = (0..20)
        .map(|i| json!({"channel": "k:1", "data": i}))
        .collect();
    let res = http
        .post(format!("http://{}/api/v1/messages", first.addr))
        .json(&json!({ "messages": items }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    // Kill it while requests are in flight (the receiver holds each for 300 ms).
    let started = Instant::now();
    while receiver.state.in_flight.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no delivery started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let before_restart = receiver.delivered().len();
    assert!(
        before_restart < 20,
        "killed before everything was delivered"
    );

    let second = RelayProcess::start(&env);
    second.wait_ready().await;
    receiver
        .wait_for(Duration::from_secs(30), |r| {
            let mut data: Vec<i64> = r
                .iter()
                .filter(|r| r.status == 200)
                .map(|r| r.json()["data"].as_i64().unwrap())
                .collect();
            data.sort_unstable();
            data.dedup();
            data.len() == 20
        })
        .await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let started = Instant::now();
    loop {
        let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM webhook_deliveries")
            .fetch_one(&pool)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{left} deliveries left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pool.close().await;
    drop(second);
}

/// A batch publish records its deliveries in its own transaction: all of them with the
/// messages, none when the batch is refused.
#[tokio::test]
async fn a_batch_creates_its_deliveries_atomically() {
    let app = spawn_app_on(Backend::Services, |s| {
        fast(s);
        // Nothing is sent: the outbox is what is checked.
        s.webhooks.enabled = false;
    })
    .await;
    let receiver = Receiver::start(Plan::default()).await;
    let orders = webhook(&app, &receiver.url(), &["orders:*"], json!({})).await;
    let all = webhook(&app, &receiver.url(), &["orders:1", "news"], json!({})).await;
    let pool = app.db_pool().await;
    let rows = || async {
        sqlx::query_as::<_, (String, String, i64, Value)>(
            "SELECT webhook_id, channel, message_offset, data FROM webhook_deliveries \
             ORDER BY channel, webhook_id",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let res = publish_batch(
        &app,
        json!([
            {"channel": "orders:1", "data": {"n": 1}},
            {"channel": "orders:2", "data": {"n": 2}},
            {"channel": "news", "data": "hi"},
            {"channel": "other", "data": 0},
        ]),
    )
    .await;
    assert_eq!(res.status(), 201);
    let mut expected = vec![
        ("news".to_owned(), all.clone(), json!("hi").to_string()),
        (
            "orders:1".to_owned(),
            all.clone(),
            json!({"n": 1}).to_string(),
        ),
        (
            "orders:1".to_owned(),
            orders.clone(),
            json!({"n": 1}).to_string(),
        ),
        (
            "orders:2".to_owned(),
            orders.clone(),
            json!({"n": 2}).to_string(),
        ),
    ];
    expected.sort();
    let mut got: Vec<(String, String, String)> = rows()
        .await
        .into_iter()
        .map(|(w, c, o, d)| {
            assert_eq!(o, 1, "each channel's first message");
            (c, w, d.to_string())
        })
        .collect();
    got.sort();
    assert_eq!(got, expected);

    // Refused as a whole (the last item's compare-and-publish fails): no message, no delivery.
    let res = publish_batch(
        &app,
        json!([
            {"channel": "orders:1", "data": 2},
            {"channel": "news", "data": 2, "expected_last_id": 7},
        ]),
    )
    .await;
    assert_eq!(res.status(), 409);
    assert_eq!(rows().await.len(), 4);
    let (messages,): (i64,) = sqlx::query_as("SELECT count(*) FROM messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(messages, 4);
    // Queue depth counts them (refreshed by the dispatcher, which is off here: so 0 stays).
    assert!(app.metrics().await.has("relay_webhook_queue_depth"));
}

/// Shutdown: in-flight deliveries get until the drain deadline, then their claims are given
/// back for another replica, not left to the lease.
#[tokio::test]
async fn shutdown_releases_unfinished_deliveries() {
    let receiver = Receiver::start(Plan {
        delay: Duration::from_secs(10),
        ..Plan::default()
    })
    .await;
    let mut app = spawn_app_on(Backend::Services, |s| {
        fast(s);
        s.webhooks.timeout = Duration::from_secs(20);
        s.webhooks.max_timeout = Duration::from_secs(20);
        s.webhooks.lease = Duration::from_secs(60);
        s.shutdown.drain_timeout = Duration::from_secs(1);
    })
    .await;
    webhook(&app, &receiver.url(), &["slow"], json!({})).await;
    publish(&app, "slow", json!(1)).await;
    let started = Instant::now();
    while receiver.state.in_flight.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no delivery started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pool = app.db_pool().await;
    let took = app.shutdown().await;
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
    let (locked, attempts, state): (Option<chrono::DateTime<chrono::Utc>>, i32, String) =
        sqlx::query_as("SELECT locked_until, attempts, state FROM webhook_deliveries")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(locked, None, "released, not left to the lease");
    assert_eq!((attempts, state.as_str()), (0, "pending"));
}

/// Webhooks from `[[webhooks.endpoints]]`: delivered like API ones, listed as `config`, not
/// deletable through the API.
#[tokio::test]
async fn configured_webhooks_deliver_and_belong_to_the_configuration() {
    let receiver = Receiver::start(Plan::default()).await;
    let url = receiver.url();
    let app = spawn_app_on(Backend::Services, |s| {
        fast(s);
        s.webhooks.endpoints = vec![WebhookEndpoint {
            id: "billing".to_owned(),
            url,
            channels: vec!["invoices:*".to_owned()],
            secret: Secret::new(HOOK_SECRET),
            timeout: None,
            max_attempts: Some(3),
        }];
    })
    .await;
    let (status, list) = get_admin(&app, "/api/v1/webhooks").await;
    assert_eq!(status, 200);
    assert_eq!(list["webhooks"][0]["id"], "billing");
    assert_eq!(list["webhooks"][0]["source"], "config");
    assert_eq!(list["webhooks"][0]["max_attempts"], 3);
    assert!(
        !list.to_string().contains(HOOK_SECRET),
        "secrets are never returned"
    );
    publish(&app, "invoices:9", json!({"due": 1})).await;
    receiver
        .wait_for(Duration::from_secs(10), |r| r.len() == 1)
        .await;
    verify(&receiver.answered()[0]);
    let res = app
        .http
        .delete(app.url("/api/v1/webhooks/billing"))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
}

async fn error(res: reqwest::Response) -> (u16, String, String) {
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap();
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// Bad input gets a clear 4xx in the standard error shape, and nothing is created.
#[tokio::test]
async fn the_api_refuses_bad_webhooks_and_callers_without_admin() {
    let app = spawn_app_on(Backend::Embedded, |s| {
        required(s);
        s.webhooks.allowed_hosts = vec!["127.0.0.1".to_owned(), "hooks.internal".to_owned()];
    })
    .await;
    let good = || json!({"url": "http://127.0.0.1:9/hook", "channels": ["orders:*"], "secret": HOOK_SECRET});
    let with = |key: &str, value: Value| {
        let mut body = good();
        body[key] = value;
        body
    };
    for (body, needle) in [
        (with("url", json!("not a url")), "`url`"),
        (with("url", json!("ftp://127.0.0.1/x")), "http"),
        (
            with("url", json!("http://user:pw@127.0.0.1/x")),
            "credentials",
        ),
        (with("url", json!("http://10.0.0.1/hook")), "not allowed"),
        (
            with("url", json!("http://169.254.169.254/latest")),
            "not allowed",
        ),
        (with("url", json!("http://[::1]:9/hook")), "not allowed"),
        (
            with("url", json!("http://other.example/hook")),
            "not allowed",
        ),
        (with("channels", json!([])), "`channels`"),
        (with("channels", json!(["a*b"])), "invalid channel pattern"),
        (
            with("channels", json!(["ok", "sp ace"])),
            "invalid channel pattern",
        ),
        (with("secret", json!("x".repeat(257))), "`secret`"),
        (with("secret", json!("short")), "`secret`"),
        (with("timeout_ms", json!(5)), "`timeout_ms`"),
        (with("timeout_ms", json!(10_000_000)), "`timeout_ms`"),
        (with("max_attempts", json!(0)), "`max_attempts`"),
        (with("max_attempts", json!(1.5)), "`max_attempts`"),
    ] {
        let (status, code, message) = error(create_webhook(&app, body.clone()).await).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_input"),
            "{body}: {message}"
        );
        assert!(
            message.contains(needle),
            "{body}: `{message}` should mention {needle}"
        );
    }
    for body in [
        json!([good()]),
        json!({"url": "http://127.0.0.1/"}),
        json!("x"),
    ] {
        let (status, _, message) = error(create_webhook(&app, body.clone()).await).await;
        assert_eq!(status, 400, "{body}: {message}");
    }
    // A listed name needs no DNS; integral floats are integers.
    let res = create_webhook(&app, with("url", json!("http://hooks.internal:8080/x"))).await;
    assert_eq!(res.status(), 201);
    let res = create_webhook(&app, with("timeout_ms", json!(1000.0))).await;
    assert_eq!(res.status(), 201);

    // Who may call it.
    let no_admin = hs256(&json!({"sub": "app", "exp": now() + 60, "channels": {"publish": ["*"]}}));
    let res = app
        .http
        .post(app.url("/api/v1/webhooks"))
        .bearer_auth(&no_admin)
        .json(&good())
        .send()
        .await
        .unwrap();
    let (status, code, message) = error(res).await;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    assert!(message.contains("admin"), "{message}");
    let res = app
        .http
        .get(app.url("/api/v1/webhooks"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "ops", "exp": now() + 60, "admin": true}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-server-secret-0123456789").unwrap(),
    )
    .unwrap();
    let res = app
        .http
        .get(app.url("/api/v1/webhooks"))
        .bearer_auth(forged)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // Ids and deliveries that do not exist.
    for (method, path, status) in [
        ("GET", "/api/v1/webhooks/wh_missing", 404),
        ("DELETE", "/api/v1/webhooks/wh_missing", 404),
        ("GET", "/api/v1/webhooks/bad%20id", 400),
        ("GET", "/api/v1/webhooks/wh_missing/dead-deliveries", 404),
        (
            "POST",
            "/api/v1/webhooks/wh_missing/dead-deliveries/retry",
            404,
        ),
        (
            "POST",
            "/api/v1/webhooks/wh_missing/dead-deliveries/not-a-uuid/retry",
            400,
        ),
    ] {
        let res = app
            .http
            .request(method.parse().unwrap(), app.url(path))
            .bearer_auth(admin_token())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), status, "{method} {path}");
    }
    // Listed without secrets; deleted.
    let (_, list) = get_admin(&app, "/api/v1/webhooks").await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains(HOOK_SECRET));
    let id = list["webhooks"][0]["id"].as_str().unwrap();
    let res = app
        .http
        .delete(app.url(&format!("/api/v1/webhooks/{id}")))
        .bearer_auth(admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let (_, list) = get_admin(&app, "/api/v1/webhooks").await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 1);
}

/// `webhooks.max_webhooks` is a hard limit (409), and the default policy refuses loopback.
#[tokio::test]
async fn the_webhook_limit_and_the_default_host_policy() {
    let app = spawn_app_on(Backend::Embedded, |s| {
        required(s);
        s.webhooks.max_webhooks = 1;
    })
    .await;
    let body = |url: &str| json!({"url": url, "channels": ["a"], "secret": HOOK_SECRET});
    let (status, _, message) = error(create_webhook(&app, body("http://127.0.0.1:9/")).await).await;
    assert_eq!(status, 400);
    assert!(message.contains("allowed_hosts"), "{message}");
    let (status, _, _) = error(create_webhook(&app, body("http://localhost:9/")).await).await;
    assert_eq!(status, 400);
    // A public literal passes without DNS.
    assert_eq!(
        create_webhook(&app, body("https://93.184.215.14/x"))
            .await
            .status(),
        201
    );
    let (status, code, message) =
        error(create_webhook(&app, body("https://93.184.215.15/x")).await).await;
    assert_eq!((status, code.as_str()), (409, "conflict"), "{message}");
}

/// With `auth.mode = disabled` the webhook API is closed unless explicitly opened.
#[tokio::test]
async fn without_authentication_the_api_is_closed_by_default() {
    let app = spawn_app_on(Backend::Embedded, |_| {}).await;
    assert_eq!(app.settings.auth.mode, relay::config::AuthMode::Disabled);
    let res = app
        .http
        .get(app.url("/api/v1/webhooks"))
        .send()
        .await
        .unwrap();
    let (status, _, message) = error(res).await;
    assert_eq!(status, 403);
    assert!(message.contains("allow_unauthenticated_api"), "{message}");
    let open = spawn_app_on(Backend::Embedded, |s| {
        s.webhooks.allow_unauthenticated_api = true;
    })
    .await;
    let res = open
        .http
        .get(open.url("/api/v1/webhooks"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// Every webhook metric exists from startup, at zero.
#[tokio::test]
async fn webhook_metrics_are_exported_from_startup() {
    let app = spawn_app_on(Backend::Embedded, |_| {}).await;
    let metrics = app.metrics().await;
    for name in [
        "relay_webhook_deliveries_attempted_total",
        "relay_webhook_deliveries_succeeded_total",
        "relay_webhook_deliveries_failed_total",
        "relay_webhook_deliveries_dead_total",
        "relay_webhook_deliveries_dropped_total",
        "relay_webhook_queue_depth",
        "relay_webhook_dead_deliveries",
        "relay_webhook_deliveries_in_flight",
    ] {
        assert!(metrics.has(name), "{name} is missing");
    }
}

/// The Python and Node receiver snippets of docs/webhooks.md accept a signature relay really
/// sent, and refuse it for a changed body.
#[tokio::test]
async fn the_documented_receiver_snippets_verify_a_real_signature() {
    let receiver = Receiver::start(Plan::default()).await;
    let app = spawn_app_on(Backend::Embedded, fast).await;
    webhook(&app, &receiver.url(), &["docs"], json!({})).await;
    publish(&app, "docs", json!({"text": "héllo", "n": [1, 2.5]})).await;
    receiver
        .wait_for(Duration::from_secs(10), |r| r.len() == 1)
        .await;
    let sent = &receiver.answered()[0];
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/webhooks.md")).unwrap();
    let dir =
        std::env::temp_dir().join(format!("relay-snippets-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let body_file = dir.join("body");
    std::fs::write(&body_file, &sent.body).unwrap();
    let tampered_file = dir.join("tampered");
    let mut tampered = sent.body.to_vec();
    tampered.push(b' ');
    std::fs::write(&tampered_file, &tampered).unwrap();
    for (lang, program, harness) in [
        (
            "python",
            "python3",
            "\nimport os, sys\nbody = open(os.environ['BODY'], 'rb').read()\nprint('ok' if verify(os.environ['SECRET'], os.environ['SIGNATURE'], body) else 'refused')\n",
        ),
        (
            "js",
            "node",
            "\nconst body = require('fs').readFileSync(process.env.BODY);\nconsole.log(verify(process.env.SECRET, process.env.SIGNATURE, body) ? 'ok' : 'refused');\n",
        ),
    ] {
        let snippet = code_block(&doc, lang);
        let script = dir.join(format!("verify.{}", if lang == "js" { "js" } else { "py" }));
        std::fs::write(&script, format!("{snippet}{harness}")).unwrap();
        for (file, expected) in [(&body_file, "ok"), (&tampered_file, "refused")] {
            let output = std::process::Command::new(program)
                .arg(&script)
                .env("BODY", file)
                .env("SECRET", HOOK_SECRET)
                .env("SIGNATURE", &sent.signature)
                .output()
                .unwrap_or_else(|e| {
                    panic!("`{program}` must be installed for this test (.ci/run installs it): {e}")
                });
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success(),
                "{program}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert_eq!(
                stdout.trim(),
                expected,
                "{lang} snippet on {}",
                file.display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    // The Rust snippet is `relay::webhooks::signature::verify`, tested in the crate.
    assert!(code_block(&doc, "rust").contains("fn verify"));
    let _ = SECRET;
}

/// The first fenced block of `lang` in a Markdown text.
fn code_block(doc: &str, lang: &str) -> String {
    let fence = format!("```{lang}\n");
    let start = doc
        .find(&fence)
        .unwrap_or_else(|| panic!("docs/webhooks.md has no ```{lang} block"))
        + fence.len();
    let end = doc[start..].find("\n```").expect("the block ends") + start;
    doc[start..end].to_owned()
}

/// Delivery throughput to a local receiver answering at once and after 50 ms, and the most
/// requests in flight observed. Prints figures; asserts only that everything arrived.
/// `cargo test --release --test api webhooks::throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it by hand (docs/webhooks.md)"]
async fn throughput() {
    let messages: usize = std::env::var("WEBHOOK_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    for (label, delay, max_in_flight) in [
        ("0 ms", Duration::ZERO, 64usize),
        ("50 ms", Duration::from_millis(50), 64),
        ("50 ms", Duration::from_millis(50), 256),
    ] {
        {
            let receiver = Receiver::start(Plan {
                delay,
                ..Plan::default()
            })
            .await;
            let app = spawn_app_on(Backend::Services, |s| {
                fast(s);
                s.webhooks.max_in_flight = max_in_flight;
                s.limits.publish_per_subject = 0;
            })
            .await;
            webhook(&app, &receiver.url(), &["bench:*"], json!({})).await;
            // Publish first with the dispatcher's work queued, then time the drain alone.
            let started = Instant::now();
            for chunk in 0..messages.div_ceil(1000) {
                let n = (messages - chunk * 1000).min(1000);
                let items: Vec<Value> = (0..n)
                    .map(|i| json!({"channel": format!("bench:{}", i % 16), "data": i}))
                    .collect();
                assert_eq!(publish_batch(&app, json!(items)).await.status(), 201);
            }
            receiver
                .wait_for(Duration::from_secs(600), |r| r.len() >= messages)
                .await;
            let took = started.elapsed();
            println!(
                "webhook throughput, receiver {label}, max_in_flight {max_in_flight}: {messages} deliveries in {:.2} s = {:.0} deliveries/s; most in flight observed {}",
                took.as_secs_f64(),
                messages as f64 / took.as_secs_f64(),
                receiver.max_in_flight()
            );
        }
    }
}

/// The Postgres outbox's claim rules, driven directly: a claim hides a delivery from other
/// claims until its lease passes, then the next claim takes it over and the expired claim can
/// no longer record an outcome (a success always counts).
#[tokio::test]
async fn postgres_claims_expire_and_stale_outcomes_are_refused() {
    use relay::store::outbox::{HookCache, Outbox, Settle};
    let app = spawn_app_on(Backend::Services, |s| {
        fast(s);
        s.webhooks.enabled = false;
    })
    .await;
    let receiver = Receiver::start(Plan::default()).await;
    webhook(&app, &receiver.url(), &["lease"], json!({})).await;
    publish(&app, "lease", json!(1)).await;
    let outbox = Outbox::new(app.store.clone(), Arc::new(HookCache::default()));
    assert_eq!(outbox.depth().await.unwrap(), (1, 0));
    let first = outbox.claim(10, Duration::from_millis(200)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert!(
        outbox
            .claim(10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty(),
        "leased"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = outbox.claim(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(second.len(), 1, "the expired lease is taken over");
    assert_eq!(second[0].id, first[0].id);
    let retry = Settle::Retry {
        after: Duration::ZERO,
        status: Some(503),
        error: "HTTP 503".into(),
    };
    assert!(
        !outbox.settle(&first[0], &retry).await.unwrap(),
        "stale claim"
    );
    assert!(outbox.settle(&second[0], &retry).await.unwrap());
    let third = outbox.claim(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(third[0].attempts, 1);
    assert_eq!(
        outbox
            .release(&[(third[0].id, third[0].lease)])
            .await
            .unwrap(),
        1
    );
    let fourth = outbox.claim(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(fourth[0].attempts, 1, "a release is not an attempt");
    // A success recorded by the stale claim still removes the delivery.
    assert!(outbox.settle(&first[0], &Settle::Delivered).await.unwrap());
    assert_eq!(outbox.depth().await.unwrap(), (0, 0));
}
