//! Fetching a version's chunks from the swarm and the origin: the driver of the pull
//! scheduler.
//!
//! Which source serves which chunk is decided by [`shoal_sched::Pull`], which does no I/O;
//! this module keeps it fed (the peers that announced the version, their have-maps, what
//! arrived), carries out what it asks (requests over the bulk channel, origin reads, have-map
//! queries) and reports to the rest of the node (progress, the have-map this node announces,
//! faults and misses counted against peers). The other fetches here (metadata from the
//! puller that reads it, blobs from peers holding a version whole) are still decided in
//! place.

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
use shoal_sched::pull::{self, Action, Delivery, Pull, Source};
use shoal_sched::{mix, owner_of};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub use shoal_sched::pull::Fetched;

/// The driver re-reads the peer table (announcements, have-maps) at least this often.
const SYNC: Duration = Duration::from_millis(20);

use super::roster::{key_of, peer_seed};

/// The scheduler's view of the peers, and what of it was last handed over.
struct Sync {
    seeds: HashMap<PeerId, u64>,
    /// Per source: the have-map generation and freshness given to the scheduler, and how
    /// much of the deltas logged since.
    given: HashMap<PeerId, (u64, bool, usize)>,
}

impl Sync {
    /// Hands the scheduler what changed in the peer table since the last call: sources
    /// that came or left, and have-maps that were replaced.
    fn run(&mut self, swarm: &Swarm, root: &Hash, n: usize, sched: &mut Pull<PeerId>) {
        // The version's pullers across the fleet (the first few by rank: all the scheduler
        // needs to agree with every other node on the origin readers).
        let pullers = swarm.rosters.lock().expect("poisoned").pullers(root);
        sched.set_pullers(Some(pullers));
        let peers = swarm.peers.lock().expect("poisoned");
        sched.set_connected(peers.values().filter(|p| p.connected).count());
        let mut seen = Vec::new();
        for (id, p) in peers.iter() {
            if !swarm.can_ask(id, p) {
                continue;
            }
            let Some(v) = p.versions.get(root) else {
                continue;
            };
            let seed = *self.seeds.entry(*id).or_insert_with(|| peer_seed(id));
            sched.set_source(
                *id,
                Source {
                    seed,
                    distance: swarm.labels.distance(&p.labels),
                    holding: match v.holding {
                        Holding::Complete => pull::Holding::Complete,
                        Holding::Pulling => pull::Holding::Pulling,
                        Holding::Mounted => pull::Holding::Mounted,
                    },
                    rate: p.throughput,
                    rtt: p.rtt.map(|d| d.as_secs_f64()).unwrap_or(0.001),
                    grew: v.grew,
                    faults: p.faults,
                },
            );
            match self.given.get_mut(id) {
                Some((gen, fresh, pos)) if (*gen, *fresh) == (v.gen, v.fresh) => {
                    if v.log.len() > *pos {
                        let chunks: Vec<usize> =
                            v.log[*pos..].iter().map(|&i| i as usize).collect();
                        sched.on_have(*id, &chunks);
                        *pos = v.log.len();
                    }
                }
                _ => {
                    self.given.insert(*id, (v.gen, v.fresh, v.log.len()));
                    // A map of another length (another version's index space) is no map.
                    let map = v.have.clone().filter(|h| h.len as usize == n);
                    sched.set_have(*id, map, v.fresh);
                }
            }
            seen.push(*id);
        }
        drop(peers);
        let gone: Vec<PeerId> = sched
            .sources()
            .filter(|p| !seen.contains(p))
            .copied()
            .collect();
        for p in gone {
            sched.remove_source(&p);
            self.given.remove(&p);
        }
    }
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
    let n = order.len();
    let index: HashMap<Hash, usize> = order.iter().enumerate().map(|(i, c)| (c.0, i)).collect();
    // Origin reads go in pack order, so each reader's ranges are long and contiguous. (One
    // lookup per chunk, not one per comparison: with ~27,000 chunks per GiB the latter cost
    // tens of milliseconds before the first read.)
    let mut porder: Vec<usize> = (0..n).collect();
    porder.sort_by_cached_key(|&i| blobs.locate(&order[i].0).unwrap_or((u32::MAX, 0)));
    let keys: Vec<u64> = order.iter().map(|c| key_of(&c.0)).collect();
    let me = swarm.peer_id;
    // The node keeps 32 MiB in flight to every peer for now: with windows that follow the
    // measured rate (the scheduler's default, which the fleet simulation needs), one
    // swarm-lo run took 3.47 s, and 2.28 s with this fixed window (docs/swarm.md).
    // Peers push what they gain (have-deltas, `p2p.rs`): a map is asked for once per peer.
    let cfg = pull::Config {
        peer_ids: bulk::MAX_IDS,
        peer_window_min: pull::Config::default().peer_window,
        have_deltas: true,
        ..pull::Config::default()
    };
    let started = Instant::now();
    let mut sched = Pull::new(
        cfg,
        me,
        peer_seed(&me),
        pull::Chunks {
            lens: order.iter().map(|c| c.1).collect(),
            keys,
            porder,
            key: key_of(&root),
        },
        &missing,
        started,
    );
    let mut sync = Sync {
        seeds: HashMap::new(),
        given: HashMap::new(),
    };
    // Unbounded, but bounded by what was asked: one event per chunk requested, and the
    // scheduler keeps at most its window (32 MiB) in flight to each peer. (The bulk client's
    // reply type is unbounded: a bounded one could block its reader while this loop awaits a
    // request send to that same client.)
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut origin_jobs = FuturesUnordered::new();
    tracing::debug!(
        setup_us = entered.elapsed().as_micros() as u64,
        "fetch set up"
    );
    let mut last_flush = Instant::now();
    let mut flushing: Option<tokio::task::JoinHandle<()>> = None;
    let done = |i: usize| {
        progress.add(order[i].1 as u64);
        swarm.mark(&root, i);
    };

