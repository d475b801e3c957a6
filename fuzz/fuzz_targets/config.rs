//! Arbitrary UTF-8 through the config loader.
//! The properties live in `tidegate::fuzz_logic::config`, which `tests/fuzz_replay.rs` also runs
//! on stable. Run: `cargo +nightly fuzz run config` (or `fuzz/ci.sh` for every target).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidegate::fuzz_logic::config(data));
