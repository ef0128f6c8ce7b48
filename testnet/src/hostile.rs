//! A hostile client, for tests that mount attacks on a real node: floods of bare connections,
//! bulk clients with a fresh identity and a missing or wrong cluster-key proof, clients that
//! ask and never read, and libp2p peers that ask the control protocol for what a node holds.
//!
//! Everything here runs in the test's own process against a node daemon in another, over
//! real sockets.

use futures::StreamExt;
use shoal_node::swarm::admission::{Channel, ClusterKey};
use shoal_node::swarm::wire::{self, Auth, Req, Resp};
use shoal_node::swarm::{Multiaddr, PeerId};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// What the attacker proves on connecting.
#[derive(Clone, Debug)]
pub enum Proof {
    /// 32 zero bytes: no key at all.
    None,
    /// The proof made with this key (right or wrong).
    Key(ClusterKey),
}

/// A fresh libp2p identity.
pub fn identity() -> libp2p::identity::Keypair {
    libp2p::identity::Keypair::generate_ed25519()
}

/// A TCP connection to `to` from source address `from` (any loopback address works as a
/// distinct source on Linux: 127.0.0.2 is not 127.0.0.1 to a per-address limit).
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.bind(SocketAddr::new(from, 0))?;
    tokio::time::timeout(Duration::from_secs(5), s.connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Opens up to `n` bare TCP connections (no handshake, nothing sent) to `to` from `from` and
/// returns those that connected; they stay open while the returned streams live.
pub async fn flood(from: IpAddr, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if let Ok(s) = connect_from(from, to).await {
            out.push(s);
        }
    }
    out
}

/// A bulk connection made with a fresh identity.
pub struct Bulk {
    pub stream: tokio_rustls::client::TlsStream<TcpStream>,
    /// The 32-byte proof the server answered with, if it answered.
    pub server_proof: Option<[u8; 32]>,
}

