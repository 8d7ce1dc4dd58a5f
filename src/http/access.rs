//! The access-log middleware: measures each HTTP request and records its entry once the response
//! body has been sent (or abandoned), plus the request metrics.
//!
//! It also puts an [`AccessContext`] into the request extensions — request id, trace id, client
//! address, redacted path — which WebSocket and SSE sessions use for their own entry at the end.
//!
//! It lives in `http`, not in `access_log`, because it is HTTP through and through (request
//! extensions, the request id, response bodies); `access_log` stays a sink that any transport
//! can feed without depending on the HTTP layer or the application state.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    body::{Body, Bytes},
    extract::{ConnectInfo, MatchedPath, Request},
    http::{StatusCode, header},
    response::Response,
};
use http_body::{Frame, SizeHint};

use crate::{
    access_log::{AccessContext, AccessLog, EntryKind, RequestInfo, SessionStats, redact_path},
    http::{
        around::{After, Around},
        middleware::{RequestId, client_ip},
    },
    state::AppState,
    telemetry::otel,
};

/// The access-log layer ([`super::around`]): one entry per request, written when its response
/// body is done, and the request metrics.
#[derive(Clone)]
pub struct RecordHttp(pub AppState);

/// What [`RecordHttp`] keeps between a request and its response.
pub struct Recording {
    started: Instant,
    context: AccessContext,
    bytes_in: Arc<AtomicU64>,
}

impl Around for RecordHttp {
    type Carry = Recording;

    fn before(&self, req: &mut Request) -> Result<Recording, Response> {
        let started = Instant::now();
        let log = &self.0.access_log;
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let headers = req.headers();
        let trace_id = otel::ids(&tracing::Span::current())
            .map(|(trace, _)| trace)
            .or_else(|| {
                headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .and_then(crate::telemetry::trace_id_of)
                    .map(str::to_owned)
            });
        let request_id = req.extensions().get::<RequestId>().map(|id| &*id.0);
        let path = redact_path(req.uri().path(), req.uri().query());
        let client_ip = client_ip(peer, headers, &log.trusted_proxies).map(|ip| ip.to_string());
        let user_agent = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|ua| match ua.char_indices().nth(512) {
                Some((cut, _)) => &ua[..cut],
                None => ua,
            });
        let context = AccessContext::new(
            RequestInfo {
                request_id: request_id.unwrap_or_default(),
                trace_id: trace_id.as_deref(),
                method: req.method().as_str(),
                route: req
                    .extensions()
                    .get::<MatchedPath>()
                    .map(MatchedPath::as_str),
                path: &path,
                client_ip: client_ip.as_deref(),
                user_agent,
            },
            started,
        );
        req.extensions_mut().insert(context.clone());
        let bytes_in = Arc::new(AtomicU64::new(0));
        let body = std::mem::replace(req.body_mut(), Body::empty());
        *req.body_mut() = Body::new(Counting::new(body, Arc::clone(&bytes_in), None));
        Ok(Recording {
            started,
            context,
            bytes_in,
        })
    }

    fn after(&self, recording: Recording, res: Response) -> After {
        let Recording {
            started,
            context,
            bytes_in,
        } = recording;
        let status = res.status();
        let route = context.route().unwrap_or("<unmatched>").to_owned();
        let method = context.method().to_owned();
        metrics::counter!(
            "relay_http_requests_total",
            "method" => method.clone(),
            "route" => route.clone(),
            "status" => status.as_str().to_owned()
        )
        .increment(1);
        metrics::histogram!("relay_http_request_duration_seconds", "method" => method, "route" => route)
            .record(started.elapsed().as_secs_f64());

        // A WebSocket session writes its own entry when it ends.
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return After::Ready(res);
        }
        let is_sse = super::middleware::has_content_type(&res, "text/event-stream");
        let pending = PendingEntry {
            log: self.0.access_log.clone(),
            context,
            status: status.as_u16(),
            kind: if is_sse {
                EntryKind::Sse
            } else {
                EntryKind::Http
            },
            bytes_in,
            bytes_out: Arc::new(AtomicU64::new(0)),
            frames_out: 0,
        };
        After::Ready(res.map(|body| {
            let bytes_out = Arc::clone(&pending.bytes_out);
            Body::new(Counting::new(body, bytes_out, Some(pending)))
        }))
    }
}

/// An entry waiting for its response body to finish; written on drop, which happens when the
/// body is complete or the client went away.
struct PendingEntry {
    log: AccessLog,
    context: AccessContext,
    status: u16,
    kind: EntryKind,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
    frames_out: u64,
}

impl Drop for PendingEntry {
    fn drop(&mut self) {
        let bytes = (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        );
        // SSE streams are sessions: say which channels and how many events.
        let session = (self.kind == EntryKind::Sse).then(|| SessionStats {
            frames_out: self.frames_out,
            channels: url_channels(self.context.path()),
            ..SessionStats::default()
        });
        let entry = self.context.entry(self.kind, self.status, bytes, session);
        self.log.record(entry);
    }
}

/// The `channels=` list of a (redacted) path, for SSE entries.
fn url_channels(path: &str) -> Vec<String> {
    let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
    url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "channels")
        .flat_map(|(_, v)| v.split(',').map(str::to_owned).collect::<Vec<_>>())
        .filter(|c| !c.is_empty())
        .collect()
}

/// A body that counts the bytes (and data frames) passing through it.
struct Counting {
    inner: Body,
    bytes: Arc<AtomicU64>,
    pending: Option<PendingEntry>,
}

impl Counting {
    fn new(inner: Body, bytes: Arc<AtomicU64>, pending: Option<PendingEntry>) -> Self {
        Self {
            inner,
            bytes,
            pending,
        }
    }
}

impl http_body::Body for Counting {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            if let Some(pending) = self.pending.as_mut() {
                pending.frames_out += 1;
            }
        }
        if let Poll::Ready(None) = &polled {
            // Complete: write the entry now rather than whenever the body is dropped.
            self.pending.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
