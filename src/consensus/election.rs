//! Leader liveness and elections: the leader's heartbeats on the control connection, Canopy's
//! pre-vote, and the one task that starts elections.
//!
//! Invariants:
//! - openraft never starts an election by itself (its `enable_elect` is off); only
//!   [`run_elections`] does, by `trigger().elect()`, and only after a pre-vote round in which a
//!   majority of every voter set of the current membership (this member included) granted it.
//!   A member grants a pre-vote when it is not the leader, has heard from no leader for the
//!   pre-vote lease, and the candidate's last log id is at least its own. A pre-vote changes no
//!   state: a member cut off from the others never raises its term, so when it comes back its
//!   vote cannot depose a healthy leader.
//! - A member hears from a leader when a heartbeat, AppendEntries or InstallSnapshot carrying a
//!   vote at least as high as its own arrives, counted on arrival, before its Raft loop handles
//!   it: a member whose Raft loop is busy writing a large entry still hears its leader.
//! - The leader sends a heartbeat to every other member each heartbeat interval on the control
//!   connection, which carries no AppendEntries with entries, so heartbeats never queue behind
//!   a large entry. It does so while openraft says it leads and its Raft loop answered a probe
//!   within `max_stall` (a leader whose storage hangs stops asserting leadership).
//! - Election attempts are spaced by a timeout drawn uniformly from
//!   `[election_timeout_min, election_timeout_max)` after the later of the last leader contact
//!   and the last attempt.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{Raft, ServerState, Vote};
use tokio::time::Instant;

use super::network::Network;
use super::{LogId, Member, NodeId, TypeConfig};

/// A pre-vote request: would the receiver vote for `candidate` with this log?
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    /// The candidate's current term (its election would use the next one).
    pub term: u64,
    pub last_log_id: Option<LogId>,
}

/// The answer to a [`PreVoteRequest`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PreVoteResponse {
    pub granted: bool,
    /// The receiver's current term.
    pub term: u64,
}

/// The leader's liveness heartbeat.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Heartbeat {
    pub vote: Vote<NodeId>,
}

/// The answer to a [`Heartbeat`]: the receiver's vote.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct HeartbeatResponse {
    pub vote: Vote<NodeId>,
}

/// Election timing, derived from [`super::RaftConfig`].
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    /// A member grants pre-votes only after hearing from no leader for this long.
    pub pre_vote_lease: Duration,
    /// How long a pre-vote or heartbeat RPC may take.
    pub rpc_ttl: Duration,
    pub max_stall: Duration,
}

/// What this member knows about leader liveness.
pub struct Liveness {
    contact: Mutex<Instant>,
    acks: Mutex<BTreeMap<NodeId, Instant>>,
    probe: Mutex<Option<Instant>>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            contact: Mutex::new(Instant::now()),
            acks: Mutex::default(),
            probe: Mutex::default(),
        }
    }
}

impl Liveness {
    /// A message from a leader with vote `theirs` arrived while this member's vote is `mine`.
    pub fn heard(&self, theirs: &Vote<NodeId>, mine: &Vote<NodeId>) {
        if leads_at_least(theirs, mine) {
            *self.contact.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }

    /// When this member last heard from a leader (or started).
    pub fn contact(&self) -> Instant {
        *self.contact.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self) {
        *self.contact.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Leader side: member `id` acknowledged a heartbeat.
    fn acked(&self, id: NodeId) {
        self.acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Instant::now());
    }

    /// Leader side: whether member `id` acknowledged a heartbeat within `within`.
    pub fn reachable(&self, id: NodeId, within: Duration) -> bool {
        self.acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .is_some_and(|t| t.elapsed() <= within)
    }

    fn stalled(&self, max: Duration) -> bool {
        self.probe
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() > max)
    }

    fn set_probe(&self, started: Option<Instant>) {
        *self.probe.lock().unwrap_or_else(|e| e.into_inner()) = started;
    }
}

