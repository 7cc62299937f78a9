//! `canopy`: the user's tool: certificates, the file through a node's API, watch, the demo.
//!
//! Every failure is one line on stderr and an exit code from `canopy::tool::exit`.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, FromArgMatches};
use serde_json::{json, Value};

use canopy::tool::{exit, CaCmd, CertCmd, Cli, Cmd, CoreCmd};

/// A failure with the exit code it maps to.
struct CliError {
    code: u8,
    msg: String,
}

impl CliError {
    fn new(code: u8, msg: impl Into<String>) -> Self {
        CliError {
            code,
            msg: msg.into(),
        }
    }

    fn local(what: &str, path: &Path, e: impl std::fmt::Display) -> Self {
        CliError::new(exit::LOCAL_FILE, format!("{what} {}: {e}", path.display()))
    }
}

type Result<T> = std::result::Result<T, CliError>;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let api_defaulted =
        matches.value_source("api") == Some(clap::parser::ValueSource::DefaultValue);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match rt.block_on(run(cli, api_defaulted)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", e.msg.replace('\n', " "));
            ExitCode::from(e.code)
        }
    }
}

/// A node's HTTP API. Every request is built by [`Api::request`] and sent by [`Api::send`],
/// so credentials, when the API takes them, are added in one place.
struct Api {
    http: reqwest::Client,
    base: String,
    from_default: bool,
}

/// The API token for writes: `CANOPY_API_TOKEN`, else `--token-file`, else the node's own
/// `DATA/api-token` when `--data` is given; `None` when none of them is (reads need none).
fn api_token(cli: &Cli) -> Result<Option<String>> {
    if let Ok(t) = std::env::var("CANOPY_API_TOKEN") {
        return Ok(Some(t.trim().to_string()));
    }
    let path = match (&cli.token_file, &cli.data) {
        (Some(f), _) => f.clone(),
        (None, Some(d)) => d.join(canopy::node::API_TOKEN_FILE),
        (None, None) => return Ok(None),
    };
    std::fs::read_to_string(&path)
        .map(|t| Some(t.trim().to_string()))
        .map_err(|e| CliError::local("reading the API token from", &path, e))
}

impl Api {
    fn new(addr: &str, from_default: bool, token: Option<String>) -> Result<Api> {
        let hostport = addr.strip_prefix("http://").unwrap_or(addr);
        let hostport = hostport.trim_end_matches('/');
        let valid = match hostport.rsplit_once(':') {
            Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
            None => false,
        };
        if !valid || addr.starts_with("https://") {
            return Err(CliError::new(
                exit::USAGE,
                format!(
                    "--api {addr:?}: expected HOST:PORT of a node's HTTP API, e.g. 127.0.0.1:7070"
                ),
            ));
        }
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = token {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| {
                    CliError::new(
                        exit::USAGE,
                        "the API token has characters a header cannot carry",
                    )
                })?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .default_headers(headers)
            .build()
            .map_err(|e| CliError::new(exit::FAILURE, format!("HTTP client: {e}")))?;
        Ok(Api {
            http,
            base: format!("http://{hostport}"),
            from_default,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::GET, path)
    }

    /// Sends `req`; a non-success answer becomes a [`CliError`] naming the cause.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let path = resp.url().path().to_string();
        let body = resp.text().await.unwrap_or_default();
        let reason = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string));
        Err(match reason {
            Some(reason) if status.is_server_error() => CliError::new(
                exit::UNAVAILABLE,
                format!("the node at {} cannot do it now ({status}): {reason}; retry later", self.base),
            ),
            Some(reason) => CliError::new(
                exit::REFUSED,
                format!("the node at {} refused the request ({status}): {reason}", self.base),
            ),
            None => CliError::new(
                exit::UNREACHABLE,
                format!(
                    "{} answered {status} for {path}, not like a Canopy node: give a node's --api address (HTTP, TCP), not its --listen (QUIC) port",
                    self.base
                ),
            ),
        })
    }

    fn transport_error(&self, e: &reqwest::Error) -> CliError {
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        let how = if self.from_default {
            "--api was not given, so the default 127.0.0.1:7070 was tried; give the node's --api address with --api HOST:PORT or CANOPY_API"
        } else {
            "check that the node runs and that --api (or CANOPY_API) is its --api address"
        };
        if e.is_timeout() {
            CliError::new(
                exit::UNAVAILABLE,
                format!(
                    "the node at {} did not answer in time ({cause}); retry later",
                    self.base
                ),
            )
        } else if e.is_connect() || e.is_request() {
            CliError::new(
                exit::UNREACHABLE,
                format!("no Canopy node answers at {} ({cause}): {how}", self.base),
            )
        } else {
            CliError::new(
                exit::UNREACHABLE,
                format!("talking to {} failed ({cause}): {how}", self.base),
            )
        }
    }

    async fn json(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        self.send(req).await?.json().await.map_err(|e| {
            CliError::new(
                exit::UNREACHABLE,
                format!("{}: not a Canopy answer: {e}", self.base),
            )
        })
    }

    async fn status(&self) -> Result<Value> {
        self.json(self.get("/v1/status").timeout(Duration::from_secs(30)))
            .await
    }
}

