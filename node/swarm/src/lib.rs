//! The swarm: this node's peers, what each of them holds, and how chunks move between them.
//!
//! Control traffic (hello, version announcements, have-maps, peer exchange) runs over libp2p
//! (TCP, TLS 1.3 with libp2p identities, yamux; identify, ping, mDNS). Chunk bytes run over a
//! separate bulk channel ([`bulk`]): one TCP connection per peer pair, TLS 1.3 authenticated
//! with the same libp2p identity certificates, carrying length-prefixed batches of chunks
//! without a stream multiplexer in the way. `docs/swarm.md` has the measurements behind this.

pub mod admission;
pub mod ask;
pub mod bootstrap;
pub mod bulk;
mod counted;
pub mod error;
mod gate;
pub mod limits;
pub mod metrics;
mod p2p;
pub mod rate;
pub mod roster;
mod tls;
mod turns;
mod view;

/// The control protocol's messages, for tools and tests that speak it.
pub mod wire {
    pub use super::p2p::{Auth, Delta, Held, Hello, Req, Resp, AUTH_PROTOCOL, MAX_DELTA, PROTOCOL};
    pub use super::roster::Listing;
    pub use super::tls::{client as tls_client, server as tls_server};
}

pub use error::{Error, Result};
use serde::{Deserialize, Serialize};
use shoal_registry::Hash;
use shoal_store::ChunkStore;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub use libp2p::identity::Keypair;
pub use libp2p::{Multiaddr, PeerId};
pub use p2p::start;
pub use view::PullView;

/// Where a node sits: sources in the same rack are preferred, then zone, then region.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labels {
    pub region: Option<String>,
    pub zone: Option<String>,
    pub rack: Option<String>,
}

impl Labels {
    /// 0 same rack, 1 same zone, 2 same region, 3 anything else (or unknown).
    pub fn distance(&self, other: &Labels) -> u8 {
        fn same(a: &Option<String>, b: &Option<String>) -> Option<bool> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a == b),
                _ => None,
            }
        }
        if same(&self.region, &other.region) == Some(false) {
            return 3;
        }
        match same(&self.zone, &other.zone) {
            Some(true) if same(&self.rack, &other.rack) == Some(true) => 0,
            Some(true) => 1,
            Some(false) => 3,
            None if same(&self.region, &other.region) == Some(true) => 2,
            None => 3,
        }
    }
}

/// How to run the swarm.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub labels: Labels,
    /// Who may connect, fetch or announce.
    pub admission: admission::Admission,
    pub mdns: bool,
    /// Connection and buffer bounds of the listeners.
    pub limits: crate::limits::Limits,
    /// Upload and download rates (the origin rate is the node's: `shoal_node::origins`).
    pub rates: rate::RateLimits,
    /// Send peers compressible chunks compressed (zstd level 1, chosen per group of an
    /// answer by a probe; see `bulk`). Receiving compressed answers is always on.
    pub wire_compression: bool,
}

/// What a node says about one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Holding {
    /// Every chunk is in the node's store.
    Complete,
    /// A pull is filling it; ask for the have-map.
    Pulling,
    /// A mount reads it on demand. The node holds some of its chunks and reads from the
    /// origin, for itself and for the other mounting peers that ask, the runs of the version's
    /// packs it owns (rendezvous hashing over the mounting nodes), so a cold version mounted
    /// on many nodes is read from the origin about once.
    Mounted,
}

/// Fetches blobs of a mounted version from the origin for a peer (through requests).
pub trait Through: Send + Sync {
    /// The verified bytes of those of `ids` it could get (the origin only: never other peers).
    fn fetch_for_peer(
        &self,
        ids: Vec<Hash>,
    ) -> futures::future::BoxFuture<'static, std::result::Result<HashMap<Hash, bytes::Bytes>, String>>;
}

/// One mount of a version here: its registration token and its fetcher.
pub(crate) type MountEntry = (u64, Arc<dyn Through>);

/// Registration of a mounted version with the swarm; dropping it withdraws the announcement.
pub struct Mounted {
    swarm: Arc<Swarm>,
    root: Hash,
    token: u64,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let mut through = self.swarm.through.lock().expect("poisoned");
        if let Some(v) = through.get_mut(&self.root) {
            v.retain(|(t, _)| *t != self.token);
            if v.is_empty() {
                through.remove(&self.root);
            }
        }
        drop(through);
        self.swarm.announce();
    }
}

