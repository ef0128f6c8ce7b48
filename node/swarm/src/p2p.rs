//! The libp2p side: connections, ping, mDNS, admission (`/shoal/auth/1`: each side proves the
//! cluster key right after the handshake) and Shoal's control protocol (`/shoal/ctl/1`: hello
//! with labels, listen addresses, bulk port, versions held and known peers; have-maps), which
//! only admitted peers are answered on.
//!
//! There is no identify protocol: listen addresses travel in the hello, so a peer that was not
//! admitted learns nothing from this node but what the handshake shows (its peer id).

use super::admission::{Channel, Proof, Verdict};
use super::counted::{ControlBytes, Counted};
use super::roster::{self, Listing};
use super::{
    Cmd, HaveMap, Holding, Labels, Peer, PeerVersion, Report, Swarm, SwarmConfig, Table,
    MAX_FAULTS, MAX_PEERS, MISSES_PER_FAULT,
};
use crate::error::{Error, Result};
use futures::StreamExt;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{behaviour::toggle::Toggle, NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, connection_limits, identity::Keypair, mdns, noise, ping, request_response,
    tcp, tls, yamux, Multiaddr, PeerId, StreamProtocol,
};
use serde::{Deserialize, Serialize};
use shoal_registry::Hash;
use shoal_store::ChunkStore;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// The control protocol.
pub const PROTOCOL: &str = "/shoal/ctl/4";
/// The admission protocol: a proof of the cluster key each way.
pub const AUTH_PROTOCOL: &str = "/shoal/auth/1";

/// Largest control request (a hello lists the versions held and the peers known; a delta at
/// most [`MAX_DELTA`] chunk numbers of up to 5 bytes each).
const MAX_CTL_REQUEST: u64 = 1 << 20;
/// Chunk numbers in one have-delta (more are sent as several).
pub const MAX_DELTA: usize = 64 * 1024;
/// How often what this node gained is pushed to the peers pulling the same version: a chunk
/// landed here is known to them within this (plus a round trip), where a polled map took a
/// poll period (250 ms).
const DELTA_EVERY: Duration = Duration::from_millis(20);
/// Commands queued to the event loop (have-map queries, reports, pulls' views).
pub(crate) const CMD_QUEUE: usize = 1024;
/// Rosters per message: 32 versions of up to 2 x 16 entries of ~150 bytes stay well within
/// [`MAX_CTL_REQUEST`].
const ROSTERS_PER_MESSAGE: usize = 32;
/// A node asks a peer for its whole map again, after a delta that does not follow on from
/// the one it holds, at most this often.
const REASK: Duration = Duration::from_secs(2);
/// Largest control response (a have-map: one bit per chunk, 80M chunks).
const MAX_CTL_RESPONSE: u64 = 10 << 20;
/// Control streams one connection may have open at once.
const MAX_CTL_STREAMS: usize = 16;
/// Entries of a hello that are kept (versions, peers, addresses per peer): a peer cannot
/// make this node hold more for it.
const MAX_HELLO_VERSIONS: usize = 4096;
const MAX_HELLO_PEERS: usize = 256;
const MAX_ADDRS: usize = 8;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub labels: Labels,
    pub bulk_port: u16,
    /// The addresses this node listens on (for peer exchange).
    pub listen: Vec<String>,
    pub versions: Vec<([u8; 32], Holding)>,
    /// Other peers this node knows, for peer exchange: (peer id, addresses).
    pub peers: Vec<(String, Vec<String>)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Req {
    Hello(Hello),
    Have([u8; 32]),
    /// Pushed to peers pulling the same version: chunks the sender gained.
    HaveDelta(Delta),
    /// The sender's rosters of some versions (`roster.rs`): sent when they change and every
    /// few seconds.
    Roster(Vec<([u8; 32], Vec<Listing>)>),
}

/// Chunks a node gained of a version it pulls: positions `from..from + gaps.len()` of its
/// delta stream `epoch` (a new epoch with each new map, e.g. after a restart). A receiver
/// holding that stream's map up to `from` or beyond applies it; otherwise it asks for the
/// whole map again. The chunk numbers travel sorted, as the first and then the gaps between
/// them: small numbers, which CBOR writes in 1-3 bytes rather than 5 (see
/// `deltas_travel_as_gaps`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delta {
    pub root: [u8; 32],
    pub epoch: u64,
    pub from: u64,
    pub gaps: Vec<u32>,
}

impl Delta {
    /// The delta of `chunks` (in any order) at positions `from..` of stream `epoch`.
    pub fn new(root: [u8; 32], epoch: u64, from: u64, chunks: &[u32]) -> Delta {
        let mut sorted = chunks.to_vec();
        sorted.sort_unstable();
        let mut last = 0;
        let gaps = sorted
            .into_iter()
            .map(|c| {
                let g = c - last;
                last = c;
                g
            })
            .collect();
        Delta {
            root,
            epoch,
            from,
            gaps,
        }
    }

    /// The chunk numbers (a sum past `u32::MAX`, which no honest sender makes, ends them).
    pub fn chunks(&self) -> Vec<u32> {
        let mut at = 0u32;
        let mut out = Vec::with_capacity(self.gaps.len());
        for &g in &self.gaps {
            match at.checked_add(g) {
                Some(c) => {
                    at = c;
                    out.push(c);
                }
                None => break,
            }
        }
        out
    }
}

/// What a node holds of a version: how, and while pulling, its have-map with the delta
/// stream it starts (`epoch`) and how far into that stream it is complete (`upto`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Held {
    pub holding: Holding,
    pub map: Option<HaveMap>,
    pub epoch: u64,
    pub upto: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Resp {
    Hello(Hello),
    /// The version, and None if this node does not hold or pull it.
    Have([u8; 32], Option<Held>),
    /// A delta was received.
    Ack,
}

/// A proof of the cluster key (request and response alike).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Auth(pub Proof);

#[derive(NetworkBehaviour)]
struct Behaviour {
    gate: super::gate::Gatekeeper,
    limits: connection_limits::Behaviour,
    banned: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    auth: request_response::Behaviour<Counted<request_response::cbor::codec::Codec<Auth, Auth>>>,
    ctl: request_response::Behaviour<Counted<request_response::cbor::codec::Codec<Req, Resp>>>,
}

fn net(what: &str) -> impl FnOnce(String) -> Error + '_ {
    move |e| Error::Net(format!("{what}: {e}"))
}

