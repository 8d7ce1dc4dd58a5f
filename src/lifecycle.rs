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
//!
//! Tasks the service cannot work without go through [`Lifecycle::spawn_critical`]: if one ends
//! before shutdown, the lifecycle records the failure and shuts down at once, and the process exits
//! with an error so the orchestrator restarts it.
//!
//! The lifecycle also carries the app's metrics recorder ([`Lifecycle::with_recorder`]): every
//! task it starts or tracks is polled with that recorder in scope ([`WithMetrics`]), so what a
//! task records lands in its own app's registry. Several apps in one process (the integration
//! tests, a benchmark) then keep separate counts instead of sharing one global recorder.

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use metrics::Recorder;

use tokio::task::JoinError;
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
    /// The first critical task that stopped before shutdown.
    failed: OnceLock<&'static str>,
    /// The app's metrics recorder; `None` records to the process-wide one.
    recorder: AppRecorder,
}

/// A shared metrics recorder (`None`: whatever the process installed globally).
#[derive(Clone, Default)]
struct AppRecorder(Option<Arc<dyn Recorder + Send + Sync>>);

impl fmt::Debug for AppRecorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "AppRecorder(app)"
        } else {
            "AppRecorder(global)"
        })
    }
}

impl AppRecorder {
    fn scope<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.0 {
            Some(recorder) => metrics::with_local_recorder(&**recorder, f),
            None => f(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A future polled with its app's metrics recorder in scope ([`Lifecycle::with_metrics`]).
    ///
    /// The recorder is thread-local for the duration of each poll only, so the future may move
    /// between worker threads freely.
    pub struct WithMetrics<F> {
        #[pin]
        inner: F,
        recorder: AppRecorder,
    }
}

pin_project_lite::pin_project! {
    /// A task the lifecycle waits for ([`Lifecycle::track`]): a poll adapter rather than an
    /// `async` block, which would hold the task's future twice (once as the captured value,
    /// once as the awaited one) and double every connection's task.
    pub struct Tracked<F> {
        #[pin]
        inner: WithMetrics<F>,
        guard: Option<TaskGuard>,
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        // Done: stop counting before the output is handed on.
        this.guard.take();
        Poll::Ready(out)
    }
}

impl<F: Future> Future for WithMetrics<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let inner = this.inner;
        this.recorder.scope(|| inner.poll(cx))
    }
}

impl Lifecycle {
    /// A lifecycle whose tasks record metrics to the process-wide recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// A lifecycle whose tasks record metrics to `recorder` (the app's own registry).
    pub fn with_recorder(recorder: Arc<dyn Recorder + Send + Sync>) -> Self {
        Self {
            inner: Arc::new(Inner {
                recorder: AppRecorder(Some(recorder)),
                ..Inner::default()
            }),
        }
    }

    /// Run `f` with the app's recorder in scope (what `spawn_critical` records in its caller).
    fn metrics_scope<T>(&self, f: impl FnOnce() -> T) -> T {
        self.inner.recorder.scope(f)
    }

    /// Poll `task` with the app's recorder in scope, for futures something else runs (axum's
    /// upgrade task, a handler served by `axum::serve`, the caller of `Application::build`).
    pub fn with_metrics<F: Future>(&self, task: F) -> WithMetrics<F> {
        WithMetrics {
            inner: task,
            recorder: self.inner.recorder.clone(),
        }
    }

    /// Start a background task owned by the app. `name` groups tasks in shutdown reports.
    pub fn spawn<F>(&self, name: &'static str, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.tracker.spawn(self.track(name, task))
    }

