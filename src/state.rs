//! [`AppState`]: everything handlers and tasks share, built once at startup.
//!
//! Clients (the message store's Postgres pool, the Redis connections) are created inside the runtime by
//! [`crate::app::Application::build`] and only cloned from here; handlers never build clients.

use std::{ops::Deref, sync::Arc};

use crate::{
    access_log::AccessLog,
    auth::Authenticator,
    commit::Committer,
    config::Settings,
    history::HistoryReader,
    lifecycle::Lifecycle,
    pubsub::PubSub,
    rate_limit::RateLimits,
    store::{MessageStore, outbox::Outbox},
    webhooks::ssrf::HostPolicy,
};

/// Cloned into every request (by each middleware layer and the handler), so it is one `Arc`:
/// a clone is one atomic increment instead of one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What [`AppState`] shares; reached through `Deref` (`state.store`, `state.pubsub`).
pub struct Shared {
    pub settings: Arc<Settings>,
    /// Message history: Postgres, or memory in embedded mode.
    pub store: MessageStore,
    /// Shared, bounded reads of history for delivery (replays, gap fills, head checks).
    pub history: HistoryReader,
    pub pubsub: PubSub,
    /// The group commit every publish goes through.
    pub committer: Committer,
    pub lifecycle: Lifecycle,
    pub access_log: AccessLog,
    /// Token verification with the configured keys (loaded once at startup).
    pub auth: Arc<Authenticator>,
    /// Per-client rate limits (`[limits]`).
    pub limits: Arc<RateLimits>,
    /// Webhooks and their deliveries (the store's outbox).
    pub outbox: Outbox,
    /// `webhooks.allowed_hosts`, parsed: what webhook URLs may point at.
    pub webhook_hosts: Arc<HostPolicy>,
}

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}
