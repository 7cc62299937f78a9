use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::file::{self, ChunkedFile, Precondition, Update};
use crate::proto;

struct TestSm {
    file: Mutex<ChunkedFile>,
    installs: AtomicUsize,
}

impl TestSm {
    fn new() -> Arc<TestSm> {
        Arc::new(TestSm {
            file: Mutex::new(
                ChunkedFile::new(file::DEFAULT_CHUNK_SIZE, file::DEFAULT_MAX_LEN).unwrap(),
            ),
            installs: AtomicUsize::new(0),
        })
    }
}

impl FileStateMachine for TestSm {
    fn apply(&self, _log_index: u64, proposal: &proto::Proposal) -> ApplyOutcome {
        let mut f = self.file.lock().unwrap();
        let version = f.version();
        if let Some(pre) = &proposal.precondition {
            match Precondition::try_from(pre.clone()) {
                Ok(pre) if f.check(&pre) => {}
                Ok(_) => return ApplyOutcome::PreconditionFailed { version },
                Err(e) => {
                    return ApplyOutcome::Rejected {
                        version,
                        reason: e.to_string(),
                    }
                }
            }
        }
        let update = match Update::try_from(proposal.update.clone().unwrap_or_default()) {
            Ok(u) => u,
            Err(e) => {
                return ApplyOutcome::Rejected {
                    version,
                    reason: e.to_string(),
                }
            }
        };
        match f.apply(version + 1, &update) {
            Ok(()) => ApplyOutcome::Applied {
                version: version + 1,
            },
            Err(e) => ApplyOutcome::Rejected {
                version,
                reason: e.to_string(),
            },
        }
    }

    fn current(&self) -> ChunkedFile {
        self.file.lock().unwrap().clone()
    }

    fn install(&self, file: ChunkedFile) {
        self.installs.fetch_add(1, Ordering::SeqCst);
        *self.file.lock().unwrap() = file;
    }
}

fn member() -> Member {
    Member {
        name: "core-a".into(),
        addr: "127.0.0.1:7000".into(),
    }
}

fn fast_config() -> RaftConfig {
    RaftConfig {
        heartbeat_interval_ms: 50,
        election_timeout_min_ms: 150,
        election_timeout_max_ms: 300,
        ..RaftConfig::default()
    }
}

fn write(offset: u64, data: impl Into<Bytes>) -> proto::Proposal {
    proto::Proposal {
        update: Some(proto::Update {
            ops: vec![proto::Op {
                kind: Some(proto::op::Kind::Write(proto::Write {
                    offset,
                    data: data.into(),
                })),
            }],
        }),
        precondition: None,
    }
}

async fn open(dir: &Path, cfg: &RaftConfig) -> (Core, Arc<TestSm>) {
    let sm = TestSm::new();
    let core = Core::open(member(), dir, sm.clone(), cfg).await.unwrap();
    (core, sm)
}

async fn open_leader(dir: &Path, cfg: &RaftConfig) -> (Core, Arc<TestSm>) {
    let (core, sm) = open(dir, cfg).await;
    core.initialize_single().await.unwrap();
    let leader = core.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    assert_eq!(leader, member());
    assert!(core.is_leader());
    (core, sm)
}

fn applied_index(core: &Core) -> u64 {
    core.raft().metrics().borrow().last_applied.unwrap().index
}

async fn wait_applied(core: &Core, index: u64) {
    core.raft()
        .wait(Some(Duration::from_secs(10)))
        .applied_index_at_least(Some(index), "applied")
        .await
        .unwrap();
}

#[test]
fn node_id_is_blake3_prefix() {
    let h = blake3::hash(b"core-a");
    let want = u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap());
    assert_eq!(node_id("core-a"), want);
    assert_ne!(node_id("core-a"), node_id("core-b"));
    assert_eq!(member().id(), want);
}

#[test]
fn cmd_serde_is_protobuf_bytes() {
    let cmd = Cmd(write(7, &b"hello"[..]));
    let json = serde_json::to_string(&cmd).unwrap();
    let back: Cmd = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cmd);
}

#[test]
fn config_validation() {
    RaftConfig::default().validate().unwrap();
    fast_config().validate().unwrap();
    let bad = RaftConfig {
        election_timeout_min_ms: 100,
        heartbeat_interval_ms: 100,
        ..RaftConfig::default()
    };
    assert!(matches!(
        bad.validate(),
        Err(ConsensusError::InvalidConfig(_))
    ));
    let bad = RaftConfig {
        election_timeout_max_ms: 1500,
        ..RaftConfig::default()
    };
    assert!(bad.validate().is_err());
    let bad = RaftConfig {
        snapshot_every_entries: 0,
        ..RaftConfig::default()
    };
    assert!(bad.validate().is_err());
}

