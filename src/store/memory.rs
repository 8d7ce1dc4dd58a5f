//! The in-memory message log of embedded mode: the same contract as the Postgres log (gapless
//! per-channel offsets, ranges, retention), kept in this process only. Nothing survives a
//! restart, and only one replica can use it.
//!
//! Channel quotas and the floors of removed channels work as in Postgres (see the
//! `channel_floors` migration), under the one lock, so removal needs no second round. The
//! webhook outbox ([`super::memory_outbox`]) is under the same lock: a message and its
//! deliveries are recorded together.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use super::{
    batch::{self, Earlier, NewMessage, Rules},
    memory_outbox::MemoryOutbox,
    messages::{AppendOptions, Appended, ChannelPosition, StoredMessage},
};

#[derive(Debug, Default)]
pub struct MemoryLog {
    inner: Mutex<Inner>,
    /// Newest messages kept per channel (`history.max_per_channel`), enforced on append.
    max_per_channel: usize,
    /// Wakes the webhook dispatcher when an append recorded deliveries.
    work: tokio::sync::Notify,
}

#[derive(Debug, Default)]
pub(super) struct Inner {
    pub(super) outbox: MemoryOutbox,
    channels: HashMap<String, ChannelLog>,
    /// Channels per creating subject.
    created: HashMap<String, u32>,
    /// Last offset of removed channels, per bucket of names (bounded by [`BUCKETS`]).
    floors: HashMap<u16, i64>,
    /// Idempotency keys per channel, with what they stored; expired ones are swept when the map
    /// has doubled since the last sweep.
    keys: HashMap<(String, String), KeyUse>,
    sweep_keys_at: usize,
}

#[derive(Debug, Clone, Copy)]
struct KeyUse {
    offset: i64,
    created_at: DateTime<Utc>,
    /// Of the data as a JSON value (key order and spacing do not matter, as in `jsonb`).
    digest: u64,
}

fn digest(data: &RawValue) -> u64 {
    use std::hash::{Hash, Hasher};
    let canonical = serde_json::from_str::<serde_json::Value>(data.get())
        .map_or_else(|_| data.get().to_owned(), |v| v.to_string());
    let mut h = std::hash::DefaultHasher::new();
    canonical.hash(&mut h);
    h.finish()
}

#[derive(Debug, Default)]
struct ChannelLog {
    last_offset: i64,
    created_by: String,
    messages: VecDeque<StoredMessage>,
}

/// A stable bucket of a channel name (this process only, like the log itself).
fn bucket(channel: &str) -> u16 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    channel.hash(&mut h);
    (h.finish() % BUCKETS) as u16
}

const BUCKETS: u64 = 65_536;

impl Inner {
    fn floor(&self, channel: &str) -> i64 {
        self.floors.get(&bucket(channel)).copied().unwrap_or(0)
    }
}

/// The log as [`batch::plan`] sees it, with keys older than `since` forgotten.
struct View<'a> {
    inner: &'a Inner,
    since: DateTime<Utc>,
}

impl batch::Lookup for View<'_> {
    fn channel(&self, name: &str) -> (i64, bool) {
        match self.inner.channels.get(name) {
            Some(log) => (log.last_offset, true),
            None => (self.inner.floor(name), false),
        }
    }

    fn created_by(&self, creator: &str) -> u64 {
        self.inner
            .created
            .get(creator)
            .copied()
            .map_or(0, u64::from)
    }

    fn earlier(&self, _: usize, message: &NewMessage) -> Option<Earlier> {
        let key = message.idempotency_key.as_deref()?;
        let used = self
            .inner
            .keys
            .get(&(message.channel.to_string(), key.to_owned()))
            .filter(|k| k.created_at > self.since)?;
        Some(Earlier {
            offset: used.offset,
            created_at: used.created_at,
            same_data: used.digest == digest(&message.data),
        })
    }
}

impl MemoryLog {
    pub fn new(max_per_channel: i64) -> Self {
        Self {
            inner: Mutex::default(),
            max_per_channel: usize::try_from(max_per_channel)
                .unwrap_or(usize::MAX)
                .max(1),
            work: tokio::sync::Notify::new(),
        }
    }

    /// Keep at most `capacity` webhook deliveries (`webhooks.memory_capacity`).
    pub fn with_outbox_capacity(self, capacity: usize) -> Self {
        self.lock().outbox = MemoryOutbox::new(capacity);
        self
    }

    /// Resolves once an append recorded deliveries since the last call.
    pub async fn outbox_work(&self) {
        self.work.notified().await;
    }

