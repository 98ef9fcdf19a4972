//! The per-table (per-worker) segment pool: fixed-size buffers that hold the client packets a
//! session queues until the target acknowledges them, allocated once when the table is made.
//!
//! Two size classes: 256-byte slots for small packets (handshake and control segments, short
//! requests: a 64-byte payload with timestamps is 116 bytes) and 2 KiB slots for MTU-sized ones.
//! A small packet takes a 2 KiB slot when the small slots run out. A packet longer than a 2 KiB
//! slot (GRO can merge segments beyond the MTU; the lab has no jumbo frames) is stored as a
//! chain of 2 KiB slots and gathered into the table's scratch buffer when it is sent, so the
//! pool never falls back to the heap: its memory is bounded by its slot counts.
//!
//! Each slot starts with a 32-byte header (sequence fields, flags, chain link) followed by the
//! packet bytes. What queue upkeep needs (the queue link and the packet length) lives in a
//! dense side array instead, and free slots are kept on a stack: queueing, acknowledging and
//! freeing a segment never read its slot, which is cold by then (it was written one round
//! trip ago). Slots never used yet are handed out in order, so pages the pool never needs are
//! never touched (the buffers come zeroed from the allocator and stay virtual until used).

use crate::wire::{SeqNum, TcpFlags};

/// No slot (end of a list).
pub(crate) const NIL: u32 = u32::MAX;
/// Bytes of a small slot.
pub(crate) const SMALL_SLOT: usize = 256;
/// Bytes of a large slot.
pub(crate) const LARGE_SLOT: usize = 2048;
/// Bytes of the header at the start of each slot.
const HEADER: usize = 32;
/// How many allocations ahead the pool prefetches the slot it expects to hand out.
const PREFETCH_AHEAD: usize = 10;
/// Packet bytes a small slot holds.
pub(crate) const SMALL_DATA: usize = SMALL_SLOT - HEADER;
/// Packet bytes a large slot holds.
pub(crate) const LARGE_DATA: usize = LARGE_SLOT - HEADER;

// Header fields (native byte order; the header never leaves the process).
const CHAIN: usize = 0;
const SEQ: usize = 4;
const ONLINE_ACK: usize = 8;
const SEQ_LEN: usize = 12;
const FLAGS: usize = 16;

/// How a packet was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// In one slot.
    Whole,
    /// In a chain of large slots (longer than one slot).
    Chained,
}

/// The segment pool of one table.
#[derive(Debug)]
pub(crate) struct SegmentPool {
    small: Vec<u8>,
    large: Vec<u8>,
    small_slots: u32,
    large_slots: u32,
    /// Per slot: its queue link plus one (0 = none) in the low 32 bits, the packet length
    /// (of the whole packet, for a chain's head) above; one word, so queue upkeep costs one
    /// load, and zero to start with (the array comes zeroed from the allocator).
    meta: Vec<u64>,
    small_free: Vec<u32>,
    large_free: Vec<u32>,
    /// First small slot never used (slots from here on are untouched).
    small_fresh: u32,
    /// First large slot never used, counted from 0 within the large class.
    large_fresh: u32,
    in_use: usize,
}

impl SegmentPool {
    /// A pool of `small` 256-byte and `large` 2 KiB slots (together below 2^32 - 1).
    pub(crate) fn new(small: usize, large: usize) -> SegmentPool {
        let limit = (u32::MAX - 1) as usize;
        let small = small.min(limit);
        let large = large.min(limit - small);
        SegmentPool {
            small: vec![0u8; small * SMALL_SLOT],
            large: vec![0u8; large * LARGE_SLOT],
            small_slots: small as u32,
            large_slots: large as u32,
            meta: vec![0; small + large],
            small_free: Vec::with_capacity(small),
            large_free: Vec::with_capacity(large),
            small_fresh: 0,
            large_fresh: 0,
            in_use: 0,
        }
    }

    /// Slots in use.
    pub(crate) fn in_use(&self) -> usize {
        self.in_use
    }

    /// Slots in all.
    pub(crate) fn capacity(&self) -> usize {
        self.small_slots as usize + self.large_slots as usize
    }

