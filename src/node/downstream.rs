//! The parent side of the tree: serving subscribed children, chunk fetches, referrals, and
//! pacing transfers; also carrying out what the replica returns ([`dispatch`]).
//!
//! Invariants:
//! - A child is registered for broadcasts in the same critical section (the state lock) as
//!   its subscription plan, so its live stream starts exactly after the plan.
//! - Broadcasting never waits on a child: frames go to per-child unbounded channels with a
//!   byte budget (`child_queue_bytes`); a child over budget is cut off (its stream reset) and
//!   resubscribes.
//! - At most `stream.max_backfills` transfers are served at once (children wait with
//!   heartbeats flowing; fetching peers get `busy`), paced together by
//!   `stream.backfill_bytes_per_sec`.
//! - A child hears from its parent at least every 1.5 `heartbeat_ms` while subscribed: a
//!   heartbeat goes down a link quiet for half a period at each multiple of the period
//!   ([`Beat`]), the same instants for every link of the process, so an idle node wakes
//!   once per period for all its children.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::VarInt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::NodeConfig;
use crate::overlay::{Admit, Input, Refusal};
use crate::proto::{self, downstream::Kind as Down};
use crate::replica::{
    snapshot_end_frame, snapshot_frames_below, Event, FollowChunk, FollowPlan, SnapshotPlan,
    SubscribePlan,
};
use crate::transport::{self, StreamError};

use super::error::code;
use super::failpoint::{self, Rogue, Tampering};
use super::overlay_driver::{self, peer_to_proto};
use super::shared::{now_us, ChildLink, Shared, State};

/// Most fetch sources a parent suggests to a child.
pub(crate) const MAX_SUGGESTED_SOURCES: usize = 8;

/// Most chunks one `FetchChunks` may ask for.
pub(crate) const MAX_FETCH_BATCH: usize = crate::config::MAX_FETCH_WINDOW as usize;

/// Largest frame a child may send up its subscription stream (a limit and a report).
const MAX_CHILD_FRAME: usize = 64;

/// Most frames one write to a child carries: what is queued when the sender wakes goes out
/// together, so an entry and its seal share packets, within this many frames ...
const SEND_BATCH_FRAMES: usize = 64;
/// ... and about this many bytes (a batch stops growing once it reaches them).
const SEND_BATCH_BYTES: usize = 1 << 20;

/// How long a relay that holds no copy yet keeps a subscribing child waiting for its own:
/// a second less than the child's `attach_timeout_ms`, so that the child hears a refusal and
/// goes elsewhere rather than timing out (the bootstrap benchmark lost 5 s per relay so).
fn sync_wait(cfg: &NodeConfig) -> Duration {
    Duration::from_millis(cfg.overlay.attach_timeout_ms.saturating_sub(1000).max(500))
}

/// Carries out what the replica returned; call with the state lock held, right after the
/// replica call that returned `events`.
pub(crate) fn dispatch(shared: &Shared, st: &mut State, events: Vec<Event>) {
    for ev in events {
        match ev {
            Event::Broadcast(frame) => broadcast(shared, st, &frame),
            Event::Applied {
                version,
                commit_time_us,
            } => {
                shared.applied.send_replace((version, commit_time_us));
                if commit_time_us > 0 {
                    let delay = now_us().saturating_sub(commit_time_us) as f64 / 1e6;
                    shared.metrics.apply_delay.record(delay);
                }
            }
            Event::Installed { version } => {
                shared
                    .stats
                    .snapshots_installed
                    .fetch_add(1, Ordering::Relaxed);
                info!(node = %shared.cfg.name, version, root = %st.replica.file().root_hex(), "installed snapshot");
                let ids: Vec<u64> = st
                    .children
                    .iter()
                    .filter(|(_, c)| c.follows != Some(version))
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    cut_child(shared, st, id, "parent installed a snapshot; resubscribe");
                }
            }
            Event::CheckpointVerified { .. } => shared.metrics.checkpoint_ok.increment(1),
            Event::RolledBack { version } => {
                warn!(node = %shared.cfg.name, version, "undid an entry its parent never sealed");
                let ids: Vec<u64> = st.children.keys().copied().collect();
                for id in ids {
                    cut_child(
                        shared,
                        st,
                        id,
                        "parent undid an unsealed entry; resubscribe",
                    );
                }
            }
        }
    }
}

