//! What the demo, the benchmarks and the tests measure with: sizes and durations from the
//! command line, percentiles, Prometheus text, a process's wake-ups, and a node started inside
//! the calling process.
//!
//! Invariants: one definition of each, so a figure means the same in every report; percentiles
//! are nearest-rank (the smallest sample with at least `q` of the samples at or below it, as
//! topology-sim reports them); a Prometheus series matches a name only as a whole word, so
//! `x_total` never counts as `x`.

use std::time::Duration;

use crate::config::{NodeConfig, NodeKind, StreamConfig};
use crate::node::Node;

/// Parses `50MB` (10^6), `8MiB` (2^20), `1GB`, `64KiB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (n, unit) = number_and_unit(s).ok_or_else(|| format!("bad size {s:?}"))?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown size unit {u:?} in {s:?} (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    Ok((n * mult).round() as u64)
}

/// Parses `20s`, `500ms`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = number_and_unit(s).ok_or_else(|| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        u => {
            return Err(format!(
                "unknown duration unit {u:?} in {s:?} (ms, s, m, h)"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("bad duration {s:?}"))
}

/// A non-negative decimal number and the unit after it (trimmed).
fn number_and_unit(s: &str) -> Option<(f64, &str)> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    n.is_finite().then_some((n, unit.trim()))
}

/// The nearest-rank `q`-quantile (`q` in 0..=1) of `sorted` (ascending); the default value
/// (zero) when there are no samples.
pub fn percentile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One sample of Prometheus text: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// The metric's name.
    pub name: &'a str,
    /// What stands between the braces, empty without labels.
    pub labels: &'a str,
    /// The value.
    pub value: f64,
}

/// The samples of Prometheus text exposition, comments and unparsable lines skipped.
pub fn prometheus_samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let (series, rest) = match line.find('{') {
            Some(open) => {
                let close = open + line[open..].find('}')?;
                (&line[..close + 1], &line[close + 1..])
            }
            None => line.split_at(line.find(char::is_whitespace)?),
        };
        let value = rest.split_whitespace().next()?.parse().ok()?;
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}')?),
            None => (series, ""),
        };
        Some(Sample {
            name,
            labels,
            value,
        })
    })
}

/// The value of the first series of `name`.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    prometheus_samples(text)
        .find(|s| s.name == name)
        .map(|s| s.value)
}

/// The sum over every series of `name` (0 when there is none).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    prometheus_samples(text)
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

/// Starts node `name` inside this process on ephemeral loopback ports: its certificate from
/// `tls`, its data under `data/<name>`, no `--file`, default overlay settings. Returns the
/// node and its API address.
/// A node [`start_local_node`] started, with its HTTP API and QUIC addresses.
pub struct LocalNode {
    pub node: Node,
    pub api: std::net::SocketAddr,
    pub quic: std::net::SocketAddr,
}

pub async fn start_local_node(
    name: &str,
    tls: &std::path::Path,
    data: &std::path::Path,
    kind: NodeKind,
    stream: StreamConfig,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<LocalNode> {
    let id = crate::tls::Identity::load(tls, name)?;
    let endpoint = crate::tls::endpoint("127.0.0.1:0".parse()?, &id, &stream.transport())?;
    let advertise = endpoint.local_addr()?;
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api_addr = api.local_addr()?;
    let cfg = NodeConfig {
        stream,
        ..NodeConfig::new(name, advertise, data.join(name), kind)
    };
    let node = Node::start(cfg, std::sync::Arc::new(id), endpoint, api, shutdown).await?;
    Ok(LocalNode {
        node,
        api: api_addr,
        quic: advertise,
    })
}

/// Voluntary context switches of a process: `voluntary_ctxt_switches` of
/// `/proc/PID/task/*/status`, summed over its live threads (a thread that exited takes its
/// count with it); `None` when the process is gone.
pub fn voluntary_switches(pid: impl std::fmt::Display) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
            .filter_map(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("50MB"), Ok(50_000_000));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size(" 4096 "), Ok(4096));
        assert_eq!(parse_size("1.5kb"), Ok(1500));
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("MB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3d").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7.5f64], 0.99), 7.5);
        assert_eq!(percentile::<u64>(&[], 0.5), 0);
        assert_eq!(percentile(&[1, 2, 3, 4], 0.5), 2);
    }

    #[test]
    fn prometheus_text() {
        let text = "# HELP x_total things\n# TYPE x_total counter\n\
                    x_total{peer=\"a b\",k=\"v\"} 3\nx_total{peer=\"c\"} 4.5\n\
                    x 1e3\nx_total_other 9\nbroken\n";
        assert_eq!(metric_sum(text, "x_total"), 7.5);
        assert_eq!(metric_value(text, "x_total"), Some(3.0));
        assert_eq!(metric_value(text, "x"), Some(1000.0));
        assert_eq!(metric_value(text, "y"), None);
        assert_eq!(metric_sum(text, "y"), 0.0);
        let first = prometheus_samples(text).next().unwrap();
        assert_eq!(first.labels, "peer=\"a b\",k=\"v\"");
    }

    #[test]
    fn voluntary_switches_are_read() {
        // A process that sleeps gives up the CPU: its count grows.
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut seen = voluntary_switches(child.id());
        while seen.unwrap_or(0) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            seen = voluntary_switches(child.id());
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(seen.unwrap_or(0) > 0, "{seen:?}");
        assert_eq!(voluntary_switches("no-such-pid"), None);
    }
}
