//! The blobs an origin holds for a dataset, on disk: what a publish deduplicates against.
//!
//! A publish asks, for every chunk it cuts and every file it takes unread, whether the origin
//! already holds the blob and in which pack. That was a map in memory of every blob of every
//! pack the dataset's versions name (~40 bytes a blob: 400 MB for ten million). Now it is a
//! table on disk, `publish/NAME.blobs` in the publisher's home: one entry a blob (its id and
//! the pack's number in the table's pack list, 36 bytes), sorted by id, with fences
//! ([`Fenced`]) of which memory holds an eighth of a byte a blob; a lookup reads one block.
//!
//! The table is built by merging the packs' locator files (each already sorted by id, see
//! [`crate::locator`]; a pack's is written from its index the first time it is needed), one
//! block of each at a time, and is named by the list of packs it was built from: a publish
//! whose packs differ (a version published, removed or repacked since) builds it again.
//! Derived data in the publisher's home, written whole and renamed into place, with a CRC32
//! of its entries and fences checked each time it is opened (a damaged entry could make a
//! publish lean on a pack that does not hold the blob): a damaged, cut or foreign table does
//! not open and is built again.

use crate::error::{Error, Result};
use crate::locator::PackLoc;
use shoal_registry::Hash;
use shoal_store::sorted::{FenceWriter, Fenced};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"SHOALDB1";
/// Magic, the key (BLAKE3 of the pack list), pack count, entry count, CRC32 of everything
/// after the header (checked whenever the table is opened: a damaged entry could make a
/// publish lean on a pack that does not hold the blob).
const HEADER: usize = 8 + 32 + 8 + 8 + 8;
/// Id, pack number.
const ENTRY: usize = 32 + 4;
/// Records read from each source at once while merging.
const MERGE_BLOCK: usize = 512;
/// Files merged at once (each open while merged).
pub const FAN_IN: usize = 64;

/// Where a dataset's table lives in a home.
pub fn table_path(home: &Path, dataset: &str) -> PathBuf {
    home.join("publish")
        .join(format!("{}.blobs", dataset.replace('/', "%")))
}

/// The table of one pack list, open.
pub(crate) struct OriginBlobs {
    table: Option<Fenced>,
    packs: Vec<Hash>,
}

/// The name of a pack list: its ids in order, hashed.
fn key(packs: &[Hash]) -> Hash {
    let mut b = Vec::with_capacity(8 + 32 * packs.len());
    b.extend_from_slice(&(packs.len() as u64).to_le_bytes());
    for p in packs {
        b.extend_from_slice(p.as_bytes());
    }
    shoal_chunker::hash(&b)
}

impl OriginBlobs {
    /// No blobs (a dataset's first publish).
    pub fn empty() -> OriginBlobs {
        OriginBlobs {
            table: None,
            packs: Vec::new(),
        }
    }

    /// The table at `path` if it was built from exactly `packs`, in this order, and reads
    /// back whole (its checksum is checked: one read of the file).
    pub fn open(path: &Path, packs: &[Hash]) -> Option<OriginBlobs> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(path).ok()?;
        let mut head = [0u8; HEADER];
        file.read_exact_at(&mut head, 0).ok()?;
        if &head[..8] != MAGIC || head[8..40] != key(packs).0 {
            return None;
        }
        let npacks = u64::from_le_bytes(head[40..48].try_into().ok()?);
        let count = usize::try_from(u64::from_le_bytes(head[48..56].try_into().ok()?)).ok()?;
        let crc = u64::from_le_bytes(head[56..64].try_into().ok()?);
        if npacks != packs.len() as u64 {
            return None;
        }
        let table = Fenced::open(file, HEADER as u64, ENTRY, count, 0)?;
        let mut h = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = HEADER as u64;
        loop {
            let n = table.file().read_at(&mut buf, at).ok()?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            at += n as u64;
        }
        if u64::from(h.finalize()) != crc {
            return None;
        }
        Some(OriginBlobs {
            table: Some(table),
            packs: packs.to_vec(),
        })
    }

    /// Builds the table of pack list `packs` at `path` from the locator files in `cache` of
    /// those of them that are packed (`packed`: their numbers in `packs`, ascending), then
    /// opens it. Merges at most [`FAN_IN`] files at once (each open while merged), through
    /// temporary tables when there are more. Blocking: run it off the runtime.
    pub fn build(path: &Path, packs: &[Hash], packed: &[u32], cache: &Path) -> Result<OriginBlobs> {
        let io = |source: std::io::Error| Error::Io {
            op: "writing the table of the origin's blobs to",
            path: path.to_path_buf(),
            source,
        };
        let dir = path.parent().expect("a table path has a parent");
        std::fs::create_dir_all(dir).map_err(io)?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("blobs");
        let tmp = |what: &str| dir.join(format!(".{name}.{}.{what}.tmp", std::process::id()));
        let mut temps = Vec::new();
        let built = (|| -> std::io::Result<()> {
            // Each source: a pack's locator, or a table merged from some of them.
            let mut level: Vec<Source> = packed.iter().map(|&n| Source::Pack(n)).collect();
            let mut round = 0;
            while level.len() > FAN_IN {
                let mut next = Vec::new();
                for (g, group) in level.chunks(FAN_IN).enumerate() {
                    let t = tmp(&format!("{round}-{g}"));
                    temps.push(t.clone());
                    merge(&t, packs, group, cache)?;
                    next.push(Source::Table(t));
                }
                level = next;
                round += 1;
            }
            let t = tmp("all");
            temps.push(t.clone());
            merge(&t, packs, &level, cache)?;
            std::fs::rename(&t, path)
        })();
        for t in &temps {
            let _ = std::fs::remove_file(t);
        }
        built.map_err(io)?;
        OriginBlobs::open(path, packs).ok_or_else(|| {
            io(std::io::Error::other(
                "the table does not read back as written",
            ))
        })
    }

    /// The pack list the table numbers packs in.
    pub fn packs(&self) -> &[Hash] {
        &self.packs
    }

    /// How many blobs it lists.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table.as_ref().map_or(0, |t| t.len())
    }

    /// The number (in [`Self::packs`]) of the pack holding `id`, if the origin holds it.
    pub fn get(&self, id: &Hash) -> std::io::Result<Option<u32>> {
        let Some(t) = &self.table else {
            return Ok(None);
        };
        match t.find(id, |e| {
            u32::from_le_bytes(e[32..36].try_into().expect("4 bytes"))
        })? {
            Some(p) if p as usize >= self.packs.len() => Err(std::io::Error::other(format!(
                "the entry of blob {id} names pack {p} of {}",
                self.packs.len()
            ))),
            found => Ok(found),
        }
    }
}

