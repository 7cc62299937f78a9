//! Hostile input against real node processes: each attack is sent as real requests or
//! frames, and each test asserts the answer (status and reason), that the node still serves
//! `/v1/status` and keeps its children in sync, and a bound on its memory read from /proc.
//!
//! The cluster is one core (fanout 1) with relay r1 below it and relay r2 below r1, so the
//! relay that is attacked has a child to keep in sync. The table of attacks and outcomes is
//! in docs/security.md ("Hostile input").
//!
//! Each test's "Caught on" line is what this test binary found against node binaries built
//! from 8b53228 (main before the fixes), copied over
//! `target/debug/{canopy,core-node,relay-node}`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use canopy::proto;
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

struct Cluster {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pki: Pki,
    config: Vec<String>,
    core: Proc,
    r1: Proc,
    r2: Proc,
    c: reqwest::Client,
}

impl Cluster {
    fn extra(&self) -> Vec<&str> {
        self.config.iter().map(String::as_str).collect()
    }
}

/// The core, r1 below it and r2 below r1, all with `config` as their config file.
async fn cluster(config: &str) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let pki = Pki::with(
        &root,
        &[
            ("c1", "core"),
            ("r1", "relay"),
            ("r2", "relay"),
            ("r3", "relay"),
        ],
    );
    let cfg = root.join("node.toml");
    std::fs::write(&cfg, config).unwrap();
    let config = vec!["--config".to_string(), cfg.display().to_string()];
    let extra: Vec<&str> = config.iter().map(String::as_str).collect();
    let mut core_extra = extra.clone();
    core_extra.extend(["--fanout", "1"]);
    let c = http();
    let core = Proc::start(&root, &pki, "c1", true, &[], &core_extra);
    wait_leader(&c, &core).await;
    let r1 = Proc::start(&root, &pki, "r1", false, &[core.quic], &extra);
    wait_parent(&c, &r1, "c1").await;
    let r2 = Proc::start(&root, &pki, "r2", false, &[r1.quic], &extra);
    wait_parent(&c, &r2, "r1").await;
    Cluster {
        _dir: dir,
        root,
        pki,
        config,
        core,
        r1,
        r2,
        c,
    }
}

async fn wait_parent(c: &reqwest::Client, p: &Proc, parent: &str) {
    wait_until(60, &format!("{} below {parent}", p.name), || async {
        status(c, p).await.is_some_and(|s| s["parent"] == parent)
    })
    .await;
}

/// A write on the core reaches r1 and r2 with the core's root: the tree still works.
async fn in_sync(cl: &Cluster) {
    let r =
        cl.c.patch(cl.core.url("/v1/file?offset=0"))
            .body("after the attack")
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let (v, root) = version_root(&cl.c, &cl.core).await.unwrap();
    for p in [&cl.r1, &cl.r2] {
        wait_until(60, &format!("{} at version {v}", p.name), || async {
            version_root(&cl.c, p).await == Some((v, root.clone()))
        })
        .await;
    }
}

/// The node still answers `/v1/status`.
async fn serves_status(c: &reqwest::Client, p: &Proc) -> Value {
    status(c, p)
        .await
        .unwrap_or_else(|| panic!("{} no longer serves /v1/status", p.name))
}

/// The pid of a node process (found by its unique API address on its command line).
fn pid_of(p: &Proc) -> u32 {
    let api = p.api.to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.contains(&api.as_bytes()) && args.contains(&&b"--api"[..]) {
            return pid;
        }
    }
    panic!("no process for {}", p.name);
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} of {pid}"))
}

/// Resets the process's peak RSS (VmHWM) to its current RSS.
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// Bytes the peak RSS grew since [`reset_peak`] (from the RSS at the reset).
fn peak_growth(pid: u32, base_kib: u64) -> u64 {
    status_kib(pid, "VmHWM:").saturating_sub(base_kib) * 1024
}

fn rss(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:") * 1024
}

/// Measures how far `p`'s peak RSS rises while `f` runs.
async fn peak_during<F: std::future::Future<Output = T>, T>(p: &Proc, f: F) -> (T, u64) {
    let pid = pid_of(p);
    reset_peak(pid);
    let base = status_kib(pid, "VmRSS:");
    let out = f.await;
    (out, peak_growth(pid, base))
}

async fn error_of(r: reqwest::Response) -> (u16, String, reqwest::header::HeaderMap) {
    let code = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("not a JSON error ({code}): {text:?}"));
    assert!(!text.contains('\n'), "one line: {text:?}");
    (
        code,
        v["error"].as_str().unwrap_or_default().to_string(),
        headers,
    )
}

