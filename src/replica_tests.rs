use super::*;

use proptest::prelude::*;
use prost::Message;

use crate::file::{hash_hex, Op};

/// Small chunks so that a few bytes already span several chunks.
const CS: u32 = 4;
const MAX: u64 = 64;
const T0: u64 = 1_700_000_000_000_000;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn cfg(retain_bytes: u64, checkpoint_every: u32) -> ReplicaConfig {
    ReplicaConfig {
        chunk_size: CS,
        max_len: MAX,
        retain_bytes,
        checkpoint_every,
    }
}

/// A core node's replica (authoritative, synced from the start).
fn core(retain_bytes: u64, checkpoint_every: u32) -> Replica {
    Replica::unchecked(cfg(retain_bytes, checkpoint_every), true)
}

/// A relay's replica (not synced until its first snapshot).
fn relay() -> Replica {
    Replica::unchecked(cfg(1 << 20, 1000), false)
}

fn w(offset: u64, data: &[u8]) -> Op {
    Op::Write {
        offset,
        data: Bytes::copy_from_slice(data),
    }
}

fn t(len: u64) -> Op {
    Op::Truncate { len }
}

fn upd(ops: Vec<Op>) -> Update {
    Update { ops }
}

fn proposal(u: &Update) -> proto::Proposal {
    proto::Proposal {
        update: Some(u.into()),
        precondition: None,
        ..Default::default()
    }
}

fn guarded(u: &Update, p: &Precondition) -> proto::Proposal {
    proto::Proposal {
        update: Some(u.into()),
        precondition: Some(p.into()),
        ..Default::default()
    }
}

fn frame(kind: Down) -> Bytes {
    wire::encode(&proto::Downstream { kind: Some(kind) })
}

fn entry_frame(version: u64, prev_version: u64, time: u64, u: &Update) -> Bytes {
    frame(Down::Entry(proto::Entry {
        version,
        prev_version,
        commit_time_unix_us: time,
        update: Some(u.into()),
    }))
}

fn checkpoint_frame(version: u64, length: u64, root: &[u8]) -> Bytes {
    frame(Down::Checkpoint(proto::Checkpoint {
        version,
        length,
        root: Bytes::copy_from_slice(root),
    }))
}

fn checkpoint_of(f: &ChunkedFile) -> Bytes {
    checkpoint_frame(f.version(), f.len(), &f.root())
}

fn heartbeat_frame(commit_version: u64, unix_us: u64) -> Bytes {
    heartbeat_with_path(commit_version, unix_us, vec![])
}

fn heartbeat_with_path(commit_version: u64, unix_us: u64, root_path: Vec<String>) -> Bytes {
    frame(Down::Heartbeat(proto::Heartbeat {
        commit_version,
        unix_us,
        root_path,
        fetch_sources: vec![],
    }))
}

fn refused_frame(reason: &str) -> Bytes {
    frame(Down::Refused(proto::Refused {
        reason: reason.into(),
        referral: None,
    }))
}

fn ok_frame(resume: bool) -> Bytes {
    frame(Down::SubscribeOk(proto::SubscribeOk {
        parent_name: "core-a".into(),
        parent_depth: 0,
        resume,
        core_addrs: vec!["10.0.0.1:4433".into(), "10.0.0.9:4433".into()],
        root_path: vec!["core-a".into()],
        chunk_size: CS,
        fetch_sources: vec![],
        signers: vec![],
    }))
}

/// Decodes one whole frame, checking that its length prefix covers exactly the buffer.
fn decode(f: &Bytes) -> proto::Downstream {
    let (n, body) = wire::decode_prefix(f, wire::DEFAULT_MAX_FRAME)
        .unwrap()
        .expect("a whole frame");
    assert_eq!(n, f.len(), "frame length prefix");
    proto::Downstream::decode(body).unwrap()
}

fn feed(r: &mut Replica, f: &Bytes) -> Result<Vec<Event>, ReplicaError> {
    r.handle_downstream(f.clone(), decode(f))
}

/// Subscribes `c` afresh and feeds it a full transfer's `SubscribeOk` and `begin` frame.
fn begin_transfer(c: &mut Replica, begin: &Bytes) {
    let _ = c.subscribe("c", "a:1", false);
    assert_eq!(feed(c, &ok_frame(false)), Ok(vec![]));
    assert_eq!(feed(c, begin), Ok(vec![]));
}

fn feed_ok(r: &mut Replica, f: &Bytes) -> Vec<Event> {
    feed(r, f).unwrap_or_else(|e| panic!("frame {:?}: {e}", decode(f)))
}

fn broadcasts(events: &[Event]) -> Vec<Bytes> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Broadcast(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

/// Applies `u` at `index` on a core replica, asserting it applies.
fn apply(r: &mut Replica, index: u64, u: &Update, now: u64) -> Vec<Event> {
    let (outcome, events) = r.apply_committed(index, &proposal(u), now);
    assert_eq!(outcome, ApplyOutcome::Applied { version: index });
    events
}

/// The entry frame broadcast by an `apply_committed` (its first event).
fn entry_of(events: &[Event]) -> Bytes {
    match events.first() {
        Some(Event::Broadcast(f)) => f.clone(),
        other => panic!("expected an entry broadcast first, got {other:?}"),
    }
}

/// A comparable view of a [`SubscribePlan`].
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Resume(Vec<Bytes>),
    Snapshot {
        version: u64,
        root: Hash,
        content: Vec<u8>,
    },
    Refuse(String),
    Follow {
        version: u64,
    },
}

fn plan(parent: &Replica, sub: &proto::Subscribe) -> Plan {
    match parent.plan_subscription(sub) {
        SubscribePlan::Resume(f) => Plan::Resume(f),
        SubscribePlan::Snapshot(p) => Plan::Snapshot {
            version: p.file.version(),
            root: p.file.root(),
            content: p.file.to_vec(),
        },
        SubscribePlan::Refuse(r) => Plan::Refuse(r),
        SubscribePlan::Follow(p) => Plan::Follow { version: p.version },
    }
}

fn snapshot_plan(f: &ChunkedFile) -> Plan {
    Plan::Snapshot {
        version: f.version(),
        root: f.root(),
        content: f.to_vec(),
    }
}

fn sub_at(have_version: u64, have_root: &[u8]) -> proto::Subscribe {
    proto::Subscribe {
        name: "child".into(),
        have_version,
        have_root: Bytes::copy_from_slice(have_root),
        listen_addr: "10.0.0.2:4433".into(),
        have_chunks: vec![],
        ..Default::default()
    }
}

fn state(r: &Replica) -> (u64, Hash) {
    (r.file().version(), r.file().root())
}

/// Runs a whole subscription of `child` to `parent` in memory, as the two drivers would:
/// `subscribe`, `plan_subscription`, then SubscribeOk and the plan's frames (or Refused).
/// Returns the child's events for all of them.
fn connect(parent: &Replica, child: &mut Replica, full: bool) -> Result<Vec<Event>, ReplicaError> {
    let sub = child.subscribe("child", "10.0.0.2:4433", full);
    let mut events = Vec::new();
    match parent.plan_subscription(&sub) {
        SubscribePlan::Refuse(reason) => return feed(child, &refused_frame(&reason)),
        SubscribePlan::Resume(frames) => {
            events.extend(feed(child, &ok_frame(true))?);
            for f in &frames {
                events.extend(feed(child, f)?);
            }
        }
        SubscribePlan::Snapshot(p) => {
            let file = p.file;
            events.extend(feed(child, &ok_frame(false))?);
            for f in snapshot_frames(&file, parent.last_commit_time_us(), &[]) {
                events.extend(feed(child, &f)?);
            }
        }
        SubscribePlan::Follow(_) => panic!("connect() is for parents that hold a copy"),
    }
    Ok(events)
}

/// A core replica holding "hello, wor" (3 chunks) at version 4 (index 3 was a blank entry),
/// and the frames it broadcast on the way there.
fn parent_at_v4(checkpoint_every: u32) -> (Replica, Vec<Bytes>) {
    let mut p = core(1 << 20, checkpoint_every);
    let mut out = Vec::new();
    out.extend(broadcasts(&apply(
        &mut p,
        1,
        &upd(vec![w(0, b"hello, ")]),
        T0 + 1,
    )));
    out.extend(broadcasts(&apply(
        &mut p,
        2,
        &upd(vec![w(7, b"world!")]),
        T0 + 2,
    )));
    out.extend(broadcasts(&apply(&mut p, 4, &upd(vec![t(10)]), T0 + 4)));
    assert_eq!(p.file().to_vec(), b"hello, wor");
    assert_eq!(p.file().version(), 4);
    (p, out)
}

/// A relay that has taken a full snapshot of `parent` and is streaming from it.
fn streaming_child(parent: &Replica) -> Replica {
    let mut c = relay();
    let events = connect(parent, &mut c, false).unwrap();
    let v = parent.file().version();
    assert_eq!(
        events,
        vec![
            Event::Installed { version: v },
            Event::Applied {
                version: v,
                commit_time_us: parent.last_commit_time_us(),
            },
        ]
    );
    c
}

// ---------------------------------------------------------------------------------------------
// Core side: apply_committed, checkpoints, preconditions, limits
// ---------------------------------------------------------------------------------------------