/// A bitmap over a version's unique chunks in walk order.
pub use shoal_sched::HaveMap;

/// What a peer holds of one version as far as its have-map goes, as last heard (how it holds
/// it is in the [`Table`]'s [`Peer::versions`]). Only the event loop keeps these.
#[derive(Debug, Clone)]
pub(crate) struct PeerVersion {
    pub have: Option<HaveMap>,
    /// How many chunks the have-map had, and when that count last grew (a puller whose count
    /// stops growing is no longer counted on to fetch its share from the origin).
    pub count: u64,
    pub grew: Instant,
    /// The have-map came over the current connection (one from before a reconnection may
    /// claim chunks a restarted peer lost: used, but its misses are not held against it).
    pub fresh: bool,
    /// Bumped whenever `have` is replaced (so a pull hands only new maps to its scheduler).
    pub gen: u64,
    /// Chunks set in `have` by deltas since it was last replaced, in arrival order (a pull
    /// hands its scheduler the part it has not seen). Bounded: past a thirty-second of the
    /// map's length (the map's own size in bytes) it is cleared and `gen` bumped, so readers
    /// take the whole map again.
    pub log: Vec<u32>,
    /// The peer's delta stream this map follows: its epoch, and the position in it up to
    /// which the map is complete (None until a map arrived).
    pub stream: Option<(u64, u64)>,
    /// When this node last asked for the whole map because a delta did not follow on.
    pub asked: Option<Instant>,
}

impl PeerVersion {
    pub(crate) fn new(now: Instant) -> PeerVersion {
        PeerVersion {
            have: None,
            count: 0,
            grew: now,
            fresh: false,
            gen: 0,
            log: Vec::new(),
            stream: None,
            asked: None,
        }
    }

    /// Applies a delta from the peer's stream `epoch`, chunks `from..` of it. Returns false
    /// when it does not follow on from the map held (another epoch, or a gap): the whole map
    /// must be asked for.
    pub(crate) fn apply(&mut self, epoch: u64, from: u64, chunks: &[u32], now: Instant) -> bool {
        let (Some(have), Some((e, upto))) = (self.have.as_mut(), self.stream.as_mut()) else {
            return false;
        };
        if *e != epoch || from > *upto {
            return false;
        }
        let (before, len) = (self.count, have.len);
        for &i in chunks.iter().filter(|&&i| i < len) {
            if !have.get(i as usize) {
                have.set(i as usize);
                self.count += 1;
                self.log.push(i);
            }
        }
        *upto = (*upto).max(from + chunks.len() as u64);
        if self.count > before {
            self.grew = now;
        }
        if self.log.len() > have.len as usize / 32 + 1024 {
            self.log.clear();
            self.gen = self.gen.wrapping_add(1);
        }
        true
    }
}

/// One known peer, as the event loop last published it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub labels: Labels,
    pub ip: Option<IpAddr>,
    pub bulk_port: Option<u16>,
    pub connected: bool,
    pub rtt: Option<Duration>,
    /// Bytes per second received from this peer over the bulk channel (moving average).
    pub throughput: f64,
    /// The versions it announced, and how it holds each (shared between snapshots: replaced
    /// whole when it announces again).
    pub versions: Arc<HashMap<Hash, Holding>>,
    /// Chunks it sent that failed verification, and requests it let time out.
    pub faults: u32,
    pub stalls: u32,
    /// "Not here" answers for chunks it said it had (a stale have-map, or a lie).
    pub misses: u32,
    /// Times it owned something this node asked it for (a version's metadata, a mounted
    /// version's runs) and sent none of it in time, since it connected: it owns nothing more
    /// for this node while it stays connected.
    pub owner_stalls: u32,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// The fraction of a version it pulls or mounts that it lacks, as far as its have-maps
    /// go (the most of any such version; 0 when it sent none): its place in line for this
    /// node's uplink ([`turns`]).
    pub behind: f32,
}

impl Peer {
    pub(crate) fn new() -> Peer {
        Peer {
            labels: Labels::default(),
            ip: None,
            bulk_port: None,
            connected: false,
            rtt: None,
            throughput: 0.0,
            versions: Arc::default(),
            faults: 0,
            stalls: 0,
            misses: 0,
            owner_stalls: 0,
            bytes_received: 0,
            bytes_sent: 0,
            behind: 0.0,
        }
    }

