//! Flow identity: the target-facing 4-tuple [`FlowKey`] that names a replayed session
//! everywhere (session tables, intercept routes, reply dispatch), its hash, and the shard
//! (worker) that owns it.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddrV4};

/// A replayed session as the target sees it: the client address tcpcopy sends from (after
/// `-c` and port transforms) and the target address it sends to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    /// Client IPv4 address as replayed.
    pub client_ip: Ipv4Addr,
    /// Client port as replayed.
    pub client_port: u16,
    /// Target server IPv4 address.
    pub target_ip: Ipv4Addr,
    /// Target server port.
    pub target_port: u16,
}

impl FlowKey {
    /// A key from its four parts.
    pub fn new(client: SocketAddrV4, target: SocketAddrV4) -> FlowKey {
        FlowKey {
            client_ip: *client.ip(),
            client_port: client.port(),
            target_ip: *target.ip(),
            target_port: target.port(),
        }
    }

    /// The client side.
    pub fn client(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.client_ip, self.client_port)
    }

    /// The target side.
    pub fn target(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.target_ip, self.target_port)
    }

    /// A fast 64-bit hash of the four fields (multiply-xorshift; stable across runs and
    /// processes, so tcpcopy can compute the owner of a reply from the reply alone).
    #[inline]
    pub fn hash64(&self) -> u64 {
        let a = (u64::from(u32::from(self.client_ip)) << 16) | u64::from(self.client_port);
        let b = (u64::from(u32::from(self.target_ip)) << 16) | u64::from(self.target_port);
        let mut h = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b;
        h = (h ^ (h >> 32)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        h ^ (h >> 32)
    }

    /// The worker (of `workers`) that owns this flow: [`port_shard`] of the client port.
    ///
    /// Only the client port takes part: the capture fanout computes the owner in the kernel
    /// from the captured packet, whose client address `-c` may rewrite afterwards, while the
    /// port survives (and where tcpcopy chooses ports itself, it keeps their shard).
    #[inline]
    pub fn shard(&self, workers: usize) -> usize {
        port_shard(self.client_port, workers)
    }
}

/// The shard of a client port among `workers`: `((port * 0x9E3779B1) >> 16) % workers` in
/// 32-bit wrapping arithmetic. Multiplying by the golden ratio spreads ports that share low bits
/// (Linux hands out even ephemeral ports to `connect()`), and the function is simple enough for
/// the classic BPF fanout program that applies it in the kernel
/// ([`crate::port::afpacket::port_shard_program`]).
#[inline]
pub fn port_shard(port: u16, workers: usize) -> usize {
    if workers <= 1 {
        return 0;
    }
    ((u32::from(port).wrapping_mul(0x9E37_79B1) >> 16) % workers as u32) as usize
}

impl Hash for FlowKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash64());
    }
}

impl fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}->{}:{}",
            self.client_ip, self.client_port, self.target_ip, self.target_port
        )
    }
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: [u8; 4], cp: u16, t: [u8; 4], tp: u16) -> FlowKey {
        FlowKey::new(
            SocketAddrV4::new(c.into(), cp),
            SocketAddrV4::new(t.into(), tp),
        )
    }

    #[test]
    fn hash_separates_fields_and_shards_spread() {
        let a = key([10, 0, 0, 1], 40000, [10, 0, 0, 2], 8080);
        let b = key([10, 0, 0, 1], 40001, [10, 0, 0, 2], 8080);
        let c = key([10, 0, 0, 2], 8080, [10, 0, 0, 1], 40000);
        assert_ne!(a.hash64(), b.hash64());
        assert_ne!(a.hash64(), c.hash64());
        assert_eq!(a.shard(1), 0);
        // Even ports only (what Linux gives connect()) still spread evenly.
        for workers in [2usize, 3, 4, 8] {
            let mut counts = vec![0usize; workers];
            for p in 0..8000u16 {
                counts[key([10, 0, 0, 1], 32768 + 2 * p, [10, 0, 0, 2], 8080).shard(workers)] += 1;
            }
            let even = 8000 / workers;
            assert!(
                counts
                    .iter()
                    .all(|&n| n > even * 9 / 10 && n < even * 11 / 10),
                "{counts:?}"
            );
        }
        // The shard depends on the client port only.
        assert_eq!(
            a.shard(4),
            key([10, 9, 9, 7], 40000, [10, 0, 0, 3], 80).shard(4)
        );
        assert_eq!(
            port_shard(40000, 4),
            ((40000u32.wrapping_mul(0x9E37_79B1) >> 16) % 4) as usize
        );
        assert_eq!(format!("{a}"), "10.0.0.1:40000->10.0.0.2:8080");
    }
}
