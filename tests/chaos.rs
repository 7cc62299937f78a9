//! A fixed-seed chaos minute over the real binaries (issue #15): 3 core and 8 relay processes
//! behind the fault proxy, four writers through random nodes, and a seeded minute of kills,
//! pauses, partitions, packet loss, delay, duplication, reordering, throttling and a full disk.
//!
//! The checker's properties on acknowledged writes, versions and roots are the benchmark's,
//! unrelaxed. Only the times are generous (convergence limit, write and start timeouts), so a
//! slow or loaded machine cannot fail the test for timing alone; `bench/chaos` judges
//! convergence against the 5 s goal.

use std::time::Duration;

use canopy_chaos::plan::FaultKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_chaos_minute_loses_no_acknowledged_write() {
    let bins = canopy_chaos::Bins {
        canopy: env!("CARGO_BIN_EXE_canopy").into(),
        core_node: env!("CARGO_BIN_EXE_core-node").into(),
        relay_node: env!("CARGO_BIN_EXE_relay-node").into(),
    };
    let mut cfg = canopy_chaos::Config::new(15, bins);
    cfg.duration = Duration::from_secs(60);
    cfg.relays = 8;
    // Three cores hold six children at fan-out 2, so some of the eight relays are inner ones.
    cfg.fanout = 2;
    cfg.convergence_limit = Duration::from_secs(120);
    cfg.converge_timeout = Duration::from_secs(300);
    cfg.write_timeout = Duration::from_secs(10);
    cfg.start_timeout = Duration::from_secs(300);
    let r = canopy_chaos::run(cfg).await.expect("the chaos run");
    let json = serde_json::to_string_pretty(&r).unwrap();
    eprintln!(
        "chaos seed {}: {} faults {:?}, {} acked, {} failed, convergence {:?} s",
        r.seed, r.verdict, r.faults, r.check.acked, r.check.failed, r.max_convergence_s
    );
    assert_eq!(r.verdict, "pass", "{json}");
    let c = &r.check;
    assert_eq!(
        (c.lost, c.twice, c.regressions, c.foreign_roots),
        (0, 0, 0, 0)
    );
    assert!(c.acked > 0, "no write was acknowledged: {json}");
    let made = |k: FaultKind| r.faults.get(&k.name()).copied().unwrap_or(0);
    for k in [
        FaultKind::KillLeader,
        FaultKind::KillFollower,
        FaultKind::PartitionLeaderAlone,
    ] {
        assert!(made(k) > 0, "no {} fault was made: {json}", k.name());
    }
    let planned: u64 = r.faults.values().chain(r.faults_skipped.values()).sum();
    assert!(planned >= 20, "{json}");
}
