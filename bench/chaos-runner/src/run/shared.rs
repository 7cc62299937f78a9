//! The state every task of a run shares: the nodes and their processes, the proxy, the
//! history being recorded, and the questions asked of the cluster (who leads, is it up).
//!
//! Invariants: a node's lock is held only for a state change or a read, never across an
//! await; every status taken is checked to come from the node asked.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::bail;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::Config;
use crate::check::{Sample, WriteRec};
use crate::cluster::{self, Kind, Node, State, Tmpfs};
use crate::layout::Layout;
use crate::proxy::Proxy;

/// Longest a core fault waits for the previous one to be healed before it is skipped.
pub(super) const CORE_WAIT: Duration = Duration::from_secs(15);

/// The latest status of a node, for picking fault targets.
#[derive(Clone, Debug, Default)]
pub(super) struct Latest {
    pub parent: String,
    pub children: Vec<String>,
}

pub(super) struct Shared {
    pub(super) cfg: Config,
    pub(super) layout: Layout,
    /// The start of the faults (and of the history's clock).
    pub(super) t0: OnceLock<Instant>,
    pub(super) names: Vec<String>,
    pub(super) kinds: Vec<Kind>,
    pub(super) nodes: Vec<Mutex<Node>>,
    pub(super) ports: Mutex<cluster::Ports>,
    pub(super) proxy: Proxy,
    pub(super) http: reqwest::Client,
    pub(super) latest: Mutex<Vec<Latest>>,
    pub(super) samples: Mutex<Vec<Sample>>,
    pub(super) writes: Mutex<Vec<WriteRec>>,
    pub(super) events: Mutex<Vec<Value>>,
    pub(super) tmpfs: Option<Tmpfs>,
    pub(super) disk_node: Option<usize>,
    /// Faults now holding that take a core out (kills count until the restart is up).
    pub(super) core_faults: AtomicUsize,
    pub(super) stop_writers: AtomicBool,
    pub(super) stop_samplers: AtomicBool,
}

impl Shared {
    pub(super) fn now_s(&self) -> f64 {
        let t = self.t0.get().map_or(0.0, |t| t.elapsed().as_secs_f64());
        (t * 1e3).round() / 1e3
    }

    pub(super) fn t0(&self) -> Instant {
        *self.t0.get_or_init(Instant::now)
    }

    pub(super) fn event(&self, what: &str, mut detail: Value) {
        detail["t_s"] = json!(self.now_s());
        detail["event"] = json!(what);
        self.events.lock().unwrap().push(detail);
    }

    pub(super) fn api(&self, i: usize) -> SocketAddr {
        self.nodes[i].lock().unwrap().api
    }

    pub(super) fn state(&self, i: usize) -> State {
        self.nodes[i].lock().unwrap().state
    }

    pub(super) fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    pub(super) fn of_kind(&self, kind: Kind) -> Vec<usize> {
        (0..self.names.len())
            .filter(|i| self.kinds[*i] == kind)
            .collect()
    }

    pub(super) async fn status(&self, i: usize, timeout: Duration) -> Option<Value> {
        let url = format!("http://{}/v1/status", self.api(i));
        let r = self.http.get(url).timeout(timeout).send().await.ok()?;
        let s: Value = r.json().await.ok()?;
        (s["name"] == self.names[i].as_str()).then_some(s)
    }

    /// The core member that says it leads now (asked now, not from the samples); of two
    /// that say so (one cut off and not yet aware), the one of the higher term.
    pub(super) async fn leader(&self) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for i in self.of_kind(Kind::Core) {
            if self.state(i) != State::Up {
                continue;
            }
            if let Some(s) = self.status(i, Duration::from_secs(1)).await {
                let term = s["core"]["term"].as_u64().unwrap_or(0);
                if s["role"] == "leader" && best.is_none_or(|(t, _)| term > t) {
                    best = Some((term, i));
                }
            }
        }
        best.map(|(_, i)| i)
    }

    /// The leader, waiting up to `CORE_WAIT` for one (an election may be under way).
    pub(super) async fn wait_leader(&self) -> Option<usize> {
        let until = Instant::now() + CORE_WAIT;
        loop {
            if let Some(l) = self.leader().await {
                return Some(l);
            }
            if Instant::now() > until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether every core member is up and no fault holds one out.
    pub(super) fn cores_whole(&self) -> bool {
        self.core_faults.load(Ordering::SeqCst) == 0
            && self
                .of_kind(Kind::Core)
                .iter()
                .all(|i| self.state(*i) == State::Up)
    }

    /// Starts node `i`'s process and waits for its API; new ports after a failed start.
    pub(super) async fn start_node(&self, i: usize) -> anyhow::Result<()> {
        for attempt in 0..5 {
            let api = {
                let mut n = self.nodes[i].lock().unwrap();
                if attempt > 0 {
                    n.kill();
                    n.new_ports(&mut self.ports.lock().unwrap())?;
                    self.proxy.set_backend(i, n.backend);
                }
                n.spawn()?;
                n.api
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            let node = &self.nodes[i];
            let exited = || node.lock().unwrap().exited();
            if cluster::wait_api(&self.http, api, &self.names[i], deadline, exited).await {
                return Ok(());
            }
        }
        bail!("{} did not start; see its log", self.names[i])
    }
}
