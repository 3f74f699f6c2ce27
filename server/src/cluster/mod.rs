//! A cluster of warden processes: who is in it ([`membership`], with
//! leases judged by [`leases`]), who owns which slot of state
//! ([`ownership`]), how a check's state step reaches its owners ([`state`])
//! over the `warden.v1.Peer` service ([`peer`]), and how far the nodes'
//! clocks disagree ([`clocks`]). DESIGN.md, Scale-out.

pub mod clocks;
pub mod leases;
mod link;
pub mod membership;
pub mod ownership;
pub mod peer;
pub mod state;

pub use membership::{Member, Membership, View};
pub use state::{ClusterState, Unavailable};
