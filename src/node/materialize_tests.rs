use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::config::{MaterializeConfig, MaterializeMode};
use crate::file::{ChunkedFile, Op, Update};

const CS: u32 = 64 * 1024;
const MAX: u64 = 1 << 30;

fn cfg(mode: MaterializeMode, copies: u32, grace_ms: u64) -> MaterializeConfig {
    MaterializeConfig {
        mode,
        grace_ms,
        copies,
        max_bytes_per_sec: 0,
        nice: 0,
    }
}

fn file_of(bytes: &[u8], version: u64) -> ChunkedFile {
    ChunkedFile::from_bytes(CS, MAX, bytes, version).unwrap()
}

fn write_at(f: &ChunkedFile, offset: u64, data: &[u8]) -> ChunkedFile {
    let mut n = f.clone();
    let u = Update {
        ops: vec![Op::Write {
            offset,
            data: Bytes::copy_from_slice(data),
        }],
    };
    n.apply(f.version() + 1, &u).unwrap();
    n
}

fn seeded(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

fn written(o: Outcome) -> (u64, bool) {
    match o {
        Outcome::Written { bytes, whole } => (bytes, whole),
        Outcome::Wait(d) => panic!("expected a write, got a wait of {d:?}"),
    }
}

#[test]
fn auto_picks_swap_where_cloning_fails_and_a_forced_reflink_is_refused_there() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    let reflink = probe(dir.path(), Probe::Reflink).is_ok();
    let m = Materializer::open(&path, &cfg(MaterializeMode::Auto, 3, 0), None).unwrap();
    let forced = Materializer::open(&path, &cfg(MaterializeMode::Reflink, 3, 0), None);
    if reflink {
        assert_eq!(m.method(), Method::Reflink);
        assert!(forced.is_ok());
    } else {
        assert_eq!(m.method(), Method::Swap);
        let e = forced.err().expect("a forced reflink where FICLONE fails");
        assert!(
            e.to_string().contains("materialize.mode = \"reflink\""),
            "{e}"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(leftovers.is_empty(), "probes left {leftovers:?}");
}

#[test]
fn swap_patches_only_the_pages_changed_since_each_copy_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    let mut m = Materializer::open(&path, &cfg(MaterializeMode::Swap, 2, 0), None).unwrap();
    assert_eq!(m.method(), Method::Swap);
    let t = Instant::now();
    let v1 = file_of(&seeded(1 << 20), 1);
    assert_eq!(written(m.write(t, &v1).unwrap()), (1 << 20, true));
    assert_eq!(std::fs::read(&path).unwrap(), v1.to_vec());
    let v2 = write_at(&v1, 100_000, &[0xAA; 100]);
    assert_eq!(
        written(m.write(t, &v2).unwrap()),
        (1 << 20, true),
        "the second copy's content is not known yet"
    );
    assert_eq!(std::fs::read(&path).unwrap(), v2.to_vec());
    let v3 = write_at(&v2, 500_000, &[0xBB; 100]);
    assert_eq!(
        written(m.write(t, &v3).unwrap()),
        (2 * PAGE as u64, false),
        "copy 0 held v1: v2's page and v3's page"
    );
    assert_eq!(std::fs::read(&path).unwrap(), v3.to_vec());
    let v4 = write_at(&v3, 8190, &[0xCC; 4]);
    assert_eq!(
        written(m.write(t, &v4).unwrap()),
        (3 * PAGE as u64, false),
        "copy 1 held v2: v3's page and the two pages v4's write spans"
    );
    assert_eq!(std::fs::read(&path).unwrap(), v4.to_vec());
}

/// A chunk written in place is known to the image by its pages' chaining values: the image
/// holds none of its bytes, so the next write changes it in place, and a patch compares
/// its pages by those values.
#[test]
fn an_image_compares_a_chunk_changed_in_place_by_its_pages_chaining_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    let mut m = Materializer::open(&path, &cfg(MaterializeMode::Swap, 2, 0), None).unwrap();
    let t = Instant::now();
    let mut f = file_of(&seeded(1 << 20), 1);
    let write = |f: &mut ChunkedFile, offset: u64, byte: u8| {
        let u = Update {
            ops: vec![Op::Write {
                offset,
                data: Bytes::from(vec![byte; 100]),
            }],
        };
        f.apply(f.version() + 1, &u).unwrap();
    };
    assert_eq!(written(m.write(t, &f).unwrap()), (1 << 20, true));
    write(&mut f, 100_000, 0xAA);
    assert_eq!(written(m.write(t, &f).unwrap()), (1 << 20, true));
    let at = f.chunk(1).unwrap().as_ptr();
    write(&mut f, 100_500, 0xBB);
    assert_eq!(
        f.chunk(1).unwrap().as_ptr(),
        at,
        "the images hold no bytes of chunk 1: the write changes it in place"
    );
    assert_eq!(
        written(m.write(t, &f).unwrap()),
        (PAGE as u64, false),
        "copy 0 held v1 by its bytes: the one page both writes changed"
    );
    assert_eq!(std::fs::read(&path).unwrap(), f.to_vec());
    write(&mut f, 110_000, 0xCC);
    assert_eq!(f.chunk(1).unwrap().as_ptr(), at);
    assert_eq!(
        written(m.write(t, &f).unwrap()),
        (2 * PAGE as u64, false),
        "copy 1 held v2 by chaining values: v3's page and v4's"
    );
    assert_eq!(std::fs::read(&path).unwrap(), f.to_vec());
}

