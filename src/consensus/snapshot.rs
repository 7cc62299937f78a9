//! The snapshot file format, written and read chunk by chunk.
//!
//! Invariants:
//! - Layout (v2): magic `CNPYSNP2`, u32 LE metadata length, metadata JSON, u32 LE chunk size,
//!   u64 LE max length, u64 LE version, u64 LE length, 32-byte root, the dedup table
//!   ([`DedupTable::encode_to`]), then the content. v1 (`CNPYSNP1`) is the same without the
//!   table and is still read (with an empty table).
//! - [`write`] streams the file's chunks to the writer and [`read`] takes the content a chunk
//!   at a time into the new file: neither holds the content twice, and neither holds more
//!   than one chunk beyond the file itself.
//! - [`read`] checks every declared size against its bound before allocating: metadata at most
//!   [`MAX_META`] bytes, a chunk size the file module accepts and equal to the local one, a
//!   length within the local maximum, the content exactly that long with nothing after it.
//!   The rebuilt root must equal the recorded one.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use bytes::Bytes;

use super::{LogId, SnapshotMeta};
use crate::dedup::{DedupError, DedupTable, DEDUP_WINDOW, MAX_PROPOSAL_ID, MAX_REASON};
use crate::file::{check_chunk_size, chunk_count_for, chunk_len_for, ChunkedFile, FileBuilder};
use crate::file::{FileError, Hash};

const MAGIC_V1: &[u8; 8] = b"CNPYSNP1";
const MAGIC: &[u8; 8] = b"CNPYSNP2";

/// Largest metadata section accepted (membership of a few core members is a few KiB).
pub const MAX_META: usize = 1 << 20;

/// Largest encoded dedup table.
const MAX_TABLE: u64 = 4
    + DEDUP_WINDOW as u64 * (1 + MAX_PROPOSAL_ID as u64 + 1 + 8 + 2)
    + DEDUP_WINDOW as u64 * MAX_REASON as u64;

