//! A relay's side of the tree: drives the overlay state machine and follows its parent.
//!
//! Invariants:
//! - The replica consumes frames from exactly one parent stream at a time.
//! - A move is make-before-break: while the new parent is asked, the old stream is not read;
//!   the switch happens only if the new parent resumes exactly after this node's version
//!   (no gap, no repeat), otherwise the old stream simply continues.
//! - A parent silent for `parent_timeout_ms` (no entry, checkpoint or heartbeat) is dead.
//! - A parent's stream is read by a task of its own: the follower's waits are cancel-safe,
//!   so no command or limit ever interrupts a frame half read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::VarInt;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::backfill::Transfer;
use crate::fetch;
use crate::node::{code, connect, exchange, now_us, Shared};
use crate::overlay::{Input, Output, Peer, PeerInfo, Reason};
use crate::proto::{self, downstream::Kind as Down, request};
use crate::replica::{Event, ReplicaError};
use crate::wire::{self, RawFrame, WireError};

/// What the overlay driver asks the upstream follower to do.
#[derive(Debug)]
pub(crate) enum Command {
    Attach { addr: String, reason: Reason },
    Detach { addr: String },
}

/// Converts between the overlay's and the wire's peer descriptions.
pub fn peer_to_proto(p: &PeerInfo) -> proto::PeerInfo {
    proto::PeerInfo {
        name: p.name.clone(),
        addr: p.addr.clone(),
        depth: p.depth.map(|d| d as i32).unwrap_or(-1),
        free_slots: p.free_slots,
        root_path: p.root_path.clone(),
    }
}

pub fn peer_from_proto(p: proto::PeerInfo) -> Peer {
    Peer::new(PeerInfo {
        name: p.name,
        addr: p.addr,
        depth: u32::try_from(p.depth).ok(),
        free_slots: p.free_slots,
        root_path: p.root_path,
        height: 0,
        room: 0,
        zone: None,
    })
}

/// A seed for this node's overlay RNG, logged so a run can be replayed.
pub(crate) fn overlay_rng(name: &str) -> ChaCha8Rng {
    let seed = blake3::hash(format!("{name}/{}", now_us()).as_bytes());
    let seed: [u8; 32] = *seed.as_bytes();
    info!(node = %name, seed = %hex::encode(seed), "overlay rng seed");
    ChaCha8Rng::from_seed(seed)
}

/// Runs the overlay: ticks, sample requests, and attach decisions handed to the follower.
pub(crate) async fn overlay_loop(
    shared: Arc<Shared>,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    cmds: mpsc::UnboundedSender<Command>,
) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let input = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => None,
            i = inputs.recv() => match i { Some(i) => Some(i), None => return },
        };
        let now = start.elapsed().as_millis() as u64;
        let children: Vec<(String, String)> = shared
            .state
            .lock()
            .unwrap()
            .children
            .values()
            .map(|c| (c.name.clone(), c.addr.clone()))
            .collect();
        let outputs = {
            let mut o = shared.overlay.lock().unwrap();
            let mut rng = shared.overlay_rng.lock().unwrap();
            let mut out = Vec::new();
            for change in o.children_changes(&children) {
                out.extend(o.handle(now, change, &mut *rng));
            }
            out.extend(o.handle(now, input.unwrap_or(Input::Tick), &mut *rng));
            out
        };
        for out in outputs {
            match out {
                Output::RequestSample { addr, offer } => {
                    let s = shared.clone();
                    shared.tasks.spawn(async move {
                        let input = match request_sample(&s, &addr, offer).await {
                            Ok((info, peers)) => Input::Sampled { addr, info, peers },
                            Err(e) => {
                                warn!(node = %s.cfg.name, peer = %addr, "sample failed: {e}");
                                Input::SampleFailed { addr }
                            }
                        };
                        let _ = s.overlay_tx.send(input);
                    });
                }
                Output::Attach { addr, reason, .. } => {
                    let _ = cmds.send(Command::Attach { addr, reason });
                }
                Output::Detach { addr } => {
                    let _ = cmds.send(Command::Detach { addr });
                }
                Output::Report(_) => {}
            }
        }
    }
}

