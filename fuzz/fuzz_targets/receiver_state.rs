#![no_main]
// The harness and its seeds are `tidemark_fuzz::TARGETS`'s "receiver_state".
libfuzzer_sys::fuzz_target!(
    init: tidemark_fuzz::seeds("receiver_state"),
    |data: &[u8]| (tidemark_fuzz::target("receiver_state").run)(data)
);
