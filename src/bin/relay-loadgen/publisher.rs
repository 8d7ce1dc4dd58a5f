//! The publisher: a fixed total rate, round-robin over the channels, through Redis, the HTTP API
//! or a WebSocket.
//!
//! Message `i` is due at `i / rate` seconds after the start; each wake-up sends everything due
//! (timers are ~1 ms coarse, so high rates go out in small bursts, and a stall is caught up
//! rather than silently lowering the rate). Each channel numbers its messages 0, 1, 2, … and a
//! message is stamped with the wall clock when it is handed to the network. When a send is known
//! to have failed, its sequence numbers are reused, so subscribers do not count as lost what was
//! never published.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    args::{Args, Via},
    stats::{InFrame, padding, write_stamp},
    subscriber::client_config,
    sys::now_micros,
};

/// Messages sent in one burst at most (a Redis pipeline, a WebSocket flush).
const MAX_BURST: u64 = 1000;

/// Limit for one Redis round trip or HTTP request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What publishing achieved.
#[derive(Debug, Default)]
pub struct Published {
    /// Messages published per channel.
    pub per_channel: Vec<u64>,
    pub errors: u64,
    /// Failures grouped by description.
    pub error_kinds: BTreeMap<String, u64>,
    /// PUBLISHes that Redis delivered to nobody (relay not subscribed: wrong prefix?).
    pub no_receivers: u64,
    /// From the first send to the last acknowledgement.
    pub elapsed: Duration,
}

impl Published {
    pub fn total(&self) -> u64 {
        self.per_channel.iter().sum()
    }

    fn fail(&mut self, count: u64, kind: String) {
        self.errors += count;
        *self.error_kinds.entry(kind).or_default() += count;
    }
}

/// When each message is due.
struct Schedule {
    start: Instant,
    rate: f64,
    total: u64,
    sent: u64,
}

impl Schedule {
    fn new(rate: f64, total: u64) -> Self {
        Self {
            start: Instant::now(),
            rate,
            total,
            sent: 0,
        }
    }

    /// Wait until at least one message is due; how many are (at most `MAX_BURST`), or `None`
    /// when everything was sent.
    async fn next_burst(&mut self) -> Option<u64> {
        loop {
            if self.sent >= self.total {
                return None;
            }
            let elapsed = self.start.elapsed().as_secs_f64();
            let due = ((elapsed * self.rate) as u64 + 1).min(self.total);
            if due > self.sent {
                let n = (due - self.sent).min(MAX_BURST);
                self.sent += n;
                return Some(n);
            }
            let at = self.start + Duration::from_secs_f64(self.sent as f64 / self.rate);
            tokio::time::sleep_until(at.into()).await;
        }
    }
}

/// Per-channel sequence numbers and round-robin position.
struct Sequencer {
    next: Vec<u64>,
    turn: usize,
    pad: String,
}

impl Sequencer {
    fn new(channels: usize, payload_bytes: usize) -> Self {
        Self {
            next: vec![0; channels],
            turn: 0,
            pad: padding(payload_bytes),
        }
    }

    /// The channel whose turn it is.
    fn next_channel(&mut self) -> usize {
        let ch = self.turn;
        self.turn = (self.turn + 1) % self.next.len();
        ch
    }

    /// Append the data of the next message of `ch` (claiming its sequence number) to `out`.
    fn stamp(&mut self, ch: usize, out: &mut String) {
        let seq = self.next[ch];
        self.next[ch] += 1;
        write_stamp(out, seq, now_micros(), &self.pad);
    }
}

/// Publish `total` messages at `args.rate`.
pub async fn run(args: &Args, channels: &[String], total: u64) -> Result<Published, String> {
    let mut out = Published {
        per_channel: vec![0; channels.len()],
        ..Published::default()
    };
    if total == 0 {
        return Ok(out);
    }
    match args.publish_via {
        Via::Redis => redis(args, channels, total, &mut out).await?,
        Via::Http => http(args, channels, total, &mut out).await?,
        Via::Ws => ws(args, channels, total, &mut out).await?,
    }
    Ok(out)
}

