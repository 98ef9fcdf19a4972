//! UDP replay (`tcpcopy --udp`, spec §6.1): the datagrams clients send to the `-x` online ports
//! are captured, rewritten for the target and sent on a raw IP socket. Stateless: no sessions,
//! no intercept, no responses (the target's replies die at the assistant as in TCP mode).
//!
//! The stages, on one thread (reassembly needs every fragment of a datagram in one place):
//! ```text
//! capture (AF_PACKET, "udp and (...)": the -x ports, plus non-first fragments)
//!   -> parse (malformed frames counted by reason, dropped)
//!   -> reassemble IP fragments ([`Reassembler`]: bounded, timed out, overlaps rejected)
//!   -> match a -x transfer -> rewrite (destination, -c source, checksums)
//!   -> copy (-n, -f: other source ports, as in TCP mode)
//!   -> fragment to -M ([`fragment`]) -> raw IP socket
//! ```
//! [`UdpReplay`] holds the stages without any socket or clock (time is passed in), so tests run
//! it on byte arrays; [`Udpcopy`] runs it between an AF_PACKET ring and a raw socket.

use crate::tcpcopy::copies::PortPlan;
use crate::tcpcopy::ingress::LinkType;
use crate::tcpcopy::transform::{match_transfer, ClientAddrs, Transfer};
use anyhow::Context;
use engine::port::afpacket::{AfPacketConfig, AfPacketRx};
use engine::port::rawsock::{RawIpConfig, RawIpTx};
use engine::port::{PortStats, RxPort, TxBatch, TxPort, MAX_PACKET};
use engine::wire::ethernet::ETHERTYPE_IPV4;
use engine::wire::ipv4::{HEADER_LEN as IPV4_HEADER_LEN, PROTO_UDP};
use engine::wire::{EthernetFrame, Ipv4Packet, UdpPacket, WireError};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest IPv4 packet (Total Length is 16 bits).
const MAX_IP_PACKET: usize = 65_535;
/// Frames taken from the capture ring per burst.
const BURST: usize = 64;
/// Empty polls before the thread parks in `poll(2)`.
const SPIN_LIMIT: u32 = 32;
/// Longest park, so stop requests and expiry are seen promptly.
const MAX_PARK: Duration = Duration::from_millis(10);
/// How often the thread publishes its counters.
const PUBLISH_EVERY: Duration = Duration::from_millis(200);
/// How often the reassembly table is swept for expired datagrams.
const EXPIRE_EVERY: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// Reassembly
// ---------------------------------------------------------------------------------------------

/// Bounds of the [`Reassembler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyConfig {
    /// Most datagrams in reassembly at once; a new one evicts the oldest.
    pub max_datagrams: usize,
    /// Most fragments of one datagram; one more drops the datagram.
    pub max_fragments: usize,
    /// Most payload bytes held over all datagrams in reassembly; past it the oldest datagrams
    /// are evicted (one datagram alone may always grow to the 64 KiB IPv4 limit).
    pub max_bytes: usize,
    /// A datagram not complete this long after its first fragment arrived is dropped.
    pub timeout: Duration,
}

impl Default for ReassemblyConfig {
    fn default() -> ReassemblyConfig {
        ReassemblyConfig {
            max_datagrams: 256,
            max_fragments: 128,
            max_bytes: 8 << 20,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What the [`Reassembler`] counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReassemblyStats {
    /// Fragments handed in.
    pub fragments: u64,
    /// Datagrams completed.
    pub reassembled: u64,
    /// Datagrams dropped incomplete after the timeout.
    pub expired: u64,
    /// Datagrams dropped because two fragments overlapped (other than exact duplicates).
    pub overlaps: u64,
    /// Datagrams (or lone fragments) dropped as malformed: a fragment that is not a multiple
    /// of 8 bytes while more follow, data beyond the 64 KiB limit (with the first fragment's
    /// header) or beyond the last fragment, two different last fragments.
    pub bad: u64,
    /// Datagrams dropped for having more than `max_fragments` fragments.
    pub too_many_fragments: u64,
    /// Datagrams dropped incomplete to make room (table or memory full).
    pub evicted: u64,
    /// Exact duplicates of a fragment already held (ignored).
    pub duplicates: u64,
    /// Fragments of a datagram already dropped (overlap, bad, too many), ignored until it
    /// times out.
    pub discarded: u64,
}

impl ReassemblyStats {
    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &ReassemblyStats) {
        let ReassemblyStats {
            fragments,
            reassembled,
            expired,
            overlaps,
            bad,
            too_many_fragments,
            evicted,
            duplicates,
            discarded,
        } = *other;
        self.fragments += fragments;
        self.reassembled += reassembled;
        self.expired += expired;
        self.overlaps += overlaps;
        self.bad += bad;
        self.too_many_fragments += too_many_fragments;
        self.evicted += evicted;
        self.duplicates += duplicates;
        self.discarded += discarded;
    }
}

/// The identity of a fragmented datagram (RFC 791): source, destination, protocol, ident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FragKey {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    ident: u16,
}

/// One datagram in reassembly.
#[derive(Debug)]
struct Entry {
    key: FragKey,
    /// When its first fragment arrived.
    started: Duration,
    /// The header of the fragment at offset 0 (`header_len` 0 until it arrives).
    header: [u8; 60],
    header_len: usize,
    /// Payload bytes at their offsets (grown to the furthest end seen).
    data: Vec<u8>,
    /// Byte ranges held, sorted and disjoint, `[start, end)`.
    ranges: Vec<(u32, u32)>,
    /// Payload bytes held (the sum of the ranges).
    received: u32,
    /// The payload length, known once the last fragment (MF clear) arrived.
    end: Option<u32>,
    /// Dropped: further fragments are swallowed until the entry times out.
    poisoned: bool,
}

/// Why a datagram in reassembly was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropReason {
    Overlap,
    Bad,
    TooMany,
}

/// Reassembles IPv4 fragments into whole datagrams (RFC 791, with RFC 5722's rule that
/// overlapping fragments drop the datagram). Bounded in datagrams, fragments per datagram and
/// bytes; every incomplete datagram times out. Sans-IO: time is passed in.
#[derive(Debug)]
pub struct Reassembler {
    config: ReassemblyConfig,
    entries: Vec<Entry>,
    /// Payload bytes held over all entries.
    bytes: usize,
    /// The last completed datagram (reused buffer).
    done: Vec<u8>,
    stats: ReassemblyStats,
}

