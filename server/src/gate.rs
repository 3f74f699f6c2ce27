//! The gate in front of the TLS handshake: how many connections may be open,
//! and how many may be handshaking, at once and per address.
//!
//! A TCP connection costs a file descriptor before its client has proved
//! anything; a client that connects and never sends a ClientHello holds one
//! for the whole handshake timeout. Without bounds, a flood of such
//! half-open connections (no certificate needed) runs the process out of
//! descriptors: accepts fail, certificate reloads fail, and real clients
//! wait. So: the soft descriptor limit is raised to the hard one at start,
//! a reserve of descriptors is kept for everything that is not a client
//! connection (files, reloads, the store, the metrics listener), pending
//! handshakes are capped globally and per source address, and a connection
//! over any bound is closed at once — never queued.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::config::ServerSettings;

/// Descriptors kept for everything but client connections.
pub const FD_RESERVE: u64 = 256;
/// The forward-auth endpoint's share of the connection bound: an eighth
/// (a gateway keeps a pool of connections to it; the gRPC port serves
/// every other client).
pub const FORWARD_AUTH_SHARE: usize = 8;
/// The connection bound when the descriptor limit cannot be read.
const FALLBACK_MAX_CONNECTIONS: usize = 16_384;

/// Raises the soft limit on open descriptors to the hard limit; returns the
/// limit in force afterwards (`None` if it cannot be read).
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(event = "fd_limit", error = %e, "could not raise the open file limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// The address a handshake limit counts: IPv4 as is, IPv6 by its /64
/// (IPv4-mapped IPv6 as the IPv4 address).
fn source_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

/// Why a new connection was closed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// As many connections are open as descriptors allow.
    Connections,
    /// As many handshakes are pending as allowed.
    Handshakes,
    /// As many handshakes are pending from this address as allowed.
    HandshakesFromAddress,
}

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Connections => "max_connections",
            Refusal::Handshakes => "max_handshakes",
            Refusal::HandshakesFromAddress => "max_handshakes_per_address",
        }
    }
}

/// The counts behind the bounds. One per listener.
#[derive(Debug)]
pub struct Gate {
    max_connections: usize,
    max_handshakes: usize,
    max_per_address: usize,
    open: AtomicUsize,
    handshaking: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

/// Held for as long as a connection is open.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<Gate>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Held for as long as a handshake is in progress.
#[derive(Debug)]
pub struct HandshakeSlot {
    gate: Arc<Gate>,
    address: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.gate.handshaking.fetch_sub(1, Ordering::Relaxed);
        let mut per = self.gate.per_address.lock();
        if let Some(n) = per.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.address);
            }
        }
    }
}

impl Gate {
    /// Bounds from the settings; the connection bound defaults to the
    /// descriptor limit less [`FD_RESERVE`].
    pub fn new(settings: &ServerSettings, fd_limit: Option<u64>) -> Self {
        let from_fds = fd_limit.map(|n| n.saturating_sub(FD_RESERVE).max(16));
        let max_connections = match (settings.max_connections, from_fds) {
            (Some(n), Some(fds)) if n as u64 > fds => {
                tracing::warn!(
                    event = "fd_limit",
                    max_connections = n,
                    allowed = fds,
                    "server.max_connections is above the open file limit less its reserve; using the lower bound"
                );
                fds as usize
            }
            (Some(n), _) => n,
            (None, Some(fds)) => usize::try_from(fds).unwrap_or(usize::MAX).min(1_000_000),
            (None, None) => FALLBACK_MAX_CONNECTIONS,
        };
        Self {
            max_connections,
            max_handshakes: settings.max_handshakes,
            max_per_address: settings.max_handshakes_per_address,
            open: AtomicUsize::new(0),
            handshaking: AtomicUsize::new(0),
            per_address: Mutex::new(HashMap::new()),
        }
    }

