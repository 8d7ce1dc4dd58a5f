//! Stand-in for [`otel`](self) when relay is built without the `otel` feature: the same
//! functions, doing nothing. Trace ids from incoming `traceparent` headers still reach the access
//! log (see [`super::trace_id_of`]).

use tracing::Span;

use super::TelemetryError;
use crate::config::TelemetrySettings;

/// Never constructed without the `otel` feature.
pub enum Exporter {}

impl Exporter {
    pub fn layer<S>(&self) -> tracing_subscriber::layer::Identity {
        match *self {}
    }

    pub fn install_global(&self) {
        match *self {}
    }

    pub fn shutdown(self, _timeout: std::time::Duration) {
        match self {}
    }
}

pub fn exporter(settings: &TelemetrySettings) -> Result<Option<Exporter>, TelemetryError> {
    if !settings.otlp_endpoint.is_empty() {
        eprintln!(
            "relay: telemetry.otlp_endpoint is set but this build has no `otel` feature; not exporting traces"
        );
    }
    Ok(None)
}

pub fn describe_endpoint(settings: &TelemetrySettings) -> String {
    settings.otlp_endpoint.clone()
}

pub fn install_propagator() {}

pub fn set_parent_from_headers(
    _span: &Span,
    _headers: &axum::http::HeaderMap,
    _trusted: bool,
    _ratio: f64,
) {
}

pub fn set_parent_from_traceparent(_span: &Span, _traceparent: &str) {}

pub fn traceparent(_span: &Span) -> Option<String> {
    None
}

pub fn ids(_span: &Span) -> Option<(String, String)> {
    None
}
