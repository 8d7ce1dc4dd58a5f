//! `--publish-via ws --pipeline N`: publish frames on one WebSocket without waiting for each
//! answer, at most N unacknowledged at a time.
//!
//! Every frame carries a `ref` (a counter); relay answers it after the commit with an `ack`, or
//! with an `error` frame, carrying the same ref. A reader task matches answers to the publishes
//! in flight and frees their slots in the window; the writer takes a slot before each publish.
//! relay commits a connection's publishes of one channel in the order sent, so one connection
//! keeps every channel in order however deep the pipeline.
//!
//! With --idempotency every frame also carries its key, and a lost connection is reopened (up to
//! --max-attempts times, with backoff): every publish still unacknowledged is sent again, in its
//! original order, and relay answers the committed ones with their original ack. An `error` frame
//! is final, not retried: later publishes of the channel may be committed already, so a retry
//! would commit out of order. Such a message keeps its number and shows up as lost.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt::Write,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt, stream::SplitSink};
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::{net::TcpStream, sync::Semaphore, task::JoinHandle};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, Utf8Bytes},
};
use tokio_util::sync::CancellationToken;

use crate::{
    args::Args,
    publisher::{Published, Schedule, Sequencer, one_writer_each},
    retry::{backoff, new_run_id, write_key},
    stats::new_histogram,
    subscriber::client_config,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a closing connection's reader may take to see the close before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A frame from relay, as far as the publisher cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// `{"type":"ack","ref":R,…}`; `replayed` if relay says it repeats a committed publish.
    Ack { r: u64, replayed: bool },
    /// `{"type":"error","code":"…","ref":R?}`.
    Error { r: Option<u64>, code: String },
    /// Anything else (pong, another ref type, not JSON).
    Other,
}

/// Parse a text frame from relay.
pub fn parse_reply(text: &str) -> Reply {
    #[derive(Deserialize)]
    struct Raw<'a> {
        #[serde(rename = "type", borrow)]
        ty: Cow<'a, str>,
        #[serde(rename = "ref", default)]
        r: Option<RefValue>,
        #[serde(default, borrow)]
        code: Option<Cow<'a, str>>,
        #[serde(default)]
        replayed: bool,
    }
    /// relay echoes the ref as sent (an integer); a string of digits is accepted too.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum RefValue {
        Int(u64),
        Str(String),
    }
    let Ok(raw) = serde_json::from_str::<Raw>(text) else {
        return Reply::Other;
    };
    let r = raw.r.and_then(|r| match r {
        RefValue::Int(n) => Some(n),
        RefValue::Str(s) => s.parse().ok(),
    });
    match (raw.ty.as_ref(), r) {
        ("ack", Some(r)) => Reply::Ack {
            r,
            replayed: raw.replayed,
        },
        ("error", r) => Reply::Error {
            r,
            code: raw.code.map_or_else(|| "?".to_owned(), Cow::into_owned),
        },
        _ => Reply::Other,
    }
}

