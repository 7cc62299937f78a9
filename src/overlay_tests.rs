//! Exact-output tests of the overlay state machine, driven by hand with a seeded ChaCha8.
//!
//! The relay under test is `r1`; every peer `x` is reachable at `x:7400`. Where an output
//! depends on the RNG (which peers a probe asks), the test either arranges a single
//! possibility or checks the property over many seeds.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

const ME: &str = "r1";

fn addr(name: &str) -> String {
    format!("{name}:7400")
}

/// What a relay without children at the default fan-out reports.
const LEAF: Report = Report {
    free_slots: 8,
    height: 0,
    room: 0,
    size: 0,
};

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn peer(name: &str, depth: Option<u32>, free_slots: u32, root_path: &[&str]) -> Peer {
    Peer::new(PeerInfo {
        name: name.to_string(),
        addr: addr(name),
        depth,
        free_slots,
        root_path: root_path.iter().map(|s| s.to_string()).collect(),
        height: 0,
        room: 0,
        zone: None,
        size: 0,
        held_for: Vec::new(),
    })
}

fn core_info(free_slots: u32) -> Peer {
    peer("core", Some(0), free_slots, &["core"])
}

fn relay_with(cfg: OverlayConfig) -> Overlay {
    Overlay::new(cfg, ME.to_string(), addr(ME), false, vec![addr("core")])
}

fn relay() -> Overlay {
    relay_with(OverlayConfig::default())
}

fn sampled(info: Peer, peers: Vec<Peer>) -> Input {
    Input::Sampled {
        addr: info.addr.clone(),
        info,
        peers,
    }
}

/// Peers learned from `s`, a relay not attached yet (so itself no join target): isolates
/// the choice among `peers` from the full core every relay knows.
fn gossip(peers: Vec<Peer>) -> Input {
    Input::Sampled {
        addr: addr("s"),
        info: peer("s", None, 8, &[]),
        peers,
    }
}

fn attached(parent: &PeerInfo) -> Input {
    Input::Attached {
        addr: parent.addr.clone(),
        name: parent.name.clone(),
        depth: parent.depth.expect("an attached parent"),
        root_path: parent.root_path.clone(),
    }
}

fn attach(name: &str, moving: bool, reason: Reason) -> Output {
    Output::Attach {
        addr: addr(name),
        moving,
        reason,
        report: LEAF,
    }
}

fn unattached_info(free_slots: u32) -> Peer {
    Peer::new(PeerInfo {
        name: ME.to_string(),
        addr: addr(ME),
        depth: None,
        free_slots,
        root_path: Vec::new(),
        height: 0,
        room: 0,
        zone: None,
        size: 0,
        held_for: Vec::new(),
    })
}

/// A relay that joined through the core: it is attached to the core at depth 1.
fn joined(r: &mut ChaCha8Rng) -> Overlay {
    let mut o = relay();
    o.handle(0, Input::Tick, r);
    let out = o.handle(1, sampled(core_info(8), vec![]), r);
    assert_eq!(out, vec![attach("core", false, Reason::Join)]);
    assert_eq!(o.handle(2, attached(&core_info(8)), r), vec![]);
    o
}

/// A relay attached below `p` (depth 3), so at depth 4, that also knows `q`.
fn deep(q: Peer, r: &mut ChaCha8Rng) -> (Overlay, Peer) {
    let p = peer("p", Some(3), 2, &["core", "x", "y", "p"]);
    let mut o = relay();
    assert_eq!(
        o.handle(0, sampled(core_info(0), vec![p.clone()]), r),
        vec![]
    );
    // The join starts at the shallowest pick, the full core, which refuses without a
    // referral; p is next.
    assert_eq!(
        o.handle(0, Input::Tick, r),
        vec![attach("core", false, Reason::Join)]
    );
    assert_eq!(
        o.handle(
            0,
            Input::Refused {
                addr: addr("core"),
                referral: None
            },
            r
        ),
        vec![attach("p", false, Reason::Join)]
    );
    assert_eq!(o.handle(0, attached(&p), r), vec![]);
    assert_eq!(o.depth(), Some(4));
    assert_eq!(o.handle(0, sampled(q, vec![]), r), vec![]);
    (o, p)
}

/// A tiny driver: ticks `o` every 100 ms over `times`, answers every sample request at once
/// from `world` (unknown addresses fail) with `gossip` as the peers, and, when `accept` is
/// set, answers attaches with Attached (free slot) or Refused. Returns every output with the
/// time it was emitted.
fn drive(
    o: &mut Overlay,
    world: &BTreeMap<String, Peer>,
    gossip: &[Peer],
    accept: bool,
    times: impl IntoIterator<Item = u64>,
    r: &mut ChaCha8Rng,
) -> Vec<(u64, Output)> {
    let mut log = Vec::new();
    for t in times {
        let mut queue: VecDeque<Output> = o.handle(t, Input::Tick, r).into();
        while let Some(out) = queue.pop_front() {
            log.push((t, out.clone()));
            let input = match out {
                Output::RequestSample { addr, .. } => match world.get(&addr) {
                    Some(info) => Input::Sampled {
                        addr,
                        info: info.clone(),
                        peers: gossip.to_vec(),
                    },
                    None => Input::SampleFailed { addr },
                },
                Output::Attach { addr, .. } if accept => match world.get(&addr) {
                    Some(info) if info.free_slots > 0 && info.depth.is_some() => attached(info),
                    Some(_) => Input::Refused {
                        addr,
                        referral: None,
                    },
                    None => Input::AttachFailed { addr },
                },
                _ => continue,
            };
            queue.extend(o.handle(t, input, r));
        }
    }
    log
}

/// Ticks every 100 ms from 100 ms on until the node emits an attach (at most 60 s); returns
/// the time and the attach.
fn until_attach(
    o: &mut Overlay,
    world: &BTreeMap<String, Peer>,
    r: &mut ChaCha8Rng,
) -> (u64, Output) {
    for t in (1..=600).map(|i| i * 100) {
        if let Some(a) = attaches(&drive(o, world, &[], false, [t], r)).pop() {
            return a;
        }
    }
    panic!("no attach within 60 s");
}

fn world(peers: &[&Peer]) -> BTreeMap<String, Peer> {
    peers
        .iter()
        .map(|p| (p.addr.clone(), (*p).clone()))
        .collect()
}

fn attaches(log: &[(u64, Output)]) -> Vec<(u64, Output)> {
    log.iter()
        .filter(|(_, o)| matches!(o, Output::Attach { .. }))
        .cloned()
        .collect()
}

/// Ticks in which at least two sample requests went out: a probe (a shuffle asks one peer).
fn probe_ticks(log: &[(u64, Output)]) -> usize {
    let mut per_tick: BTreeMap<u64, usize> = BTreeMap::new();
    for (t, o) in log {
        if matches!(o, Output::RequestSample { .. }) {
            *per_tick.entry(*t).or_default() += 1;
        }
    }
    per_tick.values().filter(|&&n| n >= 2).count()
}

#[test]
fn a_new_relay_probes_the_core_with_its_own_info_first() {
    let mut r = rng(1);
    let mut o = relay();
    assert_eq!(o.parent_addr(), None);
    assert_eq!(o.depth(), None);
    assert_eq!(Peer::new(o.info()), unattached_info(8));
    assert_eq!(
        o.handle(0, Input::Tick, &mut r),
        vec![Output::RequestSample {
            addr: addr("core"),
            offer: vec![unattached_info(8)],
        }]
    );
    // One probe at a time: the next tick, still within the probe timeout, is quiet.
    assert_eq!(o.handle(200, Input::Tick, &mut r), vec![]);
}

#[test]
fn a_sampled_core_with_free_slots_is_attached_for_join() {
    let mut r = rng(2);
    let mut o = relay();
    o.handle(0, Input::Tick, &mut r);
    assert_eq!(
        o.handle(5, sampled(core_info(8), vec![]), &mut r),
        vec![attach("core", false, Reason::Join)]
    );
    // A second answer while attaching changes nothing.
    assert_eq!(o.handle(6, sampled(core_info(8), vec![]), &mut r), vec![]);
    assert_eq!(o.parent_addr(), None);
}

#[test]
fn attached_sets_parent_depth_and_info() {
    let mut r = rng(3);
    let o = joined(&mut r);
    assert_eq!(o.parent_addr(), Some(&addr("core")));
    assert_eq!(o.parent_name(), Some(&"core".to_string()));
    assert_eq!(o.depth(), Some(1));
    assert_eq!(
        o.info(),
        PeerInfo {
            name: ME.into(),
            addr: addr(ME),
            depth: Some(1),
            free_slots: 8,
            root_path: vec!["core".into(), ME.into()],
            height: 0,
            room: 0,
            zone: None,
            size: 0,
            held_for: Vec::new(),
        }
    );
    assert_eq!(o.reparents(), &BTreeMap::from([(Reason::Join, 1)]));
}

