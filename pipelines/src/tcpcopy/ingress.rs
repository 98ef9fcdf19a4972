//! The ingress stages of tcpcopy: parse a captured frame, keep what a `-x` transfer selects,
//! rewrite it to the target (and the `-c` client address), and hand the session engine the
//! target-facing key and the parsed segment. Malformed frames are counted by reason and dropped.

use super::transform::{match_transfer, ClientAddrs, Transfer};
use engine::flow::FlowKey;
use engine::session::ClientSegment;
use engine::wire::ethernet::ETHERTYPE_IPV4;
use engine::wire::ipv4::PROTO_TCP;
use engine::wire::{EthernetFrame, Ipv4Packet, TcpPacket, WireError};

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

/// The ingress stages.
#[derive(Debug)]
pub struct Ingress {
    transfers: Vec<Transfer>,
    clients: Option<ClientAddrs>,
    stats: IngressStats,
}

/// How the captured bytes start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkType {
    /// Ethernet II, optionally 802.1Q/802.1ad tagged.
    Ethernet,
    /// The IPv4 header (raw IP captures).
    RawIp,
}

impl Ingress {
    /// Ingress for these transfers and optional `-c` addresses.
    pub fn new(transfers: Vec<Transfer>, clients: Option<ClientAddrs>) -> Ingress {
        Ingress {
            transfers,
            clients,
            stats: IngressStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &IngressStats {
        &self.stats
    }

    /// Processes one captured frame. On success `out` holds the IPv4 packet rewritten for the
    /// target (checksums patched) and the target-facing key and parsed segment are returned.
    pub fn process(
        &mut self,
        frame: &[u8],
        wire_len: usize,
        link: LinkType,
        out: &mut Vec<u8>,
    ) -> Option<(FlowKey, ClientSegment)> {
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
        let client_ip = match &self.clients {
            Some(c) => c.map(ip.src_addr()),
            None => ip.src_addr(),
        };
        let key = FlowKey {
            client_ip,
            client_port: tcp.src_port(),
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
        Some((key, seg))
    }
}
