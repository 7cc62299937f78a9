//! The relay's copy on disk: materializing the file at `--file` and loading it at start.
//!
//! Invariants:
//! - Readers of `--file` see one whole version, written at the cost of the change where the
//!   filesystem allows (see `materialize`).
//! - The record of what the file holds (`replica.json`: its version, and the core's seal over
//!   that state with the signer's certificate) is written after the file, so a crash in
//!   between leaves a record that does not match: the copy is then untrusted at start, and
//!   only its differing chunks are fetched. A copy is trusted only when the seal verifies
//!   over its recomputed content. So the record is overwritten in place and not fsynced:
//!   it reaches the disk with the kernel's writeback, and one lost or torn by a crash
//!   costs a fetch of the changed chunks, not a new inode, a rename and a journal commit
//!   on every write. It is read back only up to [`MAX_SIDECAR`] bytes.
//! - Only a version the node shows (one a core seal covers) is ever written.
//! - `--file` is written on a thread of its own, at `materialize.nice` (19 by default):
//!   where the CPU is contended, deliveries run before file writes.
//! - The materializer writes the newest version, at most once per
//!   `materialize_interval_ms`, however many versions arrive, and after a write of B bytes
//!   waits at least B / `materialize.max_bytes_per_sec`.
//! - A failed write leaves no temporary file behind. A full disk (ENOSPC, EDQUOT) does not
//!   stop the node: it goes on applying and serving its children from memory, shows
//!   `disk_full: true` in status (`canopy_disk_full` 1), retries with a backoff from 1 s
//!   to 30 s, and clears the flag by itself once a write succeeds.
//! - All-zero chunks are written as holes (the file is sparse), so a region that was only
//!   extended by a truncate costs no disk; the copy is read back chunk by chunk, bounded
//!   by `max_len` before anything is read.
//! - The record is written only after a write that made a new version visible.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use serde::Serialize;
use tracing::{error, info, warn};

use crate::config::NodeConfig;
use crate::file::ChunkedFile;
use crate::proto;
use crate::replica::Sealed;

use super::materialize::{Materializer, Outcome};
use super::shared::Shared;

