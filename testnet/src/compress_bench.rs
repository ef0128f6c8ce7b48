//! `shoal-bench compress`: what compression of packs buys and costs, on real data anyone can
//! fetch here (two releases of Django from PyPI, sources) and on the shared random data.
//!
//! - Origin size: the newer release published alone, with and without compression, against
//!   `tar -c | zstd -3` of the same tree (the goal: <= 1.1x).
//! - Dedup of small files: the older release published, then the newer; what the newer
//!   uploaded against what `rsync --no-whole-file` sends as literal data between the same two
//!   trees (goal: <= 1.5x).
//! - Throughput: publish and cold pull of the release with and without compression; publish
//!   of `shards_v1` (random) with and without (goal: within 5%, and the same bytes).
//! - A second corpus: a Debian package of text (`perl-modules-5.36`), origin bytes against
//!   `tar | zstd -3`.
//! - A random read: a cold mount of the release reading files in a random order, compressed
//!   packs (a whole frame read and decompressed per file at first) against uncompressed ones.

use super::{drop_caches, files_under, is_mounted, median, shoal, shoal_bin, Args};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The two releases: far enough apart for real edits (20 patch releases), same tree shape.
const OLD: &str = "4.2";
const NEW: &str = "4.2.20";

/// Both releases' source trees under `$BENCH_ROOT/real` (downloaded once with pip).
pub(crate) fn django(args: &Args) -> Result<(PathBuf, PathBuf)> {
    let real = args.bench_root.join("real");
    std::fs::create_dir_all(&real)?;
    let mut dirs = Vec::new();
    for v in [OLD, NEW] {
        let dir = real.join(format!("Django-{v}"));
        if !dir.join("setup.py").exists() && !dir.join("pyproject.toml").exists() {
            let tarball = real.join(format!("Django-{v}.tar.gz"));
            if !tarball.exists() {
                let pin = format!("django=={v}");
                let ok = Command::new("python3")
                    .args(["-m", "pip", "download", "--no-deps", "--no-binary", ":all:"])
                    .args(["-d", real.to_str().context("path")?, &pin])
                    .stdout(Stdio::null())
                    .status()
                    .context("running pip download")?
                    .success();
                if !ok || !tarball.exists() {
                    bail!("pip download {pin} did not give {}", tarball.display());
                }
            }
            let ok = Command::new("tar")
                .arg("-xzf")
                .arg(&tarball)
                .arg("-C")
                .arg(&real)
                .status()?
                .success();
            if !ok {
                bail!("extracting {}", tarball.display());
            }
        }
        dirs.push(dir);
    }
    Ok((dirs.remove(0), dirs.remove(0)))
}

/// A second real corpus: a Debian package of text (Perl's modules), extracted under
/// `$BENCH_ROOT/real/deb` (downloaded once with apt-get).
const DEB: &str = "perl-modules-5.36";

pub(crate) fn debian(args: &Args) -> Result<PathBuf> {
    let dir = args.bench_root.join("real/deb");
    let tree = dir.join("tree");
    if tree.join("usr").exists() {
        return Ok(tree);
    }
    std::fs::create_dir_all(&dir)?;
    let ok = Command::new("apt-get")
        .args(["download", DEB])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running apt-get download")?
        .success();
    let deb = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"));
    let (true, Some(deb)) = (ok, deb) else {
        bail!("apt-get download {DEB} failed");
    };
    let ok = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&tree)
        .status()?
        .success();
    if !ok {
        bail!("dpkg-deb -x {}", deb.display());
    }
    Ok(tree)
}

/// The Debian corpus published alone (default settings): its origin against `tar | zstd -3`.
fn debian_origin(args: &Args, work: &Path) -> Result<Value> {
    let tree = debian(args)?;
    let tar_zstd3 = tar_zstd(&tree)?;
    let (home, origin) = fresh(work, "debian")?;
    let (secs, _) = shoal(
        &home,
        &origin,
        &["publish", tree.to_str().context("path")?, "deb@v1"],
    )?;
    let origin_bytes = du(&origin)?;
    Ok(json!({
        "package": DEB,
        "files": files_under(&tree)?.len(),
        "bytes": du(&tree)?,
        "tar_zstd3_bytes": tar_zstd3,
        "origin_bytes": origin_bytes,
        "origin_vs_tar_zstd3": origin_bytes as f64 / tar_zstd3 as f64,
        "publish_s": secs,
    }))
}

/// Bytes of every file under `dir`.
fn du(dir: &Path) -> Result<u64> {
    Ok(files_under(dir)?.values().sum())
}

