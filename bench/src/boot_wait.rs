//! `boot-wait`: start N copies of a node process at once and time each until it holds a
//! verified full copy of the data.
//!
//! `boot-wait --kind canopy|redis --count N [options] -- CMD ARG...`
//!
//! The command line is a template (`{pp}`: see `--tree-fanout`): `{i}` is the instance index, `{p0}`/`{p1}` are the ports
//! `--port-base + --port-stride * i (+ 1)`. Every instance is spawned (stdout and stderr to
//! `--log-dir/LABEL-i.log`, pid appended to `--pidfile`), then polled every `--poll` until:
//!
//! - canopy: its `GET /v1/status` (on port `{p<ready-port>}`) reports the `version` and `root`
//!   that the core reported (`--core-api`) before the spawn: a Merkle-verified full copy;
//! - redis: its `INFO replication` shows `master_link_status:up` and
//!   `master_sync_in_progress:0`; afterwards `STRLEN --key` must be `--expect-len` and the
//!   value's first and last 64 bytes must equal the master's.
//!
//! Time runs from just before the first spawn. Each instance is polled by its own thread (one
//! keep-alive connection, a hand-written HTTP/RESP client, so the prober costs little CPU; its
//! own CPU time is reported too). An instance's readiness lies between its last not-ready
//! check and its ready check; the mean of that gap is reported as the resolution.
//!
//! Egress: for canopy, `canopy_backfill_served_bytes_total` (and `canopy_relayed_bytes_total`)
//! on the core before the spawn and after the last instance is ready; for redis, the master's
//! `total_net_repl_output_bytes`, `sync_full` and `total_forks`. Canopy runs also gather
//! every instance's depth, parent, snapshots installed and bytes served, and (one instance)
//! a breakdown from its log: process start -> `starting` -> `attached` -> `installed snapshot`.
//!
//! All instances get SIGTERM at the end (SIGKILL after 5 s). Prints one JSON row (`--json`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

use canopy::measure::{metric_sum, parse_duration, percentile};
use canopy_bench::cpu_seconds;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    Canopy,
    Redis,
}

#[derive(Parser, Debug)]
#[command(version = canopy_bench::VERSION, about = "Start N node processes at once; time each until it holds a verified copy")]
struct Args {
    #[arg(long, value_enum)]
    kind: Kind,
    /// Instances started at once.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Port of instance i: port_base + port_stride * i (`{p0}`), + 1 (`{p1}`).
    #[arg(long)]
    port_base: u16,
    #[arg(long, default_value_t = 2)]
    port_stride: u16,
    /// With K > 0, `{pp}` is the port of instance i's parent in a fan-out-K tree: the
    /// root (`--tree-root-port`) for the first K instances, else instance (i - K) / K's `{p0}`.
    #[arg(long, default_value_t = 0)]
    tree_fanout: u32,
    /// The tree's root port for `{pp}` (a Redis master).
    #[arg(long, default_value_t = 0)]
    tree_root_port: u32,
    /// Which of {p0}, {p1} answers the readiness checks.
    #[arg(long, default_value_t = 1)]
    ready_port: u16,
    /// Poll interval, e.g. 5ms.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    poll: Duration,
    /// Give up after this long.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    timeout: Duration,
    /// Canopy: the core's API (expected version and root; egress counters).
    #[arg(long)]
    core_api: Option<String>,
    /// Redis: the master's address (egress counters, value check).
    #[arg(long)]
    master: Option<String>,
    /// Redis: the key holding the value.
    #[arg(long, default_value = "k")]
    key: String,
    /// Redis: the value's length.
    #[arg(long, default_value_t = 0)]
    expect_len: u64,
    /// Where each instance's stdout and stderr go (LABEL-i.log).
    #[arg(long)]
    log_dir: PathBuf,
    /// Every pid is written here as soon as it is spawned, for the caller's cleanup if this
    /// process dies; the file is removed once they are all stopped.
    #[arg(long)]
    pidfile: Option<PathBuf>,
    /// The source's pid (core-node or redis master): its CPU time during the run is reported.
    #[arg(long)]
    source_pid: Option<u32>,
    /// Row fields.
    #[arg(long, default_value = "single")]
    scenario: String,
    #[arg(long, default_value = "")]
    variant: String,
    #[arg(long, default_value_t = 1)]
    round: u32,
    #[arg(long, default_value = "boot")]
    label: String,
    /// File size in bytes (for throughput and egress in copies).
    #[arg(long)]
    size_bytes: u64,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// The command template.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ------------------------------------------------------------------ minimal clients

/// One keep-alive connection to an address; reconnects on error.
struct Conn {
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        Conn { addr, stream: None }
    }

