//! A new version uploads only what changed.

mod common;
use common::*;

#[test]
fn second_version_uploads_about_what_changed() {
    let env = Env::new();
    let src = env.path("src");
    let big = random_bytes(7, 12 << 20);
    write(&src.join("shard.bin"), &big);
    for i in 0..30 {
        write(
            &src.join(format!("img/{i:03}.jpg")),
            &random_bytes(1000 + i, 20_000 + i as usize * 1500),
        );
    }
    let v1 = env.json(&["publish", src.to_str().unwrap(), "ds@v1"]);
    assert!(v1["new_bytes_uploaded"].as_u64().unwrap() >= 12 << 20);

    // Edit: 1 MiB inserted in the middle of the large file, 3 small files added, 2 removed.
    let insert = random_bytes(8, 1 << 20);
    let mut edited = big[..big.len() / 2].to_vec();
    edited.extend_from_slice(&insert);
    edited.extend_from_slice(&big[big.len() / 2..]);
    write(&src.join("shard.bin"), &edited);
    let mut changed = insert.len() as u64;
    for i in 0..3 {
        let b = random_bytes(5000 + i, 100_000);
        changed += b.len() as u64;
        write(&src.join(format!("img/new{i}.jpg")), &b);
    }
    std::fs::remove_file(src.join("img/000.jpg")).unwrap();
    std::fs::remove_file(src.join("img/001.jpg")).unwrap();

    let v2 = env.json(&["publish", src.to_str().unwrap(), "ds@v2"]);
    let uploaded = v2["new_bytes_uploaded"].as_u64().unwrap();
    let ratio = uploaded as f64 / changed as f64;
    assert!(
        ratio <= 1.3,
        "uploaded {uploaded} for {changed} changed bytes: {ratio:.2}x"
    );
    assert!(
        uploaded >= changed,
        "uploaded {uploaded} < changed {changed}: something was lost"
    );

    // Publishing the same content again as v3 uploads only the version object.
    let v3 = env.json(&["publish", src.to_str().unwrap(), "ds@v3"]);
    assert_eq!(v3["new_chunks"], 0);
    assert!(v3["new_bytes_uploaded"].as_u64().unwrap() < 4096, "{v3}");
    assert_eq!(v3["root"], v2["root"]);

    // What publish deduplicates against is a table on disk; a damaged one (every entry
    // zeroed) is not used but built again, and the next publish still uploads nothing new.
    let table = env.home.join("publish/ds.blobs");
    let mut bytes = std::fs::read(&table).expect("the table of the origin's blobs");
    let count = u64::from_le_bytes(bytes[48..56].try_into().unwrap()) as usize;
    assert!(count > 30, "{count} blobs in the table");
    bytes[64..64 + 36 * count].fill(0);
    std::fs::write(&table, &bytes).unwrap();
    let v4 = env.json(&["publish", src.to_str().unwrap(), "ds@v4"]);
    assert_eq!(v4["new_chunks"], 0, "{v4}");
    assert!(v4["new_bytes_uploaded"].as_u64().unwrap() < 4096, "{v4}");
    assert_ne!(
        std::fs::read(&table).unwrap(),
        bytes,
        "the table was built again"
    );

    // And both versions pull back exactly.
    let other = env.peer("other");
    other.run(&["trust", &env.key()]);
    let out = env.path("out");
    other.json(&["pull", "ds@v2", "--to", out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
    let d = env.json(&["diff", "ds@v1", "ds@v2"]);
    assert_eq!(
        (
            d["added_files"].as_u64(),
            d["removed_files"].as_u64(),
            d["changed_files"].as_u64()
        ),
        (Some(3), Some(2), Some(1))
    );
    let cb = d["changed_bytes"].as_u64().unwrap();
    assert!(
        ((1 << 20)..(1 << 20) + (600 << 10)).contains(&cb),
        "changed bytes of the shard: {cb}"
    );
}

/// Files chunked in parallel still lie together in the packs: a file's new chunks go into a
/// pack in groups of a mount's run (4 MiB), never alternating chunk by chunk with another
/// file's (a mount reading one file would then ask the origin for one chunk per range).
#[test]
fn a_files_new_chunks_lie_together_in_the_packs() {
    let env = Env::new();
    let src = env.path("src");
    let files: Vec<Vec<u8>> = (0..4).map(|i| random_bytes(40 + i, 9 << 20)).collect();
    let mut owner = std::collections::HashMap::new();
    for (i, f) in files.iter().enumerate() {
        write(&src.join(format!("shard-{i}.bin")), f);
        let mut chunker = shoal_chunker::Chunker::new(shoal_registry::Params::default());
        chunker
            .chunk(&f[..], |c, _| {
                owner.insert(c.id, i);
                Ok::<_, ()>(())
            })
            .unwrap();
    }
    env.json(&["publish", src.to_str().unwrap(), "ds@v1"]);
    // Walk every pack in pack order: each stretch of one file's chunks, in bytes.
    let mut stretches: Vec<(usize, u64)> = Vec::new();
    let packs = std::path::Path::new(&env.origin).join("packs");
    for e in std::fs::read_dir(&packs).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "idx") {
            continue;
        }
        let idx = shoal_registry::pack::PackIndex::decode(&std::fs::read(&path).unwrap()).unwrap();
        let mut last = None;
        for entry in &idx.entries {
            let Some(&file) = owner.get(&entry.id) else {
                continue; // a tree node
            };
            match stretches.last_mut() {
                Some((f, bytes)) if last == Some(file) && *f == file => *bytes += entry.len as u64,
                _ => stretches.push((file, entry.len as u64)),
            }
            last = Some(file);
        }
    }
    let chunked: u64 = stretches.iter().map(|s| s.1).sum();
    assert_eq!(
        chunked,
        4 * (9 << 20),
        "every byte of the files is packed once"
    );
    // 9 MiB a file: two whole groups and a tail each, plus any stretch a pack boundary cut.
    let short = stretches.iter().filter(|s| s.1 < 4 << 20).count();
    assert!(
        stretches.len() <= 16 && short <= 8,
        "a file's chunks are scattered over the packs: {} stretches, {short} under 4 MiB: {stretches:?}",
        stretches.len()
    );
}
