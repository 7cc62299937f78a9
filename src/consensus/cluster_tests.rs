use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

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

/// The real socket addresses of members cut off from all others (both directions).
#[derive(Clone, Default)]
struct Partition(Arc<Mutex<BTreeSet<SocketAddr>>>);

impl Partition {
    fn blocks(&self, a: SocketAddr, b: SocketAddr) -> bool {
        let cut = self.0.lock().unwrap();
        cut.contains(&a) || cut.contains(&b)
    }

    fn set(&self, addr: SocketAddr, cut: bool) {
        let mut set = self.0.lock().unwrap();
        if cut {
            set.insert(addr);
        } else {
            set.remove(&addr);
        }
    }
}

/// A UDP relay in front of one member's socket: peers reach the member at `front`, and the
/// relay drops every datagram to or from a member the partition cuts off.
struct Proxy {
    front: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr, partition: Partition) -> Proxy {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut replies = tokio::task::JoinSet::new();
            let mut buf = vec![0u8; 65536];
            while let Ok((n, client)) = front.recv_from(&mut buf).await {
                let back = match backs.get(&client) {
                    Some(b) => b.clone(),
                    None => {
                        let b = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        b.connect(target).await.unwrap();
                        let (b2, f2, p2) = (b.clone(), front.clone(), partition.clone());
                        replies.spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            while let Ok(n) = b2.recv(&mut buf).await {
                                if !p2.blocks(client, target) {
                                    let _ = f2.send_to(&buf[..n], client).await;
                                }
                            }
                        });
                        backs.insert(client, b.clone());
                        b
                    }
                };
                if !partition.blocks(client, target) {
                    let _ = back.send(&buf[..n]).await;
                }
            }
        });
        Proxy { front: addr, task }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How test members are set up beyond their Raft config.
#[derive(Clone)]
struct Opts {
    max_frame: usize,
    /// Put every member behind a [`Proxy`] governed by this partition.
    partition: Option<Partition>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            max_frame: DEFAULT_MAX_FRAME,
            partition: None,
        }
    }
}

