//! The store's index of live blobs, on disk: sorted *runs* (files of fixed-size entries ordered
//! by blob id, read a block of 64 entries at a time through *fences* ([`Fenced`]), the first id prefix
//! of each block, kept in memory: an eighth of a byte a blob), newest last, plus the changes since the last run was written
//! (the *delta*) in memory. A lookup asks the delta, then the runs from the newest back; the
//! first answer wins, and an answer may be a *tombstone* (the blob was removed). When the delta
//! holds [`DELTA_MAX`] entries it is written as a new run; adjacent runs of comparable size are
//! merged in a background thread (size-tiered, as in an LSM tree), so a store of N blobs keeps
//! about log4(N / DELTA_MAX) runs and memory holds the delta, the fences and the filters, not
//! the entries.
//!
//! Each run has a Bloom filter of its ids beside it (`NUMBER.bloom`, ~10 bits an entry, held
//! in memory: 1.2 bytes a blob), so that a lookup reads only the runs that probably hold its
//! id: a lookup of a blob not stored (every chunk of a pull) reads none. (Runs were
//! memory-mapped at first: without filters every lookup searched every run, and the pages it
//! touched, 64 KiB at a time as the kernel maps cached pages around each fault, kept most of
//! every run resident, 474 MB of a 10M-blob pull's 782 MB; with filters, the lookups of tree
//! nodes read back still mapped 80-130 MB of one run between releases. Reads with `pread`
//! leave the pages to the page cache.)
//!
//! Runs are derived data: the segments' record logs stay the source of truth (see `lib.rs`
//! for how a store finds the runs matching its logs when opened, or rebuilds them). A run is
//! written whole under a temporary name, synced, renamed into place, and never changed; a
//! merge writes a new one and the inputs are deleted once nothing names them.

use crate::sorted::{FenceWriter, Fenced};
use crate::Loc;
use fastbloom::BloomFilter;
use rustc_hash::FxHashMap;
use shoal_chunker::Hash;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Entries the delta holds before it is written as a run (about 60 bytes each in memory, in a
/// table of twice that many buckets at most: ~16-32 MB).
#[cfg(not(test))]
pub(crate) const DELTA_MAX: usize = 256 * 1024;
/// (Small in unit tests, so that they write and merge runs.)
#[cfg(test)]
pub(crate) const DELTA_MAX: usize = 4096;
/// Runs merge while a newer one holds at least a quarter of the entries of the one before it.
const MERGE_RATIO: usize = 4;
/// More runs than this and writing the delta waits for the merge under way (merges falling
/// behind would make every lookup search more of them).
const RUNS_MAX: usize = 16;
/// Entries a merge reads at once.
const SCAN: usize = 4_096;

const MAGIC: &[u8; 8] = b"SHOALRN2";
/// Magic, entry count, reserved. The entries follow, then the fences (a little-endian u64 a
/// block: the first 8 bytes of the block's first id, big-endian order).
const HEADER: usize = 32;
/// Id (32), segment, offset, length with flags, CRC32, record (4 each), little-endian.
pub(crate) const ENTRY: usize = 52;
/// Flags in the length field (blobs are at most 64 MiB: the top bits are free).
const TOMBSTONE: u32 = 1 << 31;
const NO_CRC: u32 = 1 << 30;

/// A run's filter: the fraction of lookups of ids it does not hold that still read it.
const FILTER_FALSE_POS: f64 = 0.01;
const FILTER_MAGIC: &[u8; 8] = b"SHOALBF1";

/// The filter's key of an id (ids are BLAKE3 hashes: any 8 bytes of one are uniform).
fn filter_key(id: &Hash) -> u64 {
    u64::from_le_bytes(id.as_bytes()[8..16].try_into().expect("8 bytes"))
}

fn new_filter(expected: usize) -> BloomFilter {
    BloomFilter::with_false_pos(FILTER_FALSE_POS).expected_items(expected.max(1))
}

pub(crate) fn filter_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:08}.bloom"))
}

