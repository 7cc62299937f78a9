//! Raft consensus for the core nodes: the replicated log of proposals that decides the file.
//!
//! Invariants:
//! - A proposal changes the file only through a committed log entry; every core node applies the
//!   committed entries in log order through [`FileStateMachine::apply`], so all of them compute
//!   the same [`ApplyOutcome`] and the same file.
//! - The log (entries, vote, committed and last-purged log ids) lives in `data_dir/raft.redb`.
//!   Entries, vote and purge point are committed with fsync before openraft hears of it (an
//!   `append` of many entries is one transaction); the committed index is a lazily persisted
//!   replay hint.
//! - The newest snapshot lives in `data_dir/snapshots/current.snap`. It is replaced only by an
//!   atomic rename of a fully written and fsynced file, and never by an older snapshot.
//! - [`Core::open`] rebuilds the state machine from the snapshot, then openraft replays the log
//!   entries after it up to the persisted committed id, all before `open` returns; entries
//!   committed after that hint are applied again once a leader re-commits them.
//! - A node's id is derived from its name ([`node_id`]), so every node computes every id alike.
//! - Core members reach each other only through [`Network`] (QUIC, one stream per RPC) and serve
//!   peers only through [`Core::handle_rpc`].
//! - Elections start only through Canopy's pre-vote ([`election`]): openraft's own election
//!   timer is off, and the leader's liveness heartbeats travel on their own connection.
//! - Every entry fits one AppendEntries frame: [`Core::propose`] refuses a proposal whose entry
//!   would not fit `max_frame` with its envelope, so a single entry always reaches followers.
//! - The proposal-id dedup table ([`DedupTable`]) is replicated state: it is in every snapshot
//!   and restored with the file, so a retry is deduplicated alike on every member.
//! - Membership changes happen only on the leader and only through openraft's joint consensus; a
//!   member becomes a voter only after it proved its identity (core certificate for its name)
//!   and caught up as a learner within the catch-up timeout; a removal that would leave fewer
//!   reachable voters than a quorum needs `force`.
//! - [`Core::fatal`] resolves when openraft stops for any reason but [`Core::shutdown`]; the
//!   member then takes no further part (it acknowledges nothing).

#[cfg(test)]
mod cluster_tests;

mod election;
mod log_store;
mod network;
pub mod snapshot;
mod state_machine;
mod telemetry;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ClientWriteError, Fatal, InitializeError, RaftError};
use openraft::{ChangeMembers, Raft, ServerState, SnapshotPolicy};
use prost::Message;

pub use crate::dedup::{DedupError, DedupTable, DEDUP_WINDOW, MAX_PROPOSAL_ID};
pub use log_store::{CommittedIndex, LogStore, LogStoreError};
pub use network::{Network, PeerClient, TransportError};
pub use snapshot::SnapshotError;
pub use state_machine::{RootCheckCounts, SnapshotFile, SnapshotStore, StateMachineStore};
pub use telemetry::{QuietPeerErrors, RaftStatus};

/// Raft node id.
pub type NodeId = u64;

/// openraft Node type: a core member's name and QUIC address.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub name: String,
    pub addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

impl Member {
    /// This member's Raft node id.
    pub fn id(&self) -> NodeId {
        node_id(&self.name)
    }
}

/// Node id derived from the name (first 8 bytes of blake3(name), LE) so every node can compute it.
pub fn node_id(name: &str) -> NodeId {
    let hash = blake3::hash(name.as_bytes());
    let mut id = [0u8; 8];
    id.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(id)
}

/// Raft application data: a protobuf Proposal (serde impl = the protobuf bytes).
#[derive(Clone, PartialEq)]
pub struct Cmd(pub crate::proto::Proposal);

impl fmt::Debug for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (ops, bytes) = self.0.update.as_ref().map_or((0, 0), |u| {
            let bytes = u
                .ops
                .iter()
                .map(|op| match &op.kind {
                    Some(crate::proto::op::Kind::Write(w)) => w.data.len(),
                    _ => 0,
                })
                .sum::<usize>();
            (u.ops.len(), bytes)
        });
        f.debug_struct("Cmd")
            .field("ops", &ops)
            .field("write_bytes", &bytes)
            .field("precondition", &self.0.precondition)
            .finish()
    }
}

