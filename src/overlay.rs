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
//! - A node moves for depth only when the new parent puts it at least `rebalance_min_gain`
//!   levels nearer the root, or `subtree_min_gain` levels when it brings a subtree along.
//!   With zones it also moves across zones: into its own zone (down to the fill below), or,
//!   from a parent in a third zone, into a core's zone no deeper than now; the new parent's
//!   answer is held to the same limit as the choice. Moves end (no flapping): each one either
//!   lowers the node's depth, or turns its edge into one inside its zone, or moves it from a
//!   third zone to a core's at no cost in depth, and none of them undoes another.
//! - [`Overlay::admit`] accepts a child only while fewer than `fanout` children are
//!   registered ([`Input::ChildAdded`] to [`Input::ChildRemoved`]), and never a node on this
//!   node's own root path: a driver that registers each accepted child before the next
//!   `admit` never serves more than `fanout`.
//! - Latency only orders candidates whose landing depth is within `latency_slack` levels of
//!   the shallowest one sampled, or (a place in the node's zone) no deeper than a level
//!   below the deepest room the cores advertised (with `fill_zones_to_bound`, the depth
//!   bound of the tree's size as the cores report it, at most a level deeper), less the
//!   height of the node's subtree; with 0 it only breaks ties of depth and zones have no
//!   say.
//! - With zones, a move for depth never leaves a parent in the node's zone for one elsewhere
//!   unless the node hangs beyond that fill. Outside its zone a place in a core's zone ranks
//!   before one in a third (`zone_rank`): its path from the core has usually
//!   crossed no zone yet.
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
    /// Mean period of view shuffles (ms), jittered ±50 %. 2000: views stay fresh without
    /// chatter. It doubles after each shuffle while the node keeps its parent (up to 64×,
    /// about 2 min: [`MAX_SHUFFLE_DOUBLINGS`]) and drops back when the parent changes: a
    /// settled tree goes quiet, a moving one stays fresh. The jitter keeps nodes that
    /// attached together from shuffling together.
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
    /// still win (a measured RTT only ever breaks ties of depth). A place in the zone also
    /// wins down to a level below the deepest room the cores advertised (less the height
    /// of the subtree the node brings), where a packed tree may have its deepest node, or
    /// down to the depth bound with [`OverlayConfig::fill_zones_to_bound`]. 1: with 3 zones
    /// at 10k nodes, the p99 latency from the core is 4.4× lower than by depth alone when
    /// relays join one by one and 2.7× under churn, and the edges between zones 6 to 87
    /// times fewer, within the depth bound (docs/topology.md). 0 turns zones off. No effect
    /// without zones.
    pub latency_slack: u32,
    /// With zones: count subtree sizes in the reports ([`Report::size`]) and let a place in
    /// this node's zone win down to the depth bound of the tree's size (less the height of
    /// the subtree it brings) instead of a level below the cores' room. false: the depth
    /// bound first. With it, 10k nodes in 3 zones (docs/topology.md) have 12 edges between
    /// zones instead of 77 when relays join one by one and 444 instead of 1011 under
    /// 5 %/min churn, the same p99 latency, for 10 % more messages; but the zones then fill
    /// the tree down to the bound, and under churn 6 end snapshots of 20 catch 1 to 3 nodes
    /// a level past it while they move, against 1 of 20. For fleets that pay for traffic
    /// between zones. Every node should have the same setting.
    pub fill_zones_to_bound: bool,
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

/// How many times the shuffle period doubles while a node keeps its parent. 6 (64×, 128 s
/// at the default `shuffle_ms`): each shuffle is a new connection, a TLS handshake and a
/// dozen wake-ups at both ends; capped at 8× (16 s) they were an eighth of an idle relay's
/// CPU (docs/benchmarks.md, "Idle relay cost"), for views of a tree that did not change. A
/// node that loses its parent shuffles at the base period again.
pub const MAX_SHUFFLE_DOUBLINGS: u32 = 6;

/// How many times the wait before a node still too deep tries to move again doubles while
/// its moves keep failing. 6 (64×, 16 s at the default `probe_backoff_ms`): a place that
/// keeps refusing is one the node cannot have (its room is in another zone, or sought by
/// many), and a retry every 250 ms was a storm of refused subscriptions (10k nodes, 3
/// cores, 3 zones, 5 %/min churn: 2.3 million, docs/topology.md).
pub const MAX_MOVE_BACKOFFS: u32 = 6;

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
            fill_zones_to_bound: false,
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
    /// Nodes in the subtree it serves, itself included, as [`Report::size`] counts them
    /// (0: not known). The cores' sizes add up to the tree's, from which every node knows
    /// the depth bound ([`depth_bound`]).
    pub size: u32,
    /// Zones a core holds free slots for ([`Overlay::with_zone_shares`]), besides the
    /// `free_slots` open to every zone: a subscriber in one of them is admitted, any other
    /// referred down. Sorted; empty for relays and for cores without shares.
    pub held_for: Vec<I>,
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
    /// Nodes in its subtree, itself included: one more than its children's sizes added up
    /// (a child that reported none counts one), rounded down by [`round_size`], so that a
    /// report goes up the tree only when a subtree grows or shrinks by up to an eighth.
    /// Counted by a zoned node with [`OverlayConfig::fill_zones_to_bound`], where it sets
    /// how deep a node may hang in its zone, and by a node whose children report one; 0
    /// otherwise (no report changes, no extra message).
    pub size: u32,
}

/// Largest subtree size a report or advert may claim; a larger one is clamped. 2^24: far
/// beyond any fleet, and a sum of [`MAX_SIZE`]-sized children cannot overflow a `u64`.
pub const MAX_SIZE: u32 = 1 << 24;

