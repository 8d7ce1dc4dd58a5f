//! The HTTP side of the publisher, shared by `--publish-via http` and `batch`: one reqwest client
//! whose keep-alive connections are reused, one POST attempt turned into an [`Answer`] or a
//! [`Failure`], and the http mode itself (one task per writer).
//!
//! http mode runs --http-concurrency *writers* (default: one per channel), each with exactly one
//! request in flight; writer w publishes on channel `w mod channels`. Concurrent POSTs to one
//! channel may commit in either order, so order is defined per writer only: each numbers its own
//! messages, and with more writers than channels the stamp names the writer within its channel
//! (`"w"`, and the idempotency key too) so that subscribers check each writer's sequence on its
//! own. The ceiling is `writers / request latency` (50 channels with 100 writers at 4 ms =
//! 25,000 msg/s), just `channels / request latency` by default; the client's own cost is about
//! 14 µs of CPU per request (see `client_ceiling` in mock.rs and docs/loadgen.md).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{
    args::Args,
    publisher::{Published, Schedule},
    retry::{Failure, new_run_id, retrying, write_key},
    stats::{new_histogram, padding, write_stamp},
    sys::now_micros,
};

/// What every HTTP publishing task shares.
pub struct HttpCtx {
    pub client: reqwest::Client,
    /// 1 without --idempotency.
    pub max_attempts: u32,
    /// `Some` with --idempotency: the first part of every key.
    pub run_id: Option<String>,
    /// Request latency of every task (one lock per answered request: cheap next to a request,
    /// and one histogram per channel would cost ~200 KiB each).
    latency: Mutex<Histogram<u64>>,
}

impl HttpCtx {
    pub fn new(args: &Args) -> Result<Self, String> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = &args.token {
            let bearer = format!("Bearer {token}")
                .parse()
                .map_err(|_| "--token is not a valid header value".to_owned())?;
            headers.insert(reqwest::header::AUTHORIZATION, bearer);
        }
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/json"),
        );
        // HTTP/1.1 (the crate is built without h2), keep-alive: the pool keeps one connection
        // per request in flight, so after the first round no request waits for a handshake.
        // reqwest has rustls without a provider of its own: a client built before the process
        // default is installed would panic (main installs ring first; tests build clients too).
        crate::install_crypto_provider();
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .timeout(args.request_timeout)
            .default_headers(headers)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            client,
            max_attempts: args.max_attempts(),
            run_id: args.idempotency.then(new_run_id),
            latency: Mutex::new(new_histogram()),
        })
    }

    pub fn record_latency(&self, started: Instant) {
        self.latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .saturating_record(started.elapsed().as_micros() as u64);
    }

    /// The latency of every task so far.
    pub fn latency(&self) -> Histogram<u64> {
        self.latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `url` as a parsed URL (parsed once per task, not once per request).
    pub fn url(base: &str, path: &str) -> Result<reqwest::Url, String> {
        let url = format!("{base}{path}");
        reqwest::Url::parse(&url).map_err(|e| format!("--url: `{url}`: {e}"))
    }
}

/// A `201 Created` answer.
#[derive(Debug)]
pub struct Answer {
    /// `Idempotent-Replayed: true`.
    pub replayed_header: bool,
    pub body: Bytes,
}