/// `tar -c dir | zstd -3` in bytes.
fn tar_zstd(dir: &Path) -> Result<u64> {
    let out = Command::new("bash")
        .arg("-c")
        .arg("tar -cf - -C \"$1\" . | zstd -3 -T1 -c | wc -c")
        .arg("bash")
        .arg(dir)
        .output()?;
    if !out.status.success() {
        bail!("tar | zstd failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// What `rsync --no-whole-file` sends as literal data to turn a copy of `old` into `new`.
fn rsync_literal(old: &Path, new: &Path, work: &Path) -> Result<u64> {
    let dst = work.join("rsync-dst");
    let _ = std::fs::remove_dir_all(&dst);
    let ok = Command::new("cp")
        .arg("-a")
        .arg(old)
        .arg(&dst)
        .status()?
        .success();
    if !ok {
        bail!("cp -a {}", old.display());
    }
    let out = Command::new("rsync")
        .args(["-a", "--no-whole-file", "--stats"])
        .arg(format!("{}/", new.display()))
        .arg(format!("{}/", dst.display()))
        .output()
        .context("running rsync")?;
    let _ = std::fs::remove_dir_all(&dst);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Literal data: "))
        .and_then(|v| v.split_whitespace().next())
        .map(|v| v.replace(',', ""))
        .and_then(|v| v.parse().ok())
        .context("no literal data in rsync --stats")
}

/// A publisher's home and origin under `work/name`, fresh.
fn fresh(work: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    let dir = work.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok((dir.join("home"), dir.join("origin")))
}

/// A home that trusts the publisher of `publisher_home`'s versions.
fn puller(publisher_home: &Path, at: &Path) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(at);
    std::fs::create_dir_all(at)?;
    std::fs::copy(
        publisher_home.join("publisher.key"),
        at.join("publisher.key"),
    )?;
    Ok(at.to_path_buf())
}

/// Whether `a` and `b` hold the same files with the same bytes.
fn same_tree(a: &Path, b: &Path) -> Result<bool> {
    Ok(Command::new("diff")
        .arg("-rq")
        .arg(a)
        .arg(b)
        .stdout(Stdio::null())
        .status()?
        .success())
}

/// Cold reads through a mount of `reference` of `files` in their order: (seconds for all,
/// milliseconds per file at the median).
fn cold_reads(home: &Path, origin: &Path, reference: &str, files: &[String]) -> Result<(f64, f64)> {
    let mp = home.join("mnt");
    std::fs::create_dir_all(&mp)?;
    let mut child = Command::new(shoal_bin()?)
        .args(["mount", reference])
        .arg(&mp)
        .env("SHOAL_HOME", home)
        .env("SHOAL_ORIGIN", origin)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let t = Instant::now();
    while !is_mounted(&mp) {
        if t.elapsed() > Duration::from_secs(60) || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!("the mount of {reference} did not come up");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut each = Vec::with_capacity(files.len());
    let all = Instant::now();
    let mut failed = None;
    for f in files {
        let t = Instant::now();
        if let Err(e) = std::fs::read(mp.join(f)) {
            failed = Some(format!("reading {f}: {e}"));
            break;
        }
        each.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let secs = all.elapsed().as_secs_f64();
    let _ = Command::new("umount").arg(&mp).status();
    let t = Instant::now();
    while child.try_wait()?.is_none() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    if let Some(e) = failed {
        bail!("{e}");
    }
    Ok((secs, median(each)))
}

/// `n` files of `dir` in a random (seeded) order.
fn shuffled(dir: &Path, n: usize) -> Result<Vec<String>> {
    let mut files: Vec<String> = files_under(dir)?.into_keys().collect();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..files.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        files.swap(i, (x % (i as u64 + 1)) as usize);
    }
    files.truncate(n);
    Ok(files)
}

pub fn run(args: &Args, runs: usize) -> Result<Value> {
    let work = args.bench_root.join("work/compress");
    std::fs::create_dir_all(&work)?;
    let (old, new) = django(args)?;
    let raw = du(&new)?;
    let files = files_under(&new)?.len();
    let tar_zstd3 = tar_zstd(&new)?;
    let reads = shuffled(&new, 300)?;
    eprintln!("Django {NEW}: {files} files, {raw} bytes; tar | zstd -3: {tar_zstd3} bytes");

    // Origin size, publish and cold pull, cold random reads: compressed and not.
    let mut modes = serde_json::Map::new();
    for mode in ["zstd", "none"] {
        let (home, origin) = fresh(&work, &format!("django-{mode}"))?;
        let (mut publish, mut pull) = (Vec::new(), Vec::new());
        for run in 0..runs {
            let _ = std::fs::remove_dir_all(&origin);
            let _ = std::fs::remove_dir_all(&home);
            drop_caches();
            let (secs, _) = shoal(
                &home,
                &origin,
                &[
                    "publish",
                    new.to_str().context("path")?,
                    "dj@new",
                    "--compression",
                    mode,
                ],
            )?;
            publish.push(secs);
            let at = puller(&home, &work.join(format!("pull-{mode}-{run}")))?;
            let dest = at.join("out");
            drop_caches();
            let (secs, _) = shoal(
                &at,
                &origin,
                &["pull", "dj@new", "--to", dest.to_str().context("path")?],
            )?;
            pull.push(secs);
            if !same_tree(&new, &dest)? {
                bail!("the pull of the {mode} publish differs from the source");
            }
            let _ = std::fs::remove_dir_all(&at);
        }
        let origin_bytes = du(&origin)?;
        let at = puller(&home, &work.join(format!("mount-{mode}")))?;
        drop_caches();
        let (read_s, read_ms) = cold_reads(&at, &origin, "dj@new", &reads)?;
        let _ = std::fs::remove_dir_all(&at);
        modes.insert(
            mode.into(),
            json!({
                "origin_bytes": origin_bytes,
                "origin_vs_tar_zstd3": origin_bytes as f64 / tar_zstd3 as f64,
                "publish_s": median(publish),
                "pull_cold_s": median(pull),
                "mount_cold_random_reads": reads.len(),
                "mount_cold_random_reads_s": read_s,
                "mount_cold_random_read_median_ms": read_ms,
            }),
        );
    }

    // Dedup between the two releases, against rsync.
    let literal = rsync_literal(&old, &new, &work)?;
    let (home, origin) = fresh(&work, "django-dedup")?;
    shoal(
        &home,
        &origin,
        &["publish", old.to_str().context("path")?, "dj@old"],
    )?;
    let (_, report) = shoal(
        &home,
        &origin,
        &["publish", new.to_str().context("path")?, "dj@new"],
    )?;
    let uploaded = report["new_bytes_uploaded"].as_u64().unwrap_or(0);

    // A second corpus, from Debian; its failure (no apt, another release) is reported, not
    // fatal.
    let debian = debian_origin(args, &work).unwrap_or_else(|e| json!({ "error": e.to_string() }));

    // Random data: compression must cost nothing but its probe.
    let data = super::ensure_data(args)?;
    let shards = data.join("shards_v1");
    let shard_bytes = du(&shards)?;
    let mut random = serde_json::Map::new();
    let mut times: Vec<(String, Vec<f64>, u64)> = Vec::new();
    for mode in ["zstd", "none"] {
        times.push((mode.into(), Vec::new(), 0));
    }
    for _ in 0..runs {
        for (mode, secs, bytes) in times.iter_mut() {
            let (home, origin) = fresh(&work, &format!("shards-{mode}"))?;
            drop_caches();
            super::warm(&shards)?;
            let (s, _) = shoal(
                &home,
                &origin,
                &[
                    "publish",
                    shards.to_str().context("path")?,
                    "shards@v1",
                    "--compression",
                    mode,
                ],
            )?;
            secs.push(s);
            *bytes = du(&origin)?;
            let _ = std::fs::remove_dir_all(origin.parent().expect("a parent"));
        }
    }
    for (mode, secs, bytes) in &times {
        let s = median(secs.clone());
        random.insert(
            mode.clone(),
            json!({"publish_s": s, "publish_gbps": shard_bytes as f64 / s / 1e9, "origin_bytes": bytes}),
        );
    }
    let ratio = |a: &str, b: &str, k: &str| {
        random[a][k].as_f64().unwrap_or(f64::NAN) / random[b][k].as_f64().unwrap_or(f64::NAN)
    };
    let publish_ratio = ratio("zstd", "none", "publish_s");
    let bytes_ratio = ratio("zstd", "none", "origin_bytes");
    Ok(json!({
        "corpus": format!("Django {NEW} (PyPI sdist, extracted)"),
        "files": files,
        "bytes": raw,
        "tar_zstd3_bytes": tar_zstd3,
        "runs": runs,
        "modes": modes,
        "dedup": {
            "from": format!("Django {OLD}"),
            "to": format!("Django {NEW}"),
            "rsync_literal_bytes": literal,
            "shoal_uploaded_bytes": uploaded,
            "shoal_vs_rsync": uploaded as f64 / literal as f64,
        },
        "debian": debian,
        "random": {
            "dataset": "shards_v1",
            "bytes": shard_bytes,
            "modes": random,
            "publish_time_zstd_vs_none": publish_ratio,
            "origin_bytes_zstd_vs_none": bytes_ratio,
        },
    }))
}
