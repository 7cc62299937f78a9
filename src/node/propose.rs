//! Writes: committing proposals through the core, forwarding them from relays and followers,
//! membership changes, and the group-commit batcher of a core node.
//!
//! Invariants:
//! - A proposal carries a random id from its first send on; a copy re-sent after a lost
//!   connection is answered with the first copy's outcome (the core deduplicates by id), so a
//!   write is applied at most once.
//! - A proposal is re-sent only while it has certainly not reached a core node
//!   ([`Forward::NotSent`]), or with the same id.
//! - A proposal is forwarded between core nodes at most [`MAX_HOPS`] times (stale hints).
//! - Every proposal from outside the core passes [`check`] on whichever path it arrives
//!   (the local API or `Propose` over QUIC) before it is queued: one `max_update_bytes`
//!   limit, no op past `max_len`, no batch or root check.
//! - At most `limits.proposal_queue` proposals wait for a core node's batcher; beyond that
//!   a write is refused at once as busy (503 over HTTP, `busy` over QUIC), never queued.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::consensus::{ConsensusError, Core, Member};
use crate::file::{ApplyOutcome, Precondition, Update};
use crate::proto::{self, propose_reply, request};
use crate::transport;
use crate::wire::WireError;

use super::error::NodeError;
use super::failpoint;
use super::net;
use super::shared::{QueuedProposal, Shared};

/// How long a core node waits for a leader before failing a proposal.
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// A proposal is forwarded between core nodes at most this often (stale leader hints).
pub(crate) const MAX_HOPS: u32 = 2;

/// Proposals per group-commit batch.
const MAX_BATCH: usize = 512;
/// Payload bytes per batch; a larger proposal goes alone.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Batches in flight at once (openraft pipelines them).
const MAX_INFLIGHT_BATCHES: usize = 4;

/// Largest answer to a proposal (a version, or a one-line reason).
const MAX_REPLY: usize = 64 * 1024;
/// Longest wait for a core's answer to a proposal this node forwarded, for this core node's
/// own batch to commit, or for the answer to a membership change forwarded to the leader
/// (`limits.commit_wait_ms`); then the outcome is unknown (the client hears so, with how to
/// check).
fn reply_wait(shared: &Shared) -> Duration {
    Duration::from_millis(shared.cfg.limits.commit_wait_ms)
}

/// Most ops one proposal may carry: a PUT's diff has one per changed chunk (at most
/// `max_update_bytes / chunk_size` of them), a PATCH or a truncate one.
pub(crate) const MAX_OPS: usize = 1 << 16;

/// Commits `proposal` through the core (directly on a core node, over QUIC from a relay).
pub(crate) async fn propose(
    shared: &Arc<Shared>,
    mut proposal: proto::Proposal,
) -> Result<ApplyOutcome, NodeError> {
    if !shared.role.may_write() && !failpoint::write_anyway() {
        return Err(NodeError::Forbidden(format!(
            "{} is a {}: its certificate may not write",
            shared.cfg.name, shared.role
        )));
    }
    if proposal.id.is_empty() {
        let id: [u8; 16] = rand::random();
        proposal.id = Bytes::copy_from_slice(&id);
    }
    check(shared, &proposal)?;
    shared.metrics.proposals.increment(1);
    let outcome = propose_hops(shared, proposal, 0).await;
    if let Err(e) = &outcome {
        shared.metrics.proposal_failed(failure_label(e));
    }
    outcome
}

/// The `canopy_rejected_total` reason of an error from [`check`].
pub(crate) fn check_reason(e: &NodeError) -> &'static str {
    match e {
        NodeError::UpdateTooLarge { .. } => "update_too_large",
        NodeError::File(crate::file::FileError::TooMuchGrowth { .. }) => "update_growth",
        NodeError::File(_) => "over_max_len",
        _ => "invalid_proposal",
    }
}

