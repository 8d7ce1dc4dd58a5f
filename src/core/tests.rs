//! Property tests of the delivery core against a model.
//!
//! A simulated world drives [`Core`] and per-connection [`Subscriptions`] exactly as the
//! listener and the sessions do, with no runtime: a message store with retention, a broker that
//! duplicates, reorders, drops and disconnects, I/O answers that arrive late, history reads that
//! fail, and sessions that subscribe (with and without `since`), re-subscribe and unsubscribe.
//! After every run the world settles (broker up, timers past every wait, every read done) and
//! each connection's stream of every subscription is checked: strictly in order, no duplicate,
//! consecutive once `gap` frames are counted, gaps only over offsets history truly lacked, and
//! complete up to the last committed offset (no tail loss).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use proptest::prelude::*;
use serde_json::value::RawValue;

use super::{
    Action, Core, CoreSettings, Frames, Outgoing, Push, Subscriber,
    fanout::Fanout,
    subscriptions::{Announce, Check, Lane, Subscriptions},
};
use crate::protocol::{FrameKind, ServerFrame};

const CHANNELS: [&str; 2] = ["a", "b"];
const SESSIONS: usize = 3;
const GAP_WAIT: Duration = Duration::from_millis(200);
const HEAD_CHECK: Duration = Duration::from_millis(1000);

/// A session's outbox: unbounded here (slow consumers are the outbox's own tested concern).
/// With an armed lane it "writes" frames directly, like a WebSocket outbox (`pubsub::outbox`):
/// the model then checks that what bypassed the session is exactly what it would have sent.
#[derive(Default)]
struct Outbox(Mutex<OutboxState>);

#[derive(Default)]
struct OutboxState {
    queue: VecDeque<Outgoing>,
    armed: bool,
    /// The lane given when armed, and the frames written through it since.
    lane: Option<(Lane, Frames)>,
}

impl Outbox {
    fn state(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.0
            .lock()
            .expect("no test thread panicked while holding it")
    }

    fn arm(&self, lane: Lane) {
        let mut state = self.state();
        assert!(state.queue.is_empty(), "armed only with nothing queued");
        state.armed = true;
        state.lane = Some((lane, Frames::new()));
    }

    fn reclaim(&self) -> Option<(Lane, Frames)> {
        let mut state = self.state();
        state.armed = false;
        state.lane.take()
    }

    fn pop(&self) -> Option<Outgoing> {
        self.state().queue.pop_front()
    }
}

impl Subscriber for Outbox {
    fn push(&self, item: Outgoing) -> Push {
        let mut state = self.state();
        let state = &mut *state;
        if let (true, Some((lane, written))) = (state.armed, state.lane.as_mut()) {
            match &item {
                Outgoing::Frame(frame) => {
                    written.push(frame.clone());
                    return Push::Queued;
                }
                Outgoing::Message { channel_id, frame } => {
                    let id = frame.id.expect("messages have offsets");
                    match lane.check(*channel_id, id) {
                        Check::Next(slot) => {
                            lane.commit(slot, id);
                            written.push(frame.clone());
                            return Push::Queued;
                        }
                        Check::Duplicate => return Push::Queued,
                        Check::Other => {}
                    }
                }
                _ => {}
            }
        }
        // Disarmed: the session applies everything from here on.
        state.armed = false;
        state.queue.push_back(item);
        Push::Queued
    }
    fn is_closed(&self) -> bool {
        false
    }
}

fn message(channel: &str, id: i64) -> ServerFrame {
    let data = RawValue::from_string(id.to_string()).expect("a number is JSON");
    ServerFrame::message(channel, &data, Some(id))
}

#[derive(Debug, Clone)]
enum Op {
    Publish(usize),
    /// Deliver the in-flight PUBLISH at this index (reordering).
    Deliver(usize),
    /// Deliver an already delivered PUBLISH again.
    Duplicate(usize),
    /// Lose an in-flight PUBLISH (abandoned after its commit).
    Drop(usize),
    /// Retention removes messages up to this fraction of the channel.
    Prune(usize, u8),
    Subscribe(usize, usize, Option<u8>),
    Unsubscribe(usize, usize),
    BrokerDown,
    BrokerUp,
    /// Perform one pending I/O action (answers arrive late, in any order).
    Io(usize),
    /// Sessions process their outboxes and reads (`bool`: the store fails reads now).
    Sessions(bool),
    Advance(u16),
}