/// Dials a known peer at `addrs`, from a fresh port (two nodes that find each other at the same
/// moment and both dial from their listen port would make one TCP simultaneous open, which the
/// libp2p upgrade cannot negotiate).
fn dial_peer(swarm: &mut libp2p::Swarm<Behaviour>, peer: PeerId, addrs: Vec<Multiaddr>) {
    let _ = swarm.dial(
        DialOpts::peer_id(peer)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .addresses(addrs)
            .allocate_new_port()
            .build(),
    );
}

/// Dials an address whose peer id may be unknown (a bootstrap address).
fn dial_addr(swarm: &mut libp2p::Swarm<Behaviour>, addr: &Multiaddr) {
    if let Err(e) = swarm.dial(
        DialOpts::unknown_peer_id()
            .address(addr.clone())
            .allocate_new_port()
            .build(),
    ) {
        tracing::warn!("dialing {addr}: {e}");
    }
}

use super::gate::ip_of;

/// Starts the swarm: binds the libp2p listeners and the bulk server, dials the bootstrap
/// addresses, and runs the event loop in the background.
///
/// Cancel-safe until it returns: listeners bound so far are dropped with it.
pub async fn start(
    keypair: Keypair,
    store: Arc<dyn ChunkStore>,
    pack_cache: std::path::PathBuf,
    cfg: SwarmConfig,
) -> Result<Arc<Swarm>> {
    let peer_id = keypair.public().to_peer_id();
    let mdns_on = cfg.mdns;
    let limits = cfg.limits.clone();
    let gate = crate::limits::Gate::for_peers(&limits);
    let loopback_only = cfg.admission.loopback_only();
    let control = Arc::new(ControlBytes::default());
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            (tls::Config::new, noise::Config::new),
            yamux::Config::default,
        )
        .map_err(|e| net("libp2p transport")(e.to_string()))?
        .with_dns()
        .map_err(|e| net("libp2p dns")(e.to_string()))?
        .with_behaviour(|key| {
            let mdns = if mdns_on {
                // Query every few seconds (the default is 5 minutes): a node joining a LAN whose
                // first probe went out before its interface was up still finds its peers.
                let config = mdns::Config {
                    query_interval: Duration::from_secs(5),
                    ..Default::default()
                };
                Some(mdns::tokio::Behaviour::new(
                    config,
                    key.public().to_peer_id(),
                )?)
            } else {
                None
            };
            let ctl_codec = Counted {
                inner: request_response::cbor::codec::Codec::<Req, Resp>::default()
                    .set_request_size_maximum(MAX_CTL_REQUEST)
                    .set_response_size_maximum(MAX_CTL_RESPONSE),
                bytes: control.clone(),
            };
            let auth_codec = Counted {
                inner: request_response::cbor::codec::Codec::<Auth, Auth>::default()
                    .set_request_size_maximum(1 << 10)
                    .set_response_size_maximum(1 << 10),
                bytes: control.clone(),
            };
            Ok(Behaviour {
                gate: super::gate::Gatekeeper::new(gate, loopback_only),
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_established_per_peer(Some(limits.max_per_peer as u32))
                        .with_max_established(Some(limits.max_connections as u32))
                        .with_max_pending_outgoing(Some(limits.max_connections as u32)),
                ),
                banned: Default::default(),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(5)),
                ),
                mdns: Toggle::from(mdns),
                auth: request_response::Behaviour::with_codec(
                    auth_codec,
                    [(
                        StreamProtocol::new(AUTH_PROTOCOL),
                        request_response::ProtocolSupport::Full,
                    )],
                    request_response::Config::default()
                        .with_request_timeout(limits.handshake())
                        .with_max_concurrent_streams(4),
                ),
                ctl: request_response::Behaviour::with_codec(
                    ctl_codec,
                    [(
                        StreamProtocol::new(PROTOCOL),
                        request_response::ProtocolSupport::Full,
                    )],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(10))
                        .with_max_concurrent_streams(MAX_CTL_STREAMS),
                ),
            })
        })
        .map_err(|e| net("libp2p behaviour")(e.to_string()))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(3600))
                .with_max_negotiating_inbound_streams(MAX_CTL_STREAMS)
        })
        .with_connection_timeout(limits.handshake())
        .build();

    let listen = if cfg.listen.is_empty() {
        // A node that admits only this machine listens only there.
        let any = if loopback_only {
            "127.0.0.1"
        } else {
            "0.0.0.0"
        };
        vec![format!("/ip4/{any}/tcp/0")
            .parse()
            .expect("valid multiaddr")]
    } else {
        cfg.listen.clone()
    };
    for a in &listen {
        swarm
            .listen_on(a.clone())
            .map_err(|e| net(&format!("listening on {a}"))(e.to_string()))?;
    }
    // The bulk server listens on the first listen address's IP, on a port of its own.
    let bulk_ip = listen
        .iter()
        .find_map(ip_of)
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(bulk_ip, 0))
        .await
        .map_err(|e| Error::Net(format!("binding the bulk channel on {bulk_ip}: {e}")))?;
    let bulk_addr = listener
        .local_addr()
        .map_err(|e| Error::Net(format!("bulk channel address: {e}")))?;

    // Wait until the listeners are bound, so `status` can report them right away.
    let mut bound = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while bound.len() < listen.len() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(100), swarm.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => bound.push(address),
            Ok(SwarmEvent::ListenerError { error, .. }) => {
                return Err(Error::Net(format!("listening: {error}")));
            }
            _ => {}
        }
    }
    let table = Table {
        listen: bound,
        ..Table::default()
    };
    let (publish, table_rx) = watch::channel(Arc::new(table.clone()));
    let (cmd, cmd_rx) = mpsc::channel(CMD_QUEUE);
    let shared = Arc::new(Swarm {
        peer_id,
        labels: cfg.labels.clone(),
        keypair,
        store,
        admission: cfg.admission.clone(),
        limits: cfg.limits.clone(),
        table: table_rx,
        local: Mutex::new(HashMap::new()),
        bulk_addr,
        counters: super::Counters {
            control,
            ..Default::default()
        },
        cmd,
        announce: tokio::sync::Notify::new(),
        clients: Mutex::new(HashMap::new()),
        pack_cache,
        fault: std::env::var("SHOAL_FAULT_INJECT").ok(),
        through: Mutex::default(),
        next_token: AtomicU64::new(0),
        turns: super::turns::Turns::new(super::turns::SLOTS),
        upload: cfg.rates.upload.and_then(super::rate::Rate::new),
        download: cfg.rates.download.and_then(super::rate::Rate::new),
    });
    let tls = super::tls::server(&shared.keypair, cfg.wire_compression)
        .map_err(|e| Error::Net(format!("bulk channel TLS configuration: {e}")))?;
    tokio::spawn(super::bulk::serve(shared.clone(), listener, tls));

    // Names resolved to every address they have (super::bootstrap), again every 30 s.
    let first = super::bootstrap::resolve(&cfg.bootstrap, true).await;
    for a in &first {
        // Without /p2p/<id> the peer id is learned during the handshake.
        dial_addr(&mut swarm, a);
    }
    let (boot_tx, bootstrap) = watch::channel(first);
    let lookup = Arc::new(tokio::sync::Notify::new());
    if cfg
        .bootstrap
        .iter()
        .any(|a| super::bootstrap::name_of(a).is_some())
    {
        let names = cfg.bootstrap.clone();
        let again = lookup.clone();
        tokio::spawn(async move {
            loop {
                // Every 30 s, and at each redial while the node knows nobody.
                tokio::select! {
                    _ = tokio::time::sleep(super::bootstrap::REFRESH) => {}
                    _ = again.notified() => {}
                }
                let now = super::bootstrap::resolve(&names, false).await;
                if boot_tx.send(now).is_err() {
                    return;
                }
            }
        });
    }
    let mut ev = EventLoop {
        swarm,
        shared: shared.clone(),
        bootstrap,
        lookup,
        addrs: HashMap::new(),
        pending: HashMap::new(),
        since: HashMap::new(),
        let_go: HashMap::new(),
        rosters: roster::Rosters::default(),
        table,
        maps: HashMap::new(),
        publish,
        dirty: false,
        stale: false,
    };
    tokio::spawn(async move { ev.run(cmd_rx).await });
    Ok(shared)
}

