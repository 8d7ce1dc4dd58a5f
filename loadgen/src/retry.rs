//! `--idempotency`: the per-message key, which failures are worth another attempt, and the
//! backoff between attempts.
//!
//! A retry is only safe with a key: the server then answers a repeat of a committed message with
//! the original (`replayed`), so subscribers never see it twice. Without `--idempotency` a request
//! is tried once, as before. What a failure means for the message's sequence number is decided
//! here too ([`Failure::maybe_committed`]): a message the server may have committed keeps its
//! number, one it surely did not is numbered again.

use std::{fmt::Write, future::Future, time::Duration};

/// First backoff; doubled per attempt up to [`MAX_BACKOFF`], with ±50 % jitter so slots that
/// failed together do not retry together.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A random run id, so keys of two runs on the same channels never collide within relay's
/// idempotency window.
pub fn new_run_id() -> String {
    format!("{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff)
}

/// Append `<run-id>-<channel>-<seq>` to `out`, or `<run-id>-<channel>-w<writer>-<seq>` for one
/// of several writers of the channel (each numbers from 0, so the writer keeps keys unique).
/// Channel names are visible ASCII of at most 128 bytes by validation, so the key is 1–255
/// visible ASCII as relay requires.
pub fn write_key(out: &mut String, run_id: &str, channel: &str, writer: Option<usize>, seq: u64) {
    // Writing to a String cannot fail.
    let _ = match writer {
        Some(w) => write!(out, "{run_id}-{channel}-w{w}-{seq}"),
        None => write!(out, "{run_id}-{channel}-{seq}"),
    };
}

/// Why one attempt did not commit (as far as the client can tell).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The server answered with this status (and the `error.code` of its body, if any).
    Status { status: u16, code: Option<String> },
    /// No answer within --request-timeout: the request may have been committed.
    Timeout,
    /// The connection could not be opened: nothing was sent.
    Connect,
    /// The connection failed while the request was under way: it may have been committed.
    Network(String),
    /// A success status with an answer that does not fit the request: it was committed, but not
    /// as expected.
    BadAnswer(String),
}

impl Failure {
    /// Worth another attempt with the same key: the server may succeed next time.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status >= 500,
            Self::Timeout | Self::Connect | Self::Network(_) => true,
            Self::BadAnswer(_) => false,
        }
    }

    /// The server may have committed the request. An error answer means nothing was stored
    /// (relay commits all or nothing and answers 2xx only after the commit).
    pub fn maybe_committed(&self) -> bool {
        matches!(self, Self::Timeout | Self::Network(_) | Self::BadAnswer(_))
    }

    /// How the report groups it, e.g. `batch: status 503 unavailable`.
    pub fn kind(&self, path: &str) -> String {
        match self {
            Self::Status { status, code } => match code {
                Some(code) => format!("{path}: status {status} {code}"),
                None => format!("{path}: status {status}"),
            },
            Self::Timeout => format!("{path}: timeout"),
            Self::Connect => format!("{path}: cannot connect"),
            Self::Network(err) => format!("{path}: {err}"),
            Self::BadAnswer(what) => format!("{path}: {what}"),
        }
    }
}

/// The wait before attempt `attempt + 1` (attempt counts from 1).
pub fn backoff(attempt: u32) -> Duration {
    let doubled = FIRST_BACKOFF.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    doubled.min(MAX_BACKOFF).mul_f64(0.5 + fastrand::f64())
}

/// What a request achieved over all its attempts.
#[derive(Debug)]
pub struct Attempts<T> {
    pub result: Result<T, Failure>,
    /// Attempts after the first.
    pub retries: u32,
    /// Some attempt may have been committed (so the message's sequence number stays used even
    /// if the last attempt failed).
    pub maybe_committed: bool,
}

