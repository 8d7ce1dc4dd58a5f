//! Token-bucket rate limits per client, on `governor`: publishes per WebSocket connection,
//! publishes per token subject, and HTTP requests per client address.
//!
//! Each limit is a bucket of `n` cells refilled at `n` per second, so a client may burst up to
//! one second's worth and then sustain the rate. A limit hit is answered to that client alone —
//! `429` with `Retry-After`, or a `rate_limited` error frame on a connection that stays open — and
//! counted in `relay_rate_limited_total{limit}`. The keyed limiters remember one bucket per key
//! they have seen; [`run_upkeep`] forgets the keys whose bucket is full again, so a scan of random
//! addresses or subjects costs memory only while it lasts.
//!
//! Limits are per replica: with `r` replicas a subject may publish up to `r` times its rate. That
//! bounds what one client can cost each replica, which is what the limits are for.

use std::{net::IpAddr, num::NonZeroU32, sync::Arc, time::Duration};

use governor::{
    DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

use crate::{config::LimitSettings, lifecycle::Lifecycle};

/// How often idle keys are forgotten.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(30);

/// A request refused by a limit: which one, and when a retry can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The config key of the limit (`publish_per_connection`, …), also the metric label.
    pub limit: &'static str,
    pub retry_after: Duration,
}

impl std::fmt::Display for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rate limit `limits.{}` exceeded; retry in {} ms",
            self.limit,
            self.retry_after.as_millis().max(1)
        )
    }
}

/// The shared limiters of one app (per subject, per address) and the quota of per-connection
/// ones.
pub struct RateLimits {
    per_subject: Option<DefaultKeyedRateLimiter<String>>,
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_connection: Option<Quota>,
    clock: DefaultClock,
}

/// One WebSocket connection's publish bucket.
pub struct ConnectionLimiter(DefaultDirectRateLimiter);

fn quota(per_second: u32) -> Option<Quota> {
    NonZeroU32::new(per_second).map(Quota::per_second)
}

fn refused(limit: &'static str, retry_after: Duration) -> Limited {
    metrics::counter!("relay_rate_limited_total", "limit" => limit).increment(1);
    Limited { limit, retry_after }
}

impl RateLimits {
    pub fn new(settings: &LimitSettings) -> Arc<Self> {
        // Every label exists from startup (telemetry::metrics::METRICS lists them), so
        // dashboards show 0 rather than no data.
        Arc::new(Self {
            per_subject: quota(settings.publish_per_subject).map(RateLimiter::keyed),
            per_ip: quota(settings.http_per_ip).map(RateLimiter::keyed),
            per_connection: quota(settings.publish_per_connection),
            clock: DefaultClock::default(),
        })
    }

    /// A bucket for a new WebSocket connection (`None`: the limit is off).
    pub fn connection_limiter(&self) -> Option<ConnectionLimiter> {
        self.per_connection
            .map(|q| ConnectionLimiter(RateLimiter::direct(q)))
    }

    /// One publish by `subject` (`None`: unauthenticated, which this limit does not key; the
    /// per-connection and per-address limits still apply).
    pub fn check_publish(&self, subject: Option<&str>) -> Result<(), Limited> {
        self.check_publishes(subject, 1)
    }

    /// `n` publishes at once (a batch request) by `subject`: all of them, or none. A batch
    /// larger than the burst (one second's worth) can never pass and is refused as such.
    pub fn check_publishes(&self, subject: Option<&str>, n: usize) -> Result<(), Limited> {
        let (Some(limiter), Some(subject)) = (&self.per_subject, subject) else {
            return Ok(());
        };
        let cells =
            NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        match limiter.check_key_n(&subject.to_owned(), cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(refused(
                "publish_per_subject",
                not_until.wait_time_from(self.clock.now()),
            )),
            // Waiting does not help: say so with the longest sensible wait.
            Err(_) => Err(refused("publish_per_subject", Duration::from_secs(1))),
        }
    }

    /// Whether `limits.http_per_ip` is on (callers skip resolving the address otherwise).
    pub fn limits_http(&self) -> bool {
        self.per_ip.is_some()
    }

    /// One HTTP request from `ip`.
    pub fn check_http(&self, ip: IpAddr) -> Result<(), Limited> {
        let Some(limiter) = &self.per_ip else {
            return Ok(());
        };
        limiter
            .check_key(&ip)
            .map_err(|not_until| refused("http_per_ip", not_until.wait_time_from(self.clock.now())))
    }

    /// Forget keys whose bucket has refilled; returns how many keys remain.
    pub fn forget_idle(&self) -> usize {
        let mut tracked = 0;
        if let Some(l) = &self.per_subject {
            l.retain_recent();
            l.shrink_to_fit();
            tracked += l.len();
        }
        if let Some(l) = &self.per_ip {
            l.retain_recent();
            l.shrink_to_fit();
            tracked += l.len();
        }
        tracked
    }
}

impl ConnectionLimiter {
    pub fn check(&self) -> Result<(), Limited> {
        self.0.check().map_err(|not_until| {
            refused(
                "publish_per_connection",
                not_until.wait_time_from(DefaultClock::default().now()),
            )
        })
    }
}

/// Keeps the keyed limiters small until shutdown; the key count is `relay_rate_limit_keys`.
pub async fn run_upkeep(limits: Arc<RateLimits>, lifecycle: Lifecycle) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = lifecycle.cancelled() => return,
            _ = tick.tick() => {
                metrics::gauge!("relay_rate_limit_keys").set(limits.forget_idle() as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(per_connection: u32, per_subject: u32, per_ip: u32) -> LimitSettings {
        LimitSettings {
            publish_per_connection: per_connection,
            publish_per_subject: per_subject,
            http_per_ip: per_ip,
            channels_per_subject: 0,
        }
    }

    #[test]
    fn a_burst_of_the_rate_passes_and_the_next_is_refused_with_a_wait() {
        let limits = RateLimits::new(&settings(3, 2, 1));
        let conn = limits.connection_limiter().unwrap();
        for _ in 0..3 {
            conn.check().unwrap();
        }
        let refused = conn.check().unwrap_err();
        assert_eq!(refused.limit, "publish_per_connection");
        assert!(refused.retry_after > Duration::ZERO);
        assert!(refused.retry_after <= Duration::from_secs(1));

        limits.check_publish(Some("alice")).unwrap();
        limits.check_publish(Some("alice")).unwrap();
        assert!(limits.check_publish(Some("alice")).is_err());
        // One subject's limit never costs another subject anything.
        limits.check_publish(Some("bob")).unwrap();
        // Anonymous publishes are not keyed by subject.
        for _ in 0..10 {
            limits.check_publish(None).unwrap();
        }

        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        limits.check_http(a).unwrap();
        assert_eq!(limits.check_http(a).unwrap_err().limit, "http_per_ip");
        limits.check_http(b).unwrap();
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let limits = RateLimits::new(&settings(0, 0, 0));
        assert!(limits.connection_limiter().is_none());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..1000 {
            limits.check_publish(Some("alice")).unwrap();
            limits.check_http(ip).unwrap();
        }
        assert_eq!(limits.forget_idle(), 0);
    }

    #[test]
    fn refilled_keys_are_forgotten() {
        let limits = RateLimits::new(&settings(0, 1000, 1000));
        for i in 0..100u8 {
            limits.check_http(IpAddr::from([192, 0, 2, i])).unwrap();
            limits.check_publish(Some(&format!("user{i}"))).unwrap();
        }
        // One cell out of 1000/s is back within a few milliseconds.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(limits.forget_idle(), 0);
    }
}
