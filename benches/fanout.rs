//! Benchmarks of relay's delivery hot path, without any network: what one message costs between
//! the Redis listener receiving its payload and the frame sitting in every subscriber's outbox.
//!
//! * `envelope_parse`: the listener parsing a Redis payload (`Envelope::parse`).
//! * `frame_encode`: building the shared message frame once per message (`ServerFrame::message`).
//! * `sequencer_offer`: ordering an in-order offset (`Sequencer::offer`).
//! * `subscribers_lookup`: finding a channel's subscribers among 10,000 channels.
//! * `fan_out_10k`: queueing one frame for 10,000 local subscribers (`ChannelRegistry::fan_out`);
//!   reported per delivery as well. The outboxes are drained outside the timed region after each
//!   message, so they never overflow and each push sees the common case (a near-empty queue).
//!   No session task waits on the outboxes here, so the wake-up a real push causes (scheduling
//!   the session task) is not included: the network-level cost is `relay-loadgen`'s job.
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
    protocol::{Envelope, ServerFrame},
    pubsub::{
        outbox::{Outgoing, SessionOutbox},
        registry::ChannelRegistry,
        sequencer::Sequencer,
    },
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
        let payload = format!(r#"{{"data":{},"id":4242}}"#, sample_data(pad).get());
        group.bench_function(name, |b| {
            b.iter(|| {
                let env = Envelope::parse(black_box(payload.as_bytes()));
                black_box(env.map(|e| e.id).ok());
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
            black_box(seq.offer(id, frame.clone(), now).ready.len())
        })
    });
}

fn subscribers_lookup(c: &mut Criterion) {
    let mut reg = ChannelRegistry::new();
    let mut outboxes = Vec::new();
    for i in 0..10_000 {
        let channel = format!("room-{i}");
        let outbox = Arc::new(SessionOutbox::new(OUTBOX_CAPACITY));
        reg.open(&channel, Sequencer::new(0, GAP_WAIT));
        reg.add(&channel, &outbox);
        outboxes.push(outbox);
    }
    let mut group = c.benchmark_group("subscribers_lookup");
    group.bench_function("hit_of_10k_channels", |b| {
        b.iter(|| reg.subscribers(black_box("room-5000")).len())
    });
    group.bench_function("miss_of_10k_channels", |b| {
        b.iter(|| reg.subscribers(black_box("room-none")).len())
    });
    group.finish();
}

fn fan_out_10k(c: &mut Criterion) {
    const SUBSCRIBERS: usize = 10_000;
    let mut reg = ChannelRegistry::new();
    reg.open("room", Sequencer::new(0, GAP_WAIT));
    let outboxes: Vec<Arc<SessionOutbox>> = (0..SUBSCRIBERS)
        .map(|_| Arc::new(SessionOutbox::new(OUTBOX_CAPACITY)))
        .collect();
    for outbox in &outboxes {
        reg.add("room", outbox);
    }
    // One reusable drain buffer per session, as each WebSocket session keeps one.
    let mut buffers: Vec<VecDeque<Outgoing>> = (0..SUBSCRIBERS).map(|_| VecDeque::new()).collect();
    let frame = ServerFrame::message("room", &sample_data(0), Some(1));

    let mut group = c.benchmark_group("fan_out_10k");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    group.bench_function("one_message", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let result = reg.fan_out("room", &frame);
                timed += started.elapsed();
                assert_eq!(result.delivered, SUBSCRIBERS, "an outbox overflowed");
                // What the session tasks would do meanwhile; not part of the fan-out's cost.
                for (outbox, buf) in outboxes.iter().zip(buffers.iter_mut()) {
                    outbox.drain_into(buf);
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
    targets = envelope_parse, frame_encode, sequencer_offer, subscribers_lookup, fan_out_10k
}
criterion_main!(benches);