    /// Bytes of the slot buffers and their side arrays.
    pub(crate) fn bytes(&self) -> usize {
        self.small.len()
            + self.large.len()
            + self.capacity() * 8
            + (self.small_free.capacity() + self.large_free.capacity()) * 4
    }

    #[inline]
    fn slot(&self, id: u32) -> &[u8] {
        if id < self.small_slots {
            let at = id as usize * SMALL_SLOT;
            &self.small[at..at + SMALL_SLOT]
        } else {
            let at = (id - self.small_slots) as usize * LARGE_SLOT;
            &self.large[at..at + LARGE_SLOT]
        }
    }

    #[inline]
    fn slot_mut(&mut self, id: u32) -> &mut [u8] {
        if id < self.small_slots {
            let at = id as usize * SMALL_SLOT;
            &mut self.small[at..at + SMALL_SLOT]
        } else {
            let at = (id - self.small_slots) as usize * LARGE_SLOT;
            &mut self.large[at..at + LARGE_SLOT]
        }
    }

    #[inline]
    fn get32(&self, id: u32, at: usize) -> u32 {
        let slot = self.slot(id);
        u32::from_ne_bytes([slot[at], slot[at + 1], slot[at + 2], slot[at + 3]])
    }

    #[inline]
    fn set32(&mut self, id: u32, at: usize, value: u32) {
        self.slot_mut(id)[at..at + 4].copy_from_slice(&value.to_ne_bytes());
    }

    #[inline]
    fn capacity_of(&self, id: u32) -> usize {
        if id < self.small_slots {
            SMALL_DATA
        } else {
            LARGE_DATA
        }
    }

    #[inline]
    fn take_small(&mut self) -> Option<u32> {
        if let Some(id) = self.small_free.pop() {
            // Start loading a slot that a packet a few packets from now will most likely
            // take (the stack is popped in order unless frees come in between).
            if let Some(&upcoming) = self
                .small_free
                .len()
                .checked_sub(PREFETCH_AHEAD)
                .map(|i| &self.small_free[i])
            {
                self.prefetch(upcoming);
            }
            return Some(id);
        }
        if self.small_fresh < self.small_slots {
            self.small_fresh += 1;
            if self.small_fresh + (PREFETCH_AHEAD as u32) < self.small_slots {
                self.prefetch(self.small_fresh + PREFETCH_AHEAD as u32);
            }
            return Some(self.small_fresh - 1);
        }
        None
    }

    #[inline]
    fn take_large(&mut self) -> Option<u32> {
        if let Some(id) = self.large_free.pop() {
            if let Some(&upcoming) = self
                .large_free
                .len()
                .checked_sub(PREFETCH_AHEAD)
                .map(|i| &self.large_free[i])
            {
                self.prefetch(upcoming);
            }
            return Some(id);
        }
        if self.large_fresh < self.large_slots {
            self.large_fresh += 1;
            if self.large_fresh + (PREFETCH_AHEAD as u32) < self.large_slots {
                self.prefetch(self.small_slots + self.large_fresh + PREFETCH_AHEAD as u32);
            }
            return Some(self.small_slots + self.large_fresh - 1);
        }
        None
    }

    #[inline]
    fn give(&mut self, id: u32) {
        if id < self.small_slots {
            self.small_free.push(id);
        } else {
            self.large_free.push(id);
        }
        self.in_use -= 1;
    }

    /// Hints the CPU to load a slot's first lines (header and packet headers).
    #[inline]
    fn prefetch(&self, id: u32) {
        super::prefetch::prefetch_bytes(self.slot(id).as_ptr(), 128);
    }