/// What a merge reads: the locator file of pack number n, or a table merged before.
enum Source {
    Pack(u32),
    Table(PathBuf),
}

/// A source open, read a block at a time in id order.
struct Cursor {
    records: Records,
    next: usize,
    buf: Vec<u8>,
    at: usize,
}

enum Records {
    Pack(u32, PackLoc),
    Table(Fenced),
}

impl Cursor {
    fn open(source: &Source, packs: &[Hash], cache: &Path) -> std::io::Result<Cursor> {
        let records = match source {
            Source::Pack(n) => {
                let id = packs[*n as usize];
                let loc = crate::locator::open_packed_loc(cache, &id).ok_or_else(|| {
                    std::io::Error::other(format!("the locator of pack {id} did not open"))
                })?;
                Records::Pack(*n, loc)
            }
            Source::Table(t) => {
                let t = OriginBlobs::open(t, packs)
                    .and_then(|o| o.table)
                    .ok_or_else(|| std::io::Error::other("a merged table did not open"))?;
                Records::Table(t)
            }
        };
        Ok(Cursor {
            records,
            next: 0,
            buf: Vec::new(),
            at: 0,
        })
    }

    fn size(&self) -> usize {
        match &self.records {
            Records::Pack(..) => PackLoc::RECORD,
            Records::Table(_) => ENTRY,
        }
    }

    /// The id and pack at the cursor, reading the next block when this one is used up.
    fn peek(&mut self) -> std::io::Result<Option<(Hash, u32)>> {
        let size = self.size();
        if self.at * size >= self.buf.len() {
            let len = match &self.records {
                Records::Pack(_, l) => l.len(),
                Records::Table(t) => t.len(),
            };
            let n = (len - self.next).min(MERGE_BLOCK);
            if n == 0 {
                return Ok(None);
            }
            match &self.records {
                Records::Pack(_, l) => l.read_records(self.next, n, &mut self.buf)?,
                Records::Table(t) => t.read(self.next, n, &mut self.buf)?,
            }
            self.next += n;
            self.at = 0;
        }
        let r = &self.buf[self.at * size..(self.at + 1) * size];
        let id = Hash(r[..32].try_into().expect("32 bytes"));
        let pack = match &self.records {
            Records::Pack(n, _) => *n,
            Records::Table(_) => u32::from_le_bytes(r[32..36].try_into().expect("4 bytes")),
        };
        Ok(Some((id, pack)))
    }
}

