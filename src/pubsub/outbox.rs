//! [`SessionOutbox`]: the bounded queue between the fan-out and one subscriber session.
//!
//! The delivery core pushes shared frames and control items ([`Outgoing`]) here without ever
//! waiting; the session task (WebSocket or SSE) drains everything queued at once and writes it
//! with a single flush. When `capacity` frames (or `max_bytes` of them) are queued the subscriber is a *slow consumer*: the outbox latches into the overflowed
//! state, further pushes are refused, and the session closes the connection (WebSocket close
//! code 4008). Dropping frames silently instead would leave a client with a hole in its stream
//! it cannot detect; blocking would let one slow client stall every other subscriber.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::Notify;

pub use crate::core::{Outgoing, Push};
use crate::{
    core::subscriptions::{Check, Lane},
    protocol::ServerFrame,
};

/// A connection the fan-out may write to itself (`ws::writer`): one non-blocking attempt.
pub trait DirectWrite: Send + Sync + std::fmt::Debug {
    fn try_send(&self, frame: &ServerFrame) -> Sent;
}

/// What a direct write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The socket took the whole frame.
    All,
    /// The socket took part of it; the writer keeps the rest for the session to write first.
    Partly,
    /// Nothing was written (the socket is full or broken): queue the frame.
    Nothing,
}

/// What the fan-out wrote directly since the lane was armed, handed back by
/// [`SessionOutbox::reclaim`].
#[derive(Debug, Default)]
pub struct Reclaimed {
    pub lane: Lane,
    pub frames: u64,
    pub bytes: u64,
    /// A frame was taken only in part: its rest waits in the writer for the session.
    pub unfinished: bool,
}

/// The direct-write lane of a WebSocket outbox.
#[derive(Debug)]
struct Direct {
    writer: Arc<dyn DirectWrite>,
    /// The fan-out may write (the session waits for its outbox, with nothing queued).
    armed: bool,
    /// Given by the session when it armed, advanced by every direct write.
    written: Option<Reclaimed>,
}

/// What [`SessionOutbox::drain_into`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Items (possibly none) were moved into the caller's buffer.
    Items,
    /// The queue overflowed: close the connection as a slow consumer.
    Overflowed,
}

#[derive(Debug)]
pub struct SessionOutbox {
    state: Mutex<State>,
    notify: Notify,
    capacity: usize,
    /// Bound on the queued frames' bytes as well: a few large messages overflow it as surely as
    /// many small ones, so one connection's memory is bounded whatever it subscribes to.
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Outgoing>,
    /// Frames in `queue`; control items (subscription answers, catch-up markers) do not count
    /// against the capacity, so the server's own bookkeeping never makes a slow consumer.
    frames: usize,
    /// Bytes of those frames' text.
    bytes: usize,
    overflowed: bool,
    closed: bool,
    direct: Option<Direct>,
}

