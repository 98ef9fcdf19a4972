//! The ingress stages of tcpcopy: parse a captured frame, keep what a `-x` transfer selects,
//! rewrite it to the target (and the `-c` client address), and hand the session engine the
//! target-facing key and the parsed segment. Malformed frames are counted by reason and dropped.

use super::copies::{PortPlan, Sampling};
use super::transform::{match_transfer, ClientAddrs, Transfer};
use engine::flow::FlowKey;
use engine::session::ClientSegment;
use engine::wire::ethernet::ETHERTYPE_IPV4;
use engine::wire::ipv4::PROTO_TCP;
use engine::wire::tcp::resegment;
use engine::wire::{EthernetFrame, Ipv4Packet, SeqNum, TcpFlags, TcpPacket, WireError};
use std::net::Ipv4Addr;
use std::time::Duration;

/// What ingress counted. Every frame lands in exactly one of `accepted` or a drop reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngressStats {
    /// Frames examined.
    pub captured: u64,
    /// Frames accepted and handed to the session engine.
    pub accepted: u64,
    /// Accepted frames carrying payload.
    pub accepted_data: u64,
    /// Not IPv4 (ARP, IPv6, ...).
    pub not_ipv4: u64,
    /// IPv4 but not TCP.
    pub not_tcp: u64,
    /// Frames shorter than their link or IP header.
    pub truncated: u64,
    /// IPv4 version field not 4.
    pub bad_version: u64,
    /// IPv4 header length (IHL) below 5 or beyond the frame.
    pub bad_ihl: u64,
    /// IPv4 total length below the header or beyond the frame.
    pub bad_total_len: u64,
    /// TCP data offset below 5 or beyond the segment.
    pub bad_data_offset: u64,
    /// Malformed TCP options.
    pub bad_options: u64,
    /// IP fragments (not reassembled).
    pub fragments: u64,
    /// Captured with fewer bytes than the packet had (snap length).
    pub cut_short: u64,
    /// Packets larger than the transmit buffer.
    pub too_big: u64,
    /// Well-formed but matching no `-x` transfer.
    pub no_transfer: u64,
    /// Accepted by `-x` but not in the `-r`/`-g` sample.
    pub sampled_out: u64,
    /// Extra packets made for `-n` copies.
    pub copies_made: u64,
    /// Captured packets longer than `-M` (merged by GRO/LRO), split into MTU-sized segments.
    pub split_packets: u64,
    /// Segments those were split into.
    pub split_pieces: u64,
    /// Client addresses 127.0.0.1 replaced by `-H`.
    pub localhost_rewritten: u64,
}

impl IngressStats {
    /// Adds `other`'s counts to these (to sum over workers).
    pub fn merge(&mut self, other: &IngressStats) {
        let IngressStats {
            captured,
            accepted,
            accepted_data,
            not_ipv4,
            not_tcp,
            truncated,
            bad_version,
            bad_ihl,
            bad_total_len,
            bad_data_offset,
            bad_options,
            fragments,
            cut_short,
            too_big,
            no_transfer,
            sampled_out,
            copies_made,
            split_packets,
            split_pieces,
            localhost_rewritten,
        } = *other;
        self.captured += captured;
        self.accepted += accepted;
        self.accepted_data += accepted_data;
        self.not_ipv4 += not_ipv4;
        self.not_tcp += not_tcp;
        self.truncated += truncated;
        self.bad_version += bad_version;
        self.bad_ihl += bad_ihl;
        self.bad_total_len += bad_total_len;
        self.bad_data_offset += bad_data_offset;
        self.bad_options += bad_options;
        self.fragments += fragments;
        self.cut_short += cut_short;
        self.too_big += too_big;
        self.no_transfer += no_transfer;
        self.sampled_out += sampled_out;
        self.copies_made += copies_made;
        self.split_packets += split_packets;
        self.split_pieces += split_pieces;
        self.localhost_rewritten += localhost_rewritten;
    }

    /// Frames dropped as malformed.
    pub fn malformed(&self) -> u64 {
        self.truncated
            + self.bad_version
            + self.bad_ihl
            + self.bad_total_len
            + self.bad_data_offset
            + self.bad_options
            + self.cut_short
    }

