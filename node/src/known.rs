//! What the last publish of a dataset from this machine learned about its source files: each
//! file's state as `stat` saw it (size, mtime, ctime, inode, device) and its chunks. A later
//! publish of the same directory takes a file whose state is unchanged, and whose chunks the
//! origin still holds, as it was, without reading it (`publish --rehash` reads everything).
//!
//! Kept in `$SHOAL_HOME/publish/<dataset>.state`, written after the version exists (a
//! temporary file renamed into place). A file modified within [`RACY`] of the scan that read
//! it is not recorded: a change in the same timestamp tick as that scan would keep its mtime,
//! so the next publish must read it (git's "racily clean" rule).

use serde::{Deserialize, Serialize};
use shoal_registry::tree::ChunkRef;
use shoal_registry::Params;
use std::collections::HashMap;
use std::io::Write;
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

const FORMAT: u8 = 1;

#[derive(Serialize, Deserialize)]
struct Header {
    format: u8,
    /// The directory published, as canonicalised.
    source: String,
    chunking: Params,
}

#[derive(Serialize, Deserialize)]
struct Record<'a> {
    path: &'a str,
    stat: FileStat,
    chunks: Vec<ChunkRef>,
}

/// Key of a path: 128 bits of its BLAKE3 (paths themselves would double the memory).
fn key(path: &str) -> u128 {
    u128::from_le_bytes(
        shoal_chunker::hash(path.as_bytes()).0[..16]
            .try_into()
            .expect("16 bytes"),
    )
}

/// The files a previous publish of one source directory recorded.
#[derive(Default)]
pub struct Known {
    files: HashMap<u128, (FileStat, Vec<ChunkRef>)>,
}

/// Where the state of `dataset`'s publishes lives under `home`.
pub fn state_path(home: &Path, dataset: &str) -> PathBuf {
    home.join("publish")
        .join(format!("{}.state", dataset.replace('/', "%")))
}

impl Known {
    /// What the last publish of `source` (canonical) with `chunking` recorded at `path`;
    /// empty if nothing was, or for another directory or chunking, or if the file is not
    /// readable as a state (then a warning says so: the publish reads every file).
    pub fn load(path: &Path, source: &str, chunking: Params) -> Known {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Known::default(),
            Err(e) => {
                tracing::warn!("reading {}: {e}; every file is read", path.display());
                return Known::default();
            }
        };
        match Self::parse(&bytes, source, chunking) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("{}: {e}; every file is read", path.display());
                Known::default()
            }
        }
    }

    fn parse(bytes: &[u8], source: &str, chunking: Params) -> Result<Known, String> {
        let (header, mut rest): (Header, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|e| format!("bad header: {e}"))?;
        if header.format != FORMAT || header.source != source || header.chunking != chunking {
            return Ok(Known::default());
        }
        let mut files = HashMap::new();
        while !rest.is_empty() {
            let (r, tail): (Record, &[u8]) =
                postcard::take_from_bytes(rest).map_err(|e| format!("bad record: {e}"))?;
            files.insert(key(r.path), (r.stat, r.chunks));
            rest = tail;
        }
        Ok(Known { files })
    }

    /// The chunks of the file at `path` if it was recorded in exactly this state.
    pub fn get(&self, path: &str, stat: &FileStat) -> Option<&[ChunkRef]> {
        match self.files.get(&key(path)) {
            Some((s, chunks)) if s == stat => Some(chunks),
            _ => None,
        }
    }

    /// Records `files` (path, state, chunks) as the state of `source` published with
    /// `chunking`, leaving out files modified less than [`RACY`] before `scanned_ns` (the
    /// scan's start, in ns since the epoch). Replaces the previous state whole.
    pub fn save<'a>(
        path: &Path,
        source: &str,
        chunking: Params,
        scanned_ns: i64,
        files: impl Iterator<Item = (&'a str, &'a FileStat, &'a [ChunkRef])>,
    ) -> std::io::Result<()> {
        let dir = path.parent().expect("a state file has a directory");
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("tmp");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        let header = Header {
            format: FORMAT,
            source: source.to_string(),
            chunking,
        };
        let to_io = |e: postcard::Error| std::io::Error::other(e.to_string());
        postcard::to_io(&header, &mut w).map_err(to_io)?;
        let racy_from = scanned_ns - RACY.as_nanos() as i64;
        for (p, stat, chunks) in files {
            if stat.mtime_ns >= racy_from || stat.ctime_ns >= racy_from {
                continue;
            }
            let r = Record {
                path: p,
                stat: *stat,
                chunks: chunks.to_vec(),
            };
            postcard::to_io(&r, &mut w).map_err(to_io)?;
        }
        w.flush()?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}
