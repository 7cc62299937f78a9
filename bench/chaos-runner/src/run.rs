//! One chaos run: a real cluster behind the proxy, concurrent writers, status samplers, the
//! seeded faults, healing, convergence, and the checker over what was recorded.
//!
//! Invariants:
//! - Every write, fault, heal and status sample is recorded with its time from the start of
//!   the faults; the history goes to `history.jsonl` in the run's directory.
//! - Writers are sequential each: a writer's next write starts after its previous one
//!   answered or timed out, so its writes are ordered for the checker.
//! - A sample counts only if the node's process did not change while it was taken.
//! - When the faults end, writes stop first, then every fault is healed (killed processes
//!   restarted, paused ones continued, the proxy cleared, the disk freed); convergence is
//!   timed from there.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::check::{self, Sample, WriteRec};
use crate::cluster::{self, Bins, Kind, Node, State, Tmpfs};
use crate::layout::{self, Layout};
use crate::plan::{self, FaultKind, Planned};
use crate::proxy::{LinkRule, Proxy, ProxyStats};

/// Longest a core fault waits for the previous one to be healed before it is skipped.
const CORE_WAIT: Duration = Duration::from_secs(15);

/// What a run does.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    /// How long faults are injected (writes run over the same time).
    pub duration: Duration,
    pub cores: usize,
    pub relays: usize,
    /// Concurrent sequential writers.
    pub writers: u32,
    /// The file's length (zeros at first).
    pub file_len: u64,
    /// Children per node (small, so the tree has inner relays).
    pub fanout: usize,
    pub bins: Bins,
    /// The run's directory (default: a new one under the temp dir).
    pub work: Option<PathBuf>,
    /// Keep the run's directory even when the verdict passes.
    pub keep: bool,
    /// The convergence property's limit.
    pub convergence_limit: Duration,
    /// Longest wait for convergence and for the copies to be written (beyond the limit, so a
    /// slow run still reports how long it took).
    pub converge_timeout: Duration,
    /// Longest wait for one write's answer.
    pub write_timeout: Duration,
    /// Longest wait for the cluster to start and for every relay to hold the first version.
    pub start_timeout: Duration,
}

impl Config {
    /// The defaults of `bench/chaos` for `seed`, with binaries from `bins`.
    pub fn new(seed: u64, bins: Bins) -> Config {
        Config {
            seed,
            duration: Duration::from_secs(120),
            cores: 3,
            relays: 20,
            writers: 4,
            file_len: 1 << 20,
            fanout: 4,
            bins,
            work: None,
            keep: false,
            convergence_limit: Duration::from_secs(5),
            converge_timeout: Duration::from_secs(120),
            write_timeout: Duration::from_secs(5),
            start_timeout: Duration::from_secs(180),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.cores == 0 || self.relays == 0 || self.writers == 0 {
            bail!("--cores, --relays and --writers must be at least 1");
        }
        if self.cores > 99 || self.relays > 999 {
            bail!("at most 99 cores and 999 relays");
        }
        let l = Layout {
            file_len: self.file_len,
            writers: self.writers,
        };
        if l.writes_per_writer() < 16 {
            bail!("the file is too small for {} writers", self.writers);
        }
        Ok(())
    }
}

/// The result of a run (the `--json` document).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub seed: u64,
    pub duration_s: f64,
    pub cores: usize,
    pub relays: usize,
    pub writers: u32,
    pub file_bytes: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Faults planned but not injected (no target fitted), by kind.
    pub faults_skipped: BTreeMap<String, u64>,
    /// Whole fault kinds this run could not make, and why.
    pub skipped: Vec<String>,
    pub acked: u64,
    pub failed: u64,
    pub failed_applied: u64,
    pub lost: u64,
    pub overwritten_by_failed: u64,
    pub twice: u64,
    pub regressions: u64,
    pub restart_rewinds: u64,
    pub first_restart_rewind: Option<String>,
    pub foreign_roots: u64,
    pub unverified_pairs: u64,
    pub samples: u64,
    /// Seconds from the end of the faults until every node showed the core's pair.
    pub max_convergence_s: Option<f64>,
    pub last_to_converge: Option<String>,
    pub convergence_limit_s: f64,
    /// "pass" or "fail".
    pub verdict: String,
    pub failures: Vec<check::Failure>,
    /// ERROR and WARN lines in the nodes' logs.
    pub error_lines: u64,
    pub warn_lines: u64,
    pub error_lines_by_node: BTreeMap<String, u64>,
    /// Per leader kill or isolation: when, and how long until a write invoked after it was
    /// acknowledged (None: none was before the end).
    pub leader_faults: Vec<LeaderFault>,
    pub proxy: ProxyStats,
    pub work_dir: String,
    pub elapsed_s: f64,
}

/// How writes fared after the leader was killed or cut off.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LeaderFault {
    pub kind: String,
    pub t_s: f64,
    pub hold_s: f64,
    /// From the fault to the first acknowledgment of a write invoked after it.
    pub first_ack_after_s: Option<f64>,
}

