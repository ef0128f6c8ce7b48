//! Which origin serves a read, when a dataset lives in several (regions, clouds, mirrors).
//!
//! Above this, a pull's scheduler ([`crate::pull`]) decides *that* a chunk is read from the
//! origins and by which node (so a cold cluster reads each chunk about once in total, whichever
//! origin serves it); this decides *which* origin, for each ranged read, like a peer is chosen
//! for a chunk: by the time the read is expected to take there, measured.
//!
//! Each origin has a rank from its labels against the node's (same zone, same region, elsewhere)
//! and a limit of requests in flight. Its round-trip time and its link's rate are measured from
//! the reads it serves. A read goes to the origin where it is expected to finish first: its
//! round trip, plus the bytes already in flight there and its own at the origin's rate. So
//! the nearest origin takes reads first, a second one takes its share when the first one's
//! queue makes it slower (two origins behind a 100 Mbit and a 300 Mbit link end up serving a
//! quarter and three quarters), and an origin never measured is taken at a prior that its
//! rank discounts. An origin that fails is left out for a backoff that doubles with each
//! consecutive failure (1 s to 30 s), unless every origin is out; a read that takes far longer
//! than expected ([`OriginSet::deadline`]) is given up and counts as a failure.
//!
//! Like the rest of this crate: no clock, no socket; the time comes in as an argument.

use std::time::{Duration, Instant};

/// What the configuration says of an origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginInfo {
    /// 0: in this node's zone; 1: in its region; 2: elsewhere or unlabelled.
    pub rank: u8,
    /// Most requests in flight at once.
    pub max_requests: usize,
}

/// The rank of an origin labelled (`region`, `zone`) for a node labelled (`my_region`,
/// `my_zone`): 0 in the same zone, 1 in the same region, 2 otherwise (a missing label matches
/// nothing).
pub fn rank(
    region: Option<&str>,
    zone: Option<&str>,
    my_region: Option<&str>,
    my_zone: Option<&str>,
) -> u8 {
    let same = |a: Option<&str>, b: Option<&str>| a.is_some() && a == b;
    if same(zone, my_zone) {
        0
    } else if same(region, my_region) {
        1
    } else {
        2
    }
}

/// Rate taken for an origin nobody measured yet, before its rank's discount, unless a
/// measured origin is faster (bytes per second).
const PRIOR_RATE: f64 = 100e6;
/// Round trip taken for an origin never measured, by rank.
const PRIOR_RTT: [Duration; 3] = [
    Duration::from_millis(2),
    Duration::from_millis(20),
    Duration::from_millis(80),
];
/// How an unmeasured origin's rate is discounted by rank: the nearest is tried first, a far
/// one only when the near ones are busy.
const RANK_DISCOUNT: [f64; 3] = [1.0, 0.5, 0.25];
/// Weight of a new sample in the moving averages.
const EWMA: f64 = 0.25;
/// A read is given up after this many times its expected duration...
const DEADLINE_FACTOR: u32 = 8;
/// ...and never sooner than this.
const MIN_DEADLINE: Duration = Duration::from_secs(10);
/// Backoff after a first failure, doubled with each consecutive one, at most `MAX_BACKOFF`.
const BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct State {
    info: OriginInfo,
    rtt: Option<Duration>,
    /// The origin's link rate, bytes per second: a read's own rate times the reads that
    /// shared the link with it.
    rate: Option<f64>,
    in_flight: usize,
    in_flight_bytes: u64,
    failures: u32,
    out_until: Option<Instant>,
    /// Totals, for reports.
    bytes: u64,
    reads: u64,
    errors: u64,
}

/// What an origin did so far, as reported to users and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OriginReport {
    pub bytes: u64,
    pub reads: u64,
    pub errors: u64,
    pub rtt: Option<Duration>,
    /// Measured link rate, bytes per second.
    pub rate: Option<f64>,
}

/// The origins of a node and what it measured of each. Origins are numbered in the order
/// they were configured.
#[derive(Debug, Clone)]
pub struct OriginSet {
    origins: Vec<State>,
}