/// Write a publish frame with `ref` and optionally `idempotency_key` around `data` (a stamp).
pub fn write_frame(out: &mut String, channel: &str, data: &str, r: u64, key: Option<&str>) {
    out.push_str(r#"{"type":"publish","channel":""#);
    out.push_str(channel);
    out.push_str(r#"","data":"#);
    out.push_str(data);
    // Writing to a String cannot fail.
    let _ = write!(out, r#","ref":{r}"#);
    if let Some(key) = key {
        out.push_str(r#","idempotency_key":""#);
        out.push_str(key);
        out.push('"');
    }
    out.push('}');
}

/// A publish sent and not answered yet.
struct Inflight {
    ch: usize,
    first_sent: Instant,
    attempts: u32,
    /// The frame as sent, kept for a resend (--idempotency only).
    frame: Option<Utf8Bytes>,
}

/// What writer and reader share: the publishes in flight and what the answers said.
struct State {
    inflight: BTreeMap<u64, Inflight>,
    acked: Vec<u64>,
    latency: Histogram<u64>,
    replays: u64,
    /// Messages not published, by why.
    errors: BTreeMap<String, u64>,
    /// Why the current connection failed (the first reason given), for the report of what it
    /// left unacknowledged.
    ended: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    /// One permit per free place in the window; a publish holds one until answered.
    window: Semaphore,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One open publisher connection.
struct Conn {
    sink: SplitSink<Ws, Message>,
    reader: JoinHandle<()>,
    /// Cancelled by the reader when the connection ends.
    lost: CancellationToken,
}

struct Writer<'a> {
    args: &'a Args,
    url: String,
    shared: Arc<Shared>,
    conn: Option<Conn>,
    window: usize,
    run_id: Option<String>,
    max_attempts: u32,
    retries: u64,
}

/// Publish `total` messages with up to --pipeline in flight.
pub async fn run(
    args: &Args,
    channels: &[String],
    total: u64,
    out: &mut Published,
) -> Result<(), String> {
    let window = args.pipeline.unwrap_or(1);
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            inflight: BTreeMap::new(),
            acked: vec![0; channels.len()],
            latency: new_histogram(),
            replays: 0,
            errors: BTreeMap::new(),
            ended: None,
        }),
        window: Semaphore::new(window),
    });
    let mut w = Writer {
        args,
        // `?_=` so the token (if any) can follow as `&token=`.
        url: format!("{}?_=1{}", args.ws_base()?, args.token_query()),
        shared,
        conn: None,
        window,
        run_id: args.idempotency.then(new_run_id),
        max_attempts: args.max_attempts(),
        retries: 0,
    };
    w.conn = Some(w.open().await?);

    let mut seq = Sequencer::new(channels.len(), args.payload_bytes);
    let mut schedule = Schedule::new(args.rate, total);
    let started = Instant::now();
    let mut next_ref = 0u64;
    let (mut data, mut key, mut frame) = (String::new(), String::new(), String::new());
    'run: while let Some(n) = schedule.next_burst().await {
        for _ in 0..n {
            if !w.take_slot().await {
                break 'run;
            }
            let ch = seq.next_channel();
            data.clear();
            let s = seq.stamp(ch, &mut data);
            key.clear();
            if let Some(run_id) = &w.run_id {
                write_key(&mut key, run_id, &channels[ch], None, s);
            }
            frame.clear();
            let key = w.run_id.as_ref().map(|_| key.as_str());
            write_frame(&mut frame, &channels[ch], &data, next_ref, key);
            let text = Utf8Bytes::from(frame.clone());
            // In flight before it is sent: its ack may come before `feed` returns.
            w.shared.lock().inflight.insert(
                next_ref,
                Inflight {
                    ch,
                    first_sent: Instant::now(),
                    attempts: 1,
                    frame: w.run_id.as_ref().map(|_| text.clone()),
                },
            );
            next_ref += 1;
            if !w.send(Message::Text(text)).await && !w.recover().await {
                break 'run;
            }
        }
        if !w.flush().await && !w.recover().await {
            break;
        }
    }
    w.await_acks().await;
    out.elapsed = started.elapsed();
    w.close().await;

    let mut state = w.shared.lock();
    let left = std::mem::take(&mut state.inflight);
    if !left.is_empty() {
        let why = state.ended.clone().unwrap_or_else(|| "no ack".to_owned());
        *state
            .errors
            .entry(format!("ws: unacknowledged ({why})"))
            .or_default() += left.len() as u64;
    }
    out.per_channel.clone_from(&state.acked);
    out.numbered = one_writer_each(&seq.next);
    out.committed = out.total();
    out.requests = out.committed;
    out.latency = state.latency.clone();
    out.replays = state.replays;
    out.retries = w.retries;
    for (kind, count) in std::mem::take(&mut state.errors) {
        out.fail(count, kind);
    }
    Ok(())
}