fn rejected(metrics: &str, reason: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("canopy_rejected_total") && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `p`'s `canopy_request_bytes_held`, from its own series (`node` = its name).
async fn request_bytes_held(c: &reqwest::Client, p: &Proc) -> Option<u64> {
    let series = format!("canopy_request_bytes_held{{node=\"{}\"}} ", p.name);
    metrics(c, p)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
}

/// A QUIC endpoint with a relay certificate `name` of the cluster's CA.
async fn connect(ep: &quinn::Endpoint, to: &Proc) -> quinn::Connection {
    ep.connect(to.quic, canopy::tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap()
}

/// Sends `frame` on a new stream of `conn` and waits for what a refused frame gets: no
/// answer, and the connection closed within 10 s.
async fn refused_and_closed(conn: &quinn::Connection, frame: &[u8]) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(frame).await;
    let _ = send.finish();
    let got = canopy::transport::read_raw(&mut recv, 1 << 20).await;
    assert!(got.is_err() || got.unwrap().is_none(), "no answer expected");
    tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the connection is closed");
}

/// `POST /v1/file/truncate?len=68719476736` (64 GiB, the old default max_len) is refused
/// with 413 before it is proposed: nothing changes anywhere.
///
/// Caught on 8b53228 (node binaries built from main before this work): the truncate was
/// committed (`left: 200, right: 413`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_beyond_max_len_is_refused() {
    let cl = cluster("").await;
    let before = version_root(&cl.c, &cl.core).await.unwrap();
    let r =
        cl.c.post(cl.core.url("/v1/file/truncate?len=68719476736"))
            .send()
            .await
            .unwrap();
    let (code, why, _) = error_of(r).await;
    assert_eq!(code, 413, "{why}");
    assert!(why.contains("max_len"), "{why}");
    assert_eq!(version_root(&cl.c, &cl.core).await.unwrap(), before);
    let r =
        cl.c.post(cl.r1.url("/v1/file/truncate?len=68719476736"))
            .send()
            .await
            .unwrap();
    assert_eq!(error_of(r).await.0, 413, "on a relay too");
    assert!(rejected(&metrics(&cl.c, &cl.core).await, "over_max_len") >= 1.0);
    in_sync(&cl).await;
    assert!(rss(pid_of(&cl.core)) < 200 * MIB);
}

/// A truncate up to `max_len` (1 GiB here) is taken, and costs no memory and no disk: every
/// node shares one zero chunk for the extension, the materialized files are sparse, and a
/// relay that joins afterwards receives the 1 GiB transfer without holding 1 GiB.
///
/// Caught on 8b53228 (node binaries built from main before this work): each relay's file
/// took the whole 1 GiB on disk (`r1 takes 1073745920 bytes on disk`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_to_max_len_costs_no_memory_or_disk() {
    let cl = cluster("[stream]\nmax_len = 1073741824\n").await;
    let r =
        cl.c.post(cl.core.url("/v1/file/truncate?len=1073741824"))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let (v, _) = version_root(&cl.c, &cl.core).await.unwrap();
    for p in [&cl.r1, &cl.r2] {
        wait_materialized(&cl.c, p, v).await;
        let meta = std::fs::metadata(&p.file).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        let on_disk = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        assert!(
            on_disk < 8 * MIB,
            "{} takes {on_disk} bytes on disk",
            p.name
        );
        assert!(rss(pid_of(p)) < 300 * MIB, "{}", p.name);
    }
    let extra = cl.extra();
    let r3 = Proc::start(&cl.root, &cl.pki, "r3", false, &[cl.r2.quic], &extra);
    wait_materialized(&cl.c, &r3, v).await;
    let s = serves_status(&cl.c, &r3).await;
    assert_eq!(s["length"], 1u64 << 30);
    assert!(
        rss(pid_of(&r3)) < 300 * MIB,
        "r3 holds {}",
        rss(pid_of(&r3))
    );
    in_sync(&cl).await;
}

/// A PATCH whose offset puts its end past `max_len` (or past 2^64) is 413, not proposed.
///
/// Caught on 8b53228 (node binaries built from main before this work): the core dropped the
/// connection and the relay answered 503 "may or may not have committed" (`left: 503,
/// right: 413`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_past_max_len_is_refused() {
    let cl = cluster("").await;
    for offset in ["18446744073709551000", "17179869184"] {
        let r =
            cl.c.patch(cl.r1.url(&format!("/v1/file?offset={offset}")))
                .body(vec![1u8; 4096])
                .send()
                .await
                .unwrap();
        let (code, why, _) = error_of(r).await;
        assert_eq!(code, 413, "offset {offset}: {why}");
        assert!(why.contains("max_len"), "{why}");
    }
    let r =
        cl.c.patch(cl.r1.url("/v1/file?offset=x"))
            .body("x")
            .send()
            .await
            .unwrap();
    assert_eq!(error_of(r).await.0, 400);
    serves_status(&cl.c, &cl.r1).await;
    in_sync(&cl).await;
}

/// `GET /v1/watch?timeout=NaN` (and other timeouts that are not a number of seconds) is a
/// 400 with a reason, not a panic that drops the connection.
///
/// Caught on 8b53228 (node binaries built from main before this work): the handler panicked
/// and the connection dropped (`error sending request ... timeout=NaN`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_with_a_nan_timeout_is_a_400() {
    let cl = cluster("").await;
    for t in ["NaN", "inf", "-1", "1e400", "x"] {
        let r =
            cl.c.get(cl.r1.url(&format!("/v1/watch?timeout={t}")))
                .send()
                .await
                .unwrap_or_else(|e| panic!("timeout={t}: {e}"));
        let (code, why, _) = error_of(r).await;
        assert_eq!(code, 400, "timeout={t}: {why}");
    }
    serves_status(&cl.c, &cl.r1).await;
    in_sync(&cl).await;
}

