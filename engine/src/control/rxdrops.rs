//! Datagrams a UDP socket's receive buffer dropped (it was full): the kernel's per-socket
//! `drops` count, read from `/proc/self/net/udp` (and `udp6`) by the socket's inode. No
//! `unsafe` and no `recvmsg` control messages (`SO_RXQ_OVFL` would need both); the cost is
//! one read of the table, so callers refresh at most every [`REFRESH`].
//!
//! The count covers every datagram the socket dropped, whoever sent it. Where `/proc` is not
//! there (another OS, a sandbox) the count stays 0.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// How often a [`RxDrops`] is worth refreshing.
pub const REFRESH: Duration = Duration::from_millis(100);

/// The receive drops of one socket, as a running total (the kernel's 32-bit count may wrap).
#[derive(Debug, Clone)]
pub struct RxDrops {
    inode: Option<u64>,
    last: Option<u32>,
    total: u64,
    next_refresh: Option<Instant>,
}

impl RxDrops {
    /// Follows `socket` (its inode is looked up now); nothing counted yet.
    pub fn new(socket: &impl AsRawFd) -> RxDrops {
        RxDrops {
            inode: socket_inode(socket.as_raw_fd()),
            last: None,
            total: 0,
            next_refresh: None,
        }
    }

    /// Datagrams dropped since [`new`](Self::new) was called (as of the latest refresh).
    /// Drops before the first refresh count too: a fresh socket starts at 0.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Reads the kernel's count now.
    pub fn refresh(&mut self) {
        let Some(inode) = self.inode else {
            return;
        };
        let Some(now) = read_drops(inode) else {
            return;
        };
        let step = match self.last {
            Some(last) => now.wrapping_sub(last),
            None => now,
        };
        self.last = Some(now);
        self.total = self.total.saturating_add(u64::from(step));
    }

    /// Reads the kernel's count if [`REFRESH`] has passed since the last read at `now`.
    pub fn refresh_due(&mut self, now: Instant) {
        if self.next_refresh.is_some_and(|t| now < t) {
            return;
        }
        self.next_refresh = Some(now + REFRESH);
        self.refresh();
    }
}

/// The receive drops of a UDP socket, read now (`None` without `/proc` or if the socket is not
/// in the tables).
pub fn socket_drops(socket: &impl AsRawFd) -> Option<u64> {
    read_drops(socket_inode(socket.as_raw_fd())?).map(u64::from)
}

/// The inode of socket `fd` (from the `socket:[N]` link in `/proc/self/fd`).
fn socket_inode(fd: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let text = link.to_str()?;
    text.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Reads of the tables before a socket counts as absent.
const ATTEMPTS: usize = 4;

fn read_drops(inode: u64) -> Option<u32> {
    // The kernel writes the table a page per read(2) and finds its place again by row index,
    // so a row can be skipped while other sockets close: a missing row is read again.
    (0..ATTEMPTS).find_map(|_| {
        ["/proc/self/net/udp", "/proc/self/net/udp6"]
            .iter()
            .find_map(|path| parse_drops(&std::fs::read_to_string(path).ok()?, inode))
    })
}

/// The `drops` column of the row of `inode` in a `/proc/net/udp` table.
pub fn parse_drops(table: &str, inode: u64) -> Option<u32> {
    // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 13 || fields[9].parse::<u64>().ok()? != inode {
            return None;
        }
        fields[12].parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  112: 0100007F:8C3D 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 48213 2 ffff8f0a3a1c0880 0
  301: 0100007F:D6F8 0100007F:8C3D 01 00000000:00030600 00:00000000 00000000  1000        0 48214 2 ffff8f0a3a1c0440 17
";

    #[test]
    fn drops_column_by_inode() {
        assert_eq!(parse_drops(TABLE, 48213), Some(0));
        assert_eq!(parse_drops(TABLE, 48214), Some(17));
        assert_eq!(parse_drops(TABLE, 4821), None);
        assert_eq!(parse_drops("", 1), None);
        assert_eq!(parse_drops("header\n1: short line\n", 1), None);
    }

    #[test]
    fn a_fresh_socket_has_dropped_nothing() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(socket_inode(socket.as_raw_fd()).is_some());
        assert_eq!(socket_drops(&socket), Some(0));
        let mut d = RxDrops::new(&socket);
        d.refresh();
        assert_eq!(d.total(), 0);
    }

    #[test]
    fn an_overflowing_socket_counts_its_drops() {
        // A receive buffer that nobody reads: send until it drops (whatever its size).
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut d = RxDrops::new(&rx);
        let payload = [0u8; 1400];
        let mut sent = 0u64;
        while sent < 100_000 {
            for _ in 0..100 {
                tx.send_to(&payload, rx.local_addr().unwrap()).unwrap();
            }
            sent += 100;
            d.refresh();
            if d.total() > 0 {
                break;
            }
        }
        // Every datagram is either in the buffer or counted dropped.
        let mut queued = 0;
        rx.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 2048];
        while rx.recv_from(&mut buf).is_ok() {
            queued += 1;
        }
        assert!(d.total() > 0);
        assert_eq!(queued + d.total(), sent);
    }
}
