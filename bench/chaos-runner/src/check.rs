//! The checker: the properties a chaos run must keep, judged from the recorded history and
//! the final copies, each failure naming the first event that broke it.
//!
//! Properties (the verdict fails on any of them):
//! - `lost`: every acknowledged write's record is in every node's final `--file`. A record
//!   overwritten by the marker of the writer's previous write is not lost when that previous
//!   write failed without being seen applied: a failed write may take effect late, once.
//! - `twice`: no write is applied again after the writer's next write was applied. Seen when,
//!   in a core member's final file, a write known to be applied (acknowledged, or read back
//!   after a failure) left its marker over the record of the next write, which is known to be
//!   applied too. (A relay's file showing the same is a relay behind: `lost`.)
//! - `regressions`: within one process's life, no node's visible version goes backwards.
//! - `foreign_roots`: every (version, root) pair a node showed is the core's pair for that
//!   version; where no core sample has that version, the nodes that showed it must agree.
//! - `convergence`: after the faults end, every node reports the core's version and root
//!   within the limit.
//!
//! Reported without failing the verdict: `restart_rewinds` (a restarted process first showing
//! a version below what the node showed before it died; docs/reliability.md has the contract),
//! `unverified_pairs` (pairs no core sample covered), failed writes applied, and records
//! overwritten by a late failed write.

use std::collections::BTreeMap;

use crate::layout::{Layout, SlotContent};

/// One write as the runner recorded it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct WriteRec {
    pub writer: u32,
    pub seq: u64,
    /// The node whose API took it.
    pub node: String,
    /// Seconds since the start of the faults.
    pub invoked_s: f64,
    pub done_s: f64,
    /// The version it was acknowledged with; None if it failed.
    pub version: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// It failed, and its record was read back from a core before the writer moved on.
    pub seen_applied: bool,
}

impl WriteRec {
    fn id(&self) -> String {
        format!("w{:02}#{:06}", self.writer, self.seq)
    }

    fn known_applied(&self) -> bool {
        self.version.is_some() || self.seen_applied
    }

    fn describe(&self) -> String {
        match self.version {
            Some(v) => format!(
                "write {} (acknowledged at {:.3} s with version {v}, via {})",
                self.id(),
                self.done_s,
                self.node
            ),
            None => format!(
                "write {} (failed at {:.3} s via {}{})",
                self.id(),
                self.done_s,
                self.node,
                if self.seen_applied {
                    ", then read back applied"
                } else {
                    ""
                }
            ),
        }
    }
}

/// One status a node showed.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Sample {
    /// Seconds since the start of the faults.
    pub t_s: f64,
    pub node: usize,
    pub incarnation: u32,
    pub version: u64,
    pub root: String,
    pub file_version: Option<u64>,
    /// The node said it leads the core.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub leader: bool,
}

/// What the checker judges.
pub struct Input<'a> {
    pub names: &'a [String],
    /// Which nodes are core members.
    pub is_core: &'a [bool],
    pub layout: Layout,
    pub writes: &'a [WriteRec],
    /// In the order they were taken, per node.
    pub samples: &'a [Sample],
    /// Each node's final `--file` (None: unreadable).
    pub files: &'a [Option<Vec<u8>>],
    /// Seconds from the end of the faults until every node showed the core's pair, and the
    /// last node to get there; None if they never did.
    pub convergence: Option<(f64, String)>,
    pub convergence_limit_s: f64,
}

/// A property that failed.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Failure {
    pub property: String,
    pub count: u64,
    /// The first offending event.
    pub first: String,
}

/// The checker's findings.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Verdict {
    pub acked: u64,
    pub failed: u64,
    /// Failed writes whose record is in the final file.
    pub failed_applied: u64,
    pub lost: u64,
    /// Acknowledged records overwritten by a late failed write (allowed).
    pub overwritten_by_failed: u64,
    pub twice: u64,
    pub regressions: u64,
    pub restart_rewinds: u64,
    /// The first restart rewind, if any.
    pub first_restart_rewind: Option<String>,
    pub foreign_roots: u64,
    pub unverified_pairs: u64,
    pub failures: Vec<Failure>,
    pub pass: bool,
}