/// Past `limits.watches` (128) long polls at once, a watch gets 503 with `Retry-After`; the
/// other requests are still served.
///
/// Caught on 8b53228 (node binaries built from main before this work): there was no limit
/// (`never refused a watch`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_over_the_limit_get_503_with_retry_after() {
    let cl = cluster("").await;
    let many = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let hold = || {
        let req = many
            .get(cl.r1.url("/v1/watch?after=1000000&timeout=120"))
            .send();
        tokio::spawn(req)
    };
    let mut held: Vec<_> = (0..128).map(|_| hold()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (code, why, headers) = loop {
        assert!(Instant::now() < deadline, "never refused a watch");
        // A held watch that lost the race for a slot to a probe is sent again.
        for h in held.iter_mut().filter(|h| h.is_finished()) {
            *h = hold();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r =
            cl.c.get(cl.r1.url("/v1/watch?after=1000000&timeout=0.2"))
                .send()
                .await
                .unwrap();
        if r.status() == 503 {
            break error_of(r).await;
        }
    };
    assert_eq!(code, 503);
    assert!(why.contains("watches"), "{why}");
    assert_eq!(headers["retry-after"], "1");
    serves_status(&cl.c, &cl.r1).await;
    assert!(rejected(&metrics(&cl.c, &cl.r1).await, "watches") >= 1.0);
    for h in held {
        h.abort();
    }
    in_sync(&cl).await;
}

/// A full `GET /v1/file` streams from a snapshot: the relay's peak memory rises by far less
/// than the 40 MB it sends.
///
/// Caught on 8b53228 (node binaries built from main before this work): the body was a copy
/// of the file (`r1's peak RSS grew by 39911424 bytes for one GET`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_get_streams_without_copying_the_file() {
    let cl = cluster("").await;
    let (v, content) = put_random(&cl.c, &cl.core, 40_000_000, 7).await;
    wait_materialized(&cl.c, &cl.r1, v).await;
    let (body, grew) = peak_during(&cl.r1, async {
        let r = cl.c.get(cl.r1.url("/v1/file")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-length"], "40000000");
        r.bytes().await.unwrap()
    })
    .await;
    assert!(body[..] == content[..], "the body is the file");
    assert!(
        grew < 16 * MIB,
        "r1's peak RSS grew by {grew} bytes for one GET"
    );
    in_sync(&cl).await;
}

/// `Range: bytes=5-2` and other invalid ranges are ignored: 200 with the whole body (RFC
/// 9110); a valid range past the end is 416.
///
/// Caught on 8b53228 (node binaries built from main before this work): `bytes=5-2` was a
/// 416 (`left: 416, right: 200`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_range_gets_the_whole_body() {
    let cl = cluster("").await;
    let r =
        cl.c.patch(cl.core.url("/v1/file?offset=0&wait=applied"))
            .body("0123456789")
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 200);
    let (v, _) = version_root(&cl.c, &cl.core).await.unwrap();
    wait_materialized(&cl.c, &cl.r1, v).await;
    for range in ["bytes=5-2", "bytes=0-1,3-4", "items=0-1", "bytes=x-"] {
        let r =
            cl.c.get(cl.r1.url("/v1/file"))
                .header("range", range)
                .send()
                .await
                .unwrap();
        assert_eq!(r.status(), 200, "{range}");
        assert_eq!(&r.bytes().await.unwrap()[..], b"0123456789", "{range}");
    }
    let r =
        cl.c.get(cl.r1.url("/v1/file"))
            .header("range", "bytes=10-")
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */10");
    in_sync(&cl).await;
}

const SMALL_WRITES: &str =
    "[stream]\nmax_len = 1073741824\nmax_update_bytes = 16777216\nmax_frame = 18874368\n";

/// Sends `PUT /v1/file` over a raw connection: the head (declaring `declared` bytes, or
/// chunked), then up to `total` bytes of changing content while the server reads them, and
/// reads the answer as soon as it comes. Returns the status, the body and the bytes sent.
async fn raw_put(
    addr: std::net::SocketAddr,
    declared: Option<u64>,
    total: u64,
) -> (u16, String, u64) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let framing = match declared {
        Some(n) => format!("Content-Length: {n}"),
        None => "Transfer-Encoding: chunked".to_string(),
    };
    let head = format!(
        "PUT /v1/file HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer {TOKEN}\r\n{framing}\r\n\r\n"
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    let sent = std::sync::Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let chunked = declared.is_none();
    let writer = tokio::spawn(async move {
        let mut i = 0u64;
        while counter.load(Ordering::Relaxed) < total {
            let block: Vec<u8> = (0..1u64 << 16).map(|j| (j * 31 + i * 7) as u8).collect();
            let mut out = Vec::new();
            if chunked {
                out.extend_from_slice(format!("{:x}\r\n", block.len()).as_bytes());
            }
            out.extend_from_slice(&block);
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
            if wr.write_all(&out).await.is_err() {
                return;
            }
            counter.fetch_add(block.len() as u64, Ordering::Relaxed);
            i += 1;
        }
    });
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = rd.read(&mut tmp).await.unwrap();
        assert!(n > 0, "the connection closed without an answer");
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let code: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < end + len {
        let n = rd.read(&mut tmp).await.unwrap();
        assert!(n > 0, "the answer's body was cut");
        buf.extend_from_slice(&tmp[..n]);
    }
    writer.abort();
    let body = String::from_utf8_lossy(&buf[end..end + len]).to_string();
    (code, body, sent.load(Ordering::Relaxed))
}

