//! Arbitrary bytes as an HTTP/1.1 request head for the request-head policy.
//! The properties live in `tidegate::fuzz_logic::request_head`, which `tests/fuzz_replay.rs` also runs
//! on stable. Run: `cargo +nightly fuzz run request_head` (or `fuzz/ci.sh` for every target).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidegate::fuzz_logic::request_head(data));