impl Writer<'_> {
    /// Connect and start the reader.
    async fn open(&self) -> Result<Conn, String> {
        let (socket, _) = tokio::time::timeout(
            self.args.request_timeout,
            tokio_tungstenite::connect_async_with_config(
                self.url.as_str(),
                Some(client_config()),
                true,
            ),
        )
        .await
        .map_err(|_| format!("publisher connection to {} timed out", self.url))?
        .map_err(|e| format!("publisher connection to {}: {e}", self.url))?;
        let (sink, stream) = socket.split();
        let lost = CancellationToken::new();
        let reader = tokio::spawn(read_replies(stream, Arc::clone(&self.shared), lost.clone()));
        Ok(Conn { sink, reader, lost })
    }

    /// Wait for a free place in the window; false if publishing has to stop.
    async fn take_slot(&mut self) -> bool {
        loop {
            let Some(lost) = self.conn.as_ref().map(|c| c.lost.clone()) else {
                return false;
            };
            let shared = Arc::clone(&self.shared);
            let timeout = self.args.request_timeout;
            tokio::select! {
                biased;
                permit = tokio::time::timeout(timeout, shared.window.acquire()) => match permit {
                    Ok(Ok(permit)) => {
                        // Given back by the reader when the answer comes.
                        permit.forget();
                        return true;
                    }
                    // The semaphore is never closed.
                    Ok(Err(_)) => return false,
                    Err(_) => {
                        self.shared.lock().ended = Some(format!(
                            "no answer within {:?} with {} in flight",
                            self.args.request_timeout, self.window
                        ));
                        return false;
                    }
                },
                () = lost.cancelled() => {
                    if !self.recover().await {
                        return false;
                    }
                }
            }
        }
    }

    async fn send(&mut self, msg: Message) -> bool {
        match &mut self.conn {
            Some(conn) => conn.sink.feed(msg).await.is_ok(),
            None => false,
        }
    }

    async fn flush(&mut self) -> bool {
        match &mut self.conn {
            Some(conn) => conn.sink.flush().await.is_ok(),
            None => false,
        }
    }

    /// The connection failed: without --idempotency stop; with it reopen it and resend every
    /// publish in flight. False if publishing has to stop.
    async fn recover(&mut self) -> bool {
        self.close().await;
        if self.run_id.is_none() {
            return false;
        }
        for attempt in 1..=self.max_attempts {
            tokio::time::sleep(backoff(attempt)).await;
            match self.open().await {
                Ok(conn) => {
                    self.shared.lock().ended = None;
                    self.conn = Some(conn);
                }
                Err(err) => {
                    self.shared.lock().ended = Some(err);
                    continue;
                }
            }
            if self.resend().await {
                return true;
            }
            self.close().await;
        }
        false
    }

    /// Send every publish in flight again, oldest first (each channel in its order); give up on
    /// those that were sent --max-attempts times.
    async fn resend(&mut self) -> bool {
        let frames: Vec<Utf8Bytes> = {
            let mut state = self.shared.lock();
            let mut given_up = Vec::new();
            let mut frames = Vec::new();
            for (&r, p) in state.inflight.iter_mut() {
                match &p.frame {
                    Some(frame) if p.attempts < self.max_attempts => {
                        p.attempts += 1;
                        frames.push(frame.clone());
                    }
                    _ => given_up.push(r),
                }
            }
            for r in &given_up {
                state.inflight.remove(r);
            }
            if !given_up.is_empty() {
                let kind = format!("ws: gave up after {} attempts", self.max_attempts);
                *state.errors.entry(kind).or_default() += given_up.len() as u64;
                self.shared.window.add_permits(given_up.len());
            }
            frames
        };
        self.retries += frames.len() as u64;
        for frame in frames {
            if !self.send(Message::Text(frame)).await {
                return false;
            }
        }
        self.flush().await
    }

    /// Wait until every publish in flight is answered, reconnecting as needed; gives up when no
    /// answer came for --request-timeout.
    async fn await_acks(&mut self) {
        let all = u32::try_from(self.window).unwrap_or(u32::MAX);
        let mut before = usize::MAX;
        loop {
            let Some(lost) = self.conn.as_ref().map(|c| c.lost.clone()) else {
                return;
            };
            let shared = Arc::clone(&self.shared);
            let timeout = self.args.request_timeout;
            tokio::select! {
                biased;
                every = tokio::time::timeout(timeout, shared.window.acquire_many(all)) => match every {
                    Ok(_) => return,
                    Err(_) => {
                        let now = self.shared.lock().inflight.len();
                        if now >= before {
                            self.shared.lock().ended = Some(format!(
                                "no answer within {:?}",
                                self.args.request_timeout
                            ));
                            return;
                        }
                        before = now;
                    }
                },
                () = lost.cancelled() => {
                    if !self.recover().await {
                        return;
                    }
                }
            }
        }
    }

    /// Close the connection (if any) and let its reader finish.
    async fn close(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, conn.sink.close()).await;
        if tokio::time::timeout(CLOSE_GRACE, &mut conn.reader)
            .await
            .is_err()
        {
            // Its unread answers count as unanswered: resent with --idempotency.
            conn.reader.abort();
        }
    }
}