/// Creates (or truncates) a file only this user reads: runs name the blobs this user cached,
/// like the segments (0600).
fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Writes a run's filter (synced): magic, the run's entry count, the number of hashes, the
/// number of words, then the words, little-endian.
fn write_filter(path: &Path, f: &BloomFilter, count: usize) -> std::io::Result<()> {
    let words = f.as_slice();
    let mut v = Vec::with_capacity(28 + 8 * words.len());
    v.extend_from_slice(FILTER_MAGIC);
    v.extend_from_slice(&(count as u64).to_le_bytes());
    v.extend_from_slice(&f.num_hashes().to_le_bytes());
    v.extend_from_slice(&(words.len() as u64).to_le_bytes());
    for w in words {
        v.extend_from_slice(&w.to_le_bytes());
    }
    let tmp = path.with_extension("bloom.tmp");
    let mut file = create_private(&tmp)?;
    file.write_all(&v)?;
    file.sync_data()?;
    std::fs::rename(&tmp, path)
}

/// A run's filter, if its file is whole and made for a run of `count` entries.
fn read_filter(path: &Path, count: usize) -> Option<BloomFilter> {
    let b = std::fs::read(path).ok()?;
    let u64_at = |at: usize| Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?));
    if b.get(..8)? != FILTER_MAGIC || u64_at(8)? != count as u64 {
        return None;
    }
    let hashes = u32::from_le_bytes(b.get(16..20)?.try_into().ok()?);
    let n = usize::try_from(u64_at(20)?).ok()?;
    if hashes == 0 || hashes > 64 || n == 0 || b.len() != 28usize.checked_add(n.checked_mul(8)?)? {
        return None;
    }
    let words = b[28..]
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect();
    Some(BloomFilter::from_vec(words).hashes(hashes))
}

/// What the index says of a blob: where it is, or (`None`) that it was removed.
pub(crate) type Entry = Option<(u32, Loc)>;

