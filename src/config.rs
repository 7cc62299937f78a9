//! Node configuration: one struct per layer, every default with its reason, typed validation.
//!
//! Invariants: a config that passed [`NodeConfig::validate`] never makes a node panic; the
//! binaries load TOML into these structs and then let command-line flags override fields.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::consensus::{Member, RaftConfig};
use crate::file::{DEFAULT_CHUNK_SIZE, DEFAULT_MAX_LEN, MAX_CHUNK_COUNT, MIN_CHUNK_SIZE};
use crate::overlay::OverlayConfig;
use crate::replica::ReplicaConfig;
use crate::wire::DEFAULT_MAX_FRAME;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("name must be 1-64 characters of [A-Za-z0-9._-], got {0:?}")]
    BadName(String),
    #[error("zone must be 1 to 64 bytes, got {0:?}")]
    BadZone(String),
    #[error("zone_shares is a core node's setting (a relay holds no slots for zones)")]
    ZoneSharesOnRelay,
    #[error("zone_shares lists {zones} zones, more than the fanout of {fanout} (each needs a slot of its own) or than the 64 a peer accepts")]
    TooManyZoneShares { zones: usize, fanout: usize },
    #[error("{field} must be greater than zero")]
    Zero { field: &'static str },
    #[error("chunk_size must be a power of two between 4 KiB and 16 MiB, got {0}")]
    ChunkSize(u32),
    #[error("max_len {max_len} at chunk_size {chunk_size} makes {chunks} chunks, over the {MAX_CHUNK_COUNT} a node indexes (raise chunk_size or lower max_len)")]
    TooManyChunks {
        max_len: u64,
        chunk_size: u32,
        chunks: u64,
    },
    #[error("max_update_bytes ({max_update}) must not exceed max_len ({max_len})")]
    UpdateOverMaxLen { max_update: u64, max_len: u64 },
    #[error("limits: {field} must be greater than zero")]
    LimitZero { field: &'static str },
    #[error("limits: watches ({watches}) must be below http_requests ({requests}), or watches alone can take every request slot")]
    WatchesOverRequests { watches: usize, requests: usize },
    #[error("limits: request_bytes ({budget}) must be at least the largest first frame a peer may send ({need} bytes: a proposal of max_update_bytes, or a subscription listing max_len's chunks)")]
    RequestBudgetTooSmall { budget: u64, need: u64 },
    #[error(
        "max_frame ({max_frame}) must exceed max_update_bytes ({max_update}) by at least 64 KiB"
    )]
    FrameTooSmall { max_frame: usize, max_update: u64 },
    #[error("child_queue_bytes ({queue}) must be at least max_frame ({max_frame}), or one large entry cuts every child off")]
    QueueTooSmall { queue: u64, max_frame: usize },
    #[error("backfill_bytes_per_sec ({rate}) must be 0 (no limit) or at least one chunk ({chunk} bytes) per second, or children time out between chunks")]
    BackfillRateTooLow { rate: u64, chunk: u32 },
    #[error("fetch_window must be at most {MAX_FETCH_WINDOW} chunks (what one fetch request may ask), got {0}")]
    FetchWindow(u32),
    #[error("materialize.copies must be 2 to {MAX_MATERIALIZE_COPIES}, got {0}")]
    MaterializeCopies(u32),
    #[error("materialize.nice must be 0 to 19, got {0}")]
    MaterializeNice(i32),
    #[error("udp_buffer_bytes must be at most {max} (256 MiB), got {0}", max = crate::udp::MAX_UDP_BUFFER)]
    UdpBuffer(u64),
    #[error("max_udp_payload_bytes must be {min} to {max}, got {0}", min = crate::tls::MIN_UDP_PAYLOAD, max = crate::tls::MAX_UDP_PAYLOAD)]
    UdpPayload(u16),
    #[error("a relay needs at least one --join address")]
    NoJoin,
    #[error("raft: {0}")]
    Raft(String),
    #[error("overlay: {0}")]
    Overlay(String),
    #[error("--peer list must include this node ({0}) when it is given")]
    PeersWithoutSelf(String),
    #[error("--peer {0} appears twice")]
    DuplicatePeer(String),
    #[error("--peer {name}: address {addr} differs from this node's advertised {advertise}")]
    SelfAddr {
        name: String,
        addr: String,
        advertise: SocketAddr,
    },
}

/// Most chunks one fetch request may ask for (and so the largest `fetch_window`).
pub const MAX_FETCH_WINDOW: u32 = 1024;

