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
//! Invariants:
//! - a timer fires at, never before, the last deadline it was given (tokio's guarantee,
//!   kept by re-registering rather than extending);
//! - spawning, sockets and the clock are tokio's, unchanged ([`quinn::TokioRuntime`]).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime};
use tokio::time::Sleep;

/// [`TokioRuntime`] with [`ExactTimer`]s. Must be used inside a tokio runtime with time
/// enabled, as `TokioRuntime` must.
#[derive(Debug)]
pub struct ExactTimers;

impl Runtime for ExactTimers {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(ExactTimer::new(at))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        TokioRuntime.spawn(future)
    }

    fn wrap_udp_socket(&self, sock: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        TokioRuntime.wrap_udp_socket(sock)
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
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

    #[tokio::test(start_paused = true)]
    async fn a_timer_fires_at_its_last_deadline_whether_pushed_later_or_earlier() {
        let start = ExactTimers.now();
        let mut t = ExactTimers.new_timer(start + Duration::from_millis(100));
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
        assert!(ExactTimers.now() >= start + Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_pushed_at_every_tick_fires_at_its_last_deadline() {
        let start = ExactTimers.now();
        let mut t = ExactTimers.new_timer(start + Duration::from_millis(100));
        assert!(poll_once(&mut t).is_pending());
        for step in 1..=5u64 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            t.as_mut()
                .reset(start + Duration::from_millis(50 * step + 100));
        }
        std::future::poll_fn(|cx| t.as_mut().poll(cx)).await;
        assert_eq!(
            ExactTimers.now() - start,
            Duration::from_millis(350),
            "the timer fired at its last deadline"
        );
    }
}
