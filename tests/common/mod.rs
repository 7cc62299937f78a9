//! Harness for integration tests: real `core-node`/`relay-node` processes on loopback.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const CANOPY: &str = env!("CARGO_BIN_EXE_canopy");
pub const CORE_NODE: &str = env!("CARGO_BIN_EXE_core-node");
pub const RELAY_NODE: &str = env!("CARGO_BIN_EXE_relay-node");

/// Runs the `canopy` CLI and returns stdout; panics with stderr on failure.
pub fn canopy(args: &[&str]) -> String {
    let out = Command::new(CANOPY)
        .args(args)
        .env("CANOPY_API_TOKEN", TOKEN)
        .output()
        .expect("run canopy");
    assert!(
        out.status.success(),
        "canopy {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The API token every test node is started with (`--api-token-file`), and that [`http`]
/// presents.
pub const TOKEN: &str = "test-token";

/// A cluster CA and a directory of node certificates made by the real CLI, and the API
/// token file the nodes share.
pub struct Pki {
    pub ca: PathBuf,
    pub tls: PathBuf,
    pub token: PathBuf,
}

impl Pki {
    pub fn new(root: &Path) -> Pki {
        let ca = root.join("ca");
        let tls = root.join("tls");
        canopy(&["ca", "init", "--out", ca.to_str().unwrap()]);
        let token = root.join("api-token");
        std::fs::write(&token, TOKEN).unwrap();
        Pki { ca, tls, token }
    }

    /// [`Pki::new`], then a certificate per `(name, role)`.
    pub fn with(root: &Path, certs: &[(&str, &str)]) -> Pki {
        let pki = Pki::new(root);
        for (name, role) in certs {
            pki.issue(name, role);
        }
        pki
    }

    pub fn issue(&self, name: &str, role: &str) {
        canopy(&[
            "cert",
            "issue",
            "--ca",
            self.ca.to_str().unwrap(),
            "--name",
            name,
            "--role",
            role,
            "--out",
            self.tls.to_str().unwrap(),
        ]);
    }
}

/// First port handed out, and how many one test process may use: ports below the kernel's
/// ephemeral range (32768 and up by default). A port found by binding port 0 and releasing
/// it can be taken by the next socket that binds port 0 (another node's client endpoint),
/// and the node started on it then dies with "address in use".
const PORT_BASE: u16 = 10_000;
const PORTS_PER_PROCESS: u16 = 1_000;

/// A loopback port no other caller in this process got, free for both UDP and TCP when
/// handed out. Each test process starts in its own window of the range (by its pid), so a
/// port is not reused while a node of a test that just ended may still hold it.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let windows = (32_768 - PORT_BASE) / PORTS_PER_PROCESS;
    let base = PORT_BASE + (std::process::id() % u32::from(windows)) as u16 * PORTS_PER_PROCESS;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % PORTS_PER_PROCESS;
        if UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
}

pub fn free_udp() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

pub fn free_tcp() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// The flags every node process gets.
fn base_args(
    name: &str,
    quic: SocketAddr,
    api: SocketAddr,
    data: &Path,
    file: &Path,
    pki: &Pki,
) -> Vec<String> {
    let tls = &pki.tls;
    vec![
        "--api-token-file".into(),
        pki.token.display().to_string(),
        "--name".into(),
        name.into(),
        "--listen".into(),
        quic.to_string(),
        "--api".into(),
        api.to_string(),
        "--data".into(),
        data.display().to_string(),
        "--tls".into(),
        tls.display().to_string(),
        "--file".into(),
        file.display().to_string(),
    ]
}

/// One node process with the addresses it was started on.
pub struct Proc {
    pub name: String,
    pub quic: SocketAddr,
    pub api: SocketAddr,
    pub data: PathBuf,
    pub file: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    bin: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn_child(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(self.bin)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn node");
        self.child = Some(child);
    }

    /// Starts a node and waits until its API answers. Retries with new ports if the ones
    /// picked were taken in between.
    pub fn start(
        root: &Path,
        pki: &Pki,
        name: &str,
        core: bool,
        join: &[SocketAddr],
        extra: &[&str],
    ) -> Proc {
        Self::start_env(root, pki, name, core, join, extra, &[])
    }

    /// [`Proc::start`] with extra environment variables (fault injection).
    pub fn start_env(
        root: &Path,
        pki: &Pki,
        name: &str,
        core: bool,
        join: &[SocketAddr],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        for _ in 0..3 {
            let quic = free_udp();
            let api = free_tcp();
            let data = root.join("data").join(name);
            let file = root.join("files").join(name);
            let mut args: Vec<String> = base_args(name, quic, api, &data, &file, pki);
            if core {
                args.push("--init".into());
            } else {
                let j: Vec<String> = join.iter().map(|a| a.to_string()).collect();
                args.push("--join".into());
                args.push(j.join(","));
            }
            args.extend(extra.iter().map(|s| s.to_string()));
            let mut p = Proc {
                name: name.into(),
                quic,
                api,
                data,
                file,
                args,
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                bin: if core { CORE_NODE } else { RELAY_NODE },
                child: None,
                log: root.join(format!("{name}.log")),
            };
            p.spawn_child();
            if p.wait_ready() {
                return p;
            }
        }
        panic!("node {name} did not start; see its log");
    }

    /// Starts a core cluster: every member knows every other through `--peer`, all get
    /// `--init` (a second init is harmless). Ports are picked up front.
    pub fn start_core_cluster(root: &Path, pki: &Pki, names: &[&str]) -> Vec<Proc> {
        let addrs: Vec<(SocketAddr, SocketAddr)> =
            names.iter().map(|_| (free_udp(), free_tcp())).collect();
        let peers: Vec<String> = names
            .iter()
            .zip(&addrs)
            .flat_map(|(n, (q, _))| ["--peer".to_string(), format!("{n}={q}")])
            .collect();
        let mut procs: Vec<Proc> = names
            .iter()
            .zip(&addrs)
            .map(|(name, (quic, api))| {
                let data = root.join("data").join(name);
                let file = root.join("files").join(name);
                let mut args: Vec<String> = {
                    let mut a = base_args(name, *quic, *api, &data, &file, pki);
                    a.push("--init".into());
                    a
                };
                args.extend(peers.iter().cloned());
                Proc {
                    name: name.to_string(),
                    quic: *quic,
                    api: *api,
                    data,
                    file,
                    args,
                    env: Vec::new(),
                    bin: CORE_NODE,
                    child: None,
                    log: root.join(format!("{name}.log")),
                }
            })
            .collect();
        for p in &mut procs {
            p.spawn_child();
        }
        for p in &mut procs {
            assert!(p.wait_ready(), "core {} did not start; see its log", p.name);
        }
        procs
    }

    /// Starts a node whose QUIC address is `quic` (picked by the caller, e.g. to name it in
    /// another node's flags first), with `extra` flags; `--init` for a core is left to them.
    pub fn start_at(
        root: &Path,
        pki: &Pki,
        name: &str,
        core: bool,
        quic: SocketAddr,
        extra: &[&str],
    ) -> Proc {
        let api = free_tcp();
        let data = root.join("data").join(name);
        let file = root.join("files").join(name);
        let mut args: Vec<String> = base_args(name, quic, api, &data, &file, pki);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut p = Proc {
            name: name.to_string(),
            quic,
            api,
            data,
            file,
            args,
            env: Vec::new(),
            bin: if core { CORE_NODE } else { RELAY_NODE },
            child: None,
            log: root.join(format!("{name}.log")),
        };
        p.spawn_child();
        assert!(p.wait_ready(), "{name} did not start; see its log");
        p
    }

    /// Starts a core node without `--init`, to be added to a running core with
    /// `canopy core add`.
    pub fn start_core_joiner(root: &Path, pki: &Pki, name: &str) -> Proc {
        let (quic, api) = (free_udp(), free_tcp());
        let data = root.join("data").join(name);
        let file = root.join("files").join(name);
        let args: Vec<String> = base_args(name, quic, api, &data, &file, pki);
        let mut p = Proc {
            name: name.to_string(),
            quic,
            api,
            data,
            file,
            args,
            env: Vec::new(),
            bin: CORE_NODE,
            child: None,
            log: root.join(format!("{name}.log")),
        };
        p.spawn_child();
        assert!(p.wait_ready(), "core {name} did not start; see its log");
        p
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "kill {sig} {}", self.name);
        }
    }

    /// SIGSTOPs the process: it reads nothing until [`Proc::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// The process's exit status, once it has exited by itself.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            if std::net::TcpStream::connect(self.api).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Replaces the extra environment variables the next (re)start gets.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILLs the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again with the same flags and ports, without waiting for it.
    pub fn respawn(&mut self) {
        self.kill();
        self.spawn_child();
    }

    /// Starts the process again with the same flags and ports.
    pub fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            self.spawn_child();
            if self.wait_ready() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{} did not restart", self.name);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- last lines of {} ----", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// An HTTP client that presents the test nodes' API token.
