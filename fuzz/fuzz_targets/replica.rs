//! `Downstream` and `Upstream` messages through the replica: a core replica applies
//! proposals and plans subscriptions from fuzzed `Propose` and `Subscribe` requests, and a
//! relay replica follows it, fed the core's genuine frames interleaved with fuzzed ones.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;
use canopy::proto::{self, downstream::Kind as Down};
use canopy::replica::{snapshot_frames, Event, Replica, ReplicaConfig, SubscribePlan, Trust};
use canopy::tls::{self, Identity, Role};
use canopy::trust::{Sealer, Verifier};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn identities() -> &'static (tempfile::TempDir, Arc<Identity>, Arc<Identity>) {
    static IDS: OnceLock<(tempfile::TempDir, Arc<Identity>, Arc<Identity>)> = OnceLock::new();
    IDS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        tls::ca_init(&ca).unwrap();
        tls::cert_issue(&ca, "core", Role::Core, dir.path()).unwrap();
        tls::cert_issue(&ca, "relay", Role::Relay, dir.path()).unwrap();
        let core = Arc::new(Identity::load(dir.path(), "core").unwrap());
        let relay = Arc::new(Identity::load(dir.path(), "relay").unwrap());
        (dir, core, relay)
    })
}

fn cfg() -> ReplicaConfig {
    ReplicaConfig {
        chunk_size: 4096,
        max_len: 1 << 18,
        retain_bytes: 1 << 16,
        checkpoint_every: 3,
    }
}

fn framed(msg: &proto::Downstream) -> Bytes {
    canopy::wire::encode(msg)
}

/// Feeds one frame to the relay; on an error it resubscribes, as a node does.
fn feed(relay: &mut Replica, frame: Bytes) {
    let Ok(msg) = proto::Downstream::decode(frame.slice(4..)) else {
        return;
    };
    if relay.handle_downstream(frame, msg).is_err() {
        relay.upstream_lost();
        let _ = relay.subscribe("relay", "127.0.0.1:1", false);
    }
}

fn broadcasts(events: Vec<Event>) -> Vec<Bytes> {
    events
        .into_iter()
        .filter_map(|e| match e {
            Event::Broadcast(f) => Some(f),
            _ => None,
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (_, core_id, relay_id) = identities();
    let mut core = Replica::new(
        cfg(),
        Trust::Sign {
            sealer: Sealer::new(core_id).unwrap(),
            verifier: Verifier::new(core_id.clone()),
        },
    )
    .unwrap();
    let mut relay = Replica::new(cfg(), Trust::Verify(Verifier::new(relay_id.clone())))
        .unwrap()
        .with_name("relay");
    let cert = Bytes::copy_from_slice(core_id.cert_der());
    relay.learn_signers(&[cert], SystemTime::now());
    let _ = relay.subscribe("relay", "127.0.0.1:1", false);
    let resume = |resume| {
        framed(&proto::Downstream {
            kind: Some(Down::SubscribeOk(proto::SubscribeOk {
                resume,
                ..Default::default()
            })),
        })
    };
    feed(&mut relay, resume(true));
    let mut index = 0u64;
    let mut rest = data;
    while let Some((&tag, tail)) = rest.split_first() {
        let n = usize::from(*tail.first().unwrap_or(&0)).min(tail.len().saturating_sub(1));
        let piece = &tail[1.min(tail.len())..1.min(tail.len()) + n];
        rest = &tail[(1 + n).min(tail.len())..];
        match tag % 5 {
            0 => {
                if let Ok(req) = proto::Request::decode(piece) {
                    if let Some(proto::request::Kind::Propose(p)) = req.kind {
                        if let Some(p) = p.proposal {
                            index += 1;
                            let (_, events) = core.apply_committed(index, &p, index);
                            for f in broadcasts(events) {
                                feed(&mut relay, f);
                            }
                        }
                    }
                }
            }
            1 => {
                let mut f = (piece.len() as u32).to_be_bytes().to_vec();
                f.extend_from_slice(piece);
                feed(&mut relay, Bytes::from(f));
            }
            2 => {
                let sub = match proto::Request::decode(piece).ok().and_then(|r| r.kind) {
                    Some(proto::request::Kind::Subscribe(s)) => s,
                    _ => relay.subscription("relay", "127.0.0.1:1", piece.first() == Some(&1)),
                };
                let plan = core.plan_subscription(&sub);
                relay.upstream_lost();
                let _ = relay.subscribe("relay", "127.0.0.1:1", false);
                match plan {
                    SubscribePlan::Resume(frames) => {
                        feed(&mut relay, resume(true));
                        for f in frames {
                            feed(&mut relay, f);
                        }
                    }
                    SubscribePlan::Snapshot(p) => {
                        feed(&mut relay, resume(false));
                        let have = sub.have_chunks.clone();
                        let frames: Vec<Bytes> = {
                            let _ = p.anchor.as_ref();
                            canopy::replica::snapshot_frames_below(
                                &p.file,
                                p.commit_time_us,
                                &have,
                                p.anchor.as_ref(),
                                || u64::MAX,
                            )
                            .map(|(_, f)| f.concat())
                            .collect()
                        };
                        for f in frames.into_iter().chain(p.then) {
                            feed(&mut relay, f);
                        }
                    }
                    SubscribePlan::Refuse(_) | SubscribePlan::Follow(_) => {}
                }
            }
            3 => {
                if let Some(ev) = core.checkpoint() {
                    for f in broadcasts(vec![ev]) {
                        feed(&mut relay, f);
                    }
                }
                let hb = core.heartbeat(index, vec!["core".into()], vec![]);
                feed(&mut relay, hb);
            }
            _ => {
                let _ = snapshot_frames(relay.file(), 0, &[]).count();
                let hash = canopy::file::leaf_hash(piece);
                let _ = relay.put_fetched_chunk(
                    index,
                    u64::from(tag),
                    Bytes::copy_from_slice(piece),
                    hash,
                );
                if relay.snapshot_waiting() {
                    let _ = relay.finish_snapshot();
                }
            }
        }
        if relay.file().version() == core.file().version() && relay.is_synced() {
            assert_eq!(relay.file().root(), core.file().root());
        }
    }
});
