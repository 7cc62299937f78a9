//! `quinn-tree`: one node of a tree that relays small writes over bare quinn or bare TCP, the
//! transport's floor under a Canopy relay tree's CPU per delivery.
//!
//! A node is a process, as a `relay-node` or a Redis replica is. It holds one value. The root
//! takes `SET` from a RESP client; every other node connects to its parent (`--parent`),
//! receives each value as a length-prefixed frame on one stream, keeps it, sends the same
//! frame to each of its children and pushes a Redis keyspace notification (`set`) to each of
//! its RESP subscribers. So `prop-sub --kind redis-replica` measures it exactly as it measures
//! a tree of Redis replicas, and `bench/propagation --systems "quinn-tree tcp-tree"` runs it.
//!
//! What it leaves out of a Canopy relay is everything above the transport: no consensus, no
//! seal, no replica, no chunks or hashes, no overlay, no HTTP. What it keeps is the transport
//! as a relay runs it:
//! - `--transport quic`: a quinn endpoint from `canopy::tls::endpoint_from_socket` (mutual TLS
//!   1.3 with the ring provider, `canopy::runtime::ExactTimers`, immediate ACKs, jumbo MTU
//!   discovery, the UDP buffers) and `StreamConfig::default().transport()`, one bidirectional
//!   stream per tree link, written with `write_chunk` (no copy);
//! - `--transport tcp`: tokio `TcpStream`s with `TCP_NODELAY`, no TLS;
//! - a tokio runtime with one worker thread, as `relay-node` has.
//!
//! One task per node does all the relaying: it reads the parent's stream (cancel-safe
//! `read_buf`), and writes to every child and subscriber in turn. The RESP side understands
//! `PING`, `GET`, `SET` (the root only), `INFO` (`master_link_status`,
//! `total_net_output_bytes`: the frame bytes this node sent its children) and `SUBSCRIBE`.
//!
//! Limits: a frame is at most [`MAX_FRAME`] bytes and a RESP command at most
//! [`MAX_COMMAND`]; past either the connection is dropped (a parent's: the node exits).

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use canopy::config::StreamConfig;
use canopy::tls::{self, Identity, Role};
use canopy_bench::resp_line;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Largest frame a parent may send (bytes of value).
const MAX_FRAME: usize = 16 << 20;
/// Largest RESP command a client may send (bytes buffered before it parses).
const MAX_COMMAND: usize = MAX_FRAME + 1024;
/// The one certificate name every node presents.
const NODE_NAME: &str = "tree-node";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// quinn with Canopy's TLS and transport settings.
    Quic,
    /// tokio TCP with TCP_NODELAY, no TLS.
    Tcp,
}

#[derive(Parser, Debug)]
#[command(version = canopy_bench::VERSION, about = "One node of a bare quinn (or TCP) relay tree, spoken to in RESP")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Makes the CA and the one node certificate every node presents, under DIR.
    Certs { dir: PathBuf },
    /// Runs one node until it is killed (or its parent goes away).
    Node(NodeArgs),
}

#[derive(Parser, Debug)]
struct NodeArgs {
    /// The directory `certs` filled.
    #[arg(long)]
    certs: PathBuf,
    /// Where RESP clients connect (TCP).
    #[arg(long)]
    resp: SocketAddr,
    /// Where children connect (UDP for quic, TCP for tcp).
    #[arg(long)]
    listen: SocketAddr,
    /// The parent's `--listen` address; none for the root.
    #[arg(long)]
    parent: Option<SocketAddr>,
    #[arg(long, value_enum, default_value = "quic")]
    transport: Transport,
    /// The one key this node holds (its keyspace channel is `__keyspace@0__:KEY`).
    #[arg(long)]
    key: String,
}

/// What the RESP side reads; the relaying task writes it. A node has its parent's link
/// before it opens its RESP port, and exits when it loses it, so `INFO` always says the link
/// is up.
struct Status {
    value: Mutex<Option<Bytes>>,
    sent: AtomicU64,
}

