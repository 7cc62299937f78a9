//! Raft state as a serializable status and as Prometheus metrics labelled with the member
//! name, and the filter that keeps openraft's peer failures out of the ERROR log.
//!
//! Invariants:
//! - The gauges follow every change of openraft's metrics until the Raft instance stops.
//! - `canopy_raft_elections_total` grows by how much the term grew since the previous
//!   observation (each term is one election); the term found at startup counts nothing.

use openraft::metrics::RaftMetrics;
use openraft::ServerState;
use tokio::sync::watch;
use tracing::subscriber::Interest;
use tracing::{Level, Metadata};
use tracing_subscriber::layer::{Context, Layer};

use super::{CommittedIndex, Member, NodeId};

/// A tracing layer that drops openraft's ERROR events for a failed RPC to a peer (its
/// replication's `RPCError` and its vote requests' `timeout` and `while requesting vote`).
/// openraft reports each such failure again at WARN, and [`super::Network`] logs a peer becoming
/// unreachable (WARN) and reachable again (INFO) once: a paused, restarting or partitioned
/// peer is an expected, recovered condition, not an error. Every other event passes.
#[derive(Clone, Copy, Debug, Default)]
pub struct QuietPeerErrors;

impl QuietPeerErrors {
    fn drops(meta: &Metadata<'_>) -> bool {
        if !meta.is_event() || *meta.level() != Level::ERROR {
            return false;
        }
        let fields = meta.fields();
        match meta.target() {
            "openraft::replication" => fields.field("err").is_some(),
            "openraft::core::raft_core" => {
                fields.field("target").is_some() && fields.field("error").is_some()
            }
            _ => false,
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for QuietPeerErrors {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if Self::drops(meta) {
            Interest::never()
        } else {
            Interest::always()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>, _: Context<'_, S>) -> bool {
        !Self::drops(meta)
    }
}

/// A summary of one core node's Raft state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RaftStatus {
    pub term: u64,
    /// The leader's name, if one is known.
    pub leader: Option<String>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub last_log_index: Option<u64>,
    /// openraft's server state: Leader, Follower, Candidate, Learner or Shutdown.
    pub state: String,
    /// The root cross-checks this member made.
    pub root_checks: super::RootCheckCounts,
}

/// Export the Raft metrics of node `node` until `metrics` closes.
pub(super) async fn export(
    mut metrics: watch::Receiver<RaftMetrics<NodeId, Member>>,
    committed: CommittedIndex,
    node: String,
) {
    let label = [("node", node)];
    let term = metrics::gauge!("canopy_raft_term", &label);
    let is_leader = metrics::gauge!("canopy_raft_is_leader", &label);
    let commit_index = metrics::gauge!("canopy_raft_commit_index", &label);
    let applied_index = metrics::gauge!("canopy_raft_applied_index", &label);
    let last_log_index = metrics::gauge!("canopy_raft_last_log_index", &label);
    let elections = metrics::counter!("canopy_raft_elections_total", &label);
    let mut last_term = None;
    loop {
        {
            let m = metrics.borrow_and_update();
            if let Some(prev) = last_term {
                if m.current_term > prev {
                    elections.increment(m.current_term - prev);
                }
            }
            last_term = Some(m.current_term);
            term.set(m.current_term as f64);
            let leading = m.state == ServerState::Leader && m.current_leader == Some(m.id);
            is_leader.set(if leading { 1.0 } else { 0.0 });
            commit_index.set(committed.get().map_or(0.0, |i| i as f64));
            applied_index.set(m.last_applied.map_or(0.0, |id| id.index as f64));
            last_log_index.set(m.last_log_index.map_or(0.0, |i| i as f64));
        }
        if metrics.changed().await.is_err() {
            is_leader.set(0.0);
            return;
        }
    }
}
