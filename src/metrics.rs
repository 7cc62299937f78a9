//! Prometheus metrics for every node, rendered on the node's own HTTP API.
//!
//! Invariants:
//! - One process-wide recorder (installed once, so several nodes can share a process, as in
//!   `canopy demo`); every `canopy_*` series carries a `node` label naming its node. The
//!   `process_*` series describe the process and carry none.
//! - Every family has HELP text and follows Prometheus's naming conventions: base units named
//!   in the name (`_seconds`, `_bytes`), `_total` on counters, labels of bounded cardinality
//!   (`reason`, `source`, `what` take values from the fixed lists below, never addresses).
//! - Every known label value of a labelled counter exists at 0 from the node's start, so
//!   `rate()` sees its first event.
//! - The state a scrape reports about a node's position (versions, lag, depth, materialized
//!   version) is read at the moment of the scrape through the node's [`Live`] source, so
//!   `canopy_lag_seconds` agrees with `/v1/status` and keeps growing while a node stalls.
//!   "None" is absent, never 0: an unattached relay has no `canopy_depth` series, a node that
//!   has written no file has no `canopy_materialized_version` series.
//! - Each histogram has buckets fitted to what it measures.
//! - A histogram keeps its samples only until the next upkeep, run every [`UPKEEP_PERIOD`]
//!   by a thread of the recorder's own: a node nobody scrapes holds bounded memory.

use std::fmt::Write as _;
use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often the recorder folds the samples its histograms queued into their buckets.
/// 5 s: the exporter's own default. The recorder is built without the exporter's tasks
/// (the API renders it), so nothing else drains the queues between scrapes: without it a
/// relay that nobody scrapes grows by about 16 bytes per histogram sample, one per
/// delivery, for ever.
pub const UPKEEP_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

static UPKEEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Upkeeps run since the recorder was installed.
pub fn upkeeps() -> u64 {
    UPKEEPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Reasons of `canopy_resyncs_total`: the upstream follower's own failures, then the
/// replica's (`ReplicaError::label`). A reason outside this list fails a debug assertion.
pub const RESYNC_REASONS: &[&str] = &[
    "connect",
    "stream",
    "closed",
    "silent",
    "refused",
    "detached",
    "fetch_stuck",
    "gap",
    "diverged",
    "checkpoint_out_of_step",
    "unexpected_frame",
    "cycle",
    "bad_chunk",
    "bad_manifest",
    "file",
    "untrusted",
];

/// Kinds of `canopy_overlay_messages_total`, named as topology-sim counts them, so that a
/// real run and its simulation compare message for message: a sample asked and answered, a
/// subscription sent and answered (accepted or refused), a parent left for another, a new
/// root path learnt from the parent, a report sent up to it.
pub const OVERLAY_MESSAGES: &[&str] = &[
    "sample_request",
    "sample_answer",
    "attach_request",
    "attach_answer",
    "detach",
    "path_update",
    "child_report",
];

/// Reasons of `canopy_reparents_total` (`overlay::Reason::label`).
pub const REPARENT_REASONS: &[&str] = &["join", "parent_lost", "rebalance"];

/// Reasons of `canopy_untrusted_frames_total`: a refused signer certificate
/// (`TrustError::label`) or a frame the replica refused for its seal.
pub const UNTRUSTED_REASONS: &[&str] = &[
    "bad_cert",
    "unknown_signer",
    "bad_signature",
    "malformed",
    "sign",
    "seal_missing",
    "seal_unexpected",
    "checkpoint_contradicts",
    "anchor_mismatch",
];

/// What `canopy_identity_refusals_total` counts: the request refused for the peer's
/// certificate name or role.
pub const IDENTITY_REFUSALS: &[&str] = &["certificate", "subscribe", "sample", "propose", "raft"];

/// Why a proposal through this node failed (`canopy_proposal_failures_total{reason}`):
/// `unavailable` is the core's (no leader, unreachable, timed out), the others the client's.
pub const PROPOSAL_FAILURES: &[&str] = &[
    "unavailable",
    "too_large",
    "invalid",
    "forbidden",
    "contended",
];

/// Where a refused chunk came from (`canopy_backfill_bad_chunks_total{source}`), and where
/// received backfill bytes came from: the parent's push and fallback, or a fetching peer.
pub const CHUNK_SOURCES: &[&str] = &["parent", "peer"];

/// Every `canopy_*` and Raft family this crate exports, with its HELP text. The live
/// families ([`LIVE_FAMILIES`]) and the process families are rendered by [`render`] itself.
const DESCRIBED: &[(&str, &str)] = &[
    ("canopy_apply_delay_seconds", "Delay from the core's commit of an entry to its apply on this node (core clock)."),
    ("canopy_children", "Children this node serves now."),
    ("canopy_relayed_bytes_total", "Bytes sent to children and fetching peers: entries, checkpoints, transfers."),
    ("canopy_checkpoints_verified_total", "Checkpoints whose root matched this node's."),
    ("canopy_seals_chained_total", "Seals of queued entries proven by the signature of a later seal they link up to, instead of one signature check each (a relay behind its parent)."),
    ("canopy_checkpoint_mismatches_total", "Checkpoints whose root differed from this node's (divergence): each triggers a full resync."),
    ("canopy_child_cutoffs_total", "Children cut off: send queue over child_queue_bytes, or this node installed a snapshot."),
    ("canopy_frame_errors_total", "Connections closed for a malformed frame or request."),
    ("canopy_handshake_failures_total", "Incoming TLS handshakes refused."),
    ("canopy_full_transfers_served_total", "Whole-file or diff transfers served to subscribing children."),
    ("canopy_resumes_served_total", "Subscriptions served from retained entries."),
    ("canopy_full_transfers_received_total", "Whole-file or diff transfers installed by this node."),
    ("canopy_proposals_total", "Writes proposed through this node."),
    ("canopy_proposal_failures_total", "Writes proposed through this node that failed, by reason (unavailable is the core's)."),
    ("canopy_backfill_received_bytes_total", "Chunk bytes received in transfers, by source (parent or peer)."),
    ("canopy_backfill_prefaulted_bytes_total", "Heap bytes faulted in at a transfer's start for the chunks it will bring (MADV_POPULATE_WRITE; 0 where the kernel cannot)."),
    ("canopy_backfill_served_bytes_total", "Chunk bytes served in transfers to children and peers."),
    ("canopy_backfill_bad_chunks_total", "Chunks refused because they did not match the manifest, by source (parent or peer)."),
    ("canopy_backfill_seconds", "Duration of a transfer received, from its start to its install."),
    ("canopy_backfills_serving", "Transfers this node serves now."),
    ("canopy_cert_expiry_seconds", "Seconds until this node's certificate expires (negative once expired)."),
    ("canopy_disk_full", "1 while the last write of --file failed for lack of space, else 0."),
    ("canopy_materialize_bytes_total", "Content bytes written to disk for --file (the filesystem's metadata not included)."),
    ("canopy_materialize_writes_total", "Writes that made a new version of --file visible."),
    ("canopy_heartbeats_sent_total", "Heartbeats sent to children (at most one per idle link per heartbeat_ms)."),
    ("canopy_heartbeats_received_total", "Heartbeats received from the parent."),
    ("canopy_connections_served", "QUIC connections this node accepted that are still open (children, one-shot exchanges under way)."),
    ("canopy_overlay_messages_total", "Messages of the tree's control plane this node sent, by kind (the simulator's counts: sample_request, sample_answer, attach_request, attach_answer, detach, path_update, child_report)."),
    ("canopy_samples_total", "Samples this node asked of peers for its view, each over a connection of its own (kept briefly for the attach that follows while the node has no parent)."),
    ("canopy_attach_connections_total", "Connections this node subscribed to a parent over, by how it got them: the one a sample just made (sampled) or a new handshake (dialed)."),
    ("canopy_parent_link_datagrams", "UDP datagrams on the current parent link as of its last heartbeat, by direction (sent, received)."),
    ("canopy_parent_link_mtu_bytes", "Largest UDP payload the current parent link carries, as MTU discovery found it (at most stream.max_udp_payload_bytes), as of its last heartbeat."),
    ("canopy_reparents_total", "Changes of parent, by reason (join, parent_lost, rebalance)."),
    ("canopy_resyncs_total", "Resubscriptions of this node's upstream, by reason."),
    ("canopy_untrusted_frames_total", "Frames or signer certificates refused for lack of a valid core signature, by reason."),
    ("canopy_rejected_total", "Requests from clients or peers refused for a limit (size, count, concurrency, malformed input), by reason."),
    ("canopy_identity_refusals_total", "Requests refused because the peer's certificate name or role does not allow them, by request."),
    ("canopy_raft_term", "Raft term this core member is in."),
    ("canopy_raft_is_leader", "1 while this core member leads, else 0."),
    ("canopy_raft_commit_index", "Raft log index committed, as this member knows it."),
    ("canopy_raft_applied_index", "Raft log index applied by this member."),
    ("canopy_raft_last_log_index", "Last Raft log index in this member's log."),
    ("canopy_raft_elections_total", "Raft elections seen by this member (each new term is one)."),
    ("canopy_raft_fsync_seconds", "Duration of one fsync'd Raft log append."),
    ("canopy_raft_root_mismatches_total", "Root cross-checks in which this member's root differed from the leader's."),
];

/// Histogram buckets by family: each covers what its family measures, with room above.
const BUCKETS: &[(&str, &[f64])] = &[
    (
        "canopy_apply_delay_seconds",
        &[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ],
    ),
    (
        "canopy_backfill_seconds",
        &[
            0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
        ],
    ),
    (
        "canopy_raft_fsync_seconds",
        &[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5,
        ],
    ),
];

/// Installs the process-wide recorder on first use and returns the handle that renders it.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let mut builder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ])
            .expect("static bucket list is non-empty");
        for (name, buckets) in BUCKETS {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
                .expect("static bucket list is non-empty");
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
        }
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("canopy-metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP_PERIOD);
                upkeep.run_upkeep();
                UPKEEPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            tracing::warn!("no metrics upkeep thread ({e}): histograms grow until scraped");
        }
        for &(name, help) in DESCRIBED {
            if name.ends_with("_total") {
                metrics::describe_counter!(name, help);
            } else if BUCKETS.iter().any(|(n, _)| *n == name) {
                metrics::describe_histogram!(name, help);
            } else {
                metrics::describe_gauge!(name, help);
            }
        }
        handle
    })
}

