//! A hostile or broken origin: every attack is refused with its error and nothing is written
//! outside the destination (or, for corrupt data, nothing at all).

mod common;
use common::*;
use shoal_registry::pack::PackBuilder;
use shoal_registry::tree::{ChunkRef, Dir, Entry, EntryKind, FileContent};
use shoal_registry::{Origin, Params, SecretKey, SignedVersion, Stats, VersionBody};

fn publisher_key(env: &Env) -> SecretKey {
    env.key(); // creates it
    let text = std::fs::read_to_string(env.home.join("publisher.key")).unwrap();
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed).unwrap();
    SecretKey::from_bytes(seed)
}

/// Writes a version whose root is `dir` (plus a chunk with `payload`) straight into the
/// origin, signed with `key`, bypassing every check `shoal publish` makes.
fn forge(
    env: &Env,
    version: &str,
    entries: Vec<Entry>,
    payload: &[u8],
    key: &SecretKey,
    signature: Option<Vec<u8>>,
) {
    forge_with(env, version, entries, payload, &[], key, signature)
}

/// [`forge`], with more blobs (encoded subdirectory nodes) in the version's pack.
fn forge_with(
    env: &Env,
    version: &str,
    entries: Vec<Entry>,
    payload: &[u8],
    blobs: &[Vec<u8>],
    key: &SecretKey,
    signature: Option<Vec<u8>>,
) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let origin = Origin::open(&env.origin, true).unwrap();
        let dir = Dir { entries };
        let dir_bytes = dir.encode();
        let root = shoal_chunker::hash(&dir_bytes);
        let mut pack = PackBuilder::default();
        pack.push(
            shoal_chunker::hash(payload),
            bytes::Bytes::copy_from_slice(payload),
        );
        pack.push(root, dir_bytes.into());
        for b in blobs {
            pack.push(shoal_chunker::hash(b), bytes::Bytes::copy_from_slice(b));
        }
        let sealed = pack.seal();
        origin
            .put_pack(&sealed.id, sealed.parts, sealed.index_bytes.into())
            .await
            .unwrap();
        let body = VersionBody {
            dataset: "evil".into(),
            version: version.into(),
            root,
            packs: vec![sealed.id],
            chunking: Params::default(),
            created_unix: 0,
            stats: Stats::default(),
            publisher: [0; 32],
        };
        let mut signed = SignedVersion::sign(body, key);
        if let Some(sig) = signature {
            signed = signed.with_signature(sig);
        }
        origin
            .create_version(&"evil".parse().unwrap(), &signed)
            .await
            .unwrap();
    });
}

fn file_entry(name: &str, payload: &[u8]) -> Entry {
    Entry {
        name: name.into(),
        mode: 0o644,
        kind: EntryKind::File {
            size: payload.len() as u64,
            content: FileContent::Chunks(vec![ChunkRef {
                id: shoal_chunker::hash(payload),
                len: payload.len() as u32,
            }]),
        },
    }
}

#[test]
fn path_tricks_in_tree_nodes_are_refused() {
    let env = Env::new();
    let key = publisher_key(&env);
    let payload = b"owned";
    forge(
        &env,
        "dotdot",
        vec![file_entry("../x", payload)],
        payload,
        &key,
        None,
    );
    forge(
        &env,
        "parent",
        vec![file_entry("..", payload)],
        payload,
        &key,
        None,
    );
    forge(
        &env,
        "nul",
        vec![file_entry("a\0b", payload)],
        payload,
        &key,
        None,
    );
    let link = Entry {
        name: "l".into(),
        mode: 0o777,
        kind: EntryKind::Symlink {
            target: "../../etc/passwd".into(),
        },
    };
    forge(
        &env,
        "symlink",
        vec![file_entry("a", payload), link],
        payload,
        &key,
        None,
    );

    let work = env.path("work");
    std::fs::create_dir_all(&work).unwrap();
    for (v, why) in [
        ("dotdot", "name contains '/'"),
        ("parent", "'.' and '..' are not entry names"),
        ("nul", "name contains NUL"),
        ("symlink", "points outside the dataset"),
    ] {
        let dest = work.join("dest");
        let err = env.fails(&["pull", &format!("evil@{v}"), "--to", dest.to_str().unwrap()]);
        assert!(
            err.contains(why) && err.contains("directory node"),
            "{v}: {err}"
        );
        assert!(
            all_paths(&work).iter().all(|p| p == "dest"),
            "{v}: wrote {:?}",
            all_paths(&work)
        );
    }
    assert!(!env.dir.path().join("x").exists());
}

