//! A 50 MB write through a 3-member core, in a test binary of its own: it measures that no
//! member starts an election while every member writes and fsyncs the entry, so no other test
//! of this suite competes with it for the machine's cores.

mod common;

use common::*;

/// A 50 MB PUT (one entry, written and fsynced by every member) starts no election: the
/// leader's heartbeats do not wait behind it, and members hear them while writing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50mb_put_starts_no_election() {
    let dir = tempfile::tempdir().unwrap();
    let (_pki, cores) = core_cluster(dir.path(), 3);
    let c = http();
    let l = leader_index(&c, &cores).await;
    assert!(patch(&c, &cores[l], 0, b"warm up".to_vec()).await.is_some());
    let nodes: Vec<&Proc> = cores.iter().collect();
    agree(&c, &nodes).await;
    // The leader of the terms recorded: an election that ends after the first
    // `leader_index` (the cluster has just started) is not the write's doing.
    let (terms, l) = loop {
        let terms = terms_of(&c, &cores).await;
        let l = leader_index(&c, &cores).await;
        if terms_of(&c, &cores).await == terms {
            break (terms, l);
        }
    };
    let body: Vec<u8> = (0..50_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let resp = c
        .put(cores[l].url("/v1/file"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let (version, _) = agree(&c, &nodes).await;
    let after = terms_of(&c, &cores).await;
    assert_eq!(
        after, terms,
        "a member started an election during the 50 MB write"
    );
    assert_eq!(leader_index(&c, &cores).await, l);
    assert!(version > 1);
}

async fn terms_of(c: &reqwest::Client, cores: &[Proc]) -> Vec<u64> {
    let mut terms = Vec::new();
    for p in cores {
        terms.push(term(c, p).await);
    }
    terms
}
