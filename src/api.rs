//! The local HTTP API of every node: status, file reads and writes, watch, tree, metrics.
//!
//! Invariants: every write answers only after it is committed (and, with `?wait=applied`,
//! applied on this node); a read serves one whole version, named by `X-Canopy-Version` and
//! `X-Canopy-Root`; errors answer JSON `{"error": ...}` with a fitting status code.
//! Writes (PUT, PATCH, truncate) and membership changes need `Authorization: Bearer TOKEN`
//! (checked before any body is read; 401 otherwise); reads (status, file, watch, tree,
//! metrics, the `/ui` page) are open.
//!
//! Bounds: every size a request declares is checked before anything is sized by it or
//! proposed (a `Content-Length` before the body is read, a length or offset against
//! `max_len`, a PATCH body against `max_update_bytes`); a GET streams the file from a
//! snapshot a chunk at a time and a PUT is diffed against the current version as it
//! arrives, so neither holds more than a few chunks beyond the changed ones. At most
//! `limits.http_requests` requests (a GET until its body is sent) and `limits.watches`
//! watches run at once; over a limit the answer is 503 with `Retry-After`. Every refusal
//! is a one-line JSON `{"error": ...}`, counted in `canopy_rejected_total{reason}`. The
//! connections themselves ([`serve`]): at most `limits.http_connections` open, each closed
//! when it sends no whole request header within `limits.http_header_timeout_ms`, and a
//! write's body that sends nothing for `limits.http_body_idle_ms` is refused.
//!
//! The API depends on a narrow [`Backend`] (what a node offers its local clients) and on the
//! status types below, not on the node's insides, so it can be tested against a fake.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Extension, FromRequestParts, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{watch, Semaphore};

use crate::config::LimitsConfig;
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
    /// The version shown, as one line of a streamed watch reports it. Called on every new
    /// version of every streamed watch, so a backend should answer it without building a
    /// whole [`Status`] (the default does).
    fn shown(&self) -> Shown {
        let s = self.status();
        Shown {
            version: s.version,
            root: s.root,
            commit_version: s.commit_version,
            file_version: s.file_version,
        }
    }
    /// Changes of the version the materialized `--file` holds (`None`: the backend keeps no
    /// file), so that a streamed watch also reports when the file catches up.
    fn file_versions(&self) -> Option<watch::Receiver<Option<(u64, crate::file::Hash)>>> {
        None
    }
    /// The largest write body accepted (`stream.max_update_bytes`).
    fn max_update_bytes(&self) -> u64;
    /// The largest file (`stream.max_len`): a write that would make it longer is refused
    /// before it is proposed.
    fn max_len(&self) -> u64;
    /// How many requests may run at once (`[limits]`).
    fn limits(&self) -> LimitsConfig;
    /// Commits `update`, if `precondition` holds when it is applied.
    fn write(
        &self,
        update: Update,
        precondition: Option<Precondition>,
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
    /// The core's proposal queue is full (503 with `Retry-After`).
    #[error("{0}")]
    Busy(String),
}

/// How long `?wait=applied` waits for this node to apply a committed write.
const APPLY_WAIT: Duration = Duration::from_secs(30);
/// Longest long poll a client may ask for.
const MAX_WATCH: Duration = Duration::from_secs(300);
/// What a refusal for a full limit asks the client to wait (`Retry-After`, seconds).
const RETRY_AFTER_SECS: u32 = 1;
/// Largest JSON body (a membership change).
const MAX_JSON_BODY: usize = 64 * 1024;
/// A whole-file replace retries this often when concurrent writes keep winning.
const REPLACE_ATTEMPTS: u32 = 20;

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

impl<S: Send + Sync> FromRequestParts<S> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let token = parts.extensions.get::<ApiToken>().ok_or_else(|| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no_token",
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
                "unauthorized",
                "wrong API token (Authorization: Bearer TOKEN; see the node's api-token file)"
                    .into(),
            )),
            None => Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "writes need the API token: Authorization: Bearer TOKEN (canopy --token-file, CANOPY_API_TOKEN, or --data on the node's host)".into(),
            )),
        }
    }
}

