//! The webhook dispatcher: claims due deliveries from the outbox ([`crate::store::outbox`]),
//! sends each as a signed POST with the one HTTP client built at startup, and records the
//! outcome (delivered, retry later, or dead) under its claim.
//!
//! * **Bounded**: a semaphore of `webhooks.max_in_flight` permits. A delivery is claimed only
//!   with a free permit in hand, so nothing waits in memory: what is not in flight stays in the
//!   outbox, where every replica can take it. The dispatcher claims when a quarter of the
//!   permits are free (or none is in flight), so a busy replica makes one claim per several
//!   deliveries rather than one per delivery.
//! * **Shared outbox**: each claim leases its rows (`webhooks.lease`); another replica takes a
//!   delivery only once the lease passed, so a crashed replica's deliveries are retried, and an
//!   outcome is recorded only while its claim still holds.
//! * **Owned**: the dispatcher runs under the [`Lifecycle`] (critical: if it dies, the process
//!   exits and is restarted), and each delivery is a task of the lifecycle's tracker that the
//!   dispatcher watches. On shutdown it stops claiming, gives in-flight deliveries until just
//!   before `shutdown.drain_timeout`, then aborts the rest and releases their claims, so another
//!   replica (or this one, restarted) sends them without waiting out the lease.
//! * **Woken** by local commits that wrote deliveries, otherwise polling every
//!   `webhooks.poll_interval` (deliveries published on other replicas, retries coming due).
//!
//! Delivery is at least once: a request that reached the receiver can be sent again if its
//! outcome was not recorded (timeout, crash, lease lost). `X-Relay-Delivery` is the same on
//! every attempt, so receivers deduplicate on it. See docs/webhooks.md.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use futures_util::{StreamExt, stream::FuturesUnordered};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    task::AbortHandle,
};
use uuid::Uuid;

use crate::{
    config::Settings,
    lifecycle::Lifecycle,
    store::outbox::{Claimed, Outbox, Settle},
    webhooks::{
        retry::{Backoff, Verdict, classify},
        signature,
        ssrf::{GuardedResolver, HostCheck, HostPolicy},
    },
};

/// How often the queue-depth gauges are refreshed (a count over the outbox).
const DEPTH_INTERVAL: Duration = Duration::from_secs(5);
/// How often dead deliveries past retention and deliveries of deleted webhooks are swept.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Rows swept per upkeep statement.
const UPKEEP_BATCH: i64 = 1000;
/// Response bytes read (and dropped) so the connection can be reused; the rest is not read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Stored error texts are cut to this.
const MAX_ERROR_LEN: usize = 500;

/// Why the dispatcher could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error("webhooks.allowed_hosts: {0}")]
    Hosts(#[from] crate::webhooks::ssrf::InvalidEntry),
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(String),
}

