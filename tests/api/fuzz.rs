//! Hostile input against a running relay (docs/security.md, *Hostile-input testing*).
//!
//! Several fuzzing connections send thousands of random and malformed WebSocket frames over raw
//! TCP, through a small hand-made frame encoder (a WebSocket client library refuses to send
//! most of them): random text, binary, invalid UTF-8, bad opcodes, reserved bits, fragmented
//! messages with interleaved control frames, oversized lengths, deeply nested and wrongly
//! typed JSON, bad channel names, and auth frames with forged, expired, `alg: none`, garbage
//! and wrong-`kid` tokens. A model of docs/protocol.md predicts every answer: an error frame
//! with the documented code (the connection stays), the reply of a valid frame, or the
//! documented close code; a closed connection is reopened and the fuzzing goes on.
//!
//! Meanwhile a healthy subscriber must receive every message a publisher sends, in order, with
//! no gap and no duplicate; `/healthz` and `/readyz` must answer 200 throughout; HTTP bodies
//! and (against real Redis) raw Redis payloads are fuzzed alongside. The figures are printed
//! at the end (`--nocapture`).
//!
//! `FUZZ_SEED` replays a run (the seed is printed), `FUZZ_FRAMES` scales it (default 5000).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use base64::Engine;
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey};
use relay::config::Settings;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    auth::{SECRET, claims, now, required, rsa_key, sign},
    helpers::{Backend, TestApp, redis_url, spawn_app_on},
};

/// How long any single expected answer may take before the test calls it a hang.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Fuzzing connections running at once (besides the side cases).
const WORKERS: usize = 4;
/// docs/protocol.md: 1008 after this many invalid frames in a row.
const BAD_STREAK: u32 = 32;
const KID: &str = "fuzz-key";
const SUB: &str = "fuzzer";

fn fuzz_settings(s: &mut Settings) {
    required(s);
    // With a kid on the secret, a token naming another kid is refused.
    s.auth.hs256_kid = KID.to_owned();
    // Short, so the timeouts are seen within the run; long enough that a busy machine does
    // not fire them on connections that are working.
    s.auth.handshake_timeout = Duration::from_secs(2);
    s.ws.ping_interval = Duration::from_secs(2);
    s.ws.idle_timeout = Duration::from_secs(8);
    s.http.max_body_bytes = 64 * 1024;
    // Low, so connections reach it.
    s.ws.max_subscriptions = 8;
    // The model predicts answers frame by frame; rate limits and the channel quota (tested in
    // `limits`) would make them depend on timing.
    s.limits.publish_per_connection = 0;
    s.limits.publish_per_subject = 0;
    s.limits.channels_per_subject = 0;
}

// ---------------------------------------------------------------------------------------------
// Tokens

fn fuzz_channels() -> Value {
    json!({"subscribe": ["fuzz:*"], "publish": ["fuzz:*"]})
}

fn hs(claims: &Value, kid: Option<&str>, secret: &str) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
    sign(claims, Algorithm::HS256, kid, &key)
}

fn good_token(ttl: u64) -> String {
    hs(&claims(SUB, ttl, fuzz_channels()), Some(KID), SECRET)
}