/// A query string, refused with a one-line JSON 400 when it does not parse.
struct Q<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(t)) => Ok(Q(t)),
            Err(e) => Err(ApiError(
                StatusCode::BAD_REQUEST,
                "bad_query",
                e.body_text(),
            )),
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets the requests in flight finish.
/// At most `limits.http_connections` connections are open at once (a new one beyond it is
/// closed at once and counted, reason `http_connections`), and a connection that sends no
/// whole request header within `limits.http_header_timeout_ms` is closed. `node` names the
/// counter's series.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: &LimitsConfig,
    node: &str,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let open = Arc::new(Semaphore::new(limits.http_connections));
    let header_timeout = Duration::from_millis(limits.http_header_timeout_ms);
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or memory for a moment: the loop goes on.
                    tracing::warn!(node, "http api: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = open.clone().try_acquire_owned() else {
            metrics::counter!("canopy_rejected_total", "node" => node.to_string(), "reason" => "http_connections")
                .increment(1);
            tracing::debug!(node, %remote, "http api: closed a connection: limits.http_connections ({}) reached", limits.http_connections);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    conns.close();
    conns.wait().await;
}

/// The request and watch limits of one node's API, and its rejection counter.
struct Limiter {
    node: String,
    requests: Arc<Semaphore>,
    watches: Arc<Semaphore>,
    limits: LimitsConfig,
}

impl Limiter {
    fn count(&self, reason: &'static str) {
        metrics::counter!("canopy_rejected_total", "node" => self.node.clone(), "reason" => reason)
            .increment(1);
    }
}

/// The reason a response refused its request, for `canopy_rejected_total{reason}`.
#[derive(Clone, Copy)]
struct Rejected(&'static str);

/// Runs a request only while fewer than `limits.http_requests` run; the slot is held until
/// the response body is sent (a streamed GET holds it to its end). Counts refusals.
async fn limit_requests(
    Extension(lim): Extension<Arc<Limiter>>,
    req: Request,
    next: Next,
) -> Response {
    let Ok(permit) = lim.requests.clone().try_acquire_owned() else {
        lim.count("http_requests");
        return ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "http_requests",
            format!(
                "too many requests at once (limits.http_requests = {}); retry shortly",
                lim.limits.http_requests
            ),
        )
        .into_response();
    };
    let resp = next.run(req).await;
    if let Some(Rejected(reason)) = resp.extensions().get::<Rejected>().copied() {
        lim.count(reason);
    }
    if axum::body::HttpBody::size_hint(resp.body())
        .exact()
        .is_some()
    {
        // In memory already: the slot is given back now, and the length kept.
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let body = Body::from_stream(body.into_data_stream().map(move |frame| {
        let _held = &permit;
        frame
    }));
    Response::from_parts(parts, body)
}

/// The API's routes over `node`; writes and membership changes need `token`.
pub fn router<B: Backend>(node: B, token: ApiToken) -> Router {
    let limits = node.limits();
    let limiter = Arc::new(Limiter {
        node: node.status().name,
        requests: Arc::new(Semaphore::new(limits.http_requests)),
        watches: Arc::new(Semaphore::new(limits.watches)),
        limits,
    });
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
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(axum::middleware::from_fn(limit_requests))
        .layer(Extension(limiter))
        .layer(Extension(token))
        .with_state(node)
}

/// A refusal: status, a stable reason label (`canopy_rejected_total{reason}`), and the
/// one-line message the client sees.
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(json!({ "error": self.2 }))).into_response();
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        r.extensions_mut().insert(Rejected(self.1));
        r
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        let (code, reason) = match &e {
            BackendError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "update_too_large"),
            BackendError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            BackendError::Contended(_) => (StatusCode::CONFLICT, "contended"),
            BackendError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            BackendError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            BackendError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        };
        ApiError(code, reason, e.to_string())
    }
}

