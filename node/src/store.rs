//! The local chunk store: blob bytes appended to large segment files, the index in sled.
//!
//! Crash safety comes from ordering and verification. A batch of blobs is appended to the
//! segment before its index entries are inserted, so after a killed process every entry
//! points at complete bytes (the page cache outlives the
//! process). Segment data is not `fsync`ed per batch: after a power cut an entry may point at
//! bytes that never reached the disk, and since every read is verified against the blob's id,
//! such an entry is detected, dropped and the blob fetched again. Bytes written by a batch
//! whose index update was lost are unreferenced garbage, never served.

use shoal_chunker::Hash;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Segments are rolled over at this size.
const SEGMENT_MAX: u64 = 1 << 30;

/// A local store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("local store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("local store index {path}: {source}")]
    Db { path: PathBuf, source: sled::Error },
    #[error("local store {path} is in use by another shoal process (a pull, publish or node); wait for it or stop it")]
    Locked { path: PathBuf },
    #[error("blob {id} in local store segment {path} is corrupt (its bytes do not match its id); it was dropped and will be fetched again")]
    Corrupt { id: Hash, path: PathBuf },
}

/// Where blobs live on this machine. Implementations must be safe to share between threads.
pub trait ChunkStore: Send + Sync {
    /// Whether the blob is stored.
    fn contains(&self, id: &Hash) -> Result<bool, StoreError>;
    /// The blob's bytes, verified against `id`; `None` when absent.
    fn get(&self, id: &Hash) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores verified blobs. They survive the process being killed once [`Self::flush`] has
    /// returned (sled also flushes on its own every half second).
    fn put_batch(&self, blobs: &[(Hash, &[u8])]) -> Result<(), StoreError>;
    /// Number of blobs and their total bytes.
    fn usage(&self) -> Result<(u64, u64), StoreError>;
    /// Makes every index update so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}

struct Writer {
    segment: u32,
    file: File,
    len: u64,
}

/// [`ChunkStore`] over sled and append-only segment files.
pub struct SegmentStore {
    dir: PathBuf,
    db: sled::Db,
    index: sled::Tree,
    writer: Mutex<Writer>,
    readers: RwLock<HashMap<u32, Arc<File>>>,
}

fn seg_name(n: u32) -> String {
    format!("{n:08}.seg")
}

impl SegmentStore {
    /// Opens (creating if needed) the store under `dir`.
    pub fn open(dir: &Path) -> Result<SegmentStore, StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let segs = dir.join("segments");
        std::fs::create_dir_all(&segs).map_err(io)?;
        let db_path = dir.join("index");
        let db = sled::Config::new()
            .path(&db_path)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref ioe)
                    if ioe.kind() == std::io::ErrorKind::WouldBlock
                        || ioe.to_string().contains("lock") =>
                {
                    StoreError::Locked {
                        path: dir.to_path_buf(),
                    }
                }
                source => StoreError::Db {
                    path: db_path.clone(),
                    source,
                },
            })?;
        let index = db.open_tree("blobs").map_err(|source| StoreError::Db {
            path: db_path.clone(),
            source,
        })?;
        let mut last = 0u32;
        for e in std::fs::read_dir(&segs).map_err(io)? {
            let name = e.map_err(io)?.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_suffix(".seg"))
                .and_then(|s| s.parse().ok())
            {
                last = last.max(n);
            }
        }
        let writer = Self::open_segment(&segs, last.max(1))?;
        Ok(SegmentStore {
            dir: dir.to_path_buf(),
            db,
            index,
            writer: Mutex::new(writer),
            readers: RwLock::default(),
        })
    }

    fn open_segment(segs: &Path, n: u32) -> Result<Writer, StoreError> {
        let path = segs.join(seg_name(n));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| StoreError::Io { path, source })?
            .len();
        Ok(Writer {
            segment: n,
            file,
            len,
        })
    }

    fn seg_path(&self, n: u32) -> PathBuf {
        self.dir.join("segments").join(seg_name(n))
    }

    fn reader(&self, n: u32) -> Result<Arc<File>, StoreError> {
        if let Some(f) = self.readers.read().expect("reader map poisoned").get(&n) {
            return Ok(f.clone());
        }
        let path = self.seg_path(n);
        let f = Arc::new(File::open(&path).map_err(|source| StoreError::Io { path, source })?);
        self.readers
            .write()
            .expect("reader map poisoned")
            .insert(n, f.clone());
        Ok(f)
    }

    fn db_err(&self, source: sled::Error) -> StoreError {
        StoreError::Db {
            path: self.dir.join("index"),
            source,
        }
    }

    /// Drops a blob's index entry (its bytes become garbage).
    pub fn remove(&self, id: &Hash) -> Result<(), StoreError> {
        self.index
            .remove(id.as_bytes())
            .map(|_| ())
            .map_err(|e| self.db_err(e))
    }
}

