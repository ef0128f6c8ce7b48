//! The bulk channel: chunk bytes between two nodes.
//!
//! One TCP connection per pair of peers, TLS 1.3 with libp2p identity certificates (the server
//! learns the client's peer id from its certificate, the client checks the server's), then:
//!
//! - request: `u32 n` (big-endian), then `n` 32-byte blob ids; with the top bit of `n` set
//!   (a *through* request), a 32-byte version root comes before the ids, and the server
//!   fetches from its origin those blobs of that version it lacks, if it mounts the version
//!   (mounting nodes share the origin reads of a cold version that way);
//! - response, per id in order: `u32 len` and `len` bytes, or `u32::MAX` for "not here".
//!
//! A client keeps many requests in flight; the server answers them in order. The client
//! verifies every blob against its id before storing it: a peer cannot make this node store
//! or serve a byte that does not hash to what was asked for.

use super::Swarm;
use crate::error::{Error, Result};
use crate::store::Retain;
use bytes::Bytes;
use futures::StreamExt;
use libp2p::PeerId;
use shoal_registry::Hash;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const MISSING: u32 = u32::MAX;
/// Top bit of a request's count: a version root follows, fetch what is missing through it.
const THROUGH: u32 = 1 << 31;
/// How long a server waits on its origin for a through request.
const THROUGH_WAIT: Duration = Duration::from_secs(60);
/// Requests of one connection prepared at once (their answers still go out in order).
const PIPELINE: usize = 8;
/// Most ids in one request.
pub const MAX_IDS: usize = 1024;
/// Bytes read from the socket at once by a client (below TLS).
const RECV_BUFFER: usize = 256 << 10;
/// Size of the buffers received blobs are read into (many blobs each).
const RECV_POOL: usize = 4 << 20;
/// Received batches of one connection verified and stored at once.
const STORING: usize = 4;
/// Largest blob a peer may send (chunks are at most 128 KiB by default, tree nodes small).
const MAX_BLOB: u32 = 64 << 20;

/// What happened to one requested blob.
#[derive(Debug)]
pub enum Outcome {
    /// Verified and stored.
    Stored(u32),
    /// The peer does not have it.
    Missing,
    /// The peer sent bytes that do not match the id.
    Bad,
    /// The connection failed before the blob arrived.
    Lost,
}

/// Reported to whoever made a request, one per blob.
#[derive(Debug)]
pub struct Event {
    pub peer: PeerId,
    pub id: Hash,
    pub outcome: Outcome,
    /// The verified bytes, when the request asked for them.
    pub bytes: Option<Bytes>,
}

/// One request: blobs, and where to report what became of each.
pub struct Request {
    pub ids: Vec<Hash>,
    pub reply: mpsc::UnboundedSender<Event>,
    /// Hand the verified bytes back too (a reader waiting for them), not only store them.
    pub want_bytes: bool,
    /// Ask the peer to fetch what it lacks of this version from its origin (it mounts it).
    pub through: Option<Hash>,
    /// How the local store keeps what arrives (a mount's cache fill may be declined).
    pub retain: Retain,
}

struct Pending {
    ids: Vec<Hash>,
    reply: mpsc::UnboundedSender<Event>,
    want_bytes: bool,
    retain: Retain,
    sent: Instant,
}

/// Reports every blob of a request as lost.
fn lost_ids(ids: Vec<Hash>, reply: &mpsc::UnboundedSender<Event>, peer: PeerId) {
    for id in ids {
        let _ = reply.send(Event {
            peer,
            id,
            outcome: Outcome::Lost,
            bytes: None,
        });
    }
}

fn lost(p: Pending, peer: PeerId) {
    lost_ids(p.ids, &p.reply, peer);
}

fn io_err(e: std::io::Error) -> Error {
    Error::Net(format!("bulk channel: {e}"))
}

fn tls_err(e: impl std::fmt::Display) -> Error {
    Error::Net(format!("bulk channel TLS: {e}"))
}

