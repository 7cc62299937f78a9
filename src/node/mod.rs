//! The tokio driver of a node: starts its tasks and offers the handle the API, the demo and
//! the tests use. Each concern lives in a module of its own:
//!
//! | module | concern |
//! |---|---|
//! | `shared` | the state and its locks (the lock order is written there) |
//! | `net` | dialing, request/reply exchanges, the cache of core connections |
//! | `serve` | the QUIC accept loop and request dispatch |
//! | `downstream` | serving children and fetches, referrals, pacing |
//! | `upstream` | following a parent |
//! | `backfill` | a multi-source transfer being received |
//! | `overlay_driver` | feeding and ticking the overlay, carrying out its outputs |
//! | `propose` | writes, forwarding, membership, the group-commit batcher |
//! | `core` | the Raft state machine glue and the checkpoint ticker |
//! | `inspect` | status and tree |
//! | `disk` | materializing `--file` and loading it at start |
//! | `materialize` | writing `--file` at the cost of the change (reflink, swap, rewrite) |
//! | `identity` | this node's certificate: its expiry, reloading it, expiring signers |
//!
//! Invariants: a node's tasks all stop when its shutdown token is cancelled; the overlay owns
//! the node's place in the tree (parent, depth, root path), and every other module reads it
//! from there.

mod backfill;
mod core;
mod disk;
mod downstream;
mod error;
mod failpoint;
mod identity;
mod inspect;
mod materialize;
mod net;
mod overlay_driver;
mod propose;
mod serve;
mod shared;
mod upstream;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use quinn::VarInt;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::api::{Backend, BackendError, Status};
use crate::config::{NodeConfig, NodeKind};
use crate::consensus::{ConsensusError, Core};
use crate::file::{ApplyOutcome, ChunkedFile, Precondition, Update};
use crate::metrics::NodeMetrics;
use crate::overlay::Overlay;
use crate::proto;
use crate::replica::{Replica, Trust};
use crate::tls::{Identity, Role};
use crate::trust::{Sealer, Verifier};

pub use error::NodeError;
pub use inspect::MAX_TREE_DEPTH;
pub use overlay_driver::{peer_from_proto, peer_to_proto, MAX_HELD_ZONES};
pub(crate) use serve::largest_request;
pub use shared::{now_us, Shared};

use error::code;
use shared::{OverlayCell, Serving, State, StreamStats};

/// A handle to a running node.
#[derive(Clone)]
pub struct Node(pub Arc<Shared>);

