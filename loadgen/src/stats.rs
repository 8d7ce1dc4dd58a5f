//! What the subscribers measure: per-connection sequence tracking (delivered, lost, duplicated,
//! out of order) and latency histograms.
//!
//! Every message carries `{"s":<sequence>,"t":<send time, unix µs>}`, numbered per *writer*: one
//! per channel, except in http mode with more `--http-concurrency` writers than channels, where a
//! channel has several and the stamp names its writer, `{"s":…,"w":<writer>,"t":…}`. Writers of
//! one channel race each other, but each has one request in flight, so a connection (subscribed to
//! one channel) expects `s` = 0, 1, 2, … from every writer, and anything else is a hole, a
//! duplicate or a late arrival. It also checks relay's own promise: the `id` (offset) of the
//! frames it receives only grows. Latency goes into a few shared histograms ([`Shards`]) rather
//! than one per connection: an HDR histogram with microsecond resolution is ~100-200 KiB, which
//! times 10,000 connections would cost the generator more memory than the server it measures.

use std::{
    collections::BTreeSet,
    sync::{Mutex, MutexGuard, PoisonError},
};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency recorded exactly (1 h in µs); larger values are clamped to it.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Holes remembered per connection; beyond this, missing messages are still counted as lost but
/// a late arrival of one of them counts as a duplicate instead of out of order.
const MAX_HOLES: usize = 65_536;

/// The stamp inside each message's `data`; `p` (padding) and anything else is skipped.
#[derive(Debug, Deserialize)]
pub struct Stamp {
    pub s: u64,
    /// The writer within the channel; absent when the channel has one.
    #[serde(default)]
    pub w: usize,
    pub t: u64,
}

/// Just enough of a server frame to act on it, borrowed from the text (no allocation for the
/// frames relay sends; `channel` is skipped).
#[derive(Debug, Deserialize)]
pub struct InFrame<'a> {
    #[serde(rename = "type", borrow)]
    pub ty: &'a str,
    #[serde(default)]
    pub data: Option<Stamp>,
    /// A message's offset; `null` for messages published straight to Redis.
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default, borrow)]
    pub code: Option<&'a str>,
}

