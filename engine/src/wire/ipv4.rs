//! IPv4 packets (RFC 791).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Version|  IHL  |   DSCP/ECN    |          Total Length         |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |         Identification        |Flags|      Fragment Offset    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  Time to Live |    Protocol   |         Header Checksum       |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                       Source Address                          |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    Destination Address                        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    Options                    |    Padding    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//! The buffer may extend past Total Length (Ethernet padding); those bytes are ignored.

use std::net::Ipv4Addr;

use super::checksum;
use super::WireError;

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Length of an IPv4 header without options.
pub const HEADER_LEN: usize = 20;

mod field {
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const TOTAL_LEN: usize = 2;
    pub const IDENT: usize = 4;
    pub const FLAGS_FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
}

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const FRAG_MASK: u16 = 0x1FFF;

/// A read (or, with a mutable buffer, write) view of an IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Wraps `buffer` without validation; getters may panic on malformed input.
    #[inline]
    pub fn new_unchecked(buffer: T) -> Self {
        Ipv4Packet { buffer }
    }

    /// Wraps untrusted `buffer` after [`check_len`](Self::check_len).
    ///
    /// # Errors
    /// See [`check_len`](Self::check_len).
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Validates the header so that no getter can panic.
    ///
    /// # Errors
    /// * [`WireError::Truncated`]: fewer than 20 bytes;
    /// * [`WireError::BadVersion`]: version is not 4;
    /// * [`WireError::BadHeaderLen`]: IHL below 5 or header beyond the buffer;
    /// * [`WireError::BadTotalLen`]: total length below the header length or beyond the buffer.
    #[inline]
    pub fn check_len(&self) -> Result<(), WireError> {
        let buf = self.buffer.as_ref();
        if buf.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if self.version() != 4 {
            return Err(WireError::BadVersion);
        }
        let header_len = self.header_len();
        if header_len < HEADER_LEN || header_len > buf.len() {
            return Err(WireError::BadHeaderLen);
        }
        let total_len = usize::from(self.total_len());
        if total_len < header_len || total_len > buf.len() {
            return Err(WireError::BadTotalLen);
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    #[inline]
    fn be16(&self, at: usize) -> u16 {
        let buf = self.buffer.as_ref();
        u16::from_be_bytes([buf[at], buf[at + 1]])
    }

    #[inline]
    fn be32(&self, at: usize) -> u32 {
        let buf = self.buffer.as_ref();
        u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
    }

    /// IP version (4 for an accepted packet).
    #[inline]
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// Header length in bytes (IHL × 4).
    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0F) * 4
    }

    /// The DSCP/ECN byte (formerly TOS).
    #[inline]
    pub fn dscp_ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN]
    }

    /// Total length of header and payload, in bytes.
    #[inline]
    pub fn total_len(&self) -> u16 {
        self.be16(field::TOTAL_LEN)
    }

    /// Identification field.
    #[inline]
    pub fn ident(&self) -> u16 {
        self.be16(field::IDENT)
    }

    /// The Don't Fragment flag.
    #[inline]
    pub fn dont_frag(&self) -> bool {
        self.be16(field::FLAGS_FRAG) & FLAG_DF != 0
    }

    /// The More Fragments flag.
    #[inline]
    pub fn more_frags(&self) -> bool {
        self.be16(field::FLAGS_FRAG) & FLAG_MF != 0
    }

    /// Fragment offset in bytes (the field × 8).
    #[inline]
    pub fn frag_offset(&self) -> u16 {
        (self.be16(field::FLAGS_FRAG) & FRAG_MASK) << 3
    }

    /// True for any fragment (offset ≠ 0 or MF set): such packets carry no complete
    /// transport header, or only part of the transport payload.
    #[inline]
    pub fn is_fragment(&self) -> bool {
        self.be16(field::FLAGS_FRAG) & (FLAG_MF | FRAG_MASK) != 0
    }

    /// Time to live.
    #[inline]
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    /// Payload protocol number ([`PROTO_TCP`], [`PROTO_UDP`], ...).
    #[inline]
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    /// Header checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        self.be16(field::CHECKSUM)
    }

    /// Source address.
    #[inline]
    pub fn src_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.be32(field::SRC))
    }

    /// Destination address.
    #[inline]
    pub fn dst_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.be32(field::DST))
    }

    /// Header options (possibly empty).
    #[inline]
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.header_len()]
    }

    /// The payload: bytes from the end of the header to Total Length (padding excluded).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..usize::from(self.total_len())]
    }

    /// True when the header checksum verifies.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        let header = &self.buffer.as_ref()[..self.header_len()];
        checksum::fold(checksum::sum(header, 0)) == 0xFFFF
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    #[inline]
    fn set_be16(&mut self, at: usize, value: u16) {
        self.buffer.as_mut()[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }

    #[inline]
    fn set_be32(&mut self, at: usize, value: u32) {
        self.buffer.as_mut()[at..at + 4].copy_from_slice(&value.to_be_bytes());
    }

    /// Writes version 4 and IHL = `header_len / 4`. This changes where the payload starts,
    /// so a view made with `new_checked` must be re-checked if the result is untrusted.
    ///
    /// # Panics
    /// Debug builds assert that `header_len` is a multiple of 4 between 20 and 60.
    #[inline]
    pub fn set_version_ihl(&mut self, header_len: usize) {
        debug_assert!(header_len & 3 == 0 && (HEADER_LEN..=60).contains(&header_len));
        self.buffer.as_mut()[field::VER_IHL] = 0x40 | ((header_len / 4) as u8 & 0x0F);
    }

    /// Sets the DSCP/ECN byte.
    #[inline]
    pub fn set_dscp_ecn(&mut self, value: u8) {
        self.buffer.as_mut()[field::DSCP_ECN] = value;
    }

    /// Sets Total Length. Invalidates what `check_len` established: the payload getter
    /// panics if the new value lies beyond the buffer.
    #[inline]
    pub fn set_total_len(&mut self, value: u16) {
        self.set_be16(field::TOTAL_LEN, value);
    }

    /// Sets the identification field.
    #[inline]
    pub fn set_ident(&mut self, value: u16) {
        self.set_be16(field::IDENT, value);
    }

    /// Sets the DF and MF flags and the fragment offset (in bytes; must be a multiple of 8).
    #[inline]
    pub fn set_flags_frag(&mut self, dont_frag: bool, more_frags: bool, offset: u16) {
        let mut value = (offset >> 3) & FRAG_MASK;
        if dont_frag {
            value |= FLAG_DF;
        }
        if more_frags {
            value |= FLAG_MF;
        }
        self.set_be16(field::FLAGS_FRAG, value);
    }

    /// Sets the time to live (raw; the checksum is not updated).
    #[inline]
    pub fn set_ttl(&mut self, value: u8) {
        self.buffer.as_mut()[field::TTL] = value;
    }

    /// Sets the protocol number.
    #[inline]
    pub fn set_protocol(&mut self, value: u8) {
        self.buffer.as_mut()[field::PROTOCOL] = value;
    }

    /// Sets the header checksum field.
    #[inline]
    pub fn set_checksum(&mut self, value: u16) {
        self.set_be16(field::CHECKSUM, value);
    }

    /// Recomputes the header checksum from scratch.
    #[inline]
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let header_len = self.header_len();
        let value = checksum::checksum(&self.buffer.as_ref()[..header_len]);
        self.set_checksum(value);
    }

    /// Sets the source address (raw; the checksum is not updated).
    #[inline]
    pub fn set_src_addr(&mut self, addr: Ipv4Addr) {
        self.set_be32(field::SRC, u32::from(addr));
    }

    /// Sets the destination address (raw; the checksum is not updated).
    #[inline]
    pub fn set_dst_addr(&mut self, addr: Ipv4Addr) {
        self.set_be32(field::DST, u32::from(addr));
    }

    /// Replaces the source address and patches the header checksum (RFC 1624). Returns
    /// `(old, new)` as `u32` so the caller can patch the TCP/UDP checksum, whose pseudo-header
    /// covers the address (see `TcpPacket::adjust_checksum_for_addr`).
    #[inline]
    pub fn rewrite_src_addr(&mut self, addr: Ipv4Addr) -> (u32, u32) {
        let old = self.be32(field::SRC);
        let new = u32::from(addr);
        self.set_be32(field::SRC, new);
        let check = checksum::update_u32(self.checksum(), old, new);
        self.set_checksum(check);
        (old, new)
    }

    /// Replaces the destination address and patches the header checksum (RFC 1624); returns
    /// `(old, new)` like [`rewrite_src_addr`](Self::rewrite_src_addr).
    #[inline]
    pub fn rewrite_dst_addr(&mut self, addr: Ipv4Addr) -> (u32, u32) {
        let old = self.be32(field::DST);
        let new = u32::from(addr);
        self.set_be32(field::DST, new);
        let check = checksum::update_u32(self.checksum(), old, new);
        self.set_checksum(check);
        (old, new)
    }

    /// Replaces the TTL and patches the header checksum (RFC 1624).
    #[inline]
    pub fn rewrite_ttl(&mut self, ttl: u8) {
        let old = self.be16(field::TTL);
        self.set_ttl(ttl);
        let new = self.be16(field::TTL);
        let check = checksum::update_u16(self.checksum(), old, new);
        self.set_checksum(check);
    }

    /// Mutable options.
    #[inline]
    pub fn options_mut(&mut self) -> &mut [u8] {
        let end = self.header_len();
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }

    /// Mutable payload (header end to Total Length).
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.header_len();
        let end = usize::from(self.total_len());
        &mut self.buffer.as_mut()[start..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ethernet::tests::{hex, SYN_FRAME};
    use proptest::prelude::*;

    fn syn_ip() -> Vec<u8> {
        hex(SYN_FRAME)[14..].to_vec()
    }

    /// A DNS query (A? example.com) sent with a Python UDP socket, captured on the same veth.
    const DNS_IP: &str = "
        4500 0039 f7fd 4000 4011 2e1c 0a4c 0001 0a4c
        0002 bef7 0035 0025 4244 1a2b 0100 0001
        0000 0000 0000 0765 7861 6d70 6c65 0363
        6f6d 0000 0100 01";

    #[test]
    fn real_syn_header() {
        let bytes = syn_ip();
        let ip = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(ip.version(), 4);
        assert_eq!(ip.header_len(), 20);
        assert_eq!(ip.dscp_ecn(), 0);
        assert_eq!(ip.total_len(), 60);
        assert_eq!(ip.ident(), 0x5477);
        assert!(ip.dont_frag());
        assert!(!ip.more_frags());
        assert_eq!(ip.frag_offset(), 0);
        assert!(!ip.is_fragment());
        assert_eq!(ip.ttl(), 64);
        assert_eq!(ip.protocol(), PROTO_TCP);
        assert_eq!(ip.checksum(), 0xd1aa);
        assert_eq!(ip.src_addr(), Ipv4Addr::new(10, 76, 0, 1));
        assert_eq!(ip.dst_addr(), Ipv4Addr::new(10, 76, 0, 2));
        assert!(ip.options().is_empty());
        assert_eq!(ip.payload().len(), 40);
        assert!(ip.verify_checksum());
    }

    #[test]
    fn real_udp_header() {
        let bytes = hex(DNS_IP);
        let ip = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(ip.protocol(), PROTO_UDP);
        assert_eq!(ip.total_len(), 57);
        assert_eq!(ip.payload().len(), 37);
        assert!(ip.verify_checksum());
    }

    #[test]
    fn ethernet_padding_is_ignored() {
        let mut bytes = hex(DNS_IP);
        bytes.extend_from_slice(&[0; 7]);
        let ip = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(ip.payload().len(), 37);
    }

    #[test]
    fn rejects_malformed() {
        let good = syn_ip();
        assert_eq!(
            Ipv4Packet::new_checked(&good[..19]).unwrap_err(),
            WireError::Truncated
        );
        let mut bad = good.clone();
        bad[0] = 0x65;
        assert_eq!(
            Ipv4Packet::new_checked(&bad[..]).unwrap_err(),
            WireError::BadVersion
        );
        bad[0] = 0x44;
        assert_eq!(
            Ipv4Packet::new_checked(&bad[..]).unwrap_err(),
            WireError::BadHeaderLen
        );
        bad[0] = 0x4f; // a 60-byte header exactly filling the 60-byte buffer is accepted
        assert!(Ipv4Packet::new_checked(&bad[..]).is_ok());
        assert_eq!(
            Ipv4Packet::new_checked(&bad[..59]).unwrap_err(),
            WireError::BadHeaderLen
        );
        let mut bad = good.clone();
        bad[3] = 19; // total length below the header
        assert_eq!(
            Ipv4Packet::new_checked(&bad[..]).unwrap_err(),
            WireError::BadTotalLen
        );
        bad[3] = 61; // beyond the buffer
        assert_eq!(
            Ipv4Packet::new_checked(&bad[..]).unwrap_err(),
            WireError::BadTotalLen
        );
        // Truncated capture: header intact, payload cut.
        assert_eq!(
            Ipv4Packet::new_checked(&good[..50]).unwrap_err(),
            WireError::BadTotalLen
        );
    }

    #[test]
    fn setters_round_trip() {
        let mut bytes = [0u8; 28];
        let mut ip = Ipv4Packet::new_unchecked(&mut bytes[..]);
        ip.set_version_ihl(24);
        ip.set_dscp_ecn(0x2e);
        ip.set_total_len(28);
        ip.set_ident(0xbeef);
        ip.set_flags_frag(false, true, 1480);
        ip.set_ttl(3);
        ip.set_protocol(PROTO_UDP);
        ip.set_src_addr(Ipv4Addr::new(192, 0, 2, 1));
        ip.set_dst_addr(Ipv4Addr::new(198, 51, 100, 7));
        ip.options_mut().copy_from_slice(&[1, 1, 1, 0]);
        ip.payload_mut().copy_from_slice(&[9, 9, 9, 9]);
        ip.fill_checksum();
        let ip = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(ip.header_len(), 24);
        assert_eq!(ip.dscp_ecn(), 0x2e);
        assert_eq!(ip.ident(), 0xbeef);
        assert!(!ip.dont_frag());
        assert!(ip.more_frags());
        assert_eq!(ip.frag_offset(), 1480);
        assert!(ip.is_fragment());
        assert_eq!(ip.ttl(), 3);
        assert_eq!(ip.src_addr(), Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(ip.dst_addr(), Ipv4Addr::new(198, 51, 100, 7));
        assert_eq!(ip.options(), &[1, 1, 1, 0]);
        assert_eq!(ip.payload(), &[9, 9, 9, 9]);
        assert!(ip.verify_checksum());
    }

    #[test]
    fn rewrite_addr_on_real_packet() {
        let mut bytes = syn_ip();
        let mut ip = Ipv4Packet::new_checked(&mut bytes[..]).unwrap();
        let (old, new) = ip.rewrite_dst_addr(Ipv4Addr::new(192, 168, 7, 20));
        assert_eq!(old, u32::from(Ipv4Addr::new(10, 76, 0, 2)));
        assert_eq!(new, u32::from(Ipv4Addr::new(192, 168, 7, 20)));
        assert!(ip.verify_checksum());
        let incremental = ip.checksum();
        ip.fill_checksum();
        assert_eq!(incremental, ip.checksum());
    }

    /// RFC 791's rules, written out independently of `check_len`.
    fn reference_check(buf: &[u8]) -> Result<(), WireError> {
        if buf.len() < 20 {
            return Err(WireError::Truncated);
        }
        if buf[0] >> 4 != 4 {
            return Err(WireError::BadVersion);
        }
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        if !(20..=buf.len()).contains(&ihl) {
            return Err(WireError::BadHeaderLen);
        }
        let total = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if !(ihl..=buf.len()).contains(&total) {
            return Err(WireError::BadTotalLen);
        }
        Ok(())
    }

    /// Every getter and in-place rewrite of an accepted packet.
    fn exercise(ip: &Ipv4Packet<&[u8]>) {
        let _ = (ip.version(), ip.header_len(), ip.dscp_ecn(), ip.total_len());
        let _ = (
            ip.ident(),
            ip.dont_frag(),
            ip.more_frags(),
            ip.frag_offset(),
        );
        let _ = (
            ip.ttl(),
            ip.protocol(),
            ip.checksum(),
            ip.src_addr(),
            ip.dst_addr(),
        );
        let _ = (
            ip.options(),
            ip.payload(),
            ip.verify_checksum(),
            ip.is_fragment(),
        );
        let mut copy = ip.into_inner().to_vec();
        let mut ip = Ipv4Packet::new_checked(&mut copy[..]).unwrap();
        ip.fill_checksum();
        ip.rewrite_src_addr(Ipv4Addr::new(192, 0, 2, 1));
        ip.rewrite_ttl(1);
        assert!(ip.verify_checksum());
        let _ = (ip.options_mut().len(), ip.payload_mut().len());
    }

    proptest! {
        #[test]
        fn rewrites_equal_full_recompute(src in any::<u32>(), dst in any::<u32>(), ttl in any::<u8>(),
                                         ident in any::<u16>()) {
            let mut bytes = syn_ip();
            let mut ip = Ipv4Packet::new_checked(&mut bytes[..]).unwrap();
            ip.set_ident(ident);
            ip.fill_checksum();
            ip.rewrite_src_addr(Ipv4Addr::from(src));
            ip.rewrite_dst_addr(Ipv4Addr::from(dst));
            ip.rewrite_ttl(ttl);
            let incremental = ip.checksum();
            prop_assert!(ip.verify_checksum());
            ip.fill_checksum();
            prop_assert_eq!(incremental, ip.checksum());
        }

        /// Structurally valid but hostile headers: a real header whose IHL (0..=15) and Total
        /// Length (up to past the buffer) lie, cut at every byte. `new_checked` refuses exactly
        /// what the reference rules refuse, with their error, and the getters of what it
        /// accepts stay inside the buffer.
        #[test]
        fn lying_lengths_are_refused_by_reason(ihl in 0u8..16, total_delta in -70i32..70,
                                               extra in 0usize..48, fill in any::<u8>(),
                                               frag in any::<u16>()) {
            let mut bytes = syn_ip();
            bytes.resize(bytes.len() + extra, fill);
            bytes[0] = 0x40 | ihl;
            let total = (usize::from(ihl) * 4) as i32 + 40 + total_delta;
            bytes[2..4].copy_from_slice(&(total.clamp(0, 0xffff) as u16).to_be_bytes());
            bytes[6..8].copy_from_slice(&frag.to_be_bytes());
            for cut in 0..=bytes.len() {
                let buf = &bytes[..cut];
                let expected = reference_check(buf);
                match Ipv4Packet::new_checked(buf) {
                    Ok(ip) => {
                        prop_assert_eq!(expected, Ok(()));
                        exercise(&ip);
                        prop_assert_eq!(ip.payload().len(), usize::from(ip.total_len()) - ip.header_len());
                    }
                    Err(e) => prop_assert_eq!(Err(e), expected),
                }
            }
        }

        #[test]
        fn garbage_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..100),
                                force_v4 in any::<bool>()) {
            if force_v4 && !bytes.is_empty() {
                bytes[0] = 0x40 | (bytes[0] & 0x0F);
            }
            if let Ok(ip) = Ipv4Packet::new_checked(&bytes[..]) {
                let _ = (ip.version(), ip.header_len(), ip.dscp_ecn(), ip.total_len());
                let _ = (ip.ident(), ip.dont_frag(), ip.more_frags(), ip.frag_offset());
                let _ = (ip.ttl(), ip.protocol(), ip.checksum(), ip.src_addr(), ip.dst_addr());
                let _ = (ip.options(), ip.payload(), ip.verify_checksum(), ip.is_fragment());
            }
        }
    }
}