/// A node's position as of a scrape: read under the node's own locks when `/metrics` is
/// rendered, never cached.
#[derive(Clone, Debug, PartialEq)]
pub struct Live {
    pub node: String,
    pub applied_version: u64,
    pub commit_version: u64,
    pub lag_entries: u64,
    /// Age of the oldest committed entry not applied yet (0 when none is known).
    pub lag_seconds: f64,
    /// Distance from the core; `None` while a relay is unattached (no series).
    pub depth: Option<u32>,
    /// Version last written to `--file`; `None` before the first write (no series).
    pub materialized_version: Option<u64>,
    /// `(bytes held, bytes in all)` of the transfer being received; `None` when none is.
    pub backfill: Option<(u64, u64)>,
    /// Datagrams the kernel dropped on their way into this node's UDP socket
    /// ([`crate::udp::drops`]); `None` when unknown (no series).
    pub udp_drops: Option<u64>,
    /// Bytes of `limits.request_bytes` held now by the first frames of requests being read
    /// or (proposals) served.
    pub request_bytes_held: u64,
}

/// The families a [`Live`] source reports, with their HELP text.
pub const LIVE_FAMILIES: &[(&str, &str)] = &[
    ("canopy_applied_version", "Version this node shows (the last entry applied and sealed)."),
    ("canopy_commit_version", "Highest version this node knows the core has committed."),
    ("canopy_lag_entries", "Committed entries this node has not applied yet, as of the scrape."),
    ("canopy_lag_seconds", "Age of the commit this node is behind by, as of the scrape; 0 when it has applied every commit it knows of."),
    ("canopy_depth", "Distance from the core (0 on a core node); absent while a relay is unattached."),
    ("canopy_materialized_version", "Version last written to --file; absent before the first write."),
    ("canopy_backfill_done_bytes", "Bytes held of the version a transfer being received brings; absent when none is received."),
    ("canopy_backfill_total_bytes", "Length of the version a transfer being received brings; absent when none is received."),
    ("canopy_request_bytes_held", "Bytes of limits.request_bytes held by the first frames of peers' requests being read, and by proposals until answered; at the limit, requests wait and then are refused (canopy_rejected_total{reason=\"request_budget\"})."),
];

