//! What the last publish of a dataset from this machine learned about its source files: each
//! file's state as `stat` saw it (size, mtime, ctime, inode, device) and its chunks. A later
//! publish of the same directory takes a file whose state is unchanged, and whose chunks the
//! origin still holds, as it was, without reading it (`publish --rehash` reads everything).
//!
//! Kept in `$SHOAL_HOME/publish/<dataset>.state`: a header, then one record per file (its
//! path relative to the directory published), in the order a publish walks the tree
//! (directory by directory, each one's entries by name: [`walk_order`]). A publish reads the
//! previous state as a stream beside its own walk, and writes the new one as it goes (a
//! temporary file, renamed into place once the version exists): memory holds one record of
//! each, whatever the number of files. A file modified within [`RACY`] of the scan that read
//! it is not recorded: a change in the same timestamp tick as that scan would keep its mtime,
//! so the next publish must read it (git's "racily clean" rule).

use serde::{Deserialize, Serialize};
use shoal_registry::tree::ChunkRef;
use shoal_registry::Params;
use std::cmp::Ordering;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Files modified less than this before their scan are read again by the next publish.
pub const RACY: std::time::Duration = std::time::Duration::from_secs(2);

/// A file's state as `stat` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

impl FileStat {
    pub fn of(meta: &std::fs::Metadata) -> FileStat {
        FileStat {
            size: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

/// 2: records in walk order, paths relative, each record length-prefixed. (1 held absolute
/// paths in no order and was read whole into a map; such a state is ignored: the publish
/// after an upgrade reads every file once.)
const FORMAT: u8 = 2;
/// Longest record read back (a file's chunk list: ~40 bytes a chunk, so a file of ~6M
/// chunks); a longer one is taken as damage.
const MAX_RECORD: usize = 256 << 20;

#[derive(Serialize, Deserialize)]
struct Header {
    format: u8,
    /// The directory published, as canonicalised.
    source: String,
    chunking: Params,
}

#[derive(Serialize, Deserialize)]
struct Record {
    path: String,
    stat: FileStat,
    chunks: Vec<ChunkRef>,
}

/// The order of a publish's walk over relative paths: component by component, each by its
/// bytes (`a/b` before `a.txt`, as the walk enters `a` before it reaches `a.txt`).
pub fn walk_order(a: &str, b: &str) -> Ordering {
    a.split('/').cmp(b.split('/'))
}

/// Where the state of `dataset`'s publishes lives under `home`.
pub fn state_path(home: &Path, dataset: &str) -> PathBuf {
    home.join("publish")
        .join(format!("{}.state", dataset.replace('/', "%")))
}

/// The files a previous publish of one source directory recorded, read forward as a publish
/// walks the same directory.
#[derive(Default)]
pub struct Known {
    reader: Option<(PathBuf, BufReader<std::fs::File>)>,
    next: Option<Record>,
}

impl Known {
    /// What the last publish of `source` (canonical) with `chunking` recorded at `path`;
    /// empty if nothing was, or for another directory or chunking, or if the file is not
    /// readable as a state (then a warning says so: the publish reads every file).
    pub fn open(path: &Path, source: &str, chunking: Params) -> Known {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Known::default(),
            Err(e) => {
                tracing::warn!("reading {}: {e}; every file is read", path.display());
                return Known::default();
            }
        };
        let mut reader = BufReader::with_capacity(256 << 10, file);
        let header = match read_record::<Header>(&mut reader) {
            Ok(Some(h)) => h,
            Ok(None) => return Known::default(),
            Err(e) => {
                // A format-1 state starts with its header unprefixed: not damage, just old.
                tracing::debug!("{}: {e}; every file is read", path.display());
                return Known::default();
            }
        };
        if header.format != FORMAT || header.source != source || header.chunking != chunking {
            return Known::default();
        }
        let mut known = Known {
            reader: Some((path.to_path_buf(), reader)),
            next: None,
        };
        known.advance();
        known
    }

    fn advance(&mut self) {
        let Some((path, r)) = &mut self.reader else {
            self.next = None;
            return;
        };
        match read_record::<Record>(r) {
            Ok(Some(rec)) => {
                if let Some(prev) = &self.next {
                    if walk_order(&prev.path, &rec.path) != Ordering::Less {
                        tracing::warn!(
                            "{}: records out of order at {:?}; the remaining files are read",
                            path.display(),
                            rec.path
                        );
                        self.reader = None;
                        self.next = None;
                        return;
                    }
                }
                self.next = Some(rec);
            }
            Ok(None) => {
                self.reader = None;
                self.next = None;
            }
            Err(e) => {
                tracing::warn!("{}: {e}; the remaining files are read", path.display());
                self.reader = None;
                self.next = None;
            }
        }
    }

    /// The chunks of the file at `path` (relative) if it was recorded in exactly this state.
    /// Files must be asked for in walk order ([`walk_order`]): the records before `path` are
    /// passed over for good.
    pub fn take(&mut self, path: &str, stat: &FileStat) -> Option<Vec<ChunkRef>> {
        loop {
            let rec = self.next.as_ref()?;
            match walk_order(&rec.path, path) {
                Ordering::Less => self.advance(),
                Ordering::Greater => return None,
                Ordering::Equal => {
                    let rec = self.next.take().expect("just seen");
                    self.advance();
                    return (rec.stat == *stat).then_some(rec.chunks);
                }
            }
        }
    }
}

/// One length-prefixed postcard value; `None` at a clean end of the file.
fn read_record<T: serde::de::DeserializeOwned>(r: &mut impl Read) -> Result<Option<T>, String> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_RECORD {
        return Err(format!("a record of {len} bytes"));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)
        .map_err(|e| format!("a truncated record: {e}"))?;
    postcard::from_bytes::<T>(&buf)
        .map(Some)
        .map_err(|e| format!("bad record: {e}"))
}

fn write_record<T: Serialize>(w: &mut impl Write, value: &T) -> std::io::Result<()> {
    let bytes = postcard::to_allocvec(value).map_err(|e| std::io::Error::other(e.to_string()))?;
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(&bytes)
}

/// The state a publish writes as it goes: [`KnownWriter::record`] each file in walk order,
/// then [`KnownWriter::commit`] once the version exists (dropped uncommitted, the temporary
/// file goes and the previous state stays).
pub struct KnownWriter {
    path: PathBuf,
    tmp: PathBuf,
    w: Option<BufWriter<std::fs::File>>,
    racy_from: i64,
}

impl KnownWriter {
    /// Starts the state of `source` published with `chunking`, leaving out files modified
    /// less than [`RACY`] before `scanned_ns` (the scan's start, in ns since the epoch).
    pub fn create(
        path: &Path,
        source: &str,
        chunking: Params,
        scanned_ns: i64,
    ) -> std::io::Result<KnownWriter> {
        let dir = path.parent().expect("a state file has a directory");
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("tmp");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut w = BufWriter::with_capacity(256 << 10, file);
        write_record(
            &mut w,
            &Header {
                format: FORMAT,
                source: source.to_string(),
                chunking,
            },
        )?;
        Ok(KnownWriter {
            path: path.to_path_buf(),
            tmp,
            w: Some(w),
            racy_from: scanned_ns - RACY.as_nanos() as i64,
        })
    }

