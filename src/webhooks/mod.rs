//! Outbound webhooks, the parts without I/O on the store: what a valid webhook is
//! ([`WebhookSpec`]), which webhooks a channel goes to ([`matcher`]), how requests are signed
//! ([`signature`]), where they may go ([`ssrf`]) and when they are retried ([`retry`]).
//!
//! The outbox (a delivery row per matching webhook, written in the publish's transaction) is in
//! [`crate::store::outbox`]; the task that sends deliveries is [`crate::dispatcher`]; the API is
//! `crate::http::webhooks`. This module depends on none of them, so the store can use the
//! matcher without a cycle. The guarantees are in docs/webhooks.md.

pub mod matcher;
pub mod retry;
pub mod signature;
pub mod ssrf;

use std::time::Duration;

use crate::{
    auth::permissions::{InvalidPattern, Pattern},
    config::{Settings, WebhookSettings},
};

/// Longest webhook URL accepted.
pub const MAX_URL_LEN: usize = 2048;
/// Channel patterns one webhook may have.
pub const MAX_PATTERNS: usize = 100;
/// Secret length bounds, in bytes: at least 128 bits of whatever the secret is made of, and
/// short enough to be a secret rather than a payload.
pub const MIN_SECRET_BYTES: usize = 16;
pub const MAX_SECRET_BYTES: usize = 256;
/// Attempts a webhook may ask for.
pub const MAX_ATTEMPTS: u32 = 100;
/// Shortest per-webhook timeout.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);
/// Length of a configured webhook's id.
pub const MAX_ID_LEN: usize = 64;

/// A webhook as created: checked, with defaults applied.
#[derive(Clone)]
pub struct WebhookSpec {
    pub url: url::Url,
    /// As given (deduplicated, in order), and parsed.
    pub channels: Vec<String>,
    pub patterns: Vec<Pattern>,
    pub secret: String,
    pub timeout: Duration,
    pub max_attempts: u32,
}

impl std::fmt::Debug for WebhookSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never prints.
        f.debug_struct("WebhookSpec")
            .field("url", &self.url.as_str())
            .field("channels", &self.channels)
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// What a webhook is made of, unchecked (an API body or a configured endpoint).
#[derive(Debug, Clone, Copy)]
pub struct RawSpec<'a> {
    pub url: &'a str,
    pub channels: &'a [String],
    pub secret: &'a str,
    pub timeout: Option<Duration>,
    pub max_attempts: Option<u32>,
}

/// Why a webhook was refused. The messages name the field and are safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidWebhook {
    #[error("`url` {0}")]
    Url(String),
    #[error("`url` host is not allowed: {0}")]
    Host(String),
    #[error("`channels` must hold 1 to {MAX_PATTERNS} patterns")]
    ChannelCount,
    #[error("`channels`: {0}")]
    Pattern(#[from] InvalidPattern),
    #[error(
        "`secret` must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} printable ASCII characters (space to `~`)"
    )]
    Secret,
    #[error("`timeout_ms` must be between {} and {max}", MIN_TIMEOUT.as_millis())]
    Timeout { max: u128 },
    #[error("`max_attempts` must be between 1 and {MAX_ATTEMPTS}")]
    MaxAttempts,
}

