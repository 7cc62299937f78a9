//! The overlay's transitions: each input's effect on the view, the parent and the join or move
//! under way, and the samples and attaches that follow.

use super::*;

impl<I: Id> Overlay<I> {
    pub(super) fn probe<R: Rng>(
        &mut self,
        now: u64,
        rebalance: bool,
        rng: &mut R,
    ) -> Vec<Output<I>> {
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

    pub(super) fn attach(
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
    pub(super) fn seek<R: Rng>(&mut self, now: u64, rng: &mut R) -> Vec<Output<I>> {
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

    pub(super) fn finish_probe<R: Rng>(
        &mut self,
        now: u64,
        rebalance: bool,
        rng: &mut R,
    ) -> Vec<Output<I>> {
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

    pub(super) fn step<R: Rng>(
        &mut self,
        now: u64,
        input: Input<I>,
        rng: &mut R,
    ) -> Vec<Output<I>> {
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
                    self.next_shuffle = now + self.shuffle_wait(self.stable_shuffles, rng);
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
                        let nearer = self.zoned();
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
                        self.set_parent(now, None, rng);
                        out.extend(self.seek(now, rng));
                    }
                    return out;
                }
                // A move is checked again against the parent's depth as it answered: the
                // view's depth may be stale, and two moves made on stale depths can close a
                // cycle (the runtime then breaks it on the next heartbeat).
                if moving && !self.move_ok(depth, nearer, self.rank_at(&addr)) {
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
                let zone = self
                    .view
                    .get(&addr)
                    .and_then(|e| e.info.as_ref()?.zone.clone());
                self.set_parent(
                    now,
                    Some(Parent {
                        zone,
                        addr: addr.clone(),
                        name,
                        depth,
                        root_path,
                    }),
                    rng,
                );
                self.reason = Reason::ParentLost;
                self.reported = report;
                if self.too_deep() {
                    self.next_rebalance = 1;
                }
                if let Some(e) = self.view.get_mut(&addr) {
                    if let Some(i) = e.info.as_mut() {
                        let i = Arc::make_mut(i);
                        match self.zone.as_ref().map(|z| i.held_for.binary_search(z)) {
                            Some(Ok(at)) => {
                                i.held_for.remove(at);
                            }
                            _ => i.free_slots = i.free_slots.saturating_sub(1),
                        }
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
                            && self.zone_rank(r) == 0
                            && r.depth.is_some_and(|d| self.move_ok(d, true, 0)))
                };
                match referral {
                    Some(r)
                        if referrals < self.cfg.max_referrals
                            && r.addr != self.addr
                            && !r.root_path.contains(&self.name)
                            && gains(&r) =>
                    {
                        let mut addr = r.addr.clone();
                        self.learn(r);
                        if !moving {
                            addr = self.nearer_than(&addr).unwrap_or(addr);
                        }
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
                    self.set_parent(now, None, rng);
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

    /// Every change of parent goes through here: the advertisement is rebuilt and shuffles
    /// return to their base period.
    pub(super) fn set_parent<R: Rng>(&mut self, now: u64, parent: Option<Parent<I>>, rng: &mut R) {
        if parent.is_none() {
            self.reported = None;
        }
        self.parent = parent;
        self.failed_moves = 0;
        self.refused.clear();
        self.me.take();
        self.stable_shuffles = 0;
        self.next_shuffle = self.next_shuffle.min(now + self.shuffle_wait(0, rng));
    }

    /// The wait before the next shuffle after `stable` shuffles under one parent: the base
    /// period doubled `stable` times (at most [`MAX_SHUFFLE_DOUBLINGS`]), jittered ±50 %.
    /// Without the jitter, nodes that attach together (a batch started at once, the children
    /// of a parent that failed) shuffle together for good: a burst of connections and TLS
    /// handshakes every period, which stalled the stream behind it when those nodes share
    /// CPUs (docs/benchmarks.md, "The N = 1000 tail was synchronized work").
    pub(super) fn shuffle_wait<R: Rng>(&self, stable: u32, rng: &mut R) -> u64 {
        let period = self.cfg.shuffle_ms << stable.min(MAX_SHUFFLE_DOUBLINGS);
        period / 2 + rng.random_range(0..=period)
    }

    pub(super) fn answered<R: Rng>(&mut self, now: u64, addr: &I, rng: &mut R) -> Vec<Output<I>> {
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

    pub(super) fn jitter<R: Rng>(&self, rng: &mut R) -> u64 {
        let period = self.cfg.rebalance_ms << self.idle_rebalances.min(3);
        period / 2 + rng.random_range(0..=period)
    }
}