fn encode(id: &Hash, e: &Entry) -> [u8; ENTRY] {
    let mut b = [0u8; ENTRY];
    b[..32].copy_from_slice(id.as_bytes());
    let (seg, loc) = match e {
        Some((seg, loc)) => (*seg, *loc),
        None => {
            b[40..44].copy_from_slice(&TOMBSTONE.to_le_bytes());
            return b;
        }
    };
    let flags = if loc.crc.is_none() { NO_CRC } else { 0 };
    b[32..36].copy_from_slice(&seg.to_le_bytes());
    b[36..40].copy_from_slice(&loc.off.to_le_bytes());
    b[40..44].copy_from_slice(&(loc.len | flags).to_le_bytes());
    b[44..48].copy_from_slice(&loc.crc.unwrap_or(0).to_le_bytes());
    b[48..52].copy_from_slice(&loc.rec.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Entry {
    let u = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let len = u(40);
    if len & TOMBSTONE != 0 {
        return None;
    }
    Some((
        u(32),
        Loc {
            off: u(36),
            len: len & !(TOMBSTONE | NO_CRC),
            crc: (len & NO_CRC == 0).then(|| u(44)),
            rec: u(48),
        },
    ))
}

/// One run file, open.
pub(crate) struct Run {
    /// Its number (the file is `NUMBER.run`).
    pub no: u64,
    entries: Fenced,
    pub count: usize,
    path: PathBuf,
    /// The ids it holds, probably (see the module's documentation).
    filter: BloomFilter,
}

impl Run {
    /// What this run says of `id`, if it names it.
    fn get(&self, id: &Hash) -> std::io::Result<Option<Entry>> {
        if !self.filter.contains_hash(filter_key(id)) {
            return Ok(None);
        }
        self.entries.find(id, decode)
    }

    /// Every entry in order (a merge's input), [`SCAN`] entries read at a time.
    fn iter(&self) -> impl Iterator<Item = std::io::Result<(Hash, Entry)>> + '_ {
        let mut buf = Vec::new();
        let (mut next, mut at) = (0usize, 0usize);
        std::iter::from_fn(move || {
            if at * ENTRY == buf.len() {
                if next == self.count {
                    return None;
                }
                let n = SCAN.min(self.count - next);
                if let Err(e) = self.entries.read(next, n, &mut buf) {
                    next = self.count;
                    buf.clear();
                    at = 0;
                    return Some(Err(e));
                }
                next += n;
                at = 0;
            }
            let b = &buf[at * ENTRY..(at + 1) * ENTRY];
            at += 1;
            Some(Ok((Hash(b[..32].try_into().expect("32 bytes")), decode(b))))
        })
    }

    /// Opens run `no` under `dir`, if its header and size say it holds `count` entries.
    pub fn open(dir: &Path, no: u64, count: usize) -> Option<Run> {
        Run::open_with(dir, no, count, None)
    }

    /// [`Run::open`], with its filter when the caller has just made it (else it is read, or
    /// made again from the run).
    fn open_with(dir: &Path, no: u64, count: usize, filter: Option<BloomFilter>) -> Option<Run> {
        use std::os::unix::fs::FileExt;
        let path = run_path(dir, no);
        let file = File::open(&path).ok()?;
        let mut head = [0u8; HEADER];
        file.read_exact_at(&mut head, 0).ok()?;
        let n = usize::try_from(u64::from_le_bytes(head[8..16].try_into().ok()?)).ok()?;
        if &head[..8] != MAGIC || n != count {
            return None;
        }
        let mut run = Run {
            no,
            entries: Fenced::open(file, HEADER as u64, ENTRY, count, 0)?,
            count,
            path,
            filter: new_filter(0),
        };
        let fpath = filter_path(dir, no);
        run.filter = match filter.or_else(|| read_filter(&fpath, count)) {
            Some(f) => f,
            None => {
                // Missing (a store from before filters) or damaged: made again from the run.
                let mut f = new_filter(count);
                for e in run.iter() {
                    f.insert_hash(filter_key(&e.ok()?.0));
                }
                if let Err(e) = write_filter(&fpath, &f, count) {
                    tracing::warn!("writing {}: {e}", fpath.display());
                }
                f
            }
        };
        Some(run)
    }
}

pub(crate) fn run_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:08}.run"))
}

/// Writes run `no` from `entries` (ascending by id, each id once), dropping tombstones and
/// entries of segments not in `live_segs` when `bottom` (nothing older could then answer for
/// them); stops with an error if `cancel` is set. Returns the open run.
fn write_run(
    dir: &Path,
    no: u64,
    entries: impl Iterator<Item = std::io::Result<(Hash, Entry)>>,
    expected: usize,
    bottom: Option<&BTreeSet<u32>>,
    cancel: &AtomicBool,
) -> std::io::Result<Run> {
    let tmp = dir.join(format!(".{no:08}.run.tmp"));
    let mut filter = new_filter(expected);
    let written = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, create_private(&tmp)?);
        w.write_all(&[0u8; HEADER])?;
        let mut count = 0u64;
        let mut fences = FenceWriter::default();
        for entry in entries {
            let (id, e) = entry?;
            if let Some(live) = bottom {
                match &e {
                    None => continue,
                    Some((seg, _)) if !live.contains(seg) => continue,
                    Some(_) => {}
                }
            }
            fences.push(&id);
            w.write_all(&encode(&id, &e))?;
            // (Tombstones too: a lookup must find them before older runs' entries.)
            filter.insert_hash(filter_key(&id));
            count += 1;
            if count % 65_536 == 0 && cancel.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("cancelled"));
            }
        }
        w.write_all(&fences.bytes())?;
        let mut f = w.into_inner().map_err(|e| e.into_error())?;
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&count.to_le_bytes());
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&header)?;
        f.sync_data()?;
        // The filter first: a run is never found without its own.
        write_filter(&filter_path(dir, no), &filter, count as usize)?;
        std::fs::rename(&tmp, run_path(dir, no))?;
        File::open(dir)?.sync_all()?;
        Ok(count as usize)
    })();
    match written {
        Ok(count) => Run::open_with(dir, no, count, Some(filter))
            .ok_or_else(|| std::io::Error::other(format!("run {no} unreadable once written"))),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(filter_path(dir, no));
            Err(e)
        }
    }
}

