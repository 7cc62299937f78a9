//! `relay-path`: one relay's receive-apply-forward path on a fixed input, for counting its
//! instructions under callgrind (`bench/callgrind-relay`), where wall-clock timing on a
//! shared machine is noise.
//!
//! A core's replica (`Trust::Sign`, a real core certificate) holds a `--file-size` file of
//! seeded random bytes and commits `--writes` writes of `--write-bytes` bytes at seeded
//! offsets, one Raft index each; the frames it broadcasts (entry, seal, and a checkpoint
//! every `checkpoint_every` entries, as a core sends them down) are the input. A relay's
//! replica (`Trust::Verify`, a relay certificate, the core's signer learnt) starts from the
//! same file under the core's seal, resumed, and then [`receive_apply_forward`] takes the
//! input frame by frame as a relay's node does: copies the frame out of the received bytes
//! as `transport::read_raw` does, decodes it, hands it to the replica, queues every frame
//! the replica forwards on each of `--fanout` child channels (tokio unbounded channels, as
//! the node's broadcast does) and publishes every applied version on a watch. Sending on
//! QUIC, the tokio tasks and the materializer are outside it.
//!
//! Invariants: the input depends only on the arguments (seeded); the instructions counted are
//! those of [`receive_apply_forward`] alone (callgrind's `--toggle-collect` on it); the run
//! fails unless the relay ends at the core's version and root and every child received
//! exactly the core's frames, byte for byte, in order.
//!
//! Prints one JSON object: the input, the deliveries, and the wall time of the path (native
//! runs only; meaningless under callgrind).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{anyhow, bail, ensure, Context};
use bytes::{Buf, Bytes, BytesMut};
use clap::Parser;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use canopy::config::StreamConfig;
use canopy::file::{ChunkedFile, Op, Update};
use canopy::proto::{self, downstream::Kind as Down};
use canopy::replica::{Event, Replica, SubscribePlan, Trust};
use canopy::tls::{self, Identity, Role};
use canopy::trust::{Sealer, Verifier};
use canopy::wire::{self, RawFrame, PREFIX_LEN};

#[derive(Parser, Debug)]
#[command(version = canopy_bench::VERSION, about = "One relay's receive-apply-forward path on a fixed, seeded input")]
struct Args {
    /// Size of the file, e.g. 1MB, 50MB.
    #[arg(long, default_value = "1MB", value_parser = canopy::measure::parse_size)]
    file_size: u64,
    /// Writes the core commits (one entry each).
    #[arg(long, default_value_t = 1000)]
    writes: usize,
    /// Bytes per write.
    #[arg(long, default_value_t = 100)]
    write_bytes: usize,
    /// Children the relay forwards to.
    #[arg(long, default_value_t = 8)]
    fanout: usize,
    /// Seed of the file and the writes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The core's key kind (whose seal the relay verifies on every entry): ed25519 or p256.
    #[arg(long, default_value = "ed25519")]
    key: tls::KeyAlg,
    /// Entries found queued at once, as by a relay behind its parent: before each entry that
    /// nothing is queued behind, the next `2 x burst` frames are taken and their seals
    /// checked as a chain, as the node's follower does (`Verifier::check_chain`). 1: every
    /// frame as it comes, a relay keeping up.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    burst: u32,
}

/// What the path did.
struct Delivered {
    frames: usize,
    entries: usize,
    applied: usize,
    /// Seals proven through a chain ([`canopy::trust::Verifier::check_chain`]).
    chained: usize,
}

