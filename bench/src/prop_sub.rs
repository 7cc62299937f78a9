//! `prop-sub`: one process holding N subscribers of one system, plus a writer, timing each
//! write from "sent" to "the LAST of the N subscribers has it".
//!
//! - `--kind etcd`: N watch streams through etcd's v3 JSON gateway (`POST /v3/watch`, one
//!   streaming HTTP/1.1 connection each) on the prefix `--prefix`; the writer puts key
//!   `PREFIX%06d` (the write's sequence number) with a 100-byte value through `/v3/kv/put`.
//! - `--kind redis`: N plain-RESP connections `SUBSCRIBE` to one channel; the writer `PUBLISH`es
//!   100-byte messages that start with the sequence number. This is pub/sub fan-out, not
//!   replication: nothing is stored and a slow subscriber is not caught up.
//! - `--kind redis-replica`: the writer `SET`s one key (`--prefix`) on the master
//!   (`--endpoint`); subscriber i `SUBSCRIBE`s to `__keyspace@0__:KEY` on endpoint i of
//!   `--endpoints`/`--endpoints-file` (Redis replicas started with
//!   `--notify-keyspace-events K$`, replicating from the master directly or through other
//!   replicas). A replica applies the master's stream in order, so its k-th `set` event is
//!   write k (a replica that fully resyncs mid-run fires no events for the writes the RDB
//!   carried: they show as missed deliveries, and its later events are matched to earlier
//!   writes). `--replica-pids-file` (one pid a line): their summed CPU is `replicas_cpu_s`.
//!
//! With several endpoints (`--endpoints a,b` or a file of host:port lines), subscriber i of
//! either Redis kind connects to endpoint i mod their number.
//!
//! - `--kind canopy`: N relays (real Canopy nodes, each with its own QUIC endpoint and
//!   certificate, issued here from `--ca`) run inside this process and join the core-node
//!   process at `--core-quic`; a relay's subscriber task watches its applied version. The
//!   writer PATCHes 100 bytes at a time to the core's API (`--endpoint`); a write counts as
//!   arrived at a relay when the relay's applied version first reaches the version the PATCH
//!   returned. Bytes: the core's `canopy_relayed_bytes_total`.
//! - `--kind canopy-api`: the relays are processes of their own (`relay-node`, as deployed;
//!   the caller starts them), and subscriber i long-polls `GET /v1/watch?after=V` on API
//!   endpoint i of `--endpoints`/`--endpoints-file` (what `canopy watch` does); the writer
//!   and the arrival rule are those of `--kind canopy`. Give the relays' pids with
//!   `--replica-pids-file`: their CPU and disk writes are reported.
//!
//! Canopy writes present the core's API token (`--token-file`).
//!
//! Writes are open-loop at `--rate` per second (each put is its own task, so a slow put does not
//! delay the next). A write's time is taken just before it is sent; a subscriber's time when it
//! has parsed the event. All clocks are this process's monotonic clock.
//!
//! Reported: quantiles (nearest rank) of the last-subscriber latency over the writes that every
//! subscriber got, of every single subscriber's latency, writes missed by any subscriber; the
//! root's CPU seconds (`--source-pid`, /proc/PID/stat, utime + stime of every thread) and bytes
//! it sent between the first write and the last delivery (etcd: its
//! `etcd_network_client_grpc_sent_bytes_total`, which counts what etcd's gRPC server sent to
//! its own gateway; Redis: `INFO stats` `total_net_output_bytes` of `--endpoint`, the master).
//! What a system's processes cost: `system_cpu_s` is the CPU of the root, the replicas
//! (`--replica-pids-file`) and, for `--kind canopy` (whose relays live in this process), this
//! process; `cpu_us_per_delivery` divides it by writes x subscribers. The window runs from
//! the first write to the last arrival plus `--tail-ms` (work a write leaves behind, such
//! as a relay materializing its `--file`, falls in it). The replicas' disk writes
//! (`/proc/PID/io`) over the same window, per delivery, are `disk_bytes_per_delivery`, and
//! their voluntary context switches (summed over their live threads), per delivery, are
//! `wakeups_per_delivery`: how often a delivery puts a replica's thread to sleep. With
//! `--idle-secs S`, the same counters are first read over S seconds with every subscriber
//! ready and no write: `idle_ms_per_s_per_replica` is the CPU an idle replica (Canopy
//! in-process: an idle relay of this process) spends per second.
//!
//! One JSON object on stdout with `--json` (with `last_ms`: every complete write's last-subscriber
//! latency in write order, for plots), a summary on stderr.

#![recursion_limit = "256"]

use canopy::measure::percentile;
use canopy_bench::etcd_gateway::{self, base};
use canopy_bench::{cpu_seconds, disk_write_bytes, resp_line, voluntary_switches};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    Etcd,
    Redis,
    /// SET on a master, keyspace notifications from its replicas.
    RedisReplica,
    /// N relays inside this process.
    Canopy,
    /// N `relay-node` processes, watched through their HTTP APIs.
    CanopyApi,
}

impl Kind {
    fn is_canopy(self) -> bool {
        matches!(self, Kind::Canopy | Kind::CanopyApi)
    }
}