fn encode_loc(seg: u32, off: u64, len: u32) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..4].copy_from_slice(&seg.to_be_bytes());
    v[4..12].copy_from_slice(&off.to_be_bytes());
    v[12..].copy_from_slice(&len.to_be_bytes());
    v
}

fn decode_loc(v: &[u8]) -> Option<(u32, u64, u32)> {
    if v.len() != 16 {
        return None;
    }
    Some((
        u32::from_be_bytes(v[..4].try_into().ok()?),
        u64::from_be_bytes(v[4..12].try_into().ok()?),
        u32::from_be_bytes(v[12..].try_into().ok()?),
    ))
}

impl ChunkStore for SegmentStore {
    fn contains(&self, id: &Hash) -> Result<bool, StoreError> {
        self.index
            .contains_key(id.as_bytes())
            .map_err(|e| self.db_err(e))
    }

    fn get(&self, id: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(v) = self.index.get(id.as_bytes()).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        let corrupt = |seg| {
            let _ = self.remove(id);
            StoreError::Corrupt {
                id: *id,
                path: self.seg_path(seg),
            }
        };
        let Some((seg, off, len)) = decode_loc(&v) else {
            return Err(corrupt(0));
        };
        let mut buf = vec![0u8; len as usize];
        match self.reader(seg)?.read_exact_at(&mut buf, off) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(corrupt(seg)),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.seg_path(seg),
                    source,
                })
            }
        }
        if !id.verify(&buf) {
            return Err(corrupt(seg));
        }
        Ok(Some(buf))
    }

    fn put_batch(&self, blobs: &[(Hash, &[u8])]) -> Result<(), StoreError> {
        if blobs.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        {
            let mut w = self.writer.lock().expect("segment writer poisoned");
            if w.len >= SEGMENT_MAX {
                let next = w.segment + 1;
                *w = Self::open_segment(&self.dir.join("segments"), next)?;
            }
            let path = self.seg_path(w.segment);
            let io = |source| StoreError::Io {
                path: path.clone(),
                source,
            };
            let start = w.len;
            let mut off = start;
            for (id, bytes) in blobs {
                batch.insert(
                    id.as_bytes(),
                    &encode_loc(w.segment, off, bytes.len() as u32),
                );
                off += bytes.len() as u64;
            }
            let mut buf = Vec::with_capacity((off - start) as usize);
            for (_, bytes) in blobs {
                buf.extend_from_slice(bytes);
            }
            if let Err(e) = w.file.write_all(&buf) {
                // Whatever part was written is unreferenced; later appends start after it.
                w.len = w.file.metadata().map(|m| m.len()).unwrap_or(off);
                return Err(io(e));
            }
            w.len = off;
        }
        self.index.apply_batch(batch).map_err(|e| self.db_err(e))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| self.db_err(e))
    }

    fn usage(&self) -> Result<(u64, u64), StoreError> {
        let mut n = 0;
        let mut bytes = 0;
        for kv in self.index.iter() {
            let (_, v) = kv.map_err(|e| self.db_err(e))?;
            n += 1;
            bytes += decode_loc(&v).map(|l| l.2 as u64).unwrap_or(0);
        }
        Ok((n, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_verify_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = b"alpha".to_vec();
        let b = vec![9u8; 100_000];
        let (ia, ib) = (shoal_chunker::hash(&a), shoal_chunker::hash(&b));
        {
            let s = SegmentStore::open(dir.path()).unwrap();
            assert!(!s.contains(&ia).unwrap());
            s.put_batch(&[(ia, &a), (ib, &b)]).unwrap();
            assert_eq!(s.get(&ia).unwrap().unwrap(), a);
            assert_eq!(s.usage().unwrap(), (2, 100_005));
            s.flush().unwrap();
            // A second open of the same store while this one lives is refused clearly.
            let err = SegmentStore::open(dir.path()).err().expect("locked");
            assert!(
                err.to_string().contains("in use by another shoal process"),
                "{err}"
            );
        }
        let s = SegmentStore::open(dir.path()).unwrap();
        assert_eq!(s.get(&ib).unwrap().unwrap(), b);
        // Corrupt the segment: the read is refused and the entry dropped.
        let seg = dir.path().join("segments").join(seg_name(1));
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(b"X", 0).unwrap();
        let err = s.get(&ia).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(!s.contains(&ia).unwrap());
        assert_eq!(s.get(&ib).unwrap().unwrap(), b);
    }
}
