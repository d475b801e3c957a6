//! Arbitrary bytes as a TLS ClientHello for the SNI peek.
//! The properties live in `tidegate::fuzz_logic::sni`, which `tests/fuzz_replay.rs` also runs
//! on stable. Run: `cargo +nightly fuzz run sni` (or `fuzz/ci.sh` for every target).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidegate::fuzz_logic::sni(data));
