//! A node's copy of the file and its place in the committed stream, as a sans-IO state machine.
//!
//! The same type serves both sides of a subscription: as a child it consumes `Downstream`
//! frames from its parent ([`Replica::handle_downstream`]); as a parent it plans what a
//! subscribing child needs ([`Replica::plan_subscription`]). Core nodes feed it committed
//! Raft entries instead ([`Replica::apply_committed`]). It holds no clock, socket or task:
//! the caller passes `now_us` and carries out the returned [`Event`]s.
//!
//! Invariants:
//! - `file.version()` moves only by applying an entry whose `prev_version` equals it, or by
//!   installing a snapshot whose recomputed root equals the advertised one.
//! - Only the core is trusted for content ([`Trust`]): a core signs every entry it produces
//!   (a `Seal` frame right after it) and every state it serves as a snapshot; any other node
//!   shows a version ([`Replica::file`], [`Event::Applied`]) only once a core's seal covers
//!   it. An entry is checked (its place in the stream, its update's form) and forwarded at
//!   once, but applied only when its seal verifies: until then it is not shown, not
//!   retained, not served as a state. So nothing is ever undone, and no copy of the file is
//!   kept for it. A frame that should be sealed and is not, or is sealed badly, is
//!   [`ReplicaError::Untrusted`]; losing the upstream drops an unsealed entry, and the
//!   children that got it are told ([`Event::RolledBack`]).
//! - The retained window is contiguous: each entry's `prev_version` is the version of the
//!   one before it, and the first one's is `base.0`; its encoded size stays within
//!   `retain_bytes` (the newest entry is always kept).
//! - Every frame handed out in [`Event::Broadcast`] is one this node has applied or verified,
//!   in stream order; entry frames are forwarded verbatim (encoded once at the core).

use fifo::Fifo;

use bytes::Bytes;

use std::time::SystemTime;

use crate::dedup::DedupTable;
use crate::file::{ApplyOutcome, ChunkedFile, FileError, Hash, Precondition, Update};
use crate::proto::{self, downstream::Kind as Down};
use crate::transfer::{Receiving, Salvage, TransferError};
use crate::trust::{entry_digest, Anchor, Sealer, TrustError, Verifier};
use crate::wire;

pub use crate::transfer::{snapshot_end_frame, snapshot_frames, snapshot_frames_below, FollowPlan};

/// Tuning of the replica; see [`crate::config`] for where these come from.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// Chunk size of the file (fixed for the cluster).
    pub chunk_size: u32,
    /// Largest file length accepted.
    pub max_len: u64,
    /// Bytes of recent entry frames kept to resume children without a full transfer.
    pub retain_bytes: u64,
    /// A checkpoint frame goes down the stream after this many entries.
    pub checkpoint_every: u32,
}

/// Something the driver must do after a call into the replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Send this encoded frame, unchanged, to every child, after everything broadcast before.
    Broadcast(Bytes),
    /// The file is now at `version`; `commit_time_us` is when the core applied it.
    Applied { version: u64, commit_time_us: u64 },
    /// A snapshot replaced the file; children on older versions will resubscribe on their own.
    Installed { version: u64 },
    /// The parent's checkpoint matched this node's root.
    CheckpointVerified { version: u64 },
    /// An entry that was applied and forwarded, but never sealed, was undone: the file is
    /// back at `version`. Children that received the entry must resubscribe.
    RolledBack { version: u64 },
}

/// How a replica treats core signatures.
pub enum Trust {
    /// A core node: signs every entry it produces and every state it serves.
    Sign { sealer: Sealer, verifier: Verifier },
    /// Any other node: shows a version only once a core's seal covers it.
    Verify(Verifier),
    /// Nothing signed or checked: the stream logic alone, in unit tests.
    #[cfg(test)]
    Unchecked,
}

impl Trust {
    fn verifier(&self) -> Option<&Verifier> {
        match self {
            Trust::Sign { verifier, .. } | Trust::Verify(verifier) => Some(verifier),
            #[cfg(test)]
            Trust::Unchecked => None,
        }
    }
}

/// A core's signature over the state a node shows: the seal, and the digest of the entry it
/// sealed (`None` for a state anchor).
pub type Sealed = (proto::Seal, Option<Hash>);

