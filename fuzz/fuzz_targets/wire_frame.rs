#![no_main]
// The harness and its seeds are `tidemark_fuzz::TARGETS`'s "wire_frame".
libfuzzer_sys::fuzz_target!(
    init: tidemark_fuzz::seeds("wire_frame"),
    |data: &[u8]| (tidemark_fuzz::target("wire_frame").run)(data)
);