/// A node's live state, or `None` once the node is gone (its source is then dropped).
pub type LiveSource = Box<dyn Fn() -> Option<Live> + Send + Sync>;

static LIVE: Mutex<Vec<LiveSource>> = Mutex::new(Vec::new());

/// Adds a node's live source to every later render, until it returns `None`.
pub fn register_live(source: LiveSource) {
    LIVE.lock().push(source);
}

/// The Prometheus text of the whole process: the recorder's families, the live families of
/// every node in the process, and the process's own RSS, CPU and file descriptors.
pub fn render() -> String {
    let mut out = handle().render();
    let nodes: Vec<Live> = {
        let mut sources = LIVE.lock();
        let mut nodes = Vec::with_capacity(sources.len());
        sources.retain(|s| match s() {
            Some(l) => {
                nodes.push(l);
                true
            }
            None => false,
        });
        nodes
    };
    render_live(&mut out, &nodes);
    render_process(&mut out);
    out
}

fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value escaped for the text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn render_live(out: &mut String, nodes: &[Live]) {
    if nodes.is_empty() {
        return;
    }
    for (name, help) in LIVE_FAMILIES {
        family(out, name, help, "gauge");
        for l in nodes {
            let value = match *name {
                "canopy_applied_version" => Some(l.applied_version as f64),
                "canopy_commit_version" => Some(l.commit_version as f64),
                "canopy_lag_entries" => Some(l.lag_entries as f64),
                "canopy_lag_seconds" => Some(l.lag_seconds),
                "canopy_depth" => l.depth.map(f64::from),
                "canopy_materialized_version" => l.materialized_version.map(|v| v as f64),
                "canopy_backfill_done_bytes" => l.backfill.map(|(d, _)| d as f64),
                "canopy_backfill_total_bytes" => l.backfill.map(|(_, t)| t as f64),
                "canopy_request_bytes_held" => Some(l.request_bytes_held as f64),
                _ => None,
            };
            if let Some(v) = value {
                let _ = writeln!(out, "{name}{{node=\"{}\"}} {v}", escape(&l.node));
            }
        }
        out.push('\n');
    }
    let (name, help) = UDP_DROPS;
    family(out, name, help, "counter");
    for l in nodes {
        if let Some(v) = l.udp_drops {
            let _ = writeln!(out, "{name}{{node=\"{}\"}} {v}", escape(&l.node));
        }
    }
    out.push('\n');
}

/// The one counter a [`Live`] source reports, read from the kernel at the scrape.
pub const UDP_DROPS: (&str, &str) = (
    "canopy_udp_receive_drops_total",
    "Datagrams the kernel dropped on their way into this node's UDP socket (its receive buffer full): each is a QUIC loss; raise stream.udp_buffer_bytes or the sysctls that cap it.",
);

/// The process's resource use, read from `/proc/self` (Linux). A value that cannot be
/// read is left out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

/// Clock ticks per second of `/proc/*/stat` times: `USER_HZ`, fixed at 100 in Linux's ABI.
const USER_HZ: f64 = 100.0;

