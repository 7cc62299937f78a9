//! Heap memory faulted in ahead of a transfer, so that the copies a join makes land in
//! pages the process already has.
//!
//! A relay that joins keeps every byte of the file it receives, so its heap grows by the
//! file's size, and each new page costs a trap at its first write (about 2 µs on a VM; 25 ms
//! for 50 MB). [`Prefaulted::reserve`] grows the calling thread's heap by the transfer's
//! size at once and frees it again; its [`Populate`] faults the pages in with one
//! `MADV_POPULATE_WRITE` per contiguous run (about half the cost per page), on another
//! thread if the caller likes, while the caller goes on. quinn's datagram buffers and the
//! kept frames are then cut from memory already in place (docs/benchmarks.md, "A join's heap
//! faulted in ahead"). It assumes glibc's allocator and that the calling thread is the one that allocates what the transfer
//! keeps (a relay's one tokio worker).
//!
//! Invariants:
//! - Nothing is written to the memory, and no byte the process holds changes: populating a
//!   page only maps it, whether the allocator has handed it out again or not.
//! - At most [`Prefaulted::MAX_BYTES`] per call, in blocks under glibc's default `mmap`
//!   threshold, so that they come from the thread's heap and go back to it. An allocation
//!   that fails ends the growth; it never aborts the process.
//! - The last block allocated stays allocated while the [`Prefaulted`] or its [`Populate`]
//!   lives, whichever is dropped last. The blocks are cut from the heap's top once the free
//!   memory below is used, so the last one borders the top, the freed ones lie below it, and
//!   glibc neither trims them away nor deletes their heap while they are populated.
//!   Dropping both lets glibc trim what lies at the top unused.
//! - One `madvise` covers at most [`SLICE`] bytes, so that a thread mapping memory meanwhile
//!   (the worker, receiving) waits on the address space's lock for one slice at most.
//! - Where the kernel cannot populate (Linux before 5.14, found by one probe) or the
//!   allocator is not glibc's, nothing is allocated, and the pages fault as they are
//!   written, as before.

use std::sync::{Arc, OnceLock};

/// Memory faulted in for a transfer; keep it until the transfer ends.
#[derive(Debug, Default)]
pub struct Prefaulted {
    /// The last block allocated, kept so that the others, freed, are not the heap's top;
    /// shared with the [`Populate`] of the same growth.
    _guard: Option<Arc<Vec<u8>>>,
}

/// Most bytes one `madvise` populates: 2 MiB, under a millisecond of the kernel's time.
pub const SLICE: usize = 2 << 20;

/// Whether this kernel and allocator can populate: one probe, on first use. Where they
/// cannot, [`Prefaulted::reserve`] allocates nothing.
pub fn can_populate() -> bool {
    static CAN: OnceLock<bool> = OnceLock::new();
    *CAN.get_or_init(|| cfg!(all(target_os = "linux", target_env = "gnu")) && probe())
}

impl Prefaulted {
    /// Most bytes one call faults in: 48 MiB, about 15 ms of one core's time on this VM,
    /// a bounded cost however large the file, and room to spare in one of glibc's 64 MiB
    /// thread heaps; a larger transfer's remainder faults as it arrives.
    pub const MAX_BYTES: usize = 48 << 20;
    /// One block: 124 KiB, under glibc's default `mmap` threshold (128 KiB, which only
    /// rises by itself) with room for its header, so that it is cut from the heap and freed
    /// back to it; as large as that allows, since each block's header costs one trap.
    pub const BLOCK: usize = 124 << 10;

    /// Grows the calling thread's heap by about `bytes` (at most
    /// [`Prefaulted::MAX_BYTES`]) and frees it again, all but the guard block, without
    /// faulting it in: the returned [`Populate`] does that, on any thread (another core,
    /// while this thread goes on receiving). Call on the thread that will allocate what the
    /// transfer keeps, when the transfer's size is known and before its data flows, and keep
    /// the `Prefaulted` until the transfer ends.
    pub fn reserve(bytes: usize) -> (Self, Populate) {
        let n = bytes.min(Self::MAX_BYTES) / Self::BLOCK;
        if n < 2 || !can_populate() {
            return (Self::default(), Populate::default());
        }
        let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(n);
        for _ in 0..n {
            let mut b = Vec::new();
            if b.try_reserve_exact(Self::BLOCK).is_err() {
                break;
            }
            blocks.push(b);
        }
        let mut ranges: Vec<(usize, usize)> = blocks
            .iter()
            .map(|b| (b.as_ptr() as usize, b.as_ptr() as usize + b.capacity()))
            .collect();
        ranges.sort_unstable();
        let guard = blocks.pop().map(Arc::new);
        drop(blocks);
        let populate = Populate {
            runs: runs(&ranges),
            _guard: guard.clone(),
        };
        (Self { _guard: guard }, populate)
    }
}

/// The pages of a heap growth to fault in ([`Prefaulted::reserve`]).
#[derive(Debug, Default)]
pub struct Populate {
    runs: Vec<(usize, usize)>,
    /// The growth's guard block: the runs stay in the heap while this lives.
    _guard: Option<Arc<Vec<u8>>>,
}

