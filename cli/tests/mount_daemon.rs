//! `shoal mount` through a running node daemon: the daemon mounts and serves, reading chunks
//! from peers; losing every source gives EIO within the bound, and reads recover when a
//! source returns. The mount never outlives the command or the daemon.

mod common;

use common::cluster::setup;
use common::{assert_eio_within, assert_same_tree, is_mounted, random_bytes, write, Nginx, BIN};
use serde_json::Value;
use shoal_testnet::{wait_for, Cluster};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

/// A `shoal mount` command; lazily unmounted and reaped on drop, pass or fail.
struct MountCmd {
    child: Option<Child>,
    mp: std::path::PathBuf,
}

impl MountCmd {
    /// Runs `shoal ARGS` as `node` (stderr to `log`) and waits for `mp` to be mounted.
    fn start(node: &shoal_testnet::NodeProc, args: &[&str], mp: &Path, log: &Path) -> MountCmd {
        let mut m = MountCmd {
            child: Some(
                node.cmd(args)
                    .stdout(Stdio::piped())
                    .stderr(std::fs::File::create(log).unwrap())
                    .spawn()
                    .unwrap(),
            ),
            mp: mp.to_path_buf(),
        };
        m.wait_mounted(log);
        m
    }

    fn wait_mounted(&mut self, log: &Path) {
        wait_for(30, "the version to be mounted", || {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "shoal mount exited with {st}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            is_mounted(&self.mp).then_some(())
        });
    }
}

impl Drop for MountCmd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mp) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mp)
                .status();
        }
    }
}

/// Lets every user traverse the directories above `mp` (test temp directories are 0700).
fn make_traversable(mp: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut p = mp.parent();
    while let Some(dir) = p.filter(|d| *d != Path::new("/")) {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o711)).unwrap();
        }
        p = dir.parent();
    }
}

#[test]
fn a_daemon_serves_a_mount_from_peers_and_survives_losing_them() {
    let mut c = Cluster::new(BIN);
    let src = c.dir.path().join("src");
    for i in 0..3 {
        write(
            &src.join(format!("f{i}.bin")),
            &random_bytes(70 + i, 6 << 20),
        );
    }
    c.publish(&src, "ds@v1");
    let a = c.node("a", &[], &[]);
    c.nodes[a].json(&["pull", "ds@v1", "--no-files"]);
    // b reads the origin over HTTP through a server the test stops later.
    let relay = Nginx::start(&c.origin, c.dir.path());
    let b = c.node("b", &[], &[("SHOAL_ORIGIN", &relay.url())]);
    c.nodes[b].wait_peers(1);

    let mp = c.dir.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    // A mount point belonging to an ordinary user, reachable by everyone.
    std::os::unix::fs::chown(&mp, Some(65534), Some(65534)).unwrap();
    make_traversable(&mp);
    let log = c.dir.path().join("mount.log");
    let mut m = MountCmd::start(
        &c.nodes[b],
        &[
            "--json",
            "mount",
            "ds@v1",
            mp.to_str().unwrap(),
            "--timeout",
            "3",
            "--prefetch",
            "none",
        ],
        &mp,
        &log,
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("mounted ds@v1"),
        "the command says where the version is mounted"
    );
    assert_eq!(
        std::fs::read(mp.join("f0.bin")).unwrap(),
        std::fs::read(src.join("f0.bin")).unwrap()
    );
    // The daemon runs as root; the user who owns the mount point (and others: file modes
    // apply) can read the mount too.
    let out = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--", "cat"])
        .arg(mp.join("f0.bin"))
        .output()
        .expect("runuser");
    assert!(
        out.status.success() && out.stdout == std::fs::read(src.join("f0.bin")).unwrap(),
        "user nobody cannot read the daemon's mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = c.nodes[b].status().unwrap();
    assert_eq!(s["mounts"][0]["reference"], "ds@v1", "{s}");
    assert_eq!(
        s["mounts"][0]["mountpoint"],
        mp.display().to_string(),
        "{s}"
    );
    assert!(
        s["bytes_from_peers"].as_u64().unwrap() >= 6 << 20,
        "the mount's chunks came from the peer: {s}"
    );
    assert_eq!(s["bytes_from_origin"], 0, "{s}");

    // Every source gone: the origin and the only peer.
    relay.stop();
    c.nodes[a].kill9();
    assert_eio_within(&mp.join("f1.bin"), Duration::from_secs(20));
    assert!(
        c.nodes[b].log().contains("EIO"),
        "the daemon logs why the read failed"
    );

    // The peer returns (same identity and store, a new port): reads work again.
    let b_addr = c.nodes[b].addr.clone();
    c.nodes[a].args.extend(["--bootstrap".to_string(), b_addr]);
    c.nodes[a].start();
    c.nodes[b].wait_peers(1);
    let got = wait_for(30, "f1.bin to read again", || {
        std::fs::read(mp.join("f1.bin")).ok()
    });
    assert_eq!(got, std::fs::read(src.join("f1.bin")).unwrap());

    // `shoal unmount` ends the command with the daemon's report.
    c.nodes[b].json(&["unmount", mp.to_str().unwrap()]);
    let out = m.child.take().unwrap().wait_with_output().unwrap();
    assert!(out.status.success(), "mount command failed");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["served_by"], "daemon", "{r}");
    assert_eq!(r["version"], "ds@v1", "{r}");
    assert!(r["bytes_read"].as_u64().unwrap() >= 12 << 20, "{r}");
    assert!(r["read_errors"].as_u64().unwrap() >= 1, "{r}");
    assert!(!is_mounted(&mp));

    // The origin is still down: a version this node has seen opens from its kept signed copy,
    // and its chunks are local. A mount command killed outright: the daemon sees it go and
    // unmounts.
    let mut m = MountCmd::start(
        &c.nodes[b],
        &["mount", "ds@v1", mp.to_str().unwrap()],
        &mp,
        &log,
    );
    assert!(
        c.nodes[b].log().contains("using the signed copy of ds@v1"),
        "the mount opened the kept signed version: {}",
        c.nodes[b].log()
    );
    let mut child = m.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for(15, "the daemon to unmount after its client died", || {
        (!is_mounted(&mp)).then_some(())
    });

    // The daemon stopping unmounts what it serves.
    let mut m = MountCmd::start(
        &c.nodes[b],
        &["mount", "ds@v1", mp.to_str().unwrap()],
        &mp,
        &log,
    );
    c.nodes[b].stop();
    assert!(!is_mounted(&mp), "the daemon left its mount behind");
    // The command ends too (with the report if the daemon sent it before exiting).
    let mut child = m.child.take().unwrap();
    wait_for(15, "the mount command to end with its daemon", || {
        child.try_wait().unwrap()
    });
}