/// The measured path: every frame of `input` through the relay and out to `children`, with
/// the seals of up to `burst` queued entries checked as a chain first.
#[inline(never)]
fn receive_apply_forward(
    relay: &mut Replica,
    input: &Bytes,
    max_frame: usize,
    burst: usize,
    children: &[mpsc::UnboundedSender<Bytes>],
    applied: &watch::Sender<(u64, u64)>,
) -> anyhow::Result<Delivered> {
    let mut rest = input.clone();
    let mut d = Delivered {
        frames: 0,
        entries: 0,
        applied: 0,
        chained: 0,
    };
    let mut queued: VecDeque<(RawFrame, proto::Downstream)> = VecDeque::new();
    loop {
        let (raw, msg) = match queued.pop_front() {
            Some(f) => f,
            None if rest.has_remaining() => next_frame(&mut rest, max_frame)?,
            None => break,
        };
        if matches!(msg.kind, Some(Down::Entry(_))) {
            d.entries += 1;
            if burst > 1 && queued.is_empty() {
                while queued.len() < 2 * burst - 1 && rest.has_remaining() {
                    queued.push_back(next_frame(&mut rest, max_frame)?);
                }
                let frames = std::iter::once((&raw.frame, &msg))
                    .chain(queued.iter().map(|(r, m)| (&r.frame, m)));
                let seals = canopy::trust::queued_seals(frames);
                if seals.len() >= 2 {
                    if let Some(v) = relay.verifier().cloned() {
                        d.chained += v.check_chain(&seals);
                    }
                }
            }
        }
        d.frames += 1;
        for ev in relay.handle_downstream(raw.frame, msg)? {
            match ev {
                Event::Broadcast(f) => {
                    for c in children {
                        c.send(f.clone()).map_err(|_| anyhow!("child gone"))?;
                    }
                }
                Event::Applied {
                    version,
                    commit_time_us,
                } => {
                    applied.send_replace((version, commit_time_us));
                    d.applied += 1;
                }
                Event::CheckpointVerified { .. } => {}
                other => bail!("unexpected event {other:?}"),
            }
        }
    }
    Ok(d)
}

