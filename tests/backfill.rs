//! Restart from the local copy: a relay that was away fetches only the chunks that changed,
//! and a relay whose file was damaged on disk repairs exactly the damaged chunks.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use common::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

const SIZE: usize = 50_000_000;
const CHUNK: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_relays_fetch_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("core", "core");
    pki.issue("r1", "relay");
    // A tiny retained window, so a relay that was away cannot resume and must diff.
    let cfg = root.join("small-window.toml");
    std::fs::write(&cfg, "[stream]\nretain_bytes = 1024\n").unwrap();
    let cfg_arg = ["--config", cfg.to_str().unwrap()];
    let core = Proc::start(root, &pki, "core", true, &[], &cfg_arg);
    let c = http();
    wait_leader(&c, &core).await;
    let (v0, _) = put_random(&c, &core, SIZE, 5).await;

    // (a) a new relay gets a verified, byte-identical copy.
    let mut r1 = Proc::start(root, &pki, "r1", false, &[core.quic], &cfg_arg);
    let s = wait_materialized(&c, &r1, v0).await;
    let core_file = file_of(&c, &core).await;
    assert_eq!(s["root"], status(&c, &core).await.unwrap()["root"]);
    assert!(std::fs::read(&r1.file).unwrap() == core_file);
    // The heap was faulted in for the whole transfer, beside its chunks (where this kernel
    // can populate: Linux 5.14 and later).
    if canopy::prefault::can_populate() {
        let expected = SIZE.min(canopy::prefault::Prefaulted::MAX_BYTES) as f64;
        wait_until(30, "the transfer's heap to be faulted in", || async {
            let text = metrics(&c, &r1).await;
            let warmed = metric_value(&text, "canopy_backfill_prefaulted_bytes_total");
            warmed.unwrap_or(0.0) >= expected * 0.9
        })
        .await;
    }

    // (b) stopped while 20 small writes commit: on restart it fetches under 5 % of the file.
    r1.kill();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut last = v0;
    for _ in 0..20 {
        let off = rng.next_u64() % (SIZE as u64 - 100);
        let r = c
            .patch(core.url(&format!("/v1/file?offset={off}")))
            .body(vec![0xAB; 100])
            .send()
            .await
            .unwrap();
        last = r.json::<Value>().await.unwrap()["version"]
            .as_u64()
            .unwrap();
    }
    r1.restart();
    let s = wait_materialized(&c, &r1, last).await;
    let got = s["stats"]["backfill_received_bytes"].as_u64().unwrap();
    assert!(got > 0 && got < SIZE as u64 / 20, "received {got} bytes");
    let core_file = file_of(&c, &core).await;
    assert_eq!(s["root"], status(&c, &core).await.unwrap()["root"]);
    assert!(std::fs::read(&r1.file).unwrap() == core_file);

    // (c) three chunks overwritten on disk while stopped: exactly those are fetched again.
    r1.kill();
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&r1.file)
            .unwrap();
        for chunk in [3u64, 300, 700] {
            f.seek(SeekFrom::Start(chunk * CHUNK + 17)).unwrap();
            f.write_all(b"corrupted behind canopy's back").unwrap();
        }
        f.sync_all().unwrap();
    }
    r1.restart();
    let s = wait_materialized(&c, &r1, last).await;
    assert_eq!(
        s["stats"]["backfill_received_bytes"].as_u64().unwrap(),
        3 * CHUNK,
        "{}",
        s["stats"]
    );
    assert!(std::fs::read(&r1.file).unwrap() == core_file);
}

