//! The access log: one entry per HTTP request, and one per WebSocket or SSE session when it
//! ends, written by background tasks so a request never waits for it.
//!
//! * [`AccessLog::record`] hands an entry to a bounded queue with a non-blocking send; when the
//!   queue is full the entry is dropped and counted (`relay_access_log_dropped_total`).
//! * `writer` batches entries (by count or time) and feeds each configured sink (`stdout` JSON
//!   lines, `file` with size-based rotation, `postgres` batched inserts) through its own task, so
//!   a failing or stalled sink is retried with backoff and never holds up the others.
//! * [`Entry`] is one line of the log; an [`AccessContext`] is what a request leaves behind for
//!   the entry written when it (or its WebSocket or SSE session) ends.
//!
//! This is a pure sink: it knows nothing of HTTP or of the application state. Measuring requests
//! is `crate::http::access`'s job, which fills an [`AccessContext`] and calls
//! [`AccessLog::record`].
//!
//! On shutdown the writer drains whatever was queued before the process exits: its tasks run on
//! the lifecycle's flush phase, after every request and session has finished.

mod entry;
mod sinks;
mod writer;

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::{config::AccessLogSettings, lifecycle::Lifecycle};

pub use entry::{AccessContext, Entry, EntryKind, RequestInfo, SessionStats};

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
        // Every series exists from startup (0), so dashboards and alerts see drops from the first.
        for reason in ["queue_full", "closed"] {
            metrics::counter!("relay_access_log_dropped_total", "reason" => reason).increment(0);
        }
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
