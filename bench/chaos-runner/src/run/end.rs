//! The end of a run: how writes fared around leader faults, convergence, and the copies
//! written to disk.
//!
//! Invariants: convergence counts from the moment every fault was healed, to the moment the
//! last node began to show, without a break, the pair the leader showed at the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde_json::Value;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::shared::Shared;
use crate::check::{Sample, WriteRec};
use crate::plan::FaultKind;

/// How writes fared after the leader was killed or cut off.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LeaderFault {
    pub kind: String,
    pub t_s: f64,
    pub hold_s: f64,
    /// The leader it was made on.
    pub leader: String,
    /// From the fault to the first sample of another core member saying it leads.
    pub other_leader_after_s: Option<f64>,
    /// From the fault to the first sample of the same node leading again (after its restart
    /// or the end of its isolation).
    pub same_leader_after_s: Option<f64>,
    /// From the fault to the first acknowledgment of a write invoked after it.
    pub first_ack_after_s: Option<f64>,
}

/// Leader faults among `events`, with the next leader and the first acknowledgment after each.
pub(super) fn leader_faults(
    events: &[Value],
    writes: &[WriteRec],
    samples: &[Sample],
    names: &[String],
) -> Vec<LeaderFault> {
    let kinds = [FaultKind::KillLeader, FaultKind::PartitionLeaderAlone].map(|k| k.name());
    events
        .iter()
        .filter(|e| e["event"] == "fault")
        .filter_map(|e| {
            let kind = e["kind"].as_str()?;
            kinds.iter().any(|k| k == kind).then_some(())?;
            let t = e["t_s"].as_f64()?;
            let leader = e["nodes"][0].as_str()?.to_string();
            let ms = |d: f64| ((d - t) * 1e3).round() / 1e3;
            let next_leading = |same: bool| {
                samples
                    .iter()
                    .filter(|s| s.leader && s.t_s > t && (names[s.node] == leader) == same)
                    .map(|s| s.t_s)
                    .min_by(f64::total_cmp)
                    .map(ms)
            };
            let first = writes
                .iter()
                .filter(|w| w.version.is_some() && w.invoked_s >= t)
                .map(|w| w.done_s)
                .min_by(f64::total_cmp);
            Some(LeaderFault {
                kind: kind.to_string(),
                t_s: t,
                hold_s: e["hold_s"].as_f64().unwrap_or(0.0),
                other_leader_after_s: next_leading(false),
                same_leader_after_s: next_leading(true),
                first_ack_after_s: first.map(ms),
                leader,
            })
        })
        .collect()
}

/// Polls every node until each shows the leader's (version, root) and `writers_done`; the
/// seconds from `healed` until the last node got there, and which node that was.
pub(super) async fn converge(
    sh: &Arc<Shared>,
    healed: Instant,
    writers_done: &AtomicBool,
) -> Option<(f64, String)> {
    let deadline = healed + sh.cfg.converge_timeout;
    let n = sh.names.len();
    // When each node started to show the current target pair without a break.
    let mut since: Vec<Option<Instant>> = vec![None; n];
    let mut target: Option<(u64, String)> = None;
    while Instant::now() < deadline {
        let mut set = JoinSet::new();
        for i in 0..n {
            let sh = sh.clone();
            set.spawn(async move { (i, sh.status(i, Duration::from_secs(2)).await) });
        }
        let mut pairs: Vec<Option<(u64, String, String)>> = vec![None; n];
        while let Some(Ok((i, s))) = set.join_next().await {
            pairs[i] = s.and_then(|s| {
                Some((
                    s["version"].as_u64()?,
                    s["root"].as_str()?.to_string(),
                    s["role"].as_str()?.to_string(),
                ))
            });
        }
        let now = Instant::now();
        let leader = pairs
            .iter()
            .flatten()
            .find(|p| p.2 == "leader")
            .map(|p| (p.0, p.1.clone()));
        if leader != target {
            since = vec![None; n];
            target = leader;
        }
        if let Some((tv, tr)) = &target {
            for i in 0..n {
                match &pairs[i] {
                    Some((v, r, _)) if v == tv && r == tr => {
                        since[i].get_or_insert(now);
                    }
                    _ => since[i] = None,
                }
            }
            if since.iter().all(Option::is_some) && writers_done.load(Ordering::SeqCst) {
                let (last, at) = since
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (i, t.unwrap_or(now)))
                    .max_by_key(|(_, t)| *t)
                    .unwrap_or((0, now));
                let s = at.saturating_duration_since(healed).as_secs_f64();
                return Some(((s * 1e3).round() / 1e3, sh.names[last].clone()));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Waits until every node's `--file` holds the version it shows.
pub(super) async fn materialized(sh: &Arc<Shared>) -> anyhow::Result<()> {
    let deadline = Instant::now() + sh.cfg.converge_timeout;
    loop {
        let mut behind = Vec::new();
        for i in 0..sh.names.len() {
            let ok = sh.status(i, Duration::from_secs(2)).await.is_some_and(|s| {
                s["version"].as_u64().is_some() && s["file_version"] == s["version"]
            });
            if !ok {
                behind.push(sh.names[i].clone());
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("copies not written: {behind:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