impl ProcessStats {
    pub fn read() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|k| k * 1024)
        };
        // Fields after the command (which may hold spaces) start at the state, field 3.
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        let cpu_seconds = match (field(14), field(15)) {
            (Some(u), Some(s)) => Some((u + s) / USER_HZ),
            _ => None,
        };
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        let start_time_seconds = match (boot_time, field(22)) {
            (Some(b), Some(t)) => Some(b + t / USER_HZ),
            _ => None,
        };
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3))
                    .and_then(|v| v.parse().ok())
            });
        ProcessStats {
            cpu_seconds,
            resident_bytes: kib("VmRSS:"),
            virtual_bytes: kib("VmSize:"),
            open_fds,
            max_fds,
            start_time_seconds,
        }
    }
}

fn render_process(out: &mut String) {
    let p = ProcessStats::read();
    let rows: [(&str, &str, &str, Option<f64>); 6] = [
        (
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            "counter",
            p.cpu_seconds,
        ),
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            "gauge",
            p.resident_bytes.map(|v| v as f64),
        ),
        (
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            "gauge",
            p.virtual_bytes.map(|v| v as f64),
        ),
        (
            "process_open_fds",
            "Number of open file descriptors.",
            "gauge",
            p.open_fds.map(|v| v as f64),
        ),
        (
            "process_max_fds",
            "Maximum number of open file descriptors.",
            "gauge",
            p.max_fds.map(|v| v as f64),
        ),
        (
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            "gauge",
            p.start_time_seconds,
        ),
    ];
    for (name, help, kind, value) in rows {
        if let Some(v) = value {
            family(out, name, help, kind);
            let _ = writeln!(out, "{name} {v}\n");
        }
    }
}

/// Whether a write failed for lack of space (`ENOSPC`) or quota (`EDQUOT`): what
/// `canopy_disk_full` reports.
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// The series of one node.
#[derive(Clone)]
pub struct NodeMetrics {
    pub apply_delay: Histogram,
    pub children: Gauge,
    pub relayed_bytes: Counter,
    pub checkpoint_ok: Counter,
    pub seals_chained: Counter,
    pub checkpoint_mismatches: Counter,
    pub child_cutoffs: Counter,
    pub frame_errors: Counter,
    pub handshake_failures: Counter,
    pub full_transfers_served: Counter,
    pub resumes_served: Counter,
    pub full_transfers_received: Counter,
    pub proposals: Counter,
    /// Chunk bytes received from the parent (`source="parent"`).
    pub backfill_received: Counter,
    /// Chunk bytes fetched from other peers (`source="peer"`).
    pub backfill_received_peers: Counter,
    pub backfill_served: Counter,
    /// Heap bytes faulted in ahead of transfers ([`crate::prefault`]).
    pub backfill_prefaulted: Counter,
    pub backfill_seconds: Histogram,
    pub backfills_serving: Gauge,
    /// Seconds until this node's own certificate expires.
    pub cert_expiry_seconds: Gauge,
    /// 1 while writing `--file` fails for lack of space.
    pub disk_full: Gauge,
    materialize_bytes: Counter,
    materialize_writes: Counter,
    /// Heartbeats sent to children: at most one per idle link per `heartbeat_ms`.
    pub heartbeats_sent: Counter,
    /// Heartbeats received from the parent.
    pub heartbeats_received: Counter,
    /// QUIC connections this node accepted that are still open: its children's, plus the
    /// few of one-shot exchanges (samples, fetches, tree queries) under way.
    pub connections_served: Gauge,
    /// Samples this node asked of peers (each over a connection of its own).
    pub samples: Counter,
    /// Subscriptions to a parent made over the connection a sample just made.
    pub attach_connections_sampled: Counter,
    /// Subscriptions to a parent made over a connection of their own.
    pub attach_connections_dialed: Counter,
    /// UDP datagrams sent on the current parent link, as of its last heartbeat.
    pub parent_link_sent: Gauge,
    /// UDP datagrams received on the current parent link, as of its last heartbeat.
    pub parent_link_received: Gauge,
    /// The parent link's UDP payload bound found by MTU discovery, as of its last heartbeat.
    pub parent_link_mtu: Gauge,
    node: String,
}

