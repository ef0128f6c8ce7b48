//! Byte-rate limits: what a node reads from its origins, sends to its peers and receives
//! from them, each a token bucket (`governor`'s GCRA) shared by every reader or writer of
//! its kind on the node.
//!
//! A bucket counts cells of `cell` bytes, chosen so that one cell is replenished every 10 us
//! or more: `governor` keeps the replenish interval in whole nanoseconds, and bytes as cells
//! at hundreds of MB/s would round that interval by up to a third. The bucket holds 100 ms of
//! the rate, so that an idle node starts at once and a long transfer holds the rate to well
//! under a percent; larger takes wait for the bucket piece by piece.

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::Duration;

/// Cells replenished per second at most (one every 10 us).
const CELLS_PER_SECOND: u64 = 100_000;
/// What the bucket holds: this long at the rate.
const BURST: Duration = Duration::from_millis(100);

/// One limit: at most `per_second` bytes per second, whoever takes them.
pub struct Rate {
    limiter: DefaultDirectRateLimiter,
    per_second: u64,
    /// Bytes per cell.
    cell: u64,
    /// Cells the bucket holds.
    burst: u32,
}

impl std::fmt::Debug for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rate({} B/s)", self.per_second)
    }
}

impl Rate {
    /// A limit of `per_second` bytes per second; `None` for 0 (no limit).
    pub fn new(per_second: u64) -> Option<Rate> {
        if per_second == 0 {
            return None;
        }
        let cell = per_second.div_ceil(CELLS_PER_SECOND);
        // One cell every cell/per_second seconds, in nanoseconds (at least 10 us, at most
        // one second for the smallest rates).
        let period = Duration::from_nanos(
            u64::try_from(cell as u128 * 1_000_000_000 / per_second as u128).unwrap_or(u64::MAX),
        );
        let burst_cells = (per_second as u128 * BURST.as_nanos() / 1_000_000_000 / cell as u128)
            .clamp(1, u32::MAX as u128) as u32;
        let burst = NonZeroU32::new(burst_cells).expect("at least one");
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .expect("a period of at least 1 ns")
            .allow_burst(burst);
        Some(Rate {
            limiter: RateLimiter::direct(quota),
            per_second,
            cell,
            burst: burst_cells,
        })
    }

    pub fn per_second(&self) -> u64 {
        self.per_second
    }

    /// Waits until `bytes` may go; a take larger than the bucket waits for it a bucket at a
    /// time.
    ///
    /// Cancel-safe: a take dropped while waiting takes nothing (a piece already granted stays
    /// taken).
    pub async fn take(&self, bytes: u64) {
        let mut cells = bytes.div_ceil(self.cell);
        while cells > 0 {
            let n = cells.min(self.burst as u64) as u32;
            let n = NonZeroU32::new(n).expect("cells > 0");
            // At most the bucket: never InsufficientCapacity.
            let _ = self.limiter.until_n_ready(n).await;
            cells -= n.get() as u64;
        }
    }
}

/// A node's limits, bytes per second (`[rates]` in the config file, `shoal node run
/// --origin-rate/--upload-rate/--download-rate`); absent means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimits {
    /// Everything this node reads from its origins together (packs and in-place sources;
    /// the small metadata objects are not held back).
    pub origin: Option<u64>,
    /// Everything this node's bulk channel sends to its peers together.
    pub upload: Option<u64>,
    /// Everything this node receives from its peers together.
    pub download: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn cells_keep_the_period_at_ten_microseconds_or_more() {
        for rate in [1u64, 999, 1 << 20, 30_000_000, 333_333_333, 12_500_000_000] {
            let r = Rate::new(rate).unwrap();
            let period_ns = r.cell as f64 * 1e9 / rate as f64;
            assert!(
                period_ns >= 10_000.0 || r.cell == 1,
                "{rate}: {period_ns} ns"
            );
            // Whole nanoseconds lose less than 0.01 % of the rate.
            assert!(period_ns.fract() / period_ns < 1e-4, "{rate}");
            assert!(r.burst >= 1);
        }
        assert!(Rate::new(0).is_none());
    }

    #[tokio::test]
    async fn a_long_take_holds_the_rate() {
        // 20 MB/s: the first 100 ms are the bucket, then 10 MB more take 0.5 s.
        let r = Rate::new(20_000_000).unwrap();
        r.take(2_000_000).await;
        let t = Instant::now();
        for _ in 0..100 {
            r.take(100_000).await;
        }
        let took = t.elapsed().as_secs_f64();
        // Only the lower bound is the limit; the upper one only catches a limiter that hangs.
        assert!(
            (0.47..5.0).contains(&took),
            "10 MB at 20 MB/s took {took} s"
        );
    }

    #[tokio::test]
    async fn takes_larger_than_the_bucket_wait_for_it_piece_by_piece() {
        let r = Rate::new(1_000_000).unwrap();
        let t = Instant::now();
        // The 100 kB bucket, then 200 kB more: 0.2 s.
        r.take(300_000).await;
        let took = t.elapsed().as_secs_f64();
        assert!((0.18..5.0).contains(&took), "took {took} s");
    }
}
