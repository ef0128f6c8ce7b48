//! Several origins: copying versions between them (`shoal replicate`), and pulling from each.
//! Real stores only: local directories, nginx over HTTP, moto's S3 server.

mod common;
use common::*;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Pack objects (complete ones: not a local store's staging files) in a local origin, by name
/// with their sizes.
fn packs_in(origin: &Path) -> std::collections::BTreeMap<String, u64> {
    let Ok(dir) = std::fs::read_dir(origin.join("packs")) else {
        return Default::default();
    };
    dir.map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().to_string(), e))
        .filter(|(n, _)| n.ends_with(".pack") || n.ends_with(".idx"))
        .map(|(n, e)| (n, e.metadata().unwrap().len()))
        .collect()
}

/// A second machine reading only from `origin`, trusting `env`'s key.
fn reader(env: &Env, name: &str, origin: &str) -> Env {
    let mut r = env.peer(name);
    r.origin = origin.to_string();
    r.json(&["trust", &env.key()]);
    r
}

#[test]
fn replicate_copies_what_the_target_lacks_verified_incremental_and_idempotent() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    let v1 = env.json(&[
        "publish",
        src.to_str().unwrap(),
        "demo@v1",
        "--tag",
        "latest",
    ]);
    write(&src.join("many/f03"), b"edited in v2");
    write(&src.join("added.bin"), &random_bytes(7, 500_000));
    let v2 = env.json(&[
        "publish",
        src.to_str().unwrap(),
        "demo@v2",
        "--tag",
        "latest",
    ]);
    let target = env.path("mirror");
    let to = target.to_str().unwrap();

    // v1 alone: all its packs; the tag points at v2, which is not there, so it stays behind.
    let r = env.json(&["replicate", "demo@v1", "--to", to]);
    assert_eq!(r["versions"][0]["ref"], "demo@v1");
    assert_eq!(r["versions"][0]["created"], true);
    assert_eq!(r["packs_copied"], v1["packs_uploaded"], "{r}");
    assert_eq!(r["packs_present"], 0, "{r}");
    assert_eq!(r["tags"].as_array().unwrap().len(), 0, "{r}");
    let v1_pack_bytes = r["pack_bytes_copied"].as_u64().unwrap();
    assert!(v1_pack_bytes >= 3_000_000, "{r}");

    // v2 moves only its new packs, and the tag follows.
    let r = env.json(&["replicate", "demo@latest", "--to", to]);
    assert_eq!(r["versions"][0]["ref"], "demo@v2");
    assert_eq!(r["versions"][0]["created"], true);
    assert_eq!(r["packs_copied"], v2["packs_uploaded"], "{r}");
    assert_eq!(
        r["packs_present"].as_u64().unwrap(),
        r["packs"].as_u64().unwrap() - v2["packs_uploaded"].as_u64().unwrap()
    );
    assert!(
        r["pack_bytes_copied"].as_u64().unwrap() < v1_pack_bytes / 2,
        "v2 copied {} pack bytes; v1 had {v1_pack_bytes}",
        r["pack_bytes_copied"]
    );
    assert_eq!(r["tags"][0], "demo@latest -> v2", "{r}");

    // Again: nothing to do, nothing written.
    let r = env.json(&["replicate", "demo@v1", "demo@v2", "--to", to]);
    assert_eq!(r["packs_copied"], 0, "{r}");
    assert_eq!(r["bytes_written"], 0, "{r}");
    assert!(r["versions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["created"] == false));

    // The mirror alone serves both versions and the tag, exactly; so does nginx serving it.
    let other = reader(&env, "other", to);
    let dest = env.path("from-mirror");
    let p = other.json(&["pull", "demo@latest", "--to", dest.to_str().unwrap()]);
    assert_eq!(p["version"], "demo@v2");
    assert_same_tree(&src, &dest);
    let nginx = Nginx::start(to, env.dir.path());
    let web = reader(&env, "web", &nginx.url());
    let dest1 = env.path("v1-over-http");
    web.json(&["pull", "demo@v1", "--to", dest1.to_str().unwrap()]);
    let orig1 = env.path("v1-from-origin");
    env.json(&["pull", "demo@v1", "--to", orig1.to_str().unwrap()]);
    assert_same_tree(&orig1, &dest1);

    // A read-only target, the source itself, and a version that is not there: one line each.
    let err = env.fails(&["replicate", "demo@v1", "--to", &nginx.url()]);
    assert!(
        err.contains("read-only") && err.contains(&nginx.url()),
        "{err}"
    );
    let err = env.fails(&["replicate", "demo@v1", "--to", &env.origin]);
    assert!(err.contains("read from"), "{err}");
    let err = env.fails(&["replicate", "demo@v9", "--to", to]);
    assert!(err.contains("demo@v9") && err.lines().count() == 1, "{err}");
    // --all takes dataset names.
    let err = env.fails(&["replicate", "demo@v1", "--all", "--to", to]);
    assert!(err.contains("dataset name"), "{err}");
}

#[test]
fn replicate_refuses_a_damaged_source_pack_and_writes_none_of_it() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "demo@v1"]);
    // One byte of the pack flipped at the origin: its index still matches its id.
    let pack = first_pack(&env.origin);
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&pack, bytes).unwrap();
    let target = env.path("mirror");
    let err = env.fails(&["replicate", "demo@v1", "--to", target.to_str().unwrap()]);
    assert!(
        err.contains("do not match its id") && err.contains("in origin"),
        "{err}"
    );
    assert!(
        packs_in(&target).is_empty(),
        "nothing of a damaged pack is written: {:?}",
        packs_in(&target)
    );
    assert!(!target.join("datasets/demo/_versions/v1").exists());
}