fn broadcast(shared: &Shared, st: &mut State, frame: &Bytes) {
    let len = frame.len() as u64;
    let limit = shared.cfg.stream.child_queue_bytes;
    let mut cut = Vec::new();
    for (id, c) in &st.children {
        let queued = c.queued.load(Ordering::Acquire);
        if queued + len > limit || c.tx.send(frame.clone()).is_err() {
            cut.push(*id);
        } else {
            c.queued.fetch_add(len, Ordering::AcqRel);
        }
    }
    for id in cut {
        cut_child(shared, st, id, "send queue over limit");
    }
}

/// Drops a child's link: its writer resets the stream and the child resubscribes.
fn cut_child(shared: &Shared, st: &mut State, id: u64, reason: &str) {
    if let Some(c) = st.children.remove(&id) {
        c.cut.store(true, Ordering::Release);
        warn!(node = %shared.cfg.name, child = %c.name, "cutting off child: {reason}");
        shared.metrics.child_cutoffs.increment(1);
    }
    children_changed(shared, st);
}

/// Tells the metrics and the overlay how many children this node serves now.
fn children_changed(shared: &Shared, st: &State) {
    let count = st.children.len() as u32;
    shared.metrics.children.set(count as f64);
    let current: Vec<(String, String)> = st
        .children
        .values()
        .map(|c| (c.name.clone(), c.addr.clone()))
        .collect();
    let changes = shared.overlay.lock().overlay.children_changes(&current);
    for change in changes {
        overlay_driver::input(shared, change);
    }
}

/// Waits until `len` more bytes of transfers fit the shared budget
/// (`stream.backfill_bytes_per_sec`; no wait when it is 0).
async fn pace_backfill(shared: &Shared, len: usize) {
    let rate = shared.cfg.stream.backfill_bytes_per_sec;
    if rate == 0 {
        return;
    }
    let at = {
        let mut next = shared.backfill_pace.lock();
        let at = (*next).max(tokio::time::Instant::now());
        *next = at + Duration::from_secs_f64(len as f64 / rate as f64);
        at
    };
    tokio::time::sleep_until(at).await;
}

/// Relays a child of this node may fetch a transfer's chunks from: this node's other
/// children, then the sources its own parent suggested, at most [`MAX_SUGGESTED_SOURCES`],
/// never `child` itself.
fn suggest_sources(st: &State, child: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let kids = st.children.values().map(|c| &c.addr);
    for a in kids.chain(st.suggested_sources.iter()) {
        if a != child && !out.contains(a) && out.len() < MAX_SUGGESTED_SOURCES {
            out.push(a.clone());
        }
    }
    out
}

/// The heartbeat a child gets on an idle link.
fn heartbeat(shared: &Shared, st: &State, child: &str) -> Bytes {
    st.replica.heartbeat(
        now_us(),
        shared.announced_path(),
        suggest_sources(st, child),
    )
}

/// When one child link's heartbeats go out: at the multiples of `heartbeat_ms` counted from
/// one instant of the process, so that all of a node's idle links beat in the same timer
/// turn (one wake-up per period for all its children, not one per child at its own phase),
/// and only on a link that sent nothing for half a period or more. A child so hears
/// something at least every 1.5 periods (every period while idle), well inside
/// `parent_timeout_ms` (three periods by default).
struct Beat {
    period: Duration,
    last_sent: std::time::Instant,
}

impl Beat {
    fn new(period: Duration) -> Self {
        Self {
            period,
            last_sent: std::time::Instant::now(),
        }
    }

    /// The first multiple of the period after now.
    fn next(&self) -> tokio::time::Instant {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let epoch = *EPOCH.get_or_init(std::time::Instant::now);
        let period = self.period.as_nanos().max(1);
        let since = epoch.elapsed().as_nanos();
        let next = (since / period + 1) * period;
        tokio::time::Instant::from_std(
            epoch + Duration::from_nanos(u64::try_from(next).unwrap_or(u64::MAX)),
        )
    }

