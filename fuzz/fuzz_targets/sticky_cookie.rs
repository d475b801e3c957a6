//! Arbitrary bytes as Cookie headers for the cookie-sticky balancer.
//! The properties live in `tidegate::fuzz_logic::sticky_cookie`, which `tests/fuzz_replay.rs` also runs
//! on stable. Run: `cargo +nightly fuzz run sticky_cookie` (or `fuzz/ci.sh` for every target).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidegate::fuzz_logic::sticky_cookie(data));
