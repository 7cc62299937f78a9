//! The `canopy` tool's command line: its clap definitions, exit codes and parsers.
//!
//! Invariants: the binary, its shell completions and its man page are all generated from
//! these definitions; every exit code the tool uses is one of [`exit`] and is listed in
//! `canopy --help`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit codes of `canopy` (also in its `--help`).
pub mod exit {
    /// Anything not listed below.
    pub const FAILURE: u8 = 1;
    /// Bad flags (clap's own code).
    pub const USAGE: u8 = 2;
    /// No Canopy node answers at `--api`.
    pub const UNREACHABLE: u8 = 3;
    /// The node refused the request (bad input, too large, a failed precondition).
    pub const REFUSED: u8 = 4;
    /// The node cannot do it now (no leader or quorum, shutting down, timed out).
    pub const UNAVAILABLE: u8 = 5;
    /// A local file could not be read or written.
    pub const LOCAL_FILE: u8 = 6;
}

/// The exit codes as `--help` shows them.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  any other failure
  2  bad flags
  3  no Canopy node answers at --api (not running, wrong address, or not its API port)
  4  the node refused the request (bad input, too large, failed precondition)
  5  the node cannot do it now (no leader or quorum, shutting down, timed out): retry later
  6  a local file could not be read or written
  watch --exec with --once, or stopped by SIGTERM while the command runs: the command's own
  exit status (128+N if a signal N ended it)";

#[derive(Parser, Debug)]
#[command(
    name = "canopy",
    version = crate::VERSION,
    about = "Canopy: keep one large file byte-identical on thousands of hosts",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// HTTP API of the node to talk to, as HOST:PORT (a node's --api, not its QUIC --listen).
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:7070",
        env = "CANOPY_API"
    )]
    pub api: String,
    /// File holding the node's API token, which writes and membership changes need (or
    /// CANOPY_API_TOKEN with the token itself).
    #[arg(long, global = true, env = "CANOPY_API_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The node's --data directory, on the node's own host: its api-token file is used.
    #[arg(long, global = true)]
    pub data: Option<PathBuf>,
    /// Print results as JSON, one object per line, for scripts (`cat` and `completions`
    /// write their data as is).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Cluster certificate authority.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Node certificates.
    Cert {
        #[command(subcommand)]
        cmd: CertCmd,
    },
    /// Show the node's status as JSON.
    Status {
        /// Keep printing one line per second (a progress bar during a backfill).
        #[arg(long)]
        follow: bool,
    },
    /// Write the file (at the node's current version) to stdout.
    Cat,
    /// Replace the whole file with FILE (only changed chunks are sent through the core);
    /// a progress bar on a terminal, one final line otherwise.
    Put { file: PathBuf },
    /// Write FILE's bytes at --offset.
    Patch {
        #[arg(long)]
        offset: u64,
        file: PathBuf,
    },
    /// Set the file's length (shorter drops the tail, longer pads with zeros).
    Truncate { len: u64 },
    /// Print the tree as an outline with each node's version, lag and children (from a core
    /// node: the whole tree, every core member's subtree merged; from a relay: its subtree).
    Tree,
    /// Print a line for every new version the node applies, or run a command on it (--exec).
    Watch(WatchArgs),
    /// The core's membership (through any core node's API).
    Core {
        #[command(subcommand)]
        cmd: CoreCmd,
    },
    /// Print a shell completion script, e.g. `canopy completions bash > /etc/bash_completion.d/canopy`.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Run a whole cluster on this machine: a core, N relays, a steady write load.
    Demo(crate::demo::DemoArgs),
}

