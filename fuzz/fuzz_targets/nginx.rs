//! Feeds arbitrary UTF-8 to the nginx config parser and to `import-nginx`'s converter (the
//! text also stands as an include file): neither may panic, and every error and report must
//! render. Run with `cargo +nightly fuzz run nginx`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tidegate::config::nginx;

fuzz_target!(|text: &str| {
    if let Err(e) = nginx::parse(text, Path::new("fuzz.conf")) {
        assert!(!e.message.is_empty());
        assert!(!e.to_string().is_empty());
    }
    let fs = nginx::MemFs::new().with("/fuzz/inc.conf", text).with("/fuzz/conf.d/a.conf", text);
    match nginx::import_str(text, Path::new("/fuzz/nginx.conf"), &fs) {
        Ok(import) => {
            let _ = import.report();
            let _ = import.complete();
            assert!(import.toml.starts_with('#'));
        }
        Err(e) => assert!(!e.message.is_empty()),
    }
});
