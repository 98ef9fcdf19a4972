//! TCP segments (RFC 9293) with options (MSS, window scale, SACK, timestamps).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |          Source Port          |       Destination Port        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                        Sequence Number                        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    Acknowledgment Number                      |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  Data |       |C|E|U|A|P|R|S|F|                               |
//! | Offset| Rsrvd |W|C|R|C|S|S|Y|I|            Window             |
//! |       |       |R|E|G|K|H|T|N|N|                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |           Checksum            |         Urgent Pointer        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    Options                    |    Padding    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//! A [`TcpPacket`] wraps exactly one segment: the IPv4 payload slice, so the payload runs from
//! the end of the header to the end of the buffer. Checksums cover the IPv4 pseudo-header.
//!
//! Setters named `set_*` write raw bytes; the `rewrite_*` methods and
//! [`TcpPacket::adjust_checksum_for_addr`] also patch the checksum incrementally (RFC 1624),
//! which is what the per-packet rewrite path uses. Each has a test proving it equal to
//! [`TcpPacket::fill_checksum`] after the same change.
//!
//! ```
//! use std::net::Ipv4Addr;
//! use engine::wire::tcp::{emit_ipv4_tcp, TcpFlags, TcpRepr};
//! use engine::wire::{Ipv4Packet, SeqNum, TcpPacket};
//!
//! let (client, target) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
//! let repr = TcpRepr {
//!     src_port: 40000,
//!     dst_port: 80,
//!     seq: SeqNum(1000),
//!     ack: SeqNum(2000),
//!     flags: TcpFlags::PSH | TcpFlags::ACK,
//!     window: 512,
//!     timestamps: Some((7, 9)),
//!     ..TcpRepr::default()
//! };
//! let mut packet = Vec::with_capacity(128);
//! emit_ipv4_tcp(&mut packet, client, target, 1, 64, &repr, b"GET / HTTP/1.1\r\n\r\n");
//!
//! // Redirect to another target: patch both checksums incrementally.
//! let mut ip = Ipv4Packet::new_checked(&mut packet[..]).unwrap();
//! let (old, new) = ip.rewrite_dst_addr(Ipv4Addr::new(192, 168, 1, 5));
//! let mut tcp = TcpPacket::new_checked(ip.payload_mut()).unwrap();
//! tcp.adjust_checksum_for_addr(old, new);
//! tcp.rewrite_ack_number(SeqNum(5000));
//! assert!(tcp.verify_checksum(client, Ipv4Addr::new(192, 168, 1, 5)));
//! assert_eq!(tcp.timestamps(), Some((7, 9)));
//! ```

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::{BitAnd, BitOr, BitOrAssign};

use super::checksum;
use super::ipv4::{self, PROTO_TCP};
use super::{SeqNum, WireError};

/// Length of a TCP header without options.
pub const HEADER_LEN: usize = 20;
/// Largest TCP header (data offset 15).
pub const MAX_HEADER_LEN: usize = 60;

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const SEQ: usize = 4;
    pub const ACK: usize = 8;
    pub const DATA_OFFSET: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WINDOW: usize = 14;
    pub const CHECKSUM: usize = 16;
    pub const URGENT: usize = 18;
}

/// Option kinds (IANA "TCP Option Kind Numbers").
mod kind {
    pub const END: u8 = 0;
    pub const NOP: u8 = 1;
    pub const MSS: u8 = 2;
    pub const WINDOW_SCALE: u8 = 3;
    pub const SACK_PERMITTED: u8 = 4;
    pub const SACK: u8 = 5;
    pub const TIMESTAMPS: u8 = 8;
}

/// The eight TCP flag bits of byte 13 (the NS bit is not represented).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    /// No more data from sender.
    pub const FIN: TcpFlags = TcpFlags(0x01);
    /// Synchronize sequence numbers.
    pub const SYN: TcpFlags = TcpFlags(0x02);
    /// Reset the connection.
    pub const RST: TcpFlags = TcpFlags(0x04);
    /// Push function.
    pub const PSH: TcpFlags = TcpFlags(0x08);
    /// Acknowledgment field is significant.
    pub const ACK: TcpFlags = TcpFlags(0x10);
    /// Urgent pointer field is significant.
    pub const URG: TcpFlags = TcpFlags(0x20);
    /// ECN echo.
    pub const ECE: TcpFlags = TcpFlags(0x40);
    /// Congestion window reduced.
    pub const CWR: TcpFlags = TcpFlags(0x80);

    /// No flag set.
    pub const EMPTY: TcpFlags = TcpFlags(0);

    /// The raw bits.
    #[inline]
    pub fn bits(self) -> u8 {
        self.0
    }

    /// True when every flag of `other` is set in `self`.
    #[inline]
    pub fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// True when at least one flag of `other` is set in `self`.
    #[inline]
    pub fn intersects(self, other: TcpFlags) -> bool {
        self.0 & other.0 != 0
    }

    /// True when no flag is set.
    #[inline]
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl BitOr for TcpFlags {
    type Output = TcpFlags;
    #[inline]
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | rhs.0)
    }
}

impl BitOrAssign for TcpFlags {
    #[inline]
    fn bitor_assign(&mut self, rhs: TcpFlags) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for TcpFlags {
    type Output = TcpFlags;
    #[inline]
    fn bitand(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 & rhs.0)
    }
}

/// Prints tcpdump-like letters in bit order: `S`, `SA`, `FPA`, `R`; `.` when empty.
/// (U = URG, E = ECE, W = CWR.)
impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const LETTERS: [char; 8] = ['F', 'S', 'R', 'P', 'A', 'U', 'E', 'W'];
        if self.0 == 0 {
            return f.write_str(".");
        }
        for (bit, letter) in LETTERS.iter().enumerate() {
            if self.0 & (1 << bit) != 0 {
                fmt::Write::write_char(f, *letter)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One TCP option, borrowed from the segment.
///
/// A known kind whose length byte is not the one its RFC defines is reported as
/// [`TcpOption::Unknown`] (Linux ignores such options too) rather than rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpOption<'a> {
    /// Kind 0: end of the option list; iteration stops after it.
    EndOfList,
    /// Kind 1: padding.
    NoOp,
    /// Kind 2: maximum segment size.
    Mss(u16),
    /// Kind 3: window scale shift count.
    WindowScale(u8),
    /// Kind 4: SACK permitted.
    SackPermitted,
    /// Kind 5: SACK blocks, raw (pairs of big-endian left/right edges, 8 bytes each).
    Sack(&'a [u8]),
    /// Kind 8: timestamps.
    Timestamps {
        /// TSval, the sender's clock.
        tsval: u32,
        /// TSecr, the echoed peer clock.
        tsecr: u32,
    },
    /// Any other option: kind and the bytes after the length byte.
    Unknown {
        /// Option kind.
        kind: u8,
        /// Option data (length byte excluded).
        data: &'a [u8],
    },
}

impl TcpOption<'_> {
    /// The SACK blocks of a [`TcpOption::Sack`] as `(left, right)` edges; empty for other
    /// options.
    pub fn sack_blocks(&self) -> impl Iterator<Item = (SeqNum, SeqNum)> + '_ {
        let data: &[u8] = match self {
            TcpOption::Sack(data) => data,
            _ => &[],
        };
        data.chunks_exact(8).map(|block| {
            let left = u32::from_be_bytes([block[0], block[1], block[2], block[3]]);
            let right = u32::from_be_bytes([block[4], block[5], block[6], block[7]]);
            (SeqNum(left), SeqNum(right))
        })
    }
}

