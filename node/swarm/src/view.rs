//! What the peer table says to a pull's scheduler (`shoal_sched::Pull`): the sources that hold
//! the version, their have-maps and the deltas since, the version's pullers across the fleet.

use crate::roster::peer_seed;
use crate::{Holding, PeerId, Swarm};
use shoal_registry::Hash;
use shoal_sched::pull::{self, Pull, Source};
use std::collections::HashMap;

/// A pull scheduler's view of the peer table, and what of it was last handed over: the
/// pull's driver calls [`PullView::run`] at every wake-up, and only the swarm reads the table.
#[derive(Debug, Default)]
pub struct PullView {
    seeds: HashMap<PeerId, u64>,
    /// Per source: the have-map generation and freshness given to the scheduler, and how
    /// much of the deltas logged since.
    given: HashMap<PeerId, (u64, bool, usize)>,
}

impl PullView {
    /// Hands the scheduler what changed in the peer table since the last call: sources
    /// that came or left, and have-maps that were replaced.
    pub fn run(&mut self, swarm: &Swarm, root: &Hash, n: usize, sched: &mut Pull<PeerId>) {
        // The version's pullers across the fleet (the first few by rank: all the scheduler
        // needs to agree with every other node on the origin readers).
        let pullers = swarm.pullers(root);
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
