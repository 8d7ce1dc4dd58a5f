//! The delivery core: the channel registry, per-channel sequencing and every recovery decision,
//! as plain synchronous code with no I/O, no runtime and no clock of its own.
//!
//! [`Core`] is driven like a protocol state machine (after quinn-proto's `Connection`): the
//! listener task feeds it *events* — a session subscribed, the broker confirmed a subscription,
//! a message arrived, the history reader answered, a timer fired — and collects *actions* from
//! [`Core::poll_action`] (SUBSCRIBE this, UNSUBSCRIBE that, read these channels' heads). The only
//! thing it does itself is push into subscribers' outboxes, which never waits ([`Subscriber`]).
//!
//! The core never reads messages from history. When a channel has a hole (a PUBLISH that never
//! came, a broker outage, a lost tail), it tells each subscriber of the channel to read the range
//! itself ([`Outgoing::CatchUp`]); each connection then fills it at its own pace
//! ([`stream::ChannelStream`]), so a burst of history never lands in an outbox, and a slow store
//! delays only the connections that need it.
//!
//! * [`sequencer`]: one channel's order on this replica.
//! * [`stream`]: one channel as one connection receives it.
//! * [`subscriptions`]: every channel of one connection, and how its outbox becomes frames.
//! * [`fanout`]: where a message's pushes run: on the calling thread, or for a big channel split
//!   over a few helper threads (the only threads the core has; it still does no I/O itself).
//!
//! This module depends on nothing but [`crate::protocol`]; it is tested exhaustively with
//! property tests against a model (`tests` below).

pub mod fanout;
pub mod sequencer;
pub mod stream;
pub mod subscriptions;

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::protocol::ServerFrame;

use fanout::Fanout;
use sequencer::{MAX_PENDING, Offer, Sequencer};

/// Frames a connection sends in one write, in order. Most wake-ups carry one frame, which fits
/// inline: no allocation per delivery, and no buffer kept by idle connections.
pub type Frames = smallvec::SmallVec<[ServerFrame; 1]>;

/// An item in a session's outbox, in the order the core decided.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// Sent as is: replies, and messages without an offset.
    Frame(ServerFrame),
    /// A message with an offset (`frame.id` is set) of the channel announced with `channel_id`
    /// in [`Outgoing::Subscribed`]. A number rather than the name: the fan-out then touches no
    /// shared reference count per delivery beyond the frame's.
    Message {
        channel_id: ChannelId,
        frame: ServerFrame,
    },
    /// The subscription is live after offset `last`; `since` asks for a replay first.
    Subscribed {
        channel: Arc<str>,
        channel_id: ChannelId,
        last: i64,
        since: Option<i64>,
    },
    /// The subscription could not be made; the session is not subscribed.
    SubscribeFailed {
        channel: Arc<str>,
        reason: &'static str,
    },
    /// No message of the channel follows.
    Unsubscribed { channel: Arc<str> },
    /// Offsets up to `upto` were committed but will not arrive live: read them from history.
    CatchUp { channel: Arc<str>, upto: i64 },
}

impl Outgoing {
    /// Whether the item counts against the outbox's capacity. Control items do not: they are
    /// few, and the server's own bookkeeping must never make a client a slow consumer.
    pub fn is_frame(&self) -> bool {
        matches!(self, Self::Frame(_) | Self::Message { .. })
    }

    /// Bytes of frame text the item carries (0 for control items).
    pub fn frame_bytes(&self) -> usize {
        match self {
            Self::Frame(frame) | Self::Message { frame, .. } => frame.text.len(),
            _ => 0,
        }
    }
}

/// The core's number for a channel, unique for the life of the process.
pub type ChannelId = u64;

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// This push overflowed the queue; the subscriber is now a slow consumer.
    Overflowed,
    /// The subscriber is already gone (closed or overflowed); nothing queued.
    Rejected,
}

/// A session's receiving end, as the core sees it. Pushing must never wait, and may happen on
/// any thread ([`fanout`]).
pub trait Subscriber: Send + Sync {
    fn push(&self, item: Outgoing) -> Push;
    fn is_closed(&self) -> bool;
}

