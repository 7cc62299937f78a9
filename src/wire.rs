//! Length-delimited, size-capped protobuf frames over QUIC streams.
//!
//! Invariants:
//! - A frame is a big-endian `u32` body length followed by exactly that many bytes of protobuf.
//! - A reader checks the length against its cap before allocating anything for the body, then
//!   allocates the whole frame once.
//! - End of stream exactly between frames is a clean end (`Ok(None)`); end of stream anywhere
//!   inside a frame, including inside the prefix, is [`WireError::Truncated`].
//! - A [`RawFrame`] holds the frame byte-for-byte as received (prefix included), so it can be
//!   forwarded verbatim with [`write_raw`].

use bytes::{BufMut, Bytes, BytesMut};

/// Default cap: large enough for a 64 MiB update plus framing.
pub const DEFAULT_MAX_FRAME: usize = 72 * 1024 * 1024;

/// Size of the length prefix.
pub const PREFIX_LEN: usize = 4;

/// Errors reading, writing or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("reading frame: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("writing frame: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("decoding frame: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("stream ended inside a frame")]
    Truncated,
}

/// One frame as received: length prefix plus body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawFrame {
    pub frame: Bytes,
}

impl RawFrame {
    /// The protobuf body (a cheap slice of `frame`).
    pub fn body(&self) -> Bytes {
        self.frame.slice(PREFIX_LEN..)
    }

    /// Decodes the body as `M`.
    pub fn decode<M: prost::Message + Default>(&self) -> Result<M, WireError> {
        Ok(M::decode(self.body())?)
    }
}

/// Encodes `msg` as one frame (prefix + body) into shared bytes, so the same frame can be sent to
/// many peers.
///
/// # Panics
/// If the encoded message is 4 GiB or larger.
pub fn encode<M: prost::Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let prefix = u32::try_from(len).expect("protobuf message does not fit a u32 length prefix");
    let mut buf = BytesMut::with_capacity(PREFIX_LEN + len);
    buf.put_u32(prefix);
    msg.encode_raw(&mut buf);
    buf.freeze()
}

/// A frame in two parts, written back to back: `head` (prefix and fields) and `data`, a
/// chunk's bytes shared with the file, so a transfer does not copy each chunk to frame it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parts {
    pub head: Bytes,
    pub data: Bytes,
}

impl Parts {
    /// The frame's length on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.data.len()
    }

    /// Never true: a frame has at least its prefix.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The whole frame in one buffer (a copy; for tests and tools).
    pub fn concat(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.len());
        b.extend_from_slice(&self.head);
        b.extend_from_slice(&self.data);
        b.freeze()
    }
}

impl From<Bytes> for Parts {
    fn from(head: Bytes) -> Self {
        Self {
            head,
            data: Bytes::new(),
        }
    }
}

/// The frame of `Downstream { snapshot_chunk: SnapshotChunk { index, data } }`, byte for byte
/// what [`encode`] makes of it, with `data` left out of the head instead of copied.
pub fn encode_chunk(index: u64, data: Bytes) -> Parts {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    let mut inner = 0usize;
    if index != 0 {
        inner += 1 + encoded_len_varint(index);
    }
    if !data.is_empty() {
        inner += 1 + encoded_len_varint(data.len() as u64) + data.len();
    }
    let body = 1 + encoded_len_varint(inner as u64) + inner;
    let prefix = u32::try_from(body).expect("a chunk frame fits a u32 length prefix");
    let mut head = BytesMut::with_capacity(PREFIX_LEN + 24);
    head.put_u32(prefix);
    // Downstream.snapshot_chunk = 3; SnapshotChunk.index = 1, .data = 2.
    encode_key(3, WireType::LengthDelimited, &mut head);
    encode_varint(inner as u64, &mut head);
    if index != 0 {
        encode_key(1, WireType::Varint, &mut head);
        encode_varint(index, &mut head);
    }
    if !data.is_empty() {
        encode_key(2, WireType::LengthDelimited, &mut head);
        encode_varint(data.len() as u64, &mut head);
    }
    Parts {
        head: head.freeze(),
        data,
    }
}

/// Writes a frame given in parts without copying them.
pub async fn write_parts(send: &mut quinn::SendStream, parts: &Parts) -> Result<(), WireError> {
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
) -> Result<(), WireError> {
    write_raw(send, &encode(msg)).await
}