/// Stream and fan-out settings shared by core and relay nodes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Chunk size. 64 KiB: small enough that a 100-byte write re-hashes little, large enough
    /// that a 50 MB file is only 800 chunks.
    pub chunk_size: u32,
    /// Largest file. 16 GiB: a 50 MB-10 GB file fits with room to grow. Every node holds
    /// the whole file in memory (chunks are shared buffers), so a file at `max_len` needs
    /// that much RAM on every host; regions never written (a truncate that extends) share
    /// one zero chunk and cost no memory and, materialized, no disk (sparse). A file
    /// larger than the hosts' memory is the operator's choice to make: lower it on small
    /// hosts (the node warns at start when it exceeds physical memory). It must be the same
    /// on every core member (a write over it is refused identically everywhere), and at
    /// most `chunk_size * 2^20` (the chunk index of a transfer is sized by it).
    pub max_len: u64,
    /// Largest frame accepted on any stream. 72 MiB: a 64 MiB update plus framing.
    pub max_frame: usize,
    /// Largest single update (sum of written bytes). 64 MiB: a whole-file PUT of a 50 MB file
    /// fits in one atomic entry.
    pub max_update_bytes: u64,
    /// Children served directly. 8: keeps the core's egress at a handful of copies per write.
    pub fanout: usize,
    /// Bytes queued for one child before it is cut off. 256 MiB: frames are shared between
    /// children, so this is accounting, not a copy; it must hold a full-size entry.
    pub child_queue_bytes: u64,
    /// Bytes of recent entries kept to resume children. 64 MiB: a child away for seconds
    /// resumes instead of taking a full transfer.
    pub retain_bytes: u64,
    /// A checkpoint after this many entries. 32: divergence is caught within a batch.
    pub checkpoint_every: u32,
    /// And at most this long after an entry (ms). 1000: idle clusters still verify promptly.
    pub checkpoint_interval_ms: u64,
    /// Heartbeat period from the core down the tree (ms). 500: lag stays visible when idle.
    pub heartbeat_ms: u64,
    /// QUIC idle timeout (ms): a peer whose connection is silent this long is gone; a dead
    /// child frees its slot after this. 2000. A link silent for half of it sends a QUIC
    /// keep-alive; a tree link never is (heartbeats and their acks cross it every
    /// `heartbeat_ms`), so keep-alives only hold up other idle connections, and an idle
    /// relay wakes for its heartbeats alone (a third of it woke it 3 times a second more
    /// per link, for nothing the heartbeats did not already prove).
    pub idle_timeout_ms: u64,
    /// QUIC receive window per stream (bytes). 16 MiB: a 50 MB transfer runs at loopback
    /// speed. With `child_queue_bytes` it bounds what a parent buffers for one slow child.
    pub stream_window_bytes: u64,
    /// Receive and send buffer asked of the kernel for the node's UDP socket (bytes; 0:
    /// the kernel's default, 208 KiB on Linux). 2 MiB: with the default, 100 relays joining
    /// at once with a 20 MB file dropped about 4 400 datagrams per join in full socket
    /// queues, each a loss QUIC must detect and resend and a cut in the sender's window;
    /// with 2 MiB a few hundred, and the join took a fifth less time and CPU. 4 MiB dropped
    /// none but slowed a lone relay's 50 MB bootstrap by a tenth, its datagrams read back
    /// cold from a deeper queue (docs/benchmarks.md). The memory is used only while
    /// datagrams queue. Beyond `net.core.rmem_max`/`wmem_max` the kernel grants it only to
    /// a process with CAP_NET_ADMIN (`deploy/canopy.sysctl` raises those caps); the node
    /// warns at start when it got less, and `canopy_udp_receive_drops_total` counts the
    /// drops. At most 256 MiB.
    pub udp_buffer_bytes: u64,
    /// Largest UDP payload QUIC may use on a path (bytes), found per connection by MTU
    /// discovery (RFC 8899): probes go up from 1200 towards this, and a path that drops them
    /// stays at what it carried. 8952: a 9000-byte jumbo frame less the IPv6 and UDP headers,
    /// what datacenter networks with jumbo frames carry; a 1500-byte network settles at
    /// about 1452 after a few lost probes. Bulk transfers then take a sixth of the packets
    /// (each one sealed, sent, received, opened and acknowledged on its own), and loopback,
    /// whose MTU is 64 KiB, gets the same. 1200 to 65507 (the largest IPv4 UDP payload);
    /// 1452 is quinn's own bound; 1200 turns discovery off.
    pub max_udp_payload_bytes: u16,
    /// A parent whose stream carries nothing (no entry, checkpoint or heartbeat) this long
    /// is dead and the child re-attaches (ms). 1500: three heartbeat periods.
    pub parent_timeout_ms: u64,
    /// Shortest gap between two writes of the materialized file (ms). 250: a burst of
    /// writes becomes one write of `--file`, and a reader sees a new version within a
    /// quarter of a second (see also `[materialize]`).
    pub materialize_interval_ms: u64,
    /// Core nodes: each entry seal also signs the link of the seal before it (`Seal.prev`),
    /// so that a relay behind its parent checks one signature for a run of queued entries
    /// instead of one each (docs/benchmarks.md). true. Relays accept seals with and without
    /// it; set it false on the cores while relays older than this version remain, which
    /// rebuild the signed message without it and refuse such seals.
    pub chain_seals: bool,
    /// Full or diff transfers this node serves at once; more children wait their turn (their
    /// live entries queue meanwhile). 4: half a fan-out of 8 bootstraps at once while the
    /// node keeps CPU and uplink for the live stream.
    pub max_backfills: u32,
    /// Bytes per second spent on the transfers served, all of them together (0: no limit).
    /// 0: on a LAN the link and the child's verification are the limit; set it where the
    /// uplink is shared with other traffic. Live entries are never paced.
    pub backfill_bytes_per_sec: u64,
    /// Sources one transfer draws from: the parent, plus up to this many minus one peers
    /// from the view, which are asked for chunks from the top of the file down while the
    /// parent pushes from the bottom (1: the parent alone). 4: a fleet starting at once
    /// spreads its transfers over every node already holding the file instead of queueing
    /// behind one parent's uplink; beyond a few sources each adds a connection for little.
    /// Set 1 where relays share cores: a cold start of 50 relays on one 2-core machine
    /// spent 40 % more CPU with peers (docs/benchmarks.md).
    pub fetch_sources: u32,
    /// Chunks asked of one peer source and not yet received. 32 (2 MiB at 64 KiB chunks):
    /// keeps 100 MB/s flowing over a 20 ms round trip, and bounds what a source that
    /// vanishes leaves to re-ask elsewhere.
    pub fetch_window: u32,
    /// Transfers with less than this beyond what the parent's push may have in flight
    /// (`stream_window_bytes`) come from the parent alone (bytes). 4 MiB: a diff of a few
    /// chunks is not worth new connections.
    pub fetch_min_bytes: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_len: DEFAULT_MAX_LEN,
            max_frame: DEFAULT_MAX_FRAME,
            max_update_bytes: 64 * 1024 * 1024,
            fanout: 8,
            child_queue_bytes: 256 * 1024 * 1024,
            retain_bytes: 64 * 1024 * 1024,
            checkpoint_every: 32,
            checkpoint_interval_ms: 1000,
            heartbeat_ms: 500,
            idle_timeout_ms: 2000,
            stream_window_bytes: 16 * 1024 * 1024,
            udp_buffer_bytes: 2 * 1024 * 1024,
            max_udp_payload_bytes: crate::tls::DEFAULT_MAX_UDP_PAYLOAD,
            parent_timeout_ms: 1500,
            materialize_interval_ms: 250,
            chain_seals: true,
            max_backfills: 4,
            backfill_bytes_per_sec: 0,
            fetch_sources: 4,
            fetch_window: 32,
            fetch_min_bytes: 4 * 1024 * 1024,
        }
    }
}