/// The number of peers `node` knows to be mounting a version.
fn peers_mounting(node: &shoal_testnet::NodeProc) -> usize {
    node.status()
        .and_then(|s| {
            s["peers"].as_array().map(|ps| {
                ps.iter()
                    .filter(|p| {
                        p["versions"].as_array().is_some_and(|v| {
                            v.iter()
                                .any(|v| v.as_str().unwrap_or("").ends_with("(mounted)"))
                        })
                    })
                    .count()
            })
        })
        .unwrap_or(0)
}

#[test]
fn nodes_mounting_one_cold_version_read_it_from_the_origin_about_once() {
    let mut c = Cluster::new(BIN);
    let src = c.dir.path().join("src");
    let names: Vec<String> = (0..8).map(|i| format!("f{i}.bin")).collect();
    for (i, n) in names.iter().enumerate() {
        write(&src.join(n), &random_bytes(200 + i as u64, 4 << 20));
    }
    let total = 8 * (4u64 << 20);
    c.publish(&src, "ds@v1");
    let nodes: Vec<usize> = ["a", "b", "c"]
        .iter()
        .map(|n| c.node(n, &[], &[]))
        .collect();
    for &n in &nodes {
        c.nodes[n].wait_peers(2);
    }
    let mut mounts = Vec::new();
    let mut mps = Vec::new();
    for &n in &nodes {
        let mp = c.dir.path().join(format!("mnt-{}", c.nodes[n].name));
        std::fs::create_dir_all(&mp).unwrap();
        let log = c.dir.path().join(format!("mount-{}.log", c.nodes[n].name));
        mounts.push(MountCmd::start(
            &c.nodes[n],
            &[
                "--json",
                "mount",
                "ds@v1",
                mp.to_str().unwrap(),
                "--timeout",
                "30",
                // Only what is read is fetched: no fetching ahead of the readers, whose
                // origin bytes are counted below.
                "--prefetch",
                "none",
            ],
            &mp,
            &log,
        ));
        mps.push(mp);
    }
    // Each daemon announces its mount; wait until every node knows the other two mount it.
    for &n in &nodes {
        wait_for(30, "the mounts to be announced", || {
            (peers_mounting(&c.nodes[n]) == 2).then_some(())
        });
    }
    // All three read the first half of the files at once, each in a different order.
    let read_all = |mps: &[std::path::PathBuf], files: &[String]| {
        std::thread::scope(|s| {
            for (k, mp) in mps.iter().enumerate() {
                let src = &src;
                s.spawn(move || {
                    for i in 0..files.len() {
                        let n = &files[(i + 2 * k) % files.len()];
                        assert!(
                            std::fs::read(mp.join(n)).unwrap()
                                == std::fs::read(src.join(n)).unwrap(),
                            "{n} read through {} differs from the source",
                            mp.display()
                        );
                    }
                });
            }
        })
    };
    read_all(&mps, &names[..4]);
    let half = total / 2;
    let statuses: Vec<Value> = nodes
        .iter()
        .map(|&n| c.nodes[n].status().unwrap())
        .collect();
    let origin: u64 = statuses
        .iter()
        .map(|s| s["bytes_from_origin"].as_u64().unwrap())
        .sum();
    // Each node mounting alone would read all of it: 3x in all.
    assert!(
        origin >= half && origin < half + half / 4,
        "the origin served {origin} bytes for {half} bytes read on 3 nodes: {statuses:?}"
    );
    // Which node owns which run depends on their (random) peer ids: assert on the sums. Three
    // nodes read `half` each and the origin sent it about once: the rest came from peers.
    let sum = |k: &str| -> u64 { statuses.iter().map(|s| s[k].as_u64().unwrap()).sum() };
    assert!(
        sum("bytes_from_peers") >= half && sum("bytes_served") >= half,
        "the nodes read each other's runs: {statuses:?}"
    );
    // An owner dies: the others read its runs from the origin themselves, exactly.
    c.nodes[nodes[0]].kill9();
    read_all(&mps[1..], &names[4..]);
    drop(mounts);
}

