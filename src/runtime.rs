//! The quinn runtime of every Canopy endpoint: tokio's, except that a connection's timer
//! pushed later moves in tokio's timer wheel instead of staying where it was.
//!
//! quinn keeps one timer per connection at the earliest of its deadlines, and every
//! packet received pushes the keep-alive and idle deadlines later. tokio's `Sleep::reset`
//! to a later instant only records it: the wheel entry stays at the old deadline, the
//! runtime wakes there for nothing and files the entry again. On a tree link whose
//! heartbeat arrives every `heartbeat_ms`, the keep-alive deadline (a heartbeat plus half
//! the idle timeout) is always one period ahead, so each heartbeat came with a second,
//! empty wake-up of the process. [`ExactTimer`] re-registers instead, so a connection's
//! timer wakes the runtime only when it is due.
//!
//! Its sockets are tokio's, with two changes ([`Socket`]): a segmentation-offload batch never
//! exceeds one UDP send, which matters once MTU discovery finds jumbo datagrams, and a read
//! that drains the socket ends its readiness without a second, failing `recvmmsg`.
//!
//! Invariants:
//! - a timer fires at, never before, the last deadline it was given (tokio's guarantee,
//!   kept by re-registering rather than extending);
//! - the datagrams of one send carry at most 65507 bytes in all;
//! - every datagram received is read: readiness ends only at a read that drained the
//!   socket, and one that arrives later raises it again;
//! - spawning and the clock are tokio's, unchanged ([`quinn::TokioRuntime`]).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime, UdpPoller};
use tokio::io::Interest;
use tokio::time::Sleep;

/// [`TokioRuntime`] with [`ExactTimer`]s, whose sockets send segmentation-offload batches
/// that fit one UDP datagram and end a read at a short batch ([`Socket`]). Must be used
/// inside a tokio runtime with time enabled, as `TokioRuntime` must.
#[derive(Debug, Clone, Copy)]
pub struct ExactTimers {
    max_udp_payload: u16,
}

impl ExactTimers {
    /// A runtime for endpoints whose datagrams carry at most `max_udp_payload` bytes.
    pub fn new(max_udp_payload: u16) -> Self {
        Self { max_udp_payload }
    }
}

impl Default for ExactTimers {
    fn default() -> Self {
        Self::new(crate::tls::DEFAULT_MAX_UDP_PAYLOAD)
    }
}

impl Runtime for ExactTimers {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(ExactTimer::new(at))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        TokioRuntime.spawn(future)
    }

    fn wrap_udp_socket(&self, sock: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Ok(Arc::new(Socket::new(sock, self.max_udp_payload)?))
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
    }
}

/// The payload one UDP send may carry in all, whatever its segmentation: the UDP length
/// field's 65535 less the UDP and IPv4 headers. The kernel refuses a larger send, and quinn
/// counts the refused packets as lost.
const MAX_SEND_BYTES: usize = 65507;

/// A quinn UDP socket on tokio, as quinn's own ([`quinn::TokioRuntime`]'s), with two
/// differences.
///
/// - Its segmentation-offload batches stay within [`MAX_SEND_BYTES`]. quinn batches up to
///   10 datagrams of the path's MTU into one `sendmsg`: 14.5 KiB at its default bound of
///   1452 bytes, but 87 KiB at a jumbo MTU of 8952, which Linux refuses (`EMSGSIZE`). The
///   batch is capped at what fits the largest datagram the endpoint may send.
/// - A read that fills fewer messages than it offered ends the socket's readiness, as one
///   that finds nothing does. quinn reads until a read finds nothing, so every wake-up by
///   a datagram cost a second `recvmmsg` that failed with `EAGAIN`: about one system call
///   in seven of a relay's delivery. A short batch says the same: `recvmmsg` stops early
///   only at an empty queue or at an error, and the only error a read can meet after its
///   first datagram is an ICMP one, which an unconnected socket without `IP_RECVERR`
///   (quinn's) is never told of. A datagram that arrives after the read raises a new
///   readiness event: tokio clears the readiness only if no event came since the read
///   began, so it is never lost.
#[derive(Debug)]
pub struct Socket {
    io: tokio::net::UdpSocket,
    state: quinn::udp::UdpSocketState,
    max_segments: usize,
}

impl Socket {
    /// Wraps `sock` (made non-blocking) for datagrams of at most `max_udp_payload` bytes.
    /// Must be called inside a tokio runtime with I/O enabled.
    pub fn new(sock: std::net::UdpSocket, max_udp_payload: u16) -> io::Result<Self> {
        let state = quinn::udp::UdpSocketState::new((&sock).into())?;
        let io = tokio::net::UdpSocket::from_std(sock)?;
        let max_segments = (MAX_SEND_BYTES / usize::from(max_udp_payload.max(1))).max(1);
        Ok(Self {
            io,
            state,
            max_segments,
        })
    }
}

