//! Filling the kernel's page cache ahead of readers (FUSE `notify_store`), from a thread of its
//! own.
//!
//! Every FUSE read is a round trip through the kernel that wakes a worker thread and then the
//! reader; on small files that is most of the time a read takes. Two patterns are served
//! without it:
//! - the rest of a small file once its first read arrived (readers read small files whole; the
//!   kernel's first readahead window covers 16-64 KiB of them);
//! - whole files further down a directory that a reader goes through in order (`tar`, `cp -r`,
//!   `rsync`, a loader reading a sorted list): after two files read in a row, the next
//!   [`PUSH_AHEAD`] bytes of files are pushed, and again each time the reader reaches one that
//!   was not pushed yet. Only files already local are pushed; with sequential prefetch on (the
//!   default) the files of the same window that are not local yet are fetched ahead, and pushed
//!   when the reader's next start finds them local.
//!
//! Pushed bytes are the same verified chunk bytes a read would have returned. Pushing is best
//! effort: a full queue drops work, and a file whose inode the kernel no longer holds is skipped.
//! The thread may wait on a page the kernel is reading through a worker; workers never wait on
//! it, so it cannot deadlock the mount.

use crate::layout::FileLayout;
use crate::model::{Inodes, Kind, Source};
use fuser::{INodeNo, Notifier};
use shoal_registry::tree::{ChunkRef, FileContent};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};

/// Bytes of whole files pushed ahead of a reader going through a directory in order.
pub const PUSH_AHEAD: u64 = 16 << 20;
/// Pushes waiting at most; more are dropped.
const QUEUE: usize = 4096;
/// Directories followed at once (readers going through different directories).
const DIR_STREAMS: usize = 4;
/// Largest single notification sent to the kernel.
const MAX_STORE: usize = 1 << 20;

/// Bytes of one file to push: `start..size`.
pub struct Job {
    pub ino: u64,
    pub start: u64,
    pub size: u64,
    pub chunks: Arc<Vec<ChunkRef>>,
    /// When pushed ahead of a reader going through a directory: the reader's stream and the
    /// file's index in the directory (skipped once the reader is past it).
    pub at: Option<(u64, usize)>,
}

/// A reader going through one directory.
struct DirStream {
    id: u64,
    dir: u64,
    /// Index of the file it started last (as far as reads reaching the daemon show).
    last: usize,
    /// Files before this index were pushed (or queued).
    pushed_to: usize,
    /// Files before this index were handed to prefetch (or pushed).
    fetched_to: usize,
}

/// Where readers are in directories, and the queue to the pushing thread.
pub struct Pusher {
    tx: SyncSender<Job>,
    rx: Mutex<Option<Receiver<Job>>>,
    streams: Arc<Mutex<Vec<DirStream>>>,
    next_stream: AtomicU64,
    bytes_pushed: Arc<AtomicU64>,
}

impl Pusher {
    /// A pusher counting what it pushed in `bytes_pushed`.
    pub fn new(bytes_pushed: Arc<AtomicU64>) -> Pusher {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        Pusher {
            tx,
            rx: Mutex::new(Some(rx)),
            streams: Arc::default(),
            next_stream: AtomicU64::new(1),
            bytes_pushed,
        }
    }

    /// Queues a push; dropped when the queue is full (or the thread is gone).
    pub fn push(&self, job: Job) {
        let _ = self.tx.try_send(job);
    }