/// Writes `text` to stdout. A reader that went away (`canopy status | head -1`) ends the
/// process quietly, as it would any Unix tool.
fn emit(text: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(text).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing stdout: {e}");
        std::process::exit(i32::from(exit::LOCAL_FILE));
    }
}

/// `println!` through [`emit`].
macro_rules! say {
    ($($arg:tt)*) => {
        emit(format_args!("{}\n", format_args!($($arg)*)))
    };
}

// After `say!`, which it uses.
#[path = "canopy/watching.rs"]
mod watching;

use watching::*;

fn print_json(v: &Value, pretty: bool) {
    let text = if pretty {
        serde_json::to_string_pretty(v)
    } else {
        serde_json::to_string(v)
    };
    say!("{}", text.unwrap_or_default());
}

async fn run(cli: Cli, api_defaulted: bool) -> Result<u8> {
    let json_out = cli.json;
    match cli.cmd {
        Cmd::Ca {
            cmd: CaCmd::Init { out, key },
        } => {
            canopy::tls::ca_init_with(&out, key).map_err(|e| tls_error(&e))?;
            if json_out {
                print_json(
                    &json!({"ca_cert": out.join("ca.pem"), "ca_key": out.join("ca.key")}),
                    false,
                );
            } else {
                say!("wrote {}/ca.pem and ca.key", out.display());
            }
        }
        Cmd::Cert {
            cmd:
                CertCmd::Issue {
                    ca,
                    name,
                    role,
                    out,
                    days,
                    key,
                },
        } => {
            let validity = days.map_or(canopy::tls::NODE_VALIDITY, |d| {
                Duration::from_secs(d.saturating_mul(86400))
            });
            let issued = canopy::tls::cert_issue_with(&ca, &name, role, &out, validity, key);
            issued.map_err(|e| tls_error(&e))?;
            if json_out {
                print_json(
                    &json!({
                        "cert": out.join(format!("{name}.pem")),
                        "key": out.join(format!("{name}.key")),
                        "ca_cert": out.join("ca.pem"),
                    }),
                    false,
                );
            } else {
                say!(
                    "wrote {0}/{name}.pem, {0}/{name}.key, {0}/ca.pem",
                    out.display()
                );
            }
        }
        Cmd::Completions { shell } => {
            canopy::tool::write_completions(shell, &mut std::io::stdout().lock());
        }
        Cmd::Demo(args) => canopy::demo::run(args, json_out)
            .await
            .map_err(|e| CliError::new(exit::FAILURE, format!("{e:#}")))?,
        _ => {
            let token = api_token(&cli)?;
            let api = Api::new(&cli.api, api_defaulted, token)?;
            return run_api(&api, cli.cmd, json_out).await;
        }
    }
    Ok(0)
}

/// A certificate command's error: a missing or unwritable path is a local file error.
fn tls_error(e: &canopy::tls::TlsError) -> CliError {
    use canopy::tls::TlsError;
    let code = match e {
        TlsError::Io { .. } | TlsError::MissingFile(_) | TlsError::AlreadyExists(_) => {
            exit::LOCAL_FILE
        }
        _ => exit::FAILURE,
    };
    CliError::new(code, e.to_string())
}

