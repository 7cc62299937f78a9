//! A running node's shared state and its locks; every task of the node holds an `Arc<Shared>`.
//!
//! Lock order. A task holding a lock may take only locks further down this list, never one
//! above it, and never waits on anything async while holding one:
//! 1. [`Shared::state`]: the replica, the children, the fetch sources, the core addresses.
//!    Changing the replica and the child table under this one lock is what makes a child's
//!    live stream start exactly after its subscription plan (no gap, no repeat).
//! 2. [`Shared::overlay`]: the overlay state machine and its RNG.
//! 3. [`Shared::backfill_pace`]: the shared pacing clock of transfers served.
//! 4. [`Shared::identity`], [`Shared::client_config`]: this node's certificate and key, and
//!    the client configuration made of them, replaced on reload.
//! 5. [`Shared::cert_warned`]: peers already logged as presenting a foreign certificate.
//! 6. [`Shared::sampled`]: connections of the last samples, kept for the attach that follows.
//!
//! The tokio mutex over connections ([`Shared::core_conns`]) is taken only with none of the
//! above held. All locks are `parking_lot` locks: a panic in one request cannot poison them
//! and turn the node into a zombie.
//!
//! This module imports no sibling: the state is plain data, and the behaviour lives in the
//! modules that own each concern.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{NodeConfig, NodeKind};
use crate::consensus::{ConsensusError, Core};
use crate::file::ApplyOutcome;
use crate::metrics::NodeMetrics;
use crate::overlay::{Output as OverlayOutput, Overlay, Reason};
use crate::proto;
use crate::replica::Replica;

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What the overlay driver asks the upstream follower to do.
#[derive(Debug)]
pub(crate) enum UpstreamCommand {
    /// Subscribe to `addr` (a move when already attached: make-before-break).
    Attach { addr: String, reason: Reason },
    /// Drop the parent at `addr` (its path now contains this node).
    Detach { addr: String },
    /// Send this report of the node to its parent, up the subscription stream.
    Report(crate::overlay::Report),
}

/// One child's end of the broadcast: its queue and the flags its writer task reads.
pub(crate) struct ChildLink {
    pub(crate) name: String,
    pub(crate) addr: String,
    pub(crate) tx: mpsc::UnboundedSender<Bytes>,
    /// Bytes of frames queued for this child and not yet written.
    pub(crate) queued: Arc<AtomicU64>,
    /// Set when the child is cut off: its writer resets the stream.
    pub(crate) cut: Arc<AtomicBool>,
    /// The version of this node's own transfer the child follows (cut-through): installing
    /// that version does not cut this child off, it is what the child is receiving.
    pub(crate) follows: Option<u64>,
}

/// What [`Shared::state`] guards.
pub(crate) struct State {
    pub(crate) replica: Replica,
    pub(crate) children: BTreeMap<u64, ChildLink>,
    pub(crate) next_child: u64,
    /// Fetch sources the current parent suggested (`SubscribeOk` and heartbeats).
    pub(crate) suggested_sources: Vec<String>,
    /// Peers the transfer being received fetches chunks from, besides the parent.
    pub(crate) fetch_peers: Vec<String>,
    /// Core addresses as the current parent named them (relays).
    pub(crate) parent_core_addrs: Vec<String>,
}

/// The overlay and its RNG, under one lock.
pub(crate) struct OverlayCell {
    pub(crate) overlay: Overlay,
    pub(crate) rng: rand_chacha::ChaCha8Rng,
    /// The overlay's clock starts here (it counts milliseconds from 0).
    pub(crate) start: std::time::Instant,
}