/// Merges two runs (`new` answering before `old`) into one sequence ascending by id (a read
/// error ends it).
fn merged<'a>(
    old: &'a Run,
    new: &'a Run,
) -> impl Iterator<Item = std::io::Result<(Hash, Entry)>> + 'a {
    let mut a = old.iter().peekable();
    let mut b = new.iter().peekable();
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(Err(_)), _) => a.next(),
        (_, Some(Err(_))) => b.next(),
        (Some(Ok(x)), Some(Ok(y))) => match x.0.as_bytes().cmp(y.0.as_bytes()) {
            std::cmp::Ordering::Less => a.next(),
            std::cmp::Ordering::Greater => b.next(),
            std::cmp::Ordering::Equal => {
                a.next();
                b.next()
            }
        },
        (Some(_), None) => a.next(),
        (None, _) => b.next(),
    })
}

/// A merge running in the background: runs `inputs` (adjacent, older first) into `output`.
struct Merge {
    inputs: [u64; 2],
    handle: std::thread::JoinHandle<std::io::Result<Run>>,
    cancel: Arc<AtomicBool>,
}

/// The index (see the module's documentation).
pub(crate) struct Index {
    dir: PathBuf,
    delta: FxHashMap<Hash, Entry>,
    /// Oldest first.
    runs: Vec<Arc<Run>>,
    next_no: u64,
    merge: Option<Merge>,
}

impl Index {
    /// An index over `runs` (oldest first; `dir` holds their files).
    pub fn new(dir: PathBuf, runs: Vec<Run>) -> Index {
        let next_no = runs.iter().map(|r| r.no + 1).max().unwrap_or(1);
        Index {
            dir,
            delta: FxHashMap::default(),
            runs: runs.into_iter().map(Arc::new).collect(),
            next_no,
            merge: None,
        }
    }

    /// What the index says of `id`: where it is, or nothing (never stored, or removed).
    pub fn get(&self, id: &Hash) -> Entry {
        if let Some(e) = self.delta.get(id) {
            return *e;
        }
        self.runs
            .iter()
            .rev()
            .find_map(|r| {
                r.get(id).unwrap_or_else(|e| {
                    // A local file, whole when opened: the blob is then taken as not stored
                    // (fetched again, or reported missing), never read from a guess.
                    tracing::warn!("reading {}: {e}", r.path.display());
                    None
                })
            })
            .flatten()
    }

    pub fn set(&mut self, id: Hash, e: Entry) {
        self.delta.insert(id, e);
    }

    pub fn delta_len(&self) -> usize {
        self.delta.len()
    }

    /// The runs, oldest first: (number, entries).
    pub fn runs(&self) -> Vec<(u64, usize)> {
        self.runs.iter().map(|r| (r.no, r.count)).collect()
    }

    /// Writes the delta as a new run (and empties it); starts a merge if one is due.
    /// `live_segs` are the segments that exist (entries of others are dropped when a merge
    /// writes the oldest run). Returns runs a merge retired meanwhile (see
    /// [`Index::finish_merge`]).
    pub fn write_delta(&mut self, live_segs: &BTreeSet<u32>) -> std::io::Result<Vec<u64>> {
        if self.delta.is_empty() {
            return Ok(Vec::new());
        }
        let retired = if self.runs.len() >= RUNS_MAX {
            self.finish_merge(true, live_segs)?
        } else {
            Vec::new()
        };
        let mut entries: Vec<(Hash, Entry)> = self.delta.drain().collect();
        entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let no = self.next_no;
        self.next_no += 1;
        let expected = entries.len();
        let run = write_run(
            &self.dir,
            no,
            entries.into_iter().map(Ok),
            expected,
            None,
            &AtomicBool::new(false),
        )?;
        self.delta.shrink_to(DELTA_MAX / 4);
        self.runs.push(Arc::new(run));
        self.start_merge(live_segs);
        Ok(retired)
    }

