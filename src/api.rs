//! The local HTTP API of every node: status, file reads and writes, watch, tree, metrics.
//!
//! Invariants: every write answers only after it is committed (and, with `?wait=applied`,
//! applied on this node); a read serves one whole version, named by `X-Canopy-Version` and
//! `X-Canopy-Root`; errors answer JSON `{"error": ...}` with a fitting status code.
//! Writes (PUT, PATCH, truncate) and membership changes need `Authorization: Bearer TOKEN`
//! (checked before any body is read; 401 otherwise); reads (status, file, watch, tree,
//! metrics, the `/ui` page) are open.
//!
//! The API depends on a narrow [`Backend`] (what a node offers its local clients) and on the
//! status types below, not on the node's insides, so it can be tested against a fake.

use std::future::Future;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use crate::file::{ApplyOutcome, ChunkedFile, Op, Precondition, Update};
use crate::proto;

/// What a node offers its local HTTP clients.
pub trait Backend: Clone + Send + Sync + 'static {
    /// What `/v1/status` reports.
    fn status(&self) -> Status;
    /// The file at the version this node shows (a cheap copy-on-write clone).
    fn file(&self) -> ChunkedFile;
    /// `(version shown, its commit time in µs)`, updated as versions arrive.
    fn versions(&self) -> watch::Receiver<(u64, u64)>;
    /// The largest write body accepted (`stream.max_update_bytes`).
    fn max_update_bytes(&self) -> u64;
    /// Commits `update`, if `precondition` holds when it is applied.
    fn write(
        &self,
        update: Update,
        precondition: Option<Precondition>,
    ) -> impl Future<Output = Result<ApplyOutcome, BackendError>> + Send;
    /// Replaces the whole file with `content`, atomically; with `if_version`, only if the
    /// file is still at that version.
    fn replace(
        &self,
        content: Bytes,
        if_version: Option<u64>,
    ) -> impl Future<Output = Result<ApplyOutcome, BackendError>> + Send;
    /// This node and the subtree below it.
    fn tree(&self) -> impl Future<Output = Vec<proto::TreeNode>> + Send;
    /// A core membership change.
    fn admin(&self, admin: proto::Admin) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// The core as `/v1/core/members` shows it: each member with its role and, where the
    /// backend can ask the members, its health and lag. `None` on a relay.
    fn core_members(&self) -> impl Future<Output = Option<CoreStatus>> + Send {
        let core = self.status().core;
        async move { core }
    }
}

/// Why a backend call failed, as far as an HTTP client needs to know.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request is over a limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// The request is invalid or not for this node (400).
    #[error("{0}")]
    Invalid(String),
    /// Concurrent writes kept winning (409).
    #[error("{0}")]
    Contended(String),
    /// This node, or the client, may not do that (403).
    #[error("{0}")]
    Forbidden(String),
    /// The core cannot be reached or did not answer (503).
    #[error("{0}")]
    Unavailable(String),
}

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
    pub synced: bool,
    pub commit_version: u64,
    pub lag_entries: u64,
    pub lag_seconds: f64,
    /// The version the `--file` holds (once written), its root, and its path: what a program
    /// reading the file sees.
    pub file_version: Option<u64>,
    pub file_root: Option<String>,
    pub file_path: Option<String>,
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

/// How long `?wait=applied` waits for this node to apply a committed write.
const APPLY_WAIT: Duration = Duration::from_secs(30);
/// Longest long poll a client may ask for.
const MAX_WATCH: Duration = Duration::from_secs(300);

/// The secret that writes and membership changes must present (`Authorization: Bearer`).
#[derive(Clone)]
pub struct ApiToken(blake3::Hash);

impl ApiToken {
    pub fn new(token: &str) -> Self {
        Self(blake3::hash(token.as_bytes()))
    }

    /// Whether `presented` is the token (compared in constant time).
    fn admits(&self, presented: &str) -> bool {
        blake3::hash(presented.as_bytes()) == self.0
    }
}

/// A request that presented the API token; an extractor on every write and admin route.
struct Authorized;

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let token = parts.extensions.get::<ApiToken>().ok_or_else(|| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the API has no token configured".into(),
            )
        })?;
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(p) if token.admits(p.trim()) => Ok(Authorized),
            Some(_) => Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "wrong API token (Authorization: Bearer TOKEN; see the node's api-token file)"
                    .into(),
            )),
            None => Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "writes need the API token: Authorization: Bearer TOKEN (canopy --token-file, CANOPY_API_TOKEN, or --data on the node's host)".into(),
            )),
        }
    }
}

