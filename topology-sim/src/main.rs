//! Drives Canopy's overlay state machine (`canopy::overlay::Overlay`, the same code the relay
//! runtime runs) for every node of a large tree on a virtual clock, and reports the tree's
//! shape, how fast nodes attach, re-parents and message counts.
//!
//! The engine (event queue, latency model, faults, invariants) is in `sim.rs`. A run is a
//! function of its parameters and seed: every node has its own ChaCha8 stream derived from
//! the seed and its id, the engine has stream 0, and events are ordered by (time, sequence
//! number). The seed and a replay command are printed with every report.

#![recursion_limit = "256"]

mod sim;
mod sweep;
mod validation;

use std::io::Write;

use anyhow::{bail, Context, Result};
use canopy::overlay::OverlayConfig;
use clap::Parser;
use serde_json::{json, Value};

use sim::{JoinMode, Params, Report, Spread};

/// The relay runtime's overlay tick: none on an interval; `overlay_driver::run` ticks at
/// the overlay's own deadline (`Overlay::poll_timeout`, at most every 10 ms), which is
/// what `--tick-ms 0` does.
const REALISTIC_TICK_MS: u64 = 0;

#[derive(Parser, Debug)]
#[command(
    name = "topology-sim",
    about = "Run Canopy's overlay on every node of a simulated tree and report its shape"
)]
struct Args {
    /// Nodes at the start, the core nodes included.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    nodes: u32,
    /// Core nodes (roots at depth 0; they never fail).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=5))]
    cores: u32,
    /// Most children one node serves.
    #[arg(long, default_value_t = OverlayConfig::default().fanout, value_parser = clap::value_parser!(u32).range(1..))]
    fanout: u32,
    /// Candidates compared per parent choice (power of d choices).
    #[arg(long, default_value_t = OverlayConfig::default().choices as u64, value_parser = clap::value_parser!(u64).range(1..))]
    choices: u64,
    /// Mean period of rebalance checks (ms; default: the overlay's).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    rebalance_ms: Option<u64>,
    /// Seed of the run (default: random; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// How the relays join: all at t=0, or one every --join-interval-ms.
    #[arg(long, value_enum, default_value_t = JoinMode::All)]
    join: JoinMode,
    /// Virtual time between two joins with --join staggered, in milliseconds.
    #[arg(long, default_value_t = 10)]
    join_interval_ms: u64,
    /// Mean one-way link latency (ms) inside a zone; each link is fixed in
    /// [mean/2, 3·mean/2].
    #[arg(long, default_value_t = 0.5)]
    latency_ms: f64,
    /// Zones the relays are spread over at random (the cores are in zone 0).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    zones: u32,
    /// Mean one-way latency of a link between two zones (ms).
    #[arg(long, default_value_t = 40.0)]
    cross_zone_ms: f64,
    /// Overlays are told neither their zone nor RTTs: parent choice by depth alone (the
    /// baseline for --zones).
    #[arg(long)]
    depth_only: bool,
    /// Every sample hands the sampler the link's RTT before its answer, zones or not, as
    /// the runtime does with QUIC's estimate.
    #[arg(long)]
    sample_rtt: bool,
    /// Levels of depth a nearer candidate may lose and still win (the overlay's
    /// latency_slack).
    #[arg(long)]
    latency_slack: Option<u32>,
    /// With zones, nodes report subtree sizes and fill their zones down to the depth bound
    /// (the overlay's fill_zones_to_bound).
    #[arg(long)]
    fill_zones_to_bound: bool,
    /// With zones, the cores keep a share of their slots for each zone (the core-node's
    /// `zone_shares`, listing every zone).
    #[arg(long)]
    zone_shares: bool,
    /// Period of each node's overlay tick (ms; phases are staggered), as a runtime that ticks
    /// on an interval; 0 ticks each node exactly at its overlay's next deadline.
    #[arg(long, default_value_t = 0)]
    tick_ms: u64,
    /// How long until a child notices its parent died, ms (and the default of the next two).
    #[arg(long, default_value_t = 1000)]
    detect_ms: u64,
    /// A child notices its dead parent up to this much sooner than --detect-ms (it counts
    /// from the parent's last heartbeat), ms.
    #[arg(long, default_value_t = 0)]
    detect_jitter_ms: u64,
    /// How long until a parent notices a dead child and frees its slot, ms.
    #[arg(long)]
    child_detect_ms: Option<u64>,
    /// How long a sample or an attach to a dead node takes to fail, ms.
    #[arg(long)]
    dead_target_ms: Option<u64>,
    /// How long a relay takes to sync after attaching without a parent before it serves
    /// children (its subscribers wait), ms.
    #[arg(long, default_value_t = 0)]
    sync_ms: u64,
    /// The real runtime's timing: ticks at the overlay's deadline, a dead parent noticed
    /// parent_timeout_ms after its last heartbeat (so up to heartbeat_ms sooner after its
    /// death), a dead child after the QUIC idle_timeout_ms, a dead target after the
    /// connect/probe timeout (all from the default config), and an RTT from every sample
    /// (--sample-rtt); overrides --tick-ms, --detect-ms, --detect-jitter-ms,
    /// --child-detect-ms and --dead-target-ms.
    #[arg(long)]
    realistic: bool,
    /// Fraction of the live relays killed at --kill-at.
    #[arg(long, default_value_t = 0.0)]
    kill: f64,
    /// When --kill strikes, in virtual seconds.
    #[arg(long, default_value_t = 5.0)]
    kill_at: f64,
    /// The relays killed at --kill-at, by id (the k-th relay to join is --cores + k),
    /// instead of a seeded draw of --kill of them.
    #[arg(long, value_delimiter = ',')]
    kill_nodes: Vec<u32>,
    /// Fraction of the relays that die and are replaced by new joiners per virtual minute,
    /// until --duration.
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Virtual seconds to run at least (and to churn); the run then stops as soon as every
    /// live node is attached.
    #[arg(long, default_value_t = 0.0)]
    duration: f64,
    /// Virtual seconds after the faults stop within which every live node must be attached.
    #[arg(long, default_value_t = 60.0)]
    settle: f64,
    /// Stop after this many events and report what was reached (0: no limit).
    #[arg(long, default_value_t = 20_000_000)]
    max_events: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

impl Args {
    fn params(&self, seed: u64) -> Params {
        let mut p = self.base_params(seed);
        if self.realistic {
            let stream = canopy::config::StreamConfig::default();
            p.tick_ms = REALISTIC_TICK_MS;
            p.detect_ms = stream.parent_timeout_ms;
            p.detect_jitter_ms = stream.heartbeat_ms;
            p.child_detect_ms = stream.idle_timeout_ms;
            p.dead_target_ms = p.overlay.probe_timeout_ms;
        }
        p
    }