#[test]
fn a_refusal_with_a_referral_is_followed_up_to_max_referrals() {
    let mut r = rng(4);
    let mut o = relay_with(OverlayConfig {
        max_referrals: 4,
        ..OverlayConfig::default()
    });
    o.handle(0, Input::Tick, &mut r);
    assert_eq!(
        o.handle(1, sampled(core_info(8), vec![]), &mut r),
        vec![attach("core", false, Reason::Join)]
    );
    let chain = ["c1", "c2", "c3", "c4", "c5"];
    let mut path = vec!["core"];
    let mut from = "core";
    for (i, name) in chain.iter().enumerate() {
        path.push(name);
        let referral = peer(name, Some(i as u32 + 1), 3, &path);
        // A refusal from anyone but the attach target is ignored.
        assert_eq!(
            o.handle(
                10,
                Input::Refused {
                    addr: addr("elsewhere"),
                    referral: Some(referral.clone()),
                },
                &mut r
            ),
            vec![]
        );
        let out = o.handle(
            10,
            Input::Refused {
                addr: addr(from),
                referral: Some(referral),
            },
            &mut r,
        );
        if i < 4 {
            assert_eq!(out, vec![attach(name, false, Reason::Join)], "referral {i}");
        } else {
            // The fifth referral is not followed: every peer it knows is full, so it probes.
            assert_eq!(out.len(), 2, "{out:?}");
            let known: BTreeSet<String> = ["core", "c1", "c2", "c3", "c4"]
                .iter()
                .map(|n| addr(n))
                .collect();
            let mut asked = BTreeSet::new();
            for o in &out {
                match o {
                    Output::RequestSample { addr, offer } => {
                        assert!(known.contains(addr), "{addr}");
                        assert_eq!(offer[0], unattached_info(8));
                        assert!(offer[1..].iter().all(|p| p.free_slots == 0));
                        asked.insert(addr.clone());
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(asked.len(), 2);
        }
        from = name;
    }
    assert_eq!(o.parent_addr(), None);
}

#[test]
fn a_refusal_without_a_referral_seeks_again() {
    let mut r = rng(5);
    let mut o = relay();
    o.handle(0, Input::Tick, &mut r);
    o.handle(1, sampled(core_info(1), vec![]), &mut r);
    assert_eq!(
        o.handle(
            2,
            Input::Refused {
                addr: addr("core"),
                referral: None,
            },
            &mut r
        ),
        // The core is now known to be full, so it samples again rather than retry it.
        vec![Output::RequestSample {
            addr: addr("core"),
            offer: vec![unattached_info(8), core_info(0)],
        }]
    );
}

#[test]
fn a_referral_to_a_descendant_or_to_itself_is_not_followed() {
    for referral in [
        peer("x", Some(2), 4, &["core", ME, "x"]),
        Peer::new(PeerInfo {
            name: "alias".into(),
            addr: addr(ME),
            depth: Some(1),
            free_slots: 4,
            root_path: vec!["core".into(), "alias".into()],
            height: 0,
            room: 0,
            zone: None,
            size: 0,
            held_for: Vec::new(),
        }),
    ] {
        let mut r = rng(6);
        let mut o = relay();
        o.handle(0, Input::Tick, &mut r);
        o.handle(1, sampled(core_info(8), vec![]), &mut r);
        assert_eq!(
            o.handle(
                2,
                Input::Refused {
                    addr: addr("core"),
                    referral: Some(referral),
                },
                &mut r
            ),
            vec![Output::RequestSample {
                addr: addr("core"),
                offer: vec![unattached_info(8), core_info(0)],
            }]
        );
        assert_eq!(o.view_addrs(), vec![addr("core")]);
    }
}

#[test]
fn an_attach_failure_seeks_again() {
    let mut r = rng(7);
    let mut o = relay();
    o.handle(0, Input::Tick, &mut r);
    o.handle(1, sampled(core_info(8), vec![]), &mut r);
    assert_eq!(
        o.handle(
            2,
            Input::AttachFailed {
                addr: addr("other")
            },
            &mut r
        ),
        vec![]
    );
    assert_eq!(
        o.handle(2, Input::AttachFailed { addr: addr("core") }, &mut r),
        // The core's info is forgotten (a bootstrap address stays in the view, unknown).
        vec![Output::RequestSample {
            addr: addr("core"),
            offer: vec![unattached_info(8)],
        }]
    );
}

#[test]
fn an_attach_timeout_seeks_again() {
    let mut r = rng(8);
    let mut o = relay();
    let timeout = o.config().attach_timeout_ms;
    o.handle(0, Input::Tick, &mut r);
    assert_eq!(
        o.handle(10, sampled(core_info(8), vec![]), &mut r),
        vec![attach("core", false, Reason::Join)]
    );
    assert_eq!(o.handle(10 + timeout - 1, Input::Tick, &mut r), vec![]);
    assert_eq!(
        o.handle(10 + timeout, Input::Tick, &mut r),
        vec![Output::RequestSample {
            addr: addr("core"),
            offer: vec![unattached_info(8)],
        }]
    );
}

#[test]
fn a_probe_without_answers_times_out_and_probes_again_after_a_backoff() {
    let mut r = rng(9);
    let mut o = relay();
    let timeout = o.config().probe_timeout_ms;
    let backoff = o.config().probe_backoff_ms;
    let probe = vec![Output::RequestSample {
        addr: addr("core"),
        offer: vec![unattached_info(8)],
    }];
    assert_eq!(o.handle(0, Input::Tick, &mut r), probe);
    assert_eq!(o.handle(timeout - 1, Input::Tick, &mut r), vec![]);
    // The timeout ends a fruitless probe; the next waits at most one backoff.
    assert_eq!(o.handle(timeout, Input::Tick, &mut r), vec![]);
    assert_eq!(o.handle(timeout + backoff, Input::Tick, &mut r), probe);
    let t = timeout + backoff + 1;
    assert_eq!(
        o.handle(t, Input::SampleFailed { addr: addr("core") }, &mut r),
        vec![]
    );
    // The second fruitless probe doubles the wait: at least one backoff, at most two.
    assert_eq!(o.handle(t + backoff - 1, Input::Tick, &mut r), vec![]);
    assert_eq!(o.handle(t + 2 * backoff, Input::Tick, &mut r), probe);
}

#[test]
fn a_lost_parent_is_sought_again_with_reason_parent_lost() {
    let mut r = rng(10);
    let mut o = joined(&mut r);
    assert_eq!(
        o.handle(
            10,
            Input::ParentLost {
                addr: addr("someone")
            },
            &mut r
        ),
        vec![]
    );
    assert_eq!(o.parent_addr(), Some(&addr("core")));
    assert_eq!(
        o.handle(11, Input::ParentLost { addr: addr("core") }, &mut r),
        vec![Output::RequestSample {
            addr: addr("core"),
            offer: vec![unattached_info(8)],
        }]
    );
    assert_eq!(o.parent_addr(), None);
    assert_eq!(o.depth(), None);
    assert_eq!(
        o.handle(12, sampled(core_info(7), vec![]), &mut r),
        vec![attach("core", false, Reason::ParentLost)]
    );
    o.handle(13, attached(&core_info(7)), &mut r);
    assert_eq!(
        o.reparents(),
        &BTreeMap::from([(Reason::Join, 1), (Reason::ParentLost, 1)])
    );
}

#[test]
fn a_parent_whose_path_holds_the_node_is_detached() {
    let mut r = rng(11);
    let mut o = relay();
    let a = peer("a", Some(1), 3, &["core", "a"]);
    o.handle(0, sampled(core_info(0), vec![a.clone()]), &mut r);
    assert_eq!(
        o.handle(0, Input::Tick, &mut r),
        vec![attach("a", false, Reason::Join)]
    );
    // Meanwhile `a` moved below this node: the path it announces holds `r1`.
    let out = o.handle(
        5,
        Input::Attached {
            addr: addr("a"),
            name: "a".into(),
            depth: 2,
            root_path: vec!["core".into(), ME.into(), "a".into()],
        },
        &mut r,
    );
    // The full core is the only target left: the join starts there, to be referred down.
    assert_eq!(
        out,
        vec![
            Output::Detach { addr: addr("a") },
            attach("core", false, Reason::Join),
        ]
    );
    assert_eq!(o.parent_addr(), None);
    assert_eq!(o.depth(), None);
    assert!(o.reparents().is_empty());
    assert_eq!(o.view_addrs(), vec![addr("core")]);
}

#[test]
fn candidates_whose_path_holds_the_node_are_never_chosen() {
    for seed in 0..64 {
        let mut r = rng(seed);
        let mut o = relay();
        let below = peer("a", Some(1), 5, &["core", ME, "a"]);
        let ok = peer("b", Some(3), 1, &["core", "x", "y", "b"]);
        o.handle(0, gossip(vec![below, ok]), &mut r);
        assert_eq!(
            o.handle(0, Input::Tick, &mut r),
            vec![attach("b", false, Reason::Join)],
            "seed {seed}"
        );
    }
    // With only such candidates it samples instead of attaching.
    let mut r = rng(0);
    let mut o = relay();
    let below = peer("a", Some(1), 5, &["core", "z", ME, "a"]);
    o.handle(0, gossip(vec![below]), &mut r);
    let out = o.handle(0, Input::Tick, &mut r);
    assert!(!out.is_empty());
    assert!(out
        .iter()
        .all(|o| matches!(o, Output::RequestSample { .. })));
}

#[test]
fn two_choices_take_the_shallower_then_more_free_slots_then_the_lower_addr() {
    let cases = [
        (
            peer("a", Some(2), 8, &["core", "x", "a"]),
            peer("b", Some(1), 1, &["core", "b"]),
            "b",
        ),
        (
            peer("a", Some(1), 3, &["core", "a"]),
            peer("b", Some(1), 5, &["core", "b"]),
            "b",
        ),
        (
            peer("b", Some(1), 3, &["core", "b"]),
            peer("a", Some(1), 3, &["core", "a"]),
            "a",
        ),
    ];
    for (one, two, want) in cases {
        for seed in 0..16 {
            let mut r = rng(seed);
            let mut o = relay();
            assert_eq!(o.config().choices, 2);
            o.handle(0, gossip(vec![one.clone(), two.clone()]), &mut r);
            assert_eq!(
                o.handle(0, Input::Tick, &mut r),
                vec![attach(want, false, Reason::Join)],
                "seed {seed}"
            );
        }
    }
}

#[test]
fn two_choices_compare_two_samples_not_the_whole_view() {
    let cands = vec![
        peer("a", Some(1), 2, &["core", "a"]),
        peer("b", Some(2), 2, &["core", "x", "b"]),
        peer("c", Some(3), 2, &["core", "x", "y", "c"]),
    ];
    let picks = |choices: usize| {
        let mut picked = BTreeMap::<String, usize>::new();
        for seed in 0..200 {
            let mut r = rng(seed);
            let mut o = relay_with(OverlayConfig {
                choices,
                ..OverlayConfig::default()
            });
            o.handle(0, gossip(cands.clone()), &mut r);
            match o.handle(0, Input::Tick, &mut r).as_slice() {
                [Output::Attach { addr, .. }] => *picked.entry(addr.clone()).or_default() += 1,
                other => panic!("{other:?}"),
            }
        }
        picked
    };
    let two = picks(2);
    assert_eq!(two.get(&addr("c")), None, "{two:?}");
    assert!(two[&addr("a")] > two[&addr("b")], "{two:?}");
    let one = picks(1);
    assert!(one[&addr("c")] > 0, "{one:?}");
    let all = picks(3);
    assert_eq!(all, BTreeMap::from([(addr("a"), 200)]));
}

#[test]
fn a_deep_node_moves_for_a_gain_of_two() {
    let q = peer("q", Some(1), 3, &["core", "q"]);
    let mut r = rng(12);
    let (mut o, p) = deep(q.clone(), &mut r);
    let w = world(&[&core_info(0), &p, &q]);
    let (t, first) = until_attach(&mut o, &w, &mut r);
    // The first tick with a parent (100 ms) draws the next check 5-15 s later.
    assert!((5_100..=15_100).contains(&t), "{t}");
    assert_eq!(first, attach("q", true, Reason::Rebalance));
    // The current parent is kept until the new one accepts.
    assert_eq!(o.parent_addr(), Some(&addr("p")));
    assert_eq!(o.depth(), Some(4));

    let mut again = rng(12);
    let (mut o2, _) = deep(q.clone(), &mut again);
    assert_eq!(
        until_attach(&mut o2, &w, &mut again),
        (t, first),
        "replayable"
    );

    assert_eq!(o.handle(t + 1, attached(&q), &mut r), vec![]);
    assert_eq!(o.parent_addr(), Some(&addr("q")));
    assert_eq!(o.depth(), Some(2));
    assert_eq!(o.info().root_path, vec!["core", "q", ME]);
    assert_eq!(
        o.reparents(),
        &BTreeMap::from([(Reason::Join, 1), (Reason::Rebalance, 1)])
    );
}

#[test]
fn a_deep_node_does_not_move_for_a_gain_of_one() {
    let mut r = rng(13);
    let q = peer("q", Some(2), 3, &["core", "z", "q"]);
    let (mut o, p) = deep(q.clone(), &mut r);
    let w = world(&[&core_info(0), &p, &q]);
    let log = drive(&mut o, &w, &[], false, (1..=600).map(|i| i * 100), &mut r);
    assert_eq!(attaches(&log), vec![]);
    // Its checks read the view and send nothing: only shuffles (one peer at a time) go out.
    assert_eq!(probe_ticks(&log), 0, "{log:?}");
    assert!(log
        .iter()
        .all(|(_, o)| matches!(o, Output::RequestSample { .. })));
    assert_eq!(o.parent_addr(), Some(&addr("p")));
}

#[test]
fn a_shallow_node_never_probes_for_a_move() {
    let mut r = rng(14);
    let p = peer("p", Some(1), 2, &["core", "p"]);
    let mut o = relay();
    o.handle(0, sampled(core_info(0), vec![p.clone()]), &mut r);
    assert_eq!(
        o.handle(0, Input::Tick, &mut r),
        vec![attach("p", false, Reason::Join)]
    );
    o.handle(0, attached(&p), &mut r);
    assert_eq!(o.depth(), Some(2));
    let w = world(&[&core_info(8), &p]);
    let log = drive(&mut o, &w, &[], true, (1..=600).map(|i| i * 100), &mut r);
    assert_eq!(probe_ticks(&log), 0, "{log:?}");
    assert_eq!(attaches(&log), vec![]);
    assert!(log
        .iter()
        .all(|(_, o)| matches!(o, Output::RequestSample { .. })));
}

#[test]
fn a_move_whose_parent_turned_out_deeper_is_undone() {
    let mut r = rng(17);
    let (mut o, t) = moving(&mut r);
    // q said depth 1 in the view but answers depth 2: a gain of one level only.
    let out = o.handle(
        t + 1,
        Input::Attached {
            addr: addr("q"),
            name: "q".into(),
            depth: 2,
            root_path: vec!["core".into(), "z".into(), "q".into()],
        },
        &mut r,
    );
    assert_eq!(out, vec![Output::Detach { addr: addr("q") }]);
    assert_eq!(o.parent_addr(), Some(&addr("p")));
    assert_eq!(o.depth(), Some(4));
    assert_eq!(o.reparents(), &BTreeMap::from([(Reason::Join, 1)]));
}

/// A depth-4 node with a move to `q` (depth 1) in flight, and the time it started.
fn moving(r: &mut ChaCha8Rng) -> (Overlay, u64) {
    let q = peer("q", Some(1), 3, &["core", "q"]);
    let (mut o, p) = deep(q.clone(), r);
    let w = world(&[&core_info(0), &p, &q]);
    let (t, a) = until_attach(&mut o, &w, r);
    assert_eq!(a, attach("q", true, Reason::Rebalance));
    (o, t)
}

#[test]
fn a_failed_or_refused_move_keeps_the_parent() {
    for input in [
        Input::Refused {
            addr: addr("q"),
            referral: None,
        },
        Input::AttachFailed { addr: addr("q") },
    ] {
        let mut r = rng(15);
        let (mut o, t) = moving(&mut r);
        assert_eq!(o.handle(t + 1, input, &mut r), vec![]);
        assert_eq!(o.parent_addr(), Some(&addr("p")));
        assert_eq!(o.depth(), Some(4));
    }
}

#[test]
fn a_move_to_a_descendant_is_undone_and_the_parent_kept() {
    let mut r = rng(16);
    let (mut o, t) = moving(&mut r);
    let out = o.handle(
        t + 1,
        Input::Attached {
            addr: addr("q"),
            name: "q".into(),
            depth: 6,
            root_path: vec!["core".into(), "p".into(), ME.into(), "q".into()],
        },
        &mut r,
    );
    assert_eq!(out, vec![Output::Detach { addr: addr("q") }]);
    assert_eq!(o.parent_addr(), Some(&addr("p")));
    assert_eq!(o.depth(), Some(4));
    assert_eq!(o.reparents(), &BTreeMap::from([(Reason::Join, 1)]));
}

#[test]
fn losing_the_parent_during_a_move_turns_the_move_into_the_reattach() {
    let mut r = rng(17);
    let (mut o, t) = moving(&mut r);
    assert_eq!(
        o.handle(t + 1, Input::ParentLost { addr: addr("p") }, &mut r),
        vec![]
    );
    assert_eq!(o.parent_addr(), None);
    // The move still in flight is now the way back: a refusal seeks again, from the core.
    let out = o.handle(
        t + 2,
        Input::Refused {
            addr: addr("q"),
            referral: None,
        },
        &mut r,
    );
    assert_eq!(out, vec![attach("core", false, Reason::ParentLost)]);
}

#[test]
fn core_nodes_never_attach() {
    let mut r = rng(18);
    let mut c = Overlay::new(
        OverlayConfig::default(),
        "core".to_string(),
        addr("core"),
        true,
        vec![addr("core"), addr("core2")],
    );
    assert_eq!(Peer::new(c.info()), core_info(8));
    assert_eq!(c.depth(), Some(0));
    let cand = peer("a", Some(1), 5, &["core2", "a"]);
    let mut outputs = Vec::new();
    outputs.extend(c.handle(0, sampled(cand.clone(), vec![core_info(3)]), &mut r));
    for t in 0..300 {
        outputs.extend(c.handle(t * 200, Input::Tick, &mut r));
    }
    outputs.extend(c.handle(
        70_000,
        Input::Refused {
            addr: addr("a"),
            referral: Some(cand.clone()),
        },
        &mut r,
    ));
    outputs.extend(c.handle(70_000, Input::AttachFailed { addr: addr("a") }, &mut r));
    outputs.extend(c.handle(70_000, Input::ParentLost { addr: addr("a") }, &mut r));
    outputs.extend(c.handle(70_000, Input::SampleFailed { addr: addr("a") }, &mut r));
    assert_eq!(outputs, vec![]);
    assert_eq!(c.parent_addr(), None);
    let (info, peers) = c.answer_sample(vec![unattached_info(8)], &mut r);
    assert_eq!(info, core_info(8));
    assert!(peers.len() <= c.config().shuffle_len);
    assert!(c.view_addrs().contains(&addr(ME)));
    assert!(!c.view_addrs().contains(&addr("core")));
}

#[test]
fn answer_sample_merges_the_offer_and_returns_at_most_shuffle_len_peers() {
    let mut r = rng(19);
    let mut o = relay();
    let known: Vec<Peer> = (0..10)
        .map(|i| peer(&format!("k{i}"), Some(2), 1, &["core", "x", "k"]))
        .collect();
    o.handle(0, sampled(core_info(3), known.clone()), &mut r);
    let before: BTreeSet<Peer> = known
        .iter()
        .cloned()
        .chain([core_info(3)])
        .collect::<BTreeSet<_>>();
    let asker = peer("asker", None, 8, &[]);
    let offered = peer("o1", Some(1), 2, &["core", "o1"]);
    let me_stale = peer(ME, Some(7), 0, &["zz"]);
    let (info, peers) = o.answer_sample(
        vec![asker.clone(), offered.clone(), me_stale.clone()],
        &mut r,
    );
    assert_eq!(*info, o.info());
    assert_eq!(info.depth, None);
    assert_eq!(peers.len(), o.config().shuffle_len);
    let distinct: BTreeSet<&Peer> = peers.iter().collect();
    assert_eq!(distinct.len(), peers.len());
    assert!(peers.iter().all(|p| before.contains(p)), "{peers:?}");
    let view = o.view_addrs();
    assert!(view.contains(&addr("asker")));
    assert!(view.contains(&addr("o1")));
    assert!(!view.contains(&addr(ME)), "never learns itself");
    assert_eq!(view.len(), 13);

    // With fewer known peers it returns what it has.
    let mut o = relay();
    o.handle(0, sampled(core_info(3), known[..2].to_vec()), &mut r);
    let (_, peers) = o.answer_sample(vec![asker], &mut r);
    assert_eq!(peers.len(), 3);
}

#[test]
fn the_view_never_exceeds_view_size_and_keeps_the_bootstrap() {
    let cfg = OverlayConfig {
        view_size: 4,
        ..OverlayConfig::default()
    };
    let mut r = rng(20);
    let mut o = relay_with(cfg.clone());
    for i in 0..60u32 {
        let batch: Vec<Peer> = (0..5)
            .map(|j| peer(&format!("n{i}-{j}"), Some(1 + j), 1, &["core", "m"]))
            .collect();
        if i % 2 == 0 {
            o.handle(
                u64::from(i),
                sampled(batch[0].clone(), batch[1..].to_vec()),
                &mut r,
            );
        } else {
            o.answer_sample(batch, &mut r);
        }
        if i % 7 == 0 {
            o.handle(u64::from(i) * 1000, Input::Tick, &mut r);
        }
        let view = o.view_addrs();
        assert!(view.len() <= cfg.view_size, "{view:?}");
        assert!(view.contains(&addr("core")), "{view:?}");
    }
    // The parent is kept too.
    let mut o = relay_with(cfg.clone());
    let p = peer("p", Some(1), 3, &["core", "p"]);
    o.handle(0, sampled(core_info(0), vec![p.clone()]), &mut r);
    o.handle(0, Input::Tick, &mut r);
    o.handle(0, attached(&p), &mut r);
    for i in 0..40 {
        let q = peer(&format!("q{i}"), Some(2), 1, &["core", "x", "q"]);
        o.handle(1, sampled(q, vec![]), &mut r);
        let view = o.view_addrs();
        assert!(view.len() <= cfg.view_size);
        assert!(view.contains(&addr("p")), "{view:?}");
    }
}

/// The view as the trim leaves it: each address with its age and sequence number.
fn view_state(o: &Overlay) -> Vec<(String, u32, u64, bool)> {
    o.view
        .iter()
        .map(|(a, e)| (a.clone(), e.age, e.seq, e.info.is_some()))
        .collect()
}

/// What `learn` did before a new entry took the dropped one's place: insert it, then trim.
fn learn_by_insert_and_trim(o: &mut Overlay, p: Peer) {
    if p.addr == o.addr || o.view.get(&p.addr).is_some() {
        return o.learn(p);
    }
    o.learned += 1;
    if o.parent.is_some() && o.next_rebalance > 1 && o.is_candidate(&p) {
        o.next_rebalance = 1;
    }
    let rec = ViewRecord {
        info: Some(p.clone()),
        boot: false,
        age: 0,
        seq: o.learned,
        rtt_us: None,
    };
    o.view.insert(p.addr.clone(), rec);
    o.trim();
}

#[test]
fn a_learned_peer_takes_the_place_the_trim_frees() {
    // Full and oversized views (more bootstrap addresses than view_size), with and
    // without a parent, the parent's own advert arriving when it has been forgotten.
    for (view_size, boots) in [(4, 1), (16, 1), (3, 5), (1, 1), (2, 2)] {
        for seed in 0..20u64 {
            let cfg = OverlayConfig {
                view_size,
                ..OverlayConfig::default()
            };
            let bootstrap: Vec<String> = (0..boots).map(|b| addr(&format!("b{b}"))).collect();
            let new = || {
                Overlay::new(
                    cfg.clone(),
                    ME.to_string(),
                    addr(ME),
                    false,
                    bootstrap.clone(),
                )
            };
            let (mut a, mut b) = (new(), new());
            let (mut ra, mut rb, mut pick) = (rng(seed), rng(seed), rng(seed + 1000));
            for step in 0..300u64 {
                let k = pick.random_range(0..24u32);
                let depth = pick.random_range(1..4u32);
                let p = if k == 0 {
                    peer(ME, Some(1), 1, &["b0", ME])
                } else {
                    peer(
                        &format!("n{k}"),
                        Some(depth),
                        k % 3,
                        &["b0", "x", &format!("n{k}")],
                    )
                };
                match pick.random_range(0..10u32) {
                    0 => {
                        let t = step * 10_000;
                        a.handle(t, Input::Tick, &mut ra);
                        b.handle(t, Input::Tick, &mut rb);
                    }
                    1 if a.parent.is_none() => {
                        let at = attached(&p);
                        a.handle(step, at.clone(), &mut ra);
                        b.handle(step, at, &mut rb);
                    }
                    2 => {
                        a.forget(&p.addr);
                        b.forget(&p.addr);
                    }
                    _ => {
                        a.learn(p.clone());
                        learn_by_insert_and_trim(&mut b, p);
                    }
                }
                assert_eq!(
                    view_state(&a),
                    view_state(&b),
                    "view_size {view_size}, seed {seed}, step {step}"
                );
                assert_eq!(a.next_rebalance, b.next_rebalance);
            }
        }
    }
}

/// `is_candidate` as it was before it could answer without reading the advert (with the
/// zone rule of the latency-aware choice).
fn is_candidate_reference(o: &Overlay, p: &Peer) -> bool {
    let Some(parent) = o.parent.as_ref() else {
        return o.is_eligible(p) && o.gains(o.landing(p).saturating_sub(1));
    };
    // With zones, a node whose parent is in its zone leaves it for depth only from more
    // than a level below the deepest room the cores advertised.
    if o.rank_of(parent.zone.as_ref()) == 0
        && o.cfg.latency_slack > 0
        && o.zone.is_some()
        && o.zone_rank(p) != 0
        && o.depth().is_some_and(|d| d <= o.landing_high + 1)
    {
        return false;
    }
    let floor = if o.core_landing == u32::MAX {
        0
    } else {
        o.core_landing
    };
    let landing = o.landing(p).max(floor);
    (p.free_slots > 0 || p.room > 0)
        && o.gains(landing.saturating_sub(1))
        && p.addr != parent.addr
        && o.is_eligible(p)
}

#[test]
fn is_candidate_answers_as_before_at_every_depth_and_core_landing() {
    let zone = |z: u32| Some(format!("z{z}"));
    let mut checked = 0;
    for mine in 1..8u32 {
        for landing in [u32::MAX, 0, 1, 2, 3, 5] {
            for (parent_zone, children) in [(zone(0), false), (zone(2), false), (None, true)] {
                let mut o = relay().with_zone(zone(0));
                let path: Vec<String> = (0..mine).map(|d| format!("a{d}")).collect();
                o.parent = Some(Parent {
                    addr: addr("a-parent"),
                    name: "a-parent".to_string(),
                    depth: mine - 1,
                    root_path: path.clone(),
                    zone: parent_zone.clone(),
                });
                o.core_landing = landing;
                o.landing_high = if landing == u32::MAX { 0 } else { landing };
                if children {
                    o.children.insert(
                        "kid".to_string(),
                        Child {
                            addr: addr("kid"),
                            zone: None,
                            report: None,
                        },
                    );
                }
                for depth in 0..8u32 {
                    for (free_slots, room) in [(0, 0), (0, 2), (3, 0)] {
                        for z in 0..2 {
                            let mut q =
                                (*peer(&format!("q{depth}"), Some(depth), free_slots, &["core"]))
                                    .clone();
                            q.room = room;
                            q.zone = zone(z);
                            let q = Peer::new(q);
                            assert_eq!(
                                o.is_candidate(&q),
                                is_candidate_reference(&o, &q),
                                "depth {mine}, core landing {landing}, {q:?}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 5000);
}

fn scripted(seed: u64) -> Vec<(u64, Output)> {
    let mut r = rng(seed);
    let mut peers = vec![core_info(0)];
    for i in 0..20u32 {
        let depth = 1 + i % 4;
        let mut path = vec!["core".to_string()];
        path.extend((1..depth).map(|d| format!("x{d}")));
        path.push(format!("w{i}"));
        peers.push(Peer::new(PeerInfo {
            name: format!("w{i}"),
            addr: addr(&format!("w{i}")),
            depth: Some(depth),
            free_slots: i % 3,
            root_path: path,
            height: 0,
            room: 0,
            zone: None,
            size: 0,
            held_for: Vec::new(),
        }));
    }
    let w: BTreeMap<String, Peer> = peers.iter().map(|p| (p.addr.clone(), p.clone())).collect();
    let mut o = relay();
    drive(
        &mut o,
        &w,
        &peers[..6],
        true,
        (0..400).map(|i| i * 100),
        &mut r,
    )
}

#[test]
fn the_same_seed_gives_the_same_outputs() {
    let a = scripted(42);
    assert!(a.len() > 6, "{a:?}");
    assert!(!attaches(&a).is_empty());
    assert_eq!(a, scripted(42));
    assert!((43..60).any(|seed| scripted(seed) != a));
}

#[test]
fn a_move_follows_only_referrals_that_still_gain_enough() {
    let mut r = rng(21);
    let (mut o, t) = moving(&mut r);
    assert_eq!(o.depth(), Some(4));
    // `q` (depth 1) is full and refers to its child at depth 2: the node would land at
    // depth 3, one level up, which is less than rebalance_min_gain (2).
    let out = o.handle(
        t + 1,
        Input::Refused {
            addr: addr("q"),
            referral: Some(peer("c", Some(2), 3, &["core", "q", "c"])),
        },
        &mut r,
    );
    assert_eq!(out, vec![]);
    assert_eq!(o.parent_addr(), Some(&addr("p")));
}

#[test]
fn a_late_attached_for_an_abandoned_attach_is_detached() {
    let mut r = rng(22);
    let a = peer("a", Some(1), 3, &["core", "a"]);
    let mut o = relay();
    o.handle(0, sampled(core_info(0), vec![a.clone()]), &mut r);
    assert_eq!(
        o.handle(0, Input::Tick, &mut r),
        vec![attach("a", false, Reason::Join)]
    );
    let timeout = o.config().attach_timeout_ms;
    // `a` timed out and is forgotten: the join starts again at the core.
    assert_eq!(
        o.handle(timeout, Input::Tick, &mut r),
        vec![attach("core", false, Reason::Join)]
    );
    o.handle(timeout + 2, attached(&core_info(8)), &mut r);
    assert_eq!(o.parent_addr(), Some(&addr("core")));
    // `a` finally accepts the attach the node gave up on.
    let out = o.handle(timeout + 3, attached(&a), &mut r);
    assert_eq!(out, vec![Output::Detach { addr: addr("a") }]);
    assert_eq!(o.parent_addr(), Some(&addr("core")));
    assert_eq!(o.reparents(), &BTreeMap::from([(Reason::Join, 1)]));
}

#[test]
fn a_parent_announcing_a_new_path_is_not_a_reparent() {
    let mut r = rng(23);
    let q = peer("q", Some(1), 3, &["core", "q"]);
    let (mut o, _) = deep(q, &mut r);
    // `p` moved up: it now sits at depth 1, and its heartbeats say so.
    let me = o.info().name.clone();
    o.update_path(&["core".to_string(), "p".to_string(), me]);
    assert_eq!(o.depth(), Some(2));
    assert_eq!(o.reparents(), &BTreeMap::from([(Reason::Join, 1)]));
}

#[test]
fn a_core_view_keeps_the_latest_offers() {
    let mut r = rng(24);
    let mut c = Overlay::new(
        OverlayConfig::default(),
        "core".to_string(),
        addr("core"),
        true,
        vec![addr("core")],
    );
    let size = c.config().view_size;
    // 100 relays offer themselves, newest last, over 100 s of core ticks; the newest
    // happen to have the lowest addresses.
    for i in (100..200).rev() {
        let t = (200 - i) * 1000;
        c.handle(t, Input::Tick, &mut r);
        c.answer_sample(
            vec![peer(&format!("p{i}"), Some(2), 3, &["core", "x"])],
            &mut r,
        );
    }
    let view = c.view_addrs();
    assert_eq!(view.len(), size);
    for i in 100..100 + size as u32 {
        assert!(
            view.contains(&addr(&format!("p{i}"))),
            "p{i} missing: {view:?}"
        );
    }
}

#[test]
fn a_relay_view_keeps_the_latest_peers_of_one_shuffle_period() {
    let mut r = rng(25);
    let mut o = relay_with(OverlayConfig {
        view_size: 4,
        ..OverlayConfig::default()
    });
    for i in (1..=9).rev() {
        let p = peer(&format!("p{i}"), Some(2), 1, &["core", "x", "p"]);
        o.handle(0, sampled(p, vec![]), &mut r);
    }
    assert_eq!(
        o.view_addrs(),
        vec![addr("core"), addr("p1"), addr("p2"), addr("p3")]
    );
}

#[test]
fn a_fruitless_probe_is_not_repeated_at_once() {
    let mut r = rng(26);
    let mut o = relay();
    assert_eq!(o.handle(0, Input::Tick, &mut r).len(), 1);
    // The core is full: the join starts there, and it refuses without a referral.
    assert_eq!(
        o.handle(1, sampled(core_info(0), vec![]), &mut r),
        vec![attach("core", false, Reason::Join)]
    );
    let out = o.handle(
        2,
        Input::Refused {
            addr: addr("core"),
            referral: None,
        },
        &mut r,
    );
    assert!(
        matches!(&out[..], [Output::RequestSample { .. }]),
        "{out:?}"
    );
    // The core knows nobody else: nothing new, so the next try waits.
    assert_eq!(o.handle(3, sampled(core_info(0), vec![]), &mut r), vec![]);
    assert_eq!(o.handle(4, Input::Tick, &mut r), vec![]);
}

#[test]
fn a_faulty_peer_is_not_chosen_until_its_ban_ends() {
    let mut r = rng(27);
    let mut o = relay();
    let p = peer("p", Some(1), 4, &["core", "p"]);
    o.handle(0, gossip(vec![p.clone()]), &mut r);
    assert_eq!(
        o.handle(0, Input::Faulty { addr: addr("p") }, &mut r),
        vec![]
    );
    let ban = o.config().faulty_ban_ms;
    let p_addr = addr("p");
    let to_p = |out: &[Output]| {
        out.iter()
            .any(|o| matches!(o, Output::Attach { addr: a, .. } if *a == p_addr))
    };
    // Until the ban ends it probes (the core cannot be reached) and never attaches to p.
    for t in (1..ban).step_by(700) {
        let out = o.handle(t, Input::Tick, &mut r);
        assert!(!to_p(&out), "t={t}: {out:?}");
        for o2 in out {
            if let Output::RequestSample { addr, .. } = o2 {
                let failed = o.handle(t, Input::SampleFailed { addr }, &mut r);
                assert!(!to_p(&failed), "t={t}: {failed:?}");
            }
        }
        o.handle(t, gossip(vec![p.clone()]), &mut r);
    }
    assert_eq!(
        o.handle(ban, Input::Tick, &mut r),
        vec![attach("p", false, Reason::Join)]
    );
}

#[test]
fn keeps_move_is_the_test_attached_applies() {
    let mut r = rng(28);
    let (mut o, t) = moving(&mut r);
    assert_eq!(o.depth(), Some(4));
    let path = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert!(o.keeps_move(1, &path(&["core", "q"])));
    assert!(
        !o.keeps_move(2, &path(&["core", "z", "q"])),
        "a gain of one"
    );
    assert!(
        !o.keeps_move(1, &path(&["core", ME, "q"])),
        "below the mover"
    );
    // What keeps_move refuses, Attached undoes.
    let out = o.handle(
        t + 1,
        Input::Attached {
            addr: addr("q"),
            name: "q".into(),
            depth: 2,
            root_path: path(&["core", "z", "q"]),
        },
        &mut r,
    );
    assert_eq!(out, vec![Output::Detach { addr: addr("q") }]);
}

fn zoned(name: &str, depth: u32, free_slots: u32, zone: &str) -> Peer {
    let mut path = vec!["core".to_string()];
    path.extend((1..depth).map(|d| format!("{name}-up{d}")));
    path.push(name.to_string());
    Peer::new(PeerInfo {
        name: name.to_string(),
        addr: addr(name),
        depth: Some(depth),
        free_slots,
        root_path: path,
        height: 0,
        room: 0,
        zone: Some(zone.to_string()),
        size: 0,
        held_for: Vec::new(),
    })
}

fn child_added(name: &str, zone: Option<&str>, report: Option<Report>) -> Input {
    Input::ChildAdded {
        name: name.to_string(),
        addr: addr(name),
        zone: zone.map(str::to_string),
        report,
    }
}

fn report(free_slots: u32, height: u32) -> Report {
    Report {
        free_slots,
        height,
        room: u32::from(free_slots == 0),
        size: 0,
    }
}

/// `joined` with `n` children c0.. registered, each reporting `(free, height)`.
fn parent_of(n: u32, each: Report, r: &mut ChaCha8Rng) -> Overlay {
    let mut o = joined(r);
    for i in 0..n {
        o.handle(3, child_added(&format!("c{i}"), None, Some(each)), r);
    }
    o
}

#[test]
fn children_set_free_slots_and_height_and_each_change_is_reported_up() {
    let mut r = rng(40);
    let mut o = joined(&mut r);
    assert_eq!(o.report(), LEAF);
    // The first child makes it one level high and takes a slot: the parent hears of it.
    assert_eq!(
        o.handle(3, child_added("a", None, None), &mut r),
        vec![Output::Report(report(7, 1))]
    );
    // A child reporting a subtree of height 2 makes this one 3 high.
    assert_eq!(
        o.handle(
            4,
            Input::ChildReport {
                name: "a".into(),
                report: report(6, 2),
            },
            &mut r
        ),
        vec![Output::Report(report(7, 3))]
    );
    assert_eq!((o.info().free_slots, o.info().height), (7, 3));
    // Nothing changed, nothing sent; a report from a stranger is ignored.
    assert_eq!(o.handle(5, Input::Tick, &mut r), vec![]);
    let stranger = Input::ChildReport {
        name: "zz".into(),
        report: report(0, 40),
    };
    assert_eq!(o.handle(5, stranger, &mut r), vec![]);
    // A lie is clamped.
    o.handle(
        6,
        Input::ChildReport {
            name: "a".into(),
            report: report(1000, u32::MAX),
        },
        &mut r,
    );
    assert_eq!(o.report().height, MAX_HEIGHT);
    assert_eq!(
        o.handle(7, Input::ChildRemoved { name: "a".into() }, &mut r),
        vec![Output::Report(LEAF)]
    );
    assert_eq!(o.children().count(), 0);
}

#[test]
fn an_unattached_node_reports_nothing_and_a_new_parent_hears_the_attach_report() {
    let mut r = rng(41);
    let mut o = relay();
    assert_eq!(o.handle(0, child_added("a", None, None), &mut r), vec![]);
    o.handle(0, Input::Tick, &mut r);
    let out = o.handle(1, sampled(core_info(8), vec![]), &mut r);
    // The subscription carries the report, so the attach itself sends no second one.
    assert_eq!(
        out,
        vec![Output::Attach {
            addr: addr("core"),
            moving: false,
            reason: Reason::Join,
            report: report(7, 1),
        }]
    );
    assert_eq!(o.handle(2, attached(&core_info(8)), &mut r), vec![]);
    // It changed while the attach was in flight: the parent hears the new one.
    let mut o = relay();
    o.handle(0, Input::Tick, &mut r);
    o.handle(1, sampled(core_info(8), vec![]), &mut r);
    o.handle(1, child_added("a", None, None), &mut r);
    assert_eq!(
        o.handle(2, attached(&core_info(8)), &mut r),
        vec![Output::Report(report(7, 1))]
    );
}

#[test]
fn children_changes_brings_the_registry_in_line_with_a_polled_table() {
    let mut r = rng(42);
    let mut o = parent_of(2, LEAF, &mut r);
    let table = vec![
        ("c1".to_string(), addr("c1")),
        ("n".to_string(), addr("n")),
        ("n".to_string(), addr("n")),
    ];
    let changes = o.children_changes(&table);
    assert_eq!(
        changes,
        vec![
            Input::ChildRemoved { name: "c0".into() },
            child_added("n", None, None)
        ]
    );
    for c in changes {
        o.handle(5, c, &mut r);
    }
    assert_eq!(o.children().cloned().collect::<Vec<_>>(), vec!["c1", "n"]);
    assert_eq!(o.children_changes(&table), vec![]);
}

#[test]
fn admit_refuses_itself_and_its_ancestors() {
    let mut r = rng(43);
    let o = joined(&mut r);
    for name in [ME, "core"] {
        assert_eq!(
            o.admit(&name.to_string(), None, &mut r),
            Admit::Refuse {
                reason: Refusal::OnRootPath,
                referral: None
            }
        );
    }
    assert_eq!(o.admit(&"x".to_string(), None, &mut r), Admit::Accept);
    assert_eq!(
        Refusal::OnRootPath.to_string(),
        "the subscriber is on this node's path to the core"
    );
}

/// A relay without a parent refuses every subscriber, its own children included, until it
/// is attached again: it could tell them neither their depth nor their path to the core.
#[test]
fn an_unattached_relay_refuses_subscribers_until_it_is_attached_again() {
    let mut r = rng(45);
    let unattached = Admit::Refuse {
        reason: Refusal::Unattached,
        referral: None,
    };
    let fresh = relay();
    assert_eq!(fresh.admit(&"x".to_string(), None, &mut r), unattached);
    let mut o = joined(&mut r);
    assert_eq!(o.admit(&"x".to_string(), None, &mut r), Admit::Accept);
    o.handle(3, child_added("x", None, None), &mut r);
    o.handle(4, Input::ParentLost { addr: addr("core") }, &mut r);
    assert_eq!(o.depth(), None);
    for name in ["x", "y"] {
        assert_eq!(
            o.admit(&name.to_string(), None, &mut r),
            unattached,
            "{name}"
        );
    }
    o.handle(5, attached(&core_info(8)), &mut r);
    assert_eq!(o.depth(), Some(1));
    assert_eq!(o.admit(&"y".to_string(), None, &mut r), Admit::Accept);
    assert_eq!(
        Refusal::Unattached.to_string(),
        "not attached to the tree (no parent)"
    );
}

#[test]
fn admit_accepts_up_to_the_fanout_then_refers_to_a_child_with_room() {
    let mut r = rng(44);
    let mut o = parent_of(7, report(0, 1), &mut r);
    assert_eq!(o.admit(&"x".to_string(), None, &mut r), Admit::Accept);
    o.handle(3, child_added("x", None, Some(report(3, 0))), &mut r);
    // Full: the one child with a free slot is the referral, every time.
    for seed in 0..20 {
        match o.admit(&"y".to_string(), None, &mut rng(seed)) {
            Admit::Refuse {
                reason:
                    Refusal::Full {
                        children: 8,
                        fanout: 8,
                    },
                referral: Some(p),
            } => {
                assert_eq!(p.name, "x");
                assert_eq!(p.addr, addr("x"));
                assert_eq!(p.depth, Some(2));
                assert_eq!(p.free_slots, 3);
                assert_eq!(p.root_path, vec!["core", ME, "x"]);
            }
            other => panic!("{other:?}"),
        }
    }
    // A registered child subscribing again is served on its own slot.
    assert_eq!(o.admit(&"c3".to_string(), None, &mut r), Admit::Accept);
    assert_eq!(
        Refusal::Full {
            children: 8,
            fanout: 8
        }
        .to_string(),
        "full: 8 children (fanout 8)"
    );
}

#[test]
fn a_full_parent_refers_to_an_unreported_child_before_a_full_one_and_any_when_all_are_full() {
    let mut r = rng(45);
    let mut o = parent_of(7, report(0, 2), &mut r);
    o.handle(3, child_added("new", None, None), &mut r);
    for seed in 0..20 {
        let Admit::Refuse {
            referral: Some(p), ..
        } = o.admit(&"y".to_string(), None, &mut rng(seed))
        else {
            panic!()
        };
        assert_eq!(p.name, "new");
    }
    o.handle(
        4,
        Input::ChildReport {
            name: "new".into(),
            report: report(0, 1),
        },
        &mut r,
    );
    let picked: BTreeSet<String> = (0..50)
        .map(
            |seed| match o.admit(&"y".to_string(), None, &mut rng(seed)) {
                Admit::Refuse {
                    referral: Some(p), ..
                } => p.name.clone(),
                other => panic!("{other:?}"),
            },
        )
        .collect();
    assert!(picked.len() > 4, "random among all: {picked:?}");
}

#[test]
fn a_referral_prefers_a_child_in_the_subscribers_zone_among_equal_room() {
    let mut r = rng(46);
    let mut o = joined(&mut r);
    for (i, zone) in ["a", "b", "a", "b", "c", "c", "a", "b"].iter().enumerate() {
        o.handle(
            3,
            child_added(&format!("c{i}"), Some(zone), Some(report(2, 0))),
            &mut r,
        );
    }
    for seed in 0..30 {
        let Admit::Refuse {
            referral: Some(p), ..
        } = o.admit(&"y".to_string(), Some(&"c".to_string()), &mut rng(seed))
        else {
            panic!()
        };
        assert_eq!(p.zone.as_deref(), Some("c"), "{p:?}");
    }
}

#[test]
fn a_node_with_a_subtree_moves_for_a_gain_of_one() {
    // The same place as a_deep_node_does_not_move_for_a_gain_of_one, but with a child.
    let mut r = rng(13);
    let q = peer("q", Some(2), 3, &["core", "z", "q"]);
    let (mut o, p) = deep(q.clone(), &mut r);
    o.handle(0, child_added("kid", None, Some(LEAF)), &mut r);
    let w = world(&[&core_info(0), &p, &q]);
    let log = drive(&mut o, &w, &[], false, (1..=600).map(|i| i * 100), &mut r);
    let moves = attaches(&log);
    assert!(
        matches!(moves.first(), Some((_, Output::Attach { addr: a, moving: true, reason: Reason::Rebalance, report: rep })) if *a == addr("q") && rep.height == 1),
        "{moves:?}"
    );
    assert!(o.keeps_move(2, &q.root_path));
    assert!(!o.keeps_move(3, &q.root_path));
    o.handle(0, Input::ChildRemoved { name: "kid".into() }, &mut r);
    assert!(!o.keeps_move(2, &q.root_path));
}

#[test]
fn an_orphan_with_a_subtree_weighs_every_target_it_knows() {
    // Three targets at depths 1, 3, 3: a leaf with d = 2 sometimes misses the shallow one;
    // a node with a child never does.
    let cands = vec![
        peer("a", Some(1), 2, &["core", "a"]),
        peer("b", Some(3), 2, &["core", "x", "y", "b"]),
        peer("c", Some(3), 2, &["core", "x", "y", "c"]),
    ];
    let picks = |with_child: bool| {
        let mut picked = BTreeMap::<String, usize>::new();
        for seed in 0..100 {
            let mut r = rng(seed);
            let mut o = relay();
            if with_child {
                o.handle(0, child_added("kid", None, Some(LEAF)), &mut r);
            }
            o.handle(0, gossip(cands.clone()), &mut r);
            match o.handle(0, Input::Tick, &mut r).as_slice() {
                [Output::Attach { addr, .. }] => *picked.entry(addr.clone()).or_default() += 1,
                other => panic!("{other:?}"),
            }
        }
        picked
    };
    assert!(picks(false).len() > 1);
    assert_eq!(picks(true), BTreeMap::from([(addr("a"), 100)]));
}

#[test]
fn a_lost_node_that_lands_deeper_checks_for_a_move_at_once() {
    let run = |with_child: bool, q_depth: u32| {
        let mut r = rng(47);
        let p = peer("p", Some(1), 2, &["core", "p"]);
        let q = zoned("q", q_depth, 2, "-");
        let mut o = relay();
        if with_child {
            o.handle(0, child_added("kid", None, Some(LEAF)), &mut r);
        }
        o.handle(0, gossip(vec![p.clone()]), &mut r);
        assert!(matches!(
            o.handle(0, Input::Tick, &mut r).as_slice(),
            [Output::Attach { addr: a, .. }] if *a == addr("p")
        ));
        o.handle(1, attached(&p), &mut r);
        // Settled: the first checks are drawn seconds away.
        o.handle(2_000, Input::Tick, &mut r);
        o.handle(4_000, Input::Tick, &mut r);
        assert_eq!(o.depth(), Some(2));
        o.handle(4_001, Input::ParentLost { addr: addr("p") }, &mut r);
        o.handle(4_001, gossip(vec![q.clone()]), &mut r);
        o.handle(4_001, Input::Tick, &mut r);
        o.handle(4_002, attached(&q), &mut r);
        assert_eq!(o.depth(), Some(q_depth + 1));
        o.poll_timeout()
    };
    assert!(run(true, 3) <= 4_002, "{}", run(true, 3));
    assert!(run(false, 3) <= 4_002, "{}", run(false, 3));
    // Back at the depth it had: nothing to look for before the timer.
    assert!(run(true, 1) > 5_000, "{}", run(true, 1));
}

#[test]
fn rtt_orders_candidates_of_equal_depth_and_never_beats_depth_without_slack() {
    let a = peer("a", Some(2), 2, &["core", "x", "a"]);
    let b = peer("b", Some(2), 2, &["core", "x", "b"]);
    let s = peer("s", Some(1), 2, &["core", "s"]);
    let first = |cfg: OverlayConfig, cands: Vec<Peer>, rtts: &[(&str, u64)]| {
        let mut r = rng(48);
        let mut o = relay_with(OverlayConfig { choices: 3, ..cfg });
        o.handle(0, gossip(cands), &mut r);
        for (n, rtt) in rtts {
            o.handle(
                0,
                Input::Rtt {
                    addr: addr(n),
                    rtt_us: *rtt,
                },
                &mut r,
            );
        }
        match o.handle(0, Input::Tick, &mut r).as_slice() {
            [Output::Attach { addr, .. }] => addr.clone(),
            other => panic!("{other:?}"),
        }
    };
    let d = OverlayConfig::default;
    // Without RTT the lower address wins a tie; a measured RTT reorders it.
    assert_eq!(first(d(), vec![a.clone(), b.clone()], &[]), addr("a"));
    assert_eq!(
        first(d(), vec![a.clone(), b.clone()], &[("a", 900), ("b", 300)]),
        addr("b")
    );
    // A shallower candidate wins whatever its RTT...
    let three = vec![a.clone(), b.clone(), s.clone()];
    assert_eq!(
        first(d(), three.clone(), &[("a", 100), ("s", 40_000)]),
        addr("s")
    );
    // ...whatever the latency_slack, which only ever favours a zone.
    let slack = OverlayConfig {
        latency_slack: 3,
        ..d()
    };
    assert_eq!(first(slack, three, &[("a", 100), ("s", 40_000)]), addr("s"));
}

#[test]
fn latency_slack_lets_a_peer_in_the_zone_a_level_deeper_win() {
    let pick = |slack: u32| {
        let mut r = rng(50);
        let mut o = relay_with(OverlayConfig {
            choices: 4,
            latency_slack: slack,
            ..OverlayConfig::default()
        })
        .with_zone(Some("b".to_string()));
        let cands = vec![
            zoned("a1", 1, 3, "a"),
            zoned("b2", 2, 1, "b"),
            zoned("b3", 3, 5, "b"),
        ];
        o.handle(0, gossip(cands), &mut r);
        match o.handle(0, Input::Tick, &mut r).as_slice() {
            [Output::Attach { addr, .. }] => addr.clone(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(pick(0), addr("a1"));
    assert_eq!(pick(1), addr("b2"));
    assert_eq!(pick(2), addr("b2"));
}

#[test]
fn a_peer_in_the_same_zone_beats_one_elsewhere_at_equal_depth() {
    let mut r = rng(49);
    let mut o = relay_with(OverlayConfig {
        choices: 4,
        ..OverlayConfig::default()
    })
    .with_zone(Some("b".to_string()));
    assert_eq!(o.info().zone.as_deref(), Some("b"));
    let cands = vec![
        zoned("a1", 2, 3, "a"),
        zoned("b1", 2, 1, "b"),
        zoned("c1", 2, 5, "c"),
        zoned("a2", 2, 4, "a"),
    ];
    o.handle(0, gossip(cands), &mut r);
    assert_eq!(
        o.handle(0, Input::Tick, &mut r),
        vec![Output::Attach {
            addr: addr("b1"),
            moving: false,
            reason: Reason::Join,
            report: LEAF
        }]
    );
}

#[test]
fn subtree_min_gain_and_rebalance_min_gain_must_be_positive() {
    for cfg in [
        OverlayConfig {
            subtree_min_gain: 0,
            ..OverlayConfig::default()
        },
        OverlayConfig {
            rebalance_min_gain: 0,
            ..OverlayConfig::default()
        },
    ] {
        assert!(matches!(cfg.validate(), Err(OverlayError::Zero(_))));
    }
    assert_eq!(OverlayConfig::default().validate(), Ok(()));
}

#[test]
fn a_node_more_than_a_level_below_the_cores_room_moves_as_soon_as_it_hears_of_it() {
    // As in a_deep_node_does_not_move_for_a_gain_of_one, but the core then says its
    // shallowest room is a level below it: a joiner would land at depth 2, this node is at 4.
    let mut r = rng(13);
    let q = peer("q", Some(2), 3, &["core", "z", "q"]);
    let (mut o, p) = deep(q.clone(), &mut r);
    let core = Peer::new(PeerInfo {
        room: 1,
        ..(*core_info(0)).clone()
    });
    let w = world(&[&core, &p, &q]);
    assert_eq!(drive(&mut o, &w, &[], true, [100], &mut r), vec![]);
    o.handle(150, sampled(core.clone(), vec![]), &mut r);
    assert!(o.poll_timeout() <= 150);
    let log = drive(&mut o, &w, &[], true, [200], &mut r);
    assert_eq!(
        attaches(&log),
        vec![(200, attach("core", true, Reason::Rebalance))]
    );
    // Refused without a referral: the core's room is not believed any more, and the node
    // waits for its timer again.
    assert!(o.poll_timeout() > 1_000, "{}", o.poll_timeout());
}

/// The place a zoned joiner picks among `cands` when the cores' room says a joiner lands at
/// `core_landing`.
fn zoned_pick(core_landing: u32, cands: Vec<Peer>) -> String {
    let mut r = rng(51);
    let mut o = relay_with(OverlayConfig {
        choices: 4,
        ..OverlayConfig::default()
    })
    .with_zone(Some("b".to_string()));
    o.handle(0, gossip(cands), &mut r);
    o.core_landing = core_landing;
    o.landing_high = if core_landing == u32::MAX {
        0
    } else {
        core_landing
    };
    match o.handle(0, Input::Tick, &mut r).as_slice() {
        [Output::Attach { addr, .. }] => addr.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_place_in_the_zone_wins_down_to_a_level_below_the_cores_room() {
    let cands = |b_depth: u32| vec![zoned("a1", 1, 3, "a"), zoned("b", b_depth, 2, "b")];
    // The cores' room at depth 4: a place in the zone landing at 5 wins over one elsewhere
    // landing at 2; one landing at 6 does not.
    assert_eq!(zoned_pick(4, cands(4)), addr("b"));
    assert_eq!(zoned_pick(4, cands(5)), addr("a1"));
    // Without the cores' room, only `latency_slack` (1) is given.
    assert_eq!(zoned_pick(u32::MAX, cands(2)), addr("b"));
    assert_eq!(zoned_pick(u32::MAX, cands(3)), addr("a1"));
}

#[test]
fn a_node_with_a_subtree_gets_less_depth_in_its_zone_by_its_height() {
    let mut r = rng(52);
    let mut o = relay_with(OverlayConfig {
        choices: 4,
        ..OverlayConfig::default()
    })
    .with_zone(Some("b".to_string()));
    o.handle(0, child_added("kid", Some("b"), Some(report(0, 1))), &mut r);
    (o.core_landing, o.landing_high) = (4, 4);
    // Height 2: a place in the zone may land at 3 (its subtree then ends at 5).
    assert_eq!(o.zone_fill(), 3);
    o.handle(
        0,
        gossip(vec![zoned("a1", 1, 3, "a"), zoned("b", 3, 2, "b")]),
        &mut r,
    );
    match o.handle(0, Input::Tick, &mut r).as_slice() {
        [Output::Attach { addr: a, .. }] => assert_eq!(*a, addr("a1")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_node_whose_parent_is_in_another_zone_moves_into_its_zone_down_to_the_fill_limit() {
    let mut r = rng(53);
    let mut o = in_b_below(&mut r, None, zoned("a1", 1, 3, "a"));
    assert_eq!(o.depth(), Some(2));
    (o.core_landing, o.landing_high) = (3, 3);
    // Down to a level below the cores' room (4): a place landing at 4 is taken, with the
    // current parent kept until it accepts.
    o.handle(2, gossip(vec![zoned("b", 3, 2, "b")]), &mut r);
    assert_eq!(o.nearer_place().map(|p| p.addr.clone()), Some(addr("b")));
    o.handle(2, gossip(vec![zoned("b", 4, 2, "b")]), &mut r);
    assert_eq!(o.nearer_place(), None);
}

#[test]
fn a_node_across_zones_checks_at_once_on_hearing_of_a_place_in_its_zone() {
    let mut r = rng(54);
    let mut o = in_b_below(&mut r, None, zoned("a1", 1, 3, "a"));
    o.handle(2_000, Input::Tick, &mut r);
    assert!(o.poll_timeout() > 2_001, "{}", o.poll_timeout());
    (o.core_landing, o.landing_high) = (3, 3);
    // A place in its zone two levels deeper than the old parent (within a level below the
    // cores' room): checked at the next tick, and taken make-before-break.
    o.handle(2_001, gossip(vec![zoned("b", 3, 2, "b")]), &mut r);
    assert!(o.poll_timeout() <= 2_001, "{}", o.poll_timeout());
    let out = o.handle(2_001, Input::Tick, &mut r);
    let attaches: Vec<&Output> = out
        .iter()
        .filter(|o| matches!(o, Output::Attach { .. }))
        .collect();
    assert_eq!(
        attaches,
        vec![&Output::Attach {
            addr: addr("b"),
            moving: true,
            reason: Reason::Rebalance,
            report: LEAF
        }]
    );
    // The new parent answers from where the view said: the move is kept.
    let path: Vec<String> = ["core", "b-up1", "b-up2", "b"].map(String::from).to_vec();
    assert!(o.keeps_move(3, &path));
}

#[test]
fn the_zone_fill_follows_the_deepest_room_the_cores_advertised() {
    let mut r = rng(55);
    let mut o = relay().with_zone(Some("b".to_string()));
    assert_eq!(o.zone_fill(), 0, "unknown before the cores speak");
    let core = |free_slots, room| {
        Peer::new(PeerInfo {
            room,
            zone: Some("a".to_string()),
            ..(*core_info(free_slots)).clone()
        })
    };
    o.handle(0, sampled(core(0, 3), vec![]), &mut r);
    assert_eq!((o.core_landing, o.zone_fill()), (4, 5));
    // A slot freed at the core for a moment lowers where joiners land, not the fill.
    o.handle(1, sampled(core(1, 0), vec![]), &mut r);
    assert_eq!((o.core_landing, o.zone_fill()), (1, 5));
    // Without a zone, or with latency_slack 0, zones have no say.
    let mut plain = relay_with(OverlayConfig {
        latency_slack: 0,
        ..OverlayConfig::default()
    })
    .with_zone(Some("b".to_string()));
    plain.handle(0, sampled(core(0, 3), vec![]), &mut r);
    assert_eq!(plain.zone_fill(), 0);
}

#[test]
fn sizes_round_down_to_four_significant_bits_and_the_bound_is_a_packed_trees_depth_plus_one() {
    let rounded: Vec<u32> = [0, 1, 15, 16, 17, 31, 33, 1000, u64::MAX]
        .map(round_size)
        .to_vec();
    assert_eq!(rounded, vec![0, 1, 15, 16, 16, 30, 32, 960, MAX_SIZE]);
    let bounds: Vec<u32> = [(1, 8), (8, 8), (9, 8), (1000, 8), (10_000, 8), (100_000, 8)]
        .map(|(n, k)| depth_bound(n, k))
        .to_vec();
    assert_eq!(bounds, vec![1, 2, 2, 5, 6, 7]);
    assert_eq!((depth_bound(1000, 4), depth_bound(5, 0)), (6, 3));
}

#[test]
fn a_filling_zoned_node_reports_its_subtree_size_and_others_only_what_children_report() {
    let mut r = rng(62);
    let sized = |size| Report {
        size,
        ..report(8, 1)
    };
    let mut o = filling().with_zone(Some("b".to_string()));
    assert_eq!(o.report().size, 1);
    o.handle(0, child_added("k1", Some("b"), Some(sized(8))), &mut r);
    o.handle(0, child_added("k2", Some("b"), Some(sized(6))), &mut r);
    assert_eq!(o.report().size, 15, "below 2^4: exact");
    // A child that has not reported counts one.
    o.handle(0, child_added("k3", Some("b"), None), &mut r);
    assert_eq!(o.report().size, 16);
    // 57 keeps 4 significant bits: 56.
    o.handle(0, child_added("k4", Some("b"), Some(sized(41))), &mut r);
    assert_eq!(o.report().size, 56);
    // Without zones, or without the setting, nothing is counted.
    let unset = relay().with_zone(Some("b".to_string()));
    assert_eq!(unset.report().size, 0);
    let mut plain = filling();
    assert_eq!(plain.report().size, 0);
    plain.handle(0, child_added("k1", None, Some(sized(0))), &mut r);
    assert_eq!(
        plain.report().size,
        0,
        "no zones below: no size, no extra report"
    );
    plain.handle(0, child_added("k2", None, Some(sized(5))), &mut r);
    assert_eq!(plain.report().size, 7);
}

/// A zoned relay with [`OverlayConfig::fill_zones_to_bound`].
fn filling() -> Overlay {
    relay_with(OverlayConfig {
        fill_zones_to_bound: true,
        ..OverlayConfig::default()
    })
}

#[test]
fn the_zone_fill_follows_the_depth_bound_of_the_size_the_cores_report() {
    let mut r = rng(63);
    let mut o = filling().with_zone(Some("b".to_string()));
    let core = |room, size| {
        Peer::new(PeerInfo {
            size,
            held_for: Vec::new(),
            ..(*zoned_core("a", room)).clone()
        })
    };
    // Room 3 levels below the core: a joiner lands at 4, so a leaf may hang down to 5.
    o.handle(0, sampled(core(3, 0), vec![]), &mut r);
    assert_eq!(o.zone_fill(), 5);
    // 10 000 nodes at fan-out 8: the bound is ceil(log8 10 000) + 1 = 6.
    o.handle(1, sampled(core(3, 10_000), vec![]), &mut r);
    assert_eq!(o.zone_fill(), 6);
    // A subtree of height 1 brought along may hang a level less deep.
    o.handle(1, child_added("kid", Some("b"), Some(report(8, 0))), &mut r);
    assert_eq!(o.zone_fill(), 5);
    // A tree that shrinks for a moment does not lower it.
    o.handle(2, sampled(core(3, 100), vec![]), &mut r);
    assert_eq!(o.zone_fill(), 5);
    // Without the setting, the cores' size has no say.
    let mut unset = relay().with_zone(Some("b".to_string()));
    unset.handle(0, sampled(core(3, 10_000), vec![]), &mut r);
    assert_eq!(unset.zone_fill(), 5);
    // An inflated size (relays report it and pass adverts on) moves it a level at most:
    // the bound of 2^24 nodes is 9, the room rule says 5 for a leaf.
    let mut o = filling().with_zone(Some("b".to_string()));
    o.handle(0, sampled(core(3, MAX_SIZE), vec![]), &mut r);
    assert_eq!(o.zone_fill(), 6);
    // Before the cores' room is known, zones have no say in depth.
    let mut o = filling().with_zone(Some("b".to_string()));
    assert_eq!(o.zone_fill(), 0);
    o.handle(0, sampled(core(0, 10_000), vec![]), &mut r);
    assert_eq!((o.core_landing, o.zone_fill()), (u32::MAX, 0));
}

/// A full core in `zone` whose shallowest room is `room` levels down.
fn zoned_core(zone: &str, room: u32) -> Peer {
    Peer::new(PeerInfo {
        name: "core".to_string(),
        addr: addr("core"),
        depth: Some(0),
        free_slots: 0,
        root_path: vec!["core".to_string()],
        height: room + 1,
        room,
        zone: Some(zone.to_string()),
        size: 0,
        held_for: Vec::new(),
    })
}

#[test]
fn a_place_in_a_cores_zone_beats_one_in_a_third_zone_at_equal_depth() {
    let pick = |core_zone_known: bool| {
        let mut r = rng(55);
        let mut o = relay_with(OverlayConfig {
            choices: 4,
            ..OverlayConfig::default()
        })
        .with_zone(Some("b".to_string()));
        if core_zone_known {
            o.handle(0, sampled(zoned_core("a", 4), vec![]), &mut r);
        }
        o.handle(
            0,
            gossip(vec![zoned("c1", 2, 5, "c"), zoned("a1", 2, 1, "a")]),
            &mut r,
        );
        match o.handle(0, Input::Tick, &mut r).as_slice() {
            [Output::Attach { addr, .. }] => addr.clone(),
            other => panic!("{other:?}"),
        }
    };
    // Without the core's zone the third zone's place wins on its free slots; with it, the
    // place in the core's zone, whose path crosses no zone, wins.
    assert_eq!(pick(false), addr("c1"));
    assert_eq!(pick(true), addr("a1"));
}

#[test]
fn a_node_below_a_third_zone_moves_to_a_cores_zone_no_deeper_than_now() {
    let mut r = rng(56);
    let mut o = in_b_below(&mut r, Some("a"), zoned("c1", 1, 3, "c"));
    assert_eq!(o.depth(), Some(2));
    // A place in the core's zone landing deeper than now is not taken; one landing where the
    // node hangs now is, and so is one in its own zone down to the fill.
    o.handle(2, gossip(vec![zoned("a3", 2, 2, "a")]), &mut r);
    assert_eq!(o.nearer_place(), None);
    o.handle(2, gossip(vec![zoned("a2", 1, 2, "a")]), &mut r);
    assert_eq!(o.nearer_place().map(|p| p.addr.clone()), Some(addr("a2")));
    o.handle(2, gossip(vec![zoned("b4", 4, 2, "b")]), &mut r);
    assert_eq!(o.nearer_place().map(|p| p.addr.clone()), Some(addr("b4")));
}

#[test]
fn a_node_below_a_cores_zone_moves_only_into_its_own() {
    let mut r = rng(57);
    let mut o = in_b_below(&mut r, Some("a"), zoned("a1", 2, 3, "a"));
    assert_eq!(o.depth(), Some(3));
    o.handle(
        2,
        gossip(vec![zoned("a2", 1, 2, "a"), zoned("c1", 1, 2, "c")]),
        &mut r,
    );
    assert_eq!(o.nearer_place(), None);
}

/// A joiner that sampled two equally shallow parents (the RTT of each handed over before its
/// answer, as the runtime does) takes the nearer one over the one with more free slots.
#[test]
fn a_joiner_takes_the_sampled_parent_with_the_lower_rtt() {
    let mut r = rng(58);
    let mut o = joiner_from_ra_rb();
    let asked: Vec<String> = o
        .handle(0, Input::Tick, &mut r)
        .into_iter()
        .filter_map(|out| match out {
            Output::RequestSample { addr, .. } => Some(addr),
            _ => None,
        })
        .collect();
    assert_eq!(asked, vec![addr("ra"), addr("rb")]);
    let ra = peer("ra", Some(1), 8, &["core", "ra"]);
    let rb = peer("rb", Some(1), 2, &["core", "rb"]);
    let mut core = (*core_info(0)).clone();
    core.room = 1;
    let core = Peer::new(core);
    o.handle(
        1,
        Input::Rtt {
            addr: addr("rb"),
            rtt_us: 300,
        },
        &mut r,
    );
    let out = o.handle(
        1,
        sampled(rb.clone(), vec![core.clone(), ra.clone()]),
        &mut r,
    );
    assert_eq!(out, vec![], "waits for the other answer");
    o.handle(
        2,
        Input::Rtt {
            addr: addr("ra"),
            rtt_us: 80_000,
        },
        &mut r,
    );
    let out = o.handle(2, sampled(ra, vec![core, rb]), &mut r);
    assert_eq!(out, vec![attach("rb", false, Reason::Join)]);
}

/// A joiner that tried a full node on a stale advert, and is referred to one of its
/// children, still takes a place as shallow that it measured nearer than that child.
#[test]
fn a_referral_gives_way_to_a_place_as_shallow_measured_nearer() {
    let joined_under = |rb_rtt: Option<u64>, rb_free: u32| {
        let mut r = rng(59);
        let mut o = joiner_from_ra_rb();
        o.handle(0, Input::Tick, &mut r);
        let ra = peer("ra", Some(1), 8, &["core", "ra"]);
        let rb = peer("rb", Some(1), rb_free, &["core", "rb"]);
        // The core's advert is stale: it says one slot is free.
        let stale_core = core_info(1);
        if let Some(rtt_us) = rb_rtt {
            o.handle(
                1,
                Input::Rtt {
                    addr: addr("rb"),
                    rtt_us,
                },
                &mut r,
            );
        }
        o.handle(1, sampled(rb.clone(), vec![stale_core.clone()]), &mut r);
        o.handle(
            2,
            Input::Rtt {
                addr: addr("ra"),
                rtt_us: 80_000,
            },
            &mut r,
        );
        let out = o.handle(2, sampled(ra.clone(), vec![stale_core]), &mut r);
        assert_eq!(out, vec![attach("core", false, Reason::Join)]);
        let out = o.handle(
            3,
            Input::Refused {
                addr: addr("core"),
                referral: Some(ra),
            },
            &mut r,
        );
        match out.as_slice() {
            [Output::Attach { addr, .. }] => addr.clone(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(joined_under(Some(300), 2), addr("rb"));
    // Unmeasured, or full, rb does not beat the referral.
    assert_eq!(joined_under(None, 2), addr("ra"));
    assert_eq!(joined_under(Some(300), 0), addr("ra"));
}

/// The place a referral gives way to is in a zone ranked as near as the referral's: a
/// zoned joiner referred into its own zone keeps that referral over a measured-nearer place
/// in a third zone, and takes such a place over a referral into a third zone.
#[test]
fn a_referral_gives_way_only_to_a_place_in_a_zone_ranked_as_near() {
    let joined_under = |referral_zone: &str| {
        let mut r = rng(61);
        let mut o = joiner_from_ra_rb().with_zone(Some("b".to_string()));
        o.handle(0, Input::Tick, &mut r);
        o.handle(
            1,
            Input::Rtt {
                addr: addr("rb"),
                rtt_us: 300,
            },
            &mut r,
        );
        o.handle(1, Input::SampleFailed { addr: addr("ra") }, &mut r);
        // The core's zone is not known (rank 2), rb's is a third one (rank 3): the core
        // comes first, on its stale advert of a free slot.
        let out = o.handle(
            2,
            sampled(zoned("rb", 1, 2, "c"), vec![core_info(1)]),
            &mut r,
        );
        assert_eq!(out, vec![attach("core", false, Reason::Join)]);
        let out = o.handle(
            3,
            Input::Refused {
                addr: addr("core"),
                referral: Some(zoned("ra", 1, 8, referral_zone)),
            },
            &mut r,
        );
        match out.as_slice() {
            [Output::Attach { addr, .. }] => addr.clone(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(joined_under("b"), addr("ra"), "its own zone outranks rb's");
    assert_eq!(joined_under("d"), addr("rb"), "a third zone, like rb's");
}

/// A move into a core's zone that answers deeper than its advert said (the advert was
/// stale) is undone: such a move may cost no depth, unlike one into the node's own zone.
#[test]
fn a_move_into_a_cores_zone_that_lands_deeper_is_undone() {
    let mut r = rng(60);
    let mut o = in_b_below(&mut r, Some("a"), zoned("c1", 1, 3, "c"));
    assert_eq!(o.depth(), Some(2));
    o.handle(2, gossip(vec![zoned("a2", 1, 2, "a")]), &mut r);
    assert_eq!(o.nearer_place().map(|p| p.addr.clone()), Some(addr("a2")));
    o.attach(3, addr("a2"), true, true, 0);
    let path: Vec<String> = ["core", "x", "a2"].map(String::from).to_vec();
    assert!(
        !o.keeps_move(2, &path),
        "a2 at depth 2 would put this node at 3"
    );
    assert!(o.keeps_move(1, &["core", "a2"].map(String::from)));
    let out = o.handle(
        4,
        Input::Attached {
            addr: addr("a2"),
            name: "a2".to_string(),
            depth: 2,
            root_path: path,
        },
        &mut r,
    );
    assert_eq!(out, vec![Output::Detach { addr: addr("a2") }]);
    assert_eq!(o.parent_addr(), Some(&addr("c1")));
}

/// A relay in zone "b" that joined below `parent` (a gossip and a tick at 0, the answer at 1),
/// having first heard of a core in `core_zone` with room 4 levels down, when given.
fn in_b_below(r: &mut ChaCha8Rng, core_zone: Option<&str>, parent: Peer) -> Overlay {
    let mut o = relay().with_zone(Some("b".to_string()));
    if let Some(zone) = core_zone {
        o.handle(0, sampled(zoned_core(zone, 4), vec![]), r);
    }
    o.handle(0, gossip(vec![parent.clone()]), r);
    o.handle(0, Input::Tick, r);
    o.handle(1, attached(&parent), r);
    o
}

/// A relay started from ra and rb alone, comparing every place it knows (3 choices).
fn joiner_from_ra_rb() -> Overlay {
    Overlay::new(
        OverlayConfig {
            choices: 3,
            ..OverlayConfig::default()
        },
        ME.to_string(),
        addr(ME),
        false,
        vec![addr("ra"), addr("rb")],
    )
}

/// A core keeping shares for zones a, b and c at fan-out 8.
fn core_with_shares(zones: &[&str]) -> Overlay {
    Overlay::new(
        OverlayConfig::default(),
        "core".to_string(),
        addr("core"),
        true,
        vec![],
    )
    .with_zone(Some("a".to_string()))
    .with_zone_shares(zones.iter().map(|z| z.to_string()).collect())
}

/// `o` admits `name` of `zone`, and the child is registered.
fn accept_child(o: &mut Overlay, name: &str, zone: &str, r: &mut ChaCha8Rng) {
    let z = zone.to_string();
    assert_eq!(
        o.admit(&name.to_string(), Some(&z), r),
        Admit::Accept,
        "{name}"
    );
    o.handle(1, child_added(name, Some(zone), Some(LEAF)), r);
}

#[test]
fn a_core_holds_a_share_of_its_slots_for_each_zone_until_the_zone_takes_it() {
    let mut r = rng(60);
    let mut o = core_with_shares(&["c", "a", "b", "a"]);
    let zone = |z: &str| Some(z.to_string());
    let info = o.info();
    assert_eq!(
        (info.free_slots, info.held_for.clone()),
        (2, vec!["a".to_string(), "b".into(), "c".into()]),
        "8 / 3 zones: 2 slots held for each, 2 open to all"
    );
    // Zone a takes its share and the two open slots.
    for name in ["a0", "a1", "a2", "a3"] {
        accept_child(&mut o, name, "a", &mut r);
    }
    let info = o.info();
    assert_eq!((info.free_slots, info.room), (0, 1));
    assert_eq!(info.held_for, vec!["b".to_string(), "c".into()]);
    // The rest are held for b and c: a fifth of zone a, or a relay with no zone, is
    // referred down, to a child of its own zone.
    for (name, z) in [("a4", zone("a")), ("n", None), ("d", zone("d"))] {
        match o.admit(&name.to_string(), z.as_ref(), &mut r) {
            Admit::Refuse {
                reason:
                    Refusal::HeldForOtherZones {
                        children: 4,
                        held: 4,
                    },
                referral: Some(p),
            } => assert!(p.name.starts_with('a'), "{p:?}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    // Zone b is admitted to its own share, and no further than its share plus what is left
    // once c's is held.
    for name in ["b0", "b1"] {
        accept_child(&mut o, name, "b", &mut r);
    }
    assert!(matches!(
        o.admit(&"b2".to_string(), zone("b").as_ref(), &mut r),
        Admit::Refuse {
            reason: Refusal::HeldForOtherZones { children: 6, held: 2 },
            referral: Some(p),
        } if p.zone.as_deref() == Some("b")
    ));
    assert_eq!(o.info().held_for, vec!["c".to_string()]);
    for name in ["c0", "c1"] {
        accept_child(&mut o, name, "c", &mut r);
    }
    assert!(o.info().held_for.is_empty());
    assert!(matches!(
        o.admit(&"c2".to_string(), zone("c").as_ref(), &mut r),
        Admit::Refuse {
            reason: Refusal::Full {
                children: 8,
                fanout: 8
            },
            ..
        }
    ));
    // A child of a zone that leaves gives its slot back to that zone alone.
    o.handle(4, Input::ChildRemoved { name: "b0".into() }, &mut r);
    assert_eq!(o.info().held_for, vec!["b".to_string()]);
    assert_eq!(o.info().free_slots, 0);
    assert!(matches!(
        o.admit(&"a9".to_string(), zone("a").as_ref(), &mut r),
        Admit::Refuse {
            reason: Refusal::HeldForOtherZones {
                children: 7,
                held: 1
            },
            ..
        }
    ));
    assert_eq!(
        Refusal::HeldForOtherZones {
            children: 7,
            held: 1
        }
        .to_string(),
        "the 1 free slots left are held for other zones (7 children)"
    );
}

#[test]
fn zone_shares_apply_to_cores_only_and_never_to_more_zones_than_the_fanout() {
    let relay = relay().with_zone_shares(vec!["a".into(), "b".into()]);
    assert!(relay.info().held_for.is_empty());
    let many: Vec<&str> = vec!["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    let core = core_with_shares(&many);
    assert_eq!(core.info().free_slots, 8);
    assert!(core.info().held_for.is_empty());
    let core = core_with_shares(&many[..8]);
    assert_eq!(core.info().free_slots, 0);
    assert_eq!(core.info().held_for.len(), 8);
}

#[test]
fn a_joiner_lands_on_a_slot_a_core_holds_for_its_zone() {
    let held_core = |held: &[&str]| {
        let mut info = (*zoned("core", 0, 0, "a")).clone();
        info.root_path = vec!["core".into()];
        info.room = 2;
        info.held_for = held.iter().map(|z| z.to_string()).collect();
        Peer::new(info)
    };
    let view = || {
        sampled(
            held_core(&["b", "c"]),
            vec![zoned("a1", 1, 3, "a"), zoned("b2", 2, 3, "b")],
        )
    };
    let joiner = |zone: &str| {
        relay_with(OverlayConfig {
            choices: 4,
            ..OverlayConfig::default()
        })
        .with_zone(Some(zone.to_string()))
    };
    // Zone b: the core holds a slot for it (landing 1), where b2 of its own zone lands at 3.
    let mut r = rng(61);
    let mut o = joiner("b");
    o.handle(0, view(), &mut r);
    assert_eq!(
        o.handle(1, Input::Tick, &mut r),
        vec![attach("core", false, Reason::Join)]
    );
    o.handle(2, attached(&held_core(&["b", "c"])), &mut r);
    assert_eq!(o.depth(), Some(1));
    // Zone a, whose share is taken, sees a full core whose room is 2 levels down: a1
    // (landing 2) wins.
    let mut o = joiner("a");
    o.handle(0, view(), &mut r);
    assert_eq!(
        o.handle(1, Input::Tick, &mut r),
        vec![attach("a1", false, Reason::Join)]
    );
    // A refusal takes the held slots out of the advert too: the joiner goes on to b2, a
    // level deeper in its own zone (within `latency_slack` of a1).
    let mut o = joiner("b");
    o.handle(0, view(), &mut r);
    o.handle(1, Input::Tick, &mut r);
    let out = o.handle(
        2,
        Input::Refused {
            addr: addr("core"),
            referral: None,
        },
        &mut r,
    );
    assert_eq!(out, vec![attach("b2", false, Reason::Join)]);
}

#[test]
fn relays_that_attach_together_shuffle_at_different_times_around_the_mean_period() {
    let base = OverlayConfig::default().shuffle_ms;
    let mut firsts = BTreeSet::new();
    for seed in 0..16 {
        let mut r = rng(300 + seed);
        let mut o = joined(&mut r);
        let mut times = Vec::new();
        for t in (1..=30_000).map(|i| i * 10) {
            let out = o.handle(t, Input::Tick, &mut r);
            if out
                .iter()
                .any(|x| matches!(x, Output::RequestSample { .. }))
            {
                times.push(t);
            }
        }
        assert!(times.len() >= 5, "seed {seed}: {times:?}");
        // Shuffle k waits the base period doubled k - 1 times (at most 64×), ±50 %; the first
        // counts from the first tick (at 0 ms, the attach is at 2). Ticks every 10 ms round
        // each wait up by less than 10 ms.
        let mut prev = 0;
        for (k, &t) in times.iter().enumerate() {
            let period = if k == 0 {
                base
            } else {
                base << (k as u32 - 1).min(MAX_SHUFFLE_DOUBLINGS)
            };
            let wait = t - prev;
            assert!(
                wait >= period / 2 && wait < period / 2 + period + 12,
                "seed {seed}: shuffle {k} after {wait} ms, period {period}: {times:?}"
            );
            prev = t;
        }
        firsts.insert(times[0]);
    }
    assert!(firsts.len() >= 12, "{firsts:?}");
    let spread = firsts.last().unwrap() - firsts.first().unwrap();
    assert!(spread >= base / 2, "{firsts:?}");
}
