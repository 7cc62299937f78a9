//! Raft RPC transport between core members: in this single-member stage every peer is unreachable.
//!
//! Invariants:
//! - A cluster formed by [`super::Core::initialize_single`] has no peers, so openraft never needs
//!   to send an RPC and none of these calls is made while the membership has one member.
//! - Every RPC to a peer fails with [`openraft::error::Unreachable`], which openraft treats as a
//!   transient condition (it backs off and retries); nothing is ever reported as delivered.
//! - [`Network`] is the one place that turns a member (`Member::addr`) into a client, so a QUIC
//!   client replaces [`PeerClient`] without touching storage or [`super::Core`].

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{RaftNetwork, RaftNetworkFactory};

use super::{Member, NodeId, TypeConfig};

/// Errors of the Raft transport.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// This build has no transport between core members.
    #[error("no raft transport to member {target} at {addr}: the core runs as a single member")]
    NoTransport { target: NodeId, addr: String },
}

/// Creates a client per peer for openraft.
#[derive(Clone, Debug)]
pub struct Network {
    me: NodeId,
}

impl Network {
    /// The transport of node `me`.
    pub fn new(me: NodeId) -> Network {
        Network { me }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        tracing::debug!(me = self.me, target, addr = %node.addr, "raft peer client");
        PeerClient {
            target,
            member: node.clone(),
        }
    }
}

/// Sends Raft RPCs to one peer.
#[derive(Clone, Debug)]
pub struct PeerClient {
    target: NodeId,
    member: Member,
}

impl PeerClient {
    fn unreachable<E: std::error::Error>(&self) -> RPCError<NodeId, Member, E> {
        RPCError::Unreachable(Unreachable::new(&NetworkError::NoTransport {
            target: self.target,
            addr: self.member.addr.clone(),
        }))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        Err(self.unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(self.unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        Err(self.unreachable())
    }
}
