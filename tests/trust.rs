//! Only the core is trusted, through the real binaries: a rogue relay's data is never shown
//! and its children leave it; a rogue parent cannot capture writes; names are bound to
//! certificates; a reader cannot write; the API needs its token; an expired certificate is
//! refused.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The failpoint's marker (src/node/failpoint.rs): no honest node may ever show it.
const TAMPER: &[u8] = b"ROGUE-TAMPERED!!";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn counter(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Fails the test if `p` shows the rogue's marker, in its API or in its `--file`.
async fn assert_clean(c: &reqwest::Client, p: &Proc) {
    let served = file_of(c, p).await;
    assert!(
        !contains(&served, TAMPER),
        "{} served tampered data",
        p.name
    );
    if let Ok(on_disk) = std::fs::read(&p.file) {
        assert!(
            !contains(&on_disk, TAMPER),
            "{}'s --file holds tampered data",
            p.name
        );
    }
}

/// A relay that advertises depth 0 and serves tampered transfers and entries, with recomputed
/// roots signed by its own key: its children show none of it, ban it, re-attach elsewhere,
/// and converge to the core's file. A relay resuming through it (entries) is caught too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_relay_is_banned_and_its_data_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::with(
        root,
        &[
            ("core", "core"),
            ("rogue", "relay"),
            ("good", "relay"),
            ("a", "relay"),
            ("b", "relay"),
            ("d", "relay"),
        ],
    );
    let core = Proc::start(root, &pki, "core", true, &[], &["--fanout", "2"]);
    let c = http();
    wait_leader(&c, &core).await;
    let (v0, _) = put_random(&c, &core, 400_000, 5).await;
    let rogue = Proc::start_env(
        root,
        &pki,
        "rogue",
        false,
        &[core.quic],
        &[],
        &[("CANOPY_FAILPOINT_ROGUE", "1")],
    );
    wait_materialized(&c, &rogue, v0).await;
    let good = Proc::start(root, &pki, "good", false, &[core.quic], &[]);
    wait_materialized(&c, &good, v0).await;
    // d holds a trusted copy, then comes back through the rogue alone: it resumes there.
    let mut d = Proc::start(root, &pki, "d", false, &[good.quic], &[]);
    wait_materialized(&c, &d, v0).await;
    d.kill();

    let a = Proc::start(root, &pki, "a", false, &[rogue.quic], &[]);
    let b = Proc::start(root, &pki, "b", false, &[rogue.quic], &[]);
    let d = Proc::start_env(root, &pki, "d", false, &[rogue.quic], &[], &[]);
    let children = [&a, &b, &d];

    let started = Instant::now();
    let mut i = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        i += 1;
        let w = c
            .patch(core.url(&format!("/v1/file?offset={}", (i * 7919) % 390_000)))
            .body(format!("write {i:06}"))
            .send()
            .await
            .unwrap();
        assert!(w.status().is_success());
        for p in children {
            assert_clean(&c, p).await;
        }
        let core_vr = version_root(&c, &core).await.unwrap();
        let mut settled = 0;
        for p in children {
            let s = status(&c, p).await.unwrap();
            let away = s["parent"] != "rogue" && s["parent"] != "";
            let banned = counter(&metrics(&c, p).await, "canopy_untrusted_frames_total", "") > 0.0;
            if away && banned && version_root(&c, p).await.as_ref() == Some(&core_vr) {
                settled += 1;
            }
        }
        if settled == children.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the children did not leave the rogue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "every child banned the rogue and converged {:.1} s after joining through it",
        started.elapsed().as_secs_f64()
    );
    let v = version_root(&c, &core).await.unwrap().0;
    let content = file_of(&c, &core).await;
    for p in children {
        wait_materialized(&c, p, v).await;
        assert_clean(&c, p).await;
        assert!(
            file_of(&c, p).await == content,
            "{} differs from the core",
            p.name
        );
        assert!(std::fs::read(&p.file).unwrap() == content);
        assert!(
            p.log_text().contains("UNTRUSTED parent"),
            "{} logged no ban",
            p.name
        );
    }
    let d_reasons = metrics(&c, &d).await;
    assert!(
        counter(&d_reasons, "canopy_untrusted_frames_total", "") > 0.0,
        "the resuming relay refused the rogue's entries"
    );
}