impl StreamConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=crate::file::MAX_CHUNK_SIZE).contains(&self.chunk_size)
        {
            return Err(ConfigError::ChunkSize(self.chunk_size));
        }
        let chunks = self.max_chunks();
        if chunks > MAX_CHUNK_COUNT {
            return Err(ConfigError::TooManyChunks {
                max_len: self.max_len,
                chunk_size: self.chunk_size,
                chunks,
            });
        }
        if self.max_update_bytes > self.max_len {
            return Err(ConfigError::UpdateOverMaxLen {
                max_update: self.max_update_bytes,
                max_len: self.max_len,
            });
        }
        for (field, v) in [
            ("fanout", self.fanout as u64),
            ("max_len", self.max_len),
            ("max_update_bytes", self.max_update_bytes),
            ("retain_bytes", self.retain_bytes),
            ("checkpoint_every", self.checkpoint_every as u64),
            ("checkpoint_interval_ms", self.checkpoint_interval_ms),
            ("heartbeat_ms", self.heartbeat_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("stream_window_bytes", self.stream_window_bytes),
            ("parent_timeout_ms", self.parent_timeout_ms),
            ("max_backfills", u64::from(self.max_backfills)),
            ("fetch_sources", u64::from(self.fetch_sources)),
            ("fetch_window", u64::from(self.fetch_window)),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if self.backfill_bytes_per_sec != 0
            && self.backfill_bytes_per_sec < u64::from(self.chunk_size)
        {
            return Err(ConfigError::BackfillRateTooLow {
                rate: self.backfill_bytes_per_sec,
                chunk: self.chunk_size,
            });
        }
        if self.fetch_window > MAX_FETCH_WINDOW {
            return Err(ConfigError::FetchWindow(self.fetch_window));
        }
        if self.udp_buffer_bytes > crate::udp::MAX_UDP_BUFFER {
            return Err(ConfigError::UdpBuffer(self.udp_buffer_bytes));
        }
        if !(crate::tls::MIN_UDP_PAYLOAD..=crate::tls::MAX_UDP_PAYLOAD)
            .contains(&self.max_udp_payload_bytes)
        {
            return Err(ConfigError::UdpPayload(self.max_udp_payload_bytes));
        }
        if (self.max_frame as u64) < self.max_update_bytes + 64 * 1024 {
            return Err(ConfigError::FrameTooSmall {
                max_frame: self.max_frame,
                max_update: self.max_update_bytes,
            });
        }
        if self.child_queue_bytes < self.max_frame as u64 {
            return Err(ConfigError::QueueTooSmall {
                queue: self.child_queue_bytes,
                max_frame: self.max_frame,
            });
        }
        Ok(())
    }

    /// Chunks of a file at `max_len`: what a transfer's manifest, a subscription's chunk
    /// list and a chunk index may hold.
    pub fn max_chunks(&self) -> u64 {
        crate::file::chunk_count_for(self.max_len, self.chunk_size)
    }

    /// Memory a node needs for a file at `max_len`: the content, its chunk index and hash
    /// tree, and a transfer's index beside it (the content of a transfer replaces the old
    /// file chunk by chunk, sharing the chunks that match).
    pub fn memory_needed(&self) -> u64 {
        const PER_CHUNK: u64 = 32 + 32 + 32 + 16 + 32;
        self.max_len
            .saturating_add(self.max_chunks().saturating_mul(PER_CHUNK))
            .saturating_add(self.retain_bytes)
    }

    /// A warning when a file at `max_len` would not fit `total_memory` bytes of RAM.
    pub fn memory_warning(&self, total_memory: u64) -> Option<String> {
        let need = self.memory_needed();
        (need > total_memory).then(|| {
            format!(
                "stream.max_len is {} bytes: a file that large needs about {need} bytes of memory on every node, more than this host's {total_memory}; lower max_len (the same on every core member) if the file may grow that far",
                self.max_len
            )
        })
    }

    pub fn replica(&self) -> ReplicaConfig {
        ReplicaConfig {
            chunk_size: self.chunk_size,
            max_len: self.max_len,
            retain_bytes: self.retain_bytes,
            checkpoint_every: self.checkpoint_every,
        }
    }

    /// The QUIC transport settings, with the default [`LimitsConfig::streams_per_connection`]
    /// (a node uses [`NodeConfig::transport`], which takes its own).
    pub fn transport(&self) -> crate::tls::TransportConfig {
        crate::tls::TransportConfig {
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            keep_alive: Duration::from_millis((self.idle_timeout_ms / 2).max(50)),
            stream_window: self.stream_window_bytes,
            conn_window: (self.stream_window_bytes * 4).max(8 * 1024 * 1024),
            max_concurrent_bidi: LimitsConfig::default().streams_per_connection,
            immediate_ack: true,
            udp_buffer: usize::try_from(self.udp_buffer_bytes).unwrap_or(usize::MAX),
            max_udp_payload: self.max_udp_payload_bytes,
        }
    }
}