/// A way down to a child.
enum Down {
    /// The stream, and its connection held open with it.
    Quic {
        send: quinn::SendStream,
        _conn: quinn::Connection,
    },
    Tcp(OwnedWriteHalf),
}

impl Down {
    async fn send(&mut self, frame: &Bytes) -> anyhow::Result<()> {
        match self {
            Down::Quic { send, .. } => send.write_chunk(frame.clone()).await?,
            Down::Tcp(s) => s.write_all(frame).await?,
        }
        Ok(())
    }
}

/// What reaches the relaying task besides the parent's frames.
enum Ctl {
    Child(Down),
    Subscriber(OwnedWriteHalf),
    /// A `SET` on the root.
    Set(Bytes),
}

fn frame_of(value: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(4 + value.len());
    b.put_u32_le(value.len() as u32);
    b.put_slice(value);
    b.freeze()
}

/// Takes one whole frame (its length prefix included, to be forwarded as it came) off the
/// front of `buf`, if it holds one.
fn take_frame(buf: &mut BytesMut) -> anyhow::Result<Option<Bytes>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
    if len > MAX_FRAME {
        bail!("frame of {len} bytes, the limit is {MAX_FRAME}");
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    Ok(Some(buf.split_to(4 + len).freeze()))
}

/// The value a frame carries.
fn value_of(frame: &Bytes) -> Bytes {
    frame.slice(4..)
}

fn notification(key: &str) -> Bytes {
    let channel = format!("__keyspace@0__:{key}");
    Bytes::from(format!(
        "*3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n$3\r\nset\r\n",
        channel.len()
    ))
}

/// The one relaying task: the parent's frames (or the root's `SET`s) to every child and
/// subscriber, in order.
async fn relay(
    mut parent: Option<Box<dyn AsyncRead + Unpin + Send>>,
    mut ctl: mpsc::UnboundedReceiver<Ctl>,
    status: Arc<Status>,
    key: String,
) -> anyhow::Result<()> {
    let notice = notification(&key);
    let mut children: Vec<Down> = Vec::new();
    let mut subscribers: Vec<OwnedWriteHalf> = Vec::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut frames: Vec<Bytes> = Vec::new();
    loop {
        tokio::select! {
            c = ctl.recv() => match c {
                None => return Ok(()),
                Some(Ctl::Child(mut d)) => {
                    let current = status.value.lock().unwrap().clone();
                    if let Some(v) = current {
                        if d.send(&frame_of(&v)).await.is_err() {
                            continue;
                        }
                    }
                    children.push(d);
                    continue;
                }
                Some(Ctl::Subscriber(w)) => {
                    subscribers.push(w);
                    continue;
                }
                Some(Ctl::Set(v)) => frames.push(frame_of(&v)),
            },
            r = async { parent.as_mut().unwrap().read_buf(&mut buf).await }, if parent.is_some() => {
                if r.context("reading the parent's stream")? == 0 {
                    bail!("the parent closed its stream");
                }
                while let Some(f) = take_frame(&mut buf)? {
                    frames.push(f);
                }
            }
        }
        for frame in frames.drain(..) {
            *status.value.lock().unwrap() = Some(value_of(&frame));
            let mut i = 0;
            while i < children.len() {
                if children[i].send(&frame).await.is_ok() {
                    status.sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
                    i += 1;
                } else {
                    children.swap_remove(i);
                }
            }
            let mut i = 0;
            while i < subscribers.len() {
                if subscribers[i].write_all(&notice).await.is_ok() {
                    i += 1;
                } else {
                    subscribers.swap_remove(i);
                }
            }
        }
    }
}