impl Reassembler {
    /// An empty reassembler with these bounds (`max_datagrams` and `max_fragments` at least 1).
    pub fn new(config: ReassemblyConfig) -> Reassembler {
        let config = ReassemblyConfig {
            max_datagrams: config.max_datagrams.max(1),
            max_fragments: config.max_fragments.max(1),
            ..config
        };
        Reassembler {
            config,
            entries: Vec::with_capacity(config.max_datagrams),
            bytes: 0,
            done: Vec::with_capacity(MAX_IP_PACKET),
            stats: ReassemblyStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &ReassemblyStats {
        &self.stats
    }

    /// Datagrams in reassembly (including dropped ones that still swallow their fragments).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no datagram is in reassembly.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes one IPv4 fragment (the IP packet, validated or not). Returns the whole datagram
    /// (header of the first fragment, MF and offset cleared, Total Length and checksum right)
    /// when this fragment completes it.
    pub fn push(&mut self, packet: &[u8], now: Duration) -> Option<&[u8]> {
        self.stats.fragments += 1;
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            self.stats.bad += 1;
            return None;
        };
        if !ip.is_fragment() {
            self.stats.bad += 1;
            return None;
        }
        let key = FragKey {
            src: ip.src_addr(),
            dst: ip.dst_addr(),
            protocol: ip.protocol(),
            ident: ip.ident(),
        };
        let header_len = ip.header_len();
        let payload = ip.payload();
        let offset = u32::from(ip.frag_offset());
        let len = payload.len() as u32;
        let end = offset + len;
        let more = ip.more_frags();
        let index = self.entries.iter().position(|e| e.key == key);
        if let Some(i) = index {
            if self.entries[i].poisoned {
                self.stats.discarded += 1;
                return None;
            }
        }
        // What is wrong with the fragment alone.
        let alone_bad = (more && (len == 0 || !len.is_multiple_of(8)))
            || header_len + end as usize > MAX_IP_PACKET;
        if alone_bad {
            match index {
                Some(i) => self.poison(i, DropReason::Bad),
                None => self.stats.bad += 1,
            }
            return None;
        }
        let i = match index {
            Some(i) => i,
            None => self.insert(key, now),
        };
        // Consistency with what the datagram already holds.
        let entry = &self.entries[i];
        if entry.ranges.len() >= self.config.max_fragments {
            self.poison(i, DropReason::TooMany);
            return None;
        }
        let held_end = entry.ranges.last().map_or(0, |r| r.1);
        // The whole datagram must fit 64 KiB with the header of its first fragment, which
        // may be longer than this fragment's own.
        let first_header = if offset == 0 {
            header_len
        } else {
            entry.header_len
        };
        let too_long = (if more { entry.end } else { Some(end) })
            .is_some_and(|e| first_header + e as usize > MAX_IP_PACKET);
        let conflict = too_long
            || if more {
                entry.end.is_some_and(|e| end > e)
            } else {
                entry.end.is_some_and(|e| e != end) || held_end > end
            };
        if conflict {
            self.poison(i, DropReason::Bad);
            return None;
        }
        let pos = entry.ranges.partition_point(|r| r.0 < offset);
        if len > 0 && entry.ranges.get(pos) == Some(&(offset, end)) {
            self.stats.duplicates += 1;
            return None;
        }
        let overlaps_before = pos > 0 && entry.ranges[pos - 1].1 > offset;
        let overlaps_after = entry.ranges.get(pos).is_some_and(|r| r.0 < end);
        if len > 0 && (overlaps_before || overlaps_after) {
            self.poison(i, DropReason::Overlap);
            return None;
        }
        // Room for the bytes.
        let growth = (end as usize).saturating_sub(entry.data.len());
        let room = growth == 0 || self.make_room(i, growth);
        // `make_room` may have moved the entry (it never evicts it).
        let i = self.entries.iter().position(|e| e.key == key)?;
        if !room {
            // Nothing else is left to evict and it still does not fit (the bound is floored
            // at 64 KiB, so this cannot happen): drop it rather than exceed the bound.
            self.evict(i);
            return None;
        }
        let entry = &mut self.entries[i];
        if growth > 0 {
            entry.data.resize(end as usize, 0);
            self.bytes += growth;
        }
        entry.data[offset as usize..end as usize].copy_from_slice(payload);
        if len > 0 {
            entry.ranges.insert(pos, (offset, end));
            entry.received += len;
        }
        if !more {
            entry.end = Some(end);
        }
        if offset == 0 {
            entry.header[..header_len].copy_from_slice(&packet[..header_len]);
            entry.header_len = header_len;
        }
        let complete = entry.header_len > 0 && entry.end == Some(entry.received);
        if !complete {
            return None;
        }
        let entry = self.entries.swap_remove(i);
        self.bytes -= entry.data.len();
        let payload_len = entry.end.unwrap_or(0) as usize;
        self.done.clear();
        self.done
            .extend_from_slice(&entry.header[..entry.header_len]);
        self.done.extend_from_slice(&entry.data[..payload_len]);
        let mut ip = Ipv4Packet::new_unchecked(&mut self.done[..]);
        ip.set_total_len((entry.header_len + payload_len) as u16);
        ip.set_flags_frag(false, false, 0);
        ip.fill_checksum();
        self.stats.reassembled += 1;
        Some(&self.done)
    }

    /// Drops the datagrams whose first fragment arrived `timeout` or more before `now`.
    /// Returns how many incomplete datagrams expired.
    pub fn expire(&mut self, now: Duration) -> usize {
        let timeout = self.config.timeout;
        let mut expired = 0;
        let mut freed = 0;
        self.entries.retain(|e| {
            if now.saturating_sub(e.started) < timeout {
                return true;
            }
            if !e.poisoned {
                expired += 1;
            }
            freed += e.data.len();
            false
        });
        self.bytes -= freed;
        self.stats.expired += expired as u64;
        expired
    }

    /// A new entry for `key`, evicting the oldest datagram when the table is full.
    fn insert(&mut self, key: FragKey, now: Duration) -> usize {
        if self.entries.len() >= self.config.max_datagrams {
            if let Some(oldest) = self.oldest(None) {
                self.evict(oldest);
            }
        }
        self.entries.push(Entry {
            key,
            started: now,
            header: [0; 60],
            header_len: 0,
            data: Vec::new(),
            ranges: Vec::new(),
            received: 0,
            end: None,
            poisoned: false,
        });
        self.entries.len() - 1
    }

    /// Evicts the oldest other datagrams until `growth` more bytes fit; false if they cannot.
    fn make_room(&mut self, keep: usize, growth: usize) -> bool {
        let key = self.entries[keep].key;
        while self.bytes + growth > self.config.max_bytes.max(MAX_IP_PACKET) {
            let keep = self
                .entries
                .iter()
                .position(|e| e.key == key)
                .unwrap_or(usize::MAX);
            match self.oldest(Some(keep)) {
                Some(oldest) => self.evict(oldest),
                None => return false,
            }
        }
        true
    }

    /// The index of the oldest entry other than `except`.
    fn oldest(&self, except: Option<usize>) -> Option<usize> {
        self.entries
            .iter()
            .enumerate()
            .filter(|&(i, _)| Some(i) != except)
            .min_by_key(|(_, e)| e.started)
            .map(|(i, _)| i)
    }

    fn evict(&mut self, index: usize) {
        let entry = self.entries.swap_remove(index);
        self.bytes -= entry.data.len();
        if !entry.poisoned {
            self.stats.evicted += 1;
        }
    }

    /// Drops the datagram's bytes and keeps the entry to swallow its other fragments.
    fn poison(&mut self, index: usize, why: DropReason) {
        match why {
            DropReason::Overlap => self.stats.overlaps += 1,
            DropReason::Bad => self.stats.bad += 1,
            DropReason::TooMany => self.stats.too_many_fragments += 1,
        }
        let entry = &mut self.entries[index];
        self.bytes -= entry.data.len();
        entry.data = Vec::new();
        entry.ranges = Vec::new();
        entry.poisoned = true;
    }
}

// ---------------------------------------------------------------------------------------------
// Fragmentation
// ---------------------------------------------------------------------------------------------

/// Why [`fragment`] could not split a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    /// The packet is not a valid IPv4 packet.
    #[error("not a valid IPv4 packet: {0}")]
    Malformed(WireError),
    /// The MTU leaves no room for 8 payload bytes after the header.
    #[error("an MTU of {mtu} bytes leaves no room for data after a {header_len}-byte header")]
    MtuTooSmall {
        /// The MTU asked for.
        mtu: usize,
        /// The header that must fit.
        header_len: usize,
    },
}

/// The options a fragment after the first carries: those with the "copied" flag (RFC 791),
/// padded with End-of-Options to a multiple of 4 bytes. Malformed options end the copy.
fn copied_options(options: &[u8], out: &mut [u8; 40]) -> usize {
    let mut len = 0;
    let mut i = 0;
    while i < options.len() {
        let kind = options[i];
        match kind {
            0 => break,
            1 => i += 1,
            _ => {
                let Some(&size) = options.get(i + 1) else {
                    break;
                };
                let size = usize::from(size);
                if size < 2 || i + size > options.len() {
                    break;
                }
                if kind & 0x80 != 0 {
                    out[len..len + size].copy_from_slice(&options[i..i + size]);
                    len += size;
                }
                i += size;
            }
        }
    }
    let padded = (len + 3) & !3;
    out[len..padded].fill(0);
    padded
}

