//! `quinn-raw`: the raw QUIC limit for a full-copy bootstrap on this machine.
//!
//! Each round builds two fresh quinn endpoints on loopback (a server and a client), connects
//! the client (mutual TLS 1.3, ring provider), and has the server stream `--size` bytes on ONE
//! unidirectional stream of that ONE connection, in `--chunk`-byte `Bytes` handed to
//! `write_chunk` (no copy, like Canopy's `transport::write_raw`). The client reads with
//! `read_chunk` (no copy) and, in the `raw` mode, only counts bytes: no framing, no hashing, no
//! disk. The time runs
//! from the start of `connect` (handshake included) to the last byte received.
//!
//! It uses Canopy's own TLS helpers (`canopy::tls`: cluster CA and node certificates made with
//! rcgen, `endpoint_from_socket`) and, with `--transport canopy` (the default), the transport
//! settings every Canopy node uses (`StreamConfig::default().transport()`: 16 MiB stream window,
//! 64 MiB connection window), so the only difference from a relay's bootstrap is everything
//! Canopy does above QUIC. `--transport quinn-default` uses quinn's own defaults instead.
//!
//! `--mode` climbs from raw QUIC towards what a relay does, to show where the time goes:
//! - `raw`: the bytes as they are (the limit);
//! - `frames`: the server sends what a Canopy parent sends for a full transfer (a
//!   `SubscribeOk`, then `canopy::replica::snapshot_frames_below`: the manifest, one protobuf
//!   frame per 64 KiB chunk written in parts as `serve_child` does, the end), and the client reads them with `canopy::transport::read_raw` and
//!   decodes each one, as `upstream.rs` does;
//! - `replica`: as `frames`, and every frame also goes through a real child
//!   `canopy::replica::Replica::handle_downstream` (each chunk checked against the manifest,
//!   the file built, the root verified, installed): Canopy's whole receive path minus the node
//!   runtime (locks, metrics, API, separate processes, materializing).
//!
//! The `keep-*` rungs send raw bytes and weigh how a client could keep them as 64 KiB chunks:
//! `keep-copy` copies each chunk into a buffer of its own and hashes it (as a relay does);
//! `keep-rope` keeps quinn's received buffers as the chunk's pieces and hashes them piece by
//! piece; `keep-rope-scratch` hashes a reused scratch copy instead; `keep-rope-no-hash` does
//! not hash (docs/benchmarks.md, "A chunk as quinn's buffers").
//!
//! Prints one JSON object per round on stdout with `--json` (a summary on stderr).

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use canopy::config::StreamConfig;
use canopy::file::ChunkedFile;
use canopy::measure::parse_size;
use canopy::proto::{self, downstream::Kind as Down};
use canopy::replica::{snapshot_frames_below, Event, Replica};
use canopy::tls::{self, Identity, Role};
use canopy::wire;
use clap::{Parser, ValueEnum};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use canopy_bench::cpu_seconds;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// Canopy's transport config (`StreamConfig::default().transport()`).
    Canopy,
    /// quinn's `TransportConfig::default()` (same certificates).
    QuinnDefault,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Raw bytes, read_chunk on the client.
    Raw,
    /// Canopy's full-transfer frames, read and decoded.
    Frames,
    /// Frames fed to a real child Replica (verify, build, install).
    Replica,
    /// Raw bytes; the client copies each 64 KiB chunk into a buffer of its own, hashes it and
    /// keeps it: what a relay does with a chunk (`read_raw`, `leaf_hash`), without the frames.
    KeepCopy,
    /// Raw bytes; the client keeps quinn's received buffers as each 64 KiB chunk's bytes (a
    /// chunk as a list of pieces, no copy) and hashes them piece by piece.
    KeepRope,
    /// As `keep-rope`, but each chunk is hashed from a reused 64 KiB scratch copy.
    KeepRopeScratch,
    /// As `keep-rope`, with no hashing: what keeping quinn's buffers costs.
    KeepRopeNoHash,
}

impl Mode {
    /// Whether the server sends raw bytes (no Canopy frames).
    fn raw_payload(self) -> bool {
        !matches!(self, Mode::Frames | Mode::Replica)
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Raw => "raw",
            Mode::Frames => "+ canopy frames",
            Mode::Replica => "+ canopy frames + replica verify/build",
            Mode::KeepCopy => "raw + copy, hash, keep per chunk",
            Mode::KeepRope => "raw + keep quinn's pieces per chunk, hash them piece by piece",
            Mode::KeepRopeScratch => "raw + keep quinn's pieces per chunk, hash a scratch copy",
            Mode::KeepRopeNoHash => "raw + keep quinn's pieces per chunk, no hash",
        }
    }
}