    /// Records one file (path relative to the source), after every file before it in walk
    /// order.
    pub fn record(
        &mut self,
        path: &str,
        stat: &FileStat,
        chunks: &[ChunkRef],
    ) -> std::io::Result<()> {
        if stat.mtime_ns >= self.racy_from || stat.ctime_ns >= self.racy_from {
            return Ok(());
        }
        let Some(w) = &mut self.w else {
            return Err(std::io::Error::other("an earlier write failed"));
        };
        let written = write_record(
            w,
            &Record {
                path: path.to_string(),
                stat: *stat,
                chunks: chunks.to_vec(),
            },
        );
        if written.is_err() {
            // The state would miss files: none is written, the previous one stays.
            self.w = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
        written
    }

    /// Makes the state written the one the next publish reads.
    pub fn commit(mut self) -> std::io::Result<()> {
        let w = self
            .w
            .take()
            .ok_or_else(|| std::io::Error::other("an earlier write failed"))?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)
    }
}

impl Drop for KnownWriter {
    fn drop(&mut self) {
        if self.w.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_order_enters_a_directory_before_the_names_after_it() {
        let mut paths = vec!["a.txt", "a/b", "a/b/c", "b", "a", "a-b/x", "a/a"];
        paths.sort_by(|a, b| walk_order(a, b));
        assert_eq!(paths, ["a", "a/a", "a/b", "a/b/c", "a-b/x", "a.txt", "b"]);
    }

    #[test]
    fn a_state_is_read_back_forward_and_skips_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ds.state");
        let p = Params::default();
        let stat = |i: u64| FileStat {
            size: i,
            mtime_ns: 1,
            ctime_ns: 1,
            ino: i,
            dev: 1,
        };
        let chunks = |i: u8| {
            vec![ChunkRef {
                id: shoal_registry::Hash([i; 32]),
                len: i as u32,
            }]
        };
        let mut w = KnownWriter::create(&path, "/src", p, 10_000_000_000).unwrap();
        for (i, name) in ["a/x", "a/y", "b", "c/d/e"].iter().enumerate() {
            w.record(name, &stat(i as u64), &chunks(i as u8)).unwrap();
        }
        // Not committed: nothing to read.
        drop(w);
        assert!(Known::open(&path, "/src", p)
            .take("a/x", &stat(0))
            .is_none());
        let mut w = KnownWriter::create(&path, "/src", p, 10_000_000_000).unwrap();
        for (i, name) in ["a/x", "a/y", "b", "c/d/e"].iter().enumerate() {
            w.record(name, &stat(i as u64), &chunks(i as u8)).unwrap();
        }
        w.commit().unwrap();
        let mut k = Known::open(&path, "/src", p);
        assert_eq!(k.take("a/x", &stat(0)), Some(chunks(0)));
        // Changed state: read again. A new file between: nothing.
        assert_eq!(k.take("a/y", &stat(9)), None);
        assert_eq!(k.take("a/z", &stat(1)), None);
        // "b" passed over: the walk went past it.
        assert_eq!(k.take("c/d/e", &stat(3)), Some(chunks(3)));
        assert_eq!(k.take("d", &stat(3)), None);
        // Another source or chunking: empty.
        assert!(Known::open(&path, "/other", p)
            .take("a/x", &stat(0))
            .is_none());
        // Damage: a truncated file yields what comes before it.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let mut k = Known::open(&path, "/src", p);
        assert_eq!(k.take("b", &stat(2)), Some(chunks(2)));
        assert_eq!(k.take("c/d/e", &stat(3)), None);
    }
}
