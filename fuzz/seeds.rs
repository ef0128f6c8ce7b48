//! Writes a seed corpus of valid inputs for every target into `<dir>/<target>/`.
fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: seeds DIR"));
    for (target, bytes) in shoal_testnet::fuzz::seeds() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).expect("corpus directory");
        let name = blake3_name(&bytes);
        std::fs::write(d.join(name), bytes).expect("seed file");
    }
}

fn blake3_name(b: &[u8]) -> String {
    shoal_registry_hash(b)
}

fn shoal_registry_hash(b: &[u8]) -> String {
    // Any stable name will do; the content's own hash keeps seeds distinct.
    format!("seed-{:016x}", b.iter().fold(0xcbf29ce484222325u64, |h, x| (h ^ *x as u64).wrapping_mul(0x100000001b3)))
}
