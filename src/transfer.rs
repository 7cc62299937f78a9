//! A full or diff transfer of the file: the frames a parent sends, and the receiving side's
//! state (manifest, verified chunks, and chunks salvaged from interrupted transfers), pure.
//!
//! Invariants:
//! - A transfer is accepted only if its manifest recomputes the advertised root, and every
//!   chunk is taken only if its BLAKE3 is the manifest's at its index; the finished file is
//!   installed only if its root verifies.
//! - A chunk verified against a manifest is kept by hash ([`Salvage`]) until a transfer
//!   installs, so a transfer interrupted and restarted (from any source) never fetches it
//!   twice.
//! - A chunk's bytes are shared with the file on both sides, never copied into a frame.
//! - What a `SnapshotBegin` declares is checked before anything is sized by it: the chunk
//!   size must be this node's, the length within `max_len`, and the manifest exactly one
//!   hash per chunk.

use std::collections::HashMap;

use bytes::Bytes;

use crate::file::{
    chunk_count_for, chunk_len_for, leaf_hash, root_of, ChunkedFile, FileBuilder, FileError, Hash,
};
use crate::proto::{self, downstream::Kind as Down};
use crate::wire;

/// Why a transfer's data was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransferError {
    /// A chunk does not hash to its manifest entry (the sender is faulty).
    #[error("chunk {index} does not match the manifest")]
    BadChunk { index: u64 },
    /// The manifest does not recompute the advertised root.
    #[error("manifest does not match root {root}")]
    BadManifest { root: String },
    /// The transfer's shape is invalid, or the built file does not verify.
    #[error("file: {0}")]
    File(#[from] FileError),
}

/// Chunks of interrupted transfers that were verified against their manifest, kept by hash
/// so that the next transfer (from any source) skips them.
#[derive(Default)]
pub(crate) struct Salvage {
    manifest: Vec<Hash>,
    chunks: HashMap<Hash, Bytes>,
}

impl Salvage {
    /// This node's chunk hash at each index: `file`'s, or, past an interrupted transfer, the
    /// manifest's where the chunk was received and verified (what a subscription lists).
    pub(crate) fn have_chunks(&self, file: &ChunkedFile) -> Vec<Bytes> {
        let n = (file.chunk_count() as usize).max(self.manifest.len());
        (0..n)
            .map(|i| {
                let salvaged = self
                    .manifest
                    .get(i)
                    .filter(|h| self.chunks.contains_key(*h));
                match salvaged.copied().or_else(|| file.chunk_hash(i as u64)) {
                    Some(h) => Bytes::copy_from_slice(&h),
                    None => Bytes::new(),
                }
            })
            .collect()
    }

    /// A verified chunk with this hash, if one was kept.
    pub(crate) fn find(&self, hash: &Hash) -> Option<Bytes> {
        self.chunks.get(hash).cloned()
    }

    /// Bytes of the chunks kept.
    pub(crate) fn bytes(&self) -> u64 {
        self.chunks.values().map(|c| c.len() as u64).sum()
    }
}

fn to_hash(b: &[u8]) -> Result<Hash, FileError> {
    b.try_into()
        .map_err(|_| FileError::BadHash { len: b.len() })
}

/// A core's seal over a transfer's state and the entry digest it signed, as the parent sent
/// them (checked by the replica before the transfer starts).
pub(crate) type Anchored = Option<(proto::Seal, Option<Hash>)>;

/// A transfer being received.
pub(crate) struct Receiving {
    builder: FileBuilder,
    version: u64,
    length: u64,
    chunk_size: u32,
    root: Hash,
    commit_time_us: u64,
    manifest: Vec<Hash>,
    anchor: Anchored,
    /// The parent's `SnapshotEnd` came (chunks fetched elsewhere may still be missing).
    ended: bool,
}

