//! `topology-sim sweep`: runs a grid of (N, K, d, churn, zones) and writes one CSV row per
//! run, for the plots in docs/topology.md (`topology-sim/plot`).
//!
//! Every row is a full `sim::run` with the seed given, so a row is replayed by the command
//! in its `replay` column. Runs go one after another (the machine is shared); each row
//! records its wall and CPU seconds.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use canopy::overlay::OverlayConfig;
use clap::Parser;

use crate::sim::{self, JoinMode, Params, Report};

#[derive(Parser, Debug)]
#[command(
    name = "topology-sim sweep",
    about = "Run a grid of topology-sim cases and write one CSV row per run"
)]
pub struct SweepArgs {
    /// Node counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub nodes: Vec<u32>,
    /// Fan-outs K.
    #[arg(long, value_delimiter = ',', default_value = "4,8")]
    pub fanout: Vec<u32>,
    /// Candidates compared per choice, d.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub choices: Vec<usize>,
    /// Churn rates (fraction of the relays replaced per virtual minute).
    #[arg(long, value_delimiter = ',', default_value = "0,0.05")]
    pub churn: Vec<f64>,
    /// Zone counts (1: no zones; more: 1 ms inside, --cross-zone-ms between).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub zones: Vec<u32>,
    /// With zones, also run each case with depth-only choice.
    #[arg(long)]
    pub depth_only_too: bool,
    /// With zones, nodes report subtree sizes and fill their zones down to the depth bound
    /// (the overlay's fill_zones_to_bound).
    #[arg(long)]
    pub fill_zones_to_bound: bool,
    /// How the relays join.
    #[arg(long, value_enum, default_value_t = JoinMode::All)]
    pub join: JoinMode,
    /// Virtual seconds per run (the churn lasts this long).
    #[arg(long, default_value_t = 600.0)]
    pub duration: f64,
    /// Mean one-way latency between two zones (ms).
    #[arg(long, default_value_t = 40.0)]
    pub cross_zone_ms: f64,
    /// Seeds (each case runs once per seed).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub seeds: Vec<u64>,
    /// Where to write the CSV (stdout if not given).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

/// The CSV header; `row` writes the fields in this order.
pub const HEADER: &str = "nodes,fanout,choices,churn,zones,latency_aware,seed,duration_s,\
bound,max_depth,p99_depth,mean_depth,attach_p50_ms,attach_p99_ms,reattach_p50_ms,\
reattach_p99_ms,reattach_max_ms,messages_per_node,root_latency_p50_ms,root_latency_p99_ms,\
cross_zone_edges,min_cross_zone_edges,violations,wall_s,join,replay";

/// ceil(log_k(n)) + 1: the depth goal (the deepest node of a packed tree, plus one).
pub fn bound(n: u32, k: u32) -> u32 {
    if k == 1 {
        return n;
    }
    canopy::overlay::depth_bound(u64::from(n), k)
}

fn p99_depth(r: &Report) -> u32 {
    let total: u64 = r.depth_histogram.values().sum();
    let mut seen = 0;
    for (d, c) in &r.depth_histogram {
        seen += c;
        if seen * 100 >= total * 99 {
            return *d;
        }
    }
    r.max_depth
}

fn row(p: &Params, r: &Report, wall_s: f64) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{:.3},{:.1},{:.1},{:.1},{:.1},{:.1},{:.2},{:.2},{:.2},{},{},{},{:.2},{},\"{}\"",
        p.nodes,
        p.overlay.fanout,
        p.overlay.choices,
        p.churn,
        p.zones,
        p.latency_aware,
        p.seed,
        p.duration_s,
        bound(p.nodes, p.overlay.fanout),
        r.max_depth,
        p99_depth(r),
        r.mean_depth,
        r.time_to_attach.p50_ms,
        r.time_to_attach.p99_ms,
        r.time_to_reattach.p50_ms,
        r.time_to_reattach.p99_ms,
        r.time_to_reattach.max_ms,
        r.messages_per_node(),
        r.root_latency.p50_ms,
        r.root_latency.p99_ms,
        r.cross_zone_edges,
        r.min_cross_zone_edges,
        r.violations.len(),
        wall_s,
        p.join.label(),
        p.replay(),
    )
}