/// Parses the option starting at `options[pos]` (`pos < options.len()`); returns it and the
/// position of the next one.
#[inline]
fn parse_option(options: &[u8], pos: usize) -> Result<(TcpOption<'_>, usize), WireError> {
    match options[pos] {
        kind::END => return Ok((TcpOption::EndOfList, pos + 1)),
        kind::NOP => return Ok((TcpOption::NoOp, pos + 1)),
        _ => {}
    }
    let kind = options[pos];
    let len = usize::from(*options.get(pos + 1).ok_or(WireError::BadOption)?);
    if len < 2 || pos + len > options.len() {
        return Err(WireError::BadOption);
    }
    let data = &options[pos + 2..pos + len];
    let option = match (kind, len) {
        (kind::MSS, 4) => TcpOption::Mss(u16::from_be_bytes([data[0], data[1]])),
        (kind::WINDOW_SCALE, 3) => TcpOption::WindowScale(data[0]),
        (kind::SACK_PERMITTED, 2) => TcpOption::SackPermitted,
        (kind::SACK, _) if len >= 10 && (len - 2) % 8 == 0 => TcpOption::Sack(data),
        (kind::TIMESTAMPS, 10) => TcpOption::Timestamps {
            tsval: u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
            tsecr: u32::from_be_bytes([data[4], data[5], data[6], data[7]]),
        },
        _ => TcpOption::Unknown { kind, data },
    };
    Ok((option, pos + len))
}

/// Iterator over the options of a segment, returned by [`TcpPacket::options_iter`].
///
/// Stops after [`TcpOption::EndOfList`] or after yielding an error.
#[derive(Debug, Clone)]
pub struct TcpOptions<'a> {
    options: &'a [u8],
    pos: usize,
    done: bool,
}

impl<'a> TcpOptions<'a> {
    /// Iterates over raw option bytes (the header after byte 20).
    #[inline]
    pub fn new(options: &'a [u8]) -> Self {
        TcpOptions {
            options,
            pos: 0,
            done: false,
        }
    }

    /// Like `next`, also returning the option's offset within the option bytes.
    #[inline]
    fn next_with_offset(&mut self) -> Option<Result<(usize, TcpOption<'a>), WireError>> {
        if self.done || self.pos >= self.options.len() {
            return None;
        }
        let at = self.pos;
        match parse_option(self.options, at) {
            Ok((option, next)) => {
                self.pos = next;
                if option == TcpOption::EndOfList {
                    self.done = true;
                }
                Some(Ok((at, option)))
            }
            Err(error) => {
                self.done = true;
                Some(Err(error))
            }
        }
    }
}

impl<'a> Iterator for TcpOptions<'a> {
    type Item = Result<TcpOption<'a>, WireError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.next_with_offset().map(|r| r.map(|(_, option)| option))
    }
}

/// Updates `check` after the bytes at `offset` (whose folded sum was `old_sum`) now sum to
/// `new_sum`; handles odd offsets like [`checksum::update_bytes`].
#[inline]
fn update_range(check: u16, offset: usize, old_sum: u16, new_sum: u16) -> u16 {
    if offset % 2 == 1 {
        checksum::update_u16(check, old_sum.swap_bytes(), new_sum.swap_bytes())
    } else {
        checksum::update_u16(check, old_sum, new_sum)
    }
}