/// Bounds on what clients and peers may ask of a node at once (`[limits]` in the config
/// file). Sizes a request declares are bounded by [`StreamConfig`] (`max_len`,
/// `max_update_bytes`, `max_frame`); these bound how many requests run at once. Over a
/// limit a request is refused at once, never queued without bound: 503 with `Retry-After`
/// over HTTP, a refused stream or a `busy` answer over QUIC, counted in
/// `canopy_rejected_total{reason}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// HTTP requests served at once, watches included. 256: far more than a host's local
    /// tools issue; each holds at most a few chunks (a GET streams) or one body (a write).
    pub http_requests: usize,
    /// `/v1/watch` long polls waiting at once. 128: one per local watcher process with room
    /// to spare, while half the request slots stay free for everything else.
    pub watches: usize,
    /// QUIC connections one peer address (IP and port: one node's endpoint) may hold open
    /// at once. 32: a node opens a handful to another (its subscription, fetches, samples,
    /// tree queries, two Raft links, the proposal cache); more is a peer gone wrong.
    pub connections_per_peer: usize,
    /// QUIC connections a node serves at once, from all peers together. 16384: a core
    /// serves a connection to every relay that forwards writes, in fleets of thousands,
    /// besides the tree's links; a bound so that peers on many addresses
    /// (`connections_per_peer` counts one address) cannot make a node hold connection
    /// state without end. 64 more are kept for core certificates, so that a full node
    /// still takes core members' Raft links: beyond the limit a connection is closed once
    /// its certificate shows it is not a core node's, and beyond both it is refused
    /// before the handshake.
    pub connections: usize,
    /// Bidirectional streams one QUIC connection may have open at once (the peer waits
    /// for credit beyond it). 64: concurrent proposals a relay forwards on its one core
    /// connection, plus fetch and Raft streams; each stream's buffer is bounded by
    /// `stream_window_bytes` and the connection's by four of them.
    pub streams_per_connection: u32,
    /// Proposals queued for a core node's group-commit batcher. 4096: eight full batches;
    /// beyond it the core answers `busy` (503 over HTTP) instead of queueing in memory.
    pub proposal_queue: usize,
    /// Bytes that the first frames of requests from peers other than core nodes may hold
    /// at once, node-wide: each takes its declared length before its body is allocated,
    /// and a proposal keeps it until it is answered. A request that finds no room within
    /// `request_timeout_ms` is refused (`busy`). 256 MiB: three proposals of the default
    /// `max_update_bytes` (64 MiB) at once, besides thousands of small ones, while a peer
    /// that sends part of a large frame and stops can no longer make the node hold more.
    /// At least the largest first frame a peer may send (a proposal of
    /// `max_update_bytes`, a subscription listing `max_len`'s chunks). Frames from core
    /// certificates (Raft) are not counted: the core is trusted.
    pub request_bytes: u64,
    /// How long the first frame of a request stream from a peer other than a core node
    /// may take to arrive whole, from the stream's opening (ms); the stream is then reset
    /// and counted
    /// (`canopy_rejected_total{reason="request_timeout"}`). 30000: a 64 MiB proposal at
    /// 2.2 MB/s; a peer that opens streams and sends nothing, or part of a frame, holds
    /// them (and its share of `request_bytes`) no longer than this.
    pub request_timeout_ms: u64,
    /// A write's HTTP body (PUT, PATCH) that sends nothing for this long is refused (408
    /// `body_timeout`), and its request slot freed (ms). 30000: a client that stalls
    /// (paused, or holding slots on purpose) holds one of `http_requests` no longer;
    /// a body that keeps coming, however slowly, is never cut.
    pub http_body_idle_ms: u64,
    /// TCP connections the HTTP API holds open at once; beyond it a new one is closed at
    /// once (`canopy_rejected_total{reason="http_connections"}`). 512: twice
    /// `http_requests`, room for keep-alive connections of scrapers and local tools, and
    /// half of the 1024 file descriptors a process started from a shell may open (the
    /// units in deploy/ allow 65536), so that clients that only connect cannot take the
    /// descriptors the node needs for its files.
    pub http_connections: usize,
    /// An HTTP connection that sends no whole request header for this long, after it
    /// opened or after its previous response, is closed (ms). 30000: a client sends its
    /// headers at once; a keep-alive connection idle between a scraper's requests is
    /// closed and opened again, and a client that trickles headers holds a connection no
    /// longer than this.
    pub http_header_timeout_ms: u64,
    /// How long a write waits for the core's answer (ms): a proposal a relay forwarded, a
    /// core node's own commit of its batch, a membership change forwarded to the leader.
    /// Then the client hears that the outcome is unknown, and how to check it. 60000: the
    /// core waits up to 10 s for a leader, then commits, and a 64 MiB write to followers
    /// on slow links takes seconds more; a core that stalls (a lost quorum) holds each
    /// waiting client's request slot no longer than this.
    pub commit_wait_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            http_requests: 256,
            watches: 128,
            connections_per_peer: 32,
            connections: 16384,
            streams_per_connection: 64,
            proposal_queue: 4096,
            request_bytes: 256 * 1024 * 1024,
            request_timeout_ms: 30_000,
            http_body_idle_ms: 30_000,
            http_connections: 512,
            http_header_timeout_ms: 30_000,
            commit_wait_ms: 60_000,
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, v) in [
            ("http_requests", self.http_requests as u64),
            ("watches", self.watches as u64),
            ("connections_per_peer", self.connections_per_peer as u64),
            ("connections", self.connections as u64),
            (
                "streams_per_connection",
                u64::from(self.streams_per_connection),
            ),
            ("proposal_queue", self.proposal_queue as u64),
            ("request_bytes", self.request_bytes),
            ("request_timeout_ms", self.request_timeout_ms),
            ("http_body_idle_ms", self.http_body_idle_ms),
            ("http_connections", self.http_connections as u64),
            ("http_header_timeout_ms", self.http_header_timeout_ms),
            ("commit_wait_ms", self.commit_wait_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::LimitZero { field });
            }
        }
        if self.watches >= self.http_requests {
            return Err(ConfigError::WatchesOverRequests {
                watches: self.watches,
                requests: self.http_requests,
            });
        }
        Ok(())
    }
}

