//! The QUIC accept loop and the dispatch of each request stream to the module that serves it.
//!
//! Invariants:
//! - Every stream carries one `Request` first; its kind decides who serves the stream.
//! - A name a peer declares (`Subscribe.name`, its own entry in a sample offer) must be the
//!   name in the certificate on that connection, or the request is refused and counted.
//! - Raft RPCs are served only on core nodes, and only to current members under the name in
//!   their core certificate; membership requests only to core certificates.
//! - Proposals are taken only by core nodes, and only from certificates whose role may write
//!   (a reader's are refused with a clear error).
//! - Bad input from a peer closes that peer's connection with a logged reason, counted in
//!   `canopy_frame_errors_total`; the node keeps serving everyone else.
//! - A request's first frame is bounded before it is read by what it asks and who asks
//!   ([`request_cap`]: a Raft RPC may be `max_frame` only from a core certificate, a
//!   proposal `max_update_bytes` plus room only from a writer to a core node, a
//!   subscription its chunk list), and its repeated fields are counted before it is
//!   decoded ([`request_counts`]); over a bound the connection is closed and the refusal
//!   counted in `canopy_rejected_total{reason}`.
//! - Unless a core node sent it, a request's first frame arrives whole within
//!   `limits.request_timeout_ms` of its stream's opening, and holds its declared length
//!   of the node-wide `limits.request_bytes` from before its body is allocated (a
//!   proposal until it is answered); otherwise its stream is reset and the refusal
//!   counted (`request_timeout`, `request_budget`), and the connection kept.
//! - A peer address holds at most `limits.connections_per_peer` connections, and each
//!   connection at most `limits.streams_per_connection` streams (QUIC flow control).
//! - Peers other than core nodes hold at most `limits.connections` connections in all;
//!   [`CORE_RESERVE`] more are kept for core certificates.

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{debug, warn};

use crate::config::StreamConfig;
use crate::proto::{self, request};
use crate::tls::{self, Role};
use crate::transport::{self, Reserved, StreamError};
use crate::wire::{self, CountBound, WireError};

use super::downstream::{close_bad, serve_child, serve_fetch, MAX_FETCH_BATCH};
use super::error::NodeError;
use super::failpoint;
use super::inspect::{self, MAX_TREE_DEPTH};
use super::overlay_driver::{self, peer_from_proto, peer_to_proto, MAX_HELD_ZONES};
use super::propose::{self, outcome_reply, MAX_HOPS};
use super::shared::Shared;

/// Most peers one sample offer may carry.
const MAX_SAMPLE_OFFER: usize = 64;
/// Largest first frame of a request that carries little: a sample, a tree query, a fetch
/// of [`crate::config::MAX_FETCH_WINDOW`] chunk hashes, a membership change.
const SMALL_REQUEST: usize = 64 * 1024;
/// Largest sample offer: [`MAX_SAMPLE_OFFER`] peers with their root paths.
const SAMPLE_REQUEST: usize = 512 * 1024;
/// Largest first frame of any other kind of request (refused after decoding, with why).
const OTHER_REQUEST: usize = 4096;
/// Room a `Subscribe` takes besides its chunk hashes (name, addresses, root).
const SUBSCRIBE_BASE: usize = 64 * 1024;
/// Room a `Propose` takes besides the data it writes (ops, id, precondition).
const PROPOSE_OVERHEAD: u64 = 1 << 20;

/// Counts one request refused for a limit, by reason (`canopy_rejected_total{reason}`).
pub(crate) fn rejected(shared: &Shared, reason: &'static str) {
    metrics::counter!("canopy_rejected_total", "node" => shared.cfg.name.clone(), "reason" => reason)
        .increment(1);
}

/// Connections open in all and per peer address, and the guard that gives one back.
#[derive(Default)]
struct Open {
    total: usize,
    per_peer: std::collections::HashMap<SocketAddr, usize>,
}

type PeerCounts = Arc<parking_lot::Mutex<Open>>;

struct PeerSlot(PeerCounts, SocketAddr);

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.0.lock();
        open.total -= 1;
        if let Some(n) = open.per_peer.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.per_peer.remove(&self.1);
            }
        }
    }
}

