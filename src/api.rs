//! The local HTTP API of every node: status, file reads and writes, watch, metrics.
//!
//! Invariants: every write answers only after it is committed (and, with `?wait=applied`,
//! applied on this node); a read serves one whole version, named by `X-Canopy-Version` and
//! `X-Canopy-Root`; errors answer JSON `{"error": ...}` with a fitting status code.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::consensus::ApplyOutcome;
use crate::file::{Op, Precondition, Update};
use crate::node::{Node, NodeError};

/// How long `?wait=applied` waits for this node to apply a committed write.
const APPLY_WAIT: Duration = Duration::from_secs(30);
/// Longest long poll a client may ask for.
const MAX_WATCH: Duration = Duration::from_secs(300);

pub fn router(node: Node) -> Router {
    let limit = node.0.cfg.stream.max_update_bytes as usize + (1 << 20);
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/file", get(read_file).put(put_file).patch(patch_file))
        .route("/v1/file/truncate", post(truncate_file))
        .route("/v1/watch", get(watch))
        .route("/v1/tree", get(tree))
        .route("/v1/core/members", get(core_members).post(add_member))
        .route(
            "/v1/core/members/{name}",
            axum::routing::delete(remove_member),
        )
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(node)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let code = match &e {
            NodeError::UpdateTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            NodeError::Rejected(_) => StatusCode::BAD_REQUEST,
            NodeError::Contended(_) => StatusCode::CONFLICT,
            NodeError::NotCore => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(code, e.to_string())
    }
}

async fn status(State(node): State<Node>) -> Response {
    Json(node.status()).into_response()
}

async fn metrics(State(_node): State<Node>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::handle().render(),
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

async fn read_file(State(node): State<Node>, headers: HeaderMap) -> Response {
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

async fn finish_write(
    node: &Node,
    outcome: ApplyOutcome,
    q: &WriteQuery,
) -> Result<Response, ApiError> {
    match outcome {
        ApplyOutcome::Applied { version } => {
            if q.wait.as_deref() == Some("applied") && !node.wait_applied(version, APPLY_WAIT).await
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

async fn write_ops(node: &Node, ops: Vec<Op>, q: &WriteQuery) -> Result<Response, ApiError> {
    let cond = q.precondition()?;
    let outcome = node.write(&Update { ops }, cond.as_ref()).await?;
    finish_write(node, outcome, q).await
}

async fn patch_file(
    State(node): State<Node>,
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

async fn truncate_file(
    State(node): State<Node>,
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

async fn put_file(
    State(node): State<Node>,
    Query(q): Query<WriteQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if q.if_range_hash.is_some() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "PUT takes if_version only".into(),
        ));
    }
    let outcome = match q.if_version {
        Some(v) => node.replace_at(&body, v).await?,
        None => node.replace(&body).await?,
    };
    finish_write(&node, outcome, &q).await
}

#[derive(Deserialize)]
struct WatchQuery {
    after: Option<u64>,
    timeout: Option<f64>,
}

async fn watch(State(node): State<Node>, Query(q): Query<WatchQuery>) -> Response {
    let after = q.after.unwrap_or(0);
    let timeout = Duration::from_secs_f64(
        q.timeout
            .unwrap_or(30.0)
            .clamp(0.0, MAX_WATCH.as_secs_f64()),
    );
    let mut rx = node.applied();
    let _ = tokio::time::timeout(timeout, rx.wait_for(|(v, _)| *v > after)).await;
    Json(node.status()).into_response()
}

async fn tree(State(node): State<Node>) -> Response {
    let nodes: Vec<serde_json::Value> = node
        .tree(crate::node::MAX_TREE_DEPTH)
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

async fn core_members(State(node): State<Node>) -> Result<Response, ApiError> {
    match node.status().core {
        Some(core) => Ok(Json(core).into_response()),
        None => Err(NodeError::NotCore.into()),
    }
}

#[derive(Deserialize)]
struct AddMemberBody {
    name: String,
    addr: String,
}

async fn add_member(
    State(node): State<Node>,
    Json(body): Json<AddMemberBody>,
) -> Result<Response, ApiError> {
    let admin = crate::proto::Admin {
        kind: Some(crate::proto::admin::Kind::AddMember(
            crate::proto::AddMember {
                name: body.name,
                addr: body.addr,
            },
        )),
    };
    node.admin(admin, 0).await?;
    core_members(State(node)).await
}

async fn remove_member(
    State(node): State<Node>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let admin = crate::proto::Admin {
        kind: Some(crate::proto::admin::Kind::RemoveMember(name)),
    };
    node.admin(admin, 0).await?;
    core_members(State(node)).await
}

#[cfg(test)]
mod tests {
    use super::parse_range;

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
