//! [`Application`]: build the service from settings, then run it until shutdown.
//!
//! `build` does the startup sequence — Postgres pool (with retries), migrations if enabled, Redis
//! clients and the pub/sub listener, app state, and binding the listener socket *before* serving
//! (so port 0 works and tests learn the real port). `run_until_stopped` serves until the lifecycle
//! is cancelled, then drains requests and tracked tasks within `shutdown.drain_timeout`, and
//! fails with [`StartupError::TaskFailed`] if a critical task's death was the cause.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpSocket};

use crate::{
    access_log::AccessLog,
    commit::Committer,
    config::Settings,
    core::{CoreSettings, fanout::Fanout},
    dispatcher::{self, Dispatcher},
    history::HistoryReader,
    http,
    lifecycle::Lifecycle,
    pubsub::{PubSub, PubSubError},
    retention,
    state::{AppState, Shared},
    store::{
        self, MessageStore, StoreError,
        batch::Rules,
        outbox::{HookCache, Outbox},
    },
    telemetry,
    webhooks::{self, ssrf::HostPolicy},
};

/// Postgres (connected with retries, migrated if configured), or memory when `database.url` is
/// empty.
async fn open_store(settings: &Settings) -> Result<MessageStore, StartupError> {
    if settings.database.url.is_empty() {
        let log = store::memory::MemoryLog::new(settings.history.max_per_channel)
            .with_outbox_capacity(settings.webhooks.memory_capacity);
        return Ok(MessageStore::Memory(Arc::new(log)));
    }
    let db = store::connect(&settings.database).await?;
    if settings.database.migrate_on_start {
        store::migrate(&db).await?;
        tracing::info!("migrations applied");
    }
    Ok(MessageStore::Postgres(db))
}

/// Bind before serving, so port 0 works and the real address is known. The backlog is
/// explicit: `TcpListener::bind` uses 128, which a burst of a few hundred connects overflows.
fn bind(addr: SocketAddr, backlog: u32) -> Result<(TcpListener, SocketAddr), StartupError> {
    let bound = || {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // As std's bind does: a restarted replica can take its port while old connections
        // linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(backlog)?;
        let local = listener.local_addr()?;
        Ok((listener, local))
    };
    bound().map_err(|source| StartupError::Bind { addr, source })
}

