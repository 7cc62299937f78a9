//! A transfer's shape as a peer declares it (chunk size, length, version, root) and chunks
//! at any index, into `FileBuilder`; and a file of declared length read from disk.
#![no_main]

use bytes::Bytes;
use canopy::file::{ChunkedFile, FileBuilder};
use libfuzzer_sys::fuzz_target;

fn u64_at(d: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in d.iter().skip(at).take(8).enumerate() {
        b[i] = *x;
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 18 {
        return;
    }
    let chunk_size = 1u32 << (data[0] % 26);
    let max_len = 1u64 << (data[1] % 64);
    let len = u64_at(data, 2);
    let version = u64_at(data, 10);
    let rest = &data[18..];
    if let Ok(mut b) = FileBuilder::new(chunk_size, max_len, len, version, [0; 32]) {
        let mut pieces = rest.chunks(9);
        while let Some(p) = pieces.next() {
            let index = u64::from(p[0]) | (u64::from(*p.get(1).unwrap_or(&0)) << 8);
            let chunk = Bytes::copy_from_slice(p.get(2..).unwrap_or_default());
            let _ = b.put_chunk(index % (b.chunk_count() + 2), chunk);
        }
        assert!(b.missing() <= b.chunk_count());
        let _ = b.missing_indices();
        let _ = b.finish();
    }
    let mut r = rest;
    if let Ok(f) = ChunkedFile::from_reader(chunk_size.max(16), max_len, len, &mut r, version) {
        assert_eq!(f.len(), len);
        let again = ChunkedFile::from_bytes(chunk_size.max(16), max_len, &f.to_vec(), version);
        assert_eq!(again.map(|g| g.root()).ok(), Some(f.root()));
    }
});
