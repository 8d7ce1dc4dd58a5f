//! Benchmarks of relay's delivery hot path, without any network: what one message costs between
//! the Redis listener receiving its payload and the frame sitting in every subscriber's outbox.
//!
//! * `envelope_parse`: the listener parsing a Redis payload (`Envelope::parse`).
//! * `frame_encode`: building the shared message frame once per message (`ServerFrame::message`).
//! * `sequencer_offer`: ordering an in-order offset (`Sequencer::offer`).
//! * `channel_lookup`: whether a channel matters to this replica, among 10,000 channels.
//! * `fan_out_10k`: one message into the delivery core for 10,000 local subscribers
//!   (`Core::message`), without and with an offset; reported per delivery as well. The outboxes are drained outside the timed region after each
//!   message, so they never overflow and each push sees the common case (a near-empty queue).
//!   No session task waits on the outboxes here, so the wake-up a real push causes (scheduling
//!   the session task) is not included: the network-level cost is `relay-loadgen`'s job.
//!
//! * `ingest`: the listener's work per Redis message on a replica with 1,000 channels of two
//!   subscribers each: parse the payload, build the frame, sequence it and push it to both
//!   outboxes (what `CoreTask::on_message` does, minus its metrics). Criterion's `thrpt` is
//!   messages per second on one thread. The Redis client's RESP decoding and the inbox hop are
//!   not included.
//!
//! `cargo bench --bench fanout` takes about a minute; `cargo bench --bench fanout -- fan_out`
//! runs one group.

use std::{
    collections::VecDeque,
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use relay::{
    core::{
        Action, Core, CoreSettings,
        sequencer::{Offer, Sequencer},
    },
    protocol::{Envelope, ServerFrame},
    pubsub::outbox::{Outgoing, SessionOutbox},
};
use serde_json::value::RawValue;

/// relay's default `ws.outbox_capacity`.
const OUTBOX_CAPACITY: usize = 256;
/// relay's default `history.gap_wait`.
const GAP_WAIT: Duration = Duration::from_millis(200);

/// The data `relay-loadgen` sends (small), and a 1 KiB variant.
fn sample_data(pad: usize) -> Box<RawValue> {
    let json = if pad == 0 {
        r#"{"s":12345,"t":1700000000123456}"#.to_owned()
    } else {
        format!(
            r#"{{"s":12345,"t":1700000000123456,"p":"{}"}}"#,
            "x".repeat(pad)
        )
    };
    RawValue::from_string(json).unwrap_or_else(|e| panic!("sample data is JSON: {e}"))
}

fn envelope_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope_parse");
    for (name, pad) in [("small", 0), ("1KiB", 1000)] {
        let payload = format!(
            r#"{{"data":{},"id":4242,"origin":"relay"}}"#,
            sample_data(pad).get()
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                let env = Envelope::parse(black_box(payload.as_bytes()));
                black_box(env.map(|e| e.offset()).ok());
            })
        });
    }
    group.finish();
}

fn frame_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_encode");
    for (name, pad) in [("small", 0), ("1KiB", 1000)] {
        let data = sample_data(pad);
        group.bench_function(name, |b| {
            b.iter(|| ServerFrame::message(black_box("lg-7"), black_box(&data), Some(4242)))
        });
    }
    group.finish();
}

fn sequencer_offer(c: &mut Criterion) {
    let frame = ServerFrame::message("lg-7", &sample_data(0), Some(1));
    let now = Instant::now();
    let mut seq = Sequencer::new(0, GAP_WAIT);
    let mut id = 0;
    c.bench_function("sequencer_offer/in_order", |b| {
        b.iter(|| {
            id += 1;
            black_box(matches!(seq.offer(id, frame.clone(), now), Offer::Ready(_)))
        })
    });
}

/// A core with the broker up, as the listener runs it.
fn core() -> Core<SessionOutbox> {
    let mut core = Core::new(CoreSettings {
        gap_wait: GAP_WAIT,
        head_check_interval: Duration::from_secs(3600),
    });
    core.broker_up(Instant::now());
    core
}

/// Subscribe `outboxes` to `channel` and answer the I/O it asks for, as the listener would.
fn open(core: &mut Core<SessionOutbox>, channel: &str, outboxes: &[Arc<SessionOutbox>]) {
    for outbox in outboxes {
        core.subscribe(channel, outbox, None);
    }
    while let Some(action) = core.poll_action() {
        match action {
            Action::Subscribe(c) => core.subscribe_result(&c, true),
            Action::ReadHeads(cs) => core.heads(
                cs.into_iter().map(|c| (c, Some(0))).collect(),
                Instant::now(),
            ),
            Action::Unsubscribe(_) => {}
        }
    }
    let mut buf = VecDeque::new();
    for outbox in outboxes {
        outbox.drain_into(&mut buf);
        buf.clear();
    }
}