impl serde::Serialize for Cmd {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&prost::Message::encode_to_vec(&self.0))
    }
}

impl<'de> serde::Deserialize<'de> for Cmd {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ProtoBytes;

        impl<'de> serde::de::Visitor<'de> for ProtoBytes {
            type Value = Cmd;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("protobuf-encoded Proposal bytes")
            }

            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Cmd, E> {
                <crate::proto::Proposal as prost::Message>::decode(v)
                    .map(Cmd)
                    .map_err(E::custom)
            }

            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Cmd, E> {
                <crate::proto::Proposal as prost::Message>::decode(bytes::Bytes::from(v))
                    .map(Cmd)
                    .map_err(E::custom)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Cmd, A::Error> {
                let mut buf = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(b) = seq.next_element::<u8>()? {
                    buf.push(b);
                }
                self.visit_byte_buf(buf)
            }
        }

        deserializer.deserialize_byte_buf(ProtoBytes)
    }
}

pub use crate::file::ApplyOutcome;

openraft::declare_raft_types!(
    /// openraft type configuration of the core's Raft group.
    pub TypeConfig:
        D = Cmd,
        R = ApplyOutcome,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A log entry of the core's Raft group.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id of the core's Raft group.
pub type LogId = openraft::LogId<NodeId>;
/// Snapshot metadata of the core's Raft group.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
/// Membership as recorded with the log id that introduced it.
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
/// openraft's storage error for this group.
pub type StorageError = openraft::StorageError<NodeId>;

/// What the state machine drives: implemented by the node's replica (file + fan-out to children).
///
/// Its replicated state is the file and the proposal-id dedup table: `apply` must answer a
/// proposal whose id is in the table with the recorded outcome (changing nothing) and record
/// the outcome of every other proposal with an id, as [`DedupTable::record`] does.
pub trait FileStateMachine: Send + Sync + 'static {
    /// Called once per committed Normal entry, in log order. Must be deterministic.
    fn apply(&self, log_index: u64, proposal: &crate::proto::Proposal) -> ApplyOutcome;
    /// The file as of the last apply (a cheap copy-on-write clone).
    fn current(&self) -> crate::file::ChunkedFile;
    /// The dedup table as of the last apply.
    fn dedup(&self) -> DedupTable;
    /// Replace the whole state with a snapshot's file and dedup table (on startup from disk,
    /// or a snapshot from the leader).
    fn install(&self, file: crate::file::ChunkedFile, dedup: DedupTable);
    /// The version and root as of the last apply (the root cross-check calls it).
    fn version_root(&self) -> (u64, crate::file::Hash) {
        let f = self.current();
        (f.version(), f.root())
    }
}

/// Timeout for sending and installing one snapshot segment: the last one installs the whole
/// file, so this allows reading and hashing gigabytes.
const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 30_000;

/// Largest snapshot segment sent (each travels as one frame, so it is also capped at half the
/// frame limit). 4 MiB: few round trips, little memory per transfer.
const SNAPSHOT_SEGMENT_BYTES: usize = 4 << 20;

/// Bytes an entry's AppendEntries frame may need beyond the proposal's own encoding: the
/// entry's log id, the request's vote, previous log id and commit (JSON), the message nesting
/// and the length prefix. About 400 bytes in practice.
pub const ENTRY_FRAME_OVERHEAD: usize = 1024;