/// Why the upstream stream can no longer be followed; the driver drops it and resubscribes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplicaError {
    /// An entry does not follow this node's version: something was skipped or repeated.
    #[error("stream gap: holding version {have}, entry follows {prev}")]
    Gap { have: u64, prev: u64 },
    /// The parent's checkpoint root differs from this node's root at the same version.
    #[error("diverged at version {version}: parent root {expected}, local root {got}")]
    Diverged {
        version: u64,
        expected: String,
        got: String,
    },
    /// A checkpoint names a version this node does not hold while streaming.
    #[error("checkpoint for version {checkpoint} while holding {have}")]
    CheckpointOutOfStep { checkpoint: u64, have: u64 },
    /// A transferred chunk does not hash to its manifest entry (the sender is faulty).
    #[error("chunk {index} does not match the manifest")]
    BadChunk { index: u64 },
    /// The manifest does not recompute the advertised root.
    #[error("manifest does not match root {root}")]
    BadManifest { root: String },
    /// A frame that is not valid in the current subscription state.
    #[error("unexpected {frame} frame while {state}")]
    Unexpected {
        frame: &'static str,
        state: &'static str,
    },
    /// The parent refused the subscription.
    #[error("parent refused: {0}")]
    Refused(String),
    /// This node appears in its parent's path to the core: the tree has a cycle here.
    #[error("cycle: this node is in its parent's root path {0:?}")]
    Cycle(Vec<String>),
    /// An entry or snapshot could not be applied (bad op, bad chunk, root mismatch).
    #[error("file: {0}")]
    File(#[from] FileError),
    /// A core signature is missing where one is due, or does not verify: the parent is
    /// faulty or hostile. `reason` is a short stable label
    /// (`canopy_untrusted_frames_total{reason}`).
    #[error("untrusted ({reason}): {detail}")]
    Untrusted {
        reason: &'static str,
        detail: String,
    },
}

fn untrusted(e: TrustError) -> ReplicaError {
    ReplicaError::Untrusted {
        reason: e.label(),
        detail: e.to_string(),
    }
}

fn unsealed_error(reason: &'static str, detail: String) -> ReplicaError {
    ReplicaError::Untrusted { reason, detail }
}

impl From<TransferError> for ReplicaError {
    fn from(e: TransferError) -> Self {
        match e {
            TransferError::BadChunk { index } => Self::BadChunk { index },
            TransferError::BadManifest { root } => Self::BadManifest { root },
            TransferError::File(f) => Self::File(f),
        }
    }
}

impl ReplicaError {
    /// True when the local content can no longer be trusted and only a full transfer fixes it.
    pub fn needs_full_resync(&self) -> bool {
        matches!(self, Self::Diverged { .. } | Self::File(_))
    }

    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Gap { .. } => "gap",
            Self::Diverged { .. } => "diverged",
            Self::CheckpointOutOfStep { .. } => "checkpoint_out_of_step",
            Self::Unexpected { .. } => "unexpected_frame",
            Self::Refused(_) => "refused",
            Self::Cycle(_) => "cycle",
            Self::BadChunk { .. } => "bad_chunk",
            Self::BadManifest { .. } => "bad_manifest",
            Self::File(_) => "file",
            Self::Untrusted { .. } => "untrusted",
        }
    }
}

/// A transfer a parent sends a subscribing child.
#[derive(Clone)]
pub struct SnapshotPlan {
    /// The file at the version shown.
    pub file: ChunkedFile,
    /// The core's seal over that state (`None` only in unit tests without trust).
    pub anchor: Option<Sealed>,
    /// The core's commit time of that version.
    pub commit_time_us: u64,
    /// Frames to send after the transfer: an entry not sealed yet.
    pub then: Vec<Bytes>,
}

/// Where a chunk of a followed transfer stands ([`Replica::follow_chunk`]).
#[derive(Clone, Debug)]
pub enum FollowChunk {
    /// Verified here: send it.
    Ready(Bytes),
    /// Not here yet: wait for this node's transfer to progress and ask again.
    Pending,
    /// This node installed the followed version: every remaining chunk is in this file.
    Installed(ChunkedFile),
    /// This node no longer receives that version and does not hold the chunk: end the
    /// child's stream (it resubscribes).
    Gone,
}

