//! A core node's glue to its Raft group: the state machine openraft applies to (the
//! replica), forming or joining the group at start, and the checkpoint ticker.
//!
//! Invariants:
//! - Committed entries reach the replica in log order, under the state lock, and what the
//!   replica returns (the frames for the children) is dispatched in the same critical
//!   section, so every child sees the core's order.
//! - A checkpoint goes down the stream at least every `checkpoint_interval_ms`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::NodeKind;
use crate::consensus::{Core, FileStateMachine, Member};
use crate::dedup::DedupTable;
use crate::file::{ApplyOutcome, ChunkedFile, Hash};
use crate::proto;
use crate::replica::Event;

use super::downstream::dispatch;
use super::error::NodeError;
use super::propose::batcher;
use super::shared::{now_us, Shared};

/// The replica as openraft's state machine.
struct CoreSm(Arc<Shared>);

impl FileStateMachine for CoreSm {
    fn apply(&self, log_index: u64, proposal: &proto::Proposal) -> ApplyOutcome {
        let mut st = self.0.state.lock();
        let (outcome, events) = st.replica.apply_committed(log_index, proposal, now_us());
        dispatch(&self.0, &mut st, events);
        outcome
    }

    fn current(&self) -> ChunkedFile {
        self.0.state.lock().replica.file().clone()
    }

    fn dedup(&self) -> DedupTable {
        self.0.state.lock().replica.dedup().clone()
    }

    fn version_root(&self) -> (u64, Hash) {
        let st = self.0.state.lock();
        (st.replica.file().version(), st.replica.file().root())
    }

    fn install(&self, file: ChunkedFile, dedup: DedupTable) {
        let mut st = self.0.state.lock();
        let version = file.version();
        st.replica.restore_dedup(dedup);
        let mut events = st.replica.install(file);
        events.push(Event::Applied {
            version,
            commit_time_us: now_us(),
        });
        dispatch(&self.0, &mut st, events);
    }
}

