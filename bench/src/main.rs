//! `loadgen`: closed-loop write load against Canopy's HTTP API or etcd's v3 JSON gateway.
//!
//! C client tasks each run a closed loop: send one request, wait for the answer, record its
//! latency, send the next. Client k talks to endpoint k mod E. Only requests that start after
//! the warm-up and finish before the end of the measured window are counted, so throughput is
//! `writes / duration` over a window in which every client was busy the whole time.
//!
//! Writes are distinct and checkable:
//! - Canopy: client k writes `size` bytes at offset `k*4096 + (i mod 32)*128` (32 slots of 128
//!   bytes per client, so `size` must be at most 128).
//! - etcd: client k puts key `bench/k/i` (one key per write); `etcd-txn` puts `txn_batch` such
//!   keys in one Txn request.
//!
//! Payloads come from a ChaCha8 stream seeded by `--seed` and the client index, so a run is
//! reproducible. `--verify` reads back, after the run, the last value each client wrote to each
//! slot (Canopy) or its last key (etcd) and counts mismatches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::{Parser, ValueEnum};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use canopy::measure::parse_duration;

/// Bytes of file reserved per client (Canopy target).
const CLIENT_SPAN: u64 = 4096;
/// Slots per client; a slot is `SLOT` bytes.
const SLOTS: u64 = 32;
const SLOT: u64 = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    /// `PATCH {ep}/v1/file?offset=O` with a `size`-byte body.
    Canopy,
    /// `POST {ep}/v3/kv/put` (etcd 3.4 grpc-gateway), one key per request.
    Etcd,
    /// `POST {ep}/v3/kv/txn` with `txn_batch` puts in `success`.
    EtcdTxn,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Canopy => "canopy",
            Target::Etcd => "etcd",
            Target::EtcdTxn => "etcd-txn",
        }
    }
}

#[derive(Parser, Debug, Clone)]
#[command(version = canopy_bench::VERSION, about = "Closed-loop write load generator: Canopy core vs etcd")]
struct Args {
    /// What to load.
    #[arg(long, value_enum)]
    target: Target,
    /// Comma-separated base URLs (http://HOST:PORT or HOST:PORT); clients spread round-robin.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Concurrent closed-loop clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Measured window, e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Load before the measured window (not counted).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Bytes per write (at most 128 for Canopy).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Puts per Txn request (etcd-txn only; etcd's default --max-txn-ops is 128).
    #[arg(long, default_value_t = 16)]
    txn_batch: usize,
    /// Seed of the payload streams.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Name of this row in the output (default: the target).
    #[arg(long)]
    label: Option<String>,
    /// Read back the last write of every slot/client after the run and count mismatches.
    #[arg(long)]
    verify: bool,
    /// Print one JSON object on stdout (the human summary goes to stderr).
    #[arg(long)]
    json: bool,
}

fn normalize(ep: &str) -> String {
    let ep = ep.trim().trim_end_matches('/');
    if ep.starts_with("http://") || ep.starts_with("https://") {
        ep.to_string()
    } else {
        format!("http://{ep}")
    }
}

/// What one client saw.
#[derive(Default)]
struct ClientResult {
    /// Latency of every counted request, µs.
    lat_us: Vec<u32>,
    /// Writes in counted requests (a Txn counts its puts).
    writes: u64,
    requests: u64,
    /// Failed requests that started in the measured window.
    errors: u64,
    /// Failed requests at any time (warm-up and tail included).
    errors_total: u64,
    first_error: Option<String>,
    /// Highest Canopy version acknowledged.
    max_version: u64,
    /// Canopy: slot -> last payload (None: the last attempt failed, so the slot is unknown).
    slots: HashMap<u64, Option<Vec<u8>>>,
    /// etcd: the last key put and its value (None: the last attempt failed).
    last_kv: Option<Option<(String, Vec<u8>)>>,
}

struct Shared {
    http: reqwest::Client,
    args: Args,
    endpoints: Vec<String>,
    measure_from: Instant,
    end: Instant,
}

