//! `--file` written at the cost of the change, through the real binaries: by reflink on an
//! XFS image, by swapped copies on the test machine's own filesystem, and whole-version
//! crash safety when a relay is killed while it writes, in every method.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use common::*;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

struct Pair {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    c: reqwest::Client,
    core: Proc,
    relay: Proc,
    _mount: Option<Mount>,
}

/// A core and one relay below it; `mount` prepares `ROOT/files` (where both `--file`s go)
/// before either starts, and `config` is given to the relay.
async fn pair(mount: impl FnOnce(&Path) -> Option<Option<Mount>>, config: &str) -> Option<Pair> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mount = mount(&root.join("files"))?;
    let pki = Pki::new(&root);
    pki.issue("c1", "core");
    pki.issue("r1", "relay");
    let cfg = root.join("relay.toml");
    std::fs::write(&cfg, config).unwrap();
    let c = http();
    let core = Proc::start(&root, &pki, "c1", true, &[], &[]);
    wait_leader(&c, &core).await;
    let relay = Proc::start(
        &root,
        &pki,
        "r1",
        false,
        &[core.quic],
        &["--config", cfg.to_str().unwrap()],
    );
    Some(Pair {
        _dir: dir,
        root,
        c,
        core,
        relay,
        _mount: mount,
    })
}

fn io_write_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    let field = |k: &str| -> u64 {
        io.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    field("write_bytes:").saturating_sub(field("cancelled_write_bytes:"))
}

/// 100-byte writes into a 20 MB file, each waited for in the relay's `--file`: once every
/// physical copy has been written once (the first write of each is whole), the bytes
/// written for ten more are pages, not files. Returns the relay's status at the end.
async fn small_writes_cost_pages(p: &Pair, method: &str) -> Value {
    let (v, mut content) = put_random(&p.c, &p.core, 20_000_000, 7).await;
    let s = wait_materialized(&p.c, &p.relay, v).await;
    assert_eq!(s["file_method"], method, "{s}");
    let copies = if method == "swap" { 3 } else { 1 };
    let pid = p.relay.pid().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let writes = 10u64;
    let mut before = (0, 0);
    for i in 0..copies + writes {
        if i == copies {
            let s = status(&p.c, &p.relay).await.unwrap();
            before = (
                s["file_bytes_written"].as_u64().unwrap(),
                io_write_bytes(pid),
            );
        }
        let offset = rng.random_range(0..content.len() - 100);
        let mut body = vec![0u8; 100];
        rng.fill_bytes(&mut body);
        content[offset..offset + 100].copy_from_slice(&body);
        let v = patch(&p.c, &p.core, offset as u64, body).await.unwrap();
        wait_materialized(&p.c, &p.relay, v).await;
    }
    let s = status(&p.c, &p.relay).await.unwrap();
    let spent = s["file_bytes_written"].as_u64().unwrap() - before.0;
    assert!(
        spent <= writes * copies * 2 * 4096,
        "{spent} bytes written for {writes} writes of 100 bytes by {method}"
    );
    let io = io_write_bytes(pid) - before.1;
    assert!(
        io < 20_000_000 / 4,
        "{io} bytes sent to the disk for {writes} writes of 100 bytes by {method} (a 20 MB file)"
    );
    assert_eq!(std::fs::read(&p.relay.file).unwrap(), content);
    s
}

/// On a filesystem with reflinks the relay clones its last version and writes only the
/// changed pages into the clone: the status says `reflink`, the bytes written for ten small
/// writes are a few pages, and `--file` is the core's content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_xfs_a_relay_writes_its_file_by_reflink_at_the_cost_of_the_change() {
    let Some(p) = pair(|d| mount_xfs(d, 600).map(Some), "").await else {
        return;
    };
    let s = small_writes_cost_pages(&p, "reflink").await;
    assert!(
        p.relay
            .log_text()
            .contains("materializing the file by reflink"),
        "{s}"
    );
}

/// Where the filesystem cannot clone (the test machine's own: ext4, tmpfs, overlayfs),
/// `auto` takes turns between copies patched in place, at the cost of the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reflinks_a_relay_patches_swapped_copies() {
    let p = pair(|_| Some(None), "").await.unwrap();
    let method = file_method(&p).await;
    if method == "reflink" {
        eprintln!("skipping: this machine's temporary directory supports reflinks");
        return;
    }
    small_writes_cost_pages(&p, "swap").await;
    let names: BTreeSet<String> = std::fs::read_dir(p.root.join("files"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".r1."))
        .collect();
    assert_eq!(
        names,
        [".r1.canopy-0", ".r1.canopy-1", ".r1.canopy-2"]
            .map(String::from)
            .into(),
        "three copies and nothing else beside r1's file"
    );
}

/// The niceness of each of `pid`'s threads named `name` (field 19 of its `stat`).
fn thread_nice(pid: u32, name: &str) -> Vec<i64> {
    let mut nices = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let Ok(stat) = std::fs::read_to_string(t.join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        if head.split_once(" (").map(|(_, comm)| comm) == Some(name) {
            nices.push(rest.split_whitespace().nth(16).unwrap().parse().unwrap());
        }
    }
    nices
}