/// Opens the Raft group of a core node (forming it with `--init`), and starts the batcher
/// and the checkpoint ticker. Does nothing on a relay.
pub(crate) async fn start(shared: &Arc<Shared>) -> Result<(), NodeError> {
    let NodeKind::Core { raft, init, peers } = &shared.cfg.kind else {
        return Ok(());
    };
    let me = Member {
        name: shared.cfg.name.clone(),
        addr: shared.cfg.advertise.to_string(),
    };
    let core = Core::open(
        me.clone(),
        &shared.cfg.data,
        Arc::new(CoreSm(shared.clone())),
        raft,
        shared.endpoint.clone(),
        shared.cfg.stream.max_frame,
    )
    .await?;
    let core = Arc::new(core);
    let _ = shared.core.set(core.clone());
    if *init {
        let members: BTreeMap<_, _> = if peers.is_empty() {
            BTreeMap::from([(me.id(), me)])
        } else {
            peers.iter().map(|m| (m.id(), m.clone())).collect()
        };
        core.initialize(members).await?;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = shared.batcher.set(tx);
    shared.tasks.spawn(batcher(shared.clone(), core, rx));
    shared.tasks.spawn(ticker(shared.clone()));
    Ok(())
}

/// Sends a checkpoint down the stream every `checkpoint_interval_ms` (the replica also sends
/// one every `checkpoint_every` entries).
async fn ticker(shared: Arc<Shared>) {
    let cp = Duration::from_millis(shared.cfg.stream.checkpoint_interval_ms);
    let mut cp_tick = tokio::time::interval(cp);
    cp_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = cp_tick.tick() => {}
        }
        let mut st = shared.state.lock();
        let events = st.replica.checkpoint().into_iter().collect();
        dispatch(&shared, &mut st, events);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use parking_lot::Mutex;

    use super::*;
    use crate::config::StreamConfig;
    use crate::consensus::RaftConfig;
    use crate::file::Precondition;
    use crate::replica::Replica;
    use crate::tls::{self, Role, TransportConfig};
    use crate::wire::DEFAULT_MAX_FRAME;

    /// openraft's state machine over the real replica, as `CoreSm` is minus the driver.
    struct ReplicaSm(Mutex<Replica>, std::sync::atomic::AtomicUsize);

    impl FileStateMachine for ReplicaSm {
        fn apply(&self, log_index: u64, proposal: &proto::Proposal) -> ApplyOutcome {
            self.0
                .lock()
                .apply_committed(log_index, proposal, now_us())
                .0
        }

        fn current(&self) -> ChunkedFile {
            self.0.lock().file().clone()
        }

        fn dedup(&self) -> DedupTable {
            self.0.lock().dedup().clone()
        }

        fn version_root(&self) -> (u64, Hash) {
            let r = self.0.lock();
            (r.file().version(), r.file().root())
        }

        fn install(&self, file: ChunkedFile, dedup: DedupTable) {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.lock().restore_dedup(dedup);
            self.0.lock().install(file);
        }
    }

    fn replica_sm(id: &Arc<tls::Identity>) -> Arc<ReplicaSm> {
        let trust = crate::replica::Trust::Sign {
            sealer: crate::trust::Sealer::new(id).unwrap(),
            verifier: crate::trust::Verifier::new(id.clone()),
        };
        let replica = Replica::new(StreamConfig::default().replica(), trust).unwrap();
        Arc::new(ReplicaSm(Mutex::new(replica), Default::default()))
    }

    async fn open(dir: &std::path::Path, cfg: &RaftConfig) -> (Core, Arc<ReplicaSm>) {
        let ca = dir.join("ca");
        let certs = dir.join("certs");
        if !certs.join("core-a.pem").exists() {
            tls::ca_init(&ca).unwrap();
            tls::cert_issue(&ca, "core-a", Role::Core, &certs).unwrap();
        }
        let id = Arc::new(tls::Identity::load(&certs, "core-a").unwrap());
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let endpoint = tls::endpoint_from_socket(sock, &id, &TransportConfig::default()).unwrap();
        let me = Member {
            name: "core-a".into(),
            addr: endpoint.local_addr().unwrap().to_string(),
        };
        let sm = replica_sm(&id);
        let core = Core::open(me, dir, sm.clone(), cfg, endpoint, DEFAULT_MAX_FRAME)
            .await
            .unwrap();
        (core, sm)
    }

    fn write(offset: u64, data: &[u8], precondition: Option<Precondition>) -> proto::Proposal {
        let update = crate::file::Update {
            ops: vec![crate::file::Op::Write {
                offset,
                data: Bytes::copy_from_slice(data),
            }],
        };
        proto::Proposal {
            update: Some((&update).into()),
            precondition: precondition.as_ref().map(Into::into),
            id: Bytes::copy_from_slice(&offset.to_le_bytes()),
            ..Default::default()
        }
    }

    /// A snapshot of the real replica's file, restored by a fresh replica after a restart,
    /// holds the same version, root and bytes; conditional and batched proposals included.
    #[tokio::test]
    async fn a_snapshot_of_the_real_replica_restores_its_root() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RaftConfig {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 250,
            election_timeout_max_ms: 500,
            snapshot_every_entries: 7,
            keep_logs_after_snapshot: 2,
            ..RaftConfig::default()
        };
        let (core, sm) = open(dir.path(), &cfg).await;
        core.initialize_single().await.unwrap();
        core.wait_for_leader(Duration::from_secs(10)).await.unwrap();
        let mut version = 0;
        for i in 0..20u64 {
            let data = format!("entry-{i:04}").into_bytes();
            match core.propose(write(i * 70_000, &data, None)).await.unwrap() {
                ApplyOutcome::Applied { version: v } if v > version => version = v,
                other => panic!("write {i}: {other:?} after version {version}"),
            }
        }
        let stale = core
            .propose(write(5, b"late", Some(Precondition::IfVersion(3))))
            .await
            .unwrap();
        assert_eq!(stale, ApplyOutcome::PreconditionFailed { version });
        let batch = proto::Proposal {
            batch: vec![write(1, b"b1", None), write(2, b"b2", None)],
            ..Default::default()
        };
        core.propose(batch).await.unwrap();
        let last = core.raft().metrics().borrow().last_applied.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            core.raft().trigger().snapshot().await.unwrap();
            let done = core
                .raft()
                .wait(Some(Duration::from_millis(500)))
                .metrics(
                    |m| m.snapshot.is_some_and(|s| s.index >= last.index),
                    "a snapshot of the last entry",
                )
                .await;
            match done {
                Ok(_) => break,
                Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
            }
        }
        let before = sm.current();
        assert!(
            before.version() > version,
            "the batch applied as one more version"
        );
        assert_eq!(
            before.read(0, 5),
            b"ebb2y",
            "both writes of the batch, in order"
        );
        core.shutdown().await.unwrap();
        drop(core);

        let (core, sm) = open(dir.path(), &cfg).await;
        core.raft()
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(last.index), "replayed")
            .await
            .unwrap();
        let installs = sm.1.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            installs, 1,
            "restored from the snapshot, not only by replay"
        );
        let after = sm.current();
        assert_eq!(after.version(), before.version());
        assert_eq!(after.root(), before.root());
        assert_eq!(after.to_vec(), before.to_vec());
        core.shutdown().await.unwrap();
    }
}
