//! What a node tells about itself: its status, and the subtree below it.
//!
//! Invariants: a status is read under one state lock, so version, root, length and lag
//! describe one moment; a tree query descends at most [`MAX_TREE_DEPTH`] levels and waits at
//! most [`TREE_WAIT`] per level, so a cycle or a dead child cannot hang it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::api::{BackfillView, CoreStatus, MemberStatus, StatsView, Status};
use crate::metrics::Live;
use crate::proto::{self, request};

use super::error::NodeError;
use super::net::exchange;
use super::shared::{now_us, Shared, State};

/// Longest path a tree query descends.
pub const MAX_TREE_DEPTH: u32 = 64;
/// How long one level of a tree query waits for its children.
const TREE_WAIT: Duration = Duration::from_secs(2);

/// What a line of a streamed watch reports: [`status`]'s version fields alone.
pub(crate) fn shown(shared: &Shared) -> crate::api::Shown {
    let st = shared.state.lock();
    let file = st.replica.file();
    let (commit_version, _) = lag(&st);
    crate::api::Shown {
        version: file.version(),
        root: file.root_hex(),
        commit_version,
        file_version: shared.materialized.borrow().map(|(v, _)| v),
    }
}

/// What `/v1/status` reports.
pub(crate) fn status(shared: &Shared) -> Status {
    let (parent, parent_addr) = shared.parent();
    let (report, held_for) = {
        let cell = shared.overlay.lock();
        (cell.overlay.report(), cell.overlay.me().held_for.clone())
    };
    let depth = shared.depth();
    let root_path = shared.root_path();
    let st = shared.state.lock();
    let file = st.replica.file();
    let version = file.version();
    let (commit, lag_seconds) = lag(&st);
    let role = match shared.core.get() {
        Some(c) if c.is_leader() => "leader",
        Some(_) => "follower",
        None if shared.cfg.is_core() => "follower",
        None => "relay",
    };
    let stats = &shared.stats;
    Status {
        name: shared.cfg.name.clone(),
        role: role.to_string(),
        version,
        root: file.root_hex(),
        length: file.len(),
        parent,
        parent_addr: parent_addr.clone(),
        children: st.children.values().map(|c| c.name.clone()).collect(),
        child_addrs: st.children.values().map(|c| c.addr.clone()).collect(),
        depth,
        root_path,
        subtree_height: report.height,
        room: report.room,
        subtree_size: report.size,
        held_for,
        synced: st.replica.is_synced(),
        commit_version: commit,
        lag_entries: commit.saturating_sub(version),
        lag_seconds,
        file_version: shared.materialized.borrow().map(|(v, _)| v),
        file_root: shared.materialized.borrow().map(|(_, r)| hex::encode(r)),
        file_path: shared.cfg.file.as_ref().map(|p| p.display().to_string()),
        file_method: shared
            .materialize_method
            .get()
            .map(|m| m.as_str().to_string()),
        file_bytes_written: shared.materialize_bytes.load(Ordering::Relaxed),
        file_writes: shared.materialize_writes.load(Ordering::Relaxed),
        disk_full: shared.disk_full.load(Ordering::Relaxed),
        core_addrs: shared.core_addrs(&st),
        stats: StatsView {
            entries_applied: stats.entries_applied.load(Ordering::Relaxed),
            snapshots_installed: stats.snapshots_installed.load(Ordering::Relaxed),
            gaps: stats.gaps.load(Ordering::Relaxed),
            resumes: stats.resumes.load(Ordering::Relaxed),
            backfill_received_bytes: stats.backfill_received.load(Ordering::Relaxed),
            backfill_from_peers_bytes: stats.backfill_from_peers.load(Ordering::Relaxed),
            bad_chunks: stats.bad_chunks.load(Ordering::Relaxed),
            relayed_bytes: shared.relayed.load(Ordering::Relaxed),
        },
        backfill: st
            .replica
            .backfill_progress()
            .map(|(bytes_done, bytes_total)| BackfillView {
                bytes_done,
                bytes_total,
                sources: std::iter::once(parent_addr)
                    .chain(st.fetch_peers.iter().cloned())
                    .collect(),
            }),
        backfills_serving: shared.serving.now.load(Ordering::Acquire),
        backfills_serving_most: shared.serving.most.load(Ordering::Acquire),
        core: shared.core.get().map(|c| CoreStatus {
            raft: c.status(),
            members: c
                .members()
                .into_iter()
                .map(|(m, voter)| MemberStatus {
                    name: m.name,
                    addr: m.addr,
                    voter,
                    role: None,
                    health: None,
                    version: None,
                    lag_entries: None,
                })
                .collect(),
        }),
    }
}

/// The commit version this node knows of, and the age of the version it shows while it is
/// behind (it knows of a newer commit, or it receives a transfer), else 0: what
/// `/v1/status` and `canopy_lag_seconds` both report.
fn lag(st: &State) -> (u64, f64) {
    let version = st.replica.file().version();
    let commit = st.replica.commit_known();
    let behind = commit > version || st.replica.backfill_progress().is_some();
    let lag_seconds = if behind && st.replica.last_commit_time_us() > 0 {
        now_us().saturating_sub(st.replica.last_commit_time_us()) as f64 / 1e6
    } else {
        0.0
    };
    (commit, lag_seconds)
}