struct EventLoop {
    swarm: libp2p::Swarm<Behaviour>,
    shared: Arc<Swarm>,
    /// The bootstrap addresses to dial, names resolved (refreshed in the background).
    bootstrap: watch::Receiver<Vec<Multiaddr>>,
    /// Asks for the bootstrap names to be looked up again (a node that knows nobody).
    lookup: Arc<tokio::sync::Notify>,
    /// Addresses peers listen on (from their hellos and mDNS), for peer exchange; bounded by
    /// [`MAX_PEERS`].
    addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// Peers connected but not admitted yet: since when (they are dropped when they have not
    /// proved the cluster key within the handshake deadline) and from where. Bounded by the
    /// connection limits.
    pending: HashMap<PeerId, (Instant, Option<IpAddr>)>,
    /// When each admitted peer was admitted (a new one is never let go before [`GRACE`]).
    since: HashMap<PeerId, Instant>,
    /// Peers this node let go to keep its peer set bounded, and when: not redialed by this
    /// node for [`COOLDOWN`]. (One that dials back is admitted, and gets this node's hello
    /// with its peers: a node let go by the only peer it knew finds others that way.)
    /// Bounded by [`MAX_PEERS`].
    let_go: HashMap<PeerId, Instant>,
    /// Who pulls and holds each version across the fleet, as far as this node has heard
    /// (bounded: see `roster::Rosters`).
    rosters: roster::Rosters,
    /// The peer table: this loop is its only writer, and publishes it through `publish`.
    table: Table,
    /// Peers' have-maps, per version they announced (an entry for every version in their
    /// [`Peer::versions`]; bounded like those).
    maps: HashMap<PeerId, HashMap<Hash, PeerVersion>>,
    publish: watch::Sender<Arc<Table>>,
    /// The table changed in a way readers must see now (published after this event), or only
    /// in its counters (published at the next delta tick).
    dirty: bool,
    stale: bool,
}

/// A peer just admitted is not let go before this (it exchanges hellos and learns others).
const GRACE: Duration = Duration::from_secs(10);
/// A peer let go is not redialed by the node that let it go for this long.
const COOLDOWN: Duration = Duration::from_secs(60);

impl EventLoop {
    /// Peers admitted now.
    fn admitted(&self) -> usize {
        self.table.admitted.len()
    }

    /// Publishes the table as it is now to its readers.
    fn publish(&mut self) {
        self.update_behind();
        self.publish.send_replace(Arc::new(self.table.clone()));
        self.dirty = false;
        self.stale = false;
    }

    /// Each peer's place in line for the uplink, from its have-maps (changed entries only, so
    /// a snapshot shares the rest).
    fn update_behind(&mut self) {
        for (id, p) in self.table.peers.iter_mut() {
            let behind = self.maps.get(id).map_or(0.0, |m| {
                m.iter()
                    .filter(|(root, _)| {
                        matches!(
                            p.versions.get(*root),
                            Some(Holding::Pulling | Holding::Mounted)
                        )
                    })
                    .filter_map(|(_, v)| {
                        let len = v.have.as_ref()?.len as u64;
                        (len > 0).then(|| len.saturating_sub(v.count) as f32 / len as f32)
                    })
                    .fold(0.0f32, f32::max)
            });
            if (behind - p.behind).abs() > 1e-4 {
                Arc::make_mut(p).behind = behind;
            }
        }
    }

    /// A peer's entry, to change (copied first if a published snapshot still shares it).
    /// The caller marks the table dirty or stale.
    fn peer_mut(&mut self, peer: &PeerId) -> Option<&mut Peer> {
        self.table.peers.get_mut(peer).map(Arc::make_mut)
    }

    /// Whether dialing `peer` (learned from a member or mDNS) could lead to its admission.
    fn may_dial(&self, peer: &PeerId) -> bool {
        let a = &self.shared.admission;
        !self.table.is_banned(peer)
            && (a.open
                || a.key.is_some()
                || a.loopback_only()
                || a.members.as_ref().is_some_and(|m| m.contains(peer)))
    }

