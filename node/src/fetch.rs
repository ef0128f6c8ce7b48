//! Fetching a version's chunks from the swarm and the origin: the driver of the pull
//! scheduler.
//!
//! Which source serves which chunk is decided by [`shoal_sched::Pull`], which does no I/O;
//! this module keeps it fed (through the swarm's [`PullView`]: the peers that announced the
//! version, their have-maps and deltas; and what arrived), carries out what it asks (requests over the bulk channel, origin reads, have-map
//! queries) and reports to the rest of the node (progress, the have-map this node announces,
//! faults and misses counted against peers). The other fetches from peers (metadata from the
//! puller that reads it, blobs from peers holding a version whole, a mount's runs) are
//! `shoal_swarm::ask`'s, carrying out `shoal_sched::owners`.

use crate::blobs::Blobs;
use crate::error::Result;
use crate::progress::Progress;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use shoal_registry::Hash;
use shoal_sched::pull::{self, Action, Delivery, Pull};
use shoal_swarm::PeerId;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub use shoal_sched::pull::Fetched;

/// The driver asks the swarm what changed in its peer table (announcements, have-maps) this
/// often, and wakes at least this often to do so.
const SYNC: Duration = Duration::from_millis(20);

use shoal_swarm::bulk::{self, Event, Outcome};
use shoal_swarm::roster::{key_of, peer_seed};
use shoal_swarm::{PullView, Report, Swarm};

