//! `canopy demo`: a core and N relays in one process, over real QUIC on loopback.
//!
//! Invariants: every node is a real [`Node`] with its own mutual-TLS endpoint and API port
//! (certificates from a throwaway CA), started and stopped here and otherwise used only
//! through the [`Backend`] its local clients see; the load is seeded, so a run is
//! repeatable; the summary counts a relay as in sync only when its version and root equal
//! the core's.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio_util::sync::CancellationToken;

use crate::api::Backend;
use crate::config::{NodeKind, StreamConfig};
use crate::consensus::RaftConfig;
use crate::file::{ApplyOutcome, Op, Update};
use crate::measure::{parse_duration, parse_size, percentile, start_local_node, LocalNode};
use crate::node::{now_us, Node};
use crate::tls::Role;

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Number of relays.
    #[arg(long, default_value_t = 50)]
    pub relays: usize,
    /// Size of the file, e.g. 50MB, 8MiB, 1GB.
    #[arg(long, default_value = "50MB", value_parser = parse_size)]
    pub size: u64,
    /// How long to run the write load, e.g. 20s, 2m (default: until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Writes per second, each 100 bytes at a random offset, from a random relay.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Children per node.
    #[arg(long, default_value_t = 8)]
    pub fanout: usize,
    /// Seed of the content and the load.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Latency samples (µs) from commit on the core to apply on each relay.
#[derive(Default)]
struct Samples(Vec<u64>);

impl Samples {
    fn quantile(sorted: &[u64], q: f64) -> f64 {
        percentile(sorted, q) as f64 / 1000.0
    }

    fn summary(&self) -> (f64, f64, f64, usize) {
        let mut s = self.0.clone();
        s.sort_unstable();
        (
            Self::quantile(&s, 0.5),
            Self::quantile(&s, 0.99),
            s.last().copied().unwrap_or(0) as f64 / 1000.0,
            s.len(),
        )
    }
}

fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

