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
    let damaged = pack.file_stem().unwrap().to_string_lossy().to_string();
    assert!(
        !packs_in(&target).keys().any(|n| n.starts_with(&damaged)),
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

/// Writes a reader's config file naming its origins, nearest first.
fn config_origins(env: &Env, origins: &[(&str, Option<&str>)]) {
    let mut text = String::from("[node]\nregion = \"eu\"\nzone = \"eu-a\"\n");
    for (url, zone) in origins {
        text.push_str(&format!("\n[[origin]]\nurl = \"{url}\"\n"));
        if let Some(z) = zone {
            text.push_str(&format!("region = \"eu\"\nzone = \"{z}\"\n"));
        }
    }
    write(&env.home.join("config.toml"), text.as_bytes());
}

fn origin_bytes(report: &serde_json::Value, url: &str) -> u64 {
    report["origins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["origin"] == url)
        .unwrap_or_else(|| panic!("no {url} in {report}"))["bytes"]
        .as_u64()
        .unwrap()
}

#[test]
fn three_origins_at_once_each_alone_all_together_and_the_nearest_stopped_mid_pull() {
    let (_server, vars) = moto();
    let mut env = Env::new();
    env.extra_env = vars.clone();
    let src = env.path("src");
    for i in 0..12u64 {
        write(
            &src.join(format!("d{}/f{i}", i % 3)),
            &random_bytes(500 + i, 4 << 20),
        );
    }
    env.json(&[
        "publish",
        src.to_str().unwrap(),
        "demo@v1",
        "--tag",
        "latest",
    ]);
    // Publish to the local directory, replicate to S3 and to a directory nginx serves.
    let s3 = "s3://shoal-test/mirror";
    let web_dir = env.path("web");
    env.json(&["replicate", "demo@v1", "--to", s3]);
    env.json(&["replicate", "demo@v1", "--to", web_dir.to_str().unwrap()]);
    // The nearest origin is slow (4 MB/s a connection), so a pull is still under way when
    // it stops.
    let nginx = Nginx::start_with(web_dir.to_str().unwrap(), env.dir.path(), "limit_rate 4m;");
    let web = nginx.url();
    let local = env.origin.clone();

    // Each alone.
    for (i, origin) in [local.as_str(), s3, web.as_str()].iter().enumerate() {
        let r = reader(&env, &format!("alone{i}"), origin);
        let dest = env.path(&format!("alone{i}"));
        let p = r.json(&["pull", "demo@latest", "--to", dest.to_str().unwrap()]);
        assert_eq!(p["origins"].as_array().unwrap().len(), 1, "{p}");
        assert!(origin_bytes(&p, origin) >= 48 << 20, "{p}");
        assert_same_tree(&src, &dest);
    }

    // All three, from the config file, nginx labelled as in this node's zone: it serves
    // first; stopped once bytes arrive, the others finish the pull, exactly.
    let all = reader(&env, "all", "");
    config_origins(&all, &[(&web, Some("eu-a")), (s3, None), (&local, None)]);
    let mut all = all;
    all.origin = String::new();
    let dest = env.path("all");
    let child = all
        .cmd(&["--json", "pull", "demo@v1", "--to", dest.to_str().unwrap()])
        .env_remove("SHOAL_ORIGIN")
        .env("SHOAL_LOG", "shoal_node::origins=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stopped once reads of it are under way (the pull logs each origin read).
    let mut child = child;
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let web_url = web.clone();
    let log = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        let mut told = false;
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if !told && line.contains("origin read") && line.contains(&web_url) {
                let _ = tx.send(());
                told = true;
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("no read of the nearest origin within 60 s");
    std::thread::sleep(Duration::from_millis(500));
    nginx.stop();
    let out = child.wait_with_output().unwrap();
    let log = log.join().unwrap();
    assert!(
        out.status.success(),
        "the pull failed when its nearest origin stopped: {log}"
    );
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_same_tree(&src, &dest);
    assert!(
        log.contains("reading the range from another origin"),
        "reads under way at the stopped origin moved to another: {log}"
    );
    let (w, s, l) = (
        origin_bytes(&p, &web),
        origin_bytes(&p, s3),
        origin_bytes(&p, &local),
    );
    eprintln!(
        "nearest stopped mid-pull: nginx {w}, s3 {s}, local {l} bytes, {} s",
        p["seconds"]
    );
    assert!(
        s + l >= (48 << 20) - w.min(48 << 20),
        "the others finished the pull: {p}"
    );
    assert!(
        w + s + l <= p["bytes"].as_u64().unwrap() * 11 / 10,
        "each chunk read about once in all: {p}"
    );
}

#[test]
fn the_newest_valid_tag_of_any_origin_wins_and_bad_origins_get_one_line_each() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&[
        "publish",
        src.to_str().unwrap(),
        "demo@v1",
        "--tag",
        "latest",
    ]);
    let mirror = env.path("mirror");
    let m = mirror.to_str().unwrap();
    env.json(&["replicate", "demo@latest", "--to", m]);
    // The tag moves on at the primary; the mirror still says v1.
    write(&src.join("a/b/c.txt"), b"v2\n");
    env.json(&[
        "publish",
        src.to_str().unwrap(),
        "demo@v2",
        "--tag",
        "latest",
    ]);

    let r = reader(&env, "r", "");
    let nearest_first = ["--origin", m, "--origin", &env.origin];
    let mut args = nearest_first.to_vec();
    args.extend(["pull", "demo@latest", "--no-files"]);
    let p = r.json(&args);
    assert_eq!(
        p["version"], "demo@v2",
        "the newest tag wins, wherever it is: {p}"
    );
    // v2 is only at the primary: the mirror, though nearer, served none of it.
    assert_eq!(origin_bytes(&p, m), 0, "{p}");
    let mut args = nearest_first.to_vec();
    args.extend(["versions", "demo"]);
    let v = r.json(&args);
    let listed: Vec<&str> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["version"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["v1", "v2"], "{v}");
    assert_eq!(v["versions"][1]["tags"][0], "latest", "{v}");

    // The nearest origin's pack damaged: what does not verify is read again from the other.
    let pack = first_pack(m);
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&pack, bytes).unwrap();
    let mut damaged = reader(&env, "damaged", "");
    config_origins(&damaged, &[(m, Some("eu-a")), (&env.origin, None)]);
    damaged.origin = String::new();
    let dest = env.path("from-damaged");
    let p = damaged.json(&["pull", "demo@v1", "--to", dest.to_str().unwrap()]);
    let v1 = env.path("v1");
    env.json(&["pull", "demo@v1", "--to", v1.to_str().unwrap()]);
    assert_same_tree(&v1, &dest);
    assert!(origin_bytes(&p, m) > 0, "the nearest was read first: {p}");
    assert!(
        origin_bytes(&p, &env.origin) > 0,
        "the damaged range came from the other: {p}"
    );

    // An unreachable origin beside a good one: the pull goes on.
    let dead = "http://127.0.0.1:9/";
    let p = r.json(&[
        "--origin",
        dead,
        "--origin",
        &env.origin,
        "pull",
        "demo@v1",
        "--no-files",
    ]);
    assert_eq!(p["version"], "demo@v1");
    // Unreachable alone, misconfigured, listed twice, read-only: one line naming it.
    // (A node that never had the version: one that had it opens its kept signed copy.)
    let fresh = reader(&env, "fresh", "");
    let err = fresh.fails(&["--origin", dead, "pull", "demo@v1", "--no-files"]);
    assert!(
        err.contains("127.0.0.1:9") && err.trim().lines().count() == 1,
        "{err}"
    );
    let err = r.fails(&["--origin", "ftp://x/y", "pull", "demo@v1"]);
    assert!(
        err.contains("ftp://x/y") && err.contains("unsupported scheme"),
        "{err}"
    );
    let err = r.fails(&["--origin", m, "--origin", m, "pull", "demo@v1"]);
    assert!(err.contains(m) && err.contains("listed twice"), "{err}");
    let nginx = Nginx::start(m, env.dir.path());
    let err = env.fails(&[
        "--origin",
        &nginx.url(),
        "publish",
        src.to_str().unwrap(),
        "demo@v3",
    ]);
    assert!(
        err.contains(&nginx.url()) && err.trim().lines().count() == 1,
        "{err}"
    );
    let bad = reader(&env, "bad", "");
    write(
        &bad.home.join("config.toml"),
        format!("[[origin]]\nurl = \"{m}\"\nmax_requests = 0\n").as_bytes(),
    );
    let mut bad = bad;
    bad.origin = String::new();
    let err = bad.fails(&["versions", "demo"]);
    assert!(err.contains(m) && err.contains("max_requests"), "{err}");
}

/// Puts an object into moto with boto3 (installed with moto), signed as any S3 client does.
fn put_object(vars: &[(String, String)], bucket_key: &str, body: &[u8]) {
    let (bucket, key) = bucket_key.split_once('/').unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), body).unwrap();
    let script = "import sys, boto3\n\
        boto3.client('s3').upload_file(sys.argv[1], sys.argv[2], sys.argv[3])";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(file.path())
        .args([bucket, key])
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "putting {bucket_key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn publish_from_an_object_store_prefix_then_pull_exact() {
    let (_server, vars) = moto();
    let mut env = Env::new();
    env.extra_env = vars.clone();
    // The same files locally, to compare with what is pulled.
    let want = env.path("want");
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("a.bin", random_bytes(1, 3_000_000)),
        ("b/c.txt", b"hello from s3\n".to_vec()),
        ("b/d/e.bin", random_bytes(2, 200_000)),
        ("empty", Vec::new()),
    ];
    for (k, b) in &files {
        write(&want.join(k), b);
        put_object(&vars, &format!("shoal-test/raw/train/{k}"), b);
    }
    // A console's "folder" marker is not a file.
    put_object(&vars, "shoal-test/raw/train/b/", b"");
    let r = env.json(&["publish", "s3://shoal-test/raw/train", "ds@v1"]);
    assert_eq!(r["files"], 4, "{r}");
    assert_eq!(r["bytes"], 3_200_014, "{r}");
    let dest = env.path("dest");
    env.json(&["pull", "ds@v1", "--to", dest.to_str().unwrap()]);
    assert_same_tree(&want, &dest);

    // One object changes: the next version uploads about that much.
    let edited = random_bytes(3, 200_000);
    put_object(&vars, "shoal-test/raw/train/b/d/e.bin", &edited);
    write(&want.join("b/d/e.bin"), &edited);
    let r2 = env.json(&["publish", "s3://shoal-test/raw/train", "ds@v2"]);
    assert!(r2["new_bytes_uploaded"].as_u64().unwrap() < 400_000, "{r2}");
    let dest2 = env.path("dest2");
    env.json(&["pull", "ds@v2", "--to", dest2.to_str().unwrap()]);
    assert_same_tree(&want, &dest2);

    // Nothing there, and a key that is both a file and a directory: one line naming it.
    let err = env.fails(&["publish", "s3://shoal-test/nothing-here", "ds@v3"]);
    assert!(
        err.contains("s3://shoal-test/nothing-here") && err.contains("no objects"),
        "{err}"
    );
    put_object(&vars, "shoal-test/raw/bad/x", b"1");
    put_object(&vars, "shoal-test/raw/bad/x/y", b"2");
    let err = env.fails(&["publish", "s3://shoal-test/raw/bad", "ds@v3"]);
    assert!(
        err.contains("bad/x") && err.contains("cannot also be a directory"),
        "{err}"
    );
    assert_eq!(
        env.json(&["versions", "ds"])["versions"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

/// Bytes of pack objects (not indexes) in a local origin.
fn pack_bytes(origin: &Path) -> u64 {
    packs_in(origin)
        .iter()
        .filter(|(n, _)| n.ends_with(".pack"))
        .map(|(_, s)| s)
        .sum()
}

#[test]
fn in_place_from_a_directory_reads_the_files_where_they_are_and_names_a_changed_one() {
    let env = Env::new();
    let data = env.path("data");
    for i in 0..6u64 {
        write(
            &data.join(format!("f{i}.bin")),
            &random_bytes(40 + i, 1_000_000),
        );
    }
    write(&data.join("sub/g.txt"), b"text kept where it is\n");
    write(&data.join("empty"), b"");
    let r = env.json(&["publish", data.to_str().unwrap(), "ip@v1", "--in-place"]);
    let bytes = r["bytes"].as_u64().unwrap();
    assert_eq!(bytes, 6_000_022, "{r}");
    assert!(
        r["new_bytes_uploaded"].as_u64().unwrap() < bytes / 100,
        "only metadata is written to the origin: {r}"
    );
    assert!(pack_bytes(Path::new(&env.origin)) < bytes / 100);

    // Another machine pulls and mounts it: the bytes come from the directory, verified.
    let other = reader(&env, "other", &env.origin);
    let dest = env.path("dest");
    other.json(&["pull", "ip@v1", "--to", dest.to_str().unwrap()]);
    assert_same_tree(&data, &dest);

    // One source file changes after publish.
    write(&data.join("f3.bin"), &random_bytes(99, 1_000_000));
    let fresh = reader(&env, "fresh", &env.origin);
    let err = fresh.fails(&["pull", "ip@v1", "--no-files"]);
    assert!(
        err.contains("f3.bin") && err.contains("ip@v1") && err.contains("changed"),
        "{err}"
    );
    // Mounted, the changed file fails to read; the others read exactly.
    let mounter = reader(&env, "mounter", &env.origin);
    let mp = env.path("mp");
    let m = Mounted::start(&mounter, "ip@v1", &mp, &["--timeout", "5"]);
    assert_eq!(
        std::fs::read(mp.join("f0.bin")).unwrap(),
        std::fs::read(data.join("f0.bin")).unwrap()
    );
    assert_eq!(
        std::fs::read(mp.join("sub/g.txt")).unwrap(),
        b"text kept where it is\n"
    );
    let e = std::fs::read(mp.join("f3.bin")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(5), "EIO for the changed file: {e}");
    m.stop(&mounter);
    let log = std::fs::read_to_string(mounter.path("mount.log")).unwrap();
    assert!(log.contains("f3.bin") && log.contains("changed"), "{log}");

    // verify names it, and only it.
    let err = env.fails(&["verify", "ip@v1"]);
    assert!(err.contains("f3.bin") && !err.contains("f0.bin"), "{err}");
    let v = env.run(&["--json", "verify", "ip@v1"]);
    let doc: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(doc["changed"], serde_json::json!(["f3.bin"]), "{doc}");
}

#[test]
fn in_place_from_s3_then_an_overwritten_object_is_refused_by_name() {
    let (_server, vars) = moto();
    let mut env = Env::new();
    env.extra_env = vars.clone();
    let want = env.path("want");
    for (k, b) in [
        ("a.bin", random_bytes(7, 2_000_000)),
        ("d/b.bin", random_bytes(8, 300_000)),
    ] {
        write(&want.join(k), &b);
        put_object(&vars, &format!("shoal-test/data/{k}"), &b);
    }
    let r = env.json(&["publish", "s3://shoal-test/data", "s3ip@v1", "--in-place"]);
    assert!(r["new_bytes_uploaded"].as_u64().unwrap() < 23_000, "{r}");
    let other = reader(&env, "other", &env.origin);
    let dest = env.path("dest");
    other.json(&["pull", "s3ip@v1", "--to", dest.to_str().unwrap()]);
    assert_same_tree(&want, &dest);
    put_object(&vars, "shoal-test/data/d/b.bin", &random_bytes(9, 300_000));
    let fresh = reader(&env, "fresh", &env.origin);
    let err = fresh.fails(&["pull", "s3ip@v1", "--no-files"]);
    assert!(
        err.contains("s3://shoal-test/data/d/b.bin") && err.contains("s3ip@v1"),
        "{err}"
    );
}

#[test]
fn replicate_copy_sources_turns_an_in_place_version_into_packs_that_outlive_its_source() {
    let env = Env::new();
    let data = env.path("data");
    for i in 0..4u64 {
        write(
            &data.join(format!("f{i}.bin")),
            &random_bytes(60 + i, 1_500_000),
        );
    }
    write(&data.join("sub/t.txt"), b"kept where it lives\n");
    let r = env.json(&["publish", data.to_str().unwrap(), "ip@v1", "--in-place"]);
    let bytes = r["bytes"].as_u64().unwrap();
    let kept = env.path("kept");
    for rel in all_paths(&data) {
        let (from, to) = (data.join(&rel), kept.join(&rel));
        if from.is_file() {
            write(&to, &std::fs::read(&from).unwrap());
        }
    }
    let mirror = env.path("mirror");
    let to = mirror.to_str().unwrap();

    // Without --copy-sources the mirror names the same source objects: the version's
    // metadata pack and the indexes only.
    let r = env.json(&["replicate", "ip@v1", "--to", to]);
    assert_eq!(r["versions"][0]["created"], true, "{r}");
    assert_eq!(r["sources_copied"], 0, "{r}");
    assert!(
        r["pack_bytes_copied"].as_u64().unwrap() < bytes / 100,
        "{r}"
    );
    let pack_count = |m: &Path| packs_in(m).keys().filter(|n| n.ends_with(".pack")).count();
    assert_eq!(pack_count(&mirror), 1);

    // With it, the source bytes become a pack there, read from the source and verified;
    // nothing else is written again.
    let r = env.json(&["replicate", "ip@v1", "--to", to, "--copy-sources"]);
    assert_eq!(r["versions"][0]["created"], false, "{r}");
    assert_eq!(r["sources_copied"], 1, "{r}");
    assert_eq!(r["pack_bytes_copied"].as_u64().unwrap(), bytes, "{r}");
    let canonical = std::fs::canonicalize(&data).unwrap();
    assert_eq!(
        r["origins"][0]["origin"],
        canonical.to_str().unwrap(),
        "{r}"
    );
    assert_eq!(r["origins"][0]["bytes"].as_u64().unwrap(), bytes, "{r}");
    assert_eq!(pack_count(&mirror), 2);
    let again = env.json(&["replicate", "ip@v1", "--to", to, "--copy-sources"]);
    assert_eq!(again["bytes_written"], 0, "idempotent: {again}");

    // A source file changes: the original origin refuses it by name, the mirror still
    // serves the version exactly (pull and mount), from its copy.
    write(&data.join("f2.bin"), &random_bytes(99, 1_500_000));
    let fresh = reader(&env, "fresh", &env.origin);
    let err = fresh.fails(&["pull", "ip@v1", "--no-files"]);
    assert!(err.contains("f2.bin") && err.contains("changed"), "{err}");
    let far = reader(&env, "far", to);
    let dest = env.path("dest");
    let p = far.json(&["pull", "ip@v1", "--to", dest.to_str().unwrap()]);
    assert_same_tree(&kept, &dest);
    assert_eq!(p["origins"][0]["origin"], to, "{p}");
    assert!(
        p["origins"][0]["bytes"].as_u64().unwrap() >= bytes,
        "every byte from the mirror's copy: {p}"
    );
    let mounter = reader(&env, "mounter", to);
    let mp = env.path("mp");
    let m = Mounted::start(&mounter, "ip@v1", &mp, &["--timeout", "5"]);
    assert_eq!(
        std::fs::read(mp.join("f2.bin")).unwrap(),
        std::fs::read(kept.join("f2.bin")).unwrap()
    );
    m.stop(&mounter);
}
