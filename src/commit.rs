//! Group commit: publishes that arrive together, from any HTTP request or WebSocket connection,
//! are committed together — one transaction and one write statement per batch
//! ([`crate::store::MessageStore::append_batch`]).
//!
//! A publisher hands a *group* (one publish, or one `POST /api/v1/messages` request) to
//! [`Committer::submit`]. That takes room for its messages in a bounded queue
//! (`publish.queue_capacity`), waiting at most `publish.queue_wait` for it; after that the
//! publish is refused as unavailable and counted in `relay_publish_queue_full_total`, because
//! a publisher that waits for ever only moves the overload into its own timeouts. The publisher
//! then awaits its [`Ticket`], answered after the commit.
//!
//! The committer task drains the queue into a batch and commits it
//! * at once when no commit is in flight, so a lone publish on an idle server never waits;
//! * otherwise once the batch holds `publish.commit_max_messages`, or `publish.commit_delay`
//!   after its first publish arrived, with at most [`COMMITS_IN_FLIGHT`] commits running.
//!
//! A commit takes its channels' locks only after the commit before it holds its own, so in every
//! channel batches commit in the order they were closed, and a batch keeps the queue's order:
//! what one connection sent in order is stored in order. After the commit, the committer hands
//! the stored messages to the local subscribers and to the publisher task
//! ([`crate::pubsub::PubSub::publish_batch`]), so that delivery belongs to the service even if
//! the request that published has gone.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot};

use crate::{
    config::PublishSettings,
    lifecycle::Lifecycle,
    pubsub::{CommittedMessage, PubSub},
    store::{
        MessageStore, StoreError,
        batch::{NewMessage, Rules},
        messages::Appended,
        outbox::HookCache,
    },
};

/// Commits running at once: one waiting for the locks of the other is enough to have the next
/// transaction ready the moment the previous one commits.
pub const COMMITS_IN_FLIGHT: usize = 2;

/// Why a group was not committed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("the publish queue stayed full for {0:?}")]
    QueueFull(Duration),
    #[error("the service is shutting down")]
    Stopped,
    #[error(transparent)]
    Store(Arc<StoreError>),
}

type Reply = oneshot::Sender<Result<Vec<Appended>, CommitError>>;

struct Job {
    messages: Vec<NewMessage>,
    /// The publish's W3C trace context, carried into the PUBLISH.
    traceparent: Option<String>,
    reply: Reply,
    /// The job's room in the queue, given back once it is committed.
    _room: OwnedSemaphorePermit,
}

/// Handle to the committer task; cheap to clone.
#[derive(Clone)]
pub struct Committer {
    queue: mpsc::Sender<Job>,
    room: Arc<Semaphore>,
    wait: Duration,
}

/// A submitted group's answer, once committed.
pub struct Ticket(oneshot::Receiver<Result<Vec<Appended>, CommitError>>);

impl Ticket {
    /// One outcome per message of the group, in order.
    pub async fn outcomes(self) -> Result<Vec<Appended>, CommitError> {
        self.0.await.unwrap_or(Err(CommitError::Stopped))
    }
}

impl Committer {
    /// Start the committer task. `hooks` is the webhook cache the commits match against (and
    /// the dispatcher's wake-up).
    pub fn start(
        store: MessageStore,
        pubsub: PubSub,
        settings: &PublishSettings,
        rules: Rules,
        hooks: Arc<HookCache>,
        lifecycle: &Lifecycle,
    ) -> Self {
        let capacity = settings.queue_capacity;
        // Every queued job holds at least one of `capacity` permits, so the channel never fills.
        let (queue, jobs) = mpsc::channel(capacity);
        let room = Arc::new(Semaphore::new(capacity));
        let task = Task {
            store,
            pubsub,
            rules,
            hooks,
            max_messages: settings.commit_max_messages,
            delay: settings.commit_delay,
            room: Arc::clone(&room),
            capacity,
        };
        metrics::gauge!("relay_publish_queue_messages").set(0.0);
        lifecycle.spawn_critical("group_commit", task.run(jobs, lifecycle.clone()));
        Self {
            queue,
            room,
            wait: settings.queue_wait,
        }
    }

    /// Queue `messages` as one group (all or nothing), waiting up to `publish.queue_wait` for
    /// room. Groups submitted one after another are committed in that order.
    pub async fn submit(
        &self,
        messages: Vec<NewMessage>,
        traceparent: Option<String>,
    ) -> Result<Ticket, CommitError> {
        let n = u32::try_from(messages.len()).unwrap_or(u32::MAX).max(1);
        let room = match Arc::clone(&self.room).try_acquire_many_owned(n) {
            Ok(room) => room,
            Err(TryAcquireError::Closed) => return Err(CommitError::Stopped),
            Err(TryAcquireError::NoPermits) => {
                metrics::counter!("relay_publish_queue_waits_total").increment(1);
                let acquire = Arc::clone(&self.room).acquire_many_owned(n);
                match tokio::time::timeout(self.wait, acquire).await {
                    Ok(Ok(room)) => room,
                    Ok(Err(_)) => return Err(CommitError::Stopped),
                    Err(_) => {
                        metrics::counter!("relay_publish_queue_full_total").increment(1);
                        return Err(CommitError::QueueFull(self.wait));
                    }
                }
            }
        };
        let (reply, answer) = oneshot::channel();
        let job = Job {
            messages,
            traceparent,
            reply,
            _room: room,
        };
        self.queue.try_send(job).map_err(|_| CommitError::Stopped)?;
        Ok(Ticket(answer))
    }
}

struct Task {
    store: MessageStore,
    pubsub: PubSub,
    rules: Rules,
    hooks: Arc<HookCache>,
    max_messages: usize,
    delay: Duration,
    room: Arc<Semaphore>,
    capacity: usize,
}

