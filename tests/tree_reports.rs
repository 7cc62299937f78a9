//! The parent side of the tree runs through the overlay in the real binaries: children report
//! their free slots, subtree height and room up their subscription streams, each parent's
//! `Overlay::admit` decides and refers from those reports, and `/v1/status` shows the result.

mod common;

use common::*;
use serde_json::Value;

/// Certificates for a core and three relays, r1 to r3.
fn chain_pki(root: &std::path::Path) -> Pki {
    Pki::with(
        root,
        &[
            ("core", "core"),
            ("r1", "relay"),
            ("r2", "relay"),
            ("r3", "relay"),
        ],
    )
}

async fn size(c: &reqwest::Client, p: &Proc) -> Option<u64> {
    status(c, p).await?["subtree_size"].as_u64()
}

async fn subtree(c: &reqwest::Client, p: &Proc) -> Option<(u64, u64, Option<u64>)> {
    let s: Value = status(c, p).await?;
    Some((
        s["subtree_height"].as_u64()?,
        s["room"].as_u64()?,
        s["depth"].as_u64(),
    ))
}

/// A chain at fan-out 1 (core -> r1 -> r2 -> r3): every node's subtree height and room come
/// from its child's reports, so the core knows the chain is three deep and its shallowest
/// free slot three levels down; a joiner sent to the core is referred down the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_climb_the_tree_and_referrals_follow_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = chain_pki(root);
    let one = ["--fanout", "1"];
    let core = Proc::start(root, &pki, "core", true, &[], &one);
    let c = http();
    wait_leader(&c, &core).await;
    let (v0, _) = put_random(&c, &core, 50_000, 3).await;
    let r1 = Proc::start(root, &pki, "r1", false, &[core.quic], &one);
    wait_materialized(&c, &r1, v0).await;
    let r2 = Proc::start(root, &pki, "r2", false, &[core.quic], &one);
    wait_materialized(&c, &r2, v0).await;
    let r3 = Proc::start(root, &pki, "r3", false, &[core.quic], &one);
    wait_materialized(&c, &r3, v0).await;

    let expect = [
        (&core, 3, 3, 0),
        (&r1, 2, 2, 1),
        (&r2, 1, 1, 2),
        (&r3, 0, 0, 3),
    ];
    wait_until(60, "every node's subtree height and room", || async {
        for (p, height, room, depth) in expect {
            if subtree(&c, p).await != Some((height, room, Some(depth))) {
                return false;
            }
        }
        true
    })
    .await;
    let s = status(&c, &r3).await.unwrap();
    assert_eq!(
        s["root_path"],
        serde_json::json!(["core", "r1", "r2", "r3"])
    );
    // Without zones nobody counts sizes (no report changes for them).
    assert_eq!(size(&c, &core).await, Some(0));

    // r3 leaves: the reports climb again, and the core's room shrinks to two levels.
    drop(r3);
    wait_until(60, "the reports after r3 left", || async {
        subtree(&c, &core).await == Some((2, 2, Some(0)))
            && subtree(&c, &r2).await == Some((0, 0, Some(2)))
    })
    .await;
}

/// Zones reach the overlay from the configuration: a relay whose zone is one parent's ends
/// up under that parent when another, in another zone, is as shallow (joining, or moving
/// later for latency at no cost in depth).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_settles_under_the_parent_of_its_zone() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::with(
        root,
        &[
            ("core", "core"),
            ("ra", "relay"),
            ("rb", "relay"),
            ("kid", "relay"),
        ],
    );
    let core = Proc::start(root, &pki, "core", true, &[], &["--fanout", "2"]);
    let c = http();
    wait_leader(&c, &core).await;
    let (v0, _) = put_random(&c, &core, 50_000, 4).await;
    let ra = Proc::start(root, &pki, "ra", false, &[core.quic], &["--zone", "a"]);
    wait_materialized(&c, &ra, v0).await;
    let rb = Proc::start(root, &pki, "rb", false, &[core.quic], &["--zone", "b"]);
    wait_materialized(&c, &rb, v0).await;
    let kid = Proc::start(root, &pki, "kid", false, &[core.quic], &["--zone", "b"]);
    wait_materialized(&c, &kid, v0).await;
    wait_until(90, "kid under rb, the parent of its zone", || async {
        status(&c, &kid)
            .await
            .is_some_and(|s| s["parent"] == "rb" && s["depth"] == 2)
    })
    .await;
}