    /// A reader started file `index` of directory `dir` (its entries `children`): if it goes
    /// through the directory in order, queue the local files ahead of it not pushed yet, and
    /// return the chunks of the files in the same window that are not local (to fetch ahead,
    /// with `fetch_ahead`; else nothing).
    pub fn started<S: Source>(
        &self,
        inodes: &Inodes<S>,
        dir: u64,
        index: usize,
        listing: &crate::model::Listing,
        small_file: u64,
        fetch_ahead: bool,
    ) -> Vec<ChunkRef> {
        let (stream, from, fetched_to) = {
            let mut streams = self.streams.lock().expect("push streams poisoned");
            // The reader this start continues: in the same directory, past the last file it
            // started, and not beyond what was pushed for it (a reader reading pushed files from
            // the page cache is not seen until it runs out of them). Else a new reader, which
            // gets nothing pushed until its next file follows.
            let continues = streams.iter().position(|s| {
                s.dir == dir && index > s.last && index <= s.pushed_to.max(s.last + 1)
            });
            let Some(i) = continues else {
                if streams.len() >= DIR_STREAMS {
                    streams.remove(0);
                }
                streams.push(DirStream {
                    id: self.next_stream.fetch_add(1, Ordering::Relaxed),
                    dir,
                    last: index,
                    pushed_to: index + 1,
                    fetched_to: index + 1,
                });
                return Vec::new();
            };
            let mut s = streams.remove(i);
            s.last = index;
            let from = s.pushed_to.max(index + 1);
            let (id, fetched_to) = (s.id, s.fetched_to);
            streams.push(s);
            (id, from, fetched_to)
        };
        let mut bytes = 0;
        let mut i = from;
        let mut jobs = Vec::new();
        let mut fetch = Vec::new();
        // Pushed: the local files from `from` on, up to the first one that is not local.
        let mut pushed_to = None;
        while i < listing.entries.len() && bytes < PUSH_AHEAD {
            let Ok(ino) = inodes.child(dir, i) else {
                break;
            };
            if let Ok(Kind::File {
                size,
                content: FileContent::Chunks(chunks),
            }) = inodes.kind(ino)
            {
                if size > 0 && size <= small_file {
                    bytes += size;
                    let local = pushed_to.is_none() && inodes.source().is_local(&chunks);
                    if local {
                        jobs.push(Job {
                            ino,
                            start: 0,
                            size,
                            chunks: Arc::new(chunks),
                            at: Some((stream, i)),
                        });
                    } else {
                        pushed_to.get_or_insert(i);
                        if !fetch_ahead {
                            break;
                        }
                        if i >= fetched_to {
                            fetch.extend(chunks);
                        }
                    }
                }
            }
            i += 1;
        }
        {
            let mut streams = self.streams.lock().expect("push streams poisoned");
            if let Some(s) = streams.iter_mut().find(|s| s.id == stream) {
                s.pushed_to = s.pushed_to.max(pushed_to.unwrap_or(i));
                s.fetched_to = s.fetched_to.max(i);
            }
        }
        for j in jobs {
            self.push(j);
        }
        fetch
    }

    /// What the pushing thread needs (once: `None` afterwards).
    pub fn runner(&self) -> Option<Runner> {
        Some(Runner {
            rx: self.rx.lock().expect("push queue poisoned").take()?,
            streams: self.streams.clone(),
            pushed: self.bytes_pushed.clone(),
        })
    }
}

/// The pushing thread, before it is started.
pub struct Runner {
    rx: Receiver<Job>,
    streams: Arc<Mutex<Vec<DirStream>>>,
    pushed: Arc<AtomicU64>,
}

impl Runner {
    /// Starts the thread; it ends when the mount's filesystem is dropped or unmounted.
    pub fn start<S: Source>(self, inodes: Arc<Inodes<S>>, notifier: Notifier) {
        let Runner {
            rx,
            streams,
            pushed,
        } = self;
        let spawned = std::thread::Builder::new()
            .name("shoal-push".into())
            .spawn(move || run(rx, &inodes, &streams, &pushed, &notifier));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the page-cache push thread; reads still work");
        }
    }
}

fn run<S: Source>(
    rx: Receiver<Job>,
    inodes: &Inodes<S>,
    streams: &Mutex<Vec<DirStream>>,
    pushed: &AtomicU64,
    notifier: &Notifier,
) {
    for job in rx {
        if let Some((stream, i)) = job.at {
            // The reader is already past it (it read it through the daemon), or gone.
            let ahead = streams
                .lock()
                .expect("push streams poisoned")
                .iter()
                .any(|s| s.id == stream && s.last < i);
            if !ahead {
                continue;
            }
        }
        let layout = FileLayout::new(job.chunks.iter().map(|c| c.len));
        let pieces = layout.pieces(job.start, job.size.saturating_sub(job.start));
        let wanted: Vec<ChunkRef> = pieces.iter().map(|p| job.chunks[p.index]).collect();
        let Ok(bytes) = inodes.source().read(&wanted) else {
            continue;
        };
        let mut buf = Vec::with_capacity((job.size - job.start) as usize);
        for (p, b) in pieces.iter().zip(&bytes) {
            buf.extend_from_slice(&b[p.range.clone()]);
        }
        for (n, part) in buf.chunks(MAX_STORE).enumerate() {
            let offset = job.start + (n * MAX_STORE) as u64;
            match notifier.store(INodeNo(job.ino), offset, part) {
                Ok(()) => {
                    pushed.fetch_add(part.len() as u64, Ordering::Relaxed);
                }
                // Unmounted: nothing more to do.
                Err(e) if e.raw_os_error() == Some(fuser::Errno::ENODEV.code()) => return,
                // The kernel no longer holds the inode (or never looked it up): skip the file.
                Err(_) => break,
            }
        }
    }
}