/// What a parent sends a subscribing child before the live stream.
#[derive(Clone)]
pub enum SubscribePlan {
    /// These retained entry and seal frames, then the live stream.
    Resume(Vec<Bytes>),
    /// A transfer of the state shown, then the live stream.
    Snapshot(Box<SnapshotPlan>),
    /// This node is itself receiving a transfer: pass it on chunk by chunk as each one is
    /// verified here ([`Replica::follow_chunk`]), then the live stream, which starts after
    /// the transfer's version.
    Follow(Box<FollowPlan>),
    /// This node cannot serve yet (it holds no verified copy itself).
    Refuse(String),
}

enum Upstream {
    Idle,
    AwaitOk,
    AwaitSnapshot,
    /// A transfer; once its `SnapshotEnd` came while chunks fetched from other sources were
    /// still missing, [`Replica::finish_snapshot`] completes it.
    Snapshot(Box<Receiving>),
    Streaming,
}

impl Upstream {
    fn name(&self) -> &'static str {
        match self {
            Upstream::Idle => "idle",
            Upstream::AwaitOk => "awaiting subscribe_ok",
            Upstream::AwaitSnapshot => "awaiting snapshot",
            Upstream::Snapshot(_) => "receiving snapshot",
            Upstream::Streaming => "streaming",
        }
    }
}

struct Retained {
    version: u64,
    root: Hash,
    frame: Bytes,
    /// The seal that followed the entry (empty without trust).
    seal: Bytes,
}

/// An entry checked and forwarded, waiting for its seal to be applied.
struct Unsealed {
    version: u64,
    digest: Hash,
    frame: Bytes,
    commit_time_us: u64,
    update: Update,
}

/// The node's file plus its stream position; see the module docs.
pub struct Replica {
    cfg: ReplicaConfig,
    name: String,
    file: ChunkedFile,
    synced: bool,
    retained: Fifo<Retained>,
    retained_bytes: u64,
    base: (u64, Hash),
    upstream: Upstream,
    commit_known: u64,
    last_commit_time_us: u64,
    since_checkpoint: u32,
    dedup: DedupTable,
    salvage: Salvage,
    trust: Trust,
    /// The core's seal over the version shown.
    anchor: Option<Sealed>,
    unsealed: Option<Unsealed>,
}

fn frame_name(kind: &Option<Down>) -> &'static str {
    match kind {
        None => "empty",
        Some(Down::SubscribeOk(_)) => "subscribe_ok",
        Some(Down::SnapshotBegin(_)) => "snapshot_begin",
        Some(Down::SnapshotChunk(_)) => "snapshot_chunk",
        Some(Down::SnapshotEnd(_)) => "snapshot_end",
        Some(Down::Entry(_)) => "entry",
        Some(Down::Checkpoint(_)) => "checkpoint",
        Some(Down::Heartbeat(_)) => "heartbeat",
        Some(Down::Refused(_)) => "refused",
        Some(Down::Seal(_)) => "seal",
        Some(Down::Signers(_)) => "signers",
    }
}

impl Replica {
    /// An empty replica. A core node's (`Trust::Sign`) is synced from the start: its file is
    /// authoritative; any other is not until its first snapshot or resume.
    pub fn new(cfg: ReplicaConfig, trust: Trust) -> Result<Self, FileError> {
        let file = ChunkedFile::new(cfg.chunk_size, cfg.max_len)?;
        let base = (file.version(), file.root());
        let synced = matches!(trust, Trust::Sign { .. });
        let mut r = Self {
            cfg,
            name: String::new(),
            file,
            synced,
            retained: Fifo::new(),
            retained_bytes: 0,
            base,
            upstream: Upstream::Idle,
            commit_known: 0,
            last_commit_time_us: 0,
            since_checkpoint: 0,
            dedup: DedupTable::default(),
            salvage: Salvage::default(),
            trust,
            anchor: None,
            unsealed: None,
        };
        r.sign_state();
        Ok(r)
    }

    /// A replica that signs and checks nothing, for tests of the stream logic alone.
    #[cfg(test)]
    pub fn unchecked(cfg: ReplicaConfig, synced: bool) -> Self {
        let mut r = Self::new(cfg, Trust::Unchecked).expect("valid test config");
        r.synced = synced;
        r
    }

    /// Names this node (a heartbeat whose root path holds this name means a cycle).
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// The file at the version shown: the newest one a core's seal covers (an entry applied
    /// but not sealed yet is not shown).
    pub fn file(&self) -> &ChunkedFile {
        &self.file
    }

