//! [`Sequencer`]: turns the live stream of one channel, as one replica receives it, into
//! consecutive offsets.
//!
//! Concurrent publishers commit offsets 6 and 7 in Postgres, but their PUBLISHes can reach Redis
//! as 7 then 6; a PUBLISH that was abandoned after its commit never arrives at all; while the
//! broker connection is down nothing arrives. The sequencer drops duplicates, holds early
//! messages in a bounded buffer, and when a hole is still open after `gap_wait` it declares a
//! *gap*: the range the subscribers must read from history themselves (paced, per connection).
//! It never reads history itself, so a slow store delays nobody but the connections that need it.
//!
//! Besides the messages it sees, it learns the channel's committed head from periodic position
//! checks ([`Sequencer::note_head`]), which is how a lost *tail* (nothing after it to reveal the
//! hole) is found.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::protocol::ServerFrame;

/// Early messages held per channel; beyond this the gap is declared at once.
pub const MAX_PENDING: usize = 4096;

#[derive(Debug)]
pub struct Sequencer {
    /// Highest offset handed to subscribers (live, or as part of a declared gap).
    last: i64,
    /// Messages that arrived early, by offset (all greater than `last + 1`).
    pending: BTreeMap<i64, ServerFrame>,
    /// Highest offset known to be committed (from position checks).
    head: i64,
    /// When the current hole must be declared a gap.
    deadline: Option<Instant>,
    gap_wait: Duration,
}

/// What happened to an offered message.
#[derive(Debug)]
pub enum Offer {
    /// The next offset: deliver it, then whatever [`Sequencer::pop_ready`] yields.
    Ready(ServerFrame),
    /// Early; held until the hole before it closes.
    Held,
    /// Delivered (or declared a gap) before.
    Duplicate,
}

/// A declared gap, `after+1..=upto`: see [`Sequencer::take_gap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub after: i64,
    pub upto: i64,
}

impl Sequencer {
    /// Start after offset `last` (the channel's head when this replica subscribed).
    pub fn new(last: i64, gap_wait: Duration) -> Self {
        Self {
            last,
            pending: BTreeMap::new(),
            head: last,
            deadline: None,
            gap_wait,
        }
    }

    pub fn last(&self) -> i64 {
        self.last
    }

    /// When a gap must be declared, if a hole is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn offer(&mut self, id: i64, frame: ServerFrame, now: Instant) -> Offer {
        if id <= self.last || self.pending.contains_key(&id) {
            return Offer::Duplicate;
        }
        self.head = self.head.max(id);
        if id == self.last + 1 {
            self.last = id;
            self.rearm(now);
            return Offer::Ready(frame);
        }
        self.pending.insert(id, frame);
        if self.pending.len() > MAX_PENDING {
            self.deadline = Some(now);
        } else {
            self.rearm(now);
        }
        Offer::Held
    }

    /// The next held message that became consecutive, if any.
    pub fn pop_ready(&mut self) -> Option<ServerFrame> {
        let entry = self.pending.first_entry()?;
        if *entry.key() != self.last + 1 {
            return None;
        }
        let (id, frame) = entry.remove_entry();
        self.last = id;
        if self.pending.is_empty() && self.head <= self.last {
            self.deadline = None;
        }
        Some(frame)
    }

    /// A position check found offsets up to `head` committed. If they do not arrive live within
    /// `gap_wait` (a PUBLISH still in flight usually does), they become a gap.
    pub fn note_head(&mut self, head: i64, now: Instant) {
        if head > self.head {
            self.head = head;
        }
        self.rearm(now);
    }

    /// If the hole's wait is over, declare it: subscribers must read `after+1..=upto` from
    /// history. The gap extends over the held messages that became consecutive behind it:
    /// they are read from history too (the same page, usually), rather than pushed into every
    /// outbox in one burst.
    pub fn take_gap(&mut self, now: Instant) -> Option<Gap> {
        if self.deadline.is_none_or(|d| d > now) {
            return None;
        }
        self.deadline = None;
        let upto = match self.pending.first_key_value() {
            Some((&first, _)) => first - 1,
            None => self.head,
        };
        let after = self.last;
        let gap = (upto > after).then(|| {
            self.last = upto;
            while self.pop_ready().is_some() {}
            Gap {
                after,
                upto: self.last,
            }
        });
        self.rearm(now);
        gap
    }

    /// Arm the deadline when there is a hole and none is armed; disarm when there is none.
    fn rearm(&mut self, now: Instant) {
        let hole = !self.pending.is_empty() || self.head > self.last;
        if !hole {
            self.deadline = None;
        } else if self.deadline.is_none() {
            self.deadline = Some(now + self.gap_wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn frame(id: i64) -> ServerFrame {
        let data = RawValue::from_string(id.to_string()).unwrap();
        ServerFrame::message("c", &data, Some(id))
    }

    const WAIT: Duration = Duration::from_millis(100);

    #[test]
    fn in_order_duplicates_and_reordering() {
        let now = Instant::now();
        let mut s = Sequencer::new(5, WAIT);
        assert!(matches!(s.offer(6, frame(6), now), Offer::Ready(_)));
        assert!(matches!(s.offer(6, frame(6), now), Offer::Duplicate));
        assert!(matches!(s.offer(3, frame(3), now), Offer::Duplicate));
        assert!(matches!(s.offer(8, frame(8), now), Offer::Held));
        assert_eq!(s.deadline(), Some(now + WAIT));
        assert!(matches!(s.offer(7, frame(7), now), Offer::Ready(_)));
        assert_eq!(s.pop_ready().and_then(|f| f.id), Some(8));
        assert!(s.pop_ready().is_none());
        assert_eq!(s.deadline(), None);
        assert_eq!(s.last(), 8);
    }

    #[test]
    fn a_hole_becomes_a_gap_after_the_wait() {
        let now = Instant::now();
        let mut s = Sequencer::new(0, WAIT);
        s.offer(3, frame(3), now);
        s.offer(5, frame(5), now);
        assert!(s.take_gap(now).is_none(), "not yet");
        let later = now + WAIT;
        // The gap covers the held 3, which is read with it.
        let gap = s.take_gap(later).unwrap();
        assert_eq!((gap.after, gap.upto), (0, 3));
        // 4 is still missing: a new wait starts for it.
        assert_eq!(s.deadline(), Some(later + WAIT));
        let gap = s.take_gap(later + WAIT).unwrap();
        assert_eq!((gap.after, gap.upto), (3, 5));
        assert_eq!(s.deadline(), None);
        assert!(matches!(s.offer(4, frame(4), now), Offer::Duplicate));
    }

    #[test]
    fn a_lost_tail_is_found_by_the_head_check() {
        let now = Instant::now();
        let mut s = Sequencer::new(10, WAIT);
        s.note_head(10, now);
        assert_eq!(s.deadline(), None, "nothing missing");
        s.note_head(12, now);
        // The PUBLISH of 11 is only late: it arrives within the wait, 12 stays missing.
        assert!(matches!(s.offer(11, frame(11), now), Offer::Ready(_)));
        let gap = s.take_gap(now + WAIT).unwrap();
        assert_eq!((gap.after, gap.upto), (11, 12));
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn too_many_early_messages_declare_the_gap_at_once() {
        let now = Instant::now();
        let mut s = Sequencer::new(0, WAIT);
        for id in 2..=(MAX_PENDING as i64 + 2) {
            s.offer(id, frame(id), now);
        }
        let gap = s.take_gap(now).unwrap();
        assert_eq!((gap.after, gap.upto), (0, MAX_PENDING as i64 + 2));
        assert!(s.pop_ready().is_none());
    }
}
