//! The webhook outbox: webhooks, and one delivery per (stored message, matching webhook),
//! recorded by the transaction that stores the message ([`super::messages::append_batch`]
//! inserts them in its write statement; the memory log under its lock), then claimed, sent and
//! settled by the dispatcher ([`crate::dispatcher`]) through [`Outbox`].
//!
//! Postgres is the durable outbox, shared by every replica: claims use `FOR UPDATE SKIP
//! LOCKED` and a lease (`locked_until`), so replicas never send the same claimed delivery at
//! once and a crashed replica's claims return. The memory outbox of embedded mode keeps the
//! same rules in this process, and loses everything on restart.
//!
//! Which webhooks a message goes to is decided in Rust by [`Matcher`], from a cache
//! ([`HookCache`]) that the publish transaction validates against `webhook_generation`, read
//! in the statement that reads the channels: a webhook created or deleted on any replica is
//! seen by the next publish that commits after it, at no extra round trip.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::Notify;
use uuid::Uuid;

use super::{MessageStore, StoreError};
use crate::{
    auth::permissions::Pattern,
    webhooks::{WebhookSpec, matcher::Matcher},
};

/// Where a webhook was defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Api,
    Config,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Config => "config",
        }
    }

    fn parse(s: &str) -> Self {
        if s == "config" {
            Self::Config
        } else {
            Self::Api
        }
    }
}

/// A webhook as listed: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookInfo {
    pub id: String,
    pub url: String,
    pub channels: Vec<String>,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub source: Source,
    pub created_at: DateTime<Utc>,
}

/// A delivery claimed for sending, with what sending it needs.
#[derive(Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub webhook_id: String,
    pub channel: String,
    pub offset: i64,
    pub data: Box<RawValue>,
    pub published_at: DateTime<Utc>,
    /// Attempts made before this one.
    pub attempts: u32,
    pub url: String,
    pub secret: String,
    pub timeout: Duration,
    pub max_attempts: u32,
    /// The claim's token: outcomes are only written while the claim is still this one.
    pub lease: Uuid,
}

impl std::fmt::Debug for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimed")
            .field("id", &self.id)
            .field("webhook_id", &self.webhook_id)
            .field("channel", &self.channel)
            .field("offset", &self.offset)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// How an attempt ended, as the outbox records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Delivered: the delivery is removed.
    Delivered,
    /// Failed, to be attempted again after `after`.
    Retry {
        after: Duration,
        status: Option<u16>,
        error: String,
    },
    /// Failed for good (a final status, or the last attempt): dead.
    Dead { status: Option<u16>, error: String },
}

/// A dead delivery, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadDelivery {
    pub id: Uuid,
    pub channel: String,
    pub offset: i64,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub published_at: DateTime<Utc>,
    pub dead_at: DateTime<Utc>,
}

/// What a delete found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Deleted,
    NotFound,
    /// Defined by configuration: remove it there.
    Configured,
}

