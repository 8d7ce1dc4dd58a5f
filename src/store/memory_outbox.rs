//! The webhook outbox of embedded mode: webhooks and deliveries in this process, under the
//! memory log's lock, so a message and its deliveries are recorded at once (as in Postgres,
//! where they share a transaction). The claim, lease, retry and dead rules are Postgres's
//! ([`super::outbox`]); everything is lost on restart, and configured webhooks come back with
//! the configuration.
//!
//! Bounded: at most `webhooks.memory_capacity` deliveries (pending and dead) are kept. Beyond,
//! a new delivery is dropped and counted in
//! `relay_webhook_deliveries_dropped_total{reason="outbox_full"}`: refusing the publish instead
//! would let one unreachable endpoint stop publishing for everyone.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use uuid::Uuid;

use super::{
    memory::MemoryLog,
    outbox::{Claimed, CreateError, DeadDelivery, Deleted, Settle, Source, WebhookInfo},
};
use crate::webhooks::{WebhookSpec, matcher::Matcher};

#[derive(Debug, Clone)]
struct MemWebhook {
    info: WebhookInfo,
    secret: String,
    patterns: Vec<crate::auth::permissions::Pattern>,
}

#[derive(Debug, Clone)]
struct MemDelivery {
    webhook_id: String,
    channel: String,
    offset: i64,
    data: Box<RawValue>,
    published_at: DateTime<Utc>,
    dead: bool,
    attempts: u32,
    next_attempt_at: DateTime<Utc>,
    locked_until: Option<DateTime<Utc>>,
    lease: Option<Uuid>,
    last_status: Option<u16>,
    last_error: Option<String>,
    dead_at: Option<DateTime<Utc>>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct MemoryOutbox {
    webhooks: BTreeMap<String, MemWebhook>,
    matcher: Arc<Matcher>,
    deliveries: HashMap<Uuid, MemDelivery>,
    /// Pending, unclaimed deliveries by next attempt.
    due: BTreeSet<(DateTime<Utc>, Uuid)>,
    /// Claimed deliveries by the end of their lease.
    claimed: BTreeSet<(DateTime<Utc>, Uuid)>,
    dead: usize,
    capacity: usize,
}

impl Default for MemoryOutbox {
    fn default() -> Self {
        Self::new(100_000)
    }
}

impl MemoryOutbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            webhooks: BTreeMap::new(),
            matcher: Arc::default(),
            deliveries: HashMap::new(),
            due: BTreeSet::new(),
            claimed: BTreeSet::new(),
            dead: 0,
            capacity: capacity.max(1),
        }
    }

    fn rebuild(&mut self) {
        self.matcher = Arc::new(Matcher::new(
            self.webhooks
                .iter()
                .map(|(id, w)| (id.as_str(), &w.patterns)),
        ));
    }

    /// Record the deliveries of a stored message. Returns how many were recorded.
    pub fn enqueue(
        &mut self,
        channel: &str,
        offset: i64,
        data: &RawValue,
        published_at: DateTime<Utc>,
    ) -> usize {
        if self.matcher.is_empty() {
            return 0;
        }
        let matcher = Arc::clone(&self.matcher);
        let mut recorded = 0;
        for webhook in matcher.matching(channel) {
            if self.deliveries.len() >= self.capacity {
                metrics::counter!("relay_webhook_deliveries_dropped_total", "reason" => "outbox_full")
                    .increment(1);
                continue;
            }
            let id = Uuid::new_v4();
            self.deliveries.insert(
                id,
                MemDelivery {
                    webhook_id: webhook.to_owned(),
                    channel: channel.to_owned(),
                    offset,
                    data: data.to_owned(),
                    published_at,
                    dead: false,
                    attempts: 0,
                    next_attempt_at: published_at,
                    locked_until: None,
                    lease: None,
                    last_status: None,
                    last_error: None,
                    dead_at: None,
                },
            );
            self.due.insert((published_at, id));
            recorded += 1;
        }
        recorded
    }

    fn insert_webhook(&mut self, id: &str, spec: &WebhookSpec, source: Source) -> WebhookInfo {
        let created_at = self
            .webhooks
            .get(id)
            .map_or_else(Utc::now, |w| w.info.created_at);
        let info = WebhookInfo {
            id: id.to_owned(),
            url: spec.url.to_string(),
            channels: spec.channels.clone(),
            timeout: spec.timeout,
            max_attempts: spec.max_attempts,
            source,
            created_at,
        };
        self.webhooks.insert(
            id.to_owned(),
            MemWebhook {
                info: info.clone(),
                secret: spec.secret.clone(),
                patterns: spec.patterns.clone(),
            },
        );
        info
    }

    fn remove_deliveries_of(&mut self, webhook: &str) {
        let gone: Vec<Uuid> = self
            .deliveries
            .iter()
            .filter(|(_, d)| d.webhook_id == webhook)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: Uuid) -> Option<MemDelivery> {
        let d = self.deliveries.remove(&id)?;
        self.due.remove(&(d.next_attempt_at, id));
        if let Some(until) = d.locked_until {
            self.claimed.remove(&(until, id));
        }
        if d.dead {
            self.dead -= 1;
        }
        Some(d)
    }

    /// Take a claimed delivery out of the claimed set if `lease` still holds it.
    fn unclaim(&mut self, id: Uuid, lease: Uuid) -> Option<&mut MemDelivery> {
        let d = self.deliveries.get_mut(&id)?;
        if d.lease != Some(lease) {
            return None;
        }
        if let Some(until) = d.locked_until.take() {
            self.claimed.remove(&(until, id));
        }
        d.lease = None;
        Some(d)
    }
}