/// Splits an IPv4 packet into fragments of at most `mtu` bytes (RFC 791) and hands each to
/// `emit`, built in `scratch`. A packet that fits is emitted unchanged (one call). Otherwise
/// every fragment carries `ident`, DF clear, MF set on all but the last (the last keeps the
/// packet's own MF, so a fragment can be split again), its offset, its Total Length and a
/// correct header checksum; the first keeps the packet's header, the others carry only the
/// options marked "copied". Fragment payloads are multiples of 8 bytes except the last.
/// Returns how many packets were emitted.
///
/// # Errors
/// [`FragmentError::Malformed`] for a packet that does not parse; [`FragmentError::MtuTooSmall`]
/// when `mtu` cannot hold a header and 8 bytes.
pub fn fragment(
    packet: &[u8],
    mtu: usize,
    ident: u16,
    scratch: &mut Vec<u8>,
    emit: &mut dyn FnMut(&[u8]),
) -> Result<usize, FragmentError> {
    let ip = Ipv4Packet::new_checked(packet).map_err(FragmentError::Malformed)?;
    let total = usize::from(ip.total_len());
    if total <= mtu {
        emit(&packet[..total]);
        return Ok(1);
    }
    let header_len = ip.header_len();
    let mut later_options = [0u8; 40];
    let later_options_len = copied_options(ip.options(), &mut later_options);
    let later_header_len = IPV4_HEADER_LEN + later_options_len;
    let room = |header: usize| mtu.saturating_sub(header) & !7;
    if room(header_len) == 0 {
        return Err(FragmentError::MtuTooSmall { mtu, header_len });
    }
    let base = usize::from(ip.frag_offset());
    let last_more = ip.more_frags();
    let payload = ip.payload();
    let mut sent = 0;
    let mut at = 0;
    while at < payload.len() {
        let first = at == 0;
        let this_header = if first { header_len } else { later_header_len };
        let chunk = room(this_header).min(payload.len() - at);
        let last = at + chunk == payload.len();
        scratch.clear();
        if first {
            scratch.extend_from_slice(&packet[..header_len]);
        } else {
            scratch.extend_from_slice(&packet[..IPV4_HEADER_LEN]);
            scratch.extend_from_slice(&later_options[..later_options_len]);
        }
        scratch.extend_from_slice(&payload[at..at + chunk]);
        let mut frag = Ipv4Packet::new_unchecked(&mut scratch[..]);
        frag.set_version_ihl(this_header);
        frag.set_total_len((this_header + chunk) as u16);
        frag.set_ident(ident);
        frag.set_flags_frag(false, !last || last_more, (base + at) as u16);
        frag.fill_checksum();
        emit(scratch);
        sent += 1;
        at += chunk;
    }
    Ok(sent)
}

// ---------------------------------------------------------------------------------------------
// The replay stages
// ---------------------------------------------------------------------------------------------

/// The settings of the replay stages.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    /// `-x` transfers.
    pub transfers: Vec<Transfer>,
    /// `-c` replay client addresses.
    pub clients: Option<ClientAddrs>,
    /// `-M`: the largest IP packet sent towards the target; larger datagrams are fragmented.
    /// Values above [`MAX_PACKET`] (the transmit slot) act as [`MAX_PACKET`].
    pub mtu: usize,
    /// `-n`/`-f`: copies of each datagram and where their source ports go (as in TCP mode;
    /// with `-c` copy `i` also takes [`ClientAddrs::map_copy`]`(client, i)`).
    pub plan: PortPlan,
    /// Reassembly bounds.
    pub reassembly: ReassemblyConfig,
}

impl Default for ReplayConfig {
    fn default() -> ReplayConfig {
        ReplayConfig {
            transfers: Vec::new(),
            clients: None,
            mtu: 1500,
            plan: PortPlan::new(1, 0, 1).expect("one copy, instance 0 is a valid plan"),
            reassembly: ReassemblyConfig::default(),
        }
    }
}

/// What the replay stages counted. Every captured frame ends up accepted, held in reassembly
/// (a fragment), or in exactly one drop reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpStats {
    /// Frames examined.
    pub captured: u64,
    /// Datagrams (whole or reassembled) matching a transfer.
    pub accepted: u64,
    /// Datagrams handed to the transmit side (copies included).
    pub datagrams: u64,
    /// Of those, datagrams larger than `-M`, split into fragments.
    pub fragmented: u64,
    /// Fragments those were split into.
    pub fragments_out: u64,
    /// Packets that could not be queued for transmit (larger than a transmit slot).
    pub oversize: u64,
    /// Datagrams that could not be fragmented (cannot happen with a valid `-M`).
    pub fragment_errors: u64,
    /// Not IPv4.
    pub not_ipv4: u64,
    /// IPv4 but not UDP.
    pub not_udp: u64,
    /// Shorter than the Ethernet, IPv4 or UDP header.
    pub truncated: u64,
    /// IPv4 version not 4.
    pub bad_version: u64,
    /// IPv4 header length below 5 words or beyond the frame.
    pub bad_ihl: u64,
    /// IPv4 total length below the header or beyond the frame.
    pub bad_total_len: u64,
    /// UDP length below 8 or beyond the IP payload.
    pub bad_udp_len: u64,
    /// IPv4 header checksum wrong.
    pub bad_checksum: u64,
    /// Captured with fewer bytes than the packet had.
    pub cut_short: u64,
    /// Well-formed but matching no transfer.
    pub no_transfer: u64,
    /// Reassembly.
    pub reassembly: ReassemblyStats,
    /// Datagrams in reassembly now.
    pub reassembling: usize,
    /// The capture socket.
    pub capture: PortStats,
    /// The transmit socket.
    pub transmit: PortStats,
}

impl UdpStats {
    /// Frames dropped as malformed.
    pub fn malformed(&self) -> u64 {
        self.truncated
            + self.bad_version
            + self.bad_ihl
            + self.bad_total_len
            + self.bad_udp_len
            + self.bad_checksum
            + self.cut_short
    }

    fn count(&mut self, error: WireError) {
        match error {
            WireError::BadVersion => self.bad_version += 1,
            WireError::BadHeaderLen => self.bad_ihl += 1,
            WireError::BadTotalLen => self.bad_total_len += 1,
            WireError::BadUdpLen => self.bad_udp_len += 1,
            WireError::Truncated | WireError::BadDataOffset | WireError::BadOption => {
                self.truncated += 1
            }
        }
    }

    /// The one-line report: `udp captured N ... sent N ... | reassembly ... | dropped: ...`.
    pub fn line(&self) -> String {
        let r = &self.reassembly;
        let mut line = String::new();
        let _ = write!(
            line,
            "udp captured {} capture-drops {} capture-duplicates {} accepted {} datagrams {} sent {} fragmented {} \
             fragments-out {} tx-errors {} | reassembly fragments-in {} reassembled {} pending {} \
             expired {} overlaps {} bad {} too-many-fragments {} evicted {} duplicates {} \
             discarded {} | dropped: malformed {}: truncated {} bad-version {} bad-ihl {} \
             bad-total-len {} bad-udp-len {} bad-checksum {} cut-short {} | not-ipv4 {} not-udp {} no-transfer {} \
             oversize {} fragment-errors {}",
            self.captured,
            self.capture.rx_dropped,
            self.capture.rx_duplicates,
            self.accepted,
            self.datagrams,
            self.transmit.tx_packets,
            self.fragmented,
            self.fragments_out,
            self.transmit.tx_errors,
            r.fragments,
            r.reassembled,
            self.reassembling,
            r.expired,
            r.overlaps,
            r.bad,
            r.too_many_fragments,
            r.evicted,
            r.duplicates,
            r.discarded,
            self.malformed(),
            self.truncated,
            self.bad_version,
            self.bad_ihl,
            self.bad_total_len,
            self.bad_udp_len,
            self.bad_checksum,
            self.cut_short,
            self.not_ipv4,
            self.not_udp,
            self.no_transfer,
            self.oversize,
            self.fragment_errors,
        );
        line
    }
}

/// The replay stages: parse, reassemble, match, rewrite, replicate, fragment. No sockets, no
/// clock; buffers are allocated once (reassembly allocates per fragmented datagram).
#[derive(Debug)]
pub struct UdpReplay {
    transfers: Vec<Transfer>,
    clients: Option<ClientAddrs>,
    mtu: usize,
    plan: PortPlan,
    reassembler: Reassembler,
    stats: UdpStats,
    /// The rewritten datagram.
    out: Vec<u8>,
    /// The fragment being built.
    scratch: Vec<u8>,
    /// The ident of the next fragmented datagram.
    next_ident: u16,
}