/// The API's routes over `node`; writes and membership changes need `token`.
pub fn router<B: Backend>(node: B, token: ApiToken) -> Router {
    let limit = node.max_update_bytes() as usize + (1 << 20);
    Router::new()
        .route("/v1/status", get(status::<B>))
        .route(
            "/v1/file",
            get(read_file::<B>)
                .put(put_file::<B>)
                .patch(patch_file::<B>),
        )
        .route("/v1/file/truncate", post(truncate_file::<B>))
        .route("/v1/watch", get(watch::<B>))
        .route("/v1/tree", get(tree::<B>))
        .route("/v1/tree/compact", get(tree_compact::<B>))
        .route("/ui", get(ui))
        .route(
            "/v1/core/members",
            get(core_members::<B>).post(add_member::<B>),
        )
        .route(
            "/v1/core/members/{name}",
            axum::routing::delete(remove_member::<B>),
        )
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::Extension(token))
        .with_state(node)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        let code = match &e {
            BackendError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BackendError::Invalid(_) => StatusCode::BAD_REQUEST,
            BackendError::Contended(_) => StatusCode::CONFLICT,
            BackendError::Forbidden(_) => StatusCode::FORBIDDEN,
            BackendError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(code, e.to_string())
    }
}

async fn status<B: Backend>(State(node): State<B>) -> Response {
    Json(node.status()).into_response()
}

async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
        .into_response()
}

/// Parses a single `bytes=` range against `len`; None means unsatisfiable.
fn parse_range(h: &str, len: u64) -> Option<(u64, u64)> {
    let spec = h.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            if n == 0 {
                return None;
            }
            (len.saturating_sub(n), len.checked_sub(1)?)
        }
        (s, "") => (s.parse().ok()?, len.checked_sub(1)?),
        (s, e) => {
            let e: u64 = e.parse().ok()?;
            (s.parse().ok()?, e.min(len.checked_sub(1)?))
        }
    };
    (start <= end && start < len).then_some((start, end))
}

async fn read_file<B: Backend>(State(node): State<B>, headers: HeaderMap) -> Response {
    let file = node.file();
    let len = file.len();
    let mut h = HeaderMap::new();
    h.insert("X-Canopy-Version", HeaderValue::from(file.version()));
    if let Ok(v) = HeaderValue::from_str(&file.root_hex()) {
        h.insert("X-Canopy-Root", v);
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|r| parse_range(r, len));
    match range {
        None => {
            let body = tokio::task::spawn_blocking(move || file.to_vec())
                .await
                .unwrap_or_default();
            (StatusCode::OK, h, body).into_response()
        }
        Some(None) => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            (StatusCode::RANGE_NOT_SATISFIABLE, h, Body::empty()).into_response()
        }
        Some(Some((start, end))) => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            let body = file.read(start, end - start + 1);
            (StatusCode::PARTIAL_CONTENT, h, body).into_response()
        }
    }
}

#[derive(Deserialize)]
struct WriteQuery {
    offset: Option<u64>,
    len: Option<u64>,
    wait: Option<String>,
    if_version: Option<u64>,
    /// `OFFSET:LEN:HEX`: apply only if bytes [OFFSET, OFFSET+LEN) still hash (BLAKE3) to HEX.
    if_range_hash: Option<String>,
}

impl WriteQuery {
    fn precondition(&self) -> Result<Option<Precondition>, ApiError> {
        let bad = |m: &str| ApiError(StatusCode::BAD_REQUEST, m.to_string());
        match (&self.if_version, &self.if_range_hash) {
            (Some(_), Some(_)) => Err(bad("give if_version or if_range_hash, not both")),
            (Some(v), None) => Ok(Some(Precondition::IfVersion(*v))),
            (None, Some(spec)) => {
                let mut parts = spec.splitn(3, ':');
                let (Some(o), Some(l), Some(h)) = (parts.next(), parts.next(), parts.next()) else {
                    return Err(bad("if_range_hash is OFFSET:LEN:HEX"));
                };
                let offset = o.parse().map_err(|_| bad("if_range_hash: bad OFFSET"))?;
                let len = l.parse().map_err(|_| bad("if_range_hash: bad LEN"))?;
                let hash: [u8; 32] = hex::decode(h)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| bad("if_range_hash: HEX must be 64 hex digits"))?;
                Ok(Some(Precondition::IfRangeHash { offset, len, hash }))
            }
            (None, None) => Ok(None),
        }
    }
}

