//! The dataset lifecycle at the origin, for real: `shoal rm` and `shoal origin gc` run by the
//! binary against a real origin while other processes publish and pull, gc killed with SIGKILL.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A version's tree: files shared by every version, and files of its own.
fn version_tree(root: &Path, n: u64) {
    for i in 0..6 {
        write(
            &root.join(format!("shared/s{i}")),
            &random_bytes(1000 + i, 200_000),
        );
    }
    for i in 0..4 {
        write(
            &root.join(format!("own/v{n}-{i}")),
            &random_bytes(n * 100 + i, 300_000),
        );
    }
}

/// Trees `t1..=tN` under the test's directory, version `n`'s at index `n - 1`.
fn version_trees(env: &Env, count: u64) -> Vec<PathBuf> {
    (1..=count)
        .map(|n| {
            let p = env.path(&format!("t{n}"));
            version_tree(&p, n);
            p
        })
        .collect()
}

/// Pack ids (`<id>.idx`, `<id>.pack`) present in a local origin.
fn pack_files(origin: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(Path::new(origin).join("packs"))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn versions(env: &Env) -> Vec<String> {
    strs(&env.json(&["versions", "demo"])["versions"], "version")
}

fn spawn(env: &Env, args: &[&str], log: &Path) -> Child {
    env.cmd(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// A deterministic pseudo-random sequence.
fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// One round of: `env` publishing `demo@v{publish}` from `trees`, `reader` pulling
/// `demo@v{pull}`, and `killed` (gc or repack) run by `env` and SIGKILLed after `after`, all at
/// once; the publish and the pull must succeed, and the pull be exact.
fn killed_round(
    env: &Env,
    reader: &Env,
    (trees, publish, pull): (&[PathBuf], usize, usize),
    killed: &[&str],
    round: u64,
    after: Duration,
) {
    let publisher = spawn(
        env,
        &[
            "publish",
            trees[publish - 1].to_str().unwrap(),
            &format!("demo@v{publish}"),
        ],
        &env.path(&format!("pub{round}.log")),
    );
    let dest = env.path(&format!("pull{round}"));
    let puller = spawn(
        reader,
        &[
            "pull",
            &format!("demo@v{pull}"),
            "--to",
            dest.to_str().unwrap(),
        ],
        &env.path(&format!("pull{round}.log")),
    );
    let mut victim = spawn(env, killed, &env.path(&format!("{}{round}.log", killed[1])));
    std::thread::sleep(after);
    // SIGKILL: no chance to tidy up.
    let _ = victim.kill();
    victim.wait().unwrap();
    for (mut c, what) in [(publisher, "pub"), (puller, "pull")] {
        let st = c.wait().unwrap();
        assert!(
            st.success(),
            "{what} in round {round}: {}",
            std::fs::read_to_string(env.path(&format!("{what}{round}.log"))).unwrap()
        );
    }
    assert_same_tree(&trees[pull - 1], &dest);
}

#[test]
fn removed_versions_are_refused_by_name_and_not_opened_from_caches() {
    let env = Env::new();
    let v1 = env.path("v1");
    version_tree(&v1, 1);
    let v2 = env.path("v2");
    version_tree(&v2, 2);
    env.json(&[
        "publish",
        v1.to_str().unwrap(),
        "demo@v1",
        "--tag",
        "latest",
    ]);
    env.json(&["publish", v2.to_str().unwrap(), "demo@v2"]);
    // Two machines that pulled v1 (each keeps a signed copy of the version).
    let reader = env.peer("reader");
    reader.json(&["trust", &env.key()]);
    reader.json(&["pull", "demo@v1", "--to", env.path("r1").to_str().unwrap()]);
    let other = env.peer("other");
    other.json(&["trust", &env.key()]);
    other.json(&["pull", "demo@v1", "--to", env.path("o1").to_str().unwrap()]);

    // A mirror of the dataset, made before the removal.
    let mirror = env.path("mirror");
    env.json(&[
        "replicate",
        "demo",
        "--all",
        "--to",
        mirror.to_str().unwrap(),
    ]);

    // A tag points at it: refused, and nothing changed.
    let err = env.fails(&["rm", "demo@v1"]);
    assert!(err.contains("latest") && err.contains("--force"), "{err}");
    assert_eq!(versions(&env), ["v1", "v2"]);

    let r = env.json(&["rm", "demo@v1", "--force", "--reason", "licence withdrawn"]);
    assert_eq!(r["tags_deleted"], serde_json::json!(["latest"]), "{r}");
    assert_eq!(r["already_removed"], false);
    assert_eq!(versions(&env), ["v2"]);
    env.fails(&[
        "pull",
        "demo@latest",
        "--to",
        env.path("x").to_str().unwrap(),
    ]);

    // Replicating the dataset again carries the removal to the mirror; a node reading the
    // mirror is refused the version with the same words.
    let r = env.json(&[
        "replicate",
        "demo",
        "--all",
        "--to",
        mirror.to_str().unwrap(),
    ]);
    assert_eq!(r["removals"], serde_json::json!(["demo@v1"]), "{r}");
    let again = env.json(&[
        "replicate",
        "demo",
        "--all",
        "--to",
        mirror.to_str().unwrap(),
    ]);
    assert_eq!(again["removals"], serde_json::json!([]), "{again}");
    let on_mirror = Env {
        dir: tempfile::tempdir().unwrap(),
        home: env.path("mirror-reader"),
        origin: mirror.display().to_string(),
        extra_env: Vec::new(),
    };
    on_mirror.json(&["trust", &env.key()]);
    let err = on_mirror.fails(&["pull", "demo@v1", "--no-files"]);
    assert!(err.contains("licence withdrawn"), "{err}");
    on_mirror.json(&["pull", "demo@v2", "--no-files"]);

    // A node that had it: refused with the record's words, by name.
    let err = reader.fails(&["pull", "demo@v1", "--to", env.path("r2").to_str().unwrap()]);
    assert!(
        err.contains("demo@v1 was removed") && err.contains("licence withdrawn"),
        "{err}"
    );
    // ... and it dropped its cached copy: with the origin unreachable it does not open it.
    let offline = |e: &Env| Env {
        dir: tempfile::tempdir().unwrap(),
        home: e.home.clone(),
        origin: format!("http://127.0.0.1:{}/", free_port()),
        extra_env: Vec::new(),
    };
    let err =
        offline(&reader).fails(&["pull", "demo@v1", "--to", env.path("r3").to_str().unwrap()]);
    assert!(!env.path("r3").join("own").exists(), "{err}");
    // The machine that never asked since still has its copy (it cannot know): it opens it,
    // which is what the test above would have seen without the removal being learnt.
    offline(&other).json(&["pull", "demo@v1", "--to", env.path("o2").to_str().unwrap()]);
    assert_same_tree(&v1, &env.path("o2"));

    // The name is never reused; removing again finishes (nothing left) and says so.
    let err = env.fails(&["publish", v2.to_str().unwrap(), "demo@v1"]);
    assert!(err.contains("never reused"), "{err}");
    let r = env.json(&["rm", "demo@v1"]);
    assert_eq!(r["already_removed"], true, "{r}");
    // Other versions are untouched.
    reader.json(&["pull", "demo@v2", "--to", env.path("r4").to_str().unwrap()]);
    assert_same_tree(&v2, &env.path("r4"));
    // A removal record signed by a key nobody trusts is no removal: plain "not found".
    let stranger = env.peer("stranger");
    let err = stranger.fails(&["pull", "demo@v1", "--to", env.path("s").to_str().unwrap()]);
    assert!(!err.contains("was removed"), "{err}");
}

#[test]
fn origin_gc_frees_what_no_version_needs_while_others_publish_and_pull() {
    let env = Env::new();
    std::fs::create_dir_all(&env.origin).unwrap();
    // A new origin nobody publishes to yet: a short grace at once (a publish must finish
    // within 0.9 of it: 4.5 s, ample for these trees even on a loaded machine).
    let g = env.json(&["origin", "gc", "--grace", "5s", "--apply-now"]);
    assert_eq!(g["grace_s"], 5, "{g}");
    let trees = version_trees(&env, 12);
    for n in 1..=3 {
        env.json(&[
            "publish",
            trees[n - 1].to_str().unwrap(),
            &format!("demo@v{n}"),
        ]);
    }
    // A publish killed after its first pack reached the origin: orphans.
    let big = env.path("big");
    for i in 0..5 {
        write(
            &big.join(format!("b{i}")),
            &random_bytes(7000 + i, 20 << 20),
        );
    }
    let before = pack_files(&env.origin).len();
    let mut p = spawn(
        &env,
        &["publish", big.to_str().unwrap(), "other@v1"],
        &env.path("big.log"),
    );
    let t = Instant::now();
    while pack_files(&env.origin)
        .iter()
        .filter(|f| f.ends_with(".idx"))
        .count()
        * 2
        <= before
    {
        assert!(t.elapsed() < Duration::from_secs(60), "no pack uploaded");
        assert!(
            p.try_wait().unwrap().is_none(),
            "the publish finished first"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    p.kill().unwrap();
    p.wait().unwrap();
    assert!(versions(&env).len() == 3);
    // Removing a version of demo frees nothing (its packs hold chunks later versions share);
    // a dataset of its own, removed, frees its packs.
    env.json(&["rm", "demo@v1"]);
    env.json(&["publish", trees[11].to_str().unwrap(), "solo@v1"]);
    env.json(&["rm", "solo@v1"]);

    // Everything is younger than the grace, or named by a recent removal: nothing goes.
    let dry = env.json(&["origin", "gc", "--dry-run"]);
    assert_eq!(dry["packs_deleted"], 0, "{dry}");
    assert!(dry["plan"]["young"].as_u64().unwrap() >= 1, "{dry}");
    assert!(
        dry["plan"]["recently_removed"].as_u64().unwrap() >= 1,
        "{dry}"
    );
    std::thread::sleep(Duration::from_millis(5500));
    let files = pack_files(&env.origin);
    let dry = env.json(&["origin", "gc", "--dry-run"]);
    // The killed publish's pack, and solo's packs (its files' and its tree's).
    assert!(dry["packs_deleted"].as_u64().unwrap() >= 3, "{dry}");
    assert!(dry["bytes_freed"].as_u64().unwrap() >= 20 << 20, "{dry}");
    assert_eq!(pack_files(&env.origin), files, "a dry run deletes nothing");

    // Rounds of: a publish of a new version, a pull of an old one, and a gc killed at a
    // random point, all at once.
    let reader = env.peer("reader");
    reader.json(&["trust", &env.key()]);
    let mut rand = xorshift(0x2545_f491_4f6c_dd1d);
    for round in 0..6u64 {
        killed_round(
            &env,
            &reader,
            (&trees, 4 + round as usize, 2),
            &["origin", "gc"],
            round,
            Duration::from_millis(rand() % 400),
        );
        // Sometimes let the grace pass, so that gc runs have something to delete.
        if round % 2 == 1 {
            std::thread::sleep(Duration::from_millis(5200));
        }
    }

    // Every version still visible pulls exactly; then a gc to the end frees the rest, and a
    // second one finds nothing.
    std::thread::sleep(Duration::from_millis(5500));
    let first = env.json(&["origin", "gc"]);
    let second = env.json(&["origin", "gc"]);
    assert_eq!(second["packs_deleted"], 0, "{first} then {second}");
    assert_eq!(second["plan"]["young"], 0, "{second}");
    let visible = versions(&env);
    assert_eq!(visible.len(), 2 + 6, "{visible:?}");
    let fresh = env.peer("fresh");
    fresh.json(&["trust", &env.key()]);
    let err = fresh.fails(&["pull", "solo@v1", "--no-files"]);
    assert!(err.contains("solo@v1 was removed"), "{err}");
    for v in &visible {
        let n: usize = v.trim_start_matches('v').parse().unwrap();
        let dest = env.path(&format!("final-{v}"));
        fresh.json(&["pull", &format!("demo@{v}"), "--to", dest.to_str().unwrap()]);
        assert_same_tree(&trees[n - 1], &dest);
    }
    // What is left is exactly what the versions name: every pack whole (index and data).
    let left = pack_files(&env.origin);
    let ids: std::collections::BTreeSet<&str> =
        left.iter().map(|f| f.split('.').next().unwrap()).collect();
    for id in &ids {
        assert!(
            left.contains(&format!("{id}.idx")) && left.contains(&format!("{id}.pack")),
            "{id} is not whole: {left:?}"
        );
    }
    assert_eq!(second["plan"]["live"], ids.len() as u64, "{second}");

    // Every version verifies at once, each pack read once; a damaged pack is named with the
    // versions that need it.
    let all = env.json(&["verify", "demo", "--all"]);
    assert_eq!(
        all["versions"].as_array().unwrap().len(),
        visible.len(),
        "{all}"
    );
    assert_eq!(all["packs"], ids.len() as u64, "{all}");
    let pack = first_pack(&env.origin);
    let mut bytes = std::fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&pack, bytes).unwrap();
    let err = env.fails(&["verify", "demo", "--all"]);
    assert!(err.contains("named by v"), "{err}");
}

#[test]
fn retention_rules_keep_exactly_what_they_say() {
    let env = Env::new();
    let trees = version_trees(&env, 5);
    for (i, t) in trees.iter().enumerate() {
        env.json(&["publish", t.to_str().unwrap(), &format!("demo@v{}", i + 1)]);
    }
    env.json(&["tag", "demo@v1", "golden"]);
    let r = env.json(&["origin", "retain", "demo"]);
    assert_eq!(r["rules"], serde_json::Value::Null, "{r}");
    env.json(&[
        "origin",
        "retain",
        "demo",
        "--keep-last",
        "2",
        "--keep-tagged",
    ]);
    let dry = env.json(&["origin", "gc", "--dry-run"]);
    assert_eq!(
        dry["retention_removed"],
        serde_json::json!(["demo@v2", "demo@v3"]),
        "{dry}"
    );
    assert_eq!(versions(&env), ["v1", "v2", "v3", "v4", "v5"]);
    let gc = env.json(&["origin", "gc"]);
    assert_eq!(gc["retention_removed"], dry["retention_removed"], "{gc}");
    assert_eq!(versions(&env), ["v1", "v4", "v5"]);
    let err = env.fails(&["pull", "demo@v2", "--no-files"]);
    assert!(
        err.contains("was removed") && err.contains("keep the last 2"),
        "{err}"
    );
    // Rules that keep everything present remove nothing; a stricter one removes the rest,
    // tags included (named).
    env.json(&["origin", "retain", "demo", "--keep-younger-than", "1h"]);
    let gc = env.json(&["origin", "gc"]);
    assert_eq!(gc["retention_removed"], serde_json::json!([]), "{gc}");
    env.json(&["origin", "retain", "demo", "--keep-last", "1"]);
    let gc = env.json(&["origin", "gc"]);
    assert_eq!(
        gc["retention_removed"],
        serde_json::json!(["demo@v1", "demo@v4"]),
        "{gc}"
    );
    assert_eq!(versions(&env), ["v5"]);
    env.fails(&["pull", "demo@golden", "--no-files"]);
    env.json(&["origin", "retain", "demo", "--clear"]);
    let r = env.json(&["origin", "retain", "demo"]);
    assert_eq!(r["rules"], serde_json::Value::Null, "{r}");
    // The last version still pulls exactly.
    let dest = env.path("v5-out");
    env.json(&["pull", "demo@v5", "--to", dest.to_str().unwrap()]);
    assert_same_tree(&trees[4], &dest);
}

#[test]
fn rm_gc_and_repack_work_on_an_s3_origin() {
    let (_server, vars) = moto();
    let mut env = Env::new();
    env.extra_env = vars;
    env.origin = "s3://shoal-test/lifecycle".into();
    let g = env.json(&["origin", "gc", "--grace", "4s", "--apply-now"]);
    assert_eq!(g["grace_s"], 4, "{g}");
    let trees = version_trees(&env, 3);
    env.json(&["publish", trees[0].to_str().unwrap(), "demo@v1"]);
    env.json(&["publish", trees[1].to_str().unwrap(), "demo@v2"]);
    env.json(&["publish", trees[2].to_str().unwrap(), "solo@v1"]);
    env.json(&["rm", "solo@v1"]);
    let dry = env.json(&["origin", "gc", "--dry-run"]);
    assert_eq!(dry["packs_deleted"], 0, "{dry}");
    std::thread::sleep(Duration::from_millis(4600));
    let gc = env.json(&["origin", "gc"]);
    assert!(gc["packs_deleted"].as_u64().unwrap() >= 2, "{gc}");
    assert!(gc["bytes_freed"].as_u64().unwrap() >= 2_000_000, "{gc}");
    let again = env.json(&["origin", "gc"]);
    assert_eq!(again["packs_deleted"], 0, "{again}");
    let fresh = env.peer("fresh");
    fresh.json(&["trust", &env.key()]);
    for (v, t) in [("v1", &trees[0]), ("v2", &trees[1])] {
        let dest = env.path(&format!("out-{v}"));
        fresh.json(&["pull", &format!("demo@{v}"), "--to", dest.to_str().unwrap()]);
        assert_same_tree(t, &dest);
    }
    let err = fresh.fails(&["pull", "solo@v1", "--no-files"]);
    assert!(err.contains("solo@v1 was removed"), "{err}");

    // Repack on S3: v1 removed leaves its pack half live (v2 reads the shared files).
    env.json(&["rm", "demo@v1"]);
    let r = env.json(&["origin", "repack", "demo", "--threshold", "0.6"]);
    assert!(!r["repacked"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["bytes_to_free"].as_u64().unwrap() >= 1_000_000, "{r}");
    std::thread::sleep(Duration::from_millis(4600));
    let gc = env.json(&["origin", "gc"]);
    assert!(gc["plan"]["retired"].as_u64().unwrap() >= 1, "{gc}");
    let late = env.peer("late");
    late.json(&["trust", &env.key()]);
    let dest = env.path("late-v2");
    late.json(&["pull", "demo@v2", "--to", dest.to_str().unwrap()]);
    assert_same_tree(&trees[1], &dest);
    let all = env.json(&["verify", "demo", "--all"]);
    assert_eq!(all["problems"].as_array().unwrap().len(), 0, "{all}");
}

/// Pack ids with a record of their repacking in a local origin.
fn repacked(origin: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(Path::new(origin).join("datasets/demo/_repacked"))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .filter(|n| !n.starts_with('.') && !n.contains('#'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn origin_repack_rewrites_sparse_packs_and_every_version_still_pulls() {
    let env = Env::new();
    std::fs::create_dir_all(&env.origin).unwrap();
    let g = env.json(&["origin", "gc", "--grace", "5s", "--apply-now"]);
    assert_eq!(g["grace_s"], 5, "{g}");
    let trees = version_trees(&env, 10);
    for n in 1..=4 {
        env.json(&[
            "publish",
            trees[n - 1].to_str().unwrap(),
            &format!("demo@v{n}"),
        ]);
    }
    // A node that read part of v3 before the repack: it keeps v3's pack indexes (and their
    // locator files) and will find a pack gone under it.
    let early = env.peer("early");
    early.json(&["trust", &env.key()]);
    let part = env.path("early-part");
    early.json(&[
        "pull",
        "demo@v3",
        "--include",
        "own/**",
        "--to",
        part.to_str().unwrap(),
    ]);
    // v1's pack holds the shared files (every version reads them) and v1's own (nobody, once
    // v1 is removed): half live.
    env.json(&["rm", "demo@v1"]);
    env.json(&["rm", "demo@v2"]);
    let files = pack_files(&env.origin);
    let dry = env.json(&[
        "origin",
        "repack",
        "demo",
        "--threshold",
        "0.6",
        "--dry-run",
    ]);
    let sparse: Vec<String> = strs(&dry["repacked"], "pack");
    assert!(!sparse.is_empty(), "{dry}");
    assert_eq!(dry["versions"], 2, "{dry}");
    assert!(dry["bytes_to_free"].as_u64().unwrap() >= 2_000_000, "{dry}");
    assert_eq!(pack_files(&env.origin), files, "a dry run writes nothing");
    assert!(repacked(&env.origin).is_empty());

    // Rounds of: a publish of a new version, a pull of v3 by another node, and a repack
    // killed at a random point, all at once.
    let reader = env.peer("reader");
    reader.json(&["trust", &env.key()]);
    let mut rand = xorshift(0x9e37_79b9_7f4a_7c15);
    for round in 0..3u64 {
        killed_round(
            &env,
            &reader,
            (&trees, 5 + round as usize, 3),
            &["origin", "repack", "demo", "--threshold", "0.6"],
            round,
            Duration::from_millis(rand() % 600),
        );
    }
    // Then to the end: every sparse pack has its record.
    env.json(&["origin", "repack", "demo", "--threshold", "0.6"]);
    let forwarded = repacked(&env.origin);
    for p in &sparse {
        assert!(forwarded.contains(p), "{p} not repacked: {forwarded:?}");
    }
    // The old packs stay for the grace period (a pull that opened them before the record
    // existed reads on).
    let kept = env.json(&["origin", "gc"]);
    assert_eq!(kept["plan"]["retired"], 0, "{kept}");
    std::thread::sleep(Duration::from_millis(5500));
    let first = env.json(&["origin", "gc"]);
    assert!(
        first["plan"]["retired"].as_u64().unwrap() >= sparse.len() as u64,
        "{first}"
    );
    assert!(
        first["bytes_freed"].as_u64().unwrap() >= 2_000_000,
        "{first}"
    );
    let second = env.json(&["origin", "gc"]);
    assert_eq!(second["packs_deleted"], 0, "{first} then {second}");
    let left = pack_files(&env.origin);
    for p in &sparse {
        assert!(
            !left.iter().any(|f| f.starts_with(p.as_str())),
            "{p} is still there: {left:?}"
        );
    }

    // Every version pulls exactly on a node that never saw the old packs, and on the node
    // whose cached locators still point into them.
    let visible = versions(&env);
    assert_eq!(visible.len(), 2 + 3, "{visible:?}");
    let fresh = env.peer("fresh");
    fresh.json(&["trust", &env.key()]);
    for v in &visible {
        let n: usize = v.trim_start_matches('v').parse().unwrap();
        let dest = env.path(&format!("final-{v}"));
        fresh.json(&["pull", &format!("demo@{v}"), "--to", dest.to_str().unwrap()]);
        assert_same_tree(&trees[n - 1], &dest);
    }
    let whole = env.path("early-whole");
    let out = early
        .cmd(&["pull", "demo@v3", "--to", whole.to_str().unwrap()])
        .env("SHOAL_LOG", "shoal_node=info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("was repacked into"),
        "the old pack was not followed: {log}"
    );
    assert_same_tree(&trees[2], &whole);
    let all = env.json(&["verify", "demo", "--all"]);
    assert_eq!(all["problems"].as_array().unwrap().len(), 0, "{all}");
    // Nothing is sparse any more.
    let again = env.json(&["origin", "repack", "demo", "--threshold", "0.6"]);
    assert_eq!(again["repacked"].as_array().unwrap().len(), 0, "{again}");

    // A publish that listed the dataset before a repack's record existed leans on the old
    // pack (here: the record hidden while it runs). gc then keeps that pack, whatever the
    // record's age, until a repack covers the new version too. v8, v9 and v10 share files
    // of their own; v8's pack holds them and v8's own files, half live once v8 is removed.
    for n in 8..=10 {
        for i in 0..4 {
            write(
                &trees[n - 1].join(format!("extra/e{i}")),
                &random_bytes(9000 + i, 300_000),
            );
        }
    }
    env.json(&["publish", trees[7].to_str().unwrap(), "demo@v8"]);
    env.json(&["publish", trees[8].to_str().unwrap(), "demo@v9"]);
    env.json(&["rm", "demo@v8"]);
    let made = env.json(&["origin", "repack", "demo", "--threshold", "0.6"]);
    let second_round: Vec<String> = strs(&made["repacked"], "pack");
    // v8's data pack (and perhaps a tree pack whose nodes v9 shares).
    let big = made["repacked"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|p| p["bytes"].as_u64())
        .unwrap();
    assert_eq!(big["bytes"], 2_400_000, "{made}");
    assert_eq!(big["live_bytes"], 1_200_000, "{made}");
    let big = big["pack"].as_str().unwrap().to_string();
    let hidden = env.path("hidden");
    std::fs::create_dir_all(&hidden).unwrap();
    let records = Path::new(&env.origin).join("datasets/demo/_repacked");
    for r in &second_round {
        std::fs::rename(records.join(r), hidden.join(r)).unwrap();
    }
    env.json(&["publish", trees[9].to_str().unwrap(), "demo@v10"]);
    for r in &second_round {
        std::fs::rename(hidden.join(r), records.join(r)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(5500));
    let held = env.json(&["origin", "gc"]);
    assert!(
        pack_files(&env.origin).contains(&format!("{big}.pack")),
        "{big} went although v10 leans on it: {held}"
    );
    let covered = env.json(&["origin", "repack", "demo", "--threshold", "0.6"]);
    assert!(
        strs(&covered["repacked"], "pack").contains(&big),
        "{covered}"
    );
    assert!(
        strs(&covered["repacked"], "why")
            .iter()
            .all(|w| w == "uncovered"),
        "{covered}"
    );
    std::thread::sleep(Duration::from_millis(5500));
    let gone = env.json(&["origin", "gc"]);
    assert!(gone["plan"]["retired"].as_u64().unwrap() >= 1, "{gone}");
    assert!(!pack_files(&env.origin).contains(&format!("{big}.pack")));
    let late = env.peer("late");
    late.json(&["trust", &env.key()]);
    for v in versions(&env) {
        let n: usize = v.trim_start_matches('v').parse().unwrap();
        let dest = env.path(&format!("late-{v}"));
        late.json(&["pull", &format!("demo@{v}"), "--to", dest.to_str().unwrap()]);
        assert_same_tree(&trees[n - 1], &dest);
    }
}
