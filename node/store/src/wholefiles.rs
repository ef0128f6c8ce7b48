//! Whole-file copies for mounts: a large file whose chunks are all local is also kept as one
//! plain file, so that the kernel can serve reads of it through the mount straight from that
//! file (FUSE passthrough) instead of asking the mount for every 1 MiB.
//!
//! - A copy is named by a hash of the file's chunk list, written only from verified chunks
//!   (store reads verify), flushed to disk and then renamed into place: a copy that exists is
//!   whole, whatever moment the process was killed at. Reads through it are not hashed again
//!   (the kernel reads it like any local file), which is the trade for reading at page-cache
//!   speed; `[cache] files = "0"` turns copies off and every read goes through the mount.
//! - Copies are a cache of the chunk store, never the only place of any byte: they live beside
//!   it, bounded by their own capacity, least recently opened evicted first, and are rebuilt
//!   from chunks when wanted again.
//! - Writing happens on one background thread; reads never wait for it (an embedded mount
//!   waits for pending copies, within a bound, only when it exits).

use shoal_registry::tree::ChunkRef;
use shoal_registry::Hash;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// Reads a chunk's verified bytes (None when it is no longer local).
pub type ReadChunk = Arc<dyn Fn(&Hash) -> Result<Option<Vec<u8>>, String> + Send + Sync>;

/// 16 GiB of copies unless configured (`[cache] files`).
pub const DEFAULT_CAPACITY: u64 = 16 << 30;

struct Entry {
    size: u64,
    /// Larger is more recent.
    used: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    total: u64,
    clock: u64,
    pending: HashSet<String>,
    /// Copies that could not be written: not tried again by this process (a full disk would
    /// otherwise be tried, and logged, at every close).
    failed: HashSet<String>,
}

struct Job {
    name: String,
    size: u64,
    chunks: Arc<Vec<ChunkRef>>,
    read: ReadChunk,
}

/// The whole-file copies of one state directory.
pub struct WholeFiles {
    dir: PathBuf,
    capacity: u64,
    state: Mutex<State>,
    /// Signalled when the last pending copy is done.
    idle: std::sync::Condvar,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
}

/// What copies there are, for `shoal cache`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WholeFileStats {
    pub path: String,
    pub capacity: u64,
    pub used_bytes: u64,
    pub files: u64,
}

/// The name of the copy of a file made of `chunks`.
fn name_of(chunks: &[ChunkRef]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"shoal whole file v1\0");
    for c in chunks {
        h.update(&c.id.0);
        h.update(&c.len.to_le_bytes());
    }
    h.finalize().to_hex().to_string()
}

