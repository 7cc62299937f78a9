use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::RPCError;
use openraft::network::RPCOption;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{CommittedLeaderId, EntryPayload, RaftNetwork, RaftNetworkFactory, Vote};

use super::tests::{write, Pki, TestSm};
use super::*;
use crate::file::Precondition;
use crate::proto::{self, request};
use crate::transport as wire;
use crate::wire::DEFAULT_MAX_FRAME;

const DEADLINE: Duration = Duration::from_secs(30);

fn cluster_config() -> RaftConfig {
    RaftConfig {
        heartbeat_interval_ms: 100,
        election_timeout_min_ms: 800,
        election_timeout_max_ms: 1600,
        ..RaftConfig::default()
    }
}

/// Answer every stream of every connection the way a core node does: one `Request` frame in,
/// one `RaftReply` frame out. Aborting the task aborts every connection and stream task.
async fn serve(endpoint: quinn::Endpoint, core: Arc<Core>) {
    let mut conns = tokio::task::JoinSet::new();
    while let Some(incoming) = endpoint.accept().await {
        let core = core.clone();
        conns.spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let mut streams = tokio::task::JoinSet::new();
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let core = core.clone();
                streams.spawn(async move {
                    let req =
                        wire::read_frame::<proto::Request>(&mut recv, DEFAULT_MAX_FRAME).await;
                    let reply = match req {
                        Ok(Some(proto::Request {
                            kind: Some(request::Kind::Raft(rpc)),
                        })) => core.handle_rpc(rpc).await,
                        _ => return,
                    };
                    if wire::write_frame(&mut send, &reply).await.is_ok() {
                        let _ = send.finish();
                    }
                });
            }
        });
    }
}

struct Node {
    core: Arc<Core>,
    sm: Arc<TestSm>,
    endpoint: quinn::Endpoint,
    server: tokio::task::JoinHandle<()>,
    data: PathBuf,
}

impl Node {
    /// Open a core named `name` on `data` with a fresh endpoint bound to `addr`, waiting for the
    /// address to become free if a stopped node still holds it.
    async fn start(pki: &Pki, name: &str, addr: SocketAddr, data: &Path, cfg: &RaftConfig) -> Node {
        let started = Instant::now();
        let endpoint = loop {
            match pki.endpoint(name, addr) {
                Ok(ep) => break ep,
                Err(e) if started.elapsed() < DEADLINE => {
                    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("binding {addr}: {e}"),
            }
        };
        let me = Member {
            name: name.into(),
            addr: endpoint.local_addr().unwrap().to_string(),
        };
        let sm = TestSm::new();
        let core = Core::open(
            me,
            data,
            sm.clone(),
            cfg,
            endpoint.clone(),
            DEFAULT_MAX_FRAME,
        )
        .await
        .unwrap();
        let core = Arc::new(core);
        let server = tokio::spawn(serve(endpoint.clone(), core.clone()));
        Node {
            core,
            sm,
            endpoint,
            server,
            data: data.to_path_buf(),
        }
    }

    fn member(&self) -> Member {
        self.core.member().clone()
    }

    fn addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap()
    }

    /// Stop Raft, the server and the endpoint; the address is free once the endpoint's
    /// connections have drained.
    async fn stop(self) {
        self.core.shutdown().await.unwrap();
        self.server.abort();
        let _ = self.server.await;
        self.endpoint.close(0u32.into(), b"stopped");
    }
}

struct Cluster {
    pki: Pki,
    root: tempfile::TempDir,
    cfg: RaftConfig,
    nodes: Vec<Node>,
}

