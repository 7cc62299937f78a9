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

use std::sync::Arc;

use tracing::{debug, warn};

use crate::proto::{self, request};
use crate::tls::{self, Role};
use crate::transport;

use super::downstream::{close_bad, serve_child, serve_fetch};
use super::error::NodeError;
use super::failpoint;
use super::inspect::{self, MAX_TREE_DEPTH};
use super::overlay_driver::{self, peer_from_proto, peer_to_proto};
use super::propose::{self, outcome_reply, MAX_HOPS};
use super::shared::Shared;

/// Most peers one sample offer may carry.
const MAX_SAMPLE_OFFER: usize = 64;

/// Accepts connections until shutdown; each is served by a task of its own.
pub(crate) async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            i = shared.endpoint.accept() => match i { Some(i) => i, None => return },
        };
        let s = shared.clone();
        shared.tasks.spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(s, conn).await,
                Err(e) => {
                    s.metrics.handshake_failures.increment(1);
                    warn!(node = %s.cfg.name, %remote, "refused connection: {e}");
                }
            }
        });
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
    transport::close_at_peer_expiry(&conn);
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
    let max = shared.cfg.stream.max_frame;
    let req = match transport::read_frame::<proto::Request>(&mut recv, max).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) if e.is_reset() => return,
        Err(e) => return close_bad(&shared, &conn, &peer, &e.to_string()),
    };
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
            } else {
                propose::propose_hops(&shared, proposal, p.hops).await
            };
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