#[test]
fn unsigned_forged_and_untrusted_versions_are_refused() {
    let env = Env::new();
    let key = publisher_key(&env);
    forge(
        &env,
        "unsigned",
        vec![file_entry("a", b"1")],
        b"1",
        &key,
        Some(Vec::new()),
    );
    forge(
        &env,
        "forged",
        vec![file_entry("a", b"1")],
        b"1",
        &key,
        Some(vec![7; 64]),
    );
    for v in ["unsigned", "forged"] {
        let err = env.fails(&["pull", &format!("evil@{v}"), "--no-files"]);
        assert!(err.contains("invalid signature"), "{v}: {err}");
    }

    // A version published by a key this machine does not trust.
    let stranger = env.peer("stranger");
    let src = env.path("src");
    sample_tree(&src);
    stranger.json(&["publish", src.to_str().unwrap(), "theirs@v1"]);
    let their_key = stranger.key();
    let err = env.fails(&["pull", "theirs@v1", "--no-files"]);
    assert!(
        err.contains(&their_key) && err.contains("not a trusted key"),
        "{err}"
    );
    assert!(
        err.contains(&format!("shoal trust {their_key}")),
        "the error says what to do: {err}"
    );
    env.json(&["trust", &their_key]);
    env.json(&["pull", "theirs@v1", "--no-files"]);
}

#[test]
fn corrupt_pack_bytes_are_caught_and_nothing_is_written() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "demo@v1"]);
    let pack = first_pack(&env.origin);
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[1_000_000] ^= 0x40; // inside big.bin's chunks
    std::fs::write(&pack, &bytes).unwrap();

    let other = env.peer("other");
    other.json(&["trust", &env.key()]);
    let dest = env.path("dest");
    let err = other.fails(&["pull", "demo@v1", "--to", dest.to_str().unwrap()]);
    assert!(
        err.contains("do not match its id") && err.contains(".pack"),
        "{err}"
    );
    assert!(
        !dest.exists(),
        "a pull with corrupt data must not write files"
    );

    // Repaired origin: the retry fetches only what it had not verified yet.
    bytes[1_000_000] ^= 0x40;
    std::fs::write(&pack, &bytes).unwrap();
    let r = other.json(&["pull", "demo@v1", "--to", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);
    assert!(
        r["bytes_from_origin"].as_u64().unwrap() < r["bytes"].as_u64().unwrap(),
        "resumed: {r}"
    );
}

#[test]
fn origin_losing_a_pack_mid_pull_is_reported_and_resumable() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "demo@v1"]);
    let pack = first_pack(&env.origin);
    let hidden = pack.with_extension("hidden");
    // The index is still there (the tree and chunk locations resolve), the data is not.
    std::fs::rename(&pack, &hidden).unwrap();
    let dest = env.path("dest");
    let err = env.fails(&["pull", "demo@v1", "--to", dest.to_str().unwrap()]);
    assert!(
        err.contains(pack.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    std::fs::rename(&hidden, &pack).unwrap();
    env.json(&["pull", "demo@v1", "--to", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);
}

#[test]
fn full_destination_disk_fails_cleanly() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "demo@v1"]);
    let mnt = env.path("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(
        ok.success(),
        "this test needs root to mount a 1 MiB tmpfs at {}",
        mnt.display()
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let dest = mnt.join("dest");
    let err = env.fails(&["pull", "demo@v1", "--to", dest.to_str().unwrap()]);
    assert!(
        err.contains("No space left on device") && err.contains(dest.to_str().unwrap()),
        "{err}"
    );
    // No half-written file is left, under a final name or in the staging directory.
    for p in all_paths(&dest) {
        assert!(!p.contains(".shoal-staging."), "temporary file left: {p}");
    }
}

fn tag_object(env: &Env, dataset: &str, tag: &str) -> std::path::PathBuf {
    std::path::Path::new(&env.origin)
        .join("datasets")
        .join(dataset)
        .join("_tags")
        .join(tag)
}