/// Whether `theirs` is a leader's (committed) vote at least as high as `mine`. Unlike openraft's
/// partial order this never panics on two committed votes of one term (which only a faulty
/// peer could send).
pub fn leads_at_least(theirs: &Vote<NodeId>, mine: &Vote<NodeId>) -> bool {
    let (t, m) = (&theirs.leader_id, &mine.leader_id);
    theirs.is_committed()
        && (t.term > m.term
            || (t.term == m.term && (t.node_id == m.node_id || !mine.is_committed())))
}

/// Answer a pre-vote on this member; see the module docs.
pub fn answer_pre_vote(
    raft: &Raft<TypeConfig>,
    liveness: &Liveness,
    timing: &Timing,
    last_log_id: Option<LogId>,
    req: &PreVoteRequest,
) -> PreVoteResponse {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let leading = m.state == ServerState::Leader;
    let quiet = liveness.contact().elapsed() >= timing.pre_vote_lease;
    let log_ok = req.last_log_id >= last_log_id;
    let granted = !leading && quiet && log_ok;
    tracing::debug!(
        candidate = req.candidate,
        granted,
        leading,
        quiet,
        log_ok,
        "pre-vote"
    );
    PreVoteResponse {
        granted,
        term: m.current_term,
    }
}

/// Whether `granted` (this member included) holds a majority of every voter set in `configs`.
fn quorum(configs: &[BTreeSet<NodeId>], granted: &BTreeSet<NodeId>) -> bool {
    configs.iter().all(|voters| {
        let yes = voters.iter().filter(|v| granted.contains(v)).count();
        yes * 2 > voters.len()
    })
}

/// Start elections when the leader is gone; see the module docs.
pub async fn run_elections(
    raft: Raft<TypeConfig>,
    liveness: Arc<Liveness>,
    network: Network,
    timing: Timing,
    last_log_id: Arc<Mutex<Option<LogId>>>,
) {
    let me = raft.metrics().borrow().id;
    let mut attempted = Instant::now();
    loop {
        let timeout = Duration::from_secs_f64(rand::random_range(
            timing.election_min.as_secs_f64()..timing.election_max.as_secs_f64(),
        ));
        loop {
            let since = liveness.contact().max(attempted);
            if since.elapsed() >= timeout {
                break;
            }
            tokio::time::sleep_until(since + timeout).await;
        }
        attempted = Instant::now();
        let (term, configs, nodes) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            if m.running_state.is_err() {
                return;
            }
            if m.state == ServerState::Leader {
                liveness.touch();
                continue;
            }
            let membership = m.membership_config.membership();
            let configs: Vec<BTreeSet<NodeId>> = membership.get_joint_config().clone();
            let nodes: BTreeMap<NodeId, Member> =
                membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
            (m.current_term, configs, nodes)
        };
        if !configs.iter().any(|c| c.contains(&me)) {
            continue;
        }
        let req = PreVoteRequest {
            candidate: me,
            term,
            last_log_id: *last_log_id.lock().unwrap_or_else(|e| e.into_inner()),
        };
        let voters: BTreeSet<NodeId> = configs.iter().flatten().copied().collect();
        let asks = voters
            .iter()
            .filter(|id| **id != me)
            .filter_map(|id| nodes.get(id).map(|m| (*id, m.clone())))
            .map(|(id, member)| {
                let network = network.clone();
                let req = req.clone();
                async move {
                    let granted = network
                        .pre_vote(id, &member, &req, timing.rpc_ttl)
                        .await
                        .is_ok_and(|r| r.granted);
                    (id, granted)
                }
            });
        let mut granted: BTreeSet<NodeId> = futures::future::join_all(asks)
            .await
            .into_iter()
            .filter(|(_, g)| *g)
            .map(|(id, _)| id)
            .collect();
        granted.insert(me);
        if !quorum(&configs, &granted) {
            tracing::debug!(term, ?granted, "pre-vote not granted by a quorum");
            continue;
        }
        if liveness.contact() > attempted {
            continue;
        }
        tracing::info!(
            term,
            granted = granted.len(),
            "no leader heard: pre-vote granted, starting an election"
        );
        if raft.trigger().elect().await.is_err() {
            return;
        }
    }
}

