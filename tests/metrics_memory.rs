//! A node that nobody scrapes holds bounded memory for its histograms: the recorder's upkeep
//! folds the samples they queue into buckets. Measured with a counting allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Returns once two upkeeps have finished after the call, so one ran wholly after it.
fn two_upkeeps_later() {
    let deadline = Instant::now() + 4 * canopy::metrics::UPKEEP_PERIOD + Duration::from_secs(10);
    let start = canopy::metrics::upkeeps();
    while canopy::metrics::upkeeps() < start + 2 {
        assert!(Instant::now() < deadline, "no metrics upkeep ran");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn histogram_samples_are_folded_into_buckets_without_a_scrape() {
    canopy::metrics::handle();
    let h = metrics::histogram!("canopy_apply_delay_seconds", "node" => "unscraped");
    h.record(0.001);
    two_upkeeps_later();
    let before = LIVE.load(Ordering::SeqCst);
    // Each round queues 1 M samples (16 MB of queue blocks); once drained, the blocks are
    // freed as later samples come (epoch-based reclamation) and reused. Without upkeeps the
    // queue holds every sample, so the memory grows by a round's worth each round.
    let mut held = Vec::new();
    for _ in 0..3 {
        for i in 0..1_000_000 {
            h.record((i % 1000) as f64 * 1e-5);
        }
        two_upkeeps_later();
        held.push(LIVE.load(Ordering::SeqCst).saturating_sub(before));
    }
    assert!(held[0] >= 8_000_000, "samples were not queued: {held:?}");
    assert!(
        held[2] < held[0] + held[0] / 2,
        "memory grows with the samples recorded: {held:?} bytes after 1, 2, 3 M"
    );
}
