//! Arbitrary bytes as a PROXY protocol v1/v2 header.
//! The properties live in `tidegate::fuzz_logic::proxy_protocol`, which `tests/fuzz_replay.rs` also runs
//! on stable. Run: `cargo +nightly fuzz run proxy_protocol` (or `fuzz/ci.sh` for every target).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidegate::fuzz_logic::proxy_protocol(data));
