//! Which source each chunk of a transfer comes from: the sans-IO scheduler of a
//! multi-source backfill.
//!
//! The parent pushes the chunks a child lacks in ascending index order on the subscription
//! stream, but only those below a limit the child may lower ([`Output::Limit`]). Fetch
//! sources (peers from the child's view) are asked for chunks from the top down, at most
//! `window` outstanding each, so the push and the fetches meet in the middle and each source
//! delivers what its uplink allows. The parent's own fetch stream is a fallback source: it is
//! asked only after the push has ended, for whatever no peer could serve.
//!
//! Invariants:
//! - A chunk is outstanding at one fetch source at most, and never requested once held.
//! - At most `window` chunks are outstanding per source.
//! - The limit never rises, and it is lowered only to a chunk at least `margin` above the
//!   highest one the parent has pushed, so the push's in-flight chunks are not fetched twice.
//! - [`Output::Complete`] is emitted once, when every wanted chunk is held and the push has
//!   ended; [`Output::Stuck`] once, when the push has ended and no source left can serve a
//!   chunk still wanted.

use std::collections::{BTreeMap, BTreeSet};

/// Tuning of one transfer's scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchConfig {
    /// Chunks outstanding per fetch source.
    pub window: usize,
    /// Chunks above the last one received from the push that stay the push's: as many as
    /// the parent may have sent and the child not taken yet, so none is fetched twice.
    pub margin: u64,
}

/// What happened; feed it to [`Scheduler::handle`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input<S> {
    /// A fetch source can take requests. A `fallback` source (the parent's fetch stream) is
    /// used only once the push has ended.
    SourceReady { source: S, fallback: bool },
    /// A chunk arrived and was verified against the manifest: from the parent's push
    /// (`source: None`) or from a fetch source.
    Received { source: Option<S>, index: u64 },
    /// The fetch source does not hold this chunk at the manifest's hash.
    Missing { source: S, index: u64 },
    /// The fetch source is gone (connection lost, busy, or it sent a chunk that failed the
    /// manifest): its outstanding chunks go back to the pool, and it is never asked again.
    SourceFailed { source: S },
    /// The parent's push ended (`SnapshotEnd`): it sent every wanted chunk below the limit.
    PushEnded,
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output<S> {
    /// Tell the parent to push only chunks with an index below `below` (send it on the
    /// subscription stream; only the latest value matters).
    Limit { below: u64 },
    /// Ask `source` for these chunks, each checked against the manifest when it arrives;
    /// answer each with `Received` or `Missing`, or the source with `SourceFailed`.
    Request { source: S, indices: Vec<u64> },
    /// Every wanted chunk is held: finish the transfer and close the fetch sources.
    Complete,
    /// Wanted chunks remain and no source can serve them: give the transfer up (the chunks
    /// held are kept) and resubscribe.
    Stuck { missing: usize },
}

#[derive(Debug)]
struct Source {
    fallback: bool,
    outstanding: BTreeSet<u64>,
    received: u64,
}

/// One transfer's chunk assignment; see the module docs.
#[derive(Debug)]
pub struct Scheduler<S> {
    cfg: FetchConfig,
    /// Wanted chunks not held yet.
    pending: BTreeSet<u64>,
    /// Pending chunks not outstanding at any fetch source.
    pool: BTreeSet<u64>,
    /// Which fetch source each outstanding pending chunk is asked of.
    owner: BTreeMap<u64, S>,
    sources: BTreeMap<S, Source>,
    /// Sources that answered `Missing` for a chunk.
    tried: BTreeMap<u64, BTreeSet<S>>,
    limit: u64,
    pushed_next: u64,
    push_ended: bool,
    finished: bool,
}

impl<S: Ord + Clone> Scheduler<S> {
    /// A transfer of `chunk_count` chunks of which `wanted` are not held locally. Feed it
    /// the sources as they become ready and every chunk as it arrives.
    pub fn new(cfg: FetchConfig, chunk_count: u64, wanted: impl IntoIterator<Item = u64>) -> Self {
        let pending: BTreeSet<u64> = wanted.into_iter().filter(|i| *i < chunk_count).collect();
        Self {
            cfg,
            pool: pending.clone(),
            pending,
            owner: BTreeMap::new(),
            sources: BTreeMap::new(),
            tried: BTreeMap::new(),
            limit: chunk_count,
            pushed_next: 0,
            push_ended: false,
            finished: false,
        }
    }

