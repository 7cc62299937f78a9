//! End to end: one core and five relays as separate processes keep a file byte-identical.

mod common;

use common::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The model: the same ops applied to a plain vector.
fn write_at(model: &mut Vec<u8>, offset: usize, data: &[u8]) {
    if model.len() < offset + data.len() {
        model.resize(offset + data.len(), 0);
    }
    model[offset..offset + data.len()].copy_from_slice(data);
}

async fn write(c: &reqwest::Client, req: reqwest::RequestBuilder) -> u64 {
    let _ = c;
    let resp = req.send().await.expect("write request");
    let code = resp.status();
    let body: serde_json::Value = resp.json().await.expect("json reply");
    assert!(code.is_success(), "write failed: {code} {body}");
    body["version"].as_u64().expect("version in reply")
}

/// Tree invariants from every node's status: a single parent that lists it as a child,
/// depth = parent's depth + 1, root path = parent's path + itself, fan-out within `k`.
async fn tree_ok(c: &reqwest::Client, core: &Proc, relays: &[Proc], k: usize) -> bool {
    let mut by_name = std::collections::BTreeMap::new();
    let Some(s) = status(c, core).await else {
        return false;
    };
    by_name.insert("core".to_string(), s);
    for p in relays {
        match status(c, p).await {
            Some(s) if s["synced"] == true => {
                by_name.insert(p.name.clone(), s);
            }
            _ => return false,
        }
    }
    for (name, s) in &by_name {
        if s["children"].as_array().unwrap().len() > k {
            return false;
        }
        if name == "core" {
            continue;
        }
        let Some(parent) = by_name.get(s["parent"].as_str().unwrap_or("")) else {
            return false;
        };
        let kids: Vec<&str> = parent["children"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        let mut path: Vec<serde_json::Value> = parent["root_path"].as_array().unwrap().clone();
        path.push(serde_json::json!(name));
        if !kids.contains(&name.as_str())
            || s["depth"].as_u64() != parent["depth"].as_u64().map(|d| d + 1)
            || s["root_path"].as_array() != Some(&path)
        {
            return false;
        }
    }
    true
}

async fn tree_depths(c: &reqwest::Client, relays: &[Proc]) -> Vec<u64> {
    let mut d = Vec::new();
    for p in relays {
        d.push(status(c, p).await.unwrap()["depth"].as_u64().unwrap());
    }
    d
}

async fn converged(c: &reqwest::Client, nodes: &[&Proc], model: &[u8]) {
    let expected_root = {
        let core = nodes[0];
        let (_, root) = version_root(c, core).await.unwrap();
        root
    };
    let expected_version = version_root(c, nodes[0]).await.unwrap().0;
    for p in nodes {
        wait_until(
            60,
            &format!("{} to reach version {expected_version}", p.name),
            || async {
                version_root(c, p).await == Some((expected_version, expected_root.clone()))
            },
        )
        .await;
        wait_until(60, &format!("{}'s --file to match", p.name), || async {
            let s = status(c, p).await.unwrap();
            s["file_version"].as_u64() == Some(expected_version)
                && std::fs::read(&p.file).map(|b| b == model).unwrap_or(false)
        })
        .await;
        let resp = c.get(p.url("/v1/file")).send().await.unwrap();
        assert_eq!(
            resp.headers()["x-canopy-version"].to_str().unwrap(),
            expected_version.to_string()
        );
        assert_eq!(
            resp.headers()["x-canopy-root"].to_str().unwrap(),
            expected_root
        );
        let body = resp.bytes().await.unwrap();
        assert!(
            body == model,
            "{}: served bytes differ from the model",
            p.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_and_five_relays_stay_identical() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("core", "core");
    for i in 1..=5 {
        pki.issue(&format!("r{i}"), "relay");
    }
    let core = Proc::start(root, &pki, "core", true, &[], &["--fanout", "2"]);
    let c = http();
    wait_leader(&c, &core).await;
    let mut model = Vec::new();

    // Fan-out 2 everywhere: the core takes two relays, the others are placed below them by
    // the overlay (power of two choices, referrals), all bootstrapped from the core alone.
    let fan = ["--fanout", "2"];
    let core_join = [core.quic];
    let mut relays: Vec<Proc> = (1..=5)
        .map(|i| Proc::start(root, &pki, &format!("r{i}"), false, &core_join, &fan))
        .collect();
    wait_until(60, "the tree to form", || async {
        tree_ok(&c, &core, &relays, 2).await
    })
    .await;
    let depths = tree_depths(&c, &relays).await;
    assert!(
        depths.iter().any(|d| *d >= 2),
        "some relay hangs below another: {depths:?}"
    );
    let (r1, r2, r3, r4, r5) = (&relays[0], &relays[1], &relays[2], &relays[3], &relays[4]);

    // A PATCH at a leaf, through two relays to the core.
    let v1 = write(
        &c,
        c.patch(r4.url("/v1/file?offset=10&wait=applied"))
            .body(&b"hello"[..]),
    )
    .await;
    write_at(&mut model, 10, b"hello");
    assert_eq!(
        version_root(&c, r4).await.unwrap().0,
        v1,
        "read-your-writes"
    );

    // A whole new 8 MB file, PUT at r3.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut big = vec![0u8; 8 << 20];
    rng.fill_bytes(&mut big);
    write(&c, c.put(r3.url("/v1/file?wait=applied")).body(big.clone())).await;

    // A second PUT changing a few chunks only.
    let mut big2 = big.clone();
    big2[100_000..100_010].copy_from_slice(b"0123456789");
    big2[5_000_000] ^= 0xff;
    write(&c, c.put(r5.url("/v1/file")).body(big2.clone())).await;
    model = big2;

    // Truncate at r1, then a PATCH past the end at r2 (zero-filled gap).
    let newlen = model.len() - 12_345;
    write(
        &c,
        c.post(r1.url(&format!("/v1/file/truncate?len={newlen}"))),
    )
    .await;
    model.truncate(newlen);
    let off = model.len() + 1000;
    write(
        &c,
        c.patch(r2.url(&format!("/v1/file?offset={off}")))
            .body(&b"tail"[..]),
    )
    .await;
    write_at(&mut model, off, b"tail");

    converged(&c, &[&core, r1, r2, r3, r4, r5], &model).await;

    // Range reads.
    let resp = c
        .get(r5.url("/v1/file"))
        .header("Range", "bytes=10-14")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(&resp.bytes().await.unwrap()[..], &model[10..15]);

    // Kill a relay that has children, write while it is down, restart it: its subtree
    // re-attaches (the overlay finds new parents) and everyone converges.
    let mut victim = None;
    for (i, p) in relays.iter().enumerate() {
        let s = status(&c, p).await.unwrap();
        if !s["children"].as_array().unwrap().is_empty() {
            victim = Some(i);
        }
    }
    let victim = victim.expect("a relay with children");
    relays[victim].kill();
    for i in 0..5u8 {
        let off = 1000 * i as usize;
        write(
            &c,
            c.patch(core.url(&format!("/v1/file?offset={off}")))
                .body(vec![i; 64]),
        )
        .await;
        write_at(&mut model, off, &[i; 64]);
    }
    relays[victim].restart();
    write(
        &c,
        c.patch(relays[(victim + 1) % 5].url("/v1/file?offset=3"))
            .body(&b"after restart"[..]),
    )
    .await;
    write_at(&mut model, 3, b"after restart");
    let mut all: Vec<&Proc> = vec![&core];
    all.extend(relays.iter());
    converged(&c, &all, &model).await;
    wait_until(60, "the tree to heal", || async {
        tree_ok(&c, &core, &relays, 2).await
    })
    .await;
    let r4 = &relays[3];
    let text = metrics(&c, r4).await;
    assert!(text.contains("canopy_applied_version"), "{text}");
    assert!(text.contains("canopy_lag_entries"));
    let metrics = metrics(&c, &core).await;
    assert!(metrics.contains("canopy_relayed_bytes_total"));
}

/// Waits until `relay` is attached to the node named `core`; returns how many of its
/// subscriptions went over a sample's connection and how many over a new one.
async fn attached_over(c: &reqwest::Client, relay: &Proc) -> (f64, f64) {
    wait_until(30, "the relay to attach to the core", || async {
        status(c, relay)
            .await
            .is_some_and(|s| s["parent"] == "core")
    })
    .await;
    let text = metrics(c, relay).await;
    let how = |h: &str| {
        metric_labelled(
            &text,
            "canopy_attach_connections_total",
            &format!("how=\"{h}\""),
        )
    };
    (how("sampled"), how("dialed"))
}

/// A relay joining a lone core subscribes over the connection its sample of the core just
/// made: one handshake, not two. The connection is not held twice: the core serves the one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_subscribes_over_the_connection_of_its_sample() {
    let dir = tempfile::tempdir().unwrap();
    let (_pki, core, r1, c) = core_and_relay(dir.path()).await;
    assert_eq!(
        attached_over(&c, &r1).await,
        (1.0, 0.0),
        "connections r1 subscribed over (sampled, dialed)"
    );
    let text = metrics(&c, &r1).await;
    assert!(metric_value(&text, "canopy_samples_total").unwrap_or(0.0) >= 1.0);
    wait_until(10, "the core to serve one connection", || async {
        metric_value(&metrics(&c, &core).await, "canopy_connections_served") == Some(1.0)
    })
    .await;
}

/// A kept sample connection that is gone by the time of the attach (closed at once by a
/// failpoint) costs a new handshake, not the join: the relay dials anew and attaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_dials_anew_when_its_samples_connection_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let lose = [("CANOPY_FAILPOINT_LOSE_SAMPLED", "1")];
    let (_pki, _core, r1, c) = core_and_relay_env(dir.path(), &lose).await;
    assert_eq!(
        attached_over(&c, &r1).await,
        (0.0, 1.0),
        "connections r1 subscribed over (sampled, dialed)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_restart_keeps_the_file_and_relays_resume() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (_pki, mut core, r1, c) = core_and_relay(root).await;
    let mut model = Vec::new();
    for i in 0..10u8 {
        let off = 70_000 * i as usize;
        write(
            &c,
            c.patch(r1.url(&format!("/v1/file?offset={off}")))
                .body(vec![i + 1; 5000]),
        )
        .await;
        write_at(&mut model, off, &[i + 1; 5000]);
    }
    converged(&c, &[&core, &r1], &model).await;
    let before = version_root(&c, &core).await.unwrap();
    let stats = |s: serde_json::Value, k: &str| s["stats"][k].as_u64().unwrap();
    let r1_before = status(&c, &r1).await.unwrap();
    core.restart();
    wait_until(30, "restarted core to lead with its log", || async {
        status(&c, &core).await.map(|s| s["role"] == "leader") == Some(true)
            && version_root(&c, &core).await.as_ref() == Some(&before)
    })
    .await;
    write(
        &c,
        c.patch(r1.url("/v1/file?offset=0&wait=applied"))
            .body(&b"post"[..]),
    )
    .await;
    write_at(&mut model, 0, b"post");
    converged(&c, &[&core, &r1], &model).await;
    let r1_after = status(&c, &r1).await.unwrap();
    assert!(
        stats(r1_after.clone(), "resumes") > stats(r1_before.clone(), "resumes"),
        "the relay resumed from the restarted core: {r1_before} -> {r1_after}"
    );
    for k in ["snapshots_installed", "backfill_received_bytes"] {
        assert_eq!(
            stats(r1_after.clone(), k),
            stats(r1_before.clone(), k),
            "{k}: no transfer after the restart"
        );
    }
    assert_eq!(stats(r1_after, "gaps"), 0);
}
