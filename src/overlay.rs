//! The self-organizing tree's control plane as a sans-IO state machine: peer view, parent
//! choice (power of d choices, subtree- and latency-aware), admitting children, referrals
//! and rebalancing.
//!
//! The same code runs in the relay runtime (`node`) and in `topology-sim`. It holds no
//! clock, socket or global RNG: callers pass `now` (ms) and an RNG to [`Overlay::handle`]
//! and carry out the returned [`Output`]s, feeding the results back as [`Input`]s.
//!
//! Invariants:
//! - A node has at most one parent, and never chooses a candidate whose root path contains
//!   itself; a parent whose announced path contains this node is dropped at once (no cycles).
//! - A node never has more than one attach in flight; a move (rebalance) keeps the current
//!   parent until the new one has accepted (make-before-break is the driver's job).
//! - A node moves only when the new parent puts it at least `rebalance_min_gain` levels
//!   nearer the root, or `subtree_min_gain` levels when it brings a subtree along (every
//!   move lowers the sum of depths, so moves end: no flapping).
//! - [`Overlay::admit`] accepts a child only while fewer than `fanout` children are
//!   registered ([`Input::ChildAdded`] to [`Input::ChildRemoved`]), and never a node on this
//!   node's own root path: a driver that registers each accepted child before the next
//!   `admit` never serves more than `fanout`.
//! - Latency only orders candidates whose landing depth is within `latency_slack` levels of
//!   the shallowest one sampled; with 0 it only breaks ties of depth.
//! - Iteration order that reaches an output is deterministic for a given RNG seed
//!   (`BTreeMap`, sorted candidate lists).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::seq::{IndexedRandom, IteratorRandom};
use rand::Rng;

/// Tuning of the overlay; each default says why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OverlayConfig {
    /// Children per node. 8: the core's egress stays a handful of copies per write, and depth
    /// stays near log8(N) (4 at 4k nodes).
    pub fanout: u32,
    /// Candidates compared per choice. 2: the power of two choices gives most of the benefit
    /// of a full scan at a fraction of the probes.
    pub choices: usize,
    /// Peers remembered. 16: enough random candidates at any size, small to shuffle.
    pub view_size: usize,
    /// Peers exchanged per shuffle or sample. 6: Cyclon's usual third of the view.
    pub shuffle_len: usize,
    /// Period of view shuffles (ms). 2000: views stay fresh without chatter. It doubles
    /// after each shuffle while the node keeps its parent (up to 8×, 16 s) and drops back
    /// when the parent changes: a settled tree goes quiet, a moving one stays fresh.
    pub shuffle_ms: u64,
    /// Mean period of rebalance checks (ms), jittered ±50 %. 10000: a tree settles in tens of
    /// seconds without constant movement. A check reads the view (kept fresh by shuffles) and
    /// sends nothing unless it moves; each check that finds no move doubles the period (up
    /// to 8×) until the node's place changes.
    pub rebalance_ms: u64,
    /// Levels a move must gain. 2: hysteresis against flapping.
    pub rebalance_min_gain: u32,
    /// Levels a move must gain when the node serves a subtree (height 1 or more). 1: a
    /// subtree moved one level up lifts every node in it, which is what keeps the deepest
    /// node within one level of a packed tree under churn (docs/topology.md); each move
    /// still lowers the sum of depths, so moves end.
    pub subtree_min_gain: u32,
    /// Levels of depth a candidate in this node's zone may lose to one in another zone and
    /// still win (a measured RTT only ever breaks ties of depth). 1: with 3 zones, 10k
    /// nodes joining one by one get a p99 latency from the core 2.4× lower than by depth
    /// alone, with no deeper tree (docs/topology.md). No effect without zones.
    pub latency_slack: u32,
    /// How long to wait for sample answers (ms). 1000.
    pub probe_timeout_ms: u64,
    /// How long an attach may take before it counts as failed (ms). 5000: a parent may make a
    /// child wait while it syncs itself.
    pub attach_timeout_ms: u64,
    /// Referrals followed in a row before sampling again. 8: a joiner that meets a full
    /// node descends level by level, and 8 levels hold 19 million nodes at fan-out 8.
    pub max_referrals: u32,
    /// Wait after a probe that found no candidate before probing again (ms), doubling per
    /// fruitless probe up to 16×. 250: a node whose peers are all full (a mass join) retries
    /// a few times a second instead of once per round trip, and backs off to 4 s.
    pub probe_backoff_ms: u64,
    /// How long a peer that served data failing verification is not chosen as parent (ms).
    /// 60000: long enough to finish a transfer from another source; short enough that a
    /// peer repaired by its operator is used again without a restart.
    pub faulty_ban_ms: u64,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        Self {
            fanout: 8,
            choices: 2,
            view_size: 16,
            shuffle_len: 6,
            shuffle_ms: 2000,
            rebalance_ms: 10_000,
            rebalance_min_gain: 2,
            subtree_min_gain: 1,
            latency_slack: 1,
            probe_timeout_ms: 1000,
            attach_timeout_ms: 5000,
            max_referrals: 8,
            probe_backoff_ms: 250,
            faulty_ban_ms: 60_000,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OverlayError {
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
}

impl OverlayConfig {
    pub fn validate(&self) -> Result<(), OverlayError> {
        for (f, v) in [
            ("fanout", self.fanout as u64),
            ("choices", self.choices as u64),
            ("view_size", self.view_size as u64),
            ("shuffle_len", self.shuffle_len as u64),
            ("shuffle_ms", self.shuffle_ms),
            ("rebalance_ms", self.rebalance_ms),
            ("rebalance_min_gain", u64::from(self.rebalance_min_gain)),
            ("subtree_min_gain", u64::from(self.subtree_min_gain)),
            ("probe_timeout_ms", self.probe_timeout_ms),
            ("attach_timeout_ms", self.attach_timeout_ms),
            ("probe_backoff_ms", self.probe_backoff_ms),
            ("faulty_ban_ms", self.faulty_ban_ms),
        ] {
            if v == 0 {
                return Err(OverlayError::Zero(f));
            }
        }
        Ok(())
    }
}

/// How nodes are named and addressed: `String` in the runtime (names and `host:port`), a
/// plain integer in `topology-sim`, where a 100k-node run compares and copies millions.
pub trait Id: Clone + Ord + std::fmt::Debug + std::fmt::Display + Send + Sync + 'static {}

impl<T: Clone + Ord + std::fmt::Debug + std::fmt::Display + Send + Sync + 'static> Id for T {}

/// What a node tells others about itself.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerInfo<I = String> {
    pub name: I,
    pub addr: I,
    /// Distance from the core (0 for core nodes); None while not attached.
    pub depth: Option<u32>,
    /// Children it can still take.
    pub free_slots: u32,
    /// Names from the core down to this node (inclusive).
    pub root_path: Vec<I>,
    /// Height of the subtree it serves: 0 without children, else one more than its
    /// highest child reported ([`Input::ChildReport`]).
    pub height: u32,
    /// Levels below it to the shallowest free slot in its subtree: 0 with a free slot of
    /// its own, else one more than its child with the least (as they reported). A joiner
    /// starting here lands at `depth + 1 + room`, referral by referral.
    pub room: u32,
    /// Its configured zone (rack, region), if any: peers of the same zone are presumed
    /// near before their RTT is measured.
    pub zone: Option<I>,
}