    /// Chunks not held yet.
    pub fn remaining(&self) -> usize {
        self.pending.len()
    }

    /// The limit told to the parent (the chunk count until lowered).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Chunks each fetch source has delivered, by source (the push not included).
    pub fn received_by_source(&self) -> BTreeMap<S, u64> {
        self.sources
            .iter()
            .map(|(s, src)| (s.clone(), src.received))
            .collect()
    }

    /// Takes one input and returns what to do.
    pub fn handle(&mut self, input: Input<S>) -> Vec<Output<S>> {
        let limit_before = self.limit;
        match input {
            Input::SourceReady { source, fallback } => {
                self.sources.entry(source).or_insert(Source {
                    fallback,
                    outstanding: BTreeSet::new(),
                    received: 0,
                });
            }
            Input::Received { source, index } => {
                match &source {
                    None => self.pushed_next = self.pushed_next.max(index + 1),
                    Some(s) => {
                        if let Some(src) = self.sources.get_mut(s) {
                            if src.outstanding.remove(&index) {
                                src.received += 1;
                            }
                        }
                    }
                }
                if self.pending.remove(&index) {
                    self.pool.remove(&index);
                    self.owner.remove(&index);
                    self.tried.remove(&index);
                }
            }
            Input::Missing { source, index } => {
                if let Some(src) = self.sources.get_mut(&source) {
                    src.outstanding.remove(&index);
                }
                if self.owner.get(&index) == Some(&source) {
                    self.owner.remove(&index);
                    self.pool.insert(index);
                    self.tried.entry(index).or_default().insert(source);
                }
            }
            Input::SourceFailed { source } => {
                if let Some(src) = self.sources.remove(&source) {
                    for i in src.outstanding {
                        if self.owner.get(&i) == Some(&source) {
                            self.owner.remove(&i);
                            self.pool.insert(i);
                        }
                    }
                }
            }
            Input::PushEnded => self.push_ended = true,
        }
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        let requests = self.fill();
        if self.limit != limit_before {
            out.push(Output::Limit { below: self.limit });
        }
        out.extend(requests);
        if self.push_ended {
            let idle = self.sources.values().all(|s| s.outstanding.is_empty());
            if self.pending.is_empty() {
                self.finished = true;
                out.push(Output::Complete);
            } else if idle {
                self.finished = true;
                out.push(Output::Stuck {
                    missing: self.pending.len(),
                });
            }
        }
        out
    }

    fn fill(&mut self) -> Vec<Output<S>> {
        let mut out = Vec::new();
        let names: Vec<S> = self.sources.keys().cloned().collect();
        for s in names {
            let mut asked = Vec::new();
            while self.sources[&s].outstanding.len() < self.cfg.window {
                let Some(i) = self.pick(&s) else { break };
                self.pool.remove(&i);
                self.owner.insert(i, s.clone());
                self.sources
                    .get_mut(&s)
                    .expect("listed")
                    .outstanding
                    .insert(i);
                asked.push(i);
            }
            if !asked.is_empty() {
                out.push(Output::Request {
                    source: s,
                    indices: asked,
                });
            }
        }
        out
    }