    pub fn bulk_addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.ip?, self.bulk_port?))
    }
}

/// The peer table. The event loop owns it and is its only writer; everyone else reads the
/// snapshot it last published ([`Swarm::table`]: a `watch`, never a lock held across work)
/// and changes it by sending the loop a command ([`Swarm::report`]).
///
/// Bounded: at most [`MAX_PEERS`] peers remembered and bans kept. A snapshot shares each
/// peer's entry with the one before (`Arc`), so publishing copies a pointer per peer.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub peers: HashMap<PeerId, Arc<Peer>>,
    /// Peers admitted now (proved the cluster key on the control channel, or needed no
    /// proof), while connected.
    pub(crate) admitted: HashSet<PeerId>,
    pub(crate) banned: HashSet<PeerId>,
    /// Where the libp2p listeners are bound.
    pub(crate) listen: Vec<Multiaddr>,
}

impl Table {
    /// Whether `peer` is admitted now and not banned.
    pub fn is_member(&self, peer: &PeerId) -> bool {
        !self.banned.contains(peer) && self.admitted.contains(peer)
    }

    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned.contains(peer)
    }

    /// Whether chunks can be asked of this peer now: connected, with a bulk address, admitted.
    pub fn can_ask(&self, id: &PeerId, p: &Peer) -> bool {
        p.connected && p.bulk_port.is_some() && self.is_member(id)
    }

    /// The peers chunks can be asked of now that announced `root`, with how they hold it.
    pub fn holders<'a>(
        &'a self,
        root: &'a Hash,
    ) -> impl Iterator<Item = (&'a PeerId, &'a Peer, Holding)> + 'a {
        self.peers.iter().filter_map(move |(id, p)| {
            let h = *p.versions.get(root)?;
            self.can_ask(id, p).then_some((id, &**p, h))
        })
    }
}

/// What pulls and asks tell the event loop about a peer (through [`Swarm::report`]).
#[derive(Debug)]
pub enum Report {
    /// It let a request go late (it was asked elsewhere).
    Stall,
    /// "Not here" for a chunk it advertised (what); every [`MISSES_PER_FAULT`] are a fault.
    Miss(String),
    /// It broke the protocol or sent bytes that do not match their id (what); after
    /// [`MAX_FAULTS`] it is banned and disconnected.
    Fault(String),
    /// It owned what this node asked of it and sent none of it in time.
    OwnerStall,
    /// Verified bytes arrived from it, at this rate (bytes per second).
    Received { bytes: u64, rate: f64 },
    /// Bytes this node served it.
    Sent(u64),
}

/// A version this node holds or is pulling.
#[derive(Debug)]
pub struct LocalVersion {
    pub name: String,
    pub holding: Holding,
    pub have: Option<HaveMap>,
    /// When this node first announced it with this holding, and the same in milliseconds
    /// since the Unix epoch (what the rosters say of when it started pulling).
    pub since: std::time::Instant,
    pub since_ms: u64,
    /// The delta stream peers follow for `have` (see `PeerVersion::apply`): a random epoch
    /// per map, how many chunks were marked in it, and those not yet sent (each chunk is
    /// marked once, so at most the version's chunks).
    pub epoch: u64,
    pub marks: u64,
    pub unsent: Vec<u32>,
}

/// Node-wide counters (also exported as Prometheus metrics).
#[derive(Debug, Default)]
pub struct Counters {
    pub bytes_from_peers: AtomicU64,
    pub bytes_from_origin: AtomicU64,
    pub bytes_served: AtomicU64,
    /// Bytes of answers sent to peers as they went on the wire (compressed frames at their
    /// compressed size, record heads included).
    pub bytes_served_wire: AtomicU64,
    /// Bytes of answers received from peers as they came on the wire.
    pub bytes_from_peers_wire: AtomicU64,
    pub verify_failures: AtomicU64,
    pub active_pulls: AtomicU64,
    /// Bytes of the control protocols (hellos, have-maps, deltas, rosters, proofs).
    pub control: Arc<counted::ControlBytes>,
    /// Origin readers pulls passed over for showing no sign of life, and of those, how many
    /// by `reader_lag` (about a second) rather than a quiet spell.
    pub readers_passed_over: AtomicU64,
    pub readers_passed_over_by_lag: AtomicU64,
    /// Chunk bytes received from peers, verified, by the peer's distance: same rack, same
    /// zone, same region, farther (or unlabelled).
    pub bytes_from_peers_by_distance: [AtomicU64; 4],
}