/// How long checking a new member's identity (one dial) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Timing and log-compaction settings of the core's Raft group (`[raft]` in a config file).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    /// Leader heartbeat period: the liveness heartbeats on the control connection, and
    /// openraft's heartbeat (which also bounds its wait for an AppendEntries answer). Default
    /// 100 ms: heartbeats are tiny and core members few, and followers notice a dead leader
    /// within a few periods.
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the randomized election timeout: a follower that heard from no leader
    /// for this long asks for pre-votes. Default 500 ms: five heartbeats, so a few lost or late
    /// ones never start an election, while a killed leader is replaced in well under a second.
    /// Large entries do not count against it: heartbeats travel apart from them, and a member
    /// hears its leader on arrival, before its Raft loop has written the entry. Must be at
    /// least 4 heartbeats (members grant pre-votes after half of it without a leader).
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout. Default 1000 ms: twice the minimum, so
    /// candidates rarely ask at the same time and split the vote.
    pub election_timeout_max_ms: u64,
    /// Longest a leader's Raft loop may stay busy (writing and fsyncing a maximal entry on a
    /// slow disk) before the leader stops sending heartbeats and lets another member take
    /// over. Default 10 s: a 64 MiB entry at 10 MB/s, with margin.
    pub max_stall_ms: u64,
    /// Build a snapshot after this many entries since the last one. Default 1000: a snapshot
    /// writes the whole file, so it must be rare, while a restart replays at most this many
    /// entries.
    pub snapshot_every_entries: u64,
    /// Entries already in the snapshot that stay in the log. Default 500: a follower that lags
    /// by fewer entries catches up from the log instead of receiving the whole file.
    pub keep_logs_after_snapshot: u64,
    /// Most entries per AppendEntries RPC. Default 32: entries can be tens of MB each, so a
    /// batch stays bounded in memory (openraft's 300 assumes tiny entries). Every single entry
    /// fits a frame ([`ENTRY_FRAME_OVERHEAD`]); a batch larger than a frame is split. At most
    /// [`MAX_APPEND_ENTRIES`], the count a core member accepts in one RPC.
    pub max_payload_entries: u64,
    /// How often the leader proposes a root cross-check when entries were applied since the
    /// last one (0: never). Default 1000 ms: one tiny entry a second under load.
    pub root_check_interval_ms: u64,
    /// How long a new member may take to catch up as a learner before adding it fails (and it
    /// is removed again). Default 90 s: a 10 GB file at 150 MB/s, with margin.
    pub catch_up_timeout_ms: u64,
}

/// Most entries a core member accepts in one AppendEntries, counted before the RPC is
/// decoded (an empty entry is 2 bytes on the wire and a few hundred decoded). 4096: 128
/// times the default `max_payload_entries`, so members with different settings still talk.
pub const MAX_APPEND_ENTRIES: u64 = 4096;

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            max_stall_ms: 10_000,
            snapshot_every_entries: 1000,
            keep_logs_after_snapshot: 500,
            max_payload_entries: 32,
            root_check_interval_ms: 1000,
            catch_up_timeout_ms: 90_000,
        }
    }
}

impl RaftConfig {
    /// Check the settings against each other and against openraft's own rules.
    pub fn validate(&self) -> Result<(), ConsensusError> {
        self.to_openraft().map(|_| ())
    }

    fn timing(&self) -> election::Timing {
        let ms = Duration::from_millis;
        let lease = ms(self.election_timeout_min_ms / 2);
        election::Timing {
            heartbeat: ms(self.heartbeat_interval_ms),
            election_min: ms(self.election_timeout_min_ms),
            election_max: ms(self.election_timeout_max_ms),
            pre_vote_lease: lease,
            rpc_ttl: lease,
            max_stall: ms(self.max_stall_ms),
        }
    }