/// A 2 GB PUT to a node whose `max_len` is 1 GiB is refused early: at once when it
/// declares its length, and after at most `max_update_bytes` (16 MiB here) of changed
/// content when it does not; the node's peak memory grows by less than 64 MB either way.
///
/// Caught on 8b53228 (node binaries built from main before this work): the body was
/// buffered whole before any check, then 400 (`left: 400, right: 413`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2gb_put_is_refused_early_with_bounded_memory() {
    let cl = cluster(SMALL_WRITES).await;
    let ((code, body, sent), grew) =
        peak_during(&cl.r1, raw_put(cl.r1.api, Some(2_000_000_000), 0)).await;
    assert_eq!(code, 413, "{body}");
    let why: Value = serde_json::from_str(&body).unwrap();
    assert!(why["error"].as_str().unwrap().contains("max_len"), "{body}");
    assert_eq!(sent, 0);
    assert!(grew < 64 * MIB, "peak RSS grew by {grew}");

    let ((code, body, sent), grew) =
        peak_during(&cl.r1, raw_put(cl.r1.api, None, 2_000_000_000)).await;
    assert_eq!(code, 413, "{body}");
    let why: Value = serde_json::from_str(&body).unwrap();
    assert!(
        why["error"].as_str().unwrap().contains("max_update_bytes"),
        "{body}"
    );
    assert!(sent < 256 * MIB, "{sent} bytes of the body were sent");
    assert!(grew < 64 * MIB, "peak RSS grew by {grew}");
    assert!(rejected(&metrics(&cl.c, &cl.r1).await, "update_too_large") >= 1.0);
    serves_status(&cl.c, &cl.r1).await;
    in_sync(&cl).await;
}

/// A proposal over `max_update_bytes` sent straight over QUIC, as a relay forwards one, is
/// refused like the same write over HTTP: one limit on every path.
///
/// Caught on 8b53228 (node binaries built from main before this work): it was committed
/// (`the proposal was not refused: Some(CommittedVersion(2))`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_proposal_over_max_update_bytes_is_refused() {
    let cl = cluster("[stream]\nmax_update_bytes = 4194304\nmax_frame = 8388608\n").await;
    let ep = quic_client(&cl.root, &cl.pki.ca, "forger");
    let conn = connect(&ep, &cl.core).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let data = Bytes::from(vec![5u8; 4 * 1024 * 1024 + 512 * 1024]);
    let req = proto::Request {
        kind: Some(proto::request::Kind::Propose(proto::Propose {
            proposal: Some(proto::Proposal {
                update: Some(proto::Update {
                    ops: vec![proto::Op {
                        kind: Some(proto::op::Kind::Write(proto::Write { offset: 0, data })),
                    }],
                }),
                id: Bytes::from_static(b"too-large"),
                ..Default::default()
            }),
            hops: 0,
        })),
    };
    canopy::transport::write_frame(&mut send, &req)
        .await
        .unwrap();
    send.finish().unwrap();
    let reply: proto::ProposeReply = canopy::transport::read_frame(&mut recv, 1 << 20)
        .await
        .unwrap()
        .unwrap();
    match reply.kind {
        Some(proto::propose_reply::Kind::Refused(why)) => {
            assert!(why.contains("max_update_bytes"), "{why}")
        }
        other => panic!("the proposal was not refused: {other:?}"),
    }
    assert_eq!(serves_status(&cl.c, &cl.core).await["version"], 0);
    assert!(rejected(&metrics(&cl.c, &cl.core).await, "update_too_large") >= 1.0);
    in_sync(&cl).await;
}

/// A subscription listing 3 million empty chunk hashes (6 MB on the wire, 100 MB once
/// decoded) is refused by counting them before decoding: the connection is closed, and the
/// node's peak memory barely moves.
///
/// Caught on 8b53228 (node binaries built from main before this work): it was decoded and
/// answered (`no answer expected`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_with_millions_of_chunk_hashes_is_refused_before_decoding() {
    let cl = cluster("").await;
    let ep = quic_client(&cl.root, &cl.pki.ca, "amplifier");
    let conn = connect(&ep, &cl.r1).await;
    let req = proto::Request {
        kind: Some(proto::request::Kind::Subscribe(proto::Subscribe {
            name: "amplifier".into(),
            have_chunks: vec![Bytes::new(); 3_000_000],
            ..Default::default()
        })),
    };
    let frame = canopy::wire::encode(&req);
    let grew = peak_during(&cl.r1, refused_and_closed(&conn, &frame))
        .await
        .1;
    assert!(grew < 32 * MIB, "peak RSS grew by {grew}");
    assert!(rejected(&metrics(&cl.c, &cl.r1).await, "too_many_elements") >= 1.0);
    in_sync(&cl).await;
}

/// A frame that begins as an empty subscription (so it is capped as one: 9 MB at the
/// default limits) and goes on as a Raft RPC of 4 million empty entries (8 MB on the wire,
/// about a GB decoded, where a decoder keeps the last kind it meets) is refused once read,
/// before it is decoded: the connection is closed, and the relay's peak memory barely moves.
///
/// Caught on a99eacc (node binaries built from main before this work): the frame was
/// decoded as the Raft RPC (`peak RSS grew by 842797056`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_begins_as_one_kind_and_ends_as_another_is_refused() {
    let cl = cluster("").await;
    let ep = quic_client(&cl.root, &cl.pki.ca, "mixer");
    let conn = connect(&ep, &cl.r1).await;
    let head = prost::Message::encode_to_vec(&proto::Request {
        kind: Some(proto::request::Kind::Subscribe(proto::Subscribe {
            name: "mixer".into(),
            ..Default::default()
        })),
    });
    let tail = prost::Message::encode_to_vec(&proto::Request {
        kind: Some(proto::request::Kind::Raft(proto::RaftRpc {
            kind: Some(proto::raft_rpc::Kind::AppendEntries(proto::AppendEntries {
                entries: vec![proto::RaftEntry::default(); 4_000_000],
                ..Default::default()
            })),
        })),
    });
    let body = [head, tail].concat();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let grew = peak_during(&cl.r1, refused_and_closed(&conn, &frame))
        .await
        .1;
    assert!(grew < 48 * MIB, "peak RSS grew by {grew}");
    assert!(rejected(&metrics(&cl.c, &cl.r1).await, "mixed_kinds") >= 1.0);
    in_sync(&cl).await;
}

