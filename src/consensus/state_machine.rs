//! The openraft state machine over a [`FileStateMachine`], and the snapshots persisted on disk.
//!
//! Invariants:
//! - `last_applied` and `last_membership` change only together with the file: after applying
//!   entries in log order, or after installing a snapshot.
//! - Normal entries reach [`FileStateMachine::apply`] exactly once per process, in log order;
//!   blank and membership entries only move the bookkeeping, and root-check entries
//!   ([`RootChecks`]) are handled here and never reach the file.
//! - A snapshot is the file and the dedup table as of `last_applied` plus the metadata naming
//!   that point; the builder takes both when openraft asks for a builder, so later applies
//!   never leak into it. Its format is [`super::snapshot`].
//! - Snapshot data is a file ([`SnapshotFile`]): built by streaming the file's chunks to disk,
//!   sent by openraft a segment at a time, received segment by segment into a temp file and
//!   installed by reading it a chunk at a time. No step holds the content twice.
//! - `snapshots/current.snap` is written as a temp file, fsynced, renamed over the old one, and
//!   the directory fsynced; it is never replaced by a snapshot with an older last log id.
//! - Temp files (`tmp-*`) left by an interrupted build or transfer are removed at open.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use super::snapshot::{self, Decoded, Limits, SnapshotError};
use super::{
    ApplyOutcome, Entry, FileStateMachine, LogId, SnapshotMeta, StorageError, StoredMembership,
    TypeConfig,
};
use crate::dedup::DedupTable;
use crate::file::{hash_hex, ChunkedFile, Hash};
use crate::proto;

const CURRENT: &str = "current.snap";
const TMP_PREFIX: &str = "tmp-";

/// Snapshot data as openraft handles it: an open snapshot file. A temp file (one being
/// received) is removed when dropped unless it was handed on with [`SnapshotFile::into_path`].
pub struct SnapshotFile {
    file: tokio::fs::File,
    path: PathBuf,
    temp: bool,
}

