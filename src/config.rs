//! Typed configuration, loaded once at startup.
//!
//! Layers, later ones winning: `config/default.toml`, `config/{APP_ENV}.toml` (`local` when
//! `APP_ENV` is unset), then environment variables `APP__SECTION__KEY` (for example
//! `APP__SERVER__PORT=9000`). The result is deserialised into [`Settings`] and validated before
//! anything connects anywhere, so a bad value stops the process with a message naming the key.
//! Unknown keys are rejected too: a misspelt variable is an error, not a silently ignored default.
//!
//! Connection URLs may carry passwords, so they are [`SecretUrl`]s: `Debug` and `Serialize` print
//! them with the password replaced, and the real value is only reachable through
//! [`SecretUrl::expose`].

use std::{collections::HashMap, net::IpAddr, path::PathBuf, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

// The prefix is validated with the channel-name rule, which belongs to the wire protocol.
use crate::protocol::is_channel_char;

/// Longest duration any key accepts. Deadlines are computed as `Instant::now() + d`, which
/// panics on overflow; a century keeps every such sum far inside the clock's range.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// Every duration key: humantime text (`"5s"`, `"1h 30m"`), at most [`MAX_DURATION`].
mod duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer, de::Error};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let value: Duration = humantime_serde::deserialize(d)?;
        if value > super::MAX_DURATION {
            return Err(D::Error::custom(format!(
                "`{}` is longer than the maximum of 100 years",
                humantime::format_duration(value)
            )));
        }
        Ok(value)
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(d, s)
    }
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read, or a value had the wrong type or an unknown key.
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    /// A value parsed but is not acceptable.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl ConfigError {
    fn invalid(key: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key,
            reason: reason.into(),
        }
    }
}

/// Where to load configuration from. [`LoadOptions::from_process_env`] is what the binary uses;
/// tests build one in code so they never touch the process environment.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Directory holding `default.toml` and `{app_env}.toml`.
    pub dir: PathBuf,
    /// Selects the environment file; `local` by default.
    pub app_env: String,
    /// `APP__…` variables (others are ignored).
    pub env: HashMap<String, String>,
}

impl LoadOptions {
    /// `APP_CONFIG_DIR` (default `config`), `APP_ENV` (default `local`) and the process environment.
    pub fn from_process_env() -> Self {
        Self {
            dir: std::env::var_os("APP_CONFIG_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("config")),
            app_env: std::env::var("APP_ENV").unwrap_or_else(|_| "local".to_owned()),
            env: std::env::vars().collect(),
        }
    }
}

/// The whole configuration. Every key is documented in `config/default.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub shutdown: ShutdownSettings,
    pub log: LogSettings,
    pub http: HttpSettings,
    pub health: HealthSettings,
    pub ws: WsSettings,
    pub sse: SseSettings,
    pub history: HistorySettings,
    pub telemetry: TelemetrySettings,
    pub access_log: AccessLogSettings,
    pub demo: DemoSettings,
    pub auth: AuthSettings,
    pub limits: LimitSettings,
    pub publish: PublishSettings,
    pub webhooks: WebhookSettings,
}

/// Outbound webhooks (docs/webhooks.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Run the dispatcher on this replica (deliveries are still recorded when false, and sent
    /// by replicas where it is true).
    pub enabled: bool,
    /// Where webhooks may send: `public`, IPs/CIDRs, host names (`*.` for subdomains); empty =
    /// `public` only, so private, loopback and link-local addresses need an explicit entry.
    pub allowed_hosts: Vec<String>,
    /// With `auth.mode = disabled` the webhook API is refused (403) unless this is true.
    pub allow_unauthenticated_api: bool,
    /// Deliveries in flight at once on this replica.
    pub max_in_flight: usize,
    /// How often an idle dispatcher looks for due deliveries (publishes on this replica wake
    /// it at once).
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// A claimed delivery is another replica's to take after this long (a crashed replica's
    /// claims come back); longer than `max_timeout`.
    #[serde(with = "duration")]
    pub lease: Duration,
    /// Per-webhook request timeout when the webhook does not set one...
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// ...and the longest one a webhook may set.
    #[serde(with = "duration")]
    pub max_timeout: Duration,
    /// Attempts per delivery when the webhook does not set it; then it is dead.
    pub max_attempts: u32,
    /// Retry backoff: the first wait and the cap (exponential with jitter in between).
    #[serde(with = "duration")]
    pub retry_min_delay: Duration,
    #[serde(with = "duration")]
    pub retry_max_delay: Duration,
    /// Webhooks the API may hold in total (configured ones included).
    pub max_webhooks: usize,
    /// Dead deliveries are deleted this long after they died.
    #[serde(with = "duration")]
    pub dead_retention: Duration,
    /// Embedded mode: deliveries (pending and dead) kept in memory; beyond, new ones are
    /// dropped and counted.
    pub memory_capacity: usize,
    /// Webhooks defined by configuration (config files only: an array of tables).
    pub endpoints: Vec<WebhookEndpoint>,
}

/// One `[[webhooks.endpoints]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpoint {
    /// Stable id (its deliveries survive restarts under it); not starting with `wh_`.
    pub id: String,
    pub url: String,
    pub channels: Vec<String>,
    pub secret: Secret,
    #[serde(
        default,
        with = "optional_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// An optional duration key (absent = the default).
mod optional_duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

