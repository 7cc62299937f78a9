//! The guard on the simulator's agreement with a real cluster (`topology-sim/validate`).
//!
//! `results/validation.json` holds the figures of real runs (relay-node processes on
//! loopback) and the realistic-mode command that models each one. The test replays the
//! 100-relay, fan-out-8 model and checks it against the recorded real figures (depths,
//! attach and re-attach times, and the control-plane messages by kind up to the kill, as
//! `canopy_overlay_messages_total` counted them), so a change to the overlay or to the
//! model that moves the simulator away from the measured cluster fails in CI. It runs only
//! the simulator (about a hundred nodes for tens of virtual seconds): no processes, no
//! clocks, nothing that load can make flaky.

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use crate::sim::{self, JoinMode, Params};

    const RECORDED: &str = include_str!("../results/validation.json");

    /// Within `tol` (a fraction) of the real figure.
    fn near(real: f64, sim: f64, tol: f64) -> bool {
        (sim - real).abs() <= tol * real.abs()
    }

    fn run_of(relays: u64, fanout: u64) -> Value {
        let all: Value = serde_json::from_str(RECORDED).expect("validation.json parses");
        all["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .find(|r| r["relays"] == relays && r["fanout"] == fanout)
            .cloned()
            .unwrap_or_else(|| panic!("no recorded run for {relays} relays, fan-out {fanout}"))
    }

    /// The realistic-mode parameters the recorded run was modelled with.
    fn model(run: &Value) -> Params {
        let s = &run["sim"];
        let mut p = Params::new(
            s["nodes"].as_u64().unwrap() as u32,
            s["seed"].as_u64().unwrap(),
        );
        p.overlay.fanout = s["fanout"].as_u64().unwrap() as u32;
        p.overlay.choices = s["choices"].as_u64().unwrap() as usize;
        p.sample_rtt = s["sample_rtt"].as_bool().unwrap_or(false);
        p.join = JoinMode::Staggered;
        p.join_interval_ms = s["join_interval_ms"].as_u64().unwrap();
        p.latency_ms = s["latency_ms"].as_f64().unwrap();
        p.tick_ms = s["tick_ms"].as_u64().unwrap();
        p.detect_ms = s["detect_ms"].as_u64().unwrap();
        p.detect_jitter_ms = s["detect_jitter_ms"].as_u64().unwrap();
        p.child_detect_ms = s["child_detect_ms"].as_u64().unwrap();
        p.dead_target_ms = s["dead_target_ms"].as_u64().unwrap();
        p.sync_ms = s["sync_ms"].as_u64().unwrap();
        p.kill = s["kill"].as_f64().unwrap();
        p.kill_at_s = s["kill_at_s"].as_f64().unwrap();
        p.kill_nodes = s["kill_nodes"].as_array().map_or_else(Vec::new, |ids| {
            ids.iter().map(|n| n.as_u64().unwrap() as u32).collect()
        });
        p.duration_s = s["duration_s"].as_f64().unwrap_or(0.0);
        p
    }

    #[test]
    fn the_model_of_the_100_relay_cluster_agrees_with_the_recorded_run() {
        let run = run_of(100, 8);
        let real = &run["real"];
        let p = model(&run);
        // The tick, detection and connect timeouts are the real config's.
        let stream = canopy::config::StreamConfig::default();
        assert_eq!(p.detect_ms, stream.parent_timeout_ms);
        assert_eq!(p.detect_jitter_ms, stream.heartbeat_ms);
        assert_eq!(p.child_detect_ms, stream.idle_timeout_ms);
        let r = sim::run(&p).unwrap();
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.unattached, 0);

        // Depth: the mean within 10 %, and at most a fifth of the nodes at another depth
        // than in the real tree (after the kill and the re-attachment, as in the real run).
        let hist = |v: &Value| -> Vec<(u32, u64)> {
            v.as_object()
                .unwrap()
                .iter()
                .map(|(d, c)| (d.parse().unwrap(), c.as_u64().unwrap()))
                .collect()
        };
        let real_hist = hist(&real["depth_histogram"]);
        let total: u64 = real_hist.iter().map(|(_, c)| c).sum();
        assert_eq!(total, r.live_nodes);
        let mut moved = 0;
        for d in 0..=r.max_depth.max(real["max_depth"].as_u64().unwrap() as u32) {
            let a = real_hist
                .iter()
                .find(|(x, _)| *x == d)
                .map_or(0, |(_, c)| *c);
            let b = r.depth_histogram.get(&d).copied().unwrap_or(0);
            moved += a.abs_diff(b);
        }
        assert!(
            moved / 2 * 5 <= total,
            "{real_hist:?} vs {:?}",
            r.depth_histogram
        );
        // The real tree's deepest level may hold one relay that re-attached a level lower.
        assert!(u64::from(r.max_depth).abs_diff(real["max_depth"].as_u64().unwrap()) <= 1);
        assert!(near(
            real["mean_depth"].as_f64().unwrap(),
            r.mean_depth,
            0.1
        ));

        // Time to attach (the per-hop delay was fitted to its median) and to attach all.
        assert!(near(
            real["attach_ms"]["p50"].as_f64().unwrap(),
            r.time_to_attach.p50_ms,
            0.2
        ));
        assert!(near(
            real["attach_all_s"].as_f64().unwrap(),
            r.all_attached_ms / 1000.0,
            0.2
        ));
        // Re-attaching after the kill: detection dominates, within 20 %.
        if let Some(real_reattach) = real["reattach_ms"]["p50"].as_f64() {
            assert!(
                near(real_reattach, r.time_to_reattach.p50_ms, 0.2),
                "{real_reattach} vs {:?}",
                r.time_to_reattach
            );
        }
        // Messages from the start to the kill, as the relays counted them
        // (canopy_overlay_messages_total): each kind within 20 % (or 5 messages, for the
        // kinds a run sends a handful of), and the total within 20 %.
        let before = r.messages_before_kill.as_ref().expect("a kill run");
        let real_msgs = &real["messages_before_kill"];
        let sim_kinds = [
            ("sample_request", before.sample_request),
            ("sample_answer", before.sample_answer),
            ("attach_request", before.attach_request),
            ("attach_answer", before.attach_answer),
            ("detach", before.detach),
            ("path_update", before.path_update),
            ("child_report", before.child_report),
            ("total", before.total()),
        ];
        for (kind, sim_count) in sim_kinds {
            let real_count = real_msgs[kind]
                .as_f64()
                .unwrap_or_else(|| panic!("no recorded count of {kind}"));
            let sim_count = sim_count as f64;
            let slack = if kind == "total" { 0.0 } else { 5.0 };
            assert!(
                near(real_count, sim_count, 0.2) || (sim_count - real_count).abs() <= slack,
                "{kind}: {real_count} real vs {sim_count} simulated"
            );
        }
    }
}
