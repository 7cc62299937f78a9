//! What the bench binaries share beyond the canopy library's `measure` module: the etcd
//! gateway's framing, process CPU time, the files of the relays a bench process runs, and the files and facts
//! of a report.
//!
//! Invariants: a bench binary defines none of these itself; sizes, durations, percentiles,
//! Prometheus text and in-process nodes come from `canopy::measure`, so the demo, the tests
//! and every report compute them one way.

pub mod etcd_gateway;

/// What a bench binary's `--version` prints: "test build" when it or the canopy library it
/// runs was compiled by the test profile (see `canopy::VERSION`), which `bench/check-bins`
/// refuses.
pub const VERSION: &str = if canopy::TEST_BUILD || cfg!(debug_assertions) {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (test build: unoptimized, debug assertions on; not for measuring)"
    )
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (optimized)")
};

/// CPU seconds (user + system, every thread) a process has used, plus those of its children
/// it has waited for (a Redis master's fork), from `/proc/PID/stat` at 100 Hz; `pid` may be
/// `self`. 0 when the process is gone.
pub fn cpu_seconds(pid: impl std::fmt::Display) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12) + t(13) + t(14)) / 100.0
}

/// Bytes a process caused to be written to storage (`write_bytes` of `/proc/PID/io`, every
/// thread, dead ones included) minus those it truncated away before they reached the disk
/// (`cancelled_write_bytes`); `None` when the process is gone or the file unreadable.
pub fn disk_write_bytes(pid: impl std::fmt::Display) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some(field("write_bytes")?.saturating_sub(field("cancelled_write_bytes").unwrap_or(0)))
}

pub use canopy::measure::voluntary_switches;

/// One RESP line starting at `at`: its bytes before the `\r\n` and where the next begins;
/// `None` while `buf` does not hold the whole line. What `prop-sub` reads from Redis and
/// `quinn-tree` from its clients.
pub fn resp_line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(at..)?;
    let i = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..i], at + i + 2))
}

/// Parses `KEY=VALUE`: VALUE as JSON when it is a JSON number, bool, array or object, else as
/// a string.
pub fn parse_kv(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let v = v.trim();
    let value = match serde_json::from_str::<serde_json::Value>(v) {
        Ok(j) if !j.is_string() => j,
        _ => serde_json::Value::String(v.to_string()),
    };
    Ok((k.to_string(), value))
}

/// The files and facts of a report folder (`bench-report`, `bootstrap-report`): JSON rows in,
/// a JSON document and Markdown out.
#[derive(clap::Args, Debug, Clone)]
pub struct ReportFiles {
    /// File with one JSON row per line.
    #[arg(long)]
    pub results: std::path::PathBuf,
    /// Where to write the JSON document.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Machine fact KEY=VALUE (repeat).
    #[arg(long = "machine", value_parser = parse_kv)]
    pub machine: Vec<(String, serde_json::Value)>,
    /// Setup fact KEY=VALUE (repeat).
    #[arg(long = "setup", value_parser = parse_kv)]
    pub setup: Vec<(String, serde_json::Value)>,
    /// Also write the Markdown to this file.
    #[arg(long)]
    pub markdown: Option<std::path::PathBuf>,
}

impl ReportFiles {
    /// The rows of `--results`, blank lines skipped; an error when a line is not JSON or there
    /// is no row.
    pub fn rows(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        use anyhow::Context;
        let path = self.results.display();
        let text =
            std::fs::read_to_string(&self.results).with_context(|| format!("reading {path}"))?;
        let mut rows = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if !line.trim().is_empty() {
                rows.push(
                    serde_json::from_str(line)
                        .with_context(|| format!("{path} line {}: not JSON", n + 1))?,
                );
            }
        }
        anyhow::ensure!(!rows.is_empty(), "no rows in {path}");
        Ok(rows)
    }

    /// Writes `doc` with the machine and setup facts added as pretty JSON to `--out`, and
    /// `markdown` to stdout and, when given, to `--markdown`.
    pub fn write(&self, mut doc: serde_json::Value, markdown: &str) -> anyhow::Result<()> {
        use anyhow::Context;
        let facts = |kv: &[(String, serde_json::Value)]| {
            serde_json::Value::Object(kv.iter().cloned().collect())
        };
        doc["machine"] = facts(&self.machine);
        doc["setup"] = facts(&self.setup);
        std::fs::write(&self.out, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", self.out.display()))?;
        print!("{markdown}");
        if let Some(p) = &self.markdown {
            std::fs::write(p, markdown).with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    }
}

/// Where the Canopy relays a bench process runs itself get their certificates and data.
#[derive(clap::Args, Debug, Clone)]
pub struct RelayFiles {
    /// Canopy: the CA directory (`canopy ca init`), to issue the relays' certificates.
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// Canopy: the TLS directory (holds `ca.pem`); relay certificates are written here.
    #[arg(long)]
    pub tls: Option<std::path::PathBuf>,
    /// Canopy: the relays' data directories go under this one.
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
}

impl RelayFiles {
    /// Issues the certificates of relays `{prefix}0` to `{prefix}{n-1}`, every one before
    /// any relay starts (issuing rewrites the directory's CA file, which a starting relay
    /// would read half written); returns the TLS and data directories.
    pub fn issue(
        &self,
        prefix: &str,
        n: usize,
    ) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
        let need = |v: &Option<std::path::PathBuf>, flag: &str| {
            v.clone().ok_or_else(|| anyhow::anyhow!("{flag} is needed"))
        };
        let (ca, tls, data) = (
            need(&self.ca, "--ca")?,
            need(&self.tls, "--tls")?,
            need(&self.data, "--data")?,
        );
        for i in 0..n {
            canopy::tls::cert_issue(&ca, &format!("{prefix}{i}"), canopy::tls::Role::Relay, &tls)?;
        }
        Ok((tls, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_is_read() {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut x = 0u64;
        while cpu_seconds("self") == 0.0 && std::time::Instant::now() < deadline {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
        }
        assert!(cpu_seconds("self") > 0.0);
        assert_eq!(cpu_seconds("no-such-pid"), 0.0);
    }

    #[test]
    fn own_disk_writes_are_read() {
        use std::io::Write;
        // Beside the sources, not in a temp dir that may be a tmpfs (which counts nothing).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let before = disk_write_bytes("self").expect("/proc/self/io is readable");
        let mut f = std::fs::File::create(dir.path().join("x")).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let after = disk_write_bytes("self").unwrap();
        assert!(after - before >= 1 << 20, "{before} -> {after}");
        assert_eq!(disk_write_bytes("no-such-pid"), None);
    }

    #[test]
    fn kv() {
        assert_eq!(
            parse_kv("cores=2").unwrap(),
            ("cores".into(), serde_json::json!(2))
        );
        assert_eq!(
            parse_kv("cpu=AMD EPYC").unwrap(),
            ("cpu".into(), serde_json::json!("AMD EPYC"))
        );
        assert!(parse_kv("nokey").is_err());
    }
}