/// The checks every proposal from outside the core's own batcher passes, on every path (the
/// local API, and `Propose` over QUIC from a relay or another core node), before it is
/// queued: no batch or root check (only the core makes those), at most [`MAX_OPS`] ops and
/// `max_update_bytes` of written data, no op that would make the file longer than `max_len`,
/// and ops that add at most a whole file's chunks in all, counted from an empty file
/// ([`crate::update::grown_chunks`]; so the apply's own check, from the file's length,
/// never refuses what passed here). Refused here rather than committed and rejected at
/// apply.
pub(crate) fn check(shared: &Shared, proposal: &proto::Proposal) -> Result<(), NodeError> {
    if !proposal.batch.is_empty() || proposal.root_check.is_some() {
        return Err(NodeError::Rejected(
            "a proposal from outside the core carries no batch and no root check".into(),
        ));
    }
    let ops = proposal.update.as_ref().map_or(&[][..], |u| &u.ops[..]);
    if ops.len() > MAX_OPS {
        return Err(NodeError::Rejected(format!(
            "{} ops in one update, over the limit of {MAX_OPS}",
            ops.len()
        )));
    }
    let max = shared.cfg.stream.max_update_bytes;
    let size: u64 = ops
        .iter()
        .map(|o| match &o.kind {
            Some(proto::op::Kind::Write(w)) => w.data.len() as u64,
            _ => 0,
        })
        .sum();
    if size > max {
        return Err(NodeError::UpdateTooLarge { size, max });
    }
    let max_len = shared.cfg.stream.max_len;
    for op in ops {
        let end = match &op.kind {
            Some(proto::op::Kind::Write(w)) => w.offset.checked_add(w.data.len() as u64),
            Some(proto::op::Kind::Truncate(t)) => Some(t.len),
            None => Some(0),
        };
        if end.is_none_or(|e| e > max_len) {
            return Err(NodeError::File(crate::file::FileError::TooLarge {
                len: end.unwrap_or(u64::MAX),
                max: max_len,
            }));
        }
    }
    let grown = growth_of(proposal, shared.cfg.stream.chunk_size);
    let most = shared.cfg.stream.max_chunks();
    if grown > most {
        return Err(NodeError::File(crate::file::FileError::TooMuchGrowth {
            chunks: grown,
            max: most,
        }));
    }
    Ok(())
}

/// The `reason` of `canopy_proposal_failures_total` for a proposal that failed with `e`.
fn failure_label(e: &NodeError) -> &'static str {
    match e {
        NodeError::UpdateTooLarge { .. }
        | NodeError::Consensus(ConsensusError::TooLarge { .. }) => "too_large",
        NodeError::Consensus(ConsensusError::InvalidProposal(_)) | NodeError::Rejected(_) => {
            "invalid"
        }
        NodeError::Forbidden(_) => "forbidden",
        NodeError::Contended(_) => "contended",
        _ => "unavailable",
    }
}

/// A core node commits directly when it leads, and otherwise forwards to the leader it
/// knows (waiting for an election if there is none); a relay forwards to a core node.
///
/// A leader that could not be reached is skipped for one maximal election timeout (the time
/// in which the others replace a dead leader), then tried again if it still leads: a
/// connection lost once does not rule out, for the rest of the wait, a leader that is alive.
pub(crate) async fn propose_hops(
    shared: &Arc<Shared>,
    proposal: proto::Proposal,
    hops: u32,
) -> Result<ApplyOutcome, NodeError> {
    let Some(core) = shared.core.get() else {
        return Ok(forward_proposal(shared, proposal, hops, None).await?);
    };
    let me = &shared.cfg.name;
    let skip_for = core.election_timeout_max();
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    let mut unreachable = Unreachable::default();
    loop {
        let wait = reply_wait(shared);
        let commit = tokio::time::timeout(wait, core_propose(shared, proposal.clone()))
            .await
            .map_err(|_| {
                NodeError::OutcomeUnknown(format!(
                    "no commit within {wait:?} (limits.commit_wait_ms): the core may have lost its quorum"
                ))
            })?;
        match commit? {
            Err(ConsensusError::NotLeader { leader }) => {
                let now = tokio::time::Instant::now();
                let left = deadline.saturating_duration_since(now);
                let skipped = unreachable.skipped(now);
                let leader = match leader {
                    Some(l) if l.name != *me && !skipped.contains(&l.name) => Some(l),
                    _ => {
                        let wait = unreachable.until_retry(now).unwrap_or(left).min(left);
                        core.wait_for_leader_except(&skipped, wait).await.ok()
                    }
                };
                match leader {
                    Some(l) if l.name != *me && hops < MAX_HOPS => {
                        let to = Some(l.addr.clone());
                        let forwarded = tokio::select! {
                            r = forward_proposal(shared, proposal.clone(), hops + 1, to) => r,
                            Ok(_) = core.wait_for_leader_except(std::slice::from_ref(&l.name), left) => {
                                Err(Forward::Unknown(NodeError::Connect {
                                    addr: l.addr.clone(),
                                    reason: "the leader was replaced".into(),
                                }))
                            }
                        };
                        match forwarded {
                            Err(Forward::NotSent(e) | Forward::Unknown(e))
                                if e.is_retryable() && tokio::time::Instant::now() < deadline =>
                            {
                                // The same id again is safe: every member deduplicates it.
                                unreachable
                                    .add(l.name.clone(), tokio::time::Instant::now() + skip_for);
                            }
                            other => return Ok(other?),
                        }
                    }
                    Some(l) if l.name == *me => continue,
                    _ if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    _ => return Err(ConsensusError::NotLeader { leader }.into()),
                }
            }
            other => return Ok(other?),
        }
    }
}