/// A node that announces a mount of the version and then answers nothing costs a reader of
/// its runs one wait of seconds, not EIO and not a wait per read: its runs are read from the
/// origin, and from then on shared out among the other mounting nodes.
#[test]
fn a_stalled_mount_owner_costs_one_wait_not_eio() {
    let mut c = Cluster::new(BIN);
    let src = c.dir.path().join("src");
    // 16 files of 3 MiB: about 12 runs of 4 MiB, so the stalled node owns some (all but
    // certainly: each is its by a coin toss).
    let names: Vec<String> = (0..16).map(|i| format!("f{i:02}.bin")).collect();
    for (i, n) in names.iter().enumerate() {
        write(&src.join(n), &random_bytes(300 + i as u64, 3 << 20));
    }
    c.publish(&src, "ds@v1");
    let s = c.node("stall", &[], &[("SHOAL_FAULT_INJECT", "stall")]);
    let r = c.node("reader", &[], &[]);
    c.nodes[r].wait_peers(1);
    let mut mounts = Vec::new();
    let mut mps = Vec::new();
    for n in [s, r] {
        let mp = c.dir.path().join(format!("mnt-{}", c.nodes[n].name));
        std::fs::create_dir_all(&mp).unwrap();
        let log = c.dir.path().join(format!("mount-{}.log", c.nodes[n].name));
        // A read timeout under the old 30 s wait on an owner: with it, reads of the stalled
        // node's runs failed.
        mounts.push(MountCmd::start(
            &c.nodes[n],
            &[
                "mount",
                "ds@v1",
                mp.to_str().unwrap(),
                "--timeout",
                "20",
                "--prefetch",
                "none",
            ],
            &mp,
            &log,
        ));
        mps.push(mp);
    }
    wait_for(30, "the stalled node's mount to be announced", || {
        (peers_mounting(&c.nodes[r]) == 1).then_some(())
    });
    let started = std::time::Instant::now();
    for n in &names {
        let t = std::time::Instant::now();
        let got = std::fs::read(mps[1].join(n))
            .unwrap_or_else(|e| panic!("reading {n} with a stalled mount owner: {e}"));
        assert!(got == std::fs::read(src.join(n)).unwrap(), "{n} differs");
        eprintln!("{n}: {:.2} s", t.elapsed().as_secs_f64());
    }
    eprintln!("all: {:.2} s", started.elapsed().as_secs_f64());
    // The stalled node was waited on (it owned runs), but once or so, not once per read.
    let st = c.nodes[r].status().unwrap();
    let stalls: u64 = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["stalls"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        (1..=3).contains(&stalls),
        "waits on the stalled owner: {stalls} ({st})"
    );
    drop(mounts);
}

