//! Shared command-line handling of the `core-node` and `relay-node` binaries.
//!
//! Invariants: flags win over the `--config` TOML, which wins over defaults; every failure
//! before the node runs is one clear line on stderr that names the fix, and an exit code
//! from [`exit`] (listed in `--help`), never a panic; a `core-node` runs only with a
//! certificate whose role is `core`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{NodeConfig, NodeKind, StreamConfig};
use crate::consensus::{Member, RaftConfig};
use crate::tls::{Identity, TlsError};

/// Exit codes of `core-node` and `relay-node` (also in their `--help`).
pub mod exit {
    /// The node failed while running.
    pub const FAILURE: u8 = 1;
    /// Bad flags or config file.
    pub const USAGE: u8 = 2;
    /// `--listen` or `--api` could not be bound (in use, or not an address of this host).
    pub const ADDRESS: u8 = 3;
    /// TLS files missing or invalid, or a certificate of the wrong role.
    pub const TLS: u8 = 4;
    /// `--data` or `--file` is not a writable place.
    pub const STORAGE: u8 = 5;
}

/// The exit codes as `--help` shows them.
pub const NODE_EXIT_CODES: &str = "\
Exit codes:
  0  stopped by SIGTERM or Ctrl-C
  1  failed while running (see the log)
  2  bad flags or config file
  3  --listen or --api cannot be bound (in use by another process, or not an address of this host)
  4  TLS files missing or invalid, or a certificate of the wrong role for this binary
  5  --data or --file is not a writable place";

/// Why a node binary stopped before or while running; each maps to an [`exit`] code.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Usage(String),
    #[error("{flag} {addr}: {source}: {hint}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{source}; {hint}")]
    Tls { source: TlsError, hint: String },
    #[error("{}: has role {role}, but core-node needs a core certificate; issue one with `canopy cert issue --ca CA_DIR --name {name} --role core --out {}`", .cert.display(), .dir.display())]
    WrongRole {
        cert: PathBuf,
        dir: PathBuf,
        name: String,
        role: crate::tls::Role,
    },
    #[error("{flag} {}: {reason}; give a path the node's user can write (the directory is created if missing)", .path.display())]
    Storage {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
}

impl StartError {
    /// The process exit code for this error.
    pub fn code(&self) -> u8 {
        match self {
            StartError::Usage(_) => exit::USAGE,
            StartError::Bind { .. } => exit::ADDRESS,
            StartError::Tls { .. } | StartError::WrongRole { .. } => exit::TLS,
            StartError::Storage { .. } => exit::STORAGE,
            StartError::Node(_) => exit::FAILURE,
        }
    }
}

fn usage(msg: impl Into<String>) -> StartError {
    StartError::Usage(msg.into())
}

/// Where a node's HTTP API listens without `--api`: loopback only, so that nothing off the
/// host reaches it unless the operator says so; the port is where `canopy` looks by default
/// (one node per host).
pub const DEFAULT_API: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7070);

