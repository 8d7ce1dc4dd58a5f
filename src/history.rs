//! [`HistoryReader`]: every read of stored history that delivery needs — the pages a connection
//! replays, the retained range a `since` subscription announces, the heads the listener checks —
//! each bounded by a timeout.
//!
//! Reads are shared. After a broker outage every subscriber of a channel fills the same range
//! from the same offset, so pages are keyed by `(channel, window)`: concurrent requests for one
//! page wait for a single query (moka's `try_get_with` coalesces them), and the encoded frames are
//! kept for a few seconds, bounded by bytes, for the connections that come a little later. A
//! page is immutable once its offsets are committed, so sharing it is always correct.

use std::{sync::Arc, time::Duration};

use moka::future::Cache;

use crate::{
    protocol::ServerFrame,
    store::{MessageStore, StoreError},
};

/// Encoded pages kept for sharing, in bytes of frame text.
const PAGE_CACHE_BYTES: u64 = 64 << 20;
/// How long a page stays shared after it was read.
const PAGE_TTL: Duration = Duration::from_secs(5);
/// How long a channel's oldest retained offset is reused (a stale value is safe: a page read
/// that finds rows missing signals them as a gap).
const OLDEST_TTL: Duration = Duration::from_secs(1);

/// Why history could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HistoryError {
    #[error("history did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Store(Arc<StoreError>),
}

/// Messages of one history window, encoded once for every connection that reads it.
pub type Page = Arc<[ServerFrame]>;

/// Cheap to clone: one pointer, because every session keeps one in its state.
#[derive(Clone)]
pub struct HistoryReader {
    inner: Arc<Inner>,
}

struct Inner {
    store: MessageStore,
    timeout: Duration,
    pages: Cache<(Arc<str>, i64, i64), Page>,
    oldest: Cache<Arc<str>, i64>,
}

impl HistoryReader {
    /// `timeout` bounds each read (the pool's acquire wait included).
    pub fn new(store: MessageStore, timeout: Duration) -> Self {
        let pages = Cache::builder()
            .max_capacity(PAGE_CACHE_BYTES)
            .weigher(|_, page: &Page| {
                let bytes: usize = page.iter().map(|f| f.text.len()).sum();
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .time_to_live(PAGE_TTL)
            .build();
        let oldest = Cache::builder()
            .max_capacity(100_000)
            .time_to_live(OLDEST_TTL)
            .build();
        let inner = Inner {
            store,
            timeout,
            pages,
            oldest,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    async fn bounded<T>(
        &self,
        read: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, HistoryError> {
        let timeout = self.inner.timeout;
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(HistoryError::Store(Arc::new(err))),
            Err(_) => Err(HistoryError::Timeout(timeout)),
        }
    }

    /// Stored messages with offsets in `after+1..=end` (a window of at most a page).
    pub async fn page(
        &self,
        channel: &Arc<str>,
        (after, end): (i64, i64),
    ) -> Result<Page, HistoryError> {
        let read = async {
            let limit = end.saturating_sub(after).max(1);
            let rows = self
                .bounded(self.inner.store.read_range(channel, after, end, limit))
                .await?;
            metrics::counter!("relay_history_pages_read_total").increment(1);
            Ok::<_, HistoryError>(
                rows.iter()
                    .map(|m| ServerFrame::message(channel, &m.data, Some(m.offset)))
                    .collect::<Page>(),
            )
        };
        self.inner
            .pages
            .try_get_with((Arc::clone(channel), after, end), read)
            .await
            .map_err(|err| (*err).clone())
    }

    /// The oldest offset `channel` still retains (`last + 1` when none is).
    pub async fn oldest(&self, channel: &Arc<str>) -> Result<i64, HistoryError> {
        let read = async {
            let position = self.bounded(self.inner.store.position(channel)).await?;
            Ok::<_, HistoryError>(position.oldest_offset)
        };
        self.inner
            .oldest
            .try_get_with(Arc::clone(channel), read)
            .await
            .map_err(|err| (*err).clone())
    }

    /// The committed head of each channel, in input order.
    pub async fn heads(&self, channels: &[Arc<str>]) -> Result<Vec<i64>, HistoryError> {
        let names: Vec<&str> = channels.iter().map(|c| &**c).collect();
        self.bounded(self.inner.store.heads(&names)).await
    }
}
