//! Framed messages on quinn streams, and the one identity-checking dial every connection a
//! node opens goes through (the stream side of [`crate::wire`]'s codec).
//!
//! Invariants:
//! - A reader checks a frame's length against its cap before allocating anything for the
//!   body, then allocates the whole frame once; the cap may depend on the frame's kind
//!   ([`read_raw_by_kind`]).
//! - End of stream exactly between frames is a clean end (`Ok(None)`); end of stream anywhere
//!   inside a frame, including inside the prefix, is [`WireError::Truncated`].
//! - A frame read by [`read_raw`] is forwarded byte for byte by [`write_raw`].
//! - A frame read against a [`ReadBudget`] ([`read_first_frame`]) holds its declared length
//!   of that budget from before its body is allocated until the [`Reserved`] it returns is
//!   dropped; one that cannot get it, or does not arrive whole, by the deadline is refused
//!   ([`StreamError::Busy`], [`StreamError::Deadline`]) with nothing of it kept.
//! - [`dial`] returns a connection only once its handshake completed within the timeout and
//!   the peer's certificate matched what the caller expects of it.
//! - No connection outlives its peer's certificate: the handshake refuses an expired one, and
//!   an [`ExpiryWatch`] (on every accepted connection, and on every dialed one a node keeps
//!   for long: its parent link) looks again at least every minute.
//! - Nothing here keeps a connection open: [`dial`] hands out the only handle, and an
//!   [`ExpiryWatch`] lets go of its own when dropped. A connection whose last handle is
//!   dropped is closed by quinn, so a one-shot exchange (a sample, a tree query, a fetch)
//!   leaves no connection behind sending keep-alives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};

use crate::tls::{self, Role};
use crate::wire::{self, encode, Parts, RawFrame, WireError, PREFIX_LEN};

/// Errors reading or writing frames on a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading frame: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("writing frame: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("{0}")]
    Frame(#[from] WireError),
    /// The frame's declared length did not fit in what is left of the node's budget for
    /// frames being read before the deadline.
    #[error("busy: a frame of {len} bytes found no room in limits.request_bytes ({budget} bytes) within {after:?}")]
    Busy {
        /// The frame's first field (its kind, for a oneof message).
        kind: u32,
        len: usize,
        budget: usize,
        after: Duration,
    },
    /// The frame did not arrive whole before the deadline.
    #[error("no whole frame within {after:?}")]
    Deadline { after: Duration },
}

impl StreamError {
    /// The peer reset the stream (it gave up on the request; nothing to answer).
    pub fn is_reset(&self) -> bool {
        matches!(self, StreamError::Read(quinn::ReadError::Reset(_)))
    }

    /// The connection under the stream is gone.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            StreamError::Read(quinn::ReadError::ConnectionLost(_))
                | StreamError::Write(quinn::WriteError::ConnectionLost(_))
        )
    }
}

/// What the caller requires of the certificate on a connection it dials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect<'a> {
    /// Any certificate of the cluster CA (the handshake checked the chain).
    Anyone,
    /// A certificate with this role.
    Role(Role),
    /// Exactly this node name with this role.
    Member { name: &'a str, role: Role },
}

impl Expect<'_> {
    fn admits(&self, found: Option<&(String, Role)>) -> bool {
        match (self, found) {
            (Expect::Anyone, _) => true,
            (Expect::Role(r), Some((_, role))) => r == role,
            (Expect::Member { name, role }, Some((n, r))) => n == name && r == role,
            _ => false,
        }
    }
}

impl std::fmt::Display for Expect<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Anyone => write!(f, "any cluster node"),
            Expect::Role(r) => write!(f, "a {r} node"),
            Expect::Member { name, role } => write!(f, "{name} ({role})"),
        }
    }
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("resolving {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: quinn::ConnectError,
    },
    #[error("handshake with {addr}: {source}")]
    Handshake {
        addr: String,
        source: quinn::ConnectionError,
    },
    #[error("no handshake with {addr} within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("{addr} is {found}, expected {expected}")]
    WrongPeer {
        addr: String,
        expected: String,
        found: String,
    },
}

