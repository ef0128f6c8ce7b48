//! Searching tables of fixed-size entries sorted by blob id (the store's index runs, the
//! node's locator files and pull permutations).

use shoal_chunker::Hash;

/// Where `id` is among `n` ids sorted ascending (`id_at(i)` is the i-th): ids are BLAKE3
/// outputs, uniform, so the first guess is where the id would sit among n uniform values,
/// off by about sqrt(n) at most; the window around it is widened until it brackets the id,
/// then searched. A few probes near one place, where a binary search would make about
/// log2(n) scattered ones.
pub fn find<'a>(n: usize, id_at: impl Fn(usize) -> &'a [u8], id: &Hash) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let key = id.as_bytes().as_slice();
    let guess = ((prefix(id) as u128 * n as u128) >> 64) as usize;
    let (mut lo, mut step) = (guess, 64usize);
    while lo > 0 && id_at(lo) > key {
        lo = lo.saturating_sub(step);
        step *= 2;
    }
    let (mut hi, mut step) = (guess + 1, 64usize);
    while hi < n && id_at(hi - 1) < key {
        hi = (hi + step).min(n);
        step *= 2;
    }
    let (mut a, mut b) = (lo, hi);
    while a < b {
        let mid = (a + b) / 2;
        match id_at(mid).cmp(key) {
            std::cmp::Ordering::Less => a = mid + 1,
            std::cmp::Ordering::Greater => b = mid,
            std::cmp::Ordering::Equal => return Some(mid),
        }
    }
    None
}

/// An id's first 8 bytes, big-endian: ids sort as these do, ties aside.
pub fn prefix(id: &Hash) -> u64 {
    u64::from_be_bytes(id.as_bytes()[..8].try_into().expect("8 bytes"))
}
