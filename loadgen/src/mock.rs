//! Tests of the publish paths against a fake relay that speaks the issue-15 contract (single and
//! batch HTTP publishes, pipelined WebSocket publishes with `ref`/`ack`, idempotency keys) and
//! misbehaves on purpose: refusals with 503, answers lost after the commit, random commit delays,
//! a dropped connection. It records what it committed per channel and writer (the stamp's `w`),
//! so the tests check what subscribers would: every writer's sequence numbers committed once
//! each, in order.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    args::Args,
    publisher::{self, Published, one_writer_each},
};

/// How the fake misbehaves (0 = never).
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    /// Every n-th request: `503 unavailable`, nothing stored.
    refuse_every: u64,
    /// Every n-th request: stored, then no answer (the client times out).
    lose_answer_every: u64,
    /// Up to this many µs before each commit (requests in flight race).
    jitter_us: u64,
    /// ws: every n-th publish gets a `rate_limited` error frame, nothing stored.
    ws_error_every: u64,
    /// ws: after the n-th publish frame is stored, drop the connection without answering it.
    ws_drop_after: u64,
}

#[derive(Default)]
struct Store {
    /// Per channel and writer (`w`, absent = 0), the `s` of each committed message in commit
    /// order.
    committed: HashMap<(String, u64), Vec<u64>>,
    keys: HashSet<String>,
    replays: u64,
}

struct Fake {
    faults: Faults,
    requests: AtomicU64,
    /// Requests between arrival and commit right now, and the most there ever were.
    committing: AtomicU64,
    most_committing: AtomicU64,
    store: Mutex<Store>,
}

/// Counts a request in [`Fake::committing`] while it lives (also if its future is dropped).
struct Committing<'a>(&'a Fake);

