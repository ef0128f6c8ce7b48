//! `shoal mount` and `shoal unmount`.

use crate::args::PrefetchArg;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use shoal_fuse::{Inodes, MountConfig, MountOptions, ShoalFs};
use shoal_node::Node;
use shoal_registry::DatasetRef;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

pub struct MountArgs {
    pub mountpoint: PathBuf,
    pub prefetch: PrefetchArg,
    pub read_order: Option<PathBuf>,
    pub read_ahead: u64,
    pub timeout: u64,
    pub threads: usize,
    pub direct_io: bool,
}

/// What a mount did, reported when it ends.
#[derive(Debug, Serialize)]
pub struct MountReport {
    pub version: String,
    pub root: String,
    pub mountpoint: String,
    pub opens: u64,
    pub reads: u64,
    pub bytes_read: u64,
    pub read_errors: u64,
}

/// Mounts, serves until unmounted (here or by `shoal unmount`) or interrupted, then reports.
pub async fn run(node: &Node, reference: &DatasetRef, args: MountArgs) -> Result<MountReport> {
    let mp = &args.mountpoint;
    let meta = std::fs::metadata(mp).with_context(|| format!("mount point {}", mp.display()))?;
    if !meta.is_dir() {
        bail!("mount point {} is not a directory", mp.display());
    }
    let order: Vec<String> = match &args.read_order {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading --read-order file {}", p.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| l.trim_start_matches('/').to_string())
            .collect(),
        None => Vec::new(),
    };
    let m = node
        .mountable(reference, Duration::from_secs(args.timeout))
        .await?;
    if !order.is_empty() || args.prefetch == PrefetchArg::All {
        m.source.spawn_background(
            m.root,
            order,
            args.prefetch == PrefetchArg::All,
            args.read_ahead,
        );
    }
    let opts = MountOptions {
        sequential_prefetch: args.prefetch != PrefetchArg::None,
        direct_io: args.direct_io,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: UNIX_EPOCH + Duration::from_secs(m.created_unix),
        ..MountOptions::default()
    };
    let root = m.root;
    let fs = ShoalFs::new(Inodes::new(m.source, m.root, 0o755), opts);
    let stats = fs.stats();
    let cfg = MountConfig {
        fsname: format!("shoal:{}", m.version),
        threads: args.threads,
        allow_other: meta.uid() == 0,
    };
    let session = shoal_fuse::spawn(fs, mp, &cfg)
        .with_context(|| format!("mounting {} at {}", m.version, mp.display()))?;
    shoal_fuse::raise_readahead(mp, 4096);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(session.join());
    });
    eprintln!(
        "mounted {} (b3:{root}) at {}; Ctrl-C or `shoal unmount {}` unmounts",
        m.version,
        mp.display(),
        mp.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut done = Box::pin(done_rx);
    tokio::select! {
        _ = &mut done => {}
        _ = tokio::signal::ctrl_c() => { unmount(mp)?; let _ = done.await; }
        _ = term.recv() => { unmount(mp)?; let _ = done.await; }
    }
    // Keep the cache's index and hit counters for the next mount.
    node.store()?.flush()?;
    Ok(MountReport {
        version: m.version,
        root: format!("b3:{root}"),
        mountpoint: mp.display().to_string(),
        opens: stats.opens.load(Ordering::Relaxed),
        reads: stats.reads.load(Ordering::Relaxed),
        bytes_read: stats.bytes_read.load(Ordering::Relaxed),
        read_errors: stats.read_errors.load(Ordering::Relaxed),
    })
}

/// Unmounts with `fusermount3 -u`, or `umount` where that is not available (root).
pub fn unmount(mp: &Path) -> Result<()> {
    let mut last = String::new();
    for (cmd, args) in [
        ("fusermount3", vec!["-u"]),
        ("fusermount", vec!["-u"]),
        ("umount", vec![]),
    ] {
        match std::process::Command::new(cmd).args(&args).arg(mp).output() {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => last = String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(_) => continue,
        }
    }
    bail!("cannot unmount {}: {last}", mp.display())
}
