//! [`ChannelRegistry`]: which local sessions listen to which channel.
//!
//! Owned by the Redis listener task alone, so it needs no lock: subscribe, unsubscribe and
//! fan-out are all steps of that one task, which is also what orders a `subscribed` frame before
//! the first message of its channel. Fan-out pushes one shared frame into each subscriber's
//! outbox: a reference-count increment and a queue push per subscriber, nothing else.

use std::{collections::HashMap, sync::Arc};

use crate::protocol::ServerFrame;

use super::outbox::{Push, SessionOutbox};

#[derive(Debug, Default)]
pub struct ChannelRegistry {
    channels: HashMap<Box<str>, Vec<Arc<SessionOutbox>>>,
    subscriptions: usize,
}

/// The result of one fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FanOut {
    /// Subscribers the frame was queued for.
    pub delivered: usize,
    /// Subscribers that overflowed with this frame (each is counted once, then closed).
    pub overflowed: usize,
    /// Closed outboxes were pruned and nobody is left: the channel should be unsubscribed.
    pub now_empty: bool,
}

impl ChannelRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `outbox` to `channel`. Returns false if it was already there.
    pub fn add(&mut self, channel: &str, outbox: &Arc<SessionOutbox>) -> bool {
        let subs = self.channels.entry(channel.into()).or_default();
        if subs.iter().any(|s| Arc::ptr_eq(s, outbox)) {
            return false;
        }
        subs.push(Arc::clone(outbox));
        self.subscriptions += 1;
        true
    }

    /// Remove `outbox` from `channel`. Returns true if the channel has no subscriber left.
    pub fn remove(&mut self, channel: &str, outbox: &Arc<SessionOutbox>) -> bool {
        let Some(subs) = self.channels.get_mut(channel) else {
            return false;
        };
        if let Some(pos) = subs.iter().position(|s| Arc::ptr_eq(s, outbox)) {
            subs.swap_remove(pos);
            self.subscriptions -= 1;
        }
        if subs.is_empty() {
            self.channels.remove(channel);
            true
        } else {
            false
        }
    }

    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }

    pub fn subscribers(&self, channel: &str) -> &[Arc<SessionOutbox>] {
        self.channels.get(channel).map(Vec::as_slice).unwrap_or(&[])
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

    /// Queue `frame` for every subscriber of `channel`, pruning outboxes whose session ended.
    pub fn fan_out(&mut self, channel: &str, frame: &ServerFrame) -> FanOut {
        let mut result = FanOut::default();
        let Some(subs) = self.channels.get_mut(channel) else {
            return result;
        };
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
                    subs.swap_remove(i);
                    self.subscriptions -= 1;
                }
            }
        }
        if subs.is_empty() {
            self.channels.remove(channel);
            result.now_empty = true;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_counts_and_prunes() {
        let mut reg = ChannelRegistry::new();
        let a = Arc::new(SessionOutbox::new(1));
        let b = Arc::new(SessionOutbox::new(8));
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
