//! History replay for `since` subscriptions, shared by WebSocket and SSE sessions.
//!
//! The listener queues a [`Replay`] into the session's outbox at the exact point where live
//! delivery to it starts (after offset `upto`). The session then sends `subscribed` and the stored
//! messages `(since, upto]` page by page, before anything queued after the marker, so the client
//! sees history then live with no gap and no duplicate.

use crate::{
    protocol::ServerFrame,
    pubsub::outbox::Replay,
    store::{MessageStore, StoreError},
};

/// Messages read per page while replaying.
const REPLAY_PAGE: i64 = 500;

/// Reads the rest of a replay page by page.
pub struct ReplayCursor {
    store: MessageStore,
    channel: Box<str>,
    after: i64,
    upto: i64,
}

/// Begin a replay: the frames to send first (`subscribed`, or an error and `subscribed` when
/// history cannot be read) and, if there is history to send, the cursor over it.
pub async fn start_replay(
    store: &MessageStore,
    replay: &Replay,
) -> (Vec<ServerFrame>, Option<ReplayCursor>) {
    let Replay {
        channel,
        since,
        upto,
    } = replay;
    match store.position(channel).await {
        Ok(position) => {
            // Complete when nothing after `since` was pruned and `since` is not in the future.
            let recovered = *since + 1 >= position.oldest_offset && since <= upto;
            let subscribed = ServerFrame::subscribed_recovering(
                channel,
                *upto,
                recovered,
                position.oldest_offset,
            );
            let cursor = (since < upto).then(|| ReplayCursor {
                store: store.clone(),
                channel: channel.clone(),
                after: *since,
                upto: *upto,
            });
            (vec![subscribed], cursor)
        }
        Err(err) => {
            tracing::warn!(%err, channel = &**channel, "cannot read history for a since-subscription");
            let frames = vec![
                ServerFrame::error(
                    "history_unavailable",
                    &format!("cannot replay `{channel}`: history is unavailable"),
                ),
                ServerFrame::subscribed_recovering(channel, *upto, false, upto + 1),
            ];
            (frames, None)
        }
    }
}

impl ReplayCursor {
    /// The next page of stored messages, or None when the replay is complete.
    pub async fn next_page(&mut self) -> Result<Option<Vec<ServerFrame>>, StoreError> {
        if self.after >= self.upto {
            return Ok(None);
        }
        let rows = self
            .store
            .read_range(&self.channel, self.after, self.upto, REPLAY_PAGE)
            .await?;
        let Some(last) = rows.last() else {
            self.after = self.upto;
            return Ok(None);
        };
        self.after = if (rows.len() as i64) < REPLAY_PAGE {
            self.upto
        } else {
            last.offset
        };
        Ok(Some(
            rows.iter()
                .map(|m| ServerFrame::message(&self.channel, &m.data, Some(m.offset)))
                .collect(),
        ))
    }

    /// The error frame to send when a page cannot be read: the client must resubscribe.
    pub fn failure_frame(&self, err: &StoreError) -> ServerFrame {
        tracing::warn!(%err, channel = &*self.channel, "history replay interrupted");
        ServerFrame::error(
            "history_unavailable",
            &format!(
                "replay of `{}` interrupted after offset {}; subscribe again with since",
                self.channel, self.after
            ),
        )
    }
}