impl<'a> Committing<'a> {
    fn new(fake: &'a Fake) -> Self {
        let now = fake.committing.fetch_add(1, Ordering::Relaxed) + 1;
        fake.most_committing.fetch_max(now, Ordering::Relaxed);
        Self(fake)
    }
}

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        self.0.committing.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Fake {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn nth(&self) -> u64 {
        self.requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    async fn jitter(&self) {
        if self.faults.jitter_us > 0 {
            let us = fastrand::u64(..self.faults.jitter_us);
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
    }

    /// Commit `(channel, data, key)` items atomically; per item whether it was a replay.
    fn commit(&self, items: &[(String, Value, Option<String>)]) -> Vec<bool> {
        let mut store = self.store();
        let mut replayed = Vec::new();
        for (channel, data, key) in items {
            if let Some(key) = key {
                // Keys are scoped to the channel in relay; ours embed the channel already.
                if !store.keys.insert(key.clone()) {
                    store.replays += 1;
                    replayed.push(true);
                    continue;
                }
            }
            let s = data["s"].as_u64().unwrap_or(u64::MAX);
            let w = data["w"].as_u64().unwrap_or(0);
            store
                .committed
                .entry((channel.clone(), w))
                .or_default()
                .push(s);
            replayed.push(false);
        }
        replayed
    }

    /// Every writer of every channel committed 0..n in order: n per (channel, writer).
    fn committed_in_order_per_writer(&self) -> HashMap<(String, u64), u64> {
        let store = self.store();
        let mut out = HashMap::new();
        for ((channel, w), seqs) in &store.committed {
            let expected: Vec<u64> = (0..seqs.len() as u64).collect();
            assert_eq!(
                seqs, &expected,
                "{channel} writer {w} committed out of order or twice"
            );
            out.insert((channel.clone(), *w), seqs.len() as u64);
        }
        out
    }

    /// As [`Self::committed_in_order_per_writer`], summed per channel.
    fn committed_in_order(&self) -> HashMap<String, u64> {
        let mut out = HashMap::new();
        for ((channel, _), n) in self.committed_in_order_per_writer() {
            *out.entry(channel).or_default() += n;
        }
        out
    }
}

fn error(status: StatusCode, code: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": code}})),
    )
        .into_response()
}

/// Decide the fate of one request: `Some(response)` to answer without committing.
fn refusal(fake: &Fake, n: u64) -> Option<Response> {
    let f = fake.faults;
    (f.refuse_every > 0 && n.is_multiple_of(f.refuse_every))
        .then(|| error(StatusCode::SERVICE_UNAVAILABLE, "unavailable"))
}

async fn lose_answer(fake: &Fake, n: u64) {
    let f = fake.faults;
    if f.lose_answer_every > 0 && n.is_multiple_of(f.lose_answer_every) {
        // Longer than any test's --request-timeout; the client gives up and the future is
        // dropped with the connection.
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
}

async fn single(
    State(fake): State<Arc<Fake>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let n = fake.nth();
    if let Some(refused) = refusal(&fake, n) {
        return refused;
    }
    let Ok(body) = serde_json::from_str::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "invalid_body");
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(|k| format!("{channel}/{k}"));
    let committing = Committing::new(&fake);
    fake.jitter().await;
    let replayed = fake.commit(&[(channel.clone(), body["data"].clone(), key)])[0];
    drop(committing);
    lose_answer(&fake, n).await;
    let mut answer = json!({"channel": channel, "id": 1, "created_at": "2025-01-01T00:00:00Z"});
    if replayed {
        answer["replayed"] = json!(true);
    }
    let header = [(
        "idempotent-replayed",
        if replayed { "true" } else { "false" },
    )];
    (StatusCode::CREATED, header, axum::Json(answer)).into_response()
}

async fn batch(State(fake): State<Arc<Fake>>, body: String) -> Response {
    let n = fake.nth();
    if let Some(refused) = refusal(&fake, n) {
        return refused;
    }
    let Ok(body) = serde_json::from_str::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "invalid_body");
    };
    let items: Vec<(String, Value, Option<String>)> = body["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|item| {
            let channel = item["channel"].as_str().unwrap_or("?").to_owned();
            let key = item["idempotency_key"]
                .as_str()
                .map(|k| format!("{channel}/{k}"));
            (channel, item["data"].clone(), key)
        })
        .collect();
    fake.jitter().await;
    let replayed = fake.commit(&items);
    lose_answer(&fake, n).await;
    let answers: Vec<Value> = items
        .iter()
        .zip(replayed)
        .map(|((channel, _, _), replayed)| {
            let mut a = json!({"channel": channel, "id": 1, "created_at": "x"});
            if replayed {
                a["replayed"] = json!(true);
            }
            a
        })
        .collect();
    (
        StatusCode::CREATED,
        axum::Json(json!({ "messages": answers })),
    )
        .into_response()
}