fn etcd_key(client: usize, i: u64) -> String {
    format!("bench/{client:05}/{i:010}")
}

/// One request; Ok(canopy version or 0).
async fn send(
    sh: &Shared,
    ep: &str,
    client: usize,
    i: u64,
    rng: &mut ChaCha8Rng,
    payloads: &mut Vec<(String, Vec<u8>)>,
) -> anyhow::Result<u64> {
    let size = sh.args.size;
    payloads.clear();
    let req = match sh.args.target {
        Target::Canopy => {
            let mut data = vec![0u8; size];
            rng.fill_bytes(&mut data);
            let off = client as u64 * CLIENT_SPAN + (i % SLOTS) * SLOT;
            payloads.push((off.to_string(), data.clone()));
            let req = sh
                .http
                .patch(format!("{ep}/v1/file?offset={off}"))
                .header("content-type", "application/octet-stream")
                .body(data);
            match std::env::var("CANOPY_API_TOKEN") {
                Ok(t) => req.bearer_auth(t),
                Err(_) => req,
            }
        }
        Target::Etcd => {
            let mut data = vec![0u8; size];
            rng.fill_bytes(&mut data);
            let key = etcd_key(client, i);
            let body = json!({"key": B64.encode(&key), "value": B64.encode(&data)});
            payloads.push((key, data));
            sh.http.post(format!("{ep}/v3/kv/put")).json(&body)
        }
        Target::EtcdTxn => {
            let n = sh.args.txn_batch as u64;
            let mut ops = Vec::with_capacity(n as usize);
            for j in 0..n {
                let mut data = vec![0u8; size];
                rng.fill_bytes(&mut data);
                let key = etcd_key(client, i * n + j);
                ops.push(
                    json!({"requestPut": {"key": B64.encode(&key), "value": B64.encode(&data)}}),
                );
                payloads.push((key, data));
            }
            sh.http
                .post(format!("{ep}/v3/kv/txn"))
                .json(&json!({"compare": [], "success": ops, "failure": []}))
        }
    };
    let resp = req.timeout(sh.args.timeout).send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    if !status.is_success() {
        bail!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        );
    }
    let v: Value = serde_json::from_slice(&body)
        .with_context(|| format!("bad JSON answer: {}", String::from_utf8_lossy(&body)))?;
    match sh.args.target {
        Target::Canopy => v["version"]
            .as_u64()
            .ok_or_else(|| anyhow!("answer without version: {v}")),
        Target::Etcd => {
            if v.get("header").is_none() {
                bail!("put answer without header: {v}");
            }
            Ok(0)
        }
        Target::EtcdTxn => {
            if v.get("succeeded").and_then(Value::as_bool) != Some(true) {
                bail!("txn did not succeed: {v}");
            }
            Ok(0)
        }
    }
}