    /// Whether this node holds a verified copy it may serve to children.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// The transfer this node is receiving, when a child may follow it: it has a manifest,
    /// and a core's seal over its root (which the replica checked when it began) unless
    /// nothing is checked.
    fn follow_plan(&self) -> Option<FollowPlan> {
        match &self.upstream {
            Upstream::Snapshot(r) => r
                .follow()
                .filter(|p| p.anchor.is_some() || self.trust.verifier().is_none()),
            _ => None,
        }
    }

    /// Whether a subscribing child could follow the transfer this node is receiving now
    /// ([`SubscribePlan::Follow`]).
    pub fn can_follow(&self) -> bool {
        !self.synced && self.follow_plan().is_some()
    }

    /// Parent side of a [`SubscribePlan::Follow`] of the transfer at `version`: chunk
    /// `index`, whose manifest hash is `hash`, once this node holds it verified.
    pub fn follow_chunk(&self, version: u64, index: u64, hash: &Hash) -> FollowChunk {
        if self.synced && self.file.version() == version {
            return FollowChunk::Installed(self.file.clone());
        }
        if let Some(data) = self.find_chunk(index, hash) {
            return FollowChunk::Ready(data);
        }
        match &self.upstream {
            Upstream::Snapshot(r) if r.version() == version => FollowChunk::Pending,
            _ => FollowChunk::Gone,
        }
    }

    /// Highest version known to be committed (from the stream or from local commits).
    pub fn commit_known(&self) -> u64 {
        self.commit_known.max(self.file.version())
    }

    /// Core time at which the current version was applied (0 if unknown).
    pub fn last_commit_time_us(&self) -> u64 {
        self.last_commit_time_us
    }

    /// Bytes of retained entry frames.
    pub fn retained_bytes(&self) -> u64 {
        self.retained_bytes
    }

    /// Replaces the whole state with `file` (a Raft snapshot on a core node). Retained entries
    /// are dropped, so children resume only from here on.
    pub fn install(&mut self, file: ChunkedFile) -> Vec<Event> {
        self.file = file;
        self.unsealed = None;
        self.sign_state();
        self.salvage = Salvage::default();
        self.retained.clear();
        self.retained_bytes = 0;
        self.base = (self.file.version(), self.file.root());
        self.commit_known = self.commit_known.max(self.file.version());
        self.synced = true;
        vec![Event::Installed {
            version: self.file.version(),
        }]
    }

    /// Relays at start-up: takes the copy found on disk, with the core's seal recorded for it.
    /// The copy is trusted (served, resumed from) only if the seal verifies over its content;
    /// otherwise it is only used to fetch less (its chunk hashes go in the next subscription).
    /// Returns whether it is trusted.
    pub fn seed(
        &mut self,
        file: ChunkedFile,
        sealed: Option<Sealed>,
    ) -> Result<bool, ReplicaError> {
        let trusted = match &sealed {
            Some(s) => self.covers(s, &file).map(|()| true),
            None => Ok(false),
        };
        self.file = file;
        self.unsealed = None;
        self.retained.clear();
        self.retained_bytes = 0;
        self.base = (self.file.version(), self.file.root());
        self.synced = matches!(trusted, Ok(true));
        self.anchor = sealed.filter(|_| self.synced);
        trusted
    }

    /// Core nodes: applies the committed proposal at Raft log index `index`.
    /// Call once per committed normal entry, in log order; then carry out the events.
    pub fn apply_committed(
        &mut self,
        index: u64,
        proposal: &proto::Proposal,
        now_us: u64,
    ) -> (ApplyOutcome, Vec<Event>) {
        let current = self.file.version();
        let mut applied = Vec::new();
        let outcome = if proposal.batch.is_empty() {
            self.apply_one(index, proposal, &mut applied)
        } else {
            for sub in &proposal.batch {
                self.apply_one(index, sub, &mut applied);
            }
            ApplyOutcome::Applied {
                version: self.file.version(),
            }
        };
        if applied.is_empty() {
            return (outcome, Vec::new());
        }
        let entry = proto::Entry {
            version: index,
            prev_version: current,
            commit_time_unix_us: now_us,
            update: Some(proto::Update {
                ops: applied.into_iter().flat_map(|u| u.ops).collect(),
            }),
        };
        let frame = wire::encode(&proto::Downstream {
            kind: Some(Down::Entry(entry)),
        });
        self.commit_known = index;
        let seal = self.seal_entry(&frame, now_us);
        let mut events = self.after_apply(frame, seal, now_us);
        if self.since_checkpoint >= self.cfg.checkpoint_every {
            events.extend(self.checkpoint());
        }
        (outcome, events)
    }

