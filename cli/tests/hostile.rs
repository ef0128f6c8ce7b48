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
    // No half-written file is left under a final name.
    for p in all_paths(&dest) {
        let full = dest.join(&p);
        if full.is_file() {
            assert!(!p.contains("shoal-partial"), "temporary file left: {p}");
        }
    }
}
