//! A relay's multi-source transfer: drives the [`Scheduler`] over QUIC fetch streams.
//!
//! While the parent pushes a transfer's chunks from the bottom, peers from the overlay view
//! are asked for chunks from the top (see [`crate::fetch`]); the parent's own connection is
//! the fallback for whatever no peer holds.
//!
//! Invariants:
//! - Every fetched chunk is hashed and compared with the manifest before the replica takes
//!   it; a mismatch counts as a bad chunk, bans the source as a parent, and returns its
//!   chunks to the pool.
//! - A source with chunks outstanding that answers nothing for `parent_timeout_ms` is dropped.
//! - Dropping a [`Transfer`] stops every task it started; the chunks already verified stay
//!   with the replica, so the next transfer does not fetch them again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::seq::SliceRandom;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use crate::fetch::{FetchConfig, Input, Output, Scheduler};
use crate::file::Hash;
use crate::overlay;
use crate::proto::{self, request};
use crate::transport::{self, StreamError};

use super::net::connect;
use super::overlay_driver;
use super::shared::Shared;

/// Frames buffered between a link's reader task and the follower.
pub(crate) const LINK_FRAMES: usize = 16;

/// Counts and logs a chunk that failed the manifest, and bans its sender as a parent;
/// `from_parent` when the parent sent it (its push or its fallback fetch stream).
pub(crate) fn refuse_source(shared: &Shared, addr: &str, index: u64, from_parent: bool) {
    shared.stats.bad_chunks.fetch_add(1, Ordering::Relaxed);
    shared.metrics.bad_chunk(from_parent);
    error!(node = %shared.cfg.name, source = %addr, index, "refused a chunk that does not match the manifest; banning the source as parent and fetching the rest elsewhere");
    overlay_driver::input(
        shared,
        overlay::Input::Faulty {
            addr: addr.to_string(),
        },
    );
}

/// The largest `FetchReply` a peer may send: one chunk and its index (the cap of a
/// parent's `SnapshotChunk` too), so a source cannot make this node buffer a frame of
/// `max_frame` for each fetch stream.
fn fetch_reply_cap(cfg: &crate::config::StreamConfig) -> usize {
    (cfg.chunk_size as usize)
        .saturating_add(64)
        .min(cfg.max_frame)
}

/// A multi-source transfer in progress; see the module docs.
pub(crate) struct Transfer {
    shared: Arc<Shared>,
    parent: String,
    version: u64,
    manifest: Arc<Vec<Hash>>,
    inputs: mpsc::UnboundedSender<Input<String>>,
    /// Each source's request channel, for the driver.
    reqs: Requests,
    limit: watch::Receiver<u64>,
    outcome: watch::Receiver<Option<Result<(), usize>>>,
    cancel: CancellationToken,
    /// Peers asked so far (never asked twice in one transfer).
    used: BTreeSet<String>,
    /// Peer sources still running.
    live: Arc<AtomicUsize>,
}

type Requests = Arc<Mutex<BTreeMap<String, mpsc::UnboundedSender<Vec<u64>>>>>;

