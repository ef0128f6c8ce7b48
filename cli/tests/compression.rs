//! Compressed packs, end to end on real text (this repository's own sources and docs) beside
//! random bytes: published smaller, then pulled, mounted, verified and replicated exactly;
//! a damaged compressed frame is caught and named, never served.

mod common;
use common::*;
use shoal_registry::pack::{Codec, PackIndex};
use std::path::{Path, PathBuf};

/// Copies every `.rs` and `.md` file under the repository's crates and docs into `dest`
/// (real code and prose, about 2 MB), plus 3 MB of random bytes: packs get compressed and
/// raw frames both.
fn real_tree(dest: &Path) -> (u64, u64) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut total = 0u64;
    for top in ["registry", "node", "fuse-mount", "docs", "cli/src"] {
        let mut stack = vec![repo.join(top)];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs" || x == "md") {
                    let rel = p.strip_prefix(repo).unwrap();
                    let bytes = std::fs::read(&p).unwrap();
                    total += bytes.len() as u64;
                    write(&dest.join(rel), &bytes);
                }
            }
        }
    }
    let noise = random_bytes(11, 3_000_000);
    write(&dest.join("noise.bin"), &noise);
    (total, noise.len() as u64)
}

/// The origin's pack indexes, decoded, with their pack files.
fn packs(origin: &str) -> Vec<(PathBuf, PackIndex, u8)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(Path::new(origin).join("packs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "idx") {
            let bytes = std::fs::read(&p).unwrap();
            let idx = PackIndex::decode(&bytes).unwrap();
            out.push((p.with_extension("pack"), idx, bytes[4]));
        }
    }
    out
}

