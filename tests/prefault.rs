//! A transfer's memory, faulted in ahead (`canopy::prefault`) by another thread, takes no
//! page fault when the transfer's frames are then allocated and written. Its own test
//! binary, so that no other test's thread shares (and takes) the heap it warms. glibc and
//! Linux only.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

use canopy::prefault::Prefaulted;

/// A kept frame of a 64 KiB chunk: the chunk, its prefix and its protobuf header.
const FRAME: usize = 65_556;

/// Minor page faults taken by the calling thread so far.
fn thread_faults() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) }, 0);
    ru.ru_minflt as u64
}

/// Allocates and fills `n` frames of a 64 KiB chunk's size, as a link reader keeps them;
/// returns them and the faults that took.
fn keep_frames(n: usize) -> (Vec<Vec<u8>>, u64) {
    let before = thread_faults();
    let frames: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8 | 1; FRAME]).collect();
    (frames, thread_faults() - before)
}

#[test]
fn frames_kept_after_a_prefault_take_almost_no_page_faults() {
    const FRAMES: usize = 400;
    let pages = (FRAMES * FRAME / 4096) as u64;
    // glibc's defaults, as in a fresh process: the test harness's own large buffers may have
    // raised the trim threshold, which would hide a prefault that glibc trims away at once.
    // SAFETY: mallopt only sets a tunable.
    assert_eq!(
        unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10) },
        1
    );
    std::thread::spawn(move || {
        // This thread's heap (a glibc arena of its own) exists before the cold thread
        // starts, so the cold thread cannot be handed it.
        let _mine = Box::new([1u8; 64]);
        let cold_faults = std::thread::spawn(|| keep_frames(FRAMES).1)
            .join()
            .expect("the cold thread");
        if cold_faults < pages / 2 {
            eprintln!("{cold_faults} faults for {pages} fresh pages: this machine does not fault page by page (huge pages?); nothing to compare");
            return;
        }
        // As a relay does it: the heap grown here, its pages faulted in on another thread.
        let (_warm, populate) = Prefaulted::reserve(FRAMES * FRAME * 2);
        let populated = std::thread::spawn(move || populate.run())
            .join()
            .expect("the populating thread");
        if populated == 0 {
            eprintln!("this kernel cannot populate (MADV_POPULATE_WRITE): nothing to test");
            return;
        }
        let (frames, warm_faults) = keep_frames(FRAMES);
        assert!(frames.iter().enumerate().all(|(i, f)| f[FRAME - 1] == i as u8 | 1));
        eprintln!("{pages} pages written: {cold_faults} faults cold, {warm_faults} after the prefault");
        assert!(
            warm_faults < pages / 10,
            "{warm_faults} faults for {pages} pages after faulting in {populated} bytes"
        );
    })
    .join()
    .expect("the test thread");
}