/// A sample offer whose one peer holds 200 000 empty zone names (400 KB on the wire, within
/// a sample's 512 KiB; about 5 MB decoded) is refused by counting them before decoding.
///
/// Caught on a99eacc (node binaries built from main before this work): it was decoded and
/// answered (`no answer expected`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_offer_with_too_many_held_zones_is_refused_before_decoding() {
    let cl = cluster("").await;
    let ep = quic_client(&cl.root, &cl.pki.ca, "zoner");
    let conn = connect(&ep, &cl.r1).await;
    let req = proto::Request {
        kind: Some(proto::request::Kind::Sample(proto::Sample {
            offer: vec![proto::PeerInfo {
                name: "zoner".into(),
                addr: "127.0.0.1:9".into(),
                depth: -1,
                held_for: vec![String::new(); 200_000],
                ..Default::default()
            }],
        })),
    };
    refused_and_closed(&conn, &canopy::wire::encode(&req)).await;
    assert!(rejected(&metrics(&cl.c, &cl.r1).await, "too_many_elements") >= 1.0);
    in_sync(&cl).await;
}

/// A proposal of 2 000 ops that truncate to `max_len` (16 GiB) and back to 0 writes no byte,
/// but each truncate up adds a whole file's chunks (262 144): applied, it would index
/// half a billion chunks on every core and relay. It is refused before it is proposed, and
/// nothing changes anywhere.
///
/// Caught on a99eacc (node binaries built from main before this work): it was committed,
/// and the core, applying it under its state lock, went silent until the client's
/// connection timed out (`Read(ConnectionLost(TimedOut))`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_that_truncates_back_and_forth_is_refused() {
    let cl = cluster("").await;
    let ep = quic_client(&cl.root, &cl.pki.ca, "seesaw");
    let conn = connect(&ep, &cl.core).await;
    let ops = (0..2000)
        .map(|i| proto::Op {
            kind: Some(proto::op::Kind::Truncate(proto::Truncate {
                len: if i % 2 == 0 { 16 << 30 } else { 0 },
            })),
        })
        .collect();
    let req = proto::Request {
        kind: Some(proto::request::Kind::Propose(proto::Propose {
            proposal: Some(proto::Proposal {
                update: Some(proto::Update { ops }),
                id: Bytes::from_static(b"seesaw"),
                ..Default::default()
            }),
            hops: 0,
        })),
    };
    let (reply, grew) = peak_during(&cl.core, async {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        canopy::transport::write_frame(&mut send, &req)
            .await
            .unwrap();
        send.finish().unwrap();
        let reply: proto::ProposeReply = tokio::time::timeout(
            Duration::from_secs(30),
            canopy::transport::read_frame(&mut recv, 1 << 20),
        )
        .await
        .expect("an answer within 30 s")
        .unwrap()
        .unwrap();
        reply
    })
    .await;
    match reply.kind {
        Some(proto::propose_reply::Kind::Refused(why)) => {
            assert!(why.contains("chunks in all"), "{why}")
        }
        other => panic!("the proposal was not refused: {other:?}"),
    }
    assert!(grew < 48 * MIB, "peak RSS grew by {grew}");
    assert_eq!(serves_status(&cl.c, &cl.core).await["version"], 0);
    assert!(rejected(&metrics(&cl.c, &cl.core).await, "update_growth") >= 1.0);
    in_sync(&cl).await;
}

/// One peer address opening 40 connections gets at most `limits.connections_per_peer` (32);
/// the others are refused before the handshake, and other peers are unaffected.
///
/// Caught on 8b53228 (node binaries built from main before this work): all were accepted
/// (`40 connections were accepted`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_peer_address_are_bounded() {
    let cl = cluster("").await;
    let ep = quic_client(&cl.root, &cl.pki.ca, "flooder");
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        match ep
            .connect(cl.core.quic, canopy::tls::SERVER_NAME)
            .unwrap()
            .await
        {
            Ok(c) => open.push(c),
            Err(_) => refused += 1,
        }
    }
    assert!(open.len() <= 32, "{} connections were accepted", open.len());
    assert!(refused >= 8, "{refused} refused");
    assert!(rejected(&metrics(&cl.c, &cl.core).await, "connections_per_peer") >= 8.0);
    in_sync(&cl).await;
    drop(open);
}