/// The grid, in the order it runs.
pub fn cases(a: &SweepArgs) -> Vec<Params> {
    let mut out = Vec::new();
    for &nodes in &a.nodes {
        for &fanout in &a.fanout {
            for &choices in &a.choices {
                for &churn in &a.churn {
                    for &zones in &a.zones {
                        let aware: &[bool] = if zones > 1 && a.depth_only_too {
                            &[true, false]
                        } else {
                            &[true]
                        };
                        for &latency_aware in aware {
                            for &seed in &a.seeds {
                                let mut p = Params::new(nodes, seed);
                                p.overlay = OverlayConfig {
                                    fanout,
                                    choices,
                                    fill_zones_to_bound: a.fill_zones_to_bound,
                                    ..OverlayConfig::default()
                                };
                                p.join = a.join;
                                p.churn = churn;
                                p.duration_s = a.duration;
                                p.zones = zones;
                                p.latency_aware = latency_aware;
                                p.cross_zone_ms = a.cross_zone_ms;
                                if zones > 1 {
                                    p.latency_ms = 1.0;
                                }
                                p.max_events = 0;
                                out.push(p);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

pub fn main(args: impl Iterator<Item = String>) -> Result<()> {
    let a = SweepArgs::parse_from(args);
    let grid = cases(&a);
    if grid.is_empty() {
        bail!("the grid is empty");
    }
    let mut out: Box<dyn Write> = match &a.out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    writeln!(out, "{HEADER}")?;
    for (i, p) in grid.iter().enumerate() {
        let start = Instant::now();
        let r = sim::run(p).with_context(|| p.replay())?;
        let wall = start.elapsed().as_secs_f64();
        writeln!(out, "{}", row(p, &r, wall))?;
        out.flush()?;
        eprintln!(
            "sweep: {}/{} N={} K={} d={} churn={} zones={}{}: max depth {} in {wall:.1} s",
            i + 1,
            grid.len(),
            p.nodes,
            p.overlay.fanout,
            p.overlay.choices,
            p.churn,
            p.zones,
            if p.latency_aware { "" } else { " depth-only" },
            r.max_depth
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_is_the_packed_depth_plus_one() {
        assert_eq!(bound(1000, 8), 5);
        assert_eq!(bound(10_000, 8), 6);
        assert_eq!(bound(100_000, 8), 7);
        assert_eq!(bound(1000, 4), 6);
    }

    #[test]
    fn a_small_sweep_writes_one_row_per_case_with_the_header_s_columns() {
        let dir = tempfile_dir();
        let out = dir.join("s.csv");
        let argv = [
            "sweep",
            "--nodes",
            "50,120",
            "--fanout",
            "4",
            "--choices",
            "1,2",
            "--churn",
            "0,0.2",
            "--duration",
            "20",
            "--zones",
            "1,3",
            "--depth-only-too",
            "--out",
        ];
        let mut args: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        args.push(out.display().to_string());
        main(args.into_iter()).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], HEADER);
        // 2 N x 2 d x 2 churn x (1 + 2 with zones) = 24 runs.
        assert_eq!(lines.len(), 1 + 24);
        let cols = HEADER.split(',').count();
        for l in &lines[1..] {
            let (fields, replay) = l.split_once(",\"").unwrap();
            assert_eq!(fields.split(',').count() + 1, cols, "{l}");
            assert!(replay.starts_with("topology-sim --nodes "), "{l}");
            // No violations.
            assert_eq!(fields.split(',').nth(22), Some("0"), "{l}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("topology-sim-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