/// One RESP value of a command: an array of bulk strings.
fn parse_command(buf: &[u8]) -> anyhow::Result<Option<(Vec<Bytes>, usize)>> {
    fn number(b: &[u8]) -> anyhow::Result<usize> {
        let n: usize = std::str::from_utf8(b)?.parse()?;
        if n > MAX_COMMAND {
            bail!("a length of {n}, the limit is {MAX_COMMAND}");
        }
        Ok(n)
    }
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != b'*' {
        bail!("only RESP arrays are understood");
    }
    let Some((n, mut at)) = resp_line(buf, 1) else {
        return Ok(None);
    };
    let n = number(n)?;
    if n > 16 {
        bail!("a command of {n} arguments");
    }
    let mut args = Vec::with_capacity(n);
    for _ in 0..n {
        if buf.get(at) != Some(&b'$') {
            if at >= buf.len() {
                return Ok(None);
            }
            bail!("an argument that is not a bulk string");
        }
        let Some((len, next)) = resp_line(buf, at + 1) else {
            return Ok(None);
        };
        let len = number(len)?;
        if buf.len() < next + len + 2 {
            return Ok(None);
        }
        args.push(Bytes::copy_from_slice(&buf[next..next + len]));
        at = next + len + 2;
    }
    Ok(Some((args, at)))
}

fn bulk(b: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", b.len()).into_bytes();
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
    out
}

async fn serve_resp(
    stream: TcpStream,
    ctl: mpsc::UnboundedSender<Ctl>,
    status: Arc<Status>,
    root: bool,
) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let Some((args, used)) = parse_command(&buf)? else {
            if buf.len() > MAX_COMMAND {
                bail!("a command over {MAX_COMMAND} bytes");
            }
            if rd.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
            continue;
        };
        buf.advance(used);
        let name = args
            .first()
            .map(|a| a.to_ascii_uppercase())
            .unwrap_or_default();
        let reply: Vec<u8> = match (name.as_slice(), args.len()) {
            (b"PING", _) => b"+PONG\r\n".to_vec(),
            (b"GET", 2) => match status.value.lock().unwrap().clone() {
                Some(v) => bulk(&v),
                None => b"$-1\r\n".to_vec(),
            },
            (b"SET", 3) if root => {
                ctl.send(Ctl::Set(args[2].clone()))
                    .map_err(|_| anyhow!("the relaying task is gone"))?;
                b"+OK\r\n".to_vec()
            }
            (b"INFO", _) => bulk(
                format!(
                    "# Replication\r\nmaster_link_status:up\r\n# Stats\r\ntotal_net_output_bytes:{}\r\n",
                    status.sent.load(Ordering::Relaxed)
                )
                .as_bytes(),
            ),
            (b"SUBSCRIBE", 2) => {
                let mut r = b"*3\r\n".to_vec();
                r.extend(bulk(b"subscribe"));
                r.extend(bulk(&args[1]));
                r.extend_from_slice(b":1\r\n");
                wr.write_all(&r).await?;
                ctl.send(Ctl::Subscriber(wr))
                    .map_err(|_| anyhow!("the relaying task is gone"))?;
                // A subscribed connection only receives from here on.
                let mut sink = [0u8; 256];
                while rd.read(&mut sink).await? > 0 {}
                return Ok(());
            }
            _ => b"-ERR unknown command or wrong number of arguments\r\n".to_vec(),
        };
        wr.write_all(&reply).await?;
    }
}

