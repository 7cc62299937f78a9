//! `canopy`: the user's tool: certificates, the file through a node's API, and the demo.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Canopy: keep one large file byte-identical on thousands of hosts"
)]
struct Cli {
    /// HTTP API of the node to talk to.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:7070",
        env = "CANOPY_API"
    )]
    api: String,
    /// File holding the node's API token (writes need it).
    #[arg(long, global = true, env = "CANOPY_API_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The node's --data directory, on the node's own host: its api-token file is used.
    #[arg(long, global = true)]
    data: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The API token for writes: `CANOPY_API_TOKEN`, else `--token-file`, else the node's own
/// `DATA/api-token` when `--data` is given.
fn api_token(cli: &Cli) -> anyhow::Result<Option<String>> {
    if let Ok(t) = std::env::var("CANOPY_API_TOKEN") {
        return Ok(Some(t.trim().to_string()));
    }
    let path = match (&cli.token_file, &cli.data) {
        (Some(f), _) => f.clone(),
        (None, Some(d)) => d.join(canopy::node::API_TOKEN_FILE),
        (None, None) => return Ok(None),
    };
    let t = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the API token from {}", path.display()))?;
    Ok(Some(t.trim().to_string()))
}

#[derive(Subcommand)]
enum Cmd {
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
        /// Keep printing one line per second.
        #[arg(long)]
        follow: bool,
    },
    /// Write the file (at the node's current version) to stdout.
    Cat,
    /// Replace the whole file with FILE (only changed chunks are sent through the core).
    Put { file: PathBuf },
    /// Write FILE's bytes at --offset.
    Patch {
        #[arg(long)]
        offset: u64,
        file: PathBuf,
    },
    /// Set the file's length (shorter drops the tail, longer pads with zeros).
    Truncate { len: u64 },
    /// Print the tree below the node (the whole tree from a core node), indented.
    Tree,
    /// Print a line for every new version the node applies.
    Watch {
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// The core's membership (through any core node's API).
    Core {
        #[command(subcommand)]
        cmd: CoreCmd,
    },
    /// Run a whole cluster on this machine: a core, N relays, a steady write load.
    Demo(canopy::demo::DemoArgs),
}