/// Runs every property over `input`.
pub fn check(input: &Input) -> Verdict {
    let mut v = Verdict {
        acked: input.writes.iter().filter(|w| w.version.is_some()).count() as u64,
        failed: input.writes.iter().filter(|w| w.version.is_none()).count() as u64,
        ..Default::default()
    };
    writes(input, &mut v);
    versions(input, &mut v);
    roots(input, &mut v);
    match &input.convergence {
        Some((s, _)) if *s <= input.convergence_limit_s => {}
        Some((s, last)) => v.failures.push(Failure {
            property: "convergence".into(),
            count: 1,
            first: format!(
                "{last} reached the core's version and root {s:.3} s after the faults ended (limit {:.1} s)",
                input.convergence_limit_s
            ),
        }),
        None => v.failures.push(Failure {
            property: "convergence".into(),
            count: 1,
            first: "the nodes never all reached the core's version and root".into(),
        }),
    }
    v.pass = v.failures.is_empty();
    v
}

/// `lost` and `twice`, from the final files.
fn writes(input: &Input, v: &mut Verdict) {
    let by_id: BTreeMap<(u32, u64), &WriteRec> = input
        .writes
        .iter()
        .map(|w| ((w.writer, w.seq), w))
        .collect();
    // The earliest-acknowledged write missing anywhere, with where and what was found.
    let mut lost: Vec<(f64, String)> = Vec::new();
    let mut twice: BTreeMap<(u32, u64), (f64, String)> = BTreeMap::new();
    let mut acked: Vec<&WriteRec> = input
        .writes
        .iter()
        .filter(|w| w.version.is_some())
        .collect();
    acked.sort_by(|a, b| a.done_s.total_cmp(&b.done_s));
    for w in acked {
        let prev = w
            .seq
            .checked_sub(1)
            .and_then(|p| by_id.get(&(w.writer, p)).copied());
        let mut missing: Vec<String> = Vec::new();
        let mut overwritten = false;
        for (n, f) in input.files.iter().enumerate() {
            let Some(f) = f else {
                missing.push(format!("{} (no file)", input.names[n]));
                continue;
            };
            match input.layout.slot(f, w.writer, w.seq) {
                SlotContent::Record => {}
                SlotContent::PreviousMarker => match prev {
                    Some(p) if p.known_applied() => {
                        missing.push(format!("{} (the marker of {})", input.names[n], p.id()));
                        if !input.is_core[n] {
                            continue;
                        }
                        twice.entry((p.writer, p.seq)).or_insert((
                            w.done_s,
                            format!(
                                "{} was applied again after {}: its marker is over the record on {}",
                                p.describe(),
                                w.describe(),
                                input.names[n]
                            ),
                        ));
                    }
                    _ => overwritten = true,
                },
                SlotContent::Empty => missing.push(format!("{} (zeros)", input.names[n])),
                SlotContent::Other(s) => missing.push(format!("{} ({s:?})", input.names[n])),
            }
        }
        if !missing.is_empty() {
            lost.push((
                w.done_s,
                format!("{} is missing on {}", w.describe(), missing.join(", ")),
            ));
        } else if overwritten {
            v.overwritten_by_failed += 1;
        }
    }
    // Seen applied twice though the next write failed: the next write is then known applied.
    for w in input
        .writes
        .iter()
        .filter(|w| w.version.is_none() && w.seen_applied)
    {
        let Some(p) = w.seq.checked_sub(1).and_then(|p| by_id.get(&(w.writer, p))) else {
            continue;
        };
        if !p.known_applied() {
            continue;
        }
        for (n, f) in input.files.iter().enumerate() {
            if let (Some(f), true) = (f, input.is_core[n]) {
                if input.layout.slot(f, w.writer, w.seq) == SlotContent::PreviousMarker {
                    twice.entry((p.writer, p.seq)).or_insert((
                        w.done_s,
                        format!(
                            "{} was applied again after {}: its marker is over the record on {}",
                            p.describe(),
                            w.describe(),
                            input.names[n]
                        ),
                    ));
                }
            }
        }
    }
    let reference = input
        .files
        .iter()
        .zip(input.is_core)
        .find_map(|(f, core)| f.as_ref().filter(|_| *core));
    if let Some(f) = reference {
        v.failed_applied = input
            .writes
            .iter()
            .filter(|w| {
                w.version.is_none() && input.layout.slot(f, w.writer, w.seq) == SlotContent::Record
            })
            .count() as u64;
    }
    v.lost = lost.len() as u64;
    if let Some((_, first)) = lost.iter().min_by(|a, b| a.0.total_cmp(&b.0)) {
        v.failures.push(Failure {
            property: "lost".into(),
            count: v.lost,
            first: first.clone(),
        });
    }
    v.twice = twice.len() as u64;
    if let Some((_, first)) = twice.values().min_by(|a, b| a.0.total_cmp(&b.0)) {
        v.failures.push(Failure {
            property: "twice".into(),
            count: v.twice,
            first: first.clone(),
        });
    }
}