#[test]
fn rolled_back_frozen_unsigned_and_out_of_scope_tags_are_refused() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "ds@v1", "--tag", "latest"]);
    let old_tag = std::fs::read(tag_object(&env, "ds", "latest")).unwrap();
    write(&src.join("new.txt"), b"v2");
    env.json(&["publish", src.to_str().unwrap(), "ds@v2", "--tag", "latest"]);
    let new_tag = std::fs::read(tag_object(&env, "ds", "latest")).unwrap();

    let trainer = env.peer("trainer");
    trainer.json(&["trust", &env.key()]);
    let r = trainer.json(&["pull", "ds@latest", "--no-files"]);
    assert_eq!(r["version"], "ds@v2");

    // Rollback: the old tag object put back. A node that saw the newer one refuses it.
    std::fs::write(tag_object(&env, "ds", "latest"), &old_tag).unwrap();
    let err = trainer.fails(&["pull", "ds@latest", "--no-files"]);
    assert!(
        err.contains("rolled back")
            && err.contains("ds@latest")
            && err.contains("older than sequence"),
        "{err}"
    );
    std::fs::write(tag_object(&env, "ds", "latest"), &new_tag).unwrap();
    trainer.json(&["pull", "ds@latest", "--no-files"]);

    // Freeze: a node told a maximum tag age refuses a tag nobody re-signed since.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let mut frozen = trainer.cmd(&["pull", "ds@latest", "--no-files"]);
    let out = frozen.env("SHOAL_MAX_TAG_AGE", "1s").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("maximum tag age"),
        "{err}"
    );
    let ok = trainer
        .cmd(&["pull", "ds@latest", "--no-files"])
        .env("SHOAL_MAX_TAG_AGE", "1h")
        .output()
        .unwrap();
    assert!(ok.status.success());

    // An unsigned tag (as written before tags were signed) is refused, with the fix; the
    // publisher re-signing it moves it past every sequence a node saw.
    let unsigned = shoal_registry::Tag {
        version: "v1".into(),
        updated_unix: 1,
    };
    std::fs::write(tag_object(&env, "ds", "latest"), unsigned.encode()).unwrap();
    let err = trainer.fails(&["pull", "ds@latest", "--no-files"]);
    assert!(
        err.contains("unsigned") && err.contains("shoal tag ds@v1 latest"),
        "{err}"
    );
    let listed = trainer.json(&["versions", "ds"]);
    assert!(
        listed["versions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["tags"].as_array().unwrap().is_empty()),
        "an unsigned tag is not listed: {listed}"
    );
    env.json(&["tag", "ds@v1", "latest"]);
    let r = trainer.json(&["pull", "ds@latest", "--no-files"]);
    assert_eq!(r["version"], "ds@v1");

    // A key trusted only for other datasets signs nothing here: versions and tags alike.
    let scoped = env.peer("scoped");
    scoped.json(&["trust", &env.key(), "--datasets", "org/*"]);
    for reference in ["ds@v1", "ds@latest"] {
        let err = scoped.fails(&["pull", reference, "--no-files"]);
        assert!(
            err.contains("trusted only for datasets org/*")
                && err.contains("not ds")
                && err.contains(&env.key()),
            "{reference}: {err}"
        );
    }
    scoped.json(&["trust", &env.key(), "--datasets", "org/*,ds"]);
    scoped.json(&["pull", "ds@latest", "--no-files"]);
}

/// Peak resident set of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