fn op() -> impl Strategy<Value = Op> {
    let ch = 0..CHANNELS.len();
    let sess = 0..SESSIONS;
    prop_oneof![
        6 => ch.clone().prop_map(Op::Publish),
        5 => any::<usize>().prop_map(Op::Deliver),
        1 => any::<usize>().prop_map(Op::Duplicate),
        1 => any::<usize>().prop_map(Op::Drop),
        1 => (ch.clone(), any::<u8>()).prop_map(|(c, f)| Op::Prune(c, f)),
        3 => (sess.clone(), ch.clone(), proptest::option::of(any::<u8>()))
            .prop_map(|(s, c, since)| Op::Subscribe(s, c, since)),
        1 => (sess, ch).prop_map(|(s, c)| Op::Unsubscribe(s, c)),
        1 => Just(Op::BrokerDown),
        2 => Just(Op::BrokerUp),
        4 => any::<usize>().prop_map(Op::Io),
        4 => any::<bool>().prop_map(Op::Sessions),
        2 => (0u16..400).prop_map(Op::Advance),
    ]
}

/// What one connection saw of one subscription, in order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Start(i64),
    Message(i64),
    Gap(i64, i64),
}

struct Session {
    outbox: Arc<Outbox>,
    subs: Subscriptions,
    announces: Vec<Announce>,
    /// Per channel, the segments of each subscription (a new one per fresh `subscribed`).
    log: HashMap<String, Vec<Vec<Seen>>>,
}

struct World {
    core: Core<Outbox>,
    now: Instant,
    /// Per channel: last committed offset and oldest retained.
    last: [i64; 2],
    oldest: [i64; 2],
    /// Gaps are allowed only over offsets that were pruned, or while reads failed.
    unreadable_ok: Vec<(usize, i64, i64)>,
    in_flight: Vec<(usize, i64)>,
    delivered: Vec<(usize, i64)>,
    connected: bool,
    io: Vec<Action>,
    sessions: Vec<Session>,
    /// Inconsistencies found while recording.
    errors: Vec<String>,
}

impl World {
    /// `threaded`: fan-outs split over a second thread, one subscriber per shard.
    fn new(threaded: bool) -> Self {
        let now = Instant::now();
        let fanout = if threaded {
            Fanout::threaded(1, 1).expect("a thread starts")
        } else {
            Fanout::inline()
        };
        let settings = CoreSettings {
            gap_wait: GAP_WAIT,
            head_check_interval: HEAD_CHECK,
        };
        let mut core = Core::with_fanout(settings, fanout);
        core.broker_up(now);
        World {
            core,
            now,
            last: [0; 2],
            oldest: [1; 2],
            unreadable_ok: Vec::new(),
            in_flight: Vec::new(),
            delivered: Vec::new(),
            connected: true,
            io: Vec::new(),
            sessions: (0..SESSIONS)
                .map(|_| Session {
                    outbox: Arc::default(),
                    subs: Subscriptions::new(4),
                    announces: Vec::new(),
                    log: HashMap::new(),
                })
                .collect(),
            errors: Vec::new(),
        }
    }