/// Waits until this node shows `version` or `timeout` passes; true if it does.
async fn wait_shown<B: Backend>(node: &B, version: u64, timeout: Duration) -> bool {
    let mut rx = node.versions();
    tokio::time::timeout(timeout, rx.wait_for(|(v, _)| *v >= version))
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false)
}

async fn finish_write<B: Backend>(
    node: &B,
    outcome: ApplyOutcome,
    q: &WriteQuery,
) -> Result<Response, ApiError> {
    match outcome {
        ApplyOutcome::Applied { version } => {
            if q.wait.as_deref() == Some("applied") && !wait_shown(node, version, APPLY_WAIT).await
            {
                return Err(ApiError(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "version {version} committed but not applied here within {APPLY_WAIT:?}"
                    ),
                ));
            }
            Ok(Json(json!({ "version": version })).into_response())
        }
        ApplyOutcome::PreconditionFailed { version } => Ok((
            StatusCode::CONFLICT,
            Json(json!({ "error": "precondition failed", "version": version })),
        )
            .into_response()),
        ApplyOutcome::Rejected { reason, .. } => Err(ApiError(StatusCode::BAD_REQUEST, reason)),
    }
}

async fn write_ops<B: Backend>(
    node: &B,
    ops: Vec<Op>,
    q: &WriteQuery,
) -> Result<Response, ApiError> {
    let cond = q.precondition()?;
    let outcome = node.write(Update { ops }, cond).await?;
    finish_write(node, outcome, q).await
}

async fn patch_file<B: Backend>(
    _auth: Authorized,
    State(node): State<B>,
    Query(q): Query<WriteQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(offset) = q.offset else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "PATCH needs ?offset=N".into(),
        ));
    };
    write_ops(&node, vec![Op::Write { offset, data: body }], &q).await
}

async fn truncate_file<B: Backend>(
    _auth: Authorized,
    State(node): State<B>,
    Query(q): Query<WriteQuery>,
) -> Result<Response, ApiError> {
    let Some(len) = q.len else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "truncate needs ?len=N".into(),
        ));
    };
    write_ops(&node, vec![Op::Truncate { len }], &q).await
}

async fn put_file<B: Backend>(
    _auth: Authorized,
    State(node): State<B>,
    Query(q): Query<WriteQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if q.if_range_hash.is_some() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "PUT takes if_version only".into(),
        ));
    }
    let outcome = node.replace(body, q.if_version).await?;
    finish_write(&node, outcome, &q).await
}

#[derive(Deserialize)]
struct WatchQuery {
    after: Option<u64>,
    timeout: Option<f64>,
}

async fn watch<B: Backend>(State(node): State<B>, Query(q): Query<WatchQuery>) -> Response {
    let after = q.after.unwrap_or(0);
    let timeout = Duration::from_secs_f64(
        q.timeout
            .unwrap_or(30.0)
            .clamp(0.0, MAX_WATCH.as_secs_f64()),
    );
    let mut rx = node.versions();
    let _ = tokio::time::timeout(timeout, rx.wait_for(|(v, _)| *v > after)).await;
    Json(node.status()).into_response()
}

async fn tree<B: Backend>(State(node): State<B>) -> Response {
    let nodes: Vec<serde_json::Value> = node
        .tree()
        .await
        .into_iter()
        .map(|n| {
            json!({
                "name": n.name, "addr": n.addr, "parent": n.parent, "depth": n.depth,
                "version": n.version, "children": n.children, "lag_entries": n.lag_entries,
            })
        })
        .collect();
    Json(nodes).into_response()
}

/// The live tree page: one self-contained HTML file (inline script and style, no external
/// resource), which polls `/v1/tree/compact`.
pub const UI_HTML: &str = include_str!("ui/tree.html");

async fn ui() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        UI_HTML,
    )
        .into_response()
}

/// The tree as the live page reads it: one array per node, `[name, parent, depth, version,
/// lag_entries, children, backfill_done, backfill_total]` (the backfill pair `null` where
/// unknown), plus the node that answered and the highest commit any node reported. About a
/// third of `/v1/tree`'s size: 1000 nodes are 50-60 KB.
pub fn compact_tree(
    me: &str,
    nodes: &[proto::TreeNode],
    backfill: Option<(u64, u64)>,
) -> serde_json::Value {
    let commit = nodes
        .iter()
        .map(|n| n.version + n.lag_entries)
        .max()
        .unwrap_or(0);
    let rows: Vec<serde_json::Value> = nodes
        .iter()
        .map(|n| {
            let bf = backfill.filter(|_| n.name == me);
            json!([
                n.name,
                n.parent,
                n.depth,
                n.version,
                n.lag_entries,
                n.children,
                bf.map(|b| b.0),
                bf.map(|b| b.1)
            ])
        })
        .collect();
    json!({ "self": me, "commit": commit, "nodes": rows })
}

