//! What an idle tree costs, counted rather than timed: real `core-node` and `relay-node`
//! processes with `--file`, fan-out 2, settled and idle.
//!
//! - No connection outlives its use: once every relay has sampled peers for its view, each
//!   node holds open only its children's connections (a connection left open keeps sending
//!   QUIC keep-alives for good: an idle relay once kept one to every peer it had sampled).
//! - Heartbeats: at most one per child per `heartbeat_ms` of the window.
//! - A relay's parent link carries the heartbeats and one acknowledgement for each, and no
//!   more than a few other datagrams (no QUIC keep-alives beside the heartbeats).
//! - An idle leaf's process wakes about once per heartbeat, not twice: QUIC's keep-alive
//!   timer, pushed later by every heartbeat, no longer wakes it at the deadline it was
//!   pushed from (`canopy::runtime`).
//!
//! The bounds come from the config and hold on a slow machine as on a fast one: a loaded
//! machine only sends less.

mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use common::*;

const RELAYS: usize = 6;
const FANOUT: usize = 2;
/// `stream.heartbeat_ms`'s default.
const HEARTBEAT_MS: f64 = 500.0;

/// One node's counters at one moment.
#[derive(Debug, Clone, Copy)]
struct Counts {
    children: f64,
    heartbeats_sent: f64,
    heartbeats_received: f64,
    link_sent: f64,
    link_received: f64,
    link_mtu: f64,
    reparents: f64,
    samples: f64,
    served: f64,
}

async fn counts(c: &reqwest::Client, p: &Proc) -> Counts {
    let m = metrics(c, p).await;
    let v = |name: &str| metric_value(&m, name).unwrap_or(0.0);
    Counts {
        children: v("canopy_children"),
        heartbeats_sent: v("canopy_heartbeats_sent_total"),
        heartbeats_received: v("canopy_heartbeats_received_total"),
        link_sent: metric_labelled(&m, "canopy_parent_link_datagrams", "dir=\"sent\""),
        link_received: metric_labelled(&m, "canopy_parent_link_datagrams", "dir=\"received\""),
        link_mtu: v("canopy_parent_link_mtu_bytes"),
        reparents: canopy::measure::metric_sum(&m, "canopy_reparents_total"),
        samples: v("canopy_samples_total"),
        served: v("canopy_connections_served"),
    }
}