    /// Starts merging the newest adjacent pair of runs of comparable size, unless a merge is
    /// under way.
    fn start_merge(&mut self, live_segs: &BTreeSet<u32>) {
        if self.merge.is_some() {
            return;
        }
        let Some(i) = self.due() else {
            return;
        };
        let (old, new) = (self.runs[i].clone(), self.runs[i + 1].clone());
        let bottom = (i == 0).then(|| live_segs.clone());
        let no = self.next_no;
        self.next_no += 1;
        let dir = self.dir.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = cancel.clone();
        let spawned = std::thread::Builder::new()
            .name("store-merge".into())
            .spawn(move || {
                let expected = old.count + new.count;
                write_run(
                    &dir,
                    no,
                    merged(&old, &new),
                    expected,
                    bottom.as_ref(),
                    &stop,
                )
            });
        match spawned {
            Ok(handle) => {
                self.merge = Some(Merge {
                    inputs: [self.runs[i].no, self.runs[i + 1].no],
                    handle,
                    cancel,
                })
            }
            Err(e) => tracing::warn!("starting a merge of the store's index runs: {e}"),
        }
    }

    /// The older of the newest adjacent pair of runs due for a merge.
    fn due(&self) -> Option<usize> {
        (0..self.runs.len().saturating_sub(1))
            .rev()
            .find(|&i| self.runs[i + 1].count * MERGE_RATIO >= self.runs[i].count)
    }

    /// Whether [`Index::finish_merge`] has anything to do: a merge finished (or under way,
    /// with `wait`), or none under way and one due.
    pub fn merge_pending(&self, wait: bool) -> bool {
        match &self.merge {
            Some(m) => wait || m.handle.is_finished(),
            None => self.due().is_some(),
        }
    }

    /// Puts a finished merge's output in place of its inputs (waiting for it with `wait`)
    /// and starts the next merge if one is due; returns the numbers of the runs it replaced,
    /// whose files the caller deletes once nothing names them. A failed merge is logged and
    /// forgotten (its inputs stay).
    pub fn finish_merge(
        &mut self,
        wait: bool,
        live_segs: &BTreeSet<u32>,
    ) -> std::io::Result<Vec<u64>> {
        if !self
            .merge
            .as_ref()
            .is_some_and(|m| wait || m.handle.is_finished())
        {
            self.start_merge(live_segs);
            return Ok(Vec::new());
        }
        let m = self.merge.take().expect("checked above");
        let run = match m.handle.join() {
            Ok(Ok(run)) => run,
            Ok(Err(e)) => {
                tracing::warn!("merging the store's index runs: {e}");
                return Ok(Vec::new());
            }
            Err(_) => return Err(std::io::Error::other("a merge of index runs panicked")),
        };
        let at = self.runs.iter().position(|r| r.no == m.inputs[0]);
        match at {
            Some(i) if self.runs.get(i + 1).is_some_and(|r| r.no == m.inputs[1]) => {
                self.runs.splice(i..i + 2, [Arc::new(run)]);
                self.start_merge(live_segs);
                Ok(m.inputs.to_vec())
            }
            _ => {
                // Cannot happen (only merges replace runs); the output is not used.
                let _ = std::fs::remove_file(&run.path);
                Ok(Vec::new())
            }
        }
    }

    /// Stops a merge under way (its partial output is removed).
    pub fn cancel_merge(&mut self) {
        if let Some(m) = self.merge.take() {
            m.cancel.store(true, Ordering::Relaxed);
            if let Ok(Ok(run)) = m.handle.join() {
                let _ = std::fs::remove_file(&run.path);
            }
        }
    }

