//! Raft RPCs between core members over mutual-TLS QUIC, one bidirectional stream per RPC.
//!
//! Invariants:
//! - One RPC is one stream: the client writes one `Request{raft}` frame and finishes the stream;
//!   the server answers with one `RaftReply` frame ([`Core::handle_rpc`]).
//! - Log entries travel as protobuf `RaftEntry` through the log store's conversion; every other
//!   openraft structure travels as JSON.
//! - There are at most two connections per target node id, shared by every client openraft
//!   makes for it: the bulk connection carries AppendEntries with entries and InstallSnapshot;
//!   the control connection carries everything small (empty AppendEntries, votes, pre-votes and
//!   liveness heartbeats), so that those never wait behind a large entry for flow-control
//!   credit or congestion window. A dial runs independently of the RPC that started it, so an
//!   RPC timing out does not abort a handshake; a closed connection or failed dial is replaced
//!   by a new dial on the next RPC.
//! - A connection is used only if the peer's certificate names the target member, role core.
//! - Connection-level failures are `Unreachable` (openraft backs off); a failure of one stream is
//!   `NetworkError`; an error the remote Raft returned is a `RemoteError` carrying that error.
//!   A peer becoming unreachable is logged once at WARN, and its recovery once at INFO: a peer
//!   that is paused or restarting is an expected, recovered condition.
//! - Every call returns within its `RPCOption::hard_ttl`. An AppendEntries that carries entries
//!   keeps going in the background for up to [`DETACHED_LIMIT`] after its call timed out, and
//!   the next call with the same vote, previous log id and entries waits for that delivery and
//!   takes its answer instead of sending the entries again; at most one such delivery per client
//!   exists, and a different request or dropping the client aborts it. (openraft's
//!   AppendEntries timeout is the heartbeat interval, shorter than shipping a large entry.)
//! - A stream abandoned mid-request is reset, never finished, so the server never sees a partial
//!   frame as a complete one.
//! - No request larger than the frame cap is sent; an oversized AppendEntries answers
//!   `PayloadTooLarge` with the number of entries that fit.
//! - [`Core::handle_rpc`] answers every input, malformed or not, with a `RaftReply`. A message
//!   from a leader counts as leader contact on arrival ([`super::election`]). An InstallSnapshot
//!   segment is handed to openraft only if it ends within the largest snapshot this node
//!   accepts and starts no later than the bytes already received of that snapshot, so no
//!   offset can make the receiving file grow past the data actually sent.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use openraft::error::{
    InstallSnapshotError, NetworkError as RaftNetworkError, PayloadTooLarge, RPCError, RaftError,
    RemoteError, Timeout, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{RPCTypes, RaftNetwork, RaftNetworkFactory};
use prost::Message;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::election::{self, Heartbeat, HeartbeatResponse, PreVoteRequest, PreVoteResponse};
use super::log_store::{entry_from_proto, entry_to_proto};
use super::{Core, Member, NodeId, TypeConfig};
use crate::proto::{self, raft_reply, raft_rpc, request};
use crate::tls::Role;
use crate::transport::{self, StreamError};
use crate::wire;

mod serve;

/// Longest time one dial (address resolution plus QUIC handshake) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest time an AppendEntries delivery continues after its call timed out.
const DETACHED_LIMIT: Duration = Duration::from_secs(30);

/// Stream error code sent when an RPC is abandoned before its request was complete.
const CANCELLED: u32 = 1;

/// Frame overhead allowed per entry when estimating how many entries fit in one frame.
const ENTRY_OVERHEAD: usize = 16;

/// Frame overhead allowed for the messages around the entries (their tags and lengths grow).
const NESTING_OVERHEAD: usize = 64;