/// A read (or, with a mutable buffer, write) view of one TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// Wraps `buffer` without validation; getters may panic on malformed input.
    #[inline]
    pub fn new_unchecked(buffer: T) -> Self {
        TcpPacket { buffer }
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

    /// Validates the header and its options so that no getter can panic.
    ///
    /// # Errors
    /// * [`WireError::Truncated`]: fewer than 20 bytes;
    /// * [`WireError::BadDataOffset`]: data offset below 5 or header beyond the buffer;
    /// * [`WireError::BadOption`]: an option's length byte is missing, below 2, or runs past
    ///   the header.
    #[inline]
    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let header_len = self.header_len();
        if header_len < HEADER_LEN || header_len > len {
            return Err(WireError::BadDataOffset);
        }
        for option in self.options_iter() {
            option?;
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

    /// Sequence number.
    #[inline]
    pub fn seq_number(&self) -> SeqNum {
        SeqNum(self.be32(field::SEQ))
    }

    /// Acknowledgment number (meaningful only with [`TcpFlags::ACK`]).
    #[inline]
    pub fn ack_number(&self) -> SeqNum {
        SeqNum(self.be32(field::ACK))
    }

    /// Header length in bytes (data offset × 4).
    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::DATA_OFFSET] >> 4) * 4
    }

    /// The flags of byte 13.
    #[inline]
    pub fn flags(&self) -> TcpFlags {
        TcpFlags(self.buffer.as_ref()[field::FLAGS])
    }

    /// Window field (unscaled).
    #[inline]
    pub fn window_len(&self) -> u16 {
        self.be16(field::WINDOW)
    }

    /// Checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        self.be16(field::CHECKSUM)
    }

    /// Urgent pointer.
    #[inline]
    pub fn urgent_at(&self) -> u16 {
        self.be16(field::URGENT)
    }

    /// Raw option bytes (header bytes after the first 20).
    #[inline]
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.header_len()]
    }

    /// The payload: everything after the header.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }

    /// Payload length in bytes.
    #[inline]
    pub fn payload_len(&self) -> usize {
        self.buffer.as_ref().len() - self.header_len()
    }

    /// Sequence space the segment occupies: payload length, plus one for SYN and one for FIN.
    #[inline]
    pub fn segment_len(&self) -> usize {
        let flags = self.flags();
        self.payload_len()
            + usize::from(flags.contains(TcpFlags::SYN))
            + usize::from(flags.contains(TcpFlags::FIN))
    }

    /// The unfolded checksum sum over pseudo-header and segment.
    #[inline]
    fn full_sum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> u32 {
        let buf = self.buffer.as_ref();
        let pseudo = checksum::pseudo_header(src, dst, PROTO_TCP, buf.len() as u16);
        checksum::sum(buf, pseudo)
    }

    /// True when the checksum verifies for a segment sent from `src` to `dst`.
    #[inline]
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        checksum::fold(self.full_sum(src, dst)) == 0xFFFF
    }

    /// Iterates over the options.
    #[inline]
    pub fn options_iter(&self) -> TcpOptions<'_> {
        TcpOptions::new(self.options())
    }

    /// The MSS option, if present.
    #[inline]
    pub fn mss(&self) -> Option<u16> {
        self.options_iter().find_map(|o| match o {
            Ok(TcpOption::Mss(mss)) => Some(mss),
            _ => None,
        })
    }

    /// The window scale option, if present.
    #[inline]
    pub fn window_scale(&self) -> Option<u8> {
        self.options_iter().find_map(|o| match o {
            Ok(TcpOption::WindowScale(shift)) => Some(shift),
            _ => None,
        })
    }

    /// True when the SACK-permitted option is present.
    #[inline]
    pub fn sack_permitted(&self) -> bool {
        self.options_iter()
            .any(|o| o == Ok(TcpOption::SackPermitted))
    }

    /// Offset within the segment of the 8 bytes TSval+TSecr of the timestamps option.
    #[inline]
    pub fn timestamps_offset(&self) -> Option<usize> {
        let options = self.options();
        // Fast path: the layout Linux and most stacks use on established segments.
        if options.len() >= 12 && options[..4] == [kind::NOP, kind::NOP, kind::TIMESTAMPS, 10] {
            return Some(HEADER_LEN + 4);
        }
        let mut iter = TcpOptions::new(options);
        while let Some(Ok((at, option))) = iter.next_with_offset() {
            if let TcpOption::Timestamps { .. } = option {
                return Some(HEADER_LEN + at + 2);
            }
        }
        None
    }

    /// The timestamps option as `(tsval, tsecr)`, if present.
    #[inline]
    pub fn timestamps(&self) -> Option<(u32, u32)> {
        let at = self.timestamps_offset()?;
        Some((self.be32(at), self.be32(at + 4)))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    #[inline]
    fn set_be16(&mut self, at: usize, value: u16) {
        self.buffer.as_mut()[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }

    #[inline]
    fn set_be32(&mut self, at: usize, value: u32) {
        self.buffer.as_mut()[at..at + 4].copy_from_slice(&value.to_be_bytes());
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

    /// Sets the sequence number (raw).
    #[inline]
    pub fn set_seq_number(&mut self, seq: SeqNum) {
        self.set_be32(field::SEQ, seq.0);
    }

    /// Sets the acknowledgment number (raw).
    #[inline]
    pub fn set_ack_number(&mut self, ack: SeqNum) {
        self.set_be32(field::ACK, ack.0);
    }

    /// Sets the data offset to `header_len / 4`, keeping the reserved bits. Changes where
    /// the payload starts, so it invalidates what `check_len` established.
    ///
    /// # Panics
    /// Debug builds assert a multiple of 4 between 20 and 60.
    #[inline]
    pub fn set_header_len(&mut self, header_len: usize) {
        debug_assert!(header_len & 3 == 0 && (HEADER_LEN..=MAX_HEADER_LEN).contains(&header_len));
        let byte = &mut self.buffer.as_mut()[field::DATA_OFFSET];
        *byte = (((header_len / 4) as u8) << 4) | (*byte & 0x0F);
    }

    /// Sets the flags byte (raw).
    #[inline]
    pub fn set_flags(&mut self, flags: TcpFlags) {
        self.buffer.as_mut()[field::FLAGS] = flags.0;
    }

    /// Sets the window field (raw).
    #[inline]
    pub fn set_window_len(&mut self, window: u16) {
        self.set_be16(field::WINDOW, window);
    }

    /// Sets the checksum field.
    #[inline]
    pub fn set_checksum(&mut self, value: u16) {
        self.set_be16(field::CHECKSUM, value);
    }

    /// Sets the urgent pointer (raw).
    #[inline]
    pub fn set_urgent_at(&mut self, value: u16) {
        self.set_be16(field::URGENT, value);
    }

    /// Recomputes the checksum from scratch over the pseudo-header (`src`, `dst`, protocol 6,
    /// buffer length) and the whole buffer.
    #[inline]
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let value = !checksum::fold(self.full_sum(src, dst));
        self.set_checksum(value);
    }

    /// Mutable option bytes.
    #[inline]
    pub fn options_mut(&mut self) -> &mut [u8] {
        let end = self.header_len();
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }

    /// Mutable payload.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.header_len();
        &mut self.buffer.as_mut()[start..]
    }

    /// Overwrites TSval and TSecr in place (raw; the checksum is not updated). Returns false,
    /// changing nothing, when the segment has no timestamps option.
    #[inline]
    pub fn set_timestamps(&mut self, tsval: u32, tsecr: u32) -> bool {
        match self.timestamps_offset() {
            Some(at) => {
                self.set_be32(at, tsval);
                self.set_be32(at + 4, tsecr);
                true
            }
            None => false,
        }
    }

    /// Overwrites every SACK option (kind 5, all of its bytes) with NOPs; the header length
    /// is unchanged. The checksum is patched incrementally, so a valid checksum stays valid.
    /// Returns true when something was overwritten.
    pub fn strip_sack_blocks(&mut self) -> bool {
        let header_len = self.header_len();
        let mut pos = 0;
        let mut stripped = false;
        let mut check = self.checksum();
        while HEADER_LEN + pos < header_len {
            let (is_sack, next) = {
                let options = &self.buffer.as_ref()[HEADER_LEN..header_len];
                match parse_option(options, pos) {
                    Ok((TcpOption::EndOfList, _)) | Err(_) => break,
                    Ok((option, next)) => (matches!(option, TcpOption::Sack(_)), next),
                }
            };
            if is_sack {
                let start = HEADER_LEN + pos;
                let range = &mut self.buffer.as_mut()[start..HEADER_LEN + next];
                let old_sum = checksum::fold(checksum::sum(range, 0));
                range.fill(kind::NOP);
                let new_sum = checksum::fold(checksum::sum(range, 0));
                check = update_range(check, start, old_sum, new_sum);
                stripped = true;
            }
            pos = next;
        }
        if stripped {
            self.set_checksum(check);
        }
        stripped
    }

    /// Replaces a 32-bit field at even offset `at` and patches the checksum.
    #[inline]
    fn rewrite_be32(&mut self, at: usize, new: u32) {
        let old = self.be32(at);
        self.set_be32(at, new);
        let check = checksum::update_u32(self.checksum(), old, new);
        self.set_checksum(check);
    }

    /// Replaces a 16-bit field at even offset `at` and patches the checksum.
    #[inline]
    fn rewrite_be16(&mut self, at: usize, new: u16) {
        let old = self.be16(at);
        self.set_be16(at, new);
        let check = checksum::update_u16(self.checksum(), old, new);
        self.set_checksum(check);
    }

    /// Replaces the sequence number and patches the checksum (RFC 1624).
    #[inline]
    pub fn rewrite_seq_number(&mut self, seq: SeqNum) {
        self.rewrite_be32(field::SEQ, seq.0);
    }

    /// Replaces the acknowledgment number and patches the checksum (RFC 1624).
    #[inline]
    pub fn rewrite_ack_number(&mut self, ack: SeqNum) {
        self.rewrite_be32(field::ACK, ack.0);
    }

    /// Replaces the source port and patches the checksum (RFC 1624).
    #[inline]
    pub fn rewrite_src_port(&mut self, port: u16) {
        self.rewrite_be16(field::SRC_PORT, port);
    }

    /// Replaces the destination port and patches the checksum (RFC 1624).
    #[inline]
    pub fn rewrite_dst_port(&mut self, port: u16) {
        self.rewrite_be16(field::DST_PORT, port);
    }

    /// Replaces the window field and patches the checksum (RFC 1624).
    #[inline]
    pub fn rewrite_window(&mut self, window: u16) {
        self.rewrite_be16(field::WINDOW, window);
    }

    /// Replaces TSval and TSecr and patches the checksum (RFC 1624; the option may sit at an
    /// odd offset). Returns false, changing nothing, without a timestamps option.
    #[inline]
    pub fn rewrite_timestamps(&mut self, tsval: u32, tsecr: u32) -> bool {
        let Some(at) = self.timestamps_offset() else {
            return false;
        };
        let (old_val, old_ecr) = (self.be32(at), self.be32(at + 4));
        self.set_be32(at, tsval);
        self.set_be32(at + 4, tsecr);
        let check = self.checksum();
        let check = if at % 2 == 0 {
            checksum::update_u32(checksum::update_u32(check, old_val, tsval), old_ecr, tsecr)
        } else {
            let mut old = [0u8; 8];
            old[..4].copy_from_slice(&old_val.to_be_bytes());
            old[4..].copy_from_slice(&old_ecr.to_be_bytes());
            let mut new = [0u8; 8];
            new[..4].copy_from_slice(&tsval.to_be_bytes());
            new[4..].copy_from_slice(&tsecr.to_be_bytes());
            checksum::update_bytes(check, at, &old, &new)
        };
        self.set_checksum(check);
        true
    }

    /// Patches the checksum for a pseudo-header address change from `old` to `new` (the pair
    /// returned by `Ipv4Packet::rewrite_src_addr`/`rewrite_dst_addr`).
    #[inline]
    pub fn adjust_checksum_for_addr(&mut self, old: u32, new: u32) {
        let check = checksum::update_u32(self.checksum(), old, new);
        self.set_checksum(check);
    }
}

