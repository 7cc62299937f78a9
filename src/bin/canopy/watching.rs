//! `canopy watch`: following a node's visible version and running `--exec` on each new one.

use super::*;
use canopy::tool::WatchArgs;

/// The node's visible version. With `file` (the node's `--file`), a node that has not
/// materialized anything yet counts as holding version 0 there.
pub(super) fn visible(v: &Value, file: Option<&Path>) -> Option<canopy::watch::Visible> {
    let materialized = v["file_version"].as_u64();
    Some(canopy::watch::Visible {
        version: v["version"].as_u64()?,
        root: v["root"].as_str()?.to_string(),
        file_version: match file {
            Some(_) => Some(materialized.unwrap_or(0)),
            None => materialized,
        },
    })
}

/// What the follower knows between two lines of the watch stream.
struct Follow<'a> {
    api: &'a Api,
    file: Option<&'a Path>,
    after: u64,
    lagging_since: Option<Instant>,
    hinted: bool,
    down_since: Option<Instant>,
}

impl Follow<'_> {
    /// One line of the stream (or a whole status from a node without streamed watches).
    /// False once `tx` is closed.
    async fn seen(
        &mut self,
        line: &[u8],
        tx: &tokio::sync::mpsc::Sender<canopy::watch::Visible>,
    ) -> bool {
        let parsed = serde_json::from_slice::<Value>(line).ok();
        let Some(v) = parsed.as_ref().and_then(|v| visible(v, self.file)) else {
            eprintln!(
                "canopy watch: {}: /v1/watch sent a line without a version",
                self.api.base
            );
            return !tx.is_closed();
        };
        if let Some(since) = self.down_since.take() {
            eprintln!(
                "canopy watch: reached the node at {} again after {:.1} s",
                self.api.base,
                since.elapsed().as_secs_f64()
            );
        }
        self.after = self.after.max(v.version);
        if v.file_version.is_some_and(|f| f < v.version) {
            let since = *self.lagging_since.get_or_insert_with(Instant::now);
            if !self.hinted && since.elapsed() >= FILE_LAG_HINT {
                self.hinted = true;
                eprintln!(
                    "canopy watch: the node at {} has not written version {} to its --file for {} s; is {} the node's --file?",
                    self.api.base,
                    v.version,
                    FILE_LAG_HINT.as_secs(),
                    self.file.map(|f| f.display().to_string()).unwrap_or_default()
                );
            }
        } else {
            self.lagging_since = None;
            self.hinted = false;
        }
        tx.send(v).await.is_ok()
    }

    /// Reads one streamed watch until it ends (`Ok(true)`), `tx` closes (`Ok(false)`) or
    /// the connection fails. A node without streamed watches answers one status and
    /// closes, which reads as a stream of one line.
    async fn stream(
        &mut self,
        tx: &tokio::sync::mpsc::Sender<canopy::watch::Visible>,
    ) -> std::result::Result<bool, CliError> {
        let req = self.api.get(&format!(
            "/v1/watch?after={}&stream=true&timeout={}",
            self.after,
            WATCH_QUIET.as_secs_f64()
        ));
        let mut resp = self.api.send(req).await?;
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let chunk = tokio::time::timeout(WATCH_QUIET + WATCH_SLACK, resp.chunk())
                .await
                .map_err(|_| {
                    CliError::new(
                        exit::UNREACHABLE,
                        format!(
                            "{}: no line on the watch for {} s",
                            self.api.base,
                            (WATCH_QUIET + WATCH_SLACK).as_secs()
                        ),
                    )
                })?
                .map_err(|e| self.api.transport_error(&e))?;
            let Some(chunk) = chunk else {
                let rest = std::mem::take(&mut buf);
                if !rest.iter().all(u8::is_ascii_whitespace) && !self.seen(&rest, tx).await {
                    return Ok(false);
                }
                return Ok(true);
            };
            if buf.len() + chunk.len() > MAX_WATCH_LINE {
                return Err(CliError::new(
                    exit::UNREACHABLE,
                    format!(
                        "{}: a watch line over {MAX_WATCH_LINE} bytes",
                        self.api.base
                    ),
                ));
            }
            buf.extend_from_slice(&chunk);
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                if !self.seen(&line, tx).await {
                    return Ok(false);
                }
            }
        }
    }
}

