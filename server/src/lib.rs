//! warden: one atomic `Check` for rate limits, freshness, replay and request
//! signatures, served over mutual TLS.
//!
//! Modules, one concern each:
//! - [`engine`]: pure, clock-injected state (buckets, windows, nonces, shards);
//! - [`signing`]: verifying request signatures;
//! - [`check`]: the pipeline that turns a `CheckRequest` into a decision;
//! - [`keys`]: API keys and their secrets; [`config`]: the config file;
//! - [`tls`]: mTLS setup and caller identity; [`dev`]: `serve --dev` files;
//! - [`service`]: the tonic services; [`server`]: listening and shutdown.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod audit;
pub mod auth;
pub mod check;
pub mod config;
pub mod conn;
pub mod crypto;
pub mod dev;
pub mod engine;
pub mod freshness;
pub mod gate;
pub mod keys;
pub mod metrics;
pub mod model;
pub mod server;
pub mod service;
pub mod signing;
pub mod store;
pub mod tls;