#[derive(Subcommand)]
enum CoreCmd {
    /// Show the members, the leader and the Raft state.
    Members,
    /// Add a voting member (it must be running with a core certificate).
    Add { name: String, addr: String },
    /// Remove a member from the voting set.
    Remove { name: String },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create ca.pem and ca.key in --out.
    Init {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertCmd {
    /// Issue NAME.pem/NAME.key (plus a copy of ca.pem) in --out, signed by the CA in --ca.
    Issue {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        name: String,
        /// core, relay (may write) or reader (may not write).
        #[arg(long)]
        role: canopy::tls::Role,
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate is valid (default: ten years; 0 issues one already expired,
        /// for tests).
        #[arg(long)]
        days: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn url(api: &str, path: &str) -> String {
    if api.starts_with("http://") {
        format!("{api}{path}")
    } else {
        format!("http://{api}{path}")
    }
}

async fn check(resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.text().await.unwrap_or_default();
    bail!("{status}: {body}")
}

async fn send_write(req: reqwest::RequestBuilder) -> anyhow::Result<()> {
    let resp = check(req.send().await.context("contacting the node's API")?).await?;
    println!("{}", resp.text().await?);
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = api_token(&cli)? {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("the API token is not a valid header value")?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .default_headers(headers)
        .build()?;
    let api = cli.api.as_str();
    match cli.cmd {
        Cmd::Ca {
            cmd: CaCmd::Init { out },
        } => {
            canopy::tls::ca_init(&out)?;
            println!("wrote {}/ca.pem and ca.key", out.display());
        }
        Cmd::Cert {
            cmd:
                CertCmd::Issue {
                    ca,
                    name,
                    role,
                    out,
                    days,
                },
        } => {
            match days {
                Some(d) => canopy::tls::cert_issue_valid(
                    &ca,
                    &name,
                    role,
                    &out,
                    Duration::from_secs(d.saturating_mul(86400)),
                )?,
                None => canopy::tls::cert_issue(&ca, &name, role, &out)?,
            }
            println!(
                "wrote {0}/{name}.pem, {0}/{name}.key, {0}/ca.pem",
                out.display()
            );
        }
        Cmd::Status { follow } => {
            let mut bar: Option<indicatif::ProgressBar> = None;
            loop {
                let resp = check(http.get(url(api, "/v1/status")).send().await?).await?;
                let v: serde_json::Value = resp.json().await?;
                if !follow {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    return Ok(());
                }
                if let Some(b) = v["backfill"].as_object() {
                    let total = b["bytes_total"].as_u64().unwrap_or(0);
                    let done = b["bytes_done"].as_u64().unwrap_or(0);
                    let pb = bar.get_or_insert_with(|| {
                    let pb = indicatif::ProgressBar::new(total);
                    pb.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{msg} backfill [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                        )
                        .expect("a valid template")
                        .progress_chars("=> "),
                    );
                    pb
                });
                    pb.set_length(total);
                    pb.set_position(done);
                    pb.set_message(format!(
                        "{} from {}",
                        v["name"].as_str().unwrap_or(""),
                        b["sources"]
                            .as_array()
                            .map(|s| s
                                .iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(","))
                            .unwrap_or_default()
                    ));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                if let Some(pb) = bar.take() {
                    pb.finish_and_clear();
                }
                println!(
                    "{} {} version={} lag={} root={} children={}",
                    v["name"].as_str().unwrap_or(""),
                    v["role"].as_str().unwrap_or(""),
                    v["version"],
                    v["lag_entries"],
                    &v["root"].as_str().unwrap_or("")
                        [..16.min(v["root"].as_str().unwrap_or("").len())],
                    v["children"].as_array().map(|a| a.len()).unwrap_or(0)
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Cmd::Cat => {
            let mut resp = check(http.get(url(api, "/v1/file")).send().await?).await?;
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = resp.chunk().await? {
                out.write_all(&chunk)?;
            }
            out.flush()?;
        }
        Cmd::Put { file } => {
            let body =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            send_write(http.put(url(api, "/v1/file?wait=applied")).body(body)).await?;
        }
        Cmd::Patch { offset, file } => {
            let body =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            send_write(
                http.patch(url(api, &format!("/v1/file?offset={offset}&wait=applied")))
                    .body(body),
            )
            .await?;
        }
        Cmd::Truncate { len } => {
            send_write(http.post(url(
                api,
                &format!("/v1/file/truncate?len={len}&wait=applied"),
            )))
            .await?;
        }
        Cmd::Watch { mut after } => loop {
            let resp = check(
                http.get(url(api, &format!("/v1/watch?after={after}&timeout=30")))
                    .send()
                    .await?,
            )
            .await?;
            let v: serde_json::Value = resp.json().await?;
            let version = v["version"].as_u64().unwrap_or(after);
            if version > after {
                println!(
                    "version={} length={} root={}",
                    version,
                    v["length"],
                    v["root"].as_str().unwrap_or("")
                );
                after = version;
            }
        },
        Cmd::Core { cmd } => {
            let req = match cmd {
                CoreCmd::Members => http.get(url(api, "/v1/core/members")),
                CoreCmd::Add { name, addr } => http
                    .post(url(api, "/v1/core/members"))
                    .json(&serde_json::json!({ "name": name, "addr": addr })),
                CoreCmd::Remove { name } => {
                    http.delete(url(api, &format!("/v1/core/members/{name}")))
                }
            };
            let resp = check(req.send().await.context("contacting the node's API")?).await?;
            let v: serde_json::Value = resp.json().await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Cmd::Tree => {
            let resp = check(http.get(url(api, "/v1/tree")).send().await?).await?;
            let nodes: Vec<serde_json::Value> = resp.json().await?;
            print!("{}", render_tree(&nodes));
        }
        Cmd::Demo(args) => canopy::demo::run(args).await?,
    }
    Ok(())
}

/// Indented text of a tree given as a flat list of nodes with `name` and `parent`.
fn render_tree(nodes: &[serde_json::Value]) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    let names: std::collections::BTreeSet<&str> =
        nodes.iter().filter_map(|n| n["name"].as_str()).collect();
    let mut kids: BTreeMap<&str, Vec<&serde_json::Value>> = BTreeMap::new();
    let mut roots = Vec::new();
    for n in nodes {
        let parent = n["parent"].as_str().unwrap_or("");
        if parent.is_empty() || !names.contains(parent) {
            roots.push(n);
        } else {
            kids.entry(parent).or_default().push(n);
        }
    }
    fn walk(
        out: &mut String,
        n: &serde_json::Value,
        kids: &BTreeMap<&str, Vec<&serde_json::Value>>,
        indent: usize,
    ) {
        let name = n["name"].as_str().unwrap_or("?");
        let _ = writeln!(
            out,
            "{:indent$}{name} (depth {}, version {}, lag {}, {} children) {}",
            "",
            n["depth"],
            n["version"],
            n["lag_entries"],
            n["children"],
            n["addr"].as_str().unwrap_or(""),
            indent = indent * 2
        );
        for k in kids.get(name).map(|v| v.as_slice()).unwrap_or(&[]) {
            walk(out, k, kids, indent + 1);
        }
    }
    let mut out = String::new();
    for r in roots {
        walk(&mut out, r, &kids, 0);
    }
    let _ = writeln!(out, "{} nodes", nodes.len());
    out
}
