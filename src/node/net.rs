//! Connections a node opens: dials through the one identity-checking [`transport::dial`],
//! one-shot request/reply exchanges, and the cache of connections to core nodes.
//!
//! Invariants:
//! - Every outgoing connection goes through [`transport::dial`] (the consensus network's
//!   dialer does too), so resolving, the handshake timeout and the certificate check live in
//!   one place.
//! - A reply is read within the bounds of its kind ([`Reply`]): its size, and the counts of
//!   its repeated fields before it is decoded.
//! - There is one cache of connections to core nodes, by address, shared by proposals,
//!   membership requests and forwarding between core nodes; a closed or failed connection is
//!   dropped from it and redialed on next use.
//! - A sample's connection outlives its exchange only while the node has no parent, for the
//!   attach that follows ([`keep_sampled`]): at most [`MAX_SAMPLED_KEPT`] at once, each until
//!   the attach takes it, the overlay attaches elsewhere, the identity is reloaded, or its
//!   time to live passes. A kept connection is dropped outside the lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::proto::{self, request};
use crate::transport::{self, Expect};
use crate::wire::{self, CountBound, WireError};

use super::inspect::MAX_TREE_DEPTH;
use super::overlay_driver::MAX_HELD_ZONES;

use super::error::NodeError;
use super::shared::Shared;

/// How long connecting to a peer may take before the next one is tried.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A new connection to `addr`, whoever it is in the cluster.
pub(crate) async fn connect(shared: &Shared, addr: &str) -> Result<quinn::Connection, NodeError> {
    let client = shared.client_config.lock().clone();
    Ok(transport::dial(
        &shared.endpoint,
        client,
        addr,
        CONNECT_TIMEOUT,
        Expect::Anyone,
    )
    .await?)
}

/// Most sample connections kept at once for an attach. An unattached node asks
/// `overlay.choices` peers per probe (2 by default); a sample over the bound is closed at
/// once, and its attach makes a handshake of its own.
pub(crate) const MAX_SAMPLED_KEPT: usize = 8;

/// Tells kept sample connections apart, so that a time-to-live task drops only its own.
static KEPT: AtomicU64 = AtomicU64::new(0);

/// Keeps the connection of a sample this unattached node just made, for the attach that may
/// follow it: until [`open_to_parent`] takes it, a later sample of `addr` replaces it, the
/// overlay attaches elsewhere ([`drop_sampled_except`]), the identity is reloaded, or `ttl`
/// passes.
pub(crate) fn keep_sampled(
    shared: &Arc<Shared>,
    addr: &str,
    conn: quinn::Connection,
    ttl: Duration,
) {
    let id = KEPT.fetch_add(1, Ordering::Relaxed);
    if super::failpoint::loses_sampled() {
        conn.close(
            quinn::VarInt::from_u32(0),
            b"failpoint: sample connection lost",
        );
    }
    let replaced = {
        let mut kept = shared.sampled.lock();
        if kept.len() >= MAX_SAMPLED_KEPT && !kept.contains_key(addr) {
            return;
        }
        kept.insert(addr.to_string(), (id, conn))
    };
    drop(replaced);
    let (s, addr) = (shared.clone(), addr.to_string());
    shared.tasks.spawn(async move {
        tokio::select! {
            _ = s.shutdown.cancelled() => {}
            _ = tokio::time::sleep(ttl) => {}
        }
        let stale = {
            let mut kept = s.sampled.lock();
            match kept.get(&addr) {
                Some((i, _)) if *i == id => kept.remove(&addr),
                _ => None,
            }
        };
        drop(stale);
    });
}

/// Closes the kept sample connections to every address but `addr`, the one the overlay
/// chose to attach to.
pub(crate) fn drop_sampled_except(shared: &Shared, addr: &str) {
    let others = {
        let mut kept = shared.sampled.lock();
        let chosen = kept.remove(addr);
        let others = std::mem::take(&mut *kept);
        if let Some(c) = chosen {
            kept.insert(addr.to_string(), c);
        }
        others
    };
    drop(others);
}

/// Closes every kept sample connection (the identity they were made with was replaced),
/// at once, even where an exchange still holds a handle to one.
pub(crate) fn drop_sampled(shared: &Shared) {
    let all = std::mem::take(&mut *shared.sampled.lock());
    for (_, (_, conn)) in all {
        conn.close(quinn::VarInt::from_u32(0), b"identity reloaded");
    }
}

