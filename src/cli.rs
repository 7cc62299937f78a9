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
    /// TCP address of the local HTTP API (loopback by default).
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
    #[serde(default)]
    stream: Option<StreamConfig>,
    #[serde(default)]
    overlay: Option<crate::overlay::OverlayConfig>,
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
    let api = args
        .api
        .or(fc.api)
        .ok_or_else(|| anyhow!("--api is required"))?;
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
            raft: RaftConfig::default(),
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
    crate::node::run(p.cfg, endpoint, api, shutdown).await?;
    Ok(())
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
