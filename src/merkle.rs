//! The file's hashes: leaves, the binary Merkle tree over them, and the root that commits to
//! length and chunk size; plus the chunk geometry they share.
//!
//! Invariants: leaf `i` = BLAKE3(chunk `i`); an inner node = BLAKE3(0x01 || left || right),
//! an odd node at the end of a level promoted unchanged; the tree root of zero leaves is
//! BLAKE3(""), of one leaf that leaf; the file root = BLAKE3(0x02 || len u64 LE || chunk_size
//! u32 LE || tree root). Leaves carry no prefix: the shape of the tree is fixed by the length
//! and chunk size, which the file root commits to.

use crate::update::{FileError, Hash, MAX_CHUNK_COUNT, MAX_CHUNK_SIZE};

const NODE_TAG: u8 = 0x01;
const ROOT_TAG: u8 = 0x02;

/// Accepts a power of two in `1..=16 MiB`.
pub fn check_chunk_size(chunk_size: u32) -> Result<(), FileError> {
    if chunk_size == 0 || !chunk_size.is_power_of_two() || chunk_size > MAX_CHUNK_SIZE {
        Err(FileError::BadChunkSize(chunk_size))
    } else {
        Ok(())
    }
}

/// Checks the shape a file of `len` bytes at `chunk_size` would have, before anything is
/// sized by it: a valid chunk size, `len <= max_len`, at most [`MAX_CHUNK_COUNT`] chunks.
/// Returns the chunk count.
pub fn check_shape(chunk_size: u32, max_len: u64, len: u64) -> Result<u64, FileError> {
    check_chunk_size(chunk_size)?;
    if len > max_len {
        return Err(FileError::TooLarge { len, max: max_len });
    }
    let count = chunk_count_for(len, chunk_size);
    if count > MAX_CHUNK_COUNT {
        return Err(FileError::TooManyChunks {
            len,
            chunk_size,
            chunks: count,
            max: MAX_CHUNK_COUNT,
        });
    }
    Ok(count)
}

/// Number of chunks of a file with this length.
pub fn chunk_count_for(len: u64, chunk_size: u32) -> u64 {
    len.div_ceil(u64::from(chunk_size))
}

/// Length of chunk `index` of a file with this length (0 when out of range).
pub fn chunk_len_for(len: u64, chunk_size: u32, index: u64) -> u64 {
    let cs = u64::from(chunk_size);
    match index.checked_mul(cs) {
        Some(start) if start < len => cs.min(len - start),
        _ => 0,
    }
}

/// Leaf hash of one chunk.
pub fn leaf_hash(chunk: &[u8]) -> Hash {
    *blake3::hash(chunk).as_bytes()
}

/// Lowercase hex of a hash.
pub fn hash_hex(h: &Hash) -> String {
    blake3::Hash::from_bytes(*h).to_hex().to_string()
}

pub(crate) fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[NODE_TAG]);
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

pub(crate) fn empty_tree_root() -> Hash {
    *blake3::hash(b"").as_bytes()
}

pub(crate) fn file_root(len: u64, chunk_size: u32, tree_root: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[ROOT_TAG]);
    h.update(&len.to_le_bytes());
    h.update(&chunk_size.to_le_bytes());
    h.update(tree_root);
    *h.finalize().as_bytes()
}

pub(crate) fn parent_at(level: &[Hash], p: usize) -> Hash {
    let l = 2 * p;
    match level.get(l + 1) {
        Some(r) => node_hash(&level[l], r),
        None => level[l],
    }
}

pub(crate) fn next_level(level: &[Hash]) -> Vec<Hash> {
    (0..level.len().div_ceil(2))
        .map(|p| parent_at(level, p))
        .collect()
}

pub(crate) fn build_levels(leaves: Vec<Hash>) -> Vec<Vec<Hash>> {
    let mut levels = vec![leaves];
    while let Some(top) = levels.last().filter(|l| l.len() > 1) {
        let up = next_level(top);
        levels.push(up);
    }
    levels
}

/// Root of a file with this chunk size, length and these chunk hashes (what a manifest check
/// recomputes). The caller is responsible for `chunk_hashes.len() == ceil(len / chunk_size)`.
pub fn root_of(chunk_size: u32, len: u64, chunk_hashes: &[Hash]) -> Hash {
    let tree = match chunk_hashes.len() {
        0 => empty_tree_root(),
        1 => chunk_hashes[0],
        _ => {
            let mut level = next_level(chunk_hashes);
            while level.len() > 1 {
                level = next_level(&level);
            }
            level[0]
        }
    };
    file_root(len, chunk_size, &tree)
}
