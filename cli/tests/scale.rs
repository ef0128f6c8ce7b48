//! The scale generator (`shoal_testnet::scale`, behind `scripts/bench.sh scale`) in small: a
//! version written straight into an origin is signed, pulls exactly and lists, whatever the
//! width of its directories.

mod common;
use common::*;
use shoal_testnet::scale;

#[test]
fn a_generated_version_pulls_exactly() {
    let env = Env::new();
    let key = shoal_registry::SecretKey::generate().unwrap();
    // 3 parents of up to 100 leaves of 100 files; the last parent and leaf partly full.
    let entries = 20_150;
    let g = scale::generate(&env.origin, &key, "scale", "v1", entries, 100).unwrap();
    assert_eq!(g.last_path, "p02/l01/f49");
    assert!(env
        .run(&["trust", &key.public().to_string()])
        .status
        .success());
    let out = env.path("out");
    let r = env.json(&["pull", "scale@v1", "--to", out.to_str().unwrap()]);
    assert_eq!(r["files"], entries, "{r}");
    assert_eq!(r["root"], format!("b3:{}", g.root), "{r}");
    let paths = all_paths(&out);
    let files: Vec<&String> = paths
        .iter()
        .filter(|p| p.matches('/').count() == 2)
        .collect();
    assert_eq!(files.len() as u64, entries);
    for i in [0, 99, 100, 9_999, 10_000, entries - 1] {
        let p = scale::path_of(i, 100);
        assert_eq!(
            std::fs::read(out.join(&p)).unwrap(),
            scale::content_of(i),
            "{p}"
        );
    }
    let ls = env.json(&["ls", "scale@v1", "p02"]);
    assert_eq!(ls["entries"].as_array().unwrap().len(), 2, "{ls}");
    assert_eq!(ls["entries"][1]["files"], 50, "{ls}");
}

/// A pull without a daemon reads, fetches and writes a version a batch of files at a time
/// (65,536 files a batch): a version of several batches pulls exactly, reports what it took,
/// and a second pull takes everything from the store.
#[test]
fn a_version_of_several_pull_batches_pulls_exactly() {
    let env = Env::new();
    let key = shoal_registry::SecretKey::generate().unwrap();
    let entries = 70_000;
    let g = scale::generate(&env.origin, &key, "scale", "v1", entries, 400).unwrap();
    assert!(env
        .run(&["trust", &key.public().to_string()])
        .status
        .success());
    let out = env.path("out");
    let r = env.json(&["pull", "scale@v1", "--to", out.to_str().unwrap()]);
    assert_eq!(r["files"], entries, "{r}");
    assert_eq!(r["files_in_version"], entries, "{r}");
    assert_eq!(
        r["chunks"], entries,
        "every file is one distinct chunk: {r}"
    );
    assert_eq!(r["bytes_already_local"], 0, "{r}");
    let bytes: u64 = (0..entries)
        .map(|i| scale::content_of(i).len() as u64)
        .sum();
    assert_eq!(r["bytes"], bytes, "{r}");
    let written = all_paths(&out)
        .iter()
        .filter(|p| p.matches('/').count() == 2)
        .count();
    assert_eq!(written as u64, entries);
    for i in [0, 65_535, 65_536, 65_537, entries - 1] {
        let p = scale::path_of(i, 400);
        assert_eq!(
            std::fs::read(out.join(&p)).unwrap(),
            scale::content_of(i),
            "{p}"
        );
    }
    assert_eq!(g.last_path, scale::path_of(entries - 1, 400));
    // Each pack byte came from the origin once at most: the tree is read a level at a time,
    // and every node of the spans read is kept (they used to be read again for each level).
    let packs: u64 = std::fs::read_dir(std::path::Path::new(&env.origin).join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let sent = r["origins"][0]["bytes"].as_u64().unwrap();
    assert!(
        sent <= packs,
        "{sent} pack bytes sent for {packs} bytes of packs: {r}"
    );
    // Again (into the store only): nothing from the origin.
    let r = env.json(&["pull", "scale@v1", "--no-files"]);
    assert_eq!(r["bytes_from_origin"], 0, "{r}");
    assert_eq!(r["bytes_already_local"], bytes, "{r}");
    assert_eq!(r["files"], entries, "{r}");
}

/// Locator files of the version's packs (blob -> where in which pack) in `home`.
fn locators(home: &std::path::Path) -> Vec<std::path::PathBuf> {
    let dir = home.join("cache/packs");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "loc"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn blob_locations_are_opened_pack_by_pack_as_lookups_need_them() {
    let env = Env::new();
    let key = shoal_registry::SecretKey::generate().unwrap();
    // 60 parents of 100 leaves of 100 files: three packs of files' chunks (262,144 blobs
    // each at most), then one of the tree's nodes, listed last.
    let entries = 600_000;
    let g = scale::generate(&env.origin, &key, "scale", "v1", entries, 100).unwrap();
    assert_eq!(g.packs, 4);
    assert!(env
        .run(&["trust", &key.public().to_string()])
        .status
        .success());
    let names = |ls: &serde_json::Value| -> Vec<String> { strs(&ls["entries"], "name") };
    let expect = |parent: u64, leaf: u64| -> Vec<String> {
        (0..100)
            .map(|f| {
                let p = scale::path_of(parent * 10_000 + leaf * 100 + f, 100);
                p.rsplit('/').next().unwrap().to_string()
            })
            .collect()
    };
    // Directories written last and first: listing either opens the tree's pack alone.
    let ls = env.json(&["ls", "scale@v1", "p59/l99"]);
    assert_eq!(names(&ls), expect(59, 99), "{ls}");
    assert_eq!(locators(&env.home).len(), 1);
    let ls = env.json(&["ls", "scale@v1", "p00/l00"]);
    assert_eq!(names(&ls), expect(0, 0), "{ls}");
    assert_eq!(locators(&env.home).len(), 1);
    // A pull of files from the first and the last pack of files: the others are opened.
    let out = env.path("out");
    let pull = |out: &std::path::Path| {
        env.json(&[
            "pull",
            "scale@v1",
            "--include",
            "p00/l00/*",
            "--include",
            "p59/l99/*",
            "--to",
            out.to_str().unwrap(),
        ])
    };
    let r = pull(&out);
    assert_eq!(r["files"], 200, "{r}");
    let locs = locators(&env.home);
    assert_eq!(locs.len(), 4);
    // Damaged locator files (cut short, emptied) are rebuilt, not trusted: with the store
    // gone, the same pull needs every lookup again.
    let whole: Vec<u64> = locs
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&locs[0])
        .unwrap();
    f.set_len(whole[0] / 2).unwrap();
    std::fs::write(&locs[1], b"").unwrap();
    std::fs::write(&locs[2], b"SHOALOC1 but nothing else").unwrap();
    std::fs::remove_dir_all(env.home.join("store")).unwrap();
    let out = env.path("out2");
    let r = pull(&out);
    assert_eq!(r["files"], 200, "{r}");
    let again: Vec<u64> = locators(&env.home)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    assert_eq!(again, whole);
    for i in [0, 99, entries - 100, entries - 1] {
        let p = scale::path_of(i, 100);
        assert_eq!(std::fs::read(out.join(&p)).unwrap(), scale::content_of(i));
    }
}
