//! A first-in, first-out queue stored in fixed blocks, so that growing it never moves what it
//! holds.
//!
//! Invariants:
//! - Every block but the first and the last holds exactly [`BLOCK`] items; none is empty.
//! - Pushing allocates at most one block of [`BLOCK`] items and copies nothing already held.
//!   A `VecDeque` doubles instead, copying everything: a relay's retained entries (up to
//!   `retain_bytes`, hundreds of thousands of entries) were copied whole at each power of two
//!   on the delivery path, and all relays of a process did it at the same write
//!   (docs/benchmarks.md, "The N = 1000 tail was synchronized work").

use std::collections::VecDeque;

/// Items per block: 64 retained entries are about 6.6 kB.
pub(super) const BLOCK: usize = 64;

pub(super) struct Fifo<T> {
    blocks: VecDeque<VecDeque<T>>,
    len: usize,
}

impl<T> Fifo<T> {
    pub(super) fn new() -> Self {
        Self {
            blocks: VecDeque::new(),
            len: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn push_back(&mut self, item: T) {
        match self.blocks.back_mut() {
            Some(b) if b.len() < BLOCK => b.push_back(item),
            _ => {
                let mut b = VecDeque::with_capacity(BLOCK);
                b.push_back(item);
                self.blocks.push_back(b);
            }
        }
        self.len += 1;
    }

    pub(super) fn pop_front(&mut self) -> Option<T> {
        let first = self.blocks.front_mut()?;
        let item = first.pop_front()?;
        if first.is_empty() {
            self.blocks.pop_front();
        }
        self.len -= 1;
        Some(item)
    }

    pub(super) fn clear(&mut self) {
        self.blocks.clear();
        self.len = 0;
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &T> {
        self.blocks.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn matches_a_vecdeque_through_pushes_pops_and_clears() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut fifo = Fifo::new();
        let mut model = VecDeque::new();
        for i in 0..20_000u32 {
            match rng.random_range(0..100) {
                0 => {
                    fifo.clear();
                    model.clear();
                }
                1..=39 => assert_eq!(fifo.pop_front(), model.pop_front()),
                _ => {
                    fifo.push_back(i);
                    model.push_back(i);
                }
            }
            assert_eq!(fifo.len(), model.len());
            if i % 97 == 0 {
                assert!(fifo.iter().eq(model.iter()));
                let n = fifo.blocks.len();
                assert!(fifo.blocks.iter().all(|b| !b.is_empty()));
                assert!(fifo
                    .blocks
                    .iter()
                    .enumerate()
                    .all(|(k, b)| k == 0 || k + 1 == n || b.len() == BLOCK));
            }
        }
    }

    #[test]
    fn growing_never_moves_a_held_item() {
        let mut fifo = Fifo::new();
        fifo.push_back(0u64);
        let first: *const u64 = fifo.iter().next().unwrap();
        for i in 1..(BLOCK as u64 * 100) {
            fifo.push_back(i);
        }
        assert_eq!(fifo.iter().next().unwrap() as *const u64, first);
        assert!(fifo.iter().copied().eq(0..BLOCK as u64 * 100));
    }
}
