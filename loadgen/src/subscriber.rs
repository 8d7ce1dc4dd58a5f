//! One subscriber connection: connect to `/ws?channels=<ch>`, wait for `subscribed`, then read
//! message frames until told to stop, tracking sequence (per writer of the channel), relay's
//! ids and latency.
//!
//! The read loop is the generator's hot path (one iteration per delivery, 10,000s per second on
//! a machine shared with the server): it parses a borrowed [`InFrame`], takes the wall clock
//! once, and records into a shared, uncontended histogram shard. No per-message allocation.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, protocol::WebSocketConfig},
};
use tokio_util::sync::CancellationToken;

use crate::{
    stats::{ConnSeq, InFrame, Shards},
    sys::now_micros,
};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How the connect phase of one connection went (sent to the coordinator as soon as known).
#[derive(Debug)]
pub enum Connected {
    /// Connected and subscribed to `channel` after `took`.
    Ok {
        channel: usize,
        took: Duration,
    },
    Failed(String),
}

/// Why a connection's read loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The coordinator stopped it (normal end of the run).
    Stopped,
    /// The server sent a close frame with this code (`None`: without a code).
    ClosedByServer(Option<u16>),
    /// The TCP stream ended without a close frame.
    Eof,
    /// A read error (e.g. connection reset).
    Error(String),
}

/// What one connection measured.
#[derive(Debug)]
pub struct ConnResult {
    pub channel: usize,
    pub seq: ConnSeq,
    pub end: End,
    /// `error` frames received.
    pub error_frames: u64,
    /// Frames that were not relay frames carrying our stamp (another publisher on the channel).
    pub foreign: u64,
}

/// Everything the connections share.
pub struct Shared {
    pub ws_base: String,
    /// `&token=…`, or empty.
    pub token_query: String,
    pub config: WebSocketConfig,
    pub connect_timeout: Duration,
    pub gate: Semaphore,
    pub shards: Shards,
    pub stop: CancellationToken,
    pub connected: mpsc::UnboundedSender<Connected>,
}

/// Small buffers: the generator holds as many connections as the server and mostly reads tiny
/// frames (tungstenite's default is 128 KiB per connection, eagerly allocated).
pub fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Run connection `index` on `channel`, which has `writers` writers; `None` if it never got
/// subscribed (already reported through `shared.connected`).
pub async fn run(
    shared: Arc<Shared>,
    index: usize,
    channel: usize,
    channel_name: Arc<str>,
    writers: usize,
) -> Option<ConnResult> {
    let (attempt, took) = {
        // The gate bounds connections in the handshake, not connections held open.
        let _permit = shared.gate.acquire().await.ok()?;
        // Per-connection time counts from our turn, not from the queue at the gate.
        let started = Instant::now();
        let attempt =
            tokio::time::timeout(shared.connect_timeout, connect(&shared, &channel_name)).await;
        (attempt, started.elapsed())
    };
    let mut ws = match attempt {
        Ok(Ok(ws)) => {
            let _ = shared.connected.send(Connected::Ok { channel, took });
            ws
        }
        Ok(Err(err)) => {
            let _ = shared.connected.send(Connected::Failed(err));
            return None;
        }
        Err(_) => {
            let _ = shared.connected.send(Connected::Failed(format!(
                "no `subscribed` within {:?}",
                shared.connect_timeout
            )));
            return None;
        }
    };

    let mut result = ConnResult {
        channel,
        seq: ConnSeq::new(writers),
        end: End::Stopped,
        error_frames: 0,
        foreign: 0,
    };
    // Created once: a fresh `cancelled()` per message would register and unregister a waiter
    // each time.
    let stop = shared.stop.cancelled();
    tokio::pin!(stop);
    result.end = loop {
        let incoming = tokio::select! {
            // Frames first: the stop signal is only looked at when the socket has nothing.
            biased;
            incoming = ws.next() => incoming,
            () = &mut stop => break End::Stopped,
        };
        match incoming {
            Some(Ok(Message::Text(text))) => on_text(&shared, index, &mut result, &text),
            Some(Ok(Message::Close(frame))) => {
                break End::ClosedByServer(frame.map(|f| u16::from(f.code)));
            }
            // tungstenite answers pings itself on the next read.
            Some(Ok(_)) => {}
            Some(Err(err)) => break End::Error(err.to_string()),
            None => break End::Eof,
        }
    };
    Some(result)
}

fn on_text(shared: &Shared, index: usize, result: &mut ConnResult, text: &str) {
    match serde_json::from_str::<InFrame>(text) {
        Ok(InFrame {
            ty: "message",
            data,
            id,
            ..
        }) => match (result.seq.on_message(id, data.as_ref()), data) {
            (Some(true), Some(stamp)) => {
                let now = now_micros();
                let mut shard = shared.shards.lock(index);
                shard.latency.saturating_record(now.saturating_sub(stamp.t));
                shard.delivered += 1;
                shard.last_delivery_us = shard.last_delivery_us.max(now);
            }
            (Some(_), _) => {}
            (None, _) => result.foreign += 1,
        },
        Ok(InFrame { ty: "error", .. }) => result.error_frames += 1,
        Err(_) => result.foreign += 1,
        // subscribed, unsubscribed, pong
        Ok(_) => {}
    }
}

/// Connect, upgrade, and wait for the `subscribed` frame of `channel`.
async fn connect(shared: &Shared, channel: &str) -> Result<Ws, String> {
    let url = format!(
        "{}?channels={channel}{}",
        shared.ws_base, shared.token_query
    );
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(shared.config), true)
        .await
        .map_err(|err| describe_connect_error(&err))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => match serde_json::from_str::<InFrame>(&text) {
                Ok(InFrame {
                    ty: "subscribed", ..
                }) => return Ok(ws),
                Ok(InFrame {
                    ty: "error", code, ..
                }) => {
                    return Err(format!(
                        "error frame `{}` instead of subscribed",
                        code.unwrap_or("?")
                    ));
                }
                _ => {}
            },
            Some(Ok(Message::Close(frame))) => {
                return Err(format!(
                    "closed before subscribed (code {})",
                    frame.map_or("none".to_owned(), |f| u16::from(f.code).to_string())
                ));
            }
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(format!("read before subscribed: {err}")),
            None => return Err("connection ended before subscribed".to_owned()),
        }
    }
}

/// A short, groupable description (the report counts failures by it).
fn describe_connect_error(err: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    match err {
        Error::Http(res) => format!("upgrade refused: HTTP {}", res.status()),
        Error::Io(io) => format!("connect: {}", io.kind()),
        other => format!("connect: {other}"),
    }
}
