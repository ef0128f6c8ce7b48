//! The bounds every listener of a node keeps: how many connections it holds, from whom, for
//! how long, and how many bytes it holds for any one of them. `docs/security.md` lists each
//! bound with its default and why.
//!
//! [`Gate`] is the pure part: it counts connections per source address and per peer and says
//! whether one more is admitted; the listeners ask it and hold the [`Ticket`] it hands out for
//! as long as the connection lives.

use serde::Deserialize;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Connection and buffer bounds, from `[node.limits]` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Connections held at once on each peer listener (bulk, libp2p), handshakes included.
    pub max_connections: usize,
    /// Connections from one IP address on each peer listener.
    pub max_per_ip: usize,
    /// Bulk connections from one peer identity.
    pub max_per_peer: usize,
    /// Seconds to finish the encrypted handshake and prove admission.
    pub handshake_secs: u64,
    /// Seconds a bulk connection may stay without a request before it is closed.
    pub idle_secs: u64,
    /// Seconds a write may make no progress (a peer that stopped reading) before the
    /// connection is dropped.
    pub write_secs: u64,
    /// Bytes of answers a bulk connection may hold ready to send (beyond one blob).
    pub conn_buffer: usize,
    /// Local clients (CLI commands, mounts) served at once over the daemon's socket.
    pub max_local_clients: usize,
    /// Connections at once on the metrics endpoint.
    pub max_metrics_clients: usize,
    /// The peer set: a node dials peers it learns of until it has this many, accepts those
    /// that dial it, and past one and a half times this closes the connections it needs least
    /// (down to this many). A cluster of up to this many nodes is a full mesh; a larger fleet
    /// finds who pulls and holds a version through rosters (docs/swarm.md).
    pub peers: usize,
}

/// The defaults: a cluster of hundreds of nodes holds one bulk connection per pair in use,
/// so 512 connections leave room for a large cluster while a flood of 2,000 connects costs
/// at most 512 file descriptors and (at 4 MiB each) 2 GiB of buffers in theory, far less in
/// practice since an idle connection holds no answer.
impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            max_per_ip: 64,
            max_per_peer: 4,
            handshake_secs: 10,
            idle_secs: 300,
            write_secs: 20,
            conn_buffer: 4 << 20,
            max_local_clients: 256,
            max_metrics_clients: 16,
            peers: 48,
        }
    }
}

impl Limits {
    pub fn handshake(&self) -> Duration {
        Duration::from_secs(self.handshake_secs.max(1))
    }
    pub fn idle(&self) -> Duration {
        Duration::from_secs(self.idle_secs.max(1))
    }
    pub fn write(&self) -> Duration {
        Duration::from_secs(self.write_secs.max(1))
    }

    /// These limits, shrunk where needed so that every listener at its limit still leaves
    /// [`RESERVED_FDS`] descriptors (store segments, sled, mounts, origin connections) under an
    /// open-file limit of `nofile`: a flood fills the listeners, never the descriptor table,
    /// so the daemon's own socket keeps answering. Each peer connection may cost a descriptor
    /// on the control listener, one on the bulk listener and one bulk client.
    pub fn fit_to(&self, nofile: u64) -> Limits {
        let avail = nofile.saturating_sub(RESERVED_FDS).max(64) as usize;
        let mut l = self.clone();
        l.max_local_clients = l.max_local_clients.min(avail / 8).max(1);
        l.max_metrics_clients = l.max_metrics_clients.min(16);
        let peers = (avail - l.max_local_clients - l.max_metrics_clients) / 3;
        l.max_connections = l.max_connections.min(peers).max(8);
        l.max_per_ip = l.max_per_ip.min(l.max_connections);
        l.peers = l.peers.min(l.max_connections * 2 / 3).max(1);
        l
    }

    /// Past this many peers, the ones needed least are let go (down to [`Self::peers`]).
    pub fn peers_high(&self) -> usize {
        self.peers + self.peers / 2
    }

    /// Why these limits cannot work, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.max_connections == 0 || self.max_per_ip == 0 || self.max_per_peer == 0 {
            return Err("connection limits must be at least 1".into());
        }
        if self.peers == 0 {
            return Err("peers must be at least 1".into());
        }
        if self.max_local_clients == 0 {
            return Err("max_local_clients must be at least 1".into());
        }
        if self.conn_buffer < 64 << 10 {
            return Err("conn_buffer must be at least 64 KiB".into());
        }
        Ok(())
    }
}

/// Descriptors kept out of the listeners' reach (see [`Limits::fit_to`]).
pub const RESERVED_FDS: u64 = 256;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds its most connections.
    Full,
    /// This address holds its most connections.
    PerIp,
    /// This peer identity holds its most connections.
    PerPeer,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Full => "the listener is at its connection limit",
            Refusal::PerIp => "this address is at its connection limit",
            Refusal::PerPeer => "this peer is at its connection limit",
        })
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    per_peer: HashMap<Vec<u8>, usize>,
}

