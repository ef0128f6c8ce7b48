//! The trust boundary, attacked for real: a hostile client in this process against node
//! daemons in others, over sockets. Outsiders get nothing in every private mode (and an open
//! node serves them, so the client is known to work); floods and clients that never read
//! leave the daemon up, small, and serving its legitimate peer.

mod common;
use common::cluster::root_of;
use common::{random_bytes, BIN};
use shoal_node::swarm::admission::ClusterKey;
use shoal_testnet::hostile::{self, Proof};
use shoal_testnet::{wait_for, Cluster};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn write_data(dir: &Path, files: usize, size: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..files {
        std::fs::write(
            dir.join(format!("f{i:03}.bin")),
            random_bytes(seed * 1000 + i as u64, size),
        )
        .unwrap();
    }
}

/// Publishes `data` as `ds@v1`: its root, and how many unique chunks it has (the length of
/// its have-maps), from a pull on a machine with no daemon.
fn publish_and_count(c: &Cluster, data: &Path) -> ([u8; 32], u32) {
    let v = c.publish(data, "ds@v1");
    let probe = std::process::Command::new(BIN)
        .args(["--json", "pull", "ds@v1", "--no-files"])
        .env("SHOAL_HOME", c.home("probe"))
        .env("SHOAL_ORIGIN", &c.origin)
        .env("SHOAL_TRUSTED_KEYS", &c.trusted)
        .output()
        .unwrap();
    assert!(probe.status.success());
    let chunks = serde_json::from_slice::<serde_json::Value>(&probe.stdout).unwrap()["chunks"]
        .as_u64()
        .unwrap() as u32;
    (root_of(&v), chunks)
}

/// Pulls `ds@v1` on node `a` into a directory and checks its 16 files against `data`: the
/// pull's report and how long it took.
fn pull_exactly(c: &Cluster, a: usize, data: &Path) -> (serde_json::Value, Duration) {
    let dest = c.dir.path().join("out");
    let started = Instant::now();
    let r = c.nodes[a].json(&["pull", "ds@v1", "--to", dest.to_str().unwrap()]);
    let took = started.elapsed();
    for i in 0..16 {
        let name = format!("f{i:03}.bin");
        assert!(
            std::fs::read(data.join(&name)).unwrap() == std::fs::read(dest.join(&name)).unwrap(),
            "{name} pulled exactly"
        );
    }
    (r, took)
}

/// A new cluster key file (`shoal node keygen`), loaded.
fn keygen(path: &Path) -> ClusterKey {
    common::keygen(path);
    ClusterKey::load(path).unwrap()
}

/// Every blob id in the origin's packs (what an attacker would ask for).
fn blob_ids(origin: &str) -> Vec<[u8; 32]> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(Path::new(origin).join("packs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "idx") {
            let idx = shoal_registry::pack::PackIndex::decode(&std::fs::read(&p).unwrap()).unwrap();
            ids.extend(idx.entries.iter().map(|e| e.id.0));
        }
    }
    assert!(!ids.is_empty());
    ids
}

/// An IPv4 address of this machine that is not loopback, for an outsider to connect from.
fn outside_ip() -> IpAddr {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .expect("running ip");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("this machine has a non-loopback IPv4 address")
}

fn status_of(c: &Cluster, i: usize) -> serde_json::Value {
    c.nodes[i].status().expect("status answers")
}

fn bulk_addr(st: &serde_json::Value, ip: IpAddr) -> SocketAddr {
    let a: SocketAddr = st["bulk_addr"].as_str().unwrap().parse().unwrap();
    SocketAddr::new(ip, a.port())
}

fn ctl_addr(st: &serde_json::Value, ip: IpAddr) -> shoal_node::swarm::Multiaddr {
    let port = st["listen"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str().unwrap().rsplit('/').next().map(str::to_string))
        .unwrap();
    format!("/ip4/{ip}/tcp/{port}").parse().unwrap()
}