    /// openraft's settings. Its election timer is off (Canopy's pre-vote starts elections);
    /// its election timeouts only set its leader lease, half the minimum election timeout, so
    /// that a member that granted a pre-vote also grants the vote.
    fn to_openraft(&self) -> Result<openraft::Config, ConsensusError> {
        let invalid = |why: String| Err(ConsensusError::InvalidConfig(why));
        if self.heartbeat_interval_ms < 10 {
            return invalid("heartbeat_interval_ms must be at least 10".into());
        }
        if self.election_timeout_min_ms < 4 * self.heartbeat_interval_ms {
            return invalid(format!(
                "election_timeout_min_ms ({}) must be at least 4 heartbeats ({} ms)",
                self.election_timeout_min_ms,
                4 * self.heartbeat_interval_ms
            ));
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return invalid(format!(
                "election_timeout_max_ms ({}) must exceed election_timeout_min_ms ({})",
                self.election_timeout_max_ms, self.election_timeout_min_ms
            ));
        }
        if self.max_stall_ms <= self.heartbeat_interval_ms {
            return invalid(format!(
                "max_stall_ms ({}) must exceed heartbeat_interval_ms ({})",
                self.max_stall_ms, self.heartbeat_interval_ms
            ));
        }
        if self.snapshot_every_entries == 0 {
            return invalid("snapshot_every_entries must be > 0".into());
        }
        if self.max_payload_entries == 0 || self.max_payload_entries > MAX_APPEND_ENTRIES {
            return invalid(format!(
                "max_payload_entries must be 1 to {MAX_APPEND_ENTRIES}, not {}",
                self.max_payload_entries
            ));
        }
        if self.catch_up_timeout_ms == 0 {
            return invalid("catch_up_timeout_ms must be > 0".into());
        }
        let lease = self.election_timeout_min_ms / 2;
        openraft::Config {
            cluster_name: "canopy".into(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: (self.heartbeat_interval_ms + lease) / 2,
            election_timeout_max: lease,
            enable_elect: false,
            install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT_MS,
            max_payload_entries: self.max_payload_entries,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            max_in_snapshot_log_to_keep: self.keep_logs_after_snapshot,
            purge_batch_size: 1,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ConsensusError::InvalidConfig(e.to_string()))
    }
}

/// Errors of the consensus module.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    /// This node is not the leader; `leader` is the one it knows of, if any.
    #[error("not the leader (leader: {})", leader.as_ref().map_or("unknown".to_string(), Member::to_string))]
    NotLeader { leader: Option<Member> },
    /// The Raft instance has been shut down.
    #[error("raft is stopped")]
    Stopped,
    /// Waiting for a condition (such as a leader) took longer than allowed.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: &'static str, after: Duration },
    #[error("invalid raft config: {0}")]
    InvalidConfig(String),
    /// The proposal's entry would not fit one AppendEntries frame.
    #[error(
        "proposal of {len} bytes (with its entry envelope) exceeds the {max}-byte frame limit"
    )]
    TooLarge { len: usize, max: usize },
    /// The proposal is not acceptable as submitted.
    #[error("invalid proposal: {0}")]
    InvalidProposal(String),
    /// A member to add did not prove its identity at its address.
    #[error("cannot add {member}: {reason}; the voters are unchanged")]
    BadMember { member: String, reason: String },
    /// A member to add did not catch up as a learner in time; it was removed again.
    #[error("{member} did not catch up within {after:?}; it was removed again and the voters are unchanged")]
    CatchUpTimeout { member: String, after: Duration },
    /// Removing the member would leave fewer reachable voters than a quorum.
    #[error("removing {member} would leave {reachable} reachable voter(s) of {voters}, fewer than the {needed} a quorum needs (unreachable: {unreachable}); force it to remove anyway")]
    WouldLoseQuorum {
        member: String,
        reachable: usize,
        voters: usize,
        needed: usize,
        unreachable: String,
    },
    #[error("cannot create {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    LogStore(#[from] LogStoreError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// openraft stopped on a storage failure.
    #[error("raft storage: {0}")]
    Storage(Box<StorageError>),
    /// The Raft core task failed (panicked or could not be joined).
    #[error("raft core failed: {0}")]
    Fatal(String),
    /// Another openraft error that has no meaning for callers beyond its message.
    #[error("raft: {0}")]
    Raft(String),
}

impl From<Fatal<NodeId>> for ConsensusError {
    fn from(f: Fatal<NodeId>) -> Self {
        match f {
            Fatal::Stopped => ConsensusError::Stopped,
            Fatal::StorageError(e) => ConsensusError::Storage(Box::new(e)),
            Fatal::Panicked => ConsensusError::Fatal("raft core panicked".into()),
        }
    }
}

/// One core node's Raft instance.
pub struct Core {
    raft: Raft<TypeConfig>,
    id: NodeId,
    me: Member,
    committed: CommittedIndex,
    network: Network,
    liveness: Arc<election::Liveness>,
    timing: election::Timing,
    last_log_id: Arc<Mutex<Option<LogId>>>,
    /// The snapshot being received (id, bytes received so far); see [`Core::handle_rpc`].
    snapshot_rx: Mutex<Option<(String, u64)>>,
    max_snapshot_bytes: u64,
    max_frame: usize,
    catch_up: Duration,
    root_checks: Arc<state_machine::RootChecks>,
    stopping: AtomicBool,
    tasks: Vec<tokio::task::AbortHandle>,
}

type WriteError = RaftError<NodeId, ClientWriteError<NodeId, Member>>;