    fn count(&mut self, error: WireError) {
        match error {
            WireError::Truncated => self.truncated += 1,
            WireError::BadVersion => self.bad_version += 1,
            WireError::BadHeaderLen => self.bad_ihl += 1,
            WireError::BadTotalLen => self.bad_total_len += 1,
            WireError::BadDataOffset => self.bad_data_offset += 1,
            WireError::BadOption => self.bad_options += 1,
            WireError::BadUdpLen => self.not_tcp += 1,
        }
    }
}

/// Ingress settings beyond the transfers and `-c`.
#[derive(Debug, Clone, Copy)]
pub struct IngressOptions {
    /// `-n` copies and the `-f` instance shift.
    pub plan: PortPlan,
    /// `-r` / `-g`.
    pub sampling: Sampling,
    /// `-H`: the address that replaces a captured client address 127.0.0.1.
    pub localhost_as: Option<Ipv4Addr>,
    /// `-M`: longest IP packet sent to the target; longer captures are split (at least 576).
    pub mtu: u16,
}

impl Default for IngressOptions {
    fn default() -> Self {
        IngressOptions {
            plan: PortPlan::new(1, 0, 1).expect("the identity plan"),
            sampling: Sampling::all(),
            localhost_as: None,
            mtu: 1500,
        }
    }
}

/// The ingress stages.
#[derive(Debug)]
pub struct Ingress {
    transfers: Vec<Transfer>,
    clients: Option<ClientAddrs>,
    options: IngressOptions,
    /// When the first packet was accepted (for `-g`).
    first_at: Option<Duration>,
    stats: IngressStats,
}

/// How the captured bytes start (the port's [`engine::port::RxPort::link_type`]).
pub use engine::port::LinkType;

/// The captured client before `-c` and copies.
#[derive(Debug, Clone, Copy)]
struct Captured {
    client_ip: Ipv4Addr,
    client_port: u16,
}

impl Ingress {
    /// Ingress for these transfers and optional `-c` addresses.
    pub fn new(transfers: Vec<Transfer>, clients: Option<ClientAddrs>) -> Ingress {
        Ingress::with_options(transfers, clients, IngressOptions::default())
    }

