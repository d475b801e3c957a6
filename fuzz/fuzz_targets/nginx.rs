//! Arbitrary UTF-8 through the nginx config parser and import-nginx's converter.
//! The properties live in `tidegate::fuzz_logic::nginx`, which `tests/fuzz_replay.rs` also runs
//! on stable. Run: `cargo +nightly fuzz run nginx` (or `fuzz/ci.sh` for every target).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidegate::fuzz_logic::nginx(data));
