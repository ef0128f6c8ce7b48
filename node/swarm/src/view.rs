//! What the peer table says to a pull's scheduler (`shoal_sched::Pull`): the sources that hold
//! the version, their have-maps and the deltas since, the version's pullers across the fleet
//! (from the rosters, which the event loop owns too).
//!
//! The table is the event loop's: a pull asks it, with a bounded command and a reply channel,
//! for what changed since its last ask ([`Ask`] carries where the pull is), and the loop
//! answers from its own state ([`answer`]), copying only what the pull has not seen.

use crate::roster::peer_seed;
use crate::{Cmd, Holding, PeerId, PeerVersion, Swarm, Table};
use shoal_registry::Hash;
use shoal_sched::pull::{self, Pull, Source};
use shoal_sched::HaveMap;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::oneshot;

/// A pull waits at most this long for the event loop's answer (it goes on with what it
/// had; a loop that slow has bigger problems, logged).
const WAIT: Duration = Duration::from_secs(5);

/// Per source: the have-map generation and freshness the pull was given, and how much of the
/// deltas logged since.
type Given = HashMap<PeerId, (u64, bool, usize)>;

/// A pull's question to the event loop.
#[derive(Debug)]
pub(crate) struct Ask {
    root: Hash,
    /// The version's chunks (a map of another length is another version's index space).
    n: usize,
    given: Given,
}

/// What changed in a source's have-map since the pull last asked.
#[derive(Debug)]
enum Have {
    Same,
    /// Chunks it gained, by delta.
    Gained(Vec<usize>),
    /// A new map (none: not known yet), and whether it came over the current connection.
    Map(Option<HaveMap>, bool),
}

/// The event loop's answer.
#[derive(Debug)]
pub(crate) struct Answer {
    /// The version's first pullers across the fleet by rank, with their rendezvous seeds (all
    /// the scheduler needs to agree with every other node on the origin readers).
    pullers: Vec<shoal_sched::Puller<PeerId>>,
    connected: usize,
    sources: Vec<(PeerId, Source, Have)>,
    given: Given,
}

/// Answers a pull from the peer table and the have-maps the event loop keeps.
pub(crate) fn answer(
    table: &Table,
    maps: &HashMap<PeerId, HashMap<Hash, PeerVersion>>,
    rosters: &crate::roster::Rosters,
    me: &crate::Labels,
    ask: Ask,
) -> Answer {
    let Ask { root, n, given } = ask;
    let mut out = Answer {
        pullers: rosters.pullers(&root),
        connected: table.peers.values().filter(|p| p.connected).count(),
        sources: Vec::new(),
        given: HashMap::new(),
    };
    for (id, p, holding) in table.holders(&root) {
        let Some(v) = maps.get(id).and_then(|m| m.get(&root)) else {
            continue;
        };
        let source = Source {
            seed: peer_seed(id),
            distance: me.distance(&p.labels),
            holding: match holding {
                Holding::Complete => pull::Holding::Complete,
                Holding::Pulling => pull::Holding::Pulling,
                Holding::Mounted => pull::Holding::Mounted,
            },
            rate: p.throughput,
            rtt: p.rtt.map(|d| d.as_secs_f64()).unwrap_or(0.001),
            grew: v.grew,
            faults: p.faults,
        };
        let have = match given.get(id) {
            Some(&(gen, fresh, pos)) if (gen, fresh) == (v.gen, v.fresh) => {
                out.given.insert(*id, (gen, fresh, v.log.len()));
                match v.log.get(pos..) {
                    Some(new) if !new.is_empty() => {
                        Have::Gained(new.iter().map(|&i| i as usize).collect())
                    }
                    _ => Have::Same,
                }
            }
            _ => {
                out.given.insert(*id, (v.gen, v.fresh, v.log.len()));
                Have::Map(v.have.clone().filter(|h| h.len as usize == n), v.fresh)
            }
        };
        out.sources.push((*id, source, have));
    }
    out
}

/// A pull scheduler's view of the peer table, and what of it was last handed over: the
/// pull's driver calls [`PullView::run`] at every wake-up.
#[derive(Debug, Default)]
pub struct PullView {
    given: Given,
}