fn bad_request(msg: &str) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "bad_request", msg.to_string())
}

/// A write that would make the file longer than `max_len` (413, before it is proposed).
fn over_max_len(len: Option<u64>, max: u64) -> ApiError {
    let len = len.map_or_else(|| "more than 2^64".to_string(), |l| l.to_string());
    ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        "over_max_len",
        format!("the file would be {len} bytes long, over max_len ({max})"),
    )
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

#[derive(Deserialize)]
struct WatchQuery {
    after: Option<u64>,
    timeout: Option<f64>,
    #[serde(default)]
    stream: bool,
}

/// One line of a streamed watch (`GET /v1/watch?stream=true`, `application/x-ndjson`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Shown {
    /// The version this node shows.
    pub version: u64,
    /// The file's root at that version (hex).
    pub root: String,
    /// The newest version this node knows is committed.
    pub commit_version: u64,
    /// The version the materialized `--file` holds (absent without `--file`).
    pub file_version: Option<u64>,
}

/// A streamed watch: a line whenever the version shown or the file's version changes (a
/// burst of versions may come as one line, for the newest), the first as soon as the
/// version is above `after`, and the current state again after `period` without a line,
/// so a client can tell a quiet node from a dead connection. Holds its watch slot for as
/// long as the client reads.
fn watch_stream<B: Backend>(
    node: B,
    after: u64,
    period: Duration,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Body {
    struct St<B> {
        node: B,
        rx: watch::Receiver<(u64, u64)>,
        files: Option<watch::Receiver<Option<(u64, crate::file::Hash)>>>,
        sent: Option<(u64, Option<u64>)>,
        after: u64,
        period: Duration,
        _slot: tokio::sync::OwnedSemaphorePermit,
    }
    let st = St {
        rx: node.versions(),
        files: node.file_versions(),
        node,
        sent: None,
        after,
        period,
        _slot: slot,
    };
    let lines = futures::stream::unfold(st, |mut st| async move {
        let quiet = tokio::time::Instant::now() + st.period;
        loop {
            st.rx.borrow_and_update();
            if let Some(f) = st.files.as_mut() {
                f.borrow_and_update();
            }
            let now = st.node.shown();
            let key = (now.version, now.file_version);
            let due = tokio::time::Instant::now() >= quiet;
            if (now.version > st.after && st.sent != Some(key)) || due {
                st.sent = Some(key);
                let mut line = serde_json::to_vec(&now).unwrap_or_default();
                line.push(b'\n');
                return Some((Ok::<_, std::convert::Infallible>(Bytes::from(line)), st));
            }
            let files = async {
                match st.files.as_mut() {
                    Some(f) => f.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = st.rx.changed() => if r.is_err() { return None },
                ok = files => if !ok { return None },
                _ = tokio::time::sleep_until(quiet) => {}
            }
        }
    });
    Body::from_stream(lines)
}

async fn watch<B: Backend>(
    State(node): State<B>,
    Extension(lim): Extension<Arc<Limiter>>,
    Q(q): Q<WatchQuery>,
) -> Result<Response, ApiError> {
    let after = q.after.unwrap_or(0);
    let secs = q.timeout.unwrap_or(30.0);
    if !secs.is_finite() || secs < 0.0 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!(
                "timeout must be a number of seconds from 0 to {}",
                MAX_WATCH.as_secs()
            ),
        ));
    }
    let timeout = Duration::from_secs_f64(secs.min(MAX_WATCH.as_secs_f64()));
    let Ok(_slot) = lim.watches.clone().try_acquire_owned() else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "watches",
            format!(
                "too many watches at once (limits.watches = {}); retry shortly",
                lim.limits.watches
            ),
        ));
    };
    if q.stream {
        if timeout.is_zero() {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "bad_query",
                "a streamed watch needs a timeout above 0 (the longest quiet time between two lines)".into(),
            ));
        }
        return Ok((
            [
                (header::CONTENT_TYPE, "application/x-ndjson"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            watch_stream(node, after, timeout, _slot),
        )
            .into_response());
    }
    let mut rx = node.versions();
    let _ = tokio::time::timeout(timeout, rx.wait_for(|(v, _)| *v > after)).await;
    Ok(Json(node.status()).into_response())
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
        .map(|n| n.version.saturating_add(n.lag_entries))
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
        None => Err(bad_request("this node is not a core node")),
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
    Q(q): Q<RemoveQuery>,
) -> Result<Response, ApiError> {
    let admin = crate::proto::Admin {
        kind: Some(crate::proto::admin::Kind::RemoveMember(name)),
        force: q.force,
    };
    node.admin(admin).await?;
    core_members(State(node)).await
}