/// Short deadlines, so outsiders and stalled readers are dropped within the test's patience.
fn fast_limits(home: &Path) {
    std::fs::create_dir_all(home).unwrap();
    std::fs::write(
        home.join("config.toml"),
        "[node.limits]\nhandshake_secs = 2\nwrite_secs = 5\n",
    )
    .unwrap();
}

struct Attempt {
    served: bool,
    bytes: usize,
    roots: usize,
    hellos: usize,
    auth_answered: bool,
}

/// One outsider (fresh identity, `proof`) against the node: bulk and control.
fn attack(
    rt: &tokio::runtime::Runtime,
    st: &serde_json::Value,
    from: IpAddr,
    to: IpAddr,
    proof: Proof,
    ids: &[[u8; 32]],
    root: [u8; 32],
) -> Attempt {
    let server: shoal_node::swarm::PeerId = st["peer_id"].as_str().unwrap().parse().unwrap();
    rt.block_on(async {
        let me = hostile::identity();
        let mut served = false;
        let mut bytes = 0;
        // A refused connection (closed during the handshake) is as good as one that got nothing.
        if let Ok(mut b) = hostile::bulk_connect(
            &me,
            from,
            bulk_addr(st, to),
            server,
            &proof,
            Duration::from_secs(3),
        )
        .await
        {
            served = b.server_proof.is_some();
            if b.ask(&ids[..ids.len().min(8)]).await.is_ok() {
                if served {
                    let got = b
                        .answer(ids.len().min(8), Duration::from_secs(5))
                        .await
                        .unwrap();
                    for (id, blob) in ids.iter().zip(&got) {
                        if let Some(blob) = blob {
                            assert_eq!(&shoal_chunker::hash(blob).0, id, "a blob matches its id");
                            bytes += blob.len();
                        }
                    }
                } else {
                    bytes += b.drain(Duration::from_secs(3)).await;
                }
            }
        }
        let r = hostile::ctl_probe(ctl_addr(st, to), proof, root, 4).await;
        Attempt {
            served,
            bytes,
            roots: r.roots_learned.len(),
            hellos: r.hellos,
            auth_answered: r.auth_answered,
        }
    })
}

fn assert_nothing(a: &Attempt, what: &str) {
    assert!(
        !a.served && a.bytes == 0 && a.roots == 0 && a.hellos == 0 && !a.auth_answered,
        "{what}: an outsider got something: served {}, {} bytes, {} roots, {} hellos, auth answered {}",
        a.served,
        a.bytes,
        a.roots,
        a.hellos,
        a.auth_answered
    );
}

