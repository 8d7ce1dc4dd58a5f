//! The per-channel message log: append with a gapless offset, read ranges, prune.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::{PgConnection, PgPool, Row};

use super::StoreError;

/// A message as stored.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub offset: i64,
    /// The JSON as Postgres returns it (jsonb: key order and whitespace normalised).
    pub data: Box<RawValue>,
    pub created_at: DateTime<Utc>,
}

/// Where a channel's log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelPosition {
    /// Offset of the newest message ever appended (0 if none).
    pub last_offset: i64,
    /// Offset of the oldest message still retained (`last_offset + 1` if none is).
    pub oldest_offset: i64,
}

/// What an append came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored {
        offset: i64,
        created_at: DateTime<Utc>,
    },
    /// The channel does not exist and its creator has `max_channels` channels already.
    ChannelLimit,
    /// `expected_last_id` was given and the channel stands elsewhere.
    Conflict { last_offset: i64 },
    /// The idempotency key was used within the window for this same data: the original.
    Replayed {
        offset: i64,
        created_at: DateTime<Utc>,
    },
    /// The idempotency key was used within the window for other data.
    KeyReused,
}

/// What makes an append conditional or idempotent.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppendOptions<'a> {
    /// The subject creating the channel if it is new ('' when anonymous) and its quota (0: none).
    pub creator: &'a str,
    pub max_channels: u32,
    /// Compare-and-publish: only if the channel's last offset is this.
    pub expected_last_id: Option<i64>,
    /// With the window it is remembered for.
    pub idempotency: Option<(&'a str, std::time::Duration)>,
}

/// Append `data` to `channel`: its next offset, unless the channel is new and the creator
/// already has `max_channels` channels (0: no quota), or `expected_last_id` is given and is not
/// the channel's last offset (compare-and-publish), or the idempotency key was used within its
/// window (the original is returned, or [`Appended::KeyReused`] for other data).
///
/// One statement, so one transaction: the channel row's counter is incremented under its row
/// lock (serialising publishers of that channel across all replicas) and the message inserted
/// with the new value. A failure rolls both back, so offsets never skip. The expectation is
/// checked under that same lock, so of concurrent publishers expecting the same offset exactly
/// one wins. A new channel starts after its bucket's floor (see the `channel_floors`
/// migration); the floor row is read `FOR SHARE`, so the newest committed floor is used even if
/// retention raised it while this statement ran.
///
/// The quota is a count, not a lock: concurrent creations by one subject can each see room and
/// overshoot it by at most their number, which keeps the bound without serialising creators.
pub async fn append(
    pool: &PgPool,
    channel: &str,
    data: &RawValue,
    options: AppendOptions<'_>,
) -> Result<Appended, StoreError> {
    let Some((key, window)) = options.idempotency else {
        let mut conn = pool.acquire().await?;
        return append_on(&mut conn, channel, data, options, None).await;
    };
    // Keyed publishes of one channel take turns (an advisory lock, released at commit), so the
    // look-up and the append see every earlier publish with the key, on any replica — also for
    // a channel that does not exist yet and has no row to lock.
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7243))")
        .bind(channel)
        .execute(&mut *tx)
        .await?;
    let earlier = sqlx::query(
        r#"
        SELECT "offset", created_at, data = $3::text::jsonb AS same FROM messages
        WHERE channel = $1 AND idempotency_key = $2
          AND created_at > now() - $4 * interval '1 millisecond'
        ORDER BY "offset" DESC LIMIT 1
        "#,
    )
    .bind(channel)
    .bind(key)
    .bind(data.get())
    .bind(i64::try_from(window.as_millis()).unwrap_or(i64::MAX))
    .fetch_optional(&mut *tx)
    .await?;
    let appended = match earlier {
        Some(row) if row.try_get::<bool, _>("same")? => Appended::Replayed {
            offset: row.try_get("offset")?,
            created_at: row.try_get("created_at")?,
        },
        Some(_) => Appended::KeyReused,
        None => append_on(&mut tx, channel, data, options, Some(key)).await?,
    };
    tx.commit().await?;
    Ok(appended)
}

