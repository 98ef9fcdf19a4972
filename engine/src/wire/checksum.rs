//! The Internet checksum (RFC 1071): a fast full sum, the IPv4 pseudo-header, and the
//! RFC 1624 incremental update used when a rewrite touches only a few header bytes.
//!
//! Vocabulary used below:
//! * a *sum* is the ones-complement sum of big-endian 16-bit words, kept in a `u32` that may
//!   still carry bits above 16 (so sums of several ranges can be added with plain `+`);
//! * [`fold`] folds the carries back in and yields the 16-bit sum, *not* inverted;
//! * the *checksum* written on the wire is `!fold(sum)`; a received header is intact when the
//!   sum over it (checksum field included) folds to `0xFFFF`.

use std::net::Ipv4Addr;

/// Folds a 64-bit accumulator to 16 bits with end-around carry.
#[inline]
fn fold64(mut sum: u64) -> u16 {
    sum = (sum & 0xFFFF_FFFF) + (sum >> 32);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum as u16
}

/// Adds the ones-complement sum of `data` (big-endian 16-bit words; an odd final byte is
/// padded with a zero byte) to `initial` and returns it folded to at most `0xFFFF`.
///
/// Sums compose: for an even-length `a`, `sum(b, sum(a, 0))` equals the sum over `a ++ b`, and
/// sums of separate ranges may be added together before [`fold`].
///
/// The loop reads 8 bytes at a time in native order into a 64-bit accumulator (two 32-bit
/// halves per load, so no carry test is needed) and swaps the folded result to network order
/// at the end; RFC 1071 §2(B) shows the sum is independent of byte order.
#[inline]
pub fn sum(data: &[u8], initial: u32) -> u32 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_ne_bytes(word);
        acc += (word & 0xFFFF_FFFF) + (word >> 32);
    }
    let mut rest = chunks.remainder();
    if rest.len() >= 4 {
        acc += u64::from(u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]));
        rest = &rest[4..];
    }
    if rest.len() >= 2 {
        acc += u64::from(u16::from_ne_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
    }
    if let [last] = rest {
        // RFC 1071: an odd final byte is the high byte of a word padded with zero.
        acc += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    let network_order = u16::from_be(fold64(acc));
    fold64(u64::from(network_order) + u64::from(initial)) as u32
}

/// Folds the carries of `sum` into 16 bits. The result is the ones-complement sum, not
/// inverted: write `!fold(s)` into a checksum field, and accept a received header when the sum
/// over it folds to `0xFFFF`.
#[inline]
pub fn fold(sum: u32) -> u16 {
    fold64(u64::from(sum))
}

/// The Internet checksum of `data`, ready to be written into a header: `!fold(sum(data, 0))`.
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data, 0))
}

/// The (unfolded) sum of the IPv4 pseudo-header used by TCP and UDP (RFC 793 §3.1): source and
/// destination address, zero + protocol, and the transport length (header + payload).
#[inline]
pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u16) -> u32 {
    let s = u32::from(src);
    let d = u32::from(dst);
    (s >> 16) + (s & 0xFFFF) + (d >> 16) + (d & 0xFFFF) + u32::from(protocol) + u32::from(length)
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word of the covered data (at an even
/// offset) changes from `old` to `new`: `HC' = ~(~HC + ~m + m')`.
///
/// Unlike eqn. 2 this never produces `0xFFFF` where a full recompute gives `0x0000`. The only
/// disagreement with a full recompute is the degenerate all-zero data, whose full checksum is
/// `0xFFFF` and whose incremental one is `0x0000` (both are ones-complement zero).
#[inline]
pub fn update_u16(check: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}

/// RFC 1624 update for a 32-bit field at an even offset (an address, a sequence number, a
/// timestamp): both halves at once. Same edge-case behaviour as [`update_u16`].
#[inline]
pub fn update_u32(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old >> 16) as u16)
        + u32::from(!(old as u16))
        + (new >> 16)
        + (new & 0xFFFF);
    !fold(sum)
}