/// (d) A source that serves a corrupted chunk is detected: the chunk is refused against the
/// manifest, the source is counted and banned as parent, and the relay finishes from another
/// source without fetching again what it had verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_source_is_detected_and_the_chunk_fetched_elsewhere() {
    const SIZE: usize = 8_000_000;
    const BAD: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    for (n, role) in [("core", "core"), ("good", "relay"), ("new", "relay")] {
        pki.issue(n, role);
    }
    // The core corrupts chunk 40 of what it serves to `new`, and only to `new`.
    let bad = BAD.to_string();
    let env = [
        ("CANOPY_FAILPOINT_CORRUPT_CHUNK", bad.as_str()),
        ("CANOPY_FAILPOINT_CORRUPT_FOR", "new"),
    ];
    let core = Proc::start_env(root, &pki, "core", true, &[], &["--fanout", "2"], &env);
    let c = http();
    wait_leader(&c, &core).await;
    let (v, content) = put_random(&c, &core, SIZE, 11).await;
    let good = Proc::start(root, &pki, "good", false, &[core.quic], &[]);
    wait_materialized(&c, &good, v).await;

    // `new` prefers the core (depth 0, a free slot), gets the bad chunk, bans the core and
    // finishes from `good`.
    let new = Proc::start(root, &pki, "new", false, &[core.quic], &[]);
    let s = wait_materialized(&c, &new, v).await;
    assert_eq!(s["stats"]["bad_chunks"].as_u64(), Some(1), "{}", s["stats"]);
    assert_eq!(s["parent"], "good");
    assert_eq!(s["root"], status(&c, &core).await.unwrap()["root"]);
    assert!(std::fs::read(&new.file).unwrap() == content);
    // Chunks 0..40 came from the core and were kept; the rest, chunk 40 included, from
    // `good`: the file plus the one refused chunk.
    let got = s["stats"]["backfill_received_bytes"].as_u64().unwrap();
    assert_eq!(got, SIZE as u64 + CHUNK, "{}", s["stats"]);
    let metrics = c
        .get(new.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The sender is counted by kind (the parent), its address only logged: bounded labels.
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("canopy_backfill_bad_chunks_total") && l.contains("source=\"parent\"")
        })
        .unwrap_or_else(|| panic!("no bad-chunk counter in\n{metrics}"));
    assert!(line.ends_with(" 1"), "{line}");
    assert!(
        !metrics.contains(&core.quic.to_string()),
        "an address as a label:\n{metrics}"
    );
    assert!(new.log_text().contains(&core.quic.to_string()));
}

/// (e) `kill -9` in the middle of a 50 MB backfill: on restart the relay finishes, verifies
/// and holds a byte-identical copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_during_a_backfill_finishes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("core", "core");
    pki.issue("r1", "relay");
    let core = Proc::start(root, &pki, "core", true, &[], &[]);
    let c = http();
    wait_leader(&c, &core).await;
    let (v, content) = put_random(&c, &core, SIZE, 13).await;
    let mut r1 = Proc::start(root, &pki, "r1", false, &[core.quic], &[]);
    // Kill it once its status shows the transfer under way, before it is installed.
    let source = core.quic.to_string();
    wait_until(60, "the backfill to show in the status", || async {
        status(&c, &r1).await.is_some_and(|s| {
            let b = &s["backfill"];
            b["bytes_total"].as_u64() == Some(SIZE as u64)
                && b["bytes_done"]
                    .as_u64()
                    .is_some_and(|d| d > 0 && d < SIZE as u64)
                && b["sources"][0].as_str() == Some(source.as_str())
                && s["version"].as_u64() != Some(v)
        })
    })
    .await;
    r1.kill();
    r1.restart();
    let s = wait_materialized(&c, &r1, v).await;
    assert_eq!(s["root"], status(&c, &core).await.unwrap()["root"]);
    assert!(std::fs::read(&r1.file).unwrap() == content);
}

/// The serving side is bounded: with `max_backfills = 1` and 4 MB/s, two relays joining at
/// once are served one after the other, never both at once, and no faster than the rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfills_served_are_bounded_in_number_and_rate() {
    const SIZE: usize = 4_000_000;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    for (n, role) in [("core", "core"), ("r1", "relay"), ("r2", "relay")] {
        pki.issue(n, role);
    }
    let cfg = root.join("bounded.toml");
    std::fs::write(
        &cfg,
        "[stream]\nmax_backfills = 1\nbackfill_bytes_per_sec = 4000000\n",
    )
    .unwrap();
    let core = Proc::start(
        root,
        &pki,
        "core",
        true,
        &[],
        &["--config", cfg.to_str().unwrap()],
    );
    let c = http();
    wait_leader(&c, &core).await;
    let (v, content) = put_random(&c, &core, SIZE, 17).await;
    let started = Instant::now();
    let r1 = Proc::start(root, &pki, "r1", false, &[core.quic], &[]);
    let r2 = Proc::start(root, &pki, "r2", false, &[core.quic], &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = 0;
        for r in [&r1, &r2] {
            if let Some(s) = status(&c, r).await {
                if s["version"].as_u64() == Some(v) && s["file_version"].as_u64() == Some(v) {
                    done += 1;
                }
            }
        }
        if done == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the relays did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let s = status(&c, &core).await.unwrap();
    assert_eq!(
        s["backfills_serving_most"], 1,
        "the most transfers the core served at once (its own high-water mark)"
    );
    assert_eq!(
        s["stats"]["relayed_bytes"]
            .as_u64()
            .map(|b| b >= 2 * SIZE as u64),
        Some(true)
    );
    // 8 MB in all at 4 MB/s: at least 2 s minus the first chunk of each.
    assert!(took >= Duration::from_millis(1800), "{took:?}");
    for r in [&r1, &r2] {
        let s = status(&c, r).await.unwrap();
        assert_eq!(s["parent"], "core");
        assert!(std::fs::read(&r.file).unwrap() == content);
    }
}

