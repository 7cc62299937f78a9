//! What a parent may declare: the bounds on its `SubscribeOk` and on every frame of its
//! stream, checked before anything is sized by them.

use super::*;

/// Most core addresses a parent may name.
pub(super) const MAX_CORE_ADDRS: u64 = 64;
/// Most signer certificates one frame may carry (a verifier keeps 16, a core adds its own).
pub(super) const MAX_SIGNER_CERTS: u64 = 32;
/// Largest frame of a kind that carries little (a checkpoint, a heartbeat, a seal, a
/// refusal, the end of a transfer).
pub(super) const SMALL_FRAME: usize = 64 * 1024;
/// Largest `SubscribeOk` or `Signers` frame (signer certificates are a few KiB each).
pub(super) const CERTS_FRAME: usize = 1 << 20;

/// What a parent may send, bounded by the kind of each frame before it is read, and the
/// counts of its repeated fields before it is decoded.
#[derive(Clone, Copy)]
pub(super) struct DownBounds {
    max_frame: usize,
    chunk_size: usize,
    max_chunks: u64,
}

impl DownBounds {
    pub(super) fn of(cfg: &crate::config::StreamConfig) -> Self {
        Self {
            max_frame: cfg.max_frame,
            chunk_size: cfg.chunk_size as usize,
            max_chunks: cfg.max_chunks(),
        }
    }

    /// The largest frame of the `Downstream` kind `field`.
    fn cap(&self, field: u32) -> usize {
        match field {
            1 | 10 => CERTS_FRAME,
            2 => 65536usize.saturating_add(35usize.saturating_mul(self.max_chunks as usize)),
            3 => self.chunk_size + 64,
            5 => self.max_frame,
            _ => SMALL_FRAME,
        }
        .min(self.max_frame)
    }

    fn counts(&self) -> [CountBound; 11] {
        let path = u64::from(MAX_TREE_DEPTH) + 1;
        let sources = MAX_SUGGESTED_SOURCES as u64;
        let b = |path: &'static [u32], field, max, what| CountBound {
            path,
            field,
            max,
            what,
            packed: false,
        };
        [
            b(&[1], 4, MAX_CORE_ADDRS, "core addresses"),
            b(&[1], 5, path, "root path names"),
            b(&[1], 7, sources, "fetch sources"),
            b(&[1], 8, MAX_SIGNER_CERTS, "signer certificates"),
            b(&[2], 6, self.max_chunks, "manifest hashes"),
            b(&[5, 4], 1, propose::MAX_OPS as u64, "ops in an entry"),
            b(&[7], 3, path, "root path names"),
            b(&[7], 4, sources, "fetch sources"),
            b(&[8, 2], 5, path, "root path names"),
            b(
                &[8, 2],
                10,
                MAX_HELD_ZONES as u64,
                "held zones of a referral",
            ),
            b(&[10], 1, MAX_SIGNER_CERTS, "signer certificates"),
        ]
    }

    /// Reads one frame within these bounds and decodes it.
    pub(super) async fn read(
        &self,
        recv: &mut quinn::RecvStream,
    ) -> Result<Option<(RawFrame, proto::Downstream)>, StreamError> {
        let Some(raw) = transport::read_raw_by_kind(recv, self.max_frame, |f| self.cap(f)).await?
        else {
            return Ok(None);
        };
        crate::wire::check_counts(&raw.body(), &self.counts())?;
        let msg = raw.decode::<proto::Downstream>()?;
        Ok(Some((raw, msg)))
    }
}

/// The addresses a parent names that look like addresses (at most
/// [`overlay_driver::MAX_ADDR_LEN`] bytes): they are passed on to this node's children.
pub(super) fn sane_addrs(addrs: Vec<String>) -> Vec<String> {
    addrs
        .into_iter()
        .filter(|a| overlay_driver::addr_sane(a))
        .collect()
}

/// Checks what a parent declares in its `SubscribeOk` before anything uses it: a depth
/// below [`MAX_TREE_DEPTH`] and a root path as long as that depth says.
pub(super) fn check_subscribe_ok(ok: &proto::SubscribeOk) -> Result<(), String> {
    if ok.parent_depth >= MAX_TREE_DEPTH {
        return Err(format!(
            "the parent declares depth {}, not below the limit of {MAX_TREE_DEPTH}",
            ok.parent_depth
        ));
    }
    if ok.root_path.len() > MAX_TREE_DEPTH as usize + 1 {
        return Err(format!(
            "the parent declares a root path of {} names",
            ok.root_path.len()
        ));
    }
    Ok(())
}