impl DialError {
    /// The address that was dialed.
    pub fn addr(&self) -> &str {
        match self {
            DialError::Resolve { addr, .. }
            | DialError::Connect { addr, .. }
            | DialError::Handshake { addr, .. }
            | DialError::Timeout { addr, .. }
            | DialError::WrongPeer { addr, .. } => addr,
        }
    }
}

/// QUIC close code of a connection whose peer's certificate expired.
pub const CERT_EXPIRED: u32 = 6;

/// How often an open connection's peer certificate is looked at again.
const EXPIRY_CHECK: Duration = Duration::from_secs(60);

/// Whether the peer's certificate on `conn` has expired (false when it names no expiry).
pub fn peer_expired(conn: &quinn::Connection) -> bool {
    tls::peer_not_after(conn).is_some_and(|until| until <= SystemTime::now())
}

/// Closes a connection once its peer's certificate has expired, while it lives: a task
/// holding a handle to the connection, aborted (letting go of that handle) when the watch
/// is dropped. Its holder keeps it exactly as long as it keeps the connection.
#[must_use = "the watch stops when dropped"]
pub struct ExpiryWatch(Option<tokio::task::AbortHandle>);

impl Drop for ExpiryWatch {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Watches `conn` and closes it once its peer's certificate has expired (checked every
/// minute against the wall clock, so a clock change is noticed too), until the returned
/// watch is dropped.
pub fn close_at_peer_expiry(conn: &quinn::Connection) -> ExpiryWatch {
    let Some(until) = tls::peer_not_after(conn) else {
        return ExpiryWatch(None);
    };
    let conn = conn.clone();
    let task = tokio::spawn(async move {
        loop {
            let left = until.duration_since(SystemTime::now()).unwrap_or_default();
            if left.is_zero() {
                tracing::warn!(peer = %conn.remote_address(), "closing a connection: the peer's certificate expired");
                conn.close(
                    quinn::VarInt::from_u32(CERT_EXPIRED),
                    b"certificate expired",
                );
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(left.min(EXPIRY_CHECK)) => {}
                _ = conn.closed() => return,
            }
        }
    });
    ExpiryWatch(Some(task.abort_handle()))
}

/// Resolves `addr`, connects, and checks the peer's certificate against `expect`, all within
/// `timeout`. A peer that does not match is closed before the connection is returned.
/// `client` replaces the endpoint's default client configuration (a reloaded certificate).
/// The caller holds the only handle: the connection closes when it drops it. A caller that
/// keeps it for long watches its peer's certificate with [`close_at_peer_expiry`].
pub async fn dial(
    endpoint: &quinn::Endpoint,
    client: Option<quinn::ClientConfig>,
    addr: &str,
    timeout: Duration,
    expect: Expect<'_>,
) -> Result<quinn::Connection, DialError> {
    match tokio::time::timeout(timeout, dial_inner(endpoint, client, addr, expect)).await {
        Ok(r) => r,
        Err(_) => Err(DialError::Timeout {
            addr: addr.to_string(),
            after: timeout,
        }),
    }
}

async fn dial_inner(
    endpoint: &quinn::Endpoint,
    client: Option<quinn::ClientConfig>,
    addr: &str,
    expect: Expect<'_>,
) -> Result<quinn::Connection, DialError> {
    let resolve = |reason: String| DialError::Resolve {
        addr: addr.to_string(),
        reason,
    };
    let sock: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| resolve(e.to_string()))?
        .next()
        .ok_or_else(|| resolve("no address".into()))?;
    let connecting = match client {
        Some(c) => endpoint.connect_with(c, sock, tls::SERVER_NAME),
        None => endpoint.connect(sock, tls::SERVER_NAME),
    };
    let conn = connecting
        .map_err(|source| DialError::Connect {
            addr: addr.to_string(),
            source,
        })?
        .await
        .map_err(|source| DialError::Handshake {
            addr: addr.to_string(),
            source,
        })?;
    let found = tls::peer_identity(&conn);
    if expect.admits(found.as_ref()) {
        return Ok(conn);
    }
    conn.close(quinn::VarInt::from_u32(0), b"not the expected peer");
    Err(DialError::WrongPeer {
        addr: addr.to_string(),
        expected: expect.to_string(),
        found: found.map_or("unidentified".into(), |(n, r)| format!("{n} ({r})")),
    })
}