struct Tokens {
    good: String,
    /// Valid, with `exp` as far away as a u64 goes.
    absurd_exp: String,
    other_sub: String,
    /// Refused tokens, by what is wrong with them.
    bad: Vec<(&'static str, String)>,
}

fn tokens() -> Tokens {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let good = good_token(3600);
    let body = |c: &Value| b64.encode(c.to_string());
    let all = json!({"sub": "root", "exp": now() + 3600, "channels": {"subscribe": ["*"], "publish": ["*"]}});
    let mut parts = good.split('.');
    let (header, _, signature) = (parts.next().unwrap(), parts.next(), parts.next().unwrap());
    let bad = vec![
        (
            "forged",
            hs(
                &claims(SUB, 3600, fuzz_channels()),
                Some(KID),
                "not-the-secret-not-the-secret-not-the",
            ),
        ),
        (
            "expired",
            hs(
                &json!({"sub": SUB, "exp": now() - 120, "channels": fuzz_channels()}),
                Some(KID),
                SECRET,
            ),
        ),
        (
            "not_yet_valid",
            hs(
                &json!({"sub": SUB, "exp": now() + 7200, "nbf": now() + 3600}),
                Some(KID),
                SECRET,
            ),
        ),
        (
            "alg_none",
            format!(
                "{}.{}.",
                b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
                body(&all)
            ),
        ),
        (
            "alg_none_kid",
            format!(
                "{}.{}.",
                b64.encode(r#"{"alg":"none","typ":"JWT","kid":"fuzz-key"}"#),
                body(&all)
            ),
        ),
        ("garbage_base64", "!!!.@@@.###".to_owned()),
        ("not_a_jwt", "hello".to_owned()),
        ("empty", String::new()),
        (
            "wrong_kid",
            hs(
                &claims(SUB, 3600, fuzz_channels()),
                Some("stolen-key"),
                SECRET,
            ),
        ),
        (
            "wrong_alg",
            sign(
                &claims(SUB, 3600, fuzz_channels()),
                Algorithm::RS256,
                Some(KID),
                &rsa_key(),
            ),
        ),
        ("tampered", format!("{header}.{}.{signature}", body(&all))),
        ("truncated", good[..good.len() - 4].to_owned()),
        (
            "bad_pattern",
            hs(
                &claims(SUB, 3600, json!({"subscribe": ["fuzz:*x"]})),
                Some(KID),
                SECRET,
            ),
        ),
        (
            "empty_sub",
            hs(&claims("", 3600, fuzz_channels()), Some(KID), SECRET),
        ),
        (
            "exp_as_string",
            hs(
                &json!({"sub": SUB, "exp": (now() + 3600).to_string()}),
                Some(KID),
                SECRET,
            ),
        ),
    ];
    Tokens {
        good,
        absurd_exp: hs(
            &json!({"sub": SUB, "exp": u64::MAX, "channels": fuzz_channels()}),
            Some(KID),
            SECRET,
        ),
        other_sub: hs(&claims("mallory", 3600, fuzz_channels()), Some(KID), SECRET),
        bad,
    }
}

// ---------------------------------------------------------------------------------------------
// A raw WebSocket client: handshake by hand, frames by hand.

mod op {
    pub const CONT: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// One client frame, masked (as RFC 6455 requires of clients) unless `masked` is false.
fn frame(rng: &mut fastrand::Rng, fin: bool, rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode(rng, fin, rsv, opcode, payload, payload.len() as u64, true)
}

fn encode(
    rng: &mut fastrand::Rng,
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: &[u8],
    claimed_len: u64,
    masked: bool,
) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0xF)];
    let mask_bit = if masked { 0x80 } else { 0 };
    match claimed_len {
        0..=125 => out.push(mask_bit | claimed_len as u8),
        126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend((claimed_len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend(claimed_len.to_be_bytes());
        }
    }
    if masked {
        let key = rng.u32(..).to_be_bytes();
        out.extend(key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend(payload);
    }
    out
}

fn text_frame(rng: &mut fastrand::Rng, text: &str) -> Vec<u8> {
    frame(rng, true, 0, op::TEXT, text.as_bytes())
}

/// What arrived from the server.
#[derive(Debug)]
enum Event {
    Text(String),
    Binary,
    Ping,
    Pong(Vec<u8>),
    Close(Option<u16>),
    /// The connection ended without a close frame (or a read failed).
    Gone(String),
    Timeout,
}

struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
    partial: Option<(u8, Vec<u8>)>,
}

impl RawWs {
    /// Upgrade by hand. Err is the HTTP status of a refusal.
    async fn connect(app: &TestApp, query: &str, bearer: Option<&str>) -> Result<Self, u16> {
        let mut stream = TcpStream::connect(app.addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let request = format!(
            "GET /ws{query} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n",
            app.addr
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write upgrade");
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(ANSWER_TIMEOUT, stream.read(&mut chunk))
                .await
                .expect("upgrade answered in time")
                .expect("read upgrade response");
            assert!(n > 0, "connection closed during the upgrade");
            buf.extend(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line: {head}"));
        if status != 101 {
            return Err(status);
        }
        Ok(Self {
            stream,
            buf: buf.split_off(head_end),
            partial: None,
        })
    }

    /// Write bytes; a peer that already closed shows up as the next event, not here.
    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next server frame (messages reassembled), within `ANSWER_TIMEOUT`.
    async fn next(&mut self) -> Event {
        self.next_within(ANSWER_TIMEOUT).await
    }

    async fn next_within(&mut self, within: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some((fin, opcode, payload)) = self.take_frame() {
                let (opcode, payload) = match (opcode, self.partial.take()) {
                    (op::CONT, Some((first, mut data))) => {
                        data.extend(payload);
                        (first, data)
                    }
                    (op::TEXT | op::BINARY, None) if !fin => {
                        self.partial = Some((opcode, payload));
                        continue;
                    }
                    (other, partial) => {
                        self.partial = partial;
                        (other, payload)
                    }
                };
                if !fin && opcode < 8 {
                    self.partial = Some((opcode, payload));
                    continue;
                }
                return match opcode {
                    op::TEXT => match String::from_utf8(payload) {
                        Ok(text) => Event::Text(text),
                        Err(_) => Event::Gone("the server sent non-UTF-8 text".into()),
                    },
                    op::BINARY => Event::Binary,
                    op::PING => Event::Ping,
                    op::PONG => Event::Pong(payload),
                    op::CLOSE => Event::Close(
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
                    ),
                    other => Event::Gone(format!("the server sent opcode {other}")),
                };
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Event::Timeout,
                Ok(Ok(0)) => return Event::Gone("EOF".into()),
                Ok(Ok(n)) => self.buf.extend(&chunk[..n]),
                Ok(Err(e)) => return Event::Gone(e.to_string()),
            }
        }
    }

    /// One complete (unmasked, server) frame from the buffer.
    fn take_frame(&mut self) -> Option<(bool, u8, Vec<u8>)> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let (len, at) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if b.len() < at + len {
            return None;
        }
        let (fin, opcode) = (b[0] & 0x80 != 0, b[0] & 0x0F);
        let payload = b[at..at + len].to_vec();
        self.buf.drain(..at + len);
        Some((fin, opcode, payload))
    }
}

// ---------------------------------------------------------------------------------------------
// What the fuzzing connections send, and what docs/protocol.md says comes back.

/// A text message as the session sees it.
#[derive(Debug, Clone)]
enum Msg {
    /// Refused by the frame parser with this code: counts toward the 1008 streak.
    Bad(&'static str),
    Ping,
    Subscribe(String),
    Unsubscribe(String),
    Publish(String),
    /// An `auth` or `refresh` frame on an authenticated connection.
    Refresh {
        accepted: bool,
    },
}

/// The answer to expect.
#[derive(Debug)]
enum Want {
    Error(&'static str),
    Type(&'static str),
    Subscribed(String),
    Unsubscribed(String),
    /// Nothing: a `ping` follows and its `pong` must be the next frame.
    Nothing,
    Pong(Vec<u8>),
    Close(u16),
    /// A close, or a TCP reset: the server closed with bytes of ours unread (see its use).
    CloseOrReset(u16),
    /// The streak's last bad frame: its error frame, then the close.
    ErrorThenClose(&'static str, u16),
}

#[derive(Default)]
struct Stats {
    /// Test cases (one or more frames each) by category.
    cases: BTreeMap<&'static str, u64>,
    frames: u64,
    errors: BTreeMap<String, u64>,
    closes: BTreeMap<u16, u64>,
    /// Oversized frames answered by a reset that overtook the 1009 close.
    resets: u64,
    /// Upgrades refused before the WebSocket started, by status.
    upgrades: BTreeMap<u16, u64>,
    /// HTTP API answers, by status.
    http: BTreeMap<u16, u64>,
    connections: u64,
    failures: Vec<String>,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        for (k, v) in other.cases {
            *self.cases.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.closes {
            *self.closes.entry(k).or_default() += v;
        }
        for (k, v) in other.http {
            *self.http.entry(k).or_default() += v;
        }
        for (k, v) in other.upgrades {
            *self.upgrades.entry(k).or_default() += v;
        }
        self.frames += other.frames;
        self.resets += other.resets;
        self.connections += other.connections;
        self.failures.extend(other.failures);
    }
}

struct Conn {
    ws: RawWs,
    streak: u32,
    subs: BTreeSet<String>,
}

struct Worker<'a> {
    app: &'a TestApp,
    tokens: &'a Tokens,
    rng: fastrand::Rng,
    name: String,
    stats: Stats,
    conn: Option<Conn>,
    max_subscriptions: usize,
    max_message: usize,
}

fn ident(rng: &mut fastrand::Rng, alphabet: &[u8], len: usize) -> String {
    (0..len)
        .map(|_| alphabet[rng.usize(..alphabet.len())] as char)
        .collect()
}

const CHANNEL_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-:.";

/// Arbitrary characters: ASCII, controls, JSON punctuation, non-ASCII, astral.
fn random_text(rng: &mut fastrand::Rng, max: usize) -> String {
    let pool: Vec<char> = "{}[]\":,\\ abc019eE+-.tfnul\u{0}\u{1f}\u{7f}é€\u{2028}😀\u{fffd}"
        .chars()
        .collect();
    (0..rng.usize(0..max))
        .map(|_| {
            if rng.bool() {
                pool[rng.usize(..pool.len())]
            } else {
                rng.char(..)
            }
        })
        .collect()
}

/// A random JSON value, shallow.
fn random_json(rng: &mut fastrand::Rng, depth: u32) -> Value {
    match rng.u8(..if depth == 0 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => Value::from(rng.bool()),
        2 => Value::from(rng.i64(..)),
        3 => Value::from(rng.f64() * 1e6),
        // No NUL: `\u0000` is refused in published data (docs/protocol.md).
        4 => Value::from(random_text(rng, 12).replace('\0', " ")),
        5 => Value::from(
            (0..rng.usize(0..4))
                .map(|_| random_json(rng, depth - 1))
                .collect::<Vec<_>>(),
        ),
        _ => Value::Object(
            (0..rng.usize(0..4))
                .map(|_| (ident(rng, b"abcxyz_", 3), random_json(rng, depth - 1)))
                .collect(),
        ),
    }
}

fn invalid_channel(rng: &mut fastrand::Rng) -> Value {
    match rng.u8(..7) {
        0 => json!(""),
        1 => json!("x".repeat(129)),
        2 => json!(format!("fuzz:{}", ident(rng, b" /#?*%\\@", 1))),
        3 => json!("fuzz:é"),
        4 => json!(format!("{}\u{0}", ident(rng, CHANNEL_CHARS, 4))),
        5 => json!(format!("a{}", "😀".repeat(rng.usize(1..40)))),
        _ => json!(random_text(rng, 10) + " "),
    }
}

impl Worker<'_> {
    fn count(&mut self, category: &'static str) {
        *self.stats.cases.entry(category).or_default() += 1;
    }

    fn fail(&mut self, category: &str, detail: String) {
        let msg = format!("[{}] {category}: {detail}", self.name);
        self.stats.failures.push(msg);
        // The connection's state is unknown now: start over.
        self.conn = None;
    }

    /// A channel the fuzz token may use, or (sometimes) one it may not.
    fn channel(&mut self) -> String {
        if self.rng.u8(..4) == 0 {
            let len = self.rng.usize(1..20);
            ident(&mut self.rng, CHANNEL_CHARS, len)
        } else {
            let len = self.rng.usize(1..4);
            format!("fuzz:{}", ident(&mut self.rng, b"abcdefgh", len))
        }
    }

    /// A random text message and what the session makes of it.
    fn message(&mut self) -> (&'static str, String, Msg) {
        let rng = &mut self.rng;
        let ch = |w: &mut Self| w.channel();
        match rng.u8(..16) {
            0 | 1 => {
                let mut text = random_text(rng, 64);
                let parsed = serde_json::from_str::<serde::de::IgnoredAny>(&text);
                if parsed.is_ok() && text.trim_start().starts_with('{') {
                    text.insert(0, '#');
                }
                let code = match serde_json::from_str::<serde::de::IgnoredAny>(&text) {
                    Ok(_) => "invalid_frame",
                    Err(_) => "invalid_json",
                };
                ("random_text", text, Msg::Bad(code))
            }
            2 => {
                let v = loop {
                    let v = random_json(rng, 2);
                    if !v.is_object() {
                        break v;
                    }
                };
                (
                    "json_not_an_object",
                    v.to_string(),
                    Msg::Bad("invalid_frame"),
                )
            }
            3 => {
                let c = ch(self);
                let not_a_string = [json!(null), json!(true), json!(5), json!(1.5), json!({})];
                let text = match self.rng.u8(..8) {
                    0 => json!({"type": not_a_string[self.rng.usize(..5)]}).to_string(),
                    1 => json!({"type": ["subscribe"]}).to_string(),
                    2 => json!({"type": "subscribe", "channel": 5}).to_string(),
                    3 => json!({"type": "publish", "channel": c}).to_string(),
                    4 => json!({"type": "unsubscribe"}).to_string(),
                    5 => json!({"type": "auth", "token": 42}).to_string(),
                    6 => json!({"channel": c, "data": 1}).to_string(),
                    _ => json!({"type": "subscribe", "channel": c, "since": "4"}).to_string(),
                };
                // `{"type": null}` reads as a missing type: `invalid_frame` as well.
                ("json_wrong_types", text, Msg::Bad("invalid_frame"))
            }
            4 => {
                let ty = loop {
                    let t = random_text(&mut self.rng, 12);
                    if !KNOWN.contains(&t.as_str()) {
                        break t;
                    }
                };
                let text = json!({"type": ty, "channel": "fuzz:a"}).to_string();
                ("unknown_type", text, Msg::Bad("unknown_type"))
            }
            5 => {
                let bad = invalid_channel(&mut self.rng);
                let ty = ["subscribe", "unsubscribe", "publish"][self.rng.usize(..3)];
                let text = json!({"type": ty, "channel": bad, "data": 1}).to_string();
                ("bad_channel", text, Msg::Bad("invalid_channel"))
            }
            6 => {
                let c = ch(self);
                let n = [
                    "1e400",
                    "99999999999999999999",
                    "-1",
                    "9007199254740992",
                    "1.5",
                    "-0.0",
                ][self.rng.usize(..6)];
                let text = match self.rng.u8(..3) {
                    0 => format!(r#"{{"type":"subscribe","channel":"{c}","since":{n}}}"#),
                    1 => format!(
                        r#"{{"type":"publish","channel":"{c}","data":[1e{}]}}"#,
                        309 + self.rng.u32(..1_000_000)
                    ),
                    _ => format!(r#"{{"type":{n}}}"#),
                };
                ("huge_numbers", text, Msg::Bad("invalid_frame"))
            }
            7 => {
                // Up to ~60 KB: under the message limit.
                let depth = self.rng.usize(200..12_000);
                let (text, code) = match self.rng.u8(..4) {
                    0 => ("[".repeat(depth), "invalid_json"),
                    1 => (
                        format!(
                            r#"{{"type":"publish","channel":"fuzz:deep","data":{}1{}}}"#,
                            "[".repeat(depth),
                            "]".repeat(depth)
                        ),
                        "invalid_frame",
                    ),
                    2 => (
                        format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
                        "invalid_frame",
                    ),
                    _ => (
                        format!(
                            r#"{{"type":"subscribe","channel":"fuzz:a","x":{}"#,
                            r#"{"a":"#.repeat(depth)
                        ),
                        "invalid_json",
                    ),
                };
                ("deep_json", text, Msg::Bad(code))
            }
            8 => {
                let c = ch(self);
                let data = [
                    r#""\u0000""#,
                    r#"{"k":"a\u0000"}"#,
                    r#""\ud800""#,
                    r#"["\udfff",1]"#,
                ][self.rng.usize(..4)];
                let text = format!(r#"{{"type":"publish","channel":"{c}","data":{data}}}"#);
                ("unstorable_data", text, Msg::Bad("invalid_frame"))
            }
            9 => {
                let (label, token) =
                    self.tokens.bad[self.rng.usize(..self.tokens.bad.len())].clone();
                let _ = label;
                let ty = if self.rng.bool() { "auth" } else { "refresh" };
                let text = json!({"type": ty, "token": token}).to_string();
                (
                    "refresh_refused_token",
                    text,
                    Msg::Refresh { accepted: false },
                )
            }
            10 => {
                let (category, token, accepted) = match self.rng.u8(..3) {
                    0 => ("refresh_other_sub", self.tokens.other_sub.clone(), false),
                    1 => ("refresh_absurd_exp", self.tokens.absurd_exp.clone(), true),
                    _ => ("refresh_good", self.tokens.good.clone(), true),
                };
                let text = json!({"type": "refresh", "token": token}).to_string();
                (category, text, Msg::Refresh { accepted })
            }
            11 => ("ping", r#"{"type":"ping"}"#.to_owned(), Msg::Ping),
            12 | 13 => {
                let c = ch(self);
                let mut frame =
                    json!({"type": "subscribe", "channel": c, "x": random_json(&mut self.rng, 1)});
                if self.rng.bool() {
                    frame["since"] = json!(self.rng.i64(0..5));
                }
                ("subscribe", frame.to_string(), Msg::Subscribe(c))
            }
            14 => {
                let c = ch(self);
                (
                    "unsubscribe",
                    json!({"type": "unsubscribe", "channel": c}).to_string(),
                    Msg::Unsubscribe(c),
                )
            }
            _ => {
                let c = ch(self);
                let data = random_json(&mut self.rng, 3);
                (
                    "publish",
                    json!({"type": "publish", "channel": c, "data": data}).to_string(),
                    Msg::Publish(c),
                )
            }
        }
    }

    /// The session's answer to a message, per docs/protocol.md, updating the model.
    fn answer(&mut self, msg: &Msg) -> Want {
        let max = self.max_subscriptions;
        let conn = self.conn.as_mut().expect("connected");
        if let Msg::Bad(code) = msg {
            conn.streak += 1;
            return if conn.streak >= BAD_STREAK {
                Want::ErrorThenClose(code, 1008)
            } else {
                Want::Error(code)
            };
        }
        conn.streak = 0;
        let allowed = |c: &str| c.starts_with("fuzz:");
        match msg {
            Msg::Bad(_) => unreachable!(),
            Msg::Ping => Want::Type("pong"),
            Msg::Subscribe(c) if !allowed(c) => Want::Error("forbidden"),
            Msg::Subscribe(c) if !conn.subs.contains(c) && conn.subs.len() >= max => {
                Want::Error("too_many_subscriptions")
            }
            Msg::Subscribe(c) => {
                conn.subs.insert(c.clone());
                Want::Subscribed(c.clone())
            }
            Msg::Unsubscribe(c) => {
                conn.subs.remove(c);
                Want::Unsubscribed(c.clone())
            }
            Msg::Publish(c) if !allowed(c) => Want::Error("forbidden"),
            Msg::Publish(_) => Want::Nothing,
            Msg::Refresh { accepted: true } => Want::Type("authenticated"),
            Msg::Refresh { accepted: false } => Want::Error("unauthorized"),
        }
    }

    async fn connect(&mut self) -> bool {
        match RawWs::connect(self.app, "", Some(&self.tokens.good)).await {
            Ok(ws) => {
                self.stats.connections += 1;
                self.conn = Some(Conn {
                    ws,
                    streak: 0,
                    subs: BTreeSet::new(),
                });
                true
            }
            Err(status) => {
                self.fail("connect", format!("upgrade refused with {status}"));
                false
            }
        }
    }

    async fn write(&mut self, frames: &[Vec<u8>]) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let bytes: Vec<u8> = frames.concat();
        self.stats.frames += frames.len() as u64;
        conn.ws.send(&bytes).await;
    }

    /// Read until `want` is met. Message and gap frames (of channels this connection
    /// subscribed and publishes to) and pings may arrive at any time and are skipped.
    async fn expect(&mut self, category: &'static str, want: Want) {
        let mut pending = Some(want);
        while let Some(want) = pending.take() {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            let event = conn.ws.next().await;
            let got = match &event {
                Event::Text(text) => match serde_json::from_str::<Value>(text) {
                    Ok(v) => v,
                    Err(_) => {
                        return self.fail(category, format!("not JSON from the server: {text}"));
                    }
                },
                Event::Ping => {
                    pending = Some(want);
                    continue;
                }
                Event::Close(code) => {
                    let code = code.unwrap_or(1005);
                    *self.stats.closes.entry(code).or_default() += 1;
                    self.conn = None;
                    match want {
                        Want::Close(c) | Want::CloseOrReset(c) if c == code => return,
                        other => {
                            return self
                                .fail(category, format!("expected {other:?}, got close {code}"));
                        }
                    }
                }
                Event::Pong(payload) => {
                    match want {
                        Want::Pong(p) if &p == payload => return,
                        // Pongs of pings interleaved in a fragmented message.
                        other => {
                            pending = Some(other);
                            continue;
                        }
                    }
                }
                Event::Gone(why) => {
                    if matches!(want, Want::CloseOrReset(_)) && why.contains("reset") {
                        self.stats.resets += 1;
                        self.conn = None;
                        return;
                    }
                    let detail = format!("expected {want:?}, the connection ended: {why}");
                    return self.fail(category, detail);
                }
                other => {
                    let detail = format!("expected {want:?}, got {other:?}");
                    return self.fail(category, detail);
                }
            };
            let ty = got["type"].as_str().unwrap_or_default();
            if ty == "error" {
                *self
                    .stats
                    .errors
                    .entry(got["code"].as_str().unwrap_or("?").to_owned())
                    .or_default() += 1;
            }
            let matched = match &want {
                Want::Error(code) | Want::ErrorThenClose(code, _) => {
                    ty == "error" && got["code"] == *code
                }
                Want::Type(t) => ty == *t,
                Want::Subscribed(c) => ty == "subscribed" && got["channel"] == c.as_str(),
                Want::Unsubscribed(c) => ty == "unsubscribed" && got["channel"] == c.as_str(),
                Want::Nothing | Want::Pong(_) | Want::Close(_) | Want::CloseOrReset(_) => false,
            };
            match want {
                _ if ty == "message" || ty == "gap" => pending = Some(want),
                Want::ErrorThenClose(_, code) if matched => pending = Some(Want::Close(code)),
                _ if matched => return,
                other => {
                    return self.fail(category, format!("expected {other:?}, got {got}"));
                }
            }
        }
    }

    /// Send a message (whole or fragmented with control frames in between) and check the answer.
    async fn message_case(&mut self, fragmented: bool) {
        let (category, text, msg) = self.message();
        let category = if fragmented { "fragmented" } else { category };
        self.count(category);
        let frames = if fragmented && !text.is_empty() {
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = (0..self.rng.usize(1..5))
                .map(|_| self.rng.usize(0..=bytes.len()))
                .collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut frames = Vec::new();
            let mut start = 0;
            let mut pongs = 0;
            for (i, end) in cuts.iter().copied().chain([bytes.len()]).enumerate() {
                let last = end == bytes.len();
                if end < start || (end == start && !last) {
                    continue;
                }
                let opcode = if i == 0 || frames.is_empty() {
                    op::TEXT
                } else {
                    op::CONT
                };
                frames.push(frame(&mut self.rng, last, 0, opcode, &bytes[start..end]));
                start = end;
                if !last && self.rng.bool() {
                    // Control frames may come between the fragments of a message.
                    frames.push(frame(&mut self.rng, true, 0, op::PING, b"mid"));
                    pongs += 1;
                }
                if last {
                    break;
                }
            }
            let _ = pongs;
            frames
        } else {
            vec![text_frame(&mut self.rng, &text)]
        };
        self.write(&frames).await;
        let want = self.answer(&msg);
        self.settle(category, want).await;
    }

    /// Check `want`; for `Nothing`, a ping must be answered next.
    async fn settle(&mut self, category: &'static str, want: Want) {
        if let Want::Nothing = want {
            let ping = text_frame(&mut self.rng, r#"{"type":"ping"}"#);
            self.write(&[ping]).await;
            if let Some(conn) = self.conn.as_mut() {
                conn.streak = 0;
            }
            self.expect(category, Want::Type("pong")).await;
        } else {
            self.expect(category, want).await;
        }
    }

    /// One frame-level case.
    async fn frame_case(&mut self) {
        let r = &mut self.rng;
        let (category, frames, want): (&'static str, Vec<Vec<u8>>, Option<Want>) = match r.u8(..15)
        {
            0 | 1 => {
                let payload: Vec<u8> = (0..r.usize(0..256)).map(|_| r.u8(..)).collect();
                let f = frame(r, true, 0, op::BINARY, &payload);
                ("binary", vec![f], None)
            }
            2 => {
                let payload: Vec<u8> = (0..r.usize(0..=125)).map(|_| r.u8(..)).collect();
                let f = frame(r, true, 0, op::PING, &payload);
                ("control_ping", vec![f], Some(Want::Pong(payload)))
            }
            3 => {
                let f = frame(r, true, 0, op::PONG, b"unsolicited");
                ("control_pong", vec![f], Some(Want::Nothing))
            }
            4 => {
                let mut bytes = br#"{"type":"ping","x":""#.to_vec();
                let bad: &[&[u8]] = &[
                    b"\xff",
                    b"\xc3\x28",
                    b"\xed\xa0\x80",
                    b"\xf8\x88\x80\x80\x80",
                    b"\xe2\x82",
                ];
                bytes.extend(bad[r.usize(..bad.len())]);
                bytes.extend(br#""}"#);
                let frames = if r.bool() {
                    vec![frame(r, true, 0, op::TEXT, &bytes)]
                } else {
                    let mid = r.usize(1..bytes.len());
                    vec![
                        frame(r, false, 0, op::TEXT, &bytes[..mid]),
                        frame(r, true, 0, op::CONT, &bytes[mid..]),
                    ]
                };
                ("invalid_utf8", frames, Some(Want::Close(1007)))
            }
            5 => {
                let rsv = r.u8(1..8);
                let opcode = [op::TEXT, op::BINARY, op::PING][r.usize(..3)];
                let f = frame(r, true, rsv, opcode, br#"{"type":"ping"}"#);
                ("reserved_bits", vec![f], Some(Want::Close(1002)))
            }
            6 => {
                let opcode = [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF][r.usize(..10)];
                let f = frame(r, true, 0, opcode, b"?");
                ("bad_opcode", vec![f], Some(Want::Close(1002)))
            }
            7 => {
                let frames = match r.u8(..3) {
                    // Continuation of nothing.
                    0 => vec![frame(r, true, 0, op::CONT, b"{}")],
                    // A new message in the middle of a fragmented one.
                    1 => vec![
                        frame(r, false, 0, op::TEXT, b"{\"type\""),
                        frame(r, true, 0, op::TEXT, b"{}"),
                    ],
                    _ => vec![
                        frame(r, false, 0, op::BINARY, b"ab"),
                        frame(r, true, 0, op::BINARY, b"cd"),
                    ],
                };
                ("bad_continuation", frames, Some(Want::Close(1002)))
            }
            8 => {
                let f = if r.bool() {
                    frame(r, false, 0, op::PING, b"fragmented control")
                } else {
                    frame(r, true, 0, op::PING, &[b'p'; 126])
                };
                ("bad_control_frame", vec![f], Some(Want::Close(1002)))
            }
            9 => {
                let f = encode(r, true, 0, op::TEXT, br#"{"type":"ping"}"#, 15, false);
                ("unmasked", vec![f], Some(Want::Close(1002)))
            }
            10 => {
                let (payload, want): (Vec<u8>, u16) = match r.u8(..5) {
                    0 => {
                        let code = [1000u16, 1001, 3000, 4000, 4999][r.usize(..5)];
                        (code.to_be_bytes().to_vec(), code)
                    }
                    1 => {
                        let code = [0u16, 999, 1004, 1005, 1006, 1015, 2999, 5000][r.usize(..8)];
                        (code.to_be_bytes().to_vec(), 1002)
                    }
                    2 => (vec![3], 1002),
                    3 => ([&1000u16.to_be_bytes()[..], b"\xff\xfe"].concat(), 1007),
                    _ => (Vec::new(), 1005),
                };
                let f = frame(r, true, 0, op::CLOSE, &payload);
                ("client_close", vec![f], Some(Want::Close(want)))
            }
            11 | 12 => {
                let max = self.max_message;
                let r = &mut self.rng;
                let mut want = Want::Close(1009);
                let frames = match r.u8(..4) {
                    // Only the header, claiming more than the limit: refused before any payload.
                    0 => {
                        let claimed = (max as u64 + 1).max(r.u64(..));
                        vec![encode(r, true, 0, op::TEXT, &[], claimed, true)]
                    }
                    1 => vec![encode(r, true, 0, op::TEXT, &[], max as u64 + 1, true)],
                    // The real thing: 100k `[`. Refused at its header, so the server closes
                    // with the payload unread, and the kernel may answer with a reset that
                    // overtakes the close frame.
                    2 => {
                        want = Want::CloseOrReset(1009);
                        vec![frame(r, true, 0, op::TEXT, "[".repeat(100_000).as_bytes())]
                    }
                    // Fragments, each small, together too big (by the last byte).
                    _ => {
                        let part = vec![b' '; max / 4 + 1];
                        let mut frames = vec![frame(r, false, 0, op::TEXT, &part)];
                        for i in 0..3 {
                            frames.push(frame(r, i == 2, 0, op::CONT, &part));
                        }
                        frames
                    }
                };
                ("oversized", frames, Some(want))
            }
            13 => {
                // New channels until `too_many_subscriptions`.
                self.count("subscription_limit");
                for i in 0..=self.max_subscriptions {
                    let channel = format!("fuzz:limit{i}");
                    let text = json!({"type": "subscribe", "channel": channel}).to_string();
                    let f = text_frame(&mut self.rng, &text);
                    self.write(&[f]).await;
                    if self.conn.is_none() {
                        return;
                    }
                    let want = self.answer(&Msg::Subscribe(channel));
                    self.expect("subscription_limit", want).await;
                }
                return;
            }
            _ => {
                // 32 bad frames in a row.
                let mut frames = Vec::new();
                let conn = self.conn.as_mut().expect("connected");
                let left = BAD_STREAK - conn.streak;
                for _ in 0..left {
                    frames.push(text_frame(&mut self.rng, "not json"));
                }
                self.count("bad_streak");
                self.write(&frames).await;
                for _ in 0..left {
                    if self.conn.is_none() {
                        break;
                    }
                    let want = self.answer(&Msg::Bad("invalid_json"));
                    self.expect("bad_streak", want).await;
                }
                return;
            }
        };
        self.count(category);
        self.write(&frames).await;
        let want = match want {
            Some(want) => want,
            None => self.answer(&Msg::Bad("unsupported_binary")),
        };
        self.settle(category, want).await;
    }

    /// A WebSocket opened without a token: the first frame decides.
    async fn handshake_case(&mut self) {
        let tokens = self.tokens;
        let r = &mut self.rng;
        let (category, first, accepted) = match r.u8(..10) {
            0..=3 => {
                let (_, token) = &tokens.bad[r.usize(..tokens.bad.len())];
                (
                    "handshake_refused_token",
                    text_frame(r, &json!({"type": "auth", "token": token}).to_string()),
                    false,
                )
            }
            4 => (
                "handshake_not_auth",
                text_frame(r, r#"{"type":"subscribe","channel":"fuzz:a"}"#),
                false,
            ),
            5 => (
                "handshake_not_json",
                text_frame(r, "{\"type\":\"auth\",\"token\":"),
                false,
            ),
            6 => (
                "handshake_binary",
                frame(r, true, 0, op::BINARY, b"\x00auth"),
                false,
            ),
            7 => (
                "handshake_absurd_exp",
                text_frame(
                    r,
                    &json!({"type": "auth", "token": tokens.absurd_exp}).to_string(),
                ),
                true,
            ),
            _ => (
                "handshake_good",
                text_frame(
                    r,
                    &json!({"type": "auth", "token": tokens.good}).to_string(),
                ),
                true,
            ),
        };
        self.count(category);
        let ws = match RawWs::connect(self.app, "?channels=fuzz:h", None).await {
            Ok(ws) => ws,
            Err(status) => return self.fail(category, format!("upgrade refused with {status}")),
        };
        self.stats.connections += 1;
        // Borrow the slot of the main connection for the checks, then put it back.
        let main = self.conn.replace(Conn {
            ws,
            streak: 0,
            subs: BTreeSet::new(),
        });
        self.write(&[first]).await;
        if accepted {
            self.expect(category, Want::Type("authenticated")).await;
            // The query's subscription waited for the handshake; then the connection works.
            self.expect(category, Want::Subscribed("fuzz:h".into()))
                .await;
            let ping = text_frame(&mut self.rng, r#"{"type":"ping"}"#);
            if self.conn.is_some() {
                self.write(&[ping]).await;
                self.expect(category, Want::Type("pong")).await;
            }
            let bye = frame(&mut self.rng, true, 0, op::CLOSE, &1000u16.to_be_bytes());
            if self.conn.is_some() {
                self.write(&[bye]).await;
                self.expect(category, Want::Close(1000)).await;
            }
        } else {
            self.expect(category, Want::Close(4001)).await;
        }
        self.conn = main;
    }

    /// The upgrade request itself: a refused token gets 401, a bad query 400, both before the
    /// upgrade.
    async fn upgrade_case(&mut self) {
        let good = self.tokens.good.clone();
        let (category, token, query, refused) = match self.rng.u8(..8) {
            0 | 1 => (
                "upgrade_absurd_exp",
                self.tokens.absurd_exp.clone(),
                String::new(),
                None,
            ),
            2 | 3 => {
                let too_many: Vec<String> = (0..=self.max_subscriptions)
                    .map(|i| format!("fuzz:q{i}"))
                    .collect();
                let query = [
                    "?channels=fuzz:a%20b".to_owned(),
                    "?channels=fuzz:a&since.fuzz:a=-1".to_owned(),
                    "?channels=fuzz:a&since.fuzz:a=9007199254740992".to_owned(),
                    "?channels=fuzz:a&since.fuzz:b=1".to_owned(),
                    "?channels=fuzz:a&since.fuzz:a=1e3".to_owned(),
                    format!("?channels={}", "x".repeat(129)),
                    format!("?channels={}", too_many.join(",")),
                ][self.rng.usize(..7)]
                .clone();
                ("upgrade_bad_query", good, query, Some(400))
            }
            _ => {
                let (_, t) = self.tokens.bad[self.rng.usize(..self.tokens.bad.len())].clone();
                // An empty bearer is no token: then the handshake frame is awaited instead.
                let t = if t.is_empty() { "x".to_owned() } else { t };
                ("upgrade_refused_token", t, String::new(), Some(401))
            }
        };
        self.count(category);
        match (
            RawWs::connect(self.app, &query, Some(&token)).await,
            refused,
        ) {
            (Err(status), Some(want)) if status == want => {
                *self.stats.upgrades.entry(status).or_default() += 1;
            }
            (Ok(ws), None) => {
                self.stats.connections += 1;
                let main = self.conn.replace(Conn {
                    ws,
                    streak: 0,
                    subs: BTreeSet::new(),
                });
                let ping = text_frame(&mut self.rng, r#"{"type":"ping"}"#);
                self.write(&[ping]).await;
                self.expect(category, Want::Type("pong")).await;
                self.conn = main;
            }
            (Err(status), _) => self.fail(category, format!("{query}: upgrade answered {status}")),
            (Ok(_), Some(_)) => self.fail(category, format!("{query}: upgrade accepted")),
        }
    }

    async fn run(mut self, cases: usize) -> Stats {
        for _ in 0..cases {
            if self.conn.is_none() && !self.connect().await {
                continue;
            }
            match self.rng.u8(..100) {
                0..=59 => self.message_case(false).await,
                60..=67 => self.message_case(true).await,
                68..=89 => self.frame_case().await,
                90..=97 => self.handshake_case().await,
                _ => self.upgrade_case().await,
            }
        }
        self.stats
    }
}

const KNOWN: &[&str] = &[
    "subscribe",
    "unsubscribe",
    "publish",
    "ping",
    "auth",
    "refresh",
];

// ---------------------------------------------------------------------------------------------
// Side cases that take wall time: expiry, handshake timeout, a stalled frame.

async fn slow_cases(app: &TestApp) -> Stats {
    let mut stats = Stats::default();
    let mut rng = fastrand::Rng::with_seed(0);
    let check = |stats: &mut Stats, category: &'static str, got: Event, want: u16| {
        *stats.cases.entry(category).or_default() += 1;
        match got {
            Event::Close(Some(code)) => {
                *stats.closes.entry(code).or_default() += 1;
                if code != want {
                    stats
                        .failures
                        .push(format!("{category}: close {code}, expected {want}"));
                }
            }
            other => stats
                .failures
                .push(format!("{category}: {other:?}, expected close {want}")),
        }
    };
    let expiring = async {
        let mut ws = RawWs::connect(app, "", Some(&good_token(2))).await.unwrap();
        let warned = ws.next().await;
        let warned = matches!(&warned, Event::Text(t) if t.contains("token_expiring"));
        (warned, unpinged(&mut ws, Duration::from_secs(8)).await)
    };
    /// The next event that is not a ping.
    async fn unpinged(ws: &mut RawWs, within: Duration) -> Event {
        loop {
            match ws.next_within(within).await {
                Event::Ping => continue,
                other => return other,
            }
        }
    }
    let silent = async {
        let mut ws = RawWs::connect(app, "", None).await.unwrap();
        unpinged(&mut ws, Duration::from_secs(6)).await
    };
    let mut stalled_ws = RawWs::connect(app, "", Some(&good_token(3600)))
        .await
        .unwrap();
    // A frame header promising 100 bytes, then 10 of them, then nothing.
    let partial = encode(&mut rng, true, 0, op::TEXT, &[b' '; 10], 100, true);
    stalled_ws.send(&partial[..partial.len()]).await;
    let stalled = unpinged(&mut stalled_ws, Duration::from_secs(15));
    let ((warned, expired), silent, stalled) = tokio::join!(expiring, silent, stalled);
    stats.connections += 3;
    stats.frames += 2;
    if !warned {
        stats
            .failures
            .push("token_expiry: no token_expiring frame first".into());
    }
    check(&mut stats, "token_expiry", expired, 4003);
    check(&mut stats, "handshake_timeout", silent, 4001);
    check(&mut stats, "stalled_frame", stalled, 4000);
    stats
}

// ---------------------------------------------------------------------------------------------
// HTTP bodies and Redis payloads, fuzzed alongside.

async fn http_fuzz(app: &TestApp, seed: u64, cases: usize) -> Stats {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut stats = Stats::default();
    let token = good_token(3600);
    let max_body = app.settings.http.max_body_bytes;
    for _ in 0..cases {
        let mut channel = format!("fuzz:{}", ident(&mut rng, b"abc", 2));
        let mut content_type = "application/json";
        let mut bearer = Some(token.as_str());
        let (category, body, want): (&'static str, Vec<u8>, u16) = match rng.u8(..10) {
            0 => (
                "http_random_bytes",
                (0..rng.usize(0..200)).map(|_| rng.u8(..)).collect(),
                400,
            ),
            1 => (
                "http_not_an_envelope",
                random_json(&mut rng, 2).to_string().into_bytes(),
                400,
            ),
            2 => {
                let data = [r#""\u0000""#, r#""\ud800""#, "1e400", "-1e-99999"][rng.usize(..4)];
                (
                    "http_unstorable_data",
                    format!(r#"{{"data":{data}}}"#).into_bytes(),
                    400,
                )
            }
            3 => {
                let depth = rng.usize(101..5000);
                let body = format!(r#"{{"data":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
                ("http_deep_data", body.into_bytes(), 400)
            }
            4 => {
                content_type =
                    ["text/plain", "application/x-www-form-urlencoded", ""][rng.usize(..3)];
                ("http_wrong_content_type", br#"{"data":1}"#.to_vec(), 415)
            }
            5 => (
                "http_too_large",
                format!(r#"{{"data":"{}"}}"#, "x".repeat(max_body)).into_bytes(),
                413,
            ),
            6 => {
                channel =
                    ["%20", "a%2Fb", &"x".repeat(129), "%C3%A9", "a*"][rng.usize(..5)].to_owned();
                ("http_bad_channel", br#"{"data":1}"#.to_vec(), 400)
            }
            7 => {
                bearer = if rng.bool() { None } else { Some("garbage") };
                ("http_no_or_bad_token", br#"{"data":1}"#.to_vec(), 401)
            }
            8 => {
                channel = "elsewhere".to_owned();
                ("http_forbidden_channel", br#"{"data":1}"#.to_vec(), 403)
            }
            _ => {
                let body = json!({"data": random_json(&mut rng, 3)})
                    .to_string()
                    .into_bytes();
                ("http_valid", body, 201)
            }
        };
        *stats.cases.entry(category).or_default() += 1;
        let mut req = app
            .http
            .post(app.url(&format!("/api/v1/channels/{channel}/messages")))
            .body(body);
        if !content_type.is_empty() {
            req = req.header("content-type", content_type);
        }
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.expect("request");
        let status = res.status().as_u16();
        *stats.http.entry(status).or_default() += 1;
        let body = res.text().await.unwrap_or_default();
        let json_error = status == 201
            || serde_json::from_str::<Value>(&body).is_ok_and(|b| b["error"]["code"].is_string());
        if status != want || !json_error {
            stats
                .failures
                .push(format!("{category}: {status} {body}, expected {want}"));
        }
    }
    stats
}

/// Garbage and forged envelopes PUBLISHed straight to the healthy channel. Returns the stats,
/// how many payloads must be skipped, and the forged envelopes' numbers (delivered `id: null`).
async fn redis_fuzz(app: &TestApp, seed: u64, cases: usize) -> (Stats, u64, Vec<u64>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut stats = Stats::default();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let channel = format!("{}healthy", app.settings.redis.channel_prefix);
    let (mut invalid, mut forged) = (0, Vec::new());
    for k in 0..cases as u64 {
        let (category, payload): (&'static str, Vec<u8>) = match rng.u8(..8) {
            0 => (
                "redis_not_utf8",
                [&b"{\"data\":\xff"[..], &[rng.u8(128..)]].concat(),
            ),
            1 => (
                "redis_not_json",
                format!("#{}", random_text(&mut rng, 40)).into_bytes(),
            ),
            2 => (
                "redis_not_an_object",
                json!([random_json(&mut rng, 1)]).to_string().into_bytes(),
            ),
            3 => (
                "redis_no_data",
                json!({"id": rng.i64(..), "x": random_json(&mut rng, 1)})
                    .to_string()
                    .into_bytes(),
            ),
            4 => {
                let id = [r#""7""#, "1.5", "99999999999999999999", "[]"][rng.usize(..4)];
                (
                    "redis_bad_id",
                    format!(r#"{{"data":1,"id":{id}}}"#).into_bytes(),
                )
            }
            5 => {
                let full = json!({"data": {"k": random_text(&mut rng, 10)}}).to_string();
                (
                    "redis_truncated",
                    full.as_bytes()[..rng.usize(1..full.len())].to_vec(),
                )
            }
            6 => (
                "redis_deep_unclosed",
                format!(r#"{{"data":{}"#, "[".repeat(rng.usize(1..5000))).into_bytes(),
            ),
            _ => {
                // A valid envelope from an outside program: delivered, but never with its id.
                let mut env = json!({"data": {"forged": k}, "id": rng.i64(..)});
                if rng.bool() {
                    env["origin"] = json!("someone");
                }
                if rng.bool() {
                    env["traceparent"] = json!(random_text(&mut rng, 60));
                    env["ts"] = json!(rng.i64(..));
                }
                forged.push(k);
                *stats.cases.entry("redis_forged_envelope").or_default() += 1;
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(env.to_string())
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                continue;
            }
        };
        invalid += 1;
        *stats.cases.entry(category).or_default() += 1;
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap();
        if k % 16 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    (stats, invalid, forged)
}

/// The safety net behind the `data` check: what Postgres refuses as data is the client's
/// fault (400 / `invalid_frame`), not an outage.
#[tokio::test]
async fn postgres_refusing_data_is_a_client_error() {
    let app = spawn_app_on(Backend::Services, |_| {}).await;
    for data in [r#""\u0000""#, r#""\ud800""#, "1e200000"] {
        let raw = serde_json::value::RawValue::from_string(data.to_owned()).unwrap();
        let err = app
            .store
            .append("x", &raw, Default::default())
            .await
            .expect_err(data);
        assert!(err.is_data_rejected(), "{data}: {err}");
    }
    let raw = serde_json::value::RawValue::from_string("1".to_owned()).unwrap();
    assert!(
        app.store
            .append("x", &raw, Default::default())
            .await
            .is_ok()
    );
}

// ---------------------------------------------------------------------------------------------
// The run.

/// What the healthy subscriber saw.
#[derive(Debug, Default)]
struct Healthy {
    ids: Vec<i64>,
    forged: Vec<u64>,
    other: Vec<String>,
    longest_silence: Duration,
}

async fn websocket_fuzz(backend: Backend) {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let frames: usize = std::env::var("FUZZ_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    println!("fuzz {backend:?}: FUZZ_SEED={seed} FUZZ_FRAMES={frames}");
    let app = spawn_app_on(backend, fuzz_settings).await;
    let tokens = tokens();
    let started = Instant::now();

    // The healthy subscriber, on its own connection through a standard client.
    let sub_token = hs(
        &claims("watcher", 3600, json!({"subscribe": ["healthy"]})),
        None,
        SECRET,
    );
    let mut healthy_ws = app
        .try_connect_ws(
            "?channels=healthy",
            &[("authorization", &format!("Bearer {sub_token}"))],
        )
        .await
        .expect("healthy subscriber connects");
    healthy_ws.expect_type("subscribed").await;
    let (target_tx, mut target_rx) = tokio::sync::watch::channel::<Option<(usize, usize)>>(None);
    let subscriber = tokio::spawn(async move {
        let mut seen = Healthy::default();
        let mut last = Instant::now();
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            if let Some((n, f)) = *target_rx.borrow() {
                if seen.ids.len() >= n && seen.forged.len() >= f {
                    break;
                }
                let d = *deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_secs(15));
                if tokio::time::Instant::now() >= d {
                    break;
                }
            }
            tokio::select! {
                _ = target_rx.changed() => {}
                msg = tokio::time::timeout(Duration::from_millis(500), healthy_ws.stream.next()) => {
                    let Ok(msg) = msg else { continue };
                    match msg {
                        Some(Ok(Message::Text(text))) => {
                            seen.longest_silence = seen.longest_silence.max(last.elapsed());
                            last = Instant::now();
                            let v: Value = serde_json::from_str(&text).unwrap();
                            match (v["type"].as_str(), v["id"].as_i64()) {
                                (Some("message"), Some(id)) if v["data"]["n"] == id => seen.ids.push(id),
                                (Some("message"), None) if v["data"]["forged"].is_u64() => {
                                    seen.forged.push(v["data"]["forged"].as_u64().unwrap());
                                }
                                _ => seen.other.push(text.to_string()),
                            }
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        other => {
                            seen.other.push(format!("{other:?}"));
                            break;
                        }
                    }
                }
            }
        }
        seen
    });

    // A steady publisher on the healthy channel, over HTTP.
    let stop = Arc::new(AtomicBool::new(false));
    let pub_token = hs(
        &claims("publisher", 3600, json!({"publish": ["healthy"]})),
        None,
        SECRET,
    );
    let publisher = {
        let (http, url, stop) = (
            app.http.clone(),
            app.url("/api/v1/channels/healthy/messages"),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0i64;
            let mut refused = Vec::new();
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let res = http
                    .post(&url)
                    .bearer_auth(&pub_token)
                    .json(&json!({"data": {"n": n + 1}}))
                    .send()
                    .await;
                match res {
                    Ok(res) if res.status() == 201 => {
                        let id = res.json::<Value>().await.unwrap()["id"].as_i64();
                        n += 1;
                        if id != Some(n) {
                            refused.push(format!("publish {n} got id {id:?}"));
                        }
                    }
                    other => refused.push(format!("publish {}: {other:?}", n + 1)),
                }
                slowest = slowest.max(sent.elapsed());
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            (n, refused, slowest)
        })
    };

    // Health, polled throughout.
    let health = {
        let (http, base, stop) = (app.http.clone(), app.url(""), stop.clone());
        tokio::spawn(async move {
            let mut answers: BTreeMap<String, u64> = BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                for path in ["/healthz", "/readyz"] {
                    let status = match http
                        .get(format!("{base}{path}"))
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await
                    {
                        Ok(res) => res.status().as_u16().to_string(),
                        Err(e) => format!("error: {e}"),
                    };
                    *answers.entry(format!("{path} {status}")).or_default() += 1;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            answers
        })
    };

    // The fuzzing itself.
    let per_worker = frames / WORKERS;
    let metrics_before = app.metrics().await;
    let workers = (0..WORKERS).map(|i| {
        let worker = Worker {
            app: &app,
            tokens: &tokens,
            rng: fastrand::Rng::with_seed(seed.wrapping_add(i as u64)),
            name: format!("worker {i}"),
            stats: Stats::default(),
            conn: None,
            max_subscriptions: app.settings.ws.max_subscriptions,
            max_message: app.settings.ws.max_message_bytes,
        };
        worker.run(per_worker)
    });
    let redis_cases = if backend == Backend::Services {
        frames / 10
    } else {
        0
    };
    let (worker_stats, slow, http, (redis_stats, redis_invalid, forged)) = tokio::join!(
        futures_util::future::join_all(workers),
        slow_cases(&app),
        http_fuzz(&app, seed ^ 0x4854_5450, frames / 10),
        async {
            if redis_cases == 0 {
                (Stats::default(), 0, Vec::new())
            } else {
                redis_fuzz(&app, seed ^ 0x5245_4449, redis_cases).await
            }
        },
    );
    let fuzz_time = started.elapsed();

    stop.store(true, Ordering::Relaxed);
    let (published, publish_errors, slowest_publish) = publisher.await.unwrap();
    let _ = target_tx.send(Some((published as usize, forged.len())));
    let healthy = subscriber.await.unwrap();
    let health = health.await.unwrap();
    let after = [
        app.get("/healthz").await.status(),
        app.get("/readyz").await.status(),
    ];
    let metrics_after = app.metrics().await;

    let mut stats = Stats::default();
    for s in worker_stats {
        stats.merge(s);
    }
    stats.merge(slow);
    stats.merge(http);
    stats.merge(redis_stats);
    let skipped = metrics_after.sum("relay_redis_invalid_payloads_total", &[])
        - metrics_before.sum("relay_redis_invalid_payloads_total", &[]);

    println!("fuzz {backend:?} (seed {seed}) finished in {fuzz_time:.1?}");
    println!("  cases by category: {:?}", stats.cases);
    println!(
        "  cases: {}, WebSocket frames written: {}, connections: {}",
        stats.cases.values().sum::<u64>(),
        stats.frames,
        stats.connections
    );
    println!(
        "  error frames by code: {:?} (total {})",
        stats.errors,
        stats.errors.values().sum::<u64>()
    );
    println!(
        "  closes by code: {:?}; resets after an oversized frame: {}",
        stats.closes, stats.resets
    );
    println!("  upgrades refused by status: {:?}", stats.upgrades);
    println!("  HTTP answers by status: {:?}", stats.http);
    println!(
        "  healthy subscriber: {} of {} published messages, in order; {} forged Redis envelopes; longest silence {:?} (slowest publish {:?})",
        healthy.ids.len(),
        published,
        healthy.forged.len(),
        healthy.longest_silence,
        slowest_publish
    );
    if backend == Backend::Services {
        println!("  Redis payloads skipped: {redis_invalid} sent, {skipped} counted");
    }
    println!("  health checks: {health:?}");

    let failures = &stats.failures;
    assert!(
        failures.is_empty(),
        "{} unexpected answers (FUZZ_SEED={seed}), first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(15)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(publish_errors.is_empty(), "{publish_errors:?}");
    assert!(published > 0, "the publisher published nothing");
    let expected: Vec<i64> = (1..=published).collect();
    assert!(
        healthy.ids == expected,
        "healthy subscriber: gap, duplicate or reorder: got {} ids, first differences {:?}; other frames {:?}",
        healthy.ids.len(),
        healthy
            .ids
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a != b)
            .take(5)
            .collect::<Vec<_>>(),
        healthy.other.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        healthy.other.is_empty(),
        "healthy subscriber got {:?}",
        healthy.other
    );
    let mut got_forged = healthy.forged.clone();
    got_forged.sort_unstable();
    assert_eq!(
        got_forged, forged,
        "forged envelopes are delivered once each, without their id"
    );
    assert!(
        skipped >= redis_invalid as f64,
        "{skipped} of {redis_invalid} garbage payloads counted as skipped"
    );
    assert!(
        health.keys().all(|k| k.ends_with(" 200")),
        "health answers: {health:?}"
    );
    assert!(health.values().sum::<u64>() >= 2, "health was polled");
    assert_eq!(after, [200, 200], "health after the run");
    if frames >= 2000 {
        for code in [1002, 1007, 1008, 1009, 4000, 4001, 4003] {
            assert!(
                stats.closes.contains_key(&code),
                "no close {code} in a run of {frames}"
            );
        }
    }
}

crate::on_both_backends!(websocket_fuzz);
