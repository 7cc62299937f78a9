//! The pure codec of length-delimited, size-capped protobuf frames (no IO; the quinn stream
//! side is [`crate::transport`]).
//!
//! Invariants:
//! - A frame is a big-endian `u32` body length followed by exactly that many bytes of protobuf.
//! - A length is checked against its cap before anything is allocated for the body.
//! - A [`RawFrame`] holds the frame byte-for-byte as received (prefix included), so it can be
//!   forwarded verbatim.
//! - A frame's repeated fields can be counted before it is decoded ([`check_counts`]): a
//!   decoded element costs up to a hundred times its two bytes on the wire, so the count,
//!   not the frame size, bounds what decoding allocates.

use bytes::{BufMut, Bytes, BytesMut};

/// Default cap: large enough for a 64 MiB update plus framing.
pub const DEFAULT_MAX_FRAME: usize = 72 * 1024 * 1024;

/// Size of the length prefix.
pub const PREFIX_LEN: usize = 4;

/// Errors framing or decoding a message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("decoding frame: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("a frame that began as kind {first} also holds kind {other}")]
    MixedKinds { first: u32, other: u32 },
    #[error("{count} {what} in one frame, over the limit of {max}")]
    TooMany {
        what: &'static str,
        count: u64,
        max: u64,
    },
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

/// The frame of a `FetchReply` holding a chunk, byte for byte what [`encode`] makes of
/// `FetchReply { index, data, .. }`, with `data` left out of the head instead of copied.
pub fn encode_fetch_reply(index: u64, data: Bytes) -> Parts {
    index_data_frame(None, index, data)
}

/// The frame of `Downstream { snapshot_chunk: SnapshotChunk { index, data } }`, byte for byte
/// what [`encode`] makes of it, with `data` left out of the head instead of copied.
pub fn encode_chunk(index: u64, data: Bytes) -> Parts {
    index_data_frame(Some(3), index, data)
}

/// The frame of a message `{ uint64 index = 1; bytes data = 2; }`, top-level or (`outer`)
/// as that field of an enclosing message, with `data` left out of the head.
fn index_data_frame(outer: Option<u32>, index: u64, data: Bytes) -> Parts {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    let mut inner = 0usize;
    if index != 0 {
        inner += 1 + encoded_len_varint(index);
    }
    if !data.is_empty() {
        inner += 1 + encoded_len_varint(data.len() as u64) + data.len();
    }
    let body = match outer {
        Some(_) => 1 + encoded_len_varint(inner as u64) + inner,
        None => inner,
    };
    let prefix = u32::try_from(body).expect("a chunk frame fits a u32 length prefix");
    let mut head = BytesMut::with_capacity(PREFIX_LEN + 24);
    head.put_u32(prefix);
    if let Some(field) = outer {
        encode_key(field, WireType::LengthDelimited, &mut head);
        encode_varint(inner as u64, &mut head);
    }
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

pub(crate) fn body_len(prefix: [u8; PREFIX_LEN], max: usize) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    Ok(len)
}

/// A bound on how many elements one repeated field holds in a frame: `field` of the message
/// reached through the length-delimited fields `path` (from the frame's top message).
#[derive(Clone, Copy, Debug)]
pub struct CountBound {
    pub path: &'static [u32],
    pub field: u32,
    pub max: u64,
    pub what: &'static str,
    /// A repeated varint field, which proto3 packs: a run on the wire holds as many elements
    /// as it has varints ([`count_packed_varints`]); otherwise each occurrence is one
    /// ([`count_field`]).
    pub packed: bool,
}

/// Checks every bound against the protobuf message `body` without decoding it.
pub fn check_counts(body: &[u8], bounds: &[CountBound]) -> Result<(), WireError> {
    for b in bounds {
        let count = count_elements(body, b.path, b.field, b.packed)?;
        if count > b.max {
            return Err(WireError::TooMany {
                what: b.what,
                count,
                max: b.max,
            });
        }
    }
    Ok(())
}

/// How many times `field` occurs in the message reached from `body` through the
/// length-delimited fields `path`. Every occurrence of a path field is followed, as a
/// decoder merges repeated occurrences of a message field.
pub fn count_field(body: &[u8], path: &[u32], field: u32) -> Result<u64, WireError> {
    count_elements(body, path, field, false)
}