/// Writes a frame given in parts without copying them.
pub async fn write_parts(send: &mut quinn::SendStream, parts: &Parts) -> Result<(), StreamError> {
    if parts.data.is_empty() {
        return write_raw(send, &parts.head).await;
    }
    let mut chunks = [parts.head.clone(), parts.data.clone()];
    Ok(send.write_all_chunks(&mut chunks).await?)
}

/// Encodes and writes `msg` as one frame.
pub async fn write_frame<M: prost::Message>(
    send: &mut quinn::SendStream,
    msg: &M,
) -> Result<(), StreamError> {
    write_raw(send, &encode(msg)).await
}

/// Writes an already-encoded frame (from [`encode`] or [`read_raw`]) without copying it.
pub async fn write_raw(send: &mut quinn::SendStream, frame: &Bytes) -> Result<(), StreamError> {
    Ok(send.write_chunk(frame.clone()).await?)
}

/// Writes already-encoded frames in order, in one call, so that frames queued together leave
/// in as few packets as they fit.
pub async fn write_raws(
    send: &mut quinn::SendStream,
    frames: &mut [Bytes],
) -> Result<(), StreamError> {
    Ok(send.write_all_chunks(frames).await?)
}

/// Bytes that frames being read may hold at once, shared by every stream that reads against
/// it: a frame takes its declared length before its body is allocated ([`read_first_frame`]).
/// Waiters are served in order.
#[derive(Clone, Debug)]
pub struct ReadBudget {
    sem: Arc<tokio::sync::Semaphore>,
    bytes: usize,
}

impl ReadBudget {
    /// A budget of `bytes` (at most [`tokio::sync::Semaphore::MAX_PERMITS`]).
    pub fn new(bytes: u64) -> Self {
        let bytes = usize::try_from(bytes)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        Self {
            sem: Arc::new(tokio::sync::Semaphore::new(bytes)),
            bytes,
        }
    }

    /// The whole budget, in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes not held by any frame now.
    pub fn available(&self) -> usize {
        self.sem.available_permits()
    }

    /// Bytes held by frames now.
    pub fn held(&self) -> usize {
        self.bytes.saturating_sub(self.available())
    }

    /// Waits for `len` bytes; `None` if `len` is more than the whole budget.
    async fn take(&self, len: usize) -> Option<Reserved> {
        let n = u32::try_from(len).ok().filter(|_| len <= self.bytes)?;
        let permit = self.sem.clone().acquire_many_owned(n).await.ok()?;
        Some(Reserved(Some(permit)))
    }
}

/// A frame's share of a [`ReadBudget`], given back when dropped (or none, for a frame read
/// without a budget).
#[derive(Debug, Default)]
pub struct Reserved(Option<tokio::sync::OwnedSemaphorePermit>);

