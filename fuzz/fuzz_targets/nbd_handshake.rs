#![no_main]
// The harness and its seeds are `tidemark_fuzz::TARGETS`'s "nbd_handshake".
libfuzzer_sys::fuzz_target!(
    init: tidemark_fuzz::seeds("nbd_handshake"),
    |data: &[u8]| (tidemark_fuzz::target("nbd_handshake").run)(data)
);
