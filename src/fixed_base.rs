//! Variable-time fixed-base multiplication on edwards25519: `[s]P` for a point `P` known in
//! advance, by one table lookup and one addition per signed radix-2^[`W`] digit of `s`.
//!
//! A signature check computes `[s]B + [k](-A)` from public values only (the signature, the
//! hash of the message and the signer's key), so it needs no constant time: a digit indexes
//! its row directly, where curve25519-dalek's `EdwardsBasepointTable` scans every entry of a
//! row to hide which one it takes. A check then touches one entry per digit instead of whole
//! tables, and has no doublings. The entries a multiplication needs are prefetched before
//! the first addition: a relay checks a seal with caches that other work has just filled, and
//! without the prefetch the entries' cache misses would come one at a time.
//!
//! Invariants:
//! - [`Table::mul_add`] adds exactly `[s]P` for every scalar below 2^253, which every
//!   reduced (canonical) scalar is;
//! - a table holds [`ROWS`] x [`HALF`] points (640 KiB), fixed when it is built;
//! - never use it with a secret scalar: its time and memory accesses depend on the scalar.

use curve25519_dalek::edwards::EdwardsPoint;
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::Identity;

/// Bits per digit: 32 additions per scalar from 32 rows of 128 points. With caches that
/// other work has filled, a check took 0.55 of the constant-time table's time at 8 bits,
/// 0.64 at 7 and 0.66 at 6 (a third of the memory) on this machine (session 20).
pub const W: usize = 8;

/// Points per row: digits lie in `[-HALF, HALF)`, and a digit's sign is a negation.
pub const HALF: usize = 1 << (W - 1);

/// Rows, one per digit: enough for 253 bits and the carry out of the top digit.
pub const ROWS: usize = 253_usize.div_ceil(W) + if 253 % W == 0 { 1 } else { 0 };

const _: () = assert!(W * ROWS > 253, "the rows hold 253 bits and a carry");

/// `rows[i][j] = (j + 1) * 2^(W i) * P`.
pub struct Table {
    rows: Box<[[EdwardsPoint; HALF]]>,
}

impl Table {
    /// Builds the table of `p`: `ROWS x HALF` point additions, about 1.3 ms.
    pub fn new(p: &EdwardsPoint) -> Self {
        let mut rows = Vec::with_capacity(ROWS);
        let mut base = *p;
        for _ in 0..ROWS {
            let mut row = [base; HALF];
            for j in 1..HALF {
                row[j] = row[j - 1] + base;
            }
            base = row[HALF - 1] + row[HALF - 1];
            rows.push(row);
        }
        Self {
            rows: rows.into_boxed_slice(),
        }
    }

    /// `acc + [s]P`.
    pub fn mul_add(&self, acc: EdwardsPoint, s: &Scalar) -> EdwardsPoint {
        let mut acc = acc;
        let digits = digits(s);
        for (row, &d) in self.rows.iter().zip(&digits) {
            if d != 0 {
                prefetch(&row[usize::from(d.unsigned_abs()) - 1]);
            }
        }
        for (row, d) in self.rows.iter().zip(digits) {
            match d {
                0 => {}
                d if d > 0 => acc += row[usize::from(d.unsigned_abs()) - 1],
                d => acc -= row[usize::from(d.unsigned_abs()) - 1],
            }
        }
        acc
    }

    /// `[s]P`.
    pub fn mul(&self, s: &Scalar) -> EdwardsPoint {
        self.mul_add(EdwardsPoint::identity(), s)
    }
}

/// The signed radix-2^W digits of `s`, least significant first: `s = sum d_i 2^(W i)` with
/// every `d_i` in `[-HALF, HALF)`, for `s < 2^253`.
fn digits(s: &Scalar) -> [i8; ROWS] {
    let bytes = s.as_bytes();
    let bit = |i: usize| -> u32 {
        if i < 256 {
            u32::from((bytes[i / 8] >> (i % 8)) & 1)
        } else {
            0
        }
    };
    let mut out = [0i8; ROWS];
    let mut carry = 0u32;
    for (i, d) in out.iter_mut().enumerate() {
        let mut u = carry;
        for b in 0..W {
            u += bit(W * i + b) << b;
        }
        if u >= HALF as u32 {
            *d = (u as i32 - (1 << W)) as i8;
            carry = 1;
        } else {
            *d = u as i8;
            carry = 0;
        }
    }
    debug_assert_eq!(carry, 0, "a scalar of more than 253 bits");
    out
}

/// Asks for the cache lines of `p` (160 bytes) ahead of their use.
#[cfg(target_arch = "x86_64")]
fn prefetch(p: &EdwardsPoint) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let first = std::ptr::from_ref(p).cast::<i8>();
    for offset in [0, 64, 128, std::mem::size_of::<EdwardsPoint>() - 1] {
        // SAFETY: a prefetch is a hint that never faults and reads nothing into the program;
        // the address lies inside `p` in any case.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(offset)) };
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch(_: &EdwardsPoint) {}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::constants::ED25519_BASEPOINT_POINT as B;
    use proptest::prelude::*;

    #[test]
    fn edge_scalars_multiply_as_dalek_does() {
        let table = Table::new(&B);
        let l_minus_1 = -Scalar::ONE;
        for s in [
            Scalar::ZERO,
            Scalar::ONE,
            Scalar::from(127u64),
            Scalar::from(128u64),
            Scalar::from(255u64),
            Scalar::from(256u64),
            Scalar::from(u64::MAX),
            l_minus_1,
            l_minus_1 - Scalar::from(127u64),
        ] {
            assert_eq!(table.mul(&s).compress(), (B * s).compress());
        }
    }

    proptest! {
        #[test]
        fn a_table_multiplies_as_dalek_does(p in any::<[u8; 32]>(), s in any::<[u8; 32]>(), t in any::<[u8; 32]>()) {
            let point = B * Scalar::from_bytes_mod_order(p);
            let table = Table::new(&point);
            let s = Scalar::from_bytes_mod_order(s);
            let t = Scalar::from_bytes_mod_order(t);
            let acc = B * t;
            prop_assert_eq!(table.mul_add(acc, &s).compress(), (acc + point * s).compress());
        }

        #[test]
        fn digits_sum_to_the_scalar_and_stay_in_range(s in any::<[u8; 32]>()) {
            let s = Scalar::from_bytes_mod_order(s);
            let mut sum = Scalar::ZERO;
            let mut weight = Scalar::ONE;
            let step = Scalar::from(1u64 << W);
            for d in digits(&s) {
                prop_assert!((-(HALF as i32)..HALF as i32).contains(&i32::from(d)));
                let m = Scalar::from(u64::from(d.unsigned_abs()));
                sum += if d < 0 { -m } else { m } * weight;
                weight *= step;
            }
            prop_assert_eq!(sum, s);
        }
    }
}