async fn node(args: NodeArgs) -> anyhow::Result<()> {
    let status = Arc::new(Status {
        value: Mutex::new(None),
        sent: AtomicU64::new(0),
    });
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    let root = args.parent.is_none();
    // The parent link's send half and connection, held as long as the relaying runs.
    let mut up: Option<(quinn::SendStream, quinn::Connection)> = None;

    let parent: Option<Box<dyn AsyncRead + Unpin + Send>> = match args.transport {
        Transport::Quic => {
            let id = Identity::load(&args.certs.join("tls"), NODE_NAME)?;
            let tc = StreamConfig::default().transport();
            let sock =
                UdpSocket::bind(args.listen).with_context(|| format!("binding {}", args.listen))?;
            let endpoint = tls::endpoint_from_socket(sock, &id, &tc)?;
            let accept = endpoint.clone();
            let tx = ctl_tx.clone();
            tokio::spawn(async move {
                while let Some(inc) = accept.accept().await {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let r: anyhow::Result<()> = async {
                            let conn = inc.await?;
                            let (send, mut recv) = conn.accept_bi().await?;
                            let mut hello = [0u8; 1];
                            recv.read_exact(&mut hello).await?;
                            tx.send(Ctl::Child(Down::Quic { send, _conn: conn }))
                                .map_err(|_| anyhow!("the relaying task is gone"))
                        }
                        .await;
                        if let Err(e) = r {
                            eprintln!("quinn-tree: a child's link failed: {e:#}");
                        }
                    });
                }
            });
            match args.parent {
                None => None,
                Some(p) => {
                    let conn = endpoint.connect(p, tls::SERVER_NAME)?.await?;
                    let (mut send, recv) = conn.open_bi().await?;
                    send.write_all(&[1]).await?;
                    up = Some((send, conn));
                    Some(Box::new(recv))
                }
            }
        }
        Transport::Tcp => {
            let listener = TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("binding {}", args.listen))?;
            let tx = ctl_tx.clone();
            tokio::spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    let _ = s.set_nodelay(true);
                    let (_, w) = s.into_split();
                    if tx.send(Ctl::Child(Down::Tcp(w))).is_err() {
                        return;
                    }
                }
            });
            match args.parent {
                None => None,
                Some(p) => {
                    let s = TcpStream::connect(p)
                        .await
                        .with_context(|| format!("connecting to the parent at {p}"))?;
                    s.set_nodelay(true)?;
                    Some(Box::new(s))
                }
            }
        }
    };
    let resp = TcpListener::bind(args.resp)
        .await
        .with_context(|| format!("binding {}", args.resp))?;
    let (tx, st) = (ctl_tx.clone(), status.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = resp.accept().await {
            let (tx, st) = (tx.clone(), st.clone());
            tokio::spawn(async move {
                if let Err(e) = serve_resp(s, tx, st, root).await {
                    eprintln!("quinn-tree: a RESP client: {e:#}");
                }
            });
        }
    });
    drop(ctl_tx);
    let r = relay(parent, ctl_rx, status, args.key).await;
    drop(up);
    r
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Certs { dir } => {
            tls::ca_init(&dir.join("ca"))?;
            tls::cert_issue(&dir.join("ca"), NODE_NAME, Role::Relay, &dir.join("tls"))?;
            Ok(())
        }
        // Spawned, so that the relaying runs on the one worker beside quinn's drivers (a
        // future given to `block_on` runs on the main thread, and every packet would wake two).
        Cmd::Node(a) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?
            .block_on(async { tokio::spawn(node(a)).await? }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_off_whole_and_in_order() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame_of(b"one"));
        let two = frame_of(b"second");
        buf.extend_from_slice(&two[..5]);
        let one = take_frame(&mut buf).unwrap().unwrap();
        assert_eq!(one, frame_of(b"one"), "forwarded as it came");
        assert_eq!(value_of(&one), Bytes::from("one"));
        assert!(take_frame(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&two[5..]);
        let second = take_frame(&mut buf).unwrap().unwrap();
        assert_eq!(second, two);
        assert_eq!(value_of(&second), Bytes::from("second"));
        assert!(buf.is_empty());
    }

    #[test]
    fn an_oversized_frame_is_refused_before_it_is_buffered() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(MAX_FRAME as u32 + 1);
        assert!(take_frame(&mut buf).is_err());
    }

    #[test]
    fn commands_parse_whole_or_wait() {
        let cmd = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        for cut in 0..cmd.len() {
            assert!(
                parse_command(&cmd[..cut]).unwrap().is_none(),
                "cut at {cut}"
            );
        }
        let (args, used) = parse_command(cmd).unwrap().unwrap();
        assert_eq!(used, cmd.len());
        assert_eq!(
            args,
            vec![Bytes::from("SET"), Bytes::from("k"), Bytes::from("hello")]
        );
        assert!(parse_command(b"*1\r\n$99999999999\r\n").is_err());
        assert!(parse_command(b"*17\r\n").is_err(), "more than 16 arguments");
        assert!(parse_command(b"*99999999999\r\n").is_err());
        assert!(parse_command(b"PING\r\n").is_err());
    }
}
