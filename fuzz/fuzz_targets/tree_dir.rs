#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_testnet::fuzz::tree_dir(data));
