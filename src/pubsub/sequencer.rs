//! [`Sequencer`]: turns the live stream of one channel into consecutive offsets.
//!
//! Concurrent publishers commit offsets 6 and 7 in Postgres, but their PUBLISHes can reach Redis
//! as 7 then 6; a PUBLISH that failed after its commit never arrives at all. The listener keeps
//! one sequencer per channel (per replica, not per connection): duplicates (offset already
//! delivered) are dropped, an early message waits in a small buffer for the gap to close, and a
//! gap still open after `gap_wait` is filled from Postgres. Subscribers therefore see
//! `last+1, last+2, …` with no gap and no duplicate.
//!
//! Pure logic, no I/O: the listener does the Postgres reads and feeds results back in.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::protocol::ServerFrame;

/// Early messages held per channel; beyond this the gap is filled at once.
const MAX_PENDING: usize = 4096;

#[derive(Debug)]
pub struct Sequencer {
    /// Highest offset delivered; everything at or below is a duplicate.
    last: i64,
    /// Messages that arrived early, by offset.
    pending: BTreeMap<i64, ServerFrame>,
    /// When the current gap must be filled from Postgres.
    gap_deadline: Option<Instant>,
    gap_wait: Duration,
}

/// What to do with an offered message.
#[derive(Debug, Default)]
pub struct Offer {
    /// Frames to deliver now, in order.
    pub ready: Vec<ServerFrame>,
    /// The offset was delivered before.
    pub duplicate: bool,
}

impl Sequencer {
    /// Start after offset `last` (the channel's newest offset when this replica subscribed).
    pub fn new(last: i64, gap_wait: Duration) -> Self {
        Self {
            last,
            pending: BTreeMap::new(),
            gap_deadline: None,
            gap_wait,
        }
    }

    pub fn last(&self) -> i64 {
        self.last
    }

    /// When a gap fill is due, if a gap is open.
    pub fn gap_deadline(&self) -> Option<Instant> {
        self.gap_deadline
    }

    /// The range a gap fill should read: offsets in `(last, upto]`.
    pub fn gap_range(&self) -> Option<(i64, i64)> {
        let (&upto, _) = self.pending.last_key_value()?;
        Some((self.last, upto))
    }

    /// Offer a live message with offset `id`.
    pub fn offer(&mut self, id: i64, frame: ServerFrame, now: Instant) -> Offer {
        let mut offer = Offer::default();
        if id <= self.last || self.pending.contains_key(&id) {
            offer.duplicate = true;
            return offer;
        }
        if id == self.last + 1 {
            self.last = id;
            offer.ready.push(frame);
            self.drain_contiguous(&mut offer.ready);
        } else {
            self.pending.insert(id, frame);
            if self.gap_deadline.is_none() {
                self.gap_deadline = Some(now + self.gap_wait);
            }
            if self.pending.len() > MAX_PENDING {
                self.gap_deadline = Some(now);
            }
        }
        self.update_deadline(now);
        offer
    }

    /// Feed messages read from Postgres for the gap (ascending offsets). Whatever is still
    /// missing afterwards cannot be recovered (pruned, or ids invented by an outside publisher):
    /// it is skipped so the channel never stalls. Returns frames to deliver and whether a skip
    /// happened.
    pub fn fill(
        &mut self,
        stored: impl IntoIterator<Item = (i64, ServerFrame)>,
        now: Instant,
    ) -> (Vec<ServerFrame>, bool) {
        let mut ready = Vec::new();
        for (id, frame) in stored {
            if id == self.last + 1 {
                self.last = id;
                self.pending.remove(&id);
                ready.push(frame);
                self.drain_contiguous(&mut ready);
            }
        }
        let mut skipped = false;
        if let Some((&first, _)) = self.pending.first_key_value() {
            // Postgres had nothing more: jump to the next message we hold.
            skipped = first > self.last + 1;
            self.last = first - 1;
            self.drain_contiguous(&mut ready);
        }
        self.gap_deadline = None;
        self.update_deadline(now);
        (ready, skipped)
    }

    /// A gap fill failed (Postgres unavailable): try again after another wait.
    pub fn postpone(&mut self, now: Instant) {
        if !self.pending.is_empty() {
            self.gap_deadline = Some(now + self.gap_wait);
        }
    }

    fn drain_contiguous(&mut self, ready: &mut Vec<ServerFrame>) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > self.last + 1 {
                break;
            }
            let (id, frame) = entry.remove_entry();
            if id == self.last + 1 {
                self.last = id;
                ready.push(frame);
            }
        }
    }

    fn update_deadline(&mut self, now: Instant) {
        if self.pending.is_empty() {
            self.gap_deadline = None;
        } else if self.gap_deadline.is_none() {
            self.gap_deadline = Some(now + self.gap_wait);
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

    fn ids(frames: &[ServerFrame]) -> Vec<i64> {
        frames.iter().map(|f| f.id.unwrap()).collect()
    }

    #[test]
    fn in_order_duplicates_and_reordering() {
        let now = Instant::now();
        let mut s = Sequencer::new(5, Duration::from_millis(100));
        assert_eq!(ids(&s.offer(6, frame(6), now).ready), [6]);
        assert!(s.offer(6, frame(6), now).duplicate);
        assert!(s.offer(3, frame(3), now).duplicate);
        // 8 before 7: held, then both released in order.
        assert!(s.offer(8, frame(8), now).ready.is_empty());
        assert_eq!(s.gap_deadline(), Some(now + Duration::from_millis(100)));
        assert_eq!(ids(&s.offer(7, frame(7), now).ready), [7, 8]);
        assert_eq!(s.gap_deadline(), None);
        assert_eq!(s.last(), 8);
    }

    #[test]
    fn gap_filled_from_storage() {
        let now = Instant::now();
        let mut s = Sequencer::new(0, Duration::from_millis(100));
        s.offer(3, frame(3), now);
        s.offer(5, frame(5), now);
        assert_eq!(s.gap_range(), Some((0, 5)));
        let (ready, skipped) = s.fill(
            [(1, frame(1)), (2, frame(2)), (3, frame(3)), (4, frame(4))],
            now,
        );
        assert_eq!(ids(&ready), [1, 2, 3, 4, 5]);
        assert!(!skipped);
        assert_eq!(s.gap_deadline(), None);
        // The late live copy of 2 is now a duplicate.
        assert!(s.offer(2, frame(2), now).duplicate);
    }

    #[test]
    fn unfillable_gap_is_skipped_not_stalled() {
        let now = Instant::now();
        let mut s = Sequencer::new(0, Duration::from_millis(100));
        s.offer(42, frame(42), now);
        let (ready, skipped) = s.fill([], now);
        assert_eq!(ids(&ready), [42]);
        assert!(skipped);
        assert_eq!(ids(&s.offer(43, frame(43), now).ready), [43]);
    }
}
