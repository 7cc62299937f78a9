use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::file::{self, ChunkedFile, Precondition, Update};
use crate::proto;
use crate::tls::{self, Role, TransportConfig};
use crate::wire::DEFAULT_MAX_FRAME;

/// A file state machine like the replica's: proposals deduplicated by id, each applied one
/// bumping the version by one.
pub(super) struct TestSm {
    file: Mutex<ChunkedFile>,
    dedup: Mutex<DedupTable>,
    pub(super) installs: AtomicUsize,
    /// Apply every later update with its first byte changed (a diverging member).
    pub(super) corrupt: std::sync::atomic::AtomicBool,
}

impl TestSm {
    pub(super) fn new() -> Arc<TestSm> {
        Arc::new(TestSm {
            file: Mutex::new(
                ChunkedFile::new(file::DEFAULT_CHUNK_SIZE, file::DEFAULT_MAX_LEN).unwrap(),
            ),
            dedup: Mutex::default(),
            installs: AtomicUsize::new(0),
            corrupt: Default::default(),
        })
    }

    fn apply_new(&self, proposal: &proto::Proposal) -> ApplyOutcome {
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
        let mut update = proposal.update.clone().unwrap_or_default();
        if self.corrupt.load(Ordering::SeqCst) {
            for op in &mut update.ops {
                if let Some(proto::op::Kind::Write(w)) = &mut op.kind {
                    let mut data = w.data.to_vec();
                    if let Some(b) = data.first_mut() {
                        *b ^= 0xff;
                    }
                    w.data = data.into();
                }
            }
        }
        let update = match Update::try_from(update) {
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
}

impl FileStateMachine for TestSm {
    fn apply(&self, _log_index: u64, proposal: &proto::Proposal) -> ApplyOutcome {
        if let Some(first) = self.dedup.lock().unwrap().get(&proposal.id) {
            return first.clone();
        }
        let outcome = self.apply_new(proposal);
        self.dedup
            .lock()
            .unwrap()
            .record(proposal.id.clone(), outcome.clone());
        outcome
    }

    fn current(&self) -> ChunkedFile {
        self.file.lock().unwrap().clone()
    }

    fn dedup(&self) -> DedupTable {
        self.dedup.lock().unwrap().clone()
    }

    fn install(&self, file: ChunkedFile, dedup: DedupTable) {
        self.installs.fetch_add(1, Ordering::SeqCst);
        *self.file.lock().unwrap() = file;
        *self.dedup.lock().unwrap() = dedup;
    }
}

/// A cluster CA in a temp dir that issues core certificates on demand.
pub(super) struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
}

impl Pki {
    pub(super) fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        tls::ca_init(&ca).unwrap();
        Pki { dir, ca }
    }

    /// A mutual-TLS endpoint of core `name` bound to `addr`.
    pub(super) fn endpoint(
        &self,
        name: &str,
        addr: SocketAddr,
    ) -> std::io::Result<quinn::Endpoint> {
        self.endpoint_as(name, Role::Core, addr)
    }

    /// A mutual-TLS endpoint of `name` with a certificate of `role`, bound to `addr`.
    pub(super) fn endpoint_as(
        &self,
        name: &str,
        role: Role,
        addr: SocketAddr,
    ) -> std::io::Result<quinn::Endpoint> {
        let certs = self.dir.path().join("certs");
        if !certs.join(format!("{name}.pem")).exists() {
            tls::cert_issue(&self.ca, name, role, &certs).unwrap();
        }
        let id = tls::Identity::load(&certs, name).unwrap();
        let sock = std::net::UdpSocket::bind(addr)?;
        Ok(tls::endpoint_from_socket(sock, &id, &TransportConfig::default()).unwrap())
    }
}

fn member() -> Member {
    Member {
        name: "core-a".into(),
        addr: "127.0.0.1:7000".into(),
    }
}

pub(super) fn fast_config() -> RaftConfig {
    RaftConfig {
        heartbeat_interval_ms: 25,
        election_timeout_min_ms: 150,
        election_timeout_max_ms: 300,
        ..RaftConfig::default()
    }
}

pub(super) fn write(offset: u64, data: impl Into<Bytes>) -> proto::Proposal {
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
        ..Default::default()
    }
}