async fn tree_compact<B: Backend>(State(node): State<B>) -> Response {
    let status = node.status();
    let nodes = node.tree().await;
    let backfill = status.backfill.map(|b| (b.bytes_done, b.bytes_total));
    Json(compact_tree(&status.name, &nodes, backfill)).into_response()
}

async fn core_members<B: Backend>(State(node): State<B>) -> Result<Response, ApiError> {
    match node.core_members().await {
        Some(core) => Ok(Json(core).into_response()),
        None => Err(ApiError(
            StatusCode::BAD_REQUEST,
            "this node is not a core node".into(),
        )),
    }
}

#[derive(Deserialize)]
struct AddMemberBody {
    name: String,
    addr: String,
}

async fn add_member<B: Backend>(
    _auth: Authorized,
    State(node): State<B>,
    Json(body): Json<AddMemberBody>,
) -> Result<Response, ApiError> {
    let admin = crate::proto::Admin {
        kind: Some(crate::proto::admin::Kind::AddMember(
            crate::proto::AddMember {
                name: body.name,
                addr: body.addr,
            },
        )),
        force: false,
    };
    node.admin(admin).await?;
    core_members(State(node)).await
}

#[derive(Deserialize)]
struct RemoveQuery {
    /// Remove even if fewer than a quorum of the voters left answered the leader lately.
    #[serde(default)]
    force: bool,
}

