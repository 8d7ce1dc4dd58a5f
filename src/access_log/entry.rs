//! What the access log records: one [`Entry`] per exchange, and the [`AccessContext`] a request
//! leaves behind so the entry can be written when the exchange ends (for WebSocket and SSE
//! sessions, long after the request).
//!
//! These are plain data: the request id and trace id are strings, so building an entry needs
//! nothing from the HTTP layer and the sinks can serialize it as is.

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;

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
    /// The token's `sub`, when the request was authenticated.
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

/// Who asked what, for entries written after the request (sessions).
#[derive(Debug, Clone)]
pub struct AccessContext {
    pub request_id: String,
    pub trace_id: Option<String>,
    pub method: String,
    pub route: Option<String>,
    pub path: String,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub started: Instant,
    /// Set by whatever authenticates the request (shared by the context's clones).
    pub subject: std::sync::Arc<std::sync::OnceLock<String>>,
}

impl AccessContext {
    /// Record who the request authenticated as (the first call wins).
    pub fn set_subject(&self, subject: &str) {
        let _ = self.subject.set(subject.to_owned());
    }

    /// The entry for an exchange that ended now; `session` for WebSocket and SSE sessions.
    pub fn entry(
        &self,
        kind: EntryKind,
        status: u16,
        bytes: (u64, u64),
        session: Option<SessionStats>,
    ) -> Entry {
        Entry {
            ts: Utc::now(),
            kind,
            request_id: self.request_id.clone(),
            trace_id: self.trace_id.clone(),
            method: self.method.clone(),
            route: self.route.clone(),
            path: self.path.clone(),
            status,
            latency_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            bytes_in: bytes.0,
            bytes_out: bytes.1,
            client_ip: self.client_ip.clone(),
            user_agent: self.user_agent.clone(),
            subject: self.subject.get().cloned(),
            session,
        }
    }
}