impl SessionOutbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            capacity,
            max_bytes: usize::MAX,
        }
    }

    /// Also overflow once the queued frames hold more than `max_bytes` of text.
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue a reply frame (pong, errors) behind everything queued before. Replies never take
    /// the lane: the session's event loop goes back to reading the client when a queued answer
    /// wakes it, so a pipelining publisher whose answers were written behind its back would
    /// wait for room it already has.
    pub fn reply(&self, frame: crate::protocol::ServerFrame) -> Push {
        self.enqueue(Outgoing::Frame(frame), false)
    }

    /// Let the fan-out write frames to this connection itself while the lane is armed.
    pub fn set_direct(&self, writer: Arc<dyn DirectWrite>) {
        self.lock().direct = Some(Direct {
            writer,
            armed: false,
            written: None,
        });
    }

    /// Let the fan-out write directly until the next item it cannot write: `lane` says where
    /// each live channel stands. Only with nothing queued (else false, and nothing changes);
    /// the session must not write until it [`reclaim`](Self::reclaim)s the lane.
    pub fn arm(&self, lane: Lane) -> bool {
        let mut state = self.lock();
        if !state.queue.is_empty() || state.overflowed || state.closed {
            return false;
        }
        match &mut state.direct {
            Some(direct) => {
                direct.armed = true;
                direct.written = Some(Reclaimed {
                    lane,
                    ..Reclaimed::default()
                });
                true
            }
            None => false,
        }
    }

    /// Take the lane back: no direct write happens after this returns, and what was written
    /// since [`arm`](Self::arm) is returned (None if the lane was not armed).
    pub fn reclaim(&self) -> Option<Reclaimed> {
        let mut state = self.lock();
        let direct = state.direct.as_mut()?;
        direct.armed = false;
        direct.written.take()
    }

    /// Queue an item without waiting. Never blocks the caller beyond a short mutex hold, and
    /// a non-blocking write when the lane is armed.
    pub fn push(&self, item: Outgoing) -> Push {
        self.enqueue(item, true)
    }

    fn enqueue(&self, item: Outgoing, may_write: bool) -> Push {
        let mut state = self.lock();
        if state.overflowed || state.closed {
            return Push::Rejected;
        }
        if let Some(direct) = state.direct.as_mut().filter(|d| d.armed) {
            if !may_write {
                direct.armed = false;
            } else {
                match try_direct(direct, &item) {
                    Some(Sent::All) => return Push::Queued,
                    Some(Sent::Partly) => {
                        // The session must write the rest before anything else.
                        direct.armed = false;
                        drop(state);
                        self.notify.notify_one();
                        return Push::Queued;
                    }
                    // Anything the lane cannot take goes to the session, in order, from now on.
                    Some(Sent::Nothing) | None => direct.armed = false,
                }
            }
        }
        let frame = item.is_frame();
        let bytes = item.frame_bytes();
        // One frame always fits (a single message may be larger than the bound).
        let too_big = state.bytes > 0 && state.bytes + bytes > self.max_bytes;
        if frame && (state.frames >= self.capacity || too_big) {
            state.overflowed = true;
            // Free the memory now; the session will only send a close frame.
            state.queue = VecDeque::new();
            drop(state);
            self.notify.notify_one();
            return Push::Overflowed;
        }
        let was_empty = state.queue.is_empty();
        state.frames += usize::from(frame);
        state.bytes += bytes;
        state.queue.push_back(item);
        drop(state);
        // A non-empty queue already has a wake-up pending.
        if was_empty {
            self.notify.notify_one();
        }
        Push::Queued
    }

    /// Wait until something was pushed (or the outbox overflowed) since the last drain.
    pub async fn ready(&self) {
        self.notify.notified().await
    }

    /// Move every queued item into `buf` (which the session reuses between drains).
    pub fn drain_into(&self, buf: &mut VecDeque<Outgoing>) -> Drained {
        let mut state = self.lock();
        if state.overflowed {
            return Drained::Overflowed;
        }
        state.frames = 0;
        state.bytes = 0;
        if buf.is_empty() {
            std::mem::swap(&mut state.queue, buf);
        } else {
            buf.extend(state.queue.drain(..));
        }
        Drained::Items
    }

    /// Refuse further pushes; the fan-out skips closed outboxes and the listener forgets them.
    /// Releases the direct writer, so the socket closes with the session.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.queue = VecDeque::new();
        state.direct = None;
    }

    pub fn is_closed(&self) -> bool {
        let state = self.lock();
        state.closed || state.overflowed
    }
}

/// Write `item` directly if the lane allows it: `Some(All)` when it is delivered (or is a
/// duplicate the connection would drop anyway), `None` when it must be queued. Frames without
/// an offset (replies, messages published without one) are sent as they are, as
/// `Subscriptions::apply` would; offset messages only when they are a live channel's next.
fn try_direct(direct: &mut Direct, item: &Outgoing) -> Option<Sent> {
    let written = direct.written.as_mut()?;
    let (frame, next) = match item {
        Outgoing::Frame(frame) => (frame, None),
        Outgoing::Message { channel_id, frame } => {
            let id = frame.id?;
            match written.lane.check(*channel_id, id) {
                Check::Duplicate => return Some(Sent::All),
                Check::Other => return None,
                Check::Next(slot) => (frame, Some((slot, id))),
            }
        }
        _ => return None,
    };
    let sent = direct.writer.try_send(frame);
    if sent != Sent::Nothing {
        if let Some((slot, id)) = next {
            written.lane.commit(slot, id);
        }
        written.frames += 1;
        written.bytes += frame.text.len() as u64;
        written.unfinished |= sent == Sent::Partly;
    }
    Some(sent)
}

