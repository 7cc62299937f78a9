//! The seeded fault schedule of a chaos run: which kind of fault starts when, how long it
//! holds, and the random numbers that pick its target and its strength.
//!
//! Invariants:
//! - A plan is a pure function of (seed, duration, whether a disk fault is possible): one seed
//!   replays the same schedule. Targets named by role (the leader, an inner relay) are
//!   resolved when the fault starts, from the cluster as it is then, with the planned pick.
//! - Every kind comes once, in a seeded order, before any kind comes twice.
//! - Faults that take a core member out (kills, pauses, partitions of cores) never overlap,
//!   and leave `CORE_MARGIN` after their end for the restart and the election: with three
//!   cores one is lost at a time, which the core is built to survive.
//! - Every fault starts at least `MIN_HOLD` before `duration`. Holds are not cut at the end:
//!   the faults still holding then are healed together when the run ends, so the convergence
//!   the runner times is a recovery from live faults.

use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// When the first fault may start.
const FIRST_AT: Duration = Duration::from_secs(2);
/// Kept free after a core fault ends: a killed core restarts and an election may follow.
const CORE_MARGIN: Duration = Duration::from_secs(3);
/// The last fault starts at least this long before the end.
const MIN_HOLD: Duration = Duration::from_millis(500);

/// The kinds of faults.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// `kill -9` of the Raft leader, restarted after the hold.
    KillLeader,
    /// `kill -9` of a follower core, restarted after the hold.
    KillFollower,
    /// `kill -9` of a relay with children, restarted after the hold.
    KillInnerRelay,
    /// `kill -9` of a relay without children, restarted after the hold.
    KillLeaf,
    /// SIGSTOP of a core, SIGCONT after the hold.
    PauseCore,
    /// SIGSTOP of a relay, SIGCONT after the hold.
    PauseRelay,
    /// A minority of the cores cut off from the other cores.
    PartitionCoreMinority,
    /// The leader cut off from every other node.
    PartitionLeaderAlone,
    /// A relay with children cut off from its parent.
    PartitionSubtree,
    /// One direction of a core-core or relay-parent link dropped.
    PartitionOneWay,
    /// 5-30 % of the packets of every link of 1-3 nodes lost.
    Loss,
    /// 20-150 ms delay with up to half as much jitter on every link of 1-3 nodes.
    Delay,
    /// 5-20 % of the packets of every link of 1-3 nodes sent twice.
    Duplicate,
    /// 10-30 % of the packets of every link of 1-3 nodes held back 5-30 ms.
    Reorder,
    /// Every link of 1-3 nodes throttled to 0.2-2 MB/s.
    Throttle,
    /// The tmpfs that holds one relay's `--data` and `--file` filled up, freed after the hold.
    DiskFull,
}

impl FaultKind {
    /// Every kind, in declaration order.
    pub const ALL: [FaultKind; 16] = [
        FaultKind::KillLeader,
        FaultKind::KillFollower,
        FaultKind::KillInnerRelay,
        FaultKind::KillLeaf,
        FaultKind::PauseCore,
        FaultKind::PauseRelay,
        FaultKind::PartitionCoreMinority,
        FaultKind::PartitionLeaderAlone,
        FaultKind::PartitionSubtree,
        FaultKind::PartitionOneWay,
        FaultKind::Loss,
        FaultKind::Delay,
        FaultKind::Duplicate,
        FaultKind::Reorder,
        FaultKind::Throttle,
        FaultKind::DiskFull,
    ];

    /// The kind's name in reports (snake case).
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// Whether the fault takes a core member out of the quorum.
    pub fn takes_a_core(self) -> bool {
        matches!(
            self,
            FaultKind::KillLeader
                | FaultKind::KillFollower
                | FaultKind::PauseCore
                | FaultKind::PartitionCoreMinority
                | FaultKind::PartitionLeaderAlone
        )
    }

    /// How long a fault of this kind holds (the range the seed draws from).
    fn hold_range(self) -> (f64, f64) {
        match self {
            FaultKind::KillLeader
            | FaultKind::KillFollower
            | FaultKind::KillInnerRelay
            | FaultKind::KillLeaf => (1.0, 5.0),
            FaultKind::PauseCore | FaultKind::PauseRelay => (1.0, 4.0),
            FaultKind::PartitionCoreMinority
            | FaultKind::PartitionLeaderAlone
            | FaultKind::PartitionSubtree
            | FaultKind::PartitionOneWay => (2.0, 6.0),
            _ => (3.0, 8.0),
        }
    }