/// Writes an already-encoded frame (from [`encode`] or [`read_raw`]) without copying it.
pub async fn write_raw(send: &mut quinn::SendStream, frame: &Bytes) -> Result<(), WireError> {
    Ok(send.write_chunk(frame.clone()).await?)
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a new frame. Refuses lengths over
/// `max` before allocating.
pub async fn read_raw(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<RawFrame>, WireError> {
    let mut prefix = [0u8; PREFIX_LEN];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(WireError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = body_len(prefix, max)?;
    let mut frame = BytesMut::with_capacity(PREFIX_LEN + len);
    frame.extend_from_slice(&prefix);
    // Copy quinn's chunks straight in: no zero-fill of the buffer first.
    while frame.len() < PREFIX_LEN + len {
        let want = PREFIX_LEN + len - frame.len();
        match recv.read_chunk(want, true).await {
            Ok(Some(chunk)) => frame.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(WireError::Truncated),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(RawFrame {
        frame: frame.freeze(),
    }))
}

/// Reads and decodes one frame; `Ok(None)` on a clean end of stream before a new frame.
pub async fn read_frame<M: prost::Message + Default>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<M>, WireError> {
    match read_raw(recv, max).await? {
        Some(raw) => raw.decode().map(Some),
        None => Ok(None),
    }
}

/// Parses one frame from the front of `buf`: its total length (prefix included) and a copy of its
/// body. `Ok(None)` if `buf` holds only part of a frame.
pub fn decode_prefix(buf: &[u8], max: usize) -> Result<Option<(usize, Bytes)>, WireError> {
    let Some(prefix) = buf.first_chunk::<PREFIX_LEN>() else {
        return Ok(None);
    };
    let len = body_len(*prefix, max)?;
    let total = PREFIX_LEN + len;
    Ok(buf
        .get(PREFIX_LEN..total)
        .map(|body| (total, Bytes::copy_from_slice(body))))
}

fn body_len(prefix: [u8; PREFIX_LEN], max: usize) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;
    use crate::tls::{self, Role, TransportConfig};
    use proptest::prelude::*;

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

    proptest! {
        #[test]
        fn a_chunk_frame_in_parts_is_the_encoded_frame(index in prop_oneof![Just(0u64), any::<u64>()], data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let data = Bytes::from(data);
            let whole = encode(&proto::Downstream {
                kind: Some(proto::downstream::Kind::SnapshotChunk(proto::SnapshotChunk {
                    index,
                    data: data.clone(),
                })),
            });
            let parts = encode_chunk(index, data);
            prop_assert_eq!(parts.len(), whole.len());
            prop_assert_eq!(parts.concat(), whole);
        }

        #[test]
        fn encode_then_decode_prefix_roundtrips(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..6),
            split in any::<prop::sample::Index>(),
        ) {
            let msgs: Vec<proto::Update> = bodies
                .iter()
                .enumerate()
                .map(|(i, b)| write_op(i as u64, b.clone()))
                .collect();
            let mut stream = Vec::new();
            for m in &msgs {
                stream.extend_from_slice(&encode(m));
            }
            let cut = split.index(stream.len() + 1);

            let mut buf = stream[..cut].to_vec();
            let mut rest = &stream[cut..];
            let mut got = Vec::new();
            loop {
                match decode_prefix(&buf, DEFAULT_MAX_FRAME).unwrap() {
                    Some((n, body)) => {
                        prop_assert!(n <= buf.len());
                        got.push(<proto::Update as prost::Message>::decode(body).unwrap());
                        buf.drain(..n);
                    }
                    None if rest.is_empty() => break,
                    None => {
                        buf.extend_from_slice(rest);
                        rest = &[];
                    }
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, msgs);
        }

        #[test]
        fn raw_bodies_roundtrip(body in proptest::collection::vec(any::<u8>(), 0..1000)) {
            let msg = proto::Write { offset: 0, data: body.into() };
            let frame = encode(&msg);
            let (n, b) = decode_prefix(&frame, DEFAULT_MAX_FRAME).unwrap().unwrap();
            prop_assert_eq!(n, frame.len());
            let raw = RawFrame { frame: frame.clone() };
            prop_assert_eq!(raw.body(), b);
            prop_assert_eq!(raw.decode::<proto::Write>().unwrap(), msg);
        }
    }

    #[test]
    fn prefix_is_big_endian_body_length() {
        let frame = encode(&proto::Write {
            offset: 1,
            data: Bytes::from_static(b"abc"),
        });
        let len = frame.len() - PREFIX_LEN;
        assert_eq!(frame[..PREFIX_LEN], (len as u32).to_be_bytes());
        assert!(decode_prefix(&frame[..3], 100).unwrap().is_none());
        assert!(decode_prefix(&frame[..frame.len() - 1], 100)
            .unwrap()
            .is_none());
    }

    #[test]
    fn oversized_length_refused_before_body_arrives() {
        let buf = u32::MAX.to_be_bytes();
        match decode_prefix(&buf, DEFAULT_MAX_FRAME) {
            Err(WireError::TooLarge { len, max }) => {
                assert_eq!(len, u32::MAX as usize);
                assert_eq!(max, DEFAULT_MAX_FRAME);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        let mut small = 11u32.to_be_bytes().to_vec();
        small.extend_from_slice(&[0; 11]);
        assert!(matches!(
            decode_prefix(&small, 10),
            Err(WireError::TooLarge { len: 11, max: 10 })
        ));
        assert!(decode_prefix(&small, 11).unwrap().is_some());
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.extend_from_slice(&[0xff, 0xff, 0xff]);
        let raw = RawFrame {
            frame: buf.freeze(),
        };
        assert!(matches!(
            raw.decode::<proto::Update>(),
            Err(WireError::Decode(_))
        ));
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
            Err(WireError::TooLarge { max: 1000, .. })
        ));

        let (mut send, _r) = client_conn.open_bi().await.unwrap();
        send.write_all(&big[..big.len() - 1]).await.unwrap();
        send.finish().unwrap();
        let (_s, mut recv) = server_conn.accept_bi().await.unwrap();
        assert!(matches!(
            read_frame::<proto::Update>(&mut recv, DEFAULT_MAX_FRAME).await,
            Err(WireError::Truncated)
        ));

        let (mut send, _r) = client_conn.open_bi().await.unwrap();
        send.write_all(&big[..2]).await.unwrap();
        send.finish().unwrap();
        let (_s, mut recv) = server_conn.accept_bi().await.unwrap();
        assert!(matches!(
            read_raw(&mut recv, DEFAULT_MAX_FRAME).await,
            Err(WireError::Truncated)
        ));
    }
}
