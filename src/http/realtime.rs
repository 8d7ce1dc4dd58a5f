//! The realtime endpoints' HTTP side: `GET /ws` and `GET /sse` validate the request, refuse
//! with a JSON error before anything is streamed, then start a [`Session`] on the WebSocket or
//! SSE transport. The sessions themselves know nothing of HTTP.
//!
//! Order of the refusals: `Origin` (403), then the token (401 when `auth.mode = required` and
//! it is missing or invalid; a WebSocket without one may instead authenticate with its first
//! frame), then the query (400). Permissions are the session's: on SSE every listed channel is
//! checked before the stream starts (403); on a WebSocket a forbidden channel gets an error
//! frame and the connection stays.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Extension,
    extract::{ConnectInfo, RawQuery, Request, State},
    http::HeaderMap,
    response::Response,
};
#[cfg(feature = "sse")]
use {
    crate::protocol::parse_offset,
    axum::response::sse::{Event, KeepAlive, Sse},
    futures_util::Stream,
    std::convert::Infallible,
};

use crate::{
    access_log::AccessContext,
    http::{
        auth,
        error::{ApiError, ErrorBody},
        limits::{ConnectionLimits, ConnectionPermit},
        middleware::client_ip,
    },
    protocol::{QuerySubscription, parse_subscription_query},
    session::{Access, Session},
    state::AppState,
    ws::{self, handshake::Upgrade},
};

/// A connection slot for this request's client (after the cheap checks, before any work).
fn permit(
    state: &AppState,
    limits: &Arc<ConnectionLimits>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: &HeaderMap,
) -> Result<ConnectionPermit, ApiError> {
    let peer = peer.map(|Extension(ConnectInfo(addr))| addr.ip());
    let ip = client_ip(peer, headers, &state.access_log.trusted_proxies);
    limits.acquire(ip)
}

/// Parse `channels=…&since.…` and apply the per-connection limit.
fn subscriptions(
    state: &AppState,
    query: Option<&str>,
) -> Result<Vec<QuerySubscription>, ApiError> {
    if state.lifecycle.is_draining() {
        return Err(ApiError::Unavailable("server is shutting down".to_owned()));
    }
    parse_subscription_query(query, state.settings.ws.max_subscriptions)
        .map_err(ApiError::Validation)
}

