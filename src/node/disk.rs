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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use serde::Serialize;
use tracing::{error, warn};

use crate::config::NodeConfig;
use crate::file::ChunkedFile;
use crate::proto;
use crate::replica::Sealed;

use super::shared::Shared;

pub(crate) async fn materialize_loop(shared: Arc<Shared>, path: PathBuf) {
    let mut rx = shared.applied.subscribe();
    let interval = Duration::from_millis(shared.cfg.stream.materialize_interval_ms);
    let mut written: Option<(u64, [u8; 32])> = None;
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
                match tokio::task::spawn_blocking(write).await {
                    Ok(Ok(())) => {
                        written = Some(key);
                        shared.materialized.send_replace(Some(key));
                        shared.metrics.disk_full.set(0.0);
                    }
                    Ok(Err(e)) => {
                        if crate::metrics::is_no_space(&e) {
                            shared.metrics.disk_full.set(1.0);
                        }
                        error!(node = %shared.cfg.name, "materializing {}: {e}", path.display())
                    }
                    Err(e) => error!(node = %shared.cfg.name, "materializer task: {e}"),
                }
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
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

/// Where a relay records which version its materialized file holds.
const SIDECAR: &str = "replica.json";

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
    {
        let f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&f, &rec)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
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
    let bytes = std::fs::read(path).ok()?;
    let rec: Option<Sidecar> = std::fs::read(cfg.data.join(SIDECAR))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut file =
        ChunkedFile::from_bytes(cfg.stream.chunk_size, cfg.stream.max_len, &bytes, 0).ok()?;
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
    use std::io::Write;
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
    {
        let f = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        file.write_to(&mut w)?;
        w.flush()?;
        w.get_ref().sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