async fn open(dir: &Path, cfg: &RaftConfig) -> (Core, Arc<TestSm>) {
    let pki = Pki::new();
    let endpoint = pki.endpoint("core-a", ([127, 0, 0, 1], 0).into()).unwrap();
    let sm = TestSm::new();
    let core = Core::open(member(), dir, sm.clone(), cfg, endpoint, DEFAULT_MAX_FRAME)
        .await
        .unwrap();
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
        election_timeout_max_ms: 500,
        ..RaftConfig::default()
    };
    assert!(bad.validate().is_err());
    let bad = RaftConfig {
        snapshot_every_entries: 0,
        ..RaftConfig::default()
    };
    assert!(bad.validate().is_err());
    for bad in [
        RaftConfig {
            heartbeat_interval_ms: 5,
            ..RaftConfig::default()
        },
        RaftConfig {
            election_timeout_min_ms: 399,
            ..RaftConfig::default()
        },
        RaftConfig {
            max_stall_ms: 100,
            ..RaftConfig::default()
        },
        RaftConfig {
            catch_up_timeout_ms: 0,
            ..RaftConfig::default()
        },
    ] {
        assert!(
            matches!(bad.validate(), Err(ConsensusError::InvalidConfig(_))),
            "{bad:?}"
        );
    }
    let or = RaftConfig::default().to_openraft().unwrap();
    assert!(
        !or.enable_elect,
        "only the pre-vote driver starts elections"
    );
    assert_eq!(
        or.election_timeout_max, 250,
        "openraft's lease: half the minimum"
    );
    assert!(or.election_timeout_min > or.heartbeat_interval);
}

#[test]
fn raft_config_reads_from_toml_with_defaults() {
    let cfg: RaftConfig = toml::from_str("heartbeat_interval_ms = 50").unwrap();
    assert_eq!(
        cfg,
        RaftConfig {
            heartbeat_interval_ms: 50,
            ..RaftConfig::default()
        }
    );
    assert!(toml::from_str::<RaftConfig>("election_timeout = 5").is_err());
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
    let status = core.status();
    assert_eq!(status.state, "Leader");
    assert_eq!(status.leader.as_deref(), Some("core-a"));
    assert_eq!(status.applied_index, Some(applied));
    assert_eq!(status.commit_index, Some(applied));
    assert_eq!(status.last_log_index, Some(applied));
    assert!(status.term >= 1);
    assert_eq!(core.members(), vec![(member(), true)]);
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
    assert_eq!(core.status().commit_index, Some(applied));

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
    core.raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.snapshot.is_some() && m.purged.is_some(),
            "automatic snapshot and purge",
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        core.raft().trigger().snapshot().await.unwrap();
        let caught_up = core
            .raft()
            .wait(Some(Duration::from_millis(500)))
            .metrics(
                |m| {
                    m.snapshot.is_some_and(|s| s.index >= last.index)
                        && m.purged.is_some_and(|p| p.index + 10 > last.index)
                },
                "snapshot of the last entry and purge",
            )
            .await;
        match caught_up {
            Ok(m) => break m,
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
    };
    let snap_path = dir.path().join("snapshots").join("current.snap");
    assert!(snap_path.exists());
    let purged = metrics.purged.unwrap();
    let before = sm.current();
    core.shutdown().await.unwrap();
    drop(core);

    let limits = snapshot::Limits::of(&sm.current());
    let decoded = snapshot::read(
        &mut std::io::BufReader::new(std::fs::File::open(&snap_path).unwrap()),
        limits,
    )
    .unwrap();
    assert!(decoded.meta.last_log_id.unwrap().index > purged.index);
    assert!(decoded.file.version() > 0);

    {
        use openraft::storage::RaftLogStorage;
        use openraft::RaftLogReader;
        let mut log = LogStore::open(dir.path().join("raft.redb"), "core-a")
            .await
            .unwrap();
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

#[tokio::test]
async fn handle_rpc_answers_malformed_input_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (core, _sm) = open_leader(dir.path(), &fast_config()).await;
    let is_error = |r: proto::RaftReply| matches!(r.kind, Some(proto::raft_reply::Kind::Error(_)));
    let rpc = |kind| proto::RaftRpc { kind: Some(kind) };
    assert!(is_error(
        core.handle_rpc(proto::RaftRpc { kind: None }, 7).await
    ));
    assert!(is_error(
        core.handle_rpc(rpc(proto::raft_rpc::Kind::VoteJson("{".into())), 7)
            .await
    ));
    let vote = serde_json::to_string(&openraft::Vote::new_committed(1, 7u64)).unwrap();
    let bad_entries = proto::AppendEntries {
        vote_json: vote.clone(),
        prev_log_id_json: "null".into(),
        leader_commit_json: "null".into(),
        entries: vec![proto::RaftEntry {
            term: 1,
            leader_node_id: 7,
            index: 1,
            payload: None,
        }],
    };
    assert!(is_error(
        core.handle_rpc(rpc(proto::raft_rpc::Kind::AppendEntries(bad_entries)), 7)
            .await
    ));
    let bad_snapshot = proto::InstallSnapshot {
        vote_json: vote,
        meta_json: "[]".into(),
        offset: 0,
        data: Bytes::from_static(b"x"),
        done: true,
    };
    assert!(is_error(
        core.handle_rpc(rpc(proto::raft_rpc::Kind::InstallSnapshot(bad_snapshot)), 7)
            .await
    ));
    let stale = openraft::raft::VoteRequest::<NodeId> {
        vote: openraft::Vote::new(0, 7),
        last_log_id: None,
    };
    let reply = core
        .handle_rpc(
            rpc(proto::raft_rpc::Kind::VoteJson(
                serde_json::to_string(&stale).unwrap(),
            )),
            7,
        )
        .await;
    let Some(proto::raft_reply::Kind::OkJson(json)) = reply.kind else {
        panic!("a well-formed vote gets an openraft answer: {reply:?}");
    };
    let resp: openraft::raft::VoteResponse<NodeId> = serde_json::from_str(&json).unwrap();
    assert!(!resp.vote_granted);
    assert!(core.is_leader());
    core.shutdown().await.unwrap();
}

/// Mounts a tmpfs of `mb` MiB at `dir`; None (with the reason printed) where mounting is not
/// permitted.
fn mount_tmpfs(dir: &Path, mb: u64) -> Option<Mount> {
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
        .arg(dir)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(Mount(dir.to_path_buf())),
        Ok(o) => {
            eprintln!(
                "skipping: cannot mount a tmpfs ({})",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("skipping: cannot run mount ({e})");
            None
        }
    }
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_raft_and_nothing_after_it_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_mount) = mount_tmpfs(dir.path(), 16) else {
        return;
    };
    let (core, _sm) = open_leader(dir.path(), &fast_config()).await;
    let mut failed = 0;
    for i in 0..200u64 {
        match core.propose(write(0, vec![i as u8; 512 * 1024])).await {
            Ok(outcome) => assert_eq!(failed, 0, "acknowledged after a failure: {outcome:?}"),
            Err(_) => failed += 1,
        }
        if failed >= 3 {
            break;
        }
    }
    assert!(failed >= 3, "the disk never filled");
    let reason = tokio::time::timeout(Duration::from_secs(10), core.fatal())
        .await
        .expect("fatal() reports the stop");
    let text = reason.to_string();
    assert!(
        matches!(reason, ConsensusError::Storage(_)) && text.contains("os error 28"),
        "{text}"
    );
    assert!(!core.is_leader());
    assert_eq!(core.status().state, "Shutdown");
}