impl OriginSet {
    pub fn new(infos: impl IntoIterator<Item = OriginInfo>) -> OriginSet {
        OriginSet {
            origins: infos
                .into_iter()
                .map(|info| State {
                    info: OriginInfo {
                        max_requests: info.max_requests.max(1),
                        ..info
                    },
                    rtt: None,
                    rate: None,
                    in_flight: 0,
                    in_flight_bytes: 0,
                    failures: 0,
                    out_until: None,
                    bytes: 0,
                    reads: 0,
                    errors: 0,
                })
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.origins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    fn rate(&self, i: usize) -> f64 {
        let o = &self.origins[i];
        o.rate.unwrap_or_else(|| {
            let best = self
                .origins
                .iter()
                .filter_map(|o| o.rate)
                .fold(PRIOR_RATE, f64::max);
            best * RANK_DISCOUNT[o.info.rank.min(2) as usize]
        })
    }

    fn rtt(&self, i: usize) -> Duration {
        let o = &self.origins[i];
        o.rtt.unwrap_or(PRIOR_RTT[o.info.rank.min(2) as usize])
    }

    /// When a read of `bytes` started now at origin `i` is expected to be done, from now.
    pub fn expected(&self, i: usize, bytes: u64) -> Duration {
        let o = &self.origins[i];
        let queued = (o.in_flight_bytes + bytes) as f64 / self.rate(i);
        self.rtt(i) + Duration::from_secs_f64(queued.min(1e6))
    }

    fn is_out(&self, i: usize, now: Instant) -> bool {
        self.origins[i].out_until.is_some_and(|t| now < t)
    }

    /// The origin among those `allowed` (it holds the object, and this read has not failed
    /// there) that should serve a read of `bytes` now: the one where it is expected to finish
    /// first, leaving out origins in their backoff unless all of the allowed ones are. None
    /// when no origin is allowed, or all allowed are at their request limit (then wait for a
    /// read to finish).
    pub fn pick(&self, bytes: u64, allowed: impl Fn(usize) -> bool, now: Instant) -> Option<usize> {
        let allowed: Vec<usize> = (0..self.origins.len()).filter(|&i| allowed(i)).collect();
        let up: Vec<usize> = allowed
            .iter()
            .copied()
            .filter(|&i| !self.is_out(i, now))
            .collect();
        // Every allowed origin is out: the one back soonest, rather than failing the read.
        let pool = if up.is_empty() {
            allowed
                .iter()
                .copied()
                .min_by_key(|&i| self.origins[i].out_until)
                .into_iter()
                .collect()
        } else {
            up
        };
        pool.into_iter()
            .filter(|&i| self.origins[i].in_flight < self.origins[i].info.max_requests)
            .min_by_key(|&i| (self.expected(i, bytes), self.origins[i].info.rank, i))
    }

    /// Origins in the order small requests (version objects, tags, indexes) try them: up
    /// ones first by expected time for a small read, then those in backoff.
    pub fn order(&self, now: Instant) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.origins.len()).collect();
        v.sort_by_key(|&i| {
            (
                self.is_out(i, now),
                self.expected(i, 0),
                self.origins[i].info.rank,
                i,
            )
        });
        v
    }

    /// A read of `bytes` was sent to origin `i`.
    pub fn started(&mut self, i: usize, bytes: u64) {
        let o = &mut self.origins[i];
        o.in_flight += 1;
        o.in_flight_bytes += bytes;
    }

    fn end(&mut self, i: usize, bytes: u64) -> usize {
        let o = &mut self.origins[i];
        let sharing = o.in_flight.max(1);
        o.in_flight = o.in_flight.saturating_sub(1);
        o.in_flight_bytes = o.in_flight_bytes.saturating_sub(bytes);
        sharing
    }

    /// A read of `bytes` at origin `i` came back whole after `took`.
    pub fn finished(&mut self, i: usize, bytes: u64, took: Duration) {
        let sharing = self.end(i, bytes);
        let rtt = self.rtt(i);
        let o = &mut self.origins[i];
        o.failures = 0;
        o.out_until = None;
        o.bytes += bytes;
        o.reads += 1;
        // A small read measures the round trip; a large one the link (its own rate, times the
        // reads that shared the link at its end: a fair share each).
        if bytes < 256 << 10 {
            o.rtt = Some(match o.rtt {
                None => took,
                Some(r) => r.mul_f64(1.0 - EWMA) + took.mul_f64(EWMA),
            });
        } else {
            let busy = took.saturating_sub(rtt).max(Duration::from_micros(100));
            let sample = bytes as f64 / busy.as_secs_f64() * sharing as f64;
            o.rate = Some(match o.rate {
                None => sample,
                Some(r) => r * (1.0 - EWMA) + sample * EWMA,
            });
        }
    }

