//! `canopy watch --exec` against real core and relay processes: bursts, failures, a relay
//! restart and SIGTERM; and a relay's streamed `/v1/watch`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A running `canopy watch --exec`, killed on drop.
struct Watcher {
    child: Option<Child>,
    log: PathBuf,
}

impl Watcher {
    fn start(root: &Path, api: std::net::SocketAddr, args: &[&str]) -> Watcher {
        let log = root.join("watch.log");
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(CANOPY)
            .arg("--api")
            .arg(api.to_string())
            .arg("watch")
            .args(args)
            .current_dir(root)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn canopy watch");
        Watcher {
            child: Some(child),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for the process to exit and returns its exit code.
    async fn exit_code(&mut self, secs: u64) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status.code().expect("exited, not signalled");
            }
            assert!(
                Instant::now() < deadline,
                "canopy watch did not exit: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- canopy watch ----\n{}", self.log_text());
        }
    }
}

/// The lines of the runs log the test command writes.
fn runs(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("runs.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Versions of the runs that ended (`end V ...` lines).
fn ended(root: &Path) -> Vec<u64> {
    runs(root)
        .iter()
        .filter_map(|l| l.strip_prefix("end ")?.split(' ').next()?.parse().ok())
        .collect()
}

async fn patch(c: &reqwest::Client, p: &Proc, offset: u64, data: &[u8]) -> u64 {
    let v: serde_json::Value = c
        .patch(p.url(&format!("/v1/file?offset={offset}")))
        .body(data.to_vec())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["version"].as_u64().expect("a version")
}

/// A command that records each run, detects overlap with a lock directory, keeps a copy of
/// CANOPY_FILE per version and takes a moment, so that overlapping runs would be seen.
const RECORDING: &str = r#"
mkdir lock 2>/dev/null || echo OVERLAP >> runs.log
echo "start $CANOPY_VERSION $CANOPY_ROOT" >> runs.log
cp "$CANOPY_FILE" "copy.$CANOPY_VERSION"
sleep 0.3
echo "end $CANOPY_VERSION $CANOPY_ROOT" >> runs.log
rmdir lock
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_runs_the_command_on_the_final_version_without_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (_pki, core, r1, c) = core_and_relay(root).await;
    let mut model = vec![7u8; 300_000];
    let v0 = patch(&c, &core, 0, &model).await;
    wait_materialized(&c, &r1, v0).await;

    let file = r1.file.to_str().unwrap().to_string();
    let mut w = Watcher::start(
        root,
        r1.api,
        &["--exec", RECORDING, "--file", &file, "--min-interval", "1s"],
    );
    wait_until(60, "the first run, on the current version", || async {
        ended(root) == vec![v0]
    })
    .await;

    let mut last = v0;
    for i in 0..20u64 {
        let piece = format!("write {i:03}");
        let offset = i * 10_000;
        last = patch(&c, &core, offset, piece.as_bytes()).await;
        model[offset as usize..offset as usize + piece.len()].copy_from_slice(piece.as_bytes());
    }
    wait_until(60, "a run on the final version", || async {
        ended(root).last() == Some(&last)
    })
    .await;
    let (_, root_hex) = version_root(&c, &r1).await.unwrap();
    let log = runs(root);
    assert!(
        !log.iter().any(|l| l == "OVERLAP"),
        "two runs overlapped: {log:?}"
    );
    assert!(
        log.contains(&format!("end {last} {root_hex}")),
        "CANOPY_ROOT of the final run is the relay's root: {log:?}"
    );
    let burst_runs = ended(root).len() - 1;
    assert!(
        (1..20).contains(&burst_runs),
        "20 writes in a burst were coalesced: {burst_runs} runs"
    );
    assert!(
        std::fs::read(root.join(format!("copy.{last}"))).unwrap() == model,
        "CANOPY_FILE held the final version when the command ran"
    );
    assert!(w.child.as_mut().unwrap().try_wait().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_commands_are_retried_and_once_passes_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("core", "core");
    let core = Proc::start(root, &pki, "core", true, &[], &[]);
    let c = http();
    wait_leader(&c, &core).await;
    let v = patch(&c, &core, 0, b"hello").await;

    // Fails twice, then succeeds: three attempts, exit 0.
    let flaky = r#"n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count; echo "attempt $n $CANOPY_VERSION" >> runs.log; [ $n -ge 3 ]"#;
    let mut w = Watcher::start(
        root,
        core.api,
        &[
            "--exec",
            flaky,
            "--once",
            "--min-interval",
            "100ms",
            "--retry-delay",
            "100ms",
            "--retries",
            "3",
        ],
    );
    assert_eq!(w.exit_code(60).await, 0, "{}", w.log_text());
    assert_eq!(
        runs(root),
        vec![
            format!("attempt 1 {v}"),
            format!("attempt 2 {v}"),
            format!("attempt 3 {v}")
        ]
    );
    assert!(w.log_text().contains("exited 1 (attempt 1); retrying"));

    // Always fails: the first attempt and one retry, then canopy exits with its status.
    let mut w = Watcher::start(
        root,
        core.api,
        &[
            "--exec",
            "echo failed >> fails.log; exit 7",
            "--once",
            "--min-interval",
            "0s",
            "--retry-delay",
            "100ms",
            "--retries",
            "1",
        ],
    );
    assert_eq!(w.exit_code(60).await, 7, "{}", w.log_text());
    assert_eq!(
        std::fs::read_to_string(root.join("fails.log")).unwrap(),
        "failed\nfailed\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_survives_the_relay_restarting() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (_pki, core, mut r1, c) = core_and_relay(root).await;
    let v1 = patch(&c, &core, 0, b"first").await;
    wait_materialized(&c, &r1, v1).await;

    let file = r1.file.to_str().unwrap().to_string();
    let _w = Watcher::start(
        root,
        r1.api,
        &[
            "--exec",
            RECORDING,
            "--file",
            &file,
            "--min-interval",
            "100ms",
        ],
    );
    wait_until(60, "the first run", || async { ended(root) == vec![v1] }).await;

    r1.kill();
    let v2 = patch(&c, &core, 0, b"second").await;
    r1.restart();
    wait_until(
        60,
        "a run on the version written while the relay was down",
        || async { ended(root).last() == Some(&v2) },
    )
    .await;
    assert_eq!(
        std::fs::read(root.join(format!("copy.{v2}"))).unwrap(),
        b"second"
    );
    let log = std::fs::read_to_string(root.join("watch.log")).unwrap();
    assert!(
        log.contains("again after"),
        "the reconnection is logged: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_the_running_command_and_passes_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("core", "core");
    let core = Proc::start(root, &pki, "core", true, &[], &[]);
    let c = http();
    wait_leader(&c, &core).await;
    patch(&c, &core, 0, b"x").await;

    let mut w = Watcher::start(
        root,
        core.api,
        &[
            "--exec",
            "touch started; sleep 1; touch finished; exit 5",
            "--min-interval",
            "0s",
        ],
    );
    wait_until(60, "the command to start", || async {
        root.join("started").exists()
    })
    .await;
    let ok = Command::new("kill")
        .args(["-TERM", &w.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert_eq!(w.exit_code(60).await, 5, "{}", w.log_text());
    assert!(
        root.join("finished").exists(),
        "the command ran to its end before canopy exited"
    );

    // Idle: SIGTERM exits 0 at once.
    let mut w = Watcher::start(root, core.api, &["--exec", "true", "--after", "1000000"]);
    wait_until(60, "the watcher to start", || async {
        w.log_text().contains("following")
    })
    .await;
    let ok = Command::new("kill")
        .args(["-TERM", &w.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert_eq!(w.exit_code(60).await, 0, "{}", w.log_text());
}

/// A relay's streamed watch reports every write's version, in order, then its `--file`
/// catching up, with the relay's root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relays_streamed_watch_reports_versions_and_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (_pki, core, r1, c) = core_and_relay(root).await;
    let v0 = patch(&c, &core, 0, &[5u8; 200_000]).await;
    wait_materialized(&c, &r1, v0).await;

    let mut stream = c
        .get(r1.url(&format!("/v1/watch?after={v0}&stream=true&timeout=30")))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut last = v0;
    for i in 0..10u64 {
        last = patch(&c, &core, i * 1000, format!("w{i}").as_bytes()).await;
    }
    let mut buf = Vec::new();
    let mut lines: Vec<serde_json::Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let l: serde_json::Value = serde_json::from_slice(&line).unwrap();
            let done = l["version"] == last && l["file_version"] == last;
            lines.push(l);
            if done {
                break;
            }
            continue;
        }
        assert!(
            Instant::now() < deadline,
            "no line with the file at {last}: {lines:?}"
        );
        let chunk = tokio::time::timeout(Duration::from_secs(60), stream.chunk())
            .await
            .expect("a line within 60 s")
            .unwrap()
            .expect("the stream goes on");
        buf.extend_from_slice(&chunk);
    }
    let key = |l: &serde_json::Value| {
        (
            l["version"].as_u64().unwrap(),
            l["file_version"].as_u64().unwrap_or(0),
        )
    };
    for pair in lines.windows(2) {
        let (a, b) = (key(&pair[0]), key(&pair[1]));
        assert!(
            a != b && b.0 >= a.0 && b.1 >= a.1,
            "lines go forward: {lines:?}"
        );
    }
    assert!(
        key(&lines[0]).0 > v0,
        "the first line is above after=: {lines:?}"
    );
    let (_, root_hex) = version_root(&c, &r1).await.unwrap();
    assert_eq!(lines.last().unwrap()["root"], root_hex.as_str());
}

/// A node from before streamed watches: `/v1/watch` is a long poll that answers one whole
/// status once the node's version is above `after` (or at `timeout`) and closes. This one
/// goes from version 1 to 5, a version every 200 ms from its first request (so a watcher
/// slow to start sees every version), and counts the requests.
async fn old_node(
    listener: tokio::net::TcpListener,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
    let version = move |start: &std::sync::OnceLock<Instant>| {
        (1 + start.get_or_init(Instant::now).elapsed().as_millis() as u64 / 200).min(5)
    };
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            return;
        };
        requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let start = start.clone();
        tokio::spawn(async move {
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&req)
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            let param = |k: &str| -> Option<f64> {
                line.split([' ', '?', '&'])
                    .find_map(|p| p.strip_prefix(&format!("{k}=")))
                    .and_then(|v| v.parse().ok())
            };
            let after = param("after").unwrap_or(0.0) as u64;
            let until = Instant::now() + Duration::from_secs_f64(param("timeout").unwrap_or(30.0));
            while version(&start) <= after && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let v = version(&start);
            let body = format!(
                r#"{{"name":"old","role":"relay","version":{v},"root":"{:064x}","synced":true}}"#,
                v
            );
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_follows_a_node_that_predates_streamed_watches() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let server = tokio::spawn(old_node(listener, requests.clone()));
    let _w = Watcher::start(
        root,
        api,
        &[
            "--exec",
            r#"echo "end $CANOPY_VERSION $CANOPY_ROOT" >> runs.log"#,
            "--min-interval",
            "100ms",
        ],
    );
    wait_until(60, "a run on version 5", || async {
        ended(root).last() == Some(&5)
    })
    .await;
    let seen = ended(root);
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "runs in version order: {seen:?}"
    );
    assert!(
        runs(root).contains(&format!("end 5 {:064x}", 5)),
        "CANOPY_ROOT from the old status: {:?}",
        runs(root)
    );
    // At most about one request per version, not a tight loop of immediate answers (a
    // watcher that misses versions under load makes fewer).
    let n = requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=12).contains(&n), "{n} requests for 5 versions");
    server.abort();
}