    fn stream(&mut self) -> std::io::Result<&mut BufReader<TcpStream>> {
        if self.stream.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            self.stream = Some(BufReader::new(s));
        }
        Ok(self.stream.as_mut().unwrap())
    }

    /// `GET path` over HTTP/1.1 keep-alive; the body of a 2xx answer.
    fn get(&mut self, path: &str) -> anyhow::Result<Vec<u8>> {
        let r = self.get_inner(path);
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    fn get_inner(&mut self, path: &str) -> anyhow::Result<Vec<u8>> {
        let host = self.addr;
        let s = self.stream()?;
        write!(
            s.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n"
        )?;
        let mut line = String::new();
        s.read_line(&mut line)?;
        let code: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
        let mut len = None;
        let mut chunked = false;
        loop {
            line.clear();
            if s.read_line(&mut line)? == 0 {
                bail!("connection closed in headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    len = v.trim().parse::<usize>().ok();
                } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                    chunked = true;
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                s.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim(), 16)
                    .map_err(|_| anyhow!("bad chunk size {line:?}"))?;
                let mut chunk = vec![0u8; n + 2];
                s.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = len {
            body.resize(n, 0);
            s.read_exact(&mut body)?;
        } else {
            s.read_to_end(&mut body)?;
            self.stream = None;
        }
        if !(200..300).contains(&code) {
            bail!("HTTP {code}");
        }
        Ok(body)
    }

    /// One RESP command; the reply as text (bulk/simple/integer), or an error for `-ERR`.
    fn redis(&mut self, args: &[&str]) -> anyhow::Result<String> {
        let r = self.redis_inner(args);
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    /// Sends one RESP command; the connection to read its reply from.
    fn redis_send(&mut self, args: &[&str]) -> anyhow::Result<&mut BufReader<TcpStream>> {
        let s = self.stream()?;
        let mut cmd = format!("*{}\r\n", args.len());
        for a in args {
            cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.get_mut().write_all(cmd.as_bytes())?;
        Ok(s)
    }

    fn redis_inner(&mut self, args: &[&str]) -> anyhow::Result<String> {
        let s = self.redis_send(args)?;
        let mut line = String::new();
        if s.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        let l = line.trim_end();
        match l.as_bytes().first() {
            Some(b'+') | Some(b':') => Ok(l[1..].to_string()),
            Some(b'-') => bail!("redis error: {}", &l[1..]),
            Some(b'$') => {
                let n: i64 = l[1..].parse()?;
                if n < 0 {
                    return Ok(String::new());
                }
                let mut buf = vec![0u8; n as usize + 2];
                s.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                Ok(String::from_utf8_lossy(&buf).into_owned())
            }
            _ => bail!("unexpected reply {l:?}"),
        }
    }

    /// GETRANGE as raw bytes (values are binary).
    fn redis_bytes(&mut self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        let s = self.redis_send(args)?;
        let mut line = String::new();
        s.read_line(&mut line)?;
        let l = line.trim_end();
        let n: i64 = l
            .strip_prefix('$')
            .ok_or_else(|| anyhow!("unexpected reply {l:?}"))?
            .parse()?;
        let mut buf = vec![0u8; n.max(0) as usize + 2];
        s.read_exact(&mut buf)?;
        buf.truncate(n.max(0) as usize);
        Ok(buf)
    }
}

fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

fn addr(s: &str) -> anyhow::Result<SocketAddr> {
    let s = s.trim_start_matches("http://").trim_end_matches('/');
    s.parse().with_context(|| format!("bad address {s:?}"))
}

// ------------------------------------------------------------------ log breakdown

/// Seconds since midnight UTC of a tracing line's RFC 3339 timestamp (ANSI colours stripped).
fn log_time(line: &str) -> Option<f64> {
    let clean: String = strip_ansi(line);
    let t = clean.split_whitespace().next()?;
    let time = t.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn secs_of_day(t: SystemTime) -> f64 {
    let d = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    d % 86400.0
}

/// Milliseconds from the spawn to the first log line containing each marker.
fn canopy_breakdown(log: &PathBuf, spawned: SystemTime) -> Value {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let t0 = secs_of_day(spawned);
    let mut out = serde_json::Map::new();
    for (key, marker) in [
        ("starting_ms", "canopy::cli: starting"),
        ("attached_ms", " attached "),
        ("installed_ms", "installed snapshot"),
    ] {
        let t = text
            .lines()
            .find(|l| strip_ansi(l).contains(marker))
            .and_then(log_time);
        out.insert(
            key.into(),
            t.map(|t| json!(round2((t - t0) * 1e3)))
                .unwrap_or(Value::Null),
        );
    }
    Value::Object(out)
}

// ------------------------------------------------------------------ instances

struct Instance {
    child: Option<Child>,
    spawned: SystemTime,
    spawned_at: Duration,
    conn: Conn,
    ready_at: Option<Duration>,
    /// CPU seconds the process had used when it was seen ready.
    cpu_at_ready: f64,
    /// Time between the last not-ready check and the ready one.
    gap: Duration,
    log: PathBuf,
}

/// What an instance's poller saw.
struct Ready {
    at: Duration,
    gap: Duration,
    cpu: f64,
    ticks: u64,
}

/// The instances, and the pidfile that lists them while they may be running.
struct Guard(Vec<Instance>, Option<PathBuf>);

impl Guard {
    fn stop(&mut self) {
        let pids: Vec<String> = self
            .0
            .iter()
            .filter_map(|i| i.child.as_ref().map(|c| c.id().to_string()))
            .collect();
        if !pids.is_empty() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .args(&pids)
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for inst in &mut self.0 {
            if let Some(mut c) = inst.child.take() {
                loop {
                    match c.try_wait() {
                        Ok(Some(_)) => break,
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(10))
                        }
                        _ => {
                            let _ = c.kill();
                            let _ = c.wait();
                            break;
                        }
                    }
                }
            }
        }
        // Everything listed is gone: the caller must not signal these (maybe reused) pids.
        if let Some(p) = self.1.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.log_dir)?;

    // What "ready" means, read before anything starts.
    let mut core_name = String::new();
    let (expect_version, expect_root, egress_before, relayed_before) = match args.kind {
        Kind::Canopy => {
            let api = addr(
                args.core_api
                    .as_deref()
                    .ok_or_else(|| anyhow!("--core-api is required with --kind canopy"))?,
            )?;
            let mut c = Conn::new(api);
            let st: Value = serde_json::from_slice(&c.get("/v1/status")?)?;
            let v = st["version"]
                .as_u64()
                .ok_or_else(|| anyhow!("core status without version"))?;
            let r = st["root"].as_str().unwrap_or_default().to_string();
            core_name = st["name"].as_str().unwrap_or_default().to_string();
            let m = String::from_utf8_lossy(&c.get("/metrics")?).into_owned();
            (
                v,
                r,
                metric_sum(&m, "canopy_backfill_served_bytes_total"),
                metric_sum(&m, "canopy_relayed_bytes_total"),
            )
        }
        Kind::Redis => (0, String::new(), 0.0, 0.0),
    };
    let master = match (&args.kind, &args.master) {
        (Kind::Redis, Some(m)) => Some(addr(m)?),
        (Kind::Redis, None) => bail!("--master is required with --kind redis"),
        _ => None,
    };
    let redis_stats = |m: SocketAddr| -> anyhow::Result<(f64, f64, f64)> {
        let info = Conn::new(m).redis(&["INFO", "stats"])?;
        let f = |k: &str| {
            info_field(&info, k)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Ok((
            f("total_net_repl_output_bytes"),
            f("sync_full"),
            f("total_forks"),
        ))
    };
    let redis_before = match master {
        Some(m) => Some(redis_stats(m)?),
        None => None,
    };

    let mut pidfile = match &args.pidfile {
        Some(p) => Some(
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(p)?,
        ),
        None => None,
    };
    let cpu0 = cpu_seconds("self");
    let source_cpu0 = args.source_pid.map(cpu_seconds);
    let start = Instant::now();
    let mut guard = Guard(Vec::with_capacity(args.count), args.pidfile.clone());
    for i in 0..args.count {
        let p0 = args.port_base as u32 + args.port_stride as u32 * i as u32;
        let p1 = p0 + 1;
        let ready_port = if args.ready_port == 0 { p0 } else { p1 };
        let k = args.tree_fanout;
        let pp = if k == 0 || (i as u32) < k {
            args.tree_root_port
        } else {
            args.port_base as u32 + args.port_stride as u32 * ((i as u32 - k) / k)
        };
        let sub = |s: &String| {
            s.replace("{i}", &i.to_string())
                .replace("{p0}", &p0.to_string())
                .replace("{p1}", &p1.to_string())
                .replace("{pp}", &pp.to_string())
        };
        let cmd: Vec<String> = args.cmd.iter().map(sub).collect();
        let log = args.log_dir.join(format!("{}-{i}.log", args.label));
        let out = File::create(&log)?;
        let spawned = SystemTime::now();
        let spawned_at = start.elapsed();
        let child = Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        if let Some(f) = pidfile.as_mut() {
            writeln!(f, "{}", child.id())?;
        }
        guard.0.push(Instance {
            child: Some(child),
            spawned,
            spawned_at,
            conn: Conn::new(SocketAddr::from(([127, 0, 0, 1], ready_port as u16))),
            ready_at: None,
            cpu_at_ready: 0.0,
            gap: Duration::ZERO,
            log,
        });
    }
    let spawn_all = start.elapsed();

    // Poll until every instance is ready: one thread per instance, so an instance that is
    // slow to answer (a Redis replica loading) never delays the checks of the others.
    let stop = Arc::new(AtomicBool::new(false));
    let expect = Arc::new((expect_version, expect_root.clone()));
    let mut pollers = Vec::with_capacity(guard.0.len());
    for inst in &guard.0 {
        let addr = inst.conn.addr;
        let pid = inst.child.as_ref().map(|c| c.id()).unwrap_or(0);
        let (kind, poll, since) = (args.kind, args.poll, inst.spawned_at);
        let (stop, expect) = (stop.clone(), expect.clone());
        pollers.push(std::thread::spawn(move || {
            let mut conn = Conn::new(addr);
            let (mut last, mut ticks) = (since, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let tick = Instant::now();
                ticks += 1;
                let ready = match kind {
                    Kind::Canopy => conn
                        .get("/v1/status")
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                        .is_some_and(|st| {
                            st["version"].as_u64() == Some(expect.0)
                                && st["root"].as_str() == Some(expect.1.as_str())
                        }),
                    Kind::Redis => conn
                        .redis(&["INFO", "replication"])
                        .ok()
                        .is_some_and(|info| {
                            info_field(&info, "master_link_status").as_deref() == Some("up")
                                && info_field(&info, "master_sync_in_progress").as_deref()
                                    == Some("0")
                        }),
                };
                let now = start.elapsed();
                if ready {
                    let cpu = cpu_seconds(pid);
                    return Some(Ready {
                        at: now,
                        gap: now - last,
                        cpu,
                        ticks,
                    });
                }
                last = now;
                let next = tick + poll;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
            None
        }));
    }
    let deadline = start + args.timeout;
    loop {
        if pollers.iter().all(|p| p.is_finished()) {
            break;
        }
        for inst in guard.0.iter_mut() {
            if let Some(Ok(Some(status))) = inst.child.as_mut().map(|c| c.try_wait()) {
                stop.store(true, Ordering::Relaxed);
                bail!(
                    "an instance exited early ({status}); see {}",
                    inst.log.display()
                );
            }
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            let pending = pollers.iter().filter(|p| !p.is_finished()).count();
            bail!(
                "{pending} of {} instances not ready after {:?} (logs in {})",
                args.count,
                args.timeout,
                args.log_dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut ticks = 0;
    for (inst, p) in guard.0.iter_mut().zip(pollers) {
        let r = p
            .join()
            .map_err(|_| anyhow!("a poller panicked"))?
            .ok_or_else(|| anyhow!("a poller stopped early"))?;
        inst.ready_at = Some(r.at);
        inst.gap = r.gap;
        inst.cpu_at_ready = r.cpu;
        ticks += r.ticks;
    }
    let total = guard
        .0
        .iter()
        .filter_map(|i| i.ready_at)
        .max()
        .unwrap_or_default();
    let poll_cpu = cpu_seconds("self") - cpu0;
    let source_cpu = args
        .source_pid
        .zip(source_cpu0)
        .map(|(p, c0)| cpu_seconds(p) - c0);
    // CPU of every instance when the last one is ready (a relay that finished early and then
    // served children is counted in full), and summed at each one's own ready time.
    let instances_cpu: f64 = guard
        .0
        .iter()
        .filter_map(|i| i.child.as_ref())
        .map(|c| cpu_seconds(c.id()))
        .sum();
    let instances_cpu_at_ready: f64 = guard.0.iter().map(|i| i.cpu_at_ready).sum();

    // Egress and checks after everyone is ready.
    let mut extra = serde_json::Map::new();
    let mut verified = true;
    let size = args.size_bytes as f64;
    match args.kind {
        Kind::Canopy => {
            let mut c = Conn::new(addr(args.core_api.as_deref().unwrap())?);
            let m = String::from_utf8_lossy(&c.get("/metrics")?).into_owned();
            let egress = metric_sum(&m, "canopy_backfill_served_bytes_total") - egress_before;
            let relayed = metric_sum(&m, "canopy_relayed_bytes_total") - relayed_before;
            extra.insert("egress_bytes".into(), json!(egress));
            extra.insert("egress_copies".into(), json!(round2(egress / size)));
            extra.insert("core_relayed_bytes".into(), json!(relayed));
            // The tree that formed, and what every relay moved.
            let mut depths: BTreeMap<u64, u64> = BTreeMap::new();
            let mut parents: BTreeMap<String, u64> = BTreeMap::new();
            let (mut served, mut received, mut installs, mut resyncs) = (0.0, 0.0, 0u64, 0.0);
            let mut from_peers = 0.0;
            for inst in guard.0.iter_mut() {
                if let Ok(st) = inst
                    .conn
                    .get("/v1/status")
                    .and_then(|b| Ok(serde_json::from_slice::<Value>(&b)?))
                {
                    *depths.entry(st["depth"].as_u64().unwrap_or(0)).or_default() += 1;
                    *parents
                        .entry(st["parent"].as_str().unwrap_or("?").to_string())
                        .or_default() += 1;
                    installs += st["stats"]["snapshots_installed"].as_u64().unwrap_or(0);
                    received += st["stats"]["backfill_received_bytes"]
                        .as_f64()
                        .unwrap_or(0.0);
                    from_peers += st["stats"]["backfill_from_peers_bytes"]
                        .as_f64()
                        .unwrap_or(0.0);
                }
                if let Ok(b) = inst.conn.get("/metrics") {
                    let m = String::from_utf8_lossy(&b);
                    served += metric_sum(&m, "canopy_backfill_served_bytes_total");
                    resyncs += metric_sum(&m, "canopy_resyncs_total");
                }
            }
            extra.insert("depths".into(), json!(depths));
            extra.insert(
                "max_depth".into(),
                json!(depths.keys().next_back().copied().unwrap_or(0)),
            );
            extra.insert(
                "core_children".into(),
                json!(parents.get(&core_name).copied().unwrap_or(0)),
            );
            extra.insert("relays_served_bytes".into(), json!(served));
            extra.insert("received_bytes".into(), json!(received));
            extra.insert("received_from_peers_bytes".into(), json!(from_peers));
            extra.insert("received_copies".into(), json!(round2(received / size)));
            extra.insert("snapshots_installed".into(), json!(installs));
            extra.insert("resyncs".into(), json!(resyncs));
            if args.count == 1 {
                let inst = &guard.0[0];
                let mut b = canopy_breakdown(&inst.log, inst.spawned);
                if let Some(r) = inst.ready_at {
                    b["ready_seen_ms"] = json!(ms(r - inst.spawned_at));
                }
                extra.insert("breakdown_ms".into(), b);
            }
        }
        Kind::Redis => {
            let m = master.unwrap();
            let mut mc = Conn::new(m);
            let head = mc.redis_bytes(&["GETRANGE", &args.key, "0", "63"])?;
            let tail = mc.redis_bytes(&["GETRANGE", &args.key, "-64", "-1"])?;
            for inst in guard.0.iter_mut() {
                let len: u64 = inst.conn.redis(&["STRLEN", &args.key])?.parse()?;
                let h = inst.conn.redis_bytes(&["GETRANGE", &args.key, "0", "63"])?;
                let t = inst
                    .conn
                    .redis_bytes(&["GETRANGE", &args.key, "-64", "-1"])?;
                if len != args.expect_len || h != head || t != tail {
                    verified = false;
                }
            }
            let (b0, s0, f0) = redis_before.unwrap();
            let (b1, s1, f1) = redis_stats(m)?;
            extra.insert("egress_bytes".into(), json!(b1 - b0));
            extra.insert("egress_copies".into(), json!(round2((b1 - b0) / size)));
            extra.insert("full_syncs".into(), json!(s1 - s0));
            extra.insert("forks".into(), json!(f1 - f0));
        }
    }
    guard.stop();

    let mut ready: Vec<f64> = guard.0.iter().filter_map(|i| i.ready_at).map(ms).collect();
    ready.sort_by(f64::total_cmp);
    let gaps: Vec<f64> = guard.0.iter().map(|i| ms(i.gap)).collect();
    let mean_gap = gaps.iter().sum::<f64>() / gaps.len().max(1) as f64;
    let n = args.count as f64;
    let mb_s = n * size / 1e6 / total.as_secs_f64();
    eprintln!(
        "boot-wait {} ({}) round {}: {} instance(s) ready, last at {:.1} ms (first {:.1}, median {:.1}); {:.0} MB/s; resolution {:.1} ms; verified {}",
        args.label,
        args.variant,
        args.round,
        args.count,
        ms(total),
        ready.first().copied().unwrap_or(0.0),
        percentile(&ready, 0.5),
        mb_s,
        mean_gap,
        verified
    );
    if args.json {
        let mut row = json!({
            "scenario": args.scenario,
            "system": match args.kind { Kind::Canopy => "canopy", Kind::Redis => "redis" },
            "variant": args.variant,
            "label": args.label,
            "round": args.round,
            "n": args.count,
            "size_bytes": args.size_bytes,
            "time_ms": ms(total),
            "first_ready_ms": ready.first().copied().unwrap_or(0.0),
            "median_ready_ms": percentile(&ready, 0.5),
            "p90_ready_ms": percentile(&ready, 0.9),
            "spawn_all_ms": ms(spawn_all),
            "throughput_mb_s": (mb_s * 10.0).round() / 10.0,
            "poll_ms": ms(args.poll),
            "poll_resolution_ms": round2(mean_gap),
            "poll_ticks": ticks,
            "prober_cpu_s": round2(poll_cpu),
            "instances_cpu_s": round2(instances_cpu),
            "instances_cpu_at_ready_s": round2(instances_cpu_at_ready),
            "source_cpu_s": source_cpu.map(round2),
            "verified": verified,
        });
        if let Value::Object(o) = &mut row {
            o.extend(extra);
        }
        println!("{row}");
    }
    if !verified {
        bail!("an instance does not hold the master's value");
    }
    Ok(())
}
