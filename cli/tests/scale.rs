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
