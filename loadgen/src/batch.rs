//! `--publish-via batch`: `POST /api/v1/messages` with --batch-size messages per request.
//!
//! Ordering: subscribers check that each channel's messages arrive in the order they were
//! numbered, and relay delivers in commit order. Within one request that holds (relay commits a
//! batch's items atomically, in request order); across requests it holds only if two requests in
//! flight never carry the same channel. So there are --http-concurrency request *slots*, slot k
//! owns the channels i with `i mod slots = k` (a fixed, disjoint shard), and each slot has at most
//! one request in flight: it sends its next batch only after the previous one was answered (and,
//! with --idempotency, retried to the end). The schedule stays the global round robin; each
//! message goes to its channel's slot, which sends once it has --batch-size of them (the last
//! request of the run takes what is left). Throughput is then about
//! `slots × batch size / request latency` — 4 × 100 / 5 ms = 80,000 msg/s.

use std::{borrow::Cow, collections::BTreeMap, sync::Arc, time::Instant};

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{
    args::Args,
    http::{Conn, HttpCtx, keeps_number},
    publisher::{Published, Schedule},
    retry::{Failure, retrying, write_key},
    stats::{padding, write_stamp},
    sys::now_micros,
};

/// The slot that owns channel `ch`.
pub fn slot_of(ch: usize, slots: usize) -> usize {
    ch % slots
}

/// Per-channel sequence numbers of the channels one slot owns.
#[derive(Debug)]
pub struct Numbering {
    next: Vec<u64>,
}

impl Numbering {
    pub fn new(channels: usize) -> Self {
        Self {
            next: vec![0; channels],
        }
    }

    /// Number a batch: `seqs[i]` becomes the sequence number of the message on `batch[i]`.
    pub fn number(&mut self, batch: &[usize], seqs: &mut Vec<u64>) {
        seqs.clear();
        for &ch in batch {
            seqs.push(self.next[ch]);
            self.next[ch] += 1;
        }
    }

    /// The batch was surely not committed: its numbers go to the next messages. Only the slot's
    /// latest batch can be handed back, which is all a slot ever has in flight.
    pub fn give_back(&mut self, batch: &[usize]) {
        for &ch in batch {
            self.next[ch] -= 1;
        }
    }

    /// Sequence numbers used on `ch`.
    pub fn used(&self, ch: usize) -> u64 {
        self.next[ch]
    }
}

/// Write the request body for `batch` (channel indices) with sequence numbers `seqs`, all
/// stamped `t_us`; with `run_id`, each item carries its idempotency key.
pub fn write_body(
    out: &mut String,
    names: &[String],
    batch: &[usize],
    seqs: &[u64],
    t_us: u64,
    pad: &str,
    run_id: Option<&str>,
) {
    out.push_str(r#"{"messages":["#);
    for (i, (&ch, &seq)) in batch.iter().zip(seqs).enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Channel names are validated to need no JSON escaping.
        out.push_str(r#"{"channel":""#);
        out.push_str(&names[ch]);
        out.push_str(r#"","data":"#);
        write_stamp(out, seq, None, t_us, pad);
        if let Some(run_id) = run_id {
            out.push_str(r#","idempotency_key":""#);
            write_key(out, run_id, &names[ch], None, seq);
            out.push('"');
        }
        out.push('}');
    }
    out.push_str("]}");
}

/// Check a `201` answer against the request: one item per message, in request order. Returns
/// how many items were replays of committed ones.
pub fn check_answer(body: &[u8], names: &[String], batch: &[usize]) -> Result<u64, Failure> {
    #[derive(Deserialize)]
    struct Answer<'a> {
        #[serde(borrow)]
        messages: Vec<Item<'a>>,
    }
    #[derive(Deserialize)]
    struct Item<'a> {
        #[serde(borrow)]
        channel: Cow<'a, str>,
        #[serde(default)]
        replayed: bool,
    }
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|e| Failure::BadAnswer(format!("unreadable answer: {e}")))?;
    if answer.messages.len() != batch.len() {
        return Err(Failure::BadAnswer(format!(
            "answer has {} items for {} messages",
            answer.messages.len(),
            batch.len()
        )));
    }
    let mut replays = 0;
    for (item, &ch) in answer.messages.iter().zip(batch) {
        if item.channel != names[ch].as_str() {
            return Err(Failure::BadAnswer(
                "answer items not in request order".to_owned(),
            ));
        }
        replays += u64::from(item.replayed);
    }
    Ok(replays)
}

