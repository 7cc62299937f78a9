//! A snapshot file (from disk, or streamed by a leader): read within a node's limits. Half
//! the inputs are raw bytes; the other half are edits (offset, byte) to a valid snapshot,
//! so the fuzzer reaches past the header into the dedup table and the content.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use canopy::consensus::snapshot::{read, read_meta, write, Limits};
use canopy::consensus::{DedupTable, SnapshotMeta};
use canopy::file::{ApplyOutcome, ChunkedFile, Op, Update};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    chunk_size: 4096,
    max_len: 1 << 20,
};

fn valid() -> &'static Vec<u8> {
    static SNAP: OnceLock<Vec<u8>> = OnceLock::new();
    SNAP.get_or_init(|| {
        let mut file = ChunkedFile::new(4096, 1 << 20).unwrap();
        let update = Update {
            ops: vec![
                Op::Truncate { len: 20_000 },
                Op::Write {
                    offset: 4000,
                    data: Bytes::from(vec![7u8; 300]),
                },
            ],
        };
        file.apply(3, &update).unwrap();
        let mut dedup = DedupTable::default();
        dedup.record(
            Bytes::from_static(b"id-1"),
            ApplyOutcome::Applied { version: 3 },
        );
        dedup.record(
            Bytes::from_static(b"id-2"),
            ApplyOutcome::Rejected {
                version: 2,
                reason: "no".into(),
            },
        );
        let mut out = Vec::new();
        write(&mut out, &SnapshotMeta::default(), &file, &dedup).unwrap();
        out
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let input = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let mut v = valid().clone();
        for edit in rest.chunks_exact(3) {
            let at = usize::from(u16::from_le_bytes([edit[0], edit[1]]));
            let at = at % (v.len() + 1);
            if let Some(b) = v.get_mut(at) {
                *b = edit[2];
            }
        }
        if mode % 4 == 3 {
            v.truncate(rest.len() * 97 % (v.len() + 1));
        }
        v
    };
    let _ = read_meta(&mut &input[..]);
    if let Ok(d) = read(&mut &input[..], LIMITS) {
        assert!(d.file.len() <= LIMITS.max_len);
    }
});
