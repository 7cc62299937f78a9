//! Writing and reading a Raft snapshot holds the file's content at most once: measured with a
//! counting allocator around a 64 MiB file.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufReader, BufWriter, Write};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use canopy::consensus::snapshot::{self, Limits};
use canopy::consensus::{ApplyOutcome, DedupTable, SnapshotMeta};
use canopy::file::{ChunkedFile, DEFAULT_CHUNK_SIZE, DEFAULT_MAX_LEN};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Start measuring: the peak is reset to what is allocated now, which is returned.
fn measure() -> usize {
    let now = CURRENT.load(Ordering::SeqCst);
    PEAK.store(now, Ordering::SeqCst);
    now
}

fn peak_since(base: usize) -> usize {
    PEAK.load(Ordering::SeqCst).saturating_sub(base)
}

const LEN: usize = 64 << 20;
const SLACK: usize = 8 << 20;

#[test]
fn a_snapshot_is_written_and_read_a_chunk_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap");
    let file = {
        let data: Vec<u8> = (0..LEN as u32).map(|i| (i % 251) as u8).collect();
        ChunkedFile::from_bytes(DEFAULT_CHUNK_SIZE, DEFAULT_MAX_LEN, &data, 42).unwrap()
    };
    let root = file.root();
    let mut dedup = DedupTable::default();
    for i in 0..10_000u64 {
        dedup.record(
            Bytes::copy_from_slice(&i.to_le_bytes()),
            ApplyOutcome::Applied { version: i },
        );
    }
    let meta = SnapshotMeta::default();

    let base = measure();
    {
        let mut w = BufWriter::new(std::fs::File::create(&path).unwrap());
        snapshot::write(&mut w, &meta, &file, &dedup).unwrap();
        w.flush().unwrap();
    }
    let written = peak_since(base);
    eprintln!("writing a {LEN}-byte snapshot: peak {written} bytes allocated");
    assert!(
        written < SLACK,
        "writing a {LEN}-byte snapshot allocated {written} bytes at its peak"
    );
    assert!(std::fs::metadata(&path).unwrap().len() > LEN as u64);
    let limits = Limits::of(&file);
    drop(file);

    let base = measure();
    let decoded = snapshot::read(
        &mut BufReader::new(std::fs::File::open(&path).unwrap()),
        limits,
    )
    .unwrap();
    let read = peak_since(base);
    eprintln!("reading a {LEN}-byte snapshot: peak {read} bytes allocated");
    assert!(
        read < LEN + SLACK,
        "reading a {LEN}-byte snapshot allocated {read} bytes at its peak (the file itself \
         takes {LEN})"
    );
    assert_eq!(decoded.file.root(), root);
    assert_eq!(decoded.file.version(), 42);
    assert_eq!(decoded.dedup, dedup);
}