impl Reserved {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |p| p.num_permits())
    }
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a new frame. Refuses lengths over
/// `max` before allocating.
pub async fn read_raw(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<RawFrame>, StreamError> {
    Ok(read_capped(recv, max, |_| max, None).await?.map(|(f, _)| f))
}

/// [`read_raw_by_kind`] of the first frame of a request stream, whole by `deadline`, and
/// holding its declared length of `budget` (if any) from before its body is allocated. A
/// frame that does not get its length of the budget by the deadline is
/// [`StreamError::Busy`] (nothing of it was read past its first byte), one that does not
/// arrive whole [`StreamError::Deadline`].
pub async fn read_first_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
    cap_of: impl FnOnce(u32) -> usize,
    budget: Option<&ReadBudget>,
    deadline: tokio::time::Instant,
) -> Result<Option<(RawFrame, Reserved)>, StreamError> {
    let waiting = parking_lot::Mutex::new(None);
    let after = deadline.saturating_duration_since(tokio::time::Instant::now());
    let gate = budget.map(|b| Gate {
        budget: b,
        waiting: &waiting,
    });
    let read = read_one_kind(recv, max, cap_of, gate);
    match tokio::time::timeout_at(deadline, read).await {
        Ok(r) => r,
        Err(_) => match *waiting.lock() {
            Some((kind, len)) => Err(StreamError::Busy {
                kind,
                len,
                budget: budget.map_or(0, ReadBudget::bytes),
                after,
            }),
            None => Err(StreamError::Deadline { after }),
        },
    }
}

/// What [`read_capped`] takes a frame's length from, and where it says that it waits (the
/// frame's kind and length while it does).
struct Gate<'a> {
    budget: &'a ReadBudget,
    waiting: &'a parking_lot::Mutex<Option<(u32, usize)>>,
}

/// [`read_raw`] of a frame whose message is one oneof (`Request`, `Downstream`), with a cap
/// that depends on which variant it carries: `cap_of` gets the number of the frame's first
/// field ([`wire::first_field`]) once its first byte is in, and the frame is refused if it
/// is longer than the cap, before anything is allocated for it. Once read, a frame with any
/// other top-level field is refused ([`wire::check_one_kind`]): a decoder would keep that
/// variant, which the cap and the caller's count bounds were not chosen for.
pub async fn read_raw_by_kind(
    recv: &mut quinn::RecvStream,
    max: usize,
    cap_of: impl FnOnce(u32) -> usize,
) -> Result<Option<RawFrame>, StreamError> {
    Ok(read_one_kind(recv, max, cap_of, None)
        .await?
        .map(|(raw, _)| raw))
}

/// [`read_capped`], then the one-kind check of [`read_raw_by_kind`].
async fn read_one_kind(
    recv: &mut quinn::RecvStream,
    max: usize,
    cap_of: impl FnOnce(u32) -> usize,
    gate: Option<Gate<'_>>,
) -> Result<Option<(RawFrame, Reserved)>, StreamError> {
    let Some((raw, reserved)) = read_capped(recv, max, cap_of, gate).await? else {
        return Ok(None);
    };
    let body = &raw.frame[PREFIX_LEN..];
    wire::check_one_kind(body, wire::first_field(body))?;
    Ok(Some((raw, reserved)))
}

