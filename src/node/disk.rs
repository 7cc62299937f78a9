//! The relay's copy on disk: materializing the file at `--file` and loading it at start.
//!
//! Invariants:
//! - Readers of `--file` see one whole version: it is written to a temporary file, fsynced,
//!   renamed over the old one, and the directory fsynced.
//! - The record of what the file holds (`replica.json`: its version, and the core's seal over
//!   that state with the signer's certificate) is written after the file, so a crash in
//!   between leaves a record that does not match: the copy is then untrusted at start, and
//!   only its differing chunks are fetched. A copy is trusted only when the seal verifies
//!   over its recomputed content.
//! - Only a version the node shows (one a core seal covers) is ever written.
//! - The materializer writes the newest version, at most once per
//!   `materialize_interval_ms`, however many versions arrive.
//! - A failed write leaves no temporary file behind. A full disk (ENOSPC, EDQUOT) does not
//!   stop the node: it goes on applying and serving its children from memory, shows
//!   `disk_full: true` in status (`canopy_disk_full` 1), retries with a backoff from 1 s
//!   to 30 s, and clears the flag by itself once a write succeeds.
//! - All-zero chunks are written as holes (the file is sparse), so a region that was only
//!   extended by a truncate costs no disk; the copy is read back chunk by chunk, bounded
//!   by `max_len` before anything is read.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use serde::Serialize;
use tracing::{error, info, warn};

use crate::config::NodeConfig;
use crate::file::ChunkedFile;
use crate::proto;
use crate::replica::Sealed;

use super::shared::Shared;

/// First pause after a failed write of `--file`; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause between two attempts to write `--file` after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub(crate) async fn materialize_loop(shared: Arc<Shared>, path: PathBuf) {
    let mut rx = shared.applied.subscribe();
    let interval = Duration::from_millis(shared.cfg.stream.materialize_interval_ms);
    let mut written: Option<(u64, [u8; 32])> = None;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let shown = {
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
        };
        if let Some((file, sealed, signer)) = shown {
            let key = (file.version(), file.root());
            if written != Some(key) {
                let p = path.clone();
                let sidecar = shared.cfg.data.join(SIDECAR);
                let write = move || {
                    write_atomically(&p, &file)?;
                    write_sidecar(&sidecar, &file, sealed.as_ref(), signer.as_ref())
                };
                let pause = match tokio::task::spawn_blocking(write).await {
                    Ok(Ok(())) => {
                        written = Some(key);
                        shared.materialized.send_replace(Some(key));
                        if shared.disk_full.swap(false, Ordering::AcqRel) {
                            shared.metrics.disk_full.set(0.0);
                            info!(node = %shared.cfg.name, version = key.0, "the disk has room again: {} written", path.display());
                        }
                        backoff = FIRST_BACKOFF;
                        interval
                    }
                    Ok(Err(e)) if crate::metrics::is_no_space(&e) => {
                        if !shared.disk_full.swap(true, Ordering::AcqRel) {
                            shared.metrics.disk_full.set(1.0);
                            warn!(node = %shared.cfg.name, "the disk is full: {} stays at version {} while children are served from memory; retrying, backing off up to {MAX_BACKOFF:?}: {e}", path.display(), written.map_or(0, |w| w.0));
                        }
                        next_backoff(&mut backoff)
                    }
                    Ok(Err(e)) => {
                        error!(node = %shared.cfg.name, "materializing {}: {e}", path.display());
                        next_backoff(&mut backoff)
                    }
                    Err(e) => {
                        error!(node = %shared.cfg.name, "materializer task: {e}");
                        next_backoff(&mut backoff)
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

/// Records the version, root, shape and core seal of the file just materialized (temp +
/// fsync + rename).
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
    let tmp = path.with_extension("json.tmp");
    let written = (|| {
        let f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&f, &rec)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
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
    let rec: Option<Sidecar> = std::fs::read(cfg.data.join(SIDECAR))
        .ok()
        .filter(|b| b.len() <= MAX_SIDECAR)
        .and_then(|b| serde_json::from_slice(&b).ok());
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

/// Writes `file` to a temporary file next to `path`, fsyncs it, renames it over `path` and
/// fsyncs the directory, so readers see either the old or the new version, whole.
pub fn write_atomically(path: &Path, file: &ChunkedFile) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.canopy-tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let written = write_sparse(&tmp, file).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `file` to `tmp` and fsyncs it; runs of all-zero chunks are left as holes.
fn write_sparse(tmp: &Path, file: &ChunkedFile) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let f = std::fs::File::create(tmp)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let cs = u64::from(file.chunk_size());
    let zero_leaf = crate::file::leaf_hash(&vec![0u8; cs as usize]);
    let mut hole = false;
    for i in 0..file.chunk_count() {
        let chunk = file.chunk(i).unwrap_or_default();
        let zero = if chunk.len() as u64 == cs {
            file.chunk_hash(i) == Some(zero_leaf)
        } else {
            chunk.iter().all(|b| *b == 0)
        };
        if zero {
            w.seek(SeekFrom::Current(chunk.len() as i64))?;
            hole = true;
        } else {
            w.write_all(&chunk)?;
            hole = false;
        }
    }
    w.flush()?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    if hole {
        f.set_len(file.len())?;
    }
    f.sync_all()
}