#[test]
fn the_systemd_unit_verifies_and_its_sandbox_still_mounts() {
    let unit_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/shoal.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in the unit"))
            .to_string()
    };
    // A mount made in a private mount namespace is invisible to the machine: none of the
    // options that give the service one.
    for key in [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "ReadOnlyPaths",
        "ReadWritePaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "BindPaths",
        "BindReadOnlyPaths",
        "ProtectKernelModules",
        "ProtectKernelTunables",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "MountFlags",
        "RootDirectory",
        "RootImage",
        "DevicePolicy",
        "DeviceAllow",
        "ProtectClock",
    ] {
        assert!(
            !unit.lines().any(|l| l.starts_with(&format!("{key}="))),
            "{key}= would hide the daemon's mounts"
        );
    }
    assert_eq!(value("Restart"), "on-failure");
    assert!(value("LimitNOFILE").parse::<u64>().unwrap() >= 65536);

    // systemd's own checker accepts it (with the binary built here as ExecStart).
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("shoal.service");
    std::fs::write(&local, unit.replace("/usr/local/bin/shoal", BIN)).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&local)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The daemon under the unit's capability bounding set and no_new_privs mounts a version
    // and serves it exactly.
    let caps: Vec<String> = value("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert_eq!(value("NoNewPrivileges"), "yes");
    let mut c = Cluster::new(BIN);
    let src = c.dir.path().join("src");
    let bytes = random_bytes(31, 3_000_000);
    write(&src.join("d/shard"), &bytes);
    c.publish(&src, "ds@v1");
    let a = c.node("a", &[], &[]);
    c.nodes[a].stop();
    c.nodes[a].wrap = vec![
        "setpriv".into(),
        format!("--bounding-set=-all,{}", caps.join(",")),
        "--no-new-privs".into(),
        "--".into(),
    ];
    c.nodes[a].start();
    let pid = c.nodes[a].child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let mp = c.dir.path().join("mp");
    std::fs::create_dir_all(&mp).unwrap();
    let log = c.dir.path().join("mount.log");
    let m = MountCmd::start(
        &c.nodes[a],
        &["mount", "ds@v1", mp.to_str().unwrap()],
        &mp,
        &log,
    );
    assert_eq!(std::fs::read(mp.join("d/shard")).unwrap(), bytes);
    drop(m);
}

