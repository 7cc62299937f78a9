//! A relay's side of the tree: follows the parent the overlay chooses.
//!
//! Invariants:
//! - The replica consumes frames from exactly one parent stream at a time.
//! - A move is make-before-break: while the new parent is asked, the old stream is not read;
//!   the switch happens only if the new parent resumes exactly after this node's version
//!   (no gap, no repeat), otherwise the old stream simply continues.
//! - A parent silent for `parent_timeout_ms` (no entry, checkpoint or heartbeat) is dead.
//! - A parent's stream is read by a task of its own: the follower's waits are cancel-safe,
//!   so no command or limit ever interrupts a frame half read.
//! - What a parent sends is bounded before it is used: each frame's size by its kind and
//!   the counts of its repeated fields before it is decoded ([`DownBounds`]), and the depth
//!   and path of its `SubscribeOk` against [`MAX_TREE_DEPTH`] before the overlay sees them.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::VarInt;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::fetch;
use crate::overlay::{Input, Peer, Reason};
use crate::prefault::Prefaulted;
use crate::proto::{self, downstream::Kind as Down, request};
use crate::replica::{Event, Replica, ReplicaError};
use crate::transport::{self, StreamError};
use crate::trust::Verifier;
use crate::wire::{CountBound, RawFrame};

use super::backfill::{refuse_source, Transfer, LINK_FRAMES};
use super::downstream::{dispatch, MAX_SUGGESTED_SOURCES};
use super::error::{code, NodeError};
use super::failpoint;
use super::inspect::MAX_TREE_DEPTH;
use super::net::open_to_parent;
use super::overlay_driver::MAX_HELD_ZONES;
use super::overlay_driver::{self, peer_from_proto};
use super::propose;
use super::shared::{Shared, State, UpstreamCommand};

mod bounds;
use bounds::*;

