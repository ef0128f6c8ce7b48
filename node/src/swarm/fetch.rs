//! Fetching a version's missing chunks from the swarm and the origin.
//!
//! Every chunk goes to the best source that has it: peers first, ranked by locality (rack,
//! zone, region), then by how soon they can deliver (bytes already queued to them over their
//! measured throughput, plus RTT), each with a cap on bytes in flight. A chunk no peer has is
//! read from the origin by one of the nodes pulling the version: chunks are grouped in runs
//! and each run is assigned by rendezvous hashing over the live pullers, so a cold cluster
//! reads each chunk from the origin about once and swaps the rest. A request that is late is
//! re-issued to another source (the first good copy wins); a peer that stalls is given no more
//! work, and one whose bytes fail verification is penalised and, after repeated faults,
//! banned.

use super::bulk::{self, Event, Outcome};
use super::{Cmd, Holding, Swarm};
use crate::blobs::Blobs;
use crate::error::Result;
use crate::progress::Progress;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use libp2p::PeerId;
use shoal_registry::Hash;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Bytes in flight to one peer.
const PEER_WINDOW: u64 = 32 << 20;
/// One request to a peer: at most this many bytes (and [`bulk::MAX_IDS`] blobs).
const PEER_BATCH: u64 = 4 << 20;
/// Chunks per run assigned to one origin reader (about 1.3 MiB at the default chunk size).
const RUN: usize = 32;
/// One origin read batch (about one run, so a reader's first chunks land early and its peers
/// see it make progress), and how many run at once: shared among the pullers that still have
/// runs to read (at least one each), so a cold cluster keeps about this many reads on its
/// origin however many nodes it has, and the last reader, when the others are through their
/// shares, gets them all. (8 nodes with 8 each put 64 flows on a 200 Mbit origin link: 1.5% of
/// its bytes were TCP/IP headers of small segments, against 0.1% for one flow. 8 nodes with 1
/// each left the link idle between one node's answer and its next request: 45.5 s against
/// 45.3-45.4 s with 2 each; 3 each, 45.6 s.)
const ORIGIN_BATCH: u64 = 1 << 20;
const ORIGIN_PARALLEL: usize = 16;
/// A puller whose have-map has not grown for this long is not waited for (one that disconnects
/// is dropped at once). Behind a slow origin link a reader's first run can take seconds.
const PULLER_IDLE: Duration = Duration::from_secs(20);
/// How often have-maps are refreshed while pulling; more often once this node has no origin
/// reads of its own left, when what it lacks is what the others are still reading (at the end
/// of a cold pull, half a poll is most of the time between the origin's last byte and the
/// last node done).
const HAVE_POLL: Duration = Duration::from_millis(250);
const HAVE_POLL_WAITING: Duration = Duration::from_millis(50);
/// Attempts at the origin before a chunk fails the pull.
const ORIGIN_TRIES: u32 = 3;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Want,
    /// Requested from a peer; re-requested elsewhere once the deadline has passed and the
    /// peer has gone quiet.
    Peer(PeerId, Instant),
    Origin,
    Done,
}

/// What a fetch took from where.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fetched {
    pub from_peers: u64,
    pub from_origin: u64,
}

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

