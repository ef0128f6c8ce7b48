//! Several real node daemons on loopback: pulls from peers, origin offload, hostile and
//! stalled peers, a private swarm, resume after kill -9, daemon vs embedded.

mod common;

use common::cluster::{dataset, four_connected_nodes, ok_json, pull_at_once, setup, u};
use common::{assert_same_tree, random_bytes, write, BIN};
use serde_json::Value;
use shoal_testnet::{wait_for, Cluster};
use std::path::Path;
use std::process::Stdio;

#[test]
fn pulls_come_from_peers_and_status_reports_them() {
    let mut c = Cluster::new(BIN);
    let (src, bytes) = setup(&c);
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let a = c.node("a", &["--zone", "z1", "--metrics", &metrics], &[]);
    let b = c.node("b", &["--zone", "z1"], &[]);
    let d = c.node("d", &["--zone", "z2"], &[]);
    for i in [a, b, d] {
        c.nodes[i].wait_peers(2);
    }
    // The first pull has nobody to ask.
    let r = c.nodes[a].json(&["pull", "ds@v1", "--no-files"]);
    assert_eq!(u(&r, "bytes_from_peers"), 0);
    assert!(u(&r, "bytes_from_origin") >= bytes);

    // The others get every chunk from peers, and the files match the source.
    for (i, name) in [(b, "out_b"), (d, "out_d")] {
        let out = c.dir.path().join(name);
        let r = c.nodes[i].json(&["pull", "ds@v1", "--to", out.to_str().unwrap()]);
        assert_eq!(u(&r, "bytes_from_peers"), bytes, "{r}");
        assert_eq!(u(&r, "bytes_from_origin"), 0, "{r}");
        assert_same_tree(&src, &out);
    }

    // status: addresses, peer id, peers with labels and RTT, versions held, traffic.
    let s = c.nodes[a].status().unwrap();
    assert_eq!(s["peer_id"], c.nodes[a].peer_id);
    assert!(s["listen"][0]
        .as_str()
        .unwrap()
        .starts_with("/ip4/127.0.0.1/tcp/"));
    assert!(u(&s, "bytes_served") >= bytes / 2, "{s}");
    let peers = s["peers"].as_array().unwrap();
    assert_eq!(peers.iter().filter(|p| p["connected"] == true).count(), 2);
    let pb = peers
        .iter()
        .find(|p| p["peer_id"] == c.nodes[b].peer_id.as_str())
        .unwrap();
    assert_eq!(pb["labels"]["zone"], "z1");
    assert_eq!(pb["distance"], 1);
    let pd = peers
        .iter()
        .find(|p| p["peer_id"] == c.nodes[d].peer_id.as_str())
        .unwrap();
    assert_eq!(pd["distance"], 3);
    wait_for(20, "ping RTTs", || {
        let s = c.nodes[a].status()?;
        s["peers"]
            .as_array()?
            .iter()
            .all(|p| p["rtt_ms"].as_f64().is_some())
            .then_some(())
    });
    assert_eq!(s["versions"][0]["holding"], "complete");
    let sb = c.nodes[b].status().unwrap();
    assert!(u(&sb, "bytes_from_peers") >= bytes);
    // Random data goes as it is: no more bytes on the wire than the chunks and their heads.
    let (raw, wire) = (u(&sb, "bytes_from_peers"), u(&sb, "bytes_from_peers_wire"));
    assert!(wire >= raw && wire <= raw + raw / 100, "{sb}");

    // Prometheus metrics.
    let out = std::process::Command::new("curl")
        .args(["-sf", &format!("http://{metrics}/metrics")])
        .output()
        .unwrap();
    assert!(out.status.success(), "curl failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let served: u64 = text
        .lines()
        .find(|l| l.starts_with("shoal_bytes_served_total "))
        .unwrap_or_else(|| panic!("no bytes_served in {text}"))
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(served >= bytes / 2);
    assert!(text.contains("shoal_bytes_from_origin_total"));
    assert!(text.contains("shoal_chunk_verify_failures_total 0"));
    assert!(text.contains("shoal_origin_readers_passed_over_total 0"));

    // versions and ls go through the daemon and agree with the embedded node.
    let v = c.nodes[b].json(&["versions", "ds"]);
    assert_eq!(v["versions"][0]["version"], "v1");
    let ls = c.nodes[b].json(&["ls", "ds@v1", "shards"]);
    assert_eq!(ls["entries"].as_array().unwrap().len(), 4);
}

#[test]
fn a_cold_cluster_reads_each_chunk_from_the_origin_about_once() {
    let mut c = Cluster::new(BIN);
    let (src, bytes) = setup(&c);
    let ids = four_connected_nodes(&mut c);
    let mut origin = 0;
    let mut peers = 0;
    for r in pull_at_once(&c, &ids, "ds@v1", &src) {
        origin += u(&r, "bytes_from_origin");
        peers += u(&r, "bytes_from_peers");
    }
    // Four nodes, one origin read per chunk (plus tree nodes and range slack), the rest
    // swapped between them.
    assert!(
        origin < bytes + bytes / 5,
        "origin served {origin} bytes for a {bytes}-byte version"
    );
    assert!(peers >= 2 * bytes, "peers served only {peers} bytes");
}

#[test]
fn a_cold_cluster_reads_the_versions_metadata_from_the_origin_once() {
    // Thousands of small files with long names: the tree and the pack index weigh more than
    // the files' bytes, so reading them once per node would show in the origin's total.
    let mut c = Cluster::new(BIN);
    let src = c.dir.path().join("src");
    for d in 0..16 {
        for f in 0..125 {
            let name = format!("{f:04}-{}", "long-file-name-".repeat(7));
            write(
                &src.join(format!("class-{d:02}/{name}")),
                format!("file {d} {f}\n").as_bytes(),
            );
        }
    }
    c.publish(&src, "meta@v1");
    // What one node reads from the origin alone: metadata and data once.
    let alone = ok_json(
        std::process::Command::new(BIN)
            .args(["--json", "pull", "meta@v1", "--no-files"])
            .env("SHOAL_HOME", c.home("alone"))
            .env("SHOAL_ORIGIN", &c.origin)
            .env("SHOAL_TRUSTED_KEYS", &c.trusted),
    );
    let once = u(&alone, "bytes_from_origin");
    assert!(once > 2 * u(&alone, "bytes"), "metadata dominates: {alone}");

    let ids = four_connected_nodes(&mut c);
    let each: Vec<u64> = pull_at_once(&c, &ids, "meta@v1", &src)
        .iter()
        .map(|r| u(r, "bytes_from_origin"))
        .collect();
    // Four nodes each reading the metadata would make ~4x; one reads it for all (the files'
    // own bytes, a third of `once`, may be read over by several nodes' ranges).
    let total: u64 = each.iter().sum();
    assert!(
        total < once + once / 2,
        "the origin served {total} bytes ({each:?}) where one node alone reads {once}"
    );
}

#[test]
fn a_lying_peer_is_caught_and_banned() {
    let mut c = Cluster::new(BIN);
    let (src, _) = setup(&c);
    let liar = c.node("liar", &[], &[("SHOAL_FAULT_INJECT", "lie")]);
    let v = c.node("victim", &[], &[]);
    c.nodes[v].wait_peers(1);
    c.nodes[liar].json(&["pull", "ds@v1", "--no-files"]);
    let out = c.dir.path().join("out");
    let r = c.nodes[v].json(&["pull", "ds@v1", "--to", out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
    assert_eq!(u(&r, "bytes_from_peers"), 0, "{r}");
    let s = c.nodes[v].status().unwrap();
    assert!(u(&s, "verify_failures") >= 3, "{s}");
    let p = &s["peers"][0];
    assert!(p["faults"].as_u64().unwrap() >= 3, "{s}");
    wait_for(10, "the liar to be disconnected", || {
        (c.nodes[v].connected() == 0).then_some(())
    });
    // What the victim stored is what it serves: another node pulls from it, verified.
    let w = c.node("w", &["--bootstrap", &c.nodes[v].addr.clone()], &[]);
    c.nodes[w].wait_peers(1);
    let out2 = c.dir.path().join("out2");
    c.nodes[w].json(&["pull", "ds@v1", "--to", out2.to_str().unwrap()]);
    assert_same_tree(&src, &out2);
}

#[test]
fn a_stalled_peer_costs_seconds_not_the_pull() {
    let mut c = Cluster::new(BIN);
    let (src, _) = setup(&c);
    let s = c.node("stall", &[], &[("SHOAL_FAULT_INJECT", "stall")]);
    let g = c.node("good", &[], &[]);
    let p = c.node("puller", &[], &[]);
    c.nodes[p].wait_peers(2);
    c.nodes[s].json(&["pull", "ds@v1", "--no-files"]);
    c.nodes[g].json(&["pull", "ds@v1", "--no-files"]);
    let out = c.dir.path().join("out");
    let mut child = c.nodes[p]
        .cmd(&["--json", "pull", "ds@v1", "--to", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Generous bound: this guards against a hang, it is not a speed check.
    wait_for(120, "the pull to finish despite a stalled peer", || {
        child.try_wait().unwrap()
    });
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(u(&r, "bytes_from_peers") > 0, "{r}");
    assert_same_tree(&src, &out);
    let st = c.nodes[p].status().unwrap();
    let stalled = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["peer_id"] == c.nodes[s].peer_id.as_str())
        .unwrap()
        .clone();
    let good = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["peer_id"] == c.nodes[g].peer_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(u(&stalled, "bytes_received"), 0, "{st}");
    assert!(u(&good, "bytes_received") > 0, "{st}");
}

#[test]
fn a_private_swarm_rejects_an_outsider() {
    let mut c = Cluster::new(BIN);
    let (src, bytes) = setup(&c);
    let a = c.node("a", &[], &[]);
    let b = c.node("b", &[], &[]);
    // Learn the members' ids, then restart them as a private swarm.
    let members = c.dir.path().join("members");
    std::fs::write(
        &members,
        format!(
            "# cluster\n{}\n{}\n",
            c.nodes[a].peer_id, c.nodes[b].peer_id
        ),
    )
    .unwrap();
    for i in [a, b] {
        c.nodes[i].stop();
    }
    c.nodes[a].args = vec!["--members".into(), members.display().to_string()];
    c.nodes[a].start();
    c.nodes[b].args = vec![
        "--members".into(),
        members.display().to_string(),
        "--bootstrap".into(),
        c.nodes[a].addr.clone(),
    ];
    c.nodes[b].start();
    c.nodes[b].wait_peers(1);
    c.nodes[a].json(&["pull", "ds@v1", "--no-files"]);
    let r = c.nodes[b].json(&["pull", "ds@v1", "--no-files"]);
    assert_eq!(u(&r, "bytes_from_peers"), bytes);

    // The outsider dials a member: it is disconnected and gets nothing from the swarm.
    let o = c.node("outsider", &["--bootstrap", &c.nodes[a].addr.clone()], &[]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(c.nodes[o].connected(), 0);
    let out = c.dir.path().join("out");
    let r = c.nodes[o].json(&["pull", "ds@v1", "--to", out.to_str().unwrap()]);
    assert_eq!(u(&r, "bytes_from_peers"), 0);
    assert_same_tree(&src, &out);
    let sa = c.nodes[a].status().unwrap();
    assert!(
        sa["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["peer_id"] != c.nodes[o].peer_id.as_str() || p["connected"] == false),
        "{sa}"
    );
    assert!(u(&c.nodes[a].status().unwrap(), "bytes_served") >= bytes);
}

#[test]
fn a_killed_node_resumes_without_refetching() {
    let mut c = Cluster::new(BIN);
    // Large enough that a slow peer (300 ms per 4 MiB request) takes several seconds, while
    // delivering often enough never to look stalled.
    let src = c.dir.path().join("src");
    let mut bytes = dataset(&src);
    for i in 0..4 {
        let b = random_bytes(7000 + i, 12 << 20);
        bytes += b.len() as u64;
        write(&src.join(format!("big/{i}")), &b);
    }
    c.publish(&src, "ds@v1");
    let slow = c.node("slow", &[], &[("SHOAL_FAULT_INJECT", "slow")]);
    let p = c.node("p", &[], &[]);
    c.nodes[p].wait_peers(1);
    c.nodes[slow].json(&["pull", "ds@v1", "--no-files"]);
    let mut pull = c.nodes[p]
        .cmd(&["--json", "pull", "ds@v1", "--no-files"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill -9 the daemon once some chunks are in.
    wait_for(60, "part of the version to arrive", || {
        let s = c.nodes[p].status()?;
        let held = s["versions"][0]["chunks_held"].as_u64()?;
        (held > 0).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_millis(1200));
    c.nodes[p].kill9();
    let _ = pull.wait();
    c.nodes[p].start();
    let out = c.dir.path().join("out");
    let r = c.nodes[p].json(&["pull", "ds@v1", "--to", out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
    let local = u(&r, "bytes_already_local");
    assert!(local > 0, "nothing survived the kill: {r}");
    assert!(local < bytes, "the pull had finished before the kill: {r}");
    assert_eq!(
        u(&r, "bytes_from_peers") + local,
        bytes,
        "fetched again what was already verified: {r}"
    );
}

#[test]
fn daemon_and_embedded_give_the_same_result() {
    let mut c = Cluster::new(BIN);
    let (src, _) = setup(&c);
    let a = c.node("a", &[], &[]);
    let via_daemon = c.dir.path().join("d");
    let rd = c.nodes[a].json(&["pull", "ds@v1", "--to", via_daemon.to_str().unwrap()]);
    // No daemon on this state directory: the CLI runs an embedded node.
    let embedded = c.dir.path().join("e");
    let re = ok_json(
        std::process::Command::new(BIN)
            .args([
                "--json",
                "pull",
                "ds@v1",
                "--to",
                embedded.to_str().unwrap(),
            ])
            .env("SHOAL_HOME", c.home("embedded"))
            .env("SHOAL_ORIGIN", &c.origin)
            .env("SHOAL_TRUSTED_KEYS", &c.trusted),
    );
    for k in ["version", "root", "files", "bytes", "chunks"] {
        assert_eq!(rd[k], re[k], "{k}");
    }
    assert_same_tree(&src, &via_daemon);
    assert_same_tree(&via_daemon, &embedded);
    // A second daemon on the same state directory is refused.
    let out = c.nodes[a].run(&["node", "run", "--no-mdns"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));

    // The store's own commands go through the daemon too (it holds the store).
    let p = c.nodes[a].json(&["pin", "ds@v1"]);
    assert_eq!(p["pinned"], "ds@v1", "{p}");
    assert_eq!(p["bytes_from_origin"], 0, "already local: {p}");
    let cache = c.nodes[a].json(&["cache"]);
    assert_eq!(cache["pins"][0]["name"], "ds@v1", "{cache}");
    assert!(u(&cache, "pinned_bytes") > 0, "{cache}");
    assert_eq!(cache["tiers"][0]["kind"], "memory", "{cache}");
    assert_eq!(cache["tiers"][1]["kind"], "disk", "{cache}");
    // Pinned: gc keeps it.
    c.nodes[a].json(&["gc"]);
    assert_eq!(
        u(
            &c.nodes[a].json(&["pull", "ds@v1", "--no-files"]),
            "bytes_from_origin"
        ),
        0
    );
    c.nodes[a].json(&["unpin", "ds@v1"]);
    let freed = c.nodes[a].json(&["gc"]);
    assert!(u(&freed, "freed_bytes") > 0, "{freed}");
    let cache = c.nodes[a].json(&["cache"]);
    assert_eq!(u(&cache, "live_bytes"), 0, "{cache}");
}

#[test]
fn the_commands_trusted_keys_reach_the_daemon() {
    let mut c = Cluster::new(BIN);
    let (src, bytes) = setup(&c);
    // A daemon that does not trust the publisher by itself.
    let a = c.node("a", &[], &[("SHOAL_TRUSTED_KEYS", "")]);
    let out = c.nodes[a].run(&["pull", "ds@v1", "--no-files"]);
    assert!(!out.status.success(), "an untrusted version was pulled");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a trusted key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same pull by a command that trusts the key (SHOAL_TRUSTED_KEYS): the daemon does it.
    let dest = c.dir.path().join("pulled");
    ok_json(
        c.nodes[a]
            .cmd(&["--json", "pull", "ds@v1", "--to", dest.to_str().unwrap()])
            .env("SHOAL_TRUSTED_KEYS", &c.trusted),
    );
    assert_same_tree(&src, &dest);
    let s = c.nodes[a].status().unwrap();
    assert!(
        u(&s, "bytes_from_origin") >= bytes,
        "pulled by the daemon: {s}"
    );
}

/// Two namespaces on one bridge, deleted on drop.
struct Lan {
    names: Vec<String>,
}

impl Lan {
    fn ip(args: &[&str]) {
        let st = std::process::Command::new("ip").args(args).status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "`ip {}` failed: this test needs root and network namespaces",
            args.join(" ")
        );
    }

    fn new(hosts: usize) -> Lan {
        let tag = std::process::id() % 100_000;
        let sw = format!("sm{tag}sw");
        let mut lan = Lan {
            names: vec![sw.clone()],
        };
        Lan::ip(&["netns", "add", &sw]);
        Lan::ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        Lan::ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for h in 0..hosts {
            let ns = format!("sm{tag}h{h}");
            Lan::ip(&["netns", "add", &ns]);
            lan.names.push(ns.clone());
            let (v, p) = (format!("sm{tag}v{h}"), format!("sm{tag}p{h}"));
            Lan::ip(&["link", "add", &v, "type", "veth", "peer", "name", &p]);
            Lan::ip(&["link", "set", &v, "netns", &ns]);
            Lan::ip(&["link", "set", &p, "netns", &sw]);
            Lan::ip(&["-n", &ns, "link", "set", "lo", "up"]);
            Lan::ip(&["-n", &ns, "link", "set", &v, "name", "eth0"]);
            Lan::ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.79.0.{}/24", 10 + h),
                "dev",
                "eth0",
            ]);
            Lan::ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            // A LAN host has a default route; multicast (mDNS) needs one to leave.
            Lan::ip(&["-n", &ns, "route", "add", "default", "dev", "eth0"]);
            Lan::ip(&["-n", &sw, "link", "set", &p, "master", "br0"]);
            Lan::ip(&["-n", &sw, "link", "set", &p, "up"]);
        }
        lan
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", n])
                .status();
        }
    }
}

#[test]
fn nodes_on_a_lan_find_each_other_by_mdns() {
    let c = Cluster::new(BIN);
    let (src, bytes) = setup(&c);
    let lan = Lan::new(2);
    // Nodes on a LAN share a cluster key (without one they admit only their own machine).
    let key = c.dir.path().join("cluster.key");
    common::keygen(&key);
    let mut daemons = Vec::new();
    for h in 0..2 {
        let home = c.home(&format!("m{h}"));
        std::fs::create_dir_all(&home).unwrap();
        // No bootstrap addresses: discovery is mDNS's job.
        let child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &lan.names[h + 1],
                BIN,
                "node",
                "run",
                "--listen",
            ])
            .arg(format!("/ip4/10.79.0.{}/tcp/4001", 10 + h))
            .arg("--cluster-key")
            .arg(&key)
            .env("SHOAL_HOME", &home)
            .env("SHOAL_ORIGIN", &c.origin)
            .env("SHOAL_TRUSTED_KEYS", &c.trusted)
            .env("SHOAL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(home.join("node.log")).unwrap())
            .spawn()
            .unwrap();
        daemons.push(KillOnDrop(child));
    }
    let shoal = |h: usize, args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env("SHOAL_HOME", c.home(&format!("m{h}")))
            .env("SHOAL_ORIGIN", &c.origin)
            .env("SHOAL_TRUSTED_KEYS", &c.trusted)
            .output()
            .unwrap()
    };
    let logs = || {
        (0..2)
            .map(|h| {
                std::fs::read_to_string(c.home(&format!("m{h}")).join("node.log"))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(30, "the two nodes to discover each other by mDNS", || {
            let out = shoal(1, &["--json", "status"]);
            let s: Value = serde_json::from_slice(&out.stdout).ok()?;
            (s["peers"]
                .as_array()?
                .iter()
                .any(|p| p["connected"] == true))
            .then_some(())
        })
    }));
    assert!(found.is_ok(), "no mDNS discovery; node logs:\n{}", logs());
    let out = shoal(0, &["--json", "pull", "ds@v1", "--no-files"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dest = c.dir.path().join("out");
    let out = shoal(
        1,
        &["--json", "pull", "ds@v1", "--to", dest.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u(&r, "bytes_from_peers"), bytes, "{r}");
    assert_same_tree(&src, &dest);
    drop(daemons);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_relative_origin_path_is_the_commands_not_the_daemons() {
    let mut c = Cluster::new(BIN);
    let (_src, bytes) = setup(&c);
    let a = c.node("a", &[], &[]);
    // The daemon runs in another directory; the command names the origin relative to its own.
    let origin = Path::new(&c.origin);
    let r = ok_json(
        c.nodes[a]
            .cmd(&["--json", "pull", "ds@v1", "--no-files"])
            .current_dir(origin.parent().unwrap())
            .env("SHOAL_ORIGIN", origin.file_name().unwrap()),
    );
    assert!(u(&r, "bytes_from_origin") >= bytes, "{r}");
}

#[test]
fn replicate_through_a_daemon_reads_its_store_then_its_peers_before_the_origin() {
    let mut c = Cluster::new(BIN);
    let (src, _) = setup(&c);
    let a = c.node("a", &[], &[]);
    let b = c.node("b", &[], &[]);
    c.nodes[a].wait_peers(1);
    c.nodes[b].wait_peers(1);
    c.nodes[a].json(&["pull", "ds@v1", "--no-files"]);
    // The origin's pack objects go away (their indexes stay): every byte a copy writes must
    // come from a node's store or a peer.
    let packs = Path::new(&c.origin).join("packs");
    let hidden = c.dir.path().join("hidden-packs");
    std::fs::create_dir_all(&hidden).unwrap();
    let mut moved = Vec::new();
    for e in std::fs::read_dir(&packs).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().ends_with(".pack") {
            std::fs::rename(e.path(), hidden.join(e.file_name())).unwrap();
            moved.push(e.file_name());
        }
    }
    assert!(!moved.is_empty());

    // a holds the version: it copies from its own store.
    let m1 = c.dir.path().join("m1");
    let r = c.nodes[a].json(&["replicate", "ds@v1", "--to", m1.to_str().unwrap()]);
    let copied = u(&r, "pack_bytes_copied");
    assert!(copied > 0, "{r}");
    assert_eq!(u(&r, "bytes_local"), copied, "{r}");
    assert_eq!(r["origins"], serde_json::json!([]), "{r}");

    // b holds nothing: it copies from a, its peer.
    let m2 = c.dir.path().join("m2");
    let r = c.nodes[b].json(&["replicate", "ds@v1", "--to", m2.to_str().unwrap()]);
    assert_eq!(u(&r, "pack_bytes_copied"), copied, "{r}");
    assert_eq!(u(&r, "bytes_from_peers"), copied, "{r}");
    assert_eq!(u(&r, "bytes_local"), 0, "{r}");

    // Both mirrors serve the version exactly to a reader that knows only them.
    for m in [&m1, &m2] {
        let out = c
            .dir
            .path()
            .join(format!("from-{}", m.file_name().unwrap().to_string_lossy()));
        ok_json(
            std::process::Command::new(BIN)
                .args(["--json", "pull", "ds@v1", "--to", out.to_str().unwrap()])
                .env(
                    "SHOAL_HOME",
                    c.dir
                        .path()
                        .join(format!("h-{}", m.display()).replace('/', "_")),
                )
                .env("SHOAL_ORIGIN", m)
                .env("SHOAL_TRUSTED_KEYS", &c.trusted),
        );
        assert_same_tree(&src, &out);
    }
    for n in moved {
        std::fs::rename(hidden.join(&n), packs.join(&n)).unwrap();
    }
}

#[test]
fn partial_pulls_and_pins_take_only_the_files_selected_from_peers_or_origin() {
    let mut c = Cluster::new(BIN);
    let (src, bytes) = setup(&c);
    // Embedded: two shards by a character class; nothing else is fetched or written.
    let embedded = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env("SHOAL_HOME", c.home("embedded"))
            .env("SHOAL_ORIGIN", &c.origin)
            .env("SHOAL_TRUSTED_KEYS", &c.trusted)
            .output()
            .unwrap()
    };
    let two = c.dir.path().join("two");
    let out = embedded(&[
        "--json",
        "pull",
        "ds@v1",
        "--include",
        "shards/s[0-1]",
        "--to",
        two.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["partial"], true, "{r}");
    assert_eq!(u(&r, "files"), 2, "{r}");
    assert!(u(&r, "files_in_version") > 6, "{r}");
    assert_eq!(u(&r, "bytes"), 5_000_000, "{r}");
    assert!(
        u(&r, "bytes_from_origin") < 5_600_000,
        "only those files' chunks: {r}"
    );
    assert_eq!(
        common::all_paths(&two),
        vec!["shards", "shards/s0", "shards/s1"]
    );
    for f in ["shards/s0", "shards/s1"] {
        assert_eq!(
            std::fs::read(two.join(f)).unwrap(),
            std::fs::read(src.join(f)).unwrap()
        );
    }
    // Bad patterns and empty selections: one line naming them.
    let out = embedded(&["pull", "ds@v1", "--include", "a[", "--no-files"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--include") && err.contains("a["),
        "{err}"
    );
    let out = embedded(&["pull", "ds@v1", "--include", "*.nothing", "--no-files"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("no file of ds@v1")
            && err.trim().lines().count() == 1,
        "{err}"
    );

    // Through daemons: a holds the version whole; b takes everything but the shards from it.
    let a = c.node("a", &[], &[]);
    let b = c.node("b", &[], &[]);
    c.nodes[a].wait_peers(1);
    c.nodes[b].wait_peers(1);
    c.nodes[a].json(&["pull", "ds@v1", "--no-files"]);
    let rest = c.dir.path().join("rest");
    let r = c.nodes[b].json(&[
        "pull",
        "ds@v1",
        "--exclude",
        "shards/",
        "--to",
        rest.to_str().unwrap(),
    ]);
    assert_eq!(r["partial"], true, "{r}");
    let want: Vec<String> = common::all_paths(&src)
        .into_iter()
        .filter(|p| !p.starts_with("shards"))
        .collect();
    assert_eq!(common::all_paths(&rest), want);
    let small = u(&r, "bytes");
    assert_eq!(small + 10_000_000, bytes, "all but the four shards: {r}");
    assert_eq!(
        u(&r, "bytes_from_peers"),
        small,
        "from the peer holding it: {r}"
    );
    // b holds part of the version: it does not tell peers it holds it.
    let s = c.nodes[b].status().unwrap();
    assert!(
        s["versions"].as_array().is_none_or(|v| v.is_empty()),
        "a partial pull is not announced: {s}"
    );

    // A partial pin pins those files' chunks (and the tree); the whole pin replaces it.
    let p = c.nodes[b].json(&["pin", "ds@v1", "--include", "shards/s3"]);
    assert_eq!(u(&p, "files"), 1, "{p}");
    let partial_bytes = u(&p, "bytes");
    assert!(
        partial_bytes > 2_500_000 && partial_bytes < 2_600_000,
        "{p}"
    );
    let cache = c.nodes[b].json(&["cache"]);
    assert_eq!(u(&cache, "pinned_bytes"), partial_bytes, "{cache}");
    let p = c.nodes[b].json(&["pin", "ds@v1"]);
    assert!(u(&p, "bytes") > bytes, "{p}");
    let cache = c.nodes[b].json(&["cache"]);
    assert_eq!(u(&cache, "pinned_bytes"), u(&p, "bytes"), "{cache}");
}

/// `--origin-rate`, `--download-rate` and `--upload-rate` each hold what a node moves (from
/// its origins, from its peers, to its peers) to the rate set (each measured over the whole command, so a loaded machine only makes it look
/// slower); unlimited, the same pulls take a small fraction of that time on loopback. The
/// benchmark (`scripts/bench.sh rates`) measures how close to the rate they run.
#[test]
fn rate_limits_hold_origin_reads_downloads_and_uploads() {
    let mut c = Cluster::new(BIN);
    let (src, bytes) = setup(&c);
    let rate = 4_000_000f64;
    // What a limit lets through in `secs`: the rate, plus its bucket (100 ms of it) and 5 %.
    let within = |moved: u64, secs: f64, what: &str| {
        let most = rate * (secs + 0.1) * 1.05 + 65536.0;
        assert!(
            moved as f64 <= most,
            "{what}: {moved} bytes in {secs:.2} s, over the 4 MB/s limit ({most:.0} at most)"
        );
        eprintln!(
            "{what}: {moved} bytes in {secs:.2} s = {:.2} MB/s (limit 4 MB/s)",
            moved as f64 / secs / 1e6
        );
    };
    let a = c.node("a", &["--origin-rate", "4MB"], &[]);
    let b = c.node("b", &["--download-rate", "4MB/s"], &[]);
    let s = c.node("s", &["--upload-rate", "4000000"], &[]);
    for i in [a, b, s] {
        c.nodes[i].wait_peers(2);
    }
    let sa = c.nodes[a].status().unwrap();
    assert_eq!(sa["rates"]["origin"], 4_000_000, "{sa}");
    assert_eq!(sa["rates"]["upload"], Value::Null, "{sa}");
    let text = c.nodes[s].run(&["status"]);
    assert!(
        String::from_utf8_lossy(&text.stdout)
            .contains("rates: origin unlimited, upload 4.0 MB/s, download unlimited"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    // From the origin, within a's origin rate.
    let t = std::time::Instant::now();
    let r = c.nodes[a].json(&["pull", "ds@v1", "--no-files"]);
    let from_origin = u(&r, "bytes_from_origin");
    assert!(from_origin >= bytes, "{r}");
    within(from_origin, t.elapsed().as_secs_f64(), "origin reads");

    // From a (not limited), within b's download rate; exact.
    let out = c.dir.path().join("out_b");
    let t = std::time::Instant::now();
    let r = c.nodes[b].json(&["pull", "ds@v1", "--to", out.to_str().unwrap()]);
    // The download rate is the peers' share: b may read from the origin what its peers
    // cannot send in time (the origin rate is the limit there).
    let from_peers = u(&r, "bytes_from_peers");
    assert!(from_peers >= bytes / 4, "{r}");
    within(from_peers, t.elapsed().as_secs_f64(), "downloads");
    assert_same_tree(&src, &out);

    // s fetches it fast from a and b, which then leave: a new node's pull is served by s
    // within s's upload rate (and whatever it reads from the origin meanwhile).
    c.nodes[s].json(&["pull", "ds@v1", "--no-files"]);
    c.nodes[a].stop();
    c.nodes[b].stop();
    let s_addr = c.nodes[s].addr.clone();
    let d = c.node("d", &["--bootstrap", &s_addr], &[]);
    c.nodes[d].wait_peers(1);
    let served = u(&c.nodes[s].status().unwrap(), "bytes_served");
    let out = c.dir.path().join("out_d");
    let t = std::time::Instant::now();
    let r = c.nodes[d].json(&["pull", "ds@v1", "--to", out.to_str().unwrap()]);
    let secs = t.elapsed().as_secs_f64();
    assert_same_tree(&src, &out);
    let served = u(&c.nodes[s].status().unwrap(), "bytes_served") - served;
    assert!(served >= bytes / 4, "s served {served} of {bytes}: {r}");
    within(served, secs, "uploads");

    // Bad rates: one line naming the flag.
    let bad = c.nodes[d].run(&["node", "run", "--upload-rate", "fast"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("--upload-rate \"fast\": expected bytes per second"),
        "{err}"
    );
}

/// Real text (this repository's own sources and docs), copied into `dir`; its size.
fn real_text(dir: &Path) -> u64 {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut n = 0;
    for sub in [
        "node/src",
        "node/swarm/src",
        "registry/src",
        "docs",
        "cli/src",
    ] {
        for e in std::fs::read_dir(repo.join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                let to = dir.join(sub).join(p.file_name().unwrap());
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                n += std::fs::copy(&p, &to).unwrap();
            }
        }
    }
    n
}

#[test]
fn text_goes_compressed_between_peers_unless_the_server_says_not() {
    let mut c = Cluster::new(BIN);
    let src = c.dir.path().join("src");
    let bytes = real_text(&src);
    assert!(bytes > 1 << 20, "{bytes} bytes of text");
    c.publish(&src, "ds@v1");
    // a sends as it is; b and d compress.
    let a = c.node("a", &["--no-wire-compression"], &[]);
    let b = c.node("b", &[], &[]);
    let d = c.node("d", &[], &[]);
    for i in [a, b, d] {
        c.nodes[i].wait_peers(2);
    }
    let r = c.nodes[a].json(&["pull", "ds@v1", "--no-files"]);
    assert_eq!(u(&r, "bytes_from_peers"), 0);
    // b gets everything from a, uncompressed.
    let out = c.dir.path().join("out_b");
    let r = c.nodes[b].json(&["pull", "ds@v1", "--to", out.to_str().unwrap()]);
    assert_eq!(u(&r, "bytes_from_origin"), 0, "{r}");
    assert_same_tree(&src, &out);
    let sb = c.nodes[b].status().unwrap();
    let (raw, wire) = (u(&sb, "bytes_from_peers"), u(&sb, "bytes_from_peers_wire"));
    assert!(raw >= bytes && wire >= raw, "from a, as it is: {sb}");
    // d gets it from a and b: what came from b came compressed (text: at least 2x).
    let out = c.dir.path().join("out_d");
    let r = c.nodes[d].json(&["pull", "ds@v1", "--to", out.to_str().unwrap()]);
    assert_eq!(u(&r, "bytes_from_origin"), 0, "{r}");
    assert_same_tree(&src, &out);
    let sa = c.nodes[a].status().unwrap();
    let sb = c.nodes[b].status().unwrap();
    let sd = c.nodes[d].status().unwrap();
    let (a_raw, a_wire) = (u(&sa, "bytes_served"), u(&sa, "bytes_served_wire"));
    let (b_raw, b_wire) = (u(&sb, "bytes_served"), u(&sb, "bytes_served_wire"));
    assert!(a_wire >= a_raw, "a never compresses: {sa}");
    assert!(
        b_raw > 0 && b_wire * 2 < b_raw,
        "b compressed what it served: {sb}"
    );
    assert_eq!(
        u(&sd, "bytes_from_peers_wire"),
        b_wire + (a_wire - (u(&sb, "bytes_from_peers_wire"))),
        "d counts on the wire what a and b sent it"
    );
    eprintln!(
        "text between peers: {bytes} bytes; b served {b_raw} as {b_wire} on the wire ({:.2}x)",
        b_raw as f64 / b_wire as f64
    );
}
