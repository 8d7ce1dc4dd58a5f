//! [`Subscriptions`]: what one connection is subscribed to, and how each item of its outbox
//! becomes frames on the wire.
//!
//! The session (WebSocket or SSE) owns one. It applies every outbox item in order, asks which
//! history window to read next, and feeds the pages back. All decisions live here, so the
//! property tests exercise exactly the code that serves connections.

use std::sync::Arc;

use crate::protocol::ServerFrame;

use super::{
    ChannelId, Frames, Outgoing,
    stream::{ChannelStream, Confirmed},
};

#[derive(Debug)]
struct Entry {
    channel: Arc<str>,
    /// The core's number for the channel, from its `Subscribed` answer.
    id: Option<ChannelId>,
    stream: ChannelStream,
    /// A `since` subscription waits for the channel's retained range before it is announced
    /// (and before it reads history).
    announcing: bool,
    /// Repeated subscribes that arrived while announcing; answered after the announcement.
    repeats: u32,
}

/// Where each live channel of a connection stands, for deliveries that bypass the session: the
/// fan-out may write a message itself when it is the next offset of a live channel, exactly
/// what [`Subscriptions::apply`] would have sent. Anything else goes through the session.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Lane {
    live: smallvec::SmallVec<[(ChannelId, i64); 2]>,
}

/// What the lane says of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The next offset of a live channel: write it, then [`Lane::commit`] this slot.
    Next(usize),
    /// Delivered already; the connection drops it.
    Duplicate,
    /// Not the lane's to decide (a hole, or a channel not live): the session applies it.
    Other,
}

impl Lane {
    pub fn check(&self, channel: ChannelId, id: i64) -> Check {
        match self.live.iter().position(|(c, _)| *c == channel) {
            Some(slot) if id == self.live[slot].1 + 1 => Check::Next(slot),
            Some(slot) if id <= self.live[slot].1 => Check::Duplicate,
            _ => Check::Other,
        }
    }

    pub fn commit(&mut self, slot: usize, id: i64) {
        self.live[slot].1 = id;
    }
}

/// A `since` subscription to announce: read the channel's oldest retained offset, then call
/// [`Subscriptions::announce`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    pub channel: Arc<str>,
    pub since: i64,
    pub last: i64,
}

#[derive(Debug)]
pub struct Subscriptions {
    entries: Vec<Entry>,
    hold_limit: usize,
    /// Some channel may be filling: [`Subscriptions::next_read`] must look. Kept so that the
    /// common case (every channel live) answers without touching the entries.
    maybe_filling: bool,
}