async fn run_api(api: &Api, cmd: Cmd, json_out: bool) -> Result<u8> {
    match cmd {
        Cmd::Status { follow: false } => print_json(&api.status().await?, !json_out),
        Cmd::Status { follow: true } => follow_status(api, json_out).await?,
        Cmd::Cat => {
            let mut resp = api.send(api.get("/v1/file")).await?;
            let mut out = std::io::stdout().lock();
            let write_err = |e: std::io::Error| {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    std::process::exit(0);
                }
                CliError::new(exit::LOCAL_FILE, format!("writing stdout: {e}"))
            };
            while let Some(chunk) = resp.chunk().await.map_err(|e| api.transport_error(&e))? {
                out.write_all(&chunk).map_err(write_err)?;
            }
            out.flush().map_err(write_err)?;
        }
        Cmd::Put { file } => put(api, &file, json_out).await?,
        Cmd::Patch { offset, file } => {
            let body = std::fs::read(&file).map_err(|e| CliError::local("reading", &file, e))?;
            let bytes = body.len() as u64;
            let req = api
                .request(
                    reqwest::Method::PATCH,
                    &format!("/v1/file?offset={offset}&wait=applied"),
                )
                .body(body);
            report_write(api.json(req).await?, bytes, None, json_out);
        }
        Cmd::Truncate { len } => {
            let req = api.request(
                reqwest::Method::POST,
                &format!("/v1/file/truncate?len={len}&wait=applied"),
            );
            report_write(api.json(req).await?, 0, None, json_out);
        }
        Cmd::Watch(args) => return watch(api, args, json_out).await,
        Cmd::Core { cmd } => {
            let req = match cmd {
                CoreCmd::Members => api.get("/v1/core/members"),
                CoreCmd::Add { name, addr } => api
                    .request(reqwest::Method::POST, "/v1/core/members")
                    .json(&json!({ "name": name, "addr": addr })),
                CoreCmd::Remove { name, force } => api.request(
                    reqwest::Method::DELETE,
                    &format!("/v1/core/members/{name}?force={force}"),
                ),
            };
            let v = api.json(req).await?;
            if json_out {
                print_json(&v, false);
            } else {
                emit(format_args!("{}", render_members(&v)));
            }
        }
        Cmd::Tree => {
            let v = api.json(api.get("/v1/tree")).await?;
            if json_out {
                print_json(&v, false);
            } else {
                let nodes = v.as_array().cloned().unwrap_or_default();
                emit(format_args!("{}", render_tree(&nodes)));
            }
        }
        Cmd::Ca { .. } | Cmd::Cert { .. } | Cmd::Completions { .. } | Cmd::Demo(_) => {
            unreachable!("handled without the API")
        }
    }
    Ok(0)
}

/// Prints a write's result: `version V` (with size and rate when known), or JSON.
fn report_write(reply: Value, bytes: u64, elapsed: Option<Duration>, json_out: bool) {
    let version = reply["version"].as_u64().unwrap_or(0);
    if json_out {
        let mut v = json!({ "version": version, "bytes": bytes });
        if let Some(e) = elapsed {
            v["seconds"] = json!(e.as_secs_f64());
        }
        print_json(&v, false);
        return;
    }
    match elapsed {
        Some(e) => say!(
            "version {version}: {} in {:.1} s ({}/s)",
            indicatif::HumanBytes(bytes),
            e.as_secs_f64(),
            indicatif::HumanBytes((bytes as f64 / e.as_secs_f64().max(1e-3)) as u64)
        ),
        None => say!("version {version}"),
    }
}

/// `put`: streams FILE to the node with a progress bar on a terminal.
async fn put(api: &Api, file: &Path, json_out: bool) -> Result<()> {
    use futures::StreamExt;
    let f = tokio::fs::File::open(file)
        .await
        .map_err(|e| CliError::local("reading", file, e))?;
    let meta = f
        .metadata()
        .await
        .map_err(|e| CliError::local("reading", file, e))?;
    if !meta.is_file() {
        return Err(CliError::local("reading", file, "not a regular file"));
    }
    let len = meta.len();
    let bar = if std::io::stderr().is_terminal() && !json_out {
        let pb = indicatif::ProgressBar::new(len);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        pb.set_message("put");
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let counter = bar.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20).map(move |chunk| {
        if let Ok(c) = &chunk {
            counter.inc(c.len() as u64);
            if counter.position() >= counter.length().unwrap_or(0) {
                counter.set_message("sent, committing");
            }
        }
        chunk
    });
    let started = Instant::now();
    let req = api
        .request(reqwest::Method::PUT, "/v1/file?wait=applied")
        .header(reqwest::header::CONTENT_LENGTH, len)
        .body(reqwest::Body::wrap_stream(stream));
    let result = api.json(req).await;
    bar.finish_and_clear();
    report_write(result?, len, Some(started.elapsed()), json_out);
    Ok(())
}