impl Populate {
    /// Whether there is nothing to fault in (a growth too small, or a kernel that cannot).
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Faults the pages in, with `MADV_POPULATE_WRITE` over each contiguous run in slices of
    /// at most [`SLICE`], on the calling thread; returns the bytes faulted in. The ranges
    /// are free for the allocator to hand out meanwhile, which populating does not disturb.
    pub fn run(self) -> usize {
        let mut populated = 0;
        for &(start, end) in &self.runs {
            let mut at = start;
            while at < end {
                let to = end.min(at.saturating_add(SLICE));
                populated += populate(at, to);
                at = to;
            }
        }
        populated
    }
}

/// glibc's smallest chunk: two blocks closer than this have nothing but the allocator's
/// header between them.
const MIN_CHUNK: usize = 32;

/// Adjacent ranges joined where only an allocator header separates them: one populate
/// call per run of contiguous blocks instead of one per block.
fn runs(sorted: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &(s, e) in sorted {
        match out.last_mut() {
            Some(last) if s < last.1 + MIN_CHUNK => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096).max(1)
}

/// Whether the kernel knows `MADV_POPULATE_WRITE`: advice over no bytes is checked and
/// then does nothing (0), unknown advice is refused (`EINVAL`).
#[cfg(target_os = "linux")]
fn probe() -> bool {
    let page = page_size();
    let here = 0u8;
    let at = (&here as *const u8 as usize) / page * page;
    // SAFETY: an empty range; the kernel only checks the advice and the alignment.
    unsafe { libc::madvise(at as *mut libc::c_void, 0, libc::MADV_POPULATE_WRITE) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn probe() -> bool {
    false
}

/// Populates the whole pages of `[start, end)` for writing; returns the bytes populated, 0
/// where the kernel refused (memory short, or the range no longer mapped writable: the next
/// range is tried all the same).
#[cfg(target_os = "linux")]
fn populate(start: usize, end: usize) -> usize {
    let page = page_size();
    let from = start.next_multiple_of(page);
    let to = end / page * page;
    if to <= from {
        return 0;
    }
    // SAFETY: the range lies within blocks just allocated from a glibc heap and freed back
    // to it, with only the allocator's chunk headers between adjacent ones (`runs`); the
    // guard block, held by the caller's `Populate`, keeps the heap from being trimmed, so
    // the range stays this heap's, in use or not. Populating maps pages and changes no byte,
    // whoever uses them; a range no longer mapped writable fails and is skipped.
    let r = unsafe {
        libc::madvise(
            from as *mut libc::c_void,
            to - from,
            libc::MADV_POPULATE_WRITE,
        )
    };
    if r == 0 {
        to - from
    } else {
        0
    }
}

#[cfg(not(target_os = "linux"))]
fn populate(_start: usize, _end: usize) -> usize {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_join_blocks_only_a_header_apart() {
        let r = runs(&[
            (0, 100),
            (116, 200),
            (200, 300),
            (332, 400),
            (9000, 9100),
            (9100, 9000 + 50),
        ]);
        assert_eq!(r, vec![(0, 300), (332, 400), (9000, 9100)]);
        assert!(runs(&[]).is_empty());
    }

    /// The guard block lives as long as either half: a transfer that ends (or fails) while
    /// its pages are still being populated does not let glibc trim them meanwhile.
    #[test]
    fn the_guard_outlives_the_transfer_while_populating() {
        let (warm, populate) = Prefaulted::reserve(3 * SLICE);
        if !can_populate() {
            assert!(warm._guard.is_none() && populate._guard.is_none());
            return;
        }
        let guard = Arc::downgrade(warm._guard.as_ref().expect("a guard block"));
        drop(warm);
        assert!(guard.upgrade().is_some(), "freed while populating");
        let bytes = populate.run();
        assert!(guard.upgrade().is_none(), "held after both ended");
        // Three slices and more of 124 KiB blocks, all but a few pages at their seams.
        assert!(bytes > 2 * SLICE, "{bytes} bytes populated");
    }

    #[test]
    fn a_tiny_transfer_allocates_nothing() {
        let (p, populate) = Prefaulted::reserve(Prefaulted::BLOCK);
        assert!(p._guard.is_none());
        assert!(populate.is_empty());
        assert_eq!(populate.run(), 0);
    }

    #[test]
    fn it_faults_in_about_what_was_asked_and_keeps_one_block() {
        let (p, populate) = Prefaulted::reserve(4 << 20);
        if !can_populate() {
            // This kernel or allocator cannot: nothing is kept.
            assert!(p._guard.is_none());
            return;
        }
        let bytes = populate.run();
        assert_eq!(
            p._guard.as_ref().map(|g| g.capacity()),
            Some(Prefaulted::BLOCK)
        );
        let blocks = (4 << 20) / Prefaulted::BLOCK;
        let floor = blocks * Prefaulted::BLOCK - blocks * 2 * page_size();
        assert!(bytes >= floor, "{bytes} < {floor}");
        let (_capped, populate) = Prefaulted::reserve(usize::MAX);
        assert!(populate.run() <= Prefaulted::MAX_BYTES);
    }
}