/// Commands to the event loop, through a bounded queue ([`p2p::CMD_QUEUE`]). Those sent with
/// [`Swarm::send`] never wait, and a full queue drops them: they are repeated anyway (a pull
/// asks for a missing map at every poll). Reports and views wait for room ([`Swarm::report`],
/// [`PullView::run`]): they are never dropped. Announcements go through [`Swarm::announce`]
/// instead, which coalesces.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// Ask a peer for its have-map of a version.
    QueryHave(PeerId, Hash),
    /// Something a pull or an ask saw a peer do.
    Report(PeerId, Report),
    /// What changed for a pull since it last asked (answered on the reply channel).
    View(view::Ask, tokio::sync::oneshot::Sender<view::Answer>),
}

/// Peers remembered (connected or not) and bans kept: a node churning through identities
/// cannot grow either without bound.
pub const MAX_PEERS: usize = 4096;

/// "Not here" answers for advertised chunks that count as one fault.
pub const MISSES_PER_FAULT: u32 = 8;

/// Faults after which a peer is disconnected and no longer used.
pub const MAX_FAULTS: u32 = 3;

/// A handle on the swarm, shared by the bulk server and clients, pulls and mounts. The peer
/// table and the rosters are the event loop's ([`Table`]: read as a published snapshot,
/// changed by commands); what stays here behind locks is this node's own side: the versions
/// it holds or pulls (`local`, marked chunk by chunk by its pulls), its mounts (`through`)
/// and its bulk connections (`clients`), none held across an await.
pub struct Swarm {
    pub peer_id: PeerId,
    pub labels: Labels,
    pub(crate) keypair: Keypair,
    pub(crate) store: Arc<dyn ChunkStore>,
    pub(crate) admission: admission::Admission,
    pub(crate) limits: crate::limits::Limits,
    /// The peer table as the event loop last published it.
    pub(crate) table: tokio::sync::watch::Receiver<Arc<Table>>,
    pub(crate) local: Mutex<HashMap<Hash, LocalVersion>>,
    pub(crate) bulk_addr: SocketAddr,
    pub counters: Counters,
    pub(crate) cmd: mpsc::Sender<Cmd>,
    /// Set when what this node holds changed: the event loop tells its peers (once for any
    /// number of changes since it last did).
    pub(crate) announce: tokio::sync::Notify,
    pub(crate) clients: Mutex<HashMap<PeerId, Arc<bulk::Client>>>,
    /// Where pack indexes are cached (served to peers like chunks: they are named by hash).
    pub(crate) pack_cache: std::path::PathBuf,
    /// Faults to inject, for tests of the swarm's defences (SHOAL_FAULT_INJECT=lie|stall|slow).
    pub(crate) fault: Option<String>,
    /// Versions mounted here, with what fetches their blobs for peers.
    pub(crate) through: Mutex<HashMap<Hash, Vec<MountEntry>>>,
    pub(crate) next_token: AtomicU64,
    /// Whom the uplink serves next: the bulk writers take turns, neediest peer first.
    pub(crate) turns: turns::Turns,
    /// What this node sends its peers, and receives from them, per second at most.
    pub(crate) upload: Option<rate::Rate>,
    pub(crate) download: Option<rate::Rate>,
}

impl std::fmt::Debug for Swarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swarm")
            .field("peer_id", &self.peer_id)
            .finish()
    }
}

/// A peer as `shoal status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub peer_id: String,
    pub connected: bool,
    pub labels: Labels,
    pub distance: u8,
    pub bulk_addr: Option<String>,
    pub rtt_ms: Option<f64>,
    pub throughput_mbps: f64,
    pub versions: Vec<String>,
    pub faults: u32,
    pub stalls: u32,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