/// The next frame of `rest`, copied out of the received bytes as `transport::read_raw`
/// does, and decoded.
fn next_frame(rest: &mut Bytes, max_frame: usize) -> anyhow::Result<(RawFrame, proto::Downstream)> {
    ensure!(rest.len() >= PREFIX_LEN, "truncated prefix");
    let len = u32::from_be_bytes(rest[..PREFIX_LEN].try_into()?) as usize;
    ensure!(len <= max_frame, "frame of {len} bytes over {max_frame}");
    ensure!(rest.len() >= PREFIX_LEN + len, "truncated frame");
    let mut frame = BytesMut::with_capacity(PREFIX_LEN + len);
    frame.extend_from_slice(&rest[..PREFIX_LEN + len]);
    rest.advance(PREFIX_LEN + len);
    let raw = RawFrame {
        frame: frame.freeze(),
    };
    let msg: proto::Downstream = raw.decode()?;
    Ok((raw, msg))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.writes >= 1 && args.fanout >= 1,
        "--writes and --fanout must be positive"
    );
    ensure!(
        args.write_bytes >= 1 && (args.write_bytes as u64) < args.file_size,
        "--write-bytes must be 1 .. --file-size"
    );
    let stream = StreamConfig::default();
    let cfg = stream.replica();
    ensure!(args.file_size <= cfg.max_len, "--file-size over max_len");

    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca");
    tls::ca_init_with(&ca, args.key)?;
    tls::cert_issue_with(
        &ca,
        "core-0",
        Role::Core,
        dir.path(),
        tls::NODE_VALIDITY,
        args.key,
    )?;
    tls::cert_issue(&ca, "relay-0", Role::Relay, dir.path())?;
    let core_id = Arc::new(Identity::load(dir.path(), "core-0")?);
    let relay_id = Arc::new(Identity::load(dir.path(), "relay-0")?);

    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut content = vec![0u8; args.file_size as usize];
    rng.fill_bytes(&mut content);
    let mut file = ChunkedFile::new(cfg.chunk_size, cfg.max_len)?;
    file.apply(
        1,
        &Update {
            ops: vec![Op::Write {
                offset: 0,
                data: Bytes::from(content),
            }],
        },
    )?;

    let mut core = Replica::new(
        cfg.clone(),
        Trust::Sign {
            sealer: Sealer::new(&core_id)?,
            verifier: Verifier::new(core_id.clone()),
        },
    )?
    .with_name("core-0");
    core.install(file.clone());
    let mut relay = Replica::new(cfg.clone(), Trust::Verify(Verifier::new(relay_id)))
        .map_err(|e| anyhow!("{e}"))?;
    let signer = Bytes::copy_from_slice(core_id.cert_der());
    relay.learn_signers(&[signer], SystemTime::now());
    ensure!(
        relay.seed(file, core.anchor().cloned())?,
        "the relay does not trust the core's seal of the file"
    );
    let sub = relay.subscribe("relay-0", "127.0.0.1:1", false);
    match core.plan_subscription(&sub) {
        SubscribePlan::Resume(frames) if frames.is_empty() => {}
        _ => bail!("the core does not resume the relay at its version"),
    }
    let ok = proto::Downstream {
        kind: Some(Down::SubscribeOk(proto::SubscribeOk {
            parent_name: "core-0".into(),
            resume: true,
            chunk_size: cfg.chunk_size,
            ..Default::default()
        })),
    };
    relay.handle_downstream(wire::encode(&ok), ok)?;

    // The input: what the core sends down for each committed write.
    const T0_US: u64 = 1_700_000_000_000_000;
    let mut input = BytesMut::new();
    let mut version = 1;
    for k in 0..args.writes {
        let offset = rng.random_range(0..args.file_size - args.write_bytes as u64);
        let mut data = vec![0u8; args.write_bytes];
        rng.fill_bytes(&mut data);
        let update = Update {
            ops: vec![Op::Write {
                offset,
                data: Bytes::from(data),
            }],
        };
        let proposal = proto::Proposal {
            update: Some((&update).into()),
            ..Default::default()
        };
        version = 2 + k as u64;
        let (_, events) = core.apply_committed(version, &proposal, T0_US + k as u64 * 50_000);
        for ev in events {
            if let Event::Broadcast(f) = ev {
                input.extend_from_slice(&f);
            }
        }
    }
    let input = input.freeze();

    let mut rxs = Vec::new();
    let children: Vec<_> = (0..args.fanout)
        .map(|_| {
            let (tx, rx) = mpsc::unbounded_channel();
            rxs.push(rx);
            tx
        })
        .collect();
    let (applied, _applied_rx) = watch::channel((0, 0));
    let t = Instant::now();
    let d = receive_apply_forward(
        &mut relay,
        &input,
        stream.max_frame,
        args.burst as usize,
        &children,
        &applied,
    )
    .context("the relay's path")?;
    let took = t.elapsed();

    ensure!(
        relay.file().version() == version && relay.file().root() == core.file().root(),
        "the relay ended at version {} root {}, the core at {version} root {}",
        relay.file().version(),
        relay.file().root_hex(),
        core.file().root_hex()
    );
    ensure!(
        d.entries == args.writes && d.applied == args.writes,
        "not every write applied"
    );
    for (i, rx) in rxs.iter_mut().enumerate() {
        let mut out = BytesMut::with_capacity(input.len());
        while let Ok(f) = rx.try_recv() {
            out.extend_from_slice(&f);
        }
        ensure!(
            out == input,
            "child {i} did not receive the core's frames verbatim"
        );
    }
    println!(
        "{}",
        json!({
            "file_bytes": args.file_size,
            "writes": args.writes,
            "write_bytes": args.write_bytes,
            "fanout": args.fanout,
            "seed": args.seed,
            "key": args.key.as_str(),
            "chunk_size": cfg.chunk_size,
            "checkpoint_every": cfg.checkpoint_every,
            "burst": args.burst,
            "seals_chained": d.chained,
            "input_frames": d.frames,
            "input_bytes": input.len(),
            "forwarded_frames": d.frames * args.fanout,
            "version": version,
            "root": relay.file().root_hex(),
            "wall_us_per_write": (took.as_secs_f64() * 1e6 / args.writes as f64 * 100.0).round() / 100.0,
        })
    );
    Ok(())
}
