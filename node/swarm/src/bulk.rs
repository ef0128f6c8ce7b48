//! The bulk channel: chunk bytes between two nodes.
//!
//! One TCP connection per pair of peers, TLS 1.3 with libp2p identity certificates (the server
//! learns the client's peer id from its certificate, the client checks the server's), then
//! admission: the client sends its 32-byte proof of the cluster key (zeros without one), the
//! server checks it (see [`super::admission`]) and answers with its own, or closes. Then:
//!
//! - request: `u32 n` (big-endian), then `n` 32-byte blob ids; with the top bit of `n` set
//!   (a *through* request), a 32-byte version root comes before the ids, and the server
//!   fetches from its origin those blobs of that version it lacks, if it mounts the version
//!   (mounting nodes share the origin reads of a cold version that way);
//! - response, per id in order: `u32 len` and `len` bytes, or `u32::MAX` for "not here".
//!   On a connection that negotiated `shoal-bulk/3` (TLS ALPN: every client offers it, a
//!   server that compresses chooses it), the server may instead send a group of consecutive
//!   records of one answer as a *frame*: `u32 stored | FRAME`, `u32 raw`, then `stored` bytes
//!   of one zstd frame that decompresses to exactly `raw` bytes (at most [`MAX_FRAME_RAW`]):
//!   those records, as they would have been sent. A group is compressed (zstd level 1) only
//!   when a probe of it says it pays ([`shoal_registry::pack::Squeezer`]), so random and
//!   already compressed chunks go as they are, and only while the link is what limits the
//!   connection ([`Pace`]). The client decompresses into at most the
//!   declared size and verifies every blob as ever; a frame that lies about its size, holds a
//!   partial record or more records than its answer has ids is a fault.
//!   On `/3` a record's length may also carry [`ZBLOB`]: its bytes are one zstd frame of the
//!   blob, as the sender's store keeps it (neither side compresses it again; the receiver's
//!   store keeps the frame as it is). The frame must declare its size, at most [`MAX_BLOB`],
//!   and the sizes an answer's frames declare together at most [`MAX_ANSWER`] (what an
//!   answer may carry anyway); it is decompressed into exactly that size and verified.
//!
//! A client keeps many requests in flight; the server answers them in order, each with at most
//! [`MAX_ANSWER`] bytes of blobs (those past it are "not here"). The client verifies every blob
//! against its id before storing it: a peer cannot make this node store or serve a byte that
//! does not hash to what was asked for.
//!
//! The server holds little for any one connection: answers are read from the store a group at
//! a time, just ahead of the socket ([`Limits::conn_buffer`] bytes at most, plus the blobs a
//! through request fetched), and a client that stops reading is dropped once a write makes no
//! progress for [`Limits::write_secs`].

use super::admission::{Channel, Verdict};
use super::{Cmd, Report, Swarm};
use crate::error::{Error, Result};
use crate::limits::Limits;
use bytes::Bytes;
use futures::StreamExt;
use libp2p::PeerId;
use shoal_registry::Hash;
use shoal_store::Retain;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const MISSING: u32 = u32::MAX;
/// Top bit of a response head (other than [`MISSING`]): a compressed frame of records.
const FRAME: u32 = 1 << 31;
/// Bit of a record's length (on `shoal-bulk/3`): the bytes are a zstd frame of the blob, as
/// the sender's store keeps it (see the module documentation).
const ZBLOB: u32 = 1 << 30;
/// Most raw bytes of records in one frame (a group is about [`GROUP`] bytes and one blob
/// more; larger groups go as plain records).
pub const MAX_FRAME_RAW: u32 = 4 << 20;
/// zstd level of frames: level 1 compresses text at several hundred MB/s a core.
const WIRE_LEVEL: i32 = 1;
/// Groups in a row a connection's writer finished with nothing else ready to send, after
/// which its groups go uncompressed (see [`Pace`]).
const IDLE_BEFORE_PLAIN: u32 = 8;

/// Whether compressing a connection's answers pays. They are compressed (when a probe says
/// the bytes compress) while the link is what limits the connection: the writer finds the
/// next group ready when it has sent one. Once it has waited for the next group
/// [`IDLE_BEFORE_PLAIN`] times in a row, the sender is what limits it (reading the store, or
/// compressing itself), and groups go as they are until a backlog forms again; so a fast
/// link is never held to one core's compression speed, and a slow one carries several times
/// the text.
#[derive(Default)]
struct Pace {
    idle: std::sync::atomic::AtomicU32,
}

impl Pace {
    fn compress(&self) -> bool {
        self.idle.load(Ordering::Relaxed) < IDLE_BEFORE_PLAIN
    }

