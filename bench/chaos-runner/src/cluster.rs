//! The processes of a chaos run: certificates from the real `canopy` CLI, one `core-node` or
//! `relay-node` process per node, kills, pauses, restarts, and the tmpfs that fills up.
//!
//! Invariants:
//! - Every node listens on its own backend port and advertises its proxy front, so every
//!   QUIC path between nodes goes through the proxy; a restart keeps the ports and flags.
//! - A node is in exactly one of the states Up, Paused, Down; only an Up node is killed or
//!   paused, and every process started is killed when the cluster is dropped (also when the
//!   runner itself dies: children get SIGKILL as their parent-death signal).
//! - Each start of a node's process is a new incarnation, numbered from 1.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::time::Instant;

/// The binaries a run starts.
#[derive(Clone, Debug)]
pub struct Bins {
    pub canopy: PathBuf,
    pub core_node: PathBuf,
    pub relay_node: PathBuf,
}

impl Bins {
    /// `canopy`, `core-node` and `relay-node` in `dir`.
    pub fn in_dir(dir: &Path) -> Bins {
        Bins {
            canopy: dir.join("canopy"),
            core_node: dir.join("core-node"),
            relay_node: dir.join("relay-node"),
        }
    }
}

/// A node's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Core,
    Relay,
}

/// Whether a node's process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Up,
    Paused,
    Down,
}

/// One node and its process.
pub struct Node {
    pub name: String,
    pub kind: Kind,
    pub backend: SocketAddr,
    pub api: SocketAddr,
    pub file: PathBuf,
    pub log: PathBuf,
    pub state: State,
    pub incarnation: u32,
    bin: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

/// Ports for the nodes: below the kernel's ephemeral range, so that no socket bound to port 0
/// (the proxy's, the runner's HTTP connections) ever takes a node's port while the node is
/// down; and each handed out once per run.
pub struct Ports {
    next: u16,
    start: u16,
    end: u16,
    used: HashSet<u16>,
}

impl Ports {
    /// An allocator starting at a place of its own for this process and seed.
    pub fn new(seed: u64) -> Ports {
        let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32768);
        let (start, end) = (10_000u16, low.clamp(12_000, 60_000));
        let span = (end - start) as u64;
        let at = (std::process::id() as u64 * 7919 + seed.wrapping_mul(104_729)) % span;
        Ports {
            next: start + at as u16,
            start,
            end,
            used: HashSet::new(),
        }
    }

    /// A port on 127.0.0.1 free for both UDP and TCP now, and not handed out before.
    pub fn take(&mut self) -> anyhow::Result<u16> {
        for _ in self.start..self.end {
            let p = self.next;
            self.next = if p + 1 >= self.end { self.start } else { p + 1 };
            if self.used.contains(&p) {
                continue;
            }
            let addr = SocketAddr::from(([127, 0, 0, 1], p));
            if UdpSocket::bind(addr).is_ok() && TcpListener::bind(addr).is_ok() {
                self.used.insert(p);
                return Ok(p);
            }
        }
        bail!("no free port in {}..{}", self.start, self.end)
    }

    /// `take`, as an address on 127.0.0.1.
    pub fn addr(&mut self) -> anyhow::Result<SocketAddr> {
        Ok(SocketAddr::from(([127, 0, 0, 1], self.take()?)))
    }
}

