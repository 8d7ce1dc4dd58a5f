//! The HTTP side of the publisher, shared by `--publish-via http` and `batch`: a keep-alive
//! connection per publishing task ([`Conn`]), one POST attempt turned into an [`Answer`] or a
//! [`Failure`], and the http mode itself (one task per writer).
//!
//! Each task owns its connection and drives it with hyper's connection API directly: no pool to
//! check a connection out of, no timer or redirect policy of a general-purpose client, so that
//! what the generator spends per request stays small next to what it measures (about 9 µs of
//! CPU per request against reqwest's 14; `client_ceiling` in mock.rs, docs/loadgen.md). A
//! connection that failed or timed out is dropped and the next attempt opens a new one.
//!
//! http mode runs --http-concurrency *writers* (default: one per channel), each with exactly one
//! request in flight; writer w publishes on channel `w mod channels`. Concurrent POSTs to one
//! channel may commit in either order, so order is defined per writer only: each numbers its own
//! messages, and with more writers than channels the stamp names the writer within its channel
//! (`"w"`, and the idempotency key too) so that subscribers check each writer's sequence on its
//! own. The ceiling is `writers / request latency` (50 channels with 100 writers at 4 ms =
//! 25,000 msg/s), just `channels / request latency` by default.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::{
    Request, StatusCode, Uri,
    client::conn::http1::SendRequest,
    header::{self, HeaderMap, HeaderValue},
};
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
    /// `host:port` of --url, to connect to.
    authority: String,
    /// --url's path, prefixed to every request's.
    prefix: String,
    /// `Host`, `Content-Type` and, with --token, `Authorization`: sent with every request.
    headers: HeaderMap,
    timeout: Duration,
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
        let base = args.http_base();
        let url = url::Url::parse(&base).map_err(|e| format!("--url: `{base}`: {e}"))?;
        let host = url
            .host_str()
            .ok_or_else(|| format!("--url: `{base}` has no host"))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let authority = format!("{host}:{port}");
        let mut headers = HeaderMap::new();
        let host_header = HeaderValue::from_str(&authority)
            .map_err(|_| format!("--url: `{base}`: the host is not a valid header value"))?;
        headers.insert(header::HOST, host_header);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(token) = &args.token {
            let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| "--token is not a valid header value".to_owned())?;
            headers.insert(header::AUTHORIZATION, bearer);
        }
        Ok(Self {
            authority,
            prefix: url.path().trim_end_matches('/').to_owned(),
            headers,
            timeout: args.request_timeout,
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

    /// The request target for `path` (made once per task, not once per request).
    pub fn uri(&self, path: &str) -> Result<Uri, String> {
        let target = format!("{}{path}", self.prefix);
        target
            .parse()
            .map_err(|e| format!("--url: request target `{target}`: {e}"))
    }
}

/// A `201 Created` answer.
#[derive(Debug)]
pub struct Answer {
    /// `Idempotent-Replayed: true`.
    pub replayed_header: bool,
    pub body: Bytes,
}

/// One task's keep-alive connection to relay, opened by the first request and again after one
/// failed. Shared by reference with the attempts of a request (they take turns, so its lock is
/// never contended).
#[derive(Default)]
pub struct Conn {
    sender: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl Conn {
    /// One POST of `body` to `uri`, with `Idempotency-Key: key` if given, within
    /// --request-timeout.
    pub async fn post(
        &self,
        ctx: &HttpCtx,
        uri: &Uri,
        body: Bytes,
        key: Option<&str>,
    ) -> Result<Answer, Failure> {
        let mut sender = self
            .sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let outcome =
            tokio::time::timeout(ctx.timeout, exchange(&mut sender, ctx, uri, body, key)).await;
        // A connection that failed or timed out (its answer may still come, to nobody) is not
        // kept: the next request opens another.
        let (status, headers, body) = match outcome {
            Ok(Ok(answer)) => {
                *self.sender.lock().unwrap_or_else(PoisonError::into_inner) = sender;
                answer
            }
            Ok(Err(failure)) => return Err(failure),
            Err(_) => return Err(Failure::Timeout),
        };
        let replayed_header = headers
            .get("idempotent-replayed")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        if status == StatusCode::CREATED {
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
}

/// One request and its answer on `sender`'s connection (opened first if there is none).
async fn exchange(
    sender: &mut Option<SendRequest<Full<Bytes>>>,
    ctx: &HttpCtx,
    uri: &Uri,
    body: Bytes,
    key: Option<&str>,
) -> Result<(StatusCode, HeaderMap, Bytes), Failure> {
    // A keep-alive connection is ready again once the previous answer was read; one the server
    // closed meanwhile says so here, before anything was sent: open another.
    if let Some(open) = sender
        && open.ready().await.is_err()
    {
        *sender = None;
    }
    let sender = match sender {
        Some(open) => open,
        None => {
            let mut new = connect(ctx).await?;
            new.ready().await.map_err(|_| Failure::Connect)?;
            sender.insert(new)
        }
    };
    let mut request = Request::post(uri.clone());
    if let Some(headers) = request.headers_mut() {
        headers.clone_from(&ctx.headers);
        if let Some(key) = key {
            let value = HeaderValue::from_str(key)
                .map_err(|_| Failure::BadAnswer("idempotency key not a header value".into()))?;
            headers.insert("idempotency-key", value);
        }
    }
    let request = request
        .body(Full::new(body))
        .map_err(|e| Failure::Network(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(network)?;
    let (parts, body) = response.into_parts();
    // Read the body in any case, so the connection can take the next request.
    let body = body.collect().await.map_err(network)?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// Open a connection to relay, its protocol driven by a task of its own until the [`Conn`]
/// drops it.
async fn connect(ctx: &HttpCtx) -> Result<SendRequest<Full<Bytes>>, Failure> {
    let stream = tokio::net::TcpStream::connect(&ctx.authority)
        .await
        .map_err(|_| Failure::Connect)?;
    // A request is one small write: never held back for the previous answer's ACK.
    let _ = stream.set_nodelay(true);
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|_| Failure::Connect)?;
    // Its error, if any, is the next request's (`ready` or `send_request` fails).
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// A short, groupable description of a failed exchange: the innermost cause (e.g. "connection
/// reset by peer").
fn network(err: hyper::Error) -> Failure {
    let mut cause: &dyn std::error::Error = &err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    Failure::Network(cause.to_string())
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
    let uris = channels
        .iter()
        .map(|name| ctx.uri(&format!("/api/v1/channels/{name}/messages")))
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
            uris[ch].clone(),
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
    uri: Uri,
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
    let conn = Conn::default();
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
            conn.post(&ctx, &uri, body.clone(), key)
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