/// Room kept beyond `limits.connections` for core certificates: a core member's Raft links,
/// forwarded proposals and membership changes (a handful per member, at most 7 members)
/// still connect while other peers hold every slot.
pub(crate) const CORE_RESERVE: usize = 64;

/// Accepts connections until shutdown; each is served by a task of its own. A connection
/// is refused before the handshake when the node serves `limits.connections` and
/// [`CORE_RESERVE`] already, or its peer address `limits.connections_per_peer`; once its
/// certificate is known, one beyond `limits.connections` is closed unless it is a core
/// node's.
pub(crate) async fn accept_loop(shared: Arc<Shared>) {
    let counts: PeerCounts = Arc::default();
    let max = shared.cfg.limits.connections_per_peer;
    let max_total = shared.cfg.limits.connections;
    loop {
        let incoming = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            i = shared.endpoint.accept() => match i { Some(i) => i, None => return },
        };
        let remote = incoming.remote_address();
        let slot = {
            let mut open = counts.lock();
            if open.total >= max_total.saturating_add(CORE_RESERVE) {
                Err("connections")
            } else if open.per_peer.get(&remote).is_some_and(|n| *n >= max) {
                Err("connections_per_peer")
            } else {
                open.total += 1;
                *open.per_peer.entry(remote).or_insert(0) += 1;
                Ok(PeerSlot(counts.clone(), remote))
            }
        };
        let slot = match slot {
            Ok(slot) => slot,
            Err(reason) => {
                rejected(&shared, reason);
                debug!(node = %shared.cfg.name, %remote, "refused a connection: limits.{reason} ({max_total} in all, {max} per address) reached");
                incoming.refuse();
                continue;
            }
        };
        let s = shared.clone();
        let counts = counts.clone();
        shared.tasks.spawn(async move {
            let _slot = slot;
            match incoming.await {
                Ok(conn) if counts.lock().total > max_total && !from_core(&conn) => {
                    rejected(&s, "connections");
                    debug!(node = %s.cfg.name, %remote, "closed a connection: limits.connections ({max_total}) reached, and the room beyond it is kept for core nodes");
                    conn.close(
                        quinn::VarInt::from_u32(super::error::code::BUSY),
                        b"limits.connections reached",
                    );
                }
                Ok(conn) => serve_connection(s, conn).await,
                Err(e) => {
                    s.metrics.handshake_failures.increment(1);
                    warn!(node = %s.cfg.name, %remote, "refused connection: {e}");
                }
            }
        });
    }
}

/// Whether the certificate on `conn` is a core node's.
fn from_core(conn: &quinn::Connection) -> bool {
    tls::peer_identity(conn).is_some_and(|(_, role)| role == Role::Core)
}

/// The largest first frame a peer with `role` may send for the request kind `field` (the
/// `Request` oneof's field number), known before its body is read: requests this node
/// does not serve for that role get a few KiB, enough to be refused with a reason.
fn request_cap(shared: &Shared, role: Role, field: u32) -> usize {
    let core = shared.core.get().is_some();
    let stream = &shared.cfg.stream;
    let max_frame = stream.max_frame;
    match field {
        1 => subscribe_cap(stream),
        2 if core && role.may_write() => propose_cap(stream),
        3 if core && role == Role::Core => max_frame,
        4 if core && role == Role::Core => SMALL_REQUEST,
        5 => SAMPLE_REQUEST,
        7 => SMALL_REQUEST,
        _ => OTHER_REQUEST,
    }
}

/// The largest first frame of a request any peer but a core node may send (the caps of
/// [`request_cap`] for a writer on a core node): what `limits.request_bytes` must hold.
pub(crate) fn largest_request(stream: &StreamConfig) -> usize {
    subscribe_cap(stream)
        .max(propose_cap(stream))
        .max(SAMPLE_REQUEST)
        .saturating_add(wire::PREFIX_LEN)
}

/// A subscription: its fixed fields and one hash per chunk of the largest file.
fn subscribe_cap(stream: &StreamConfig) -> usize {
    SUBSCRIBE_BASE.saturating_add(35usize.saturating_mul(stream.max_chunks() as usize))
}

