//! Shared command-line handling of the `core-node` and `relay-node` binaries.
//!
//! Invariants: flags win over the `--config` TOML, which wins over defaults; every failure
//! before the node runs is one clear line on stderr and a non-zero exit, never a panic.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{NodeConfig, NodeKind, StreamConfig};
use crate::consensus::{Member, RaftConfig};
use crate::tls::Identity;

/// Where a core node's HTTP API listens without `--api`: loopback only, so that nothing off
/// the host reaches it unless the operator says so.
pub const DEFAULT_CORE_API: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7071);
/// Where a relay's HTTP API listens without `--api` (another port than a core's, so both can
/// run on one host).
pub const DEFAULT_RELAY_API: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7171);

/// Flags common to both node binaries.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// TOML file with the same keys as the flags (flags win); a `[stream]` table tunes streaming.
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
    /// TCP address of the local HTTP API (default 127.0.0.1:7071 for a core node,
    /// 127.0.0.1:7171 for a relay).
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
    api_token_file: Option<PathBuf>,
    #[serde(default)]
    stream: Option<StreamConfig>,
    #[serde(default)]
    overlay: Option<crate::overlay::OverlayConfig>,
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
pub fn prepare(args: &NodeArgs, role: Role) -> anyhow::Result<Prepared> {
    let fc: FileConfig = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading config {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing config {}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let name = args
        .name
        .clone()
        .or(fc.name)
        .ok_or_else(|| anyhow!("--name is required"))?;
    let listen = args
        .listen
        .or(fc.listen)
        .ok_or_else(|| anyhow!("--listen is required"))?;
    let api = args.api.or(fc.api).unwrap_or(match role {
        Role::Core { .. } => DEFAULT_CORE_API,
        Role::Relay { .. } => DEFAULT_RELAY_API,
    });
    let data = args
        .data
        .clone()
        .or(fc.data)
        .ok_or_else(|| anyhow!("--data is required"))?;
    let tls = args
        .tls
        .clone()
        .or(fc.tls)
        .ok_or_else(|| anyhow!("--tls is required"))?;
    let advertise = args.advertise.or(fc.advertise).unwrap_or(listen);
    if advertise.ip().is_unspecified() {
        bail!("--advertise is required when --listen is a wildcard address ({listen})");
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
            .map_err(|e| anyhow!("config peers: {e}"))?
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
        api_token_file: args.api_token_file.clone().or(fc.api_token_file),
        seed: args.seed.or(fc.seed),
    };
    cfg.validate()?;
    Ok(Prepared {
        cfg,
        listen,
        api,
        tls,
    })
}

/// Sets up logging from `--log` (or RUST_LOG).
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .finish()
        .with(crate::consensus::QuietPeerErrors)
        .try_init();
}

/// Runs a node binary to completion: binds sockets, starts the node, stops on Ctrl-C or
/// SIGTERM. Prints one error line and exits non-zero on any start-up failure.
pub fn node_main(args: NodeArgs, role: Role) -> ExitCode {
    init_logging(&args.log);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run_node(args, role)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_node(args: NodeArgs, role: Role) -> anyhow::Result<()> {
    let p = prepare(&args, role)?;
    let id = Identity::load(&p.tls, &p.cfg.name)?;
    let endpoint = crate::tls::endpoint(p.listen, &id, &p.cfg.stream.transport())
        .with_context(|| format!("binding QUIC on {}", p.listen))?;
    let api = tokio::net::TcpListener::bind(p.api)
        .await
        .with_context(|| format!("binding the HTTP API on {}", p.api))?;
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

async fn wait_for_signal() {
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