/// Leader faults among `events`, with the first acknowledgment after each.
fn leader_faults(events: &[Value], writes: &[WriteRec]) -> Vec<LeaderFault> {
    let kinds = [FaultKind::KillLeader, FaultKind::PartitionLeaderAlone].map(|k| k.name());
    events
        .iter()
        .filter(|e| e["event"] == "fault")
        .filter_map(|e| {
            let kind = e["kind"].as_str()?;
            kinds.iter().any(|k| k == kind).then_some(())?;
            let t = e["t_s"].as_f64()?;
            let first = writes
                .iter()
                .filter(|w| w.version.is_some() && w.invoked_s >= t)
                .map(|w| w.done_s)
                .min_by(f64::total_cmp);
            Some(LeaderFault {
                kind: kind.to_string(),
                t_s: t,
                hold_s: e["hold_s"].as_f64().unwrap_or(0.0),
                first_ack_after_s: first.map(|d| ((d - t) * 1e3).round() / 1e3),
            })
        })
        .collect()
}

/// The latest status of a node, for picking fault targets.
#[derive(Clone, Debug, Default)]
struct Latest {
    parent: String,
    children: Vec<String>,
}

struct Shared {
    cfg: Config,
    layout: Layout,
    /// The start of the faults (and of the history's clock).
    t0: OnceLock<Instant>,
    names: Vec<String>,
    kinds: Vec<Kind>,
    nodes: Vec<Mutex<Node>>,
    ports: Mutex<cluster::Ports>,
    proxy: Proxy,
    http: reqwest::Client,
    latest: Mutex<Vec<Latest>>,
    samples: Mutex<Vec<Sample>>,
    writes: Mutex<Vec<WriteRec>>,
    events: Mutex<Vec<Value>>,
    tmpfs: Option<Tmpfs>,
    disk_node: Option<usize>,
    /// Faults now holding that take a core out (kills count until the restart is up).
    core_faults: AtomicUsize,
    stop_writers: AtomicBool,
    stop_samplers: AtomicBool,
}

impl Shared {
    fn now_s(&self) -> f64 {
        let t = self.t0.get().map_or(0.0, |t| t.elapsed().as_secs_f64());
        (t * 1e3).round() / 1e3
    }

    fn t0(&self) -> Instant {
        *self.t0.get_or_init(Instant::now)
    }

    fn event(&self, what: &str, mut detail: Value) {
        detail["t_s"] = json!(self.now_s());
        detail["event"] = json!(what);
        self.events.lock().unwrap().push(detail);
    }

    fn api(&self, i: usize) -> SocketAddr {
        self.nodes[i].lock().unwrap().api
    }

