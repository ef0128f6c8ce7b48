//! Who reads what from the origin for the others, outside a pull's chunk scheduler: a
//! version's metadata (one of its pullers reads it, the others ask that puller) and a mount's
//! runs (each run of the version's packs is read by one of the nodes mounting it); and which
//! peers holding a version whole are asked first ([`complete_sources`]).
//!
//! One ownership scheme serves these and the pull's runs ([`crate::pull`]): rendezvous hashing
//! of a unit's key over the nodes that may read it, less those that let this node down
//! before (a fault, or something they owned and never sent). Every node that sees the same
//! nodes picks the same owner; a node leaving or failing moves only what it owned. What
//! differs is the unit (a version's root for its metadata, [`MOUNT_RUN`] bytes of a pack for a
//! mount, 32 chunks in pack order for a pull) and who may read it (pullers or mounting nodes).
//!
//! Like the rest of this crate: no clock, no socket. [`MetaFetch`] takes the time as an
//! argument and says what to do next; its driver (the node's swarm) carries it out.

use crate::{mix, owner_of, PeerKey};
use std::time::{Duration, Instant};

/// A mount's unit of origin reads: this many bytes of one pack.
pub const MOUNT_RUN: u64 = 4 << 20;

/// A node that may own a unit: its rendezvous seed and key, and whether it let this node down
/// before (then it owns nothing for this node while it stays connected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<P> {
    pub seed: u64,
    pub id: P,
    pub failed: bool,
}

/// The candidates that may own units, as (seed, key) sorted by key: those that have not
/// failed this node.
pub fn eligible<P: PeerKey>(candidates: impl IntoIterator<Item = Candidate<P>>) -> Vec<(u64, P)> {
    let mut v: Vec<(u64, P)> = candidates
        .into_iter()
        .filter(|c| !c.failed)
        .map(|c| (c.seed, c.id))
        .collect();
    v.sort_by_key(|n| n.1);
    v.dedup_by_key(|n| n.1);
    v
}

/// The node among `nodes` (seed, key) that reads the unit keyed `unit` from the origin.
///
/// # Panics
/// If `nodes` is empty.
pub fn owner<P: PeerKey>(nodes: &[(u64, P)], unit: u64) -> P {
    owner_of(nodes, mix(unit))
}

/// The key of a mount's run: the run of [`MOUNT_RUN`] bytes at `offset` in the pack whose
/// key (the first 8 bytes of its id, little-endian) is `pack`.
pub fn mount_run(pack: u64, offset: u64) -> u64 {
    pack ^ (offset / MOUNT_RUN)
}

/// Peers that hold a version whole, asked one after another for blobs outside a pull (tree
/// nodes, pack indexes, a mount's chunks) before the origin.
pub const COMPLETE_SOURCES: usize = 2;

/// Which of the peers holding a version whole to ask, in order: the nearest
/// [`COMPLETE_SOURCES`] by locality distance (0 same rack .. 3 elsewhere), ties by key so
/// that the choice is stable.
pub fn complete_sources<P: PeerKey>(holders: &[(u8, P)]) -> Vec<P> {
    let mut v = holders.to_vec();
    v.sort();
    v.into_iter()
        .take(COMPLETE_SOURCES)
        .map(|(_, p)| p)
        .collect()
}

/// Rules of [`MetaFetch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaConfig {
    /// For this long after this node starts pulling, while connected peers have not said
    /// whether they pull the version too, wait for their announcements before deciding who
    /// reads the metadata (nodes starting together hear of each other within milliseconds).
    pub settle: Duration,
    /// How often to look again while settling.
    pub settle_poll: Duration,
    /// How long to wait on the owner without receiving anything before it is counted as
    /// stalled and this node reads the rest itself (a silent or lying owner costs this once).
    pub wait: Duration,
    /// Between asks to the owner while it is still reading: from the first to the last,
    /// doubling while it has nothing new (its tree levels arrive one after another).
    pub poll: (Duration, Duration),
}

impl Default for MetaConfig {
    fn default() -> MetaConfig {
        MetaConfig {
            settle: Duration::from_millis(250),
            settle_poll: Duration::from_millis(20),
            wait: Duration::from_secs(5),
            poll: (Duration::from_millis(5), Duration::from_millis(40)),
        }
    }
}

