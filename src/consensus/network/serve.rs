//! The receiving end of the Raft transport: a member's answers to the RPCs its peers send.

use super::*;

impl Core {
    /// Serve one Raft RPC from a peer: decode it, hand it to openraft, and encode the answer.
    /// Malformed input is answered with `RaftReply{error}`.
    /// `from` is the node id of the name in the sender's certificate: an RPC that speaks for
    /// another node (as leader, candidate or heartbeat sender) is refused.
    pub async fn handle_rpc(&self, rpc: proto::RaftRpc, from: NodeId) -> proto::RaftReply {
        let impostor = |claimed: NodeId| {
            error_reply(format!(
                "the rpc speaks for node {claimed}, but the sender's certificate is node {from}"
            ))
        };
        let speaks_for = |vote: &openraft::Vote<NodeId>| vote.leader_id().voted_for();
        match rpc.kind {
            Some(raft_rpc::Kind::AppendEntries(ae)) => match decode_append_entries(ae) {
                Ok(req) if speaks_for(&req.vote).is_some_and(|id| id != from) => {
                    impostor(speaks_for(&req.vote).unwrap_or_default())
                }
                Ok(req) => {
                    self.heard(&req.vote);
                    reply(self.raft.append_entries(req).await)
                }
                Err(e) => error_reply(e),
            },
            Some(raft_rpc::Kind::VoteJson(json)) => {
                match from_json::<VoteRequest<NodeId>>("vote request", &json) {
                    Ok(req) if speaks_for(&req.vote).is_some_and(|id| id != from) => {
                        impostor(speaks_for(&req.vote).unwrap_or_default())
                    }
                    Ok(req) => reply(self.raft.vote(req).await),
                    Err(e) => error_reply(e),
                }
            }
            Some(raft_rpc::Kind::InstallSnapshot(is)) => {
                let req = match self.decode_install_snapshot(is) {
                    Ok(req) => req,
                    Err(e) => return error_reply(e),
                };
                if let Some(id) = speaks_for(&req.vote).filter(|id| *id != from) {
                    return impostor(id);
                }
                self.heard(&req.vote);
                let id = req.meta.snapshot_id.clone();
                let end = req.offset + req.data.len() as u64;
                let done = req.done;
                let result = self.raft.install_snapshot(req).await;
                if result.is_ok() {
                    let mut rx = self.snapshot_rx.lock().unwrap_or_else(|e| e.into_inner());
                    *rx = match rx.take() {
                        _ if done => None,
                        Some((current, next)) if current == id => Some((id, next.max(end))),
                        _ => Some((id, end)),
                    };
                }
                reply(result)
            }
            Some(raft_rpc::Kind::PreVoteJson(json)) => {
                match from_json::<PreVoteRequest>("pre-vote request", &json) {
                    Ok(req) if req.candidate != from => impostor(req.candidate),
                    Ok(req) => {
                        let last = *self.last_log_id.lock().unwrap_or_else(|e| e.into_inner());
                        let resp = election::answer_pre_vote(
                            &self.raft,
                            &self.liveness,
                            &self.timing,
                            last,
                            &req,
                        );
                        reply(Ok::<_, ()>(resp))
                    }
                    Err(e) => error_reply(e),
                }
            }
            Some(raft_rpc::Kind::HeartbeatJson(json)) => {
                match from_json::<Heartbeat>("heartbeat", &json) {
                    Ok(beat) if speaks_for(&beat.vote).is_some_and(|id| id != from) => {
                        impostor(speaks_for(&beat.vote).unwrap_or_default())
                    }
                    Ok(beat) => {
                        let vote = self.heard(&beat.vote);
                        reply(Ok::<_, ()>(HeartbeatResponse { vote }))
                    }
                    Err(e) => error_reply(e),
                }
            }
            None => error_reply("raft rpc without kind".into()),
        }
    }

    /// Count a message carrying `vote` as leader contact if it is a leader's vote at least as
    /// high as this member's; returns this member's vote.
    fn heard(&self, vote: &openraft::Vote<NodeId>) -> openraft::Vote<NodeId> {
        let mine = self.raft.metrics().borrow().vote;
        self.liveness.heard(vote, &mine);
        mine
    }

    /// Decode an InstallSnapshot segment, refusing one that ends beyond the largest snapshot
    /// this node accepts or starts past the bytes received so far of that snapshot; checked
    /// before the segment is copied or handed to openraft.
    fn decode_install_snapshot(
        &self,
        is: proto::InstallSnapshot,
    ) -> Result<InstallSnapshotRequest<TypeConfig>, String> {
        let vote = from_json("vote", &is.vote_json)?;
        let meta: crate::consensus::SnapshotMeta = from_json("snapshot meta", &is.meta_json)?;
        let fits = is
            .offset
            .checked_add(is.data.len() as u64)
            .is_some_and(|end| end <= self.max_snapshot_bytes);
        if !fits {
            return Err(format!(
                "snapshot segment at offset {} of {} bytes ends beyond the largest snapshot this \
                 node accepts ({} bytes)",
                is.offset,
                is.data.len(),
                self.max_snapshot_bytes
            ));
        }
        let received = match &*self.snapshot_rx.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((id, next)) if *id == meta.snapshot_id => *next,
            _ => 0,
        };
        if is.offset > received {
            return Err(format!(
                "snapshot segment at offset {} leaves a gap: {received} bytes of snapshot {} \
                 were received",
                is.offset, meta.snapshot_id
            ));
        }
        Ok(InstallSnapshotRequest {
            vote,
            meta,
            offset: is.offset,
            data: is.data.to_vec(),
            done: is.done,
        })
    }
}

pub(super) fn decode_append_entries(
    ae: proto::AppendEntries,
) -> Result<AppendEntriesRequest<TypeConfig>, String> {
    Ok(AppendEntriesRequest {
        vote: from_json("vote", &ae.vote_json)?,
        prev_log_id: from_json("prev_log_id", &ae.prev_log_id_json)?,
        leader_commit: from_json("leader_commit", &ae.leader_commit_json)?,
        entries: ae
            .entries
            .into_iter()
            .map(entry_from_proto)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("decoding entries: {e}"))?,
    })
}
