//! The ClientHello SNI peek never panics on any bytes, and stays bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tidegate::sni::parse(data);
});
