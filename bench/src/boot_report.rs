//! `bootstrap-report`: folds the bootstrap benchmark's rows (one JSON object per round, from
//! `boot-wait`, `quinn-raw`, `etcd-range` and the script) into one JSON document with medians
//! and the comparisons, and prints a Markdown table.
//!
//! `bootstrap-report --results rows.jsonl --out bootstrap.json [--fanout 8]
//!                   [--machine k=v].. [--setup k=v]..`
//!
//! Rows are grouped by (scenario, system, variant) in order of first appearance. A group's
//! median time is the median of its rounds' `time_ms`; its throughput is `n * size / median
//! time`; other numeric fields get their median too. The comparisons use these groups:
//! - Canopy single / quinn-raw with `variant == "canopy transport config"`: throughput ratio
//!   (goal >= 0.6);
//! - Canopy single / redis single `variant == "tuned"`: time ratio (goal < 1);
//! - Canopy many: core egress in file copies (goal: about `--fanout`, not N; "about" is
//!   taken as at most 1.25 x fanout);
//! - Canopy many / redis many tuned and etcd many: time ratios (for reading only).

use clap::Parser;
use serde_json::{json, Map, Value};

use canopy_bench::ReportFiles;

#[derive(Parser, Debug)]
#[command(version = canopy_bench::VERSION, about = "Fold bootstrap rows into a JSON document and a Markdown table")]
struct Args {
    #[command(flatten)]
    files: ReportFiles,
    /// The relays' fan-out (the egress goal, in copies).
    #[arg(long, default_value_t = 8)]
    fanout: u64,
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

fn r(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// Medians of every numeric field (one level of nested objects too, e.g. `breakdown_ms`).
fn medians(rows: &[&Value]) -> Map<String, Value> {
    let mut out = Map::new();
    let Some(first) = rows.first().and_then(|v| v.as_object()) else {
        return out;
    };
    for (k, v) in first {
        if k == "round" {
            continue;
        }
        if v.is_number() {
            let xs: Vec<f64> = rows.iter().filter_map(|r| r[k].as_f64()).collect();
            if let Some(m) = median(xs) {
                out.insert(k.clone(), json!(r(m, 3)));
            }
        } else if let Some(obj) = v.as_object() {
            let mut sub = Map::new();
            for (k2, v2) in obj {
                if v2.is_number() {
                    let xs: Vec<f64> = rows.iter().filter_map(|r| r[k][k2].as_f64()).collect();
                    if let Some(m) = median(xs) {
                        sub.insert(k2.clone(), json!(r(m, 3)));
                    }
                }
            }
            if !sub.is_empty() {
                out.insert(k.clone(), Value::Object(sub));
            }
        }
    }
    out
}

struct Group {
    scenario: String,
    system: String,
    variant: String,
    rows: Vec<Value>,
}

impl Group {
    fn summary(&self) -> Value {
        let refs: Vec<&Value> = self.rows.iter().collect();
        let med = medians(&refs);
        let times: Vec<f64> = self
            .rows
            .iter()
            .filter_map(|r| r["time_ms"].as_f64())
            .collect();
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let max = times.iter().copied().fold(0.0, f64::max);
        let t = med.get("time_ms").and_then(Value::as_f64).unwrap_or(0.0);
        let n = med.get("n").and_then(Value::as_f64).unwrap_or(1.0);
        let size = med.get("size_bytes").and_then(Value::as_f64).unwrap_or(0.0);
        let mb_s = if t > 0.0 {
            n * size / 1e6 / (t / 1e3)
        } else {
            0.0
        };
        // CPU seconds of everything involved (source + receivers), when measured.
        let cpu = med.get("cpu_s").and_then(Value::as_f64).or_else(|| {
            let s = med.get("source_cpu_s").and_then(Value::as_f64);
            let i = med.get("instances_cpu_s").and_then(Value::as_f64);
            match (s, i) {
                (None, None) => None,
                (s, i) => Some(s.unwrap_or(0.0) + i.unwrap_or(0.0)),
            }
        });
        json!({
            "scenario": self.scenario,
            "system": self.system,
            "variant": self.variant,
            "rounds": self.rows.len(),
            "n": n,
            "size_bytes": size,
            "median_time_ms": r(t, 1),
            "min_time_ms": r(min, 1),
            "max_time_ms": r(max, 1),
            "throughput_mb_s": r(mb_s, 1),
            "cpu_s": cpu.map(|c| r(c, 2)),
            "verified": self.rows.iter().all(|r| r["verified"].as_bool().unwrap_or(false)),
            "medians": med,
        })
    }
}

fn find<'a>(
    sums: &'a [Value],
    scenario: &str,
    system: &str,
    variant: Option<&str>,
) -> Option<&'a Value> {
    sums.iter().find(|s| {
        s["scenario"] == scenario
            && s["system"] == system
            && variant.is_none_or(|v| s["variant"] == v)
    })
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

fn table(sums: &[Value]) -> String {
    let mut s = String::from(
        "| scenario | system | variant | N | size MB | rounds | median ms | min–max ms | MB/s | CPU s | egress copies | verified |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for g in sums {
        let egress = g["medians"]["egress_copies"]
            .as_f64()
            .map(|c| format!("{c:.2}"))
            .unwrap_or_else(|| "–".into());
        let cpu = g["cpu_s"]
            .as_f64()
            .map(|c| format!("{c:.2}"))
            .unwrap_or_else(|| "–".into());
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {} | {:.1} | {:.1}–{:.1} | {:.0} | {} | {} | {} |\n",
            g["scenario"].as_str().unwrap_or("?"),
            g["system"].as_str().unwrap_or("?"),
            g["variant"].as_str().unwrap_or(""),
            f(g, "n"),
            f(g, "size_bytes") / 1e6,
            g["rounds"],
            f(g, "median_time_ms"),
            f(g, "min_time_ms"),
            f(g, "max_time_ms"),
            f(g, "throughput_mb_s"),
            cpu,
            egress,
            if g["verified"].as_bool() == Some(true) {
                "yes"
            } else {
                "NO"
            },
        ));
    }
    s
}

