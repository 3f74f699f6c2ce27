//! warden's end-to-end tests: each starts the real `warden` binary (and,
//! where an area needs them, PostgreSQL, nginx or Prometheus) and talks to it
//! the way a gateway or Django would, over real mTLS.
//!
//! One test binary with a module per area, so the dependencies are linked
//! once. Run one area with `cargo test --test end_to_end check::`.

mod support;

mod admin;
mod check;
mod cluster;
mod cluster_checks;
mod config;
mod envoy;
mod forward_auth;
mod mtls;
mod observability;
mod ops;
mod postgres;
mod stream;
mod tls;
mod unary;
mod webhooks;
