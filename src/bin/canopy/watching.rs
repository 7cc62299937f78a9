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

/// Follows the node's visible version for as long as `tx` is open, reconnecting with
/// back-off when the node is down or restarting.
pub(super) async fn poll_versions(
    api: &Api,
    file: Option<&Path>,
    tx: tokio::sync::mpsc::Sender<canopy::watch::Visible>,
) {
    let mut after = 0u64;
    let mut lagging_since: Option<Instant> = None;
    let mut hinted = false;
    let mut down_since: Option<Instant> = None;
    let mut last_report = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        let wait = match lagging_since {
            Some(t) if t.elapsed() >= FILE_LAG_HINT => FILE_POLL_SLOW,
            Some(_) => FILE_POLL,
            None => WATCH_POLL,
        };
        let req = api
            .get(&format!(
                "/v1/watch?after={after}&timeout={}",
                wait.as_secs_f64()
            ))
            .timeout(wait + Duration::from_secs(10));
        match api.json(req).await.map(|v| visible(&v, file)) {
            Ok(Some(v)) => {
                if let Some(since) = down_since.take() {
                    eprintln!(
                        "canopy watch: reached the node at {} again after {:.1} s",
                        api.base,
                        since.elapsed().as_secs_f64()
                    );
                }
                delay = Duration::from_millis(100);
                after = after.max(v.version);
                if v.file_version.is_some_and(|f| f < v.version) {
                    let since = *lagging_since.get_or_insert_with(Instant::now);
                    if !hinted && since.elapsed() >= FILE_LAG_HINT {
                        hinted = true;
                        eprintln!(
                            "canopy watch: the node at {} has not written version {} to its --file for {} s; is {} the node's --file?",
                            api.base,
                            v.version,
                            FILE_LAG_HINT.as_secs(),
                            file.map(|f| f.display().to_string()).unwrap_or_default()
                        );
                    }
                } else {
                    lagging_since = None;
                    hinted = false;
                }
                if tx.send(v).await.is_err() {
                    return;
                }
            }
            Ok(None) | Err(_) if tx.is_closed() => return,
            Ok(None) => {
                eprintln!(
                    "canopy watch: {}: /v1/watch answered without a version",
                    api.base
                );
                tokio::time::sleep(MAX_RECONNECT_DELAY).await;
            }
            Err(e) => {
                let first = down_since.is_none();
                let since = *down_since.get_or_insert_with(Instant::now);
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
