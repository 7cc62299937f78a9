//! The Raft log, vote and log pointers in one redb database.
//!
//! Invariants:
//! - Table `entries` maps a log index to the protobuf `RaftEntry` of that index; the stored
//!   indexes are consecutive (appends follow the last entry, truncation removes a suffix,
//!   purging removes a prefix).
//! - Table `meta` holds JSON values under `vote`, `committed` and `last_purged`; `last_purged`
//!   is written in the same transaction that deletes the purged prefix.
//! - Entries, the vote and the purge point are written in redb transactions with the default
//!   (fsync-on-commit) durability; `append` writes all its entries in one transaction and
//!   reports the flush only after the commit has returned. The committed index is a replay
//!   hint and is written without its own fsync: it becomes durable with the next append, and
//!   after a crash an older value only means less is replayed before the next election.
//! - redb work runs on the blocking thread pool, never on an async worker thread.
//! - [`CommittedIndex`] reports the committed index last read from or durably written to `meta`.
//! - [`LogStore::last_log_id`] is the id of the last stored entry (or the purge point when the
//!   log is empty), updated after every append, truncation and purge; pre-votes compare it.
//! - [`entry_to_proto`] and [`entry_from_proto`] are the one conversion between openraft entries
//!   and `RaftEntry`, used both on disk and on the wire.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, CommittedLeaderId, EntryPayload, OptionalSend, RaftLogReader, StorageIOError, Vote,
};
use prost::Message;
use redb::{Database, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Cmd, Entry, LogId, NodeId, StorageError, TypeConfig};
use crate::proto::raft_entry::Payload;
use crate::proto::{Empty, RaftEntry};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// Errors of the redb log store.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    #[error("opening raft log {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("raft log transaction: {0}")]
    Transaction(Box<redb::TransactionError>),
    #[error("raft log table: {0}")]
    Table(#[from] redb::TableError),
    #[error("raft log storage: {0}")]
    Storage(#[from] redb::StorageError),
    #[error("raft log commit: {0}")]
    Commit(#[from] redb::CommitError),
    #[error("raft log entry {index} is corrupt: {reason}")]
    CorruptEntry { index: u64, reason: String },
    #[error("raft log meta `{key}`: {source}")]
    Meta {
        key: &'static str,
        source: serde_json::Error,
    },
    #[error("raft log append of index {got} does not follow index {last}")]
    NotConsecutive { last: u64, got: u64 },
    #[error("raft log task failed: {0}")]
    Task(String),
}

impl From<redb::TransactionError> for LogStoreError {
    fn from(e: redb::TransactionError) -> Self {
        LogStoreError::Transaction(Box::new(e))
    }
}

/// The committed log index as the log store last persisted it; cheap to clone and read.
#[derive(Clone, Debug, Default)]
pub struct CommittedIndex(Arc<AtomicU64>);

impl CommittedIndex {
    /// The committed index, if any entry is committed.
    pub fn get(&self) -> Option<u64> {
        self.0.load(Ordering::Acquire).checked_sub(1)
    }

    fn set(&self, committed: Option<LogId>) {
        let raw = committed.map_or(0, |id| id.index.saturating_add(1));
        self.0.store(raw, Ordering::Release);
    }
}

/// The redb-backed [`RaftLogStorage`]; clones share the database and serve as log readers.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    committed: CommittedIndex,
    last: Arc<Mutex<Option<LogId>>>,
    fsync_seconds: metrics::Histogram,
}

impl LogStore {
    /// Open or create the database at `path` and make sure both tables exist. `node` labels the
    /// `canopy_raft_fsync_seconds` histogram.
    pub async fn open(path: PathBuf, node: &str) -> Result<LogStore, LogStoreError> {
        let fsync_seconds =
            metrics::histogram!("canopy_raft_fsync_seconds", "node" => node.to_string());
        blocking(move || {
            let db = Database::create(&path).map_err(|source| LogStoreError::Open {
                path: path.clone(),
                source,
            })?;
            let txn = db.begin_write()?;
            txn.open_table(ENTRIES)?;
            txn.open_table(META)?;
            txn.commit()?;
            let last = LogStore::stored_last(&db)?;
            Ok(LogStore {
                db: Arc::new(db),
                committed: CommittedIndex::default(),
                last: Arc::new(Mutex::new(last)),
                fsync_seconds,
            })
        })
        .await
    }

    /// A handle on the committed index this store persists.
    pub fn committed_index(&self) -> CommittedIndex {
        self.committed.clone()
    }

    /// A handle on the id of the last stored entry (or the purge point of an empty log).
    pub fn last_log_id(&self) -> Arc<Mutex<Option<LogId>>> {
        self.last.clone()
    }

    fn stored_last(db: &Database) -> Result<Option<LogId>, LogStoreError> {
        let last_purged: Option<LogId> = LogStore::read_meta(db, LAST_PURGED)?;
        Ok(LogStore::last_entry_id(db)?.or(last_purged))
    }

    fn set_last(&self, last: Option<LogId>) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = last;
    }

    async fn run<T, F>(&self, f: F) -> Result<T, LogStoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, LogStoreError> + Send + 'static,
    {
        let db = self.db.clone();
        blocking(move || f(&db)).await
    }

    fn read_meta<T: DeserializeOwned>(
        db: &Database,
        key: &'static str,
    ) -> Result<Option<T>, LogStoreError> {
        let txn = db.begin_read()?;
        let table = txn.open_table(META)?;
        let Some(value) = table.get(key)? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|source| LogStoreError::Meta { key, source })
    }

    fn write_meta<T: Serialize>(
        db: &Database,
        key: &'static str,
        value: &T,
    ) -> Result<(), LogStoreError> {
        Self::write_meta_with(db, key, value, redb::Durability::Immediate)
    }

    /// Like `write_meta`, without its own fsync: the value becomes durable with the next
    /// durable commit (the next append). Only for hints that may be lost in a crash.
    fn write_meta_lazy<T: Serialize>(
        db: &Database,
        key: &'static str,
        value: &T,
    ) -> Result<(), LogStoreError> {
        Self::write_meta_with(db, key, value, redb::Durability::None)
    }

    fn write_meta_with<T: Serialize>(
        db: &Database,
        key: &'static str,
        value: &T,
        durability: redb::Durability,
    ) -> Result<(), LogStoreError> {
        let json =
            serde_json::to_vec(value).map_err(|source| LogStoreError::Meta { key, source })?;
        let mut txn = db.begin_write()?;
        txn.set_durability(durability);
        txn.open_table(META)?.insert(key, json.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    fn read_range(db: &Database, start: u64, end: Bound<u64>) -> Result<Vec<Entry>, LogStoreError> {
        let txn = db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let mut entries = Vec::new();
        for item in table.range((Bound::Included(start), end))? {
            let (index, value) = item?;
            entries.push(decode_entry(index.value(), value.value())?);
        }
        Ok(entries)
    }

    fn last_entry_id(db: &Database) -> Result<Option<LogId>, LogStoreError> {
        let txn = db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let Some((index, value)) = table.last()? else {
            return Ok(None);
        };
        let index = index.value();
        let header = EntryHeader::decode(value.value()).map_err(|e| corrupt(index, e))?;
        if header.index != index {
            return Err(corrupt(
                index,
                format!("stored under index {index}, says {}", header.index),
            ));
        }
        Ok(Some(log_id(header.term, header.leader_node_id, index)))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = range.end_bound().cloned();
        self.run(move |db| LogStore::read_range(db, start, end))
            .await
            .map_err(|e| StorageIOError::read_logs(AnyError::new(&e)).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.run(|db| {
            let last_purged_log_id: Option<LogId> = LogStore::read_meta(db, LAST_PURGED)?;
            let last_log_id = LogStore::last_entry_id(db)?.or(last_purged_log_id);
            Ok(LogState {
                last_purged_log_id,
                last_log_id,
            })
        })
        .await
        .map_err(|e| StorageIOError::read_logs(AnyError::new(&e)).into())
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let vote = *vote;
        self.run(move |db| LogStore::write_meta(db, VOTE, &vote))
            .await
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.run(|db| LogStore::read_meta(db, VOTE))
            .await
            .map_err(|e| StorageIOError::read_vote(AnyError::new(&e)).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.run(move |db| LogStore::write_meta_lazy(db, COMMITTED, &committed))
            .await
            .map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        self.committed.set(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed = self
            .run(|db| Ok(LogStore::read_meta::<Option<LogId>>(db, COMMITTED)?.flatten()))
            .await
            .map_err(|e| StorageIOError::read(AnyError::new(&e)))?;
        self.committed.set(committed);
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let fsync_seconds = self.fsync_seconds.clone();
        let result = self
            .run(move |db| {
                let txn = db.begin_write()?;
                {
                    let mut table = txn.open_table(ENTRIES)?;
                    let mut prev = table.last()?.map(|(k, _)| k.value());
                    for entry in &entries {
                        let index = entry.log_id.index;
                        if let Some(last) = prev {
                            if index != last + 1 {
                                return Err(LogStoreError::NotConsecutive { last, got: index });
                            }
                        }
                        table.insert(index, encode_entry(entry)?.as_slice())?;
                        prev = Some(index);
                    }
                }
                let started = Instant::now();
                txn.commit()?;
                fsync_seconds.record(started.elapsed().as_secs_f64());
                Ok(())
            })
            .await;
        match result {
            Ok(()) => {
                self.set_last(Some(last));
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(AnyError::new(&e)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let last = self
            .run(move |db| {
                let txn = db.begin_write()?;
                txn.open_table(ENTRIES)?
                    .retain_in(log_id.index.., |_, _| false)?;
                txn.commit()?;
                LogStore::stored_last(db)
            })
            .await
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        self.set_last(last);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let last = self
            .run(move |db| {
                let json = serde_json::to_vec(&log_id).map_err(|source| LogStoreError::Meta {
                    key: LAST_PURGED,
                    source,
                })?;
                let txn = db.begin_write()?;
                txn.open_table(META)?.insert(LAST_PURGED, json.as_slice())?;
                txn.open_table(ENTRIES)?
                    .retain_in(..=log_id.index, |_, _| false)?;
                txn.commit()?;
                LogStore::stored_last(db)
            })
            .await
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        self.set_last(last);
        Ok(())
    }
}

/// The leading fields of a stored `RaftEntry`; decoding it skips the payload without copying.
#[derive(Clone, PartialEq, prost::Message)]
struct EntryHeader {
    #[prost(uint64, tag = "1")]
    term: u64,
    #[prost(uint64, tag = "2")]
    leader_node_id: u64,
    #[prost(uint64, tag = "3")]
    index: u64,
}

fn log_id(term: u64, node_id: NodeId, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, node_id), index)
}

fn corrupt(index: u64, reason: impl ToString) -> LogStoreError {
    LogStoreError::CorruptEntry {
        index,
        reason: reason.to_string(),
    }
}

/// The `RaftEntry` of an openraft entry (the proposal's bytes are shared, not copied).
pub fn entry_to_proto(entry: &Entry) -> Result<RaftEntry, LogStoreError> {
    let payload = match &entry.payload {
        EntryPayload::Blank => Payload::Blank(Empty {}),
        EntryPayload::Normal(Cmd(proposal)) => Payload::Normal(proposal.clone()),
        EntryPayload::Membership(membership) => Payload::MembershipJson(
            serde_json::to_string(membership).map_err(|e| corrupt(entry.log_id.index, e))?,
        ),
    };
    Ok(RaftEntry {
        term: entry.log_id.leader_id.term,
        leader_node_id: entry.log_id.leader_id.node_id,
        index: entry.log_id.index,
        payload: Some(payload),
    })
}

/// The openraft entry a `RaftEntry` describes.
pub fn entry_from_proto(raw: RaftEntry) -> Result<Entry, LogStoreError> {
    let index = raw.index;
    let payload = match raw.payload {
        Some(Payload::Blank(_)) => EntryPayload::Blank,
        Some(Payload::Normal(proposal)) => EntryPayload::Normal(Cmd(proposal)),
        Some(Payload::MembershipJson(json)) => {
            EntryPayload::Membership(serde_json::from_str(&json).map_err(|e| corrupt(index, e))?)
        }
        None => return Err(corrupt(index, "no payload")),
    };
    Ok(Entry {
        log_id: log_id(raw.term, raw.leader_node_id, index),
        payload,
    })
}

fn encode_entry(entry: &Entry) -> Result<Vec<u8>, LogStoreError> {
    Ok(entry_to_proto(entry)?.encode_to_vec())
}

fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry, LogStoreError> {
    let raw = RaftEntry::decode(Bytes::copy_from_slice(bytes)).map_err(|e| corrupt(index, e))?;
    if raw.index != index {
        return Err(corrupt(
            index,
            format!("stored under index {index}, says {}", raw.index),
        ));
    }
    entry_from_proto(raw)
}

async fn blocking<T, F>(f: F) -> Result<T, LogStoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, LogStoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LogStoreError::Task(e.to_string()))?
}
