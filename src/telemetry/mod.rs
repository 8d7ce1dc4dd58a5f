//! What the service tells operators: logs, traces and metrics.
//!
//! * Logs: one `tracing` subscriber for the process. `log.format = json` writes one JSON object
//!   per line (production), `pretty` is for humans; `RUST_LOG` overrides `log.level`. Request log
//!   lines carry `trace_id` / `span_id` through the request span.
//! * Traces: [`otel`] exports spans over OTLP when an endpoint is configured.
//! * Metrics: [`metrics`] installs the Prometheus recorder served on the admin port.
//!
//! Building the subscriber is separate from installing it; only the binary installs one (tests
//! start many apps in one process and must not fight over the global default).

pub mod metrics;
#[cfg(feature = "otel")]
pub mod otel;
#[cfg(not(feature = "otel"))]
#[path = "otel_disabled.rs"]
pub mod otel;

use std::time::Duration;

use tracing::Subscriber;
use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt};

use crate::config::{LogFormat, Settings};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot set up the OTLP exporter: {0}")]
    Otlp(String),
    #[error("a global subscriber is already installed: {0}")]
    AlreadyInstalled(#[from] tracing::subscriber::SetGlobalDefaultError),
}

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
#[must_use = "dropping the guard does not flush pending spans; call shutdown"]
pub struct Telemetry {
    exporter: Option<otel::Exporter>,
}

/// Build the subscriber (with the OTLP layer when tracing is enabled) and install it globally.
/// Must run inside the tokio runtime (the gRPC exporter needs it).
pub fn init(settings: &Settings) -> Result<Telemetry, TelemetryError> {
    let exporter = otel::exporter(&settings.telemetry)?;
    otel::install_propagator();
    let subscriber = build_subscriber(settings, exporter.as_ref());
    tracing::subscriber::set_global_default(subscriber)?;
    if let Some(exporter) = &exporter {
        tracing::info!(endpoint = %otel::describe_endpoint(&settings.telemetry), "exporting traces over OTLP");
        exporter.install_global();
    }
    Ok(Telemetry { exporter })
}

/// A subscriber writing to stdout in the configured format, plus the OpenTelemetry layer when a
/// tracer provider is given.
pub fn build_subscriber(
    settings: &Settings,
    exporter: Option<&otel::Exporter>,
) -> Box<dyn Subscriber + Send + Sync> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let otel_layer =
        exporter.map(|e| e.layer::<tracing_subscriber::layer::Layered<EnvFilter, Registry>>());
    let registry = Registry::default().with(filter).with(otel_layer);
    match settings.log.format {
        LogFormat::Json => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            ),
        ),
        LogFormat::Pretty => Box::new(registry.with(tracing_subscriber::fmt::layer())),
    }
}

impl Telemetry {
    /// Export what is still buffered, within `timeout`.
    pub fn shutdown(self, timeout: Duration) {
        if let Some(exporter) = self.exporter {
            exporter.shutdown(timeout);
        }
    }
}

/// The trace id in a W3C `traceparent` value (`00-<trace-id>-<span-id>-<flags>`).
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, trace_id) = (parts.next()?, parts.next()?);
    let valid = trace_id.len() == 32
        && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
        && trace_id.bytes().any(|b| b != b'0');
    valid.then_some(trace_id)
}

/// The trace-id-ratio sampling decision, as the OpenTelemetry SDK's `TraceIdRatioBased` makes
/// it (the trace id's low 63 bits against `ratio`), so every replica agrees on a trace.
pub fn ratio_samples(trace_id: [u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    (u64::from_be_bytes(low) >> 1) < (ratio * (1u64 << 63) as f64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_sampling_keeps_about_the_ratio_and_is_deterministic() {
        let ids: Vec<[u8; 16]> = (0..10_000u64)
            .map(|i| {
                let mut id = [0u8; 16];
                id[8..].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
                id
            })
            .collect();
        let kept = ids.iter().filter(|id| ratio_samples(**id, 0.1)).count();
        assert!((800..1200).contains(&kept), "{kept}");
        assert!(ids.iter().all(|id| ratio_samples(*id, 1.0)));
        assert!(!ids.iter().any(|id| ratio_samples(*id, 0.0)));
        assert_eq!(ratio_samples(ids[7], 0.5), ratio_samples(ids[7], 0.5));
    }

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