/// A peer's advertisement as views hold and pass it on: shared, so that forwarding it in a
/// shuffle costs a reference count, not a copy of its root path.
pub type Peer<I = String> = Arc<PeerInfo<I>>;

/// What a child tells its parent about itself: sent with its subscription
/// ([`Output::Attach`] carries it) and again ([`Output::Report`]) whenever it changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Report {
    /// Children it can still take.
    pub free_slots: u32,
    /// Height of the subtree it serves (0: a leaf).
    pub height: u32,
    /// Levels below it to the shallowest free slot in its subtree (0: it has one).
    pub room: u32,
}

/// Largest subtree height or room a report may claim; a larger one (from a faulty or
/// hostile child) is clamped. 64: the tree query's depth limit, far beyond any real tree.
pub const MAX_HEIGHT: u32 = 64;

/// Events the driver feeds in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input<I = String> {
    /// Time passed; call every few hundred ms, or at [`Overlay::poll_timeout`].
    Tick,
    /// `addr` answered a sample request: its own info and some peers it knows.
    Sampled {
        addr: I,
        info: Peer<I>,
        peers: Vec<Peer<I>>,
    },
    /// A sample request to `addr` failed.
    SampleFailed { addr: I },
    /// The attach to `addr` succeeded; the parent announced its depth and root path.
    Attached {
        addr: I,
        name: I,
        depth: u32,
        root_path: Vec<I>,
    },
    /// `addr` refused the attach, possibly referring us to one of its children.
    Refused { addr: I, referral: Option<Peer<I>> },
    /// The attach to `addr` failed (unreachable, handshake, stream error).
    AttachFailed { addr: I },
    /// The parent at `addr` is gone (stream error, missed heartbeats).
    ParentLost { addr: I },
    /// A child was accepted: feed it right after [`Overlay::admit`] answered
    /// [`Admit::Accept`] and before the next `admit`, with what its subscription said
    /// (`report`, its `zone`) where the subscription carries that. A child already
    /// registered under `name` (it subscribed again) is replaced.
    ChildAdded {
        name: I,
        addr: I,
        zone: Option<I>,
        report: Option<Report>,
    },
    /// A child sent a new [`Report`] up its stream (its [`Output::Report`]). Ignored for a
    /// name not registered.
    ChildReport { name: I, report: Report },
    /// A child's link ended (it moved away, closed the stream, or went silent). A driver
    /// that keys links by more than the name feeds this only when the link it ends is the
    /// one registered last for `name`.
    ChildRemoved { name: I },
    /// The measured round-trip time to `addr` (the runtime takes QUIC's estimate of the
    /// connection). Kept while `addr` stays in the view; orders candidates of equal depth.
    Rtt { addr: I, rtt_us: u64 },
    /// `addr` served data that failed verification (a chunk against its manifest): it is
    /// not chosen as parent for `faulty_ban_ms`. Send `ParentLost` too if it was the parent.
    Faulty { addr: I },
}

/// Why a node re-parented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Join,
    ParentLost,
    Rebalance,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Join => "join",
            Reason::ParentLost => "parent_lost",
            Reason::Rebalance => "rebalance",
        }
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output<I = String> {
    /// Ask `addr` for a sample, sending it `offer` (our info and some peers); answer with
    /// [`Input::Sampled`] or [`Input::SampleFailed`].
    RequestSample { addr: I, offer: Vec<Peer<I>> },
    /// Subscribe to `addr` as parent, telling it `report` (and this node's zone). With
    /// `moving`, keep the current parent until the new one accepted, then drop it. Answer
    /// with Attached, Refused or AttachFailed.
    Attach {
        addr: I,
        moving: bool,
        reason: Reason,
        report: Report,
    },
    /// A cycle was detected: drop the parent at `addr` (a ParentLost follows from the driver
    /// or is implied).
    Detach { addr: I },
    /// Send this node's new [`Report`] to its parent, up the subscription stream (the
    /// parent feeds it as [`Input::ChildReport`]).
    Report(Report),
}

/// Why [`Overlay::admit`] refused a child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The subscriber is this node or one of its ancestors: serving it would close a cycle.
    OnRootPath,
    /// Every slot is taken.
    Full { children: u32, fanout: u32 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::OnRootPath => f.write_str("the subscriber is on this node's path to the core"),
            Refusal::Full { children, fanout } => {
                write!(f, "full: {children} children (fanout {fanout})")
            }
        }
    }
}

/// The parent side's answer to a subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admit<I = String> {
    /// Serve it (and feed [`Input::ChildAdded`]).
    Accept,
    /// Refuse it, with one of this node's children to try instead when full.
    Refuse {
        reason: Refusal,
        referral: Option<Peer<I>>,
    },
}

/// One registered child, as the parent knows it.
#[derive(Clone, Debug)]
struct Child<I> {
    addr: I,
    zone: Option<I>,
    report: Option<Report>,
}

/// The partial view: a handful of entries kept sorted by address in one vector, which
/// iterates in the same order as a `BTreeMap` and is faster to search and scan at this size.
#[derive(Clone, Debug)]
struct View<I>(Vec<(I, ViewRecord<I>)>);

impl<I> Default for View<I> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<I: Ord> View<I> {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn find(&self, k: &I) -> Result<usize, usize> {
        self.0.binary_search_by(|(a, _)| a.cmp(k))
    }

    fn get(&self, k: &I) -> Option<&ViewRecord<I>> {
        match self.find(k) {
            Ok(i) => Some(&self.0[i].1),
            Err(_) => None,
        }
    }