    /// Start a task the service cannot work without (the Redis listener, the admin server...):
    /// it must run until [`Lifecycle::cancelled`]. If it ends before that, by returning or
    /// panicking, that is a failure: it is logged with the panic message, counted in
    /// `relay_task_failures_total{task}`, recorded ([`Lifecycle::failure`]), and the lifecycle is
    /// cancelled at once, skipping the readiness grace (readiness turns 503 and everything drains).
    /// The app then stops with an error and the process exits 1.
    ///
    /// Why exit rather than restart the task in-process: the listener owns the channel registry,
    /// so a new listener would start with none of the sessions' subscriptions and every client
    /// would silently stop receiving. A process restart closes their connections instead; they
    /// reconnect (to another replica, or to this pod once the orchestrator restarted it) and
    /// resume with `since` from the stored history.
    pub fn spawn_critical<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // The series exists from the start, so a failure shows as an increase from 0.
        self.metrics_scope(|| {
            metrics::counter!("relay_task_failures_total", "task" => name).increment(0);
        });
        let task = self.spawn(name, task);
        let lifecycle = self.clone();
        // Tracked, so the drain waits for the verdict; not in `running`, where it would only
        // repeat its task's entry.
        self.inner.tracker.spawn(self.with_metrics(async move {
            let outcome = task.await;
            // Ending once told to stop is the normal way out.
            if !lifecycle.is_cancelled() {
                lifecycle.fail(name, outcome);
            }
        }));
    }

    fn fail(&self, task: &'static str, outcome: Result<(), JoinError>) {
        metrics::counter!("relay_task_failures_total", "task" => task).increment(1);
        match outcome {
            Ok(()) => tracing::error!(
                task,
                "critical task returned before shutdown; shutting down"
            ),
            Err(err) => tracing::error!(
                task,
                panic = %panic_message(err),
                "critical task panicked; shutting down"
            ),
        }
        // Recorded before cancelling, so whoever sees the cancellation also sees why.
        let _ = self.inner.failed.set(task);
        self.cancel();
    }

    /// The critical task whose unexpected end shut the service down, if one did.
    pub fn failure(&self) -> Option<&'static str> {
        self.inner.failed.get().copied()
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
        self.inner.flusher.spawn(self.with_metrics(async move {
            let out = task.await;
            drop(guard);
            out
        }))
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

    /// Wrap a future so the tracker waits for it (and it records to the app's metrics), for
    /// tasks that something else spawns.
    pub fn track<F: Future>(&self, name: &'static str, task: F) -> Tracked<F> {
        Tracked {
            inner: self.with_metrics(task),
            guard: Some(self.task_guard(name)),
        }
    }

    /// A guard that counts as a running task until dropped (held by [`Tracked`]).
    fn task_guard(&self, name: &'static str) -> TaskGuard {
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

/// The panic message of a task that panicked, for the log.
fn panic_message(err: JoinError) -> String {
    match err.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(not a string)".to_owned()),
        // Cancelled: only a runtime shutting down does that, the handle never leaves us.
        Err(err) => err.to_string(),
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

    /// Waits for the lifecycle to be cancelled, failing the test after a second.
    async fn expect_cancelled(lifecycle: &Lifecycle) {
        tokio::time::timeout(Duration::from_secs(1), lifecycle.cancelled())
            .await
            .expect("the lifecycle was cancelled");
    }

    #[tokio::test]
    async fn critical_task_that_panics_shuts_down_and_is_recorded() {
        let lifecycle = Lifecycle::new();
        lifecycle.spawn_critical("doomed", async { panic!("registry invariant broken") });
        expect_cancelled(&lifecycle).await;
        assert_eq!(lifecycle.failure(), Some("doomed"));
        assert!(lifecycle.is_draining());
        assert!(lifecycle.drain(Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn critical_task_that_returns_early_is_a_failure_too() {
        let lifecycle = Lifecycle::new();
        lifecycle.spawn_critical("quitter", async {});
        expect_cancelled(&lifecycle).await;
        assert_eq!(lifecycle.failure(), Some("quitter"));
    }

    #[tokio::test]
    async fn critical_task_that_ends_after_cancel_is_no_failure() {
        let lifecycle = Lifecycle::new();
        let l = lifecycle.clone();
        lifecycle.spawn_critical("polite", async move { l.cancelled().await });
        lifecycle.cancel();
        assert!(lifecycle.drain(Duration::from_secs(1)).await);
        assert_eq!(lifecycle.failure(), None);
    }

    #[tokio::test]
    async fn ordinary_tasks_may_end_or_panic_without_shutting_down() {
        let lifecycle = Lifecycle::new();
        lifecycle.spawn("done", async {}).await.expect("returns");
        let panicked = lifecycle.spawn("oops", async { panic!("boom") }).await;
        assert!(panicked.is_err_and(|err| err.is_panic()));
        assert_eq!(lifecycle.failure(), None);
        assert!(!lifecycle.is_draining());
        assert!(!lifecycle.is_cancelled());
    }
}
