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
//! Its sockets are tokio's, with one bound: a segmentation-offload batch never exceeds one
//! UDP send ([`CappedBatches`]), which matters once MTU discovery finds jumbo datagrams.
//!
//! Invariants:
//! - a timer fires at, never before, the last deadline it was given (tokio's guarantee,
//!   kept by re-registering rather than extending);
//! - the datagrams of one send carry at most 65507 bytes in all;
//! - spawning, I/O and the clock are tokio's, unchanged ([`quinn::TokioRuntime`]).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime, UdpPoller};
use tokio::time::Sleep;

/// [`TokioRuntime`] with [`ExactTimer`]s, whose sockets send segmentation-offload batches
/// that fit one UDP datagram ([`CappedBatches`]). Must be used inside a tokio runtime with
/// time enabled, as `TokioRuntime` must.
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
        Ok(Arc::new(CappedBatches::new(
            TokioRuntime.wrap_udp_socket(sock)?,
            self.max_udp_payload,
        )))
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
    }
}

/// The payload one UDP send may carry in all, whatever its segmentation: the UDP length
/// field's 65535 less the UDP and IPv4 headers. The kernel refuses a larger send, and quinn
/// counts the refused packets as lost.
const MAX_SEND_BYTES: usize = 65507;

/// A quinn UDP socket whose segmentation-offload batches stay within [`MAX_SEND_BYTES`].
///
/// quinn batches up to 10 datagrams of the path's MTU into one `sendmsg`: 14.5 KiB at its
/// default bound of 1452 bytes, but 87 KiB at a jumbo MTU of 8952, which Linux refuses
/// (`EMSGSIZE`). The batch is capped at what fits the largest datagram the endpoint may
/// send; everything else is the wrapped socket's.
#[derive(Debug)]
pub struct CappedBatches {
    inner: Arc<dyn AsyncUdpSocket>,
    max_segments: usize,
}

impl CappedBatches {
    /// Wraps `inner` for datagrams of at most `max_udp_payload` bytes.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, max_udp_payload: u16) -> Self {
        let max_segments = (MAX_SEND_BYTES / usize::from(max_udp_payload.max(1))).max(1);
        Self {
            inner,
            max_segments,
        }
    }
}

impl AsyncUdpSocket for CappedBatches {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(self.max_segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
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