    /// Splits off the gate of another listener, with its own share of the
    /// connection bound (one `divisor`th, at least 16 but at most half),
    /// taken from this one's: together they stay within the descriptors,
    /// and a flood on either cannot take the other's connections.
    pub fn set_aside(&mut self, divisor: usize) -> Gate {
        let share = (self.max_connections / divisor)
            .max(16)
            .min(self.max_connections / 2);
        self.max_connections -= share;
        Gate {
            max_connections: share,
            max_handshakes: self.max_handshakes,
            max_per_address: self.max_per_address,
            open: AtomicUsize::new(0),
            handshaking: AtomicUsize::new(0),
            per_address: Mutex::new(HashMap::new()),
        }
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// A slot for a newly accepted connection, if one is free.
    pub fn open(self: &Arc<Self>) -> Result<ConnectionSlot, Refusal> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max_connections {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Connections);
        }
        Ok(ConnectionSlot(self.clone()))
    }

    /// A slot for a handshake from `address`, if one is free. An IPv6
    /// address counts by its /64, which one host usually has whole.
    pub fn handshake(self: &Arc<Self>, address: IpAddr) -> Result<HandshakeSlot, Refusal> {
        let address = source_of(address);
        let mut per = self.per_address.lock();
        let pending = per.entry(address).or_insert(0);
        if *pending >= self.max_per_address {
            if *pending == 0 {
                per.remove(&address);
            }
            return Err(Refusal::HandshakesFromAddress);
        }
        if self.handshaking.fetch_add(1, Ordering::Relaxed) >= self.max_handshakes {
            self.handshaking.fetch_sub(1, Ordering::Relaxed);
            if *pending == 0 {
                per.remove(&address);
            }
            return Err(Refusal::Handshakes);
        }
        *pending += 1;
        Ok(HandshakeSlot {
            gate: self.clone(),
            address,
        })
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max_connections: usize, max_handshakes: usize, per_address: usize) -> Arc<Gate> {
        let settings = ServerSettings {
            max_connections: Some(max_connections),
            max_handshakes,
            max_handshakes_per_address: per_address,
            ..ServerSettings::default()
        };
        Arc::new(Gate::new(&settings, None))
    }

    #[test]
    fn one_address_cannot_take_every_handshake_slot() {
        let g = gate(100, 10, 3);
        let attacker: IpAddr = "192.0.2.1".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| g.handshake(attacker).unwrap()).collect();
        assert_eq!(
            g.handshake(attacker).unwrap_err(),
            Refusal::HandshakesFromAddress
        );
        assert!(g.handshake("192.0.2.2".parse().unwrap()).is_ok());
        drop(held);
        assert!(g.handshake(attacker).is_ok(), "slots come back");
        assert!(g.per_address.lock().is_empty());
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64() {
        let g = gate(100, 10, 2);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let _held = (g.handshake(a).unwrap(), g.handshake(b).unwrap());
        assert_eq!(
            g.handshake("2001:db8:1:2::77".parse().unwrap())
                .unwrap_err(),
            Refusal::HandshakesFromAddress
        );
        assert!(g.handshake("2001:db8:1:3::1".parse().unwrap()).is_ok());
    }

    #[test]
    fn the_global_bounds_hold_and_free_on_drop() {
        let g = gate(16, 2, 5);
        let a = g.handshake("192.0.2.1".parse().unwrap()).unwrap();
        let _b = g.handshake("192.0.2.2".parse().unwrap()).unwrap();
        assert_eq!(
            g.handshake("192.0.2.3".parse().unwrap()).unwrap_err(),
            Refusal::Handshakes
        );
        drop(a);
        assert!(g.handshake("192.0.2.3".parse().unwrap()).is_ok());
        let slots: Vec<_> = (0..16).map(|_| g.open().unwrap()).collect();
        assert_eq!(g.open().unwrap_err(), Refusal::Connections);
        drop(slots);
        assert_eq!(g.open_connections(), 0);
    }

    #[test]
    fn the_connection_bound_keeps_a_reserve_of_descriptors() {
        let settings = ServerSettings::default();
        assert_eq!(Gate::new(&settings, Some(1024)).max_connections(), 768);
        let asked = ServerSettings {
            max_connections: Some(5000),
            ..ServerSettings::default()
        };
        assert_eq!(Gate::new(&asked, Some(1024)).max_connections(), 768);
        assert_eq!(Gate::new(&asked, None).max_connections(), 5000);
    }

    #[test]
    fn a_gate_set_aside_takes_its_share_from_the_bound() {
        let mut grpc = Gate::new(&ServerSettings::default(), Some(1024));
        let forward = grpc.set_aside(FORWARD_AUTH_SHARE);
        assert_eq!(
            (grpc.max_connections(), forward.max_connections()),
            (672, 96)
        );
        // Each bound holds on its own.
        let forward = Arc::new(forward);
        let held: Vec<_> = (0..96).map(|_| forward.open().unwrap()).collect();
        assert_eq!(forward.open().unwrap_err(), Refusal::Connections);
        assert!(Arc::new(grpc).open().is_ok());
        drop(held);
        // A small bound still leaves the listener some, and never more than half.
        let mut tiny = Gate::new(&ServerSettings::default(), Some(256 + 20));
        assert_eq!(tiny.set_aside(FORWARD_AUTH_SHARE).max_connections(), 10);
        assert_eq!(tiny.max_connections(), 10);
    }
}
