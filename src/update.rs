//! What a write is: the ops of an atomic update, its precondition, its outcome, and their
//! wire forms. Plain data; [`crate::file`] applies it.
//!
//! Invariants: a conversion from the wire either yields a complete value or a [`FileError`];
//! nothing here allocates by a size a peer declared.

use bytes::Bytes;

use crate::proto;

/// Result of applying one committed proposal to the file (deterministic on every core node).
///
/// Entries of the consensus log that carry no proposal (blank and membership entries) answer
/// `Applied` with the unchanged current version.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ApplyOutcome {
    /// The update was applied; the file is now at `version`.
    Applied { version: u64 },
    /// The precondition did not hold; nothing changed; the file stays at `version`.
    PreconditionFailed { version: u64 },
    /// The update is invalid (e.g. beyond the maximum length); nothing changed.
    Rejected { version: u64, reason: String },
}

impl ApplyOutcome {
    /// The file version after this outcome.
    pub fn version(&self) -> u64 {
        match self {
            ApplyOutcome::Applied { version }
            | ApplyOutcome::PreconditionFailed { version }
            | ApplyOutcome::Rejected { version, .. } => *version,
        }
    }
}

pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Default maximum file length (see `StreamConfig::max_len` for the trade-off).
pub const DEFAULT_MAX_LEN: u64 = 16 * 1024 * 1024 * 1024;
/// Largest accepted chunk size.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Smallest chunk size a node is configured with: below it the per-chunk index and hash
/// tree outweigh the content they describe.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Most chunks a file may have (a transfer's chunk index is sized by the declared length
/// before any chunk arrives): 2^20, 150 MiB of index at most.
pub const MAX_CHUNK_COUNT: u64 = 1 << 20;

pub type Hash = [u8; 32];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Write { offset: u64, data: Bytes },
    Truncate { len: u64 },
}

/// An atomic batch of ops: all of it applies, or none of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub ops: Vec<Op>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Precondition {
    IfVersion(u64),
    IfRangeHash { offset: u64, len: u64, hash: Hash },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    #[error("file would grow to {len} bytes, over the maximum of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("update op without a kind")]
    MissingOp,
    #[error("precondition without a kind")]
    MissingPrecondition,
    #[error("range hash is {len} bytes, expected 32")]
    BadHash { len: usize },
    #[error("bad chunk size {0}: must be a power of two no larger than 16 MiB")]
    BadChunkSize(u32),
    #[error("chunk {index} out of range: the file has {count} chunks")]
    ChunkOutOfRange { index: u64, count: u64 },
    #[error("chunk {index} is {got} bytes, expected {expected}")]
    ChunkLength { index: u64, expected: u64, got: u64 },
    #[error("root mismatch: expected {expected}, got {got}")]
    RootMismatch { expected: String, got: String },
    #[error("file incomplete: {missing} chunks missing")]
    Incomplete { missing: u64 },
    #[error("reading the content: {0}")]
    Read(String),
    #[error("the update's ops add {chunks} chunks in all, over the limit of {max} (one whole file's): split it")]
    TooMuchGrowth { chunks: u64, max: u64 },
    #[error("{len} bytes in chunks of {chunk_size} make {chunks} chunks, over the limit of {max}")]
    TooManyChunks {
        len: u64,
        chunk_size: u32,
        chunks: u64,
        max: u64,
    },
}

/// How one op sets the file's length: a write ending at `end` makes it at least `end`, a
/// truncate makes it exactly `len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LenChange {
    AtLeast(u64),
    Exactly(u64),
}

impl From<&Op> for LenChange {
    fn from(op: &Op) -> Self {
        match op {
            Op::Write { offset, data } => Self::AtLeast(offset.saturating_add(data.len() as u64)),
            Op::Truncate { len } => Self::Exactly(*len),
        }
    }
}

impl From<&proto::Op> for LenChange {
    /// As the [`Op`] it converts to; an op without a kind (refused at conversion) changes
    /// nothing.
    fn from(op: &proto::Op) -> Self {
        match &op.kind {
            Some(proto::op::Kind::Write(w)) => {
                Self::AtLeast(w.offset.saturating_add(w.data.len() as u64))
            }
            Some(proto::op::Kind::Truncate(t)) => Self::Exactly(t.len),
            None => Self::AtLeast(0),
        }
    }
}