impl WholeFiles {
    /// Opens (creating) `dir`; forgets copies left half-written by a killed process.
    pub fn open(dir: &Path, capacity: u64) -> std::io::Result<Arc<WholeFiles>> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // A copy being written when its process died (not one being written now).
                if !writer_alive(&name) {
                    let _ = std::fs::remove_file(e.path());
                }
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            let when = meta.modified().ok();
            found.push((when, name, meta.len()));
        }
        // Least recently used first, so the clock orders them as they were.
        found.sort();
        let mut st = State::default();
        for (_, name, size) in found {
            st.clock += 1;
            st.total += size;
            st.entries.insert(
                name,
                Entry {
                    size,
                    used: st.clock,
                },
            );
        }
        let files = Arc::new(WholeFiles {
            dir: dir.to_path_buf(),
            capacity,
            state: Mutex::new(st),
            idle: std::sync::Condvar::new(),
            jobs: Mutex::new(None),
        });
        files.evict(&mut files.lock(), 0);
        Ok(files)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("whole files poisoned")
    }

    pub fn stats(&self) -> WholeFileStats {
        let st = self.lock();
        WholeFileStats {
            path: self.dir.display().to_string(),
            capacity: self.capacity,
            used_bytes: st.total,
            files: st.entries.len() as u64,
        }
    }

    /// Copies queued or being written.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// Waits until no copy is queued or being written, at most `bound`; whether it is so.
    pub fn wait_idle(&self, bound: std::time::Duration) -> bool {
        let st = self.lock();
        let (st, _) = self
            .idle
            .wait_timeout_while(st, bound, |st| !st.pending.is_empty())
            .expect("whole files poisoned");
        st.pending.is_empty()
    }

    /// Removes every copy (`shoal gc`); returns the bytes freed. Readers holding one open keep
    /// reading it.
    pub fn clear(&self) -> u64 {
        let mut st = self.lock();
        for name in st.entries.keys() {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
        st.entries.clear();
        std::mem::take(&mut st.total)
    }

    /// The copy of the file made of `chunks` (`size` bytes), opened for reading, if there is
    /// one; never waits for a copy being written.
    pub fn get(&self, chunks: &[ChunkRef], size: u64) -> Option<File> {
        let name = name_of(chunks);
        let mut st = self.lock();
        st.clock += 1;
        let now = st.clock;
        let e = st.entries.get_mut(&name)?;
        e.used = now;
        let path = self.dir.join(&name);
        match File::open(&path) {
            Ok(f) if f.metadata().is_ok_and(|m| m.len() == size) => Some(f),
            // Removed by another process sharing the directory, or not what its name says.
            other => {
                if other.is_ok() {
                    tracing::warn!(path = %path.display(), "whole-file copy has the wrong size; removing it");
                    let _ = std::fs::remove_file(&path);
                }
                let e = st.entries.remove(&name).expect("present");
                st.total -= e.size;
                None
            }
        }
    }

    /// Keeps a copy of the file made of `chunks` (all local now), written in the background
    /// from `read`; does nothing if there is one, one is being written, or it could never fit.
    pub fn keep(self: &Arc<Self>, chunks: Arc<Vec<ChunkRef>>, size: u64, read: ReadChunk) {
        if size > self.capacity / 2 {
            return;
        }
        let name = name_of(&chunks);
        {
            let mut st = self.lock();
            if st.entries.contains_key(&name)
                || st.failed.contains(&name)
                || !st.pending.insert(name.clone())
            {
                return;
            }
        }
        let job = Job {
            name,
            size,
            chunks,
            read,
        };
        let mut jobs = self.jobs.lock().expect("jobs poisoned");
        if jobs.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            let me = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("shoal-copies".into())
                .spawn(move || {
                    // Copies are for later: readers of the mount come first (this thread's
                    // priority only; Linux applies it per thread).
                    let _ =
                        rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
                    while let Ok(job) = rx.recv() {
                        let Some(files) = me.upgrade() else { return };
                        files.write(job);
                    }
                });
            if spawned.is_err() {
                self.lock().pending.remove(&job.name);
                self.idle.notify_all();
                return;
            }
            *jobs = Some(tx);
        }
        if let Err(mpsc::SendError(job)) = jobs.as_ref().expect("set above").send(job) {
            self.lock().pending.remove(&job.name);
            self.idle.notify_all();
        }
    }

    /// Removes least recently used copies until `room` more bytes fit.
    fn evict(&self, st: &mut State, room: u64) {
        while st.total + room > self.capacity {
            let Some(victim) = st
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(n, _)| n.clone())
            else {
                return;
            };
            let e = st.entries.remove(&victim).expect("present");
            st.total -= e.size;
            // Readers holding it open keep reading it; it is gone for new opens.
            let _ = std::fs::remove_file(self.dir.join(&victim));
        }
    }

    fn write(&self, job: Job) {
        let tmp = self
            .dir
            .join(format!(".{}.{}", job.name, std::process::id()));
        let result = (|| -> Result<(), String> {
            // Copies never take the disk the store needs: they leave 5% of it free (at least
            // 1 GiB, at most 8 GiB).
            let fs = rustix::fs::statvfs(&self.dir).map_err(|e| e.to_string())?;
            let free = fs.f_bavail.saturating_mul(fs.f_frsize);
            let keep_free = (fs.f_blocks.saturating_mul(fs.f_frsize) / 20).clamp(1 << 30, 8 << 30);
            if free < job.size.saturating_add(keep_free) {
                return Err(format!(
                    "{} free on its disk, keeping {} free for the store",
                    bytesize::ByteSize(free),
                    bytesize::ByteSize(keep_free)
                ));
            }
            let mut f = File::create(&tmp).map_err(|e| e.to_string())?;
            let mut written = 0u64;
            for c in job.chunks.iter() {
                let bytes = (job.read)(&c.id)?
                    .ok_or_else(|| format!("chunk {} is no longer local", c.id))?;
                f.write_all(&bytes).map_err(|e| e.to_string())?;
                written += bytes.len() as u64;
            }
            if written != job.size {
                return Err(format!(
                    "chunks add up to {written} bytes, not {}",
                    job.size
                ));
            }
            // Durable before it is visible: a copy that exists is whole.
            f.sync_data().map_err(|e| e.to_string())?;
            // Room is made once the copy is known to be good (the capacity is exceeded by at
            // most the one copy being written meanwhile).
            self.evict(&mut self.lock(), job.size);
            std::fs::rename(&tmp, self.dir.join(&job.name)).map_err(|e| e.to_string())
        })();
        let mut st = self.lock();
        st.pending.remove(&job.name);
        if st.pending.is_empty() {
            self.idle.notify_all();
        }
        match result {
            Ok(()) => {
                st.clock += 1;
                let used = st.clock;
                if let Some(old) = st.entries.insert(
                    job.name,
                    Entry {
                        size: job.size,
                        used,
                    },
                ) {
                    st.total -= old.size;
                }
                st.total += job.size;
            }
            Err(e) => {
                st.failed.insert(job.name);
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not write a whole-file copy; reads of that file keep going through the mount");
            }
        }
    }
}

