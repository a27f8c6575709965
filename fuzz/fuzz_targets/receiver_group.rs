#![no_main]
// The harness and its seeds are `tidemark_fuzz::TARGETS`'s "receiver_group".
libfuzzer_sys::fuzz_target!(
    init: tidemark_fuzz::seeds("receiver_group"),
    |data: &[u8]| (tidemark_fuzz::target("receiver_group").run)(data)
);