#[tokio::test]
async fn single_node_commits_and_replays_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = fast_config();
    let (core, sm) = open_leader(dir.path(), &cfg).await;

    for i in 0..20u64 {
        let data = vec![i as u8 + 1; 1000 + i as usize];
        let outcome = core.propose(write(i * 700, data)).await.unwrap();
        assert_eq!(outcome, ApplyOutcome::Applied { version: i + 1 });
    }
    let stale = proto::Proposal {
        precondition: Some((&Precondition::IfVersion(3)).into()),
        ..write(0, &b"x"[..])
    };
    assert_eq!(
        core.propose(stale).await.unwrap(),
        ApplyOutcome::PreconditionFailed { version: 20 }
    );
    let before = sm.current();
    let applied = applied_index(&core);
    core.shutdown().await.unwrap();
    assert!(matches!(
        core.propose(write(0, &b"late"[..])).await,
        Err(ConsensusError::Stopped)
    ));
    drop(core);

    let (core, sm) = open(dir.path(), &cfg).await;
    let after = sm.current();
    wait_applied(&core, applied).await;
    assert_eq!(sm.installs.load(Ordering::SeqCst), 0, "no snapshot yet");
    assert_eq!(after.version(), 20);
    assert_eq!(after.root(), before.root());
    assert_eq!(after.to_vec(), before.to_vec());

    core.initialize_single().await.unwrap();
    core.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        core.propose(write(0, &b"again"[..])).await.unwrap(),
        ApplyOutcome::Applied { version: 21 }
    );
    core.shutdown().await.unwrap();
}

#[tokio::test]
async fn snapshots_purge_the_log_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RaftConfig {
        snapshot_every_entries: 5,
        keep_logs_after_snapshot: 2,
        ..fast_config()
    };
    let (core, sm) = open_leader(dir.path(), &cfg).await;
    for i in 0..30u64 {
        let outcome = core
            .propose(write(i * 10, format!("entry-{i:04}").into_bytes()))
            .await
            .unwrap();
        assert_eq!(outcome, ApplyOutcome::Applied { version: i + 1 });
    }
    let last = core.raft().metrics().borrow().last_applied.unwrap();
    let metrics = core
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| {
                m.snapshot.is_some_and(|s| s.index + 5 > last.index)
                    && m.purged.is_some_and(|p| p.index + 10 > last.index)
            },
            "snapshot and purge",
        )
        .await
        .unwrap();
    let snap_path = dir.path().join("snapshots").join("current.snap");
    assert!(snap_path.exists());
    let purged = metrics.purged.unwrap();
    let before = sm.current();
    core.shutdown().await.unwrap();
    drop(core);

    let bytes = std::fs::read(&snap_path).unwrap();
    let (meta, file) = state_machine::decode(&bytes).unwrap();
    assert!(meta.last_log_id.unwrap().index > purged.index);
    assert!(file.version() > 0);

    {
        use openraft::storage::RaftLogStorage;
        use openraft::RaftLogReader;
        let mut log = LogStore::open(dir.path().join("raft.redb")).await.unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(purged));
        assert!(log
            .try_get_log_entries(..=purged.index)
            .await
            .unwrap()
            .is_empty());
        let rest = log.try_get_log_entries(purged.index + 1..).await.unwrap();
        assert_eq!(rest.first().unwrap().log_id.index, purged.index + 1);
        assert_eq!(rest.last().unwrap().log_id, state.last_log_id.unwrap());
    }

    let (core, sm) = open(dir.path(), &cfg).await;
    assert_eq!(
        sm.installs.load(Ordering::SeqCst),
        1,
        "restored from snapshot"
    );
    let after = sm.current();
    wait_applied(&core, last.index).await;
    assert_eq!(after.version(), 30);
    assert_eq!(after.root(), before.root());
    assert_eq!(after.to_vec(), before.to_vec());
    core.shutdown().await.unwrap();
}

#[tokio::test]
async fn large_proposal_commits_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = fast_config();
    let (core, sm) = open_leader(dir.path(), &cfg).await;
    let big: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let outcome = core.propose(write(0, big.clone())).await.unwrap();
    assert_eq!(outcome, ApplyOutcome::Applied { version: 1 });
    let root = sm.current().root();
    let applied = applied_index(&core);
    core.shutdown().await.unwrap();
    drop(core);

    let (core, sm) = open(dir.path(), &cfg).await;
    let file = sm.current();
    wait_applied(&core, applied).await;
    assert_eq!(file.version(), 1);
    assert_eq!(file.root(), root);
    assert_eq!(file.to_vec(), big);
    core.shutdown().await.unwrap();
}
