//! The live demo page: `GET /` serves a small browser client of relay's WebSocket protocol
//! (subscribe, publish, live messages, automatic reconnect with `since` recovery), so a developer
//! can see the service work without installing anything.
//!
//! The page is plain HTML, CSS and JavaScript under `assets/demo/`, compiled into the binary with
//! `include_str!`: no build step, no CDN, nothing to deploy next to the binary. Scripts and styles
//! are separate same-origin files so the Content-Security-Policy can forbid every inline script
//! and style. The page is switched off with `demo.enabled = false` (the production default);
//! then none of its routes exist and `/` is the ordinary JSON 404.
//!
//! With authentication on, the page needs a token. `GET /demo/token` hands it a short-lived
//! HS256 token for every channel, but only when a config opts in (`demo.token_enabled`, set by
//! the local config) and an `auth.hs256_secret` exists; otherwise the route does not exist and
//! the page connects without a token (as it must with `auth.mode = disabled`).

use std::sync::{Arc, LazyLock};

use axum::{
    Router,
    extract::Query,
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;

use crate::{
    auth::{Authenticator, ChannelClaims},
    config::DemoSettings,
};

const INDEX_HTML: &str = include_str!("../assets/demo/index.html");
const APP_JS: &str = include_str!("../assets/demo/app.js");
const APP_CSS: &str = include_str!("../assets/demo/app.css");
const FAVICON_SVG: &str = include_str!("../assets/demo/favicon.svg");

/// Placeholder in `index.html` replaced by [`ASSET_VERSION`] in asset URLs.
const VERSION_PLACEHOLDER: &str = "{{ASSET_VERSION}}";

/// The page may load scripts, styles and images only from relay itself and may connect only back
/// to it (`'self'` covers `ws:`/`wss:` on the same host). No inline code runs, it cannot be framed,
/// and Trusted Types turn any accidental HTML-string sink in the script into an error.
const PAGE_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
frame-ancestors 'none'; require-trusted-types-for 'script'";

/// Assets are never documents, but a CSP on them costs nothing and covers direct navigation.
const ASSET_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// The HTML names assets by content version, so browsers keep them for a year and a new build
/// is fetched at once. The HTML itself is revalidated on every load (cheap: ETag, 304).
const CACHE_HTML: &str = "no-cache";
const CACHE_VERSIONED: &str = "public, max-age=31536000, immutable";

/// A stable content hash of everything the page loads; it changes whenever an asset does.
static ASSET_VERSION: LazyLock<String> = LazyLock::new(|| {
    let hash = [INDEX_HTML, APP_JS, APP_CSS, FAVICON_SVG]
        .iter()
        .fold(FNV_OFFSET, |h, part| fnv1a(h, part.as_bytes()));
    format!("{:016x}", hash)
});

static PAGE_HTML: LazyLock<String> =
    LazyLock::new(|| INDEX_HTML.replace(VERSION_PLACEHOLDER, &ASSET_VERSION));

/// The demo routes, or none when the demo is switched off (so `/` falls through to the 404).
pub fn routes<S: Clone + Send + Sync + 'static>(
    settings: &DemoSettings,
    auth: Arc<Authenticator>,
) -> Router<S> {
    if !settings.enabled {
        return Router::new();
    }
    let router = Router::new()
        .route("/", get(page))
        .route("/demo/app.js", get(script))
        .route("/demo/app.css", get(stylesheet))
        .route("/demo/favicon.svg", get(favicon));
    // Only where a token means something (auth on) and the config asked for it.
    if !(settings.token_enabled && auth.is_required() && auth.can_sign()) {
        return router;
    }
    let ttl = settings.token_ttl;
    router.route(
        "/demo/token",
        get(move || {
            let auth = Arc::clone(&auth);
            async move { demo_token(&auth, ttl) }
        }),
    )
}

/// A token for a fresh demo identity, allowed everything (the page subscribes, publishes and
/// reads history on whatever channels the visitor types).
fn demo_token(auth: &Authenticator, ttl: std::time::Duration) -> Response {
    let all = || vec!["*".to_owned()];
    let channels = ChannelClaims {
        subscribe: all(),
        publish: all(),
        history: all(),
    };
    let sub = format!("demo-{}", uuid::Uuid::new_v4().simple());
    match auth.issue(&sub, channels, ttl) {
        Some(token) => {
            let exp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                + ttl.as_secs();
            let body = serde_json::json!({ "token": token, "exp": exp });
            let mut res = axum::Json(body).into_response();
            // A credential: never cached by the browser or a proxy.
            res.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            res
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `?v=` on asset URLs: the content version the HTML asked for.
#[derive(Deserialize)]
struct AssetQuery {
    v: Option<String>,
}

async fn page(headers: HeaderMap) -> Response {
    serve(
        &headers,
        PAGE_HTML.as_str(),
        "text/html; charset=utf-8",
        CACHE_HTML,
        PAGE_CSP,
    )
}

async fn script(headers: HeaderMap, Query(q): Query<AssetQuery>) -> Response {
    asset(&headers, &q, APP_JS, "text/javascript; charset=utf-8")
}

async fn stylesheet(headers: HeaderMap, Query(q): Query<AssetQuery>) -> Response {
    asset(&headers, &q, APP_CSS, "text/css; charset=utf-8")
}

async fn favicon(headers: HeaderMap, Query(q): Query<AssetQuery>) -> Response {
    asset(&headers, &q, FAVICON_SVG, "image/svg+xml")
}

fn asset(
    headers: &HeaderMap,
    q: &AssetQuery,
    body: &'static str,
    content_type: &'static str,
) -> Response {
    // Only a URL naming the current version may be cached for good; an old or missing version
    // (a stale page, a hand-typed URL) is served but revalidated, or it would stick forever.
    let cache = if q.v.as_deref() == Some(ASSET_VERSION.as_str()) {
        CACHE_VERSIONED
    } else {
        CACHE_HTML
    };
    serve(headers, body, content_type, cache, ASSET_CSP)
}

fn serve(
    headers: &HeaderMap,
    body: &'static str,
    content_type: &'static str,
    cache_control: &'static str,
    csp: &'static str,
) -> Response {
    // Weak, because the compression layer may re-encode the bytes; `If-None-Match` compares
    // weakly anyway (RFC 9110, 13.1.2).
    let etag = format!("W/\"{:016x}\"", fnv1a(FNV_OFFSET, body.as_bytes()));
    fn opaque(tag: &str) -> &str {
        tag.trim().trim_start_matches("W/")
    }
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == "*" || opaque(tag) == opaque(&etag))
        });
    let mut res = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        body.into_response()
    };
    let h = res.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, cache_control),
        (header::CONTENT_SECURITY_POLICY, csp),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    if let Ok(value) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, value);
    }
    res
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: tiny, stable across Rust versions and platforms (unlike `DefaultHasher`), and plenty
/// for telling one build's assets from another's.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_names_assets_by_version() {
        assert!(!PAGE_HTML.contains(VERSION_PLACEHOLDER));
        assert!(PAGE_HTML.contains(&format!("/demo/app.js?v={}", *ASSET_VERSION)));
        assert!(PAGE_HTML.contains(&format!("/demo/app.css?v={}", *ASSET_VERSION)));
    }

    #[test]
    fn fnv1a_matches_reference_values() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
