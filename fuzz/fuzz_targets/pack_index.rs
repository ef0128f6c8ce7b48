#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_testnet::fuzz::pack_index(data));
