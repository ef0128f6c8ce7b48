//! Swarm benchmarks: 1:1 over loopback, a cold cluster behind a shaped origin link (with
//! optional churn), and locality between two zones. Shoal runs as real node daemons; the peer
//! baselines run from `../shared/bench` in the same invocation.

use super::{
    ensure_data, files_under, line_count, median, raw_rows, run_peer_script, shoal_bin, Args,
};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One `shoal node run` process, possibly inside a network namespace.
struct Daemon {
    home: PathBuf,
    child: Option<Child>,
    netns: Option<String>,
    args: Vec<String>,
    origin: String,
    trusted: String,
}

impl Daemon {
    fn shoal(&self) -> Result<Command> {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(shoal_bin()?);
                c
            }
            None => Command::new(shoal_bin()?),
        };
        c.env("SHOAL_HOME", &self.home)
            .env("SHOAL_ORIGIN", &self.origin)
            .env("SHOAL_TRUSTED_KEYS", &self.trusted);
        Ok(c)
    }

    fn start(
        home: PathBuf,
        netns: Option<String>,
        args: Vec<String>,
        origin: &str,
        trusted: &str,
    ) -> Result<Daemon> {
        std::fs::create_dir_all(&home)?;
        let mut args = args;
        if netns.is_some() && supports_cluster_key()? {
            // Nodes in namespaces talk over real addresses: a private cluster, as in
            // production, sharing one key beside their state directories.
            let key = home
                .parent()
                .context("a daemon's home has a parent")?
                .join("cluster.key");
            if !key.exists() {
                let out = Command::new(shoal_bin()?)
                    .args(["node", "keygen"])
                    .arg(&key)
                    .output()?;
                if !out.status.success() {
                    bail!(
                        "shoal node keygen: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
            args.extend(["--cluster-key".to_string(), key.display().to_string()]);
        }
        let mut d = Daemon {
            home,
            child: None,
            netns,
            args,
            origin: origin.to_string(),
            trusted: trusted.to_string(),
        };
        d.spawn()?;
        Ok(d)
    }

    /// A fresh daemon on loopback that bootstraps from `addr` and is connected to it.
    fn leech(home: PathBuf, addr: &str, origin: &str, trusted: &str) -> Result<Daemon> {
        let d = Daemon::start(
            home,
            None,
            vec![
                "--listen".into(),
                "/ip4/127.0.0.1/tcp/0".into(),
                "--bootstrap".into(),
                addr.to_string(),
            ],
            origin,
            trusted,
        )?;
        wait_connected(&[&d], 1)?;
        Ok(d)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.home.join("node.log"))?;
        let mut c = self.shoal()?;
        c.args(["node", "run", "--no-mdns"])
            .args(&self.args)
            .env(
                "SHOAL_LOG",
                std::env::var("SHOAL_BENCH_NODE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(c.spawn().context("starting shoal node run")?);
        let t = Instant::now();
        while self.status().is_none() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!(
                    "node {} did not start: see its node.log",
                    self.home.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn status(&self) -> Option<Value> {
        let out = Command::new(shoal_bin().ok()?)
            .args(["--json", "status"])
            .env("SHOAL_HOME", &self.home)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    fn connected(&self) -> usize {
        self.status()
            .and_then(|s| {
                s["peers"]
                    .as_array()
                    .map(|p| p.iter().filter(|p| p["connected"] == true).count())
            })
            .unwrap_or(0)
    }

    /// A `shoal --json pull REF --no-files` through this daemon (the CLI talks to it over its
    /// socket, so it runs outside the namespace).
    fn pull(&self, reference: &str) -> Result<Child> {
        Command::new(shoal_bin()?)
            .args(["--json", "pull", reference, "--no-files"])
            .env("SHOAL_HOME", &self.home)
            .env("SHOAL_ORIGIN", &self.origin)
            .env("SHOAL_TRUSTED_KEYS", &self.trusted)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting shoal pull")
    }

    /// CPU seconds (user + system) the daemon has used so far.
    fn cpu_seconds(&self) -> f64 {
        let Some(c) = &self.child else { return 0.0 };
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", c.id())).unwrap_or_default();
        // Fields after the command name (which may contain spaces): utime is the 12th, stime 13th.
        let rest = stat.rsplit_once(')').map(|r| r.1).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        ticks / 100.0
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

fn wait_pull(child: Child) -> Result<(f64, Value)> {
    let t = Instant::now();
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("pull failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok((t.elapsed().as_secs_f64(), v))
}

fn wait_connected(nodes: &[&Daemon], n: usize) -> Result<()> {
    let t = Instant::now();
    while nodes.iter().any(|d| d.connected() < n) {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("nodes did not all connect to {n} peers within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Publishes shards_v1 as `shards@v1` once per work directory; returns the publisher's key.
fn publisher(work: &Path, origin: &str, shards: &Path) -> Result<String> {
    publish(work, origin, shards, "shards@v1")
}

/// Publishes `dir` as `reference` once per work directory; returns the publisher's key.
fn publish(work: &Path, origin: &str, dir: &Path, reference: &str) -> Result<String> {
    let home = work.join("publisher");
    let key = Command::new(shoal_bin()?)
        .args(["key"])
        .env("SHOAL_HOME", &home)
        .output()?;
    let trusted = String::from_utf8_lossy(&key.stdout).trim().to_string();
    let marker = work.join(format!("published-{reference}"));
    if !marker.exists() {
        let out = Command::new(shoal_bin()?)
            .arg("publish")
            .arg(dir)
            .arg(reference)
            .env("SHOAL_HOME", &home)
            .env("SHOAL_ORIGIN", origin)
            .output()?;
        if !out.status.success() {
            bail!("publish failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::write(&marker, "")?;
    }
    Ok(trusted)
}

/// The shared scripts call `$BENCH_ROOT/scripts/...`.
fn link_scripts(args: &Args) -> Result<()> {
    let link = args.bench_root.join("scripts");
    if !link.exists() {
        std::os::unix::fs::symlink(std::fs::canonicalize(&args.shared)?, &link)?;
    }
    Ok(())
}

fn ns(args: &[&str]) -> Result<()> {
    let st = Command::new("ip").args(args).status()?;
    if !st.success() {
        bail!(
            "`ip {}` failed: these scenarios need root and network namespaces",
            args.join(" ")
        );
    }
    Ok(())
}

/// Removes these namespaces, those that exist.
fn ns_del(names: &[&str]) {
    for n in names {
        let _ = Command::new("ip")
            .args(["netns", "del", n])
            .stderr(Stdio::null())
            .status();
    }
}

/// A new namespace `host` whose eth0 (address `addr`, e.g. 10.78.0.11/24) is plugged into
/// `bridge` in namespace `sw`; the switch side is `p-<host>`, to shape if wanted.
fn plug(sw: &str, bridge: &str, host: &str, addr: &str) -> Result<()> {
    ns(&["netns", "add", host])?;
    ns(&["-n", host, "link", "set", "lo", "up"])?;
    let (v, p) = (format!("v-{host}"), format!("p-{host}"));
    ns(&["link", "add", &v, "type", "veth", "peer", "name", &p])?;
    ns(&["link", "set", &v, "netns", host])?;
    ns(&["link", "set", &p, "netns", sw])?;
    ns(&["-n", host, "link", "set", &v, "name", "eth0"])?;
    ns(&["-n", host, "addr", "add", addr, "dev", "eth0"])?;
    ns(&["-n", host, "link", "set", "eth0", "up"])?;
    ns(&["-n", sw, "link", "set", &p, "master", bridge])?;
    ns(&["-n", sw, "link", "set", &p, "up"])
}

fn peer_medians(raw: &Path, skip: usize) -> Result<serde_json::Map<String, Value>> {
    let rows = raw_rows(raw, skip)?;
    Ok(rows
        .into_iter()
        .map(|(k, v)| (k, json!(median(v))))
        .collect())
}

/// Writes and deletes `bytes` of scratch data, so that the timed run after it writes into
/// page-cache memory freed a moment ago, as every peer baseline's does (their scripts remove the
/// previous run's output right before the next run).
///
/// On this VM memory that has been free for a few seconds goes back to the host (free page
/// reporting), and writing 1 GiB into it costs ~2 s of kernel time instead of ~0.2 s
/// (`dd` of 1 GiB: 0.19-0.21 s right after a delete, 1.83-2.34 s after a 5-10 s pause; rsync of
/// shards_v1: 0.82-0.88 s vs 1.55-2.45 s). Without this a node's pull, started seconds after the
/// last write, pays what its baselines do not. The guest reports free memory 2 s after a large
/// free; waiting 3 s first lets a report pending from the previous run's cleanup pass before the
/// scratch is freed, or it would take the recycled memory mid-pull (measured: the second of
/// three runs then paid the full cost every time). See docs/benchmarks.md.
fn recycle_memory(work: &Path, bytes: u64) -> Result<()> {
    use std::io::Write;
    std::thread::sleep(Duration::from_secs(3));
    let path = work.join("recycle.scratch");
    let block = vec![0x5au8; 1 << 20];
    let mut f = std::fs::File::create(&path)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(())
}

/// Scenario 1: one seeder, one leecher, 127.0.0.1; shards_v1 into the leecher's store.
/// Real text anyone can fetch here, in one tree under the bench root: the sources of two
/// Django releases (PyPI) and Debian's Perl modules (made once).
fn text_corpus(args: &Args) -> Result<PathBuf> {
    let tree = args.bench_root.join("real/text");
    if tree.join("done").exists() {
        return Ok(tree.join("tree"));
    }
    let (old, new) = super::compress_bench::django(args)?;
    let deb = super::compress_bench::debian(args)?;
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("tree"))?;
    for (from, to) in [(old, "django-old"), (new, "django-new"), (deb, "perl")] {
        let ok = Command::new("cp")
            .arg("-a")
            .arg(&from)
            .arg(tree.join("tree").join(to))
            .status()?
            .success();
        if !ok {
            bail!("copying {} into the text corpus", from.display());
        }
    }
    std::fs::write(tree.join("done"), "")?;
    Ok(tree.join("tree"))
}

/// 1:1 over loopback: a seed daemon holding the dataset, a fresh leecher pulling it from the
/// seed `runs` times, once per wire setting in `wire` (true: the seed compresses what pays,
/// the default; false: `--no-wire-compression`), then the peer tools on shards_v1. `text`:
/// the real text corpus instead of shards_v1 (no peer tools). `seed_rate`: the seed's upload
/// rate, a link of that speed.
pub fn loopback(
    args: &Args,
    runs: usize,
    peers: &[String],
    text: bool,
    wire: &[bool],
    seed_rate: Option<&str>,
) -> Result<Value> {
    let data = ensure_data(args)?;
    link_scripts(args)?;
    let (src, reference) = if text {
        (text_corpus(args)?, "text@v1")
    } else {
        (data.join("shards_v1"), "shards@v1")
    };
    let bytes: u64 = files_under(&src)?.values().sum();
    let work = args.bench_root.join("work/swarm-lo");
    let origin = work.join("origin").display().to_string();
    std::fs::create_dir_all(&work)?;
    let trusted = publish(&work, &origin, &src, reference)?;
    let raw = args.bench_root.join("results/raw.csv");
    let skip = line_count(&raw);

    let mut modes = serde_json::Map::new();
    let mut first_median = None;
    for &compress in wire {
        let mut seed_args = vec!["--listen".to_string(), "/ip4/127.0.0.1/tcp/0".to_string()];
        if !compress {
            seed_args.push("--no-wire-compression".into());
        }
        if let Some(r) = seed_rate {
            seed_args.extend(["--upload-rate".to_string(), r.to_string()]);
        }
        let _ = std::fs::remove_dir_all(work.join("seed"));
        let seed = Daemon::start(work.join("seed"), None, seed_args, &origin, &trusted)?;
        wait_pull(seed.pull(reference)?)?;
        let addr = seed.status().context("seed status")?["listen"][0]
            .as_str()
            .context("seed address")?
            .to_string();
        let mut times = Vec::new();
        let mut reports = Vec::new();
        for r in 0..runs {
            super::warm(&seed.home.join("store"))?;
            let home = work.join("leech");
            let _ = std::fs::remove_dir_all(&home);
            let leech = Daemon::leech(home.clone(), &addr, &origin, &trusted)?;
            recycle_memory(&work, bytes)?;
            let (s0, l0) = (seed.cpu_seconds(), leech.cpu_seconds());
            let (secs, v) = wait_pull(leech.pull(reference)?)?;
            let (s_cpu, l_cpu) = (seed.cpu_seconds() - s0, leech.cpu_seconds() - l0);
            let on_wire = leech
                .status()
                .and_then(|s| s["bytes_from_peers_wire"].as_u64());
            eprintln!(
                "shoal 1:1 {reference} (wire compression {}) run {}: {secs:.2} s, {} from peers ({} on the wire), {} from origin, cpu sender {s_cpu:.2} s receiver {l_cpu:.2} s",
                if compress { "on" } else { "off" },
                r + 1,
                v["bytes_from_peers"],
                on_wire.map_or("?".to_string(), |w| w.to_string()),
                v["bytes_from_origin"]
            );
            times.push(secs);
            reports.push(json!({
                "report": v,
                "bytes_on_the_wire": on_wire,
                "sender_cpu_s": s_cpu,
                "receiver_cpu_s": l_cpu,
            }));
            drop(leech);
            // The last run's receiver log stays for a look at its timeline.
            let _ = std::fs::rename(home.join("node.log"), work.join("leech.log"));
            let _ = std::fs::remove_dir_all(&home);
        }
        drop(seed);
        let m = median(times.clone());
        first_median.get_or_insert(m);
        modes.insert(
            if compress {
                "wire_compression_on"
            } else {
                "wire_compression_off"
            }
            .into(),
            json!({
                "seconds": times,
                "median_s": m,
                "gbps": bytes as f64 / m / 1e9,
                "runs": reports,
            }),
        );
    }
    let shoal_s = first_median.context("no wire setting to run")?;
    if text {
        return Ok(json!({
            "scenario": "loopback 1:1, a real text corpus (two Django releases, Debian's Perl modules) into the leecher's store (verified), TLS bulk channel",
            "bytes": bytes,
            "seed_upload_rate": seed_rate,
            "modes": modes,
        }));
    }

    if peers.iter().any(|p| p == "rsync" || p == "nginx") {
        run_peer_script(args, "bench_http_rsync.sh", &[])?;
    }
    if peers.iter().any(|p| p == "aria2") {
        let _ = Command::new("bash")
            .arg(args.shared.join("netns.sh"))
            .arg("down")
            .status();
        Command::new("bash")
            .arg(args.shared.join("netns.sh"))
            .arg("lo")
            .status()?;
        let st = Command::new("bash")
            .arg(args.shared.join("bt_swarm.sh"))
            .args(["lo", "1", &runs.to_string()])
            .env("BENCH_ROOT", &args.bench_root)
            .stdout(Stdio::from(std::io::stderr()))
            .status();
        let _ = Command::new("bash")
            .arg(args.shared.join("netns.sh"))
            .arg("down")
            .status();
        st?;
    }
    if peers.iter().any(|p| p == "sendme") && which("sendme") {
        run_peer_script(args, "bench_sendme.sh", &[])?;
    }
    let peer = peer_medians(&raw, skip)?;
    let mut ratios = serde_json::Map::new();
    for (k, v) in &peer {
        if let Some(s) = v.as_f64() {
            ratios.insert(k.clone(), json!(s / shoal_s));
        }
    }
    Ok(json!({
        "scenario": "loopback 1:1, shards_v1 into the leecher's store (verified), TLS bulk channel",
        "bytes": bytes,
        "seed_upload_rate": seed_rate,
        "modes": modes,
        "shoal_median_s": shoal_s,
        "shoal_gbps": bytes as f64 / shoal_s / 1e9,
        "memory_recycled_before_each_run": true,
        "peers_median_s": peer,
        "peer_time_over_shoal_time": ratios,
    }))
}

/// Cold mount reads served by a daemon fetching from a peer daemon over loopback, against a
/// cold embedded mount of a local origin directory, per dataset.
pub fn mount_from_peer(args: &Args, datasets: &[String], runs: usize) -> Result<Value> {
    let data = ensure_data(args)?;
    let work = args.bench_root.join("work/mount-peer");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let origin = work.join("origin").display().to_string();
    let mp = args.bench_root.join("mnt/shoal-peer");
    let mut out = serde_json::Map::new();
    for ds in datasets {
        let dir = data.join(format!("{ds}_v1"));
        let files = files_under(&dir)?;
        let bytes: u64 = files.values().sum();
        let reference = format!("{ds}@v1");
        let trusted = publish(&work, &origin, &dir, &reference)?;
        let seed = Daemon::start(
            work.join(format!("seed-{ds}")),
            None,
            vec!["--listen".into(), "/ip4/127.0.0.1/tcp/0".into()],
            &origin,
            &trusted,
        )?;
        wait_pull(seed.pull(&reference)?)?;
        let addr = seed.status().context("seed status")?["listen"][0]
            .as_str()
            .context("seed address")?
            .to_string();
        let read = super::read_cmd(ds, &mp);
        let (mut peer_s, mut origin_s, mut reports) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..runs {
            // From the peer: a fresh daemon whose mount fetches every chunk from the seed.
            super::warm(&seed.home.join("store"))?;
            let home = work.join("leech");
            let _ = std::fs::remove_dir_all(&home);
            let leech = Daemon::leech(home.clone(), &addr, &origin, &trusted)?;
            let secs =
                super::time_mounted_read(&home, Path::new(&origin), &reference, &mp, &[], &read)?;
            let st = leech.status().context("leech status")?;
            eprintln!(
                "{ds} run {}: cold mount from a peer {secs:.2} s ({} from peers, {} from origin)",
                r + 1,
                st["bytes_from_peers"],
                st["bytes_from_origin"]
            );
            reports.push(json!({
                "seconds": secs,
                "bytes_from_peers": st["bytes_from_peers"],
                "bytes_from_origin": st["bytes_from_origin"],
            }));
            peer_s.push(secs);
            drop(leech);
            let _ = std::fs::remove_dir_all(&home);
            // From the local origin directory: an embedded mount, fresh state directory.
            super::warm(Path::new(&origin))?;
            let reader = work.join("reader");
            let _ = std::fs::remove_dir_all(&reader);
            std::fs::create_dir_all(&reader)?;
            std::fs::copy(
                work.join("publisher/publisher.key"),
                reader.join("publisher.key"),
            )?;
            let secs =
                super::time_mounted_read(&reader, Path::new(&origin), &reference, &mp, &[], &read)?;
            eprintln!("{ds} run {}: cold mount from the origin {secs:.2} s", r + 1);
            origin_s.push(secs);
            let _ = std::fs::remove_dir_all(&reader);
        }
        let seed_home = seed.home.clone();
        drop(seed);
        let _ = std::fs::remove_dir_all(seed_home);
        let (p, o) = (median(peer_s.clone()), median(origin_s.clone()));
        out.insert(
            ds.clone(),
            json!({
                "files": files.len(),
                "bytes": bytes,
                "read": read,
                "from_peer_seconds": peer_s,
                "from_peer_s": p,
                "from_peer_gbps": bytes as f64 / p / 1e9,
                "from_peer_files_per_s": files.len() as f64 / p,
                "from_origin_dir_seconds": origin_s,
                "from_origin_dir_s": o,
                "from_origin_dir_gbps": bytes as f64 / o / 1e9,
                "peer_time_over_origin_dir_time": p / o,
                "runs": reports,
            }),
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(json!({
        "scenario": "cold mount reads: daemon-served mount fetching from a peer daemon on loopback (TLS bulk channel), vs an embedded mount of a local origin directory",
        "datasets": out,
    }))
}

fn which(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// TCP segments retransmitted by namespace `ns_name` so far (its /proc/net/snmp).
fn retrans_segs(ns_name: &str) -> Result<u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns_name, "cat", "/proc/net/snmp"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().context("Tcp header")?,
        tcp.next().context("Tcp values")?,
    );
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .context("RetransSegs")?
        .1
        .parse()
        .context("RetransSegs value")
}

/// Bytes sent by eth0 in the network namespace of process `pid` (`/proc/PID/net/dev`: no
/// process spawned, so it can be read every few milliseconds).
fn eth0_tx(pid: u32) -> Option<u64> {
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    let line = dev
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("eth0:"))?;
    // receive: bytes packets errs drop fifo frame compressed multicast; then transmit bytes.
    line.split_whitespace().nth(8)?.parse().ok()
}

/// How an origin link was used: Mbit/s per whole second; when the first MiB had gone out; when
/// the last byte had; Mbit/s per tenth of a second over the first two seconds and the last two
/// before the last byte.
#[derive(Default)]
struct LinkUse {
    per_s: Vec<u64>,
    first: Option<f64>,
    last: Option<f64>,
    head: Vec<u64>,
    tail: Vec<u64>,
}

/// Samples the origin's egress every 10 ms on a thread until stopped: (seconds since `t0`,
/// bytes sent since the first sample).
struct LinkSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(f64, u64)>>>,
}

/// A scenario that fails part-way stops its sampler too.
impl Drop for LinkSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl LinkSampler {
    fn start(pid: u32, t0: Instant) -> LinkSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut v = Vec::new();
            let base = eth0_tx(pid).unwrap_or(0);
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(b) = eth0_tx(pid) {
                    v.push((t0.elapsed().as_secs_f64(), b.saturating_sub(base)));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            v
        });
        LinkSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// The link's use (the last byte: within 16 KiB of the end, ACKs and the like aside).
    fn finish(mut self) -> LinkUse {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let s = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let Some(&(end_t, total)) = s.last() else {
            return LinkUse::default();
        };
        // Bytes sent by time t, interpolated between samples.
        let at = |t: f64| -> f64 {
            let k = s.partition_point(|p| p.0 < t);
            match (k.checked_sub(1).map(|j| s[j]), s.get(k)) {
                (Some(a), Some(b)) if b.0 > a.0 => {
                    a.1 as f64 + (b.1 - a.1) as f64 * (t - a.0) / (b.0 - a.0)
                }
                (_, Some(b)) => b.1 as f64,
                (Some(a), None) => a.1 as f64,
                (None, None) => 0.0,
            }
        };
        let mbit = |a: f64, b: f64| ((at(b) - at(a)) * 8.0 / 1e6 / (b - a).max(1e-3)) as u64;
        let per_s = (0..end_t.ceil() as usize)
            .map(|k| mbit(k as f64, ((k + 1) as f64).min(end_t)))
            .collect();
        let first = s.iter().find(|p| p.1 >= 1 << 20).map(|p| p.0);
        let last = s.iter().find(|p| p.1 + (16 << 10) >= total).map(|p| p.0);
        // The start and the end at a finer grain: where a run loses time.
        let tenths = |from: f64| -> Vec<u64> {
            (0..20)
                .map(|k| from + k as f64 / 10.0)
                .map(|a| mbit(a, a + 0.1))
                .collect()
        };
        let head = tenths(0.0);
        let tail = tenths(last.unwrap_or(end_t) - 2.0);
        LinkUse {
            per_s,
            first,
            last,
            head,
            tail,
        }
    }
}

/// What the bench's nginx served, from its access log: requests, body bytes sent, and ranged
/// requests whose body was cut short (the client went away mid-answer).
fn origin_requests(work: &Path) -> Value {
    let log = std::fs::read_to_string(work.join("nginx/logs/access.log")).unwrap_or_default();
    let (mut requests, mut body, mut cut, mut cut_bytes) = (0u64, 0u64, 0u64, 0u64);
    let mut sizes = Vec::new();
    for line in log.lines() {
        let mut f = line.split_whitespace();
        let (Some(_status), Some(sent)) = (f.next(), f.next().and_then(|b| b.parse::<u64>().ok()))
        else {
            continue;
        };
        requests += 1;
        body += sent;
        sizes.push(sent);
        // "bytes=START-END", inclusive.
        let asked = f
            .next()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| Some(b.parse::<u64>().ok()? + 1 - a.parse::<u64>().ok()?));
        if asked.is_some_and(|a| sent < a) {
            cut += 1;
            cut_bytes += sent;
        }
    }
    sizes.sort_unstable();
    let q = |f: f64| {
        sizes
            .get(((sizes.len() as f64 * f) as usize).min(sizes.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let small: Vec<u64> = sizes.iter().copied().filter(|&b| b < 1 << 20).collect();
    json!({
        "requests": requests,
        "body_bytes": body,
        "cut_short": cut,
        "cut_short_body_bytes": cut_bytes,
        "body_bytes_p10_p50_p90": [q(0.1), q(0.5), q(0.9)],
        "requests_under_1mib": small.len(),
        "body_bytes_under_1mib": small.iter().sum::<u64>(),
    })
}

/// A running nginx master; dropping it stops nginx with SIGTERM, which stops the workers too
/// (SIGKILL would leave them running, orphaned in a namespace about to be removed), also when
/// a scenario fails part-way.
struct Nginx(Child);

impl Nginx {
    /// Bytes the origin's namespace has sent on eth0 so far.
    fn tx_bytes(&self) -> Result<u64> {
        eth0_tx(self.0.id()).context("reading the origin namespace's eth0 tx bytes")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// nginx serving `root` on `listen` inside namespace `ns_name`.
fn nginx(work: &Path, ns_name: &str, listen: &str, root: &Path) -> Result<Nginx> {
    let dir = work.join("nginx");
    std::fs::create_dir_all(dir.join("logs"))?;
    // One run's requests only (origin_requests reads the log).
    let _ = std::fs::remove_file(dir.join("logs/access.log"));
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes 2; daemon off; pid {d}/nginx.pid; error_log {d}/logs/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ log_format o '$status $body_bytes_sent $http_range $remote_addr $msec $request_time';\n\
               access_log {d}/logs/access.log o; sendfile on; tcp_nopush on;\n\
               server {{ listen {listen}; root {r}; }} }}\n",
            d = dir.display(),
            r = root.display()
        ),
    )?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns_name, "nginx", "-c"])
        .arg(dir.join("nginx.conf"))
        .arg("-p")
        .arg(&dir)
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(Nginx(child))
}

/// Builds the `netns.sh` topology for `nodes` nodes behind a `rate` origin link (removing a
/// previous one first); returns the script, whose `down` removes it.
fn netns_up(args: &Args, nodes: usize, rate: &str) -> Result<PathBuf> {
    let netns = args.shared.join("netns.sh");
    let _ = Command::new("bash").arg(&netns).arg("down").status();
    let st = Command::new("bash")
        .arg(&netns)
        .args(["up", &nodes.to_string(), rate])
        .status()?;
    if !st.success() {
        bail!("netns.sh up failed: this scenario needs root and network namespaces");
    }
    Ok(netns)
}

/// Daemons n1..nN (fresh state directories under `work`) in namespaces bl-l1..N; with
/// `bootstrap`, all bootstrap from n1 and are connected to each other on return.
fn netns_daemons(
    work: &Path,
    nodes: usize,
    origin: &str,
    trusted: &str,
    bootstrap: bool,
) -> Result<Vec<Daemon>> {
    let mut ds = Vec::new();
    for i in 1..=nodes {
        let home = work.join(format!("n{i}"));
        let _ = std::fs::remove_dir_all(&home);
        let ip = format!("10.77.0.{}", 10 + i);
        let mut a = vec!["--listen".to_string(), format!("/ip4/{ip}/tcp/4001")];
        if i > 1 && bootstrap {
            a.push("--bootstrap".into());
            a.push("/ip4/10.77.0.11/tcp/4001".into());
        }
        ds.push(Daemon::start(
            home,
            Some(format!("bl-l{i}")),
            a,
            origin,
            trusted,
        )?);
    }
    if bootstrap {
        let refs: Vec<&Daemon> = ds.iter().collect();
        wait_connected(&refs, nodes - 1)?;
    }
    Ok(ds)
}

/// Scenario 2 (and 4 with `kill > 0`): N nodes behind one shaped origin link pull shards_v1 at
/// once; with churn, `kill` of them are killed -9 mid-pull and restarted.
///
/// With `second` (a link rate), a second origin joins: a `shoal replicate` of the first, served
/// by nginx in `bl-seed2` (10.77.0.9) behind a link of that rate; every node is configured with
/// both, and the egress of each is reported.
pub fn netns(
    args: &Args,
    nodes: usize,
    rate: &str,
    kill: usize,
    peers: bool,
    second: Option<&str>,
) -> Result<Value> {
    let data = ensure_data(args)?;
    link_scripts(args)?;
    let shards = data.join("shards_v1");
    let bytes: u64 = files_under(&shards)?.values().sum();
    let work = args.bench_root.join("work/swarm-ns");
    std::fs::create_dir_all(&work)?;
    let origin_dir = work.join("origin");
    let trusted = publisher(&work, &origin_dir.display().to_string(), &shards)?;
    let raw = args.bench_root.join("results/raw.csv");
    let skip = line_count(&raw);
    if peers {
        // The BitTorrent and HTTP baselines on the same topology (the script builds and removes it).
        Command::new("bash")
            .arg(args.shared.join("bench_netns.sh"))
            .env("BENCH_ROOT", &args.bench_root)
            .env("N", nodes.to_string())
            .env("RATE", rate)
            .env("RUNS", "1")
            .stdout(Stdio::from(std::io::stderr()))
            .status()?;
    }
    let netns = netns_up(args, nodes, rate)?;
    let result = (|| -> Result<Value> {
        let ng = nginx(&work, "bl-seed", "10.77.0.10:18080", &work)?;
        let mut origin = "http://10.77.0.10:18080/origin".to_string();
        let ng2 = match second {
            Some(rate2) => {
                let work2 = work.join("second");
                let out = Command::new(shoal_bin()?)
                    .args(["replicate", "shards@v1", "--to"])
                    .arg(work2.join("origin"))
                    .env("SHOAL_HOME", work.join("publisher"))
                    .env("SHOAL_ORIGIN", &origin_dir)
                    .output()?;
                if !out.status.success() {
                    bail!("replicate failed: {}", String::from_utf8_lossy(&out.stderr));
                }
                plug("bl-sw", "br0", "bl-seed2", "10.77.0.9/24")?;
                for (n, dev) in [("bl-seed2", "eth0"), ("bl-sw", "p-bl-seed2")] {
                    ns(&[
                        "netns", "exec", n, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                        "rate", rate2, "burst", "256kb", "latency", "50ms",
                    ])?;
                }
                origin.push_str(",http://10.77.0.9:18080/origin");
                Some(nginx(&work2, "bl-seed2", "10.77.0.9:18080", &work2)?)
            }
            None => None,
        };
        let mut ds = netns_daemons(&work, nodes, &origin, &trusted, true)?;
        let tx0 = ng.tx_bytes()?;
        let tx2_0 = ng2.as_ref().map(|n| n.tx_bytes()).transpose()?;
        let retrans0 = retrans_segs("bl-seed")?;
        let t0 = Instant::now();
        let sampler = LinkSampler::start(ng.0.id(), t0);
        // Each pull is waited on by its own thread, so a completion is timed when it happens
        // rather than at the next look.
        let (dtx, drx) = std::sync::mpsc::channel();
        let watch = |i: usize, c: Child| {
            let dtx = dtx.clone();
            std::thread::spawn(move || {
                let out = c.wait_with_output();
                let _ = dtx.send((i, t0.elapsed().as_secs_f64(), out));
            });
        };
        for (i, d) in ds.iter().enumerate() {
            watch(i, d.pull("shards@v1")?);
        }
        let mut done: Vec<Option<(f64, Value)>> = vec![None; nodes];
        let mut killed_at = None;
        let mut restarted = false;
        while done.iter().any(|d| d.is_none()) {
            if t0.elapsed() > Duration::from_secs(900) {
                bail!("the cluster did not finish within 900 s");
            }
            if let Ok((i, t, out)) = drx.recv_timeout(Duration::from_millis(50)) {
                let out = out?;
                if out.status.success() {
                    done[i] = Some((t, serde_json::from_slice(&out.stdout)?));
                } else if killed_at.is_none() || i >= kill {
                    bail!(
                        "node {} pull failed: {}",
                        i + 1,
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
            // Churn: kill -9 the first `kill` nodes a third of the way in, restart them 5 s later.
            if kill > 0 && killed_at.is_none() && t0.elapsed() > Duration::from_secs(12) {
                for d in ds.iter_mut().take(kill) {
                    d.kill9();
                }
                killed_at = Some(t0.elapsed().as_secs_f64());
                eprintln!("killed {kill} nodes at {:.1} s", killed_at.unwrap_or(0.0));
            }
            if let Some(k) = killed_at {
                if !restarted && t0.elapsed().as_secs_f64() > k + 5.0 {
                    for (i, d) in ds.iter_mut().enumerate().take(kill) {
                        d.spawn()?;
                        watch(i, d.pull("shards@v1")?);
                    }
                    restarted = true;
                    eprintln!("restarted them at {:.1} s", t0.elapsed().as_secs_f64());
                }
            }
        }
        let link = sampler.finish();
        let egress = ng.tx_bytes()? - tx0;
        let egress2 = match (&ng2, tx2_0) {
            (Some(n), Some(t)) => Some(n.tx_bytes()? - t),
            _ => None,
        };
        drop(ng2);
        let retransmitted = retrans_segs("bl-seed")? - retrans0;
        drop(ng);
        let per_node: Vec<Value> = done
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (t, v) = d.as_ref().expect("all done");
                json!({
                    "node": i + 1,
                    "done_s": t,
                    "bytes_from_peers": v["bytes_from_peers"],
                    "bytes_from_origin": v["bytes_from_origin"],
                    "bytes_already_local": v["bytes_already_local"],
                })
            })
            .collect();
        let last = done.iter().flatten().map(|d| d.0).fold(0.0, f64::max);
        Ok(json!({
            "nodes": nodes,
            "rate": rate,
            "bytes": bytes,
            "killed": kill,
            "killed_at_s": killed_at,
            "all_done_s": last,
            "origin_egress_bytes": egress,
            "origin_egress_x_dataset": egress as f64 / bytes as f64,
            "second_origin_rate": second,
            "second_origin_egress_bytes": egress2,
            "origins_total_egress_x_dataset": (egress + egress2.unwrap_or(0)) as f64 / bytes as f64,
            "origin_link_mbit_per_s": link.per_s,
            "origin_first_mib_out_s": link.first,
            "origin_last_byte_out_s": link.last,
            "origin_link_mbit_first_2s_per_100ms": link.head,
            "origin_link_mbit_last_2s_per_100ms": link.tail,
            "origin_tcp_retransmitted_segments": retransmitted,
            "origin_http": origin_requests(&work),
            "per_node": per_node,
        }))
    })();
    let _ = Command::new("bash").arg(&netns).arg("down").status();
    // The nodes' logs outlive the work directory: results/logs/swarm-netns-nI.log.
    let logs = args.bench_root.join("results/logs");
    if std::fs::create_dir_all(&logs).is_ok() {
        let _ = std::fs::copy(
            work.join("nginx/logs/access.log"),
            logs.join("swarm-netns-origin-access.log"),
        );
        for i in 1..=nodes {
            let _ = std::fs::copy(
                work.join(format!("n{i}/node.log")),
                logs.join(format!("swarm-netns-n{i}.log")),
            );
        }
    }
    // Eight stores of the dataset: gigabytes.
    let _ = std::fs::remove_dir_all(&work);
    let mut r = result?;
    r["peers_median_s"] = json!(peer_medians(&raw, skip)?);
    r["peer_notes"] = json!(std::fs::read_to_string(
        args.bench_root.join("results/netns_stats.txt")
    )
    .unwrap_or_default());
    Ok(r)
}

/// Scenario 3: zones a and b, one bridge each, joined by a tbf-shaped link. A node in each zone
/// holds the version; a new node in zone a pulls. Reports bytes by source zone.
pub fn locality(args: &Args, rate: &str) -> Result<Value> {
    let data = ensure_data(args)?;
    let shards = data.join("shards_v1");
    let bytes: u64 = files_under(&shards)?.values().sum();
    let work = args.bench_root.join("work/swarm-zones");
    std::fs::create_dir_all(&work)?;
    let origin = work.join("origin").display().to_string();
    let trusted = publisher(&work, &origin, &shards)?;
    let hosts = [("a1", "a", 11), ("a2", "a", 12), ("b1", "b", 21)];
    let down = || ns_del(&["zl-sw", "zl-a1", "zl-a2", "zl-b1"]);
    down();
    let setup = || -> Result<()> {
        ns(&["netns", "add", "zl-sw"])?;
        for br in ["bra", "brb"] {
            ns(&["-n", "zl-sw", "link", "add", br, "type", "bridge"])?;
            ns(&["-n", "zl-sw", "link", "set", br, "up"])?;
        }
        // The inter-zone link, shaped both ways.
        ns(&[
            "-n", "zl-sw", "link", "add", "za", "type", "veth", "peer", "name", "zb",
        ])?;
        ns(&["-n", "zl-sw", "link", "set", "za", "master", "bra"])?;
        ns(&["-n", "zl-sw", "link", "set", "zb", "master", "brb"])?;
        for l in ["za", "zb"] {
            ns(&["-n", "zl-sw", "link", "set", l, "up"])?;
            ns(&[
                "netns", "exec", "zl-sw", "tc", "qdisc", "add", "dev", l, "root", "tbf", "rate",
                rate, "burst", "256kb", "latency", "50ms",
            ])?;
        }
        for (h, z, k) in hosts {
            plug(
                "zl-sw",
                &format!("br{z}"),
                &format!("zl-{h}"),
                &format!("10.78.0.{k}/24"),
            )?;
        }
        Ok(())
    };
    let result = (|| -> Result<Value> {
        setup()?;
        let start = |h: &str, z: &str, k: u32, boot: bool| -> Result<Daemon> {
            let home = work.join(h);
            let _ = std::fs::remove_dir_all(&home);
            let mut a = vec![
                "--listen".to_string(),
                format!("/ip4/10.78.0.{k}/tcp/4001"),
                "--zone".into(),
                z.to_string(),
            ];
            if boot {
                a.push("--bootstrap".into());
                a.push("/ip4/10.78.0.11/tcp/4001".into());
            }
            Daemon::start(home, Some(format!("zl-{h}")), a, &origin, &trusted)
        };
        let a1 = start("a1", "a", 11, false)?;
        let b1 = start("b1", "b", 21, true)?;
        wait_pull(a1.pull("shards@v1")?)?;
        wait_pull(b1.pull("shards@v1")?)?;
        let a2 = start("a2", "a", 12, true)?;
        wait_connected(&[&a2], 2)?;
        let (secs, v) = wait_pull(a2.pull("shards@v1")?)?;
        let st = a2.status().context("a2 status")?;
        let mut by_zone = serde_json::Map::new();
        for p in st["peers"].as_array().cloned().unwrap_or_default() {
            let z = p["labels"]["zone"].as_str().unwrap_or("?").to_string();
            let n = p["bytes_received"].as_u64().unwrap_or(0);
            let e = by_zone.entry(z).or_insert(json!(0));
            *e = json!(e.as_u64().unwrap_or(0) + n);
        }
        Ok(json!({
            "scenario": "zones a and b joined by a shaped link; a1 and b1 hold shards_v1; a2 (zone a) pulls",
            "inter_zone_rate": rate,
            "bytes": bytes,
            "a2_seconds": secs,
            "a2_bytes_from_origin": v["bytes_from_origin"],
            "a2_bytes_received_by_source_zone": by_zone,
        }))
    })();
    down();
    result
}

/// Whether `mp` is mounted in the mount namespace of process `pid`.
fn mounted_in(pid: u32, mp: &Path) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/mounts"))
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(&mp.display().to_string()))
        })
        .unwrap_or(false)
}

/// N nodes behind one shaped origin link each mount shards_v1 through their daemon and read
/// every file at once. With `isolated`, the daemons know nothing of each other (each reads the
/// whole version from the origin): the baseline the shared origin reads are measured against.
pub fn netns_mount(args: &Args, nodes: usize, rate: &str, isolated: bool) -> Result<Value> {
    let data = ensure_data(args)?;
    link_scripts(args)?;
    let shards = data.join("shards_v1");
    let bytes: u64 = files_under(&shards)?.values().sum();
    let work = args.bench_root.join("work/mount-ns");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let origin_dir = work.join("origin");
    let trusted = publisher(&work, &origin_dir.display().to_string(), &shards)?;
    let netns = netns_up(args, nodes, rate)?;
    let mut mounts: Vec<Child> = Vec::new();
    let result = (|| -> Result<Value> {
        let ng = nginx(&work, "bl-seed", "10.77.0.10:18080", &work)?;
        let origin = "http://10.77.0.10:18080/origin".to_string();
        let ds = netns_daemons(&work, nodes, &origin, &trusted, !isolated)?;
        let mut mps = Vec::new();
        for (i, d) in ds.iter().enumerate() {
            let mp = work.join(format!("mnt-{}", i + 1));
            std::fs::create_dir_all(&mp)?;
            let mut c = d.shoal()?;
            c.args(["mount", "shards@v1"])
                .arg(&mp)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.home.join("mount.log"))?);
            mounts.push(c.spawn()?);
            mps.push(mp);
        }
        let pids: Vec<u32> = ds
            .iter()
            .map(|d| d.child.as_ref().map(|c| c.id()).context("daemon running"))
            .collect::<Result<_>>()?;
        let t = Instant::now();
        while pids.iter().zip(&mps).any(|(p, mp)| !mounted_in(*p, mp)) {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the mounts did not come up within 60 s: see mount.log in the node homes");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Let the daemons hear of each other's mounts.
        std::thread::sleep(Duration::from_secs(1));
        let tx0 = ng.tx_bytes()?;
        let re0 = retrans_segs("bl-seed")?;
        let t0 = Instant::now();
        let mut readers: Vec<Option<Child>> = pids
            .iter()
            .zip(&mps)
            .map(|(pid, mp)| {
                Command::new("nsenter")
                    .args(["-t", &pid.to_string(), "-m", "sh", "-c"])
                    .arg(format!(
                        "for f in {}/*; do dd if=$f of=/dev/null bs=1M status=none || exit 1; done",
                        mp.display()
                    ))
                    .spawn()
                    .map(Some)
            })
            .collect::<std::io::Result<_>>()?;
        let mut done = vec![None; nodes];
        while done.iter().any(Option::is_none) {
            if t0.elapsed() > Duration::from_secs(1200) {
                bail!("the readers did not finish within 1200 s");
            }
            for i in 0..nodes {
                if let Some(c) = readers[i].as_mut() {
                    if let Some(st) = c.try_wait()? {
                        readers[i] = None;
                        if !st.success() {
                            bail!("node {} reader failed ({st}): see mount.log", i + 1);
                        }
                        done[i] = Some(t0.elapsed().as_secs_f64());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let egress = ng.tx_bytes()? - tx0;
        let retrans = retrans_segs("bl-seed")? - re0;
        let per_node: Vec<Value> = ds
            .iter()
            .zip(&done)
            .enumerate()
            .map(|(i, (d, t))| {
                let s = d.status().unwrap_or_default();
                let log = std::fs::read_to_string(d.home.join("node.log")).unwrap_or_default();
                json!({
                    "node": i + 1,
                    "done_s": t,
                    "owner_fallbacks": log.matches("not delivered by the peer that owns").count(),
                    "bytes_from_peers": s["bytes_from_peers"],
                    "bytes_from_origin": s["bytes_from_origin"],
                    "bytes_served": s["bytes_served"],
                })
            })
            .collect();
        drop(ng);
        let last = done.iter().flatten().copied().fold(0.0, f64::max);
        eprintln!(
            "{nodes} nodes mounting ({}): all read in {last:.1} s, origin egress {:.3}x",
            if isolated { "isolated" } else { "sharing" },
            egress as f64 / bytes as f64
        );
        Ok(json!({
            "nodes": nodes,
            "rate": rate,
            "bytes": bytes,
            "isolated": isolated,
            "all_read_s": last,
            "origin_egress_bytes": egress,
            "origin_egress_x_dataset": egress as f64 / bytes as f64,
            "origin_tcp_retransmitted_segments": retrans,
            "origin_http": origin_requests(&work),
            "per_node": per_node,
        }))
    })();
    for mut m in mounts {
        // SIGTERM: the command asks its daemon to unmount.
        let _ = Command::new("kill").arg(m.id().to_string()).status();
        let _ = m.wait();
    }
    let _ = Command::new("bash").arg(&netns).arg("down").status();
    let r = result?;
    // The origin's access log, for a closer look at what the mounts asked it for.
    let _ = std::fs::copy(
        work.join("nginx/logs/access.log"),
        args.bench_root.join("results/mount_netns_access.log"),
    );
    for i in 1..=nodes {
        let _ = std::fs::copy(
            work.join(format!("n{i}/node.log")),
            args.bench_root
                .join(format!("results/mount_netns_node{i}.log")),
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(r)
}

/// Whether the binary under test has cluster keys (builds before them admit anyone).
fn supports_cluster_key() -> Result<bool> {
    let out = Command::new(shoal_bin()?)
        .args(["node", "run", "--help"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("--cluster-key"))
}

/// Several origins: two nginx origins in namespaces of their own, behind links of `rates[0]`
/// and `rates[1]`, holding the same version (the second a `shoal replicate` of the first); one
/// node in a third namespace pulls it from both. Beside it, aria2c downloads the same files
/// from the same two servers (two mirrors per file, its multi-source download).
pub fn origins(args: &Args, rates: &[String], peers: bool) -> Result<Value> {
    if rates.len() != 2 {
        bail!("--rates takes two link rates, e.g. 100mbit,300mbit");
    }
    let data = ensure_data(args)?;
    let shards = data.join("shards_v1");
    let files = files_under(&shards)?;
    let bytes: u64 = files.values().sum();
    let work = args.bench_root.join("work/origins-netns");
    std::fs::create_dir_all(&work)?;
    // Each server's root holds a Shoal origin and the raw files (for aria2c).
    let (root1, root2) = (work.join("o1"), work.join("o2"));
    let origin1 = root1.join("shoal").display().to_string();
    let origin2 = root2.join("shoal");
    let trusted = publisher(&work, &origin1, &shards)?;
    let out = Command::new(shoal_bin()?)
        .args(["replicate", "shards@v1", "--to"])
        .arg(&origin2)
        .env("SHOAL_HOME", work.join("publisher"))
        .env("SHOAL_ORIGIN", &origin1)
        .output()?;
    if !out.status.success() {
        bail!("replicate failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    for root in [&root1, &root2] {
        let raw = root.join("raw");
        if !raw.exists() {
            std::fs::create_dir_all(&raw)?;
            for name in files.keys() {
                let to = raw.join(name);
                std::fs::create_dir_all(to.parent().context("a file's parent")?)?;
                if std::fs::hard_link(shards.join(name), &to).is_err() {
                    std::fs::copy(shards.join(name), &to)?;
                }
            }
        }
    }
    let hosts = [("mo-o1", 1), ("mo-o2", 2), ("mo-n", 10)];
    let down = || ns_del(&["mo-o1", "mo-o2", "mo-n", "mo-sw"]);
    down();
    let setup = || -> Result<()> {
        ns(&["netns", "add", "mo-sw"])?;
        ns(&["-n", "mo-sw", "link", "add", "br0", "type", "bridge"])?;
        ns(&["-n", "mo-sw", "link", "set", "br0", "up"])?;
        for (i, (h, k)) in hosts.iter().enumerate() {
            plug("mo-sw", "br0", h, &format!("10.79.0.{k}/24"))?;
            if let Some(rate) = rates.get(i) {
                // What an origin sends, shaped at its own interface.
                ns(&[
                    "netns", "exec", h, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
                    rate, "burst", "256kb", "latency", "50ms",
                ])?;
            }
        }
        Ok(())
    };
    let result = (|| -> Result<Value> {
        setup()?;
        let _n1 = nginx(&root1.join("nginx-run"), "mo-o1", "10.79.0.1:8080", &root1)?;
        let _n2 = nginx(&root2.join("nginx-run"), "mo-o2", "10.79.0.2:8080", &root2)?;
        let (u1, u2) = (
            "http://10.79.0.1:8080/shoal/".to_string(),
            "http://10.79.0.2:8080/shoal/".to_string(),
        );
        // The link floor: every byte over both links at once.
        let rate_bps = |r: &str| -> Result<f64> {
            let r = r.to_lowercase();
            let (n, mult) = if let Some(n) = r.strip_suffix("gbit") {
                (n, 1e9)
            } else if let Some(n) = r.strip_suffix("mbit") {
                (n, 1e6)
            } else {
                bail!("rate {r:?}: use mbit or gbit")
            };
            Ok(n.parse::<f64>()? * mult)
        };
        let combined = rate_bps(&rates[0])? + rate_bps(&rates[1])?;
        let floor = bytes as f64 * 8.0 / combined;
        let pull = |label: &str, origins: &[&str]| -> Result<(f64, Value)> {
            let home = work.join(format!("node-{label}"));
            let _ = std::fs::remove_dir_all(&home);
            let dest = work.join(format!("dest-{label}"));
            let _ = std::fs::remove_dir_all(&dest);
            let mut c = Command::new("ip");
            c.args(["netns", "exec", "mo-n"]).arg(shoal_bin()?);
            c.arg("--json");
            for o in origins {
                c.args(["--origin", o]);
            }
            c.args(["pull", "shards@v1", "--to"])
                .arg(&dest)
                .env("SHOAL_HOME", &home)
                .env("SHOAL_TRUSTED_KEYS", &trusted)
                .env_remove("SHOAL_ORIGIN")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let r = wait_pull(c.spawn()?)?;
            let got = files_under(&dest)?;
            if got != files {
                bail!("pull {label}: the files differ from the dataset");
            }
            let _ = std::fs::remove_dir_all(&dest);
            let _ = std::fs::remove_dir_all(&home);
            Ok(r)
        };
        let (both_s, both) = pull("both", &[&u1, &u2])?;
        let (fast_s, _) = pull("fast-only", &[&u2])?;
        let per_origin = both["origins"].clone();
        let sent: u64 = per_origin
            .as_array()
            .map(|a| a.iter().filter_map(|o| o["bytes"].as_u64()).sum())
            .unwrap_or(0);
        let mut out = json!({
            "scenario": "two nginx origins behind shaped links (the second a shoal replicate of the first); one node pulls shards_v1 from both",
            "rates": rates,
            "bytes": bytes,
            "link_floor_s": floor,
            "shoal_seconds": both_s,
            "shoal_over_floor": both_s / floor,
            "shoal_bytes_per_origin": per_origin,
            "shoal_origin_egress": sent as f64 / bytes as f64,
            "shoal_fast_origin_only_seconds": fast_s,
        });
        if peers && which("aria2c") {
            // aria2c, every file from both mirrors at once (split into pieces across them).
            let list = work.join("aria2.txt");
            let dest = work.join("dest-aria2");
            let _ = std::fs::remove_dir_all(&dest);
            let mut text = String::new();
            for name in files.keys() {
                text.push_str(&format!(
                    "http://10.79.0.1:8080/raw/{name}\thttp://10.79.0.2:8080/raw/{name}\n  out={name}\n"
                ));
            }
            std::fs::write(&list, text)?;
            let t = Instant::now();
            let st = Command::new("ip")
                .args(["netns", "exec", "mo-n", "aria2c", "-q", "-i"])
                .arg(&list)
                .arg("-d")
                .arg(&dest)
                .args([
                    "-j",
                    "8",
                    "-x",
                    "8",
                    "-s",
                    "8",
                    "--min-split-size=4M",
                    "--file-allocation=none",
                    "--allow-overwrite=true",
                ])
                .status()?;
            let secs = t.elapsed().as_secs_f64();
            if !st.success() || files_under(&dest)? != files {
                bail!("aria2c did not download the files whole");
            }
            let _ = std::fs::remove_dir_all(&dest);
            out["aria2_seconds"] = json!(secs);
            out["aria2_over_floor"] = json!(secs / floor);
            out["shoal_over_aria2"] = json!(both_s / secs);
        }
        Ok(out)
    })();
    down();
    result
}

/// A pull's report, its wall time, and a counter sampled as it ran: (seconds since the
/// start, bytes since the start).
type Sampled = (Value, f64, Vec<(f64, u64)>);

/// Samples `counter` of `node`'s status every 100 ms while `pull` runs.
fn sample_pull(node: &Daemon, pull: Child, counter: &str) -> Result<Sampled> {
    let read = |d: &Daemon| d.status().and_then(|s| s[counter].as_u64());
    let base = read(node).context("status before the pull")?;
    let t = Instant::now();
    let mut pull = pull;
    let mut samples = vec![(0.0, 0)];
    loop {
        if let Some(v) = read(node) {
            samples.push((t.elapsed().as_secs_f64(), v - base));
        }
        if pull.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let secs = t.elapsed().as_secs_f64();
    let out = pull.wait_with_output()?;
    if !out.status.success() {
        bail!("pull failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    if let Some(v) = read(node) {
        samples.push((secs, v - base));
    }
    Ok((serde_json::from_slice(&out.stdout)?, secs, samples))
}

/// The rate between the samples where the counter first passed 10 % and 90 % of its total:
/// the steady rate, without the pull's start (metadata, the bucket's first burst) and end.
fn steady_rate(samples: &[(f64, u64)]) -> Option<f64> {
    let total = samples.last()?.1 as f64;
    let at = |f: f64| samples.iter().find(|s| s.1 as f64 >= total * f);
    let (a, b) = (at(0.1)?, at(0.9)?);
    (b.0 > a.0).then(|| (b.1 - a.1) as f64 / (b.0 - a.0))
}

/// Rate limits: a node's origin reads, a leecher's downloads and a seeder's uploads, each
/// limited to `mb` MB/s, measured while it pulls shards_v1 on loopback (unlimited, the same
/// pulls run at 1 GB/s or more here). Reports the steady rate (10 % to 90 % of the bytes)
/// and the rate over the whole pull, against the rate set.
pub fn rates(args: &Args, mb: f64) -> Result<Value> {
    let data = ensure_data(args)?;
    let shards = data.join("shards_v1");
    let bytes: u64 = files_under(&shards)?.values().sum();
    let work = args.bench_root.join("work/rates");
    let origin = work.join("origin").display().to_string();
    std::fs::create_dir_all(&work)?;
    let trusted = publisher(&work, &origin, &shards)?;
    let set = format!("{}", (mb * 1e6) as u64);
    let lo = vec!["--listen".to_string(), "/ip4/127.0.0.1/tcp/0".to_string()];
    let fresh = |name: &str| {
        let home = work.join(name);
        let _ = std::fs::remove_dir_all(&home);
        home
    };
    let mut rows = Vec::new();
    let mut row = |what: &str,
                   counter: &str,
                   (report, secs, samples): (Value, f64, Vec<(f64, u64)>)| {
        let moved = samples.last().map_or(0, |s| s.1);
        let steady = steady_rate(&samples).unwrap_or(f64::NAN);
        eprintln!(
            "{what}: {moved} bytes in {secs:.2} s; steady {:.2} MB/s, whole {:.2} MB/s, set {mb} MB/s",
            steady / 1e6,
            moved as f64 / secs / 1e6
        );
        rows.push(json!({
            "limit": what,
            "counter": counter,
            "set_bytes_per_s": mb * 1e6,
            "bytes": moved,
            "seconds": secs,
            "steady_bytes_per_s": steady,
            "steady_over_set": steady / (mb * 1e6),
            "whole_pull_bytes_per_s": moved as f64 / secs,
            "whole_over_set": moved as f64 / secs / (mb * 1e6),
            "report": report,
        }));
    };

    // Origin reads.
    let mut a_args = lo.clone();
    a_args.extend(["--origin-rate".into(), set.clone()]);
    let a = Daemon::start(fresh("origin-limited"), None, a_args, &origin, &trusted)?;
    row(
        "origin",
        "bytes_from_origin",
        sample_pull(&a, a.pull("shards@v1")?, "bytes_from_origin")?,
    );
    drop(a);

    // A seeder with the version, unlimited, and one with an upload limit.
    let seed = Daemon::start(fresh("seed"), None, lo.clone(), &origin, &trusted)?;
    wait_pull(seed.pull("shards@v1")?)?;
    let seed_addr = seed.status().context("seed status")?["listen"][0]
        .as_str()
        .context("seed address")?
        .to_string();
    // Leechers read the origin at 1 MB/s at most: the peers are what they pull from.
    let leech_args = |extra: &[&str], addr: &str| {
        let mut v = lo.clone();
        v.extend([
            "--bootstrap".into(),
            addr.to_string(),
            "--origin-rate".into(),
            "1MB".into(),
        ]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let l = Daemon::start(
        fresh("download-limited"),
        None,
        leech_args(&["--download-rate", &set], &seed_addr),
        &origin,
        &trusted,
    )?;
    wait_connected(&[&l], 1)?;
    row(
        "download",
        "bytes_from_peers",
        sample_pull(&l, l.pull("shards@v1")?, "bytes_from_peers")?,
    );
    drop(l);
    drop(seed);

    let mut u_args = lo.clone();
    u_args.extend(["--upload-rate".into(), set.clone()]);
    let up = Daemon::start(fresh("upload-limited"), None, u_args, &origin, &trusted)?;
    wait_pull(up.pull("shards@v1")?)?;
    let up_addr = up.status().context("seeder status")?["listen"][0]
        .as_str()
        .context("seeder address")?
        .to_string();
    let m = Daemon::start(
        fresh("leech"),
        None,
        leech_args(&[], &up_addr),
        &origin,
        &trusted,
    )?;
    wait_connected(&[&m], 1)?;
    row(
        "upload",
        "bytes_served",
        sample_pull(&up, m.pull("shards@v1")?, "bytes_served")?,
    );
    drop(m);
    drop(up);

    Ok(json!({
        "benchmark": "rates",
        "dataset": "shards_v1",
        "bytes": bytes,
        "set_mb_per_s": mb,
        "goal": "steady rate within 5% of the rate set",
        "results": rows,
    }))
}

/// Python without FUSE against the mount: the same daemon serves a version both through a FUSE
/// mount and through `shoalfs` (fsspec); `testnet/bench_python.py` reads every file whole,
/// warm, by 1 and by `workers` processes, through each. shards_v1 (large files) and images_v1
/// (20,000 small files).
pub fn python_vs_mount(args: &Args, workers: usize) -> Result<Value> {
    let data = ensure_data(args)?;
    let work = args.bench_root.join("work/python");
    std::fs::create_dir_all(&work)?;
    let origin = work.join("origin").display().to_string();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut out = serde_json::Map::new();
    for ds in ["shards", "images"] {
        let reference = format!("{ds}@v1");
        let trusted = publish(&work, &origin, &data.join(format!("{ds}_v1")), &reference)?;
        let d = Daemon::start(
            {
                let h = work.join(format!("node-{ds}"));
                let _ = std::fs::remove_dir_all(&h);
                h
            },
            None,
            vec!["--listen".into(), "/ip4/127.0.0.1/tcp/0".into()],
            &origin,
            &trusted,
        )?;
        wait_pull(d.pull(&reference)?)?;
        let mp = work.join(format!("mnt-{ds}"));
        std::fs::create_dir_all(&mp)?;
        let mut mount = d
            .shoal()?
            .args(["mount", &reference])
            .arg(&mp)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.home.join("mount.log"))?)
            .spawn()?;
        let t = Instant::now();
        let pid = d.child.as_ref().context("daemon running")?.id();
        while !mounted_in(pid, &mp) {
            if t.elapsed() > Duration::from_secs(60) {
                let _ = mount.kill();
                bail!(
                    "the mount did not come up: see {}",
                    d.home.join("mount.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let r = Command::new("python3")
            .arg(repo.join("testnet/bench_python.py"))
            .arg("--mount")
            .arg(&mp)
            .args(["--ref", &reference, "--workers", &format!("1,{workers}")])
            .arg("--native")
            .arg(data.join(format!("{ds}_v1")))
            // Page cache dropped before the cold passes: root only.
            .args(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/proc/sys/vm/drop_caches")
                    .is_ok()
                    .then_some("--cold"),
            )
            .env("PYTHONPATH", repo.join("python"))
            .env("SHOAL_HOME", &d.home)
            .stderr(Stdio::inherit())
            .output();
        let _ = d.shoal()?.args(["unmount"]).arg(&mp).status();
        let _ = mount.wait();
        let r = r?;
        if !r.status.success() {
            bail!("bench_python.py failed");
        }
        let v: Value = serde_json::from_slice(&r.stdout)?;
        for run in v["runs"].as_array().into_iter().flatten() {
            let f = |k: &str| run[k]["files_per_s"].as_f64().unwrap_or(0.0);
            let x = |k: &str| run[k].as_f64().unwrap_or(0.0);
            eprintln!(
                "{reference} {} workers, files/s: mount {:.0}, unbuffered {:.0}, fsspec {:.0}, native {:.0}, unbuffered {:.0}; \
                 mount/native {:.2}x, unbuffered {:.2}x, cold unbuffered {:.2}x; fsspec/mount {:.2}x",
                run["workers"],
                f("mount"),
                f("mount_unbuffered"),
                f("fsspec"),
                f("native"),
                f("native_unbuffered"),
                x("mount_over_native"),
                x("mount_unbuffered_over_native_unbuffered"),
                x("mount_unbuffered_cold_over_native_unbuffered_cold"),
                x("fsspec_over_mount"),
            );
        }
        out.insert(ds.to_string(), v);
        drop(d);
    }
    Ok(json!({
        "benchmark": "python",
        "goal": "fsspec warm throughput at least 0.8x the mount's, large and small files; mount at least 0.8x native (issue 21)",
        "datasets": out,
    }))
}
