//! Authentication: turns a bearer token (a JWT) into the one [`Principal`] every transport
//! checks — the HTTP API, WebSocket and SSE alike.
//!
//! Keys come from configuration and are loaded once ([`Authenticator::from_settings`]): the
//! HS256 shared secret, and RS256/ES256 public keys from PEM or JWKS files. Several keys are
//! live at once and a token's `kid` picks among them, so keys rotate without downtime (add the
//! new key, switch the issuer, remove the old key later). Every key is pinned to one algorithm,
//! so a token can never choose how it is verified (no `alg: none`, no RS256-public-key-as-HS256
//! secret confusion).
//!
//! Permissions are in [`permissions`]: pure matching rules with their own tests. This module
//! depends on `config` and `protocol` only; the session and the HTTP layer depend on it.

pub mod permissions;

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::JwkSet};
use serde::{Deserialize, Serialize};

pub use permissions::{Action, ChannelClaims, Permissions};

use crate::config::{AuthMode, AuthSettings};

/// Why a token was not accepted. The messages are safe to show the client: they name the
/// failed check, never a key or the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a bearer token is required")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token names a key this server does not know (kid `{0}`)")]
    UnknownKey(String),
    #[error("the token's audience or issuer is not accepted")]
    WrongAudienceOrIssuer,
    #[error("the token's claims are invalid: {0}")]
    InvalidClaims(String),
    #[error("the token is invalid")]
    Invalid,
}

/// Why the configured keys could not be loaded (startup and `relay check-config` refuse then).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("auth.key_files: cannot read `{path}`: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("auth.key_files: `{path}` {reason}")]
    Parse { path: String, reason: String },
    #[error("auth.hs256_secret: {0}")]
    Secret(String),
    #[error(
        "auth.mode is `required` but no key is configured: set auth.hs256_secret \
         (APP__AUTH__HS256_SECRET) or auth.key_files"
    )]
    NoKey,
}

/// Who the client is and what it may do, from a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    pub permissions: Permissions,
    /// The `admin` claim: may manage webhooks (`/api/v1/webhooks`). Channel permissions are
    /// separate: an admin token without them can neither publish nor subscribe.
    pub admin: bool,
}

impl Principal {
    pub fn allows(&self, action: Action, channel: &str) -> bool {
        self.permissions.allows(action, channel)
    }

    /// Time left until `exp` (zero once it passed).
    pub fn expires_in(&self) -> Duration {
        Duration::from_secs(self.exp.saturating_sub(now_secs()))
    }
}

/// The claims relay reads (others are ignored). `aud` and `iss` are checked by the JWT library
/// when configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default)]
    pub channels: ChannelClaims,
    /// `"admin": true` grants the webhook API; absent or false does not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

impl Claims {
    /// Turn verified claims into a principal, refusing malformed permission entries.
    pub fn into_principal(self) -> Result<Principal, AuthError> {
        if self.sub.is_empty() {
            return Err(AuthError::InvalidClaims("`sub` is empty".to_owned()));
        }
        let permissions = Permissions::from_claims(&self.channels)
            .map_err(|e| AuthError::InvalidClaims(e.to_string()))?;
        Ok(Principal {
            sub: self.sub,
            exp: self.exp,
            permissions,
            admin: self.admin,
        })
    }
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// The verifier: every configured key plus the checks every token must pass.
pub struct Authenticator {
    mode: AuthMode,
    keys: Vec<Key>,
    /// What `relay token` and the demo sign with (the HS256 secret), if configured.
    signing: Option<(Option<String>, EncodingKey)>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway: u64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key material never prints.
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Load every configured key. Fails naming the file or key that is wrong.
    pub fn from_settings(settings: &AuthSettings) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        let mut signing = None;
        let secret = settings.hs256_secret.expose();
        let kid = (!settings.hs256_kid.is_empty()).then(|| settings.hs256_kid.clone());
        if !secret.is_empty() {
            let key = DecodingKey::from_secret(secret.as_bytes())
                .map_err(|e| KeyError::Secret(e.to_string()))?;
            let enc = EncodingKey::from_secret(secret.as_bytes())
                .map_err(|e| KeyError::Secret(e.to_string()))?;
            keys.push(Key {
                kid: kid.clone(),
                alg: Algorithm::HS256,
                key,
            });
            signing = Some((kid, enc));
        }
        for path in &settings.key_files {
            keys.extend(load_key_file(path)?);
        }
        // Fail closed and loudly: `required` without a key would refuse every client.
        if settings.mode == AuthMode::Required && keys.is_empty() {
            return Err(KeyError::NoKey);
        }
        Ok(Self {
            mode: settings.mode,
            keys,
            signing,
            audience: (!settings.audience.is_empty()).then(|| settings.audience.clone()),
            issuer: (!settings.issuer.is_empty()).then(|| settings.issuer.clone()),
            leeway: settings.leeway.as_secs(),
        })
    }