    /// How the proposal with this id applied, if it is within the dedupe window (batched
    /// proposals are answered from here).
    pub fn outcome_of(&self, id: &[u8]) -> Option<ApplyOutcome> {
        self.dedup.get(id).cloned()
    }

    /// Core nodes: the proposal-id dedup table (replicated state, carried by Raft snapshots).
    pub fn dedup(&self) -> &DedupTable {
        &self.dedup
    }

    /// Core nodes: replaces the dedup table (with the file, when a Raft snapshot is installed).
    pub fn restore_dedup(&mut self, dedup: DedupTable) {
        self.dedup = dedup;
    }

    /// Applies one proposal at `index` (deduplicated by id), pushing its update to `applied`
    /// when it changed the file.
    fn apply_one(
        &mut self,
        index: u64,
        proposal: &proto::Proposal,
        applied: &mut Vec<proto::Update>,
    ) -> ApplyOutcome {
        if let Some(first) = self.dedup.get(&proposal.id) {
            return first.clone();
        }
        let outcome = self.check_and_apply(index, proposal, applied);
        self.dedup.record(proposal.id.clone(), outcome.clone());
        outcome
    }

    fn check_and_apply(
        &mut self,
        index: u64,
        proposal: &proto::Proposal,
        applied: &mut Vec<proto::Update>,
    ) -> ApplyOutcome {
        let current = self.file.version();
        let rejected = |e: FileError| ApplyOutcome::Rejected {
            version: current,
            reason: e.to_string(),
        };
        let update_proto = proposal.update.clone().unwrap_or_default();
        let update = match Update::try_from(update_proto.clone()) {
            Ok(u) => u,
            Err(e) => return rejected(e),
        };
        if let Some(p) = proposal.precondition.clone() {
            match Precondition::try_from(p) {
                Ok(p) if self.file.check(&p) => {}
                Ok(_) => return ApplyOutcome::PreconditionFailed { version: current },
                Err(e) => return rejected(e),
            }
        }
        if let Err(e) = self.file.apply(index, &update) {
            return rejected(e);
        }
        applied.push(update_proto);
        ApplyOutcome::Applied { version: index }
    }

    /// Core nodes: the seal frame of the entry `frame` just applied (empty without trust).
    fn seal_entry(&mut self, frame: &Bytes, commit_time_us: u64) -> Bytes {
        let Trust::Sign { sealer, .. } = &self.trust else {
            return Bytes::new();
        };
        let digest = entry_digest(frame);
        let anchor = Anchor {
            version: self.file.version(),
            length: self.file.len(),
            chunk_size: self.file.chunk_size(),
            root: self.file.root(),
            commit_time_us,
            entry: Some(digest),
            prev: None,
        };
        match sealer.seal(&anchor) {
            Ok(seal) => {
                let f = wire::encode(&proto::Downstream {
                    kind: Some(Down::Seal(seal.clone())),
                });
                self.anchor = Some((seal, Some(digest)));
                f
            }
            Err(_) => Bytes::new(),
        }
    }

    /// After an entry applied (on a relay: and sealed): broadcast it with its seal (entry
    /// first unless it went down already), retain both, and show the version.
    fn after_apply(&mut self, frame: Bytes, seal: Bytes, commit_time_us: u64) -> Vec<Event> {
        self.last_commit_time_us = commit_time_us;
        self.since_checkpoint += 1;
        let mut events = vec![Event::Broadcast(frame.clone())];
        if !seal.is_empty() {
            events.push(Event::Broadcast(seal.clone()));
        }
        self.retain(frame, seal);
        events.push(Event::Applied {
            version: self.file.version(),
            commit_time_us,
        });
        events
    }