/// The publish path.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSettings {
    /// A publish repeated with the same `Idempotency-Key` within this window returns the
    /// original offset instead of storing a second message.
    #[serde(with = "duration")]
    pub idempotency_window: Duration,
    /// Most messages in one `POST /api/v1/messages` request.
    pub max_batch_messages: usize,
    /// A group commit closes at this many messages...
    pub commit_max_messages: usize,
    /// ...or this long after its first publish arrived, while another commit runs (a lone
    /// publish on an idle server is committed at once).
    #[serde(with = "duration")]
    pub commit_delay: Duration,
    /// Messages waiting for a commit, at most.
    pub queue_capacity: usize,
    /// How long a publisher waits for room in a full queue before it is refused (503).
    #[serde(with = "duration")]
    pub queue_wait: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address to bind, e.g. `127.0.0.1` or `0.0.0.0`.
    pub host: IpAddr,
    /// Port for the public API; 0 picks a free port (the bound address is logged).
    pub port: u16,
    /// Port for operators only (`/metrics`), kept off the public API; 0 picks a free port.
    pub admin_port: u16,
    /// Allow embedded mode (an empty `database.url` or `redis.url`): one replica, history in
    /// memory. Production sets false, so a missing URL fails fast instead.
    pub allow_embedded: bool,
    /// Length of the public port's accept queue (the kernel caps it at
    /// `net.core.somaxconn`). A burst of connects beyond it loses SYNs, which clients resend
    /// only after a second.
    pub listen_backlog: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: SecretUrl,
    pub max_connections: u32,
    /// How long startup keeps retrying before giving up on Postgres.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// How long a query waits for a free pooled connection.
    #[serde(with = "duration")]
    pub acquire_timeout: Duration,
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub url: SecretUrl,
    /// Prefix of every Redis channel relay uses; lets several deployments share one Redis.
    pub channel_prefix: String,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Upper bound for any single Redis command (PUBLISH, SUBSCRIBE, PING).
    #[serde(with = "duration")]
    pub command_timeout: Duration,
    /// First and largest delay between reconnect attempts of the pub/sub listener.
    #[serde(with = "duration")]
    pub reconnect_min_delay: Duration,
    #[serde(with = "duration")]
    pub reconnect_max_delay: Duration,
    /// PEM file of the CA certificate(s) that sign the Redis server's certificate, for a private
    /// CA. Replaces the built-in (Mozilla) roots for Redis; only with a `rediss://` URL. Unset
    /// (`""`): the built-in roots.
    #[serde(with = "optional_path")]
    pub tls_ca_file: Option<PathBuf>,
}

/// How the Redis connection is secured, read from the `redis.url` scheme and fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisTls {
    /// `redis://`, a Unix socket, or embedded mode.
    Off,
    /// `rediss://`: TLS, and the server's certificate is verified.
    Verified,
    /// `rediss://…#insecure`: TLS without certificate verification (the redis crate's switch).
    Unverified,
}

impl RedisSettings {
    pub fn tls(&self) -> RedisTls {
        match url::Url::parse(self.url.expose()) {
            Ok(url) if url.scheme() == "rediss" && url.fragment() == Some("insecure") => {
                RedisTls::Unverified
            }
            Ok(url) if url.scheme() == "rediss" => RedisTls::Verified,
            _ => RedisTls::Off,
        }
    }
}

