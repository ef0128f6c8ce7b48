//! Who pulls and who holds each version, beyond the peers this node is connected to: the
//! content routing of the swarm.
//!
//! A pull needs two things from the rest of the fleet: its origin readers (the first
//! [`shoal_sched::Config::origin_readers`] pullers in an order every node must agree on, so
//! that each run is read from the origin once), and, when none of its neighbours has the
//! version, some node that does. Neither needs a list of every puller or holder: only the
//! first few. So each node keeps, per version, a *roster*: the first [`ROSTER`] pullers and
//! the first [`ROSTER`] holders, each with where it listens and how old the news of it is.
//! Pullers come in order of when they started their pull, as each said of itself (ties,
//! such as nodes started together, by rendezvous rank on the version's key); holders by rank.
//! The start time is data each node sends about itself, carried verbatim, so every node sorts
//! the same way whatever its clock: a puller that starts later never takes over runs an
//! earlier reader may already have read (the simulator's staggered starts: origin egress
//! 1.37x by rank, 1.11x by start, docs/benchmarks.md). Nodes list themselves, and send their
//! rosters to their peers when they change (and every [`REFRESH`] to keep them alive); a node
//! merges what it hears, keeps the first, and forwards its roster when that changed. Merging
//! keeps the first in that order, so every connected node ends with the same roster within a
//! few hops' round trips; the age travels with each entry, so an entry whose node stopped
//! listing itself (it died, or finished pulling) expires [`TTL`] after its last word
//! everywhere at once.
//!
//! Why not a DHT of provider records: a Kademlia lookup returns providers in no useful order,
//! capped per record (20 by default), so nodes would not agree on the readers; storing every
//! puller per version costs O(pullers) at a few nodes. A roster is O([`ROSTER`]) per version
//! at every node, exactly what the scheduler uses, and travels only over admitted control
//! connections (an outsider learns nothing). Cost: per version and per peer, one message of
//! at most 2 x [`ROSTER`] entries per change or per [`REFRESH`].
//!
//! A hostile member can list nodes that do not exist, started first (or ranked first): they
//! become readers that never read, which the scheduler judges dead after a quiet spell with no
//! sign of life and replaces by the next in line (`shoal_sched::Pull`, `reader_since`). Ranks
//! are worked out here from peer ids, never taken from the sender.

use super::Holding;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use shoal_registry::Hash;
use shoal_sched::{mix, Puller};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Pullers (and, apart, holders) kept per version: the origin readers and some spares, so a
/// reader that fails has a successor everyone knows.
pub const ROSTER: usize = shoal_sched::pull::ORIGIN_READERS + shoal_sched::pull::SPARE_READERS;
/// How long an entry lives after its node last listed itself. A reader that dies among a
/// node's peers is dropped at once (its connection closes); one elsewhere in the fleet has its
/// runs taken over by the scheduler after its quiet spell (seconds) long before this.
pub const TTL: Duration = Duration::from_secs(30);
/// How often a node lists itself and sends its rosters even when nothing changed: every
/// roster to every peer, so this sets the control traffic of rosters (at most 2 x [`ROSTER`]
/// entries of ~130 bytes per version and peer: 4.2 KB).
pub const REFRESH: Duration = Duration::from_secs(10);
/// Versions whose rosters are kept (the most recently heard of).
pub const MAX_VERSIONS: usize = 256;
/// Addresses kept per entry.
const MAX_ADDRS: usize = 2;

/// One entry as it travels: a node, how it holds the version, where it listens, how long
/// ago it last listed itself (as the sender saw it), and when it started pulling (milliseconds
/// since the Unix epoch, as the node itself said; 0 for holders, and from nodes that did not
/// say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub peer: Vec<u8>,
    pub holding: Holding,
    pub addrs: Vec<String>,
    pub age_ms: u32,
    #[serde(default)]
    pub started_ms: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    peer: PeerId,
    /// Its place: earlier start first, then higher rank.
    started: u64,
    rank: u64,
    holding: Holding,
    addrs: Vec<Multiaddr>,
    expires: Instant,
}