    fn retain(&mut self, frame: Bytes, seal: Bytes) {
        self.retained_bytes += (frame.len() + seal.len()) as u64;
        self.retained.push_back(Retained {
            version: self.file.version(),
            root: self.file.root(),
            frame,
            seal,
        });
        while self.retained_bytes > self.cfg.retain_bytes && self.retained.len() > 1 {
            if let Some(old) = self.retained.pop_front() {
                self.retained_bytes -= (old.frame.len() + old.seal.len()) as u64;
                self.base = (old.version, old.root);
            }
        }
    }

    /// Entry and seal frames of the retained entries after position `skip`, then the
    /// unsealed entry, if any: what a resuming child needs before the live stream.
    fn frames_after(&self, skip: usize) -> Vec<Bytes> {
        let mut out = Vec::new();
        for r in self.retained.iter().skip(skip) {
            out.push(r.frame.clone());
            if !r.seal.is_empty() {
                out.push(r.seal.clone());
            }
        }
        out.extend(self.unsealed.as_ref().map(|u| u.frame.clone()));
        out
    }

    /// Core nodes: a checkpoint frame for the current version if entries were applied since
    /// the last one. Call on a timer (and it is called after every `checkpoint_every` entries).
    pub fn checkpoint(&mut self) -> Option<Event> {
        if self.since_checkpoint == 0 {
            return None;
        }
        self.since_checkpoint = 0;
        Some(Event::Broadcast(self.checkpoint_frame()))
    }

    fn checkpoint_frame(&self) -> Bytes {
        wire::encode(&proto::Downstream {
            kind: Some(Down::Checkpoint(proto::Checkpoint {
                version: self.file.version(),
                length: self.file.len(),
                root: Bytes::copy_from_slice(&self.file.root()),
            })),
        })
    }

    /// Parent side: the heartbeat frame to send a child on a link that was idle for a
    /// heartbeat period (per link, never broadcast): the commit version, this node's
    /// `root_path` (from the core down to itself, as the driver's overlay knows it) and the
    /// relays the child may fetch from.
    pub fn heartbeat(
        &self,
        now_us: u64,
        root_path: Vec<String>,
        fetch_sources: Vec<String>,
    ) -> Bytes {
        wire::encode(&proto::Downstream {
            kind: Some(Down::Heartbeat(proto::Heartbeat {
                commit_version: self.commit_known(),
                unix_us: now_us,
                root_path,
                fetch_sources,
            })),
        })
    }

    /// Parent side: what a child that sent `sub` needs before the live stream. The caller must
    /// register the child for broadcasts in the same critical section, so nothing is lost or
    /// repeated between the plan and the live stream. Only sealed state is served as a
    /// snapshot; an entry not sealed yet follows the plan, and its seal the live stream.
    pub fn plan_subscription(&self, sub: &proto::Subscribe) -> SubscribePlan {
        if !self.synced {
            return match self.follow_plan() {
                Some(p) if sub.have_version <= p.version => SubscribePlan::Follow(Box::new(p)),
                _ => SubscribePlan::Refuse("not synced yet".into()),
            };
        }
        let shown = self.file();
        if sub.have_version > shown.version() {
            return SubscribePlan::Refuse(format!(
                "behind the child: at version {}, child holds {}",
                shown.version(),
                sub.have_version
            ));
        }
        let have = (
            sub.have_version,
            <Hash>::try_from(sub.have_root.as_ref()).ok(),
        );
        let pending = || self.frames_after(self.retained.len());
        if have == (shown.version(), Some(shown.root())) {
            return SubscribePlan::Resume(pending());
        }
        if have == (self.base.0, Some(self.base.1)) {
            return SubscribePlan::Resume(self.frames_after(0));
        }
        if let Some(pos) = self
            .retained
            .iter()
            .position(|r| (r.version, Some(r.root)) == have)
        {
            return SubscribePlan::Resume(self.frames_after(pos + 1));
        }
        if self.trust.verifier().is_some() && self.anchor.is_none() {
            return SubscribePlan::Refuse("no core seal over this node's state yet".into());
        }
        SubscribePlan::Snapshot(Box::new(SnapshotPlan {
            file: shown.clone(),
            anchor: self.anchor.clone(),
            commit_time_us: self
                .anchor
                .as_ref()
                .map_or(self.last_commit_time_us, |(s, _)| s.commit_time_unix_us),
            then: pending(),
        }))
    }
}

mod child;
mod fifo;
mod sealing;

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