impl crate::core::Subscriber for SessionOutbox {
    fn push(&self, item: Outgoing) -> Push {
        SessionOutbox::push(self, item)
    }

    fn is_closed(&self) -> bool {
        SessionOutbox::is_closed(self)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        core::{Frames, subscriptions::Subscriptions},
        protocol::ServerFrame,
    };

    /// A socket that takes what `answers` says, in turn, and remembers what it took.
    #[derive(Debug, Default)]
    struct Socket {
        answers: Mutex<VecDeque<Sent>>,
        took: Mutex<Vec<Option<i64>>>,
    }

    impl DirectWrite for Socket {
        fn try_send(&self, frame: &ServerFrame) -> Sent {
            let sent = self
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Sent::All);
            if sent != Sent::Nothing {
                self.took.lock().unwrap().push(frame.id);
            }
            sent
        }
    }

    fn message(id: i64) -> Outgoing {
        let data = serde_json::value::RawValue::from_string("1".to_owned()).unwrap();
        Outgoing::Message {
            channel_id: 7,
            frame: ServerFrame::message("c", &data, Some(id)),
        }
    }

    /// An outbox with a direct writer, and the lane of a connection live on channel 7 after 0.
    fn armed(socket: &Arc<Socket>) -> (SessionOutbox, Subscriptions) {
        let outbox = SessionOutbox::new(8);
        outbox.set_direct(Arc::clone(socket) as _);
        let mut subs = Subscriptions::new(8);
        subs.request("c");
        let subscribed = Outgoing::Subscribed {
            channel: Arc::from("c"),
            channel_id: 7,
            last: 0,
            since: None,
        };
        subs.apply(subscribed, &mut Frames::new());
        assert!(outbox.arm(subs.lane()));
        (outbox, subs)
    }

    #[test]
    fn the_lane_writes_in_order_and_hands_anything_else_to_the_session() {
        let socket = Arc::new(Socket::default());
        let (outbox, mut subs) = armed(&socket);
        assert_eq!(outbox.push(message(1)), Push::Queued);
        assert_eq!(outbox.push(message(2)), Push::Queued);
        // A duplicate is dropped, as the connection's stream would drop it.
        assert_eq!(outbox.push(message(2)), Push::Queued);
        // A hole is the session's to fill: queued, and the lane is disarmed from here on.
        assert_eq!(outbox.push(message(5)), Push::Queued);
        assert_eq!(outbox.push(message(3)), Push::Queued);
        assert_eq!(*socket.took.lock().unwrap(), [Some(1), Some(2)]);
        let back = outbox.reclaim().expect("was armed");
        assert_eq!((back.frames, back.unfinished), (2, false));
        subs.absorb(&back.lane);
        let mut queued = VecDeque::new();
        outbox.drain_into(&mut queued);
        assert_eq!(queued.len(), 2);
        // What the lane wrote moved the stream on: the hole is 3..=4 (after the lane's 2), to be
        // read from history, so nothing is sent live yet.
        let mut out = Frames::new();
        for item in queued {
            subs.apply(item, &mut out);
        }
        assert!(out.is_empty());
        assert_eq!(subs.next_read().map(|(_, window)| window), Some((2, 4)));
        // A filling channel is not in the lane: armed again, its messages still queue.
        assert!(outbox.arm(subs.lane()));
        assert_eq!(outbox.push(message(6)), Push::Queued);
        assert_eq!(socket.took.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_full_socket_or_a_part_write_goes_back_to_the_session() {
        let socket = Arc::new(Socket::default());
        socket
            .answers
            .lock()
            .unwrap()
            .extend([Sent::Partly, Sent::Nothing]);
        let (outbox, _subs) = armed(&socket);
        assert_eq!(outbox.push(message(1)), Push::Queued);
        // Disarmed by the part write: 2 is queued, not offered to the socket.
        assert_eq!(outbox.push(message(2)), Push::Queued);
        let back = outbox.reclaim().expect("was armed");
        assert_eq!((back.frames, back.unfinished), (1, true));
        let mut queued = VecDeque::new();
        outbox.drain_into(&mut queued);
        assert_eq!(queued.len(), 1);
        // Replies never take the lane; they queue, and disarm it.
        let (outbox, _subs) = armed(&socket);
        assert_eq!(outbox.reply(ServerFrame::pong()), Push::Queued);
        assert_eq!(outbox.push(message(1)), Push::Queued);
        assert_eq!(socket.took.lock().unwrap().len(), 1, "only the part write");
        outbox.drain_into(&mut queued);
        assert_eq!(queued.len(), 3);
    }

    #[test]
    fn closing_releases_the_writer() {
        let socket = Arc::new(Socket::default());
        let (outbox, _subs) = armed(&socket);
        outbox.close();
        assert_eq!(Arc::strong_count(&socket), 1);
        assert_eq!(outbox.push(message(1)), Push::Rejected);
        assert!(outbox.reclaim().is_none());
    }

    #[test]
    fn overflow_latches_and_frees() {
        let outbox = SessionOutbox::new(2);
        assert_eq!(outbox.reply(ServerFrame::pong()), Push::Queued);
        assert_eq!(outbox.reply(ServerFrame::pong()), Push::Queued);
        assert_eq!(outbox.reply(ServerFrame::pong()), Push::Overflowed);
        assert_eq!(outbox.reply(ServerFrame::pong()), Push::Rejected);
        let mut buf = VecDeque::new();
        assert_eq!(outbox.drain_into(&mut buf), Drained::Overflowed);
        assert!(buf.is_empty());
    }

    #[test]
    fn control_items_never_make_a_slow_consumer() {
        let outbox = SessionOutbox::new(1);
        assert_eq!(outbox.reply(ServerFrame::pong()), Push::Queued);
        for upto in 1..100 {
            let item = Outgoing::CatchUp {
                channel: Arc::from("c"),
                upto,
            };
            assert_eq!(outbox.push(item), Push::Queued);
        }
        let mut buf = VecDeque::new();
        assert_eq!(outbox.drain_into(&mut buf), Drained::Items);
        assert_eq!(buf.len(), 100);
        // Draining frees the capacity again.
        assert_eq!(outbox.reply(ServerFrame::pong()), Push::Queued);
    }

    #[test]
    fn the_byte_bound_overflows_too() {
        let outbox = SessionOutbox::new(100).with_max_bytes(40);
        let frame = ServerFrame::error("x", "twelve bytes");
        assert!(frame.text.len() > 40);
        // Alone, even an oversized frame is queued; behind others it overflows.
        assert_eq!(outbox.reply(frame.clone()), Push::Queued);
        let mut buf = VecDeque::new();
        outbox.drain_into(&mut buf);
        assert_eq!(outbox.reply(ServerFrame::pong()), Push::Queued);
        assert_eq!(outbox.reply(frame), Push::Overflowed);
    }

    #[test]
    fn drain_takes_everything_in_order() {
        let outbox = SessionOutbox::new(8);
        outbox.reply(ServerFrame::subscribed("a", 0));
        outbox.reply(ServerFrame::pong());
        let mut buf = VecDeque::new();
        assert_eq!(outbox.drain_into(&mut buf), Drained::Items);
        assert_eq!(buf.len(), 2);
        assert!(matches!(&buf[0], Outgoing::Frame(f) if f.text.contains("subscribed")));
        outbox.close();
        assert_eq!(outbox.reply(ServerFrame::pong()), Push::Rejected);
    }
}