impl WebhookSpec {
    /// Check everything that needs no network (the host is checked against
    /// `webhooks.allowed_hosts` without resolving it here; see [`ssrf::HostPolicy::check_url`]).
    pub fn parse(raw: RawSpec<'_>, settings: &WebhookSettings) -> Result<Self, InvalidWebhook> {
        let url = parse_url(raw.url)?;
        if raw.channels.is_empty() || raw.channels.len() > MAX_PATTERNS {
            return Err(InvalidWebhook::ChannelCount);
        }
        let mut channels: Vec<String> = Vec::with_capacity(raw.channels.len());
        let mut patterns = Vec::with_capacity(raw.channels.len());
        for entry in raw.channels {
            let pattern = Pattern::parse(entry)?;
            if !channels.contains(entry) {
                channels.push(entry.clone());
                patterns.push(pattern);
            }
        }
        let secret = raw.secret;
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&secret.len())
            || !secret.bytes().all(|b| (b' '..=b'~').contains(&b))
        {
            return Err(InvalidWebhook::Secret);
        }
        let timeout = raw.timeout.unwrap_or(settings.timeout);
        if !(MIN_TIMEOUT..=settings.max_timeout).contains(&timeout) {
            return Err(InvalidWebhook::Timeout {
                max: settings.max_timeout.as_millis(),
            });
        }
        let max_attempts = raw.max_attempts.unwrap_or(settings.max_attempts);
        if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
            return Err(InvalidWebhook::MaxAttempts);
        }
        Ok(Self {
            url,
            channels,
            patterns,
            secret: secret.to_owned(),
            timeout,
            max_attempts,
        })
    }
}

/// An `http` or `https` URL with a host, no credentials and no fragment, written in visible
/// ASCII (the URL parser would silently drop tabs, newlines and surrounding spaces: what is
/// stored is what was sent).
fn parse_url(raw: &str) -> Result<url::Url, InvalidWebhook> {
    if raw.len() > MAX_URL_LEN {
        return Err(InvalidWebhook::Url(format!(
            "is longer than {MAX_URL_LEN} bytes"
        )));
    }
    let lower = raw.get(..8).unwrap_or(raw).to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(InvalidWebhook::Url(
            "must start with http:// or https://".to_owned(),
        ));
    }
    if !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(InvalidWebhook::Url(
            "must be visible ASCII without spaces (percent-encode the rest)".to_owned(),
        ));
    }
    let url =
        url::Url::parse(raw).map_err(|e| InvalidWebhook::Url(format!("is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(InvalidWebhook::Url(format!(
            "scheme must be http or https, not `{}`",
            url.scheme().chars().take(20).collect::<String>()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(InvalidWebhook::Url("has no host".to_owned()));
    }
    // The URL is listed back by the API: a password in it would leak, and the signature is
    // the receiver's way to authenticate relay.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(InvalidWebhook::Url(
            "must not carry credentials (the signature authenticates relay)".to_owned(),
        ));
    }
    if url.fragment().is_some() {
        return Err(InvalidWebhook::Url("must not have a #fragment".to_owned()));
    }
    Ok(url)
}

/// A new API webhook id: `wh_` and 32 hex digits (configured ones may not start with `wh_`).
pub fn new_id() -> String {
    format!("wh_{}", uuid::Uuid::new_v4().simple())
}

/// Whether `id` can name a webhook: 1 to [`MAX_ID_LEN`] of `A-Z a-z 0-9 _ -`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A configured webhook, checked.
#[derive(Debug, Clone)]
pub struct ConfiguredWebhook {
    pub id: String,
    pub spec: WebhookSpec,
}

/// Why `webhooks.endpoints` cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("webhooks.endpoints[{index}]: {reason}")]
pub struct InvalidEndpoint {
    pub index: usize,
    pub reason: String,
}

