//! The libp2p side: connections, identify, ping, mDNS, and Shoal's control protocol
//! (`/shoal/ctl/1`: hello with labels, bulk port, versions held and known peers; have-maps).

use super::{Cmd, HaveMap, Holding, Labels, Peer, PeerVersion, Swarm, SwarmConfig};
use crate::error::{Error, Result};
use crate::store::ChunkStore;
use futures::StreamExt;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{behaviour::toggle::Toggle, NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, identify, identity::Keypair, mdns, multiaddr::Protocol, noise, ping,
    request_response, tcp, tls, yamux, Multiaddr, PeerId, StreamProtocol,
};
use serde::{Deserialize, Serialize};
use shoal_registry::Hash;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const PROTOCOL: &str = "/shoal/ctl/1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Hello {
    labels: Labels,
    bulk_port: u16,
    versions: Vec<([u8; 32], Holding)>,
    /// Other peers this node knows, for peer exchange: (peer id, addresses).
    peers: Vec<(String, Vec<String>)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Req {
    Hello(Hello),
    Have([u8; 32]),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Resp {
    Hello(Hello),
    /// The version, and None if this node does not hold or pull it.
    Have([u8; 32], Option<(Holding, Option<HaveMap>)>),
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    members: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    banned: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    ctl: request_response::cbor::Behaviour<Req, Resp>,
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

/// The IP address in a multiaddr, if any.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Starts the swarm: binds the libp2p listeners and the bulk server, dials the bootstrap
/// addresses, and runs the event loop in the background.
pub async fn start(
    keypair: Keypair,
    store: Arc<dyn ChunkStore>,
    pack_cache: std::path::PathBuf,
    cfg: SwarmConfig,
) -> Result<Arc<Swarm>> {
    let peer_id = keypair.public().to_peer_id();
    let members = cfg.members.clone();
    let mdns_on = cfg.mdns;
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
            let members = members.map(|m| {
                let mut b =
                    allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
                for p in m {
                    b.allow_peer(p);
                }
                b
            });
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
            Ok(Behaviour {
                members: Toggle::from(members),
                banned: Default::default(),
                identify: identify::Behaviour::new(identify::Config::new(
                    "/shoal/1".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(5)),
                ),
                mdns: Toggle::from(mdns),
                ctl: request_response::cbor::Behaviour::new(
                    [(
                        StreamProtocol::new(PROTOCOL),
                        request_response::ProtocolSupport::Full,
                    )],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(10)),
                ),
            })
        })
        .map_err(|e| net("libp2p behaviour")(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();

    let listen = if cfg.listen.is_empty() {
        vec!["/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr")]
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

    let (cmd, cmd_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Swarm {
        peer_id,
        labels: cfg.labels.clone(),
        keypair,
        store,
        members: cfg.members.clone(),
        peers: Mutex::new(HashMap::new()),
        local: Mutex::new(HashMap::new()),
        listen: Mutex::new(Vec::new()),
        bulk_addr: Mutex::new(Some(bulk_addr)),
        banned: Mutex::new(Default::default()),
        counters: Default::default(),
        cmd,
        clients: Mutex::new(HashMap::new()),
        pack_cache,
        fault: std::env::var("SHOAL_FAULT_INJECT").ok(),
        through: Mutex::default(),
        next_token: AtomicU64::new(0),
    });
    let tls = super::tls::server(&shared.keypair)
        .map_err(|e| Error::Net(format!("bulk channel TLS configuration: {e}")))?;
    tokio::spawn(super::bulk::serve(shared.clone(), listener, tls));

    // Wait until the listeners are bound, so `status` can report them right away.
    let deadline = Instant::now() + Duration::from_secs(5);
    while shared.listen.lock().expect("poisoned").len() < listen.len() && Instant::now() < deadline
    {
        match tokio::time::timeout(Duration::from_millis(100), swarm.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => {
                shared.listen.lock().expect("poisoned").push(address);
            }
            Ok(SwarmEvent::ListenerError { error, .. }) => {
                return Err(Error::Net(format!("listening: {error}")));
            }
            _ => {}
        }
    }
    for a in &cfg.bootstrap {
        // Without /p2p/<id> the peer id is learned during the handshake.
        dial_addr(&mut swarm, a);
    }
    let mut ev = EventLoop {
        swarm,
        shared: shared.clone(),
        bootstrap: cfg.bootstrap.clone(),
        addrs: HashMap::new(),
    };
    tokio::spawn(async move { ev.run(cmd_rx).await });
    Ok(shared)
}

struct EventLoop {
    swarm: libp2p::Swarm<Behaviour>,
    shared: Arc<Swarm>,
    bootstrap: Vec<Multiaddr>,
    /// Addresses peers listen on (from identify), for peer exchange.
    addrs: HashMap<PeerId, Vec<Multiaddr>>,
}

impl EventLoop {
    fn hello(&self) -> Hello {
        let s = &self.shared;
        let versions = s.holdings().into_iter().map(|(r, h)| (r.0, h)).collect();
        let peers = self
            .addrs
            .iter()
            .filter(|(p, _)| self.swarm.is_connected(p))
            .map(|(p, a)| (p.to_string(), a.iter().map(|a| a.to_string()).collect()))
            .collect();
        Hello {
            labels: s.labels.clone(),
            bulk_port: s
                .bulk_addr
                .lock()
                .expect("poisoned")
                .map(|a| a.port())
                .unwrap_or(0),
            versions,
            peers,
        }
    }

    fn on_hello(&mut self, peer: PeerId, h: Hello) {
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
            let mut peers = self.shared.peers.lock().expect("poisoned");
            let p = peers.entry(peer).or_insert_with(Peer::new);
            p.labels = h.labels;
            p.bulk_port = Some(h.bulk_port);
            let now = Instant::now();
            let mut versions = HashMap::new();
            for (root, holding) in h.versions {
                let root = Hash(root);
                let pv = match p.versions.remove(&root) {
                    Some(mut old) => {
                        if old.holding != holding {
                            old.holding = holding;
                            old.grew = now;
                        }
                        old
                    }
                    None => PeerVersion {
                        holding,
                        have: None,
                        count: 0,
                        grew: now,
                    },
                };
                if holding == Holding::Pulling && pv.have.is_none() && fetching.contains(&root) {
                    ask.push(root);
                }
                versions.insert(root, pv);
            }
            p.versions = versions;
        }
        for root in ask {
            self.swarm
                .behaviour_mut()
                .ctl
                .send_request(&peer, Req::Have(root.0));
        }
        // Peer exchange: connect to members of the swarm we do not know yet.
        for (id, addrs) in h.peers {
            let Ok(id) = id.parse::<PeerId>() else {
                continue;
            };
            if id == self.shared.peer_id
                || self.swarm.is_connected(&id)
                || !self.shared.is_member(&id)
            {
                continue;
            }
            let addrs: Vec<Multiaddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
            for a in &addrs {
                self.swarm.add_peer_address(id, a.clone());
            }
            dial_peer(&mut self.swarm, id, addrs);
        }
    }

    fn have(&self, root: Hash) -> Option<(Holding, Option<HaveMap>)> {
        let local = self.shared.local.lock().expect("poisoned");
        match local.get(&root) {
            Some(v) => Some((
                v.holding,
                v.have.clone().filter(|_| v.holding == Holding::Pulling),
            )),
            None => self
                .shared
                .through
                .lock()
                .expect("poisoned")
                .contains_key(&root)
                .then_some((Holding::Mounted, None)),
        }
    }

    async fn run(&mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let mut redial = tokio::time::interval(Duration::from_secs(3));
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_event(ev),
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(Cmd::Announce) => {
                        let hello = self.hello();
                        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                        for p in peers {
                            self.swarm.behaviour_mut().ctl.send_request(&p, Req::Hello(hello.clone()));
                        }
                    }
                    Some(Cmd::QueryHave(peer, root)) => {
                        if self.swarm.is_connected(&peer) {
                            self.swarm.behaviour_mut().ctl.send_request(&peer, Req::Have(root.0));
                        }
                    }
                    Some(Cmd::Ban(peer)) => {
                        self.swarm.behaviour_mut().banned.block_peer(peer);
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                },
                _ = redial.tick() => {
                    // Peers come back after restarts: redial the ones we knew, and the
                    // bootstrap addresses while we know nobody.
                    if self.swarm.connected_peers().next().is_none() {
                        for a in self.bootstrap.clone() {
                            dial_addr(&mut self.swarm, &a);
                        }
                    }
                    let lost: Vec<(PeerId, Vec<Multiaddr>)> = self
                        .addrs
                        .iter()
                        .filter(|(p, a)| !a.is_empty() && !self.swarm.is_connected(p) && self.shared.is_member(p))
                        .map(|(p, a)| (*p, a.clone()))
                        .collect();
                    for (peer, addrs) in lost {
                        dial_peer(&mut self.swarm, peer, addrs);
                    }
                }
            }
        }
    }

    fn on_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                let mut l = self.shared.listen.lock().expect("poisoned");
                if !l.contains(&address) {
                    l.push(address);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                if !self.shared.is_member(&peer_id) {
                    tracing::warn!(peer = %peer_id, "disconnecting a peer that is not a member");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                tracing::info!(peer = %peer_id, addr = %endpoint.get_remote_address(), "peer connected");
                {
                    let mut peers = self.shared.peers.lock().expect("poisoned");
                    let p = peers.entry(peer_id).or_insert_with(Peer::new);
                    p.connected = true;
                    if let Some(ip) = ip_of(endpoint.get_remote_address()) {
                        p.ip = Some(ip);
                    }
                }
                let hello = self.hello();
                self.swarm
                    .behaviour_mut()
                    .ctl
                    .send_request(&peer_id, Req::Hello(hello));
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                tracing::info!(peer = %peer_id, "peer disconnected");
                if let Some(p) = self
                    .shared
                    .peers
                    .lock()
                    .expect("poisoned")
                    .get_mut(&peer_id)
                {
                    p.connected = false;
                }
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
                tracing::info!(from = %send_back_addr, "incoming connection failed: {error}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .into_iter()
                    .filter(|a| ip_of(a).is_some_and(|ip| !ip.is_unspecified()))
                    .collect();
                for a in &addrs {
                    self.swarm.add_peer_address(peer_id, a.clone());
                }
                self.addrs.insert(peer_id, addrs);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                if let Some(p) = self.shared.peers.lock().expect("poisoned").get_mut(&peer) {
                    p.rtt = Some(rtt);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    if peer == self.shared.peer_id || !self.shared.is_member(&peer) {
                        continue;
                    }
                    // Remembered, so the redial timer retries if this dial fails.
                    let known = self.addrs.entry(peer).or_default();
                    if !known.contains(&addr) {
                        known.push(addr.clone());
                    }
                    if !self.swarm.is_connected(&peer) {
                        dial_peer(&mut self.swarm, peer, vec![addr]);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ctl(request_response::Event::Message {
                peer,
                message,
                ..
            })) => {
                if !self.shared.is_member(&peer) {
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
                        };
                        let _ = self.swarm.behaviour_mut().ctl.send_response(channel, resp);
                    }
                    request_response::Message::Response { response, .. } => match response {
                        Resp::Hello(h) => self.on_hello(peer, h),
                        Resp::Have(root, h) => self.on_have(peer, Hash(root), h),
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

    fn on_have(&mut self, peer: PeerId, root: Hash, have: Option<(Holding, Option<HaveMap>)>) {
        let mut peers = self.shared.peers.lock().expect("poisoned");
        let Some(p) = peers.get_mut(&peer) else {
            return;
        };
        match have {
            None => {
                p.versions.remove(&root);
            }
            Some((holding, map)) => {
                let now = Instant::now();
                let count = map.as_ref().map(|m| m.count()).unwrap_or(0);
                let v = p.versions.entry(root).or_insert(PeerVersion {
                    holding,
                    have: None,
                    count: 0,
                    grew: now,
                });
                if count > v.count || holding != v.holding {
                    v.grew = now;
                }
                v.holding = holding;
                v.count = count;
                v.have = map;
            }
        }
    }
}
