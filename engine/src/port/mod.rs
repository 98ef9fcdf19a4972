//! Where packets come from and where they go: the [`RxPort`] and [`TxPort`] traits over bursts,
//! and their backends.
//!
//! - [`afpacket`]: capture on a Linux interface through an AF_PACKET TPACKET_V3 ring with a
//!   kernel BPF filter compiled from a pcap filter expression.
//! - [`rawsock`]: IP-layer transmit on a raw socket with `IP_HDRINCL`, batched with `sendmmsg`.
//! - [`memory`]: in-memory ports for tests and benchmarks.
//! - [`filter`]: a pcap filter run in user space, for ports without a kernel filter (DPDK).
//!
//! Receive is zero-copy: `rx_burst` lends each frame to a closure for the duration of the call;
//! whoever keeps a packet copies it. Transmit takes a [`TxBatch`] of IPv4 packets whose buffers
//! are allocated once and reused.

pub mod afpacket;
pub mod dedup;
#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod filter;
pub mod memory;
pub mod rawsock;

use std::io;
use std::os::fd::RawFd;

/// Largest packet a [`TxBatch`] slot holds (an IPv4 packet up to a jumbo-ish MTU).
pub const MAX_PACKET: usize = 9216;

/// How the bytes of a port's frames start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkType {
    /// An Ethernet II header, optionally 802.1Q/802.1ad tagged.
    #[default]
    Ethernet,
    /// The IPv4 header (no link-layer header: captures on every interface, raw IP files).
    RawIp,
}

/// One received frame, lent for the duration of the `rx_burst` callback.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The bytes from the link-layer header on (Ethernet for afpacket; as pushed for memory).
    pub data: &'a [u8],
    /// The length of the packet on the wire (may exceed `data.len()` when the capture was cut).
    pub wire_len: usize,
    /// Capture time in nanoseconds since the Unix epoch, as reported by the kernel (0 if unknown).
    pub timestamp_ns: u64,
}

/// What a port counted. Backends fill the fields they know; the rest stay zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames handed to the caller.
    pub rx_packets: u64,
    /// Bytes handed to the caller.
    pub rx_bytes: u64,
    /// Frames the kernel or device dropped before we saw them (ring full).
    pub rx_dropped: u64,
    /// Frames left out because the same frame had just been seen on another captured
    /// interface (a bridge and its port, a VLAN and its parent; see [`dedup`]).
    pub rx_duplicates: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets that could not be sent (counted, then discarded).
    pub tx_errors: u64,
}

/// A source of frames.
pub trait RxPort: Send {
    /// Hands at most `max` received frames to `sink`, in arrival order, and returns how many.
    /// Returns `Ok(0)` at once when nothing is waiting (never blocks).
    ///
    /// # Errors
    /// An unrecoverable error of the underlying socket or device.
    fn rx_burst(&mut self, max: usize, sink: &mut dyn FnMut(Frame<'_>)) -> io::Result<usize>;

    /// A file descriptor that becomes readable when frames are waiting, for idle back-off with
    /// `poll(2)`; `None` when the port cannot be waited on (then the caller sleeps briefly).
    fn wait_fd(&self) -> Option<RawFd>;

    /// Counters so far.
    fn stats(&self) -> PortStats;

    /// How the frames start (Ethernet unless the port says otherwise).
    fn link_type(&self) -> LinkType {
        LinkType::Ethernet
    }

    /// Tells a finite source (a capture file) whether everything it handed out so far has been
    /// dealt with — for the tcpcopy worker: no session is active. A file replay ends a round
    /// only once it hears `true` after its last frame. Live ports ignore it (the default).
    fn consumer_idle(&mut self, idle: bool) {
        let _ = idle;
    }

    /// True when a finite source has nothing more to give (every round of a file replay is
    /// done): the caller may stop. Live ports never finish (the default).
    fn finished(&self) -> bool {
        false
    }
}

/// A sink of IPv4 packets.
pub trait TxPort: Send {
    /// Sends every packet in `batch`, then clears it. Returns how many were sent; packets that
    /// could not be sent are counted in [`PortStats::tx_errors`] and dropped.
    ///
    /// # Errors
    /// An unrecoverable error of the underlying socket or device.
    fn tx_burst(&mut self, batch: &mut TxBatch) -> io::Result<usize>;

    /// Counters so far.
    fn stats(&self) -> PortStats;
}

/// A reusable batch of outgoing IPv4 packets: fixed slots allocated once.
#[derive(Debug)]
pub struct TxBatch {
    slots: Vec<Vec<u8>>,
    len: usize,
}

impl TxBatch {
    /// A batch with room for `capacity` packets of up to [`MAX_PACKET`] bytes.
    pub fn new(capacity: usize) -> TxBatch {
        TxBatch {
            slots: (0..capacity)
                .map(|_| Vec::with_capacity(MAX_PACKET))
                .collect(),
            len: 0,
        }
    }

    /// Packets queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no packet is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when no more packets fit.
    pub fn is_full(&self) -> bool {
        self.len == self.slots.len()
    }

    /// Copies `packet` into the next slot. Returns false (and copies nothing) when the batch is
    /// full or the packet is larger than [`MAX_PACKET`].
    pub fn push(&mut self, packet: &[u8]) -> bool {
        if self.is_full() || packet.len() > MAX_PACKET {
            return false;
        }
        let slot = &mut self.slots[self.len];
        slot.clear();
        slot.extend_from_slice(packet);
        self.len += 1;
        true
    }

    /// The next free slot, cleared, for building a packet in place; `None` when full.
    /// The packet counts once [`TxBatch::commit`] is called.
    pub fn next_slot(&mut self) -> Option<&mut Vec<u8>> {
        if self.is_full() {
            return None;
        }
        let slot = &mut self.slots[self.len];
        slot.clear();
        Some(slot)
    }

    /// Counts the slot returned by the last [`TxBatch::next_slot`] as a queued packet.
    pub fn commit(&mut self) {
        debug_assert!(!self.is_full());
        self.len += 1;
    }

    /// The queued packets.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.slots[..self.len].iter().map(|s| s.as_slice())
    }

    /// Forgets every queued packet (buffers are kept for reuse).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Forgets the first `n` packets, keeping the rest in order (after a partial send).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.slots[..self.len].rotate_left(n);
        self.len -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_push_consume() {
        let mut b = TxBatch::new(3);
        assert!(b.push(&[1]));
        assert!(b.push(&[2, 2]));
        assert!(b.push(&[3]));
        assert!(!b.push(&[4]));
        assert!(b.is_full());
        b.consume(2);
        assert_eq!(b.packets().collect::<Vec<_>>(), vec![&[3u8][..]]);
        let slot = b.next_slot().unwrap();
        slot.extend_from_slice(&[5, 5]);
        b.commit();
        assert_eq!(b.len(), 2);
        b.clear();
        assert!(b.is_empty());
        assert!(!b.push(&vec![0; MAX_PACKET + 1]));
    }
}
