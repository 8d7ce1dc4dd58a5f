//! [`ChannelStream`]: one channel as one connection receives it — the per-connection half of the
//! delivery guarantee.
//!
//! The replica-wide [`super::Core`] orders each channel once; this type makes sure that what a
//! single connection receives of a channel is in order, has no duplicates, and has no hole it
//! was not told about. It is either *live* (deliver the next offset) or *filling* (history after
//! `after` up to `upto` must be read first, page by page, at the connection's own pace). Live
//! frames that arrive while filling are held, at most `hold_limit` of them; beyond that they are
//! dropped from memory and the fill extends over them, so a replay never grows memory without
//! bound and never overflows the connection's outbox. Whatever history cannot provide becomes a
//! `gap` frame naming the missing range.
//!
//! Pure logic: the session does the reads and feeds the pages in.

use std::collections::VecDeque;

use crate::protocol::ServerFrame;

use super::Frames;

/// Offsets read per history page.
pub const PAGE: i64 = 500;

#[derive(Debug)]
pub struct ChannelStream {
    state: State,
    hold_limit: usize,
}

#[derive(Debug)]
enum State {
    /// Subscribe requested, not confirmed yet.
    Pending,
    /// Delivering live; `last` is the highest offset sent (or announced).
    Live { last: i64 },
    /// `after+1..=upto` comes from history first; `held` are live frames beyond `upto`.
    Filling {
        after: i64,
        upto: i64,
        held: VecDeque<ServerFrame>,
        /// Start of a run of missing offsets not signalled yet (one `gap` frame per run).
        missing: Option<i64>,
    },
}

/// What a confirmation meant to this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// First confirmation: announce the subscription (and with `since`, replay).
    Fresh,
    /// The connection already had the channel: nothing changes, `since` is ignored, nothing is
    /// delivered twice. Announce `subscribed` with this `last_id`.
    Repeat { last_id: i64 },
}

impl ChannelStream {
    /// A stream waiting for its subscription to be confirmed.
    pub fn pending(hold_limit: usize) -> Self {
        Self {
            state: State::Pending,
            hold_limit: hold_limit.max(1),
        }
    }

    pub fn is_pending(&self) -> bool {
        matches!(self.state, State::Pending)
    }

    /// Live delivery continues after `last`; with `since`, `since+1..=last` is replayed first.
    pub fn confirm(&mut self, last: i64, since: Option<i64>) -> Confirmed {
        match self.state {
            State::Pending => {}
            State::Live { last } => return Confirmed::Repeat { last_id: last },
            State::Filling { upto, .. } => return Confirmed::Repeat { last_id: upto },
        }
        self.state = match since {
            // Filling even when there is nothing to replay: live frames wait for the
            // announcement ([`ChannelStream::skip_to`] ends it).
            // Ahead of the channel (its history was reset?): the announcement rewinds the
            // replay to the oldest retained offset.
            Some(since) => State::Filling {
                after: if since <= last { since } else { 0 },
                upto: last,
                held: VecDeque::new(),
                missing: None,
            },
            None => State::Live { last },
        };
        Confirmed::Fresh
    }

    /// The highest offset delivered, while live: the next one may bypass [`Self::on_message`]
    /// (a direct write, see [`super::subscriptions::Lane`]).
    pub fn live_last(&self) -> Option<i64> {
        match self.state {
            State::Live { last } => Some(last),
            _ => None,
        }
    }

    /// Offsets up to `last` were delivered in order without passing through
    /// [`Self::on_message`].
    pub fn delivered_up_to(&mut self, last: i64) {
        if let State::Live { last: delivered } = &mut self.state {
            *delivered = (*delivered).max(last);
        }
    }

