//! Webhook request signatures: `X-Relay-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` over
//! `"<t>.<raw body>"` with the webhook's secret.
//!
//! The timestamp is part of what is signed, so a receiver that checks it against its clock (a
//! few minutes' tolerance) rejects a captured request replayed later; the signature covers the
//! exact bytes sent, so the receiver must verify the raw body before parsing it. [`verify`] is
//! what a receiver does; relay uses it in tests and docs/webhooks.md shows the same steps in
//! Rust, Python and Node.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-relay-signature";
/// The header carrying the delivery id (the same on every attempt: the idempotency key).
pub const DELIVERY_HEADER: &str = "x-relay-delivery";

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length, so this cannot fail; an empty key is refused at
    // validation, long before here.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| <HmacSha256 as KeyInit>::new_from_slice(&[0]).expect("1-byte key"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `X-Relay-Signature` value for `body` sent at `timestamp` (Unix seconds).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let digest = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(digest))
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the header is not `t=<seconds>,v1=<hex>`")]
    Malformed,
    #[error("the timestamp is {0} s away from now, beyond the tolerance")]
    Stale(i64),
    #[error("no v1 signature matches")]
    Mismatch,
}

/// Check a signature header as a receiver should: the format, the timestamp within
/// `tolerance_secs` of `now`, and a constant-time comparison of any `v1=` value (several may be
/// present while a secret is rotated).
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => {
                timestamp = Some(t.parse::<i64>().map_err(|_| SignatureError::Malformed)?)
            }
            Some(("v1", v)) => {
                candidates.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?)
            }
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if candidates.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let skew = now.saturating_sub(timestamp);
    if skew.saturating_abs() > tolerance_secs {
        return Err(SignatureError::Stale(skew));
    }
    let ok = candidates
        .iter()
        .any(|c| mac(secret, timestamp, body).verify_slice(c).is_ok());
    if ok {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The fixed vector docs/webhooks.md and the Python and Node snippet tests use.
    pub const VECTOR_SECRET: &str = "whsec-test-0123456789abcdef";
    pub const VECTOR_BODY: &str = r#"{"channel":"orders:1","id":7,"data":{"total":42},"published_at":"2026-01-01T00:00:00Z"}"#;
    pub const VECTOR_TIMESTAMP: i64 = 1_767_225_600;

    #[test]
    fn known_vector() {
        let header = sign(
            VECTOR_SECRET.as_bytes(),
            VECTOR_TIMESTAMP,
            VECTOR_BODY.as_bytes(),
        );
        assert_eq!(
            header,
            "t=1767225600,v1=".to_owned() + &expected_hex(),
            "the documented vector changed"
        );
        // docs/webhooks.md's Rust snippet checks this very header (a doctest).
        assert_eq!(
            header,
            "t=1767225600,v1=a1201e12fb3deb526139214e812311f059276582c47d85dccc286246edab8cf5"
        );
    }

    /// Computed independently of `sign`: HMAC-SHA256 of `"<t>.<body>"`.
    fn expected_hex() -> String {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(VECTOR_SECRET.as_bytes()).unwrap();
        mac.update(format!("{VECTOR_TIMESTAMP}.{VECTOR_BODY}").as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn verification_rejects_tampering_staleness_and_garbage() {
        let secret = b"a-secret-of-sixteen+";
        let body = br#"{"a":1}"#;
        let header = sign(secret, 1000, body);
        assert_eq!(verify(secret, &header, body, 1000, 300), Ok(()));
        assert_eq!(verify(secret, &header, body, 1299, 300), Ok(()));
        assert_eq!(
            verify(secret, &header, body, 1301, 300),
            Err(SignatureError::Stale(301))
        );
        assert_eq!(
            verify(secret, &header, br#"{"a":2}"#, 1000, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"another-secret-16b", &header, body, 1000, 300),
            Err(SignatureError::Mismatch)
        );
        for bad in ["", "t=1000", "v1=00", "t=x,v1=00", "t=1000,v1=zz"] {
            assert_eq!(
                verify(secret, bad, body, 1000, 300),
                Err(SignatureError::Malformed),
                "{bad:?}"
            );
        }
        // Rotation: an old and a new signature side by side; either secret verifies.
        let new = sign(b"new-secret-sixteen", 1000, body);
        let rotated = format!("{header},{}", new.trim_start_matches("t=1000,"));
        assert_eq!(verify(secret, &rotated, body, 1000, 300), Ok(()));
        assert_eq!(
            verify(b"new-secret-sixteen", &rotated, body, 1000, 300),
            Ok(())
        );
    }

    proptest! {
        /// What relay signs verifies with the same secret and body, and with nothing else.
        #[test]
        fn sign_then_verify(
            secret in proptest::collection::vec(any::<u8>(), 1..64),
            body in proptest::collection::vec(any::<u8>(), 0..256),
            t in 0i64..4_000_000_000,
            flip in any::<usize>(),
        ) {
            let header = sign(&secret, t, &body);
            prop_assert_eq!(verify(&secret, &header, &body, t, 0), Ok(()));
            if !body.is_empty() {
                let mut other = body.clone();
                let i = flip % other.len();
                other[i] ^= 1;
                prop_assert_eq!(verify(&secret, &header, &other, t, 0), Err(SignatureError::Mismatch));
            }
        }
    }
}