impl UdpReplay {
    /// The stages for `config`.
    pub fn new(config: ReplayConfig) -> UdpReplay {
        let seed = std::process::id() as u16 ^ 0x5a5a;
        UdpReplay {
            transfers: config.transfers,
            clients: config.clients,
            mtu: config.mtu.clamp(60 + 8, MAX_PACKET),
            plan: config.plan,
            reassembler: Reassembler::new(config.reassembly),
            stats: UdpStats::default(),
            out: Vec::with_capacity(MAX_IP_PACKET),
            scratch: Vec::with_capacity(MAX_PACKET),
            next_ident: seed.max(1),
        }
    }

    /// The counters (the port counters stay zero: the runner fills them).
    pub fn stats(&self) -> UdpStats {
        UdpStats {
            reassembly: *self.reassembler.stats(),
            reassembling: self.reassembler.len(),
            ..self.stats
        }
    }

    /// Drops datagrams whose reassembly timed out.
    pub fn expire(&mut self, now: Duration) {
        self.reassembler.expire(now);
    }

    /// Processes one captured frame; `emit` receives each IPv4 packet to send to the target.
    pub fn process(
        &mut self,
        frame: &[u8],
        wire_len: usize,
        link: LinkType,
        now: Duration,
        emit: &mut dyn FnMut(&[u8]),
    ) {
        self.stats.captured += 1;
        let ip_bytes = match link {
            LinkType::RawIp => frame,
            LinkType::Ethernet => match EthernetFrame::new_checked(frame) {
                Ok(eth) if eth.ethertype() == ETHERTYPE_IPV4 => &frame[eth.header_len()..],
                Ok(_) => {
                    self.stats.not_ipv4 += 1;
                    return;
                }
                Err(e) => {
                    self.stats.count(e);
                    return;
                }
            },
        };
        let ip = match Ipv4Packet::new_checked(ip_bytes) {
            Ok(ip) => ip,
            Err(e) => {
                if wire_len > frame.len() && e == WireError::BadTotalLen {
                    self.stats.cut_short += 1;
                } else {
                    self.stats.count(e);
                }
                return;
            }
        };
        if ip.protocol() != PROTO_UDP {
            self.stats.not_udp += 1;
            return;
        }
        if !ip.verify_checksum() {
            // The kernels on both ends drop these before reassembly; so do we (a corrupt
            // fragment must not spoil a good datagram).
            self.stats.bad_checksum += 1;
            return;
        }
        let packet = &ip_bytes[..usize::from(ip.total_len())];
        let UdpReplay {
            transfers,
            clients,
            mtu,
            plan,
            reassembler,
            stats,
            out,
            scratch,
            next_ident,
        } = self;
        let datagram = if ip.is_fragment() {
            match reassembler.push(packet, now) {
                Some(whole) => whole,
                None => return,
            }
        } else {
            packet
        };
        let mut stages = Stages {
            transfers,
            clients: clients.as_ref(),
            mtu: *mtu,
            plan: *plan,
            stats,
            out,
            scratch,
            next_ident,
        };
        stages.replay(datagram, emit);
    }
}

/// The stages after reassembly, borrowing the replay's parts.
struct Stages<'a> {
    transfers: &'a [Transfer],
    clients: Option<&'a ClientAddrs>,
    mtu: usize,
    plan: PortPlan,
    stats: &'a mut UdpStats,
    out: &'a mut Vec<u8>,
    scratch: &'a mut Vec<u8>,
    next_ident: &'a mut u16,
}

impl Stages<'_> {
    /// Rewrites a whole IPv4 UDP datagram for its transfer and emits it (and its copies).
    fn replay(&mut self, datagram: &[u8], emit: &mut dyn FnMut(&[u8])) {
        let ip = Ipv4Packet::new_unchecked(datagram);
        let udp = match UdpPacket::new_checked(ip.payload()) {
            Ok(udp) => udp,
            Err(e) => {
                self.stats.count(e);
                return;
            }
        };
        let Some(transfer) = match_transfer(self.transfers, ip.dst_addr(), udp.dst_port()) else {
            self.stats.no_transfer += 1;
            return;
        };
        self.stats.accepted += 1;
        let (client_ip, client_port) = (ip.src_addr(), udp.src_port());
        let had_checksum = udp.checksum() != 0;
        let udp_len = usize::from(udp.len());
        let header_len = ip.header_len();
        self.out.clear();
        self.out.extend_from_slice(datagram);
        for copy in 0..self.plan.copies() {
            let source = self
                .clients
                .map_or(client_ip, |c| c.map_copy(client_ip, copy));
            let port = self.plan.port(client_port, copy);
            let mut ip = Ipv4Packet::new_unchecked(&mut self.out[..]);
            ip.set_dst_addr(transfer.target_ip);
            ip.set_src_addr(source);
            ip.fill_checksum();
            let mut udp = UdpPacket::new_unchecked(&mut self.out[header_len..header_len + udp_len]);
            udp.set_dst_port(transfer.target_port);
            udp.set_src_port(port);
            if had_checksum {
                udp.fill_checksum(source, transfer.target_ip);
            }
            self.stats.datagrams += 1;
            if self.out.len() <= self.mtu {
                emit(&self.out[..]);
                continue;
            }
            let ident = *self.next_ident;
            *self.next_ident = self.next_ident.wrapping_add(1).max(1);
            match fragment(&self.out[..], self.mtu, ident, self.scratch, emit) {
                Ok(n) => {
                    self.stats.fragmented += 1;
                    self.stats.fragments_out += n as u64;
                }
                Err(_) => self.stats.fragment_errors += 1,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The runner
// ---------------------------------------------------------------------------------------------

/// The pcap filter of UDP replay: the `-x` destinations, and every non-first fragment (they
/// carry no port; those of other traffic time out in reassembly), e.g.
/// `udp and ((dst port 53) or (ip[6:2] & 0x1fff != 0))`. When every transfer names its online
/// address, fragments are limited to those addresses.
pub fn capture_filter(transfers: &[Transfer]) -> String {
    let mut parts: Vec<String> = transfers
        .iter()
        .map(|t| match t.online_ip {
            Some(ip) => format!("(dst host {ip} and dst port {})", t.online_port),
            None => format!("(dst port {})", t.online_port),
        })
        .collect();
    let hosts: Option<Vec<String>> = transfers
        .iter()
        .map(|t| t.online_ip.map(|ip| format!("dst host {ip}")))
        .collect();
    match hosts {
        Some(mut hosts) if !hosts.is_empty() => {
            hosts.dedup();
            parts.push(format!(
                "(ip[6:2] & 0x1fff != 0 and ({}))",
                hosts.join(" or ")
            ));
        }
        _ => parts.push("(ip[6:2] & 0x1fff != 0)".into()),
    }
    format!("udp and ({})", parts.join(" or "))
}

/// Everything UDP replay needs, already validated.
#[derive(Debug, Clone)]
pub struct UdpcopyConfig {
    /// The replay stages.
    pub replay: ReplayConfig,
    /// `-i` capture interface.
    pub interface: String,
    /// `-F` capture filter (default: [`capture_filter`]).
    pub filter: String,
    /// Transmit interface for the raw socket (`-o`), if pinned.
    pub output_interface: Option<String>,
    /// Period of the one-line statistics report (`None`: only at exit).
    pub stats_interval: Option<Duration>,
    /// Never park when idle.
    pub busy_poll: bool,
}

/// A running UDP replay: stop it with [`Udpcopy::stop`], then [`Udpcopy::join`].
#[derive(Debug)]
pub struct Udpcopy {
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<UdpStats>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    waker: Arc<Waker>,
}

const CAPTURE: Token = Token(0);
const WAKE: Token = Token(1);

impl Udpcopy {
    /// Opens the capture and raw sockets and starts the replay thread.
    ///
    /// # Errors
    /// A socket that cannot be opened (named, with the cause), or a thread that cannot start.
    pub fn start(config: UdpcopyConfig) -> anyhow::Result<Udpcopy> {
        let (interface, scope) = crate::ports::capture_scope(&config.interface);
        let capture = AfPacketRx::open(&AfPacketConfig {
            interface,
            scope,
            filter: Some(config.filter.clone()),
            ..AfPacketConfig::default()
        })
        .with_context(|| format!("cannot capture on -i {}", config.interface))?;
        let transmit = RawIpTx::open(&RawIpConfig {
            bind_device: config.output_interface.clone(),
            ..RawIpConfig::default()
        })
        .context("cannot open the raw IP socket that sends to the target")?;
        let poll = Poll::new().context("mio poll")?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).context("mio waker")?);
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(UdpStats::default()));
        let runner = Runner {
            poll,
            capture: Box::new(capture),
            transmit: Box::new(transmit),
            batch: TxBatch::new(BURST * 4),
            replay: UdpReplay::new(config.replay),
            busy_poll: config.busy_poll,
            stats_interval: config.stats_interval,
        };
        let (thread_stop, thread_shared) = (stop.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("udpcopy".into())
            .spawn(move || runner.run(&thread_stop, &thread_shared))
            .context("cannot start the UDP replay thread")?;
        Ok(Udpcopy {
            stop,
            shared,
            thread: Some(thread),
            waker,
        })
    }

    /// The counters so far (published a few times a second).
    pub fn stats(&self) -> UdpStats {
        self.shared.lock().map(|s| *s).unwrap_or_default()
    }

    /// True while the replay thread runs.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Asks the replay thread to stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    /// Waits for the replay thread and returns the final counters.
    ///
    /// # Errors
    /// The error the thread ended with (a capture or transmit socket that failed).
    pub fn join(mut self) -> anyhow::Result<UdpStats> {
        self.stop();
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the UDP replay thread panicked")))?;
        }
        Ok(self.stats())
    }
}

