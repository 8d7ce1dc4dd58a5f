//! The in-memory message log of embedded mode: the same contract as the Postgres log (gapless
//! per-channel offsets, ranges, retention), kept in this process only. Nothing survives a
//! restart, and only one replica can use it.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use super::messages::{ChannelPosition, StoredMessage};

#[derive(Debug, Default)]
pub struct MemoryLog {
    channels: Mutex<HashMap<String, ChannelLog>>,
    /// Newest messages kept per channel (`history.max_per_channel`), enforced on append.
    max_per_channel: usize,
}

#[derive(Debug, Default)]
struct ChannelLog {
    last_offset: i64,
    messages: VecDeque<StoredMessage>,
}

impl MemoryLog {
    pub fn new(max_per_channel: i64) -> Self {
        Self {
            channels: Mutex::default(),
            max_per_channel: usize::try_from(max_per_channel)
                .unwrap_or(usize::MAX)
                .max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ChannelLog>> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn append(&self, channel: &str, data: &RawValue) -> (i64, DateTime<Utc>) {
        let mut channels = self.lock();
        let log = channels.entry(channel.to_owned()).or_default();
        log.last_offset += 1;
        let created_at = Utc::now();
        log.messages.push_back(StoredMessage {
            offset: log.last_offset,
            data: data.to_owned(),
            created_at,
        });
        while log.messages.len() > self.max_per_channel {
            log.messages.pop_front();
        }
        (log.last_offset, created_at)
    }

    pub fn read_range(
        &self,
        channel: &str,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Vec<StoredMessage> {
        let channels = self.lock();
        let Some(log) = channels.get(channel) else {
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
        let channels = self.lock();
        match channels.get(channel) {
            Some(log) => ChannelPosition {
                last_offset: log.last_offset,
                oldest_offset: log
                    .messages
                    .front()
                    .map_or(log.last_offset + 1, |m| m.offset),
            },
            None => ChannelPosition {
                last_offset: 0,
                oldest_offset: 1,
            },
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
        for log in self.lock().values_mut() {
            while budget > 0 && log.messages.front().is_some_and(|m| m.created_at < cutoff) {
                log.messages.pop_front();
                budget -= 1;
                deleted += 1;
            }
        }
        deleted
    }

    /// Test hook: age every message of `channel` by `by`.
    pub fn backdate(&self, channel: &str, by: Duration) {
        if let Some(log) = self.lock().get_mut(channel) {
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
            assert_eq!(log.append("c", &raw(&i.to_string())).0, i);
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
}
