//! The application's lifecycle: one place that owns every background task and decides when
//! they stop.
//!
//! [`Lifecycle`] bundles the root [`CancellationToken`] and the [`TaskTracker`]. Every task the
//! service starts — the Redis listener, each WebSocket session, writers — goes through
//! [`Lifecycle::spawn`] or [`Lifecycle::track`], watches [`Lifecycle::cancelled`], and is awaited by
//! [`Lifecycle::drain`] at shutdown. Nothing is detached.
//!
//! Shutdown happens in two steps so load balancers can react: [`Lifecycle::begin_shutdown`] first
//! marks the service as *draining* (`/readyz` turns 503 at once), waits the readiness grace, and only
//! then cancels the token, which stops the listener from accepting and tells every task to finish.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Shared handle to the lifecycle; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Set when shutdown begins: readiness reports 503 from this moment.
    draining: CancellationToken,
    /// Cancelled after the readiness grace: every task winds down.
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Tasks that must outlive the drain to write out what it produced (log sinks).
    flusher: TaskTracker,
    /// Live tasks by kind, so a drain that times out can say what was still running.
    running: Mutex<BTreeMap<&'static str, usize>>,
}

impl Lifecycle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start a background task owned by the app. `name` groups tasks in shutdown reports.
    pub fn spawn<F>(&self, name: &'static str, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.tracker.spawn(self.track(name, task))
    }

    /// Start a task of the flush phase: it keeps running through the drain (requests finishing
    /// late still produce work for it) and is awaited by [`Lifecycle::flush`] afterwards. It must
    /// end by itself once its inputs are closed; it is not told to stop.
    pub fn spawn_flusher<F>(
        &self,
        name: &'static str,
        task: F,
    ) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let guard = RunningGuard::new(self.clone(), name);
        self.inner.flusher.spawn(async move {
            let out = task.await;
            drop(guard);
            out
        })
    }

    /// Wait for the flush-phase tasks, up to `timeout`. Returns false if the deadline passed.
    pub async fn flush(&self, timeout: Duration) -> bool {
        self.inner.flusher.close();
        match tokio::time::timeout(timeout, self.inner.flusher.wait()).await {
            Ok(()) => true,
            Err(_) => {
                tracing::warn!(?timeout, running = ?self.running(), "flush deadline passed");
                false
            }
        }
    }

    /// Wrap a future so the tracker waits for it, for tasks that something else spawns.
    pub fn track<F: Future>(
        &self,
        name: &'static str,
        task: F,
    ) -> impl Future<Output = F::Output> + use<F> {
        let guard = self.task_guard(name);
        async move {
            let out = task.await;
            drop(guard);
            out
        }
    }

    /// A guard that counts as a running task until dropped. For work that starts before its
    /// future exists: a WebSocket handler takes one *before* axum spawns the upgraded session,
    /// so a shutdown that begins in between still waits for the session.
    pub fn task_guard(&self, name: &'static str) -> TaskGuard {
        TaskGuard {
            _token: self.inner.tracker.token(),
            _running: RunningGuard::new(self.clone(), name),
        }
    }

    /// Resolves once shutdown reached the point where tasks must stop.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.inner.shutdown.cancelled()
    }

    /// Owned variant of [`Lifecycle::cancelled`], for futures that must be `'static`.
    pub fn cancelled_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.inner.shutdown.clone().cancelled_owned()
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// True from the first shutdown signal on; readiness answers 503.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.is_cancelled()
    }

    /// Stop advertising readiness, wait `readiness_grace`, then cancel every task. Idempotent.
    pub async fn begin_shutdown(&self, readiness_grace: Duration) {
        if self.is_draining() {
            return;
        }
        self.inner.draining.cancel();
        tracing::info!(
            ?readiness_grace,
            "shutdown started: readiness now reports 503"
        );
        tokio::select! {
            _ = tokio::time::sleep(readiness_grace) => {}
            // Someone (e.g. a fatal error) cancelled directly: do not wait the grace out.
            _ = self.inner.shutdown.cancelled() => {}
        }
        self.inner.shutdown.cancel();
    }

    /// Cancel at once, skipping the readiness grace (fatal errors, tests).
    pub fn cancel(&self) {
        self.inner.draining.cancel();
        self.inner.shutdown.cancel();
    }

    /// Wait for every tracked task, up to `timeout`. Returns false, after logging what was still
    /// running, if the deadline passed.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.inner.tracker.close();
        match tokio::time::timeout(timeout, self.inner.tracker.wait()).await {
            Ok(()) => true,
            Err(_) => {
                let running = self.running();
                tracing::warn!(
                    ?timeout,
                    ?running,
                    "drain deadline passed with tasks still running"
                );
                false
            }
        }
    }

    /// Number of live tasks of each kind.
    pub fn running(&self) -> BTreeMap<&'static str, usize> {
        let map = self
            .inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| (*k, *n))
            .collect()
    }
}

/// See [`Lifecycle::task_guard`].
#[derive(Debug)]
pub struct TaskGuard {
    _token: tokio_util::task::task_tracker::TaskTrackerToken,
    _running: RunningGuard,
}

/// Counts a task as running from creation until drop (completion or cancellation).
#[derive(Debug)]
struct RunningGuard {
    lifecycle: Lifecycle,
    name: &'static str,
}

impl RunningGuard {
    fn new(lifecycle: Lifecycle, name: &'static str) -> Self {
        *lifecycle
            .inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name)
            .or_default() += 1;
        Self { lifecycle, name }
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let mut map = self
            .lifecycle
            .inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(self.name) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = terminate => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_tracked_tasks_and_reports_stragglers() {
        let lifecycle = Lifecycle::new();
        let l = lifecycle.clone();
        lifecycle.spawn("polite", async move { l.cancelled().await });
        lifecycle.spawn("stubborn", std::future::pending::<()>());
        lifecycle.cancel();
        assert!(!lifecycle.drain(Duration::from_millis(50)).await);
        assert_eq!(lifecycle.running(), BTreeMap::from([("stubborn", 1)]));
    }
}
