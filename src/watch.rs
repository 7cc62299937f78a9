//! `canopy watch --exec`: run a command on each new visible version of a node's file.
//!
//! Invariants:
//! - at most one run of the command exists at any time;
//! - a run starts only for a version above every version already run (or given up on), and
//!   always for the newest version seen when it starts: a burst of versions gives one run
//!   once the version has been quiet for `min_interval` (or `max_wait` after the first
//!   version not yet run);
//! - when the node keeps a materialized copy, a run starts only once that copy holds the
//!   version or a newer one;
//! - a failed run is retried with a doubling back-off, `retries` times, then given up until
//!   a newer version appears;
//! - on terminate, a running command is waited for and its exit status is the result.
//!
//! [`Scheduler`] is the decision logic, sans IO: `handle(now, input) -> outputs`, with `now`
//! a duration since the watcher started. [`run`] drives it with a real process, a clock and
//! the signals.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;

/// Longest back-off between two attempts of a failing command.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// What the node reports: its visible version, the root at that version, and the version
/// its materialized copy holds (None: it keeps no copy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Visible {
    pub version: u64,
    pub root: String,
    pub file_version: Option<u64>,
}

/// When to run and how to retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Quiet time after the last new version before a run.
    pub min_interval: Duration,
    /// A run starts at the latest this long after the first version not yet run.
    pub max_wait: Duration,
    /// Retries after a failed run.
    pub retries: u32,
    /// First back-off; doubles with each further failure, up to [`MAX_RETRY_DELAY`].
    pub retry_delay: Duration,
    /// Exit after the first run (after its retries).
    pub once: bool,
}

/// Inputs to the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// The node reported this.
    Seen(Visible),
    /// The running command ended with this exit status (128+N for signal N).
    Finished(i32),
    /// SIGTERM or Ctrl-C.
    Terminate,
    /// Time passed (the driver ticks at [`Scheduler::deadline`]).
    Tick,
}

/// What the scheduler asks the driver to do or to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Start the command for `target`; `attempt` counts from 1 within a run of failures.
    Run { target: Visible, attempt: u32 },
    /// The run for `version` exited 0.
    Succeeded { version: u64 },
    /// The run for `version` exited `code`; the next attempt starts after `delay`, on the
    /// newest version then.
    RetryScheduled {
        version: u64,
        code: i32,
        attempt: u32,
        delay: Duration,
    },
    /// The run for `version` failed `attempts` times in a row; the next run waits for a
    /// newer version.
    GaveUp {
        version: u64,
        code: i32,
        attempts: u32,
    },
    /// A command is running; the watcher exits when it ends.
    Draining { version: u64 },
    /// Exit the process with this status.
    Exit(i32),
}

/// The decision logic of `watch --exec`.
#[derive(Debug)]
pub struct Scheduler {
    policy: Policy,
    latest: Option<Visible>,
    /// Every version up to this one was run (or given up on).
    done: u64,
    /// When `latest.version` last grew.
    changed_at: Duration,
    /// When the oldest version not yet covered by a run was first seen.
    pending_since: Option<Duration>,
    /// The version of the command running now.
    running: Option<u64>,
    /// Failed attempts in a row.
    failures: u32,
    /// No run before this (back-off).
    not_before: Duration,
    terminating: bool,
}

impl Scheduler {
    /// A scheduler for which versions up to `after` count as already run.
    pub fn new(policy: Policy, after: u64) -> Self {
        Scheduler {
            policy,
            latest: None,
            done: after,
            changed_at: Duration::ZERO,
            pending_since: None,
            running: None,
            failures: 0,
            not_before: Duration::ZERO,
            terminating: false,
        }
    }