/// Validate the query, then upgrade. Refusals happen before the upgrade, as JSON errors.
#[utoipa::path(
    get,
    path = "/ws",
    tag = "realtime",
    operation_id = "upgrade",
    description = "WebSocket upgrade; frames in docs/protocol.md. `since.<channel>=<offset>` (one per listed channel, an offset 0..=9007199254740991) resumes a channel after that offset.                    With `auth.mode = required` a token is optional here: without one the first frame must be `{\"type\":\"auth\",\"token\":…}`.                    A request that is not a WebSocket upgrade gets 426 once the query is valid.",
    params(
        ("channels" = Option<String>, Query, description = "Channels to subscribe to at connect, separated by commas (no blanks, no empty items); at most `ws.max_subscriptions` (100 by default) listed. Leave it out to subscribe later with frames."),
    ),
    security(("bearer" = []), ("token" = []), ()),
    responses(
        (status = 101, description = "Switching protocols: the WebSocket session starts"),
        (status = 400, description = "Invalid `channels` or `since.<channel>`, or a malformed upgrade (no `Sec-WebSocket-Key`)", body = ErrorBody),
        (status = 401, description = "Invalid token (auth.mode = required)", body = ErrorBody,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "Origin not allowed (ws.allowed_origins)", body = ErrorBody),
        (status = 426, description = "Not a WebSocket upgrade (`Connection: Upgrade` and `Upgrade: websocket` missing), or a `Sec-WebSocket-Version` other than 13", body = ErrorBody,
            headers(
                ("Upgrade" = String, description = "`websocket`"),
                ("Sec-WebSocket-Version" = String, description = "`13`"),
            )),
        (status = 429, description = "Too many connections from this client address (ws.max_connections_per_ip)", body = ErrorBody),
        (status = 503, description = "Shutting down, or this replica is at ws.max_connections", body = ErrorBody),
    )
)]
pub async fn upgrade(
    State(state): State<AppState>,
    Extension(limits): Extension<Arc<ConnectionLimits>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    access: Option<Extension<AccessContext>>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Response, ApiError> {
    let (mut parts, _) = request.into_parts();
    let headers = &parts.headers;
    auth::check_origin(headers, &state.settings.ws.allowed_origins)?;
    let query_token = auth::query_token(query.as_deref());
    let token = auth::bearer(headers).or(query_token.as_deref());
    let session_access = match (state.auth.is_required(), token) {
        (false, _) => Access::Open,
        // Browsers cannot set headers on a WebSocket: they authenticate with the first frame.
        (true, None) => Access::AwaitingToken,
        (true, Some(token)) => Access::Granted(Box::new(state.auth.verify(token)?)),
    };
    let channels = subscriptions(&state, query.as_deref())?;
    let ws = Upgrade::from_request(headers, &mut parts.extensions)?;
    let permit = permit(&state, &limits, peer, headers)?;
    let access = access.map(|Extension(access)| (access, state.access_log.clone()));
    let (response, upgraded) = ws.accept();
    // The session is a task of the lifecycle from now, so a shutdown starting before the
    // upgrade completes waits for it; once upgraded it is the connection's only task.
    let session = Session::with_access(state.clone(), session_access);
    let task = ws::serve(upgraded, session, channels, access, permit);
    state.lifecycle.spawn("ws_session", task);
    Ok(response)
}

/// Server-Sent Events stream of the listed channels.
#[cfg(feature = "sse")]
#[utoipa::path(
    get,
    path = "/sse",
    tag = "realtime",
    operation_id = "stream",
    description = "`event: subscribed` per channel, then `event: message` with the WebSocket message frame as data and the offset as id.                    `since.<channel>=<offset>` (one per listed channel, an offset 0..=9007199254740991) resumes a channel after that offset. See docs/protocol.md.",
    params(
        ("channels" = String, Query, description = "Channels to stream, separated by commas (no blanks, no empty items); at least one, at most `ws.max_subscriptions` (100 by default) listed."),
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume a single-channel stream after this offset (browsers send it when they reconnect); ignored with several channels, but still checked."),
    ),
    security(("bearer" = []), ("token" = [])),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream"),
        (status = 400, description = "Invalid `channels`, `since.<channel>` or `Last-Event-ID`", body = ErrorBody),
        (status = 401, description = "Missing or invalid token (auth.mode = required)", body = ErrorBody,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "Origin not allowed, or the token may not subscribe to a listed channel", body = ErrorBody),
        (status = 429, description = "Too many connections from this client address (ws.max_connections_per_ip)", body = ErrorBody),
        (status = 503, description = "Shutting down, Redis unavailable, or this replica is at ws.max_connections", body = ErrorBody),
    )
)]
pub async fn stream(
    State(state): State<AppState>,
    Extension(limits): Extension<Arc<ConnectionLimits>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    context: Option<Extension<crate::access_log::AccessContext>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    auth::check_origin(&headers, &state.settings.ws.allowed_origins)?;
    let query_token = auth::query_token(query.as_deref());
    let principal = auth::authenticate(&state, auth::bearer(&headers).or(query_token.as_deref()))?;
    auth::note_subject(context.as_ref().map(|Extension(c)| c), principal.as_ref());
    let session_access = match principal {
        Some(principal) => Access::Granted(Box::new(principal)),
        None => Access::Open,
    };
    let mut subs = subscriptions(&state, query.as_deref())?;
    if subs.is_empty() {
        return Err(ApiError::Validation(
            "give at least one channel: /sse?channels=a,b".to_owned(),
        ));
    }
    if let Some(last_event_id) = headers.get("last-event-id") {
        let id = last_event_id
            .to_str()
            .ok()
            .and_then(parse_offset)
            .ok_or_else(|| {
                ApiError::Validation("Last-Event-ID must be a message offset".to_owned())
            })?;
        // Offsets are per channel, so the id only means something for a single-channel stream.
        if let [only] = subs.as_mut_slice() {
            only.since = Some(id);
        }
    }
    let permit = permit(&state, &limits, peer, &headers)?;
    let mut session = Session::with_access(state.clone(), session_access);
    for sub in &subs {
        session
            .authorise(crate::auth::Action::Subscribe, &sub.channel)
            .map_err(ApiError::Forbidden)?;
    }
    for sub in &subs {
        session.subscribe(&sub.channel, sub.since).await;
    }
    let within = state.settings.redis.command_timeout + state.settings.database.acquire_timeout;
    session
        .confirm_subscriptions(within)
        .await
        .map_err(ApiError::Unavailable)?;
    let (transport, body) = crate::sse::channel(state.settings.ws.write_timeout);
    state.lifecycle.spawn("sse_session", async move {
        crate::sse::serve(session, transport).await;
        drop(permit);
    });
    Ok(Sse::new(body).keep_alive(KeepAlive::new().interval(state.settings.sse.keepalive_interval)))
}
