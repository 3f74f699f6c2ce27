//! warden: one atomic `Check` for rate limits, freshness, replay and request
//! signatures, served over mutual TLS.
//!
//! Modules, one concern each, from the bottom up:
//! - [`engine`]: pure, clock-injected state (buckets, windows, nonces,
//!   shards, bounded pools); [`model`]: the value types and their validation;
//! - [`signing`]: verifying request signatures; `freshness`: skews and the
//!   restart fence;
//! - [`keys`]: API keys and their secrets; [`store`]: where they are kept;
//!   [`crypto`]: sealing; [`audit`]: the keyed, hash-chained audit log;
//! - [`auth`]: caller roles; [`tls`]: mTLS setup and caller identity;
//! - [`check`]: the pipeline that turns a `CheckRequest` into a decision;
//! - [`config`]: the config file; [`dev`]: `serve --dev` files;
//! - `clock_mark`: the latest time shown, on disk, for the next process;
//!   `fence_record`: how far ahead it accepted, for the next one's fence;
//!   [`saved_state`]: a single process's rate-limit state, for the next one;
//! - `service`: the tonic services; `conn`, `gate`: connections and their
//!   bounds; `request_wait`: how long and with how much memory a request
//!   is waited for; [`server`]: listening, background tasks and shutdown.
//!
//! Public modules are those the binary, the tests and the benches use; the
//! rest is private so the compiler finds what nothing uses.
#![forbid(unsafe_code)]

mod alerts;
pub mod audit;
pub mod auth;
pub mod check;
mod clock_mark;
pub mod cluster;
pub mod config;
mod conn;
pub mod crypto;
pub mod descriptors;
pub mod dev;
mod dir_lock;
mod direct_route;
pub mod engine;
mod fence_record;
mod freshness;
mod gate;
mod gateway;
mod http2;
mod key_admin;
pub mod keys;
mod log_budget;
pub mod metrics;
pub mod model;
pub mod postgres;
mod private_file;
mod read_slices;
mod request_wait;
pub mod route;
pub mod saved_state;
pub mod server;
mod service;
pub mod serving;
pub mod signing;
pub mod store;
pub mod tls;
pub mod webhooks;