/// An optional path as a plain string, `""` meaning none: TOML has no null, and an empty
/// variable (`APP__REDIS__TLS_CA_FILE=`) must be able to unset a file the files set.
mod optional_path {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        match path {
            Some(path) => path.serialize(s),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        let path = PathBuf::deserialize(d)?;
        Ok((!path.as_os_str().is_empty()).then_some(path))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// Time between `/readyz` turning 503 and the listener closing, so load balancers stop
    /// routing new traffic here first.
    #[serde(with = "duration")]
    pub readiness_grace: Duration,
    /// Upper bound for in-flight requests and sessions to finish after the listener closed.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// After the drain: time for the access log and trace exporter to write out what they hold.
    #[serde(with = "duration")]
    pub flush_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `info,relay=debug`.
    pub level: String,
    /// Also log each finished HTTP request as an application line ("request finished", at
    /// `info`, in `format`). Off by default: the access log is the request record, and two lines
    /// per request doubled stdout (and mixed two formats in `pretty` mode).
    pub request_lines: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Time allowed to produce response headers (streams and WebSockets are not cut by it).
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Time a client has to send a complete request head; slower connections are closed.
    #[serde(with = "duration")]
    pub header_timeout: Duration,
    pub max_body_bytes: usize,
    /// Origins allowed by CORS; empty disables CORS, `["*"]` allows any origin.
    pub cors_allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// Budget for each dependency check of `/readyz`.
    #[serde(with = "duration")]
    pub check_timeout: Duration,
    /// One round of dependency checks answers every `/readyz` for this long (0: every request
    /// checks), so the public endpoint cannot be used to amplify load on Postgres and Redis.
    #[serde(with = "duration")]
    pub cache_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WsSettings {
    /// Largest accepted client message; bigger ones close the connection with 1009.
    pub max_message_bytes: usize,
    pub max_subscriptions: usize,
    /// Publishes one connection may have waiting for their commit; it is not read further
    /// until one is answered.
    pub max_publishes_in_flight: usize,
    /// Frames queued for one connection before it counts as a slow consumer and is closed.
    pub outbox_capacity: usize,
    /// Bytes of queued frames per connection before it is closed as slow (4008).
    pub outbox_max_bytes: usize,
    /// Realtime connections (WebSocket and SSE) per replica; more get `503`.
    pub max_connections: usize,
    /// Realtime connections per client address (0: no limit); more get `429`.
    pub max_connections_per_ip: usize,
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    /// A connection that sends nothing (not even a pong) for this long is closed.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// A write the client does not accept within this time closes the connection.
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// Origins (besides the request's own host) allowed to open a WebSocket or SSE stream;
    /// `["*"]` allows any. Requests without an `Origin` header (non-browsers) are not refused.
    pub allowed_origins: Vec<String>,
    /// Bytes reserved for each socket read (a larger client message is read in one go once its
    /// header is known). Held only while a read is decoded: idle connections keep no buffer.
    pub read_buffer_bytes: usize,
    /// Write coalescing: after the first frame arrives, wait this long for more before writing,
    /// so several frames share one syscall. Zero (the default) writes at once.
    #[serde(with = "duration")]
    pub coalesce_delay: Duration,
    /// Subscribers per shard at least when a big channel's message is written from several
    /// threads (a channel needs two shards' worth); 0 writes every fan-out from one thread.
    pub fanout_shard: usize,
    /// Threads that help write big fan-outs; 0 = one per CPU beyond the first.
    pub fanout_threads: usize,
}

impl WsSettings {
    /// Helper threads for big fan-outs, `fanout_threads` resolved (0 when fan-outs stay on one
    /// thread).
    pub fn fanout_helpers(&self) -> usize {
        if self.fanout_shard == 0 {
            return 0;
        }
        match self.fanout_threads {
            0 => std::thread::available_parallelism().map_or(0, |n| n.get() - 1),
            n => n,
        }
    }
}

/// Rate limits and quotas per client (see docs/security.md). 0 turns a limit off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Publishes per second one WebSocket connection may make (bursts up to this many).
    pub publish_per_connection: u32,
    /// Publishes per second per token subject on this replica, HTTP and WebSocket together.
    pub publish_per_subject: u32,
    /// HTTP requests per second per client address (probes exempt).
    pub http_per_ip: u32,
    /// Channels one subject may have created and not yet lost to retention.
    pub channels_per_subject: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SseSettings {
    #[serde(with = "duration")]
    pub keepalive_interval: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySettings {
    /// Messages older than this are pruned.
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// Only the newest this many messages of each channel are kept.
    pub max_per_channel: i64,
    /// How often the retention task runs.
    #[serde(with = "duration")]
    pub prune_interval: Duration,
    /// Rows deleted per statement, so pruning never holds long locks.
    pub prune_batch: i64,
    /// Page size of the history API when `limit` is not given.
    pub default_page_size: i64,
    /// Largest `limit` the history API accepts.
    pub max_page_size: i64,
    /// How long a replica waits for a missing offset before subscribers read it from history.
    #[serde(with = "duration")]
    pub gap_wait: Duration,
    /// How often each replica compares every active channel's committed head with what it
    /// delivered, so a lost tail on a quiet channel is found.
    #[serde(with = "duration")]
    pub head_check_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum OtlpProtocol {
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// OTLP collector endpoint; empty disables tracing export (unless `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// is set, which wins, as do the other standard `OTEL_*` variables).
    pub otlp_endpoint: String,
    pub otlp_protocol: OtlpProtocol,
    pub service_name: String,
    /// Fraction of new traces sampled (0.0–1.0); a sampled parent is always followed.
    pub sampling_ratio: f64,
    /// Clients (addresses or CIDRs, after `access_log.trusted_proxies`) whose `traceparent`
    /// sampled flag is obeyed. Others keep their trace id but get `sampling_ratio`'s decision.
    pub trusted_trace_peers: Vec<String>,
}

impl TelemetrySettings {
    /// The trusted trace peers as networks (validated at startup).
    pub fn trusted_trace_networks(&self) -> Vec<ipnet::IpNet> {
        self.trusted_trace_peers
            .iter()
            .filter_map(|p| parse_net(p).ok())
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogSinkKind {
    Stdout,
    File,
    Postgres,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogSettings {
    /// Where entries go; several at once, none to disable.
    pub sinks: Vec<AccessLogSinkKind>,
    /// Entries waiting for the writer; when full, new entries are dropped (and counted).
    pub queue_capacity: usize,
    /// Entries written per batch.
    pub batch_size: usize,
    /// A partial batch is written after this long.
    #[serde(with = "duration")]
    pub flush_interval: Duration,
    /// File sink: path of the current file (rotated ones get `.1`, `.2`, …).
    pub file_path: PathBuf,
    /// File sink: rotate when the file would grow beyond this.
    pub file_max_bytes: u64,
    /// File sink: rotated files kept.
    pub file_max_files: u32,
    /// Peers whose `X-Forwarded-For` is believed (IPs or CIDRs, e.g. `10.0.0.0/8`).
    pub trusted_proxies: Vec<String>,
}

impl AccessLogSettings {
    /// The trusted proxies as networks (validated at startup).
    pub fn trusted_networks(&self) -> Vec<ipnet::IpNet> {
        self.trusted_proxies
            .iter()
            .filter_map(|p| parse_net(p).ok())
            .collect()
    }
}

fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{s}` is not an IP address or CIDR"))
}

/// Keys whose environment variable is a comma-separated list.
const LIST_KEYS: &[&str] = &[
    "http.cors_allowed_origins",
    "access_log.sinks",
    "access_log.trusted_proxies",
    "telemetry.trusted_trace_peers",
    "ws.allowed_origins",
    "auth.key_files",
    "webhooks.allowed_hosts",
];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DemoSettings {
    /// Serve the live demo page at `/`; off in production, where `/` is a plain 404.
    pub enabled: bool,
    /// Serve `GET /demo/token` (a short-lived HS256 token for the page) while the demo is on and
    /// `auth.hs256_secret` is set. A development convenience: anyone who can load the page gets
    /// a token, so it is off unless a config opts in.
    pub token_enabled: bool,
    /// Lifetime of a demo token.
    #[serde(with = "duration")]
    pub token_ttl: Duration,
}

/// Whether clients must present a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every WebSocket, SSE and message-API request needs a valid token.
    Required,
    /// No checks at all (local development only; refused with `APP_ENV=production`).
    Disabled,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub mode: AuthMode,
    /// Shared secret for HS256 tokens; empty = no HS256 key. At least 32 bytes.
    pub hs256_secret: Secret,
    /// Key id of the HS256 secret; tokens naming another `kid` are not checked against it.
    /// Empty = the secret has no id (tokens with or without a `kid` may use it).
    pub hs256_kid: String,
    /// Public keys for RS256/ES256: PEM files (the key id is the file name without `.pem`) or
    /// JWKS files (`.json`; each key's `kid`, `alg` from the key or its type).
    pub key_files: Vec<PathBuf>,
    /// Required `aud` claim; empty = `aud` is not checked.
    pub audience: String,
    /// Required `iss` claim; empty = `iss` is not checked.
    pub issuer: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "duration")]
    pub leeway: Duration,
    /// A WebSocket opened without a token must send its `auth` frame within this time.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// `token_expiring` is sent this long before the token's `exp`.
    #[serde(with = "duration")]
    pub expiry_warning: Duration,
}

impl Settings {
    /// Whether either backend is the in-process one.
    pub fn is_embedded(&self) -> bool {
        self.database.url.is_empty() || self.redis.url.is_empty()
    }

    /// Load from the files and variables described by `opts`, then validate.
    pub fn load(opts: &LoadOptions) -> Result<Self, ConfigError> {
        let mut env_vars: config::Map<String, String> = opts
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("APP__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // An empty list variable (`APP__ACCESS_LOG__SINKS=`) means an empty list, which the
        // environment source cannot express; apply those as overrides instead.
        let mut empty_lists = Vec::new();
        for key in LIST_KEYS {
            let var = format!("APP__{}", key.replace('.', "__").to_uppercase());
            match env_vars.get_mut(&var) {
                Some(v) if v.trim().is_empty() => {
                    env_vars.remove(&var);
                    empty_lists.push(*key);
                }
                // `a, b` means `a,b`.
                Some(v) => *v = v.split(',').map(str::trim).collect::<Vec<_>>().join(","),
                None => {}
            }
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from(opts.dir.join("default.toml")).required(true))
            .add_source(
                config::File::from(opts.dir.join(format!("{}.toml", opts.app_env))).required(false),
            )
            .add_source(
                LIST_KEYS
                    .iter()
                    .fold(
                        config::Environment::with_prefix("APP")
                            .prefix_separator("__")
                            .separator("__")
                            .try_parsing(true)
                            .list_separator(","),
                        |env, key| env.with_list_parse_key(key),
                    )
                    .source(Some(env_vars)),
            );
        for key in empty_lists {
            builder = builder.set_override(key, Vec::<String>::new())?;
        }
        let raw = builder.build()?;
        let settings: Settings = raw.try_deserialize()?;
        settings.validate()?;
        settings.validate_for_env(&opts.app_env)?;
        Ok(settings)
    }

    /// Checks that depend on the environment: production never runs without authentication.
    pub fn validate_for_env(&self, app_env: &str) -> Result<(), ConfigError> {
        if app_env == "production" && self.auth.mode == AuthMode::Disabled {
            return Err(ConfigError::invalid(
                "auth.mode",
                "`disabled` is refused with APP_ENV=production; configure a key and keep `required`",
            ));
        }
        if app_env == "production" && self.redis.tls() == RedisTls::Unverified {
            return Err(ConfigError::invalid(
                "redis.url",
                "`#insecure` (TLS without certificate verification) is refused with \
                 APP_ENV=production; set redis.tls_ca_file for a private CA",
            ));
        }
        Ok(())
    }

    /// Checks that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // An empty URL selects the embedded backend (in-process history / broker).
        if !self.database.url.is_empty() {
            self.database
                .url
                .check_scheme("database.url", &["postgres", "postgresql"])?;
        }
        if !self.redis.url.is_empty() {
            self.redis
                .url
                .check_scheme("redis.url", &["redis", "rediss", "redis+unix", "unix"])?;
        }
        if self.is_embedded() && !self.server.allow_embedded {
            let key = if self.database.url.is_empty() {
                "database.url"
            } else {
                "redis.url"
            };
            return Err(ConfigError::invalid(
                key,
                "is empty, which means embedded mode (single replica, history not durable); \
                 set the URL, or server.allow_embedded = true to accept that",
            ));
        }
        if self.database.url.is_empty()
            && self.access_log.sinks.contains(&AccessLogSinkKind::Postgres)
        {
            return Err(ConfigError::invalid(
                "access_log.sinks",
                "the postgres sink needs database.url (it is empty: embedded mode)",
            ));
        }
        if !(1..=65_535).contains(&self.server.listen_backlog) {
            return Err(ConfigError::invalid(
                "server.listen_backlog",
                "must be between 1 and 65535",
            ));
        }
        at_least_one(
            "database.max_connections",
            self.database.max_connections as u64,
        )?;
        positive("database.connect_timeout", self.database.connect_timeout)?;
        positive("database.acquire_timeout", self.database.acquire_timeout)?;
        positive("redis.connect_timeout", self.redis.connect_timeout)?;
        positive("redis.command_timeout", self.redis.command_timeout)?;
        positive("redis.reconnect_min_delay", self.redis.reconnect_min_delay)?;
        if self.redis.reconnect_max_delay < self.redis.reconnect_min_delay {
            return Err(ConfigError::invalid(
                "redis.reconnect_max_delay",
                "must not be smaller than redis.reconnect_min_delay",
            ));
        }
        if self.redis.tls_ca_file.is_some() {
            match self.redis.tls() {
                RedisTls::Verified => {}
                RedisTls::Off => {
                    return Err(ConfigError::invalid(
                        "redis.tls_ca_file",
                        "is set, but redis.url is not a `rediss://` URL: the CA only verifies \
                         a TLS connection",
                    ));
                }
                RedisTls::Unverified => {
                    return Err(ConfigError::invalid(
                        "redis.tls_ca_file",
                        "is set, but redis.url ends in `#insecure`, which turns certificate \
                         verification off: drop one of the two",
                    ));
                }
            }
        }
        if self.redis.channel_prefix.len() > 64
            || !self.redis.channel_prefix.chars().all(is_channel_char)
        {
            return Err(ConfigError::invalid(
                "redis.channel_prefix",
                "at most 64 characters of A-Z a-z 0-9 _ - : .",
            ));
        }
        positive("shutdown.drain_timeout", self.shutdown.drain_timeout)?;
        positive("shutdown.flush_timeout", self.shutdown.flush_timeout)?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::invalid("log.level", e.to_string()))?;
        positive("http.request_timeout", self.http.request_timeout)?;
        positive("http.header_timeout", self.http.header_timeout)?;
        at_least_one("http.max_body_bytes", self.http.max_body_bytes as u64)?;
        for origin in &self.http.cors_allowed_origins {
            if origin != "*" && axum::http::HeaderValue::from_str(origin).is_err() {
                return Err(ConfigError::invalid(
                    "http.cors_allowed_origins",
                    format!("`{origin}` is not a valid origin"),
                ));
            }
        }
        positive("health.check_timeout", self.health.check_timeout)?;
        positive(
            "publish.idempotency_window",
            self.publish.idempotency_window,
        )?;
        let publish = &self.publish;
        if !(1..=100_000).contains(&publish.commit_max_messages) {
            return Err(ConfigError::invalid(
                "publish.commit_max_messages",
                "must be between 1 and 100000",
            ));
        }
        if publish.commit_delay > Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "publish.commit_delay",
                "must be at most 100ms",
            ));
        }
        if !(1..=publish.commit_max_messages).contains(&publish.max_batch_messages) {
            return Err(ConfigError::invalid(
                "publish.max_batch_messages",
                "must be between 1 and publish.commit_max_messages",
            ));
        }
        if !(publish.commit_max_messages..=10_000_000).contains(&publish.queue_capacity) {
            return Err(ConfigError::invalid(
                "publish.queue_capacity",
                "must be between publish.commit_max_messages and 10000000",
            ));
        }
        if publish.queue_wait > Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "publish.queue_wait",
                "must be at most 60s",
            ));
        }
        // The WebSocket library reserves a frame's declared length up front, so the bound is
        // also what one connection can make the process allocate.
        if !(64..=64 << 20).contains(&self.ws.max_message_bytes) {
            return Err(ConfigError::invalid(
                "ws.max_message_bytes",
                "must be between 64 and 67108864 (64 MiB)",
            ));
        }
        at_least_one("ws.max_subscriptions", self.ws.max_subscriptions as u64)?;
        if !(1..=65_536).contains(&self.ws.max_publishes_in_flight) {
            return Err(ConfigError::invalid(
                "ws.max_publishes_in_flight",
                "must be between 1 and 65536",
            ));
        }
        at_least_one("ws.max_connections", self.ws.max_connections as u64)?;
        at_least_one("ws.outbox_max_bytes", self.ws.outbox_max_bytes as u64)?;
        at_least_one("ws.outbox_capacity", self.ws.outbox_capacity as u64)?;
        positive("ws.ping_interval", self.ws.ping_interval)?;
        if self.ws.idle_timeout <= self.ws.ping_interval {
            return Err(ConfigError::invalid(
                "ws.idle_timeout",
                "must be longer than ws.ping_interval, or healthy idle clients get closed",
            ));
        }
        positive("ws.write_timeout", self.ws.write_timeout)?;
        if self.ws.coalesce_delay > Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "ws.coalesce_delay",
                "must be at most 100ms",
            ));
        }
        // Allocated up front for every connection: a huge value aborts the process on the
        // first WebSocket instead of failing here.
        if !(256..=1 << 20).contains(&self.ws.read_buffer_bytes) {
            return Err(ConfigError::invalid(
                "ws.read_buffer_bytes",
                "must be between 256 and 1048576",
            ));
        }
        // Each is an OS thread started at startup: a typo of a few zeros must not try millions.
        if self.ws.fanout_threads > 256 {
            return Err(ConfigError::invalid(
                "ws.fanout_threads",
                "must be at most 256",
            ));
        }
        positive("sse.keepalive_interval", self.sse.keepalive_interval)?;
        if self.server.admin_port != 0 && self.server.admin_port == self.server.port {
            return Err(ConfigError::invalid(
                "server.admin_port",
                "must differ from server.port",
            ));
        }
        let t = &self.telemetry;
        if !t.otlp_endpoint.is_empty() {
            url::Url::parse(&t.otlp_endpoint).map_err(|e| {
                ConfigError::invalid("telemetry.otlp_endpoint", format!("not a URL ({e})"))
            })?;
        }
        if t.service_name.trim().is_empty() {
            return Err(ConfigError::invalid(
                "telemetry.service_name",
                "must not be empty",
            ));
        }
        if !(0.0..=1.0).contains(&t.sampling_ratio) {
            return Err(ConfigError::invalid(
                "telemetry.sampling_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        let a = &self.access_log;
        if a.queue_capacity == 0 || a.batch_size == 0 {
            return Err(ConfigError::invalid(
                "access_log.queue_capacity",
                "queue_capacity and batch_size must be at least 1",
            ));
        }
        // The queue is a bounded channel (which refuses absurd sizes by panicking) and a batch
        // is allocated up front.
        if a.queue_capacity > 10_000_000 {
            return Err(ConfigError::invalid(
                "access_log.queue_capacity",
                "must be at most 10000000",
            ));
        }
        if a.batch_size > a.queue_capacity {
            return Err(ConfigError::invalid(
                "access_log.batch_size",
                "must not exceed access_log.queue_capacity",
            ));
        }
        positive("access_log.flush_interval", a.flush_interval)?;
        if a.file_max_bytes < 1024 {
            return Err(ConfigError::invalid(
                "access_log.file_max_bytes",
                "must be at least 1024",
            ));
        }
        // Every rotation renames each kept file once.
        if a.file_max_files > 1000 {
            return Err(ConfigError::invalid(
                "access_log.file_max_files",
                "must be at most 1000",
            ));
        }
        for proxy in &a.trusted_proxies {
            parse_net(proxy).map_err(|e| ConfigError::invalid("access_log.trusted_proxies", e))?;
        }
        for peer in &self.telemetry.trusted_trace_peers {
            parse_net(peer)
                .map_err(|e| ConfigError::invalid("telemetry.trusted_trace_peers", e))?;
        }
        for origin in &self.ws.allowed_origins {
            if origin != "*" && url::Url::parse(origin).map_or(true, |u| u.host_str().is_none()) {
                return Err(ConfigError::invalid(
                    "ws.allowed_origins",
                    format!("`{origin}` is not an origin such as https://app.example.com"),
                ));
            }
        }
        self.validate_auth()?;
        self.validate_webhooks()?;
        positive("demo.token_ttl", self.demo.token_ttl)?;
        let h = &self.history;
        positive("history.ttl", h.ttl)?;
        positive("history.prune_interval", h.prune_interval)?;
        positive("history.gap_wait", h.gap_wait)?;
        positive("history.head_check_interval", h.head_check_interval)?;
        for (key, value) in [
            ("history.max_per_channel", h.max_per_channel),
            ("history.prune_batch", h.prune_batch),
            ("history.default_page_size", h.default_page_size),
            ("history.max_page_size", h.max_page_size),
        ] {
            if value < 1 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        // Offsets stay below 2^53, so a larger count keeps everything anyway (and would overflow
        // the pruning arithmetic); a page is read into memory whole.
        for (key, value, max) in [
            (
                "history.max_per_channel",
                h.max_per_channel,
                crate::protocol::MAX_OFFSET,
            ),
            ("history.prune_batch", h.prune_batch, 1_000_000),
            ("history.max_page_size", h.max_page_size, 10_000),
        ] {
            if value > max {
                return Err(ConfigError::invalid(key, format!("must be at most {max}")));
            }
        }
        if h.default_page_size > h.max_page_size {
            return Err(ConfigError::invalid(
                "history.default_page_size",
                "must not exceed history.max_page_size",
            ));
        }
        Ok(())
    }
}

impl Settings {
    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        let secret = a.hs256_secret.expose();
        // HS256 is only as strong as the secret; RFC 7518 asks for at least the hash size.
        if !secret.is_empty() && secret.len() < 32 {
            return Err(ConfigError::invalid(
                "auth.hs256_secret",
                "must be at least 32 bytes (or empty for no HS256 key)",
            ));
        }
        positive("auth.handshake_timeout", a.handshake_timeout)?;
        positive("auth.expiry_warning", a.expiry_warning)?;
        Ok(())
    }
}

impl Settings {
    /// The webhook keys' ranges and how they relate; the endpoints themselves (URLs, patterns,
    /// secrets, hosts) are checked by `crate::webhooks::configured`, which startup and
    /// `relay check-config` run.
    fn validate_webhooks(&self) -> Result<(), ConfigError> {
        let w = &self.webhooks;
        if !(1..=10_000).contains(&w.max_in_flight) {
            return Err(ConfigError::invalid(
                "webhooks.max_in_flight",
                "must be between 1 and 10000",
            ));
        }
        positive("webhooks.poll_interval", w.poll_interval)?;
        if w.poll_interval > Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "webhooks.poll_interval",
                "must be at most 60s",
            ));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(600)).contains(&w.max_timeout) {
            return Err(ConfigError::invalid(
                "webhooks.max_timeout",
                "must be between 100ms and 10m",
            ));
        }
        if !(Duration::from_millis(100)..=w.max_timeout).contains(&w.timeout) {
            return Err(ConfigError::invalid(
                "webhooks.timeout",
                "must be between 100ms and webhooks.max_timeout",
            ));
        }
        // A lease shorter than a request would hand a delivery to a second replica while the
        // first is still sending it.
        if w.lease <= w.max_timeout {
            return Err(ConfigError::invalid(
                "webhooks.lease",
                "must be longer than webhooks.max_timeout",
            ));
        }
        if !(1..=100).contains(&w.max_attempts) {
            return Err(ConfigError::invalid(
                "webhooks.max_attempts",
                "must be between 1 and 100",
            ));
        }
        positive("webhooks.retry_min_delay", w.retry_min_delay)?;
        if w.retry_max_delay < w.retry_min_delay {
            return Err(ConfigError::invalid(
                "webhooks.retry_max_delay",
                "must not be smaller than webhooks.retry_min_delay",
            ));
        }
        if !(1..=100_000).contains(&w.max_webhooks) {
            return Err(ConfigError::invalid(
                "webhooks.max_webhooks",
                "must be between 1 and 100000",
            ));
        }
        if w.endpoints.len() > w.max_webhooks {
            return Err(ConfigError::invalid(
                "webhooks.endpoints",
                "holds more webhooks than webhooks.max_webhooks",
            ));
        }
        positive("webhooks.dead_retention", w.dead_retention)?;
        if !(1..=10_000_000).contains(&w.memory_capacity) {
            return Err(ConfigError::invalid(
                "webhooks.memory_capacity",
                "must be between 1 and 10000000",
            ));
        }
        Ok(())
    }
}