/// This node's position as of now, for a scrape of `/metrics`.
pub(crate) fn live(shared: &Shared) -> Live {
    let depth = shared.depth();
    let st = shared.state.lock();
    let version = st.replica.file().version();
    let (commit, lag_seconds) = lag(&st);
    Live {
        node: shared.cfg.name.clone(),
        applied_version: version,
        commit_version: commit,
        lag_entries: commit.saturating_sub(version),
        lag_seconds,
        depth,
        materialized_version: shared.materialized.borrow().map(|(v, _)| v),
        backfill: st.replica.backfill_progress(),
        udp_drops: shared
            .endpoint
            .local_addr()
            .ok()
            .and_then(crate::udp::drops),
        request_bytes_held: shared.requests.held() as u64,
    }
}

/// This node and its subtree, gathered from the children over QUIC (each level waits at
/// most [`TREE_WAIT`] for its children; `budget` bounds the depth against cycles).
pub(crate) async fn tree(shared: &Shared, budget: u32) -> Vec<proto::TreeNode> {
    let (parent, _) = shared.parent();
    let depth = shared.depth().unwrap_or(0);
    let (me, kids) = {
        let st = shared.state.lock();
        let version = st.replica.file().version();
        let me = proto::TreeNode {
            name: shared.cfg.name.clone(),
            addr: shared.cfg.advertise.to_string(),
            parent,
            depth,
            version,
            children: st.children.len() as u32,
            lag_entries: st.replica.commit_known().saturating_sub(version),
        };
        let kids: Vec<String> = st.children.values().map(|c| c.addr.clone()).collect();
        (me, kids)
    };
    let mut nodes = vec![me];
    if budget == 0 {
        return nodes;
    }
    let asks = kids.into_iter().map(|addr| async move {
        let kind = request::Kind::Tree(proto::TreeQuery { budget: budget - 1 });
        let r: Result<proto::TreeReply, NodeError> = exchange(shared, &addr, kind).await;
        r.map(|r| r.nodes).unwrap_or_default()
    });
    let wait = TREE_WAIT * budget.min(8);
    if let Ok(subtrees) = tokio::time::timeout(wait, futures::future::join_all(asks)).await {
        nodes.extend(subtrees.into_iter().flatten());
    }
    nodes
}

/// The whole tree as this node can show it: on a core member, its own subtree merged with
/// the subtrees of every other member (asked over QUIC, at most [`TREE_WAIT`] times 8), so
/// any core node shows every node; on a relay, its own subtree. A node reported twice (one
/// moving between parents while the answers were gathered) is kept once, at its first place.
pub(crate) async fn whole_tree(shared: &Shared) -> Vec<proto::TreeNode> {
    let Some(core) = shared.core.get() else {
        return tree(shared, MAX_TREE_DEPTH).await;
    };
    let me = shared.cfg.name.clone();
    let others: Vec<String> = core
        .members()
        .into_iter()
        .filter(|(m, _)| m.name != me)
        .map(|(m, _)| m.addr)
        .collect();
    let asks = others.into_iter().map(|addr| async move {
        let kind = request::Kind::Tree(proto::TreeQuery {
            budget: MAX_TREE_DEPTH,
        });
        let r: Result<proto::TreeReply, NodeError> = exchange(shared, &addr, kind).await;
        r.map(|r| r.nodes).unwrap_or_default()
    });
    let (own, theirs) = tokio::join!(
        tree(shared, MAX_TREE_DEPTH),
        tokio::time::timeout(TREE_WAIT * 8, futures::future::join_all(asks))
    );
    let mut seen = std::collections::BTreeSet::new();
    own.into_iter()
        .chain(theirs.unwrap_or_default().into_iter().flatten())
        .filter(|n| seen.insert(n.name.clone()))
        .collect()
}

/// How long a member has to answer a health query.
const MEMBER_WAIT: Duration = Duration::from_secs(2);

/// The core's members with their role as this node knows it, and each one's health and lag
/// as it answers now (a one-node tree query over QUIC, at most [`MEMBER_WAIT`]); `None` on a
/// relay.
pub(crate) async fn core_members(shared: &Shared) -> Option<CoreStatus> {
    let mut core = status(shared).core?;
    let leader = core.raft.leader.clone();
    let me = shared.cfg.name.clone();
    let asks = core.members.iter().map(|m| {
        let (name, addr) = (m.name.clone(), m.addr.clone());
        let me = me.clone();
        async move {
            if name == me {
                let st = shared.state.lock();
                let version = st.replica.file().version();
                return Ok((version, st.replica.commit_known().max(version)));
            }
            let kind = request::Kind::Tree(proto::TreeQuery { budget: 0 });
            let r: Result<proto::TreeReply, NodeError> =
                match tokio::time::timeout(MEMBER_WAIT, exchange(shared, &addr, kind)).await {
                    Ok(r) => r,
                    Err(_) => return Err(format!("no answer within {MEMBER_WAIT:?}")),
                };
            match r {
                Ok(reply) => reply
                    .nodes
                    .first()
                    .map(|n| (n.version, n.version.saturating_add(n.lag_entries)))
                    .ok_or_else(|| "an empty answer".to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    });
    let answers = futures::future::join_all(asks).await;
    let commit = answers
        .iter()
        .filter_map(|a| a.as_ref().ok().map(|(_, c)| *c))
        .max()
        .unwrap_or(0);
    for (m, a) in core.members.iter_mut().zip(answers) {
        m.role = Some(
            if leader.as_deref() == Some(m.name.as_str()) {
                "leader"
            } else if m.voter {
                "follower"
            } else {
                "learner"
            }
            .to_string(),
        );
        match a {
            Ok((version, _)) => {
                m.health = Some("ok".into());
                m.version = Some(version);
                m.lag_entries = Some(commit.saturating_sub(version));
            }
            Err(why) => m.health = Some(format!("unreachable: {why}")),
        }
    }
    Some(core)
}