    /// Stores a packet with its segment fields; the slot's queue link starts empty. `None`
    /// when the pool has no room for it.
    pub(crate) fn alloc(
        &mut self,
        packet: &[u8],
        seq: SeqNum,
        seq_len: u32,
        flags: TcpFlags,
        online_ack: SeqNum,
    ) -> Option<(u32, Stored)> {
        let len = packet.len().min(u16::MAX as usize);
        let packet = &packet[..len];
        let (head, stored) = if len <= SMALL_DATA {
            let id = self.take_small().or_else(|| self.take_large())?;
            self.in_use += 1;
            self.slot_mut(id)[HEADER..HEADER + len].copy_from_slice(packet);
            self.set32(id, CHAIN, NIL);
            (id, Stored::Whole)
        } else if len <= LARGE_DATA {
            let id = self.take_large()?;
            self.in_use += 1;
            self.slot_mut(id)[HEADER..HEADER + len].copy_from_slice(packet);
            self.set32(id, CHAIN, NIL);
            (id, Stored::Whole)
        } else {
            (self.alloc_chain(packet)?, Stored::Chained)
        };
        self.meta[head as usize] = (len as u64) << 32;
        self.set32(head, SEQ, seq.0);
        self.set32(head, ONLINE_ACK, online_ack.0);
        self.set32(head, SEQ_LEN, seq_len);
        self.slot_mut(head)[FLAGS] = flags.bits();
        Some((head, stored))
    }

    /// Stores a packet longer than one large slot across several, linked by their chain field.
    fn alloc_chain(&mut self, packet: &[u8]) -> Option<u32> {
        let chunks = packet.len().div_ceil(LARGE_DATA);
        let available = self.large_free.len() + (self.large_slots - self.large_fresh) as usize;
        if available < chunks {
            return None;
        }
        let mut head = NIL;
        let mut last = NIL;
        for i in 0..chunks {
            let id = self.take_large().expect("counted above");
            self.in_use += 1;
            let part = &packet[i * LARGE_DATA..packet.len().min((i + 1) * LARGE_DATA)];
            self.slot_mut(id)[HEADER..HEADER + part.len()].copy_from_slice(part);
            self.set32(id, CHAIN, NIL);
            if last == NIL {
                head = id;
            } else {
                self.set32(last, CHAIN, id);
            }
            last = id;
        }
        Some(head)
    }

    /// Returns a segment's slots (the whole chain) to the pool. Reads the slot itself only
    /// for a chain.
    #[inline]
    pub(crate) fn free(&mut self, id: u32) {
        if self.len(id) > self.capacity_of(id) {
            let mut at = id;
            while at != NIL {
                let chain = self.get32(at, CHAIN);
                self.give(at);
                at = chain;
            }
        } else {
            self.give(id);
        }
    }

    /// The next segment in its session's queue.
    #[inline]
    pub(crate) fn next(&self, id: u32) -> u32 {
        (self.meta[id as usize] as u32).wrapping_sub(1)
    }

    /// Links `next` behind `id` in its session's queue.
    #[inline]
    pub(crate) fn set_next(&mut self, id: u32, next: u32) {
        let meta = &mut self.meta[id as usize];
        *meta = (*meta & !0xFFFF_FFFF) | u64::from(next.wrapping_add(1));
    }

    /// First sequence number of the segment.
    #[inline]
    pub(crate) fn seq(&self, id: u32) -> SeqNum {
        SeqNum(self.get32(id, SEQ))
    }

    /// Moves the segment's first sequence number (the packet is rewritten separately).
    #[inline]
    pub(crate) fn set_seq(&mut self, id: u32, seq: SeqNum) {
        self.set32(id, SEQ, seq.0);
    }

    /// Sequence space the segment takes (payload, SYN and FIN).
    #[inline]
    pub(crate) fn seq_len(&self, id: u32) -> u32 {
        self.get32(id, SEQ_LEN)
    }

    /// End of the segment's sequence space.
    #[inline]
    pub(crate) fn end(&self, id: u32) -> SeqNum {
        self.seq(id).add(self.seq_len(id))
    }

    /// The online server's acknowledgement number the client sent with the segment.
    #[inline]
    pub(crate) fn online_ack(&self, id: u32) -> SeqNum {
        SeqNum(self.get32(id, ONLINE_ACK))
    }

    /// TCP flags of the segment.
    #[inline]
    pub(crate) fn flags(&self, id: u32) -> TcpFlags {
        TcpFlags(self.slot(id)[FLAGS])
    }