/// `--file` is written by a thread of its own at `materialize.nice` (19 by default), so a
/// contended CPU runs the relay's deliveries first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_is_written_by_a_thread_at_the_configured_niceness() {
    for (config, nice) in [("", 19), ("[materialize]\nnice = 7\n", 7)] {
        let p = pair(|_| Some(None), config).await.unwrap();
        let (v, content) = put_random(&p.c, &p.core, 300_000, 5).await;
        wait_materialized(&p.c, &p.relay, v).await;
        assert_eq!(std::fs::read(&p.relay.file).unwrap(), content);
        let pid = p.relay.pid().unwrap();
        assert_eq!(
            thread_nice(pid, "canopy-material"),
            vec![nice],
            "{config:?}"
        );
        let workers = thread_nice(pid, "tokio-rt-worker");
        assert!(
            !workers.is_empty() && workers.iter().all(|n| *n == 0),
            "the relay's runtime stays at the process's niceness: {workers:?}"
        );
    }
}

/// The relay's `file_method` once its API answers.
async fn file_method(p: &Pair) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(m) = status(&p.c, &p.relay)
            .await
            .and_then(|s| s["file_method"].as_str().map(String::from))
        {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no file_method in status"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// A relay killed while versions of 1 MB changes stream into its 8 MB file, 16 times per
/// method (8 SIGKILLs at random moments, and 8 crashes from inside a write at a random
/// byte, `CANOPY_FAILPOINT_MATERIALIZE_CRASH`): after every kill `--file` is one whole
/// version the core committed, and after every restart the relay starts from it, verified,
/// and catches up.
async fn killed_while_writing(p: Pair, seed: u64) {
    let size = 8 << 20;
    let (v0, content) = put_random(&p.c, &p.core, size, seed).await;
    wait_materialized(&p.c, &p.relay, v0).await;
    let possible = Arc::new(parking_lot::Mutex::new(BTreeSet::from([*blake3::hash(
        &content,
    )
    .as_bytes()])));
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (c, api, possible, stop) = (p.c.clone(), p.core.api, possible.clone(), stop.clone());
        let mut content = content.clone();
        tokio::spawn(async move {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut last = 0;
            while !stop.is_cancelled() {
                let offset = rng.random_range(0..size - (1 << 20));
                let mut body = vec![0u8; 1 << 20];
                rng.fill_bytes(&mut body);
                content[offset..offset + body.len()].copy_from_slice(&body);
                possible.lock().insert(*blake3::hash(&content).as_bytes());
                last = patch_api(&c, api, offset as u64, body)
                    .await
                    .expect("the core takes every write");
            }
            (last, content)
        })
    };
    let mut relay = p.relay;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let check = |round: u32, relay: &Proc| {
        let on_disk = std::fs::read(&relay.file).unwrap();
        assert!(
            possible.lock().contains(blake3::hash(&on_disk).as_bytes()),
            "round {round}: --file ({} bytes) is no version the core committed",
            on_disk.len()
        );
    };
    for round in 0..8 {
        let seen = status(&p.c, &relay)
            .await
            .and_then(|s| s["file_writes"].as_u64())
            .unwrap_or(0);
        wait_until(
            60,
            &format!("round {round}: the relay writes its file"),
            || {
                let r = status(&p.c, &relay);
                async move {
                    r.await
                        .and_then(|s| s["file_writes"].as_u64())
                        .is_some_and(|w| w > seen)
                }
            },
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(rng.random_range(0..40))).await;
        relay.kill();
        check(round, &relay);
        let crash_at = rng.random_range(1..size as u64).to_string();
        relay.set_env(&[("CANOPY_FAILPOINT_MATERIALIZE_CRASH", &crash_at)]);
        relay.respawn();
        wait_until(
            60,
            &format!("round {round}: the relay crashes after writing {crash_at} bytes"),
            || {
                let gone = relay.exited().is_some();
                async move { gone }
            },
        )
        .await;
        assert!(
            relay
                .log_text()
                .contains("failpoint: crashing in the middle of writing --file"),
            "round {round}: the relay exited without the failpoint"
        );
        check(round, &relay);
        relay.set_env(&[]);
        relay.restart();
    }
    stop.cancel();
    let (last, content) = writer.await.unwrap();
    let s = wait_materialized(&p.c, &relay, last).await;
    let core = version_root(&p.c, &p.core).await.unwrap();
    assert_eq!((last, s["file_root"].as_str().unwrap()), (core.0, &*core.1));
    assert_eq!(std::fs::read(&relay.file).unwrap(), content);
    assert!(
        relay.log_text().contains("trusted=true"),
        "a restart took its local copy as verified"
    );
}

/// The materializer writes again as soon as it has written, so a kill at a random moment
/// lands in a write most of the time.
const BUSY: &str = "[stream]\nmaterialize_interval_ms = 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_while_it_swaps_copies_leaves_a_whole_version() {
    let p = pair(
        |_| Some(None),
        &format!("{BUSY}[materialize]\nmax_bytes_per_sec = 0\nmode = \"swap\"\ngrace_ms = 1\n"),
    )
    .await
    .unwrap();
    killed_while_writing(p, 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_while_it_rewrites_leaves_a_whole_version() {
    let p = pair(
        |_| Some(None),
        &format!("{BUSY}[materialize]\nmax_bytes_per_sec = 0\nmode = \"rewrite\"\n"),
    )
    .await
    .unwrap();
    killed_while_writing(p, 12).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_while_it_writes_by_reflink_leaves_a_whole_version() {
    let Some(p) = pair(
        |d| mount_xfs(d, 600).map(Some),
        &format!("{BUSY}[materialize]\nmax_bytes_per_sec = 0\nmode = \"reflink\"\n"),
    )
    .await
    else {
        return;
    };
    killed_while_writing(p, 13).await;
}