#[derive(Parser, Debug)]
#[command(version = canopy_bench::VERSION, about = "Stream N bytes over one quinn connection on loopback; print the time")]
struct Args {
    /// Bytes to stream, e.g. 50MB, 20MiB, 1000000.
    #[arg(long, default_value = "50MB", value_parser = parse_size)]
    size: u64,
    /// Rounds (a fresh pair of endpoints and a fresh connection each).
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Number of the first round (in the rows, and for the port).
    #[arg(long, default_value_t = 1)]
    first_round: u32,
    /// Bytes per write_chunk call (Canopy sends one 64 KiB chunk per frame).
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    chunk: u64,
    /// Transport settings.
    #[arg(long, value_enum, default_value_t = Transport::Canopy)]
    transport: Transport,
    /// What goes over the stream and what the client does with it.
    #[arg(long, value_enum, default_value_t = Mode::Raw)]
    mode: Mode,
    /// UDP port of the server in round 1 (0: any); the client binds the next one. Round r
    /// uses port + 2 * ((r - 1) mod 40), so a closing endpoint never holds the next one's port.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Directory for the throw-away CA and certificates (default: a temp dir).
    #[arg(long)]
    certs: Option<std::path::PathBuf>,
    /// Name of these rows in the output.
    #[arg(long, default_value = "quinn-raw")]
    label: String,
    /// Print one JSON object per round on stdout.
    #[arg(long)]
    json: bool,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

struct Round {
    handshake: Duration,
    first_byte: Duration,
    total: Duration,
    received: u64,
}

/// Bytes per chunk that the keep-* rungs cut the stream into (Canopy's default chunk size).
const KEEP_CHUNK: usize = 64 * 1024;

/// Reads `recv` to its end for the keep-* rungs: `piece` gets quinn's received pieces, cut
/// at every [`KEEP_CHUNK`] bytes of offset, as `Some`, and `None` after each chunk's last
/// piece (the last chunk ends with the stream). Returns the bytes read.
async fn read_pieces(
    recv: &mut quinn::RecvStream,
    start: Instant,
    first_byte: &mut Option<Duration>,
    mut piece: impl FnMut(Option<Bytes>),
) -> anyhow::Result<u64> {
    let (mut received, mut in_chunk) = (0u64, 0usize);
    while let Some(c) = recv.read_chunk(usize::MAX, true).await? {
        first_byte.get_or_insert_with(|| start.elapsed());
        received += c.bytes.len() as u64;
        let mut b = c.bytes;
        while !b.is_empty() {
            let p = b.split_to((KEEP_CHUNK - in_chunk).min(b.len()));
            in_chunk += p.len();
            piece(Some(p));
            if in_chunk == KEEP_CHUNK {
                piece(None);
                in_chunk = 0;
            }
        }
    }
    if in_chunk > 0 {
        piece(None);
    }
    Ok(received)
}

async fn one_round(
    round: u32,
    server_id: &Identity,
    client_id: &Identity,
    args: &Args,
    data: &Bytes,
    file: Option<&ChunkedFile>,
) -> anyhow::Result<Round> {
    let tc = StreamConfig::default().transport();
    let (server_addr, client_addr): (SocketAddr, SocketAddr) = if args.port == 0 {
        ("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?)
    } else {
        let port = args.port + 2 * ((round as u16 - 1) % 40);
        (
            format!("127.0.0.1:{port}").parse()?,
            format!("127.0.0.1:{}", port + 1).parse()?,
        )
    };
    let server = tls::endpoint_from_socket(UdpSocket::bind(server_addr)?, server_id, &tc)?;
    let mut client = tls::endpoint_from_socket(UdpSocket::bind(client_addr)?, client_id, &tc)?;
    if args.transport == Transport::QuinnDefault {
        let mut sc = tls::server_config(server_id, &tc)?;
        sc.transport_config(Arc::new(quinn::TransportConfig::default()));
        server.set_server_config(Some(sc));
        let mut cc = tls::client_config(client_id, &tc)?;
        cc.transport_config(Arc::new(quinn::TransportConfig::default()));
        client.set_default_client_config(cc);
    }
    let to = server.local_addr()?;

    let chunk = args.chunk.max(1) as usize;
    let payload = data.clone();
    let mode = args.mode;
    let want_root = file.map(|f| f.root());
    let file = file.cloned();
    // What a core parent sends with a transfer: its certificate, and its seal over the state.
    let sealer = canopy::trust::Sealer::new(server_id)?;
    let signer = sealer.cert().clone();
    let anchor = match &file {
        Some(f) => Some((
            sealer.seal(&canopy::trust::Anchor {
                version: f.version(),
                length: f.len(),
                chunk_size: f.chunk_size(),
                root: f.root(),
                commit_time_us: 0,
                entry: None,
                prev: None,
            })?,
            None,
        )),
        None => None,
    };
    let signers = vec![signer.clone()];
    let serve = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .context("server endpoint closed")?
            .await?;
        let mut send = conn.open_uni().await?;
        match file.filter(|_| !mode.raw_payload()) {
            None => {
                let mut off = 0;
                while off < payload.len() {
                    let end = (off + chunk).min(payload.len());
                    send.write_chunk(payload.slice(off..end)).await?;
                    off = end;
                }
            }
            Some(file) => {
                // What serve_child writes for a full transfer.
                let ok = wire::encode(&proto::Downstream {
                    kind: Some(Down::SubscribeOk(proto::SubscribeOk {
                        parent_name: "raw-server".into(),
                        parent_depth: 0,
                        resume: false,
                        core_addrs: vec![],
                        root_path: vec!["raw-server".into()],
                        chunk_size: file.chunk_size(),
                        fetch_sources: vec![],
                        signers,
                    })),
                });
                send.write_chunk(ok).await?;
                for (_, f) in snapshot_frames_below(&file, 0, &[], anchor.as_ref(), || u64::MAX) {
                    canopy::transport::write_parts(&mut send, &f).await?;
                }
            }
        }
        send.finish()?;
        // Keep the connection until the client has read everything and closes it.
        conn.closed().await;
        server.wait_idle().await;
        anyhow::Ok(())
    });