impl Core {
    /// Open (or create) the redb log at data_dir/raft.redb and the snapshot dir data_dir/snapshots/,
    /// restore the state machine from the newest snapshot (calling sm.install), and start openraft,
    /// which reaches peers by dialing from `endpoint` with frames of at most `max_frame` bytes.
    /// When it returns, `sm` also holds every entry this node had seen committed.
    pub async fn open(
        me: Member,
        data_dir: &Path,
        sm: Arc<dyn FileStateMachine>,
        cfg: &RaftConfig,
        endpoint: quinn::Endpoint,
        max_frame: usize,
    ) -> Result<Core, ConsensusError> {
        let mut config = cfg.to_openraft()?;
        config.snapshot_max_chunk_size = SNAPSHOT_SEGMENT_BYTES.min(max_frame / 2) as u64;
        let config = Arc::new(
            config
                .validate()
                .map_err(|e| ConsensusError::InvalidConfig(e.to_string()))?,
        );
        std::fs::create_dir_all(data_dir).map_err(|source| ConsensusError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let id = me.id();
        let log_store = LogStore::open(data_dir.join("raft.redb"), &me.name).await?;
        let committed = log_store.committed_index();
        let last_log_id = log_store.last_log_id();
        let limits = snapshot::Limits::of(&sm.current());
        let snapshots = SnapshotStore::open(data_dir.join("snapshots"), limits).await?;
        let max_snapshot_bytes = snapshots.max_snapshot_bytes();
        let root_checks = Arc::new(state_machine::RootChecks::new(&me.name));
        let state_machine = StateMachineStore::restore(sm, snapshots, root_checks.clone()).await?;
        let network = Network::new(id, endpoint, max_frame);
        let raft = Raft::new(id, config, network.clone(), log_store, state_machine).await?;
        let timing = cfg.timing();
        let liveness = Arc::new(election::Liveness::default());
        let tasks = vec![
            tokio::spawn(telemetry::export(
                raft.metrics(),
                committed.clone(),
                me.name.clone(),
            ))
            .abort_handle(),
            tokio::spawn(election::run_elections(
                raft.clone(),
                liveness.clone(),
                network.clone(),
                timing,
                last_log_id.clone(),
            ))
            .abort_handle(),
            tokio::spawn(election::run_heartbeats(
                raft.clone(),
                liveness.clone(),
                network.clone(),
                timing,
            ))
            .abort_handle(),
            tokio::spawn(election::run_probe(raft.clone(), liveness.clone(), timing))
                .abort_handle(),
            tokio::spawn(run_root_checks(
                raft.clone(),
                root_checks.clone(),
                Duration::from_millis(cfg.root_check_interval_ms),
            ))
            .abort_handle(),
        ];
        Ok(Core {
            raft,
            id,
            me,
            committed,
            network,
            liveness,
            timing,
            last_log_id,
            snapshot_rx: Mutex::new(None),
            max_snapshot_bytes,
            max_frame,
            catch_up: Duration::from_millis(cfg.catch_up_timeout_ms),
            root_checks,
            stopping: AtomicBool::new(false),
            tasks,
        })
    }

    /// Form a cluster whose voters are exactly `members` (which must include this node). Harmless
    /// (Ok, and nothing logged) if this node is already initialized, so every member may call it
    /// with the same set on every start.
    pub async fn initialize(
        &self,
        members: BTreeMap<NodeId, Member>,
    ) -> Result<(), ConsensusError> {
        if let Some((id, m)) = members.iter().find(|(id, m)| **id != m.id()) {
            return Err(ConsensusError::Raft(format!(
                "member {m} is listed under id {id}, its id is {}",
                m.id()
            )));
        }
        if self.raft.is_initialized().await? {
            return Ok(());
        }
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(RaftError::APIError(e @ InitializeError::NotInMembers(_))) => {
                Err(ConsensusError::Raft(e.to_string()))
            }
            Err(RaftError::Fatal(f)) => Err(f.into()),
        }
    }

    /// Form a one-member cluster of this node. Harmless (Ok) if already initialized.
    pub async fn initialize_single(&self) -> Result<(), ConsensusError> {
        self.initialize(BTreeMap::from([(self.id, self.me.clone())]))
            .await
    }