    pub fn handle(&mut self, now: Duration, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Seen(v) => self.seen(now, v),
            Input::Finished(code) => {
                let Some(version) = self.running.take() else {
                    return out;
                };
                if self.terminating {
                    out.push(Output::Exit(code));
                    return out;
                }
                if code == 0 {
                    self.done = self.done.max(version);
                    self.failures = 0;
                    out.push(Output::Succeeded { version });
                    if self.policy.once {
                        out.push(Output::Exit(0));
                        return out;
                    }
                } else {
                    self.failures += 1;
                    let delay = self.backoff();
                    self.not_before = now + delay;
                    if self.failures > self.policy.retries {
                        out.push(Output::GaveUp {
                            version,
                            code,
                            attempts: self.failures,
                        });
                        self.done = self.done.max(version);
                        self.failures = 0;
                        if self.policy.once {
                            out.push(Output::Exit(code));
                            return out;
                        }
                    } else {
                        out.push(Output::RetryScheduled {
                            version,
                            code,
                            attempt: self.failures,
                            delay,
                        });
                    }
                }
                if self.latest.as_ref().is_some_and(|l| l.version > self.done) {
                    self.pending_since.get_or_insert(now);
                }
            }
            Input::Terminate => {
                self.terminating = true;
                match self.running {
                    Some(version) => out.push(Output::Draining { version }),
                    None => out.push(Output::Exit(0)),
                }
                return out;
            }
            Input::Tick => {}
        }
        self.try_start(now, &mut out);
        out
    }

    /// When the driver should tick next (None: only an input can change anything).
    pub fn deadline(&self) -> Option<Duration> {
        if self.running.is_some() || self.terminating {
            return None;
        }
        let l = self.latest.as_ref()?;
        if l.version <= self.done || !file_holds(l) {
            return None;
        }
        let pending = self.pending_since.unwrap_or(self.changed_at);
        let ready =
            (self.changed_at + self.policy.min_interval).min(pending + self.policy.max_wait);
        Some(ready.max(self.not_before))
    }

    /// Whether a command is running.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    fn seen(&mut self, now: Duration, v: Visible) {
        match &self.latest {
            Some(l) if v.version < l.version => return,
            Some(l) if v.version == l.version => {}
            _ => {
                self.changed_at = now;
                let covered = self.running.map_or(self.done, |r| r.max(self.done));
                if v.version > covered {
                    self.pending_since.get_or_insert(now);
                }
            }
        }
        self.latest = Some(v);
    }

    fn backoff(&self) -> Duration {
        let shift = self.failures.saturating_sub(1).min(16);
        self.policy
            .retry_delay
            .saturating_mul(1 << shift)
            .min(MAX_RETRY_DELAY)
    }

    fn try_start(&mut self, now: Duration, out: &mut Vec<Output>) {
        match self.deadline() {
            Some(t) if now >= t => {}
            _ => return,
        }
        let Some(target) = self.latest.clone() else {
            return;
        };
        self.running = Some(target.version);
        self.pending_since = None;
        out.push(Output::Run {
            target,
            attempt: self.failures + 1,
        });
    }
}

fn file_holds(v: &Visible) -> bool {
    v.file_version.is_none_or(|f| f >= v.version)
}

/// The command and its environment.
#[derive(Clone, Debug)]
pub struct Command {
    /// Run with `sh -c`.
    pub shell: String,
    /// Passed as CANOPY_FILE.
    pub file: Option<PathBuf>,
    /// Passed as CANOPY_API.
    pub api: String,
}

/// How the driver reports what happens: one call per event, in order.
pub trait Reporter {
    fn event(&mut self, out: &Output);
}

/// Drives a [`Scheduler`]: versions arrive on `versions` (the caller polls the node and
/// reconnects), the command runs as a child process, `terminate` resolves on SIGTERM or
/// Ctrl-C. Returns the exit status for the process.
pub async fn run(
    policy: Policy,
    after: u64,
    command: Command,
    mut versions: mpsc::Receiver<Visible>,
    terminate: impl std::future::Future<Output = ()>,
    reporter: &mut dyn Reporter,
) -> i32 {
    let start = tokio::time::Instant::now();
    let mut sched = Scheduler::new(policy, after);
    let mut child: Option<tokio::process::Child> = None;
    let mut inputs: VecDeque<Input> = VecDeque::new();
    let mut versions_open = true;
    tokio::pin!(terminate);
    let mut terminated = false;
    loop {
        let input = match inputs.pop_front() {
            Some(i) => i,
            None => {
                let deadline = sched.deadline().map(|d| start + d);
                tokio::select! {
                    v = versions.recv(), if versions_open => match v {
                        Some(v) => Input::Seen(v),
                        None => {
                            versions_open = false;
                            continue;
                        }
                    },
                    status = wait_child(&mut child), if child.is_some() => {
                        child = None;
                        Input::Finished(status)
                    }
                    _ = &mut terminate, if !terminated => {
                        terminated = true;
                        Input::Terminate
                    }
                    _ = sleep_until(deadline), if deadline.is_some() => Input::Tick,
                }
            }
        };
        for o in sched.handle(start.elapsed(), input) {
            reporter.event(&o);
            match o {
                Output::Run { target, .. } => match spawn(&command, &target) {
                    Ok(c) => child = Some(c),
                    Err(_) => inputs.push_back(Input::Finished(127)),
                },
                Output::Exit(code) => return code,
                _ => {}
            }
        }
        if !versions_open && child.is_none() && sched.deadline().is_none() && inputs.is_empty() {
            return 0;
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn wait_child(child: &mut Option<tokio::process::Child>) -> i32 {
    match child {
        Some(c) => match c.wait().await {
            Ok(status) => exit_code(status),
            Err(_) => 1,
        },
        None => std::future::pending().await,
    }
}

/// The exit status as a shell reports it: the code, or 128+N for signal N.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128 + sig;
        }
    }
    status.code().unwrap_or(1)
}