/// What to do next for a version's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaStep<P> {
    /// Look again after this long (announcements may still come, or the owner is reading).
    Wait(Duration),
    /// Ask this puller, the owner, for what is still wanted.
    Ask(P),
    /// Read what is still wanted from the origin: this node owns the metadata, or nobody
    /// else pulls the version, or there is nothing left to want.
    Origin,
    /// The owner sent nothing for [`MetaConfig::wait`]: count it as stalled (it owns nothing
    /// for this node from now on), then read the rest from the origin.
    Stalled(P),
}

/// One node's fetch of a version's metadata while others may pull it too: one of the pullers,
/// the owner of the version's key by rendezvous, reads it from the origin and the others ask
/// it, so a cold cluster reads the metadata once rather than once per node.
#[derive(Debug, Clone)]
pub struct MetaFetch<P> {
    cfg: MetaConfig,
    me: P,
    key: u64,
    /// When this node started pulling the version.
    since: Instant,
    /// When the owner last delivered something (or the fetch began).
    heard: Instant,
    /// The next ask, not before then.
    next: Option<Instant>,
    pause: Duration,
}

impl<P: PeerKey> MetaFetch<P> {
    /// A fetch by `me` of the metadata of the version keyed `key`, which this node has been
    /// pulling since `since`; `now` is when the fetch begins.
    pub fn new(cfg: MetaConfig, me: P, key: u64, since: Instant, now: Instant) -> MetaFetch<P> {
        MetaFetch {
            cfg,
            me,
            key,
            since,
            heard: now,
            next: None,
            pause: cfg.poll.0,
        }
    }

    /// What to do next. `undecided`: some connected peer has not yet said whether it pulls the
    /// version. `pullers`: the eligible pullers of the version (see [`eligible`]), this node
    /// among them.
    pub fn poll(&mut self, now: Instant, undecided: bool, pullers: &[(u64, P)]) -> MetaStep<P> {
        if undecided && now.saturating_duration_since(self.since) < self.cfg.settle {
            return MetaStep::Wait(self.cfg.settle_poll);
        }
        if pullers.len() < 2 {
            return MetaStep::Origin;
        }
        let owner = owner(pullers, self.key);
        if owner == self.me {
            return MetaStep::Origin;
        }
        if now.saturating_duration_since(self.heard) > self.cfg.wait {
            return MetaStep::Stalled(owner);
        }
        match self.next {
            Some(next) if next > now => MetaStep::Wait(next - now),
            _ => MetaStep::Ask(owner),
        }
    }