/// Errors of the Raft transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Dialed(transport::DialError),
    #[error("connection to {addr}: {source}")]
    Connection {
        addr: String,
        source: quinn::ConnectionError,
    },
    #[error(transparent)]
    Dial(Arc<TransportError>),
    #[error("dialing {addr} took longer than {DIAL_TIMEOUT:?}")]
    DialTimeout { addr: String },
    #[error("raft rpc stream: {0}")]
    Wire(#[from] StreamError),
    #[error("peer closed the stream without a reply")]
    NoReply,
    #[error("peer could not serve the rpc: {0}")]
    Refused(String),
    #[error("raft request of {len} bytes exceeds the {max}-byte frame limit")]
    TooLarge { len: usize, max: usize },
    #[error("encoding raft request: {0}")]
    Encode(String),
    #[error("malformed raft reply: {0}")]
    BadReply(String),
    #[error("append entries delivery gave up after {DETACHED_LIMIT:?}")]
    Abandoned,
    #[error("append entries delivery failed: {0}")]
    Delivery(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// How a failed RPC is reported to openraft.
enum Failure {
    Unreachable(TransportError),
    Network(TransportError),
    TooManyEntries(u64),
}

impl From<TransportError> for Failure {
    fn from(e: TransportError) -> Self {
        Failure::Network(e)
    }
}

type Dial = Shared<BoxFuture<'static, Result<quinn::Connection, Arc<TransportError>>>>;

/// The cached connection (or dial in progress) to one target, with the address it is for.
type Slot = Arc<Mutex<Option<(String, Dial)>>>;

/// Which of the two connections to a target an RPC uses; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Channel {
    Bulk,
    Control,
}

/// Whether a target is currently failing, to log only the changes.
#[derive(Default)]
struct Health {
    failing: AtomicBool,
}

impl Health {
    fn up(&self, member: &Member) {
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(peer = %member, "raft peer is reachable again");
        }
    }

    fn down(&self, member: &Member, e: &dyn std::fmt::Display) {
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(peer = %member, "raft peer is unreachable (retrying): {e}");
        }
    }
}

/// Creates openraft's per-peer clients; all of them share the connections to each target.
#[derive(Clone)]
pub struct Network {
    me: NodeId,
    endpoint: quinn::Endpoint,
    max_frame: usize,
    slots: Arc<Mutex<HashMap<(NodeId, Channel), Slot>>>,
    health: Arc<Mutex<HashMap<NodeId, Arc<Health>>>>,
}

impl Network {
    /// The transport of node `me`, dialing from `endpoint`; no frame it sends or reads exceeds
    /// `max_frame` bytes.
    pub fn new(me: NodeId, endpoint: quinn::Endpoint, max_frame: usize) -> Network {
        Network {
            me,
            endpoint,
            max_frame,
            slots: Arc::default(),
            health: Arc::default(),
        }
    }

    fn slot(&self, target: NodeId, channel: Channel) -> Slot {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((target, channel))
            .or_default()
            .clone()
    }

    fn peer(&self, target: NodeId, member: &Member) -> Arc<Peer> {
        let health = self
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(target)
            .or_default()
            .clone();
        Arc::new(Peer {
            target,
            member: member.clone(),
            endpoint: self.endpoint.clone(),
            max_frame: self.max_frame,
            bulk: self.slot(target, Channel::Bulk),
            control: self.slot(target, Channel::Control),
            health,
        })
    }

    /// One of Canopy's own RPCs (pre-vote, heartbeat) to `member` on the control connection.
    async fn control<Resp: DeserializeOwned>(
        &self,
        target: NodeId,
        member: &Member,
        rpc: raft_rpc::Kind,
        ttl: Duration,
    ) -> Result<Resp, TransportError> {
        let peer = self.peer(target, member);
        let result = match tokio::time::timeout(ttl, peer.call(rpc, Channel::Control)).await {
            Err(_) => Err(TransportError::Timeout(ttl)),
            Ok(Err(Failure::Unreachable(e) | Failure::Network(e))) => Err(e),
            Ok(Err(Failure::TooManyEntries(_))) => {
                Err(TransportError::BadReply("unexpected entries hint".into()))
            }
            Ok(Ok(raft_reply::Kind::OkJson(json))) => {
                serde_json::from_str(&json).map_err(|e| TransportError::BadReply(e.to_string()))
            }
            Ok(Ok(raft_reply::Kind::Error(e))) => Err(TransportError::Refused(e)),
            Ok(Ok(raft_reply::Kind::RaftErrorJson(e))) => Err(TransportError::BadReply(e)),
        };
        match &result {
            Ok(_) => peer.health.up(member),
            Err(e) => peer.health.down(member, e),
        }
        result
    }

    /// Ask `member` for a pre-vote.
    pub(super) async fn pre_vote(
        &self,
        target: NodeId,
        member: &Member,
        req: &PreVoteRequest,
        ttl: Duration,
    ) -> Result<PreVoteResponse, TransportError> {
        let rpc = raft_rpc::Kind::PreVoteJson(to_json(req)?);
        self.control(target, member, rpc, ttl).await
    }

    /// Send `member` the leader's liveness heartbeat.
    pub(super) async fn heartbeat(
        &self,
        target: NodeId,
        member: &Member,
        beat: &Heartbeat,
        ttl: Duration,
    ) -> Result<HeartbeatResponse, TransportError> {
        let rpc = raft_rpc::Kind::HeartbeatJson(to_json(beat)?);
        self.control(target, member, rpc, ttl).await
    }

