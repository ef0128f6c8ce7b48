//! Progress counters shared between an operation and whoever displays it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Counters an operation updates as it goes; a front end polls them to draw a progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    phase: Mutex<&'static str>,
    total: AtomicU64,
    done: AtomicU64,
}

impl Progress {
    /// Starts a new phase measured in bytes out of `total`.
    pub fn phase(&self, name: &'static str, total: u64) {
        *self.phase.lock().expect("progress poisoned") = name;
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    /// Adds `n` to the phase's total, for a phase that learns its size as it goes (a publish
    /// walking its source).
    pub fn grow(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// (phase, done, total)
    pub fn get(&self) -> (&'static str, u64, u64) {
        (
            *self.phase.lock().expect("progress poisoned"),
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}
