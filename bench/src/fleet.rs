//! `fleet`: N subscribers in one process following a write load, for the throughput scenario.
//!
//! - `--kind canopy`: N real relays (`canopy::node::Node`, each with its own QUIC endpoint and
//!   certificate) joining the core addresses given; a relay's position is its applied version.
//! - `--kind etcd`: N watch streams on a key prefix through the v3 JSON gateway, spread
//!   round-robin over the endpoints given; a watcher's position is the highest `mod_revision`
//!   it has received.
//!
//! Protocol on stdin/stdout (one line each): once every subscriber follows, it prints
//! `ready N`; then each `wait V` line is answered with one JSON object once the slowest
//! subscriber is at V or past it (or `--timeout-s` passed): `{"target", "caught_up_ms"
//! (null on timeout), "slowest", "cpu_s"}`, `caught_up_ms` counted from the command and
//! `cpu_s` the process's CPU seconds so far. EOF on stdin stops it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use clap::Parser;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use canopy_bench::{cpu_seconds, etcd_gateway};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kind {
    Canopy,
    Etcd,
}

#[derive(Parser)]
#[command(
    version = canopy_bench::VERSION,
    about = "N subscribers in one process (Canopy relays or etcd watchers) that report when the slowest reaches a version"
)]
struct Args {
    #[arg(long, value_enum)]
    kind: Kind,
    /// Subscribers to run.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Canopy: the core nodes' QUIC addresses, comma-separated (the relays' --join).
    #[arg(long, default_value = "")]
    core_quic: String,
    #[command(flatten)]
    relays: canopy_bench::RelayFiles,
    /// etcd: the gateway endpoints, comma-separated.
    #[arg(long, default_value = "")]
    endpoints: String,
    /// etcd: the key prefix watched.
    #[arg(long, default_value = "bench/")]
    prefix: String,
    /// Longest wait for the subscribers to start or to catch up (seconds).
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

async fn canopy_relay(
    name: String,
    tls: std::path::PathBuf,
    data: std::path::PathBuf,
    join: Vec<String>,
    pos: Arc<AtomicU64>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let kind = canopy::config::NodeKind::Relay { join };
    let stream = canopy::config::StreamConfig::default();
    let node = canopy::measure::start_local_node(&name, &tls, &data, kind, stream, shutdown)
        .await?
        .node;
    let mut rx = node.applied();
    loop {
        let (v, _) = *rx.borrow_and_update();
        // A fresh relay is at version 0 until its first transfer is installed.
        if v > 0 {
            pos.fetch_max(v, Ordering::AcqRel);
        }
        if rx.changed().await.is_err() {
            bail!("relay {name} stopped");
        }
    }
}

async fn etcd_watcher(
    client: reqwest::Client,
    url: String,
    prefix: String,
    pos: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut resp = etcd_gateway::open_watch(&client, &url, &prefix).await?;
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        buf.extend_from_slice(&chunk);
        for v in etcd_gateway::take_messages(&mut buf)? {
            let r = v.get("result").ok_or_else(|| anyhow!("watch error: {v}"))?;
            if r.get("canceled").and_then(Value::as_bool) == Some(true) {
                bail!("watch canceled: {r}");
            }
            // The header's revision once created; each event's mod_revision after.
            let mut rev = 0u64;
            if r.get("created").and_then(Value::as_bool) == Some(true) {
                rev = r
                    .pointer("/header/revision")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(1)
                    .max(1);
            }
            for ev in r
                .get("events")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(m) = ev
                    .pointer("/kv/mod_revision")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    rev = rev.max(m);
                }
            }
            if rev > 0 {
                pos.fetch_max(rev, Ordering::AcqRel);
            }
        }
    }
    bail!("watch stream ended")
}

fn slowest(pos: &[Arc<AtomicU64>]) -> u64 {
    pos.iter()
        .map(|p| p.load(Ordering::Acquire))
        .min()
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let n = args.subscribers;
    anyhow::ensure!(n >= 1, "--subscribers must be at least 1");
    let timeout = Duration::from_secs(args.timeout_s);
    let pos: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut subs = tokio::task::JoinSet::new();
    match args.kind {
        Kind::Canopy => {
            let join: Vec<String> = args
                .core_quic
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            anyhow::ensure!(!join.is_empty(), "--core-quic is needed");
            let (tls, data) = args.relays.issue("fleet", n)?;
            for (i, p) in pos.iter().enumerate() {
                let name = format!("fleet{i}");
                subs.spawn(canopy_relay(
                    name,
                    tls.clone(),
                    data.clone(),
                    join.clone(),
                    p.clone(),
                    shutdown.clone(),
                ));
            }
        }
        Kind::Etcd => {
            let eps: Vec<String> = args
                .endpoints
                .split(',')
                .filter(|s| !s.is_empty())
                .map(etcd_gateway::base)
                .collect();
            anyhow::ensure!(!eps.is_empty(), "--endpoints is needed");
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(n + 8)
                .tcp_nodelay(true)
                .build()?;
            for (i, p) in pos.iter().enumerate() {
                subs.spawn(etcd_watcher(
                    http.clone(),
                    eps[i % eps.len()].clone(),
                    args.prefix.clone(),
                    p.clone(),
                ));
            }
        }
    }
    let started = Instant::now();
    while slowest(&pos) == 0 {
        if let Some(r) = subs.try_join_next() {
            bail!(
                "a subscriber stopped while starting: {:?}",
                r.map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
            );
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "subscribers not all following after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut out = tokio::io::stdout();
    out.write_all(format!("ready {n}\n").as_bytes()).await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let Some(v) = line.trim().strip_prefix("wait ") else {
            continue;
        };
        let target: u64 = v.trim().parse()?;
        let asked = Instant::now();
        let caught = loop {
            if slowest(&pos) >= target {
                break Some(asked.elapsed());
            }
            if asked.elapsed() > timeout {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let reply = json!({
            "target": target,
            "caught_up_ms": caught.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3),
            "slowest": slowest(&pos),
            "cpu_s": cpu_seconds("self"),
        });
        out.write_all(format!("{reply}\n").as_bytes()).await?;
        out.flush().await?;
    }
    shutdown.cancel();
    Ok(())
}