    fn base_params(&self, seed: u64) -> Params {
        let mut overlay = OverlayConfig {
            fanout: self.fanout,
            choices: self.choices as usize,
            ..OverlayConfig::default()
        };
        if let Some(ms) = self.rebalance_ms {
            overlay.rebalance_ms = ms;
        }
        if let Some(slack) = self.latency_slack {
            overlay.latency_slack = slack;
        }
        overlay.fill_zones_to_bound = self.fill_zones_to_bound;
        Params {
            nodes: self.nodes,
            cores: self.cores,
            overlay,
            seed,
            join: self.join,
            join_interval_ms: self.join_interval_ms,
            latency_ms: self.latency_ms,
            zones: self.zones,
            cross_zone_ms: self.cross_zone_ms,
            zone_shares: self.zone_shares,
            latency_aware: !self.depth_only,
            sample_rtt: self.sample_rtt || self.realistic,
            tick_ms: self.tick_ms,
            detect_ms: self.detect_ms,
            detect_jitter_ms: self.detect_jitter_ms,
            child_detect_ms: self.child_detect_ms.unwrap_or(self.detect_ms),
            dead_target_ms: self.dead_target_ms.unwrap_or(self.detect_ms),
            sync_ms: self.sync_ms,
            kill: self.kill,
            kill_at_s: self.kill_at,
            kill_nodes: self.kill_nodes.clone(),
            churn: self.churn,
            duration_s: self.duration,
            settle_s: self.settle,
            max_events: self.max_events,
        }
    }
}

fn spread_json(s: &Spread) -> Value {
    json!({ "count": s.count, "p50": s.p50_ms, "p99": s.p99_ms, "max": s.max_ms })
}

fn to_json(r: &Report) -> Value {
    let p = &r.params;
    let histogram: Vec<Value> = r
        .depth_histogram
        .iter()
        .map(|(depth, nodes)| json!({ "depth": depth, "nodes": nodes }))
        .collect();
    let kinds = |m: &sim::Messages| {
        json!({
            "total": m.total(),
            "sample_request": m.sample_request,
            "sample_answer": m.sample_answer,
            "attach_request": m.attach_request,
            "attach_answer": m.attach_answer,
            "detach": m.detach,
            "path_update": m.path_update,
            "child_report": m.child_report,
        })
    };
    let mut messages = kinds(&r.messages);
    messages["per_node"] = json!(r.messages_per_node());
    json!({
        "seed": p.seed,
        "nodes": p.nodes,
        "cores": p.cores,
        "fanout": p.overlay.fanout,
        "choices": p.overlay.choices,
        "join": p.join.label(),
        "join_interval_ms": p.join_interval_ms,
        "latency_ms": p.latency_ms,
        "zones": p.zones,
        "cross_zone_ms": p.cross_zone_ms,
        "zone_shares": p.zone_shares,
        "latency_aware": p.latency_aware,
        "sample_rtt": p.sample_rtt,
        "latency_slack": p.overlay.latency_slack,
        "root_latency_ms": spread_json(&r.root_latency),
        "cross_zone_edges": r.cross_zone_edges,
        "min_cross_zone_edges": r.min_cross_zone_edges,
        "detect_ms": p.detect_ms,
        "child_detect_ms": p.child_detect_ms,
        "detect_jitter_ms": p.detect_jitter_ms,
        "dead_target_ms": p.dead_target_ms,
        "sync_ms": p.sync_ms,
        "tick_ms": p.tick_ms,
        "kill": p.kill,
        "kill_at_s": p.kill_at_s,
        "kill_nodes": p.kill_nodes,
        "churn": p.churn,
        "duration_s": p.duration_s,
        "settle_s": p.settle_s,
        "max_events": p.max_events,
        "live_nodes": r.live_nodes,
        "nodes_ever": r.nodes_ever,
        "killed": r.killed,
        "churned": r.churned,
        "virtual_time_ms": r.virtual_time_ms,
        "events": r.events,
        "max_depth": r.max_depth,
        "mean_depth": r.mean_depth,
        "depth_histogram": histogram,
        "max_children": r.max_children,
        "internal_nodes": r.internal_nodes,
        "mean_fanout_internal": r.mean_fanout_internal,
        "cycles": r.cycles,
        "unattached": r.unattached,
        "time_to_attach_ms": spread_json(&r.time_to_attach),
        "time_to_reattach_ms": spread_json(&r.time_to_reattach),
        "all_attached_ms": r.all_attached_ms,
        "reparents": r.reparents,
        "overlay_reparents": r.overlay_reparents,
        "messages": messages,
        "messages_before_kill": r.messages_before_kill.as_ref().map(kinds),
        "cycle_detaches": r.cycle_detaches,
        "path_cycles": r.path_cycles,
        "transient_cycles": r.transient_cycles,
        "path_updates_applied": r.path_updates_applied,
        "violations": r.violations,
        "replay": p.replay(),
    })
}

fn to_table(r: &Report) -> String {
    let p = &r.params;
    let mut out = format!(
        "topology-sim: {} nodes ({} core), fan-out {}, {} choices, join {}, seed {}\nreplay: {}\n\n",
        p.nodes,
        p.cores,
        p.overlay.fanout,
        p.overlay.choices,
        p.join.label(),
        p.seed,
        p.replay()
    );
    let ms = |s: &Spread| {
        if s.count == 0 {
            "-".to_string()
        } else {
            format!("{:.1} / {:.1} / {:.1}", s.p50_ms, s.p99_ms, s.max_ms)
        }
    };
    let m = &r.messages;
    let rows: Vec<(&str, String)> = vec![
        ("nodes", p.nodes.to_string()),
        ("live_nodes", r.live_nodes.to_string()),
        ("killed / churned", format!("{} / {}", r.killed, r.churned)),
        ("max_depth", r.max_depth.to_string()),
        ("mean_depth", format!("{:.3}", r.mean_depth)),
        ("max_children", r.max_children.to_string()),
        ("internal_nodes", r.internal_nodes.to_string()),
        (
            "mean_fanout_internal",
            format!("{:.3}", r.mean_fanout_internal),
        ),
        ("cycles", r.cycles.to_string()),
        ("unattached", r.unattached.to_string()),
        ("attach ms p50/p99/max", ms(&r.time_to_attach)),
        ("reattach ms p50/p99/max", ms(&r.time_to_reattach)),
        ("root latency p50/p99/max", ms(&r.root_latency)),
        (
            "cross-zone edges (min)",
            format!("{} ({})", r.cross_zone_edges, r.min_cross_zone_edges),
        ),
        (
            "reparents j/pl/rb",
            format!(
                "{} / {} / {}",
                r.reparents["join"], r.reparents["parent_lost"], r.reparents["rebalance"]
            ),
        ),
        (
            "overlay-counted j/pl/rb",
            format!(
                "{} / {} / {}",
                r.overlay_reparents["join"],
                r.overlay_reparents["parent_lost"],
                r.overlay_reparents["rebalance"]
            ),
        ),
        ("messages", m.total().to_string()),
        ("messages per node", format!("{:.2}", r.messages_per_node())),
        (
            "  sample req/answer",
            format!("{} / {}", m.sample_request, m.sample_answer),
        ),
        (
            "  attach req/answer",
            format!("{} / {}", m.attach_request, m.attach_answer),
        ),
        (
            "  detach / path update",
            format!("{} / {}", m.detach, m.path_update),
        ),
        ("  child report", m.child_report.to_string()),
        ("path_updates_applied", r.path_updates_applied.to_string()),
        (
            "detaches / path cycles / transient",
            format!(
                "{} / {} / {}",
                r.cycle_detaches, r.path_cycles, r.transient_cycles
            ),
        ),
        ("virtual_time_ms", format!("{:.3}", r.virtual_time_ms)),
        ("events", r.events.to_string()),
    ];
    for (name, value) in rows {
        out.push_str(&format!("{name:<26}{value:>24}\n"));
    }
    out.push_str(&format!("\n{:<7}{:>10}{:>9}\n", "depth", "nodes", "share"));
    let widest = r.depth_histogram.values().copied().max().unwrap_or(1);
    let total: u64 = r.depth_histogram.values().sum();
    for (depth, &count) in &r.depth_histogram {
        let share = 100.0 * count as f64 / total.max(1) as f64;
        let bar = "#".repeat(((count * 40).div_ceil(widest)) as usize);
        out.push_str(&format!("{depth:<7}{count:>10}{share:>8.2}%  {bar}\n"));
    }
    if r.violations.is_empty() {
        out.push_str("\ninvariants: all held\n");
    } else {
        out.push('\n');
        for v in &r.violations {
            out.push_str(&format!("VIOLATED: {v}\n"));
        }
    }
    out
}

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("sweep") {
        return sweep::main(std::env::args().skip(1));
    }
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    let params = args.params(seed);
    let report = sim::run(&params).with_context(|| format!("seed {seed}"))?;
    let text = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&to_json(&report))?)
    } else {
        to_table(&report)
    };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        written => written.context("writing the report")?,
    }
    if !report.violations.is_empty() {
        bail!(
            "{} invariant violation(s); replay: {}",
            report.violations.len(),
            params.replay()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn args(extra: &[&str]) -> Args {
        Args::try_parse_from(["topology-sim"].iter().chain(extra)).unwrap()
    }

    #[test]
    fn cli_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn the_replay_command_parses_back_to_the_same_run() {
        let a = args(&[
            "--nodes",
            "300",
            "--cores",
            "3",
            "--fanout",
            "4",
            "--choices",
            "3",
            "--join",
            "staggered",
            "--join-interval-ms",
            "5",
            "--kill",
            "0.1",
            "--kill-at",
            "2.5",
            "--kill-nodes",
            "5,7",
            "--sample-rtt",
            "--churn",
            "0.05",
            "--duration",
            "20",
            "--rebalance-ms",
            "3000",
            "--latency-ms",
            "1.5",
            "--detect-ms",
            "700",
            "--settle",
            "40",
            "--tick-ms",
            "100",
        ]);
        let p = a.params(77);
        let line = p.replay();
        let words: Vec<&str> = line.split_whitespace().collect();
        let back = Args::try_parse_from(words).unwrap().params(77);
        assert_eq!(format!("{p:?}"), format!("{back:?}"));
    }

    #[test]
    fn the_same_seed_gives_the_same_json() {
        let run = |seed: u64| {
            let p = args(&[
                "--nodes",
                "400",
                "--cores",
                "2",
                "--fanout",
                "4",
                "--kill",
                "0.1",
                "--kill-at",
                "2",
                "--settle",
                "5",
                "--max-events",
                "1000000",
            ])
            .params(seed);
            to_json(&sim::run(&p).unwrap())
        };
        let a = run(42);
        assert_eq!(a.to_string(), run(42).to_string());
        assert_eq!(a["seed"], 42);
        assert_eq!(a["nodes"], 400);
        for key in [
            "max_depth",
            "mean_depth",
            "max_children",
            "cycles",
            "unattached",
            "depth_histogram",
            "time_to_attach_ms",
            "time_to_reattach_ms",
            "reparents",
            "messages",
            "virtual_time_ms",
            "events",
            "replay",
        ] {
            assert!(!a[key].is_null(), "{key} missing");
        }
        for key in ["p50", "p99", "max"] {
            assert!(a["time_to_attach_ms"][key].as_f64().unwrap() > 0.0);
        }
        assert!(a["messages"]["per_node"].as_f64().unwrap() > 0.0);
        assert_eq!(a["killed"], 40);
        assert_ne!(a.to_string(), run(43).to_string());
    }

    #[test]
    fn a_kill_run_reattaches_everyone() {
        for (seed, cores) in [(1u64, 1u32), (2, 3)] {
            let p = args(&[
                "--nodes",
                "3000",
                "--cores",
                &cores.to_string(),
                "--kill",
                "0.2",
                "--kill-at",
                "5",
                "--settle",
                "30",
            ])
            .params(seed);
            let r = sim::run(&p).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(r.violations.is_empty(), "{:?}", r.violations);
            assert_eq!(r.killed, (f64::from(3000 - cores) * 0.2).round() as u64);
            assert_eq!(r.live_nodes, 3000 - r.killed);
            assert_eq!(r.unattached, 0);
            assert_eq!(r.cycles, 0);
            assert_eq!(r.depth_histogram.values().sum::<u64>(), r.live_nodes);
            assert!(r.reparents["parent_lost"] > 0);
            assert!(r.time_to_reattach.count > 0);
            // Orphans notice after --detect-ms and then need a few round trips.
            assert!(r.time_to_reattach.p50_ms >= 1000.0);
            assert!(r.virtual_time_ms > 5000.0);
            assert!(r.virtual_time_ms < 35_000.0, "{}", r.virtual_time_ms);
        }
    }

    /// ceil(log_k(n)): the depth of the deepest node in a perfectly packed tree is at most
    /// this.
    fn log_ceil(n: u32, k: u32) -> u32 {
        let mut depth = 0;
        let mut reach = 1u64;
        let mut level = 1u64;
        while reach < u64::from(n) {
            level *= u64::from(k);
            reach += level;
            depth += 1;
        }
        depth
    }

    #[test]
    fn log_ceil_is_the_packed_depth() {
        assert_eq!(log_ceil(1, 8), 0);
        assert_eq!(log_ceil(9, 8), 1);
        assert_eq!(log_ceil(10, 8), 2);
        assert_eq!(log_ceil(4681, 8), 4);
        assert_eq!(log_ceil(4682, 8), 5);
    }

    #[test]
    fn depth_stays_near_log_k_of_n() {
        for (nodes, fanout) in [(2000u32, 8u32), (1000, 4)] {
            let ideal = f64::from(nodes).log(f64::from(fanout));
            let packed = log_ceil(nodes, fanout);
            for seed in 0..2 {
                for duration in ["0", "120"] {
                    let p = args(&[
                        "--nodes",
                        &nodes.to_string(),
                        "--fanout",
                        &fanout.to_string(),
                        "--duration",
                        duration,
                    ])
                    .params(seed);
                    let r = sim::run(&p).unwrap();
                    assert!(r.violations.is_empty(), "{:?}", r.violations);
                    // Joiners start at the shallowest target they know and full nodes refer
                    // them down, so even a join of everyone at once lands within two levels
                    // of a packed tree; after two minutes every node is within one.
                    let (max_slack, mean_slack) = if duration == "0" { (2, 1.0) } else { (1, 1.0) };
                    assert!(
                        r.max_depth <= packed + max_slack,
                        "n={nodes} k={fanout} after {duration} s: max depth {} vs packed {packed}",
                        r.max_depth
                    );
                    assert!(
                        r.mean_depth <= ideal + mean_slack,
                        "n={nodes} k={fanout} after {duration} s: mean depth {} vs log {ideal:.2}",
                        r.mean_depth
                    );
                }
            }
        }
    }

    #[test]
    fn the_table_names_the_seed_and_the_replay() {
        let r = sim::run(&args(&["--nodes", "50"]).params(5)).unwrap();
        let t = to_table(&r);
        assert!(t.contains("seed 5"));
        assert!(t.contains("replay: topology-sim --nodes 50 "));
        assert!(t.contains("invariants: all held"));
    }
}