/// Counts a listener's connections; cheap to share.
#[derive(Debug)]
pub struct Gate {
    max_total: usize,
    max_per_ip: usize,
    max_per_peer: usize,
    counts: Mutex<Counts>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<Gate>,
    ip: IpAddr,
    peer: Option<Vec<u8>>,
}

fn dec<K: std::hash::Hash + Eq>(m: &mut HashMap<K, usize>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            m.remove(k);
        }
    }
}

impl Gate {
    pub fn new(max_total: usize, max_per_ip: usize, max_per_peer: usize) -> Arc<Gate> {
        Arc::new(Gate {
            max_total,
            max_per_ip,
            max_per_peer,
            counts: Mutex::default(),
        })
    }

    /// A gate for a peer listener with these limits.
    pub fn for_peers(l: &Limits) -> Arc<Gate> {
        Gate::new(l.max_connections, l.max_per_ip, l.max_per_peer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().expect("gate poisoned")
    }

    /// Admits a connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        let mut c = self.lock();
        if c.total >= self.max_total {
            return Err(Refusal::Full);
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(Refusal::PerIp);
        }
        *n += 1;
        c.total += 1;
        Ok(Ticket {
            gate: self.clone(),
            ip,
            peer: None,
        })
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.lock().total
    }
}

impl Ticket {
    /// Counts this connection against the peer identity it proved (once).
    pub fn identify(&mut self, peer: &[u8]) -> Result<(), Refusal> {
        if self.peer.is_some() {
            return Ok(());
        }
        let mut c = self.gate.lock();
        let n = c.per_peer.entry(peer.to_vec()).or_insert(0);
        if *n >= self.gate.max_per_peer {
            return Err(Refusal::PerPeer);
        }
        *n += 1;
        drop(c);
        self.peer = Some(peer.to_vec());
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.gate.lock();
        c.total -= 1;
        dec(&mut c.per_ip, &self.ip);
        if let Some(p) = &self.peer {
            dec(&mut c.per_peer, p);
        }
    }
}

/// Raises this process's open-file soft limit to its hard limit (a node holds a descriptor per
/// connection, segment and mount); returns the limit now in force.
pub fn raise_nofile() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            tracing::warn!("raising the open-file limit: {e}");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// How long to wait after a failed `accept` before the next: descriptors running out
/// (EMFILE, ENFILE) or memory for sockets (ENOBUFS, ENOMEM) get better only as connections
/// close, so back off; anything else (a connection aborted before it was accepted) is the
/// peer's problem, not the listener's.
pub fn accept_backoff(e: &std::io::Error) -> Duration {
    match e.raw_os_error() {
        Some(libc_code) if is_resource_exhaustion(libc_code) => Duration::from_millis(100),
        _ => Duration::from_millis(5),
    }
}

fn is_resource_exhaustion(code: i32) -> bool {
    use rustix::io::Errno;
    let e = Errno::from_raw_os_error(code);
    e == Errno::MFILE || e == Errno::NFILE || e == Errno::NOBUFS || e == Errno::NOMEM
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_counts_total_per_ip_and_per_peer_and_frees_on_drop() {
        let g = Gate::new(3, 2, 1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t1 = g.admit(a).unwrap();
        let mut t2 = g.admit(a).unwrap();
        assert_eq!(g.admit(a).unwrap_err(), Refusal::PerIp);
        let mut t3 = g.admit(b).unwrap();
        assert_eq!(g.admit(b).unwrap_err(), Refusal::Full);
        assert_eq!(g.held(), 3);
        t2.identify(b"peer-1").unwrap();
        assert_eq!(t3.identify(b"peer-1").unwrap_err(), Refusal::PerPeer);
        t3.identify(b"peer-2").unwrap();
        drop(t2);
        assert_eq!(g.held(), 2);
        let mut t4 = g.admit(a).unwrap();
        t4.identify(b"peer-1").unwrap();
        drop((t1, t3, t4));
        assert_eq!(g.held(), 0);
        let c = g.lock();
        assert!(c.per_ip.is_empty() && c.per_peer.is_empty());
    }

    #[test]
    fn limits_fit_under_the_open_file_limit() {
        let l = Limits::default();
        assert_eq!(l.fit_to(1 << 20), l, "a high limit changes nothing");
        let small = l.fit_to(1024);
        let worst = 3 * small.max_connections + small.max_local_clients + small.max_metrics_clients;
        assert!(worst as u64 + RESERVED_FDS <= 1024, "{small:?}");
        assert!(small.max_connections >= 8 && small.max_per_ip <= small.max_connections);
        assert!(
            l.fit_to(10).max_connections >= 8,
            "never below a working minimum"
        );
    }

    #[test]
    fn limits_reject_zero() {
        assert!(Limits::default().check().is_ok());
        let l = Limits {
            max_per_ip: 0,
            ..Limits::default()
        };
        assert!(l.check().is_err());
    }
}
