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
//! - The retained window is contiguous: each entry's `prev_version` is the version of the
//!   one before it, and the first one's is `base.0`; its encoded size stays within
//!   `retain_bytes` (the newest entry is always kept).
//! - Every frame handed out in [`Event::Broadcast`] is one this node has applied or verified,
//!   in stream order; entry frames are forwarded verbatim (encoded once at the core).

use std::collections::VecDeque;

use bytes::Bytes;

use crate::consensus::{ApplyOutcome, DedupTable};
use crate::file::{ChunkedFile, FileBuilder, FileError, Hash, Precondition, Update};
use crate::proto::{self, downstream::Kind as Down};
use crate::wire;

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
}

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
        }
    }
}

/// What a parent sends a subscribing child before the live stream.
#[derive(Clone)]
pub enum SubscribePlan {
    /// These retained entry frames, then the live stream.
    Resume(Vec<Bytes>),
    /// The whole file at this version, then the live stream.
    Snapshot(ChunkedFile),
    /// This node cannot serve yet (it holds no verified copy itself).
    Refuse(String),
}

/// Where this node's parent is, as the parent described itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentInfo {
    pub name: String,
    pub depth: u32,
    pub root_path: Vec<String>,
    pub core_addrs: Vec<String>,
}

enum Upstream {
    Idle,
    AwaitOk,
    AwaitSnapshot,
    Snapshot {
        builder: FileBuilder,
        version: u64,
        commit_time_us: u64,
        manifest: Vec<Hash>,
        /// The parent's `SnapshotEnd` came while chunks fetched from other sources were
        /// still missing: [`Replica::finish_snapshot`] completes it.
        ended: bool,
    },
    Streaming,
}

impl Upstream {
    fn name(&self) -> &'static str {
        match self {
            Upstream::Idle => "idle",
            Upstream::AwaitOk => "awaiting subscribe_ok",
            Upstream::AwaitSnapshot => "awaiting snapshot",
            Upstream::Snapshot { .. } => "receiving snapshot",
            Upstream::Streaming => "streaming",
        }
    }
}

struct Retained {
    version: u64,
    root: Hash,
    frame: Bytes,
}

/// The node's file plus its stream position; see the module docs.
pub struct Replica {
    cfg: ReplicaConfig,
    name: String,
    file: ChunkedFile,
    synced: bool,
    retained: VecDeque<Retained>,
    retained_bytes: u64,
    base: (u64, Hash),
    upstream: Upstream,
    parent: Option<ParentInfo>,
    commit_known: u64,
    last_commit_time_us: u64,
    since_checkpoint: u32,
    dedup: DedupTable,
    salvage: Salvage,
}

/// Chunks of an interrupted transfer that were verified against its manifest, kept by
/// hash so that the next transfer (from any source) skips them.
#[derive(Default)]
struct Salvage {
    manifest: Vec<Hash>,
    chunks: std::collections::HashMap<Hash, Bytes>,
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
    }
}

fn to_hash(b: &[u8]) -> Option<Hash> {
    b.try_into().ok()
}

impl Replica {
    /// An empty replica. `synced` is true for core nodes, whose file is authoritative, and
    /// false for relays until their first snapshot or resume.
    pub fn new(cfg: ReplicaConfig, synced: bool) -> Result<Self, FileError> {
        let file = ChunkedFile::new(cfg.chunk_size, cfg.max_len)?;
        let base = (file.version(), file.root());
        Ok(Self {
            cfg,
            name: String::new(),
            file,
            synced,
            retained: VecDeque::new(),
            retained_bytes: 0,
            base,
            upstream: Upstream::Idle,
            parent: None,
            commit_known: 0,
            last_commit_time_us: 0,
            since_checkpoint: 0,
            dedup: DedupTable::default(),
            salvage: Salvage::default(),
        })
    }