async fn all_counts(c: &reqwest::Client, nodes: &[&Proc]) -> BTreeMap<String, Counts> {
    let mut out = BTreeMap::new();
    for p in nodes {
        out.insert(p.name.clone(), counts(c, p).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tree_sends_heartbeats_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("core", "core");
    for i in 0..RELAYS {
        pki.issue(&format!("r{i}"), "relay");
    }
    // Frequent shuffles: every relay samples several peers within seconds.
    let cfg = root.join("idle.toml");
    std::fs::write(&cfg, "[overlay]\nshuffle_ms = 100\n").unwrap();
    let fanout = FANOUT.to_string();
    let args = ["--fanout", &fanout, "--config", cfg.to_str().unwrap()];
    let core = Proc::start(root, &pki, "core", true, &[], &args);
    let c = http();
    wait_leader(&c, &core).await;
    let (v, _) = put_random(&c, &core, 256 * 1024, 14).await;
    let relays: Vec<Proc> = (0..RELAYS)
        .map(|i| Proc::start(root, &pki, &format!("r{i}"), false, &[core.quic], &args))
        .collect();
    for r in &relays {
        wait_materialized(&c, r, v).await;
    }
    let mut nodes: Vec<&Proc> = vec![&core];
    nodes.extend(relays.iter());

    // Every relay has sampled peers (over connections of their own) ...
    wait_until(60, "every relay to sample 4 peers", || async {
        let all = all_counts(&c, &relays.iter().collect::<Vec<_>>()).await;
        all.values().all(|n| n.samples >= 4.0)
    })
    .await;
    // ... and no node keeps an accepted connection beyond its children's.
    for p in &nodes {
        let what = format!("{} to hold its children's connections only", p.name);
        wait_until(30, &what, || async {
            let n = counts(&c, p).await;
            n.served <= n.children
        })
        .await;
    }

    // A window of idle heartbeats in which the tree did not change.
    let mut windows = 0;
    loop {
        windows += 1;
        assert!(windows <= 5, "the tree kept changing for 5 windows");
        let t0 = Instant::now();
        let a = all_counts(&c, &nodes).await;
        // A link attached just before the window still runs MTU discovery: a probe and its
        // acknowledgement per round trip, about nine, which are not heartbeat traffic.
        let jumbo = f64::from(canopy::tls::DEFAULT_MAX_UDP_PAYLOAD);
        let discovering = relays.iter().any(|r| a[&r.name].link_mtu != jumbo);
        wait_until(60, "10 heartbeats at every relay", || async {
            let mut ok = true;
            for r in &relays {
                let n = counts(&c, r).await;
                ok &= n.heartbeats_received >= a[&r.name].heartbeats_received + 10.0;
            }
            ok
        })
        .await;
        let b = all_counts(&c, &nodes).await;
        let secs = t0.elapsed().as_secs_f64();
        let changed = nodes.iter().any(|p| {
            let (a, b) = (a[&p.name], b[&p.name]);
            a.children != b.children || a.reparents != b.reparents
        });
        if changed || discovering {
            continue;
        }
        let periods = secs * 1000.0 / HEARTBEAT_MS;
        for p in &nodes {
            let (a, b) = (a[&p.name], b[&p.name]);
            let sent = b.heartbeats_sent - a.heartbeats_sent;
            let most = b.children * (periods + 2.0);
            assert!(
                sent <= most,
                "{} sent {sent} heartbeats to {} children in {secs:.2} s: more than one per child per {HEARTBEAT_MS} ms ({most})",
                p.name,
                b.children
            );
        }
        for r in &relays {
            let (a, b) = (a[&r.name], b[&r.name]);
            let beats = b.heartbeats_received - a.heartbeats_received;
            let sent = b.link_sent - a.link_sent;
            let received = b.link_received - a.link_received;
            assert!(
                sent <= 1.5 * beats + 4.0,
                "{} sent {sent} datagrams to its parent for {beats} heartbeats: more than one acknowledgement each",
                r.name
            );
            assert!(
                received <= 1.5 * beats + 4.0,
                "{} received {received} datagrams from its parent for {beats} heartbeats",
                r.name
            );
            assert_eq!(
                b.link_mtu, jumbo,
                "{}'s parent link did not find loopback's jumbo datagrams",
                r.name
            );
        }
        break;
    }
    // The control plane's messages are counted by kind, as the simulator counts them.
    let mut answers = 0.0;
    let mut requests = 0.0;
    for p in &nodes {
        let m = metrics(&c, p).await;
        let kind = |k: &str| {
            metric_labelled(
                &m,
                "canopy_overlay_messages_total",
                &format!("kind=\"{k}\""),
            )
        };
        if p.name != "core" {
            assert!(
                kind("attach_request") >= 1.0,
                "{} sent no subscription",
                p.name
            );
            assert!(
                kind("sample_request") >= 4.0,
                "{} counted fewer sample requests than the samples it took",
                p.name
            );
        }
        answers += kind("attach_answer");
        requests += kind("attach_request");
    }
    assert!(
        answers >= RELAYS as f64 && answers <= requests,
        "{answers} subscription answers for {requests} subscriptions sent by {RELAYS} relays"
    );
}

/// Heartbeats a leaf waits for while its wake-ups are counted: 20 s at the default period.
const LEAF_BEATS: f64 = 40.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_leaf_wakes_about_once_per_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("core", "core");
    pki.issue("r0", "relay");
    // No shuffle or rebalance check inside the window: each is a new connection.
    let cfg = root.join("quiet.toml");
    std::fs::write(
        &cfg,
        "[overlay]\nshuffle_ms = 3600000\nrebalance_ms = 3600000\n",
    )
    .unwrap();
    let args = ["--config", cfg.to_str().unwrap()];
    let core = Proc::start(root, &pki, "core", true, &[], &args);
    let c = http();
    wait_leader(&c, &core).await;
    let (v, _) = put_random(&c, &core, 64 * 1024, 15).await;
    let leaf = Proc::start(root, &pki, "r0", false, &[core.quic], &args);
    wait_materialized(&c, &leaf, v).await;
    let pid = leaf.pid().expect("the relay runs");

    // The window is waited for on the core's counters, so that nothing but the heartbeats
    // (and the two reads of its own counters) reaches the leaf.
    let sent = |m: &str| metric_value(m, "canopy_heartbeats_sent_total").unwrap_or(0.0);
    let core_before = sent(&metrics(&c, &core).await);
    let a = counts(&c, &leaf).await;
    let woke_before = canopy::measure::voluntary_switches(pid).expect("the relay runs");
    wait_until(60, "the core to send 40 heartbeats", || async {
        sent(&metrics(&c, &core).await) >= core_before + LEAF_BEATS
    })
    .await;
    let woke = canopy::measure::voluntary_switches(pid).expect("the relay runs") - woke_before;
    let b = counts(&c, &leaf).await;
    let beats = b.heartbeats_received - a.heartbeats_received;
    assert_eq!(b.children, 0.0, "r0 is a leaf");
    assert_eq!(a.reparents, b.reparents, "r0 changed parent in the window");
    assert!(beats >= LEAF_BEATS - 2.0, "{beats} heartbeats received");
    // One wake-up per heartbeat (its acknowledgement leaves in the same turn), a timer
    // turn every 4 s of tokio's wheel, the metrics exporter's upkeep every 5 s, and the
    // read of the counters. With the keep-alive waking it too, it was about 2 per beat.
    let most = 1.5 * beats + 12.0;
    assert!(
        (woke as f64) <= most,
        "the idle leaf woke {woke} times for {beats} heartbeats (at most {most})"
    );
}
