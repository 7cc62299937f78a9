//! A UDP fault proxy between the nodes of a chaos run: every QUIC packet from node A to node B
//! passes B's front socket, where the rules of link (A, B) delay, drop, duplicate, reorder,
//! throttle or block it.
//!
//! Invariants:
//! - Node i advertises `front(i)` and listens on `backend(i)`. A packet from source S to
//!   front(d) goes on to backend(d) from an upstream socket of its own for (S, d), so d sees
//!   one distinct peer per source; d's answers go back to S from front(d).
//! - A link is (source node, destination node), the source known by its backend address; a
//!   packet from a socket that is no node's backend passes unchanged.
//! - Rules are held per fault; a link's effective rule combines every active fault's, so
//!   clearing one fault leaves the others in force.
//! - Every random decision comes from one RNG seeded by the run: the sequence of decisions
//!   replays, though which packet meets which decision depends on real timing.
//! - Queued packets are bounded: a throttled link drops what would wait over one second.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Largest UDP payload forwarded (QUIC datagrams are far smaller).
const MAX_DATAGRAM: usize = 65_535;
/// Longest a throttled link queues a packet before dropping it.
const MAX_THROTTLE_QUEUE: Duration = Duration::from_secs(1);

/// (source node, destination node).
pub type Link = (usize, usize);

/// What happens to the packets of one link direction.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct LinkRule {
    /// Drop every packet (a partition).
    pub blocked: bool,
    /// Probability of dropping a packet.
    pub drop: f64,
    /// Fixed delay.
    pub delay_ms: u64,
    /// Up to this much more delay, uniform per packet.
    pub jitter_ms: u64,
    /// Probability of sending a packet twice.
    pub duplicate: f64,
    /// Probability of holding a packet back 5-30 ms, so later ones overtake it.
    pub reorder: f64,
    /// Bandwidth of the link (bytes per second).
    pub rate_bytes_per_s: Option<u64>,
}

impl LinkRule {
    /// A partition of this direction.
    pub fn blocked() -> LinkRule {
        LinkRule {
            blocked: true,
            ..Default::default()
        }
    }