    /// Names this node (used in heartbeats' root paths and cycle checks).
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// Names from the core down to this node (inclusive); just this node on a core node or
    /// while unattached.
    pub fn root_path(&self) -> Vec<String> {
        let mut path = self
            .parent
            .as_ref()
            .map(|p| p.root_path.clone())
            .unwrap_or_default();
        path.push(self.name.clone());
        path
    }

    /// The file at the current version.
    pub fn file(&self) -> &ChunkedFile {
        &self.file
    }

    /// Whether this node holds a verified copy it may serve to children.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    pub fn parent(&self) -> Option<&ParentInfo> {
        self.parent.as_ref()
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

    /// Relays at start-up: takes the copy found on disk. A `trusted` copy (its recorded
    /// version and root match its content) is served and resumed from; an untrusted one is
    /// only used to fetch less (its chunk hashes go in the next subscription).
    pub fn seed(&mut self, file: ChunkedFile, trusted: bool) {
        self.file = file;
        self.retained.clear();
        self.retained_bytes = 0;
        self.base = (self.file.version(), self.file.root());
        self.synced = trusted;
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
        let mut events = self.after_apply(frame, now_us);
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

    fn after_apply(&mut self, frame: Bytes, commit_time_us: u64) -> Vec<Event> {
        self.last_commit_time_us = commit_time_us;
        self.since_checkpoint += 1;
        self.retain(frame.clone());
        vec![
            Event::Broadcast(frame),
            Event::Applied {
                version: self.file.version(),
                commit_time_us,
            },
        ]
    }

    fn retain(&mut self, frame: Bytes) {
        self.retained_bytes += frame.len() as u64;
        self.retained.push_back(Retained {
            version: self.file.version(),
            root: self.file.root(),
            frame,
        });
        while self.retained_bytes > self.cfg.retain_bytes && self.retained.len() > 1 {
            if let Some(old) = self.retained.pop_front() {
                self.retained_bytes -= old.frame.len() as u64;
                self.base = (old.version, old.root);
            }
        }
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
    /// heartbeat period (per link, never broadcast): commit version and this node's path.
    pub fn heartbeat(&self, now_us: u64) -> Bytes {
        self.heartbeat_suggesting(now_us, Vec::new())
    }

    /// [`Replica::heartbeat`] that also passes the child the relays it may fetch from.
    pub fn heartbeat_suggesting(&self, now_us: u64, fetch_sources: Vec<String>) -> Bytes {
        wire::encode(&proto::Downstream {
            kind: Some(Down::Heartbeat(proto::Heartbeat {
                commit_version: self.commit_known(),
                unix_us: now_us,
                root_path: self.root_path(),
                fetch_sources,
            })),
        })
    }

    /// Child side: the `Subscribe` to send on a fresh stream to the parent. With `full`, it
    /// asks for a full transfer (after divergence). Then feed every frame received on that
    /// stream to [`Replica::handle_downstream`].
    pub fn subscribe(&mut self, name: &str, listen_addr: &str, full: bool) -> proto::Subscribe {
        self.name = name.to_string();
        self.expect_subscribe_ok();
        self.subscription(name, listen_addr, full)
    }

    /// Child side: the `Subscribe` for this node's current position, without changing any
    /// state (for a move, before deciding to switch).
    pub fn subscription(&self, name: &str, listen_addr: &str, full: bool) -> proto::Subscribe {
        let (have_version, have_root) = if full || !self.synced {
            (0, Bytes::new())
        } else {
            (
                self.file.version(),
                Bytes::copy_from_slice(&self.file.root()),
            )
        };
        proto::Subscribe {
            name: name.to_string(),
            have_version,
            have_root,
            listen_addr: listen_addr.to_string(),
            have_chunks: self.have_chunks(),
        }
    }

    /// This node's chunk hash at each index: its file's, or, past an interrupted transfer,
    /// the manifest's where the chunk was received and verified.
    fn have_chunks(&self) -> Vec<Bytes> {
        let own = self.file.chunk_count() as usize;
        let n = own.max(self.salvage.manifest.len());
        (0..n)
            .map(|i| {
                let salvaged = self
                    .salvage
                    .manifest
                    .get(i)
                    .filter(|h| self.salvage.chunks.contains_key(*h));
                match salvaged.copied().or_else(|| self.file.chunk_hash(i as u64)) {
                    Some(h) => Bytes::copy_from_slice(&h),
                    None => Bytes::new(),
                }
            })
            .collect()
    }

    /// A full or diff transfer in progress: (bytes held so far, including chunks reused from
    /// the local copy, and the file's length).
    pub fn backfill_progress(&self) -> Option<(u64, u64)> {
        match &self.upstream {
            Upstream::Snapshot { builder, .. } => Some((builder.bytes_present(), builder.len())),
            _ => None,
        }
    }

    /// Child side, during a transfer: its version, the chunks still missing (ascending) and
    /// the manifest, for fetching chunks from other sources.
    pub fn snapshot_wanted(&self) -> Option<(u64, Vec<u64>, Vec<Hash>)> {
        match &self.upstream {
            Upstream::Snapshot {
                builder,
                version,
                manifest,
                ..
            } if !manifest.is_empty() => {
                Some((*version, builder.missing_indices(), manifest.clone()))
            }
            _ => None,
        }
    }

    /// Child side: a chunk of the transfer at `version` fetched from another source, whose
    /// BLAKE3 the caller computed as `hash`. True when it was new; false when the transfer
    /// is no longer running or already held it. A hash that is not the manifest's is
    /// [`ReplicaError::BadChunk`] (the source is faulty; the transfer goes on).
    pub fn put_fetched_chunk(
        &mut self,
        version: u64,
        index: u64,
        data: Bytes,
        hash: Hash,
    ) -> Result<bool, ReplicaError> {
        let Upstream::Snapshot {
            builder,
            version: v,
            manifest,
            ..
        } = &mut self.upstream
        else {
            return Ok(false);
        };
        if *v != version || builder.has_chunk(index) {
            return Ok(false);
        }
        if manifest.get(index as usize) != Some(&hash) {
            return Err(ReplicaError::BadChunk { index });
        }
        self.salvage.chunks.insert(hash, data.clone());
        builder.put_hashed_chunk(index, data, hash)?;
        Ok(true)
    }

    /// Child side: the parent's `SnapshotEnd` came but chunks fetched elsewhere are missing;
    /// the driver must not feed further frames until [`Replica::finish_snapshot`].
    pub fn snapshot_waiting(&self) -> bool {
        matches!(&self.upstream, Upstream::Snapshot { builder, ended: true, .. } if builder.missing() > 0)
    }

    /// Child side: installs the transfer once its `SnapshotEnd` came and every chunk is in.
    pub fn finish_snapshot(&mut self) -> Result<Vec<Event>, ReplicaError> {
        let state = std::mem::replace(&mut self.upstream, Upstream::Idle);
        let Upstream::Snapshot {
            builder,
            commit_time_us,
            ended: true,
            ..
        } = state
        else {
            self.upstream = state;
            return Err(ReplicaError::Unexpected {
                frame: "finish",
                state: "not at the end of a transfer",
            });
        };
        let file = builder.finish()?;
        let version = file.version();
        let mut events = self.install(file);
        self.last_commit_time_us = commit_time_us;
        self.since_checkpoint = 0;
        events.push(Event::Applied {
            version,
            commit_time_us,
        });
        self.upstream = Upstream::Streaming;
        Ok(events)
    }

    /// A chunk with BLAKE3 `hash`, to serve another node's fetch: the file's chunk at
    /// `index` if it has that hash, or one verified during a transfer (at any index: the
    /// asker checks it against its manifest).
    pub fn find_chunk(&self, index: u64, hash: &Hash) -> Option<Bytes> {
        if self.file.chunk_hash(index).as_ref() == Some(hash) {
            return self.file.chunk(index);
        }
        self.salvage.chunks.get(hash).cloned()
    }

    /// Bytes of verified chunks kept from interrupted transfers.
    pub fn salvaged_bytes(&self) -> u64 {
        self.salvage.chunks.values().map(|c| c.len() as u64).sum()
    }

    /// Child side: the next frame fed in will be a new parent's `SubscribeOk` (after a
    /// [`Replica::subscription`] sent on a new stream).
    pub fn expect_subscribe_ok(&mut self) {
        self.upstream = Upstream::AwaitOk;
    }

    /// Child side: the upstream stream ended; frames from it must no longer be fed in.
    pub fn upstream_lost(&mut self) {
        self.upstream = Upstream::Idle;
    }

    /// Child side: one frame from the parent, `frame` being its encoded bytes as received.
    /// On error, drop the stream, call [`Replica::upstream_lost`] and resubscribe (with
    /// `full` when [`ReplicaError::needs_full_resync`]).
    pub fn handle_downstream(
        &mut self,
        frame: Bytes,
        msg: proto::Downstream,
    ) -> Result<Vec<Event>, ReplicaError> {
        self.handle_downstream_hashed(frame, msg, None)
    }

    /// [`Replica::handle_downstream`] for a driver that hashed a `SnapshotChunk`'s data
    /// already (`chunk_hash` must be [`crate::file::leaf_hash`] of exactly that data), so the
    /// hashing can run beside the replica rather than under its lock.
    pub fn handle_downstream_hashed(
        &mut self,
        frame: Bytes,
        msg: proto::Downstream,
        chunk_hash: Option<Hash>,
    ) -> Result<Vec<Event>, ReplicaError> {
        let r = self.handle_frame(frame, msg, chunk_hash);
        if r.as_ref().is_err_and(ReplicaError::needs_full_resync) {
            self.synced = false;
        }
        r
    }

    fn handle_frame(
        &mut self,
        frame: Bytes,
        msg: proto::Downstream,
        chunk_hash: Option<Hash>,
    ) -> Result<Vec<Event>, ReplicaError> {
        let state = std::mem::replace(&mut self.upstream, Upstream::Idle);
        let unexpected = |state: &Upstream, kind: &Option<Down>| ReplicaError::Unexpected {
            frame: frame_name(kind),
            state: state.name(),
        };
        match (state, msg.kind) {
            (_, Some(Down::Refused(r))) => Err(ReplicaError::Refused(r.reason)),
            (Upstream::AwaitOk, Some(Down::SubscribeOk(ok))) => {
                self.parent = Some(ParentInfo {
                    name: ok.parent_name,
                    depth: ok.parent_depth,
                    root_path: ok.root_path,
                    core_addrs: ok.core_addrs,
                });
                self.upstream = if ok.resume {
                    Upstream::Streaming
                } else {
                    Upstream::AwaitSnapshot
                };
                Ok(vec![])
            }
            (Upstream::AwaitSnapshot, Some(Down::SnapshotBegin(b))) => {
                let root = to_hash(&b.root).ok_or(FileError::BadHash { len: b.root.len() })?;
                let mut builder =
                    FileBuilder::new(b.chunk_size, self.cfg.max_len, b.length, b.version, root)?;
                let mut manifest = Vec::with_capacity(b.chunk_hashes.len());
                for h in &b.chunk_hashes {
                    manifest.push(to_hash(h).ok_or(FileError::BadHash { len: h.len() })?);
                }
                if !manifest.is_empty() {
                    if manifest.len() as u64 != builder.chunk_count()
                        || crate::file::root_of(b.chunk_size, b.length, &manifest) != root
                    {
                        return Err(ReplicaError::BadManifest {
                            root: hex::encode(root),
                        });
                    }
                    for (i, h) in manifest.iter().enumerate() {
                        let i = i as u64;
                        let expected = crate::file::chunk_len_for(b.length, b.chunk_size, i);
                        if let Some(data) = self.salvage.chunks.get(h) {
                            if data.len() as u64 == expected {
                                builder.put_hashed_chunk(i, data.clone(), *h)?;
                                continue;
                            }
                        }
                        if self.file.chunk_size() == b.chunk_size
                            && self.file.chunk_hash(i) == Some(*h)
                        {
                            if let Some(data) = self.file.chunk(i) {
                                if data.len() as u64 == expected {
                                    builder.put_hashed_chunk(i, data, *h)?;
                                }
                            }
                        }
                    }
                }
                self.salvage.manifest = manifest.clone();
                self.upstream = Upstream::Snapshot {
                    builder,
                    version: b.version,
                    commit_time_us: b.commit_time_unix_us,
                    manifest,
                    ended: false,
                };
                Ok(vec![])
            }
            (
                Upstream::Snapshot {
                    mut builder,
                    version,
                    commit_time_us,
                    manifest,
                    ended: false,
                },
                Some(Down::SnapshotChunk(c)),
            ) => {
                match manifest.get(c.index as usize) {
                    // Fetched from another source already (the push was past the limit).
                    Some(_) if builder.has_chunk(c.index) => {}
                    Some(h) => {
                        let got = chunk_hash.unwrap_or_else(|| crate::file::leaf_hash(&c.data));
                        if got != *h {
                            return Err(ReplicaError::BadChunk { index: c.index });
                        }
                        self.salvage.chunks.insert(*h, c.data.clone());
                        builder.put_hashed_chunk(c.index, c.data, *h)?;
                    }
                    None => builder.put_chunk(c.index, c.data)?,
                }
                self.upstream = Upstream::Snapshot {
                    builder,
                    version,
                    commit_time_us,
                    manifest,
                    ended: false,
                };
                Ok(vec![])
            }
            (
                Upstream::Snapshot {
                    builder,
                    version,
                    commit_time_us,
                    manifest,
                    ended: false,
                },
                Some(Down::SnapshotEnd(_)),
            ) => {
                self.upstream = Upstream::Snapshot {
                    builder,
                    version,
                    commit_time_us,
                    manifest,
                    ended: true,
                };
                if self.snapshot_waiting() {
                    return Ok(vec![]);
                }
                self.finish_snapshot()
            }
            (Upstream::Streaming, Some(Down::Entry(e))) => {
                let have = self.file.version();
                if e.prev_version != have || e.version <= have {
                    return Err(ReplicaError::Gap {
                        have,
                        prev: e.prev_version,
                    });
                }
                let update = Update::try_from(e.update.unwrap_or_default())?;
                self.file.apply(e.version, &update)?;
                self.synced = true;
                self.commit_known = self.commit_known.max(e.version);
                let events = self.after_apply(frame, e.commit_time_unix_us);
                self.upstream = Upstream::Streaming;
                Ok(events)
            }
            (Upstream::Streaming, Some(Down::Checkpoint(c))) => {
                let have = self.file.version();
                if c.version != have {
                    return Err(ReplicaError::CheckpointOutOfStep {
                        checkpoint: c.version,
                        have,
                    });
                }
                let local = self.file.root();
                if c.root.as_ref() != local.as_slice() || c.length != self.file.len() {
                    return Err(ReplicaError::Diverged {
                        version: c.version,
                        expected: hex::encode(&c.root),
                        got: hex::encode(local),
                    });
                }
                self.since_checkpoint = 0;
                self.upstream = Upstream::Streaming;
                Ok(vec![
                    Event::Broadcast(frame),
                    Event::CheckpointVerified { version: c.version },
                ])
            }
            (state, Some(Down::Heartbeat(h)))
                if !matches!(state, Upstream::Idle | Upstream::AwaitOk) =>
            {
                if !self.name.is_empty() && h.root_path.contains(&self.name) {
                    return Err(ReplicaError::Cycle(h.root_path));
                }
                self.commit_known = self.commit_known.max(h.commit_version);
                if let (Some(p), false) = (self.parent.as_mut(), h.root_path.is_empty()) {
                    p.depth = (h.root_path.len() - 1) as u32;
                    p.root_path = h.root_path;
                }
                self.upstream = state;
                Ok(vec![])
            }
            (state, kind) => Err(unexpected(&state, &kind)),
        }
    }

    /// Parent side: what a child that sent `sub` needs before the live stream. The caller must
    /// register the child for broadcasts in the same critical section, so nothing is lost or
    /// repeated between the plan and the live stream.
    pub fn plan_subscription(&self, sub: &proto::Subscribe) -> SubscribePlan {
        if !self.synced {
            return SubscribePlan::Refuse("not synced yet".into());
        }
        if sub.have_version > self.file.version() {
            return SubscribePlan::Refuse(format!(
                "behind the child: at version {}, child holds {}",
                self.file.version(),
                sub.have_version
            ));
        }
        let have = (sub.have_version, to_hash(&sub.have_root));
        if have == (self.file.version(), Some(self.file.root())) {
            return SubscribePlan::Resume(Vec::new());
        }
        if have == (self.base.0, Some(self.base.1)) {
            return SubscribePlan::Resume(self.retained.iter().map(|r| r.frame.clone()).collect());
        }
        if let Some(pos) = self
            .retained
            .iter()
            .position(|r| (r.version, Some(r.root)) == have)
        {
            return SubscribePlan::Resume(
                self.retained
                    .iter()
                    .skip(pos + 1)
                    .map(|r| r.frame.clone())
                    .collect(),
            );
        }
        SubscribePlan::Snapshot(self.file.clone())
    }
}

/// The frames of a full transfer of `file`: `SnapshotBegin` (with the manifest), one
/// `SnapshotChunk` per chunk the child lacks (`have` holds the child's chunk hashes; a chunk
/// whose hash it already holds at the same index is skipped), `SnapshotEnd`. Produced lazily
/// so a 50 MB snapshot is never encoded all at once.
pub fn snapshot_frames<'a>(
    file: &'a ChunkedFile,
    commit_time_us: u64,
    have: &'a [Bytes],
) -> impl Iterator<Item = Bytes> + 'a {
    snapshot_frames_below(file, commit_time_us, have, || u64::MAX).map(|(_, f)| f.concat())
}

