//! The node's UDP socket as the kernel sees it: the buffers asked for, and the datagrams dropped.
//!
//! Invariants:
//! - [`size_buffers`] never fails a node's start: a buffer the kernel caps below the ask is
//!   reported (what was granted, and the sysctl that capped it), not an error.
//! - Sizes are the usable bytes the kernel grants (`getsockopt` reports twice that, the
//!   other half being its bookkeeping allowance), so granted and asked compare directly.
//! - [`drops`] reads only the kernel's table of this network namespace's UDP sockets, and
//!   matches a socket by its bound address and port; anything it cannot parse is "unknown"
//!   (`None`), never 0.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::io::AsRawFd;

/// Largest buffer `stream.udp_buffer_bytes` may ask for: 256 MiB, well inside the `int`
/// the kernel doubles, and more than any link needs for a round trip's worth of data.
pub const MAX_UDP_BUFFER: u64 = 256 * 1024 * 1024;

/// The receive and send buffers a socket holds, in usable bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffers {
    pub receive: usize,
    pub send: usize,
}

impl Buffers {
    /// What an operator should be told when the kernel granted less than `asked`.
    pub fn shortfall(&self, asked: usize) -> Option<String> {
        let mut short = Vec::new();
        if self.receive < asked {
            short.push(format!("receive {} (net.core.rmem_max)", self.receive));
        }
        if self.send < asked {
            short.push(format!("send {} (net.core.wmem_max)", self.send));
        }
        (!short.is_empty()).then(|| {
            format!(
                "stream.udp_buffer_bytes asks for {asked}-byte UDP buffers but the kernel granted {}: \
                 under load the socket drops datagrams that QUIC must resend (canopy_udp_receive_drops_total); \
                 raise the sysctls named to at least {asked}, or run the node with CAP_NET_ADMIN",
                short.join(", ")
            )
        })
    }
}

/// Asks the kernel for `bytes` of receive and send buffer on `sock` (0: leave its default),
/// beyond `net.core.{r,w}mem_max` where the process may (`SO_RCVBUFFORCE`, `SO_SNDBUFFORCE`:
/// CAP_NET_ADMIN), and returns what the socket holds afterwards.
pub fn size_buffers(sock: &UdpSocket, bytes: usize) -> io::Result<Buffers> {
    if bytes > 0 {
        let ask =
            libc::c_int::try_from(bytes.min(MAX_UDP_BUFFER as usize)).unwrap_or(libc::c_int::MAX);
        for (opt, force) in [
            (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE),
            (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE),
        ] {
            if setsockopt(sock, force, ask).is_err() {
                setsockopt(sock, opt, ask)?;
            }
        }
    }
    Ok(Buffers {
        receive: getsockopt(sock, libc::SO_RCVBUF)? / 2,
        send: getsockopt(sock, libc::SO_SNDBUF)? / 2,
    })
}

fn setsockopt(sock: &UdpSocket, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the pointer and length describe `value`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt(sock: &UdpSocket, opt: libc::c_int) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the pointers describe `value` and `len`, which outlive the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(usize::try_from(value).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Datagrams the kernel dropped on their way into the UDP socket bound to `local`, because
/// its receive buffer was full (or a checksum failed), since the socket was made: the
/// `drops` column of `/proc/self/net/udp` (or `udp6`). `None` if no such socket is listed
/// or the table cannot be read.
pub fn drops(local: SocketAddr) -> Option<u64> {
    let table = match local {
        SocketAddr::V4(_) => "/proc/self/net/udp",
        SocketAddr::V6(_) => "/proc/self/net/udp6",
    };
    drops_in(&std::fs::read_to_string(table).ok()?, local)
}

/// [`drops`] over the text of a `/proc/net/udp` table.
pub fn drops_in(table: &str, local: SocketAddr) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let addr = parse_proc_addr(cols.get(1)?)?;
        let same =
            addr.port() == local.port() && (addr.ip() == local.ip() || addr.ip().is_unspecified());
        if same {
            cols.last()?.parse().ok()
        } else {
            None
        }
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit word of the
/// address in the kernel's byte order, which is little-endian on every host Canopy runs on.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::swap_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                let w = word(ip.get(i * 8..i * 8 + 8)?)?;
                octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_gets_the_buffers_it_asks_for_or_says_what_capped_them() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = size_buffers(&sock, 0).unwrap();
        let ask = 3 * 1024 * 1024;
        let got = size_buffers(&sock, ask).unwrap();
        let max =
            |p: &str| -> usize { std::fs::read_to_string(p).unwrap().trim().parse().unwrap() };
        let root = unsafe { libc::geteuid() } == 0;
        for (granted, default, sysctl) in [
            (got.receive, before.receive, "/proc/sys/net/core/rmem_max"),
            (got.send, before.send, "/proc/sys/net/core/wmem_max"),
        ] {
            assert!(granted >= default.min(ask), "{sysctl}");
            if root {
                assert_eq!(granted, ask, "{sysctl}");
            } else {
                assert_eq!(granted, ask.min(max(sysctl)), "{sysctl}");
            }
        }
        if root {
            assert_eq!(got.shortfall(ask), None);
        }
        let small = Buffers {
            receive: 212_992,
            send: ask,
        };
        let msg = small.shortfall(ask).unwrap();
        assert!(msg.contains("receive 212992 (net.core.rmem_max)"), "{msg}");
        assert!(!msg.contains("wmem_max"), "{msg}");
    }

    #[test]
    fn drops_are_read_from_the_kernels_table_by_bound_address() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
             1: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 17\n\
             2: 00000000:1F91 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2 2 0000000000000000 5\n";
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(drops_in(table, at("127.0.0.1:8080")), Some(17));
        assert_eq!(
            drops_in(table, at("127.0.0.1:8081")),
            Some(5),
            "bound to 0.0.0.0"
        );
        assert_eq!(drops_in(table, at("127.0.0.2:8080")), None);
        assert_eq!(drops_in(table, at("127.0.0.1:9")), None);
        assert_eq!(drops_in("garbage\n1: zz:zz\n", at("127.0.0.1:9")), None);
        let v6 = "header\n 0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 07 0:0 0:0 0 0 0 9 2 0 3\n";
        assert_eq!(drops_in(v6, at("[::1]:8080")), Some(3));
    }

    #[test]
    fn drops_of_a_live_socket_are_found() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(drops(sock.local_addr().unwrap()), Some(0));
    }
}
