//! The decisions of a group commit, without I/O: given the publishes of one batch and how their
//! channels stand, which are stored at which offsets, which are replays of an earlier publish,
//! and which are refused (compare-and-publish conflict, channel quota, reused idempotency key).
//!
//! Both stores use it: Postgres reads the state under per-channel locks, lets [`plan`] decide and
//! writes the result in one statement ([`super::messages::append_batch`]); the memory log does
//! the same under its mutex. So the two backends cannot disagree about a rule.
//!
//! A batch is made of *groups*, committed in order. A group is all or nothing: one publish of
//! the HTTP or WebSocket API is a group of one, and a `POST /api/v1/messages` request is one
//! group, so that a refusal of any of its items ([`Appended::Aborted`] for the others) leaves
//! nothing of it behind. Within a group, and across the groups of a batch, every rule sees the
//! effect of the publishes before it, exactly as if they had been committed one by one.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use super::messages::Appended;

/// One publish waiting for a commit.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub channel: Box<str>,
    pub data: Box<RawValue>,
    /// The subject creating the channel if it is new ('' when anonymous).
    pub creator: Box<str>,
    /// Compare-and-publish: only if the channel's last offset is this.
    pub expected_last_id: Option<i64>,
    /// A retry with this key within the window returns the original.
    pub idempotency_key: Option<Box<str>>,
}

impl NewMessage {
    /// A plain publish: no condition, no key, anonymous.
    pub fn plain(channel: &str, data: &RawValue) -> Self {
        Self {
            channel: channel.into(),
            data: data.to_owned(),
            creator: "".into(),
            expected_last_id: None,
            idempotency_key: None,
        }
    }
}

/// The rules a batch is committed under (from `limits` and `publish`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    /// Channels one subject may create (0: no quota).
    pub max_channels: u32,
    /// How long an idempotency key is remembered.
    pub idempotency_window: Duration,
}

/// An earlier publish with the same channel and idempotency key, within the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Earlier {
    pub offset: i64,
    pub created_at: DateTime<Utc>,
    /// Whether it stored the same data (as JSON values: key order and spacing do not matter).
    pub same_data: bool,
}

/// How the store stands before the batch, as far as the batch needs to know.
pub trait Lookup {
    /// A channel's last offset, and whether it exists. A channel that does not exist stands at
    /// its floor: the offset its first message will follow.
    fn channel(&self, name: &str) -> (i64, bool);
    /// How many channels `creator` has created.
    fn created_by(&self, creator: &str) -> u64;
    /// The newest earlier publish with message `index`'s channel and key, if any.
    fn earlier(&self, index: usize, message: &NewMessage) -> Option<Earlier>;
}

/// A channel the batch writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelWrite {
    pub name: Box<str>,
    /// Its last offset before the batch, `None` if the batch creates it.
    pub previous: Option<i64>,
    pub last_offset: i64,
    /// Who creates it (when `previous` is `None`).
    pub creator: Box<str>,
}

/// What to write, and what to answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// One per message, in input order.
    pub outcomes: Vec<Appended>,
    /// Messages to insert: (index into the batch, offset), in offset order per channel.
    pub rows: Vec<(usize, i64)>,
    pub channels: Vec<ChannelWrite>,
}

#[derive(Debug, Clone)]
struct Channel {
    previous: Option<i64>,
    last_offset: i64,
    creator: Box<str>,
}

/// State changed by the groups decided so far (`committed`), or by the group being decided.
#[derive(Debug, Default)]
struct Overlay<'a> {
    channels: HashMap<&'a str, Channel>,
    created: HashMap<&'a str, u64>,
    /// Keys stored by this batch: (channel, key) → (offset, message index).
    keys: HashMap<(&'a str, &'a str), (i64, usize)>,
    rows: Vec<(usize, i64)>,
}

impl<'a> Overlay<'a> {
    fn absorb(&mut self, group: Overlay<'a>) {
        self.channels.extend(group.channels);
        for (creator, n) in group.created {
            *self.created.entry(creator).or_default() += n;
        }
        self.keys.extend(group.keys);
        self.rows.extend(group.rows);
    }
}