#[derive(Debug, thiserror::Error)]
enum SourceError {
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Stream(#[from] StreamError),
    #[error("busy")]
    Busy,
    #[error("silent for {0:?} with chunks outstanding")]
    Silent(Duration),
    #[error("chunk {0} does not match the manifest")]
    BadChunk(u64),
}

impl Transfer {
    /// Call right after the replica took a `SnapshotBegin` from the parent at `parent`.
    /// Returns `None` (the parent's push alone) when `fetch_sources` is 1 or the transfer
    /// holds less than `fetch_min_bytes` beyond what the push may have in flight. Otherwise
    /// opens the fallback fetch stream to the parent and asks the peers in the view; call
    /// [`Transfer::add_peers`] now and then for peers learnt since, and [`Transfer::tell`] it
    /// every pushed chunk and the end of the push.
    pub(crate) fn start(
        shared: &Arc<Shared>,
        parent: &str,
        parent_conn: &quinn::Connection,
    ) -> Option<Self> {
        let cfg = &shared.cfg.stream;
        if cfg.fetch_sources <= 1 {
            return None;
        }
        let (version, missing, manifest) = shared.state.lock().replica.snapshot_wanted()?;
        // What the parent may have sent that this node has not taken yet: the stream's
        // flow-control window plus the link's frame buffer. Peers are worth asking only
        // for at least `fetch_min_bytes` beyond it.
        let margin = cfg.stream_window_bytes / u64::from(cfg.chunk_size) + LINK_FRAMES as u64;
        let beyond = (missing.len() as u64).saturating_sub(margin);
        if beyond.saturating_mul(u64::from(cfg.chunk_size)) < cfg.fetch_min_bytes {
            return None;
        }
        let sched = Scheduler::new(
            FetchConfig {
                window: cfg.fetch_window as usize,
                margin,
            },
            manifest.len() as u64,
            missing.iter().copied(),
        );
        let (inputs, rx) = mpsc::unbounded_channel();
        let (limit_tx, limit) = watch::channel(manifest.len() as u64);
        let (outcome_tx, outcome) = watch::channel(None);
        let cancel = shared.shutdown.child_token();
        let reqs = Requests::default();
        let driver = drive(
            shared.clone(),
            sched,
            rx,
            reqs.clone(),
            limit_tx,
            outcome_tx,
        );
        let stop = cancel.clone();
        shared.tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = driver => {}
            }
        });
        let mut t = Self {
            shared: shared.clone(),
            parent: parent.to_string(),
            version,
            manifest: Arc::new(manifest),
            inputs,
            reqs,
            limit,
            outcome,
            cancel,
            used: BTreeSet::new(),
            live: Arc::new(AtomicUsize::new(0)),
        };
        t.spawn_source(parent.to_string(), Some(parent_conn.clone()), true);
        t.add_peers();
        Some(t)
    }

    /// Asks peers from the view that this transfer has not asked yet, up to
    /// `fetch_sources - 1` running at once.
    pub(crate) fn add_peers(&mut self) {
        let room = (self.shared.cfg.stream.fetch_sources as usize - 1)
            .saturating_sub(self.live.load(Ordering::Acquire));
        if room == 0 {
            return;
        }
        let (children, mut peers) = {
            let st = self.shared.state.lock();
            let children: BTreeSet<String> = st.children.values().map(|c| c.addr.clone()).collect();
            (children, st.suggested_sources.clone())
        };
        let mut cell = self.shared.overlay.lock();
        for p in cell.overlay.fetch_sources() {
            if !peers.contains(&p) {
                peers.push(p);
            }
        }
        let me = self.shared.cfg.advertise.to_string();
        peers.retain(|p| {
            *p != self.parent && *p != me && !children.contains(p) && !self.used.contains(p)
        });
        if peers.is_empty() {
            return;
        }
        peers.shuffle(&mut cell.rng);
        drop(cell);
        peers.truncate(room);
        info!(
            node = %self.shared.cfg.name,
            version = self.version,
            peers = ?peers,
            "transfer: fetching from peers besides the parent"
        );
        self.shared
            .state
            .lock()
            .fetch_peers
            .extend(peers.iter().cloned());
        for p in peers {
            self.spawn_source(p, None, false);
        }
    }

    fn spawn_source(&mut self, addr: String, conn: Option<quinn::Connection>, fallback: bool) {
        let (tx, req_rx) = mpsc::unbounded_channel();
        self.reqs.lock().insert(addr.clone(), tx);
        if !fallback {
            self.used.insert(addr.clone());
            self.live.fetch_add(1, Ordering::AcqRel);
        }
        let source = Source {
            shared: self.shared.clone(),
            addr,
            fallback,
            version: self.version,
            manifest: self.manifest.clone(),
            inputs: self.inputs.clone(),
        };
        let cancel = self.cancel.clone();
        let live = self.live.clone();
        self.shared.tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = source.run(conn, req_rx) => {}
            }
            if !fallback {
                live.fetch_sub(1, Ordering::AcqRel);
            }
        });
    }

    /// Passes what the parent's stream delivered (`Received` with no source, `PushEnded`).
    pub(crate) fn tell(&self, input: Input<String>) {
        let _ = self.inputs.send(input);
    }

    /// The next lower limit to send the parent (`ChildUpdate.below`); `None` once the transfer
    /// has no more to say.
    pub(crate) async fn next_limit(&mut self) -> Option<u64> {
        self.limit.changed().await.ok()?;
        Some(*self.limit.borrow_and_update())
    }

    /// After `PushEnded`: waits until every chunk is in (`Ok`) or no source can serve the
    /// `Err(missing)` ones.
    pub(crate) async fn outcome(&mut self) -> Result<(), usize> {
        loop {
            if let Some(o) = *self.outcome.borrow_and_update() {
                return o;
            }
            if self.outcome.changed().await.is_err() {
                return Err(0);
            }
        }
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.shared.state.lock().fetch_peers.clear();
    }
}

/// Runs the scheduler: takes what the sources and the push report, hands out requests and
/// limits, and ends with the outcome.
async fn drive(
    shared: Arc<Shared>,
    mut sched: Scheduler<String>,
    mut rx: mpsc::UnboundedReceiver<Input<String>>,
    reqs: Requests,
    limit: watch::Sender<u64>,
    outcome: watch::Sender<Option<Result<(), usize>>>,
) {
    while let Some(input) = rx.recv().await {
        for out in sched.handle(input) {
            match out {
                Output::Limit { below } => {
                    let _ = limit.send(below);
                }
                Output::Request { source, indices } => {
                    if let Some(r) = reqs.lock().get(&source) {
                        let _ = r.send(indices);
                    }
                }
                Output::Complete => {
                    info!(
                        node = %shared.cfg.name,
                        by_source = ?sched.received_by_source(),
                        "transfer: chunks fetched besides the push"
                    );
                    let _ = outcome.send(Some(Ok(())));
                    reqs.lock().clear();
                    return;
                }
                Output::Stuck { missing } => {
                    let _ = outcome.send(Some(Err(missing)));
                    reqs.lock().clear();
                    return;
                }
            }
        }
    }
}