/// Writes the table merged from `sources` to `out`: header, entries in id order (one per
/// blob, the lowest-numbered pack listing it), fences.
fn merge(out: &Path, packs: &[Hash], sources: &[Source], cache: &Path) -> std::io::Result<()> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(out)?);
    w.write_all(MAGIC)?;
    w.write_all(key(packs).as_bytes())?;
    w.write_all(&(packs.len() as u64).to_le_bytes())?;
    w.write_all(&0u64.to_le_bytes())?; // the count and checksum, once known
    w.write_all(&0u64.to_le_bytes())?;
    let mut crc = crc32fast::Hasher::new();
    let mut cursors = Vec::with_capacity(sources.len());
    for s in sources {
        cursors.push(Cursor::open(s, packs, cache)?);
    }
    let mut heap = BinaryHeap::with_capacity(cursors.len());
    for (i, c) in cursors.iter_mut().enumerate() {
        if let Some((id, pack)) = c.peek()? {
            heap.push(Reverse((id, pack, i)));
        }
    }
    let mut fences = FenceWriter::default();
    let mut count = 0u64;
    let mut last: Option<Hash> = None;
    while let Some(Reverse((id, pack, i))) = heap.pop() {
        if last.is_some_and(|l| l > id) {
            return Err(std::io::Error::other("a locator is not sorted by id"));
        }
        if last != Some(id) {
            fences.push(&id);
            w.write_all(id.as_bytes())?;
            w.write_all(&pack.to_le_bytes())?;
            crc.update(id.as_bytes());
            crc.update(&pack.to_le_bytes());
            count += 1;
            last = Some(id);
        }
        let c = &mut cursors[i];
        c.at += 1;
        if let Some((next, pack)) = c.peek()? {
            heap.push(Reverse((next, pack, i)));
        }
    }
    let fences = fences.bytes();
    w.write_all(&fences)?;
    crc.update(&fences);
    let file = w.into_inner().map_err(|e| e.into_error())?;
    use std::os::unix::fs::FileExt;
    file.write_all_at(&count.to_le_bytes(), 48)?;
    file.write_all_at(&u64::from(crc.finalize()).to_le_bytes(), 56)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(i: u32) -> (Hash, Vec<u8>) {
        let b = format!("blob {i}").into_bytes();
        (shoal_chunker::hash(&b), b)
    }

    /// A pack of blobs `range`, its locator written.
    fn pack(dir: &Path, range: std::ops::Range<u32>) -> Hash {
        let ids: Vec<Hash> = range.clone().map(|i| blob(i).0).collect();
        let id = shoal_chunker::hash(format!("pack {range:?}").as_bytes());
        crate::locator::test_loc(dir, &id, &ids);
        id
    }

    #[test]
    fn the_table_finds_each_blob_in_the_first_pack_listing_it_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let external = shoal_chunker::hash(b"an external pack");
        let packs = vec![
            pack(dir.path(), 0..3000),
            external,
            pack(dir.path(), 2500..4000), // 500 blobs in both
            pack(dir.path(), 10_000..10_001),
        ];
        let path = table_path(dir.path(), "team/ds");
        let t = OriginBlobs::build(&path, &packs, &[0, 2, 3], dir.path()).unwrap();
        assert_eq!(t.len(), 4001);
        assert_eq!(t.packs().len(), 4);
        for i in 0..4000 {
            let want = if i < 3000 { 0 } else { 2 };
            assert_eq!(t.get(&blob(i).0).unwrap(), Some(want), "blob {i}");
        }
        assert_eq!(t.get(&blob(10_000).0).unwrap(), Some(3));
        for i in 4000..4100 {
            assert_eq!(t.get(&blob(i).0).unwrap(), None, "blob {i}");
        }
        // Opened again for the same pack list; not for another one.
        let again = OriginBlobs::open(&path, &packs).expect("opens");
        assert_eq!(again.get(&blob(3999).0).unwrap(), Some(2));
        assert!(OriginBlobs::open(&path, &packs[..3]).is_none());
        let mut swapped = packs.clone();
        swapped.swap(0, 2);
        assert!(OriginBlobs::open(&path, &swapped).is_none());
        // A damaged table does not open: a byte changed in an entry, or one cut off.
        let mut bytes = std::fs::read(&path).unwrap();
        let good = bytes.clone();
        bytes[HEADER + ENTRY * 7 + 33] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(OriginBlobs::open(&path, &packs).is_none());
        std::fs::write(&path, &good).unwrap();
        assert!(OriginBlobs::open(&path, &packs).is_some());
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        assert!(OriginBlobs::open(&path, &packs).is_none());
        assert_eq!(OriginBlobs::empty().get(&blob(1).0).unwrap(), None);
        // No temporary file left behind.
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn more_packs_than_one_merge_takes_are_merged_in_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let n = (FAN_IN * FAN_IN + 5) as u32;
        // Pack k holds blobs 3k, 3k+1, 3k+2 and 3k+3: each blob's first pack is the lowest.
        let packs: Vec<Hash> = (0..n).map(|k| pack(dir.path(), 3 * k..3 * k + 4)).collect();
        let all: Vec<u32> = (0..n).collect();
        let path = table_path(&dir.path().join("home"), "ds");
        let t = OriginBlobs::build(&path, &packs, &all, dir.path()).unwrap();
        assert_eq!(t.len(), 3 * n as usize + 1);
        for b in 0..3 * n + 1 {
            let first = if b % 3 == 0 && b > 0 {
                b / 3 - 1
            } else {
                b / 3
            };
            assert_eq!(
                t.get(&blob(b).0).unwrap(),
                Some(first.min(n - 1)),
                "blob {b}"
            );
        }
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "temporary tables removed"
        );
    }
}