/// With zones and `fill_zones_to_bound`, subtree sizes climb the same chain over the real
/// subscription streams: the core counts the whole tree, and a relay that leaves takes its
/// count with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subtree_sizes_climb_to_the_core_when_zones_fill_to_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = chain_pki(root);
    let config = root.join("overlay.toml");
    std::fs::write(&config, "[overlay]\nfill_zones_to_bound = true\n").unwrap();
    let config = config.to_str().unwrap();
    let args = ["--fanout", "1", "--zone", "a", "--config", config];
    let core = Proc::start(root, &pki, "core", true, &[], &args);
    let c = http();
    wait_leader(&c, &core).await;
    let (v0, _) = put_random(&c, &core, 50_000, 5).await;
    let mut relays = Vec::new();
    for name in ["r1", "r2", "r3"] {
        let r = Proc::start(root, &pki, name, false, &[core.quic], &args);
        wait_materialized(&c, &r, v0).await;
        relays.push(r);
    }
    wait_until(60, "every node's subtree size", || async {
        let mut sizes = vec![size(&c, &core).await];
        for r in &relays {
            sizes.push(size(&c, r).await);
        }
        sizes == [Some(4), Some(3), Some(2), Some(1)]
    })
    .await;
    drop(relays.pop());
    wait_until(60, "the sizes after r3 left", || async {
        size(&c, &core).await == Some(3) && size(&c, &relays[1]).await == Some(1)
    })
    .await;
}

/// `--zone-shares` reaches a core's overlay: at fan-out 2 with shares for zones a and b, the
/// core keeps one slot for each. A second relay of zone a is referred below the first, and
/// the first relay of zone b, arriving last, still finds its slot at depth 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_keeps_a_slot_for_each_zone_of_its_shares() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::with(
        root,
        &[
            ("core", "core"),
            ("a1", "relay"),
            ("a2", "relay"),
            ("b1", "relay"),
        ],
    );
    let core = Proc::start(
        root,
        &pki,
        "core",
        true,
        &[],
        &["--fanout", "2", "--zone", "a", "--zone-shares", "a,b"],
    );
    let c = http();
    wait_leader(&c, &core).await;
    let held = |s: &Value| s["held_for"].clone();
    assert_eq!(
        held(&status(&c, &core).await.unwrap()),
        serde_json::json!(["a", "b"])
    );
    let (v0, _) = put_random(&c, &core, 50_000, 5).await;
    let a1 = Proc::start(root, &pki, "a1", false, &[core.quic], &["--zone", "a"]);
    wait_materialized(&c, &a1, v0).await;
    let a2 = Proc::start(root, &pki, "a2", false, &[core.quic], &["--zone", "a"]);
    wait_materialized(&c, &a2, v0).await;
    let s = status(&c, &a2).await.unwrap();
    assert_eq!(
        (&s["parent"], &s["depth"]),
        (&Value::from("a1"), &Value::from(2))
    );
    assert_eq!(
        held(&status(&c, &core).await.unwrap()),
        serde_json::json!(["b"])
    );
    let b1 = Proc::start(root, &pki, "b1", false, &[core.quic], &["--zone", "b"]);
    wait_materialized(&c, &b1, v0).await;
    wait_until(60, "b1 on the slot the core held for zone b", || async {
        status(&c, &b1)
            .await
            .is_some_and(|s| s["parent"] == "core" && s["depth"] == 1)
    })
    .await;
    let s = status(&c, &core).await.unwrap();
    assert_eq!(held(&s), serde_json::json!([]));
    assert_eq!(s["children"], serde_json::json!(["a1", "b1"]));
    drop((a2, a1));
}
