//! The file endpoints: GET with ranges (RFC 9110), PATCH, truncate and PUT, each answering once the
//! node shows the version it wrote.

use super::*;

/// What a `Range` header asks of a representation (RFC 9110 section 14).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum RangeAsk {
    /// No header, or one that is invalid or not a single byte range: the whole body, 200.
    Whole,
    /// Bytes `[start, end]` (inclusive, within the file): 206.
    Part(u64, u64),
    /// A valid byte range that starts past the end (or a zero-length suffix): 416.
    Unsatisfiable,
}

/// Parses a `Range` header against a representation of `len` bytes. Anything but one
/// well-formed byte range is ignored (the whole body), as RFC 9110 lets a server do; a
/// well-formed one that selects nothing is unsatisfiable.
pub(super) fn parse_range(h: &str, len: u64) -> RangeAsk {
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeAsk::Whole;
    };
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAsk::Whole;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    let (a, b) = (a.trim(), b.trim());
    match (a, b) {
        ("", suffix) if digits(suffix) => match suffix.parse::<u64>() {
            Ok(0) => RangeAsk::Unsatisfiable,
            _ if len == 0 => RangeAsk::Unsatisfiable,
            Ok(n) => RangeAsk::Part(len.saturating_sub(n), len - 1),
            Err(_) => RangeAsk::Part(0, len - 1),
        },
        (first, last) if digits(first) && (last.is_empty() || digits(last)) => {
            let Ok(first) = first.parse::<u64>() else {
                return RangeAsk::Unsatisfiable;
            };
            let last = match last {
                "" => u64::MAX,
                l => l.parse::<u64>().unwrap_or(u64::MAX),
            };
            if last < first {
                RangeAsk::Whole
            } else if first >= len {
                RangeAsk::Unsatisfiable
            } else {
                RangeAsk::Part(first, last.min(len - 1))
            }
        }
        _ => RangeAsk::Whole,
    }
}

/// Bytes `[start, end]` of `file` as a stream of slices of its chunks: nothing is copied,
/// and the snapshot `file` is held only until the body is sent.
pub(super) fn file_body(file: ChunkedFile, start: u64, end: u64) -> Body {
    if file.is_empty() {
        return Body::empty();
    }
    let cs = u64::from(file.chunk_size());
    let pieces = (start / cs..=end / cs).map(move |i| {
        let chunk = file.chunk(i).unwrap_or_default();
        let at = i * cs;
        let lo = start.max(at) - at;
        let hi = (end + 1).min(at + chunk.len() as u64) - at;
        Ok::<_, std::convert::Infallible>(chunk.slice(lo as usize..hi as usize))
    });
    Body::from_stream(futures::stream::iter(pieces))
}

pub(super) async fn read_file<B: Backend>(State(node): State<B>, headers: HeaderMap) -> Response {
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
        .map_or(RangeAsk::Whole, |r| parse_range(r, len));
    match range {
        RangeAsk::Whole => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            let body = file_body(file, 0, len.saturating_sub(1));
            (StatusCode::OK, h, body).into_response()
        }
        RangeAsk::Unsatisfiable => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            (StatusCode::RANGE_NOT_SATISFIABLE, h, Body::empty()).into_response()
        }
        RangeAsk::Part(start, end) => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start + 1));
            (StatusCode::PARTIAL_CONTENT, h, file_body(file, start, end)).into_response()
        }
    }
}

#[derive(Deserialize)]
pub(super) struct WriteQuery {
    offset: Option<u64>,
    len: Option<u64>,
    wait: Option<String>,
    if_version: Option<u64>,
    /// `OFFSET:LEN:HEX`: apply only if bytes [OFFSET, OFFSET+LEN) still hash (BLAKE3) to HEX.
    if_range_hash: Option<String>,
}

