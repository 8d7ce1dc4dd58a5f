//! The HTTP side of authentication: where the token is found in a request, the [`Caller`]
//! extractor of the message API, and the `Origin` check of the realtime endpoints.
//!
//! Verification itself is [`crate::auth`]'s; what a token allows is checked against the same
//! [`Principal`] the WebSocket and SSE sessions use.

use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, header, request::Parts},
};

use crate::{
    access_log::AccessContext,
    auth::{Action, AuthError, Principal},
    http::error::ApiError,
    state::AppState,
};

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        Self::Unauthorized(err.to_string())
    }
}

/// `Authorization: Bearer <token>`, if present (an `Authorization` of another scheme is
/// treated as no token).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// `token=` from a query string (WebSocket and SSE, for clients that cannot set headers).
/// The access log redacts it; the trace span records the route only, never the query.
pub fn query_token(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .filter(|t| !t.is_empty())
}

/// Verify the request's token when authentication is required. `Ok(None)`: auth is disabled;
/// `Err`: required and missing or invalid (401).
pub fn authenticate(state: &AppState, token: Option<&str>) -> Result<Option<Principal>, ApiError> {
    if !state.auth.is_required() {
        return Ok(None);
    }
    let token = token.ok_or(AuthError::Missing)?;
    Ok(Some(state.auth.verify(token)?))
}

/// The caller of a message-API request: its principal (from `Authorization: Bearer`), or
/// `None` with `auth.mode = disabled`. Rejects with 401 before the handler runs.
#[derive(Debug, Clone)]
pub struct Caller(pub Option<Principal>);

impl Caller {
    /// The token's `sub` (`None` with auth disabled).
    pub fn subject(&self) -> Option<&str> {
        self.0.as_ref().map(|p| p.sub.as_str())
    }

    /// 403 unless the caller may do `action` on `channel` (always Ok with auth disabled).
    pub fn require(&self, action: Action, channel: &str) -> Result<(), ApiError> {
        match &self.0 {
            Some(p) if !p.allows(action, channel) => Err(ApiError::Forbidden(format!(
                "`{}` may not {} `{channel}`",
                p.sub,
                action.as_str()
            ))),
            _ => Ok(()),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = authenticate(state, bearer(&parts.headers))?;
        note_subject(parts.extensions.get(), principal.as_ref());
        Ok(Caller(principal))
    }
}

/// Put the authenticated subject in the request's access-log entry.
pub fn note_subject(context: Option<&AccessContext>, principal: Option<&Principal>) {
    if let (Some(context), Some(principal)) = (context, principal) {
        context.set_subject(&principal.sub);
    }
}

/// Cross-site WebSocket hijacking guard: a browser request whose `Origin` is neither the
/// request's own host nor in `ws.allowed_origins` gets 403 before anything is streamed (the
/// browser would otherwise attach the user's cookies and credentials to another site's
/// socket). Requests without `Origin` (services, CLI tools) pass.
pub fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("").trim();
    if allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if same_host(origin, host) {
        return Ok(());
    }
    Err(ApiError::Forbidden(
        "this Origin may not open a stream here (see ws.allowed_origins)".to_owned(),
    ))
}

/// Whether `origin` (`scheme://host[:port]`) names the same host and port as a `Host` header.
fn same_host(origin: &str, host: &str) -> bool {
    let Ok(url) = url::Url::parse(origin) else {
        return false;
    };
    let (Some(origin_host), Some(origin_port)) = (url.host_str(), url.port_or_known_default())
    else {
        return false;
    };
    // `Host` is `name[:port]` (`[v6]:port` for IPv6); parse it the way a URL would.
    let Ok(host_url) = url::Url::parse(&format!("{}://{host}", url.scheme())) else {
        return false;
    };
    host_url
        .host_str()
        .is_some_and(|h| h.eq_ignore_ascii_case(origin_host))
        && host_url.port_or_known_default() == Some(origin_port)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h
    }

    #[test]
    fn origin_rules() {
        let none: Vec<String> = Vec::new();
        assert!(check_origin(&headers(None, "relay:8080"), &none).is_ok());
        assert!(check_origin(&headers(Some("http://relay:8080"), "relay:8080"), &none).is_ok());
        assert!(
            check_origin(
                &headers(Some("https://relay.example"), "relay.example"),
                &none
            )
            .is_ok()
        );
        assert!(check_origin(&headers(Some("http://relay:9999"), "relay:8080"), &none).is_err());
        assert!(check_origin(&headers(Some("https://evil.example"), "relay:8080"), &none).is_err());
        assert!(check_origin(&headers(Some("null"), "relay:8080"), &none).is_err());
        let app = vec!["https://app.example".to_owned()];
        assert!(check_origin(&headers(Some("https://app.example"), "relay:8080"), &app).is_ok());
        let any = vec!["*".to_owned()];
        assert!(check_origin(&headers(Some("https://evil.example"), "relay:8080"), &any).is_ok());
    }

    #[test]
    fn bearer_and_query_tokens() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc.def.ghi"),
        );
        assert_eq!(bearer(&h), Some("abc.def.ghi"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic xyz"));
        assert_eq!(bearer(&h), None);
        assert_eq!(
            query_token(Some("channels=a&token=t%2B1")),
            Some("t+1".to_owned())
        );
        assert_eq!(query_token(Some("channels=a")), None);
    }
}
