//! The uplink's turns (`shoal_sched::uplink`), for the bulk writers: each takes a turn before
//! a group of answers and gives it back when the group is in the kernel.
//!
//! The kernel must not queue much behind the turns, or the order they give is lost in its
//! buffers: bulk connections keep their unsent data under [`NOT_SENT`]
//! (`TCP_NOTSENT_LOWAT`), so a write completes only as the wire takes the bytes.

use shoal_sched::uplink::{Ticket, Uplink};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::oneshot;

pub(crate) use shoal_sched::uplink::SLOTS;

/// The longest a writer keeps a turn: a peer that reads slowly or not at all holds a slot
/// this long at most (a 1 MiB group takes 1 ms at 10 Gbit, 42 ms at 200 Mbit).
pub(crate) const TURN: std::time::Duration = std::time::Duration::from_millis(100);

/// Unsent bytes a bulk connection may hold in the kernel (a fifth of a millisecond at
/// 10 Gbit: less would leave the link idle while a writer wakes).
pub(crate) const NOT_SENT: u32 = 256 << 10;

/// The queue and, per waiting writer, how to wake it.
type State = (Uplink<u64>, HashMap<u64, oneshot::Sender<()>>);

#[derive(Debug)]
pub(crate) struct Turns {
    /// Held only to change it, never across an await.
    state: Mutex<State>,
    next: AtomicU64,
}

/// A turn: given back when dropped.
#[derive(Debug)]
pub(crate) struct Turn<'a>(&'a Turns);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

/// A writer waiting: taken out of the queue if it stops waiting, or the turn it was given
/// meanwhile passed on.
struct Waiting<'a> {
    turns: &'a Turns,
    id: u64,
    ticket: Option<Ticket>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(t) = self.ticket else {
            return;
        };
        let queued = {
            let mut s = self.turns.lock();
            let queued = s.0.cancel(t);
            s.1.remove(&self.id);
            queued
        };
        if !queued {
            self.turns.give_back();
        }
    }
}

impl Turns {
    pub(crate) fn new(slots: usize) -> Turns {
        Turns {
            state: Mutex::new((Uplink::new(slots), HashMap::new())),
            next: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is changed whole under the lock: a panic elsewhere cannot leave it half
        // changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A turn for a writer whose peer lacks `behind` (0 to 1) of what it pulls.
    ///
    /// Cancel-safe: dropped while waiting, the writer leaves the queue (a turn it was given
    /// meanwhile goes to the next).
    pub(crate) async fn take(&self, behind: f32) -> Turn<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (rx, ticket) = {
            let mut s = self.lock();
            match s.0.ask(id, behind) {
                Ok(()) => return Turn(self),
                Err(ticket) => {
                    let (tx, rx) = oneshot::channel();
                    s.1.insert(id, tx);
                    (rx, ticket)
                }
            }
        };
        let mut waiting = Waiting {
            turns: self,
            id,
            ticket: Some(ticket),
        };
        // Err only if the sender went without sending, which `give_back` never does: either
        // way the turn was given.
        let _ = rx.await;
        waiting.ticket = None;
        Turn(self)
    }

    /// A turn given back: to the writer next in line, if one waits. The writer it goes to
    /// owns it from here (it gives it back itself if it stopped waiting meanwhile).
    fn give_back(&self) {
        let mut s = self.lock();
        if let Some(id) = s.0.done() {
            if let Some(tx) = s.1.remove(&id) {
                let _ = tx.send(());
            }
        }
    }

    /// Turns out now, and writers waiting for one.
    #[cfg(test)]
    fn load(&self) -> (usize, usize) {
        let s = self.lock();
        (s.0.out(), s.0.waiting())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// Writers waiting get their turns neediest first; one that stops waiting (its
    /// connection closed) neither keeps a slot nor loses one.
    #[tokio::test]
    async fn turns_go_to_the_neediest_and_survive_cancelled_waits() {
        let turns = Arc::new(Turns::new(1));
        let first = turns.take(0.0).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, behind) in [("near done", 0.1f32), ("far behind", 0.9), ("half", 0.5)] {
            let (t, o) = (turns.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = t.take(behind).await;
                o.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // One more that gives up waiting.
        let quitter = {
            let t = turns.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_millis(10), t.take(1.0)).await;
            })
        };
        quitter.await.unwrap();
        assert_eq!(turns.load(), (1, 3));
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec!["far behind", "half", "near done"]
        );
        assert_eq!(turns.load(), (0, 0));
        // All slots free again: a turn is had at once.
        let _again = tokio::time::timeout(Duration::from_millis(100), turns.take(0.0))
            .await
            .expect("a free slot");
    }
}