/// Leaders a proposal failed to reach, each skipped until its instant.
#[derive(Debug, Default)]
struct Unreachable(Vec<(String, tokio::time::Instant)>);

impl Unreachable {
    /// Skip `name` until `until`.
    fn add(&mut self, name: String, until: tokio::time::Instant) {
        self.0.retain(|(n, _)| *n != name);
        self.0.push((name, until));
    }

    /// The names still skipped at `now`.
    fn skipped(&mut self, now: tokio::time::Instant) -> Vec<String> {
        self.0.retain(|(_, until)| now < *until);
        self.0.iter().map(|(n, _)| n.clone()).collect()
    }

    /// How long from `now` until the first skipped name may be tried again.
    fn until_retry(&self, now: tokio::time::Instant) -> Option<Duration> {
        self.0
            .iter()
            .map(|(_, until)| until.saturating_duration_since(now))
            .min()
    }
}

/// Commits through this core node's Raft, batched with concurrent proposals. With
/// `limits.proposal_queue` proposals queued already, refuses at once ([`NodeError::Busy`]).
async fn core_propose(
    shared: &Shared,
    proposal: proto::Proposal,
) -> Result<Result<ApplyOutcome, ConsensusError>, NodeError> {
    let Some(batcher) = shared.batcher.get() else {
        return Ok(Err(ConsensusError::Stopped));
    };
    let limit = shared.cfg.limits.proposal_queue;
    if shared.proposals_queued.fetch_add(1, Ordering::AcqRel) >= limit {
        shared.proposals_queued.fetch_sub(1, Ordering::AcqRel);
        return Err(NodeError::Busy(format!(
            "the core's proposal queue is full ({limit} proposals, limits.proposal_queue); retry shortly"
        )));
    }
    let (reply, rx) = oneshot::channel();
    if batcher.send(QueuedProposal { proposal, reply }).is_err() {
        shared.proposals_queued.fetch_sub(1, Ordering::AcqRel);
        return Ok(Err(ConsensusError::Stopped));
    }
    Ok(rx.await.unwrap_or(Err(ConsensusError::Stopped)))
}

/// Commits `update` (with an optional precondition).
pub(crate) async fn write(
    shared: &Arc<Shared>,
    update: &Update,
    precondition: Option<&Precondition>,
) -> Result<ApplyOutcome, NodeError> {
    let proposal = proto::Proposal {
        update: Some(update.into()),
        precondition: precondition.map(Into::into),
        ..Default::default()
    };
    propose(shared, proposal).await
}

/// Waits until this node has applied `version` or `timeout` passes; true if applied.
pub(crate) async fn wait_applied(shared: &Shared, version: u64, timeout: Duration) -> bool {
    let mut rx = shared.applied.subscribe();
    tokio::time::timeout(timeout, rx.wait_for(|(v, _)| *v >= version))
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false)
}