fn at_least_one(key: &'static str, n: u64) -> Result<(), ConfigError> {
    if n == 0 {
        Err(ConfigError::invalid(key, "must be at least 1"))
    } else {
        Ok(())
    }
}

fn positive(key: &'static str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        Err(ConfigError::invalid(key, "must be greater than zero"))
    } else {
        Ok(())
    }
}

/// A connection URL that may carry a password. Printing it (Debug, Serialize) hides the password.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(SecretString);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(SecretString::from(url.into()))
    }

    /// The real URL, password included. Only hand it to the client library that needs it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// An empty URL: the embedded backend instead of a server.
    pub fn is_empty(&self) -> bool {
        self.expose().trim().is_empty()
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        if self.is_empty() {
            return String::new();
        }
        match url::Url::parse(self.expose()) {
            Ok(mut url) => {
                if url.password().is_some() {
                    // Cannot fail for URLs that already have a password.
                    let _ = url.set_password(Some("***"));
                }
                url.to_string()
            }
            Err(_) => "<unparseable url>".to_owned(),
        }
    }

    fn check_scheme(&self, key: &'static str, schemes: &[&str]) -> Result<(), ConfigError> {
        let url = url::Url::parse(self.expose())
            .map_err(|e| ConfigError::invalid(key, format!("not a URL ({e})")))?;
        if !schemes.contains(&url.scheme()) {
            return Err(ConfigError::invalid(
                key,
                format!("scheme must be one of {schemes:?}, got `{}`", url.scheme()),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

/// A secret string (the HS256 secret). `Debug` and `Serialize` print `***` (or nothing when
/// empty); the value is only reachable through [`Secret::expose`].
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// The real value. Only hand it to the code that signs or verifies with it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }

    fn redacted(&self) -> &'static str {
        if self.is_empty() { "" } else { "***" }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.redacted())
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.redacted())
    }
}