/// A peer's rendezvous seed (the first 8 bytes of the BLAKE3 of its id), as the scheduler
/// takes it.
pub fn peer_seed(p: &PeerId) -> u64 {
    let h = blake3::hash(&p.to_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// A version's rendezvous key (the first 8 bytes of its root).
pub fn key_of(h: &Hash) -> u64 {
    u64::from_le_bytes(h.0[..8].try_into().expect("8 bytes"))
}

/// A node's rank for a version: rendezvous on the version's key, the order the scheduler
/// chooses origin readers in (highest first).
pub fn rank(peer: &PeerId, root: &Hash) -> u64 {
    mix(peer_seed(peer) ^ key_of(root))
}

/// An entry's place in its list, first first.
fn place(started: u64, rank: u64) -> (u64, std::cmp::Reverse<u64>) {
    (started, std::cmp::Reverse(rank))
}

/// Pullers or holders of a class: ranked first first.
fn class(h: Holding) -> Option<usize> {
    match h {
        Holding::Pulling => Some(0),
        Holding::Complete => Some(1),
        Holding::Mounted => None,
    }
}

#[derive(Debug, Default)]
struct Roster {
    /// [pullers, holders], each at most [`ROSTER`], first first (see [`place`]).
    lists: [Vec<Entry>; 2],
    /// When it was last heard of (which versions to drop first).
    touched: Option<Instant>,
}

/// Every version's roster at this node.
#[derive(Debug, Default)]
pub struct Rosters {
    versions: HashMap<Hash, Roster>,
    /// Versions whose roster changed since [`Rosters::take_changed`].
    changed: HashSet<Hash>,
}

impl Rosters {
    /// Adds or refreshes `peer` as holding `root` the way it says, news `age` old at `now`,
    /// having started pulling at `started` (Unix milliseconds; ignored for holders); returns
    /// whether the roster changed (a new entry among the first, a holding or start changed).
    /// A node is in one list per version: news of it as a holder removes it as a puller, and
    /// the other way round, unless the news is older than what is kept.
    #[allow(clippy::too_many_arguments)]
    pub fn merge(
        &mut self,
        root: Hash,
        peer: PeerId,
        holding: Holding,
        addrs: Vec<Multiaddr>,
        age: Duration,
        started: u64,
        now: Instant,
    ) -> bool {
        let Some(c) = class(holding) else {
            return false;
        };
        let started = if c == 0 { started } else { 0 };
        if age >= TTL {
            return false;
        }
        let expires = now + (TTL - age);
        if !self.versions.contains_key(&root) && self.versions.len() >= MAX_VERSIONS {
            // Full: the version heard of longest ago goes.
            let oldest = self
                .versions
                .iter()
                .min_by_key(|(_, r)| r.touched)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.versions.remove(&k);
            }
        }
        let r = self.versions.entry(root).or_default();
        r.touched = Some(now);
        let rank = rank(&peer, &root);
        // Newer news of it in the other list moves it here; older news is ignored.
        let other = &mut r.lists[1 - c];
        if let Some(i) = other.iter().position(|e| e.peer == peer) {
            if other[i].expires >= expires {
                return false;
            }
            other.remove(i);
        }
        let list = &mut r.lists[c];
        let mut addrs = addrs;
        addrs.truncate(MAX_ADDRS);
        // Newer news of another start (the node restarted its pull): it takes its new place.
        if let Some(i) = list
            .iter()
            .position(|e| e.peer == peer && e.started != started && e.expires < expires)
        {
            list.remove(i);
            self.changed.insert(root);
        }
        let me = place(started, rank);
        let changed = match list.iter_mut().find(|e| e.peer == peer) {
            Some(e) => {
                if e.expires < expires {
                    e.expires = expires;
                    if !addrs.is_empty() {
                        e.addrs = addrs;
                    }
                }
                e.holding != holding
            }
            None => {
                if list.len() >= ROSTER
                    && list.last().is_some_and(|e| place(e.started, e.rank) <= me)
                {
                    return false;
                }
                let at = list.partition_point(|e| place(e.started, e.rank) < me);
                list.insert(
                    at,
                    Entry {
                        peer,
                        started,
                        rank,
                        holding,
                        addrs,
                        expires,
                    },
                );
                list.truncate(ROSTER);
                true
            }
        };
        if changed {
            self.changed.insert(root);
        }
        changed
    }

    /// Takes what a peer sent: its roster of `root`, less the nodes `admit` refuses.
    /// Returns whether ours changed.
    pub fn merge_listings(
        &mut self,
        root: Hash,
        listings: &[Listing],
        admit: impl Fn(&PeerId) -> bool,
        now: Instant,
    ) -> bool {
        let mut changed = false;
        for l in listings.iter().take(2 * ROSTER) {
            let Ok(peer) = PeerId::from_bytes(&l.peer) else {
                continue;
            };
            if !admit(&peer) {
                continue;
            }
            let addrs = l
                .addrs
                .iter()
                .take(MAX_ADDRS)
                .filter_map(|a| a.parse().ok())
                .collect();
            let age = Duration::from_millis(l.age_ms as u64);
            changed |= self.merge(root, peer, l.holding, addrs, age, l.started_ms, now);
        }
        changed
    }

    /// Drops entries whose news is [`TTL`] old, and rosters left empty.
    pub fn expire(&mut self, now: Instant) {
        let mut gone = Vec::new();
        for (root, r) in self.versions.iter_mut() {
            let before = r.lists[0].len() + r.lists[1].len();
            for l in r.lists.iter_mut() {
                l.retain(|e| e.expires > now);
            }
            let after = r.lists[0].len() + r.lists[1].len();
            if after == 0 {
                gone.push(*root);
            } else if after != before {
                self.changed.insert(*root);
            }
        }
        for root in gone {
            self.versions.remove(&root);
            self.changed.remove(&root);
        }
    }

    /// `root`'s roster as it travels (ages as of `now`).
    pub fn listings(&self, root: &Hash, now: Instant) -> Vec<Listing> {
        let Some(r) = self.versions.get(root) else {
            return Vec::new();
        };
        r.lists
            .iter()
            .flatten()
            .filter(|e| e.expires > now)
            .map(|e| Listing {
                peer: e.peer.to_bytes(),
                holding: e.holding,
                addrs: e.addrs.iter().map(|a| a.to_string()).collect(),
                age_ms: (TTL - e.expires.duration_since(now)).as_millis() as u32,
                started_ms: e.started,
            })
            .collect()
    }

    /// Every version with a roster.
    pub fn versions(&self) -> Vec<Hash> {
        self.versions.keys().copied().collect()
    }

    /// Versions whose roster changed since the last call.
    pub fn take_changed(&mut self) -> Vec<Hash> {
        self.changed.drain().collect()
    }

    /// The pullers of `root` listed, first first, with when each said it started, for the
    /// scheduler's choice of origin readers and of where their runs begin
    /// (`shoal_sched::pull::Config::readers_in_order`, `origin_pace`).
    pub fn pullers(&self, root: &Hash) -> Vec<Puller<PeerId>> {
        self.versions
            .get(root)
            .map(|r| {
                r.lists[0]
                    .iter()
                    .map(|e| Puller {
                        seed: peer_seed(&e.peer),
                        id: e.peer,
                        started_ms: e.started,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The nodes listed for `root` (holders first), with where they listen.
    pub fn nodes(&self, root: &Hash) -> Vec<(PeerId, Holding, Vec<Multiaddr>)> {
        self.versions
            .get(root)
            .map(|r| {
                r.lists[1]
                    .iter()
                    .chain(&r.lists[0])
                    .map(|e| (e.peer, e.holding, e.addrs.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    /// The first [`ROSTER`] of `peers` by rank for `root`.
    fn first_by_rank(peers: &[PeerId], root: &Hash) -> Vec<PeerId> {
        let mut ranked = peers.to_vec();
        ranked.sort_by_key(|p| std::cmp::Reverse(rank(p, root)));
        ranked.truncate(ROSTER);
        ranked
    }

    fn all(_: &PeerId) -> bool {
        true
    }

    /// Nodes that hear the same entries in any order, through any number of hops, end with
    /// the same roster: the first [`ROSTER`] by rank.
    #[test]
    fn rosters_converge_on_the_first_by_rank_whatever_the_order() {
        let root = Hash([3; 32]);
        let peers = ids(100);
        let now = Instant::now();
        let mut a = Rosters::default();
        let mut b = Rosters::default();
        for p in &peers {
            a.merge(root, *p, Holding::Pulling, vec![], Duration::ZERO, 0, now);
        }
        // b hears them in reverse, half of them from a's roster.
        for p in peers.iter().rev().take(50) {
            b.merge(root, *p, Holding::Pulling, vec![], Duration::ZERO, 0, now);
        }
        b.merge_listings(root, &a.listings(&root, now), all, now);
        let want = first_by_rank(&peers, &root);
        let got = |r: &Rosters| r.pullers(&root).iter().map(|x| x.id).collect::<Vec<_>>();
        assert_eq!(got(&a), want);
        assert_eq!(got(&b), want);
    }

    /// Pullers come in the order they started, as each said, whatever order the news came
    /// in: every node lists the same first pullers, a later starter never displaces an
    /// earlier one (so it never becomes a reader in its place), ties go by rank, holders by
    /// rank alone, and a node that restarts its pull takes its new place.
    #[test]
    fn pullers_line_up_in_the_order_they_started() {
        let root = Hash([5; 32]);
        let peers = ids(ROSTER + 24);
        let now = Instant::now();
        // Started 10 ms apart, the last four together.
        let started = |i: usize| 1_000 + 10 * i.min(ROSTER + 20) as u64;
        let add = |r: &mut Rosters, p: PeerId, h: Holding, at: u64, t: Instant| {
            r.merge(root, p, h, vec![], Duration::ZERO, at, t)
        };
        let mut a = Rosters::default();
        let mut b = Rosters::default();
        for (i, p) in peers.iter().enumerate() {
            add(&mut a, *p, Holding::Pulling, started(i), now);
        }
        for (i, p) in peers.iter().enumerate().rev().take(ROSTER + 14) {
            add(&mut b, *p, Holding::Pulling, started(i), now);
        }
        b.merge_listings(root, &a.listings(&root, now), all, now);
        let got = |r: &Rosters| r.pullers(&root).iter().map(|x| x.id).collect::<Vec<_>>();
        assert_eq!(got(&a), peers[..ROSTER].to_vec());
        assert_eq!(got(&b), got(&a));
        // A latecomer is not listed; one that started with others goes by rank among them.
        assert!(!add(&mut a, PeerId::random(), Holding::Pulling, 5_000, now));
        let mut c = Rosters::default();
        let tied = &peers[ROSTER + 20..];
        for p in tied {
            add(&mut c, *p, Holding::Pulling, started(ROSTER + 20), now);
        }
        let mut by_rank = tied.to_vec();
        by_rank.sort_by_key(|p| std::cmp::Reverse(rank(p, &root)));
        assert_eq!(got(&c), by_rank);
        // The first restarts its pull: newer news, a later start, a later place.
        let later = now + Duration::from_secs(1);
        let between = started(ROSTER - 1) + 5;
        assert!(add(&mut a, peers[0], Holding::Pulling, between, later));
        assert_eq!(got(&a)[..ROSTER - 1], peers[1..ROSTER]);
        assert_eq!(got(&a)[ROSTER - 1], peers[0]);
        // Holders go by rank, whatever start they claim.
        let mut h = Rosters::default();
        for (i, p) in peers.iter().enumerate() {
            add(&mut h, *p, Holding::Complete, started(i), now);
        }
        let holders: Vec<PeerId> = h.nodes(&root).iter().map(|n| n.0).collect();
        assert_eq!(holders, first_by_rank(&peers, &root));
    }

    /// News ages as it travels: an entry whose node stops listing itself expires everywhere
    /// [`TTL`] after its last word, however often it is forwarded.
    #[test]
    fn entries_expire_after_their_nodes_last_word() {
        let root = Hash([4; 32]);
        let p = PeerId::random();
        let t0 = Instant::now();
        let mut a = Rosters::default();
        a.merge(root, p, Holding::Pulling, vec![], Duration::ZERO, 0, t0);
        let mut b = Rosters::default();
        // Forwarded back and forth every second, the age goes with it.
        for s in 1..=(TTL.as_secs() + 2) {
            let t = t0 + Duration::from_secs(s);
            b.merge_listings(root, &a.listings(&root, t), all, t);
            a.merge_listings(root, &b.listings(&root, t), all, t);
            a.expire(t);
            b.expire(t);
            let alive = !b.pullers(&root).is_empty();
            assert_eq!(alive, Duration::from_secs(s) < TTL, "second {s}");
        }
        assert!(a.versions().is_empty() && b.versions().is_empty());
    }

    /// A node that finished pulling moves from the pullers to the holders (newer news wins,
    /// older news of it as a puller does not move it back).
    #[test]
    fn a_finished_puller_becomes_a_holder() {
        let root = Hash([5; 32]);
        let p = PeerId::random();
        let t = Instant::now();
        let mut r = Rosters::default();
        r.merge(
            root,
            p,
            Holding::Pulling,
            vec![],
            Duration::from_secs(1),
            0,
            t,
        );
        assert!(r.merge(root, p, Holding::Complete, vec![], Duration::ZERO, 0, t));
        assert!(r.pullers(&root).is_empty());
        assert!(!r.merge(
            root,
            p,
            Holding::Pulling,
            vec![],
            Duration::from_secs(2),
            0,
            t
        ));
        assert_eq!(r.nodes(&root)[0].1, Holding::Complete);
        // Mounts are not listed.
        assert!(!r.merge(
            root,
            PeerId::random(),
            Holding::Mounted,
            vec![],
            Duration::ZERO,
            0,
            t
        ));
    }

    /// Gossip over a fleet: 500 nodes, each connected to 8 random others, every node pulling
    /// and listing itself; in rounds, each sends its roster to its neighbours (what a change
    /// triggers). Every node holds the fleet's first [`ROSTER`] pullers by rank within a few
    /// rounds (hops), though none is connected to most of them.
    #[test]
    fn a_fleet_agrees_on_its_roster_within_a_few_hops() {
        let n = 500;
        let root = Hash([8; 32]);
        let t = Instant::now();
        let peers = ids(n);
        let mut nodes: Vec<Rosters> = (0..n).map(|_| Rosters::default()).collect();
        for (i, r) in nodes.iter_mut().enumerate() {
            r.merge(
                root,
                peers[i],
                Holding::Pulling,
                vec![],
                Duration::ZERO,
                0,
                t,
            );
        }
        // A random graph: each node dials 8 others (links both ways).
        let mut links: Vec<Vec<usize>> = vec![Vec::new(); n];
        for i in 0..n {
            for k in 0..8u64 {
                let j = (mix((i as u64) << 8 | k) % n as u64) as usize;
                if j != i && !links[i].contains(&j) {
                    links[i].push(j);
                    links[j].push(i);
                }
            }
        }
        let want = first_by_rank(&peers, &root);
        let agreed = |nodes: &[Rosters]| {
            nodes
                .iter()
                .all(|r| r.pullers(&root).iter().map(|x| x.id).collect::<Vec<_>>() == want)
        };
        let mut rounds = 0;
        while !agreed(&nodes) {
            rounds += 1;
            assert!(rounds <= 8, "no agreement after {rounds} rounds");
            let sent: Vec<Vec<Listing>> = nodes.iter().map(|r| r.listings(&root, t)).collect();
            for (i, r) in nodes.iter_mut().enumerate() {
                for &j in &links[i] {
                    r.merge_listings(root, &sent[j], all, t);
                }
            }
        }
        eprintln!("500 nodes with 8+ links each agree after {rounds} rounds");
        assert!(rounds >= 2, "most nodes are not next to the first by rank");
    }

    /// Bounded: at most [`ROSTER`] per list and [`MAX_VERSIONS`] versions, whatever is sent.
    #[test]
    fn rosters_are_bounded() {
        let t = Instant::now();
        let mut r = Rosters::default();
        for v in 0..(MAX_VERSIONS + 10) {
            let mut root = [0u8; 32];
            root[..8].copy_from_slice(&(v as u64).to_le_bytes());
            for p in ids(3) {
                r.merge(
                    Hash(root),
                    p,
                    Holding::Complete,
                    vec![],
                    Duration::ZERO,
                    0,
                    t,
                );
            }
        }
        assert_eq!(r.versions().len(), MAX_VERSIONS);
        let root = Hash([9; 32]);
        let flood: Vec<Listing> = ids(500)
            .iter()
            .map(|p| Listing {
                peer: p.to_bytes(),
                holding: Holding::Pulling,
                addrs: vec!["/ip4/10.0.0.1/tcp/1".into(); 50],
                age_ms: 0,
                started_ms: 0,
            })
            .collect();
        r.merge_listings(root, &flood, all, t);
        assert_eq!(r.pullers(&root).len(), ROSTER);
        assert!(r.nodes(&root).iter().all(|n| n.2.len() <= MAX_ADDRS));
    }
}
