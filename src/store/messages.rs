//! The per-channel message log in Postgres: append batches with gapless offsets, read ranges,
//! prune.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use std::collections::HashMap;

use sqlx::{PgConnection, PgPool, Row};

use super::{
    StoreError,
    batch::{self, Earlier, NewMessage, Rules},
    outbox::{self, HookCache},
};

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
    /// Another publish of its group was refused, so none of the group was stored.
    Aborted,
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

impl AppendOptions<'_> {
    /// The same append as a batch of one.
    pub fn into_batch(self, channel: &str, data: &RawValue) -> (NewMessage, Rules) {
        let message = NewMessage {
            channel: channel.into(),
            data: data.to_owned(),
            creator: self.creator.into(),
            expected_last_id: self.expected_last_id,
            idempotency_key: self.idempotency.map(|(key, _)| key.into()),
        };
        let rules = Rules {
            max_channels: self.max_channels,
            idempotency_window: self.idempotency.map(|(_, w)| w).unwrap_or_default(),
        };
        (message, rules)
    }
}

/// Append a batch of messages (see [`super::batch`] for groups and rules), in one transaction:
///
/// 1. lock every channel of the batch, one advisory lock per name taken in a fixed order (so
///    batches never deadlock each other), which serialises the writers of a channel across all
///    replicas — also of one that does not exist yet and has no row to lock;
/// 2. read how those channels stand (and, when needed, the creators' channel counts and the
///    earlier publishes of idempotency keys);
/// 3. let [`batch::plan`] decide;
/// 4. write every channel's new last offset and every message in one statement, with one
///    webhook delivery per (stored message, matching webhook) when there are webhooks (the
///    outbox, [`super::outbox`]): a committed message always has its deliveries.
///
/// `ordered` is called once the locks are held: from then on, a batch started later commits
/// after this one in every channel they share (the group committer starts the next batch then).
///
/// Nothing is written unless it all commits, so offsets never skip. The write re-checks each
/// channel's last offset against what was read: a writer that did not take the lock (a replica
/// of an older version during a rolling upgrade) makes the batch fail instead of corrupting a
/// channel.
pub async fn append_batch(
    pool: &PgPool,
    messages: &[NewMessage],
    group_sizes: &[usize],
    rules: Rules,
    hooks: &HookCache,
    ordered: impl FnOnce(),
) -> Result<Vec<Appended>, StoreError> {
    let mut names: Vec<&str> = messages.iter().map(|m| &*m.channel).collect();
    names.sort_unstable();
    names.dedup();
    let mut tx = pool.begin().await?;
    sqlx::query(
        r#"
        SELECT pg_advisory_xact_lock(k) FROM (
            SELECT DISTINCT hashtextextended(name, 7243) AS k FROM unnest($1::text[]) AS name
            ORDER BY k
        ) AS keys
        "#,
    )
    .bind(&names)
    .execute(&mut *tx)
    .await?;
    // Every later batch of these channels now queues behind this one.
    ordered();
    // A new statement after the locks, so its snapshot sees every commit made before them.
    let rows = sqlx::query(
        r#"
        SELECT q.name, c.last_offset, COALESCE(f.floor, 0) AS floor, now() AS now,
               (SELECT generation FROM webhook_generation) AS hooks_generation
        FROM unnest($1::text[]) AS q(name)
        LEFT JOIN channels c ON c.name = q.name
        LEFT JOIN channel_floors f ON f.bucket = channel_bucket(q.name)
        "#,
    )
    .bind(&names)
    .fetch_all(&mut *tx)
    .await?;
    let mut lookup = Prefetched::default();
    let mut now = Utc::now();
    let mut generation = 0;
    for row in rows {
        let name: String = row.try_get("name")?;
        let last: Option<i64> = row.try_get("last_offset")?;
        let floor: i64 = row.try_get("floor")?;
        now = row.try_get("now")?;
        generation = row.try_get("hooks_generation")?;
        lookup
            .channels
            .insert(name, (last.unwrap_or(floor), last.is_some()));
    }
    if rules.max_channels > 0 {
        let creators: Vec<&str> = messages
            .iter()
            .filter(|m| lookup.channels.get(&*m.channel).is_some_and(|c| !c.1))
            .map(|m| &*m.creator)
            .collect();
        if !creators.is_empty() {
            let rows = sqlx::query(
                "SELECT created_by, count(*) AS n FROM channels WHERE created_by = ANY($1) \
                 GROUP BY created_by",
            )
            .bind(&creators)
            .fetch_all(&mut *tx)
            .await?;
            for row in rows {
                let n: i64 = row.try_get("n")?;
                lookup
                    .created
                    .insert(row.try_get("created_by")?, n.unsigned_abs());
            }
        }
    }
    let keyed: Vec<usize> = (0..messages.len())
        .filter(|&i| messages[i].idempotency_key.is_some())
        .collect();
    if !keyed.is_empty() {
        let rows = sqlx::query(
            r#"
            SELECT q.i, m."offset", m.created_at, m.data = q.data::jsonb AS same
            FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[]) AS q(i, channel, key, data)
            CROSS JOIN LATERAL (
                SELECT "offset", created_at, data FROM messages
                WHERE channel = q.channel AND idempotency_key = q.key
                  AND created_at > now() - $5 * interval '1 millisecond'
                ORDER BY "offset" DESC LIMIT 1
            ) AS m
            "#,
        )
        .bind(keyed.iter().map(|&i| i as i64).collect::<Vec<_>>())
        .bind(
            keyed
                .iter()
                .map(|&i| &*messages[i].channel)
                .collect::<Vec<_>>(),
        )
        .bind(
            keyed
                .iter()
                .map(|&i| messages[i].idempotency_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            keyed
                .iter()
                .map(|&i| messages[i].data.get())
                .collect::<Vec<_>>(),
        )
        .bind(i64::try_from(rules.idempotency_window.as_millis()).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let index: i64 = row.try_get("i")?;
            let earlier = Earlier {
                offset: row.try_get("offset")?,
                created_at: row.try_get("created_at")?,
                same_data: row.try_get("same")?,
            };
            lookup.earlier.insert(index as usize, earlier);
        }
    }
    let plan = batch::plan(messages, group_sizes, &lookup, rules, now);
    let mut deliveries = 0;
    if !plan.rows.is_empty() {
        let matcher = outbox::matcher_at(&mut tx, hooks, generation).await?;
        // (webhook, row of the plan) for every stored message and webhook it goes to.
        let hooked: Vec<(&str, usize)> = if matcher.is_empty() {
            Vec::new()
        } else {
            plan.rows
                .iter()
                .enumerate()
                .flat_map(|(row, &(i, _))| {
                    matcher
                        .matching(&messages[i].channel)
                        .into_iter()
                        .map(move |w| (w, row))
                })
                .collect()
        };
        deliveries = hooked.len();
        write(&mut tx, messages, &plan, &hooked).await?;
    }
    tx.commit().await?;
    if deliveries > 0 {
        hooks.wake();
    }
    Ok(plan.outcomes)
}