/// Write a message's data, `{"s":…,"t":…}` (`{"s":…,"w":…,"t":…}` with a `writer`) plus
/// optional padding, into `out`.
pub fn write_stamp(out: &mut String, seq: u64, writer: Option<usize>, t_us: u64, pad: &str) {
    use std::fmt::Write;
    // Writing to a String cannot fail.
    let _ = match writer {
        Some(w) => write!(out, r#"{{"s":{seq},"w":{w},"t":{t_us}"#),
        None => write!(out, r#"{{"s":{seq},"t":{t_us}"#),
    };
    if !pad.is_empty() {
        out.push_str(r#","p":""#);
        out.push_str(pad);
        out.push('"');
    }
    out.push('}');
}

/// Padding that brings the stamps of `writer` to about `payload_bytes` (a typical stamp is ~35
/// bytes, ~41 with a writer).
pub fn padding(payload_bytes: usize, writer: Option<usize>) -> String {
    let mut base = String::new();
    write_stamp(&mut base, 1000, writer, 1_700_000_000_000_000, "");
    // `,"p":""` costs 7 bytes itself.
    "x".repeat(payload_bytes.saturating_sub(base.len() + 7))
}

/// How a sequence number arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The next one expected, or one after a hole.
    New,
    /// One that filled a hole: out of order.
    Late,
    /// One received before.
    Repeat,
}

/// Per-connection sequence state for one writer of its channel.
#[derive(Debug, Default)]
pub struct SeqTracker {
    /// Next sequence expected in order.
    next: u64,
    /// Sequences skipped over, that may still arrive late.
    holes: BTreeSet<u64>,
    /// Skipped sequences beyond `MAX_HOLES`: lost for good as far as we count.
    untracked: u64,
    pub delivered: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
}

impl SeqTracker {
    /// Account for sequence `s`.
    pub fn on_seq(&mut self, s: u64) -> Arrival {
        let arrival = if s == self.next {
            self.next += 1;
            Arrival::New
        } else if s > self.next {
            let room = (MAX_HOLES - self.holes.len().min(MAX_HOLES)) as u64;
            let gap = s - self.next;
            self.holes.extend(self.next..self.next + gap.min(room));
            self.untracked += gap.saturating_sub(room);
            self.next = s + 1;
            Arrival::New
        } else if self.holes.remove(&s) {
            self.out_of_order += 1;
            Arrival::Late
        } else {
            self.duplicated += 1;
            return Arrival::Repeat;
        };
        self.delivered += 1;
        arrival
    }

    /// Messages of the writer never received, given how many it numbered.
    pub fn lost(&self, published: u64) -> u64 {
        self.holes.len() as u64 + self.untracked + published.saturating_sub(self.next)
    }
}

/// What one connection checks of its channel's messages: each writer's sequence ([`SeqTracker`]
/// per writer, so loss, duplicates and order are exact per writer however the writers' requests
/// interleave), and that relay's `id`s increase.
#[derive(Debug)]
pub struct ConnSeq {
    /// Indexed by the stamp's `w`; as many as the channel has writers.
    writers: Vec<SeqTracker>,
    /// The `id` of the previous message frame that had one.
    last_id: Option<u64>,
    /// Frames whose `id` was not above the previous one's (and that their stamp did not already
    /// show as late or repeated, so no frame counts twice).
    ids_out_of_order: u64,
}

impl ConnSeq {
    /// For a channel with `writers` writers (at least one is kept).
    pub fn new(writers: usize) -> Self {
        Self {
            writers: (0..writers.max(1)).map(|_| SeqTracker::default()).collect(),
            last_id: None,
            ids_out_of_order: 0,
        }
    }

    /// Account for a `message` frame with relay's `id` and `stamp`, its data if that parsed as
    /// ours. `Some(true)` for a first delivery (to be timed), `Some(false)` for a repeat, `None`
    /// if it is not one of ours (no stamp, or a writer the channel does not have).
    pub fn on_message(&mut self, id: Option<u64>, stamp: Option<&Stamp>) -> Option<bool> {
        let id_in_order = self.on_id(id);
        let arrival = stamp.and_then(|st| Some(self.writers.get_mut(st.w)?.on_seq(st.s)));
        if !id_in_order && matches!(arrival, None | Some(Arrival::New)) {
            self.ids_out_of_order += 1;
        }
        arrival.map(|a| a != Arrival::Repeat)
    }

    /// Whether `id` is above the previous one (or either is unknown); remembers it.
    fn on_id(&mut self, id: Option<u64>) -> bool {
        let Some(id) = id else { return true };
        let previous = self.last_id.replace(id);
        previous.is_none_or(|p| id > p)
    }

    pub fn delivered(&self) -> u64 {
        self.writers.iter().map(|t| t.delivered).sum()
    }

    pub fn duplicated(&self) -> u64 {
        self.writers.iter().map(|t| t.duplicated).sum()
    }

    /// Late arrivals of any writer plus frames whose `id` went backwards.
    pub fn out_of_order(&self) -> u64 {
        self.writers.iter().map(|t| t.out_of_order).sum::<u64>() + self.ids_out_of_order
    }

    /// Messages never received, given how many each writer numbered (`numbered[k]`: writer k).
    pub fn lost(&self, numbered: &[u64]) -> u64 {
        let len = self.writers.len().max(numbered.len());
        (0..len)
            .map(|k| {
                let n = numbered.get(k).copied().unwrap_or(0);
                // A writer without a tracker sent nothing this connection could count.
                self.writers.get(k).map_or(n, |t| t.lost(n))
            })
            .sum()
    }
}

/// One latency histogram and delivery count, shared by the connections assigned to it.
#[derive(Debug)]
pub struct Shard {
    pub latency: Histogram<u64>,
    pub delivered: u64,
    /// When the newest delivery arrived (unix µs).
    pub last_delivery_us: u64,
}

/// A small fixed set of [`Shard`]s; connection `i` uses shard `i mod len`, so the mutexes are
/// almost never contended.
#[derive(Debug)]
pub struct Shards(Vec<Mutex<Shard>>);

impl Shards {
    pub fn new(count: usize) -> Self {
        Self(
            (0..count.max(1))
                .map(|_| {
                    Mutex::new(Shard {
                        latency: new_histogram(),
                        delivered: 0,
                        last_delivery_us: 0,
                    })
                })
                .collect(),
        )
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn lock(&self, index: usize) -> MutexGuard<'_, Shard> {
        self.0[index % self.0.len()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Deliveries so far, over all shards (polled while draining).
    pub fn delivered(&self) -> u64 {
        (0..self.len()).map(|i| self.lock(i).delivered).sum()
    }

    /// The merged histogram and the newest delivery time.
    pub fn merge(&self) -> (Histogram<u64>, u64) {
        let mut total = new_histogram();
        let mut last = 0;
        for i in 0..self.len() {
            let shard = self.lock(i);
            // Same bounds everywhere, so adding cannot fail; clamp anyway rather than panic.
            let _ = total.add(&shard.latency);
            last = last.max(shard.last_delivery_us);
        }
        (total, last)
    }
}

pub fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds (1 µs .. 1 h, 3 significant digits): creation cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap_or_else(|_| unreachable!())
}

/// Latency percentiles in milliseconds with microsecond resolution.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencyMs {
    pub samples: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl LatencyMs {
    pub fn from_micros(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            samples: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean().round() / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_gaps_late_and_duplicates() {
        use Arrival::*;
        let mut t = SeqTracker::default();
        assert_eq!(t.on_seq(0), New);
        assert_eq!(t.on_seq(1), New);
        assert_eq!(t.on_seq(4), New); // 2 and 3 missing for now
        assert_eq!(t.on_seq(2), Late);
        assert_eq!(t.on_seq(2), Repeat);
        assert_eq!(t.on_seq(0), Repeat);
        assert_eq!((t.delivered, t.duplicated, t.out_of_order), (4, 2, 1));
        // 3 never came, and 5 and 6 of 7 published did not either.
        assert_eq!(t.lost(7), 3);
    }

    fn stamp(s: u64, w: usize) -> Stamp {
        Stamp { s, w, t: 0 }
    }

    #[test]
    fn each_writer_of_a_channel_is_tracked_on_its_own() {
        let mut c = ConnSeq::new(3);
        // Writers interleave in any order; each one's own sequence is what counts.
        for (s, w) in [(0, 1), (0, 0), (1, 1), (0, 2), (1, 0), (2, 1)] {
            assert_eq!(c.on_message(None, Some(&stamp(s, w))), Some(true));
        }
        assert_eq!(c.on_message(None, Some(&stamp(1, 1))), Some(false));
        assert_eq!(c.on_message(None, Some(&stamp(3, 0))), Some(true)); // 0's 2 missing
        assert_eq!(c.on_message(None, Some(&stamp(2, 0))), Some(true)); // late
        // No such writer: not ours.
        assert_eq!(c.on_message(None, Some(&stamp(0, 3))), None);
        assert_eq!((c.delivered(), c.duplicated(), c.out_of_order()), (8, 1, 1));
        // Numbered: writer 0 five (4 never came), 1 three, 2 two (1 never came).
        assert_eq!(c.lost(&[5, 3, 2]), 2);
        // A writer this connection has no tracker for lost all it numbered.
        assert_eq!(c.lost(&[4, 3, 1, 6]), 6);
        // One writer, no `w`: exactly a single tracker.
        let mut one = ConnSeq::new(1);
        let frame: InFrame = serde_json::from_str(r#"{"type":"message","data":{"s":0,"t":5}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one.on_message(frame.id, frame.data.as_ref()), Some(true));
        assert_eq!(one.lost(&[2]), 1);
    }

    #[test]
    fn ids_that_do_not_increase_count_as_out_of_order_once() {
        let mut c = ConnSeq::new(2);
        assert_eq!(c.on_message(Some(1), Some(&stamp(0, 0))), Some(true));
        assert_eq!(c.on_message(Some(2), Some(&stamp(0, 1))), Some(true));
        // In order for its writer, but relay's offset went backwards: out of order.
        assert_eq!(c.on_message(Some(2), Some(&stamp(1, 0))), Some(true));
        assert_eq!(c.out_of_order(), 1);
        // Compared with the previous id, not the highest.
        assert_eq!(c.on_message(Some(3), Some(&stamp(1, 1))), Some(true));
        assert_eq!(c.out_of_order(), 1);
        // Already counted as a repeat or as late by its stamp: not counted again for its id.
        assert_eq!(c.on_message(Some(1), Some(&stamp(0, 0))), Some(false));
        assert_eq!(c.on_message(Some(9), Some(&stamp(4, 0))), Some(true));
        assert_eq!(c.on_message(Some(8), Some(&stamp(3, 0))), Some(true));
        assert_eq!((c.duplicated(), c.out_of_order()), (1, 2));
        // A frame that is not ours still carries relay's promise.
        assert_eq!(c.on_message(Some(7), None), None);
        assert_eq!(c.out_of_order(), 3);
        // Without ids (published straight to Redis) there is nothing to check.
        assert_eq!(c.on_message(None, Some(&stamp(5, 0))), Some(true));
        assert_eq!(c.on_message(Some(8), Some(&stamp(6, 0))), Some(true));
        assert_eq!(c.out_of_order(), 3);
    }

    #[test]
    fn frames_parse_without_the_fields_we_skip() {
        let f: InFrame = serde_json::from_str(
            r#"{"type":"message","channel":"lg-0","data":{"s":3,"t":17,"p":"xx"},"id":null}"#,
        )
        .unwrap();
        assert_eq!(
            (f.ty, f.data.map(|d| (d.s, d.w, d.t)), f.id),
            ("message", Some((3, 0, 17)), None)
        );
        let f: InFrame = serde_json::from_str(
            r#"{"type":"message","channel":"lg-0","data":{"s":3,"w":2,"t":17},"id":41}"#,
        )
        .unwrap();
        assert_eq!((f.data.map(|d| d.w), f.id), (Some(2), Some(41)));
        let f: InFrame =
            serde_json::from_str(r#"{"type":"subscribed","channel":"lg-0","last_id":0}"#).unwrap();
        assert_eq!(f.ty, "subscribed");
    }

    #[test]
    fn stamps_with_and_without_a_writer_and_their_padding() {
        let mut s = String::new();
        write_stamp(&mut s, 7, None, 1_700_000_000_123_456, "");
        // Byte for byte the stamp of a run with one writer per channel.
        assert_eq!(s, r#"{"s":7,"t":1700000000123456}"#);
        s.clear();
        write_stamp(&mut s, 7, Some(12), 1_700_000_000_123_456, "xx");
        assert_eq!(s, r#"{"s":7,"w":12,"t":1700000000123456,"p":"xx"}"#);
        for writer in [None, Some(0), Some(123)] {
            s.clear();
            write_stamp(
                &mut s,
                1234,
                writer,
                1_700_000_000_123_456,
                &padding(60, writer),
            );
            assert!((58..=62).contains(&s.len()), "{s}");
        }
    }
}