async fn redis(
    args: &Args,
    channels: &[String],
    total: u64,
    out: &mut Published,
) -> Result<(), String> {
    let client = redis::Client::open(args.redis_url.as_str())
        .map_err(|e| format!("--redis-url `{}`: {e}", args.redis_url))?;
    let mut conn = tokio::time::timeout(REQUEST_TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| format!("Redis at {} did not answer", args.redis_url))?
        .map_err(|e| format!("cannot connect to Redis at {}: {e}", args.redis_url))?;
    let redis_channels: Vec<String> = channels
        .iter()
        .map(|c| format!("{}{c}", args.redis_prefix))
        .collect();
    let mut seq = Sequencer::new(channels.len(), args.payload_bytes);
    let mut schedule = Schedule::new(args.rate, total);
    let started = Instant::now();
    let mut burst = Vec::new();
    let mut payload = String::new();
    while let Some(n) = schedule.next_burst().await {
        let mut pipe = redis::pipe();
        burst.clear();
        for _ in 0..n {
            let ch = seq.next_channel();
            payload.clear();
            payload.push_str(r#"{"data":"#);
            seq.stamp(ch, &mut payload);
            payload.push('}');
            pipe.cmd("PUBLISH").arg(&redis_channels[ch]).arg(&payload);
            burst.push(ch);
        }
        let sent = tokio::time::timeout(REQUEST_TIMEOUT, pipe.query_async::<Vec<i64>>(&mut conn));
        match sent.await {
            Ok(Ok(receivers)) => {
                for &ch in &burst {
                    out.per_channel[ch] += 1;
                }
                out.no_receivers += receivers.iter().filter(|r| **r == 0).count() as u64;
            }
            failed => {
                let kind = match failed {
                    Ok(Err(err)) => format!("redis: {err}"),
                    _ => "redis: timeout".to_owned(),
                };
                out.fail(n, kind);
                // Assume none of the burst went out: hand its sequence numbers back.
                for &ch in &burst {
                    seq.next[ch] -= 1;
                }
            }
        }
    }
    out.elapsed = started.elapsed();
    Ok(())
}

/// One task per channel posts that channel's messages one at a time: concurrent POSTs to one
/// channel could commit in another order than they were numbered, which would show up as
/// "out of order" although relay delivers in commit order exactly as documented.
async fn http(
    args: &Args,
    channels: &[String],
    total: u64,
    out: &mut Published,
) -> Result<(), String> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = &args.token {
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| "--token is not a valid header value".to_owned())?;
        headers.insert(reqwest::header::AUTHORIZATION, bearer);
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .default_headers(headers)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let base = args.http_base();
    let pad = padding(args.payload_bytes);
    let mut ticks = Vec::new();
    let mut tasks = Vec::new();
    for name in channels {
        let (tx, rx) = mpsc::unbounded_channel::<()>();
        ticks.push(tx);
        let url = format!("{base}/api/v1/channels/{name}/messages");
        tasks.push(tokio::spawn(post_channel(
            client.clone(),
            url,
            pad.clone(),
            rx,
        )));
    }
    let started = Instant::now();
    let mut schedule = Schedule::new(args.rate, total);
    let mut turn = 0;
    while let Some(n) = schedule.next_burst().await {
        for _ in 0..n {
            // A channel task only ends when its sender is dropped.
            let _ = ticks[turn].send(());
            turn = (turn + 1) % ticks.len();
        }
    }
    drop(ticks);
    for (ch, task) in tasks.into_iter().enumerate() {
        let done = task
            .await
            .map_err(|e| format!("publisher task failed: {e}"))?;
        out.per_channel[ch] = done.published;
        for (kind, count) in done.errors {
            out.fail(count, kind);
        }
    }
    out.elapsed = started.elapsed();
    Ok(())
}

struct ChannelPublished {
    published: u64,
    errors: BTreeMap<String, u64>,
}