/// One POST of `body`, with `Idempotency-Key: key` if given.
pub async fn post(
    client: &reqwest::Client,
    url: &reqwest::Url,
    body: Bytes,
    key: Option<&str>,
) -> Result<Answer, Failure> {
    let mut request = client.post(url.clone()).body(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.map_err(classify)?;
    let status = response.status();
    let replayed_header = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    // Read the body in any case, so the connection goes back to the pool.
    let body = response.bytes().await.map_err(classify)?;
    if status == reqwest::StatusCode::CREATED {
        Ok(Answer {
            replayed_header,
            body,
        })
    } else if status.is_success() {
        Err(Failure::BadAnswer(format!(
            "status {} instead of 201",
            status.as_u16()
        )))
    } else {
        Err(Failure::Status {
            status: status.as_u16(),
            code: error_code(&body),
        })
    }
}

/// A short, groupable description of a failed request (without the URL, which differs per
/// channel).
fn classify(err: reqwest::Error) -> Failure {
    if err.is_timeout() {
        return Failure::Timeout;
    }
    if err.is_connect() {
        return Failure::Connect;
    }
    // The innermost cause says what happened (e.g. "connection reset by peer").
    let mut cause: &dyn std::error::Error = &err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let text = if std::ptr::addr_eq(cause, &err) {
        err.without_url().to_string()
    } else {
        cause.to_string()
    };
    Failure::Network(text)
}

/// `{"error":{"code":"…"}}` → the code.
pub fn error_code(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Body {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        code: String,
    }
    serde_json::from_slice::<Body>(body)
        .ok()
        .map(|b| b.error.code)
}

/// `"replayed": true` in a single publish's answer body.
fn body_says_replayed(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct One {
        #[serde(default)]
        replayed: bool,
    }
    serde_json::from_slice::<One>(body).is_ok_and(|b| b.replayed)
}

/// Publish `total` messages with one POST per message, one in flight per writer.
pub async fn run(
    args: &Args,
    channels: &[String],
    total: u64,
    out: &mut Published,
) -> Result<(), String> {
    let ctx = Arc::new(HttpCtx::new(args)?);
    let base = args.http_base();
    let urls = channels
        .iter()
        .map(|name| HttpCtx::url(&base, &format!("/api/v1/channels/{name}/messages")))
        .collect::<Result<Vec<_>, _>>()?;
    let writers = args.http_concurrency();
    // With one writer per channel the stamps and keys stay exactly as they always were.
    let named = writers > channels.len();
    let mut ticks = Vec::new();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let ch = w % channels.len();
        let writer = named.then_some(w / channels.len());
        let (tx, rx) = mpsc::unbounded_channel::<()>();
        ticks.push(tx);
        tasks.push(tokio::spawn(post_writer(
            Arc::clone(&ctx),
            channels[ch].clone(),
            writer,
            urls[ch].clone(),
            padding(args.payload_bytes, writer),
            rx,
        )));
    }
    let started = Instant::now();
    let mut schedule = Schedule::new(args.rate, total);
    let mut turn = 0;
    while let Some(n) = schedule.next_burst().await {
        for _ in 0..n {
            // A writer task only ends when its sender is dropped.
            let _ = ticks[turn].send(());
            turn = (turn + 1) % ticks.len();
        }
    }
    drop(ticks);
    // Writers in order of w, so each channel's come in order of k: numbered[ch][k] by pushing.
    out.numbered = vec![Vec::new(); channels.len()];
    for (w, task) in tasks.into_iter().enumerate() {
        let done = task
            .await
            .map_err(|e| format!("publisher task failed: {e}"))?;
        let ch = w % channels.len();
        out.per_channel[ch] += done.published;
        out.numbered[ch].push(done.numbered);
        out.requests += done.published;
        out.retries += done.retries;
        out.replays += done.replays;
        for (kind, count) in done.errors {
            out.fail(count, kind);
        }
    }
    out.elapsed = started.elapsed();
    out.committed = out.total();
    out.latency = ctx.latency();
    Ok(())
}

/// What one writer's task achieved.
struct WriterPublished {
    published: u64,
    numbered: u64,
    retries: u64,
    replays: u64,
    errors: BTreeMap<String, u64>,
}

/// One writer: publish a message on `channel` per tick, numbered 0, 1, 2, …, with one request in
/// flight; `writer` (its index within the channel) goes into the stamps and keys if `Some`.
async fn post_writer(
    ctx: Arc<HttpCtx>,
    channel: String,
    writer: Option<usize>,
    url: reqwest::Url,
    pad: String,
    mut ticks: mpsc::UnboundedReceiver<()>,
) -> WriterPublished {
    let mut done = WriterPublished {
        published: 0,
        numbered: 0,
        retries: 0,
        replays: 0,
        errors: BTreeMap::new(),
    };
    let mut text = String::new();
    let mut key = String::new();
    while ticks.recv().await.is_some() {
        let seq = done.numbered;
        text.clear();
        text.push_str(r#"{"data":"#);
        write_stamp(&mut text, seq, writer, now_micros(), &pad);
        text.push('}');
        // Every attempt sends these very bytes: a retry with the same key must carry the same
        // body, or relay refuses it as `idempotency_key_reused`.
        let body = Bytes::copy_from_slice(text.as_bytes());
        key.clear();
        if let Some(run_id) = &ctx.run_id {
            write_key(&mut key, run_id, &channel, writer, seq);
        }
        let key = ctx.run_id.as_ref().map(|_| key.as_str());
        let started = Instant::now();
        let attempts = retrying(ctx.max_attempts, || {
            post(&ctx.client, &url, body.clone(), key)
        })
        .await;
        done.retries += u64::from(attempts.retries);
        match attempts.result {
            Ok(answer) => {
                ctx.record_latency(started);
                done.published += 1;
                done.numbered += 1;
                if answer.replayed_header || (key.is_some() && body_says_replayed(&answer.body)) {
                    done.replays += 1;
                }
            }
            Err(failure) => {
                *done.errors.entry(failure.kind("http")).or_default() += 1;
                if keeps_number(&failure, attempts.maybe_committed, key.is_some()) {
                    done.numbered += 1;
                }
                // Otherwise not committed: the next message reuses the sequence number.
            }
        }
    }
    done
}

/// Whether a message whose request finally failed keeps its sequence number (so subscribers
/// count it as lost if it never arrives) rather than handing it to the next message. With an
/// idempotency key a possibly committed message keeps it: numbering the next one the same
/// would risk a duplicate. Without a key, as before, only a surely committed one does.
pub fn keeps_number(failure: &Failure, maybe_committed: bool, idempotent: bool) -> bool {
    matches!(failure, Failure::BadAnswer(_)) || (idempotent && maybe_committed)
}
