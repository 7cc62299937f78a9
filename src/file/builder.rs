//! Building a file from a verified transfer: chunks checked against a manifest, any order,
//! each at most once, until the whole file matches the advertised root.

use super::*;

/// Builds a ChunkedFile from chunks received out of order (full transfer / backfill) and
/// verifies the root.
pub struct FileBuilder {
    chunk_size: u32,
    max_len: u64,
    len: u64,
    version: u64,
    expected_root: Hash,
    chunks: Vec<Option<Bytes>>,
    leaves: Vec<Hash>,
    missing: u64,
    /// A full-size chunk of zeros and its leaf: every all-zero chunk put is stored as this
    /// one buffer, so a file extended by a truncate costs no memory per chunk when it is
    /// received.
    zero: (Bytes, Hash),
}

impl fmt::Debug for FileBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileBuilder")
            .field("version", &self.version)
            .field("len", &self.len)
            .field("chunk_size", &self.chunk_size)
            .field("missing", &self.missing)
            .field("expected_root", &hash_hex(&self.expected_root))
            .finish()
    }
}

impl FileBuilder {
    pub fn new(
        chunk_size: u32,
        max_len: u64,
        len: u64,
        version: u64,
        expected_root: Hash,
    ) -> Result<Self, FileError> {
        let count = check_shape(chunk_size, max_len, len)?;
        let n = to_index(count).ok_or(FileError::TooLarge { len, max: max_len })?;
        let zero = Bytes::from(vec![0u8; u64::from(chunk_size).min(len) as usize]);
        let zero_leaf = leaf_hash(&zero);
        Ok(FileBuilder {
            chunk_size,
            max_len,
            len,
            version,
            expected_root,
            chunks: vec![None; n],
            leaves: vec![[0; 32]; n],
            missing: count,
            zero: (zero, zero_leaf),
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Bytes of the chunks put so far.
    pub fn bytes_present(&self) -> u64 {
        self.chunks.iter().flatten().map(|c| c.len() as u64).sum()
    }

    pub fn chunk_count(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// Stores chunk `index`; its length must match the slot. Putting a chunk twice replaces it.
    pub fn put_chunk(&mut self, index: u64, data: Bytes) -> Result<(), FileError> {
        let leaf = leaf_hash(&data);
        self.put_hashed_chunk(index, data, leaf)
    }

    /// [`FileBuilder::put_chunk`] for a chunk whose leaf hash the caller has just computed
    /// (a receiver that checked it against a manifest), so it is not hashed twice. A wrong
    /// `leaf` only makes [`FileBuilder::finish`] fail its root check.
    pub fn put_hashed_chunk(
        &mut self,
        index: u64,
        data: Bytes,
        leaf: Hash,
    ) -> Result<(), FileError> {
        let count = self.chunk_count();
        let i = to_index(index)
            .filter(|&i| i < self.chunks.len())
            .ok_or(FileError::ChunkOutOfRange { index, count })?;
        let expected = chunk_len_for(self.len, self.chunk_size, index);
        let got = data.len() as u64;
        if got != expected {
            return Err(FileError::ChunkLength {
                index,
                expected,
                got,
            });
        }
        self.leaves[i] = leaf;
        let data = if leaf == self.zero.1 && data.len() == self.zero.0.len() {
            self.zero.0.clone()
        } else {
            data
        };
        if self.chunks[i].replace(data).is_none() {
            self.missing -= 1;
        }
        Ok(())
    }

    /// Chunks not yet received.
    pub fn missing(&self) -> u64 {
        self.missing
    }

    /// Indices of the chunks not yet received, ascending.
    pub fn missing_indices(&self) -> Vec<u64> {
        self.chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_none())
            .map(|(i, _)| i as u64)
            .collect()
    }

    /// True once chunk `index` is in.
    pub fn has_chunk(&self, index: u64) -> bool {
        to_index(index)
            .and_then(|i| self.chunks.get(i))
            .is_some_and(Option::is_some)
    }

    /// The file, once every chunk is in and the root matches.
    pub fn finish(self) -> Result<ChunkedFile, FileError> {
        if self.missing > 0 {
            return Err(FileError::Incomplete {
                missing: self.missing,
            });
        }
        let chunks: Vec<Bytes> = self.chunks.into_iter().flatten().collect();
        let file = ChunkedFile::from_leaves(
            self.chunk_size,
            self.max_len,
            self.len,
            self.version,
            chunks,
            self.leaves,
        );
        if file.root != self.expected_root {
            return Err(FileError::RootMismatch {
                expected: hash_hex(&self.expected_root),
                got: file.root_hex(),
            });
        }
        Ok(file)
    }
}