/// A connection to one peer's bulk server.
pub struct Client {
    tx: mpsc::Sender<Request>,
    closed: Arc<AtomicBool>,
}

impl Client {
    /// Connects and authenticates `peer` at `addr`.
    pub async fn connect(swarm: Arc<Swarm>, peer: PeerId, addr: SocketAddr) -> Result<Client> {
        let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .map_err(|_| Error::Net(format!("connecting to peer {peer} at {addr}: timed out")))?
            .map_err(|e| Error::Net(format!("connecting to peer {peer} at {addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        // rustls reads the socket 4 KiB at a time (up to a record): a buffer under it reads
        // RECV_BUFFER at once (a 1 GiB pull: 67,441 receive calls before, 4,553 after, each
        // one also sending an acknowledgement).
        let tcp = tokio::io::BufReader::with_capacity(RECV_BUFFER, tcp);
        let config = super::tls::client(&swarm.keypair, peer).map_err(tls_err)?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
            .await
            .map_err(|_| Error::Net(format!("TLS with peer {peer} at {addr}: timed out")))?
            .map_err(|e| Error::Net(format!("TLS with peer {peer} at {addr}: {e}")))?;
        let (r, w) = tokio::io::split(tls);
        let (tx, mut rx) = mpsc::channel::<Request>(64);
        let (ptx, mut prx) = mpsc::unbounded_channel::<Pending>();
        let closed = Arc::new(AtomicBool::new(false));

        // Writer: sends requests, hands them to the reader in the same order.
        let c = closed.clone();
        tokio::spawn(async move {
            let mut w = BufWriter::with_capacity(64 << 10, w);
            while let Some(req) = rx.recv().await {
                let mut frame = Vec::with_capacity(36 + 32 * req.ids.len());
                let n = req.ids.len() as u32;
                match &req.through {
                    Some(root) => {
                        frame.extend_from_slice(&(n | THROUGH).to_be_bytes());
                        frame.extend_from_slice(&root.0);
                    }
                    None => frame.extend_from_slice(&n.to_be_bytes()),
                }
                for id in &req.ids {
                    frame.extend_from_slice(&id.0);
                }
                let p = Pending {
                    ids: req.ids,
                    reply: req.reply,
                    want_bytes: req.want_bytes,
                    retain: req.retain,
                    sent: Instant::now(),
                };
                let ok = w.write_all(&frame).await.is_ok() && w.flush().await.is_ok();
                if !ok || c.load(Ordering::Relaxed) {
                    c.store(true, Ordering::Relaxed);
                    lost(p, peer);
                    break;
                }
                if let Err(e) = ptx.send(p) {
                    lost(e.0, peer);
                    break;
                }
            }
            c.store(true, Ordering::Relaxed);
            while let Ok(req) = rx.try_recv() {
                lost_ids(req.ids, &req.reply, peer);
            }
        });

        // Reader: reads responses, hands whole batches to the verifier.
        let (vtx, mut vrx) = mpsc::channel::<(Pending, Vec<Option<Bytes>>, Instant)>(4);
        let c = closed.clone();
        let sw = swarm.clone();
        tokio::spawn(async move {
            // TLS keeps decrypted records buffered: reading straight from it saves a copy.
            let mut r = r;
            let mut last_done = Instant::now();
            // A pull's blobs are read into slices of one large buffer, not one allocation each.
            let mut pool = bytes::BytesMut::new();
            while let Some(p) = prx.recv().await {
                let mut blobs = Vec::with_capacity(p.ids.len());
                let mut failed = false;
                for _ in 0..p.ids.len() {
                    let len = match r.read_u32().await {
                        Ok(l) => l,
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    };
                    if len == MISSING {
                        blobs.push(None);
                        continue;
                    }
                    if len > MAX_BLOB {
                        sw.fault(&peer, &format!("sent a {len}-byte blob"));
                        failed = true;
                        break;
                    }
                    // Bytes handed back to a reader get their own allocation: a slice would
                    // keep its whole pool buffer alive for as long as the reader holds it.
                    let mut own = bytes::BytesMut::new();
                    let buf = if p.want_bytes {
                        own.reserve(len as usize);
                        &mut own
                    } else {
                        if pool.capacity() < len as usize {
                            pool = bytes::BytesMut::with_capacity(RECV_POOL.max(len as usize));
                        }
                        &mut pool
                    };
                    while buf.len() < len as usize {
                        let want = len as usize - buf.len();
                        match (&mut r).take(want as u64).read_buf(buf).await {
                            Ok(0) | Err(_) => {
                                failed = true;
                                break;
                            }
                            Ok(_) => {}
                        }
                    }
                    if failed {
                        break;
                    }
                    blobs.push(Some(buf.split().freeze()));
                }
                if failed {
                    c.store(true, Ordering::Relaxed);
                    lost(p, peer);
                    break;
                }
                let start = p.sent.max(last_done);
                last_done = Instant::now();
                if vtx.send((p, blobs, start)).await.is_err() {
                    break;
                }
            }
            c.store(true, Ordering::Relaxed);
            while let Ok(p) = prx.try_recv() {
                lost(p, peer);
            }
        });

        // Verifier: checks every blob against its id and stores the good ones on blocking
        // threads, up to STORING batches at once (one hashing while another writes: 1 GiB on
        // loopback took 1.16 s one at a time, 0.99 s four at once); the reporter reports on
        // each batch, in order. In flight: the one the reporter awaits, those queued to it,
        // and the one the verifier waits to queue.
        let (rtx, mut rrx) = mpsc::channel(STORING - 2);
        let sw = swarm.clone();
        tokio::spawn(async move {
            while let Some((p, blobs, start)) = vrx.recv().await {
                let store = sw.store.clone();
                let ids = p.ids.clone();
                let retain = p.retain;
                let checked = tokio::task::spawn_blocking(move || {
                    let mut outcomes = Vec::with_capacity(ids.len());
                    let mut good: Vec<(Hash, &[u8])> = Vec::new();
                    for (id, b) in ids.iter().zip(&blobs) {
                        outcomes.push(match b {
                            None => Outcome::Missing,
                            Some(b) if id.verify(b) => {
                                good.push((*id, b));
                                Outcome::Stored(b.len() as u32)
                            }
                            Some(_) => Outcome::Bad,
                        });
                    }
                    let stored = store.put_batch(&good, retain);
                    drop(good);
                    (outcomes, stored, blobs)
                });
                if rtx.send((p, start, checked)).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            while let Some((p, start, checked)) = rrx.recv().await {
                let (mut outcomes, stored, blobs) = checked.await.expect("verify task panicked");
                if let Err(e) = stored {
                    tracing::warn!("storing chunks from peer {peer}: {e}");
                    outcomes = p.ids.iter().map(|_| Outcome::Lost).collect();
                }
                let bytes: u64 = outcomes
                    .iter()
                    .map(|o| match o {
                        Outcome::Stored(n) => *n as u64,
                        _ => 0,
                    })
                    .sum();
                if bytes > 0 {
                    let secs = start.elapsed().as_secs_f64().max(1e-4);
                    let rate = bytes as f64 / secs;
                    let mut peers = swarm.peers.lock().expect("poisoned");
                    if let Some(pe) = peers.get_mut(&peer) {
                        pe.bytes_received += bytes;
                        pe.throughput = if pe.throughput == 0.0 {
                            rate
                        } else {
                            0.8 * pe.throughput + 0.2 * rate
                        };
                    }
                }
                for ((id, outcome), b) in p.ids.into_iter().zip(outcomes).zip(blobs) {
                    let bytes = match outcome {
                        Outcome::Stored(_) if p.want_bytes => b,
                        _ => None,
                    };
                    let _ = p.reply.send(Event {
                        peer,
                        id,
                        outcome,
                        bytes,
                    });
                }
            }
        });
        Ok(Client { tx, closed })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed) || self.tx.is_closed()
    }

    /// Queues a request; if the connection is gone, every blob is reported lost.
    pub async fn request(&self, peer: PeerId, req: Request) {
        if let Err(e) = self.tx.send(req).await {
            lost_ids(e.0.ids, &e.0.reply, peer);
        }
    }
}

/// The blobs of one request: from the store (or the pack index cache), then, for a through
/// request, what is missing from the origin.
async fn answer(
    swarm: Arc<Swarm>,
    peer: PeerId,
    ids: Vec<Hash>,
    through: Option<Hash>,
) -> Vec<Option<Bytes>> {
    let sw = swarm.clone();
    let (ids, mut blobs) = tokio::task::spawn_blocking(move || {
        let blobs: Vec<Option<Bytes>> = ids
            .iter()
            .map(|id| match sw.store.get_for_peer(id) {
                Ok(Some(b)) => Some(Bytes::from(b)),
                _ => std::fs::read(sw.pack_cache.join(format!("{id}.idx")))
                    .ok()
                    .filter(|b| id.verify(b))
                    .map(Bytes::from),
            })
            .collect();
        (ids, blobs)
    })
    .await
    .expect("store task panicked");
    if let Some(root) = through {
        fill_through(&swarm, &peer, &root, &ids, &mut blobs).await;
    }
    blobs
}

/// For a through request: fetches the blobs this node lacks from its origin, if it mounts
/// `root`; what cannot be had within [`THROUGH_WAIT`] stays "not here".
async fn fill_through(
    swarm: &Arc<Swarm>,
    peer: &PeerId,
    root: &Hash,
    ids: &[Hash],
    blobs: &mut [Option<Bytes>],
) {
    let lacking: Vec<Hash> = ids
        .iter()
        .zip(blobs.iter())
        .filter(|(_, b)| b.is_none())
        .map(|(id, _)| *id)
        .collect();
    if lacking.is_empty() {
        return;
    }
    let Some(fetcher) = swarm.through_fetcher(root) else {
        return;
    };
    match tokio::time::timeout(THROUGH_WAIT, fetcher.fetch_for_peer(lacking)).await {
        Ok(Ok(mut got)) => {
            for (id, slot) in ids.iter().zip(blobs.iter_mut()) {
                if slot.is_none() {
                    *slot = got.remove(id);
                }
            }
        }
        Ok(Err(e)) => tracing::debug!(%peer, "fetching for a peer from the origin: {e}"),
        Err(_) => tracing::debug!(%peer, "fetching for a peer from the origin: timed out"),
    }
}

/// Serves this node's store to members on `listener` until the process ends.
pub async fn serve(swarm: Arc<Swarm>, listener: TcpListener, config: rustls::ServerConfig) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("bulk server accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let swarm = swarm.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(swarm, acceptor, tcp).await {
                tracing::debug!("bulk connection from {from}: {e}");
            }
        });
    }
}