    fn collect_actions(&mut self) {
        while let Some(action) = self.core.poll_action() {
            self.io.push(action);
        }
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::Subscribe(ch) => {
                if self.connected {
                    self.core.subscribe_result(&ch, true);
                }
            }
            Action::Unsubscribe(_) => {}
            Action::ReadHeads(channels) => {
                let answers = channels
                    .into_iter()
                    .map(|ch| {
                        let i = CHANNELS.iter().position(|c| **c == *ch).expect("known");
                        (ch, Some(self.last[i]))
                    })
                    .collect();
                self.core.heads(answers, self.now);
            }
        }
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Publish(c) => {
                self.last[c] += 1;
                if self.connected {
                    self.in_flight.push((c, self.last[c]));
                }
            }
            Op::Deliver(i) if !self.in_flight.is_empty() => {
                let (c, id) = self.in_flight.remove(i % self.in_flight.len());
                self.core
                    .message(CHANNELS[c], Some(id), message(CHANNELS[c], id), self.now);
                self.delivered.push((c, id));
            }
            Op::Duplicate(i) if !self.delivered.is_empty() && self.connected => {
                let (c, id) = self.delivered[i % self.delivered.len()];
                self.core
                    .message(CHANNELS[c], Some(id), message(CHANNELS[c], id), self.now);
            }
            Op::Drop(i) if !self.in_flight.is_empty() => {
                self.in_flight.remove(i % self.in_flight.len());
            }
            Op::Prune(c, fraction) => {
                let keep_from = 1 + self.last[c] * i64::from(fraction) / 255;
                self.oldest[c] = self.oldest[c].max(keep_from).min(self.last[c] + 1);
            }
            Op::Subscribe(s, c, since) => {
                let since = since.map(|f| i64::from(f) % (self.last[c] + 3));
                let session = &mut self.sessions[s];
                session.subs.request(CHANNELS[c]);
                self.core.subscribe(CHANNELS[c], &session.outbox, since);
            }
            Op::Unsubscribe(s, c) => {
                let session = &self.sessions[s];
                self.core.unsubscribe(CHANNELS[c], &session.outbox);
            }
            Op::BrokerDown => {
                self.connected = false;
                self.in_flight.clear();
                self.io.clear();
                self.core.broker_down();
            }
            Op::BrokerUp if !self.connected => {
                self.connected = true;
                self.core.broker_up(self.now);
            }
            Op::Io(i) if !self.io.is_empty() => {
                let action = self.io.remove(i % self.io.len());
                self.perform(action);
            }
            Op::Sessions(failing) => self.run_sessions(failing),
            Op::Advance(ms) => {
                self.now += Duration::from_millis(u64::from(ms));
                self.core.tick(self.now);
            }
            _ => {}
        }
        self.collect_actions();
    }

    /// Every session applies its outbox, announces and reads as far as it can.
    fn run_sessions(&mut self, failing: bool) {
        for s in 0..SESSIONS {
            // What the fan-out wrote directly came before anything queued.
            if let Some((lane, written)) = self.sessions[s].outbox.reclaim() {
                self.sessions[s].subs.absorb(&lane);
                if let Err(err) = record(&mut self.sessions[s].log, &written, None) {
                    self.errors.push(err);
                }
            }
            loop {
                let mut out = Frames::new();
                let session = &mut self.sessions[s];
                let item = session.outbox.pop();
                if let Some(item) = item {
                    if let Some(announce) = session.subs.apply(item, &mut out) {
                        session.announces.push(announce);
                    }
                } else if let Some(announce) = session.announces.pop() {
                    let c = CHANNELS
                        .iter()
                        .position(|c| **c == *announce.channel)
                        .expect("known");
                    let oldest = (!failing).then_some(self.oldest[c]);
                    if failing {
                        self.unreadable_ok
                            .push((c, announce.since + 1, announce.last));
                    }
                    session.subs.announce(&announce, oldest, &mut out);
                    if let Err(err) = record(&mut self.sessions[s].log, &out, Some(announce.since))
                    {
                        self.errors.push(err);
                    }
                    continue;
                } else if let Some((channel, window)) = session.subs.next_read() {
                    let c = CHANNELS
                        .iter()
                        .position(|c| **c == *channel)
                        .expect("known");
                    if failing {
                        self.unreadable_ok.push((c, window.0 + 1, i64::MAX));
                        session.subs.on_unreadable(&channel, &mut out);
                    } else {
                        let from = (window.0 + 1).max(self.oldest[c]);
                        let rows: Vec<ServerFrame> = (from..=window.1.min(self.last[c]))
                            .map(|id| message(&channel, id))
                            .collect();
                        session.subs.on_page(&channel, window, &rows, &mut out);
                    }
                } else {
                    // Idle: the first sessions let the fan-out write for them (WebSocket), the
                    // last never does (SSE).
                    if s + 1 < SESSIONS {
                        session.outbox.arm(session.subs.lane());
                    }
                    break;
                }
                if let Err(err) = record(&mut self.sessions[s].log, &out, None) {
                    self.errors.push(err);
                }
            }
        }
    }

    /// Broker up, every in-flight PUBLISH delivered, every wait over, every read done.
    fn settle(&mut self) {
        self.step(Op::BrokerUp);
        for _ in 0..20 {
            while !self.io.is_empty() {
                self.step(Op::Io(0));
            }
            while !self.in_flight.is_empty() {
                self.step(Op::Deliver(0));
            }
            self.step(Op::Advance(300));
            self.now += HEAD_CHECK;
            self.core.tick(self.now);
            self.collect_actions();
            self.run_sessions(false);
        }
    }
}