/// Median over rounds of `a`'s time / `b`'s time in the same round (the systems take turns
/// within a round, so a pair shares the machine's load of that moment).
fn paired_time_ratio(a: &Group, b: &Group) -> Option<f64> {
    let ratios: Vec<f64> = a
        .rows
        .iter()
        .filter_map(|ra| {
            let rb = b.rows.iter().find(|rb| rb["round"] == ra["round"])?;
            Some(ra["time_ms"].as_f64()? / rb["time_ms"].as_f64()?)
        })
        .collect();
    median(ratios)
}

fn min_time(g: &Group) -> f64 {
    g.rows
        .iter()
        .filter_map(|r| r["time_ms"].as_f64())
        .fold(f64::INFINITY, f64::min)
}

fn group<'a>(
    groups: &'a [Group],
    scenario: &str,
    system: &str,
    variant: Option<&str>,
) -> Option<&'a Group> {
    groups.iter().find(|g| {
        g.scenario == scenario && g.system == system && variant.is_none_or(|v| g.variant == v)
    })
}

fn comparisons(groups: &[Group], sums: &[Value], fanout: u64) -> (String, Vec<Value>) {
    let mut text = String::new();
    let mut out = Vec::new();
    let canopy = find(sums, "single", "canopy", None);
    if let (Some(c), Some(q)) = (
        canopy,
        find(sums, "single", "quinn-raw", Some("canopy transport config")),
    ) {
        let ratio = f(c, "throughput_mb_s") / f(q, "throughput_mb_s");
        let ok = ratio >= 0.6;
        let (gc, gq) = (
            group(groups, "single", "canopy", None),
            group(
                groups,
                "single",
                "quinn-raw",
                Some("canopy transport config"),
            ),
        );
        // Throughput ratio = quinn time / Canopy time, per round and for the best rounds.
        let paired = gc.zip(gq).and_then(|(gc, gq)| paired_time_ratio(gq, gc));
        let best = gc.zip(gq).map(|(gc, gq)| min_time(gq) / min_time(gc));
        let cpu = match (q["cpu_s"].as_f64(), c["cpu_s"].as_f64()) {
            (Some(qc), Some(cc)) if cc > 0.0 => Some(qc / cc),
            _ => None,
        };
        let fmt = |x: Option<f64>| x.map(|x| format!("{x:.2}")).unwrap_or_else(|| "–".into());
        text.push_str(&format!(
            "- Canopy relay bootstrap / raw quinn, throughput: {:.0} / {:.0} MB/s = {:.2} (goal >= 0.60: {}); median of per-round ratios {}, best round / best round {}, CPU seconds raw / Canopy {}\n",
            f(c, "throughput_mb_s"),
            f(q, "throughput_mb_s"),
            ratio,
            if ok { "met" } else { "missed" },
            fmt(paired),
            fmt(best),
            fmt(cpu),
        ));
        out.push(json!({"what": "canopy_over_quinn_raw_throughput", "ratio": r(ratio, 3), "goal": ">= 0.6", "met": ok,
            "paired_round_ratio": paired.map(|x| r(x, 3)), "best_round_ratio": best.map(|x| r(x, 3)),
            "cpu_ratio_raw_over_canopy": cpu.map(|x| r(x, 3))}));
    }
    if let (Some(c), Some(rt)) = (canopy, find(sums, "single", "redis", Some("tuned"))) {
        let ratio = f(c, "median_time_ms") / f(rt, "median_time_ms");
        let ok = ratio < 1.0;
        let paired = group(groups, "single", "canopy", None)
            .zip(group(groups, "single", "redis", Some("tuned")))
            .and_then(|(gc, gr)| paired_time_ratio(gc, gr));
        text.push_str(&format!(
            "- Canopy relay bootstrap / Redis tuned full sync, time: {:.0} / {:.0} ms = {:.2} (goal < 1: {}); median of per-round ratios {}\n",
            f(c, "median_time_ms"),
            f(rt, "median_time_ms"),
            ratio,
            if ok { "met" } else { "missed" },
            paired.map(|x| format!("{x:.2}")).unwrap_or_else(|| "–".into()),
        ));
        out.push(json!({"what": "canopy_over_redis_tuned_time", "ratio": r(ratio, 3), "goal": "< 1", "met": ok,
            "paired_round_ratio": paired.map(|x| r(x, 3))}));
    }
    for v in ["defaults", "disk-based"] {
        if let (Some(c), Some(rd)) = (canopy, find(sums, "single", "redis", Some(v))) {
            let ratio = f(c, "median_time_ms") / f(rd, "median_time_ms");
            text.push_str(&format!(
                "- Canopy relay bootstrap / Redis {v} full sync, time: {:.2}\n",
                ratio
            ));
            out.push(json!({"what": format!("canopy_over_redis_{v}_time"), "ratio": r(ratio, 3)}));
        }
    }
    if let (Some(c), Some(e)) = (canopy, find(sums, "single", "etcd", None)) {
        let ratio = f(c, "median_time_ms") / f(e, "median_time_ms");
        text.push_str(&format!(
            "- Canopy relay bootstrap / etcd range read ({}), time: {:.2}\n",
            e["variant"].as_str().unwrap_or(""),
            ratio
        ));
        out.push(json!({"what": "canopy_over_etcd_time", "ratio": r(ratio, 3)}));
    }
    if let Some(m) = find(sums, "many", "canopy", None) {
        let copies = m["medians"]["egress_copies"].as_f64().unwrap_or(f64::NAN);
        let n = f(m, "n");
        // "About fanout": within 25 % of it (the goal is O(fanout) copies, not O(N)).
        let ok = copies <= fanout as f64 * 1.25;
        let per_round: Vec<String> = group(groups, "many", "canopy", None)
            .map(|g| {
                g.rows
                    .iter()
                    .filter_map(|r| r["egress_copies"].as_f64())
                    .map(|c| format!("{c:.2}"))
                    .collect()
            })
            .unwrap_or_default();
        text.push_str(&format!(
            "- Canopy, {n:.0} relays at once: core egress {copies:.2} file copies, median (rounds: {}; goal about fanout = {fanout}, not {n:.0}: {}); all verified in {:.0} ms\n",
            per_round.join(", "),
            if ok { "met" } else { "missed" },
            f(m, "median_time_ms"),
        ));
        out.push(json!({"what": "canopy_many_core_egress_copies", "copies": copies, "n": n, "fanout": fanout, "goal": format!("about {fanout} (<= {})", fanout as f64 * 1.25), "met": ok}));
        for (sys, variant) in [
            ("redis", Some("tuned")),
            ("redis", Some("defaults")),
            ("etcd", None),
        ] {
            let others: Vec<&Value> = sums
                .iter()
                .filter(|s| {
                    s["scenario"] == "many"
                        && s["system"] == sys
                        && variant.is_none_or(|v| s["variant"] == v)
                })
                .collect();
            for o in others {
                let ratio = f(m, "median_time_ms") / f(o, "median_time_ms");
                text.push_str(&format!(
                    "- Canopy / {sys} {} with {n:.0} at once, time: {:.0} / {:.0} ms = {:.2}; their source's egress {} copies\n",
                    o["variant"].as_str().unwrap_or(""),
                    f(m, "median_time_ms"),
                    f(o, "median_time_ms"),
                    ratio,
                    o["medians"]["egress_copies"]
                        .as_f64()
                        .map(|c| format!("{c:.2}"))
                        .unwrap_or_else(|| "–".into()),
                ));
                out.push(json!({"what": format!("canopy_many_over_{sys}_{}_time", o["variant"].as_str().unwrap_or("")), "ratio": r(ratio, 3)}));
            }
        }
    }
    (text, out)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let all = args.files.rows()?;
    let mut groups: Vec<Group> = Vec::new();
    for v in &all {
        let key = |k: &str| v[k].as_str().unwrap_or("").to_string();
        let (sc, sy, va) = (key("scenario"), key("system"), key("variant"));
        match groups
            .iter_mut()
            .find(|g| g.scenario == sc && g.system == sy && g.variant == va)
        {
            Some(g) => g.rows.push(v.clone()),
            None => groups.push(Group {
                scenario: sc,
                system: sy,
                variant: va,
                rows: vec![v.clone()],
            }),
        }
    }
    let sums: Vec<Value> = groups.iter().map(Group::summary).collect();
    let (cmp_text, cmp) = comparisons(&groups, &sums, args.fanout);
    let md = format!("{}\n{}", table(&sums), cmp_text);
    let doc = json!({ "summary": sums, "comparison": cmp, "rounds": all });
    args.files.write(doc, &md)
}