/// Significant bits a reported size keeps. 4: sizes below 16 are exact and larger ones
/// lose less than an eighth, so a subtree of 1000 reports again only after 60 joins or
/// leaves or so. The cores' sum errs only low (at worst 0.875^d of the truth, rounded at
/// each of d levels), so the bound from it errs shallow, never deeper than the tree's.
/// Measured at 10k nodes, 3 zones, 5 %/min churn (a first version, docs/topology.md): 4
/// bits cost 93 000 reports against 110 000 with 5 and 124 000 with 6, for the same tree.
pub const SIZE_BITS: u32 = 4;

/// `n` rounded down to [`SIZE_BITS`] significant bits, at most [`MAX_SIZE`].
pub fn round_size(n: u64) -> u32 {
    let n = n.min(u64::from(MAX_SIZE)) as u32;
    let bits = u32::BITS - n.leading_zeros();
    if bits <= SIZE_BITS {
        return n;
    }
    let drop = bits - SIZE_BITS;
    (n >> drop) << drop
}

/// The depth bound for a tree of `nodes` nodes at fan-out `fanout` (at least 2): one level
/// below the deepest node of a packed tree of that size, the `topology-sim` goal (at most
/// ceil(log_fanout nodes) + 1).
pub fn depth_bound(nodes: u64, fanout: u32) -> u32 {
    let k = u64::from(fanout.max(2));
    let (mut depth, mut reach, mut level) = (0u32, 1u64, 1u64);
    while reach < nodes {
        level = level.saturating_mul(k);
        reach = reach.saturating_add(level);
        depth += 1;
    }
    depth + 1
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
    /// This relay has no parent (it has not attached yet, or lost its parent and is
    /// re-attaching): it cannot tell a child its depth or path to the core, and a child
    /// placed under it would sit in a subtree cut off from the core.
    Unattached,
    /// Every slot is taken.
    Full { children: u32, fanout: u32 },
    /// The free slots left are held for other zones ([`Overlay::with_zone_shares`]), and the
    /// subscriber's zone has its share.
    HeldForOtherZones { children: u32, held: u32 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::OnRootPath => f.write_str("the subscriber is on this node's path to the core"),
            Refusal::Unattached => f.write_str("not attached to the tree (no parent)"),
            Refusal::Full { children, fanout } => {
                write!(f, "full: {children} children (fanout {fanout})")
            }
            Refusal::HeldForOtherZones { children, held } => write!(
                f,
                "the {held} free slots left are held for other zones ({children} children)"
            ),
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
    /// Its zone, from the view.
    zone: Option<I>,
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
        /// A move across zones: into this node's zone down to the zone fill, or from a
        /// parent in a third zone into a core's zone no deeper than now.
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
    /// The deepest [`Overlay::core_landing`] known so far (0: none yet): where joiners land
    /// once the tree has grown, which a slot freed for a moment does not lower.
    landing_high: u32,
    /// The deepest [`depth_bound`] of the tree's size as the cores advertised it (the sum
    /// of their [`PeerInfo::size`]), 0 while unknown or without
    /// [`OverlayConfig::fill_zones_to_bound`]: like `landing_high`, a tree that
    /// shrinks for a moment does not lower it.
    bound_high: u32,
    zone: Option<I>,
    /// The zones this core keeps a share of its slots for ([`Overlay::with_zone_shares`]);
    /// sorted, empty for relays.
    shares: Vec<I>,
    /// The zones of the cores among this node's bootstrap entries (a relay started from
    /// relays alone learns none): among places outside its own zone, one in a core's zone
    /// usually adds no second edge between zones to the path.
    core_zones: Vec<I>,
    next_shuffle: u64,
    next_rebalance: u64,
    reason: Reason,
    reparents: BTreeMap<Reason, u64>,
    learned: u64,
    fruitless: u32,
    probe_after: u64,
    idle_rebalances: u32,
    /// Moves in a row that did not happen since the parent last changed
    /// ([`Self::retry_move`]'s backoff).
    failed_moves: u32,
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
            landing_high: 0,
            bound_high: 0,
            zone: None,
            shares: Vec::new(),
            core_zones: Vec::new(),
            next_shuffle: 0,
            next_rebalance: 0,
            reason: Reason::Join,
            reparents: BTreeMap::new(),
            learned: 0,
            fruitless: 0,
            probe_after: 0,
            idle_rebalances: 0,
            failed_moves: 0,
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

    /// The same node, a core, keeping `fanout / zones.len()` of its slots for each of
    /// `zones` until that many children of the zone hold them: a subscriber from a zone at
    /// or over its share takes only a slot no other zone is owed, else it is referred down
    /// (to a child in its own zone). Every zone then has places at depth 1 from the start,
    /// where the cores' own zone, nearest to them, would otherwise fill every slot before
    /// another zone's first subscription arrives and leave each other zone's relays hanging
    /// from it. No effect on a relay, or with more zones than `fanout`.
    pub fn with_zone_shares(mut self, mut zones: Vec<I>) -> Self {
        zones.sort();
        zones.dedup();
        if self.core && zones.len() as u32 <= self.cfg.fanout {
            self.shares = zones;
        }
        self.me.take();
        self
    }

    pub fn config(&self) -> &OverlayConfig {
        &self.cfg
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
            size: report.size,
            held_for: self.held().into_keys().cloned().collect(),
        }
    }

    /// [`Overlay::info`], shared and cached until this node's place changes.
    pub fn me(&self) -> Peer<I> {
        Arc::clone(self.me.get_or_init(|| Arc::new(self.info())))
    }

    /// The zone this node advertises.
    pub fn zone(&self) -> Option<&I> {
        self.zone.as_ref()
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
}

mod children;
mod choice;
mod machine;
mod view;

#[cfg(test)]
#[path = "overlay_tests.rs"]
mod tests;
