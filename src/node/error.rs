//! The node driver's error type and the QUIC close codes it uses.

use std::path::PathBuf;

use crate::consensus::ConsensusError;
use crate::file::FileError;
use crate::transport::{DialError, StreamError};
use crate::wire::WireError;

/// QUIC application close codes.
pub(crate) mod code {
    pub const SHUTDOWN: u32 = 0;
    pub const BAD_FRAME: u32 = 2;
    pub const CUT_OFF: u32 = 3;
    pub const RESYNC: u32 = 4;
    pub const MOVED: u32 = 5;
    /// A stream reset: its first frame found no room in `limits.request_bytes` in time; a
    /// connection closed: `limits.connections` reached.
    pub const BUSY: u32 = 6;
    /// A stream reset: its first frame did not arrive within `limits.request_timeout_ms`.
    pub const TIMEOUT: u32 = 7;
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("file: {0}")]
    File(#[from] FileError),
    #[error("consensus: {0}")]
    Consensus(#[from] ConsensusError),
    #[error("wire: {0}")]
    Wire(#[from] WireError),
    #[error("stream: {0}")]
    Stream(#[from] StreamError),
    #[error("{0}")]
    Dial(#[from] DialError),
    #[error("connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("no core node is known (no parent yet and no --join address)")]
    NoCore,
    #[error("update of {size} bytes exceeds max_update_bytes {max}")]
    UpdateTooLarge { size: u64, max: u64 },
    #[error("the core rejected the proposal: {0}")]
    Rejected(String),
    #[error("replace did not settle after {0} attempts under concurrent writes")]
    Contended(u32),
    #[error("io on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("materialize: {0}")]
    Materialize(#[from] super::materialize::MaterializeError),
    #[error("shutting down")]
    Shutdown,
    #[error("this node is not a core node")]
    NotCore,
    #[error("identity: {0}")]
    Identity(String),
    #[error("{0}")]
    Forbidden(String),
    /// The core's proposal queue is full: nothing was proposed.
    #[error("busy: {0}")]
    Busy(String),
    #[error("the core may or may not have committed the write (after sending: {0}); check the version and retry if needed")]
    OutcomeUnknown(String),
    /// A request was sent, and no reply came within the bound for it.
    #[error("{what}: no reply within {after:?}")]
    NoReply {
        what: &'static str,
        after: std::time::Duration,
    },
}

impl NodeError {
    /// Transport failures, after which the same proposal (same id) may be sent again.
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(
            self,
            NodeError::Connect { .. }
                | NodeError::Dial(_)
                | NodeError::Wire(_)
                | NodeError::Stream(_)
                | NodeError::NoCore
        )
    }
}
