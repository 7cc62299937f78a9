//! What `/v1/status` and `/v1/core/members` answer: the node's place, versions, lag, transfers and
//! counters.

use super::*;

/// The stream counters as `/v1/status` shows them. Every entry a node applies follows the
/// previous one (`prev_version` check), so with `gaps == 0` and one snapshot install, no
/// entry was skipped or applied twice.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct StatsView {
    pub entries_applied: u64,
    pub snapshots_installed: u64,
    pub gaps: u64,
    pub resumes: u64,
    /// Chunk bytes received in full or diff transfers, from every source.
    pub backfill_received_bytes: u64,
    /// The part of them fetched from peers other than the parent.
    pub backfill_from_peers_bytes: u64,
    /// Chunks refused because they did not match the manifest (their sender is banned as
    /// a parent for a while and the chunk is fetched elsewhere).
    pub bad_chunks: u64,
    /// Bytes sent to children and fetching peers (entries, checkpoints, transfers).
    pub relayed_bytes: u64,
}

/// What `/v1/status` reports.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Status {
    pub name: String,
    pub role: String,
    pub version: u64,
    pub root: String,
    pub length: u64,
    pub parent: String,
    pub parent_addr: String,
    pub children: Vec<String>,
    pub child_addrs: Vec<String>,
    /// Distance from the core: 0 on a core node, absent (`null`) while a relay is unattached.
    pub depth: Option<u32>,
    pub root_path: Vec<String>,
    /// Height of the subtree this node serves (0: no children), from its children's reports.
    pub subtree_height: u32,
    /// Levels below this node to the shallowest free slot of its subtree (0: one of its own).
    pub room: u32,
    /// Nodes in the subtree this node serves, itself included, as its children report them
    /// (rounded down to 4 significant bits); 0 unless this node has a zone and
    /// `overlay.fill_zones_to_bound`, or a child reports a size.
    pub subtree_size: u32,
    /// A core node with `zone_shares`: the zones it still holds free slots for (a zone
    /// whose relays have not taken its share yet). Empty otherwise.
    pub held_for: Vec<String>,
    pub synced: bool,
    pub commit_version: u64,
    pub lag_entries: u64,
    pub lag_seconds: f64,
    /// The version the `--file` holds (once written), its root, and its path: what a program
    /// reading the file sees.
    pub file_version: Option<u64>,
    pub file_root: Option<String>,
    pub file_path: Option<String>,
    /// How `--file` is written: `reflink`, `swap` or `rewrite` (absent without `--file`).
    pub file_method: Option<String>,
    /// Bytes written to disk for `--file` since start (content; the filesystem's metadata
    /// is not counted), and the writes that made a new version visible.
    pub file_bytes_written: u64,
    pub file_writes: u64,
    /// The last write of `--file` failed for a full disk: the node keeps applying and
    /// serving from memory, and `file_version` stays behind until a write succeeds.
    pub disk_full: bool,
    pub core_addrs: Vec<String>,
    pub stats: StatsView,
    /// A full or diff transfer in progress (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backfill: Option<BackfillView>,
    /// Full or diff transfers this node is serving to children and peers now.
    pub backfills_serving: u64,
    /// The most transfers it has served at once since it started (bounded by
    /// `stream.max_backfills`).
    pub backfills_serving_most: u64,
    /// Core nodes only: Raft state and the members.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub core: Option<CoreStatus>,
}

/// Progress of the transfer this node is receiving.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackfillView {
    /// Bytes held of the version being fetched: chunks received, and chunks reused from
    /// the local copy or an interrupted transfer.
    pub bytes_done: u64,
    /// The length of that version.
    pub bytes_total: u64,
    /// Where the chunks come from: the parent, then the peers it fetches from.
    pub sources: Vec<String>,
}

/// A core node's view of the consensus group.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CoreStatus {
    #[serde(flatten)]
    pub raft: crate::consensus::RaftStatus,
    pub members: Vec<MemberStatus>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MemberStatus {
    pub name: String,
    pub addr: String,
    pub voter: bool,
    /// `leader`, `follower` (a voter) or `learner`, as the answering node knows it
    /// (`/v1/core/members` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// `ok` when the member answered, else why not (`/v1/core/members` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// The version the member shows, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Entries the member is behind the highest commit any answer reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_entries: Option<u64>,
}