/// [`snapshot_frames`] in parts, each with its chunk index (`None` for the begin and the
/// end), for a child that fetches part of the transfer elsewhere: a chunk is sent only if
/// its index is below `limit()`, asked just before the chunk is framed (the child lowers it
/// with `SnapshotLimit` while the transfer runs). A chunk's bytes are shared with the file,
/// not copied into its frame.
pub fn snapshot_frames_below<'a>(
    file: &'a ChunkedFile,
    commit_time_us: u64,
    have: &'a [Bytes],
    limit: impl Fn() -> u64 + 'a,
) -> impl Iterator<Item = (Option<u64>, wire::Parts)> + 'a {
    let hashes = file.chunk_hashes();
    let begin = wire::encode(&proto::Downstream {
        kind: Some(Down::SnapshotBegin(proto::SnapshotBegin {
            version: file.version(),
            length: file.len(),
            root: Bytes::copy_from_slice(&file.root()),
            chunk_size: file.chunk_size(),
            commit_time_unix_us: commit_time_us,
            chunk_hashes: hashes.iter().map(|h| Bytes::copy_from_slice(h)).collect(),
        })),
    });
    let chunks = (0..file.chunk_count())
        .filter(move |i| {
            have.get(*i as usize).map(|h| h.as_ref()) != Some(&hashes[*i as usize][..])
                && *i < limit()
        })
        .map(move |i| {
            (
                Some(i),
                wire::encode_chunk(i, file.chunk(i).unwrap_or_default()),
            )
        });
    let end = wire::encode(&proto::Downstream {
        kind: Some(Down::SnapshotEnd(proto::SnapshotEnd {})),
    });
    std::iter::once((None, begin.into()))
        .chain(chunks)
        .chain(std::iter::once((None, end.into())))
}

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