/// The finished copies under `dir` (temporary ones start with a dot): path and size.
fn finished(dir: &Path) -> impl Iterator<Item = (PathBuf, u64)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| (e.path(), e.metadata().map_or(0, |m| m.len())))
}

/// Copies under `dir` without opening them for use (`shoal cache` with no daemon running).
pub fn scan(dir: &Path, capacity: u64) -> WholeFileStats {
    let (mut files, mut bytes) = (0, 0);
    for (_, len) in finished(dir) {
        files += 1;
        bytes += len;
    }
    WholeFileStats {
        path: dir.display().to_string(),
        capacity,
        used_bytes: bytes,
        files,
    }
}

/// Removes the copies under `dir` (`shoal gc` with no daemon running); returns bytes freed.
pub fn clear_dir(dir: &Path) -> u64 {
    finished(dir)
        .filter(|(path, _)| std::fs::remove_file(path).is_ok())
        .map(|(_, len)| len)
        .sum()
}

/// Whether the process that writes the temporary copy `name` (".<copy>.<pid>") still runs.
fn writer_alive(name: &str) -> bool {
    name.rsplit('.')
        .next()
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(bytes: &[u8]) -> ChunkRef {
        ChunkRef {
            id: Hash(*blake3::hash(bytes).as_bytes()),
            len: bytes.len() as u32,
        }
    }

    fn wait_for(files: &WholeFiles, chunks: &[ChunkRef], size: u64) -> Option<File> {
        for _ in 0..500 {
            if let Some(f) = files.get(chunks, size) {
                return Some(f);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        None
    }

    #[test]
    fn copies_are_whole_bounded_and_rebuilt_from_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let blobs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 1000]).collect();
        let store: HashMap<Hash, Vec<u8>> =
            blobs.iter().map(|b| (chunk(b).id, b.clone())).collect();
        let store = Arc::new(Mutex::new(store));
        let s = store.clone();
        let read: ReadChunk = Arc::new(move |id| Ok(s.lock().unwrap().get(id).cloned()));
        let files = WholeFiles::open(dir.path(), 4500).unwrap();
        let a = Arc::new(vec![chunk(&blobs[0]), chunk(&blobs[1])]);
        let b = Arc::new(vec![chunk(&blobs[2]), chunk(&blobs[3])]);
        assert!(files.get(&a, 2000).is_none());
        files.keep(a.clone(), 2000, read.clone());
        let mut f = wait_for(&files, &a, 2000).expect("copy of a");
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut got).unwrap();
        assert_eq!(got, [blobs[0].clone(), blobs[1].clone()].concat());
        // A second file does not fit beside the first: the least recently used goes.
        files.keep(b.clone(), 2000, read.clone());
        assert!(wait_for(&files, &b, 2000).is_some());
        files.keep(
            Arc::new(vec![chunk(&blobs[3]), chunk(&blobs[0])]),
            2000,
            read.clone(),
        );
        assert!(wait_for(&files, &[chunk(&blobs[3]), chunk(&blobs[0])], 2000).is_some());
        assert!(files.get(&a, 2000).is_none(), "a was least recently used");
        assert!(files.stats().used_bytes <= 4500);
        // A chunk gone from the store: no copy, nothing half-written left.
        store.lock().unwrap().remove(&chunk(&blobs[1]).id);
        files.keep(a.clone(), 2000, read.clone());
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(files.get(&a, 2000).is_none());
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
        // Reopened (another process, or after a restart): the copies are still known.
        drop(files);
        // Left by a writer that died: removed. Being written by a live process: kept.
        let dead = dir.path().join(".half.999999999");
        std::fs::write(&dead, b"x").unwrap();
        let mut writer = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let live = dir.path().join(format!(".half.{}", writer.id()));
        std::fs::write(&live, b"x").unwrap();
        let again = WholeFiles::open(dir.path(), 4500).unwrap();
        let _ = writer.kill();
        let _ = writer.wait();
        assert_eq!(again.stats().files, 2);
        assert!(again.get(&b, 2000).is_some());
        assert!(!dead.exists());
        assert!(live.exists());
        // `shoal gc` removes the copies.
        assert_eq!(again.clear(), 4000);
        assert!(again.get(&b, 2000).is_none());
        assert_eq!(scan(dir.path(), 4500).files, 0);
    }
}