    while !sched.is_done() {
        sync.run(swarm, &root, n, &mut sched);
        let now = Instant::now();
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
        for action in sched.poll(now) {
            match action {
                Action::QueryHave(p) => swarm.send(Cmd::QueryHave(p, root)),
                Action::Stalled(p) => {
                    tracing::debug!(peer = %p, "late, asking another source");
                    if let Some(pe) = swarm.peers.lock().expect("poisoned").get_mut(&p) {
                        pe.stalls += 1;
                    }
                }
                Action::Request {
                    peer,
                    chunks,
                    bytes: _,
                } => {
                    let ids = chunks.iter().map(|&i| order[i].0).collect();
                    send(swarm, peer, ids, &tx).await;
                }
                Action::ReadOrigin { chunks, bytes } => {
                    if sched.fetched().from_origin == 0 && origin_jobs.is_empty() {
                        tracing::debug!(
                            ms = started.elapsed().as_millis() as u64,
                            "reading from the origin"
                        );
                    }
                    let ids: Vec<Hash> = chunks.iter().map(|&i| order[i].0).collect();
                    origin_jobs
                        .push(async move { (chunks, bytes, blobs.fetch_origin(ids, None).await) });
                }
            }
        }

        // Wait for something to happen, or for the scheduler's next deadline.
        let wake = sched
            .poll_timeout()
            .map_or(now + SYNC, |t| t.min(now + SYNC));
        tokio::select! {
            ev = rx.recv() => {
                let ev = ev.expect("sender held here");
                on_event(swarm, &mut sched, ev, &index, &done);
                while let Ok(ev) = rx.try_recv() {
                    on_event(swarm, &mut sched, ev, &index, &done);
                }
            }
            Some((batch, bytes, r)) = origin_jobs.next(), if !origin_jobs.is_empty() => {
                // (The node's bytes_from_origin counter is kept by `Blobs`.)
                let held: Vec<bool> = match &r {
                    Ok(()) => vec![true; batch.len()],
                    Err(e) => {
                        // Part of the batch may be stored; the rest is wanted again.
                        tracing::warn!("origin read failed, retrying: {e}");
                        let store = swarm.store.clone();
                        let ids: Vec<Hash> = batch.iter().map(|&i| order[i].0).collect();
                        tokio::task::spawn_blocking(move || {
                            ids.iter().map(|id| store.contains(id).unwrap_or(false)).collect()
                        }).await.expect("store task panicked")
                    }
                };
                let pos: HashMap<usize, bool> = batch.iter().copied().zip(held).collect();
                match sched.on_origin(Instant::now(), &batch, bytes, r.is_ok(), |i| pos.get(&i).copied().unwrap_or(false)) {
                    Ok(newly) => newly.into_iter().for_each(done),
                    Err(_) => return Err(r.expect_err("only a failed read gives up")),
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    let got = sched.fetched();
    tracing::info!(
        from_peers = got.from_peers,
        from_origin = got.from_origin,
        secs = started.elapsed().as_secs_f64(),
        "fetched"
    );
    Ok(got)
}

/// Sends one request to a peer; a failure to reach it comes back as every chunk lost.
async fn send(swarm: &Arc<Swarm>, peer: PeerId, ids: Vec<Hash>, tx: &mpsc::UnboundedSender<Event>) {
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

/// Hands one peer answer to the scheduler and carries out what it means.
fn on_event(
    swarm: &Arc<Swarm>,
    sched: &mut Pull<PeerId>,
    ev: Event,
    index: &HashMap<Hash, usize>,
    done: &impl Fn(usize),
) {
    let Some(&i) = index.get(&ev.id) else { return };
    let outcome = match ev.outcome {
        Outcome::Stored(n) => pull::Outcome::Stored(n),
        Outcome::Bad => {
            swarm
                .counters
                .verify_failures
                .fetch_add(1, Ordering::Relaxed);
            swarm.fault(
                &ev.peer,
                &format!("sent bytes for chunk {} that do not match it", ev.id),
            );
            pull::Outcome::Bad
        }
        Outcome::Missing => {
            tracing::debug!(peer = %ev.peer, chunk = %ev.id, "peer does not have chunk");
            pull::Outcome::Missing
        }
        Outcome::Lost => {
            tracing::debug!(peer = %ev.peer, chunk = %ev.id, "request lost");
            pull::Outcome::Lost
        }
    };
    match sched.on_peer(Instant::now(), ev.peer, i, outcome) {
        Delivery::Done(n) => {
            swarm
                .counters
                .bytes_from_peers
                .fetch_add(n as u64, Ordering::Relaxed);
            done(i);
        }
        Delivery::Missed => {
            swarm.miss(&ev.peer, &format!("chunk {}", ev.id));
        }
        Delivery::Nothing => {}
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
    let key = key_of(root);
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
        without_failed_owners(swarm, &mut pullers);
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
            owner_stalled(swarm, &owner);
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
/// members with a bulk address that announced a mount of it, less those that let this node
/// down before (faults, or runs they owned and never sent): their runs are shared out among
/// the others.
pub fn mounting_nodes(swarm: &Arc<Swarm>, root: &Hash) -> Vec<(u64, PeerId)> {
    let mut nodes = nodes_holding(swarm, root, Holding::Mounted);
    without_failed_owners(swarm, &mut nodes);
    nodes
}

/// Leaves out of `nodes` the peers that let this node down before (faults, or something they
/// owned and never sent): they own nothing for it while they stay connected.
fn without_failed_owners(swarm: &Swarm, nodes: &mut Vec<(u64, PeerId)>) {
    let peers = swarm.peers.lock().expect("poisoned");
    nodes.retain(|(_, id)| {
        peers
            .get(id)
            .is_none_or(|p| p.faults == 0 && p.owner_stalls == 0)
    });
}

/// Counts against `peer` that it owned what this node asked of it and sent none of it in time.
pub fn owner_stalled(swarm: &Swarm, peer: &PeerId) {
    if let Some(p) = swarm.peers.lock().expect("poisoned").get_mut(peer) {
        p.owner_stalls += 1;
    }
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
    // Unbounded, but bounded by what was asked: one event per id in `ids`.
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