/// The shipped `local` settings, for unit tests of other modules.
#[cfg(test)]
pub mod tests_support {
    pub fn default_settings() -> super::Settings {
        super::Settings::load(&super::LoadOptions {
            dir: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config"),
            app_env: "local".to_owned(),
            env: Default::default(),
        })
        .expect("the shipped config loads")
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The shipped configuration for `app_env` plus these `APP__…` variables, through the one
    /// loader the binary uses.
    fn load(app_env: &str, env: &[(String, String)]) -> Result<Settings, ConfigError> {
        Settings::load(&LoadOptions {
            dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config"),
            app_env: app_env.to_owned(),
            env: env.iter().cloned().collect(),
        })
    }

    /// Every `section.key` of the configuration, read off the loaded defaults.
    fn keys() -> Vec<(String, String)> {
        let defaults = serde_json::to_value(load("local", &[]).unwrap()).unwrap();
        let mut keys = Vec::new();
        for (section, table) in defaults.as_object().unwrap() {
            for key in table.as_object().unwrap().keys() {
                keys.push((section.clone(), key.clone()));
            }
        }
        keys
    }

    /// Values a hand-written or templated environment might hold: plausible ones of every
    /// type, boundary numbers and durations, and arbitrary text.
    fn value() -> impl Strategy<Value = String> {
        let unit =
            prop::sample::select(vec!["", "ns", "ms", "s", "m", "h", "d", "w", "y", "years"]);
        prop_oneof![
            any::<String>(),
            "[ -~]{0,24}",
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|n| n.to_string()),
            (any::<u64>(), unit.clone()).prop_map(|(n, u)| format!("{n}{u}")),
            (0u64..100_000, unit).prop_map(|(n, u)| format!("{n}{u}")),
            prop::sample::select(vec![
                "",
                " ",
                "0",
                "-1",
                "1",
                "64",
                "255",
                "256",
                "65536",
                "1048577",
                "4294967296",
                "99999999999999999999",
                "1e400",
                "NaN",
                "inf",
                "-0",
                "0.5",
                "true",
                "false",
                "yes",
                "0s",
                "1ms",
                "5s",
                "101years",
                "18446744073709551615s",
                "1h 30m",
                "a,b",
                ",",
                " , ",
                "stdout, file",
                "postgres",
                "*",
                "https://app.example",
                "postgres://u:p@db/relay",
                "redis://r:6379",
                "mysql://x",
                "::::",
                "10.0.0.0/8",
                "required",
                "disabled",
                "json",
                "http/protobuf",
                "info,relay=debug",
                "[",
                "{",
            ])
            .prop_map(str::to_owned),
        ]
    }