/// A connection to `addr` and a new stream on it, to subscribe over: the connection a
/// sample just made, while it is open and the peer's certificate valid (one handshake fewer
/// on a join), else, or when that one fails to open a stream, a new connection.
pub(crate) async fn open_to_parent(
    shared: &Shared,
    addr: &str,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), NodeError> {
    let kept = shared.sampled.lock().remove(addr).map(|(_, c)| c);
    if let Some(c) = kept {
        if c.close_reason().is_none() && !transport::peer_expired(&c) {
            if let Ok((send, recv)) = c.open_bi().await {
                shared.metrics.attach_connections_sampled.increment(1);
                return Ok((c, send, recv));
            }
        }
    }
    let c = connect(shared, addr).await?;
    let (send, recv) = c.open_bi().await.map_err(|e| NodeError::Connect {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    shared.metrics.attach_connections_dialed.increment(1);
    Ok((c, send, recv))
}

/// A reply to a request this node makes, with the bounds it is read within: its largest
/// frame, and the counts of its repeated fields (checked before it is decoded).
pub(crate) trait Reply: prost::Message + Default {
    const MAX_FRAME: usize;
    const COUNTS: &'static [CountBound];
}

/// Most nodes one tree reply may list (the subtree below the asked node).
const MAX_TREE_NODES: u64 = 1 << 17;

impl Reply for proto::SampleReply {
    const MAX_FRAME: usize = 512 * 1024;
    const COUNTS: &'static [CountBound] = &[
        CountBound {
            path: &[],
            field: 2,
            max: 64,
            what: "peers in a sample reply",
            packed: false,
        },
        CountBound {
            path: &[2],
            field: 5,
            max: 64 * (MAX_TREE_DEPTH as u64 + 1),
            what: "root path names in a sample reply",
            packed: false,
        },
        CountBound {
            path: &[1],
            field: 5,
            max: MAX_TREE_DEPTH as u64 + 1,
            what: "root path names in a sample reply",
            packed: false,
        },
        CountBound {
            path: &[1],
            field: 10,
            max: MAX_HELD_ZONES as u64,
            what: "held zones in a sample reply",
            packed: false,
        },
        CountBound {
            path: &[2],
            field: 10,
            max: 64 * MAX_HELD_ZONES as u64,
            what: "held zones in a sample reply",
            packed: false,
        },
    ];
}

impl Reply for proto::TreeReply {
    const MAX_FRAME: usize = 16 << 20;
    const COUNTS: &'static [CountBound] = &[CountBound {
        path: &[],
        field: 1,
        max: MAX_TREE_NODES,
        what: "nodes in a tree reply",
        packed: false,
    }];
}

impl Reply for proto::AdminReply {
    const MAX_FRAME: usize = 64 * 1024;
    const COUNTS: &'static [CountBound] = &[];
}

/// One request and its single reply on a new bidirectional stream to `addr`.
pub(crate) async fn exchange<Rep: Reply>(
    shared: &Shared,
    addr: &str,
    kind: request::Kind,
) -> Result<Rep, NodeError> {
    let conn = connect(shared, addr).await?;
    request(shared, &conn, kind).await
}

/// One request and its single reply on a new bidirectional stream of `conn`.
pub(crate) async fn request<Rep: Reply>(
    _shared: &Shared,
    conn: &quinn::Connection,
    kind: request::Kind,
) -> Result<Rep, NodeError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| NodeError::Connect {
        addr: conn.remote_address().to_string(),
        reason: e.to_string(),
    })?;
    transport::write_frame(&mut send, &proto::Request { kind: Some(kind) }).await?;
    let _ = send.finish();
    let raw = transport::read_raw(&mut recv, Rep::MAX_FRAME)
        .await?
        .ok_or(NodeError::Wire(WireError::Truncated))?;
    wire::check_counts(&raw.body(), Rep::COUNTS)?;
    Ok(raw.decode()?)
}

/// The cached connection to the core node at `addr`, dialed on first use and replaced once
/// closed or once the core node's certificate has expired (the new handshake refuses an
/// expired one). Only a peer whose certificate has the core role is accepted: whoever named the
/// address (a parent's `SubscribeOk`, a leader hint), a write goes to the core or fails.
pub(crate) async fn core_conn(shared: &Shared, addr: &str) -> Result<quinn::Connection, NodeError> {
    let mut conns = shared.core_conns.lock().await;
    if let Some(c) = conns.get(addr) {
        if c.close_reason().is_none() {
            if !transport::peer_expired(c) {
                return Ok(c.clone());
            }
            c.close(
                quinn::VarInt::from_u32(transport::CERT_EXPIRED),
                b"certificate expired",
            );
        }
    }
    let expect = Expect::Role(crate::tls::Role::Core);
    let client = shared.client_config.lock().clone();
    let c = transport::dial(&shared.endpoint, client, addr, CONNECT_TIMEOUT, expect).await?;
    conns.insert(addr.to_string(), c.clone());
    Ok(c)
}

