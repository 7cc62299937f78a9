//! What hashing one 64 KiB chunk costs, by how its bytes are held.
//!
//! Contiguous (as `ChunkedFile` keeps a chunk), as quinn's received pieces fed to BLAKE3 one
//! by one, or as those pieces copied into a reused scratch buffer first. `cargo bench --bench
//! chunk_hash` (criterion); docs/benchmarks.md, "A chunk as quinn's buffers".

use bytes::Bytes;
use canopy::file::leaf_hash;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

/// Payload bytes per QUIC datagram on loopback with Canopy's jumbo MTU (8952-byte datagrams
/// less headers and tag), so the pieces fall where quinn's `read_chunk` would cut them.
const PIECE: usize = 8_900;
const CHUNK: usize = 64 * 1024;

fn pieces(chunk: &Bytes, offset: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut len = PIECE - offset % PIECE;
    while at < chunk.len() {
        let end = (at + len).min(chunk.len());
        out.push(chunk.slice(at..end));
        at = end;
        len = PIECE;
    }
    out
}

fn bench(c: &mut Criterion) {
    let chunk = Bytes::from((0..CHUNK).map(|i| (i * 31 % 251) as u8).collect::<Vec<_>>());
    let split = pieces(&chunk, 3_000);
    let mut g = c.benchmark_group("chunk_hash_64KiB");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("contiguous", |b| b.iter(|| leaf_hash(black_box(&chunk))));
    g.bench_function("pieces_into_hasher", |b| {
        b.iter(|| {
            let mut h = blake3::Hasher::new();
            for p in black_box(&split) {
                h.update(p);
            }
            *h.finalize().as_bytes()
        })
    });
    let mut scratch = Vec::with_capacity(CHUNK);
    g.bench_function("pieces_via_scratch_copy", |b| {
        b.iter(|| {
            scratch.clear();
            for p in black_box(&split) {
                scratch.extend_from_slice(p);
            }
            leaf_hash(&scratch)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