impl Receiving {
    /// Starts from a `SnapshotBegin`: checks the manifest against the root, and takes every
    /// chunk already held at its index in `file` or kept in `salvage`.
    pub(crate) fn begin(
        b: proto::SnapshotBegin,
        max_len: u64,
        file: &ChunkedFile,
        salvage: &mut Salvage,
    ) -> Result<Self, TransferError> {
        let root = to_hash(&b.root)?;
        if b.chunk_size != file.chunk_size() {
            return Err(FileError::BadChunkSize(b.chunk_size).into());
        }
        if b.length > max_len {
            return Err(FileError::TooLarge {
                len: b.length,
                max: max_len,
            }
            .into());
        }
        let count = chunk_count_for(b.length, b.chunk_size);
        if !b.chunk_hashes.is_empty() && b.chunk_hashes.len() as u64 != count {
            return Err(TransferError::BadManifest {
                root: hex::encode(root),
            });
        }
        let mut builder = FileBuilder::new(b.chunk_size, max_len, b.length, b.version, root)?;
        let manifest = b
            .chunk_hashes
            .iter()
            .map(|h| to_hash(h))
            .collect::<Result<Vec<_>, _>>()?;
        if !manifest.is_empty() {
            if root_of(b.chunk_size, b.length, &manifest) != root {
                return Err(TransferError::BadManifest {
                    root: hex::encode(root),
                });
            }
            for (i, h) in manifest.iter().enumerate() {
                let i = i as u64;
                let expected = chunk_len_for(b.length, b.chunk_size, i);
                if let Some(data) = salvage.chunks.get(h) {
                    if data.len() as u64 == expected {
                        builder.put_hashed_chunk(i, data.clone(), *h)?;
                        continue;
                    }
                }
                if file.chunk_size() == b.chunk_size && file.chunk_hash(i) == Some(*h) {
                    if let Some(data) = file.chunk(i) {
                        if data.len() as u64 == expected {
                            builder.put_hashed_chunk(i, data, *h)?;
                        }
                    }
                }
            }
        }
        salvage.manifest = manifest.clone();
        let entry = <Hash>::try_from(b.anchor_entry.as_ref()).ok();
        Ok(Self {
            builder,
            version: b.version,
            length: b.length,
            chunk_size: b.chunk_size,
            root,
            commit_time_us: b.commit_time_unix_us,
            manifest,
            anchor: b.anchor.map(|s| (s, entry)),
            ended: false,
        })
    }

    /// A chunk pushed by the parent; `hash` is its BLAKE3 if the driver computed it already.
    pub(crate) fn take_pushed(
        &mut self,
        c: proto::SnapshotChunk,
        hash: Option<Hash>,
        salvage: &mut Salvage,
    ) -> Result<(), TransferError> {
        match self.manifest.get(c.index as usize) {
            // Fetched from another source already (the push was past the limit).
            Some(_) if self.builder.has_chunk(c.index) => {}
            Some(h) => {
                let got = hash.unwrap_or_else(|| leaf_hash(&c.data));
                if got != *h {
                    return Err(TransferError::BadChunk { index: c.index });
                }
                salvage.chunks.insert(*h, c.data.clone());
                self.builder.put_hashed_chunk(c.index, c.data, *h)?;
            }
            None => self.builder.put_chunk(c.index, c.data)?,
        }
        Ok(())
    }

    /// A chunk of the transfer at `version` fetched from another source, whose BLAKE3 the
    /// caller computed as `hash`. True when it was new; false when this transfer is not at
    /// `version` or already holds it.
    pub(crate) fn take_fetched(
        &mut self,
        version: u64,
        index: u64,
        data: Bytes,
        hash: Hash,
        salvage: &mut Salvage,
    ) -> Result<bool, TransferError> {
        if self.version != version || self.builder.has_chunk(index) {
            return Ok(false);
        }
        if self.manifest.get(index as usize) != Some(&hash) {
            return Err(TransferError::BadChunk { index });
        }
        salvage.chunks.insert(hash, data.clone());
        self.builder.put_hashed_chunk(index, data, hash)?;
        Ok(true)
    }

    /// The parent's `SnapshotEnd` came.
    pub(crate) fn end(&mut self) {
        self.ended = true;
    }

    pub(crate) fn is_ended(&self) -> bool {
        self.ended
    }