/// A connection to some core node, with its address: the one this node used last if it
/// still works, else the next core address that answers.
pub(crate) async fn any_core(shared: &Shared) -> Result<(String, quinn::Connection), NodeError> {
    let addrs = {
        let st = shared.state.lock();
        shared.core_addrs(&st)
    };
    if addrs.is_empty() {
        return Err(NodeError::NoCore);
    }
    let mut last = NodeError::NoCore;
    let start = shared.core_pick.load(Ordering::Relaxed);
    for i in 0..addrs.len() {
        let pick = (start + i) % addrs.len();
        match core_conn(shared, &addrs[pick]).await {
            Ok(c) => {
                shared.core_pick.store(pick, Ordering::Relaxed);
                return Ok((addrs[pick].clone(), c));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// How many core addresses this node knows.
pub(crate) fn core_addr_count(shared: &Shared) -> usize {
    let st = shared.state.lock();
    shared.core_addrs(&st).len()
}

/// Drops the cached connection to `addr` and makes [`any_core`] start with the next core
/// node: called after a failure on it.
pub(crate) async fn forget_core(shared: &Shared, addr: &str) {
    shared.core_conns.lock().await.remove(addr);
    shared.core_pick.fetch_add(1, Ordering::Relaxed);
}

/// Logs, once per address, what to fix when a peer's certificate is not from this node's
/// cluster CA (the handshake names it `UnknownIssuer` or `BadSignature`); true if `e` was
/// such a failure. Other failures are the caller's to log.
pub(crate) fn explain_certificate_failure(shared: &Shared, addr: &str, e: &NodeError) -> bool {
    let text = e.to_string();
    if !(text.contains("UnknownIssuer") || text.contains("BadSignature")) {
        return false;
    }
    if shared.cert_warned.lock().insert(addr.to_string()) {
        tracing::warn!(
            node = %shared.cfg.name,
            peer = %addr,
            "{addr} presents a certificate this node's cluster CA did not sign: every node needs the same ca.pem in its --tls directory ({text})"
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::config::{NodeKind, StreamConfig};
    use crate::consensus::RaftConfig;
    use crate::measure::start_local_node;
    use crate::tls::{self, Identity, Role};

    /// A relay that reloads its identity closes the sample connections it kept, made with
    /// the identity it replaced, though their time to live has not passed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_identity_reload_closes_the_kept_sample_connections() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, certs, data) = (
            dir.path().join("ca"),
            dir.path().join("tls"),
            dir.path().join("data"),
        );
        tls::ca_init(&ca).unwrap();
        tls::cert_issue(&ca, "core-0", Role::Core, &certs).unwrap();
        tls::cert_issue(&ca, "relay-0", Role::Relay, &certs).unwrap();
        let shutdown = CancellationToken::new();
        let core = start_local_node(
            "core-0",
            &certs,
            &data,
            NodeKind::Core {
                raft: RaftConfig::default(),
                init: true,
                peers: Vec::new(),
            },
            StreamConfig::default(),
            shutdown.child_token(),
        )
        .await
        .unwrap();
        let relay = start_local_node(
            "relay-0",
            &certs,
            &data,
            NodeKind::Relay {
                join: vec![core.quic.to_string()],
            },
            StreamConfig::default(),
            shutdown.child_token(),
        )
        .await
        .unwrap();
        let shared = &relay.node.0;
        // Once attached, the relay's join no longer drops the kept connections it did not
        // choose (`drop_sampled_except`).
        let deadline = Instant::now() + Duration::from_secs(30);
        while shared.parent().0 != "core-0" {
            assert!(Instant::now() < deadline, "the relay attached within 30 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let conn = connect(shared, &core.quic.to_string()).await.unwrap();
        // Kept under an address the relay's own overlay never samples or joins, so that no
        // join (which takes a kept connection to its parent's address as its parent link)
        // or shuffle (which replaces one) moves this one out of the map first.
        let key = "127.0.0.1:9";
        keep_sampled(shared, key, conn.clone(), Duration::from_secs(600));
        assert!(
            shared.sampled.lock().contains_key(key),
            "the connection is kept"
        );

        let id = Identity::load(&certs, "relay-0").unwrap();
        relay.node.reload_identity(id).unwrap();
        assert!(
            !shared.sampled.lock().contains_key(key),
            "it is not kept after the reload"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while conn.close_reason().is_none() {
            assert!(
                Instant::now() < deadline,
                "the kept connection is still open 10 s after the reload"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.cancel();
    }
}
