//! [`ChannelRegistry`]: which local sessions listen to which channel, and each channel's
//! [`Sequencer`].
//!
//! Owned by the Redis listener task alone, so it needs no lock: subscribe, unsubscribe and
//! fan-out are all steps of that one task, which is also what orders a `subscribed` frame before
//! the first message of its channel. Fan-out pushes one shared frame into each subscriber's
//! outbox: a reference-count increment and a queue push per subscriber, nothing else.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use crate::protocol::ServerFrame;

use super::{
    outbox::{Push, SessionOutbox},
    sequencer::Sequencer,
};

#[derive(Debug)]
struct ChannelEntry {
    subscribers: Vec<Arc<SessionOutbox>>,
    sequencer: Sequencer,
}

#[derive(Debug, Default)]
pub struct ChannelRegistry {
    channels: HashMap<Box<str>, ChannelEntry>,
    /// Channels whose sequencer holds a gap, so the listener need not scan every channel.
    gapped: HashSet<Box<str>>,
    subscriptions: usize,
}

/// The result of one fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FanOut {
    /// Subscribers the frame was queued for.
    pub delivered: usize,
    /// Subscribers that overflowed with this frame (each is counted once, then closed).
    pub overflowed: usize,
    /// Subscribers already closed or overflowed, pruned instead of delivered to.
    pub rejected: usize,
    /// Closed outboxes were pruned and nobody is left: the channel should be unsubscribed.
    pub now_empty: bool,
}

impl FanOut {
    fn add(&mut self, other: FanOut) {
        self.delivered += other.delivered;
        self.overflowed += other.overflowed;
        self.rejected += other.rejected;
        self.now_empty |= other.now_empty;
    }
}

