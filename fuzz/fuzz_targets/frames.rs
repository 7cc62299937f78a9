//! Bytes off a QUIC stream: frame prefixes, the kind of a frame from its first byte, the
//! counts of its repeated fields, and every message a peer can send decoded from it.
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
        let _ = wire::first_field(&body);
        for path in PATHS {
            for field in 1..6 {
                let _ = wire::count_field(&body, path, field);
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