    /// Counts what a pull or an ask saw `peer` do.
    fn on_report(&mut self, peer: PeerId, what: Report) {
        if self.table.is_banned(&peer) {
            return;
        }
        if let Report::Fault(why) = what {
            return self.fault(peer, &why);
        }
        // Who may own what for this node reads owner stalls: seen at once. Counters wait for
        // the next tick.
        let urgent = matches!(what, Report::OwnerStall);
        let Some(p) = self.peer_mut(&peer) else {
            return;
        };
        let mut fault = None;
        match what {
            Report::Stall => p.stalls += 1,
            Report::OwnerStall => p.owner_stalls += 1,
            Report::Miss(why) => {
                p.misses += 1;
                if p.misses % MISSES_PER_FAULT == 0 {
                    fault = Some(format!(
                        "{} \"not here\" answers for chunks it advertised (last: {why})",
                        p.misses
                    ));
                }
            }
            Report::Received { bytes, rate } => {
                p.bytes_received += bytes;
                p.throughput = if p.throughput == 0.0 {
                    rate
                } else {
                    0.8 * p.throughput + 0.2 * rate
                };
            }
            Report::Sent(n) => p.bytes_sent += n,
            Report::Fault(_) => unreachable!("handled above"),
        }
        self.dirty |= urgent;
        self.stale = true;
        if let Some(why) = fault {
            self.fault(peer, &why);
        }
    }

    /// Counts a fault against a peer; after [`MAX_FAULTS`] it is banned and disconnected.
    fn fault(&mut self, peer: PeerId, what: &str) {
        if !self.table.peers.contains_key(&peer) && self.table.peers.len() >= MAX_PEERS {
            return;
        }
        let p = Arc::make_mut(
            self.table
                .peers
                .entry(peer)
                .or_insert_with(|| Arc::new(Peer::new())),
        );
        p.faults += 1;
        let n = p.faults;
        self.dirty = true;
        tracing::warn!(%peer, faults = n, "peer fault: {what}");
        if n >= MAX_FAULTS {
            tracing::warn!(%peer, "banning peer after {n} faults");
            let banned = &mut self.table.banned;
            // Bounded: past this many, forgetting an old ban costs at most a re-ban.
            if banned.len() >= MAX_PEERS {
                if let Some(old) = banned.iter().next().copied() {
                    banned.remove(&old);
                }
            }
            banned.insert(peer);
            self.shared.clients.lock().expect("poisoned").remove(&peer);
            self.swarm.behaviour_mut().banned.block_peer(peer);
            self.refuse(peer, "banned after repeated faults");
        }
    }

    /// How many more peers this node may dial now: up to [`Limits::peers`] admitted or on
    /// the way.
    fn dial_budget(&self) -> usize {
        let on_the_way = self.pending.len()
            + self
                .swarm
                .network_info()
                .connection_counters()
                .num_pending_outgoing() as usize;
        self.shared
            .limits
            .peers
            .saturating_sub(self.admitted() + on_the_way)
    }