#[test]
fn replicate_killed_mid_copy_resumes_without_copying_a_pack_twice() {
    let env = Env::new();
    let src = env.path("src");
    // About 290 MB of distinct data: five packs of 64 MiB or less.
    for i in 0..6u64 {
        write(
            &src.join(format!("f{i}")),
            &random_bytes(1000 + i, 48 << 20),
        );
    }
    let v = env.json(&["publish", src.to_str().unwrap(), "big@v1"]);
    let total_packs = v["packs_uploaded"].as_u64().unwrap();
    assert!(total_packs >= 4, "{v}");
    let source: std::collections::BTreeMap<String, u64> = packs_in(Path::new(&env.origin));
    let total_bytes: u64 = source
        .iter()
        .filter(|(n, _)| n.ends_with(".pack"))
        .map(|(_, s)| s)
        .sum();

    let target = env.path("mirror");
    let to = target.to_str().unwrap();
    let mut child = env
        .cmd(&["replicate", "big@v1", "--to", to])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed as soon as the first object lands at the target: packs in flight, none indexed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let any = std::fs::read_dir(target.join("packs"))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if any {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "replicate ended before anything was written"
        );
        assert!(Instant::now() < deadline, "nothing written in 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!target.join("datasets/big/_versions/v1").exists());

    // What the killed run left whole: packs of the source's size, indexed or not.
    let left = packs_in(&target);
    let whole: Vec<&String> = left
        .iter()
        .filter(|(n, s)| n.ends_with(".pack") && source.get(*n) == Some(s))
        .map(|(n, _)| n)
        .collect();
    let whole_bytes: u64 = whole.iter().map(|n| source[*n]).sum();

    let r = env.json(&["replicate", "big@v1", "--to", to]);
    assert_eq!(r["versions"][0]["created"], true, "{r}");
    assert_eq!(
        r["packs_copied"].as_u64().unwrap(),
        total_packs - whole.len() as u64,
        "the rerun copies exactly the packs the killed run had not written whole: {r}"
    );
    assert_eq!(
        r["pack_bytes_copied"].as_u64().unwrap(),
        total_bytes - whole_bytes,
        "{r}"
    );
    assert!(
        r["packs_copied"].as_u64().unwrap() >= 1,
        "killed too late to test anything: {r}"
    );
    assert_eq!(
        packs_in(&target)
            .iter()
            .filter(|(n, _)| n.ends_with(".pack") || n.ends_with(".idx"))
            .collect::<Vec<_>>(),
        source.iter().collect::<Vec<_>>(),
        "the mirror holds the source's packs and indexes, byte for byte in size"
    );

    let other = reader(&env, "other", to);
    let dest = env.path("dest");
    other.json(&["pull", "big@v1", "--to", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);
}

#[test]
fn replicate_every_version_into_s3_and_pull_from_there() {
    let (_server, vars) = moto();
    let mut env = Env::new();
    env.extra_env = vars.clone();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "demo@v1"]);
    write(&src.join("a/b/c.txt"), b"v2 text\n");
    env.json(&[
        "publish",
        src.to_str().unwrap(),
        "demo@v2",
        "--tag",
        "latest",
    ]);
    let s3 = "s3://shoal-test/mirror";
    let r = env.json(&["replicate", "demo", "--all", "--to", s3]);
    let refs: Vec<&str> = r["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["ref"].as_str().unwrap())
        .collect();
    assert_eq!(refs, ["demo@v1", "demo@v2"]);
    assert_eq!(r["tags"][0], "demo@latest -> v2", "{r}");
    let again = env.json(&["replicate", "demo", "--all", "--to", s3]);
    assert_eq!(again["bytes_written"], 0, "{again}");

    let other = reader(&env, "other", s3);
    let dest = env.path("dest");
    let p = other.json(&["pull", "demo@latest", "--to", dest.to_str().unwrap()]);
    assert_eq!(p["version"], "demo@v2");
    assert_same_tree(&src, &dest);
    assert_eq!(
        other.json(&["versions", "demo"])["versions"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