/// A proposal: `max_update_bytes` of data and its ops, within a frame.
fn propose_cap(stream: &StreamConfig) -> usize {
    (stream.max_update_bytes.saturating_add(PROPOSE_OVERHEAD) as usize).min(stream.max_frame)
}

/// Bounds on the repeated fields of a `Request`, checked before it is decoded.
fn request_counts(shared: &Shared) -> [CountBound; 9] {
    let max_chunks = shared.cfg.stream.max_chunks();
    [
        CountBound {
            path: &[1],
            field: 5,
            max: max_chunks,
            what: "chunk hashes in a subscription",
            packed: false,
        },
        CountBound {
            path: &[2, 1, 1],
            field: 1,
            max: propose::MAX_OPS as u64,
            what: "ops in a proposal",
            packed: false,
        },
        CountBound {
            path: &[2, 1],
            field: 4,
            max: 0,
            what: "batched proposals from outside the core",
            packed: false,
        },
        CountBound {
            path: &[5],
            field: 1,
            max: MAX_SAMPLE_OFFER as u64,
            what: "peers in a sample offer",
            packed: false,
        },
        CountBound {
            path: &[5, 1],
            field: 5,
            max: MAX_SAMPLE_OFFER as u64 * u64::from(MAX_TREE_DEPTH + 1),
            what: "root path names in a sample offer",
            packed: false,
        },
        CountBound {
            path: &[5, 1],
            field: 10,
            max: (MAX_SAMPLE_OFFER * MAX_HELD_ZONES) as u64,
            what: "held zones in a sample offer",
            packed: false,
        },
        CountBound {
            path: &[3, 1],
            field: 4,
            max: crate::consensus::MAX_APPEND_ENTRIES,
            what: "entries in an AppendEntries",
            packed: false,
        },
        CountBound {
            path: &[7],
            field: 2,
            max: MAX_FETCH_BATCH as u64,
            what: "chunk hashes in a fetch",
            packed: false,
        },
        CountBound {
            path: &[7],
            field: 1,
            max: MAX_FETCH_BATCH as u64,
            what: "indices in a fetch",
            packed: true,
        },
    ]
}

/// The reason label of a frame refused for its size or shape.
pub(crate) fn frame_reason(e: &StreamError) -> Option<&'static str> {
    match e {
        StreamError::Frame(WireError::TooLarge { .. }) => Some("frame_too_large"),
        StreamError::Frame(WireError::TooMany { .. }) => Some("too_many_elements"),
        StreamError::Frame(WireError::MixedKinds { .. }) => Some("mixed_kinds"),
        _ => None,
    }
}

/// The first frame of a request stream: capped by its kind and the peer's role, its
/// repeated fields counted, then decoded. Unless a core node sent it (the core is trusted,
/// and Raft's frames may be large on slow links), it must arrive whole within
/// `limits.request_timeout_ms` of the stream's opening, and holds its length of
/// `limits.request_bytes` from before its body is allocated.
async fn read_request(
    shared: &Shared,
    role: Role,
    recv: &mut quinn::RecvStream,
) -> Result<Option<(proto::Request, Reserved)>, StreamError> {
    let max = shared.cfg.stream.max_frame;
    let cap_of = |field| request_cap(shared, role, field);
    let read = if role == Role::Core {
        transport::read_raw_by_kind(recv, max, cap_of)
            .await?
            .map(|raw| (raw, Reserved::default()))
    } else {
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_millis(shared.cfg.limits.request_timeout_ms);
        transport::read_first_frame(recv, max, cap_of, Some(&shared.requests), deadline).await?
    };
    let Some((raw, reserved)) = read else {
        return Ok(None);
    };
    wire::check_counts(&raw.body(), &request_counts(shared))?;
    Ok(Some((raw.decode()?, reserved)))
}