async fn follow_status(api: &Api, json_out: bool) -> Result<()> {
    let mut bar: Option<indicatif::ProgressBar> = None;
    loop {
        let v = api.status().await?;
        if json_out {
            print_json(&v, false);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if let Some(b) = v["backfill"].as_object() {
            let total = b["bytes_total"].as_u64().unwrap_or(0);
            let done = b["bytes_done"].as_u64().unwrap_or(0);
            let pb = bar.get_or_insert_with(|| {
                let pb = indicatif::ProgressBar::new(total);
                pb.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} backfill [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
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
        let root = v["root"].as_str().unwrap_or("");
        say!(
            "{} {} version={} lag={} root={} children={}",
            v["name"].as_str().unwrap_or(""),
            v["role"].as_str().unwrap_or(""),
            v["version"],
            v["lag_entries"],
            &root[..16.min(root.len())],
            v["children"].as_array().map(|a| a.len()).unwrap_or(0)
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The longest quiet time between two lines of a streamed watch (the node sends its state
/// again after it): as long as the copy may lag before the watcher says so, so the hint is
/// never later than that.
const WATCH_QUIET: Duration = FILE_LAG_HINT;
/// How much longer than [`WATCH_QUIET`] a watch may stay silent before the connection is
/// taken for dead and opened again.
const WATCH_SLACK: Duration = Duration::from_secs(10);
/// The longest line a watch may send (a whole status from a node without streamed watches
/// is a few kB).
const MAX_WATCH_LINE: usize = 1 << 20;
/// How long the copy may lag before the watcher says what may be wrong.
const FILE_LAG_HINT: Duration = Duration::from_secs(10);
/// Longest pause between two attempts to reach a node that is down.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);

/// A `pstree`-like outline of a tree given as a flat list of nodes with `name` and `parent`:
/// one line per node with its version, lag and children, roots (the core members) first.
fn render_tree(nodes: &[Value]) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    let names: std::collections::BTreeSet<&str> =
        nodes.iter().filter_map(|n| n["name"].as_str()).collect();
    let mut kids: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    let mut roots = Vec::new();
    for n in nodes {
        let parent = n["parent"].as_str().unwrap_or("");
        if parent.is_empty() || !names.contains(parent) {
            roots.push(n);
        } else {
            kids.entry(parent).or_default().push(n);
        }
    }
    let name_of = |n: &&Value| n["name"].as_str().unwrap_or("").to_string();
    roots.sort_by_key(name_of);
    for list in kids.values_mut() {
        list.sort_by_key(name_of);
    }
    fn walk(
        out: &mut String,
        n: &Value,
        kids: &BTreeMap<&str, Vec<&Value>>,
        prefix: &str,
        branch: &str,
        seen: &mut std::collections::BTreeSet<String>,
    ) {
        let name = n["name"].as_str().unwrap_or("?");
        let children = n["children"].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "{prefix}{branch}{name}  v{} lag {} {} {}",
            n["version"],
            n["lag_entries"],
            children,
            if children == 1 { "child" } else { "children" },
        );
        if !seen.insert(name.to_string()) {
            return;
        }
        let list = kids.get(name).map(|v| v.as_slice()).unwrap_or(&[]);
        let next = match branch {
            "" => String::new(),
            "└─ " => format!("{prefix}   "),
            _ => format!("{prefix}│  "),
        };
        for (i, k) in list.iter().enumerate() {
            let b = if i + 1 == list.len() {
                "└─ "
            } else {
                "├─ "
            };
            walk(out, k, kids, &next, b, seen);
        }
    }
    let mut out = String::new();
    let mut seen = std::collections::BTreeSet::new();
    for r in &roots {
        walk(&mut out, r, &kids, "", "", &mut seen);
    }
    let depth = nodes
        .iter()
        .filter_map(|n| n["depth"].as_u64())
        .max()
        .unwrap_or(0);
    let _ = writeln!(out, "{} nodes, max depth {depth}", nodes.len());
    out
}

/// The core's members as a table: name, role, health, version, lag, address.
fn render_members(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut rows = vec![[
        "NAME".to_string(),
        "ROLE".into(),
        "HEALTH".into(),
        "VERSION".into(),
        "LAG".into(),
        "ADDR".into(),
    ]];
    let text = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    for m in v["members"].as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
        rows.push([
            text(&m["name"]),
            text(&m["role"]),
            text(&m["health"]),
            text(&m["version"]),
            text(&m["lag_entries"]),
            text(&m["addr"]),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    let _ = writeln!(
        out,
        "term {}, leader {}, commit index {} (as the answering node knows it)",
        v["term"],
        v["leader"].as_str().unwrap_or("none"),
        v["commit_index"]
    );
    out
}
