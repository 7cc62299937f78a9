//! Cut-through bootstrap through the real binaries: a relay that is itself receiving a
//! transfer passes each verified chunk on to its own child at once, so a tree level costs a
//! chunk's time, not a file's.

mod common;

use common::*;
use serde_json::Value;

/// The core serves its only child (fan-out 1) a 12 MB file at 1.5 MB/s (8 s, room for a
/// slow machine to start the second relay in time); a second relay joins
/// below the first while that transfer runs. It must receive chunks while its parent is
/// still receiving (before, it waited for its parent's whole copy), and both end at the
/// core's version and root, with the core's bytes on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_receiving_a_transfer_passes_it_on_chunk_by_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::with(root, &[("c1", "core"), ("r1", "relay"), ("r2", "relay")]);
    let slow = root.join("slow.toml");
    std::fs::write(&slow, "[stream]\nbackfill_bytes_per_sec = 1500000\n").unwrap();
    let one_source = root.join("one-source.toml");
    std::fs::write(&one_source, "[stream]\nfetch_sources = 1\n").unwrap();
    let c = http();
    let core = Proc::start(
        root,
        &pki,
        "c1",
        true,
        &[],
        &["--fanout", "1", "--config", slow.to_str().unwrap()],
    );
    wait_leader(&c, &core).await;
    let (v, content) = put_random(&c, &core, 12_000_000, 21).await;
    let cfg = ["--config", one_source.to_str().unwrap()];
    let r1 = Proc::start(root, &pki, "r1", false, &[core.quic], &cfg);
    wait_until(60, "r1 receives its transfer", || async {
        status(&c, &r1).await.is_some_and(|s| {
            s["backfill"]["bytes_done"].as_u64().unwrap_or(0) > 0 && s["synced"] == false
        })
    })
    .await;
    let r2 = Proc::start(root, &pki, "r2", false, &[r1.quic], &cfg);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let seen: (Value, Value) = loop {
        if let (Some(a), Some(b)) = (status(&c, &r1).await, status(&c, &r2).await) {
            let following = b["parent"] == "r1"
                && b["backfill"]["bytes_done"].as_u64().unwrap_or(0) > 0
                && b["synced"] == false;
            if following && a["synced"] == false {
                break (a, b);
            }
            assert!(
                a["synced"] == false || b["synced"] == false,
                "r1 finished before r2 received anything from it: r1 {a}, r2 {b}"
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "r2 never received chunks from r1 while r1 was receiving"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let (a, b) = seen;
    assert!(
        a["backfill"]["bytes_done"].as_u64() < a["backfill"]["bytes_total"].as_u64(),
        "r1 was mid-transfer: {a}"
    );
    assert_eq!(b["backfill"]["bytes_total"], 12_000_000, "{b}");
    let core_root = version_root(&c, &core).await.unwrap();
    for p in [&r1, &r2] {
        let s = wait_materialized(&c, p, v).await;
        assert_eq!(s["root"], core_root.1, "{}", p.name);
        assert_eq!(std::fs::read(&p.file).unwrap(), content, "{}", p.name);
    }
    let s = status(&c, &r2).await.unwrap();
    assert_eq!(
        s["stats"]["snapshots_installed"], 1,
        "one transfer, not a retry: {s}"
    );
}