/// Serve the fake's HTTP API on a free port.
async fn serve_http(fake: Arc<Fake>) -> SocketAddr {
    let app = Router::new()
        .route("/api/v1/channels/{channel}/messages", post(single))
        .route("/api/v1/messages", post(batch))
        .with_state(fake);
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(err) => panic!("bind: {err}"),
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(err) => panic!("local_addr: {err}"),
    };
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// Serve pipelined WebSocket publishes: frames handled one at a time in order, like relay's
/// per-connection commit order, each answered by `ack` (or `error`) with its ref.
async fn serve_ws(fake: Arc<Fake>) -> SocketAddr {
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(err) => panic!("bind: {err}"),
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(err) => panic!("local_addr: {err}"),
    };
    let frames = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let fake = Arc::clone(&fake);
            let frames = Arc::clone(&frames);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    let Message::Text(text) = msg else { continue };
                    let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    let n = frames.fetch_add(1, Ordering::Relaxed) + 1;
                    let f = fake.faults;
                    let r = frame["ref"].clone();
                    let channel = frame["channel"].as_str().unwrap_or("?").to_owned();
                    let key = frame["idempotency_key"]
                        .as_str()
                        .map(|k| format!("{channel}/{k}"));
                    // A repeat of a committed publish is answered as such, never refused: a
                    // refusal would hide that it was committed.
                    let repeat = key.as_ref().is_some_and(|k| fake.store().keys.contains(k));
                    if !repeat && f.ws_error_every > 0 && n.is_multiple_of(f.ws_error_every) {
                        let e =
                            json!({"type":"error","code":"rate_limited","message":"slow","ref":r});
                        let _ = ws.send(Message::Text(e.to_string().into())).await;
                        continue;
                    }
                    let replayed = fake.commit(&[(channel.clone(), frame["data"].clone(), key)])[0];
                    if f.ws_drop_after > 0 && n == f.ws_drop_after {
                        // Committed, never answered: the connection just goes.
                        return;
                    }
                    let mut ack = json!({"type":"ack","ref":r,"channel":channel,"id":1});
                    if replayed {
                        ack["replayed"] = json!(true);
                    }
                    if ws
                        .send(Message::Text(ack.to_string().into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Options for a run against `addr`, `extra` split at spaces.
fn args(addr: SocketAddr, extra: &str) -> Args {
    use clap::Parser;
    let url = format!("http://{addr}");
    let mut argv = vec!["relay-loadgen", "--url", url.as_str()];
    argv.extend(extra.split_whitespace());
    let args = match Args::try_parse_from(&argv) {
        Ok(a) => a,
        Err(err) => panic!("{argv:?}: {err}"),
    };
    if let Err(err) = args.validate() {
        panic!("{argv:?}: {err}");
    }
    args
}

async fn publish(args: &Args) -> Published {
    let channels = args.channel_names();
    match publisher::run(args, &channels, args.total_messages()).await {
        Ok(p) => p,
        Err(err) => panic!("publish: {err}"),
    }
}

fn fake(faults: Faults) -> Arc<Fake> {
    Arc::new(Fake {
        faults,
        requests: AtomicU64::new(0),
        committing: AtomicU64::new(0),
        most_committing: AtomicU64::new(0),
        store: Mutex::new(Store::default()),
    })
}

/// Per channel what the report says was published, by channel name.
fn by_name(args: &Args, counts: &[u64]) -> HashMap<String, u64> {
    args.channel_names()
        .into_iter()
        .zip(counts.iter().copied())
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_idempotent_retries_commit_every_message_once_in_order() {
    let fake = fake(Faults {
        refuse_every: 13,
        lose_answer_every: 37,
        jitter_us: 300,
        ..Faults::default()
    });
    let addr = serve_http(Arc::clone(&fake)).await;
    let args = args(
        addr,
        "--publish-via http --channels 5 --messages 300 --rate 5000 --idempotency --request-timeout 300ms",
    );
    let p = publish(&args).await;
    let committed = fake.committed_in_order();
    assert_eq!(p.errors, 0, "{:?}", p.error_kinds);
    assert_eq!((p.total(), p.committed, p.requests), (300, 300, 300));
    assert_eq!(by_name(&args, &p.per_channel), committed);
    assert_eq!(p.numbered, one_writer_each(&p.per_channel));
    // Every lost answer was retried and answered as a replay; every refusal retried. (The fake
    // counts more if a retry's answer was lost again: the client sees only the last one.)
    assert!(p.replays > 0, "no replays");
    assert!(p.replays <= fake.store().replays, "{} replays", p.replays);
    assert!(p.retries > p.replays, "{} retries", p.retries);
    assert_eq!(p.latency.len(), 300);
    // A retry after a timeout counts from the first attempt.
    assert!(p.latency.max() >= 300_000, "max {} µs", p.latency.max());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_writers_share_channels_and_each_commits_once_in_order() {
    let fake = fake(Faults {
        refuse_every: 13,
        lose_answer_every: 37,
        jitter_us: 2_000,
        ..Faults::default()
    });
    let addr = serve_http(Arc::clone(&fake)).await;
    // Three writers per channel, whose requests race at the fake.
    let args = args(
        addr,
        "--publish-via http --channels 3 --http-concurrency 9 --messages 900 --rate 20000 --idempotency --request-timeout 300ms",
    );
    let p = publish(&args).await;
    let committed = fake.committed_in_order_per_writer();
    assert_eq!(p.errors, 0, "{:?}", p.error_kinds);
    assert_eq!((p.total(), p.committed, p.requests), (900, 900, 900));
    let mut numbered = HashMap::new();
    for (ch, name) in args.channel_names().into_iter().enumerate() {
        assert_eq!(p.numbered[ch].len(), args.writers_on(ch), "{name}");
        assert_eq!(p.numbered[ch].len(), 3, "{name}");
        assert_eq!(p.numbered_on(ch), p.per_channel[ch], "{name}");
        for (k, &n) in p.numbered[ch].iter().enumerate() {
            numbered.insert((name.clone(), k as u64), n);
        }
    }
    // Round robin over 9 writers: 100 messages each, all committed once and in order.
    assert!(numbered.values().all(|&n| n == 100), "{numbered:?}");
    assert_eq!(numbered, committed);
    assert!(p.replays > 0 && p.retries > p.replays, "{p:?}");
    // More requests were being committed at once than there are channels.
    let most = fake.most_committing.load(Ordering::Relaxed);
    assert!(most > 3, "at most {most} requests at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_flight_never_share_a_channel_and_retry_idempotently() {
    let fake = fake(Faults {
        refuse_every: 11,
        lose_answer_every: 29,
        jitter_us: 2_000,
        ..Faults::default()
    });
    let addr = serve_http(Arc::clone(&fake)).await;
    let args = args(
        addr,
        "--publish-via batch --channels 10 --http-concurrency 3 --batch-size 7 --messages 2000 --rate 20000 --idempotency --request-timeout 300ms",
    );
    let p = publish(&args).await;
    let committed = fake.committed_in_order();
    assert_eq!(p.errors, 0, "{:?}", p.error_kinds);
    assert_eq!((p.total(), p.committed), (2000, 2000));
    assert_eq!(by_name(&args, &p.per_channel), committed);
    // 2000 / 7 per slot rounded up, the last one of each slot partial.
    assert!((286..=288).contains(&p.requests), "{} requests", p.requests);
    assert!(p.replays <= fake.store().replays, "{} replays", p.replays);
    assert!(
        p.replays >= 7,
        "{} replays (a lost answer replays a whole batch)",
        p.replays
    );
    assert!(p.retries > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_batches_hand_their_numbers_back_without_idempotency() {
    let fake = fake(Faults {
        refuse_every: 5,
        jitter_us: 500,
        ..Faults::default()
    });
    let addr = serve_http(Arc::clone(&fake)).await;
    let args = args(
        addr,
        "--publish-via batch --channels 6 --http-concurrency 2 --batch-size 10 --messages 600 --rate 20000",
    );
    let p = publish(&args).await;
    // Gapless per channel although a fifth of the batches were refused.
    let committed = fake.committed_in_order();
    assert_eq!(by_name(&args, &p.per_channel), committed);
    assert_eq!(
        p.numbered,
        one_writer_each(&p.per_channel),
        "refused numbers were reused"
    );
    assert!(p.errors >= 100, "{} errors", p.errors);
    assert_eq!(p.total() + p.errors, 600);
    assert_eq!(
        p.error_kinds.get("batch: status 503 unavailable"),
        Some(&p.errors),
        "{:?}",
        p.error_kinds
    );
    assert_eq!((p.retries, p.replays), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_ws_matches_acks_counts_errors_and_resends_after_a_drop() {
    let fake = fake(Faults {
        ws_error_every: 50,
        ws_drop_after: 333,
        ..Faults::default()
    });
    let addr = serve_ws(Arc::clone(&fake)).await;
    let args = args(
        addr,
        "--publish-via ws --pipeline 64 --channels 4 --messages 1000 --rate 20000 --idempotency",
    );
    let p = publish(&args).await;
    let store = fake.store();
    let mut committed_total = 0;
    for ((channel, _), seqs) in &store.committed {
        // Refused publishes leave holes, but nothing twice and nothing backwards.
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{channel}: {seqs:?}");
        committed_total += seqs.len() as u64;
    }
    let refused = p
        .error_kinds
        .get("ws: error frame `rate_limited`")
        .copied()
        .unwrap_or(0);
    assert!(refused >= 15, "{:?}", p.error_kinds);
    assert_eq!(p.errors, refused, "{:?}", p.error_kinds);
    assert_eq!(p.total(), committed_total);
    assert_eq!(p.total() + refused, 1000);
    assert_eq!(p.numbered.iter().flatten().sum::<u64>(), 1000);
    // The publishes in flight at the drop were resent; the one committed there was replayed.
    assert!(p.retries >= 1, "{} retries", p.retries);
    assert_eq!(p.replays, store.replays);
    assert!(p.replays >= 1, "no replay after the drop");
    assert_eq!(p.latency.len(), p.total());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_ws_without_idempotency_stops_at_a_drop() {
    let fake = fake(Faults {
        ws_drop_after: 100,
        ..Faults::default()
    });
    let addr = serve_ws(Arc::clone(&fake)).await;
    let args = args(
        addr,
        "--publish-via ws --pipeline 16 --channels 2 --messages 1000 --rate 20000",
    );
    let p = publish(&args).await;
    // At most the 99 answered before the drop: acks still unread when the connection breaks
    // can be lost with it (a reset discards them).
    assert!(p.total() <= 99, "{} acked", p.total());
    assert_eq!(p.retries, 0);
    let unacked: u64 = p
        .error_kinds
        .iter()
        .filter(|(k, _)| k.starts_with("ws: unacknowledged"))
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(p.errors, unacked, "{:?}", p.error_kinds);
    // The window held everything unanswered, the dropped publish included.
    assert!((1..=16).contains(&unacked), "{:?}", p.error_kinds);
    assert!(p.total() + unacked >= 100, "{} + {unacked}", p.total());
    // Unanswered publishes keep their numbers: subscribers expect them.
    assert_eq!(
        p.numbered.iter().flatten().sum::<u64>(),
        p.total() + unacked
    );
}

/// The generator's own ceiling: the real http, batch and pipelined-ws publish paths against a
/// fake that answers at once, on one thread whose CPU time is measured (the fake runs on another
/// thread). Prints msg/s and µs of client CPU per request. Not a pass/fail test:
/// `cargo test --release -p relay-loadgen client_ceiling -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement; run it on an idle machine"]
fn client_ceiling() {
    fn thread_cpu() -> f64 {
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage only writes the struct we pass.
        unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
        let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        secs(u.ru_utime) + secs(u.ru_stime)
    }
    // The fake on its own thread and runtime.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(err) => panic!("runtime: {err}"),
        };
        rt.block_on(async {
            let http = serve_http(fake(Faults::default())).await;
            let ws = serve_ws(fake(Faults::default())).await;
            let _ = tx.send((http, ws));
            std::future::pending::<()>().await;
        });
    });
    let Ok((http, ws)) = rx.recv() else {
        panic!("the fake did not start");
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => panic!("runtime: {err}"),
    };
    let runs = [
        (
            http,
            "--publish-via http --channels 50 --messages 60000 --rate 1000000",
        ),
        (
            http,
            "--publish-via batch --channels 50 --batch-size 100 --messages 400000 --rate 10000000",
        ),
        (
            ws,
            "--publish-via ws --pipeline 256 --channels 50 --messages 200000 --rate 10000000",
        ),
    ];
    for (addr, options) in runs {
        let args = args(addr, options);
        let cpu = thread_cpu();
        let p = rt.block_on(publish(&args));
        let cpu = thread_cpu() - cpu;
        assert_eq!(p.errors, 0, "{:?}", p.error_kinds);
        let secs = p.elapsed.as_secs_f64();
        println!(
            "{options}: {:.0} msg/s, {:.0} requests/s; client CPU {cpu:.2} s of {secs:.2} s = \
             {:.2} µs per request, {:.2} µs per message",
            p.committed as f64 / secs,
            p.requests as f64 / secs,
            cpu * 1e6 / p.requests as f64,
            cpu * 1e6 / p.committed as f64,
        );
    }
}