/// Errors of snapshot encoding and persistence.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("snapshot is malformed: {0}")]
    Malformed(String),
    #[error("snapshot metadata: {0}")]
    Meta(#[from] serde_json::Error),
    #[error("snapshot file content: {0}")]
    File(#[from] FileError),
    #[error("snapshot {0}")]
    Dedup(#[from] DedupError),
    #[error("snapshot is for {got:?}, expected {expected:?}")]
    WrongMeta {
        expected: Option<LogId>,
        got: Option<LogId>,
    },
    #[error("snapshot task failed: {0}")]
    Task(String),
}

/// What a node accepts in a snapshot: its own chunk size and maximum file length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub chunk_size: u32,
    pub max_len: u64,
}

impl Limits {
    /// The limits of the file `file` lives under.
    pub fn of(file: &ChunkedFile) -> Limits {
        Limits {
            chunk_size: file.chunk_size(),
            max_len: file.max_len(),
        }
    }

    /// The most bytes a snapshot within these limits can take.
    pub fn max_snapshot_bytes(&self) -> u64 {
        let header = 8 + 4 + MAX_META as u64 + 4 + 8 * 3 + 32;
        header
            .saturating_add(MAX_TABLE)
            .saturating_add(self.max_len)
    }
}

/// A decoded snapshot.
#[derive(Debug)]
pub struct Decoded {
    pub meta: SnapshotMeta,
    pub file: ChunkedFile,
    pub dedup: DedupTable,
}

/// Write the snapshot of `file` and `dedup` described by `meta` to `w`, a chunk at a time.
pub fn write<W: Write>(
    w: &mut W,
    meta: &SnapshotMeta,
    file: &ChunkedFile,
    dedup: &DedupTable,
) -> Result<(), SnapshotError> {
    let meta_json = serde_json::to_vec(meta)?;
    if meta_json.len() > MAX_META {
        return Err(SnapshotError::Malformed(format!(
            "metadata of {} bytes exceeds {MAX_META}",
            meta_json.len()
        )));
    }
    let io = |e: io::Error| SnapshotError::Malformed(format!("writing: {e}"));
    w.write_all(MAGIC).map_err(io)?;
    w.write_all(&(meta_json.len() as u32).to_le_bytes())
        .map_err(io)?;
    w.write_all(&meta_json).map_err(io)?;
    w.write_all(&file.chunk_size().to_le_bytes()).map_err(io)?;
    w.write_all(&file.max_len().to_le_bytes()).map_err(io)?;
    w.write_all(&file.version().to_le_bytes()).map_err(io)?;
    w.write_all(&file.len().to_le_bytes()).map_err(io)?;
    w.write_all(&file.root()).map_err(io)?;
    dedup.encode_to(w).map_err(io)?;
    file.write_to(w).map_err(io)?;
    Ok(())
}

/// Read only the metadata at the start of a snapshot.
pub fn read_meta<R: Read>(r: &mut R) -> Result<SnapshotMeta, SnapshotError> {
    Ok(read_header(r)?.0)
}

fn read_header<R: Read>(r: &mut R) -> Result<(SnapshotMeta, bool), SnapshotError> {
    let magic: [u8; 8] = read_array(r)?;
    let v2 = match &magic {
        m if m == MAGIC => true,
        m if m == MAGIC_V1 => false,
        _ => return Err(SnapshotError::Malformed("bad magic".into())),
    };
    let meta_len = u32::from_le_bytes(read_array(r)?) as usize;
    if meta_len > MAX_META {
        return Err(SnapshotError::Malformed(format!(
            "metadata of {meta_len} bytes exceeds {MAX_META}"
        )));
    }
    let mut meta = vec![0u8; meta_len];
    r.read_exact(&mut meta).map_err(truncated)?;
    Ok((serde_json::from_slice(&meta)?, v2))
}

/// Read and verify a snapshot within `limits`; see the module docs.
pub fn read<R: Read>(r: &mut R, limits: Limits) -> Result<Decoded, SnapshotError> {
    let (meta, v2) = read_header(r)?;
    let chunk_size = u32::from_le_bytes(read_array(r)?);
    let max_len = u64::from_le_bytes(read_array(r)?);
    let version = u64::from_le_bytes(read_array(r)?);
    let len = u64::from_le_bytes(read_array(r)?);
    let root: Hash = read_array(r)?;
    check_chunk_size(chunk_size)?;
    if chunk_size != limits.chunk_size {
        return Err(SnapshotError::Malformed(format!(
            "chunk size {chunk_size}, this node uses {}",
            limits.chunk_size
        )));
    }
    if len > limits.max_len.min(max_len) {
        return Err(FileError::TooLarge {
            len,
            max: limits.max_len.min(max_len),
        }
        .into());
    }
    let dedup = if v2 {
        DedupTable::decode_from(r)?
    } else {
        DedupTable::default()
    };
    let mut builder = FileBuilder::new(chunk_size, limits.max_len, len, version, root)?;
    for index in 0..chunk_count_for(len, chunk_size) {
        let n = chunk_len_for(len, chunk_size, index) as usize;
        let mut chunk = vec![0u8; n];
        r.read_exact(&mut chunk).map_err(|e| {
            SnapshotError::Malformed(format!("content ends within chunk {index}: {e}"))
        })?;
        builder.put_chunk(index, Bytes::from(chunk))?;
    }
    let mut probe = [0u8; 1];
    match r.read(&mut probe) {
        Ok(0) => {}
        Ok(_) => {
            return Err(SnapshotError::Malformed(format!(
                "content is longer than the {len} bytes the header says"
            )))
        }
        Err(e) => return Err(SnapshotError::Malformed(format!("reading: {e}"))),
    }
    Ok(Decoded {
        meta,
        file: builder.finish()?,
        dedup,
    })
}

fn truncated(e: io::Error) -> SnapshotError {
    SnapshotError::Malformed(format!("header truncated: {e}"))
}

fn read_array<const N: usize, R: Read>(r: &mut R) -> Result<[u8; N], SnapshotError> {
    let mut buf = [0u8; N];
    r.read_exact(&mut buf).map_err(truncated)?;
    Ok(buf)
}
