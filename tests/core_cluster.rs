//! A 3- and 5-node core as real processes: leader failover, restarts from disk, conditional
//! writes. Every acknowledged write must be in the final file on every node.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const WRITE: usize = 64;

fn payload(i: u64) -> Vec<u8> {
    let h = blake3::hash(&i.to_le_bytes());
    h.as_bytes().iter().chain(h.as_bytes()).copied().collect()
}

/// One acknowledged write.
#[derive(Clone, Copy, Debug)]
struct Ack {
    /// The write's index: it wrote `payload(i)` at offset `i * WRITE`.
    i: u64,
    /// When the acknowledgement arrived.
    at: Instant,
    /// The version the acknowledgement named: every version from it on holds the write.
    version: u64,
}

#[derive(Default)]
struct Acks {
    acked: Vec<Ack>,
}

/// Writers that PATCH distinct 64-byte ranges through whichever core API answers.
struct Load {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Acks>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(apis: Vec<std::net::SocketAddr>, writers: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Acks::default()));
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {TOKEN}").parse().unwrap(),
        );
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .default_headers(headers)
            .build()
            .unwrap();
        let tasks = (0..writers)
            .map(|w| {
                let (stop, acks, client, apis) =
                    (stop.clone(), acks.clone(), client.clone(), apis.clone());
                tokio::spawn(async move {
                    let mut i = w;
                    let mut target = w as usize;
                    while !stop.load(Ordering::Relaxed) {
                        let api = apis[target % apis.len()];
                        let off = i * WRITE as u64;
                        let version = patch_api(&client, api, off, payload(i)).await;
                        match version {
                            Some(version) => {
                                let at = Instant::now();
                                acks.lock().unwrap().acked.push(Ack { i, at, version });
                                i += writers;
                            }
                            None => {
                                target += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Load { stop, acks, tasks }
    }

    fn count(&self) -> usize {
        self.acks.lock().unwrap().acked.len()
    }

    async fn wait_for_more(&self, n: usize, what: &str) {
        let base = self.count();
        wait_until(60, what, || async { self.count() >= base + n }).await;
    }

    async fn stop(self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let mut a = self.acks.lock().unwrap().acked.clone();
        a.sort_by_key(|x| x.at);
        a
    }
}

/// Every node reaches the same version and root, no older than the newest acknowledgement, and
/// holds every acknowledged write. (Nodes that have just restarted can agree on an older
/// version, the one their persisted commit index named, until the new leader's first commit
/// reaches them; agreeing there proves nothing about the writes after it.)
async fn check_all(c: &reqwest::Client, nodes: &[&Proc], acked: &[Ack]) {
    let newest = acked.iter().map(|a| a.version).max().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let target = loop {
        let mut vr = Vec::new();
        for p in nodes {
            vr.push(version_root(c, p).await);
        }
        if vr
            .iter()
            .all(|x| x.as_ref().is_some_and(|(v, _)| *v >= newest) && *x == vr[0])
        {
            break vr[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "nodes did not agree on a version from {newest} on: {vr:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let (version, root) = target.unwrap();
    for p in nodes {
        let resp = c.get(p.url("/v1/file")).send().await.unwrap();
        assert_eq!(resp.headers()["x-canopy-root"].to_str().unwrap(), root);
        assert_eq!(
            resp.headers()["x-canopy-version"].to_str().unwrap(),
            version.to_string()
        );
        let body = resp.bytes().await.unwrap();
        for a in acked {
            let off = a.i as usize * WRITE;
            assert!(
                body.len() >= off + WRITE && body[off..off + WRITE] == payload(a.i)[..],
                "{}: write {} acknowledged at version {} is missing from version {version}",
                p.name,
                a.i,
                a.version
            );
        }
    }
}

fn max_gap_after(acked: &[Ack], from: Instant) -> Duration {
    let mut prev = from;
    let mut gap = Duration::ZERO;
    for a in acked.iter().filter(|a| a.at >= from) {
        gap = gap.max(a.at.duration_since(prev));
        prev = a.at;
    }
    gap
}

async fn failover(n: usize, kill: usize) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    let names: Vec<String> = (1..=n).map(|i| format!("c{i}")).collect();
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    for nm in &refs {
        pki.issue(nm, "core");
    }
    pki.issue("r1", "relay");
    let mut cores = Proc::start_core_cluster(root, &pki, &refs);
    let c = http();
    let leader = leader_index(&c, &cores).await;
    let joins: Vec<_> = cores.iter().map(|p| p.quic).collect();
    let relay = Proc::start(root, &pki, "r1", false, &joins, &[]);

    let load = Load::start(cores.iter().map(|p| p.api).collect(), 4);
    load.wait_for_more(40, "writes before the kill").await;

    let mut victims = vec![leader];
    victims.extend((0..n).filter(|i| *i != leader).take(kill - 1));
    let killed_at = Instant::now();
    for v in &victims {
        cores[*v].kill();
    }
    load.wait_for_more(40, "writes to resume after the kill")
        .await;
    let new_leader = leader_index(&c, &cores).await;
    assert!(!victims.contains(&new_leader));
    for v in &victims {
        cores[*v].restart();
    }
    load.wait_for_more(40, "writes after the restart").await;
    let acked = load.stop().await;
    let gap = max_gap_after(&acked, killed_at);
    assert!(
        gap < Duration::from_secs(20),
        "writes stalled for {gap:?} after the leader died"
    );
    let mut nodes: Vec<&Proc> = cores.iter().collect();
    nodes.push(&relay);
    check_all(&c, &nodes, &acked).await;
    eprintln!(
        "{n} nodes, killed {kill}: {} acknowledged writes, longest stall {gap:?}",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_survive_a_leader_kill() {
    failover(3, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_survive_two_kills() {
    failover(5, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_core_restarts_from_disk_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    for nm in ["c1", "c2", "c3"] {
        pki.issue(nm, "core");
    }
    let mut cores = Proc::start_core_cluster(root, &pki, &["c1", "c2", "c3"]);
    let c = http();
    leader_index(&c, &cores).await;
    let load = Load::start(cores.iter().map(|p| p.api).collect(), 4);
    load.wait_for_more(60, "writes").await;
    let acked = load.stop().await;
    for p in &mut cores {
        p.kill();
    }
    for p in &mut cores {
        p.restart();
    }
    leader_index(&c, &cores).await;
    let nodes: Vec<&Proc> = cores.iter().collect();
    check_all(&c, &nodes, &acked).await;
    let resp = c
        .patch(cores[0].url("/v1/file?offset=0&wait=applied"))
        .body(&b"after full restart"[..])
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_race_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    for nm in ["c1", "c2", "c3"] {
        pki.issue(nm, "core");
    }
    let cores = Proc::start_core_cluster(root, &pki, &["c1", "c2", "c3"]);
    let c = http();
    leader_index(&c, &cores).await;
    let resp = c
        .patch(cores[0].url("/v1/file?offset=0&wait=applied"))
        .body(vec![0u8; 1024])
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let mut floor = version_root(&c, &cores[0]).await.unwrap().0;
    for round in 0..5 {
        wait_until(30, "cores to apply", || async {
            let mut seen = Vec::new();
            for p in &cores {
                seen.push(version_root(&c, p).await.map(|x| x.0));
            }
            seen.iter().all(|x| *x == seen[0]) && seen[0] >= Some(floor)
        })
        .await;
        let v = version_root(&c, &cores[1]).await.unwrap().0;
        floor = v + 1;
        let a = c
            .patch(cores[1].url(&format!("/v1/file?offset=0&if_version={v}")))
            .body(format!("writer A round {round}"))
            .send();
        let b = c
            .patch(cores[2].url(&format!("/v1/file?offset=0&if_version={v}")))
            .body(format!("writer B round {round}"))
            .send();
        let (a, b) = tokio::join!(a, b);
        let (a, b) = (a.unwrap(), b.unwrap());
        let codes = [a.status().as_u16(), b.status().as_u16()];
        assert!(
            codes == [200, 409] || codes == [409, 200],
            "round {round}: {codes:?}"
        );
        let loser = if codes[0] == 409 { a } else { b };
        let body: serde_json::Value = loser.json().await.unwrap();
        assert!(body["version"].as_u64().unwrap() > v, "{body}");
    }
    // A range-hash precondition, checked against the bytes every core holds.
    let mut latest = 0;
    for p in &cores {
        latest = latest.max(version_root(&c, p).await.unwrap().0);
    }
    wait_until(30, "cores to agree", || async {
        let mut ok = true;
        for p in &cores {
            ok &= version_root(&c, p).await.map(|x| x.0) == Some(latest);
        }
        ok
    })
    .await;
    let file = c
        .get(cores[0].url("/v1/file"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let h = blake3::hash(&file[0..16]).to_hex();
    let ok = c
        .patch(cores[0].url(&format!("/v1/file?offset=100&if_range_hash=0:16:{h}")))
        .body(&b"x"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let stale = c
        .patch(cores[0].url(&format!(
            "/v1/file?offset=100&if_range_hash=0:16:{}",
            blake3::hash(b"nope").to_hex()
        )))
        .body(&b"y"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 409);
}

fn member_names(s: &serde_json::Value) -> Vec<(String, bool)> {
    let mut v: Vec<(String, bool)> = s["core"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["voter"].as_bool().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    for nm in ["c1", "c2", "c3", "c4"] {
        pki.issue(nm, "core");
    }
    let mut cores = Proc::start_core_cluster(root, &pki, &["c1", "c2", "c3"]);
    let c = http();
    let leader = leader_index(&c, &cores).await;
    let mut acked = Vec::new();
    for i in 0..20u64 {
        let r = c
            .patch(cores[leader].url(&format!("/v1/file?offset={}", i * 64)))
            .body(payload(i))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        assert!(status.is_success(), "write {i}: {status} {body}");
        let version = serde_json::from_str::<serde_json::Value>(&body).unwrap()["version"]
            .as_u64()
            .unwrap();
        acked.push(Ack {
            i,
            at: Instant::now(),
            version,
        });
    }
    let c4 = Proc::start_core_joiner(root, &pki, "c4");
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let api = cores[follower].api.to_string();
    canopy(&["--api", &api, "core", "add", "c4", &c4.quic.to_string()]);
    let s = status(&c, &cores[leader]).await.unwrap();
    assert_eq!(
        member_names(&s),
        vec![
            ("c1".into(), true),
            ("c2".into(), true),
            ("c3".into(), true),
            ("c4".into(), true)
        ]
    );
    let victim = cores[leader].name.clone();
    canopy(&["--api", &api, "core", "remove", &victim]);
    let mut remaining: Vec<&Proc> = cores.iter().filter(|p| p.name != victim).collect();
    remaining.push(&c4);
    let deadline = Instant::now() + Duration::from_secs(60);
    let leader_status = loop {
        let mut found = None;
        for p in &remaining {
            if let Some(s) = status(&c, p).await.filter(|s| s["role"] == "leader") {
                found = Some(s);
            }
        }
        if let Some(s) = found {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no leader after removing {victim}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let names: Vec<String> = member_names(&leader_status)
        .into_iter()
        .filter(|m| m.1)
        .map(|m| m.0)
        .collect();
    assert!(
        !names.contains(&victim) && names.contains(&"c4".to_string()),
        "{names:?}"
    );
    drop(remaining);
    cores[leader].kill();
    let r = c
        .patch(c4.url("/v1/file?offset=0&wait=applied"))
        .body(&b"after membership change"[..])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let mut nodes: Vec<&Proc> = cores.iter().filter(|p| p.name != victim).collect();
    nodes.push(&c4);
    acked.retain(|a| a.i != 0);
    check_all(&c, &nodes, &acked).await;
}