fn channel_lookup(c: &mut Criterion) {
    let mut core = core();
    for i in 0..10_000 {
        let outbox = Arc::new(SessionOutbox::new(OUTBOX_CAPACITY));
        open(&mut core, &format!("room-{i}"), &[outbox]);
    }
    let mut group = c.benchmark_group("channel_lookup");
    group.bench_function("hit_of_10k_channels", |b| {
        b.iter(|| core.is_tracked(black_box("room-5000")))
    });
    group.bench_function("miss_of_10k_channels", |b| {
        b.iter(|| core.is_tracked(black_box("room-none")))
    });
    group.finish();
}

fn fan_out_10k(c: &mut Criterion) {
    const SUBSCRIBERS: usize = 10_000;
    let outboxes: Vec<Arc<SessionOutbox>> = (0..SUBSCRIBERS)
        .map(|_| Arc::new(SessionOutbox::new(OUTBOX_CAPACITY)))
        .collect();
    let mut core = core();
    open(&mut core, "room", &outboxes);
    // One reusable drain buffer per session, as each session keeps one.
    let mut buffers: Vec<VecDeque<Outgoing>> = (0..SUBSCRIBERS).map(|_| VecDeque::new()).collect();
    let data = sample_data(0);

    let mut group = c.benchmark_group("fan_out_10k");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    let mut id = 0;
    for sequenced in [false, true] {
        let name = if sequenced {
            "with_offset"
        } else {
            "without_offset"
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    // Offsets continue where the last sequenced message left off.
                    let offset = sequenced.then(|| {
                        id += 1;
                        id
                    });
                    let frame = ServerFrame::message("room", &data, offset);
                    let started = Instant::now();
                    core.message("room", offset, frame, started);
                    timed += started.elapsed();
                    let stats = core.take_stats();
                    assert_eq!(stats.delivered, SUBSCRIBERS as u64, "an outbox overflowed");
                    // What the session tasks would do meanwhile; not part of the fan-out's cost.
                    for (outbox, buf) in outboxes.iter().zip(buffers.iter_mut()) {
                        outbox.drain_into(buf);
                        buf.clear();
                    }
                }
                timed
            })
        });
    }
    group.finish();
}

fn ingest(c: &mut Criterion) {
    const CHANNELS: usize = 1000;
    const PER_BATCH: usize = 1000;
    let mut core = core();
    let names: Vec<String> = (0..CHANNELS).map(|i| format!("room-{i}")).collect();
    let outboxes: Vec<[Arc<SessionOutbox>; 2]> = names
        .iter()
        .map(|name| {
            let pair = [(); 2].map(|()| Arc::new(SessionOutbox::new(OUTBOX_CAPACITY)));
            open(&mut core, name, &pair);
            pair
        })
        .collect();
    let data = sample_data(0);
    let mut next_id = vec![0i64; CHANNELS];
    let mut buf = VecDeque::new();
    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(PER_BATCH as u64));
    group.bench_function("1000_channels_2_subscribers", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for batch in 0..iters {
                // The payloads as Redis hands them over, made outside the timed region.
                let payloads: Vec<(usize, String)> = (0..PER_BATCH)
                    .map(|i| {
                        let c = (batch as usize * PER_BATCH + i) % CHANNELS;
                        next_id[c] += 1;
                        let payload = format!(
                            r#"{{"data":{},"id":{},"origin":"relay"}}"#,
                            data.get(),
                            next_id[c]
                        );
                        (c, payload)
                    })
                    .collect();
                let started = Instant::now();
                for (c, payload) in &payloads {
                    let channel = names[*c].as_str();
                    if !core.is_tracked(channel) {
                        continue;
                    }
                    let Ok(envelope) = Envelope::parse(payload.as_bytes()) else {
                        continue;
                    };
                    let id = envelope.offset();
                    let frame = ServerFrame::message(channel, envelope.data, id);
                    core.message(channel, id, frame, started);
                }
                timed += started.elapsed();
                let stats = core.take_stats();
                assert_eq!(
                    stats.delivered,
                    2 * PER_BATCH as u64,
                    "every message delivered"
                );
                for outbox in outboxes.iter().flatten() {
                    outbox.drain_into(&mut buf);
                    buf.clear();
                }
            }
            timed
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the suite should finish in about a minute on a 2-core machine.
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = envelope_parse, frame_encode, sequencer_offer, channel_lookup, fan_out_10k, ingest
}
criterion_main!(benches);
