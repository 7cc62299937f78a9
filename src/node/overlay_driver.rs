//! Drives the overlay state machine for a node: feeds it inputs as they happen, ticks it at
//! its own deadline (`Overlay::poll_timeout`, as topology-sim does), and carries out its
//! outputs.
//!
//! Invariants:
//! - Every input goes through [`input`] (or [`answer_sample`]), under the overlay lock, and
//!   its outputs are queued in order to the one driver task, which sends sample requests and
//!   hands attach and detach commands to the upstream follower.
//! - After every input the driver recomputes its deadline, so no fixed tick is needed.
//! - The RNG is seeded from `NodeConfig::seed` when given, otherwise from the name and the
//!   clock; either way the seed is logged, and `--seed` replays it.

use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::overlay::{Input, Output, Peer, PeerInfo};
use crate::proto::{self, request};
use crate::wire::WireError;

use super::error::NodeError;
use super::inspect::MAX_TREE_DEPTH;
use super::shared::{now_us, Shared, UpstreamCommand};

/// Ticks never come closer together than this, whatever the overlay's deadline says. The
/// first tick is not held back by it: a node starting with a peer to join acts at once.
const MIN_TICK: Duration = Duration::from_millis(10);

/// Converts between the overlay's and the wire's peer descriptions.
pub fn peer_to_proto(p: &PeerInfo) -> proto::PeerInfo {
    proto::PeerInfo {
        name: p.name.clone(),
        addr: p.addr.clone(),
        depth: p.depth.map(|d| d as i32).unwrap_or(-1),
        free_slots: p.free_slots,
        root_path: p.root_path.clone(),
        height: p.height,
        room: p.room,
        zone: p.zone.clone().unwrap_or_default(),
        size: p.size,
        held_for: p.held_for.clone(),
    }
}

/// A zone as a peer declared it: none when empty or over
/// [`crate::config::MAX_ZONE_BYTES`].
pub fn zone_from_proto(zone: String) -> Option<String> {
    (!zone.is_empty() && zone.len() <= crate::config::MAX_ZONE_BYTES).then_some(zone)
}

/// Most zones a peer may say a core holds slots for ([`PeerInfo::held_for`]): a core keeps
/// shares for at most `fanout` zones, and no fan-out in use comes near 64.
pub const MAX_HELD_ZONES: usize = 64;

/// Zones a peer says a core holds slots for: none when over [`MAX_HELD_ZONES`] or when one
/// of them is not a zone name ([`zone_from_proto`]); sorted.
pub fn held_from_proto(zones: Vec<String>) -> Vec<String> {
    if zones.len() > MAX_HELD_ZONES {
        return Vec::new();
    }
    let mut zones: Vec<String> = zones
        .into_iter()
        .map(zone_from_proto)
        .collect::<Option<_>>()
        .unwrap_or_default();
    zones.sort();
    zones.dedup();
    zones
}

/// A report as a child declared it, its height and room clamped to [`overlay::MAX_HEIGHT`].
pub fn report_from_proto(r: &proto::ChildReport) -> crate::overlay::Report {
    crate::overlay::Report {
        free_slots: r.free_slots,
        height: r.height.min(crate::overlay::MAX_HEIGHT),
        room: r.room.min(crate::overlay::MAX_HEIGHT),
        size: r.size.min(crate::overlay::MAX_SIZE),
    }
}

/// The wire form of a report.
pub fn report_to_proto(r: &crate::overlay::Report) -> proto::ChildReport {
    proto::ChildReport {
        free_slots: r.free_slots,
        height: r.height,
        room: r.room,
        size: r.size,
    }
}

/// Longest node name accepted from a peer (names are at most 64 characters).
pub(crate) const MAX_NAME_LEN: usize = 64;
/// Longest address accepted from a peer (`host:port`).
pub(crate) const MAX_ADDR_LEN: usize = 255;

/// Whether `a` may be an address (not empty, at most [`MAX_ADDR_LEN`] bytes).
pub(crate) fn addr_sane(a: &str) -> bool {
    !a.is_empty() && a.len() <= MAX_ADDR_LEN
}

/// Whether a peer description is within bounds: its name, address and path names at most
/// as long as any node's. Others are dropped before the overlay sees them (they would be
/// passed on to other peers).
pub fn peer_sane(p: &proto::PeerInfo) -> bool {
    p.name.len() <= MAX_NAME_LEN
        && addr_sane(&p.addr)
        && p.root_path.iter().all(|n| n.len() <= MAX_NAME_LEN)
}