/// Fetches `order[i]` for every `i` in `missing` into the local store. `order` is the
/// version's unique chunks in walk order (the index space of have-maps).
///
/// Cancel-safe: chunks are stored only once verified and progress is made durable as it goes,
/// so a rerun resumes; requests still in flight are answered into a closed channel and dropped.
#[tracing::instrument(name = "fetch", skip_all, fields(chunks = missing.len(), unique = order.len()))]
pub async fn fetch(
    swarm: &Arc<Swarm>,
    blobs: &Blobs,
    root: Hash,
    order: &[(Hash, u32)],
    missing: Vec<usize>,
    progress: &Progress,
) -> Result<Fetched> {
    let entered = Instant::now();
    // Every chunk is looked up below.
    blobs.open_all().await?;
    let n = order.len();
    // Chunk id -> position in `order`, for answers: positions sorted by id (4 bytes a chunk,
    // where a hash map took about 60).
    let mut by_id: Vec<u32> = (0..n as u32).collect();
    by_id.sort_unstable_by(|&a, &b| order[a as usize].0.cmp(&order[b as usize].0));
    let index = ById {
        order,
        by_id: &by_id,
    };
    // Origin reads go in pack order, so each reader's ranges are long and contiguous. (One
    // lookup per chunk, not one per comparison: with ~27,000 chunks per GiB the latter cost
    // tens of milliseconds before the first read.)
    let mut porder: Vec<usize> = (0..n).collect();
    porder.sort_by_cached_key(|&i| blobs.locate(&order[i].0).unwrap_or((u32::MAX, 0)));
    // Chunks sharing a compressed frame are tied: read in one run, so the frame is read once.
    // (None are where no pack is compressed: no second lookup per chunk then.)
    let tied: Vec<bool> = if blobs.has_compressed() {
        let frames: Vec<Option<(u32, u64)>> = porder
            .iter()
            .map(|&i| blobs.frame_of(&order[i].0))
            .collect();
        (0..n)
            .map(|pos| pos > 0 && frames[pos].is_some() && frames[pos] == frames[pos - 1])
            .collect()
    } else {
        Vec::new()
    };
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
        // The rosters list pullers in the order they started (`shoal_swarm::roster`).
        readers_in_order: true,
        ..pull::Config::default()
    };
    let started = Instant::now();
    let version = pull::Chunks {
        lens: order.iter().map(|c| c.1).collect(),
        keys,
        porder,
        key: key_of(&root),
        tied,
    };
    let layout = Arc::new(pull::Layout::new(version, cfg.run));
    let mut sched = Pull::new(cfg, me, peer_seed(&me), layout, &missing, started);
    // Listed as pulling since before the version's metadata was read: the readers' judgements
    // are timed from the listings (`Pull::set_listed_at`).
    if let Some(at) = swarm.pulling_since(&root) {
        sched.set_listed_at(at);
    }
    let mut sync = PullView::default();
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

    let mut viewed: Option<Instant> = None;
    while !sched.is_done() {
        // What changed in the peer table, every SYNC (a round trip to the swarm's event
        // loop: not at every delivery, which at full speed come thousands a second).
        if viewed.is_none_or(|t| t.elapsed() >= SYNC) {
            sync.run(swarm, &root, n, &mut sched).await;
            viewed = Some(Instant::now());
        }
        let now = Instant::now();
        if now - last_flush >= Duration::from_secs(1)
            && flushing.as_ref().is_none_or(|f| f.is_finished())
        {
            // Make progress durable now and then, so a killed pull resumes from near where it
            // stopped; in the background, so deliveries keep flowing meanwhile.
            last_flush = now;
            let store = swarm.store().clone();
            flushing = Some(tokio::task::spawn_blocking(move || {
                if let Err(e) = store.flush() {
                    tracing::warn!("flushing the store: {e}");
                }
            }));
        }
        for action in sched.poll(now) {
            match action {
                Action::QueryHave(p) => swarm.query_have(p, root),
                Action::Stalled(p) => {
                    tracing::debug!(peer = %p, "late, asking another source");
                    swarm.report(p, Report::Stall).await;
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
                let mut reports = Vec::new();
                on_event(swarm, &mut sched, ev, &index, &done, &mut reports);
                while let Ok(ev) = rx.try_recv() {
                    on_event(swarm, &mut sched, ev, &index, &done, &mut reports);
                }
                for (peer, what) in reports {
                    swarm.report(peer, what).await;
                }
            }
            Some((batch, bytes, r)) = origin_jobs.next(), if !origin_jobs.is_empty() => {
                // (The node's bytes_from_origin counter is kept by `Blobs`.)
                let held: Vec<bool> = match &r {
                    Ok(()) => vec![true; batch.len()],
                    Err(e) => {
                        // Part of the batch may be stored; the rest is wanted again.
                        tracing::warn!("origin read failed, retrying: {e}");
                        let store = swarm.store().clone();
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
    let c = &swarm.counters;
    c.readers_passed_over
        .fetch_add(got.readers_passed_over as u64, Ordering::Relaxed);
    c.readers_passed_over_by_lag
        .fetch_add(got.readers_passed_over_by_lag as u64, Ordering::Relaxed);
    tracing::info!(
        from_peers = got.from_peers,
        from_origin = got.from_origin,
        readers_passed_over = got.readers_passed_over,
        by_lag = got.readers_passed_over_by_lag,
        secs = started.elapsed().as_secs_f64(),
        "fetched"
    );
    Ok(got)
}

/// Sends one request to a peer; a failure to reach it comes back as every chunk lost.
///
/// Cancel-safety as [`bulk::Client::request`]: a cancelled send reports nothing for its chunks.
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
                    retain: shoal_store::Retain::Keep,
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

/// Where each chunk of a pull's order is, by id.
struct ById<'a> {
    order: &'a [(Hash, u32)],
    /// Positions in `order`, sorted by id.
    by_id: &'a [u32],
}

impl ById<'_> {
    fn get(&self, id: &Hash) -> Option<usize> {
        let at = |i: usize| self.order[self.by_id[i] as usize].0.as_bytes().as_slice();
        shoal_store::sorted::find(self.by_id.len(), at, id).map(|i| self.by_id[i] as usize)
    }
}

/// Hands one peer answer to the scheduler and carries out what it means (what it says of
/// the peer goes into `reports`, for the swarm).
fn on_event(
    swarm: &Arc<Swarm>,
    sched: &mut Pull<PeerId>,
    ev: Event,
    index: &ById,
    done: &impl Fn(usize),
    reports: &mut Vec<(PeerId, Report)>,
) {
    let Some(i) = index.get(&ev.id) else { return };
    let outcome = match ev.outcome {
        Outcome::Stored(n) => pull::Outcome::Stored(n),
        Outcome::Bad => {
            swarm
                .counters
                .verify_failures
                .fetch_add(1, Ordering::Relaxed);
            reports.push((
                ev.peer,
                Report::Fault(format!(
                    "sent bytes for chunk {} that do not match it",
                    ev.id
                )),
            ));
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
            reports.push((ev.peer, Report::Miss(format!("chunk {}", ev.id))));
        }
        Delivery::Nothing => {}
    }
}
