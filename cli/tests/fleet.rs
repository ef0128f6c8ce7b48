//! Fleets with real node daemons on loopback. A test binary of their own, its tests one at a
//! time, so their daemons do not share the machine with other clusters' (test binaries run
//! one after another; pulls that start seconds apart behave differently, docs/swarm.md).

mod common;

use common::cluster::{four_connected_nodes, pull_at_once, pull_spread, root_of, setup, u};
use common::{write, BIN};
use shoal_testnet::Cluster;

/// Held by each test for its whole run.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fleet larger than its nodes' peer sets: ten nodes that keep 3 peers each (4 at most)
/// all bootstrap from the first, which lets most of them go; each finds others through hellos.
/// Pulling together, they agree on the origin readers through their rosters though none sees
/// every puller, so the origin serves each chunk about once, and every pull is exact.
#[test]
fn a_fleet_larger_than_its_peer_sets_reads_each_chunk_from_the_origin_about_once() {
    let _one = one_at_a_time();
    let mut c = Cluster::new(BIN);
    let (src, bytes) = setup(&c);
    let names: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
    let ids: Vec<usize> = names
        .iter()
        .map(|n| {
            write(
                &c.home(n).join("config.toml"),
                b"[node.limits]\npeers = 3\n",
            );
            c.node(n, &[], &[])
        })
        .collect();
    // Bounded: past the 10 s grace, the first node lets all but 3 go, and nobody keeps more
    // than 4; everyone still has a peer, and the fleet is one piece. Trimming can split it
    // for a moment (seen: nodes 7 and 8 holding only each other), and a split fleet cannot
    // agree on readers (the CI once read 2.0x the version: two pieces, each reading it
    // whole); nodes below their peer set dial the others they know within seconds.
    let started = std::time::Instant::now();
    let deadline = started + std::time::Duration::from_secs(60);
    let mut seen: Vec<usize>;
    let mut pieces: Vec<Vec<usize>>;
    let mut split_seen = None;
    loop {
        seen = ids.iter().map(|&i| c.nodes[i].connected()).collect();
        pieces = components(&c, &ids);
        if seen.iter().all(|&n| (1..=4).contains(&n)) {
            if pieces.len() == 1 {
                break;
            }
            split_seen.get_or_insert_with(|| (started.elapsed(), pieces.clone()));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "peer sets not bounded and joined within 60 s: {seen:?}, pieces {pieces:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    eprintln!(
        "peers per node: {seen:?} after {:.1} s; split on the way: {split_seen:?}",
        started.elapsed().as_secs_f64()
    );
    let control = |c: &Cluster| -> Vec<u64> {
        ids.iter()
            .map(|&i| {
                let s = c.nodes[i].status().expect("status");
                u(&s, "control_bytes_sent")
            })
            .collect()
    };
    let before = control(&c);
    let reports = pull_at_once(&c, &ids, "ds@v1", &src);
    let after = control(&c);
    let origin: u64 = reports.iter().map(|r| u(r, "bytes_from_origin")).sum();
    let peers: u64 = reports.iter().map(|r| u(r, "bytes_from_peers")).sum();
    eprintln!(
        "from the origin per node: {:?}",
        reports
            .iter()
            .map(|r| u(r, "bytes_from_origin"))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "origin {:.3}x the version, peers {:.1}x",
        origin as f64 / bytes as f64,
        peers as f64 / bytes as f64
    );
    // 1.07x when the pulls start together (the metadata included); a node that starts
    // seconds after the others, not next to the first readers, may read again what they read
    // before it could see it (docs/swarm.md); readers taken from each node's own view
    // instead of the roster gave 2.6x.
    assert!(
        origin < bytes + bytes / 2,
        "origin served {origin} bytes for a {bytes}-byte version to 10 nodes"
    );
    assert!(peers >= 7 * bytes, "peers served only {peers} bytes");
    // What the control plane cost each node (hellos, maps and deltas, rosters): during the
    // pulls, and then idle with the version held (hellos and roster refreshes only).
    let during: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let idle_from = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_secs(20));
    let idle: Vec<u64> = control(&c).iter().zip(&after).map(|(a, b)| a - b).collect();
    let secs = idle_from.elapsed().as_secs_f64();
    eprintln!(
        "control sent per node: during the pulls max {} B (mean {} B; the version is {bytes} B), idle max {:.0} B/s",
        during.iter().max().unwrap(),
        during.iter().sum::<u64>() / during.len() as u64,
        *idle.iter().max().unwrap() as f64 / secs
    );
    assert!(
        during.iter().all(|&d| d < bytes / 20),
        "control traffic past 5% of the version: {during:?}"
    );
    // Still bounded afterwards: a node may take one more in for its first seconds (it lets
    // the least needed go after a grace), never for long.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        seen = ids.iter().map(|&i| c.nodes[i].connected()).collect();
        if seen.iter().all(|&n| n <= 4) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "peer sets past 4 for 30 s after the pull: {seen:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The connected components of the peer graph, as node indexes in `ids`.
fn components(c: &Cluster, ids: &[usize]) -> Vec<Vec<usize>> {
    let peer_ids: Vec<String> = ids.iter().map(|&i| c.nodes[i].peer_id.clone()).collect();
    let edges: Vec<Vec<usize>> = ids
        .iter()
        .map(|&i| {
            c.nodes[i]
                .status()
                .and_then(|s| s["peers"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter(|p| p["connected"] == true)
                .filter_map(|p| {
                    let id = p["peer_id"].as_str()?;
                    peer_ids.iter().position(|q| q == id)
                })
                .collect()
        })
        .collect();
    let mut seen = vec![false; ids.len()];
    let mut out = Vec::new();
    for start in 0..ids.len() {
        if seen[start] {
            continue;
        }
        let mut comp = vec![];
        let mut stack = vec![start];
        seen[start] = true;
        while let Some(n) = stack.pop() {
            comp.push(n);
            // Undirected: an edge either side counts.
            for m in 0..ids.len() {
                if !seen[m] && (edges[n].contains(&m) || edges[m].contains(&n)) {
                    seen[m] = true;
                    stack.push(m);
                }
            }
        }
        comp.sort();
        out.push(comp);
    }
    out
}

/// Four connected nodes with `ds@v1` published, `phantoms` pullers that do not exist listed
/// first in its roster by a hostile member (carried to every node before the pulls), the
/// pulls started `gap` apart; with the version's size, each pull's report, how long they
/// took, and each node's status afterwards.
type Pulled = (
    u64,
    Vec<serde_json::Value>,
    std::time::Duration,
    Vec<serde_json::Value>,
);

fn pull_with_phantoms(phantoms: usize, gap: std::time::Duration) -> Pulled {
    let mut c = Cluster::new(BIN);
    let src = c.dir.path().join("src");
    let bytes = common::cluster::dataset(&src);
    let root = root_of(&c.publish(&src, "ds@v1"));
    let ids = four_connected_nodes(&mut c);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let target: shoal_node::swarm::Multiaddr = c.nodes[ids[0]].addr.parse().unwrap();
    let _flood =
        rt.block_on(async { shoal_testnet::hostile::roster_flooder(target, root, phantoms, None) });
    std::thread::sleep(std::time::Duration::from_secs(2));
    let started = std::time::Instant::now();
    let reports = pull_spread(&c, &ids, "ds@v1", &src, gap);
    let took = started.elapsed();
    let status = ids
        .iter()
        .map(|&i| c.nodes[i].status().expect("status"))
        .collect();
    (bytes, reports, took, status)
}

/// A member that fills the version's roster with pullers that do not exist, started first
/// (the worst a roster can be lied to: all its places, 40): they are the origin readers at
/// first, 32, then the 8 spares; a quiet spell after each were chosen every node sees they
/// showed no sign of life, and once all are dead falls back to the pullers it can see. The
/// pulls finish exact in two spells and the pull, with the origin read about once (10.5 s,
/// 1.002x; with 16 places and 8 readers 15.3 s; with the rule edited out, 20.4 s and 1.48x:
/// this test's bound on the origin catches that).
#[test]
fn pullers_that_do_not_exist_cost_a_quiet_spell_not_the_origin() {
    let _one = one_at_a_time();
    let phantoms = shoal_node::swarm::roster::ROSTER;
    let (bytes, reports, took, _) = pull_with_phantoms(phantoms, std::time::Duration::ZERO);
    let origin: u64 = reports.iter().map(|r| u(r, "bytes_from_origin")).sum();
    eprintln!(
        "4 pulls with {phantoms} phantom pullers listed: {:.1} s, origin {:.3}x the version",
        took.as_secs_f64(),
        origin as f64 / bytes as f64
    );
    assert!(
        origin < bytes + bytes / 5,
        "origin served {origin} bytes for a {bytes}-byte version to 4 nodes"
    );
    // A liveness bound, not a speed target: the spell stretches with the longest wait
    // between landings seen (four times it), so a loaded machine stretches it too (40.6 s
    // once, with a simulation running beside the suite). The rule edited out shows in the
    // origin bound above, not in the time (20.4 s).
    assert!(
        took < std::time::Duration::from_secs(90),
        "the pulls took {took:?}"
    );
}

/// A reader that never reads (a puller listed first that does not exist: the one a lying or
/// stalled node nobody can see would be) is passed over in about a second once the other
/// readers have shown life, not after a quiet spell (`reader_lag`): every pull reports it so.
#[test]
fn a_reader_that_never_reads_is_passed_over_once_the_others_show_life() {
    let _one = one_at_a_time();
    // Started together, and 700 ms apart (the first node sees the others come in after it
    // began: counting only readers chosen as its pull began, it judged nobody by lag, took
    // the others' reads of the phantom's runs for the phantom's own, and the pulls took
    // 31-33 s; now 1.0-3.2 s, each timed from its own start).
    for gap in [0, 700] {
        phantom_reader(std::time::Duration::from_millis(gap));
    }
}

fn phantom_reader(gap: std::time::Duration) {
    let (bytes, reports, took, status) = pull_with_phantoms(1, gap);
    let origin: u64 = reports.iter().map(|r| u(r, "bytes_from_origin")).sum();
    let each: Vec<String> = reports
        .iter()
        .map(|r| {
            format!(
                "{:.1} s, {:.2}x from origin, {} passed over ({} by lag)",
                r["seconds"].as_f64().unwrap(),
                u(r, "bytes_from_origin") as f64 / bytes as f64,
                u(r, "readers_passed_over"),
                u(r, "readers_passed_over_by_lag")
            )
        })
        .collect();
    eprintln!(
        "4 pulls {gap:?} apart with a phantom reader listed first: {:.1} s, origin {:.3}x the version; each: {}",
        took.as_secs_f64(),
        origin as f64 / bytes as f64,
        each.join("; ")
    );
    // The phantom is passed over by `reader_lag` (six runs: every node, 1.5-1.6 s; a node
    // whose peers had given it everything before it judged need not), and nobody honest
    // is (in view, readers are judged by what a node sees of them).
    for r in &reports {
        assert!(u(r, "readers_passed_over") <= 1, "{r}");
    }
    // The daemons count what their pulls report (`shoal_origin_readers_passed_over_total`).
    for (s, r) in status.iter().zip(&reports) {
        assert_eq!(
            u(s, "readers_passed_over"),
            u(r, "readers_passed_over"),
            "{s}"
        );
        assert_eq!(
            u(s, "readers_passed_over_by_lag"),
            u(r, "readers_passed_over_by_lag"),
            "{s}"
        );
    }
    assert!(
        reports
            .iter()
            .any(|r| u(r, "readers_passed_over_by_lag") == 1),
        "no node passed the phantom over by reader_lag: {reports:?}"
    );
    assert!(
        origin < bytes + bytes / 5,
        "origin served {origin} bytes for a {bytes}-byte version to 4 nodes"
    );
    // A liveness bound, not a speed target (a quiet spell is 5 s and stretches under load):
    // with the first node judging nobody by lag, pulls 700 ms apart took 31-33 s.
    assert!(
        took < std::time::Duration::from_secs(20),
        "the pulls took {took:?}"
    );
}
