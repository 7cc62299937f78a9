//! Differential target: the relay's own Ed25519 seal check against the dalek references.
//!
//! `fixed_base::Table` is compared with curve25519-dalek's multiplications for any scalar and
//! for points with and without a torsion part; `trust::Ed25519Check` with ed25519-dalek's
//! `verify` (the same cofactorless equation) for genuine signatures changed anywhere or with
//! `s` raised by the group order, arbitrary signatures, arbitrary keys, and valid signatures
//! whose `R` carries a torsion point under a mixed-order key. Any disagreement is a crash: a
//! check that accepts what dalek refuses would let a relay show a forged version.
#![no_main]

use std::sync::OnceLock;

use canopy::fixed_base::Table;
use canopy::trust::Ed25519Check;
use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha512};

/// Signers with known secrets, by seed.
const SEEDS: [u8; 4] = [1, 7, 0x80, 0xff];

struct Fixed {
    /// The points tables are built for: B, each signer's -A, and the first signer's A plus
    /// the torsion point `EIGHT_TORSION[1]` (a mixed-order key: no honest signer has it, but
    /// the cofactorless equation accepts some signatures under it).
    points: Vec<(EdwardsPoint, Table)>,
    signers: Vec<(SigningKey, Ed25519Check)>,
    mixed: (VerifyingKey, Ed25519Check),
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| {
        let signers: Vec<_> = SEEDS
            .iter()
            .map(|&s| {
                let sk = SigningKey::from_bytes(&[s; 32]);
                let check = Ed25519Check::new(sk.verifying_key().as_bytes()).expect("a valid key");
                (sk, check)
            })
            .collect();
        let a = signers[0].0.verifying_key().to_edwards();
        let mixed_point = a + EIGHT_TORSION[1];
        let mixed_bytes = mixed_point.compress().to_bytes();
        let mixed = (
            VerifyingKey::from_bytes(&mixed_bytes).expect("dalek takes a mixed-order key"),
            Ed25519Check::new(&mixed_bytes).expect("a mixed-order key is not of small order"),
        );
        let mut points = vec![ED25519_BASEPOINT_POINT, mixed_point];
        points.extend(
            signers
                .iter()
                .map(|(sk, _)| -sk.verifying_key().to_edwards()),
        );
        let points = points.into_iter().map(|p| (p, Table::new(&p))).collect();
        Fixed {
            points,
            signers,
            mixed,
        }
    })
}

fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = N.min(data.len());
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

/// The group order l = 2^252 + 27742317777372353535851937790883648493, little-endian.
const ORDER: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

/// `s += l` as 256-bit integers; false (and `s` unchanged) when the sum does not fit.
fn add_order(s: &mut [u8]) -> bool {
    let mut sum = [0u8; 32];
    let mut carry = 0u16;
    for (i, out) in sum.iter_mut().enumerate() {
        let v = u16::from(s[i]) + u16::from(ORDER[i]) + carry;
        *out = v as u8;
        carry = v >> 8;
    }
    if carry != 0 {
        return false;
    }
    s.copy_from_slice(&sum);
    true
}

fn agree(ours: bool, dalek: bool, what: &str) {
    assert_eq!(
        ours, dalek,
        "{what}: the table check says {ours}, ed25519-dalek {dalek}"
    );
}