    /// Past the high mark, lets go of the admitted peers needed least, down to the peer set's
    /// size: those past their grace, sharing no version with this node first, then the
    /// farthest by labels.
    fn trim(&mut self) {
        let admitted: Vec<PeerId> = self.table.admitted.iter().copied().collect();
        let limits = &self.shared.limits;
        if admitted.len() <= limits.peers_high() {
            return;
        }
        let excess = admitted.len() - limits.peers;
        let now = Instant::now();
        let mine: Vec<Hash> = self.shared.holdings().into_iter().map(|(r, _)| r).collect();
        let mut victims: Vec<(bool, u8, u64, PeerId)> = {
            let peers = &self.table.peers;
            admitted
                .iter()
                .filter(|p| {
                    self.since
                        .get(p)
                        .is_some_and(|t| now.duration_since(*t) >= GRACE)
                })
                .map(|id| {
                    let p = peers.get(id);
                    let shares = p.is_some_and(|p| mine.iter().any(|r| p.versions.contains_key(r)));
                    let distance = p.map_or(3, |p| self.shared.labels.distance(&p.labels));
                    (shares, u8::MAX - distance, roster::peer_seed(id), *id)
                })
                .collect()
        };
        victims.sort();
        for (_, _, _, peer) in victims.into_iter().take(excess) {
            tracing::debug!(%peer, "letting go of a peer: the peer set is full");
            if self.let_go.len() >= MAX_PEERS {
                self.let_go.retain(|_, t| now.duration_since(*t) < COOLDOWN);
            }
            if self.let_go.len() < MAX_PEERS {
                self.let_go.insert(peer, now);
            }
            self.table.admitted.remove(&peer);
            self.dirty = true;
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Dials nodes the rosters list for versions this node pulls when none of its peers
    /// holds or pulls them (they are outside its peer set): a few, past the dial budget if
    /// need be, up to the high mark.
    fn dial_for_rosters(&mut self) {
        let pulling: Vec<Hash> = self
            .shared
            .local
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|(_, v)| v.holding == Holding::Pulling)
            .map(|(r, _)| *r)
            .collect();
        let mut room = self
            .shared
            .limits
            .peers_high()
            .saturating_sub(self.admitted() + self.pending.len());
        for root in pulling {
            if room == 0 {
                return;
            }
            let served = self
                .table
                .holders(&root)
                .any(|(_, _, h)| h != Holding::Mounted);
            if served {
                continue;
            }
            let nodes = self.rosters.nodes(&root);
            for (peer, _, addrs) in nodes.into_iter().take(2) {
                if room == 0 {
                    return;
                }
                if peer == self.shared.peer_id
                    || addrs.is_empty()
                    || self.swarm.is_connected(&peer)
                    || !self.may_dial(&peer)
                {
                    continue;
                }
                self.remember(peer, addrs.clone());
                dial_peer(&mut self.swarm, peer, addrs);
                room -= 1;
            }
        }
    }

    fn hello(&self) -> Hello {
        let s = &self.shared;
        let versions = s.holdings().into_iter().map(|(r, h)| (r.0, h)).collect();
        let peers = self
            .addrs
            .iter()
            .filter(|(p, _)| self.swarm.is_connected(p) && self.table.is_member(p))
            .take(MAX_HELLO_PEERS)
            .map(|(p, a)| (p.to_string(), a.iter().map(|a| a.to_string()).collect()))
            .collect();
        let listen = self
            .table
            .listen
            .iter()
            .filter(|a| ip_of(a).is_some_and(|ip| !ip.is_unspecified()))
            .take(MAX_ADDRS)
            .map(|a| a.to_string())
            .collect();
        Hello {
            labels: s.labels.clone(),
            listen,
            bulk_port: s.bulk_addr.port(),
            versions,
            peers,
        }
    }

    fn on_hello(&mut self, peer: PeerId, h: Hello) {
        let listen = h.listen;
        // Versions this node is fetching too, whose have-map from this peer is still to come:
        // asked for at once (a pull waits for its co-pullers' maps before reading the origin,
        // and a peer announces again when its map is ready), not at the next periodic poll.
        let mut ask = Vec::new();
        {
            let fetching: Vec<Hash> = self
                .shared
                .local
                .lock()
                .expect("poisoned")
                .iter()
                .filter(|(_, v)| v.holding == Holding::Pulling && v.have.is_some())
                .map(|(r, _)| *r)
                .collect();
            let p = Arc::make_mut(
                self.table
                    .peers
                    .entry(peer)
                    .or_insert_with(|| Arc::new(Peer::new())),
            );
            p.labels = h.labels;
            p.bulk_port = Some(h.bulk_port);
            let now = Instant::now();
            let mut old = self.maps.remove(&peer).unwrap_or_default();
            let mut versions = HashMap::new();
            let mut maps = HashMap::new();
            for (root, holding) in h.versions.into_iter().take(MAX_HELLO_VERSIONS) {
                let root = Hash(root);
                let mut pv = old.remove(&root).unwrap_or_else(|| PeerVersion::new(now));
                if p.versions.get(&root) != Some(&holding) {
                    pv.grew = now;
                }
                if holding == Holding::Pulling && pv.have.is_none() && fetching.contains(&root) {
                    ask.push(root);
                }
                versions.insert(root, holding);
                maps.insert(root, pv);
            }
            p.versions = Arc::new(versions);
            self.maps.insert(peer, maps);
            self.dirty = true;
        }
        for root in ask {
            self.swarm
                .behaviour_mut()
                .ctl
                .send_request(&peer, Req::Have(root.0));
        }
        // Where it listens, for redials and for peer exchange.
        let own: Vec<Multiaddr> = listen
            .iter()
            .take(MAX_ADDRS)
            .filter_map(|a| a.parse().ok())
            .filter(|a| ip_of(a).is_some_and(|ip| !ip.is_unspecified()))
            .collect();
        if !own.is_empty() {
            for a in &own {
                self.swarm.add_peer_address(peer, a.clone());
            }
            self.remember(peer, own);
        }
        // Peer exchange: connect to peers of the swarm we do not know yet (while the peer
        // set has room; all are remembered, for later).
        let mut budget = self.dial_budget();
        for (id, addrs) in h.peers.into_iter().take(MAX_HELLO_PEERS) {
            let Ok(id) = id.parse::<PeerId>() else {
                continue;
            };
            if id == self.shared.peer_id || self.swarm.is_connected(&id) || !self.may_dial(&id) {
                continue;
            }
            let addrs: Vec<Multiaddr> = addrs
                .iter()
                .take(MAX_ADDRS)
                .filter_map(|a| a.parse().ok())
                .collect();
            for a in &addrs {
                self.swarm.add_peer_address(id, a.clone());
            }
            if !self.addrs.contains_key(&id) {
                self.remember(id, addrs.clone());
            }
            if budget > 0 {
                budget -= 1;
                dial_peer(&mut self.swarm, id, addrs);
            }
        }
    }

    /// Remembers where a peer listens (bounded: a full table drops a peer not connected).
    fn remember(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if !self.addrs.contains_key(&peer) && self.addrs.len() >= MAX_PEERS {
            let gone = self
                .addrs
                .keys()
                .find(|p| !self.swarm.is_connected(p))
                .copied();
            match gone {
                Some(g) => {
                    self.addrs.remove(&g);
                }
                None => return,
            }
        }
        self.addrs.insert(peer, addrs);
    }

    /// Serves `peer` from now on (it proved the cluster key, or needs no proof): it is
    /// recorded, told what this node holds, and its requests are answered.
    fn admit(&mut self, peer: PeerId, ip: Option<IpAddr>) {
        self.pending.remove(&peer);
        let new = self.table.admitted.insert(peer);
        if new {
            self.since.insert(peer, Instant::now());
        }
        {
            let peers = &mut self.table.peers;
            if !peers.contains_key(&peer) && peers.len() >= MAX_PEERS {
                let gone = peers.iter().find(|(_, p)| !p.connected).map(|(id, _)| *id);
                if let Some(g) = gone {
                    peers.remove(&g);
                    self.maps.remove(&g);
                }
            }
            let p = Arc::make_mut(peers.entry(peer).or_insert_with(|| Arc::new(Peer::new())));
            p.connected = true;
            if let Some(ip) = ip {
                p.ip = Some(ip);
            }
            if new {
                // A peer back from a restart may have lost some of what its old have-maps
                // said: they stay in use (most of it is still there) until fresh ones come,
                // but its "not here" answers meanwhile are not held against it.
                for v in self.maps.entry(peer).or_default().values_mut() {
                    v.fresh = false;
                }
                p.owner_stalls = 0;
            }
            self.dirty = true;
        }
        if new {
            tracing::info!(%peer, "peer admitted");
            let hello = self.hello();
            self.swarm
                .behaviour_mut()
                .ctl
                .send_request(&peer, Req::Hello(hello));
        }
    }

    /// Disconnects a peer that may not be served, saying why in the log.
    fn refuse(&mut self, peer: PeerId, why: &str) {
        tracing::warn!(%peer, "refusing peer: {why}");
        self.pending.remove(&peer);
        self.table.admitted.remove(&peer);
        self.dirty = true;
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    /// The remote IP of some connection to `peer`, as recorded when it connected.
    fn ip_of_peer(&self, peer: &PeerId) -> Option<IpAddr> {
        self.table.peers.get(peer).and_then(|p| p.ip)
    }

    /// Judges a proof `peer` presented on the control channel.
    fn judge(&mut self, peer: PeerId, proof: &Proof, ip: Option<IpAddr>) -> bool {
        let me = self.shared.peer_id;
        match self
            .shared
            .admission
            .decide(Channel::Control, &me, &peer, ip, Some(proof))
        {
            Verdict::Admit => {
                self.admit(peer, ip);
                true
            }
            Verdict::Refuse(why) => {
                self.refuse(peer, why);
                false
            }
            Verdict::NeedProof => false,
        }
    }

    /// Lists this node in the rosters of the versions it pulls or holds (news of now).
    fn list_self(&mut self) {
        let me = self.shared.peer_id;
        let addrs: Vec<Multiaddr> = self
            .table
            .listen
            .iter()
            .filter(|a| ip_of(a).is_some_and(|ip| !ip.is_unspecified()))
            .cloned()
            .collect();
        let now = Instant::now();
        // What it holds or pulls, with when it started (versions only mounted here are not
        // listed in rosters).
        let mine: Vec<(Hash, Holding, u64)> = self
            .shared
            .local
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(r, v)| (*r, v.holding, v.since_ms))
            .collect();
        for (root, holding, started) in mine {
            self.rosters.merge(
                root,
                me,
                holding,
                addrs.clone(),
                Duration::ZERO,
                started,
                now,
            );
        }
    }

    /// Sends the rosters of `roots` to every admitted peer (in parts that fit a request).
    fn send_rosters(&mut self, roots: Vec<Hash>) {
        if roots.is_empty() {
            return;
        }
        let now = Instant::now();
        let parts: Vec<Vec<([u8; 32], Vec<Listing>)>> = {
            let rosters = &self.rosters;
            roots
                .chunks(ROSTERS_PER_MESSAGE)
                .map(|part| {
                    part.iter()
                        .map(|r| (r.0, rosters.listings(r, now)))
                        .filter(|(_, l)| !l.is_empty())
                        .collect::<Vec<_>>()
                })
                .filter(|p| !p.is_empty())
                .collect()
        };
        for peer in self.admitted_peers() {
            for part in &parts {
                self.swarm
                    .behaviour_mut()
                    .ctl
                    .send_request(&peer, Req::Roster(part.clone()));
            }
        }
    }

    fn have(&self, root: Hash) -> Option<Held> {
        let local = self.shared.local.lock().expect("poisoned");
        match local.get(&root) {
            Some(v) => Some(Held {
                holding: v.holding,
                map: v.have.clone().filter(|_| v.holding == Holding::Pulling),
                epoch: v.epoch,
                // Every mark is in the map, the unsent ones too.
                upto: v.marks,
            }),
            None => self
                .shared
                .through
                .lock()
                .expect("poisoned")
                .contains_key(&root)
                .then_some(Held {
                    holding: Holding::Mounted,
                    map: None,
                    epoch: 0,
                    upto: 0,
                }),
        }
    }

    /// Sends what this node gained since the last call, of every version it pulls, to the
    /// connected peers pulling the same version.
    fn push_deltas(&mut self) {
        let mut out: Vec<Delta> = Vec::new();
        for (root, v) in self.shared.local.lock().expect("poisoned").iter_mut() {
            if v.unsent.is_empty() {
                continue;
            }
            let chunks = std::mem::take(&mut v.unsent);
            if v.holding != Holding::Pulling {
                continue;
            }
            let mut from = v.marks - chunks.len() as u64;
            for part in chunks.chunks(MAX_DELTA) {
                out.push(Delta::new(root.0, v.epoch, from, part));
                from += part.len() as u64;
            }
        }
        if out.is_empty() {
            return;
        }
        let to: Vec<(PeerId, Vec<usize>)> = self
            .table
            .peers
            .iter()
            .filter(|(id, p)| self.table.can_ask(id, p))
            .map(|(id, p)| {
                let wants = out
                    .iter()
                    .enumerate()
                    .filter(|(_, d)| p.versions.get(&Hash(d.root)) == Some(&Holding::Pulling))
                    .map(|(i, _)| i)
                    .collect();
                (*id, wants)
            })
            .collect();
        for (peer, wants) in to {
            for i in wants {
                self.swarm
                    .behaviour_mut()
                    .ctl
                    .send_request(&peer, Req::HaveDelta(out[i].clone()));
            }
        }
    }

    /// Rosters a peer sent, merged into this node's. What it says of this node is not news
    /// here; nodes this one could not admit (banned, or off the members list of a
    /// members-only node) are not listed.
    fn on_roster(&mut self, list: &[([u8; 32], Vec<Listing>)]) {
        let now = Instant::now();
        let mut rosters = std::mem::take(&mut self.rosters);
        let admit = |p: &PeerId| *p != self.shared.peer_id && self.may_dial(p);
        for (root, listings) in list.iter().take(roster::MAX_VERSIONS) {
            rosters.merge_listings(Hash(*root), listings, admit, now);
        }
        self.rosters = rosters;
    }

    /// The connected peers admitted now (the only ones told anything).
    fn admitted_peers(&self) -> Vec<PeerId> {
        self.swarm
            .connected_peers()
            .filter(|p| self.table.is_member(p))
            .copied()
            .collect()
    }

    /// A delta from `peer`: applied to the map held, or the whole map asked for again.
    fn on_delta(&mut self, peer: PeerId, d: Delta) {
        let root = Hash(d.root);
        let now = Instant::now();
        let reask = {
            let Some(v) = self.maps.get_mut(&peer).and_then(|m| m.get_mut(&root)) else {
                return; // not announced (yet): its map is asked for when it is
            };
            if v.apply(d.epoch, d.from, &d.chunks(), now) {
                // Published at the next delta tick: the peer's place in line moved.
                self.stale = true;
                return;
            }
            let due = v.asked.is_none_or(|t| now.duration_since(t) >= REASK);
            if due {
                v.asked = Some(now);
            }
            due
        };
        if reask {
            self.swarm
                .behaviour_mut()
                .ctl
                .send_request(&peer, Req::Have(d.root));
        }
    }

    /// Runs until the swarm is dropped. Not cancel-safe (it owns the libp2p swarm): spawned
    /// once, never raced.
    async fn run(&mut self, mut cmds: mpsc::Receiver<Cmd>) {
        let mut redial = tokio::time::interval(Duration::from_secs(3));
        let mut deltas = tokio::time::interval(DELTA_EVERY);
        deltas.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(roster::REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = deltas.tick() => {
                    if self.stale {
                        self.publish();
                    }
                    self.push_deltas();
                    let changed = self.rosters.take_changed();
                    self.send_rosters(changed);
                }
                _ = refresh.tick() => {
                    self.list_self();
                    let all = {
                        let r = &mut self.rosters;
                        r.expire(Instant::now());
                        r.take_changed();
                        r.versions()
                    };
                    self.send_rosters(all);
                }
                ev = self.swarm.select_next_some() => self.on_event(ev),
                _ = self.shared.announce.notified() => {
                    self.list_self();
                    let hello = self.hello();
                    // Admitted peers only: one still proving the cluster key learns nothing.
                    for p in self.admitted_peers() {
                        self.swarm.behaviour_mut().ctl.send_request(&p, Req::Hello(hello.clone()));
                    }
                }
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(Cmd::QueryHave(peer, root)) => {
                        if self.swarm.is_connected(&peer) {
                            self.swarm.behaviour_mut().ctl.send_request(&peer, Req::Have(root.0));
                        }
                    }
                    Some(Cmd::Report(peer, what)) => self.on_report(peer, what),
                    Some(Cmd::View(ask, reply)) => {
                        let _ = reply.send(super::view::answer(&self.table, &self.maps, &self.rosters, &self.shared.labels, ask));
                    }
                },
                _ = redial.tick() => {
                    // Peers that have not proved the cluster key in time are dropped.
                    let deadline = self.shared.limits.handshake();
                    let late: Vec<PeerId> = self
                        .pending
                        .iter()
                        .filter(|(_, (since, _))| since.elapsed() > deadline)
                        .map(|(p, _)| *p)
                        .collect();
                    for p in late {
                        self.refuse(p, "did not prove the cluster key in time");
                    }
                    // Peers come back after restarts: redial the ones we knew, and the
                    // bootstrap addresses while we know nobody.
                    if self.swarm.connected_peers().next().is_none() {
                        self.lookup.notify_one();
                        let now: Vec<Multiaddr> = self.bootstrap.borrow().clone();
                        for a in now.iter().filter(|a| !self.table.listen.contains(a)) {
                            dial_addr(&mut self.swarm, a);
                        }
                    }
                    let now = Instant::now();
                    let lost: Vec<(PeerId, Vec<Multiaddr>)> = self
                        .addrs
                        .iter()
                        .filter(|(p, a)| {
                            !a.is_empty()
                                && !self.swarm.is_connected(p)
                                && self.may_dial(p)
                                && self.let_go.get(p).is_none_or(|t| now.duration_since(*t) >= COOLDOWN)
                        })
                        .map(|(p, a)| (*p, a.clone()))
                        .take(self.dial_budget())
                        .collect();
                    for (peer, addrs) in lost {
                        dial_peer(&mut self.swarm, peer, addrs);
                    }
                    self.dial_for_rosters();
                    self.trim();
                }
            }
            if self.dirty {
                self.publish();
            }
        }
    }

    fn on_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } if !self.table.listen.contains(&address) => {
                self.table.listen.push(address);
                self.dirty = true;
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                let ip = ip_of(endpoint.get_remote_address());
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connection established");
                if self.table.is_banned(&peer_id) {
                    self.refuse(peer_id, "banned");
                    return;
                }
                if self.table.is_member(&peer_id) {
                    return; // a further connection of an admitted peer
                }
                let me = self.shared.peer_id;
                match self
                    .shared
                    .admission
                    .decide(Channel::Control, &me, &peer_id, ip, None)
                {
                    Verdict::Admit => self.admit(peer_id, ip),
                    Verdict::Refuse(why) => self.refuse(peer_id, why),
                    Verdict::NeedProof => {
                        self.pending
                            .entry(peer_id)
                            .or_insert_with(|| (Instant::now(), ip));
                        let proof = self
                            .shared
                            .admission
                            .my_proof(Channel::Control, &me, &peer_id);
                        self.swarm
                            .behaviour_mut()
                            .auth
                            .send_request(&peer_id, Auth(proof));
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                tracing::info!(peer = %peer_id, "peer disconnected");
                self.pending.remove(&peer_id);
                self.since.remove(&peer_id);
                self.table.admitted.remove(&peer_id);
                if let Some(p) = self.peer_mut(&peer_id) {
                    p.connected = false;
                }
                self.dirty = true;
                self.shared
                    .clients
                    .lock()
                    .expect("poisoned")
                    .remove(&peer_id);
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::info!(peer = ?peer_id, "dial failed: {error}");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                tracing::debug!(from = %send_back_addr, "incoming connection failed: {error}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                if let Some(p) = self.peer_mut(&peer) {
                    p.rtt = Some(rtt);
                    self.stale = true;
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    if peer == self.shared.peer_id || !self.may_dial(&peer) {
                        continue;
                    }
                    // Remembered, so the redial timer retries if this dial fails.
                    let mut known = self.addrs.get(&peer).cloned().unwrap_or_default();
                    if !known.contains(&addr) && known.len() < MAX_ADDRS {
                        known.push(addr.clone());
                    }
                    self.remember(peer, known);
                    if !self.swarm.is_connected(&peer) && self.dial_budget() > 0 {
                        dial_peer(&mut self.swarm, peer, vec![addr]);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Auth(request_response::Event::Message {
                peer,
                message,
                ..
            })) => {
                let ip = self
                    .pending
                    .get(&peer)
                    .and_then(|(_, ip)| *ip)
                    .or_else(|| self.ip_of_peer(&peer));
                match message {
                    request_response::Message::Request {
                        request: Auth(proof),
                        channel,
                        ..
                    } => {
                        // Answer with this node's own proof only once the peer's checked out:
                        // an outsider learns nothing, not even whether it got the key wrong.
                        if self.table.is_member(&peer) || self.judge(peer, &proof, ip) {
                            let me = self.shared.peer_id;
                            let mine = self.shared.admission.my_proof(Channel::Control, &me, &peer);
                            let _ = self
                                .swarm
                                .behaviour_mut()
                                .auth
                                .send_response(channel, Auth(mine));
                        }
                    }
                    request_response::Message::Response {
                        response: Auth(proof),
                        ..
                    } => {
                        if !self.table.is_member(&peer) {
                            self.judge(peer, &proof, ip);
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Auth(
                request_response::Event::OutboundFailure { peer, error, .. },
            )) => {
                tracing::debug!(%peer, "admission request failed: {error}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ctl(request_response::Event::Message {
                peer,
                message,
                ..
            })) => {
                if !self.table.is_member(&peer) {
                    // Not admitted: no answer at all (the stream is dropped).
                    return;
                }
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let resp = match request {
                            Req::Hello(h) => {
                                self.on_hello(peer, h);
                                Resp::Hello(self.hello())
                            }
                            Req::Have(root) => Resp::Have(root, self.have(Hash(root))),
                            Req::HaveDelta(d) => {
                                self.on_delta(peer, d);
                                Resp::Ack
                            }
                            Req::Roster(list) => {
                                self.on_roster(&list);
                                Resp::Ack
                            }
                        };
                        let _ = self.swarm.behaviour_mut().ctl.send_response(channel, resp);
                    }
                    request_response::Message::Response { response, .. } => match response {
                        Resp::Hello(h) => self.on_hello(peer, h),
                        Resp::Have(root, h) => self.on_have(peer, Hash(root), h),
                        Resp::Ack => {}
                    },
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ctl(
                request_response::Event::OutboundFailure { peer, error, .. },
            )) => {
                tracing::debug!(%peer, "control request failed: {error}");
            }
            _ => {}
        }
    }

    fn on_have(&mut self, peer: PeerId, root: Hash, have: Option<Held>) {
        let Some(p) = self.table.peers.get_mut(&peer).map(Arc::make_mut) else {
            return;
        };
        match have {
            None => {
                if p.versions.contains_key(&root) {
                    Arc::make_mut(&mut p.versions).remove(&root);
                    self.dirty = true;
                }
                if let Some(m) = self.maps.get_mut(&peer) {
                    m.remove(&root);
                }
            }
            Some(Held {
                holding,
                map,
                epoch,
                upto,
            }) => {
                if !p.versions.contains_key(&root) && p.versions.len() >= MAX_HELLO_VERSIONS {
                    return; // no more versions kept for one peer than its hello may list
                }
                let now = Instant::now();
                let count = map.as_ref().map(|m| m.count()).unwrap_or(0);
                let changed = p.versions.get(&root) != Some(&holding);
                if changed {
                    Arc::make_mut(&mut p.versions).insert(root, holding);
                    self.dirty = true;
                }
                let v = self
                    .maps
                    .entry(peer)
                    .or_default()
                    .entry(root)
                    .or_insert_with(|| PeerVersion::new(now));
                v.fresh = true;
                v.gen = v.gen.wrapping_add(1);
                v.log.clear();
                v.stream = map.is_some().then_some((epoch, upto));
                v.asked = None;
                if count > v.count || changed {
                    v.grew = now;
                }
                v.count = count;
                v.have = map;
                self.stale = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::request_response::Codec;

    /// The bytes the control codec puts on the wire for `msg` (as a request or a response).
    fn wire(req: Option<Req>, resp: Option<Resp>) -> Vec<u8> {
        futures::executor::block_on(async {
            let proto = StreamProtocol::new(PROTOCOL);
            let mut c = request_response::cbor::codec::Codec::<Req, Resp>::default();
            let mut w = futures::io::Cursor::new(Vec::new());
            if let Some(r) = req {
                c.write_request(&proto, &mut w, r).await.unwrap();
            }
            if let Some(r) = resp {
                c.write_response(&proto, &mut w, r).await.unwrap();
            }
            w.into_inner()
        })
    }

    #[test]
    fn control_messages_are_pinned() {
        // Changing any of these changes the protocol: bump PROTOCOL with it.
        let hello = Hello {
            labels: Labels {
                region: Some("eu".into()),
                zone: None,
                rack: None,
            },
            bulk_port: 4002,
            listen: vec!["/ip4/10.0.0.1/tcp/4001".into()],
            versions: vec![([7; 32], Holding::Pulling)],
            peers: vec![("12D3KooW".into(), vec!["/ip4/10.0.0.2/tcp/4001".into()])],
        };
        let mut map = HaveMap::new(70);
        map.set(0);
        map.set(69);
        let got = [
            wire(Some(Req::Hello(hello)), None),
            wire(Some(Req::Have([7; 32])), None),
            wire(
                None,
                Some(Resp::Have(
                    [7; 32],
                    Some(Held {
                        holding: Holding::Pulling,
                        map: Some(map),
                        epoch: 11,
                        upto: 2,
                    }),
                )),
            ),
            wire(None, Some(Resp::Have([7; 32], None))),
            wire(
                Some(Req::HaveDelta(Delta::new([7; 32], 11, 2, &[69, 5, 64]))),
                None,
            ),
            wire(None, Some(Resp::Ack)),
            wire(
                Some(Req::Roster(vec![(
                    [7; 32],
                    vec![Listing {
                        peer: vec![0, 36, 8, 1],
                        holding: Holding::Pulling,
                        addrs: vec!["/ip4/10.0.0.1/tcp/4001".into()],
                        age_ms: 1500,
                        started_ms: 1_796_000_000_000,
                    }],
                )])),
                None,
            ),
        ]
        .map(|b| blake3::hash(&b).to_hex()[..16].to_string());
        assert_eq!(got, GOLDEN_CTL);
    }
    /// Chunk numbers travel sorted, as gaps: a typical delta (what a 10 Gbit node gains in
    /// 20 ms, ~600 chunks of a 1M-chunk version) is far smaller than as plain numbers, and
    /// comes back exact.
    #[test]
    fn deltas_travel_as_gaps() {
        let chunks: Vec<u32> = (0..600u64)
            .map(|i| (shoal_sched::mix(i) % 1_000_000) as u32)
            .collect();
        let d = Delta::new([1; 32], 3, 0, &chunks);
        let mut sorted = chunks.clone();
        sorted.sort_unstable();
        assert_eq!(d.chunks(), sorted);
        let plain = Delta {
            gaps: chunks.clone(),
            ..d.clone()
        };
        let small = wire(Some(Req::HaveDelta(d)), None).len();
        let big = wire(Some(Req::HaveDelta(plain)), None).len();
        eprintln!("600 chunk numbers: {small} bytes as gaps, {big} as numbers");
        assert!(small * 3 < big * 2, "{small} vs {big}");
        // A sum past u32::MAX ends the list rather than wrapping.
        let bad = Delta {
            gaps: vec![u32::MAX, 1, 2],
            ..Delta::new([1; 32], 3, 0, &[])
        };
        assert_eq!(bad.chunks(), vec![u32::MAX]);
    }
    const GOLDEN_CTL: [&str; 7] = [
        "ff0bc0f1994f9a0d",
        "4fb52b24d84ab801",
        "568add4115d5ebbc",
        "5bf6498c5d50b288",
        "affecc9146e7e467",
        "033453a08696d64a",
        "ae0e68e69f9c66b9",
    ];
}