/// The replay thread: capture burst -> stages -> transmit burst.
struct Runner {
    poll: Poll,
    capture: Box<dyn RxPort>,
    transmit: Box<dyn TxPort>,
    batch: TxBatch,
    replay: UdpReplay,
    busy_poll: bool,
    stats_interval: Option<Duration>,
}

impl Runner {
    fn run(mut self, stop: &AtomicBool, shared: &Mutex<UdpStats>) -> anyhow::Result<()> {
        let wait_fd = self.capture.wait_fd();
        if let Some(fd) = wait_fd {
            self.poll
                .registry()
                .register(&mut SourceFd(&fd), CAPTURE, Interest::READABLE)
                .context("register the capture socket")?;
        }
        let epoch = Instant::now();
        let mut events = Events::with_capacity(4);
        let mut idle = 0u32;
        let (mut last_publish, mut last_expire, mut last_report) = (epoch, epoch, epoch);
        let result = loop {
            if stop.load(Ordering::Relaxed) {
                break Ok(());
            }
            let received = match self.iterate(epoch.elapsed()) {
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            if last_expire.elapsed() >= EXPIRE_EVERY {
                last_expire = Instant::now();
                self.replay.expire(epoch.elapsed());
            }
            if last_publish.elapsed() >= PUBLISH_EVERY {
                last_publish = Instant::now();
                self.publish(shared);
            }
            if let Some(every) = self.stats_interval {
                if last_report.elapsed() >= every {
                    last_report = Instant::now();
                    tracing::info!("{}", self.snapshot().line());
                }
            }
            if received > 0 || self.busy_poll {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < SPIN_LIMIT {
                std::hint::spin_loop();
                continue;
            }
            if wait_fd.is_some() {
                let _ = self.poll.poll(&mut events, Some(MAX_PARK));
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        };
        if !self.batch.is_empty() {
            let _ = self.transmit.tx_burst(&mut self.batch);
        }
        self.publish(shared);
        result
    }

    /// One capture burst through the stages, then one transmit burst.
    fn iterate(&mut self, now: Duration) -> anyhow::Result<usize> {
        let Runner {
            capture,
            transmit,
            batch,
            replay,
            ..
        } = self;
        let mut tx_error: Option<std::io::Error> = None;
        let mut oversize = 0u64;
        let link = capture.link_type();
        let received = capture
            .rx_burst(BURST, &mut |frame| {
                replay.process(frame.data, frame.wire_len, link, now, &mut |packet| {
                    if batch.push(packet) {
                        return;
                    }
                    if batch.is_full() {
                        if let Err(e) = transmit.tx_burst(batch) {
                            tx_error.get_or_insert(e);
                        }
                    }
                    if !batch.push(packet) {
                        oversize += 1;
                    }
                });
            })
            .context("capture failed")?;
        self.replay.stats.oversize += oversize;
        if let Some(e) = tx_error {
            return Err(e).context("transmit failed");
        }
        if !self.batch.is_empty() {
            self.transmit
                .tx_burst(&mut self.batch)
                .context("transmit failed")?;
        }
        Ok(received)
    }

    fn snapshot(&self) -> UdpStats {
        UdpStats {
            capture: self.capture.stats(),
            transmit: self.transmit.stats(),
            ..self.replay.stats()
        }
    }

    fn publish(&self, shared: &Mutex<UdpStats>) {
        if let Ok(mut s) = shared.lock() {
            *s = self.snapshot();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::wire::checksum;
    use proptest::prelude::*;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
    const ONLINE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 20);
    const TARGET: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 30);

    /// An IPv4 UDP packet with `payload` bytes (a pattern), ident 0x1234, DF clear.
    fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        ip_packet_with_options(src, dst, sport, dport, payload, &[])
    }

    fn ip_packet_with_options(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        payload: &[u8],
        options: &[u8],
    ) -> Vec<u8> {
        assert_eq!(options.len() % 4, 0);
        let header_len = IPV4_HEADER_LEN + options.len();
        let total = header_len + 8 + payload.len();
        let mut buf = vec![0u8; total];
        {
            let mut ip = Ipv4Packet::new_unchecked(&mut buf[..]);
            ip.set_version_ihl(header_len);
            ip.set_total_len(total as u16);
            ip.set_ident(0x1234);
            ip.set_ttl(64);
            ip.set_protocol(PROTO_UDP);
            ip.set_src_addr(src);
            ip.set_dst_addr(dst);
            ip.options_mut().copy_from_slice(options);
            ip.fill_checksum();
        }
        {
            let mut udp = UdpPacket::new_unchecked(&mut buf[header_len..]);
            udp.set_src_port(sport);
            udp.set_dst_port(dport);
            udp.set_len((8 + payload.len()) as u16);
            udp.payload_mut().copy_from_slice(payload);
            udp.fill_checksum(src, dst);
        }
        buf
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn ethernet(ip: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f.extend_from_slice(ip);
        f
    }

    /// Bounds that let a datagram have as many fragments as a 68-byte MTU makes.
    fn roomy() -> ReassemblyConfig {
        ReassemblyConfig {
            max_fragments: 2048,
            ..ReassemblyConfig::default()
        }
    }

    fn fragments_of(packet: &[u8], mtu: usize, ident: u16) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        fragment(packet, mtu, ident, &mut scratch, &mut |f| {
            out.push(f.to_vec())
        })
        .unwrap();
        out
    }

    /// Checks every fragment's header and returns the reassembled payload (by offsets).
    fn check_fragments(frags: &[Vec<u8>], mtu: usize, ident: u16) -> Vec<u8> {
        let mut payload = Vec::new();
        for (i, f) in frags.iter().enumerate() {
            let ip = Ipv4Packet::new_checked(&f[..]).unwrap();
            let last = i == frags.len() - 1;
            assert!(f.len() <= mtu, "fragment {i} is {} > {mtu}", f.len());
            assert_eq!(usize::from(ip.total_len()), f.len());
            assert!(ip.verify_checksum(), "fragment {i} header checksum");
            assert_eq!(ip.ident(), ident);
            assert!(!ip.dont_frag());
            assert_eq!(ip.more_frags(), !last, "MF of fragment {i}");
            assert_eq!(usize::from(ip.frag_offset()), payload.len(), "offset {i}");
            if !last {
                assert_eq!(ip.payload().len() % 8, 0, "fragment {i} payload");
            }
            assert_eq!((ip.src_addr(), ip.dst_addr()), (CLIENT, TARGET));
            assert_eq!(ip.protocol(), PROTO_UDP);
            payload.extend_from_slice(ip.payload());
        }
        payload
    }

    #[test]
    fn fragments_3000_bytes_at_576_correctly() {
        let packet = udp_packet(CLIENT, TARGET, 40000, 5353, &pattern(3000 - 28, 1));
        let frags = fragments_of(&packet, 576, 77);
        // 2980 payload bytes, 552 per fragment: 5 full + 1 of 220.
        assert_eq!(frags.len(), 6);
        assert_eq!(frags[0].len(), 20 + 552);
        assert_eq!(frags[5].len(), 20 + 2980 - 5 * 552);
        let payload = check_fragments(&frags, 576, 77);
        assert_eq!(payload, &packet[20..]);
        // The first fragment's header sits at the start of the packet (the C tool's bug wrote
        // it elsewhere): it carries the UDP header with the right ports.
        let first = Ipv4Packet::new_checked(&frags[0][..]).unwrap();
        let udp = UdpPacket::new_unchecked(first.payload());
        assert_eq!((udp.src_port(), udp.dst_port()), (40000, 5353));
    }

    #[test]
    fn packet_that_fits_is_emitted_unchanged() {
        let packet = udp_packet(CLIENT, TARGET, 1, 2, &pattern(100, 3));
        let frags = fragments_of(&packet, 576, 9);
        assert_eq!(frags, vec![packet.clone()]);
        let exact = udp_packet(CLIENT, TARGET, 1, 2, &pattern(576 - 28, 3));
        assert_eq!(fragments_of(&exact, 576, 9), vec![exact.clone()]);
    }

    #[test]
    fn odd_sizes_and_mtus_round_trip_through_the_reassembler() {
        for &mtu in &[68usize, 69, 75, 576, 577, 1000, 1500] {
            for &len in &[
                1usize, 7, 8, 9, 47, 48, 49, 547, 548, 549, 1471, 1473, 2999, 8000,
            ] {
                let packet = udp_packet(CLIENT, TARGET, 1000, 53, &pattern(len, len as u8));
                let frags = fragments_of(&packet, mtu, 4321);
                if packet.len() <= mtu {
                    assert_eq!(frags, vec![packet.clone()], "mtu {mtu} len {len}");
                    continue;
                }
                let payload = check_fragments(&frags, mtu, 4321);
                assert_eq!(payload, &packet[20..], "mtu {mtu} len {len}");
                // Any arrival order reassembles to the same datagram.
                let mut r = Reassembler::new(roomy());
                let mut whole = None;
                for f in frags.iter().rev() {
                    if let Some(w) = r.push(f, Duration::ZERO) {
                        whole = Some(w.to_vec());
                    }
                }
                let whole = whole.unwrap_or_else(|| panic!("mtu {mtu} len {len}: incomplete"));
                let ip = Ipv4Packet::new_checked(&whole[..]).unwrap();
                assert!(ip.verify_checksum());
                assert!(!ip.is_fragment());
                assert_eq!(ip.payload(), &packet[20..]);
                assert_eq!(ip.ident(), 4321);
                let udp = UdpPacket::new_checked(ip.payload()).unwrap();
                assert!(udp.verify_checksum(CLIENT, TARGET));
                assert!(r.is_empty() && r.bytes() == 0);
            }
        }
    }

    #[test]
    fn later_fragments_carry_only_copied_options() {
        // Record Route (7, not copied) padded with a NOP, then a copied option 0x94 (router
        // alert) of 4 bytes.
        let options = [7, 7, 4, 0, 0, 0, 0, 1, 0x94, 4, 0, 0];
        let packet = ip_packet_with_options(CLIENT, TARGET, 1, 2, &pattern(200, 5), &options);
        let frags = fragments_of(&packet, 100, 5);
        let first = Ipv4Packet::new_checked(&frags[0][..]).unwrap();
        assert_eq!(first.options(), &options);
        assert_eq!(first.payload().len(), (100 - 32) & !7);
        for f in &frags[1..] {
            let ip = Ipv4Packet::new_checked(&f[..]).unwrap();
            assert_eq!(ip.options(), &[0x94, 4, 0, 0]);
            assert!(ip.verify_checksum());
        }
        let mut r = Reassembler::new(ReassemblyConfig::default());
        let whole = frags
            .iter()
            .find_map(|f| r.push(f, Duration::ZERO).map(<[u8]>::to_vec))
            .unwrap();
        assert_eq!(&whole[20..32], &options);
        assert_eq!(&whole[32..], &packet[32..]);
    }

    #[test]
    fn fragmenting_a_fragment_keeps_offsets_and_mf() {
        let packet = udp_packet(CLIENT, TARGET, 1, 2, &pattern(3000, 9));
        let frags = fragments_of(&packet, 1500, 11);
        // Split the first fragment (MF set) again at 576.
        let again = fragments_of(&frags[0], 576, 11);
        assert!(again.len() > 1);
        let mut offset = 0;
        for f in &again {
            let ip = Ipv4Packet::new_checked(&f[..]).unwrap();
            assert_eq!(usize::from(ip.frag_offset()), offset);
            assert!(
                ip.more_frags(),
                "the original's MF carries to its last piece"
            );
            offset += ip.payload().len();
        }
        let mut r = Reassembler::new(ReassemblyConfig::default());
        let whole = again
            .iter()
            .chain(&frags[1..])
            .find_map(|f| r.push(f, Duration::ZERO).map(<[u8]>::to_vec))
            .unwrap();
        assert_eq!(&whole[20..], &packet[20..]);
    }

    #[test]
    fn mtu_too_small_and_malformed_are_errors() {
        let packet = udp_packet(CLIENT, TARGET, 1, 2, &pattern(100, 0));
        let mut scratch = Vec::new();
        let err = fragment(&packet, 27, 1, &mut scratch, &mut |_| {}).unwrap_err();
        assert_eq!(
            err,
            FragmentError::MtuTooSmall {
                mtu: 27,
                header_len: 20
            }
        );
        assert!(err.to_string().contains("27"));
        let err = fragment(&packet[..10], 576, 1, &mut scratch, &mut |_| {}).unwrap_err();
        assert_eq!(err, FragmentError::Malformed(WireError::Truncated));
    }

    fn push_all(r: &mut Reassembler, frags: &[&Vec<u8>], now: Duration) -> Option<Vec<u8>> {
        let mut whole = None;
        for f in frags {
            if let Some(w) = r.push(f, now) {
                whole = Some(w.to_vec());
            }
        }
        whole
    }

    #[test]
    fn exact_duplicates_are_ignored() {
        let packet = udp_packet(CLIENT, TARGET, 1, 2, &pattern(2000, 1));
        let frags = fragments_of(&packet, 576, 3);
        let mut r = Reassembler::new(ReassemblyConfig::default());
        let whole = push_all(
            &mut r,
            &[&frags[0], &frags[1], &frags[1], &frags[2], &frags[3]],
            Duration::ZERO,
        );
        assert_eq!(&whole.unwrap()[20..], &packet[20..]);
        assert_eq!(r.stats().duplicates, 1);
        assert_eq!(r.stats().reassembled, 1);
    }

    /// A fragment of `payload` bytes at byte `offset`, ident 99, with a 20-byte header.
    fn raw_fragment(offset: u16, more: bool, payload: &[u8]) -> Vec<u8> {
        raw_fragment_with_header(20, offset, more, payload)
    }

    /// [`raw_fragment`] with a header of `header_len` bytes (20..=60).
    fn raw_fragment_with_header(
        header_len: usize,
        offset: u16,
        more: bool,
        payload: &[u8],
    ) -> Vec<u8> {
        let total = header_len + payload.len();
        let mut buf = vec![0u8; total];
        let mut ip = Ipv4Packet::new_unchecked(&mut buf[..]);
        ip.set_version_ihl(header_len);
        ip.set_total_len(total as u16);
        ip.set_ident(99);
        ip.set_flags_frag(false, more, offset);
        ip.set_ttl(64);
        ip.set_protocol(PROTO_UDP);
        ip.set_src_addr(CLIENT);
        ip.set_dst_addr(ONLINE);
        ip.payload_mut().copy_from_slice(payload);
        ip.fill_checksum();
        buf
    }

    #[test]
    fn overlaps_drop_the_datagram_and_swallow_the_rest() {
        let mut r = Reassembler::new(ReassemblyConfig::default());
        assert!(r
            .push(&raw_fragment(0, true, &[1; 16]), Duration::ZERO)
            .is_none());
        // 8..24 overlaps 0..16.
        assert!(r
            .push(&raw_fragment(8, true, &[2; 16]), Duration::ZERO)
            .is_none());
        assert_eq!(r.stats().overlaps, 1);
        assert_eq!(r.bytes(), 0);
        // The rest of it, even a completing piece, is discarded.
        assert!(r
            .push(&raw_fragment(16, false, &[3; 4]), Duration::ZERO)
            .is_none());
        assert_eq!(r.stats().discarded, 1);
        assert_eq!(r.stats().reassembled, 0);
        // Until it times out (not counted as expired: already counted as an overlap).
        assert_eq!(r.expire(Duration::from_secs(60)), 0);
        assert!(r.is_empty());
        // Overlap from the other side: a later piece overlapping the next held one.
        assert!(r
            .push(&raw_fragment(16, true, &[1; 16]), Duration::ZERO)
            .is_none());
        assert!(r
            .push(&raw_fragment(8, true, &[1; 16]), Duration::ZERO)
            .is_none());
        assert_eq!(r.stats().overlaps, 2);
    }

    #[test]
    fn malformed_fragments_are_counted_never_panic() {
        let mut r = Reassembler::new(ReassemblyConfig::default());
        // Not a multiple of 8 while more follow.
        assert!(r
            .push(&raw_fragment(0, true, &[0; 12]), Duration::ZERO)
            .is_none());
        // Beyond 64 KiB.
        assert!(r
            .push(&raw_fragment(65528, false, &[0; 16]), Duration::ZERO)
            .is_none());
        // Two different ends.
        assert!(r
            .push(&raw_fragment(8, false, &[0; 8]), Duration::ZERO)
            .is_none());
        assert!(r
            .push(&raw_fragment(8, false, &[0; 16]), Duration::ZERO)
            .is_none());
        // Not a fragment; truncated garbage.
        assert!(r
            .push(&udp_packet(CLIENT, TARGET, 1, 2, b"x"), Duration::ZERO)
            .is_none());
        assert!(r.push(&[0x45, 0, 0], Duration::ZERO).is_none());
        assert_eq!(r.stats().bad, 5);
        assert_eq!(r.stats().reassembled, 0);
    }

    /// A fragment with the largest header (60 bytes) at offset 0 and a last one with a
    /// 20-byte header: each fits 65,535 bytes with its own header, the datagram they make
    /// (first header + 65,512 bytes) does not. Its Total Length used to wrap (to 36) and the
    /// replay stage then sliced the payload past it and panicked.
    #[test]
    fn a_datagram_over_64k_from_mixed_header_lengths_is_bad() {
        let fragment = raw_fragment_with_header;
        let mut first_payload = udp_packet(CLIENT, ONLINE, 40000, 5353, &[0xa5; 65_472 - 8]);
        first_payload.drain(..20);
        let first = fragment(60, 0, true, &first_payload);
        let last = fragment(20, 65_472, false, &[0x5a; 40]);
        let mut r = Reassembler::new(ReassemblyConfig::default());
        assert!(r.push(&first, Duration::ZERO).is_none());
        assert!(r.push(&last, Duration::ZERO).is_none());
        assert_eq!(r.stats().bad, 1);
        assert_eq!(r.stats().reassembled, 0);
        // In the other order, and through the whole replay.
        let mut replay = replay_with(ReplayConfig::default());
        for f in [&last, &first] {
            replay.process(f, f.len(), LinkType::RawIp, Duration::ZERO, &mut |_| {
                panic!("nothing is sent")
            });
        }
        assert_eq!(replay.stats().reassembly.bad, 1);
        // The same pair with a 20-byte first header is a valid datagram of 65,532 bytes.
        let first = fragment(20, 0, true, &first_payload);
        let mut r = Reassembler::new(ReassemblyConfig::default());
        assert!(r.push(&first, Duration::ZERO).is_none());
        assert_eq!(r.push(&last, Duration::ZERO).map(|d| d.len()), Some(65_532));
    }

    #[test]
    fn data_beyond_the_last_fragment_is_bad() {
        let mut r = Reassembler::new(ReassemblyConfig::default());
        assert!(r
            .push(&raw_fragment(16, false, &[0; 8]), Duration::ZERO)
            .is_none());
        assert!(r
            .push(&raw_fragment(24, true, &[0; 8]), Duration::ZERO)
            .is_none());
        assert_eq!(r.stats().bad, 1);
        let mut r = Reassembler::new(ReassemblyConfig::default());
        assert!(r
            .push(&raw_fragment(32, true, &[0; 8]), Duration::ZERO)
            .is_none());
        assert!(r
            .push(&raw_fragment(16, false, &[0; 8]), Duration::ZERO)
            .is_none());
        assert_eq!(r.stats().bad, 1);
    }

    #[test]
    fn too_many_fragments_drop_the_datagram() {
        let config = ReassemblyConfig {
            max_fragments: 4,
            ..ReassemblyConfig::default()
        };
        let mut r = Reassembler::new(config);
        for i in 0..4u16 {
            assert!(r
                .push(&raw_fragment(i * 8, true, &[0; 8]), Duration::ZERO)
                .is_none());
        }
        assert!(r
            .push(&raw_fragment(32, false, &[0; 8]), Duration::ZERO)
            .is_none());
        assert_eq!(r.stats().too_many_fragments, 1);
        assert_eq!(r.stats().reassembled, 0);
        assert_eq!(r.bytes(), 0);
    }

    #[test]
    fn incomplete_datagrams_time_out() {
        let config = ReassemblyConfig {
            timeout: Duration::from_secs(5),
            ..ReassemblyConfig::default()
        };
        let mut r = Reassembler::new(config);
        assert!(r
            .push(&raw_fragment(0, true, &[0; 8]), Duration::from_secs(1))
            .is_none());
        assert_eq!(r.expire(Duration::from_millis(5999)), 0);
        assert_eq!(r.len(), 1);
        assert_eq!(r.expire(Duration::from_secs(6)), 1);
        assert!(r.is_empty());
        assert_eq!((r.stats().expired, r.bytes()), (1, 0));
        // The late last fragment starts a new datagram, which times out too.
        assert!(r
            .push(&raw_fragment(8, false, &[0; 8]), Duration::from_secs(7))
            .is_none());
        assert_eq!(r.expire(Duration::from_secs(12)), 1);
    }

    #[test]
    fn table_and_memory_are_bounded() {
        let config = ReassemblyConfig {
            max_datagrams: 3,
            max_bytes: 0, // acts as the 64 KiB floor
            ..ReassemblyConfig::default()
        };
        let mut r = Reassembler::new(config);
        for ident in 0..10u16 {
            let mut f = raw_fragment(0, true, &[0; 8]);
            let mut ip = Ipv4Packet::new_unchecked(&mut f[..]);
            ip.set_ident(ident);
            ip.fill_checksum();
            assert!(r
                .push(&f, Duration::from_millis(u64::from(ident)))
                .is_none());
            assert!(r.len() <= 3);
        }
        assert_eq!(r.stats().evicted, 7);
        // Two big pieces of different datagrams cannot both be held under the floor.
        let mut r = Reassembler::new(config);
        assert!(r
            .push(&raw_fragment(40000, true, &[0; 8]), Duration::ZERO)
            .is_none());
        let mut other = raw_fragment(40000, true, &[0; 8]);
        Ipv4Packet::new_unchecked(&mut other[..]).set_ident(7);
        assert!(r.push(&other, Duration::from_millis(1)).is_none());
        assert_eq!(r.len(), 1);
        assert_eq!(r.stats().evicted, 1);
        assert!(r.bytes() <= MAX_IP_PACKET);
    }

    fn replay_with(config: ReplayConfig) -> UdpReplay {
        UdpReplay::new(ReplayConfig {
            transfers: crate::tcpcopy::transform::parse_transfers("5353-10.77.0.30:53").unwrap(),
            ..config
        })
    }

    fn run(replay: &mut UdpReplay, frame: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        replay.process(
            frame,
            frame.len(),
            LinkType::Ethernet,
            Duration::ZERO,
            &mut |p| out.push(p.to_vec()),
        );
        out
    }

    #[test]
    fn rewrites_destination_and_checksums() {
        let mut replay = replay_with(ReplayConfig::default());
        let packet = udp_packet(CLIENT, ONLINE, 40000, 5353, b"hello");
        let out = run(&mut replay, &ethernet(&packet));
        assert_eq!(out.len(), 1);
        let ip = Ipv4Packet::new_checked(&out[0][..]).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (CLIENT, TARGET));
        assert!(ip.verify_checksum());
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!((udp.src_port(), udp.dst_port()), (40000, 53));
        assert!(udp.verify_checksum(CLIENT, TARGET));
        assert_eq!(udp.payload(), b"hello");
        let s = replay.stats();
        assert_eq!(
            (s.captured, s.accepted, s.datagrams, s.fragmented),
            (1, 1, 1, 0)
        );
    }

    #[test]
    fn rewrites_the_client_with_c_and_keeps_an_absent_checksum_absent() {
        let transfers = crate::tcpcopy::transform::parse_transfers("5353-10.77.0.30:53").unwrap();
        let clients = ClientAddrs::parse("10.9.9.x", &transfers).unwrap();
        let mut replay = replay_with(ReplayConfig {
            clients: Some(clients.clone()),
            ..ReplayConfig::default()
        });
        let mut packet = udp_packet(CLIENT, ONLINE, 40000, 5353, b"hello");
        UdpPacket::new_unchecked(&mut packet[20..]).set_checksum(0);
        let out = run(&mut replay, &ethernet(&packet));
        let ip = Ipv4Packet::new_checked(&out[0][..]).unwrap();
        assert_eq!(ip.src_addr(), clients.map(CLIENT));
        assert!(ip.verify_checksum());
        assert_eq!(UdpPacket::new_checked(ip.payload()).unwrap().checksum(), 0);
    }

    #[test]
    fn copies_shift_the_source_port() {
        let plan = PortPlan::new(3, 0, 1).unwrap();
        let mut replay = replay_with(ReplayConfig {
            plan,
            ..ReplayConfig::default()
        });
        let packet = udp_packet(CLIENT, ONLINE, 40000, 5353, b"hello");
        let out = run(&mut replay, &ethernet(&packet));
        let ports: Vec<u16> = out
            .iter()
            .map(|p| {
                let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
                let udp = UdpPacket::new_checked(ip.payload()).unwrap();
                assert!(udp.verify_checksum(CLIENT, TARGET));
                udp.src_port()
            })
            .collect();
        let want: Vec<u16> = (0..3).map(|i| plan.port(40000, i)).collect();
        assert_eq!(ports, want);
        assert_eq!(ports[0], 40000);
        assert!(ports[1] != ports[0] && ports[2] != ports[1] && ports[2] != ports[0]);
        assert_eq!(replay.stats().datagrams, 3);
    }

    #[test]
    fn reassembles_then_fragments_to_the_mtu() {
        let mut replay = replay_with(ReplayConfig {
            mtu: 576,
            ..ReplayConfig::default()
        });
        let payload = pattern(2972, 42);
        let packet = udp_packet(CLIENT, ONLINE, 40000, 5353, &payload);
        let captured = fragments_of(&packet, 1500, 0x4242);
        assert_eq!(captured.len(), 3);
        let mut out = Vec::new();
        for f in &captured {
            out.extend(run(&mut replay, &ethernet(f)));
        }
        assert_eq!(out.len(), 6);
        let ident = Ipv4Packet::new_unchecked(&out[0][..]).ident();
        assert_ne!(ident, 0);
        let mut r = Reassembler::new(ReassemblyConfig::default());
        let whole = out
            .iter()
            .find_map(|f| {
                let ip = Ipv4Packet::new_checked(&f[..]).unwrap();
                assert!(f.len() <= 576 && ip.verify_checksum() && ip.ident() == ident);
                assert_eq!(ip.dst_addr(), TARGET);
                r.push(f, Duration::ZERO).map(<[u8]>::to_vec)
            })
            .unwrap();
        let ip = Ipv4Packet::new_checked(&whole[..]).unwrap();
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(udp.verify_checksum(CLIENT, TARGET));
        assert_eq!(udp.dst_port(), 53);
        assert_eq!(udp.payload(), &payload[..]);
        let s = replay.stats();
        assert_eq!(s.reassembly.fragments, 3);
        assert_eq!(s.reassembly.reassembled, 1);
        assert_eq!((s.fragmented, s.fragments_out, s.captured), (1, 6, 3));
    }

    #[test]
    fn drops_are_counted_by_reason() {
        let mut replay = replay_with(ReplayConfig::default());
        let good = udp_packet(CLIENT, ONLINE, 40000, 5353, b"hello");
        let mut other_port = good.clone();
        UdpPacket::new_unchecked(&mut other_port[20..]).set_dst_port(5354);
        let mut tcp = good.clone();
        tcp[9] = 6;
        let mut bad_udp_len = good.clone();
        UdpPacket::new_unchecked(&mut bad_udp_len[20..]).set_len(200);
        let mut arp = ethernet(&good);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        for frame in [
            ethernet(&other_port),
            ethernet(&tcp),
            ethernet(&bad_udp_len),
            arp,
            ethernet(&good[..10]),
            ethernet(&good[..27]),
            vec![1, 2, 3],
        ] {
            assert!(run(&mut replay, &frame).is_empty());
        }
        let s = replay.stats();
        assert_eq!(s.captured, 7);
        assert_eq!(s.accepted, 0);
        assert_eq!(
            (s.no_transfer, s.not_udp, s.bad_udp_len, s.not_ipv4),
            (1, 1, 1, 1)
        );
        assert_eq!(s.truncated + s.bad_total_len, 3, "{s:?}");
        let line = s.line();
        assert!(line.starts_with("udp captured 7 "), "{line}");
        assert!(line.contains("no-transfer 1"), "{line}");
    }

    #[test]
    fn filter_passes_ports_and_fragments() {
        let t = crate::tcpcopy::transform::parse_transfers("5353-10.0.0.9:53").unwrap();
        assert_eq!(
            capture_filter(&t),
            "udp and ((dst port 5353) or (ip[6:2] & 0x1fff != 0))"
        );
        let t = crate::tcpcopy::transform::parse_transfers(
            "10.0.0.5:53-10.0.0.9:53,10.0.0.5:54-10.0.0.9:54",
        )
        .unwrap();
        assert_eq!(
            capture_filter(&t),
            "udp and ((dst host 10.0.0.5 and dst port 53) or (dst host 10.0.0.5 and dst port 54) \
             or (ip[6:2] & 0x1fff != 0 and (dst host 10.0.0.5)))"
        );
        for t in [&t[..], &t[..1]] {
            engine::port::afpacket::compile_filter(&capture_filter(t), 65535).unwrap();
        }
    }

    #[test]
    fn checksum_reference_agrees() {
        // The fragment header checksum equals an independent RFC 1071 sum.
        let packet = udp_packet(CLIENT, TARGET, 1, 2, &pattern(1000, 2));
        for f in fragments_of(&packet, 576, 5) {
            let mut words = 0u32;
            for pair in f[..20].chunks(2) {
                words += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
            }
            while words > 0xFFFF {
                words = (words & 0xFFFF) + (words >> 16);
            }
            assert_eq!(words, 0xFFFF);
            assert_eq!(checksum::checksum(&f[..20]), 0);
        }
    }

    proptest! {
        #[test]
        fn any_fragmentation_in_any_order_reassembles(
            len in 0usize..9000,
            mtu in 68usize..2000,
            seed in any::<u64>(),
        ) {
            let packet = udp_packet(CLIENT, TARGET, 7, 8, &pattern(len, seed as u8));
            let mut frags = fragments_of(&packet, mtu, 1);
            prop_assume!(frags.len() > 1);
            // A deterministic shuffle.
            let mut s = seed | 1;
            for i in (1..frags.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                frags.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut r = Reassembler::new(roomy());
            let mut done = 0;
            for f in &frags {
                if let Some(w) = r.push(f, Duration::ZERO) {
                    prop_assert_eq!(&w[20..], &packet[20..]);
                    done += 1;
                }
            }
            prop_assert_eq!(done, 1);
            prop_assert!(r.is_empty());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                                offset in any::<u16>(), more in any::<bool>()) {
            let mut replay = replay_with(ReplayConfig::default());
            let _ = run(&mut replay, &bytes);
            let _ = run(&mut replay, &ethernet(&bytes));
            let mut frag = raw_fragment(offset & !7, more, &bytes);
            let _ = run(&mut replay, &ethernet(&frag));
            frag[0] = 0x46;
            let _ = run(&mut replay, &ethernet(&frag));
            let mut scratch = Vec::new();
            let _ = fragment(&bytes, 68, 1, &mut scratch, &mut |_| {});
        }
    }
}