impl AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            waiting: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.io.try_io(Interest::WRITABLE, || {
            self.state.send((&self.io).into(), transmit)
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let offered = bufs.len().min(quinn::udp::BATCH_SIZE);
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            let mut short = None;
            let read = self.io.try_io(Interest::READABLE, || {
                let n = self.state.recv((&self.io).into(), bufs, meta)?;
                if n < offered {
                    short = Some(n);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match (read, short) {
                (Ok(n), _) | (Err(_), Some(n)) => return Poll::Ready(Ok(n)),
                // As quinn's socket does: an error (a refused datagram's ICMP, say) is
                // consumed by the read that reports it, and the next read goes on.
                (Err(_), None) => {}
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.io.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments().min(self.max_segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// Waits for a [`Socket`] to take sends again: one per connection, each with its own
/// waiter (tokio keeps only the last waker of `poll_send_ready`, which would lose the
/// others).
struct Writable {
    socket: Arc<Socket>,
    waiting: Option<Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>>,
}

impl fmt::Debug for Writable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writable")
            .field("waiting", &self.waiting.is_some())
            .finish()
    }
}

impl UdpPoller for Writable {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let waiting = this.waiting.get_or_insert_with(|| {
            let socket = this.socket.clone();
            Box::pin(async move { socket.io.writable().await })
        });
        let ready = waiting.as_mut().poll(cx);
        if ready.is_ready() {
            this.waiting = None;
        }
        ready
    }
}

/// A tokio `Sleep` that a later deadline replaces, so that its wheel entry moves to it.
/// An earlier deadline is tokio's own reset, which already moves the entry.
pub struct ExactTimer {
    sleep: Pin<Box<Sleep>>,
}

impl ExactTimer {
    /// A timer due at `at`; it registers with the wheel when first polled.
    pub fn new(at: Instant) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(at.into())),
        }
    }
}

impl fmt::Debug for ExactTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExactTimer")
            .field("deadline", &self.sleep.deadline())
            .finish()
    }
}

impl AsyncTimer for ExactTimer {
    fn reset(mut self: Pin<&mut Self>, at: Instant) {
        let at = tokio::time::Instant::from_std(at);
        if at > self.sleep.deadline() {
            self.sleep.set(tokio::time::sleep_until(at));
        } else {
            self.sleep.as_mut().reset(at);
        }
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Future::poll(self.sleep.as_mut(), cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn poll_once(t: &mut Pin<Box<dyn AsyncTimer>>) -> Poll<()> {
        let waker = std::task::Waker::noop();
        t.as_mut().poll(&mut Context::from_waker(waker))
    }

    #[tokio::test]
    async fn a_segmentation_batch_fits_one_udp_send_at_any_payload_bound() {
        for payload in [1200u16, 1452, 8952, 16384, 65507] {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let s = ExactTimers::new(payload).wrap_udp_socket(sock).unwrap();
            let n = s.max_transmit_segments();
            assert!(n >= 1, "{payload}: no segment at all");
            assert!(
                n * usize::from(payload) <= MAX_SEND_BYTES,
                "{payload}: {n} segments exceed one UDP send"
            );
        }
    }

    /// quinn's own socket would read the fourth datagram at the first poll after the short
    /// read; this one answers Pending there without a system call, and still reads it once
    /// the runtime has seen its arrival.
    #[tokio::test]
    async fn a_read_that_drains_the_socket_ends_its_readiness_and_a_later_datagram_raises_it() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = sock.local_addr().unwrap();
        let s = ExactTimers::default().wrap_udp_socket(sock).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut storage = vec![[0u8; 2048]; quinn::udp::BATCH_SIZE];
        let mut meta = vec![RecvMeta::default(); quinn::udp::BATCH_SIZE];
        let received =
            |storage: &mut Vec<[u8; 2048]>, meta: &mut Vec<RecvMeta>, cx: &mut Context<'_>| {
                let mut bufs: Vec<io::IoSliceMut<'_>> =
                    storage.iter_mut().map(|b| io::IoSliceMut::new(b)).collect();
                s.poll_recv(cx, &mut bufs, meta)
                    .map(|n| n.map(|n| meta[..n].iter().map(|m| m.len).sum::<usize>()))
            };
        let deadline = Duration::from_secs(10);

        for _ in 0..3 {
            sender.send_to(&[1u8; 100], to).unwrap();
        }
        let mut bytes = 0;
        while bytes < 300 {
            bytes += tokio::time::timeout(
                deadline,
                std::future::poll_fn(|cx| received(&mut storage, &mut meta, cx)),
            )
            .await
            .expect("the three datagrams arrive")
            .unwrap();
        }
        assert_eq!(bytes, 300);

        sender.send_to(&[2u8; 100], to).unwrap();
        let waker = std::task::Waker::noop();
        assert!(
            received(&mut storage, &mut meta, &mut Context::from_waker(waker)).is_pending(),
            "read again after a read that drained the socket"
        );
        let later = tokio::time::timeout(
            deadline,
            std::future::poll_fn(|cx| received(&mut storage, &mut meta, cx)),
        )
        .await
        .expect("a datagram that came after the draining read is read")
        .unwrap();
        assert_eq!(later, 100);
        assert_eq!(storage[0][..100], [2u8; 100]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_fires_at_its_last_deadline_whether_pushed_later_or_earlier() {
        let start = ExactTimers::default().now();
        let mut t = ExactTimers::default().new_timer(start + Duration::from_millis(100));
        assert!(poll_once(&mut t).is_pending());
        t.as_mut().reset(start + Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            poll_once(&mut t).is_pending(),
            "fired at the deadline it was moved from"
        );
        t.as_mut().reset(start + Duration::from_millis(200));
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(poll_once(&mut t).is_pending(), "fired before its deadline");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(poll_once(&mut t).is_ready(), "not fired at its deadline");
        assert!(ExactTimers::default().now() >= start + Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_pushed_at_every_tick_fires_at_its_last_deadline() {
        let start = ExactTimers::default().now();
        let mut t = ExactTimers::default().new_timer(start + Duration::from_millis(100));
        assert!(poll_once(&mut t).is_pending());
        for step in 1..=5u64 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            t.as_mut()
                .reset(start + Duration::from_millis(50 * step + 100));
        }
        std::future::poll_fn(|cx| t.as_mut().poll(cx)).await;
        assert_eq!(
            ExactTimers::default().now() - start,
            Duration::from_millis(350),
            "the timer fired at its last deadline"
        );
    }
}
