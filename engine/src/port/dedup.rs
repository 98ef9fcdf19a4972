//! Leaving out a frame that was just seen on another captured interface.
//!
//! When a capture covers several interfaces that carry the same traffic (a bridge and its
//! port, a VLAN sub-interface and its parent, a bond and its slaves), the kernel hands the same
//! packet to the capture once per interface, microseconds apart. A replayer must send it once.
//!
//! [`Dedup`] remembers a keyed 64-bit hash of each packet's first bytes (the IPv4 header and
//! the transport header, whose checksum covers the payload) with its capture time in a fixed
//! table, and calls a packet a duplicate when the same hash was seen less than the window ago.
//! A client's own retransmission is not a duplicate: it comes a retransmission timeout later
//! (200 ms at least on Linux), long after the window (a few milliseconds), and usually with
//! another IP identification and TCP timestamp. The table never grows (hostile traffic only
//! overwrites slots), and the hash key is random per process, so nobody can compute packets
//! that collide with another client's.

use std::hash::{BuildHasher, RandomState};

/// Bytes of a packet that enter the hash: an IPv4 header and a TCP header, both with options.
const HASHED_BYTES: usize = 120;

/// Default window: packets equal to one seen less than this long ago are duplicates.
pub const DEFAULT_WINDOW_NS: u64 = 5_000_000;

/// Default number of slots (a power of two).
pub const DEFAULT_SLOTS: usize = 4096;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    hash: u64,
    at_ns: u64,
}

/// A fixed table of recently seen packets. See the module docs.
#[derive(Debug)]
pub struct Dedup {
    slots: Box<[Slot]>,
    mask: usize,
    window_ns: u64,
    hasher: RandomState,
}

impl Dedup {
    /// A table of `slots` entries (rounded up to a power of two, at least 16) that calls a
    /// packet a duplicate when an equal one was seen less than `window_ns` before it.
    pub fn new(slots: usize, window_ns: u64) -> Dedup {
        let slots = slots.clamp(16, 1 << 20).next_power_of_two();
        Dedup {
            slots: vec![Slot::default(); slots].into_boxed_slice(),
            mask: slots - 1,
            window_ns,
            hasher: RandomState::new(),
        }
    }

    /// True when `packet` (from its network header on, as captured at `at_ns`) equals a packet
    /// seen less than the window before; otherwise it is remembered and false is returned.
    /// Capture times that go backwards (several sockets, clock steps) count as "just now".
    pub fn is_duplicate(&mut self, packet: &[u8], at_ns: u64) -> bool {
        let head = &packet[..packet.len().min(HASHED_BYTES)];
        // The length goes in too: two packets that differ only after the hashed bytes differ
        // in length or in the transport checksum, which is hashed.
        let hash = self.hasher.hash_one((packet.len(), head)) | 1;
        let slot = &mut self.slots[(hash as usize) & self.mask];
        let duplicate = slot.hash == hash && at_ns.saturating_sub(slot.at_ns) < self.window_ns;
        if !duplicate {
            *slot = Slot { hash, at_ns };
        }
        duplicate
    }
}

impl Default for Dedup {
    fn default() -> Dedup {
        Dedup::new(DEFAULT_SLOTS, DEFAULT_WINDOW_NS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(id: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![
            0x45,
            0,
            0,
            0,
            (id >> 8) as u8,
            id as u8,
            0x40,
            0,
            64,
            6,
            0,
            0,
        ];
        p.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        p.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18]);
        p.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn same_packet_within_the_window_is_a_duplicate_once_per_copy() {
        let mut d = Dedup::default();
        let p = packet(7, b"GET / HTTP/1.1\r\n\r\n");
        assert!(!d.is_duplicate(&p, 1_000_000));
        assert!(d.is_duplicate(&p, 1_000_020), "second interface's copy");
        assert!(d.is_duplicate(&p, 1_000_040), "third interface's copy");
    }

    #[test]
    fn the_same_bytes_after_the_window_are_a_new_packet() {
        let mut d = Dedup::new(64, 5_000_000);
        let p = packet(7, b"x");
        assert!(!d.is_duplicate(&p, 0));
        // A retransmission with identical bytes 200 ms later is replayed.
        assert!(!d.is_duplicate(&p, 200_000_000));
        assert!(d.is_duplicate(&p, 200_000_001));
    }

    #[test]
    fn different_packets_are_never_duplicates() {
        let mut d = Dedup::new(16, u64::MAX);
        let mut seen = std::collections::HashSet::new();
        for id in 0..2000u16 {
            let p = packet(id, &id.to_be_bytes());
            assert!(seen.insert(p.clone()));
            assert!(!d.is_duplicate(&p, 5), "packet {id}");
        }
        // Bytes beyond the hashed prefix count through the length.
        let long = packet(1, &[0u8; 300]);
        let longer = packet(1, &[0u8; 301]);
        assert!(!d.is_duplicate(&long, 5));
        assert!(!d.is_duplicate(&longer, 5));
    }

    #[test]
    fn clock_going_backwards_and_empty_packets_do_not_panic() {
        let mut d = Dedup::new(0, DEFAULT_WINDOW_NS);
        assert!(!d.is_duplicate(&[], u64::MAX));
        assert!(d.is_duplicate(&[], 0));
        assert!(!d.is_duplicate(&[1], 0));
    }
}
