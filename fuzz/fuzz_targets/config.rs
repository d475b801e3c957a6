//! Feeds arbitrary UTF-8 to the config loader: it must never panic, and every
//! error must render to a non-empty message. Run with `cargo +nightly fuzz run config`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(errors) = tidegate::config::load_str(text, Path::new("fuzz.toml")) {
        assert!(!errors.0.is_empty());
        for e in &errors.0 {
            assert!(!e.to_string().is_empty());
            assert!(!e.message.is_empty());
        }
        assert!(!errors.to_string().is_empty());
    }
});
