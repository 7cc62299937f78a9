//! What an HTTP client declares: a `Range` header against a file length, and the query
//! strings of the write, watch and membership routes.
#![no_main]

use canopy::api::parsers;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let len = u64::from_le_bytes(data[..8].try_into().unwrap()) >> (data[0] % 64);
    let text = String::from_utf8_lossy(&data[8..]);
    let _ = parsers::range(&text, len);
    let _ = parsers::range(&format!("bytes={text}"), len);
    let _ = parsers::queries(&text);
});