/// Follows the node's visible version and its `--file`'s through one streamed watch for as
/// long as `tx` is open, reconnecting with back-off when the node is down or restarting.
pub(super) async fn poll_versions(
    api: &Api,
    file: Option<&Path>,
    tx: tokio::sync::mpsc::Sender<canopy::watch::Visible>,
) {
    let mut f = Follow {
        api,
        file,
        after: 0,
        lagging_since: None,
        hinted: false,
        down_since: None,
    };
    let mut last_report = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match f.stream(&tx).await {
            Ok(false) => return,
            Ok(true) => delay = Duration::from_millis(100),
            Err(_) if tx.is_closed() => return,
            Err(e) => {
                let first = f.down_since.is_none();
                let since = *f.down_since.get_or_insert_with(Instant::now);
                if first || last_report.elapsed() >= Duration::from_secs(30) {
                    eprintln!(
                        "canopy watch: {} (down for {:.0} s; retrying)",
                        e.msg,
                        since.elapsed().as_secs_f64()
                    );
                    last_report = Instant::now();
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
            }
        }
    }
}

/// Prints the scheduler's events: lines on stderr, or JSON lines on stdout.
pub(super) struct WatchReporter {
    json: bool,
    command: String,
}

impl canopy::watch::Reporter for WatchReporter {
    fn event(&mut self, out: &canopy::watch::Output) {
        use canopy::watch::Output;
        let (line, v) = match out {
            Output::Run { target, attempt } => (
                format!(
                    "version {} (root {}): running `{}`{}",
                    target.version,
                    &target.root[..16.min(target.root.len())],
                    self.command,
                    if *attempt > 1 {
                        format!(" (attempt {attempt})")
                    } else {
                        String::new()
                    }
                ),
                json!({"event": "run", "version": target.version, "root": target.root, "attempt": attempt}),
            ),
            Output::Succeeded { version } => (
                format!("version {version}: the command succeeded"),
                json!({"event": "succeeded", "version": version}),
            ),
            Output::RetryScheduled {
                version,
                code,
                attempt,
                delay,
            } => (
                format!(
                    "version {version}: the command exited {code} (attempt {attempt}); retrying in {:.1} s",
                    delay.as_secs_f64()
                ),
                json!({"event": "failed", "version": version, "code": code, "attempt": attempt, "retry_in_seconds": delay.as_secs_f64()}),
            ),
            Output::GaveUp {
                version,
                code,
                attempts,
            } => (
                format!(
                    "version {version}: the command exited {code}, {attempts} attempts in a row; waiting for a newer version"
                ),
                json!({"event": "gave_up", "version": version, "code": code, "attempts": attempts}),
            ),
            Output::Draining { version } => (
                format!("terminating: waiting for the command running for version {version}"),
                json!({"event": "draining", "version": version}),
            ),
            Output::Exit(code) => (
                format!("exiting with status {code}"),
                json!({"event": "exit", "code": code}),
            ),
        };
        if self.json {
            print_json(&v, false);
        } else {
            eprintln!("canopy watch: {line}");
        }
    }
}

/// SIGTERM or SIGINT, registered before this returns so that none is missed later.
pub(super) fn terminate_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

pub(super) async fn watch(api: &Api, args: WatchArgs, json_out: bool) -> Result<u8> {
    let terminate = terminate_signal();
    let first = api.status().await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let Some(shell) = args.exec else {
        first?;
        let poller = poll_versions(api, None, tx);
        let printer = async {
            let mut after = args.after;
            while let Some(v) = rx.recv().await {
                if v.version > after {
                    after = v.version;
                    if json_out {
                        print_json(&json!({"version": v.version, "root": v.root}), false);
                    } else {
                        say!("version={} root={}", v.version, v.root);
                    }
                }
            }
        };
        tokio::select! {
            _ = poller => {}
            _ = printer => {}
            _ = terminate => {}
        }
        return Ok(0);
    };
    match &first {
        Ok(s) => eprintln!(
            "canopy watch: following {} at version {}; running `{shell}` on each new version",
            api.base, s["version"]
        ),
        Err(e) => eprintln!("canopy watch: {}; retrying until it answers", e.msg),
    }
    let policy = canopy::watch::Policy {
        min_interval: args.min_interval,
        max_wait: args.max_wait,
        retries: args.retries,
        retry_delay: args.retry_delay,
        once: args.once,
    };
    // Without --file, the node's own --file (as its status names it) is the file to wait for.
    let file = args
        .file
        .or_else(|| {
            first.as_ref().ok()?["file_path"]
                .as_str()
                .map(std::path::PathBuf::from)
        })
        .map(|f| std::path::absolute(&f).unwrap_or(f));
    let command = canopy::watch::Command {
        shell: shell.clone(),
        file: file.clone(),
        api: api.base.trim_start_matches("http://").to_string(),
    };
    let mut reporter = WatchReporter {
        json: json_out,
        command: shell,
    };
    let driver = canopy::watch::run(policy, args.after, command, rx, terminate, &mut reporter);
    let code = tokio::select! {
        code = driver => code,
        _ = poll_versions(api, file.as_deref(), tx) => 0,
    };
    Ok(u8::try_from(code).unwrap_or(exit::FAILURE))
}
