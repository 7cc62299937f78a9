//! Starting a planned fault on a target that fits it now, and undoing it.
//!
//! Invariants: a fault's target is picked with the fault's own seeded RNG among the nodes
//! that fit when it starts; every fault started has exactly one heal, which runs at the end
//! of its hold or when the run ends.

use std::sync::atomic::Ordering;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::shared::Shared;
use crate::cluster::{Kind, State};
use crate::plan::{FaultKind, Planned};
use crate::proxy::LinkRule;

/// How a fault is undone.
pub(super) enum Heal {
    Restart(usize),
    Resume(usize),
    Links,
    Disk,
}

impl Heal {
    pub(super) async fn run(self, sh: &Shared, f: &Planned) -> anyhow::Result<()> {
        match self {
            Heal::Restart(i) => {
                sh.start_node(i).await?;
                let inc = sh.nodes[i].lock().unwrap().incarnation;
                sh.event(
                    "restarted",
                    json!({ "fault": f.id, "node": sh.names[i], "process": inc }),
                );
            }
            Heal::Resume(i) => {
                let mut n = sh.nodes[i].lock().unwrap();
                if n.state == State::Paused {
                    n.resume()?;
                }
                drop(n);
                sh.event("resumed", json!({ "fault": f.id, "node": sh.names[i] }));
            }
            Heal::Links => {
                sh.proxy.clear(f.id);
                sh.event("links healed", json!({ "fault": f.id }));
            }
            Heal::Disk => {
                if let Some(t) = &sh.tmpfs {
                    t.free();
                }
                sh.event("disk freed", json!({ "fault": f.id }));
            }
        }
        if f.kind.takes_a_core() {
            sh.core_faults.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Starts fault `f` on the target its pick selects among those that fit now; the reason it
/// cannot otherwise.
pub(super) async fn inject(sh: &Shared, f: &Planned) -> Result<Heal, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(f.pick);
    let pick = |v: &[usize], rng: &mut ChaCha8Rng| -> Option<usize> {
        (!v.is_empty()).then(|| v[rng.random_range(0..v.len())])
    };
    if f.kind.takes_a_core() && !sh.cores_whole() {
        return Err("a core member is still out".into());
    }
    let up = |kind: Kind| -> Vec<usize> {
        sh.of_kind(kind)
            .into_iter()
            .filter(|i| sh.state(*i) == State::Up)
            .collect()
    };
    let latest = sh.latest.lock().unwrap().clone();
    let inner: Vec<usize> = up(Kind::Relay)
        .into_iter()
        .filter(|i| !latest[*i].children.is_empty())
        .collect();
    let detail = |target: &[usize]| -> Value {
        json!({
            "fault": f.id, "kind": f.kind, "hold_s": f.hold.as_secs_f64(), "level": f.level,
            "nodes": target.iter().map(|i| sh.names[*i].clone()).collect::<Vec<_>>(),
        })
    };
    let heal = match f.kind {
        FaultKind::KillLeader | FaultKind::KillFollower => {
            let leader = sh.wait_leader().await.ok_or("no leader")?;
            let target = if f.kind == FaultKind::KillLeader {
                leader
            } else {
                let followers: Vec<usize> = up(Kind::Core)
                    .into_iter()
                    .filter(|i| *i != leader)
                    .collect();
                pick(&followers, &mut rng).ok_or("no follower")?
            };
            sh.core_faults.fetch_add(1, Ordering::SeqCst);
            sh.nodes[target].lock().unwrap().kill();
            sh.event("fault", detail(&[target]));
            Heal::Restart(target)
        }
        FaultKind::KillInnerRelay | FaultKind::KillLeaf => {
            let candidates: Vec<usize> = if f.kind == FaultKind::KillInnerRelay {
                inner.clone()
            } else {
                up(Kind::Relay)
                    .into_iter()
                    .filter(|i| latest[*i].children.is_empty() && !latest[*i].parent.is_empty())
                    .collect()
            };
            let target = pick(&candidates, &mut rng).ok_or("no such relay up")?;
            sh.nodes[target].lock().unwrap().kill();
            sh.event("fault", detail(&[target]));
            Heal::Restart(target)
        }
        FaultKind::PauseCore | FaultKind::PauseRelay => {
            let kind = if f.kind == FaultKind::PauseCore {
                Kind::Core
            } else {
                Kind::Relay
            };
            let target = pick(&up(kind), &mut rng).ok_or("no node up")?;
            if f.kind.takes_a_core() {
                sh.core_faults.fetch_add(1, Ordering::SeqCst);
            }
            sh.nodes[target]
                .lock()
                .unwrap()
                .pause()
                .map_err(|e| e.to_string())?;
            sh.event("fault", detail(&[target]));
            Heal::Resume(target)
        }
        FaultKind::PartitionCoreMinority => {
            let mut cores = sh.of_kind(Kind::Core);
            if cores.len() < 3 {
                return Err("fewer than 3 cores".into());
            }
            let m = (cores.len() - 1) / 2;
            let start = rng.random_range(0..cores.len());
            cores.rotate_left(start);
            let (minority, majority) = cores.split_at(m);
            let links: Vec<(usize, usize)> = minority
                .iter()
                .flat_map(|a| majority.iter().flat_map(move |b| [(*a, *b), (*b, *a)]))
                .collect();
            sh.core_faults.fetch_add(1, Ordering::SeqCst);
            sh.proxy.set(f.id, links, LinkRule::blocked());
            sh.event("fault", detail(minority));
            Heal::Links
        }
        FaultKind::PartitionLeaderAlone => {
            let leader = sh.wait_leader().await.ok_or("no leader")?;
            let links: Vec<(usize, usize)> = (0..sh.names.len())
                .filter(|i| *i != leader)
                .flat_map(|i| [(leader, i), (i, leader)])
                .collect();
            sh.core_faults.fetch_add(1, Ordering::SeqCst);
            sh.proxy.set(f.id, links, LinkRule::blocked());
            sh.event("fault", detail(&[leader]));
            Heal::Links
        }
        FaultKind::PartitionSubtree => {
            let with_parent: Vec<usize> = inner
                .iter()
                .copied()
                .filter(|i| sh.index(&latest[*i].parent).is_some())
                .collect();
            let r = pick(&with_parent, &mut rng).ok_or("no inner relay with a parent")?;
            let p = sh.index(&latest[r].parent).ok_or("parent unknown")?;
            sh.proxy
                .set(f.id, vec![(r, p), (p, r)], LinkRule::blocked());
            sh.event("fault", detail(&[r, p]));
            Heal::Links
        }
        FaultKind::PartitionOneWay => {
            let cores = sh.of_kind(Kind::Core);
            let mut pairs: Vec<(usize, usize)> = cores
                .iter()
                .flat_map(|a| cores.iter().filter(move |b| *b != a).map(move |b| (*a, *b)))
                .collect();
            for r in sh.of_kind(Kind::Relay) {
                if let Some(p) = sh.index(&latest[r].parent) {
                    pairs.push((r, p));
                    pairs.push((p, r));
                }
            }
            let (a, b) = pairs[rng.random_range(0..pairs.len())];
            sh.proxy.set(f.id, vec![(a, b)], LinkRule::blocked());
            sh.event("fault", detail(&[a, b]));
            Heal::Links
        }
        FaultKind::Loss
        | FaultKind::Delay
        | FaultKind::Duplicate
        | FaultKind::Reorder
        | FaultKind::Throttle => {
            let n = sh.names.len();
            let mut all: Vec<usize> = (0..n).collect();
            let k = rng.random_range(1..=3usize).min(n);
            let mut chosen = Vec::new();
            for _ in 0..k {
                chosen.push(all.swap_remove(rng.random_range(0..all.len())));
            }
            let links: Vec<(usize, usize)> = chosen
                .iter()
                .flat_map(|a| {
                    (0..n)
                        .filter(move |b| b != a)
                        .flat_map(move |b| [(*a, b), (b, *a)])
                })
                .collect();
            let rule = match f.kind {
                FaultKind::Loss => LinkRule {
                    drop: f.level,
                    ..Default::default()
                },
                FaultKind::Delay => LinkRule {
                    delay_ms: f.level as u64,
                    jitter_ms: f.level as u64 / 2,
                    ..Default::default()
                },
                FaultKind::Duplicate => LinkRule {
                    duplicate: f.level,
                    ..Default::default()
                },
                FaultKind::Reorder => LinkRule {
                    reorder: f.level,
                    ..Default::default()
                },
                _ => LinkRule {
                    rate_bytes_per_s: Some(f.level as u64),
                    ..Default::default()
                },
            };
            sh.proxy.set(f.id, links, rule);
            sh.event("fault", detail(&chosen));
            Heal::Links
        }
        FaultKind::DiskFull => {
            let (Some(t), Some(i)) = (&sh.tmpfs, sh.disk_node) else {
                return Err("no tmpfs".into());
            };
            let filled = t.fill();
            let mut d = detail(&[i]);
            d["filled_bytes"] = json!(filled);
            sh.event("fault", d);
            Heal::Disk
        }
    };
    Ok(heal)
}