    /// Whether the link has been quiet long enough to need a heartbeat now.
    fn due(&self) -> bool {
        self.last_sent.elapsed() >= self.period / 2
    }

    /// Something went down the link now.
    fn sent(&mut self) {
        self.last_sent = std::time::Instant::now();
    }
}

/// Counts a transfer being served in `backfills_serving` (status and metric) while alive.
pub(crate) struct ServingGuard<'a>(&'a Shared);

impl<'a> ServingGuard<'a> {
    pub(crate) fn new(shared: &'a Shared) -> Self {
        let n = shared.serving.now.fetch_add(1, Ordering::AcqRel) + 1;
        shared.serving.most.fetch_max(n, Ordering::AcqRel);
        shared.metrics.backfills_serving.set(n as f64);
        Self(shared)
    }
}

impl Drop for ServingGuard<'_> {
    fn drop(&mut self) {
        let n = self.0.serving.now.fetch_sub(1, Ordering::AcqRel) - 1;
        self.0.metrics.backfills_serving.set(n as f64);
    }
}

/// What registering a subscriber produced: the child's id and queue, the plan, the answer.
struct Registered {
    id: u64,
    plan: SubscribePlan,
    ok: proto::SubscribeOk,
    rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
}

/// Decides on a subscription and, if accepted, registers the child for broadcasts, all under
/// the state lock. `Err` carries the refusal's reason and referral.
fn register(
    shared: &Shared,
    sub: &proto::Subscribe,
    rogue: Option<&Rogue>,
) -> Result<Registered, (String, Option<Box<proto::PeerInfo>>)> {
    let mut st = shared.state.lock();
    let zone = overlay_driver::zone_from_proto(sub.zone.clone());
    let admit = {
        let mut cell = shared.overlay.lock();
        let cell = &mut *cell;
        cell.overlay.admit(&sub.name, zone.as_ref(), &mut cell.rng)
    };
    if let Admit::Refuse { reason, referral } = admit {
        let reason = match reason {
            Refusal::OnRootPath => format!("{} is on this node's path to the core", sub.name),
            full => full.to_string(),
        };
        return Err((reason, referral.map(|p| Box::new(peer_to_proto(&p)))));
    }
    let mut plan = st.replica.plan_subscription(sub);
    if let SubscribePlan::Refuse(r) = plan {
        return Err((r, None));
    }
    if rogue.is_some() && matches!(plan, SubscribePlan::Follow(_)) {
        return Err(("not synced yet".into(), None));
    }
    let follows = match &plan {
        SubscribePlan::Follow(p) => Some(p.version),
        _ => None,
    };
    if let (Some(rogue), SubscribePlan::Snapshot(p)) = (rogue, &mut plan) {
        (p.file, p.anchor) = rogue.snapshot(&p.file);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let id = st.next_child;
    st.next_child += 1;
    st.children.insert(
        id,
        ChildLink {
            name: sub.name.clone(),
            addr: sub.listen_addr.clone(),
            tx,
            queued: queued.clone(),
            cut: cut.clone(),
            follows,
        },
    );
    overlay_driver::input(
        shared,
        Input::ChildAdded {
            name: sub.name.clone(),
            addr: sub.listen_addr.clone(),
            zone,
            report: sub.report.as_ref().map(overlay_driver::report_from_proto),
        },
    );
    children_changed(shared, &st);
    // The other children learn the new one as a fetch source now, not at their next idle
    // heartbeat (a relay joining below one of them soon after is offered it).
    let hb = heartbeat(shared, &st, "");
    shared
        .metrics
        .heartbeats_sent
        .increment(st.children.len() as u64);
    broadcast(shared, &mut st, &hb);
    let mut ok = proto::SubscribeOk {
        parent_name: shared.cfg.name.clone(),
        parent_depth: shared.depth().unwrap_or(0),
        resume: matches!(plan, SubscribePlan::Resume(_)),
        core_addrs: shared.core_addrs(&st),
        root_path: shared.root_path(),
        chunk_size: shared.cfg.stream.chunk_size,
        fetch_sources: suggest_sources(&st, &sub.listen_addr),
        signers: st.replica.signer_certs(),
    };
    if let Some(rogue) = rogue {
        rogue.subscribe_ok(&mut ok, &shared.cfg.advertise.to_string());
    }
    Ok(Registered {
        id,
        plan,
        ok,
        rx,
        queued,
        cut,
    })
}

/// Serves one subscribed child until its stream ends: the plan (a resume or a transfer),
/// then the live stream with heartbeats on idle links.
pub(crate) async fn serve_child(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    sub: proto::Subscribe,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let rogue = Rogue::from_env(&shared.identity.lock());
    let mut applied = shared.applied.subscribe();
    let mut transfer = shared.transfer.subscribe();
    let deadline = tokio::time::Instant::now() + sync_wait(&shared.cfg);
    let servable =
        |st: &State| st.replica.is_synced() || (rogue.is_none() && st.replica.can_follow());
    while !servable(&shared.state.lock()) {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = conn.closed() => return,
            r = tokio::time::timeout_at(deadline, applied.changed()) => {
                if !matches!(r, Ok(Ok(()))) {
                    break;
                }
            }
            r = tokio::time::timeout_at(deadline, transfer.changed()) => {
                if !matches!(r, Ok(Ok(()))) {
                    break;
                }
            }
        }
    }
    let mut tampering = Tampering::default();
    let Registered {
        id,
        plan,
        ok,
        mut rx,
        queued,
        cut,
    } = match register(&shared, &sub, rogue.as_ref()) {
        Ok(r) => {
            shared.metrics.overlay_message("attach_answer");
            r
        }
        Err((reason, referral)) => {
            debug!(node = %shared.cfg.name, child = %sub.name, "refusing subscription: {reason}");
            let refusal = proto::Downstream {
                kind: Some(Down::Refused(proto::Refused {
                    reason,
                    referral: referral.map(|r| *r),
                })),
            };
            shared.metrics.overlay_message("attach_answer");
            if transport::write_frame(&mut send, &refusal).await.is_ok() {
                let _ = send.finish();
                let _ = send.stopped().await;
            }
            return;
        }
    };
    info!(node = %shared.cfg.name, child = %sub.name, addr = %sub.listen_addr, have = sub.have_version, resume = ok.resume, "child subscribed");
    let limit = Arc::new(AtomicU64::new(u64::MAX));
    shared.tasks.spawn(read_child_updates(
        shared.clone(),
        conn.clone(),
        (sub.name.clone(), id),
        recv,
        limit.clone(),
    ));
    let mut beat = Beat::new(Duration::from_millis(shared.cfg.stream.heartbeat_ms));
    let result: Result<(), StreamError> = async {
        let ok = proto::Downstream {
            kind: Some(Down::SubscribeOk(ok)),
        };
        transport::write_frame(&mut send, &ok).await?;
        let slot = if matches!(plan, SubscribePlan::Snapshot(_) | SubscribePlan::Follow(_)) {
            let link = Link {
                conn: &conn,
                sub: &sub,
                beat: &mut beat,
            };
            let Some(permit) = transfer_slot(&shared, link, &mut send).await? else {
                return Ok(());
            };
            shared.metrics.full_transfers_served.increment(1);
            Some((permit, ServingGuard::new(&shared)))
        } else {
            None
        };
        match plan {
            SubscribePlan::Resume(frames) => {
                shared.metrics.resumes_served.increment(1);
                for f in &frames {
                    let f = match &rogue {
                        Some(r) => r.tamper(&mut tampering, f),
                        None => f.clone(),
                    };
                    transport::write_raw(&mut send, &f).await?;
                }
            }
            SubscribePlan::Snapshot(p) => {
                let SnapshotPlan {
                    file,
                    anchor,
                    commit_time_us,
                    then,
                } = *p;
                let corrupt = failpoint::corrupt_chunk_for(&sub.name);
                let below = limit.clone();
                let frames = snapshot_frames_below(
                    &file,
                    commit_time_us,
                    &sub.have_chunks,
                    anchor.as_ref(),
                    move || below.load(Ordering::Acquire),
                );
                for (index, mut f) in frames {
                    if let (Some(target), Some(index)) = (corrupt, index) {
                        failpoint::corrupt_chunk(&mut f.data, index, target);
                    }
                    pace_backfill(&shared, f.len()).await;
                    transport::write_parts(&mut send, &f).await?;
                    shared.count_relayed(f.len());
                    shared.metrics.backfill_served.increment(f.len() as u64);
                }
                for f in &then {
                    let f = match &rogue {
                        Some(r) => r.tamper(&mut tampering, f),
                        None => f.clone(),
                    };
                    transport::write_raw(&mut send, &f).await?;
                }
            }
            SubscribePlan::Follow(p) => {
                let link = Link {
                    conn: &conn,
                    sub: &sub,
                    beat: &mut beat,
                };
                if !follow(&shared, link, &mut send, &p, &limit, &mut transfer).await? {
                    debug!(node = %shared.cfg.name, child = %sub.name, version = p.version, "no longer receiving the transfer the child follows: cutting it off");
                    cut.store(true, Ordering::Release);
                    return Ok(());
                }
            }
            SubscribePlan::Refuse(_) => {}
        }
        drop(slot);
        drop(transfer);
        beat.sent();
        loop {
            let frame = tokio::select! {
                _ = shared.shutdown.cancelled() => return Ok(()),
                _ = conn.closed() => return Ok(()),
                f = rx.recv() => f,
                _ = tokio::time::sleep_until(beat.next()) => {
                    if beat.due() {
                        let hb = heartbeat(&shared, &shared.state.lock(), &sub.listen_addr);
                        transport::write_raw(&mut send, &hb).await?;
                        shared.metrics.heartbeats_sent.increment(1);
                        beat.sent();
                    }
                    continue;
                }
            };
            let Some(frame) = frame else { return Ok(()) };
            let mut batch = vec![frame];
            let mut len = batch[0].len();
            while batch.len() < SEND_BATCH_FRAMES && len < SEND_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(f) => {
                        len += f.len();
                        batch.push(f);
                    }
                    Err(_) => break,
                }
            }
            if let Some(r) = &rogue {
                for f in &mut batch {
                    *f = r.tamper(&mut tampering, f);
                }
            }
            let sent: usize = batch.iter().map(Bytes::len).sum();
            transport::write_raws(&mut send, &mut batch).await?;
            beat.sent();
            queued.fetch_sub(len as u64, Ordering::AcqRel);
            shared.count_relayed(sent);
        }
    }
    .await;
    if cut.load(Ordering::Acquire) {
        let _ = send.reset(VarInt::from_u32(code::CUT_OFF));
    } else if let Err(e) = result {
        debug!(node = %shared.cfg.name, child = %sub.name, "child stream ended: {e}");
    }
    let mut st = shared.state.lock();
    if st.children.remove(&id).is_some() {
        children_changed(&shared, &st);
    }
}