/// Match relay's answers to the publishes in flight until the connection ends.
async fn read_replies(
    mut stream: futures_util::stream::SplitStream<Ws>,
    shared: Arc<Shared>,
    lost: CancellationToken,
) {
    let ended = loop {
        let text = match stream.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                break match frame {
                    Some(f) => format!("closed by the server with {}", u16::from(f.code)),
                    None => "closed by the server".to_owned(),
                };
            }
            Some(Ok(_)) => continue,
            Some(Err(err)) => break format!("connection failed: {err}"),
            None => break "connection ended".to_owned(),
        };
        let freed = {
            let mut state = shared.lock();
            match parse_reply(&text) {
                Reply::Ack { r, replayed } => match state.inflight.remove(&r) {
                    Some(p) => {
                        state.acked[p.ch] += 1;
                        state
                            .latency
                            .saturating_record(p.first_sent.elapsed().as_micros() as u64);
                        state.replays += u64::from(replayed);
                        true
                    }
                    // Answered already (before a resend) or not ours.
                    None => false,
                },
                Reply::Error { r: Some(r), code } => match state.inflight.remove(&r) {
                    Some(_) => {
                        *state
                            .errors
                            .entry(format!("ws: error frame `{code}`"))
                            .or_default() += 1;
                        true
                    }
                    None => false,
                },
                Reply::Error { r: None, code } => {
                    // Not tied to a publish: no slot can be freed, the message is unknown.
                    *state
                        .errors
                        .entry(format!("ws: error frame `{code}` without ref"))
                        .or_default() += 1;
                    false
                }
                Reply::Other => false,
            }
        };
        if freed {
            shared.window.add_permits(1);
        }
    };
    // The first reason stands: after a timeout, our own close is not the news.
    shared.lock().ended.get_or_insert(ended);
    lost.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_matched_by_ref() {
        assert_eq!(
            parse_reply(r#"{"type":"ack","ref":17,"channel":"lg-0","id":4}"#),
            Reply::Ack {
                r: 17,
                replayed: false
            }
        );
        assert_eq!(
            parse_reply(r#"{"type":"ack","ref":"18","channel":"lg-0","id":4,"replayed":true}"#),
            Reply::Ack {
                r: 18,
                replayed: true
            }
        );
        assert_eq!(
            parse_reply(r#"{"type":"error","code":"rate_limited","message":"slow down","ref":3}"#),
            Reply::Error {
                r: Some(3),
                code: "rate_limited".into()
            }
        );
        assert_eq!(
            parse_reply(r#"{"type":"error","code":"invalid_frame","message":"…"}"#),
            Reply::Error {
                r: None,
                code: "invalid_frame".into()
            }
        );
        // An ack without a usable ref, a pong, and garbage do not free anything.
        for other in [
            r#"{"type":"ack","channel":"lg-0","id":4}"#,
            r#"{"type":"ack","ref":"x","id":4}"#,
            r#"{"type":"ack","ref":-1}"#,
            r#"{"type":"pong"}"#,
            "not json",
        ] {
            assert_eq!(parse_reply(other), Reply::Other, "{other}");
        }
    }

    #[test]
    fn frames_carry_ref_and_key() {
        let mut f = String::new();
        write_frame(&mut f, "lg-3", r#"{"s":1,"t":2}"#, 41, Some("r-lg-3-1"));
        let v: serde_json::Value = match serde_json::from_str(&f) {
            Ok(v) => v,
            Err(err) => panic!("{err}: {f}"),
        };
        assert_eq!(v["type"], "publish");
        assert_eq!(v["channel"], "lg-3");
        assert_eq!(v["data"]["s"], 1);
        assert_eq!(v["ref"], 41);
        assert_eq!(v["idempotency_key"], "r-lg-3-1");
        f.clear();
        write_frame(&mut f, "lg-3", r#"{"s":1,"t":2}"#, 0, None);
        assert_eq!(
            f,
            r#"{"type":"publish","channel":"lg-3","data":{"s":1,"t":2},"ref":0}"#
        );
    }
}
