#![no_main]
// The harness and its seeds are `tidemark_fuzz::TARGETS`'s "changelog_dir".
libfuzzer_sys::fuzz_target!(
    init: tidemark_fuzz::seeds("changelog_dir"),
    |data: &[u8]| (tidemark_fuzz::target("changelog_dir").run)(data)
);