/// The one HTTP client of the dispatcher: pooled connections, rustls with ring and the Mozilla
/// roots (like Redis and Postgres), the SSRF-checking resolver, no redirects, no proxies from
/// the environment, no retries of its own (the outbox retries).
pub fn client(
    settings: &Settings,
    policy: Arc<HostPolicy>,
) -> Result<reqwest::Client, DispatcherError> {
    let w = &settings.webhooks;
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| DispatcherError::Client(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .retry(reqwest::retry::never())
        .dns_resolver(GuardedResolver {
            policy,
            timeout: w.max_timeout.min(Duration::from_secs(5)),
        })
        .connect_timeout(w.max_timeout.min(Duration::from_secs(5)))
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(w.max_in_flight)
        .user_agent(concat!("relay-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| DispatcherError::Client(e.to_string()))
}

/// What the deliveries share.
struct Shared {
    outbox: Outbox,
    client: reqwest::Client,
    policy: Arc<HostPolicy>,
    backoff: Backoff,
}

/// The dispatcher task's settings.
pub struct Dispatcher {
    shared: Arc<Shared>,
    max_in_flight: usize,
    poll_interval: Duration,
    lease: Duration,
    dead_retention: Duration,
    /// In-flight deliveries get this long after shutdown begins.
    drain: Duration,
}

impl Dispatcher {
    pub fn new(
        outbox: Outbox,
        client: reqwest::Client,
        policy: Arc<HostPolicy>,
        settings: &Settings,
    ) -> Self {
        let w = &settings.webhooks;
        let drain_timeout = settings.shutdown.drain_timeout;
        Self {
            shared: Arc::new(Shared {
                outbox,
                client,
                policy,
                backoff: Backoff {
                    min: w.retry_min_delay,
                    max: w.retry_max_delay,
                },
            }),
            max_in_flight: w.max_in_flight,
            poll_interval: w.poll_interval,
            lease: w.lease,
            dead_retention: w.dead_retention,
            // Leave time for the release statement within the app's drain deadline.
            drain: drain_timeout.saturating_sub(Duration::from_secs(1).min(drain_timeout / 4)),
        }
    }

    /// Run until the lifecycle is cancelled, then drain (see the module documentation).
    pub async fn run(self, lifecycle: Lifecycle) {
        let permits = Arc::new(Semaphore::new(self.max_in_flight));
        // Claim when this many permits are free (or nothing is in flight).
        let claim_at = (self.max_in_flight / 4).max(1);
        let mut in_flight = FuturesUnordered::new();
        // In flight: delivery id → its claim's token and its task.
        let mut claims: HashMap<Uuid, (Uuid, AbortHandle)> = HashMap::new();
        let mut depth_at: Option<Instant> = None;
        let mut upkeep_at = Instant::now() + UPKEEP_INTERVAL;
        let mut store_failing = false;
        loop {
            if lifecycle.is_cancelled() {
                break;
            }
            let free = permits.available_permits();
            let mut claimed_all = false;
            if !store_failing && (free >= claim_at || (in_flight.is_empty() && free > 0)) {
                match self.shared.outbox.claim(free, self.lease).await {
                    Ok(batch) => {
                        claimed_all = batch.len() == free;
                        for claimed in batch {
                            // Claimed for the free permits, which only this loop takes.
                            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                                break;
                            };
                            let (id, lease) = (claimed.id, claimed.lease);
                            let task = lifecycle.spawn(
                                "webhook_delivery",
                                deliver(Arc::clone(&self.shared), claimed, permit),
                            );
                            claims.insert(id, (lease, task.abort_handle()));
                            in_flight.push(async move { (id, task.await) });
                        }
                        let busy = self.max_in_flight - permits.available_permits();
                        metrics::gauge!("relay_webhook_deliveries_in_flight").set(busy as f64);
                    }
                    Err(err) => {
                        metrics::counter!("relay_webhook_store_errors_total").increment(1);
                        tracing::warn!(%err, "claiming webhook deliveries failed; retrying after the poll interval");
                        store_failing = true;
                    }
                }
            }
            if depth_at.is_none_or(|at| at.elapsed() >= DEPTH_INTERVAL) {
                depth_at = Some(Instant::now());
                self.refresh_depth().await;
            }
            if Instant::now() >= upkeep_at {
                upkeep_at = Instant::now() + UPKEEP_INTERVAL;
                match self
                    .shared
                    .outbox
                    .upkeep(self.dead_retention, UPKEEP_BATCH)
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(deleted = n, "webhook outbox upkeep"),
                    Err(err) => tracing::warn!(%err, "webhook outbox upkeep failed"),
                }
            }
            // More may be due at once: claim again as soon as permits free up.
            let poll = if claimed_all && !store_failing {
                Duration::ZERO
            } else {
                self.poll_interval
            };
            tokio::select! {
                biased;
                () = lifecycle.cancelled() => break,
                Some((id, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                    claims.remove(&id);
                    if let Err(err) = outcome {
                        tracing::error!(%err, delivery = %id, "webhook delivery task failed");
                    }
                    metrics::gauge!("relay_webhook_deliveries_in_flight")
                        .set((self.max_in_flight - permits.available_permits()) as f64);
                }
                () = self.shared.outbox.work() => {}
                () = tokio::time::sleep(poll), if poll > Duration::ZERO || in_flight.is_empty() => {
                    store_failing = false;
                }
            }
        }
        self.drain_in_flight(in_flight, claims).await;
        metrics::gauge!("relay_webhook_deliveries_in_flight").set(0.0);
        tracing::debug!("webhook dispatcher stopped");
    }

    /// Shutdown: let in-flight deliveries finish within the drain budget, then abort the rest
    /// and give their claims back.
    async fn drain_in_flight<F>(
        &self,
        mut in_flight: FuturesUnordered<F>,
        mut claims: HashMap<Uuid, (Uuid, AbortHandle)>,
    ) where
        F: std::future::Future<Output = (Uuid, Result<(), tokio::task::JoinError>)>,
    {
        if claims.is_empty() {
            return;
        }
        tracing::info!(in_flight = claims.len(), budget = ?self.drain, "webhook dispatcher draining");
        let deadline = tokio::time::Instant::now() + self.drain;
        while !in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, in_flight.next()).await {
                Ok(Some((id, _))) => {
                    claims.remove(&id);
                }
                Ok(None) | Err(_) => break,
            }
        }
        // Dropping a task's handle does not stop it: abort each, and wait for the aborts, so a
        // request still running cannot record an outcome after its claim was given back.
        for (_, task) in claims.values() {
            task.abort();
        }
        while in_flight.next().await.is_some() {}
        let unfinished: Vec<(Uuid, Uuid)> = claims
            .into_iter()
            .map(|(id, (lease, _))| (id, lease))
            .collect();
        if unfinished.is_empty() {
            return;
        }
        match self.shared.outbox.release(&unfinished).await {
            Ok(n) => {
                metrics::counter!("relay_webhook_deliveries_released_total").increment(n);
                tracing::info!(released = n, "unfinished webhook deliveries released");
            }
            Err(err) => {
                tracing::warn!(%err, "releasing webhook deliveries failed; their leases expire instead")
            }
        }
    }

    async fn refresh_depth(&self) {
        match self.shared.outbox.depth().await {
            Ok((pending, dead)) => {
                metrics::gauge!("relay_webhook_queue_depth").set(pending as f64);
                metrics::gauge!("relay_webhook_dead_deliveries").set(dead as f64);
            }
            Err(err) => tracing::debug!(%err, "webhook queue depth not available"),
        }
    }
}