impl NodeMetrics {
    /// Registers every series of node `node`, the labelled counters at 0 for each known
    /// label value.
    pub fn new(node: &str) -> Self {
        handle();
        let n = node.to_string();
        let l = [("node", n.clone())];
        let by = |name: &'static str, label: &'static str, values: &[&'static str]| {
            for v in values {
                metrics::counter!(name, "node" => n.clone(), label => *v).absolute(0);
            }
        };
        let counter_by = |name: &'static str, label: &'static str, value: &'static str| metrics::counter!(name, "node" => n.clone(), label => value);
        by("canopy_resyncs_total", "reason", RESYNC_REASONS);
        by("canopy_reparents_total", "reason", REPARENT_REASONS);
        by("canopy_untrusted_frames_total", "reason", UNTRUSTED_REASONS);
        by("canopy_identity_refusals_total", "what", IDENTITY_REFUSALS);
        by("canopy_backfill_bad_chunks_total", "source", CHUNK_SOURCES);
        by("canopy_overlay_messages_total", "kind", OVERLAY_MESSAGES);
        by(
            "canopy_proposal_failures_total",
            "reason",
            PROPOSAL_FAILURES,
        );
        let disk_full = metrics::gauge!("canopy_disk_full", &l);
        disk_full.set(0.0);
        Self {
            apply_delay: metrics::histogram!("canopy_apply_delay_seconds", &l),
            children: metrics::gauge!("canopy_children", &l),
            relayed_bytes: metrics::counter!("canopy_relayed_bytes_total", &l),
            checkpoint_ok: metrics::counter!("canopy_checkpoints_verified_total", &l),
            seals_chained: metrics::counter!("canopy_seals_chained_total", &l),
            checkpoint_mismatches: metrics::counter!("canopy_checkpoint_mismatches_total", &l),
            child_cutoffs: metrics::counter!("canopy_child_cutoffs_total", &l),
            frame_errors: metrics::counter!("canopy_frame_errors_total", &l),
            handshake_failures: metrics::counter!("canopy_handshake_failures_total", &l),
            full_transfers_served: metrics::counter!("canopy_full_transfers_served_total", &l),
            resumes_served: metrics::counter!("canopy_resumes_served_total", &l),
            full_transfers_received: metrics::counter!("canopy_full_transfers_received_total", &l),
            proposals: metrics::counter!("canopy_proposals_total", &l),
            backfill_received: counter_by(
                "canopy_backfill_received_bytes_total",
                "source",
                "parent",
            ),
            backfill_received_peers: counter_by(
                "canopy_backfill_received_bytes_total",
                "source",
                "peer",
            ),
            backfill_served: metrics::counter!("canopy_backfill_served_bytes_total", &l),
            backfill_prefaulted: metrics::counter!("canopy_backfill_prefaulted_bytes_total", &l),
            backfill_seconds: metrics::histogram!("canopy_backfill_seconds", &l),
            backfills_serving: metrics::gauge!("canopy_backfills_serving", &l),
            cert_expiry_seconds: metrics::gauge!("canopy_cert_expiry_seconds", &l),
            disk_full,
            materialize_bytes: metrics::counter!("canopy_materialize_bytes_total", &l),
            materialize_writes: metrics::counter!("canopy_materialize_writes_total", &l),
            heartbeats_sent: metrics::counter!("canopy_heartbeats_sent_total", &l),
            heartbeats_received: metrics::counter!("canopy_heartbeats_received_total", &l),
            connections_served: metrics::gauge!("canopy_connections_served", &l),
            samples: metrics::counter!("canopy_samples_total", &l),
            attach_connections_sampled: counter_by(
                "canopy_attach_connections_total",
                "how",
                "sampled",
            ),
            attach_connections_dialed: counter_by(
                "canopy_attach_connections_total",
                "how",
                "dialed",
            ),
            parent_link_sent: metrics::gauge!(
                "canopy_parent_link_datagrams",
                "node" => n.clone(),
                "dir" => "sent"
            ),
            parent_link_received: metrics::gauge!(
                "canopy_parent_link_datagrams",
                "node" => n.clone(),
                "dir" => "received"
            ),
            parent_link_mtu: metrics::gauge!("canopy_parent_link_mtu_bytes", &l),
            node: n,
        }
    }

