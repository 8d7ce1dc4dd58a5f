//! The publisher: a fixed total rate, round-robin over the channels, through Redis, the HTTP API
//! (one message or a batch per request, [`crate::http`], [`crate::batch`]) or a WebSocket (fire
//! and forget here, pipelined with acks in [`crate::pipeline`]).
//!
//! Message `i` is due at `i / rate` seconds after the start; each wake-up sends everything due
//! (timers are ~1 ms coarse, so high rates go out in small bursts, and a stall is caught up
//! rather than silently lowering the rate). Each channel's writer (one per channel, or several in
//! http mode with `--http-concurrency` above `--channels`) numbers its messages 0, 1, 2, … and a
//! message is stamped with the wall clock when it is handed to the network. When a send is known
//! to have failed, its sequence numbers are reused, so subscribers do not count as lost what was
//! never published.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

use crate::{
    args::{Args, Via},
    batch, http, pipeline,
    stats::{InFrame, new_histogram, padding, write_stamp},
    subscriber::client_config,
    sys::now_micros,
};

/// Messages sent in one burst at most (a Redis pipeline, a WebSocket flush).
const MAX_BURST: u64 = 1000;

/// What publishing achieved.
#[derive(Debug)]
pub struct Published {
    /// Messages published per channel: acknowledged by the server (Redis reply, 201, ack), or
    /// for fire-and-forget WebSocket publishes, sent.
    pub per_channel: Vec<u64>,
    /// Sequence numbers used per channel and writer (`numbered[ch][k]`, k the writer within the
    /// channel; one writer per channel except in http mode with more writers than channels):
    /// what each subscriber of the channel should receive from each writer. More than
    /// `per_channel` when a message's fate is unknown (a timeout with --idempotency, an error
    /// frame to a pipelined publish): if it never arrives, it is lost.
    pub numbered: Vec<Vec<u64>>,
    pub errors: u64,
    /// Failures grouped by description.
    pub error_kinds: BTreeMap<String, u64>,
    /// PUBLISHes that Redis delivered to nobody (relay not subscribed: wrong prefix?).
    pub no_receivers: u64,
    /// From the first send to the last acknowledgement.
    pub elapsed: Duration,
    /// Messages the server acknowledged as committed (fire-and-forget ws: sent minus error
    /// frames, confirmed by the final pong).
    pub committed: u64,
    /// Requests answered with success: HTTP requests, Redis pipelines, acked ws publishes.
    pub requests: u64,
    /// Request sent → success answer (first attempt to the answer, retries included), µs.
    pub latency: Histogram<u64>,
    /// Attempts after the first (--idempotency), ws resends included.
    pub retries: u64,
    /// Messages the server answered as a repeat of a committed one (`replayed: true`).
    pub replays: u64,
}

impl Published {
    pub fn new(channels: usize) -> Self {
        Self {
            per_channel: vec![0; channels],
            numbered: vec![vec![0]; channels],
            errors: 0,
            error_kinds: BTreeMap::new(),
            no_receivers: 0,
            elapsed: Duration::ZERO,
            committed: 0,
            requests: 0,
            latency: new_histogram(),
            retries: 0,
            replays: 0,
        }
    }

    pub fn total(&self) -> u64 {
        self.per_channel.iter().sum()
    }

    /// Sequence numbers used on `ch` by all its writers.
    pub fn numbered_on(&self, ch: usize) -> u64 {
        self.numbered[ch].iter().sum()
    }

    pub fn fail(&mut self, count: u64, kind: String) {
        self.errors += count;
        *self.error_kinds.entry(kind).or_default() += count;
    }

    /// Record one successful request that took `took`.
    pub fn record_latency(&mut self, took: Duration) {
        self.latency.saturating_record(took.as_micros() as u64);
    }
}

/// `numbered` of a mode with one writer per channel, from each channel's count.
pub fn one_writer_each(counts: &[u64]) -> Vec<Vec<u64>> {
    counts.iter().map(|&n| vec![n]).collect()
}

/// When each message is due.
pub struct Schedule {
    start: Instant,
    rate: f64,
    total: u64,
    sent: u64,
}

impl Schedule {
    pub fn new(rate: f64, total: u64) -> Self {
        Self {
            start: Instant::now(),
            rate,
            total,
            sent: 0,
        }
    }

    /// Wait until at least one message is due; how many are (at most `MAX_BURST`), or `None`
    /// when everything was sent.
    pub async fn next_burst(&mut self) -> Option<u64> {
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
pub struct Sequencer {
    pub next: Vec<u64>,
    turn: usize,
    pad: String,
}

impl Sequencer {
    pub fn new(channels: usize, payload_bytes: usize) -> Self {
        Self {
            next: vec![0; channels],
            turn: 0,
            pad: padding(payload_bytes, None),
        }
    }

    /// The channel whose turn it is.
    pub fn next_channel(&mut self) -> usize {
        let ch = self.turn;
        self.turn = (self.turn + 1) % self.next.len();
        ch
    }

    /// Append the data of the next message of `ch` (claiming its sequence number) to `out`;
    /// returns that number.
    pub fn stamp(&mut self, ch: usize, out: &mut String) -> u64 {
        let seq = self.next[ch];
        self.next[ch] += 1;
        write_stamp(out, seq, None, now_micros(), &self.pad);
        seq
    }
}

/// Publish `total` messages at `args.rate`.
pub async fn run(args: &Args, channels: &[String], total: u64) -> Result<Published, String> {
    let mut out = Published::new(channels.len());
    if total == 0 {
        return Ok(out);
    }
    match args.publish_via {
        Via::Redis => redis(args, channels, total, &mut out).await?,
        Via::Http => http::run(args, channels, total, &mut out).await?,
        Via::Batch => batch::run(args, channels, total, &mut out).await?,
        Via::Ws if args.pipeline.is_some() => {
            pipeline::run(args, channels, total, &mut out).await?;
        }
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
    let mut conn = tokio::time::timeout(
        args.request_timeout,
        client.get_multiplexed_async_connection(),
    )
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
        let sent_at = Instant::now();
        let sent = tokio::time::timeout(
            args.request_timeout,
            pipe.query_async::<Vec<i64>>(&mut conn),
        );
        match sent.await {
            Ok(Ok(receivers)) => {
                out.record_latency(sent_at.elapsed());
                out.requests += 1;
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
    out.committed = out.total();
    out.numbered = one_writer_each(&out.per_channel);
    Ok(())
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
        args.request_timeout,
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
    if tokio::time::timeout(args.request_timeout * 3, pong_rx)
        .await
        .map_or(true, |r| r.is_err())
    {
        out.fail(1, "ws: no pong after the last publish".to_owned());
    }
    out.elapsed = started.elapsed();
    let _ = sink.close().await;
    let mut refused = 0;
    if let Ok(Ok(errors)) = tokio::time::timeout(Duration::from_secs(2), reader).await {
        for (kind, count) in errors {
            refused += count;
            out.fail(count, kind);
        }
    }
    // A publish without an error frame was committed (the pong came after all of them).
    out.committed = out.total().saturating_sub(refused);
    out.numbered = one_writer_each(&out.per_channel);
    Ok(())
}
