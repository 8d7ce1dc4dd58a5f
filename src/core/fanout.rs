//! How one message reaches a big channel's subscribers: split over threads.
//!
//! A push is cheap, except that with a connection's direct lane armed it is the frame's `write`
//! syscall (several µs over loopback). A message for 1,000 subscribers on one thread is then a
//! burst of several milliseconds, and the last subscriber waits for all of it. So a channel
//! with at least two shards' worth of subscribers is cut into one shard per thread: the calling
//! thread (the core task's) pushes the first shard itself, a small pool of threads the others,
//! and [`Fanout::push`] returns once every shard is done.
//!
//! Because the call waits for all shards, every push of a message has happened before the core
//! does anything else, exactly as on one thread: per-connection order needs no further care.
//! The pool's threads belong to the [`Fanout`] (and so to the core task); they end when it is
//! dropped.

use std::sync::Arc;

use super::{Outgoing, Push, Subscriber};

/// Where a message's pushes run.
#[derive(Debug)]
pub struct Fanout {
    pool: Option<rayon::ThreadPool>,
    /// Subscribers per shard at least: below that, a thread's hand-off costs more than it saves.
    min_shard: usize,
}

impl Fanout {
    /// Every push on the calling thread.
    pub fn inline() -> Self {
        Self {
            pool: None,
            min_shard: usize::MAX,
        }
    }

    /// `threads` extra threads (0: [`Fanout::inline`]) for channels of at least two shards of
    /// `min_shard` subscribers.
    pub fn threaded(threads: usize, min_shard: usize) -> Result<Self, rayon::ThreadPoolBuildError> {
        if threads == 0 {
            return Ok(Self::inline());
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("relay-fanout-{i}"))
            .build()?;
        Ok(Self {
            pool: Some(pool),
            min_shard: min_shard.max(1),
        })
    }

    /// Push `item` to every subscriber; `results[i]` is what the push to `subs[i]` did.
    pub(super) fn push<T: Subscriber + Send + Sync>(
        &self,
        subs: &[Arc<T>],
        item: &Outgoing,
        results: &mut Vec<Push>,
    ) {
        results.clear();
        results.resize(subs.len(), Push::Queued);
        let shards = match &self.pool {
            Some(pool) => (pool.current_num_threads() + 1).min(subs.len() / self.min_shard),
            None => 1,
        };
        let Some(pool) = self.pool.as_ref().filter(|_| shards > 1) else {
            return push_shard(subs, item, results);
        };
        let size = subs.len().div_ceil(shards);
        pool.in_place_scope(|scope| {
            let mut shards = subs.chunks(size).zip(results.chunks_mut(size));
            let first = shards.next();
            for (subs, results) in shards {
                scope.spawn(move |_| push_shard(subs, item, results));
            }
            if let Some((subs, results)) = first {
                push_shard(subs, item, results);
            }
        });
    }
}

fn push_shard<T: Subscriber>(subs: &[Arc<T>], item: &Outgoing, results: &mut [Push]) {
    for (sub, result) in subs.iter().zip(results) {
        *result = sub.push(item.clone());
    }
}