/// How `--file` is rewritten when the file changes ([`MaterializeConfig::mode`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaterializeMode {
    /// Reflink where the filesystem can (btrfs, XFS, bcachefs), else swap, else rewrite;
    /// decided at start by trying each in `--file`'s directory.
    #[default]
    Auto,
    /// Clone the current file (`FICLONE`), write only the changed pages into the clone,
    /// fsync, rename it over `--file`. Every version is a fresh inode, as with rewrite, at
    /// the cost of the bytes that changed. The node refuses to start where cloning fails.
    Reflink,
    /// Physical copies next to `--file` (`.NAME.canopy-0`, `-1`, ...) take turns: the
    /// oldest is patched with the changes since its own version, fsynced, and hard-linked
    /// over `--file`. A copy is patched only `grace_ms` after it stopped being `--file`,
    /// and never while a reader holds a shared `flock` on it.
    Swap,
    /// Write the whole file to a temporary file, fsync, rename: what any filesystem can
    /// do, at the cost of the whole file per rewrite (paced by `max_bytes_per_sec`).
    Rewrite,
}

impl MaterializeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Reflink => "reflink",
            Self::Swap => "swap",
            Self::Rewrite => "rewrite",
        }
    }
}

/// Most physical copies `swap` may keep (each one is a whole file on disk).
pub const MAX_MATERIALIZE_COPIES: u32 = 8;