impl Node {
    /// Starts every task of a node on `endpoint` (already bound, with the node's TLS identity
    /// `id`) and serves the HTTP API on `api`. Tasks stop when `shutdown` is cancelled.
    pub async fn start(
        cfg: NodeConfig,
        id: Arc<Identity>,
        endpoint: quinn::Endpoint,
        api: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Node, NodeError> {
        cfg.validate()?;
        if id.name != cfg.name {
            return Err(NodeError::Identity(format!(
                "the certificate is for {}, the node is named {}",
                id.name, cfg.name
            )));
        }
        if cfg.is_core() != (id.role == Role::Core) {
            return Err(NodeError::Identity(format!(
                "a {} node needs a certificate with the {} role; this one has the {} role",
                if cfg.is_core() { "core" } else { "relay" },
                if cfg.is_core() {
                    "core"
                } else {
                    "relay or reader"
                },
                id.role
            )));
        }
        std::fs::create_dir_all(&cfg.data).map_err(|source| NodeError::Io {
            path: cfg.data.clone(),
            source,
        })?;
        let token = api_token(&cfg)?;
        let verifier = Verifier::new(id.clone());
        let trust = if cfg.is_core() {
            let sealer = Sealer::new(&id)
                .map_err(|e| NodeError::Identity(e.to_string()))?
                .chained(cfg.stream.chain_seals);
            Trust::Sign { sealer, verifier }
        } else {
            Trust::Verify(verifier)
        };
        let mut replica = Replica::new(cfg.stream.replica(), trust)?.with_name(&cfg.name);
        let mut loaded = None;
        if let (NodeKind::Relay { .. }, Some(path)) = (&cfg.kind, &cfg.file) {
            if let Some(copy) = disk::load_local_copy(&cfg, path) {
                loaded = Some(copy.file.clone());
                let (version, root) = (copy.file.version(), copy.file.root_hex());
                if let Some(cert) = &copy.signer {
                    replica.learn_signers(std::slice::from_ref(cert), SystemTime::now());
                }
                let trusted = match replica.seed(copy.file, copy.sealed) {
                    Ok(t) => t,
                    Err(e) => {
                        warn!(node = %cfg.name, "the local copy's seal does not verify ({e}): fetching only the chunks that differ");
                        false
                    }
                };
                info!(node = %cfg.name, version, trusted, %root, "starting from the local copy");
            }
        }
        let materializer = match &cfg.file {
            Some(path) => {
                let m = materialize::Materializer::open(path, &cfg.materialize, loaded)?;
                info!(node = %cfg.name, method = m.method().as_str(), path = %path.display(), "materializing the file by {}", m.method().as_str());
                Some(m)
            }
            None => None,
        };
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
        )
        .with_zone(cfg.zone.clone())
        .with_zone_shares(cfg.zone_shares.clone());
        let (overlay_out, overlay_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                replica,
                children: BTreeMap::new(),
                next_child: 0,
                suggested_sources: Vec::new(),
                fetch_peers: Vec::new(),
                parent_core_addrs: Vec::new(),
            }),
            overlay: Mutex::new(OverlayCell {
                overlay,
                rng: overlay_driver::rng(&cfg.name, cfg.seed),
                start: std::time::Instant::now(),
            }),
            overlay_out,
            overlay_wake: Notify::new(),
            applied: watch::channel((0, 0)).0,
            transfer: watch::channel(0).0,
            materialized: watch::channel(None).0,
            disk_full: std::sync::atomic::AtomicBool::new(false),
            materialize_method: OnceLock::new(),
            materialize_bytes: AtomicU64::new(0),
            materialize_writes: AtomicU64::new(0),
            core: OnceLock::new(),
            endpoint,
            core_conns: tokio::sync::Mutex::new(BTreeMap::new()),
            sampled: Mutex::new(BTreeMap::new()),
            core_pick: AtomicUsize::new(0),
            batcher: OnceLock::new(),
            proposals_queued: AtomicUsize::new(0),
            requests: crate::transport::ReadBudget::new(cfg.limits.request_bytes),
            serving: Serving {
                permits: Arc::new(tokio::sync::Semaphore::new(
                    cfg.stream.max_backfills as usize,
                )),
                now: AtomicU64::new(0),
                most: AtomicU64::new(0),
            },
            backfill_pace: Mutex::new(tokio::time::Instant::now()),
            metrics: NodeMetrics::new(&cfg.name),
            relayed: AtomicU64::new(0),
            stats: StreamStats::default(),
            role: id.role,
            identity: Mutex::new(id.clone()),
            client_config: Mutex::new(None),
            cert_warned: Mutex::new(Default::default()),
            shutdown,
            tasks: TaskTracker::new(),
            cfg,
        });
        let weak = Arc::downgrade(&shared);
        crate::metrics::register_live(Box::new(move || weak.upgrade().map(|s| inspect::live(&s))));
        core::start(&shared).await?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        shared
            .tasks
            .spawn(overlay_driver::run(shared.clone(), overlay_rx, cmd_tx));
        if !shared.cfg.is_core() {
            shared.tasks.spawn(upstream::run(shared.clone(), cmd_rx));
        }
        if let (Some(path), Some(m)) = (shared.cfg.file.clone(), materializer) {
            let _ = shared.materialize_method.set(m.method());
            shared
                .tasks
                .spawn(disk::materialize_loop(shared.clone(), path, m));
        }
        shared.tasks.spawn(serve::accept_loop(shared.clone()));
        shared.tasks.spawn(identity::watch(shared.clone()));
        if failpoint::is_rogue() {
            warn!(node = %shared.cfg.name, "failpoint: this node behaves as a rogue relay");
        }
        let node = Node(shared.clone());
        let router = crate::api::router(node.clone(), token);
        let (sd, limits, name) = (
            shared.shutdown.clone(),
            shared.cfg.limits.clone(),
            shared.cfg.name.clone(),
        );
        shared
            .tasks
            .spawn(async move { crate::api::serve(api, router, &limits, &name, sd).await });
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

    /// Waits for shutdown, or for the core role to fail: then the node stops every task and
    /// returns the reason, so its supervisor restarts it and its children re-attach
    /// elsewhere instead of following a core that no longer applies anything.
    pub async fn stopped_or_fatal(&self, shutdown: CancellationToken) -> Result<(), NodeError> {
        let Some(core) = self.core().cloned() else {
            self.stopped().await;
            return Ok(());
        };
        tokio::select! {
            _ = self.stopped() => Ok(()),
            reason = core.fatal() => {
                error!(node = %self.name(), "the core role failed, exiting: {reason}");
                shutdown.cancel();
                self.stopped().await;
                Err(NodeError::Consensus(reason))
            }
        }
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
        self.0.state.lock().replica.file().clone()
    }

    /// Watch of `(applied version, core commit time in µs)`.
    pub fn applied(&self) -> watch::Receiver<(u64, u64)> {
        self.0.applied.subscribe()
    }

    /// What `/v1/status` reports.
    pub fn status(&self) -> Status {
        inspect::status(&self.0)
    }

    /// Waits until this node has applied `version` or `timeout` passes; true if applied.
    pub async fn wait_applied(&self, version: u64, timeout: Duration) -> bool {
        propose::wait_applied(&self.0, version, timeout).await
    }

    /// Commits `proposal` through the core (directly on a core node, over QUIC from a relay).
    pub async fn propose(&self, proposal: proto::Proposal) -> Result<ApplyOutcome, NodeError> {
        propose::propose(&self.0, proposal).await
    }

    /// Commits `update` (with an optional precondition) and returns the committed version.
    pub async fn write(
        &self,
        update: &Update,
        precondition: Option<&Precondition>,
    ) -> Result<ApplyOutcome, NodeError> {
        propose::write(&self.0, update, precondition).await
    }

    /// Replaces the whole file with `content` atomically: diffs it against this node's
    /// version by chunk and commits only the changed ranges, conditional on that version
    /// (retrying on a concurrent write, after catching up to it).
    pub async fn replace(&self, content: &[u8]) -> Result<ApplyOutcome, NodeError> {
        propose::replace(&self.0, content, None).await
    }

    /// Replaces the whole file with `content` only if the file is still at `version`.
    pub async fn replace_at(
        &self,
        content: &[u8],
        version: u64,
    ) -> Result<ApplyOutcome, NodeError> {
        propose::replace(&self.0, content, Some(version)).await
    }

    /// Applies a core membership change (forwarded to the leader when needed).
    pub async fn admin(&self, admin: proto::Admin) -> Result<(), NodeError> {
        propose::admin(&self.0, admin, 0).await
    }

    /// This node and its subtree, gathered from the children over QUIC.
    pub async fn tree(&self, budget: u32) -> Vec<proto::TreeNode> {
        inspect::tree(&self.0, budget).await
    }

    /// The Raft instance of a core node.
    pub fn core(&self) -> Option<&Arc<Core>> {
        self.0.core.get()
    }

    /// Takes a renewed certificate and key, or a new CA, without a restart: new connections
    /// use them at once, and a core node signs with its new key after telling its children.
    pub fn reload_identity(&self, id: Identity) -> Result<(), NodeError> {
        identity::reload(&self.0, Arc::new(id))
    }
}

