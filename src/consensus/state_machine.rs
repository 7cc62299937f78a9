//! The openraft state machine over a [`FileStateMachine`], and the snapshots persisted on disk.
//!
//! Invariants:
//! - `last_applied` and `last_membership` change only together with the file: after applying
//!   entries in log order, or after installing a snapshot.
//! - Normal entries reach [`FileStateMachine::apply`] exactly once per process, in log order;
//!   blank and membership entries only move the bookkeeping.
//! - A snapshot is the file as of `last_applied` plus the metadata naming that point; the builder
//!   takes the file when openraft asks for a builder, so later applies never leak into it.
//! - Snapshot encoding: magic `CNPYSNP1`, u32 LE meta length, meta JSON, u32 LE chunk size,
//!   u64 LE max length, u64 LE version, u64 LE length, 32-byte root, then the content. Decoding
//!   rebuilds the file and rejects it unless its root matches.
//! - `snapshots/current.snap` is written as a temp file, fsynced, renamed over the old one, and
//!   the directory fsynced; it is never replaced by a snapshot with an older last log id.

use std::fs::{self, File};
use std::io::{self, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};

use super::{
    ApplyOutcome, Entry, FileStateMachine, LogId, SnapshotMeta, StorageError, StoredMembership,
    TypeConfig,
};
use crate::file::{ChunkedFile, FileBuilder, FileError};

const MAGIC: &[u8; 8] = b"CNPYSNP1";
const CURRENT: &str = "current.snap";
const TMP_PREFIX: &str = "tmp-";

/// Errors of snapshot encoding and persistence.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("snapshot is malformed: {0}")]
    Malformed(String),
    #[error("snapshot metadata: {0}")]
    Meta(#[from] serde_json::Error),
    #[error("snapshot file content: {0}")]
    File(#[from] FileError),
    #[error("snapshot is for {got:?}, expected {expected:?}")]
    WrongMeta {
        expected: Option<LogId>,
        got: Option<LogId>,
    },
    #[error("snapshot task failed: {0}")]
    Task(String),
}

/// The directory holding the newest persisted snapshot.
pub struct SnapshotStore {
    dir: PathBuf,
    newest: Mutex<Option<LogId>>,
    tmp_seq: AtomicU64,
}

impl SnapshotStore {
    /// Create the directory if needed and drop temp files left by an interrupted write.
    pub async fn open(dir: PathBuf) -> Result<Arc<SnapshotStore>, SnapshotError> {
        blocking(move || {
            let io_err = |path: &Path| {
                let path = path.to_path_buf();
                move |source| SnapshotError::Io { path, source }
            };
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            for item in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let item = item.map_err(io_err(&dir))?;
                if item.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    fs::remove_file(item.path()).map_err(io_err(&item.path()))?;
                }
            }
            Ok(Arc::new(SnapshotStore {
                dir,
                newest: Mutex::new(None),
                tmp_seq: AtomicU64::new(0),
            }))
        })
        .await
    }

    /// Path of the current snapshot file.
    pub fn current_path(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    /// The current snapshot's bytes, if there is one.
    fn read_current(&self) -> Result<Option<Vec<u8>>, SnapshotError> {
        let path = self.current_path();
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SnapshotError::Io { path, source }),
        }
    }

    /// Load and verify the current snapshot and remember it as the newest.
    fn load(&self) -> Result<Option<(SnapshotMeta, ChunkedFile)>, SnapshotError> {
        let Some(bytes) = self.read_current()? else {
            return Ok(None);
        };
        let (meta, file) = decode(&bytes)?;
        *self.newest.lock().unwrap_or_else(|e| e.into_inner()) = meta.last_log_id;
        Ok(Some((meta, file)))
    }

    /// Make `bytes` (an encoded snapshot described by `meta`) the current snapshot, unless the
    /// current one is newer. Returns whether it was written.
    fn persist(&self, meta: &SnapshotMeta, bytes: &[u8]) -> Result<bool, SnapshotError> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{}-{seq}", std::process::id()));
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::Io { path, source }
        };
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(SnapshotError::Io { path: tmp, source });
        }
        let mut newest = self.newest.lock().unwrap_or_else(|e| e.into_inner());
        if meta.last_log_id < *newest {
            drop(newest);
            fs::remove_file(&tmp).map_err(io_err(&tmp))?;
            return Ok(false);
        }
        let current = self.current_path();
        fs::rename(&tmp, &current).map_err(io_err(&current))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        *newest = meta.last_log_id;
        Ok(true)
    }
}

