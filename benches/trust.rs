//! What core signatures cost: a core seals one anchor per entry it produces (one commit
//! batch); every other node verifies one seal per entry it shows, plus the digest of the
//! entry frame, for each kind of core key. `cargo bench --bench trust` (criterion).

use std::sync::Arc;
use std::time::SystemTime;

use canopy::tls::{self, Identity, Role};
use canopy::trust::{entry_digest, Anchor, Sealer, Verifier};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn identities(alg: tls::KeyAlg) -> (tempfile::TempDir, Identity, Identity) {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    tls::ca_init(&ca).unwrap();
    tls::cert_issue_with(&ca, "core", Role::Core, dir.path(), tls::NODE_VALIDITY, alg).unwrap();
    tls::cert_issue(&ca, "relay", Role::Relay, dir.path()).unwrap();
    let core = Identity::load(dir.path(), "core").unwrap();
    let relay = Identity::load(dir.path(), "relay").unwrap();
    (dir, core, relay)
}

fn bench(c: &mut Criterion) {
    for alg in [tls::KeyAlg::Ed25519, tls::KeyAlg::P256] {
        bench_alg(c, alg);
    }
}

fn bench_alg(c: &mut Criterion, alg: tls::KeyAlg) {
    let (_dir, core, relay) = identities(alg);
    let sealer = Sealer::new(&core).unwrap();
    let mut verifier = Verifier::new(Arc::new(relay));
    verifier.learn(sealer.cert(), SystemTime::now()).unwrap();
    // A 100-byte write's entry frame, as the core encodes it.
    let frame = vec![7u8; 160];
    let anchor = Anchor {
        version: 1234,
        length: 50_000_000,
        chunk_size: 65536,
        root: [3; 32],
        commit_time_us: 1_700_000_000_000_000,
        entry: Some(entry_digest(&frame)),
        prev: None,
    };
    let seal = sealer.seal(&anchor).unwrap();
    c.bench_function(&format!("core: seal one entry ({alg})"), |b| {
        b.iter(|| sealer.seal(black_box(&anchor)).unwrap())
    });
    // Distinct seals, more than the process-wide memo of checks holds, so every check below
    // does the curve arithmetic, as a node that is alone in its process does.
    let many: Vec<(Anchor, canopy::proto::Seal)> = (0..2 * canopy::trust::VERIFIED_MEMO as u64)
        .map(|i| {
            let a = Anchor {
                version: 1234 + i,
                ..anchor.clone()
            };
            let s = sealer.seal(&a).unwrap();
            // As a relay rebuilds it: with the link of the seal before (seal chains).
            (Anchor::of_seal(&s, a.entry).unwrap(), s)
        })
        .collect();
    let mut i = 0;
    c.bench_function(&format!("relay: verify one seal (digest + {alg})"), |b| {
        b.iter(|| {
            let (a, s) = &many[i % many.len()];
            i += 1;
            let a = Anchor {
                entry: Some(entry_digest(black_box(&frame))),
                ..a.clone()
            };
            verifier.verify(&a, black_box(s)).unwrap();
        })
    });
    verifier.verify(&anchor, &seal).unwrap();
    c.bench_function(
        &format!("relay: verify a seal another node of the process checked (memo, {alg})"),
        |b| {
            b.iter(|| {
                let a = Anchor {
                    entry: Some(entry_digest(black_box(&frame))),
                    ..anchor.clone()
                };
                verifier.verify(&a, black_box(&seal)).unwrap();
            })
        },
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
