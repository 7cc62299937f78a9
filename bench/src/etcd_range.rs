//! `etcd-range`: load a data set into etcd as fixed-size keys, or time fresh clients reading all
//! of it back in pages, through etcd's v3 JSON gateway (`/v3/kv/put`, `/v3/kv/range`).
//!
//! - `--load`: puts `--keys` keys `PREFIX%05d`, each `--value-size` random bytes (ChaCha8,
//!   `--seed`), `--concurrency` at a time.
//! - otherwise: `--clients` clients start at the same instant; each has its own HTTP client
//!   (a fresh TCP connection, nothing cached) and reads the whole prefix in pages of `--page`
//!   keys (`limit`, `range_end` = prefix end, next page from the last key + `\0`), decoding every
//!   value. Each client checks it got `--expect-keys` keys and `--expect-bytes` value bytes. The
//!   row's time is the slowest client's, from the common start.
//!
//! With `--metrics URL`, etcd's `etcd_network_client_grpc_sent_bytes_total` is read before and
//! after (the gateway talks gRPC to its own server, so this counts what etcd served).
//! Prints one JSON object on stdout with `--json` (a summary on stderr).

// Only the URL helpers are used here, not the watch framing.
#[allow(dead_code)]
use canopy_bench::cpu_seconds;
use canopy_bench::etcd_gateway::{base, prefix_end};

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::Parser;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

