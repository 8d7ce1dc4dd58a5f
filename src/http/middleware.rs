//! Request-scoped context and the cross-cutting HTTP layers.
//!
//! * [`RequestIds`]: accepts a sane incoming `x-request-id` or generates a UUID, stores it in the
//!   request extensions and in a task-local (so any code running for the request, including error
//!   rendering, can read it with [`current_request_id`]) and echoes it on the response.
//! * [`trace_layer`]: one span per request carrying method, matched route, request id, status and
//!   latency, so every line logged while serving it (and its trace) carries them. The request
//!   record itself is the access log's entry; with `log.request_lines` the span also closes with
//!   an `info` "request finished" line (off by default, or stdout gets two lines per request). An
//!   incoming `traceparent` is continued; its sampled flag is obeyed only from
//!   `telemetry.trusted_trace_peers`.
//!
//! This module owns the request id and knows nothing of the error type: the error type reads the
//! id from here, and the layers that render errors (`JsonErrors`, `panic_response`) live with it
//! in [`super::error`], so the dependency runs one way.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use axum::{
    extract::{ConnectInfo, MatchedPath, Request},
    http::{HeaderMap, HeaderName, HeaderValue},
    response::Response,
};
use tower_http::{
    classify::{ServerErrorsAsFailures, SharedClassifier},
    trace::TraceLayer,
};
use tracing::Span;

use super::around::{After, Around};
use crate::{config::Settings, telemetry::otel};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

tokio::task_local! {
    static REQUEST_ID: RequestId;
}

/// The id of the request being served; also available as a request extension.
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

/// The request id of the current request, if called while serving one.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.0.to_string()).ok()
}

/// Client-supplied ids are kept only when short and printable, so they are safe to log.
fn acceptable(value: &HeaderValue) -> Option<&str> {
    let s = value.to_str().ok()?;
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then_some(s)
}

/// The request-id layer ([`super::around`]): the id goes into the request's headers and
/// extensions, is the task-local of everything serving the request, and is echoed on the
/// response.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestIds;

impl Around for RequestIds {
    type Carry = (RequestId, Option<HeaderValue>);

    fn before(&self, req: &mut Request) -> Result<Self::Carry, Response> {
        let id: Arc<str> = match req.headers().get(&X_REQUEST_ID).and_then(acceptable) {
            Some(s) => s.into(),
            None => uuid::Uuid::new_v4().to_string().into(),
        };
        let header_value = HeaderValue::from_str(&id).ok();
        if let Some(value) = &header_value {
            req.headers_mut()
                .insert(X_REQUEST_ID.clone(), value.clone());
        }
        let request_id = RequestId(id);
        req.extensions_mut().insert(request_id.clone());
        Ok((request_id, header_value))
    }

    fn after(&self, (_, header_value): Self::Carry, mut res: Response) -> After {
        if let Some(value) = header_value {
            res.headers_mut().insert(X_REQUEST_ID.clone(), value);
        }
        After::Ready(res)
    }

    fn scope<R>(&self, (id, _): &Self::Carry, f: impl FnOnce() -> R) -> R {
        REQUEST_ID.sync_scope(id.clone(), f)
    }
}

/// Whether `res` declares a `Content-Type` starting with `prefix` (parameters such as `charset`
/// follow it).
pub(crate) fn has_content_type(res: &Response, prefix: &str) -> bool {
    res.headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with(prefix))
}

/// The client's address: the peer, or — only when the peer is a trusted proxy — the right-most
/// address in `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    trusted: &[ipnet::IpNet],
) -> Option<IpAddr> {
    let peer = peer?;
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    forwarded
        .iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(forwarded.first())
        .copied()
        .or(Some(peer))
}

type OnResponse = fn(&Response, Duration, &Span);

/// Who may decide sampling through `traceparent`.
#[derive(Clone)]
pub struct MakeSpan {
    trusted_peers: Arc<[ipnet::IpNet]>,
    proxies: Arc<[ipnet::IpNet]>,
    ratio: f64,
}

impl MakeSpan {
    pub fn new(settings: &Settings) -> Self {
        Self {
            trusted_peers: settings.telemetry.trusted_trace_networks().into(),
            proxies: settings.access_log.trusted_networks().into(),
            ratio: settings.telemetry.sampling_ratio,
        }
    }

    fn trusts<B>(&self, req: &axum::http::Request<B>) -> bool {
        if self.trusted_peers.is_empty() {
            return false;
        }
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        client_ip(peer, req.headers(), &self.proxies)
            .is_some_and(|ip| self.trusted_peers.iter().any(|net| net.contains(&ip)))
    }
}

impl<B> tower_http::trace::MakeSpan<B> for MakeSpan {
    fn make_span(&mut self, req: &axum::http::Request<B>) -> Span {
        make_span(self, req)
    }
}

/// The request span, and with `log.request_lines` a log line per finished request.
pub fn trace_layer(
    settings: &Settings,
) -> TraceLayer<SharedClassifier<ServerErrorsAsFailures>, MakeSpan, (), OnResponse> {
    let on_response: OnResponse = if settings.log.request_lines {
        log_response
    } else {
        record_response
    };
    TraceLayer::new_for_http()
        .make_span_with(MakeSpan::new(settings))
        .on_request(())
        .on_response(on_response)
}

fn make_span<B>(rules: &MakeSpan, req: &axum::http::Request<B>) -> Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
        .unwrap_or("<unmatched>");
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|id| &*id.0)
        .unwrap_or("");
    let span = tracing::info_span!(
        "http_request",
        method = %req.method(),
        route,
        request_id,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        status = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
    );
    // Continue the caller's trace (W3C `traceparent`), and put the ids on every log line of it.
    otel::set_parent_from_headers(&span, req.headers(), rules.trusts(req), rules.ratio);
    if let Some((trace_id, span_id)) = otel::ids(&span) {
        span.record("trace_id", trace_id);
        span.record("span_id", span_id);
    }
    span
}

/// Status and latency on the span (and so on its trace), without a log line.
fn record_response(res: &Response, latency: Duration, span: &Span) {
    span.record("status", res.status().as_u16());
    span.record("latency_ms", latency.as_secs_f64() * 1000.0);
}

/// [`record_response`], plus the "request finished" line (`log.request_lines`).
fn log_response(res: &Response, latency: Duration, span: &Span) {
    record_response(res, latency, span);
    tracing::info!(
        status = res.status().as_u16(),
        latency_ms = latency.as_secs_f64() * 1000.0,
        "request finished"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "203.0.113.7, 10.1.2.3".parse().unwrap());
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            client_ip(Some(proxy), &headers, &trusted),
            Some("203.0.113.7".parse().unwrap())
        );
        assert_eq!(
            client_ip(Some(stranger), &headers, &trusted),
            Some(stranger)
        );
        assert_eq!(
            client_ip(Some(proxy), &HeaderMap::new(), &trusted),
            Some(proxy)
        );
    }
}
