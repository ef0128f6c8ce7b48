//! `shoal-bench scale --entries N`: a version of N tiny files generated straight into an
//! origin (`shoal_testnet::scale`), then pulled (max RSS; then `shoal cache` over the filled
//! store: time and max RSS of opening it), mounted cold (ready time, RSS, first
//! `stat` of the deepest file, `find` over everything cold and warm), listed with `shoal ls`;
//! with `--real-files`, the same tree written to disk, published (max RSS, time; again
//! unchanged; again with one file changed) and mounted with squashfuse_ll from a `mksquashfs`
//! image beside the Shoal mount.

use super::{is_mounted, shoal, shoal_bin, Args};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use shoal_testnet::scale;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd` under GNU time: (seconds, max RSS in bytes, stdout).
fn timed_rss(cmd: &[&str], env: &[(&str, &Path)]) -> Result<(f64, u64, Vec<u8>)> {
    let t = Instant::now();
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("maxrss_kb=%M")
        .args(cmd)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .output()
        .context("running /usr/bin/time (apt install time)")?;
    let secs = t.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{cmd:?} failed: {err}");
    }
    let kb: u64 = err
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("maxrss_kb="))
        .and_then(|v| v.trim().parse().ok())
        .context("no max RSS from /usr/bin/time")?;
    Ok((secs, kb * 1024, out.stdout))
}

fn rss_bytes(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// A `/proc/PID/status` figure in bytes (`VmRSS:`, `RssAnon:`, ...).
fn status_bytes(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Waits until `mp` is a mount point (or `child` ended): seconds taken.
fn wait_mounted(child: &mut Child, mp: &Path, what: &str) -> Result<f64> {
    let t = Instant::now();
    while !is_mounted(mp) {
        if t.elapsed() > Duration::from_secs(600) || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!("{what} did not come up");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// `find` over the mount at `mp` cold then warm, and the RSS of its server `pid` after: the
/// figures go into `out`.
fn find_figures(mp: &Path, pid: u32, out: &mut Value) -> Result<()> {
    let (n, cold, warm) = find_twice(mp)?;
    out["find_entries"] = json!(n);
    out["find_cold_s"] = json!(cold);
    out["find_warm_s"] = json!(warm);
    out["find_entries_per_s"] = json!(n as f64 / warm);
    out["mount_rss_after_find_bytes"] = json!(rss_bytes(pid));
    Ok(())
}

/// `find mp` twice (cold, then warm): (entries, cold seconds, warm seconds).
fn find_twice(mp: &Path) -> Result<(u64, f64, f64)> {
    let mut times = Vec::new();
    let mut count = 0;
    for _ in 0..2 {
        let t = Instant::now();
        let out = Command::new("find").arg(mp).output()?;
        times.push(t.elapsed().as_secs_f64());
        if !out.status.success() {
            bail!("find {} failed", mp.display());
        }
        count = out.stdout.iter().filter(|b| **b == b'\n').count() as u64;
    }
    Ok((count, times[0], times[1]))
}

fn stat_secs(path: &Path) -> Result<f64> {
    let t = Instant::now();
    std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(t.elapsed().as_secs_f64())
}

fn unmount(mp: &Path, child: &mut Child) {
    let _ = Command::new("fusermount3")
        .arg("-u")
        .arg(mp)
        .stderr(Stdio::null())
        .status();
    let _ = Command::new("umount")
        .arg("-l")
        .arg(mp)
        .stderr(Stdio::null())
        .status();
    let t = Instant::now();
    while child.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Writes the generated tree's files to `dir` (for publish and squashfuse).
fn write_files(dir: &Path, entries: u64, width: u64) -> Result<()> {
    // A thread a core, each writing whole leaf directories (10M files one at a time take
    // most of an hour of syscalls).
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get() as u64);
    let leaves = entries.div_ceil(width.max(1));
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<()> {
                    for leaf in (t..leaves).step_by(threads as usize) {
                        let first = leaf * width;
                        for i in first..(first + width).min(entries) {
                            let p = scale::path_of(i, width);
                            let path = dir.join(&p);
                            if i == first {
                                std::fs::create_dir_all(path.parent().expect("a parent"))?;
                            }
                            std::fs::write(&path, scale::content_of(i))?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("a writer thread"))
    })
}

/// `shoal mount scale@v1 MP` with this state directory and origin, in the background.
fn spawn_mount(bin: &str, home: &Path, origin: &Path, mp: &Path) -> Result<Child> {
    Ok(Command::new(bin)
        .args(["mount", "scale@v1", mp.to_str().context("UTF-8 path")?])
        .env("SHOAL_HOME", home)
        .env("SHOAL_ORIGIN", origin)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Whether and how the scale bench pulls.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Pull {
    No,
    /// Into the store only (`--no-files`).
    StoreOnly,
    /// Writing every file.
    Files,
}

pub fn run(
    args: &Args,
    entries: u64,
    width: u64,
    real_files: bool,
    src: Option<&Path>,
    pull: Pull,
    find: bool,
) -> Result<Value> {
    let work = args.bench_root.join(format!("work/scale-{entries}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let origin = work.join("origin");
    let key = shoal_registry::SecretKey::generate()?;
    let publisher = key.public().to_string();
    eprintln!("generating {entries} entries into {}", origin.display());
    let t = Instant::now();
    let g = scale::generate(
        origin.to_str().context("UTF-8 path")?,
        &key,
        "scale",
        "v1",
        entries,
        width,
    )?;
    let generate_s = t.elapsed().as_secs_f64();
    let mut out = json!({
        "entries": entries,
        "width": width,
        "generate_s": generate_s,
        "packs": g.packs,
        "origin_bytes": super::files_under(&origin)?.values().sum::<u64>(),
    });
    let bin = shoal_bin()?;
    let bin = bin.to_str().context("UTF-8 path")?;

    if pull != Pull::No {
        let home = work.join("home-pull");
        shoal(&home, &origin, &["trust", &publisher])?;
        let dest = work.join("out");
        eprintln!("pulling into {}", dest.display());
        let mut cmd = vec![bin, "--json", "pull", "scale@v1"];
        match pull {
            Pull::StoreOnly => cmd.push("--no-files"),
            _ => cmd.extend(["--to", dest.to_str().unwrap()]),
        }
        let (secs, rss, stdout) =
            timed_rss(&cmd, &[("SHOAL_HOME", &home), ("SHOAL_ORIGIN", &origin)])?;
        let report: Value = serde_json::from_slice(&stdout)?;
        if report["files"] != json!(entries) {
            bail!("pull wrote {} files, not {entries}", report["files"]);
        }
        out["pull_wrote_files"] = json!(pull == Pull::Files);
        out["pull_s"] = json!(secs);
        out["pull_max_rss_bytes"] = json!(rss);
        // A command that opens the store the pull filled (and reads its stats): what every
        // later command pays before doing anything.
        let (secs, rss, _) = timed_rss(
            &[bin, "--json", "cache"],
            &[("SHOAL_HOME", &home), ("SHOAL_ORIGIN", &origin)],
        )?;
        out["store_open_s"] = json!(secs);
        out["store_open_max_rss_bytes"] = json!(rss);
        let _ = std::fs::remove_dir_all(&dest);
        let _ = std::fs::remove_dir_all(&home);
        eprintln!("so far: {out}");
    }

    // The mount, cold: a fresh state directory, everything from the origin.
    let home = work.join("home-mount");
    shoal(&home, &origin, &["trust", &publisher])?;
    let mp = work.join("mnt");
    std::fs::create_dir_all(&mp)?;
    eprintln!("mounting at {}", mp.display());
    let mut child = spawn_mount(bin, &home, &origin, &mp)?;
    let measured = (|| -> Result<()> {
        out["mount_ready_s"] = json!(wait_mounted(&mut child, &mp, "shoal mount")?);
        out["mount_rss_bytes"] = json!(rss_bytes(child.id()));
        out["first_stat_s"] = json!(stat_secs(&mp.join(&g.last_path))?);
        // The first file's directories were written first: in the version's oldest packs,
        // which a lookup reaches last.
        out["first_stat_oldest_s"] = json!(stat_secs(&mp.join(scale::path_of(0, width.max(2))))?);
        if !find {
            return Ok(());
        }
        find_figures(&mp, child.id(), &mut out)?;
        out["mount_rss_anon_after_find_bytes"] = json!(status_bytes(child.id(), "RssAnon:"));
        // The kernel drops its dentries and inodes and forgets them: the mount frees its own.
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "2");
        std::thread::sleep(Duration::from_secs(2));
        out["mount_rss_after_forget_bytes"] = json!(rss_bytes(child.id()));
        // Of which heap (the rest: mapped pages of the store's runs and locator files, which
        // the kernel reclaims under pressure).
        out["mount_rss_anon_after_forget_bytes"] = json!(status_bytes(child.id(), "RssAnon:"));
        Ok(())
    })();
    unmount(&mp, &mut child);
    measured?;
    let leaf = g
        .last_path
        .rsplit_once('/')
        .map(|x| x.0)
        .unwrap_or_default();
    let (ls_s, _) = shoal(&home, &origin, &["ls", "scale@v1", leaf])?;
    out["ls_s"] = json!(ls_s);
    // `ls` on a machine that never opened the version.
    let fresh = work.join("home-ls");
    shoal(&fresh, &origin, &["trust", &publisher])?;
    let (ls_cold_s, _) = shoal(&fresh, &origin, &["ls", "scale@v1", leaf])?;
    out["ls_cold_s"] = json!(ls_cold_s);
    let _ = std::fs::remove_dir_all(&fresh);
    // The same mount again, on the machine that has mounted it: its locator files and tree
    // nodes are local.
    let mut child = spawn_mount(bin, &home, &origin, &mp)?;
    let measured = (|| -> Result<()> {
        out["mount_warm_ready_s"] = json!(wait_mounted(&mut child, &mp, "shoal mount")?);
        out["mount_warm_rss_bytes"] = json!(rss_bytes(child.id()));
        out["first_stat_warm_oldest_s"] =
            json!(stat_secs(&mp.join(scale::path_of(0, width.max(2))))?);
        Ok(())
    })();
    unmount(&mp, &mut child);
    measured?;
    eprintln!("so far: {out}");

    if real_files {
        let src = src.map_or_else(|| work.join("src"), Path::to_path_buf);
        let _ = std::fs::remove_dir_all(&src);
        eprintln!("writing {entries} files under {}", src.display());
        write_files(&src, entries, width)?;
        super::drop_caches();
        let home = work.join("home-publish");
        let porigin = work.join("origin-publish");
        let (secs, rss, _) = timed_rss(
            &[bin, "--json", "publish", src.to_str().unwrap(), "real@v1"],
            &[("SHOAL_HOME", &home), ("SHOAL_ORIGIN", &porigin)],
        )?;
        out["publish_s"] = json!(secs);
        out["publish_max_rss_bytes"] = json!(rss);
        // Again, unchanged (files taken unread from the last publish's record), then with the
        // last file changed.
        let env = [
            ("SHOAL_HOME", home.as_path()),
            ("SHOAL_ORIGIN", porigin.as_path()),
        ];
        let (secs, rss, stdout) = timed_rss(
            &[bin, "--json", "publish", src.to_str().unwrap(), "real@v2"],
            &env,
        )?;
        let r: Value = serde_json::from_slice(&stdout)?;
        out["republish_s"] = json!(secs);
        out["republish_max_rss_bytes"] = json!(rss);
        out["republish_files_unchanged"] = r["files_unchanged"].clone();
        std::fs::write(src.join(&g.last_path), b"changed\n")?;
        let (secs, _, stdout) = timed_rss(
            &[bin, "--json", "publish", src.to_str().unwrap(), "real@v3"],
            &env,
        )?;
        let r: Value = serde_json::from_slice(&stdout)?;
        out["publish_one_change_s"] = json!(secs);
        out["publish_one_change_uploaded_bytes"] = r["new_bytes_uploaded"].clone();
        eprintln!("so far: {out}");

        // squashfuse_ll over the same tree.
        let img = work.join("tree.squashfs");
        let t = Instant::now();
        super::time_cmd(Command::new("mksquashfs").arg(&src).arg(&img).args([
            "-noappend",
            "-quiet",
            "-no-progress",
            // Uncompressed, as the shared squashfs benchmark's nocomp image: the tree is
            // metadata, and gzip only slows the image's making.
            "-noD",
            "-noF",
            "-noX",
            // Its duplicate search compares files of the same size: a million files of a few
            // sizes took it more than 20 minutes.
            "-no-duplicates",
        ]))?;
        let mksquashfs_s = t.elapsed().as_secs_f64();
        let smp = work.join("squash-mnt");
        std::fs::create_dir_all(&smp)?;
        super::drop_caches();
        let mut sq = Command::new("squashfuse_ll")
            .args(["-f"])
            .arg(&img)
            .arg(&smp)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running squashfuse_ll")?;
        let squash = (|| -> Result<Value> {
            let ready = wait_mounted(&mut sq, &smp, "squashfuse_ll")?;
            let rss = rss_bytes(sq.id());
            let first = stat_secs(&smp.join(&g.last_path))?;
            let mut v = json!({
                "mksquashfs_s": mksquashfs_s,
                "mount_ready_s": ready,
                "mount_rss_bytes": rss,
                "first_stat_s": first,
            });
            if find {
                find_figures(&smp, sq.id(), &mut v)?;
            }
            Ok(v)
        })();
        unmount(&smp, &mut sq);
        out["squashfuse_ll"] = squash?;
        let _ = std::fs::remove_dir_all(&src);
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(out)
}