/// Shells `canopy completions` writes scripts for.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(clap::Args, Debug, Clone)]
pub struct WatchArgs {
    /// Versions up to this one count as seen (0: the current version is new).
    #[arg(long, default_value_t = 0)]
    pub after: u64,
    /// Run this shell command (`sh -c`) on each new version, with CANOPY_VERSION,
    /// CANOPY_ROOT, CANOPY_FILE and CANOPY_API in its environment; never two at once.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// The node's materialized copy (its --file), passed as CANOPY_FILE; the command runs
    /// only once that file holds the version or a newer one. Default: the file the node
    /// reports in its status (`file_path`), when it keeps one.
    #[arg(long, requires = "exec")]
    pub file: Option<PathBuf>,
    /// A run starts once the version has stayed the same this long: a burst of writes gives
    /// one run, on its last version.
    #[arg(long, default_value = "1s", value_parser = parse_interval, requires = "exec")]
    pub min_interval: Duration,
    /// Under a steady stream of writes, run anyway this long after the first version not
    /// yet run.
    #[arg(long, default_value = "10s", value_parser = parse_interval, requires = "exec")]
    pub max_wait: Duration,
    /// Retries of a failed run (exit status not 0), with back-off (--retry-delay, doubling
    /// each time, at most a minute); then wait for the next version.
    #[arg(long, default_value_t = 3, requires = "exec")]
    pub retries: u32,
    /// The first back-off after a failed run.
    #[arg(long, default_value = "1s", value_parser = parse_interval, requires = "exec")]
    pub retry_delay: Duration,
    /// Exit after the first run (its exit status, after retries, is canopy's).
    #[arg(long, requires = "exec")]
    pub once: bool,
}

#[derive(Subcommand, Debug)]
pub enum CoreCmd {
    /// Show each member's role, health and lag, the leader and the term.
    Members,
    /// Add a voting member (it must be running with a core certificate).
    Add { name: String, addr: String },
    /// Remove a member from the voting set (refused if fewer than a quorum of the voters
    /// left answer the leader, unless --force).
    Remove {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCmd {
    /// Create ca.pem and ca.key in --out.
    Init {
        #[arg(long)]
        out: PathBuf,
        /// The CA key's kind: ed25519 or p256.
        #[arg(long, default_value = "ed25519")]
        key: crate::tls::KeyAlg,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertCmd {
    /// Issue NAME.pem/NAME.key (plus a copy of ca.pem) in --out, signed by the CA in --ca.
    Issue {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        name: String,
        /// core, relay (may write) or reader (may not write).
        #[arg(long)]
        role: crate::tls::Role,
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate is valid (default: ten years; 0 issues one that has already
        /// expired, for tests).
        #[arg(long)]
        days: Option<u64>,
        /// The node key's kind: ed25519 (default: cheapest for relays to verify a core's
        /// seals with) or p256 (where policy requires a NIST curve).
        #[arg(long, default_value = "ed25519")]
        key: crate::tls::KeyAlg,
    },
}

/// Longest interval the watch flags accept.
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

/// Parses `500ms`, `1s`, `2m`, `1h`, or plain seconds; at most [`MAX_INTERVAL`].
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("expected a duration such as 500ms, 1s or 2m, got {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("unknown unit {u:?}: use ms, s, m or h")),
    };
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d <= MAX_INTERVAL => Ok(d),
        _ => Err(format!("{s:?} is out of range: at most 24h")),
    }
}

/// The `clap` definitions of all three binaries, for completions and man pages.
pub fn commands() -> Vec<clap::Command> {
    use clap::CommandFactory;
    vec![
        Cli::command(),
        crate::cli::CoreNodeCli::command(),
        crate::cli::RelayNodeCli::command(),
    ]
}

/// Writes one man page per binary and subcommand (`canopy.1`, `canopy-watch.1`, ...) into
/// `dir`; returns the files written.
pub fn write_man_pages(dir: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for cmd in commands() {
        write_man_tree(dir, cmd, &mut written)?;
    }
    Ok(written)
}

fn write_man_tree(
    dir: &std::path::Path,
    cmd: clap::Command,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    std::fs::write(&path, out)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let full = format!("{name}-{}", sub.get_name());
        let version = cmd.get_version().unwrap_or("").to_string();
        let sub = sub.clone().name(full).version(version);
        write_man_tree(dir, sub, written)?;
    }
    Ok(())
}

/// Writes `shell`'s completion script for `canopy` to `out`.
pub fn write_completions(shell: Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "canopy", out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_interval("0"), Ok(Duration::ZERO));
        assert!(parse_interval("25h").is_err());
        assert!(parse_interval("99999999999999999999999").is_err());
        assert!(parse_interval("-1s").is_err());
        assert!(parse_interval("1d").is_err());
        assert!(parse_interval("").is_err());
    }

    #[test]
    fn definitions_are_consistent() {
        for c in commands() {
            c.debug_assert();
        }
    }
}