/// Runs the `canopy` CLI; fails with its stderr.
pub fn canopy_cli(bins: &Bins, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(&bins.canopy)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bins.canopy.display()))?;
    if !out.status.success() {
        bail!(
            "canopy {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Node {
    /// A node that is not started yet, with its `--data` and `--file`, the address it listens
    /// on, the one it advertises and its API's; `args` are its flags beyond the common ones. Its log goes
    /// to `dir/NAME.log`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        kind: Kind,
        bins: &Bins,
        dir: &Path,
        tls: &Path,
        (data, file): (PathBuf, PathBuf),
        (backend, front, api): (SocketAddr, SocketAddr, SocketAddr),
        args: Vec<String>,
    ) -> anyhow::Result<Node> {
        let mut all: Vec<String> = [
            "--name",
            name,
            "--listen",
            &backend.to_string(),
            "--advertise",
            &front.to_string(),
            "--api",
            &api.to_string(),
            "--data",
            &data.display().to_string(),
            "--file",
            &file.display().to_string(),
            "--tls",
            &tls.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        all.extend(args);
        Ok(Node {
            name: name.to_string(),
            kind,
            backend,
            api,
            file,
            log: dir.join(format!("{name}.log")),
            state: State::Down,
            incarnation: 0,
            bin: match kind {
                Kind::Core => bins.core_node.clone(),
                Kind::Relay => bins.relay_node.clone(),
            },
            args: all,
            child: None,
        })
    }

    /// Takes new ports for the backend and the API (when the old ones were taken).
    pub fn new_ports(&mut self, ports: &mut Ports) -> anyhow::Result<()> {
        let (b, a) = (ports.addr()?, ports.addr()?);
        for arg in self.args.iter_mut() {
            if *arg == self.backend.to_string() {
                *arg = b.to_string();
            } else if *arg == self.api.to_string() {
                *arg = a.to_string();
            }
        }
        self.backend = b;
        self.api = a;
        Ok(())
    }

    /// Starts the process (a new incarnation); it is Up from now on.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        self.incarnation += 1;
        self.state = State::Up;
        Ok(())
    }

    /// Whether the process has exited by itself.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))))
    }

    /// `kill -9`, and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.state = State::Down;
    }

    fn signal(&self, sig: libc::c_int) -> anyhow::Result<()> {
        let Some(c) = &self.child else {
            bail!("{} has no process", self.name);
        };
        // SAFETY: kill(2) on our own child's pid.
        if unsafe { libc::kill(c.id() as libc::pid_t, sig) } != 0 {
            bail!(
                "signal {sig} to {}: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// SIGSTOP.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.signal(libc::SIGSTOP)?;
        self.state = State::Paused;
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.signal(libc::SIGCONT)?;
        self.state = State::Up;
        Ok(())
    }

    /// Lines of its log at ERROR and at WARN level.
    pub fn log_levels(&self) -> (u64, u64) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut counts = (0, 0);
        for line in text.lines() {
            match level(line) {
                Some("ERROR") => counts.0 += 1,
                Some("WARN") => counts.1 += 1,
                _ => {}
            }
        }
        counts
    }
}

/// The level of a tracing log line (`TIME LEVEL target: message`, colored or not).
fn level(line: &str) -> Option<&str> {
    let mut plain = String::with_capacity(64);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
        if plain.len() >= 64 {
            break;
        }
    }
    let word = plain.split_whitespace().nth(1)?;
    ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"]
        .into_iter()
        .find(|l| *l == word)
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the API at `api` answers as node `name`, or the deadline passes, or `exited`
/// says the process is gone.
pub async fn wait_api(
    http: &reqwest::Client,
    api: SocketAddr,
    name: &str,
    deadline: Instant,
    mut exited: impl FnMut() -> bool,
) -> bool {
    let url = format!("http://{api}/v1/status");
    while Instant::now() < deadline {
        if exited() {
            return false;
        }
        if let Ok(r) = http.get(&url).timeout(Duration::from_secs(2)).send().await {
            if let Ok(s) = r.json::<serde_json::Value>().await {
                if s["name"] == name {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A small tmpfs, unmounted on drop.
pub struct Tmpfs {
    pub dir: PathBuf,
    filler: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` at `dir` (made if missing).
    pub fn mount(dir: &Path, bytes: u64) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "mount -t tmpfs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
            filler: dir.join("filler"),
        })
    }

    /// Fills the free space with a filler file; returns the bytes it took.
    pub fn fill(&self) -> u64 {
        use std::io::Write;
        let Ok(mut f) = std::fs::File::create(&self.filler) else {
            return 0;
        };
        let block = vec![0xa5u8; 4096];
        let mut n = 0;
        while let Ok(k) = f.write(&block) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    }

    /// Removes the filler.
    pub fn free(&self) {
        let _ = std::fs::remove_file(&self.filler);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_handed_out_once_and_below_the_ephemeral_range() {
        let mut p = Ports::new(3);
        let a: Vec<u16> = (0..50).map(|_| p.take().unwrap()).collect();
        let unique: HashSet<u16> = a.iter().copied().collect();
        assert_eq!(unique.len(), 50);
        assert!(a.iter().all(|x| (p.start..p.end).contains(x)));
    }

    #[test]
    fn log_levels_with_and_without_color() {
        assert_eq!(
            level("\u{1b}[2m2026-12-01T20:28:24.486587Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m \u{1b}[2mopenraft\u{1b}[0m: x"),
            Some("WARN")
        );
        assert_eq!(
            level("2026-12-01T20:28:24Z ERROR canopy::node: ERROR y"),
            Some("ERROR")
        );
        assert_eq!(
            level("2026-12-01T20:28:24Z  INFO canopy: an ERROR in text"),
            Some("INFO")
        );
        assert_eq!(level("thread 'main' panicked"), None);
    }
}