/// The API's parsers of what a client declares, for the fuzz targets (`fuzz/`).
#[doc(hidden)]
pub mod parsers {
    use super::*;

    /// What a `Range` header selects of `len` bytes: `Some((start, end))` for 206, `None`
    /// for 416; `Err(())` when it is ignored (200, the whole body).
    #[allow(clippy::result_unit_err)]
    pub fn range(header: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
        match parse_range(header, len) {
            RangeAsk::Whole => Err(()),
            RangeAsk::Part(a, b) => {
                assert!(a <= b && b < len, "range {a}-{b} outside {len} bytes");
                Ok(Some((a, b)))
            }
            RangeAsk::Unsatisfiable => Ok(None),
        }
    }

    /// Parses `query` as each route's query string would be, with the checks that follow
    /// (preconditions, the watch timeout); the errors are the one-line reasons clients see.
    pub fn queries(query: &str) -> Vec<Result<(), String>> {
        let write = from_query::<WriteQuery>(query)
            .and_then(|q| q.precondition().map(|_| ()).map_err(|e| e.2));
        let watch = from_query::<WatchQuery>(query).and_then(|w| {
            let t = w.timeout.unwrap_or(30.0);
            if t.is_finite() && t >= 0.0 {
                let _ = Duration::from_secs_f64(t.min(MAX_WATCH.as_secs_f64()));
                Ok(())
            } else {
                Err("timeout".into())
            }
        });
        let remove = from_query::<RemoveQuery>(query).map(|_| ());
        vec![write, watch, remove]
    }

    fn from_query<T: DeserializeOwned>(q: &str) -> Result<T, String> {
        let uri: axum::http::Uri = format!("/?{q}").parse().map_err(|e| format!("{e}"))?;
        Query::<T>::try_from_uri(&uri)
            .map(|Query(t)| t)
            .map_err(|e| e.body_text())
    }
}

mod file;
mod status;

