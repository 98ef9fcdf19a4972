//! Ethernet II frames, with up to two VLAN tags (802.1Q `0x8100`, 802.1ad `0x88A8`).
//!
//! ```text
//!  0                   6                  12     14          (untagged)
//! +-------------------+-------------------+------+----------
//! |  destination MAC  |    source MAC     | type | payload
//! +-------------------+-------------------+------+----------
//!                                         12     14     16     18
//!                                         +------+------+------+---------- (one tag)
//!                                         | TPID | TCI  | type | payload
//!                                         +------+------+------+----------
//! ```
//! A second tag (QinQ) repeats TPID+TCI once more; the header is then 22 bytes. The VLAN id is
//! the low 12 bits of the TCI.

use super::WireError;

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// TPID of an 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// TPID of an 802.1ad (QinQ) service tag.
pub const ETHERTYPE_QINQ: u16 = 0x88A8;

/// Length of an untagged Ethernet header.
pub const HEADER_LEN: usize = 14;
/// Length of one VLAN tag.
pub const TAG_LEN: usize = 4;

mod field {
    use std::ops::Range;
    pub const DST: Range<usize> = 0..6;
    pub const SRC: Range<usize> = 6..12;
    pub const TYPE: usize = 12;
}

#[inline]
fn is_tag(ethertype: u16) -> bool {
    ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ
}

#[inline]
fn be16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

/// A read (or, with a mutable buffer, write) view of an Ethernet II frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Wraps `buffer` without validation; getters may panic if it is too short.
    #[inline]
    pub fn new_unchecked(buffer: T) -> Self {
        EthernetFrame { buffer }
    }

    /// Wraps `buffer` after checking that it holds the whole header, VLAN tags included.
    ///
    /// # Errors
    /// [`WireError::Truncated`] when the buffer ends inside the header.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let frame = Self::new_unchecked(buffer);
        frame.check_len()?;
        Ok(frame)
    }

    /// Checks that the buffer holds the whole header (after which no getter panics).
    ///
    /// # Errors
    /// [`WireError::Truncated`] when the buffer ends inside the header.
    #[inline]
    pub fn check_len(&self) -> Result<(), WireError> {
        let buf = self.buffer.as_ref();
        if buf.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if is_tag(be16(buf, field::TYPE)) {
            if buf.len() < HEADER_LEN + TAG_LEN {
                return Err(WireError::Truncated);
            }
            if is_tag(be16(buf, field::TYPE + TAG_LEN)) && buf.len() < HEADER_LEN + 2 * TAG_LEN {
                return Err(WireError::Truncated);
            }
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Destination MAC address.
    #[inline]
    pub fn dst_addr(&self) -> [u8; 6] {
        let mut addr = [0; 6];
        addr.copy_from_slice(&self.buffer.as_ref()[field::DST]);
        addr
    }

    /// Source MAC address.
    #[inline]
    pub fn src_addr(&self) -> [u8; 6] {
        let mut addr = [0; 6];
        addr.copy_from_slice(&self.buffer.as_ref()[field::SRC]);
        addr
    }

    /// Number of VLAN tags in front of the EtherType (0, 1 or 2; a third tag is not parsed
    /// and shows up as the EtherType).
    #[inline]
    pub fn tag_count(&self) -> usize {
        let buf = self.buffer.as_ref();
        if !is_tag(be16(buf, field::TYPE)) {
            0
        } else if !is_tag(be16(buf, field::TYPE + TAG_LEN)) {
            1
        } else {
            2
        }
    }

    /// Header length in bytes: 14, 18 or 22 depending on the number of VLAN tags.
    #[inline]
    pub fn header_len(&self) -> usize {
        HEADER_LEN + TAG_LEN * self.tag_count()
    }

    /// The EtherType of the payload, after skipping up to two VLAN tags.
    #[inline]
    pub fn ethertype(&self) -> u16 {
        be16(self.buffer.as_ref(), self.header_len() - 2)
    }

    /// VLAN id (12 bits) of the outer tag, if the frame is tagged.
    #[inline]
    pub fn vlan_id(&self) -> Option<u16> {
        let buf = self.buffer.as_ref();
        if is_tag(be16(buf, field::TYPE)) {
            Some(be16(buf, field::TYPE + 2) & 0x0FFF)
        } else {
            None
        }
    }

    /// VLAN id (12 bits) of the inner tag of a double-tagged (QinQ) frame.
    #[inline]
    pub fn inner_vlan_id(&self) -> Option<u16> {
        if self.tag_count() == 2 {
            Some(be16(self.buffer.as_ref(), field::TYPE + TAG_LEN + 2) & 0x0FFF)
        } else {
            None
        }
    }

    /// Everything after the header (an IPv4 packet may be followed by Ethernet padding).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    /// Sets the destination MAC address.
    #[inline]
    pub fn set_dst_addr(&mut self, addr: [u8; 6]) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&addr);
    }

    /// Sets the source MAC address.
    #[inline]
    pub fn set_src_addr(&mut self, addr: [u8; 6]) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&addr);
    }

    /// Writes `ethertype` at the untagged position (bytes 12..14). On a tagged frame this
    /// overwrites the outer TPID, so use it only on frames being built untagged.
    #[inline]
    pub fn set_ethertype(&mut self, ethertype: u16) {
        self.buffer.as_mut()[field::TYPE..field::TYPE + 2]
            .copy_from_slice(&ethertype.to_be_bytes());
    }

    /// Mutable access to everything after the header.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.header_len();
        &mut self.buffer.as_mut()[start..]
    }
}