#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("{0}")]
    Connect(NodeError),
    #[error("{0}")]
    Stream(#[from] StreamError),
    #[error("{0}")]
    Decode(#[from] crate::wire::WireError),
    #[error("{0}")]
    Replica(#[from] ReplicaError),
    #[error("parent closed the stream")]
    Closed,
    #[error("parent silent for {0:?}")]
    Silent(Duration),
    #[error("parent refused: {reason}")]
    Refused {
        reason: String,
        referral: Option<Peer>,
    },
    #[error("detached (cycle)")]
    Detached,
    #[error("no source left for {missing} chunks of the transfer")]
    Stuck { missing: usize },
    #[error("invalid answer from the parent: {0}")]
    Invalid(String),
}

impl UpstreamError {
    fn label(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Stream(_) | Self::Decode(_) => "stream",
            Self::Replica(r) => r.label(),
            Self::Closed => "closed",
            Self::Silent(_) => "silent",
            Self::Refused { .. } => "refused",
            Self::Detached => "detached",
            Self::Stuck { .. } => "fetch_stuck",
            Self::Invalid(_) => "invalid",
        }
    }
}

struct Link {
    addr: String,
    conn: quinn::Connection,
    /// Frames read off the parent's stream by a task of their own, so that waiting for
    /// the next one can be abandoned (a command, a limit to send) without losing a
    /// frame half read.
    frames: mpsc::Receiver<Result<Option<LinkFrame>, StreamError>>,
    /// Frames taken off `frames` early by [`check_queued_seals`], fed before the next one.
    backlog: VecDeque<Result<Option<LinkFrame>, StreamError>>,
    _reader: AbortOnDrop,
    /// Carries `ChildUpdate` frames to the parent: transfer limits and this node's reports.
    send: quinn::SendStream,
    /// Closes the link when the parent's certificate expires.
    _expiry: transport::ExpiryWatch,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A frame off the parent's stream, decoded, with its chunk's BLAKE3 when it is a
/// `SnapshotChunk` (hashed by the reader task, beside the follower).
type LinkFrame = (RawFrame, Box<proto::Downstream>, Option<crate::file::Hash>);

/// Reads, decodes and (for a transfer's chunks) hashes frames off `recv` into a channel
/// until the stream ends or fails.
fn spawn_reader(
    mut recv: quinn::RecvStream,
    bounds: DownBounds,
) -> (
    mpsc::Receiver<Result<Option<LinkFrame>, StreamError>>,
    AbortOnDrop,
) {
    let (tx, rx) = mpsc::channel(LINK_FRAMES);
    let task = tokio::spawn(async move {
        loop {
            let r = match bounds.read(&mut recv).await {
                Ok(Some((raw, msg))) => {
                    let hash = match &msg.kind {
                        Some(Down::SnapshotChunk(c)) => Some(crate::file::leaf_hash(&c.data)),
                        _ => None,
                    };
                    Ok(Some((raw, Box::new(msg), hash)))
                }
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            let end = !matches!(r, Ok(Some(_)));
            if tx.send(r).await.is_err() || end {
                return;
            }
        }
    });
    (rx, AbortOnDrop(task.abort_handle()))
}

/// Opens a subscription to `addr` and reads its answer. The replica is only told about it
/// (and so switches to it) when `accept` approves the `SubscribeOk`.
async fn open_link(
    shared: &Shared,
    addr: &str,
    sub: proto::Subscribe,
) -> Result<(Link, RawFrame, proto::SubscribeOk), UpstreamError> {
    let (conn, mut send, mut recv) = open_to_parent(shared, addr)
        .await
        .map_err(UpstreamError::Connect)?;
    transport::write_frame(
        &mut send,
        &proto::Request {
            kind: Some(request::Kind::Subscribe(sub)),
        },
    )
    .await?;
    shared.metrics.overlay_message("attach_request");
    let wait = Duration::from_millis(shared.cfg.overlay.attach_timeout_ms);
    let bounds = DownBounds::of(&shared.cfg.stream);
    let (raw, msg) = tokio::time::timeout(wait, bounds.read(&mut recv))
        .await
        .map_err(|_| UpstreamError::Silent(wait))??
        .ok_or(UpstreamError::Closed)?;
    match msg.kind {
        Some(Down::SubscribeOk(ok)) if check_subscribe_ok(&ok).is_err() => {
            let why = check_subscribe_ok(&ok).err().unwrap_or_default();
            conn.close(VarInt::from_u32(code::BAD_FRAME), b"invalid subscribe_ok");
            Err(UpstreamError::Invalid(why))
        }
        Some(Down::SubscribeOk(ok)) => Ok((
            {
                let (frames, reader) = spawn_reader(recv, bounds);
                Link {
                    addr: addr.to_string(),
                    _expiry: transport::close_at_peer_expiry(&conn),
                    conn,
                    frames,
                    backlog: VecDeque::new(),
                    _reader: reader,
                    send,
                }
            },
            raw,
            ok,
        )),
        Some(Down::Refused(r)) => Err(UpstreamError::Refused {
            reason: r.reason,
            referral: r.referral.map(peer_from_proto),
        }),
        _ => Err(UpstreamError::Replica(ReplicaError::Unexpected {
            frame: "non-subscribe_ok",
            state: "awaiting subscribe_ok",
        })),
    }
}

/// A parent whose answer was out of bounds is faulty: it is not chosen again for
/// `faulty_ban_ms`, and the refusal is counted.
fn ban_if_invalid(shared: &Shared, addr: &str, e: &UpstreamError) {
    if matches!(e, UpstreamError::Invalid(_)) {
        super::serve::rejected(shared, "invalid_subscribe_ok");
        warn!(node = %shared.cfg.name, parent = %addr, "banning a parent for an invalid answer: {e}");
        overlay_driver::input(
            shared,
            Input::Faulty {
                addr: addr.to_string(),
            },
        );
    }
}

fn attach_failed(addr: &str, e: &UpstreamError) -> Input {
    match e {
        UpstreamError::Refused { referral, .. } => Input::Refused {
            addr: addr.to_string(),
            referral: referral.clone(),
        },
        _ => Input::AttachFailed {
            addr: addr.to_string(),
        },
    }
}

/// Feeds the accepted `SubscribeOk` to the replica and tells the overlay, which owns the
/// tree position, in the same critical section.
fn adopt(
    shared: &Shared,
    link: &Link,
    raw: RawFrame,
    ok: proto::SubscribeOk,
) -> Result<(), ReplicaError> {
    if ok.resume {
        shared.stats.resumes.fetch_add(1, Ordering::Relaxed);
    }
    let mut st = shared.state.lock();
    learn_signers(shared, &mut st, &ok.signers);
    let events = st.replica.expect_subscribe_ok();
    dispatch(shared, &mut st, events);
    let msg = proto::Downstream {
        kind: Some(Down::SubscribeOk(ok.clone())),
    };
    let events = st.replica.handle_downstream(raw.frame, msg)?;
    dispatch(shared, &mut st, events);
    st.suggested_sources = sane_addrs(ok.fetch_sources);
    st.parent_core_addrs = sane_addrs(ok.core_addrs);
    overlay_driver::input(
        shared,
        Input::Attached {
            addr: link.addr.clone(),
            name: ok.parent_name,
            depth: ok.parent_depth,
            root_path: ok.root_path,
        },
    );
    Ok(())
}

/// Checks and keeps core signer certificates a parent passed down, and passes the new ones
/// on to this node's children before any frame they sign. Refused ones are counted, not
/// used; a seal by an unknown signer fails later, on its own.
fn learn_signers(shared: &Shared, st: &mut State, certs: &[bytes::Bytes]) {
    let (new, refused) = st
        .replica
        .learn_signers(certs, std::time::SystemTime::now());
    for e in refused {
        shared.metrics.untrusted(e.label());
        warn!(node = %shared.cfg.name, "ignoring a signer certificate from the parent: {e}");
    }
    if !new.is_empty() {
        let frame = crate::wire::encode(&proto::Downstream {
            kind: Some(Down::Signers(proto::Signers { certs: new })),
        });
        dispatch(shared, st, vec![Event::Broadcast(frame)]);
    }
}

/// What woke the follower while it holds a parent.
enum Wake {
    Command(UpstreamCommand),
    Frame(Result<Result<Option<LinkFrame>, StreamError>, tokio::time::error::Elapsed>),
    Limit(u64),
}

/// The transfer being received: when it started and the last tenth logged.
type BackfillClock = Option<(Instant, u64)>;

/// Follows the parent the overlay chooses, switching on moves and reporting losses.
pub(crate) async fn run(shared: Arc<Shared>, mut cmds: mpsc::UnboundedReceiver<UpstreamCommand>) {
    let mut current: Option<Link> = None;
    let mut incoming: Option<Incoming> = None;
    let mut clock: BackfillClock = None;
    // The parent left by the last move: if the overlay undoes that move, it still believes
    // in this one and must hear that it is gone too.
    let mut moved_from: Option<String> = None;
    let mut full = false;
    let silent = Duration::from_millis(shared.cfg.stream.parent_timeout_ms);
    loop {
        let Some(link) = current.as_mut() else {
            incoming = None;
            let cmd = tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                c = cmds.recv() => match c { Some(c) => c, None => return },
            };
            let UpstreamCommand::Attach { addr, reason } = cmd else {
                continue;
            };
            let sub = subscription(&shared, full);
            match open_link(&shared, &addr, sub).await {
                Ok((link, raw, ok)) => match adopt(&shared, &link, raw, ok) {
                    Ok(()) => {
                        if full {
                            shared.metrics.full_transfers_received.increment(1);
                        }
                        full = false;
                        shared.metrics.reparent(reason.label());
                        info!(node = %shared.cfg.name, parent = %addr, reason = reason.label(), "attached");
                        current = Some(link);
                        moved_from = None;
                    }
                    Err(e) => {
                        warn!(node = %shared.cfg.name, parent = %addr, "attach failed: {e}");
                        link.conn
                            .close(VarInt::from_u32(code::RESYNC), b"attach failed");
                        overlay_driver::input(&shared, Input::AttachFailed { addr });
                    }
                },
                Err(e) => {
                    let explained = match &e {
                        UpstreamError::Connect(c) => {
                            super::net::explain_certificate_failure(&shared, &addr, c)
                        }
                        _ => false,
                    };
                    if !explained {
                        info!(node = %shared.cfg.name, parent = %addr, "attach failed: {e}");
                    }
                    ban_if_invalid(&shared, &addr, &e);
                    overlay_driver::input(&shared, attach_failed(&addr, &e));
                }
            }
            continue;
        };
        let wake = match link.backlog.pop_front() {
            Some(f) => Wake::Frame(Ok(f)),
            None => tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                c = cmds.recv() => match c { Some(c) => Wake::Command(c), None => return },
                r = tokio::time::timeout(silent, link.frames.recv()) => Wake::Frame(r.map(|f| f.unwrap_or(Ok(None)))),
                Some(below) = async { incoming.as_mut()?.fetch.as_mut()?.next_limit().await }, if incoming.as_ref().is_some_and(|i| i.fetch.is_some()) => Wake::Limit(below),
            },
        };
        let failure = match wake {
            Wake::Command(UpstreamCommand::Attach { addr, reason }) => {
                if let Some(old) = try_move(&shared, &mut current, addr, reason).await {
                    shared.metrics.overlay_message("detach");
                    moved_from = Some(old);
                    incoming = None;
                }
                continue;
            }
            Wake::Command(UpstreamCommand::Detach { addr }) if addr == link.addr => {
                UpstreamError::Detached
            }
            Wake::Command(UpstreamCommand::Detach { .. }) => continue,
            Wake::Limit(below) => {
                // A lost write shows up as a failed read on the same stream.
                let limit = proto::ChildUpdate {
                    below: Some(below),
                    report: None,
                };
                let _ = transport::write_frame(&mut link.send, &limit).await;
                continue;
            }
            Wake::Command(UpstreamCommand::Report(r)) => {
                let up = proto::ChildUpdate {
                    below: None,
                    report: Some(overlay_driver::report_to_proto(&r)),
                };
                let _ = transport::write_frame(&mut link.send, &up).await;
                shared.metrics.overlay_message("child_report");
                continue;
            }
            Wake::Frame(Err(_)) => UpstreamError::Silent(silent),
            Wake::Frame(Ok(Ok(None))) => UpstreamError::Closed,
            Wake::Frame(Ok(Err(e))) => e.into(),
            Wake::Frame(Ok(Ok(Some(frame)))) => {
                if matches!(frame.1.kind, Some(Down::Entry(_))) && link.backlog.is_empty() {
                    check_queued_seals(&shared, &frame, link);
                }
                match follow_frame(&shared, link, &mut incoming, &mut clock, frame).await {
                    Ok(()) => continue,
                    Err(e) => e,
                }
            }
        };
        incoming = None;
        let addr = link.addr.clone();
        link.conn
            .close(VarInt::from_u32(code::RESYNC), b"resubscribing");
        current = None;
        {
            let mut st = shared.state.lock();
            let events = st.replica.upstream_lost();
            dispatch(&shared, &mut st, events);
        }
        full = matches!(&failure, UpstreamError::Replica(r) if r.needs_full_resync());
        if let UpstreamError::Replica(ReplicaError::BadChunk { index }) = &failure {
            refuse_source(&shared, &addr, *index, true);
        }
        if let UpstreamError::Replica(ReplicaError::Untrusted { reason, detail }) = &failure {
            shared.metrics.untrusted(reason);
            error!(node = %shared.cfg.name, parent = %addr, reason, "UNTRUSTED parent, banned and re-attaching elsewhere: {detail}");
            overlay_driver::input(&shared, Input::Faulty { addr: addr.clone() });
        }
        if matches!(&failure, UpstreamError::Replica(ReplicaError::Gap { .. })) {
            shared.stats.gaps.fetch_add(1, Ordering::Relaxed);
        }
        shared.metrics.resync(failure.label());
        let untrusted = matches!(
            &failure,
            UpstreamError::Replica(ReplicaError::Untrusted { .. })
        );
        if full {
            shared.metrics.checkpoint_mismatches.increment(1);
            error!(node = %shared.cfg.name, parent = %addr, "DIVERGED, resyncing in full: {failure}");
        } else if !untrusted {
            warn!(node = %shared.cfg.name, parent = %addr, "upstream lost: {failure}");
        }
        overlay_driver::input(&shared, Input::ParentLost { addr });
        if let Some(old) = moved_from.take() {
            overlay_driver::input(&shared, Input::ParentLost { addr: old });
        }
    }
}

/// A transfer this node receives from its parent: the fetch from other peers beside the
/// push, and the heap faulted in for its chunks. Both end with it, whichever way it ends.
struct Incoming {
    /// `None` when the transfer draws on the parent alone.
    fetch: Option<Transfer>,
    _warm: Prefaulted,
}

/// Feeds one frame from the parent to the replica and keeps the multi-source transfer in
/// step with it: started after the manifest (with the heap faulted in for what is missing),
/// told of every pushed chunk, and awaited when the push ends before the fetched chunks are
/// all in.
async fn follow_frame(
    shared: &Arc<Shared>,
    link: &Link,
    incoming: &mut Option<Incoming>,
    clock: &mut BackfillClock,
    frame: LinkFrame,
) -> Result<(), UpstreamError> {
    if matches!(frame.1.kind, Some(Down::Heartbeat(_))) {
        let udp = link.conn.stats();
        shared.metrics.heartbeats_received.increment(1);
        shared
            .metrics
            .parent_link_sent
            .set(udp.udp_tx.datagrams as f64);
        shared
            .metrics
            .parent_link_received
            .set(udp.udp_rx.datagrams as f64);
        shared
            .metrics
            .parent_link_mtu
            .set(f64::from(udp.path.current_mtu));
    }
    match apply_frame(shared, clock, frame)? {
        Fed::Begin => {
            let fetch = Transfer::start(shared, &link.addr, &link.conn);
            *incoming = Some(Incoming {
                fetch,
                _warm: prefault_missing(shared),
            });
        }
        Fed::Chunk(index) => {
            if let Some(t) = incoming.as_mut().and_then(|i| i.fetch.as_mut()) {
                // Peers learnt since the push began, or in place of failed ones.
                if index % ADD_PEERS_EVERY == ADD_PEERS_EVERY - 1 {
                    t.add_peers();
                }
                t.tell(fetch::Input::Received {
                    source: None,
                    index,
                });
            }
        }
        Fed::End => {
            let mut ending = incoming.take();
            let Some(mut t) = ending.as_mut().and_then(|i| i.fetch.take()) else {
                let st = shared.state.lock();
                if st.replica.snapshot_waiting() {
                    let missing = st.replica.snapshot_wanted().map_or(0, |w| w.1.len());
                    return Err(UpstreamError::Stuck { missing });
                }
                return Ok(());
            };
            t.tell(fetch::Input::PushEnded);
            if !shared.state.lock().replica.snapshot_waiting() {
                return Ok(());
            }
            let outcome = tokio::select! {
                _ = shared.shutdown.cancelled() => return Ok(()),
                o = t.outcome() => o,
            };
            if let Err(missing) = outcome {
                return Err(UpstreamError::Stuck { missing });
            }
            let mut st = shared.state.lock();
            let events = st.replica.finish_snapshot()?;
            settle(shared, &mut st, clock, events);
        }
        Fed::Other => {}
    }
    Ok(())
}

/// Grows the heap for the bytes the transfer just begun will bring (see [`Prefaulted`]), on
/// the worker that runs the link, where they are allocated, and faults it in on a blocking
/// thread (the second core), while the worker goes on receiving. Nothing when the runtime has
/// several workers (the chunks may be allocated on another thread's heap) or the chunks are
/// too large for the heap (glibc maps each on its own).
fn prefault_missing(shared: &Shared) -> Prefaulted {
    let one_worker =
        tokio::runtime::Handle::try_current().is_ok_and(|h| h.metrics().num_workers() == 1);
    if !one_worker || shared.cfg.stream.chunk_size as usize >= Prefaulted::BLOCK {
        return Prefaulted::default();
    }
    let (held, len) = shared
        .state
        .lock()
        .replica
        .backfill_progress()
        .unwrap_or((0, 0));
    let bytes = usize::try_from(len.saturating_sub(held)).unwrap_or(usize::MAX);
    let (warm, populate) = Prefaulted::reserve(bytes);
    if populate.is_empty() {
        return warm;
    }
    let counter = shared.metrics.backfill_prefaulted.clone();
    let node = shared.cfg.name.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let bytes = populate.run();
        counter.increment(bytes as u64);
        debug!(%node, bytes, took = ?started.elapsed(), "heap faulted in for the transfer");
    });
    warm
}

