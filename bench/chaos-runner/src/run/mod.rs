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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::check::{self, Sample};
use crate::cluster::{self, Bins, Kind, Node, State, Tmpfs};
use crate::layout::Layout;
use crate::plan;
use crate::proxy::{Proxy, ProxyStats};

mod end;
mod faults;
mod record;
mod shared;

pub use end::LeaderFault;
use end::{converge, leader_faults, materialized};
use faults::inject;
use record::{sampler, writer};
use shared::{Latest, Shared, CORE_WAIT};

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
    /// The checker's counts and failures (flattened into the report's JSON).
    #[serde(flatten)]
    pub check: check::Verdict,
    pub samples: u64,
    /// Seconds from the end of the faults until every node showed the core's pair.
    pub max_convergence_s: Option<f64>,
    pub last_to_converge: Option<String>,
    pub convergence_limit_s: f64,
    /// "pass" or "fail".
    pub verdict: String,
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
    // Every node takes API writes with one token (`--api-token-file`), which the writers send.
    let token = format!("chaos-{}", cfg.seed);
    let token_file = work.join("api-token");
    std::fs::write(&token_file, &token)?;
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
        let mut args = vec![
            "--fanout".to_string(),
            cfg.fanout.to_string(),
            "--api-token-file".to_string(),
            token_file.display().to_string(),
        ];
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
            .default_headers(reqwest::header::HeaderMap::from_iter([(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {token}").parse()?,
            )]))
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
        samples: samples.len() as u64,
        max_convergence_s: convergence.as_ref().map(|c| c.0),
        last_to_converge: convergence.map(|c| c.1),
        convergence_limit_s: cfg.convergence_limit.as_secs_f64(),
        verdict: if verdict.pass { "pass" } else { "fail" }.into(),
        check: verdict,
        error_lines: errors,
        warn_lines: warns,
        error_lines_by_node,
        leader_faults: leader_faults(&sh.events.lock().unwrap(), &writes, &samples, &sh.names),
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