    /// Counts one write of `--file` that made a new version visible, and its bytes.
    pub fn materialized(&self, bytes: u64) {
        self.materialize_bytes.increment(bytes);
        self.materialize_writes.increment(1);
    }

    /// Counts one message of the tree's control plane this node sent, by kind
    /// ([`OVERLAY_MESSAGES`]).
    pub fn overlay_message(&self, kind: &'static str) {
        debug_assert!(OVERLAY_MESSAGES.contains(&kind), "unknown kind {kind}");
        metrics::counter!("canopy_overlay_messages_total", "node" => self.node.clone(), "kind" => kind)
            .increment(1);
    }

    /// Counts one change of parent, by reason ([`REPARENT_REASONS`]).
    pub fn reparent(&self, reason: &'static str) {
        debug_assert!(
            REPARENT_REASONS.contains(&reason),
            "unknown reason {reason}"
        );
        metrics::counter!("canopy_reparents_total", "node" => self.node.clone(), "reason" => reason)
            .increment(1);
    }

    /// Counts one chunk refused against its manifest, by where it came from: `from_parent`
    /// (the parent's push or fallback) or a fetching peer. The peer's address is logged,
    /// not made a label.
    pub fn bad_chunk(&self, from_parent: bool) {
        let source = if from_parent { "parent" } else { "peer" };
        metrics::counter!(
            "canopy_backfill_bad_chunks_total",
            "node" => self.node.clone(),
            "source" => source
        )
        .increment(1);
    }

    /// Counts one frame refused for lack of a valid core signature, or one refused signer
    /// certificate, by reason ([`UNTRUSTED_REASONS`]).
    pub fn untrusted(&self, reason: &'static str) {
        debug_assert!(
            UNTRUSTED_REASONS.contains(&reason),
            "unknown reason {reason}"
        );
        metrics::counter!("canopy_untrusted_frames_total", "node" => self.node.clone(), "reason" => reason)
            .increment(1);
    }

    /// Counts one request refused because the name a peer declared is not the one its
    /// certificate carries, or its role may not make it, by what it was
    /// ([`IDENTITY_REFUSALS`]).
    pub fn refused_identity(&self, what: &'static str) {
        debug_assert!(IDENTITY_REFUSALS.contains(&what), "unknown request {what}");
        metrics::counter!("canopy_identity_refusals_total", "node" => self.node.clone(), "what" => what)
            .increment(1);
    }

    /// Counts one failed proposal, by reason ([`PROPOSAL_FAILURES`]).
    pub fn proposal_failed(&self, reason: &'static str) {
        debug_assert!(
            PROPOSAL_FAILURES.contains(&reason),
            "unknown reason {reason}"
        );
        metrics::counter!("canopy_proposal_failures_total", "node" => self.node.clone(), "reason" => reason)
            .increment(1);
    }