    /// Both rules at once: the worse of each.
    fn and(&self, o: &LinkRule) -> LinkRule {
        LinkRule {
            blocked: self.blocked || o.blocked,
            drop: 1.0 - (1.0 - self.drop) * (1.0 - o.drop),
            delay_ms: self.delay_ms + o.delay_ms,
            jitter_ms: self.jitter_ms + o.jitter_ms,
            duplicate: self.duplicate.max(o.duplicate),
            reorder: self.reorder.max(o.reorder),
            rate_bytes_per_s: match (self.rate_bytes_per_s, o.rate_bytes_per_s) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

/// Packet counts since the proxy started.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ProxyStats {
    /// Packets sent on (duplicates included).
    pub forwarded: u64,
    /// Packets dropped by a rule (blocked, lost, or over a throttle's queue).
    pub dropped: u64,
    /// Packets sent later than they arrived.
    pub delayed: u64,
    /// Extra copies sent.
    pub duplicated: u64,
}

/// A packet waiting for its time.
struct Delayed {
    due: Instant,
    seq: u64,
    sock: Arc<UdpSocket>,
    to: SocketAddr,
    bytes: Vec<u8>,
}

impl PartialEq for Delayed {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Delayed {
    /// Reversed, so the max-heap pops the earliest.
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

struct Inner {
    fronts: Vec<Arc<UdpSocket>>,
    front_addrs: Vec<SocketAddr>,
    backends: RwLock<Vec<SocketAddr>>,
    by_backend: RwLock<HashMap<SocketAddr, usize>>,
    /// Upstream socket per (source address, destination node).
    uplinks: Mutex<HashMap<(SocketAddr, usize), Arc<UdpSocket>>>,
    faults: Mutex<BTreeMap<u64, (Vec<Link>, LinkRule)>>,
    effective: RwLock<HashMap<Link, LinkRule>>,
    rng: Mutex<ChaCha8Rng>,
    next_free: Mutex<HashMap<Link, Instant>>,
    delay_tx: mpsc::UnboundedSender<Delayed>,
    seq: AtomicU64,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    delayed: AtomicU64,
    duplicated: AtomicU64,
    tasks: Mutex<Vec<AbortHandle>>,
}

/// The proxy: one front socket per node, its tasks stopped on drop.
pub struct Proxy {
    inner: Arc<Inner>,
}

impl Proxy {
    /// Binds one front socket per backend on 127.0.0.1 and starts forwarding.
    pub async fn start(backends: Vec<SocketAddr>, seed: u64) -> std::io::Result<Proxy> {
        let mut fronts = Vec::new();
        let mut front_addrs = Vec::new();
        for _ in &backends {
            let s = UdpSocket::bind("127.0.0.1:0").await?;
            front_addrs.push(s.local_addr()?);
            fronts.push(Arc::new(s));
        }
        let (delay_tx, delay_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            fronts,
            front_addrs,
            by_backend: RwLock::new(backends.iter().enumerate().map(|(i, a)| (*a, i)).collect()),
            backends: RwLock::new(backends),
            uplinks: Mutex::new(HashMap::new()),
            faults: Mutex::new(BTreeMap::new()),
            effective: RwLock::new(HashMap::new()),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0x5052_4f58_5900_0000)),
            next_free: Mutex::new(HashMap::new()),
            delay_tx,
            seq: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
        });
        let mut tasks = vec![tokio::spawn(delayer(delay_rx)).abort_handle()];
        for d in 0..inner.fronts.len() {
            tasks.push(tokio::spawn(front_loop(inner.clone(), d)).abort_handle());
        }
        inner.tasks.lock().unwrap().extend(tasks);
        Ok(Proxy { inner })
    }

    /// The address node `i` advertises.
    pub fn front(&self, i: usize) -> SocketAddr {
        self.inner.front_addrs[i]
    }

    /// Node `i` listens on `addr` from now on.
    pub fn set_backend(&self, i: usize, addr: SocketAddr) {
        let mut b = self.inner.backends.write().unwrap();
        let mut by = self.inner.by_backend.write().unwrap();
        by.remove(&b[i]);
        by.insert(addr, i);
        b[i] = addr;
    }

    /// Puts `rule` on `links` for fault `id` (replacing what `id` set before).
    pub fn set(&self, id: u64, links: Vec<Link>, rule: LinkRule) {
        let mut f = self.inner.faults.lock().unwrap();
        f.insert(id, (links, rule));
        self.recompute(&f);
    }

    /// Removes what fault `id` set.
    pub fn clear(&self, id: u64) {
        let mut f = self.inner.faults.lock().unwrap();
        if f.remove(&id).is_some() {
            self.recompute(&f);
        }
    }

    /// Removes every rule.
    pub fn clear_all(&self) {
        let mut f = self.inner.faults.lock().unwrap();
        f.clear();
        self.recompute(&f);
    }

    fn recompute(&self, faults: &BTreeMap<u64, (Vec<Link>, LinkRule)>) {
        let mut eff: HashMap<Link, LinkRule> = HashMap::new();
        for (links, rule) in faults.values() {
            for l in links {
                let combined = match eff.get(l) {
                    Some(r) => r.and(rule),
                    None => rule.clone(),
                };
                eff.insert(*l, combined);
            }
        }
        *self.inner.effective.write().unwrap() = eff;
    }

    /// Packet counts so far.
    pub fn stats(&self) -> ProxyStats {
        let i = &self.inner;
        ProxyStats {
            forwarded: i.forwarded.load(Ordering::Relaxed),
            dropped: i.dropped.load(Ordering::Relaxed),
            delayed: i.delayed.load(Ordering::Relaxed),
            duplicated: i.duplicated.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in self.inner.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Inner {
    fn node_of(&self, addr: SocketAddr) -> Option<usize> {
        self.by_backend.read().unwrap().get(&addr).copied()
    }

    /// The upstream socket of packets from `src` to node `d`, made (with the task carrying
    /// d's answers back) on first use.
    async fn uplink(
        self: &Arc<Self>,
        src: SocketAddr,
        d: usize,
    ) -> std::io::Result<Arc<UdpSocket>> {
        if let Some(u) = self.uplinks.lock().unwrap().get(&(src, d)) {
            return Ok(u.clone());
        }
        let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let mut map = self.uplinks.lock().unwrap();
        if let Some(u) = map.get(&(src, d)) {
            return Ok(u.clone());
        }
        map.insert((src, d), up.clone());
        let task = tokio::spawn(back_loop(self.clone(), up.clone(), src, d));
        self.tasks.lock().unwrap().push(task.abort_handle());
        Ok(up)
    }

    /// Sends `bytes` to `to` from `sock` under the rule of `link`.
    async fn send(&self, link: Option<Link>, sock: &Arc<UdpSocket>, to: SocketAddr, bytes: &[u8]) {
        let rule = link.and_then(|l| self.effective.read().unwrap().get(&l).cloned());
        let Some(rule) = rule else {
            if sock.send_to(bytes, to).await.is_ok() {
                self.forwarded.fetch_add(1, Ordering::Relaxed);
            }
            return;
        };
        let now = Instant::now();
        let (due, copies) = {
            let mut rng = self.rng.lock().unwrap();
            if rule.blocked || (rule.drop > 0.0 && rng.random::<f64>() < rule.drop) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let copies = if rule.duplicate > 0.0 && rng.random::<f64>() < rule.duplicate {
                2
            } else {
                1
            };
            let mut delay = Duration::from_millis(rule.delay_ms);
            if rule.jitter_ms > 0 {
                delay += Duration::from_micros(rng.random_range(0..=rule.jitter_ms * 1000));
            }
            if rule.reorder > 0.0 && rng.random::<f64>() < rule.reorder {
                delay += Duration::from_millis(rng.random_range(5..=30));
            }
            (now + delay, copies)
        };
        let due = match (rule.rate_bytes_per_s, link) {
            (Some(rate), Some(l)) if rate > 0 => {
                let mut nf = self.next_free.lock().unwrap();
                let slot = nf.entry(l).or_insert(now);
                let start = (*slot).max(now);
                if start - now > MAX_THROTTLE_QUEUE {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                *slot = start + Duration::from_secs_f64(bytes.len() as f64 / rate as f64);
                due.max(*slot)
            }
            _ => due,
        };
        if copies > 1 {
            self.duplicated.fetch_add(1, Ordering::Relaxed);
        }
        for _ in 0..copies {
            if due <= now {
                if sock.send_to(bytes, to).await.is_ok() {
                    self.forwarded.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                self.delayed.fetch_add(1, Ordering::Relaxed);
                self.forwarded.fetch_add(1, Ordering::Relaxed);
                let _ = self.delay_tx.send(Delayed {
                    due,
                    seq: self.seq.fetch_add(1, Ordering::Relaxed),
                    sock: sock.clone(),
                    to,
                    bytes: bytes.to_vec(),
                });
            }
        }
    }
}

/// Packets arriving at node d's front: on to d's backend.
async fn front_loop(inner: Arc<Inner>, d: usize) {
    let front = inner.fronts[d].clone();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        // Errors here are ICMP reports of a peer that went away; the socket stays usable.
        let Ok((n, src)) = front.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(up) = inner.uplink(src, d).await else {
            continue;
        };
        let to = inner.backends.read().unwrap()[d];
        let link = inner.node_of(src).map(|s| (s, d));
        inner.send(link, &up, to, &buf[..n]).await;
    }
}

/// Node d's answers to `src`: back out of d's front.
async fn back_loop(inner: Arc<Inner>, up: Arc<UdpSocket>, src: SocketAddr, d: usize) {
    let front = inner.fronts[d].clone();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, _)) = up.recv_from(&mut buf).await else {
            continue;
        };
        let link = inner.node_of(src).map(|s| (d, s));
        inner.send(link, &front, src, &buf[..n]).await;
    }
}

/// Sends every delayed packet at its time.
async fn delayer(mut rx: mpsc::UnboundedReceiver<Delayed>) {
    let mut heap: BinaryHeap<Delayed> = BinaryHeap::new();
    loop {
        let next = heap.peek().map(|d| d.due);
        tokio::select! {
            m = rx.recv() => match m {
                Some(d) => heap.push(d),
                None => return,
            },
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                while heap.peek().is_some_and(|d| d.due <= now) {
                    if let Some(d) = heap.pop() {
                        let _ = d.sock.send_to(&d.bytes, d.to).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pair {
        proxy: Proxy,
        a: UdpSocket,
        b: UdpSocket,
    }

    async fn pair() -> Pair {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy::start(vec![a.local_addr().unwrap(), b.local_addr().unwrap()], 7)
            .await
            .unwrap();
        Pair { proxy, a, b }
    }

    async fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = vec![0u8; 2048];
        let (n, from) = tokio::time::timeout(Duration::from_secs(30), s.recv_from(&mut buf))
            .await
            .expect("a packet")
            .unwrap();
        (buf[..n].to_vec(), from)
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn forwards_both_ways_through_the_fronts() {
        let p = pair().await;
        p.a.send_to(b"ping", p.proxy.front(1)).await.unwrap();
        let (got, via) = recv(&p.b).await;
        assert_eq!(got, b"ping");
        assert_ne!(via, p.a.local_addr().unwrap(), "b sees the proxy, not a");
        p.b.send_to(b"pong", via).await.unwrap();
        let (got, from) = recv(&p.a).await;
        assert_eq!((got.as_slice(), from), (&b"pong"[..], p.proxy.front(1)));
        assert_eq!(p.proxy.stats().forwarded, 2);
    }

    #[tokio::test]
    async fn a_one_way_partition_drops_one_direction_until_cleared() {
        let p = pair().await;
        p.a.send_to(b"hello", p.proxy.front(1)).await.unwrap();
        let (_, via) = recv(&p.b).await;
        p.proxy.set(1, vec![(0, 1)], LinkRule::blocked());
        p.a.send_to(b"lost", p.proxy.front(1)).await.unwrap();
        until("the drop", || p.proxy.stats().dropped == 1).await;
        p.b.send_to(b"back", via).await.unwrap();
        assert_eq!(recv(&p.a).await.0, b"back");
        p.proxy.clear(1);
        p.a.send_to(b"again", p.proxy.front(1)).await.unwrap();
        assert_eq!(recv(&p.b).await.0, b"again");
    }

    #[tokio::test]
    async fn rules_of_two_faults_combine_and_clear_separately() {
        let p = pair().await;
        p.proxy.set(1, vec![(0, 1)], LinkRule::blocked());
        p.proxy.set(
            2,
            vec![(0, 1)],
            LinkRule {
                delay_ms: 50,
                ..Default::default()
            },
        );
        p.a.send_to(b"x", p.proxy.front(1)).await.unwrap();
        until("the drop", || p.proxy.stats().dropped == 1).await;
        p.proxy.clear(1);
        let sent = Instant::now();
        p.a.send_to(b"late", p.proxy.front(1)).await.unwrap();
        assert_eq!(recv(&p.b).await.0, b"late");
        assert!(sent.elapsed() >= Duration::from_millis(50));
        assert_eq!(p.proxy.stats().delayed, 1);
    }

    #[tokio::test]
    async fn duplicates_and_certain_loss() {
        let p = pair().await;
        p.proxy.set(
            1,
            vec![(0, 1)],
            LinkRule {
                duplicate: 1.0,
                ..Default::default()
            },
        );
        p.a.send_to(b"twice", p.proxy.front(1)).await.unwrap();
        assert_eq!(recv(&p.b).await.0, b"twice");
        assert_eq!(recv(&p.b).await.0, b"twice");
        p.proxy.set(
            1,
            vec![(0, 1)],
            LinkRule {
                drop: 1.0,
                ..Default::default()
            },
        );
        for _ in 0..5 {
            p.a.send_to(b"gone", p.proxy.front(1)).await.unwrap();
        }
        until("five drops", || p.proxy.stats().dropped == 5).await;
    }

    #[tokio::test]
    async fn a_throttled_link_spaces_packets_by_their_size() {
        let p = pair().await;
        p.proxy.set(
            1,
            vec![(0, 1)],
            LinkRule {
                rate_bytes_per_s: Some(10_000),
                ..Default::default()
            },
        );
        let sent = Instant::now();
        for _ in 0..3 {
            p.a.send_to(&[0u8; 500], p.proxy.front(1)).await.unwrap();
        }
        for _ in 0..3 {
            recv(&p.b).await;
        }
        // 1500 bytes at 10 kB/s: the last goes out 150 ms after the first came in.
        assert!(sent.elapsed() >= Duration::from_millis(150));
    }

    #[test]
    fn combined_rules_take_the_worse_of_each() {
        let a = LinkRule {
            drop: 0.5,
            delay_ms: 10,
            rate_bytes_per_s: Some(100),
            ..Default::default()
        };
        let b = LinkRule {
            drop: 0.5,
            delay_ms: 5,
            duplicate: 0.2,
            rate_bytes_per_s: Some(50),
            ..Default::default()
        };
        let c = a.and(&b);
        assert_eq!(
            (
                c.drop,
                c.delay_ms,
                c.duplicate,
                c.rate_bytes_per_s,
                c.blocked
            ),
            (0.75, 15, 0.2, Some(50), false)
        );
    }
}
