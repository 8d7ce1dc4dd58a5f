//! The access-log writer: a batcher task that groups queued entries by count or time, and one
//! task per sink that writes those batches.
//!
//! Each sink has a small bounded inbox of batches. A sink that fails is retried with exponential
//! backoff; while it retries its inbox fills, and further batches for *that* sink are dropped and
//! counted, so one broken sink never stalls the batcher or the other sinks.
//!
//! Shutdown: the batcher ends when every [`super::AccessLog`] handle is gone (all requests and
//! sessions finished), writes its last partial batch and closes the sink inboxes; each sink task
//! writes what it holds and ends. Both run in the lifecycle's flush phase, and are not critical
//! tasks: they end by design once their input closes, and if one dies the entries it would have
//! written are dropped and counted, which must not take the service down.

use std::{sync::Arc, time::Duration};

use tokio::sync::mpsc;

use super::{entry::Entry, sinks::Sink};
use crate::{config::AccessLogSettings, lifecycle::Lifecycle};

/// Batches waiting per sink before further ones are dropped for it.
const SINK_INBOX: usize = 8;
/// Attempts per batch before it is dropped (and counted).
const SINK_ATTEMPTS: u32 = 5;
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);

pub(super) fn start(
    settings: &AccessLogSettings,
    db: Option<&sqlx::PgPool>,
    lifecycle: &Lifecycle,
    queue: mpsc::Receiver<Entry>,
) {
    let mut inboxes = Vec::new();
    for kind in &settings.sinks {
        let Some(sink) = Sink::new(*kind, settings, db) else {
            tracing::warn!(sink = ?kind, "access-log sink needs Postgres; skipped");
            continue;
        };
        let name = sink.name();
        metrics::counter!("relay_access_log_entries_total", "sink" => name).increment(0);
        metrics::counter!("relay_access_log_sink_errors_total", "sink" => name).increment(0);
        for reason in ["sink_backlog", "sink_failed"] {
            metrics::counter!("relay_access_log_dropped_total", "reason" => reason, "sink" => name)
                .increment(0);
        }
        let (tx, rx) = mpsc::channel(SINK_INBOX);
        inboxes.push((name, tx));
        lifecycle.spawn_flusher("access_log_sink", run_sink(sink, rx));
    }
    lifecycle.spawn_flusher(
        "access_log_batcher",
        run_batcher(queue, inboxes, settings.batch_size, settings.flush_interval),
    );
}

type Inbox = (&'static str, mpsc::Sender<Arc<[Entry]>>);

async fn run_batcher(
    mut queue: mpsc::Receiver<Entry>,
    inboxes: Vec<Inbox>,
    batch_size: usize,
    flush_interval: Duration,
) {
    let mut batch = Vec::with_capacity(batch_size);
    let mut ticker = tokio::time::interval(flush_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            entry = queue.recv() => match entry {
                Some(entry) => {
                    batch.push(entry);
                    if batch.len() >= batch_size {
                        dispatch(&mut batch, &inboxes);
                    }
                }
                // Every handle is gone: the app has drained. Write the rest and stop.
                None => break,
            },
            _ = ticker.tick() => dispatch(&mut batch, &inboxes),
        }
    }
    dispatch(&mut batch, &inboxes);
}

fn dispatch(batch: &mut Vec<Entry>, inboxes: &[Inbox]) {
    if batch.is_empty() {
        return;
    }
    let shared: Arc<[Entry]> = std::mem::take(batch).into();
    for (name, inbox) in inboxes {
        if inbox.try_send(Arc::clone(&shared)).is_err() {
            metrics::counter!("relay_access_log_dropped_total", "reason" => "sink_backlog", "sink" => *name)
                .increment(shared.len() as u64);
        }
    }
}

async fn run_sink(mut sink: Sink, mut inbox: mpsc::Receiver<Arc<[Entry]>>) {
    let name = sink.name();
    while let Some(batch) = inbox.recv().await {
        let mut delay = FIRST_RETRY_DELAY;
        for attempt in 1..=SINK_ATTEMPTS {
            match sink.write(&batch).await {
                Ok(()) => {
                    metrics::counter!("relay_access_log_entries_total", "sink" => name)
                        .increment(batch.len() as u64);
                    break;
                }
                Err(err) => {
                    metrics::counter!("relay_access_log_sink_errors_total", "sink" => name)
                        .increment(1);
                    if attempt == SINK_ATTEMPTS {
                        tracing::warn!(sink = name, %err, entries = batch.len(), "access-log sink failed; batch dropped");
                        metrics::counter!("relay_access_log_dropped_total", "reason" => "sink_failed", "sink" => name)
                            .increment(batch.len() as u64);
                    } else {
                        tracing::debug!(sink = name, %err, attempt, "access-log sink failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
        }
    }
}