async fn request_sample(
    shared: &Shared,
    addr: &str,
    offer: Vec<Peer>,
) -> Result<(Peer, Vec<Peer>), crate::node::NodeError> {
    let timeout = Duration::from_millis(shared.cfg.overlay.probe_timeout_ms);
    let ask = exchange::<proto::SampleReply>(
        shared,
        addr,
        request::Kind::Sample(proto::Sample {
            offer: offer.iter().map(|p| peer_to_proto(p)).collect(),
        }),
    );
    let r = tokio::time::timeout(timeout, ask).await.map_err(|_| {
        crate::node::NodeError::Connect {
            addr: addr.to_string(),
            reason: "sample timed out".into(),
        }
    })??;
    let info = r
        .info
        .map(peer_from_proto)
        .ok_or(crate::node::NodeError::Wire(WireError::Truncated))?;
    Ok((info, r.peers.into_iter().map(peer_from_proto).collect()))
}

#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("{0}")]
    Connect(crate::node::NodeError),
    #[error("{0}")]
    Wire(#[from] WireError),
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
}

impl UpstreamError {
    fn label(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Wire(_) => "stream",
            Self::Replica(r) => r.label(),
            Self::Closed => "closed",
            Self::Silent(_) => "silent",
            Self::Refused { .. } => "refused",
            Self::Detached => "detached",
            Self::Stuck { .. } => "fetch_stuck",
        }
    }
}