/// Refuses a request whose first frame found no room in `limits.request_bytes`, or did not
/// arrive in time: counted and logged, its stream reset (a proposal is answered `busy`
/// first), the connection kept.
async fn refuse_unread(
    shared: &Shared,
    peer: &str,
    e: &StreamError,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) {
    let (reason, code) = match e {
        StreamError::Busy { .. } => ("request_budget", super::error::code::BUSY),
        _ => ("request_timeout", super::error::code::TIMEOUT),
    };
    rejected(shared, reason);
    warn!(node = %shared.cfg.name, %peer, "refused a request: {e}");
    let _ = recv.stop(quinn::VarInt::from_u32(code));
    if let StreamError::Busy { kind: 2, .. } = e {
        let busy = proto::ProposeReply {
            kind: Some(proto::propose_reply::Kind::Busy(e.to_string())),
        };
        return reply(send, &busy).await;
    }
    let _ = send.reset(quinn::VarInt::from_u32(code));
}

/// Counts an accepted connection in `canopy_connections_served` while it is served.
struct ServedGuard<'a>(&'a Shared);

impl<'a> ServedGuard<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.metrics.connections_served.increment(1.0);
        Self(shared)
    }
}

impl Drop for ServedGuard<'_> {
    fn drop(&mut self) {
        self.0.metrics.connections_served.decrement(1.0);
    }
}

async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection) {
    let Some(id) = tls::peer_identity(&conn) else {
        shared.metrics.refused_identity("certificate");
        warn!(node = %shared.cfg.name, remote = %conn.remote_address(), "closing a connection whose certificate names no node and role");
        conn.close(
            quinn::VarInt::from_u32(2),
            b"certificate without name and role",
        );
        return;
    };
    let peer = format!("{}/{}", id.0, id.1);
    let _expiry = transport::close_at_peer_expiry(&conn);
    let _open = ServedGuard::new(&shared);
    debug!(node = %shared.cfg.name, %peer, "connection");
    loop {
        let (send, recv) = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            s = conn.accept_bi() => match s { Ok(s) => s, Err(_) => return },
        };
        let (s, c, p, i) = (shared.clone(), conn.clone(), peer.clone(), id.clone());
        shared
            .tasks
            .spawn(async move { serve_stream(s, c, p, i, send, recv).await });
    }
}

/// Refuses a request whose declared name is not the certificate's: counted and logged.
fn wrong_name(shared: &Shared, what: &'static str, declared: &str, id: &(String, Role)) -> String {
    shared.metrics.refused_identity(what);
    let why = format!(
        "{what}: the name {declared:?} is not the certificate's ({})",
        id.0
    );
    warn!(node = %shared.cfg.name, peer = %id.0, "refused {why}");
    why
}

/// Writes the single reply of a request stream and finishes the stream.
async fn reply<M: prost::Message>(send: &mut quinn::SendStream, msg: &M) {
    if transport::write_frame(send, msg).await.is_ok() {
        let _ = send.finish();
    }
}

