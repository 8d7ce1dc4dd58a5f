//! One integration-test binary (faster to link). Every test starts the real service on an
//! unused port with its own database and Redis prefix, against real Postgres and Redis; the
//! exception is `architecture`, which only reads the sources.

mod architecture;
mod auth;
mod config;
mod demo;
mod fuzz;
mod health;
mod helpers;
mod history;
mod lifecycle;
mod limits;
mod loadgen;
mod observability;
mod openapi;
mod publishing;
mod realtime;
mod recovery;
mod services;
mod tls;
mod webhooks;
