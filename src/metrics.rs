//! Prometheus metrics for every node, rendered on the node's own HTTP API.
//!
//! Invariants: one process-wide recorder (installed once, so several nodes can share a
//! process, as in `canopy demo`); every series carries a `node` label naming its node.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder on first use and returns the handle that renders it.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ])
            .expect("static bucket list is non-empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
        }
        handle
    })
}

/// The series of one node.
#[derive(Clone)]
pub struct NodeMetrics {
    pub applied_version: Gauge,
    pub commit_version: Gauge,
    pub lag_entries: Gauge,
    pub lag_seconds: Gauge,
    pub apply_delay: Histogram,
    pub children: Gauge,
    pub depth: Gauge,
    pub relayed_bytes: Counter,
    pub checkpoint_ok: Counter,
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
    pub backfill_seconds: metrics::Histogram,
    pub backfills_serving: Gauge,
    pub materialized_version: Gauge,
    /// Seconds until this node's own certificate expires.
    pub cert_expiry_seconds: Gauge,
    node: String,
}

impl NodeMetrics {
    pub fn new(node: &str) -> Self {
        handle();
        let n = node.to_string();
        let l = [("node", n.clone())];
        Self {
            applied_version: metrics::gauge!("canopy_applied_version", &l),
            commit_version: metrics::gauge!("canopy_commit_version", &l),
            lag_entries: metrics::gauge!("canopy_lag_entries", &l),
            lag_seconds: metrics::gauge!("canopy_lag_seconds", &l),
            apply_delay: metrics::histogram!("canopy_apply_delay_seconds", &l),
            children: metrics::gauge!("canopy_children", &l),
            depth: metrics::gauge!("canopy_depth", &l),
            relayed_bytes: metrics::counter!("canopy_relayed_bytes_total", &l),
            checkpoint_ok: metrics::counter!("canopy_checkpoints_verified_total", &l),
            checkpoint_mismatches: metrics::counter!("canopy_checkpoint_mismatches_total", &l),
            child_cutoffs: metrics::counter!("canopy_child_cutoffs_total", &l),
            frame_errors: metrics::counter!("canopy_frame_errors_total", &l),
            handshake_failures: metrics::counter!("canopy_handshake_failures_total", &l),
            full_transfers_served: metrics::counter!("canopy_full_transfers_served_total", &l),
            resumes_served: metrics::counter!("canopy_resumes_served_total", &l),
            full_transfers_received: metrics::counter!("canopy_full_transfers_received_total", &l),
            proposals: metrics::counter!("canopy_proposals_total", &l),
            backfill_received: metrics::counter!(
                "canopy_backfill_received_bytes_total",
                "node" => n.clone(),
                "source" => "parent"
            ),
            backfill_received_peers: metrics::counter!(
                "canopy_backfill_received_bytes_total",
                "node" => n.clone(),
                "source" => "peer"
            ),
            backfill_served: metrics::counter!("canopy_backfill_served_bytes_total", &l),
            backfill_seconds: metrics::histogram!("canopy_backfill_seconds", &l),
            backfills_serving: metrics::gauge!("canopy_backfills_serving", &l),
            materialized_version: metrics::gauge!("canopy_materialized_version", &l),
            cert_expiry_seconds: metrics::gauge!("canopy_cert_expiry_seconds", &l),
            node: n,
        }
    }

    /// Counts one change of parent, by reason (join, parent_lost, rebalance).
    pub fn reparent(&self, reason: &'static str) {
        metrics::counter!("canopy_reparents_total", "node" => self.node.clone(), "reason" => reason)
            .increment(1);
    }

    /// Counts one chunk refused against its manifest, by the address that sent it.
    pub fn bad_chunk(&self, source: &str) {
        metrics::counter!(
            "canopy_backfill_bad_chunks_total",
            "node" => self.node.clone(),
            "source" => source.to_string()
        )
        .increment(1);
    }

    /// Counts one frame refused for lack of a valid core signature, or one refused signer
    /// certificate, by reason.
    pub fn untrusted(&self, reason: &'static str) {
        metrics::counter!("canopy_untrusted_frames_total", "node" => self.node.clone(), "reason" => reason)
            .increment(1);
    }

    /// Counts one request refused because the name a peer declared is not the one its
    /// certificate carries, or its role may not make it, by what it was.
    pub fn refused_identity(&self, what: &'static str) {
        metrics::counter!("canopy_identity_refusals_total", "node" => self.node.clone(), "what" => what)
            .increment(1);
    }

    /// Counts one resubscription of this node's upstream, by reason.
    pub fn resync(&self, reason: &'static str) {
        metrics::counter!("canopy_resyncs_total", "node" => self.node.clone(), "reason" => reason)
            .increment(1);
    }
}
