//! Message storage: the one seam between relay and where history lives.
//!
//! [`MessageStore`] is either Postgres (the pool, migrations and every SQL query the service
//! runs, in [`messages`]) or, in embedded mode, an in-process [`memory::MemoryLog`] with the same
//! contract. Handlers and tasks never write SQL themselves; they call [`MessageStore`]. The store is
//! created once at startup and shared through the app state.

pub mod batch;
pub mod memory;
pub mod memory_outbox;
pub mod messages;
pub mod outbox;

use std::time::{Duration, Instant};

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions, PgSslMode},
};

use crate::config::DatabaseSettings;

/// Errors from the storage boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database url: {0}")]
    Url(#[source] sqlx::Error),
    #[error("database.url sslrootcert: {0}")]
    RootCert(#[source] crate::tls::CaFileError),
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
    /// A channel changed under a batch that held its lock: a writer that does not take the
    /// lock, such as a replica of an older version during a rolling upgrade.
    #[error(
        "a channel was changed by a writer that does not lock it; is an older relay version running?"
    )]
    Contended,
}

impl StoreError {
    /// Postgres refused the data itself (SQLSTATE class 22, "data exception": a value `jsonb`
    /// cannot hold). The client's fault, not an outage: retrying the same message fails again.
    pub fn is_data_rejected(&self) -> bool {
        matches!(self, Self::Query(sqlx::Error::Database(e))
            if e.code().is_some_and(|code| code.starts_with("22")))
    }
}

/// Where messages are stored; cheap to clone.
#[derive(Clone, Debug)]
pub enum MessageStore {
    Postgres(PgPool),
    /// Embedded mode: this process only, lost on restart.
    Memory(std::sync::Arc<memory::MemoryLog>),
}

impl MessageStore {
    /// `"postgres"` or `"memory"`, for logs and readiness.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Memory(_) => "memory",
        }
    }

    /// The Postgres pool, when there is one (the access log's `postgres` sink needs it).
    pub fn pool(&self) -> Option<&PgPool> {
        match self {
            Self::Postgres(pool) => Some(pool),
            Self::Memory(_) => None,
        }
    }

    /// Append `data` to `channel` with the next offset, as `options` allow: a batch of one.
    pub async fn append(
        &self,
        channel: &str,
        data: &serde_json::value::RawValue,
        options: messages::AppendOptions<'_>,
    ) -> Result<messages::Appended, StoreError> {
        let (message, rules) = options.into_batch(channel, data);
        // A cache of its own: correct (it is checked against the generation), only not warm.
        let hooks = outbox::HookCache::default();
        let outcomes = self
            .append_batch(&[message], &[1], rules, &hooks, || {})
            .await?;
        outcomes
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Corrupt("a batch of one came back empty".into()))
    }

    /// Commit a batch of groups of messages in one transaction; one outcome per message, in
    /// order. `ordered` is called once the batch's place in its channels' order is fixed (see
    /// [`messages::append_batch`]); see [`batch`] for groups and rules. Every stored message
    /// gets a webhook delivery per matching webhook in the same transaction ([`outbox`]);
    /// `hooks` caches the webhooks between batches.
    pub async fn append_batch(
        &self,
        messages: &[batch::NewMessage],
        group_sizes: &[usize],
        rules: batch::Rules,
        hooks: &outbox::HookCache,
        ordered: impl FnOnce(),
    ) -> Result<Vec<messages::Appended>, StoreError> {
        match self {
            Self::Postgres(pool) => {
                messages::append_batch(pool, messages, group_sizes, rules, hooks, ordered).await
            }
            Self::Memory(log) => {
                let outcomes = log.append_batch(messages, group_sizes, rules);
                ordered();
                Ok(outcomes)
            }
        }
    }

    /// Messages with `after < offset <= upto`, oldest first, at most `limit`.
    pub async fn read_range(
        &self,
        channel: &str,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<messages::StoredMessage>, StoreError> {
        match self {
            Self::Postgres(pool) => messages::read_range(pool, channel, after, upto, limit).await,
            Self::Memory(log) => Ok(log.read_range(channel, after, upto, limit)),
        }
    }

    /// Messages with `offset > since`, oldest first, at most `limit`.
    pub async fn read_since(
        &self,
        channel: &str,
        since: i64,
        limit: i64,
    ) -> Result<Vec<messages::StoredMessage>, StoreError> {
        self.read_range(channel, since, i64::MAX, limit).await
    }

    pub async fn position(&self, channel: &str) -> Result<messages::ChannelPosition, StoreError> {
        match self {
            Self::Postgres(pool) => messages::position(pool, channel).await,
            Self::Memory(log) => Ok(log.position(channel)),
        }
    }

    /// The newest offset of each channel, in input order; see [`messages::heads`].
    pub async fn heads(&self, channels: &[&str]) -> Result<Vec<i64>, StoreError> {
        match self {
            Self::Postgres(pool) => messages::heads(pool, channels).await,
            Self::Memory(log) => Ok(channels
                .iter()
                .map(|c| log.position(c).last_offset)
                .collect()),
        }
    }

    /// Delete up to `batch` messages older than `max_age`.
    pub async fn prune_older_than(&self, max_age: Duration, batch: i64) -> Result<u64, StoreError> {
        match self {
            Self::Postgres(pool) => messages::prune_older_than(pool, max_age, batch).await,
            Self::Memory(log) => Ok(log.prune_older_than(max_age, batch)),
        }
    }

    /// Delete up to `batch` messages beyond the newest `keep` of some channel (the memory log
    /// enforces this on append already).
    pub async fn prune_beyond_count(&self, keep: i64, batch: i64) -> Result<u64, StoreError> {
        match self {
            Self::Postgres(pool) => messages::prune_beyond_count(pool, keep, batch).await,
            Self::Memory(_) => Ok(0),
        }
    }

    /// Remove up to `batch` channels whose messages were all pruned; see
    /// [`messages::remove_empty_channels`].
    pub async fn remove_empty_channels(&self, batch: i64) -> Result<u64, StoreError> {
        match self {
            Self::Postgres(pool) => messages::remove_empty_channels(pool, batch).await,
            Self::Memory(log) => Ok(log.remove_empty_channels(batch)),
        }
    }

    /// Let empty channels be removed by the next round; see [`messages::raise_floors`].
    pub async fn raise_floors(&self) -> Result<u64, StoreError> {
        match self {
            Self::Postgres(pool) => messages::raise_floors(pool).await,
            Self::Memory(_) => Ok(0),
        }
    }

    /// How big history is (the `relay_history_*` gauges, read at scrape time).
    pub async fn history_size(&self) -> Result<messages::HistorySize, StoreError> {
        match self {
            Self::Postgres(pool) => messages::history_size(pool).await,
            Self::Memory(log) => Ok(log.size()),
        }
    }

    /// A round trip to the backend (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Self::Postgres(pool) => {
                sqlx::query("SELECT 1").execute(pool).await?;
                Ok(())
            }
            Self::Memory(_) => Ok(()),
        }
    }

    /// Release connections at shutdown.
    pub async fn close(&self) {
        if let Self::Postgres(pool) = self {
            pool.close().await;
        }
    }
}