    pub(super) fn wake_outbox(&self) {
        self.work.notify_one();
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Append with the next offset, as `options` allow: a batch of one.
    pub fn append(&self, channel: &str, data: &RawValue, options: AppendOptions<'_>) -> Appended {
        let (message, rules) = options.into_batch(channel, data);
        self.append_batch(&[message], &[1], rules)
            .pop()
            .unwrap_or(Appended::Aborted)
    }

    /// Commit a batch as [`super::messages::append_batch`] does, deciding it with the same
    /// [`batch::plan`], under the one lock.
    pub fn append_batch(
        &self,
        messages: &[NewMessage],
        group_sizes: &[usize],
        rules: Rules,
    ) -> Vec<Appended> {
        let mut inner = self.lock();
        let now = Utc::now();
        let window =
            chrono::Duration::from_std(rules.idempotency_window).unwrap_or(chrono::Duration::MAX);
        let since = now
            .checked_sub_signed(window)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let plan = batch::plan(
            messages,
            group_sizes,
            &View {
                inner: &inner,
                since,
            },
            rules,
            now,
        );
        let inner = &mut *inner;
        for write in &plan.channels {
            if write.previous.is_none() {
                *inner.created.entry(write.creator.to_string()).or_default() += 1;
            }
            let log = inner
                .channels
                .entry(write.name.to_string())
                .or_insert_with(|| ChannelLog {
                    last_offset: 0,
                    created_by: write.creator.to_string(),
                    messages: VecDeque::new(),
                });
            log.last_offset = write.last_offset;
        }
        let keyed = plan
            .rows
            .iter()
            .any(|&(i, _)| messages[i].idempotency_key.is_some());
        if keyed && inner.keys.len() >= inner.sweep_keys_at {
            inner.keys.retain(|_, k| k.created_at > since);
            inner.sweep_keys_at = (inner.keys.len() * 2).max(1024);
        }
        let mut deliveries = 0;
        for &(index, offset) in &plan.rows {
            let message = &messages[index];
            deliveries += inner
                .outbox
                .enqueue(&message.channel, offset, &message.data, now);
            let Some(log) = inner.channels.get_mut(&*message.channel) else {
                continue; // Written above, under the same lock.
            };
            log.messages.push_back(StoredMessage {
                offset,
                data: message.data.clone(),
                created_at: now,
            });
            while log.messages.len() > self.max_per_channel {
                log.messages.pop_front();
            }
            if let Some(key) = &message.idempotency_key {
                let key_use = KeyUse {
                    offset,
                    created_at: now,
                    digest: digest(&message.data),
                };
                inner
                    .keys
                    .insert((message.channel.to_string(), key.to_string()), key_use);
            }
        }
        if deliveries > 0 {
            self.wake_outbox();
        }
        plan.outcomes
    }

    /// Remove up to `batch` channels without messages, keeping their last offset as their
    /// bucket's floor. Returns how many.
    pub fn remove_empty_channels(&self, batch: i64) -> u64 {
        let mut inner = self.lock();
        let empty: Vec<String> = inner
            .channels
            .iter()
            .filter(|(_, log)| log.messages.is_empty())
            .map(|(name, _)| name.clone())
            .take(usize::try_from(batch).unwrap_or(0))
            .collect();
        for name in &empty {
            let Some(log) = inner.channels.remove(name) else {
                continue;
            };
            let floor = inner.floors.entry(bucket(name)).or_default();
            *floor = (*floor).max(log.last_offset);
            if let Some(n) = inner.created.get_mut(&log.created_by) {
                *n -= 1;
                if *n == 0 {
                    inner.created.remove(&log.created_by);
                }
            }
        }
        empty.len() as u64
    }

    pub fn read_range(
        &self,
        channel: &str,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Vec<StoredMessage> {
        let inner = self.lock();
        let Some(log) = inner.channels.get(channel) else {
            return Vec::new();
        };
        // Offsets are consecutive, so the first wanted one is found by arithmetic.
        let first = log.messages.front().map_or(0, |m| m.offset);
        let skip = usize::try_from((after + 1).saturating_sub(first)).unwrap_or(0);
        log.messages
            .iter()
            .skip(skip)
            .take_while(|m| m.offset <= upto)
            .take(usize::try_from(limit).unwrap_or(0))
            .cloned()
            .collect()
    }

    pub fn position(&self, channel: &str) -> ChannelPosition {
        let inner = self.lock();
        match inner.channels.get(channel) {
            Some(log) => ChannelPosition {
                last_offset: log.last_offset,
                oldest_offset: log
                    .messages
                    .front()
                    .map_or(log.last_offset + 1, |m| m.offset),
            },
            None => {
                let floor = inner.floor(channel);
                ChannelPosition {
                    last_offset: floor,
                    oldest_offset: floor + 1,
                }
            }
        }
    }

    /// Drop up to `batch` messages older than `max_age`.
    pub fn prune_older_than(&self, max_age: Duration, batch: i64) -> u64 {
        let max_age = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
        let cutoff = Utc::now()
            .checked_sub_signed(max_age)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut budget = u64::try_from(batch).unwrap_or(0);
        let mut deleted = 0;
        for log in self.lock().channels.values_mut() {
            while budget > 0 && log.messages.front().is_some_and(|m| m.created_at < cutoff) {
                log.messages.pop_front();
                budget -= 1;
                deleted += 1;
            }
        }
        deleted
    }

    /// Whether `channel` exists (has been published to and not removed by retention).
    /// Messages and channels held, and the bytes of their data.
    pub fn size(&self) -> super::messages::HistorySize {
        let inner = self.lock();
        let (messages, bytes) = inner
            .channels
            .values()
            .flat_map(|log| &log.messages)
            .fold((0i64, 0i64), |(n, bytes), m| {
                (n + 1, bytes + m.data.get().len() as i64)
            });
        super::messages::HistorySize {
            messages,
            channels: inner.channels.len() as i64,
            bytes,
        }
    }

    pub fn has_channel(&self, channel: &str) -> bool {
        self.lock().channels.contains_key(channel)
    }

    /// Test hook: age every message of `channel` by `by`.
    pub fn backdate(&self, channel: &str, by: Duration) {
        if let Some(log) = self.lock().channels.get_mut(channel) {
            let by = chrono::Duration::from_std(by).unwrap_or_default();
            for m in &mut log.messages {
                m.created_at -= by;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn gapless_offsets_ranges_and_retention() {
        let log = MemoryLog::new(3);
        for i in 1..=5 {
            assert!(matches!(
                log.append("c", &raw(&i.to_string()), opts("", 0, None)),
                Appended::Stored { offset, .. } if offset == i
            ));
        }
        assert_eq!(
            log.position("c"),
            ChannelPosition {
                last_offset: 5,
                oldest_offset: 3
            }
        );
        let ids: Vec<i64> = log
            .read_range("c", 0, i64::MAX, 10)
            .iter()
            .map(|m| m.offset)
            .collect();
        assert_eq!(ids, [3, 4, 5]);
        let ids: Vec<i64> = log
            .read_range("c", 3, 4, 10)
            .iter()
            .map(|m| m.offset)
            .collect();
        assert_eq!(ids, [4]);
        assert!(log.read_range("other", 0, 10, 10).is_empty());
        log.backdate("c", Duration::from_secs(3600));
        assert_eq!(log.prune_older_than(Duration::from_secs(60), 2), 2);
        assert_eq!(log.position("c").oldest_offset, 5);
    }

    #[test]
    fn quotas_count_creations_and_removed_channels_keep_their_offsets() {
        let log = MemoryLog::new(10);
        assert!(stored(log.append("a", &raw("1"), opts("alice", 2, None))));
        assert!(stored(log.append("b", &raw("1"), opts("alice", 2, None))));
        assert!(
            log.append("c", &raw("1"), opts("alice", 2, None)) == Appended::ChannelLimit,
            "over quota"
        );
        assert!(
            stored(log.append("a", &raw("2"), opts("alice", 2, None))),
            "existing"
        );
        assert!(
            stored(log.append("c", &raw("1"), opts("bob", 2, None))),
            "another subject"
        );
        assert_eq!(log.remove_empty_channels(10), 0, "nothing is empty");

        log.backdate("a", Duration::from_secs(3600));
        log.prune_older_than(Duration::from_secs(60), 100);
        assert_eq!(log.remove_empty_channels(10), 1);
        // `a` stood at 2: recreated, it goes on from there, and alice has room again.
        assert_eq!(
            log.position("a"),
            ChannelPosition {
                last_offset: 2,
                oldest_offset: 3
            }
        );
        assert!(stored(log.append("c2", &raw("1"), opts("alice", 2, None))));
        assert!(matches!(
            log.append("a", &raw("3"), opts("bob", 0, None)),
            Appended::Stored { offset: 3, .. }
        ));
        // Compare-and-publish: only at the expected offset.
        assert_eq!(
            log.append("a", &raw("4"), opts("bob", 0, Some(2))),
            Appended::Conflict { last_offset: 3 }
        );
        assert!(stored(log.append("a", &raw("4"), opts("bob", 0, Some(3)))));
        assert!(stored(log.append(
            "fresh",
            &raw("1"),
            opts("bob", 0, Some(0))
        )));
    }

    fn opts(creator: &str, max_channels: u32, expected: Option<i64>) -> AppendOptions<'_> {
        AppendOptions {
            creator,
            max_channels,
            expected_last_id: expected,
            idempotency: None,
        }
    }

    fn stored(appended: Appended) -> bool {
        matches!(appended, Appended::Stored { .. })
    }
}