/// A rogue parent names itself the core in `SubscribeOk` and acknowledges proposals without
/// committing them: a child's write never reaches it. Knowing the real core, the write
/// reaches it; knowing only the rogue, it fails loudly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_parent_cannot_capture_writes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::with(
        root,
        &[
            ("core", "core"),
            ("rogue", "relay"),
            ("w1", "relay"),
            ("w2", "relay"),
        ],
    );
    let core = Proc::start(root, &pki, "core", true, &[], &["--fanout", "1"]);
    let c = http();
    wait_leader(&c, &core).await;
    let (v0, _) = put_random(&c, &core, 100_000, 6).await;
    let rogue = Proc::start_env(
        root,
        &pki,
        "rogue",
        false,
        &[core.quic],
        &[],
        &[
            ("CANOPY_FAILPOINT_ROGUE", "1"),
            ("CANOPY_FAILPOINT_ECLIPSE", "1"),
        ],
    );
    wait_materialized(&c, &rogue, v0).await;

    // Only the rogue known (it hides every other peer): the write is refused loudly, never acknowledged.
    let w1 = Proc::start(root, &pki, "w1", false, &[rogue.quic], &[]);
    let r = c
        .patch(w1.url("/v1/file?offset=0"))
        .body("captured?")
        .send()
        .await
        .unwrap();
    let code = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("expected a core node"), "{body}");
    assert_eq!(version_root(&c, &core).await.unwrap().0, v0);

    // The real core known too: the write reaches it.
    let w2 = Proc::start(root, &pki, "w2", false, &[rogue.quic, core.quic], &[]);
    let r = c
        .patch(w2.url("/v1/file?offset=0"))
        .body("through the core")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let v = v["version"].as_u64().unwrap();
    assert!(
        v > v0 && v < 1 << 40,
        "a real commit, not the rogue's fake: {v}"
    );
    let (core_v, _) = version_root(&c, &core).await.unwrap();
    assert!(core_v >= v);
    assert!(file_of(&c, &core).await.starts_with(b"through the core"));
}

/// A name a peer declares must be its certificate's: a relay whose certificate says r1 but
/// subscribes as r2 is refused, and a core certificate of a non-member cannot vote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_names_must_match_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::with(root, &[("c1", "core"), ("c9", "core"), ("r1", "relay")]);
    let c1 = Proc::start(root, &pki, "c1", true, &[], &[]);
    let c = http();
    wait_leader(&c, &c1).await;
    let term = status(&c, &c1).await.unwrap()["core"]["term"].clone();

    let r1 = Proc::start_env(
        root,
        &pki,
        "r1",
        false,
        &[c1.quic],
        &[],
        &[("CANOPY_FAILPOINT_DECLARE_NAME", "r2")],
    );
    wait_until(30, "c1 to refuse the spoofed subscription", || async {
        counter(
            &metrics(&c, &c1).await,
            "canopy_identity_refusals_total",
            "subscribe",
        ) >= 1.0
    })
    .await;
    let s = status(&c, &r1).await.unwrap();
    assert_eq!(s["parent"], "", "{s}");
    assert_eq!(s["synced"], false);
    assert!(c1.log_text().contains("not the certificate's (r1)"));

    // c9 believes it forms a core with c1 and campaigns; c1 does not count it as a member.
    let q9 = free_udp();
    let p1 = format!("c1={}", c1.quic);
    let p9 = format!("c9={q9}");
    let _c9 = Proc::start_at(
        root,
        &pki,
        "c9",
        true,
        q9,
        &["--init", "--peer", &p1, "--peer", &p9],
    );
    wait_until(30, "c1 to refuse raft rpcs from a non-member", || async {
        counter(
            &metrics(&c, &c1).await,
            "canopy_identity_refusals_total",
            "raft",
        ) >= 1.0
    })
    .await;
    let s = status(&c, &c1).await.unwrap();
    assert_eq!(s["role"], "leader");
    assert_eq!(s["core"]["term"], term, "a non-member moved c1's term");
    let members: Vec<String> = s["core"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(members, ["c1"]);
}

