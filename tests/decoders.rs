//! Arbitrary bytes into every decoder a peer can reach: errors, never panics.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use canopy::proto;
use canopy::replica::{Replica, ReplicaConfig, Trust};
use canopy::tls::{self, Identity, Role};
use canopy::trust::{Sealer, Verifier};
use canopy::wire;
use proptest::prelude::*;
use prost::Message;

/// A core's and a relay's identity, made once for all cases.
fn identities() -> &'static (tempfile::TempDir, Arc<Identity>, Arc<Identity>) {
    static IDS: OnceLock<(tempfile::TempDir, Arc<Identity>, Arc<Identity>)> = OnceLock::new();
    IDS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        tls::ca_init(&ca).unwrap();
        tls::cert_issue(&ca, "core", Role::Core, dir.path()).unwrap();
        tls::cert_issue(&ca, "fuzz", Role::Relay, dir.path()).unwrap();
        let core = Arc::new(Identity::load(dir.path(), "core").unwrap());
        let relay = Arc::new(Identity::load(dir.path(), "fuzz").unwrap());
        (dir, core, relay)
    })
}

/// A core's replica (`core`: it signs) or a relay's (it verifies, and knows the core).
fn replica(core: bool) -> Replica {
    let (_, core_id, relay_id) = identities();
    let trust = if core {
        Trust::Sign {
            sealer: Sealer::new(core_id).unwrap(),
            verifier: Verifier::new(core_id.clone()),
        }
    } else {
        Trust::Verify(Verifier::new(relay_id.clone()))
    };
    let mut r = Replica::new(
        ReplicaConfig {
            chunk_size: 4096,
            max_len: 1 << 20,
            retain_bytes: 1 << 16,
            checkpoint_every: 4,
        },
        trust,
    )
    .unwrap();
    let cert = Bytes::copy_from_slice(core_id.cert_der());
    r.learn_signers(&[cert], std::time::SystemTime::now());
    r
}

fn feed_all(r: &mut Replica, frames: &[Vec<u8>]) {
    for body in frames {
        if let Ok(msg) = proto::Downstream::decode(&body[..]) {
            let mut framed = (body.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(body);
            if r.handle_downstream(Bytes::from(framed), msg).is_err() {
                r.upstream_lost();
                let _ = r.subscribe("fuzz", "127.0.0.1:1", false);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn frame_prefix_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..1024) {
        let _ = wire::decode_prefix(&buf, max);
    }

    #[test]
    fn requests_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(req) = proto::Request::decode(&body[..]) {
            if let Some(proto::request::Kind::Propose(p)) = req.kind {
                let mut r = replica(true);
                if let Some(p) = p.proposal {
                    let _ = r.apply_committed(1, &p, 0);
                }
            } else if let Some(proto::request::Kind::Subscribe(s)) = req.kind {
                let _ = replica(true).plan_subscription(&s);
            }
        }
    }

    #[test]
    fn downstream_frames_never_panic(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..96), 0..12)) {
        let mut r = replica(false);
        let _ = r.subscribe("fuzz", "127.0.0.1:1", false);
        feed_all(&mut r, &frames);
    }

    /// A peer's fetch request, and the chunks a fetch source returns, reach the replica
    /// with arbitrary indices, hashes and data: answers and refusals, never panics.
    #[test]
    fn fetches_never_panic(
        body in proptest::collection::vec(any::<u8>(), 0..256),
        index in any::<u64>(),
        data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let r = replica(true);
        if let Ok(ask) = proto::FetchChunks::decode(&body[..]) {
            for (i, h) in ask.indices.iter().zip(&ask.hashes) {
                if let Ok(h) = <[u8; 32]>::try_from(h.as_ref()) {
                    let _ = r.find_chunk(*i, &h);
                }
            }
        }
        let _ = proto::FetchReply::decode(&body[..]);
        let _ = proto::ChildUpdate::decode(&body[..]);
        // Mid-transfer: a snapshot of 3 chunks begun, then a fetched chunk at any index.
        let mut c = replica(false);
        let _ = c.subscribe("fuzz", "127.0.0.1:1", false);
        let mut parent = replica(true);
        parent.apply_committed(1, &proto::Proposal { update: Some(proto::Update { ops: vec![
            proto::Op { kind: Some(proto::op::Kind::Write(proto::Write { offset: 0, data: Bytes::from(vec![7u8; 10_000]) })) },
        ] }), ..Default::default() }, 0);
        let ok = proto::Downstream { kind: Some(proto::downstream::Kind::SubscribeOk(proto::SubscribeOk::default())) }.encode_to_vec();
        let begin = canopy::replica::snapshot_frames(parent.file(), 0, &[]).next().unwrap();
        feed_all(&mut c, &[ok, begin[4..].to_vec()]);
        let hash = canopy::file::leaf_hash(&data);
        let _ = c.put_fetched_chunk(1, index, Bytes::from(data), hash);
        let _ = c.put_fetched_chunk(1, index % 4, Bytes::new(), hash);
    }

    #[test]
    fn structured_downstream_never_panics(
        kinds in proptest::collection::vec((0u8..10, any::<u64>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..16)
    ) {
        use proto::downstream::Kind;
        let frames: Vec<Vec<u8>> = kinds.into_iter().map(|(k, a, b, data)| {
            let data = Bytes::from(data);
            let kind = match k {
                0 => Kind::SubscribeOk(proto::SubscribeOk { resume: a % 2 == 0, ..Default::default() }),
                1 => Kind::SnapshotBegin(proto::SnapshotBegin { version: a % 8, length: b % 100_000, root: data, chunk_size: 4096, ..Default::default() }),
                2 => Kind::SnapshotChunk(proto::SnapshotChunk { index: a % 30, data }),
                3 => Kind::SnapshotEnd(proto::SnapshotEnd {}),
                4 => Kind::Entry(proto::Entry { version: a % 16, prev_version: b % 16, commit_time_unix_us: 0, update: Some(proto::Update { ops: vec![
                    proto::Op { kind: Some(proto::op::Kind::Write(proto::Write { offset: b, data })) },
                    proto::Op { kind: Some(proto::op::Kind::Truncate(proto::Truncate { len: a })) },
                ] }) }),
                5 => Kind::Checkpoint(proto::Checkpoint { version: a % 16, length: b, root: data }),
                6 => Kind::Heartbeat(proto::Heartbeat { commit_version: a, unix_us: b, root_path: vec![String::from_utf8_lossy(&data).into()], fetch_sources: vec![String::from_utf8_lossy(&data).into()] }),
                8 => Kind::Seal(proto::Seal { version: a % 16, length: b % 100_000, root: data.clone(), signer: data.clone(), signature: data, ..Default::default() }),
                9 => Kind::Signers(proto::Signers { certs: vec![data] }),
                _ => Kind::Refused(proto::Refused { reason: String::from_utf8_lossy(&data).into(), referral: None }),
            };
            proto::Downstream { kind: Some(kind) }.encode_to_vec()
        }).collect();
        let mut r = replica(false);
        let _ = r.subscribe("fuzz", "127.0.0.1:1", false);
        feed_all(&mut r, &frames);
    }
}
