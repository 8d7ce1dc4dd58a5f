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

    /// --publish-via batch: messages per `POST /api/v1/messages` request (default 100; relay
    /// accepts at most 1000 by default). The last request of a run may carry fewer.
    #[arg(long)]
    pub batch_size: Option<usize>,

    /// Requests in flight at once. --publish-via http: N writers (default and at least
    /// --channels) with one request in flight each; writer w publishes on channel w mod K and
    /// numbers its own messages, so requests to one channel may commit in either order while
    /// subscribers check each writer's order. --publish-via batch: N request slots (default 4, at
    /// most --channels); slot k owns the channels i with i mod N = k, so no two requests in
    /// flight share a channel and each channel's messages commit in the order they were numbered.
    #[arg(long)]
    pub http_concurrency: Option<usize>,

    /// --publish-via ws: up to N publishes in flight, each with a `ref` and completed by its
    /// `ack` (without it: fire and forget, no `ref`, a final ping/pong marks the end).
    #[arg(long)]
    pub pipeline: Option<usize>,

    /// Give every publish (http, batch, ws with --pipeline) the idempotency key
    /// `<run-id>-<channel>-<seq>` (http with more writers than channels:
    /// `<run-id>-<channel>-w<writer>-<seq>`) and retry it with the same key after a network
    /// error, a timeout or a 5xx (ws: after a lost connection, resending every unacknowledged
    /// publish).
    #[arg(long)]
    pub idempotency: bool,

    /// With --idempotency: attempts per request (or per ws publish) before giving up (default 5),
    /// with exponential backoff from 20 ms.
    #[arg(long)]
    pub max_attempts: Option<u32>,

    /// Limit for one HTTP request, Redis round trip or WebSocket connect; with --pipeline, the
    /// longest wait for a free slot or the last acks.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

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
    /// `POST /api/v1/channels/{ch}/messages`, --http-concurrency writers with one request in
    /// flight each (default one writer per channel).
    Http,
    /// `{"type":"publish",…}` frames on one dedicated publisher WebSocket.
    Ws,
    /// `POST /api/v1/messages`, --batch-size messages per request, --http-concurrency requests
    /// in flight over disjoint sets of channels.
    Batch,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Http => "http",
            Self::Ws => "ws",
            Self::Batch => "batch",
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

/// Default of --batch-size.
pub const DEFAULT_BATCH_SIZE: usize = 100;

/// Default of --http-concurrency in batch mode (capped at --channels; http mode's default is
/// --channels).
pub const DEFAULT_HTTP_CONCURRENCY: usize = 4;

/// Largest --pipeline (the window is one semaphore permit per publish in flight).
pub const MAX_PIPELINE: usize = 1_000_000;

/// Default of --max-attempts.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

impl Args {
    /// Messages per batch request.
    pub fn batch_size(&self) -> usize {
        self.batch_size.unwrap_or(DEFAULT_BATCH_SIZE)
    }

    /// HTTP requests in flight at once: http mode's writers (default one per channel), batch
    /// mode's slots (= channel shards).
    pub fn http_concurrency(&self) -> usize {
        match self.publish_via {
            Via::Http => self.http_concurrency.unwrap_or(self.channels),
            _ => self
                .http_concurrency
                .unwrap_or(DEFAULT_HTTP_CONCURRENCY.min(self.channels)),
        }
    }

    /// Writers publishing on channel `ch`, each numbering its own messages: in http mode the
    /// writers w < --http-concurrency with w mod --channels = ch, otherwise one.
    pub fn writers_on(&self, ch: usize) -> usize {
        if self.publish_via != Via::Http {
            return 1;
        }
        // Writers ch, ch + K, ch + 2K, …; at least one per channel by validation.
        self.http_concurrency()
            .saturating_sub(ch)
            .div_ceil(self.channels.max(1))
            .max(1)
    }