/// Run `attempt` until it succeeds, fails for good, or `max_attempts` were made, sleeping
/// [`backoff`] in between. The caller re-sends the same body and key each time.
pub async fn retrying<T, F, Fut>(max_attempts: u32, mut attempt: F) -> Attempts<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut made = 0;
    let mut maybe_committed = false;
    loop {
        made += 1;
        match attempt().await {
            Ok(value) => {
                return Attempts {
                    result: Ok(value),
                    retries: made - 1,
                    maybe_committed: true,
                };
            }
            Err(failure) => {
                maybe_committed |= failure.maybe_committed();
                if made >= max_attempts || !failure.retryable() {
                    return Attempts {
                        result: Err(failure),
                        retries: made - 1,
                        maybe_committed,
                    };
                }
                tokio::time::sleep(backoff(made)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::VecDeque};

    use super::*;

    fn status(status: u16) -> Failure {
        Failure::Status { status, code: None }
    }

    #[test]
    fn keys_are_run_channel_writer_seq() {
        let run = new_run_id();
        assert_eq!(run.len(), 12);
        assert!(run.chars().all(|c| c.is_ascii_hexdigit()), "{run}");
        assert_ne!(run, new_run_id(), "two runs get different ids");
        let mut key = String::new();
        write_key(&mut key, "00ab", "lg-7", None, 42);
        assert_eq!(key, "00ab-lg-7-42");
        key.clear();
        write_key(&mut key, "00ab", "lg-7", Some(3), 42);
        assert_eq!(key, "00ab-lg-7-w3-42");
    }

    #[test]
    fn which_failures_are_retried_and_which_keep_their_number() {
        // (failure, retryable, maybe committed)
        let cases = [
            (status(503), true, false),
            (status(500), true, false),
            (status(429), false, false),
            (status(422), false, false),
            (Failure::Timeout, true, true),
            (Failure::Connect, true, false),
            (Failure::Network("reset".into()), true, true),
            (Failure::BadAnswer("2 items for 3".into()), false, true),
        ];
        for (failure, retryable, maybe) in cases {
            assert_eq!(failure.retryable(), retryable, "{failure:?}");
            assert_eq!(failure.maybe_committed(), maybe, "{failure:?}");
        }
        let unavailable = Failure::Status {
            status: 503,
            code: Some("unavailable".into()),
        };
        assert_eq!(unavailable.kind("batch"), "batch: status 503 unavailable");
        assert_eq!(Failure::Timeout.kind("http"), "http: timeout");
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        for _ in 0..100 {
            let first = backoff(1);
            assert!((10..=30).contains(&first.as_millis()), "{first:?}");
            let third = backoff(3);
            assert!((40..=120).contains(&third.as_millis()), "{third:?}");
            let late = backoff(40);
            assert!((500..=1500).contains(&late.as_millis()), "{late:?}");
        }
    }

    /// Drive [`retrying`] with scripted outcomes; returns the result and how many were used.
    fn run_script(max: u32, script: Vec<Result<u8, Failure>>) -> (Attempts<u8>, usize) {
        let script = RefCell::new(VecDeque::from(script));
        let total = script.borrow().len();
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(err) => panic!("runtime: {err}"),
        };
        let out = rt.block_on(retrying(max, || {
            let next = script.borrow_mut().pop_front();
            async move { next.unwrap_or(Err(Failure::BadAnswer("script ran out".into()))) }
        }));
        let left = script.borrow().len();
        (out, total - left)
    }

    #[test]
    fn retries_until_success_and_remembers_a_possible_commit() {
        let (a, used) = run_script(5, vec![Err(Failure::Timeout), Err(status(503)), Ok(7)]);
        assert_eq!((a.result, a.retries, used), (Ok(7), 2, 3));

        // Timeout then 503 until the attempts run out: failed, but maybe committed by the first.
        let (a, used) = run_script(
            3,
            vec![
                Err(Failure::Timeout),
                Err(status(503)),
                Err(status(503)),
                Ok(1),
            ],
        );
        assert_eq!((a.result, a.retries, used), (Err(status(503)), 2, 3));
        assert!(a.maybe_committed);

        // Only error answers: surely not committed.
        let (a, _) = run_script(2, vec![Err(status(503)), Err(status(503))]);
        assert!(!a.maybe_committed);

        // A refusal is final at once.
        let (a, used) = run_script(5, vec![Err(status(422)), Ok(1)]);
        assert_eq!((a.result, a.retries, used), (Err(status(422)), 0, 1));

        // One attempt without --idempotency.
        let (a, used) = run_script(1, vec![Err(Failure::Timeout), Ok(1)]);
        assert_eq!((a.retries, used), (0, 1));
        assert!(a.result.is_err());
    }
}