#[test]
fn apply_committed_broadcasts_entry_then_applied() {
    let mut r = core(1 << 20, 100);
    assert_eq!(state(&r).0, 0);
    assert_eq!(r.commit_known(), 0);
    assert_eq!(r.last_commit_time_us(), 0);
    assert_eq!(r.retained_bytes(), 0);
    assert!(r.is_synced());

    let u1 = upd(vec![w(0, b"hello")]);
    let (outcome, events) = r.apply_committed(1, &proposal(&u1), T0);
    assert_eq!(outcome, ApplyOutcome::Applied { version: 1 });
    let f1 = entry_frame(1, 0, T0, &u1);
    assert_eq!(
        events,
        vec![
            Event::Broadcast(f1.clone()),
            Event::Applied {
                version: 1,
                commit_time_us: T0,
            },
        ]
    );
    assert_eq!(
        decode(&f1),
        proto::Downstream {
            kind: Some(Down::Entry(proto::Entry {
                version: 1,
                prev_version: 0,
                commit_time_unix_us: T0,
                update: Some(proto::Update {
                    ops: vec![proto::Op {
                        kind: Some(proto::op::Kind::Write(proto::Write {
                            offset: 0,
                            data: Bytes::from_static(b"hello"),
                        })),
                    }],
                }),
            })),
        }
    );
    // The prefix is the big-endian body length.
    assert_eq!(
        u32::from_be_bytes(f1[..4].try_into().unwrap()) as usize,
        f1.len() - 4
    );

    // Index 2 was a blank/membership Raft entry: the next entry chains from version 1.
    let u3 = upd(vec![w(3, b"p!"), t(4), w(6, b"x")]);
    let (outcome, events) = r.apply_committed(3, &proposal(&u3), T0 + 50);
    assert_eq!(outcome, ApplyOutcome::Applied { version: 3 });
    let f3 = entry_frame(3, 1, T0 + 50, &u3);
    assert_eq!(
        events,
        vec![
            Event::Broadcast(f3.clone()),
            Event::Applied {
                version: 3,
                commit_time_us: T0 + 50,
            },
        ]
    );
    match decode(&f3).kind {
        Some(Down::Entry(e)) => {
            assert_eq!((e.version, e.prev_version), (3, 1));
            assert_eq!(Update::try_from(e.update.unwrap()).unwrap(), u3);
        }
        other => panic!("not an entry: {other:?}"),
    }
    assert_eq!(r.file().to_vec(), b"help\0\0x");
    assert_eq!(r.file().version(), 3);
    assert_eq!(r.commit_known(), 3);
    assert_eq!(r.last_commit_time_us(), T0 + 50);
    assert_eq!(r.retained_bytes(), (f1.len() + f3.len()) as u64);
    assert_eq!(
        r.file().root(),
        ChunkedFile::from_bytes(CS, MAX, b"help\0\0x", 3)
            .unwrap()
            .root()
    );

    // A proposal without an update is an empty update: it still moves the version.
    let (outcome, events) = r.apply_committed(
        4,
        &proto::Proposal {
            update: None,
            precondition: None,
            ..Default::default()
        },
        T0 + 60,
    );
    assert_eq!(outcome, ApplyOutcome::Applied { version: 4 });
    assert_eq!(
        events,
        vec![
            Event::Broadcast(entry_frame(4, 3, T0 + 60, &Update::default())),
            Event::Applied {
                version: 4,
                commit_time_us: T0 + 60,
            },
        ]
    );
    assert_eq!(r.file().to_vec(), b"help\0\0x");
}