#[derive(Parser, Debug, Clone)]
#[command(version = canopy_bench::VERSION, about = "Load or page-read a key prefix through etcd's JSON gateway")]
struct Args {
    /// etcd client URL (http://127.0.0.1:2379 or 127.0.0.1:2379).
    #[arg(long)]
    endpoint: String,
    /// Key prefix.
    #[arg(long, default_value = "bench/boot/")]
    prefix: String,
    /// Load the data set instead of reading it.
    #[arg(long)]
    load: bool,
    /// Keys to load.
    #[arg(long, default_value_t = 800)]
    keys: usize,
    /// Bytes per value when loading.
    #[arg(long, default_value_t = 65536)]
    value_size: usize,
    /// Puts in flight when loading.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seed of the values.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Concurrent readers.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Keys per range request.
    #[arg(long, default_value_t = 100)]
    page: usize,
    /// Keys every reader must get (0: do not check).
    #[arg(long, default_value_t = 0)]
    expect_keys: u64,
    /// Value bytes every reader must get (0: do not check).
    #[arg(long, default_value_t = 0)]
    expect_bytes: u64,
    /// etcd's Prometheus endpoint, to count the bytes it sent.
    #[arg(long)]
    metrics: Option<String>,
    /// etcd's pid: its CPU time during the read is reported.
    #[arg(long)]
    source_pid: Option<u32>,
    /// Row fields.
    #[arg(long, default_value = "single")]
    scenario: String,
    #[arg(long, default_value = "gateway, paged")]
    variant: String,
    #[arg(long, default_value_t = 1)]
    round: u32,
    /// Per-request timeout.
    #[arg(long, default_value = "120")]
    timeout_secs: u64,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

async fn post(http: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Value> {
    let resp = http.post(url).json(body).send().await?;
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if !status.is_success() {
        bail!(
            "{url}: HTTP {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
        );
    }
    serde_json::from_slice(&bytes).with_context(|| format!("{url}: answer is not JSON"))
}

async fn load(args: &Args) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_secs))
        .build()?;
    let url = format!("{}/v3/kv/put", base(&args.endpoint));
    let start = Instant::now();
    let mut next = 0usize;
    let mut tasks = tokio::task::JoinSet::new();
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    loop {
        while tasks.len() < args.concurrency.max(1) && next < args.keys {
            let mut v = vec![0u8; args.value_size];
            rng.fill_bytes(&mut v);
            let key = format!("{}{:05}", args.prefix, next);
            let body = json!({"key": B64.encode(key.as_bytes()), "value": B64.encode(&v)});
            let (http, url) = (http.clone(), url.clone());
            tasks.spawn(async move { post(&http, &url, &body).await.map(|_| ()) });
            next += 1;
        }
        match tasks.join_next().await {
            Some(r) => r??,
            None => break,
        }
    }
    eprintln!(
        "etcd-range: loaded {} keys of {} bytes under {:?} in {:.2} s",
        args.keys,
        args.value_size,
        args.prefix,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

struct ReadResult {
    keys: u64,
    bytes: u64,
    pages: u64,
    done: Duration,
}

async fn read_all(args: Args, start: Instant) -> anyhow::Result<ReadResult> {
    // A client of its own: a fresh connection, as a new host would open.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_secs))
        .pool_max_idle_per_host(1)
        .build()?;
    let url = format!("{}/v3/kv/range", base(&args.endpoint));
    let end = B64.encode(prefix_end(args.prefix.as_bytes()));
    let mut from = args.prefix.as_bytes().to_vec();
    let (mut keys, mut bytes, mut pages) = (0u64, 0u64, 0u64);
    loop {
        let body = json!({"key": B64.encode(&from), "range_end": end, "limit": args.page});
        let v = post(&http, &url, &body).await?;
        pages += 1;
        let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
        let mut last = None;
        for kv in &kvs {
            let k = B64.decode(
                kv["key"]
                    .as_str()
                    .ok_or_else(|| anyhow!("kv without key"))?,
            )?;
            let val = B64.decode(kv["value"].as_str().unwrap_or(""))?;
            keys += 1;
            bytes += val.len() as u64;
            last = Some(k);
        }
        let more = v["more"].as_bool().unwrap_or(false);
        match last {
            Some(mut k) if more => {
                k.push(0);
                from = k;
            }
            _ => break,
        }
    }
    Ok(ReadResult {
        keys,
        bytes,
        pages,
        done: start.elapsed(),
    })
}

async fn grpc_sent_bytes(url: &str) -> Option<f64> {
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    Some(canopy::measure::metric_sum(
        &text,
        "etcd_network_client_grpc_sent_bytes_total",
    ))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

async fn read(args: &Args) -> anyhow::Result<()> {
    let before = match &args.metrics {
        Some(u) => grpc_sent_bytes(u).await,
        None => None,
    };
    let source_cpu0 = args.source_pid.map(cpu_seconds);
    let cpu0 = cpu_seconds("self");
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.clients.max(1) {
        tasks.spawn(read_all(args.clone(), start));
    }
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r??);
    }
    let total = start.elapsed();
    let client_cpu = cpu_seconds("self") - cpu0;
    let source_cpu = args
        .source_pid
        .zip(source_cpu0)
        .map(|(p, c0)| ((cpu_seconds(p) - c0) * 100.0).round() / 100.0);
    let after = match &args.metrics {
        Some(u) => grpc_sent_bytes(u).await,
        None => None,
    };
    let mut bad = 0;
    for r in &results {
        if (args.expect_keys > 0 && r.keys != args.expect_keys)
            || (args.expect_bytes > 0 && r.bytes != args.expect_bytes)
        {
            bad += 1;
        }
    }
    let mut done: Vec<f64> = results.iter().map(|r| ms(r.done)).collect();
    done.sort_by(f64::total_cmp);
    let size = results.first().map(|r| r.bytes).unwrap_or(0);
    let n = results.len() as u64;
    let mb_s = (size * n) as f64 / 1e6 / total.as_secs_f64();
    eprintln!(
        "etcd-range: {n} client(s) read {} keys / {} bytes each in {} pages: last done {:.1} ms ({:.0} MB/s total){}",
        results.first().map(|r| r.keys).unwrap_or(0),
        size,
        results.first().map(|r| r.pages).unwrap_or(0),
        ms(total),
        mb_s,
        if bad > 0 { format!(", {bad} client(s) got the wrong data") } else { String::new() }
    );
    if args.json {
        let egress = match (before, after) {
            (Some(b), Some(a)) => json!(a - b),
            _ => Value::Null,
        };
        let copies = match (before, after) {
            (Some(b), Some(a)) if size > 0 => {
                json!(((a - b) / size as f64 * 100.0).round() / 100.0)
            }
            _ => Value::Null,
        };
        println!(
            "{}",
            json!({
                "scenario": args.scenario,
                "system": "etcd",
                "variant": args.variant,
                "round": args.round,
                "n": n,
                "size_bytes": size,
                "keys": results.first().map(|r| r.keys).unwrap_or(0),
                "pages": results.first().map(|r| r.pages).unwrap_or(0),
                "page_keys": args.page,
                "time_ms": ms(total),
                "first_ready_ms": done.first().copied().unwrap_or(0.0),
                "median_ready_ms": done.get(done.len() / 2).copied().unwrap_or(0.0),
                "throughput_mb_s": (mb_s * 10.0).round() / 10.0,
                "egress_bytes": egress,
                "egress_copies": copies,
                "instances_cpu_s": (client_cpu * 100.0).round() / 100.0,
                "source_cpu_s": source_cpu,
                "verified": bad == 0,
            })
        );
    }
    if bad > 0 {
        bail!("{bad} client(s) read the wrong number of keys or bytes");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.load {
        load(&args).await
    } else {
        read(&args).await
    }
}
