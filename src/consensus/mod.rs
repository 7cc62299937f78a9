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
//! - Membership changes happen only on the leader and only through openraft's joint consensus; a
//!   member becomes a voter only after it caught up as a learner.

#[cfg(test)]
mod cluster_tests;
mod log_store;
mod network;
mod state_machine;
mod telemetry;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, Fatal, InitializeError, RaftError};
use openraft::{ChangeMembers, Raft, ServerState, SnapshotPolicy};

pub use log_store::{CommittedIndex, LogStore, LogStoreError};
pub use network::{Network, PeerClient, TransportError};
pub use state_machine::{SnapshotError, SnapshotStore, StateMachineStore};
pub use telemetry::RaftStatus;

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
        SnapshotData = std::io::Cursor<Vec<u8>>,
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
pub trait FileStateMachine: Send + Sync + 'static {
    /// Called once per committed Normal entry, in log order. Must be deterministic.
    fn apply(&self, log_index: u64, proposal: &crate::proto::Proposal) -> ApplyOutcome;
    /// The file as of the last apply (a cheap copy-on-write clone).
    fn current(&self) -> crate::file::ChunkedFile;
    /// Replace the whole state with a snapshot's file (on startup from disk, or a snapshot from the leader).
    fn install(&self, file: crate::file::ChunkedFile);
}

/// Timeout for sending and installing one snapshot segment: snapshots carry the whole file, so
/// this allows megabytes per segment over a slow link.
const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 30_000;

/// Timing and log-compaction settings of the core's Raft group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftConfig {
    /// Leader heartbeat period. Default 250 ms: core nodes are few, so heartbeats are cheap, and
    /// 250 ms lets the leader notice a lost quorum well within one election timeout.
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the randomized election timeout. Default 1500 ms: six heartbeats, and
    /// longer than the worst fsync of a maximal (tens of MB) entry, during which a node's Raft
    /// loop is busy and sends or handles no heartbeat.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout. Default 3000 ms: twice the minimum, so
    /// candidates rarely time out together and split the vote.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last one. Default 1000: a snapshot
    /// writes the whole file, so it must be rare, while a restart replays at most this many
    /// entries.
    pub snapshot_every_entries: u64,
    /// Entries already in the snapshot that stay in the log. Default 500: a follower that lags
    /// by fewer entries catches up from the log instead of receiving the whole file.
    pub keep_logs_after_snapshot: u64,
    /// Most entries per AppendEntries RPC. Default 32: entries can be tens of MB each, so a
    /// batch stays bounded in memory (openraft's 300 assumes tiny entries).
    pub max_payload_entries: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_interval_ms: 250,
            election_timeout_min_ms: 1500,
            election_timeout_max_ms: 3000,
            snapshot_every_entries: 1000,
            keep_logs_after_snapshot: 500,
            max_payload_entries: 32,
        }
    }
}

impl RaftConfig {
    /// Check the settings against each other and against openraft's own rules.
    pub fn validate(&self) -> Result<(), ConsensusError> {
        self.to_openraft().map(|_| ())
    }

    fn to_openraft(&self) -> Result<openraft::Config, ConsensusError> {
        let invalid = |why: String| Err(ConsensusError::InvalidConfig(why));
        if self.heartbeat_interval_ms == 0 {
            return invalid("heartbeat_interval_ms must be > 0".into());
        }
        if self.election_timeout_min_ms <= self.heartbeat_interval_ms {
            return invalid(format!(
                "election_timeout_min_ms ({}) must exceed heartbeat_interval_ms ({})",
                self.election_timeout_min_ms, self.heartbeat_interval_ms
            ));
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return invalid(format!(
                "election_timeout_max_ms ({}) must exceed election_timeout_min_ms ({})",
                self.election_timeout_max_ms, self.election_timeout_min_ms
            ));
        }
        if self.snapshot_every_entries == 0 {
            return invalid("snapshot_every_entries must be > 0".into());
        }
        if self.max_payload_entries == 0 {
            return invalid("max_payload_entries must be > 0".into());
        }
        openraft::Config {
            cluster_name: "canopy".into(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
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
        let config = Arc::new(cfg.to_openraft()?);
        std::fs::create_dir_all(data_dir).map_err(|source| ConsensusError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let id = me.id();
        let log_store = LogStore::open(data_dir.join("raft.redb"), &me.name).await?;
        let committed = log_store.committed_index();
        let snapshots = SnapshotStore::open(data_dir.join("snapshots")).await?;
        let state_machine = StateMachineStore::restore(sm, snapshots).await?;
        let network = Network::new(id, endpoint, max_frame);
        let raft = Raft::new(id, config, network, log_store, state_machine).await?;
        tokio::spawn(telemetry::export(
            raft.metrics(),
            committed.clone(),
            me.name.clone(),
        ));
        Ok(Core {
            raft,
            id,
            me,
            committed,
        })
    }

    /// Form a cluster whose voters are exactly `members` (which must include this node). Harmless
    /// (Ok) if this node is already initialized, so every member may call it with the same set.
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
    pub async fn propose(&self, p: crate::proto::Proposal) -> Result<ApplyOutcome, ConsensusError> {
        match self.raft.client_write(Cmd(p)).await {
            Ok(resp) => Ok(resp.data),
            Err(e) => Err(self.write_error(e)),
        }
    }

    /// Make `m` a voter: add it as a learner, wait until it has caught up with the leader's log
    /// (possibly through a snapshot), then change the voters to the current ones plus `m`. Only on
    /// the leader (NotLeader otherwise). Ok at once if `m` already is a voter at the same address.
    /// The wait for catching up is unbounded; a caller may drop the future to give up, leaving `m`
    /// a learner until the next `add_member` or `remove_member`.
    pub async fn add_member(&self, m: Member) -> Result<(), ConsensusError> {
        self.ensure_leader()?;
        let id = m.id();
        let (known, voter) = self.membership_of(id);
        if voter && known.as_ref() == Some(&m) {
            return Ok(());
        }
        if known.is_some_and(|k| k != m) {
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
                .add_learner(id, m.clone(), true)
                .await
                .map_err(|e| self.write_error(e))?;
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(|e| self.write_error(e))?;
        }
        tracing::info!(member = %m, "core member added");
        Ok(())
    }

    /// Remove the member named `name` (voter or learner) from the cluster. Only on the leader
    /// (NotLeader otherwise). Ok at once if there is no such member.
    pub async fn remove_member(&self, name: &str) -> Result<(), ConsensusError> {
        self.ensure_leader()?;
        let id = node_id(name);
        let change = match self.membership_of(id) {
            (None, _) => return Ok(()),
            (Some(_), true) => ChangeMembers::RemoveVoters(BTreeSet::from([id])),
            (Some(_), false) => ChangeMembers::RemoveNodes(BTreeSet::from([id])),
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(|e| self.write_error(e))?;
        tracing::info!(member = name, "core member removed");
        Ok(())
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
        }
    }

    /// Wait until some node is known as leader and return it.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<Member, ConsensusError> {
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
    /// `data_dir` can be opened again. A `Core` dropped without this keeps openraft running.
    pub async fn shutdown(&self) -> Result<(), ConsensusError> {
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