/// Most frames [`check_queued_seals`] takes off a link ahead of the one being fed: the
/// reader's channel holds at most [`LINK_FRAMES`].
const LOOKAHEAD_FRAMES: usize = 2 * LINK_FRAMES;

/// Before feeding the entry `first`: takes the frames already queued behind it (none is
/// awaited) and has the seals among them checked as a chain ([`Verifier::check_chain`]), so
/// that a relay behind its parent checks one signature for a run of entries instead of one
/// each. The frames are fed afterwards, in order, as if read one by one.
fn check_queued_seals(shared: &Shared, first: &LinkFrame, link: &mut Link) {
    while link.backlog.len() < LOOKAHEAD_FRAMES {
        match link.frames.try_recv() {
            Ok(f) => link.backlog.push_back(f),
            Err(_) => break,
        }
    }
    let queued = link
        .backlog
        .iter()
        .map_while(|r| r.as_ref().ok().and_then(Option::as_ref));
    let seals = crate::trust::queued_seals(
        std::iter::once(first)
            .chain(queued)
            .map(|(raw, msg, _)| (&raw.frame, &**msg)),
    );
    if seals.len() < 2 {
        return;
    }
    let verifier: Option<Verifier> = shared.state.lock().replica.verifier().cloned();
    if let Some(verifier) = verifier {
        let proven = verifier.check_chain(&seals);
        shared.metrics.seals_chained.increment(proven as u64);
    }
}