async fn remove_member<B: Backend>(
    _auth: Authorized,
    State(node): State<B>,
    axum::extract::Path(name): axum::extract::Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Result<Response, ApiError> {
    let admin = crate::proto::Admin {
        kind: Some(crate::proto::admin::Kind::RemoveMember(name)),
        force: q.force,
    };
    node.admin(admin).await?;
    core_members(State(node)).await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;

    use super::*;

    /// A node reduced to its file: writes apply locally, in order, with their preconditions.
    #[derive(Clone)]
    struct Fake {
        file: Arc<Mutex<ChunkedFile>>,
        versions: Arc<watch::Sender<(u64, u64)>>,
    }

    impl Fake {
        fn new() -> Self {
            Self {
                file: Arc::new(Mutex::new(ChunkedFile::new(16, 1 << 20).unwrap())),
                versions: Arc::new(watch::channel((0, 0)).0),
            }
        }
    }

    impl Backend for Fake {
        fn status(&self) -> Status {
            let f = self.file.lock();
            Status {
                name: "fake".into(),
                role: "relay".into(),
                version: f.version(),
                root: f.root_hex(),
                length: f.len(),
                parent: String::new(),
                parent_addr: String::new(),
                children: vec![],
                child_addrs: vec![],
                depth: None,
                root_path: vec![],
                subtree_height: 0,
                room: 0,
                synced: true,
                commit_version: f.version(),
                lag_entries: 0,
                lag_seconds: 0.0,
                file_version: None,
                file_root: None,
                file_path: None,
                core_addrs: vec![],
                stats: StatsView {
                    entries_applied: 0,
                    snapshots_installed: 0,
                    gaps: 0,
                    resumes: 0,
                    backfill_received_bytes: 0,
                    backfill_from_peers_bytes: 0,
                    bad_chunks: 0,
                    relayed_bytes: 0,
                },
                backfill: None,
                backfills_serving: 0,
                backfills_serving_most: 0,
                core: None,
            }
        }

        fn file(&self) -> ChunkedFile {
            self.file.lock().clone()
        }

        fn versions(&self) -> watch::Receiver<(u64, u64)> {
            self.versions.subscribe()
        }

        fn max_update_bytes(&self) -> u64 {
            64
        }

        async fn write(
            &self,
            update: Update,
            precondition: Option<Precondition>,
        ) -> Result<ApplyOutcome, BackendError> {
            if update.byte_size() > 64 {
                return Err(BackendError::TooLarge("over 64 bytes".into()));
            }
            let mut f = self.file.lock();
            let version = f.version();
            if precondition.is_some_and(|p| !f.check(&p)) {
                return Ok(ApplyOutcome::PreconditionFailed { version });
            }
            f.apply(version + 1, &update)
                .map_err(|e| BackendError::Invalid(e.to_string()))?;
            self.versions.send_replace((version + 1, 0));
            Ok(ApplyOutcome::Applied {
                version: version + 1,
            })
        }

        async fn replace(
            &self,
            content: Bytes,
            if_version: Option<u64>,
        ) -> Result<ApplyOutcome, BackendError> {
            let (update, version) = {
                let f = self.file.lock();
                (f.diff_to(&content), f.version())
            };
            let v = if_version.unwrap_or(version);
            self.write(update, Some(Precondition::IfVersion(v))).await
        }

        async fn tree(&self) -> Vec<proto::TreeNode> {
            vec![]
        }

        async fn admin(&self, _admin: proto::Admin) -> Result<(), BackendError> {
            Err(BackendError::Invalid("this node is not a core node".into()))
        }
    }

    const TOKEN: &str = "s3cret";

    async fn serve(fake: Fake) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(fake, ApiToken::new(TOKEN));
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn writes_reads_ranges_and_preconditions_against_a_fake_backend() {
        let fake = Fake::new();
        let url = serve(fake.clone()).await;
        let c = reqwest::Client::new();
        let r = c
            .patch(format!("{url}/v1/file?offset=4"))
            .bearer_auth(TOKEN)
            .body("hello")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), r#"{"version":1}"#);

        let r = c.get(format!("{url}/v1/file")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-canopy-version"], "1");
        assert_eq!(
            r.headers()["x-canopy-root"],
            fake.file.lock().root_hex().as_str()
        );
        assert_eq!(&r.bytes().await.unwrap()[..], b"\0\0\0\0hello");

        let r = c
            .get(format!("{url}/v1/file"))
            .header("range", "bytes=5-6")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert_eq!(r.headers()["content-range"], "bytes 5-6/9");
        assert_eq!(&r.bytes().await.unwrap()[..], b"el");

        let r = c
            .put(format!("{url}/v1/file?if_version=0"))
            .bearer_auth(TOKEN)
            .body("other")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 409);
        assert_eq!(
            r.json::<serde_json::Value>().await.unwrap(),
            json!({"error": "precondition failed", "version": 1})
        );

        let r = c
            .patch(format!("{url}/v1/file?offset=0"))
            .bearer_auth(TOKEN)
            .body(vec![7u8; 65])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);

        let r = c
            .post(format!("{url}/v1/file/truncate"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(
            r.json::<serde_json::Value>().await.unwrap(),
            json!({"error": "truncate needs ?len=N"})
        );

        let r = c
            .get(format!("{url}/v1/core/members"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }

    #[tokio::test]
    async fn writes_need_the_token_reads_do_not() {
        let url = serve(Fake::new()).await;
        let c = reqwest::Client::new();
        let patch = || c.patch(format!("{url}/v1/file?offset=0")).body("x");
        let r = patch().send().await.unwrap();
        assert_eq!(r.status(), 401);
        let e: serde_json::Value = r.json().await.unwrap();
        assert!(e["error"].as_str().unwrap().contains("API token"), "{e}");
        assert_eq!(
            patch().bearer_auth("wrong").send().await.unwrap().status(),
            401
        );
        for (m, path) in [
            (reqwest::Method::PUT, "/v1/file"),
            (reqwest::Method::POST, "/v1/file/truncate?len=1"),
            (reqwest::Method::POST, "/v1/core/members"),
            (reqwest::Method::DELETE, "/v1/core/members/x"),
        ] {
            let r = c
                .request(m.clone(), format!("{url}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "{m} {path}");
        }
        assert_eq!(
            patch().bearer_auth(TOKEN).send().await.unwrap().status(),
            200
        );
        for path in [
            "/v1/status",
            "/v1/file",
            "/v1/watch?timeout=0",
            "/v1/tree",
            "/v1/tree/compact",
            "/ui",
            "/metrics",
        ] {
            let r = c.get(format!("{url}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "GET {path}");
        }
    }

    #[tokio::test]
    async fn a_watch_answers_when_the_version_passes_after() {
        let fake = Fake::new();
        let url = serve(fake.clone()).await;
        let c = reqwest::Client::new();
        let watch = c.get(format!("{url}/v1/watch?after=0&timeout=30")).send();
        let write = async {
            let update = Update {
                ops: vec![Op::Truncate { len: 3 }],
            };
            fake.write(update, None).await.unwrap()
        };
        let (r, _) = tokio::join!(watch, write);
        let s: serde_json::Value = r.unwrap().json().await.unwrap();
        assert_eq!(s["version"], 1);
        assert_eq!(s["length"], 3);
        assert_eq!(s["depth"], serde_json::Value::Null);
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("bytes=0-1,3-4", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=0-0", 0), None);
        assert_eq!(parse_range("bytes=-500", 100), Some((0, 99)));
    }
}
