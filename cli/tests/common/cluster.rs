//! Helpers for tests that run clusters of node daemons (`shoal_testnet::Cluster`).

use super::{assert_same_tree, random_bytes, sample_tree, write};
use serde_json::Value;
use shoal_testnet::Cluster;
use std::path::Path;
use std::process::Stdio;

/// A dataset of ~12 MiB: several multi-chunk files plus the usual odd entries.
pub fn dataset(root: &Path) -> u64 {
    sample_tree(root);
    for i in 0..4 {
        write(
            &root.join(format!("shards/s{i}")),
            &random_bytes(900 + i, 2_500_000),
        );
    }
    let mut n = 0;
    for e in walk(root) {
        n += e;
    }
    n
}

pub fn walk(root: &Path) -> Vec<u64> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(root).unwrap() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        if m.is_dir() {
            v.extend(walk(&e.path()));
        } else if m.is_file() {
            v.push(m.len());
        }
    }
    v
}

/// Runs a `shoal --json ...` command, asserts it succeeded (showing its stderr), parses stdout.
pub fn ok_json(cmd: &mut std::process::Command) -> Value {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

pub fn setup(c: &Cluster) -> (std::path::PathBuf, u64) {
    let src = c.dir.path().join("src");
    let bytes = dataset(&src);
    c.publish(&src, "ds@v1");
    (src, bytes)
}

/// Pulls `reference` on the nodes `ids` at once, each into its own directory; checks every
/// pull succeeded with the tree of `src`; returns their reports.
pub fn pull_at_once(c: &Cluster, ids: &[usize], reference: &str, src: &Path) -> Vec<Value> {
    pull_spread(c, ids, reference, src, std::time::Duration::ZERO)
}

/// As [`pull_at_once`], each pull started `gap` after the one before.
pub fn pull_spread(
    c: &Cluster,
    ids: &[usize],
    reference: &str,
    src: &Path,
    gap: std::time::Duration,
) -> Vec<Value> {
    let children: Vec<_> = ids
        .iter()
        .map(|&i| {
            let out = c.dir.path().join(format!("out{i}"));
            let child = c.nodes[i]
                .cmd(&["--json", "pull", reference, "--to", out.to_str().unwrap()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            std::thread::sleep(gap);
            child
        })
        .collect();
    children
        .into_iter()
        .zip(ids)
        .map(|(ch, i)| {
            let out = ch.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_same_tree(src, &c.dir.path().join(format!("out{i}")));
            serde_json::from_slice(&out.stdout).unwrap()
        })
        .collect()
}

/// The root of a version as `shoal publish --json` reports it (`b3:<hex>`), as bytes.
pub fn root_of(published: &Value) -> [u8; 32] {
    let mut root = [0u8; 32];
    hex::decode_to_slice(
        published["root"]
            .as_str()
            .expect("a root")
            .trim_start_matches("b3:"),
        &mut root,
    )
    .expect("a hex root");
    root
}

/// Starts nodes a, b, d and e and waits until each is connected to the other three.
pub fn four_connected_nodes(c: &mut Cluster) -> Vec<usize> {
    let ids: Vec<usize> = ["a", "b", "d", "e"]
        .iter()
        .map(|n| c.node(n, &[], &[]))
        .collect();
    for &i in &ids {
        c.nodes[i].wait_peers(3);
    }
    ids
}