/// One fetch source of a transfer.
struct Source {
    shared: Arc<Shared>,
    addr: String,
    fallback: bool,
    version: u64,
    manifest: Arc<Vec<Hash>>,
    inputs: mpsc::UnboundedSender<Input<String>>,
}

impl Source {
    async fn run(self, conn: Option<quinn::Connection>, reqs: mpsc::UnboundedReceiver<Vec<u64>>) {
        if let Err(e) = self.fetch(conn, reqs).await {
            debug!(node = %self.shared.cfg.name, source = %self.addr, "fetch source dropped: {e}");
            let _ = self.inputs.send(Input::SourceFailed {
                source: self.addr.clone(),
            });
        }
    }

    async fn fetch(
        &self,
        conn: Option<quinn::Connection>,
        mut reqs: mpsc::UnboundedReceiver<Vec<u64>>,
    ) -> Result<(), SourceError> {
        let conn = match conn {
            Some(c) => c,
            None => connect(&self.shared, &self.addr)
                .await
                .map_err(|e| SourceError::Connect(e.to_string()))?,
        };
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| SourceError::Connect(e.to_string()))?;
        let _ = self.inputs.send(Input::SourceReady {
            source: self.addr.clone(),
            fallback: self.fallback,
        });
        let outstanding = AtomicUsize::new(0);
        let writer = async {
            let mut first = true;
            while let Some(indices) = reqs.recv().await {
                outstanding.fetch_add(indices.len(), Ordering::AcqRel);
                let hashes = indices
                    .iter()
                    .map(|i| bytes::Bytes::copy_from_slice(&self.manifest[*i as usize]))
                    .collect();
                let ask = proto::FetchChunks { indices, hashes };
                if first {
                    let req = proto::Request {
                        kind: Some(request::Kind::Fetch(ask)),
                    };
                    transport::write_frame(&mut send, &req).await?;
                    first = false;
                } else {
                    transport::write_frame(&mut send, &ask).await?;
                }
            }
            let _ = send.finish();
            Ok::<(), SourceError>(())
        };
        let silent = Duration::from_millis(self.shared.cfg.stream.parent_timeout_ms);
        let reader = async {
            loop {
                let read = transport::read_frame::<proto::FetchReply>(
                    &mut recv,
                    fetch_reply_cap(&self.shared.cfg.stream),
                );
                let reply = match tokio::time::timeout(silent, read).await {
                    Err(_) if outstanding.load(Ordering::Acquire) == 0 => continue,
                    Err(_) => return Err(SourceError::Silent(silent)),
                    Ok(r) => match r? {
                        Some(reply) => reply,
                        None => return Ok(()),
                    },
                };
                outstanding.fetch_sub(1, Ordering::AcqRel);
                self.take(reply)?;
            }
        };
        tokio::try_join!(writer, reader)?;
        Ok(())
    }

    /// Checks one reply against the manifest and hands its chunk to the replica.
    fn take(&self, reply: proto::FetchReply) -> Result<(), SourceError> {
        let index = reply.index;
        if reply.busy {
            return Err(SourceError::Busy);
        }
        let source = self.addr.clone();
        if reply.missing {
            let _ = self.inputs.send(Input::Missing { source, index });
            return Ok(());
        }
        let hash = crate::file::leaf_hash(&reply.data);
        if self.manifest.get(index as usize) != Some(&hash) {
            refuse_source(&self.shared, &self.addr, index, self.fallback);
            return Err(SourceError::BadChunk(index));
        }
        let len = reply.data.len() as u64;
        let new = self.shared.state.lock().replica.put_fetched_chunk(
            self.version,
            index,
            reply.data,
            hash,
        );
        match new {
            Ok(true) => {
                self.shared.transfer_progressed();
                let stats = &self.shared.stats;
                stats.backfill_received.fetch_add(len, Ordering::Relaxed);
                if self.fallback {
                    self.shared.metrics.backfill_received.increment(len);
                } else {
                    stats.backfill_from_peers.fetch_add(len, Ordering::Relaxed);
                    self.shared.metrics.backfill_received_peers.increment(len);
                }
            }
            Ok(false) => {}
            Err(_) => {
                refuse_source(&self.shared, &self.addr, index, self.fallback);
                return Err(SourceError::BadChunk(index));
            }
        }
        let _ = self.inputs.send(Input::Received {
            source: Some(source),
            index,
        });
        Ok(())
    }
}
