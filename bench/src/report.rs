//! `bench-report`: folds `loadgen --json` lines into one JSON document and a Markdown table.
//!
//! `bench-report --results rows.jsonl --out results.json [--machine k=v].. [--setup k=v]..`
//! Values that parse as JSON (numbers, true, objects) are kept typed; others are strings.
//! The table goes to stdout; the comparison lines compare, per client count, the Canopy row
//! that uses the most endpoints with the etcd rows that use the most endpoints.

use std::collections::BTreeSet;

use clap::Parser;
use serde_json::{json, Value};

use canopy_bench::ReportFiles;

#[derive(Parser, Debug)]
#[command(version = canopy_bench::VERSION, about = "Fold loadgen --json rows into a JSON document and a Markdown table")]
struct Args {
    #[command(flatten)]
    files: ReportFiles,
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

fn table(rows: &[Value]) -> String {
    let mut s = String::from(
        "| system | endpoints | clients | writes/s | requests/s | p50 ms | p99 ms | max ms | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {} |\n",
            r["system"].as_str().unwrap_or("?"),
            r["endpoints"],
            r["clients"],
            num(r, "writes_per_sec"),
            num(r, "requests_per_sec"),
            num(r, "p50_ms"),
            num(r, "p99_ms"),
            num(r, "max_ms"),
            r["errors"],
        ));
    }
    s
}

/// The row of `target` at `clients` with the most endpoints.
fn primary<'a>(rows: &'a [Value], target: &str, clients: u64) -> Option<&'a Value> {
    rows.iter()
        .filter(|r| r["target"] == target && r["clients"].as_u64() == Some(clients))
        .max_by_key(|r| r["endpoints"].as_u64().unwrap_or(0))
}

fn comparisons(rows: &[Value]) -> (String, Vec<Value>) {
    let clients: BTreeSet<u64> = rows.iter().filter_map(|r| r["clients"].as_u64()).collect();
    let mut text = String::new();
    let mut out = Vec::new();
    for c in clients {
        let Some(canopy) = primary(rows, "canopy", c) else {
            continue;
        };
        for target in ["etcd", "etcd-txn"] {
            let Some(etcd) = primary(rows, target, c) else {
                continue;
            };
            let (cw, ew) = (num(canopy, "writes_per_sec"), num(etcd, "writes_per_sec"));
            let (cp, ep) = (num(canopy, "p99_ms"), num(etcd, "p99_ms"));
            let tput_ratio = if ew > 0.0 { cw / ew } else { f64::INFINITY };
            let p99_ratio = if ep > 0.0 { cp / ep } else { f64::INFINITY };
            let tput_ok = cw >= ew;
            let p99_ok = cp <= ep;
            text.push_str(&format!(
                "- {c} clients, {} vs {}: throughput {:.0} vs {:.0} writes/s ({:.2}x, {}), p99 {:.2} vs {:.2} ms ({:.2}x, {}){}\n",
                canopy["system"].as_str().unwrap_or("canopy"),
                etcd["system"].as_str().unwrap_or(target),
                cw,
                ew,
                tput_ratio,
                if tput_ok { "goal met" } else { "goal missed" },
                cp,
                ep,
                p99_ratio,
                if p99_ok { "goal met" } else { "goal missed" },
                if target == "etcd-txn" {
                    " — a Txn's latency is that of a whole batch of writes"
                } else {
                    ""
                },
            ));
            out.push(json!({
                "clients": c,
                "canopy": canopy["system"],
                "etcd": etcd["system"],
                "throughput_ratio": (tput_ratio * 1000.0).round() / 1000.0,
                "p99_ratio": (p99_ratio * 1000.0).round() / 1000.0,
                "throughput_goal_met": tput_ok,
                "p99_goal_met": p99_ok,
            }));
        }
    }
    (text, out)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rows = args.files.rows()?;
    let (cmp_text, cmp) = comparisons(&rows);
    let md = format!("{}\n{}", table(&rows), cmp_text);
    let doc = json!({ "results": rows, "comparison": cmp });
    args.files.write(doc, &md)
}