    /// Tries per request: 1 without --idempotency (a retry without a key could duplicate).
    pub fn max_attempts(&self) -> u32 {
        if self.idempotency {
            self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS)
        } else {
            1
        }
    }

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
        self.validate_publish_options()?;
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

    /// The options that only make sense with some publish paths.
    fn validate_publish_options(&self) -> Result<(), String> {
        let via = self.publish_via;
        if let Some(n) = self.batch_size {
            if via != Via::Batch {
                return Err("--batch-size needs --publish-via batch".into());
            }
            if n == 0 {
                return Err("--batch-size must be at least 1".into());
            }
        }
        if let Some(n) = self.http_concurrency {
            if !matches!(via, Via::Http | Via::Batch) {
                return Err("--http-concurrency needs --publish-via http or batch".into());
            }
            if n == 0 {
                return Err("--http-concurrency must be at least 1".into());
            }
            if via == Via::Batch && n > self.channels {
                return Err(format!(
                    "--http-concurrency {n} is more than --channels {}: each request in flight \
                     owns its own channels",
                    self.channels
                ));
            }
            if via == Via::Http && n < self.channels {
                return Err(format!(
                    "--http-concurrency {n} is less than --channels {}: in http mode writer w \
                     publishes on channel w mod --channels, so every channel needs one",
                    self.channels
                ));
            }
        }
        if let Some(n) = self.pipeline {
            if via != Via::Ws {
                return Err("--pipeline needs --publish-via ws".into());
            }
            if n == 0 {
                return Err("--pipeline must be at least 1".into());
            }
            if n > MAX_PIPELINE {
                return Err(format!("--pipeline must be at most {MAX_PIPELINE}"));
            }
        }
        if self.idempotency {
            match via {
                Via::Redis => {
                    return Err(
                        "--idempotency needs --publish-via http, batch or ws: a Redis \
                                PUBLISH has no idempotency key"
                            .into(),
                    );
                }
                Via::Ws if self.pipeline.is_none() => {
                    return Err(
                        "--idempotency with --publish-via ws needs --pipeline: without \
                                acks nothing tells which publishes to resend"
                            .into(),
                    );
                }
                _ => {}
            }
        }
        match self.max_attempts {
            Some(_) if !self.idempotency => {
                return Err(
                    "--max-attempts needs --idempotency (retries without a key could \
                            duplicate)"
                        .into(),
                );
            }
            Some(0) => return Err("--max-attempts must be at least 1".into()),
            _ => {}
        }
        if self.request_timeout.is_zero() {
            return Err("--request-timeout must be above 0".into());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Args {
        let mut argv = vec!["relay-loadgen"];
        argv.extend_from_slice(extra);
        match Args::try_parse_from(argv) {
            Ok(args) => args,
            Err(err) => panic!("{extra:?} does not parse: {err}"),
        }
    }

    /// The validation error of these options, or `None` if they are valid.
    fn refusal(extra: &[&str]) -> Option<String> {
        parse(extra).validate().err()
    }

    #[test]
    fn publish_modes_and_their_defaults() {
        let args = parse(&["--publish-via", "batch", "--channels", "3"]);
        assert_eq!(args.validate(), Ok(()));
        assert_eq!(args.batch_size(), DEFAULT_BATCH_SIZE);
        // Never more slots than channels: a slot without channels would idle.
        assert_eq!(args.http_concurrency(), 3);
        assert_eq!(args.max_attempts(), 1, "no retries without --idempotency");

        let args = parse(&[
            "--publish-via",
            "batch",
            "--channels",
            "50",
            "--batch-size",
            "250",
            "--http-concurrency",
            "10",
            "--idempotency",
        ]);
        assert_eq!(args.validate(), Ok(()));
        assert_eq!(
            (
                args.batch_size(),
                args.http_concurrency(),
                args.max_attempts()
            ),
            (250, 10, DEFAULT_MAX_ATTEMPTS)
        );
        assert_eq!(args.publish_via.as_str(), "batch");

        for ok in [
            &["--publish-via", "ws", "--pipeline", "64"][..],
            &["--publish-via", "ws", "--pipeline", "1", "--idempotency"],
            &[
                "--publish-via",
                "http",
                "--idempotency",
                "--max-attempts",
                "2",
            ],
            &["--publish-via", "http", "--request-timeout", "250ms"],
            &[
                "--publish-via",
                "http",
                "--channels",
                "4",
                "--http-concurrency",
                "4",
            ],
        ] {
            assert_eq!(refusal(ok), None, "{ok:?}");
        }
    }

    #[test]
    fn http_writers_default_to_one_per_channel_and_cycle_over_them() {
        let args = parse(&["--publish-via", "http", "--channels", "50"]);
        assert_eq!(args.validate(), Ok(()));
        assert_eq!(
            args.http_concurrency(),
            50,
            "one writer per channel, as before"
        );
        assert!((0..50).all(|ch| args.writers_on(ch) == 1));

        // Writer w on channel w mod 3: channel 0 gets 0, 3, 6, 9; 1 gets 1, 4, 7; 2 gets 2, 5, 8.
        let args = parse(&[
            "--publish-via",
            "http",
            "--channels",
            "3",
            "--http-concurrency",
            "10",
        ]);
        assert_eq!(args.validate(), Ok(()));
        assert_eq!(args.http_concurrency(), 10);
        let writers: Vec<usize> = (0..3).map(|ch| args.writers_on(ch)).collect();
        assert_eq!(writers, [4, 3, 3]);
        for ch in 0..3 {
            let owned = (0..10).filter(|w| w % 3 == ch).count();
            assert_eq!(args.writers_on(ch), owned, "channel {ch}");
        }

        // Other modes: one writer per channel whatever the flag means there.
        let args = parse(&[
            "--publish-via",
            "batch",
            "--channels",
            "6",
            "--http-concurrency",
            "2",
        ]);
        assert_eq!((args.http_concurrency(), args.writers_on(0)), (2, 1));
    }

    #[test]
    fn bad_combinations_are_refused_with_the_option_named() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--publish-via", "batch", "--batch-size", "0"],
                "--batch-size must be at least 1",
            ),
            (
                &["--publish-via", "http", "--batch-size", "10"],
                "--batch-size needs --publish-via batch",
            ),
            (
                &["--publish-via", "batch", "--http-concurrency", "0"],
                "--http-concurrency must be at least 1",
            ),
            (
                &[
                    "--publish-via",
                    "batch",
                    "--channels",
                    "4",
                    "--http-concurrency",
                    "5",
                ],
                "more than --channels 4",
            ),
            (
                &["--http-concurrency", "4"],
                "--http-concurrency needs --publish-via http or batch",
            ),
            (
                &["--publish-via", "ws", "--http-concurrency", "4"],
                "--http-concurrency needs --publish-via http or batch",
            ),
            (
                &["--publish-via", "http", "--http-concurrency", "0"],
                "--http-concurrency must be at least 1",
            ),
            (
                &[
                    "--publish-via",
                    "http",
                    "--channels",
                    "4",
                    "--http-concurrency",
                    "3",
                ],
                "less than --channels 4",
            ),
            (
                &["--publish-via", "ws", "--pipeline", "0"],
                "--pipeline must be at least 1",
            ),
            (&["--pipeline", "8"], "--pipeline needs --publish-via ws"),
            (
                &["--publish-via", "ws", "--pipeline", "1000001"],
                "--pipeline must be at most 1000000",
            ),
            (
                &["--publish-via", "http", "--pipeline", "8"],
                "--pipeline needs --publish-via ws",
            ),
            (&["--idempotency"], "a Redis PUBLISH has no idempotency key"),
            (
                &["--publish-via", "ws", "--idempotency"],
                "needs --pipeline",
            ),
            (
                &["--publish-via", "http", "--max-attempts", "3"],
                "--max-attempts needs --idempotency",
            ),
            (
                &[
                    "--publish-via",
                    "http",
                    "--idempotency",
                    "--max-attempts",
                    "0",
                ],
                "--max-attempts must be at least 1",
            ),
            (
                &["--request-timeout", "0s"],
                "--request-timeout must be above 0",
            ),
        ];
        for (extra, expected) in cases {
            match refusal(extra) {
                Some(err) => assert!(err.contains(expected), "{extra:?}: {err}"),
                None => panic!("{extra:?} was accepted"),
            }
        }
    }
}