fn subscription(shared: &Shared, full: bool) -> proto::Subscribe {
    let name = failpoint::declared_name().unwrap_or_else(|| shared.cfg.name.clone());
    let report = shared.overlay.lock().overlay.report();
    let st = shared.state.lock();
    let mut sub = st
        .replica
        .subscription(&name, &shared.cfg.advertise.to_string(), full);
    sub.report = Some(overlay_driver::report_to_proto(&report));
    sub.zone = shared.cfg.zone.clone().unwrap_or_default();
    sub
}

/// Pushed chunks between two looks for more peers to fetch from.
const ADD_PEERS_EVERY: u64 = 64;

/// What a frame from the parent was, as far as a transfer cares.
enum Fed {
    Begin,
    Chunk(u64),
    End,
    Other,
}

fn apply_frame(
    shared: &Shared,
    clock: &mut BackfillClock,
    (raw, msg, hash): LinkFrame,
) -> Result<Fed, UpstreamError> {
    let mut path = None;
    let fed = match &msg.kind {
        Some(Down::SnapshotBegin(_)) => Fed::Begin,
        Some(Down::SnapshotChunk(c)) => {
            let len = c.data.len() as u64;
            shared.metrics.backfill_received.increment(len);
            shared
                .stats
                .backfill_received
                .fetch_add(len, Ordering::Relaxed);
            Fed::Chunk(c.index)
        }
        Some(Down::SnapshotEnd(_)) => Fed::End,
        Some(Down::Heartbeat(h)) => {
            if !h.root_path.is_empty() {
                let mut p = h.root_path.clone();
                p.push(shared.cfg.name.clone());
                path = Some(p);
            }
            Fed::Other
        }
        _ => Fed::Other,
    };
    if let Some(Down::Signers(signers)) = &msg.kind {
        let mut st = shared.state.lock();
        learn_signers(shared, &mut st, &signers.certs);
        return Ok(Fed::Other);
    }
    let sources = match &msg.kind {
        Some(Down::Heartbeat(h)) if !h.fetch_sources.is_empty() => Some(sane_addrs(
            h.fetch_sources
                .iter()
                .take(MAX_SUGGESTED_SOURCES)
                .cloned()
                .collect(),
        )),
        _ => None,
    };
    let mut st = shared.state.lock();
    let events = st.replica.handle_downstream_hashed(raw.frame, *msg, hash)?;
    if let Some(sources) = sources {
        st.suggested_sources = sources;
    }
    if let Some(path) = path {
        let mut cell = shared.overlay.lock();
        if cell.overlay.info().root_path != path {
            cell.overlay.update_path(&path);
            shared.metrics.overlay_message("path_update");
        }
    }
    settle(shared, &mut st, clock, events);
    drop(st);
    if matches!(fed, Fed::Begin | Fed::Chunk(_)) {
        shared.transfer_progressed();
    }
    Ok(fed)
}