    /// Whether a merge is under way.
    #[cfg(test)]
    pub fn merging(&self) -> bool {
        self.merge.is_some()
    }

    /// Every entry the index holds (tombstones included), the newest answer for each id.
    #[cfg(test)]
    pub fn entries(&self) -> std::collections::BTreeMap<Hash, Entry> {
        let mut all = std::collections::BTreeMap::new();
        for r in &self.runs {
            all.extend(r.iter().map(|e| e.expect("run read")));
        }
        all.extend(self.delta.iter().map(|(k, v)| (*k, *v)));
        all
    }

    /// Removes run files under the index's directory that are not among its runs (left by
    /// a process killed while writing or merging).
    pub fn remove_strays(&self) {
        let keep: BTreeSet<PathBuf> = self
            .runs
            .iter()
            .flat_map(|r| [r.path.clone(), filter_path(&self.dir, r.no)])
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let ours = p
                .extension()
                .is_some_and(|x| x == "run" || x == "bloom" || x == "tmp");
            if ours && !keep.contains(&p) {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u64) -> Hash {
        Hash(*blake3::hash(&i.to_le_bytes()).as_bytes())
    }

    fn loc(i: u64) -> Entry {
        Some((
            (i % 7) as u32 + 1,
            Loc {
                off: i as u32 * 3,
                len: (i % 1000) as u32 + 1,
                crc: (i % 5 != 0).then_some(i as u32 ^ 0xdead_beef),
                rec: i as u32,
            },
        ))
    }

    #[test]
    fn entries_encode_and_decode_exactly() {
        for i in 0..100 {
            let b = encode(&id(i), &loc(i));
            assert_eq!(decode(&b), loc(i));
            assert_eq!(&b[..32], id(i).as_bytes());
        }
        assert_eq!(decode(&encode(&id(1), &None)), None);
        // The largest blob keeps its length and both flags apart.
        let big = Some((
            9,
            Loc {
                off: u32::MAX,
                len: 64 << 20,
                crc: None,
                rec: 7,
            },
        ));
        assert_eq!(decode(&encode(&id(2), &big)), big);
    }

    #[test]
    fn lookups_see_the_newest_answer_across_the_delta_runs_and_merges() {
        let dir = tempfile::tempdir().unwrap();
        let segs: BTreeSet<u32> = (1..=7).collect();
        let mut ix = Index::new(dir.path().to_path_buf(), Vec::new());
        let n = 3 * DELTA_MAX as u64 + 1000;
        // Every id set, in several runs.
        for i in 0..n {
            ix.set(id(i), loc(i));
            if ix.delta_len() >= DELTA_MAX {
                ix.write_delta(&segs).unwrap();
            }
        }
        // Every third removed, every fifth moved, in newer runs.
        for i in (0..n).step_by(3) {
            ix.set(id(i), None);
        }
        ix.write_delta(&segs).unwrap();
        for i in (0..n).step_by(5) {
            ix.set(id(i), loc(i + 1));
        }
        let want = |i: u64| match (i % 5, i % 3) {
            (0, _) => loc(i + 1),
            (_, 0) => None,
            _ => loc(i),
        };
        let check = |ix: &Index| {
            for i in (0..n).step_by(97).chain([0, 1, 2, n - 1]) {
                assert_eq!(ix.get(&id(i)), want(i), "entry {i}");
            }
            for i in n..n + 500 {
                assert_eq!(ix.get(&id(i)), None);
            }
        };
        check(&ix);
        ix.write_delta(&segs).unwrap();
        check(&ix);
        // Merge until none is due; every answer stays the same.
        while ix.merging() {
            ix.finish_merge(true, &segs).unwrap();
            check(&ix);
        }
        assert!(ix.runs().len() <= 2, "runs left: {:?}", ix.runs());
        // Only the runs in use (and their filters) are on disk.
        ix.remove_strays();
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 2 * ix.runs().len());
        // Reopened from their numbers and counts, the runs answer the same.
        let runs: Vec<Run> = ix
            .runs()
            .iter()
            .map(|&(no, count)| Run::open(dir.path(), no, count).unwrap())
            .collect();
        check(&Index::new(dir.path().to_path_buf(), runs));
    }

