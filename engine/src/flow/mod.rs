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

    /// The four fields packed in two words (client, target).
    #[inline]
    fn words(&self) -> (u64, u64) {
        (
            (u64::from(u32::from(self.client_ip)) << 16) | u64::from(self.client_port),
            (u64::from(u32::from(self.target_ip)) << 16) | u64::from(self.target_port),
        )
    }

    /// A fast 64-bit hash of the four fields (multiply-xorshift), the same in every run and
    /// process. Unkeyed: anyone can compute keys that collide, so tables that hold keys chosen
    /// by the network use a [`FlowHasher`] instead.
    #[inline]
    pub fn hash64(&self) -> u64 {
        let (a, b) = self.words();
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

/// The hash of the flow tables that hold keys the network chooses (the session index; maps
/// of routes use std's keyed `RandomState`): a folded-multiply hash under a 256-bit key drawn
/// at random per table, so collisions cannot be computed from outside and a flood of spoofed
/// 4-tuples cannot turn look-ups into long probes.
#[derive(Clone, Copy)]
pub struct FlowHasher {
    key: [u64; 4],
}

impl FlowHasher {
    /// A hasher under a fresh random key (from the operating system's randomness, through
    /// std's `RandomState`).
    pub fn random() -> FlowHasher {
        use std::hash::BuildHasher;
        let state = std::collections::hash_map::RandomState::new();
        FlowHasher {
            key: [0u8, 1, 2, 3].map(|i| state.hash_one(i)),
        }
    }

    /// A hasher under a given key (tests and benchmarks that want the same layout every run).
    pub const fn with_key(key: [u64; 4]) -> FlowHasher {
        FlowHasher { key }
    }

    /// The hash of `flow` under this key.
    #[inline]
    pub fn hash(&self, flow: &FlowKey) -> u64 {
        let (a, b) = flow.words();
        let h = folded_multiply(a ^ self.key[0], b ^ self.key[1]);
        folded_multiply(h ^ self.key[2], self.key[3] | 1)
    }
}

impl fmt::Debug for FlowHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays secret, also in logs.
        f.write_str("FlowHasher")
    }
}

/// The high and low halves of the 128-bit product, xored.
#[inline]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl Hash for FlowKey {
    /// Feeds the four fields themselves (not [`FlowKey::hash64`]): under a keyed hasher such
    /// as std's `RandomState`, colliding keys cannot be computed.
    fn hash<H: Hasher>(&self, state: &mut H) {
        let (a, b) = self.words();
        state.write_u64(a);
        state.write_u64(b);
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
    fn keyed_hash_depends_on_the_key_and_every_field() {
        let one = FlowHasher::with_key([1, 2, 3, 4]);
        let other = FlowHasher::with_key([5, 6, 7, 8]);
        let a = key([10, 0, 0, 1], 40000, [10, 0, 0, 2], 8080);
        assert_eq!(one.hash(&a), one.hash(&a));
        assert_ne!(one.hash(&a), other.hash(&a));
        // Keys that collide under the unkeyed hash64 (found by search) need not collide here;
        // and 100k neighbouring ports fill a 2^17-slot index evenly.
        let mut slots = vec![0u32; 1 << 17];
        let random = FlowHasher::random();
        for p in 0..100_000u32 {
            let k = key([10, 0, (p >> 16) as u8, 1], p as u16, [10, 0, 0, 2], 8080);
            slots[(random.hash(&k) as usize) & ((1 << 17) - 1)] += 1;
        }
        assert!(
            slots.iter().all(|&n| n < 12),
            "a slot holds {:?}",
            slots.iter().max()
        );
        for field in 0..4 {
            let mut b = a;
            match field {
                0 => b.client_ip = Ipv4Addr::new(10, 0, 0, 9),
                1 => b.client_port = 40001,
                2 => b.target_ip = Ipv4Addr::new(10, 0, 0, 9),
                _ => b.target_port = 8081,
            }
            assert_ne!(one.hash(&a), one.hash(&b), "field {field}");
        }
        assert_eq!(format!("{random:?}"), "FlowHasher");
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