/// What both write statements start with: the channels' new last offsets (existing ones only
/// from the offset the plan read) and the messages.
macro_rules! write_channels_and_messages {
    () => {
        r#"
        WITH updated AS (
            UPDATE channels c SET last_offset = u.last_offset
            FROM unnest($1::text[], $2::int8[], $3::int8[]) AS u(name, previous, last_offset)
            WHERE c.name = u.name AND c.last_offset = u.previous
            RETURNING 1
        ), created AS (
            INSERT INTO channels (name, last_offset, created_by)
            SELECT * FROM unnest($4::text[], $5::int8[], $6::text[])
            ON CONFLICT (name) DO NOTHING
            RETURNING 1
        ), inserted AS (
            INSERT INTO messages (channel, "offset", data, idempotency_key)
            SELECT m.channel, m.o, m.data::jsonb, m.key
            FROM unnest($7::text[], $8::int8[], $9::text[], $10::text[]) AS m(channel, o, data, key)
"#
    };
}

/// The write statement of a batch without webhook deliveries...
const WRITE: &str = concat!(
    write_channels_and_messages!(),
    r#"
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM updated) AS updated, (SELECT count(*) FROM created) AS created
        "#
);

/// ...and with them: each delivery copies its message's stored row (data as `jsonb` stored it,
/// `created_at` as `published_at`), found by (channel, offset) among the rows just inserted.
const WRITE_WITH_DELIVERIES: &str = concat!(
    write_channels_and_messages!(),
    r#"
            RETURNING channel, "offset", data, created_at
        ), delivered AS (
            INSERT INTO webhook_deliveries (id, webhook_id, channel, message_offset, data, published_at)
            SELECT gen_random_uuid(), h.webhook, i.channel, i."offset", i.data, i.created_at
            FROM unnest($11::text[], $12::text[], $13::int8[]) AS h(webhook, channel, o)
            JOIN inserted i ON i.channel = h.channel AND i."offset" = h.o
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM updated) AS updated, (SELECT count(*) FROM created) AS created,
               (SELECT count(*) FROM delivered) AS delivered
        "#
);

