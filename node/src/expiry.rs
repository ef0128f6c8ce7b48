//! The local cache's TTL (`[cache] ttl`): a cached version that nobody has used for that long
//! leaves this machine, besides what capacity eviction takes.
//!
//! Each use of a version (a pull, a pin, a mount or a Python session, at its start and at its
//! end) writes a use record, `$SHOAL_HOME/cache/used/<root>`: the time and `NAME@VERSION`.
//! While a use lasts the version is also held in memory as in use. A sweep ([`Node::expire`],
//! run by the daemon every quarter of the TTL, at most every 10 minutes, and by embedded
//! pulls, pins and mounts before they start) takes the versions whose record is older than
//! the TTL and that are neither pinned nor in use ([`expired`], pure), and drops their blobs
//! (tree nodes and chunks, read from the store alone) that no version kept needs and no pin
//! holds. The version is then no longer announced to peers; its signed copy stays (it is how
//! the node opens the version offline, a few hundred bytes).

use crate::error::{io, Result};
use crate::walk::{visit_locally, Found, Local};
use crate::Node;
use shoal_registry::Hash;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A use record: a version this machine cached, and when it was last used.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Use {
    pub root: Hash,
    /// `NAME@VERSION`.
    pub name: String,
    pub last_used_unix: u64,
}

/// Which of `uses` have expired at `now`: last used more than `ttl_s` before it, and not in
/// `keep` (pinned, or in use now). Pure.
pub fn expired(uses: &[Use], keep: &HashSet<Hash>, now: u64, ttl_s: u64) -> Vec<usize> {
    uses.iter()
        .enumerate()
        .filter(|(_, u)| !keep.contains(&u.root) && now.saturating_sub(u.last_used_unix) > ttl_s)
        .map(|(i, _)| i)
        .collect()
}

/// How often a daemon sweeps for a TTL: a quarter of it, between 1 s and 10 minutes.
pub fn sweep_interval(ttl: std::time::Duration) -> std::time::Duration {
    (ttl / 4).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(600),
    )
}

/// What a sweep did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ExpiryReport {
    pub ttl_s: u64,
    /// The versions that expired (`NAME@VERSION`).
    pub expired: Vec<String>,
    pub blobs_dropped: u64,
    pub bytes_freed: u64,
}

/// Versions in use in this process, counted (shared by a node and its siblings).
#[derive(Debug, Default)]
pub(crate) struct InUseTable(Mutex<HashMap<Hash, usize>>);

impl InUseTable {
    pub(crate) fn roots(&self) -> HashSet<Hash> {
        self.0
            .lock()
            .expect("in-use table poisoned")
            .keys()
            .copied()
            .collect()
    }
}

/// A version in use until this is dropped: its use record is written now and again then.
pub struct InUse {
    table: Arc<InUseTable>,
    dir: PathBuf,
    root: Hash,
    name: String,
}

impl Drop for InUse {
    fn drop(&mut self) {
        write_use(&self.dir, &self.root, &self.name);
        let mut t = self.table.0.lock().expect("in-use table poisoned");
        if let Some(n) = t.get_mut(&self.root) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.root);
            }
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes `root`'s use record (best effort: a record not written only makes the version
/// expire sooner).
fn write_use(dir: &std::path::Path, root: &Hash, name: &str) {
    let path = dir.join(root.to_string());
    let tmp = dir.join(format!(".{root}.tmp"));
    let text = format!("{} {name}\n", now_unix());
    let r = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&tmp, text))
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = r {
        tracing::debug!("use record {}: {e}", path.display());
    }
}