/// Peers on many addresses, each within `connections_per_peer`, together reach
/// `limits.connections` (here 8, for the core, which serves r1 already): the rest are
/// refused, and a request on them fails. A core certificate still connects and is served
/// (the room kept for core members' Raft links), and the tree stays in sync once the
/// others close.
///
/// Caught on fb904e1 (node binaries built from main before this work): the core
/// certificate was refused with the others (`a core member's connection is served:
/// Err("aborted by peer: the server refused to accept a new connection")`), so a flood of
/// connections shut out core members' Raft links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_from_all_peers_together_are_bounded_with_room_for_the_core() {
    let cl = cluster("[limits]\nconnections = 8\n").await;
    let mut served = Vec::new();
    let mut refused = 0;
    for i in 0..12 {
        let ep = quic_client(&cl.root, &cl.pki.ca, &format!("many-{i}"));
        let connected = ep
            .connect(cl.core.quic, canopy::tls::SERVER_NAME)
            .unwrap()
            .await;
        match connected {
            Ok(conn) if tree_query(&conn).await.is_ok() => served.push((ep, conn)),
            _ => refused += 1,
        }
    }
    assert!(served.len() < 8, "{} connections were served", served.len());
    assert!(refused >= 5, "{refused} refused");
    assert!(rejected(&metrics(&cl.c, &cl.core).await, "connections") >= 5.0);
    let ep = quic_client_as(&cl.root, &cl.pki.ca, "c9", canopy::tls::Role::Core);
    let core = ep
        .connect(cl.core.quic, canopy::tls::SERVER_NAME)
        .unwrap()
        .await;
    let answer = match core {
        Ok(conn) => tree_query(&conn).await,
        Err(e) => Err(e.to_string()),
    };
    assert!(
        answer.is_ok(),
        "a core member's connection is served: {answer:?}"
    );
    drop(served);
    in_sync(&cl).await;
}

/// A tree query of depth 0 on `conn`: the names it lists, or why it failed.
async fn tree_query(conn: &quinn::Connection) -> Result<Vec<String>, String> {
    let ask = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let req = proto::Request {
            kind: Some(proto::request::Kind::Tree(proto::TreeQuery { budget: 0 })),
        };
        canopy::transport::write_frame(&mut send, &req)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        let reply: proto::TreeReply = canopy::transport::read_frame(&mut recv, 1 << 20)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no reply")?;
        Ok(reply.nodes.into_iter().map(|n| n.name).collect())
    };
    tokio::time::timeout(Duration::from_secs(10), ask)
        .await
        .map_err(|_| "no reply within 10 s".to_string())?
}

/// A peer opens 60 streams on r1 over two connections, each stream with most of a 2.3 MB
/// subscription (within the cap for a 4 GiB `max_len`), and never finishes any. The first
/// frames of all requests together hold at most `limits.request_bytes` (here 4 MiB), and
/// what quinn buffers at most its connection windows (8 MiB each here), not 60 frames:
/// those that find no room wait, and every stream is reset `limits.request_timeout_ms`
/// (1.5 s here) after it opened, refused as `request_budget` or `request_timeout`. The
/// connections stay open, and the tree stays in sync.
///
/// Caught on fb904e1 (node binaries built from main before this work, the config without
/// the two `[limits]` keys it does not know): every frame was allocated and read as it came,
/// and no stream was ever refused (`peak RSS grew by 50380800` within 0.4 s, and rising).
/// Here it grows by about 26 MB: the budget and the two connection windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_in_part_hold_no_more_than_the_request_budget() {
    let cl = cluster(
        "[stream]\nmax_len = 4294967296\nmax_update_bytes = 1048576\nstream_window_bytes = 1048576\n\
         [limits]\nrequest_bytes = 4194304\nrequest_timeout_ms = 1500\n",
    )
    .await;
    let ep = quic_client(&cl.root, &cl.pki.ca, "dripper");
    let conns = [connect(&ep, &cl.r1).await, connect(&ep, &cl.r1).await];
    let frame = canopy::wire::encode(&proto::Request {
        kind: Some(proto::request::Kind::Subscribe(proto::Subscribe {
            name: "dripper".into(),
            have_chunks: vec![Bytes::from(vec![7u8; 32]); 65_000],
            ..Default::default()
        })),
    });
    assert!(frame.len() > 2_200_000);
    let partial = frame.slice(..frame.len() - 10);
    let streams = 60;
    let refused = || async {
        let m = metrics(&cl.c, &cl.r1).await;
        (
            rejected(&m, "request_budget"),
            rejected(&m, "request_timeout"),
        )
    };
    let pid = pid_of(&cl.r1);
    reset_peak(pid);
    let base = status_kib(pid, "VmRSS:");
    let writers: Vec<_> = (0..streams)
        .map(|i| {
            let (conn, partial) = (conns[i % 2].clone(), partial.clone());
            tokio::spawn(async move {
                let (mut send, _recv) = conn.open_bi().await.unwrap();
                let _ = send.write_all(&partial).await;
                // Held open (dropping it would finish the stream).
                let _ = send.stopped().await;
            })
        })
        .collect();
    wait_until(60, "every stream sent in part refused", || async {
        let grew = peak_growth(pid, base);
        assert!(grew < 40 * MIB, "peak RSS grew by {grew}");
        let (budget, timeout) = refused().await;
        budget + timeout >= streams as f64
    })
    .await;
    writers.iter().for_each(|w| w.abort());
    let grew = peak_growth(pid, base);
    eprintln!("r1's peak RSS grew by {grew} bytes");
    assert!(grew < 40 * MIB, "peak RSS grew by {grew}");
    let (budget, timeout) = refused().await;
    assert_eq!(budget + timeout, streams as f64, "{budget} + {timeout}");
    assert!(budget >= 1.0 && timeout >= 1.0, "{budget} + {timeout}");
    assert_eq!(
        request_bytes_held(&cl.c, &cl.r1).await,
        Some(0),
        "all given back"
    );
    for c in &conns {
        assert!(c.close_reason().is_none(), "the connections stay open");
    }
    serves_status(&cl.c, &cl.r1).await;
    in_sync(&cl).await;
}