pub fn http() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .default_headers(headers)
        .build()
        .unwrap()
}

pub async fn status(c: &reqwest::Client, p: &Proc) -> Option<Value> {
    c.get(p.url("/v1/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// Polls `cond` until it holds or `secs` pass; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The node's Prometheus text.
pub async fn metrics(c: &reqwest::Client, p: &Proc) -> String {
    c.get(p.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the first series of `name` in Prometheus text (the library's one parser).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    canopy::measure::metric_value(text, name)
}

/// The sum over the series of `name` whose labels contain `label` (`how="sampled"`), 0
/// when there is none.
pub fn metric_labelled(text: &str, name: &str, label: &str) -> f64 {
    canopy::measure::prometheus_samples(text)
        .filter(|s| s.name == name && s.labels.contains(label))
        .map(|s| s.value)
        .sum()
}

/// Version and root from a node's status.
pub async fn version_root(c: &reqwest::Client, p: &Proc) -> Option<(u64, String)> {
    let s = status(c, p).await?;
    Some((s["version"].as_u64()?, s["root"].as_str()?.to_string()))
}

/// Waits until `core` leads its core.
pub async fn wait_leader(c: &reqwest::Client, core: &Proc) {
    wait_until(30, "core to lead", || async {
        status(c, core).await.map(|s| s["role"] == "leader") == Some(true)
    })
    .await;
}

/// Certificates for `core` and `r1` under `root`, a one-node core `core` that leads, and a
/// relay `r1` started below it (not waited for): the setup most two-node tests begin with.
/// The [`Pki`] is returned for restarts and further certificates.
pub async fn core_and_relay(root: &Path) -> (Pki, Proc, Proc, reqwest::Client) {
    core_and_relay_env(root, &[]).await
}

/// [`core_and_relay`] with extra environment variables for the relay (fault injection).
pub async fn core_and_relay_env(
    root: &Path,
    env: &[(&str, &str)],
) -> (Pki, Proc, Proc, reqwest::Client) {
    let pki = Pki::new(root);
    pki.issue("core", "core");
    pki.issue("r1", "relay");
    let core = Proc::start(root, &pki, "core", true, &[], &[]);
    let c = http();
    wait_leader(&c, &core).await;
    let r1 = Proc::start_env(root, &pki, "r1", false, &[core.quic], &[], env);
    (pki, core, r1, c)
}

/// Waits until `p` has applied and materialized `version` (its `--file` holds it); returns
/// its status.
pub async fn wait_materialized(c: &reqwest::Client, p: &Proc, version: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = status(c, p).await {
            if s["version"].as_u64() == Some(version) && s["file_version"].as_u64() == Some(version)
            {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} did not materialize {version}",
            p.name
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The bytes `p` serves at its current version.
pub async fn file_of(c: &reqwest::Client, p: &Proc) -> Vec<u8> {
    c.get(p.url("/v1/file"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

/// Replaces the whole file on `node` with `size` seeded random bytes; returns the version and
/// the content.
pub async fn put_random(
    c: &reqwest::Client,
    node: &Proc,
    size: usize,
    seed: u64,
) -> (u64, Vec<u8>) {
    use rand::{RngCore, SeedableRng};
    let mut content = vec![0u8; size];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut content);
    let r = c
        .put(node.url("/v1/file"))
        .body(content.clone())
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "{}",
        r.text().await.unwrap_or_default()
    );
    let v = r.json::<Value>().await.unwrap()["version"]
        .as_u64()
        .unwrap();
    (v, content)
}

/// The index of the core node that leads (waits up to 60 s for one).
pub async fn leader_index(c: &reqwest::Client, cores: &[Proc]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (i, p) in cores.iter().enumerate() {
            if p.is_running() && status(c, p).await.is_some_and(|s| s["role"] == "leader") {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no leader within 60 s");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The Raft term a core node reports.
pub async fn term(c: &reqwest::Client, p: &Proc) -> u64 {
    status(c, p).await.unwrap()["core"]["term"]
        .as_u64()
        .unwrap()
}

/// Writes `body` at `offset` through `p`; the version, or `None` if it failed.
pub async fn patch(c: &reqwest::Client, p: &Proc, offset: u64, body: Vec<u8>) -> Option<u64> {
    patch_api(c, p.api, offset, body).await
}

/// [`patch`] by the node's API address, for tasks that do not hold its [`Proc`].
pub async fn patch_api(
    c: &reqwest::Client,
    api: SocketAddr,
    offset: u64,
    body: Vec<u8>,
) -> Option<u64> {
    let r = c
        .patch(format!("http://{api}/v1/file?offset={offset}"))
        .body(body)
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json::<serde_json::Value>().await.ok()?["version"].as_u64()
}

/// Waits until every node in `nodes` shows the same version and root; returns them.
pub async fn agree(c: &reqwest::Client, nodes: &[&Proc]) -> (u64, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen = Vec::new();
        for p in nodes {
            seen.push(version_root(c, p).await);
        }
        if seen.iter().all(|x| x.is_some() && *x == seen[0]) {
            return seen[0].clone().unwrap();
        }
        assert!(Instant::now() < deadline, "nodes did not agree: {seen:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A core of `n` members c1..cN, every one its own process.
pub fn core_cluster(root: &Path, n: usize) -> (Pki, Vec<Proc>) {
    let pki = Pki::new(root);
    let names: Vec<String> = (1..=n).map(|i| format!("c{i}")).collect();
    for nm in &names {
        pki.issue(nm, "core");
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let cores = Proc::start_core_cluster(root, &pki, &refs);
    (pki, cores)
}

/// A QUIC endpoint on 127.0.0.1 with a relay certificate named `name` from the CA at `ca`
/// (issued into `root/client-NAME`): a hand-driven peer for tests that speak the protocol.
pub fn quic_client(root: &Path, ca: &Path, name: &str) -> quinn::Endpoint {
    quic_client_as(root, ca, name, canopy::tls::Role::Relay)
}

/// A QUIC endpoint with a certificate `name` and `role` of the cluster's CA.
pub fn quic_client_as(
    root: &Path,
    ca: &Path,
    name: &str,
    role: canopy::tls::Role,
) -> quinn::Endpoint {
    let dir = root.join(format!("client-{name}"));
    canopy::tls::cert_issue(ca, name, role, &dir).unwrap();
    let id = canopy::tls::Identity::load(&dir, name).unwrap();
    canopy::tls::endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &id,
        &canopy::tls::TransportConfig::default(),
    )
    .unwrap()
}

/// Mounts a tmpfs of `mb` MiB at `dir`; None (with the reason printed) where mounting is
/// not permitted.
pub fn mount_tmpfs(dir: &Path, mb: u64) -> Option<Mount> {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
        .arg(dir)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(Mount(dir.to_path_buf())),
        Ok(o) => {
            eprintln!(
                "skipping: cannot mount a tmpfs ({})",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("skipping: cannot run mount ({e})");
            None
        }
    }
}

/// Mounts a fresh XFS with reflinks (`mkfs.xfs -m reflink=1` on a sparse image of `mb` MiB
/// beside `dir`, on a loop device) at `dir`; None (with the reason printed) where xfsprogs
/// cannot be installed or mounting is not permitted.
pub fn mount_xfs(dir: &Path, mb: u64) -> Option<Mount> {
    std::fs::create_dir_all(dir).unwrap();
    let has_mkfs = || {
        Command::new("mkfs.xfs")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has_mkfs() {
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "xfsprogs"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output();
    }
    if !has_mkfs() {
        eprintln!("skipping: mkfs.xfs is missing and xfsprogs could not be installed");
        return None;
    }
    let img = dir.with_extension("xfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(mb << 20)
        .unwrap();
    let run = |cmd: &mut Command| -> Result<(), String> {
        match cmd.output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    let made = run(Command::new("mkfs.xfs")
        .args(["-q", "-f", "-m", "reflink=1"])
        .arg(&img))
    .and_then(|()| {
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(dir))
    });
    match made {
        Ok(()) => Some(Mount(dir.to_path_buf())),
        Err(e) => {
            eprintln!("skipping: cannot make and mount an XFS image ({e})");
            None
        }
    }
}

pub struct Mount(PathBuf);

impl Mount {
    pub fn resize(&self, mb: u64) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={mb}m")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {}", self.0.display());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A process spawned by hand (not a [`Proc`]), killed when dropped; its log file (the
/// second field) is printed when a test fails.
pub struct KillOnDrop(pub Child, pub PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} ---\n{}",
                self.1.display(),
                std::fs::read_to_string(&self.1).unwrap_or_default()
            );
        }
    }
}