/// The use records in `dir` (unreadable ones skipped).
fn read_uses(dir: &std::path::Path) -> Result<Vec<Use>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("reading", dir)(e)),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Ok(root) = e.file_name().to_string_lossy().parse::<Hash>() else {
            continue;
        };
        // A few dozen bytes; a larger file is not ours.
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let Some((t, name)) = text.trim_end().split_once(' ') else {
            continue;
        };
        let Ok(last_used_unix) = t.parse() else {
            continue;
        };
        out.push(Use {
            root,
            name: name.to_string(),
            last_used_unix,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Where the use records of `home` are.
fn uses_dir(home: &crate::home::Home) -> PathBuf {
    home.root().join("cache").join("used")
}

/// Fills in what `shoal cache` shows of the TTL and the versions cached under `home`.
pub fn describe(
    home: &crate::home::Home,
    ttl: Option<std::time::Duration>,
    stats: &mut crate::store::CacheStats,
) -> Result<()> {
    stats.ttl_s = ttl.map(|t| t.as_secs());
    let pinned: HashSet<&str> = stats.pins.iter().map(|p| p.name.as_str()).collect();
    stats.versions = read_uses(&uses_dir(home))?
        .into_iter()
        .map(|u| {
            let pinned = pinned.contains(u.name.as_str());
            crate::store::CachedVersion {
                expires_unix: ttl
                    .filter(|_| !pinned)
                    .map(|t| u.last_used_unix + t.as_secs()),
                name: u.name,
                root: format!("b3:{}", u.root),
                last_used_unix: u.last_used_unix,
                pinned,
            }
        })
        .collect();
    Ok(())
}

impl Node {
    fn uses_dir(&self) -> PathBuf {
        uses_dir(&self.home)
    }

    /// Marks `root` (`NAME@VERSION`) in use until the guard is dropped.
    pub fn using(&self, root: Hash, name: &str) -> InUse {
        *self
            .in_use
            .0
            .lock()
            .expect("in-use table poisoned")
            .entry(root)
            .or_insert(0) += 1;
        let dir = self.uses_dir();
        write_use(&dir, &root, name);
        InUse {
            table: self.in_use.clone(),
            dir,
            root,
            name: name.to_string(),
        }
    }

    /// The versions this machine cached, with their last use.
    pub fn cached_uses(&self) -> Result<Vec<Use>> {
        read_uses(&self.uses_dir())
    }

    /// Applies the TTL (see the module docs); nothing without one. `dry_run` reports what
    /// would expire and drops nothing.
    ///
    /// Cancel-safe: the store's drop is one call on a blocking thread that runs to its end;
    /// the records of the versions it expired are removed after it (a sweep cancelled before
    /// that finds them again and drops nothing more).
    pub async fn expire(&self, dry_run: bool) -> Result<ExpiryReport> {
        let Some(ttl) = self.cache.ttl else {
            return Ok(ExpiryReport::default());
        };
        let mut report = ExpiryReport {
            ttl_s: ttl.as_secs(),
            ..Default::default()
        };
        let dir = self.uses_dir();
        let mut uses = read_uses(&dir)?;
        // Versions held whole since before records existed start their clock now.
        for (root, name) in self.home.held()? {
            if !uses.iter().any(|u| u.root == root) {
                write_use(&dir, &root, &name);
                uses.push(Use {
                    root,
                    name,
                    last_used_unix: now_unix(),
                });
            }
        }
        let store = self.store()?;
        let pinned: HashSet<String> = store.stats()?.pins.into_iter().map(|p| p.name).collect();
        let mut keep = self.in_use.roots();
        keep.extend(
            uses.iter()
                .filter(|u| pinned.contains(&u.name))
                .map(|u| u.root),
        );
        let gone = expired(&uses, &keep, now_unix(), ttl.as_secs());
        if gone.is_empty() {
            return Ok(report);
        }
        let (mut expired_uses, mut kept) = (Vec::new(), Vec::new());
        for (i, u) in uses.iter().enumerate() {
            if gone.contains(&i) {
                expired_uses.push(u);
            } else {
                kept.push(u);
            }
        }
        report.expired = expired_uses.iter().map(|u| u.name.clone()).collect();
        if dry_run {
            return Ok(report);
        }
        let roots: Vec<Hash> = expired_uses.iter().map(|u| u.root).collect();
        let kept: Vec<Hash> = kept.iter().map(|u| u.root).collect();
        let s = store.clone();
        let in_use = self.in_use.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<Option<(u64, u64)>> {
            // Every blob of the expired versions found here, less those of the versions kept.
            let mut drop: HashSet<Hash> = HashSet::new();
            let mut collect = |root: Hash, add: bool| -> Result<()> {
                visit_locally(s.as_ref(), root, |b| {
                    let id = match b {
                        Local::Node {
                            id,
                            found: Found::Here,
                            ..
                        } => id,
                        Local::Node { .. } => return Ok(true),
                        Local::Chunk { id, .. } => id,
                    };
                    if add {
                        drop.insert(id);
                    } else {
                        drop.remove(&id);
                    }
                    Ok(true)
                })?;
                Ok(())
            };
            for r in &roots {
                collect(*r, true)?;
            }
            for r in &kept {
                collect(*r, false)?;
            }
            // A version that came into use since the sweep began keeps its blobs: this sweep
            // drops nothing (the next one looks again).
            if roots.iter().any(|r| in_use.roots().contains(r)) {
                return Ok(None);
            }
            let drop: Vec<Hash> = drop.into_iter().collect();
            Ok(Some(s.drop_unpinned(&drop)?))
        })
        .await
        .expect("expiry task panicked")?;
        let Some((blobs, bytes)) = done else {
            report.expired.clear();
            return Ok(report);
        };
        report.blobs_dropped = blobs;
        report.bytes_freed = bytes;
        for u in &expired_uses {
            self.home.forget_held(&u.root)?;
            let path = dir.join(u.root.to_string());
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(io("removing", &path)(e));
                }
            }
        }
        tracing::info!(
            "cache TTL of {} s: {} expired ({} blobs, {} bytes freed)",
            ttl.as_secs(),
            report.expired.join(", "),
            blobs,
            bytes
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(n: u8, t: u64) -> Use {
        Use {
            root: Hash([n; 32]),
            name: format!("d@v{n}"),
            last_used_unix: t,
        }
    }

    #[test]
    fn versions_expire_after_the_ttl_unless_kept() {
        let uses = [u(1, 100), u(2, 150), u(3, 10), u(4, 199)];
        let keep: HashSet<Hash> = [Hash([3; 32])].into();
        // now 200, ttl 60: v1 (100 s) and v3 (190 s, but kept) are old; v2 is 50 s, v4 1 s.
        assert_eq!(expired(&uses, &keep, 200, 60), vec![0]);
        assert_eq!(expired(&uses, &HashSet::new(), 200, 60), vec![0, 2]);
        // Exactly the TTL is not past it.
        assert_eq!(expired(&uses, &HashSet::new(), 160, 60), vec![2]);
        // A clock behind the records expires nothing.
        assert!(expired(&uses, &HashSet::new(), 0, 60).is_empty());
    }

    #[test]
    fn sweeps_come_every_quarter_ttl_within_bounds() {
        use std::time::Duration;
        assert_eq!(
            sweep_interval(Duration::from_secs(3)),
            Duration::from_secs(1)
        );
        assert_eq!(
            sweep_interval(Duration::from_secs(400)),
            Duration::from_secs(100)
        );
        assert_eq!(
            sweep_interval(Duration::from_secs(7 * 86400)),
            Duration::from_secs(600)
        );
    }
}