    /// Commit a proposal and return how it applied. Error NotLeader if this node isn't leader.
    ///
    /// Refused before anything is appended: a proposal whose entry would not fit one frame
    /// (`TooLarge`), an id longer than [`MAX_PROPOSAL_ID`], a batch inside a batch, or a
    /// root check (only the leader's consensus layer proposes those).
    pub async fn propose(&self, p: crate::proto::Proposal) -> Result<ApplyOutcome, ConsensusError> {
        self.check_proposal(&p)?;
        match self.raft.client_write(Cmd(p)).await {
            Ok(resp) => Ok(resp.data),
            Err(e) => Err(self.write_error(e)),
        }
    }

    fn check_proposal(&self, p: &crate::proto::Proposal) -> Result<(), ConsensusError> {
        let len = p.encoded_len() + ENTRY_FRAME_OVERHEAD;
        if len > self.max_frame {
            return Err(ConsensusError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        let invalid = |why: &str| Err(ConsensusError::InvalidProposal(why.into()));
        for q in std::iter::once(p).chain(&p.batch) {
            if q.id.len() > MAX_PROPOSAL_ID {
                return invalid("proposal id longer than 64 bytes");
            }
            if q.root_check.is_some() {
                return invalid("root checks are proposed by the core itself");
            }
        }
        if p.batch.iter().any(|q| !q.batch.is_empty()) {
            return invalid("a batch inside a batch");
        }
        Ok(())
    }

    /// Make `m` a voter: check that it answers at its address with a core certificate for its
    /// name, add it as a learner, wait until it has caught up with the leader's log (possibly
    /// through a snapshot) within the catch-up timeout, then change the voters to the current
    /// ones plus `m`. On any failure the voters are unchanged (a learner that did not catch up
    /// is removed again). Only on the leader (NotLeader otherwise). Ok at once if `m` already
    /// is a voter at the same address.
    pub async fn add_member(&self, m: Member) -> Result<(), ConsensusError> {
        self.ensure_leader()?;
        let id = m.id();
        let (known, voter) = self.membership_of(id);
        if voter && known.as_ref() == Some(&m) {
            return Ok(());
        }
        self.network
            .probe(&m, PROBE_TIMEOUT)
            .await
            .map_err(|e| ConsensusError::BadMember {
                member: m.to_string(),
                reason: e.to_string(),
            })?;
        if known.as_ref().is_some_and(|k| *k != m) {
            self.raft
                .change_membership(
                    ChangeMembers::SetNodes(BTreeMap::from([(id, m.clone())])),
                    false,
                )
                .await
                .map_err(|e| self.write_error(e))?;
        }
        if !voter {
            self.raft
                .add_learner(id, m.clone(), false)
                .await
                .map_err(|e| self.write_error(e))?;
            let target = self.raft.metrics().borrow().last_log_index;
            let waited = self
                .raft
                .wait(Some(self.catch_up))
                .metrics(
                    |x| {
                        x.state != ServerState::Leader
                            || x.replication
                                .as_ref()
                                .and_then(|r| r.get(&id).copied().flatten())
                                .map(|l| l.index)
                                >= target
                    },
                    "the learner to catch up",
                )
                .await;
            let caught_up = match waited {
                Ok(x) => x.state == ServerState::Leader,
                Err(openraft::metrics::WaitError::Timeout(..)) => false,
                Err(openraft::metrics::WaitError::ShuttingDown) => {
                    return Err(ConsensusError::Stopped)
                }
            };
            if !caught_up {
                let _ = self
                    .raft
                    .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                    .await;
                self.ensure_leader()?;
                return Err(ConsensusError::CatchUpTimeout {
                    member: m.to_string(),
                    after: self.catch_up,
                });
            }
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(|e| self.write_error(e))?;
        }
        tracing::info!(member = %m, "core member added");
        Ok(())
    }

    /// Remove the member named `name` (voter or learner) from the cluster. Only on the leader
    /// (NotLeader otherwise). Ok at once if there is no such member. Without `force`, a voter
    /// is removed only if the voters left that acknowledged the leader's heartbeats within the
    /// maximum election timeout (the leader included) still form a quorum of them.
    pub async fn remove_member(&self, name: &str, force: bool) -> Result<(), ConsensusError> {
        self.ensure_leader()?;
        let id = node_id(name);
        let change = match self.membership_of(id) {
            (None, _) => return Ok(()),
            (Some(_), true) => {
                if !force {
                    self.check_quorum_without(name, id)?;
                }
                ChangeMembers::RemoveVoters(BTreeSet::from([id]))
            }
            (Some(_), false) => ChangeMembers::RemoveNodes(BTreeSet::from([id])),
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(|e| self.write_error(e))?;
        tracing::info!(member = name, force, "core member removed");
        Ok(())
    }

    /// On the leader, the voters (this one excluded) that acknowledged none of its heartbeats
    /// within the maximum election timeout, by name; None on any other member.
    pub fn unreachable_voters(&self) -> Option<Vec<String>> {
        if !self.is_leader() {
            return None;
        }
        let voters = self.voters();
        Some(
            voters
                .into_iter()
                .filter(|(v, _)| *v != self.id && !self.is_reachable(*v))
                .map(|(_, name)| name)
                .collect(),
        )
    }

    fn voters(&self) -> Vec<(NodeId, String)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        membership
            .voter_ids()
            .map(|v| {
                let name = membership
                    .get_node(&v)
                    .map_or_else(|| v.to_string(), |m| m.name.clone());
                (v, name)
            })
            .collect()
    }

    fn is_reachable(&self, id: NodeId) -> bool {
        id == self.id || self.liveness.reachable(id, self.timing.election_max)
    }

    fn check_quorum_without(&self, name: &str, id: NodeId) -> Result<(), ConsensusError> {
        let left: Vec<(NodeId, String)> = self
            .voters()
            .into_iter()
            .filter(|(v, _)| *v != id)
            .collect();
        let (reachable, unreachable): (Vec<_>, Vec<_>) =
            left.iter().partition(|(v, _)| self.is_reachable(*v));
        let needed = left.len() / 2 + 1;
        if reachable.len() < needed {
            return Err(ConsensusError::WouldLoseQuorum {
                member: name.to_string(),
                reachable: reachable.len(),
                voters: left.len(),
                needed,
                unreachable: unreachable
                    .iter()
                    .map(|(_, n)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(())
    }

    /// Resolves when openraft has stopped for any reason other than [`Core::shutdown`] (a
    /// storage failure such as a full disk, or a panic), with that reason. This member then
    /// takes no further part in the core; the node should exit non-zero so that its
    /// supervisor restarts it. Never resolves after `shutdown`.
    pub async fn fatal(&self) -> ConsensusError {
        let mut metrics = self.raft.metrics();
        loop {
            let state = metrics.borrow_and_update().running_state.clone();
            let closed = match state {
                Err(f) => Some(ConsensusError::from(f)),
                Ok(()) => None,
            };
            let reason = match closed {
                Some(reason) => reason,
                None if metrics.changed().await.is_ok() => continue,
                None => match metrics.borrow().running_state.clone() {
                    Err(f) => ConsensusError::from(f),
                    Ok(()) => ConsensusError::Stopped,
                },
            };
            if self.stopping.load(Ordering::Acquire) {
                return std::future::pending().await;
            }
            return reason;
        }
    }

    /// How many root cross-checks this member made and how many found its file differing from
    /// the leader's (also exported as `canopy_raft_root_mismatches_total`).
    pub fn root_checks(&self) -> RootCheckCounts {
        self.root_checks.counts()
    }

    /// The members of the current (possibly not yet committed) membership, sorted by name, each
    /// with whether it is a voter.
    pub fn members(&self) -> Vec<(Member, bool)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut members: Vec<(Member, bool)> = membership
            .nodes()
            .map(|(id, m)| (m.clone(), voters.contains(id)))
            .collect();
        members.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        members
    }

    /// A summary of this node's Raft state.
    pub fn status(&self) -> RaftStatus {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        RaftStatus {
            term: m.current_term,
            leader: m.current_leader.map(|id| {
                m.membership_config
                    .membership()
                    .get_node(&id)
                    .map_or_else(|| id.to_string(), |n| n.name.clone())
            }),
            commit_index: self.committed.get(),
            applied_index: m.last_applied.map(|id| id.index),
            last_log_index: m.last_log_index,
            state: format!("{:?}", m.state),
            root_checks: self.root_checks.counts(),
        }
    }

    /// Wait until some node is known as leader and return it.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<Member, ConsensusError> {
        self.wait_for_leader_except(&[], timeout).await
    }

    /// Wait until a member whose name is not in `except` is known as leader and return it: a
    /// node that failed to reach the leader it knew waits for the next one (an election
    /// replaces a dead leader within about a second) instead of retrying the dead one.
    pub async fn wait_for_leader_except(
        &self,
        except: &[String],
        timeout: Duration,
    ) -> Result<Member, ConsensusError> {
        let mut metrics = self.raft.metrics();
        let wait = async {
            loop {
                let leader = {
                    let m = metrics.borrow_and_update();
                    if let Err(f) = &m.running_state {
                        return Err(ConsensusError::from(f.clone()));
                    }
                    m.current_leader
                        .and_then(|id| m.membership_config.membership().get_node(&id).cloned())
                        .filter(|l| !except.contains(&l.name))
                };
                if let Some(leader) = leader {
                    return Ok(leader);
                }
                if metrics.changed().await.is_err() {
                    return Err(ConsensusError::Stopped);
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(ConsensusError::Timeout {
                what: "a leader",
                after: timeout,
            }),
        }
    }

    /// The longest election timeout: within it the other members replace a leader that died.
    pub fn election_timeout_max(&self) -> Duration {
        self.timing.election_max
    }

    /// The known leader, if any.
    pub fn leader(&self) -> Option<Member> {
        let id = self.raft.metrics().borrow().current_leader?;
        self.member_of(id)
    }

    /// The running openraft instance.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// This node's name and address.
    pub fn member(&self) -> &Member {
        &self.me
    }

    /// Whether this node currently is the leader.
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// Stop openraft and wait for its core task; the log database closes with it, so the same
    /// `data_dir` can be opened again. A `Core` dropped without this keeps openraft running
    /// (without elections).
    pub async fn shutdown(&self) -> Result<(), ConsensusError> {
        self.stopping.store(true, Ordering::Release);
        for t in &self.tasks {
            t.abort();
        }
        self.raft
            .shutdown()
            .await
            .map_err(|e| ConsensusError::Fatal(e.to_string()))
    }

    fn ensure_leader(&self) -> Result<(), ConsensusError> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(ConsensusError::NotLeader {
                leader: self.leader(),
            })
        }
    }

    /// The node with this id in the current membership, and whether it is a voter.
    fn membership_of(&self, id: NodeId) -> (Option<Member>, bool) {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        (
            membership.get_node(&id).cloned(),
            membership.voter_ids().any(|v| v == id),
        )
    }

    fn write_error(&self, e: WriteError) -> ConsensusError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(fwd)) => {
                let leader = fwd
                    .leader_node
                    .or_else(|| fwd.leader_id.and_then(|id| self.member_of(id)));
                ConsensusError::NotLeader { leader }
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                ConsensusError::Raft(e.to_string())
            }
            RaftError::Fatal(f) => f.into(),
        }
    }

    fn member_of(&self, id: NodeId) -> Option<Member> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// On the leader, every `interval`, propose a root check if entries were applied since the
/// last marker; see [`state_machine::RootChecks`].
async fn run_root_checks(
    raft: Raft<TypeConfig>,
    checks: Arc<state_machine::RootChecks>,
    interval: Duration,
) {
    if interval.is_zero() {
        return;
    }
    let me = raft.metrics().borrow().id;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let applied = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            if m.running_state.is_err() {
                return;
            }
            if m.state != ServerState::Leader || m.current_leader != Some(me) {
                continue;
            }
            m.last_applied.map_or(0, |l| l.index)
        };
        let marker = checks.marker();
        if marker.is_some_and(|m| m.index >= applied) {
            continue;
        }
        let check = marker.map_or_else(crate::proto::RootCheck::default, |m| {
            crate::proto::RootCheck {
                marker_index: m.index,
                version: m.version,
                root: bytes::Bytes::copy_from_slice(&m.root),
            }
        });
        let proposal = crate::proto::Proposal {
            root_check: Some(check),
            ..Default::default()
        };
        if let Err(e) = raft.client_write(Cmd(proposal)).await {
            tracing::debug!("root check not committed: {e}");
        }
    }
}