/// A reader keeps its file and serves children, but cannot write: its own API answers 403,
/// and a write it forwards anyway is refused by the core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_follows_and_serves_but_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::with(
        root,
        &[
            ("core", "core"),
            ("rd", "reader"),
            ("rd2", "reader"),
            ("kid", "relay"),
        ],
    );
    let core = Proc::start(root, &pki, "core", true, &[], &["--fanout", "2"]);
    let c = http();
    wait_leader(&c, &core).await;
    let (v0, _) = put_random(&c, &core, 300_000, 7).await;
    let rd = Proc::start(root, &pki, "rd", false, &[core.quic], &[]);
    let rd2 = Proc::start_env(
        root,
        &pki,
        "rd2",
        false,
        &[core.quic],
        &[],
        &[("CANOPY_FAILPOINT_WRITE_ANYWAY", "1")],
    );
    wait_materialized(&c, &rd, v0).await;
    wait_materialized(&c, &rd2, v0).await;
    let kid = Proc::start(root, &pki, "kid", false, &[rd.quic], &[]);
    wait_materialized(&c, &kid, v0).await;
    let parent = status(&c, &kid).await.unwrap()["parent"].clone();
    assert!(
        parent == "rd" || parent == "rd2",
        "a reader serves the kid: {parent}"
    );

    let r = c
        .patch(rd.url("/v1/file?offset=0"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"].as_str().unwrap().contains("reader"), "{e}");

    let r = c
        .patch(rd2.url("/v1/file?offset=0"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"].as_str().unwrap().contains("may not write"),
        "{e}"
    );
    assert_eq!(version_root(&c, &core).await.unwrap().0, v0);
    let refused = counter(
        &metrics(&c, &core).await,
        "canopy_identity_refusals_total",
        "propose",
    );
    assert!(refused >= 1.0);

    let w = c
        .patch(core.url("/v1/file?offset=10"))
        .body("from the core")
        .send()
        .await
        .unwrap();
    let v: Value = w.json().await.unwrap();
    let v = v["version"].as_u64().unwrap();
    for p in [&rd, &kid] {
        wait_materialized(&c, p, v).await;
        assert_eq!(file_of(&c, p).await, file_of(&c, &core).await);
    }
}

/// Writes need the node's token, reads do not; a node makes its token file (mode 0600) at
/// first start when none is configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_its_token_for_writes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("core", "core");
    let (quic, api) = (free_udp(), free_tcp());
    let data = root.join("data").join("core");
    let child = Command::new(CORE_NODE)
        .args(["--name", "core", "--init", "--listen", &quic.to_string()])
        .args([
            "--api",
            &api.to_string(),
            "--tls",
            pki.tls.to_str().unwrap(),
        ])
        .args(["--data", data.to_str().unwrap()])
        .stderr(std::fs::File::create(root.join("core.log")).unwrap())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = KillOnDrop(child, root.join("core.log"));
    let anon = reqwest::Client::new();
    let url = |p: &str| format!("http://{api}{p}");
    wait_until(30, "the core's API", || async {
        anon.get(url("/v1/status")).send().await.is_ok()
    })
    .await;
    let token_file = data.join("api-token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&token_file).unwrap();
    let log = std::fs::read_to_string(root.join("core.log")).unwrap();
    assert!(
        log.contains("api-token") && !log.contains(token.trim()),
        "{log}"
    );

    wait_until(30, "the core to lead", || async {
        let s: Option<Value> = match anon.get(url("/v1/status")).send().await {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        s.is_some_and(|s| s["role"] == "leader")
    })
    .await;
    let r = anon
        .patch(url("/v1/file?offset=0"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"].as_str().unwrap().contains("token"), "{e}");
    let r = anon
        .patch(url("/v1/file?offset=0"))
        .bearer_auth("not-it")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = anon
        .patch(url("/v1/file?offset=0"))
        .bearer_auth(token.trim())
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for p in ["/v1/status", "/v1/file", "/v1/tree", "/metrics"] {
        assert_eq!(anon.get(url(p)).send().await.unwrap().status(), 200, "{p}");
    }
    // The CLI on the node's host finds the token through --data.
    let out = Command::new(CANOPY)
        .args(["--api", &api.to_string(), "--data", data.to_str().unwrap()])
        .args(["truncate", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(child);
}

/// A certificate issued already expired: the node refuses to start with it, and a peer that
/// presents it anyway is refused at the handshake, with a log line that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("core", "core");
    canopy(&[
        "cert",
        "issue",
        "--ca",
        pki.ca.to_str().unwrap(),
        "--name",
        "old",
        "--role",
        "relay",
        "--days",
        "0",
        "--out",
        pki.tls.to_str().unwrap(),
    ]);
    let log = root.join("old-start.log");
    let mut start = Command::new(RELAY_NODE)
        .args([
            "--name",
            "old",
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ])
        .args(["--join", "127.0.0.1:9", "--tls", pki.tls.to_str().unwrap()])
        .args(["--data", root.join("old").to_str().unwrap()])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = start.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = start.kill();
            panic!("a relay with an expired certificate kept running");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!exit.success());
    let err = std::fs::read_to_string(&log).unwrap().to_lowercase();
    assert!(err.contains("expired"), "{err}");

    let core = Proc::start(root, &pki, "core", true, &[], &[]);
    let c = http();
    wait_leader(&c, &core).await;
    let old = Proc::start_env(
        root,
        &pki,
        "old",
        false,
        &[core.quic],
        &[],
        &[("CANOPY_FAILPOINT_ALLOW_EXPIRED", "1")],
    );
    wait_until(30, "the core to refuse the expired certificate", || async {
        core.log_text().to_lowercase().contains("expired")
    })
    .await;
    let line = core
        .log_text()
        .lines()
        .find(|l| l.to_lowercase().contains("expired"))
        .map(str::to_string);
    eprintln!("the core logged: {line:?}");
    let s = status(&c, &old).await.unwrap();
    assert_eq!(s["parent"], "");
    assert!(
        counter(
            &metrics(&c, &core).await,
            "canopy_handshake_failures_total",
            ""
        ) >= 1.0
    );
}

/// A relay whose cluster CA did not sign the core's certificate (another cluster's PKI)
/// never attaches, and says once, not at every retry, what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_ca_is_named_once_with_its_fix() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("core", "core");
    let other = Pki::new(&root.join("other"));
    other.issue("stray", "relay");
    let core = Proc::start(root, &pki, "core", true, &[], &[]);
    let c = http();
    wait_leader(&c, &core).await;
    let stray = Proc::start(
        &root.join("other"),
        &other,
        "stray",
        false,
        &[core.quic],
        &[],
    );
    let hint = "cluster CA did not sign";
    wait_until(
        60,
        "the core to refuse the stray relay three times",
        || async {
            counter(
                &metrics(&c, &core).await,
                "canopy_handshake_failures_total",
                "",
            ) >= 3.0
                && stray.log_text().contains(hint)
        },
    )
    .await;
    let said = stray.log_text().matches(hint).count();
    assert_eq!(said, 1, "named once per peer, not at every retry");
    assert!(stray.log_text().contains("same ca.pem"));
    assert_eq!(status(&c, &stray).await.unwrap()["parent"], "");
}
