//! Debian tools the operator-view tests drive (prometheus, promtool, chromium): found on
//! PATH, or installed with apt-get when the test runs as root (as CI does).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

static APT: Mutex<()> = Mutex::new(());

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The path of `bin`, installing Debian's `package` first when it is missing. Panics with
/// the command to run when it cannot be installed.
pub fn debian_tool(bin: &str, package: &str) -> PathBuf {
    let _one = APT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = which(bin) {
        return p;
    }
    assert!(
        is_root(),
        "{bin} is missing: apt-get install {package} (as root), then run the test again"
    );
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !install() {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        assert!(install(), "apt-get install {package} failed");
    }
    which(bin).unwrap_or_else(|| panic!("{package} installed no {bin}"))
}

/// A cluster as an operator would run it: 3 core members and `relays` relay processes on
/// loopback, fan-out 3 everywhere so the tree has depth, a 256 KiB file written first.
pub struct OpsCluster {
    pub pki: crate::common::Pki,
    pub cores: Vec<crate::common::Proc>,
    pub relays: Vec<crate::common::Proc>,
    pub dir: tempfile::TempDir,
}

impl OpsCluster {
    pub async fn start(relays: usize) -> OpsCluster {
        use crate::common::*;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let pki = Pki::new(&root);
        let names = ["c1", "c2", "c3"];
        for n in names {
            pki.issue(n, "core");
        }
        for i in 1..=relays {
            pki.issue(&format!("r{i:02}"), "relay");
        }
        let quic: Vec<std::net::SocketAddr> = names.iter().map(|_| free_udp()).collect();
        let mut flags: Vec<String> = vec!["--init".into(), "--fanout".into(), "3".into()];
        for (n, q) in names.iter().zip(&quic) {
            flags.push("--peer".into());
            flags.push(format!("{n}={q}"));
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let cores: Vec<Proc> = names
            .iter()
            .zip(&quic)
            .map(|(n, q)| Proc::start_at(&root, &pki, n, true, *q, &flags))
            .collect();
        let c = http();
        wait_until(60, "a leader", || async {
            let mut leaders = 0;
            for p in &cores {
                if status(&c, p).await.map(|s| s["role"] == "leader") == Some(true) {
                    leaders += 1;
                }
            }
            leaders == 1
        })
        .await;
        let _ = put_random(&c, &cores[0], 256 * 1024, 16).await;
        let join: Vec<std::net::SocketAddr> = cores.iter().map(|p| p.quic).collect();
        let relays: Vec<Proc> = (1..=relays)
            .map(|i| {
                Proc::start(
                    &root,
                    &pki,
                    &format!("r{i:02}"),
                    false,
                    &join,
                    &["--fanout", "3"],
                )
            })
            .collect();
        let cluster = OpsCluster {
            pki,
            cores,
            relays,
            dir,
        };
        cluster.wait_settled(120).await;
        cluster
    }

    /// Every live node, cores first.
    pub fn all(&self) -> Vec<&crate::common::Proc> {
        self.cores
            .iter()
            .chain(self.relays.iter().filter(|p| p.is_running()))
            .collect()
    }

    /// Waits until every live relay is attached and holds the core's version.
    pub async fn wait_settled(&self, secs: u64) {
        use crate::common::*;
        let c = http();
        wait_until(secs, "every relay attached and in sync", || async {
            let Some(core) = status(&c, &self.cores[0]).await else {
                return false;
            };
            let v = core["version"].as_u64().unwrap_or(0);
            for p in self.relays.iter().filter(|p| p.is_running()) {
                let Some(s) = status(&c, p).await else {
                    return false;
                };
                if s["depth"].is_null() || s["version"].as_u64() != Some(v) {
                    return false;
                }
            }
            true
        })
        .await;
    }

    /// The index of a running relay that has children.
    pub async fn relay_with_children(&self) -> usize {
        use crate::common::*;
        let c = http();
        for (i, p) in self.relays.iter().enumerate() {
            if !p.is_running() {
                continue;
            }
            let s = status(&c, p).await.unwrap();
            if !s["children"].as_array().unwrap().is_empty() {
                return i;
            }
        }
        panic!("no relay has children: the tree has no depth");
    }
}