async fn serve_conn(
    swarm: Arc<Swarm>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
) -> Result<()> {
    let tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
        .await
        .map_err(|_| Error::Net("TLS handshake timed out".into()))?
        .map_err(tls_err)?;
    let peer = {
        let certs = tls
            .get_ref()
            .1
            .peer_certificates()
            .ok_or_else(|| Error::Net("client sent no certificate".into()))?;
        let cert = certs
            .first()
            .ok_or_else(|| Error::Net("client sent no certificate".into()))?;
        libp2p_tls::certificate::parse(cert)
            .map_err(tls_err)?
            .peer_id()
    };
    if !swarm.is_member(&peer) {
        tracing::warn!(%peer, "refusing bulk connection from a peer that is not a member");
        return Err(Error::Net(format!("{peer} is not a member")));
    }
    let (r, w) = tokio::io::split(tls);
    let (tx, mut rx) = mpsc::channel::<(Vec<Hash>, Option<Hash>)>(16);
    let reader = tokio::spawn(async move {
        let mut r = BufReader::with_capacity(64 << 10, r);
        loop {
            let head = r.read_u32().await?;
            let n = (head & !THROUGH) as usize;
            if n > MAX_IDS {
                return Err(std::io::Error::other(format!("request for {n} blobs")));
            }
            let through = if head & THROUGH != 0 {
                let mut root = [0u8; 32];
                r.read_exact(&mut root).await?;
                Some(Hash(root))
            } else {
                None
            };
            let mut raw = vec![0u8; 32 * n];
            r.read_exact(&mut raw).await?;
            let ids = raw
                .chunks_exact(32)
                .map(|c| Hash(c.try_into().expect("32 bytes")))
                .collect();
            if tx.send((ids, through)).await.is_err() {
                return Ok::<_, std::io::Error>(());
            }
        }
    });
    let fault = swarm.fault.clone();
    let mut w = w;
    // Answers go out in request order; up to PIPELINE are prepared at once, so a through
    // request waiting on the origin does not hold back the start of the ones after it.
    let mut answers = futures::stream::FuturesOrdered::new();
    let mut open = true;
    let mut slow_until = tokio::time::Instant::now();
    loop {
        tokio::select! {
            req = rx.recv(), if open && answers.len() < PIPELINE => {
                let Some((ids, through)) = req else {
                    open = false;
                    continue;
                };
                if !swarm.is_member(&peer) {
                    break;
                }
                if fault.as_deref() == Some("stall") {
                    // Test hook: accept requests and never answer them.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                // Test hook: a slow peer, one answer per 300 ms.
                let not_before = (fault.as_deref() == Some("slow")).then(|| {
                    slow_until = slow_until.max(tokio::time::Instant::now()) + Duration::from_millis(300);
                    slow_until
                });
                let work = answer(swarm.clone(), peer, ids, through);
                answers.push_back(async move {
                    if let Some(t) = not_before {
                        tokio::time::sleep_until(t).await;
                    }
                    work.await
                });
            }
            Some(blobs) = answers.next(), if !answers.is_empty() => {
                let blobs: Vec<Option<Bytes>> = if fault.as_deref() == Some("lie") {
                    // Test hook: flip one byte of every blob.
                    blobs
                        .into_iter()
                        .map(|b| {
                            b.map(|b| {
                                let mut v = b.to_vec();
                                if let Some(x) = v.first_mut() {
                                    *x ^= 0xff;
                                }
                                Bytes::from(v)
                            })
                        })
                        .collect()
                } else {
                    blobs
                };
                let heads: Vec<[u8; 4]> = blobs
                    .iter()
                    .map(|b| b.as_ref().map_or(MISSING, |b| b.len() as u32).to_be_bytes())
                    .collect();
                let mut slices = Vec::with_capacity(2 * blobs.len());
                let mut sent = 0u64;
                for (h, b) in heads.iter().zip(&blobs) {
                    slices.push(std::io::IoSlice::new(h));
                    if let Some(b) = b {
                        slices.push(std::io::IoSlice::new(b));
                        sent += b.len() as u64;
                    }
                }
                // One vectored write per response: TLS records are filled from the blobs
                // directly.
                let mut rest = &mut slices[..];
                while !rest.is_empty() {
                    let n = w.write_vectored(rest).await.map_err(io_err)?;
                    if n == 0 {
                        return Err(io_err(std::io::ErrorKind::WriteZero.into()));
                    }
                    std::io::IoSlice::advance_slices(&mut rest, n);
                }
                w.flush().await.map_err(io_err)?;
                swarm
                    .counters
                    .bytes_served
                    .fetch_add(sent, Ordering::Relaxed);
                if let Some(p) = swarm.peers.lock().expect("poisoned").get_mut(&peer) {
                    p.bytes_sent += sent;
                }
            }
            else => break,
        }
    }
    reader.abort();
    Ok(())
}