#[test]
fn oversized_origin_objects_are_refused_unread() {
    let env = Env::new();
    let src = env.path("src");
    sample_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "ds@v1", "--tag", "latest"]);
    let versions = std::path::Path::new(&env.origin).join("datasets/ds/_versions");
    // Sparse: 2 GiB of nothing, as a hostile origin would serve it.
    let huge = std::fs::File::create(versions.join("huge")).unwrap();
    huge.set_len(2 << 30).unwrap();
    let tag = std::fs::File::create(tag_object(&env, "ds", "big")).unwrap();
    tag.set_len(1 << 30).unwrap();

    // Through a daemon, whose memory is what a hostile origin would aim at.
    let node = env.peer("node");
    node.json(&["trust", &env.key()]);
    let mut daemon = node
        .cmd(&["node", "run", "--no-mdns"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !node.run(&["status"]).status.success() {
        assert!(std::time::Instant::now() < deadline, "daemon did not start");
        assert!(daemon.try_wait().unwrap().is_none(), "daemon exited");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let pid = daemon.id();
    let daemon = Kill(daemon);
    for (args, what) in [
        (vec!["pull", "ds@huge", "--no-files"], "_versions/huge"),
        (vec!["versions", "ds"], "_versions/huge"),
        (vec!["pull", "ds@big", "--no-files"], "_tags/big"),
    ] {
        let err = node.fails(&args);
        assert!(
            err.contains("larger than a")
                && err.contains(what)
                && err.contains("refusing to read it"),
            "{args:?}: {err}"
        );
    }
    let peak = peak_rss(pid);
    assert!(peak < 128 << 20, "daemon peaked at {} MiB", peak >> 20);
    node.json(&["pull", "ds@v1", "--no-files"]);
    drop(daemon);

    // A pack index larger than any may be: refused by name, before it is read.
    let idx = first_pack(&env.origin).with_extension("idx");
    std::fs::File::create(&idx)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    let fresh = env.peer("fresh");
    fresh.json(&["trust", &env.key()]);
    let err = fresh.fails(&["pull", "ds@v1", "--no-files"]);
    assert!(
        err.contains("larger than a pack index may be") && err.contains(".idx"),
        "{err}"
    );
}

#[test]
fn a_pull_writes_exactly_the_tree_whatever_its_names() {
    let env = Env::new();
    let src = env.path("src");
    // Names a pull's own temporary files might have had, beside the files they would shadow.
    write(&src.join("f1"), b"the real f1");
    write(&src.join(".f1.shoal-partial"), b"not f1 at all");
    write(
        &src.join(".shoal-staging.0123456789abcdef"),
        b"a staging look-alike",
    );
    write(&src.join("d/.shoal-staging.0000000000000000/0"), b"deep");
    write(&src.join("d/0"), b"zero");
    for i in 0..64 {
        write(&src.join(format!("many/{i}")), &random_bytes(i, 5000));
        write(
            &src.join(format!("many/.{i}.shoal-partial")),
            &random_bytes(i + 100, 7000),
        );
    }
    env.json(&["publish", src.to_str().unwrap(), "names@v1"]);
    let dest = env.path("dest");
    env.json(&["pull", "names@v1", "--to", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);
    // Again over the same destination, and after a stale staging directory of a killed pull.
    std::fs::create_dir_all(dest.join(".shoal-staging.fedcba9876543210")).unwrap();
    std::fs::write(dest.join(".shoal-staging.fedcba9876543210/3"), b"junk").unwrap();
    env.json(&["pull", "names@v1", "--to", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);
}

#[test]
fn symlink_chains_that_escape_are_refused_at_publish_pull_and_mount() {
    let env = Env::new();
    // Each link alone stays inside; the chain through a/b climbs out.
    let src = env.path("src");
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::os::unix::fs::symlink("..", src.join("a/b")).unwrap();
    std::os::unix::fs::symlink("a/b/a/b/a/b/../../../../../../etc/passwd", src.join("x")).unwrap();
    let err = env.fails(&["publish", src.to_str().unwrap(), "links@v1"]);
    assert!(
        err.contains("outside the dataset") && err.contains("through a/b") && err.contains("/x"),
        "{err}"
    );

    // The same tree forged into an origin: refused at pull, with the path, nothing written.
    let key = publisher_key(&env);
    let payload = b"inside";
    let link = |name: &str, target: &str| Entry {
        name: name.into(),
        mode: 0o777,
        kind: EntryKind::Symlink {
            target: target.into(),
        },
    };
    let sub = Dir {
        entries: vec![link("b", "..")],
    }
    .encode();
    let entries = vec![
        Entry {
            name: "a".into(),
            mode: 0o755,
            kind: EntryKind::Dir {
                id: shoal_chunker::hash(&sub),
                files: 0,
                bytes: 0,
            },
        },
        file_entry("f", payload),
        link("ok", "a/b/f"),
        link("x", "a/b/a/b/a/b/../../../../../../etc/passwd"),
    ];
    forge_with(&env, "chain", entries, payload, &[sub], &key, None);
    let work = env.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let dest = work.join("dest");
    let err = env.fails(&["pull", "evil@chain", "--to", dest.to_str().unwrap()]);
    assert!(
        err.contains("symlink '/x'") && err.contains("outside the dataset (through a/b)"),
        "{err}"
    );
    assert!(!dest.exists(), "nothing written: {:?}", all_paths(&work));

    // Mounted, the escaping link is refused when the kernel asks for it; the others work.
    let mnt = env.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut m = env
        .cmd(&["mount", "evil@chain", mnt.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_dir(&mnt).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "mount did not come up"
        );
        assert!(m.try_wait().unwrap().is_none(), "mount exited");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let x = std::fs::read_link(mnt.join("x"));
    let through = std::fs::read(mnt.join("x"));
    let ok = std::fs::read(mnt.join("ok"));
    // Unmounted by the tool itself, and by force if that fails, so the mount never
    // outlives the test (and `wait` never hangs on it).
    let unmounted = env
        .cmd(&["unmount", mnt.to_str().unwrap()])
        .output()
        .is_ok_and(|o| o.status.success());
    if !unmounted {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&mnt)
            .status();
        let _ = m.kill();
    }
    let _ = m.wait();
    assert!(
        x.is_err() && through.is_err(),
        "escaping link served: {x:?}"
    );
    assert_eq!(ok.unwrap(), payload, "a link that stays inside works");
}