    /// Whether tokens are checked at all.
    pub fn is_required(&self) -> bool {
        self.mode == AuthMode::Required
    }

    /// Whether this server can sign tokens (an HS256 secret is configured).
    pub fn can_sign(&self) -> bool {
        self.signing.is_some()
    }

    /// Verify a token: signature with a configured key of the token's `kid` and algorithm,
    /// `exp`, `nbf`, `aud`/`iss` when configured, and the permission entries.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.alg == header.alg)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(match header.kid {
                Some(kid) if !self.keys.iter().any(|k| k.kid.as_ref() == Some(&kid)) => {
                    AuthError::UnknownKey(kid.chars().take(64).collect())
                }
                _ => AuthError::Invalid,
            });
        }
        let mut last = AuthError::Invalid;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &self.validation(key.alg)) {
                Ok(data) => return data.claims.into_principal(),
                Err(err) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match err.kind() {
                        K::ExpiredSignature => AuthError::Expired,
                        K::ImmatureSignature => AuthError::NotYetValid,
                        K::InvalidAudience | K::InvalidIssuer => AuthError::WrongAudienceOrIssuer,
                        K::MissingRequiredClaim(c) => {
                            AuthError::InvalidClaims(format!("`{c}` is missing"))
                        }
                        K::InvalidClaimFormat(c) => {
                            AuthError::InvalidClaims(format!("`{c}` has the wrong type"))
                        }
                        K::Json(_) => AuthError::InvalidClaims("not the expected JSON".to_owned()),
                        _ => AuthError::Invalid,
                    };
                    // Only a bad signature is worth trying the next key for; anything else was
                    // decided by claims the next key would verify just the same.
                    if !matches!(err.kind(), K::InvalidSignature) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        // A configured `aud`/`iss` must be present, not merely right when present.
        let mut required = vec!["exp", "sub"];
        required.extend(self.audience.as_ref().map(|_| "aud"));
        required.extend(self.issuer.as_ref().map(|_| "iss"));
        v.set_required_spec_claims(&required);
        v.validate_nbf = true;
        v.leeway = self.leeway;
        match &self.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
        }
        v
    }

    /// Sign an HS256 token with the configured secret (for `relay token` and the demo page).
    /// `None` when no secret is configured.
    pub fn issue(&self, sub: &str, channels: ChannelClaims, ttl: Duration) -> Option<String> {
        self.issue_with(sub, channels, false, ttl)
    }

    /// [`Authenticator::issue`], with the `admin` claim when `admin` is true.
    pub fn issue_with(
        &self,
        sub: &str,
        channels: ChannelClaims,
        admin: bool,
        ttl: Duration,
    ) -> Option<String> {
        let (kid, key) = self.signing.as_ref()?;
        let now = now_secs();
        let claims = Claims {
            sub: sub.to_owned(),
            exp: now + ttl.as_secs().max(1),
            nbf: None,
            iat: Some(now),
            aud: self.audience.clone(),
            iss: self.issuer.clone(),
            channels,
            admin,
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.clone();
        jsonwebtoken::encode(&header, &claims, key).ok()
    }
}

/// Keys of one file: a JWKS (`.json`) or one PEM public key (kid = file stem).
fn load_key_file(path: &Path) -> Result<Vec<Key>, KeyError> {
    let shown = path.display().to_string();
    let text = std::fs::read(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?;
    let parse = |reason: String| KeyError::Parse {
        path: shown.clone(),
        reason,
    };
    if path.extension().is_some_and(|e| e == "json") {
        let set: JwkSet =
            serde_json::from_slice(&text).map_err(|e| parse(format!("is not a JWKS ({e})")))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone();
            let alg = jwk_algorithm(jwk).ok_or_else(|| {
                parse(format!(
                    "key {kid:?}: only RS256, ES256 and HS256 keys are supported"
                ))
            })?;
            let key = DecodingKey::from_jwk(jwk).map_err(|e| parse(format!("key {kid:?}: {e}")))?;
            keys.push(Key { kid, alg, key });
        }
        return Ok(keys);
    }
    let kid = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    let (alg, key) = match DecodingKey::from_ec_pem(&text) {
        Ok(key) => (Algorithm::ES256, key),
        Err(_) => match DecodingKey::from_rsa_pem(&text) {
            Ok(key) => (Algorithm::RS256, key),
            Err(e) => {
                return Err(parse(format!(
                    "is not an EC P-256 or RSA public key PEM ({e})"
                )));
            }
        },
    };
    Ok(vec![Key { kid, alg, key }])
}

