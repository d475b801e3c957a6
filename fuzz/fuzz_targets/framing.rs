//! Arbitrary bytes as a client's raw request stream, for the framing scanner.
//! The properties live in `tidegate::fuzz_logic::framing`, which `tests/fuzz_replay.rs` also runs
//! on stable. Run: `cargo +nightly fuzz run framing` (or `fuzz/ci.sh` for every target).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidegate::fuzz_logic::framing(data));
