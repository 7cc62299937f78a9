//! Copies 50 MiB as 64 KiB frames into fresh memory four ways, 6 rounds each, interleaved:
//! `vec` (a heap buffer per frame, as a relay keeps a transfer today), `arena-touch` (back to
//! back into 34 MiB mappings, each page faulted at its first write), `arena-step`
//! (the same, with each 2 MiB faulted in ahead by one `MADV_POPULATE_WRITE`) and
//! `arena-block` (each whole mapping populated when it is made). Prints time and faults.
//! Run: bench/experiments/fault-in-bulk.sh
use std::time::Instant;
const N: usize = 50 << 20;
const BLOCK: usize = 34 << 20;
const STEP: usize = 2 << 20;
unsafe fn map(len: usize) -> *mut u8 {
    let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
    assert!(p != libc::MAP_FAILED);
    p as *mut u8
}
fn faults() -> u64 { let s = std::fs::read_to_string("/proc/self/stat").unwrap(); let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect(); f[7].parse().unwrap() }
fn main() {
    let src: Vec<u8> = (0..N).map(|i| (i * 31 % 251) as u8).collect();
    let chunk = 65536 + 20;
    let modes: Vec<String> = std::env::args().skip(1).collect();
    for round in 0..6 {
        for mode in &modes {
            unsafe {
                let f0 = faults();
                let t = Instant::now();
                let mut blocks: Vec<*mut u8> = Vec::new();
                let mut kept: Vec<Vec<u8>> = Vec::new();
                match mode.as_str() {
                    "vec" => { for c in src.chunks(chunk) { let mut v = Vec::with_capacity(c.len()); v.extend_from_slice(c); kept.push(v); } }
                    "arena-touch" | "arena-step" | "arena-block" => {
                        let mut base = std::ptr::null_mut(); let mut used = BLOCK; let mut populated = 0usize;
                        for c in src.chunks(chunk) {
                            if used + c.len() > BLOCK {
                                base = map(BLOCK); blocks.push(base); used = 0; populated = 0;
                                if mode == "arena-block" { libc::madvise(base as _, BLOCK, 23); populated = BLOCK; }
                            }
                            if mode == "arena-step" && used + c.len() > populated {
                                let len = STEP.min(BLOCK - populated);
                                libc::madvise(base.add(populated) as _, len, 23);
                                populated += len;
                            }
                            std::ptr::copy_nonoverlapping(c.as_ptr(), base.add(used), c.len());
                            used += c.len();
                        }
                    }
                    _ => panic!(),
                }
                let d = t.elapsed();
                println!("round {round} {mode:12} {:>6.2} ms faults {}", d.as_secs_f64()*1e3, faults() - f0);
                for b in blocks { libc::munmap(b as _, BLOCK); }
                drop(kept);
            }
        }
    }
}