/// Flags common to both node binaries.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = NODE_EXIT_CODES)]
pub struct NodeArgs {
    /// TOML file of these settings, named as the flags (flags win), except `peers = [...]` for
    /// `--peer` and `[stream] fanout` for `--fanout` (`--log` has none); `[stream]`, `[overlay]`,
    /// `[materialize]`, `[limits]` and `[raft]` tables tune the rest (deploy/*.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's name; its certificate must be `--tls/NAME.pem`.
    #[arg(long)]
    pub name: Option<String>,
    /// UDP address for QUIC (peers and children connect here).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address other nodes use to reach this one (default: --listen).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// TCP address of the local HTTP API (default 127.0.0.1:7070, where `canopy` looks).
    #[arg(long)]
    pub api: Option<SocketAddr>,
    /// Directory for durable state.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Directory holding ca.pem, NAME.pem and NAME.key.
    #[arg(long)]
    pub tls: Option<PathBuf>,
    /// Where to keep the materialized copy of the file.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// A core member as NAME=ADDR (repeat for each; core nodes list all members, themselves
    /// included; relays may list them to learn every core address).
    #[arg(long = "peer", value_parser = parse_peer)]
    pub peers: Vec<Member>,
    /// Maximum number of children this node serves.
    #[arg(long)]
    pub fanout: Option<usize>,
    /// File holding the token that API writes must present (default: DATA/api-token,
    /// created at first start with mode 0600).
    #[arg(long)]
    pub api_token_file: Option<PathBuf>,
    /// Seed of the overlay's random choices (default: drawn at start and logged; pass the
    /// logged one to replay a run).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The zone (rack, region) this node runs in: parents in the same zone are preferred
    /// (default: none).
    #[arg(long)]
    pub zone: Option<String>,
    /// Core nodes: the zones to keep a share of this node's slots for, comma-separated
    /// (e.g. `rack-1,rack-2,rack-3`; default: none, every slot to whoever asks first).
    #[arg(long, value_delimiter = ',')]
    pub zone_shares: Option<Vec<String>>,
    /// Log filter (also RUST_LOG), e.g. `info` or `canopy=debug`.
    #[arg(long, default_value = "info")]
    pub log: String,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    listen: Option<SocketAddr>,
    advertise: Option<SocketAddr>,
    api: Option<SocketAddr>,
    data: Option<PathBuf>,
    tls: Option<PathBuf>,
    file: Option<PathBuf>,
    join: Option<Vec<String>>,
    init: Option<bool>,
    peers: Option<Vec<String>>,
    seed: Option<u64>,
    zone: Option<String>,
    zone_shares: Option<Vec<String>>,
    api_token_file: Option<PathBuf>,
    #[serde(default)]
    stream: Option<StreamConfig>,
    #[serde(default)]
    overlay: Option<crate::overlay::OverlayConfig>,
    #[serde(default)]
    limits: Option<crate::config::LimitsConfig>,
    #[serde(default)]
    materialize: Option<crate::config::MaterializeConfig>,
    #[serde(default)]
    raft: Option<RaftConfig>,
}

/// Parses `NAME=HOST:PORT`.
pub fn parse_peer(s: &str) -> Result<Member, String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=ADDR, got {s:?}"))?;
    if name.is_empty() || addr.is_empty() {
        return Err(format!("expected NAME=ADDR, got {s:?}"));
    }
    Ok(Member {
        name: name.to_string(),
        addr: addr.to_string(),
    })
}

/// Which binary is running, with its own flags.
pub enum Role {
    Core { init: bool },
    Relay { join: Vec<String> },
}

/// Everything a node binary needs after parsing.
pub struct Prepared {
    pub cfg: NodeConfig,
    pub listen: SocketAddr,
    pub api: SocketAddr,
    pub tls: PathBuf,
}

/// Merges flags, the config file and defaults into a validated node config.
pub fn prepare(args: &NodeArgs, role: Role) -> Result<Prepared, StartError> {
    let fc: FileConfig = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| usage(format!("--config {}: {e}", p.display())))?;
            toml::from_str(&text).map_err(|e| {
                usage(format!(
                    "--config {}: {}; every key is shown in the example configs (deploy/canopy-core.toml, deploy/canopy-relay.toml)",
                    p.display(),
                    one_line(&e.to_string())
                ))
            })?
        }
        None => FileConfig::default(),
    };
    let name = args
        .name
        .clone()
        .or(fc.name)
        .ok_or_else(|| usage("--name is required (or `name` in --config)"))?;
    let listen = args
        .listen
        .or(fc.listen)
        .ok_or_else(|| usage("--listen is required (or `listen` in --config)"))?;
    let api = args.api.or(fc.api).unwrap_or(DEFAULT_API);
    let data = args
        .data
        .clone()
        .or(fc.data)
        .ok_or_else(|| usage("--data is required (or `data` in --config)"))?;
    let tls = args
        .tls
        .clone()
        .or(fc.tls)
        .ok_or_else(|| usage("--tls is required (or `tls` in --config)"))?;
    let advertise = args.advertise.or(fc.advertise).unwrap_or(listen);
    if advertise.ip().is_unspecified() {
        return Err(usage(format!(
            "--advertise is required when --listen is a wildcard address ({listen}): give the address other nodes reach this one at"
        )));
    }
    let mut stream = fc.stream.unwrap_or_default();
    if let Some(k) = args.fanout {
        stream.fanout = k;
    }
    let peers = if args.peers.is_empty() {
        fc.peers
            .unwrap_or_default()
            .iter()
            .map(|p| parse_peer(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| usage(format!("config peers: {e}")))?
    } else {
        args.peers.clone()
    };
    let kind = match role {
        Role::Core { init } => NodeKind::Core {
            raft: fc.raft.unwrap_or_default(),
            init: init || fc.init.unwrap_or(false),
            peers,
        },
        Role::Relay { join } => {
            let mut join = if join.is_empty() {
                fc.join.unwrap_or_default()
            } else {
                join
            };
            for p in peers {
                if !join.contains(&p.addr) {
                    join.push(p.addr);
                }
            }
            NodeKind::Relay { join }
        }
    };
    let cfg = NodeConfig {
        name,
        advertise,
        data,
        file: args.file.clone().or(fc.file),
        kind,
        stream,
        overlay: fc.overlay.unwrap_or_default(),
        limits: fc.limits.unwrap_or_default(),
        materialize: fc.materialize.unwrap_or_default(),
        api_token_file: args.api_token_file.clone().or(fc.api_token_file),
        seed: args.seed.or(fc.seed),
        zone: args.zone.clone().or(fc.zone),
        zone_shares: args
            .zone_shares
            .clone()
            .or(fc.zone_shares)
            .unwrap_or_default(),
    };
    cfg.validate()
        .map_err(|e| usage(format!("invalid configuration: {e}")))?;
    Ok(Prepared {
        cfg,
        listen,
        api,
        tls,
    })
}