async fn append_on(
    conn: &mut PgConnection,
    channel: &str,
    data: &RawValue,
    options: AppendOptions<'_>,
    key: Option<&str>,
) -> Result<Appended, StoreError> {
    let row = sqlx::query(
        r#"
        WITH bumped AS (
            UPDATE channels SET last_offset = last_offset + 1
            WHERE name = $1 AND ($5::bigint IS NULL OR last_offset = $5)
            RETURNING last_offset
        ), floor AS (
            SELECT floor FROM channel_floors WHERE bucket = channel_bucket($1) FOR SHARE
        ), created AS (
            INSERT INTO channels (name, last_offset, created_by)
            SELECT $1, (SELECT floor FROM floor) + 1, $3
            WHERE NOT EXISTS (SELECT 1 FROM bumped)
              AND ($5::bigint IS NULL OR $5 = (SELECT floor FROM floor))
              AND ($4 = 0 OR (SELECT count(*) FROM channels WHERE created_by = $3) < $4)
            ON CONFLICT (name) DO UPDATE SET last_offset = channels.last_offset + 1
                WHERE $5::bigint IS NULL OR channels.last_offset = $5
            RETURNING last_offset
        ), next AS (
            SELECT last_offset FROM bumped UNION ALL SELECT last_offset FROM created
        )
        INSERT INTO messages (channel, "offset", data, idempotency_key)
        SELECT $1, last_offset, $2::text::jsonb, $6 FROM next
        RETURNING "offset", created_at
        "#,
    )
    .bind(channel)
    .bind(data.get())
    .bind(options.creator)
    .bind(i64::from(options.max_channels))
    .bind(options.expected_last_id)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = row {
        return Ok(Appended::Stored {
            offset: row.try_get("offset")?,
            created_at: row.try_get("created_at")?,
        });
    }
    // Nothing was written; say why. The statement above decided; this only explains it.
    let last_offset = position_on(conn, channel).await?.last_offset;
    Ok(match options.expected_last_id {
        Some(expected) if expected != last_offset => Appended::Conflict { last_offset },
        _ => Appended::ChannelLimit,
    })
}

/// Messages with `after < offset <= upto`, oldest first, at most `limit`.
pub async fn read_range(
    pool: &PgPool,
    channel: &str,
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<Vec<StoredMessage>, StoreError> {
    let rows = sqlx::query(
        r#"
        SELECT "offset", data::text AS data, created_at FROM messages
        WHERE channel = $1 AND "offset" > $2 AND "offset" <= $3
        ORDER BY "offset"
        LIMIT $4
        "#,
    )
    .bind(channel)
    .bind(after)
    .bind(upto)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            let data: String = row.try_get("data")?;
            Ok(StoredMessage {
                offset: row.try_get("offset")?,
                // Postgres produced this text from a jsonb value, so it is valid JSON.
                data: RawValue::from_string(data)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                created_at: row.try_get("created_at")?,
            })
        })
        .collect()
}

/// The channel's newest and oldest retained offsets. A channel that does not exist stands at
/// its bucket's floor: the offset its first message will follow.
pub async fn position(pool: &PgPool, channel: &str) -> Result<ChannelPosition, StoreError> {
    let mut conn = pool.acquire().await?;
    position_on(&mut conn, channel).await
}

async fn position_on(
    conn: &mut PgConnection,
    channel: &str,
) -> Result<ChannelPosition, StoreError> {
    let row = sqlx::query(
        r#"
        SELECT COALESCE(c.last_offset, f.floor, 0) AS last_offset,
               COALESCE((SELECT min("offset") FROM messages m WHERE m.channel = $1),
                        COALESCE(c.last_offset, f.floor, 0) + 1) AS oldest_offset
        FROM (SELECT $1::text AS name) AS q
        LEFT JOIN channels c ON c.name = q.name
        LEFT JOIN channel_floors f ON f.bucket = channel_bucket(q.name)
        "#,
    )
    .bind(channel)
    .fetch_one(&mut *conn)
    .await?;
    Ok(ChannelPosition {
        last_offset: row.try_get("last_offset")?,
        oldest_offset: row.try_get("oldest_offset")?,
    })
}