/// A peer as another node described it. A depth of [`MAX_TREE_DEPTH`] or more, or a root
/// path longer than that allows, is not believed: the peer counts as unattached (so no
/// depth arithmetic ever runs on a value near `u32::MAX`).
pub fn peer_from_proto(p: proto::PeerInfo) -> Peer {
    let sane = p.root_path.len() <= MAX_TREE_DEPTH as usize + 1;
    let depth = u32::try_from(p.depth)
        .ok()
        .filter(|d| *d < MAX_TREE_DEPTH && sane);
    Peer::new(PeerInfo {
        name: p.name,
        addr: p.addr,
        depth,
        free_slots: p.free_slots,
        root_path: if sane { p.root_path } else { Vec::new() },
        height: p.height.min(crate::overlay::MAX_HEIGHT),
        room: p.room.min(crate::overlay::MAX_HEIGHT),
        zone: zone_from_proto(p.zone),
        size: p.size.min(crate::overlay::MAX_SIZE),
        held_for: held_from_proto(p.held_for),
    })
}

/// The overlay's RNG: from `seed` when given, otherwise from the name and the clock. The seed
/// is logged either way, so `--seed` replays a run.
pub(crate) fn rng(name: &str, seed: Option<u64>) -> ChaCha8Rng {
    let seed = seed.unwrap_or_else(|| {
        let h = blake3::hash(format!("{name}/{}", now_us()).as_bytes());
        u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
    });
    info!(node = %name, seed, "overlay rng seed (replay with --seed)");
    ChaCha8Rng::seed_from_u64(seed)
}

/// Feeds one input to the overlay now and queues its outputs for the driver.
pub(crate) fn input(shared: &Shared, input: Input) {
    let outputs = {
        let mut cell = shared.overlay.lock();
        let now = cell.now_ms();
        let cell = &mut *cell;
        cell.overlay.handle(now, input, &mut cell.rng)
    };
    for out in outputs {
        let _ = shared.overlay_out.send(out);
    }
    shared.overlay_wake.notify_one();
}

/// Answers a peer's sample request (its `offer` goes into the view).
pub(crate) fn answer_sample(shared: &Shared, offer: Vec<Peer>) -> (Peer, Vec<Peer>) {
    let answer = {
        let mut cell = shared.overlay.lock();
        let cell = &mut *cell;
        cell.overlay.answer_sample(offer, &mut cell.rng)
    };
    shared.overlay_wake.notify_one();
    answer
}

/// Runs until shutdown: ticks at the overlay's deadline, and carries out its outputs.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut outputs: mpsc::UnboundedReceiver<Output>,
    cmds: mpsc::UnboundedSender<UpstreamCommand>,
) {
    let mut last_tick: Option<tokio::time::Instant> = None;
    loop {
        let deadline = {
            let cell = shared.overlay.lock();
            let at = cell.start + Duration::from_millis(cell.overlay.poll_timeout());
            next_tick(tokio::time::Instant::from_std(at), last_tick)
        };
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            out = outputs.recv() => match out {
                Some(out) => carry_out(&shared, out, &cmds),
                None => return,
            },
            _ = shared.overlay_wake.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {
                last_tick = Some(tokio::time::Instant::now());
                input(&shared, Input::Tick);
            }
        }
    }
}

/// When to tick next: at the overlay's deadline `at`, but no sooner than [`MIN_TICK`] after
/// the last tick, if there was one.
fn next_tick(
    at: tokio::time::Instant,
    last_tick: Option<tokio::time::Instant>,
) -> tokio::time::Instant {
    last_tick.map_or(at, |t| at.max(t + MIN_TICK))
}

fn carry_out(shared: &Arc<Shared>, out: Output, cmds: &mpsc::UnboundedSender<UpstreamCommand>) {
    match out {
        Output::RequestSample { addr, offer } => {
            shared.metrics.overlay_message("sample_request");
            let s = shared.clone();
            shared.tasks.spawn(async move {
                let answer = match request_sample(&s, &addr, offer).await {
                    Ok((info, peers, rtt, conn)) => {
                        s.metrics.samples.increment(1);
                        let unattached =
                            !s.cfg.is_core() && s.overlay.lock().overlay.parent_addr().is_none();
                        if unattached {
                            super::net::keep_sampled(&s, &addr, conn, kept_for(&s));
                        }
                        input(
                            &s,
                            Input::Rtt {
                                addr: addr.clone(),
                                rtt_us: u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX),
                            },
                        );
                        Input::Sampled { addr, info, peers }
                    }
                    Err(e) => {
                        if !super::net::explain_certificate_failure(&s, &addr, &e) {
                            warn!(node = %s.cfg.name, peer = %addr, "sample failed: {e}");
                        }
                        Input::SampleFailed { addr }
                    }
                };
                input(&s, answer);
            });
        }
        Output::Attach { addr, reason, .. } => {
            super::net::drop_sampled_except(shared, &addr);
            let _ = cmds.send(UpstreamCommand::Attach { addr, reason });
        }
        Output::Detach { addr } => {
            let _ = cmds.send(UpstreamCommand::Detach { addr });
        }
        Output::Report(r) => {
            let _ = cmds.send(UpstreamCommand::Report(r));
        }
    }
}