async fn serve_stream(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    peer: String,
    id: (String, Role),
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let (req, reserved) = match read_request(&shared, id.1, &mut recv).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) if e.is_reset() => return,
        Err(e @ (StreamError::Busy { .. } | StreamError::Deadline { .. })) => {
            return refuse_unread(&shared, &peer, &e, &mut send, &mut recv).await;
        }
        Err(e) => {
            if let Some(reason) = frame_reason(&e) {
                rejected(&shared, reason);
            }
            return close_bad(&shared, &conn, &peer, &e.to_string());
        }
    };
    // A proposal holds its frame's share of `limits.request_bytes` until it is answered;
    // every other request's frame is decoded, and its share given back.
    let _reserved = matches!(req.kind, Some(request::Kind::Propose(_))).then_some(reserved);
    match req.kind {
        Some(request::Kind::Subscribe(sub)) if sub.name != id.0 => {
            let reason = wrong_name(&shared, "subscribe", &sub.name, &id);
            let refusal = proto::Downstream {
                kind: Some(proto::downstream::Kind::Refused(proto::Refused {
                    reason,
                    referral: None,
                })),
            };
            reply(&mut send, &refusal).await;
        }
        Some(request::Kind::Subscribe(sub)) if !overlay_driver::addr_sane(&sub.listen_addr) => {
            rejected(&shared, "invalid_subscribe");
            close_bad(
                &shared,
                &conn,
                &peer,
                "subscription with an invalid listen address",
            )
        }
        Some(request::Kind::Subscribe(sub)) => serve_child(shared, conn, sub, send, recv).await,
        Some(request::Kind::Fetch(first)) => {
            serve_fetch(shared, conn, peer, first, send, recv).await
        }
        Some(request::Kind::Propose(p)) => {
            let Some(proposal) = p.proposal else {
                return close_bad(&shared, &conn, &peer, "propose without proposal");
            };
            let outcome = if failpoint::is_rogue() {
                Ok(crate::file::ApplyOutcome::Applied { version: 1 << 40 })
            } else if shared.core.get().is_none() {
                shared.metrics.refused_identity("propose");
                Err(NodeError::Forbidden(
                    "proposals go to core nodes, not to a relay".into(),
                ))
            } else if !id.1.may_write() {
                shared.metrics.refused_identity("propose");
                warn!(node = %shared.cfg.name, %peer, "refused a write from a {} certificate", id.1);
                Err(NodeError::Forbidden(format!(
                    "{} has the {} role, which may not write",
                    id.0, id.1
                )))
            } else if let Err(e) = propose::check(&shared, &proposal) {
                rejected(&shared, propose::check_reason(&e));
                warn!(node = %shared.cfg.name, %peer, "refused a proposal: {e}");
                let refused = proto::ProposeReply {
                    kind: Some(proto::propose_reply::Kind::Refused(e.to_string())),
                };
                return reply(&mut send, &refused).await;
            } else {
                propose::propose_hops(&shared, proposal, p.hops).await
            };
            if let Err(NodeError::Busy(_)) = &outcome {
                rejected(&shared, "busy");
            }
            reply(&mut send, &outcome_reply(outcome)).await;
        }
        Some(request::Kind::Raft(rpc)) => {
            let Some(core) = shared.core.get() else {
                return close_bad(&shared, &conn, &peer, "raft rpc to a relay");
            };
            // A node that has no membership yet (started to be added) learns it from the
            // leader's first append: until then any core certificate may reach it.
            let members = core.members();
            let member = members.is_empty() || members.iter().any(|(m, _)| m.name == id.0);
            if id.1 != Role::Core || !member {
                shared.metrics.refused_identity("raft");
                return close_bad(
                    &shared,
                    &conn,
                    &peer,
                    "raft rpc from a peer that is not a core member",
                );
            }
            let from = crate::consensus::node_id(&id.0);
            reply(&mut send, &core.handle_rpc(rpc, from).await).await;
        }
        Some(request::Kind::Sample(sample))
            if sample.offer.first().is_some_and(|me| me.name != id.0) =>
        {
            let declared = sample.offer[0].name.clone();
            wrong_name(&shared, "sample", &declared, &id);
            let _ = send.finish();
        }
        Some(request::Kind::Sample(sample)) => {
            let offer = sample
                .offer
                .into_iter()
                .take(MAX_SAMPLE_OFFER)
                .filter(overlay_driver::peer_sane)
                .map(peer_from_proto)
                .collect();
            let (mut info, mut peers) = overlay_driver::answer_sample(&shared, offer);
            if failpoint::eclipses() {
                peers.clear();
            }
            if failpoint::is_rogue() {
                let mut fake = (*info).clone();
                fake.depth = Some(0);
                info = fake.into();
            }
            let answer = proto::SampleReply {
                info: Some(peer_to_proto(&info)),
                peers: peers.iter().map(|p| peer_to_proto(p)).collect(),
            };
            shared.metrics.overlay_message("sample_answer");
            reply(&mut send, &answer).await;
        }
        Some(request::Kind::Tree(q)) => {
            let nodes = inspect::tree(&shared, q.budget.min(MAX_TREE_DEPTH)).await;
            reply(&mut send, &proto::TreeReply { nodes }).await;
        }
        Some(request::Kind::Admin(admin)) => {
            if shared.core.get().is_none() || id.1 != Role::Core {
                return close_bad(&shared, &conn, &peer, "admin request outside the core");
            }
            let error = match propose::admin(&shared, admin, MAX_HOPS + 1).await {
                Ok(()) => String::new(),
                Err(e) => e.to_string(),
            };
            reply(&mut send, &proto::AdminReply { error }).await;
        }
        None => close_bad(&shared, &conn, &peer, "request without kind"),
    }
}