    /// A live message with offset `id`; what must be sent now is appended to `out`.
    pub fn on_message(&mut self, id: i64, frame: ServerFrame, out: &mut Frames) {
        match &mut self.state {
            State::Pending => {}
            State::Live { last } => {
                if id == *last + 1 {
                    *last = id;
                    out.push(frame);
                } else if id > *last + 1 {
                    // A hole nobody announced: never skip it silently, fill it from history.
                    let mut held = VecDeque::new();
                    held.push_back(frame);
                    self.state = State::Filling {
                        after: *last,
                        upto: id - 1,
                        held,
                        missing: None,
                    };
                }
                // Below: a duplicate; dropped.
            }
            State::Filling { upto, held, .. } => {
                if id <= *upto || held.back().is_some_and(|f| f.id >= Some(id)) {
                    return; // Comes from history, or held already.
                }
                held.push_back(frame);
                if held.len() > self.hold_limit {
                    // Too much to hold: read these from history too.
                    *upto = id;
                    held.clear();
                }
            }
        }
    }

    /// The core declared `..=upto` committed but not delivered live: read it from history.
    pub fn on_catch_up(&mut self, upto: i64) {
        match &mut self.state {
            State::Pending => {}
            State::Live { last } => {
                if upto > *last {
                    self.state = State::Filling {
                        after: *last,
                        upto,
                        held: VecDeque::new(),
                        missing: None,
                    };
                }
            }
            State::Filling {
                upto: current,
                held,
                ..
            } => {
                if upto > *current {
                    *current = upto;
                    held.retain(|f| f.id.is_some_and(|id| id > upto));
                }
            }
        }
    }

    /// The history window to read next: offsets `after+1..=end`, at most [`PAGE`] of them.
    pub fn next_read(&self) -> Option<(i64, i64)> {
        match self.state {
            State::Filling { after, upto, .. } if after < upto => {
                Some((after, upto.min(after + PAGE)))
            }
            _ => None,
        }
    }

    /// Move past `after` without sending anything (the `subscribed` frame already said that
    /// history starts later).
    pub fn skip_to(&mut self, after: i64, channel: &str, out: &mut Frames) {
        if let State::Filling {
            after: current,
            upto,
            ..
        } = &mut self.state
        {
            *current = (*current).max(after).min(*upto);
        }
        self.switch_if_done(channel, out);
    }

    /// Feed the page read for `window` (from [`ChannelStream::next_read`]): stored messages in
    /// ascending order. Appends the frames to send to `out`, `gap` frames for missing offsets
    /// included, then the held live frames once the fill is complete.
    pub fn on_page(
        &mut self,
        channel: &str,
        window: (i64, i64),
        rows: &[ServerFrame],
        out: &mut Frames,
    ) {
        let State::Filling {
            after,
            upto,
            missing,
            ..
        } = &mut self.state
        else {
            return;
        };
        if *after != window.0 {
            return; // Stale: not the read this state asked for.
        }
        let end = window.1.min(*upto);
        for row in rows {
            let Some(id) = row.id else { continue };
            if id <= *after || id > end {
                continue;
            }
            if id > *after + 1 {
                missing.get_or_insert(*after + 1);
            }
            if let Some(from) = missing.take() {
                out.push(ServerFrame::gap(channel, from, id - 1));
            }
            out.push(row.clone());
            *after = id;
        }
        if *after < end {
            missing.get_or_insert(*after + 1);
            *after = end;
        }
        self.switch_if_done(channel, out);
    }

    /// History cannot be read: signal the whole rest of the fill as a gap and go live.
    pub fn on_unreadable(&mut self, channel: &str, out: &mut Frames) {
        if let State::Filling {
            after,
            upto,
            missing,
            ..
        } = &mut self.state
        {
            if *after < *upto {
                missing.get_or_insert(*after + 1);
            }
            *after = *upto;
        }
        self.switch_if_done(channel, out);
    }

