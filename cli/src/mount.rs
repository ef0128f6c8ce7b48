//! `shoal mount`: served by the running node daemon when there is one, else in this process.

use crate::args::PrefetchArg;
use anyhow::{Context, Result};
use shoal_node::daemon::{Client, Request};
use shoal_node::{unmount, MountReport, MountSpec, Node, Prefetch, Progress};
use shoal_registry::DatasetRef;
use std::path::PathBuf;

pub struct MountArgs {
    pub mountpoint: PathBuf,
    pub prefetch: PrefetchArg,
    pub read_order: Option<PathBuf>,
    pub read_ahead: u64,
    pub timeout: u64,
    pub threads: usize,
    pub direct_io: bool,
    pub passthrough: shoal_node::Passthrough,
}

impl MountArgs {
    fn spec(self) -> Result<MountSpec> {
        let read_order: Vec<String> = match &self.read_order {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("reading --read-order file {}", p.display()))?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| l.trim_start_matches('/').to_string())
                .collect(),
            None => Vec::new(),
        };
        Ok(MountSpec {
            mountpoint: std::path::absolute(&self.mountpoint)
                .with_context(|| format!("mount point {}", self.mountpoint.display()))?,
            prefetch: match self.prefetch {
                PrefetchArg::None => Prefetch::None,
                PrefetchArg::Sequential => Prefetch::Sequential,
                PrefetchArg::All => Prefetch::All,
            },
            read_order,
            read_ahead: self.read_ahead,
            timeout_secs: self.timeout,
            threads: self.threads,
            direct_io: self.direct_io,
            passthrough: self.passthrough,
        })
    }
}

/// SIGINT or SIGTERM. The handlers are installed when this is called, not when the future is
/// first polled: a signal that arrives while the mount is being set up must not kill the
/// process (which may be waiting on a request to its own mount then).
pub fn interrupted() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let (Ok(mut term), Ok(mut int)) = (term, int) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}

/// Mounts, serves until unmounted (here or by `shoal unmount`) or interrupted, then reports.
pub async fn run(
    daemon: Option<Client>,
    origin: &str,
    open: impl FnOnce() -> Result<Node>,
    reference: &DatasetRef,
    args: MountArgs,
) -> Result<MountReport> {
    let spec = args.spec()?;
    let Some(daemon) = daemon else {
        let node = open()?;
        let report = node
            .serve_mount(
                reference,
                &spec,
                "embedded",
                |notice| eprintln!("{notice}"),
                interrupted(),
            )
            .await?;
        // Whole-file copies still being written would be lost with this process (a daemon
        // keeps writing them): finish them, within a bound, so the next mount has them.
        if let Some(files) = node.whole_files() {
            let pending = files.pending();
            if pending > 0 {
                eprintln!("finishing {pending} whole-file copies for later mounts");
                let files = files.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    files.wait_idle(std::time::Duration::from_secs(60))
                })
                .await;
            }
        }
        return Ok(report);
    };
    // The daemon mounts and serves; this command stays in the foreground like an embedded
    // mount. On SIGINT/SIGTERM it unmounts and waits for the daemon's report; if it is killed,
    // the daemon sees the connection close and unmounts.
    let req = Request::Mount {
        reference: reference.to_string(),
        origin: origin.to_string(),
        spec: spec.clone(),
    };
    let progress = Progress::default();
    let call = daemon.call_with(&req, &progress, |notice| eprintln!("{notice}"));
    tokio::pin!(call);
    let v = tokio::select! {
        r = &mut call => r?,
        _ = interrupted() => {
            unmount(&spec.mountpoint)?;
            call.await?
        }
    };
    serde_json::from_value(v).context("the daemon's mount report")
}