/// Migrations embedded from `migrations/` at compile time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connection options built from settings (tests change only the database name).
///
/// TLS comes from the URL as in libpq: `sslmode=disable|prefer|require|verify-ca|verify-full`
/// and `sslrootcert=` (a PEM file, added to the built-in Mozilla roots). sqlx reads that file
/// at every connection, so it is checked here: a missing one stops startup at once, naming
/// it, instead of after `database.connect_timeout` of retries.
pub fn connect_options(settings: &DatabaseSettings) -> Result<PgConnectOptions, StoreError> {
    let url = settings.url.expose();
    let options = url.parse::<PgConnectOptions>().map_err(StoreError::Url)?;
    if let Some(root_cert) = root_cert_file(url) {
        crate::tls::read_ca_pem(&root_cert).map_err(StoreError::RootCert)?;
        // Unlike libpq, sqlx does not verify against a given root under `require`.
        if !matches!(
            options.get_ssl_mode(),
            PgSslMode::VerifyCa | PgSslMode::VerifyFull
        ) {
            tracing::warn!(
                "database.url has sslrootcert but its sslmode does not verify certificates; \
                 use sslmode=verify-full (or verify-ca) for the CA to be checked"
            );
        }
    }
    Ok(options)
}

/// The `sslrootcert` of a URL when it names a file (sqlx also accepts inline PEM there).
fn root_cert_file(url: &str) -> Option<std::path::PathBuf> {
    let url = url::Url::parse(url).ok()?;
    url.query_pairs()
        .filter(|(key, _)| matches!(&**key, "sslrootcert" | "ssl-root-cert" | "ssl-ca"))
        .map(|(_, value)| value.into_owned())
        .last()
        .filter(|value| !value.trim_start().starts_with("-----BEGIN"))
        .map(std::path::PathBuf::from)
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
