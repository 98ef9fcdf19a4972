//! tcpcopy's ingress (pipelines/src/tcpcopy/ingress.rs): whole captured frames through
//! `Ingress::process_all` — link header, IPv4, TCP and options parsed with the checked views,
//! `-x` match, `-r`/`-g` sampling, `-H`, `-c`, `-n` copies with their ports, `-M` splitting.
//!
//! Input: an options byte (bits 0-1: copies - 1; bit 2: `-r 50`; bit 3: `-g`; bit 4: `-H`;
//! bit 5: `-c`; bit 6: raw IP link; bit 7: `-M 576`), then frames: a u16 length, the bytes,
//! and one byte the wire length exceeds the capture by (snap-length cuts).
//!
//! Invariants: each frame lands in exactly one counter; every packet made is valid IPv4/TCP,
//! addressed as its key says, fits the MTU when split, and keeps valid checksums valid.
#![no_main]

use engine::port::LinkType;
use engine::session::ClientSegment;
use engine::wire::{Ipv4Packet, TcpPacket};
use libfuzzer_sys::fuzz_target;
use pipelines::tcpcopy::copies::{PortPlan, Sampling};
use pipelines::tcpcopy::ingress::{Ingress, IngressOptions, IngressStats};
use pipelines::tcpcopy::transform::{parse_transfers, ClientAddrs};
use std::net::Ipv4Addr;
use std::time::Duration;
use tcpcopy_fuzz::Input;

fn drops(s: &IngressStats) -> u64 {
    s.not_ipv4
        + s.not_tcp
        + s.truncated
        + s.bad_version
        + s.bad_ihl
        + s.bad_total_len
        + s.bad_data_offset
        + s.bad_options
        + s.fragments
        + s.cut_short
        + s.too_big
        + s.no_transfer
        + s.sampled_out
}

/// Whether the IPv4 and TCP checksums of the captured packet verify. Ingress patches them
/// incrementally: a packet captured with a bad checksum goes out with a bad one (the online
/// server's kernel dropped it too), so only good ones must stay good.
fn checksums_ok(ip_bytes: &[u8]) -> (bool, bool) {
    let Ok(ip) = Ipv4Packet::new_checked(ip_bytes) else {
        return (false, false);
    };
    let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
        return (ip.verify_checksum(), false);
    };
    (
        ip.verify_checksum(),
        tcp.verify_checksum(ip.src_addr(), ip.dst_addr()),
    )
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.byte();
    let transfers = parse_transfers("8099-10.77.0.30:8080,10.76.0.2:443-10.77.0.31:8443").unwrap();
    let clients =
        (flags & 0x20 != 0).then(|| ClientAddrs::parse("10.88.0.x,10.89.0.7", &transfers).unwrap());
    let sampling = match (flags & 0x04 != 0, flags & 0x08 != 0) {
        (_, true) => Sampling::ramp(),
        (true, false) => Sampling::percent(50).unwrap(),
        (false, false) => Sampling::all(),
    };
    let options = IngressOptions {
        plan: PortPlan::new(u16::from(flags & 3) + 1, 0, 1).unwrap(),
        sampling,
        localhost_as: (flags & 0x10 != 0).then_some(Ipv4Addr::new(10, 66, 0, 1)),
        mtu: if flags & 0x80 != 0 { 576 } else { 1500 },
    };
    let mtu = usize::from(options.mtu);
    let link = if flags & 0x40 != 0 {
        LinkType::RawIp
    } else {
        LinkType::Ethernet
    };
    let mut ingress = Ingress::with_options(transfers, clients, options);
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let mut metas = Vec::new();
    let mut now = Duration::ZERO;
    let mut frames = 0u64;
    while !input.is_empty() {
        let frame = input.long_chunk();
        let wire_len = frame.len() + usize::from(input.byte());
        now += Duration::from_millis(700);
        metas.clear();
        ingress.process_all(frame, wire_len, link, now, &mut bufs, &mut metas);
        frames += 1;
        let stats = *ingress.stats();
        assert_eq!(stats.captured, frames);
        assert_eq!(stats.accepted + drops(&stats), frames, "{stats:?}");
        if metas.is_empty() {
            continue;
        }
        let ip_start = match link {
            LinkType::RawIp => 0,
            LinkType::Ethernet => engine::wire::EthernetFrame::new_checked(frame)
                .unwrap()
                .header_len(),
        };
        let (ip_ok, tcp_ok) = checksums_ok(&frame[ip_start..]);
        for (i, (key, seg)) in metas.iter().enumerate() {
            let packet = &bufs[i];
            let ip = Ipv4Packet::new_checked(&packet[..]).expect("ingress makes valid IPv4");
            assert_eq!(usize::from(ip.total_len()), packet.len());
            assert!(ip.verify_checksum() || !ip_ok);
            assert_eq!(
                (ip.src_addr(), ip.dst_addr()),
                (key.client_ip, key.target_ip)
            );
            let tcp = TcpPacket::new_checked(ip.payload()).expect("ingress makes valid TCP");
            assert_eq!(
                (tcp.src_port(), tcp.dst_port()),
                (key.client_port, key.target_port)
            );
            assert!(tcp.verify_checksum(ip.src_addr(), ip.dst_addr()) || !tcp_ok);
            let parsed = ClientSegment::parse(packet).expect("the segment parses");
            assert_eq!(parsed.seq, seg.seq);
            assert_eq!(parsed.payload_len, seg.payload_len);
            let headers = ip.header_len() + tcp.header_len();
            // Longer than -M only when the headers leave no room to split.
            assert!(packet.len() <= mtu || headers + 8 > mtu || seg.payload_len == 0);
        }
    }
});
