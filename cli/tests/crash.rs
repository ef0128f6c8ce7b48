//! Crash tests that really crash: the real binary is killed with SIGKILL mid-publish and
//! mid-pull, and the invariants are checked afterwards.

mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn make_dataset(root: &Path) {
    for i in 0..24 {
        write(
            &root.join(format!("part-{i:02}.bin")),
            &random_bytes(40 + i, 3 << 20),
        );
    }
}

fn kill9(child: &mut std::process::Child) {
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

fn packs_in(origin: &str) -> usize {
    std::fs::read_dir(Path::new(origin).join("packs"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn kill_during_publish_leaves_no_visible_version_and_retry_succeeds() {
    let env = Env::new();
    let src = env.path("src");
    // About 150 MiB: three packs, so there is a moment with one pack stored and no version.
    for i in 0..20 {
        write(
            &src.join(format!("part-{i:02}.bin")),
            &random_bytes(70 + i, 15 << 19),
        );
    }
    let mut interrupted = 0;
    for i in 0..6u64 {
        // A dataset of its own each time, so that no run dedups against an earlier one.
        let dataset = format!("ds{i}");
        let name = format!("{dataset}@v1");
        let before = packs_in(&env.origin);
        let mut child = env
            .cmd(&["publish", src.to_str().unwrap(), &name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        if i % 2 == 0 {
            // Early, at a seeded pseudo-random moment: scanning, chunking or uploading.
            std::thread::sleep(Duration::from_millis(random_bytes(i, 1)[0] as u64 % 40));
        } else {
            // Right after the first pack of this publish lands: the version cannot exist yet.
            let deadline = Instant::now() + Duration::from_secs(60);
            while packs_in(&env.origin) == before
                && Instant::now() < deadline
                && child.try_wait().unwrap().is_none()
            {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        let finished = child.try_wait().unwrap().is_some();
        kill9(&mut child);
        // Killed before it created the origin directory (a loaded machine can take longer
        // than the sleep to start a process): nothing was written, nothing is visible.
        let visible = Path::new(&env.origin).exists()
            && !env.json(&["versions", &dataset])["versions"]
                .as_array()
                .unwrap()
                .is_empty();
        if !visible {
            assert!(
                !finished,
                "a finished publish must leave its version visible"
            );
            interrupted += 1;
            // The retry works and publishes exactly the source.
            env.json(&["publish", src.to_str().unwrap(), &name]);
        }
        let dest = env.path(&format!("out{i}"));
        env.json(&["pull", &name, "--to", dest.to_str().unwrap()]);
        assert_same_tree(&src, &dest);
        std::fs::remove_dir_all(&dest).unwrap();
    }
    assert!(
        interrupted >= 3,
        "only {interrupted} of 6 kills landed mid-publish; the test proved little"
    );
}

#[test]
fn kill_during_pull_then_pull_again_fetches_only_what_was_missing() {
    let env = Env::new();
    let src = env.path("src");
    make_dataset(&src);
    env.json(&["publish", src.to_str().unwrap(), "ds@v1"]);
    let total: u64 = 24 * (3 << 20);

    let other = env.peer("other");
    other.json(&["trust", &env.key()]);
    let dest = env.path("dest");
    // Kill once an origin range of file data (not only tree nodes) is durable: the pull logs it
    // after the index flush. What was stored but not yet flushed may be lost by the kill.
    let log = env.path("pull.log");
    let mut child = other
        .cmd(&["pull", "ds@v1", "--to", dest.to_str().unwrap()])
        .env("SHOAL_LOG", "warn,shoal_node::blobs=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while durable_range_bytes(&log) < 1 << 20
        && Instant::now() < deadline
        && child.try_wait().unwrap().is_none()
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let finished = child.try_wait().unwrap().is_some();
    kill9(&mut child);
    assert!(
        !finished,
        "the pull finished before it could be killed; make the dataset larger"
    );

    let r = other.json(&["pull", "ds@v1", "--to", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);
    let already = r["bytes_already_local"].as_u64().unwrap();
    let fetched = r["bytes_from_origin"].as_u64().unwrap();
    assert!(
        already > 0,
        "nothing verified before the kill was kept: {r}"
    );
    assert!(fetched < total, "the second run re-fetched everything: {r}");
    // Only what was missing: the two runs' local and fetched bytes cover the data once (tree
    // nodes and coalescing gaps add a little).
    assert!(already + fetched < total + total / 20, "{r}");
}

/// Bytes of the largest origin range a pull has logged as stored and flushed.
fn durable_range_bytes(log: &std::path::Path) -> u64 {
    let field = |l: &str, name: &str| -> Option<u64> {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("origin range stored") && l.contains("durable=true"))
        .filter_map(|l| Some(field(l, "stop")? - field(l, "start")?))
        .max()
        .unwrap_or(0)
}