impl Task {
    async fn run(self, mut jobs: mpsc::Receiver<Job>, lifecycle: Lifecycle) {
        let task = Arc::new(self);
        let mut in_flight = FuturesUnordered::new();
        let mut batch: Vec<Job> = Vec::new();
        let mut batch_messages = 0;
        let mut opened = Instant::now();
        // Tells when the last commit started holds its locks.
        let mut previous: Option<oneshot::Receiver<()>> = None;
        let mut stopping = false;
        loop {
            let slot = in_flight.len() < COMMITS_IN_FLIGHT;
            let full = batch_messages >= task.max_messages;
            if !batch.is_empty()
                && slot
                && (in_flight.is_empty() || full || opened.elapsed() >= task.delay)
            {
                let (ordered, next) = oneshot::channel();
                let after = previous.replace(next);
                in_flight.push(Arc::clone(&task).commit(
                    std::mem::take(&mut batch),
                    after,
                    ordered,
                ));
                batch_messages = 0;
                continue;
            }
            if stopping && batch.is_empty() && in_flight.is_empty() && jobs.is_empty() {
                break;
            }
            let deadline = (!batch.is_empty() && slot).then(|| opened + task.delay);
            tokio::select! {
                biased;
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                job = jobs.recv(), if !full => {
                    let Some(job) = job else { break };
                    if batch.is_empty() {
                        opened = Instant::now();
                    }
                    batch_messages += job.messages.len();
                    batch.push(job);
                    // Take what else is queued now, up to the bound, without a wake-up each.
                    while batch_messages < task.max_messages {
                        let Ok(job) = jobs.try_recv() else { break };
                        batch_messages += job.messages.len();
                        batch.push(job);
                    }
                }
                () = sleep_until(deadline), if deadline.is_some() => {}
                () = lifecycle.cancelled(), if !stopping => {
                    // Commit what was submitted (its publishers are waiting), then stop.
                    stopping = true;
                }
            }
        }
        jobs.close();
        tracing::debug!("group commit stopped");
    }

    /// Commit one batch after the one before it holds its locks (`after`), and answer its jobs.
    async fn commit(
        self: Arc<Self>,
        mut jobs: Vec<Job>,
        after: Option<oneshot::Receiver<()>>,
        ordered: oneshot::Sender<()>,
    ) {
        if let Some(after) = after {
            // An error means the previous commit failed before locking: nothing to wait for.
            let _ = after.await;
        }
        let queued = self.capacity - self.room.available_permits();
        metrics::gauge!("relay_publish_queue_messages").set(queued as f64);
        let sizes: Vec<usize> = jobs.iter().map(|j| j.messages.len()).collect();
        let messages: Vec<NewMessage> = jobs
            .iter_mut()
            .flat_map(|j| std::mem::take(&mut j.messages))
            .collect();
        metrics::histogram!("relay_publish_batch_messages").record(messages.len() as f64);
        let started = Instant::now();
        let result = self
            .store
            .append_batch(&messages, &sizes, self.rules, &self.hooks, move || {
                let _ = ordered.send(());
            })
            .await;
        metrics::histogram!("relay_publish_commit_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(outcomes) => self.answer(jobs, &sizes, messages, outcomes),
            Err(err) if err.is_data_rejected() && jobs.len() > 1 => {
                // Postgres refused one group's data (relay's own checks let it through): commit
                // each group alone, so that only that group fails. Its successors may have
                // committed meanwhile; the data of well-behaved clients never comes here.
                tracing::warn!(%err, groups = jobs.len(), "batch refused by Postgres; committing its groups one by one");
                let mut messages = messages.into_iter();
                for (job, &size) in jobs.into_iter().zip(&sizes) {
                    let group: Vec<NewMessage> = messages.by_ref().take(size).collect();
                    let result = self
                        .store
                        .append_batch(&group, &[size], self.rules, &self.hooks, || {})
                        .await;
                    match result {
                        Ok(outcomes) => self.answer(vec![job], &[size], group, outcomes),
                        Err(err) => {
                            metrics::counter!("relay_publish_commit_failures_total")
                                .increment(size as u64);
                            let _ = job.reply.send(Err(CommitError::Store(Arc::new(err))));
                        }
                    }
                }
            }
            Err(err) => {
                tracing::warn!(%err, messages = messages.len(), "publish batch failed");
                metrics::counter!("relay_publish_commit_failures_total")
                    .increment(messages.len() as u64);
                let err = CommitError::Store(Arc::new(err));
                for job in jobs {
                    let _ = job.reply.send(Err(err.clone()));
                }
            }
        }
    }

    /// Hand what was stored to delivery, then answer each job with its outcomes.
    fn answer(
        &self,
        jobs: Vec<Job>,
        sizes: &[usize],
        messages: Vec<NewMessage>,
        outcomes: Vec<Appended>,
    ) {
        let mut committed = Vec::new();
        let mut messages = messages.into_iter();
        let mut outcomes = outcomes.into_iter();
        for (job, &size) in jobs.into_iter().zip(sizes) {
            let mine: Vec<Appended> = outcomes.by_ref().take(size).collect();
            for (message, outcome) in messages.by_ref().take(size).zip(&mine) {
                if let Appended::Stored { offset, .. } = *outcome {
                    committed.push(CommittedMessage {
                        channel: message.channel,
                        data: message.data,
                        id: offset,
                        traceparent: job.traceparent.clone(),
                    });
                }
            }
            let _ = job.reply.send(Ok(mine));
        }
        if !committed.is_empty() {
            metrics::counter!("relay_messages_committed_total").increment(committed.len() as u64);
            self.pubsub.publish_batch(committed);
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}