/// A relay whose core takes the forwarded proposal and never answers (a core stalled by a
/// lost quorum; here a fake core with a core certificate) answers its client within
/// `limits.commit_wait_ms` (1 s here): 503, the outcome unknown, with how to check. The
/// relay's request slot is free again, and it keeps serving.
///
/// Caught on fb904e1 (node binaries built from main before this work, the config without
/// the key it does not know): the write was never answered (`no answer within 30 s`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_core_that_never_answers_is_answered_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::with(root, &[("r1", "relay")]);
    let fake = quic_client_as(root, &pki.ca, "c1", canopy::tls::Role::Core);
    let fake_addr = fake.local_addr().unwrap();
    let proposals = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let held = {
        let proposals = proposals.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(incoming) = fake.accept().await {
                let Ok(conn) = incoming.await else { continue };
                let proposals = proposals.clone();
                held.push(tokio::spawn(async move {
                    let mut streams = Vec::new();
                    while let Ok((send, mut recv)) = conn.accept_bi().await {
                        let first = canopy::transport::read_raw(&mut recv, 1 << 20).await;
                        let is_proposal = first.ok().flatten().is_some_and(|raw| {
                            matches!(
                                raw.decode::<proto::Request>().map(|r| r.kind),
                                Ok(Some(proto::request::Kind::Propose(_)))
                            )
                        });
                        if is_proposal {
                            proposals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        streams.push((send, recv));
                    }
                }));
            }
        })
    };
    let cfg = root.join("r1.toml");
    std::fs::write(&cfg, "[limits]\ncommit_wait_ms = 1000\n").unwrap();
    let cfg = cfg.display().to_string();
    let r1 = Proc::start(root, &pki, "r1", false, &[fake_addr], &["--config", &cfg]);
    let c = http();
    let write = c
        .patch(r1.url("/v1/file?offset=0"))
        .body("into the void")
        .send();
    let r = tokio::time::timeout(Duration::from_secs(30), write)
        .await
        .expect("no answer within 30 s")
        .unwrap();
    let (code, error, _) = error_of(r).await;
    assert_eq!(code, 503, "{error}");
    assert!(
        error.contains("may or may not have committed") && error.contains("commit_wait_ms"),
        "{error}"
    );
    assert!(
        proposals.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the proposal reached the fake core"
    );
    serves_status(&c, &r1).await;
    held.abort();
}

