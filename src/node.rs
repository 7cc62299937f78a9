//! The tokio driver of a node: QUIC accept loop, child streams, upstream, proposals, file.
//!
//! Invariants:
//! - The replica and the child table change under one lock, so a child registered by a
//!   subscription plan receives exactly the broadcasts after that plan: no gap, no repeat.
//! - Broadcasting never waits on a child: frames go to per-child unbounded channels with a
//!   byte budget; a child over budget is cut off (its stream reset) and resubscribes.
//! - Bad input from a peer closes that peer's connection with a logged reason; the node
//!   keeps serving everyone else.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use quinn::VarInt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::{NodeConfig, NodeKind};
use crate::consensus::{ApplyOutcome, ConsensusError, Core, FileStateMachine, Member};
use crate::file::{ChunkedFile, FileError, Precondition, Update};
use crate::metrics::NodeMetrics;
use crate::overlay::{Input as OverlayInput, Overlay};
use crate::proto::{self, downstream::Kind as Down, propose_reply, request};
use crate::replica::{snapshot_frames_below, Event, Replica, SubscribePlan};
use crate::tls::SERVER_NAME;
use crate::wire::{self, WireError};

/// How long a relay that holds no copy yet keeps a subscribing child waiting for its own:
/// a second less than the child's `attach_timeout_ms`, so that the child hears a refusal and
/// goes elsewhere rather than timing out (the bootstrap benchmark lost 5 s per relay so).
fn sync_wait(cfg: &NodeConfig) -> Duration {
    Duration::from_millis(cfg.overlay.attach_timeout_ms.saturating_sub(1000).max(500))
}

/// How long a core node waits for a leader before failing a proposal.
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// A proposal is forwarded between core nodes at most this often (stale leader hints).
const MAX_HOPS: u32 = 2;
/// How long adding a core member waits for it to catch up.
const ADD_MEMBER_WAIT: Duration = Duration::from_secs(120);

/// Proposals per group-commit batch.
const MAX_BATCH: usize = 512;
/// Payload bytes per batch; a larger proposal goes alone.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Batches in flight at once (openraft pipelines them).
const MAX_INFLIGHT_BATCHES: usize = 4;

/// Longest path a tree query descends.
pub const MAX_TREE_DEPTH: u32 = 64;
/// How long one level of a tree query waits for its children.
const TREE_WAIT: Duration = Duration::from_secs(2);

/// How long connecting to a peer may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// QUIC application close codes.
pub(crate) mod code {
    pub const SHUTDOWN: u32 = 0;
    pub const BAD_FRAME: u32 = 2;
    pub const CUT_OFF: u32 = 3;
    pub const RESYNC: u32 = 4;
    pub const MOVED: u32 = 5;
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("file: {0}")]
    File(#[from] FileError),
    #[error("consensus: {0}")]
    Consensus(#[from] ConsensusError),
    #[error("wire: {0}")]
    Wire(#[from] WireError),
    #[error("connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("no core node is known (no parent yet and no --join address)")]
    NoCore,
    #[error("update of {size} bytes exceeds max_update_bytes {max}")]
    UpdateTooLarge { size: u64, max: u64 },
    #[error("the core rejected the proposal: {0}")]
    Rejected(String),
    #[error("replace did not settle after {0} attempts under concurrent writes")]
    Contended(u32),
    #[error("io on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("shutting down")]
    Shutdown,
    #[error("this node is not a core node")]
    NotCore,
    #[error("the core may or may not have committed the write (connection lost after sending: {0}); check the version and retry if needed")]
    OutcomeUnknown(String),
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub(crate) struct ChildLink {
    pub(crate) name: String,
    pub(crate) addr: String,
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
}

pub(crate) struct State {
    pub(crate) replica: Replica,
    pub(crate) children: BTreeMap<u64, ChildLink>,
    next_child: u64,
}

/// Counters of this node's own stream, for checking that nothing was skipped or doubled.
#[derive(Default, Debug)]
pub(crate) struct StreamStats {
    pub(crate) entries_applied: AtomicU64,
    pub(crate) snapshots_installed: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) resumes: AtomicU64,
    pub(crate) backfill_received: AtomicU64,
    pub(crate) backfill_from_peers: AtomicU64,
    pub(crate) bad_chunks: AtomicU64,
}

/// The stream counters as `/v1/status` shows them. Every entry a node applies follows the
/// previous one (`prev_version` check), so with `gaps == 0` and one snapshot install, no
/// entry was skipped or applied twice.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct StatsView {
    pub entries_applied: u64,
    pub snapshots_installed: u64,
    pub gaps: u64,
    pub resumes: u64,
    /// Chunk bytes received in full or diff transfers, from every source.
    pub backfill_received_bytes: u64,
    /// The part of them fetched from peers other than the parent.
    pub backfill_from_peers_bytes: u64,
    /// Chunks refused because they did not match the manifest (their sender is banned as
    /// a parent for a while and the chunk is fetched elsewhere).
    pub bad_chunks: u64,
}

/// What `/v1/status` reports.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Status {
    pub name: String,
    pub role: String,
    pub version: u64,
    pub root: String,
    pub length: u64,
    pub parent: String,
    pub parent_addr: String,
    pub children: Vec<String>,
    pub child_addrs: Vec<String>,
    pub depth: u32,
    pub root_path: Vec<String>,
    pub synced: bool,
    pub commit_version: u64,
    pub lag_entries: u64,
    pub lag_seconds: f64,
    pub file_version: Option<u64>,
    pub core_addrs: Vec<String>,
    pub stats: StatsView,
    /// A full or diff transfer in progress (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backfill: Option<BackfillView>,
    /// Full or diff transfers this node is serving to children now.
    pub backfills_serving: u64,
    /// Core nodes only: Raft state and the members.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub core: Option<CoreStatus>,
}

/// Progress of the transfer this node is receiving.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackfillView {
    /// Bytes held of the version being fetched: chunks received, and chunks reused from
    /// the local copy or an interrupted transfer.
    pub bytes_done: u64,
    /// The length of that version.
    pub bytes_total: u64,
    /// Where the chunks come from: the parent, then the peers it fetches from.
    pub sources: Vec<String>,
}

/// A core node's view of the consensus group.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CoreStatus {
    #[serde(flatten)]
    pub raft: crate::consensus::RaftStatus,
    pub members: Vec<MemberStatus>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MemberStatus {
    pub name: String,
    pub addr: String,
    pub voter: bool,
}