/// Passes this node's own transfer on to a child chunk by chunk, each as soon as it is
/// verified here, in ascending order; heartbeats keep the child's stream alive while a
/// chunk is awaited. `Ok(false)` when this node stopped receiving that version before
/// holding every chunk: the caller cuts the child off, and it resubscribes.
/// Waits for one of the node's transfer slots (`stream.max_backfills`), keeping the
/// child's stream alive with heartbeats meanwhile; `None` when the node shuts down or the
/// child goes away first.
async fn transfer_slot(
    shared: &Shared,
    link: Link<'_>,
    send: &mut quinn::SendStream,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, StreamError> {
    let Link { conn, sub, beat } = link;
    let acquire = Arc::clone(&shared.serving.permits).acquire_owned();
    tokio::pin!(acquire);
    loop {
        tokio::select! {
            p = &mut acquire => return Ok(Some(p.expect("the permits are never closed"))),
            _ = shared.shutdown.cancelled() => return Ok(None),
            _ = conn.closed() => return Ok(None),
            _ = tokio::time::sleep_until(beat.next()) => if beat.due() {
                let hb = heartbeat(shared, &shared.state.lock(), &sub.listen_addr);
                transport::write_raw(send, &hb).await?;
                shared.metrics.heartbeats_sent.increment(1);
                beat.sent();
            }
        }
    }
}

/// The child link a transfer writes to: its connection, its subscription, and the
/// schedule of its heartbeats.
struct Link<'a> {
    conn: &'a quinn::Connection,
    sub: &'a proto::Subscribe,
    beat: &'a mut Beat,
}

