//! Asking peers for blobs outside a pull's chunk scheduler: metadata (tree nodes, pack
//! indexes) from peers holding a version whole or from the puller that reads it, and a mount's
//! runs from the peer that owns them. Who owns what, and when to give up on an owner, is
//! `shoal_sched::owners`'s decision; this module carries it out over the peer table and the
//! bulk channel.

use crate::bulk::{self, Outcome};
use crate::roster::{key_of, peer_seed};
use crate::{Holding, Report, Swarm};
use bytes::Bytes;
use libp2p::PeerId;
use shoal_registry::Hash;
use shoal_sched::owners::{self, Candidate, MetaConfig, MetaFetch, MetaStep};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Ids per request in [`from_complete_peers`]: about 5 MiB of chunks.
const PEER_PART: usize = 128;

/// Fetches blobs (tree nodes, pack indexes, a mount's chunks) from peers that hold the whole
/// version; returns those that arrived, verified and stored, with their bytes. Never fails:
/// the caller falls back to the origin for the rest.
///
/// Cancel-safe: what arrived stays stored and verified.
pub async fn from_complete_peers(
    swarm: &Arc<Swarm>,
    root: &Hash,
    ids: &[Hash],
    retain: shoal_store::Retain,
) -> HashMap<Hash, Bytes> {
    let peers = owners::complete_sources(&peers_holding(swarm, root, Holding::Complete));
    let mut want: Vec<Hash> = ids.to_vec();
    let mut got = HashMap::new();
    for peer in peers {
        if want.is_empty() {
            break;
        }
        got.extend(ask_peer(swarm, peer, &want, None, retain, Duration::from_secs(5)).await);
        want.retain(|id| !got.contains_key(id));
    }
    got
}

/// A version's metadata (pack indexes, tree nodes) for a node pulling it while others pull it
/// too: one of the pullers, the owner of the version's root by rendezvous hashing, reads it
/// from the origin and the others ask it, so a cold cluster reads the metadata once rather
/// than once per node. Returns what the owner delivered, verified and stored, with the bytes;
/// the caller reads the rest from the origin. Empty at once when this node is not pulling
/// `root`, is the owner, or nobody else pulls it (after up to `MetaConfig::settle` for
/// announcements of nodes starting together); the rest is left to the caller once the owner
/// leaves or has sent nothing for `MetaConfig::wait`.
///
/// Cancel-safe: what arrived stays stored and verified (the owner is counted as stalled only
/// when its quiet spell ran out).
pub async fn from_pulling_owner(
    swarm: &Arc<Swarm>,
    root: &Hash,
    ids: &[Hash],
    retain: shoal_store::Retain,
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
    let mut want: Vec<Hash> = ids.to_vec();
    let mut meta = MetaFetch::new(
        MetaConfig::default(),
        swarm.peer_id,
        key_of(root),
        since,
        Instant::now(),
    );
    loop {
        let undecided = {
            let t = swarm.table();
            t.peers
                .iter()
                .any(|(id, p)| t.can_ask(id, p) && !p.versions.contains_key(root))
        };
        let pullers = candidates(swarm, root, Holding::Pulling);
        match meta.poll(Instant::now(), undecided, &pullers) {
            MetaStep::Wait(d) => tokio::time::sleep(d).await,
            MetaStep::Origin => break,
            MetaStep::Stalled(owner) => {
                tracing::warn!(peer = %owner, "sent none of the metadata it reads for {}s; reading it from the origin", MetaConfig::default().wait.as_secs());
                swarm.report(owner, Report::OwnerStall).await;
                break;
            }
            MetaStep::Ask(owner) => {
                let part =
                    ask_peer(swarm, owner, &want, None, retain, Duration::from_secs(5)).await;
                meta.on_answer(Instant::now(), part.len());
                want.retain(|id| !part.contains_key(id));
                got.extend(part);
                if want.is_empty() {
                    break;
                }
            }
        }
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

/// The nodes mounting `root` (this one included) that may own its runs, as (seed, id) for
/// [`owners::owner`]: connected members with a bulk address that announced a mount of it,
/// less those that let this node down before (faults, or runs they owned and never sent):
/// their runs are shared out among the others.
pub fn mounting_nodes(swarm: &Arc<Swarm>, root: &Hash) -> Vec<(u64, PeerId)> {
    candidates(swarm, root, Holding::Mounted)
}

/// The nodes that announced `root` with `holding` (this one included) and may own units of
/// it for this node (see [`owners::eligible`]).
fn candidates(swarm: &Swarm, root: &Hash, holding: Holding) -> Vec<(u64, PeerId)> {
    let t = swarm.table();
    let them = t
        .holders(root)
        .filter(|(_, _, h)| *h == holding)
        .map(|(id, p, _)| Candidate {
            seed: peer_seed(id),
            id: *id,
            failed: p.faults > 0 || p.owner_stalls > 0,
        });
    owners::eligible(them.chain(std::iter::once(Candidate {
        seed: peer_seed(&swarm.peer_id),
        id: swarm.peer_id,
        failed: false,
    })))
}

/// The connected members with a bulk address that announced `root` with `holding`, nearest
/// first, as (locality distance, id).
pub fn peers_holding(swarm: &Swarm, root: &Hash, holding: Holding) -> Vec<(u8, PeerId)> {
    let mut v: Vec<(u8, PeerId)> = swarm
        .table()
        .holders(root)
        .filter(|(_, _, h)| *h == holding)
        .map(|(id, p, _)| (swarm.labels.distance(&p.labels), *id))
        .collect();
    v.sort();
    v
}

/// Asks one peer for blobs (`through`: of that version, fetched from its origin if it lacks
/// them); returns what arrived, verified and stored, with the bytes. Gives up on the rest once
/// nothing has arrived for `wait`, or the peer disconnects.
///
/// Cancel-safe: what arrived stays stored and verified; answers still coming are dropped.
pub async fn ask_peer(
    swarm: &Arc<Swarm>,
    peer: PeerId,
    ids: &[Hash],
    through: Option<Hash>,
    retain: shoal_store::Retain,
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
                let connected = swarm.table.borrow().peers.get(&peer).is_some_and(|p| p.connected);
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
                            swarm.report(peer, Report::Fault(format!("sent bytes for blob {} that do not match it", ev.id))).await;
                        }
                        _ => {}
                    }
                    if n == ids.len() { break; }
                }
            },
            _ = &mut deadline => {
                swarm.report(peer, Report::Stall).await;
                break;
            }
        }
    }
    got
}