impl PullView {
    /// Hands the scheduler what changed in the peer table since the last call: sources
    /// that came or left, have-maps that were replaced, chunks gained by delta.
    ///
    /// Cancel-safe: a cancelled call hands over nothing, and the next one hands over every
    /// source's whole map again.
    pub async fn run(&mut self, swarm: &Swarm, root: &Hash, n: usize, sched: &mut Pull<PeerId>) {
        let (tx, rx) = oneshot::channel();
        let ask = Ask {
            root: *root,
            n,
            given: std::mem::take(&mut self.given),
        };
        let asked = async {
            swarm.cmd.send(Cmd::View(ask, tx)).await.ok()?;
            rx.await.ok()
        };
        let answer = match tokio::time::timeout(WAIT, asked).await {
            Ok(Some(a)) => a,
            Ok(None) => return, // the event loop is gone: the swarm is shutting down
            Err(_) => {
                tracing::warn!("the swarm's event loop did not answer a pull in {WAIT:?}");
                return;
            }
        };
        sched.set_pullers(Some(answer.pullers));
        sched.set_connected(answer.connected);
        for (id, source, have) in answer.sources {
            sched.set_source(id, source);
            match have {
                Have::Same => {}
                Have::Gained(chunks) => sched.on_have(id, &chunks),
                Have::Map(map, fresh) => sched.set_have(id, map, fresh),
            }
        }
        let gone: Vec<PeerId> = sched
            .sources()
            .filter(|p| !answer.given.contains_key(p))
            .copied()
            .collect();
        for p in gone {
            sched.remove_source(&p);
        }
        self.given = answer.given;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Labels, Peer};
    use std::sync::Arc;
    use std::time::Instant;

    fn ask(root: Hash, given: Given) -> Ask {
        Ask {
            root,
            n: 100,
            given,
        }
    }

    /// A pull is handed each source's whole map once, then only what the peer gained since,
    /// a new map when one replaced it, and nothing of peers it may not ask.
    #[test]
    fn a_pull_is_handed_only_what_it_has_not_seen() {
        let root = Hash([7; 32]);
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut table = Table::default();
        for id in [a, b] {
            let mut p = Peer::new();
            p.connected = true;
            p.bulk_port = Some(1);
            p.versions = Arc::new([(root, Holding::Pulling)].into_iter().collect());
            table.peers.insert(id, Arc::new(p));
        }
        table.admitted.insert(a); // b has not proved the cluster key
        let now = Instant::now();
        let mut v = PeerVersion::new(now);
        v.have = Some(HaveMap::new(100));
        v.stream = Some((1, 0));
        let mut maps: HashMap<PeerId, HashMap<Hash, PeerVersion>> = HashMap::new();
        maps.insert(a, [(root, v.clone())].into_iter().collect());
        maps.insert(b, [(root, v)].into_iter().collect());
        let rosters = crate::roster::Rosters::default();
        let me = Labels::default();

        let first = answer(&table, &maps, &rosters, &me, ask(root, Given::new()));
        assert_eq!(first.sources.len(), 1, "only the admitted peer: {first:?}");
        assert!(
            matches!(&first.sources[0], (id, _, Have::Map(Some(m), false)) if *id == a && m.len == 100)
        );

        let again = answer(&table, &maps, &rosters, &me, ask(root, first.given));
        assert!(matches!(again.sources[0].2, Have::Same), "{again:?}");

        let pv = maps.get_mut(&a).unwrap().get_mut(&root).unwrap();
        assert!(pv.apply(1, 0, &[3, 9], now));
        let gained = answer(&table, &maps, &rosters, &me, ask(root, again.given));
        assert!(
            matches!(&gained.sources[0].2, Have::Gained(c) if c == &vec![3, 9]),
            "{gained:?}"
        );

        // A map of the whole version again (a fresh one, over this connection).
        let pv = maps.get_mut(&a).unwrap().get_mut(&root).unwrap();
        pv.gen += 1;
        pv.fresh = true;
        pv.log.clear();
        let replaced = answer(&table, &maps, &rosters, &me, ask(root, gained.given));
        assert!(
            matches!(replaced.sources[0].2, Have::Map(Some(_), true)),
            "{replaced:?}"
        );

        // A map of another length is another version's index space: no map.
        let other = answer(
            &table,
            &maps,
            &rosters,
            &me,
            Ask {
                root,
                n: 50,
                given: Given::new(),
            },
        );
        assert!(
            matches!(other.sources[0].2, Have::Map(None, true)),
            "{other:?}"
        );
    }
}
