//! Shoal's swarm scheduler, sans I/O: it decides which source serves which chunk of a
//! version ([`pull`]), and who reads a version's metadata and a mount's runs from the origin
//! for the others ([`owners`]), and does nothing else.
//!
//! quinn-proto is the model. A scheduler is a plain value; its driver (the node's swarm, or
//! the simulator in `testnet/`) feeds it what happened (which sources there are and what they
//! hold, which chunks arrived, failed or came back "not here") together with the time, takes
//! the [`pull::Action`]s it returns and carries them out, and wakes it again no later than
//! [`pull::Pull::poll_timeout`]. Nothing here reads a clock, opens a socket or spawns a task,
//! so every decision can be tested, and a fleet simulated, in virtual time.
//!
//! Peers are any `Copy + Ord + Hash` key (libp2p's `PeerId` in the node, a number in the
//! simulator); each comes with a seed for rendezvous hashing, so both agree on who owns what.

pub mod origins;
pub mod owners;
pub mod pull;
pub mod uplink;

pub use pull::{Action, Chunks, Config, Holding, Outcome, Pull, Puller, Source};

use serde::{Deserialize, Serialize};

/// A peer key: what identifies a source to its driver.
pub trait PeerKey: Copy + Eq + Ord + std::hash::Hash + std::fmt::Debug {}
impl<T: Copy + Eq + Ord + std::hash::Hash + std::fmt::Debug> PeerKey for T {}

/// A bitmap over a version's unique chunks in walk order (the index space of a pull).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveMap {
    pub len: u32,
    pub words: Vec<u64>,
}

impl HaveMap {
    pub fn new(len: usize) -> HaveMap {
        HaveMap {
            len: len as u32,
            words: vec![0; len.div_ceil(64)],
        }
    }
    pub fn set(&mut self, i: usize) {
        self.words[i / 64] |= 1 << (i % 64);
    }
    pub fn clear(&mut self, i: usize) {
        if let Some(w) = self.words.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
    }
    pub fn get(&self, i: usize) -> bool {
        self.words
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
}

/// splitmix64's finaliser: spreads a key over 64 bits.
pub fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

/// Rendezvous hashing: the node among `nodes` (seed, key) that owns `k`. Every node that sees
/// the same set picks the same owner, and a node leaving moves only the keys it owned.
///
/// # Panics
/// If `nodes` is empty.
pub fn owner_of<P: PeerKey>(nodes: &[(u64, P)], k: u64) -> P {
    nodes
        .iter()
        .max_by_key(|(seed, _)| mix(seed ^ k))
        .map(|(_, p)| *p)
        .expect("at least this node")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn have_map_bits() {
        let mut h = HaveMap::new(130);
        assert_eq!(h.words.len(), 3);
        h.set(0);
        h.set(129);
        assert!(h.get(0) && h.get(129) && !h.get(64));
        assert_eq!(h.count(), 2);
        h.clear(0);
        h.clear(10_000); // out of range: ignored
        assert!(!h.get(0) && !h.get(10_000));
        assert_eq!(h.count(), 1);
    }

    /// A departing node moves only its own keys; the rest keep their owner.
    #[test]
    fn rendezvous_moves_only_the_leavers_keys() {
        let nodes: Vec<(u64, u32)> = (0..8u32).map(|i| (mix(i as u64 + 1), i)).collect();
        let before: Vec<u32> = (0..1000u64).map(|k| owner_of(&nodes, mix(k))).collect();
        let fewer: Vec<(u64, u32)> = nodes.iter().copied().filter(|n| n.1 != 3).collect();
        for (k, &was) in before.iter().enumerate() {
            let now = owner_of(&fewer, mix(k as u64));
            if was != 3 {
                assert_eq!(now, was, "key {k} moved although its owner stayed");
            }
        }
        // Spread: every node owns some keys.
        for n in 0..8 {
            assert!(before.iter().filter(|&&o| o == n).count() > 60);
        }
    }
}