struct Cluster {
    core: Node,
    relays: Vec<Node>,
    core_api: std::net::SocketAddr,
    core_addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

async fn start_node(
    dir: &std::path::Path,
    name: &str,
    kind: NodeKind,
    stream: &StreamConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<LocalNode> {
    start_local_node(
        name,
        &dir.join("tls"),
        &dir.join("data"),
        kind,
        stream.clone(),
        shutdown.child_token(),
    )
    .await
}

async fn build_cluster(args: &DemoArgs) -> anyhow::Result<Cluster> {
    let dir = tempfile::tempdir().context("creating a temp dir")?;
    let tls = dir.path().join("tls");
    let ca = dir.path().join("ca");
    crate::tls::ca_init(&ca)?;
    crate::tls::cert_issue(&ca, "core-0", Role::Core, &tls)?;
    for i in 0..args.relays {
        crate::tls::cert_issue(&ca, &format!("relay-{i}"), Role::Relay, &tls)?;
    }
    let stream = demo_stream(args.fanout);
    let shutdown = CancellationToken::new();
    let LocalNode {
        node: core,
        api: core_api,
        quic: core_addr,
    } = start_node(
        dir.path(),
        "core-0",
        NodeKind::Core {
            raft: RaftConfig::default(),
            init: true,
            peers: Vec::new(),
        },
        &stream,
        &shutdown,
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while core.status().role != "leader" {
        if Instant::now() > deadline {
            bail!("the core did not become leader within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Cluster {
        core,
        relays: Vec::new(),
        core_api,
        core_addr,
        shutdown,
        _dir: dir,
    })
}

fn bar(len: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg:<28} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// Runs the demo to its summary.
/// Runs the demo to its summary; with `json`, the summary is one JSON object on stdout and the
/// progress lines go to stderr.
pub async fn run(args: DemoArgs, json: bool) -> anyhow::Result<()> {
    macro_rules! say {
        ($($t:tt)*) => {
            if json {
                eprintln!($($t)*)
            } else {
                println!($($t)*)
            }
        };
    }
    if args.fanout == 0 || args.rate <= 0.0 {
        bail!("--fanout and --rate must be positive");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    say!(
        "canopy demo: 1 core + {} relays, fanout {}, file {}, {} writes/s, seed {}",
        args.relays,
        args.fanout,
        human_bytes(args.size),
        args.rate,
        args.seed
    );
    let mut cluster = build_cluster(&args).await?;
    say!(
        "core API on http://{} (try: canopy --api {} status)",
        cluster.core_api,
        cluster.core_api
    );

    let mut content = vec![0u8; args.size as usize];
    rng.fill_bytes(&mut content);
    let t = Instant::now();
    let max_update = StreamConfig::default().max_update_bytes as usize / 2;
    let mut version = 0;
    for (i, piece) in content.chunks(max_update.max(1)).enumerate() {
        let update = Update {
            ops: vec![Op::Write {
                offset: (i * max_update) as u64,
                data: Bytes::copy_from_slice(piece),
            }],
        };
        match Backend::write(&cluster.core, update, None).await? {
            ApplyOutcome::Applied { version: v } => version = v,
            other => bail!("loading the file: {other:?}"),
        }
    }
    say!(
        "loaded {} into the core in {:.2} s (version {version})",
        human_bytes(args.size),
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let dir = cluster._dir.path().to_path_buf();
    let stream = demo_stream(args.fanout);
    let core_addr = cluster.core_addr.to_string();
    for i in 0..args.relays {
        let node = start_node(
            &dir,
            &format!("relay-{i}"),
            NodeKind::Relay {
                join: vec![core_addr.clone()],
            },
            &stream,
            &cluster.shutdown,
        )
        .await?
        .node;
        cluster.relays.push(node);
    }
    let pb = bar(args.relays as u64, "relays holding the file");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let synced = cluster
            .relays
            .iter()
            .filter(|r| r.file().version() >= version)
            .count();
        pb.set_position(synced as u64);
        if synced == cluster.relays.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {synced}/{} relays got the file within 300 s",
                args.relays
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pb.finish();
    let bootstrap = t.elapsed();
    say!(
        "{} relays hold a verified {} copy after {:.2} s",
        args.relays,
        human_bytes(args.size),
        bootstrap.as_secs_f64()
    );

    let samples = Arc::new(Mutex::new(Samples::default()));
    let stop_watch = CancellationToken::new();
    for r in &cluster.relays {
        let mut rx = r.versions();
        let samples = samples.clone();
        let stop = stop_watch.clone();
        let start_version = version;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    c = rx.changed() => if c.is_err() { return },
                }
                let (v, commit_us) = *rx.borrow_and_update();
                if v > start_version && commit_us > 0 {
                    let lat = now_us().saturating_sub(commit_us);
                    samples.lock().unwrap().0.push(lat);
                }
            }
        });
    }

    let relayed_before = total_relayed(&cluster);
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let end = args.duration.map(|d| started + d);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let view = ProgressBar::new_spinner();
    view.enable_steady_tick(Duration::from_millis(200));
    let mut writes = 0u64;
    let mut errors = 0u64;
    let mut inflight = tokio::task::JoinSet::new();
    let mut last_view = Instant::now();
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = ticker.tick() => {}
        }
        if end.is_some_and(|e| Instant::now() >= e) {
            break;
        }
        let writer = cluster.relays[rng.random_range(0..cluster.relays.len())].clone();
        let offset = rng.random_range(0..args.size.saturating_sub(100).max(1));
        let mut data = vec![0u8; 100];
        rng.fill_bytes(&mut data);
        inflight.spawn(async move {
            let ops = vec![Op::Write {
                offset,
                data: Bytes::from(data),
            }];
            Backend::write(&writer, Update { ops }, None).await
        });
        while let Some(r) = inflight.try_join_next() {
            match r {
                Ok(Ok(ApplyOutcome::Applied { .. })) => writes += 1,
                _ => errors += 1,
            }
        }
        if last_view.elapsed() >= Duration::from_millis(500) {
            last_view = Instant::now();
            let core_v = cluster.core.file().version();
            let in_sync = cluster
                .relays
                .iter()
                .filter(|r| r.file().version() == core_v)
                .count();
            let (p50, p99, max, _) = samples.lock().unwrap().summary();
            view.set_message(format!(
                "t={:>4.0}s writes={writes} in sync {in_sync}/{} propagation p50 {p50:.1} ms p99 {p99:.1} ms max {max:.1} ms moved {}",
                started.elapsed().as_secs_f64(),
                cluster.relays.len(),
                human_bytes(total_relayed(&cluster) - relayed_before),
            ));
        }
    }
    while let Some(r) = inflight.join_next().await {
        match r {
            Ok(Ok(ApplyOutcome::Applied { .. })) => writes += 1,
            _ => errors += 1,
        }
    }
    view.finish_and_clear();
    let elapsed = started.elapsed();
    let core_file = cluster.core.file();
    let deadline = Instant::now() + Duration::from_secs(10);
    let in_sync = loop {
        let n = cluster
            .relays
            .iter()
            .filter(|r| {
                let f = r.file();
                f.version() == core_file.version() && f.root() == core_file.root()
            })
            .count();
        if n == cluster.relays.len() || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop_watch.cancel();
    let (p50, p99, max, n) = samples.lock().unwrap().summary();
    let moved = total_relayed(&cluster) - relayed_before;
    let mut depths: BTreeMap<u32, usize> = BTreeMap::new();
    let mut unattached = 0;
    for r in &cluster.relays {
        match r.status().depth {
            Some(d) => *depths.entry(d).or_default() += 1,
            None => unattached += 1,
        }
    }
    let summary = format!(
        "summary: {in_sync}/{} relays in sync at version {} root {}; {writes} writes in {:.1} s ({:.1}/s, {errors} failed); \
         propagation commit->applied p50 {p50:.2} ms p99 {p99:.2} ms max {max:.2} ms over {n} samples; \
         bootstrap {:.2} s; moved {} during the load; depths {:?}{}",
        cluster.relays.len(),
        core_file.version(),
        &core_file.root_hex()[..16],
        elapsed.as_secs_f64(),
        writes as f64 / elapsed.as_secs_f64().max(1e-9),
        bootstrap.as_secs_f64(),
        human_bytes(moved),
        depths,
        if unattached > 0 {
            format!(", {unattached} unattached")
        } else {
            String::new()
        },
    );
    if json {
        let doc = serde_json::json!({
            "relays": cluster.relays.len(),
            "relays_in_sync": in_sync,
            "version": core_file.version(),
            "root": core_file.root_hex(),
            "writes": writes,
            "failed_writes": errors,
            "seconds": elapsed.as_secs_f64(),
            "propagation_ms": {"p50": p50, "p99": p99, "max": max, "samples": n},
            "bootstrap_s": bootstrap.as_secs_f64(),
            "moved_bytes": moved,
            "depths": depths,
            "unattached": unattached,
        });
        println!("{doc}");
    } else {
        println!("{summary}");
    }
    cluster.shutdown.cancel();
    let mut all = vec![cluster.core.clone()];
    all.extend(cluster.relays.iter().cloned());
    futures::future::join_all(all.iter().map(|n| n.stopped())).await;
    if in_sync != cluster.relays.len() {
        bail!(
            "{} relays were not in sync at the end",
            cluster.relays.len() - in_sync
        );
    }
    Ok(())
}

fn total_relayed(c: &Cluster) -> u64 {
    std::iter::once(&c.core)
        .chain(c.relays.iter())
        .map(|n| n.status().stats.relayed_bytes)
        .sum()
}

/// The stream settings of every node in the demo: the defaults, at `fanout`, and each
/// transfer from the parent alone (all the relays share this process's cores, where asking
/// peers that are mid-transfer themselves costs more CPU than it saves; see
/// `stream.fetch_sources`).
fn demo_stream(fanout: usize) -> StreamConfig {
    StreamConfig {
        fanout,
        fetch_sources: 1,
        ..Default::default()
    }
}