/// Sets up logging from `--log` (or RUST_LOG); colours only on a terminal, so journald and
/// log files get plain text.
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .finish()
        .with(crate::consensus::QuietPeerErrors)
        .try_init();
}

/// `core-node`'s command line.
#[derive(Parser, Debug)]
#[command(
    name = "core-node",
    version = crate::VERSION,
    about = "A Canopy core node: orders every change and streams it to the tree"
)]
pub struct CoreNodeCli {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Form the cluster of the `--peer` members (without `--peer`, a one-member cluster) on
    /// first start; harmless if already initialized.
    #[arg(long)]
    pub init: bool,
}

/// `relay-node`'s command line.
#[derive(Parser, Debug)]
#[command(
    name = "relay-node",
    version = crate::VERSION,
    about = "A Canopy relay node: follows the committed stream and relays it"
)]
pub struct RelayNodeCli {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Parents to try, in order (core nodes or other relays), as HOST:PORT.
    #[arg(long, value_delimiter = ',')]
    pub join: Vec<String>,
}

/// The whole `core-node` binary.
pub fn core_node_main() -> ExitCode {
    let cli = CoreNodeCli::parse();
    node_main(cli.node, Role::Core { init: cli.init })
}

/// The whole `relay-node` binary.
pub fn relay_node_main() -> ExitCode {
    let cli = RelayNodeCli::parse();
    node_main(cli.node, Role::Relay { join: cli.join })
}

/// Runs a node binary to completion: binds sockets, starts the node, stops on Ctrl-C or
/// SIGTERM. Prints one error line and exits with an [`exit`] code on any failure.
pub fn node_main(args: NodeArgs, role: Role) -> ExitCode {
    init_logging(&args.log);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match rt.block_on(run_node(args, role)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            ExitCode::from(e.code())
        }
    }
}

/// Joins a multi-line message (TOML parse errors quote the source) into one line.
fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Loads the node's identity, naming the fix on failure; a core node needs a core certificate.
fn load_identity(dir: &Path, name: &str, core: bool) -> Result<Identity, StartError> {
    let id = Identity::load(dir, name).map_err(|source| {
        let hint = match &source {
            TlsError::MissingFile(p) if p.ends_with("ca.pem") => format!(
                "copy the cluster CA's ca.pem into {} (`canopy cert issue` puts one there)",
                dir.display()
            ),
            TlsError::MissingFile(_) => format!(
                "issue this node's certificate: `canopy cert issue --ca CA_DIR --name {name} --role ROLE --out {}`",
                dir.display()
            ),
            TlsError::BadName(_) => "node names are what `canopy cert issue --name` accepts".into(),
            _ => format!(
                "{0}/{name}.pem, {0}/{name}.key and {0}/ca.pem must come from the same cluster CA: reissue with `canopy cert issue --ca CA_DIR --name {name} --role ROLE --out {0}`",
                dir.display()
            ),
        };
        StartError::Tls { source, hint }
    })?;
    if core && id.role != crate::tls::Role::Core {
        return Err(StartError::WrongRole {
            cert: dir.join(format!("{name}.pem")),
            dir: dir.to_path_buf(),
            name: name.to_string(),
            role: id.role,
        });
    }
    Ok(id)
}