    #[test]
    fn a_merge_into_the_oldest_run_drops_tombstones_and_gone_segments() {
        let dir = tempfile::tempdir().unwrap();
        let all: BTreeSet<u32> = (1..=7).collect();
        let mut ix = Index::new(dir.path().to_path_buf(), Vec::new());
        for i in 0..1000 {
            ix.set(id(i), loc(i));
        }
        ix.write_delta(&all).unwrap();
        for i in 0..500 {
            ix.set(id(i), None);
        }
        // Segment 1 is gone by the time the runs merge.
        let live: BTreeSet<u32> = (2..=7).collect();
        ix.write_delta(&live).unwrap();
        ix.finish_merge(true, &live).unwrap();
        let runs = ix.runs();
        assert_eq!(runs.len(), 1);
        let kept = (500..1000).filter(|i| i % 7 != 0).count();
        assert_eq!(runs[0].1, kept);
        for i in 0..1000 {
            let want = if i < 500 || i % 7 == 0 { None } else { loc(i) };
            assert_eq!(ix.get(&id(i)), want);
        }
    }

    #[test]
    fn damaged_or_miscounted_runs_are_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        let mut ix = Index::new(dir.path().to_path_buf(), Vec::new());
        for i in 0..100 {
            ix.set(id(i), loc(i));
        }
        ix.write_delta(&BTreeSet::new()).unwrap();
        let (no, count) = ix.runs()[0];
        assert!(Run::open(dir.path(), no, count).is_some());
        assert!(Run::open(dir.path(), no, count + 1).is_none());
        assert!(Run::open(dir.path(), no + 1, count).is_none());
        let path = run_path(dir.path(), no);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(Run::open(dir.path(), no, count).is_none());
        let mut foreign = bytes.clone();
        foreign[0] ^= 1;
        std::fs::write(&path, &foreign).unwrap();
        assert!(Run::open(dir.path(), no, count).is_none());
    }

    /// A run's filter passes every id the run holds and few it does not; a filter missing,
    /// damaged or made for another run is made again from the run when it is opened.
    #[test]
    fn filters_pass_what_a_run_holds_and_are_remade_when_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let mut ix = Index::new(dir.path().to_path_buf(), Vec::new());
        for i in 0..3000 {
            ix.set(id(i), if i % 10 == 0 { None } else { loc(i) });
        }
        ix.write_delta(&BTreeSet::new()).unwrap();
        let (no, count) = ix.runs()[0];
        let fpath = filter_path(dir.path(), no);
        let whole = std::fs::read(&fpath).unwrap();
        let check = |run: &Run| {
            for i in 0..3000 {
                let want = if i % 10 == 0 { None } else { loc(i) };
                assert_eq!(run.get(&id(i)).unwrap(), Some(want), "entry {i}");
            }
            let passed = (3000..103_000)
                .filter(|i| run.filter.contains_hash(filter_key(&id(*i))))
                .count();
            assert!(passed < 2_000, "{passed} of 100,000 absent ids passed");
        };
        check(&Run::open(dir.path(), no, count).unwrap());
        let damaged: [&dyn Fn(); 3] = [
            &|| std::fs::remove_file(&fpath).unwrap(),
            &|| std::fs::write(&fpath, &whole[..whole.len() - 8]).unwrap(),
            &|| {
                let mut other = whole.clone();
                other[8] ^= 1; // another run's count
                std::fs::write(&fpath, other).unwrap()
            },
        ];
        for damage in damaged {
            damage();
            check(&Run::open(dir.path(), no, count).unwrap());
            assert_eq!(std::fs::read(&fpath).unwrap(), whole, "made again");
        }
    }
}