/// Where the API token lives when no file is configured.
pub const API_TOKEN_FILE: &str = "api-token";

/// Largest API token file read (bytes): a token is a line (the node makes 64 hex digits).
const MAX_API_TOKEN: u64 = 4096;

/// The API token: read from `api_token_file`, or from `DATA/api-token`, created with a
/// random token (mode 0600) at first start. The token itself is never logged.
fn api_token(cfg: &NodeConfig) -> Result<crate::api::ApiToken, NodeError> {
    let path = api_token_path(cfg);
    if cfg.api_token_file.is_none() && !path.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| NodeError::Io {
            path: path.clone(),
            source,
        };
        let token = hex::encode(rand::random::<[u8; 32]>());
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        f.write_all(token.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        info!(node = %cfg.name, path = %path.display(), "created the API token file (writes need it)");
    }
    read_api_token(&path).map(|t| crate::api::ApiToken::new(&t))
}

/// Checks the API token file that a start would read, where there is one already (a
/// configured `api_token_file`, or `DATA/api-token` from an earlier start), so that a bad
/// one is refused before the node starts anything. Creates nothing.
pub(crate) fn check_api_token(cfg: &NodeConfig) -> Result<(), NodeError> {
    let path = api_token_path(cfg);
    if cfg.api_token_file.is_none() && !path.exists() {
        return Ok(());
    }
    read_api_token(&path).map(drop)
}

