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
    tracer_provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

/// Build the subscriber (with the OTLP layer when tracing is enabled) and install it globally.
/// Must run inside the tokio runtime (the gRPC exporter needs it).
pub fn init(settings: &Settings) -> Result<Telemetry, TelemetryError> {
    let tracer_provider = otel::tracer_provider(&settings.telemetry)?;
    otel::install_propagator();
    let subscriber = build_subscriber(settings, tracer_provider.as_ref());
    tracing::subscriber::set_global_default(subscriber)?;
    if let Some(provider) = &tracer_provider {
        tracing::info!(endpoint = %otel::describe_endpoint(&settings.telemetry), "exporting traces over OTLP");
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    Ok(Telemetry { tracer_provider })
}

/// A subscriber writing to stdout in the configured format, plus the OpenTelemetry layer when a
/// tracer provider is given.
pub fn build_subscriber(
    settings: &Settings,
    tracer_provider: Option<&opentelemetry_sdk::trace::SdkTracerProvider>,
) -> Box<dyn Subscriber + Send + Sync> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let otel_layer = tracer_provider.map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(provider.tracer("relay"))
    });
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
        if let Some(provider) = self.tracer_provider
            && let Err(err) = provider.shutdown_with_timeout(timeout)
        {
            eprintln!("relay: flushing traces failed: {err}");
        }
    }
}
