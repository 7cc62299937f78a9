//! The relay's copy on disk: materializing the file at `--file` and loading it at start.
//!
//! Invariants:
//! - Readers of `--file` see one whole version: it is written to a temporary file, fsynced,
//!   renamed over the old one, and the directory fsynced.
//! - The record of what the file holds (`replica.json`) is written after the file, so a
//!   crash in between leaves a record that does not match: the copy is then untrusted at
//!   start, and only its differing chunks are fetched.
//! - The materializer writes the newest version, at most once per
//!   `materialize_interval_ms`, however many versions arrive.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tracing::{error, warn};

use crate::config::NodeConfig;
use crate::file::ChunkedFile;

use super::shared::Shared;

pub(crate) async fn materialize_loop(shared: Arc<Shared>, path: PathBuf) {
    let mut rx = shared.applied.subscribe();
    let interval = Duration::from_millis(shared.cfg.stream.materialize_interval_ms);
    let mut written: Option<(u64, [u8; 32])> = None;
    loop {
        let file = {
            let st = shared.state.lock();
            st.replica.is_synced().then(|| st.replica.file().clone())
        };
        if let Some(file) = file {
            let key = (file.version(), file.root());
            if written != Some(key) {
                let p = path.clone();
                let version = file.version();
                let sidecar = shared.cfg.data.join(SIDECAR);
                let write = move || {
                    write_atomically(&p, &file)?;
                    write_sidecar(&sidecar, &file)
                };
                match tokio::task::spawn_blocking(write).await {
                    Ok(Ok(())) => {
                        written = Some(key);
                        shared.materialized.send_replace(Some(version));
                        shared.metrics.materialized_version.set(version as f64);
                    }
                    Ok(Err(e)) => {
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
}

/// Records the version, root and shape of the file just materialized (temp + fsync +
/// rename). A crash between the file and this record leaves a record whose root does not
/// match the file: the copy is then untrusted, and only its differing chunks are fetched.
fn write_sidecar(path: &Path, file: &ChunkedFile) -> std::io::Result<()> {
    let rec = Sidecar {
        version: file.version(),
        root: file.root_hex(),
        length: file.len(),
        chunk_size: file.chunk_size(),
    };
    let tmp = path.with_extension("json.tmp");
    {
        let f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&f, &rec)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads the relay's materialized copy and its record; the copy is trusted only when its
/// recomputed root equals the recorded one.
pub(crate) fn load_local_copy(cfg: &NodeConfig, path: &Path) -> Option<(ChunkedFile, bool)> {
    let bytes = std::fs::read(path).ok()?;
    let rec: Option<Sidecar> = std::fs::read(cfg.data.join(SIDECAR))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut file =
        ChunkedFile::from_bytes(cfg.stream.chunk_size, cfg.stream.max_len, &bytes, 0).ok()?;
    let trusted = match rec {
        Some(r) if r.chunk_size == file.chunk_size() && r.root == file.root_hex() => {
            file.set_version(r.version);
            true
        }
        _ => {
            warn!(node = %cfg.name, path = %path.display(), "local copy does not match its record: fetching only the chunks that differ");
            false
        }
    };
    Some((file, trusted))
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
