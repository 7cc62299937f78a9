//! The parent side of the overlay: the children it registered, their reports, what this node
//! reports of itself, and whether to admit a subscriber or refer it.

use super::*;

impl<I: Id> Overlay<I> {
    /// What this node tells its parent: free slots, the height of its subtree, the levels
    /// down to its shallowest free slot, and (see [`Report::size`]) the size of its
    /// subtree. A child that has not reported counts as a leaf with room.
    pub fn report(&self) -> Report {
        let held: u32 = self.held().values().sum();
        let free_slots = self
            .cfg
            .fanout
            .saturating_sub(self.children.len() as u32 + held);
        let (mut height, mut below) = (0, u32::MAX);
        let (mut size, mut sized) = (1u64, self.cfg.fill_zones_to_bound && self.zoned());
        for c in self.children.values() {
            let r = c.report.unwrap_or_default();
            height = height.max(r.height + 1);
            below = below.min(r.room + 1);
            size += u64::from(r.size.max(1));
            sized |= r.size > 0;
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
            size: if sized { round_size(size) } else { 0 },
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

    /// Whether to serve `name` (a subscriber in `zone`) as a child. Refuses everyone while
    /// this relay has no parent ([`Refusal::Unattached`]), this node itself or one of its
    /// ancestors, and refuses when `fanout` children are registered,
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
        if !self.core && self.parent.is_none() {
            return Admit::Refuse {
                reason: Refusal::Unattached,
                referral: None,
            };
        }
        let fanout = self.cfg.fanout;
        let owed: u32 = self
            .held()
            .into_iter()
            .filter(|(z, _)| Some(*z) != zone)
            .map(|(_, n)| n)
            .sum();
        if (self.children.len() as u32 + owed) < fanout || self.children.contains_key(name) {
            return Admit::Accept;
        }
        let children = self.children.len() as u32;
        let reason = if children < fanout {
            Refusal::HeldForOtherZones {
                children,
                held: fanout - children,
            }
        } else {
            Refusal::Full { children, fanout }
        };
        Admit::Refuse {
            reason,
            referral: self.referral(zone, rng),
        }
    }

    /// The slots a core still holds for each zone of its shares that has fewer children
    /// than its share ([`Overlay::with_zone_shares`]); empty for relays.
    pub(super) fn held(&self) -> BTreeMap<&I, u32> {
        let mut held = BTreeMap::new();
        if self.shares.is_empty() {
            return held;
        }
        let share = self.cfg.fanout / self.shares.len() as u32;
        for z in &self.shares {
            let have = self
                .children
                .values()
                .filter(|c| c.zone.as_ref() == Some(z))
                .count() as u32;
            if have < share {
                held.insert(z, share - have);
            }
        }
        held
    }

    /// One registered child for a subscriber in `zone` that found this node full.
    pub(super) fn referral<R: Rng>(&self, zone: Option<&I>, rng: &mut R) -> Option<Peer<I>> {
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
        let me = self.me();
        let mut root_path = me.root_path.clone();
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
            size: report.size,
            held_for: Vec::new(),
        }))
    }

    /// A child's report within the documented limits.
    pub(super) fn clamp(&self, r: Report) -> Report {
        Report {
            free_slots: r.free_slots.min(self.cfg.fanout),
            height: r.height.min(MAX_HEIGHT),
            room: r.room.min(MAX_HEIGHT),
            size: r.size.min(MAX_SIZE),
        }
    }
}
