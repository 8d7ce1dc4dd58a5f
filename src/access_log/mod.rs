//! The access log: one entry per HTTP request, and one per WebSocket or SSE session when it
//! ends, written by background tasks so a request never waits for it.
//!
//! * [`AccessLog::record`] hands an entry to a bounded queue with a non-blocking send; when the
//!   queue is full the entry is dropped and counted (`relay_access_log_dropped_total`).
//! * `writer` batches entries (by count or time) and feeds each configured sink (`stdout` JSON
//!   lines, `file` with size-based rotation, `postgres` batched inserts) through its own task, so
//!   a failing or stalled sink is retried with backoff and never holds up the others.
//! * [`middleware`] builds HTTP entries and the [`AccessContext`] sessions use for theirs.
//!
//! On shutdown the writer drains whatever was queued before the process exits: its tasks run on
//! the lifecycle's flush phase, after every request and session has finished.

pub mod middleware;
mod sinks;
mod writer;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::{config::AccessLogSettings, lifecycle::Lifecycle};

pub use middleware::AccessContext;

/// What kind of exchange an entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Http,
    Websocket,
    Sse,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Websocket => "websocket",
            Self::Sse => "sse",
        }
    }
}

/// One access-log entry.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub ts: DateTime<Utc>,
    pub kind: EntryKind,
    pub request_id: String,
    pub trace_id: Option<String>,
    pub method: String,
    /// The matched route (`/api/v1/channels/{channel}/messages`), not the raw path.
    pub route: Option<String>,
    /// Path and query, with secrets in the query redacted.
    pub path: String,
    pub status: u16,
    /// Request latency; for sessions, their whole duration.
    pub latency_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    /// The authenticated subject, once authentication exists.
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionStats>,
}

/// What a WebSocket or SSE session did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SessionStats {
    pub frames_in: u64,
    pub frames_out: u64,
    pub channels: Vec<String>,
    pub close_code: Option<u16>,
}

/// Handle to the access log; cheap to clone. A disabled log (no sinks) records nothing.
#[derive(Clone, Debug)]
pub struct AccessLog {
    queue: Option<mpsc::Sender<Entry>>,
    pub(crate) trusted_proxies: Arc<[ipnet::IpNet]>,
}

impl AccessLog {
    /// Start the writer and sink tasks on the lifecycle's flush phase.
    pub fn start(
        settings: &AccessLogSettings,
        db: Option<&sqlx::PgPool>,
        lifecycle: &Lifecycle,
    ) -> Self {
        let trusted_proxies: Arc<[ipnet::IpNet]> = settings.trusted_networks().into();
        if settings.sinks.is_empty() {
            return Self {
                queue: None,
                trusted_proxies,
            };
        }
        let (tx, rx) = mpsc::channel(settings.queue_capacity);
        writer::start(settings, db, lifecycle, rx);
        Self {
            queue: Some(tx),
            trusted_proxies,
        }
    }

    /// A log that records nothing (benchmarks, forks without access logs).
    pub fn disabled() -> Self {
        Self {
            queue: None,
            trusted_proxies: Arc::from([]),
        }
    }

    /// Queue an entry without waiting. A full queue drops it: the request matters more.
    pub fn record(&self, entry: Entry) {
        let Some(queue) = &self.queue else {
            return;
        };
        if let Err(err) = queue.try_send(entry) {
            let reason = match err {
                mpsc::error::TrySendError::Full(_) => "queue_full",
                mpsc::error::TrySendError::Closed(_) => "closed",
            };
            metrics::counter!("relay_access_log_dropped_total", "reason" => reason).increment(1);
        }
    }
}

/// Query parameters whose values never reach a log.
const SECRET_PARAMS: &[&str] = &[
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "auth",
    "authorization",
    "password",
    "secret",
    "api_key",
    "apikey",
    "key",
    "signature",
    "sig",
    "code",
];

/// `path?query` with the values of secret query parameters replaced by `REDACTED`.
pub fn redact_path(path: &str, query: Option<&str>) -> String {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return path.to_owned();
    };
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| {
            let (key, _) = pair.split_once('=').unwrap_or((pair, ""));
            let decoded = url::form_urlencoded::parse(key.as_bytes())
                .next()
                .map(|(k, _)| k.to_ascii_lowercase())
                .unwrap_or_default();
            if SECRET_PARAMS.contains(&decoded.as_str()) {
                format!("{key}=REDACTED")
            } else {
                pair.to_owned()
            }
        })
        .collect();
    format!("{path}?{}", redacted.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_queries_are_redacted() {
        assert_eq!(redact_path("/ws", None), "/ws");
        assert_eq!(
            redact_path(
                "/ws",
                Some("channels=a&token=abc.def&Access_Token=x&since.a=3")
            ),
            "/ws?channels=a&token=REDACTED&Access_Token=REDACTED&since.a=3"
        );
        assert_eq!(redact_path("/x", Some("password")), "/x?password=REDACTED");
    }
}
