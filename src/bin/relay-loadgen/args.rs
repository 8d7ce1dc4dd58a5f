//! Command-line options of `relay-loadgen`, and the checks that turn them into a valid plan
//! before anything connects anywhere.

use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Load generator for relay: N WebSocket subscribers over K channels, a fixed publish rate, and
/// a report of delivery completeness, latency, and (with --pid) the server's memory and CPU cost.
#[derive(Debug, Clone, Parser)]
#[command(name = "relay-loadgen", version)]
pub struct Args {
    /// relay's base HTTP URL; WebSockets go to the same host at /ws.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// Bearer token for a relay with `auth.mode = required` (e.g. from `relay token`): sent as
    /// `?token=` on every WebSocket and as `Authorization: Bearer` on HTTP publishes.
    #[arg(long, env = "RELAY_LOADGEN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Subscriber WebSocket connections.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,

    /// Channels the subscribers are spread over (connection i subscribes to channel i mod K).
    #[arg(long, default_value_t = 10)]
    pub channels: usize,

    /// Channel names are `<prefix>-0` … `<prefix>-<K-1>`.
    #[arg(long, default_value = "lg")]
    pub channel_prefix: String,

    /// Connections being opened (connect + upgrade + `subscribed`) at the same time.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,

    /// Give up on one connection (connect + upgrade + `subscribed`) after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Total publish rate in messages per second, round-robin over the channels (0: publish
    /// nothing, e.g. to measure idle connections).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,

    /// How long to publish (seconds, or a duration such as `500ms`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Publish exactly this many messages (at --rate) instead of for --duration.
    #[arg(long, conflicts_with = "duration")]
    pub messages: Option<u64>,

    /// How messages reach relay.
    #[arg(long, value_enum, default_value_t = Via::Redis)]
    pub publish_via: Via,

    /// Redis for --publish-via redis.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// relay's `redis.channel_prefix`.
    #[arg(long, default_value = "relay:")]
    pub redis_prefix: String,

    /// Pad each message's data to about this many bytes (0: the smallest stamp, ~35 bytes).
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,

    /// Tokio worker threads for the subscriber connections (the publish schedule runs on the
    /// main thread). Keep it small: the generator shares the machine with the server.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// After the last publish, wait at most this long for outstanding deliveries.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub drain: Duration,

    /// Keep the subscribed connections idle this long before publishing.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub hold: Duration,

    /// relay's process id: report its RSS per connection and CPU per delivery (Linux /proc).
    #[arg(long)]
    pub pid: Option<u32>,

    /// No relay: write frame-sized buffers to N loopback sockets drained by a child process, at
    /// the same rate and fan-out, and report writes per CPU-second (the kernel's floor).
    #[arg(long)]
    pub bare_write_floor: bool,

    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Exit non-zero if anything was lost, duplicated or reordered, or a publish failed.
    #[arg(long)]
    pub expect_lossless: bool,

    /// Internal: run as the socket-draining child of --bare-write-floor.
    #[arg(long, hide = true)]
    pub floor_sink: bool,
}

/// The publish path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// PUBLISH the envelope `{"data":…}` straight to Redis (no Postgres, `id` null).
    Redis,
    /// `POST /api/v1/channels/{ch}/messages`, one request in flight per channel.
    Http,
    /// `{"type":"publish",…}` frames on one dedicated publisher WebSocket.
    Ws,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Http => "http",
            Self::Ws => "ws",
        }
    }
}

/// `10` (seconds), `2.5`, or a humantime duration such as `500ms` or `1m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| e.to_string());
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

impl Args {
    /// Messages the run publishes in total.
    pub fn total_messages(&self) -> u64 {
        match self.messages {
            Some(n) => n,
            None => (self.rate * self.duration.as_secs_f64()).round() as u64,
        }
    }

    /// The channel names, `<prefix>-<i>`.
    pub fn channel_names(&self) -> Vec<String> {
        (0..self.channels)
            .map(|i| format!("{}-{i}", self.channel_prefix))
            .collect()
    }

    /// Reject plans that cannot work, with a message saying which option is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if self.channels == 0 {
            return Err("--channels must be at least 1".into());
        }
        if self.connect_concurrency == 0 {
            return Err("--connect-concurrency must be at least 1".into());
        }
        if self.threads == 0 {
            return Err("--threads must be at least 1".into());
        }
        if !self.rate.is_finite() || self.rate < 0.0 {
            return Err("--rate must be a non-negative number".into());
        }
        if self.rate == 0.0 && self.messages.is_some_and(|n| n > 0) {
            return Err("--messages needs a --rate above 0".into());
        }
        // Mirrors relay's rule (docs/protocol.md) so a bad prefix fails here, not as 10,000
        // refused upgrades.
        let longest = format!("{}-{}", self.channel_prefix, self.channels - 1);
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.');
        if longest.len() > 128 || !self.channel_prefix.chars().all(valid) {
            return Err(format!(
                "--channel-prefix `{}` gives invalid channel names (1-128 of A-Z a-z 0-9 _ - : .)",
                self.channel_prefix
            ));
        }
        Ok(())
    }

    /// `ws://host:port/ws` from the HTTP base URL.
    pub fn ws_base(&self) -> Result<String, String> {
        let base = self.url.trim_end_matches('/');
        if let Some(rest) = base.strip_prefix("http://") {
            Ok(format!("ws://{rest}/ws"))
        } else if let Some(rest) = base.strip_prefix("ws://") {
            Ok(format!("ws://{rest}/ws"))
        } else {
            // The generator is built without TLS: it measures relay, not a TLS terminator.
            Err(format!(
                "--url `{}` must start with http:// (TLS is not supported)",
                self.url
            ))
        }
    }

    /// `&token=…` for a WebSocket URL that already has a query, or nothing without a token.
    pub fn token_query(&self) -> String {
        self.token
            .as_deref()
            .map(|t| {
                format!(
                    "&token={}",
                    url::form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>()
                )
            })
            .unwrap_or_default()
    }

    /// The HTTP base URL without a trailing slash.
    pub fn http_base(&self) -> String {
        let base = self.url.trim_end_matches('/');
        match base.strip_prefix("ws://") {
            Some(rest) => format!("http://{rest}"),
            None => base.to_owned(),
        }
    }
}
