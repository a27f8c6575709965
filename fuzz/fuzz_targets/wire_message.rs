#![no_main]
// The harness and its seeds are `tidemark_fuzz::TARGETS`'s "wire_message".
libfuzzer_sys::fuzz_target!(
    init: tidemark_fuzz::seeds("wire_message"),
    |data: &[u8]| (tidemark_fuzz::target("wire_message").run)(data)
);