    /// Ended, but chunks fetched elsewhere are still missing.
    pub(crate) fn waiting(&self) -> bool {
        self.ended && self.builder.missing() > 0
    }

    /// (bytes held so far, including chunks reused from the local copy, the file's length).
    pub(crate) fn progress(&self) -> (u64, u64) {
        (self.builder.bytes_present(), self.builder.len())
    }

    /// Its version, the chunks still missing (ascending) and the manifest; `None` for a
    /// transfer without a manifest, which can only come from the parent.
    pub(crate) fn wanted(&self) -> Option<(u64, Vec<u64>, Vec<Hash>)> {
        (!self.manifest.is_empty()).then(|| {
            (
                self.version,
                self.builder.missing_indices(),
                self.manifest.clone(),
            )
        })
    }

    /// What a child of this node needs to receive the same transfer while it arrives here:
    /// `None` without a manifest (only a parent's own push can carry such a transfer).
    pub(crate) fn follow(&self) -> Option<FollowPlan> {
        (!self.manifest.is_empty()).then(|| FollowPlan {
            version: self.version,
            length: self.length,
            chunk_size: self.chunk_size,
            root: self.root,
            manifest: self.manifest.clone(),
            anchor: self.anchor.clone(),
            commit_time_us: self.commit_time_us,
        })
    }

    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// The verified file, the core's commit time of its version, and the core's seal of it.
    pub(crate) fn finish(self) -> Result<(ChunkedFile, u64, Anchored), TransferError> {
        Ok((self.builder.finish()?, self.commit_time_us, self.anchor))
    }
}

/// A transfer this node is still receiving, as it passes it on to a child chunk by chunk
/// (cut-through): every chunk it sends was verified here against `manifest`, whose root the
/// core's seal in `anchor` covers.
#[derive(Clone, Debug)]
pub struct FollowPlan {
    pub version: u64,
    pub length: u64,
    pub chunk_size: u32,
    pub root: Hash,
    pub manifest: Vec<Hash>,
    pub anchor: Anchored,
    pub commit_time_us: u64,
}

impl FollowPlan {
    /// The transfer's `SnapshotBegin` frame, as the node's own parent sent it.
    pub fn begin_frame(&self) -> Bytes {
        wire::encode(&proto::Downstream {
            kind: Some(Down::SnapshotBegin(proto::SnapshotBegin {
                version: self.version,
                length: self.length,
                root: Bytes::copy_from_slice(&self.root),
                chunk_size: self.chunk_size,
                commit_time_unix_us: self.commit_time_us,
                chunk_hashes: self
                    .manifest
                    .iter()
                    .map(|h| Bytes::copy_from_slice(h))
                    .collect(),
                anchor: self.anchor.as_ref().map(|(s, _)| s.clone()),
                anchor_entry: self
                    .anchor
                    .as_ref()
                    .and_then(|(_, e)| e.map(|e| Bytes::copy_from_slice(&e)))
                    .unwrap_or_default(),
            })),
        })
    }

    /// The chunks a child holding `have` (its chunk hash at each index) lacks, ascending.
    pub fn lacking<'a>(&'a self, have: &'a [Bytes]) -> impl Iterator<Item = u64> + 'a {
        self.manifest
            .iter()
            .enumerate()
            .filter(move |(i, h)| have.get(*i).map(|x| x.as_ref()) != Some(&h[..]))
            .map(|(i, _)| i as u64)
    }
}

/// The frame that ends a transfer.
pub fn snapshot_end_frame() -> Bytes {
    wire::encode(&proto::Downstream {
        kind: Some(Down::SnapshotEnd(proto::SnapshotEnd {})),
    })
}

/// The frames of a full transfer of `file`: `SnapshotBegin` (with the manifest), one
/// `SnapshotChunk` per chunk the child lacks (`have` holds the child's chunk hashes; a chunk
/// whose hash it already holds at the same index is skipped), `SnapshotEnd`. Produced lazily
/// so a 50 MB snapshot is never encoded all at once.
pub fn snapshot_frames<'a>(
    file: &'a ChunkedFile,
    commit_time_us: u64,
    have: &'a [Bytes],
) -> impl Iterator<Item = Bytes> + 'a {
    snapshot_frames_below(file, commit_time_us, have, None, || u64::MAX).map(|(_, f)| f.concat())
}