impl WriteQuery {
    pub(super) fn precondition(&self) -> Result<Option<Precondition>, ApiError> {
        match (&self.if_version, &self.if_range_hash) {
            (Some(_), Some(_)) => Err(bad_request("give if_version or if_range_hash, not both")),
            (Some(v), None) => Ok(Some(Precondition::IfVersion(*v))),
            (None, Some(spec)) => {
                let mut parts = spec.splitn(3, ':');
                let (Some(o), Some(l), Some(h)) = (parts.next(), parts.next(), parts.next()) else {
                    return Err(bad_request("if_range_hash is OFFSET:LEN:HEX"));
                };
                let offset = o
                    .parse()
                    .map_err(|_| bad_request("if_range_hash: bad OFFSET"))?;
                let len = l
                    .parse()
                    .map_err(|_| bad_request("if_range_hash: bad LEN"))?;
                let hash: [u8; 32] = hex::decode(h)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| bad_request("if_range_hash: HEX must be 64 hex digits"))?;
                Ok(Some(Precondition::IfRangeHash { offset, len, hash }))
            }
            (None, None) => Ok(None),
        }
    }
}

/// Waits until this node shows `version` or `timeout` passes; true if it does.
pub(super) async fn wait_shown<B: Backend>(node: &B, version: u64, timeout: Duration) -> bool {
    let mut rx = node.versions();
    tokio::time::timeout(timeout, rx.wait_for(|(v, _)| *v >= version))
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false)
}

pub(super) async fn finish_write<B: Backend>(
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
                    "apply_timeout",
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
        ApplyOutcome::Rejected { reason, .. } => {
            Err(ApiError(StatusCode::BAD_REQUEST, "rejected", reason))
        }
    }
}

pub(super) async fn write_ops<B: Backend>(
    node: &B,
    ops: Vec<Op>,
    q: &WriteQuery,
) -> Result<Response, ApiError> {
    let cond = q.precondition()?;
    let outcome = node.write(Update { ops }, cond).await?;
    finish_write(node, outcome, q).await
}

/// The `Content-Length` a request declares, if any.
pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub(super) fn body_too_large(what: &str, max: u64) -> ApiError {
    ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("{what} is over the limit of {max} bytes"),
    )
}

pub(super) async fn patch_file<B: Backend>(
    _auth: Authorized,
    State(node): State<B>,
    Q(q): Q<WriteQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(offset) = q.offset else {
        return Err(bad_request("PATCH needs ?offset=N"));
    };
    let max = node.max_update_bytes();
    if content_length(&headers).is_some_and(|n| n > max) {
        return Err(body_too_large("the PATCH body (max_update_bytes)", max));
    }
    let idle = body_idle(&node);
    let mut stream = body.into_data_stream();
    let mut data = bytes::BytesMut::new();
    while let Some(frame) = next_frame(&mut stream, idle).await? {
        if (data.len() + frame.len()) as u64 > max {
            return Err(body_too_large("the PATCH body (max_update_bytes)", max));
        }
        data.extend_from_slice(&frame);
    }
    let data = data.freeze();
    let end = offset.checked_add(data.len() as u64);
    let max_len = node.max_len();
    if end.is_none_or(|e| e > max_len) {
        return Err(over_max_len(end, max_len));
    }
    write_ops(&node, vec![Op::Write { offset, data }], &q).await
}

pub(super) async fn truncate_file<B: Backend>(
    _auth: Authorized,
    State(node): State<B>,
    Q(q): Q<WriteQuery>,
) -> Result<Response, ApiError> {
    let Some(len) = q.len else {
        return Err(bad_request("truncate needs ?len=N"));
    };
    if len > node.max_len() {
        return Err(over_max_len(Some(len), node.max_len()));
    }
    write_ops(&node, vec![Op::Truncate { len }], &q).await
}

/// How long a write's body may send nothing (`limits.http_body_idle_ms`).
fn body_idle<B: Backend>(node: &B) -> Duration {
    Duration::from_millis(node.limits().http_body_idle_ms)
}

/// The next piece of a write's body; `None` at its end. A body that sends nothing for `idle`
/// is refused (408 `body_timeout`).
async fn next_frame(
    stream: &mut axum::body::BodyDataStream,
    idle: Duration,
) -> Result<Option<Bytes>, ApiError> {
    match tokio::time::timeout(idle, stream.next()).await {
        Err(_) => Err(ApiError(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the body sent nothing for {} ms (limits.http_body_idle_ms)",
                idle.as_millis()
            ),
        )),
        Ok(None) => Ok(None),
        Ok(Some(frame)) => frame
            .map(Some)
            .map_err(|e| bad_request(&format!("reading the body: {e}"))),
    }
}

