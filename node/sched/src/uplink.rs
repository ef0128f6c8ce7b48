//! Who this node's uplink serves next: the peers furthest behind first.
//!
//! A node serving several peers at once shares its uplink among them. Shared evenly (the
//! kernel's way with one TCP connection per peer), a peer with fewer sources than the others
//! gets less than its downlink from each and falls behind for good: with a node's link as
//! fast as the origin's, it can never catch up, and holding less than its neighbours it has
//! nothing they want, so its own uplink idles. Serving the peer that lacks most first keeps
//! the fleet together (`shoal-bench sim --nodes 64 --zones 3`, 8 peers each, 1 GiB at
//! 10 Gbit: p99 1.355x the link floor shared evenly with `--fair-uplink`, 1.160x so).
//!
//! The node's bulk writers ask [`Uplink`] for a turn before each group they write and give
//! it back when the group is in the kernel (whose send queue is kept short, so the order
//! the turns give is the order on the wire). At most [`SLOTS`] turns are out at a
//! time, one per writer: a peer that claims to lack everything takes at most one slot, never
//! the uplink.

use std::collections::BTreeMap;

/// Turns out at once, in the node: two keep the link busy while a writer wakes up, and bound
/// what one peer claiming to lack everything can take to half the uplink.
pub const SLOTS: usize = 2;

/// The turns: who holds one, and who waits, neediest first.
#[derive(Debug)]
pub struct Uplink<K> {
    slots: usize,
    out: usize,
    /// Waiting writers by (how far ahead, order of asking): the first is served next.
    waiting: BTreeMap<(u32, u64), K>,
    seq: u64,
}

/// How far ahead a peer is, as an ordering key: the fraction of what it pulls that it lacks,
/// `behind` in [0, 1], turned around (the least ahead sorts first).
fn ahead(behind: f32) -> u32 {
    let b = if behind.is_finite() {
        behind.clamp(0.0, 1.0)
    } else {
        0.0
    };
    ((1.0 - b) * 1e6) as u32
}

/// A writer's place in the queue, to take it out if it stops waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket((u32, u64));

impl<K: Copy> Uplink<K> {
    /// An uplink with `slots` turns (at least one).
    pub fn new(slots: usize) -> Uplink<K> {
        Uplink {
            slots: slots.max(1),
            out: 0,
            waiting: BTreeMap::new(),
            seq: 0,
        }
    }

    /// Writers waiting for a turn.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Writer `k`, for a peer lacking `behind` of what it pulls, asks for a turn: Ok if it
    /// has one now (a slot free), else its place in the queue.
    pub fn ask(&mut self, k: K, behind: f32) -> Result<(), Ticket> {
        if self.out < self.slots {
            self.out += 1;
            return Ok(());
        }
        let key = (ahead(behind), self.seq);
        self.seq += 1;
        self.waiting.insert(key, k);
        Err(Ticket(key))
    }

    /// A writer that waited stops waiting (its connection closed): true if it was still in
    /// the queue (false: it had been given a turn, which it must give back).
    pub fn cancel(&mut self, t: Ticket) -> bool {
        self.waiting.remove(&t.0).is_some()
    }

    /// A turn given back: the writer that has it next, if one waits (the slot passes to it).
    pub fn done(&mut self) -> Option<K> {
        match self.waiting.pop_first() {
            Some((_, k)) => Some(k),
            None => {
                self.out = self.out.saturating_sub(1);
                None
            }
        }
    }

    /// Turns out now.
    pub fn out(&self) -> usize {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer whose peer lacks most goes first; among equals, the first to ask.
    #[test]
    fn the_furthest_behind_are_served_first() {
        let mut u = Uplink::new(1);
        assert_eq!(u.ask('a', 0.5), Ok(()));
        assert!(u.ask('b', 0.1).is_err());
        assert!(u.ask('c', 0.9).is_err());
        assert!(u.ask('d', 0.1).is_err());
        assert!(u.ask('e', f32::NAN).is_err()); // nothing known: as if it lacked nothing
        assert_eq!(u.waiting(), 4);
        let order: Vec<char> = std::iter::from_fn(|| u.done()).collect();
        assert_eq!(order, vec!['c', 'b', 'd', 'e']);
        assert_eq!(u.out(), 0);
    }

    /// No more turns out than slots; a turn given back with nobody waiting frees its slot.
    #[test]
    fn turns_are_bounded_by_the_slots() {
        let mut u = Uplink::new(2);
        assert!(u.ask(1, 0.0).is_ok());
        assert!(u.ask(2, 0.0).is_ok());
        let t = u.ask(3, 1.0).unwrap_err();
        assert_eq!(u.out(), 2);
        assert!(u.cancel(t));
        assert!(!u.cancel(t));
        assert_eq!(u.done(), None);
        assert_eq!(u.out(), 1);
        assert!(u.ask(4, 0.0).is_ok());
        assert!(u.ask(5, 0.0).is_err());
    }

    /// A peer that always claims to lack everything holds one slot at most: the others go
    /// on being served through the rest.
    #[test]
    fn a_greedy_peer_takes_one_slot_not_the_uplink() {
        let mut u = Uplink::new(2);
        let mut served = std::collections::HashMap::<&str, u32>::new();
        // Two writers hold the slots; each, given a turn, writes and asks again at once.
        assert!(u.ask("greedy", 1.0).is_ok());
        assert!(u.ask("honest", 0.2).is_ok());
        assert!(u.ask("other", 0.3).is_err());
        let mut holding = vec!["greedy", "honest"];
        for _ in 0..300 {
            let k = holding.remove(0);
            *served.entry(k).or_default() += 1;
            // It asks again before giving its turn back (its next group is ready).
            let behind = match k {
                "greedy" => 1.0,
                "honest" => 0.2,
                _ => 0.3,
            };
            let again = u.ask(k, behind);
            assert!(again.is_err(), "all slots are out");
            if let Some(next) = u.done() {
                holding.push(next);
            }
        }
        let g = served["greedy"];
        assert!(g <= 151, "the greedy peer had {g} of 300 turns");
        assert!(served["honest"] + served["other"] >= 149);
    }
}