    /// What an ask delivered (`got` blobs, verified). Something new resets the owner's quiet
    /// spell and the pause; nothing doubles the pause.
    pub fn on_answer(&mut self, now: Instant, got: usize) {
        if got > 0 {
            self.heard = now;
            self.pause = self.cfg.poll.0;
        } else {
            self.pause = (self.pause * 2).min(self.cfg.poll.1);
        }
        self.next = Some(now + self.pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[u32]) -> Vec<(u64, u32)> {
        eligible(ids.iter().map(|&id| Candidate {
            seed: mix(id as u64 + 100),
            id,
            failed: false,
        }))
    }

    /// Nodes that let this node down own nothing; the others keep what they owned.
    #[test]
    fn failed_candidates_own_nothing_and_move_only_their_units() {
        let all = nodes(&[1, 2, 3, 4, 5]);
        let without_3 = eligible(all.iter().map(|&(seed, id)| Candidate {
            seed,
            id,
            failed: id == 3,
        }));
        assert_eq!(without_3.len(), 4);
        for unit in 0..2000u64 {
            let before = owner(&all, unit);
            let after = owner(&without_3, unit);
            assert_ne!(after, 3);
            if before != 3 {
                assert_eq!(after, before, "unit {unit} moved although its owner stayed");
            }
        }
        // A mount's runs of one pack spread over the nodes.
        let owners: std::collections::HashSet<u32> = (0..64u64)
            .map(|off| owner(&all, mount_run(0xfeed, off * MOUNT_RUN)))
            .collect();
        assert!(owners.len() >= 4, "{owners:?}");
        assert_eq!(mount_run(7, MOUNT_RUN - 1), mount_run(7, 0));
    }

    /// The nearest holders first, two of them, whatever order they were listed in.
    #[test]
    fn complete_sources_are_the_nearest_two() {
        assert_eq!(
            complete_sources(&[(3, 1u32), (1, 9), (0, 7), (1, 2)]),
            vec![7, 2]
        );
        assert_eq!(complete_sources(&[(2, 5u32)]), vec![5]);
        assert!(complete_sources::<u32>(&[]).is_empty());
    }

    fn key_owned_by(pullers: &[(u64, u32)], who: u32) -> u64 {
        (0..).find(|&k| owner(pullers, k) == who).expect("some key")
    }

    /// While peers have not said whether they pull the version, wait (up to the settle
    /// time); then ask the owner, backing off while it has nothing new.
    #[test]
    fn metadata_waits_to_settle_then_asks_the_owner_with_backoff() {
        let cfg = MetaConfig::default();
        let t0 = Instant::now();
        let pullers = nodes(&[1, 2, 3]);
        let key = key_owned_by(&pullers, 2);
        let mut m = MetaFetch::new(cfg, 1u32, key, t0, t0);
        assert_eq!(m.poll(t0, true, &pullers), MetaStep::Wait(cfg.settle_poll));
        // Past the settle time, undecided peers no longer hold it up.
        let t = t0 + cfg.settle + Duration::from_millis(1);
        assert_eq!(m.poll(t, true, &pullers), MetaStep::Ask(2));
        m.on_answer(t, 0);
        assert_eq!(m.poll(t, false, &pullers), MetaStep::Wait(cfg.poll.0 * 2));
        let mut now = t;
        let mut pauses = Vec::new();
        for _ in 0..5 {
            m.on_answer(now, 0);
            match m.poll(now, false, &pullers) {
                MetaStep::Wait(d) => {
                    pauses.push(d);
                    now += d;
                }
                other => panic!("expected a wait, got {other:?}"),
            }
            assert_eq!(m.poll(now, false, &pullers), MetaStep::Ask(2));
        }
        assert_eq!(*pauses.last().unwrap(), cfg.poll.1, "{pauses:?}");
        // Something new: back to the shortest pause.
        m.on_answer(now, 3);
        assert_eq!(m.poll(now, false, &pullers), MetaStep::Wait(cfg.poll.0));
    }

    /// The owner reads from the origin itself; so does a node pulling alone.
    #[test]
    fn the_owner_and_a_lone_puller_read_the_origin() {
        let t0 = Instant::now();
        let pullers = nodes(&[1, 2, 3]);
        let key = key_owned_by(&pullers, 1);
        let mut m = MetaFetch::new(MetaConfig::default(), 1u32, key, t0, t0);
        assert_eq!(m.poll(t0, false, &pullers), MetaStep::Origin);
        let alone = nodes(&[2]);
        let mut m = MetaFetch::new(MetaConfig::default(), 2u32, key, t0, t0);
        assert_eq!(m.poll(t0, false, &alone), MetaStep::Origin);
    }

    /// An owner that sends nothing for the quiet spell is given up on, once: counted as
    /// stalled, it is no longer eligible, and the next owner (or the origin) takes over.
    #[test]
    fn a_silent_owner_costs_one_quiet_spell() {
        let cfg = MetaConfig::default();
        let t0 = Instant::now();
        let pullers = nodes(&[1, 2, 3]);
        let key = key_owned_by(&pullers, 3);
        let mut m = MetaFetch::new(cfg, 1u32, key, t0, t0);
        let mut now = t0;
        let mut asks = 0;
        let stalled = loop {
            match m.poll(now, false, &pullers) {
                MetaStep::Ask(p) => {
                    assert_eq!(p, 3);
                    asks += 1;
                    now += Duration::from_millis(1);
                    m.on_answer(now, 0);
                }
                MetaStep::Wait(d) => now += d,
                MetaStep::Stalled(p) => break p,
                MetaStep::Origin => panic!("gave up without counting the owner"),
            }
        };
        assert_eq!(stalled, 3);
        let spent = now - t0;
        assert!(
            spent > cfg.wait && spent < cfg.wait + cfg.poll.1 * 2,
            "{spent:?}"
        );
        assert!(asks > 100, "{asks} asks in the quiet spell");
        // The driver counts it; the owner is then someone else.
        let rest = eligible(pullers.iter().map(|&(seed, id)| Candidate {
            seed,
            id,
            failed: id == 3,
        }));
        let mut m = MetaFetch::new(cfg, 1u32, key, t0, now);
        assert_ne!(m.poll(now, false, &rest), MetaStep::Ask(3));
    }
}