/// Answer every stream of every connection the way a core node does: one `Request` frame in,
/// one `RaftReply` frame out. Aborting the task aborts every connection and stream task.
async fn serve(endpoint: quinn::Endpoint, core: Arc<Core>, max_frame: usize) {
    let mut conns = tokio::task::JoinSet::new();
    while let Some(incoming) = endpoint.accept().await {
        let core = core.clone();
        conns.spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let from = crate::tls::peer_identity(&conn)
                .map(|(name, _)| crate::consensus::node_id(&name))
                .unwrap_or_default();
            let mut streams = tokio::task::JoinSet::new();
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let core = core.clone();
                streams.spawn(async move {
                    let req = wire::read_frame::<proto::Request>(&mut recv, max_frame).await;
                    let reply = match req {
                        Ok(Some(proto::Request {
                            kind: Some(request::Kind::Raft(rpc)),
                        })) => core.handle_rpc(rpc, from).await,
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
    _proxy: Option<Proxy>,
}

impl Node {
    /// Open a core named `name` on `data` with a fresh endpoint bound to `addr`, waiting for the
    /// address to become free if a stopped node still holds it.
    async fn start(pki: &Pki, name: &str, addr: SocketAddr, data: &Path, cfg: &RaftConfig) -> Node {
        Node::start_with(pki, name, addr, data, cfg, &Opts::default()).await
    }

    async fn start_with(
        pki: &Pki,
        name: &str,
        addr: SocketAddr,
        data: &Path,
        cfg: &RaftConfig,
        opts: &Opts,
    ) -> Node {
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
        let real = endpoint.local_addr().unwrap();
        let proxy = match &opts.partition {
            Some(p) => Some(Proxy::start(real, p.clone()).await),
            None => None,
        };
        let me = Member {
            name: name.into(),
            addr: proxy.as_ref().map_or(real, |p| p.front).to_string(),
        };
        let sm = TestSm::new();
        let core = Core::open(me, data, sm.clone(), cfg, endpoint.clone(), opts.max_frame)
            .await
            .unwrap();
        let core = Arc::new(core);
        let server = tokio::spawn(serve(endpoint.clone(), core.clone(), opts.max_frame));
        Node {
            core,
            sm,
            endpoint,
            server,
            data: data.to_path_buf(),
            _proxy: proxy,
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
    opts: Opts,
    nodes: Vec<Node>,
}

impl Cluster {
    /// Start `n` members and initialize every one of them with the same member set.
    async fn start(n: usize, cfg: RaftConfig) -> Cluster {
        Cluster::start_with(n, cfg, Opts::default()).await
    }

    async fn start_with(n: usize, cfg: RaftConfig, opts: Opts) -> Cluster {
        let pki = Pki::new();
        let root = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("core-{i}");
            let data = root.path().join(&name);
            let any = ([127, 0, 0, 1], 0).into();
            nodes.push(Node::start_with(&pki, &name, any, &data, &cfg, &opts).await);
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
            opts,
            nodes,
        }
    }

    /// Cut member `i` off from every other member, or join it again.
    fn cut(&self, i: usize, cut: bool) {
        let partition = self
            .opts
            .partition
            .as_ref()
            .expect("members behind proxies");
        partition.set(self.nodes[i].addr(), cut);
    }

    /// Start one more, uninitialized member.
    async fn spawn(&mut self, name: &str) -> usize {
        let data = self.root.path().join(name);
        let node = Node::start_with(
            &self.pki,
            name,
            ([127, 0, 0, 1], 0).into(),
            &data,
            &self.cfg,
            &self.opts,
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
    let old_name = old.member().name;
    let old_term = old.core.status().term;
    old.stop().await;

    let started = Instant::now();
    for n in &cluster.nodes {
        let next = n
            .core
            .wait_for_leader_except(std::slice::from_ref(&old_name), DEADLINE)
            .await
            .unwrap();
        assert_ne!(next.name, old_name);
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
            .on_leader(|core| async move {
                // A voter that answered no heartbeat in the last second (a loaded machine)
                // makes the removal wait: it is refused until the voters answer again.
                let deadline = Instant::now() + DEADLINE;
                loop {
                    match core.remove_member(name, false).await {
                        Err(ConsensusError::WouldLoseQuorum { .. })
                            if Instant::now() < deadline =>
                        {
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        r => return r,
                    }
                }
            })
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

/// Accept connections on `endpoint` and never answer a stream: a peer with the right
/// certificate that does not take part.
fn silent(endpoint: &quinn::Endpoint) -> tokio::task::JoinHandle<()> {
    let endpoint = endpoint.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(incoming) = endpoint.accept().await {
            if let Ok(conn) = incoming.await {
                held.push(conn);
            }
        }
    })
}

fn voters_of(core: &Core) -> Vec<String> {
    core.members()
        .into_iter()
        .filter(|(_, voter)| *voter)
        .map(|(m, _)| m.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_member_that_returns_does_not_depose_the_leader() {
    let cfg = cluster_config();
    let opts = Opts {
        partition: Some(Partition::default()),
        ..Opts::default()
    };
    let cluster = Cluster::start_with(3, cfg.clone(), opts).await;
    cluster.propose_all(0, 5).await;
    cluster.converge().await;
    let l = cluster.leader().await;
    let x = (l + 1) % 3;
    let term = cluster.nodes[l].core.status().term;

    cluster.cut(x, true);
    // Cut off for several of its election timeouts, while the others commit.
    let until = Instant::now() + Duration::from_millis(4 * cfg.election_timeout_max_ms);
    let mut next = 5;
    while Instant::now() < until {
        let p = proto::Proposal {
            precondition: Some((&Precondition::IfVersion(next)).into()),
            ..write(next * 100, format!("entry-{next:05}").into_bytes())
        };
        let outcome = cluster.nodes[l].core.propose(p).await.unwrap();
        assert_eq!(outcome, ApplyOutcome::Applied { version: next + 1 });
        next += 1;
    }
    assert_eq!(
        cluster.nodes[x].core.status().term,
        term,
        "a member cut off from the others must not raise its term"
    );
    cluster.cut(x, false);
    cluster.propose_all(next, 3).await;
    cluster.converge().await;
    assert_eq!(cluster.leader().await, l, "the healthy leader stays");
    for n in &cluster.nodes {
        assert_eq!(n.core.status().term, term, "{}: no election", n.member());
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_entry_fits_one_append_entries_frame() {
    let max_frame = 1 << 20;
    let opts = Opts {
        max_frame,
        ..Opts::default()
    };
    let cluster = Cluster::start_with(3, cluster_config(), opts).await;
    cluster.propose_all(0, 1).await;
    let fits = vec![7u8; max_frame - ENTRY_FRAME_OVERHEAD - 64];
    let outcome = tokio::time::timeout(
        DEADLINE,
        cluster.on_leader(|core| {
            let p = write(0, fits.clone());
            async move { core.propose(p).await }
        }),
    )
    .await
    .expect("the largest entry that fits commits");
    assert_eq!(outcome.version(), 2);
    cluster.converge().await;

    let l = cluster.leader().await;
    let last = cluster.nodes[l].core.status().last_log_index;
    let too_large = write(0, vec![9u8; max_frame - 100]);
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        cluster.nodes[l].core.propose(too_large),
    )
    .await
    .expect("refused at once, not left to hang");
    match refused {
        Err(ConsensusError::TooLarge { len, max }) => {
            assert!(len > max);
            assert_eq!(max, max_frame);
        }
        other => panic!("expected TooLarge: {other:?}"),
    }
    assert_eq!(
        cluster.nodes[l].core.status().last_log_index,
        last,
        "nothing appended"
    );
    cluster.propose_all(2, 1).await;
    cluster.converge().await;
    cluster.stop().await;
}

/// A proposal retried with the same id after the members took snapshots and one restarted from
/// its snapshot is applied once everywhere, and the root cross-checks find no difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_straddling_a_snapshot_and_a_restart_is_applied_once() {
    let cfg = RaftConfig {
        snapshot_every_entries: 5,
        keep_logs_after_snapshot: 1000,
        root_check_interval_ms: 100,
        ..cluster_config()
    };
    let mut cluster = Cluster::start(3, cfg.clone()).await;
    let first = proto::Proposal {
        id: bytes::Bytes::from_static(b"retried-id"),
        ..write(0, &b"first"[..])
    };
    let p = first.clone();
    let outcome = cluster
        .on_leader(|core| {
            let p = p.clone();
            async move { core.propose(p).await }
        })
        .await;
    let ApplyOutcome::Applied { version: v1 } = outcome else {
        panic!("{outcome:?}");
    };
    let more = |from: u64| {
        (from..from + 20).map(|i| proto::Proposal {
            id: bytes::Bytes::from(format!("w{i}")),
            ..write(100 + i * 10, format!("{i:08}").into_bytes())
        })
    };
    for p in more(0) {
        cluster
            .on_leader(|core| {
                let p = p.clone();
                async move { core.propose(p).await }
            })
            .await;
    }
    let l = cluster.leader().await;
    let f = (l + 1) % 3;
    let down = cluster.nodes.remove(f);
    let (name, addr, data) = (down.member().name, down.addr(), down.data.clone());
    down.core
        .raft()
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index > v1),
            "a snapshot holding the first copy",
        )
        .await
        .unwrap();
    down.stop().await;
    let back = Node::start(&cluster.pki, &name, addr, &data, &cfg).await;
    assert_eq!(back.sm.installs.load(Ordering::SeqCst), 1, "restored");
    cluster.nodes.push(back);

    let second = write(0, &b"other"[..]);
    cluster
        .on_leader(|core| {
            let p = second.clone();
            async move { core.propose(p).await }
        })
        .await;
    let retry = cluster
        .on_leader(|core| {
            let p = first.clone();
            async move { core.propose(p).await }
        })
        .await;
    assert_eq!(retry, ApplyOutcome::Applied { version: v1 });
    for p in more(20) {
        cluster
            .on_leader(|core| {
                let p = p.clone();
                async move { core.propose(p).await }
            })
            .await;
    }
    cluster.converge().await;
    for n in &cluster.nodes {
        assert_eq!(&n.sm.current().to_vec()[..5], b"other", "{}", n.member());
    }
    let deadline = Instant::now() + DEADLINE;
    while cluster
        .nodes
        .iter()
        .any(|n| n.core.root_checks().matched == 0)
    {
        assert!(Instant::now() < deadline, "no root cross-check matched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in &cluster.nodes {
        assert_eq!(n.core.root_checks().mismatched, 0, "{}", n.member());
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_root_cross_check_counts_a_diverging_member() {
    let cfg = RaftConfig {
        root_check_interval_ms: 100,
        ..cluster_config()
    };
    let cluster = Cluster::start(3, cfg).await;
    cluster.propose_all(0, 3).await;
    cluster.converge().await;
    let l = cluster.leader().await;
    let x = (l + 1) % 3;
    cluster.nodes[x].sm.corrupt.store(true, Ordering::SeqCst);
    cluster.propose_all(3, 3).await;
    let deadline = Instant::now() + DEADLINE;
    while cluster.nodes[x].core.root_checks().mismatched == 0 {
        assert!(Instant::now() < deadline, "the divergence was not detected");
        cluster
            .propose_all(cluster.nodes[l].sm.current().version(), 1)
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, n) in cluster.nodes.iter().enumerate() {
        if i != x {
            assert_eq!(n.core.root_checks().mismatched, 0, "{}", n.member());
            assert!(n.core.root_checks().matched > 0, "{}", n.member());
        }
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_is_not_a_core_or_does_not_catch_up_is_not_added() {
    let cfg = RaftConfig {
        catch_up_timeout_ms: 1500,
        ..cluster_config()
    };
    let cluster = Cluster::start(3, cfg).await;
    cluster.propose_all(0, 3).await;
    let before = voters_of(&cluster.nodes[cluster.leader().await].core);

    let relay = cluster
        .pki
        .endpoint_as(
            "relay-1",
            crate::tls::Role::Relay,
            ([127, 0, 0, 1], 0).into(),
        )
        .unwrap();
    let accept = silent(&relay);
    let m = Member {
        name: "relay-1".into(),
        addr: relay.local_addr().unwrap().to_string(),
    };
    let err = cluster
        .on_leader(|core| {
            let m = m.clone();
            async move {
                match core.add_member(m).await {
                    Err(ConsensusError::NotLeader { leader }) => {
                        Err(ConsensusError::NotLeader { leader })
                    }
                    other => Ok(other),
                }
            }
        })
        .await;
    match err {
        Err(ConsensusError::BadMember { reason, .. }) => {
            assert!(reason.contains("relay"), "{reason}")
        }
        other => panic!("expected BadMember: {other:?}"),
    }

    let stuck = cluster
        .pki
        .endpoint("core-9", ([127, 0, 0, 1], 0).into())
        .unwrap();
    let accept_stuck = silent(&stuck);
    let m = Member {
        name: "core-9".into(),
        addr: stuck.local_addr().unwrap().to_string(),
    };
    let err = cluster
        .on_leader(|core| {
            let m = m.clone();
            async move {
                match core.add_member(m).await {
                    Err(ConsensusError::NotLeader { leader }) => {
                        Err(ConsensusError::NotLeader { leader })
                    }
                    other => Ok(other),
                }
            }
        })
        .await;
    assert!(
        matches!(err, Err(ConsensusError::CatchUpTimeout { .. })),
        "{err:?}"
    );
    let l = cluster.leader().await;
    assert_eq!(voters_of(&cluster.nodes[l].core), before);
    assert_eq!(
        cluster.nodes[l].core.members().len(),
        3,
        "the learner was removed again"
    );
    cluster.propose_all(3, 2).await;
    accept.abort();
    accept_stuck.abort();
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_a_voter_that_would_lose_the_quorum_needs_force() {
    let mut cluster = Cluster::start(3, cluster_config()).await;
    cluster.propose_all(0, 3).await;
    let l = cluster.leader().await;
    let (b, c) = ((l + 1) % 3, (l + 2) % 3);
    let (b_name, c_name) = (
        cluster.nodes[b].member().name,
        cluster.nodes[c].member().name,
    );
    let leader_id = cluster.nodes[l].core.id();
    let down = cluster.nodes.remove(b);
    down.stop().await;
    let core = cluster.nodes[cluster.position(leader_id)].core.clone();
    let deadline = Instant::now() + DEADLINE;
    while core.unreachable_voters() != Some(vec![b_name.clone()]) {
        assert!(Instant::now() < deadline, "{:?}", core.unreachable_voters());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match core.remove_member(&c_name, false).await {
        Err(ConsensusError::WouldLoseQuorum {
            reachable,
            needed,
            unreachable,
            ..
        }) => {
            assert_eq!((reachable, needed), (1, 2));
            assert_eq!(unreachable, b_name);
        }
        other => panic!("expected WouldLoseQuorum: {other:?}"),
    }
    assert_eq!(voters_of(&core).len(), 3);
    core.remove_member(&b_name, false).await.unwrap();
    let mut left = voters_of(&core);
    left.sort();
    let mut want = vec![core.member().name.clone(), c_name];
    want.sort();
    assert_eq!(left, want);
    cluster.propose_all(3, 2).await;
    cluster.stop().await;
}