/// Counts, logs and carries out what the replica returned for a frame or a finished
/// transfer.
fn settle(shared: &Shared, st: &mut State, clock: &mut BackfillClock, events: Vec<Event>) {
    let installed = events.iter().any(|e| matches!(e, Event::Installed { .. }));
    let applied = events
        .iter()
        .filter(|e| matches!(e, Event::Applied { .. }))
        .count() as u64;
    if !installed {
        shared
            .stats
            .entries_applied
            .fetch_add(applied, Ordering::Relaxed);
    }
    log_backfill(shared, &st.replica, clock, installed);
    dispatch(shared, st, events);
    if installed {
        shared.metrics.full_transfers_received.increment(1);
    }
}

/// The relay's log as a progress bar: one line per tenth of a transfer, and a summary with
/// the throughput at the end (`canopy_backfill_seconds` gets the duration).
fn log_backfill(shared: &Shared, replica: &Replica, clock: &mut BackfillClock, installed: bool) {
    if installed {
        if let Some((started, _)) = clock.take() {
            let secs = started.elapsed().as_secs_f64();
            let len = replica.file().len();
            shared.metrics.backfill_seconds.record(secs);
            info!(
                node = %shared.cfg.name,
                bytes = len,
                received = shared.stats.backfill_received.load(Ordering::Relaxed),
                "backfill done in {secs:.2} s ({:.1} MB/s), root verified",
                len as f64 / 1e6 / secs.max(1e-9)
            );
        }
        return;
    }
    let Some((done, total)) = replica.backfill_progress() else {
        return;
    };
    let (started, logged) = clock.get_or_insert_with(|| (Instant::now(), 0));
    let tenth = (done * 10).checked_div(total).unwrap_or(10);
    if tenth > *logged {
        *logged = tenth;
        info!(
            node = %shared.cfg.name,
            "backfill {}% ({done}/{total} bytes, {:.1} s)",
            tenth * 10,
            started.elapsed().as_secs_f64()
        );
    }
}