/// Why a webhook could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("there are {0} webhooks already (webhooks.max_webhooks)")]
    Limit(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The webhooks a publish matches against, as of a generation of `webhook_generation`, and
/// the dispatcher's wake-up.
#[derive(Debug, Default)]
pub struct HookCache {
    cached: Mutex<Option<(i64, Arc<Matcher>)>>,
    work: Notify,
}

impl HookCache {
    fn get(&self, generation: i64) -> Option<Arc<Matcher>> {
        let cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        cached
            .as_ref()
            .filter(|(g, _)| *g == generation)
            .map(|(_, m)| Arc::clone(m))
    }

    fn put(&self, generation: i64, matcher: Arc<Matcher>) {
        *self.cached.lock().unwrap_or_else(PoisonError::into_inner) = Some((generation, matcher));
    }

    /// Tell the dispatcher there is work (a commit wrote deliveries).
    pub fn wake(&self) {
        self.work.notify_one();
    }
}

/// The matcher of the webhooks visible to `conn` at `generation` (from the cache when it is
/// that generation's).
pub(super) async fn matcher_at(
    conn: &mut PgConnection,
    hooks: &HookCache,
    generation: i64,
) -> Result<Arc<Matcher>, StoreError> {
    if let Some(matcher) = hooks.get(generation) {
        return Ok(matcher);
    }
    // The generation and the webhooks in one statement: one snapshot, so they agree.
    let rows = sqlx::query(
        r#"
        SELECT g.generation, w.id, w.channels
        FROM webhook_generation g LEFT JOIN webhooks w ON true
        ORDER BY w.id
        "#,
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut generation_read = generation;
    let mut hooks_read: Vec<(String, Vec<Pattern>)> = Vec::with_capacity(rows.len());
    for row in rows {
        generation_read = row.try_get("generation")?;
        let id: Option<String> = row.try_get("id")?;
        let channels: Option<Vec<String>> = row.try_get("channels")?;
        if let (Some(id), Some(channels)) = (id, channels) {
            // Written by relay after the same check; an entry that no longer parses (an edit
            // by hand) matches nothing rather than failing every publish.
            let patterns = channels
                .iter()
                .filter_map(|c| Pattern::parse(c).ok())
                .collect();
            hooks_read.push((id, patterns));
        }
    }
    let matcher = Arc::new(Matcher::new(
        hooks_read.iter().map(|(id, ps)| (id.as_str(), ps)),
    ));
    hooks.put(generation_read, Arc::clone(&matcher));
    Ok(matcher)
}

/// The outbox of a store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    store: MessageStore,
    hooks: Arc<HookCache>,
}

impl Outbox {
    pub fn new(store: MessageStore, hooks: Arc<HookCache>) -> Self {
        Self { store, hooks }
    }

    pub fn backend(&self) -> &'static str {
        self.store.backend()
    }

    /// Resolves once a commit wrote deliveries since the last call (or at once if one did).
    pub async fn work(&self) {
        match &self.store {
            MessageStore::Postgres(_) => self.hooks.work.notified().await,
            MessageStore::Memory(log) => log.outbox_work().await,
        }
    }

    /// Create a webhook (`id` given for configured ones) unless `max` exist already.
    pub async fn create(
        &self,
        id: &str,
        spec: &WebhookSpec,
        source: Source,
        max: usize,
    ) -> Result<WebhookInfo, CreateError> {
        match &self.store {
            MessageStore::Postgres(pool) => create(pool, id, spec, source, max).await,
            MessageStore::Memory(log) => log.create_webhook(id, spec, source, max),
        }
    }

    /// Make the configured webhooks exactly `configured`: insert or update each, delete the
    /// configured ones no longer there. Their pending deliveries stay with their ids.
    pub async fn sync_configured(
        &self,
        configured: &[(String, WebhookSpec)],
    ) -> Result<(), StoreError> {
        match &self.store {
            MessageStore::Postgres(pool) => sync_configured(pool, configured).await,
            MessageStore::Memory(log) => {
                log.sync_configured(configured);
                Ok(())
            }
        }
    }

    pub async fn list(&self) -> Result<Vec<WebhookInfo>, StoreError> {
        match &self.store {
            MessageStore::Postgres(pool) => list(pool, None).await,
            MessageStore::Memory(log) => Ok(log.list_webhooks(None)),
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<WebhookInfo>, StoreError> {
        match &self.store {
            MessageStore::Postgres(pool) => Ok(list(pool, Some(id)).await?.pop()),
            MessageStore::Memory(log) => Ok(log.list_webhooks(Some(id)).pop()),
        }
    }

    /// Delete an API webhook and its deliveries.
    pub async fn delete(&self, id: &str) -> Result<Deleted, StoreError> {
        match &self.store {
            MessageStore::Postgres(pool) => delete(pool, id).await,
            MessageStore::Memory(log) => Ok(log.delete_webhook(id)),
        }
    }

    /// Claim up to `limit` due deliveries for `lease`.
    pub async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<Claimed>, StoreError> {
        match &self.store {
            MessageStore::Postgres(pool) => claim(pool, limit, lease).await,
            MessageStore::Memory(log) => Ok(log.claim_deliveries(limit, lease)),
        }
    }

    /// Record how an attempt of a claimed delivery ended. False when the claim had expired and
    /// another replica holds the delivery now (the outcome is then not recorded, except a
    /// success, which always removes it).
    pub async fn settle(&self, claimed: &Claimed, outcome: &Settle) -> Result<bool, StoreError> {
        match &self.store {
            MessageStore::Postgres(pool) => settle(pool, claimed, outcome).await,
            MessageStore::Memory(log) => Ok(log.settle_delivery(claimed, outcome)),
        }
    }

    /// Give claims back unattempted (shutdown): due again at once, for any replica.
    pub async fn release(&self, claims: &[(Uuid, Uuid)]) -> Result<u64, StoreError> {
        if claims.is_empty() {
            return Ok(0);
        }
        match &self.store {
            MessageStore::Postgres(pool) => release(pool, claims).await,
            MessageStore::Memory(log) => Ok(log.release_deliveries(claims)),
        }
    }

    /// Pending and dead deliveries (all replicas' with Postgres).
    pub async fn depth(&self) -> Result<(u64, u64), StoreError> {
        match &self.store {
            MessageStore::Postgres(pool) => depth(pool).await,
            MessageStore::Memory(log) => Ok(log.outbox_depth()),
        }
    }

    /// The oldest `limit` dead deliveries of a webhook.
    pub async fn dead(&self, webhook: &str, limit: i64) -> Result<Vec<DeadDelivery>, StoreError> {
        match &self.store {
            MessageStore::Postgres(pool) => dead(pool, webhook, limit).await,
            MessageStore::Memory(log) => Ok(log.dead_deliveries(webhook, limit)),
        }
    }

    /// Make dead deliveries of a webhook (all, or one) pending again with a fresh budget of
    /// attempts. Returns how many.
    pub async fn retry_dead(
        &self,
        webhook: &str,
        delivery: Option<Uuid>,
    ) -> Result<u64, StoreError> {
        let n = match &self.store {
            MessageStore::Postgres(pool) => retry_dead(pool, webhook, delivery).await?,
            MessageStore::Memory(log) => log.retry_dead(webhook, delivery),
        };
        if n > 0 {
            self.hooks.wake();
        }
        Ok(n)
    }

    /// Delete dead deliveries older than `retention` and deliveries of deleted webhooks.
    pub async fn upkeep(&self, retention: Duration, batch: i64) -> Result<u64, StoreError> {
        match &self.store {
            MessageStore::Postgres(pool) => upkeep(pool, retention, batch).await,
            MessageStore::Memory(log) => Ok(log.prune_dead(retention)),
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn to_u32(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

async fn bump_generation(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("UPDATE webhook_generation SET generation = generation + 1")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn create(
    pool: &PgPool,
    id: &str,
    spec: &WebhookSpec,
    source: Source,
    max: usize,
) -> Result<WebhookInfo, CreateError> {
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    // Serialises creations (and the count they check) across replicas.
    let (count,): (i64,) =
        sqlx::query_as("SELECT (SELECT count(*) FROM webhooks) FROM webhook_generation FOR UPDATE")
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::from)?;
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    if count >= max {
        return Err(CreateError::Limit(count));
    }
    let row = sqlx::query(
        r#"
        INSERT INTO webhooks (id, url, channels, secret, timeout_ms, max_attempts, source)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        RETURNING created_at
        "#,
    )
    .bind(id)
    .bind(spec.url.as_str())
    .bind(&spec.channels)
    .bind(&spec.secret)
    .bind(i32::try_from(spec.timeout.as_millis()).unwrap_or(i32::MAX))
    .bind(i32::try_from(spec.max_attempts).unwrap_or(i32::MAX))
    .bind(source.as_str())
    .fetch_one(&mut *tx)
    .await
    .map_err(StoreError::from)?;
    bump_generation(&mut tx).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(WebhookInfo {
        id: id.to_owned(),
        url: spec.url.to_string(),
        channels: spec.channels.clone(),
        timeout: spec.timeout,
        max_attempts: spec.max_attempts,
        source,
        created_at: row.try_get("created_at").map_err(StoreError::from)?,
    })
}

async fn sync_configured(
    pool: &PgPool,
    configured: &[(String, WebhookSpec)],
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT 1 FROM webhook_generation FOR UPDATE")
        .execute(&mut *tx)
        .await?;
    let ids: Vec<&str> = configured.iter().map(|(id, _)| id.as_str()).collect();
    sqlx::query("DELETE FROM webhooks WHERE source = 'config' AND NOT (id = ANY($1))")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    for (id, spec) in configured {
        sqlx::query(
            r#"
            INSERT INTO webhooks (id, url, channels, secret, timeout_ms, max_attempts, source)
            VALUES ($1, $2, $3, $4, $5, $6, 'config')
            ON CONFLICT (id) DO UPDATE SET url = excluded.url, channels = excluded.channels,
                secret = excluded.secret, timeout_ms = excluded.timeout_ms,
                max_attempts = excluded.max_attempts, source = 'config'
            "#,
        )
        .bind(id)
        .bind(spec.url.as_str())
        .bind(&spec.channels)
        .bind(&spec.secret)
        .bind(i32::try_from(spec.timeout.as_millis()).unwrap_or(i32::MAX))
        .bind(i32::try_from(spec.max_attempts).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await?;
    }
    bump_generation(&mut tx).await?;
    tx.commit().await?;
    Ok(())
}

async fn list(pool: &PgPool, id: Option<&str>) -> Result<Vec<WebhookInfo>, StoreError> {
    let rows = sqlx::query(
        r#"
        SELECT id, url, channels, timeout_ms, max_attempts, source, created_at FROM webhooks
        WHERE $1::text IS NULL OR id = $1
        ORDER BY created_at, id
        "#,
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            let timeout: i32 = row.try_get("timeout_ms")?;
            let source: String = row.try_get("source")?;
            Ok(WebhookInfo {
                id: row.try_get("id")?,
                url: row.try_get("url")?,
                channels: row.try_get("channels")?,
                timeout: Duration::from_millis(u64::from(to_u32(timeout))),
                max_attempts: to_u32(row.try_get("max_attempts")?),
                source: Source::parse(&source),
                created_at: row.try_get("created_at")?,
            })
        })
        .collect()
}

async fn delete(pool: &PgPool, id: &str) -> Result<Deleted, StoreError> {
    let mut tx = pool.begin().await?;
    let source: Option<(String,)> =
        sqlx::query_as("SELECT source FROM webhooks WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    match source {
        None => return Ok(Deleted::NotFound),
        Some((source,)) if source == "config" => return Ok(Deleted::Configured),
        Some(_) => {}
    }
    sqlx::query("DELETE FROM webhooks WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    bump_generation(&mut tx).await?;
    tx.commit().await?;
    // Outside the transaction: a publish that read the webhooks before the delete may still add
    // a delivery; the upkeep sweeps those.
    sqlx::query("DELETE FROM webhook_deliveries WHERE webhook_id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(Deleted::Deleted)
}

async fn claim(pool: &PgPool, limit: usize, lease: Duration) -> Result<Vec<Claimed>, StoreError> {
    let token = Uuid::new_v4();
    let rows = sqlx::query(
        r#"
        WITH due AS (
            SELECT d.id FROM webhook_deliveries d
            WHERE d.state = 'pending' AND d.next_attempt_at <= now()
              AND (d.locked_until IS NULL OR d.locked_until < now())
              AND EXISTS (SELECT 1 FROM webhooks w WHERE w.id = d.webhook_id)
            ORDER BY d.next_attempt_at
            LIMIT $1
            FOR UPDATE OF d SKIP LOCKED
        )
        UPDATE webhook_deliveries d
        SET locked_until = now() + $2 * interval '1 millisecond', lease = $3
        FROM due, webhooks w
        WHERE d.id = due.id AND w.id = d.webhook_id
        RETURNING d.id, d.webhook_id, d.channel, d.message_offset, d.data::text AS data,
                  d.published_at, d.attempts, w.url, w.secret, w.timeout_ms, w.max_attempts
        "#,
    )
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .bind(millis(lease))
    .bind(token)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            let data: String = row.try_get("data")?;
            let timeout: i32 = row.try_get("timeout_ms")?;
            Ok(Claimed {
                id: row.try_get("id")?,
                webhook_id: row.try_get("webhook_id")?,
                channel: row.try_get("channel")?,
                offset: row.try_get("message_offset")?,
                data: RawValue::from_string(data)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                published_at: row.try_get("published_at")?,
                attempts: to_u32(row.try_get("attempts")?),
                url: row.try_get("url")?,
                secret: row.try_get("secret")?,
                timeout: Duration::from_millis(u64::from(to_u32(timeout))),
                max_attempts: to_u32(row.try_get("max_attempts")?),
                lease: token,
            })
        })
        .collect()
}

async fn settle(pool: &PgPool, claimed: &Claimed, outcome: &Settle) -> Result<bool, StoreError> {
    let result = match outcome {
        // Delivered is delivered, whoever holds the claim now.
        Settle::Delivered => {
            sqlx::query("DELETE FROM webhook_deliveries WHERE id = $1")
                .bind(claimed.id)
                .execute(pool)
                .await?
        }
        Settle::Retry {
            after,
            status,
            error,
        } => {
            sqlx::query(
                r#"
                UPDATE webhook_deliveries SET attempts = attempts + 1,
                    next_attempt_at = now() + $3 * interval '1 millisecond',
                    locked_until = NULL, lease = NULL, last_status = $4, last_error = $5
                WHERE id = $1 AND lease = $2
                "#,
            )
            .bind(claimed.id)
            .bind(claimed.lease)
            .bind(millis(*after))
            .bind(status.map(i32::from))
            .bind(error)
            .execute(pool)
            .await?
        }
        Settle::Dead { status, error } => {
            sqlx::query(
                r#"
                UPDATE webhook_deliveries SET attempts = attempts + 1, state = 'dead',
                    dead_at = now(), locked_until = NULL, lease = NULL,
                    last_status = $3, last_error = $4
                WHERE id = $1 AND lease = $2
                "#,
            )
            .bind(claimed.id)
            .bind(claimed.lease)
            .bind(status.map(i32::from))
            .bind(error)
            .execute(pool)
            .await?
        }
    };
    Ok(result.rows_affected() > 0)
}

async fn release(pool: &PgPool, claims: &[(Uuid, Uuid)]) -> Result<u64, StoreError> {
    let (ids, leases): (Vec<Uuid>, Vec<Uuid>) = claims.iter().copied().unzip();
    let result = sqlx::query(
        r#"
        UPDATE webhook_deliveries d SET locked_until = NULL, lease = NULL
        FROM unnest($1::uuid[], $2::uuid[]) AS r(id, lease)
        WHERE d.id = r.id AND d.lease = r.lease
        "#,
    )
    .bind(&ids)
    .bind(&leases)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

async fn depth(pool: &PgPool) -> Result<(u64, u64), StoreError> {
    let row = sqlx::query(
        r#"
        SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
               count(*) FILTER (WHERE state = 'dead') AS dead
        FROM webhook_deliveries
        "#,
    )
    .fetch_one(pool)
    .await?;
    let pending: i64 = row.try_get("pending")?;
    let dead: i64 = row.try_get("dead")?;
    Ok((pending.unsigned_abs(), dead.unsigned_abs()))
}

async fn dead(pool: &PgPool, webhook: &str, limit: i64) -> Result<Vec<DeadDelivery>, StoreError> {
    let rows = sqlx::query(
        r#"
        SELECT id, channel, message_offset, attempts, last_status, last_error, published_at, dead_at
        FROM webhook_deliveries WHERE webhook_id = $1 AND state = 'dead'
        ORDER BY dead_at, id LIMIT $2
        "#,
    )
    .bind(webhook)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            let status: Option<i32> = row.try_get("last_status")?;
            Ok(DeadDelivery {
                id: row.try_get("id")?,
                channel: row.try_get("channel")?,
                offset: row.try_get("message_offset")?,
                attempts: to_u32(row.try_get("attempts")?),
                last_status: status.and_then(|s| u16::try_from(s).ok()),
                last_error: row.try_get("last_error")?,
                published_at: row.try_get("published_at")?,
                dead_at: row
                    .try_get::<Option<DateTime<Utc>>, _>("dead_at")?
                    .unwrap_or_default(),
            })
        })
        .collect()
}

async fn retry_dead(
    pool: &PgPool,
    webhook: &str,
    delivery: Option<Uuid>,
) -> Result<u64, StoreError> {
    let result = sqlx::query(
        r#"
        UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = now(),
            dead_at = NULL, locked_until = NULL, lease = NULL
        WHERE webhook_id = $1 AND state = 'dead' AND ($2::uuid IS NULL OR id = $2)
        "#,
    )
    .bind(webhook)
    .bind(delivery)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

async fn upkeep(pool: &PgPool, retention: Duration, batch: i64) -> Result<u64, StoreError> {
    let result = sqlx::query(
        r#"
        DELETE FROM webhook_deliveries WHERE id IN (
            SELECT d.id FROM webhook_deliveries d
            WHERE (d.state = 'dead' AND d.dead_at < now() - $1 * interval '1 millisecond')
               OR NOT EXISTS (SELECT 1 FROM webhooks w WHERE w.id = d.webhook_id)
            LIMIT $2
        )
        "#,
    )
    .bind(millis(retention))
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}
