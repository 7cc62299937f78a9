//! `chaos`: one seeded chaos run of a Canopy cluster; exits non-zero when the checker fails.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "A seeded chaos run of real Canopy processes behind a fault proxy, judged by a checker"
)]
struct Args {
    /// Seed of the fault schedule, the targets and the writers.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long faults are injected: seconds, or with a unit (90s, 2m).
    #[arg(long, default_value = "120s", value_parser = seconds)]
    duration: Duration,
    #[arg(long, default_value_t = 20)]
    relays: usize,
    #[arg(long, default_value_t = 3)]
    cores: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4)]
    writers: u32,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Directory of canopy, core-node and relay-node (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The run's directory (default: a new one in the temp dir, removed when the run passes).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Keep the run's directory when the run passes.
    #[arg(long)]
    keep: bool,
    /// The convergence property's limit (seconds).
    #[arg(long, default_value = "5", value_parser = seconds)]
    convergence_limit: Duration,
}

/// `N`, `Ns` or `Nm`.
fn seconds(s: &str) -> Result<Duration, String> {
    let (n, mult) = match s.trim() {
        t if t.ends_with('m') => (&t[..t.len() - 1], 60.0),
        t => (t.trim_end_matches('s'), 1.0),
    };
    let v: f64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    Duration::try_from_secs_f64(v * mult).map_err(|_| format!("bad duration {s:?}"))
}

fn main() -> ExitCode {
    let a = Args::parse();
    let bin_dir = a.bin_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(PathBuf::from))
            .unwrap_or_default()
    });
    let mut cfg = canopy_chaos::Config::new(a.seed, canopy_chaos::Bins::in_dir(&bin_dir));
    cfg.duration = a.duration;
    cfg.relays = a.relays;
    cfg.cores = a.cores;
    cfg.writers = a.writers;
    cfg.work = a.work.clone();
    cfg.keep = a.keep;
    cfg.convergence_limit = a.convergence_limit;
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match rt.block_on(canopy_chaos::run(cfg)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaos: {e:#}");
            return ExitCode::from(2);
        }
    };
    let text = serde_json::to_string_pretty(&report).unwrap_or_default();
    if let Some(p) = &a.json {
        if let Err(e) = std::fs::write(p, format!("{text}\n")) {
            eprintln!("chaos: writing {}: {e}", p.display());
            return ExitCode::from(2);
        }
    }
    eprintln!(
        "chaos seed {}: {} ({} faults; {} acked, {} failed, {} lost, {} twice, {} regressions, {} foreign roots; convergence {:?} s)",
        report.seed,
        report.verdict,
        report.faults.values().sum::<u64>(),
        report.check.acked,
        report.check.failed,
        report.check.lost,
        report.check.twice,
        report.check.regressions,
        report.check.foreign_roots,
        report.max_convergence_s,
    );
    for f in &report.check.failures {
        eprintln!("  {} ({}): first: {}", f.property, f.count, f.first);
    }
    if report.verdict != "pass" {
        eprintln!("  history and logs: {}", report.work_dir);
    }
    println!("{text}");
    if report.verdict == "pass" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(seconds("120s"), Ok(Duration::from_secs(120)));
        assert_eq!(seconds("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(seconds("1.5"), Ok(Duration::from_millis(1500)));
        assert!(seconds("x").is_err());
    }
}