#[test]
fn outsiders_get_nothing_in_every_private_mode_and_an_open_node_serves_them() {
    let rt = rt();
    let mut c = Cluster::new(BIN);
    let data = c.dir.path().join("data");
    write_data(&data, 4, 300_000, 1);
    let v = c.publish(&data, "ds@v1");
    let root = root_of(&v);
    let ids = blob_ids(&c.origin);
    let key_file = c.dir.path().join("cluster.key");
    let key = keygen(&key_file);
    let wrong = keygen(&c.dir.path().join("wrong.key"));
    let members = c.dir.path().join("members");
    std::fs::write(&members, "# nobody\n").unwrap();

    fast_limits(&c.home("a"));
    let a = c.node("a", &["--listen", "/ip4/0.0.0.0/tcp/0"], &[]);
    let pulled = c.nodes[a].json(&["pull", "ds@v1", "--no-files"]);
    assert_eq!(pulled["version"], "ds@v1");
    let lo2: IpAddr = "127.0.0.2".parse().unwrap();
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let outside = outside_ip();

    // Loopback only (no key, no members, not open): an outsider off this machine gets
    // nothing, even connecting to an address the node listens on.
    let st = status_of(&c, a);
    assert_eq!(st["admission"], "loopback only");
    let got = attack(&rt, &st, outside, outside, Proof::None, &ids, root);
    assert_nothing(&got, "loopback-only node, outsider off the machine");

    let restart = |c: &mut Cluster, args: Vec<String>| {
        c.nodes[a].stop();
        c.nodes[a].args = args;
        c.nodes[a].start();
        status_of(c, a)
    };
    let any = vec!["--listen".to_string(), "/ip4/0.0.0.0/tcp/0".to_string()];

    // Cluster key: no proof, a wrong key, from loopback or not: nothing. The right key: served.
    let mut args = any.clone();
    args.extend(["--cluster-key".to_string(), key_file.display().to_string()]);
    let st = restart(&mut c, args);
    assert_eq!(st["admission"], "cluster key");
    assert_eq!(st["cluster_key"], key.fingerprint());
    for (from, to, proof, what) in [
        (lo2, lo, Proof::None, "no proof, from loopback"),
        (outside, outside, Proof::None, "no proof, off the machine"),
        (lo2, lo, Proof::Key(wrong.clone()), "wrong key"),
        (
            outside,
            outside,
            Proof::Key(wrong.clone()),
            "wrong key, off the machine",
        ),
    ] {
        let got = attack(&rt, &st, from, to, proof, &ids, root);
        assert_nothing(&got, &format!("cluster-key node, {what}"));
    }
    assert!(
        c.nodes[a].log().contains("wrong cluster key"),
        "refusals are logged with why"
    );
    let insider = attack(
        &rt,
        &st,
        outside,
        outside,
        Proof::Key(key.clone()),
        &ids,
        root,
    );
    assert!(
        insider.served && insider.bytes > 0 && insider.roots >= 1,
        "a peer with the key is served: {} bytes, {} roots",
        insider.bytes,
        insider.roots
    );

    // Members list (the attacker is not on it): nothing, whatever it proves.
    let mut args = any.clone();
    args.extend(["--members".to_string(), members.display().to_string()]);
    let st = restart(&mut c, args);
    assert_eq!(st["admission"], "members");
    for proof in [Proof::None, Proof::Key(key.clone())] {
        let got = attack(&rt, &st, lo2, lo, proof, &ids, root);
        assert_nothing(&got, "members-only node");
    }
    let served_before_open = status_of(&c, a)["bytes_served"].as_u64().unwrap();

    // Open: the same outsider is served, bytes and roots (the client above works).
    let mut args = any.clone();
    args.push("--open".into());
    let st = restart(&mut c, args);
    assert_eq!(st["admission"], "open");
    let got = attack(&rt, &st, outside, outside, Proof::None, &ids, root);
    assert!(
        got.served && got.bytes > 0 && got.roots >= 1 && got.hellos >= 1,
        "an open node serves anyone: {} bytes, {} roots",
        got.bytes,
        got.roots
    );
    assert!(
        served_before_open <= insider.bytes as u64,
        "the node served outsiders nothing but the insider's {} bytes (counted {served_before_open})",
        insider.bytes
    );
}

/// Resident set of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

