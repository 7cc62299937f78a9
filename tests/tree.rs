//! The self-organizing tree with real processes: 60 relays bootstrapped from the core alone,
//! fan-out 4; six relays with children killed; the tree heals and nothing is skipped or
//! applied twice. And a slow child is cut off without slowing its siblings.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

async fn statuses(c: &reqwest::Client, nodes: &[&Proc]) -> Option<BTreeMap<String, Value>> {
    let mut m = BTreeMap::new();
    for p in nodes {
        m.insert(p.name.clone(), status(c, p).await?);
    }
    Some(m)
}

/// Single parent that lists the child, depth = parent + 1, path = parent's + self, no
/// cycles (paths start at the core), fan-out ≤ k. Returns the max depth when all hold.
fn check_tree(all: &BTreeMap<String, Value>, core: &str, k: usize) -> Result<u64, String> {
    let mut max_depth = 0;
    for (name, s) in all {
        let kids = s["children"].as_array().unwrap();
        if kids.len() > k {
            return Err(format!("{name} has {} children", kids.len()));
        }
        if name == core {
            continue;
        }
        if s["synced"] != true {
            return Err(format!("{name} not synced"));
        }
        let parent = s["parent"].as_str().unwrap_or("");
        let Some(ps) = all.get(parent) else {
            return Err(format!("{name} has no live parent ({parent:?})"));
        };
        if !ps["children"].as_array().unwrap().iter().any(|c| c == name) {
            return Err(format!("{parent} does not list {name}"));
        }
        let depth = s["depth"].as_u64().unwrap();
        if Some(depth) != ps["depth"].as_u64().map(|d| d + 1) {
            return Err(format!("{name} depth {depth} under {parent}"));
        }
        let path: Vec<&str> = s["root_path"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        let unique: BTreeSet<&&str> = path.iter().collect();
        if path.first() != Some(&core)
            || path.last() != Some(&name.as_str())
            || unique.len() != path.len()
        {
            return Err(format!("{name} has path {path:?}"));
        }
        max_depth = max_depth.max(depth);
    }
    Ok(max_depth)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_relays_form_and_heal_a_tree() {
    const N: usize = 60;
    const K: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("core", "core");
    for i in 0..N {
        pki.issue(&format!("r{i}"), "relay");
    }
    let fan = ["--fanout", "4"];
    let core = Proc::start(root, &pki, "core", true, &[], &fan);
    let c = http();
    wait_leader(&c, &core).await;
    let r = c
        .patch(core.url("/v1/file?offset=0"))
        .body(vec![7u8; 256 * 1024])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let mut relays: Vec<Proc> = (0..N)
        .map(|i| Proc::start(root, &pki, &format!("r{i}"), false, &[core.quic], &fan))
        .collect();

    // ceil(log4(61)) + 1
    let bound = ((N + 1) as f64).log(K as f64).ceil() as u64 + 1;
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut nodes: Vec<&Proc> = vec![&core];
        nodes.extend(relays.iter());
        if let Some(all) = statuses(&c, &nodes).await {
            match check_tree(&all, "core", K) {
                Ok(d) if d <= bound => break,
                Ok(d) => last = format!("max depth {d} > {bound}"),
                Err(e) => last = e,
            }
        }
        assert!(Instant::now() < deadline, "tree did not form: {last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tree = canopy(&["--api", &core.api.to_string(), "tree"]);
    assert!(tree.contains(&format!("{} nodes", N + 1)), "{tree}");

    // Kill six relays that have children.
    let mut victims = Vec::new();
    for (i, p) in relays.iter().enumerate() {
        let s = status(&c, p).await.unwrap();
        if !s["children"].as_array().unwrap().is_empty() && victims.len() < 6 {
            victims.push(i);
        }
    }
    assert_eq!(victims.len(), 6, "fewer than 6 relays have children");
    let killed: BTreeSet<String> = victims.iter().map(|i| relays[*i].name.clone()).collect();
    for i in &victims {
        relays[*i].kill();
    }
    let killed_at = Instant::now();
    let survivors: Vec<&Proc> = relays
        .iter()
        .filter(|p| !killed.contains(&p.name))
        .collect();
    let mut last = String::new();
    loop {
        let mut nodes: Vec<&Proc> = vec![&core];
        nodes.extend(survivors.iter().copied());
        if let Some(all) = statuses(&c, &nodes).await {
            let orphans: Vec<&String> = all
                .iter()
                .filter(|(n, s)| {
                    *n != "core" && killed.contains(s["parent"].as_str().unwrap_or(""))
                })
                .map(|(n, _)| n)
                .collect();
            match check_tree(&all, "core", K) {
                Ok(_) if orphans.is_empty() => break,
                Ok(_) => last = format!("orphans {orphans:?}"),
                Err(e) => last = e,
            }
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "survivors not re-attached within 10 s: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("re-attached in {:?}", killed_at.elapsed());

    let r = c
        .patch(survivors[0].url("/v1/file?offset=100"))
        .body(&b"after the kills"[..])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let v = r.json::<Value>().await.unwrap()["version"]
        .as_u64()
        .unwrap();
    let core_root = wait_for_version(&c, &core, v).await;
    for p in &survivors {
        assert_eq!(wait_for_version(&c, p, v).await, core_root, "{}", p.name);
        let s = status(&c, p).await.unwrap();
        assert_eq!(s["stats"]["gaps"], 0, "{}: {}", p.name, s["stats"]);
        assert_eq!(
            s["stats"]["snapshots_installed"], 1,
            "{} re-attached by resuming, not by a second transfer: {}",
            p.name, s["stats"]
        );
    }
}

async fn wait_for_version(c: &reqwest::Client, p: &Proc, v: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((got, root)) = version_root(c, p).await {
            if got >= v {
                return root;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} did not reach version {v}",
            p.name
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_child_is_cut_off_and_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("core", "core");
    for n in ["fast", "slow"] {
        pki.issue(n, "relay");
    }
    // Small frames, a 1 MiB QUIC window and a 2 MiB queue per child, so a paused child
    // overflows in a few writes.
    let cfg = root.join("small-queue.toml");
    std::fs::write(
        &cfg,
        "[stream]\nmax_update_bytes = 524288\nmax_frame = 1048576\nchild_queue_bytes = 2097152\nstream_window_bytes = 1048576\n",
    )
    .unwrap();
    let cfg_arg = ["--config", cfg.to_str().unwrap()];
    let core = Proc::start(root, &pki, "core", true, &[], &cfg_arg);
    let c = http();
    wait_leader(&c, &core).await;
    let fast = Proc::start(root, &pki, "fast", false, &[core.quic], &cfg_arg);
    let slow = Proc::start(root, &pki, "slow", false, &[core.quic], &cfg_arg);
    wait_until(30, "both children attached", || async {
        status(&c, &core)
            .await
            .is_some_and(|s| s["children"].as_array().unwrap().len() == 2)
    })
    .await;

    slow.pause();
    let mut last = 0;
    for i in 0..12u64 {
        let r = c
            .patch(core.url(&format!("/v1/file?offset={}", i * 400_000)))
            .body(vec![i as u8 + 1; 400_000])
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        last = r.json::<Value>().await.unwrap()["version"]
            .as_u64()
            .unwrap();
        // The fast sibling keeps up while its sibling is stuck.
        wait_for_version(&c, &fast, last).await;
    }
    wait_until(30, "the slow child to be cut off", || async {
        metric_value(&metrics(&c, &core).await, "canopy_child_cutoffs_total")
            .is_some_and(|v| v >= 1.0)
    })
    .await;
    let s = status(&c, &fast).await.unwrap();
    assert_eq!(s["parent"], "core");
    slow.resume();
    let core_root = wait_for_version(&c, &core, last).await;
    assert_eq!(wait_for_version(&c, &slow, last).await, core_root);
    assert_eq!(wait_for_version(&c, &fast, last).await, core_root);
}