/// Replaces the whole file with `content` atomically: diffs it against this node's version
/// by chunk and commits only the changed ranges, conditional on that version. With
/// `if_version`, only if the file is still at that version; without, retrying on a
/// concurrent write after catching up to it.
pub(crate) async fn replace(
    shared: &Arc<Shared>,
    content: &[u8],
    if_version: Option<u64>,
) -> Result<ApplyOutcome, NodeError> {
    const ATTEMPTS: u32 = 20;
    if let Some(version) = if_version {
        wait_applied(shared, version, Duration::from_secs(10)).await;
    }
    for _ in 0..ATTEMPTS {
        let file = shared.state.lock().replica.file().clone();
        if let Some(version) = if_version {
            if file.version() != version {
                return Ok(ApplyOutcome::PreconditionFailed {
                    version: file.version(),
                });
            }
        }
        let update = file.diff_to(content);
        let cond = Precondition::IfVersion(file.version());
        match write(shared, &update, Some(&cond)).await? {
            ApplyOutcome::PreconditionFailed { version } if if_version.is_none() => {
                wait_applied(shared, version, Duration::from_secs(10)).await;
            }
            other => return Ok(other),
        }
    }
    Err(NodeError::Contended(ATTEMPTS))
}

/// Applies a core membership change: on the leader directly, otherwise forwarded to it (at
/// most [`MAX_HOPS`] times).
pub(crate) async fn admin(
    shared: &Arc<Shared>,
    admin: proto::Admin,
    hops: u32,
) -> Result<(), NodeError> {
    let core = shared.core.get().ok_or(NodeError::NotCore)?;
    let result = match &admin.kind {
        Some(proto::admin::Kind::AddMember(m)) => {
            core.add_member(Member {
                name: m.name.clone(),
                addr: m.addr.clone(),
            })
            .await
        }
        Some(proto::admin::Kind::RemoveMember(name)) => core.remove_member(name, admin.force).await,
        None => return Err(NodeError::Rejected("empty admin request".into())),
    };
    match result {
        Err(ConsensusError::NotLeader { leader }) if hops <= MAX_HOPS => {
            let leader = match leader {
                Some(l) => l,
                None => core.wait_for_leader(LEADER_WAIT).await?,
            };
            if leader.name == shared.cfg.name {
                return Err(ConsensusError::NotLeader {
                    leader: Some(leader),
                }
                .into());
            }
            let conn = net::core_conn(shared, &leader.addr).await?;
            let ask = net::request(shared, &conn, request::Kind::Admin(admin));
            let wait = reply_wait(shared);
            let reply: proto::AdminReply = tokio::time::timeout(wait, ask)
                .await
                .map_err(|_| NodeError::NoReply {
                    what: "the membership change forwarded to the leader (it may or may not have been made: see `canopy core members`)",
                    after: wait,
                })??;
            if reply.error.is_empty() {
                Ok(())
            } else {
                Err(NodeError::Rejected(reply.error))
            }
        }
        other => Ok(other?),
    }
}

/// Why forwarding a proposal failed.
#[derive(Debug)]
pub enum Forward {
    /// Nothing reached the core: retrying cannot apply it twice.
    NotSent(NodeError),
    /// It may or may not have been committed.
    Unknown(NodeError),
}

impl From<Forward> for NodeError {
    fn from(f: Forward) -> Self {
        match f {
            Forward::NotSent(e) => e,
            Forward::Unknown(e) => NodeError::OutcomeUnknown(e.to_string()),
        }
    }
}