    /// Length of the stored packet.
    #[inline]
    pub(crate) fn len(&self, id: u32) -> usize {
        (self.meta[id as usize] >> 32) as usize
    }

    /// True when the packet spans a chain of slots (use [`SegmentPool::gather`]).
    #[inline]
    pub(crate) fn is_chained(&self, id: u32) -> bool {
        self.len(id) > self.capacity_of(id)
    }

    /// The packet of a segment held in one slot.
    #[inline]
    pub(crate) fn packet_mut(&mut self, id: u32) -> &mut [u8] {
        let len = self.len(id);
        debug_assert!(len <= self.capacity_of(id));
        &mut self.slot_mut(id)[HEADER..HEADER + len]
    }

    /// Copies a segment's packet, chained or not, into `buf` (replacing its contents).
    pub(crate) fn gather(&self, id: u32, buf: &mut Vec<u8>) {
        buf.clear();
        let mut left = self.len(id);
        let mut at = id;
        while at != NIL && left > 0 {
            let take = left.min(self.capacity_of(at));
            buf.extend_from_slice(&self.slot(at)[HEADER..HEADER + take]);
            left -= take;
            at = self.get32(at, CHAIN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(len: usize, fill: u8) -> Vec<u8> {
        (0..len).map(|i| fill.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn classes_fallback_and_exhaustion() {
        let mut pool = SegmentPool::new(2, 2);
        let f = TcpFlags::ACK;
        let (a, _) = pool
            .alloc(&packet(100, 1), SeqNum(1), 60, f, SeqNum(9))
            .unwrap();
        let (b, _) = pool
            .alloc(&packet(200, 2), SeqNum(61), 1, f, SeqNum(9))
            .unwrap();
        assert!(a < 2 && b < 2, "small packets take small slots");
        // Small slots exhausted: a small packet falls back to a large slot.
        let (c, _) = pool
            .alloc(&packet(50, 3), SeqNum(62), 1, f, SeqNum(9))
            .unwrap();
        assert!(c >= 2);
        let (d, _) = pool
            .alloc(&packet(1500, 4), SeqNum(63), 1, f, SeqNum(9))
            .unwrap();
        assert!(d >= 2);
        assert!(pool
            .alloc(&packet(10, 5), SeqNum(64), 1, f, SeqNum(9))
            .is_none());
        assert_eq!(pool.in_use(), 4);
        assert_eq!(pool.packet_mut(d), &packet(1500, 4)[..]);
        assert_eq!(
            (pool.seq(a), pool.seq_len(a), pool.online_ack(a)),
            (SeqNum(1), 60, SeqNum(9))
        );
        assert_eq!(pool.flags(b), f);
        pool.free(b);
        // LIFO: the slot just freed is handed out again.
        let (e, _) = pool
            .alloc(&packet(20, 6), SeqNum(65), 1, f, SeqNum(9))
            .unwrap();
        assert_eq!(e, b);
        for id in [a, c, d, e] {
            pool.free(id);
        }
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn oversize_packets_are_chained_and_gathered() {
        let mut pool = SegmentPool::new(0, 4);
        let big = packet(5000, 7);
        let (id, stored) = pool
            .alloc(&big, SeqNum(1), 4960, TcpFlags::ACK, SeqNum(0))
            .unwrap();
        assert_eq!(stored, Stored::Chained);
        assert!(pool.is_chained(id));
        assert_eq!(pool.in_use(), 3);
        let mut buf = Vec::new();
        pool.gather(id, &mut buf);
        assert_eq!(buf, big);
        // Not enough slots for a second one: nothing leaks.
        assert!(pool
            .alloc(&big, SeqNum(1), 4960, TcpFlags::ACK, SeqNum(0))
            .is_none());
        assert_eq!(pool.in_use(), 3);
        pool.free(id);
        assert_eq!(pool.in_use(), 0);
        let (id, stored) = pool
            .alloc(&packet(100, 1), SeqNum(1), 1, TcpFlags::ACK, SeqNum(0))
            .unwrap();
        assert_eq!(stored, Stored::Whole);
        assert!(!pool.is_chained(id));
    }
}