    /// The strength a fault of this kind draws from (probability, ms or bytes/s; 0 if none).
    fn level_range(self) -> (f64, f64) {
        match self {
            FaultKind::Loss => (0.05, 0.30),
            FaultKind::Delay => (20.0, 150.0),
            FaultKind::Duplicate => (0.05, 0.20),
            FaultKind::Reorder => (0.10, 0.30),
            FaultKind::Throttle => (200_000.0, 2_000_000.0),
            _ => (0.0, 0.0),
        }
    }
}

/// One planned fault.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Planned {
    /// Its number in the plan (from 1).
    pub id: u64,
    /// When it starts, from the start of the faults.
    #[serde(rename = "at_s", serialize_with = "seconds")]
    pub at: Duration,
    pub kind: FaultKind,
    /// How long it holds before it is healed.
    #[serde(rename = "hold_s", serialize_with = "seconds")]
    pub hold: Duration,
    /// Picks the target among those that fit when it starts.
    pub pick: u64,
    /// Its strength (see [`FaultKind`]).
    pub level: f64,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e3).round() / 1e3)
}

/// The schedule of `seed` for faults over `duration`; `disk` says whether a disk fault can be
/// made (its tmpfs is mounted).
pub fn plan(seed: u64, duration: Duration, disk: bool) -> Vec<Planned> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let kinds: Vec<FaultKind> = FaultKind::ALL
        .into_iter()
        .filter(|k| disk || *k != FaultKind::DiskFull)
        .collect();
    let mut first_round = kinds.clone();
    first_round.shuffle(&mut rng);
    let mut out = Vec::new();
    let mut t = FIRST_AT;
    let mut core_free_at = Duration::ZERO;
    loop {
        let core_free = t >= core_free_at;
        let fits = |k: &FaultKind| core_free || !k.takes_a_core();
        let kind = if let Some(i) = first_round.iter().position(fits) {
            first_round.remove(i)
        } else {
            let choices: Vec<FaultKind> = kinds.iter().copied().filter(fits).collect();
            choices[rng.random_range(0..choices.len())]
        };
        if t + MIN_HOLD > duration {
            break;
        }
        let (lo, hi) = kind.hold_range();
        let hold = Duration::from_secs_f64(rng.random_range(lo..=hi));
        let (lo, hi) = kind.level_range();
        let level = if hi > lo {
            rng.random_range(lo..=hi)
        } else {
            0.0
        };
        if kind.takes_a_core() {
            core_free_at = t + hold + CORE_MARGIN;
        }
        out.push(Planned {
            id: out.len() as u64 + 1,
            at: t,
            kind,
            hold,
            pick: rng.random(),
            level,
        });
        t += Duration::from_secs_f64(rng.random_range(1.0..=3.0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn a_seed_replays_its_plan() {
        let a = plan(11, Duration::from_secs(120), true);
        assert_eq!(a, plan(11, Duration::from_secs(120), true));
        assert_ne!(a, plan(12, Duration::from_secs(120), true));
        assert!(a.len() >= 40, "{} faults in 120 s", a.len());
    }

    #[test]
    fn every_kind_comes_in_a_minute_and_core_faults_never_overlap() {
        for seed in 0..50 {
            for disk in [true, false] {
                let p = plan(seed, Duration::from_secs(60), disk);
                let kinds: BTreeSet<FaultKind> = p.iter().map(|f| f.kind).collect();
                let want = if disk { 16 } else { 15 };
                assert_eq!(kinds.len(), want, "seed {seed}: {kinds:?}");
                assert_eq!(kinds.contains(&FaultKind::DiskFull), disk);
                let core: Vec<&Planned> = p.iter().filter(|f| f.kind.takes_a_core()).collect();
                for w in core.windows(2) {
                    assert!(w[1].at >= w[0].at + w[0].hold + CORE_MARGIN, "seed {seed}");
                }
                let last = p.last().unwrap().at;
                assert!(last + MIN_HOLD + Duration::from_secs(3) > Duration::from_secs(60));
                for f in &p {
                    assert!(f.at + MIN_HOLD <= Duration::from_secs(60), "seed {seed}");
                    let (lo, hi) = f.kind.hold_range();
                    assert!(f.hold.as_secs_f64() >= lo && f.hold.as_secs_f64() <= hi);
                    let (lo, hi) = f.kind.level_range();
                    assert!(f.level >= lo && f.level <= hi);
                }
            }
        }
    }

    #[test]
    fn kinds_have_snake_case_names() {
        assert_eq!(FaultKind::KillInnerRelay.name(), "kill_inner_relay");
        assert_eq!(FaultKind::DiskFull.name(), "disk_full");
        let f = &plan(3, Duration::from_secs(10), false)[0];
        let j = serde_json::to_value(f).unwrap();
        assert_eq!(j["at_s"], 2.0);
        assert_eq!(j["hold_s"], (f.hold.as_secs_f64() * 1e3).round() / 1e3);
    }
}