    fn state(&self, i: usize) -> State {
        self.nodes[i].lock().unwrap().state
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    fn of_kind(&self, kind: Kind) -> Vec<usize> {
        (0..self.names.len())
            .filter(|i| self.kinds[*i] == kind)
            .collect()
    }

    async fn status(&self, i: usize, timeout: Duration) -> Option<Value> {
        let url = format!("http://{}/v1/status", self.api(i));
        let r = self.http.get(url).timeout(timeout).send().await.ok()?;
        let s: Value = r.json().await.ok()?;
        (s["name"] == self.names[i].as_str()).then_some(s)
    }

    /// The core member that says it leads now (asked now, not from the samples).
    async fn leader(&self) -> Option<usize> {
        for i in self.of_kind(Kind::Core) {
            if self.state(i) != State::Up {
                continue;
            }
            if let Some(s) = self.status(i, Duration::from_secs(1)).await {
                if s["role"] == "leader" {
                    return Some(i);
                }
            }
        }
        None
    }

    /// The leader, waiting up to `CORE_WAIT` for one (an election may be under way).
    async fn wait_leader(&self) -> Option<usize> {
        let until = Instant::now() + CORE_WAIT;
        loop {
            if let Some(l) = self.leader().await {
                return Some(l);
            }
            if Instant::now() > until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether every core member is up and no fault holds one out.
    fn cores_whole(&self) -> bool {
        self.core_faults.load(Ordering::SeqCst) == 0
            && self
                .of_kind(Kind::Core)
                .iter()
                .all(|i| self.state(*i) == State::Up)
    }

    /// Starts node `i`'s process and waits for its API; new ports after a failed start.
    async fn start_node(&self, i: usize) -> anyhow::Result<()> {
        for attempt in 0..5 {
            let api = {
                let mut n = self.nodes[i].lock().unwrap();
                if attempt > 0 {
                    n.kill();
                    n.new_ports(&mut self.ports.lock().unwrap())?;
                    self.proxy.set_backend(i, n.backend);
                }
                n.spawn()?;
                n.api
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            let node = &self.nodes[i];
            let exited = || node.lock().unwrap().exited();
            if cluster::wait_api(&self.http, api, &self.names[i], deadline, exited).await {
                return Ok(());
            }
        }
        bail!("{} did not start; see its log", self.names[i])
    }
}

/// Runs the chaos scenario of `cfg`, judges it, and cleans up (the directory stays when the
/// verdict fails or `keep` is set).
pub async fn run(cfg: Config) -> anyhow::Result<Report> {
    cfg.validate()?;
    let started = Instant::now();
    let work = match &cfg.work {
        Some(w) => w.clone(),
        None => std::env::temp_dir().join(format!(
            "canopy-chaos-{}-{}-{}",
            cfg.seed,
            std::process::id(),
            started.elapsed().as_nanos()
        )),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let sh = Arc::new(setup(cfg.clone(), &work).await?);
    let result = drive(&sh, &work).await;
    let report = match result {
        Ok(mut r) => {
            r.elapsed_s = started.elapsed().as_secs_f64();
            r
        }
        Err(e) => {
            write_history(&sh, &work, &[]);
            return Err(e.context(format!("chaos run in {}", work.display())));
        }
    };
    drop(sh);
    if report.verdict == "pass" && !cfg.keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(report)
}

async fn setup(cfg: Config, work: &Path) -> anyhow::Result<Shared> {
    let bins = cfg.bins.clone();
    for b in [&bins.canopy, &bins.core_node, &bins.relay_node] {
        if !b.exists() {
            bail!(
                "{} is missing (build the canopy binaries first)",
                b.display()
            );
        }
    }
    let ca = work.join("ca");
    let tls = work.join("tls");
    cluster::canopy_cli(&bins, &["ca", "init", "--out", &ca.display().to_string()])?;
    let mut names: Vec<String> = (0..cfg.cores).map(|i| format!("core-{i}")).collect();
    names.extend((0..cfg.relays).map(|i| format!("relay-{i:02}")));
    let kinds: Vec<Kind> = (0..names.len())
        .map(|i| {
            if i < cfg.cores {
                Kind::Core
            } else {
                Kind::Relay
            }
        })
        .collect();
    for (n, k) in names.iter().zip(&kinds) {
        let role = if *k == Kind::Core { "core" } else { "relay" };
        cluster::canopy_cli(
            &bins,
            &[
                "cert",
                "issue",
                "--ca",
                &ca.display().to_string(),
                "--name",
                n,
                "--role",
                role,
                "--out",
                &tls.display().to_string(),
            ],
        )?;
    }
    let mut ports = cluster::Ports::new(cfg.seed);
    let backends = names
        .iter()
        .map(|_| ports.addr())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let proxy = Proxy::start(backends.clone(), cfg.seed).await?;
    let peers: Vec<String> = (0..cfg.cores)
        .flat_map(|i| {
            [
                "--peer".to_string(),
                format!("{}={}", names[i], proxy.front(i)),
            ]
        })
        .collect();
    let join: Vec<String> = (0..cfg.cores).map(|i| proxy.front(i).to_string()).collect();
    let mut skipped = Vec::new();
    let disk_node = cfg.cores + (cfg.seed as usize % cfg.relays);
    let disk_dir = work.join(format!("disk-{}", names[disk_node]));
    let tmpfs = match Tmpfs::mount(&disk_dir, 2 * cfg.file_len + (512 << 10)) {
        Ok(t) => Some(t),
        Err(e) => {
            skipped.push(format!("disk_full: {e:#}"));
            None
        }
    };
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (data, file) = if tmpfs.is_some() && i == disk_node {
            (disk_dir.join("data"), disk_dir.join("file"))
        } else {
            (work.join("data").join(name), work.join("files").join(name))
        };
        let mut args = vec!["--fanout".to_string(), cfg.fanout.to_string()];
        if kinds[i] == Kind::Core {
            args.push("--init".into());
            args.extend(peers.iter().cloned());
        } else {
            args.push("--join".into());
            args.push(join.join(","));
        }
        let node = Node::new(
            name,
            kinds[i],
            &bins,
            work,
            &tls,
            (data, file),
            (backends[i], proxy.front(i), ports.addr()?),
            args,
        )?;
        nodes.push(Mutex::new(node));
    }
    let sh = Shared {
        layout: Layout {
            file_len: cfg.file_len,
            writers: cfg.writers,
        },
        t0: OnceLock::new(),
        latest: Mutex::new(vec![Latest::default(); names.len()]),
        names,
        kinds,
        nodes,
        ports: Mutex::new(ports),
        proxy,
        http: reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(2))
            .build()?,
        samples: Mutex::new(Vec::new()),
        writes: Mutex::new(Vec::new()),
        events: Mutex::new(Vec::new()),
        disk_node: tmpfs.as_ref().map(|_| disk_node),
        tmpfs,
        core_faults: AtomicUsize::new(0),
        stop_writers: AtomicBool::new(false),
        stop_samplers: AtomicBool::new(false),
        cfg,
    };
    for s in skipped {
        sh.event("skipped", json!({ "what": s }));
    }
    Ok(sh)
}

async fn drive(sh: &Arc<Shared>, work: &Path) -> anyhow::Result<Report> {
    let cfg = &sh.cfg;
    // The cluster: cores, a first version, then relays that all hold it.
    let deadline = Instant::now() + cfg.start_timeout;
    for i in sh.of_kind(Kind::Core) {
        sh.start_node(i).await?;
    }
    let (v0, root0) = loop {
        if Instant::now() > deadline {
            bail!("the core did not elect a leader and take the first version");
        }
        if let Some(l) = sh.leader().await {
            let url = format!("http://{}/v1/file", sh.api(l));
            let put = sh
                .http
                .put(url)
                .body(vec![0u8; cfg.file_len as usize])
                .timeout(Duration::from_secs(30))
                .send()
                .await;
            if let Ok(r) = put {
                if r.status().is_success() {
                    let s = sh
                        .status(l, Duration::from_secs(5))
                        .await
                        .ok_or_else(|| anyhow!("the leader stopped answering"))?;
                    break (
                        s["version"].as_u64().unwrap_or(0),
                        s["root"].as_str().unwrap_or("").to_string(),
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for i in sh.of_kind(Kind::Relay) {
        sh.start_node(i).await?;
    }
    loop {
        let mut behind = Vec::new();
        for i in sh.of_kind(Kind::Relay) {
            let ok = sh
                .status(i, Duration::from_secs(2))
                .await
                .is_some_and(|s| s["version"].as_u64() >= Some(v0) && s["root"].as_str().is_some());
            if !ok {
                behind.push(sh.names[i].clone());
            }
        }
        if behind.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("relays did not take the first version: {behind:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = sh.t0.set(Instant::now());
    sh.event(
        "started",
        json!({ "version": v0, "root": root0, "nodes": sh.names }),
    );

    let mut samplers = JoinSet::new();
    for i in 0..sh.names.len() {
        samplers.spawn(sampler(sh.clone(), i));
    }
    let mut writers = JoinSet::new();
    for w in 0..cfg.writers {
        writers.spawn(writer(sh.clone(), w));
    }

    // The faults.
    let schedule = plan::plan(cfg.seed, cfg.duration, sh.tmpfs.is_some());
    sh.event(
        "plan",
        json!({ "faults": schedule.len(), "plan": schedule }),
    );
    let (heal_tx, heal_rx) = watch::channel(false);
    let mut heals = JoinSet::new();
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    let mut faults_skipped: BTreeMap<String, u64> = BTreeMap::new();
    for f in &schedule {
        tokio::time::sleep_until(sh.t0() + f.at).await;
        if f.kind.takes_a_core() {
            // A restart may take longer than the plan's margin on a loaded machine: the next
            // core fault waits for it rather than taking a second member out.
            let until = Instant::now() + CORE_WAIT;
            while !sh.cores_whole() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        match inject(sh, f).await {
            Ok(heal) => {
                *faults.entry(f.kind.name()).or_default() += 1;
                let sh2 = sh.clone();
                let mut rx = heal_rx.clone();
                let f2 = f.clone();
                heals.spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(f2.hold) => {}
                        _ = rx.wait_for(|h| *h) => {}
                    }
                    heal.run(&sh2, &f2).await
                });
            }
            Err(why) => {
                *faults_skipped.entry(f.kind.name()).or_default() += 1;
                sh.event(
                    "skipped",
                    json!({ "fault": f.id, "kind": f.kind, "why": why }),
                );
            }
        }
        while let Some(r) = heals.try_join_next() {
            r??;
        }
    }
    tokio::time::sleep_until(sh.t0() + cfg.duration).await;

    // The end: writes stop and every fault heals; convergence is timed from there, and waits
    // for the writes still under way.
    sh.stop_writers.store(true, Ordering::SeqCst);
    let _ = heal_tx.send(true);
    while let Some(r) = heals.join_next().await {
        r??;
    }
    sh.proxy.clear_all();
    for i in 0..sh.names.len() {
        match sh.state(i) {
            State::Down => sh.start_node(i).await?,
            State::Paused => sh.nodes[i].lock().unwrap().resume()?,
            State::Up => {}
        }
    }
    if let Some(t) = &sh.tmpfs {
        t.free();
    }
    let healed = Instant::now();
    sh.event("healed", json!({}));
    let writers_done = Arc::new(AtomicBool::new(false));
    let done = writers_done.clone();
    let sh2 = sh.clone();
    let writers = tokio::spawn(async move {
        while let Some(r) = writers.join_next().await {
            r?;
        }
        sh2.event("writes stopped", json!({}));
        done.store(true, Ordering::SeqCst);
        anyhow::Ok(())
    });
    let convergence = converge(sh, healed, &writers_done).await;
    writers.await??;
    match &convergence {
        Some((s, last)) => sh.event("converged", json!({ "after_s": s, "last": last })),
        None => sh.event("not converged", json!({})),
    }
    let materialized = materialized(sh).await;
    sh.stop_samplers.store(true, Ordering::SeqCst);
    while let Some(r) = samplers.join_next().await {
        r?;
    }
    if let Err(e) = &materialized {
        sh.event("not materialized", json!({ "why": e.to_string() }));
    }

    // The checker.
    let files: Vec<Option<Vec<u8>>> = sh
        .nodes
        .iter()
        .map(|n| std::fs::read(&n.lock().unwrap().file).ok())
        .collect();
    let is_core: Vec<bool> = sh.kinds.iter().map(|k| *k == Kind::Core).collect();
    let writes = sh.writes.lock().unwrap().clone();
    let mut samples = sh.samples.lock().unwrap().clone();
    samples.sort_by(|a, b| a.node.cmp(&b.node).then(a.t_s.total_cmp(&b.t_s)));
    let verdict = check::check(&check::Input {
        names: &sh.names,
        is_core: &is_core,
        layout: sh.layout,
        writes: &writes,
        samples: &samples,
        files: &files,
        convergence: convergence.clone(),
        convergence_limit_s: cfg.convergence_limit.as_secs_f64(),
    });
    let mut error_lines_by_node = BTreeMap::new();
    let (mut errors, mut warns) = (0, 0);
    for n in &sh.nodes {
        let n = n.lock().unwrap();
        let (e, w) = n.log_levels();
        errors += e;
        warns += w;
        if e > 0 {
            error_lines_by_node.insert(n.name.clone(), e);
        }
    }
    let skipped: Vec<String> = sh
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "skipped" && e.get("what").is_some())
        .filter_map(|e| e["what"].as_str().map(str::to_string))
        .collect();
    let report = Report {
        seed: cfg.seed,
        duration_s: cfg.duration.as_secs_f64(),
        cores: cfg.cores,
        relays: cfg.relays,
        writers: cfg.writers,
        file_bytes: cfg.file_len,
        faults,
        faults_skipped,
        skipped,
        acked: verdict.acked,
        failed: verdict.failed,
        failed_applied: verdict.failed_applied,
        lost: verdict.lost,
        overwritten_by_failed: verdict.overwritten_by_failed,
        twice: verdict.twice,
        regressions: verdict.regressions,
        restart_rewinds: verdict.restart_rewinds,
        first_restart_rewind: verdict.first_restart_rewind.clone(),
        foreign_roots: verdict.foreign_roots,
        unverified_pairs: verdict.unverified_pairs,
        samples: samples.len() as u64,
        max_convergence_s: convergence.as_ref().map(|c| c.0),
        last_to_converge: convergence.map(|c| c.1),
        convergence_limit_s: cfg.convergence_limit.as_secs_f64(),
        verdict: if verdict.pass { "pass" } else { "fail" }.into(),
        failures: verdict.failures.clone(),
        error_lines: errors,
        warn_lines: warns,
        error_lines_by_node,
        leader_faults: leader_faults(&sh.events.lock().unwrap(), &writes),
        proxy: sh.proxy.stats(),
        work_dir: work.display().to_string(),
        elapsed_s: 0.0,
    };
    write_history(sh, work, &samples);
    Ok(report)
}

/// Writes the events, the writes and the samples to `history.jsonl`, one object a line.
fn write_history(sh: &Shared, work: &Path, samples: &[Sample]) {
    use std::io::Write;
    let Ok(f) = std::fs::File::create(work.join("history.jsonl")) else {
        return;
    };
    let mut f = std::io::BufWriter::new(f);
    for e in sh.events.lock().unwrap().iter() {
        let _ = writeln!(f, "{e}");
    }
    for w in sh.writes.lock().unwrap().iter() {
        let _ = writeln!(f, "{}", json!({ "event": "write", "write": w }));
    }
    for s in samples {
        let _ = writeln!(
            f,
            "{}",
            json!({ "event": "sample", "node": sh.names[s.node], "sample": s })
        );
    }
}

/// How a fault is undone.
enum Heal {
    Restart(usize),
    Resume(usize),
    Links,
    Disk,
}

impl Heal {
    async fn run(self, sh: &Shared, f: &Planned) -> anyhow::Result<()> {
        match self {
            Heal::Restart(i) => {
                sh.start_node(i).await?;
                let inc = sh.nodes[i].lock().unwrap().incarnation;
                sh.event(
                    "restarted",
                    json!({ "fault": f.id, "node": sh.names[i], "process": inc }),
                );
            }
            Heal::Resume(i) => {
                let mut n = sh.nodes[i].lock().unwrap();
                if n.state == State::Paused {
                    n.resume()?;
                }
                drop(n);
                sh.event("resumed", json!({ "fault": f.id, "node": sh.names[i] }));
            }
            Heal::Links => {
                sh.proxy.clear(f.id);
                sh.event("links healed", json!({ "fault": f.id }));
            }
            Heal::Disk => {
                if let Some(t) = &sh.tmpfs {
                    t.free();
                }
                sh.event("disk freed", json!({ "fault": f.id }));
            }
        }
        if f.kind.takes_a_core() {
            sh.core_faults.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Starts fault `f` on the target its pick selects among those that fit now; the reason it
/// cannot otherwise.
async fn inject(sh: &Shared, f: &Planned) -> Result<Heal, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(f.pick);
    let pick = |v: &[usize], rng: &mut ChaCha8Rng| -> Option<usize> {
        (!v.is_empty()).then(|| v[rng.random_range(0..v.len())])
    };
    if f.kind.takes_a_core() && !sh.cores_whole() {
        return Err("a core member is still out".into());
    }
    let up = |kind: Kind| -> Vec<usize> {
        sh.of_kind(kind)
            .into_iter()
            .filter(|i| sh.state(*i) == State::Up)
            .collect()
    };
    let latest = sh.latest.lock().unwrap().clone();
    let inner: Vec<usize> = up(Kind::Relay)
        .into_iter()
        .filter(|i| !latest[*i].children.is_empty())
        .collect();
    let detail = |target: &[usize]| -> Value {
        json!({
            "fault": f.id, "kind": f.kind, "hold_s": f.hold.as_secs_f64(), "level": f.level,
            "nodes": target.iter().map(|i| sh.names[*i].clone()).collect::<Vec<_>>(),
        })
    };
    let heal = match f.kind {
        FaultKind::KillLeader | FaultKind::KillFollower => {
            let leader = sh.wait_leader().await.ok_or("no leader")?;
            let target = if f.kind == FaultKind::KillLeader {
                leader
            } else {
                let followers: Vec<usize> = up(Kind::Core)
                    .into_iter()
                    .filter(|i| *i != leader)
                    .collect();
                pick(&followers, &mut rng).ok_or("no follower")?
            };
            sh.core_faults.fetch_add(1, Ordering::SeqCst);
            sh.nodes[target].lock().unwrap().kill();
            sh.event("fault", detail(&[target]));
            Heal::Restart(target)
        }
        FaultKind::KillInnerRelay | FaultKind::KillLeaf => {
            let candidates: Vec<usize> = if f.kind == FaultKind::KillInnerRelay {
                inner.clone()
            } else {
                up(Kind::Relay)
                    .into_iter()
                    .filter(|i| latest[*i].children.is_empty() && !latest[*i].parent.is_empty())
                    .collect()
            };
            let target = pick(&candidates, &mut rng).ok_or("no such relay up")?;
            sh.nodes[target].lock().unwrap().kill();
            sh.event("fault", detail(&[target]));
            Heal::Restart(target)
        }
        FaultKind::PauseCore | FaultKind::PauseRelay => {
            let kind = if f.kind == FaultKind::PauseCore {
                Kind::Core
            } else {
                Kind::Relay
            };
            let target = pick(&up(kind), &mut rng).ok_or("no node up")?;
            if f.kind.takes_a_core() {
                sh.core_faults.fetch_add(1, Ordering::SeqCst);
            }
            sh.nodes[target]
                .lock()
                .unwrap()
                .pause()
                .map_err(|e| e.to_string())?;
            sh.event("fault", detail(&[target]));
            Heal::Resume(target)
        }
        FaultKind::PartitionCoreMinority => {
            let mut cores = sh.of_kind(Kind::Core);
            if cores.len() < 3 {
                return Err("fewer than 3 cores".into());
            }
            let m = (cores.len() - 1) / 2;
            let start = rng.random_range(0..cores.len());
            cores.rotate_left(start);
            let (minority, majority) = cores.split_at(m);
            let links: Vec<(usize, usize)> = minority
                .iter()
                .flat_map(|a| majority.iter().flat_map(move |b| [(*a, *b), (*b, *a)]))
                .collect();
            sh.core_faults.fetch_add(1, Ordering::SeqCst);
            sh.proxy.set(f.id, links, LinkRule::blocked());
            sh.event("fault", detail(minority));
            Heal::Links
        }
        FaultKind::PartitionLeaderAlone => {
            let leader = sh.wait_leader().await.ok_or("no leader")?;
            let links: Vec<(usize, usize)> = (0..sh.names.len())
                .filter(|i| *i != leader)
                .flat_map(|i| [(leader, i), (i, leader)])
                .collect();
            sh.core_faults.fetch_add(1, Ordering::SeqCst);
            sh.proxy.set(f.id, links, LinkRule::blocked());
            sh.event("fault", detail(&[leader]));
            Heal::Links
        }
        FaultKind::PartitionSubtree => {
            let with_parent: Vec<usize> = inner
                .iter()
                .copied()
                .filter(|i| sh.index(&latest[*i].parent).is_some())
                .collect();
            let r = pick(&with_parent, &mut rng).ok_or("no inner relay with a parent")?;
            let p = sh.index(&latest[r].parent).ok_or("parent unknown")?;
            sh.proxy
                .set(f.id, vec![(r, p), (p, r)], LinkRule::blocked());
            sh.event("fault", detail(&[r, p]));
            Heal::Links
        }
        FaultKind::PartitionOneWay => {
            let cores = sh.of_kind(Kind::Core);
            let mut pairs: Vec<(usize, usize)> = cores
                .iter()
                .flat_map(|a| cores.iter().filter(move |b| *b != a).map(move |b| (*a, *b)))
                .collect();
            for r in sh.of_kind(Kind::Relay) {
                if let Some(p) = sh.index(&latest[r].parent) {
                    pairs.push((r, p));
                    pairs.push((p, r));
                }
            }
            let (a, b) = pairs[rng.random_range(0..pairs.len())];
            sh.proxy.set(f.id, vec![(a, b)], LinkRule::blocked());
            sh.event("fault", detail(&[a, b]));
            Heal::Links
        }
        FaultKind::Loss
        | FaultKind::Delay
        | FaultKind::Duplicate
        | FaultKind::Reorder
        | FaultKind::Throttle => {
            let n = sh.names.len();
            let mut all: Vec<usize> = (0..n).collect();
            let k = rng.random_range(1..=3usize).min(n);
            let mut chosen = Vec::new();
            for _ in 0..k {
                chosen.push(all.swap_remove(rng.random_range(0..all.len())));
            }
            let links: Vec<(usize, usize)> = chosen
                .iter()
                .flat_map(|a| {
                    (0..n)
                        .filter(move |b| b != a)
                        .flat_map(move |b| [(*a, b), (b, *a)])
                })
                .collect();
            let rule = match f.kind {
                FaultKind::Loss => LinkRule {
                    drop: f.level,
                    ..Default::default()
                },
                FaultKind::Delay => LinkRule {
                    delay_ms: f.level as u64,
                    jitter_ms: f.level as u64 / 2,
                    ..Default::default()
                },
                FaultKind::Duplicate => LinkRule {
                    duplicate: f.level,
                    ..Default::default()
                },
                FaultKind::Reorder => LinkRule {
                    reorder: f.level,
                    ..Default::default()
                },
                _ => LinkRule {
                    rate_bytes_per_s: Some(f.level as u64),
                    ..Default::default()
                },
            };
            sh.proxy.set(f.id, links, rule);
            sh.event("fault", detail(&chosen));
            Heal::Links
        }
        FaultKind::DiskFull => {
            let (Some(t), Some(i)) = (&sh.tmpfs, sh.disk_node) else {
                return Err("no tmpfs".into());
            };
            let filled = t.fill();
            let mut d = detail(&[i]);
            d["filled_bytes"] = json!(filled);
            sh.event("fault", d);
            Heal::Disk
        }
    };
    Ok(heal)
}

/// Writer `w`: sequential PATCHes of its records through random nodes until told to stop.
async fn writer(sh: Arc<Shared>, w: u32) {
    let mut rng = ChaCha8Rng::seed_from_u64(sh.cfg.seed.wrapping_mul(1000).wrapping_add(w as u64));
    let cores = sh.of_kind(Kind::Core);
    for i in 0..sh.layout.writes_per_writer() {
        if sh.stop_writers.load(Ordering::SeqCst) {
            return;
        }
        let node = rng.random_range(0..sh.names.len());
        let offset = sh.layout.offset(w, i);
        let url = format!("http://{}/v1/file?offset={offset}", sh.api(node));
        let invoked_s = sh.now_s();
        let res = sh
            .http
            .patch(url)
            .body(sh.layout.payload(w, i))
            .timeout(sh.cfg.write_timeout)
            .send()
            .await;
        let (version, error) = match res {
            Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                Ok(v) => match v["version"].as_u64() {
                    Some(ver) => (Some(ver), None),
                    None => (None, Some(format!("answer without a version: {v}"))),
                },
                Err(e) => (None, Some(format!("reading the answer: {e}"))),
            },
            Ok(r) => {
                let code = r.status();
                let body = r.text().await.unwrap_or_default();
                (None, Some(format!("{code}: {}", body.trim())))
            }
            Err(e) => (None, Some(error_chain(&e))),
        };
        let done_s = sh.now_s();
        let mut seen_applied = false;
        if version.is_none() {
            let c = cores[rng.random_range(0..cores.len())];
            seen_applied = read_back(&sh, c, offset, &layout::record(w, i)).await;
        }
        sh.writes.lock().unwrap().push(WriteRec {
            writer: w,
            seq: i,
            node: sh.names[node].clone(),
            invoked_s,
            done_s,
            version,
            error,
            seen_applied,
        });
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..150))).await;
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Whether core `c` now holds `record` at `offset`.
async fn read_back(sh: &Shared, c: usize, offset: u64, record: &[u8]) -> bool {
    let url = format!("http://{}/v1/file", sh.api(c));
    let range = format!("bytes={offset}-{}", offset + record.len() as u64 - 1);
    let Ok(r) = sh
        .http
        .get(url)
        .header("Range", range)
        .timeout(Duration::from_secs(2))
        .send()
        .await
    else {
        return false;
    };
    r.bytes().await.is_ok_and(|b| b.as_ref() == record)
}

/// Node `i`'s statuses, by long polls that answer at each new version (or after a second),
/// at most every 100 ms for a relay; core members are followed at every answer.
async fn sampler(sh: Arc<Shared>, i: usize) {
    let mut after = 0u64;
    let gap = if sh.kinds[i] == Kind::Core {
        Duration::ZERO
    } else {
        Duration::from_millis(100)
    };
    while !sh.stop_samplers.load(Ordering::SeqCst) {
        let (api, inc, state) = {
            let n = sh.nodes[i].lock().unwrap();
            (n.api, n.incarnation, n.state)
        };
        if state == State::Down {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let asked = Instant::now();
        let url = format!("http://{api}/v1/watch?after={after}&timeout=1");
        let got = match sh
            .http
            .get(url)
            .timeout(Duration::from_secs(3))
            .send()
            .await
        {
            Ok(r) => r.json::<Value>().await.ok(),
            Err(_) => None,
        };
        let Some(s) = got else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if sh.nodes[i].lock().unwrap().incarnation != inc || s["name"] != sh.names[i].as_str() {
            continue;
        }
        let (Some(version), Some(root)) = (s["version"].as_u64(), s["root"].as_str()) else {
            continue;
        };
        after = version;
        sh.samples.lock().unwrap().push(Sample {
            t_s: sh.now_s(),
            node: i,
            incarnation: inc,
            version,
            root: root.to_string(),
            file_version: s["file_version"].as_u64(),
        });
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        sh.latest.lock().unwrap()[i] = Latest {
            parent: s["parent"].as_str().unwrap_or("").to_string(),
            children: strings(&s["children"]),
        };
        let spent = asked.elapsed();
        if spent < gap {
            tokio::time::sleep(gap - spent).await;
        }
    }
}

/// Polls every node until each shows the leader's (version, root) and `writers_done`; the
/// seconds from `healed` until the last node got there, and which node that was.
async fn converge(
    sh: &Arc<Shared>,
    healed: Instant,
    writers_done: &AtomicBool,
) -> Option<(f64, String)> {
    let deadline = healed + sh.cfg.converge_timeout;
    let n = sh.names.len();
    // When each node started to show the current target pair without a break.
    let mut since: Vec<Option<Instant>> = vec![None; n];
    let mut target: Option<(u64, String)> = None;
    while Instant::now() < deadline {
        let mut set = JoinSet::new();
        for i in 0..n {
            let sh = sh.clone();
            set.spawn(async move { (i, sh.status(i, Duration::from_secs(2)).await) });
        }
        let mut pairs: Vec<Option<(u64, String, String)>> = vec![None; n];
        while let Some(Ok((i, s))) = set.join_next().await {
            pairs[i] = s.and_then(|s| {
                Some((
                    s["version"].as_u64()?,
                    s["root"].as_str()?.to_string(),
                    s["role"].as_str()?.to_string(),
                ))
            });
        }
        let now = Instant::now();
        let leader = pairs
            .iter()
            .flatten()
            .find(|p| p.2 == "leader")
            .map(|p| (p.0, p.1.clone()));
        if leader != target {
            since = vec![None; n];
            target = leader;
        }
        if let Some((tv, tr)) = &target {
            for i in 0..n {
                match &pairs[i] {
                    Some((v, r, _)) if v == tv && r == tr => {
                        since[i].get_or_insert(now);
                    }
                    _ => since[i] = None,
                }
            }
            if since.iter().all(Option::is_some) && writers_done.load(Ordering::SeqCst) {
                let (last, at) = since
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (i, t.unwrap_or(now)))
                    .max_by_key(|(_, t)| *t)
                    .unwrap_or((0, now));
                let s = at.saturating_duration_since(healed).as_secs_f64();
                return Some(((s * 1e3).round() / 1e3, sh.names[last].clone()));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Waits until every node's `--file` holds the version it shows.
async fn materialized(sh: &Arc<Shared>) -> anyhow::Result<()> {
    let deadline = Instant::now() + sh.cfg.converge_timeout;
    loop {
        let mut behind = Vec::new();
        for i in 0..sh.names.len() {
            let ok = sh.status(i, Duration::from_secs(2)).await.is_some_and(|s| {
                s["version"].as_u64().is_some() && s["file_version"] == s["version"]
            });
            if !ok {
                behind.push(sh.names[i].clone());
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("copies not written: {behind:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