/// A PUT body diffed against `base` as it arrives: the ops that turn `base` into the body
/// (one write per chunk that differs, then a truncate if the body is shorter). Only the
/// chunks that differ are kept; the body's length is checked against `max_len` and the
/// changed bytes against `max_update` as they arrive, so an oversized body is refused
/// before it is read in full.
pub(super) async fn diff_body(
    base: &ChunkedFile,
    body: Body,
    max_len: u64,
    max_update: u64,
    idle: Duration,
) -> Result<Update, ApiError> {
    let cs = base.chunk_size() as usize;
    let mut ops = Vec::new();
    let mut changed = 0u64;
    let mut total = 0u64;
    let mut index = 0u64;
    let mut buf = bytes::BytesMut::new();
    let mut flush = |index: u64, piece: Bytes| -> Result<(), ApiError> {
        let same = base
            .chunk(index)
            .is_some_and(|old| old.len() >= piece.len() && old[..piece.len()] == piece[..]);
        if !same {
            changed += piece.len() as u64;
            if changed > max_update {
                return Err(ApiError(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "update_too_large",
                    format!("the PUT changes more than max_update_bytes ({max_update}) bytes"),
                ));
            }
            ops.push(Op::Write {
                offset: index * cs as u64,
                data: piece,
            });
        }
        Ok(())
    };
    let mut stream = body.into_data_stream();
    while let Some(frame) = next_frame(&mut stream, idle).await? {
        total += frame.len() as u64;
        if total > max_len {
            return Err(over_max_len(Some(total), max_len));
        }
        let mut rest = &frame[..];
        while !rest.is_empty() {
            if buf.capacity() == 0 {
                buf.reserve(cs);
            }
            let take = (cs - buf.len()).min(rest.len());
            buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if buf.len() == cs {
                flush(index, buf.split().freeze())?;
                index += 1;
            }
        }
    }
    if !buf.is_empty() {
        flush(index, buf.split().freeze())?;
    }
    if total < base.len() {
        ops.push(Op::Truncate { len: total });
    }
    Ok(Update { ops })
}

pub(super) async fn put_file<B: Backend>(
    _auth: Authorized,
    State(node): State<B>,
    Q(q): Q<WriteQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if q.if_range_hash.is_some() {
        return Err(bad_request("PUT takes if_version only"));
    }
    let max_len = node.max_len();
    if let Some(n) = content_length(&headers).filter(|n| *n > max_len) {
        return Err(over_max_len(Some(n), max_len));
    }
    if let Some(v) = q.if_version {
        wait_shown(&node, v, Duration::from_secs(10)).await;
    }
    let mut base = node.file();
    if q.if_version.is_some_and(|v| v != base.version()) {
        let outcome = ApplyOutcome::PreconditionFailed {
            version: base.version(),
        };
        return finish_write(&node, outcome, &q).await;
    }
    let idle = body_idle(&node);
    let mut update = diff_body(&base, body, max_len, node.max_update_bytes(), idle).await?;
    let mut target = base.clone();
    target
        .apply(base.version(), &update)
        .map_err(|e| ApiError(StatusCode::PAYLOAD_TOO_LARGE, "over_max_len", e.to_string()))?;
    for _ in 0..REPLACE_ATTEMPTS {
        let cond = Precondition::IfVersion(base.version());
        match node.write(update.clone(), Some(cond)).await? {
            ApplyOutcome::PreconditionFailed { version } if q.if_version.is_none() => {
                wait_shown(&node, version, Duration::from_secs(10)).await;
                base = node.file();
                update = base.diff_to_file(&target);
                if update.byte_size() > node.max_update_bytes() {
                    return Err(ApiError(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "update_too_large",
                        format!(
                            "after a concurrent write the PUT changes more than max_update_bytes ({})",
                            node.max_update_bytes()
                        ),
                    ));
                }
            }
            outcome => return finish_write(&node, outcome, &q).await,
        }
    }
    Err(ApiError(
        StatusCode::CONFLICT,
        "contended",
        format!(
            "the replace did not settle after {REPLACE_ATTEMPTS} attempts under concurrent writes"
        ),
    ))
}