/// The chunks that ops add to a file of `start` bytes, summed over the ops: a chunk a
/// later op removes was still added (indexed, hashed, and kept for the undo). Applying an
/// update costs about this many chunks besides the bytes it writes, so it is bounded by one
/// whole file's count: a few dozen ops that truncate to the maximum and back to 0 would
/// otherwise cost billions. Counted from `start` = 0 it is at least the count from any
/// larger start, which is how a proposal is checked before the file's length is known.
pub fn grown_chunks(start: u64, chunk_size: u32, ops: impl IntoIterator<Item = LenChange>) -> u64 {
    let count = |len: u64| len.div_ceil(u64::from(chunk_size.max(1)));
    let mut len = start;
    let mut grown = 0u64;
    for op in ops {
        let next = match op {
            LenChange::AtLeast(end) => len.max(end),
            LenChange::Exactly(l) => l,
        };
        grown = grown.saturating_add(count(next).saturating_sub(count(len)));
        len = next;
    }
    grown
}

impl TryFrom<proto::Update> for Update {
    type Error = FileError;

    fn try_from(u: proto::Update) -> Result<Self, FileError> {
        let ops = u
            .ops
            .into_iter()
            .map(|op| match op.kind {
                Some(proto::op::Kind::Write(w)) => Ok(Op::Write {
                    offset: w.offset,
                    data: w.data,
                }),
                Some(proto::op::Kind::Truncate(t)) => Ok(Op::Truncate { len: t.len }),
                None => Err(FileError::MissingOp),
            })
            .collect::<Result<_, _>>()?;
        Ok(Update { ops })
    }
}

impl From<&Update> for proto::Update {
    fn from(u: &Update) -> Self {
        let ops = u
            .ops
            .iter()
            .map(|op| proto::Op {
                kind: Some(match op {
                    Op::Write { offset, data } => proto::op::Kind::Write(proto::Write {
                        offset: *offset,
                        data: data.clone(),
                    }),
                    Op::Truncate { len } => {
                        proto::op::Kind::Truncate(proto::Truncate { len: *len })
                    }
                }),
            })
            .collect();
        proto::Update { ops }
    }
}

impl TryFrom<proto::Precondition> for Precondition {
    type Error = FileError;

    fn try_from(p: proto::Precondition) -> Result<Self, FileError> {
        match p.kind {
            Some(proto::precondition::Kind::IfVersion(v)) => Ok(Precondition::IfVersion(v)),
            Some(proto::precondition::Kind::IfRangeHash(r)) => {
                let hash: Hash = r.hash[..]
                    .try_into()
                    .map_err(|_| FileError::BadHash { len: r.hash.len() })?;
                Ok(Precondition::IfRangeHash {
                    offset: r.offset,
                    len: r.len,
                    hash,
                })
            }
            None => Err(FileError::MissingPrecondition),
        }
    }
}

impl From<&Precondition> for proto::Precondition {
    fn from(p: &Precondition) -> Self {
        let kind = match p {
            Precondition::IfVersion(v) => proto::precondition::Kind::IfVersion(*v),
            Precondition::IfRangeHash { offset, len, hash } => {
                proto::precondition::Kind::IfRangeHash(proto::RangeHash {
                    offset: *offset,
                    len: *len,
                    hash: Bytes::copy_from_slice(hash),
                })
            }
        };
        proto::Precondition { kind: Some(kind) }
    }
}

impl Update {
    /// Payload bytes carried by the writes (for limits and metrics).
    pub fn byte_size(&self) -> u64 {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Write { data, .. } => data.len() as u64,
                Op::Truncate { .. } => 0,
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_counts_every_chunk_an_op_adds_even_if_a_later_op_removes_it() {
        use LenChange::{AtLeast, Exactly};
        assert_eq!(grown_chunks(0, 4, []), 0);
        assert_eq!(grown_chunks(0, 4, [AtLeast(9)]), 3);
        assert_eq!(grown_chunks(8, 4, [AtLeast(9)]), 1);
        assert_eq!(grown_chunks(8, 4, [AtLeast(3), Exactly(5)]), 0);
        assert_eq!(grown_chunks(8, 4, [Exactly(0), Exactly(8)]), 2);
        assert_eq!(
            grown_chunks(0, 4, [Exactly(16), Exactly(0), Exactly(16), Exactly(1)]),
            8
        );
        assert_eq!(grown_chunks(0, 4, [AtLeast(u64::MAX)]), u64::MAX / 4 + 1);
    }

    proptest::proptest! {
        /// Counted from an empty file, growth is at least what it is from any start: a
        /// proposal that passes the check before it is queued also passes the apply's.
        #[test]
        fn growth_from_empty_bounds_growth_from_any_start(
            start in 0u64..200,
            ops in proptest::collection::vec((proptest::bool::ANY, 0u64..200), 0..12),
        ) {
            let ops: Vec<LenChange> = ops
                .into_iter()
                .map(|(t, n)| if t { LenChange::Exactly(n) } else { LenChange::AtLeast(n) })
                .collect();
            proptest::prop_assert!(
                grown_chunks(0, 16, ops.iter().copied()) >= grown_chunks(start, 16, ops.iter().copied())
            );
        }
    }
}