    /// Ingress with copies, sampling, `-H` and `-M`.
    pub fn with_options(
        transfers: Vec<Transfer>,
        clients: Option<ClientAddrs>,
        options: IngressOptions,
    ) -> Ingress {
        Ingress {
            transfers,
            clients,
            options: IngressOptions {
                mtu: options.mtu.max(MIN_MTU),
                ..options
            },
            first_at: None,
            stats: IngressStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &IngressStats {
        &self.stats
    }

    /// Processes one captured frame into one target-facing packet (no copies, no split: the
    /// settings of [`Ingress::new`]). On success `out` holds the IPv4 packet rewritten for the
    /// target (checksums patched) and the target-facing key and parsed segment are returned.
    pub fn process(
        &mut self,
        frame: &[u8],
        wire_len: usize,
        link: LinkType,
        out: &mut Vec<u8>,
    ) -> Option<(FlowKey, ClientSegment)> {
        self.first(frame, wire_len, link, Duration::ZERO, out)
            .map(|(key, seg, _)| (key, seg))
    }

    /// Processes one captured frame into every packet it makes for the target: each `-n`
    /// copy, each split into segments of at most `-M` bytes. Packet `i` made is written to
    /// `bufs[metas.len()]` (buffers are added as needed and keep their allocations) and its key
    /// and segment are pushed onto `metas`. `now` is the caller's clock (for `-g`).
    pub fn process_all(
        &mut self,
        frame: &[u8],
        wire_len: usize,
        link: LinkType,
        now: Duration,
        bufs: &mut Vec<Vec<u8>>,
        metas: &mut Vec<(FlowKey, ClientSegment)>,
    ) {
        let first = metas.len();
        if bufs.len() <= first {
            bufs.push(Vec::with_capacity(2048));
        }
        let Some((key, seg, captured)) = self.first(frame, wire_len, link, now, &mut bufs[first])
        else {
            return;
        };
        metas.push((key, seg));
        for copy in 1..self.options.plan.copies() {
            let at = metas.len();
            if bufs.len() <= at {
                bufs.push(Vec::with_capacity(2048));
            }
            let (head, tail) = bufs.split_at_mut(at);
            let out = &mut tail[0];
            out.clear();
            out.extend_from_slice(&head[first]);
            let client_ip = match &self.clients {
                Some(c) => c.map_copy(captured.client_ip, copy),
                None => key.client_ip,
            };
            let client_port = self.options.plan.port(captured.client_port, copy);
            let mut ip = Ipv4Packet::new_unchecked(&mut out[..]);
            let (old_src, new_src) = ip.rewrite_src_addr(client_ip);
            let mut tcp = TcpPacket::new_unchecked(ip.payload_mut());
            if old_src != new_src {
                tcp.adjust_checksum_for_addr(old_src, new_src);
            }
            tcp.rewrite_src_port(client_port);
            metas.push((
                FlowKey {
                    client_ip,
                    client_port,
                    ..key
                },
                seg,
            ));
            self.stats.copies_made += 1;
        }
        let mtu = usize::from(self.options.mtu);
        if bufs[first].len() > mtu {
            self.split_all(first, bufs, metas);
        }
    }

    /// Splits every packet made from one frame (`metas[first..]`, all the same length) into
    /// segments of at most `-M` bytes, in place of the originals and in order.
    fn split_all(
        &mut self,
        first: usize,
        bufs: &mut Vec<Vec<u8>>,
        metas: &mut Vec<(FlowKey, ClientSegment)>,
    ) {
        let mtu = usize::from(self.options.mtu);
        let made: Vec<(FlowKey, ClientSegment)> = metas.drain(first..).collect();
        let originals: Vec<Vec<u8>> = (0..made.len())
            .map(|i| std::mem::take(&mut bufs[first + i]))
            .collect();
        for ((key, seg), packet) in made.into_iter().zip(originals) {
            // (A rare path, GRO-merged captures: the originals' buffers are simply dropped.)
            let pieces = split_segment(&packet, mtu, |piece_seq, piece_len, last, bytes| {
                let at = metas.len();
                if bufs.len() <= at {
                    bufs.push(Vec::with_capacity(2048));
                }
                let out = &mut bufs[at];
                out.clear();
                out.extend_from_slice(bytes);
                let mut flags = seg.flags;
                if !last {
                    flags = TcpFlags(flags.0 & !(TcpFlags::FIN.0 | TcpFlags::PSH.0));
                }
                metas.push((
                    key,
                    ClientSegment {
                        seq: piece_seq,
                        flags,
                        payload_len: piece_len as u32,
                        ..seg
                    },
                ));
            });
            self.stats.split_packets += 1;
            self.stats.split_pieces += pieces as u64;
        }
    }

    /// Parsing, `-x`, sampling, `-H`, `-c` and the port of copy 0 (`-f`): the first packet.
    fn first(
        &mut self,
        frame: &[u8],
        wire_len: usize,
        link: LinkType,
        now: Duration,
        out: &mut Vec<u8>,
    ) -> Option<(FlowKey, ClientSegment, Captured)> {
        self.stats.captured += 1;
        let ip_bytes = match link {
            LinkType::RawIp => frame,
            LinkType::Ethernet => match EthernetFrame::new_checked(frame) {
                Ok(eth) if eth.ethertype() == ETHERTYPE_IPV4 => &frame[eth.header_len()..],
                Ok(_) => {
                    self.stats.not_ipv4 += 1;
                    return None;
                }
                Err(e) => {
                    self.stats.count(e);
                    return None;
                }
            },
        };
        let ip = match Ipv4Packet::new_checked(ip_bytes) {
            Ok(ip) => ip,
            Err(e) => {
                // A frame cut by the snap length is not malformed, just incomplete.
                if wire_len > frame.len() && e == WireError::BadTotalLen {
                    self.stats.cut_short += 1;
                } else {
                    self.stats.count(e);
                }
                return None;
            }
        };
        if ip.protocol() != PROTO_TCP {
            self.stats.not_tcp += 1;
            return None;
        }
        if ip.is_fragment() {
            self.stats.fragments += 1;
            return None;
        }
        let tcp = match TcpPacket::new_checked(ip.payload()) {
            Ok(tcp) => tcp,
            Err(e) => {
                self.stats.count(e);
                return None;
            }
        };
        let Some(transfer) = match_transfer(&self.transfers, ip.dst_addr(), tcp.dst_port()) else {
            self.stats.no_transfer += 1;
            return None;
        };
        let transfer = *transfer;
        let total = usize::from(ip.total_len());
        if total > engine::port::MAX_PACKET {
            self.stats.too_big += 1;
            return None;
        }
        let mut captured = Captured {
            client_ip: ip.src_addr(),
            client_port: tcp.src_port(),
        };
        if !self.options.sampling.is_all() {
            let first_at = *self.first_at.get_or_insert(now);
            let share = self
                .options
                .sampling
                .share_at(now.saturating_sub(first_at).as_secs());
            if !Sampling::keeps(share, captured.client_ip, captured.client_port) {
                self.stats.sampled_out += 1;
                return None;
            }
        }
        if let Some(replacement) = self.options.localhost_as {
            if captured.client_ip == Ipv4Addr::LOCALHOST && !transfer.target_ip.is_loopback() {
                captured.client_ip = replacement;
                self.stats.localhost_rewritten += 1;
            }
        }
        let client_ip = match &self.clients {
            Some(c) => c.map(captured.client_ip),
            None => captured.client_ip,
        };
        let client_port = self.options.plan.port(captured.client_port, 0);
        let key = FlowKey {
            client_ip,
            client_port,
            target_ip: transfer.target_ip,
            target_port: transfer.target_port,
        };
        out.clear();
        out.extend_from_slice(&ip_bytes[..total]);
        let mut ip = Ipv4Packet::new_unchecked(&mut out[..]);
        let (old_dst, new_dst) = ip.rewrite_dst_addr(transfer.target_ip);
        let (old_src, new_src) = if client_ip != ip.src_addr() {
            ip.rewrite_src_addr(client_ip)
        } else {
            (0, 0)
        };
        let mut tcp = TcpPacket::new_unchecked(ip.payload_mut());
        tcp.adjust_checksum_for_addr(old_dst, new_dst);
        if old_src != new_src {
            tcp.adjust_checksum_for_addr(old_src, new_src);
        }
        tcp.rewrite_dst_port(transfer.target_port);
        if client_port != captured.client_port {
            tcp.rewrite_src_port(client_port);
        }
        let seg = ClientSegment {
            seq: tcp.seq_number(),
            ack: tcp.ack_number(),
            flags: tcp.flags(),
            payload_len: tcp.payload_len() as u32,
            window: tcp.window_len(),
            timestamps: tcp.timestamps(),
            window_scale: tcp.window_scale(),
        };
        self.stats.accepted += 1;
        if seg.payload_len > 0 {
            self.stats.accepted_data += 1;
        }
        Some((key, seg, captured))
    }
}

/// Smallest `-M` (the IPv4 minimum MTU).
pub const MIN_MTU: u16 = 576;

/// Splits a TCP/IPv4 packet whose IP length exceeds `mtu` into segments of at most `mtu`
/// bytes: each piece repeats the IP and TCP headers (options included) with its own sequence
/// number, IP length, identification (`ident + i`) and checksums; FIN and PSH stay on the last
/// piece only. Calls `piece(seq, payload_len, last, bytes)` in order and returns the count. A
/// packet that fits (or whose headers leave no room) is passed through whole.
pub fn split_segment(
    packet: &[u8],
    mtu: usize,
    mut piece: impl FnMut(SeqNum, usize, bool, &[u8]),
) -> usize {
    let Ok(ip) = Ipv4Packet::new_checked(packet) else {
        return 0;
    };
    let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
        return 0;
    };
    let ip_hlen = ip.header_len();
    let tcp_hlen = tcp.header_len();
    let headers = ip_hlen + tcp_hlen;
    let payload = tcp.payload();
    let room = mtu.saturating_sub(headers);
    let seq = tcp.seq_number();
    if packet.len() <= mtu || room < 8 || payload.is_empty() {
        piece(seq, payload.len(), true, packet);
        return 1;
    }
    let (ident, flags) = (ip.ident(), tcp.flags());
    let mut buf = Vec::with_capacity(mtu);
    let mut count = 0;
    for (i, chunk) in payload.chunks(room).enumerate() {
        let last = (i + 1) * room >= payload.len();
        let piece_seq = seq.add((i * room) as u32);
        let piece_flags = if last {
            flags
        } else {
            TcpFlags(flags.0 & !(TcpFlags::FIN.0 | TcpFlags::PSH.0))
        };
        resegment(
            &packet[..headers],
            piece_seq,
            ident.wrapping_add(i as u16),
            piece_flags,
            chunk,
            &mut buf,
        );
        piece(piece_seq, chunk.len(), last, &buf);
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcpcopy::transform::parse_transfers;
    use engine::flow::port_shard;
    use engine::wire::tcp::{emit_ipv4_tcp, TcpRepr};

    fn frame(src: Ipv4Addr, sport: u16, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 0x14, 0x02, 0, 0, 0, 0, 0x0a, 0x08, 0x00];
        let repr = TcpRepr {
            src_port: sport,
            dst_port: 80,
            seq: SeqNum(1000),
            ack: SeqNum(5000),
            flags,
            window: 1000,
            timestamps: Some((7, 9)),
            payload_len: payload.len(),
            ..TcpRepr::default()
        };
        emit_ipv4_tcp(
            &mut f,
            src,
            Ipv4Addr::new(10, 77, 0, 20),
            1,
            64,
            &repr,
            payload,
        );
        f
    }

    fn check(packet: &[u8]) -> (Ipv4Addr, u16, u32, usize, TcpFlags) {
        let ip = Ipv4Packet::new_checked(packet).unwrap();
        assert!(ip.verify_checksum());
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(
            tcp.verify_checksum(ip.src_addr(), ip.dst_addr()),
            "TCP checksum"
        );
        assert_eq!(
            (ip.dst_addr(), tcp.dst_port()),
            (Ipv4Addr::new(10, 77, 0, 30), 8080)
        );
        (
            ip.src_addr(),
            tcp.src_port(),
            tcp.seq_number().0,
            tcp.payload_len(),
            tcp.flags(),
        )
    }

    fn ingress(options: IngressOptions, clients: Option<&str>) -> Ingress {
        let transfers = parse_transfers("80-10.77.0.30:8080").unwrap();
        let clients = clients.map(|c| ClientAddrs::parse(c, &transfers).unwrap());
        Ingress::with_options(transfers, clients, options)
    }

    #[test]
    fn copies_get_their_own_ports_and_addresses_on_the_capturing_worker() {
        let options = IngressOptions {
            plan: PortPlan::new(3, 0, 2).unwrap(),
            ..IngressOptions::default()
        };
        for clients in [None, Some("10.9.9.x")] {
            let mut ing = ingress(options, clients);
            let (mut bufs, mut metas) = (Vec::new(), Vec::new());
            let src = Ipv4Addr::new(10, 77, 0, 10);
            let f = frame(
                src,
                40_000,
                TcpFlags::PSH | TcpFlags::ACK,
                b"GET / HTTP/1.1\r\n\r\n",
            );
            ing.process_all(
                &f,
                f.len(),
                LinkType::Ethernet,
                Duration::ZERO,
                &mut bufs,
                &mut metas,
            );
            assert_eq!(metas.len(), 3);
            let mut seen = std::collections::HashSet::new();
            for (i, (key, seg)) in metas.iter().enumerate() {
                let (ip, port, seq, len, _) = check(&bufs[i]);
                assert_eq!((ip, port), (key.client_ip, key.client_port));
                assert_eq!((seq, len), (seg.seq.0, 18));
                assert_eq!(port_shard(port, 2), port_shard(40_000, 2));
                assert!(seen.insert((ip, port)));
            }
            assert_eq!(metas[0].0.client_port, 40_000);
            if clients.is_some() {
                let ips: std::collections::HashSet<_> =
                    metas.iter().map(|m| m.0.client_ip).collect();
                assert_eq!(ips.len(), 3, "each copy from its own -c address");
            }
            assert_eq!(ing.stats().copies_made, 2);
            assert_eq!(ing.stats().accepted, 1);
        }
    }

    #[test]
    fn merged_captures_are_split_to_the_mtu() {
        let options = IngressOptions {
            mtu: 600,
            plan: PortPlan::new(2, 0, 1).unwrap(),
            ..IngressOptions::default()
        };
        let mut ing = ingress(options, None);
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let f = frame(
            Ipv4Addr::new(10, 77, 0, 10),
            40_000,
            TcpFlags::PSH | TcpFlags::ACK | TcpFlags::FIN,
            &payload,
        );
        let (mut bufs, mut metas) = (Vec::new(), Vec::new());
        ing.process_all(
            &f,
            f.len(),
            LinkType::Ethernet,
            Duration::ZERO,
            &mut bufs,
            &mut metas,
        );
        // 20 + 32 header bytes (timestamps): 548 payload bytes a piece, 6 pieces per copy.
        assert_eq!(metas.len(), 12);
        let mut next = 1000u32;
        let mut joined = Vec::new();
        for (i, (key, seg)) in metas.iter().enumerate().take(6) {
            assert!(bufs[i].len() <= 600);
            let (_, port, seq, len, flags) = check(&bufs[i]);
            assert_eq!(
                (port, seq, len as u32),
                (key.client_port, next, seg.payload_len)
            );
            assert_eq!(seg.seq.0, seq);
            assert_eq!(
                flags.contains(TcpFlags::FIN),
                i == 5,
                "FIN on the last piece only"
            );
            assert_eq!(seg.flags, flags);
            next += len as u32;
            let ip = Ipv4Packet::new_checked(&bufs[i][..]).unwrap();
            joined.extend_from_slice(TcpPacket::new_checked(ip.payload()).unwrap().payload());
        }
        assert_eq!(joined, payload);
        assert_ne!(metas[6].0.client_port, metas[0].0.client_port);
        assert_eq!(
            (ing.stats().split_packets, ing.stats().split_pieces),
            (2, 12)
        );
        // The buffers are reused: a second frame needs no more of them.
        let n = bufs.len();
        metas.clear();
        ing.process_all(
            &f,
            f.len(),
            LinkType::Ethernet,
            Duration::ZERO,
            &mut bufs,
            &mut metas,
        );
        assert_eq!((metas.len(), bufs.len()), (12, n));
    }

    #[test]
    fn sampling_drops_whole_sessions_and_h_replaces_localhost() {
        let options = IngressOptions {
            sampling: Sampling::percent(50).unwrap(),
            localhost_as: Some(Ipv4Addr::new(10, 9, 9, 1)),
            ..IngressOptions::default()
        };
        let mut ing = ingress(options, None);
        let (mut bufs, mut metas) = (Vec::new(), Vec::new());
        let mut kept = 0;
        for port in 30_000..32_000u16 {
            for flags in [TcpFlags::SYN, TcpFlags::ACK | TcpFlags::PSH] {
                metas.clear();
                let f = frame(Ipv4Addr::LOCALHOST, port, flags, b"x");
                ing.process_all(
                    &f,
                    f.len(),
                    LinkType::Ethernet,
                    Duration::ZERO,
                    &mut bufs,
                    &mut metas,
                );
                if flags == TcpFlags::SYN {
                    kept += metas.len();
                } else {
                    assert_eq!(
                        metas.len(),
                        usize::from(Sampling::keeps(50, Ipv4Addr::LOCALHOST, port))
                    );
                }
                if let Some((key, _)) = metas.first() {
                    assert_eq!(key.client_ip, Ipv4Addr::new(10, 9, 9, 1));
                }
            }
        }
        assert!((900..1100).contains(&kept), "{kept}");
        assert_eq!(ing.stats().sampled_out, 2 * (2000 - kept as u64));
    }
}
