#![no_main]
// The harness and its seeds are `tidemark_fuzz::TARGETS`'s "nbd_transmission".
libfuzzer_sys::fuzz_target!(
    init: tidemark_fuzz::seeds("nbd_transmission"),
    |data: &[u8]| (tidemark_fuzz::target("nbd_transmission").run)(data)
);
