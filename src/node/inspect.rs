//! What a node tells about itself: its status, and the subtree below it.
//!
//! Invariants: a status is read under one state lock, so version, root, length and lag
//! describe one moment; a tree query descends at most [`MAX_TREE_DEPTH`] levels and waits at
//! most [`TREE_WAIT`] per level, so a cycle or a dead child cannot hang it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::api::{BackfillView, CoreStatus, MemberStatus, StatsView, Status};
use crate::proto::{self, request};

use super::error::NodeError;
use super::net::exchange;
use super::shared::{now_us, Shared};

/// Longest path a tree query descends.
pub const MAX_TREE_DEPTH: u32 = 64;
/// How long one level of a tree query waits for its children.
const TREE_WAIT: Duration = Duration::from_secs(2);

/// What `/v1/status` reports.
pub(crate) fn status(shared: &Shared) -> Status {
    let (parent, parent_addr) = shared.parent();
    let depth = shared.depth();
    let root_path = shared.root_path();
    let st = shared.state.lock();
    let file = st.replica.file();
    let version = file.version();
    let commit = st.replica.commit_known();
    let lag_seconds = if commit > version && st.replica.last_commit_time_us() > 0 {
        now_us().saturating_sub(st.replica.last_commit_time_us()) as f64 / 1e6
    } else {
        0.0
    };
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
        synced: st.replica.is_synced(),
        commit_version: commit,
        lag_entries: commit.saturating_sub(version),
        lag_seconds,
        file_version: *shared.materialized.borrow(),
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
                })
                .collect(),
        }),
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