/// Append what a session sent to its log; `since` is the subscription being announced, if any.
fn record(
    log: &mut HashMap<String, Vec<Vec<Seen>>>,
    out: &[ServerFrame],
    since: Option<i64>,
) -> Result<(), String> {
    for frame in out {
        let v: serde_json::Value = serde_json::from_str(&frame.text).expect("frames are JSON");
        let Some(channel) = v["channel"].as_str() else {
            continue;
        };
        let segments = log.entry(channel.to_owned()).or_default();
        match frame.kind {
            FrameKind::Subscribed => {
                let last = v["last_id"].as_i64().expect("last_id");
                let start = match (v["recovered"].as_bool(), v["oldest_id"].as_i64(), since) {
                    (Some(false), Some(oldest), _) => oldest - 1,
                    (Some(true), _, Some(since)) => since,
                    (Some(true), _, None) => return Err("recovered without since".to_owned()),
                    _ => last,
                };
                // A repeated subscribe (the segment is still open) changes nothing.
                if segments.last().is_none_or(|s| s.contains(&Seen::Start(-1))) {
                    segments.push(vec![Seen::Start(start)]);
                }
            }
            FrameKind::Unsubscribed => {
                if let Some(segment) = segments.last_mut() {
                    segment.push(Seen::Start(-1));
                }
            }
            FrameKind::Message => {
                if let Some(segment) = segments.last_mut() {
                    segment.push(Seen::Message(frame.id.expect("sequenced")));
                }
            }
            FrameKind::Gap => {
                if let Some(segment) = segments.last_mut() {
                    let from = v["from"].as_i64().expect("from");
                    let to = v["to"].as_i64().expect("to");
                    segment.push(Seen::Gap(from, to));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Check one segment: consecutive from its start, gaps only where allowed; returns the last
/// offset covered.
fn check_segment(world: &World, c: usize, segment: &[Seen]) -> Result<i64, TestCaseError> {
    let Some(Seen::Start(start)) = segment.first() else {
        return Err(TestCaseError::fail("segment without a start"));
    };
    let mut at = *start;
    for seen in &segment[1..] {
        match *seen {
            Seen::Message(id) => {
                prop_assert_eq!(
                    id,
                    at + 1,
                    "out of order, duplicate or hole in {:?}",
                    segment
                );
                at = id;
            }
            Seen::Gap(from, to) => {
                prop_assert_eq!(
                    from,
                    at + 1,
                    "gap does not start at the hole: {:?}",
                    segment
                );
                prop_assert!(to >= from);
                let pruned = to < world.oldest[c];
                let unreadable = world
                    .unreadable_ok
                    .iter()
                    .any(|&(uc, ufrom, uto)| uc == c && ufrom <= from && to <= uto);
                prop_assert!(
                    pruned || unreadable,
                    "gap {}..={} over retained history",
                    from,
                    to
                );
                at = to;
            }
            Seen::Start(-1) => break,
            Seen::Start(_) => return Err(TestCaseError::fail("nested start")),
        }
    }
    Ok(at)
}

proptest! {
    // 3,000 histories per run unless PROPTEST_CASES asks for more (or fewer).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_connection_gets_every_offset_once_in_order_or_a_gap(
        threaded in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let mut world = World::new(threaded);
        for op in ops {
            world.step(op);
        }
        world.settle();
        prop_assert!(world.errors.is_empty(), "{:?}", world.errors);
        for session in &world.sessions {
            for (channel, segments) in &session.log {
                let c = CHANNELS.iter().position(|x| x == channel).expect("known channel");
                for (i, segment) in segments.iter().enumerate() {
                    let end = check_segment(&world, c, segment)?;
                    let open = i + 1 == segments.len() && segment.last() != Some(&Seen::Start(-1));
                    if open && session.subs.contains(channel) {
                        prop_assert_eq!(end, world.last[c], "tail lost on {}: {:?}", channel, segment);
                    }
                }
            }
        }
    }
}
