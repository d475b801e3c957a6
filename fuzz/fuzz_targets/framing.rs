//! The raw request-framing scanner accepts any byte stream, in any chunking, and reaches the
//! same verdict whether fed at once or byte by byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidegate::framing::FramingScanner;

fuzz_target!(|data: &[u8]| {
    let mut whole = FramingScanner::default();
    whole.feed(data);
    let mut bytes = FramingScanner::default();
    for b in data {
        bytes.feed(std::slice::from_ref(b));
    }
    assert_eq!(whole.first_ambiguous, bytes.first_ambiguous);
});