/// Shared state of a running node; cheap to clone through [`Node`].
pub struct Shared {
    pub cfg: NodeConfig,
    pub(crate) state: Mutex<State>,
    applied: watch::Sender<(u64, u64)>,
    materialized: watch::Sender<Option<u64>>,
    core: OnceLock<Arc<Core>>,
    endpoint: quinn::Endpoint,
    core_conn: tokio::sync::Mutex<Option<quinn::Connection>>,
    pub(crate) parent_addr: Mutex<String>,
    /// Peers the transfer being received fetches chunks from, besides the parent.
    pub(crate) fetch_peers: Mutex<Vec<String>>,
    /// Fetch sources the current parent suggested (`SubscribeOk.fetch_sources`).
    pub(crate) suggested_sources: Mutex<Vec<String>>,
    /// The transfer being received: when it started and the last tenth logged.
    pub(crate) backfill_clock: Mutex<Option<(std::time::Instant, u64)>>,
    /// Transfers being served now.
    pub(crate) backfills_serving: AtomicU64,
    /// One permit per transfer served at once (`stream.max_backfills`).
    backfill_permits: Arc<tokio::sync::Semaphore>,
    /// When the shared backfill budget (`stream.backfill_bytes_per_sec`) is next free.
    backfill_pace: Mutex<tokio::time::Instant>,
    pub metrics: NodeMetrics,
    relayed: AtomicU64,
    pub(crate) stats: StreamStats,
    core_pick: std::sync::atomic::AtomicUsize,
    batcher: OnceLock<mpsc::UnboundedSender<Pending>>,
    peer_conns: tokio::sync::Mutex<BTreeMap<String, quinn::Connection>>,
    pub(crate) overlay: Mutex<Overlay>,
    pub(crate) overlay_rng: Mutex<rand_chacha::ChaCha8Rng>,
    pub(crate) overlay_tx: mpsc::UnboundedSender<OverlayInput>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

/// A handle to a running node.
#[derive(Clone)]
pub struct Node(pub Arc<Shared>);

struct CoreSm(Arc<Shared>);

impl FileStateMachine for CoreSm {
    fn apply(&self, log_index: u64, proposal: &proto::Proposal) -> ApplyOutcome {
        let mut st = self.0.state.lock().unwrap();
        let (outcome, events) = st.replica.apply_committed(log_index, proposal, now_us());
        self.0.dispatch(&mut st, events);
        outcome
    }

    fn current(&self) -> ChunkedFile {
        self.0.state.lock().unwrap().replica.file().clone()
    }

    fn install(&self, file: ChunkedFile) {
        let mut st = self.0.state.lock().unwrap();
        let version = file.version();
        let mut events = st.replica.install(file);
        events.push(Event::Applied {
            version,
            commit_time_us: now_us(),
        });
        self.0.dispatch(&mut st, events);
    }
}

impl Shared {
    /// Waits until `len` more bytes of transfers fit the shared budget
    /// (`stream.backfill_bytes_per_sec`; no wait when it is 0).
    async fn pace_backfill(&self, len: usize) {
        let rate = self.cfg.stream.backfill_bytes_per_sec;
        if rate == 0 {
            return;
        }
        let at = {
            let mut next = self.backfill_pace.lock().unwrap();
            let at = (*next).max(tokio::time::Instant::now());
            *next = at + Duration::from_secs_f64(len as f64 / rate as f64);
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// Relays a child of this node may fetch a transfer's chunks from: this node's other
    /// children, then the sources its own parent suggested, at most
    /// [`MAX_SUGGESTED_SOURCES`], never `child` itself.
    fn suggest_sources(&self, st: &State, child: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let suggested = self.suggested_sources.lock().unwrap();
        for a in st
            .children
            .values()
            .map(|c| &c.addr)
            .chain(suggested.iter())
        {
            if a != child && !out.contains(a) && out.len() < MAX_SUGGESTED_SOURCES {
                out.push(a.clone());
            }
        }
        out
    }

    fn count_relayed(&self, n: usize) {
        self.relayed.fetch_add(n as u64, Ordering::Relaxed);
        self.metrics.relayed_bytes.increment(n as u64);
    }

    pub(crate) fn dispatch(&self, st: &mut State, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::Broadcast(frame) => self.broadcast(st, &frame),
                Event::Applied {
                    version,
                    commit_time_us,
                } => {
                    self.applied.send_replace((version, commit_time_us));
                    self.metrics.applied_version.set(version as f64);
                    let commit = st.replica.commit_known();
                    self.metrics.commit_version.set(commit as f64);
                    self.metrics
                        .lag_entries
                        .set(commit.saturating_sub(version) as f64);
                    if commit_time_us > 0 {
                        let delay = now_us().saturating_sub(commit_time_us) as f64 / 1e6;
                        self.metrics.apply_delay.record(delay);
                        self.metrics
                            .lag_seconds
                            .set(if commit > version { delay } else { 0.0 });
                    }
                }
                Event::Installed { version } => {
                    self.stats
                        .snapshots_installed
                        .fetch_add(1, Ordering::Relaxed);
                    info!(node = %self.cfg.name, version, root = %st.replica.file().root_hex(), "installed snapshot");
                    let ids: Vec<u64> = st.children.keys().copied().collect();
                    for id in ids {
                        self.cut_child(st, id, "parent installed a snapshot; resubscribe");
                    }
                }
                Event::CheckpointVerified { .. } => self.metrics.checkpoint_ok.increment(1),
            }
        }
    }

    fn broadcast(&self, st: &mut State, frame: &Bytes) {
        let len = frame.len() as u64;
        let limit = self.cfg.stream.child_queue_bytes;
        let mut cut = Vec::new();
        for (id, c) in &st.children {
            let queued = c.queued.load(Ordering::Acquire);
            if queued + len > limit || c.tx.send(frame.clone()).is_err() {
                cut.push(*id);
            } else {
                c.queued.fetch_add(len, Ordering::AcqRel);
            }
        }
        for id in cut {
            self.cut_child(st, id, "send queue over limit");
        }
    }

    /// Drops a child's link: its writer resets the stream and the child resubscribes.
    fn cut_child(&self, st: &mut State, id: u64, reason: &str) {
        if let Some(c) = st.children.remove(&id) {
            c.cut.store(true, Ordering::Release);
            warn!(node = %self.cfg.name, child = %c.name, "cutting off child: {reason}");
            self.metrics.child_cutoffs.increment(1);
        }
        self.metrics.children.set(st.children.len() as f64);
    }

    /// For a child that found this node full: one of its children, picked at random.
    fn referral(&self, st: &State) -> Option<proto::PeerInfo> {
        let mut rng = self.overlay_rng.lock().unwrap();
        let path = self.root_path(st);
        let depth = self.depth(st) + 1;
        let kids: Vec<crate::overlay::Peer> = st
            .children
            .values()
            .map(|c| {
                let mut root_path = path.clone();
                root_path.push(c.name.clone());
                crate::overlay::Peer::new(crate::overlay::PeerInfo {
                    name: c.name.clone(),
                    addr: c.addr.clone(),
                    depth: Some(depth),
                    free_slots: 1,
                    root_path,
                    height: 0,
                    room: 0,
                    zone: None,
                })
            })
            .collect();
        Overlay::pick_referral(&kids, &mut *rng).map(|p| crate::upstream::peer_to_proto(&p))
    }

    pub(crate) fn depth(&self, st: &State) -> u32 {
        match st.replica.parent() {
            _ if self.cfg.is_core() => 0,
            Some(p) => p.depth + 1,
            None => 0,
        }
    }

    fn root_path(&self, st: &State) -> Vec<String> {
        if self.cfg.is_core() {
            vec![self.cfg.name.clone()]
        } else {
            st.replica.root_path()
        }
    }