    /// Dial `member` on a fresh connection (closed again at once) to check that it answers at
    /// its address with a core certificate for its name.
    pub(super) async fn probe(&self, member: &Member, ttl: Duration) -> Result<(), TransportError> {
        let addr = member.addr.clone();
        match tokio::time::timeout(ttl, dial(self.endpoint.clone(), member.clone())).await {
            Ok(Ok(conn)) => {
                conn.close(quinn::VarInt::from_u32(0), b"probe done");
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TransportError::DialTimeout { addr }),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        PeerClient {
            me: self.me,
            peer: self.peer(target, node),
            delivery: None,
        }
    }
}

/// Sends Raft RPCs to one peer.
pub struct PeerClient {
    me: NodeId,
    peer: Arc<Peer>,
    delivery: Option<Delivery>,
}

/// What identifies an AppendEntries for reusing its answer: the same vote, previous log id and
/// entries (log ids name entries uniquely).
#[derive(Clone, Debug, PartialEq, Eq)]
struct AppendKey {
    vote: openraft::Vote<NodeId>,
    prev: Option<openraft::LogId<NodeId>>,
    first: Option<openraft::LogId<NodeId>>,
    last: Option<openraft::LogId<NodeId>>,
    count: usize,
}

type Reply = Shared<BoxFuture<'static, Result<raft_reply::Kind, Arc<Failure>>>>;

/// An AppendEntries delivery running on its own task.
struct Delivery {
    key: AppendKey,
    reply: Reply,
    task: tokio::task::AbortHandle,
}

impl Drop for Delivery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The target of a client and the way to reach it.
struct Peer {
    target: NodeId,
    member: Member,
    endpoint: quinn::Endpoint,
    max_frame: usize,
    bulk: Slot,
    control: Slot,
    health: Arc<Health>,
}

impl Peer {
    async fn connection(&self, channel: Channel) -> Result<quinn::Connection, Arc<TransportError>> {
        let slot = match channel {
            Channel::Bulk => &self.bulk,
            Channel::Control => &self.control,
        };
        let pending = {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            match &*slot {
                Some((addr, dial))
                    if *addr == self.member.addr
                        && match dial.peek() {
                            None => true,
                            Some(Ok(conn)) => conn.close_reason().is_none(),
                            Some(Err(_)) => false,
                        } =>
                {
                    dial.clone()
                }
                _ => {
                    let dial = dial(self.endpoint.clone(), self.member.clone())
                        .map(|r| r.map_err(Arc::new))
                        .boxed()
                        .shared();
                    *slot = Some((self.member.addr.clone(), dial.clone()));
                    dial
                }
            }
        };
        pending.await
    }

    async fn call(
        &self,
        rpc: raft_rpc::Kind,
        channel: Channel,
    ) -> Result<raft_reply::Kind, Failure> {
        let request = proto::Request {
            kind: Some(request::Kind::Raft(proto::RaftRpc { kind: Some(rpc) })),
        };
        let len = request.encoded_len();
        if len + wire::PREFIX_LEN > self.max_frame {
            return Err(self.oversized(&request, len));
        }
        let frame = wire::encode(&request);
        drop(request);
        let conn = self
            .connection(channel)
            .await
            .map_err(|e| Failure::Unreachable(TransportError::Dial(e)))?;
        let (send, mut recv) = conn.open_bi().await.map_err(|source| {
            Failure::Unreachable(TransportError::Connection {
                addr: self.member.addr.clone(),
                source,
            })
        })?;
        let mut out = Outgoing {
            stream: send,
            complete: false,
        };
        transport::write_raw(&mut out.stream, &frame)
            .await
            .map_err(classify)?;
        out.complete = true;
        let _ = out.stream.finish();
        drop(frame);
        let reply = transport::read_frame::<proto::RaftReply>(&mut recv, self.max_frame)
            .await
            .map_err(classify)?
            .ok_or(TransportError::NoReply)?;
        reply
            .kind
            .ok_or_else(|| TransportError::BadReply("reply without kind".into()).into())
    }

    /// Start delivering `rpc` on its own task (bulk connection), which gives up after
    /// [`DETACHED_LIMIT`].
    fn detach(self: &Arc<Self>, key: AppendKey, rpc: raft_rpc::Kind) -> Delivery {
        let peer = self.clone();
        let task = tokio::spawn(async move {
            tokio::time::timeout(DETACHED_LIMIT, peer.call(rpc, Channel::Bulk)).await
        });
        let abort = task.abort_handle();
        let reply = async move {
            match task.await {
                Ok(Ok(reply)) => reply.map_err(Arc::new),
                Ok(Err(_)) => Err(Arc::new(Failure::Network(TransportError::Abandoned))),
                Err(e) => Err(Arc::new(Failure::Network(TransportError::Delivery(
                    e.to_string(),
                )))),
            }
        }
        .boxed()
        .shared();
        Delivery {
            key,
            reply,
            task: abort,
        }
    }