/// The body of a delivery.
#[derive(Serialize)]
struct Body<'a> {
    channel: &'a str,
    id: i64,
    data: &'a RawValue,
    published_at: chrono::DateTime<Utc>,
}

/// How one attempt went, before the policy judged it.
enum Attempt {
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    Failed {
        reason: &'static str,
        error: String,
    },
    Refused(String),
}

/// One attempt of one delivery, and its outcome recorded.
async fn deliver(shared: Arc<Shared>, claimed: Claimed, _permit: OwnedSemaphorePermit) {
    metrics::counter!("relay_webhook_deliveries_attempted_total").increment(1);
    let started = Instant::now();
    let attempt = send(&shared, &claimed).await;
    metrics::histogram!("relay_webhook_delivery_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    let number = claimed.attempts + 1;
    let last = number >= claimed.max_attempts;
    let (verdict, status, error) = match attempt {
        Attempt::Status {
            status,
            retry_after,
        } => {
            let verdict = classify(status, retry_after.as_deref(), Utc::now());
            (verdict, Some(status), format!("HTTP {status}"))
        }
        Attempt::Failed { reason, error } => {
            metrics::counter!("relay_webhook_deliveries_failed_total", "reason" => reason)
                .increment(1);
            (Verdict::Retry { after: None }, None, error)
        }
        Attempt::Refused(why) => {
            metrics::counter!("relay_webhook_deliveries_failed_total", "reason" => "refused")
                .increment(1);
            (Verdict::Final, None, why)
        }
    };
    if status.is_some() && !matches!(verdict, Verdict::Delivered) {
        metrics::counter!("relay_webhook_deliveries_failed_total", "reason" => "status")
            .increment(1);
    }
    let error: String = error.chars().take(MAX_ERROR_LEN).collect();
    let settle = match verdict {
        Verdict::Delivered => Settle::Delivered,
        Verdict::Retry { after } if !last => Settle::Retry {
            after: shared.backoff.delay(number, after, fastrand::f64()),
            status,
            error,
        },
        Verdict::Retry { .. } | Verdict::Final => Settle::Dead { status, error },
    };
    match shared.outbox.settle(&claimed, &settle).await {
        Ok(recorded) => {
            match &settle {
                Settle::Delivered => {
                    metrics::counter!("relay_webhook_deliveries_succeeded_total").increment(1);
                }
                Settle::Dead { error, .. } if recorded => {
                    metrics::counter!("relay_webhook_deliveries_dead_total").increment(1);
                    tracing::warn!(delivery = %claimed.id, webhook = %claimed.webhook_id, attempts = number, %error, "webhook delivery is dead");
                }
                _ => {}
            }
            if !recorded && settle != Settle::Delivered {
                tracing::debug!(delivery = %claimed.id, "claim expired before the outcome was recorded");
            }
        }
        Err(err) => {
            metrics::counter!("relay_webhook_store_errors_total").increment(1);
            // The lease expires and the delivery is attempted again: at least once.
            tracing::warn!(%err, delivery = %claimed.id, "recording a webhook outcome failed");
        }
    }
}

/// Build, sign and send the request; read a little of the response so the connection can be
/// reused.
async fn send(shared: &Shared, claimed: &Claimed) -> Attempt {
    let url = match url::Url::parse(&claimed.url) {
        Ok(url) => url,
        Err(err) => return Attempt::Refused(format!("invalid URL: {err}")),
    };
    // IP literals never reach the resolver: check them here. Names are checked by it.
    if let HostCheck::Refused(why) = shared.policy.check_host(&url) {
        return Attempt::Refused(why);
    }
    let body = Body {
        channel: &claimed.channel,
        id: claimed.offset,
        data: &claimed.data,
        published_at: claimed.published_at,
    };
    let body = match serde_json::to_vec(&body) {
        Ok(body) => body,
        Err(err) => return Attempt::Refused(format!("cannot encode the body: {err}")),
    };
    // Signed at each attempt, so the timestamp says when this request was sent.
    let signature = signature::sign(claimed.secret.as_bytes(), Utc::now().timestamp(), &body);
    let request = shared
        .client
        .post(url)
        .timeout(claimed.timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(signature::DELIVERY_HEADER, claimed.id.to_string())
        .header(signature::SIGNATURE_HEADER, signature)
        .header("x-relay-attempt", (claimed.attempts + 1).to_string())
        .body(body);
    let mut response = match request.send().await {
        Ok(response) => response,
        Err(err) => return failure(&err),
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut read = 0;
    while read < MAX_RESPONSE_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            // The status is the answer; a body cut short only costs the connection.
            Ok(None) | Err(_) => break,
        }
    }
    Attempt::Status {
        status,
        retry_after,
    }
}

fn failure(err: &reqwest::Error) -> Attempt {
    let reason = if err.is_timeout() {
        "timeout"
    } else {
        "network"
    };
    // The source chain says what failed (refused, reset, DNS, TLS, the SSRF check).
    let mut error = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        error.push_str(": ");
        error.push_str(&inner.to_string());
        source = inner.source();
    }
    Attempt::Failed { reason, error }
}