/// Check every configured endpoint (startup and `relay check-config`): its id, its spec, and
/// its host against `webhooks.allowed_hosts` as far as that is known without DNS.
pub fn configured(settings: &Settings) -> Result<Vec<ConfiguredWebhook>, InvalidEndpoint> {
    let w = &settings.webhooks;
    let policy = ssrf::HostPolicy::parse(&w.allowed_hosts).map_err(|e| InvalidEndpoint {
        index: 0,
        reason: format!("webhooks.allowed_hosts: {e}"),
    })?;
    let mut out: Vec<ConfiguredWebhook> = Vec::with_capacity(w.endpoints.len());
    for (index, endpoint) in w.endpoints.iter().enumerate() {
        let invalid = |reason: String| InvalidEndpoint { index, reason };
        if !valid_id(&endpoint.id) || endpoint.id.starts_with("wh_") {
            return Err(invalid(format!(
                "`id` must be 1 to {MAX_ID_LEN} of A-Z a-z 0-9 _ - and not start with `wh_` (API webhooks' ids)"
            )));
        }
        if out.iter().any(|c| c.id == endpoint.id) {
            return Err(invalid(format!("`id` `{}` is used twice", endpoint.id)));
        }
        let raw = RawSpec {
            url: &endpoint.url,
            channels: &endpoint.channels,
            secret: endpoint.secret.expose(),
            timeout: endpoint.timeout,
            max_attempts: endpoint.max_attempts,
        };
        let spec = WebhookSpec::parse(raw, w).map_err(|e| invalid(e.to_string()))?;
        if let ssrf::HostCheck::Refused(why) = policy.check_host(&spec.url) {
            return Err(invalid(InvalidWebhook::Host(why).to_string()));
        }
        out.push(ConfiguredWebhook {
            id: endpoint.id.clone(),
            spec,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WebhookSettings {
        crate::config::tests_support::default_settings().webhooks
    }

    fn raw<'a>(url: &'a str, channels: &'a [String], secret: &'a str) -> RawSpec<'a> {
        RawSpec {
            url,
            channels,
            secret,
            timeout: None,
            max_attempts: None,
        }
    }

    #[test]
    fn valid_specs_get_defaults_and_deduplicated_patterns() {
        let s = settings();
        let channels = vec!["orders:*".to_owned(), "news".to_owned(), "news".to_owned()];
        let spec = WebhookSpec::parse(
            raw("https://h.example/x", &channels, "0123456789abcdef"),
            &s,
        )
        .unwrap();
        assert_eq!(spec.channels, ["orders:*", "news"]);
        assert_eq!(spec.timeout, s.timeout);
        assert_eq!(spec.max_attempts, s.max_attempts);
        assert!(!format!("{spec:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let s = settings();
        let ok = vec!["news".to_owned()];
        let secret = "0123456789abcdef";
        let bad_pattern = ["a*b".to_owned()];
        let long_secret = "x".repeat(257);
        let cases: Vec<(RawSpec<'_>, &str)> = vec![
            (raw("not a url", &ok, secret), "`url`"),
            (raw("ftp://h.example/", &ok, secret), "http"),
            (raw(" https://h.example/", &ok, secret), "http"),
            (raw("https://h.exa\tmple/", &ok, secret), "ASCII"),
            (raw("https://u:p@h.example/", &ok, secret), "credentials"),
            (raw("https://h.example/#x", &ok, secret), "fragment"),
            (raw("https://h.example/", &[], secret), "`channels`"),
            (
                raw("https://h.example/", &bad_pattern, secret),
                "`channels`",
            ),
            (raw("https://h.example/", &ok, "short"), "`secret`"),
            (raw("https://h.example/", &ok, &long_secret), "`secret`"),
            (
                raw("https://h.example/", &ok, "0123456789abcde\n"),
                "`secret`",
            ),
            (
                raw("https://h.example/", &ok, "0123456789abcdeé"),
                "`secret`",
            ),
        ];
        for (spec, field) in cases {
            let err = WebhookSpec::parse(spec, &s).unwrap_err().to_string();
            assert!(err.contains(field), "{spec:?}: {err}");
        }
        let long = format!("https://h.example/{}", "x".repeat(MAX_URL_LEN));
        assert!(WebhookSpec::parse(raw(&long, &ok, secret), &s).is_err());
        let mut r = raw("https://h.example/", &ok, secret);
        r.timeout = Some(Duration::from_millis(10));
        assert!(matches!(
            WebhookSpec::parse(r, &s),
            Err(InvalidWebhook::Timeout { .. })
        ));
        r.timeout = None;
        r.max_attempts = Some(0);
        assert_eq!(
            WebhookSpec::parse(r, &s).unwrap_err(),
            InvalidWebhook::MaxAttempts
        );
    }

    #[test]
    fn ids() {
        assert!(valid_id(&new_id()));
        assert!(new_id().starts_with("wh_"));
        assert!(valid_id("billing-1"));
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