    /// A variable name: mostly a real key, sometimes a misspelt, truncated or nested one.
    fn variable(keys: Vec<(String, String)>) -> impl Strategy<Value = String> {
        let var = |s: &str, k: &str| format!("APP__{}__{}", s.to_uppercase(), k.to_uppercase());
        prop_oneof![
            8 => prop::sample::select(keys.clone()).prop_map(move |(s, k)| var(&s, &k)),
            1 => (prop::sample::select(keys), "[A-Za-z_]{0,8}").prop_map(move |((s, k), junk)| {
                [var(&s, &junk), var(&s, &format!("{k}__{junk}")), format!("APP__{junk}")]
                    [junk.len() % 3]
                    .clone()
            }),
            1 => "APP__[A-Za-z_]{0,12}",
        ]
    }

    /// The loaded settings hold no duration a deadline computation could overflow on. The
    /// duration keys are found generically: those whose default serialises as a duration.
    fn durations_are_bounded(settings: &Settings) -> bool {
        let as_duration =
            |v: &serde_json::Value| v.as_str().and_then(|s| humantime::parse_duration(s).ok());
        let defaults = serde_json::to_value(load("local", &[]).unwrap()).unwrap();
        let loaded = serde_json::to_value(settings).unwrap();
        keys().iter().all(|(section, key)| {
            as_duration(&defaults[section][key]).is_none()
                || as_duration(&loaded[section][key]).is_some_and(|d| d <= MAX_DURATION)
        })
    }