/// The newest offset of each channel (its floor for a channel that does not exist), in input
/// order. One query for many channels: the listener checks every active channel's head
/// periodically.
pub async fn heads(pool: &PgPool, channels: &[&str]) -> Result<Vec<i64>, StoreError> {
    let rows = sqlx::query(
        r#"
        SELECT q.name, COALESCE(c.last_offset, f.floor, 0) AS last_offset
        FROM unnest($1::text[]) AS q(name)
        LEFT JOIN channels c ON c.name = q.name
        LEFT JOIN channel_floors f ON f.bucket = channel_bucket(q.name)
        "#,
    )
    .bind(channels)
    .fetch_all(pool)
    .await?;
    let mut found = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        let name: String = row.try_get("name")?;
        found.insert(name, row.try_get::<i64, _>("last_offset")?);
    }
    Ok(channels
        .iter()
        .map(|c| found.get(*c).copied().unwrap_or(0))
        .collect())
}

/// Remove up to `batch` channels without messages whose last offset is already within their
/// bucket's floor ([`raise_floors`] ran in an earlier round). Returns how many.
///
/// The floor condition is re-checked on the row being deleted: a publish that lands meanwhile
/// moves `last_offset` past the floor, and the channel stays.
pub async fn remove_empty_channels(pool: &PgPool, batch: i64) -> Result<u64, StoreError> {
    let result = sqlx::query(
        r#"
        DELETE FROM channels c
        WHERE c.name IN (
            SELECT e.name FROM channels e
            WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.channel = e.name)
              AND e.last_offset <= (SELECT floor FROM channel_floors WHERE bucket = channel_bucket(e.name))
            LIMIT $1
        )
        AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.channel = c.name)
        AND c.last_offset <= (SELECT floor FROM channel_floors WHERE bucket = channel_bucket(c.name))
        "#,
    )
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

/// Raise the floor of every bucket holding an empty channel to that channel's last offset, so
/// that a later [`remove_empty_channels`] may delete it. Returns how many buckets moved.
pub async fn raise_floors(pool: &PgPool) -> Result<u64, StoreError> {
    let result = sqlx::query(
        r#"
        UPDATE channel_floors f SET floor = e.floor
        FROM (
            SELECT channel_bucket(c.name) AS bucket, max(c.last_offset) AS floor FROM channels c
            WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.channel = c.name)
            GROUP BY 1
        ) AS e
        WHERE f.bucket = e.bucket AND f.floor < e.floor
        "#,
    )
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

/// Delete up to `batch` messages older than `max_age`. Returns how many were deleted.
pub async fn prune_older_than(
    pool: &PgPool,
    max_age: std::time::Duration,
    batch: i64,
) -> Result<u64, StoreError> {
    let max_age = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
    let cutoff = Utc::now()
        .checked_sub_signed(max_age)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let result = sqlx::query(
        r#"
        DELETE FROM messages WHERE ctid IN (
            SELECT ctid FROM messages WHERE created_at < $1 LIMIT $2
        )
        "#,
    )
    .bind(cutoff)
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

/// Delete up to `batch` messages beyond the newest `keep` of some channel. Returns how many.
pub async fn prune_beyond_count(pool: &PgPool, keep: i64, batch: i64) -> Result<u64, StoreError> {
    let result = sqlx::query(
        r#"
        DELETE FROM messages WHERE ctid IN (
            SELECT m.ctid FROM channels c
            JOIN messages m ON m.channel = c.name AND m."offset" <= c.last_offset - $1
            WHERE c.last_offset > $1
            LIMIT $2
        )
        "#,
    )
    .bind(keep)
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}
