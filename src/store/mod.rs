//! Postgres access: the connection pool, migrations, and every SQL query the service runs.
//!
//! Handlers and tasks never write SQL themselves; they call functions here. The pool is created
//! once at startup ([`connect`]) and shared through the app state.

pub mod messages;

use std::time::{Duration, Instant};

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::config::DatabaseSettings;

/// Errors from the storage boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database url: {0}")]
    Url(#[source] sqlx::Error),
    #[error("could not connect to Postgres within {timeout:?}: {source}")]
    Connect {
        timeout: Duration,
        #[source]
        source: sqlx::Error,
    },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// Migrations embedded from `migrations/` at compile time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connection options built from settings (tests change only the database name).
pub fn connect_options(settings: &DatabaseSettings) -> Result<PgConnectOptions, StoreError> {
    settings
        .url
        .expose()
        .parse::<PgConnectOptions>()
        .map_err(StoreError::Url)
}

/// Create the pool, retrying with exponential backoff until `connect_timeout` has passed, so
/// the service survives starting before its database (compose, Kubernetes).
pub async fn connect(settings: &DatabaseSettings) -> Result<PgPool, StoreError> {
    let options = connect_options(settings)?;
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1u32;
    loop {
        let result = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect_with(options.clone())
            .await;
        match result {
            Ok(pool) => {
                tracing::info!(attempt, "connected to Postgres");
                return Ok(pool);
            }
            Err(err) if started.elapsed() + delay < settings.connect_timeout => {
                tracing::warn!(attempt, %err, retry_in = ?delay, "Postgres not reachable yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
            Err(source) => {
                return Err(StoreError::Connect {
                    timeout: settings.connect_timeout,
                    source,
                });
            }
        }
    }
}

/// Apply pending migrations. Safe to run from several replicas at once (sqlx takes an advisory
/// lock).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
