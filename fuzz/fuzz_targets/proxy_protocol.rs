//! The PROXY protocol parser never panics, never claims more bytes than it was given, and
//! agrees with itself on every prefix.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidegate::proxy_protocol::{Parsed, parse};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Parsed::Done(_, len) => {
            assert!(len <= data.len());
            assert!(matches!(parse(&data[..len]), Parsed::Done(_, l) if l == len));
        }
        Parsed::Incomplete | Parsed::Invalid(_) => {}
    }
});
