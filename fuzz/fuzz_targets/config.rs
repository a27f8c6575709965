#![no_main]
// The harness and its seeds are `tidemark_fuzz::TARGETS`'s "config".
libfuzzer_sys::fuzz_target!(
    init: tidemark_fuzz::seeds("config"),
    |data: &[u8]| (tidemark_fuzz::target("config").run)(data)
);