/// The admin port serves a scraper and probes, not bursts of clients.
const ADMIN_BACKLOG: u32 = 128;

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot set up Redis: {0}")]
    Redis(#[from] PubSubError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Auth(#[from] crate::auth::KeyError),
    #[error("invalid configuration: {0}")]
    Webhooks(String),
    #[error("server error: {0}")]
    Serve(#[source] std::io::Error),
    #[error("cannot start the fan-out threads: {0}")]
    Threads(String),
    /// A task spawned with [`Lifecycle::spawn_critical`] ended before shutdown.
    #[error("critical task `{task}` stopped unexpectedly")]
    TaskFailed { task: &'static str },
}

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    admin_listener: TcpListener,
    admin_addr: SocketAddr,
    metrics: telemetry::metrics::Registry,
    state: AppState,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        // The app's own metrics first: what the startup sequence records (queue gauges, task
        // series) lands in them, and every series exists before the first scrape.
        let metrics = telemetry::metrics::Registry::new();
        let lifecycle = Lifecycle::with_recorder(metrics.recorder());
        lifecycle
            .with_metrics(Self::assemble(settings, metrics, lifecycle.clone()))
            .await
    }

    async fn assemble(
        settings: Settings,
        metrics: telemetry::metrics::Registry,
        lifecycle: Lifecycle,
    ) -> Result<Self, StartupError> {
        let settings = Arc::new(settings);
        // Keys first: a missing key file should stop startup before anything connects.
        let auth = Arc::new(crate::auth::Authenticator::from_settings(&settings.auth)?);
        let store = open_store(&settings).await?;
        // Bind before starting any task, so a failed bind leaves none behind.
        let (listener, local_addr) = bind(
            SocketAddr::new(settings.server.host, settings.server.port),
            settings.server.listen_backlog,
        )?;
        let (admin_listener, admin_addr) = bind(
            SocketAddr::new(settings.server.host, settings.server.admin_port),
            ADMIN_BACKLOG,
        )?;
        let history = HistoryReader::new(store.clone(), settings.database.acquire_timeout);
        let core = CoreSettings {
            gap_wait: settings.history.gap_wait,
            head_check_interval: settings.history.head_check_interval,
        };
        let fanout = Fanout::threaded(settings.ws.fanout_helpers(), settings.ws.fanout_shard)
            .map_err(|e| StartupError::Threads(e.to_string()))?;
        let pubsub = PubSub::start(&settings.redis, core, fanout, history.clone(), &lifecycle)?;
        let rules = Rules {
            max_channels: settings.limits.channels_per_subject,
            idempotency_window: settings.publish.idempotency_window,
        };
        let hooks = Arc::new(HookCache::default());
        let outbox = Outbox::new(store.clone(), Arc::clone(&hooks));
        let webhook_hosts = Arc::new(
            HostPolicy::parse(&settings.webhooks.allowed_hosts)
                .map_err(|e| StartupError::Webhooks(format!("webhooks.allowed_hosts: {e}")))?,
        );
        let configured: Vec<(String, webhooks::WebhookSpec)> = webhooks::configured(&settings)
            .map_err(|e| StartupError::Webhooks(e.to_string()))?
            .into_iter()
            .map(|c| (c.id, c.spec))
            .collect();
        outbox.sync_configured(&configured).await?;
        let committer = Committer::start(
            store.clone(),
            pubsub.clone(),
            &settings.publish,
            rules,
            hooks,
            &lifecycle,
        );
        lifecycle.spawn_critical(
            "history_retention",
            retention::run(store.clone(), settings.history.clone(), lifecycle.clone()),
        );
        if settings.is_embedded() {
            tracing::warn!(
                history = store.backend(),
                broker = pubsub.backend(),
                "embedded mode: single replica only, history not durable"
            );
        }
        let access_log = AccessLog::start(&settings.access_log, store.pool(), &lifecycle);
        if settings.webhooks.enabled {
            let client = dispatcher::client(&settings, Arc::clone(&webhook_hosts))
                .map_err(|e| StartupError::Webhooks(e.to_string()))?;
            let dispatcher = Dispatcher::new(
                outbox.clone(),
                client,
                Arc::clone(&webhook_hosts),
                &settings,
            );
            lifecycle.spawn_critical("webhook_dispatcher", dispatcher.run(lifecycle.clone()));
        }
        let limits = crate::rate_limit::RateLimits::new(&settings.limits);
        lifecycle.spawn_critical(
            "rate_limit_upkeep",
            crate::rate_limit::run_upkeep(Arc::clone(&limits), lifecycle.clone()),
        );
        let state = AppState::new(Shared {
            settings,
            store,
            history,
            pubsub,
            committer,
            lifecycle,
            access_log,
            auth,
            limits,
            outbox,
            webhook_hosts,
        });
        Ok(Self {
            listener,
            local_addr,
            admin_listener,
            admin_addr,
            metrics,
            state,
        })
    }

    /// The address actually bound (meaningful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The app's metrics registry (what `/metrics` renders).
    pub fn metrics(&self) -> telemetry::metrics::Registry {
        self.metrics.clone()
    }

    /// The admin address (`/metrics`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Handle to trigger and observe shutdown.
    pub fn lifecycle(&self) -> Lifecycle {
        self.state.lifecycle.clone()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serve until the lifecycle is cancelled, then drain. Returns once everything stopped or
    /// the drain deadline passed (what was still running is logged); an error if the server
    /// failed or a critical task stopped unexpectedly.
    pub async fn run_until_stopped(self) -> Result<(), StartupError> {
        let lifecycle = self.state.lifecycle.clone();
        lifecycle.with_metrics(self.serve()).await
    }

    async fn serve(self) -> Result<(), StartupError> {
        let Self {
            listener,
            local_addr,
            admin_listener,
            admin_addr,
            metrics,
            state,
        } = self;
        let lifecycle = state.lifecycle.clone();
        let drain_timeout = state.settings.shutdown.drain_timeout;
        let flush_timeout = state.settings.shutdown.flush_timeout;
        let admin = axum::serve(
            admin_listener,
            http::admin::router(state.clone(), metrics.handle().clone()),
        )
        .with_graceful_shutdown(lifecycle.cancelled_owned());
        lifecycle.spawn_critical("admin_server", async move {
            if let Err(err) = admin.await {
                tracing::error!(%err, "admin server failed");
            }
        });
        lifecycle.spawn_critical(
            "metrics_upkeep",
            telemetry::metrics::upkeep(metrics.handle().clone(), lifecycle.clone()),
        );
        tracing::info!(addr = %local_addr, admin = %admin_addr, "listening");
        let app = http::router(state.clone());
        let server = http::serve::serve(
            listener,
            app,
            state.settings.http.header_timeout,
            lifecycle.clone(),
        );
        // Boxed so it can be dropped (with its router and state) before the flush phase.
        let mut server = Box::pin(server);
        // The server only ends by itself on an accept-loop error.
        let early_exit = tokio::select! {
            result = &mut server => Some(result),
            _ = lifecycle.cancelled() => None,
        };
        tracing::info!(?drain_timeout, "draining in-flight requests and sessions");
        let deadline = tokio::time::Instant::now() + drain_timeout;
        let requests_done = match early_exit {
            Some(_) => {
                lifecycle.cancel();
                true
            }
            None => tokio::time::timeout_at(deadline, &mut server).await.is_ok(),
        };
        if !requests_done {
            tracing::warn!("HTTP requests still in flight at the drain deadline");
        }
        let tasks_done = lifecycle
            .drain(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await;
        // Every request and session is done: the last access-log handles go with the state, which
        // lets the writer drain its queue and stop.
        let store = state.store.clone();
        drop(server);
        drop(state);
        let flushed = lifecycle.flush(flush_timeout).await;
        // Connections still checked out at the deadline must not hold up the exit.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), store.close()).await;
        tracing::info!(
            clean = requests_done && tasks_done && flushed,
            "shutdown complete"
        );
        match (early_exit, lifecycle.failure()) {
            (Some(Err(err)), _) => Err(StartupError::Serve(err)),
            (_, Some(task)) => Err(StartupError::TaskFailed { task }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Connections beyond the backlog wait for the accept loop; within it the kernel
    /// completes their handshakes on its own. With `TcpListener::bind`'s 128 the connects
    /// past the first ~129 would hang for a SYN resend.
    #[tokio::test]
    async fn the_listener_queues_as_many_connects_as_its_backlog() {
        // The kernel caps the backlog at somaxconn (4096 on Linux 5.4 and later).
        let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(4096);
        let n = cap.min(600);
        let (listener, addr) = bind("127.0.0.1:0".parse().unwrap(), 1024).unwrap();
        let connects = (0..n).map(|_| {
            tokio::time::timeout(
                Duration::from_millis(800),
                tokio::net::TcpStream::connect(addr),
            )
        });
        let results = futures_util::future::join_all(connects).await;
        let completed = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        assert_eq!(completed, n, "handshakes completed without any accept");
        drop(listener);
    }
}
