//! The QUIC accept loop and the dispatch of each request stream to the module that serves it.
//!
//! Invariants:
//! - Every stream carries one `Request` first; its kind decides who serves the stream.
//! - Raft RPCs and membership requests are served only on core nodes, and only to peers whose
//!   certificate has the core role.
//! - Bad input from a peer closes that peer's connection with a logged reason, counted in
//!   `canopy_frame_errors_total`; the node keeps serving everyone else.

use std::sync::Arc;

use tracing::{debug, warn};

use crate::proto::{self, request};
use crate::tls::{self, Role};
use crate::transport;

use super::downstream::{close_bad, serve_child, serve_fetch};
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
    let peer = tls::peer_identity(&conn)
        .map(|(n, r)| format!("{n}/{r}"))
        .unwrap_or_else(|| conn.remote_address().to_string());
    debug!(node = %shared.cfg.name, %peer, "connection");
    loop {
        let (send, recv) = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            s = conn.accept_bi() => match s { Ok(s) => s, Err(_) => return },
        };
        let (s, c, p) = (shared.clone(), conn.clone(), peer.clone());
        shared
            .tasks
            .spawn(async move { serve_stream(s, c, p, send, recv).await });
    }
}

fn is_core_peer(conn: &quinn::Connection) -> bool {
    matches!(tls::peer_identity(conn), Some((_, Role::Core)))
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
        Some(request::Kind::Subscribe(sub)) => serve_child(shared, conn, sub, send, recv).await,
        Some(request::Kind::Fetch(first)) => {
            serve_fetch(shared, conn, peer, first, send, recv).await
        }
        Some(request::Kind::Propose(p)) => {
            let Some(proposal) = p.proposal else {
                return close_bad(&shared, &conn, &peer, "propose without proposal");
            };
            let outcome = propose::propose_hops(&shared, proposal, p.hops).await;
            reply(&mut send, &outcome_reply(outcome)).await;
        }
        Some(request::Kind::Raft(rpc)) => {
            let Some(core) = shared.core.get() else {
                return close_bad(&shared, &conn, &peer, "raft rpc to a relay");
            };
            if !is_core_peer(&conn) {
                return close_bad(&shared, &conn, &peer, "raft rpc from a non-core peer");
            }
            reply(&mut send, &core.handle_rpc(rpc).await).await;
        }
        Some(request::Kind::Sample(sample)) => {
            let offer = sample
                .offer
                .into_iter()
                .take(MAX_SAMPLE_OFFER)
                .map(peer_from_proto)
                .collect();
            let (info, peers) = overlay_driver::answer_sample(&shared, offer);
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
            if shared.core.get().is_none() || !is_core_peer(&conn) {
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