#[test]
fn a_reader_keeps_a_whole_version_through_the_next_write() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    let mut m = Materializer::open(&path, &cfg(MaterializeMode::Swap, 2, 0), None).unwrap();
    let t = Instant::now();
    let v1 = file_of(&seeded(300_000), 1);
    written(m.write(t, &v1).unwrap());
    let mut reader = std::fs::File::open(&path).unwrap();
    let v2 = write_at(&v1, 0, &[9; 200_000]);
    written(m.write(t, &v2).unwrap());
    let mut seen = Vec::new();
    reader.read_to_end(&mut seen).unwrap();
    assert_eq!(seen, v1.to_vec(), "the open file still holds v1");
    assert_eq!(std::fs::read(&path).unwrap(), v2.to_vec());
}

#[test]
fn swap_waits_out_the_grace_and_a_reader_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    let mut m = Materializer::open(&path, &cfg(MaterializeMode::Swap, 2, 1000), None).unwrap();
    let t = Instant::now();
    let v1 = file_of(&seeded(100_000), 1);
    let v2 = write_at(&v1, 10, b"two");
    let v3 = write_at(&v2, 20, b"three");
    assert_eq!(m.wait_for(t), None, "nothing written yet");
    written(m.write(t, &v1).unwrap());
    let t = t + Duration::from_secs(1);
    written(m.write(t, &v2).unwrap());
    assert_eq!(
        m.wait_for(t + Duration::from_millis(400)),
        Some(Duration::from_millis(600)),
        "the wait, told without touching the disk"
    );
    assert_eq!(m.wait_for(t + Duration::from_millis(1000)), None);
    assert_eq!(
        m.write(t + Duration::from_millis(400), &v3).unwrap(),
        Outcome::Wait(Duration::from_millis(600)),
        "copy 0 stopped being --file at t"
    );
    let held = std::fs::File::open(&path).unwrap();
    let retired = std::fs::File::open(dir.path().join(".data.bin.canopy-0")).unwrap();
    use std::os::unix::io::AsRawFd;
    // SAFETY: the descriptor is open for both calls.
    assert_eq!(
        unsafe { libc::flock(retired.as_raw_fd(), libc::LOCK_SH) },
        0
    );
    let later = t + Duration::from_secs(1);
    assert_eq!(
        m.write(later, &v3).unwrap(),
        Outcome::Wait(RETRY_LOCKED),
        "a reader holds a shared lock on copy 0"
    );
    assert_eq!(
        unsafe { libc::flock(retired.as_raw_fd(), libc::LOCK_UN) },
        0
    );
    written(m.write(later, &v3).unwrap());
    assert_eq!(std::fs::read(&path).unwrap(), v3.to_vec());
    use std::io::Read;
    let mut seen = Vec::new();
    (&held).read_to_end(&mut seen).unwrap();
    assert_eq!(
        seen,
        v2.to_vec(),
        "copy 1, still in its grace, is untouched"
    );
}

/// Under steady writes the copies are written `grace / (copies - 1)` apart, not in a pair
/// as soon as each leaves its grace and then not at all for nearly a grace: `--file`
/// trails the newest version by at most the spacing. A lone write after a quiet spell is
/// written at once.
#[test]
fn swap_spaces_its_writes_evenly_under_steady_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    let mut m = Materializer::open(&path, &cfg(MaterializeMode::Swap, 3, 2000), None).unwrap();
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let mut f = file_of(&seeded(100_000), 1);
    let mut log = Vec::new();
    for step in 0..40u64 {
        let now = ms(step * 250);
        f = write_at(&f, step * 1000, &[step as u8; 10]);
        if m.wait_for(now).is_none() {
            written(m.write(now, &f).unwrap());
            log.push(step * 250);
        }
    }
    assert_eq!(
        log,
        [0, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000],
        "a write every 250 ms, --file replaced every second"
    );
    let quiet = ms(9000 + 5000);
    assert_eq!(m.wait_for(quiet), None, "after a quiet spell: at once");
    written(m.write(quiet, &f).unwrap());
    assert_eq!(
        m.wait_for(quiet + Duration::from_millis(250)),
        Some(Duration::from_millis(750))
    );
    assert_eq!(std::fs::read(&path).unwrap(), f.to_vec());
}

