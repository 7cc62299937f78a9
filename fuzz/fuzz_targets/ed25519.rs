//! The relay's own Ed25519 seal check against the references: `fixed_base::Table` against
//! curve25519-dalek's multiplications for any scalar and points with and without a torsion
//! part, and `trust::Ed25519Check` against ed25519-dalek's `verify` (the same cofactorless
//! equation) for genuine signatures changed anywhere, arbitrary signatures and arbitrary keys.
//! Any disagreement is a crash: a check that accepts what dalek refuses would let a relay
//! show a forged version.
#![no_main]

use std::sync::OnceLock;

use canopy::fixed_base::Table;
use canopy::trust::Ed25519Check;
use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use libfuzzer_sys::fuzz_target;

/// Signers with known secrets, by seed.
const SEEDS: [u8; 4] = [1, 7, 0x80, 0xff];

struct Fixed {
    /// The points tables are built for: B, each signer's -A, and a signer's A plus a point
    /// of order 8 (a mixed-order key: it verifies, though no honest signer has it).
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
    match mode % 4 {
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
        // A genuine signature, then any bytes of it XORed with the input's mask.
        1 => {
            let (sk, check) = &f.signers[usize::from(pick) % f.signers.len()];
            let mask = take::<64>(&mut data);
            let message = data;
            let mut sig = sk.sign(message).to_bytes();
            for (b, m) in sig.iter_mut().zip(mask) {
                *b ^= m;
            }
            let dalek = sk
                .verifying_key()
                .verify(message, &Signature::from_bytes(&sig))
                .is_ok();
            agree(check.check(message, &sig), dalek, "a changed signature");
            if mask == [0; 64] {
                assert!(dalek, "dalek refused its own signature");
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