/// Encode a snapshot of `file` described by `meta`.
pub fn encode(meta: &SnapshotMeta, file: &ChunkedFile) -> Result<Vec<u8>, SnapshotError> {
    let meta_json = serde_json::to_vec(meta)?;
    let meta_len = u32::try_from(meta_json.len())
        .map_err(|_| SnapshotError::Malformed("metadata over 4 GiB".into()))?;
    let content_len = usize::try_from(file.len())
        .map_err(|_| SnapshotError::Malformed("file does not fit in memory".into()))?;
    let mut out = Vec::with_capacity(8 + 4 + meta_json.len() + 4 + 8 * 3 + 32 + content_len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&meta_len.to_le_bytes());
    out.extend_from_slice(&meta_json);
    out.extend_from_slice(&file.chunk_size().to_le_bytes());
    out.extend_from_slice(&file.max_len().to_le_bytes());
    out.extend_from_slice(&file.version().to_le_bytes());
    out.extend_from_slice(&file.len().to_le_bytes());
    out.extend_from_slice(&file.root());
    file.write_to(&mut out)
        .map_err(|e| SnapshotError::Malformed(e.to_string()))?;
    Ok(out)
}

/// Read only the metadata of an encoded snapshot.
pub fn decode_meta(bytes: &[u8]) -> Result<SnapshotMeta, SnapshotError> {
    let mut r = bytes;
    let mut magic = [0u8; 8];
    read_exact(&mut r, &mut magic)?;
    if &magic != MAGIC {
        return Err(SnapshotError::Malformed("bad magic".into()));
    }
    let meta_len = u32::from_le_bytes(read_array(&mut r)?) as usize;
    if r.len() < meta_len {
        return Err(SnapshotError::Malformed("metadata truncated".into()));
    }
    Ok(serde_json::from_slice(&r[..meta_len])?)
}

/// Decode and verify an encoded snapshot; the file gets its own copy of the content.
pub fn decode(bytes: &[u8]) -> Result<(SnapshotMeta, ChunkedFile), SnapshotError> {
    let meta = decode_meta(bytes)?;
    let meta_len = u32::from_le_bytes(read_array(&mut &bytes[8..])?) as usize;
    let mut r = &bytes[12 + meta_len..];
    let chunk_size = u32::from_le_bytes(read_array(&mut r)?);
    let max_len = u64::from_le_bytes(read_array(&mut r)?);
    let version = u64::from_le_bytes(read_array(&mut r)?);
    let len = u64::from_le_bytes(read_array(&mut r)?);
    let root: [u8; 32] = read_array(&mut r)?;
    if r.len() as u64 != len {
        return Err(SnapshotError::Malformed(format!(
            "content is {} bytes, header says {len}",
            r.len()
        )));
    }
    let mut builder = FileBuilder::new(chunk_size, max_len, len, version, root)?;
    for (i, chunk) in r.chunks(chunk_size as usize).enumerate() {
        builder.put_chunk(i as u64, Bytes::copy_from_slice(chunk))?;
    }
    Ok((meta, builder.finish()?))
}

fn read_exact(r: &mut &[u8], buf: &mut [u8]) -> Result<(), SnapshotError> {
    r.read_exact(buf)
        .map_err(|_| SnapshotError::Malformed("header truncated".into()))
}

fn read_array<const N: usize>(r: &mut &[u8]) -> Result<[u8; N], SnapshotError> {
    let mut buf = [0u8; N];
    read_exact(r, &mut buf)?;
    Ok(buf)
}