#[test]
fn a_restart_patches_the_copy_it_loaded_and_rewrites_the_unknown_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    let c = cfg(MaterializeMode::Swap, 2, 0);
    let t = Instant::now();
    let v1 = file_of(&seeded(1 << 20), 1);
    let v2 = write_at(&v1, 0, b"v2");
    {
        let mut m = Materializer::open(&path, &c, None).unwrap();
        written(m.write(t, &v1).unwrap());
        written(m.write(t, &v2).unwrap());
    }
    let loaded = file_of(&std::fs::read(&path).unwrap(), 2);
    let mut m = Materializer::open(&path, &c, Some(loaded)).unwrap();
    let v3 = write_at(&v2, 200_000, b"v3");
    assert_eq!(
        written(m.write(t, &v3).unwrap()),
        (1 << 20, true),
        "copy 0 is not known after a restart"
    );
    let v4 = write_at(&v3, 900_000, b"v4");
    assert_eq!(
        written(m.write(t, &v4).unwrap()),
        (2 * PAGE as u64, false),
        "copy 1 is the one loaded (v2): v3's and v4's pages"
    );
    assert_eq!(std::fs::read(&path).unwrap(), v4.to_vec());
}

#[test]
fn rewrite_writes_the_whole_file_and_leaves_zero_chunks_as_holes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    let mut m = Materializer::open(&path, &cfg(MaterializeMode::Rewrite, 2, 0), None).unwrap();
    let mut bytes = vec![0u8; 4 * CS as usize];
    bytes[CS as usize..2 * CS as usize].fill(5);
    let v1 = file_of(&bytes, 1);
    assert_eq!(
        written(m.write(Instant::now(), &v1).unwrap()),
        (CS as u64, true)
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["data.bin".to_string()],
        "no temporary file left"
    );
}

#[test]
fn switching_away_from_swap_removes_its_copies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    let t = Instant::now();
    let v1 = file_of(&seeded(70_000), 1);
    let mut m = Materializer::open(&path, &cfg(MaterializeMode::Swap, 3, 0), None).unwrap();
    written(m.write(t, &v1).unwrap());
    assert!(dir.path().join(".data.bin.canopy-0").exists());
    let mut m = Materializer::open(&path, &cfg(MaterializeMode::Rewrite, 3, 0), None).unwrap();
    assert!(!dir.path().join(".data.bin.canopy-0").exists());
    assert_eq!(std::fs::read(&path).unwrap(), v1.to_vec());
    let v2 = write_at(&v1, 5, b"x");
    written(m.write(t, &v2).unwrap());
    assert_eq!(std::fs::read(&path).unwrap(), v2.to_vec());
}

/// Applies `ops` to `f` as its next version.
fn apply_next(f: &mut ChunkedFile, ops: Vec<Op>) {
    let v = f.version() + 1;
    f.apply(v, &Update { ops }).unwrap();
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..400_000, prop::collection::vec(any::<u8>(), 0..9000)).prop_map(|(offset, d)| Op::Write {
            offset,
            data: Bytes::from(d),
        }),
        1 => (0u64..450_000).prop_map(|len| Op::Truncate { len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A file holding version A (itself updated in place, so chunks of it have their pages'
    /// chaining values), patched from `Image::of(A)` after updates made with no snapshot
    /// held (truncates shrink and regrow it; writes land in the last partial chunk), holds
    /// the new version.
    #[test]
    fn a_patch_from_an_image_gives_the_new_version(
        start in prop::collection::vec(any::<u8>(), 0..300_000),
        before in prop::collection::vec(prop::collection::vec(op_strategy(), 1..4), 0..4),
        updates in prop::collection::vec(prop::collection::vec(op_strategy(), 1..4), 1..5),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = file_of(&start, 1);
        for ops in before {
            apply_next(&mut f, ops);
        }
        let disk = create(&path).unwrap();
        write_whole(&disk, &f).unwrap();
        let image = Image::of(&f);
        for ops in updates {
            apply_next(&mut f, ops);
        }
        patch(&disk, &image, &f).unwrap();
        prop_assert_eq!(std::fs::read(&path).unwrap(), f.to_vec());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// After every write, in every method and number of copies, `--file` holds exactly the
    /// model's bytes.
    #[test]
    fn every_version_written_is_the_models_bytes(
        start in prop::collection::vec(any::<u8>(), 0..200_000),
        updates in prop::collection::vec(prop::collection::vec(op_strategy(), 1..4), 1..8),
        copies in 2u32..4,
        mode in 0u8..3,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mode = [MaterializeMode::Swap, MaterializeMode::Auto, MaterializeMode::Rewrite][mode as usize];
        let mut m = Materializer::open(&path, &cfg(mode, copies, 0), None).unwrap();
        let mut f = file_of(&start, 1);
        let t = Instant::now();
        written(m.write(t, &f).unwrap());
        prop_assert_eq!(std::fs::read(&path).unwrap(), f.to_vec());
        for ops in updates {
            apply_next(&mut f, ops);
            written(m.write(t, &f).unwrap());
            prop_assert_eq!(std::fs::read(&path).unwrap(), f.to_vec());
        }
    }
}