#[test]
fn compressed_packs_pull_mount_verify_and_replicate_exactly() {
    let env = Env::new();
    let src = env.path("src");
    let (text, noise) = real_tree(&src);
    let raw = text + noise;
    let r = env.json(&["publish", src.to_str().unwrap(), "code@v1"]);
    let uploaded = r["new_bytes_uploaded"].as_u64().unwrap();
    assert!(
        uploaded < noise + text / 2,
        "text compresses: {uploaded} bytes uploaded for {text} of text and {noise} of noise"
    );
    let found = packs(&env.origin);
    let (pack, idx, version) = found.iter().max_by_key(|p| p.1.raw_len()).unwrap();
    assert_eq!(*version, 2, "a pack with compressed frames has a v2 index");
    let codecs: Vec<Codec> = idx.frames.frames().iter().map(|f| f.codec).collect();
    assert!(
        codecs.contains(&Codec::Zstd) && codecs.contains(&Codec::Raw),
        "{codecs:?}"
    );
    assert_eq!(std::fs::metadata(pack).unwrap().len(), idx.pack_len());

    // Another machine pulls it exactly, reading no more than the origin holds.
    let other = env.peer("other");
    assert!(other.run(&["trust", &env.key()]).status.success());
    let out = other.path("out");
    let p = other.json(&["pull", "code@v1", "--to", out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
    let origin_bytes: u64 = found
        .iter()
        .map(|(p, _, _)| std::fs::metadata(p).unwrap().len())
        .sum();
    let read = p["bytes_from_origin"].as_u64().unwrap();
    assert!(
        read <= origin_bytes + (512 << 10),
        "each frame read once: {read} read, packs hold {origin_bytes}"
    );
    // Its store keeps the text compressed (chunk by chunk) and the noise as it is; a pull
    // from that store writes the files exactly.
    let kept = other.json(&["cache"])["live_bytes"].as_u64().unwrap();
    assert!(
        kept >= noise && kept < noise + text / 2,
        "{kept} bytes stored for {text} of text and {noise} of noise"
    );
    let again = other.path("again");
    let p = other.json(&["pull", "code@v1", "--to", again.to_str().unwrap()]);
    assert_eq!(p["bytes_from_origin"], 0, "{p}");
    assert_same_tree(&src, &again);
    // With `[cache] compression` off (here by its variable), the store keeps chunks raw.
    let raw_store = env.peer("raw-store");
    assert!(raw_store.run(&["trust", &env.key()]).status.success());
    raw_store.json_with(
        &["pull", "code@v1", "--no-files"],
        &[("SHOAL_CACHE_COMPRESSION", "off")],
    );
    let kept = raw_store.json(&["cache"])["live_bytes"].as_u64().unwrap();
    assert!(kept >= raw, "{kept} bytes stored raw for {raw}");

    // A cold mount on a third machine reads every file exactly, one at a time.
    let third = env.peer("third");
    assert!(third.run(&["trust", &env.key()]).status.success());
    let mp = third.path("mnt");
    let m = Mounted::start(&third, "code@v1", &mp, &[]);
    assert_same_tree(&src, &mp);
    m.stop(&third);

    // verify reads every blob through its frame.
    let v = env.json(&["verify", "code@v1"]);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{v}");

    // A replica holds the same packs byte for byte (frames compressed again from verified
    // blobs), and pulls exactly from there.
    let mirror = env.path("mirror");
    env.json(&["replicate", "code@v1", "--to", mirror.to_str().unwrap()]);
    let copy = std::fs::read(mirror.join("packs").join(pack.file_name().unwrap())).unwrap();
    assert!(
        copy == std::fs::read(pack).unwrap(),
        "the replica's pack differs"
    );
    let fourth = env.peer("fourth");
    assert!(fourth.run(&["trust", &env.key()]).status.success());
    let out4 = fourth.path("out");
    let mut args = vec!["pull", "code@v1", "--to", out4.to_str().unwrap()];
    args.extend(["--origin", mirror.to_str().unwrap()]);
    fourth.json(&args);
    assert_same_tree(&src, &out4);

    // --compression none: raw packs with v1 indexes, about the raw size.
    let plain = Env::new();
    let r = plain.json(&[
        "publish",
        src.to_str().unwrap(),
        "code@v1",
        "--compression",
        "none",
    ]);
    assert!(r["new_bytes_uploaded"].as_u64().unwrap() >= raw);
    assert!(packs(&plain.origin)
        .iter()
        .all(|p| p.2 == 1 && p.1.frames.is_plain()));
}

#[test]
fn a_damaged_compressed_frame_is_named_and_never_served() {
    let env = Env::new();
    let src = env.path("src");
    real_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "code@v1"]);
    let found = packs(&env.origin);
    let (pack, idx, _) = found.iter().max_by_key(|p| p.1.raw_len()).unwrap();
    // One byte in the middle of the first compressed frame.
    let mut at = 0u64;
    let mut target = None;
    for f in idx.frames.frames() {
        if f.codec == Codec::Zstd {
            target = Some(at + f.stored_len / 2);
            break;
        }
        at += f.stored_len;
    }
    let target = target.expect("a compressed frame") as usize;
    let mut bytes = std::fs::read(pack).unwrap();
    bytes[target] ^= 0x55;
    std::fs::write(pack, &bytes).unwrap();

    let other = env.peer("other");
    assert!(other.run(&["trust", &env.key()]).status.success());
    let out = other.path("out");
    let err = other.fails(&["pull", "code@v1", "--to", out.to_str().unwrap()]);
    assert!(
        err.contains(pack.file_name().unwrap().to_str().unwrap()) || err.contains("pack"),
        "the error names the pack: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    // Nothing was written from the damaged frame: every file there is whole and exact.
    if out.exists() {
        for rel in all_paths(&out) {
            let (a, b) = (out.join(&rel), src.join(&rel));
            if a.is_file() {
                assert_eq!(
                    std::fs::read(&a).unwrap(),
                    std::fs::read(&b).unwrap(),
                    "{rel}"
                );
            }
        }
    }
    let v = env.run(&["--json", "verify", "code@v1"]);
    assert!(!v.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    let problems = doc["problems"].as_array().unwrap();
    assert!(!problems.is_empty(), "{doc}");
    assert!(
        problems
            .iter()
            .all(|p| p.as_str().unwrap().contains("pack")),
        "{doc}"
    );
}

/// The dataset's settings object, as the origin holds it.
fn dataset_settings(origin: &str, name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(origin)
            .join("datasets")
            .join(name)
            .join("_dataset"),
    )
    .unwrap()
}

#[test]
fn small_text_files_get_small_chunks_and_an_edit_uploads_little() {
    let env = Env::new();
    let src = env.path("src");
    real_tree(&src);
    env.json(&["publish", src.to_str().unwrap(), "code@v1"]);
    let settings = dataset_settings(&env.origin, "code");
    let cfg = shoal_registry::DatasetConfig::decode(&settings).unwrap();
    assert_eq!(
        cfg.small,
        Some(shoal_registry::SmallFiles::DEFAULT),
        "text: on"
    );
    // One line changed in the middle of the largest small source file.
    let rel = all_paths(&src)
        .into_iter()
        .filter(|p| p.ends_with(".rs"))
        .max_by_key(|p| std::fs::metadata(src.join(p)).unwrap().len())
        .unwrap();
    let path = src.join(&rel);
    let mut text = std::fs::read_to_string(&path).unwrap();
    let size = text.len();
    let at = text[size / 2..].find('\n').unwrap() + size / 2;
    text.insert_str(at, "\n// one line added in v2");
    std::fs::write(&path, &text).unwrap();
    let r = env.json(&["publish", src.to_str().unwrap(), "code@v2"]);
    let uploaded = r["new_bytes_uploaded"].as_u64().unwrap();
    assert!(
        uploaded < 24 << 10,
        "one line added to {rel} ({size} bytes) uploaded {uploaded} bytes"
    );
    pulls_back_exactly(&env, "code@v2", &src);

    // Random small files (media): one chunk each, recorded as the dataset's whole class.
    let media = Env::new();
    let dir = media.path("media");
    for i in 0..40 {
        write(
            &dir.join(format!("img{i}.jpg")),
            &random_bytes(i, 30_000 + 20_000 * i as usize),
        );
    }
    let r = media.json(&["publish", dir.to_str().unwrap(), "img@v1"]);
    assert_eq!(r["chunks"], 40, "{r}");
    let cfg =
        shoal_registry::DatasetConfig::decode(&dataset_settings(&media.origin, "img")).unwrap();
    assert_eq!(
        cfg.small,
        Some(shoal_registry::SmallFiles::WHOLE),
        "media: whole"
    );
    pulls_back_exactly(&media, "img@v1", &dir);
    // Asked for: small chunks (v2 settings); or the default chunking (v1 settings).
    for (choice, more_than, settings) in [("on", 40 * 10, 2), ("off", 40, 1)] {
        let forced = Env::new();
        let args = [
            "publish",
            dir.to_str().unwrap(),
            "img@v1",
            "--small-files",
            choice,
        ];
        let r = forced.json(&args);
        assert!(r["chunks"].as_u64().unwrap() > more_than, "{choice}: {r}");
        assert_eq!(
            dataset_settings(&forced.origin, "img")[4],
            settings,
            "{choice}"
        );
    }
}

/// A peer trusting `env`'s key pulls `reference` and gets exactly the files of `src`.
fn pulls_back_exactly(env: &Env, reference: &str, src: &Path) {
    let other = env.peer("other");
    assert!(other.run(&["trust", &env.key()]).status.success());
    let out = other.path("out");
    other.json(&["pull", reference, "--to", out.to_str().unwrap()]);
    assert_same_tree(src, &out);
}

#[test]
fn a_publish_of_many_packs_does_not_wait_on_itself() {
    // Sealing (compression) once ran on the pool whose threads chunk files, and those block
    // when the packer falls behind: a publish of more than two packs never finished.
    let env = Env::new();
    let src = env.path("src");
    real_tree(&src);
    // More than the pipeline holds before the chunking threads block (the packer's queue,
    // a pack being built, one queued, two sealing: about 270 MiB).
    for i in 0..6 {
        write(
            &src.join(format!("big/{i}.bin")),
            &random_bytes(100 + i, 64 << 20),
        );
    }
    let mut child = env
        .cmd(&["--json", "publish", src.to_str().unwrap(), "many@v1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the publish did not finish in 120 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["packs_uploaded"].as_u64().unwrap() >= 6, "{r}");
    let other = env.peer("other");
    assert!(other.run(&["trust", &env.key()]).status.success());
    let dest = other.path("out");
    other.json(&["pull", "many@v1", "--to", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);
}