    /// A request at origin `i` failed (an error, or it outlived its deadline): left out for a
    /// backoff that doubles with each failure in a row.
    pub fn failed(&mut self, i: usize, bytes: u64, now: Instant) {
        self.end(i, bytes);
        self.down(i, now);
    }

    /// Origin `i` failed outside a read counted here (a small request, or bytes that did not
    /// verify): left out for the same backoff as [`Self::failed`].
    pub fn down(&mut self, i: usize, now: Instant) {
        let o = &mut self.origins[i];
        o.failures += 1;
        o.errors += 1;
        let backoff = BACKOFF
            .saturating_mul(1 << (o.failures - 1).min(16))
            .min(MAX_BACKOFF);
        o.out_until = Some(now + backoff);
    }

    /// A request at origin `i` ended without bytes and without fault on the origin's part (the
    /// object is not there: a mirror that lacks it).
    pub fn absent(&mut self, i: usize, bytes: u64) {
        self.end(i, bytes);
    }

    /// A small request (a version object, a tag) answered after `took`: a round-trip sample.
    pub fn answered(&mut self, i: usize, took: Duration) {
        let o = &mut self.origins[i];
        o.failures = 0;
        o.out_until = None;
        o.rtt = Some(match o.rtt {
            None => took,
            Some(r) => r.mul_f64(1.0 - EWMA) + took.mul_f64(EWMA),
        });
    }

    /// How long a read of `bytes` at origin `i` may take before it is given up and sent
    /// elsewhere: many times what is expected with what else is in flight there, and never
    /// under [`MIN_DEADLINE`].
    pub fn deadline(&self, i: usize, bytes: u64) -> Duration {
        let o = &self.origins[i];
        let expected = self.rtt(i)
            + Duration::from_secs_f64(
                ((o.in_flight_bytes.max(bytes)) as f64 / self.rate(i)).min(1e5),
            );
        (expected * DEADLINE_FACTOR).max(MIN_DEADLINE)
    }