impl MemoryLog {
    pub fn create_webhook(
        &self,
        id: &str,
        spec: &WebhookSpec,
        source: Source,
        max: usize,
    ) -> Result<WebhookInfo, CreateError> {
        let mut inner = self.lock();
        let outbox = &mut inner.outbox;
        if outbox.webhooks.len() >= max {
            return Err(CreateError::Limit(outbox.webhooks.len()));
        }
        let info = outbox.insert_webhook(id, spec, source);
        outbox.rebuild();
        Ok(info)
    }

    pub fn sync_configured(&self, configured: &[(String, WebhookSpec)]) {
        let mut inner = self.lock();
        let outbox = &mut inner.outbox;
        let stale: Vec<String> = outbox
            .webhooks
            .iter()
            .filter(|(id, w)| {
                w.info.source == Source::Config && !configured.iter().any(|(c, _)| c == *id)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            outbox.webhooks.remove(&id);
            outbox.remove_deliveries_of(&id);
        }
        for (id, spec) in configured {
            outbox.insert_webhook(id, spec, Source::Config);
        }
        outbox.rebuild();
    }

    pub fn list_webhooks(&self, id: Option<&str>) -> Vec<WebhookInfo> {
        let inner = self.lock();
        let mut list: Vec<WebhookInfo> = inner
            .outbox
            .webhooks
            .values()
            .filter(|w| id.is_none_or(|id| w.info.id == id))
            .map(|w| w.info.clone())
            .collect();
        list.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        list
    }

    pub fn delete_webhook(&self, id: &str) -> Deleted {
        let mut inner = self.lock();
        let outbox = &mut inner.outbox;
        match outbox.webhooks.get(id).map(|w| w.info.source) {
            None => Deleted::NotFound,
            Some(Source::Config) => Deleted::Configured,
            Some(Source::Api) => {
                outbox.webhooks.remove(id);
                outbox.remove_deliveries_of(id);
                outbox.rebuild();
                Deleted::Deleted
            }
        }
    }

    pub fn claim_deliveries(&self, limit: usize, lease: Duration) -> Vec<Claimed> {
        let mut inner = self.lock();
        let outbox = &mut inner.outbox;
        let now = Utc::now();
        // Expired claims are due again, as in Postgres.
        while let Some(&(until, id)) = outbox.claimed.first() {
            if until >= now {
                break;
            }
            outbox.claimed.remove(&(until, id));
            if let Some(d) = outbox.deliveries.get_mut(&id) {
                d.locked_until = None;
                d.lease = None;
                outbox.due.insert((d.next_attempt_at, id));
            }
        }
        let token = Uuid::new_v4();
        let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        let mut claimed = Vec::new();
        while claimed.len() < limit {
            let Some(&(at, id)) = outbox.due.first() else {
                break;
            };
            if at > now {
                break;
            }
            outbox.due.remove(&(at, id));
            let Some(d) = outbox.deliveries.get_mut(&id) else {
                continue;
            };
            let Some(webhook) = outbox.webhooks.get(&d.webhook_id) else {
                continue; // Not reached: deleting a webhook deletes its deliveries.
            };
            d.locked_until = Some(until);
            d.lease = Some(token);
            outbox.claimed.insert((until, id));
            claimed.push(Claimed {
                id,
                webhook_id: d.webhook_id.clone(),
                channel: d.channel.clone(),
                offset: d.offset,
                data: d.data.clone(),
                published_at: d.published_at,
                attempts: d.attempts,
                url: webhook.info.url.clone(),
                secret: webhook.secret.clone(),
                timeout: webhook.info.timeout,
                max_attempts: webhook.info.max_attempts,
                lease: token,
            });
        }
        claimed
    }

    pub fn settle_delivery(&self, claimed: &Claimed, outcome: &Settle) -> bool {
        let mut inner = self.lock();
        let outbox = &mut inner.outbox;
        let now = Utc::now();
        match outcome {
            Settle::Delivered => outbox.remove(claimed.id).is_some(),
            Settle::Retry {
                after,
                status,
                error,
            } => {
                let Some(d) = outbox.unclaim(claimed.id, claimed.lease) else {
                    return false;
                };
                d.attempts += 1;
                d.next_attempt_at =
                    now + chrono::Duration::from_std(*after).unwrap_or(chrono::Duration::MAX);
                d.last_status = *status;
                d.last_error = Some(error.clone());
                let key = (d.next_attempt_at, claimed.id);
                outbox.due.insert(key);
                true
            }
            Settle::Dead { status, error } => {
                let Some(d) = outbox.unclaim(claimed.id, claimed.lease) else {
                    return false;
                };
                d.attempts += 1;
                d.dead = true;
                d.dead_at = Some(now);
                d.last_status = *status;
                d.last_error = Some(error.clone());
                outbox.dead += 1;
                true
            }
        }
    }

    pub fn release_deliveries(&self, claims: &[(Uuid, Uuid)]) -> u64 {
        let mut inner = self.lock();
        let outbox = &mut inner.outbox;
        let mut released = 0;
        for &(id, lease) in claims {
            if let Some(d) = outbox.unclaim(id, lease) {
                let key = (d.next_attempt_at, id);
                outbox.due.insert(key);
                released += 1;
            }
        }
        released
    }

    pub fn outbox_depth(&self) -> (u64, u64) {
        let inner = self.lock();
        let dead = inner.outbox.dead as u64;
        (inner.outbox.deliveries.len() as u64 - dead, dead)
    }

    pub fn dead_deliveries(&self, webhook: &str, limit: i64) -> Vec<DeadDelivery> {
        let inner = self.lock();
        let mut dead: Vec<DeadDelivery> = inner
            .outbox
            .deliveries
            .iter()
            .filter(|(_, d)| d.dead && d.webhook_id == webhook)
            .map(|(id, d)| DeadDelivery {
                id: *id,
                channel: d.channel.clone(),
                offset: d.offset,
                attempts: d.attempts,
                last_status: d.last_status,
                last_error: d.last_error.clone(),
                published_at: d.published_at,
                dead_at: d.dead_at.unwrap_or_default(),
            })
            .collect();
        dead.sort_by_key(|d| (d.dead_at, d.id));
        dead.truncate(usize::try_from(limit).unwrap_or(0));
        dead
    }

    pub fn retry_dead(&self, webhook: &str, delivery: Option<Uuid>) -> u64 {
        let mut inner = self.lock();
        let outbox = &mut inner.outbox;
        let now = Utc::now();
        let mut revived = 0;
        for (id, d) in outbox.deliveries.iter_mut() {
            if d.dead && d.webhook_id == webhook && delivery.is_none_or(|want| want == *id) {
                d.dead = false;
                d.dead_at = None;
                d.attempts = 0;
                d.next_attempt_at = now;
                outbox.due.insert((now, *id));
                revived += 1;
            }
        }
        outbox.dead -= revived;
        if revived > 0 {
            self.wake_outbox();
        }
        revived as u64
    }

    pub fn prune_dead(&self, retention: Duration) -> u64 {
        let mut inner = self.lock();
        let outbox = &mut inner.outbox;
        let cutoff =
            Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let old: Vec<Uuid> = outbox
            .deliveries
            .iter()
            .filter(|(_, d)| d.dead && d.dead_at.is_some_and(|at| at < cutoff))
            .map(|(id, _)| *id)
            .collect();
        for id in &old {
            outbox.remove(*id);
        }
        old.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::tests_support::default_settings, webhooks::RawSpec};

    fn log_with_webhook(capacity: usize) -> MemoryLog {
        let log = MemoryLog::new(100).with_outbox_capacity(capacity);
        let settings = default_settings().webhooks;
        let channels = vec!["c:*".to_owned()];
        let spec = WebhookSpec::parse(
            RawSpec {
                url: "http://127.0.0.1:9/",
                channels: &channels,
                secret: "0123456789abcdef",
                timeout: None,
                max_attempts: Some(2),
            },
            &settings,
        )
        .unwrap();
        log.create_webhook("w", &spec, Source::Api, 10).unwrap();
        log
    }

    fn publish(log: &MemoryLog, channel: &str) {
        let data = RawValue::from_string("1".to_owned()).unwrap();
        log.append(channel, &data, Default::default());
    }

    #[test]
    fn claims_lease_and_settle_under_their_token_only() {
        let log = log_with_webhook(100);
        publish(&log, "c:1");
        publish(&log, "other");
        assert_eq!(log.outbox_depth(), (1, 0), "one matching message");
        let first = log.claim_deliveries(10, Duration::ZERO);
        assert_eq!(first.len(), 1);
        std::thread::sleep(Duration::from_millis(2));
        // The lease passed: another claim takes it, and the first claim's outcome is refused.
        let second = log.claim_deliveries(10, Duration::from_secs(60));
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].id, first[0].id);
        let retry = Settle::Retry {
            after: Duration::ZERO,
            status: Some(500),
            error: "HTTP 500".into(),
        };
        assert!(!log.settle_delivery(&first[0], &retry), "an expired claim");
        assert!(
            log.claim_deliveries(10, Duration::from_secs(60)).is_empty(),
            "still leased"
        );
        assert!(log.settle_delivery(&second[0], &retry));
        let third = log.claim_deliveries(10, Duration::from_secs(60));
        assert_eq!(third[0].attempts, 1);
        // Released: due again at once, attempts unchanged.
        assert_eq!(log.release_deliveries(&[(third[0].id, third[0].lease)]), 1);
        let fourth = log.claim_deliveries(10, Duration::from_secs(60));
        assert_eq!(fourth[0].attempts, 1);
        let dead = Settle::Dead {
            status: Some(400),
            error: "HTTP 400".into(),
        };
        assert!(log.settle_delivery(&fourth[0], &dead));
        assert_eq!(log.outbox_depth(), (0, 1));
        assert_eq!(log.dead_deliveries("w", 10).len(), 1);
        assert_eq!(log.retry_dead("w", None), 1);
        let revived = log.claim_deliveries(10, Duration::from_secs(60));
        assert_eq!(revived[0].attempts, 0, "a fresh budget");
        assert!(log.settle_delivery(&revived[0], &Settle::Delivered));
        assert_eq!(log.outbox_depth(), (0, 0));
    }

    #[test]
    fn a_full_outbox_drops_new_deliveries_and_deletes_go_with_their_webhook() {
        let log = log_with_webhook(2);
        for _ in 0..5 {
            publish(&log, "c:1");
        }
        assert_eq!(log.outbox_depth(), (2, 0), "bounded by the capacity");
        assert_eq!(log.delete_webhook("w"), Deleted::Deleted);
        assert_eq!(log.outbox_depth(), (0, 0));
        assert_eq!(log.delete_webhook("w"), Deleted::NotFound);
        publish(&log, "c:1");
        assert_eq!(log.outbox_depth(), (0, 0), "no webhook, no delivery");
    }
}