/// Every series the Grafana dashboard (deploy/grafana/shoal.json) plots is on a node's
/// `/metrics` while it pulls from a peer in its zone and serves a mount: scraped for real,
/// with the values that say what happened.
#[test]
fn every_dashboard_panel_has_its_series_during_a_real_pull_and_mount() {
    let mut c = Cluster::new(BIN);
    let (src, bytes) = setup(&c);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let b = c.node("b", &["--zone", "z1"], &[]);
    // Slow enough to be scraped while it pulls.
    let a = c.node(
        "a",
        &[
            "--zone",
            "z1",
            "--metrics",
            &metrics,
            "--download-rate",
            "3MB",
        ],
        &[],
    );
    c.nodes[a].wait_peers(1);
    c.nodes[b].json(&["pull", "ds@v1", "--no-files"]);

    let scrape = || -> String {
        let out = std::process::Command::new("curl")
            .args(["-sf", &format!("http://{metrics}/metrics")])
            .output()
            .unwrap();
        assert!(out.status.success(), "scraping {metrics}");
        String::from_utf8(out.stdout).unwrap()
    };
    // Series seen with a sample (name and labels), and the last value of each.
    let mut seen: std::collections::HashMap<String, f64> = Default::default();
    let mut take = |text: &str| {
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            seen.insert(series.to_string(), value.parse().unwrap());
        }
    };
    let mut pull = c.nodes[a]
        .cmd(&["--json", "pull", "ds@v1", "--no-files"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut during = 0;
    while pull.try_wait().unwrap().is_none() {
        let text = scrape();
        if text.contains("shoal_pull_done_bytes{") {
            during += 1;
        }
        take(&text);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = pull.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(during > 0, "no scrape saw the pull under way");

    let mp = c.dir.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let log = c.dir.path().join("mount.log");
    let m = MountCmd::start(
        &c.nodes[a],
        &["mount", "ds@v1", mp.to_str().unwrap(), "--prefetch", "none"],
        &mp,
        &log,
    );
    assert_same_tree(&src, &mp);
    take(&scrape());
    drop(m);

    let names: std::collections::HashSet<&str> =
        seen.keys().map(|s| s.split('{').next().unwrap()).collect();
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/shoal.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 15);
    for p in panels {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let used = metric_names(expr);
            assert!(
                !used.is_empty(),
                "panel {}: no shoal metric in {expr}",
                p["title"]
            );
            for name in used {
                assert!(
                    names.contains(name.as_str()),
                    "panel {} plots {name}, which /metrics did not have; it had {names:?}",
                    p["title"]
                );
            }
        }
    }
    // The values say what happened: a's chunks came from a peer in its zone, some origin
    // requests (the version's metadata) were made and timed, the mount's reads were timed.
    // (with its download rate, a reads from the origin what b cannot send in time).
    let zone = seen[r#"shoal_bytes_received_by_source_total{source="zone"}"#];
    let origin = seen[r#"shoal_bytes_received_by_source_total{source="origin"}"#];
    let rack = seen[r#"shoal_bytes_received_by_source_total{source="rack"}"#];
    assert!(
        zone >= bytes as f64 / 4.0 && zone + origin >= bytes as f64 && rack == 0.0,
        "{zone} bytes from the zone, {origin} from the origin, {rack} from the rack, of {bytes}"
    );
    let reads = seen["shoal_mount_read_seconds_count"];
    assert!(reads > 0.0, "no mount read timed");
    assert!(
        seen.iter()
            .any(|(k, v)| k.starts_with("shoal_origin_requests_total{") && *v > 0.0),
        "no origin request counted"
    );
    assert!(
        seen.iter()
            .any(|(k, v)| k.starts_with("shoal_cache_hits_total{") && *v > 0.0),
        "no cache hit counted"
    );
}

/// The `shoal_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("shoal_") {
        let tail = &rest[i..];
        let end = tail
            .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The Python package (`python/`, fsspec) reads a version through the daemon without a mount:
/// pyarrow reads a Parquet file's row groups in random order, four forked loader processes
/// read every small file, and the epoch order helper hands the daemon its order; every byte
/// checked against the source in Python.
#[test]
fn python_reads_versions_through_the_daemon_without_a_mount() {
    let mut c = Cluster::new(BIN);
    let src = c.dir.path().join("src");
    for i in 0..300u64 {
        write(
            &src.join(format!("img/{:02}/{i:04}.jpg", i % 17)),
            &random_bytes(5000 + i, 1000 + (i as usize * 37) % 9000),
        );
    }
    // A large file: read through the daemon's whole local copy once it keeps one.
    write(&src.join("big/shard.bin"), &random_bytes(77, 40_000_000));
    let py = |script: &str, env: &[(&str, &std::path::Path)]| {
        let mut cmd = std::process::Command::new("python3");
        cmd.args(["-c", script])
            .env(
                "PYTHONPATH",
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../python"),
            )
            .env("SRC", &src);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("python3");
        assert!(
            out.status.success(),
            "python: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // A real Parquet file of several row groups, written by pyarrow.
    py(
        "import os, pyarrow as pa, pyarrow.parquet as pq\n\
         n = 200_000\n\
         t = pa.table({'id': pa.array(range(n), pa.int64()), \
                       'text': pa.array([f'row {i} ' * (i % 7) for i in range(n)])})\n\
         pq.write_table(t, os.path.join(os.environ['SRC'], 'table.parquet'), row_group_size=20_000)\n",
        &[],
    );
    c.publish(&src, "ds@v1");
    let a = c.node("a", &[], &[]);
    let home = c.nodes[a].home.clone();
    let out = py(
        r#"
import hashlib, os, random, multiprocessing as mp
import fsspec, pyarrow.parquet as pq
import shoalfs
src = os.environ["SRC"]
fs = fsspec.filesystem("shoal")
assert isinstance(fs, shoalfs.ShoalFileSystem)

# Parquet row groups in random order, against the source file.
local = pq.ParquetFile(os.path.join(src, "table.parquet"))
with fs.open("shoal://ds@v1/table.parquet", "rb") as f:
    remote = pq.ParquetFile(f)
    groups = list(range(remote.num_row_groups))
    assert len(groups) == 10, groups
    random.Random(7).shuffle(groups)
    for g in groups:
        assert remote.read_row_group(g).equals(local.read_row_group(g)), g
print("parquet row groups", len(groups))

# Every small file, by forked loader workers (each opens its own connection).
files = sorted(p for p in fs.find("ds@v1/img"))
assert len(files) == 300, len(files)
rel = [p[len("ds@v1/"):] for p in files]
order = shoalfs.EpochOrder(fs, "ds@v1", rel, seed=3)
idx = order.epoch(0)
assert sorted(idx) == list(range(300))

def digest(path):
    return path, hashlib.sha256(fsspec.filesystem("shoal").cat_file("shoal://ds@v1/" + path)).hexdigest()

with mp.get_context("fork").Pool(4) as pool:
    got = dict(pool.map(digest, [rel[i] for i in idx], chunksize=8))
for p in rel:
    want = hashlib.sha256(open(os.path.join(src, p), "rb").read()).hexdigest()
    assert got[p] == want, p
print("files", len(got))

# In one process: small local files straight from the store's files, each chunk verified here.
single = fsspec.filesystem("shoal", skip_instance_cache=True)
s = single.session("ds@v1")
for p in rel:
    want = open(os.path.join(src, p), "rb").read()
    assert single.cat_file("shoal://ds@v1/" + p) == want, p
    with single.open("shoal://ds@v1/" + p, "rb") as f:
        assert f.read() == want, p
local = [p for p in rel if s.local.extent(p)]
assert len(local) == 300, f"only {len(local)} of 300 files read from the store's files"
assert 0 < len(s.local.fds) <= shoalfs.MAX_SEG_FDS, len(s.local.fds)
# The store's file rots under the reader: the chunk fails verification here, and the file is
# read through the daemon instead (which finds the chunk bad, drops it, fetches it again).
victim = rel[5]
size, chunks = s.local.extent(victim)
seg, off, ln, cid = chunks[0]
with open(seg, "r+b") as f:
    f.seek(off)
    b = f.read(1)
    f.seek(off)
    f.write(bytes([b[0] ^ 0xFF]))
want = open(os.path.join(src, victim), "rb").read()
assert single.cat_file("shoal://ds@v1/" + victim) == want
assert single.cat_file("shoal://ds@v1/" + victim) == want
# The second read came from the store's files again, from where the chunk was stored anew:
# the daemon's answer kept for the directory went when the bad chunk left its store.
again = s.local.extent(victim)
assert again is not None, "the file was not read from the store's files after the refetch"
assert (again[1][0][0], again[1][0][1]) != (seg, off), "the old place of the bad chunk again"
print("extents ok")

# A large file: streamed, then (once the daemon made its local copy) from a descriptor of it.
want = open(os.path.join(src, "big/shard.bin"), "rb").read()
assert fs.cat_file("shoal://ds@v1/big/shard.bin") == want
import time
session = fs.session("ds@v1")
fd = None
for _ in range(100):
    fd = session.fd("big/shard.bin")
    if fd is not None:
        break
    time.sleep(0.1)
assert fd is not None, "no local copy of the large file after 10 s"
os.close(fd)
assert fs.cat_file("shoal://ds@v1/big/shard.bin") == want
with fs.open("shoal://ds@v1/big/shard.bin", "rb") as f:
    f.seek(33_000_000)
    assert f.read(100_000) == want[33_000_000:33_100_000]
    assert f._fd is not None, "the open file did not use the local copy"
assert session.fd("img/00/0000.jpg") is None
print("large file ok")

# Errors a reader meets: one line each, the right exception.
try:
    fs.info("ds@v1/img/nope.jpg")
    raise SystemExit("no error for a missing file")
except FileNotFoundError as e:
    assert "nope.jpg" in str(e), e
try:
    fs.ls("ds@v9")
    raise SystemExit("no error for a missing version")
except shoalfs.ShoalError as e:
    assert "ds@v9" in str(e), e
print("errors ok")
"#,
        &[("SHOAL_HOME", &home)],
    );
    assert!(out.contains("parquet row groups 10"), "{out}");
    assert!(out.contains("files 300"), "{out}");
    assert!(out.contains("extents ok"), "{out}");
    assert!(out.contains("errors ok"), "{out}");
    assert!(out.contains("large file ok"), "{out}");
    // With no daemon: one clear line.
    c.nodes[a].stop();
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import fsspec\ntry:\n  fsspec.filesystem('shoal').ls('ds@v1')\nexcept OSError as e:\n  print(e)",
        ])
        .env(
            "PYTHONPATH",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../python"),
        )
        .env("SHOAL_HOME", &home)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no shoal node daemon at"), "{text}");
}