#[test]
fn checkpoint_appended_after_every_n_entries() {
    let mut r = core(1 << 20, 3);
    assert_eq!(r.checkpoint(), None, "nothing applied yet");
    let mut all = Vec::new();
    for i in 1..=7u64 {
        let u = upd(vec![w(i, &[i as u8])]);
        let events = apply(&mut r, i, &u, T0 + i);
        let mut expected = vec![
            Event::Broadcast(entry_frame(i, i - 1, T0 + i, &u)),
            Event::Applied {
                version: i,
                commit_time_us: T0 + i,
            },
        ];
        if i % 3 == 0 {
            expected.push(Event::Broadcast(checkpoint_of(r.file())));
        }
        assert_eq!(events, expected, "entry {i}");
        all.extend(events);
    }
    // The checkpoint frame after entry 6 carries exactly the file at 6.
    let cps: Vec<_> = broadcasts(&all)
        .into_iter()
        .filter_map(|f| match decode(&f).kind {
            Some(Down::Checkpoint(c)) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(cps.len(), 2);
    assert_eq!((cps[0].version, cps[0].length), (3, 4));
    assert_eq!((cps[1].version, cps[1].length), (6, 7));
    let at6 = ChunkedFile::from_bytes(CS, MAX, &[0, 1, 2, 3, 4, 5, 6], 6).unwrap();
    assert_eq!(cps[1].root.as_ref(), at6.root().as_slice());

    // Entry 7 was applied since the last checkpoint: the timer produces one, then none.
    assert_eq!(
        r.checkpoint(),
        Some(Event::Broadcast(checkpoint_frame(7, 8, &r.file().root())))
    );
    assert_eq!(r.checkpoint(), None);
    assert_eq!(r.checkpoint(), None);

    // A timer checkpoint restarts the count: three more entries before the next automatic one.
    for i in 8..=9u64 {
        assert_eq!(apply(&mut r, i, &upd(vec![]), T0 + i).len(), 2);
    }
    assert_eq!(apply(&mut r, 10, &upd(vec![]), T0 + 10).len(), 3);
    assert_eq!(r.checkpoint(), None);
}

#[test]
fn failed_and_rejected_entries_do_not_count_towards_checkpoints() {
    let mut r = core(1 << 20, 2);
    let (outcome, events) =
        r.apply_committed(1, &guarded(&upd(vec![]), &Precondition::IfVersion(9)), T0);
    assert_eq!(outcome, ApplyOutcome::PreconditionFailed { version: 0 });
    assert_eq!(events, vec![]);
    let (outcome, events) = r.apply_committed(2, &proposal(&upd(vec![t(MAX + 1)])), T0);
    assert!(matches!(outcome, ApplyOutcome::Rejected { version: 0, .. }));
    assert_eq!(events, vec![]);
    assert_eq!(r.checkpoint(), None, "nothing was applied");

    assert_eq!(apply(&mut r, 3, &upd(vec![w(0, b"a")]), T0).len(), 2);
    let (outcome, events) =
        r.apply_committed(4, &guarded(&upd(vec![]), &Precondition::IfVersion(1)), T0);
    assert_eq!(outcome, ApplyOutcome::PreconditionFailed { version: 3 });
    assert_eq!(events, vec![]);
    let events = apply(&mut r, 5, &upd(vec![w(1, b"b")]), T0 + 5);
    assert_eq!(
        events,
        vec![
            Event::Broadcast(entry_frame(5, 3, T0 + 5, &upd(vec![w(1, b"b")]))),
            Event::Applied {
                version: 5,
                commit_time_us: T0 + 5,
            },
            Event::Broadcast(checkpoint_frame(5, 2, &r.file().root())),
        ]
    );
}

#[test]
fn if_version_precondition() {
    let mut r = core(1 << 20, 100);
    apply(&mut r, 1, &upd(vec![w(0, b"abcdef")]), T0);
    let before = (state(&r), r.file().to_vec(), r.retained_bytes());

    for wrong in [0, 2, 5] {
        let (outcome, events) = r.apply_committed(
            5,
            &guarded(&upd(vec![w(0, b"ZZ")]), &Precondition::IfVersion(wrong)),
            T0 + 5,
        );
        assert_eq!(outcome, ApplyOutcome::PreconditionFailed { version: 1 });
        assert_eq!(outcome.version(), 1);
        assert_eq!(events, vec![]);
        assert_eq!((state(&r), r.file().to_vec(), r.retained_bytes()), before);
        assert_eq!(r.commit_known(), 1);
        assert_eq!(r.last_commit_time_us(), T0);
    }

    let u = upd(vec![w(0, b"ZZ")]);
    let (outcome, events) = r.apply_committed(5, &guarded(&u, &Precondition::IfVersion(1)), T0 + 5);
    assert_eq!(outcome, ApplyOutcome::Applied { version: 5 });
    assert_eq!(
        events,
        vec![
            Event::Broadcast(entry_frame(5, 1, T0 + 5, &u)),
            Event::Applied {
                version: 5,
                commit_time_us: T0 + 5,
            },
        ]
    );
    assert_eq!(r.file().to_vec(), b"ZZcdef");
}

#[test]
fn if_range_hash_precondition() {
    let mut r = core(1 << 20, 100);
    apply(&mut r, 1, &upd(vec![w(0, b"abcdefghij")]), T0);
    let u = upd(vec![w(2, b"XY")]);

    // Mismatch: the hash of other bytes.
    let wrong = Precondition::IfRangeHash {
        offset: 2,
        len: 4,
        hash: *blake3::hash(b"cdeX").as_bytes(),
    };
    let before = (state(&r), r.file().to_vec());
    let (outcome, events) = r.apply_committed(2, &guarded(&u, &wrong), T0 + 2);
    assert_eq!(outcome, ApplyOutcome::PreconditionFailed { version: 1 });
    assert_eq!(events, vec![]);
    assert_eq!((state(&r), r.file().to_vec()), before);

    // A range past the end is hashed clamped to the end of the file.
    let clamped = Precondition::IfRangeHash {
        offset: 8,
        len: 100,
        hash: *blake3::hash(b"ij").as_bytes(),
    };
    let (outcome, events) = r.apply_committed(2, &guarded(&u, &clamped), T0 + 2);
    assert_eq!(outcome, ApplyOutcome::Applied { version: 2 });
    assert_eq!(
        events,
        vec![
            Event::Broadcast(entry_frame(2, 1, T0 + 2, &u)),
            Event::Applied {
                version: 2,
                commit_time_us: T0 + 2,
            },
        ]
    );

    // Match on the current content (spanning chunks 0..2).
    let right = Precondition::IfRangeHash {
        offset: 1,
        len: 5,
        hash: *blake3::hash(b"bXYef").as_bytes(),
    };
    let u3 = upd(vec![t(3)]);
    let (outcome, events) = r.apply_committed(3, &guarded(&u3, &right), T0 + 3);
    assert_eq!(outcome, ApplyOutcome::Applied { version: 3 });
    assert_eq!(broadcasts(&events), vec![entry_frame(3, 2, T0 + 3, &u3)]);
    assert_eq!(r.file().to_vec(), b"abX");
}

#[test]
fn malformed_preconditions_and_updates_are_rejected() {
    let mut r = core(1 << 20, 100);
    apply(&mut r, 1, &upd(vec![w(0, b"abc")]), T0);
    let before = (state(&r), r.file().to_vec(), r.retained_bytes());

    let bad_hash = proto::Proposal {
        update: Some((&upd(vec![w(0, b"x")])).into()),
        precondition: Some(proto::Precondition {
            kind: Some(proto::precondition::Kind::IfRangeHash(proto::RangeHash {
                offset: 0,
                len: 1,
                hash: Bytes::from_static(&[0; 5]),
            })),
        }),
        ..Default::default()
    };
    assert_eq!(
        r.apply_committed(2, &bad_hash, T0),
        (
            ApplyOutcome::Rejected {
                version: 1,
                reason: "range hash is 5 bytes, expected 32".into(),
            },
            vec![]
        )
    );

    let no_kind = proto::Proposal {
        update: Some((&upd(vec![w(0, b"x")])).into()),
        precondition: Some(proto::Precondition { kind: None }),
        ..Default::default()
    };
    assert_eq!(
        r.apply_committed(2, &no_kind, T0),
        (
            ApplyOutcome::Rejected {
                version: 1,
                reason: "precondition without a kind".into(),
            },
            vec![]
        )
    );

    let no_op = proto::Proposal {
        update: Some(proto::Update {
            ops: vec![
                proto::Op {
                    kind: Some(proto::op::Kind::Truncate(proto::Truncate { len: 0 })),
                },
                proto::Op { kind: None },
            ],
        }),
        precondition: None,
        ..Default::default()
    };
    assert_eq!(
        r.apply_committed(2, &no_op, T0),
        (
            ApplyOutcome::Rejected {
                version: 1,
                reason: "update op without a kind".into(),
            },
            vec![]
        )
    );
    assert_eq!((state(&r), r.file().to_vec(), r.retained_bytes()), before);
    assert_eq!(
        r.checkpoint(),
        Some(Event::Broadcast(checkpoint_of(r.file())))
    );
}

#[test]
fn update_over_max_len_is_rejected_atomically() {
    let mut r = core(1 << 20, 1);
    let events = apply(&mut r, 1, &upd(vec![w(0, b"0123456789")]), T0);
    assert_eq!(events.len(), 3, "entry, applied, checkpoint");
    let before = (state(&r), r.file().to_vec(), r.retained_bytes());

    // The first op alone would fit; the second overshoots: nothing applies.
    let u = upd(vec![w(0, b"ABCDEFGH"), w(60, b"12345")]);
    let (outcome, events) = r.apply_committed(2, &proposal(&u), T0 + 2);
    assert_eq!(
        outcome,
        ApplyOutcome::Rejected {
            version: 1,
            reason: "file would grow to 65 bytes, over the maximum of 64".into(),
        }
    );
    assert_eq!(events, vec![]);
    assert_eq!((state(&r), r.file().to_vec(), r.retained_bytes()), before);
    assert_eq!(r.commit_known(), 1);
    assert_eq!(r.last_commit_time_us(), T0);
    assert_eq!(r.checkpoint(), None, "the rejected entry does not count");

    // An intermediate length over the limit is rejected even if the final one fits.
    let u = upd(vec![t(MAX + 100), t(0)]);
    let (outcome, events) = r.apply_committed(3, &proposal(&u), T0 + 3);
    assert_eq!(
        outcome,
        ApplyOutcome::Rejected {
            version: 1,
            reason: "file would grow to 164 bytes, over the maximum of 64".into(),
        }
    );
    assert_eq!(events, vec![]);
    assert_eq!((state(&r), r.file().to_vec(), r.retained_bytes()), before);

    // Exactly max_len is fine, and the next entry chains from the last applied version.
    let u = upd(vec![w(MAX - 1, b"!")]);
    let events = apply(&mut r, 4, &u, T0 + 4);
    assert_eq!(events[0], Event::Broadcast(entry_frame(4, 1, T0 + 4, &u)));
    assert_eq!(r.file().len(), MAX);
}

#[test]
fn heartbeat_frame_carries_commit_known() {
    let mut r = core(1 << 20, 100);
    let path = vec!["core-a".to_string()];
    assert_eq!(
        r.heartbeat(T0, path.clone(), vec![]),
        heartbeat_with_path(0, T0, path.clone())
    );
    apply(&mut r, 3, &upd(vec![w(0, b"a")]), T0);
    assert_eq!(
        r.heartbeat(T0 + 9, path.clone(), vec![]),
        heartbeat_with_path(3, T0 + 9, path)
    );
}

#[test]
fn snapshot_frames_exact() {
    let (p, _) = parent_at_v4(100);
    let frames: Vec<Bytes> = snapshot_frames(p.file(), T0 + 4, &[]).collect();
    let expected = vec![
        frame(Down::SnapshotBegin(proto::SnapshotBegin {
            version: 4,
            length: 10,
            root: Bytes::copy_from_slice(&p.file().root()),
            chunk_size: CS,
            commit_time_unix_us: T0 + 4,
            chunk_hashes: p
                .file()
                .chunk_hashes()
                .iter()
                .map(|h| Bytes::copy_from_slice(h))
                .collect(),
            ..Default::default()
        })),
        frame(Down::SnapshotChunk(proto::SnapshotChunk {
            index: 0,
            data: Bytes::from_static(b"hell"),
        })),
        frame(Down::SnapshotChunk(proto::SnapshotChunk {
            index: 1,
            data: Bytes::from_static(b"o, w"),
        })),
        frame(Down::SnapshotChunk(proto::SnapshotChunk {
            index: 2,
            data: Bytes::from_static(b"or"),
        })),
        frame(Down::SnapshotEnd(proto::SnapshotEnd {})),
    ];
    assert_eq!(frames, expected);

    let empty = ChunkedFile::new(CS, MAX).unwrap();
    let frames: Vec<Bytes> = snapshot_frames(&empty, 0, &[]).collect();
    assert_eq!(frames.len(), 2, "begin and end only");
}

// ---------------------------------------------------------------------------------------------
// Child side: the subscription flow
// ---------------------------------------------------------------------------------------------

#[test]
fn full_subscription_flow_then_live_entries() {
    let (mut parent, _) = parent_at_v4(3);
    let mut child = relay();
    assert!(!child.is_synced());
    assert_eq!(
        plan(&child, &sub_at(0, &[])),
        Plan::Refuse("not synced yet".into())
    );

    let sub = child.subscribe("relay-1", "10.0.0.2:4433", false);
    assert_eq!(
        sub,
        proto::Subscribe {
            name: "relay-1".into(),
            have_version: 0,
            have_root: Bytes::new(),
            listen_addr: "10.0.0.2:4433".into(),
            have_chunks: vec![],
            ..Default::default()
        }
    );
    let file = match parent.plan_subscription(&sub) {
        SubscribePlan::Snapshot(p) => p.file,
        _ => panic!("an unsynced child needs a snapshot"),
    };
    assert_eq!(state_of(&file), state(&parent));

    assert_eq!(feed(&mut child, &ok_frame(false)), Ok(vec![]));
    let mut frames = snapshot_frames(&file, parent.last_commit_time_us(), &[]);
    let begin = frames.next().unwrap();
    assert_eq!(feed(&mut child, &begin), Ok(vec![]));
    let rest: Vec<Bytes> = frames.collect();
    let (end, chunks) = rest.split_last().unwrap();
    assert_eq!(chunks.len(), 3);
    for c in chunks {
        assert_eq!(feed(&mut child, c), Ok(vec![]));
        assert!(!child.is_synced());
        assert_eq!(
            child.file().version(),
            0,
            "nothing installed before the end"
        );
    }
    assert_eq!(
        feed(&mut child, end),
        Ok(vec![
            Event::Installed { version: 4 },
            Event::Applied {
                version: 4,
                commit_time_us: T0 + 4,
            },
        ])
    );
    assert!(child.is_synced());
    assert_eq!(state(&child), state(&parent));
    assert_eq!(child.file().to_vec(), b"hello, wor");
    assert_eq!(child.last_commit_time_us(), T0 + 4);
    assert_eq!(child.commit_known(), 4);
    assert_eq!(child.retained_bytes(), 0);

    // Live stream: entries 5, 6, 8 (with a checkpoint after 8, the third since 4's checkpoint),
    // then a heartbeat. Every frame is re-broadcast byte for byte.
    let updates = [
        (5, upd(vec![w(20, b"xy")])),
        (6, upd(vec![w(0, b"H")])),
        (8, upd(vec![t(12), w(3, b"LO")])),
    ];
    let mut live = Vec::new();
    for (i, u) in &updates {
        live.extend(broadcasts(&apply(&mut parent, *i, u, T0 + i)));
    }
    live.push(parent.heartbeat(T0 + 100, vec![], vec![]));
    assert_eq!(live.len(), 5, "3 entries, 1 checkpoint, 1 heartbeat");

    let mut child_out = Vec::new();
    let mut prev = 4;
    for (i, u) in &updates {
        let f = entry_frame(*i, prev, T0 + i, u);
        assert_eq!(live[child_out.len()], f);
        let events = feed_ok(&mut child, &f);
        assert_eq!(
            events,
            vec![
                Event::Broadcast(f.clone()),
                Event::Applied {
                    version: *i,
                    commit_time_us: T0 + i,
                },
            ]
        );
        child_out.push(f);
        prev = *i;
    }
    let cp = &live[3];
    assert_eq!(*cp, checkpoint_of(parent.file()));
    assert_eq!(
        feed(&mut child, cp),
        Ok(vec![
            Event::Broadcast(cp.clone()),
            Event::CheckpointVerified { version: 8 },
        ])
    );
    assert_eq!(
        feed(&mut child, &live[4]),
        Ok(vec![]),
        "heartbeats are per link: noted, not forwarded"
    );

    assert_eq!(state(&child), state(&parent));
    assert_eq!(child.file().to_vec(), b"HelLO, wor\0\0");
    assert_eq!(child.last_commit_time_us(), T0 + 8);
    assert_eq!(child.commit_known(), 8);
    // The child retains the frames it applied, so its own children can resume from it.
    assert_eq!(
        child.retained_bytes(),
        child_out.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    assert_eq!(
        plan(&child, &sub_at(4, &file.root())),
        Plan::Resume(child_out.clone())
    );
}

/// A relay receiving a transfer passes it on to a child of its own chunk by chunk: the
/// child's plan follows the transfer's version, each chunk is ready once verified here and
/// pending before, the installed file serves the rest, and the child ends at the same state.
#[test]
fn a_child_follows_its_parents_transfer_chunk_by_chunk() {
    let (core, _) = parent_at_v4(3);
    let mut mid = relay();
    let mut grand = relay();
    assert_eq!(
        plan(&mid, &sub_at(0, &[])),
        Plan::Refuse("not synced yet".into()),
        "nothing to follow before a transfer begins"
    );
    let mut frames = snapshot_frames(core.file(), core.last_commit_time_us(), &[]);
    begin_transfer(&mut mid, &frames.next().unwrap());
    let rest: Vec<Bytes> = frames.collect();
    let (end, chunks) = rest.split_last().unwrap();
    feed_ok(&mut mid, &chunks[0]);
    assert!(mid.can_follow());
    assert_eq!(plan(&mid, &sub_at(0, &[])), Plan::Follow { version: 4 });
    assert_eq!(
        plan(&mid, &sub_at(5, &[])),
        Plan::Refuse("not synced yet".into()),
        "a child ahead of the transfer is not offered it"
    );
    let p = match mid.plan_subscription(&grand.subscribe("g", "10.0.0.3:1", false)) {
        SubscribePlan::Follow(p) => p,
        _ => panic!("expected a follow"),
    };
    let hashes = core.file().chunk_hashes();
    assert_eq!(p.manifest, hashes);
    assert_eq!(p.lacking(&[]).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(
        matches!(mid.follow_chunk(4, 0, &hashes[0]), FollowChunk::Ready(d) if d == core.file().chunk(0).unwrap())
    );
    assert!(matches!(
        mid.follow_chunk(4, 1, &hashes[1]),
        FollowChunk::Pending
    ));
    assert!(matches!(
        mid.follow_chunk(3, 1, &hashes[1]),
        FollowChunk::Gone
    ));
    assert_eq!(feed(&mut grand, &ok_frame(false)), Ok(vec![]));
    assert_eq!(feed(&mut grand, &p.begin_frame()), Ok(vec![]));
    let chunk = |i: u64, d: Bytes| crate::wire::encode_chunk(i, d).concat();
    if let FollowChunk::Ready(d) = mid.follow_chunk(4, 0, &hashes[0]) {
        assert_eq!(feed(&mut grand, &chunk(0, d)), Ok(vec![]));
    }
    feed_ok(&mut mid, &chunks[1]);
    feed_ok(&mut mid, &chunks[2]);
    assert!(matches!(
        feed_ok(&mut mid, end)[0],
        Event::Installed { version: 4 }
    ));
    assert!(!mid.can_follow());
    let FollowChunk::Installed(file) = mid.follow_chunk(4, 1, &hashes[1]) else {
        panic!("the installed file serves the rest");
    };
    for i in 1..3 {
        assert_eq!(
            feed(&mut grand, &chunk(i, file.chunk(i).unwrap())),
            Ok(vec![])
        );
    }
    assert_eq!(
        feed(&mut grand, &snapshot_end_frame()),
        Ok(vec![
            Event::Installed { version: 4 },
            Event::Applied {
                version: 4,
                commit_time_us: T0 + 4,
            },
        ])
    );
    assert_eq!(state(&grand), state(&core));
}

fn state_of(f: &ChunkedFile) -> (u64, Hash) {
    (f.version(), f.root())
}

#[test]
fn resume_flow_with_retained_frames() {
    let (mut parent, _) = parent_at_v4(100);
    let mut child = streaming_child(&parent);
    child.upstream_lost();

    let f5 = entry_of(&apply(&mut parent, 5, &upd(vec![w(1, b"E")]), T0 + 5));
    let f7 = entry_of(&apply(&mut parent, 7, &upd(vec![t(2)]), T0 + 7));

    let sub = child.subscribe("relay-1", "a:1", false);
    assert_eq!(sub.have_version, 4);
    assert_eq!(sub.have_root.as_ref(), child.file().root().as_slice());
    assert_eq!(
        plan(&parent, &sub),
        Plan::Resume(vec![f5.clone(), f7.clone()])
    );

    assert_eq!(feed(&mut child, &ok_frame(true)), Ok(vec![]));
    assert_eq!(
        feed(&mut child, &f5),
        Ok(vec![
            Event::Broadcast(f5.clone()),
            Event::Applied {
                version: 5,
                commit_time_us: T0 + 5,
            },
        ])
    );
    assert_eq!(
        feed(&mut child, &f7),
        Ok(vec![
            Event::Broadcast(f7.clone()),
            Event::Applied {
                version: 7,
                commit_time_us: T0 + 7,
            },
        ])
    );
    assert_eq!(state(&child), state(&parent));
    assert_eq!(child.file().to_vec(), b"hE");
}

#[test]
fn three_level_chain_forwards_verbatim() {
    let (mut core_r, _) = parent_at_v4(2);
    let mut mid = streaming_child(&core_r);
    let mut leaf = relay();
    // The mid relay installed a snapshot: its window starts there, so the leaf needs one too.
    assert_eq!(plan(&mid, &sub_at(0, &[])), snapshot_plan(core_r.file()));
    assert_eq!(
        connect(&mid, &mut leaf, false),
        Ok(vec![
            Event::Installed { version: 4 },
            Event::Applied {
                version: 4,
                commit_time_us: T0 + 4,
            },
        ]),
        "the mid relay passes on the commit time it installed"
    );

    for i in 5..=9u64 {
        let events = apply(&mut core_r, i, &upd(vec![w(i, &[b'0' + i as u8])]), T0 + i);
        for f in broadcasts(&events) {
            let mid_out = feed_ok(&mut mid, &f);
            assert_eq!(mid_out[0], Event::Broadcast(f.clone()));
            for g in broadcasts(&mid_out) {
                assert_eq!(g, f);
                let leaf_out = feed_ok(&mut leaf, &g);
                assert_eq!(leaf_out[0], Event::Broadcast(f.clone()));
                assert_eq!(leaf_out[1..], mid_out[1..]);
            }
        }
    }
    assert_eq!(state(&leaf), state(&core_r));
    assert_eq!(state(&mid), state(&core_r));
}

#[test]
fn heartbeat_while_streaming_and_during_snapshot() {
    let (parent, _) = parent_at_v4(100);
    let mut child = relay();
    let _ = child.subscribe("c", "a:1", false);
    // Before SubscribeOk a heartbeat is unexpected.
    assert_eq!(
        feed(&mut child, &heartbeat_frame(9, T0)),
        Err(ReplicaError::Unexpected {
            frame: "heartbeat",
            state: "awaiting subscribe_ok",
        })
    );

    let _ = child.subscribe("c", "a:1", false);
    assert_eq!(feed(&mut child, &ok_frame(false)), Ok(vec![]));
    // Awaiting the snapshot: noted, not forwarded.
    assert_eq!(feed(&mut child, &heartbeat_frame(6, T0)), Ok(vec![]));
    assert_eq!(child.commit_known(), 6);
    let frames: Vec<Bytes> = snapshot_frames(parent.file(), T0 + 4, &[]).collect();
    for f in &frames[..2] {
        assert_eq!(feed(&mut child, f), Ok(vec![]));
    }
    // Mid-snapshot: noted, not forwarded, and the transfer goes on.
    assert_eq!(feed(&mut child, &heartbeat_frame(7, T0)), Ok(vec![]));
    assert_eq!(child.commit_known(), 7);
    for f in &frames[2..frames.len() - 1] {
        assert_eq!(feed(&mut child, f), Ok(vec![]));
    }
    assert_eq!(
        feed(&mut child, frames.last().unwrap()),
        Ok(vec![
            Event::Installed { version: 4 },
            Event::Applied {
                version: 4,
                commit_time_us: T0 + 4,
            },
        ])
    );
    assert_eq!(
        child.commit_known(),
        7,
        "installing version 4 keeps the known 7"
    );

    // Streaming: noted (heartbeats are per link), commit_known rises and never falls.
    let hb = heartbeat_frame(12, T0 + 1);
    assert_eq!(feed(&mut child, &hb), Ok(vec![]));
    assert_eq!(child.commit_known(), 12);
    let hb = heartbeat_frame(2, T0 + 2);
    assert_eq!(feed(&mut child, &hb), Ok(vec![]));
    assert_eq!(child.commit_known(), 12);
    assert_eq!(
        state(&child),
        state(&parent),
        "heartbeats do not touch the file"
    );
    let path: Vec<String> = vec!["core".into(), "mid".into(), "c".into()];
    assert_eq!(
        child.heartbeat(T0 + 3, path.clone(), vec![]),
        heartbeat_with_path(12, T0 + 3, path)
    );
    // A heartbeat naming a path is taken (the driver's overlay keeps the path); one that
    // contains the child is a cycle.
    let path: Vec<String> = vec!["core".into(), "mid".into()];
    assert_eq!(
        feed(&mut child, &heartbeat_with_path(12, T0 + 4, path.clone())),
        Ok(vec![])
    );
    let cyclic: Vec<String> = vec!["core".into(), "c".into(), "mid".into()];
    assert_eq!(
        feed(&mut child, &heartbeat_with_path(12, T0 + 5, cyclic.clone())),
        Err(ReplicaError::Cycle(cyclic))
    );
}

// ---------------------------------------------------------------------------------------------
// Child side: errors
// ---------------------------------------------------------------------------------------------

#[test]
fn entry_not_following_current_version_is_a_gap() {
    let (mut parent, _) = parent_at_v4(100);
    let mut child = streaming_child(&parent);
    let f5 = entry_of(&apply(&mut parent, 5, &upd(vec![w(0, b"5")]), T0 + 5));
    let f6 = entry_of(&apply(&mut parent, 6, &upd(vec![w(0, b"6")]), T0 + 6));
    let before = (state(&child), child.file().to_vec(), child.retained_bytes());

    // Skipped entry 5.
    let err = feed(&mut child, &f6).unwrap_err();
    assert_eq!(err, ReplicaError::Gap { have: 4, prev: 5 });
    assert!(!err.needs_full_resync());
    assert_eq!(err.label(), "gap");
    assert_eq!(
        err.to_string(),
        "stream gap: holding version 4, entry follows 5"
    );
    assert_eq!(
        (state(&child), child.file().to_vec(), child.retained_bytes()),
        before
    );

    // After an error the stream is dead until the next subscribe.
    assert_eq!(
        feed(&mut child, &f5),
        Err(ReplicaError::Unexpected {
            frame: "entry",
            state: "idle",
        })
    );

    // A repeated entry (prev 2 while at 4) is a gap too.
    child.upstream_lost();
    let _ = child.subscribe("c", "a:1", false);
    assert_eq!(feed(&mut child, &ok_frame(true)), Ok(vec![]));
    let old = entry_frame(4, 2, T0, &upd(vec![t(10)]));
    assert_eq!(
        feed(&mut child, &old),
        Err(ReplicaError::Gap { have: 4, prev: 2 })
    );

    // prev matches but the version does not move forward.
    for v in [3, 4] {
        let _ = child.subscribe("c", "a:1", false);
        assert_eq!(feed(&mut child, &ok_frame(true)), Ok(vec![]));
        let bad = entry_frame(v, 4, T0, &upd(vec![w(0, b"x")]));
        assert_eq!(
            feed(&mut child, &bad),
            Err(ReplicaError::Gap { have: 4, prev: 4 })
        );
    }
    assert_eq!(
        (state(&child), child.file().to_vec(), child.retained_bytes()),
        before
    );

    // Resubscribing resumes with exactly what was missed.
    child.upstream_lost();
    assert_eq!(
        connect(&parent, &mut child, false).map(|e| broadcasts(&e)),
        Ok(vec![f5, f6])
    );
    assert_eq!(state(&child), state(&parent));
}

#[test]
fn entry_the_child_cannot_apply_is_a_file_error() {
    let (parent, _) = parent_at_v4(100);
    let mut child = streaming_child(&parent);
    let before = (state(&child), child.file().to_vec());
    let too_big = entry_frame(5, 4, T0, &upd(vec![w(MAX, b"!")]));
    let err = feed(&mut child, &too_big).unwrap_err();
    assert_eq!(
        err,
        ReplicaError::File(FileError::TooLarge {
            len: MAX + 1,
            max: MAX,
        })
    );
    assert!(err.needs_full_resync());
    assert!(
        !child.is_synced(),
        "a diverged node must not serve children"
    );
    assert_eq!(err.label(), "file");
    assert_eq!((state(&child), child.file().to_vec()), before);

    let _ = child.subscribe("c", "a:1", false);
    assert_eq!(feed(&mut child, &ok_frame(true)), Ok(vec![]));
    let no_op = frame(Down::Entry(proto::Entry {
        version: 5,
        prev_version: 4,
        commit_time_unix_us: T0,
        update: Some(proto::Update {
            ops: vec![proto::Op { kind: None }],
        }),
    }));
    assert_eq!(
        feed(&mut child, &no_op),
        Err(ReplicaError::File(FileError::MissingOp))
    );
    assert_eq!((state(&child), child.file().to_vec()), before);
}

#[test]
fn checkpoint_with_wrong_root_or_length_is_divergence() {
    let (parent, _) = parent_at_v4(100);
    let mut child = streaming_child(&parent);
    let wrong = [7u8; 32];
    let err = feed(&mut child, &checkpoint_frame(4, 10, &wrong)).unwrap_err();
    assert_eq!(
        err,
        ReplicaError::Diverged {
            version: 4,
            expected: hash_hex(&wrong),
            got: parent.file().root_hex(),
        }
    );
    assert!(err.needs_full_resync());
    assert_eq!(err.label(), "diverged");
    assert_eq!(
        err.to_string(),
        format!(
            "diverged at version 4: parent root {}, local root {}",
            hash_hex(&wrong),
            parent.file().root_hex()
        )
    );

    // Right root, wrong length.
    let _ = child.subscribe("c", "a:1", false);
    assert_eq!(feed(&mut child, &ok_frame(true)), Ok(vec![]));
    let root = parent.file().root();
    assert_eq!(
        feed(&mut child, &checkpoint_frame(4, 11, &root)),
        Err(ReplicaError::Diverged {
            version: 4,
            expected: hash_hex(&root),
            got: hash_hex(&root),
        })
    );

    // A root that is not even 32 bytes.
    let _ = child.subscribe("c", "a:1", false);
    assert_eq!(feed(&mut child, &ok_frame(true)), Ok(vec![]));
    assert_eq!(
        feed(&mut child, &checkpoint_frame(4, 10, &[1, 2, 3])),
        Err(ReplicaError::Diverged {
            version: 4,
            expected: "010203".into(),
            got: hash_hex(&root),
        })
    );

    // The right checkpoint verifies.
    let _ = child.subscribe("c", "a:1", false);
    assert_eq!(feed(&mut child, &ok_frame(true)), Ok(vec![]));
    let good = checkpoint_of(parent.file());
    assert_eq!(
        feed(&mut child, &good),
        Ok(vec![
            Event::Broadcast(good.clone()),
            Event::CheckpointVerified { version: 4 },
        ])
    );

    // After divergence the child asks for a full transfer, even when synced.
    let full = child.subscribe("c", "a:1", true);
    assert_eq!((full.have_version, full.have_root.len()), (0, 0));
    assert_eq!(plan(&parent, &full), snapshot_plan(parent.file()));
}

#[test]
fn checkpoint_for_another_version_is_out_of_step() {
    let (parent, _) = parent_at_v4(100);
    let mut child = streaming_child(&parent);
    let root = parent.file().root();
    for v in [2, 5] {
        let _ = child.subscribe("c", "a:1", false);
        assert_eq!(feed(&mut child, &ok_frame(true)), Ok(vec![]));
        let err = feed(&mut child, &checkpoint_frame(v, 10, &root)).unwrap_err();
        assert_eq!(
            err,
            ReplicaError::CheckpointOutOfStep {
                checkpoint: v,
                have: 4,
            }
        );
        assert!(!err.needs_full_resync());
        assert_eq!(err.label(), "checkpoint_out_of_step");
    }
    // A checkpoint is only meaningful while streaming.
    let _ = child.subscribe("c", "a:1", false);
    assert_eq!(
        feed(&mut child, &checkpoint_of(parent.file())),
        Err(ReplicaError::Unexpected {
            frame: "checkpoint",
            state: "awaiting subscribe_ok",
        })
    );
}

#[test]
fn frames_out_of_order_are_unexpected() {
    let (parent, _) = parent_at_v4(100);
    let entry = entry_frame(1, 0, T0, &upd(vec![w(0, b"x")]));
    let snaps: Vec<Bytes> = snapshot_frames(parent.file(), T0, &[]).collect();
    let empty = wire::encode(&proto::Downstream { kind: None });

    let mut c = relay();
    // Never subscribed.
    assert_eq!(
        feed(&mut c, &entry),
        Err(ReplicaError::Unexpected {
            frame: "entry",
            state: "idle",
        })
    );
    assert_eq!(
        feed(&mut c, &ok_frame(false)),
        Err(ReplicaError::Unexpected {
            frame: "subscribe_ok",
            state: "idle",
        })
    );

    // Entry before SubscribeOk.
    let _ = c.subscribe("c", "a:1", false);
    let err = feed(&mut c, &entry).unwrap_err();
    assert_eq!(
        err,
        ReplicaError::Unexpected {
            frame: "entry",
            state: "awaiting subscribe_ok",
        }
    );
    assert!(!err.needs_full_resync());
    assert_eq!(err.label(), "unexpected_frame");
    assert_eq!(
        err.to_string(),
        "unexpected entry frame while awaiting subscribe_ok"
    );

    let expect = |c: &mut Replica, f: &Bytes, frame: &'static str, state: &'static str| {
        assert_eq!(
            feed(c, f),
            Err(ReplicaError::Unexpected { frame, state }),
            "{frame} while {state}"
        );
    };
    let _ = c.subscribe("c", "a:1", false);
    expect(&mut c, &empty, "empty", "awaiting subscribe_ok");
    let _ = c.subscribe("c", "a:1", false);
    expect(&mut c, &snaps[0], "snapshot_begin", "awaiting subscribe_ok");

    // Awaiting a snapshot: entries, chunks and ends are out of order.
    for (f, name) in [
        (&entry, "entry"),
        (&snaps[1], "snapshot_chunk"),
        (snaps.last().unwrap(), "snapshot_end"),
        (&ok_frame(false), "subscribe_ok"),
    ] {
        let _ = c.subscribe("c", "a:1", false);
        assert_eq!(feed(&mut c, &ok_frame(false)), Ok(vec![]));
        expect(&mut c, f, name, "awaiting snapshot");
    }

    // Receiving a snapshot: entries and a second begin are out of order.
    for (f, name) in [(&entry, "entry"), (&snaps[0], "snapshot_begin")] {
        let _ = c.subscribe("c", "a:1", false);
        assert_eq!(feed(&mut c, &ok_frame(false)), Ok(vec![]));
        assert_eq!(feed(&mut c, &snaps[0]), Ok(vec![]));
        expect(&mut c, f, name, "receiving snapshot");
    }
    assert!(!c.is_synced());
    assert_eq!(c.file().version(), 0);

    // Streaming: snapshot frames and a second SubscribeOk are out of order.
    let mut s = streaming_child(&parent);
    for (f, name) in [
        (&snaps[0], "snapshot_begin"),
        (&snaps[1], "snapshot_chunk"),
        (snaps.last().unwrap(), "snapshot_end"),
        (&ok_frame(true), "subscribe_ok"),
        (&empty, "empty"),
    ] {
        let _ = s.subscribe("c", "a:1", false);
        assert_eq!(feed(&mut s, &ok_frame(true)), Ok(vec![]));
        expect(&mut s, f, name, "streaming");
    }

    // upstream_lost stops the stream.
    let _ = s.subscribe("c", "a:1", false);
    assert_eq!(feed(&mut s, &ok_frame(true)), Ok(vec![]));
    s.upstream_lost();
    expect(&mut s, &heartbeat_frame(1, 1), "heartbeat", "idle");
}

#[test]
fn refused_in_any_state() {
    let (parent, _) = parent_at_v4(100);
    let mut c = relay();
    let _ = c.subscribe("c", "a:1", false);
    let err = feed(&mut c, &refused_frame("not synced yet")).unwrap_err();
    assert_eq!(err, ReplicaError::Refused("not synced yet".into()));
    assert!(!err.needs_full_resync());
    assert_eq!(err.label(), "refused");
    assert_eq!(err.to_string(), "parent refused: not synced yet");

    // Also mid-snapshot and while streaming.
    let _ = c.subscribe("c", "a:1", false);
    assert_eq!(feed(&mut c, &ok_frame(false)), Ok(vec![]));
    assert_eq!(
        feed(
            &mut c,
            &snapshot_frames(parent.file(), 0, &[]).next().unwrap()
        ),
        Ok(vec![])
    );
    assert_eq!(
        feed(&mut c, &refused_frame("shutting down")),
        Err(ReplicaError::Refused("shutting down".into()))
    );
    let mut s = streaming_child(&parent);
    assert_eq!(
        feed(&mut s, &refused_frame("")),
        Err(ReplicaError::Refused(String::new()))
    );

    // An unsynced parent's refusal reaches the child as this error.
    let mut unsynced = relay();
    let mut c = relay();
    assert_eq!(
        connect(&unsynced, &mut c, false),
        Err(ReplicaError::Refused("not synced yet".into()))
    );
    // ...until the parent syncs.
    let _ = connect(&parent, &mut unsynced, false).unwrap();
    assert_eq!(
        connect(&unsynced, &mut c, false).map(|e| e.len()),
        Ok(2),
        "installed + applied"
    );
    assert_eq!(state(&c), state(&parent));
}

#[test]
fn corrupted_snapshot_chunk_is_refused_against_the_manifest() {
    let (parent, _) = parent_at_v4(100);
    let mut frames: Vec<Bytes> = snapshot_frames(parent.file(), T0, &[]).collect();
    // Same length, one byte changed: the manifest catches it at that chunk.
    frames[2] = frame(Down::SnapshotChunk(proto::SnapshotChunk {
        index: 1,
        data: Bytes::from_static(b"O, w"),
    }));
    let mut c = relay();
    let _ = c.subscribe("c", "a:1", false);
    assert_eq!(feed(&mut c, &ok_frame(false)), Ok(vec![]));
    assert_eq!(feed(&mut c, &frames[0]), Ok(vec![]));
    assert_eq!(feed(&mut c, &frames[1]), Ok(vec![]));
    let err = feed(&mut c, &frames[2]).unwrap_err();
    assert_eq!(err, ReplicaError::BadChunk { index: 1 });
    assert!(!c.is_synced());
    assert_eq!(c.file().version(), 0);
    assert!(c.file().is_empty());

    // Without a manifest (an older sender), only the root check at the end can catch it.
    let mut begin: proto::Downstream = decode(&frames[0]);
    if let Some(Down::SnapshotBegin(b)) = begin.kind.as_mut() {
        b.chunk_hashes.clear();
    }
    let mut c = relay();
    let _ = c.subscribe("c", "a:1", false);
    assert_eq!(feed(&mut c, &ok_frame(false)), Ok(vec![]));
    assert_eq!(feed(&mut c, &frame(begin.kind.unwrap())), Ok(vec![]));
    for f in &frames[1..frames.len() - 1] {
        assert_eq!(feed(&mut c, f), Ok(vec![]));
    }
    let corrupt = ChunkedFile::from_bytes(CS, MAX, b"hellO, wor", 4).unwrap();
    let err = feed(&mut c, frames.last().unwrap()).unwrap_err();
    assert_eq!(
        err,
        ReplicaError::File(FileError::RootMismatch {
            expected: parent.file().root_hex(),
            got: corrupt.root_hex(),
        })
    );
    assert!(err.needs_full_resync());

    // A retry with the right frames installs.
    c.upstream_lost();
    assert!(connect(&parent, &mut c, true).is_ok());
    assert_eq!(state(&c), state(&parent));
}

#[test]
fn chunks_verified_before_a_bad_one_are_kept_for_the_next_source() {
    let (parent, _) = parent_at_v4(100);
    let good: Vec<Bytes> = snapshot_frames(parent.file(), T0, &[]).collect();
    let chunks = parent.file().chunk_count() as usize;
    assert!(chunks >= 3, "{chunks}");
    let mut bad = good.clone();
    bad[3] = frame(Down::SnapshotChunk(proto::SnapshotChunk {
        index: 2,
        data: Bytes::from_static(b"xxxx"),
    }));
    let mut c = relay();
    let _ = c.subscribe("c", "a:1", false);
    assert_eq!(feed(&mut c, &ok_frame(false)), Ok(vec![]));
    for f in &bad[..3] {
        assert_eq!(feed(&mut c, f), Ok(vec![]));
    }
    assert_eq!(
        feed(&mut c, &bad[3]).unwrap_err(),
        ReplicaError::BadChunk { index: 2 }
    );
    c.upstream_lost();
    assert_eq!(c.salvaged_bytes(), 2 * u64::from(CS));

    // The next source is told about chunks 0 and 1 and sends only the rest.
    let sub = c.subscribe("c", "a:1", false);
    let hashes = parent.file().chunk_hashes();
    assert_eq!(sub.have_chunks.len(), chunks);
    assert_eq!(&sub.have_chunks[0][..], &hashes[0][..]);
    assert_eq!(&sub.have_chunks[1][..], &hashes[1][..]);
    assert!(sub.have_chunks[2].is_empty());
    let frames: Vec<Bytes> = snapshot_frames(parent.file(), T0, &sub.have_chunks).collect();
    assert_eq!(
        frames.len(),
        chunks - 2 + 2,
        "begin, the chunks from 2 on, end"
    );
    assert_eq!(feed(&mut c, &ok_frame(false)), Ok(vec![]));
    for f in &frames[..frames.len() - 1] {
        assert_eq!(feed(&mut c, f), Ok(vec![]));
    }
    assert!(feed(&mut c, frames.last().unwrap()).is_ok());
    assert_eq!(state(&c), state(&parent));
    assert_eq!(c.file().to_vec(), parent.file().to_vec());
    assert_eq!(c.salvaged_bytes(), 0, "released once installed");
}

#[test]
fn a_diff_transfer_sends_only_the_chunks_the_child_lacks() {
    let (parent, _) = parent_at_v4(100);
    // The child holds the same content except chunk 1.
    let mut bytes = parent.file().to_vec();
    bytes[5] ^= 0xff;
    let mut c = relay();
    let _ = c.seed(ChunkedFile::from_bytes(CS, MAX, &bytes, 0).unwrap(), None);
    let sub = c.subscribe("c", "a:1", false);
    assert_eq!(sub.have_version, 0);
    assert_eq!(sub.have_chunks.len() as u64, c.file().chunk_count());
    let frames: Vec<Bytes> = snapshot_frames(parent.file(), T0, &sub.have_chunks).collect();
    assert_eq!(frames.len(), 3, "begin, the one differing chunk, end");
    assert_eq!(feed(&mut c, &ok_frame(false)), Ok(vec![]));
    for f in &frames[..2] {
        assert_eq!(feed(&mut c, f), Ok(vec![]));
    }
    assert!(feed(&mut c, &frames[2]).is_ok());
    assert_eq!(state(&c), state(&parent));
    assert_eq!(c.file().to_vec(), parent.file().to_vec());
}

#[test]
fn malformed_snapshot_chunks_fail_at_put_chunk() {
    let (parent, _) = parent_at_v4(100);
    let frames: Vec<Bytes> = snapshot_frames(parent.file(), T0, &[]).collect();
    let start = |c: &mut Replica| begin_transfer(c, &frames[0]);
    let chunk = |index: u64, data: &'static [u8]| {
        frame(Down::SnapshotChunk(proto::SnapshotChunk {
            index,
            data: Bytes::from_static(data),
        }))
    };
    let mut c = relay();

    start(&mut c);
    assert_eq!(
        feed(&mut c, &chunk(2, b"orX")),
        Err(ReplicaError::BadChunk { index: 2 })
    );
    start(&mut c);
    assert_eq!(
        feed(&mut c, &chunk(3, b"")),
        Err(ReplicaError::File(FileError::ChunkOutOfRange {
            index: 3,
            count: 3,
        }))
    );
    // A chunk missing at the end of the push leaves the transfer waiting for it.
    start(&mut c);
    assert_eq!(feed(&mut c, &frames[1]), Ok(vec![]));
    assert_eq!(feed(&mut c, &frames[3]), Ok(vec![]));
    assert_eq!(feed(&mut c, frames.last().unwrap()), Ok(vec![]));
    assert!(c.snapshot_waiting());
    assert_eq!(c.snapshot_wanted().unwrap().1, vec![1]);
    // A bad root length or an oversized file is refused at the begin.
    let begin = |root: &[u8], length: u64, chunk_size: u32| {
        frame(Down::SnapshotBegin(proto::SnapshotBegin {
            version: 4,
            length,
            root: Bytes::copy_from_slice(root),
            chunk_size,
            commit_time_unix_us: T0,
            ..Default::default()
        }))
    };
    for (f, e) in [
        (begin(&[0; 31], 10, CS), FileError::BadHash { len: 31 }),
        (
            begin(&[0; 32], MAX + 1, CS),
            FileError::TooLarge {
                len: MAX + 1,
                max: MAX,
            },
        ),
        (begin(&[0; 32], 10, 3), FileError::BadChunkSize(3)),
    ] {
        let _ = c.subscribe("c", "a:1", false);
        assert_eq!(feed(&mut c, &ok_frame(false)), Ok(vec![]));
        assert_eq!(feed(&mut c, &f), Err(ReplicaError::File(e)));
    }
    assert!(!c.is_synced());
    assert_eq!(c.file().version(), 0);
}

// ---------------------------------------------------------------------------------------------
// Parent side: plan_subscription
// ---------------------------------------------------------------------------------------------

#[test]
fn plan_refuses_when_not_synced_or_behind() {
    let r = relay();
    assert_eq!(
        plan(&r, &sub_at(0, &[])),
        Plan::Refuse("not synced yet".into())
    );
    let root = r.file().root();
    assert_eq!(
        plan(&r, &sub_at(0, &root)),
        Plan::Refuse("not synced yet".into())
    );

    let (p, _) = parent_at_v4(100);
    assert_eq!(
        plan(&p, &sub_at(7, &[1; 32])),
        Plan::Refuse("behind the child: at version 4, child holds 7".into())
    );
    assert_eq!(
        plan(&p, &sub_at(5, &p.file().root())),
        Plan::Refuse("behind the child: at version 4, child holds 5".into())
    );
}

#[test]
fn plan_resumes_from_the_window() {
    let mut p = core(1 << 20, 100);
    let base = state(&p);
    let mut states = vec![base];
    let mut frames = Vec::new();
    for i in 1..=4u64 {
        frames.push(entry_of(&apply(
            &mut p,
            2 * i,
            &upd(vec![w(i, b"ab")]),
            T0 + i,
        )));
        states.push(state(&p));
    }
    assert_eq!(
        p.retained_bytes(),
        frames.iter().map(|f| f.len() as u64).sum::<u64>()
    );

    // At the parent's exact position: nothing to send.
    assert_eq!(plan(&p, &sub_at(8, &p.file().root())), Plan::Resume(vec![]));
    // At a retained entry: exactly the frames after it.
    for (k, (v, root)) in states.iter().enumerate().skip(1) {
        assert_eq!(
            plan(&p, &sub_at(*v, root)),
            Plan::Resume(frames[k..].to_vec())
        );
    }
    // At the window's base (the empty file at version 0): everything retained.
    assert_eq!(plan(&p, &sub_at(0, &base.1)), Plan::Resume(frames.clone()));

    // A known version with the wrong root, a root of another version, a short root, no root.
    let snap = snapshot_plan(p.file());
    assert_eq!(plan(&p, &sub_at(4, &states[1].1)), snap);
    assert_eq!(plan(&p, &sub_at(8, &states[3].1)), snap);
    assert_eq!(plan(&p, &sub_at(8, &p.file().root()[..31])), snap);
    assert_eq!(plan(&p, &sub_at(0, &[])), snap);
    // A version between two entries (3 was never a version here).
    assert_eq!(plan(&p, &sub_at(3, &states[1].1)), snap);
    // A full subscription always gets the snapshot.
    let mut c = streaming_child(&p);
    assert_eq!(state(&c), state(&p));
    let full = c.subscribe("c", "a:1", true);
    assert_eq!(
        full,
        proto::Subscribe {
            name: "c".into(),
            have_version: 0,
            have_root: Bytes::new(),
            listen_addr: "a:1".into(),
            have_chunks: c
                .file()
                .chunk_hashes()
                .iter()
                .map(|h| Bytes::copy_from_slice(h))
                .collect(),
            ..Default::default()
        }
    );
    assert_eq!(plan(&p, &full), snap);
    let normal = c.subscribe("c", "a:1", false);
    assert_eq!(normal.have_version, 8);
    assert_eq!(normal.have_root.as_ref(), p.file().root().as_slice());
    assert_eq!(plan(&p, &normal), Plan::Resume(vec![]));
}

#[test]
fn plan_snapshots_when_evicted_from_the_window() {
    // Every frame but the first (whose prev_version 0 is not encoded) has the same length, so
    // retain_bytes of 2.5 frames keeps the newest two.
    let u = |i: u64| upd(vec![w(i, b"abcd")]);
    let len = entry_frame(2, 1, T0, &u(2)).len() as u64;
    let mut p = core(2 * len + len / 2, 100);
    let mut states = vec![state(&p)];
    let mut frames = Vec::new();
    for i in 1..=5u64 {
        let f = entry_of(&apply(&mut p, i, &u(i), T0));
        let expected_len = if i == 1 { len - 2 } else { len };
        assert_eq!(f.len() as u64, expected_len);
        frames.push(f);
        states.push(state(&p));
        let kept = &frames[frames.len().saturating_sub(2)..];
        assert_eq!(
            p.retained_bytes(),
            kept.iter().map(|f| f.len() as u64).sum::<u64>()
        );
    }
    let snap = snapshot_plan(p.file());
    assert_eq!(plan(&p, &sub_at(5, &states[5].1)), Plan::Resume(vec![]));
    assert_eq!(
        plan(&p, &sub_at(4, &states[4].1)),
        Plan::Resume(vec![frames[4].clone()])
    );
    // The base moved to the last evicted entry.
    assert_eq!(
        plan(&p, &sub_at(3, &states[3].1)),
        Plan::Resume(frames[3..].to_vec())
    );
    for (v, root) in &states[..3] {
        assert_eq!(plan(&p, &sub_at(*v, root)), snap, "state {v}");
    }

    // retain_bytes 0 still keeps the newest entry.
    let mut q = core(0, 100);
    let mut qstates = vec![state(&q)];
    let mut qframes = Vec::new();
    for i in 1..=3u64 {
        qframes.push(entry_of(&apply(&mut q, i, &u(i), T0)));
        qstates.push(state(&q));
        assert_eq!(q.retained_bytes(), qframes[i as usize - 1].len() as u64);
    }
    assert_eq!(
        plan(&q, &sub_at(2, &qstates[2].1)),
        Plan::Resume(vec![qframes[2].clone()])
    );
    assert_eq!(plan(&q, &sub_at(1, &states[1].1)), snapshot_plan(q.file()));
}

#[test]
fn install_resets_the_window() {
    let mut p = core(1 << 20, 2);
    let mut states = vec![state(&p)];
    for i in 1..=3u64 {
        apply(&mut p, i, &upd(vec![w(0, &[i as u8])]), T0 + i);
        states.push(state(&p));
    }
    let snapshot = ChunkedFile::from_bytes(CS, MAX, b"installed", 10).unwrap();
    assert_eq!(
        p.install(snapshot.clone()),
        vec![Event::Installed { version: 10 }]
    );
    assert_eq!(p.retained_bytes(), 0);
    assert_eq!(p.commit_known(), 10);
    assert_eq!(state(&p), state_of(&snapshot));
    for (v, root) in &states {
        assert_eq!(plan(&p, &sub_at(*v, root)), snapshot_plan(&snapshot));
    }
    assert_eq!(
        plan(&p, &sub_at(10, &snapshot.root())),
        Plan::Resume(vec![])
    );
    let f = entry_of(&apply(&mut p, 11, &upd(vec![t(2)]), T0 + 11));
    assert_eq!(f, entry_frame(11, 10, T0 + 11, &upd(vec![t(2)])));
    assert_eq!(
        plan(&p, &sub_at(10, &snapshot.root())),
        Plan::Resume(vec![f])
    );

    // A relay can be installed too (e.g. from a local copy) and then serves.
    let mut r = relay();
    assert_eq!(
        r.install(snapshot.clone()),
        vec![Event::Installed { version: 10 }]
    );
    assert!(r.is_synced());
    assert_eq!(
        plan(&r, &sub_at(10, &snapshot.root())),
        Plan::Resume(vec![])
    );
}

// ---------------------------------------------------------------------------------------------
// Property: a child subscribing at any point converges on the parent
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Step {
    /// Raft indices skipped before this entry (blank/membership entries), 0..=2.
    skip: u64,
    ops: Vec<Op>,
    /// 0: no precondition, 1: IfVersion(current), 2: IfVersion(wrong), 3: a timer checkpoint
    /// after the entry, 4: a heartbeat after the entry.
    extra: u8,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..36, prop::collection::vec(any::<u8>(), 0..9)).prop_map(|(offset, d)| {
            Op::Write {
                offset,
                data: Bytes::from(d),
            }
        }),
        1 => (0u64..44).prop_map(|len| Op::Truncate { len }),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    (0u64..=2, prop::collection::vec(op_strategy(), 0..4), 0u8..6)
        .prop_map(|(skip, ops, extra)| Step { skip, ops, extra })
}

/// The expected content after `u`, or None if some length would exceed `max`.
fn model_apply(model: &[u8], u: &Update, max: u64, cs: u32) -> Option<Vec<u8>> {
    let mut m = model.to_vec();
    let chunks = |len: usize| (len as u64).div_ceil(u64::from(cs));
    let mut grown = 0;
    for op in &u.ops {
        let before = chunks(m.len());
        match op {
            Op::Write { offset, data } => {
                let end = offset + data.len() as u64;
                if end.max(m.len() as u64) > max {
                    return None;
                }
                let (o, e) = (*offset as usize, end as usize);
                if m.len() < e {
                    m.resize(e, 0);
                }
                m[o..e].copy_from_slice(data);
            }
            Op::Truncate { len } => {
                if *len > max {
                    return None;
                }
                m.resize(*len as usize, 0);
            }
        }
        grown += chunks(m.len()).saturating_sub(before);
    }
    if grown > max.div_ceil(u64::from(cs)) {
        return None;
    }
    Some(m)
}

/// What a child must answer to a frame it follows in step with the parent.
fn expected_child_events(f: &Bytes) -> Vec<Event> {
    let mut out = vec![Event::Broadcast(f.clone())];
    match decode(f).kind {
        Some(Down::Entry(e)) => out.push(Event::Applied {
            version: e.version,
            commit_time_us: e.commit_time_unix_us,
        }),
        Some(Down::Checkpoint(c)) => out.push(Event::CheckpointVerified { version: c.version }),
        Some(Down::Heartbeat(_)) => return vec![],
        other => panic!("unexpected broadcast {other:?}"),
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn prop_child_converges_on_parent(
        chunk_size in prop::sample::select(vec![1u32, 2, 4, 8, 16]),
        retain_bytes in 0u64..300,
        checkpoint_every in 1u32..5,
        steps in prop::collection::vec(step_strategy(), 0..30),
        points in (0usize..=30, 0usize..=30, 0usize..=30),
        full in any::<bool>(),
    ) {
        let max = 40;
        let mk = |synced| {
            Replica::unchecked(
                ReplicaConfig { chunk_size, max_len: max, retain_bytes, checkpoint_every },
                synced,
            )
        };
        let mut parent = mk(true);
        let mut child = mk(false);
        let n = steps.len();
        // The child subscribes first at `a`, loses its parent at `b` and resubscribes at `c`.
        let mut p = [points.0.min(n), points.1.min(n), points.2.min(n)];
        p.sort_unstable();
        let [a, b, c] = p;

        let mut model = Vec::new();
        let mut index = 0;
        let mut now = T0;
        let mut connected = false;
        for i in 0..=n {
            if i == a {
                let events = connect(&parent, &mut child, false).unwrap();
                prop_assert_eq!(
                    events,
                    vec![
                        Event::Installed { version: parent.file().version() },
                        Event::Applied {
                            version: parent.file().version(),
                            commit_time_us: parent.last_commit_time_us(),
                        },
                    ]
                );
                connected = true;
            }
            if i == b {
                child.upstream_lost();
                connected = false;
            }
            if i == c {
                let sub = child.subscribe("c", "a:1", full);
                let was_resume = matches!(parent.plan_subscription(&sub), SubscribePlan::Resume(_));
                prop_assert!(!(full && was_resume), "a full subscription resumed");
                let events = connect(&parent, &mut child, full);
                prop_assert!(events.is_ok(), "resubscribe: {:?}", events);
                prop_assert_eq!(state(&child), state(&parent));
                connected = true;
            }
            let Some(step) = steps.get(i) else {
                break;
            };
            index += 1 + step.skip;
            now += 17;
            let u = upd(step.ops.clone());
            let current = parent.file().version();
            let prop = match step.extra {
                1 => guarded(&u, &Precondition::IfVersion(current)),
                2 => guarded(&u, &Precondition::IfVersion(current + 1)),
                _ => proposal(&u),
            };
            let (outcome, mut events) = parent.apply_committed(index, &prop, now);
            match (step.extra, model_apply(&model, &u, max, chunk_size)) {
                (2, _) => {
                    prop_assert_eq!(outcome, ApplyOutcome::PreconditionFailed { version: current });
                    prop_assert_eq!(&events, &vec![]);
                }
                (_, None) => {
                    let rejected =
                        matches!(outcome, ApplyOutcome::Rejected { version, .. } if version == current);
                    prop_assert!(rejected, "not rejected: {:?}", outcome);
                    prop_assert_eq!(&events, &vec![]);
                }
                (_, Some(m)) => {
                    model = m;
                    prop_assert_eq!(outcome, ApplyOutcome::Applied { version: index });
                    prop_assert_eq!(
                        &events[..2],
                        &[
                            Event::Broadcast(entry_frame(index, current, now, &u)),
                            Event::Applied { version: index, commit_time_us: now },
                        ][..]
                    );
                }
            }
            prop_assert_eq!(parent.file().to_vec(), model.clone());
            if step.extra == 3 {
                events.extend(parent.checkpoint());
            }
            if step.extra == 4 {
                events.push(Event::Broadcast(parent.heartbeat(now, vec![], vec![])));
            }

            if connected {
                for f in broadcasts(&events) {
                    let got = feed(&mut child, &f);
                    prop_assert!(
                        !matches!(got, Err(ReplicaError::Gap { .. })),
                        "gap at step {}: {:?}", i, got
                    );
                    prop_assert_eq!(got, Ok(expected_child_events(&f)));
                }
            }
        }
        prop_assert!(child.is_synced());
        prop_assert_eq!(state(&child), state(&parent));
        prop_assert_eq!(child.file().to_vec(), model);
        prop_assert_eq!(child.last_commit_time_us(), parent.last_commit_time_us());
    }
}

/// A push that ends below the limit (the rest fetched from peers): the transfer waits after
/// `SnapshotEnd`, takes fetched chunks only at their manifest hash, and installs the exact
/// file once the last one is in.
#[test]
fn a_transfer_finished_by_fetched_chunks() {
    let (parent, _) = parent_at_v4(100);
    let frames: Vec<Bytes> = snapshot_frames(parent.file(), T0, &[]).collect();
    let mut c = relay();
    begin_transfer(&mut c, &frames[0]);
    let (version, missing, manifest) = c.snapshot_wanted().unwrap();
    assert_eq!((version, missing.clone()), (4, vec![0, 1, 2]));
    // Chunk 2 arrives from a peer first, then the parent pushes 0 (limit lowered to 1).
    let chunk2 = parent.file().chunk(2).unwrap();
    assert_eq!(
        c.put_fetched_chunk(4, 2, chunk2.clone(), crate::file::leaf_hash(&chunk2)),
        Ok(true)
    );
    assert_eq!(
        c.put_fetched_chunk(4, 2, chunk2.clone(), manifest[2]),
        Ok(false),
        "a chunk held already is not taken twice"
    );
    assert_eq!(feed(&mut c, &frames[1]), Ok(vec![]));
    assert_eq!(feed(&mut c, frames.last().unwrap()), Ok(vec![]));
    assert!(c.snapshot_waiting());
    let chunk1 = parent.file().chunk(1).unwrap();
    assert_eq!(
        c.put_fetched_chunk(4, 1, chunk2.clone(), crate::file::leaf_hash(&chunk2)),
        Err(ReplicaError::BadChunk { index: 1 })
    );
    assert_eq!(
        c.put_fetched_chunk(3, 1, chunk1.clone(), manifest[1]),
        Ok(false),
        "a chunk for another transfer is ignored"
    );
    // A fetched chunk is served onwards by hash while the transfer runs.
    assert_eq!(c.find_chunk(7, &manifest[2]), Some(chunk2));
    assert_eq!(c.put_fetched_chunk(4, 1, chunk1, manifest[1]), Ok(true));
    assert!(!c.snapshot_waiting());
    let events = c.finish_snapshot().unwrap();
    assert!(events.contains(&Event::Installed { version: 4 }));
    assert_eq!(state(&c), state(&parent));
    assert_eq!(c.file().to_vec(), parent.file().to_vec());
    assert!(c.finish_snapshot().is_err());
}

/// A chunk hashed by the driver is checked with that hash: the right one is taken, a wrong
/// one refuses the chunk just as a wrong chunk would be refused.
#[test]
fn a_chunk_hash_computed_by_the_driver_is_the_one_checked() {
    let (parent, _) = parent_at_v4(100);
    let frames: Vec<Bytes> = snapshot_frames(parent.file(), T0, &[]).collect();
    let start = |c: &mut Replica| begin_transfer(c, &frames[0]);
    let mut c = relay();
    start(&mut c);
    let chunk0 = parent.file().chunk(0).unwrap();
    let right = crate::file::leaf_hash(&chunk0);
    assert_eq!(
        c.handle_downstream_hashed(frames[1].clone(), decode(&frames[1]), Some([7; 32])),
        Err(ReplicaError::BadChunk { index: 0 })
    );
    c.upstream_lost();
    start(&mut c);
    for (i, f) in frames[1..].iter().enumerate() {
        let hash = (i < 3).then(|| crate::file::leaf_hash(&parent.file().chunk(i as u64).unwrap()));
        assert!(c
            .handle_downstream_hashed(f.clone(), decode(f), hash)
            .is_ok());
    }
    assert_eq!(right, parent.file().chunk_hash(0).unwrap());
    assert_eq!(state(&c), state(&parent));
}
