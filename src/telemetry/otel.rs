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

/// The tracer provider, or None when no endpoint is configured.
pub fn tracer_provider(
    settings: &TelemetrySettings,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
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
    Ok(Some(provider))
}

/// W3C trace context, globally (used by [`extract`] and [`inject_traceparent`]).
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

/// Make `span` a child of the context carried by `carrier` (HTTP headers, a Redis envelope).
pub fn set_parent_from(span: &Span, carrier: &dyn Extractor) {
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier));
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

/// The trace id in a W3C `traceparent` value (`00-<trace-id>-<span-id>-<flags>`).
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, trace_id) = (parts.next()?, parts.next()?);
    (trace_id.len() == 32
        && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
        && trace_id != "0".repeat(32))
    .then_some(trace_id)
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
pub struct TraceparentCarrier<'a>(pub &'a str);

impl Extractor for TraceparentCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_from_traceparent() {
        assert_eq!(
            trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id_of("garbage"), None);
        assert_eq!(
            trace_id_of("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
    }
}