/// First pause after a failed write of `--file`; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause between two attempts to write `--file` after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The thread that writes `--file`: one per materializer, at `materialize.nice`, so a node
/// whose CPU is contended runs its deliveries before its file writes. It ends when the
/// materializer's loop drops it.
struct Writer {
    jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl Writer {
    fn spawn(node: &str, nice: i32) -> std::io::Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let node = node.to_string();
        std::thread::Builder::new()
            .name("canopy-materialize".into())
            .spawn(move || {
                if let Err(e) = lower_priority(nice) {
                    warn!(node = %node, "the --file writer stays at the node's CPU priority (nice {nice} refused: {e})");
                }
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(Writer { jobs })
    }

    /// Runs `f` on the writer thread; `None` if the thread is gone (a job panicked).
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .ok()?;
        rx.await.ok()
    }
}

/// Sets the calling thread's niceness (Linux's `setpriority` on a thread id names that
/// thread alone).
#[cfg(target_os = "linux")]
fn lower_priority(nice: i32) -> std::io::Result<()> {
    if nice == 0 {
        return Ok(());
    }
    // SAFETY: gettid has no preconditions; setpriority only reads its arguments.
    let r = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_nice: i32) -> std::io::Result<()> {
    Ok(())
}

pub(crate) async fn materialize_loop(shared: Arc<Shared>, path: PathBuf, m: Materializer) {
    let writer = match Writer::spawn(&shared.cfg.name, shared.cfg.materialize.nice) {
        Ok(w) => w,
        Err(e) => {
            error!(node = %shared.cfg.name, "no thread to write {}: {e}; it is not written", path.display());
            return;
        }
    };
    let mut rx = shared.applied.subscribe();
    let interval = Duration::from_millis(shared.cfg.stream.materialize_interval_ms);
    let budget = shared.cfg.materialize.max_bytes_per_sec;
    let mut m = Some(m);
    let mut written: Option<(u64, [u8; 32])> = None;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let due = {
            let st = shared.state.lock();
            let f = st.replica.file();
            st.replica.is_synced() && written != Some((f.version(), f.root()))
        };
        // The copy to patch may still be in its grace: wait without holding a snapshot of
        // the file, which would make every write meanwhile copy the chunk it changes.
        if due {
            if let Some(d) = m.as_ref().and_then(|m| m.wait_for(Instant::now())) {
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(d) => {}
                }
                continue;
            }
        }
        let shown = due.then(|| {
            let st = shared.state.lock();
            let signers = st.replica.signer_certs();
            st.replica.is_synced().then(|| {
                let sealed = st.replica.anchor().cloned();
                let signer = sealed.as_ref().and_then(|(s, _)| {
                    signers
                        .iter()
                        .find(|c| crate::trust::fingerprint(c)[..] == s.signer[..])
                        .cloned()
                });
                (st.replica.file().clone(), sealed, signer)
            })
        });
        if let Some((file, sealed, signer)) = shown.flatten() {
            let key = (file.version(), file.root());
            if written != Some(key) {
                let Some(mut mat) = m.take() else { return };
                let sidecar = shared.cfg.data.join(SIDECAR);
                let write = move || {
                    let r = mat.write(Instant::now(), &file).and_then(|o| {
                        if let Outcome::Written { .. } = o {
                            write_sidecar(&sidecar, &file, sealed.as_ref(), signer.as_ref())?;
                        }
                        Ok(o)
                    });
                    (mat, r)
                };
                let pause = match writer.run(write).await {
                    Some((mat, r)) => {
                        m = Some(mat);
                        match r {
                            Ok(Outcome::Written { bytes, .. }) => {
                                written = Some(key);
                                shared.materialize_bytes.fetch_add(bytes, Ordering::Relaxed);
                                shared.materialize_writes.fetch_add(1, Ordering::Relaxed);
                                shared.metrics.materialized(bytes);
                                shared.materialized.send_replace(Some(key));
                                if shared.disk_full.swap(false, Ordering::AcqRel) {
                                    shared.metrics.disk_full.set(0.0);
                                    info!(node = %shared.cfg.name, version = key.0, "the disk has room again: {} written", path.display());
                                }
                                backoff = FIRST_BACKOFF;
                                paced(interval, bytes, budget)
                            }
                            Ok(Outcome::Wait(d)) => d,
                            Err(e) if crate::metrics::is_no_space(&e) => {
                                if !shared.disk_full.swap(true, Ordering::AcqRel) {
                                    shared.metrics.disk_full.set(1.0);
                                    warn!(node = %shared.cfg.name, "the disk is full: {} stays at version {} while children are served from memory; retrying, backing off up to {MAX_BACKOFF:?}: {e}", path.display(), written.map_or(0, |w| w.0));
                                }
                                next_backoff(&mut backoff)
                            }
                            Err(e) => {
                                error!(node = %shared.cfg.name, "materializing {}: {e}", path.display());
                                next_backoff(&mut backoff)
                            }
                        }
                    }
                    None => {
                        error!(node = %shared.cfg.name, "the --file writer thread failed; {} is no longer written", path.display());
                        return;
                    }
                };
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                continue;
            }
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// The pause after writing `bytes`: at least `interval`, and at least what keeps the
/// average within `budget` bytes per second (0: no budget).
fn paced(interval: Duration, bytes: u64, budget: u64) -> Duration {
    if budget == 0 {
        return interval;
    }
    interval.max(Duration::from_secs_f64(bytes as f64 / budget as f64))
}

/// The current pause, doubling the next one up to [`MAX_BACKOFF`].
fn next_backoff(backoff: &mut Duration) -> Duration {
    let now = *backoff;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    now
}

/// Where a relay records which version its materialized file holds.
const SIDECAR: &str = "replica.json";
/// Largest record read back (a seal and a signer certificate in hex are a few KiB).
const MAX_SIDECAR: usize = 1 << 20;
/// A record is padded to a multiple of this (a page), so the next one, a few bytes longer
/// or shorter, is written over the same pages.
const RECORD_PAD: usize = 4096;

#[derive(Serialize, serde::Deserialize)]
struct Sidecar {
    version: u64,
    root: String,
    length: u64,
    chunk_size: u32,
    /// The core's seal over this state (hex of the `Seal` message), the entry digest it
    /// signed (hex, empty for a state seal) and the signer's certificate (hex DER).
    #[serde(default)]
    seal: String,
    #[serde(default)]
    seal_entry: String,
    #[serde(default)]
    signer: String,
}

/// Records the version, root, shape and core seal of the file just materialized, over the
/// last record in place: padded with spaces (which JSON ignores) to whole [`RECORD_PAD`]s
/// and to the length the record file has, so a write is one `pwrite` into pages it already
/// has, with no new inode, rename or truncate; no fsync (see the module's invariants). A
/// record file more than twice the padded record (a signer's certificate dropped from it,
/// or one edited by hand) is cut to it, once.
fn write_sidecar(
    path: &Path,
    file: &ChunkedFile,
    sealed: Option<&Sealed>,
    signer: Option<&Bytes>,
) -> std::io::Result<()> {
    let rec = Sidecar {
        version: file.version(),
        root: file.root_hex(),
        length: file.len(),
        chunk_size: file.chunk_size(),
        seal: sealed.map_or_else(String::new, |(s, _)| hex::encode(s.encode_to_vec())),
        seal_entry: sealed
            .and_then(|(_, e)| e.map(hex::encode))
            .unwrap_or_default(),
        signer: signer.map_or_else(String::new, hex::encode),
    };
    let mut bytes = serde_json::to_vec(&rec)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let had = usize::try_from(f.metadata()?.len()).unwrap_or(usize::MAX);
    let pages = bytes.len().div_ceil(RECORD_PAD) * RECORD_PAD;
    let len = if (pages..=pages.saturating_mul(2).min(MAX_SIDECAR)).contains(&had) {
        had
    } else {
        pages
    };
    bytes.resize(len, b' ');
    f.write_all_at(&bytes, 0)?;
    if had > len {
        f.set_len(len as u64)?;
    }
    Ok(())
}

/// The record at `path`, if it is there, at most [`MAX_SIDECAR`] bytes (checked before it
/// is read) and well-formed. An empty or torn one (the record is not fsynced) is `None`.
fn read_sidecar(path: &Path) -> Option<Sidecar> {
    use std::io::Read;
    let f = std::fs::File::open(path).ok()?;
    if f.metadata().ok()?.len() > MAX_SIDECAR as u64 {
        return None;
    }
    let mut bytes = Vec::new();
    f.take(MAX_SIDECAR as u64 + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() > MAX_SIDECAR {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// A relay's copy found on disk, with the seal and signer its record names (the replica
/// decides whether to trust it).
pub(crate) struct LocalCopy {
    pub(crate) file: ChunkedFile,
    pub(crate) sealed: Option<Sealed>,
    pub(crate) signer: Option<Bytes>,
}

/// Reads the relay's materialized copy and its record. The record's version is taken only
/// when the recomputed root equals the recorded one; the replica then checks the seal.
pub(crate) fn load_local_copy(cfg: &NodeConfig, path: &Path) -> Option<LocalCopy> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    if len > cfg.stream.max_len {
        warn!(node = %cfg.name, path = %path.display(), len, max_len = cfg.stream.max_len, "ignoring the local copy: longer than max_len");
        return None;
    }
    let rec = read_sidecar(&cfg.data.join(SIDECAR));
    let mut reader = std::io::BufReader::with_capacity(1 << 20, &mut f);
    let mut file = ChunkedFile::from_reader(
        cfg.stream.chunk_size,
        cfg.stream.max_len,
        len,
        &mut reader,
        0,
    )
    .ok()?;
    let rec = match rec {
        Some(r) if r.chunk_size == file.chunk_size() && r.root == file.root_hex() => r,
        _ => {
            warn!(node = %cfg.name, path = %path.display(), "local copy does not match its record: fetching only the chunks that differ");
            return Some(LocalCopy {
                file,
                sealed: None,
                signer: None,
            });
        }
    };
    file.set_version(rec.version);
    let seal = hex::decode(&rec.seal)
        .ok()
        .and_then(|b| proto::Seal::decode(b.as_slice()).ok());
    let entry = hex::decode(&rec.seal_entry)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok());
    let signer = hex::decode(&rec.signer).ok().map(Bytes::from);
    Some(LocalCopy {
        file,
        sealed: seal.map(|s| (s, entry)),
        signer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay_cfg(data: &Path) -> NodeConfig {
        NodeConfig::new(
            "r1",
            "127.0.0.1:1".parse().unwrap(),
            data.to_path_buf(),
            crate::config::NodeKind::Relay {
                join: vec!["127.0.0.1:2".into()],
            },
        )
    }

    /// The record is not fsynced, so after a power failure it may be missing, empty or
    /// torn, and one edited by hand may be oversized: each leaves the copy loaded but
    /// untrusted. A record that matches is taken.
    #[test]
    fn a_damaged_record_leaves_the_copy_untrusted_and_a_matching_one_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = relay_cfg(dir.path());
        let content: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let file = ChunkedFile::from_bytes(cfg.stream.chunk_size, cfg.stream.max_len, &content, 42)
            .unwrap();
        let path = dir.path().join("table.bin");
        std::fs::write(&path, &content).unwrap();
        let record = cfg.data.join(SIDECAR);
        let untrusted = |what: &str| {
            let copy = load_local_copy(&cfg, &path).expect("the copy is loaded");
            assert_eq!(copy.file.root(), file.root(), "{what}");
            assert_eq!(copy.file.version(), 0, "{what}: no version taken");
            assert!(copy.sealed.is_none() && copy.signer.is_none(), "{what}");
        };
        untrusted("no record");
        std::fs::write(&record, b"").unwrap();
        untrusted("empty record");
        std::fs::write(&record, b"{\"version\": 42, \"root\": \"ab").unwrap();
        untrusted("torn record");
        let mut big = serde_json::to_vec(&Sidecar {
            version: 42,
            root: file.root_hex(),
            length: file.len(),
            chunk_size: file.chunk_size(),
            seal: String::new(),
            seal_entry: String::new(),
            signer: String::new(),
        })
        .unwrap();
        big.resize(MAX_SIDECAR + 1, b' ');
        std::fs::write(&record, &big).unwrap();
        untrusted("record over MAX_SIDECAR");
        write_sidecar(&record, &file, None, None).unwrap();
        let copy = load_local_copy(&cfg, &path).expect("the copy is loaded");
        assert_eq!(copy.file.version(), 42);
        assert_eq!(copy.file.root(), file.root());
        assert_eq!(
            std::fs::metadata(&record).unwrap().len() as usize,
            RECORD_PAD
        );
        let longer = vec![b'x'; 3 * RECORD_PAD];
        write_sidecar(&record, &file, None, Some(&Bytes::from(longer))).unwrap();
        assert_eq!(
            std::fs::metadata(&record).unwrap().len() as usize,
            7 * RECORD_PAD,
            "a longer record grows to whole pages"
        );
        let shorter = vec![b'x'; 3 * RECORD_PAD / 2];
        write_sidecar(&record, &file, None, Some(&Bytes::from(shorter))).unwrap();
        assert_eq!(
            std::fs::metadata(&record).unwrap().len() as usize,
            7 * RECORD_PAD,
            "a shorter one within half of the pages is written over the same pages"
        );
        write_sidecar(&record, &file, None, None).unwrap();
        assert_eq!(
            std::fs::metadata(&record).unwrap().len() as usize,
            RECORD_PAD,
            "one under half of them cuts the file to its own pages"
        );
        let copy = load_local_copy(&cfg, &path).expect("the copy is loaded");
        assert_eq!(
            copy.file.version(),
            42,
            "the padded, shorter record is read"
        );
        assert!(
            copy.signer.is_none_or(|s| s.is_empty()),
            "nothing of the longer record is left"
        );
    }
}