/// How many elements the repeated varint field `field` holds in the message reached from
/// `body` through `path`, packed or not: [`count_field`] counts a packed run as the one
/// field it is on the wire, where a decoder makes an element of every varint in it.
pub fn count_packed_varints(body: &[u8], path: &[u32], field: u32) -> Result<u64, WireError> {
    count_elements(body, path, field, true)
}

fn count_elements(body: &[u8], path: &[u32], field: u32, packed: bool) -> Result<u64, WireError> {
    let mut count = 0u64;
    let mut rest = body;
    while !rest.is_empty() {
        let (number, value) = next_field(&mut rest)?;
        match path.split_first() {
            None if number == field => {
                count += match value {
                    Some(run) if packed => run.iter().filter(|&&b| b < 0x80).count() as u64,
                    _ => 1,
                };
            }
            Some((first, deeper)) if *first == number => {
                if let Some(v) = value {
                    count += count_elements(v, deeper, field, packed)?;
                }
            }
            _ => {}
        }
    }
    Ok(count)
}

/// Checks that every top-level field of `body` has the number `kind`. A frame whose message
/// is one oneof (`Request`, `Downstream`) holds one variant, and a decoder keeps the last
/// one it meets: a frame capped and counted as the kind its first field named must not end
/// as another kind, with fields that no bound counted for that kind.
pub fn check_one_kind(body: &[u8], kind: u32) -> Result<(), WireError> {
    let mut rest = body;
    while !rest.is_empty() {
        let (number, _) = next_field(&mut rest)?;
        if number != kind {
            return Err(WireError::MixedKinds {
                first: kind,
                other: number,
            });
        }
    }
    Ok(())
}

/// Takes one field off the front of `rest`: its number, and its value when it is
/// length-delimited.
fn next_field<'a>(rest: &mut &'a [u8]) -> Result<(u32, Option<&'a [u8]>), WireError> {
    let key = read_varint(rest)?;
    let number = u32::try_from(key >> 3).map_err(|_| WireError::Malformed("field number"))?;
    let value = match key & 7 {
        0 => {
            read_varint(rest)?;
            None
        }
        1 => {
            *rest = rest.get(8..).ok_or(WireError::Malformed("fixed64"))?;
            None
        }
        5 => {
            *rest = rest.get(4..).ok_or(WireError::Malformed("fixed32"))?;
            None
        }
        2 => {
            let len =
                usize::try_from(read_varint(rest)?).map_err(|_| WireError::Malformed("length"))?;
            if len > rest.len() {
                return Err(WireError::Malformed("length past the end"));
            }
            let (v, r) = rest.split_at(len);
            *rest = r;
            Some(v)
        }
        _ => return Err(WireError::Malformed("wire type")),
    };
    Ok((number, value))
}

fn read_varint(buf: &mut &[u8]) -> Result<u64, WireError> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf
            .split_first()
            .ok_or(WireError::Malformed("varint past the end"))?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(WireError::Malformed("varint longer than 10 bytes"))
}

