//! Heap memory faulted in ahead of a transfer, so that the copies a join makes land in
//! pages the process already has.
//!
//! A relay that joins keeps every byte of the file it receives, so its heap grows by the
//! file's size, and each new page costs a trap at its first write (about 2 µs on a VM; 25 ms
//! for 50 MB). [`Prefaulted::heap`] grows the calling thread's heap by the transfer's size
//! at once, faults the pages in with one `MADV_POPULATE_WRITE` per contiguous run (about
//! half the cost per page), and frees them again, so that quinn's datagram buffers and the
//! kept frames are then cut from memory already in place (docs/benchmarks.md, "A join's heap
//! faulted in ahead").
//!
//! Invariants:
//! - Nothing is written to the memory, and no byte the process holds changes: populating a
//!   page only maps it.
//! - At most [`Prefaulted::MAX_BYTES`] per call, in blocks below glibc's smallest
//!   `mmap` threshold, so that they come from the thread's heap and go back to it.
//! - The highest block stays allocated while the [`Prefaulted`] lives: the freed blocks
//!   then lie below it, not at the heap's top, and glibc does not trim them away. Dropping
//!   it lets glibc trim whatever the transfer did not use.
//! - Where the kernel cannot populate (Linux before 5.14, other systems) nothing is
//!   allocated, and the pages fault as they are written, as before.

/// Memory faulted in for a transfer; keep it until the transfer ends.
#[derive(Debug, Default)]
pub struct Prefaulted {
    /// The highest block, kept so that the others, freed, are not the heap's top.
    _guard: Option<Vec<u8>>,
    bytes: usize,
}

impl Prefaulted {
    /// Most bytes one call faults in: 64 MiB, about 20 ms of the worker's time on this VM,
    /// a bounded stall however large the file; a larger transfer's remainder faults as it
    /// arrives.
    pub const MAX_BYTES: usize = 64 << 20;
    /// One block: 124 KiB, under glibc's smallest `mmap` threshold (128 KiB) with room for
    /// its header, so that it is cut from the heap and freed back to it, never mapped on its
    /// own; as large as that allows, since each block's header costs one trap.
    pub const BLOCK: usize = 124 << 10;

    /// Faults in about `bytes` (at most [`Prefaulted::MAX_BYTES`]) of the calling thread's
    /// heap. Call on the thread that will allocate what the transfer keeps (a relay's one
    /// tokio worker), when the transfer's size is known and before its data flows, and keep
    /// the result until the transfer ends.
    pub fn heap(bytes: usize) -> Self {
        let n = bytes.min(Self::MAX_BYTES) / Self::BLOCK;
        if n < 2 || !cfg!(target_os = "linux") {
            return Self::default();
        }
        let mut blocks: Vec<Vec<u8>> = (0..n).map(|_| Vec::with_capacity(Self::BLOCK)).collect();
        let mut ranges: Vec<(usize, usize)> = blocks
            .iter()
            .map(|b| (b.as_ptr() as usize, b.as_ptr() as usize + b.capacity()))
            .collect();
        ranges.sort_unstable();
        let mut populated = 0;
        for (start, end) in runs(&ranges) {
            match populate(start, end) {
                Ok(n) => populated += n,
                Err(Unsupported) => break,
                Err(_) => {}
            }
        }
        let top = (0..blocks.len())
            .max_by_key(|&i| blocks[i].as_ptr() as usize)
            .unwrap_or(0);
        let guard = blocks.swap_remove(top);
        drop(blocks);
        Self {
            _guard: Some(guard),
            bytes: populated,
        }
    }

    /// Bytes faulted in (0 where the kernel cannot populate).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Adjacent ranges joined where less than a page separates them (the allocator's chunk
/// headers): one populate call per run instead of one per block.
fn runs(sorted: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &(s, e) in sorted {
        match out.last_mut() {
            Some(last) if s <= last.1 + PAGE => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

const PAGE: usize = 4096;

/// Why a run was not populated.
#[derive(Debug)]
enum NotPopulated {
    /// The kernel has no `MADV_POPULATE_WRITE`: stop trying.
    Unsupported,
    /// This run only (a hole in it, or memory short): go on with the others.
    Failed,
}
use NotPopulated::Unsupported;

/// Populates the whole pages of `[start, end)` for writing.
#[cfg(target_os = "linux")]
fn populate(start: usize, end: usize) -> Result<usize, NotPopulated> {
    let from = start.next_multiple_of(PAGE);
    let to = end / PAGE * PAGE;
    if to <= from {
        return Ok(0);
    }
    // SAFETY: the range lies within memory this thread just allocated, with at most the
    // allocator's own headers between blocks; populating maps pages and changes no byte, and
    // a hole in the range is refused by the kernel, not touched.
    let r = unsafe {
        libc::madvise(
            from as *mut libc::c_void,
            to - from,
            libc::MADV_POPULATE_WRITE,
        )
    };
    match r {
        0 => Ok(to - from),
        _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) => {
            Err(Unsupported)
        }
        _ => Err(NotPopulated::Failed),
    }
}

#[cfg(not(target_os = "linux"))]
fn populate(_start: usize, _end: usize) -> Result<usize, NotPopulated> {
    Err(Unsupported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_join_blocks_a_header_apart_and_keep_gaps() {
        let r = runs(&[
            (0, 100),
            (116, 200),
            (200, 300),
            (9000, 9100),
            (9100, 9000 + 50),
        ]);
        assert_eq!(r, vec![(0, 300), (9000, 9100)]);
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn a_tiny_transfer_allocates_nothing() {
        let p = Prefaulted::heap(Prefaulted::BLOCK);
        assert!(p._guard.is_none());
        assert_eq!(p.bytes(), 0);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn it_faults_in_about_what_was_asked_and_keeps_one_block() {
        let p = Prefaulted::heap(4 << 20);
        assert_eq!(
            p._guard.as_ref().map(Vec::capacity),
            Some(Prefaulted::BLOCK)
        );
        // The kernel populates, or (before 5.14) nothing is counted.
        assert!(
            p.bytes() == 0 || p.bytes() >= (4 << 20) - 64 * PAGE,
            "{}",
            p.bytes()
        );
        let capped = Prefaulted::heap(usize::MAX);
        assert!(capped.bytes() <= Prefaulted::MAX_BYTES + PAGE);
    }
}
