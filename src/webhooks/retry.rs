//! The retry policy, without I/O: what an attempt's outcome means (delivered, retry, or final)
//! and how long to wait before the next attempt.
//!
//! Retried: network errors and timeouts, `5xx`, `408` and `429`. Final: every other status
//! outside `2xx` (the receiver understood and refused; sending the same request again cannot
//! change its mind), `3xx` included, since redirects are not followed. The wait is exponential
//! with jitter (`min · 2^(n-1)`, capped at `max`, then drawn from its upper half so replicas and
//! endpoints do not retry in lockstep), and at least what a `Retry-After` header asks, up to
//! `max`.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// What one attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Worth another attempt, no sooner than `after` if the receiver said so.
    Retry {
        after: Option<Duration>,
    },
    Final,
}

/// The verdict on an HTTP status, with the response's `Retry-After` if any.
pub fn classify(status: u16, retry_after: Option<&str>, now: DateTime<Utc>) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        408 | 429 | 500..=599 => Verdict::Retry {
            after: retry_after.and_then(|v| parse_retry_after(v, now)),
        },
        _ => Verdict::Final,
    }
}

/// `Retry-After`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3). A date in the past is no
/// wait; anything unparsable is ignored.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let date = DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (date.with_timezone(&Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

/// The retry schedule of `webhooks.retry_min_delay` / `retry_max_delay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait after failed attempt number `attempt` (1 for the first), with `jitter` drawn
    /// uniformly from `[0, 1)`, at least `retry_after`; never more than `max`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(32);
        let ceiling = self
            .min
            .saturating_mul(1u32 << exponent.min(31))
            .min(self.max);
        let jitter = jitter.clamp(0.0, 1.0);
        let drawn = ceiling.mul_f64(0.5 + jitter / 2.0);
        drawn.max(retry_after.unwrap_or_default()).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn statuses() {
        assert_eq!(classify(200, None, now()), Verdict::Delivered);
        assert_eq!(classify(204, None, now()), Verdict::Delivered);
        for retried in [408, 429, 500, 502, 503, 504, 599] {
            assert!(
                matches!(classify(retried, None, now()), Verdict::Retry { .. }),
                "{retried}"
            );
        }
        for last in [301, 302, 307, 400, 401, 403, 404, 409, 410, 413, 422] {
            assert_eq!(classify(last, None, now()), Verdict::Final, "{last}");
        }
        assert_eq!(
            classify(429, Some("7"), now()),
            Verdict::Retry {
                after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            classify(503, Some("Thu, 01 Jan 2026 00:00:30 GMT"), now()),
            Verdict::Retry {
                after: Some(Duration::from_secs(30))
            }
        );
        assert_eq!(
            parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now()),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now()), None);
        assert_eq!(parse_retry_after("-1", now()), None);
    }

    #[test]
    fn the_schedule_doubles_up_to_the_cap() {
        let b = Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        // Without jitter's upper half: the lower bound of each step.
        let lows: Vec<u64> = (1..=9)
            .map(|n| b.delay(n, None, 0.0).as_millis() as u64)
            .collect();
        assert_eq!(
            lows,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(b.delay(40, None, 0.999_999).as_secs(), 59);
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(20)), 0.0),
            Duration::from_secs(20)
        );
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(3600)), 0.0),
            Duration::from_secs(60)
        );
    }

    proptest! {
        /// Every wait is within [min/2, max] (or exactly `max` when Retry-After asks more), at
        /// least Retry-After up to the cap, and its ceiling never shrinks as attempts grow.
        #[test]
        fn delays_are_bounded_and_grow(
            min_ms in 1u64..10_000, extra_ms in 0u64..1_000_000, attempt in 1u32..200,
            jitter in 0.0f64..1.0, after in proptest::option::of(0u64..10_000_000),
        ) {
            let b = Backoff { min: Duration::from_millis(min_ms), max: Duration::from_millis(min_ms + extra_ms) };
            let after = after.map(Duration::from_millis);
            let d = b.delay(attempt, after, jitter);
            prop_assert!(d <= b.max);
            prop_assert!(d >= (b.min / 2).min(b.max));
            if let Some(after) = after {
                prop_assert!(d >= after.min(b.max));
            }
            prop_assert!(b.delay(attempt + 1, None, 0.999) >= b.delay(attempt, None, 0.0));
        }
    }
}