/// I/O the core asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// SUBSCRIBE; answer with [`Core::subscribe_result`].
    Subscribe(Arc<str>),
    /// UNSUBSCRIBE; no answer needed.
    Unsubscribe(Arc<str>),
    /// Read the committed head of these channels; answer with [`Core::heads`].
    ReadHeads(Vec<Arc<str>>),
}

/// Counters since the last [`Core::take_stats`], for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Frames queued for subscribers.
    pub delivered: u64,
    /// Subscribers that overflowed (each counted once).
    pub slow_consumers: u64,
    /// Pushes refused by subscribers already gone, which were then forgotten.
    pub subscribers_gone: u64,
    /// Messages whose offset was delivered before.
    pub duplicates: u64,
    /// This replica's own messages arriving a second time: handed over locally after the
    /// commit, then echoed by the broker. Expected, so not duplicates.
    pub echoes: u64,
    /// Holes declared gaps and handed to subscribers to fill.
    pub gaps: u64,
}

/// Heads requested per [`Action::ReadHeads`].
pub const HEADS_BATCH: usize = 1000;

/// Timing the core works with.
#[derive(Debug, Clone, Copy)]
pub struct CoreSettings {
    /// How long a hole may stay open before it becomes a gap.
    pub gap_wait: Duration,
    /// How often every channel's head is compared with what was delivered.
    pub head_check_interval: Duration,
}

#[derive(Debug)]
struct Channel<T> {
    name: Arc<str>,
    id: ChannelId,
    subscribers: Vec<Arc<T>>,
    state: State<T>,
    /// A head read is requested and not answered yet.
    head_wanted: bool,
}

#[derive(Debug)]
enum State<T> {
    /// SUBSCRIBE sent; once confirmed, the head is read; then the channel opens.
    Opening {
        waiters: Vec<(Arc<T>, Option<i64>)>,
        confirmed: bool,
        /// Messages that arrived after the confirmation, before the head is known.
        early: BTreeMap<i64, ServerFrame>,
    },
    Open {
        seq: Sequencer,
    },
}

#[derive(Debug)]
pub struct Core<T> {
    channels: HashMap<Arc<str>, Channel<T>>,
    /// Channels whose sequencer has a deadline, so timers need not scan every channel.
    gapped: HashSet<Arc<str>>,
    connected: bool,
    actions: VecDeque<Action>,
    heads_wanted: Vec<Arc<str>>,
    settings: CoreSettings,
    next_head_check: Option<Instant>,
    next_id: ChannelId,
    delivery: Delivery,
}

/// What a fan-out writes besides its channel: where it runs, what each push did, and the
/// counts it changes. A field of its own, so a channel can be borrowed while it is written.
#[derive(Debug)]
struct Delivery {
    fanout: Fanout,
    /// What each push of the last fan-out did (kept to reuse its allocation).
    pushed: Vec<Push>,
    /// Subscriptions over all channels.
    subscriptions: usize,
    stats: Stats,
}

impl Delivery {
    /// Queue `item` for every subscriber, forgetting those already gone.
    fn push_all<T: Subscriber>(&mut self, entry: &mut Channel<T>, item: Outgoing) {
        // Control items (catch-up markers) are not deliveries.
        let frame = u64::from(item.is_frame());
        let subs = &mut entry.subscribers;
        self.fanout.push(subs, &item, &mut self.pushed);
        // Backwards, so that `swap_remove` only moves subscribers already counted.
        for i in (0..subs.len()).rev() {
            match self.pushed[i] {
                Push::Queued => self.stats.delivered += frame,
                Push::Overflowed => self.stats.slow_consumers += 1,
                Push::Rejected => {
                    self.stats.subscribers_gone += 1;
                    subs.swap_remove(i);
                    self.subscriptions -= 1;
                }
            }
        }
    }
}

impl<T: Subscriber> Core<T> {
    /// A core whose fan-outs all run on the calling thread.
    pub fn new(settings: CoreSettings) -> Self {
        Self::with_fanout(settings, Fanout::inline())
    }