    proptest! {
        /// Whatever the environment holds, loading either gives settings that pass validation
        /// (and are safe to run with), or an error that names what is wrong. Never a panic.
        #[test]
        fn any_environment_loads_or_names_the_problem(
            app_env in prop::sample::select(vec!["local", "production", "staging"]),
            env in prop::collection::vec((variable(keys()), value()), 1..4),
        ) {
            match load(app_env, &env) {
                Ok(settings) => {
                    prop_assert!(settings.validate().is_ok());
                    prop_assert!(settings.validate_for_env(app_env).is_ok());
                    prop_assert!(durations_are_bounded(&settings));
                }
                Err(err) => {
                    let message = err.to_string();
                    // The key, its section, or (for a bad variable name) the name itself.
                    let named = env.iter().any(|(var, _)| {
                        let path = var.trim_start_matches("APP__").to_lowercase();
                        let section = path.split("__").next().unwrap_or_default();
                        (!section.is_empty() && message.contains(section))
                            || message.contains(&path.replace("__", "."))
                    }) || matches!(err, ConfigError::Invalid { .. });
                    prop_assert!(named, "{env:?}: `{message}` names no key");
                }
            }
        }
    }

    #[test]
    fn durations_and_sizes_have_upper_bounds() {
        for (var, value, key) in [
            (
                "APP__WS__PING_INTERVAL",
                "18446744073709551615s",
                "ws.ping_interval",
            ),
            (
                "APP__AUTH__HANDSHAKE_TIMEOUT",
                "101years",
                "auth.handshake_timeout",
            ),
            (
                "APP__WS__READ_BUFFER_BYTES",
                "1099511627776",
                "ws.read_buffer_bytes",
            ),
            ("APP__WS__FANOUT_THREADS", "100000", "ws.fanout_threads"),
            ("APP__SERVER__LISTEN_BACKLOG", "0", "server.listen_backlog"),
            (
                "APP__SERVER__LISTEN_BACKLOG",
                "4294967295",
                "server.listen_backlog",
            ),
            (
                "APP__ACCESS_LOG__QUEUE_CAPACITY",
                "4611686018427387904",
                "access_log.queue_capacity",
            ),
            (
                "APP__ACCESS_LOG__BATCH_SIZE",
                "20000",
                "access_log.batch_size",
            ),
            (
                "APP__WS__MAX_MESSAGE_BYTES",
                "1099511627776",
                "ws.max_message_bytes",
            ),
            (
                "APP__HISTORY__MAX_PER_CHANNEL",
                "9223372036854775807",
                "history.max_per_channel",
            ),
            (
                "APP__HISTORY__MAX_PAGE_SIZE",
                "10000000",
                "history.max_page_size",
            ),
            (
                "APP__ACCESS_LOG__FILE_MAX_FILES",
                "4294967295",
                "access_log.file_max_files",
            ),
        ] {
            let err = load("local", &[(var.to_owned(), value.to_owned())])
                .expect_err(var)
                .to_string();
            assert!(
                err.contains(key),
                "{var}={value}: `{err}` should name `{key}`"
            );
        }
        assert!(load("local", &[("APP__HISTORY__TTL".into(), "100years".into())]).is_ok());
    }

    #[test]
    fn secret_url_hides_password() {
        let url = SecretUrl::new("postgres://app:hunter2@db:5432/relay");
        assert_eq!(url.redacted(), "postgres://app:***@db:5432/relay");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&url).unwrap().contains("hunter2"));
    }

    #[test]
    fn secret_never_prints() {
        let secret = Secret::new("a-very-long-shared-secret-of-32-bytes!");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(serde_json::to_string(&secret).unwrap(), r#""***""#);
        assert_eq!(format!("{:?}", Secret::new("")), "");
    }
}