#[tokio::test]
async fn fatal_does_not_report_a_requested_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (core, _sm) = open_leader(dir.path(), &fast_config()).await;
    core.shutdown().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), core.fatal())
            .await
            .is_err(),
        "a requested shutdown is not a failure"
    );
}

#[tokio::test]
async fn snapshot_segments_beyond_the_limit_or_past_a_gap_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (core, _sm) = open_leader(dir.path(), &fast_config()).await;
    let term = core.status().term;
    let vote = serde_json::to_string(&openraft::Vote::new_committed(term + 1, 7u64)).unwrap();
    let meta = SnapshotMeta {
        snapshot_id: "hostile".into(),
        ..Default::default()
    };
    let segment = |offset: u64| proto::RaftRpc {
        kind: Some(proto::raft_rpc::Kind::InstallSnapshot(
            proto::InstallSnapshot {
                vote_json: vote.clone(),
                meta_json: serde_json::to_string(&meta).unwrap(),
                offset,
                data: Bytes::from_static(b"x"),
                done: false,
            },
        )),
    };
    let error = |r: proto::RaftReply| match r.kind {
        Some(proto::raft_reply::Kind::Error(e)) => e,
        other => panic!("expected an error reply: {other:?}"),
    };
    let e = error(core.handle_rpc(segment(1 << 40), 7).await);
    assert!(e.contains("beyond the largest snapshot"), "{e}");
    let e = error(core.handle_rpc(segment(u64::MAX), 7).await);
    assert!(e.contains("beyond the largest snapshot"), "{e}");
    let e = error(core.handle_rpc(segment(4096), 7).await);
    assert!(e.contains("leaves a gap"), "{e}");
    assert!(core.is_leader(), "refused before openraft saw the vote");
    assert_eq!(
        core.propose(write(0, &b"still fine"[..])).await.unwrap(),
        ApplyOutcome::Applied { version: 1 }
    );
    core.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_rpc_that_speaks_for_another_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (core, _sm) = open_leader(dir.path(), &fast_config()).await;
    let term = core.status().term;
    let rpc = |kind| proto::RaftRpc { kind: Some(kind) };
    let vote = openraft::raft::VoteRequest::<NodeId> {
        vote: openraft::Vote::new(term + 5, 7),
        last_log_id: None,
    };
    let json = serde_json::to_string(&vote).unwrap();
    let reply = core
        .handle_rpc(rpc(proto::raft_rpc::Kind::VoteJson(json.clone())), 9)
        .await;
    let Some(proto::raft_reply::Kind::Error(e)) = reply.kind else {
        panic!("a vote for node 7 sent by node 9 is refused: {reply:?}");
    };
    assert!(e.contains("speaks for node 7"), "{e}");
    assert_eq!(core.status().term, term, "openraft never saw it");
    assert!(core.is_leader());
    let beat = serde_json::to_string(&election::Heartbeat {
        vote: openraft::Vote::new_committed(term + 5, 7),
    })
    .unwrap();
    let reply = core
        .handle_rpc(rpc(proto::raft_rpc::Kind::HeartbeatJson(beat)), 9)
        .await;
    assert!(matches!(
        reply.kind,
        Some(proto::raft_reply::Kind::Error(_))
    ));
}
