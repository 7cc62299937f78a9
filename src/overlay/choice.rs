//! Parent choice: which candidate places this node shallowest (or nearest), and whether a move
//! gains enough.

use super::*;

impl<I: Id> Overlay<I> {
    pub(super) fn has_candidate(&self) -> bool {
        self.view
            .values()
            .filter_map(|e| e.info.as_ref())
            .any(|p| self.is_target(p))
    }

    /// Where a join may start: any attached node, full or not (a full one refers the joiner
    /// down to its children), except those that refused this join already.
    pub(super) fn is_target(&self, p: &Peer<I>) -> bool {
        self.is_eligible(p) && !self.refused.contains(&p.addr)
    }

    /// A peer this node could hang below at all: attached, not itself, not below it, and not
    /// banned as faulty.
    pub(super) fn is_eligible(&self, p: &Peer<I>) -> bool {
        p.depth.is_some()
            && p.addr != self.addr
            && !p.root_path.contains(&self.name)
            && !self.banned.contains_key(&p.addr)
    }

    /// The depth this node would get starting at `p`: a full node refers it down to its
    /// shallowest room, `room` levels below (at least one).
    pub(super) fn landing(&self, p: &PeerInfo<I>) -> u32 {
        let down = if self.free_at(p) == 0 {
            p.room.max(1)
        } else {
            0
        };
        p.depth.unwrap_or(u32::MAX).saturating_add(1 + down)
    }

    /// The slots `p` would admit this node to: those open to all, and one more where `p`
    /// holds slots for this node's zone ([`PeerInfo::held_for`]).
    pub(super) fn free_at(&self, p: &PeerInfo<I>) -> u32 {
        let held = self.zone.as_ref().is_some_and(|z| p.held_for.contains(z));
        p.free_slots.saturating_add(u32::from(held))
    }

    /// The order of zones among places: this node's own (0), a core's zone (1: its path
    /// from the core usually crosses no zone, so hanging there costs one edge between
    /// zones), unknown (2), any other (3: its path has usually crossed one already).
    pub(super) fn zone_rank(&self, p: &PeerInfo<I>) -> u8 {
        self.rank_of(p.zone.as_ref())
    }

    /// [`Self::zone_rank`] of a place in `zone`.
    pub(super) fn rank_of(&self, zone: Option<&I>) -> u8 {
        match (&self.zone, zone) {
            (Some(a), Some(b)) if a == b => 0,
            (Some(_), Some(b)) if self.core_zones.contains(b) => 1,
            (Some(_), Some(_)) => 3,
            _ => 2,
        }
    }

    /// With zones on and a parent in another zone: the highest [`Self::zone_rank`] a move
    /// may go to. From a parent in a core's zone only this node's own zone (0); from one in
    /// a third zone also a core's zone (1), whose path crosses no zone before this edge.
    pub(super) fn across_rank(&self) -> Option<u8> {
        if !self.zoned() {
            return None;
        }
        match self.rank_of(self.parent.as_ref()?.zone.as_ref()) {
            1 => Some(0),
            3 => Some(1),
            _ => None,
        }
    }

