//! `shoal-bench`: benchmarks that run Shoal and the peer tools on the same data in one run
//! and print machine-readable results (JSON on stdout, and a copy under
//! `$BENCH_ROOT/results/`). Timings are reported, never asserted.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod compress_bench;
mod gc_bench;
mod origins_bench;
mod scale_bench;
mod swarm_bench;

#[derive(Parser)]
#[command(name = "shoal-bench", about = "Shoal benchmarks against peer tools")]
struct Args {
    /// Where data, work files and results go (the shared scripts' BENCH_ROOT).
    #[arg(long, env = "BENCH_ROOT", default_value = "/tmp/shoal-bench")]
    bench_root: PathBuf,
    /// The shared benchmark scripts (gen_data.py, bench_casync.sh, ...).
    #[arg(long, env = "SHOAL_SHARED_BENCH", default_value = "../shared/bench")]
    shared: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Publish v1, publish v2 (dedup), pull: shards and images, beside casync and b3sum.
    Publish {
        /// Datasets to run (shards, images).
        #[arg(long, value_delimiter = ',', default_value = "shards,images")]
        datasets: Vec<String>,
        /// Timed runs per Shoal measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Do not run the peer tools (report Shoal alone).
        #[arg(long)]
        skip_peers: bool,
    },
    /// Reads through `shoal mount` (cold: fetched on demand from a local origin; warm: chunks
    /// local) against squashfuse, squashfuse_ll, kernel squashfs and casync mount.
    Mount {
        #[arg(long, value_delimiter = ',', default_value = "shards,images")]
        datasets: Vec<String>,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Peer scripts to run: squash, casync (empty: Shoal alone).
        #[arg(long, value_delimiter = ',', default_value = "squash,casync")]
        peers: Vec<String>,
    },
    /// Cold reads through a mount served by a node daemon whose chunks come from a peer daemon
    /// on loopback, beside a cold mount reading a local origin directory (same run).
    MountPeer {
        #[arg(long, value_delimiter = ',', default_value = "shards,images")]
        datasets: Vec<String>,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Cache hit rates under the training pattern (every epoch reads everything in a new
    /// random order): the store's policy against LRU, at several cache sizes.
    Eviction {
        /// Blocks in the dataset.
        #[arg(long, default_value_t = 100_000)]
        blocks: u32,
        #[arg(long, default_value_t = 6)]
        epochs: usize,
    },
    /// Scenario 1: 1:1 pull of shards_v1 between two node daemons on loopback, beside rsync,
    /// nginx+curl, aria2 BitTorrent (and sendme if installed).
    SwarmLo {
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Peer baselines: rsync,nginx (one script), aria2, sendme (empty: Shoal alone).
        #[arg(long, value_delimiter = ',', default_value = "rsync,aria2,sendme")]
        peers: Vec<String>,
        /// A real text corpus (two Django releases, Debian's Perl modules) instead of
        /// shards_v1; no peer tools.
        #[arg(long)]
        text: bool,
        /// The seed's wire compression: on, off, or both (each run in the same invocation).
        #[arg(long, default_value = "both")]
        wire: String,
        /// The seed's upload rate (`shoal node run --upload-rate`, bytes on the wire per
        /// second, e.g. 100MB): a link of that speed.
        #[arg(long, value_name = "RATE")]
        seed_rate: Option<String>,
    },
    /// Scenarios 2 and 4: NODES daemons in network namespaces pull shards_v1 at once from an
    /// HTTP origin behind a tbf-shaped link (with --kill K: K of them killed -9 mid-pull and
    /// restarted). Reports per-node times and origin egress; runs ../shared/bench/bench_netns.sh
    /// (HTTP and BitTorrent on the same topology) first unless --no-peers.
    SwarmNetns {
        #[arg(long, default_value_t = 8)]
        nodes: usize,
        #[arg(long, default_value = "200mbit")]
        rate: String,
        #[arg(long, default_value_t = 0)]
        kill: usize,
        #[arg(long)]
        no_peers: bool,
        /// A second origin (a replica of the first) behind a link of this rate.
        #[arg(long, value_name = "RATE")]
        second_origin: Option<String>,
    },
    /// N nodes behind a shaped origin link mount shards_v1 through their daemons and read all
    /// of it at once (`--isolated`: the daemons do not know each other, the baseline).
    MountNetns {
        #[arg(long, default_value_t = 4)]
        nodes: usize,
        #[arg(long, default_value = "200mbit")]
        rate: String,
        #[arg(long)]
        isolated: bool,
    },
    /// Several origins: two nginx origins behind shaped links, one node pulling from both
    /// (against the combined link floor), and aria2c from the same two mirrors.
    OriginsNetns {
        /// The two origins' link rates.
        #[arg(long, value_delimiter = ',', default_value = "100mbit,300mbit")]
        rates: Vec<String>,
        #[arg(long)]
        no_peers: bool,
    },
    /// Data where it lives and copies between origins: in-place against packed publish (from
    /// a directory and from moto), replicate v1 then v2 against rclone and aws s3 sync.
    OriginsData {
        #[arg(long)]
        no_peers: bool,
    },
    /// Rate limits: origin reads, downloads and uploads each limited to MB MB/s while a node
    /// pulls shards_v1 on loopback; the steady rate against the rate set.
    Rates {
        #[arg(long, default_value_t = 100.0)]
        mb: f64,
    },
    /// What `shoal origin gc` costs on a dataset with history: VERSIONS versions of FILES
    /// files, CHURN of them rewritten each time, retention keeping the last KEEP; objects
    /// listed, read and deleted, and time, of each gc run.
    Gc {
        #[arg(long, default_value_t = 100)]
        versions: u64,
        #[arg(long, default_value_t = 5000)]
        files: u64,
        #[arg(long, default_value_t = 0.01)]
        churn: f64,
        #[arg(long, default_value_t = 10)]
        keep: u64,
    },
    /// Compression and small-file dedup on real data (two Django releases from PyPI): origin
    /// bytes against `tar | zstd -3`, upload against rsync's literal data, publish, pull and
    /// cold random reads with and without compression; shards_v1 publish with and without.
    Compress {
        /// Timed runs per measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// A version of N tiny files generated straight into an origin: pull (max RSS), cold mount
    /// (ready, RSS, first stat, find), ls; with --real-files also publish and squashfuse_ll.
    Scale {
        #[arg(long, default_value_t = 1_000_000)]
        entries: u64,
        /// Files per directory, and directories per parent.
        #[arg(long, default_value_t = 1000)]
        width: u64,
        /// Also write the tree to disk: publish it (max RSS, time) and mount it with
        /// squashfuse_ll beside Shoal.
        #[arg(long)]
        real_files: bool,
        /// Where `--real-files` writes the tree (default: under the work directory). 10M
        /// tiny files take 40 GB of 4 KiB blocks; an ext4 made with `-O inline_data` keeps
        /// them in their inodes. Emptied before and removed after.
        #[arg(long, requires = "real_files")]
        src: Option<PathBuf>,
        /// Skip the pull (it writes every file: 100M is more inodes than most disks have).
        #[arg(long)]
        no_pull: bool,
        /// Pull into the store only (`shoal pull --no-files`): the pull's memory without
        /// writing N files (10M tiny files take 40 GB of 4 KiB blocks).
        #[arg(long, conflicts_with = "no_pull")]
        pull_no_files: bool,
        /// Skip `find` over the mount (at 100M entries it would hold every inode it met).
        #[arg(long)]
        no_find: bool,
    },
    /// Only writes a version of N tiny files into an origin (a path or URL) and prints its
    /// reference and publisher key (trust it with `shoal trust KEY`).
    ScaleGen {
        #[arg(long)]
        entries: u64,
        #[arg(long, default_value_t = 1000)]
        width: u64,
        #[arg(long)]
        origin: String,
        /// NAME@VERSION to write.
        #[arg(long, default_value = "scale@v1")]
        target: String,
    },
    /// Python without FUSE: shoalfs (fsspec) against the FUSE mount of the same daemon, warm,
    /// 1 and WORKERS reader processes, shards_v1 and images_v1.
    Python {
        #[arg(long, default_value_t = 8)]
        workers: usize,
    },
    /// Scenario 3: two zones joined by a shaped link; bytes received by source zone.
    SwarmZones {
        #[arg(long, default_value = "200mbit")]
        rate: String,
    },
    /// A fleet in virtual time: NODES pull schedulers (the node's own) over a link model, in
    /// one process (testnet/src/sim.rs). Prints completion p50/p99/last against the link
    /// floor, origin egress, peers and control bytes per node, and the wall time it took.
    Sim {
        #[arg(long, default_value_t = 8)]
        nodes: usize,
        /// Bytes in the version.
        #[arg(long, default_value_t = 1 << 30)]
        size: u64,
        /// Each node's link (up and down), and the origin's.
        #[arg(long, default_value = "10gbit")]
        node_rate: String,
        #[arg(long, default_value = "10gbit")]
        origin_rate: String,
        #[arg(long, default_value_t = 1)]
        zones: usize,
        /// Round-trip times in milliseconds: within a zone, across zones, to the origin.
        #[arg(long, default_value_t = 0.2)]
        rtt_ms: f64,
        #[arg(long, default_value_t = 2.0)]
        zone_rtt_ms: f64,
        #[arg(long, default_value_t = 5.0)]
        origin_rtt_ms: f64,
        /// Fraction of the nodes killed part-way (back 3 s later with what they stored).
        #[arg(long, default_value_t = 0.0)]
        churn: f64,
        /// Fraction of the nodes that advertise every chunk and serve none.
        #[arg(long, default_value_t = 0.0)]
        liars: f64,
        /// Fraction of the nodes that advertise every chunk and never answer a request.
        #[arg(long, default_value_t = 0.0)]
        stallers: f64,
        /// Connections each node aims for; 0 for a full mesh with polled have-maps (the node
        /// as it is today).
        #[arg(long, default_value_t = 8)]
        peers: usize,
        /// Milliseconds a node gathers what it gains before pushing a have-delta.
        #[arg(long, default_value_t = 5.0)]
        delta_ms: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the swarm's state (what nodes hold, busy uplinks, queued bytes, the three
        /// slowest nodes and the fastest) to stderr every this many milliseconds of virtual
        /// time.
        #[arg(long, default_value_t = 0.0)]
        trace_ms: f64,
        /// Honest nodes start their pulls spread at random over this many milliseconds
        /// (completion times then count from each node's own start).
        #[arg(long, default_value_t = 0.0)]
        stagger_ms: f64,
        /// Readers are the first pullers by rendezvous rank, not the first to start (the
        /// node's way before the fourteenth session).
        #[arg(long)]
        readers_by_rank: bool,
        /// Nodes read the version through mounts, files one after another (`mount-netns`),
        /// rather than pulling it; with `--peers 0` (the mesh), no churn, liars or stagger
        /// (stallers mount and never answer).
        #[arg(long)]
        mount: bool,
        /// With --mount: each node reads everything from the origin (`mount-netns
        /// --isolated`).
        #[arg(long)]
        isolated: bool,
        /// With --mount: bytes in each file read, and bytes fetched ahead of the reader.
        #[arg(long, default_value_t = 128 << 20)]
        file_size: u64,
        #[arg(long, default_value_t = 32 << 20)]
        readahead: u64,
        /// Payload per byte on the wire (TCP over Ethernet, 1500-byte MTU: 1448/1514).
        #[arg(long, default_value_t = 1448.0 / 1514.0)]
        payload_per_wire: f64,
        /// Every node's uplink serves the peers asking it evenly, in turn (the node before
        /// the seventeenth session), rather than the ones furthest behind first.
        #[arg(long)]
        fair_uplink: bool,
        /// How many pullers read from the origin (the node's default, `pull::Config::origin_readers`).
        #[arg(long, default_value_t = shoal_sched::pull::ORIGIN_READERS)]
        origin_readers: usize,
        /// A reader that started t after the first owns no run before t x this many bytes
        /// per second into the version (`pull::Config::origin_pace`, the node's by default;
        /// 0: off).
        #[arg(long, default_value_t = shoal_sched::pull::Config::default().origin_pace)]
        origin_pace: u64,
        /// `pull::Config::reader_lag` in milliseconds (the node's by default; 0: off).
        #[arg(long)]
        reader_lag_ms: Option<u64>,
    },
    /// Sweep chunk sizes: v2 upload / changed bytes against metadata size, per dataset.
    Chunking {
        #[arg(long, value_delimiter = ',', default_value = "shards,images")]
        datasets: Vec<String>,
        /// Average chunk sizes in KiB to try (min = avg/4, max = avg*4).
        #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256")]
        avg_kib: Vec<u32>,
    },
}

/// The `shoal` binary under test: `SHOAL_BENCH_BIN` (another build, for A/B runs; see
/// scripts/bench-ab.sh), else the one beside this benchmark.
fn shoal_bin() -> Result<PathBuf> {
    if let Some(b) = std::env::var_os("SHOAL_BENCH_BIN").filter(|b| !b.is_empty()) {
        return Ok(PathBuf::from(b));
    }
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("shoal");
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p shoal-cli`",
            bin.display()
        );
    }
    Ok(bin)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn files_under(root: &Path) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let m = e.metadata()?;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path().strip_prefix(root)?.display().to_string(), m.len());
            }
        }
    }
    Ok(out)
}

/// Bytes that really changed from v1 to v2: new files whole; for a modified file, what lies
/// between the common prefix and the common suffix (an insertion counts as its own size).
fn changed_bytes(v1: &Path, v2: &Path) -> Result<u64> {
    let (a, b) = (files_under(v1)?, files_under(v2)?);
    let mut changed = 0u64;
    for (path, size) in &b {
        let Some(_) = a.get(path) else {
            changed += size;
            continue;
        };
        let (x, y) = (std::fs::read(v1.join(path))?, std::fs::read(v2.join(path))?);
        if x == y {
            continue;
        }
        let prefix = x.iter().zip(&y).take_while(|(p, q)| p == q).count();
        let max_suffix = x.len().min(y.len()) - prefix;
        let suffix = x
            .iter()
            .rev()
            .zip(y.iter().rev())
            .take(max_suffix)
            .take_while(|(p, q)| p == q)
            .count();
        changed += (y.len() - prefix - suffix) as u64;
    }
    Ok(changed)
}

/// Writes back and drops the page cache (root only; ignored elsewhere), so that every timed
/// run starts from the same memory state.
/// Generates the shared benchmark datasets under `$BENCH_ROOT/data` (skipped when present).
fn ensure_data(args: &Args) -> Result<PathBuf> {
    let data = args.bench_root.join("data");
    let gen = args.shared.join("gen_data.py");
    eprintln!(
        "generating data with {} (skipped if present)",
        gen.display()
    );
    time_cmd(Command::new("python3").arg(&gen).arg("--out").arg(&data))?;
    Ok(data)
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn warm(dir: &Path) -> Result<()> {
    for path in files_under(dir)?.keys() {
        let _ = std::fs::read(dir.join(path))?;
    }
    Ok(())
}

/// Runs shoal with --json; returns (wall seconds, the JSON document).
fn shoal(home: &Path, origin: &Path, args: &[&str]) -> Result<(f64, Value)> {
    shoal_with(home, origin.as_os_str(), &[], args)
}

/// Like [`shoal`], with more environment (`env`) and any origin setting (a list, a URL).
fn shoal_with(
    home: &Path,
    origin: &std::ffi::OsStr,
    env: &[(String, String)],
    args: &[&str],
) -> Result<(f64, Value)> {
    let t = Instant::now();
    let out = Command::new(shoal_bin()?)
        .arg("--json")
        .args(args)
        .env("SHOAL_HOME", home)
        .env("SHOAL_ORIGIN", origin)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .context("running shoal")?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "shoal {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((secs, serde_json::from_slice(&out.stdout)?))
}

fn time_cmd(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Rows of the shared scripts' raw.csv (label -> seconds) appended after line `skip`. Runs
/// named `cold` are keyed `<label>/cold`.
fn raw_rows(raw: &Path, skip: usize) -> Result<BTreeMap<String, Vec<f64>>> {
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let text = std::fs::read_to_string(raw).unwrap_or_default();
    for line in text.lines().skip(skip) {
        let f: Vec<&str> = line.split(',').collect();
        // Rows from `trun` carry rc=N; BitTorrent rows carry done=N instead.
        let ok = f
            .get(5)
            .is_none_or(|n| n.starts_with("rc=0") || !n.starts_with("rc="));
        if f.len() >= 3 && ok {
            if let Ok(s) = f[2].parse() {
                let key = if f[1] == "cold" {
                    format!("{}/cold", f[0])
                } else {
                    f[0].to_string()
                };
                out.entry(key).or_default().push(s);
            }
        }
    }
    Ok(out)
}

fn run_peer_script(args: &Args, script: &str, datasets: &[String]) -> Result<()> {
    let script = args.shared.join(script);
    eprintln!("running {} for {datasets:?}", script.display());
    let status = Command::new("bash")
        .arg(&script)
        .env("DATASETS", datasets.join(" "))
        .env("BENCH_ROOT", &args.bench_root)
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed", script.display());
    }
    Ok(())
}

fn is_mounted(mp: &Path) -> bool {
    let mp = mp.to_string_lossy();
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(&mp))
}

/// Mounts `reference` with `shoal mount`, runs `read` (a shell command) against it, unmounts;
/// returns the read's seconds.
fn time_mounted_read(
    home: &Path,
    origin: &Path,
    reference: &str,
    mp: &Path,
    extra: &[&str],
    read: &str,
) -> Result<f64> {
    std::fs::create_dir_all(mp)?;
    let mut child = Command::new(shoal_bin()?)
        .args(["mount", reference, mp.to_str().unwrap()])
        .args(extra)
        .env("SHOAL_HOME", home)
        .env("SHOAL_ORIGIN", origin)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while !is_mounted(mp) {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!("shoal mount {reference} did not come up");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let secs = time_cmd(Command::new("bash").arg("-c").arg(read));
    let _ = Command::new(shoal_bin()?)
        .args(["unmount", mp.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .status();
    let _ = child.wait();
    secs
}

fn read_cmd(ds: &str, dir: &Path) -> String {
    if ds == "shards" {
        format!(
            "for f in {}/*; do dd if=$f of=/dev/null bs=1M status=none; done",
            dir.display()
        )
    } else {
        format!("tar -C {} -cf - . | cat > /dev/null", dir.display())
    }
}

fn mount_bench(args: &Args, datasets: &[String], runs: usize, peers: &[String]) -> Result<Value> {
    let data = ensure_data(args)?;
    let raw = args.bench_root.join("results/raw.csv");
    let skip = line_count(&raw);
    if peers.iter().any(|p| p == "squash") {
        run_peer_script(args, "bench_squash.sh", datasets)?;
    }
    if peers.iter().any(|p| p == "casync") {
        run_peer_script(args, "bench_casync.sh", datasets)?;
    }
    let peer = raw_rows(&raw, skip)?;
    let work = args.bench_root.join("work/shoal-mount");
    let mp = args.bench_root.join("mnt/shoal");
    let mut out = serde_json::Map::new();
    for ds in datasets {
        let v1 = data.join(format!("{ds}_v1"));
        let files = files_under(&v1)?;
        let bytes: u64 = files.values().sum();
        let _ = std::fs::remove_dir_all(&work);
        let (pub_home, origin, reader) = (
            work.join("publisher"),
            work.join("origin"),
            work.join("reader"),
        );
        shoal(
            &pub_home,
            &origin,
            &["publish", v1.to_str().unwrap(), &format!("{ds}@v1")],
        )?;
        std::fs::create_dir_all(&reader)?;
        std::fs::copy(pub_home.join("publisher.key"), reader.join("publisher.key"))?;
        let reference = format!("{ds}@v1");
        let read = read_cmd(ds, &mp);
        eprintln!("{ds}: shoal mount, cold");
        drop_caches();
        let cold = time_mounted_read(&reader, &origin, &reference, &mp, &[], &read)?;
        // Warm: the local store (chunk segments and whole-file copies) in the page cache.
        let segments = reader.join("store/segments");
        let copies = reader.join("files");
        let copies_after_cold = std::fs::read_dir(&copies).map_or(0, |d| d.count());
        let mut variants = serde_json::Map::new();
        for (name, extra) in [
            ("warm", vec![]),
            ("warm_no_passthrough", vec!["--passthrough", "off"]),
            ("warm_1_thread", vec!["--threads", "1"]),
            ("warm_direct_io", vec!["--direct-io"]),
        ] {
            let mut secs = Vec::new();
            for _ in 0..runs {
                // No writeback of the cold run's store left to compete with the read.
                let _ = Command::new("sync").status();
                warm(&segments)?;
                if copies.exists() {
                    warm(&copies)?;
                }
                secs.push(time_mounted_read(
                    &reader, &origin, &reference, &mp, &extra, &read,
                )?);
            }
            variants.insert(format!("shoal_{name}_runs_s"), json!(secs));
            let s = median(secs);
            variants.insert(format!("shoal_{name}_s"), json!(s));
            variants.insert(format!("shoal_{name}_gbps"), json!(bytes as f64 / s / 1e9));
            variants.insert(
                format!("shoal_{name}_files_per_s"),
                json!(files.len() as f64 / s),
            );
        }
        let mut r = json!({
            "files": files.len(),
            "bytes": bytes,
            "read": read,
            "shoal_cold_s": cold,
            "shoal_cold_gbps": bytes as f64 / cold / 1e9,
            "shoal_cold_files_per_s": files.len() as f64 / cold,
            "whole_file_copies_after_cold": copies_after_cold,
        });
        let m = r.as_object_mut().expect("object");
        m.extend(variants);
        let warm_s = m["shoal_warm_s"].as_f64().unwrap_or(f64::NAN);
        for (label, key) in [
            (format!("squashfuse_ll_read_{ds}"), "squashfuse_ll"),
            (format!("squashfuse_read_{ds}"), "squashfuse"),
            (format!("kernel_read_{ds}"), "kernel_squashfs"),
            (format!("casync_mount_read_{ds}_v1"), "casync_mount"),
            (format!("native_read_{ds}_warm"), "native"),
        ] {
            if let Some(v) = peer.get(&label) {
                let s = median(v.clone());
                m.insert(format!("{key}_warm_s"), json!(s));
                m.insert(format!("{key}_warm_gbps"), json!(bytes as f64 / s / 1e9));
                m.insert(
                    format!("{key}_warm_files_per_s"),
                    json!(files.len() as f64 / s),
                );
                m.insert(format!("shoal_warm_vs_{key}"), json!(s / warm_s));
            }
            if let Some(v) = peer.get(&format!("{label}/cold")) {
                let s = median(v.clone());
                m.insert(format!("{key}_cold_s"), json!(s));
                m.insert(format!("shoal_cold_vs_{key}_cold"), json!(s / cold));
            }
        }
        out.insert(ds.clone(), r);
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(json!({ "benchmark": "mount", "runs": runs, "datasets": out }))
}

fn line_count(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn stat_after(stats: &str, prefix: &str, key: &str) -> Option<f64> {
    let line = stats.lines().rev().find(|l| l.starts_with(prefix))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..].split_whitespace().next()?.parse().ok()
}

fn publish_bench(args: &Args, datasets: &[String], runs: usize, skip_peers: bool) -> Result<Value> {
    let root = &args.bench_root;
    let data = ensure_data(args)?;
    let work = root.join("work/shoal");
    std::fs::create_dir_all(&work)?;
    let results_dir = root.join("results");
    std::fs::create_dir_all(&results_dir)?;

    // Peers first, so that Shoal runs with the same (warm) page cache afterwards.
    let raw = results_dir.join("raw.csv");
    let skip = line_count(&raw);
    if !skip_peers {
        let script = args.shared.join("bench_casync.sh");
        eprintln!(
            "running {} for {datasets:?} (casync make, v2, extract, mount)",
            script.display()
        );
        let status = Command::new("bash")
            .arg(&script)
            .env("DATASETS", datasets.join(" "))
            .env("BENCH_ROOT", root)
            // The script's progress goes to stderr; stdout is this program's JSON.
            .stdout(std::process::Stdio::from(std::io::stderr()))
            .status()
            .context("running bench_casync.sh")?;
        if !status.success() {
            bail!("{} failed", script.display());
        }
    }
    let peer = raw_rows(&raw, skip)?;
    let casync_stats =
        std::fs::read_to_string(results_dir.join("casync_stats.txt")).unwrap_or_default();

    let mut out = serde_json::Map::new();
    for ds in datasets {
        let (v1, v2) = (data.join(format!("{ds}_v1")), data.join(format!("{ds}_v2")));
        let files = files_under(&v1)?;
        let bytes: u64 = files.values().sum();
        warm(&v1)?;
        eprintln!("{ds}: {} files, {bytes} bytes", files.len());

        // b3sum over the same files: the hashing ceiling.
        let paths: Vec<PathBuf> = files.keys().map(|p| v1.join(p)).collect();
        let mut b3_1t = Vec::new();
        let mut b3_mt = Vec::new();
        for _ in 0..runs {
            let mut one = Command::new("b3sum");
            one.arg("--num-threads").arg("1").args(&paths);
            b3_1t.push(time_cmd(&mut one)?);
            let mut all = Command::new("b3sum");
            all.args(&paths);
            b3_mt.push(time_cmd(&mut all)?);
        }

        let mut publish = Vec::new();
        let mut first = None;
        for run in 0..runs {
            let dir = work.join(format!("{ds}-run{run}"));
            let _ = std::fs::remove_dir_all(&dir);
            drop_caches();
            warm(&v1)?;
            let (secs, v) = shoal(
                &dir.join("home"),
                &dir.join("origin"),
                &["publish", v1.to_str().unwrap(), &format!("{ds}@v1")],
            )?;
            publish.push(secs);
            first.get_or_insert((dir, v));
        }
        let (dir, v1_report) = first.expect("at least one run");
        let origin = dir.join("origin");
        warm(&v2)?;
        let (v2_secs, v2_report) = shoal(
            &dir.join("home"),
            &origin,
            &["publish", v2.to_str().unwrap(), &format!("{ds}@v2")],
        )?;
        let changed = changed_bytes(&v1, &v2)?;
        let uploaded = v2_report["new_bytes_uploaded"].as_u64().unwrap_or(0);

        let mut pull = Vec::new();
        for run in 0..runs {
            let home = dir.join(format!("puller{run}"));
            let dest = dir.join(format!("pulled{run}"));
            let _ = std::fs::remove_dir_all(&home);
            let _ = std::fs::remove_dir_all(&dest);
            std::fs::create_dir_all(&home)?;
            std::fs::copy(dir.join("home/publisher.key"), home.join("publisher.key"))?;
            drop_caches();
            warm(&origin)?;
            let (secs, _) = shoal(
                &home,
                &origin,
                &["pull", &format!("{ds}@v1"), "--to", dest.to_str().unwrap()],
            )?;
            pull.push(secs);
            let _ = std::fs::remove_dir_all(&dest);
            let _ = std::fs::remove_dir_all(&home);
        }

        let gbps = |s: f64| bytes as f64 / s / 1e9;
        let fastest = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let (publish_min, pull_min) = (fastest(&publish), fastest(&pull));
        let shoal_publish = median(publish);
        let shoal_pull = median(pull);
        let b3_1t = median(b3_1t);
        let b3_mt = median(b3_mt);
        let mut r = json!({
            "files": files.len(),
            "bytes": bytes,
            "runs": runs,
            "shoal_publish_s": shoal_publish,
            "shoal_publish_min_s": publish_min,
            "shoal_publish_gbps": gbps(shoal_publish),
            "shoal_chunks": v1_report["chunks"],
            "b3sum_1thread_gbps": gbps(b3_1t),
            "b3sum_gbps": gbps(b3_mt),
            "shoal_publish_vs_b3sum": b3_mt / shoal_publish,
            "v2_changed_bytes": changed,
            "shoal_v2_uploaded_bytes": uploaded,
            "shoal_v2_upload_ratio": uploaded as f64 / changed as f64,
            "shoal_v2_publish_s": v2_secs,
            "shoal_pull_s": shoal_pull,
            "shoal_pull_min_s": pull_min,
            "shoal_pull_gbps": gbps(shoal_pull),
        });
        let m = r.as_object_mut().expect("object");
        if let Some(s) = peer.get(&format!("casync_make_{ds}_v1")) {
            m.insert("casync_make_min_s".into(), json!(fastest(s)));
            let s = median(s.clone());
            m.insert("casync_make_s".into(), json!(s));
            m.insert("casync_make_gbps".into(), json!(gbps(s)));
            m.insert(
                "shoal_publish_speedup_vs_casync".into(),
                json!(s / shoal_publish),
            );
        }
        if let Some(nb) = stat_after(&casync_stats, &format!("{ds} v2:"), "new_store_bytes") {
            m.insert("casync_v2_new_bytes".into(), json!(nb));
            m.insert("casync_v2_upload_ratio".into(), json!(nb / changed as f64));
        }
        if let Some(s) = peer.get(&format!("casync_extract_{ds}_v1")) {
            m.insert("casync_extract_min_s".into(), json!(fastest(s)));
            let s = median(s.clone());
            m.insert("casync_extract_s".into(), json!(s));
            m.insert(
                "shoal_pull_speedup_vs_casync_extract".into(),
                json!(s / shoal_pull),
            );
        }
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        out.insert(ds.clone(), r);
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    Ok(json!({ "benchmark": "publish", "cores": cores, "datasets": out }))
}

fn chunking_bench(args: &Args, datasets: &[String], avgs: &[u32]) -> Result<Value> {
    let data = ensure_data(args)?;
    let work = args.bench_root.join("work/shoal-chunking");
    let mut out = serde_json::Map::new();
    for ds in datasets {
        let (v1, v2) = (data.join(format!("{ds}_v1")), data.join(format!("{ds}_v2")));
        let changed = changed_bytes(&v1, &v2)?;
        let mut rows = Vec::new();
        for &avg in avgs {
            let (min, max) = (avg * 1024 / 4, avg * 1024 * 4);
            let spec = format!("{min},{},{max}", avg * 1024);
            let _ = std::fs::remove_dir_all(&work);
            let (home, origin) = (work.join("home"), work.join("origin"));
            let (s1, r1) = shoal(
                &home,
                &origin,
                &[
                    "publish",
                    v1.to_str().unwrap(),
                    &format!("{ds}@v1"),
                    "--chunking",
                    &spec,
                    // Every file cut with the size swept (a media dataset's small files would
                    // otherwise be one chunk each, whatever the size).
                    "--small-files",
                    "off",
                ],
            )?;
            let (_, r2) = shoal(
                &home,
                &origin,
                &["publish", v2.to_str().unwrap(), &format!("{ds}@v2")],
            )?;
            let bytes = r1["bytes"].as_u64().unwrap_or(0);
            let uploaded_v1 = r1["new_bytes_uploaded"].as_u64().unwrap_or(0);
            let uploaded_v2 = r2["new_bytes_uploaded"].as_u64().unwrap_or(0);
            eprintln!(
                "{ds} avg {avg} KiB: v2 ratio {:.3}",
                uploaded_v2 as f64 / changed as f64
            );
            rows.push(json!({
                "min": min, "avg": avg * 1024, "max": max,
                "chunks": r1["chunks"],
                "metadata_bytes_v1": uploaded_v1.saturating_sub(bytes),
                "metadata_per_gib": uploaded_v1.saturating_sub(bytes) as f64 / (bytes as f64 / (1u64 << 30) as f64),
                "publish_v1_s": s1,
                "v2_uploaded_bytes": uploaded_v2,
                "v2_changed_bytes": changed,
                "v2_upload_ratio": uploaded_v2 as f64 / changed as f64,
            }));
        }
        out.insert(ds.clone(), Value::Array(rows));
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(json!({ "benchmark": "chunking", "datasets": out }))
}

fn eviction_bench(blocks: u32, epochs: usize) -> Value {
    use shoal_node::policy::{simulate_epochs, ClockLfu, Lru};
    let mut rows = Vec::new();
    for pct in [25u64, 50, 75, 90] {
        let cap = blocks as u64 * pct / 100;
        let lru = simulate_epochs(&mut Lru::new(cap), blocks, epochs, 7);
        let lfu = simulate_epochs(&mut ClockLfu::new(cap), blocks, epochs, 7);
        let steady = |r: &[f64]| r[1..].iter().sum::<f64>() / (r.len() - 1) as f64;
        rows.push(json!({
            "cache_pct_of_dataset": pct,
            "lru_hit_rate_per_epoch": lru,
            "clock_lfu_hit_rate_per_epoch": lfu,
            "lru_hit_rate_after_first_epoch": steady(&lru),
            "clock_lfu_hit_rate_after_first_epoch": steady(&lfu),
            "best_possible_after_first_epoch": pct as f64 / 100.0,
        }));
    }
    json!({ "benchmark": "eviction", "blocks": blocks, "epochs": epochs, "results": rows })
}

/// "200mbit", "10gbit", "1.5gbit", "800kbit" as bits per second.
fn bits_per_second(s: &str) -> Result<f64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, unit) = t.split_at(t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len()));
    let n: f64 = num
        .parse()
        .with_context(|| format!("rate {s:?}: expected a number and kbit, mbit or gbit"))?;
    let k = match unit {
        "gbit" => 1e9,
        "mbit" => 1e6,
        "kbit" => 1e3,
        "bit" | "" => 1.0,
        _ => bail!("rate {s:?}: expected a number and kbit, mbit or gbit"),
    };
    Ok(n * k)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (name, result) = match &args.command {
        Cmd::Publish {
            datasets,
            runs,
            skip_peers,
        } => (
            "publish",
            publish_bench(&args, datasets, (*runs).max(1), *skip_peers)?,
        ),
        Cmd::Chunking { datasets, avg_kib } => {
            ("chunking", chunking_bench(&args, datasets, avg_kib)?)
        }
        Cmd::Sim {
            nodes,
            size,
            node_rate,
            origin_rate,
            zones,
            rtt_ms,
            zone_rtt_ms,
            origin_rtt_ms,
            churn,
            liars,
            stallers,
            peers,
            delta_ms,
            seed,
            trace_ms,
            stagger_ms,
            readers_by_rank,
            mount,
            isolated,
            file_size,
            readahead,
            payload_per_wire,
            fair_uplink,
            origin_readers,
            origin_pace,
            reader_lag_ms,
        } => {
            if *mount && (*peers != 0 || *churn > 0.0 || *liars > 0.0 || *stagger_ms > 0.0) {
                bail!(
                    "--mount is simulated with --peers 0, without --churn, --liars or --stagger-ms"
                );
            }
            if (*isolated || *file_size != 128 << 20 || *readahead != 32 << 20) && !*mount {
                bail!("--isolated, --file-size and --readahead go with --mount");
            }
            if !(*payload_per_wire > 0.0 && *payload_per_wire <= 1.0) {
                bail!("--payload-per-wire must be in (0, 1]");
            }
            let ms = |m: f64| std::time::Duration::from_secs_f64(m / 1e3);
            let setup = shoal_testnet::sim::Setup {
                nodes: (*nodes).max(1),
                size: *size,
                node_bps: bits_per_second(node_rate)?,
                origin_bps: bits_per_second(origin_rate)?,
                zones: (*zones).max(1),
                rtt: ms(*rtt_ms),
                zone_rtt: ms(*zone_rtt_ms),
                origin_rtt: ms(*origin_rtt_ms),
                churn: *churn,
                liars: *liars,
                stallers: *stallers,
                peers: *peers,
                delta_every: ms(*delta_ms),
                seed: *seed,
                trace_every: ms(*trace_ms),
                stagger: ms(*stagger_ms),
                readers_by_start: !*readers_by_rank,
                payload_per_wire: *payload_per_wire,
                mount: mount.then_some(shoal_testnet::sim::Mount {
                    readahead: (*readahead).max(1),
                    file: (*file_size).max(1),
                    isolated: *isolated,
                }),
                fair_uplink: *fair_uplink,
                origin_readers: (*origin_readers).max(1),
                origin_pace: *origin_pace,
                reader_lag: match *reader_lag_ms {
                    None => shoal_sched::pull::Config::default().reader_lag,
                    Some(0) => std::time::Duration::MAX,
                    Some(ms) => std::time::Duration::from_millis(ms),
                },
                ..Default::default()
            };
            (
                "sim",
                serde_json::to_value(shoal_testnet::sim::run(&setup))?,
            )
        }
        Cmd::Eviction { blocks, epochs } => ("eviction", eviction_bench(*blocks, *epochs)),
        Cmd::SwarmLo {
            runs,
            peers,
            text,
            wire,
            seed_rate,
        } => {
            let wire: &[bool] = match wire.as_str() {
                "on" => &[true],
                "off" => &[false],
                "both" => &[true, false],
                w => anyhow::bail!("--wire {w}: expected on, off or both"),
            };
            let peers: &[String] = if *text { &[] } else { peers };
            (
                "swarm_lo",
                swarm_bench::loopback(
                    &args,
                    (*runs).max(1),
                    peers,
                    *text,
                    wire,
                    seed_rate.as_deref(),
                )?,
            )
        }
        Cmd::SwarmNetns {
            nodes,
            rate,
            kill,
            no_peers,
            second_origin,
        } => (
            if *kill > 0 {
                "swarm_churn"
            } else {
                "swarm_netns"
            },
            swarm_bench::netns(
                &args,
                *nodes,
                rate,
                *kill,
                !*no_peers,
                second_origin.as_deref(),
            )?,
        ),
        Cmd::MountNetns {
            nodes,
            rate,
            isolated,
        } => (
            if *isolated {
                "mount_netns_isolated"
            } else {
                "mount_netns"
            },
            swarm_bench::netns_mount(&args, *nodes, rate, *isolated)?,
        ),
        Cmd::Gc {
            versions,
            files,
            churn,
            keep,
        } => (
            "gc",
            gc_bench::run(&args, *versions, *files, *churn, *keep)?,
        ),
        Cmd::Compress { runs } => ("compress", compress_bench::run(&args, (*runs).max(1))?),
        Cmd::Scale {
            entries,
            width,
            real_files,
            src,
            no_pull,
            pull_no_files,
            no_find,
        } => (
            "scale",
            scale_bench::run(
                &args,
                *entries,
                *width,
                *real_files,
                src.as_deref(),
                match (*no_pull, *pull_no_files) {
                    (true, _) => scale_bench::Pull::No,
                    (false, true) => scale_bench::Pull::StoreOnly,
                    (false, false) => scale_bench::Pull::Files,
                },
                !*no_find,
            )?,
        ),
        Cmd::ScaleGen {
            entries,
            width,
            origin,
            target,
        } => {
            let (dataset, version) = target.split_once('@').context("--target is NAME@VERSION")?;
            let key = shoal_registry::SecretKey::generate()?;
            let t = Instant::now();
            let g =
                shoal_testnet::scale::generate(origin, &key, dataset, version, *entries, *width)?;
            (
                "scale_gen",
                json!({
                    "ref": target,
                    "root": format!("b3:{}", g.root),
                    "entries": g.files,
                    "packs": g.packs,
                    "last_path": g.last_path,
                    "publisher": key.public().to_string(),
                    "seconds": t.elapsed().as_secs_f64(),
                }),
            )
        }
        Cmd::Python { workers } => ("python", swarm_bench::python_vs_mount(&args, *workers)?),
        Cmd::Rates { mb } => ("rates", swarm_bench::rates(&args, *mb)?),
        Cmd::SwarmZones { rate } => ("swarm_zones", swarm_bench::locality(&args, rate)?),
        Cmd::OriginsData { no_peers } => ("origins_data", origins_bench::run(&args, !*no_peers)?),
        Cmd::OriginsNetns { rates, no_peers } => (
            "origins_netns",
            swarm_bench::origins(&args, rates, !*no_peers)?,
        ),
        Cmd::MountPeer { datasets, runs } => (
            "mount_peer",
            swarm_bench::mount_from_peer(&args, datasets, (*runs).max(1))?,
        ),
        Cmd::Mount {
            datasets,
            runs,
            peers,
        } => (
            "mount",
            mount_bench(&args, datasets, (*runs).max(1), peers)?,
        ),
    };
    let text = serde_json::to_string_pretty(&result)?;
    let path = args
        .bench_root
        .join("results")
        .join(format!("shoal_{name}.json"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    println!("{text}");
    eprintln!("results written to {}", path.display());
    Ok(())
}