/// Connects to a node's bulk port as `me`, presents `proof`, and reads the server's proof if
/// it sends one within `wait`.
pub async fn bulk_connect(
    me: &libp2p::identity::Keypair,
    from: IpAddr,
    to: SocketAddr,
    server: PeerId,
    proof: &Proof,
    wait: Duration,
) -> std::io::Result<Bulk> {
    let tcp = connect_from(from, to).await?;
    let config = wire::tls_client(me, server).map_err(std::io::Error::other)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::IpAddress(to.ip().into());
    let mut stream = tokio::time::timeout(wait, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS timed out"))??;
    let me_id = me.public().to_peer_id();
    let bytes = match proof {
        Proof::None => [0u8; 32],
        Proof::Key(k) => k.proof(Channel::Bulk, &me_id, &server),
    };
    stream.write_all(&bytes).await?;
    stream.flush().await?;
    let mut theirs = [0u8; 32];
    let server_proof = match tokio::time::timeout(wait, stream.read_exact(&mut theirs)).await {
        Ok(Ok(_)) => Some(theirs),
        _ => None,
    };
    Ok(Bulk {
        stream,
        server_proof,
    })
}

impl Bulk {
    /// Sends one request for `ids`.
    pub async fn ask(&mut self, ids: &[[u8; 32]]) -> std::io::Result<()> {
        let mut frame = Vec::with_capacity(4 + 32 * ids.len());
        frame.extend_from_slice(&(ids.len() as u32).to_be_bytes());
        for id in ids {
            frame.extend_from_slice(id);
        }
        self.stream.write_all(&frame).await?;
        self.stream.flush().await
    }

    /// Reads the answer to a request for `n` ids: the bytes of each blob sent (None: "not
    /// here"). Fails if the connection closes first or nothing comes within `wait`.
    pub async fn answer(
        &mut self,
        n: usize,
        wait: Duration,
    ) -> std::io::Result<Vec<Option<Vec<u8>>>> {
        tokio::time::timeout(wait, async {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let len = self.stream.read_u32().await?;
                if len == u32::MAX {
                    out.push(None);
                    continue;
                }
                let mut b = vec![0u8; len as usize];
                self.stream.read_exact(&mut b).await?;
                out.push(Some(b));
            }
            Ok(out)
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
    }

    /// Bytes the server sends before closing or falling silent for `wait`.
    pub async fn drain(&mut self, wait: Duration) -> usize {
        let mut total = 0;
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(Ok(n)) = tokio::time::timeout(wait, self.stream.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    }
}

/// What a libp2p attacker got from a node's control protocol.
#[derive(Debug, Default)]
pub struct CtlReport {
    /// It completed the libp2p handshake.
    pub connected: bool,
    /// The node answered its proof with one of its own.
    pub auth_answered: bool,
    /// Answers to its hello (which list the versions held).
    pub hellos: usize,
    /// Version roots the node said it holds or pulls (from hellos and have answers).
    pub roots_learned: Vec<[u8; 32]>,
    /// Have answers received.
    pub haves: usize,
    /// It was disconnected before the end.
    pub disconnected: bool,
}

#[derive(libp2p::swarm::NetworkBehaviour)]
struct Attacker {
    auth: libp2p::request_response::cbor::Behaviour<Auth, Auth>,
    ctl: libp2p::request_response::cbor::Behaviour<Req, Resp>,
}

/// A libp2p swarm speaking the node's auth and control protocols with identity `key`, its
/// connections kept for `idle` without traffic.
fn attacker_swarm(key: libp2p::identity::Keypair, idle: Duration) -> libp2p::Swarm<Attacker> {
    use libp2p::request_response::{self as rr, ProtocolSupport};
    libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            (libp2p::tls::Config::new, libp2p::noise::Config::new),
            libp2p::yamux::Config::default,
        )
        .expect("transport")
        .with_behaviour(|_| Attacker {
            auth: rr::cbor::Behaviour::new(
                [(
                    libp2p::StreamProtocol::new(wire::AUTH_PROTOCOL),
                    ProtocolSupport::Full,
                )],
                rr::Config::default(),
            ),
            ctl: rr::cbor::Behaviour::new(
                [(
                    libp2p::StreamProtocol::new(wire::PROTOCOL),
                    ProtocolSupport::Full,
                )],
                rr::Config::default(),
            ),
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build()
}

/// Connects to a node's control address with a fresh identity, presents `proof`, asks it for
/// its hello and for `root`'s have-map, and reports what came back within `secs`.
pub async fn ctl_probe(addr: Multiaddr, proof: Proof, root: [u8; 32], secs: u64) -> CtlReport {
    use libp2p::request_response as rr;
    use libp2p::swarm::SwarmEvent;
    let key = identity();
    let me = key.public().to_peer_id();
    let mut swarm = attacker_swarm(key, Duration::from_secs(60));
    let mut report = CtlReport::default();
    if swarm.dial(addr).is_err() {
        return report;
    }
    let hello = wire::Hello {
        labels: Default::default(),
        bulk_port: 1,
        listen: Vec::new(),
        versions: Vec::new(),
        peers: Vec::new(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let ev = tokio::select! {
            ev = swarm.select_next_some() => ev,
            _ = tokio::time::sleep_until(deadline) => break,
        };
        match ev {
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                report.connected = true;
                let p = match &proof {
                    Proof::None => [0u8; 32],
                    Proof::Key(k) => k.proof(Channel::Control, &me, &peer_id),
                };
                swarm.behaviour_mut().auth.send_request(&peer_id, Auth(p));
                swarm
                    .behaviour_mut()
                    .ctl
                    .send_request(&peer_id, Req::Hello(hello.clone()));
                swarm
                    .behaviour_mut()
                    .ctl
                    .send_request(&peer_id, Req::Have(root));
            }
            SwarmEvent::ConnectionClosed {
                num_established: 0, ..
            } => {
                report.disconnected = true;
            }
            SwarmEvent::Behaviour(AttackerEvent::Auth(rr::Event::Message {
                peer,
                message: rr::Message::Response { .. },
                ..
            })) => {
                // Admitted: ask again (what was asked before admission got no answer).
                report.auth_answered = true;
                swarm
                    .behaviour_mut()
                    .ctl
                    .send_request(&peer, Req::Hello(hello.clone()));
                swarm
                    .behaviour_mut()
                    .ctl
                    .send_request(&peer, Req::Have(root));
            }
            SwarmEvent::Behaviour(AttackerEvent::Ctl(rr::Event::Message {
                message:
                    rr::Message::Request {
                        request: Req::Hello(h),
                        ..
                    },
                ..
            })) => {
                // The node's own hello lists what it holds, too.
                report.hellos += 1;
                report
                    .roots_learned
                    .extend(h.versions.iter().map(|(r, _)| *r));
            }
            SwarmEvent::Behaviour(AttackerEvent::Ctl(rr::Event::Message {
                message:
                    rr::Message::Request {
                        request: Req::Roster(list),
                        ..
                    },
                ..
            })) => {
                // So do its rosters (who pulls and holds what).
                report.roots_learned.extend(list.iter().map(|(r, _)| *r));
            }
            SwarmEvent::Behaviour(AttackerEvent::Ctl(rr::Event::Message {
                message: rr::Message::Response { response, .. },
                ..
            })) => match response {
                Resp::Hello(h) => {
                    report.hellos += 1;
                    report
                        .roots_learned
                        .extend(h.versions.iter().map(|(r, _)| *r));
                }
                Resp::Have(r, held) => {
                    report.haves += 1;
                    if held.is_some() {
                        report.roots_learned.push(r);
                    }
                }
                Resp::Ack => {}
            },
            _ => {}
        }
    }
    report
}

/// How a [`Liar`] answers bulk requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answers {
    /// "Not here" for every id.
    NotHere,
    /// A compressed frame declaring a few bytes per id that decompresses to 16 MiB (a zstd
    /// bomb).
    Bomb,
    /// A well-formed compressed frame holding one record more than the ids asked for.
    Overrun,
    /// A well-formed compressed frame of 4 KiB blobs of junk (bytes that do not match the ids).
    Junk,
    /// Blobs sent as a store keeps them compressed, each a zstd frame declaring 16 MiB of
    /// zeros (a few hundred bytes on the wire each).
    BlobBombs,
}

impl Answers {
    /// The bytes answering a request for `n` ids (a compressed frame: `u32 stored | 1 << 31`,
    /// `u32 raw`, zstd bytes; see `shoal_node::swarm::bulk`).
    fn answer(self, n: usize) -> Vec<u8> {
        let frame = |raw: &[u8], declared: usize| {
            let z = zstd::bulk::compress(raw, 3).expect("zstd");
            let mut out = ((z.len() as u32) | 1 << 31).to_be_bytes().to_vec();
            out.extend_from_slice(&(declared as u32).to_be_bytes());
            out.extend_from_slice(&z);
            out
        };
        let records = |count: usize, blob: &[u8]| -> Vec<u8> {
            let mut r = Vec::new();
            for _ in 0..count {
                if blob.is_empty() {
                    r.extend_from_slice(&u32::MAX.to_be_bytes());
                } else {
                    r.extend_from_slice(&(blob.len() as u32).to_be_bytes());
                    r.extend_from_slice(blob);
                }
            }
            r
        };
        match self {
            Answers::NotHere => records(n, &[]),
            Answers::Bomb => frame(&vec![0u8; 16 << 20], 4 * n + 4096),
            Answers::Overrun => {
                let r = records(n + 1, &[7u8; 512]);
                frame(&r, r.len())
            }
            Answers::Junk => {
                let r = records(n, &[b'x'; 4096]);
                frame(&r, r.len())
            }
            Answers::BlobBombs => {
                let z = zstd::bulk::compress(&vec![0u8; 16 << 20], 3).expect("zstd");
                let mut r = Vec::new();
                for _ in 0..n {
                    r.extend_from_slice(&((z.len() as u32) | 1 << 30).to_be_bytes());
                    r.extend_from_slice(&z);
                }
                r
            }
        }
    }
}

/// A fake node that lies: it says it is pulling `root` (whose version has `chunks` unique
/// chunks), claims `grow` more chunks every 100 ms (pushed as have-deltas, and in the map it
/// answers with, so it looks like a puller making progress), and answers every bulk request as
/// `answers` says. It lists itself as a puller in the version's roster.
pub struct Liar {
    /// Its control address, for a node to bootstrap from.
    pub addr: Multiaddr,
    pub peer_id: PeerId,
    /// Bulk requests it answered.
    pub asked: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Liar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a [`Liar`] on loopback (with `key`'s proofs, if given) inside the current runtime.
pub async fn liar(
    root: [u8; 32],
    chunks: u32,
    grow: u32,
    key: Option<ClusterKey>,
    answers: Answers,
) -> Liar {
    use libp2p::request_response as rr;
    use libp2p::swarm::SwarmEvent;
    use shoal_node::swarm::{HaveMap, Holding};
    let keypair = identity();
    let me = keypair.public().to_peer_id();
    // The bulk side: proofs, then the answers it was told to give (compressed frames are
    // negotiated as a compressing node does).
    let bulk = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bulk listener");
    let bulk_port = bulk.local_addr().expect("bulk address").port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        wire::tls_server(&keypair, true).expect("TLS config"),
    ));
    let asked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (bulk_key, bulk_asked) = (key.clone(), asked.clone());
    let bulk_task = async move {
        loop {
            let Ok((tcp, _)) = bulk.accept().await else {
                continue;
            };
            let (acceptor, key, asked) = (acceptor.clone(), bulk_key.clone(), bulk_asked.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Some(client) = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first().cloned())
                    .and_then(|c| libp2p_tls_peer(&c))
                else {
                    return;
                };
                let mut theirs = [0u8; 32];
                if tls.read_exact(&mut theirs).await.is_err() {
                    return;
                }
                let mine = key.map_or([0; 32], |k| k.proof(Channel::Bulk, &me, &client));
                if tls.write_all(&mine).await.is_err() || tls.flush().await.is_err() {
                    return;
                }
                while let Ok((ids, _)) = shoal_node::swarm::bulk::read_request(&mut tls).await {
                    asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let answer = answers.answer(ids.len());
                    if tls.write_all(&answer).await.is_err() || tls.flush().await.is_err() {
                        return;
                    }
                }
            });
        }
    };
    let mut swarm = attacker_swarm(keypair, Duration::from_secs(600));
    swarm
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr"))
        .expect("listening");
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    let hello = wire::Hello {
        labels: Default::default(),
        bulk_port,
        listen: vec![addr.to_string()],
        versions: vec![(root, Holding::Pulling)],
        peers: Vec::new(),
    };
    let ctl_task = async move {
        // What it claims grows like a puller's: pushed as have-deltas every 100 ms to the
        // peers it is connected to, and in the map it answers with.
        let mut claimed = 0u32;
        let epoch = 7;
        let mut peers = std::collections::HashSet::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            let ev = tokio::select! {
                ev = swarm.select_next_some() => ev,
                _ = tick.tick() => {
                    // It lists itself as a puller (so it is among the origin readers).
                    let listing = wire::Listing {
                        peer: me.to_bytes(),
                        holding: Holding::Pulling,
                        addrs: hello.listen.clone(),
                        age_ms: 0,
                        // Started before anyone (so it is among the origin readers).
                        started_ms: 1,
                    };
                    for p in &peers {
                        let r = Req::Roster(vec![(root, vec![listing.clone()])]);
                        swarm.behaviour_mut().ctl.send_request(p, r);
                    }
                    let from = claimed;
                    claimed = (claimed + grow).min(chunks);
                    if claimed > from {
                        for p in &peers {
                            let chunks: Vec<u32> = (from..claimed).collect();
                            let d = wire::Delta::new(root, epoch, from as u64, &chunks);
                            swarm.behaviour_mut().ctl.send_request(p, Req::HaveDelta(d));
                        }
                    }
                    continue;
                }
            };
            match ev {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    peers.insert(peer_id);
                    if key.is_some() {
                        let p = control_proof(key.as_ref(), &me, &peer_id);
                        swarm.behaviour_mut().auth.send_request(&peer_id, Auth(p));
                    }
                    swarm
                        .behaviour_mut()
                        .ctl
                        .send_request(&peer_id, Req::Hello(hello.clone()));
                }
                SwarmEvent::ConnectionClosed {
                    peer_id,
                    num_established: 0,
                    ..
                } => {
                    peers.remove(&peer_id);
                }
                SwarmEvent::Behaviour(AttackerEvent::Auth(rr::Event::Message {
                    peer,
                    message: rr::Message::Request { channel, .. },
                    ..
                })) => {
                    let p = control_proof(key.as_ref(), &me, &peer);
                    let _ = swarm.behaviour_mut().auth.send_response(channel, Auth(p));
                }
                SwarmEvent::Behaviour(AttackerEvent::Ctl(rr::Event::Message {
                    message:
                        rr::Message::Request {
                            request, channel, ..
                        },
                    ..
                })) => {
                    let resp = match request {
                        Req::Hello(_) => Resp::Hello(hello.clone()),
                        Req::Have(r) if r == root => {
                            let mut map = HaveMap::new(chunks as usize);
                            for i in 0..claimed as usize {
                                map.set(i);
                            }
                            Resp::Have(
                                r,
                                Some(wire::Held {
                                    holding: Holding::Pulling,
                                    map: Some(map),
                                    epoch,
                                    upto: claimed as u64,
                                }),
                            )
                        }
                        Req::Have(r) => Resp::Have(r, None),
                        Req::HaveDelta(_) | Req::Roster(_) => Resp::Ack,
                    };
                    let _ = swarm.behaviour_mut().ctl.send_response(channel, resp);
                }
                _ => {}
            }
        }
    };
    let peer_id = me;
    let task = tokio::spawn(async move {
        tokio::join!(bulk_task, ctl_task);
    });
    Liar {
        addr,
        peer_id,
        asked,
        task,
    }
}