    fn switch_if_done(&mut self, channel: &str, out: &mut Frames) {
        let State::Filling {
            after,
            upto,
            held,
            missing,
        } = &mut self.state
        else {
            return;
        };
        if after < upto {
            return;
        }
        if let Some(from) = missing.take() {
            out.push(ServerFrame::gap(channel, from, *upto));
        }
        let held = std::mem::take(held);
        self.state = State::Live { last: *upto };
        for frame in held {
            if let Some(id) = frame.id {
                self.on_message(id, frame, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn frame(id: i64) -> ServerFrame {
        let data = RawValue::from_string(id.to_string()).unwrap();
        ServerFrame::message("c", &data, Some(id))
    }

    fn rows(ids: impl IntoIterator<Item = i64>) -> Vec<ServerFrame> {
        ids.into_iter().map(frame).collect()
    }

    /// Message ids as numbers, gaps as `-from`.
    fn seen(out: &[ServerFrame]) -> Vec<i64> {
        out.iter()
            .map(|f| match f.kind {
                crate::protocol::FrameKind::Gap => {
                    let v: serde_json::Value = serde_json::from_str(&f.text).unwrap();
                    -v["from"].as_i64().unwrap()
                }
                _ => f.id.unwrap(),
            })
            .collect()
    }

    #[test]
    fn replay_then_held_live_frames_with_no_duplicate() {
        let mut s = ChannelStream::pending(8);
        assert_eq!(s.confirm(5, Some(2)), Confirmed::Fresh);
        let mut out = Frames::new();
        s.on_message(6, frame(6), &mut out);
        s.on_message(5, frame(5), &mut out);
        assert!(out.is_empty(), "held during the replay");
        assert_eq!(s.next_read(), Some((2, 5)));
        s.on_page("c", (2, 5), &rows(3..=5), &mut out);
        assert_eq!(seen(&out), [3, 4, 5, 6]);
        assert_eq!(s.next_read(), None);
        assert_eq!(
            s.confirm(9, Some(0)),
            Confirmed::Repeat { last_id: 6 },
            "a repeated subscribe replays nothing"
        );
    }

    #[test]
    fn pruned_history_becomes_a_gap_frame() {
        let mut s = ChannelStream::pending(8);
        s.confirm(0, None);
        s.on_catch_up(1500);
        let mut out = Frames::new();
        let (after, end) = s.next_read().unwrap();
        assert_eq!((after, end), (0, PAGE));
        // Retention kept only 1001.., so two windows find nothing: one gap frame for both.
        s.on_page("c", (after, end), &[], &mut out);
        let window = s.next_read().unwrap();
        s.on_page("c", window, &[], &mut out);
        assert!(out.is_empty());
        let window = s.next_read().unwrap();
        s.on_page("c", window, &rows(1001..=1500), &mut out);
        assert_eq!(seen(&out)[..2], [-1, 1001]);
        assert_eq!(out.len(), 501);
        assert!(
            out[0].text.contains(r#""from":1,"to":1000"#),
            "{}",
            out[0].text
        );
        assert_eq!(s.next_read(), None);
    }

    #[test]
    fn an_unannounced_jump_is_filled_not_skipped() {
        let mut s = ChannelStream::pending(8);
        s.confirm(3, None);
        let mut out = Frames::new();
        s.on_message(7, frame(7), &mut out);
        assert!(out.is_empty());
        assert_eq!(s.next_read(), Some((3, 6)));
        s.on_page("c", (3, 6), &rows(4..=6), &mut out);
        assert_eq!(seen(&out), [4, 5, 6, 7]);
    }

    #[test]
    fn too_many_held_frames_extend_the_fill() {
        let mut s = ChannelStream::pending(2);
        s.confirm(0, None);
        s.on_catch_up(2);
        let mut out = Frames::new();
        for id in 3..=5 {
            s.on_message(id, frame(id), &mut out);
        }
        assert_eq!(s.next_read(), Some((0, 5)));
        s.on_page("c", (0, 5), &rows(1..=5), &mut out);
        s.on_message(6, frame(6), &mut out);
        assert_eq!(seen(&out), [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn unreadable_history_is_signalled_once() {
        let mut s = ChannelStream::pending(8);
        s.confirm(10, Some(4));
        let mut out = Frames::new();
        s.on_message(11, frame(11), &mut out);
        s.on_unreadable("c", &mut out);
        assert_eq!(seen(&out), [-5, 11]);
    }
}