fn client_rng(seed: u64, client: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ (client as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

async fn run_client(sh: Arc<Shared>, client: usize) -> ClientResult {
    let ep = sh.endpoints[client % sh.endpoints.len()].clone();
    let mut rng = client_rng(sh.args.seed, client);
    let mut res = ClientResult {
        lat_us: Vec::with_capacity(16 * 1024),
        ..Default::default()
    };
    let per_req = match sh.args.target {
        Target::EtcdTxn => sh.args.txn_batch as u64,
        _ => 1,
    };
    let mut payloads = Vec::new();
    let mut i = 0u64;
    loop {
        let t0 = Instant::now();
        if t0 >= sh.end {
            break;
        }
        let r = send(&sh, &ep, client, i, &mut rng, &mut payloads).await;
        let t1 = Instant::now();
        let counted = t0 >= sh.measure_from;
        match r {
            Ok(version) => {
                res.max_version = res.max_version.max(version);
                if counted && t1 <= sh.end {
                    let us = (t1 - t0).as_micros().min(u32::MAX as u128) as u32;
                    res.lat_us.push(us);
                    res.requests += 1;
                    res.writes += per_req;
                }
                match sh.args.target {
                    Target::Canopy => {
                        for (off, data) in payloads.drain(..) {
                            res.slots.insert(off.parse().unwrap_or(0), Some(data));
                        }
                    }
                    _ => res.last_kv = Some(payloads.pop()),
                }
            }
            Err(e) => {
                res.errors_total += 1;
                if counted {
                    res.errors += 1;
                }
                if res.first_error.is_none() {
                    res.first_error = Some(format!("{e:#}"));
                }
                match sh.args.target {
                    Target::Canopy => {
                        for (off, _) in payloads.drain(..) {
                            res.slots.insert(off.parse().unwrap_or(0), None);
                        }
                    }
                    _ => res.last_kv = Some(None),
                }
                // Do not spin on a refused connection.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        i += 1;
    }
    res
}

/// Nearest-rank percentile of sorted values, in ms.
fn pct_ms(sorted: &[u32], p: f64) -> f64 {
    canopy::measure::percentile(sorted, p / 100.0) as f64 / 1000.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One write per endpoint before the run, so a wrong URL fails fast instead of as 100% errors.
async fn preflight(sh: &Shared) -> anyhow::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(sh.args.seed.wrapping_add(0xF00D));
    let mut payloads = Vec::new();
    for (n, ep) in sh.endpoints.iter().enumerate() {
        // A client index past every real client: its slots and keys are never checked.
        let client = sh.args.clients + 1;
        send(sh, ep, client, n as u64, &mut rng, &mut payloads)
            .await
            .with_context(|| format!("preflight write to {ep}"))?;
    }
    Ok(())
}

async fn verify_canopy(sh: &Shared, results: &[ClientResult]) -> anyhow::Result<(u64, u64, u64)> {
    let ep = &sh.endpoints[0];
    let want_version = results.iter().map(|r| r.max_version).max().unwrap_or(0);
    // Wait until the node we read from has applied every acknowledged write.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st: Value = sh
            .http
            .get(format!("{ep}/v1/status"))
            .send()
            .await?
            .json()
            .await?;
        if st["version"].as_u64().unwrap_or(0) >= want_version {
            break;
        }
        if Instant::now() > deadline {
            bail!("{ep} did not reach version {want_version} within 30 s: {st}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let len = sh.args.clients as u64 * CLIENT_SPAN;
    let resp = sh
        .http
        .get(format!("{ep}/v1/file"))
        .header("range", format!("bytes=0-{}", len - 1))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("GET /v1/file: HTTP {}", resp.status());
    }
    let file = resp.bytes().await?;
    let (mut checked, mut bad, mut unknown) = (0u64, 0u64, 0u64);
    for r in results {
        for (&off, data) in &r.slots {
            let Some(data) = data else {
                unknown += 1;
                continue;
            };
            checked += 1;
            let (a, b) = (off as usize, off as usize + data.len());
            if b > file.len() || &file[a..b] != data.as_slice() {
                bad += 1;
            }
        }
    }
    Ok((checked, bad, unknown))
}

async fn verify_etcd(sh: &Shared, results: &[ClientResult]) -> anyhow::Result<(u64, u64, u64)> {
    let ep = &sh.endpoints[0];
    let (mut checked, mut bad, mut unknown) = (0u64, 0u64, 0u64);
    for r in results {
        match &r.last_kv {
            None => {}
            Some(None) => unknown += 1,
            Some(Some((key, data))) => {
                checked += 1;
                let v: Value = sh
                    .http
                    .post(format!("{ep}/v3/kv/range"))
                    .json(&json!({"key": B64.encode(key)}))
                    .send()
                    .await?
                    .json()
                    .await?;
                let got = v["kvs"][0]["value"]
                    .as_str()
                    .and_then(|s| B64.decode(s).ok());
                if got.as_deref() != Some(data.as_slice()) {
                    bad += 1;
                }
            }
        }
    }
    Ok((checked, bad, unknown))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.clients == 0 {
        bail!("--clients must be > 0");
    }
    if args.target == Target::Canopy && args.size as u64 > SLOT {
        bail!("--size must be at most {SLOT} for the canopy target");
    }
    if args.target == Target::EtcdTxn && args.txn_batch == 0 {
        bail!("--txn-batch must be > 0");
    }
    let endpoints: Vec<String> = args.endpoints.iter().map(|e| normalize(e)).collect();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients + 16)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| args.target.name().to_string());

    let mut sh = Shared {
        http,
        args: args.clone(),
        endpoints,
        measure_from: Instant::now(),
        end: Instant::now(),
    };
    preflight(&sh).await?;
    let start = Instant::now();
    sh.measure_from = start + args.warmup;
    sh.end = sh.measure_from + args.duration;
    let sh = Arc::new(sh);

    let tasks: Vec<_> = (0..args.clients)
        .map(|c| tokio::spawn(run_client(sh.clone(), c)))
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await?);
    }

    let mut lat: Vec<u32> = results
        .iter()
        .flat_map(|r| r.lat_us.iter().copied())
        .collect();
    lat.sort_unstable();
    let writes: u64 = results.iter().map(|r| r.writes).sum();
    let requests: u64 = results.iter().map(|r| r.requests).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let errors_total: u64 = results.iter().map(|r| r.errors_total).sum();
    let first_error = results.iter().find_map(|r| r.first_error.clone());
    let secs = args.duration.as_secs_f64();
    let mean_ms = if lat.is_empty() {
        0.0
    } else {
        lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len() as f64 / 1000.0
    };

    let verify = if args.verify {
        let r = match args.target {
            Target::Canopy => verify_canopy(&sh, &results).await,
            _ => verify_etcd(&sh, &results).await,
        };
        Some(match r {
            Ok((checked, mismatches, unknown)) => {
                json!({"checked": checked, "mismatches": mismatches, "unknown": unknown})
            }
            Err(e) => json!({"error": format!("{e:#}")}),
        })
    } else {
        None
    };

    let out = json!({
        "system": label,
        "target": args.target.name(),
        "clients": args.clients,
        "endpoints": sh.endpoints.len(),
        "size": args.size,
        "txn_batch": if args.target == Target::EtcdTxn { json!(args.txn_batch) } else { Value::Null },
        "writes": writes,
        "requests": requests,
        "seconds": secs,
        "writes_per_sec": round3(writes as f64 / secs),
        "requests_per_sec": round3(requests as f64 / secs),
        "p50_ms": round3(pct_ms(&lat, 50.0)),
        "p90_ms": round3(pct_ms(&lat, 90.0)),
        "p99_ms": round3(pct_ms(&lat, 99.0)),
        "max_ms": round3(lat.last().map_or(0.0, |&x| x as f64 / 1000.0)),
        "mean_ms": round3(mean_ms),
        "errors": errors,
        "errors_total": errors_total,
        "first_error": first_error,
        "verify": verify,
    });
    let human = format!(
        "{label}: clients={} writes={} in {:.1}s = {:.0} writes/s ({:.0} req/s); latency per request p50 {:.2} ms p99 {:.2} ms max {:.2} ms; errors {}{}{}",
        args.clients,
        writes,
        secs,
        writes as f64 / secs,
        requests as f64 / secs,
        pct_ms(&lat, 50.0),
        pct_ms(&lat, 99.0),
        lat.last().map_or(0.0, |&x| x as f64 / 1000.0),
        errors,
        first_error.as_deref().map(|e| format!(" (first: {e})")).unwrap_or_default(),
        if out["verify"].is_object() {
            format!("; verify {}", out["verify"])
        } else {
            String::new()
        },
    );
    if args.json {
        eprintln!("{human}");
        println!("{out}");
    } else {
        println!("{human}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(pct_ms(&v, 50.0), 50.0);
        assert_eq!(pct_ms(&v, 99.0), 99.0);
        assert_eq!(pct_ms(&v, 100.0), 100.0);
        assert_eq!(pct_ms(&[], 99.0), 0.0);
    }

    #[test]
    fn endpoints_normalized() {
        assert_eq!(normalize("127.0.0.1:2379"), "http://127.0.0.1:2379");
        assert_eq!(normalize("http://h:1/"), "http://h:1");
    }
}
