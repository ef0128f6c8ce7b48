//! Replays every input the fuzzers found (`fuzz/regressions/<target>/`) and the seed corpus
//! through the same entry points the fuzz targets call: a fixed crash stays fixed.

use shoal_testnet::fuzz::{seeds, TARGETS};
use std::path::Path;

#[test]
fn every_kept_fuzz_input_and_seed_decodes_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut replayed = 0;
    for (name, run) in TARGETS {
        let dir = root.join(name);
        assert!(dir.is_dir(), "{} is missing", dir.display());
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            let bytes = std::fs::read(&p).unwrap();
            if std::panic::catch_unwind(|| run(&bytes)).is_err() {
                panic!("{name}: input {} panics", p.display());
            }
            replayed += 1;
        }
    }
    let seeds = seeds();
    for (name, bytes) in &seeds {
        let (_, run) = TARGETS
            .iter()
            .find(|(n, _)| n == name)
            .expect("seed of a known target");
        run(bytes);
    }
    eprintln!(
        "replayed {replayed} kept fuzz inputs and {} seeds",
        seeds.len()
    );
}

#[test]
fn seeds_are_valid_objects() {
    // The seeds exercise the decoders' success paths, not only their refusals.
    for (name, bytes) in seeds() {
        let ok = match name {
            "tree_dir" => shoal_registry::dirs::DirNode::decode(&bytes, None).is_ok(),
            "pack_index" => shoal_registry::pack::PackIndex::decode(&bytes).is_ok(),
            "version" => shoal_registry::SignedVersion::decode(&bytes).is_ok(),
            "tag" => shoal_registry::AnyTag::decode(&bytes).is_ok(),
            "daemon_request" => {
                shoal_node::daemon::parse_request(std::str::from_utf8(&bytes).unwrap()).is_ok()
            }
            _ => true,
        };
        assert!(ok, "seed for {name} does not decode");
    }
}