/// A fake parent that answers a subscription with `parent_depth = u32::MAX` is refused at
/// decode (no depth arithmetic on it) and banned; the relay goes on to the core the fake
/// parent named, and stays in sync.
///
/// Caught on 8b53228 (node binaries built from main before this work): the relay died (`r3
/// no longer serves /v1/status`): `p.depth + 1` in the overlay overflowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_declaring_depth_u32_max_is_refused() {
    let cl = cluster("").await;
    let evil = quic_client(&cl.root, &cl.pki.ca, "evil");
    let evil_addr = evil.local_addr().unwrap();
    let core_addr = cl.core.quic.to_string();
    let me = evil_addr.to_string();
    let subscribed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = subscribed.clone();
    let server = tokio::spawn(async move {
        while let Some(inc) = evil.accept().await {
            let Ok(conn) = inc.await else { continue };
            let (me, core_addr, seen) = (me.clone(), core_addr.clone(), seen.clone());
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let Ok(Some(req)) =
                        canopy::transport::read_frame::<proto::Request>(&mut recv, 1 << 24).await
                    else {
                        continue;
                    };
                    match req.kind {
                        Some(proto::request::Kind::Sample(_)) => {
                            let info = |name: &str, addr: &str, free_slots| proto::PeerInfo {
                                name: name.into(),
                                addr: addr.into(),
                                depth: 0,
                                free_slots,
                                root_path: vec![name.into()],
                                ..Default::default()
                            };
                            // The core is named (full, as it is: fanout 1), so that the
                            // fake parent is tried first and the core after it.
                            let reply = proto::SampleReply {
                                info: Some(info("evil", &me, 64)),
                                peers: vec![info("c1", &core_addr, 0)],
                            };
                            let _ = canopy::transport::write_frame(&mut send, &reply).await;
                            let _ = send.finish();
                        }
                        Some(proto::request::Kind::Subscribe(_)) => {
                            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let ok = proto::Downstream {
                                kind: Some(proto::downstream::Kind::SubscribeOk(
                                    proto::SubscribeOk {
                                        parent_name: "evil".into(),
                                        parent_depth: u32::MAX,
                                        resume: true,
                                        root_path: vec!["evil".into()],
                                        chunk_size: 65536,
                                        ..Default::default()
                                    },
                                )),
                            };
                            let _ = canopy::transport::write_frame(&mut send, &ok).await;
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    let extra = cl.extra();
    let victim = Proc::start(&cl.root, &cl.pki, "r3", false, &[evil_addr], &extra);
    wait_until(60, "the fake parent asked", || async {
        subscribed.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;
    let s = serves_status(&cl.c, &victim).await;
    assert_ne!(s["parent"], "evil", "the relay took the fake parent: {s}");
    let r =
        cl.c.patch(cl.core.url("/v1/file?offset=0"))
            .body("the victim follows")
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 200);
    let (v, root) = version_root(&cl.c, &cl.core).await.unwrap();
    wait_until(60, "the victim in sync", || async {
        version_root(&cl.c, &victim).await == Some((v, root.clone()))
    })
    .await;
    let s = serves_status(&cl.c, &victim).await;
    assert!(s["depth"].as_u64().is_some_and(|d| d < 8), "{s}");
    in_sync(&cl).await;
    server.abort();
}

/// More concurrent writes than a core's proposal queue holds (`limits.proposal_queue = 1`
/// here): the excess is refused at once with 503 and `Retry-After`, the rest commit, and
/// the tree stays in sync.
///
/// Caught on 8b53228 (node binaries built from main before this work): there was no such
/// limit; the node refused the `[limits]` section at start (`node c1 did not start`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_beyond_the_proposal_queue_get_503_busy() {
    let cl = cluster("[limits]\nproposal_queue = 1\n").await;
    let writes = (0..200u64).map(|i| {
        cl.c.patch(cl.core.url(&format!("/v1/file?offset={}", i * 8)))
            .body(i.to_le_bytes().to_vec())
            .send()
    });
    let answers = futures::future::join_all(writes).await;
    let mut busy = 0;
    let mut ok = 0;
    for r in answers {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            503 => {
                let (_, why, headers) = error_of(r).await;
                assert!(why.contains("busy"), "{why}");
                assert_eq!(headers["retry-after"], "1");
                busy += 1;
            }
            other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
        }
    }
    assert!(busy > 0, "no write was refused ({ok} committed)");
    assert!(ok > 0);
    assert!(rejected(&metrics(&cl.c, &cl.core).await, "busy") >= 1.0);
    in_sync(&cl).await;
}

/// A peer holds the whole of the core's `limits.request_bytes` (here exactly one proposal
/// of the largest size) with a proposal it never finishes. A write through r1 meanwhile
/// waits for room: the stalled frame's stream is reset at `limits.request_timeout_ms`
/// (1.5 s), before the write's own wait ends (it began later, and waiters are served in
/// order), so the write commits and none is refused as `request_budget`. A peer that only
/// stalls can delay writes by at most `request_timeout_ms`, never refuse them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_behind_a_stalled_frame_waits_for_its_reset_and_commits() {
    let cl = cluster(
        "[stream]\nmax_len = 1073741824\nmax_update_bytes = 1048576\n\
         [limits]\nrequest_bytes = 2097156\nrequest_timeout_ms = 1500\n",
    )
    .await;
    let ep = quic_client(&cl.root, &cl.pki.ca, "hog");
    let conn = connect(&ep, &cl.core).await;
    // A proposal's prefix declaring the largest first frame (2 MiB), its first byte, and
    // a little more: its length is taken from the budget, and it never ends.
    let mut part = (2u32 << 20).to_be_bytes().to_vec();
    part.push(2 << 3 | 2);
    part.extend_from_slice(&[0u8; 1000]);
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&part).await.unwrap();
    wait_until(30, "the budget held by the stalled proposal", || async {
        request_bytes_held(&cl.c, &cl.core).await == Some((2 << 20) + 4)
    })
    .await;
    let r =
        cl.c.patch(cl.r1.url("/v1/file?offset=0"))
            .body("behind the stalled frame")
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let m = metrics(&cl.c, &cl.core).await;
    assert!(
        rejected(&m, "request_timeout") >= 1.0,
        "the stalled frame was reset"
    );
    assert_eq!(rejected(&m, "request_budget"), 0.0, "no waiter refused");
    wait_until(30, "the budget given back", || async {
        request_bytes_held(&cl.c, &cl.core).await == Some(0)
    })
    .await;
    in_sync(&cl).await;
    drop(send);
}

/// A relay whose `--file` is on a full disk keeps applying and serving its child from
/// memory, leaves no temporary file, shows `disk_full: true` (and `canopy_disk_full 1`),
/// and recovers by itself once there is room.
///
/// Caught on 8b53228 (node binaries built from main before this work): the full disk was
/// never reported (`timed out waiting for r1 reports a full disk`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_a_full_disk_keeps_serving_and_recovers() {
    let cl = cluster("").await;
    let files = cl.root.join("files");
    let Some(mount) = mount_tmpfs(&files, 8) else {
        return;
    };
    let (v, content) = put_random(&cl.c, &cl.core, 12_000_000, 3).await;
    wait_until(60, "r1 reports a full disk", || async {
        status(&cl.c, &cl.r1)
            .await
            .is_some_and(|s| s["disk_full"] == true && s["version"] == v)
    })
    .await;
    wait_until(60, "r2 applies the version from r1's memory", || async {
        status(&cl.c, &cl.r2)
            .await
            .is_some_and(|s| s["version"] == v)
    })
    .await;
    let m = metrics(&cl.c, &cl.r1).await;
    assert_eq!(
        m.lines()
            .find(|l| l.starts_with("canopy_disk_full"))
            .and_then(|l| l.rsplit(' ').next()),
        Some("1"),
        "{m}"
    );
    // A write that fails removes its temp file; a retry (backing off) may be between its
    // start and its failure at any one look, so the directory is watched until it is clean.
    let leftovers = || -> Vec<String> {
        std::fs::read_dir(&files)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("canopy-tmp"))
            .collect()
    };
    wait_until(60, "no temp file left on the full disk", || async {
        leftovers().is_empty()
    })
    .await;
    assert_eq!(file_of(&cl.c, &cl.r1).await, content, "served from memory");
    mount.resize(64);
    let s = wait_materialized(&cl.c, &cl.r1, v).await;
    assert_eq!(s["disk_full"], false);
    assert_eq!(std::fs::read(&cl.r1.file).unwrap(), content);
    in_sync(&cl).await;
}