/// The openraft [`RaftStateMachine`] driving a [`FileStateMachine`].
pub struct StateMachineStore {
    sm: Arc<dyn FileStateMachine>,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    snapshots: Arc<SnapshotStore>,
    builds: u64,
}

impl StateMachineStore {
    /// Restore `sm` from the newest snapshot in `snapshots`, if any.
    pub async fn restore(
        sm: Arc<dyn FileStateMachine>,
        snapshots: Arc<SnapshotStore>,
    ) -> Result<StateMachineStore, SnapshotError> {
        let loaded = {
            let snapshots = snapshots.clone();
            blocking(move || snapshots.load()).await?
        };
        let mut store = StateMachineStore {
            sm,
            last_applied: None,
            last_membership: StoredMembership::default(),
            snapshots,
            builds: 0,
        };
        if let Some((meta, file)) = loaded {
            tracing::info!(
                last_log_id = ?meta.last_log_id,
                version = file.version(),
                len = file.len(),
                "restoring state machine from snapshot"
            );
            store.sm.install(file);
            store.last_applied = meta.last_log_id;
            store.last_membership = meta.last_membership;
        }
        Ok(store)
    }
}

/// Builds one snapshot from the state captured when openraft asked for the builder.
pub struct SnapshotBuilder {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    file: ChunkedFile,
    snapshots: Arc<SnapshotStore>,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let snapshot_id = match &self.last_applied {
            Some(id) => format!(
                "{}-{}-{}-{}",
                id.leader_id.term, id.leader_id.node_id, id.index, self.seq
            ),
            None => format!("none-{}", self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot_id,
        };
        let file = self.file.clone();
        let snapshots = self.snapshots.clone();
        let task_meta = meta.clone();
        let bytes = blocking(move || {
            let bytes = encode(&task_meta, &file)?;
            snapshots.persist(&task_meta, &bytes)?;
            Ok(bytes)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = bytes.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyOutcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        let membership = entries.iter().rev().find_map(|e| match &e.payload {
            EntryPayload::Membership(m) => Some(StoredMembership::new(Some(e.log_id), m.clone())),
            _ => None,
        });
        let sm = self.sm.clone();
        let outcomes = tokio::task::spawn_blocking(move || {
            let mut version = None;
            entries
                .iter()
                .map(|entry| match &entry.payload {
                    EntryPayload::Normal(cmd) => {
                        let outcome = sm.apply(entry.log_id.index, &cmd.0);
                        version = Some(outcome.version());
                        outcome
                    }
                    EntryPayload::Blank | EntryPayload::Membership(_) => ApplyOutcome::Applied {
                        version: *version.get_or_insert_with(|| sm.current().version()),
                    },
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| StorageIOError::apply(last, AnyError::error(e)))?;
        self.last_applied = Some(last);
        if let Some(m) = membership {
            self.last_membership = m;
        }
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.builds += 1;
        SnapshotBuilder {
            last_applied: self.last_applied,
            last_membership: self.last_membership.clone(),
            file: self.sm.current(),
            snapshots: self.snapshots.clone(),
            seq: self.builds,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let snapshots = self.snapshots.clone();
        let sm = self.sm.clone();
        let expected = meta.clone();
        blocking(move || {
            let (embedded, file) = decode(&bytes)?;
            if embedded.last_log_id != expected.last_log_id {
                return Err(SnapshotError::WrongMeta {
                    expected: expected.last_log_id,
                    got: embedded.last_log_id,
                });
            }
            snapshots.persist(&expected, &bytes)?;
            sm.install(file);
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        tracing::info!(last_log_id = ?meta.last_log_id, "installed snapshot from leader");
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let snapshots = self.snapshots.clone();
        let current = blocking(move || {
            let Some(bytes) = snapshots.read_current()? else {
                return Ok(None);
            };
            let meta = decode_meta(&bytes)?;
            Ok(Some((meta, bytes)))
        })
        .await
        .map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)))?;
        Ok(current.map(|(meta, bytes)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}

async fn blocking<T, F>(f: F) -> Result<T, SnapshotError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, SnapshotError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SnapshotError::Task(e.to_string()))?
}