/// The owned, validated form of a TCP header: what a session reasons about, and what
/// [`emit_ipv4_tcp`] fabricates segments from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpRepr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: SeqNum,
    /// Acknowledgment number.
    pub ack: SeqNum,
    /// Flags.
    pub flags: TcpFlags,
    /// Window field (unscaled).
    pub window: u16,
    /// MSS option.
    pub mss: Option<u16>,
    /// Window scale option.
    pub window_scale: Option<u8>,
    /// SACK-permitted option.
    pub sack_permitted: bool,
    /// Timestamps option `(tsval, tsecr)`.
    pub timestamps: Option<(u32, u32)>,
    /// Payload length in bytes (set by [`parse`](Self::parse); [`emit_ipv4_tcp`] writes the
    /// payload slice it is given and does not read this).
    pub payload_len: usize,
}

impl TcpRepr {
    /// Extracts the header fields and the options a session uses from a validated segment.
    /// SACK blocks and unknown options are not represented.
    pub fn parse<T: AsRef<[u8]>>(packet: &TcpPacket<T>) -> TcpRepr {
        let mut repr = TcpRepr {
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            seq: packet.seq_number(),
            ack: packet.ack_number(),
            flags: packet.flags(),
            window: packet.window_len(),
            payload_len: packet.payload_len(),
            ..TcpRepr::default()
        };
        for option in packet.options_iter() {
            match option {
                Ok(TcpOption::Mss(mss)) => repr.mss = Some(mss),
                Ok(TcpOption::WindowScale(shift)) => repr.window_scale = Some(shift),
                Ok(TcpOption::SackPermitted) => repr.sack_permitted = true,
                Ok(TcpOption::Timestamps { tsval, tsecr }) => {
                    repr.timestamps = Some((tsval, tsecr))
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        repr
    }

    /// Header length with options, padded to 4 bytes, in the layout Linux emits
    /// (`tcp_options_write`): MSS; SACK-permitted fused with timestamps (`04 02 08 0a`) or
    /// `NOP NOP TS`; `NOP NOP SACKPERM` without timestamps; `NOP WS`.
    #[inline]
    pub fn header_len(&self) -> usize {
        let mut len = HEADER_LEN;
        if self.mss.is_some() {
            len += 4;
        }
        if self.timestamps.is_some() {
            len += 12;
        } else if self.sack_permitted {
            len += 4;
        }
        if self.window_scale.is_some() {
            len += 4;
        }
        len
    }

    /// Writes header and options into `buf[..self.header_len()]`, checksum zero.
    ///
    /// # Panics
    /// If `buf` is shorter than [`header_len`](Self::header_len).
    pub fn emit_header(&self, buf: &mut [u8]) {
        let header_len = self.header_len();
        let header = &mut buf[..header_len];
        header[0..2].copy_from_slice(&self.src_port.to_be_bytes());
        header[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        header[4..8].copy_from_slice(&self.seq.0.to_be_bytes());
        header[8..12].copy_from_slice(&self.ack.0.to_be_bytes());
        header[12] = ((header_len / 4) as u8) << 4;
        header[13] = self.flags.0;
        header[14..16].copy_from_slice(&self.window.to_be_bytes());
        header[16..20].fill(0);
        let mut at = HEADER_LEN;
        let mut put = |bytes: &[u8]| {
            header[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        if let Some(mss) = self.mss {
            let [hi, lo] = mss.to_be_bytes();
            put(&[kind::MSS, 4, hi, lo]);
        }
        if let Some((tsval, tsecr)) = self.timestamps {
            if self.sack_permitted {
                put(&[kind::SACK_PERMITTED, 2, kind::TIMESTAMPS, 10]);
            } else {
                put(&[kind::NOP, kind::NOP, kind::TIMESTAMPS, 10]);
            }
            put(&tsval.to_be_bytes());
            put(&tsecr.to_be_bytes());
        } else if self.sack_permitted {
            put(&[kind::NOP, kind::NOP, kind::SACK_PERMITTED, 2]);
        }
        if let Some(shift) = self.window_scale {
            put(&[kind::NOP, kind::WINDOW_SCALE, 3, shift]);
        }
    }
}

/// Writes into `buf` (replacing its contents) a copy of the IPv4/TCP packet whose headers
/// are `headers` (IP and TCP, options included, e.g. `&packet[..ip_len + tcp_len]`) carrying
/// `payload`, with sequence number `seq`, IP identification `ident` and TCP flags `flags`;
/// the lengths and both checksums are recomputed. For splitting a segment into pieces and
/// for putting other bytes in front of one.
///
/// # Panics
/// If `headers` is not a valid IPv4/TCP header pair or the packet would exceed 65535 bytes.
pub fn resegment(
    headers: &[u8],
    seq: SeqNum,
    ident: u16,
    flags: TcpFlags,
    payload: &[u8],
    buf: &mut Vec<u8>,
) {
    let total = u16::try_from(headers.len() + payload.len()).expect("IPv4 packet over 65535 bytes");
    buf.clear();
    buf.extend_from_slice(headers);
    buf.extend_from_slice(payload);
    let mut ip = super::Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.set_total_len(total);
    ip.set_ident(ident);
    ip.fill_checksum();
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let mut tcp = TcpPacket::new_unchecked(ip.payload_mut());
    tcp.set_seq_number(seq);
    tcp.set_flags(flags);
    tcp.fill_checksum(src, dst);
}

/// Appends a complete IPv4 + TCP packet to `buf`: IPv4 header of 20 bytes (DSCP 0, DF set,
/// `ident`, `ttl`), the TCP header from `repr`, then `payload`; both checksums filled.
/// Does not allocate when `buf` has the capacity.
///
/// # Panics
/// If the packet would exceed 65535 bytes.
pub fn emit_ipv4_tcp(
    buf: &mut Vec<u8>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ident: u16,
    ttl: u8,
    repr: &TcpRepr,
    payload: &[u8],
) {
    let tcp_len = repr.header_len() + payload.len();
    let total_len = ipv4::HEADER_LEN + tcp_len;
    let total_len_u16 = u16::try_from(total_len).expect("IPv4 packet longer than 65535 bytes");
    let start = buf.len();
    buf.resize(start + total_len, 0);
    let packet = &mut buf[start..];

    let mut ip = ipv4::Ipv4Packet::new_unchecked(&mut packet[..ipv4::HEADER_LEN]);
    ip.set_version_ihl(ipv4::HEADER_LEN);
    ip.set_dscp_ecn(0);
    ip.set_total_len(total_len_u16);
    ip.set_ident(ident);
    ip.set_flags_frag(true, false, 0);
    ip.set_ttl(ttl);
    ip.set_protocol(PROTO_TCP);
    ip.set_src_addr(src);
    ip.set_dst_addr(dst);
    ip.fill_checksum();

    let segment = &mut packet[ipv4::HEADER_LEN..];
    repr.emit_header(segment);
    segment[repr.header_len()..].copy_from_slice(payload);
    TcpPacket::new_unchecked(segment).fill_checksum(src, dst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ethernet::tests::{hex, SYN_FRAME};
    use crate::wire::ipv4::Ipv4Packet;
    use proptest::prelude::*;

    // All frames: Linux 6.x, curl -> python3 http.server, captured with tcpdump on a veth
    // between two network namespaces with tx checksum offload off (so checksums are real;
    // tcpdump -v reported each "cksum ... (correct)").

    /// SYN-ACK from the server: [mss 1460,sackOK,TS val 698854046 ecr 4113920671,nop,wscale 10].
    const SYN_ACK_FRAME: &str = "
        02aa 0000 0001 02bb 0000 0002 0800 4500
        003c 0000 4000 4006 2622 0a4c 0002 0a4c
        0001 1fa3 b530 0086 e85e e973 4484 a012
        fe88 0cfe 0000 0204 05b4 0402 080a 29a7
        aa9e f535 729f 0103 030a";

    /// "GET / HTTP/1.1" with [nop,nop,TS val 4113920672 ecr 698854046], 78 bytes of payload.
    const GET_FRAME: &str = "
        02bb 0000 0002 02aa 0000 0001 0800 4500
        0082 5479 4000 4006 d162 0a4c 0001 0a4c
        0002 b530 1fa3 e973 4484 0086 e85f 8018
        003f b64e 0000 0101 080a f535 72a0 29a7
        aa9e 4745 5420 2f20 4854 5450 2f31 2e31
        0d0a 486f 7374 3a20 3130 2e37 362e 302e
        323a 3830 3939 0d0a 5573 6572 2d41 6765
        6e74 3a20 6375 726c 2f37 2e38 382e 310d
        0a41 6363 6570 743a 202a 2f2a 0d0a 0d0a";

    /// Client FIN-ACK.
    const FIN_FRAME: &str = "
        02bb 0000 0002 02aa 0000 0001 0800 4500
        0034 547c 4000 4006 d1ad 0a4c 0001 0a4c
        0002 b530 1fa3 e973 44d2 0086 ea7d 8011
        003f 37a4 0000 0101 080a f535 72a2 29a7
        aaa1";

    /// A duplicate ACK carrying two SACK blocks, provoked by a user-space bridge dropping
    /// three server segments: [nop,nop,TS val 3586132190 ecr 3916299314,nop,nop,
    /// sack 2 {43645:45093}{16133:42197}] (relative sequence numbers in tcpdump's notation).
    const SACK_FRAME: &str = "
        02bb 0000 0002 02aa 0000 0001 0800 4500
        0048 1dfa 4000 4006 081c 0a4c 0001 0a4c
        0002 b316 1fa3 9068 afed cc64 6376 d010
        004e ec0c 0000 0101 080a d5c0 08de e96d
        fc32 0101 0512 cc64 d496 cc64 da3e cc64
        691e cc64 ceee";

    /// A SYN captured on `lo`, where Linux leaves checksumming to "hardware"
    /// (CHECKSUM_PARTIAL): the field holds the folded pseudo-header sum, not inverted.
    const LOOPBACK_SYN_FRAME: &str = "
        0000 0000 0000 0000 0000 0000 0800 4500
        003c bb4c 4000 4006 816d 7f00 0001 7f00
        0001 9e24 46b3 0a8d 03f8 0000 0000 a002
        ffd7 fe30 0000 0204 ffd7 0402 080a f231
        23c2 0000 0000 0103 030a";

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 1);
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 2);

    /// The IPv4 packet of a frame.
    fn ip_of(frame: &str) -> Vec<u8> {
        hex(frame)[14..].to_vec()
    }

    /// The TCP segment of a frame.
    fn tcp_of(frame: &str) -> Vec<u8> {
        let ip = ip_of(frame);
        let packet = Ipv4Packet::new_checked(&ip[..]).unwrap();
        packet.payload().to_vec()
    }

    #[test]
    fn flags_debug() {
        assert_eq!(format!("{:?}", TcpFlags::SYN | TcpFlags::ACK), "SA");
        assert_eq!(
            format!("{:?}", TcpFlags::FIN | TcpFlags::PSH | TcpFlags::ACK),
            "FPA"
        );
        assert_eq!(format!("{}", TcpFlags::RST), "R");
        assert_eq!(format!("{:?}", TcpFlags::EMPTY), ".");
        let flags = TcpFlags::SYN | TcpFlags::ACK;
        assert!(flags.contains(TcpFlags::SYN));
        assert!(!flags.contains(TcpFlags::SYN | TcpFlags::FIN));
        assert!(flags.intersects(TcpFlags::SYN | TcpFlags::FIN));
        assert_eq!(flags & TcpFlags::ACK, TcpFlags::ACK);
    }

    #[test]
    fn real_syn() {
        let seg = tcp_of(SYN_FRAME);
        let tcp = TcpPacket::new_checked(&seg[..]).unwrap();
        assert_eq!(tcp.src_port(), 46384);
        assert_eq!(tcp.dst_port(), 8099);
        assert_eq!(tcp.seq_number(), SeqNum(3916645507));
        assert_eq!(tcp.ack_number(), SeqNum(0));
        assert_eq!(tcp.header_len(), 40);
        assert_eq!(tcp.flags(), TcpFlags::SYN);
        assert_eq!(tcp.window_len(), 64240);
        assert_eq!(tcp.checksum(), 0xcdd1);
        assert_eq!(tcp.urgent_at(), 0);
        assert_eq!(tcp.options().len(), 20);
        assert!(tcp.payload().is_empty());
        assert_eq!(tcp.payload_len(), 0);
        assert_eq!(tcp.segment_len(), 1);
        assert!(tcp.verify_checksum(CLIENT, SERVER));
        assert!(!tcp.verify_checksum(SERVER, Ipv4Addr::new(10, 76, 0, 3)));
        assert_eq!(tcp.mss(), Some(1460));
        assert_eq!(tcp.window_scale(), Some(10));
        assert!(tcp.sack_permitted());
        assert_eq!(tcp.timestamps(), Some((4113920671, 0)));
        assert_eq!(tcp.timestamps_offset(), Some(28));
        let options: Vec<_> = tcp.options_iter().map(Result::unwrap).collect();
        assert_eq!(
            options,
            [
                TcpOption::Mss(1460),
                TcpOption::SackPermitted,
                TcpOption::Timestamps {
                    tsval: 4113920671,
                    tsecr: 0
                },
                TcpOption::NoOp,
                TcpOption::WindowScale(10),
            ]
        );
    }

    #[test]
    fn real_syn_ack() {
        let seg = tcp_of(SYN_ACK_FRAME);
        let tcp = TcpPacket::new_checked(&seg[..]).unwrap();
        assert_eq!(tcp.flags(), TcpFlags::SYN | TcpFlags::ACK);
        assert_eq!(tcp.seq_number(), SeqNum(8841310));
        assert_eq!(tcp.ack_number(), SeqNum(3916645508));
        assert_eq!(tcp.window_len(), 65160);
        assert_eq!(tcp.timestamps(), Some((698854046, 4113920671)));
        assert!(tcp.verify_checksum(SERVER, CLIENT));
        let repr = TcpRepr::parse(&tcp);
        assert_eq!(repr.mss, Some(1460));
        assert_eq!(repr.window_scale, Some(10));
        assert!(repr.sack_permitted);
    }

    #[test]
    fn real_http_get() {
        let seg = tcp_of(GET_FRAME);
        let tcp = TcpPacket::new_checked(&seg[..]).unwrap();
        assert_eq!(tcp.flags(), TcpFlags::PSH | TcpFlags::ACK);
        assert_eq!(tcp.header_len(), 32);
        assert_eq!(tcp.payload_len(), 78);
        assert_eq!(tcp.segment_len(), 78);
        assert!(tcp
            .payload()
            .starts_with(b"GET / HTTP/1.1\r\nHost: 10.76.0.2:8099\r\n"));
        assert!(tcp.payload().ends_with(b"\r\n\r\n"));
        assert_eq!(tcp.timestamps(), Some((4113920672, 698854046)));
        assert_eq!(tcp.timestamps_offset(), Some(24));
        assert_eq!(tcp.mss(), None);
        assert!(!tcp.sack_permitted());
        assert!(tcp.verify_checksum(CLIENT, SERVER));
    }

    #[test]
    fn real_fin() {
        let seg = tcp_of(FIN_FRAME);
        let tcp = TcpPacket::new_checked(&seg[..]).unwrap();
        assert_eq!(tcp.flags(), TcpFlags::FIN | TcpFlags::ACK);
        assert_eq!(tcp.segment_len(), 1);
        assert!(tcp.verify_checksum(CLIENT, SERVER));
    }

    #[test]
    fn real_sack_and_strip() {
        let ip = ip_of(SACK_FRAME);
        let ip = Ipv4Packet::new_checked(&ip[..]).unwrap();
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let mut seg = ip.payload().to_vec();
        let tcp = TcpPacket::new_checked(&seg[..]).unwrap();
        assert!(tcp.verify_checksum(src, dst));
        let sack = tcp
            .options_iter()
            .map(Result::unwrap)
            .find(|o| matches!(o, TcpOption::Sack(_)))
            .unwrap();
        let blocks: Vec<_> = sack.sack_blocks().collect();
        assert_eq!(
            blocks,
            [
                (SeqNum(0xcc64d496), SeqNum(0xcc64da3e)),
                (SeqNum(0xcc64691e), SeqNum(0xcc64ceee)),
            ]
        );
        // tcpdump's relative numbers: 43645 = 0xcc64d496 - ISN.
        assert_eq!(SeqNum(0xcc64d496).diff(SeqNum(0xcc64691e)), 43645 - 16133);

        let mut tcp = TcpPacket::new_checked(&mut seg[..]).unwrap();
        assert!(tcp.strip_sack_blocks());
        assert_eq!(tcp.header_len(), 52);
        assert_eq!(&tcp.options()[12..], &[1u8; 20][..]);
        assert_eq!(tcp.timestamps(), Some((3586132190, 3916299314)));
        assert!(tcp.verify_checksum(src, dst));
        let incremental = tcp.checksum();
        tcp.fill_checksum(src, dst);
        assert_eq!(incremental, tcp.checksum());
        assert!(!tcp.strip_sack_blocks());
        assert!(TcpPacket::new_checked(&seg[..]).is_ok());
    }

    #[test]
    fn loopback_partial_checksum() {
        let ip = ip_of(LOOPBACK_SYN_FRAME);
        let ip = Ipv4Packet::new_checked(&ip[..]).unwrap();
        let localhost = Ipv4Addr::LOCALHOST;
        let mut seg = ip.payload().to_vec();
        let mut tcp = TcpPacket::new_checked(&mut seg[..]).unwrap();
        assert_eq!(tcp.mss(), Some(65495));
        assert!(!tcp.verify_checksum(localhost, localhost));
        let partial = checksum::fold(checksum::pseudo_header(localhost, localhost, PROTO_TCP, 40));
        assert_eq!(tcp.checksum(), partial);
        tcp.fill_checksum(localhost, localhost);
        // tcpdump -v printed "cksum 0xfe30 (incorrect -> 0x46ae)".
        assert_eq!(tcp.checksum(), 0x46ae);
    }

    #[test]
    fn repr_emit_reproduces_linux_syn() {
        // Parse the captured SYN, emit it again: the bytes must be identical, IPv4 header
        // included, which pins the option layout to what Linux sends.
        let ip_bytes = ip_of(SYN_FRAME);
        let ip = Ipv4Packet::new_checked(&ip_bytes[..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        let repr = TcpRepr::parse(&tcp);
        assert_eq!(repr.header_len(), 40);
        let mut out = Vec::new();
        emit_ipv4_tcp(
            &mut out,
            ip.src_addr(),
            ip.dst_addr(),
            ip.ident(),
            ip.ttl(),
            &repr,
            &[],
        );
        assert_eq!(out, ip_bytes);

        // Same for the SYN-ACK and the GET (which has a payload and NOP NOP TS).
        for frame in [SYN_ACK_FRAME, GET_FRAME, FIN_FRAME] {
            let ip_bytes = ip_of(frame);
            let ip = Ipv4Packet::new_checked(&ip_bytes[..]).unwrap();
            let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
            let repr = TcpRepr::parse(&tcp);
            let mut out = vec![0xAA];
            emit_ipv4_tcp(
                &mut out,
                ip.src_addr(),
                ip.dst_addr(),
                ip.ident(),
                ip.ttl(),
                &repr,
                tcp.payload(),
            );
            assert_eq!(&out[1..], &ip_bytes[..]);
        }
    }

    #[test]
    fn set_timestamps_in_place() {
        let mut seg = tcp_of(GET_FRAME);
        let mut tcp = TcpPacket::new_checked(&mut seg[..]).unwrap();
        assert!(tcp.set_timestamps(1, 2));
        assert_eq!(tcp.timestamps(), Some((1, 2)));
        assert!(!tcp.verify_checksum(CLIENT, SERVER));
        let mut syn = tcp_of(SYN_FRAME);
        let mut tcp = TcpPacket::new_checked(&mut syn[..]).unwrap();
        assert!(tcp.set_timestamps(7, 8));
        assert_eq!(tcp.timestamps(), Some((7, 8)));
        // No timestamps option: nothing happens.
        let repr = TcpRepr {
            flags: TcpFlags::RST,
            ..TcpRepr::default()
        };
        let mut out = Vec::new();
        emit_ipv4_tcp(&mut out, CLIENT, SERVER, 1, 64, &repr, &[]);
        let mut tcp = TcpPacket::new_checked(&mut out[20..]).unwrap();
        assert!(!tcp.set_timestamps(1, 2));
        assert!(!tcp.rewrite_timestamps(1, 2));
        assert!(tcp.verify_checksum(CLIENT, SERVER));
    }

    #[test]
    fn rejects_malformed() {
        let seg = tcp_of(SYN_FRAME);
        assert_eq!(
            TcpPacket::new_checked(&seg[..19]).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            TcpPacket::new_checked(&seg[..39]).unwrap_err(),
            WireError::BadDataOffset
        );
        let mut bad = seg.clone();
        bad[12] = 0x40;
        assert_eq!(
            TcpPacket::new_checked(&bad[..]).unwrap_err(),
            WireError::BadDataOffset
        );
        let mut bad = seg.clone();
        bad[21] = 30; // MSS option length past the header
        assert_eq!(
            TcpPacket::new_checked(&bad[..]).unwrap_err(),
            WireError::BadOption
        );
        bad[21] = 1; // length below 2
        assert_eq!(
            TcpPacket::new_checked(&bad[..]).unwrap_err(),
            WireError::BadOption
        );
        let mut bad = seg.clone();
        bad[39] = 3; // last byte becomes a kind without a length byte
        bad[38] = 1;
        assert_eq!(
            TcpPacket::new_checked(&bad[..]).unwrap_err(),
            WireError::BadOption
        );
        // A known kind with an unusual length is reported as unknown, not rejected.
        let mut odd = seg.clone();
        odd[20..24].copy_from_slice(&[2, 3, 0xff, 1]); // MSS len 3, then a NOP
        let tcp = TcpPacket::new_checked(&odd[..]).unwrap();
        assert_eq!(tcp.mss(), None);
        assert_eq!(
            tcp.options_iter().next(),
            Some(Ok(TcpOption::Unknown {
                kind: 2,
                data: &[0xff]
            }))
        );
        // End of list stops the parse: garbage after it is padding.
        let mut eol = seg.clone();
        eol[20] = 0;
        eol[21] = 0xff;
        let tcp = TcpPacket::new_checked(&eol[..]).unwrap();
        assert_eq!(tcp.options_iter().count(), 1);
        assert_eq!(tcp.timestamps(), None);
    }

    #[test]
    fn odd_offset_timestamps() {
        // NOP, TS at offset 21 (TS value at 23, odd), NOP NOP NOP to pad to 12.
        let mut seg = [0u8; 32 + 5];
        seg[12] = 8 << 4;
        seg[13] = TcpFlags::ACK.0;
        seg[20..32].copy_from_slice(&[1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2, 1]);
        seg[32..].copy_from_slice(b"hello");
        let mut tcp = TcpPacket::new_checked(&mut seg[..]).unwrap();
        assert_eq!(tcp.timestamps_offset(), Some(23));
        assert_eq!(tcp.timestamps(), Some((1, 2)));
        tcp.fill_checksum(CLIENT, SERVER);
        assert!(tcp.rewrite_timestamps(0xdeadbeef, 0x01020304));
        assert_eq!(tcp.timestamps(), Some((0xdeadbeef, 0x01020304)));
        assert!(tcp.verify_checksum(CLIENT, SERVER));
    }

    fn arb_repr() -> impl Strategy<Value = TcpRepr> {
        (
            (
                any::<u16>(),
                any::<u16>(),
                any::<u32>(),
                any::<u32>(),
                any::<u8>(),
                any::<u16>(),
            ),
            (
                proptest::option::of(any::<u16>()),
                proptest::option::of(0u8..15),
                any::<bool>(),
                proptest::option::of((any::<u32>(), any::<u32>())),
            ),
        )
            .prop_map(
                |((sp, dp, seq, ack, flags, window), (mss, ws, sack, ts))| TcpRepr {
                    src_port: sp,
                    dst_port: dp,
                    seq: SeqNum(seq),
                    ack: SeqNum(ack),
                    flags: TcpFlags(flags),
                    window,
                    mss,
                    window_scale: ws,
                    sack_permitted: sack,
                    timestamps: ts,
                    payload_len: 0,
                },
            )
    }

    proptest! {
        #[test]
        fn repr_emit_parse_round_trip(mut repr in arb_repr(),
                                      payload in proptest::collection::vec(any::<u8>(), 0..64),
                                      src in any::<u32>(), dst in any::<u32>(),
                                      ident in any::<u16>(), ttl in any::<u8>()) {
            let (src, dst) = (Ipv4Addr::from(src), Ipv4Addr::from(dst));
            repr.payload_len = payload.len();
            let mut out = Vec::new();
            emit_ipv4_tcp(&mut out, src, dst, ident, ttl, &repr, &payload);
            let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
            prop_assert!(ip.verify_checksum());
            prop_assert!(ip.dont_frag());
            prop_assert_eq!((ip.src_addr(), ip.dst_addr(), ip.ident(), ip.ttl()), (src, dst, ident, ttl));
            let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
            prop_assert!(tcp.verify_checksum(src, dst));
            prop_assert_eq!(tcp.header_len(), repr.header_len());
            prop_assert_eq!(tcp.payload(), &payload[..]);
            prop_assert_eq!(TcpRepr::parse(&tcp), repr);
        }

        #[test]
        fn rewrites_equal_full_recompute(frame in 0usize..5, seq in any::<u32>(), ack in any::<u32>(),
                                         sport in any::<u16>(), dport in any::<u16>(),
                                         window in any::<u16>(), tsval in any::<u32>(),
                                         tsecr in any::<u32>(), new_src in any::<u32>(),
                                         new_dst in any::<u32>()) {
            let frame = [SYN_FRAME, SYN_ACK_FRAME, GET_FRAME, FIN_FRAME, SACK_FRAME][frame];
            let mut bytes = ip_of(frame);
            let mut ip = Ipv4Packet::new_checked(&mut bytes[..]).unwrap();
            let (old_src, new_src_pair) = ip.rewrite_src_addr(Ipv4Addr::from(new_src));
            let (old_dst, new_dst_pair) = ip.rewrite_dst_addr(Ipv4Addr::from(new_dst));
            prop_assert!(ip.verify_checksum());
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            let mut tcp = TcpPacket::new_checked(ip.payload_mut()).unwrap();
            tcp.adjust_checksum_for_addr(old_src, new_src_pair);
            tcp.adjust_checksum_for_addr(old_dst, new_dst_pair);
            prop_assert!(tcp.verify_checksum(src, dst));
            tcp.rewrite_seq_number(SeqNum(seq));
            tcp.rewrite_ack_number(SeqNum(ack));
            tcp.rewrite_src_port(sport);
            tcp.rewrite_dst_port(dport);
            tcp.rewrite_window(window);
            prop_assert!(tcp.rewrite_timestamps(tsval, tsecr));
            tcp.strip_sack_blocks();
            prop_assert_eq!(tcp.timestamps(), Some((tsval, tsecr)));
            prop_assert_eq!(tcp.seq_number(), SeqNum(seq));
            prop_assert_eq!(tcp.ack_number(), SeqNum(ack));
            prop_assert!(tcp.verify_checksum(src, dst));
            let incremental = tcp.checksum();
            tcp.fill_checksum(src, dst);
            prop_assert_eq!(incremental, tcp.checksum());
        }

        /// Structurally valid but hostile segments: a real header whose data offset (0..=15)
        /// lies, carrying options of every kind with lying length bytes (0, 1, short, long,
        /// past the header), cut at every byte. `new_checked` refuses exactly what an
        /// independent reading of RFC 9293 refuses, with its error; what it accepts survives
        /// every getter and rewrite.
        #[test]
        fn hostile_options_are_refused_by_reason(
            doff in 0u8..16,
            options in proptest::collection::vec(
                (prop::sample::select(vec![0u8, 1, 2, 3, 4, 5, 8, 30, 254]), 0u8..48, any::<u8>()),
                0..8),
            payload in 0usize..24,
        ) {
            let mut bytes = tcp_of(SYN_FRAME)[..20].to_vec();
            bytes[12] = doff << 4;
            let mut area = Vec::new();
            for (kind, len, fill) in options {
                area.push(kind);
                if kind > 1 {
                    area.push(len);
                    area.resize(area.len() + usize::from(len).saturating_sub(2), fill);
                }
            }
            area.resize(40, 1);
            let header_len = (usize::from(doff) * 4).max(20);
            bytes.extend_from_slice(&area[..header_len - 20]);
            bytes.extend((0..payload).map(|i| i as u8));
            for cut in 0..=bytes.len() {
                let buf = &bytes[..cut];
                let expected = reference_check(buf);
                match TcpPacket::new_checked(buf) {
                    Ok(_) => prop_assert_eq!(expected, Ok(())),
                    Err(e) => prop_assert_eq!(Err(e), expected),
                }
                exercise(buf);
            }
        }

        #[test]
        fn garbage_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..80),
                                offset in 5u8..16) {
            // Bias towards plausible data offsets so option parsing is reached.
            if bytes.len() > 12 {
                bytes[12] = offset << 4;
            }
            exercise(&bytes);
        }

        #[test]
        fn mutated_real_segments_never_panic(frame in 0usize..5, at in any::<usize>(),
                                             value in any::<u8>(), cut in any::<usize>()) {
            let frame = [SYN_FRAME, SYN_ACK_FRAME, GET_FRAME, FIN_FRAME, SACK_FRAME][frame];
            let mut seg = tcp_of(frame);
            let at = at % seg.len();
            seg[at] = value;
            let cut = cut % (seg.len() + 1);
            exercise(&seg[..cut]);
            exercise(&seg);
        }
    }

    /// RFC 9293's header rules, written out independently of `check_len`.
    fn reference_check(buf: &[u8]) -> Result<(), WireError> {
        if buf.len() < 20 {
            return Err(WireError::Truncated);
        }
        let header_len = usize::from(buf[12] >> 4) * 4;
        if !(20..=buf.len()).contains(&header_len) {
            return Err(WireError::BadDataOffset);
        }
        let options = &buf[20..header_len];
        let mut i = 0;
        while i < options.len() {
            match options[i] {
                0 => break,
                1 => i += 1,
                _ => {
                    let Some(&len) = options.get(i + 1) else {
                        return Err(WireError::BadOption);
                    };
                    let len = usize::from(len);
                    if len < 2 || i + len > options.len() {
                        return Err(WireError::BadOption);
                    }
                    i += len;
                }
            }
        }
        Ok(())
    }

    /// Runs every getter and in-place mutator on a copy of `bytes` if it is accepted.
    fn exercise(bytes: &[u8]) {
        let mut copy = bytes.to_vec();
        if let Ok(tcp) = TcpPacket::new_checked(bytes) {
            let _ = (
                tcp.src_port(),
                tcp.dst_port(),
                tcp.seq_number(),
                tcp.ack_number(),
            );
            let _ = (
                tcp.header_len(),
                tcp.flags(),
                tcp.window_len(),
                tcp.checksum(),
            );
            let _ = (
                tcp.urgent_at(),
                tcp.options(),
                tcp.payload(),
                tcp.payload_len(),
            );
            let _ = (tcp.segment_len(), tcp.verify_checksum(CLIENT, SERVER));
            let _ = (
                tcp.mss(),
                tcp.window_scale(),
                tcp.sack_permitted(),
                tcp.timestamps(),
            );
            let _ = tcp.timestamps_offset();
            let _ = tcp.options_iter().count();
            let _ = TcpRepr::parse(&tcp);
            let mut tcp = TcpPacket::new_checked(&mut copy[..]).unwrap();
            tcp.set_timestamps(1, 2);
            tcp.rewrite_timestamps(3, 4);
            tcp.strip_sack_blocks();
            tcp.fill_checksum(CLIENT, SERVER);
        }
    }
}