/// Writes an untagged 14-byte Ethernet header at the start of `buf`.
///
/// # Panics
/// If `buf` is shorter than [`HEADER_LEN`].
#[inline]
pub fn emit_header(buf: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    let header = &mut buf[..HEADER_LEN];
    header[field::DST].copy_from_slice(&dst);
    header[field::SRC].copy_from_slice(&src);
    header[field::TYPE..].copy_from_slice(&ethertype.to_be_bytes());
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Parses a hex dump (whitespace ignored) into bytes.
    pub(crate) fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
        assert!(digits.len() & 1 == 0, "odd number of hex digits");
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    /// A Linux 6.x SYN (curl -> python http.server) captured with tcpdump on a veth between two
    /// network namespaces, tx checksum offload off: 10.76.0.1:46384 -> 10.76.0.2:8099,
    /// options [mss 1460,sackOK,TS val 4113920671 ecr 0,nop,wscale 10].
    pub(crate) const SYN_FRAME: &str = "
        02bb 0000 0002 02aa 0000 0001 0800 4500
        003c 5477 4000 4006 d1aa 0a4c 0001 0a4c
        0002 b530 1fa3 e973 4483 0000 0000 a002
        faf0 cdd1 0000 0204 05b4 0402 080a f535
        729f 0000 0000 0103 030a";

    /// Inserts an 802.1Q/802.1ad tag with `tci` after the MAC addresses.
    ///
    /// The capture host has no 8021q kernel module, so tagged frames are the captured untagged
    /// frames with a tag inserted, which is exactly what a tagging switch does.
    pub(crate) fn insert_tag(frame: &[u8], tpid: u16, tci: u16) -> Vec<u8> {
        let mut out = frame[..12].to_vec();
        out.extend_from_slice(&tpid.to_be_bytes());
        out.extend_from_slice(&tci.to_be_bytes());
        out.extend_from_slice(&frame[12..]);
        out
    }

    #[test]
    fn untagged_real_frame() {
        let bytes = hex(SYN_FRAME);
        let frame = EthernetFrame::new_checked(&bytes[..]).unwrap();
        assert_eq!(frame.dst_addr(), [0x02, 0xbb, 0, 0, 0, 0x02]);
        assert_eq!(frame.src_addr(), [0x02, 0xaa, 0, 0, 0, 0x01]);
        assert_eq!(frame.ethertype(), ETHERTYPE_IPV4);
        assert_eq!(frame.vlan_id(), None);
        assert_eq!(frame.inner_vlan_id(), None);
        assert_eq!(frame.tag_count(), 0);
        assert_eq!(frame.header_len(), 14);
        assert_eq!(frame.payload().len(), 60);
        assert_eq!(frame.payload()[0], 0x45);
    }

    #[test]
    fn dot1q_tagged_frame() {
        // PCP 5, VLAN 100.
        let bytes = insert_tag(&hex(SYN_FRAME), ETHERTYPE_VLAN, 0xa064);
        let frame = EthernetFrame::new_checked(&bytes[..]).unwrap();
        assert_eq!(frame.ethertype(), ETHERTYPE_IPV4);
        assert_eq!(frame.vlan_id(), Some(100));
        assert_eq!(frame.inner_vlan_id(), None);
        assert_eq!(frame.header_len(), 18);
        assert_eq!(frame.payload(), &hex(SYN_FRAME)[14..]);
    }

    #[test]
    fn qinq_frame() {
        let inner = insert_tag(&hex(SYN_FRAME), ETHERTYPE_VLAN, 300);
        let bytes = insert_tag(&inner, ETHERTYPE_QINQ, 200);
        let frame = EthernetFrame::new_checked(&bytes[..]).unwrap();
        assert_eq!(frame.ethertype(), ETHERTYPE_IPV4);
        assert_eq!(frame.vlan_id(), Some(200));
        assert_eq!(frame.inner_vlan_id(), Some(300));
        assert_eq!(frame.header_len(), 22);
        assert_eq!(frame.payload(), &hex(SYN_FRAME)[14..]);
    }

    #[test]
    fn truncated_tags() {
        let bytes = insert_tag(&hex(SYN_FRAME), ETHERTYPE_VLAN, 100);
        assert_eq!(
            EthernetFrame::new_checked(&bytes[..13]).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            EthernetFrame::new_checked(&bytes[..17]).unwrap_err(),
            WireError::Truncated
        );
        assert!(EthernetFrame::new_checked(&bytes[..18]).is_ok());
        let qinq = insert_tag(&bytes, ETHERTYPE_QINQ, 7);
        assert_eq!(
            EthernetFrame::new_checked(&qinq[..21]).unwrap_err(),
            WireError::Truncated
        );
        assert!(EthernetFrame::new_checked(&qinq[..22]).is_ok());
    }

    #[test]
    fn emit_and_set() {
        let mut buf = [0u8; 20];
        emit_header(
            &mut buf,
            [1, 2, 3, 4, 5, 6],
            [7, 8, 9, 10, 11, 12],
            ETHERTYPE_ARP,
        );
        let mut frame = EthernetFrame::new_checked(&mut buf[..]).unwrap();
        assert_eq!(frame.dst_addr(), [1, 2, 3, 4, 5, 6]);
        assert_eq!(frame.src_addr(), [7, 8, 9, 10, 11, 12]);
        assert_eq!(frame.ethertype(), ETHERTYPE_ARP);
        frame.set_dst_addr([0xff; 6]);
        frame.set_src_addr([0xee; 6]);
        frame.set_ethertype(ETHERTYPE_IPV4);
        frame.payload_mut()[0] = 0x45;
        assert_eq!(frame.dst_addr(), [0xff; 6]);
        assert_eq!(frame.src_addr(), [0xee; 6]);
        assert_eq!(frame.ethertype(), ETHERTYPE_IPV4);
        assert_eq!(frame.into_inner()[14], 0x45);
    }

    proptest! {
        /// A real frame with zero to three VLAN tags of either TPID, cut at every byte: refused
        /// (`Truncated`) exactly when the cut falls inside the header the tags announce.
        #[test]
        fn tags_cut_at_every_byte(tags in proptest::collection::vec((any::<bool>(), any::<u16>()), 0..4)) {
            let mut bytes = hex(SYN_FRAME);
            for (qinq, tci) in tags {
                bytes = insert_tag(&bytes, if qinq { ETHERTYPE_QINQ } else { ETHERTYPE_VLAN }, tci);
            }
            for cut in 0..=bytes.len() {
                let buf = &bytes[..cut];
                let at = |i: usize| u16::from_be_bytes([buf[i], buf[i + 1]]);
                let need = if cut < 14 || !is_tag(at(12)) {
                    14
                } else if cut < 18 || !is_tag(at(16)) {
                    18
                } else {
                    22
                };
                match EthernetFrame::new_checked(buf) {
                    Ok(frame) => {
                        prop_assert!(cut >= need);
                        prop_assert_eq!(frame.header_len(), need);
                        let _ = (frame.ethertype(), frame.vlan_id(), frame.inner_vlan_id());
                        prop_assert_eq!(frame.payload().len(), cut - need);
                    }
                    Err(e) => {
                        prop_assert_eq!(e, WireError::Truncated);
                        prop_assert!(cut < need);
                    }
                }
            }
        }

        #[test]
        fn garbage_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..40),
                                tag in 0usize..3) {
            // Bias towards tagged frames so the tag paths are exercised.
            if bytes.len() >= 14 && tag > 0 {
                bytes[12..14].copy_from_slice(&[ETHERTYPE_VLAN, ETHERTYPE_QINQ][tag - 1].to_be_bytes());
                if bytes.len() >= 18 && tag == 2 {
                    bytes[16..18].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
                }
            }
            if let Ok(frame) = EthernetFrame::new_checked(&bytes[..]) {
                let _ = (frame.dst_addr(), frame.src_addr(), frame.ethertype(), frame.vlan_id());
                let _ = (frame.inner_vlan_id(), frame.tag_count());
                prop_assert_eq!(frame.payload().len(), bytes.len() - frame.header_len());
            } else {
                prop_assert!(bytes.len() < 22);
            }
        }
    }
}