impl ChannelRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start tracking `channel` (before its first subscriber is added).
    pub fn open(&mut self, channel: &str, sequencer: Sequencer) {
        self.channels.entry(channel.into()).or_insert(ChannelEntry {
            subscribers: Vec::new(),
            sequencer,
        });
    }

    /// Add `outbox` to an open channel. Returns false if it was already there or the channel
    /// is not open.
    pub fn add(&mut self, channel: &str, outbox: &Arc<SessionOutbox>) -> bool {
        let Some(entry) = self.channels.get_mut(channel) else {
            return false;
        };
        if entry.subscribers.iter().any(|s| Arc::ptr_eq(s, outbox)) {
            return false;
        }
        entry.subscribers.push(Arc::clone(outbox));
        self.subscriptions += 1;
        true
    }

    /// Remove `outbox` from `channel`. Returns true if the channel has no subscriber left (it
    /// is then forgotten).
    pub fn remove(&mut self, channel: &str, outbox: &Arc<SessionOutbox>) -> bool {
        let Some(entry) = self.channels.get_mut(channel) else {
            return false;
        };
        if let Some(pos) = entry
            .subscribers
            .iter()
            .position(|s| Arc::ptr_eq(s, outbox))
        {
            entry.subscribers.swap_remove(pos);
            self.subscriptions -= 1;
        }
        if entry.subscribers.is_empty() {
            self.close(channel);
            true
        } else {
            false
        }
    }

    fn close(&mut self, channel: &str) {
        self.channels.remove(channel);
        self.gapped.remove(channel);
    }

    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }

    pub fn subscribers(&self, channel: &str) -> &[Arc<SessionOutbox>] {
        self.channels
            .get(channel)
            .map(|e| e.subscribers.as_slice())
            .unwrap_or(&[])
    }

    pub fn sequencer(&self, channel: &str) -> Option<&Sequencer> {
        self.channels.get(channel).map(|e| &e.sequencer)
    }

    /// Channels with at least one local subscriber.
    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.channels.keys().map(|k| &**k)
    }

    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions
    }

    /// The earliest pending gap-fill deadline and its channel.
    pub fn next_gap(&self) -> Option<(Instant, &str)> {
        self.gapped
            .iter()
            .filter_map(|c| Some((self.channels.get(c)?.sequencer.gap_deadline()?, &**c)))
            .min_by_key(|(deadline, _)| *deadline)
    }

    /// Offer a message with offset `id` to the channel's sequencer and deliver whatever became
    /// ready. Returns the fan-out totals and whether the message was a duplicate.
    pub fn deliver_sequenced(
        &mut self,
        channel: &str,
        id: i64,
        frame: ServerFrame,
        now: Instant,
    ) -> (FanOut, bool) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return (FanOut::default(), false);
        };
        let offer = entry.sequencer.offer(id, frame, now);
        self.track_gap(channel);
        (self.fan_out_all(channel, &offer.ready), offer.duplicate)
    }

    /// Feed a gap fill read from Postgres; see [`Sequencer::fill`].
    pub fn fill_gap(
        &mut self,
        channel: &str,
        stored: Vec<(i64, ServerFrame)>,
        now: Instant,
    ) -> (FanOut, bool) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return (FanOut::default(), false);
        };
        let (ready, skipped) = entry.sequencer.fill(stored, now);
        self.track_gap(channel);
        (self.fan_out_all(channel, &ready), skipped)
    }

    /// A gap fill failed: try again after another wait.
    pub fn postpone_gap(&mut self, channel: &str, now: Instant) {
        if let Some(entry) = self.channels.get_mut(channel) {
            entry.sequencer.postpone(now);
        }
    }

    fn track_gap(&mut self, channel: &str) {
        let gapped = self
            .channels
            .get(channel)
            .is_some_and(|e| e.sequencer.gap_deadline().is_some());
        if gapped {
            if !self.gapped.contains(channel) {
                self.gapped.insert(channel.into());
            }
        } else {
            self.gapped.remove(channel);
        }
    }

    fn fan_out_all(&mut self, channel: &str, frames: &[ServerFrame]) -> FanOut {
        let mut total = FanOut::default();
        for frame in frames {
            total.add(self.fan_out(channel, frame));
        }
        total
    }

    /// Queue `frame` for every subscriber of `channel`, pruning outboxes whose session ended.
    pub fn fan_out(&mut self, channel: &str, frame: &ServerFrame) -> FanOut {
        let mut result = FanOut::default();
        let Some(entry) = self.channels.get_mut(channel) else {
            return result;
        };
        let subs = &mut entry.subscribers;
        let mut i = 0;
        while i < subs.len() {
            match subs[i].push(frame.clone()) {
                Push::Queued => {
                    result.delivered += 1;
                    i += 1;
                }
                Push::Overflowed => {
                    result.overflowed += 1;
                    i += 1;
                }
                Push::Rejected => {
                    // Overflowed earlier or closed: the session is leaving; forget it now.
                    result.rejected += 1;
                    subs.swap_remove(i);
                    self.subscriptions -= 1;
                }
            }
        }
        if subs.is_empty() {
            self.close(channel);
            result.now_empty = true;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn reference_counts_and_prunes() {
        let mut reg = ChannelRegistry::new();
        let a = Arc::new(SessionOutbox::new(1));
        let b = Arc::new(SessionOutbox::new(8));
        assert!(!reg.add("x", &a), "channel must be opened first");
        reg.open("x", Sequencer::new(0, Duration::from_millis(10)));
        assert!(reg.add("x", &a));
        assert!(!reg.add("x", &a));
        assert!(reg.add("x", &b));
        assert_eq!(reg.subscription_count(), 2);
        let frame = ServerFrame::pong();
        assert_eq!(reg.fan_out("x", &frame).delivered, 2);
        // `a` overflows on the second frame, is rejected (and pruned) on the third.
        assert_eq!(reg.fan_out("x", &frame).overflowed, 1);
        let third = reg.fan_out("x", &frame);
        assert_eq!((third.delivered, third.now_empty), (1, false));
        assert_eq!(reg.subscribers("x").len(), 1);
        assert!(reg.remove("x", &b));
        assert!(!reg.has_subscribers("x"));
        assert_eq!(reg.subscription_count(), 0);
    }
}