    let start = Instant::now();
    let conn = client.connect(to, tls::SERVER_NAME)?.await?;
    let handshake = start.elapsed();
    let mut recv = conn.accept_uni().await?;
    let mut received = 0u64;
    let mut first_byte = None;
    // What the keep-* rungs keep: dropped after the time is taken, as a relay keeps its file.
    let mut kept_flat: Vec<(Bytes, [u8; 32])> = Vec::new();
    let mut kept_pieces: Vec<(Vec<Bytes>, Option<[u8; 32]>)> = Vec::new();
    match args.mode {
        Mode::Raw => {
            while let Some(c) = recv.read_chunk(usize::MAX, true).await? {
                if first_byte.is_none() {
                    first_byte = Some(start.elapsed());
                }
                received += c.bytes.len() as u64;
            }
        }
        Mode::KeepCopy => {
            let mut cur = bytes::BytesMut::with_capacity(KEEP_CHUNK);
            received = read_pieces(&mut recv, start, &mut first_byte, |piece| match piece {
                Some(p) => cur.extend_from_slice(&p),
                None => {
                    let full =
                        std::mem::replace(&mut cur, bytes::BytesMut::with_capacity(KEEP_CHUNK))
                            .freeze();
                    let h = *blake3::hash(&full).as_bytes();
                    kept_flat.push((full, h));
                }
            })
            .await?;
        }
        Mode::KeepRope | Mode::KeepRopeScratch | Mode::KeepRopeNoHash => {
            let mut cur: Vec<Bytes> = Vec::new();
            let mut hasher = blake3::Hasher::new();
            let mut scratch: Vec<u8> = Vec::with_capacity(KEEP_CHUNK);
            received = read_pieces(&mut recv, start, &mut first_byte, |piece| match piece {
                Some(p) => {
                    match args.mode {
                        Mode::KeepRope => {
                            hasher.update(&p);
                        }
                        Mode::KeepRopeScratch => scratch.extend_from_slice(&p),
                        _ => {}
                    }
                    cur.push(p);
                }
                None => {
                    if args.mode == Mode::KeepRopeScratch {
                        hasher.update(&scratch);
                        scratch.clear();
                    }
                    let hash =
                        (args.mode != Mode::KeepRopeNoHash).then(|| *hasher.finalize().as_bytes());
                    kept_pieces.push((std::mem::take(&mut cur), hash));
                    hasher.reset();
                }
            })
            .await?;
        }
        Mode::Frames | Mode::Replica => {
            let max = StreamConfig::default().max_frame;
            let verifier = canopy::trust::Verifier::new(Arc::new(client_id.clone()));
            let trust = canopy::replica::Trust::Verify(verifier);
            let mut replica = Replica::new(StreamConfig::default().replica(), trust)?;
            replica.learn_signers(&[signer], std::time::SystemTime::now());
            let _ = replica.subscribe("raw-client", "127.0.0.1:0", false);
            let mut installed = false;
            while let Some(raw) = canopy::transport::read_raw(&mut recv, max).await? {
                if first_byte.is_none() {
                    first_byte = Some(start.elapsed());
                }
                let msg: proto::Downstream = raw.decode()?;
                if let Some(Down::SnapshotChunk(c)) = &msg.kind {
                    received += c.data.len() as u64;
                }
                if args.mode == Mode::Replica {
                    let events = replica.handle_downstream(raw.frame, msg)?;
                    installed |= events.iter().any(|e| matches!(e, Event::Installed { .. }));
                }
            }
            if args.mode == Mode::Replica
                && (!installed || Some(replica.file().root()) != want_root)
            {
                bail!("the replica did not install the file with the right root");
            }
        }
    }
    let total = start.elapsed();
    std::hint::black_box((&kept_flat, &kept_pieces));
    drop((kept_flat, kept_pieces));
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    serve.await??;
    if received != data.len() as u64 {
        bail!("received {received} bytes, expected {}", data.len());
    }
    Ok(Round {
        handshake,
        first_byte: first_byte.unwrap_or(total),
        total,
        received,
    })
}

