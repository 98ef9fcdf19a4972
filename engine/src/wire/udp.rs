//! UDP datagrams (RFC 768).
//!
//! ```text
//!  0      7 8     15 16    23 24    31
//! +--------+--------+--------+--------+
//! |   Source Port   |    Dest Port    |
//! +--------+--------+--------+--------+
//! |     Length      |    Checksum     |
//! +--------+--------+--------+--------+
//! |          data octets ...
//! +---------------- ...
//! ```
//! Length covers header and data. Over IPv4 a checksum of zero means "not computed"; a
//! computed zero is sent as `0xFFFF`.

use std::net::Ipv4Addr;

use super::checksum;
use super::ipv4::PROTO_UDP;
use super::WireError;

/// Length of the UDP header.
pub const HEADER_LEN: usize = 8;

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const LENGTH: usize = 4;
    pub const CHECKSUM: usize = 6;
}

/// A read (or, with a mutable buffer, write) view of a UDP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Wraps `buffer` without validation; getters may panic on malformed input.
    #[inline]
    pub fn new_unchecked(buffer: T) -> Self {
        UdpPacket { buffer }
    }

    /// Wraps untrusted `buffer` (the IPv4 payload) after [`check_len`](Self::check_len).
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
    /// * [`WireError::Truncated`]: fewer than 8 bytes;
    /// * [`WireError::BadUdpLen`]: the length field is below 8 or beyond the buffer.
    #[inline]
    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let field_len = usize::from(self.len());
        if field_len < HEADER_LEN || field_len > len {
            return Err(WireError::BadUdpLen);
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

    /// Source port.
    #[inline]
    pub fn src_port(&self) -> u16 {
        self.be16(field::SRC_PORT)
    }

    /// Destination port.
    #[inline]
    pub fn dst_port(&self) -> u16 {
        self.be16(field::DST_PORT)
    }

    /// Length field: header plus payload, in bytes.
    #[inline]
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u16 {
        self.be16(field::LENGTH)
    }

    /// Checksum field (0 = not computed).
    #[inline]
    pub fn checksum(&self) -> u16 {
        self.be16(field::CHECKSUM)
    }

    /// The payload, as delimited by the length field.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.len())]
    }

    /// True when the checksum verifies for a datagram from `src` to `dst`, or is absent (0).
    #[inline]
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if self.checksum() == 0 {
            return true;
        }
        let len = self.len();
        let datagram = &self.buffer.as_ref()[..usize::from(len)];
        let pseudo = checksum::pseudo_header(src, dst, PROTO_UDP, len);
        checksum::fold(checksum::sum(datagram, pseudo)) == 0xFFFF
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    #[inline]
    fn set_be16(&mut self, at: usize, value: u16) {
        self.buffer.as_mut()[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }

    /// Sets the source port (raw).
    #[inline]
    pub fn set_src_port(&mut self, port: u16) {
        self.set_be16(field::SRC_PORT, port);
    }

    /// Sets the destination port (raw).
    #[inline]
    pub fn set_dst_port(&mut self, port: u16) {
        self.set_be16(field::DST_PORT, port);
    }

    /// Sets the length field. Invalidates what `check_len` established if it exceeds the
    /// buffer.
    #[inline]
    pub fn set_len(&mut self, len: u16) {
        self.set_be16(field::LENGTH, len);
    }

    /// Sets the checksum field.
    #[inline]
    pub fn set_checksum(&mut self, value: u16) {
        self.set_be16(field::CHECKSUM, value);
    }

    /// Computes the checksum over pseudo-header, header and payload (up to the length field)
    /// and writes it, sending a computed zero as `0xFFFF`.
    #[inline]
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let len = self.len();
        let datagram = &self.buffer.as_ref()[..usize::from(len)];
        let pseudo = checksum::pseudo_header(src, dst, PROTO_UDP, len);
        let value = match !checksum::fold(checksum::sum(datagram, pseudo)) {
            0 => 0xFFFF,
            value => value,
        };
        self.set_checksum(value);
    }

    /// Mutable payload, as delimited by the length field.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ethernet::tests::{hex, insert_tag};
    use crate::wire::ethernet::{EthernetFrame, ETHERTYPE_IPV4, ETHERTYPE_VLAN};
    use crate::wire::ipv4::Ipv4Packet;
    use proptest::prelude::*;

    /// A DNS query "A? example.com" sent by a Python UDP socket from 10.76.0.1:48887 to
    /// 10.76.0.2:53, captured with tcpdump on a veth (tx checksum offload off).
    const DNS_FRAME: &str = "
        02bb 0000 0002 02aa 0000 0001 0800 4500
        0039 f7fd 4000 4011 2e1c 0a4c 0001 0a4c
        0002 bef7 0035 0025 4244 1a2b 0100 0001
        0000 0000 0000 0765 7861 6d70 6c65 0363
        6f6d 0000 0100 01";

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 1);
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 2);

    #[test]
    fn real_dns_query() {
        let bytes = hex(DNS_FRAME);
        let frame = EthernetFrame::new_checked(&bytes[..]).unwrap();
        let ip = Ipv4Packet::new_checked(frame.payload()).unwrap();
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(udp.src_port(), 48887);
        assert_eq!(udp.dst_port(), 53);
        assert_eq!(udp.len(), 37);
        assert_eq!(udp.checksum(), 0x4244);
        assert_eq!(udp.payload().len(), 29);
        assert_eq!(&udp.payload()[..2], &[0x1a, 0x2b]);
        assert_eq!(&udp.payload()[12..24], b"\x07example\x03com");
        assert!(udp.verify_checksum(CLIENT, SERVER));
        assert!(!udp.verify_checksum(CLIENT, Ipv4Addr::new(10, 76, 0, 3)));

        let mut copy = ip.payload().to_vec();
        let mut udp = UdpPacket::new_checked(&mut copy[..]).unwrap();
        udp.fill_checksum(CLIENT, SERVER);
        assert_eq!(udp.checksum(), 0x4244);
    }

    #[test]
    fn tagged_dns_query() {
        let bytes = insert_tag(&hex(DNS_FRAME), ETHERTYPE_VLAN, 100);
        let frame = EthernetFrame::new_checked(&bytes[..]).unwrap();
        assert_eq!(
            (frame.vlan_id(), frame.ethertype()),
            (Some(100), ETHERTYPE_IPV4)
        );
        let ip = Ipv4Packet::new_checked(frame.payload()).unwrap();
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(udp.dst_port(), 53);
        assert!(udp.verify_checksum(ip.src_addr(), ip.dst_addr()));
    }

    #[test]
    fn rejects_malformed() {
        let bytes = hex(DNS_FRAME);
        let udp = &bytes[34..];
        assert_eq!(
            UdpPacket::new_checked(&udp[..7]).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            UdpPacket::new_checked(&udp[..36]).unwrap_err(),
            WireError::BadUdpLen
        );
        let mut bad = udp.to_vec();
        bad[5] = 7;
        assert_eq!(
            UdpPacket::new_checked(&bad[..]).unwrap_err(),
            WireError::BadUdpLen
        );
        // Trailing bytes beyond the length field are ignored.
        let mut padded = udp.to_vec();
        padded.extend_from_slice(&[0; 5]);
        let udp = UdpPacket::new_checked(&padded[..]).unwrap();
        assert_eq!(udp.payload().len(), 29);
        assert!(udp.verify_checksum(CLIENT, SERVER));
    }

    #[test]
    fn zero_checksum_rules() {
        // Absent checksum verifies.
        let mut datagram = [0u8; 10];
        let mut udp = UdpPacket::new_unchecked(&mut datagram[..]);
        udp.set_len(10);
        assert!(udp.verify_checksum(CLIENT, SERVER));
        // Find a payload word that makes the computed checksum zero: it must go out as FFFF.
        udp.set_src_port(1234);
        udp.set_dst_port(53);
        udp.fill_checksum(CLIENT, SERVER);
        let check = udp.checksum();
        // Adding `check` to the payload word makes the sum 0xFFFF, so the checksum 0.
        udp.payload_mut().copy_from_slice(&check.to_be_bytes());
        udp.fill_checksum(CLIENT, SERVER);
        assert_eq!(udp.checksum(), 0xFFFF);
        assert!(udp.verify_checksum(CLIENT, SERVER));
    }

    proptest! {
        #[test]
        fn fill_then_verify(sport in any::<u16>(), dport in any::<u16>(),
                            payload in proptest::collection::vec(any::<u8>(), 0..100),
                            src in any::<u32>(), dst in any::<u32>()) {
            let (src, dst) = (Ipv4Addr::from(src), Ipv4Addr::from(dst));
            let mut datagram = vec![0u8; HEADER_LEN + payload.len()];
            let mut udp = UdpPacket::new_unchecked(&mut datagram[..]);
            udp.set_src_port(sport);
            udp.set_dst_port(dport);
            udp.set_len((HEADER_LEN + payload.len()) as u16);
            udp.payload_mut().copy_from_slice(&payload);
            udp.fill_checksum(src, dst);
            prop_assert_ne!(udp.checksum(), 0);
            prop_assert!(udp.verify_checksum(src, dst));
            let udp = UdpPacket::new_checked(&datagram[..]).unwrap();
            prop_assert_eq!((udp.src_port(), udp.dst_port()), (sport, dport));
            prop_assert_eq!(udp.payload(), &payload[..]);
        }

        /// A real datagram whose length field lies (0 to past the buffer), with trailing
        /// padding, cut at every byte: refused exactly when the reference rules say, by
        /// reason; the payload of what is accepted is what the length field delimits.
        #[test]
        fn lying_length_is_refused_by_reason(len in 0u16..120, extra in 0usize..24) {
            let mut bytes = hex(DNS_FRAME)[34..].to_vec();
            bytes.resize(bytes.len() + extra, 0xee);
            bytes[4..6].copy_from_slice(&len.to_be_bytes());
            for cut in 0..=bytes.len() {
                let buf = &bytes[..cut];
                let expected = if cut < HEADER_LEN {
                    Err(WireError::Truncated)
                } else if !(HEADER_LEN..=cut).contains(&usize::from(len)) {
                    Err(WireError::BadUdpLen)
                } else {
                    Ok(())
                };
                match UdpPacket::new_checked(buf) {
                    Ok(udp) => {
                        prop_assert_eq!(expected, Ok(()));
                        prop_assert_eq!(udp.payload().len(), usize::from(len) - HEADER_LEN);
                        let _ = (udp.src_port(), udp.dst_port(), udp.checksum());
                        let _ = udp.verify_checksum(CLIENT, SERVER);
                        let mut copy = buf.to_vec();
                        let mut udp = UdpPacket::new_checked(&mut copy[..]).unwrap();
                        udp.fill_checksum(CLIENT, SERVER);
                        prop_assert!(udp.verify_checksum(CLIENT, SERVER));
                    }
                    Err(e) => prop_assert_eq!(Err(e), expected),
                }
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(udp) = UdpPacket::new_checked(&bytes[..]) {
                let _ = (udp.src_port(), udp.dst_port(), udp.len(), udp.checksum());
                let _ = (udp.payload(), udp.verify_checksum(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST));
            }
        }
    }
}
