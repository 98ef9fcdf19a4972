//! Zero-copy views over packet bytes: Ethernet (with 802.1Q), IPv4, TCP (with options), UDP,
//! and the Internet checksum (full and RFC 1624 incremental).
//!
//! Every view follows one shape: `View::new_checked(buffer)` validates untrusted input so that
//! later getters cannot panic; getters are named after the field; setters (`set_*`) live in a
//! separate impl block that needs a mutable buffer. Values in host order are newtypes
//! ([`SeqNum`]); raw bytes never leave this module.

pub mod checksum;
pub mod ethernet;
pub mod ipv4;
pub mod tcp;
pub mod udp;

pub use ethernet::EthernetFrame;
pub use ipv4::Ipv4Packet;
pub use tcp::{TcpFlags, TcpOption, TcpPacket, TcpRepr};
pub use udp::UdpPacket;

use std::fmt;

/// Why a buffer was not accepted as a header. Each variant is a drop reason counted by the
/// pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WireError {
    /// The buffer is shorter than the header it should hold.
    #[error("truncated header")]
    Truncated,
    /// The IP version field is not 4.
    #[error("not IPv4")]
    BadVersion,
    /// The IPv4 header length (IHL) is below 5 words or beyond the buffer.
    #[error("bad IPv4 header length")]
    BadHeaderLen,
    /// The IPv4 total length is below the header length or beyond the buffer.
    #[error("IPv4 total length disagrees with the buffer")]
    BadTotalLen,
    /// The TCP data offset is below 5 words or beyond the segment.
    #[error("bad TCP data offset")]
    BadDataOffset,
    /// A TCP option's length runs past the header or is malformed.
    #[error("malformed TCP option")]
    BadOption,
    /// The UDP length field disagrees with the buffer.
    #[error("bad UDP length")]
    BadUdpLen,
}

/// A TCP sequence number in host order, compared with wrapping (RFC 1982) arithmetic.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SeqNum(pub u32);

impl SeqNum {
    /// `self + n`, wrapping.
    #[inline]
    #[allow(clippy::should_implement_trait)] // by value with a u32, as smoltcp's TcpSeqNumber
    pub fn add(self, n: u32) -> SeqNum {
        SeqNum(self.0.wrapping_add(n))
    }
    /// Signed distance `self - other` (positive when `self` is after `other`).
    #[inline]
    pub fn diff(self, other: SeqNum) -> i32 {
        self.0.wrapping_sub(other.0) as i32
    }
    /// True when `self` comes strictly after `other`.
    #[inline]
    pub fn after(self, other: SeqNum) -> bool {
        self.diff(other) > 0
    }
    /// True when `self` comes strictly before `other`.
    #[inline]
    pub fn before(self, other: SeqNum) -> bool {
        self.diff(other) < 0
    }
    /// The later of two sequence numbers.
    #[inline]
    pub fn max(self, other: SeqNum) -> SeqNum {
        if self.after(other) {
            self
        } else {
            other
        }
    }
}

impl fmt::Debug for SeqNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for SeqNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_wraps() {
        let a = SeqNum(u32::MAX - 1);
        let b = a.add(4);
        assert_eq!(b, SeqNum(2));
        assert!(b.after(a));
        assert!(a.before(b));
        assert_eq!(b.diff(a), 4);
        assert_eq!(a.max(b), b);
    }
}