fn peer_seed(p: &PeerId) -> u64 {
    let h = blake3::hash(&p.to_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The puller that reads run `run` (keyed by its first chunk) from the origin.
fn owner(pullers: &[(u64, PeerId)], key: &Hash) -> PeerId {
    owner_of(
        pullers,
        u64::from_le_bytes(key.0[..8].try_into().expect("8 bytes")),
    )
}

/// Rendezvous hashing: the node among `nodes` (seed, id) that owns key `k`.
fn owner_of(nodes: &[(u64, PeerId)], k: u64) -> PeerId {
    nodes
        .iter()
        .max_by_key(|(seed, _)| mix(seed ^ k))
        .map(|(_, p)| *p)
        .expect("at least this node")
}

struct PeerView {
    id: PeerId,
    distance: u8,
    /// None: holds the whole version.
    have: Option<super::HaveMap>,
    rate: f64,
    rtt: f64,
}

/// Fetches `order[i]` for every `i` in `missing` into the local store. `order` is the
/// version's unique chunks in walk order (the index space of have-maps).
pub async fn fetch(
    swarm: &Arc<Swarm>,
    blobs: &Blobs,
    root: Hash,
    order: &[(Hash, u32)],
    missing: Vec<usize>,
    progress: &Progress,
) -> Result<Fetched> {
    let entered = Instant::now();
    let index: HashMap<Hash, usize> = order.iter().enumerate().map(|(i, c)| (c.0, i)).collect();
    let mut state = vec![State::Done; order.len()];
    for &i in &missing {
        state[i] = State::Want;
    }
    let mut remaining = missing.len();
    // Origin reads go in pack order, in runs of RUN chunks, so each reader's ranges are long
    // and contiguous.
    let mut porder: Vec<usize> = (0..order.len()).collect();
    // (One lookup per chunk, not one per comparison: with ~27,000 chunks per GiB the latter
    // cost tens of milliseconds before the first read.)
    porder.sort_by_cached_key(|&i| blobs.locate(&order[i].0).unwrap_or((u32::MAX, 0)));
    let run_of: Vec<usize> = {
        let mut r = vec![0; order.len()];
        for (pos, &i) in porder.iter().enumerate() {
            r[i] = pos - pos % RUN;
        }
        r
    };
    let mut avoid: HashMap<usize, Vec<PeerId>> = HashMap::new();
    let mut origin_tries: HashMap<usize, u32> = HashMap::new();
    let mut inflight: HashMap<PeerId, u64> = HashMap::new();
    let mut sent_to: HashSet<(usize, PeerId)> = HashSet::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut origin_jobs = FuturesUnordered::new();
    let mut got = Fetched::default();
    let me = swarm.peer_id;
    let my_seed = peer_seed(&me);
    let started = Instant::now();
    tracing::debug!(
        setup_us = entered.elapsed().as_micros() as u64,
        "fetch set up"
    );
    let mut last_poll = Instant::now() - HAVE_POLL;
    // How many pullers have runs left to read from the origin, as counted at the last poll.
    let mut readers = usize::MAX;
    let mut poll_every = HAVE_POLL;
    let mut last_flush = Instant::now();
    let mut flushing: Option<tokio::task::JoinHandle<()>> = None;
    // When each peer last delivered anything.
    let mut heard: HashMap<PeerId, Instant> = HashMap::new();
    let quiet = Duration::from_secs(1);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    while remaining > 0 {
        let now = Instant::now();
        let polled = now - last_poll >= poll_every;
        if polled {
            last_poll = now;
            let peers: Vec<PeerId> = swarm
                .peers
                .lock()
                .expect("poisoned")
                .iter()
                .filter(|(_, p)| {
                    p.connected
                        && p.versions
                            .get(&root)
                            .is_some_and(|v| v.holding == Holding::Pulling)
                })
                .map(|(id, _)| *id)
                .collect();
            for p in peers {
                swarm.send(Cmd::QueryHave(p, root));
            }
        }
        if now - last_flush >= Duration::from_secs(1)
            && flushing.as_ref().is_none_or(|f| f.is_finished())
        {
            // Make progress durable now and then, so a killed pull resumes from near where it
            // stopped; in the background, so deliveries keep flowing meanwhile.
            last_flush = now;
            let store = swarm.store.clone();
            flushing = Some(tokio::task::spawn_blocking(move || {
                if let Err(e) = store.flush() {
                    tracing::warn!("flushing the store: {e}");
                }
            }));
        }

        // Who has what, as last heard; who is pulling (for origin offload).
        let (views, mut pullers, connected, announced, unmapped) = {
            let peers = swarm.peers.lock().expect("poisoned");
            let connected = peers.values().filter(|p| p.connected).count();
            let (mut announced, mut unmapped) = (0, 0);
            let mut views = Vec::new();
            let mut pullers = vec![(my_seed, me)];
            for (id, p) in peers.iter() {
                if !swarm.can_ask(id, p) {
                    continue;
                }
                let Some(v) = p.versions.get(&root) else {
                    continue;
                };
                announced += 1;
                if v.holding == Holding::Pulling && v.have.is_none() {
                    unmapped += 1;
                }
                match v.holding {
                    Holding::Complete => views.push(PeerView {
                        id: *id,
                        distance: swarm.labels.distance(&p.labels),
                        have: None,
                        rate: p.throughput,
                        rtt: p.rtt.map(|d| d.as_secs_f64()).unwrap_or(0.001),
                    }),
                    Holding::Pulling => {
                        // A puller with faults (repeated "not here" for what it advertised, bad
                        // bytes) reads nothing for the others: its runs are taken over.
                        if v.grew.elapsed() < PULLER_IDLE && p.faults == 0 {
                            pullers.push((peer_seed(id), *id));
                        }
                        if let Some(h) = &v.have {
                            if h.len as usize == order.len() {
                                views.push(PeerView {
                                    id: *id,
                                    distance: swarm.labels.distance(&p.labels),
                                    have: Some(h.clone()),
                                    rate: p.throughput,
                                    rtt: p.rtt.map(|d| d.as_secs_f64()).unwrap_or(0.001),
                                });
                            }
                        }
                    }
                    // A mount has no have-map: the pull does not count on it.
                    Holding::Mounted => {}
                }
            }
            (views, pullers, connected, announced, unmapped)
        };
        pullers.sort_by_key(|p| p.1);
        // With peers connected, let their announcements and have-maps arrive before reading
        // anything from the origin (nodes starting together, or one rejoining a running pull).
        // Waits at most a second, and only until every peer that announced the version has
        // sent its have-map.
        let settle = started.elapsed() < Duration::from_millis(1000)
            && connected > 0
            && (announced == 0 || unmapped > 0);

        // Assign wanted chunks.
        let mut batches: HashMap<PeerId, (Vec<Hash>, u64)> = HashMap::new();
        let mut full: Vec<(PeerId, Vec<Hash>, u64)> = Vec::new();
        let mut origin_batch: Vec<usize> = Vec::new();
        let mut origin_bytes = 0u64;
        if polled {
            let owners = origin_readers(&porder, &state, &views, |r| {
                owner(&pullers, &order[porder[r]].0)
            });
            readers = owners.len();
            poll_every = if owners.contains(&me) || pullers.len() == 1 {
                HAVE_POLL
            } else {
                HAVE_POLL_WAITING
            };
        }
        let origin_free =
            origin_jobs.len() < (ORIGIN_PARALLEL / readers.clamp(1, pullers.len())).max(1);
        let mut stalled = HashSet::new();
        // Peers with room in their window: once there are none, the rest of the scan only
        // looks for late requests (the scan runs on every wake-up).
        let mut open = views
            .iter()
            .filter(|v| inflight.get(&v.id).copied().unwrap_or(0) < PEER_WINDOW)
            .count();
        for i in 0..order.len() {
            match state[i] {
                State::Done | State::Origin => continue,
                State::Peer(p, deadline)
                    if now < deadline || heard.get(&p).is_some_and(|t| now - *t < quiet) =>
                {
                    continue
                }
                State::Peer(p, _) => {
                    // Late: ask someone else too; whichever good copy comes first wins.
                    tracing::debug!(chunk = %order[i].0, peer = %p, "late, asking another source");
                    if stalled.insert(p) {
                        if let Some(pe) = swarm.peers.lock().expect("poisoned").get_mut(&p) {
                            pe.stalls += 1;
                        }
                    }
                    avoid.entry(i).or_default().push(p);
                    state[i] = State::Want;
                }
                State::Want => {}
            }
            if open == 0 {
                continue;
            }
            let (id, len) = order[i];
            let avoided = avoid.get(&i);
            let has = |v: &PeerView| {
                v.have.as_ref().is_none_or(|h| h.get(i))
                    && avoided.is_none_or(|a| !a.contains(&v.id))
            };
            let best_tier = views.iter().filter(|v| has(v)).map(|v| v.distance).min();
            if let Some(tier) = best_tier {
                let pick = views
                    .iter()
                    .filter(|v| has(v) && v.distance == tier)
                    .filter(|v| {
                        inflight.get(&v.id).copied().unwrap_or(0)
                            + batches.get(&v.id).map(|b| b.1).unwrap_or(0)
                            < PEER_WINDOW
                    })
                    .min_by(|a, b| {
                        let cost = |v: &PeerView| {
                            let q = inflight.get(&v.id).copied().unwrap_or(0)
                                + batches.get(&v.id).map(|b| b.1).unwrap_or(0);
                            v.rtt + q as f64 / v.rate.max(50e6)
                        };
                        cost(a).total_cmp(&cost(b))
                    });
                if let Some(v) = pick {
                    let b = batches.entry(v.id).or_default();
                    b.0.push(id);
                    b.1 += len as u64;
                    let q = inflight.get(&v.id).copied().unwrap_or(0) + b.1;
                    if q >= PEER_WINDOW {
                        open -= 1;
                    }
                    let deadline = now
                        + Duration::from_secs(2)
                        + Duration::from_secs_f64(q as f64 / v.rate.max(20e6));
                    state[i] = State::Peer(v.id, deadline);
                    sent_to.insert((i, v.id));
                    if b.0.len() >= bulk::MAX_IDS || b.1 >= PEER_BATCH {
                        let (ids, bytes) = std::mem::take(b);
                        full.push((v.id, ids, bytes));
                    }
                }
                continue;
            }
        }
        // Chunks no peer has: from the origin, if this node is their run's reader.
        if !settle && origin_free {
            let alone = pullers.len() == 1;
            // With a peer holding the whole version, only chunks every such peer was found
            // late on can need the origin: look at those, not at every chunk.
            let late: Vec<usize>;
            let candidates: &[usize] = if views.iter().any(|v| v.have.is_none()) {
                let mut c: Vec<usize> = avoid.keys().copied().collect();
                c.sort_by_key(|&i| (run_of[i], i));
                late = c;
                &late
            } else {
                &porder
            };
            for &i in candidates {
                if origin_bytes >= ORIGIN_BATCH {
                    break;
                }
                if state[i] != State::Want {
                    continue;
                }
                let avoided = avoid.get(&i);
                let on_peer = views.iter().any(|v| {
                    v.have.as_ref().is_none_or(|h| h.get(i))
                        && avoided.is_none_or(|a| !a.contains(&v.id))
                });
                if on_peer {
                    continue;
                }
                if alone || owner(&pullers, &order[porder[run_of[i]]].0) == me {
                    state[i] = State::Origin;
                    origin_batch.push(i);
                    origin_bytes += order[i].1 as u64;
                }
            }
        }
        for (peer, ids, bytes) in full {
            send(swarm, peer, ids, bytes, &tx, &mut inflight).await;
        }
        for (peer, (ids, bytes)) in batches {
            if !ids.is_empty() {
                send(swarm, peer, ids, bytes, &tx, &mut inflight).await;
            }
        }
        if !origin_batch.is_empty() {
            if got.from_origin == 0 && origin_jobs.is_empty() {
                tracing::debug!(
                    ms = started.elapsed().as_millis() as u64,
                    pullers = pullers.len(),
                    "reading from the origin"
                );
            }
            let ids: Vec<Hash> = origin_batch.iter().map(|&i| order[i].0).collect();
            let bytes = origin_bytes;
            origin_jobs
                .push(async move { (origin_batch, bytes, blobs.fetch_origin(ids, None).await) });
        }

        // Wait for something to happen.
        tokio::select! {
            ev = rx.recv() => {
                let ev = ev.expect("sender held here");
                heard.insert(ev.peer, Instant::now());
                handle(swarm, root, ev, &index, order, &mut state, &mut remaining, &mut avoid, &mut inflight, &mut sent_to, &mut got, progress);
                while let Ok(ev) = rx.try_recv() {
                    heard.insert(ev.peer, Instant::now());
                    handle(swarm, root, ev, &index, order, &mut state, &mut remaining, &mut avoid, &mut inflight, &mut sent_to, &mut got, progress);
                }
            }
            Some((batch, bytes, r)) = origin_jobs.next(), if !origin_jobs.is_empty() => {
                match r {
                    Ok(()) => {
                        for i in batch {
                            if state[i] != State::Done {
                                state[i] = State::Done;
                                remaining -= 1;
                                progress.add(order[i].1 as u64);
                                swarm.mark(&root, i);
                            }
                        }
                        // (The node's bytes_from_origin counter is kept by `Blobs`.)
                        got.from_origin += bytes;
                    }
                    Err(e) => {
                        // Part of the batch may be stored; the rest is wanted again.
                        let store = swarm.store.clone();
                        let ids: Vec<(usize, Hash)> = batch.iter().map(|&i| (i, order[i].0)).collect();
                        let held = tokio::task::spawn_blocking(move || {
                            ids.into_iter().map(|(i, id)| (i, store.contains(&id).unwrap_or(false))).collect::<Vec<_>>()
                        }).await.expect("store task panicked");
                        for (i, here) in held {
                            if here {
                                if state[i] != State::Done {
                                    state[i] = State::Done;
                                    remaining -= 1;
                                    progress.add(order[i].1 as u64);
                                    swarm.mark(&root, i);
                                }
                                continue;
                            }
                            let n = origin_tries.entry(i).or_default();
                            *n += 1;
                            if *n >= ORIGIN_TRIES {
                                return Err(e);
                            }
                            state[i] = State::Want;
                        }
                        tracing::warn!("origin read failed, retrying: {e}");
                    }
                }
            }
            _ = tick.tick() => {}
        }
    }
    tracing::info!(
        from_peers = got.from_peers,
        from_origin = got.from_origin,
        secs = started.elapsed().as_secs_f64(),
        "fetched"
    );
    Ok(got)
}

/// The pullers that still have origin reads to do: the owners (`owner_of_run`, given a run's
/// first position in `porder`) of runs with a chunk that is neither here nor, as far as the
/// have-maps in `views` say, on any peer.
fn origin_readers(
    porder: &[usize],
    state: &[State],
    views: &[PeerView],
    owner_of_run: impl Fn(usize) -> PeerId,
) -> HashSet<PeerId> {
    let mut owners = HashSet::new();
    for (k, run) in porder.chunks(RUN).enumerate() {
        let open = run.iter().any(|&i| {
            state[i] != State::Done
                && !matches!(state[i], State::Peer(..))
                && !views
                    .iter()
                    .any(|v| v.have.as_ref().is_none_or(|h| h.get(i)))
        });
        if open {
            owners.insert(owner_of_run(k * RUN));
        }
    }
    owners
}

async fn send(
    swarm: &Arc<Swarm>,
    peer: PeerId,
    ids: Vec<Hash>,
    bytes: u64,
    tx: &mpsc::UnboundedSender<Event>,
    inflight: &mut HashMap<PeerId, u64>,
) {
    *inflight.entry(peer).or_default() += bytes;
    match swarm.client(peer).await {
        Ok(c) => {
            c.request(
                peer,
                bulk::Request {
                    ids,
                    reply: tx.clone(),
                    want_bytes: false,
                    through: None,
                    retain: crate::store::Retain::Keep,
                },
            )
            .await
        }
        Err(e) => {
            tracing::debug!("bulk channel to {peer}: {e}");
            for id in ids {
                let _ = tx.send(Event {
                    peer,
                    id,
                    outcome: Outcome::Lost,
                    bytes: None,
                });
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn handle(
    swarm: &Arc<Swarm>,
    root: Hash,
    ev: Event,
    index: &HashMap<Hash, usize>,
    order: &[(Hash, u32)],
    state: &mut [State],
    remaining: &mut usize,
    avoid: &mut HashMap<usize, Vec<PeerId>>,
    inflight: &mut HashMap<PeerId, u64>,
    sent_to: &mut HashSet<(usize, PeerId)>,
    got: &mut Fetched,
    progress: &Progress,
) {
    let Some(&i) = index.get(&ev.id) else { return };
    if !sent_to.remove(&(i, ev.peer)) {
        return;
    }
    let len = order[i].1 as u64;
    if let Some(n) = inflight.get_mut(&ev.peer) {
        *n = n.saturating_sub(len);
    }
    match ev.outcome {
        Outcome::Stored(n) => {
            if state[i] != State::Done {
                state[i] = State::Done;
                *remaining -= 1;
                progress.add(n as u64);
                got.from_peers += n as u64;
                swarm
                    .counters
                    .bytes_from_peers
                    .fetch_add(n as u64, Ordering::Relaxed);
                swarm.mark(&root, i);
            }
        }
        Outcome::Bad => {
            swarm
                .counters
                .verify_failures
                .fetch_add(1, Ordering::Relaxed);
            swarm.fault(
                &ev.peer,
                &format!("sent bytes for chunk {} that do not match it", ev.id),
            );
            avoid.entry(i).or_default().push(ev.peer);
            if state[i] != State::Done {
                state[i] = State::Want;
            }
        }
        Outcome::Missing => {
            tracing::debug!(peer = %ev.peer, chunk = %ev.id, "peer does not have chunk");
            // It was asked because it said it had the chunk (whole version, or the bit in its
            // have-map): a stale map now and then, a lie if it keeps happening. Forget that bit
            // and count it against the peer.
            let advertised = {
                let mut peers = swarm.peers.lock().expect("poisoned");
                match peers
                    .get_mut(&ev.peer)
                    .and_then(|p| p.versions.get_mut(&root))
                {
                    Some(v) => match v.have.as_mut() {
                        Some(h) => {
                            let had = h.get(i);
                            h.clear(i);
                            had && v.fresh
                        }
                        None => v.holding == Holding::Complete,
                    },
                    None => false,
                }
            };
            if advertised {
                swarm.miss(&ev.peer, &format!("chunk {}", ev.id));
            }
            avoid.entry(i).or_default().push(ev.peer);
            if state[i] != State::Done {
                state[i] = State::Want;
            }
        }
        Outcome::Lost => {
            tracing::debug!(peer = %ev.peer, chunk = %ev.id, "request lost");
            avoid.entry(i).or_default().push(ev.peer);
            inflight.remove(&ev.peer);
            if state[i] != State::Done {
                state[i] = State::Want;
            }
        }
    }
}

/// Ids per request in [`from_complete_peers`]: about 5 MiB of chunks.
const PEER_PART: usize = 128;

/// Fetches blobs (tree nodes, pack indexes, a mount's chunks) from peers that hold the whole
/// version; returns those that arrived, verified and stored, with their bytes. Never fails:
/// the caller falls back to the origin for the rest.
pub async fn from_complete_peers(
    swarm: &Arc<Swarm>,
    root: &Hash,
    ids: &[Hash],
    retain: crate::store::Retain,
) -> HashMap<Hash, Bytes> {
    let peers = peers_holding(swarm, root, Holding::Complete);
    let mut want: Vec<Hash> = ids.to_vec();
    let mut got = HashMap::new();
    for (_, peer) in peers.into_iter().take(2) {
        if want.is_empty() {
            break;
        }
        got.extend(ask_peer(swarm, peer, &want, None, retain, Duration::from_secs(5)).await);
        want.retain(|id| !got.contains_key(id));
    }
    got
}

/// For this long after a node starts pulling a version, while connected peers have not said
/// whether they pull it too, it waits for their announcements before deciding who reads the
/// version's metadata (nodes starting together hear of each other within milliseconds).
const META_SETTLE: Duration = Duration::from_millis(250);
/// How long a puller waits on the puller that reads the metadata without receiving anything
/// (that puller is then passed over for metadata while it stays connected: a silent or lying
/// owner costs a pull this once).
const META_WAIT: Duration = Duration::from_secs(5);
/// Between asks to that puller while it is still reading: from the first to the last, doubling
/// while it has nothing new (its tree levels arrive one after another, each a few milliseconds
/// after the last on a fast origin).
const META_POLL: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(40));

/// A version's metadata (pack indexes, tree nodes) for a node pulling it while others pull it
/// too: one of the pullers, the owner of the version's root by rendezvous hashing, reads it
/// from the origin and the others ask it, so a cold cluster reads the metadata once rather
/// than once per node. Returns what the owner delivered, verified and stored, with the bytes;
/// the caller reads the rest from the origin. Empty at once when this node is not pulling
/// `root`, is the owner, or nobody else pulls it (after up to `META_SETTLE` for
/// announcements of nodes starting together); the rest is left to the caller once the owner
/// leaves or has sent nothing for `META_WAIT`.
pub async fn from_pulling_owner(
    swarm: &Arc<Swarm>,
    root: &Hash,
    ids: &[Hash],
    retain: crate::store::Retain,
) -> HashMap<Hash, Bytes> {
    let mut got = HashMap::new();
    let pulling_since = swarm
        .local
        .lock()
        .expect("poisoned")
        .get(root)
        .filter(|v| v.holding == Holding::Pulling)
        .map(|v| v.since);
    let Some(since) = pulling_since else {
        return got;
    };
    if ids.is_empty() {
        return got;
    }
    let key = u64::from_le_bytes(root.0[..8].try_into().expect("8 bytes"));
    let mut want: Vec<Hash> = ids.to_vec();
    let mut heard = Instant::now();
    let mut pause = META_POLL.0;
    loop {
        if since.elapsed() < META_SETTLE {
            let undecided = swarm
                .peers
                .lock()
                .expect("poisoned")
                .iter()
                .any(|(id, p)| swarm.can_ask(id, p) && !p.versions.contains_key(root));
            if undecided {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        }
        let mut pullers = nodes_holding(swarm, root, Holding::Pulling);
        {
            // Pullers that let this node down before (faults, or metadata they owned and never
            // sent) own no metadata.
            let peers = swarm.peers.lock().expect("poisoned");
            pullers.retain(|(_, id)| {
                peers
                    .get(id)
                    .is_none_or(|p| p.faults == 0 && p.meta_stalls == 0)
            });
        }
        if pullers.len() < 2 {
            break;
        }
        let owner = owner_of(&pullers, mix(key));
        if owner == swarm.peer_id {
            break;
        }
        let part = ask_peer(swarm, owner, &want, None, retain, Duration::from_secs(5)).await;
        if !part.is_empty() {
            heard = Instant::now();
            pause = META_POLL.0;
            want.retain(|id| !part.contains_key(id));
            got.extend(part);
        } else {
            pause = (pause * 2).min(META_POLL.1);
        }
        if want.is_empty() {
            break;
        }
        if heard.elapsed() > META_WAIT {
            tracing::warn!(peer = %owner, "sent none of the metadata it reads for {}s; reading it from the origin", META_WAIT.as_secs());
            if let Some(p) = swarm.peers.lock().expect("poisoned").get_mut(&owner) {
                p.meta_stalls += 1;
            }
            break;
        }
        tokio::time::sleep(pause).await;
    }
    if !got.is_empty() {
        tracing::debug!(
            blobs = got.len(),
            of = ids.len(),
            "metadata from the puller that reads it from the origin"
        );
    }
    got
}

/// The nodes mounting `root` (this one included), as (seed, id) for [`mount_owner`]: connected
/// members with a bulk address that announced a mount of it.
pub fn mounting_nodes(swarm: &Arc<Swarm>, root: &Hash) -> Vec<(u64, PeerId)> {
    nodes_holding(swarm, root, Holding::Mounted)
}

/// The nodes that announced `root` with `holding` (this one included), as (seed, id) for
/// rendezvous hashing.
fn nodes_holding(swarm: &Swarm, root: &Hash, holding: Holding) -> Vec<(u64, PeerId)> {
    let mut v: Vec<(u64, PeerId)> = peers_holding(swarm, root, holding)
        .into_iter()
        .map(|(_, id)| (peer_seed(&id), id))
        .collect();
    v.push((peer_seed(&swarm.peer_id), swarm.peer_id));
    v.sort_by_key(|n| n.1);
    v
}

/// The connected members with a bulk address that announced `root` with `holding`, nearest
/// first, as (locality distance, id).
pub fn peers_holding(swarm: &Swarm, root: &Hash, holding: Holding) -> Vec<(u8, PeerId)> {
    let peers = swarm.peers.lock().expect("poisoned");
    let mut v: Vec<(u8, PeerId)> = peers
        .iter()
        .filter(|(id, p)| {
            swarm.can_ask(id, p) && p.versions.get(root).is_some_and(|v| v.holding == holding)
        })
        .map(|(id, p)| (swarm.labels.distance(&p.labels), *id))
        .collect();
    v.sort();
    v
}

/// Which of the mounting `nodes` reads the run keyed `run` from the origin.
pub fn mount_owner(nodes: &[(u64, PeerId)], run: u64) -> PeerId {
    owner_of(nodes, mix(run))
}

/// Asks one peer for blobs (`through`: of that version, fetched from its origin if it lacks
/// them); returns what arrived, verified and stored, with the bytes. Gives up on the rest once
/// nothing has arrived for `wait`, or the peer disconnects.
pub async fn ask_peer(
    swarm: &Arc<Swarm>,
    peer: PeerId,
    ids: &[Hash],
    through: Option<Hash>,
    retain: crate::store::Retain,
    wait: Duration,
) -> HashMap<Hash, Bytes> {
    let mut got = HashMap::new();
    let Ok(c) = swarm.client(peer).await else {
        return got;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Several small requests rather than one large one: the peer streams the first while it
    // reads the next, and this side verifies as they come.
    for part in ids.chunks(PEER_PART) {
        c.request(
            peer,
            bulk::Request {
                ids: part.to_vec(),
                reply: tx.clone(),
                want_bytes: true,
                through,
                retain,
            },
        )
        .await;
    }
    drop(tx);
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    let mut alive = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0;
    loop {
        tokio::select! {
            _ = alive.tick() => {
                let connected = swarm.peers.lock().expect("poisoned").get(&peer).is_some_and(|p| p.connected);
                if !connected {
                    break;
                }
            }
            ev = rx.recv() => match ev {
                None => break,
                Some(ev) => {
                    n += 1;
                    deadline.as_mut().reset(tokio::time::Instant::now() + wait);
                    match ev.outcome {
                        Outcome::Stored(len) => {
                            if let Some(b) = ev.bytes {
                                got.insert(ev.id, b);
                            }
                            swarm.counters.bytes_from_peers.fetch_add(len as u64, Ordering::Relaxed);
                        }
                        Outcome::Bad => {
                            swarm.counters.verify_failures.fetch_add(1, Ordering::Relaxed);
                            swarm.fault(&peer, &format!("sent bytes for blob {} that do not match it", ev.id));
                        }
                        _ => {}
                    }
                    if n == ids.len() { break; }
                }
            },
            _ = &mut deadline => {
                if let Some(p) = swarm.peers.lock().expect("poisoned").get_mut(&peer) {
                    p.stalls += 1;
                }
                break;
            }
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(have: Option<super::super::HaveMap>) -> PeerView {
        PeerView {
            id: PeerId::random(),
            distance: 0,
            have,
            rate: 1e9,
            rtt: 0.001,
        }
    }

    /// A run counts toward its owner while any of its chunks is wanted (or being read from
    /// the origin here) and on no peer; runs done, asked of a peer, or on a peer do not.
    #[test]
    fn origin_readers_are_the_owners_of_runs_left_to_read() {
        let n = 4 * RUN;
        let porder: Vec<usize> = (0..n).rev().collect();
        let owners: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        // Runs by position in porder: run k is owned by owners[k].
        let owner_of_run = |pos: usize| owners[pos / RUN];
        let chunk = |run: usize, j: usize| porder[run * RUN + j];
        let mut state = vec![State::Done; n];
        let mut map = super::super::HaveMap::new(n);
        // Run 0: one chunk still wanted, on no peer: its owner reads.
        state[chunk(0, 5)] = State::Want;
        // Run 1: one chunk wanted, but a pulling peer has it: no origin read.
        state[chunk(1, 0)] = State::Want;
        map.set(chunk(1, 0));
        // Run 2: one chunk being read from the origin here.
        state[chunk(2, RUN - 1)] = State::Origin;
        // Run 3: asked of a peer.
        state[chunk(3, 1)] = State::Peer(PeerId::random(), Instant::now());
        let views = vec![view(Some(map))];
        let got = origin_readers(&porder, &state, &views, owner_of_run);
        assert_eq!(got, HashSet::from([owners[0], owners[2]]));

        // A peer holding the whole version: nothing is left for the origin.
        let got = origin_readers(&porder, &state, &[view(None)], owner_of_run);
        assert!(got.is_empty());

        // Nothing wanted: no readers.
        let done = vec![State::Done; n];
        assert!(origin_readers(&porder, &done, &views, owner_of_run).is_empty());
    }
}
