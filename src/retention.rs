//! The retention task: a background job tied to the app lifecycle that prunes message history
//! older than `history.ttl` and beyond `history.max_per_channel`.
//!
//! It deletes in batches of `history.prune_batch` rows with a short pause in between, so it never
//! holds long locks or starves publishers (deleting old rows takes no lock a publisher needs).
//! It stops at cancellation, between batches.
//!
//! Channels whose messages have all been pruned are removed too, so the `channels` table does
//! not keep every name ever published to. Removal takes two rounds: one records the channel's
//! last offset as its bucket's floor, the next deletes it, so a name created again later goes on
//! after its old offsets instead of restarting at 1 (see the `channel_floors` migration).

use std::time::Duration;

use crate::{
    config::HistorySettings,
    lifecycle::Lifecycle,
    store::{MessageStore, StoreError},
};

/// Pause between batches, so a large backlog is worked off without hogging the database.
const BATCH_PAUSE: Duration = Duration::from_millis(20);

pub async fn run(store: MessageStore, settings: HistorySettings, lifecycle: Lifecycle) {
    // The first round one interval after startup, not at once: a rolling deploy does not send
    // every new replica's pruning to Postgres together, and a fresh app is not raced by it.
    let mut interval = tokio::time::interval_at(
        tokio::time::Instant::now() + settings.prune_interval,
        settings.prune_interval,
    );
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = lifecycle.cancelled() => return,
            _ = interval.tick() => {}
        }
        match prune_once(&store, &settings, &lifecycle).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "pruned message history"),
            Err(err) => tracing::warn!(%err, "history pruning failed; retrying next interval"),
        }
    }
}

/// One full pruning pass. Returns the number of rows deleted.
pub async fn prune_once(
    store: &MessageStore,
    settings: &HistorySettings,
    lifecycle: &Lifecycle,
) -> Result<u64, StoreError> {
    let mut total = 0;
    for by_age in [true, false] {
        loop {
            if lifecycle.is_cancelled() {
                return Ok(total);
            }
            let deleted = if by_age {
                store
                    .prune_older_than(settings.ttl, settings.prune_batch)
                    .await?
            } else {
                store
                    .prune_beyond_count(settings.max_per_channel, settings.prune_batch)
                    .await?
            };
            total += deleted;
            metrics::counter!("relay_history_pruned_total").increment(deleted);
            if (deleted as i64) < settings.prune_batch {
                break;
            }
            tokio::time::sleep(BATCH_PAUSE).await;
        }
    }
    // Deletes what earlier rounds floored, then floors what is empty now (the next round
    // deletes that): a publish racing the removal always reads the raised floor.
    loop {
        if lifecycle.is_cancelled() {
            return Ok(total);
        }
        let removed = store.remove_empty_channels(settings.prune_batch).await?;
        metrics::counter!("relay_channels_removed_total").increment(removed);
        if removed > 0 {
            tracing::info!(removed, "removed empty channels");
        }
        if (removed as i64) < settings.prune_batch {
            break;
        }
        tokio::time::sleep(BATCH_PAUSE).await;
    }
    store.raise_floors().await?;
    Ok(total)
}
