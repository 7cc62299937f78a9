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

async fn wait_materialized(c: &reqwest::Client, p: &Proc, version: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = status(c, p).await {
            if s["version"].as_u64() == Some(version) && s["file_version"].as_u64() == Some(version)
            {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} did not materialize {version}",
            p.name
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

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
    wait_until(30, "core to lead", || async {
        status(&c, &core).await.map(|s| s["role"] == "leader") == Some(true)
    })
    .await;
    let mut content = vec![0u8; SIZE];
    ChaCha8Rng::seed_from_u64(5).fill_bytes(&mut content);
    let r = c
        .put(core.url("/v1/file"))
        .body(content)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let v0 = r.json::<Value>().await.unwrap()["version"]
        .as_u64()
        .unwrap();

    // (a) a new relay gets a verified, byte-identical copy.
    let mut r1 = Proc::start(root, &pki, "r1", false, &[core.quic], &cfg_arg);
    let s = wait_materialized(&c, &r1, v0).await;
    let core_file = c
        .get(core.url("/v1/file"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(s["root"], status(&c, &core).await.unwrap()["root"]);
    assert!(std::fs::read(&r1.file).unwrap() == core_file);

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
    let core_file = c
        .get(core.url("/v1/file"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
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
