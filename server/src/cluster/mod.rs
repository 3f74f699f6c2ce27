//! A cluster of warden processes: who is in it ([`membership`]) and who owns
//! which piece of state ([`ownership`]).
//!
//! This is the first part of DESIGN.md's scale-out: membership on the
//! PostgreSQL that already holds the shared key store, and ownership by
//! rendezvous hashing. Checks are not forwarded to owners yet, so limits and
//! nonces are still kept per process (README, "Running a cluster").

pub mod membership;
pub mod ownership;

pub use membership::{Member, Membership, View};