fn certs(dir: &Path) -> anyhow::Result<(Identity, Identity)> {
    let ca = dir.join("ca");
    let nodes = dir.join("tls");
    if !ca.join("ca.key").exists() {
        tls::ca_init(&ca)?;
    }
    tls::cert_issue(&ca, "raw-server", Role::Core, &nodes)?;
    tls::cert_issue(&ca, "raw-client", Role::Relay, &nodes)?;
    Ok((
        Identity::load(&nodes, "raw-server")?,
        Identity::load(&nodes, "raw-client")?,
    ))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.size == 0 {
        bail!("--size must be positive");
    }
    let tmp;
    let dir = match &args.certs {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let (server_id, client_id) = certs(&dir).context("making certificates")?;
    let mut buf = vec![0u8; args.size as usize];
    ChaCha8Rng::seed_from_u64(1).fill_bytes(&mut buf);
    let file = match args.mode {
        m if m.raw_payload() => None,
        _ => {
            let cfg = StreamConfig::default();
            Some(ChunkedFile::from_bytes(
                cfg.chunk_size,
                cfg.max_len,
                &buf,
                2,
            )?)
        }
    };
    let data = Bytes::from(buf);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut totals = Vec::new();
    for round in args.first_round..args.first_round + args.rounds {
        let cpu0 = cpu_seconds("self");
        let r = rt.block_on(one_round(
            round,
            &server_id,
            &client_id,
            &args,
            &data,
            file.as_ref(),
        ))?;
        let cpu = cpu_seconds("self") - cpu0;
        let mb_s = r.received as f64 / 1e6 / r.total.as_secs_f64();
        let transfer = r.total.saturating_sub(r.handshake);
        eprintln!(
            "quinn-raw ({:?}, {}) round {round}: {} bytes in {:.1} ms (handshake {:.1} ms, first byte {:.1} ms): {:.0} MB/s",
            args.transport,
            args.mode.label(),
            r.received,
            ms(r.total),
            ms(r.handshake),
            ms(r.first_byte),
            mb_s
        );
        totals.push(r.total);
        if args.json {
            println!(
                "{}",
                json!({
                    "scenario": if matches!(args.mode, Mode::Raw) { "single" } else { "ladder" },
                    "system": "quinn-raw",
                    "variant": match (args.mode, args.transport) {
                        (Mode::Raw, Transport::Canopy) => "canopy transport config".to_string(),
                        (Mode::Raw, Transport::QuinnDefault) => "quinn default transport config".to_string(),
                        (m, _) => m.label().to_string(),
                    },
                    "label": args.label,
                    "round": round,
                    "n": 1,
                    "size_bytes": r.received,
                    "time_ms": ms(r.total),
                    "handshake_ms": ms(r.handshake),
                    "first_byte_ms": ms(r.first_byte),
                    "transfer_ms": ms(transfer),
                    "throughput_mb_s": (mb_s * 10.0).round() / 10.0,
                    "transfer_mb_s": ((r.received as f64 / 1e6 / transfer.as_secs_f64()) * 10.0).round() / 10.0,
                    "chunk_bytes": args.chunk,
                    "cpu_s": (cpu * 100.0).round() / 100.0,
                    "verified": true,
                })
            );
        }
    }
    totals.sort();
    if let Some(m) = totals.get(totals.len() / 2) {
        eprintln!(
            "quinn-raw ({:?}, {}) median of {} rounds: {:.1} ms, {:.0} MB/s",
            args.transport,
            args.mode.label(),
            totals.len(),
            ms(*m),
            args.size as f64 / 1e6 / m.as_secs_f64()
        );
    }
    Ok(())
}