/// How long an unattached node keeps a sample's connection for its attach: twice
/// `overlay.probe_timeout_ms`. The first answer of a probe may come that long before the
/// last, and the attach follows the last at once.
fn kept_for(shared: &Shared) -> Duration {
    Duration::from_millis(shared.cfg.overlay.probe_timeout_ms.saturating_mul(2))
}

/// Asks `addr` for a sample; returns its answer, QUIC's estimate of the round trip to it, and
/// the connection.
async fn request_sample(
    shared: &Shared,
    addr: &str,
    offer: Vec<Peer>,
) -> Result<(Peer, Vec<Peer>, Duration, quinn::Connection), NodeError> {
    let timeout = Duration::from_millis(shared.cfg.overlay.probe_timeout_ms);
    let ask = async {
        let conn = super::net::connect(shared, addr).await?;
        let reply = super::net::request::<proto::SampleReply>(
            shared,
            &conn,
            request::Kind::Sample(proto::Sample {
                offer: offer.iter().map(|p| peer_to_proto(p)).collect(),
            }),
        )
        .await?;
        Ok::<_, NodeError>((reply, conn))
    };
    let (r, conn) =
        tokio::time::timeout(timeout, ask)
            .await
            .map_err(|_| NodeError::Connect {
                addr: addr.to_string(),
                reason: "sample timed out".into(),
            })??;
    let info = r
        .info
        .filter(peer_sane)
        .map(peer_from_proto)
        .ok_or(NodeError::Wire(WireError::Malformed("sample reply")))?;
    let peers = r.peers.into_iter().filter(peer_sane).map(peer_from_proto);
    Ok((info, peers.collect(), conn.rtt(), conn))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node starting with a peer to join (a deadline already due) ticks at once; after
    /// that, ticks are at least `MIN_TICK` apart, and a later deadline is kept.
    #[test]
    fn the_first_tick_is_not_held_back_and_later_ones_are_spaced() {
        let t0 = tokio::time::Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(next_tick(t0, None), t0);
        assert_eq!(next_tick(t0 + ms(3), None), t0 + ms(3));
        assert_eq!(next_tick(t0, Some(t0)), t0 + MIN_TICK);
        assert_eq!(next_tick(t0 + ms(500), Some(t0)), t0 + ms(500));
    }

    /// What peers declare about the tree is bounded before the overlay sees it: zones longer
    /// than `MAX_ZONE_BYTES` (or empty) count as none, heights and rooms are clamped to
    /// `MAX_HEIGHT` and subtree sizes to `MAX_SIZE`, whether they come in an advert or in a
    /// child's report. A list of zones a core holds slots for counts as none when it is
    /// longer than `MAX_HELD_ZONES` or names something that is not a zone.
    #[test]
    fn declared_zones_heights_rooms_and_sizes_are_bounded() {
        let max = crate::config::MAX_ZONE_BYTES;
        let held = |zs: &[String]| held_from_proto(zs.to_vec());
        assert_eq!(held(&["b".into(), "a".into(), "b".into()]), ["a", "b"]);
        assert!(held(&["a".into(), String::new()]).is_empty());
        assert!(held(&["a".into(), "z".repeat(max + 1)]).is_empty());
        let many: Vec<String> = (0..MAX_HELD_ZONES).map(|i| format!("z{i:02}")).collect();
        assert_eq!(held(&many).len(), MAX_HELD_ZONES);
        assert_eq!(zone_from_proto(String::new()), None);
        assert_eq!(zone_from_proto("z".repeat(max + 1)), None);
        assert_eq!(zone_from_proto("z".repeat(max)), Some("z".repeat(max)));
        let huge = proto::ChildReport {
            free_slots: u32::MAX,
            height: u32::MAX,
            room: u32::MAX,
            size: u32::MAX,
        };
        let r = report_from_proto(&huge);
        assert_eq!(
            (r.height, r.room, r.size),
            (
                crate::overlay::MAX_HEIGHT,
                crate::overlay::MAX_HEIGHT,
                crate::overlay::MAX_SIZE
            )
        );
        let p = peer_from_proto(proto::PeerInfo {
            name: "p".into(),
            addr: "127.0.0.1:1".into(),
            depth: 1,
            free_slots: 0,
            root_path: vec!["c".into(), "p".into()],
            height: u32::MAX,
            room: u32::MAX,
            zone: "z".repeat(1 << 16),
            size: u32::MAX,
            held_for: (0..=MAX_HELD_ZONES).map(|i| format!("z{i}")).collect(),
        });
        assert_eq!(
            (p.height, p.room, p.zone.clone(), p.size, p.held_for.len()),
            (
                crate::overlay::MAX_HEIGHT,
                crate::overlay::MAX_HEIGHT,
                None,
                crate::overlay::MAX_SIZE,
                0
            )
        );
    }
}