/// While this member leads, send every other member a heartbeat each interval; see the
/// module docs.
pub async fn run_heartbeats(
    raft: Raft<TypeConfig>,
    liveness: Arc<Liveness>,
    network: Network,
    timing: Timing,
) {
    let me = raft.metrics().borrow().id;
    let mut tick = tokio::time::interval(timing.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inflight: BTreeMap<NodeId, tokio::task::JoinHandle<()>> = BTreeMap::new();
    let mut stalled = false;
    loop {
        tick.tick().await;
        let (vote, nodes) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            if m.running_state.is_err() {
                return;
            }
            if m.state != ServerState::Leader || m.current_leader != Some(me) {
                continue;
            }
            let nodes: Vec<(NodeId, Member)> = m
                .membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != me)
                .map(|(id, n)| (*id, n.clone()))
                .collect();
            (m.vote, nodes)
        };
        if liveness.stalled(timing.max_stall) {
            if !stalled {
                tracing::warn!(
                    max_stall = ?timing.max_stall,
                    "the Raft loop has not answered for longer than max_stall: no longer \
                     asserting leadership so that another member can take over"
                );
            }
            stalled = true;
            continue;
        }
        if stalled {
            tracing::info!("the Raft loop answers again: asserting leadership");
            stalled = false;
        }
        inflight.retain(|_, t| !t.is_finished());
        for (id, member) in nodes {
            if inflight.contains_key(&id) {
                continue;
            }
            let (network, liveness) = (network.clone(), liveness.clone());
            let beat = Heartbeat { vote };
            inflight.insert(
                id,
                tokio::spawn(async move {
                    if let Ok(resp) = network.heartbeat(id, &member, &beat, timing.rpc_ttl).await {
                        if resp.vote.leader_id.term <= beat.vote.leader_id.term {
                            liveness.acked(id);
                        }
                    }
                }),
            );
        }
    }
}

/// Probe the Raft loop each heartbeat interval, so that [`run_heartbeats`] can tell a busy
/// loop from a hung one.
pub async fn run_probe(raft: Raft<TypeConfig>, liveness: Arc<Liveness>, timing: Timing) {
    loop {
        liveness.set_probe(Some(Instant::now()));
        if raft.with_raft_state(|_| ()).await.is_err() {
            return;
        }
        liveness.set_probe(None);
        tokio::time::sleep(timing.heartbeat).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_votes_compare_without_panicking() {
        let committed = |term, node| Vote::new_committed(term, node);
        assert!(leads_at_least(&committed(3, 1), &committed(3, 1)));
        assert!(leads_at_least(&committed(4, 2), &committed(3, 1)));
        assert!(!leads_at_least(&committed(2, 2), &committed(3, 1)));
        assert!(!leads_at_least(&committed(3, 2), &committed(3, 1)));
        assert!(leads_at_least(&committed(3, 2), &Vote::new(3, 1)));
        assert!(!leads_at_least(&Vote::new(5, 2), &committed(3, 1)));
    }

    #[test]
    fn quorum_needs_a_majority_of_every_config() {
        let set = |ids: &[u64]| ids.iter().copied().collect::<BTreeSet<NodeId>>();
        let one = vec![set(&[1, 2, 3])];
        assert!(quorum(&one, &set(&[1, 2])));
        assert!(!quorum(&one, &set(&[1])));
        let joint = vec![set(&[1, 2, 3]), set(&[3, 4, 5])];
        assert!(!quorum(&joint, &set(&[1, 2])));
        assert!(quorum(&joint, &set(&[1, 3, 4])));
        let even = vec![set(&[1, 2, 3, 4])];
        assert!(!quorum(&even, &set(&[1, 2])));
        assert!(quorum(&even, &set(&[1, 2, 3])));
    }
}
