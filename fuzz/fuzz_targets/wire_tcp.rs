//! `TcpPacket::new_checked` on any bytes (the IPv4 payload): once it accepted the segment no
//! getter, option walk or in-place rewrite panics; refusals are the TCP errors; the incremental
//! rewrites keep a filled checksum valid; and `TcpRepr` survives emit → parse.
#![no_main]

use engine::wire::tcp::{emit_ipv4_tcp, TcpOption, TcpOptions};
use engine::wire::{Ipv4Packet, SeqNum, TcpPacket, TcpRepr, WireError};
use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 76, 0, 2);

fuzz_target!(|data: &[u8]| {
    // The option walker alone, on raw option bytes: ends, never loops forever.
    let walked = TcpOptions::new(data).take(data.len() + 1).count();
    assert!(walked <= data.len());

    let tcp = match TcpPacket::new_checked(data) {
        Ok(tcp) => tcp,
        Err(e) => {
            assert!(matches!(
                e,
                WireError::Truncated | WireError::BadDataOffset | WireError::BadOption
            ));
            return;
        }
    };
    let _ = (
        tcp.src_port(),
        tcp.dst_port(),
        tcp.seq_number(),
        tcp.ack_number(),
    );
    let _ = (
        tcp.flags(),
        tcp.window_len(),
        tcp.checksum(),
        tcp.urgent_at(),
    );
    let _ = (tcp.segment_len(), tcp.verify_checksum(CLIENT, SERVER));
    let _ = (
        tcp.mss(),
        tcp.window_scale(),
        tcp.sack_permitted(),
        tcp.timestamps(),
    );
    let header_len = tcp.header_len();
    assert!((20..=60).contains(&header_len) && header_len <= data.len());
    assert_eq!(tcp.options().len(), header_len - 20);
    assert_eq!(tcp.payload_len(), data.len() - header_len);
    // Accepted options parse to the end with no error.
    for option in tcp.options_iter() {
        let option = option.expect("check_len accepted the options");
        if let TcpOption::Sack(_) = option {
            assert!(option.sack_blocks().count() <= 4);
        }
    }
    if let Some(at) = tcp.timestamps_offset() {
        assert!(at + 8 <= header_len);
    }
    let repr = TcpRepr::parse(&tcp);
    assert_eq!(repr.payload_len, tcp.payload_len());

    // The validated form, emitted and parsed again, is the same.
    let payload = tcp.payload();
    if payload.len() > 65_535 - 80 {
        return;
    }
    let mut out = Vec::new();
    emit_ipv4_tcp(&mut out, CLIENT, SERVER, 7, 64, &repr, payload);
    let ip = Ipv4Packet::new_checked(&out[..]).expect("emitted IPv4");
    assert!(ip.verify_checksum());
    let again = TcpPacket::new_checked(ip.payload()).expect("emitted TCP");
    assert!(again.verify_checksum(CLIENT, SERVER));
    assert_eq!(TcpRepr::parse(&again), repr);

    // In-place rewrites on a copy: a filled checksum stays valid through every patch.
    let mut copy = data.to_vec();
    let mut tcp = TcpPacket::new_checked(&mut copy[..]).unwrap();
    let had_ts = tcp.set_timestamps(1, 2);
    tcp.fill_checksum(CLIENT, SERVER);
    assert!(tcp.verify_checksum(CLIENT, SERVER));
    tcp.rewrite_seq_number(SeqNum(0xdead_beef));
    tcp.rewrite_ack_number(SeqNum(0x0102_0304));
    tcp.rewrite_src_port(40_000);
    tcp.rewrite_dst_port(8080);
    tcp.rewrite_window(0xfff0);
    assert_eq!(tcp.rewrite_timestamps(0x1111_2222, 0x3333_4444), had_ts);
    tcp.strip_sack_blocks();
    assert!(tcp.verify_checksum(CLIENT, SERVER));
    if had_ts {
        assert_eq!(tcp.timestamps(), Some((0x1111_2222, 0x3333_4444)));
    }
    let _ = (tcp.options_mut().len(), tcp.payload_mut().len());
});