struct Link {
    addr: String,
    conn: quinn::Connection,
    /// Frames read off the parent's stream by a task of their own, so that waiting for
    /// the next one can be abandoned (a command, a limit to send) without losing a
    /// frame half read.
    frames: mpsc::Receiver<Result<Option<LinkFrame>, WireError>>,
    _reader: AbortOnDrop,
    /// Carries `SnapshotLimit` frames to the parent during a multi-source transfer.
    send: quinn::SendStream,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Frames buffered between a link's reader task and the follower.
pub(crate) const LINK_FRAMES: usize = 16;

/// A frame off the parent's stream, decoded, with its chunk's BLAKE3 when it is a
/// `SnapshotChunk` (hashed by the reader task, beside the follower).
type LinkFrame = (RawFrame, proto::Downstream, Option<crate::file::Hash>);

/// Reads, decodes and (for a transfer's chunks) hashes frames off `recv` into a channel
/// until the stream ends or fails.
fn spawn_reader(
    mut recv: quinn::RecvStream,
    max_frame: usize,
) -> (
    mpsc::Receiver<Result<Option<LinkFrame>, WireError>>,
    AbortOnDrop,
) {
    let (tx, rx) = mpsc::channel(LINK_FRAMES);
    let task = tokio::spawn(async move {
        loop {
            let r = match wire::read_raw(&mut recv, max_frame).await {
                Ok(Some(raw)) => raw.decode::<proto::Downstream>().map(|msg| {
                    let hash = match &msg.kind {
                        Some(Down::SnapshotChunk(c)) => Some(crate::file::leaf_hash(&c.data)),
                        _ => None,
                    };
                    Some((raw, msg, hash))
                }),
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
    let conn = connect(shared, addr)
        .await
        .map_err(UpstreamError::Connect)?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| {
        UpstreamError::Connect(crate::node::NodeError::Connect {
            addr: addr.to_string(),
            reason: e.to_string(),
        })
    })?;
    wire::write_frame(
        &mut send,
        &proto::Request {
            kind: Some(request::Kind::Subscribe(sub)),
        },
    )
    .await?;
    let wait = Duration::from_millis(shared.cfg.overlay.attach_timeout_ms);
    let raw = tokio::time::timeout(wait, wire::read_raw(&mut recv, shared.cfg.stream.max_frame))
        .await
        .map_err(|_| UpstreamError::Silent(wait))??
        .ok_or(UpstreamError::Closed)?;
    let msg: proto::Downstream = raw.decode()?;
    match msg.kind {
        Some(Down::SubscribeOk(ok)) => Ok((
            {
                let (frames, reader) = spawn_reader(recv, shared.cfg.stream.max_frame);
                Link {
                    addr: addr.to_string(),
                    conn,
                    frames,
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

/// Feeds the accepted `SubscribeOk` to the replica and tells the overlay.
fn adopt(
    shared: &Shared,
    link: &Link,
    raw: RawFrame,
    ok: proto::SubscribeOk,
) -> Result<(), ReplicaError> {
    if ok.resume {
        shared
            .stats
            .resumes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let mut st = shared.state.lock().unwrap();
    st.replica.expect_subscribe_ok();
    let msg = proto::Downstream {
        kind: Some(Down::SubscribeOk(ok.clone())),
    };
    let events = st.replica.handle_downstream(raw.frame, msg)?;
    shared.dispatch(&mut st, events);
    shared.metrics.depth.set(shared.depth(&st) as f64);
    *shared.parent_addr.lock().unwrap() = link.addr.clone();
    *shared.suggested_sources.lock().unwrap() = ok.fetch_sources.clone();
    let _ = shared.overlay_tx.send(Input::Attached {
        addr: link.addr.clone(),
        name: ok.parent_name,
        depth: ok.parent_depth,
        root_path: ok.root_path,
    });
    Ok(())
}

/// What woke the follower while it holds a parent.
enum Wake {
    Command(Command),
    Frame(Result<Result<Option<LinkFrame>, WireError>, tokio::time::error::Elapsed>),
    Limit(u64),
}

/// Follows the parent the overlay chooses, switching on moves and reporting losses.
pub(crate) async fn upstream_loop(shared: Arc<Shared>, mut cmds: mpsc::UnboundedReceiver<Command>) {
    let mut current: Option<Link> = None;
    let mut transfer: Option<Transfer> = None;
    // The parent left by the last move: if the overlay undoes that move, it still believes
    // in this one and must hear that it is gone too.
    let mut moved_from: Option<String> = None;
    let mut full = false;
    let silent = Duration::from_millis(shared.cfg.stream.parent_timeout_ms);
    loop {
        let Some(link) = current.as_mut() else {
            transfer = None;
            let cmd = tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                c = cmds.recv() => match c { Some(c) => c, None => return },
            };
            let Command::Attach { addr, reason, .. } = cmd else {
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
                        let _ = shared.overlay_tx.send(Input::AttachFailed { addr });
                    }
                },
                Err(e) => {
                    info!(node = %shared.cfg.name, parent = %addr, "attach failed: {e}");
                    let _ = shared.overlay_tx.send(attach_failed(&addr, &e));
                }
            }
            continue;
        };
        let wake = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            c = cmds.recv() => match c { Some(c) => Wake::Command(c), None => return },
            r = tokio::time::timeout(silent, link.frames.recv()) => Wake::Frame(r.map(|f| f.unwrap_or(Ok(None)))),
            Some(below) = async { transfer.as_mut()?.next_limit().await }, if transfer.is_some() => Wake::Limit(below),
        };
        let failure = match wake {
            Wake::Command(Command::Attach { addr, reason, .. }) => {
                if let Some(old) = try_move(&shared, &mut current, addr, reason).await {
                    moved_from = Some(old);
                    transfer = None;
                }
                continue;
            }
            Wake::Command(Command::Detach { addr }) if addr == link.addr => UpstreamError::Detached,
            Wake::Command(Command::Detach { .. }) => continue,
            Wake::Limit(below) => {
                // A lost write shows up as a failed read on the same stream.
                let _ = wire::write_frame(&mut link.send, &proto::SnapshotLimit { below }).await;
                continue;
            }
            Wake::Frame(Err(_)) => UpstreamError::Silent(silent),
            Wake::Frame(Ok(Ok(None))) => UpstreamError::Closed,
            Wake::Frame(Ok(Err(e))) => e.into(),
            Wake::Frame(Ok(Ok(Some(frame)))) => {
                match follow_frame(&shared, link, &mut transfer, frame).await {
                    Ok(()) => continue,
                    Err(e) => e,
                }
            }
        };
        transfer = None;
        let addr = link.addr.clone();
        link.conn
            .close(VarInt::from_u32(code::RESYNC), b"resubscribing");
        current = None;
        shared.state.lock().unwrap().replica.upstream_lost();
        *shared.parent_addr.lock().unwrap() = String::new();
        full = matches!(&failure, UpstreamError::Replica(r) if r.needs_full_resync());
        if let UpstreamError::Replica(ReplicaError::BadChunk { index }) = &failure {
            refuse_source(&shared, &addr, *index);
        }
        if matches!(&failure, UpstreamError::Replica(ReplicaError::Gap { .. })) {
            shared
                .stats
                .gaps
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        shared.metrics.resync(failure.label());
        if full {
            shared.metrics.checkpoint_mismatches.increment(1);
            error!(node = %shared.cfg.name, parent = %addr, "DIVERGED, resyncing in full: {failure}");
        } else {
            warn!(node = %shared.cfg.name, parent = %addr, "upstream lost: {failure}");
        }
        let _ = shared.overlay_tx.send(Input::ParentLost { addr });
        if let Some(old) = moved_from.take() {
            let _ = shared.overlay_tx.send(Input::ParentLost { addr: old });
        }
    }
}

/// Counts and logs a chunk that failed the manifest, and bans its sender as a parent.
pub(crate) fn refuse_source(shared: &Shared, addr: &str, index: u64) {
    shared
        .stats
        .bad_chunks
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    shared.metrics.bad_chunk(addr);
    error!(node = %shared.cfg.name, source = %addr, index, "refused a chunk that does not match the manifest; banning the source as parent and fetching the rest elsewhere");
    let _ = shared.overlay_tx.send(Input::Faulty {
        addr: addr.to_string(),
    });
}

/// Feeds one frame from the parent to the replica and keeps the multi-source transfer in
/// step with it: started after the manifest, told of every pushed chunk, and awaited when
/// the push ends before the fetched chunks are all in.
async fn follow_frame(
    shared: &Arc<Shared>,
    link: &Link,
    transfer: &mut Option<Transfer>,
    frame: LinkFrame,
) -> Result<(), UpstreamError> {
    match apply_frame(shared, frame)? {
        Fed::Begin => *transfer = Transfer::start(shared, &link.addr, &link.conn),
        Fed::Chunk(index) => {
            if let Some(t) = transfer.as_mut() {
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
            let Some(mut t) = transfer.take() else {
                let st = shared.state.lock().unwrap();
                if st.replica.snapshot_waiting() {
                    let missing = st.replica.snapshot_wanted().map_or(0, |w| w.1.len());
                    return Err(UpstreamError::Stuck { missing });
                }
                return Ok(());
            };
            t.tell(fetch::Input::PushEnded);
            if !shared.state.lock().unwrap().replica.snapshot_waiting() {
                return Ok(());
            }
            let outcome = tokio::select! {
                _ = shared.shutdown.cancelled() => return Ok(()),
                o = t.outcome() => o,
            };
            if let Err(missing) = outcome {
                return Err(UpstreamError::Stuck { missing });
            }
            let mut st = shared.state.lock().unwrap();
            let events = st.replica.finish_snapshot()?;
            settle(shared, &mut st, events);
        }
        Fed::Other => {}
    }
    Ok(())
}

fn subscription(shared: &Shared, full: bool) -> proto::Subscribe {
    let st = shared.state.lock().unwrap();
    st.replica
        .subscription(&shared.cfg.name, &shared.cfg.advertise.to_string(), full)
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

fn apply_frame(shared: &Shared, (raw, msg, hash): LinkFrame) -> Result<Fed, UpstreamError> {
    let fed = match &msg.kind {
        Some(Down::SnapshotBegin(_)) => Fed::Begin,
        Some(Down::SnapshotChunk(c)) => {
            shared
                .metrics
                .backfill_received
                .increment(c.data.len() as u64);
            shared
                .stats
                .backfill_received
                .fetch_add(c.data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Fed::Chunk(c.index)
        }
        Some(Down::SnapshotEnd(_)) => Fed::End,
        Some(Down::Heartbeat(h)) => {
            if !h.fetch_sources.is_empty() {
                *shared.suggested_sources.lock().unwrap() = h
                    .fetch_sources
                    .iter()
                    .take(crate::node::MAX_SUGGESTED_SOURCES)
                    .cloned()
                    .collect();
            }
            Fed::Other
        }
        _ => Fed::Other,
    };
    let mut st = shared.state.lock().unwrap();
    let depth_before = st.replica.parent().map(|p| p.depth);
    let events = st.replica.handle_downstream_hashed(raw.frame, msg, hash)?;
    if st.replica.parent().map(|p| p.depth) != depth_before {
        shared.metrics.depth.set(shared.depth(&st) as f64);
        let path = st.replica.root_path();
        shared.overlay.lock().unwrap().update_path(&path);
    }
    settle(shared, &mut st, events);
    Ok(fed)
}

/// Counts, logs and carries out what the replica returned for a frame or a finished
/// transfer.
fn settle(shared: &Shared, st: &mut crate::node::State, events: Vec<Event>) {
    let installed = events.iter().any(|e| matches!(e, Event::Installed { .. }));
    let applied = events
        .iter()
        .filter(|e| matches!(e, Event::Applied { .. }))
        .count() as u64;
    if !installed {
        shared
            .stats
            .entries_applied
            .fetch_add(applied, std::sync::atomic::Ordering::Relaxed);
    }
    log_backfill(shared, &st.replica, installed);
    shared.dispatch(st, events);
    if installed {
        shared.metrics.full_transfers_received.increment(1);
    }
}

/// The relay's log as a progress bar: one line per tenth of a transfer, and a summary with
/// the throughput at the end (`canopy_backfill_seconds` gets the duration).
fn log_backfill(shared: &Shared, replica: &crate::replica::Replica, installed: bool) {
    let mut clock = shared.backfill_clock.lock().unwrap();
    if installed {
        if let Some((started, _)) = clock.take() {
            let secs = started.elapsed().as_secs_f64();
            let len = replica.file().len();
            shared.metrics.backfill_seconds.record(secs);
            info!(
                node = %shared.cfg.name,
                bytes = len,
                received = shared.stats.backfill_received.load(std::sync::atomic::Ordering::Relaxed),
                "backfill done in {secs:.2} s ({:.1} MB/s), root verified",
                len as f64 / 1e6 / secs.max(1e-9)
            );
        }
        return;
    }
    let Some((done, total)) = replica.backfill_progress() else {
        return;
    };
    let (started, logged) = clock.get_or_insert_with(|| (std::time::Instant::now(), 0));
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
/// enough.
/// Returns the address of the parent it left, if it switched.
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
                .unwrap()
                .keeps_move(ok.parent_depth, &ok.root_path) =>
        {
            // The view was stale: the new parent sits below this node now (switching would
            // close a cycle), or it is not shallow enough to be worth a move. The overlay
            // would undo the move; keep the current parent instead of switching first.
            link.conn
                .close(VarInt::from_u32(code::MOVED), b"move aborted: stale view");
            let _ = shared.overlay_tx.send(Input::Refused {
                addr,
                referral: None,
            });
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
                    shared.state.lock().unwrap().replica.upstream_lost();
                    let _ = shared.overlay_tx.send(Input::ParentLost { addr });
                    if let Some(old) = left.take() {
                        let _ = shared.overlay_tx.send(Input::ParentLost { addr: old });
                    }
                }
            }
        }
        Ok((link, _, _)) => {
            link.conn
                .close(VarInt::from_u32(code::MOVED), b"move aborted: no resume");
            let _ = shared.overlay_tx.send(Input::Refused {
                addr,
                referral: None,
            });
        }
        Err(e) => {
            let _ = shared.overlay_tx.send(attach_failed(&addr, &e));
        }
    }
    left
}
