//! The container image (scripts/image.sh) as a cluster would run it: three node containers
//! on one podman network, found through one shared DNS name (as the Kubernetes headless
//! Service gives them), a private cluster (the key mounted read-only), the origin a volume.
//! One pulls from the origin, the next from its peers, the third mounts the version with
//! FUSE inside its container; every byte checked on the host.

mod common;

use common::{assert_same_tree, random_bytes, write, Env, BIN};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// podman as this machine runs it (crun refuses its cgroup v1 layout; explicit ulimits).
fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("podman (the README's test command installs it)")
}

fn ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The image, network and containers of one test; removed on drop, pass or fail.
struct Podman {
    tag: String,
    image: String,
    containers: Vec<String>,
}

impl Drop for Podman {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = podman(&["rm", "-f", "-t", "0", c]);
        }
        let _ = podman(&["network", "rm", "-f", &self.tag]);
        let _ = podman(&["rmi", "-f", &self.image]);
    }
}

fn exec_json(c: &str, args: &[&str]) -> Value {
    let mut a = vec!["exec", c, "shoal", "--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(&a)).unwrap()
}

fn connected(c: &str) -> usize {
    let out = podman(&["exec", c, "shoal", "--json", "status"]);
    if !out.status.success() {
        return 0;
    }
    let s: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    s["peers"]
        .as_array()
        .map(|p| p.iter().filter(|p| p["connected"] == true).count())
        .unwrap_or(0)
}

#[test]
fn the_image_runs_a_private_cluster_that_pulls_from_peers_and_mounts() {
    let tag = format!("shoal-test-{}", std::process::id());
    let mut pm = Podman {
        image: format!("localhost/{tag}:latest"),
        tag: tag.clone(),
        containers: vec![],
    };
    // The image, from the binary under test.
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/image.sh"))
        .env("SHOAL_BIN", BIN)
        .env("SHOAL_IMAGE", &pm.image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/image.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A version at a directory origin, published on the host.
    let env = Env::new();
    let data = env.path("data");
    common::sample_tree(&data);
    write(&data.join("shards/s0.bin"), &random_bytes(7, 6_000_000));
    env.json(&["publish", data.to_str().unwrap(), "ds@v1"]);
    let trusted = env.key();
    let keys = env.path("cluster");
    std::fs::create_dir_all(&keys).unwrap();
    common::keygen(&keys.join("cluster.key"));

    ok(&["network", "create", &tag]);
    let ulimits = [
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1000:1000",
    ];
    let names: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| format!("{tag}-{n}"))
        .collect();
    for name in &names {
        let out_dir = env.path(&format!("out-{name}"));
        std::fs::create_dir_all(&out_dir).unwrap();
        let volumes = [
            format!("{}:/origin:ro", env.origin),
            format!("{}:/etc/shoal/cluster:ro", keys.display()),
            format!("{}:/out", out_dir.display()),
        ];
        let mut args: Vec<String> = [
            "--runtime",
            "runc",
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &tag,
            "--network-alias",
            "shoal-peers",
            "--device",
            "/dev/fuse",
            "--cap-add",
            "SYS_ADMIN",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(ulimits.iter().map(|s| s.to_string()));
        for v in &volumes {
            args.extend(["-v".to_string(), v.clone()]);
        }
        args.extend(
            [
                "-e",
                "SHOAL_ORIGIN=/origin",
                "-e",
                &format!("SHOAL_TRUSTED_KEYS={trusted}"),
                &pm.image,
                "node",
                "run",
                "--no-mdns",
                "--listen",
                "/ip4/0.0.0.0/tcp/4001",
                "--bootstrap",
                "/dns4/shoal-peers/tcp/4001",
                "--cluster-key",
                "/etc/shoal/cluster/cluster.key",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&refs);
        pm.containers.push(name.clone());
    }
    // Each finds the others through the shared name (which may first resolve to itself),
    // then through peer exchange.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let seen: Vec<usize> = names.iter().map(|n| connected(n)).collect();
        if seen.iter().all(|&n| n == 2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "containers not meshed within 60 s: {seen:?}; logs of the first: {}",
            String::from_utf8_lossy(&podman(&["logs", &names[0]]).stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }

    let size: u64 = exec_json(&names[0], &["pull", "ds@v1", "--to", "/out/ds"])["bytes"]
        .as_u64()
        .unwrap_or(0);
    assert_same_tree(&data, &env.path(&format!("out-{}/ds", names[0])));
    let second = exec_json(&names[1], &["pull", "ds@v1", "--to", "/out/ds"]);
    assert_same_tree(&data, &env.path(&format!("out-{}/ds", names[1])));
    let from_peers = second["bytes_from_peers"].as_u64().unwrap();
    let from_origin = second["bytes_from_origin"].as_u64().unwrap();
    assert!(
        from_peers >= 9_000_000 && from_origin < 1_000_000,
        "the second container read {from_peers} bytes from peers, {from_origin} from the origin (version {size}): {second}"
    );

    // FUSE inside the third container, copied out through the shared volume.
    ok(&["exec", &names[2], "mkdir", "-p", "/mnt/ds"]);
    ok(&[
        "exec", "-d", &names[2], "shoal", "mount", "ds@v1", "/mnt/ds",
    ]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = podman(&["exec", &names[2], "cat", "/mnt/ds/a/b/c.txt"]);
        if out.status.success() && out.stdout == b"hello shoal\n" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the mount in the container did not serve within 30 s: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    ok(&["exec", &names[2], "cp", "-a", "/mnt/ds", "/out/mounted"]);
    assert_same_tree(&data, &env.path(&format!("out-{}/mounted", names[2])));
    ok(&["exec", &names[2], "shoal", "unmount", "/mnt/ds"]);
    // Written by root in the containers: removed by the test (it runs as root too).
}