/// Publish `total` messages in batches, one request in flight per slot.
pub async fn run(
    args: &Args,
    channels: &[String],
    total: u64,
    out: &mut Published,
) -> Result<(), String> {
    let ctx = Arc::new(HttpCtx::new(args)?);
    let uri = ctx.uri("/api/v1/messages")?;
    let names: Arc<[String]> = channels.into();
    let slots = args.http_concurrency();
    let job = Arc::new(SlotJob {
        ctx: Arc::clone(&ctx),
        uri,
        names,
        batch_size: args.batch_size(),
        pad: padding(args.payload_bytes, None),
    });
    let mut queues = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..slots {
        let (tx, rx) = mpsc::unbounded_channel::<usize>();
        queues.push(tx);
        tasks.push(tokio::spawn(run_slot(Arc::clone(&job), rx)));
    }
    let started = Instant::now();
    let mut schedule = Schedule::new(args.rate, total);
    let mut turn = 0;
    while let Some(n) = schedule.next_burst().await {
        for _ in 0..n {
            // A slot only ends when its sender is dropped.
            let _ = queues[slot_of(turn, slots)].send(turn);
            turn = (turn + 1) % channels.len();
        }
    }
    drop(queues);
    for task in tasks {
        let done = task
            .await
            .map_err(|e| format!("publisher task failed: {e}"))?;
        // Slots own disjoint channels: the sums are each channel's own slot's counts.
        for ch in 0..channels.len() {
            out.per_channel[ch] += done.published[ch];
            out.numbered[ch][0] += done.numbering.used(ch);
        }
        out.requests += done.requests;
        out.retries += done.retries;
        out.replays += done.replays;
        for (kind, count) in done.errors {
            out.fail(count, kind);
        }
    }
    out.elapsed = started.elapsed();
    out.committed = out.total();
    out.latency = ctx.latency();
    Ok(())
}

/// What every slot shares.
struct SlotJob {
    ctx: Arc<HttpCtx>,
    uri: hyper::Uri,
    names: Arc<[String]>,
    batch_size: usize,
    pad: String,
}

/// What one slot achieved (per-channel counts are zero outside its shard).
struct SlotPublished {
    published: Vec<u64>,
    numbering: Numbering,
    requests: u64,
    retries: u64,
    replays: u64,
    /// Messages not published, by why.
    errors: BTreeMap<String, u64>,
}

