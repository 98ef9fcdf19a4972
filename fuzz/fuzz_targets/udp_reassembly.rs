//! udpcopy's IPv4 fragment reassembly and replay (pipelines/src/udpcopy.rs) fed a sequence of
//! hostile fragments: `Reassembler::push` with time passing and `expire`, the same fragments
//! through the whole `UdpReplay::process` (parse, checksum, reassembly, rewrite,
//! re-fragmentation to the MTU), and `fragment` on each reassembled datagram.
//!
//! Input: a sequence of operations, each an op byte then its bytes:
//! * `op % 4 == 0`: a raw packet (u16 length, bytes);
//! * `op % 4 == 1 | 2`: a well-formed fragment built by the harness: ident (1 byte), IHL words
//!   (1 byte, 5..=15), offset in 8-byte units (u16), MF (1 byte), payload (op 1: u16 length and
//!   the bytes; op 2: a u16 length of filler, so large datagrams cost no input), checksum
//!   filled, so the fuzzer works on offsets and lengths rather than on checksums;
//! * `op % 4 == 3`: time passes by `op / 4` × 10 ms, then `expire`.
//!
//! Invariants: every datagram handed out is a valid, unfragmented IPv4 packet whose Total Length
//! is its length; the table never holds more datagrams or bytes than its bounds.
#![no_main]

use engine::port::LinkType;
use engine::wire::ipv4::PROTO_UDP;
use engine::wire::Ipv4Packet;
use libfuzzer_sys::fuzz_target;
use pipelines::tcpcopy::transform::parse_transfers;
use pipelines::udpcopy::{fragment, Reassembler, ReassemblyConfig, ReplayConfig, UdpReplay};
use std::net::Ipv4Addr;
use std::time::Duration;
use tcpcopy_fuzz::Input;

const BOUNDS: ReassemblyConfig = ReassemblyConfig {
    max_datagrams: 4,
    max_fragments: 16,
    max_bytes: 70_000,
    timeout: Duration::from_millis(50),
};

fn built_fragment(input: &mut Input<'_>, filler: bool) -> Vec<u8> {
    let ident = u16::from(input.byte());
    let ihl_words = usize::from(input.byte() % 11 + 5);
    let offset = (input.u16() & 0x1fff) << 3;
    let more = input.byte() & 1 != 0;
    let filled;
    let payload = if filler {
        filled = vec![0xa5; usize::from(input.u16())];
        &filled[..]
    } else {
        input.long_chunk()
    };
    let header_len = ihl_words * 4;
    let total = (header_len + payload.len()).min(usize::from(u16::MAX));
    let mut buf = vec![0u8; total];
    let mut ip = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.set_version_ihl(header_len);
    ip.set_total_len(total as u16);
    ip.set_ident(ident);
    ip.set_flags_frag(false, more, offset);
    ip.set_ttl(64);
    ip.set_protocol(PROTO_UDP);
    ip.set_src_addr(Ipv4Addr::new(10, 77, 0, 10));
    ip.set_dst_addr(Ipv4Addr::new(10, 77, 0, 20));
    let room = total - header_len;
    ip.payload_mut().copy_from_slice(&payload[..room]);
    ip.fill_checksum();
    buf
}

fn check_whole(whole: &[u8]) {
    let ip = Ipv4Packet::new_checked(whole).expect("a reassembled datagram is valid IPv4");
    assert_eq!(
        usize::from(ip.total_len()),
        whole.len(),
        "Total Length is the length"
    );
    assert!(!ip.is_fragment());
    assert!(ip.verify_checksum());
    let mut scratch = Vec::new();
    let mut pieces = 0;
    let made = fragment(whole, 576, 7, &mut scratch, &mut |f| {
        pieces += 1;
        let f = Ipv4Packet::new_checked(f).expect("a fragment is valid IPv4");
        assert!(usize::from(f.total_len()) <= 576 || pieces == 1);
    })
    .expect("a valid datagram fragments");
    assert_eq!(made, pieces);
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut reassembler = Reassembler::new(BOUNDS);
    let mut replay = UdpReplay::new(ReplayConfig {
        transfers: parse_transfers("10.77.0.20:5353-10.77.0.30:53").unwrap(),
        mtu: 576,
        reassembly: BOUNDS,
        ..ReplayConfig::default()
    });
    let mut now = Duration::ZERO;
    while !input.is_empty() {
        let op = input.byte();
        let packet = match op % 4 {
            0 => input.long_chunk().to_vec(),
            1 => built_fragment(&mut input, false),
            2 => built_fragment(&mut input, true),
            _ => {
                now += Duration::from_millis(10) * u32::from(op / 4);
                reassembler.expire(now);
                replay.expire(now);
                continue;
            }
        };
        if let Some(whole) = reassembler.push(&packet, now) {
            check_whole(whole);
        }
        assert!(reassembler.len() <= BOUNDS.max_datagrams);
        assert!(reassembler.bytes() <= BOUNDS.max_bytes);
        replay.process(&packet, packet.len(), LinkType::RawIp, now, &mut |out| {
            let ip = Ipv4Packet::new_checked(out).expect("the replay sends valid IPv4");
            assert_eq!(usize::from(ip.total_len()), out.len());
            assert!(out.len() <= 576);
        });
    }
    let stats = replay.stats();
    let _ = (stats.line(), stats.malformed());
});