/// Make-before-break: subscribe to `addr` at this node's exact version while the current
/// stream is not read; switch only on a resume that keeps the tree acyclic and gains
/// enough. Returns the address of the parent it left, if it switched.
async fn try_move(
    shared: &Arc<Shared>,
    current: &mut Option<Link>,
    addr: String,
    reason: Reason,
) -> Option<String> {
    let mut left = None;
    let sub = subscription(shared, false);
    match open_link(shared, &addr, sub).await {
        Ok((link, _, ok))
            if !shared
                .overlay
                .lock()
                .overlay
                .keeps_move(ok.parent_depth, &ok.root_path) =>
        {
            // The view was stale: the new parent sits below this node now (switching would
            // close a cycle), or it is not shallow enough to be worth a move. The overlay
            // would undo the move; keep the current parent instead of switching first.
            link.conn
                .close(VarInt::from_u32(code::MOVED), b"move aborted: stale view");
            overlay_driver::input(
                shared,
                Input::Refused {
                    addr,
                    referral: None,
                },
            );
        }
        Ok((link, raw, ok)) if ok.resume => {
            if let Some(old) = current.take() {
                left = Some(old.addr.clone());
                old.conn
                    .close(VarInt::from_u32(code::MOVED), b"moved to another parent");
            }
            match adopt(shared, &link, raw, ok) {
                Ok(()) => {
                    shared.metrics.reparent(reason.label());
                    info!(node = %shared.cfg.name, parent = %addr, "moved");
                    *current = Some(link);
                }
                Err(e) => {
                    warn!(node = %shared.cfg.name, parent = %addr, "move failed after switching: {e}");
                    let mut st = shared.state.lock();
                    let events = st.replica.upstream_lost();
                    dispatch(shared, &mut st, events);
                    drop(st);
                    overlay_driver::input(shared, Input::ParentLost { addr });
                    if let Some(old) = left.take() {
                        overlay_driver::input(shared, Input::ParentLost { addr: old });
                    }
                }
            }
        }
        Ok((link, _, _)) => {
            link.conn
                .close(VarInt::from_u32(code::MOVED), b"move aborted: no resume");
            overlay_driver::input(
                shared,
                Input::Refused {
                    addr,
                    referral: None,
                },
            );
        }
        Err(e) => {
            ban_if_invalid(shared, &addr, &e);
            overlay_driver::input(shared, attach_failed(&addr, &e))
        }
    }
    left
}