async fn follow(
    shared: &Shared,
    link: Link<'_>,
    send: &mut quinn::SendStream,
    plan: &FollowPlan,
    below: &AtomicU64,
    transfer: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<bool, StreamError> {
    let Link { conn, sub, beat } = link;
    let begin = plan.begin_frame();
    transport::write_raw(send, &begin).await?;
    shared.count_relayed(begin.len());
    let corrupt = failpoint::corrupt_chunk_for(&sub.name);
    let mut installed: Option<crate::file::ChunkedFile> = None;
    for index in plan.lacking(&sub.have_chunks) {
        if index >= below.load(Ordering::Acquire) {
            break;
        }
        let hash = &plan.manifest[index as usize];
        let mut data = loop {
            if let Some(f) = &installed {
                break f.chunk(index).unwrap_or_default();
            }
            transfer.borrow_and_update();
            let state = shared
                .state
                .lock()
                .replica
                .follow_chunk(plan.version, index, hash);
            match state {
                FollowChunk::Ready(d) => break d,
                FollowChunk::Installed(f) => installed = Some(f),
                FollowChunk::Gone => return Ok(false),
                FollowChunk::Pending => tokio::select! {
                    _ = shared.shutdown.cancelled() => return Ok(true),
                    _ = conn.closed() => return Ok(true),
                    _ = transfer.changed() => {}
                    _ = tokio::time::sleep_until(beat.next()) => if beat.due() {
                        let hb = heartbeat(shared, &shared.state.lock(), &sub.listen_addr);
                        transport::write_raw(send, &hb).await?;
                        shared.metrics.heartbeats_sent.increment(1);
                        beat.sent();
                    }
                },
            }
        };
        if let Some(target) = corrupt {
            failpoint::corrupt_chunk(&mut data, index, target);
        }
        let parts = crate::wire::encode_chunk(index, data);
        pace_backfill(shared, parts.len()).await;
        transport::write_parts(send, &parts).await?;
        beat.sent();
        shared.count_relayed(parts.len());
        shared.metrics.backfill_served.increment(parts.len() as u64);
    }
    let end = snapshot_end_frame();
    transport::write_raw(send, &end).await?;
    Ok(true)
}

/// Reads the frames the child sends up its subscription stream until it finishes the
/// stream or the connection ends: transfer limits into `limit` (lowered only), and reports
/// into the overlay while this link (`child`: name and link id) is the one registered.
async fn read_child_updates(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    child: (String, u64),
    mut recv: quinn::RecvStream,
    limit: Arc<AtomicU64>,
) {
    let (peer, id) = child;
    loop {
        match transport::read_frame::<proto::ChildUpdate>(&mut recv, MAX_CHILD_FRAME).await {
            Ok(Some(l)) => {
                if let Some(below) = l.below {
                    limit.fetch_min(below, Ordering::AcqRel);
                }
                if let Some(r) = &l.report {
                    let st = shared.state.lock();
                    if st.children.contains_key(&id) {
                        overlay_driver::input(
                            &shared,
                            Input::ChildReport {
                                name: peer.clone(),
                                report: overlay_driver::report_from_proto(r),
                            },
                        );
                    }
                }
            }
            Ok(None) | Err(StreamError::Read(_)) => return,
            Err(e) => return close_bad(&shared, &conn, &peer, &e.to_string()),
        }
    }
}

/// Serves a peer's chunk fetches on one stream until it finishes it: each `FetchChunks` is
/// answered with one `FetchReply` per index, in order. A batch from a node that is not a
/// child is served only while a transfer slot (`stream.max_backfills`) is free, otherwise
/// each index is answered `busy` so the asker turns to another source at once; served bytes
/// are paced like pushed ones.
pub(crate) async fn serve_fetch(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    peer: String,
    first: proto::FetchChunks,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let peer_name = peer.split('/').next().unwrap_or_default().to_string();
    let corrupt = failpoint::corrupt_chunk_for(&peer_name);
    let mut next = Some(first);
    loop {
        let batch = match next.take() {
            Some(b) => b,
            None => match read_fetch(&mut recv).await {
                Ok(Some(b)) => b,
                Ok(None) => {
                    let _ = send.finish();
                    return;
                }
                Err(e) if e.is_reset() => return,
                Err(e) => return close_bad(&shared, &conn, &peer, &e.to_string()),
            },
        };
        if batch.indices.len() != batch.hashes.len() || batch.indices.len() > MAX_FETCH_BATCH {
            return close_bad(&shared, &conn, &peer, "malformed fetch request");
        }
        // A child finishing the transfer this node pushed to it holds a slot already.
        let is_child = {
            let st = shared.state.lock();
            st.children.values().any(|c| c.name == peer_name)
        };
        let permit = if is_child {
            None
        } else {
            Arc::clone(&shared.serving.permits).try_acquire_owned().ok()
        };
        let _serving = permit.as_ref().map(|_| ServingGuard::new(&shared));
        for (index, hash) in batch.indices.into_iter().zip(batch.hashes) {
            let Ok(hash) = <[u8; 32]>::try_from(hash.as_ref()) else {
                return close_bad(&shared, &conn, &peer, "fetch with a malformed hash");
            };
            let mut reply = proto::FetchReply {
                index,
                ..Default::default()
            };
            if permit.is_none() && !is_child {
                reply.busy = true;
            } else {
                match shared.state.lock().replica.find_chunk(index, &hash) {
                    Some(data) => reply.data = data,
                    None => reply.missing = true,
                }
            }
            if let Some(target) = corrupt {
                failpoint::corrupt_chunk(&mut reply.data, index, target);
            }
            let len = reply.data.len();
            pace_backfill(&shared, len).await;
            let written = if len > 0 {
                let parts = crate::wire::encode_fetch_reply(reply.index, reply.data);
                transport::write_parts(&mut send, &parts).await
            } else {
                transport::write_frame(&mut send, &reply).await
            };
            if written.is_err() {
                return;
            }
            shared.count_relayed(len);
            shared.metrics.backfill_served.increment(len as u64);
        }
    }
}

/// Largest `FetchChunks` frame: [`MAX_FETCH_BATCH`] indices and hashes.
const MAX_FETCH_FRAME: usize = 64 * 1024;

/// The next `FetchChunks` on a fetch stream, bounded in size and counted before decoding.
async fn read_fetch(
    recv: &mut quinn::RecvStream,
) -> Result<Option<proto::FetchChunks>, StreamError> {
    let Some(raw) = transport::read_raw(recv, MAX_FETCH_FRAME).await? else {
        return Ok(None);
    };
    let bounds = [
        crate::wire::CountBound {
            path: &[],
            field: 1,
            max: MAX_FETCH_BATCH as u64,
            what: "indices in a fetch",
            packed: true,
        },
        crate::wire::CountBound {
            path: &[],
            field: 2,
            max: MAX_FETCH_BATCH as u64,
            what: "hashes in a fetch",
            packed: false,
        },
    ];
    crate::wire::check_counts(&raw.body(), &bounds)?;
    Ok(Some(raw.decode()?))
}

/// Closes a connection whose peer sent something malformed, counting and logging why; the
/// node keeps serving everyone else.
pub(crate) fn close_bad(shared: &Shared, conn: &quinn::Connection, peer: &str, why: &str) {
    shared.metrics.frame_errors.increment(1);
    warn!(node = %shared.cfg.name, %peer, "closing connection: {why}");
    let reason = format!("bad frame: {why}");
    conn.close(
        VarInt::from_u32(code::BAD_FRAME),
        &reason.as_bytes()[..reason.len().min(200)],
    );
}