use file::*;
pub use status::*;

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
        /// A tree request waits for a permit here (a request held open).
        hold: Arc<Semaphore>,
    }

    impl Fake {
        fn new() -> Self {
            Self {
                file: Arc::new(Mutex::new(ChunkedFile::new(16, 1 << 20).unwrap())),
                versions: Arc::new(watch::channel((0, 0)).0),
                hold: Arc::new(Semaphore::new(0)),
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
                subtree_size: 0,
                held_for: Vec::new(),
                synced: true,
                commit_version: f.version(),
                lag_entries: 0,
                lag_seconds: 0.0,
                file_version: None,
                file_root: None,
                file_path: None,
                file_method: None,
                file_bytes_written: 0,
                file_writes: 0,
                disk_full: false,
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

        fn max_len(&self) -> u64 {
            1 << 20
        }

        fn limits(&self) -> LimitsConfig {
            LimitsConfig {
                http_requests: 3,
                watches: 1,
                http_body_idle_ms: 500,
                ..Default::default()
            }
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

        async fn tree(&self) -> Vec<proto::TreeNode> {
            let _ = self.hold.acquire().await;
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
        let fake = Fake::new();
        // `tree()` waits for a permit (the request-limit test holds it there).
        fake.hold.add_permits(1);
        let url = serve(fake).await;
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

    /// Reads the next line of a streamed watch, within 10 s.
    async fn next_line(r: &mut reqwest::Response, buf: &mut Vec<u8>) -> Shown {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    return serde_json::from_slice(&line).unwrap();
                }
                let chunk = r.chunk().await.unwrap().expect("the stream goes on");
                buf.extend_from_slice(&chunk);
            }
        })
        .await
        .expect("a line within 10 s")
    }

    /// A streamed watch sends a line per new version (the newest of a burst at least), the
    /// state again after a quiet period, holds its watch slot until the client goes, and
    /// refuses a zero period.
    #[tokio::test]
    async fn a_streamed_watch_sends_each_new_version_and_keeps_its_slot() {
        let fake = Fake::new();
        let url = serve(fake.clone()).await;
        let c = reqwest::Client::new();
        let truncate = |len| {
            let fake = fake.clone();
            async move {
                let update = Update {
                    ops: vec![Op::Truncate { len }],
                };
                fake.write(update, None).await.unwrap()
            }
        };
        truncate(1).await;
        let mut r = c
            .get(format!("{url}/v1/watch?after=0&stream=true&timeout=0.5"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/x-ndjson");
        let mut buf = Vec::new();
        let first = next_line(&mut r, &mut buf).await;
        assert_eq!(first.version, 1, "the version above after= at once");
        assert_eq!(first.root, fake.status().root);
        assert_eq!(first.file_version, None);
        for len in 2..=4 {
            truncate(len).await;
        }
        let mut seen = vec![first.version];
        while *seen.last().unwrap() < 4 {
            let l = next_line(&mut r, &mut buf).await;
            assert!(l.version > *seen.last().unwrap(), "{seen:?} then {l:?}");
            seen.push(l.version);
        }
        let again = next_line(&mut r, &mut buf).await;
        assert_eq!(again.version, 4, "the state again after a quiet period");

        let refused = c
            .get(format!("{url}/v1/watch?after=9&timeout=0"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            refused.status(),
            503,
            "the stream holds the only watch slot"
        );
        drop(r);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = c
                .get(format!("{url}/v1/watch?after=9&timeout=0"))
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the slot is freed once the client goes"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for bad in ["stream=true&timeout=0", "stream=maybe", "stream=1e400"] {
            let r = c.get(format!("{url}/v1/watch?{bad}")).send().await.unwrap();
            assert_eq!(r.status(), 400, "{bad}");
        }
    }

    #[tokio::test]
    async fn a_put_is_diffed_as_it_streams_and_bounded() {
        let fake = Fake::new();
        let url = serve(fake.clone()).await;
        let c = reqwest::Client::new();
        let put = |body: Vec<u8>| {
            c.put(format!("{url}/v1/file"))
                .bearer_auth(TOKEN)
                .body(body)
                .send()
        };
        let r = put(b"0123456789abcdef0123456789".to_vec()).await.unwrap();
        assert_eq!(r.status(), 200);
        let r = put(b"0123456789abcdefXY".to_vec()).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(fake.file.lock().to_vec(), b"0123456789abcdefXY");
        // A body declared longer than max_len is refused before it is read.
        let r = c
            .put(format!("{url}/v1/file"))
            .bearer_auth(TOKEN)
            .header("content-length", (2u64 << 20).to_string())
            .body(reqwest::Body::wrap_stream(futures::stream::pending::<
                Result<Bytes, std::io::Error>,
            >()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        let e: serde_json::Value = r.json().await.unwrap();
        assert!(e["error"].as_str().unwrap().contains("max_len"), "{e}");
        // Changing more than max_update_bytes (64 here) is refused.
        let r = put(vec![1u8; 200]).await.unwrap();
        assert_eq!(r.status(), 413);
        let r = c
            .patch(format!("{url}/v1/file?offset=1048570"))
            .bearer_auth(TOKEN)
            .body("0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413, "past max_len");
        let r = c
            .post(format!("{url}/v1/file/truncate?len=1048577"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        assert_eq!(fake.file.lock().to_vec(), b"0123456789abcdefXY");
    }

    /// Reads from `conn` until the server closes it; false if it is still open after 10 s.
    async fn closed_by_server(conn: &mut tokio::net::TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        let until_closed = async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), until_closed)
            .await
            .is_ok()
    }

    /// Serves a fake node with `limits` on a port of its own, until the token is cancelled.
    async fn serve_limited(
        limits: LimitsConfig,
    ) -> (
        std::net::SocketAddr,
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let app = router(Fake::new(), ApiToken::new(TOKEN));
        let sd = shutdown.clone();
        let server =
            tokio::spawn(async move { super::serve(listener, app, &limits, "api-test", sd).await });
        (addr, shutdown, server)
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed() {
        let (addr, shutdown, server) = serve_limited(LimitsConfig {
            http_connections: 4,
            http_header_timeout_ms: 600_000,
            ..Default::default()
        })
        .await;
        let connect = || tokio::net::TcpStream::connect(addr);
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(connect().await.unwrap());
        }
        let mut fifth = connect().await.unwrap();
        assert!(closed_by_server(&mut fifth).await, "over the limit");
        drop(held);
        let url = format!("http://{addr}/v1/status");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match reqwest::get(&url).await {
                Ok(r) if r.status() == 200 => break,
                other => assert!(
                    tokio::time::Instant::now() < deadline,
                    "not served once the slots are free: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops")
            .unwrap();
    }

    #[tokio::test]
    async fn connections_that_send_no_whole_header_are_closed() {
        use tokio::io::AsyncWriteExt;
        let (addr, shutdown, _server) = serve_limited(LimitsConfig {
            http_header_timeout_ms: 300,
            ..Default::default()
        })
        .await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut trickle = tokio::net::TcpStream::connect(addr).await.unwrap();
        trickle
            .write_all(b"GET /v1/status HTTP/1.1\r\nHo")
            .await
            .unwrap();
        assert!(closed_by_server(&mut silent).await, "silent");
        assert!(closed_by_server(&mut trickle).await, "trickling");
        let r = reqwest::get(format!("http://{addr}/v1/status"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_write_body_that_stalls_is_refused_and_frees_its_slot() {
        let fake = Fake::new();
        let url = serve(fake.clone()).await;
        let c = reqwest::Client::new();
        let stalled = || {
            let start = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from("ab"))]);
            reqwest::Body::wrap_stream(start.chain(futures::stream::pending()))
        };
        // More stalled writes than there are request slots (3): each is cut in turn.
        let writes: Vec<_> = (0..4)
            .map(|i| {
                let req = if i % 2 == 0 {
                    c.put(format!("{url}/v1/file"))
                } else {
                    c.patch(format!("{url}/v1/file?offset=0"))
                };
                req.bearer_auth(TOKEN).body(stalled()).send()
            })
            .collect();
        let answers =
            tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(writes))
                .await
                .expect("every stalled write is answered");
        for r in answers {
            let r = r.unwrap();
            let code = r.status().as_u16();
            let e: serde_json::Value = r.json().await.unwrap();
            if code == 503 {
                assert!(
                    e["error"].as_str().unwrap().contains("http_requests"),
                    "{e}"
                );
                continue;
            }
            assert_eq!(code, 408, "{e}");
            assert!(
                e["error"].as_str().unwrap().contains("http_body_idle_ms"),
                "{e}"
            );
        }
        assert_eq!(fake.file.lock().len(), 0, "nothing written");
        let r = c
            .patch(format!("{url}/v1/file?offset=0"))
            .bearer_auth(TOKEN)
            .body("done")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "the slots are free again");
    }

    #[tokio::test]
    async fn watches_and_requests_are_limited_and_bad_timeouts_refused() {
        let fake = Fake::new();
        let url = serve(fake.clone()).await;
        let c = reqwest::Client::new();
        for t in ["NaN", "-1", "inf", "abc"] {
            let r = c
                .get(format!("{url}/v1/watch?timeout={t}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "timeout={t}");
            let e: serde_json::Value = r.json().await.unwrap();
            assert!(e["error"].is_string());
        }
        let hold = || tokio::spawn(c.get(format!("{url}/v1/watch?after=9&timeout=60")).send());
        let mut held_watch = hold();
        let busy = async {
            loop {
                if held_watch.is_finished() {
                    held_watch = hold();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let r = c
                    .get(format!("{url}/v1/watch?after=9&timeout=0"))
                    .send()
                    .await
                    .unwrap();
                if r.status() == 503 {
                    return r;
                }
                tokio::task::yield_now().await;
            }
        };
        let r = tokio::time::timeout(Duration::from_secs(10), busy)
            .await
            .expect("a second watch is refused");
        assert_eq!(r.headers()["retry-after"], "1");
        let e: serde_json::Value = r.json().await.unwrap();
        assert!(e["error"].as_str().unwrap().contains("watches"), "{e}");
        // One watch and two held tree requests take all three request slots.
        let t1 = tokio::spawn(c.get(format!("{url}/v1/tree")).send());
        let t2 = tokio::spawn(c.get(format!("{url}/v1/tree")).send());
        let full = async {
            loop {
                let r = c.get(format!("{url}/v1/status")).send().await.unwrap();
                if r.status() == 503 {
                    return r;
                }
                tokio::task::yield_now().await;
            }
        };
        let r = tokio::time::timeout(Duration::from_secs(10), full)
            .await
            .expect("a request over http_requests is refused");
        let e: serde_json::Value = r.json().await.unwrap();
        assert!(
            e["error"].as_str().unwrap().contains("http_requests"),
            "{e}"
        );
        fake.hold.add_permits(1);
        held_watch.abort();
        let _ = (t1.await, t2.await);
        let r = c.get(format!("{url}/v1/status")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        use RangeAsk::*;
        assert_eq!(parse_range("bytes=0-9", 100), Part(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), Part(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), Part(90, 99));
        assert_eq!(parse_range("bytes=95-200", 100), Part(95, 99));
        assert_eq!(parse_range("bytes=-500", 100), Part(0, 99));
        assert_eq!(
            parse_range("bytes=0-18446744073709551616", 100),
            Part(0, 99)
        );
        // Well-formed but selecting nothing: 416.
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-0", 0), Unsatisfiable);
        // Found by the `http` fuzz target: a suffix longer than u64 on an empty file was
        // `Part(0, 0)`, a 206 announcing one byte of a file that has none.
        assert_eq!(
            parse_range("bytes=-99999999999999999999999", 0),
            Unsatisfiable
        );
        assert_eq!(
            parse_range("bytes=-99999999999999999999999", 100),
            Part(0, 99)
        );
        assert_eq!(
            parse_range("bytes=18446744073709551616-", 100),
            Unsatisfiable
        );
        // Invalid, or not one byte range: ignored, the whole body.
        assert_eq!(parse_range("bytes=5-2", 100), Whole);
        assert_eq!(parse_range("bytes=0-1,3-4", 100), Whole);
        assert_eq!(parse_range("items=0-1", 100), Whole);
        assert_eq!(parse_range("bytes=abc", 100), Whole);
        assert_eq!(parse_range("bytes=-", 100), Whole);
        assert_eq!(parse_range("bytes=1-x", 100), Whole);
        assert_eq!(parse_range("bytes=+1-2", 100), Whole);
    }
}
