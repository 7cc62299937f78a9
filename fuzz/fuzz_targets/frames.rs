//! Bytes off a QUIC stream: frame prefixes, the kind of a frame from its first byte, the
//! counts of its repeated fields, and every message a peer can send decoded from it. A
//! request that passes the one-kind check decodes as the kind its first byte named.
#![no_main]

use canopy::{proto, wire};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const PATHS: &[&[u32]] = &[
    &[],
    &[1],
    &[2],
    &[5],
    &[7],
    &[2, 1],
    &[2, 1, 1],
    &[5, 4],
    &[8, 2],
];

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    while let Ok(Some((n, body))) = wire::decode_prefix(buf, 1 << 16) {
        let first = wire::first_field(&body);
        for path in PATHS {
            for field in 1..6 {
                let _ = wire::count_field(&body, path, field);
                let _ = wire::count_packed_varints(&body, path, field);
            }
        }
        if wire::check_one_kind(&body, first).is_ok() {
            if let Ok(r) = proto::Request::decode(body.clone()) {
                let decoded = r.kind.as_ref().map(request_field);
                assert!(
                    decoded.is_none() || decoded == Some(first),
                    "a frame of one kind decoded as another: {decoded:?} after {first}"
                );
            }
        }
        let _ = proto::Request::decode(body.clone());
        let _ = proto::Downstream::decode(body.clone());
        let _ = proto::RaftRpc::decode(body.clone());
        let _ = proto::RaftReply::decode(body.clone());
        let _ = proto::ProposeReply::decode(body.clone());
        let _ = proto::SampleReply::decode(body.clone());
        let _ = proto::TreeReply::decode(body.clone());
        let _ = proto::FetchReply::decode(body.clone());
        let _ = proto::RaftEntry::decode(body.clone());
        if let Ok(u) = proto::Update::decode(body) {
            let _ = canopy::file::Update::try_from(u);
        }
        buf = &buf[n..];
    }
});

/// The field number of a request's kind: what its cap and count bounds were chosen by.
fn request_field(k: &proto::request::Kind) -> u32 {
    use proto::request::Kind;
    match k {
        Kind::Subscribe(_) => 1,
        Kind::Propose(_) => 2,
        Kind::Raft(_) => 3,
        Kind::Admin(_) => 4,
        Kind::Sample(_) => 5,
        Kind::Tree(_) => 6,
        Kind::Fetch(_) => 7,
    }
}
