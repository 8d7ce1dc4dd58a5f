//! [`SessionOutbox`]: the bounded queue between the fan-out and one subscriber session.
//!
//! The Redis listener pushes shared [`ServerFrame`]s here without ever waiting; the session task
//! (WebSocket or SSE) drains everything queued at once and writes it with a single flush. When
//! the queue is full the subscriber is a *slow consumer*: the outbox latches into the overflowed
//! state, further pushes are refused, and the session closes the connection (WebSocket close
//! code 4008). Dropping frames silently instead would leave a client with a hole in its stream
//! it cannot detect; blocking would let one slow client stall every other subscriber.

use std::{
    collections::VecDeque,
    sync::{Mutex, PoisonError},
};

use tokio::sync::Notify;

use crate::protocol::ServerFrame;

/// An item in a session's outbox.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// An encoded frame, sent as is.
    Frame(ServerFrame),
    /// Send `subscribed` and replay stored history for a `since` subscription, before anything
    /// queued after this item. Queued by the listener exactly where live delivery starts.
    Replay(Box<Replay>),
}

/// History the session must replay: offsets in `(since, upto]` of `channel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub channel: Box<str>,
    pub since: i64,
    pub upto: i64,
}

impl From<ServerFrame> for Outgoing {
    fn from(frame: ServerFrame) -> Self {
        Self::Frame(frame)
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// This push overflowed the queue; the subscriber is now marked slow.
    Overflowed,
    /// The outbox was already overflowed or closed; nothing queued.
    Rejected,
}

/// What [`SessionOutbox::drain_into`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Frames (possibly none) were moved into the caller's buffer.
    Frames,
    /// The queue overflowed: close the connection as a slow consumer.
    Overflowed,
}

#[derive(Debug)]
pub struct SessionOutbox {
    state: Mutex<State>,
    notify: Notify,
    capacity: usize,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Outgoing>,
    overflowed: bool,
    closed: bool,
}

impl SessionOutbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue a frame without waiting. Never blocks the caller beyond a short mutex hold.
    pub fn push(&self, item: impl Into<Outgoing>) -> Push {
        let mut state = self.lock();
        if state.overflowed || state.closed {
            return Push::Rejected;
        }
        if state.queue.len() >= self.capacity {
            state.overflowed = true;
            // Free the memory now; the session will only send a close frame.
            state.queue = VecDeque::new();
            drop(state);
            self.notify.notify_one();
            return Push::Overflowed;
        }
        let was_empty = state.queue.is_empty();
        state.queue.push_back(item.into());
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

    /// Move every queued frame into `buf` (which the session reuses between drains).
    pub fn drain_into(&self, buf: &mut VecDeque<Outgoing>) -> Drained {
        let mut state = self.lock();
        if state.overflowed {
            return Drained::Overflowed;
        }
        if buf.is_empty() {
            std::mem::swap(&mut state.queue, buf);
        } else {
            buf.extend(state.queue.drain(..));
        }
        Drained::Frames
    }

    /// Refuse further pushes; the fan-out skips closed outboxes and the listener forgets them.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.queue = VecDeque::new();
    }

    pub fn is_closed(&self) -> bool {
        let state = self.lock();
        state.closed || state.overflowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_latches_and_frees() {
        let outbox = SessionOutbox::new(2);
        assert_eq!(outbox.push(ServerFrame::pong()), Push::Queued);
        assert_eq!(outbox.push(ServerFrame::pong()), Push::Queued);
        assert_eq!(outbox.push(ServerFrame::pong()), Push::Overflowed);
        assert_eq!(outbox.push(ServerFrame::pong()), Push::Rejected);
        let mut buf = VecDeque::new();
        assert_eq!(outbox.drain_into(&mut buf), Drained::Overflowed);
        assert!(buf.is_empty());
    }

    #[test]
    fn drain_takes_everything_in_order() {
        let outbox = SessionOutbox::new(8);
        outbox.push(ServerFrame::subscribed("a", 0));
        outbox.push(ServerFrame::pong());
        let mut buf = VecDeque::new();
        assert_eq!(outbox.drain_into(&mut buf), Drained::Frames);
        assert_eq!(buf.len(), 2);
        assert!(matches!(&buf[0], Outgoing::Frame(f) if f.text.contains("subscribed")));
        outbox.close();
        assert_eq!(outbox.push(ServerFrame::pong()), Push::Rejected);
    }
}