/// How a node keeps `--file` on disk (the `[materialize]` section). `--file` always holds
/// one whole version for a reader that opens it; these keys choose what that costs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaterializeConfig {
    /// `auto`, `reflink`, `swap` or `rewrite`. auto: the cheapest the filesystem allows;
    /// force `rewrite` where readers keep `--file` open for long and never take a `flock`.
    pub mode: MaterializeMode,
    /// swap only: a copy that stopped being `--file` is left untouched this long (ms),
    /// so a reader that opened it finishes reading a whole version. 2000: reading a
    /// page-cached 1 GB file takes well under a second. Readers that may take longer hold
    /// `flock(LOCK_SH)` on the file they opened while they read it.
    pub grace_ms: u64,
    /// swap only: physical copies that take turns (2 to 8). 3: `--file` is replaced at
    /// most once every `grace_ms / (copies - 1)` (1 s; and at least a materialize interval
    /// apart, more under `max_bytes_per_sec`), so under steady writes it trails the newest
    /// version by at most that, for 3 files of disk space; each change is written once
    /// per copy.
    pub copies: u32,
    /// Disk bytes per second the materializer may write, on average (0: no limit). After a
    /// write of B bytes the next waits at least B / this. 32 MiB/s: a whole 50 MB
    /// rewrite (first write, or `rewrite` mode) happens at most every 1.6 s instead of 4
    /// times a second, while patches of a few pages are never slowed.
    pub max_bytes_per_sec: u64,
    /// CPU niceness (0 to 19) of the thread that writes `--file`, so that where the CPU is
    /// contended the node's deliveries (and the host's other work) run first; the disk
    /// waits of a write are not slowed by it. 19: a swap write costs about 1 ms of CPU,
    /// mostly the kernel's, which a thread at 19 still gets within milliseconds beside a
    /// busy core. Measured with 300 relay processes on 2 cores, where all 300 write at
    /// once every 2 s: last-relay p99 242 ms against 332 at 0 (medians of 10 alternated
    /// rounds), for a p50 8 ms higher and 2 % more CPU (docs/benchmarks.md, session 15);
    /// 10 did not help there, as 300 writers at 10 still outweigh the deliveries.
    pub nice: i32,
}

impl Default for MaterializeConfig {
    fn default() -> Self {
        Self {
            mode: MaterializeMode::Auto,
            grace_ms: 2000,
            copies: 3,
            max_bytes_per_sec: 32 * 1024 * 1024,
            nice: 19,
        }
    }
}

impl MaterializeConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(2..=MAX_MATERIALIZE_COPIES).contains(&self.copies) {
            return Err(ConfigError::MaterializeCopies(self.copies));
        }
        if !(0..=19).contains(&self.nice) {
            return Err(ConfigError::MaterializeNice(self.nice));
        }
        Ok(())
    }
}

/// Whether a node is part of the Raft core or a relay in the tree.
#[derive(Clone, Debug)]
pub enum NodeKind {
    /// A core node. `peers` names every core member, this node included (empty: a
    /// one-member core); `init` forms the cluster from them on first start.
    Core {
        raft: RaftConfig,
        init: bool,
        peers: Vec<Member>,
    },
    /// A relay; `join` lists parents to try, in order.
    Relay { join: Vec<String> },
}

/// Everything one node needs, after files and flags are merged.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    /// QUIC address other nodes reach this node at (what it tells children and the core).
    pub advertise: SocketAddr,
    pub data: PathBuf,
    /// Where the materialized copy of the file lives (relays; optional on core nodes).
    pub file: Option<PathBuf>,
    pub kind: NodeKind,
    pub stream: StreamConfig,
    /// The tree's control plane; its `fanout` is kept equal to `stream.fanout`.
    pub overlay: OverlayConfig,
    /// How many requests clients and peers may have running at once.
    pub limits: LimitsConfig,
    /// How `--file` is kept on disk.
    pub materialize: MaterializeConfig,
    /// The file holding the token that API writes and membership changes must present.
    /// `None` (the default): `DATA/api-token`, created with a random token and mode 0600 at
    /// first start, so a node is never writable by anyone who can reach its API port.
    pub api_token_file: Option<PathBuf>,
    /// Seed of the overlay's RNG. `None` (the default): one is drawn from the name and the
    /// clock, so nodes started together choose differently; it is logged at start, and
    /// passing it back here replays the same choices.
    pub seed: Option<u64>,
    /// The zone (rack, region) this node runs in. Parents in the same zone are preferred
    /// within `overlay.latency_slack` levels of depth, before any RTT is measured. `None`
    /// (the default): no zone, and the tree is shaped by depth and measured RTT alone.
    pub zone: Option<String>,
    /// Core nodes: the zones this node keeps a share of its slots for, `fanout / zones`
    /// each, until that many children of the zone hold them (`Overlay::with_zone_shares`).
    /// Without it the cores' own zone, nearest to them, takes every slot before another
    /// zone's first relay asks, and each other zone's relays then hang from it: at 10k
    /// relays in 3 zones, 4 edges between zones instead of 581 when all join at once and
    /// about 20 instead of 1011 under 5 %/min churn, with a lower p99 from the core
    /// (docs/topology.md). List every zone that has relays: a listed zone with none keeps
    /// its share empty. Empty (the default): no shares. At most `stream.fanout` zones.
    pub zone_shares: Vec<String>,
}