/// RFC 1624 update for a byte range of any length at any offset of the covered data: the range
/// that held `old` now holds `new` (same length), starting `offset` bytes into the data the
/// checksum covers (only its parity matters). Used for TCP options, which need not be aligned.
///
/// # Panics
/// Debug builds assert `old.len() == new.len()`.
#[inline]
pub fn update_bytes(check: u16, offset: usize, old: &[u8], new: &[u8]) -> u16 {
    debug_assert_eq!(old.len(), new.len());
    let mut old_sum = fold(sum(old, 0));
    let mut new_sum = fold(sum(new, 0));
    if offset % 2 == 1 {
        // A byte at an odd offset is the low byte of its word: swapping the range's sum moves
        // every byte to the other half, which is exactly the shifted contribution.
        old_sum = old_sum.swap_bytes();
        new_sum = new_sum.swap_bytes();
    }
    update_u16(check, old_sum, new_sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 1071 §4.1, transcribed as plainly as possible.
    fn reference_sum(data: &[u8]) -> u16 {
        let mut sum: u64 = 0;
        let mut i = 0;
        while i + 1 < data.len() {
            sum += u64::from(u16::from_be_bytes([data[i], data[i + 1]]));
            i += 2;
        }
        if i < data.len() {
            sum += u64::from(data[i]) << 8;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        sum as u16
    }

    fn reference_checksum(data: &[u8]) -> u16 {
        !reference_sum(data)
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn real_ipv4_header() {
        // IPv4 header of a Linux SYN captured on a veth (10.76.0.1 -> 10.76.0.2), checksum d1aa.
        let header = [
            0x45, 0x00, 0x00, 0x3c, 0x54, 0x77, 0x40, 0x00, 0x40, 0x06, 0xd1, 0xaa, 0x0a, 0x4c,
            0x00, 0x01, 0x0a, 0x4c, 0x00, 0x02,
        ];
        assert_eq!(fold(sum(&header, 0)), 0xFFFF);
        let mut zeroed = header;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(checksum(&zeroed), 0xd1aa);
    }

    #[test]
    fn odd_lengths_and_empty() {
        assert_eq!(sum(&[], 0), 0);
        assert_eq!(fold(sum(&[0xab], 0)), 0xab00);
        assert_eq!(fold(sum(&[0xff; 9], 0)), reference_sum(&[0xff; 9]));
        assert_eq!(fold(sum(&[0xff, 0xff], 0)), 0xFFFF);
        assert_eq!(fold(sum(&[0; 17], 0)), 0);
    }

    #[test]
    fn pseudo_header_matches_bytes() {
        let src = Ipv4Addr::new(10, 76, 0, 1);
        let dst = Ipv4Addr::new(10, 76, 0, 2);
        let bytes = [10, 76, 0, 1, 10, 76, 0, 2, 0, 6, 0, 40];
        assert_eq!(fold(pseudo_header(src, dst, 6, 40)), reference_sum(&bytes));
    }

    #[test]
    fn new_checksum_zero_not_ffff() {
        // Data whose recomputed checksum is 0x0000: the words sum to 0xFFFF.
        // Start with 0x1234 + 0xEDCA = 0xFFFE; change the 0x0001 word to 0x0002.
        let mut data = [0x12, 0x34, 0xed, 0xca, 0x00, 0x00];
        let before = checksum(&data);
        data[5] = 0x01;
        let after_full = checksum(&data);
        assert_eq!(after_full, 0x0000);
        assert_eq!(update_u16(before, 0x0000, 0x0001), 0x0000);
        // And back again, starting from the 0x0000 checksum.
        assert_eq!(update_u16(0x0000, 0x0001, 0x0000), before);
    }

    #[test]
    fn old_checksum_ffff() {
        // All-zero data has checksum 0xFFFF; setting a word updates it correctly.
        let mut data = [0u8; 8];
        let before = checksum(&data);
        assert_eq!(before, 0xFFFF);
        data[2] = 0x12;
        data[3] = 0x34;
        assert_eq!(update_u16(before, 0, 0x1234), checksum(&data));
        assert_eq!(update_u32(before, 0, 0x0000_1234), checksum(&data));
    }

    /// Patches `new` into `buf[at..]`, returning the incrementally updated checksum computed by
    /// the function under test.
    fn patch_u16(buf: &mut [u8], at: usize, new: u16) -> u16 {
        let check = checksum(buf);
        let old = u16::from_be_bytes([buf[at], buf[at + 1]]);
        buf[at..at + 2].copy_from_slice(&new.to_be_bytes());
        update_u16(check, old, new)
    }

    fn patch_u32(buf: &mut [u8], at: usize, new: u32) -> u16 {
        let check = checksum(buf);
        let old = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        buf[at..at + 4].copy_from_slice(&new.to_be_bytes());
        update_u32(check, old, new)
    }

    fn all_zero(buf: &[u8]) -> bool {
        buf.iter().all(|&b| b == 0)
    }

    proptest! {
        #[test]
        fn fast_sum_equals_reference(data in proptest::collection::vec(any::<u8>(), 0..3000),
                                     split in 0usize..3000) {
            prop_assert_eq!(fold(sum(&data, 0)), reference_sum(&data));
            prop_assert_eq!(checksum(&data), reference_checksum(&data));
            // Chaining over an even split equals one sum.
            let split = (split.min(data.len())) & !1;
            let chained = sum(&data[split..], sum(&data[..split], 0));
            prop_assert_eq!(fold(chained), reference_sum(&data));
        }

        #[test]
        fn sum_with_initial(data in proptest::collection::vec(any::<u8>(), 0..200),
                            initial in any::<u32>()) {
            let mut expected: u64 = u64::from(reference_sum(&data)) + u64::from(initial);
            while expected >> 16 != 0 {
                expected = (expected & 0xFFFF) + (expected >> 16);
            }
            prop_assert_eq!(fold(sum(&data, initial)), expected as u16);
        }

        #[test]
        fn update_u16_equals_recompute(mut buf in proptest::collection::vec(any::<u8>(), 2..400),
                                       at in any::<usize>(), new in any::<u16>()) {
            let at = (at % (buf.len() / 2)) * 2;
            let incremental = patch_u16(&mut buf, at, new);
            if !all_zero(&buf) {
                prop_assert_eq!(incremental, checksum(&buf));
            }
        }

        #[test]
        fn update_u32_equals_recompute(mut buf in proptest::collection::vec(any::<u8>(), 4..400),
                                       at in any::<usize>(), new in any::<u32>()) {
            let at = (at % ((buf.len() - 2) / 2)) * 2;
            let incremental = patch_u32(&mut buf, at, new);
            if !all_zero(&buf) {
                prop_assert_eq!(incremental, checksum(&buf));
            }
        }

        #[test]
        fn update_bytes_any_alignment(mut buf in proptest::collection::vec(any::<u8>(), 1..300),
                                      at in any::<usize>(), len in 1usize..12,
                                      fill in proptest::collection::vec(any::<u8>(), 12)) {
            let at = at % buf.len();
            let len = len.min(buf.len() - at);
            let check = checksum(&buf);
            let old = buf[at..at + len].to_vec();
            buf[at..at + len].copy_from_slice(&fill[..len]);
            let incremental = update_bytes(check, at, &old, &fill[..len]);
            if !all_zero(&buf) {
                prop_assert_eq!(incremental, checksum(&buf));
            }
        }

        /// The edge cases: buffers forced to have checksum 0x0000 (their words sum to 0xFFFF)
        /// before or after the patch.
        #[test]
        fn update_with_zero_checksum(mut buf in proptest::collection::vec(any::<u8>(), 8..200),
                                     at in any::<usize>(), new in any::<u32>()) {
            let len = buf.len() & !1;
            buf.truncate(len);
            // Make the checksum 0x0000 by choosing the last word: sum(rest) + w == 0xFFFF.
            buf[len - 2] = 0;
            buf[len - 1] = 0;
            let rest = fold(sum(&buf, 0));
            let w = if rest == 0xFFFF { 0xFFFF } else { 0xFFFF - rest };
            buf[len - 2..].copy_from_slice(&w.to_be_bytes());
            if !all_zero(&buf) {
                prop_assert_eq!(checksum(&buf), 0x0000);
            }
            let at = (at % ((len - 2) / 2)) * 2;
            let incremental = patch_u32(&mut buf, at, new);
            if !all_zero(&buf) {
                prop_assert_eq!(incremental, checksum(&buf));
            }
            // Now patch the last word so that the *new* checksum is 0x0000.
            let check = checksum(&buf);
            let old = u16::from_be_bytes([buf[len - 2], buf[len - 1]]);
            buf[len - 2] = 0;
            buf[len - 1] = 0;
            let rest = fold(sum(&buf, 0));
            let w = if rest == 0xFFFF { 0xFFFF } else { 0xFFFF - rest };
            buf[len - 2..].copy_from_slice(&w.to_be_bytes());
            let incremental = update_u16(check, old, w);
            if !all_zero(&buf) {
                prop_assert_eq!(checksum(&buf), 0x0000);
                prop_assert_eq!(incremental, 0x0000);
            }
        }
    }
}