    /// What origin `i` did so far.
    pub fn report(&self, i: usize) -> OriginReport {
        let o = &self.origins[i];
        OriginReport {
            bytes: o.bytes,
            reads: o.reads,
            errors: o.errors,
            rtt: o.rtt,
            rate: o.rate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranks: &[u8]) -> OriginSet {
        OriginSet::new(ranks.iter().map(|&rank| OriginInfo {
            rank,
            max_requests: 8,
        }))
    }

    const MB: u64 = 1 << 20;

    #[test]
    fn ranks_follow_labels() {
        for (origin, me, want) in [
            ((Some("eu"), Some("eu-a")), (Some("eu"), Some("eu-a")), 0),
            ((Some("eu"), Some("eu-b")), (Some("eu"), Some("eu-a")), 1),
            ((Some("us"), Some("us-a")), (Some("eu"), Some("eu-a")), 2),
            ((None, None), (Some("eu"), Some("eu-a")), 2),
            ((None, None), (None, None), 2),
            ((Some("eu"), None), (Some("eu"), None), 1),
        ] {
            assert_eq!(
                rank(origin.0, origin.1, me.0, me.1),
                want,
                "{origin:?} {me:?}"
            );
        }
    }

    #[test]
    fn the_nearest_origin_is_tried_first_and_a_far_one_only_when_it_is_busy() {
        let now = Instant::now();
        let mut s = set(&[2, 0]);
        assert_eq!(s.pick(16 * MB, |_| true, now), Some(1));
        assert_eq!(s.order(now), vec![1, 0]);
        // Queue 8 reads at the near one: it is at its limit, so the far one takes the next.
        for _ in 0..8 {
            let i = s.pick(16 * MB, |_| true, now).unwrap();
            s.started(i, 16 * MB);
        }
        assert!(
            s.origins[1].in_flight >= 4,
            "the near one takes most: {:?}",
            s.origins
        );
        assert!(
            s.origins[0].in_flight >= 1,
            "a far one helps when the near one is busy"
        );
    }

    /// Two origins behind 100 and 300 Mbit links, each read taking its share of its link:
    /// after a few reads they serve about a quarter and three quarters of the bytes.
    #[test]
    fn reads_split_over_two_links_by_their_measured_rates() {
        let links = [100e6 / 8.0, 300e6 / 8.0];
        let mut s = set(&[2, 2]);
        let mut now = Instant::now();
        // (end time, origin, bytes, start) of reads in flight; 8 at once, 4 MiB each.
        let mut flight: Vec<(Instant, usize, u64, Instant)> = Vec::new();
        let mut served = [0u64; 2];
        let total = 1024 * MB;
        let mut sent = 0;
        while sent < total || !flight.is_empty() {
            while sent < total && flight.len() < 8 {
                let i = s.pick(4 * MB, |_| true, now).unwrap();
                s.started(i, 4 * MB);
                sent += 4 * MB;
                // Its share of the link with what is there now (a coarse link model).
                let share = s.origins[i].in_flight as f64;
                let took = Duration::from_secs_f64(0.01 + (4 * MB) as f64 * share / links[i]);
                flight.push((now + took, i, 4 * MB, now));
            }
            flight.sort_by_key(|f| f.0);
            let (end, i, bytes, start) = flight.remove(0);
            now = end;
            s.finished(i, bytes, end - start);
            served[i] += bytes;
        }
        let fast = served[1] as f64 / total as f64;
        assert!(
            (0.6..0.9).contains(&fast),
            "the 300 Mbit origin served {fast:.2} of the bytes"
        );
    }

    #[test]
    fn a_failing_origin_is_left_out_for_a_growing_backoff_unless_all_are_out() {
        let now = Instant::now();
        let mut s = set(&[0, 2]);
        s.started(0, MB);
        s.failed(0, MB, now);
        assert_eq!(s.pick(MB, |_| true, now), Some(1));
        assert_eq!(s.order(now), vec![1, 0]);
        // Back after a second; a second failure in a row keeps it out for two.
        assert_eq!(
            s.pick(MB, |_| true, now + Duration::from_millis(1001)),
            Some(0)
        );
        s.started(0, MB);
        s.failed(0, MB, now + Duration::from_secs(2));
        assert_eq!(
            s.pick(MB, |_| true, now + Duration::from_millis(3500)),
            Some(1)
        );
        assert_eq!(
            s.pick(MB, |_| true, now + Duration::from_millis(4001)),
            Some(0)
        );
        // Only the failed one holds the object: it is still tried, rather than failing the read.
        assert_eq!(
            s.pick(MB, |i| i == 0, now + Duration::from_millis(2100)),
            Some(0)
        );
        // A success ends the backoff.
        s.started(0, MB);
        s.finished(0, MB, Duration::from_millis(50));
        assert_eq!(
            s.pick(MB, |_| true, now + Duration::from_millis(2200)),
            Some(0)
        );
        assert_eq!(s.report(0).errors, 2);
    }

    #[test]
    fn an_origin_that_lacks_the_object_or_is_full_is_not_picked() {
        let now = Instant::now();
        let mut s = OriginSet::new([
            OriginInfo {
                rank: 0,
                max_requests: 1,
            },
            OriginInfo {
                rank: 2,
                max_requests: 1,
            },
        ]);
        assert_eq!(s.pick(MB, |i| i == 1, now), Some(1));
        s.started(0, MB);
        assert_eq!(s.pick(MB, |_| true, now), Some(1));
        s.started(1, MB);
        assert_eq!(s.pick(MB, |_| true, now), None, "both at their limit: wait");
        s.absent(1, MB);
        assert_eq!(s.pick(MB, |_| true, now), Some(1));
        assert_eq!(s.pick(MB, |_| false, now), None);
    }

    #[test]
    fn a_slow_origin_loses_its_share_and_reads_there_get_a_deadline() {
        let now = Instant::now();
        let mut s = set(&[0, 0]);
        // Both measured fast; then origin 0 slows to a crawl.
        for i in 0..2 {
            s.started(i, 16 * MB);
            s.finished(i, 16 * MB, Duration::from_millis(200));
        }
        for _ in 0..12 {
            s.started(0, 16 * MB);
            s.finished(0, 16 * MB, Duration::from_secs(30));
        }
        let picks: Vec<usize> = (0..6)
            .map(|_| {
                let i = s.pick(16 * MB, |_| true, now).unwrap();
                s.started(i, 16 * MB);
                i
            })
            .collect();
        assert!(picks.iter().all(|&i| i == 1), "{picks:?}");
        assert!(s.deadline(1, 16 * MB) >= MIN_DEADLINE);
        assert!(s.deadline(0, 16 * MB) > s.deadline(1, 16 * MB));
    }
}
