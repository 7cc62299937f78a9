//! The overlay's partial view: answering samples, learning and trimming adverts, and the candidates
//! it offers for parent choice.

use super::*;

impl<I: Id> Overlay<I> {
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

    pub(super) fn sample_known<R: Rng>(&self, rng: &mut R) -> Vec<Peer<I>> {
        self.view
            .values()
            .filter_map(|e| e.info.as_ref())
            .choose_multiple(rng, self.cfg.shuffle_len)
            .into_iter()
            .map(Arc::clone)
            .collect()
    }

    pub(super) fn offer<R: Rng>(&self, rng: &mut R) -> Vec<Peer<I>> {
        let mut offer = vec![self.me()];
        offer.extend(self.sample_known(rng));
        offer
    }

    pub(super) fn learn(&mut self, p: Peer<I>) {
        if p.addr == self.addr {
            return;
        }
        self.learned += 1;
        let seq = self.learned;
        // A place worth moving to: check at the next tick rather than on the timer.
        if self.parent.is_some()
            && self.next_rebalance > 1
            && (self.is_candidate(&p) || self.is_nearer_move(&p))
        {
            self.next_rebalance = 1;
        }
        let at = match self.view.find(&p.addr) {
            Ok(i) => i,
            Err(i) => return self.insert_learned(i, p, seq),
        };
        let e = &mut self.view.0[at].1;
        // The same advert again (the peer's place has not changed): keeping the one held
        // spares touching a second record.
        if !e.info.as_ref().is_some_and(|held| Arc::ptr_eq(held, &p)) {
            e.info = Some(p);
        }
        e.age = 0;
        e.seq = seq;
        if e.boot {
            self.refresh_core_landing();
        }
    }

    /// A new entry for `p`, whose address sorts at `at`, then the trim. In a full view the
    /// entry that [`Self::trim`] would drop is found first and the new one takes its place
    /// (the entries between shift by one), without inserting and removing in turn: the
    /// new entry, the youngest, is the one dropped only when no other may be.
    fn insert_learned(&mut self, at: usize, p: Peer<I>, seq: u64) {
        let addr = p.addr.clone();
        let rec = ViewRecord {
            info: Some(p),
            boot: false,
            age: 0,
            seq,
            rtt_us: None,
        };
        if self.view.len() != self.cfg.view_size {
            self.view.0.insert(at, (addr, rec));
            self.trim();
            return;
        }
        let parent = self.parent.as_ref().map(|p| &p.addr);
        let oldest = self
            .view
            .iter()
            .enumerate()
            .filter(|(_, (a, e))| !e.boot && Some(*a) != parent)
            .max_by_key(|(_, (_, e))| (e.age, std::cmp::Reverse(e.seq)))
            .map(|(i, _)| i);
        match oldest {
            Some(v) => {
                self.view.0[v] = (addr, rec);
                if v < at {
                    self.view.0[v..at].rotate_left(1);
                } else {
                    self.view.0[at..=v].rotate_right(1);
                }
            }
            // Nothing else may go: the new entry stays only as the parent's.
            None if Some(&addr) == parent => self.view.0.insert(at, (addr, rec)),
            None => {}
        }
    }

    pub(super) fn trim(&mut self) {
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
    /// to. With zones, a node whose parent is in its zone moves to a parent elsewhere for
    /// depth only from below [`Self::beyond_fill`]: moves for depth then add no edge
    /// between zones, and moves for latency remove one, so the two kinds never undo each
    /// other.
    pub(super) fn is_candidate(&self, p: &Peer<I>) -> bool {
        let Some(parent) = self.parent.as_ref() else {
            return self.is_eligible(p) && self.gains(self.landing(p).saturating_sub(1));
        };
        // No place is shallower than the cores' shallowest room: an advert that says so is
        // stale, and a move to it would end in refusals.
        let floor = if self.core_landing == u32::MAX {
            0
        } else {
            self.core_landing
        };
        // A node that would not gain enough even there (a settled one) answers without
        // reading the advert, which lies in another node's memory: no landing is above 1.
        if !self.gains(floor.max(1) - 1) {
            return false;
        }
        if self.zoned()
            && self.rank_of(parent.zone.as_ref()) == 0
            && self.zone_rank(p) != 0
            && !self.beyond_fill()
        {
            return false;
        }
        let landing = self.landing(p).max(floor);
        (self.free_at(p) > 0 || p.room > 0)
            && self.gains(landing.saturating_sub(1))
            && p.addr != parent.addr
            && self.is_eligible(p)
    }

    /// Whether `p` is a place in this node's zone that [`Self::nearer_place`] would take
    /// (a place in a core's zone waits for the next rebalance check: such places are few
    /// and sought by their own zone, so an advert of one is often stale).
    fn is_nearer_move(&self, p: &Peer<I>) -> bool {
        match (self.across_rank(), &self.parent) {
            (Some(_), Some(parent)) => self.is_nearer(p, &parent.addr, 0),
            _ => false,
        }
    }

    /// Peers of the view passing `keep`, with their measured RTT.
    pub(super) fn known(&self, keep: impl Fn(&Peer<I>) -> bool) -> Vec<(&Peer<I>, Option<u64>)> {
        self.view
            .values()
            .filter_map(|e| e.info.as_ref().map(|i| (i, e.rtt_us)))
            .filter(|(p, _)| keep(p))
            .collect()
    }

    /// Power of d choices: sample `choices` join targets and keep the best place
    /// ([`Self::best`]). A node that brings a subtree along compares every target it knows
    /// instead: its choice sets the depth of the whole subtree, and it is rare.
    pub(super) fn choose<R: Rng>(&self, rng: &mut R) -> Option<Peer<I>> {
        let mut cands = self.known(|p| self.is_target(p));
        if self.zoned() {
            // The d choices are drawn from the nearest zone rank among the targets that
            // [`Self::best`] would let win.
            let top = cands.iter().map(|(p, _)| self.landing(p)).min()?;
            let (near, far) = (
                self.zone_limit(top),
                top.saturating_add(self.cfg.latency_slack),
            );
            cands.retain(|(p, _)| {
                self.landing(p) <= if self.zone_rank(p) == 0 { near } else { far }
            });
            let rank = cands.iter().map(|(p, _)| self.zone_rank(p)).min()?;
            cands.retain(|(p, _)| self.zone_rank(p) == rank);
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
    pub(super) fn shallowest(&self) -> Option<Peer<I>> {
        self.best(&self.known(|p| self.is_candidate(p)))
            .map(Arc::clone)
    }

    /// `addr` refused: it is full, and without a referral its room is unknown too.
    pub(super) fn mark_full(&mut self, addr: &I, referred: bool) {
        if let Some(e) = self.view.get_mut(addr) {
            if let Some(i) = e.info.as_mut() {
                let i = Arc::make_mut(i);
                i.free_slots = 0;
                i.held_for.clear();
                if !referred {
                    i.room = 0;
                }
            }
            if e.boot {
                self.refresh_core_landing();
            }
        }
    }

    pub(super) fn forget(&mut self, addr: &I) {
        if !self.bootstrap.iter().any(|b| b == addr) {
            self.view.remove(addr);
        } else if let Some(e) = self.view.get_mut(addr) {
            e.info = None;
            self.refresh_core_landing();
        }
    }
}
