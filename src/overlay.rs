//! The self-organizing tree's control plane as a sans-IO state machine: peer view, parent
//! choice (power of d choices), referrals and rebalancing.
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
//!   nearer the root (hysteresis, no flapping).
//! - Iteration order that reaches an output is deterministic for a given RNG seed
//!   (`BTreeMap`, sorted candidate lists).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::seq::IndexedRandom;
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
}

/// A peer's advertisement as views hold and pass it on: shared, so that forwarding it in a
/// shuffle costs a reference count, not a copy of its root path.
pub type Peer<I = String> = Arc<PeerInfo<I>>;

/// Events the driver feeds in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input<I = String> {
    /// Time passed; call every few hundred ms.
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
    /// This node now serves `count` children.
    Children { count: u32 },
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
    /// Subscribe to `addr` as parent. With `moving`, keep the current parent until the new
    /// one accepted, then drop it. Answer with Attached, Refused or AttachFailed.
    Attach {
        addr: I,
        moving: bool,
        reason: Reason,
    },
    /// A cycle was detected: drop the parent at `addr` (a ParentLost follows from the driver
    /// or is implied).
    Detach { addr: I },
}

/// The partial view: a handful of entries kept sorted by address in one vector, which
/// iterates in the same order as a `BTreeMap` and is faster to search and scan at this size.
#[derive(Clone, Debug)]
struct View<I>(Vec<(I, Entry<I>)>);

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

    fn get_mut(&mut self, k: &I) -> Option<&mut Entry<I>> {
        match self.find(k) {
            Ok(i) => Some(&mut self.0[i].1),
            Err(_) => None,
        }
    }

    fn insert(&mut self, k: I, v: Entry<I>) {
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

    fn iter(&self) -> impl Iterator<Item = (&I, &Entry<I>)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    fn keys(&self) -> impl Iterator<Item = &I> {
        self.0.iter().map(|(k, _)| k)
    }

    fn values(&self) -> impl Iterator<Item = &Entry<I>> {
        self.0.iter().map(|(_, v)| v)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Entry<I>> {
        self.0.iter_mut().map(|(_, v)| v)
    }
}

#[derive(Clone, Debug)]
struct Entry<I> {
    info: Option<Peer<I>>,
    /// A bootstrap address: kept through trims and forgets.
    boot: bool,
    age: u32,
    seq: u64,
}

#[derive(Clone, Debug)]
struct Parent<I> {
    addr: I,
    name: I,
    depth: u32,
    root_path: Vec<I>,
}

#[derive(Clone, Debug)]
enum Pending<I> {
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
    pending: Pending<I>,
    children: u32,
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
                    Entry {
                        info: None,
                        boot: true,
                        age: 0,
                        seq: 0,
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
            pending: Pending::Idle,
            children: 0,
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
                    (Some(p.depth + 1), path)
                }
                None => (None, Vec::new()),
            }
        };
        PeerInfo {
            name: self.name.clone(),
            addr: self.addr.clone(),
            depth,
            free_slots: self.cfg.fanout.saturating_sub(self.children),
            root_path,
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
                // Re-attached lower with its subtree (an ancestor's parent died): look for a
                // better place at the next tick rather than on the timer.
                if depth > p.depth + self.cfg.rebalance_min_gain {
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
        self.info().depth
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
        match &self.pending {
            Pending::Probing { since, .. } => at = at.min(since + self.cfg.probe_timeout_ms),
            Pending::Attaching { since, .. } => at = at.min(since + self.cfg.attach_timeout_ms),
            Pending::Idle if self.core => {}
            Pending::Idle if self.parent.is_some() => at = at.min(self.next_rebalance),
            Pending::Idle if self.has_candidate() => at = 0,
            Pending::Idle => at = at.min(self.probe_after),
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

    /// Orders places for this node: the depth it would get (a full node can only refer it a
    /// level down, so it counts one deeper), free before full, more free slots, lower address.
    fn rank(p: &Peer<I>) -> (u32, bool, std::cmp::Reverse<u32>, &I) {
        let full = p.free_slots == 0;
        (
            p.depth.unwrap_or(u32::MAX).saturating_add(u32::from(full)),
            full,
            std::cmp::Reverse(p.free_slots),
            &p.addr,
        )
    }

    /// Whether a parent at `depth` puts this node `rebalance_min_gain` levels nearer the core.
    fn gains(&self, depth: u32) -> bool {
        self.depth()
            .is_some_and(|mine| depth + 1 + self.cfg.rebalance_min_gain <= mine)
    }

    /// Whether this node keeps a move to a parent that answered with `depth` and `root_path`:
    /// the path does not hold this node and the move gains enough. A driver doing
    /// make-before-break asks before it switches; [`Input::Attached`] applies the same test.
    pub fn keeps_move(&self, depth: u32, root_path: &[I]) -> bool {
        !root_path.contains(&self.name) && self.gains(depth)
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

    /// A referral for a child that found this node full, picked by the driver from what the
    /// children advertise: one with a free slot, else any (whose own referral goes one level
    /// further down, so a joiner descends towards the shallowest room).
    pub fn pick_referral<R: Rng>(children: &[Peer<I>], rng: &mut R) -> Option<Peer<I>> {
        let open: Vec<&Peer<I>> = children.iter().filter(|c| c.free_slots > 0).collect();
        match open.choose(rng) {
            Some(c) => Some(Arc::clone(c)),
            None => children.choose(rng).cloned(),
        }
    }

    fn sample_known<R: Rng>(&self, rng: &mut R) -> Vec<Peer<I>> {
        let known: Vec<&Peer<I>> = self.view.values().filter_map(|e| e.info.as_ref()).collect();
        known
            .choose_multiple(rng, self.cfg.shuffle_len)
            .map(|p| Arc::clone(p))
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
        if let Some(e) = self.view.get_mut(&p.addr) {
            e.info = Some(p);
            e.age = 0;
            e.seq = seq;
            return;
        }
        self.view.insert(
            p.addr.clone(),
            Entry {
                info: Some(p),
                boot: false,
                age: 0,
                seq,
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

    fn is_candidate(&self, p: &Peer<I>) -> bool {
        let current = self.parent.as_ref().map(|p| &p.addr);
        self.is_eligible(p) && p.free_slots > 0 && Some(&p.addr) != current
    }

    fn candidates(&self) -> Vec<&Peer<I>> {
        self.view
            .values()
            .filter_map(|e| e.info.as_ref())
            .filter(|p| self.is_candidate(p))
            .collect()
    }

    /// Power of d choices: sample `choices` join targets, keep the one that would place this
    /// node shallowest. A full node counts one level deeper (it can only refer the joiner to
    /// a child) and loses ties to a free one; then more free slots, then the lower address.
    fn choose<R: Rng>(&self, rng: &mut R) -> Option<Peer<I>> {
        let cands: Vec<&Peer<I>> = self
            .view
            .values()
            .filter_map(|e| e.info.as_ref())
            .filter(|p| self.is_target(p))
            .collect();
        cands
            .choose_multiple(rng, self.cfg.choices)
            .min_by_key(|p| Self::rank(p))
            .map(|p| Arc::clone(p))
    }

    /// For a rebalance: the shallowest candidate the view holds (a move is rare, so it takes
    /// the best rather than a power-of-d pick).
    fn shallowest(&self) -> Option<Peer<I>> {
        self.candidates()
            .into_iter()
            .min_by_key(|p| Self::rank(p))
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
        self.pending = Pending::Probing {
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

    fn attach(&mut self, now: u64, addr: I, moving: bool, referrals: u32) -> Vec<Output<I>> {
        let reason = if moving {
            Reason::Rebalance
        } else {
            self.reason
        };
        self.pending = Pending::Attaching {
            addr: addr.clone(),
            since: now,
            moving,
            referrals,
            reason,
        };
        vec![Output::Attach {
            addr,
            moving,
            reason,
        }]
    }

    /// Unattached and idle: attach to a choice if there is one, else probe for fresh info
    /// (unless a fruitless probe asked to wait until `probe_after`).
    fn seek<R: Rng>(&mut self, now: u64, rng: &mut R) -> Vec<Output<I>> {
        if self.core || self.parent.is_some() || !matches!(self.pending, Pending::Idle) {
            return Vec::new();
        }
        if self.fruitless > 0 && now >= self.probe_after {
            self.refused.clear();
        }
        match self.choose(rng) {
            Some(best) => self.attach(now, best.addr.clone(), false, 0),
            None if now >= self.probe_after => self.probe(now, false, rng),
            None => Vec::new(),
        }
    }

    fn finish_probe<R: Rng>(&mut self, now: u64, rebalance: bool, rng: &mut R) -> Vec<Output<I>> {
        self.pending = Pending::Idle;
        if !rebalance {
            if self.core || self.parent.is_some() {
                return Vec::new();
            }
            return match self.choose(rng) {
                Some(best) => self.attach(now, best.addr.clone(), false, 0),
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
        match self.shallowest() {
            Some(best) if best.depth.is_some_and(|d| self.gains(d)) => {
                self.attach(now, best.addr.clone(), true, 0)
            }
            _ => {
                self.idle_rebalances += 1;
                Vec::new()
            }
        }
    }

    fn mark_full(&mut self, addr: &I) {
        if let Some(e) = self.view.get_mut(addr) {
            if let Some(i) = e.info.as_mut() {
                Arc::make_mut(i).free_slots = 0;
            }
        }
    }

    fn forget(&mut self, addr: &I) {
        if !self.bootstrap.iter().any(|b| b == addr) {
            self.view.remove(addr);
        } else if let Some(e) = self.view.get_mut(addr) {
            e.info = None;
        }
    }

    /// Feeds one event in and returns what to do next. `now` is in milliseconds on any
    /// monotonic clock; `rng` should be seeded per node for replayable runs.
    pub fn handle<R: Rng>(&mut self, now: u64, input: Input<I>, rng: &mut R) -> Vec<Output<I>> {
        let mut out = Vec::new();
        match input {
            Input::Tick => {
                self.banned.retain(|_, until| *until > now);
                match self.pending.clone() {
                    Pending::Probing {
                        since, rebalance, ..
                    } if now >= since + self.cfg.probe_timeout_ms => {
                        out.extend(self.finish_probe(now, rebalance, rng));
                    }
                    Pending::Attaching {
                        addr,
                        since,
                        moving,
                        ..
                    } if now >= since + self.cfg.attach_timeout_ms => {
                        self.pending = Pending::Idle;
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
                    if matches!(self.pending, Pending::Idle) && self.parent.is_some() {
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
                if self.parent.is_some() && matches!(self.pending, Pending::Idle) {
                    if self.next_rebalance == 0 {
                        self.next_rebalance = now + self.jitter(rng);
                    } else if now >= self.next_rebalance {
                        self.next_rebalance = now + self.jitter(rng);
                        // The shuffles keep the view fresh: a check reads it, sending nothing.
                        if self.depth().unwrap_or(0) > self.cfg.rebalance_min_gain {
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
                let (moving, reason) = match &self.pending {
                    Pending::Attaching {
                        addr: a,
                        moving,
                        reason,
                        ..
                    } if *a == addr => (*moving, *reason),
                    _ if self.parent.as_ref().is_some_and(|p| p.addr != addr) => {
                        out.push(Output::Detach { addr });
                        return out;
                    }
                    _ => (false, self.reason),
                };
                self.pending = Pending::Idle;
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
                if moving && !self.gains(depth) {
                    if let Some(Some(i)) = self.view.get_mut(&addr).map(|e| e.info.as_mut()) {
                        Arc::make_mut(i).depth = Some(depth);
                    }
                    out.push(Output::Detach { addr });
                    return out;
                }
                *self.reparents.entry(reason).or_default() += 1;
                self.fruitless = 0;
                self.probe_after = 0;
                self.idle_rebalances = 0;
                self.set_parent(
                    now,
                    Some(Parent {
                        addr: addr.clone(),
                        name,
                        depth,
                        root_path,
                    }),
                );
                self.reason = Reason::ParentLost;
                if let Some(e) = self.view.get_mut(&addr) {
                    if let Some(i) = e.info.as_mut() {
                        let i = Arc::make_mut(i);
                        i.free_slots = i.free_slots.saturating_sub(1);
                        i.depth = Some(depth);
                    }
                }
            }
            Input::Refused { addr, referral } => {
                let (moving, referrals) = match &self.pending {
                    Pending::Attaching {
                        addr: a,
                        moving,
                        referrals,
                        ..
                    } if *a == addr => (*moving, *referrals),
                    _ => return out,
                };
                self.pending = Pending::Idle;
                self.mark_full(&addr);
                if !moving {
                    self.refused.insert(addr.clone());
                }
                let gains = |r: &PeerInfo<I>| !moving || r.depth.is_some_and(|d| self.gains(d));
                match referral {
                    Some(r)
                        if referrals < self.cfg.max_referrals
                            && r.addr != self.addr
                            && !r.root_path.contains(&self.name)
                            && gains(&r) =>
                    {
                        let addr = r.addr.clone();
                        self.learn(r);
                        out.extend(self.attach(now, addr, moving, referrals + 1));
                    }
                    _ if !moving => out.extend(self.seek(now, rng)),
                    _ => {}
                }
            }
            Input::AttachFailed { addr } => {
                if matches!(&self.pending, Pending::Attaching { addr: a, .. } if *a == addr) {
                    let moving = matches!(self.pending, Pending::Attaching { moving: true, .. });
                    self.pending = Pending::Idle;
                    self.forget(&addr);
                    if !moving {
                        out.extend(self.seek(now, rng));
                    }
                }
            }
            Input::ParentLost { addr } => {
                if self.parent.as_ref().is_some_and(|p| p.addr == addr) {
                    self.set_parent(now, None);
                    self.forget(&addr);
                    self.reason = Reason::ParentLost;
                    if matches!(self.pending, Pending::Attaching { moving: true, .. }) {
                        if let Pending::Attaching { moving, .. } = &mut self.pending {
                            *moving = false;
                        }
                    } else {
                        self.pending = Pending::Idle;
                    }
                    out.extend(self.seek(now, rng));
                }
            }
            Input::Children { count } => {
                if count != self.children {
                    self.children = count;
                    self.me.take();
                }
            }
            Input::Faulty { addr } => {
                self.banned.insert(addr, now + self.cfg.faulty_ban_ms);
            }
        }
        out
    }

    /// Every change of parent goes through here: the advertisement is rebuilt and shuffles
    /// return to their base period.
    fn set_parent(&mut self, now: u64, parent: Option<Parent<I>>) {
        self.parent = parent;
        self.refused.clear();
        self.me.take();
        self.stable_shuffles = 0;
        self.next_shuffle = self.next_shuffle.min(now + self.cfg.shuffle_ms);
    }

    fn answered<R: Rng>(&mut self, now: u64, addr: &I, rng: &mut R) -> Vec<Output<I>> {
        if let Pending::Probing {
            asked, rebalance, ..
        } = &mut self.pending
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