/// The control channel's proof of `key` from `me` to `peer` (zeros without a key).
fn control_proof(key: Option<&ClusterKey>, me: &PeerId, peer: &PeerId) -> [u8; 32] {
    key.map_or([0; 32], |k| k.proof(Channel::Control, me, peer))
}

/// The peer id a libp2p TLS certificate proves.
fn libp2p_tls_peer(cert: &rustls::pki_types::CertificateDer<'static>) -> Option<PeerId> {
    libp2p_tls::certificate::parse(cert)
        .ok()
        .map(|c| c.peer_id())
}

/// A member that floods rosters: once connected to a node (it dials `target`, proving
/// `key` if given), it lists `phantoms` pullers of `root` that do not exist, picked to rank
/// before any real node (rendezvous on the version's key), every 500 ms. Dropping it stops it.
pub struct RosterFlooder {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RosterFlooder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a [`RosterFlooder`] inside the current runtime.
pub fn roster_flooder(
    target: Multiaddr,
    root: [u8; 32],
    phantoms: usize,
    key: Option<ClusterKey>,
) -> RosterFlooder {
    use libp2p::request_response as rr;
    use libp2p::swarm::SwarmEvent;
    use shoal_node::swarm::roster::rank;
    use shoal_node::swarm::Holding;
    let keypair = identity();
    let me = keypair.public().to_peer_id();
    // Ids in the top 1/1000 of ranks: ahead of every node of a small cluster.
    let version = shoal_registry::Hash(root);
    let listings: Vec<wire::Listing> = std::iter::repeat_with(PeerId::random)
        .filter(|p| rank(p, &version) > u64::MAX - u64::MAX / 1000)
        .take(phantoms)
        .map(|p| wire::Listing {
            peer: p.to_bytes(),
            holding: Holding::Pulling,
            addrs: vec!["/ip4/127.0.0.1/tcp/9".into()],
            age_ms: 0,
            // Started before anyone: first in line.
            started_ms: 1,
        })
        .collect();
    let mut swarm = attacker_swarm(keypair, Duration::from_secs(600));
    let task = tokio::spawn(async move {
        let _ = swarm.dial(target);
        let mut peers = std::collections::HashSet::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    for p in &peers {
                        let r = Req::Roster(vec![(root, listings.clone())]);
                        swarm.behaviour_mut().ctl.send_request(p, r);
                    }
                }
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                        peers.insert(peer_id);
                        if key.is_some() {
                            let p = control_proof(key.as_ref(), &me, &peer_id);
                            swarm.behaviour_mut().auth.send_request(&peer_id, Auth(p));
                        }
                    }
                    SwarmEvent::Behaviour(AttackerEvent::Auth(rr::Event::Message {
                        peer,
                        message: rr::Message::Request { channel, .. },
                        ..
                    })) => {
                        let p = control_proof(key.as_ref(), &me, &peer);
                        let _ = swarm.behaviour_mut().auth.send_response(channel, Auth(p));
                    }
                    SwarmEvent::Behaviour(AttackerEvent::Ctl(rr::Event::Message {
                        message: rr::Message::Request { request, channel, .. },
                        ..
                    })) => {
                        let resp = match request {
                            Req::Have(r) => Resp::Have(r, None),
                            Req::Hello(_) => Resp::Hello(wire::Hello {
                                labels: Default::default(),
                                bulk_port: 1,
                                listen: Vec::new(),
                                versions: Vec::new(),
                                peers: Vec::new(),
                            }),
                            Req::HaveDelta(_) | Req::Roster(_) => Resp::Ack,
                        };
                        let _ = swarm.behaviour_mut().ctl.send_response(channel, resp);
                    }
                    _ => {}
                },
            }
        }
    });
    RosterFlooder { task }
}
