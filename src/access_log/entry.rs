//! What the access log records: one [`Entry`] per exchange, and the [`AccessContext`] a request
//! leaves behind so the entry can be written when the exchange ends (for WebSocket and SSE
//! sessions, long after the request).
//!
//! These are plain data: the request id and trace id are strings, so building an entry needs
//! nothing from the HTTP layer and the sinks can serialize it as is.

use std::{
    sync::{Arc, OnceLock},
    time::Instant,
};

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

/// What an [`AccessContext`] is made from: the request's parts, borrowed.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestInfo<'a> {
    pub request_id: &'a str,
    pub trace_id: Option<&'a str>,
    pub method: &'a str,
    /// The matched route (`/api/v1/channels/{channel}/messages`), not the raw path.
    pub route: Option<&'a str>,
    /// Path and query, with secrets in the query redacted.
    pub path: &'a str,
    pub client_ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
}

/// Who asked what, for entries written after the request (sessions).
///
/// Every idle WebSocket connection holds one until it ends, so the request's seven strings
/// share one allocation (a clone is a reference count) instead of seven `String`s: 72 bytes
/// and one block rather than 216 bytes and up to seven.
#[derive(Debug, Clone)]
pub struct AccessContext {
    /// The fields of [`RequestInfo`], in its order, end to end.
    text: Arc<str>,
    /// Where each field ends in `text`.
    ends: [u32; FIELDS],
    /// Bit i: field i is `Some` (for the optional ones).
    present: u8,
    pub started: Instant,
    /// Set by whatever authenticates the request (shared by the context's clones).
    subject: Arc<OnceLock<String>>,
}

const FIELDS: usize = 7;

impl AccessContext {
    pub fn new(info: RequestInfo<'_>, started: Instant) -> Self {
        let fields = [
            Some(info.request_id),
            info.trace_id,
            Some(info.method),
            info.route,
            Some(info.path),
            info.client_ip,
            info.user_agent,
        ];
        let mut text = String::with_capacity(fields.iter().flatten().map(|f| f.len()).sum());
        let mut ends = [0; FIELDS];
        let mut present = 0;
        for (i, field) in fields.iter().enumerate() {
            if let Some(field) = field {
                text.push_str(field);
                present |= 1 << i;
            }
            // Request heads are far below 4 GiB (hyper caps them), so this never saturates;
            // if it did, `field` would find no such range and give the field as absent, never
            // another field's bytes.
            ends[i] = u32::try_from(text.len()).unwrap_or(u32::MAX);
        }
        Self {
            text: Arc::from(text),
            ends,
            present,
            started,
            subject: Arc::default(),
        }
    }

    fn field(&self, i: usize) -> Option<&str> {
        if self.present & (1 << i) == 0 {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text.get(start..self.ends[i] as usize)
    }

    pub fn request_id(&self) -> &str {
        self.field(0).unwrap_or_default()
    }

    pub fn trace_id(&self) -> Option<&str> {
        self.field(1)
    }

    pub fn method(&self) -> &str {
        self.field(2).unwrap_or_default()
    }

    pub fn route(&self) -> Option<&str> {
        self.field(3)
    }

    pub fn path(&self) -> &str {
        self.field(4).unwrap_or_default()
    }

    pub fn client_ip(&self) -> Option<&str> {
        self.field(5)
    }

    pub fn user_agent(&self) -> Option<&str> {
        self.field(6)
    }

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
            request_id: self.request_id().to_owned(),
            trace_id: self.trace_id().map(str::to_owned),
            method: self.method().to_owned(),
            route: self.route().map(str::to_owned),
            path: self.path().to_owned(),
            status,
            latency_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            bytes_in: bytes.0,
            bytes_out: bytes.1,
            client_ip: self.client_ip().map(str::to_owned),
            user_agent: self.user_agent().map(str::to_owned),
            subject: self.subject.get().cloned(),
            session,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_gives_back_every_field_it_was_made_from() {
        let info = RequestInfo {
            request_id: "req-1",
            trace_id: None,
            method: "GET",
            route: Some("/ws"),
            path: "/ws?channels=a,b&token=[redacted]",
            client_ip: Some("10.0.0.1"),
            user_agent: Some(""),
        };
        let context = AccessContext::new(info, Instant::now());
        context.set_subject("alice");
        context.clone().set_subject("mallory");
        let entry = context.entry(EntryKind::Websocket, 101, (1, 2), None);
        assert_eq!(entry.request_id, "req-1");
        assert_eq!(entry.trace_id, None);
        assert_eq!(entry.method, "GET");
        assert_eq!(entry.route.as_deref(), Some("/ws"));
        assert_eq!(entry.path, "/ws?channels=a,b&token=[redacted]");
        assert_eq!(entry.client_ip.as_deref(), Some("10.0.0.1"));
        // Present but empty is not absent.
        assert_eq!(entry.user_agent.as_deref(), Some(""));
        assert_eq!(entry.subject.as_deref(), Some("alice"));
    }

    #[test]
    fn absent_fields_stay_absent_and_the_rest_keep_their_place() {
        let info = RequestInfo {
            request_id: "",
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            method: "POST",
            path: "/api/v1/messages",
            ..RequestInfo::default()
        };
        let context = AccessContext::new(info, Instant::now());
        assert_eq!(context.request_id(), "");
        assert_eq!(context.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(context.method(), "POST");
        assert_eq!(context.route(), None);
        assert_eq!(context.path(), "/api/v1/messages");
        assert_eq!(context.client_ip(), None);
        assert_eq!(context.user_agent(), None);
    }
}
