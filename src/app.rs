//! [`Application`]: build the service from settings, then run it until shutdown.
//!
//! `build` does the startup sequence — Postgres pool (with retries), migrations if enabled, Redis
//! clients and the pub/sub listener, app state, and binding the listener socket *before* serving
//! (so port 0 works and tests learn the real port). `run_until_stopped` serves until the lifecycle
//! is cancelled, then drains requests and tracked tasks within `shutdown.drain_timeout`.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;

use crate::{
    config::Settings,
    http,
    lifecycle::Lifecycle,
    pubsub::{HistorySource, PubSub, PubSubError},
    retention,
    state::AppState,
    store::{self, StoreError},
};

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
    #[error("server error: {0}")]
    Serve(#[source] std::io::Error),
}

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: AppState,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let settings = Arc::new(settings);
        let lifecycle = Lifecycle::new();
        let db = store::connect(&settings.database).await?;
        if settings.database.migrate_on_start {
            store::migrate(&db).await?;
            tracing::info!("migrations applied");
        }
        let history = HistorySource {
            db: db.clone(),
            settings: settings.history.clone(),
            timeout: settings.database.acquire_timeout,
        };
        let pubsub = PubSub::start(&settings.redis, history, &lifecycle)?;
        lifecycle.spawn(
            "history_retention",
            retention::run(db.clone(), settings.history.clone(), lifecycle.clone()),
        );
        let addr = SocketAddr::new(settings.server.host, settings.server.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { addr, source })?;
        let state = AppState {
            settings,
            db,
            pubsub,
            lifecycle,
        };
        Ok(Self {
            listener,
            local_addr,
            state,
        })
    }

    /// The address actually bound (meaningful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Handle to trigger and observe shutdown.
    pub fn lifecycle(&self) -> Lifecycle {
        self.state.lifecycle.clone()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serve until the lifecycle is cancelled, then drain. Returns once everything stopped or
    /// the drain deadline passed (what was still running is logged).
    pub async fn run_until_stopped(self) -> Result<(), StartupError> {
        let Self {
            listener,
            local_addr,
            state,
        } = self;
        let lifecycle = state.lifecycle.clone();
        let drain_timeout = state.settings.shutdown.drain_timeout;
        tracing::info!(addr = %local_addr, "listening");
        let app = http::router(state.clone());
        let server = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(lifecycle.cancelled_owned());
        let server = std::future::IntoFuture::into_future(server);
        tokio::pin!(server);
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
        // Connections still checked out at the deadline must not hold up the exit.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), state.db.close()).await;
        tracing::info!(clean = requests_done && tasks_done, "shutdown complete");
        match early_exit {
            Some(Err(err)) => Err(StartupError::Serve(err)),
            _ => Ok(()),
        }
    }
}