    pub fn with_fanout(settings: CoreSettings, fanout: Fanout) -> Self {
        Self {
            channels: HashMap::new(),
            gapped: HashSet::new(),
            connected: false,
            actions: VecDeque::new(),
            heads_wanted: Vec::new(),
            settings,
            next_head_check: None,
            next_id: 0,
            delivery: Delivery {
                fanout,
                pushed: Vec::new(),
                subscriptions: 0,
                stats: Stats::default(),
            },
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Whether messages of `channel` matter to this replica (someone subscribed or subscribing).
    pub fn is_tracked(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }

    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    pub fn subscription_count(&self) -> usize {
        self.delivery.subscriptions
    }

    pub fn take_stats(&mut self) -> Stats {
        std::mem::take(&mut self.delivery.stats)
    }

    /// The next I/O to perform.
    pub fn poll_action(&mut self) -> Option<Action> {
        if let Some(action) = self.actions.pop_front() {
            return Some(action);
        }
        if self.heads_wanted.is_empty() {
            return None;
        }
        let n = self.heads_wanted.len().min(HEADS_BATCH);
        Some(Action::ReadHeads(self.heads_wanted.drain(..n).collect()))
    }

    /// When [`Core::tick`] must run next.
    pub fn next_deadline(&self) -> Option<Instant> {
        let gaps = self
            .gapped
            .iter()
            .filter_map(|c| match &self.channels.get(c)?.state {
                State::Open { seq } => seq.deadline(),
                State::Opening { .. } => None,
            })
            .min();
        match (gaps, self.next_head_check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // --- Sessions -------------------------------------------------------------------------

    /// A session subscribes; the answer arrives in its outbox ([`Outgoing::Subscribed`] or
    /// [`Outgoing::SubscribeFailed`]), ordered before any message of the channel.
    pub fn subscribe(&mut self, channel: &str, sub: &Arc<T>, since: Option<i64>) {
        if sub.is_closed() {
            return;
        }
        if !self.connected {
            let channel = self
                .channels
                .get(channel)
                .map_or_else(|| channel.into(), |c| Arc::clone(&c.name));
            sub.push(Outgoing::SubscribeFailed {
                channel,
                reason: "the broker is unavailable",
            });
            return;
        }
        let next_id = &mut self.next_id;
        let entry = self
            .channels
            .entry(channel.into())
            .or_insert_with_key(|name| {
                // First local subscriber: ask the broker for the channel.
                *next_id += 1;
                Channel {
                    name: Arc::clone(name),
                    id: *next_id,
                    subscribers: Vec::new(),
                    state: State::Opening {
                        waiters: Vec::new(),
                        confirmed: false,
                        early: BTreeMap::new(),
                    },
                    head_wanted: false,
                }
            });
        match &mut entry.state {
            State::Opening { waiters, .. } => {
                if waiters.is_empty() && entry.subscribers.is_empty() {
                    self.actions
                        .push_back(Action::Subscribe(Arc::clone(&entry.name)));
                }
                waiters.push((Arc::clone(sub), since));
            }
            State::Open { seq } => {
                let last = seq.last();
                if !entry.subscribers.iter().any(|s| Arc::ptr_eq(s, sub)) {
                    entry.subscribers.push(Arc::clone(sub));
                    self.delivery.subscriptions += 1;
                }
                sub.push(Outgoing::Subscribed {
                    channel: Arc::clone(&entry.name),
                    channel_id: entry.id,
                    last,
                    since,
                });
            }
        }
    }

    pub fn unsubscribe(&mut self, channel: &str, sub: &Arc<T>) {
        let name = match self.channels.get(channel) {
            Some(c) => Arc::clone(&c.name),
            None => channel.into(),
        };
        self.remove(channel, sub);
        sub.push(Outgoing::Unsubscribed { channel: name });
    }

    /// A session ended: forget it silently.
    pub fn leave(&mut self, channels: &[Box<str>], sub: &Arc<T>) {
        for channel in channels {
            self.remove(channel, sub);
        }
    }

    fn remove(&mut self, channel: &str, sub: &Arc<T>) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        if let Some(pos) = entry.subscribers.iter().position(|s| Arc::ptr_eq(s, sub)) {
            entry.subscribers.swap_remove(pos);
            self.delivery.subscriptions -= 1;
        }
        if let State::Opening { waiters, .. } = &mut entry.state {
            waiters.retain(|(s, _)| !Arc::ptr_eq(s, sub));
        }
        self.close_if_unused(channel);
    }

    fn close_if_unused(&mut self, channel: &str) {
        let Some(entry) = self.channels.get(channel) else {
            return;
        };
        let waiting = matches!(&entry.state, State::Opening { waiters, .. } if !waiters.is_empty());
        if entry.subscribers.is_empty()
            && !waiting
            && let Some(entry) = self.channels.remove(channel)
        {
            self.gapped.remove(channel);
            if self.connected {
                self.actions.push_back(Action::Unsubscribe(entry.name));
            }
        }
    }

    // --- Broker ---------------------------------------------------------------------------

    /// The broker connection is up: resubscribe every channel; each confirmation leads to a
    /// head read, which finds what was committed while the connection was down.
    pub fn broker_up(&mut self, now: Instant) {
        self.connected = true;
        self.next_head_check = Some(now + self.settings.head_check_interval);
        for entry in self.channels.values() {
            self.actions
                .push_back(Action::Subscribe(Arc::clone(&entry.name)));
        }
    }

    /// The broker connection is gone: channels still opening fail; open ones keep their
    /// subscribers and recover after the reconnect.
    pub fn broker_down(&mut self) {
        self.connected = false;
        self.next_head_check = None;
        self.actions.clear();
        self.heads_wanted.clear();
        let opening: Vec<Arc<str>> = self
            .channels
            .values_mut()
            .filter_map(|c| {
                c.head_wanted = false;
                matches!(c.state, State::Opening { .. }).then(|| Arc::clone(&c.name))
            })
            .collect();
        for channel in opening {
            self.fail_opening(&channel, "the broker is unavailable");
        }
    }

    /// The broker answered a [`Action::Subscribe`].
    pub fn subscribe_result(&mut self, channel: &str, ok: bool) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        if !ok {
            if matches!(entry.state, State::Opening { .. }) {
                self.fail_opening(channel, "the broker refused the subscription");
            }
            return;
        }
        if let State::Opening { confirmed, .. } = &mut entry.state {
            *confirmed = true;
        }
        // Opening: where live delivery starts. Open (a resubscribe): what was missed.
        Self::want_head(&mut self.heads_wanted, entry);
    }

    fn want_head(wanted: &mut Vec<Arc<str>>, entry: &mut Channel<T>) {
        if !entry.head_wanted {
            entry.head_wanted = true;
            wanted.push(Arc::clone(&entry.name));
        }
    }

    fn fail_opening(&mut self, channel: &str, reason: &'static str) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        if let State::Opening { waiters, .. } = &mut entry.state {
            for (sub, _) in waiters.drain(..) {
                sub.push(Outgoing::SubscribeFailed {
                    channel: Arc::clone(&entry.name),
                    reason,
                });
            }
        }
        self.close_if_unused(channel);
    }

    /// The history reader answered [`Action::ReadHeads`]: each channel's committed head, or
    /// `None` where it could not be read.
    pub fn heads(&mut self, results: Vec<(Arc<str>, Option<i64>)>, now: Instant) {
        for (channel, head) in results {
            let Some(entry) = self.channels.get_mut(&channel) else {
                continue;
            };
            entry.head_wanted = false;
            match (&mut entry.state, head) {
                (
                    State::Opening {
                        confirmed: true, ..
                    },
                    Some(head),
                ) => self.open(&channel, head, now),
                (
                    State::Opening {
                        confirmed: true, ..
                    },
                    None,
                ) => {
                    self.fail_opening(&channel, "history is unavailable");
                }
                (State::Open { seq }, Some(head)) => {
                    seq.note_head(head, now);
                    Self::track_gap(&mut self.gapped, entry);
                }
                _ => {}
            }
        }
    }

    fn open(&mut self, channel: &str, head: i64, now: Instant) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        let State::Opening { waiters, early, .. } = std::mem::replace(
            &mut entry.state,
            State::Open {
                seq: Sequencer::new(head, self.settings.gap_wait),
            },
        ) else {
            return;
        };
        for (sub, since) in waiters {
            if !entry.subscribers.iter().any(|s| Arc::ptr_eq(s, &sub)) {
                entry.subscribers.push(Arc::clone(&sub));
                self.delivery.subscriptions += 1;
            }
            sub.push(Outgoing::Subscribed {
                channel: Arc::clone(&entry.name),
                channel_id: entry.id,
                last: head,
                since,
            });
        }
        for (id, frame) in early {
            self.sequenced(channel, id, frame, now);
        }
        self.close_if_unused(channel);
    }