    /// The next chunk for `s`: the highest one above the limit, else (while the push runs)
    /// the one just below the limit if it is clear of the push, else (after the push) any.
    fn pick(&mut self, s: &S) -> Option<u64> {
        let fallback = self.sources[s].fallback;
        if fallback && !self.push_ended {
            return None;
        }
        let tried = &self.tried;
        let eligible = |i: &u64| !tried.get(i).is_some_and(|t| t.contains(s));
        if let Some(i) = self.pool.range(self.limit..).rev().copied().find(eligible) {
            return Some(i);
        }
        if self.push_ended {
            return self.pool.iter().rev().copied().find(eligible);
        }
        let floor = self.pushed_next.saturating_add(self.cfg.margin);
        if floor >= self.limit {
            return None;
        }
        let i = self
            .pool
            .range(floor..self.limit)
            .rev()
            .copied()
            .find(eligible)?;
        self.limit = i;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(window: usize, margin: u64) -> FetchConfig {
        FetchConfig { window, margin }
    }

    fn ready(s: &'static str) -> Input<&'static str> {
        Input::SourceReady {
            source: s,
            fallback: false,
        }
    }

    #[test]
    fn a_peer_takes_the_top_and_lowers_the_limit() {
        let mut f = Scheduler::new(cfg(2, 3), 10, 0..10);
        assert_eq!(
            f.handle(ready("a")),
            vec![
                Output::Limit { below: 8 },
                Output::Request {
                    source: "a",
                    indices: vec![9, 8]
                }
            ]
        );
        assert_eq!(
            f.handle(Input::Received {
                source: Some("a"),
                index: 9
            }),
            vec![
                Output::Limit { below: 7 },
                Output::Request {
                    source: "a",
                    indices: vec![7]
                }
            ]
        );
    }

    #[test]
    fn the_peer_stops_short_of_the_push_and_the_transfer_completes() {
        let mut f = Scheduler::new(cfg(1, 2), 6, 0..6);
        let mut out = f.handle(ready("a"));
        assert_eq!(
            out.remove(1),
            Output::Request {
                source: "a",
                indices: vec![5]
            }
        );
        for i in 0..3 {
            f.handle(Input::Received {
                source: None,
                index: i,
            });
        }
        // Pushed up to 2; margin 2 keeps 3 and 4 for the push.
        assert_eq!(
            f.handle(Input::Received {
                source: Some("a"),
                index: 5
            }),
            vec![]
        );
        assert_eq!(f.limit(), 5);
        f.handle(Input::Received {
            source: None,
            index: 3,
        });
        f.handle(Input::Received {
            source: None,
            index: 4,
        });
        assert_eq!(f.handle(Input::PushEnded), vec![Output::Complete]);
        assert_eq!(f.handle(Input::PushEnded), vec![]);
    }

    #[test]
    fn a_missing_chunk_goes_to_another_source_then_to_the_fallback() {
        let mut f = Scheduler::new(cfg(4, 0), 4, [3]);
        f.handle(Input::SourceReady {
            source: "parent",
            fallback: true,
        });
        assert_eq!(
            f.handle(ready("a")),
            vec![
                Output::Limit { below: 3 },
                Output::Request {
                    source: "a",
                    indices: vec![3]
                }
            ]
        );
        assert_eq!(
            f.handle(Input::Missing {
                source: "a",
                index: 3
            }),
            vec![]
        );
        assert_eq!(
            f.handle(ready("b")),
            vec![Output::Request {
                source: "b",
                indices: vec![3]
            }]
        );
        assert_eq!(f.handle(Input::SourceFailed { source: "b" }), vec![]);
        assert_eq!(
            f.handle(Input::PushEnded),
            vec![Output::Request {
                source: "parent",
                indices: vec![3]
            }]
        );
        assert_eq!(
            f.handle(Input::Received {
                source: Some("parent"),
                index: 3
            }),
            vec![Output::Complete]
        );
    }

    #[test]
    fn stuck_when_no_source_can_serve_after_the_push() {
        let mut f = Scheduler::new(cfg(4, 0), 4, [2, 3]);
        f.handle(ready("a"));
        f.handle(Input::Missing {
            source: "a",
            index: 3,
        });
        f.handle(Input::Missing {
            source: "a",
            index: 2,
        });
        assert_eq!(
            f.handle(Input::PushEnded),
            vec![Output::Stuck { missing: 2 }]
        );
    }

    #[test]
    fn a_chunk_the_push_delivers_first_is_not_requested_again() {
        let mut f = Scheduler::new(cfg(1, 0), 3, 0..3);
        f.handle(ready("a"));
        f.handle(Input::Received {
            source: None,
            index: 2,
        });
        // "a" still owes its answer for 2: the window stays used until it comes.
        assert_eq!(
            f.handle(Input::Received {
                source: None,
                index: 0
            }),
            vec![]
        );
        assert_eq!(
            f.handle(Input::Received {
                source: Some("a"),
                index: 2
            }),
            vec![]
        );
        assert_eq!(f.remaining(), 1);
    }

    proptest! {
        /// Whatever the order of arrivals, misses and failures: no chunk is outstanding twice,
        /// no window overflows, the limit never rises, and the transfer ends exactly once,
        /// complete whenever a source that holds everything (the fallback) survives.
        #[test]
        fn any_schedule_ends_once_and_keeps_the_windows(
            n in 1u64..40,
            have in proptest::collection::vec(any::<bool>(), 40),
            window in 1usize..5,
            margin in 0u64..6,
            script in proptest::collection::vec((0u8..6, any::<u8>()), 0..200),
        ) {
            let wanted: Vec<u64> = (0..n).filter(|i| !have[*i as usize]).collect();
            let mut f = Scheduler::new(cfg(window, margin), n, wanted.clone());
            let mut outstanding: BTreeMap<u8, BTreeSet<u64>> = BTreeMap::new();
            let mut push: Vec<u64> = Vec::new();
            let mut ended = 0;
            let mut push_ended = false;
            let mut limit = n;
            let check = |out: Vec<Output<u8>>,
                             outstanding: &mut BTreeMap<u8, BTreeSet<u64>>,
                             limit: &mut u64,
                             ended: &mut u32| {
                for o in out {
                    match o {
                        Output::Limit { below } => {
                            prop_assert!(below < *limit);
                            *limit = below;
                        }
                        Output::Request { source, indices } => {
                            let set = outstanding.entry(source).or_default();
                            for i in indices {
                                prop_assert!(set.insert(i));
                            }
                            prop_assert!(set.len() <= window);
                        }
                        Output::Complete | Output::Stuck { .. } => *ended += 1,
                    }
                }
                Ok(())
            };
            let out = f.handle(Input::SourceReady { source: 0, fallback: true });
            check(out, &mut outstanding, &mut limit, &mut ended)?;
            for (op, arg) in script {
                let src = 1 + arg % 3;
                let out = match op {
                    0 => f.handle(Input::SourceReady { source: src, fallback: false }),
                    1 | 2 => {
                        let Some(i) = outstanding.get(&src).and_then(|s| s.iter().next().copied()) else { continue };
                        outstanding.get_mut(&src).unwrap().remove(&i);
                        if op == 1 {
                            f.handle(Input::Received { source: Some(src), index: i })
                        } else {
                            f.handle(Input::Missing { source: src, index: i })
                        }
                    }
                    3 => {
                        outstanding.remove(&src);
                        f.handle(Input::SourceFailed { source: src })
                    }
                    _ => {
                        let next = wanted
                            .iter()
                            .copied()
                            .find(|i| *i < limit && !push.contains(i));
                        match next {
                            Some(i) if !push_ended => {
                                push.push(i);
                                f.handle(Input::Received { source: None, index: i })
                            }
                            _ if !push_ended => {
                                push_ended = true;
                                f.handle(Input::PushEnded)
                            }
                            _ => continue,
                        }
                    }
                };
                check(out, &mut outstanding, &mut limit, &mut ended)?;
                let all: Vec<u64> = outstanding.values().flatten().copied().collect();
                let unique: BTreeSet<u64> = all.iter().copied().collect();
                prop_assert_eq!(all.len(), unique.len(), "a chunk outstanding twice");
            }
            // Drain: the push finishes, then the fallback answers everything it is asked.
            loop {
                let next = wanted.iter().copied().find(|i| *i < limit && !push.contains(i));
                let out = match next {
                    Some(i) if !push_ended => {
                        push.push(i);
                        f.handle(Input::Received { source: None, index: i })
                    }
                    _ if !push_ended => {
                        push_ended = true;
                        f.handle(Input::PushEnded)
                    }
                    _ => {
                        let pick = outstanding
                            .iter_mut()
                            .find_map(|(s, set)| set.pop_first().map(|i| (*s, i)));
                        match pick {
                            Some((s, i)) => f.handle(Input::Received { source: Some(s), index: i }),
                            None => break,
                        }
                    }
                };
                check(out, &mut outstanding, &mut limit, &mut ended)?;
            }
            prop_assert_eq!(ended, 1);
            prop_assert_eq!(f.remaining(), 0);
        }
    }
}