    /// The writer sent a group; `backlog`: another was ready.
    fn sent(&self, backlog: bool) {
        if backlog {
            self.idle.store(0, Ordering::Relaxed);
        } else {
            let _ = self
                .idle
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_add(1))
                });
        }
    }
}
/// Top bit of a request's count: a version root follows, fetch what is missing through it.
const THROUGH: u32 = 1 << 31;
/// How long a server waits on its origin for a through request.
const THROUGH_WAIT: Duration = Duration::from_secs(60);
/// Through requests of one connection whose origin reads run at once (their answers still go
/// out in order).
const PIPELINE: usize = 4;
/// Most bytes of blobs in one answer: the rest of its ids are answered "not here". Clients ask
/// for about 4 MiB at a time; a mount asks for up to 128 chunks (16 MiB at the largest chunk
/// size).
pub const MAX_ANSWER: u64 = 16 << 20;
/// Bytes of blobs read from the store at once for an answer (one write's worth).
const GROUP: u64 = 1 << 20;
/// Requests read ahead of the answers.
const REQUESTS_AHEAD: usize = 16;
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
    ///
    /// Cancel-safe: the half-open connection is dropped and nothing is registered.
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
        let me = swarm.peer_id;
        let admit = async {
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            // Each side proves the cluster key; the server answers only a good proof.
            let mine = swarm.admission.my_proof(Channel::Bulk, &me, &peer);
            tls.write_all(&mine).await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            let mut theirs = [0u8; 32];
            tls.read_exact(&mut theirs).await.map_err(|_| {
                "closed during admission (does it hold the same cluster key?)".to_string()
            })?;
            match swarm
                .admission
                .decide(Channel::Bulk, &me, &peer, Some(addr.ip()), Some(&theirs))
            {
                Verdict::Admit => Ok(tls),
                Verdict::NeedProof | Verdict::Refuse(_) => {
                    Err("it did not prove the cluster key".to_string())
                }
            }
        };
        let tls = tokio::time::timeout(swarm.limits.handshake(), admit)
            .await
            .map_err(|_| {
                Error::Net(format!(
                    "bulk channel to peer {peer} at {addr}: handshake timed out"
                ))
            })?
            .map_err(|e| Error::Net(format!("bulk channel to peer {peer} at {addr}: {e}")))?;
        let frames = super::tls::frames(tls.get_ref().1.alpn_protocol());
        let (r, w) = tokio::io::split(tls);
        let (tx, mut rx) = mpsc::channel::<Request>(64);
        // Requests written and not yet answered, in order. Unbounded, but bounded by what
        // callers keep in flight: a pull's window per peer (32 MiB of chunks), a metadata
        // or mount fetch's id list (at most one entry per request the writer sent).
        let (ptx, mut prx) = mpsc::unbounded_channel::<Pending>();
        let closed = Arc::new(AtomicBool::new(false));

        // Writer: sends requests, hands them to the reader in the same order.
        let c = closed.clone();
        tokio::spawn(async move {
            let mut w = BufWriter::with_capacity(64 << 10, w);
            while let Some(req) = rx.recv().await {
                let frame = encode_request(&req.ids, req.through.as_ref());
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
        let (vtx, mut vrx) = mpsc::channel::<(Pending, Vec<Option<(Bytes, bool)>>, Instant)>(4);
        let c = closed.clone();
        let sw = swarm.clone();
        tokio::spawn(async move {
            // TLS keeps decrypted records buffered: reading straight from it saves a copy.
            let mut r = r;
            let mut last_done = Instant::now();
            // A pull's blobs are read into slices of one large buffer, not one allocation each.
            let mut pool = bytes::BytesMut::new();
            // Records of a frame not yet read (a frame holds records of one answer only).
            let mut frame = Bytes::new();
            while let Some(p) = prx.recv().await {
                let mut blobs: Vec<Option<(Bytes, bool)>> = Vec::with_capacity(p.ids.len());
                let mut failed = false;
                // Sizes the answer's compressed blobs declare.
                let mut declared = 0u64;
                for _ in 0..p.ids.len() {
                    if frame.is_empty() {
                        let head = match r.read_u32().await {
                            Ok(l) => l,
                            Err(_) => {
                                failed = true;
                                break;
                            }
                        };
                        if head == MISSING || head & FRAME == 0 {
                            let read =
                                read_plain(&sw, &mut r, head, frames, p.want_bytes, &mut pool)
                                    .await;
                            match read.and_then(|b| declare(b, &mut declared)) {
                                Ok(b) => blobs.push(b),
                                Err(why) => {
                                    if let Some(why) = why {
                                        sw.report(peer, Report::Fault(why)).await;
                                    }
                                    failed = true;
                                    break;
                                }
                            }
                            continue;
                        }
                        match read_frame(&sw, peer, &mut r, head & !FRAME, frames).await {
                            Ok(f) => frame = f,
                            Err(()) => {
                                failed = true;
                                break;
                            }
                        }
                    }
                    match next_record(&mut frame, p.want_bytes)
                        .and_then(|b| declare(b, &mut declared).map_err(Option::unwrap_or_default))
                    {
                        Ok(b) => blobs.push(b),
                        Err(why) => {
                            sw.report(peer, Report::Fault(why)).await;
                            failed = true;
                            break;
                        }
                    }
                }
                if !failed && !frame.is_empty() {
                    sw.report(
                        peer,
                        Report::Fault("sent a frame holding more records than asked for".into()),
                    )
                    .await;
                    failed = true;
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
                    // The blobs as they are (compressed ones decompressed), verified.
                    let mut raws: Vec<Option<Bytes>> = Vec::with_capacity(ids.len());
                    for (id, b) in ids.iter().zip(&blobs) {
                        let raw = match b {
                            None => None,
                            Some((b, false)) => Some(b.clone()),
                            // Within the size its frame declares (checked on arrival).
                            Some((z, true)) => shoal_store::unsqueeze(z).map(Bytes::from),
                        };
                        let (outcome, raw) = match (b, raw) {
                            (None, _) => (Outcome::Missing, None),
                            (Some(_), Some(r)) if id.verify(&r) => {
                                (Outcome::Stored(r.len() as u32), Some(r))
                            }
                            (Some(_), _) => (Outcome::Bad, None),
                        };
                        outcomes.push(outcome);
                        raws.push(raw);
                    }
                    let good: Vec<shoal_store::Packed<'_>> = ids
                        .iter()
                        .zip(&raws)
                        .zip(&blobs)
                        .filter_map(|((id, r), b)| {
                            let frame = b.as_ref().filter(|(_, z)| *z).map(|(z, _)| z.as_ref());
                            Some((*id, r.as_ref()?.as_ref(), frame))
                        })
                        .collect();
                    let stored = store.put_batch_packed(&good, retain);
                    drop(good);
                    (outcomes, stored, raws)
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
                    let distance = swarm
                        .table
                        .borrow()
                        .peers
                        .get(&peer)
                        .map_or(3, |p| swarm.labels.distance(&p.labels));
                    swarm.counters.bytes_from_peers_by_distance[(distance as usize).min(3)]
                        .fetch_add(bytes, Ordering::Relaxed);
                    let secs = start.elapsed().as_secs_f64().max(1e-4);
                    let rate = bytes as f64 / secs;
                    // A counter: dropped, not waited for, when the event loop is busy.
                    swarm.send(Cmd::Report(peer, Report::Received { bytes, rate }));
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
    ///
    /// Not cancel-safe: cancelled while the connection's queue is full, the request is dropped
    /// and nothing is reported for its ids (callers that wait on `reply` do not cancel it).
    pub async fn request(&self, peer: PeerId, req: Request) {
        if let Err(e) = self.tx.send(req).await {
            lost_ids(e.0.ids, &e.0.reply, peer);
        }
    }
}

/// Reads the bytes of one plain record whose head `len` was read: the blob, or None for "not
/// here". Err: the connection failed or the peer broke the protocol (reported).
///
/// Not cancel-safe: a cancelled read leaves part of the record; the connection is dropped.
async fn read_plain(
    sw: &Swarm,
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    head: u32,
    negotiated: bool,
    want_bytes: bool,
    pool: &mut bytes::BytesMut,
) -> std::result::Result<Option<(Bytes, bool)>, Option<String>> {
    if head == MISSING {
        sw.counters
            .bytes_from_peers_wire
            .fetch_add(4, Ordering::Relaxed);
        return Ok(None);
    }
    let zblob = negotiated && head & ZBLOB != 0;
    let len = if zblob { head & !ZBLOB } else { head };
    if len > MAX_BLOB {
        return Err(Some(format!("sent a {len}-byte blob")));
    }
    // Within the node's download rate: the blob stays in the socket (and the sender's window
    // fills) until it may be read.
    if let Some(rate) = &sw.download {
        rate.take(len as u64).await;
    }
    // Bytes handed back to a reader get their own allocation: a slice would keep its whole
    // pool buffer alive for as long as the reader holds it.
    let mut own = bytes::BytesMut::new();
    let buf = if want_bytes {
        own.reserve(len as usize);
        &mut own
    } else {
        if pool.capacity() < len as usize {
            *pool = bytes::BytesMut::with_capacity(RECV_POOL.max(len as usize));
        }
        pool
    };
    while buf.len() < len as usize {
        let want = len as usize - buf.len();
        match (&mut *r).take(want as u64).read_buf(buf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
    sw.counters
        .bytes_from_peers_wire
        .fetch_add(4 + len as u64, Ordering::Relaxed);
    Ok(Some((buf.split().freeze(), zblob)))
}

/// Counts the size a compressed blob's frame declares against what its answer may carry
/// (`declared`, so far): a frame that declares no size, more than [`MAX_BLOB`], or takes the
/// answer past [`MAX_ANSWER`] is a fault (Err, with why).
fn declare(
    b: Option<(Bytes, bool)>,
    declared: &mut u64,
) -> std::result::Result<Option<(Bytes, bool)>, Option<String>> {
    if let Some((z, true)) = &b {
        let size = zstd::zstd_safe::get_frame_content_size(z)
            .ok()
            .flatten()
            .filter(|&n| n <= MAX_BLOB as u64)
            .ok_or_else(|| {
                Some(
                    "sent a compressed blob whose frame declares no size or too large a one"
                        .to_string(),
                )
            })?;
        *declared += size;
        if *declared > MAX_ANSWER {
            return Err(Some(format!(
                "sent compressed blobs declaring {} bytes in one answer (at most {MAX_ANSWER})",
                *declared
            )));
        }
    }
    Ok(b)
}

/// Reads a compressed frame of `stored` bytes whose head was read, and decompresses it into
/// at most its declared size: the records it holds. Err: the connection failed or the peer
/// broke the protocol (reported: a frame where none was negotiated, sizes out of bounds, a
/// frame that does not decompress to exactly its declared size).
///
/// Not cancel-safe: a cancelled read leaves part of the frame; the connection is dropped.
async fn read_frame(
    sw: &Swarm,
    peer: PeerId,
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    stored: u32,
    negotiated: bool,
) -> std::result::Result<Bytes, ()> {
    let fault = |why: String| async move {
        sw.report(peer, Report::Fault(why)).await;
        Err(())
    };
    if !negotiated {
        return fault("sent a compressed frame on a connection without them".into()).await;
    }
    let raw = r.read_u32().await.map_err(|_| ())?;
    if raw > MAX_FRAME_RAW || stored == 0 || stored >= raw {
        return fault(format!("sent a frame of {stored} bytes declaring {raw}")).await;
    }
    if let Some(rate) = &sw.download {
        rate.take(8 + stored as u64).await;
    }
    let mut z = vec![0u8; stored as usize];
    r.read_exact(&mut z).await.map_err(|_| ())?;
    sw.counters
        .bytes_from_peers_wire
        .fetch_add(8 + stored as u64, Ordering::Relaxed);
    // Never more than the declared size: a frame claiming more fails here (no bombs).
    let mut out = vec![0u8; raw as usize];
    match zstd::bulk::decompress_to_buffer(&z, &mut out) {
        Ok(n) if n == raw as usize => Ok(Bytes::from(out)),
        Ok(n) => fault(format!("sent a frame holding {n} bytes, not {raw}")).await,
        Err(e) => fault(format!("sent a frame that does not decompress: {e}")).await,
    }
}

/// The next record of a decompressed frame: the blob, or None for "not here". A blob handed
/// back to a reader gets its own allocation (a slice would keep the whole frame alive).
fn next_record(
    frame: &mut Bytes,
    want_bytes: bool,
) -> std::result::Result<Option<(Bytes, bool)>, String> {
    use bytes::Buf;
    if frame.len() < 4 {
        return Err("sent a frame ending inside a record".into());
    }
    let head = frame.get_u32();
    if head == MISSING {
        return Ok(None);
    }
    let zblob = head & ZBLOB != 0;
    let len = head & !ZBLOB;
    if len as usize > frame.len() {
        return Err("sent a frame ending inside a record".into());
    }
    let b = frame.split_to(len as usize);
    let b = if want_bytes {
        Bytes::copy_from_slice(&b)
    } else {
        b
    };
    Ok(Some((b, zblob)))
}

/// A blob as it goes in an answer: its bytes, or a zstd frame of it as this node's store
/// keeps it, with the blob's size (`raw`).
#[derive(Clone)]
struct Out {
    bytes: Bytes,
    raw: Option<u32>,
}

impl Out {
    fn plain(bytes: Bytes) -> Out {
        Out { bytes, raw: None }
    }

    /// The blob's size.
    fn raw_len(&self) -> u64 {
        self.raw.map_or(self.bytes.len() as u64, u64::from)
    }

    /// Its record's head: the length of its bytes, with [`ZBLOB`] for a frame.
    fn head(&self) -> u32 {
        self.bytes.len() as u32 | if self.raw.is_some() { ZBLOB } else { 0 }
    }
}

/// One group of an answer as it goes on the wire.
struct Group {
    /// The blobs, in order (None: "not here").
    blobs: Vec<Option<Out>>,
    /// The same records as one compressed frame, when the connection allows frames and
    /// compressing them paid.
    frame: Option<Vec<u8>>,
}

impl Group {
    /// Bytes of blobs in the group.
    fn blob_bytes(&self) -> u64 {
        self.blobs.iter().flatten().map(Out::raw_len).sum()
    }

    /// Bytes of the group's records, uncompressed.
    fn raw_len(&self) -> u64 {
        Group::records_len(&self.blobs)
    }

    fn records_len(blobs: &[Option<Out>]) -> u64 {
        blobs
            .iter()
            .map(|b| 4 + b.as_ref().map_or(0, |b| b.bytes.len() as u64))
            .sum()
    }

    /// The group's records (`u32 len` and the bytes, or `u32::MAX`) as parts, back to back.
    fn records(blobs: &[Option<Out>]) -> Vec<Bytes> {
        let mut parts = Vec::with_capacity(2 * blobs.len());
        for b in blobs {
            let head = b.as_ref().map_or(MISSING, Out::head);
            parts.push(Bytes::copy_from_slice(&head.to_be_bytes()));
            if let Some(b) = b {
                parts.push(b.bytes.clone());
            }
        }
        parts
    }

    /// `blobs` with their records compressed into one frame when that pays (see the module
    /// documentation); groups over [`MAX_FRAME_RAW`] stay plain.
    fn squeezed(blobs: Vec<Option<Out>>) -> Group {
        thread_local! {
            static SQUEEZER: std::cell::RefCell<Option<shoal_registry::pack::Squeezer>> =
                std::cell::RefCell::new(shoal_registry::pack::Squeezer::new(WIRE_LEVEL));
        }
        let raw = Group::records_len(&blobs);
        let frame = if raw <= MAX_FRAME_RAW as u64 && blobs.iter().any(Option::is_some) {
            SQUEEZER.with(|z| {
                z.borrow_mut()
                    .as_mut()
                    .and_then(|z| z.squeeze(&Group::records(&blobs)))
            })
        } else {
            None
        };
        Group { blobs, frame }
    }
}

/// A request as read from a client.
struct Asked {
    ids: Vec<Hash>,
    through: Option<Hash>,
}

/// Encodes one request frame: `u32 n` (big-endian; top bit set when `through` is given, whose
/// root comes next), then the `n` ids.
pub fn encode_request(ids: &[Hash], through: Option<&Hash>) -> Vec<u8> {
    let mut frame = Vec::with_capacity(36 + 32 * ids.len());
    let n = ids.len() as u32;
    match through {
        Some(root) => {
            frame.extend_from_slice(&(n | THROUGH).to_be_bytes());
            frame.extend_from_slice(&root.0);
        }
        None => frame.extend_from_slice(&n.to_be_bytes()),
    }
    for id in ids {
        frame.extend_from_slice(&id.0);
    }
    frame
}

/// Reads one request frame (see [`encode_request`]). Fails on more than [`MAX_IDS`] ids.
///
/// Not cancel-safe: a cancelled read may have consumed part of a frame; the connection is then
/// dropped.
pub async fn read_request(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<(Vec<Hash>, Option<Hash>)> {
    let head = r.read_u32().await?;
    let n = (head & !THROUGH) as usize;
    if n > MAX_IDS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("request for {n} blobs (at most {MAX_IDS})"),
        ));
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
    Ok((ids, through))
}

/// Reads `ids` from the store (or the pack index cache), in order, until about [`GROUP`]
/// bytes; `budget` is what the answer may still carry (blobs' sizes, compressed or not).
/// Blobs past the budget are "not here". With `stored`, a blob the store keeps compressed
/// goes as it is kept (the connection negotiated frames).
fn read_group(swarm: &Swarm, ids: &[Hash], budget: &mut u64, stored: bool) -> Vec<Option<Out>> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    for id in ids {
        if *budget == 0 {
            out.push(None);
        } else {
            let read = if stored {
                swarm.store.get_stored_for_peer(id)
            } else {
                swarm.store.get_for_peer(id).map(|b| b.map(|b| (b, false)))
            };
            let b = match read {
                Ok(Some((b, true))) => match zstd::zstd_safe::get_frame_content_size(&b) {
                    Ok(Some(n)) if n <= MAX_BLOB as u64 => Some(Out {
                        bytes: Bytes::from(b),
                        raw: Some(n as u32),
                    }),
                    // (A store writes the size in every frame: not served if not.)
                    _ => None,
                },
                Ok(Some((b, false))) => Some(Out::plain(Bytes::from(b))),
                _ => read_cached_index(swarm, id).map(Out::plain),
            };
            let b = b.filter(|b| {
                let fits = b.raw_len() <= *budget;
                if fits {
                    *budget -= b.raw_len();
                } else {
                    *budget = 0;
                }
                fits
            });
            bytes += b.as_ref().map_or(0, |b| b.bytes.len() as u64);
            out.push(b);
        }
        if bytes >= GROUP {
            break;
        }
    }
    out
}

/// A pack index this node cached (pack indexes are served to peers like blobs: they are named
/// by their hash), if it has it and it checks out.
fn read_cached_index(swarm: &Swarm, id: &Hash) -> Option<Bytes> {
    let path = swarm.pack_cache.join(format!("{id}.idx"));
    let len = std::fs::metadata(&path).ok()?.len();
    if len > shoal_registry::origin::MAX_PACK_INDEX {
        return None;
    }
    std::fs::read(&path)
        .ok()
        .filter(|b| id.verify(b))
        .map(Bytes::from)
}

/// For a through request: fetches from the origin those blobs this node lacks, if it mounts
/// `root`; what cannot be had within [`THROUGH_WAIT`] stays "not here". At most
/// [`MAX_ANSWER`] bytes are kept.
///
/// Cancel-safe: what it fetched stays stored and verified; only the answer is lost.
async fn fetch_through(
    swarm: Arc<Swarm>,
    peer: PeerId,
    root: Hash,
    ids: Vec<Hash>,
) -> std::collections::HashMap<Hash, Bytes> {
    let sw = swarm.clone();
    let lacking = tokio::task::spawn_blocking(move || {
        ids.into_iter()
            .filter(|id| !sw.store.contains(id).unwrap_or(false))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    if lacking.is_empty() {
        return Default::default();
    }
    let Some(fetcher) = swarm.through_fetcher(&root) else {
        return Default::default();
    };
    match tokio::time::timeout(THROUGH_WAIT, fetcher.fetch_for_peer(lacking)).await {
        Ok(Ok(mut got)) => {
            let mut total = 0u64;
            got.retain(|_, b| {
                total += b.len() as u64;
                total <= MAX_ANSWER
            });
            got
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, "fetching for a peer from the origin: {e}");
            Default::default()
        }
        Err(_) => {
            tracing::debug!(%peer, "fetching for a peer from the origin: timed out");
            Default::default()
        }
    }
}

/// Serves this node's store to admitted peers on `listener` until the process ends. Accept
/// errors (descriptors or memory running out) never end it: it backs off and goes on.
///
/// Cancelling it stops accepting; connections already accepted run on their own tasks.
pub async fn serve(swarm: Arc<Swarm>, listener: TcpListener, config: rustls::ServerConfig) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let gate = crate::limits::Gate::for_peers(&swarm.limits);
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("bulk server accept: {e}");
                tokio::time::sleep(crate::limits::accept_backoff(&e)).await;
                continue;
            }
        };
        let ip = from.ip();
        if !swarm.admission.admits_address(ip) {
            tracing::debug!(%from, "bulk connection from off this machine refused (loopback only)");
            continue;
        }
        let ticket = match gate.admit(ip) {
            Ok(t) => t,
            Err(r) => {
                tracing::debug!(%from, "bulk connection refused: {r}");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        // Little unsent data in the kernel: the uplink's turns decide the order on the wire.
        let _ = socket2::SockRef::from(&tcp).set_tcp_notsent_lowat(crate::turns::NOT_SENT);
        let acceptor = acceptor.clone();
        let swarm = swarm.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(swarm, acceptor, tcp, from, ticket).await {
                tracing::debug!("bulk connection from {from}: {e}");
            }
        });
    }
}

/// Completes the handshake and admission of one connection: the client's peer id and the
/// TLS stream, or why it was refused.
///
/// Cancel-safe: the connection is dropped.
async fn admit_conn(
    swarm: &Swarm,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    from: SocketAddr,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, PeerId)> {
    let mut tls = acceptor.accept(tcp).await.map_err(tls_err)?;
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
    let mut proof = [0u8; 32];
    tls.read_exact(&mut proof).await.map_err(io_err)?;
    if swarm.is_banned(&peer) {
        return Err(Error::Net(format!("{peer} is banned")));
    }
    match swarm.admission.decide(
        Channel::Bulk,
        &swarm.peer_id,
        &peer,
        Some(from.ip()),
        Some(&proof),
    ) {
        Verdict::Admit => Ok((tls, peer)),
        Verdict::Refuse(why) => {
            tracing::warn!(%peer, %from, "refusing bulk connection: {why}");
            Err(Error::Net(format!("{peer} refused: {why}")))
        }
        Verdict::NeedProof => Err(Error::Net(format!("{peer} sent no proof"))),
    }
}

/// Serves one admitted connection until it closes. Cancelling it closes the connection (the
/// client reports what was in flight as lost).
async fn serve_conn(
    swarm: Arc<Swarm>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    from: SocketAddr,
    mut ticket: crate::limits::Ticket,
) -> Result<()> {
    let limits = swarm.limits.clone();
    let (mut tls, peer) =
        tokio::time::timeout(limits.handshake(), admit_conn(&swarm, acceptor, tcp, from))
            .await
            .map_err(|_| Error::Net("handshake and admission timed out".into()))??;
    ticket
        .identify(&peer.to_bytes())
        .map_err(|r| Error::Net(format!("{peer}: {r}")))?;
    let mine = swarm
        .admission
        .my_proof(Channel::Bulk, &swarm.peer_id, &peer);
    tokio::time::timeout(limits.write(), async {
        tls.write_all(&mine).await?;
        tls.flush().await
    })
    .await
    .map_err(|_| Error::Net("sending the admission proof timed out".into()))?
    .map_err(io_err)?;

    let frames = super::tls::frames(tls.get_ref().1.alpn_protocol());
    let (r, w) = tokio::io::split(tls);
    // Reader: requests, bounded in size and count; a connection silent for the idle time is
    // closed.
    let (tx, mut rx) = mpsc::channel::<Asked>(REQUESTS_AHEAD);
    let idle = limits.idle();
    let reader = tokio::spawn(async move {
        let mut r = BufReader::with_capacity(64 << 10, r);
        loop {
            let (ids, through) = match tokio::time::timeout(idle, read_request(&mut r)).await {
                Ok(x) => x?,
                Err(_) => return Ok(()),
            };
            if tx.send(Asked { ids, through }).await.is_err() {
                return Ok::<_, std::io::Error>(());
            }
        }
    });
    // Writer: sends groups of answers as they come; a write that makes no progress for the
    // write time drops the connection.
    let depth = (limits.conn_buffer as u64 / GROUP).max(1) as usize;
    let (gtx, grx) = mpsc::channel::<Group>(depth);
    let pace = Arc::new(Pace::default());
    let mut writer = tokio::spawn(write_groups(
        swarm.clone(),
        peer,
        w,
        grx,
        limits.clone(),
        pace.clone(),
    ));
    let mut written = None;

    let fault = swarm.fault.clone();
    let mut throughs = futures::stream::FuturesOrdered::new();
    let mut open = true;
    let mut slow_until = tokio::time::Instant::now();
    let result = loop {
        tokio::select! {
            asked = rx.recv(), if open && throughs.len() < PIPELINE => {
                let Some(asked) = asked else {
                    open = false;
                    continue;
                };
                if !swarm.admission.open && swarm.is_banned(&peer) {
                    break Ok(());
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
                let sw = swarm.clone();
                throughs.push_back(async move {
                    if let Some(t) = not_before {
                        tokio::time::sleep_until(t).await;
                    }
                    let fetched = match asked.through {
                        Some(root) => fetch_through(sw, peer, root, asked.ids.clone()).await,
                        None => Default::default(),
                    };
                    (asked.ids, fetched)
                });
            }
            Some((ids, fetched)) = throughs.next(), if !throughs.is_empty() => {
                if let Err(e) = stream_answer(&swarm, ids, fetched, &gtx, fault.as_deref(), frames.then_some(&*pace)).await {
                    break Err(e);
                }
            }
            // The writer gave up (a peer that stopped reading): so does the connection.
            w = &mut writer, if written.is_none() => {
                written = Some(w.unwrap_or(Ok(())));
                break Ok(());
            }
            else => break Ok(()),
        }
    };
    drop(gtx);
    reader.abort();
    // The writer finishes what was queued (or gives up at its write deadline).
    let written = match written {
        Some(w) => w,
        None => writer.await.unwrap_or(Ok(())),
    };
    // The writer's failure (a peer that stopped reading) is the cause of the loop's.
    written.and(result)
}

/// Queues one answer for the writer, a group at a time, as the writer takes them.
///
/// Not cancel-safe: a cancelled answer leaves part of it with the writer; the connection is
/// then closed.
async fn stream_answer(
    swarm: &Arc<Swarm>,
    ids: Vec<Hash>,
    mut fetched: std::collections::HashMap<Hash, Bytes>,
    groups: &mpsc::Sender<Group>,
    fault: Option<&str>,
    frames: Option<&Pace>,
) -> Result<()> {
    let ids = Arc::new(ids);
    let mut at = 0;
    let mut budget = MAX_ANSWER;
    let stored = frames.is_some();
    while at < ids.len() {
        let sw = swarm.clone();
        let all = ids.clone();
        let (mut group, left) = tokio::task::spawn_blocking(move || {
            let mut b = budget;
            let g = read_group(&sw, &all[at..], &mut b, stored);
            (g, b)
        })
        .await
        .map_err(|e| Error::Net(format!("reading blobs for a peer: {e}")))?;
        budget = left;
        for (i, slot) in group.iter_mut().enumerate() {
            if slot.is_none() && budget > 0 {
                if let Some(b) = fetched.remove(&ids[at + i]) {
                    budget = budget.saturating_sub(b.len() as u64);
                    *slot = Some(Out::plain(b));
                }
            }
        }
        at += group.len();
        if fault == Some("lie") {
            // Test hook: flip one byte of every blob.
            for b in group.iter_mut().flatten() {
                let mut v = b.bytes.to_vec();
                if let Some(x) = v.first_mut() {
                    *x ^= 0xff;
                }
                b.bytes = Bytes::from(v);
            }
        }
        let group = if frames.is_some_and(Pace::compress) {
            tokio::task::spawn_blocking(move || Group::squeezed(group))
                .await
                .map_err(|e| Error::Net(format!("compressing blobs for a peer: {e}")))?
        } else {
            Group {
                blobs: group,
                frame: None,
            }
        };
        if groups.send(group).await.is_err() {
            return Err(Error::Net("the bulk connection closed".into()));
        }
    }
    Ok(())
}

/// Writes answer groups: per blob `u32 len` and the bytes, or `u32::MAX` for "not here"; or
/// the group's records as one compressed frame.
///
/// Not cancel-safe: a cancelled write leaves a partial frame; the connection is then closed.
async fn write_groups(
    swarm: Arc<Swarm>,
    peer: PeerId,
    w: tokio::io::WriteHalf<tokio_rustls::server::TlsStream<TcpStream>>,
    mut groups: mpsc::Receiver<Group>,
    limits: Limits,
    pace: Arc<Pace>,
) -> Result<()> {
    let mut w = w;
    let deadline = limits.write();
    while let Some(group) = groups.recv().await {
        let blob_bytes = group.blob_bytes();
        // The heads, then one slice per head and per blob (or the frame's two heads and
        // the frame).
        let (heads, bodies): (Vec<[u8; 4]>, Vec<Option<&[u8]>>) = match &group.frame {
            Some(z) => (
                vec![
                    (z.len() as u32 | FRAME).to_be_bytes(),
                    (group.raw_len() as u32).to_be_bytes(),
                ],
                vec![None, Some(z.as_slice())],
            ),
            None => group
                .blobs
                .iter()
                .map(|b| {
                    let head = b.as_ref().map_or(MISSING, Out::head).to_be_bytes();
                    (head, b.as_ref().map(|b| &b.bytes[..]))
                })
                .unzip(),
        };
        let mut slices = Vec::with_capacity(2 * heads.len());
        for (h, b) in heads.iter().zip(&bodies) {
            slices.push(std::io::IoSlice::new(h));
            if let Some(b) = b {
                slices.push(std::io::IoSlice::new(b));
            }
        }
        // Bytes on the wire.
        let sent: u64 = slices.iter().map(|s| s.len() as u64).sum();
        // Within the node's upload rate, then a turn on the uplink: the peers furthest
        // behind are served first.
        if let Some(rate) = &swarm.upload {
            rate.take(sent).await;
        }
        let behind = swarm
            .table
            .borrow()
            .peers
            .get(&peer)
            .map_or(0.0, |p| p.behind);
        let mut turn = Some(swarm.turns.take(behind).await);
        let turn_ends = tokio::time::Instant::now() + crate::turns::TURN;
        // One vectored write per group: TLS records are filled from the blobs directly.
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let write = tokio::time::timeout(deadline, w.write_vectored(rest));
            let written = if turn.is_some() {
                tokio::select! {
                    r = write => r,
                    // A peer that reads slowly, or not at all, keeps its turn no longer: it
                    // goes on writing without one (a write that has not completed has
                    // written nothing, TLS or not).
                    _ = tokio::time::sleep_until(turn_ends) => {
                        turn = None;
                        continue;
                    }
                }
            } else {
                write.await
            };
            let n = written
                .map_err(|_| {
                    Error::Net(format!(
                        "peer {peer} stopped reading (no progress for {}s); dropped",
                        deadline.as_secs()
                    ))
                })?
                .map_err(io_err)?;
            if n == 0 {
                return Err(io_err(std::io::ErrorKind::WriteZero.into()));
            }
            std::io::IoSlice::advance_slices(&mut rest, n);
        }
        drop(turn);
        pace.sent(!groups.is_empty());
        // Flushed only when nothing more is ready: a queued group goes out in the same write.
        if groups.is_empty() {
            tokio::time::timeout(deadline, w.flush())
                .await
                .map_err(|_| Error::Net(format!("peer {peer} stopped reading; dropped")))?
                .map_err(io_err)?;
        }
        swarm
            .counters
            .bytes_served
            .fetch_add(blob_bytes, Ordering::Relaxed);
        swarm
            .counters
            .bytes_served_wire
            .fetch_add(sent, Ordering::Relaxed);
        // A counter: dropped, not waited for, when the event loop is busy.
        swarm.send(Cmd::Report(peer, Report::Sent(blob_bytes)));
    }
    tokio::time::timeout(deadline, w.shutdown())
        .await
        .map_err(|_| Error::Net(format!("peer {peer} stopped reading; dropped")))?
        .map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_frames_are_pinned_and_round_trip() {
        let ids = [Hash([1; 32]), Hash([2; 32])];
        let plain = encode_request(&ids, None);
        assert_eq!(&plain[..4], &[0, 0, 0, 2]);
        assert_eq!(plain.len(), 4 + 64);
        let through = encode_request(&ids[..1], Some(&Hash([9; 32])));
        assert_eq!(
            &through[..4],
            &[0x80, 0, 0, 1],
            "the top bit marks a through request"
        );
        assert_eq!(&through[4..36], &[9; 32]);
        let mut both = plain.clone();
        both.extend_from_slice(&through);
        let mut r = both.as_slice();
        assert_eq!(read_request(&mut r).await.unwrap(), (ids.to_vec(), None));
        assert_eq!(
            read_request(&mut r).await.unwrap(),
            (vec![Hash([1; 32])], Some(Hash([9; 32])))
        );
        let mut over = ((MAX_IDS + 1) as u32).to_be_bytes().to_vec();
        over.extend(vec![0; 32 * (MAX_IDS + 1)]);
        assert!(read_request(&mut over.as_slice()).await.is_err());
    }

    #[test]
    fn groups_of_text_go_as_one_frame_and_random_groups_as_they_are() {
        let text = Bytes::from(
            (0..20_000)
                .map(|i| format!("line {i}: the quick brown fox\n"))
                .collect::<String>(),
        );
        // A blob as a store keeps it compressed goes in the frame as it is, flagged.
        let kept = Bytes::from(zstd::bulk::compress(&text[..50_000], 1).unwrap());
        let blobs = vec![
            Some(Out::plain(text.slice(..300_000))),
            None,
            Some(Out::plain(text.slice(300_000..))),
            Some(Out {
                bytes: kept.clone(),
                raw: Some(50_000),
            }),
        ];
        let g = Group::squeezed(blobs.clone());
        assert_eq!(g.blob_bytes(), text.len() as u64 + 50_000);
        let z = g.frame.clone().expect("text compresses");
        assert!(z.len() * 4 < text.len(), "{} of {}", z.len(), text.len());
        let mut out = vec![0u8; g.raw_len() as usize];
        let n = zstd::bulk::decompress_to_buffer(&z, &mut out).unwrap();
        assert_eq!(n, out.len());
        let mut frame = Bytes::from(out);
        for (want, keep) in blobs.iter().zip([false, true, true, false]) {
            let got = next_record(&mut frame, keep).unwrap();
            let want = want.as_ref().map(|o| (o.bytes.clone(), o.raw.is_some()));
            assert_eq!(got, want);
        }
        assert!(frame.is_empty());
        assert!(
            next_record(&mut frame, false).is_err(),
            "a frame ending inside a record"
        );
        // What a compressed blob declares counts against the answer.
        let mut declared = 0;
        assert!(declare(Some((kept.clone(), true)), &mut declared).is_ok());
        assert_eq!(declared, 50_000);
        let mut declared = MAX_ANSWER - 10;
        assert!(declare(Some((kept, true)), &mut declared).is_err());
        let unsized_frame = {
            let mut c = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
            std::io::Write::write_all(&mut c, &text[..1000]).unwrap();
            c.finish().unwrap()
        };
        assert!(declare(Some((Bytes::from(unsized_frame), true)), &mut 0).is_err());

        let mut random = vec![0u8; 1 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in random.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let g = Group::squeezed(vec![Some(Out::plain(Bytes::from(random)))]);
        assert!(g.frame.is_none(), "random bytes go as they are");
    }
}
