//! What the subscribers measure: per-connection sequence tracking (delivered, lost, duplicated,
//! out of order) and latency histograms.
//!
//! Every message carries `{"s":<per-channel sequence>,"t":<send time, unix µs>}`. A connection
//! subscribes to one channel, so it expects `s` = 0, 1, 2, … and anything else is a hole, a
//! duplicate or a late arrival. Latency goes into a few shared histograms ([`Shards`]) rather
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
    pub t: u64,
}

/// Just enough of a server frame to act on it, borrowed from the text (no allocation for the
/// frames relay sends; `channel` and `id` are skipped).
#[derive(Debug, Deserialize)]
pub struct InFrame<'a> {
    #[serde(rename = "type", borrow)]
    pub ty: &'a str,
    #[serde(default)]
    pub data: Option<Stamp>,
    #[serde(default, borrow)]
    pub code: Option<&'a str>,
}

/// Write a message's data, `{"s":…,"t":…}` plus optional padding, into `out`.
pub fn write_stamp(out: &mut String, seq: u64, t_us: u64, pad: &str) {
    use std::fmt::Write;
    // Writing to a String cannot fail.
    let _ = write!(out, r#"{{"s":{seq},"t":{t_us}"#);
    if !pad.is_empty() {
        out.push_str(r#","p":""#);
        out.push_str(pad);
        out.push('"');
    }
    out.push('}');
}

/// Padding that brings a stamp to about `payload_bytes` (a typical stamp is ~35 bytes).
pub fn padding(payload_bytes: usize) -> String {
    let mut base = String::new();
    write_stamp(&mut base, 1000, 1_700_000_000_000_000, "");
    // `,"p":""` costs 7 bytes itself.
    "x".repeat(payload_bytes.saturating_sub(base.len() + 7))
}

/// Per-connection sequence state for its one channel.
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
    /// Account for sequence `s`; true if it is a first delivery (to be timed).
    pub fn on_seq(&mut self, s: u64) -> bool {
        if s == self.next {
            self.next += 1;
        } else if s > self.next {
            let room = (MAX_HOLES - self.holes.len().min(MAX_HOLES)) as u64;
            let gap = s - self.next;
            self.holes.extend(self.next..self.next + gap.min(room));
            self.untracked += gap.saturating_sub(room);
            self.next = s + 1;
        } else if self.holes.remove(&s) {
            self.out_of_order += 1;
        } else {
            self.duplicated += 1;
            return false;
        }
        self.delivered += 1;
        true
    }

    /// Messages of the channel never received, given how many were published on it.
    pub fn lost(&self, published: u64) -> u64 {
        self.holes.len() as u64 + self.untracked + published.saturating_sub(self.next)
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
        let mut t = SeqTracker::default();
        assert!(t.on_seq(0));
        assert!(t.on_seq(1));
        assert!(t.on_seq(4)); // 2 and 3 missing for now
        assert!(t.on_seq(2)); // late
        assert!(!t.on_seq(2)); // twice
        assert!(!t.on_seq(0));
        assert_eq!((t.delivered, t.duplicated, t.out_of_order), (4, 2, 1));
        // 3 never came, and 5 and 6 of 7 published did not either.
        assert_eq!(t.lost(7), 3);
    }

    #[test]
    fn frames_parse_without_the_fields_we_skip() {
        let f: InFrame = serde_json::from_str(
            r#"{"type":"message","channel":"lg-0","data":{"s":3,"t":17,"p":"xx"},"id":null}"#,
        )
        .unwrap();
        assert_eq!(
            (f.ty, f.data.map(|d| (d.s, d.t))),
            ("message", Some((3, 17)))
        );
        let f: InFrame =
            serde_json::from_str(r#"{"type":"subscribed","channel":"lg-0","last_id":0}"#).unwrap();
        assert_eq!(f.ty, "subscribed");
        let mut s = String::new();
        write_stamp(&mut s, 1234, 1_700_000_000_123_456, &padding(60));
        assert!((58..=62).contains(&s.len()), "{s}");
    }
}
