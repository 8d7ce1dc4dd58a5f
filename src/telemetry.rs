//! Logging setup: one `tracing` subscriber for the process.
//!
//! Building the subscriber is separate from installing it, so tests can build one without
//! touching the global default. `log.format = json` writes one JSON object per line (production);
//! `pretty` is for humans. `RUST_LOG`, when set, overrides `log.level`.

use tracing::Subscriber;
use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt};

use crate::config::{LogFormat, LogSettings};

/// A subscriber writing to stdout in the configured format.
pub fn build_subscriber(settings: &LogSettings) -> Box<dyn Subscriber + Send + Sync> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = Registry::default().with(filter);
    match settings.format {
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

/// Install `subscriber` as the process-wide default. Fails if one is already installed.
pub fn init(
    subscriber: Box<dyn Subscriber + Send + Sync>,
) -> Result<(), tracing::subscriber::SetGlobalDefaultError> {
    tracing::subscriber::set_global_default(subscriber)
}