impl SnapshotFile {
    /// Stop managing the file and return its path (the caller now owns it).
    fn into_path(mut self) -> PathBuf {
        self.temp = false;
        std::mem::take(&mut self.path)
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if self.temp {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

/// The directory holding the newest persisted snapshot.
pub struct SnapshotStore {
    dir: PathBuf,
    limits: Limits,
    newest: Mutex<Option<LogId>>,
    tmp_seq: AtomicU64,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { path, source }
}

impl SnapshotStore {
    /// Create the directory if needed and drop temp files left by an interrupted write.
    /// Snapshots are read within `limits` (this node's chunk size and maximum length).
    pub async fn open(dir: PathBuf, limits: Limits) -> Result<Arc<SnapshotStore>, SnapshotError> {
        blocking(move || {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            for item in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let item = item.map_err(io_err(&dir))?;
                if item.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    fs::remove_file(item.path()).map_err(io_err(&item.path()))?;
                }
            }
            Ok(Arc::new(SnapshotStore {
                dir,
                limits,
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

    /// The most bytes a snapshot this store accepts can take.
    pub fn max_snapshot_bytes(&self) -> u64 {
        self.limits.max_snapshot_bytes()
    }

    fn temp_path(&self) -> PathBuf {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!("{TMP_PREFIX}{}-{seq}", std::process::id()))
    }

    /// The current snapshot file, if there is one.
    fn open_current(&self) -> Result<Option<File>, SnapshotError> {
        let path = self.current_path();
        match File::open(&path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SnapshotError::Io { path, source }),
        }
    }

    /// Load and verify the current snapshot and remember it as the newest.
    fn load(&self) -> Result<Option<Decoded>, SnapshotError> {
        let Some(f) = self.open_current()? else {
            return Ok(None);
        };
        let decoded = snapshot::read(&mut BufReader::new(f), self.limits)?;
        *self.newest.lock().unwrap_or_else(|e| e.into_inner()) = decoded.meta.last_log_id;
        Ok(Some(decoded))
    }

    /// Write a snapshot to a new temp file, fsynced, and return its path.
    fn write_temp(
        &self,
        meta: &SnapshotMeta,
        file: &ChunkedFile,
        dedup: &DedupTable,
    ) -> Result<PathBuf, SnapshotError> {
        let tmp = self.temp_path();
        let written = (|| {
            let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            snapshot::write(&mut w, meta, file, dedup)
                .map_err(|e| io::Error::other(e.to_string()))?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()
        })();
        match written {
            Ok(()) => Ok(tmp),
            Err(source) => {
                let _ = fs::remove_file(&tmp);
                Err(SnapshotError::Io { path: tmp, source })
            }
        }
    }

    /// Make the fsynced snapshot at `tmp` (described by `meta`) the current one, unless the
    /// current one is newer, in which case `tmp` is removed. Returns whether it was adopted.
    fn adopt(&self, meta: &SnapshotMeta, tmp: &Path) -> Result<bool, SnapshotError> {
        let mut newest = self.newest.lock().unwrap_or_else(|e| e.into_inner());
        if meta.last_log_id < *newest {
            drop(newest);
            fs::remove_file(tmp).map_err(io_err(tmp))?;
            return Ok(false);
        }
        let current = self.current_path();
        fs::rename(tmp, &current).map_err(io_err(&current))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        *newest = meta.last_log_id;
        Ok(true)
    }

    /// A new, empty temp file to receive a snapshot into.
    fn receive(&self) -> Result<SnapshotFile, SnapshotError> {
        let path = self.temp_path();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(SnapshotFile {
            file: tokio::fs::File::from_std(file),
            path,
            temp: true,
        })
    }

    /// The current snapshot's metadata and an open handle on it.
    fn current(&self) -> Result<Option<(SnapshotMeta, SnapshotFile)>, SnapshotError> {
        let Some(mut f) = self.open_current()? else {
            return Ok(None);
        };
        let path = self.current_path();
        let meta = snapshot::read_meta(&mut BufReader::new(&f))?;
        f.seek(SeekFrom::Start(0)).map_err(io_err(&path))?;
        Ok(Some((
            meta,
            SnapshotFile {
                file: tokio::fs::File::from_std(f),
                path,
                temp: false,
            },
        )))
    }
}

/// The pair a member recorded at a root-check marker entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker {
    pub index: u64,
    pub version: u64,
    pub root: Hash,
}

/// How many root cross-checks this member made, and with what result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RootCheckCounts {
    /// Markers whose proposer's pair equalled this member's.
    pub matched: u64,
    /// Markers whose proposer's pair differed from this member's: the members diverged.
    pub mismatched: u64,
    /// Checks this member could not make: it holds no record of that marker (it restored a
    /// snapshot taken after it).
    pub skipped: u64,
}

/// The root cross-check: every root-check entry is a marker at which each member records its
/// (version, root); the next one carries the proposer's recorded pair, compared by every
/// member with its own pair for the same marker.
#[derive(Default)]
pub struct RootChecks {
    marker: Mutex<Option<Marker>>,
    counts: Mutex<RootCheckCounts>,
    mismatches: Option<metrics::Counter>,
}

impl RootChecks {
    pub fn new(node: &str) -> RootChecks {
        RootChecks {
            mismatches: Some(metrics::counter!(
                "canopy_raft_root_mismatches_total",
                "node" => node.to_string()
            )),
            ..RootChecks::default()
        }
    }

    /// This member's pair at the last marker it applied.
    pub fn marker(&self) -> Option<Marker> {
        *self.marker.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn counts(&self) -> RootCheckCounts {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Apply the root-check entry at `index` while this member is at `now`.
    fn apply(&self, index: u64, check: &proto::RootCheck, now: (u64, Hash)) {
        let mut marker = self.marker.lock().unwrap_or_else(|e| e.into_inner());
        if check.marker_index != 0 {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            match *marker {
                Some(m) if m.index == check.marker_index => {
                    if check.version == m.version && check.root[..] == m.root[..] {
                        counts.matched += 1;
                    } else {
                        counts.mismatched += 1;
                        if let Some(c) = &self.mismatches {
                            c.increment(1);
                        }
                        tracing::error!(
                            marker = m.index,
                            version = m.version,
                            root = %hash_hex(&m.root),
                            leader_version = check.version,
                            leader_root = %hex(&check.root),
                            "root cross-check failed: this core member's file differs from the \
                             leader's at the same log position"
                        );
                    }
                }
                _ => counts.skipped += 1,
            }
        }
        *marker = Some(Marker {
            index,
            version: now.0,
            root: now.1,
        });
    }

    fn reset(&self) {
        *self.marker.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The openraft [`RaftStateMachine`] driving a [`FileStateMachine`].
pub struct StateMachineStore {
    sm: Arc<dyn FileStateMachine>,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    snapshots: Arc<SnapshotStore>,
    root_checks: Arc<RootChecks>,
    builds: u64,
}

impl StateMachineStore {
    /// Restore `sm` (file and dedup table) from the newest snapshot in `snapshots`, if any.
    pub async fn restore(
        sm: Arc<dyn FileStateMachine>,
        snapshots: Arc<SnapshotStore>,
        root_checks: Arc<RootChecks>,
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
            root_checks,
            builds: 0,
        };
        if let Some(Decoded { meta, file, dedup }) = loaded {
            tracing::info!(
                last_log_id = ?meta.last_log_id,
                version = file.version(),
                len = file.len(),
                dedup_ids = dedup.len(),
                "restoring state machine from snapshot"
            );
            store.sm.install(file, dedup);
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
    dedup: DedupTable,
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
        let dedup = std::mem::take(&mut self.dedup);
        let snapshots = self.snapshots.clone();
        let task_meta = meta.clone();
        let current = blocking(move || {
            let tmp = snapshots.write_temp(&task_meta, &file, &dedup)?;
            drop((file, dedup));
            snapshots.adopt(&task_meta, &tmp)?;
            snapshots
                .current()?
                .ok_or_else(|| SnapshotError::Malformed("the snapshot just written is gone".into()))
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        tracing::info!(last_log_id = ?meta.last_log_id, "built snapshot");
        Ok(Snapshot {
            meta: current.0,
            snapshot: Box::new(current.1),
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
        let checks = self.root_checks.clone();
        let outcomes = tokio::task::spawn_blocking(move || {
            let mut version = None;
            entries
                .iter()
                .map(|entry| match &entry.payload {
                    EntryPayload::Normal(cmd) => match &cmd.0.root_check {
                        Some(check) => {
                            let now = sm.version_root();
                            checks.apply(entry.log_id.index, check, now);
                            version = Some(now.0);
                            ApplyOutcome::Applied { version: now.0 }
                        }
                        None => {
                            let outcome = sm.apply(entry.log_id.index, &cmd.0);
                            version = Some(outcome.version());
                            outcome
                        }
                    },
                    EntryPayload::Blank | EntryPayload::Membership(_) => ApplyOutcome::Applied {
                        version: *version.get_or_insert_with(|| sm.version_root().0),
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
            dedup: self.sm.dedup(),
            snapshots: self.snapshots.clone(),
            seq: self.builds,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        let snapshots = self.snapshots.clone();
        let file = blocking(move || snapshots.receive())
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, AnyError::new(&e)))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError> {
        let path = snapshot.into_path();
        let snapshots = self.snapshots.clone();
        let sm = self.sm.clone();
        let expected = meta.clone();
        blocking(move || {
            let installed = (|| {
                File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err(&path))?;
                let f = File::open(&path).map_err(io_err(&path))?;
                let decoded = snapshot::read(&mut BufReader::new(f), snapshots.limits)?;
                if decoded.meta.last_log_id != expected.last_log_id {
                    return Err(SnapshotError::WrongMeta {
                        expected: expected.last_log_id,
                        got: decoded.meta.last_log_id,
                    });
                }
                snapshots.adopt(&expected, &path)?;
                sm.install(decoded.file, decoded.dedup);
                Ok(())
            })();
            if installed.is_err() {
                let _ = fs::remove_file(&path);
            }
            installed
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        tracing::info!(last_log_id = ?meta.last_log_id, "installed snapshot from leader");
        self.root_checks.reset();
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let snapshots = self.snapshots.clone();
        let current = blocking(move || snapshots.current())
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)))?;
        Ok(current.map(|(meta, file)| Snapshot {
            meta,
            snapshot: Box::new(file),
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