/// `shoal status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub peer_id: String,
    pub listen: Vec<String>,
    pub bulk_addr: Option<String>,
    pub labels: Labels,
    pub members_only: bool,
    /// How peers are admitted: open, cluster key, members, cluster key or members, loopback
    /// only.
    #[serde(default)]
    pub admission: String,
    /// Fingerprint of the cluster key, to check that nodes share it.
    #[serde(default)]
    pub cluster_key: Option<String>,
    pub peers: Vec<PeerStatus>,
    pub versions: Vec<VersionStatus>,
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    pub bytes_served: u64,
    /// Answer bytes as they went on the wire (compressed), and as they came from peers.
    #[serde(default)]
    pub bytes_served_wire: u64,
    #[serde(default)]
    pub bytes_from_peers_wire: u64,
    pub verify_failures: u64,
    pub active_pulls: u64,
    /// Bytes of the control protocols sent and received (hellos, have-maps and deltas,
    /// rosters, admission proofs; without libp2p's own framing).
    #[serde(default)]
    pub control_bytes_sent: u64,
    #[serde(default)]
    pub control_bytes_received: u64,
    /// Origin readers this node's pulls passed over for showing no sign of life, and of those,
    /// how many by `reader_lag`.
    #[serde(default)]
    pub readers_passed_over: u64,
    #[serde(default)]
    pub readers_passed_over_by_lag: u64,
    /// Mounts the daemon serves now.
    #[serde(default)]
    pub mounts: Vec<MountStatus>,
    /// The node's rate limits, bytes per second (null: unlimited).
    #[serde(default)]
    pub rates: rate::RateLimits,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountStatus {
    pub mountpoint: String,
    /// The reference as asked for.
    pub reference: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionStatus {
    pub name: String,
    pub root: String,
    pub holding: Holding,
    pub chunks_held: Option<u64>,
    pub chunks: Option<u64>,
}

impl Swarm {
    /// Queues a request to the event loop; never waits (see [`Cmd`] for why a full queue may
    /// drop it).
    pub(crate) fn send(&self, cmd: Cmd) {
        if let Err(e) = self.cmd.try_send(cmd) {
            tracing::debug!("swarm event loop busy, request dropped: {e}");
        }
    }

    /// Asks `peer`, soon, for its whole have-map of version `root` (the answer lands in the
    /// peer table).
    pub fn query_have(&self, peer: PeerId, root: Hash) {
        self.send(Cmd::QueryHave(peer, root));
    }

    /// Tells the event loop what a peer did (counted in its entry of the table; faults and
    /// misses may get it banned). Waits for room in the loop's queue: reports are never
    /// dropped, and the queue stays bounded.
    ///
    /// Cancel-safe: a report cancelled before it was queued is not counted.
    pub async fn report(&self, peer: PeerId, what: Report) {
        let _ = self.cmd.send(Cmd::Report(peer, what)).await;
    }

    /// The peer table as the event loop last published it.
    pub fn table(&self) -> Arc<Table> {
        self.table.borrow().clone()
    }

    /// The store chunks are served from and fetched into.
    pub fn store(&self) -> &Arc<dyn ChunkStore> {
        &self.store
    }

    /// Tells the peers, soon, what this node now holds.
    pub(crate) fn announce(&self) {
        self.announce.notify_one();
    }

    /// Whether `peer` is admitted now (proved the cluster key on the control channel, or needs
    /// no proof) and not banned.
    pub fn is_member(&self, peer: &PeerId) -> bool {
        self.table.borrow().is_member(peer)
    }

    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.table.borrow().is_banned(peer)
    }

    /// Since when this node has listed itself as pulling `root` (the instant of the start
    /// time its rosters carry), if it is.
    pub fn pulling_since(&self, root: &Hash) -> Option<std::time::Instant> {
        let local = self.local.lock().expect("poisoned");
        local
            .get(root)
            .filter(|v| v.holding == Holding::Pulling)
            .map(|v| v.since)
    }

    /// Records that this node holds (or is pulling) a version, and tells the peers.
    pub fn hold(&self, root: Hash, name: &str, holding: Holding, have: Option<HaveMap>) {
        let mut local = self.local.lock().expect("poisoned");
        let (since, since_ms) = local
            .get(&root)
            .filter(|v| v.holding == holding)
            .map_or_else(
                || (std::time::Instant::now(), unix_ms()),
                |v| (v.since, v.since_ms),
            );
        local.insert(
            root,
            LocalVersion {
                name: name.to_string(),
                holding,
                have,
                since,
                since_ms,
                epoch: rand::random(),
                marks: 0,
                unsent: Vec::new(),
            },
        );
        drop(local);
        self.announce();
    }

    /// Announces that a mount reads `root` here and can fetch its blobs for peers, until the
    /// returned registration is dropped.
    pub fn mount(self: &Arc<Self>, root: Hash, fetcher: Arc<dyn Through>) -> Mounted {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.through
            .lock()
            .expect("poisoned")
            .entry(root)
            .or_default()
            .push((token, fetcher));
        self.announce();
        Mounted {
            swarm: self.clone(),
            root,
            token,
        }
    }

    pub(crate) fn through_fetcher(&self, root: &Hash) -> Option<Arc<dyn Through>> {
        self.through
            .lock()
            .expect("poisoned")
            .get(root)
            .and_then(|v| v.first())
            .map(|(_, f)| f.clone())
    }

    /// The versions this node announces: those it holds or pulls, then those only mounted.
    pub(crate) fn holdings(&self) -> Vec<(Hash, Holding)> {
        let mut out: Vec<(Hash, Holding)> = self
            .local
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(r, v)| (*r, v.holding))
            .collect();
        for root in self.through.lock().expect("poisoned").keys() {
            if !out.iter().any(|(r, _)| r == root) {
                out.push((*root, Holding::Mounted));
            }
        }
        out
    }

    /// How this node holds version `root`, if it announces it.
    pub fn holding(&self, root: &Hash) -> Option<Holding> {
        self.local
            .lock()
            .expect("poisoned")
            .get(root)
            .map(|v| v.holding)
    }

    /// Forgets a version this node was pulling (a failed pull) and tells the peers.
    pub fn release(&self, root: &Hash) {
        let mut local = self.local.lock().expect("poisoned");
        if matches!(local.get(root), Some(v) if v.holding == Holding::Pulling) {
            local.remove(root);
        }
        drop(local);
        self.announce();
    }

    /// Stops announcing a version held whole (it is no longer: gc or eviction took part of
    /// it) and tells the peers.
    pub fn withdraw(&self, root: &Hash) {
        let mut local = self.local.lock().expect("poisoned");
        if matches!(local.get(root), Some(v) if v.holding == Holding::Complete) {
            local.remove(root);
        }
        drop(local);
        self.announce();
    }

    /// The versions announced as held whole.
    pub fn complete_versions(&self) -> Vec<Hash> {
        self.local
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|(_, v)| v.holding == Holding::Complete)
            .map(|(r, _)| *r)
            .collect()
    }

    /// Marks chunk `i` of a version being pulled as held.
    pub fn mark(&self, root: &Hash, i: usize) {
        if let Some(v) = self.local.lock().expect("poisoned").get_mut(root) {
            if let Some(h) = v.have.as_mut() {
                if i < h.len as usize && !h.get(i) {
                    h.set(i);
                    v.marks += 1;
                    v.unsent.push(i as u32);
                }
            }
        }
    }

    pub fn status(&self) -> Status {
        let table = self.table();
        let mut list: Vec<PeerStatus> = table
            .peers
            .iter()
            .map(|(id, p)| PeerStatus {
                peer_id: id.to_string(),
                connected: p.connected,
                labels: p.labels.clone(),
                distance: self.labels.distance(&p.labels),
                bulk_addr: p.bulk_addr().map(|a| a.to_string()),
                rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1000.0),
                throughput_mbps: p.throughput / 1e6,
                versions: p
                    .versions
                    .iter()
                    .map(|(r, v)| format!("b3:{r} ({v:?})").to_lowercase())
                    .collect(),
                faults: p.faults,
                stalls: p.stalls,
                bytes_received: p.bytes_received,
                bytes_sent: p.bytes_sent,
            })
            .collect();
        list.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        let versions = self
            .local
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(root, v)| VersionStatus {
                name: v.name.clone(),
                root: format!("b3:{root}"),
                holding: v.holding,
                chunks_held: v.have.as_ref().map(|h| h.count()),
                chunks: v.have.as_ref().map(|h| h.len as u64),
            })
            .collect();
        let c = &self.counters;
        Status {
            peer_id: self.peer_id.to_string(),
            listen: table.listen.iter().map(|a| a.to_string()).collect(),
            bulk_addr: Some(self.bulk_addr.to_string()),
            labels: self.labels.clone(),
            members_only: !self.admission.open,
            admission: self.admission.mode().to_string(),
            cluster_key: self
                .admission
                .key
                .as_ref()
                .map(|k| k.fingerprint().to_string()),
            peers: list,
            versions,
            bytes_from_peers: c.bytes_from_peers.load(Ordering::Relaxed),
            bytes_from_origin: c.bytes_from_origin.load(Ordering::Relaxed),
            bytes_served: c.bytes_served.load(Ordering::Relaxed),
            bytes_served_wire: c.bytes_served_wire.load(Ordering::Relaxed),
            bytes_from_peers_wire: c.bytes_from_peers_wire.load(Ordering::Relaxed),
            verify_failures: c.verify_failures.load(Ordering::Relaxed),
            active_pulls: c.active_pulls.load(Ordering::Relaxed),
            control_bytes_sent: c.control.sent.load(Ordering::Relaxed),
            control_bytes_received: c.control.received.load(Ordering::Relaxed),
            readers_passed_over: c.readers_passed_over.load(Ordering::Relaxed),
            readers_passed_over_by_lag: c.readers_passed_over_by_lag.load(Ordering::Relaxed),
            mounts: Vec::new(),
            rates: rate::RateLimits {
                origin: None,
                upload: self.upload.as_ref().map(rate::Rate::per_second),
                download: self.download.as_ref().map(rate::Rate::per_second),
            },
        }
    }

    /// The bulk client for a peer, connecting on first use.
    ///
    /// Cancel-safe: a client is registered only once connected.
    pub async fn client(self: &Arc<Self>, peer: PeerId) -> Result<Arc<bulk::Client>> {
        if let Some(c) = self.clients.lock().expect("poisoned").get(&peer) {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let addr = self
            .table
            .borrow()
            .peers
            .get(&peer)
            .and_then(|p| p.bulk_addr())
            .ok_or_else(|| Error::Net(format!("peer {peer} has no known bulk address")))?;
        let c = Arc::new(bulk::Client::connect(self.clone(), peer, addr).await?);
        self.clients
            .lock()
            .expect("poisoned")
            .insert(peer, c.clone());
        Ok(c)
    }
}