/// The algorithm a JWK is used with: its `alg`, or the one relay supports for its key type.
fn jwk_algorithm(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, KeyAlgorithm};
    let alg = match jwk.common.key_algorithm {
        Some(KeyAlgorithm::RS256) => Algorithm::RS256,
        Some(KeyAlgorithm::ES256) => Algorithm::ES256,
        Some(KeyAlgorithm::HS256) => Algorithm::HS256,
        Some(_) => return None,
        None => match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
            _ => return None,
        },
    };
    Some(alg)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    const SECRET: &str = "unit-test-secret-that-is-long-enough";

    fn settings() -> AuthSettings {
        AuthSettings {
            mode: AuthMode::Required,
            hs256_secret: Secret::new(SECRET),
            hs256_kid: String::new(),
            key_files: Vec::new(),
            audience: String::new(),
            issuer: String::new(),
            leeway: Duration::ZERO,
            handshake_timeout: Duration::from_secs(5),
            expiry_warning: Duration::from_secs(30),
        }
    }

    fn sign(claims: &serde_json::Value, secret: &str) -> String {
        let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).unwrap()
    }

    #[test]
    fn issued_tokens_verify_with_their_permissions() {
        let auth = Authenticator::from_settings(&settings()).unwrap();
        let channels = ChannelClaims {
            subscribe: vec!["chat:*".into()],
            publish: vec!["chat:room1".into()],
            history: vec![],
        };
        let token = auth
            .issue("alice", channels, Duration::from_secs(60))
            .unwrap();
        let p = auth.verify(&token).unwrap();
        assert_eq!(p.sub, "alice");
        assert!(p.allows(Action::Subscribe, "chat:x"));
        assert!(p.allows(Action::Publish, "chat:room1"));
        assert!(!p.allows(Action::Publish, "chat:room2"));
        assert!(!p.allows(Action::History, "chat:x"));
    }

    #[test]
    fn claims_are_checked() {
        let auth = Authenticator::from_settings(&settings()).unwrap();
        let now = now_secs();
        let expired = sign(&serde_json::json!({"sub":"a","exp":now - 10}), SECRET);
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
        let early = sign(
            &serde_json::json!({"sub":"a","exp":now + 60,"nbf":now + 30}),
            SECRET,
        );
        assert_eq!(auth.verify(&early), Err(AuthError::NotYetValid));
        let no_sub = sign(&serde_json::json!({"exp":now + 60}), SECRET);
        assert!(matches!(
            auth.verify(&no_sub),
            Err(AuthError::InvalidClaims(_))
        ));
        let bad_pattern = sign(
            &serde_json::json!({"sub":"a","exp":now + 60,"channels":{"subscribe":["a*b"]}}),
            SECRET,
        );
        assert!(matches!(
            auth.verify(&bad_pattern),
            Err(AuthError::InvalidClaims(_))
        ));
        let forged = sign(
            &serde_json::json!({"sub":"a","exp":now + 60}),
            "another-secret-that-is-long-enough!!",
        );
        assert_eq!(auth.verify(&forged), Err(AuthError::Invalid));
        assert_eq!(auth.verify("not.a.token"), Err(AuthError::Invalid));
    }

    #[test]
    fn alg_none_is_refused() {
        let auth = Authenticator::from_settings(&settings()).unwrap();
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(format!(r#"{{"sub":"a","exp":{}}}"#, now_secs() + 60));
        assert_eq!(
            auth.verify(&format!("{header}.{body}.")),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let mut s = settings();
        s.audience = "relay".into();
        s.issuer = "https://issuer.example".into();
        let auth = Authenticator::from_settings(&s).unwrap();
        let exp = now_secs() + 60;
        let good = sign(
            &serde_json::json!({"sub":"a","exp":exp,"aud":"relay","iss":"https://issuer.example"}),
            SECRET,
        );
        assert!(auth.verify(&good).is_ok());
        let wrong_aud = sign(
            &serde_json::json!({"sub":"a","exp":exp,"aud":"other","iss":"https://issuer.example"}),
            SECRET,
        );
        assert_eq!(
            auth.verify(&wrong_aud),
            Err(AuthError::WrongAudienceOrIssuer)
        );
        let wrong_iss = sign(
            &serde_json::json!({"sub":"a","exp":exp,"aud":"relay","iss":"evil"}),
            SECRET,
        );
        assert_eq!(
            auth.verify(&wrong_iss),
            Err(AuthError::WrongAudienceOrIssuer)
        );
    }

    #[test]
    fn debug_hides_keys() {
        let auth = Authenticator::from_settings(&settings()).unwrap();
        assert!(!format!("{auth:?}").contains(SECRET));
    }
}