fn api_token_path(cfg: &NodeConfig) -> std::path::PathBuf {
    cfg.api_token_file
        .clone()
        .unwrap_or_else(|| cfg.data.join(API_TOKEN_FILE))
}

/// The token in `path`: its first [`MAX_API_TOKEN`] bytes at most, trimmed, not empty.
fn read_api_token(path: &std::path::Path) -> Result<String, NodeError> {
    let io = |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut token = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(std::fs::File::open(path).map_err(io)?, MAX_API_TOKEN + 1),
        &mut token,
    )
    .map_err(io)?;
    if token.len() as u64 > MAX_API_TOKEN {
        return Err(NodeError::Identity(format!(
            "the API token file {} is over {MAX_API_TOKEN} bytes",
            path.display()
        )));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(NodeError::Identity(format!(
            "the API token file {} is empty",
            path.display()
        )));
    }
    Ok(token.to_string())
}

impl From<NodeError> for BackendError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::UpdateTooLarge { .. }
            | NodeError::File(
                crate::file::FileError::TooLarge { .. }
                | crate::file::FileError::TooMuchGrowth { .. },
            )
            | NodeError::Consensus(ConsensusError::TooLarge { .. }) => {
                BackendError::TooLarge(e.to_string())
            }
            NodeError::Busy(_) => BackendError::Busy(e.to_string()),
            NodeError::Consensus(
                ConsensusError::InvalidProposal(_) | ConsensusError::BadMember { .. },
            ) => BackendError::Invalid(e.to_string()),
            NodeError::Consensus(
                ConsensusError::WouldLoseQuorum { .. } | ConsensusError::CatchUpTimeout { .. },
            ) => BackendError::Contended(e.to_string()),
            NodeError::Rejected(_) | NodeError::NotCore => BackendError::Invalid(e.to_string()),
            NodeError::Forbidden(_) => BackendError::Forbidden(e.to_string()),
            NodeError::Contended(_) => BackendError::Contended(e.to_string()),
            e => BackendError::Unavailable(e.to_string()),
        }
    }
}

impl Backend for Node {
    fn status(&self) -> Status {
        Node::status(self)
    }

    fn file(&self) -> ChunkedFile {
        Node::file(self)
    }

    fn versions(&self) -> watch::Receiver<(u64, u64)> {
        self.applied()
    }

    fn shown(&self) -> crate::api::Shown {
        inspect::shown(&self.0)
    }

    fn file_versions(&self) -> Option<watch::Receiver<Option<(u64, crate::file::Hash)>>> {
        self.0
            .cfg
            .file
            .is_some()
            .then(|| self.0.materialized.subscribe())
    }

    fn max_update_bytes(&self) -> u64 {
        self.0.cfg.stream.max_update_bytes
    }

    fn max_len(&self) -> u64 {
        self.0.cfg.stream.max_len
    }

    fn limits(&self) -> crate::config::LimitsConfig {
        self.0.cfg.limits.clone()
    }

    async fn write(
        &self,
        update: Update,
        precondition: Option<Precondition>,
    ) -> Result<ApplyOutcome, BackendError> {
        Ok(propose::write(&self.0, &update, precondition.as_ref()).await?)
    }

    async fn tree(&self) -> Vec<proto::TreeNode> {
        inspect::whole_tree(&self.0).await
    }

    async fn admin(&self, admin: proto::Admin) -> Result<(), BackendError> {
        Ok(propose::admin(&self.0, admin, 0).await?)
    }

    async fn core_members(&self) -> Option<crate::api::CoreStatus> {
        inspect::core_members(&self.0).await
    }
}

/// Runs a node until `shutdown` is cancelled: the entry point of both node binaries.
pub async fn run(
    cfg: NodeConfig,
    id: Arc<Identity>,
    endpoint: quinn::Endpoint,
    api: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let node = Node::start(cfg, id, endpoint, api, shutdown.clone()).await?;
    node.stopped_or_fatal(shutdown).await
}