/// Many sources: a relay joining below a slow parent fetches the top of the file from the
/// other relays in its view at the same time, and a peer that serves corrupted chunks is
/// dropped (counted, banned as a parent) while the transfer finishes from the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_draws_on_several_peers_and_drops_a_bad_one() {
    const SIZE: usize = 20_000_000;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    for (n, role) in [
        ("core", "core"),
        ("h1", "relay"),
        ("h2", "relay"),
        ("h3", "relay"),
        ("new", "relay"),
    ] {
        pki.issue(n, role);
    }
    // The relays serve transfers at 3 MB/s each (the core, unlimited, is full after three
    // children), so `new`'s parent alone would take about 7 s.
    let cfg = root.join("slow-relays.toml");
    std::fs::write(&cfg, "[stream]\nbackfill_bytes_per_sec = 3000000\n").unwrap();
    let cfg_arg = ["--config", cfg.to_str().unwrap()];
    let core = Proc::start(root, &pki, "core", true, &[], &["--fanout", "3"]);
    let c = http();
    wait_leader(&c, &core).await;
    let (v, content) = put_random(&c, &core, SIZE, 19).await;
    let bad_env = [
        ("CANOPY_FAILPOINT_CORRUPT_CHUNK", "all"),
        ("CANOPY_FAILPOINT_CORRUPT_FOR", "new"),
    ];
    let mut helpers = Vec::new();
    for name in ["h1", "h2", "h3"] {
        let env: &[(&str, &str)] = if name == "h2" { &bad_env } else { &[] };
        let h = Proc::start_env(root, &pki, name, false, &[core.quic], &cfg_arg, env);
        wait_materialized(&c, &h, v).await;
        helpers.push(h);
    }
    // A 4 MiB stream window: the push has at most 80 chunks in flight, so peers may take
    // everything above the first 80 (with the default 16 MiB, 272 of the 306 are the push's).
    let new_cfg = root.join("new.toml");
    std::fs::write(&new_cfg, "[stream]\nstream_window_bytes = 4194304\n").unwrap();
    let new = Proc::start(
        root,
        &pki,
        "new",
        false,
        &[core.quic],
        &["--config", new_cfg.to_str().unwrap()],
    );
    let s = wait_materialized(&c, &new, v).await;
    assert_eq!(s["root"], status(&c, &core).await.unwrap()["root"]);
    assert!(std::fs::read(&new.file).unwrap() == content);
    let stats = &s["stats"];
    let got = stats["backfill_received_bytes"].as_u64().unwrap();
    let from_peers = stats["backfill_from_peers_bytes"].as_u64().unwrap();
    assert!(from_peers > 0, "nothing fetched from peers: {stats}");
    assert!(
        got < SIZE as u64 + SIZE as u64 / 10,
        "received {got} bytes: {stats}"
    );
    // h2 is either a fetch source or the parent: either way its chunks are refused.
    assert!(stats["bad_chunks"].as_u64().unwrap() >= 1, "{stats}");
    let h2 = helpers[1].quic.to_string();
    let text = metrics(&c, &new).await;
    let refused: f64 = text
        .lines()
        .filter(|l| l.starts_with("canopy_backfill_bad_chunks_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(refused >= 1.0, "no bad chunk counted in\n{text}");
    assert!(
        new.log_text()
            .lines()
            .any(|l| l.contains("refused a chunk") && l.contains(&h2)),
        "the log names no refused chunk from h2 ({h2})"
    );
    assert_ne!(s["parent"], "h2");
    let peer_series = text
        .lines()
        .find(|l| l.starts_with("canopy_backfill_received_bytes_total") && l.contains("peer"))
        .unwrap_or_else(|| panic!("no peer-source series in\n{text}"));
    assert_eq!(
        metric_value(peer_series, "canopy_backfill_received_bytes_total"),
        Some(from_peers as f64)
    );
    assert!(new
        .log_text()
        .contains("fetching from peers besides the parent"));
}