    /// The best place among `cands`: the shallowest landing, except that one in this
    /// node's zone wins over one elsewhere while it lands no deeper than
    /// [`Self::zone_limit`], and one in a core's zone over one in a third
    /// ([`Self::zone_rank`]); then the lower RTT, free before full, more free slots, the
    /// lower address.
    pub(super) fn best<'a>(&self, cands: &[(&'a Peer<I>, Option<u64>)]) -> Option<&'a Peer<I>> {
        let top = cands.iter().map(|(p, _)| self.landing(p)).min()?;
        let (near, far) = (
            self.zone_limit(top),
            top.saturating_add(self.cfg.latency_slack),
        );
        cands
            .iter()
            .filter(|(p, _)| self.landing(p) <= if self.zone_rank(p) == 0 { near } else { far })
            .min_by_key(|(p, rtt)| {
                (
                    self.zone_rank(p),
                    self.landing(p),
                    rtt.unwrap_or(u64::MAX),
                    self.free_at(p) == 0,
                    std::cmp::Reverse(self.free_at(p)),
                    &p.addr,
                )
            })
            .map(|(p, _)| *p)
    }

    /// For a joiner referred to `referral`: a free place it knows that lands as shallow, in
    /// a zone ranked as near ([`Self::zone_rank`]), and whose measured RTT is lower than the
    /// referral's (unmeasured counts as the highest), the lowest such RTT first. A full node
    /// refers a joiner to a child chosen by room alone, and the joiner may have ranked that
    /// node first on a stale advert saying it had room; RTTs it measured still count.
    pub(super) fn nearer_than(&self, referral: &I) -> Option<I> {
        let e = self.view.get(referral)?;
        let r = e.info.as_ref()?;
        let (landing, rank) = (self.landing(r), self.zone_rank(r));
        let rtt = e.rtt_us.unwrap_or(u64::MAX);
        self.known(|p| {
            self.is_target(p)
                && self.free_at(p) > 0
                && self.landing(p) <= landing
                && self.zone_rank(p) <= rank
        })
        .into_iter()
        .filter_map(|(p, m)| m.filter(|&m| m < rtt).map(|m| (m, p)))
        .min_by_key(|(m, p)| (*m, &p.addr))
        .map(|(_, p)| p.addr.clone())
    }

    /// Whether zones order candidates at all: this node has one and `latency_slack` is
    /// above 0.
    pub(super) fn zoned(&self) -> bool {
        self.cfg.latency_slack > 0 && self.zone.is_some()
    }

    /// The deepest landing a place in this node's zone may have and still win, `top`
    /// being the shallowest landing on offer: `latency_slack` levels below `top`, or
    /// [`Self::zone_fill`] where that is deeper.
    pub(super) fn zone_limit(&self, top: u32) -> u32 {
        top.saturating_add(self.cfg.latency_slack)
            .max(self.zone_fill())
    }

    /// How deep this node may hang in its own zone rather than hang from another:
    /// [`Self::deepest`], less the height of the subtree it brings. 0 (no say) without
    /// zones or before the cores' room or size is known.
    pub(super) fn zone_fill(&self) -> u32 {
        if !self.zoned() {
            return 0;
        }
        self.deepest().saturating_sub(self.report().height)
    }

    /// The deepest a node may hang: a level below the deepest room the cores advertised
    /// so far (`landing_high`: a packed tree may put its deepest node there, and a tree
    /// packed down to that room holds enough nodes for the depth bound to be at least as
    /// deep), or the depth bound of the tree's size as the cores report it (`bound_high`,
    /// [`depth_bound`]) where that is deeper, with [`OverlayConfig::fill_zones_to_bound`],
    /// by one level at most: sizes are what relays report and adverts are passed on by
    /// relays, so a size inflated by a faulty or hostile one moves this by a level, no
    /// more. 0 until the cores' room is known. A slot freed or a subtree lost for a moment
    /// lowers neither.
    pub(super) fn deepest(&self) -> u32 {
        if self.landing_high == 0 {
            return 0;
        }
        let room = self.landing_high.saturating_add(1);
        room.max(self.bound_high.min(room + 1))
    }

    /// Levels a move must gain: `subtree_min_gain` when this node brings a subtree along,
    /// or when it hangs more than a level below the shallowest room the cores advertise
    /// (where a packed tree would have it); else `rebalance_min_gain`.
    pub(super) fn min_gain(&self) -> u32 {
        if self.children.is_empty() && !self.too_deep() {
            self.cfg.rebalance_min_gain
        } else {
            self.cfg.subtree_min_gain
        }
    }

    /// Whether this node hangs deeper than [`Self::zone_fill`] allows a leaf: the one case
    /// where it leaves a parent in its zone for one elsewhere.
    pub(super) fn beyond_fill(&self) -> bool {
        self.depth().is_some_and(|d| d > self.deepest().max(1))
    }

    /// Whether this node hangs more than a level below the shallowest room the cores
    /// advertise.
    pub(super) fn too_deep(&self) -> bool {
        self.depth()
            .is_some_and(|d| d > self.core_landing.saturating_add(1))
    }

    /// After a move that did not happen: a node still too deep checks again soon (the
    /// place it tried was stale; the view may hold another).
    pub(super) fn retry_move(&mut self, now: u64) {
        if self.too_deep() {
            let backoff = self.cfg.probe_backoff_ms << self.failed_moves.min(MAX_MOVE_BACKOFFS);
            self.failed_moves += 1;
            self.next_rebalance = now + backoff;
        }
    }

    /// Recomputes [`Overlay::core_landing`] from the bootstrap entries (a full core that
    /// did not say where its room is tells nothing), and, with zones, learns the cores'
    /// zones.
    pub(super) fn refresh_core_landing(&mut self) {
        let zoned = self.zoned();
        let mut landing = u32::MAX;
        let mut nodes = 0u64;
        let cores = self
            .view
            .values()
            .filter(|e| e.boot)
            .filter_map(|e| e.info.as_ref())
            .filter(|p| p.depth == Some(0));
        for p in cores {
            if self.free_at(p) > 0 || p.room > 0 {
                landing = landing.min(self.landing(p));
            }
            nodes += u64::from(p.size.min(MAX_SIZE));
            if let Some(z) = p.zone.as_ref().filter(|_| zoned) {
                if !self.core_zones.contains(z) {
                    self.core_zones.push(z.clone());
                }
            }
        }
        self.core_landing = landing;
        if landing != u32::MAX {
            self.landing_high = self.landing_high.max(landing);
        }
        if nodes > 0 && self.cfg.fill_zones_to_bound {
            self.bound_high = self.bound_high.max(depth_bound(nodes, self.cfg.fanout));
        }
    }

    /// Whether a parent at `depth` puts this node [`Self::min_gain`] levels nearer the core.
    pub(super) fn gains(&self, depth: u32) -> bool {
        let gain = self.min_gain();
        self.depth()
            .is_some_and(|mine| depth.saturating_add(1 + gain) <= mine)
    }

    /// Whether a move to a parent at `depth`, of [`Self::zone_rank`] `rank`, is worth it: it
    /// gains enough, or, for a move across zones (`nearer`), it lands no deeper than
    /// [`Self::nearer_limit`] into this node's zone, and no deeper than now into a core's.
    pub(super) fn move_ok(&self, depth: u32, nearer: bool, rank: u8) -> bool {
        let limit = if rank == 0 {
            self.nearer_limit()
        } else {
            self.depth().unwrap_or(0)
        };
        self.gains(depth) || (nearer && depth < limit)
    }

    /// The [`Self::zone_rank`] of the place at `addr`, as the view knows it (unknown: 2).
    pub(super) fn rank_at(&self, addr: &I) -> u8 {
        self.view
            .get(addr)
            .and_then(|e| e.info.as_ref())
            .map_or(2, |p| self.zone_rank(p))
    }

    /// The deepest landing a move into this node's zone may have: no deeper than now, or
    /// as deep as [`Self::zone_fill`]. Such a move turns an edge between zones into one
    /// inside a zone and adds none, so moves for latency end.
    pub(super) fn nearer_limit(&self) -> u32 {
        self.depth().map_or(0, |mine| mine.max(self.zone_fill()))
    }

    /// Whether this node keeps a move to a parent that answered with `depth` and `root_path`:
    /// the path does not hold this node and the move gains enough (or, for a move to a
    /// parent in its zone, costs no depth). A driver doing make-before-break asks before it
    /// switches; [`Input::Attached`] applies the same test.
    pub fn keeps_move(&self, depth: u32, root_path: &[I]) -> bool {
        let (nearer, rank) = match &self.step {
            Step::Attaching { nearer, addr, .. } => (*nearer, self.rank_at(addr)),
            _ => (false, 2),
        };
        !root_path.contains(&self.name) && self.move_ok(depth, nearer, rank)
    }

    /// For a node whose parent is in another zone, with zones on: the best place in its
    /// own zone within [`Self::nearer_limit`], or, from a parent in a third zone, in a
    /// core's zone no deeper than now ([`Self::across_rank`]).
    pub(super) fn nearer_place(&self) -> Option<Peer<I>> {
        let rank = self.across_rank()?;
        let parent = self.parent.as_ref()?;
        let near = |p: &Peer<I>| self.is_nearer(p, &parent.addr, rank);
        self.best(&self.known(near)).map(Arc::clone)
    }

    /// Whether `p` is a place a node whose parent (at `parent`) is in another zone may move
    /// to: not its parent, with room, of [`Self::zone_rank`] at most `rank`, landing no
    /// deeper than [`Self::nearer_limit`] in this node's zone or than now in a core's.
    pub(super) fn is_nearer(&self, p: &Peer<I>, parent: &I, rank: u8) -> bool {
        let limit = match self.zone_rank(p) {
            0 => self.nearer_limit(),
            r if r <= rank => self.depth().unwrap_or(0),
            _ => return false,
        };
        p.addr != *parent
            && (self.free_at(p) > 0 || p.room > 0)
            && self.landing(p) <= limit
            && self.is_eligible(p)
    }
}