    /// A message arrived from the broker; `id` is its offset if it has one.
    pub fn message(&mut self, channel: &str, id: Option<i64>, frame: ServerFrame, now: Instant) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return; // Arrived right after the last local subscriber left.
        };
        match (&mut entry.state, id) {
            (State::Open { .. }, None) => self.fan_out(channel, Outgoing::Frame(frame)),
            (State::Open { .. }, Some(id)) => self.sequenced(channel, id, frame, now),
            (
                State::Opening {
                    confirmed: true,
                    early,
                    ..
                },
                Some(id),
            ) => {
                // Bounded: what does not fit is found as a gap once the channel is open.
                if early.len() < MAX_PENDING {
                    early.insert(id, frame);
                }
            }
            // Before the head is known nobody is subscribed yet.
            (State::Opening { .. }, _) => {}
        }
    }

    /// A message this replica committed, either handed over at once (local-first delivery) or
    /// echoed by the broker: whichever comes second is dropped by offset as an echo.
    pub fn own_message(&mut self, channel: &str, id: i64, frame: ServerFrame, now: Instant) {
        let duplicates = self.delivery.stats.duplicates;
        self.message(channel, Some(id), frame, now);
        self.delivery.stats.echoes += self.delivery.stats.duplicates - duplicates;
        self.delivery.stats.duplicates = duplicates;
    }

    fn sequenced(&mut self, channel: &str, id: i64, frame: ServerFrame, now: Instant) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        let State::Open { seq } = &mut entry.state else {
            return;
        };
        match seq.offer(id, frame, now) {
            Offer::Duplicate => self.delivery.stats.duplicates += 1,
            Offer::Held => {}
            Offer::Ready(frame) => {
                let mut ready = Some(frame);
                while let Some(frame) = ready {
                    let channel_id = entry.id;
                    self.delivery
                        .push_all(entry, Outgoing::Message { channel_id, frame });
                    ready = match &mut entry.state {
                        State::Open { seq } => seq.pop_ready(),
                        State::Opening { .. } => None,
                    };
                }
            }
        }
        Self::track_gap(&mut self.gapped, entry);
        self.close_if_unused(channel);
    }

    fn track_gap(gapped: &mut HashSet<Arc<str>>, entry: &Channel<T>) {
        let has_deadline = matches!(&entry.state, State::Open { seq } if seq.deadline().is_some());
        if has_deadline {
            if !gapped.contains(&entry.name) {
                gapped.insert(Arc::clone(&entry.name));
            }
        } else {
            gapped.remove(&entry.name);
        }
    }

    fn fan_out(&mut self, channel: &str, item: Outgoing) {
        if let Some(entry) = self.channels.get_mut(channel) {
            self.delivery.push_all(entry, item);
        }
        self.close_if_unused(channel);
    }

    // --- Timers ---------------------------------------------------------------------------

    /// Declare the gaps whose wait is over, and start due head checks.
    pub fn tick(&mut self, now: Instant) {
        let due: Vec<Arc<str>> = self
            .gapped
            .iter()
            .filter(|c| {
                matches!(self.channels.get(*c).map(|e| &e.state),
                    Some(State::Open { seq }) if seq.deadline().is_some_and(|d| d <= now))
            })
            .cloned()
            .collect();
        for channel in due {
            self.declare_gap(&channel, now);
        }
        if self.connected && self.next_head_check.is_some_and(|t| t <= now) {
            self.next_head_check = Some(now + self.settings.head_check_interval);
            for entry in self.channels.values_mut() {
                if matches!(entry.state, State::Open { .. }) {
                    Self::want_head(&mut self.heads_wanted, entry);
                }
            }
        }
    }

    fn declare_gap(&mut self, channel: &str, now: Instant) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        let State::Open { seq } = &mut entry.state else {
            return;
        };
        if let Some(gap) = seq.take_gap(now) {
            self.delivery.stats.gaps += 1;
            let item = Outgoing::CatchUp {
                channel: Arc::clone(&entry.name),
                upto: gap.upto,
            };
            self.delivery.push_all(entry, item);
        }
        Self::track_gap(&mut self.gapped, entry);
        self.close_if_unused(channel);
    }
}

#[cfg(test)]
mod tests;