/// The one write statement of a batch; `hooked` lists (webhook, index into `plan.rows`).
async fn write(
    conn: &mut PgConnection,
    messages: &[NewMessage],
    plan: &batch::Plan,
    hooked: &[(&str, usize)],
) -> Result<(), StoreError> {
    let (existing, new): (Vec<_>, Vec<_>) =
        plan.channels.iter().partition(|c| c.previous.is_some());
    let statement = if hooked.is_empty() {
        WRITE
    } else {
        WRITE_WITH_DELIVERIES
    };
    let query = sqlx::query(statement)
        .bind(existing.iter().map(|c| &*c.name).collect::<Vec<_>>())
        .bind(existing.iter().map(|c| c.previous).collect::<Vec<_>>())
        .bind(existing.iter().map(|c| c.last_offset).collect::<Vec<_>>())
        .bind(new.iter().map(|c| &*c.name).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.last_offset).collect::<Vec<_>>())
        .bind(new.iter().map(|c| &*c.creator).collect::<Vec<_>>())
        .bind(
            plan.rows
                .iter()
                .map(|&(i, _)| &*messages[i].channel)
                .collect::<Vec<_>>(),
        )
        .bind(plan.rows.iter().map(|&(_, o)| o).collect::<Vec<_>>())
        .bind(
            plan.rows
                .iter()
                .map(|&(i, _)| messages[i].data.get())
                .collect::<Vec<_>>(),
        )
        .bind(
            plan.rows
                .iter()
                .map(|&(i, _)| messages[i].idempotency_key.as_deref())
                .collect::<Vec<_>>(),
        );
    let query = if hooked.is_empty() {
        query
    } else {
        query
            .bind(hooked.iter().map(|&(w, _)| w).collect::<Vec<_>>())
            .bind(
                hooked
                    .iter()
                    .map(|&(_, row)| &*messages[plan.rows[row].0].channel)
                    .collect::<Vec<_>>(),
            )
            .bind(
                hooked
                    .iter()
                    .map(|&(_, row)| plan.rows[row].1)
                    .collect::<Vec<_>>(),
            )
    };
    let row = query.fetch_one(&mut *conn).await?;
    let updated: i64 = row.try_get("updated")?;
    let created: i64 = row.try_get("created")?;
    if updated.unsigned_abs() as usize != existing.len()
        || created.unsigned_abs() as usize != new.len()
    {
        return Err(StoreError::Contended);
    }
    if !hooked.is_empty() {
        let delivered: i64 = row.try_get("delivered")?;
        if delivered.unsigned_abs() as usize != hooked.len() {
            return Err(StoreError::Corrupt(format!(
                "{} webhook deliveries written of {}",
                delivered,
                hooked.len()
            )));
        }
    }
    Ok(())
}

/// What [`try_append_batch`] read, for [`batch::plan`].
#[derive(Debug, Default)]
struct Prefetched {
    channels: HashMap<String, (i64, bool)>,
    created: HashMap<String, u64>,
    earlier: HashMap<usize, Earlier>,
}

impl batch::Lookup for Prefetched {
    fn channel(&self, name: &str) -> (i64, bool) {
        self.channels.get(name).copied().unwrap_or((0, false))
    }

    fn created_by(&self, creator: &str) -> u64 {
        self.created.get(creator).copied().unwrap_or(0)
    }

    fn earlier(&self, index: usize, _: &NewMessage) -> Option<Earlier> {
        self.earlier.get(&index).copied()
    }
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
/// moves `last_offset` past the floor, and the channel stays. A channel whose lock a publish
/// batch holds ([`append_batch`]) is skipped, never waited for: retention and publishing then
/// never lock the same rows in opposite orders.
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
        AND pg_try_advisory_xact_lock(hashtextextended(c.name, 7243))
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

/// The size of history: every replica shares it, so each reports the same numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistorySize {
    pub messages: i64,
    pub channels: i64,
    pub bytes: i64,
}

/// Counting rows on every scrape would scan the tables, so the counts are the planner's
/// statistics (`pg_class.reltuples`, kept current by autovacuum's analyse), exact only while a
/// table has never been analysed (`reltuples` < 0; a new, small table); the size on disk
/// (`pg_total_relation_size`: heap, TOAST and indexes) is always current. Catalog lookups only.
pub async fn history_size(pool: &PgPool) -> Result<HistorySize, StoreError> {
    let (messages, channels, bytes): (i64, i64, i64) = sqlx::query_as(
        r#"
        SELECT
            CASE WHEN m.reltuples < 0 THEN (SELECT count(*) FROM messages)
                 ELSE m.reltuples::bigint END,
            CASE WHEN c.reltuples < 0 THEN (SELECT count(*) FROM channels)
                 ELSE c.reltuples::bigint END,
            pg_total_relation_size(m.oid)
        FROM pg_class m, pg_class c
        WHERE m.oid = 'messages'::regclass AND c.oid = 'channels'::regclass
        "#,
    )
    .fetch_one(pool)
    .await?;
    Ok(HistorySize {
        messages,
        channels,
        bytes,
    })
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