async fn run_slot(job: Arc<SlotJob>, mut queue: mpsc::UnboundedReceiver<usize>) -> SlotPublished {
    let channels = job.names.len();
    let mut done = SlotPublished {
        published: vec![0; channels],
        numbering: Numbering::new(channels),
        requests: 0,
        retries: 0,
        replays: 0,
        errors: BTreeMap::new(),
    };
    let ctx = &job.ctx;
    let conn = Conn::default();
    let mut batch = Vec::with_capacity(job.batch_size);
    let mut seqs = Vec::with_capacity(job.batch_size);
    let mut text = String::new();
    loop {
        batch.clear();
        while batch.len() < job.batch_size {
            let room = job.batch_size - batch.len();
            if queue.recv_many(&mut batch, room).await == 0 {
                break; // the schedule is done: send what is left
            }
        }
        if batch.is_empty() {
            break;
        }
        done.numbering.number(&batch, &mut seqs);
        text.clear();
        write_body(
            &mut text,
            &job.names,
            &batch,
            &seqs,
            now_micros(),
            &job.pad,
            ctx.run_id.as_deref(),
        );
        // The same bytes on every attempt (the keys must come with the same data).
        let body = Bytes::copy_from_slice(text.as_bytes());
        let started = Instant::now();
        let attempts = retrying(ctx.max_attempts, || {
            conn.post(ctx, &job.uri, body.clone(), None)
        })
        .await;
        done.retries += u64::from(attempts.retries);
        let result = attempts
            .result
            .and_then(|answer| check_answer(&answer.body, &job.names, &batch));
        let count = batch.len() as u64;
        match result {
            Ok(replays) => {
                ctx.record_latency(started);
                done.requests += 1;
                done.replays += replays;
                for &ch in &batch {
                    done.published[ch] += 1;
                }
            }
            Err(failure) => {
                *done.errors.entry(failure.kind("batch")).or_default() += count;
                let keep = keeps_number(&failure, attempts.maybe_committed, ctx.run_id.is_some());
                if !keep {
                    done.numbering.give_back(&batch);
                }
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("lg-{i}")).collect()
    }

    /// The plan run by hand: the global round robin split into slots, batches cut per slot, and
    /// the slots' requests committed in an arbitrary interleaving (requests of different slots
    /// race). Every channel must still commit 0, 1, 2, … in order.
    #[test]
    fn slots_own_disjoint_channels_so_any_interleaving_commits_in_order() {
        for (channels, slots, batch_size) in [(50, 4, 100), (7, 3, 5), (5, 5, 1), (3, 1, 10)] {
            let mut owner = vec![None; channels];
            let mut queues = vec![Vec::new(); slots];
            for i in 0..2_000usize {
                let ch = i % channels;
                let slot = slot_of(ch, slots);
                assert!(slot < slots);
                // Always the same slot for a channel.
                assert_eq!(*owner[ch].get_or_insert(slot), slot, "channel {ch}");
                queues[slot].push(ch);
            }
            // Each slot numbers its batches; a random slot "commits" its next batch each step.
            let mut numberings: Vec<_> = (0..slots).map(|_| Numbering::new(channels)).collect();
            let mut cursors = vec![0usize; slots];
            let mut committed: Vec<Vec<u64>> = vec![Vec::new(); channels];
            let mut seqs = Vec::new();
            loop {
                let open: Vec<usize> = (0..slots)
                    .filter(|&s| cursors[s] < queues[s].len())
                    .collect();
                if open.is_empty() {
                    break;
                }
                let s = open[fastrand::usize(..open.len())];
                let end = (cursors[s] + batch_size).min(queues[s].len());
                let batch = &queues[s][cursors[s]..end];
                numberings[s].number(batch, &mut seqs);
                if fastrand::u8(..10) == 0 {
                    // Refused (e.g. 503): handed back, the same messages go again.
                    numberings[s].give_back(batch);
                    continue;
                }
                for (&ch, &seq) in batch.iter().zip(&seqs) {
                    committed[ch].push(seq);
                }
                cursors[s] = end;
            }
            for (ch, seqs) in committed.iter().enumerate() {
                let expected: Vec<u64> = (0..seqs.len() as u64).collect();
                assert_eq!(
                    seqs, &expected,
                    "channel {ch} ({channels}/{slots}/{batch_size})"
                );
                let slot = slot_of(ch, slots);
                assert_eq!(numberings[slot].used(ch), seqs.len() as u64);
            }
        }
    }

    #[test]
    fn body_and_answer() {
        let names = names(3);
        let mut body = String::new();
        write_body(
            &mut body,
            &names,
            &[0, 2, 0],
            &[5, 0, 6],
            17,
            "",
            Some("r1"),
        );
        let parsed: serde_json::Value = match serde_json::from_str(&body) {
            Ok(v) => v,
            Err(err) => panic!("{err}: {body}"),
        };
        let items = parsed["messages"].as_array().cloned().unwrap_or_default();
        assert_eq!(items.len(), 3, "{body}");
        assert_eq!(items[0]["channel"], "lg-0");
        assert_eq!(items[0]["data"]["s"], 5);
        assert_eq!(items[0]["data"]["t"], 17);
        assert_eq!(items[0]["idempotency_key"], "r1-lg-0-5");
        assert_eq!(items[1]["idempotency_key"], "r1-lg-2-0");
        assert_eq!(items[2]["data"]["s"], 6);

        let mut plain = String::new();
        write_body(&mut plain, &names, &[1], &[0], 17, "xxxx", None);
        assert_eq!(
            plain,
            r#"{"messages":[{"channel":"lg-1","data":{"s":0,"t":17,"p":"xxxx"}}]}"#
        );

        let ok = br#"{"messages":[{"channel":"lg-0","id":6,"created_at":"x"},{"channel":"lg-2","id":1,"created_at":"x","replayed":true},{"channel":"lg-0","id":7,"created_at":"x","replayed":false}]}"#;
        assert_eq!(check_answer(ok, &names, &[0, 2, 0]), Ok(1));
        let short = br#"{"messages":[{"channel":"lg-0","id":6,"created_at":"x"}]}"#;
        assert!(matches!(
            check_answer(short, &names, &[0, 2]),
            Err(Failure::BadAnswer(m)) if m == "answer has 1 items for 2 messages"
        ));
        let swapped = br#"{"messages":[{"channel":"lg-2","id":1},{"channel":"lg-0","id":6}]}"#;
        assert!(matches!(
            check_answer(swapped, &names, &[0, 2]),
            Err(Failure::BadAnswer(_))
        ));
        assert!(check_answer(b"not json", &names, &[0]).is_err());
    }
}