    fn core_addrs(&self, st: &State) -> Vec<String> {
        match (&self.cfg.kind, st.replica.parent()) {
            (NodeKind::Core { .. }, _) => match self.core.get() {
                Some(core) => core.members().into_iter().map(|(m, _)| m.addr).collect(),
                None => vec![self.cfg.advertise.to_string()],
            },
            (NodeKind::Relay { .. }, Some(p)) => p.core_addrs.clone(),
            (NodeKind::Relay { join }, None) => join.clone(),
        }
    }
}

impl Node {
    /// Starts every task of a node on `endpoint` (already bound, with the node's TLS identity)
    /// and serves the HTTP API on `api`. Tasks stop when `shutdown` is cancelled.
    pub async fn start(
        cfg: NodeConfig,
        endpoint: quinn::Endpoint,
        api: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Node, NodeError> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.data).map_err(|source| NodeError::Io {
            path: cfg.data.clone(),
            source,
        })?;
        let mut replica = Replica::new(cfg.stream.replica(), cfg.is_core())?.with_name(&cfg.name);
        if let (NodeKind::Relay { .. }, Some(path)) = (&cfg.kind, &cfg.file) {
            if let Some((file, trusted)) = load_local_copy(&cfg, path) {
                info!(node = %cfg.name, version = file.version(), trusted, root = %file.root_hex(), "starting from the local copy");
                replica.seed(file, trusted);
            }
        }
        let bootstrap = match &cfg.kind {
            NodeKind::Relay { join } => join.clone(),
            NodeKind::Core { .. } => Vec::new(),
        };
        let mut overlay_cfg = cfg.overlay.clone();
        overlay_cfg.fanout = cfg.stream.fanout as u32;
        let overlay = Overlay::new(
            overlay_cfg,
            cfg.name.clone(),
            cfg.advertise.to_string(),
            cfg.is_core(),
            bootstrap,
        );
        let (overlay_tx, overlay_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            batcher: OnceLock::new(),
            peer_conns: tokio::sync::Mutex::new(BTreeMap::new()),
            overlay: Mutex::new(overlay),
            overlay_rng: Mutex::new(crate::upstream::overlay_rng(&cfg.name)),
            overlay_tx,
            metrics: NodeMetrics::new(&cfg.name),
            state: Mutex::new(State {
                replica,
                children: BTreeMap::new(),
                next_child: 0,
            }),
            applied: watch::channel((0, 0)).0,
            materialized: watch::channel(None).0,
            core: OnceLock::new(),
            endpoint,
            core_conn: tokio::sync::Mutex::new(None),
            parent_addr: Mutex::new(String::new()),
            fetch_peers: Mutex::new(Vec::new()),
            suggested_sources: Mutex::new(Vec::new()),
            backfill_clock: Mutex::new(None),
            backfills_serving: AtomicU64::new(0),
            backfill_permits: Arc::new(tokio::sync::Semaphore::new(
                cfg.stream.max_backfills as usize,
            )),
            backfill_pace: Mutex::new(tokio::time::Instant::now()),
            relayed: AtomicU64::new(0),
            stats: StreamStats::default(),
            core_pick: std::sync::atomic::AtomicUsize::new(0),
            shutdown,
            tasks: TaskTracker::new(),
            cfg,
        });
        let node = Node(shared.clone());
        if let NodeKind::Core { raft, init, peers } = &shared.cfg.kind {
            let me = Member {
                name: shared.cfg.name.clone(),
                addr: shared.cfg.advertise.to_string(),
            };
            let core = Core::open(
                me.clone(),
                &shared.cfg.data,
                Arc::new(CoreSm(shared.clone())),
                raft,
                shared.endpoint.clone(),
                shared.cfg.stream.max_frame,
            )
            .await?;
            let core = Arc::new(core);
            let _ = shared.core.set(core.clone());
            if *init {
                let members: BTreeMap<_, _> = if peers.is_empty() {
                    BTreeMap::from([(me.id(), me)])
                } else {
                    peers.iter().map(|m| (m.id(), m.clone())).collect()
                };
                core.initialize(members).await?;
            }
            let (btx, brx) = mpsc::unbounded_channel();
            let _ = shared.batcher.set(btx);
            shared
                .tasks
                .spawn(batcher(shared.clone(), core.clone(), brx));
            shared.tasks.spawn(core_ticker(shared.clone()));
        }
        if let NodeKind::Relay { .. } = &shared.cfg.kind {
            let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
            shared.tasks.spawn(crate::upstream::overlay_loop(
                shared.clone(),
                overlay_rx,
                cmd_tx,
            ));
            shared
                .tasks
                .spawn(crate::upstream::upstream_loop(shared.clone(), cmd_rx));
        }
        if let Some(path) = shared.cfg.file.clone() {
            shared.tasks.spawn(materialize_loop(shared.clone(), path));
        }
        shared.tasks.spawn(accept_loop(shared.clone()));
        let router = crate::api::router(node.clone());
        let sd = shared.shutdown.clone();
        shared.tasks.spawn(async move {
            if let Err(e) = axum::serve(api, router)
                .with_graceful_shutdown(async move { sd.cancelled().await })
                .await
            {
                error!("http api: {e}");
            }
        });
        Ok(node)
    }

    /// Waits for shutdown, then for every task to finish.
    pub async fn stopped(&self) {
        self.0.shutdown.cancelled().await;
        self.0.tasks.close();
        if let Some(core) = self.0.core.get() {
            if let Err(e) = core.shutdown().await {
                warn!("raft shutdown: {e}");
            }
        }
        self.0
            .endpoint
            .close(VarInt::from_u32(code::SHUTDOWN), b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(5), self.0.tasks.wait()).await;
    }

    /// Bytes this node has sent to its children (entries, checkpoints, transfers).
    pub fn relayed_bytes(&self) -> u64 {
        self.0.relayed.load(Ordering::Relaxed)
    }

    pub fn name(&self) -> &str {
        &self.0.cfg.name
    }

    /// The file at the current applied version (cheap copy-on-write clone).
    pub fn file(&self) -> ChunkedFile {
        self.0.state.lock().unwrap().replica.file().clone()
    }

    /// Watch of `(applied version, core commit time in µs)`.
    pub fn applied(&self) -> watch::Receiver<(u64, u64)> {
        self.0.applied.subscribe()
    }

    pub fn status(&self) -> Status {
        let parent_addr = self.0.parent_addr.lock().unwrap().clone();
        let st = self.0.state.lock().unwrap();
        let file = st.replica.file();
        let version = file.version();
        let commit = st.replica.commit_known();
        let lag_seconds = if commit > version && st.replica.last_commit_time_us() > 0 {
            now_us().saturating_sub(st.replica.last_commit_time_us()) as f64 / 1e6
        } else {
            0.0
        };
        let role = match self.0.core.get() {
            Some(c) if c.is_leader() => "leader",
            Some(_) => "follower",
            None if self.0.cfg.is_core() => "follower",
            None => "relay",
        };
        Status {
            name: self.0.cfg.name.clone(),
            role: role.to_string(),
            version,
            root: file.root_hex(),
            length: file.len(),
            parent: match st.replica.parent() {
                Some(p) if !self.0.cfg.is_core() => p.name.clone(),
                _ => String::new(),
            },
            parent_addr: parent_addr.clone(),
            children: st.children.values().map(|c| c.name.clone()).collect(),
            child_addrs: st.children.values().map(|c| c.addr.clone()).collect(),
            depth: self.0.depth(&st),
            root_path: self.0.root_path(&st),
            synced: st.replica.is_synced(),
            commit_version: commit,
            lag_entries: commit.saturating_sub(version),
            lag_seconds,
            file_version: *self.0.materialized.borrow(),
            core_addrs: self.0.core_addrs(&st),
            stats: StatsView {
                entries_applied: self.0.stats.entries_applied.load(Ordering::Relaxed),
                snapshots_installed: self.0.stats.snapshots_installed.load(Ordering::Relaxed),
                gaps: self.0.stats.gaps.load(Ordering::Relaxed),
                resumes: self.0.stats.resumes.load(Ordering::Relaxed),
                backfill_received_bytes: self.0.stats.backfill_received.load(Ordering::Relaxed),
                backfill_from_peers_bytes: self.0.stats.backfill_from_peers.load(Ordering::Relaxed),
                bad_chunks: self.0.stats.bad_chunks.load(Ordering::Relaxed),
            },
            backfill: st
                .replica
                .backfill_progress()
                .map(|(bytes_done, bytes_total)| BackfillView {
                    bytes_done,
                    bytes_total,
                    sources: std::iter::once(parent_addr.clone())
                        .chain(self.0.fetch_peers.lock().unwrap().iter().cloned())
                        .collect(),
                }),
            backfills_serving: self.0.backfills_serving.load(Ordering::Acquire),
            core: self.0.core.get().map(|c| CoreStatus {
                raft: c.status(),
                members: c
                    .members()
                    .into_iter()
                    .map(|(m, voter)| MemberStatus {
                        name: m.name,
                        addr: m.addr,
                        voter,
                    })
                    .collect(),
            }),
        }
    }

    /// Waits until this node has applied `version` or `timeout` passes; true if applied.
    pub async fn wait_applied(&self, version: u64, timeout: Duration) -> bool {
        let mut rx = self.applied();
        tokio::time::timeout(timeout, rx.wait_for(|(v, _)| *v >= version))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
    }

    /// Commits `proposal` through the core (directly on a core node, over QUIC from a relay).
    pub async fn propose(&self, mut proposal: proto::Proposal) -> Result<ApplyOutcome, NodeError> {
        if proposal.id.is_empty() {
            let id: [u8; 16] = rand::random();
            proposal.id = Bytes::copy_from_slice(&id);
        }
        let size = proposal
            .update
            .as_ref()
            .map(|u| {
                u.ops
                    .iter()
                    .map(|o| match &o.kind {
                        Some(proto::op::Kind::Write(w)) => w.data.len() as u64,
                        _ => 0,
                    })
                    .sum()
            })
            .unwrap_or(0);
        let max = self.0.cfg.stream.max_update_bytes;
        if size > max {
            return Err(NodeError::UpdateTooLarge { size, max });
        }
        self.0.metrics.proposals.increment(1);
        self.propose_hops(proposal, 0).await
    }

    /// A core node commits directly when it leads, and otherwise forwards to the leader it
    /// knows (waiting for an election if there is none); a relay forwards to a core node.
    async fn propose_hops(
        &self,
        proposal: proto::Proposal,
        hops: u32,
    ) -> Result<ApplyOutcome, NodeError> {
        let Some(core) = self.0.core.get() else {
            return Ok(forward_proposal(&self.0, proposal, hops, None).await?);
        };
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            match self.core_propose(proposal.clone()).await {
                Err(ConsensusError::NotLeader { leader }) => {
                    let leader = match leader {
                        Some(l) if l.name != self.0.cfg.name => Some(l),
                        _ => {
                            let left =
                                deadline.saturating_duration_since(tokio::time::Instant::now());
                            core.wait_for_leader(left).await.ok()
                        }
                    };
                    match leader {
                        Some(l) if l.name != self.0.cfg.name && hops < MAX_HOPS => {
                            match forward_proposal(
                                &self.0,
                                proposal.clone(),
                                hops + 1,
                                Some(l.addr),
                            )
                            .await
                            {
                                Err(Forward::NotSent(e) | Forward::Unknown(e))
                                    if e.is_retryable()
                                        && tokio::time::Instant::now() < deadline =>
                                {
                                    tokio::time::sleep(Duration::from_millis(50)).await
                                }
                                other => return Ok(other?),
                            }
                        }
                        Some(l) if l.name == self.0.cfg.name => continue,
                        _ if tokio::time::Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        _ => return Err(ConsensusError::NotLeader { leader }.into()),
                    }
                }
                other => return Ok(other?),
            }
        }
    }

    /// Commits through this core node's Raft, batched with concurrent proposals.
    async fn core_propose(
        &self,
        proposal: proto::Proposal,
    ) -> Result<ApplyOutcome, ConsensusError> {
        let Some(batcher) = self.0.batcher.get() else {
            return Err(ConsensusError::Stopped);
        };
        let (tx, rx) = oneshot::channel();
        if batcher.send((proposal, tx)).is_err() {
            return Err(ConsensusError::Stopped);
        }
        rx.await.unwrap_or(Err(ConsensusError::Stopped))
    }

    /// Commits `update` (with an optional precondition) and returns the committed version.
    pub async fn write(
        &self,
        update: &Update,
        precondition: Option<&Precondition>,
    ) -> Result<ApplyOutcome, NodeError> {
        self.propose(proto::Proposal {
            update: Some(update.into()),
            precondition: precondition.map(Into::into),
            ..Default::default()
        })
        .await
    }

    /// Replaces the whole file with `content` atomically: diffs it against this node's
    /// version by chunk and commits only the changed ranges, conditional on that version
    /// (retrying on a concurrent write, after catching up to it).
    pub async fn replace(&self, content: &[u8]) -> Result<ApplyOutcome, NodeError> {
        const ATTEMPTS: u32 = 20;
        for _ in 0..ATTEMPTS {
            let file = self.file();
            let update = file.diff_to(content);
            let cond = Precondition::IfVersion(file.version());
            match self.write(&update, Some(&cond)).await? {
                ApplyOutcome::PreconditionFailed { version } => {
                    self.wait_applied(version, Duration::from_secs(10)).await;
                }
                other => return Ok(other),
            }
        }
        Err(NodeError::Contended(ATTEMPTS))
    }

    /// Replaces the whole file with `content` only if the file is still at `version`.
    pub async fn replace_at(
        &self,
        content: &[u8],
        version: u64,
    ) -> Result<ApplyOutcome, NodeError> {
        self.wait_applied(version, Duration::from_secs(10)).await;
        let file = self.file();
        if file.version() != version {
            return Ok(ApplyOutcome::PreconditionFailed {
                version: file.version(),
            });
        }
        let update = file.diff_to(content);
        self.write(&update, Some(&Precondition::IfVersion(version)))
            .await
    }

    /// Applies a core membership change: on the leader directly, otherwise forwarded to it
    /// (at most `MAX_HOPS` times).
    pub async fn admin(&self, admin: proto::Admin, hops: u32) -> Result<(), NodeError> {
        let core = self.0.core.get().ok_or(NodeError::NotCore)?;
        let result = match &admin.kind {
            Some(proto::admin::Kind::AddMember(m)) => {
                let add = core.add_member(Member {
                    name: m.name.clone(),
                    addr: m.addr.clone(),
                });
                match tokio::time::timeout(ADD_MEMBER_WAIT, add).await {
                    Ok(r) => r,
                    Err(_) => Err(ConsensusError::Timeout {
                        what: "the new member to catch up (it stays a learner; retry to finish)",
                        after: ADD_MEMBER_WAIT,
                    }),
                }
            }
            Some(proto::admin::Kind::RemoveMember(name)) => core.remove_member(name).await,
            None => return Err(NodeError::Rejected("empty admin request".into())),
        };
        match result {
            Err(ConsensusError::NotLeader { leader }) if hops <= MAX_HOPS => {
                let leader = match leader {
                    Some(l) => l,
                    None => core.wait_for_leader(LEADER_WAIT).await?,
                };
                if leader.name == self.0.cfg.name {
                    return Err(ConsensusError::NotLeader {
                        leader: Some(leader),
                    }
                    .into());
                }
                forward_admin(&self.0, &leader.addr, admin).await
            }
            other => Ok(other?),
        }
    }

    /// This node and its subtree, gathered from the children over QUIC (each level waits
    /// at most `TREE_WAIT` for its children; `budget` bounds the depth against cycles).
    pub async fn tree(&self, budget: u32) -> Vec<proto::TreeNode> {
        let (me, kids) = {
            let st = self.0.state.lock().unwrap();
            let status_parent = match st.replica.parent() {
                Some(p) if !self.0.cfg.is_core() => p.name.clone(),
                _ => String::new(),
            };
            let me = proto::TreeNode {
                name: self.0.cfg.name.clone(),
                addr: self.0.cfg.advertise.to_string(),
                parent: status_parent,
                depth: self.0.depth(&st),
                version: st.replica.file().version(),
                children: st.children.len() as u32,
                lag_entries: st
                    .replica
                    .commit_known()
                    .saturating_sub(st.replica.file().version()),
            };
            let kids: Vec<String> = st.children.values().map(|c| c.addr.clone()).collect();
            (me, kids)
        };
        let mut nodes = vec![me];
        if budget == 0 {
            return nodes;
        }
        let asks = kids.into_iter().map(|addr| {
            let shared = self.0.clone();
            async move {
                let r: Result<proto::TreeReply, NodeError> = exchange(
                    &shared,
                    &addr,
                    request::Kind::Tree(proto::TreeQuery { budget: budget - 1 }),
                )
                .await;
                r.map(|r| r.nodes).unwrap_or_default()
            }
        });
        let wait = TREE_WAIT * budget.min(8);
        if let Ok(subtrees) = tokio::time::timeout(wait, futures::future::join_all(asks)).await {
            nodes.extend(subtrees.into_iter().flatten());
        }
        nodes
    }

    /// The Raft instance of a core node.
    pub fn core(&self) -> Option<&Arc<Core>> {
        self.0.core.get()
    }
}

