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

/// Entries of a [`Fenced`] table read at once: its fences hold the first id prefix of each
/// block of this many.
pub const BLOCK: usize = 64;

/// The fences a table of entries sorted by id ends with: the prefix of every [`BLOCK`]th id,
/// as little-endian u64s, to be written after the entries.
#[derive(Default)]
pub struct FenceWriter {
    fences: Vec<u64>,
    seen: usize,
}

impl FenceWriter {
    /// Notes the next entry's id (every entry, in order).
    pub fn push(&mut self, id: &Hash) {
        if self.seen % BLOCK == 0 {
            self.fences.push(prefix(id));
        }
        self.seen += 1;
    }

    /// The fences' bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.fences.iter().flat_map(|f| f.to_le_bytes()).collect()
    }
}

/// A file of fixed-size entries sorted by id (each starting with it), followed by their
/// fences (see [`FenceWriter`]): the store's index runs and the node's locator files. The
/// fences stay in memory (an eighth of a byte an entry); a lookup reads the block that may
/// hold its id with `pread`, and keeps the last block read, which the next lookup most often
/// falls in when lookups come in id order (a batch's). The pages stay in the page cache, not
/// in the process's resident memory as mapped ones did.
pub struct Fenced {
    file: std::fs::File,
    /// Where the entries start in the file.
    start: u64,
    entry: usize,
    count: usize,
    fences: Box<[u64]>,
    /// The entries last read by a lookup: (first entry, count, bytes).
    last: std::sync::Mutex<(usize, usize, Vec<u8>)>,
}

impl Fenced {
    /// The table of `count` entries of `entry` bytes from `start` in `file`, if the file's
    /// size is exactly that and `trailer` bytes more (what the file keeps after the fences),
    /// and its fences are whole and in order.
    pub fn open(
        file: std::fs::File,
        start: u64,
        entry: usize,
        count: usize,
        trailer: u64,
    ) -> Option<Fenced> {
        use std::os::unix::fs::FileExt;
        let fences_at = start.checked_add(u64::try_from(count.checked_mul(entry)?).ok()?)?;
        let nfences = count.div_ceil(BLOCK);
        let end = fences_at.checked_add(nfences as u64 * 8)?;
        if end.checked_add(trailer)? != file.metadata().ok()?.len() {
            return None;
        }
        let mut b = vec![0u8; nfences * 8];
        file.read_exact_at(&mut b, fences_at).ok()?;
        let fences: Box<[u64]> = b
            .chunks_exact(8)
            .map(|f| u64::from_le_bytes(f.try_into().expect("8 bytes")))
            .collect();
        fences.is_sorted().then(|| Fenced {
            file,
            start,
            entry,
            count,
            fences,
            last: std::sync::Mutex::new((usize::MAX, 0, Vec::new())),
        })
    }

    /// Where the bytes after the fences begin in the file.
    pub fn trailer_at(&self) -> u64 {
        self.start + (self.count * self.entry) as u64 + (self.count.div_ceil(BLOCK) * 8) as u64
    }

    /// The file it reads.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Reads entries `from..from + n` into `buf`.
    pub fn read(&self, from: usize, n: usize, buf: &mut Vec<u8>) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        buf.resize(n * self.entry, 0);
        self.file
            .read_exact_at(buf, self.start + (from * self.entry) as u64)
    }

    /// `entry` applied to the entry of `id`, if the table holds it. Reads the blocks that may
    /// hold it (one, unless ids sharing its first 8 bytes straddle two).
    pub fn find<R>(&self, id: &Hash, entry: impl FnOnce(&[u8]) -> R) -> std::io::Result<Option<R>> {
        let key = prefix(id);
        let first = self.fences.partition_point(|&f| f < key).saturating_sub(1);
        let last = self
            .fences
            .partition_point(|&f| f <= key)
            .saturating_sub(1)
            .max(first);
        let from = first * BLOCK;
        let n = ((last + 1) * BLOCK).min(self.count).saturating_sub(from);
        let size = self.entry;
        let search = |buf: &[u8]| {
            let i = find(n, |i| &buf[i * size..i * size + 32], id)?;
            Some(entry(&buf[i * size..(i + 1) * size]))
        };
        // Another thread reading this table: a buffer of its own rather than a wait.
        let Ok(mut cached) = self.last.try_lock() else {
            let mut buf = Vec::new();
            self.read(from, n, &mut buf)?;
            return Ok(search(&buf));
        };
        if (cached.0, cached.1) != (from, n) {
            *cached = (usize::MAX, 0, std::mem::take(&mut cached.2));
            self.read(from, n, &mut cached.2)?;
            (cached.0, cached.1) = (from, n);
        }
        Ok(search(&cached.2))
    }
}