#[derive(Parser, Debug, Clone)]
#[command(version = canopy_bench::VERSION, about = "N subscribers of one system in one process; time each write to the last one")]
struct Args {
    #[arg(long, value_enum)]
    kind: Kind,
    /// etcd client address or Redis address (host:port); redis-replica: the master.
    #[arg(long)]
    endpoint: String,
    /// Redis kinds and canopy-api: subscriber i connects to endpoint i mod their number
    /// (comma-separated).
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Like --endpoints, one host:port a line.
    #[arg(long)]
    endpoints_file: Option<std::path::PathBuf>,
    /// canopy-api: how each subscriber watches its relay: one streamed watch
    /// (`/v1/watch?stream=true`, a line per version) or long polls (`/v1/watch?after=V`, a
    /// request and a whole status per version).
    #[arg(long, value_enum, default_value = "stream")]
    canopy_watch: CanopyWatch,
    /// Processes (one pid a line: Redis replicas, relay-node processes) whose summed CPU is
    /// `replicas_cpu_s` and whose disk writes are `replicas_disk_write_bytes`.
    #[arg(long)]
    replica_pids_file: Option<std::path::PathBuf>,
    /// The row's `system` (default: from --kind).
    #[arg(long)]
    system: Option<String>,
    /// The row's `variant` (default: from --kind).
    #[arg(long)]
    variant: Option<String>,
    /// Subscribers.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Writes.
    #[arg(long, default_value_t = 200)]
    writes: usize,
    /// Writes per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Bytes per write.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// etcd key prefix / Redis channel / redis-replica key.
    #[arg(long, default_value = "bench/prop/")]
    prefix: String,
    /// The root's pid (etcd or the Redis master): its CPU time is reported.
    #[arg(long)]
    source_pid: Option<u32>,
    /// etcd's Prometheus endpoint, to count the bytes it sent.
    #[arg(long)]
    metrics: Option<String>,
    /// Canopy: the core's QUIC address, relays join it.
    #[arg(long)]
    core_quic: Option<String>,
    #[command(flatten)]
    relays: canopy_bench::RelayFiles,
    /// Canopy: the file holding the core's API token, which writes present.
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// Canopy: the file's length, writes go to offsets below it.
    #[arg(long, default_value_t = 1_000_000)]
    file_size: u64,
    /// Canopy: children per node.
    #[arg(long, default_value_t = 8)]
    fanout: usize,
    /// Milliseconds between "every subscriber is ready" and the first write.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
    /// Seconds, after the settle, over which the idle cost is measured (0: not measured).
    #[arg(long, default_value_t = 0.0)]
    idle_secs: f64,
    /// Milliseconds the cost window stays open after the last arrival.
    #[arg(long, default_value_t = 1000)]
    tail_ms: u64,
    /// Seconds to wait for every subscriber after the last write.
    #[arg(long, default_value_t = 20)]
    drain_secs: u64,
    /// Seconds to wait for every subscriber to be subscribed.
    #[arg(long, default_value_t = 120)]
    setup_secs: u64,
    /// Row label.
    #[arg(long, default_value = "")]
    label: String,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// What every subscriber saw: (sequence number, nanoseconds since the common base).
type Seen = Vec<(usize, u64)>;

struct Shared {
    base: Instant,
    ready: AtomicU64,
    received: AtomicU64,
    sent_ns: Vec<AtomicU64>,
    /// Per subscriber, what it saw (each slot locked only by its subscriber until the end).
    seen: Vec<Mutex<Seen>>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

/// Non-empty, trimmed lines of a file (endpoint and pid lists).
fn read_lines(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// The cost counters of a system's processes at one moment (CPU seconds, disk bytes).
struct Counters {
    root_cpu: Option<f64>,
    replicas_cpu: Option<f64>,
    self_cpu: f64,
    root_disk: Option<u64>,
    replicas_disk: Option<u64>,
    replicas_wakeups: Option<u64>,
}

/// What the counters grew by over `secs` seconds.
struct Spent {
    secs: f64,
    root_cpu: Option<f64>,
    replicas_cpu: Option<f64>,
    self_cpu: f64,
    root_disk: Option<u64>,
    replicas_disk: Option<u64>,
    replicas_wakeups: Option<u64>,
}

impl Counters {
    fn since(&self, before: &Counters, elapsed: Duration) -> Spent {
        let cpu = |a: Option<f64>, b: Option<f64>| Some(round2(b? - a?));
        let grew = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
        Spent {
            secs: elapsed.as_secs_f64(),
            root_cpu: cpu(before.root_cpu, self.root_cpu),
            replicas_cpu: cpu(before.replicas_cpu, self.replicas_cpu),
            self_cpu: round2(self.self_cpu - before.self_cpu),
            root_disk: grew(before.root_disk, self.root_disk),
            replicas_disk: grew(before.replicas_disk, self.replicas_disk),
            replicas_wakeups: grew(before.replicas_wakeups, self.replicas_wakeups),
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn ms3(ns: u64) -> f64 {
    (ns as f64 / 1e3).round() / 1e3
}

fn quantile_ms(sorted: &[u64], q: f64) -> f64 {
    ms3(percentile(sorted, q))
}

fn payload(seq: usize, size: usize) -> Vec<u8> {
    let mut p = format!("{seq:06}:").into_bytes();
    p.resize(size.max(p.len()), b'x');
    p
}

fn parse_seq(b: &[u8]) -> Option<usize> {
    let end = b.iter().position(|&c| c == b':').unwrap_or(b.len());
    std::str::from_utf8(&b[..end]).ok()?.parse().ok()
}

// ---------------------------------------------------------------- etcd

async fn etcd_watcher(
    client: reqwest::Client,
    url: String,
    prefix: String,
    shared: Arc<Shared>,
    me: usize,
) -> anyhow::Result<()> {
    let mut resp = etcd_gateway::open_watch(&client, &url, &prefix).await?;
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let t = shared.now_ns();
        buf.extend_from_slice(&chunk);
        for v in etcd_gateway::take_messages(&mut buf)? {
            let r = v.get("result").ok_or_else(|| anyhow!("watch error: {v}"))?;
            if r.get("created").and_then(Value::as_bool) == Some(true) {
                shared.ready.fetch_add(1, Ordering::SeqCst);
            }
            if r.get("canceled").and_then(Value::as_bool) == Some(true) {
                bail!("watch canceled: {r}");
            }
            for ev in r
                .get("events")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let key = ev
                    .pointer("/kv/key")
                    .and_then(Value::as_str)
                    .and_then(|k| B64.decode(k).ok())
                    .unwrap_or_default();
                if let Some(seq) = key
                    .strip_prefix(prefix.as_bytes())
                    .and_then(parse_seq)
                    .filter(|&s| s < shared.sent_ns.len())
                {
                    shared.seen[me].lock().unwrap().push((seq, t));
                    shared.received.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
    Ok(())
}

async fn etcd_put(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    value: &[u8],
) -> anyhow::Result<()> {
    let body = json!({"key": B64.encode(key.as_bytes()), "value": B64.encode(value)});
    client
        .post(format!("{url}/v3/kv/put"))
        .json(&body)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    Ok(())
}

async fn metric_sum(url: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    Some(canopy::measure::metric_sum(&text, name))
}

// ---------------------------------------------------------------- Redis (plain RESP)

/// One RESP value, enough for pub/sub and replies.
#[derive(Debug, PartialEq)]
enum Resp {
    Bulk(Option<Vec<u8>>),
    Int(i64),
    Simple(String),
    Error(String),
    Array(Vec<Resp>),
}

/// Parses one value at `at`; `None` if the buffer does not hold all of it yet.
fn parse_resp(buf: &[u8], at: usize) -> anyhow::Result<Option<(Resp, usize)>> {
    let Some(&tag) = buf.get(at) else {
        return Ok(None);
    };
    let Some((line, next)) = resp_line(buf, at + 1) else {
        return Ok(None);
    };
    let text = std::str::from_utf8(line)?;
    Ok(match tag {
        b'+' => Some((Resp::Simple(text.to_string()), next)),
        b'-' => Some((Resp::Error(text.to_string()), next)),
        b':' => Some((Resp::Int(text.parse()?), next)),
        b'$' => {
            let n: i64 = text.parse()?;
            if n < 0 {
                Some((Resp::Bulk(None), next))
            } else {
                let end = next + n as usize;
                if buf.len() < end + 2 {
                    None
                } else {
                    Some((Resp::Bulk(Some(buf[next..end].to_vec())), end + 2))
                }
            }
        }
        b'*' => {
            let n: i64 = text.parse()?;
            let mut items = Vec::new();
            let mut pos = next;
            for _ in 0..n.max(0) {
                match parse_resp(buf, pos)? {
                    Some((v, p)) => {
                        items.push(v);
                        pos = p;
                    }
                    None => return Ok(None),
                }
            }
            Some((Resp::Array(items), pos))
        }
        t => bail!("unexpected RESP type byte {t:#x}"),
    })
}

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

struct RespConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RespConn {
    async fn connect(ep: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(ep).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    async fn send(&mut self, args: &[&[u8]]) -> anyhow::Result<()> {
        self.stream.write_all(&command(args)).await?;
        Ok(())
    }

    /// The next value, and when its last byte was read.
    async fn next(&mut self, base: Instant) -> anyhow::Result<(Resp, u64)> {
        loop {
            if let Some((v, used)) = parse_resp(&self.buf, 0)? {
                self.buf.drain(..used);
                return Ok((v, base.elapsed().as_nanos() as u64));
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The keyspace channel of `key` in database 0.
fn keyspace_channel(key: &str) -> String {
    format!("__keyspace@0__:{key}")
}

/// Subscribes to `channel` on `ep`. Pub/sub (`keyspace` false): a message's sequence number is
/// its prefix. Keyspace (`keyspace` true): every `set` event is the next write, in order.
async fn redis_subscriber(
    ep: String,
    channel: String,
    keyspace: bool,
    shared: Arc<Shared>,
    me: usize,
) -> anyhow::Result<()> {
    let mut c = RespConn::connect(&ep)
        .await
        .map_err(|e| anyhow!("connect {ep}: {e}"))?;
    c.send(&[b"SUBSCRIBE", channel.as_bytes()]).await?;
    let mut sets = 0usize;
    loop {
        let (v, t) = c.next(shared.base).await?;
        let Resp::Array(items) = v else {
            bail!("unexpected reply {v:?}");
        };
        match items.first() {
            Some(Resp::Bulk(Some(k))) if k == b"subscribe" => {
                shared.ready.fetch_add(1, Ordering::SeqCst);
            }
            Some(Resp::Bulk(Some(k))) if k == b"message" => {
                if let Some(Resp::Bulk(Some(msg))) = items.get(2) {
                    let seq = if keyspace {
                        if msg != b"set" {
                            continue;
                        }
                        sets += 1;
                        Some(sets - 1)
                    } else {
                        parse_seq(msg)
                    };
                    if let Some(seq) = seq.filter(|&s| s < shared.sent_ns.len()) {
                        shared.seen[me].lock().unwrap().push((seq, t));
                        shared.received.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            _ => {}
        }
    }
}

async fn redis_output_bytes(c: &mut RespConn, base: Instant) -> anyhow::Result<f64> {
    c.send(&[b"INFO", b"stats"]).await?;
    let (v, _) = c.next(base).await?;
    let Resp::Bulk(Some(text)) = v else {
        bail!("INFO: unexpected reply {v:?}");
    };
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("INFO stats has no total_net_output_bytes"))
}

// ---------------------------------------------------------------- Canopy

/// Starts one relay in this process, waits until it holds version `v0`, then records every
/// change of its applied version as (version, time).
#[allow(clippy::too_many_arguments)]
async fn canopy_relay(
    name: String,
    tls: std::path::PathBuf,
    data: std::path::PathBuf,
    core_quic: String,
    fanout: usize,
    v0: u64,
    shared: Arc<Shared>,
    shutdown: tokio_util::sync::CancellationToken,
    me: usize,
) -> anyhow::Result<()> {
    let stream = canopy::config::StreamConfig {
        fanout,
        ..Default::default()
    };
    let kind = canopy::config::NodeKind::Relay {
        join: vec![core_quic],
    };
    let node = canopy::measure::start_local_node(&name, &tls, &data, kind, stream, shutdown)
        .await?
        .node;
    let mut rx = node.applied();
    let mut ready = false;
    loop {
        let (v, _) = *rx.borrow_and_update();
        let t = shared.now_ns();
        if !ready && v >= v0 {
            ready = true;
            shared.ready.fetch_add(1, Ordering::SeqCst);
        }
        if ready {
            shared.seen[me].lock().unwrap().push((v as usize, t));
        }
        if rx.changed().await.is_err() {
            bail!("relay {name} stopped");
        }
    }
}

/// How a canopy-api subscriber watches its relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CanopyWatch {
    Stream,
    Poll,
}

/// What one canopy-api subscriber has seen of its relay.
struct ApiWatch<'a> {
    shared: &'a Shared,
    me: usize,
    v0: u64,
    ready: bool,
    after: u64,
}

impl ApiWatch<'_> {
    /// A watch answer (a streamed line or a long poll's status) parsed at `t`: once the
    /// relay shows `v0`, every higher version is recorded as (version, time).
    fn answer(&mut self, st: &Value, t: u64) -> anyhow::Result<()> {
        let v = st
            .get("version")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("no version in {st}"))?;
        if !self.ready && v >= self.v0 {
            self.ready = true;
            self.shared.ready.fetch_add(1, Ordering::SeqCst);
        }
        if self.ready && v > self.after {
            self.shared.seen[self.me]
                .lock()
                .unwrap()
                .push((v as usize, t));
        }
        self.after = self.after.max(v);
        Ok(())
    }
}

/// Watches one relay process's `/v1/watch` (one streamed watch, or a long poll per
/// version): once it shows `v0`, records every version it answers with as (version, time).
async fn canopy_api_watcher(
    http: reqwest::Client,
    url: String,
    v0: u64,
    shared: Arc<Shared>,
    me: usize,
    mode: CanopyWatch,
) -> anyhow::Result<()> {
    let mut seen = ApiWatch {
        shared: &shared,
        me,
        v0,
        ready: false,
        after: 0,
    };
    if mode == CanopyWatch::Stream {
        let mut r = http
            .get(format!("{url}/v1/watch?after=0&stream=true&timeout=20"))
            .send()
            .await?
            .error_for_status()?;
        let mut buf: Vec<u8> = Vec::new();
        loop {
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let t = shared.now_ns();
                let line: Vec<u8> = buf.drain(..=i).collect();
                seen.answer(&serde_json::from_slice(&line)?, t)?;
            }
            let chunk = r
                .chunk()
                .await?
                .ok_or_else(|| anyhow!("{url}: the watch stream ended"))?;
            buf.extend_from_slice(&chunk);
        }
    }
    loop {
        let st: Value = http
            .get(format!("{url}/v1/watch?after={}&timeout=20", seen.after))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        seen.answer(&st, shared.now_ns())?;
    }
}

async fn canopy_version(http: &reqwest::Client, url: &str) -> anyhow::Result<u64> {
    let st: Value = http
        .get(format!("{url}/v1/status"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    st.get("version")
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("no version in {st}"))
}

async fn canopy_patch(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    offset: u64,
    value: Vec<u8>,
) -> anyhow::Result<u64> {
    let r: Value = http
        .patch(format!("{url}/v1/file?offset={offset}"))
        .bearer_auth(token)
        .body(value)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    r.get("version")
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("no version in {r}"))
}

// ---------------------------------------------------------------- run

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.subscribers == 0 || args.writes == 0 || args.rate <= 0.0 {
        bail!("--subscribers, --writes and --rate must be positive");
    }
    let n = args.subscribers;
    let mut endpoints = args.endpoints.clone();
    if let Some(f) = &args.endpoints_file {
        endpoints.extend(read_lines(f)?);
    }
    if endpoints.is_empty() {
        endpoints.push(args.endpoint.clone());
    }
    let replica_pids: Vec<u32> = match &args.replica_pids_file {
        Some(f) => read_lines(f)?
            .iter()
            .map(|l| l.parse().map_err(|e| anyhow!("bad pid {l:?}: {e}")))
            .collect::<anyhow::Result<_>>()?,
        None => Vec::new(),
    };
    let replicas_cpu = || -> Option<f64> {
        (!replica_pids.is_empty()).then(|| replica_pids.iter().map(|&p| cpu_seconds(p)).sum())
    };
    let counters = || Counters {
        root_cpu: args.source_pid.map(cpu_seconds),
        replicas_cpu: replicas_cpu(),
        self_cpu: cpu_seconds("self"),
        root_disk: args.source_pid.and_then(disk_write_bytes),
        replicas_disk: (!replica_pids.is_empty()).then(|| {
            replica_pids
                .iter()
                .filter_map(|&p| disk_write_bytes(p))
                .sum()
        }),
        replicas_wakeups: (!replica_pids.is_empty()).then(|| {
            replica_pids
                .iter()
                .filter_map(|&p| voluntary_switches(p))
                .sum()
        }),
    };
    let token = match &args.token_file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| anyhow!("cannot read {}: {e}", f.display()))?
            .trim()
            .to_string(),
        None => String::new(),
    };
    let redis = matches!(args.kind, Kind::Redis | Kind::RedisReplica);
    let shared = Arc::new(Shared {
        base: Instant::now(),
        ready: AtomicU64::new(0),
        received: AtomicU64::new(0),
        sent_ns: (0..args.writes).map(|_| AtomicU64::new(u64::MAX)).collect(),
        // Room for every write up front: a subscriber's list growing (all of them at the
        // same write) would be the harness's own stall, not the system's.
        seen: (0..n)
            .map(|_| Mutex::new(Vec::with_capacity(args.writes + 64)))
            .collect(),
    });
    let url = base(&args.endpoint);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(n + 8)
        .tcp_nodelay(true)
        .build()?;
    // Subscribers.
    let setup_start = Instant::now();
    let mut subs = tokio::task::JoinSet::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut v0 = 0;
    let mut relay_dirs = Default::default();
    if args.kind == Kind::Canopy {
        relay_dirs = args.relays.issue("ps", n)?;
    }
    if args.kind.is_canopy() {
        v0 = canopy_version(&http, &url).await?;
    }
    let write_version: Vec<AtomicU64> =
        (0..args.writes).map(|_| AtomicU64::new(u64::MAX)).collect();
    let write_version = Arc::new(write_version);
    for me in 0..n {
        let shared = shared.clone();
        match args.kind {
            Kind::Etcd => {
                subs.spawn(etcd_watcher(
                    http.clone(),
                    url.clone(),
                    args.prefix.clone(),
                    shared,
                    me,
                ));
            }
            Kind::Redis | Kind::RedisReplica => {
                let keyspace = args.kind == Kind::RedisReplica;
                subs.spawn(redis_subscriber(
                    endpoints[me % endpoints.len()].clone(),
                    if keyspace {
                        keyspace_channel(&args.prefix)
                    } else {
                        args.prefix.clone()
                    },
                    keyspace,
                    shared,
                    me,
                ));
            }
            Kind::Canopy => {
                subs.spawn(canopy_relay(
                    format!("ps{me}"),
                    relay_dirs.0.clone(),
                    relay_dirs.1.clone(),
                    args.core_quic
                        .clone()
                        .ok_or_else(|| anyhow!("--core-quic is needed"))?,
                    args.fanout,
                    v0,
                    shared,
                    shutdown.clone(),
                    me,
                ));
            }
            Kind::CanopyApi => {
                subs.spawn(canopy_api_watcher(
                    http.clone(),
                    base(&endpoints[me % endpoints.len()]),
                    v0,
                    shared,
                    me,
                    args.canopy_watch,
                ));
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(args.setup_secs);
    while shared.ready.load(Ordering::SeqCst) < n as u64 {
        if let Some(r) = subs.try_join_next() {
            r??;
            bail!("a subscriber ended before the writes");
        }
        if Instant::now() > deadline {
            bail!(
                "only {}/{n} subscribers were subscribed after {} s",
                shared.ready.load(Ordering::SeqCst),
                args.setup_secs
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let setup = setup_start.elapsed();
    eprintln!(
        "prop-sub {:?}: {n} subscribers ready in {:.2} s",
        args.kind,
        setup.as_secs_f64()
    );
    // Let the subscriptions (Canopy: the tree) settle before the clock starts.
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    let idle = if args.idle_secs > 0.0 {
        let (before, t0) = (counters(), Instant::now());
        tokio::time::sleep(Duration::from_secs_f64(args.idle_secs)).await;
        Some(counters().since(&before, t0.elapsed()))
    } else {
        None
    };

    // The writer.
    let mut redis_writer = if redis {
        Some(RespConn::connect(&args.endpoint).await?)
    } else {
        None
    };
    let metric = match args.kind {
        Kind::Canopy | Kind::CanopyApi => "canopy_relayed_bytes_total",
        _ => "etcd_network_client_grpc_sent_bytes_total",
    };
    let bytes_before = match (&mut redis_writer, &args.metrics) {
        (Some(c), _) => Some(redis_output_bytes(c, shared.base).await?),
        (None, Some(m)) => metric_sum(m, metric).await,
        (None, None) => None,
    };
    let before = counters();
    let writes_start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let put_errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut puts = tokio::task::JoinSet::new();
    let mut publish_receivers = Vec::new();
    for seq in 0..args.writes {
        ticker.tick().await;
        let value = payload(seq, args.size);
        match &mut redis_writer {
            Some(c) if args.kind == Kind::RedisReplica => {
                shared.sent_ns[seq].store(shared.now_ns(), Ordering::SeqCst);
                c.send(&[b"SET", args.prefix.as_bytes(), &value]).await?;
                match c.next(shared.base).await?.0 {
                    Resp::Simple(ok) if ok == "OK" => {}
                    other => bail!("SET: unexpected reply {other:?}"),
                }
            }
            Some(c) => {
                shared.sent_ns[seq].store(shared.now_ns(), Ordering::SeqCst);
                c.send(&[b"PUBLISH", args.prefix.as_bytes(), &value])
                    .await?;
                match c.next(shared.base).await?.0 {
                    Resp::Int(k) => publish_receivers.push(k),
                    other => bail!("PUBLISH: unexpected reply {other:?}"),
                }
            }
            None => {
                let (http, url, shared, errs) = (
                    http.clone(),
                    url.clone(),
                    shared.clone(),
                    put_errors.clone(),
                );
                let key = format!("{}{seq:06}", args.prefix);
                let canopy = args.kind.is_canopy();
                let token = token.clone();
                let offset =
                    (seq as u64 * 4099) % args.file_size.saturating_sub(args.size as u64).max(1);
                let wv = write_version.clone();
                puts.spawn(async move {
                    shared.sent_ns[seq].store(shared.now_ns(), Ordering::SeqCst);
                    let r = if canopy {
                        canopy_patch(&http, &url, &token, offset, value)
                            .await
                            .map(|v| wv[seq].store(v, Ordering::SeqCst))
                    } else {
                        etcd_put(&http, &url, &key, &value).await
                    };
                    if let Err(e) = r {
                        errs.lock().unwrap().push(format!("write {seq}: {e}"));
                    }
                });
            }
        }
    }
    while puts.join_next().await.is_some() {}
    let write_time = writes_start.elapsed();
    let expected = (n * args.writes) as u64;
    let drain_deadline = Instant::now() + Duration::from_secs(args.drain_secs);
    let max_version = write_version
        .iter()
        .map(|a| a.load(Ordering::SeqCst))
        .filter(|&v| v != u64::MAX)
        .max()
        .unwrap_or(0);
    let all_arrived = || match args.kind {
        Kind::Canopy | Kind::CanopyApi => shared.seen.iter().all(|s| {
            s.lock()
                .unwrap()
                .last()
                .is_some_and(|&(v, _)| v as u64 >= max_version)
        }),
        _ => shared.received.load(Ordering::SeqCst) >= expected,
    };
    while !all_arrived() && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(args.tail_ms)).await;
    let cost = counters().since(&before, writes_start.elapsed());
    let window = writes_start.elapsed();
    let self_cpu = cost.self_cpu;
    let bytes_after = match (&mut redis_writer, &args.metrics) {
        (Some(c), _) => Some(redis_output_bytes(c, shared.base).await?),
        (None, Some(m)) => metric_sum(m, metric).await,
        (None, None) => None,
    };
    // Stop the subscribers; what they saw is in `shared.seen`.
    drop(redis_writer);
    subs.abort_all();
    while subs.join_next().await.is_some() {}
    shutdown.cancel();
    if args.kind.is_canopy() {
        // Observations are (applied version, time), in order; a write arrived at a relay the
        // first time that relay's applied version reached the write's version.
        let wv: Vec<u64> = write_version
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect();
        for slot in &shared.seen {
            let mut seen = slot.lock().unwrap();
            let obs = std::mem::take(&mut *seen);
            for (seq, &v) in wv.iter().enumerate() {
                if v == u64::MAX {
                    continue;
                }
                let i = obs.partition_point(|&(ov, _)| (ov as u64) < v);
                if let Some(&(_, t)) = obs.get(i) {
                    seen.push((seq, t));
                }
            }
        }
    }
    let put_errors = put_errors.lock().unwrap().clone();
    if !put_errors.is_empty() {
        eprintln!(
            "prop-sub: {} writes failed, first: {}",
            put_errors.len(),
            put_errors[0]
        );
    }

    // Fold: per write, the last subscriber's arrival; per (write, subscriber), the latency.
    let w = args.writes;
    let mut last = vec![0u64; w];
    let mut count = vec![0usize; w];
    let mut each: Vec<u64> = Vec::with_capacity(n * w);
    let sent: Vec<u64> = shared
        .sent_ns
        .iter()
        .map(|a| a.load(Ordering::SeqCst))
        .collect();
    let mut duplicates = 0u64;
    for slot in &shared.seen {
        let seen = slot.lock().unwrap();
        let mut got = vec![false; w];
        for &(seq, t) in seen.iter() {
            if got[seq] {
                duplicates += 1;
                continue;
            }
            got[seq] = true;
            count[seq] += 1;
            last[seq] = last[seq].max(t);
            if sent[seq] != u64::MAX {
                each.push(t.saturating_sub(sent[seq]));
            }
        }
    }
    let mut lasts: Vec<u64> = (0..w)
        .filter(|&s| count[s] == n && sent[s] != u64::MAX)
        .map(|s| last[s].saturating_sub(sent[s]))
        .collect();
    // The five slowest writes: (sequence number, ms after the first write was sent, last ms).
    let mut slowest: Vec<(usize, u64)> = (0..w)
        .filter(|&s| count[s] == n && sent[s] != u64::MAX)
        .map(|s| (s, last[s].saturating_sub(sent[s])))
        .collect();
    slowest.sort_unstable_by_key(|&(_, l)| std::cmp::Reverse(l));
    let first_sent = sent.iter().copied().min().unwrap_or(0);
    let slowest: Vec<Value> = slowest
        .iter()
        .take(5)
        .map(|&(s, l)| {
            json!([
                s,
                (sent[s].saturating_sub(first_sent) as f64 / 1e6).round(),
                (l as f64 / 1e3).round() / 1e3
            ])
        })
        .collect();
    let complete = lasts.len();
    let missed_deliveries: u64 = (0..w).map(|s| (n - count[s]) as u64).sum();
    // Every complete write's last-subscriber latency, in write order (for CDF plots).
    let last_ms: Vec<f64> = lasts.iter().map(|&l| ms3(l)).collect();
    lasts.sort_unstable();
    each.sort_unstable();
    let cpu = cost.root_cpu;
    let replicas_cpu_s = cost.replicas_cpu;
    // The CPU of everything that holds the system's copies: the root, the replica processes,
    // and this process when the relays live in it.
    let system_cpu = cost.root_cpu.unwrap_or(0.0)
        + cost.replicas_cpu.unwrap_or(0.0)
        + if args.kind == Kind::Canopy {
            cost.self_cpu
        } else {
            0.0
        };
    let deliveries = (w * n) as f64;
    let cpu_counted = match args.kind {
        Kind::Canopy => "the core process + this process (its N relays, plus the writer and the watchers)",
        Kind::CanopyApi => "the core process + the N relay-node processes (they also answer the watchers' long polls)",
        Kind::RedisReplica => "the master + the N replica processes (they also publish the keyspace notifications)",
        Kind::Etcd => "the etcd process (its JSON gateway included)",
        Kind::Redis => "the Redis process",
    };
    let idle_json = idle.as_ref().map(|i| {
        let per_replica = match args.kind {
            Kind::Canopy => Some(i.self_cpu),
            _ => i.replicas_cpu,
        };
        json!({
            "seconds": round3(i.secs),
            "root_cpu_s": i.root_cpu,
            "replicas_cpu_s": i.replicas_cpu,
            "self_cpu_s": i.self_cpu,
            "replicas_disk_write_bytes": i.replicas_disk,
            "replicas_voluntary_switches": i.replicas_wakeups,
            "ms_per_s_per_replica": per_replica.map(|c| round3(c * 1e3 / i.secs / n as f64)),
            "root_ms_per_s": i.root_cpu.map(|c| round3(c * 1e3 / i.secs)),
        })
    });
    let root_bytes = match (bytes_before, bytes_after) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let (system, variant, bytes_source) = match args.kind {
        Kind::Etcd => (
            "etcd",
            "1 member; N watch streams via the v3 JSON gateway",
            "etcd_network_client_grpc_sent_bytes_total (gRPC server -> its own gateway)",
        ),
        Kind::Redis => (
            "redis",
            "1 master; N SUBSCRIBE connections (pub/sub fan-out, not replication)",
            "INFO stats total_net_output_bytes",
        ),
        Kind::RedisReplica => (
            "redis-replica",
            "1 master + Redis replicas (keyspace notifications); SET on the master",
            "the master's INFO stats total_net_output_bytes",
        ),
        Kind::Canopy => (
            "canopy",
            "core-node process (1 node) + N relays in the prop-sub process; writes PATCHed to the core",
            "the core's canopy_relayed_bytes_total",
        ),
        Kind::CanopyApi => (
            "canopy-procs",
            "core-node process (1 node) + N relay-node processes with --file; each watched by a /v1/watch long poll; writes PATCHed to the core",
            "the core's canopy_relayed_bytes_total",
        ),
    };
    let system = args.system.as_deref().unwrap_or(system);
    let variant = args.variant.as_deref().unwrap_or(variant);
    let measured = match args.kind {
        Kind::RedisReplica => {
            "write sent (SET on the master) -> last replica's keyspace notification parsed"
        }
        _ => "write sent -> last subscriber parsed it",
    };
    let min_receivers = publish_receivers.iter().copied().min();
    let row = json!({
        "scenario": "propagation",
        "system": system,
        "label": args.label,
        "variant": variant,
        "subscribers": n,
        "subscriber_processes": 1,
        "writes": w,
        "write_bytes": args.size,
        "rate_per_s": args.rate,
        "measured": measured,
        "setup_s": (setup.as_secs_f64() * 1e3).round() / 1e3,
        "settle_ms": args.settle_ms,
        "canopy_watch": format!("{:?}", args.canopy_watch).to_lowercase(),
        "write_phase_s": (write_time.as_secs_f64() * 1e3).round() / 1e3,
        "writes_failed": put_errors.len(),
        "writes_complete": complete,
        "missed_deliveries": missed_deliveries,
        "duplicate_deliveries": duplicates,
        "last_p50_ms": quantile_ms(&lasts, 0.5),
        "last_p99_ms": quantile_ms(&lasts, 0.99),
        "last_max_ms": quantile_ms(&lasts, 1.0),
        "each_p50_ms": quantile_ms(&each, 0.5),
        "each_p99_ms": quantile_ms(&each, 0.99),
        "each_max_ms": quantile_ms(&each, 1.0),
        "each_samples": each.len(),
        "slowest_writes_seq_at_ms_last_ms": slowest,
        "root_cpu_s": cpu,
        "subscriber_process_cpu_s": self_cpu,
        "window_s": (window.as_secs_f64() * 1e3).round() / 1e3,
        "root_bytes": root_bytes,
        "root_bytes_per_write": root_bytes.map(|b| (b / w as f64).round()),
        "root_bytes_source": bytes_source,
        "publish_min_receivers": min_receivers,
        "subscriber_endpoints": if redis { Some(endpoints.len()) } else { None },
        "replicas_cpu_s": replicas_cpu_s,
        "system_cpu_s": round3(system_cpu),
        "cpu_us_per_delivery": round3(system_cpu * 1e6 / deliveries),
        "cpu_counted": cpu_counted,
        "cost_window": format!("first write -> last arrival + {} ms", args.tail_ms),
        "root_disk_write_bytes": cost.root_disk,
        "replicas_disk_write_bytes": cost.replicas_disk,
        "disk_bytes_per_delivery": cost.replicas_disk.map(|b| (b as f64 / deliveries).round()),
        "replicas_voluntary_switches": cost.replicas_wakeups,
        "wakeups_per_delivery": cost.replicas_wakeups.map(|b| round3(b as f64 / deliveries)),
        "idle": idle_json,
        "file_bytes": if args.kind.is_canopy() { Some(args.file_size) } else { None },
        "replica_processes": if replica_pids.is_empty() { None } else { Some(replica_pids.len()) },
        "last_ms": last_ms,
    });
    eprintln!(
        "prop-sub {system}: N={n}, {complete}/{w} writes reached all ({missed_deliveries} deliveries missed); \
         last subscriber p50 {} ms p99 {} ms max {} ms; each subscriber p50 {} ms p99 {} ms; \
         root CPU {:?} s, root sent {:?} bytes/write; {} CPU-us per delivery{}",
        row["last_p50_ms"],
        row["last_p99_ms"],
        row["last_max_ms"],
        row["each_p50_ms"],
        row["each_p99_ms"],
        cpu,
        row["root_bytes_per_write"],
        row["cpu_us_per_delivery"],
        match &row["idle"]["ms_per_s_per_replica"] {
            Value::Null => String::new(),
            v => format!("; idle {v} ms CPU/s per replica"),
        },
    );
    if args.json {
        println!("{row}");
    }
    if complete == 0 {
        bail!("no write reached every subscriber");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_parsing() {
        let msg = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\n00001\r\n:7\r\n";
        let (v, used) = parse_resp(msg, 0).unwrap().unwrap();
        assert_eq!(
            v,
            Resp::Array(vec![
                Resp::Bulk(Some(b"message".to_vec())),
                Resp::Bulk(Some(b"ch".to_vec())),
                Resp::Bulk(Some(b"00001".to_vec())),
            ])
        );
        assert_eq!(parse_resp(msg, used).unwrap().unwrap().0, Resp::Int(7));
        assert!(parse_resp(&msg[..20], 0).unwrap().is_none());
        assert_eq!(parse_seq(&payload(42, 100)), Some(42));
        assert_eq!(payload(42, 100).len(), 100);
        assert_eq!(keyspace_channel("k"), "__keyspace@0__:k");
        assert_eq!(ms3(1_234_567), 1.235);
    }
}
