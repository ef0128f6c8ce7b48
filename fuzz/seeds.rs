//! Writes a seed corpus of valid inputs for every target into `<dir>/<target>/`, each file
//! named by a hash of its bytes.
fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: seeds DIR"));
    for (target, bytes) in shoal_testnet::fuzz::seeds() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).expect("corpus directory");
        // FNV-1a: any stable name will do.
        let h = bytes
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3));
        std::fs::write(d.join(format!("seed-{h:016x}")), bytes).expect("seed file");
    }
}