/// `regressions` within a process's life; `restart_rewinds` across restarts.
fn versions(input: &Input, v: &mut Verdict) {
    let mut first: Option<(f64, String)> = None;
    // Per node: (incarnation, highest version in it, when), highest before this incarnation,
    // and whether the node is below its high mark now.
    let mut state: BTreeMap<usize, (u32, u64, f64, u64, bool)> = BTreeMap::new();
    for s in input.samples {
        let name = &input.names[s.node];
        let e = state
            .entry(s.node)
            .or_insert((s.incarnation, s.version, s.t_s, 0, false));
        if e.0 != s.incarnation {
            let before = e.1.max(e.3);
            if s.version < before {
                v.restart_rewinds += 1;
                v.first_restart_rewind.get_or_insert_with(|| {
                    format!(
                        "{name} came back (process {}) at version {} at {:.3} s, below the {before} it had shown",
                        s.incarnation, s.version, s.t_s
                    )
                });
            }
            *e = (s.incarnation, s.version, s.t_s, before, false);
            continue;
        }
        if s.version < e.1 {
            if !e.4 {
                v.regressions += 1;
                e.4 = true;
                if first.is_none() {
                    first = Some((
                        s.t_s,
                        format!(
                            "{name} (process {}) showed version {} at {:.3} s after {} at {:.3} s",
                            s.incarnation, s.version, s.t_s, e.1, e.2
                        ),
                    ));
                }
            }
        } else {
            e.4 = false;
            if s.version > e.1 {
                e.1 = s.version;
                e.2 = s.t_s;
            }
        }
    }
    if let Some((_, f)) = first {
        v.failures.push(Failure {
            property: "regressions".into(),
            count: v.regressions,
            first: f,
        });
    }
}

/// `foreign_roots`: pairs against the core's pairs.
fn roots(input: &Input, v: &mut Verdict) {
    let mut by_time: Vec<&Sample> = input.samples.iter().collect();
    by_time.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    let mut core: BTreeMap<u64, &Sample> = BTreeMap::new();
    let mut offending: BTreeMap<(usize, u64, String), (f64, String)> = BTreeMap::new();
    let name = |s: &Sample| input.names[s.node].clone();
    for s in by_time.iter().filter(|s| input.is_core[s.node]) {
        match core.get(&s.version) {
            None => {
                core.insert(s.version, s);
            }
            Some(c) if c.root != s.root => {
                offending
                    .entry((s.node, s.version, s.root.clone()))
                    .or_insert((
                        s.t_s,
                        format!(
                            "core {} showed version {} with root {} at {:.3} s; core {} showed {} at {:.3} s",
                            name(s), s.version, short(&s.root), s.t_s, name(c), short(&c.root), c.t_s
                        ),
                    ));
            }
            Some(_) => {}
        }
    }
    let mut unverified: BTreeMap<u64, &Sample> = BTreeMap::new();
    let mut unverified_pairs = std::collections::BTreeSet::new();
    for s in by_time.iter().filter(|s| !input.is_core[s.node]) {
        let (reference, whose) = match core.get(&s.version) {
            Some(c) => (*c, "the core's"),
            None => {
                unverified_pairs.insert((s.version, s.root.clone()));
                (*unverified.entry(s.version).or_insert(s), "another relay's")
            }
        };
        if reference.root != s.root {
            offending
                .entry((s.node, s.version, s.root.clone()))
                .or_insert((
                    s.t_s,
                    format!(
                        "{} showed version {} with root {} at {:.3} s; {whose} root for it is {} ({} at {:.3} s)",
                        name(s), s.version, short(&s.root), s.t_s, short(&reference.root), name(reference), reference.t_s
                    ),
                ));
        }
    }
    v.unverified_pairs = unverified_pairs.len() as u64;
    v.foreign_roots = offending.len() as u64;
    if let Some((_, first)) = offending.values().min_by(|a, b| a.0.total_cmp(&b.0)) {
        v.failures.push(Failure {
            property: "foreign_roots".into(),
            count: v.foreign_roots,
            first: first.clone(),
        });
    }
}