/// Sends a proposal to `to` (a core leader), or to a core node of this relay's choice,
/// retrying other core nodes while it has certainly not been sent. An error after sending
/// leaves the outcome unknown and is returned as is: the proposal is never sent twice.
async fn forward_proposal(
    shared: &Arc<Shared>,
    proposal: proto::Proposal,
    hops: u32,
    to: Option<String>,
) -> Result<ApplyOutcome, Forward> {
    let request = proto::Request {
        kind: Some(request::Kind::Propose(proto::Propose {
            proposal: Some(proposal),
            hops,
        })),
    };
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    loop {
        let conn = match &to {
            Some(addr) => cached_connect(shared, addr).await,
            None => core_connection(shared).await,
        };
        let sent = match conn {
            Ok(conn) => send_proposal(shared, &conn, &request).await,
            Err(e) => Err(Forward::NotSent(e)),
        };
        match sent {
            Err(Forward::NotSent(e)) | Err(Forward::Unknown(e)) if e.is_retryable() => {
                warn!(node = %shared.cfg.name, "proposal not confirmed by the core, retrying with the same id: {e}");
                *shared.core_conn.lock().await = None;
                if let Some(addr) = &to {
                    shared.peer_conns.lock().await.remove(addr);
                }
                shared.core_pick.fetch_add(1, Ordering::Relaxed);
                if to.is_some() || tokio::time::Instant::now() >= deadline {
                    return Err(Forward::Unknown(e));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

impl NodeError {
    /// Transport failures, after which the same proposal (same id) may be sent again.
    fn is_retryable(&self) -> bool {
        matches!(
            self,
            NodeError::Connect { .. } | NodeError::Wire(_) | NodeError::NoCore
        )
    }
}

/// Why forwarding a proposal failed.
#[derive(Debug)]
pub enum Forward {
    /// Nothing reached the core: retrying cannot apply it twice.
    NotSent(NodeError),
    /// It may or may not have been committed.
    Unknown(NodeError),
}

impl From<Forward> for NodeError {
    fn from(f: Forward) -> Self {
        match f {
            Forward::NotSent(e) => e,
            Forward::Unknown(e) => NodeError::OutcomeUnknown(e.to_string()),
        }
    }
}

async fn send_proposal(
    shared: &Shared,
    conn: &quinn::Connection,
    request: &proto::Request,
) -> Result<ApplyOutcome, Forward> {
    let not_sent = |e: String| {
        Forward::NotSent(NodeError::Connect {
            addr: conn.remote_address().to_string(),
            reason: e,
        })
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| not_sent(e.to_string()))?;
    wire::write_frame(&mut send, request)
        .await
        .map_err(|e| not_sent(e.to_string()))?;
    let _ = send.finish();
    let reply = wire::read_frame::<proto::ProposeReply>(&mut recv, shared.cfg.stream.max_frame)
        .await
        .map_err(|e| Forward::Unknown(e.into()))?
        .ok_or(Forward::Unknown(NodeError::Wire(WireError::Truncated)))?;
    match reply.kind {
        Some(propose_reply::Kind::CommittedVersion(v)) => Ok(ApplyOutcome::Applied { version: v }),
        Some(propose_reply::Kind::PreconditionFailedVersion(v)) => {
            Ok(ApplyOutcome::PreconditionFailed { version: v })
        }
        Some(propose_reply::Kind::Error(e)) => Err(Forward::Unknown(NodeError::Rejected(e))),
        None => Err(Forward::Unknown(NodeError::Rejected("empty reply".into()))),
    }
}

async fn core_connection(shared: &Arc<Shared>) -> Result<quinn::Connection, NodeError> {
    let mut guard = shared.core_conn.lock().await;
    if let Some(c) = guard.as_ref() {
        if c.close_reason().is_none() {
            return Ok(c.clone());
        }
    }
    let addrs = {
        let st = shared.state.lock().unwrap();
        shared.core_addrs(&st)
    };
    if addrs.is_empty() {
        return Err(NodeError::NoCore);
    }
    let mut last = NodeError::NoCore;
    let start = shared.core_pick.load(Ordering::Relaxed);
    for i in 0..addrs.len() {
        let addr = &addrs[(start + i) % addrs.len()];
        match connect(shared, addr).await {
            Ok(c) => {
                *guard = Some(c.clone());
                shared
                    .core_pick
                    .store((start + i) % addrs.len(), Ordering::Relaxed);
                return Ok(c);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A cached connection to `addr` (core to core forwarding), opened on first use and
/// replaced once closed.
async fn cached_connect(shared: &Shared, addr: &str) -> Result<quinn::Connection, NodeError> {
    let mut conns = shared.peer_conns.lock().await;
    if let Some(c) = conns.get(addr) {
        if c.close_reason().is_none() {
            return Ok(c.clone());
        }
    }
    let c = connect(shared, addr).await?;
    conns.insert(addr.to_string(), c.clone());
    Ok(c)
}

pub(crate) async fn connect(shared: &Shared, addr: &str) -> Result<quinn::Connection, NodeError> {
    let err = |reason: String| NodeError::Connect {
        addr: addr.to_string(),
        reason,
    };
    let sock: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address".into()))?;
    let connecting = shared
        .endpoint
        .connect(sock, SERVER_NAME)
        .map_err(|e| err(e.to_string()))?;
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| err(format!("no handshake within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| err(e.to_string()))
}

/// One request and its single reply on a new bidirectional stream to `addr`.
pub(crate) async fn exchange<Rep: prost::Message + Default>(
    shared: &Shared,
    addr: &str,
    kind: request::Kind,
) -> Result<Rep, NodeError> {
    let conn = connect(shared, addr).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| NodeError::Connect {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    wire::write_frame(&mut send, &proto::Request { kind: Some(kind) }).await?;
    let _ = send.finish();
    wire::read_frame::<Rep>(&mut recv, shared.cfg.stream.max_frame)
        .await?
        .ok_or(NodeError::Wire(WireError::Truncated))
}

async fn forward_admin(
    shared: &Arc<Shared>,
    addr: &str,
    admin: proto::Admin,
) -> Result<(), NodeError> {
    let reply: proto::AdminReply = exchange(shared, addr, request::Kind::Admin(admin)).await?;
    if reply.error.is_empty() {
        Ok(())
    } else {
        Err(NodeError::Rejected(reply.error))
    }
}

fn outcome_reply(r: Result<ApplyOutcome, NodeError>) -> proto::ProposeReply {
    let kind = match r {
        Ok(ApplyOutcome::Applied { version }) => propose_reply::Kind::CommittedVersion(version),
        Ok(ApplyOutcome::PreconditionFailed { version }) => {
            propose_reply::Kind::PreconditionFailedVersion(version)
        }
        Ok(ApplyOutcome::Rejected { reason, .. }) => propose_reply::Kind::Error(reason),
        Err(e) => propose_reply::Kind::Error(e.to_string()),
    };
    proto::ProposeReply { kind: Some(kind) }
}

async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            i = shared.endpoint.accept() => match i { Some(i) => i, None => return },
        };
        let s = shared.clone();
        shared.tasks.spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(s, conn).await,
                Err(e) => {
                    s.metrics.handshake_failures.increment(1);
                    warn!(node = %s.cfg.name, %remote, "refused connection: {e}");
                }
            }
        });
    }
}

async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection) {
    let peer = crate::tls::peer_identity(&conn)
        .map(|(n, r)| format!("{n}/{r}"))
        .unwrap_or_else(|| conn.remote_address().to_string());
    debug!(node = %shared.cfg.name, %peer, "connection");
    loop {
        let (send, recv) = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            s = conn.accept_bi() => match s { Ok(s) => s, Err(_) => return },
        };
        let (s, c, p) = (shared.clone(), conn.clone(), peer.clone());
        shared
            .tasks
            .spawn(async move { serve_stream(s, c, p, send, recv).await });
    }
}

fn is_core_peer(conn: &quinn::Connection) -> bool {
    matches!(
        crate::tls::peer_identity(conn),
        Some((_, crate::tls::Role::Core))
    )
}

fn close_bad(shared: &Shared, conn: &quinn::Connection, peer: &str, why: &str) {
    shared.metrics.frame_errors.increment(1);
    warn!(node = %shared.cfg.name, %peer, "closing connection: {why}");
    let reason = format!("bad frame: {why}");
    conn.close(
        VarInt::from_u32(code::BAD_FRAME),
        &reason.as_bytes()[..reason.len().min(200)],
    );
}

async fn serve_stream(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    peer: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let req = match wire::read_frame::<proto::Request>(&mut recv, shared.cfg.stream.max_frame).await
    {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(WireError::Read(quinn::ReadError::Reset(_))) => return,
        Err(e) => return close_bad(&shared, &conn, &peer, &e.to_string()),
    };
    match req.kind {
        Some(request::Kind::Subscribe(sub)) => serve_child(shared, conn, sub, send, recv).await,
        Some(request::Kind::Fetch(first)) => {
            serve_fetch(shared, conn, peer, first, send, recv).await
        }
        Some(request::Kind::Propose(p)) => {
            let Some(proposal) = p.proposal else {
                return close_bad(&shared, &conn, &peer, "propose without proposal");
            };
            let reply = outcome_reply(Node(shared.clone()).propose_hops(proposal, p.hops).await);
            if wire::write_frame(&mut send, &reply).await.is_ok() {
                let _ = send.finish();
            }
        }
        Some(request::Kind::Raft(rpc)) => {
            let Some(core) = shared.core.get() else {
                return close_bad(&shared, &conn, &peer, "raft rpc to a relay");
            };
            if !is_core_peer(&conn) {
                return close_bad(&shared, &conn, &peer, "raft rpc from a non-core peer");
            }
            let reply = core.handle_rpc(rpc).await;
            if wire::write_frame(&mut send, &reply).await.is_ok() {
                let _ = send.finish();
            }
        }
        Some(request::Kind::Sample(sample)) => {
            let offer = sample
                .offer
                .into_iter()
                .take(64)
                .map(crate::upstream::peer_from_proto)
                .collect();
            let (info, peers) = {
                let mut o = shared.overlay.lock().unwrap();
                let mut rng = shared.overlay_rng.lock().unwrap();
                o.answer_sample(offer, &mut *rng)
            };
            let reply = proto::SampleReply {
                info: Some(crate::upstream::peer_to_proto(&info)),
                peers: peers
                    .iter()
                    .map(|p| crate::upstream::peer_to_proto(p))
                    .collect(),
            };
            if wire::write_frame(&mut send, &reply).await.is_ok() {
                let _ = send.finish();
            }
        }
        Some(request::Kind::Tree(q)) => {
            let nodes = Node(shared.clone())
                .tree(q.budget.min(MAX_TREE_DEPTH))
                .await;
            if wire::write_frame(&mut send, &proto::TreeReply { nodes })
                .await
                .is_ok()
            {
                let _ = send.finish();
            }
        }
        Some(request::Kind::Admin(admin)) => {
            if shared.core.get().is_none() || !is_core_peer(&conn) {
                return close_bad(&shared, &conn, &peer, "admin request outside the core");
            }
            let error = match Node(shared.clone()).admin(admin, MAX_HOPS + 1).await {
                Ok(()) => String::new(),
                Err(e) => e.to_string(),
            };
            if wire::write_frame(&mut send, &proto::AdminReply { error })
                .await
                .is_ok()
            {
                let _ = send.finish();
            }
        }
        None => close_bad(&shared, &conn, &peer, "request without kind"),
    }
}

/// Most fetch sources a parent suggests in its `SubscribeOk`.
pub(crate) const MAX_SUGGESTED_SOURCES: usize = 8;

/// Most chunks one `FetchChunks` may ask for.
const MAX_FETCH_BATCH: usize = crate::config::MAX_FETCH_WINDOW as usize;

/// Serves a peer's chunk fetches on one stream until it finishes it: each `FetchChunks` is
/// answered with one `FetchReply` per index, in order. A batch from a node that is not a
/// child is served only while a transfer slot (`stream.max_backfills`) is free, otherwise
/// each index is answered `busy` so the asker turns to another source at once; served bytes
/// are paced like pushed ones.
async fn serve_fetch(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    peer: String,
    first: proto::FetchChunks,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let corrupt = failpoint_corrupt_chunk(peer.split('/').next().unwrap_or_default());
    let mut next = Some(first);
    loop {
        let batch = match next.take() {
            Some(b) => b,
            None => {
                match wire::read_frame::<proto::FetchChunks>(&mut recv, shared.cfg.stream.max_frame)
                    .await
                {
                    Ok(Some(b)) => b,
                    Ok(None) => {
                        let _ = send.finish();
                        return;
                    }
                    Err(WireError::Read(quinn::ReadError::Reset(_))) => return,
                    Err(e) => return close_bad(&shared, &conn, &peer, &e.to_string()),
                }
            }
        };
        if batch.indices.len() != batch.hashes.len() || batch.indices.len() > MAX_FETCH_BATCH {
            return close_bad(&shared, &conn, &peer, "malformed fetch request");
        }
        // A child finishing the transfer this node pushed to it holds a slot already.
        let child = peer.split('/').next().unwrap_or_default();
        let is_child = {
            let st = shared.state.lock().unwrap();
            st.children.values().any(|c| c.name == child)
        };
        let permit = if is_child {
            None
        } else {
            Arc::clone(&shared.backfill_permits)
                .try_acquire_owned()
                .ok()
        };
        let _serving = permit.as_ref().map(|_| ServingGuard::new(&shared));
        for (index, hash) in batch.indices.into_iter().zip(batch.hashes) {
            let Ok(hash) = <[u8; 32]>::try_from(hash.as_ref()) else {
                return close_bad(&shared, &conn, &peer, "fetch with a malformed hash");
            };
            let mut reply = proto::FetchReply {
                index,
                ..Default::default()
            };
            if permit.is_none() && !is_child {
                reply.busy = true;
            } else {
                let st = shared.state.lock().unwrap();
                match st.replica.find_chunk(index, &hash) {
                    Some(data) => reply.data = data,
                    None => reply.missing = true,
                }
            }
            if let Some(target) = corrupt {
                corrupt_chunk(&mut reply.data, index, target);
            }
            let len = reply.data.len();
            shared.pace_backfill(len).await;
            if wire::write_frame(&mut send, &reply).await.is_err() {
                return;
            }
            shared.count_relayed(len);
            shared.metrics.backfill_served.increment(len as u64);
        }
    }
}

/// Reads the child's `SnapshotLimit` frames on its subscription stream into `limit`
/// (lowered only) until the child finishes the stream or the connection ends.
async fn read_limits(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    peer: String,
    mut recv: quinn::RecvStream,
    limit: Arc<AtomicU64>,
) {
    loop {
        match wire::read_frame::<proto::SnapshotLimit>(&mut recv, 64).await {
            Ok(Some(l)) => {
                limit.fetch_min(l.below, Ordering::AcqRel);
            }
            Ok(None) | Err(WireError::Read(_)) => return,
            Err(e) => return close_bad(&shared, &conn, &peer, &e.to_string()),
        }
    }
}

async fn serve_child(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    sub: proto::Subscribe,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let refuse = |(reason, referral): (String, Option<proto::PeerInfo>)| proto::Downstream {
        kind: Some(Down::Refused(proto::Refused { reason, referral })),
    };
    let mut applied = shared.applied.subscribe();
    let deadline = tokio::time::Instant::now() + sync_wait(&shared.cfg);
    while !shared.state.lock().unwrap().replica.is_synced() {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = conn.closed() => return,
            r = tokio::time::timeout_at(deadline, applied.changed()) => {
                if !matches!(r, Ok(Ok(()))) {
                    break;
                }
            }
        }
    }
    let registered = {
        let mut st = shared.state.lock().unwrap();
        if shared.root_path(&st).contains(&sub.name) {
            Err((
                format!("{} is on this node's path to the core", sub.name),
                None,
            ))
        } else if st.children.len() >= shared.cfg.stream.fanout {
            Err((
                format!(
                    "full: {} children (fanout {})",
                    st.children.len(),
                    shared.cfg.stream.fanout
                ),
                shared.referral(&st),
            ))
        } else {
            match st.replica.plan_subscription(&sub) {
                SubscribePlan::Refuse(r) => Err((r, None)),
                plan => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let queued = Arc::new(AtomicU64::new(0));
                    let cut = Arc::new(AtomicBool::new(false));
                    let id = st.next_child;
                    st.next_child += 1;
                    st.children.insert(
                        id,
                        ChildLink {
                            name: sub.name.clone(),
                            addr: sub.listen_addr.clone(),
                            tx,
                            queued: queued.clone(),
                            cut: cut.clone(),
                        },
                    );
                    shared.metrics.children.set(st.children.len() as f64);
                    // The other children learn the new one as a fetch source now, not at
                    // their next idle heartbeat (a relay joining below one of them soon
                    // after is offered it).
                    let sources = shared.suggest_sources(&st, "");
                    let hb = st.replica.heartbeat_suggesting(now_us(), sources);
                    shared.broadcast(&mut st, &hb);
                    let ok = proto::SubscribeOk {
                        parent_name: shared.cfg.name.clone(),
                        parent_depth: shared.depth(&st),
                        resume: matches!(plan, SubscribePlan::Resume(_)),
                        core_addrs: shared.core_addrs(&st),
                        root_path: shared.root_path(&st),
                        chunk_size: shared.cfg.stream.chunk_size,
                        fetch_sources: shared.suggest_sources(&st, &sub.listen_addr),
                    };
                    Ok((
                        id,
                        plan,
                        ok,
                        rx,
                        queued,
                        cut,
                        st.replica.last_commit_time_us(),
                    ))
                }
            }
        }
    };
    let (id, plan, ok, mut rx, queued, cut, commit_time) = match registered {
        Ok(r) => r,
        Err(reason) => {
            debug!(node = %shared.cfg.name, child = %sub.name, "refusing subscription: {}", reason.0);
            if wire::write_frame(&mut send, &refuse(reason)).await.is_ok() {
                let _ = send.finish();
                let _ = send.stopped().await;
            }
            return;
        }
    };
    info!(node = %shared.cfg.name, child = %sub.name, addr = %sub.listen_addr, have = sub.have_version, resume = ok.resume, "child subscribed");
    let limit = Arc::new(AtomicU64::new(u64::MAX));
    shared.tasks.spawn(read_limits(
        shared.clone(),
        conn.clone(),
        sub.name.clone(),
        recv,
        limit.clone(),
    ));
    let heartbeat = Duration::from_millis(shared.cfg.stream.heartbeat_ms);
    let result: Result<(), WireError> = async {
        wire::write_frame(
            &mut send,
            &proto::Downstream {
                kind: Some(Down::SubscribeOk(ok)),
            },
        )
        .await?;
        match plan {
            SubscribePlan::Resume(frames) => {
                shared.metrics.resumes_served.increment(1);
                for f in &frames {
                    wire::write_raw(&mut send, f).await?;
                }
            }
            SubscribePlan::Snapshot(file) => {
                // Wait for a transfer slot, keeping the child's stream alive meanwhile.
                let permits = Arc::clone(&shared.backfill_permits);
                let acquire = permits.acquire_owned();
                tokio::pin!(acquire);
                let _permit = loop {
                    tokio::select! {
                        p = &mut acquire => break p.expect("the permits are never closed"),
                        _ = shared.shutdown.cancelled() => return Ok(()),
                        _ = conn.closed() => return Ok(()),
                        _ = tokio::time::sleep(heartbeat) => {
                            let hb = shared.state.lock().unwrap().replica.heartbeat(now_us());
                            wire::write_raw(&mut send, &hb).await?;
                        }
                    }
                };
                let _serving = ServingGuard::new(&shared);
                shared.metrics.full_transfers_served.increment(1);
                let corrupt = failpoint_corrupt_chunk(&sub.name);
                let below = limit.clone();
                let frames =
                    snapshot_frames_below(&file, commit_time, &sub.have_chunks, move || {
                        below.load(Ordering::Acquire)
                    });
                for (index, mut f) in frames {
                    if let (Some(target), Some(index)) = (corrupt, index) {
                        corrupt_chunk(&mut f.data, index, target);
                    }
                    shared.pace_backfill(f.len()).await;
                    wire::write_parts(&mut send, &f).await?;
                    shared.count_relayed(f.len());
                    shared.metrics.backfill_served.increment(f.len() as u64);
                }
            }
            SubscribePlan::Refuse(_) => {}
        }
        loop {
            let frame = tokio::select! {
                _ = shared.shutdown.cancelled() => return Ok(()),
                _ = conn.closed() => return Ok(()),
                f = rx.recv() => f,
                _ = tokio::time::sleep(heartbeat) => {
                    let hb = {
                        let st = shared.state.lock().unwrap();
                        let sources = shared.suggest_sources(&st, &sub.listen_addr);
                        st.replica.heartbeat_suggesting(now_us(), sources)
                    };
                    wire::write_raw(&mut send, &hb).await?;
                    continue;
                }
            };
            let Some(frame) = frame else { return Ok(()) };
            wire::write_raw(&mut send, &frame).await?;
            queued.fetch_sub(frame.len() as u64, Ordering::AcqRel);
            shared.count_relayed(frame.len());
        }
    }
    .await;
    if cut.load(Ordering::Acquire) {
        let _ = send.reset(VarInt::from_u32(code::CUT_OFF));
    } else if let Err(e) = result {
        debug!(node = %shared.cfg.name, child = %sub.name, "child stream ended: {e}");
    }
    let mut st = shared.state.lock().unwrap();
    st.children.remove(&id);
    shared.metrics.children.set(st.children.len() as f64);
}

/// A proposal waiting for the batcher, with where its outcome goes.
type Pending = (
    proto::Proposal,
    oneshot::Sender<Result<ApplyOutcome, ConsensusError>>,
);

fn proposal_bytes(p: &proto::Proposal) -> usize {
    p.update
        .as_ref()
        .map(|u| {
            u.ops
                .iter()
                .map(|o| match &o.kind {
                    Some(proto::op::Kind::Write(w)) => w.data.len() + 16,
                    _ => 16,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Group commit above openraft (which appends and fsyncs each `client_write` on its own):
/// takes whatever proposals queued up while earlier batches were in flight, up to
/// `MAX_BATCH` of them or `MAX_BATCH_BYTES`, and commits them as one entry; at most
/// `MAX_INFLIGHT_BATCHES` are in flight. Each proposal's own outcome is read back from the
/// replica by its id.
async fn batcher(shared: Arc<Shared>, core: Arc<Core>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let inflight = Arc::new(tokio::sync::Semaphore::new(MAX_INFLIGHT_BATCHES));
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                p = rx.recv() => match p { Some(p) => p, None => return },
            },
        };
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = proposal_bytes(&first.0);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    let size = proposal_bytes(&p.0);
                    if bytes + size > MAX_BATCH_BYTES {
                        carry = Some(p);
                        break;
                    }
                    bytes += size;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let (shared, core) = (shared.clone(), core.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if batch.len() == 1 {
                if let Some((p, tx)) = batch.pop() {
                    let _ = tx.send(core.propose(p).await);
                }
                return;
            }
            let mut batch = batch;
            for (p, _) in &mut batch {
                if p.id.is_empty() {
                    let id: [u8; 16] = rand::random();
                    p.id = Bytes::copy_from_slice(&id);
                }
            }
            let whole = proto::Proposal {
                batch: batch.iter().map(|(p, _)| p.clone()).collect(),
                ..Default::default()
            };
            match core.propose(whole).await {
                Ok(_) => {
                    let st = shared.state.lock().unwrap();
                    for (p, tx) in batch {
                        let outcome = st.replica.outcome_of(&p.id).ok_or_else(|| {
                            ConsensusError::Fatal("batched outcome not found".into())
                        });
                        let _ = tx.send(outcome);
                    }
                }
                Err(e) => {
                    let leader = match &e {
                        ConsensusError::NotLeader { leader } => Some(leader.clone()),
                        _ => None,
                    };
                    let text = e.to_string();
                    for (_, tx) in batch {
                        let _ = tx.send(Err(match &leader {
                            Some(l) => ConsensusError::NotLeader { leader: l.clone() },
                            None => ConsensusError::Raft(text.clone()),
                        }));
                    }
                }
            }
        });
    }
}

async fn core_ticker(shared: Arc<Shared>) {
    let cp = Duration::from_millis(shared.cfg.stream.checkpoint_interval_ms);
    let mut cp_tick = tokio::time::interval(cp);
    cp_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = cp_tick.tick() => {}
        }
        let mut st = shared.state.lock().unwrap();
        let events = st.replica.checkpoint().into_iter().collect();
        shared.dispatch(&mut st, events);
    }
}

async fn materialize_loop(shared: Arc<Shared>, path: PathBuf) {
    let mut rx = shared.applied.subscribe();
    let interval = Duration::from_millis(shared.cfg.stream.materialize_interval_ms);
    let mut written: Option<(u64, [u8; 32])> = None;
    loop {
        let file = {
            let st = shared.state.lock().unwrap();
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
fn load_local_copy(cfg: &NodeConfig, path: &Path) -> Option<(ChunkedFile, bool)> {
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

/// Runs a node until `shutdown` is cancelled: the entry point of both node binaries.
pub async fn run(
    cfg: NodeConfig,
    endpoint: quinn::Endpoint,
    api: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let node = Node::start(cfg, endpoint, api, shutdown).await?;
    node.stopped().await;
    Ok(())
}

/// Test-only fault injection: with `CANOPY_FAILPOINT_CORRUPT_CHUNK=N` in its environment, a
/// node flips one byte of chunk `N` in every full or diff transfer it serves (only to the
/// child named by `CANOPY_FAILPOINT_CORRUPT_FOR`, if set). The tests use it to show that a
/// bad source is detected and the chunk fetched elsewhere.
/// Test failpoint: `CANOPY_FAILPOINT_CORRUPT_CHUNK` = a chunk index, or `all`, that this node
/// serves corrupted (pushed or fetched), to the node named `CANOPY_FAILPOINT_CORRUPT_FOR`
/// only when that is set. `u64::MAX` stands for every chunk.
fn failpoint_corrupt_chunk(child: &str) -> Option<u64> {
    let index = match std::env::var("CANOPY_FAILPOINT_CORRUPT_CHUNK")
        .ok()?
        .as_str()
    {
        "all" => u64::MAX,
        i => i.parse().ok()?,
    };
    match std::env::var("CANOPY_FAILPOINT_CORRUPT_FOR") {
        Ok(only) if only != child => None,
        _ => Some(index),
    }
}

fn corrupt_chunk(data: &mut Bytes, index: u64, target: u64) {
    if (target == index || target == u64::MAX) && !data.is_empty() {
        let mut d = data.to_vec();
        d[0] ^= 0xff;
        *data = Bytes::from(d);
        warn!(index, "failpoint: serving a corrupted chunk");
    }
}

/// Counts a transfer being served in `backfills_serving` (status and metric) while alive.
struct ServingGuard<'a>(&'a Shared);

impl<'a> ServingGuard<'a> {
    fn new(shared: &'a Shared) -> Self {
        let n = shared.backfills_serving.fetch_add(1, Ordering::AcqRel) + 1;
        shared.metrics.backfills_serving.set(n as f64);
        Self(shared)
    }
}

impl Drop for ServingGuard<'_> {
    fn drop(&mut self) {
        let n = self.0.backfills_serving.fetch_sub(1, Ordering::AcqRel) - 1;
        self.0.metrics.backfills_serving.set(n as f64);
    }
}