impl OverlayCell {
    /// Milliseconds on the overlay's clock.
    pub(crate) fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
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

/// A proposal queued for the group-commit batcher, with where its outcome goes.
pub(crate) struct QueuedProposal {
    pub(crate) proposal: proto::Proposal,
    pub(crate) reply: oneshot::Sender<Result<ApplyOutcome, ConsensusError>>,
}

/// Transfers served to children and peers: how many at once, and at what pace.
pub(crate) struct Serving {
    /// One permit per transfer served at once (`stream.max_backfills`).
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
    /// Transfers being served now.
    pub(crate) now: AtomicU64,
    /// The most transfers ever served at once (a high-water mark, for tests and status).
    pub(crate) most: AtomicU64,
}

/// Shared state of a running node; see the module docs for the lock order.
pub struct Shared {
    pub cfg: NodeConfig,
    pub(crate) state: Mutex<State>,
    pub(crate) overlay: Mutex<OverlayCell>,
    /// Outputs of the overlay, carried out by the overlay driver in order.
    pub(crate) overlay_out: mpsc::UnboundedSender<OverlayOutput>,
    /// Wakes the overlay driver to look at the overlay's deadline again.
    pub(crate) overlay_wake: Notify,
    /// `(applied version, core commit time in µs)`.
    pub(crate) applied: watch::Sender<(u64, u64)>,
    /// Bumped when a transfer this node receives begins or gains a chunk, for the children
    /// that follow it.
    pub(crate) transfer: watch::Sender<u64>,
    /// The version and root the `--file` holds, once written.
    pub(crate) materialized: watch::Sender<Option<(u64, crate::file::Hash)>>,
    /// The last write of `--file` failed for a full disk (cleared by the next that works).
    pub(crate) disk_full: AtomicBool,
    /// How `--file` is written, once decided at start.
    pub(crate) materialize_method: OnceLock<super::materialize::Method>,
    /// Bytes written to disk for `--file` (content, not the filesystem's metadata), and the
    /// writes that made a new version of it visible.
    pub(crate) materialize_bytes: AtomicU64,
    pub(crate) materialize_writes: AtomicU64,
    pub(crate) core: OnceLock<Arc<Core>>,
    pub(crate) endpoint: quinn::Endpoint,
    /// Cached connections to core nodes, by address (proposals, admin, forwarding).
    pub(crate) core_conns: tokio::sync::Mutex<BTreeMap<String, quinn::Connection>>,
    /// Connections that samples of an unattached node just used, by address: the attach
    /// that follows the samples takes its parent's from here instead of making a new
    /// handshake ([`super::net::keep_sampled`]).
    /// Each with the number that tells its time-to-live task it is still the one kept.
    pub(crate) sampled: Mutex<BTreeMap<String, (u64, quinn::Connection)>>,
    /// Which core address a relay tries first (rotates on failure).
    pub(crate) core_pick: AtomicUsize,
    pub(crate) batcher: OnceLock<mpsc::UnboundedSender<QueuedProposal>>,
    /// Proposals sent to the batcher and not yet taken into a batch (at most
    /// `limits.proposal_queue`).
    pub(crate) proposals_queued: AtomicUsize,
    /// What the first frames of requests from peers other than core nodes may hold at once
    /// (`limits.request_bytes`).
    pub(crate) requests: crate::transport::ReadBudget,
    pub(crate) serving: Serving,
    /// When the shared backfill budget (`stream.backfill_bytes_per_sec`) is next free.
    pub(crate) backfill_pace: Mutex<tokio::time::Instant>,
    pub metrics: NodeMetrics,
    pub(crate) relayed: AtomicU64,
    pub(crate) stats: StreamStats,
    /// This node's role, from its certificate (a reader may not write).
    pub(crate) role: crate::tls::Role,
    /// This node's certificate and key (replaced when they are reloaded).
    pub(crate) identity: Mutex<Arc<crate::tls::Identity>>,
    /// The client configuration of outgoing connections once the identity was reloaded
    /// (`None`: the endpoint's default, made at start).
    pub(crate) client_config: Mutex<Option<quinn::ClientConfig>>,
    /// Peers already named in the log as presenting a certificate of another CA.
    pub(crate) cert_warned: Mutex<std::collections::BTreeSet<String>>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

impl Shared {
    /// A transfer this node receives began or gained a chunk: wakes the children's writers
    /// that follow it.
    pub(crate) fn transfer_progressed(&self) {
        if self.transfer.receiver_count() > 0 {
            self.transfer.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Bytes sent to children and fetching peers.
    pub(crate) fn count_relayed(&self, n: usize) {
        self.relayed.fetch_add(n as u64, Ordering::Relaxed);
        self.metrics.relayed_bytes.increment(n as u64);
    }

    /// This node's distance from the core: 0 on a core node, `None` on an unattached relay.
    /// The overlay owns the tree position; this only reads it.
    pub(crate) fn depth(&self) -> Option<u32> {
        if self.cfg.is_core() {
            return Some(0);
        }
        self.overlay.lock().overlay.depth()
    }

    /// Names from the core down to this node, itself included (just itself on a core node
    /// or an unattached relay).
    pub(crate) fn root_path(&self) -> Vec<String> {
        let path = self.announced_path();
        if path.is_empty() {
            vec![self.cfg.name.clone()]
        } else {
            path
        }
    }

    /// The path to the core this node announces to its children in heartbeats: empty on a
    /// relay without a parent, so that its children keep the path they had (and the depth
    /// they advertise) until it is attached again, instead of learning that it is a root.
    pub(crate) fn announced_path(&self) -> Vec<String> {
        if self.cfg.is_core() {
            return vec![self.cfg.name.clone()];
        }
        self.overlay.lock().overlay.info().root_path
    }

    /// Where this node's parent is (empty when unattached or a core node).
    pub(crate) fn parent(&self) -> (String, String) {
        let cell = self.overlay.lock();
        (
            cell.overlay.parent_name().cloned().unwrap_or_default(),
            cell.overlay.parent_addr().cloned().unwrap_or_default(),
        )
    }

    /// The core's addresses as this node knows them: the members (core), or the parent's
    /// word followed by the `--join` list (a relay). A relay's list is only a list of places
    /// to try: a connection to one is kept only if its certificate has the core role.
    pub(crate) fn core_addrs(&self, st: &State) -> Vec<String> {
        match &self.cfg.kind {
            NodeKind::Core { .. } => match self.core.get() {
                Some(core) => core.members().into_iter().map(|(m, _)| m.addr).collect(),
                None => vec![self.cfg.advertise.to_string()],
            },
            NodeKind::Relay { join } => {
                let mut addrs = st.parent_core_addrs.clone();
                for a in join {
                    if !addrs.contains(a) {
                        addrs.push(a.clone());
                    }
                }
                addrs
            }
        }
    }
}