    fn oversized(&self, request: &proto::Request, len: usize) -> Failure {
        let too_large = TransportError::TooLarge {
            len,
            max: self.max_frame,
        };
        let Some(request::Kind::Raft(proto::RaftRpc {
            kind: Some(raft_rpc::Kind::AppendEntries(ae)),
        })) = &request.kind
        else {
            return Failure::Network(too_large);
        };
        let entries: usize = ae.entries.iter().map(|e| e.encoded_len()).sum();
        let base = len - entries + NESTING_OVERHEAD + wire::PREFIX_LEN;
        let mut budget = self.max_frame.saturating_sub(base);
        let mut fit = 0u64;
        for e in &ae.entries {
            let need = e.encoded_len() + ENTRY_OVERHEAD;
            if need > budget {
                break;
            }
            budget -= need;
            fit += 1;
        }
        if fit == 0 {
            tracing::error!(
                target = self.target,
                "{too_large}: a single entry cannot be sent (it was appended before entries \
                 were bounded by the frame limit)"
            );
            Failure::Network(too_large)
        } else {
            Failure::TooManyEntries(fit)
        }
    }
}

impl PeerClient {
    /// Await `reply` within the call's hard TTL and turn it into openraft's result.
    async fn finish<Resp, E, F>(
        &self,
        action: RPCTypes,
        channel: Channel,
        option: &RPCOption,
        reply: F,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error,
        RaftError<NodeId, E>: DeserializeOwned,
        F: Future<Output = Result<raft_reply::Kind, Arc<Failure>>>,
    {
        let ttl = option.hard_ttl();
        let peer = &self.peer;
        let Ok(outcome) = tokio::time::timeout(ttl, reply).await else {
            if channel == Channel::Control {
                peer.health.down(
                    &peer.member,
                    &format_args!("{action:?} timed out after {ttl:?}"),
                );
            }
            return Err(RPCError::Timeout(Timeout {
                action,
                id: self.me,
                target: self.peer.target,
                timeout: ttl,
            }));
        };
        let failure = match outcome {
            Ok(raft_reply::Kind::OkJson(json)) => match serde_json::from_str(&json) {
                Ok(resp) => {
                    peer.health.up(&peer.member);
                    return Ok(resp);
                }
                Err(e) => Failure::Network(TransportError::BadReply(e.to_string())),
            },
            Ok(raft_reply::Kind::RaftErrorJson(json)) => {
                match serde_json::from_str::<RaftError<NodeId, E>>(&json) {
                    Ok(err) => {
                        peer.health.up(&peer.member);
                        return Err(RPCError::RemoteError(RemoteError::new_with_node(
                            peer.target,
                            peer.member.clone(),
                            err,
                        )));
                    }
                    Err(e) => Failure::Network(TransportError::BadReply(e.to_string())),
                }
            }
            Ok(raft_reply::Kind::Error(e)) => Failure::Unreachable(TransportError::Refused(e)),
            Err(f) => {
                if let Failure::Unreachable(e) = &*f {
                    peer.health.down(&peer.member, e);
                }
                return Err(to_rpc_error(peer.target, action, &f));
            }
        };
        if let Failure::Unreachable(e) = &failure {
            peer.health.down(&peer.member, e);
        }
        Err(to_rpc_error(peer.target, action, &failure))
    }

    /// Send `rpc` as a call bounded by the hard TTL.
    async fn rpc<Resp, E>(
        &self,
        action: RPCTypes,
        channel: Channel,
        option: &RPCOption,
        rpc: Result<raft_rpc::Kind, TransportError>,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error,
        RaftError<NodeId, E>: DeserializeOwned,
    {
        let peer = self.peer.clone();
        let reply = async move {
            match rpc {
                Ok(rpc) => peer.call(rpc, channel).await.map_err(Arc::new),
                Err(e) => Err(Arc::new(Failure::Network(e))),
            }
        };
        self.finish(action, channel, option, reply).await
    }
}

fn to_rpc_error<E: std::error::Error>(
    target: NodeId,
    action: RPCTypes,
    failure: &Failure,
) -> RPCError<NodeId, Member, RaftError<NodeId, E>> {
    match failure {
        Failure::Unreachable(e) => {
            tracing::debug!(target, ?action, "raft peer unreachable: {e}");
            RPCError::Unreachable(Unreachable::new(e))
        }
        Failure::Network(e) => {
            tracing::debug!(target, ?action, "raft rpc failed: {e}");
            RPCError::Network(RaftNetworkError::new(e))
        }
        Failure::TooManyEntries(fit) => {
            RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(*fit))
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        if rpc.entries.is_empty() {
            let encoded = encode_append_entries(&rpc);
            drop(rpc);
            return self
                .rpc(RPCTypes::AppendEntries, Channel::Control, &option, encoded)
                .await;
        }
        let key = AppendKey {
            vote: rpc.vote,
            prev: rpc.prev_log_id,
            first: rpc.entries.first().map(|e| e.log_id),
            last: rpc.entries.last().map(|e| e.log_id),
            count: rpc.entries.len(),
        };
        let delivery = match self.delivery.take() {
            Some(d) if d.key == key && !matches!(d.reply.peek(), Some(Err(_))) => d,
            _ => match encode_append_entries(&rpc) {
                Ok(kind) => self.peer.detach(key, kind),
                Err(e) => {
                    let failure = Failure::Network(e);
                    return Err(to_rpc_error(
                        self.peer.target,
                        RPCTypes::AppendEntries,
                        &failure,
                    ));
                }
            },
        };
        drop(rpc);
        let reply = delivery.reply.clone();
        self.delivery = Some(delivery);
        self.finish(RPCTypes::AppendEntries, Channel::Bulk, &option, reply)
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let encoded = (|| {
            Ok(raft_rpc::Kind::InstallSnapshot(proto::InstallSnapshot {
                vote_json: to_json(&rpc.vote)?,
                meta_json: to_json(&rpc.meta)?,
                offset: rpc.offset,
                data: Bytes::from(rpc.data),
                done: rpc.done,
            }))
        })();
        self.rpc(RPCTypes::InstallSnapshot, Channel::Bulk, &option, encoded)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let encoded = to_json(&rpc).map(raft_rpc::Kind::VoteJson);
        self.rpc(RPCTypes::Vote, Channel::Control, &option, encoded)
            .await
    }
}

fn encode_append_entries(
    rpc: &AppendEntriesRequest<TypeConfig>,
) -> Result<raft_rpc::Kind, TransportError> {
    let entries = rpc
        .entries
        .iter()
        .map(entry_to_proto)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TransportError::Encode(e.to_string()))?;
    Ok(raft_rpc::Kind::AppendEntries(proto::AppendEntries {
        vote_json: to_json(&rpc.vote)?,
        prev_log_id_json: to_json(&rpc.prev_log_id)?,
        leader_commit_json: to_json(&rpc.leader_commit)?,
        entries,
    }))
}

/// A request stream that is reset if dropped before the request is complete (quinn would
/// finish it, making a partial frame look complete).
struct Outgoing {
    stream: quinn::SendStream,
    complete: bool,
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if !self.complete {
            let _ = self.stream.reset(quinn::VarInt::from_u32(CANCELLED));
        }
    }
}

/// Dials `member` through the node's one identity-checking dial: the peer must present a
/// core certificate for exactly that member's name.
async fn dial(
    endpoint: quinn::Endpoint,
    member: Member,
) -> Result<quinn::Connection, TransportError> {
    let expect = transport::Expect::Member {
        name: &member.name,
        role: Role::Core,
    };
    transport::dial(&endpoint, None, &member.addr, DIAL_TIMEOUT, expect)
        .await
        .map_err(TransportError::Dialed)
}

fn classify(e: StreamError) -> Failure {
    if e.is_connection_lost() {
        Failure::Unreachable(TransportError::Wire(e))
    } else {
        Failure::Network(TransportError::Wire(e))
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<String, TransportError> {
    serde_json::to_string(v).map_err(|e| TransportError::Encode(e.to_string()))
}

fn from_json<T: DeserializeOwned>(what: &str, json: &str) -> Result<T, String> {
    serde_json::from_str(json).map_err(|e| format!("decoding {what}: {e}"))
}

fn reply<T: Serialize, E: Serialize>(result: Result<T, E>) -> proto::RaftReply {
    let kind = match result {
        Ok(resp) => serde_json::to_string(&resp).map(raft_reply::Kind::OkJson),
        Err(err) => serde_json::to_string(&err).map(raft_reply::Kind::RaftErrorJson),
    }
    .unwrap_or_else(|e| raft_reply::Kind::Error(format!("encoding raft reply: {e}")));
    proto::RaftReply { kind: Some(kind) }
}

fn error_reply(e: String) -> proto::RaftReply {
    proto::RaftReply {
        kind: Some(raft_reply::Kind::Error(e)),
    }
}