/// Milliseconds since the Unix epoch now (0 on a clock set before it).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A node's libp2p identity from its protobuf encoding (`what` names where it was read).
pub fn decode_identity(bytes: &[u8], what: &str) -> Result<Keypair> {
    Keypair::from_protobuf_encoding(bytes).map_err(|e| Error::Corrupt {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

/// A new ed25519 identity and its protobuf encoding, for the node to keep.
pub fn new_identity() -> Result<(Keypair, Vec<u8>)> {
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .map_err(|e| Error::Net(format!("encoding node key: {e}")))?;
    Ok((key, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_map(len: usize, epoch: u64, upto: u64) -> PeerVersion {
        let mut v = PeerVersion::new(Instant::now());
        v.have = Some(HaveMap::new(len));
        v.stream = Some((epoch, upto));
        v
    }

    /// A delta applies only on the stream (epoch) of the map held and only without a gap;
    /// overlaps and repeats are harmless, and out-of-range chunks are ignored.
    #[test]
    fn a_delta_applies_only_where_it_follows_on() {
        let now = Instant::now();
        let mut v = with_map(100, 7, 2);
        assert!(v.apply(7, 0, &[0, 1, 5], now), "an overlap applies");
        assert_eq!((v.count, v.stream), (3, Some((7, 3))));
        assert!(
            v.apply(7, 3, &[5, 6, 1000], now),
            "a repeat and an out-of-range number"
        );
        assert_eq!(v.count, 4);
        assert_eq!(v.log, vec![0, 1, 5, 6]);
        assert!(!v.apply(7, 9, &[9], now), "a gap asks for the map");
        assert!(
            !v.apply(8, 6, &[9], now),
            "another epoch (a restart) asks for the map"
        );
        assert!(!v.have.as_ref().unwrap().get(9));
        let mut none = PeerVersion::new(now);
        assert!(!none.apply(7, 0, &[1], now), "no map yet");
    }

    /// The log of applied deltas stays bounded: past the map's size it is dropped and the
    /// generation bumped, so readers take the whole map.
    #[test]
    fn the_delta_log_is_bounded() {
        let now = Instant::now();
        let mut v = with_map(100_000, 1, 0);
        let gen = v.gen;
        let all: Vec<u32> = (0..5000).collect();
        assert!(v.apply(1, 0, &all, now));
        assert!(v.log.is_empty() && v.gen != gen);
        assert_eq!(v.count, 5000);
    }
}