fn short(root: &str) -> &str {
    &root[..root.len().min(16)]
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Layout = Layout {
        file_len: 1024,
        writers: 2,
    };

    fn write(w: u32, i: u64, t: f64, version: Option<u64>, seen: bool) -> WriteRec {
        WriteRec {
            writer: w,
            seq: i,
            node: "relay-01".into(),
            invoked_s: t,
            done_s: t + 0.1,
            version,
            error: version.is_none().then(|| "timed out".to_string()),
            seen_applied: seen,
        }
    }

    fn apply(file: &mut [u8], w: u32, i: u64) {
        let at = L.offset(w, i) as usize;
        file[at..at + 64].copy_from_slice(&L.payload(w, i));
    }

    fn sample(t: f64, node: usize, inc: u32, version: u64, root: &str) -> Sample {
        Sample {
            t_s: t,
            node,
            incarnation: inc,
            version,
            root: root.into(),
            file_version: None,
            leader: false,
        }
    }

    struct Case {
        names: Vec<String>,
        is_core: Vec<bool>,
        writes: Vec<WriteRec>,
        samples: Vec<Sample>,
        files: Vec<Option<Vec<u8>>>,
        convergence: Option<(f64, String)>,
    }

    impl Case {
        fn new(files: Vec<Vec<u8>>, writes: Vec<WriteRec>) -> Case {
            let n = files.len();
            Case {
                names: (0..n).map(|i| format!("n{i}")).collect(),
                is_core: (0..n).map(|i| i == 0).collect(),
                writes,
                samples: Vec::new(),
                files: files.into_iter().map(Some).collect(),
                convergence: Some((0.5, "n1".into())),
            }
        }

        fn check(&self) -> Verdict {
            check(&Input {
                names: &self.names,
                is_core: &self.is_core,
                layout: L,
                writes: &self.writes,
                samples: &self.samples,
                files: &self.files,
                convergence: self.convergence.clone(),
                convergence_limit_s: 5.0,
            })
        }
    }

    fn props(v: &Verdict) -> Vec<(&str, u64)> {
        v.failures
            .iter()
            .map(|f| (f.property.as_str(), f.count))
            .collect()
    }

    #[test]
    fn a_clean_history_passes() {
        let mut f = vec![0u8; 1024];
        for i in 0..3 {
            apply(&mut f, 0, i);
        }
        let mut c = Case::new(
            vec![f.clone(), f],
            vec![
                write(0, 0, 1.0, Some(2), false),
                write(0, 1, 2.0, Some(3), false),
                write(0, 2, 3.0, None, false),
            ],
        );
        c.samples = vec![
            sample(0.5, 0, 1, 2, "aa"),
            sample(0.6, 1, 1, 2, "aa"),
            sample(1.5, 1, 1, 3, "bb"),
        ];
        let v = c.check();
        assert!(v.pass, "{v:?}");
        assert_eq!((v.acked, v.failed, v.failed_applied), (2, 1, 1));
        assert_eq!(v.unverified_pairs, 1);
    }

    #[test]
    fn a_lost_write_names_the_earliest_acknowledged_and_where() {
        let mut core = vec![0u8; 1024];
        apply(&mut core, 1, 0);
        apply(&mut core, 1, 1);
        let mut relay = vec![0u8; 1024];
        apply(&mut relay, 1, 0);
        let c = Case::new(
            vec![core, relay],
            vec![
                write(1, 0, 1.0, Some(5), false),
                write(1, 1, 2.0, Some(6), false),
            ],
        );
        let v = c.check();
        assert_eq!(props(&v), vec![("lost", 1)]);
        assert_eq!(
            v.failures[0].first,
            "write w01#000001 (acknowledged at 2.100 s with version 6, via relay-01) is missing on \
             n1 (the marker of w01#000000)"
        );
        assert_eq!(v.twice, 0, "a relay's file only lags; the core's has #1");
    }

    #[test]
    fn a_late_failed_write_may_overwrite_once_but_a_read_back_one_may_not() {
        let mut f = vec![0u8; 1024];
        apply(&mut f, 0, 1);
        apply(&mut f, 0, 0);
        let writes = vec![
            write(0, 0, 1.0, None, false),
            write(0, 1, 2.0, Some(9), false),
        ];
        let c = Case::new(vec![f.clone()], writes.clone());
        let v = c.check();
        assert!(v.pass, "{v:?}");
        assert_eq!((v.overwritten_by_failed, v.failed_applied), (1, 1));

        let mut writes = writes;
        writes[0].seen_applied = true;
        let v = Case::new(vec![f], writes).check();
        assert_eq!(props(&v), vec![("lost", 1), ("twice", 1)]);
        assert!(v.failures[1].first.starts_with(
            "write w00#000000 (failed at 1.100 s via relay-01, then read back applied) was applied again after write w00#000001"
        ), "{}", v.failures[1].first);
    }

    #[test]
    fn versions_may_not_go_back_within_a_process() {
        let mut c = Case::new(vec![vec![0u8; 1024]], vec![]);
        c.samples = vec![
            sample(1.0, 0, 1, 5, "a"),
            sample(2.0, 0, 1, 7, "b"),
            sample(3.0, 0, 1, 6, "c"),
            sample(3.5, 0, 1, 6, "c"),
            sample(4.0, 0, 2, 3, "d"),
            sample(5.0, 0, 2, 8, "e"),
        ];
        let v = c.check();
        assert_eq!(props(&v), vec![("regressions", 1)]);
        assert_eq!(
            v.failures[0].first,
            "n0 (process 1) showed version 6 at 3.000 s after 7 at 2.000 s"
        );
        assert_eq!(v.restart_rewinds, 1);
        assert_eq!(
            v.first_restart_rewind.as_deref(),
            Some("n0 came back (process 2) at version 3 at 4.000 s, below the 7 it had shown")
        );
    }

    #[test]
    fn a_pair_that_differs_from_the_core_or_from_other_relays_is_foreign() {
        let mut c = Case::new(vec![vec![0u8; 1024]; 3], vec![]);
        c.samples = vec![
            sample(1.0, 0, 1, 5, "core5"),
            sample(1.2, 1, 1, 5, "core5"),
            sample(1.3, 2, 1, 5, "evil5"),
            sample(2.0, 1, 1, 6, "six"),
            sample(2.1, 2, 1, 6, "other-six"),
        ];
        let v = c.check();
        assert_eq!(props(&v), vec![("foreign_roots", 2)]);
        assert_eq!(
            v.failures[0].first,
            "n2 showed version 5 with root evil5 at 1.300 s; the core's root for it is core5 (n0 at 1.000 s)"
        );
        assert_eq!(v.unverified_pairs, 2);
    }

    #[test]
    fn slow_or_missing_convergence_fails() {
        let mut c = Case::new(vec![vec![0u8; 1024]], vec![]);
        c.convergence = Some((7.25, "relay-09".into()));
        let v = c.check();
        assert_eq!(
            v.failures[0].first,
            "relay-09 reached the core's version and root 7.250 s after the faults ended (limit 5.0 s)"
        );
        c.convergence = None;
        assert_eq!(props(&c.check()), vec![("convergence", 1)]);
    }

    #[test]
    fn an_unreadable_file_loses_every_acknowledged_write() {
        let mut c = Case::new(
            vec![vec![0u8; 1024]],
            vec![write(0, 0, 1.0, Some(2), false)],
        );
        c.files[0] = None;
        let v = c.check();
        assert_eq!(props(&v), vec![("lost", 1)]);
        assert!(v.failures[0].first.ends_with("missing on n0 (no file)"));
    }
}