impl Subscriptions {
    /// `hold_limit`: live frames held per channel while it replays history.
    pub fn new(hold_limit: usize) -> Self {
        Self {
            entries: Vec::new(),
            hold_limit,
            maybe_filling: false,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a subscription still waits for the core's answer.
    pub fn any_pending(&self) -> bool {
        self.entries.iter().any(|e| e.stream.is_pending())
    }

    pub fn contains(&self, channel: &str) -> bool {
        self.find(channel).is_some()
    }

    /// Every channel subscribed or being subscribed.
    pub fn channels(&self) -> Vec<Box<str>> {
        self.entries.iter().map(|e| (*e.channel).into()).collect()
    }

    fn find(&self, channel: &str) -> Option<usize> {
        self.entries.iter().position(|e| &*e.channel == channel)
    }

    /// The client asked to subscribe: track the channel until the core answers.
    pub fn request(&mut self, channel: &str) {
        if !self.contains(channel) {
            // Grow one at a time: most connections hold one or two channels, and every idle
            // connection would otherwise carry room for four.
            self.entries.reserve_exact(1);
            self.entries.push(Entry {
                channel: channel.into(),
                id: None,
                stream: ChannelStream::pending(self.hold_limit),
                announcing: false,
                repeats: 0,
            });
        }
    }

    /// Apply one outbox item; frames to send now are appended to `out`.
    pub fn apply(&mut self, item: Outgoing, out: &mut Frames) -> Option<Announce> {
        match item {
            Outgoing::Frame(frame) => out.push(frame),
            Outgoing::Message { channel_id, frame } => {
                let entry = self.entries.iter_mut().find(|e| e.id == Some(channel_id));
                if let (Some(entry), Some(id)) = (entry, frame.id) {
                    entry.stream.on_message(id, frame, out);
                    self.maybe_filling |= entry.stream.next_read().is_some();
                }
            }
            Outgoing::Subscribed {
                channel,
                channel_id,
                last,
                since,
            } => {
                let i = match self.find(&channel) {
                    Some(i) => i,
                    None => {
                        self.request(&channel);
                        self.entries.len() - 1
                    }
                };
                self.maybe_filling = true;
                let entry = &mut self.entries[i];
                entry.id = Some(channel_id);
                match (entry.stream.confirm(last, since), since) {
                    (Confirmed::Repeat { .. }, _) if entry.announcing => entry.repeats += 1,
                    (Confirmed::Repeat { last_id }, _) => {
                        out.push(ServerFrame::subscribed(&channel, last_id));
                    }
                    (Confirmed::Fresh, None) => out.push(ServerFrame::subscribed(&channel, last)),
                    (Confirmed::Fresh, Some(since)) => {
                        entry.announcing = true;
                        return Some(Announce {
                            channel,
                            since,
                            last,
                        });
                    }
                }
            }
            Outgoing::SubscribeFailed { channel, reason } => {
                if let Some(i) = self.find(&channel) {
                    // A repeated subscribe that failed leaves the existing subscription alone.
                    if self.entries[i].stream.is_pending() {
                        self.entries.swap_remove(i);
                    }
                }
                out.push(ServerFrame::error(
                    "unavailable",
                    &format!("cannot subscribe to `{channel}` right now: {reason}"),
                ));
            }
            Outgoing::Unsubscribed { channel } => {
                if let Some(i) = self.find(&channel) {
                    self.entries.swap_remove(i);
                }
                out.push(ServerFrame::unsubscribed(&channel));
            }
            Outgoing::CatchUp { channel, upto } => {
                self.maybe_filling = true;
                if let Some(i) = self.find(&channel) {
                    self.entries[i].stream.on_catch_up(upto);
                }
            }
        }
        None
    }

    /// Announce a `since` subscription once the channel's oldest retained offset is known
    /// (`None`: history could not be read). `subscribed` says whether everything after `since`
    /// follows (`recovered`); the replay starts at what is still retained.
    pub fn announce(&mut self, announce: &Announce, oldest: Option<i64>, out: &mut Frames) {
        let Some(i) = self.find(&announce.channel) else {
            return;
        };
        self.maybe_filling = true;
        let entry = &mut self.entries[i];
        if !entry.announcing {
            return;
        }
        entry.announcing = false;
        let Announce {
            channel,
            since,
            last,
        } = announce;
        match oldest {
            Some(oldest) => {
                // Offsets after `last` arrive live even if retention already took them.
                let oldest = oldest.min(last + 1);
                let recovered = since + 1 >= oldest && since <= last;
                out.push(ServerFrame::subscribed_recovering(
                    channel, *last, recovered, oldest,
                ));
                entry.stream.skip_to(oldest - 1, channel, out);
            }
            None => {
                out.push(ServerFrame::error(
                    "history_unavailable",
                    &format!("cannot replay `{channel}`: history is unavailable"),
                ));
                out.push(ServerFrame::subscribed_recovering(
                    channel,
                    *last,
                    false,
                    last + 1,
                ));
                entry.stream.skip_to(*last, channel, out);
            }
        }
        for _ in 0..std::mem::take(&mut entry.repeats) {
            out.push(ServerFrame::subscribed(channel, *last));
        }
    }

    /// The lane for direct writes: every live channel and its last offset delivered.
    pub fn lane(&self) -> Lane {
        let live = self
            .entries
            .iter()
            .filter_map(|e| Some((e.id?, e.stream.live_last()?)))
            .collect();
        Lane { live }
    }

    /// Take back what the lane delivered while it was armed.
    pub fn absorb(&mut self, lane: &Lane) {
        for (id, last) in &lane.live {
            if let Some(entry) = self.entries.iter_mut().find(|e| e.id == Some(*id)) {
                entry.stream.delivered_up_to(*last);
            }
        }
    }

    /// The history window to read next, if a channel is filling.
    pub fn next_read(&mut self) -> Option<(Arc<str>, (i64, i64))> {
        if !self.maybe_filling {
            return None;
        }
        // The window first: cloning the name is only worth it when there is something to read.
        let next = self
            .entries
            .iter()
            .filter(|e| !e.announcing)
            .find_map(|e| e.stream.next_read().map(|w| (Arc::clone(&e.channel), w)));
        // Announcing entries will read after their announcement, which sets the flag again.
        self.maybe_filling = next.is_some();
        next
    }

    /// Feed a page read for `window` of `channel`.
    pub fn on_page(
        &mut self,
        channel: &str,
        window: (i64, i64),
        rows: &[ServerFrame],
        out: &mut Frames,
    ) {
        if let Some(i) = self.find(channel) {
            self.entries[i].stream.on_page(channel, window, rows, out);
        }
    }

    /// History for `channel` cannot be read: signal the rest of its fill as a gap.
    pub fn on_unreadable(&mut self, channel: &str, out: &mut Frames) {
        if let Some(i) = self.find(channel) {
            self.entries[i].stream.on_unreadable(channel, out);
        }
    }
}
