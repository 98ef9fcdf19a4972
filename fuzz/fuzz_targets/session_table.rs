//! The session engine (engine/src/session) fed hostile traffic the way a tcpcopy worker feeds
//! it: captured frames through `Ingress::process` into `SessionTable::on_client_packet`, the
//! target's replies (decoded records, or replies aimed at a live session with fuzzed numbers)
//! into `on_response`, and timers run as time passes.
//!
//! Input: operations, each an op byte then its bytes:
//! * `op % 4 == 0`: a captured frame (u16 length, bytes), its checksums filled by the harness
//!   unless op bit 2 is set;
//! * `op % 4 == 1`: a reply to the session the table last sent on (index byte picks among the
//!   last few): seq (u32), ack delta (i8 around the next byte it expects), flags, window (u16),
//!   payload length (u16), a timestamps/window-scale byte;
//! * `op % 4 == 2`: a raw 64-byte reply record through `ResponseHeader::parse`;
//! * `op % 4 == 3`: time passes by `op / 4` × 37 ms; timers run.
//!
//! Invariants: every packet sent is valid IPv4/TCP, with both checksums right unless a frame
//! with a bad one was relayed; the table stays within its bounds.
#![no_main]

use engine::control::ResponseHeader;
use engine::flow::FlowKey;
use engine::port::LinkType;
use engine::session::{Output, Response, SessionConfig, SessionTable};
use engine::wire::{EthernetFrame, Ipv4Packet, SeqNum, TcpFlags, TcpPacket};
use libfuzzer_sys::fuzz_target;
use pipelines::tcpcopy::ingress::Ingress;
use pipelines::tcpcopy::to_response;
use pipelines::tcpcopy::transform::parse_transfers;
use std::time::Duration;
use tcpcopy_fuzz::Input;

const MAX_SESSIONS: usize = 16;

#[derive(Default)]
struct Sent {
    /// The last few sessions sent on, with the next sequence number they sent.
    recent: Vec<(FlowKey, SeqNum)>,
    packets: u64,
    /// A frame with a bad checksum was captured: relayed packets may carry it (the engine
    /// patches checksums incrementally, as the C tool forwards what it captured).
    relayed_bad: bool,
}

impl Output for Sent {
    fn transmit(&mut self, packet: &[u8]) {
        let ip = Ipv4Packet::new_checked(packet).expect("the engine sends valid IPv4");
        assert_eq!(usize::from(ip.total_len()), packet.len());
        let tcp = TcpPacket::new_checked(ip.payload()).expect("the engine sends valid TCP");
        if !self.relayed_bad {
            assert!(ip.verify_checksum());
            assert!(tcp.verify_checksum(ip.src_addr(), ip.dst_addr()));
        }
        let key = FlowKey {
            client_ip: ip.src_addr(),
            client_port: tcp.src_port(),
            target_ip: ip.dst_addr(),
            target_port: tcp.dst_port(),
        };
        let next = tcp.seq_number().add(tcp.segment_len() as u32);
        self.recent.retain(|(k, _)| *k != key);
        self.recent.push((key, next));
        if self.recent.len() > 8 {
            self.recent.remove(0);
        }
        self.packets += 1;
    }
    fn register(&mut self, _key: FlowKey) {}
    fn unregister(&mut self, _key: FlowKey) {}
}

/// Fills the IPv4 and TCP checksums of an Ethernet frame, when it holds such a packet.
fn fill_checksums(frame: &mut [u8]) {
    let Ok(eth) = EthernetFrame::new_checked(&mut frame[..]) else {
        return;
    };
    let start = eth.header_len();
    let Ok(mut ip) = Ipv4Packet::new_checked(&mut frame[start..]) else {
        return;
    };
    ip.fill_checksum();
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    if let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) {
        tcp.fill_checksum(src, dst);
    }
}

/// Whether both checksums of an IPv4/TCP packet verify.
fn checksums_ok(packet: &[u8]) -> bool {
    let Ok(ip) = Ipv4Packet::new_checked(packet) else {
        return false;
    };
    let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
        return false;
    };
    ip.verify_checksum() && tcp.verify_checksum(ip.src_addr(), ip.dst_addr())
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let transfers = parse_transfers("8099-10.77.0.30:8080").unwrap();
    let mut ingress = Ingress::new(transfers, None);
    let mut table = SessionTable::new(SessionConfig {
        max_sessions: MAX_SESSIONS,
        pool_segments: 64,
        pool_small_segments: 64,
        max_queued_segments: 32,
        max_queued_bytes: 32 << 10,
        ..SessionConfig::default()
    });
    let mut out = Sent::default();
    let mut packet = Vec::new();
    let mut now = Duration::from_secs(1);
    while !input.is_empty() {
        let op = input.byte();
        match op % 4 {
            0 => {
                let mut frame = input.long_chunk().to_vec();
                // Op bit 2 keeps the frame's checksums as they are; otherwise they are filled,
                // so most runs check every packet the engine sends.
                if op & 4 == 0 {
                    fill_checksums(&mut frame);
                }
                if let Some((key, seg)) =
                    ingress.process(&frame, frame.len(), LinkType::Ethernet, &mut packet)
                {
                    out.relayed_bad |= !checksums_ok(&packet);
                    table.on_client_packet(key, &packet, &seg, now, &mut out);
                }
            }
            1 => {
                let pick = usize::from(input.byte());
                let seq = input.u32();
                let delta = input.byte() as i8;
                let flags = TcpFlags(input.byte());
                let window = input.u16();
                let payload_len = u32::from(input.u16());
                let extra = input.byte();
                let Some(&(key, next)) = out.recent.get(pick % out.recent.len().max(1)) else {
                    continue;
                };
                let response = Response {
                    key,
                    seq: SeqNum(seq),
                    ack: SeqNum(next.0.wrapping_add(delta as i32 as u32)),
                    flags,
                    window,
                    payload_len,
                    timestamps: (extra & 1 != 0).then_some((seq ^ 0x5555, 7)),
                    window_scale: (extra & 2 != 0).then_some(extra >> 2),
                };
                table.on_response(&response, now, &mut out);
            }
            2 => {
                let mut record = input.take(64).to_vec();
                record.resize(64, 0);
                if let Ok(h) = ResponseHeader::parse(&record) {
                    table.on_response(&to_response(&h), now, &mut out);
                }
            }
            _ => {
                now += Duration::from_millis(37) * u32::from(op / 4);
                table.run_timers(now, 64, &mut out);
            }
        }
        assert!(table.len() <= MAX_SESSIONS);
        assert!(table.active() <= table.len());
        let _ = table.next_deadline();
    }
    now += Duration::from_secs(3600);
    table.run_timers(now, usize::MAX, &mut out);
    table.shutdown(now, &mut out);
    let _ = (table.stats(), table.memory());
});