    /// Counts one resubscription of this node's upstream, by reason ([`RESYNC_REASONS`]).
    pub fn resync(&self, reason: &'static str) {
        debug_assert!(RESYNC_REASONS.contains(&reason), "unknown reason {reason}");
        metrics::counter!("canopy_resyncs_total", "node" => self.node.clone(), "reason" => reason)
            .increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of `text` for family `name` with label `node="n"`.
    fn series<'a>(text: &'a str, name: &str, n: &str) -> Vec<&'a str> {
        let needle = format!("node=\"{n}\"");
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&needle))
            .collect()
    }

    #[test]
    fn reason_labels_exist_at_zero_from_the_start() {
        let _m = NodeMetrics::new("zero-test");
        let text = render();
        for (family, label, values) in [
            ("canopy_resyncs_total", "reason", RESYNC_REASONS),
            ("canopy_reparents_total", "reason", REPARENT_REASONS),
            ("canopy_untrusted_frames_total", "reason", UNTRUSTED_REASONS),
            ("canopy_identity_refusals_total", "what", IDENTITY_REFUSALS),
            ("canopy_backfill_bad_chunks_total", "source", CHUNK_SOURCES),
            (
                "canopy_proposal_failures_total",
                "reason",
                PROPOSAL_FAILURES,
            ),
        ] {
            let lines = series(&text, family, "zero-test");
            assert_eq!(lines.len(), values.len(), "{family}: {lines:?}");
            for v in values {
                let want = format!("{label}=\"{v}\"");
                assert!(
                    lines.iter().any(|l| l.contains(&want) && l.ends_with(" 0")),
                    "{family}{{{want}}} at 0: {lines:?}"
                );
            }
        }
    }

    #[test]
    fn live_series_leave_out_what_is_unknown_and_go_when_the_node_does() {
        let gone = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let g = gone.clone();
        register_live(Box::new(move || {
            (!g.load(std::sync::atomic::Ordering::SeqCst)).then(|| Live {
                node: "live-\"test\"".into(),
                applied_version: 7,
                commit_version: 9,
                lag_entries: 2,
                lag_seconds: 1.5,
                depth: None,
                materialized_version: None,
                backfill: None,
                udp_drops: Some(4),
                request_bytes_held: 12,
            })
        }));
        let text = render();
        let n = "live-\\\"test\\\"";
        assert_eq!(
            series(&text, "canopy_lag_seconds", n),
            [format!("canopy_lag_seconds{{node=\"{n}\"}} 1.5")]
        );
        assert_eq!(series(&text, "canopy_commit_version", n).len(), 1);
        assert!(series(&text, "canopy_depth", n).is_empty(), "{text}");
        assert!(series(&text, "canopy_materialized_version", n).is_empty());
        assert_eq!(
            series(&text, "canopy_udp_receive_drops_total", n),
            [format!("canopy_udp_receive_drops_total{{node=\"{n}\"}} 4")]
        );
        assert!(text.contains("# TYPE canopy_udp_receive_drops_total counter"));
        assert_eq!(
            series(&text, "canopy_request_bytes_held", n),
            [format!("canopy_request_bytes_held{{node=\"{n}\"}} 12")]
        );
        gone.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(series(&render(), "canopy_lag_seconds", n).is_empty());
    }

    #[test]
    fn every_family_has_help_and_type_once() {
        let _m = NodeMetrics::new("help-test");
        let text = render();
        let mut typed = std::collections::BTreeMap::new();
        for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = l.split_whitespace().nth(2).unwrap();
            *typed.entry(name.to_string()).or_insert(0) += 1;
        }
        for (name, count) in &typed {
            assert_eq!(*count, 1, "{name} typed {count} times");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
        }
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(typed.contains_key(name), "{name} missing:\n{text}");
        }
        let rss = ProcessStats::read().resident_bytes.unwrap();
        assert!(rss > 1 << 20, "RSS {rss}");
    }

    #[test]
    fn backfill_seconds_has_buckets_beyond_ten_seconds() {
        let m = NodeMetrics::new("bucket-test");
        m.backfill_seconds.record(45.0);
        let text = render();
        let b = series(&text, "canopy_backfill_seconds_bucket", "bucket-test");
        assert!(
            b.iter()
                .any(|l| l.contains("le=\"60\"") && l.ends_with(" 1")),
            "{b:?}"
        );
        assert!(b
            .iter()
            .any(|l| l.contains("le=\"30\"") && l.ends_with(" 0")));
    }
}