/// The field number of the first field of `body` when its key fits one byte (every oneof
/// of the frames here does), else 0: what a message-typed frame carries, known from its
/// first bytes before the rest is read.
pub fn first_field(body_start: &[u8]) -> u32 {
    match body_start.first() {
        Some(&b) if b < 0x80 => u32::from(b >> 3),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;
    use proptest::prelude::*;

    #[test]
    fn a_frame_of_two_kinds_is_refused() {
        let sub = prost::Message::encode_to_vec(&proto::Request {
            kind: Some(proto::request::Kind::Subscribe(proto::Subscribe::default())),
        });
        let raft = prost::Message::encode_to_vec(&proto::Request {
            kind: Some(proto::request::Kind::Raft(proto::RaftRpc {
                kind: Some(proto::raft_rpc::Kind::AppendEntries(proto::AppendEntries {
                    entries: vec![proto::RaftEntry::default(); 3],
                    ..Default::default()
                })),
            })),
        });
        check_one_kind(&sub, first_field(&sub)).unwrap();
        check_one_kind(&raft, first_field(&raft)).unwrap();
        check_one_kind(&[sub.clone(), sub.clone()].concat(), 1).unwrap();
        check_one_kind(&[], 0).unwrap();
        let mixed = [sub.clone(), raft.clone()].concat();
        assert_eq!(first_field(&mixed), 1);
        assert!(matches!(
            check_one_kind(&mixed, first_field(&mixed)),
            Err(WireError::MixedKinds { first: 1, other: 3 })
        ));
        let decoded: proto::Request = prost::Message::decode(&mixed[..]).unwrap();
        assert!(
            matches!(decoded.kind, Some(proto::request::Kind::Raft(_))),
            "a decoder keeps the last kind, which is why the check exists"
        );
        assert_eq!(count_field(&mixed, &[3, 1], 4).unwrap(), 3);
    }

    #[test]
    fn packed_varints_are_counted_as_a_decoder_makes_them() {
        let fetch = proto::FetchChunks {
            indices: vec![0, 127, 128, u64::MAX, 5],
            hashes: vec![Bytes::from_static(&[1; 32])],
        };
        let body = prost::Message::encode_to_vec(&fetch);
        assert_eq!(count_field(&body, &[], 1).unwrap(), 1, "one packed run");
        assert_eq!(count_packed_varints(&body, &[], 1).unwrap(), 5);
        let mut unpacked = Vec::new();
        for i in [3u64, 300] {
            unpacked.extend_from_slice(&[0x08]);
            prost::encoding::encode_varint(i, &mut unpacked);
        }
        let both = [unpacked, body.clone()].concat();
        assert_eq!(count_packed_varints(&both, &[], 1).unwrap(), 7);
        let req = prost::Message::encode_to_vec(&proto::Request {
            kind: Some(proto::request::Kind::Fetch(fetch)),
        });
        assert_eq!(count_packed_varints(&req, &[7], 1).unwrap(), 5);
        let indices = |packed| CountBound {
            path: &[7],
            field: 1,
            max: 4,
            what: "indices in a fetch",
            packed,
        };
        assert!(matches!(
            check_counts(&req, &[indices(true)]),
            Err(WireError::TooMany {
                count: 5,
                max: 4,
                ..
            })
        ));
        check_counts(&req, &[indices(false)]).expect("one run on the wire");
    }

    #[test]
    fn counts_repeated_fields_without_decoding() {
        let sub = proto::Request {
            kind: Some(proto::request::Kind::Subscribe(proto::Subscribe {
                name: "x".into(),
                have_chunks: vec![Bytes::new(); 1000],
                ..Default::default()
            })),
        };
        let body = prost::Message::encode_to_vec(&sub);
        assert_eq!(first_field(&body), 1);
        assert_eq!(count_field(&body, &[1], 5).unwrap(), 1000);
        assert_eq!(count_field(&body, &[1], 4).unwrap(), 0);
        assert_eq!(count_field(&body, &[2], 5).unwrap(), 0);
        let bound = |max| CountBound {
            path: &[1],
            field: 5,
            max,
            what: "chunk hashes",
            packed: false,
        };
        check_counts(&body, &[bound(1000)]).unwrap();
        assert!(matches!(
            check_counts(&body, &[bound(999)]),
            Err(WireError::TooMany {
                count: 1000,
                max: 999,
                ..
            })
        ));
        // Two occurrences of the message field merge when decoded: both are counted.
        let mut twice = body.clone();
        twice.extend_from_slice(&body);
        assert_eq!(count_field(&twice, &[1], 5).unwrap(), 2000);
        assert!(count_field(&body[..body.len() - 1], &[1], 5).is_err());
    }

    proptest! {
        #[test]
        fn count_field_never_panics(body in proptest::collection::vec(any::<u8>(), 0..200), path in proptest::collection::vec(0u32..8, 0..3), field in 0u32..8) {
            let _ = count_field(&body, &path, field);
        }
    }

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
        fn a_fetch_reply_in_parts_is_the_encoded_frame(index in prop_oneof![Just(0u64), any::<u64>()], data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let data = Bytes::from(data);
            let whole = encode(&proto::FetchReply {
                index,
                data: data.clone(),
                ..Default::default()
            });
            let parts = encode_fetch_reply(index, data);
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
}