async fn read_capped(
    recv: &mut quinn::RecvStream,
    max: usize,
    cap_of: impl FnOnce(u32) -> usize,
    gate: Option<Gate<'_>>,
) -> Result<Option<(RawFrame, Reserved)>, StreamError> {
    let mut prefix = [0u8; PREFIX_LEN];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(WireError::Truncated.into()),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = wire::body_len(prefix, max)?;
    let mut first = [0u8; 1];
    if len > 0 {
        match recv.read_exact(&mut first).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(WireError::Truncated.into()),
            Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
        }
    }
    let kind = if len > 0 {
        wire::first_field(&first)
    } else {
        0
    };
    let cap = cap_of(kind);
    if len > cap {
        return Err(WireError::TooLarge { len, max: cap }.into());
    }
    let reserved = match gate {
        None => Reserved::default(),
        Some(g) => {
            *g.waiting.lock() = Some((kind, PREFIX_LEN + len));
            let r = g.budget.take(PREFIX_LEN + len).await;
            *g.waiting.lock() = None;
            r.ok_or(WireError::TooLarge {
                len,
                max: g.budget.bytes(),
            })?
        }
    };
    let mut frame = BytesMut::with_capacity(PREFIX_LEN + len);
    frame.extend_from_slice(&prefix);
    if len > 0 {
        frame.extend_from_slice(&first);
    }
    // Copy quinn's chunks straight in: no zero-fill of the buffer first.
    while frame.len() < PREFIX_LEN + len {
        let want = PREFIX_LEN + len - frame.len();
        match recv.read_chunk(want, true).await {
            Ok(Some(chunk)) => frame.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(WireError::Truncated.into()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some((
        RawFrame {
            frame: frame.freeze(),
        },
        reserved,
    )))
}

/// Reads and decodes one frame; `Ok(None)` on a clean end of stream before a new frame.
pub async fn read_frame<M: prost::Message + Default>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<M>, StreamError> {
    match read_raw(recv, max).await? {
        Some(raw) => Ok(Some(raw.decode()?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;
    use crate::tls::TransportConfig;
    use crate::wire::DEFAULT_MAX_FRAME;

    fn write_op(offset: u64, data: Vec<u8>) -> proto::Update {
        proto::Update {
            ops: vec![proto::Op {
                kind: Some(proto::op::Kind::Write(proto::Write {
                    offset,
                    data: data.into(),
                })),
            }],
        }
    }

    fn pair() -> (tempfile::TempDir, tls::Identity, tls::Identity) {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        tls::ca_init(&ca).unwrap();
        tls::cert_issue(&ca, "a", Role::Core, dir.path()).unwrap();
        tls::cert_issue(&ca, "b", Role::Relay, dir.path()).unwrap();
        let a = tls::Identity::load(dir.path(), "a").unwrap();
        let b = tls::Identity::load(dir.path(), "b").unwrap();
        (dir, a, b)
    }

    async fn connected() -> (
        tempfile::TempDir,
        quinn::Endpoint,
        quinn::Connection,
        quinn::Connection,
    ) {
        let (dir, a, b) = pair();
        let tc = TransportConfig::default();
        let bind = || std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = tls::endpoint_from_socket(bind(), &a, &tc).unwrap();
        let client = tls::endpoint_from_socket(bind(), &b, &tc).unwrap();
        let addr = server.local_addr().unwrap();
        let (server_conn, client_conn) = tokio::join!(
            async { server.accept().await.unwrap().await.unwrap() },
            async {
                client
                    .connect(addr, tls::SERVER_NAME)
                    .unwrap()
                    .await
                    .unwrap()
            },
        );
        (dir, client, server_conn, client_conn)
    }

    #[tokio::test]
    async fn frames_over_quinn_including_a_large_one() {
        let (_dir, _client, server_conn, client_conn) = connected().await;

        let big: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let msgs = vec![
            write_op(0, b"hello".to_vec()),
            write_op(7, Vec::new()),
            write_op(1 << 40, big),
            proto::Update::default(),
            write_op(3, vec![9; 1000]),
        ];

        let sent = msgs.clone();
        let writer = tokio::spawn(async move {
            let (mut send, _recv) = client_conn.open_bi().await.unwrap();
            for (i, m) in sent.iter().enumerate() {
                if i % 2 == 0 {
                    write_frame(&mut send, m).await.unwrap();
                } else {
                    write_raw(&mut send, &encode(m)).await.unwrap();
                }
            }
            send.finish().unwrap();
            send.stopped().await.unwrap();
            client_conn
        });

        let (_send, mut recv) = server_conn.accept_bi().await.unwrap();
        let mut got = Vec::new();
        while let Some(raw) = read_raw(&mut recv, DEFAULT_MAX_FRAME).await.unwrap() {
            assert_eq!(raw.frame, encode(&msgs[got.len()]));
            got.push(raw.decode::<proto::Update>().unwrap());
        }
        assert_eq!(got, msgs);
        assert!(read_frame::<proto::Update>(&mut recv, DEFAULT_MAX_FRAME)
            .await
            .unwrap()
            .is_none());
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn quinn_reader_enforces_cap_and_detects_truncation() {
        let (_dir, _client, server_conn, client_conn) = connected().await;

        let big = encode(&write_op(0, vec![1; 2000]));
        let (mut send, _r) = client_conn.open_bi().await.unwrap();
        write_raw(&mut send, &big).await.unwrap();
        send.finish().unwrap();
        let (_s, mut recv) = server_conn.accept_bi().await.unwrap();
        assert!(matches!(
            read_raw(&mut recv, 1000).await,
            Err(StreamError::Frame(WireError::TooLarge { max: 1000, .. }))
        ));

        let (mut send, _r) = client_conn.open_bi().await.unwrap();
        send.write_all(&big[..big.len() - 1]).await.unwrap();
        send.finish().unwrap();
        let (_s, mut recv) = server_conn.accept_bi().await.unwrap();
        assert!(matches!(
            read_frame::<proto::Update>(&mut recv, DEFAULT_MAX_FRAME).await,
            Err(StreamError::Frame(WireError::Truncated))
        ));

        let (mut send, _r) = client_conn.open_bi().await.unwrap();
        send.write_all(&big[..2]).await.unwrap();
        send.finish().unwrap();
        let (_s, mut recv) = server_conn.accept_bi().await.unwrap();
        assert!(matches!(
            read_raw(&mut recv, DEFAULT_MAX_FRAME).await,
            Err(StreamError::Frame(WireError::Truncated))
        ));
    }

    #[tokio::test]
    async fn a_first_frame_holds_its_length_of_the_budget_and_has_a_deadline() {
        let (_dir, _client, server_conn, client_conn) = connected().await;
        let frame = encode(&write_op(0, vec![5; 3000]));
        let budget = ReadBudget::new(frame.len() as u64 + 100);
        let soon = || tokio::time::Instant::now() + Duration::from_millis(300);
        let later = || tokio::time::Instant::now() + Duration::from_secs(30);
        let open = |bytes: Bytes| {
            let c = client_conn.clone();
            async move {
                let (mut send, recv) = c.open_bi().await.unwrap();
                send.write_all(&bytes).await.unwrap();
                (send, recv)
            }
        };

        let _first = open(frame.clone()).await;
        let (_s, mut recv) = server_conn.accept_bi().await.unwrap();
        let (raw, held) = read_first_frame(&mut recv, 1 << 20, |_| 1 << 20, Some(&budget), later())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(raw.frame, frame);
        assert_eq!(held.bytes(), frame.len());
        assert_eq!(budget.available(), 100);

        let _second = open(frame.clone()).await;
        let (_s, mut recv) = server_conn.accept_bi().await.unwrap();
        let got = read_first_frame(&mut recv, 1 << 20, |_| 1 << 20, Some(&budget), soon()).await;
        assert!(
            matches!(got, Err(StreamError::Busy { kind: 1, len, .. }) if len == frame.len()),
            "{got:?}"
        );
        drop(held);
        assert_eq!(budget.available(), frame.len() + 100);

        let _third = open(frame.slice(..frame.len() - 10)).await;
        let (_s, mut recv) = server_conn.accept_bi().await.unwrap();
        let got = read_first_frame(&mut recv, 1 << 20, |_| 1 << 20, Some(&budget), soon()).await;
        assert!(matches!(got, Err(StreamError::Deadline { .. })), "{got:?}");
        assert_eq!(budget.available(), frame.len() + 100, "given back");

        let _fourth = open(frame.clone()).await;
        let (_s, mut recv) = server_conn.accept_bi().await.unwrap();
        let got = read_first_frame(&mut recv, 1 << 20, |_| 1 << 20, Some(&budget), later()).await;
        assert_eq!(got.unwrap().unwrap().0.frame, frame);

        let over = ReadBudget::new(100);
        let _fifth = open(frame.clone()).await;
        let (_s, mut recv) = server_conn.accept_bi().await.unwrap();
        let got = read_first_frame(&mut recv, 1 << 20, |_| 1 << 20, Some(&over), later()).await;
        assert!(
            matches!(
                got,
                Err(StreamError::Frame(WireError::TooLarge { max: 100, .. }))
            ),
            "{got:?}"
        );
    }
}