async fn post_channel(
    client: reqwest::Client,
    url: String,
    pad: String,
    mut ticks: mpsc::UnboundedReceiver<()>,
) -> ChannelPublished {
    let mut done = ChannelPublished {
        published: 0,
        errors: BTreeMap::new(),
    };
    let mut body = String::new();
    while ticks.recv().await.is_some() {
        body.clear();
        body.push_str(r#"{"data":"#);
        write_stamp(&mut body, done.published, now_micros(), &pad);
        body.push('}');
        let sent = client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        let failure = match sent {
            Ok(res) if res.status() == reqwest::StatusCode::CREATED => {
                // Read the body so the connection goes back to the pool.
                let _ = res.bytes().await;
                done.published += 1;
                continue;
            }
            Ok(res) => format!("http: status {}", res.status()),
            Err(err) if err.is_timeout() => "http: timeout".to_owned(),
            Err(err) if err.is_connect() => "http: cannot connect".to_owned(),
            Err(err) => format!("http: {err}"),
        };
        // Not committed: the next message reuses the sequence number.
        *done.errors.entry(failure).or_default() += 1;
    }
    done
}

/// Publish frames on one dedicated connection. relay handles a connection's frames in order,
/// so a `ping` after the last publish is answered only once every publish was handled: its
/// `pong` marks the end of the publish window. Refused publishes come back as `error` frames
/// without saying which message; they are counted, and those messages show up as lost.
async fn ws(
    args: &Args,
    channels: &[String],
    total: u64,
    out: &mut Published,
) -> Result<(), String> {
    // `?_=` so the token (if any) can follow as `&token=`.
    let url = format!("{}?_=1{}", args.ws_base()?, args.token_query());
    let (socket, _) = tokio::time::timeout(
        REQUEST_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(client_config()), true),
    )
    .await
    .map_err(|_| format!("publisher connection to {url} timed out"))?
    .map_err(|e| format!("publisher connection to {url}: {e}"))?;
    let (mut sink, mut stream) = socket.split();
    let (pong_tx, pong_rx) = oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        let mut pong = Some(pong_tx);
        while let Some(Ok(msg)) = stream.next().await {
            if let Message::Text(text) = msg {
                match serde_json::from_str::<InFrame>(&text) {
                    Ok(InFrame {
                        ty: "error", code, ..
                    }) => {
                        let kind = format!("ws: error frame `{}`", code.unwrap_or("?"));
                        *errors.entry(kind).or_default() += 1;
                    }
                    Ok(InFrame { ty: "pong", .. }) => {
                        if let Some(tx) = pong.take() {
                            let _ = tx.send(());
                        }
                    }
                    _ => {}
                }
            }
        }
        errors
    });

    let mut seq = Sequencer::new(channels.len(), args.payload_bytes);
    let mut schedule = Schedule::new(args.rate, total);
    let started = Instant::now();
    let mut frame = String::new();
    'outer: while let Some(n) = schedule.next_burst().await {
        for _ in 0..n {
            let ch = seq.next_channel();
            frame.clear();
            frame.push_str(r#"{"type":"publish","channel":""#);
            frame.push_str(&channels[ch]);
            frame.push_str(r#"","data":"#);
            seq.stamp(ch, &mut frame);
            frame.push('}');
            if let Err(err) = sink.feed(Message::Text(frame.as_str().into())).await {
                out.fail(1, format!("ws: send: {err}"));
                break 'outer;
            }
            out.per_channel[ch] += 1;
        }
        if let Err(err) = sink.flush().await {
            out.fail(1, format!("ws: send: {err}"));
            break;
        }
    }
    let _ = sink.send(Message::Text(r#"{"type":"ping"}"#.into())).await;
    if tokio::time::timeout(REQUEST_TIMEOUT * 3, pong_rx)
        .await
        .map_or(true, |r| r.is_err())
    {
        out.fail(1, "ws: no pong after the last publish".to_owned());
    }
    out.elapsed = started.elapsed();
    let _ = sink.close().await;
    if let Ok(Ok(errors)) = tokio::time::timeout(Duration::from_secs(2), reader).await {
        for (kind, count) in errors {
            out.fail(count, kind);
        }
    }
    Ok(())
}