impl Cluster {
    /// Start `n` members and initialize every one of them with the same member set.
    async fn start(n: usize, cfg: RaftConfig) -> Cluster {
        let pki = Pki::new();
        let root = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("core-{i}");
            let data = root.path().join(&name);
            nodes.push(Node::start(&pki, &name, ([127, 0, 0, 1], 0).into(), &data, &cfg).await);
        }
        let members: BTreeMap<NodeId, Member> =
            nodes.iter().map(|n| (n.core.id(), n.member())).collect();
        let inits = nodes.iter().map(|n| n.core.initialize(members.clone()));
        for r in futures::future::join_all(inits).await {
            r.unwrap();
        }
        Cluster {
            pki,
            root,
            cfg,
            nodes,
        }
    }

    /// Start one more, uninitialized member.
    async fn spawn(&mut self, name: &str) -> usize {
        let data = self.root.path().join(name);
        let node = Node::start(
            &self.pki,
            name,
            ([127, 0, 0, 1], 0).into(),
            &data,
            &self.cfg,
        )
        .await;
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn position(&self, id: NodeId) -> usize {
        self.nodes.iter().position(|n| n.core.id() == id).unwrap()
    }

    /// Wait for a leader that every running voter of its membership follows; return its position.
    async fn leader(&self) -> usize {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut watches: Vec<_> = self.nodes.iter().map(|n| n.core.raft().metrics()).collect();
        loop {
            for w in &mut watches {
                w.borrow_and_update();
            }
            let found = self.nodes.iter().position(|n| {
                n.core.is_leader()
                    && n.core.members().iter().all(|(m, voter)| {
                        let running = self.nodes.iter().find(|o| o.member() == *m);
                        !voter || running.is_none_or(|o| o.core.leader() == Some(n.member()))
                    })
            });
            if let Some(i) = found {
                return i;
            }
            let changed = watches.iter_mut().map(|w| Box::pin(w.changed()));
            let waited =
                tokio::time::timeout_at(deadline, futures::future::select_all(changed)).await;
            assert!(waited.is_ok(), "no agreed leader");
        }
    }

    /// Run `op` on the leader; again on the next leader while the answer is NotLeader.
    async fn on_leader<T, F, Fut>(&self, op: F) -> T
    where
        F: Fn(Arc<Core>) -> Fut,
        Fut: Future<Output = Result<T, ConsensusError>>,
    {
        let started = Instant::now();
        loop {
            let l = self.leader().await;
            match op(self.nodes[l].core.clone()).await {
                Err(ConsensusError::NotLeader { .. }) if started.elapsed() < DEADLINE => {}
                r => return r.unwrap(),
            }
        }
    }

    /// Commit writes `from..from + count`, write `i` taking the file from version `i` to
    /// `i + 1`; each is conditional on the version, so retrying on a new leader is safe.
    async fn propose_all(&self, from: u64, count: u64) {
        for i in from..from + count {
            let p = proto::Proposal {
                precondition: Some((&Precondition::IfVersion(i)).into()),
                ..write(i * 100, format!("entry-{i:05}").into_bytes())
            };
            let outcome = self
                .on_leader(|core| {
                    let p = p.clone();
                    async move { core.propose(p).await }
                })
                .await;
            match outcome {
                ApplyOutcome::Applied { version } => assert_eq!(version, i + 1),
                ApplyOutcome::PreconditionFailed { version } => {
                    assert_eq!(version, i + 1, "only a retry of a committed write fails")
                }
                other => panic!("write {i}: {other:?}"),
            }
        }
    }

    /// Wait until every node's file is at the newest version any node has applied (a committed
    /// one), check that all files are identical, and return a log index every node reports as
    /// applied.
    async fn converge(&self) -> u64 {
        let want = self
            .nodes
            .iter()
            .map(|n| n.sm.current())
            .max_by_key(|f| f.version())
            .unwrap();
        let mut applied = u64::MAX;
        for n in &self.nodes {
            let m = n
                .core
                .raft()
                .wait(Some(DEADLINE))
                .metrics(
                    |_| n.sm.current().version() >= want.version(),
                    format!("{} reaches version {}", n.member(), want.version()),
                )
                .await
                .unwrap();
            applied = applied.min(m.last_applied.map_or(0, |id| id.index));
        }
        for n in &self.nodes {
            let got = n.sm.current();
            assert_eq!(got.version(), want.version(), "{}", n.member());
            assert_eq!(got.root(), want.root(), "{}", n.member());
            assert_eq!(got.to_vec(), want.to_vec(), "{}", n.member());
        }
        applied
    }

    async fn stop(self) {
        for n in self.nodes {
            n.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_elect_one_leader_and_replicate() {
    let cluster = Cluster::start(3, cluster_config()).await;
    cluster.propose_all(0, 10).await;
    let big: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let big = proto::Proposal {
        precondition: Some((&Precondition::IfVersion(10)).into()),
        ..write(4096, big)
    };
    let outcome = cluster
        .on_leader(|core| {
            let p = big.clone();
            async move { core.propose(p).await }
        })
        .await;
    assert_eq!(outcome.version(), 11, "{outcome:?}");
    let applied = cluster.converge().await;

    let l = cluster.leader().await;
    let f = (l + 1) % 3;
    let never = proto::Proposal {
        precondition: Some((&Precondition::IfVersion(u64::MAX)).into()),
        ..write(0, &b"x"[..])
    };
    match cluster.nodes[f].core.propose(never).await {
        Err(ConsensusError::NotLeader { leader: Some(m) }) => {
            assert_ne!(m, cluster.nodes[f].member())
        }
        other => panic!("a follower refuses and names the leader: {other:?}"),
    }

    let mut voters: Vec<(Member, bool)> =
        cluster.nodes.iter().map(|n| (n.member(), true)).collect();
    voters.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let l = cluster.leader().await;
    for n in &cluster.nodes {
        assert_eq!(n.core.members(), voters);
        let status = n.core.status();
        assert!(status.leader.is_some(), "{status:?}");
        assert!(status.term >= 1, "{status:?}");
        assert!(status.applied_index >= Some(applied), "{status:?}");
        assert!(status.commit_index >= Some(applied), "{status:?}");
        assert!(status.last_log_index >= status.applied_index, "{status:?}");
    }
    assert_eq!(cluster.nodes[l].core.status().state, "Leader");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_entry_that_outlasts_the_append_timeout_still_commits() {
    let cfg = RaftConfig {
        heartbeat_interval_ms: 10,
        election_timeout_min_ms: 2000,
        election_timeout_max_ms: 4000,
        ..RaftConfig::default()
    };
    let cluster = Cluster::start(3, cfg).await;
    cluster.propose_all(0, 1).await;
    let big: Vec<u8> = (0..16 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let big = proto::Proposal {
        precondition: Some((&Precondition::IfVersion(1)).into()),
        ..write(0, big)
    };
    let commit = cluster.on_leader(|core| {
        let p = big.clone();
        async move { core.propose(p).await }
    });
    let outcome = tokio::time::timeout(DEADLINE, commit)
        .await
        .expect("the large entry commits");
    assert_eq!(outcome.version(), 2, "{outcome:?}");
    cluster.converge().await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_takes_over_when_the_leader_stops() {
    let mut cluster = Cluster::start(3, cluster_config()).await;
    cluster.propose_all(0, 5).await;
    cluster.converge().await;

    let old = cluster.nodes.remove(cluster.leader().await);
    let old_id = old.core.id();
    let old_term = old.core.status().term;
    old.stop().await;

    let started = Instant::now();
    for n in &cluster.nodes {
        n.core
            .raft()
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.current_leader.is_some_and(|id| id != old_id) && m.current_term > old_term,
                "a new leader",
            )
            .await
            .unwrap();
    }
    let elected = started.elapsed();
    assert!(elected < Duration::from_secs(10), "took {elected:?}");

    cluster.propose_all(5, 5).await;
    cluster.converge().await;
    assert_eq!(cluster.nodes[0].sm.current().version(), 10);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_member_catches_up_by_snapshot() {
    let cfg = RaftConfig {
        snapshot_every_entries: 5,
        keep_logs_after_snapshot: 2,
        ..cluster_config()
    };
    let mut cluster = Cluster::start(3, cfg.clone()).await;
    cluster.propose_all(0, 3).await;
    cluster.converge().await;

    let l = cluster.leader().await;
    let down = cluster.nodes.remove((l + 1) % 3);
    let (name, addr, data) = (down.member().name, down.addr(), down.data.clone());
    let down_last = down.core.status().last_log_index.unwrap();
    down.stop().await;

    cluster.propose_all(3, 40).await;
    for n in &cluster.nodes {
        n.core
            .raft()
            .wait(Some(DEADLINE))
            .metrics(
                |m| m.purged.is_some_and(|p| p.index > down_last + 5),
                "purged what the stopped member lacks",
            )
            .await
            .unwrap();
    }

    let restored = usize::from(data.join("snapshots").join("current.snap").exists());
    let back = Node::start(&cluster.pki, &name, addr, &data, &cfg).await;
    assert_eq!(back.addr(), addr);
    cluster.nodes.push(back);
    let applied = cluster.converge().await;
    let back = cluster.nodes.last().unwrap();
    assert!(
        back.sm.installs.load(Ordering::SeqCst) > restored,
        "caught up through a snapshot from the leader"
    );
    back.core
        .raft()
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index > down_last),
            "the installed snapshot to show in the metrics",
        )
        .await
        .unwrap();
    assert!(back.core.status().applied_index >= Some(applied));

    cluster.propose_all(43, 2).await;
    cluster.converge().await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_are_added_and_removed() {
    let mut cluster = Cluster::start(3, cluster_config()).await;
    cluster.propose_all(0, 5).await;

    let d = cluster.spawn("core-3").await;
    let newcomer = cluster.nodes[d].member();
    let f = (cluster.leader().await + 1) % 3;
    assert!(matches!(
        cluster.nodes[f].core.add_member(newcomer.clone()).await,
        Err(ConsensusError::NotLeader { .. })
    ));
    for _ in 0..2 {
        let m = newcomer.clone();
        cluster
            .on_leader(|core| {
                let m = m.clone();
                async move { core.add_member(m).await }
            })
            .await;
    }
    let l = cluster.leader().await;
    let members = cluster.nodes[l].core.members();
    assert_eq!(members.len(), 4, "{members:?}");
    assert!(members.iter().all(|(_, voter)| *voter));
    assert!(members.contains(&(newcomer.clone(), true)));
    cluster.propose_all(5, 3).await;
    cluster.converge().await;
    assert_eq!(cluster.nodes[d].sm.current().version(), 8);

    let gone = cluster.nodes[(l + 1) % 3].member();
    for name in [gone.name.as_str(), gone.name.as_str(), "never-a-member"] {
        cluster
            .on_leader(|core| async move { core.remove_member(name).await })
            .await;
    }
    let l = cluster.leader().await;
    let members = cluster.nodes[l].core.members();
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(members
        .iter()
        .all(|(m, voter)| *voter && m.name != gone.name));
    cluster.nodes[d]
        .core
        .raft()
        .wait(Some(DEADLINE))
        .metrics(
            |m| {
                m.membership_config
                    .membership()
                    .get_node(&gone.id())
                    .is_none()
            },
            "the removal reaches the newcomer",
        )
        .await
        .unwrap();
    assert_eq!(cluster.nodes[d].core.members(), members);

    let removed = cluster.nodes.remove(cluster.position(gone.id()));
    removed.stop().await;
    cluster.propose_all(8, 2).await;
    cluster.converge().await;
    cluster.stop().await;
}

fn entry(index: u64, len: usize) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Cmd(write(0, vec![index as u8; len]))),
    }
}

#[tokio::test]
async fn oversized_append_entries_asks_for_fewer_entries() {
    let pki = Pki::new();
    let endpoint = pki.endpoint("core-a", ([127, 0, 0, 1], 0).into()).unwrap();
    let mut net = Network::new(1, endpoint, 10_000);
    let target = Member {
        name: "core-b".into(),
        addr: "127.0.0.1:9".into(),
    };
    let mut client = net.new_client(node_id("core-b"), &target).await;
    let request = |entries| AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(1, 1),
        prev_log_id: None,
        leader_commit: None,
        entries,
    };
    let option = RPCOption::new(Duration::from_secs(5));
    let many = (1..=5).map(|i| entry(i, 4000)).collect();
    match client.append_entries(request(many), option.clone()).await {
        Err(RPCError::PayloadTooLarge(p)) => assert_eq!(p.entries_hint(), 2),
        other => panic!("expected PayloadTooLarge: {other:?}"),
    }
    let huge = vec![entry(1, 20_000)];
    assert!(matches!(
        client.append_entries(request(huge), option).await,
        Err(RPCError::Network(_))
    ));
}

#[tokio::test]
async fn rpcs_to_the_wrong_peer_or_no_peer_are_unreachable() {
    let pki = Pki::new();
    let local = ([127, 0, 0, 1], 0).into();
    let endpoint = pki.endpoint("core-a", local).unwrap();
    let impostor = pki.endpoint("core-x", local).unwrap();
    let accept = {
        let impostor = impostor.clone();
        tokio::spawn(async move {
            while let Some(incoming) = impostor.accept().await {
                let _ = incoming.await;
            }
        })
    };
    let mut net = Network::new(1, endpoint.clone(), DEFAULT_MAX_FRAME);
    let vote = VoteRequest {
        vote: Vote::new(1, 1),
        last_log_id: None,
    };
    let option = RPCOption::new(Duration::from_secs(10));

    let wrong = Member {
        name: "core-b".into(),
        addr: impostor.local_addr().unwrap().to_string(),
    };
    let mut client = net.new_client(wrong.id(), &wrong).await;
    match client.vote(vote.clone(), option.clone()).await {
        Err(RPCError::Unreachable(e)) => assert!(e.to_string().contains("core-x"), "{e}"),
        other => panic!("expected Unreachable: {other:?}"),
    }

    let nowhere = Member {
        name: "core-c".into(),
        addr: "no port".into(),
    };
    let mut client = net.new_client(nowhere.id(), &nowhere).await;
    assert!(matches!(
        client.vote(vote.clone(), option.clone()).await,
        Err(RPCError::Unreachable(_))
    ));

    let silent = pki.endpoint("core-d", local).unwrap();
    let slow = Member {
        name: "core-d".into(),
        addr: silent.local_addr().unwrap().to_string(),
    };
    let mut client = net.new_client(slow.id(), &slow).await;
    let short = RPCOption::new(Duration::from_millis(200));
    assert!(matches!(
        client.vote(vote, short).await,
        Err(RPCError::Timeout(_))
    ));

    accept.abort();
}