fuzz_target!(|data: &[u8]| {
    let f = fixed();
    let mut data = data;
    let [mode, pick] = take::<2>(&mut data);
    match mode % 5 {
        // [s]P and acc + [s]P for any reduced scalar, against dalek's own multiplications.
        0 => {
            let s = Scalar::from_bytes_mod_order(take::<32>(&mut data));
            let (p, table) = &f.points[usize::from(pick) % f.points.len()];
            let acc = Scalar::from_bytes_mod_order(take::<32>(&mut data)) * ED25519_BASEPOINT_POINT;
            assert_eq!(table.mul(&s), p * s, "[s]P");
            assert_eq!(table.mul_add(acc, &s), acc + p * s, "acc + [s]P");
            if usize::from(pick) % f.points.len() == 0 {
                assert_eq!(table.mul(&s), EdwardsPoint::mul_base(&s), "[s]B");
            }
        }
        // A genuine signature, then any bytes of it XORed with the input's mask, and `s`
        // raised by the group order up to `pick / 16` times while it fits in 256 bits (the
        // same point equation, a non-canonical scalar).
        1 => {
            let (sk, check) = &f.signers[usize::from(pick) % f.signers.len()];
            let mask = take::<64>(&mut data);
            let message = data;
            let mut sig = sk.sign(message).to_bytes();
            for (b, m) in sig.iter_mut().zip(mask) {
                *b ^= m;
            }
            let raised = (0..pick / 16)
                .take_while(|_| add_order(&mut sig[32..]))
                .count();
            let dalek = sk
                .verifying_key()
                .verify(message, &Signature::from_bytes(&sig))
                .is_ok();
            agree(check.check(message, &sig), dalek, "a changed signature");
            if mask == [0; 64] {
                assert_eq!(
                    dalek,
                    raised == 0,
                    "dalek on its own signature, s + {raised} l"
                );
            }
        }
        // Arbitrary signature bytes, under a signer's key or the mixed-order one.
        2 => {
            let sig = take::<64>(&mut data);
            let message = data;
            let i = usize::from(pick) % (f.signers.len() + 1);
            let (vk, check) = match f.signers.get(i) {
                Some((sk, check)) => (sk.verifying_key(), check),
                None => (f.mixed.0, &f.mixed.1),
            };
            let dalek = vk.verify(message, &Signature::from_bytes(&sig)).is_ok();
            agree(
                check.check(message, &sig),
                dalek,
                "arbitrary signature bytes",
            );
            agree(check.check(message, &sig[..63]), false, "a short signature");
        }
        // Under the mixed-order key A + T: R = [r]B + T' with T' of order dividing 8, and
        // s = r + k a, which the equation accepts when [k]T = -T' (one nonce in 8).
        3 => {
            let a = f.signers[0].0.to_scalar();
            let (vk, check) = (&f.mixed.0, &f.mixed.1);
            let torsion = EIGHT_TORSION[usize::from(pick) % 8];
            let r0 = Scalar::from_bytes_mod_order(take::<32>(&mut data));
            let message = data;
            for i in 0u64..64 {
                let r = r0 + Scalar::from(i);
                let big_r = (EdwardsPoint::mul_base(&r) + torsion).compress().to_bytes();
                let k = Scalar::from_hash(
                    Sha512::new()
                        .chain_update(big_r)
                        .chain_update(vk.as_bytes())
                        .chain_update(message),
                );
                if EIGHT_TORSION[1] * k != -torsion {
                    continue;
                }
                let mut sig = [0u8; 64];
                sig[..32].copy_from_slice(&big_r);
                sig[32..].copy_from_slice((r + k * a).as_bytes());
                let dalek = vk.verify(message, &Signature::from_bytes(&sig)).is_ok();
                assert!(dalek, "dalek refused [r]B + T' with [k]T = -T'");
                agree(check.check(message, &sig), dalek, "R with a torsion part");
                return;
            }
        }
        // Arbitrary key bytes: what a node learns, and a check under it.
        _ => {
            let key = take::<32>(&mut data);
            let sig = take::<64>(&mut data);
            let message = data;
            let dalek_key = VerifyingKey::from_bytes(&key).ok();
            let point = CompressedEdwardsY(key).decompress();
            match Ed25519Check::new(&key) {
                Ok(check) => {
                    let vk = dalek_key.expect("a key the node learns, dalek refuses");
                    let dalek = vk.verify(message, &Signature::from_bytes(&sig)).is_ok();
                    agree(check.check(message, &sig), dalek, "an arbitrary key");
                }
                Err(_) => assert!(
                    point.is_none_or(|p| p.is_small_order()),
                    "a large-order key refused"
                ),
            }
        }
    }
});