fn spawn(command: &Command, target: &Visible) -> std::io::Result<tokio::process::Child> {
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c")
        .arg(&command.shell)
        .env("CANOPY_VERSION", target.version.to_string())
        .env("CANOPY_ROOT", &target.root)
        .env("CANOPY_API", &command.api)
        .stdin(std::process::Stdio::null());
    match &command.file {
        Some(f) => c.env("CANOPY_FILE", f),
        None => c.env_remove("CANOPY_FILE"),
    };
    c.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min_interval: Duration::from_secs(1),
            max_wait: Duration::from_secs(10),
            retries: 2,
            retry_delay: Duration::from_secs(1),
            once: false,
        }
    }

    fn v(version: u64) -> Visible {
        Visible {
            version,
            root: format!("r{version}"),
            file_version: None,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_gives_one_run_on_its_last_version() {
        let mut s = Scheduler::new(policy(), 0);
        for (t, ver) in [(0, 1), (200, 2), (400, 3), (600, 4)] {
            assert_eq!(s.handle(ms(t), Input::Seen(v(ver))), vec![]);
        }
        assert_eq!(s.deadline(), Some(ms(1600)));
        assert_eq!(s.handle(ms(1599), Input::Tick), vec![]);
        assert_eq!(
            s.handle(ms(1600), Input::Tick),
            vec![Output::Run {
                target: v(4),
                attempt: 1
            }]
        );
        assert_eq!(s.deadline(), None, "nothing else while it runs");
        assert_eq!(
            s.handle(ms(1700), Input::Finished(0)),
            vec![Output::Succeeded { version: 4 }]
        );
        assert_eq!(s.deadline(), None);
        assert_eq!(s.handle(ms(5000), Input::Seen(v(4))), vec![]);
        assert_eq!(s.deadline(), None, "the same version again is not new");
    }

    #[test]
    fn versions_during_a_run_give_one_more_run_after_it() {
        let mut s = Scheduler::new(policy(), 0);
        s.handle(ms(0), Input::Seen(v(1)));
        assert_eq!(s.handle(ms(1000), Input::Tick).len(), 1);
        assert_eq!(s.handle(ms(1100), Input::Seen(v(2))), vec![]);
        assert_eq!(s.handle(ms(1200), Input::Seen(v(3))), vec![]);
        assert_eq!(s.handle(ms(3000), Input::Tick), vec![], "never two at once");
        assert_eq!(
            s.handle(ms(3000), Input::Finished(0)),
            vec![
                Output::Succeeded { version: 1 },
                Output::Run {
                    target: v(3),
                    attempt: 1
                }
            ]
        );
    }

    #[test]
    fn steady_writes_run_after_max_wait() {
        let mut s = Scheduler::new(policy(), 0);
        let mut runs = Vec::new();
        for i in 0..40u64 {
            let t = ms(i * 500);
            runs.extend(s.handle(t, Input::Seen(v(i + 1))));
            runs.extend(s.handle(t, Input::Tick));
        }
        assert_eq!(
            runs,
            vec![Output::Run {
                target: v(21),
                attempt: 1
            }],
            "the first version was seen at 0 s; 10 s later the newest is 21"
        );
    }

    #[test]
    fn failures_retry_with_backoff_then_give_up() {
        let mut s = Scheduler::new(policy(), 0);
        s.handle(ms(0), Input::Seen(v(5)));
        assert_eq!(s.handle(ms(1000), Input::Tick).len(), 1);
        assert_eq!(
            s.handle(ms(1500), Input::Finished(3)),
            vec![Output::RetryScheduled {
                version: 5,
                code: 3,
                attempt: 1,
                delay: ms(1000)
            }]
        );
        assert_eq!(s.deadline(), Some(ms(2500)));
        assert_eq!(
            s.handle(ms(2500), Input::Tick),
            vec![Output::Run {
                target: v(5),
                attempt: 2
            }]
        );
        assert_eq!(
            s.handle(ms(2600), Input::Finished(3)),
            vec![Output::RetryScheduled {
                version: 5,
                code: 3,
                attempt: 2,
                delay: ms(2000)
            }]
        );
        assert_eq!(s.handle(ms(4599), Input::Tick), vec![]);
        assert_eq!(s.handle(ms(4600), Input::Tick).len(), 1);
        assert_eq!(
            s.handle(ms(4700), Input::Finished(3)),
            vec![Output::GaveUp {
                version: 5,
                code: 3,
                attempts: 3
            }]
        );
        assert_eq!(s.deadline(), None, "waits for a newer version");
        s.handle(ms(5000), Input::Seen(v(6)));
        assert_eq!(
            s.deadline(),
            Some(ms(8700)),
            "a new version still respects the back-off"
        );
        assert_eq!(
            s.handle(ms(8700), Input::Tick),
            vec![Output::Run {
                target: v(6),
                attempt: 1
            }]
        );
    }

    #[test]
    fn a_retry_takes_the_newest_version() {
        let mut s = Scheduler::new(policy(), 0);
        s.handle(ms(0), Input::Seen(v(1)));
        s.handle(ms(1000), Input::Tick);
        s.handle(ms(1100), Input::Finished(1));
        s.handle(ms(1200), Input::Seen(v(2)));
        assert_eq!(
            s.handle(ms(2200), Input::Tick),
            vec![Output::Run {
                target: v(2),
                attempt: 2
            }]
        );
    }

    #[test]
    fn waits_for_the_materialized_copy() {
        let mut s = Scheduler::new(policy(), 0);
        let lagging = Visible {
            file_version: Some(3),
            ..v(4)
        };
        s.handle(ms(0), Input::Seen(lagging));
        assert_eq!(s.deadline(), None);
        assert_eq!(s.handle(ms(5000), Input::Tick), vec![]);
        let caught_up = Visible {
            file_version: Some(4),
            ..v(4)
        };
        assert_eq!(
            s.handle(ms(5100), Input::Seen(caught_up.clone())),
            vec![Output::Run {
                target: caught_up,
                attempt: 1
            }]
        );
    }

    #[test]
    fn after_and_older_versions_are_not_new() {
        let mut s = Scheduler::new(policy(), 7);
        s.handle(ms(0), Input::Seen(v(7)));
        assert_eq!(s.deadline(), None);
        s.handle(ms(0), Input::Seen(v(9)));
        s.handle(ms(10), Input::Seen(v(2)));
        assert_eq!(
            s.handle(ms(1000), Input::Tick),
            vec![Output::Run {
                target: v(9),
                attempt: 1
            }],
            "a restarted node reporting an older version changes nothing"
        );
    }

    #[test]
    fn once_exits_with_the_status_of_the_first_run() {
        let once = Policy {
            once: true,
            retries: 1,
            ..policy()
        };
        let mut s = Scheduler::new(once.clone(), 0);
        s.handle(ms(0), Input::Seen(v(1)));
        s.handle(ms(1000), Input::Tick);
        assert_eq!(
            s.handle(ms(1100), Input::Finished(0)),
            vec![Output::Succeeded { version: 1 }, Output::Exit(0)]
        );
        let mut s = Scheduler::new(once, 0);
        s.handle(ms(0), Input::Seen(v(1)));
        s.handle(ms(1000), Input::Tick);
        s.handle(ms(1100), Input::Finished(2));
        s.handle(ms(2100), Input::Tick);
        assert_eq!(
            s.handle(ms(2200), Input::Finished(2)),
            vec![
                Output::GaveUp {
                    version: 1,
                    code: 2,
                    attempts: 2
                },
                Output::Exit(2)
            ]
        );
    }

    #[test]
    fn terminate_waits_for_the_running_command_and_passes_its_status() {
        let mut s = Scheduler::new(policy(), 0);
        assert_eq!(s.handle(ms(0), Input::Terminate), vec![Output::Exit(0)]);
        let mut s = Scheduler::new(policy(), 0);
        s.handle(ms(0), Input::Seen(v(1)));
        s.handle(ms(1000), Input::Tick);
        assert_eq!(
            s.handle(ms(1100), Input::Terminate),
            vec![Output::Draining { version: 1 }]
        );
        s.handle(ms(1200), Input::Seen(v(2)));
        assert_eq!(s.handle(ms(9000), Input::Tick), vec![]);
        assert_eq!(
            s.handle(ms(9100), Input::Finished(7)),
            vec![Output::Exit(7)]
        );
    }

    #[test]
    fn backoff_is_capped() {
        let mut s = Scheduler::new(
            Policy {
                retries: 100,
                ..policy()
            },
            0,
        );
        s.handle(ms(0), Input::Seen(v(1)));
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            let now = s.deadline().unwrap();
            assert_eq!(s.handle(now, Input::Tick).len(), 1);
            match s.handle(now, Input::Finished(1)).as_slice() {
                [Output::RetryScheduled { delay, .. }] => last = *delay,
                o => panic!("{o:?}"),
            }
        }
        assert_eq!(last, MAX_RETRY_DELAY);
    }
}