/// Decide a batch. `group_sizes` splits `messages` into consecutive groups (they sum to its
/// length); `now` is the commit's timestamp, the `created_at` of everything it stores.
pub fn plan(
    messages: &[NewMessage],
    group_sizes: &[usize],
    lookup: &impl Lookup,
    rules: Rules,
    now: DateTime<Utc>,
) -> Plan {
    debug_assert_eq!(group_sizes.iter().sum::<usize>(), messages.len());
    let mut outcomes = Vec::with_capacity(messages.len());
    let mut committed = Overlay::default();
    let mut start = 0;
    for &size in group_sizes {
        let end = (start + size).min(messages.len());
        let mut group = Overlay::default();
        let mut failed = None;
        for index in start..end {
            let outcome = decide(index, messages, &committed, &mut group, lookup, rules, now);
            if !matches!(outcome, Appended::Stored { .. } | Appended::Replayed { .. }) {
                failed = Some((index, outcome));
                break;
            }
            outcomes.push(outcome);
        }
        match failed {
            None => committed.absorb(group),
            Some((failed, outcome)) => {
                outcomes.truncate(start);
                outcomes.extend((start..end).map(|i| {
                    if i == failed {
                        outcome
                    } else {
                        Appended::Aborted
                    }
                }));
            }
        }
        start = end;
    }
    let mut channels: Vec<ChannelWrite> = committed
        .channels
        .into_iter()
        .map(|(name, c)| ChannelWrite {
            name: name.into(),
            previous: c.previous,
            last_offset: c.last_offset,
            creator: c.creator,
        })
        .collect();
    // A stable order: the statement's row locks are then always taken in the same order.
    channels.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    Plan {
        outcomes,
        rows: committed.rows,
        channels,
    }
}

/// Decide one message, recording its effect in `group`.
fn decide<'a>(
    index: usize,
    messages: &'a [NewMessage],
    committed: &Overlay<'a>,
    group: &mut Overlay<'a>,
    lookup: &impl Lookup,
    rules: Rules,
    now: DateTime<Utc>,
) -> Appended {
    let message = &messages[index];
    let channel = &*message.channel;
    if let Some(key) = message.idempotency_key.as_deref() {
        let here = group
            .keys
            .get(&(channel, key))
            .or_else(|| committed.keys.get(&(channel, key)));
        if let Some(&(offset, first)) = here {
            return if same_json(&messages[first].data, &message.data) {
                Appended::Replayed {
                    offset,
                    created_at: now,
                }
            } else {
                Appended::KeyReused
            };
        }
        if let Some(earlier) = lookup.earlier(index, message) {
            return if earlier.same_data {
                Appended::Replayed {
                    offset: earlier.offset,
                    created_at: earlier.created_at,
                }
            } else {
                Appended::KeyReused
            };
        }
    }
    let state = group
        .channels
        .get(channel)
        .or_else(|| committed.channels.get(channel))
        .cloned();
    let (mut state, creating) = match state {
        Some(state) => (state, false),
        None => {
            let (last_offset, exists) = lookup.channel(channel);
            let state = Channel {
                previous: exists.then_some(last_offset),
                last_offset,
                creator: message.creator.clone(),
            };
            (state, !exists)
        }
    };
    if let Some(expected) = message.expected_last_id
        && expected != state.last_offset
    {
        return Appended::Conflict {
            last_offset: state.last_offset,
        };
    }
    if creating {
        let creator = &*message.creator;
        let created = lookup.created_by(creator)
            + committed.created.get(creator).copied().unwrap_or(0)
            + group.created.get(creator).copied().unwrap_or(0);
        if rules.max_channels > 0 && created >= u64::from(rules.max_channels) {
            return Appended::ChannelLimit;
        }
        *group.created.entry(creator).or_default() += 1;
    }
    state.last_offset += 1;
    let offset = state.last_offset;
    group.channels.insert(channel, state);
    group.rows.push((index, offset));
    if let Some(key) = message.idempotency_key.as_deref() {
        group.keys.insert((channel, key), (offset, index));
    }
    Appended::Stored {
        offset,
        created_at: now,
    }
}

/// Whether two JSON texts are the same value (as `jsonb` compares them: key order and spacing
/// do not matter).
pub fn same_json(a: &RawValue, b: &RawValue) -> bool {
    if a.get() == b.get() {
        return true;
    }
    let parse = |raw: &RawValue| serde_json::from_str::<serde_json::Value>(raw.get()).ok();
    match (parse(a), parse(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