/// [`snapshot_frames`] in parts, each with its chunk index (`None` for the begin and the
/// end), for a child that fetches part of the transfer elsewhere: a chunk is sent only if
/// its index is below `limit()`, asked just before the chunk is framed (the child lowers it
/// with `ChildUpdate.below` while the transfer runs). A chunk's bytes are shared with the file,
/// not copied into its frame. `anchor` is the core's seal over this state (and the entry
/// digest it signed), which the child requires.
pub fn snapshot_frames_below<'a>(
    file: &'a ChunkedFile,
    commit_time_us: u64,
    have: &'a [Bytes],
    anchor: Option<&(proto::Seal, Option<Hash>)>,
    limit: impl Fn() -> u64 + 'a,
) -> impl Iterator<Item = (Option<u64>, wire::Parts)> + 'a {
    let hashes = file.chunk_hashes();
    let begin = wire::encode(&proto::Downstream {
        kind: Some(Down::SnapshotBegin(proto::SnapshotBegin {
            version: file.version(),
            length: file.len(),
            root: Bytes::copy_from_slice(&file.root()),
            chunk_size: file.chunk_size(),
            commit_time_unix_us: commit_time_us,
            chunk_hashes: hashes.iter().map(|h| Bytes::copy_from_slice(h)).collect(),
            anchor: anchor.map(|(s, _)| s.clone()),
            anchor_entry: anchor
                .and_then(|(_, e)| e.map(|e| Bytes::copy_from_slice(&e)))
                .unwrap_or_default(),
        })),
    });
    let chunks = (0..file.chunk_count())
        .filter(move |i| {
            have.get(*i as usize).map(|h| h.as_ref()) != Some(&hashes[*i as usize][..])
                && *i < limit()
        })
        .map(move |i| {
            (
                Some(i),
                wire::encode_chunk(i, file.chunk(i).unwrap_or_default()),
            )
        });
    let end = wire::encode(&proto::Downstream {
        kind: Some(Down::SnapshotEnd(proto::SnapshotEnd {})),
    });
    std::iter::once((None, begin.into()))
        .chain(chunks)
        .chain(std::iter::once((None, end.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(chunk_size: u32, length: u64, hashes: usize) -> proto::SnapshotBegin {
        proto::SnapshotBegin {
            version: 1,
            length,
            root: Bytes::from(vec![0u8; 32]),
            chunk_size,
            chunk_hashes: vec![Bytes::from(vec![0u8; 32]); hashes],
            ..Default::default()
        }
    }

    fn start(b: proto::SnapshotBegin, max_len: u64) -> Option<TransferError> {
        let file = ChunkedFile::new(4096, 1 << 30).unwrap();
        Receiving::begin(b, max_len, &file, &mut Salvage::default()).err()
    }

    #[test]
    fn what_a_begin_declares_is_checked_before_anything_is_sized_by_it() {
        assert_eq!(
            start(begin(1, 1 << 40, 0), u64::MAX),
            Some(TransferError::File(FileError::BadChunkSize(1)))
        );
        assert_eq!(
            start(begin(4096, 1 << 40, 0), 1 << 30),
            Some(TransferError::File(FileError::TooLarge {
                len: 1 << 40,
                max: 1 << 30
            }))
        );
        assert!(matches!(
            start(begin(4096, u64::MAX, 0), u64::MAX),
            Some(TransferError::File(FileError::TooManyChunks { .. }))
        ));
        assert!(matches!(
            start(begin(4096, 8192, 3), 1 << 30),
            Some(TransferError::BadManifest { .. })
        ));
        assert!(matches!(
            start(begin(4096, 8192, 2), 1 << 30),
            Some(TransferError::BadManifest { .. })
        ));
        assert_eq!(start(begin(4096, 8192, 0), 1 << 30), None);
    }
}
