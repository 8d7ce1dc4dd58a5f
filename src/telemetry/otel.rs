//! OpenTelemetry tracing: the OTLP exporter and W3C trace-context propagation.
//!
//! Export runs on the SDK's batch processor thread, so a slow or absent collector never blocks a
//! request; spans beyond its queue are dropped by the SDK. Context travels three ways: extracted
//! from incoming HTTP `traceparent` headers, injected into the Redis envelope by the publish path,
//! and extracted again by every replica's listener, whose fan-out span becomes a child of the
//! publish span — one trace from HTTP publish through Redis to delivery on another replica.

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::{OtlpProtocol, TelemetrySettings};

use super::TelemetryError;

const OTEL_ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Whether traces are exported: an endpoint in config or in the standard variables.
pub fn enabled(settings: &TelemetrySettings) -> bool {
    !settings.otlp_endpoint.is_empty()
        || OTEL_ENDPOINT_VARS
            .iter()
            .any(|v| std::env::var_os(v).is_some())
}

pub fn describe_endpoint(settings: &TelemetrySettings) -> String {
    OTEL_ENDPOINT_VARS
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .unwrap_or_else(|| settings.otlp_endpoint.clone())
}

/// A configured OTLP exporter (the SDK tracer provider with its batch processor).
pub struct Exporter(SdkTracerProvider);

impl Exporter {
    /// The `tracing` layer that turns spans into OpenTelemetry spans for this exporter.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(self.0.tracer("relay"))
    }

    /// Make this the global provider (what `opentelemetry::global` hands out).
    pub fn install_global(&self) {
        opentelemetry::global::set_tracer_provider(self.0.clone());
    }

    /// Export what is still buffered, within `timeout`. Blocks.
    pub fn shutdown(self, timeout: std::time::Duration) {
        if let Err(err) = self.0.shutdown_with_timeout(timeout) {
            eprintln!("relay: flushing traces failed: {err}");
        }
    }
}

/// The exporter, or None when no endpoint is configured.
pub fn exporter(settings: &TelemetrySettings) -> Result<Option<Exporter>, TelemetryError> {
    if !enabled(settings) {
        return Ok(None);
    }
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        Ok("grpc") => OtlpProtocol::Grpc,
        Ok("http/protobuf") => OtlpProtocol::HttpProtobuf,
        _ => settings.otlp_protocol,
    };
    // An explicit endpoint from config; otherwise the exporter reads the OTEL_* variables.
    let endpoint = (!settings.otlp_endpoint.is_empty()).then(|| settings.otlp_endpoint.clone());
    let exporter = match protocol {
        OtlpProtocol::HttpProtobuf => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
            if let Some(endpoint) = endpoint {
                // The HTTP exporter wants the full signal path.
                let endpoint = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
                builder = builder.with_endpoint(endpoint);
            }
            builder.build()
        }
        OtlpProtocol::Grpc => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(endpoint) = endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            builder.build()
        }
    }
    .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
    let service_name =
        std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| settings.service_name.clone());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sampling_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(service_name)
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.instance.id",
                    uuid::Uuid::new_v4().to_string(),
                ))
                .build(),
        )
        .build();
    Ok(Some(Exporter(provider)))
}

/// W3C trace context, globally (used by the `set_parent_from_*` functions).
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

/// Make `span` a child of the trace in these HTTP headers (`traceparent`), if any.
///
/// Only a trusted caller's sampled flag is obeyed. From anyone else the trace id is kept (logs
/// and the caller's own spans still correlate) but the flag is replaced by `ratio`'s decision
/// for that trace id, so a client cannot switch on tracing of everything it sends.
pub fn set_parent_from_headers(
    span: &Span,
    headers: &axum::http::HeaderMap,
    trusted: bool,
    ratio: f64,
) {
    let cx = extract(&opentelemetry_http::HeaderExtractor(headers));
    let cx = if trusted {
        cx
    } else {
        let sc = cx.span().span_context().clone();
        let flags = if super::ratio_samples(sc.trace_id().to_bytes(), ratio) {
            opentelemetry::trace::TraceFlags::SAMPLED
        } else {
            opentelemetry::trace::TraceFlags::default()
        };
        Context::new().with_remote_span_context(opentelemetry::trace::SpanContext::new(
            sc.trace_id(),
            sc.span_id(),
            flags,
            true,
            sc.trace_state().clone(),
        ))
    };
    set_parent(span, cx);
}

/// Make `span` a child of a W3C `traceparent` (the Redis envelope's field, written by relay).
pub fn set_parent_from_traceparent(span: &Span, traceparent: &str) {
    set_parent(span, extract(&TraceparentCarrier(traceparent)));
}

fn extract(carrier: &dyn Extractor) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier))
}

fn set_parent(span: &Span, cx: Context) {
    if cx.span().span_context().is_valid() {
        // Fails only if the span is disabled; then there is nothing to link.
        let _ = span.set_parent(cx);
    }
}

/// The `traceparent` of `span`, when tracing is on and the span is sampled.
pub fn traceparent(span: &Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = Traceparent(None);
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.0
}

/// The trace and span ids of `span` as hex, when it has a valid OpenTelemetry context.
pub fn ids(span: &Span) -> Option<(String, String)> {
    let cx: Context = span.context();
    let span_ref = cx.span();
    let sc = span_ref.span_context();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

struct Traceparent(Option<String>);

impl Injector for Traceparent {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

/// A carrier holding only a `traceparent` (the Redis envelope's field).
struct TraceparentCarrier<'a>(&'a str);

impl Extractor for TraceparentCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}