#[test]
fn floods_and_clients_that_never_read_cost_bounded_memory_while_a_peer_pulls() {
    let rt = rt();
    shoal_node::limits::raise_nofile();
    let mut c = Cluster::new(BIN);
    let data = c.dir.path().join("data");
    write_data(&data, 24, 4 << 20, 2); // 96 MiB
    c.publish(&data, "big@v1");
    let ids = blob_ids(&c.origin);
    let key_file = c.dir.path().join("cluster.key");
    let key = keygen(&key_file);
    let kf = key_file.display().to_string();

    // The target holds the version; its open-file limit is low, so the flood would exhaust
    // descriptors if the bounds did not fit under it.
    fast_limits(&c.home("a"));
    let a = c.node("a", &["--cluster-key", &kf], &[]);
    c.nodes[a].json(&["pull", "big@v1", "--no-files"]);
    c.nodes[a].stop();
    c.nodes[a].wrap = vec!["prlimit".into(), "--nofile=1024:1024".into(), "--".into()];
    c.nodes[a].start();
    let pid = c.nodes[a].child.as_ref().unwrap().id();
    let st = status_of(&c, a);
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let attacker: IpAddr = "127.0.0.3".parse().unwrap();
    let server: shoal_node::swarm::PeerId = st["peer_id"].as_str().unwrap().parse().unwrap();
    let bulk = bulk_addr(&st, lo);
    let ctl: SocketAddr = {
        let m = ctl_addr(&st, lo).to_string();
        format!("127.0.0.1:{}", m.rsplit('/').next().unwrap())
            .parse()
            .unwrap()
    };
    let rss_before = rss(pid);

    // The attack: 2,000 bare connects split over both peer listeners, then ten insiders (they
    // hold the key) that ask for every blob and never read.
    let (flood, readers) = rt.block_on(async {
        let mut f = hostile::flood(attacker, bulk, 1000).await;
        f.extend(hostile::flood(attacker, ctl, 1000).await);
        let mut readers = Vec::new();
        for i in 0..10 {
            let me = hostile::identity();
            let from: IpAddr = format!("127.0.1.{}", i + 1).parse().unwrap();
            match hostile::bulk_connect(
                &me,
                from,
                bulk,
                server,
                &Proof::Key(key.clone()),
                Duration::from_secs(5),
            )
            .await
            {
                Ok(mut b) if b.server_proof.is_some() => {
                    for part in ids.chunks(512).cycle().take(64) {
                        if tokio::time::timeout(Duration::from_millis(200), b.ask(part))
                            .await
                            .is_err()
                        {
                            break; // its send buffer is full: the node stopped reading it
                        }
                    }
                    readers.push(b);
                }
                _ => {}
            }
        }
        (f, readers)
    });
    assert!(!readers.is_empty(), "insiders with the key got in");
    for _ in 0..5 {
        assert!(
            c.nodes[a].status().is_some(),
            "status answers during the flood"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Meanwhile a legitimate peer pulls from the node, and status answers throughout.
    let b = c.node(
        "b",
        &[
            "--cluster-key",
            &kf,
            "--bootstrap",
            st["listen"][0].as_str().unwrap(),
        ],
        &[],
    );
    c.nodes[b].wait_peers(1);
    let dest = c.dir.path().join("pulled");
    let mut pull = c.nodes[b]
        .cmd(&["--json", "pull", "big@v1", "--to", dest.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut peak = 0;
    let mut statuses = 0;
    let done = loop {
        peak = peak.max(rss(pid));
        assert!(
            c.nodes[a].status().is_some(),
            "status answers during the attack"
        );
        statuses += 1;
        if let Some(s) = pull.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the pull finishes"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let out = pull.wait_with_output().unwrap();
    assert!(
        done.success(),
        "legitimate pull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for i in 0..24 {
        let name = format!("f{i:03}.bin");
        assert!(
            std::fs::read(data.join(&name)).unwrap() == std::fs::read(dest.join(&name)).unwrap(),
            "{name} pulled exactly"
        );
    }
    peak = peak.max(rss(pid));
    eprintln!(
        "flood: {} bare connections held, {} never-reading insiders; node RSS {} MiB before, peak {} MiB; pull {:.1}s ({} from peers); {statuses} status calls answered",
        flood.len(),
        readers.len(),
        rss_before >> 20,
        peak >> 20,
        report["seconds"].as_f64().unwrap(),
        report["bytes_from_peers"]
    );
    assert!(
        peak < 512 << 20,
        "node RSS peaked at {} MiB (bound 512 MiB)",
        peak >> 20
    );
    assert!(
        c.nodes[a]
            .child
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "the node is up"
    );
    // The never-reading clients are dropped at the write deadline (5 s here), while they
    // still hold their sockets open and unread.
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(
            30,
            "the node to drop the clients that stopped reading",
            || (c.nodes[a].log().matches("stopped reading").count() >= readers.len()).then_some(()),
        )
    }));
    if dropped.is_err() {
        let log = c.nodes[a].log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "clients that stopped reading were not all dropped; log tail:\n{}",
            tail.join("\n")
        );
    }
    drop(readers);
    drop(flood);
    assert!(
        c.nodes[a].status().is_some(),
        "status answers after the attack"
    );
}

#[test]
fn a_puller_that_lies_in_its_have_map_costs_seconds_not_the_pull() {
    let rt = rt();
    let mut c = Cluster::new(BIN);
    let data = c.dir.path().join("data");
    write_data(&data, 16, 2 << 20, 3); // 32 MiB
    let (root, chunks) = publish_and_count(&c, &data);

    // A peer that says it pulls the version too, with a have-map that grows (pushed as
    // have-deltas, so it looks like a puller making progress, and owns its share of the origin
    // reads), and answers "not here" for everything.
    let liar = rt.block_on(hostile::liar(
        root,
        chunks,
        64,
        None,
        hostile::Answers::NotHere,
    ));
    let a = c.node("a", &["--bootstrap", &liar.addr.to_string()], &[]);
    c.nodes[a].wait_peers(1);
    let (r, took) = pull_exactly(&c, a, &data);
    let asked = liar.asked.load(std::sync::atomic::Ordering::Relaxed);
    assert!(asked > 0, "the liar was believed at first (and asked)");
    let log = c.nodes[a].log();
    assert!(
        log.contains("answers for chunks it advertised"),
        "the lies are counted against the peer"
    );
    // Liveness, not speed: before lies counted, the liar owned half the runs and the pull
    // never finished.
    assert!(
        took < Duration::from_secs(30),
        "the pull took {took:?} with a liar in the swarm: {r}"
    );
    if std::env::var_os("SHOAL_TEST_DUMP_LOG").is_some() {
        eprintln!("{log}");
    }
    eprintln!(
        "pull with a lying puller: {:.1}s, {} bulk requests to the liar, {} from origin",
        took.as_secs_f64(),
        asked,
        r["bytes_from_origin"]
    );
}

#[test]
fn peers_sending_compressed_bombs_and_lying_frames_cost_seconds_not_the_pull() {
    let rt = rt();
    let mut c = Cluster::new(BIN);
    let data = c.dir.path().join("data");
    write_data(&data, 16, 2 << 20, 5); // 32 MiB
    let (root, chunks) = publish_and_count(&c, &data);

    // Four pullers that advertise what they do not have and answer with compressed frames
    // (negotiated like an honest compressing node): a zstd bomb (16 MiB in a frame declaring
    // a few KiB), a frame with one record too many, frames of junk blobs, and blobs "as their
    // store keeps them" that each declare 16 MiB.
    let liars: Vec<_> = [
        hostile::Answers::Bomb,
        hostile::Answers::Overrun,
        hostile::Answers::Junk,
        hostile::Answers::BlobBombs,
    ]
    .into_iter()
    .map(|a| rt.block_on(hostile::liar(root, chunks, 64, None, a)))
    .collect();
    let mut args = Vec::new();
    for l in &liars {
        args.push("--bootstrap".to_string());
        args.push(l.addr.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = c.node("a", &args, &[]);
    c.nodes[a].wait_peers(4);
    let (r, took) = pull_exactly(&c, a, &data);
    for (l, what) in liars.iter().zip(["bomb", "overrun", "junk", "blob bombs"]) {
        assert!(
            l.asked.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "the {what} liar was asked"
        );
    }
    let log = c.nodes[a].log();
    for what in [
        "sent a frame that does not decompress",
        "sent a frame holding more records than asked for",
        "that do not match it",
        "bytes in one answer",
    ] {
        assert!(
            log.contains(what),
            "a fault for {what:?} in the log:\n{log}"
        );
    }
    // The daemon is up and small after decompressing for liars.
    let s = c.nodes[a]
        .status()
        .expect("the daemon answers after the liars");
    assert!(s["verify_failures"].as_u64().unwrap() > 0, "{s}");
    assert!(
        took < Duration::from_secs(30),
        "the pull took {took:?} with liars in the swarm: {r}"
    );
    eprintln!(
        "pull with four lying compressors: {:.1}s, {} from origin",
        took.as_secs_f64(),
        r["bytes_from_origin"]
    );
}
