//! Test-only fault injection, switched on by environment variables no deployment sets; the
//! integration tests use them to show that faults and attacks are detected.
//!
//! - `CANOPY_FAILPOINT_CORRUPT_CHUNK` = a chunk index, or `all`: serve that chunk corrupted
//!   (pushed or fetched), to the node named `CANOPY_FAILPOINT_CORRUPT_FOR` only when set.
//! - `CANOPY_FAILPOINT_ROGUE=1`: behave as a hostile relay: advertise depth 0 to attract
//!   children, serve them tampered entries and transfers (roots recomputed, signed with its
//!   own key), name itself the core, and acknowledge proposals without committing them.
//! - `CANOPY_FAILPOINT_ECLIPSE=1`: answer samples with no peers, so that a node joining
//!   through this one learns of no other (an eclipse attack, when combined with `ROGUE`).
//! - `CANOPY_FAILPOINT_LOSE_SAMPLED=1`: close each sample connection an unattached node
//!   keeps for its attach as soon as it is kept (as if the peer had gone away), so that the
//!   attach has to dial anew.
//! - `CANOPY_FAILPOINT_DECLARE_NAME=NAME`: subscribe under NAME, not the certificate's name.
//! - `CANOPY_FAILPOINT_WRITE_ANYWAY=1`: a reader forwards writes to the core instead of
//!   refusing them itself.
//!
//! - `CANOPY_FAILPOINT_MATERIALIZE_CRASH=N`: abort the process in the middle of writing
//!   `--file`, right after the write that takes the bytes this process has written for it
//!   past N (a crash at a chosen point of a materialization).
//!
//! Invariant: with none of these set, nothing here changes what a node does.

use bytes::Bytes;
use prost::Message;
use tracing::warn;

use crate::file::{ChunkedFile, Op, Update};
use crate::proto::{self, downstream::Kind as Down};
use crate::replica::Sealed;
use crate::tls::Identity;
use crate::trust::{entry_digest, Anchor, Sealer};
use crate::wire;

/// What a rogue relay writes into the data it tampers with: no honest node may ever show it.
pub const TAMPER: &[u8] = b"ROGUE-TAMPERED!!";

fn set(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// Counts `n` more bytes written for `--file`, and aborts the process once they pass
/// `CANOPY_FAILPOINT_MATERIALIZE_CRASH`.
pub(crate) fn materialize_wrote(n: usize) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static WRITTEN: AtomicU64 = AtomicU64::new(0);
    let Some(limit) = *LIMIT.get_or_init(|| {
        std::env::var("CANOPY_FAILPOINT_MATERIALIZE_CRASH")
            .ok()
            .and_then(|v| v.parse().ok())
    }) else {
        return;
    };
    if WRITTEN.fetch_add(n as u64, Ordering::Relaxed) + n as u64 > limit {
        warn!(limit, "failpoint: crashing in the middle of writing --file");
        std::process::abort();
    }
}

/// The chunk to corrupt in what this node serves `child` (`u64::MAX`: every chunk).
pub(crate) fn corrupt_chunk_for(child: &str) -> Option<u64> {
    let index = match std::env::var("CANOPY_FAILPOINT_CORRUPT_CHUNK")
        .ok()?
        .as_str()
    {
        "all" => u64::MAX,
        i => i.parse().ok()?,
    };
    match std::env::var("CANOPY_FAILPOINT_CORRUPT_FOR") {
        Ok(only) if only != child => None,
        _ => Some(index),
    }
}

/// Flips the first byte of `data` when `index` is the chunk to corrupt.
pub(crate) fn corrupt_chunk(data: &mut Bytes, index: u64, target: u64) {
    if (target == index || target == u64::MAX) && !data.is_empty() {
        let mut d = data.to_vec();
        d[0] ^= 0xff;
        *data = Bytes::from(d);
        warn!(index, "failpoint: serving a corrupted chunk");
    }
}

/// The name to subscribe under instead of the certificate's.
pub(crate) fn declared_name() -> Option<String> {
    std::env::var("CANOPY_FAILPOINT_DECLARE_NAME").ok()
}

