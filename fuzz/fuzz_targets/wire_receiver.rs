#![no_main]
// The harness and its seeds are `tidemark_fuzz::TARGETS`'s "wire_receiver".
libfuzzer_sys::fuzz_target!(
    init: tidemark_fuzz::seeds("wire_receiver"),
    |data: &[u8]| (tidemark_fuzz::target("wire_receiver").run)(data)
);