    fn get_mut(&mut self, k: &I) -> Option<&mut ViewRecord<I>> {
        match self.find(k) {
            Ok(i) => Some(&mut self.0[i].1),
            Err(_) => None,
        }
    }

    fn insert(&mut self, k: I, v: ViewRecord<I>) {
        match self.find(&k) {
            Ok(i) => self.0[i].1 = v,
            Err(i) => self.0.insert(i, (k, v)),
        }
    }

    fn remove(&mut self, k: &I) {
        if let Ok(i) = self.find(k) {
            self.0.remove(i);
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&I, &ViewRecord<I>)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    fn keys(&self) -> impl Iterator<Item = &I> {
        self.0.iter().map(|(k, _)| k)
    }

    fn values(&self) -> impl Iterator<Item = &ViewRecord<I>> {
        self.0.iter().map(|(_, v)| v)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut ViewRecord<I>> {
        self.0.iter_mut().map(|(_, v)| v)
    }
}

/// What the partial view holds about one address.
#[derive(Clone, Debug)]
struct ViewRecord<I> {
    info: Option<Peer<I>>,
    /// A bootstrap address: kept through trims and forgets.
    boot: bool,
    age: u32,
    seq: u64,
    /// Measured round-trip time ([`Input::Rtt`]).
    rtt_us: Option<u64>,
}

#[derive(Clone, Debug)]
struct Parent<I> {
    addr: I,
    name: I,
    depth: u32,
    root_path: Vec<I>,
    /// Its zone class against this node's ([`Overlay::zone_class`]), from the view.
    zone_class: u8,
}

/// The join or move under way: nothing, sampling candidates, or attaching to one.
#[derive(Clone, Debug)]
enum Step<I> {
    Idle,
    Probing {
        asked: BTreeSet<I>,
        since: u64,
        rebalance: bool,
    },
    Attaching {
        addr: I,
        since: u64,
        moving: bool,
        referrals: u32,
        reason: Reason,
        /// What the subscription told the new parent.
        report: Report,
        /// A move for latency: to a parent in this node's zone, at no cost in depth.
        nearer: bool,
    },
}

/// One node's overlay state.
pub struct Overlay<I = String> {
    cfg: OverlayConfig,
    name: I,
    addr: I,
    core: bool,
    view: View<I>,
    bootstrap: Vec<I>,
    parent: Option<Parent<I>>,
    step: Step<I>,
    /// Registered children by name ([`Input::ChildAdded`] to [`Input::ChildRemoved`]).
    children: BTreeMap<I, Child<I>>,
    /// What the current parent last heard of this node (None: no parent).
    reported: Option<Report>,
    /// Depth before the parent was lost, until the node is attached again.
    lost_depth: Option<u32>,
    /// Where a joiner starting at a core would land (the shallowest room of the tree, as
    /// the cores last advertised it; `u32::MAX` while unknown).
    core_landing: u32,
    zone: Option<I>,
    next_shuffle: u64,
    next_rebalance: u64,
    reason: Reason,
    reparents: BTreeMap<Reason, u64>,
    learned: u64,
    fruitless: u32,
    probe_after: u64,
    idle_rebalances: u32,
    stable_shuffles: u32,
    banned: BTreeMap<I, u64>,
    /// Full nodes that refused this join since the last probe (not tried again until then).
    refused: BTreeSet<I>,
    /// This node's advertisement, built on first use after each change of place.
    me: std::sync::OnceLock<Peer<I>>,
}

impl<I: Id> Overlay<I> {
    /// A node called `name`, reachable at `addr`. Core nodes never attach; relays start
    /// from `bootstrap` addresses (core nodes or any relays).
    pub fn new(cfg: OverlayConfig, name: I, addr: I, core: bool, bootstrap: Vec<I>) -> Self {
        let mut view = View::default();
        for b in &bootstrap {
            if *b != addr {
                view.insert(
                    b.clone(),
                    ViewRecord {
                        info: None,
                        boot: true,
                        age: 0,
                        seq: 0,
                        rtt_us: None,
                    },
                );
            }
        }
        Self {
            cfg,
            name,
            addr,
            core,
            view,
            bootstrap,
            parent: None,
            step: Step::Idle,
            children: BTreeMap::new(),
            reported: None,
            lost_depth: None,
            core_landing: u32::MAX,
            zone: None,
            next_shuffle: 0,
            next_rebalance: 0,
            reason: Reason::Join,
            reparents: BTreeMap::new(),
            learned: 0,
            fruitless: 0,
            probe_after: 0,
            idle_rebalances: 0,
            stable_shuffles: 0,
            banned: BTreeMap::new(),
            refused: BTreeSet::new(),
            me: std::sync::OnceLock::new(),
        }
    }

    /// The same node in `zone` (a rack or region label, advertised to peers).
    pub fn with_zone(mut self, zone: Option<I>) -> Self {
        self.zone = zone;
        self.me.take();
        self
    }

    pub fn config(&self) -> &OverlayConfig {
        &self.cfg
    }

    /// What this node tells its parent: free slots, the height of its subtree and the
    /// levels down to its shallowest free slot. A child that has not reported counts as a
    /// leaf with room.
    pub fn report(&self) -> Report {
        let free_slots = self.cfg.fanout.saturating_sub(self.children.len() as u32);
        let (mut height, mut below) = (0, u32::MAX);
        for c in self.children.values() {
            let r = c.report.unwrap_or_default();
            height = height.max(r.height + 1);
            below = below.min(r.room + 1);
        }
        let room = if free_slots > 0 || below == u32::MAX {
            0
        } else {
            below
        };
        Report {
            free_slots,
            height: height.min(MAX_HEIGHT),
            room: room.min(MAX_HEIGHT),
        }
    }

    /// Names of the registered children (sorted).
    pub fn children(&self) -> impl Iterator<Item = &I> {
        self.children.keys()
    }

    /// For a driver that keeps its own table of child links and polls it: the inputs that
    /// bring the overlay's children in line with `current` (name, address), removals first.
    pub fn children_changes(&self, current: &[(I, I)]) -> Vec<Input<I>> {
        let now: BTreeMap<&I, &I> = current.iter().map(|(n, a)| (n, a)).collect();
        let mut out: Vec<Input<I>> = self
            .children
            .keys()
            .filter(|n| !now.contains_key(n))
            .map(|n| Input::ChildRemoved { name: n.clone() })
            .collect();
        for (name, addr) in now {
            if self.children.get(name).is_none_or(|c| c.addr != *addr) {
                out.push(Input::ChildAdded {
                    name: name.clone(),
                    addr: addr.clone(),
                    zone: None,
                    report: None,
                });
            }
        }
        out
    }

    /// This node's own advertisement.
    pub fn info(&self) -> PeerInfo<I> {
        let (depth, root_path) = if self.core {
            (Some(0), vec![self.name.clone()])
        } else {
            match &self.parent {
                Some(p) => {
                    let mut path = p.root_path.clone();
                    path.push(self.name.clone());
                    (Some(p.depth.saturating_add(1)), path)
                }
                None => (None, Vec::new()),
            }
        };
        let report = self.report();
        PeerInfo {
            name: self.name.clone(),
            addr: self.addr.clone(),
            depth,
            free_slots: report.free_slots,
            root_path,
            height: report.height,
            room: report.room,
            zone: self.zone.clone(),
        }
    }

    /// [`Overlay::info`], shared and cached until this node's place changes.
    pub fn me(&self) -> Peer<I> {
        Arc::clone(self.me.get_or_init(|| Arc::new(self.info())))
    }

    /// The current parent's address, if attached.
    pub fn parent_addr(&self) -> Option<&I> {
        self.parent.as_ref().map(|p| &p.addr)
    }

    /// The parent's path changed (an ancestor moved): `path` is this node's new root path,
    /// itself included, as announced by the parent's heartbeats.
    pub fn update_path(&mut self, path: &[I]) {
        if let (Some(p), Some((_, parent_path))) = (self.parent.as_mut(), path.split_last()) {
            if !parent_path.is_empty() {
                let depth = (parent_path.len() - 1) as u32;
                if depth != p.depth {
                    self.idle_rebalances = 0;
                }
                // Moved lower with its subtree (an ancestor re-attached): look for a better
                // place at the next tick rather than on the timer.
                if depth > p.depth {
                    self.next_rebalance = 1;
                }
                p.depth = depth;
                p.root_path = parent_path.to_vec();
                self.me.take();
            }
        }
    }

    /// The current parent's name, if attached.
    pub fn parent_name(&self) -> Option<&I> {
        self.parent.as_ref().map(|p| &p.name)
    }

    /// Depth in the tree (0 for core nodes), if attached.
    pub fn depth(&self) -> Option<u32> {
        if self.core {
            Some(0)
        } else {
            self.parent.as_ref().map(|p| p.depth.saturating_add(1))
        }
    }

    /// Re-parent counts by reason.
    pub fn reparents(&self) -> &BTreeMap<Reason, u64> {
        &self.reparents
    }

    /// Peers in the view that may serve chunks of a transfer to this node: attached (they
    /// hold a verified copy or are fetching one), not below it, not banned, not its parent
    /// (which serves the transfer's push), and not a core node (depth 0: the uplink the
    /// tree exists to spare). Sorted by address.
    pub fn fetch_sources(&self) -> Vec<I> {
        let parent = self.parent_addr();
        self.view
            .values()
            .filter_map(|e| e.info.as_ref())
            .filter(|p| self.is_eligible(p) && p.depth != Some(0) && Some(&p.addr) != parent)
            .map(|p| p.addr.clone())
            .collect()
    }

    /// Addresses currently in the view (sorted).
    pub fn view_addrs(&self) -> Vec<I> {
        self.view.keys().cloned().collect()
    }

    /// The earliest time (ms) at which an [`Input::Tick`] would do something: a probe or
    /// attach timing out, a shuffle, a rebalance check, or a join attempt. Drivers may tick
    /// periodically instead; a driver that sleeps until this deadline must ask again after
    /// every call to [`Overlay::handle`] or [`Overlay::answer_sample`], since inputs move it.
    /// A value at or before the current time means "tick now".
    pub fn poll_timeout(&self) -> u64 {
        let mut at = self.next_shuffle;
        match &self.step {
            Step::Probing { since, .. } => at = at.min(since + self.cfg.probe_timeout_ms),
            Step::Attaching { since, .. } => at = at.min(since + self.cfg.attach_timeout_ms),
            Step::Idle if self.core => {}
            Step::Idle if self.parent.is_some() => at = at.min(self.next_rebalance),
            Step::Idle if self.has_candidate() => at = 0,
            Step::Idle => at = at.min(self.probe_after),
        }
        at
    }

    fn has_candidate(&self) -> bool {
        self.view
            .values()
            .filter_map(|e| e.info.as_ref())
            .any(|p| self.is_target(p))
    }

    /// Where a join may start: any attached node, full or not (a full one refers the joiner
    /// down to its children), except those that refused this join already.
    fn is_target(&self, p: &Peer<I>) -> bool {
        self.is_eligible(p) && !self.refused.contains(&p.addr)
    }

    /// A peer this node could hang below at all: attached, not itself, not below it, and not
    /// banned as faulty.
    fn is_eligible(&self, p: &Peer<I>) -> bool {
        p.depth.is_some()
            && p.addr != self.addr
            && !p.root_path.contains(&self.name)
            && !self.banned.contains_key(&p.addr)
    }

    /// The depth this node would get starting at `p`: a full node refers it down to its
    /// shallowest room, `room` levels below (at least one).
    fn landing(p: &PeerInfo<I>) -> u32 {
        let down = if p.free_slots == 0 { p.room.max(1) } else { 0 };
        p.depth.unwrap_or(u32::MAX).saturating_add(1 + down)
    }

    /// How near `p` is: its zone (the same as this node's, unknown, another), then the
    /// measured RTT (unmeasured last).
    fn nearness(&self, p: &PeerInfo<I>, rtt_us: Option<u64>) -> (u8, u64) {
        let zone = match (&self.zone, &p.zone) {
            (Some(a), Some(b)) if a == b => 0,
            (Some(_), Some(_)) => 2,
            _ => 1,
        };
        (zone, rtt_us.unwrap_or(u64::MAX))
    }

    /// The best place among `cands`: the shallowest landing, except that one in this
    /// node's zone within `latency_slack` levels of it wins over one elsewhere; then the
    /// lower RTT, free before full, more free slots, the lower address.
    fn best<'a>(&self, cands: &[(&'a Peer<I>, Option<u64>)]) -> Option<&'a Peer<I>> {
        let top = cands.iter().map(|(p, _)| Self::landing(p)).min()?;
        let slack = top.saturating_add(self.cfg.latency_slack);
        cands
            .iter()
            .filter(|(p, _)| Self::landing(p) <= slack)
            .min_by_key(|(p, rtt)| {
                let (zone, rtt) = self.nearness(p, *rtt);
                (
                    zone,
                    Self::landing(p),
                    rtt,
                    p.free_slots == 0,
                    std::cmp::Reverse(p.free_slots),
                    &p.addr,
                )
            })
            .map(|(p, _)| *p)
    }

    /// Levels a move must gain: `subtree_min_gain` when this node brings a subtree along,
    /// or when it hangs more than a level below the shallowest room the cores advertise
    /// (where a packed tree would have it); else `rebalance_min_gain`.
    fn min_gain(&self) -> u32 {
        if self.children.is_empty() && !self.too_deep() {
            self.cfg.rebalance_min_gain
        } else {
            self.cfg.subtree_min_gain
        }
    }

    /// Whether this node hangs more than a level below the shallowest room the cores
    /// advertise.
    fn too_deep(&self) -> bool {
        self.depth()
            .is_some_and(|d| d > self.core_landing.saturating_add(1))
    }

    /// After a move that did not happen: a node still too deep checks again soon (the
    /// place it tried was stale; the view may hold another).
    fn retry_move(&mut self, now: u64) {
        if self.too_deep() {
            self.next_rebalance = now + self.cfg.probe_backoff_ms;
        }
    }

    /// Recomputes [`Overlay::core_landing`] from the bootstrap entries (a full core that
    /// did not say where its room is tells nothing).
    fn refresh_core_landing(&mut self) {
        self.core_landing = self
            .view
            .values()
            .filter(|e| e.boot)
            .filter_map(|e| e.info.as_ref())
            .filter(|p| p.depth == Some(0) && (p.free_slots > 0 || p.room > 0))
            .map(|p| Self::landing(p))
            .min()
            .unwrap_or(u32::MAX);
    }

    /// Whether a parent at `depth` puts this node [`Self::min_gain`] levels nearer the core.
    fn gains(&self, depth: u32) -> bool {
        let gain = self.min_gain();
        self.depth()
            .is_some_and(|mine| depth.saturating_add(1 + gain) <= mine)
    }

    /// Whether a move to a parent at `depth` is worth it: it gains enough, or, for a move
    /// for latency (`nearer`), it costs no depth.
    fn move_ok(&self, depth: u32, nearer: bool) -> bool {
        self.gains(depth) || (nearer && self.depth().is_some_and(|mine| depth < mine))
    }

    /// Whether this node keeps a move to a parent that answered with `depth` and `root_path`:
    /// the path does not hold this node and the move gains enough (or, for a move to a
    /// parent in its zone, costs no depth). A driver doing make-before-break asks before it
    /// switches; [`Input::Attached`] applies the same test.
    pub fn keeps_move(&self, depth: u32, root_path: &[I]) -> bool {
        let nearer = matches!(self.step, Step::Attaching { nearer: true, .. });
        !root_path.contains(&self.name) && self.move_ok(depth, nearer)
    }

    /// The zone class of `p` against this node's: 0 the same, 1 unknown, 2 another.
    fn zone_class(&self, p: &PeerInfo<I>) -> u8 {
        self.nearness(p, None).0
    }

    /// For a node whose parent is in another zone, with `latency_slack` above 0: the best
    /// place in its own zone that costs no depth.
    fn nearer_place(&self) -> Option<Peer<I>> {
        if self.cfg.latency_slack == 0 || self.zone.is_none() {
            return None;
        }
        let parent = self.parent.as_ref()?;
        if parent.zone_class != 2 {
            return None;
        }
        let limit = self.depth()?;
        let near = |p: &Peer<I>| {
            self.is_eligible(p)
                && p.addr != parent.addr
                && self.zone_class(p) == 0
                && Self::landing(p) <= limit
        };
        self.best(&self.known(near)).map(Arc::clone)
    }

    /// Answer a sample request from a peer that offered `offer` (its own info first): merge
    /// the offer and return our info and up to `shuffle_len` random peers we know.
    pub fn answer_sample<R: Rng>(
        &mut self,
        offer: Vec<Peer<I>>,
        rng: &mut R,
    ) -> (Peer<I>, Vec<Peer<I>>) {
        let peers = self.sample_known(rng);
        for p in offer {
            self.learn(p);
        }
        (self.me(), peers)
    }

    /// Whether to serve `name` (a subscriber in `zone`) as a child. Refuses this node
    /// itself or one of its ancestors, and refuses when `fanout` children are registered,
    /// referring it to one child: one reported with a free slot, else one not reported
    /// yet, else any (its own referral goes a level further down, so a joiner descends
    /// towards the shallowest room); among those, one in the subscriber's zone, then
    /// random. A registered child subscribing again is accepted (its new link replaces
    /// the old). On [`Admit::Accept`] feed [`Input::ChildAdded`] before the next call.
    pub fn admit<R: Rng>(&self, name: &I, zone: Option<&I>, rng: &mut R) -> Admit<I> {
        let on_path = match (&self.parent, self.core) {
            (Some(p), false) => p.root_path.contains(name),
            _ => false,
        };
        if *name == self.name || on_path {
            return Admit::Refuse {
                reason: Refusal::OnRootPath,
                referral: None,
            };
        }
        let fanout = self.cfg.fanout;
        if (self.children.len() as u32) < fanout || self.children.contains_key(name) {
            return Admit::Accept;
        }
        Admit::Refuse {
            reason: Refusal::Full {
                children: self.children.len() as u32,
                fanout,
            },
            referral: self.referral(zone, rng),
        }
    }

    /// One registered child for a subscriber in `zone` that found this node full.
    fn referral<R: Rng>(&self, zone: Option<&I>, rng: &mut R) -> Option<Peer<I>> {
        let room = |c: &Child<I>| match c.report {
            Some(r) if r.free_slots > 0 => (0, false),
            None => (0, true),
            Some(r) => (r.room.max(1), false),
        };
        let away = |c: &Child<I>| u8::from(zone.is_none() || c.zone.as_ref() != zone);
        let key = |c: &Child<I>| {
            let (levels, unknown) = room(c);
            if self.cfg.latency_slack > 0 {
                (away(c), levels, unknown, 0)
            } else {
                (0, levels, unknown, away(c))
            }
        };
        let top = self.children.values().map(key).min()?;
        let best: Vec<(&I, &Child<I>)> = self
            .children
            .iter()
            .filter(|(_, c)| key(c) == top)
            .collect();
        let (name, c) = best.choose(rng)?;
        let me = self.info();
        let mut root_path = me.root_path;
        root_path.push((*name).clone());
        let report = c.report.unwrap_or_default();
        Some(Arc::new(PeerInfo {
            name: (*name).clone(),
            addr: c.addr.clone(),
            depth: me.depth.map(|d| d + 1),
            free_slots: report.free_slots,
            root_path,
            height: report.height,
            room: report.room,
            zone: c.zone.clone(),
        }))
    }

    fn sample_known<R: Rng>(&self, rng: &mut R) -> Vec<Peer<I>> {
        self.view
            .values()
            .filter_map(|e| e.info.as_ref())
            .choose_multiple(rng, self.cfg.shuffle_len)
            .into_iter()
            .map(Arc::clone)
            .collect()
    }

    fn offer<R: Rng>(&self, rng: &mut R) -> Vec<Peer<I>> {
        let mut offer = vec![self.me()];
        offer.extend(self.sample_known(rng));
        offer
    }

    fn learn(&mut self, p: Peer<I>) {
        if p.addr == self.addr {
            return;
        }
        self.learned += 1;
        let seq = self.learned;
        // A place worth moving to: check at the next tick rather than on the timer.
        if self.parent.is_some() && self.next_rebalance > 1 && self.is_candidate(&p) {
            self.next_rebalance = 1;
        }
        if let Some(e) = self.view.get_mut(&p.addr) {
            // The same advert again (the peer's place has not changed): keeping the one
            // held spares touching a second record.
            if !e.info.as_ref().is_some_and(|held| Arc::ptr_eq(held, &p)) {
                e.info = Some(p);
            }
            e.age = 0;
            e.seq = seq;
            if e.boot {
                self.refresh_core_landing();
            }
            return;
        }
        self.view.insert(
            p.addr.clone(),
            ViewRecord {
                info: Some(p),
                boot: false,
                age: 0,
                seq,
                rtt_us: None,
            },
        );
        self.trim();
    }

    fn trim(&mut self) {
        while self.view.len() > self.cfg.view_size {
            let parent = self.parent.as_ref().map(|p| &p.addr);
            let oldest = self
                .view
                .iter()
                .filter(|(a, e)| !e.boot && Some(*a) != parent)
                .max_by_key(|(_, e)| (e.age, std::cmp::Reverse(e.seq)))
                .map(|(a, _)| a.clone());
            match oldest {
                Some(a) => {
                    self.view.remove(&a);
                }
                None => break,
            }
        }
    }

    /// A place a move could go: eligible, not the current parent, and landing there (down
    /// its referrals when it is full) gains enough.
    /// A full peer that did not say where its room is (a room of 0) is no place to move
    /// to. Leaving a parent in this node's zone for one elsewhere must also gain the
    /// `latency_slack` that moves for latency may lose, or the two kinds of move undo each
    /// other.
    fn is_candidate(&self, p: &Peer<I>) -> bool {
        let Some(parent) = self.parent.as_ref() else {
            return self.is_eligible(p) && self.gains(Self::landing(p).saturating_sub(1));
        };
        let extra = if parent.zone_class == 0 && self.zone_class(p) != 0 {
            self.cfg.latency_slack
        } else {
            0
        };
        // No place is shallower than the cores' shallowest room: an advert that says so is
        // stale, and a move to it would end in refusals.
        let floor = if self.core_landing == u32::MAX {
            0
        } else {
            self.core_landing
        };
        let landing = Self::landing(p).max(floor);
        (p.free_slots > 0 || p.room > 0)
            && self.gains(landing.saturating_sub(1).saturating_add(extra))
            && p.addr != parent.addr
            && self.is_eligible(p)
    }

    /// Peers of the view passing `keep`, with their measured RTT.
    fn known(&self, keep: impl Fn(&Peer<I>) -> bool) -> Vec<(&Peer<I>, Option<u64>)> {
        self.view
            .values()
            .filter_map(|e| e.info.as_ref().map(|i| (i, e.rtt_us)))
            .filter(|(p, _)| keep(p))
            .collect()
    }

    /// Power of d choices: sample `choices` join targets and keep the best place
    /// ([`Self::best`]). A node that brings a subtree along compares every target it knows
    /// instead: its choice sets the depth of the whole subtree, and it is rare.
    fn choose<R: Rng>(&self, rng: &mut R) -> Option<Peer<I>> {
        let mut cands = self.known(|p| self.is_target(p));
        if self.cfg.latency_slack > 0 && self.zone.is_some() {
            // The d choices are drawn from the nearest zone class among the targets within
            // the slack of the shallowest.
            let top = cands.iter().map(|(p, _)| Self::landing(p)).min()?;
            let limit = top.saturating_add(self.cfg.latency_slack);
            cands.retain(|(p, _)| Self::landing(p) <= limit);
            let class = cands.iter().map(|(p, _)| self.zone_class(p)).min()?;
            cands.retain(|(p, _)| self.zone_class(p) == class);
        }
        let k = if self.children.is_empty() {
            self.cfg.choices
        } else {
            cands.len()
        };
        let picked: Vec<(&Peer<I>, Option<u64>)> = cands.choose_multiple(rng, k).copied().collect();
        self.best(&picked).map(Arc::clone)
    }

    /// For a rebalance: the best place the view holds among those that gain enough (a
    /// move is rare, so it takes the best rather than a power-of-d pick).
    fn shallowest(&self) -> Option<Peer<I>> {
        self.best(&self.known(|p| self.is_candidate(p)))
            .map(Arc::clone)
    }

    fn probe<R: Rng>(&mut self, now: u64, rebalance: bool, rng: &mut R) -> Vec<Output<I>> {
        let addrs: Vec<I> = self.view.keys().cloned().collect();
        let asked: BTreeSet<I> = addrs
            .choose_multiple(rng, self.cfg.choices.max(2))
            .cloned()
            .collect();
        if asked.is_empty() {
            self.probe_after = now + self.cfg.probe_backoff_ms;
            return Vec::new();
        }
        let offer = self.offer(rng);
        self.step = Step::Probing {
            asked: asked.clone(),
            since: now,
            rebalance,
        };
        asked
            .into_iter()
            .map(|addr| Output::RequestSample {
                addr,
                offer: offer.clone(),
            })
            .collect()
    }

    fn attach(
        &mut self,
        now: u64,
        addr: I,
        moving: bool,
        nearer: bool,
        referrals: u32,
    ) -> Vec<Output<I>> {
        let reason = if moving {
            Reason::Rebalance
        } else {
            self.reason
        };
        let report = self.report();
        self.step = Step::Attaching {
            addr: addr.clone(),
            since: now,
            moving,
            referrals,
            reason,
            report,
            nearer,
        };
        vec![Output::Attach {
            addr,
            moving,
            reason,
            report,
        }]
    }

    /// Unattached and idle: attach to a choice if there is one, else probe for fresh info
    /// (unless a fruitless probe asked to wait until `probe_after`).
    fn seek<R: Rng>(&mut self, now: u64, rng: &mut R) -> Vec<Output<I>> {
        if self.core || self.parent.is_some() || !matches!(self.step, Step::Idle) {
            return Vec::new();
        }
        if self.fruitless > 0 && now >= self.probe_after {
            self.refused.clear();
        }
        match self.choose(rng) {
            Some(best) => self.attach(now, best.addr.clone(), false, false, 0),
            None if now >= self.probe_after => self.probe(now, false, rng),
            None => Vec::new(),
        }
    }

    fn finish_probe<R: Rng>(&mut self, now: u64, rebalance: bool, rng: &mut R) -> Vec<Output<I>> {
        self.step = Step::Idle;
        if !rebalance {
            if self.core || self.parent.is_some() {
                return Vec::new();
            }
            return match self.choose(rng) {
                Some(best) => self.attach(now, best.addr.clone(), false, false, 0),
                None => {
                    // Nothing new: wait, then try again, the nodes that refused included.
                    let backoff = self.cfg.probe_backoff_ms << self.fruitless.min(4);
                    self.fruitless += 1;
                    self.probe_after = now + backoff / 2 + rng.random_range(0..=backoff / 2);
                    Vec::new()
                }
            };
        }
        if self.depth().is_none() {
            return self.seek(now, rng);
        }
        if let Some(best) = self.shallowest() {
            return self.attach(now, best.addr.clone(), true, false, 0);
        }
        match self.nearer_place() {
            Some(best) => self.attach(now, best.addr.clone(), true, true, 0),
            None => {
                self.idle_rebalances += 1;
                Vec::new()
            }
        }
    }

    /// `addr` refused: it is full, and without a referral its room is unknown too.
    fn mark_full(&mut self, addr: &I, referred: bool) {
        if let Some(e) = self.view.get_mut(addr) {
            if let Some(i) = e.info.as_mut() {
                let i = Arc::make_mut(i);
                i.free_slots = 0;
                if !referred {
                    i.room = 0;
                }
            }
            if e.boot {
                self.refresh_core_landing();
            }
        }
    }

    fn forget(&mut self, addr: &I) {
        if !self.bootstrap.iter().any(|b| b == addr) {
            self.view.remove(addr);
        } else if let Some(e) = self.view.get_mut(addr) {
            e.info = None;
            self.refresh_core_landing();
        }
    }

    /// Feeds one event in and returns what to do next. `now` is in milliseconds on any
    /// monotonic clock; `rng` should be seeded per node for replayable runs.
    pub fn handle<R: Rng>(&mut self, now: u64, input: Input<I>, rng: &mut R) -> Vec<Output<I>> {
        let mut out = self.step(now, input, rng);
        if self.parent.is_some() {
            let report = self.report();
            if self.reported != Some(report) {
                self.reported = Some(report);
                out.push(Output::Report(report));
            }
        }
        out
    }

    fn step<R: Rng>(&mut self, now: u64, input: Input<I>, rng: &mut R) -> Vec<Output<I>> {
        let mut out = Vec::new();
        match input {
            Input::Tick => {
                self.banned.retain(|_, until| *until > now);
                match self.step.clone() {
                    Step::Probing {
                        since, rebalance, ..
                    } if now >= since + self.cfg.probe_timeout_ms => {
                        out.extend(self.finish_probe(now, rebalance, rng));
                    }
                    Step::Attaching {
                        addr,
                        since,
                        moving,
                        ..
                    } if now >= since + self.cfg.attach_timeout_ms => {
                        self.step = Step::Idle;
                        self.forget(&addr);
                        if !moving {
                            out.extend(self.seek(now, rng));
                        }
                    }
                    _ => {}
                }
                if self.core {
                    if now >= self.next_shuffle {
                        self.next_shuffle = now + self.cfg.shuffle_ms;
                        for e in self.view.values_mut() {
                            e.age += 1;
                        }
                    }
                    return out;
                }
                if now >= self.next_shuffle {
                    let period = self.cfg.shuffle_ms << self.stable_shuffles.min(3);
                    self.next_shuffle = now + period;
                    if self.parent.is_some() {
                        self.stable_shuffles += 1;
                    }
                    for e in self.view.values_mut() {
                        e.age += 1;
                    }
                    if matches!(self.step, Step::Idle) && self.parent.is_some() {
                        let oldest = self
                            .view
                            .iter()
                            .max_by_key(|(_, e)| (e.age, std::cmp::Reverse(e.seq)))
                            .map(|(a, _)| a.clone());
                        if let Some(addr) = oldest {
                            out.push(Output::RequestSample {
                                addr,
                                offer: self.offer(rng),
                            });
                        }
                    }
                }
                if self.parent.is_some() && matches!(self.step, Step::Idle) {
                    if self.next_rebalance == 0 {
                        self.next_rebalance = now + self.jitter(rng);
                    } else if now >= self.next_rebalance {
                        self.next_rebalance = now + self.jitter(rng);
                        // The shuffles keep the view fresh: a check reads it, sending nothing.
                        let nearer = self.cfg.latency_slack > 0 && self.zone.is_some();
                        if nearer || self.depth().unwrap_or(0) > self.min_gain() {
                            out.extend(self.finish_probe(now, true, rng));
                        }
                    }
                }
                out.extend(self.seek(now, rng));
            }
            Input::Sampled { addr, info, peers } => {
                if info.addr == addr {
                    self.learn(info);
                } else {
                    self.forget(&addr);
                    self.learn(info);
                }
                for p in peers {
                    self.learn(p);
                }
                out.extend(self.answered(now, &addr, rng));
            }
            Input::SampleFailed { addr } => {
                self.forget(&addr);
                out.extend(self.answered(now, &addr, rng));
            }
            Input::Attached {
                addr,
                name,
                depth,
                root_path,
            } => {
                let (moving, nearer, reason, report) = match &self.step {
                    Step::Attaching {
                        addr: a,
                        moving,
                        nearer,
                        reason,
                        report,
                        ..
                    } if *a == addr => (*moving, *nearer, *reason, Some(*report)),
                    _ if self.parent.as_ref().is_some_and(|p| p.addr != addr) => {
                        out.push(Output::Detach { addr });
                        return out;
                    }
                    _ => (false, false, self.reason, None),
                };
                self.step = Step::Idle;
                if root_path.contains(&self.name) {
                    self.forget(&addr);
                    out.push(Output::Detach { addr });
                    if !moving {
                        self.set_parent(now, None);
                        out.extend(self.seek(now, rng));
                    }
                    return out;
                }
                // A move is checked again against the parent's depth as it answered: the
                // view's depth may be stale, and two moves made on stale depths can close a
                // cycle (the runtime then breaks it on the next heartbeat).
                if moving && !self.move_ok(depth, nearer) {
                    if let Some(Some(i)) = self.view.get_mut(&addr).map(|e| e.info.as_mut()) {
                        Arc::make_mut(i).depth = Some(depth);
                    }
                    out.push(Output::Detach { addr });
                    self.retry_move(now);
                    return out;
                }
                *self.reparents.entry(reason).or_default() += 1;
                // Re-attached deeper than before: look for a better place at the next tick
                // rather than on the timer.
                if self.lost_depth.take().is_some_and(|lost| depth + 1 > lost) {
                    self.next_rebalance = 1;
                }
                self.fruitless = 0;
                self.probe_after = 0;
                self.idle_rebalances = 0;
                self.set_parent(
                    now,
                    Some(Parent {
                        zone_class: self
                            .view
                            .get(&addr)
                            .and_then(|e| e.info.as_ref())
                            .map_or(1, |i| self.zone_class(i)),
                        addr: addr.clone(),
                        name,
                        depth,
                        root_path,
                    }),
                );
                self.reason = Reason::ParentLost;
                self.reported = report;
                if self.too_deep() {
                    self.next_rebalance = 1;
                }
                if let Some(e) = self.view.get_mut(&addr) {
                    if let Some(i) = e.info.as_mut() {
                        let i = Arc::make_mut(i);
                        i.free_slots = i.free_slots.saturating_sub(1);
                        i.depth = Some(depth);
                    }
                }
            }
            Input::Refused { addr, referral } => {
                let (moving, nearer, referrals) = match &self.step {
                    Step::Attaching {
                        addr: a,
                        moving,
                        nearer,
                        referrals,
                        ..
                    } if *a == addr => (*moving, *nearer, *referrals),
                    _ => return out,
                };
                self.step = Step::Idle;
                self.mark_full(&addr, referral.is_some());
                if !moving {
                    self.refused.insert(addr.clone());
                }
                let gains = |r: &PeerInfo<I>| {
                    !moving
                        || r.depth.is_some_and(|d| self.gains(d))
                        || (nearer
                            && self.zone_class(r) == 0
                            && r.depth.is_some_and(|d| self.move_ok(d, true)))
                };
                match referral {
                    Some(r)
                        if referrals < self.cfg.max_referrals
                            && r.addr != self.addr
                            && !r.root_path.contains(&self.name)
                            && gains(&r) =>
                    {
                        let addr = r.addr.clone();
                        self.learn(r);
                        out.extend(self.attach(now, addr, moving, nearer, referrals + 1));
                    }
                    _ if !moving => out.extend(self.seek(now, rng)),
                    _ => self.retry_move(now),
                }
            }
            Input::AttachFailed { addr } => {
                if matches!(&self.step, Step::Attaching { addr: a, .. } if *a == addr) {
                    let moving = matches!(self.step, Step::Attaching { moving: true, .. });
                    self.step = Step::Idle;
                    self.forget(&addr);
                    if !moving {
                        out.extend(self.seek(now, rng));
                    } else {
                        self.retry_move(now);
                    }
                }
            }
            Input::ParentLost { addr } => {
                if self.parent.as_ref().is_some_and(|p| p.addr == addr) {
                    self.lost_depth = self.depth();
                    self.set_parent(now, None);
                    self.forget(&addr);
                    self.reason = Reason::ParentLost;
                    if matches!(self.step, Step::Attaching { moving: true, .. }) {
                        if let Step::Attaching { moving, .. } = &mut self.step {
                            *moving = false;
                        }
                    } else {
                        self.step = Step::Idle;
                    }
                    out.extend(self.seek(now, rng));
                }
            }
            Input::ChildAdded {
                name,
                addr,
                zone,
                report,
            } => {
                let report = report.map(|r| self.clamp(r));
                self.children.insert(name, Child { addr, zone, report });
                self.me.take();
            }
            Input::ChildReport { name, report } => {
                let report = self.clamp(report);
                if let Some(c) = self.children.get_mut(&name) {
                    c.report = Some(report);
                    self.me.take();
                }
            }
            Input::ChildRemoved { name } => {
                if self.children.remove(&name).is_some() {
                    self.me.take();
                }
            }
            Input::Rtt { addr, rtt_us } => {
                if let Some(e) = self.view.get_mut(&addr) {
                    e.rtt_us = Some(rtt_us);
                }
            }
            Input::Faulty { addr } => {
                self.banned.insert(addr, now + self.cfg.faulty_ban_ms);
            }
        }
        out
    }

    /// A child's report within the documented limits.
    fn clamp(&self, r: Report) -> Report {
        Report {
            free_slots: r.free_slots.min(self.cfg.fanout),
            height: r.height.min(MAX_HEIGHT),
            room: r.room.min(MAX_HEIGHT),
        }
    }

    /// Every change of parent goes through here: the advertisement is rebuilt and shuffles
    /// return to their base period.
    fn set_parent(&mut self, now: u64, parent: Option<Parent<I>>) {
        if parent.is_none() {
            self.reported = None;
        }
        self.parent = parent;
        self.refused.clear();
        self.me.take();
        self.stable_shuffles = 0;
        self.next_shuffle = self.next_shuffle.min(now + self.cfg.shuffle_ms);
    }

    fn answered<R: Rng>(&mut self, now: u64, addr: &I, rng: &mut R) -> Vec<Output<I>> {
        if let Step::Probing {
            asked, rebalance, ..
        } = &mut self.step
        {
            asked.remove(addr);
            if asked.is_empty() {
                let rebalance = *rebalance;
                return self.finish_probe(now, rebalance, rng);
            }
        }
        Vec::new()
    }

    fn jitter<R: Rng>(&self, rng: &mut R) -> u64 {
        let period = self.cfg.rebalance_ms << self.idle_rebalances.min(3);
        period / 2 + rng.random_range(0..=period)
    }
}

#[cfg(test)]
#[path = "overlay_tests.rs"]
mod tests;