/// Whether a reader forwards writes instead of refusing them.
pub(crate) fn write_anyway() -> bool {
    set("CANOPY_FAILPOINT_WRITE_ANYWAY")
}

/// Whether this node hides every other peer from the nodes that sample it.
pub(crate) fn eclipses() -> bool {
    set("CANOPY_FAILPOINT_ECLIPSE")
}

/// Whether this node loses the sample connections it keeps for its attach at once.
pub(crate) fn loses_sampled() -> bool {
    set("CANOPY_FAILPOINT_LOSE_SAMPLED")
}

/// Whether this node plays a rogue relay.
pub(crate) fn is_rogue() -> bool {
    set("CANOPY_FAILPOINT_ROGUE")
}

/// A hostile relay's behaviour.
pub(crate) struct Rogue {
    sealer: Sealer,
}

/// What a rogue tracks per child: the digest of the last entry it tampered with.
#[derive(Default)]
pub(crate) struct Tampering {
    last_entry: Option<[u8; 32]>,
}

impl Rogue {
    pub(crate) fn from_env(id: &Identity) -> Option<Self> {
        if !is_rogue() {
            return None;
        }
        Sealer::new(id).ok().map(|sealer| Self { sealer })
    }

    /// Names itself the core and offers its own certificate as a signer.
    pub(crate) fn subscribe_ok(&self, ok: &mut proto::SubscribeOk, me: &str) {
        ok.core_addrs = vec![me.to_string()];
        ok.signers.push(self.sealer.cert().clone());
    }

    /// A transfer of `file` with [`TAMPER`] written over its start, the root recomputed and
    /// the state signed with this relay's own key.
    pub(crate) fn snapshot(&self, file: &ChunkedFile) -> (ChunkedFile, Option<Sealed>) {
        let mut tampered = file.clone();
        let len = (TAMPER.len() as u64).min(file.len()) as usize;
        let update = Update {
            ops: vec![Op::Write {
                offset: 0,
                data: Bytes::copy_from_slice(&TAMPER[..len]),
            }],
        };
        let _ = tampered.apply(file.version(), &update);
        let anchor = Anchor {
            version: tampered.version(),
            length: tampered.len(),
            chunk_size: tampered.chunk_size(),
            root: tampered.root(),
            commit_time_us: 0,
            entry: None,
            prev: None,
        };
        let sealed = self.sealer.seal(&anchor).ok().map(|s| (s, None));
        (tampered, sealed)
    }

    /// An entry with [`TAMPER`] over its writes' data, and a seal re-signed with this relay's
    /// own key over the tampered entry; other frames unchanged.
    pub(crate) fn tamper(&self, t: &mut Tampering, frame: &Bytes) -> Bytes {
        let Ok(mut msg) = proto::Downstream::decode(frame.slice(wire::PREFIX_LEN..)) else {
            return frame.clone();
        };
        match &mut msg.kind {
            Some(Down::Entry(e)) => {
                for op in e.update.iter_mut().flat_map(|u| u.ops.iter_mut()) {
                    if let Some(proto::op::Kind::Write(w)) = &mut op.kind {
                        let mut d = w.data.to_vec();
                        let n = d.len().min(TAMPER.len());
                        d[..n].copy_from_slice(&TAMPER[..n]);
                        w.data = Bytes::from(d);
                    }
                }
                let out = wire::encode(&msg);
                t.last_entry = Some(entry_digest(&out));
                out
            }
            Some(Down::Seal(s)) => {
                let Ok(mut anchor) = Anchor::of_seal(s, t.last_entry) else {
                    return frame.clone();
                };
                anchor.root = [0x42; 32];
                match self.sealer.seal(&anchor) {
                    Ok(forged) => wire::encode(&proto::Downstream {
                        kind: Some(Down::Seal(forged)),
                    }),
                    Err(_) => frame.clone(),
                }
            }
            _ => frame.clone(),
        }
    }
}
