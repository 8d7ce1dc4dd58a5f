//! relay: a production-grade realtime microservice template.
//!
//! Messages published on any replica (over HTTP, a WebSocket, or straight to Redis) reach every
//! WebSocket and SSE subscriber of their channel on every replica. How the pieces fit:
//!
//! * [`config`] loads typed, validated settings; [`telemetry`] sets up logs, traces and metrics;
//!   [`access_log`] writes the access log off the request path.
//! * [`app::Application`] builds the service from settings: clients are created once and put in
//!   [`state::AppState`]; the [`lifecycle::Lifecycle`] owns every background task and shutdown.
//! * [`core`](crate::core) is the delivery core, without I/O: channel registry, per-channel sequencing,
//!   recovery decisions, and how one connection's stream stays ordered and gap-free. Events go
//!   in, actions come out; it is property-tested against a model.
//! * [`pubsub`] is the I/O around it: the broker (Redis, or in-process in embedded mode), the
//!   core task, the head reads and the publisher, joined by bounded queues. [`history`] is the
//!   shared, bounded history reader.
//! * [`session`] is one client connection for both transports: subscriptions, outbox, paced
//!   replay, limits. [`ws`] and [`sse`] are thin transports under it; [`protocol`] is the wire
//!   format.
//! * [`publish`] is the publish path (rate limits, then the group commit of [`commit`], which
//!   hands committed messages to local subscribers and the PUBLISH to the service);
//!   [`retention`] prunes old history in the background.
//! * [`auth`] verifies tokens (JWT) into one [`auth::Principal`] and matches channel
//!   permissions; the session and the HTTP layer enforce it. [`rate_limit`] holds the
//!   per-connection, per-subject and per-address token buckets.
//! * [`http`] holds the router, the error type and middleware; [`store`] is the message store
//!   (Postgres, or memory in embedded mode) and every SQL query.
//! * [`tls`] holds what the Redis and Postgres clients share for TLS (crypto provider, CA files).
//! * [`cli`] is the command line (`serve`, `migrate`, `check-config`, `healthcheck`, `openapi`,
//!   `token`).
//!
//! Tests and benchmarks start the real service in-process with [`app::Application`].

pub mod access_log;
pub mod app;
pub mod auth;
pub mod cli;
pub mod commit;
pub mod config;
pub mod core;
#[cfg(feature = "demo")]
pub mod demo;
pub mod dispatcher;
pub mod history;
pub mod http;
pub mod lifecycle;
pub mod protocol;
pub mod publish;
pub mod pubsub;
pub mod rate_limit;
pub mod retention;
pub mod session;
#[cfg(feature = "sse")]
pub mod sse;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod webhooks;

/// The Rust receiver snippet of docs/webhooks.md, run as a doctest (its other code blocks are
/// not Rust, so rustdoc leaves them alone).
#[cfg(doctest)]
#[doc = include_str!("../docs/webhooks.md")]
pub struct WebhooksDocSnippets;
pub mod ws;