/// Sends a proposal to `to` (a core leader), or to a core node of this relay's choice,
/// retrying other core nodes while it has certainly not been sent. An error after sending
/// leaves the outcome unknown and is returned as is: the proposal is never sent twice.
async fn forward_proposal(
    shared: &Arc<Shared>,
    proposal: proto::Proposal,
    hops: u32,
    to: Option<String>,
) -> Result<ApplyOutcome, Forward> {
    let request = proto::Request {
        kind: Some(request::Kind::Propose(proto::Propose {
            proposal: Some(proposal),
            hops,
        })),
    };
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    // Whether any attempt may have reached a core: only then is the outcome unknown.
    let mut maybe_sent = false;
    let mut tried = 0;
    loop {
        let conn = match &to {
            Some(addr) => net::core_conn(shared, addr)
                .await
                .map(|c| (addr.clone(), c)),
            None => net::any_core(shared).await,
        };
        let (addr, sent) = match conn {
            Ok((addr, conn)) => (
                Some(addr),
                send_proposal(&conn, &request, reply_wait(shared)).await,
            ),
            Err(e) => (None, Err(Forward::NotSent(e))),
        };
        let (e, sent_it) = match sent {
            Err(Forward::NotSent(e)) if e.is_retryable() => (e, false),
            Err(Forward::Unknown(e)) if e.is_retryable() => (e, true),
            other => return other,
        };
        warn!(node = %shared.cfg.name, "proposal not confirmed by the core, retrying with the same id: {e}");
        if let Some(addr) = &addr {
            net::forget_core(shared, addr).await;
        }
        maybe_sent |= sent_it;
        if to.is_some() || tokio::time::Instant::now() >= deadline {
            return Err(if maybe_sent {
                Forward::Unknown(e)
            } else {
                Forward::NotSent(e)
            });
        }
        // Every core address is tried once at once; then the retries are paced.
        tried += 1;
        if tried >= net::core_addr_count(shared) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn send_proposal(
    conn: &quinn::Connection,
    request: &proto::Request,
    wait: Duration,
) -> Result<ApplyOutcome, Forward> {
    let not_sent = |e: String| {
        Forward::NotSent(NodeError::Connect {
            addr: conn.remote_address().to_string(),
            reason: e,
        })
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| not_sent(e.to_string()))?;
    transport::write_frame(&mut send, request)
        .await
        .map_err(|e| not_sent(e.to_string()))?;
    let _ = send.finish();
    let read = transport::read_frame::<proto::ProposeReply>(&mut recv, MAX_REPLY);
    let reply = tokio::time::timeout(wait, read)
        .await
        .map_err(|_| {
            Forward::Unknown(NodeError::NoReply {
                what: "the proposal sent to a core node (limits.commit_wait_ms)",
                after: wait,
            })
        })?
        .map_err(|e| Forward::Unknown(e.into()))?
        .ok_or(Forward::Unknown(NodeError::Wire(WireError::Truncated)))?;
    match reply.kind {
        Some(propose_reply::Kind::CommittedVersion(v)) => Ok(ApplyOutcome::Applied { version: v }),
        Some(propose_reply::Kind::PreconditionFailedVersion(v)) => {
            Ok(ApplyOutcome::PreconditionFailed { version: v })
        }
        Some(propose_reply::Kind::Error(e)) => Err(Forward::Unknown(NodeError::Rejected(e))),
        Some(propose_reply::Kind::Refused(e)) => Err(Forward::NotSent(NodeError::Forbidden(e))),
        Some(propose_reply::Kind::Busy(e)) => Err(Forward::NotSent(NodeError::Busy(e))),
        None => Err(Forward::Unknown(NodeError::Rejected("empty reply".into()))),
    }
}

/// The wire answer to a forwarded proposal.
pub(crate) fn outcome_reply(r: Result<ApplyOutcome, NodeError>) -> proto::ProposeReply {
    let kind = match r {
        Ok(ApplyOutcome::Applied { version }) => propose_reply::Kind::CommittedVersion(version),
        Ok(ApplyOutcome::PreconditionFailed { version }) => {
            propose_reply::Kind::PreconditionFailedVersion(version)
        }
        Ok(ApplyOutcome::Rejected { reason, .. }) => propose_reply::Kind::Error(reason),
        Err(NodeError::Forbidden(e)) => propose_reply::Kind::Refused(e),
        Err(NodeError::Busy(e)) => propose_reply::Kind::Busy(e),
        Err(e) => propose_reply::Kind::Error(e.to_string()),
    };
    proto::ProposeReply { kind: Some(kind) }
}

/// The ops a proposal adds to its batch's entry (a batch's entry carries at most
/// [`MAX_OPS`], which is what a child accepts in one entry).
fn ops_of(p: &proto::Proposal) -> usize {
    p.update.as_ref().map_or(0, |u| u.ops.len())
}

/// The chunks a proposal's ops add, counted from an empty file
/// ([`crate::update::grown_chunks`]): at least what they add to a file of any length.
fn growth_of(p: &proto::Proposal, chunk_size: u32) -> u64 {
    let ops = p.update.as_ref().map_or(&[][..], |u| &u.ops[..]);
    crate::update::grown_chunks(0, chunk_size, ops.iter().map(Into::into))
}

/// What one batch (one Raft entry) may still take: its encoded bytes within a frame, its
/// ops within [`MAX_OPS`], and no truncate besides one proposal's own. The core applies a
/// batch's proposals one by one, but its entry carries all their ops as one update, which
/// every relay checks whole ([`crate::file::ChunkedFile::validate`]), the chunks it adds
/// included: writes alone only lengthen the file, so any number of them add at most one
/// file's chunks, while each proposal with a truncate was checked for that on its own
/// ([`check`]) and so goes in an entry of its own.
struct BatchBudget {
    bytes: usize,
    ops: usize,
    alone: bool,
    max_bytes: usize,
}

impl BatchBudget {
    /// The budget of a batch that starts with `first`, which it always holds.
    fn new(first: &proto::Proposal, max_bytes: usize) -> Self {
        Self {
            bytes: proposal_bytes(first),
            ops: ops_of(first),
            alone: truncates(first),
            max_bytes,
        }
    }

    /// Whether no proposal can join any more.
    fn full(&self) -> bool {
        self.alone || self.bytes >= self.max_bytes
    }

    /// Takes `p` into the batch if it fits; false (and nothing taken) if it goes to the next.
    fn admit(&mut self, p: &proto::Proposal) -> bool {
        let (bytes, ops) = (self.bytes + proposal_bytes(p), self.ops + ops_of(p));
        if self.alone || truncates(p) || bytes > self.max_bytes || ops > MAX_OPS {
            return false;
        }
        (self.bytes, self.ops) = (bytes, ops);
        true
    }
}

/// Whether a proposal has a truncate among its ops.
fn truncates(p: &proto::Proposal) -> bool {
    p.update.as_ref().is_some_and(|u| {
        u.ops
            .iter()
            .any(|o| matches!(o.kind, Some(proto::op::Kind::Truncate(_))))
    })
}

/// What a proposal adds to a batch's entry: its encoded size within the batch.
fn proposal_bytes(p: &proto::Proposal) -> usize {
    let len = prost::Message::encoded_len(p);
    len + prost::encoding::encoded_len_varint(len as u64) + 1
}

/// Group commit above openraft (which appends and fsyncs each `client_write` on its own):
/// takes whatever proposals queued up while earlier batches were in flight, up to
/// `MAX_BATCH` of them, `MAX_BATCH_BYTES` or [`MAX_OPS`] ops, and commits them as one entry; at most
/// `MAX_INFLIGHT_BATCHES` are in flight. Each proposal's own outcome is read back from the
/// replica by its id.
pub(crate) async fn batcher(
    shared: Arc<Shared>,
    core: Arc<Core>,
    mut rx: mpsc::UnboundedReceiver<QueuedProposal>,
) {
    let inflight = Arc::new(tokio::sync::Semaphore::new(MAX_INFLIGHT_BATCHES));
    let mut carry: Option<QueuedProposal> = None;
    // A batch is one Raft entry: it must fit one frame with its envelope.
    let max_bytes = MAX_BATCH_BYTES.min(
        shared
            .cfg
            .stream
            .max_frame
            .saturating_sub(crate::consensus::ENTRY_FRAME_OVERHEAD),
    );
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                p = rx.recv() => match p {
                    Some(p) => {
                        shared.proposals_queued.fetch_sub(1, Ordering::AcqRel);
                        p
                    }
                    None => return,
                },
            },
        };
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        let mut budget = BatchBudget::new(&first.proposal, max_bytes);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && !budget.full() {
            match rx.try_recv() {
                Ok(p) => {
                    shared.proposals_queued.fetch_sub(1, Ordering::AcqRel);
                    if !budget.admit(&p.proposal) {
                        carry = Some(p);
                        break;
                    }
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let (shared, core) = (shared.clone(), core.clone());
        tokio::spawn(async move {
            let _permit = permit;
            commit_batch(&shared, &core, batch).await;
        });
    }
}

/// Commits one batch as one Raft entry and answers each of its proposals.
async fn commit_batch(shared: &Shared, core: &Core, mut batch: Vec<QueuedProposal>) {
    if batch.len() == 1 {
        if let Some(q) = batch.pop() {
            let _ = q.reply.send(core.propose(q.proposal).await);
        }
        return;
    }
    for q in &mut batch {
        if q.proposal.id.is_empty() {
            let id: [u8; 16] = rand::random();
            q.proposal.id = Bytes::copy_from_slice(&id);
        }
    }
    let whole = proto::Proposal {
        batch: batch.iter().map(|q| q.proposal.clone()).collect(),
        ..Default::default()
    };
    match core.propose(whole).await {
        Ok(_) => {
            let st = shared.state.lock();
            for q in batch {
                let outcome = st
                    .replica
                    .outcome_of(&q.proposal.id)
                    .ok_or_else(|| ConsensusError::Fatal("batched outcome not found".into()));
                let _ = q.reply.send(outcome);
            }
        }
        Err(e) => {
            let leader = match &e {
                ConsensusError::NotLeader { leader } => Some(leader.clone()),
                _ => None,
            };
            let text = e.to_string();
            for q in batch {
                let _ = q.reply.send(Err(match &leader {
                    Some(l) => ConsensusError::NotLeader { leader: l.clone() },
                    None => ConsensusError::Raft(text.clone()),
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{proto, BatchBudget, Unreachable, MAX_OPS};
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn an_unreachable_leader_is_skipped_until_its_instant_and_then_tried_again() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut u = Unreachable::default();
        assert_eq!(u.skipped(t0), Vec::<String>::new());
        assert_eq!(u.until_retry(t0), None);
        u.add("c1".into(), t0 + s);
        u.add("c2".into(), t0 + 2 * s);
        assert_eq!(u.skipped(t0), vec!["c1".to_string(), "c2".to_string()]);
        assert_eq!(u.until_retry(t0), Some(s));
        assert_eq!(u.skipped(t0 + s), vec!["c2".to_string()]);
        assert_eq!(u.until_retry(t0 + s), Some(s));
        u.add("c2".into(), t0 + 3 * s);
        assert_eq!(u.skipped(t0 + 2 * s), vec!["c2".to_string()]);
        assert_eq!(u.skipped(t0 + 3 * s), Vec::<String>::new());
        assert_eq!(u.until_retry(t0 + 3 * s), None);
    }

    fn seesaw(max_len: u64) -> proto::Proposal {
        let t = |len| proto::Op {
            kind: Some(proto::op::Kind::Truncate(proto::Truncate { len })),
        };
        proto::Proposal {
            update: Some(proto::Update {
                ops: vec![t(0), t(max_len)],
            }),
            ..Default::default()
        }
    }

    /// Two proposals that each add a whole file's chunks pass `check` one by one, but one
    /// entry holding both would add two files' worth, which every relay refuses whole: a
    /// proposal with a truncate has an entry of its own. Any number of writes share one.
    #[test]
    fn a_proposal_with_a_truncate_is_batched_alone() {
        let write = proto::Proposal {
            update: Some(proto::Update {
                ops: vec![proto::Op {
                    kind: Some(proto::op::Kind::Write(proto::Write {
                        offset: 1 << 30,
                        data: vec![1u8; 100].into(),
                    })),
                }],
            }),
            ..Default::default()
        };
        let mut b = BatchBudget::new(&seesaw(1 << 30), 1 << 20);
        assert!(b.full());
        assert!(!b.admit(&seesaw(1 << 30)));
        assert!(!b.admit(&write));
        let mut b = BatchBudget::new(&write, 1 << 20);
        for _ in 0..500 {
            assert!(b.admit(&write));
        }
        assert!(!b.admit(&seesaw(4096)));
        assert!(!b.full());
        let many = proto::Proposal {
            update: Some(proto::Update {
                ops: vec![proto::Op::default(); MAX_OPS],
            }),
            ..Default::default()
        };
        assert!(!b.admit(&many), "ops over MAX_OPS");
        assert!(
            !BatchBudget::new(&write, 100).admit(&write),
            "bytes over the frame"
        );
    }
}