/// Longest zone name, in bytes (a node's own `zone`, and one a peer declares).
pub const MAX_ZONE_BYTES: usize = 64;

impl NodeConfig {
    /// A node with every other setting at its default: no `--file`, no token file, a
    /// random seed, no zone.
    pub fn new(
        name: impl Into<String>,
        advertise: SocketAddr,
        data: PathBuf,
        kind: NodeKind,
    ) -> Self {
        NodeConfig {
            name: name.into(),
            advertise,
            data,
            file: None,
            kind,
            stream: StreamConfig::default(),
            overlay: OverlayConfig::default(),
            limits: LimitsConfig::default(),
            materialize: MaterializeConfig::default(),
            api_token_file: None,
            seed: None,
            zone: None,
            zone_shares: Vec::new(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(ConfigError::BadName(self.name.clone()));
        }
        for z in self.zone.iter().chain(&self.zone_shares) {
            if z.is_empty() || z.len() > MAX_ZONE_BYTES {
                return Err(ConfigError::BadZone(z.clone()));
            }
        }
        if !self.zone_shares.is_empty() && !self.is_core() {
            return Err(ConfigError::ZoneSharesOnRelay);
        }
        if self.zone_shares.len() > self.stream.fanout
            || self.zone_shares.len() > crate::node::MAX_HELD_ZONES
        {
            return Err(ConfigError::TooManyZoneShares {
                zones: self.zone_shares.len(),
                fanout: self.stream.fanout,
            });
        }
        self.stream.validate()?;
        self.limits.validate()?;
        let need = crate::node::largest_request(&self.stream) as u64;
        if self.limits.request_bytes < need {
            return Err(ConfigError::RequestBudgetTooSmall {
                budget: self.limits.request_bytes,
                need,
            });
        }
        self.materialize.validate()?;
        self.overlay
            .validate()
            .map_err(|e| ConfigError::Overlay(e.to_string()))?;
        match &self.kind {
            NodeKind::Relay { join } if join.is_empty() => Err(ConfigError::NoJoin),
            NodeKind::Core { raft, peers, .. } => {
                raft.validate()
                    .map_err(|e| ConfigError::Raft(e.to_string()))?;
                let mut seen = std::collections::BTreeSet::new();
                for p in peers {
                    if !seen.insert(p.name.as_str()) {
                        return Err(ConfigError::DuplicatePeer(p.name.clone()));
                    }
                }
                match peers.iter().find(|p| p.name == self.name) {
                    None if !peers.is_empty() => {
                        Err(ConfigError::PeersWithoutSelf(self.name.clone()))
                    }
                    Some(me) if me.addr != self.advertise.to_string() => {
                        Err(ConfigError::SelfAddr {
                            name: me.name.clone(),
                            addr: me.addr.clone(),
                            advertise: self.advertise,
                        })
                    }
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    pub fn is_core(&self) -> bool {
        matches!(self.kind, NodeKind::Core { .. })
    }

    /// The QUIC transport settings of this node's endpoint.
    pub fn transport(&self) -> crate::tls::TransportConfig {
        crate::tls::TransportConfig {
            max_concurrent_bidi: self.limits.streams_per_connection,
            ..self.stream.transport()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay() -> NodeConfig {
        NodeConfig::new(
            "r1",
            "127.0.0.1:1".parse().unwrap(),
            "/tmp/x".into(),
            NodeKind::Relay {
                join: vec!["127.0.0.1:2".into()],
            },
        )
    }

    #[test]
    fn defaults_validate() {
        StreamConfig::default().validate().unwrap();
        relay().validate().unwrap();
    }

    #[test]
    fn typed_errors() {
        let mut c = relay();
        c.name = "bad name".into();
        assert_eq!(c.validate(), Err(ConfigError::BadName("bad name".into())));
        for zone in [String::new(), "z".repeat(MAX_ZONE_BYTES + 1)] {
            let mut c = relay();
            c.zone = Some(zone.clone());
            assert_eq!(c.validate(), Err(ConfigError::BadZone(zone)));
        }
        let mut c = relay();
        c.zone = Some("z".repeat(MAX_ZONE_BYTES));
        c.validate().unwrap();
        c.zone_shares = vec!["a".into()];
        assert_eq!(c.validate(), Err(ConfigError::ZoneSharesOnRelay));
        c.kind = NodeKind::Core {
            raft: Default::default(),
            init: true,
            peers: Vec::new(),
        };
        c.validate().unwrap();
        c.zone_shares = vec!["a".into(), String::new()];
        assert_eq!(c.validate(), Err(ConfigError::BadZone(String::new())));
        c.zone_shares = (0..9).map(|i| format!("z{i}")).collect();
        assert_eq!(
            c.validate(),
            Err(ConfigError::TooManyZoneShares {
                zones: 9,
                fanout: 8
            })
        );
        c.zone_shares.pop();
        c.validate().unwrap();
        for copies in [0, 1, MAX_MATERIALIZE_COPIES + 1, u32::MAX] {
            let mut c = relay();
            c.materialize.copies = copies;
            assert_eq!(c.validate(), Err(ConfigError::MaterializeCopies(copies)));
        }
        for copies in [2, MAX_MATERIALIZE_COPIES] {
            let mut c = relay();
            c.materialize.copies = copies;
            c.validate().unwrap();
        }
        for nice in [-20, -1, 20, i32::MAX] {
            let mut c = relay();
            c.materialize.nice = nice;
            assert_eq!(c.validate(), Err(ConfigError::MaterializeNice(nice)));
        }
        for nice in [0, 19] {
            let mut c = relay();
            c.materialize.nice = nice;
            c.validate().unwrap();
        }
        for bytes in [crate::udp::MAX_UDP_BUFFER + 1, u64::MAX] {
            let mut c = relay();
            c.stream.udp_buffer_bytes = bytes;
            assert_eq!(c.validate(), Err(ConfigError::UdpBuffer(bytes)));
        }
        for bytes in [0, crate::udp::MAX_UDP_BUFFER] {
            let mut c = relay();
            c.stream.udp_buffer_bytes = bytes;
            c.validate().unwrap();
            assert_eq!(c.transport().udp_buffer as u64, bytes);
        }
        for bytes in [0, 1199, crate::tls::MAX_UDP_PAYLOAD + 1, u16::MAX] {
            let mut c = relay();
            c.stream.max_udp_payload_bytes = bytes;
            assert_eq!(c.validate(), Err(ConfigError::UdpPayload(bytes)));
        }
        for bytes in [1200, 1452, 8952, crate::tls::MAX_UDP_PAYLOAD] {
            let mut c = relay();
            c.stream.max_udp_payload_bytes = bytes;
            c.validate().unwrap();
            assert_eq!(c.transport().max_udp_payload, bytes);
        }
        for bad in ["mode = \"fast\"", "mode = 3", "copies = -1", "grace = 5"] {
            assert!(
                toml::from_str::<MaterializeConfig>(bad).is_err(),
                "[materialize] {bad} was taken"
            );
        }
        let mut c = relay();
        let need = crate::node::largest_request(&c.stream) as u64;
        assert_eq!(need, (65 << 20) + 4, "a default proposal and its prefix");
        c.limits.request_bytes = need - 1;
        assert_eq!(
            c.validate(),
            Err(ConfigError::RequestBudgetTooSmall {
                budget: need - 1,
                need
            })
        );
        c.limits.request_bytes = need;
        c.validate().unwrap();
        c.stream.max_update_bytes = 1 << 20;
        let need = crate::node::largest_request(&c.stream) as u64;
        assert_eq!(
            need,
            64 * 1024 + 35 * 262_144 + 4,
            "a subscription at max_len"
        );
        c.limits.request_timeout_ms = 0;
        assert_eq!(
            c.validate(),
            Err(ConfigError::LimitZero {
                field: "request_timeout_ms"
            })
        );
        let mut c = relay();
        c.kind = NodeKind::Relay { join: vec![] };
        assert_eq!(c.validate(), Err(ConfigError::NoJoin));
        let mut s = StreamConfig {
            chunk_size: 1000,
            ..Default::default()
        };
        assert_eq!(s.validate(), Err(ConfigError::ChunkSize(1000)));
        s.chunk_size = 65536;
        s.fanout = 0;
        assert_eq!(s.validate(), Err(ConfigError::Zero { field: "fanout" }));
        s.fanout = 8;
        s.max_backfills = 0;
        assert_eq!(
            s.validate(),
            Err(ConfigError::Zero {
                field: "max_backfills"
            })
        );
        s.max_backfills = 4;
        s.backfill_bytes_per_sec = 1000;
        assert_eq!(
            s.validate(),
            Err(ConfigError::BackfillRateTooLow {
                rate: 1000,
                chunk: 65536
            })
        );
        s.backfill_bytes_per_sec = 0;
        s.max_frame = 1024;
        assert!(matches!(
            s.validate(),
            Err(ConfigError::FrameTooSmall { .. })
        ));
    }

    #[test]
    fn toml_overrides_defaults() {
        let s: StreamConfig = toml::from_str("fanout = 4\nretain_bytes = 1024").unwrap();
        assert_eq!(s.fanout, 4);
        assert_eq!(s.retain_bytes, 1024);
        assert_eq!(s.chunk_size, DEFAULT_CHUNK_SIZE);
        assert!(toml::from_str::<StreamConfig>("nope = 1").is_err());
    }
}