/// Checks that `dir` exists or can be created, and that a file can be created in it.
fn check_writable_dir(dir: &Path, probe: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let p = dir.join(probe);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .map_err(|e| format!("cannot create a file in it: {e}"))?;
    let _ = std::fs::remove_file(&p);
    Ok(())
}

/// The node's durable directory and its materialized file's directory must be writable;
/// an existing `--file` must not be a directory.
fn check_storage(cfg: &NodeConfig) -> Result<(), StartError> {
    check_writable_dir(&cfg.data, ".canopy-probe").map_err(|reason| StartError::Storage {
        flag: "--data",
        path: cfg.data.clone(),
        reason,
    })?;
    if let Some(file) = &cfg.file {
        let fail = |reason: String| StartError::Storage {
            flag: "--file",
            path: file.clone(),
            reason,
        };
        if file.is_dir() {
            return Err(fail(
                "is a directory; give the path of the file itself".into(),
            ));
        }
        let name = file
            .file_name()
            .ok_or_else(|| fail("has no file name".into()))?
            .to_string_lossy();
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        check_writable_dir(dir, &format!(".{name}.canopy-probe"))
            .map_err(|e| fail(format!("its directory {}: {e}", dir.display())))?;
    }
    Ok(())
}

fn bind_error(flag: &'static str, addr: SocketAddr, source: std::io::Error) -> StartError {
    let hint = match source.kind() {
        std::io::ErrorKind::AddrInUse => {
            "another process listens there (maybe another node): stop it or choose another port"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "not an address of this host: use one of its addresses, or 0.0.0.0 with --advertise"
        }
        std::io::ErrorKind::PermissionDenied => {
            "ports below 1024 need privileges: choose a port above 1024"
        }
        _ => "choose another address",
    };
    StartError::Bind {
        flag,
        addr,
        source,
        hint,
    }
}

/// This host's physical memory in bytes (`MemTotal` of /proc/meminfo), where known.
fn total_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

async fn run_node(args: NodeArgs, role: Role) -> Result<(), StartError> {
    let p = prepare(&args, role)?;
    let id = load_identity(&p.tls, &p.cfg.name, p.cfg.is_core())?;
    check_storage(&p.cfg)?;
    crate::node::check_api_token(&p.cfg).map_err(|e| StartError::Usage(e.to_string()))?;
    let socket =
        std::net::UdpSocket::bind(p.listen).map_err(|e| bind_error("--listen", p.listen, e))?;
    if let Some(w) = total_memory().and_then(|m| p.cfg.stream.memory_warning(m)) {
        tracing::warn!(node = %p.cfg.name, "{w}");
    }
    let endpoint =
        crate::tls::endpoint_from_socket(socket, &id, &p.cfg.transport()).map_err(|source| {
            StartError::Tls {
            source,
            hint:
                "this certificate and key cannot serve QUIC; reissue them with `canopy cert issue`"
                    .into(),
        }
        })?;
    let api = tokio::net::TcpListener::bind(p.api)
        .await
        .map_err(|e| bind_error("--api", p.api, e))?;
    let shutdown = CancellationToken::new();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        sd.cancel();
    });
    tracing::info!(name = %p.cfg.name, quic = %p.listen, api = %p.api, "starting");
    let name = p.cfg.name.clone();
    let node = crate::node::Node::start(
        p.cfg,
        std::sync::Arc::new(id),
        endpoint,
        api,
        shutdown.clone(),
    )
    .await?;
    tokio::spawn(reload_on_hangup(node.clone(), p.tls, name));
    node.stopped_or_fatal(shutdown).await?;
    Ok(())
}

/// On SIGHUP, loads the node's certificate, key and CA again from `--tls` and puts them in
/// place without a restart (see docs/security.md, rotation).
async fn reload_on_hangup(node: crate::node::Node, tls: PathBuf, name: String) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let reloaded = Identity::load(&tls, &name)
                .map_err(|e| e.to_string())
                .and_then(|id| node.reload_identity(id).map_err(|e| e.to_string()));
            if let Err(e) = reloaded {
                tracing::error!("SIGHUP: keeping the current certificate: {e}");
            }
        }
    }
}

/// Resolves when the process gets SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
