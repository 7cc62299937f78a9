//! The runtime feeds QUIC's RTT to the overlay: with a delay injected on one link (a UDP
//! proxy between the nodes, as in the chaos runs), a joiner that sampled two equally shallow
//! parents picks the nearer, over the one its other ranks would pick.

mod common;

use canopy_chaos::proxy::{LinkRule, Proxy};
use common::*;

/// Node i listens on `backend[i]` and advertises the proxy's `front(i)`, so every packet
/// between two nodes passes the proxy. The kid starts from ra and rb, samples both (the
/// runtime hands the overlay each sample's QUIC RTT) and picks between them: ra (fan-out 8)
/// would win the tie of depth on its free slots over rb (fan-out 2), but 200 ms each way
/// between the kid and ra make rb the nearer. Without the RTT the kid would pick ra (or try
/// the full core first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_picks_the_parent_with_the_lower_quic_rtt() {
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
    let backend: Vec<_> = (0..4).map(|_| free_udp()).collect();
    let proxy = Proxy::start(backend.clone(), 1).await.unwrap();
    let (core_i, ra_i, rb_i, kid_i) = (0, 1, 2, 3);
    proxy.set(
        1,
        vec![(kid_i, ra_i), (ra_i, kid_i)],
        LinkRule {
            delay_ms: 200,
            ..LinkRule::default()
        },
    );
    let front = |i: usize| proxy.front(i).to_string();
    // Three choices: the kid compares every place it learns (ra, rb and the full core), not
    // two drawn at random.
    let config = root.join("overlay.toml");
    std::fs::write(&config, "[overlay]\nchoices = 3\n").unwrap();
    let config = config.to_str().unwrap();

    let core = Proc::start_at(
        root,
        &pki,
        "core",
        true,
        backend[core_i],
        &["--init", "--advertise", &front(core_i), "--fanout", "2"],
    );
    let c = http();
    wait_leader(&c, &core).await;
    let (v0, _) = put_random(&c, &core, 50_000, 4).await;
    let relay = |name: &str, i: usize, fanout: &str, join: &str| {
        Proc::start_at(
            root,
            &pki,
            name,
            false,
            backend[i],
            &[
                "--advertise",
                &front(i),
                "--join",
                join,
                "--fanout",
                fanout,
                "--config",
                config,
            ],
        )
    };
    let ra = relay("ra", ra_i, "8", &front(core_i));
    wait_materialized(&c, &ra, v0).await;
    let rb = relay("rb", rb_i, "2", &front(core_i));
    wait_materialized(&c, &rb, v0).await;
    for p in [&ra, &rb] {
        wait_until(30, "ra and rb under the core", || async {
            status(&c, p).await.is_some_and(|s| s["depth"] == 1)
        })
        .await;
    }
    let kid = relay(
        "kid",
        kid_i,
        "8",
        &format!("{},{}", front(ra_i), front(rb_i)),
    );
    wait_materialized(&c, &kid, v0).await;
    let s = status(&c, &kid).await.expect("kid's status");
    assert_eq!(s["parent"], "rb", "kid's status: {s}");
    assert_eq!(s["depth"], 2, "kid's status: {s}");
    assert!(
        proxy.stats().delayed > 0,
        "the proxy delayed the kid's packets to ra"
    );
    drop(proxy);
}
