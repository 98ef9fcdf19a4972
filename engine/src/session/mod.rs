//! The TCP replay engine: one [`Session`] per replayed connection and the [`SessionTable`]
//! that owns them, keyed by the target-facing [`FlowKey`].
//!
//! tcpcopy plays the client's part towards the target without a TCP stack of its own
//! (spec §3). This module is sans-IO: it reads no clock (time is passed in as `now`, a
//! monotonic [`Duration`] since an arbitrary epoch) and does no I/O (packets to transmit and
//! route registrations go to an [`Output`]). The same code runs in unit tests on a virtual clock
//! and in the workers.
//!
//! What a session does:
//! - Client sequence numbers are kept as captured; acknowledgement numbers are replaced by the
//!   next byte expected from the target (learned from the target's replies relayed by intercept).
//! - The target's ISN is learned from its SYN-ACK; tcpcopy then sends the third-handshake ACK
//!   itself and acknowledges every response segment with a fabricated ACK.
//! - Requests are paced behind responses: a client segment is held until the target has sent
//!   as many response bytes as the online server had sent when the client sent that segment
//!   (its captured acknowledgement number says how many). When the target stays silent for
//!   [`SessionConfig::pace_idle`] (its response was shorter than the online one), the
//!   difference is written off and the segment goes out. With [`Pacing::NoWait`] (`-W`)
//!   segments go out as captured, limited only by the target's window.
//! - Unacknowledged segments (the SYN included) are retransmitted on an RTO with back-off.
//! - Client FIN and RST are replayed in order; a target RST ends the session; sessions whose
//!   target stays silent for [`SessionConfig::timeout`] are reset and removed.
//! - A SYN that reuses the 4-tuple of a session still open resets the old one at the target
//!   before the new SYN goes out, so port reuse by busy clients never loses the new session.
//!
//! Memory: a [`Session`] is a compact fixed-size entry (times are `u32` millisecond ticks,
//! flags are bits, the queue is three slot indices into the table's segment pool); see
//! [`SessionTable`] for the table's layout and [`SessionTable::memory`] for the figures.

mod index;
mod lists;
pub mod module;
mod pool;
mod prefetch;
mod table;
mod wheel;

pub use module::{LineAuth, SessionModule};
pub use table::{ClientPacket, SessionTable, TableMemory};

use crate::flow::FlowKey;
use crate::wire::tcp::TcpRepr;
use crate::wire::{Ipv4Packet, SeqNum, TcpFlags, TcpPacket};
use pool::{SegmentPool, Stored, NIL};
use std::net::Ipv4Addr;
use std::time::Duration;

/// Where a session's decisions go.
pub trait Output {
    /// Transmit one IPv4 packet (IP header first, checksums filled) towards the target.
    fn transmit(&mut self, packet: &[u8]);
    /// Ask every intercept to route the target's replies for `key` to us (CLIENT_ADD).
    fn register(&mut self, key: FlowKey);
    /// Tell the intercepts that `key` is finished (CLIENT_DEL).
    fn unregister(&mut self, key: FlowKey);
    /// The reply latency of one request: from the moment its first data segment was sent to
    /// the target until the first byte of the target's answer arrived (microsecond
    /// resolution). Called once per request/answer turn; ignored by default.
    fn reply_latency(&mut self, latency: Duration) {
        let _ = latency;
    }
}

/// Request pacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// Hold each request until the target has answered the previous one (the default).
    WaitForResponse,
    /// Send as captured (`-W`), limited only by the target's receive window.
    NoWait,
}

/// Tunables of the replay engine.
///
/// Times are kept at millisecond resolution (a timer may fire up to 1 ms early relative to a
/// sub-millisecond `now`) and are capped at 2^30 ms (12 days).
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Request pacing.
    pub pacing: Pacing,
    /// How long the target must stay silent before a held request is released although the
    /// target sent fewer response bytes than the online server did.
    pub pace_idle: Duration,
    /// First retransmission timeout.
    pub rto_initial: Duration,
    /// Largest retransmission timeout (back-off doubles up to this).
    pub rto_max: Duration,
    /// Retransmissions of one segment before the session is given up (at most 255).
    pub max_retries: u32,
    /// `-t`: a session whose target sent nothing for this long is reset and removed when it
    /// still has something to send or has not sent data yet.
    pub timeout: Duration,
    /// `-k`: an idle session that has exchanged data is kept this long after the last reply.
    pub keepalive: Duration,
    /// How long a closed session lingers to absorb late duplicates before it is removed.
    pub linger: Duration,
    /// Most client segments one session may queue (sent-unacknowledged plus held; at most
    /// 65535).
    pub max_queued_segments: usize,
    /// Most packet bytes one session may queue.
    pub max_queued_bytes: usize,
    /// Most sessions in one table (below 2^31). When it is full, a new SYN evicts the oldest
    /// idle session (closed ones first; counted in [`SessionStats::evicted`]) or, when every
    /// session is busy, is dropped ([`SessionStats::table_full`]). A new SYN is dropped the
    /// same way when fewer than a quarter of the segment pool's slots are free.
    pub max_sessions: usize,
    /// 2 KiB slots of the table's segment pool (MTU-sized packets; packets beyond 2 KiB take a
    /// chain of them). Allocated once, when the table is made; pages stay untouched until used.
    pub pool_segments: usize,
    /// 256-byte slots of the segment pool, for packets up to 224 bytes (handshake and control
    /// segments, short requests); when they run out such packets take 2 KiB slots.
    pub pool_small_segments: usize,
    /// Replay sessions captured mid-stream (no SYN seen) with a fabricated handshake, and
    /// rebuild a session the target reset while client data was still to be delivered
    /// (spec §3.5, §3.10). `false` is `-O`: only sessions seen from their SYN are replayed.
    pub mid_stream: bool,
    /// `-D`: the MSS option of fabricated SYNs.
    pub fake_syn_mss: u16,
    /// Most times one session is rebuilt after target resets (a target that resets every
    /// connection must not be hammered; at most 15).
    pub max_reconstructions: u8,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            pacing: Pacing::WaitForResponse,
            pace_idle: Duration::from_millis(100),
            rto_initial: Duration::from_millis(200),
            rto_max: Duration::from_secs(3),
            max_retries: 8,
            timeout: Duration::from_secs(600),
            keepalive: Duration::from_secs(720),
            linger: Duration::from_secs(2),
            max_queued_segments: 8192,
            max_queued_bytes: 32 << 20,
            max_sessions: 1 << 20,
            pool_segments: 1 << 16,
            pool_small_segments: 1 << 18,
            mid_stream: true,
            fake_syn_mss: 1460,
            max_reconstructions: 3,
        }
    }
}

/// Counters of the replay engine; every lost-session cause has one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Sessions created from a captured SYN.
    pub created: u64,
    /// Sessions removed (for any reason).
    pub removed: u64,
    /// Sessions whose handshake with the target completed (SYN-ACK seen).
    pub established: u64,
    /// Sessions in which the target sent response data (the first response byte seen).
    pub answered: u64,
    /// Sessions closed by both FINs.
    pub closed: u64,
    /// Sessions ended by a client RST.
    pub client_resets: u64,
    /// Sessions ended by a target RST.
    pub target_resets: u64,
    /// Sessions removed by `-t`/`-k`.
    pub timed_out: u64,
    /// Sessions given up after too many retransmissions.
    pub gave_up: u64,
    /// Open sessions reset because their client reused the 4-tuple with a new SYN.
    pub port_reuse_resets: u64,
    /// Closed sessions replaced by a new SYN on the same 4-tuple.
    pub port_reuse_replaced: u64,
    /// New SYNs dropped because the table was full of busy sessions, or because fewer than a
    /// quarter of the segment pool's slots were free (the rest is kept for the data of the
    /// sessions already replaying, so a SYN flood cannot starve them).
    pub table_full: u64,
    /// Sessions evicted (the oldest idle one, reset at the target when still open) to make
    /// room for a new SYN in a full table.
    pub evicted: u64,
    /// Client segments with no session that could not start one (no payload, `-O`, or the
    /// table or pool was full).
    pub client_no_session: u64,
    /// Sessions started from a segment captured mid-stream, with a fabricated SYN (also
    /// counted in `created`).
    pub mid_stream_created: u64,
    /// Sessions rebuilt with a fabricated SYN after the target reset them while client data
    /// was still to be delivered.
    pub reconstructed: u64,
    /// Mid-stream sessions the protocol module refused.
    pub module_vetoed: u64,
    /// Mid-stream sessions the protocol module put bytes in front of.
    pub module_prefixes: u64,
    /// Client SYN retransmissions absorbed.
    pub client_syn_retransmits: u64,
    /// Client data retransmissions absorbed (already queued or sent).
    pub client_retransmits: u64,
    /// Client pure ACKs absorbed (tcpcopy makes its own).
    pub client_acks_absorbed: u64,
    /// Client segments that filled a hole behind data already sent (the client retransmitted
    /// what the capture never saw); sent at once.
    pub client_hole_fills: u64,
    /// Client segments dropped because the session's queue was full.
    pub queue_full: u64,
    /// Client segments (or SYNs) dropped because the table's segment pool was exhausted.
    pub pool_exhausted: u64,
    /// Client segments longer than a 2 KiB pool slot (GRO), stored as a chain of slots.
    pub chained_segments: u64,
    /// Client segments sent to the target.
    pub sent_segments: u64,
    /// Client segments with payload sent to the target.
    pub sent_data: u64,
    /// SYNs sent (first transmissions).
    pub sent_syn: u64,
    /// FINs sent.
    pub sent_fin: u64,
    /// RSTs sent (replayed and fabricated).
    pub sent_rst: u64,
    /// Fabricated ACKs sent.
    pub sent_acks: u64,
    /// Retransmissions to the target (SYNs included).
    pub retransmits: u64,
    /// Held requests released by the silence rule.
    pub pace_releases: u64,
    /// Replies received for a known session.
    pub responses: u64,
    /// Replies with payload.
    pub response_data: u64,
    /// Replies that matched no session.
    pub response_no_session: u64,
    /// Handshakes that met an older connection still open at the target on the same 4-tuple
    /// (its challenge ACK instead of a SYN-ACK): that one was reset and the SYN sent again.
    pub stale_target_resets: u64,
    /// SYN-ACKs whose acknowledgement did not match our SYN (answered with RST).
    pub bad_synack: u64,
}

impl SessionStats {
    /// Adds `other`'s counts to these (to sum over workers). The destructuring makes a new
    /// counter a compile error here until it is summed too.
    pub fn add(&mut self, other: &SessionStats) {
        let SessionStats {
            created,
            removed,
            established,
            answered,
            closed,
            client_resets,
            target_resets,
            timed_out,
            gave_up,
            port_reuse_resets,
            port_reuse_replaced,
            table_full,
            evicted,
            client_no_session,
            mid_stream_created,
            reconstructed,
            module_vetoed,
            module_prefixes,
            client_syn_retransmits,
            client_retransmits,
            client_acks_absorbed,
            client_hole_fills,
            queue_full,
            pool_exhausted,
            chained_segments,
            sent_segments,
            sent_data,
            sent_syn,
            sent_fin,
            sent_rst,
            sent_acks,
            retransmits,
            pace_releases,
            responses,
            response_data,
            response_no_session,
            stale_target_resets,
            bad_synack,
        } = *other;
        self.created += created;
        self.removed += removed;
        self.established += established;
        self.answered += answered;
        self.closed += closed;
        self.client_resets += client_resets;
        self.target_resets += target_resets;
        self.timed_out += timed_out;
        self.gave_up += gave_up;
        self.port_reuse_resets += port_reuse_resets;
        self.port_reuse_replaced += port_reuse_replaced;
        self.table_full += table_full;
        self.evicted += evicted;
        self.client_no_session += client_no_session;
        self.mid_stream_created += mid_stream_created;
        self.reconstructed += reconstructed;
        self.module_vetoed += module_vetoed;
        self.module_prefixes += module_prefixes;
        self.client_syn_retransmits += client_syn_retransmits;
        self.client_retransmits += client_retransmits;
        self.client_acks_absorbed += client_acks_absorbed;
        self.client_hole_fills += client_hole_fills;
        self.queue_full += queue_full;
        self.pool_exhausted += pool_exhausted;
        self.chained_segments += chained_segments;
        self.sent_segments += sent_segments;
        self.sent_data += sent_data;
        self.sent_syn += sent_syn;
        self.sent_fin += sent_fin;
        self.sent_rst += sent_rst;
        self.sent_acks += sent_acks;
        self.retransmits += retransmits;
        self.pace_releases += pace_releases;
        self.responses += responses;
        self.response_data += response_data;
        self.response_no_session += response_no_session;
        self.stale_target_resets += stale_target_resets;
        self.bad_synack += bad_synack;
    }
}

/// A captured client segment, parsed, as the session engine needs it.
#[derive(Debug, Clone, Copy)]
pub struct ClientSegment {
    /// Sequence number as captured.
    pub seq: SeqNum,
    /// Acknowledgement number as captured (the online server's stream).
    pub ack: SeqNum,
    /// TCP flags.
    pub flags: TcpFlags,
    /// Payload bytes.
    pub payload_len: u32,
    /// Receive window as captured.
    pub window: u16,
    /// Timestamps option (TSval, TSecr) when present.
    pub timestamps: Option<(u32, u32)>,
    /// Window scale option (SYN only).
    pub window_scale: Option<u8>,
}

impl ClientSegment {
    /// Parses the fields out of an IPv4 packet that holds a TCP segment. `None` if it does not.
    pub fn parse(ip_packet: &[u8]) -> Option<ClientSegment> {
        let ip = Ipv4Packet::new_checked(ip_packet).ok()?;
        let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
        Some(ClientSegment {
            seq: tcp.seq_number(),
            ack: tcp.ack_number(),
            flags: tcp.flags(),
            payload_len: tcp.payload_len() as u32,
            window: tcp.window_len(),
            timestamps: tcp.timestamps(),
            window_scale: tcp.window_scale(),
        })
    }

    fn seq_len(&self) -> u32 {
        self.payload_len
            + u32::from(self.flags.contains(TcpFlags::SYN))
            + u32::from(self.flags.contains(TcpFlags::FIN))
    }
}

/// A reply of the target, as relayed by intercept.
#[derive(Debug, Clone, Copy)]
pub struct Response {
    /// The session it belongs to (client = reply destination, target = reply source).
    pub key: FlowKey,
    /// Sequence number (target's stream).
    pub seq: SeqNum,
    /// Acknowledgement number (client's stream).
    pub ack: SeqNum,
    /// TCP flags.
    pub flags: TcpFlags,
    /// Advertised window (unscaled field).
    pub window: u16,
    /// Payload length of the reply.
    pub payload_len: u32,
    /// Timestamps option when present.
    pub timestamps: Option<(u32, u32)>,
    /// Window scale option (SYN-ACK only).
    pub window_scale: Option<u8>,
}

/// Milliseconds since the clock's epoch, wrapping at 2^32 and compared like sequence numbers
/// (right for spans below 2^31 ms, 24 days; configured times are capped at 2^30 ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Tick(u32);

impl Tick {
    fn from_duration(now: Duration) -> Tick {
        Tick(now.as_millis() as u32)
    }

    fn add(self, ms: u32) -> Tick {
        Tick(self.0.wrapping_add(ms))
    }

    /// True when `self` is at or after `other`.
    fn reached(self, other: Tick) -> bool {
        self.0.wrapping_sub(other.0) as i32 >= 0
    }

    fn later(self, other: Tick) -> Tick {
        if self.reached(other) {
            self
        } else {
            other
        }
    }

    fn earlier(self, other: Tick) -> Tick {
        if self.reached(other) {
            other
        } else {
            self
        }
    }

    /// Milliseconds from `earlier` to `self` (0 when `earlier` is later).
    fn since(self, earlier: Tick) -> u32 {
        (self.0.wrapping_sub(earlier.0) as i32).max(0) as u32
    }
}

/// SYNs sent again at once after resetting a stale connection at the target.
const STALE_RESENDS: u8 = 3;

/// Longest configured time, in ms.
const MAX_SPAN_MS: u128 = 1 << 30;

fn millis(d: Duration) -> u32 {
    d.as_millis().min(MAX_SPAN_MS) as u32
}

/// The configuration in the units the sessions use.
#[derive(Debug, Clone)]
struct Limits {
    pacing: Pacing,
    pace_idle: u32,
    rto_initial: u32,
    rto_max: u32,
    max_retries: u8,
    timeout: u32,
    keepalive: u32,
    linger: u32,
    max_queued_segments: u16,
    max_queued_bytes: u32,
    mid_stream: bool,
    fake_syn_mss: u16,
    max_reconstructions: u8,
}

impl Limits {
    fn new(config: &SessionConfig) -> Limits {
        Limits {
            pacing: config.pacing,
            pace_idle: millis(config.pace_idle),
            rto_initial: millis(config.rto_initial),
            rto_max: millis(config.rto_max),
            max_retries: config.max_retries.min(255) as u8,
            timeout: millis(config.timeout),
            keepalive: millis(config.keepalive),
            linger: millis(config.linger),
            max_queued_segments: config.max_queued_segments.min(u16::MAX as usize) as u16,
            max_queued_bytes: config.max_queued_bytes.min(u32::MAX as usize) as u32,
            mid_stream: config.mid_stream,
            fake_syn_mss: config.fake_syn_mss,
            max_reconstructions: config.max_reconstructions.min(15),
        }
    }

    /// The retransmission timeout after `retries` back-offs.
    fn rto(&self, retries: u8) -> u32 {
        if retries == 0 {
            return self.rto_initial;
        }
        let rto = u64::from(self.rto_initial) << u32::from(retries).min(32);
        rto.min(u64::from(self.rto_max.max(self.rto_initial))) as u32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum State {
    /// SYN sent, waiting for the target's SYN-ACK.
    SynSent,
    /// Handshake done.
    Established,
    /// Over (both FINs, an RST, a timeout): lingering until its alarm.
    Closed,
}

// Session flag bits.
/// The client's SYN offered window scaling.
const SYN_WINDOW_SCALE: u16 = 1 << 0;
/// The client's SYN carried timestamps.
const SYN_TIMESTAMPS: u16 = 1 << 1;
/// `online_base` is known.
const ONLINE_BASE: u16 = 1 << 2;
/// Timestamps were negotiated with the target.
const TIMESTAMPS_ON: u16 = 1 << 3;
const CLIENT_FIN_SENT: u16 = 1 << 4;
const TARGET_FIN: u16 = 1 << 5;
/// Client data has been sent to the target.
const SENT_DATA: u16 = 1 << 6;
/// Retransmitting holes: each partial ACK retransmits the next unacknowledged segment.
const RECOVERING: u16 = 1 << 7;
/// The alarm is a retransmission deadline.
const RTO_ARMED: u16 = 1 << 8;
/// Request data was sent and no answer byte has arrived since (reply latency running).
const AWAITING_REPLY: u16 = 1 << 9;
/// `peer_window` is the SYN-ACK's, which is never scaled (RFC 7323 §2.2).
const WINDOW_UNSCALED: u16 = 1 << 10;
/// The handshake was fabricated (mid-stream capture or reconstruction): the target saw no
/// window scale, so client segments go out with the window forced to 65535.
const FAKE_SYN: u16 = 1 << 11;
/// The target has sent response data in this session (counted once in
/// [`SessionStats::answered`]). Bits 12..=14 are the table's [`Place`].
const ANSWERED: u16 = 1 << 15;

/// Where the table has filed a session (bits 12..15 of the flags; the table's business).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Nowhere (being handled, or free).
    None,
    /// In the timer wheel (a busy session: something queued or the handshake pending).
    Wheel,
    /// In the FIFO of idle sessions that exchanged data (expire after `keepalive`).
    IdleKept,
    /// In the FIFO of idle sessions that sent no data yet (expire after `timeout`).
    IdleFresh,
    /// In the FIFO of closed sessions (removed after `linger`).
    Closed,
    /// A free entry of the table.
    Free,
}

const PLACE_SHIFT: u16 = 12;
const PLACE_MASK: u16 = 0x7 << PLACE_SHIFT;

/// A session's queue of client segments in sequence order: a singly linked list of pool slots.
/// `sent` segments from the head are sent and not yet acknowledged; `unsent` is the first one
/// after them.
#[derive(Debug, Clone, Copy)]
struct SegQueue {
    head: u32,
    tail: u32,
    unsent: u32,
    len: u16,
    sent: u16,
}

impl SegQueue {
    const EMPTY: SegQueue = SegQueue {
        head: NIL,
        tail: NIL,
        unsent: NIL,
        len: 0,
        sent: 0,
    };
}

/// One replayed connection: a compact fixed-size entry of its table (104 bytes).
#[derive(Debug)]
pub struct Session {
    key: FlowKey,
    client_isn: SeqNum,
    /// The online server's first sequence byte (its ISN + 1), from the client's first ACK
    /// (valid with [`ONLINE_BASE`]).
    online_base: SeqNum,
    /// The target's first sequence byte (its ISN + 1), from its SYN-ACK.
    target_base: SeqNum,
    /// Response bytes written off by the silence rule (target answered shorter than online).
    pace_credit: u32,
    /// Next byte expected from the target: the acknowledgement number we send.
    rcv_nxt: SeqNum,
    /// Oldest client byte the target has not acknowledged.
    snd_una: SeqNum,
    /// Next client byte after the last one sent.
    snd_nxt: SeqNum,
    /// End of the highest queued client sequence (to recognise client retransmissions).
    queued_end: SeqNum,
    ts_recent: u32,
    ts_val: u32,
    queued_bytes: u32,
    last_response_at: Tick,
    last_send_at: Tick,
    /// The retransmission deadline (with [`RTO_ARMED`]) or, once closed, the end of the linger.
    alarm: Tick,
    /// When the request being answered was sent (µs, wrapping; with [`AWAITING_REPLY`]).
    request_sent_us: u32,
    /// The deadline the table's timer wheel holds for this session (with [`Place::Wheel`]).
    scheduled: Tick,
    queue: SegQueue,
    client_window: u16,
    ip_ident: u16,
    /// Target window as advertised (unscaled).
    peer_window: u16,
    flags: u16,
    state: State,
    /// The target's window scale (low nibble, at most 14) and the times this session was
    /// rebuilt after a target reset (high nibble, at most 15).
    scale_restarts: u8,
    retries: u8,
    /// Duplicate ACKs in a row (fast retransmit at 3; saturates); during the handshake, SYNs
    /// sent again after resetting a stale connection at the target.
    dupacks: u8,
}

/// What the table should do with a session after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Keep,
    Remove,
}

/// What a session event works with: the table's state that is not the session.
struct Ctx<'a> {
    limits: &'a Limits,
    stats: &'a mut SessionStats,
    pool: &'a mut SegmentPool,
    /// Scratch space for fabricated and gathered packets, reused across calls.
    scratch: &'a mut Vec<u8>,
    out: &'a mut dyn Output,
    now: Tick,
    now_us: u32,
}

impl Session {
    fn new(key: FlowKey, syn: &ClientSegment, now: Tick) -> Session {
        let mut flags = 0;
        if syn.window_scale.is_some() {
            flags |= SYN_WINDOW_SCALE;
        }
        if syn.timestamps.is_some() {
            flags |= SYN_TIMESTAMPS;
        }
        Session {
            key,
            client_isn: syn.seq,
            online_base: SeqNum(0),
            target_base: SeqNum(0),
            pace_credit: 0,
            rcv_nxt: SeqNum(0),
            snd_una: syn.seq,
            snd_nxt: syn.seq,
            queued_end: syn.seq,
            ts_recent: 0,
            ts_val: syn.timestamps.map_or(0, |t| t.0),
            queued_bytes: 0,
            last_response_at: now,
            last_send_at: now,
            alarm: now,
            request_sent_us: 0,
            scheduled: now,
            queue: SegQueue::EMPTY,
            client_window: syn.window,
            ip_ident: 0,
            peer_window: 0,
            flags,
            state: State::SynSent,
            scale_restarts: 0,
            retries: 0,
            dupacks: 0,
        }
    }

    fn peer_window_scale(&self) -> u8 {
        self.scale_restarts & 0x0f
    }

    fn set_peer_window_scale(&mut self, scale: u8) {
        self.scale_restarts = (self.scale_restarts & 0xf0) | scale.min(14);
    }

    /// Times this session was rebuilt after a target reset.
    fn restarts(&self) -> u8 {
        self.scale_restarts >> 4
    }

    fn set_restarts(&mut self, restarts: u8) {
        self.scale_restarts = (self.scale_restarts & 0x0f) | (restarts.min(15) << 4);
    }

    #[inline]
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    #[inline]
    fn set(&mut self, flag: u16, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    fn place(&self) -> Place {
        match (self.flags & PLACE_MASK) >> PLACE_SHIFT {
            0 => Place::None,
            1 => Place::Wheel,
            2 => Place::IdleKept,
            3 => Place::IdleFresh,
            4 => Place::Closed,
            _ => Place::Free,
        }
    }

    fn set_place(&mut self, place: Place) {
        let bits = match place {
            Place::None => 0,
            Place::Wheel => 1,
            Place::IdleKept => 2,
            Place::IdleFresh => 3,
            Place::Closed => 4,
            Place::Free => 5,
        };
        self.flags = (self.flags & !PLACE_MASK) | (bits << PLACE_SHIFT);
    }

    /// Where the session belongs: in the wheel while busy, else in one of the FIFOs.
    fn wanted_place(&self) -> Place {
        match self.state {
            State::Closed => Place::Closed,
            State::Established if self.queue.len == 0 => {
                if self.has(SENT_DATA) {
                    Place::IdleKept
                } else {
                    Place::IdleFresh
                }
            }
            _ => Place::Wheel,
        }
    }

    /// The session's key.
    pub fn key(&self) -> FlowKey {
        self.key
    }

    /// True once the target's SYN-ACK was seen and the session is not over.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// True when the session is over and only lingers.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Client segments queued (sent-unacknowledged plus held).
    pub fn queued(&self) -> usize {
        usize::from(self.queue.len)
    }

    fn peer_window(&self) -> u32 {
        if self.has(WINDOW_UNSCALED) {
            u32::from(self.peer_window)
        } else {
            u32::from(self.peer_window) << self.peer_window_scale()
        }
    }

    /// Appends `id` (the last in sequence order) to the queue.
    fn push_back(&mut self, id: u32, pool: &mut SegmentPool) {
        if self.queue.tail == NIL {
            self.queue.head = id;
        } else {
            pool.set_next(self.queue.tail, id);
        }
        self.queue.tail = id;
        if self.queue.unsent == NIL && self.queue.sent == self.queue.len {
            self.queue.unsent = id;
        }
        self.queue.len += 1;
    }

    /// Takes the head segment off the queue and frees it; the caller fixes `sent`.
    fn pop_front(&mut self, pool: &mut SegmentPool) {
        let id = self.queue.head;
        debug_assert!(id != NIL);
        let next = pool.next(id);
        self.queued_bytes -= pool.len(id) as u32;
        if self.queue.unsent == id {
            self.queue.unsent = next;
        }
        self.queue.head = next;
        if next == NIL {
            self.queue.tail = NIL;
        }
        self.queue.len -= 1;
        pool.free(id);
    }

    /// Returns every queued segment to the pool.
    fn free_queue(&mut self, pool: &mut SegmentPool) {
        let mut id = self.queue.head;
        while id != NIL {
            let next = pool.next(id);
            pool.free(id);
            id = next;
        }
        self.queue = SegQueue::EMPTY;
        self.queued_bytes = 0;
    }

    /// Queues a captured client segment (SYN excluded) and sends what may be sent.
    fn on_client(&mut self, packet: &[u8], seg: &ClientSegment, cx: &mut Ctx<'_>) -> Verdict {
        if self.state == State::Closed {
            return Verdict::Keep;
        }
        if seg.flags.contains(TcpFlags::ACK) && !self.has(ONLINE_BASE) {
            self.online_base = seg.ack;
            self.flags |= ONLINE_BASE;
        }
        self.client_window = seg.window;
        if let Some((tsval, _)) = seg.timestamps {
            if tsval.wrapping_sub(self.ts_val) as i32 > 0 {
                self.ts_val = tsval;
            }
        }
        let is_rst = seg.flags.contains(TcpFlags::RST);
        let seq_len = seg.seq_len();
        if seq_len == 0 && !is_rst {
            cx.stats.client_acks_absorbed += 1;
            return Verdict::Keep;
        }
        let end = seg.seq.add(seq_len);
        if !is_rst && self.is_duplicate(seg.seq, end, cx.pool) {
            cx.stats.client_retransmits += 1;
            return Verdict::Keep;
        }
        if self.queue.len >= cx.limits.max_queued_segments
            || self.queued_bytes as usize + packet.len() > cx.limits.max_queued_bytes as usize
        {
            cx.stats.queue_full += 1;
            return Verdict::Keep;
        }
        let Some((id, stored)) = cx.pool.alloc(packet, seg.seq, seq_len, seg.flags, seg.ack) else {
            cx.stats.pool_exhausted += 1;
            return Verdict::Keep;
        };
        if stored == Stored::Chained {
            cx.stats.chained_segments += 1;
        }
        self.queued_bytes += cx.pool.len(id) as u32;
        // In sequence order: captures can reorder, and a segment lost before the capture point
        // comes back later as the client's retransmission, behind data we already sent.
        let floor = if is_rst { self.queue.sent } else { 0 };
        // In order (the common case) when it starts at or after the end of all queued so
        // far: decided without reading the tail's slot.
        let tail = self.queue.tail;
        let at = if tail == NIL
            || !seg.seq.before(self.queued_end)
            || self.queue.len == floor
            || !cx.pool.seq(tail).after(seg.seq)
        {
            let at = self.queue.len;
            self.push_back(id, cx.pool);
            at
        } else {
            self.insert_sorted(id, seg.seq, floor, cx.pool)
        };
        if end.after(self.queued_end) {
            self.queued_end = end;
        }
        if at < self.queue.sent {
            // It fills a hole in what the target has: send it now, whatever the pacing.
            self.queue.sent += 1;
            cx.stats.client_hole_fills += 1;
            if self.state == State::Established {
                self.send_segment(id, false, cx);
                cx.stats.sent_segments += 1;
                cx.stats.sent_data += 1;
                self.last_send_at = cx.now;
            }
        }
        self.pump(cx)
    }

    /// Inserts `id` after the last queued segment whose sequence is not after `seq`, but not
    /// before position `floor`. Returns its position. The rare path (reordered captures).
    fn insert_sorted(&mut self, id: u32, seq: SeqNum, floor: u16, pool: &mut SegmentPool) -> u16 {
        // Position = max(floor, 1 + last index whose seq is not after `seq`).
        let mut last_not_after: Option<(u16, u32)> = None;
        let mut floor_prev = NIL;
        let mut node = self.queue.head;
        let mut i = 0u16;
        while node != NIL {
            if !pool.seq(node).after(seq) {
                last_not_after = Some((i, node));
            }
            if i + 1 == floor {
                floor_prev = node;
            }
            node = pool.next(node);
            i += 1;
        }
        let (at, prev) = match last_not_after {
            Some((j, n)) if j + 1 >= floor => (j + 1, n),
            _ => (floor, floor_prev),
        };
        if prev == NIL {
            pool.set_next(id, self.queue.head);
            self.queue.head = id;
        } else {
            let next = pool.next(prev);
            pool.set_next(id, next);
            pool.set_next(prev, id);
        }
        if pool.next(id) == NIL {
            self.queue.tail = id;
        }
        if at == self.queue.sent {
            self.queue.unsent = id;
        }
        self.queue.len += 1;
        at
    }

    /// True when `[seq, end)` was already acknowledged by the target or is queued already
    /// (a client retransmission of something we have).
    fn is_duplicate(&self, seq: SeqNum, end: SeqNum, pool: &SegmentPool) -> bool {
        if self.state != State::SynSent && !end.after(self.snd_una) {
            return true;
        }
        if end.after(self.queued_end) {
            return false;
        }
        let len = end.diff(seq).max(0) as u32;
        // The last queued segment that does not start after `seq` decides.
        let mut last = NIL;
        let mut node = self.queue.head;
        while node != NIL {
            if !pool.seq(node).after(seq) {
                last = node;
            }
            node = pool.next(node);
        }
        last != NIL && pool.seq(last) == seq && pool.seq_len(last) >= len
    }

    /// Sends every queued segment that pacing and the target's window allow.
    fn pump(&mut self, cx: &mut Ctx<'_>) -> Verdict {
        if self.state != State::Established {
            return Verdict::Keep;
        }
        while self.queue.sent < self.queue.len {
            let id = self.queue.unsent;
            let flags = cx.pool.flags(id);
            if cx.limits.pacing == Pacing::WaitForResponse
                && !self.paced_ok(flags, cx.pool.online_ack(id))
            {
                break;
            }
            let seq_len = cx.pool.seq_len(id);
            let in_flight = self.snd_nxt.diff(self.snd_una).max(0) as u32;
            if seq_len > 0 && self.queue.sent > 0 && in_flight + seq_len > self.peer_window() {
                break;
            }
            let is_rst = flags.contains(TcpFlags::RST);
            let is_fin = flags.contains(TcpFlags::FIN);
            let has_data = seq_len > u32::from(is_fin);
            let end = cx.pool.end(id);
            self.send_segment(id, is_rst, cx);
            cx.stats.sent_segments += 1;
            if has_data {
                cx.stats.sent_data += 1;
                self.flags |= SENT_DATA;
                if !self.has(AWAITING_REPLY) {
                    self.flags |= AWAITING_REPLY;
                    self.request_sent_us = cx.now_us;
                }
            }
            self.last_send_at = cx.now;
            if is_rst {
                cx.stats.sent_rst += 1;
                cx.stats.client_resets += 1;
                self.close(cx);
                return Verdict::Keep;
            }
            if is_fin {
                cx.stats.sent_fin += 1;
                self.flags |= CLIENT_FIN_SENT;
            }
            if end.after(self.snd_nxt) {
                self.snd_nxt = end;
            }
            self.queue.sent += 1;
            self.queue.unsent = cx.pool.next(id);
            if !self.has(RTO_ARMED) {
                self.alarm = cx.now.add(cx.limits.rto(self.retries));
                self.flags |= RTO_ARMED;
            }
        }
        Verdict::Keep
    }

    /// True when the target has sent as many response bytes as the online server had when the
    /// client sent a segment with these flags and acknowledgement number (less what the
    /// silence rule wrote off).
    fn paced_ok(&self, flags: TcpFlags, online_ack: SeqNum) -> bool {
        if !flags.contains(TcpFlags::ACK) || !self.has(ONLINE_BASE) {
            return true;
        }
        let needed = online_ack.diff(self.online_base).max(0) as u32;
        let have = self.rcv_nxt.diff(self.target_base).max(0) as u32;
        needed <= have.saturating_add(self.pace_credit)
    }

    /// Writes queued segment `id` out with the current acknowledgement and timestamps.
    fn send_segment(&mut self, id: u32, reset: bool, cx: &mut Ctx<'_>) {
        if cx.pool.is_chained(id) {
            // Longer than a slot: rewrite a gathered copy (every send rewrites from scratch).
            let mut buf = std::mem::take(cx.scratch);
            cx.pool.gather(id, &mut buf);
            let new_seq = self.rewrite(&mut buf, reset);
            cx.out.transmit(&buf);
            *cx.scratch = buf;
            if let Some(seq) = new_seq {
                cx.pool.set_seq(id, seq);
            }
        } else {
            let packet = cx.pool.packet_mut(id);
            let new_seq = self.rewrite(packet, reset);
            cx.out.transmit(packet);
            if let Some(seq) = new_seq {
                cx.pool.set_seq(id, seq);
            }
        }
    }

    /// Rewrites a queued packet for sending; returns its new sequence number when an RST had
    /// to move to our next byte.
    fn rewrite(&mut self, packet: &mut [u8], reset: bool) -> Option<SeqNum> {
        let rcv_nxt = self.rcv_nxt;
        let snd_nxt = self.snd_nxt;
        let timestamps_on = self.has(TIMESTAMPS_ON);
        let fake_syn = self.has(FAKE_SYN);
        let ts_recent = self.ts_recent;
        let mut ts_max = self.ts_val;
        let mut new_seq = None;
        {
            let mut ip = Ipv4Packet::new_unchecked(&mut packet[..]);
            self.ip_ident = ip.ident();
            let mut tcp = TcpPacket::new_unchecked(&mut ip.payload_mut()[..]);
            if tcp.flags().contains(TcpFlags::ACK) {
                tcp.rewrite_ack_number(rcv_nxt);
            }
            if fake_syn && !tcp.flags().contains(TcpFlags::RST) {
                tcp.rewrite_window(u16::MAX);
            }
            if reset && tcp.seq_number().before(snd_nxt) {
                // An RST must fall inside the target's window: send it at our next byte.
                tcp.set_seq_number(snd_nxt);
                new_seq = Some(snd_nxt);
            }
            if timestamps_on {
                if let Some((tsval, _)) = tcp.timestamps() {
                    // TSval must never go backwards at the target (PAWS), even though held
                    // segments were captured before later ones we already answered with.
                    let tsval = if tsval.wrapping_sub(ts_max) as i32 > 0 {
                        tsval
                    } else {
                        ts_max
                    };
                    ts_max = tsval;
                    tcp.rewrite_timestamps(tsval, ts_recent);
                }
            }
        }
        if reset {
            let mut ip = Ipv4Packet::new_unchecked(&mut packet[..]);
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            let mut tcp = TcpPacket::new_unchecked(&mut ip.payload_mut()[..]);
            tcp.fill_checksum(src, dst);
        }
        strip_sack(packet);
        self.ts_val = ts_max;
        new_seq
    }

    /// Builds and sends a fabricated segment from the client's side.
    fn fabricate(&mut self, flags: TcpFlags, seq: SeqNum, cx: &mut Ctx<'_>) {
        self.ip_ident = self.ip_ident.wrapping_add(1);
        let with_ts = self.has(TIMESTAMPS_ON) && !flags.contains(TcpFlags::RST);
        let repr = TcpRepr {
            src_port: self.key.client_port,
            dst_port: self.key.target_port,
            seq,
            ack: if flags.contains(TcpFlags::ACK) {
                self.rcv_nxt
            } else {
                SeqNum(0)
            },
            flags,
            window: if flags.contains(TcpFlags::RST) {
                0
            } else if self.has(FAKE_SYN) {
                u16::MAX
            } else {
                self.client_window.max(1)
            },
            mss: None,
            window_scale: None,
            sack_permitted: false,
            timestamps: if with_ts {
                Some((self.ts_val, self.ts_recent))
            } else {
                None
            },
            payload_len: 0,
        };
        cx.scratch.clear();
        crate::wire::tcp::emit_ipv4_tcp(
            cx.scratch,
            self.key.client_ip,
            self.key.target_ip,
            self.ip_ident,
            64,
            &repr,
            &[],
        );
        cx.out.transmit(cx.scratch);
        if flags.contains(TcpFlags::RST) {
            cx.stats.sent_rst += 1;
        } else {
            cx.stats.sent_acks += 1;
        }
    }

    /// Rebuilds the session after the target reset it while client data it had not
    /// acknowledged is still queued (spec §3.10): a fabricated SYN just before the oldest
    /// undelivered byte on the same 4-tuple, then that data again. False (nothing changed) when
    /// mid-stream replay is off, the session was rebuilt too often, or no data is queued.
    fn reconstruct(&mut self, cx: &mut Ctx<'_>) -> bool {
        let head = self.queue.head;
        if !cx.limits.mid_stream
            || self.state != State::Established
            || self.restarts() >= cx.limits.max_reconstructions
            || head == NIL
        {
            return false;
        }
        let head_flags = cx.pool.flags(head);
        let data_len = cx.pool.seq_len(head) - u32::from(head_flags.contains(TcpFlags::FIN));
        if data_len == 0 || head_flags.intersects(TcpFlags::RST | TcpFlags::SYN) {
            return false;
        }
        let seq = cx.pool.seq(head);
        let online_ack = cx.pool.online_ack(head);
        let mut buf = std::mem::take(cx.scratch);
        cx.pool.gather(head, &mut buf);
        let mut syn = Vec::with_capacity(64);
        let syn_seg = fabricate_syn(&buf, seq.add(u32::MAX), cx.limits.fake_syn_mss, &mut syn);
        *cx.scratch = buf;
        let Some(syn_seg) = syn_seg else {
            return false;
        };
        let Some((id, _)) = cx
            .pool
            .alloc(&syn, syn_seg.seq, 1, TcpFlags::SYN, SeqNum(0))
        else {
            cx.stats.pool_exhausted += 1;
            return false;
        };
        cx.pool.set_next(id, head);
        self.queue.head = id;
        self.queue.len += 1;
        self.queue.sent = 1;
        self.queue.unsent = head;
        self.queued_bytes += cx.pool.len(id) as u32;
        self.state = State::SynSent;
        self.client_isn = syn_seg.seq;
        self.snd_una = syn_seg.seq;
        self.snd_nxt = seq;
        self.target_base = SeqNum(0);
        self.rcv_nxt = SeqNum(0);
        self.pace_credit = 0;
        self.online_base = online_ack;
        self.peer_window = 0;
        self.set_peer_window_scale(0);
        self.retries = 0;
        self.dupacks = 0;
        self.set_restarts(self.restarts() + 1);
        self.set(
            SYN_WINDOW_SCALE
                | SYN_TIMESTAMPS
                | TIMESTAMPS_ON
                | CLIENT_FIN_SENT
                | TARGET_FIN
                | RECOVERING
                | AWAITING_REPLY
                | WINDOW_UNSCALED,
            false,
        );
        self.set(ONLINE_BASE, head_flags.contains(TcpFlags::ACK));
        self.flags |= FAKE_SYN | RTO_ARMED;
        self.alarm = cx.now.add(cx.limits.rto(0));
        cx.out.register(self.key);
        self.send_segment(id, false, cx);
        self.last_send_at = cx.now;
        cx.stats.reconstructed += 1;
        cx.stats.sent_syn += 1;
        cx.stats.sent_segments += 1;
        true
    }

    /// Sends an RST at our next sequence byte (teardown of a session still open at the target).
    fn reset_target(&mut self, cx: &mut Ctx<'_>) {
        if self.state == State::SynSent {
            // The target knows at most our SYN; an RST with the SYN's next sequence ends it.
            let seq = self.client_isn.add(1);
            self.fabricate(TcpFlags::RST, seq, cx);
        } else {
            // At what the target acknowledged last: exactly its next expected byte unless our
            // data in flight reached it (an RST must hit RCV.NXT exactly to be taken at once).
            let seq = self.snd_una;
            self.fabricate(TcpFlags::RST | TcpFlags::ACK, seq, cx);
        }
    }

    /// Ends the session: it lingers (absorbing late duplicates) and its queue is freed.
    fn close(&mut self, cx: &mut Ctx<'_>) {
        self.state = State::Closed;
        self.alarm = cx.now.add(cx.limits.linger);
        self.set(RTO_ARMED | AWAITING_REPLY, false);
        self.free_queue(cx.pool);
    }

    /// Handles one reply of the target.
    fn on_response(&mut self, resp: &Response, cx: &mut Ctx<'_>) -> Verdict {
        cx.stats.responses += 1;
        if resp.payload_len > 0 {
            cx.stats.response_data += 1;
        }
        if resp.flags.contains(TcpFlags::RST) {
            if self.state != State::Closed {
                cx.stats.target_resets += 1;
                if !self.reconstruct(cx) {
                    self.close(cx);
                }
            }
            return Verdict::Keep;
        }
        if self.state == State::Closed {
            // Late data or FIN of a finished session: reset it at the target so nothing stays
            // half-open there; pure ACKs are ignored.
            if resp.payload_len > 0 || resp.flags.contains(TcpFlags::FIN) {
                self.fabricate(TcpFlags::RST, resp.ack, cx);
            }
            return Verdict::Keep;
        }
        if resp.flags.contains(TcpFlags::SYN) {
            return self.on_synack(resp, cx);
        }
        if self.state == State::SynSent {
            // Not a SYN-ACK while we wait for one: the target still has an older connection on
            // this 4-tuple (this is its challenge ACK) or a stale segment of one. Reset it at
            // the sequence it acknowledges and send our SYN again at once (a few times; after
            // that the RTO paces the SYNs).
            self.fabricate(TcpFlags::RST, resp.ack, cx);
            let head = self.queue.head;
            if resp.flags.contains(TcpFlags::ACK)
                && self.dupacks < STALE_RESENDS
                && head != NIL
                && cx.pool.flags(head).contains(TcpFlags::SYN)
            {
                self.dupacks += 1;
                cx.stats.stale_target_resets += 1;
                cx.stats.retransmits += 1;
                self.send_segment(head, false, cx);
                self.last_send_at = cx.now;
            }
            return Verdict::Keep;
        }
        self.last_response_at = cx.now;
        let window_changed = resp.window != self.peer_window || self.has(WINDOW_UNSCALED);
        self.peer_window = resp.window;
        self.set(WINDOW_UNSCALED, false);
        if self.has(TIMESTAMPS_ON) {
            if let Some((tsval, _)) = resp.timestamps {
                self.ts_recent = tsval;
            }
        }
        let advanced = resp.ack.after(self.snd_una);
        self.on_ack(resp.ack, cx);
        if self.queue.sent > 0 && resp.window == 0 && !advanced {
            // Zero window: the target is alive but not reading. The RTO goes on as a persist
            // timer (backing off to `rto_max`), and never gives up while the target answers
            // its probes; `-t` still ends a session whose target falls silent.
            self.retries = self.retries.min(cx.limits.max_retries.saturating_sub(1));
        }
        if self.queue.sent > 0 {
            // RFC 5681: an ACK that changes the window is not a duplicate; nor is one with the
            // window closed (the target is full, not missing a segment).
            let duplicate = !advanced
                && !window_changed
                && resp.window != 0
                && resp.ack == self.snd_una
                && resp.payload_len == 0
                && !resp.flags.contains(TcpFlags::FIN);
            if duplicate {
                self.dupacks = self.dupacks.saturating_add(1);
            }
            // Fast retransmit on the third duplicate ACK; while recovering, every partial
            // ACK retransmits the next hole at once (one per round trip, not per RTO).
            if (duplicate && self.dupacks == 3) || (advanced && self.has(RECOVERING)) {
                self.flags |= RECOVERING;
                cx.stats.retransmits += 1;
                let head = self.queue.head;
                self.send_segment(head, false, cx);
                self.last_send_at = cx.now;
            }
        } else {
            self.set(RECOVERING, false);
        }
        if advanced {
            self.dupacks = 0;
        }
        let mut ack_now = false;
        if resp.payload_len > 0 || resp.flags.contains(TcpFlags::FIN) {
            let data_end = resp.seq.add(resp.payload_len);
            if resp.payload_len > 0 && !self.has(ANSWERED) {
                self.flags |= ANSWERED;
                cx.stats.answered += 1;
            }
            if resp.payload_len > 0 && data_end.after(self.rcv_nxt) && self.has(AWAITING_REPLY) {
                // The first byte of the answer: the request's reply latency.
                self.set(AWAITING_REPLY, false);
                let us = cx.now_us.wrapping_sub(self.request_sent_us);
                cx.out.reply_latency(Duration::from_micros(u64::from(us)));
            }
            if !resp.seq.after(self.rcv_nxt) {
                if data_end.after(self.rcv_nxt) {
                    self.rcv_nxt = data_end;
                }
                if resp.flags.contains(TcpFlags::FIN)
                    && data_end == self.rcv_nxt
                    && !self.has(TARGET_FIN)
                {
                    self.rcv_nxt = self.rcv_nxt.add(1);
                    self.flags |= TARGET_FIN;
                }
            }
            // In order, a retransmission or beyond a gap: acknowledge what we have either way
            // (a duplicate ACK makes the target retransmit what is missing).
            ack_now = true;
        }
        let sent_before = self.snd_nxt;
        let sent_count = cx.stats.sent_segments;
        let verdict = self.pump(cx);
        if self.state == State::Closed {
            return verdict;
        }
        if ack_now && cx.stats.sent_segments == sent_count && sent_before == self.snd_nxt {
            let seq = self.snd_nxt;
            self.fabricate(TcpFlags::ACK, seq, cx);
        }
        if self.has(TARGET_FIN) && self.has(CLIENT_FIN_SENT) && self.snd_una == self.snd_nxt {
            cx.stats.closed += 1;
            self.close(cx);
        }
        verdict
    }

    fn on_synack(&mut self, resp: &Response, cx: &mut Ctx<'_>) -> Verdict {
        let expected_ack = self.client_isn.add(1);
        if !resp.flags.contains(TcpFlags::ACK) || resp.ack != expected_ack {
            cx.stats.bad_synack += 1;
            self.fabricate(TcpFlags::RST, resp.ack, cx);
            return Verdict::Keep;
        }
        self.last_response_at = cx.now;
        if self.state == State::SynSent {
            cx.stats.established += 1;
            self.state = State::Established;
            self.target_base = resp.seq.add(1);
            self.rcv_nxt = self.target_base;
            self.snd_una = expected_ack;
            self.snd_nxt = expected_ack;
            // The SYN is acknowledged: drop it from the queue.
            let head = self.queue.head;
            if head != NIL && cx.pool.flags(head).contains(TcpFlags::SYN) {
                let was_sent = self.queue.unsent != head;
                self.pop_front(cx.pool);
                if was_sent {
                    self.queue.sent = self.queue.sent.saturating_sub(1);
                }
            }
            if let (true, Some(scale)) = (self.has(SYN_WINDOW_SCALE), resp.window_scale) {
                self.set_peer_window_scale(scale);
            }
            self.peer_window = resp.window;
            self.flags |= WINDOW_UNSCALED;
            if self.has(SYN_TIMESTAMPS) {
                if let Some((tsval, _)) = resp.timestamps {
                    self.flags |= TIMESTAMPS_ON;
                    self.ts_recent = tsval;
                }
            }
            self.retries = 0;
            self.dupacks = 0;
            self.set(RTO_ARMED, false);
        }
        // Third handshake ACK (again, if the SYN-ACK was retransmitted because ours was lost).
        let seq = self.snd_una;
        self.fabricate(TcpFlags::ACK, seq, cx);
        self.pump(cx)
    }

    /// The target acknowledged up to `ack`: forget what it has.
    fn on_ack(&mut self, ack: SeqNum, cx: &mut Ctx<'_>) {
        if !ack.after(self.snd_una) || ack.after(self.snd_nxt) {
            return;
        }
        self.snd_una = ack;
        // Every sent segment ends at or before `snd_nxt`: when that is acknowledged, all go
        // without reading their (cold) slots.
        let all = ack == self.snd_nxt;
        while self.queue.sent > 0 {
            if !all && cx.pool.end(self.queue.head).after(ack) {
                break;
            }
            self.pop_front(cx.pool);
            self.queue.sent -= 1;
        }
        self.retries = 0;
        if self.queue.sent > 0 {
            self.alarm = cx.now.add(cx.limits.rto_initial);
            self.flags |= RTO_ARMED;
        } else {
            self.set(RTO_ARMED, false);
        }
    }

    /// The next moment this session needs [`Session::on_timer`].
    fn deadline(&self, limits: &Limits) -> Tick {
        if self.state == State::Closed {
            return self.alarm;
        }
        let mut next = self.last_response_at.add(limits.timeout);
        if self.has(SENT_DATA) && self.queue.len == 0 {
            next = self.last_response_at.add(limits.keepalive);
        }
        if self.has(RTO_ARMED) {
            next = next.earlier(self.alarm);
        }
        if self.state == State::Established && self.queue.sent < self.queue.len {
            let silent_from = self.last_response_at.later(self.last_send_at);
            next = next.earlier(silent_from.add(limits.pace_idle));
        }
        next
    }

    /// Runs the timers that are due (harmless when none is).
    fn on_timer(&mut self, cx: &mut Ctx<'_>) -> Verdict {
        let now = cx.now;
        if self.state == State::Closed {
            return if now.reached(self.alarm) {
                Verdict::Remove
            } else {
                Verdict::Keep
            };
        }
        // Retransmission.
        if self.has(RTO_ARMED) && now.reached(self.alarm) {
            if self.retries >= cx.limits.max_retries {
                cx.stats.gave_up += 1;
                self.reset_target(cx);
                self.close(cx);
                return Verdict::Keep;
            }
            self.retries += 1;
            self.alarm = now.add(cx.limits.rto(self.retries));
            if self.state == State::SynSent && self.retries == 1 {
                // The registration may have been lost (a UDP datagram): register once more. A
                // lost intercept connection is covered by the resync when it comes back, so a
                // flood of SYNs that are never answered is not registered at every retry.
                cx.out.register(self.key);
            }
            if self.queue.sent > 0 {
                cx.stats.retransmits += 1;
                self.set(RECOVERING, self.state == State::Established);
                let head = self.queue.head;
                self.send_segment(head, false, cx);
            } else {
                self.set(RTO_ARMED, false);
            }
        }
        // Silence rule: the target's answer was shorter than the online one.
        if self.state == State::Established
            && cx.limits.pacing == Pacing::WaitForResponse
            && self.queue.sent < self.queue.len
            && now.reached(
                self.last_response_at
                    .later(self.last_send_at)
                    .add(cx.limits.pace_idle),
            )
        {
            let id = self.queue.unsent;
            let online_ack = cx.pool.online_ack(id);
            if !self.paced_ok(cx.pool.flags(id), online_ack) {
                let base = if self.has(ONLINE_BASE) {
                    self.online_base
                } else {
                    online_ack
                };
                let needed = online_ack.diff(base).max(0) as u32;
                let have = self.rcv_nxt.diff(self.target_base).max(0) as u32;
                self.pace_credit = needed.saturating_sub(have);
                cx.stats.pace_releases += 1;
            }
            self.pump(cx);
            if self.state == State::Closed {
                return Verdict::Keep;
            }
        }
        // Session timeout (-t) and keep-alive (-k).
        let silent = now.since(self.last_response_at);
        let idle_ok = self.has(SENT_DATA) && self.queue.len == 0;
        if (silent >= cx.limits.timeout && !idle_ok) || silent >= cx.limits.keepalive {
            cx.stats.timed_out += 1;
            self.reset_target(cx);
            self.close(cx);
        }
        Verdict::Keep
    }
}

/// Builds the SYN that opens a session captured mid-stream (spec §3.5) into `buf`: from the
/// addresses and ports of `packet` (a captured data segment already rewritten for the target),
/// sequence number `seq` (one before the first data byte to replay), no ACK, window 65535 and
/// a single MSS option of `mss` (no window scale: the client's scale is unknown, so its
/// segments go out with the window forced to 65535; no timestamps, no SACK). Returns the
/// segment's parsed form, or `None` when `packet` is not an IPv4/TCP packet.
pub fn fabricate_syn(
    packet: &[u8],
    seq: SeqNum,
    mss: u16,
    buf: &mut Vec<u8>,
) -> Option<ClientSegment> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    let repr = TcpRepr {
        src_port: tcp.src_port(),
        dst_port: tcp.dst_port(),
        seq,
        ack: SeqNum(0),
        flags: TcpFlags::SYN,
        window: u16::MAX,
        mss: Some(mss),
        window_scale: None,
        sack_permitted: false,
        timestamps: None,
        payload_len: 0,
    };
    buf.clear();
    crate::wire::tcp::emit_ipv4_tcp(
        buf,
        ip.src_addr(),
        ip.dst_addr(),
        ip.ident().wrapping_sub(2),
        64,
        &repr,
        &[],
    );
    Some(ClientSegment {
        seq,
        ack: SeqNum(0),
        flags: TcpFlags::SYN,
        payload_len: 0,
        window: u16::MAX,
        timestamps: None,
        window_scale: None,
    })
}

/// Overwrites SACK blocks (which name the online server's sequence space) with NOPs, fixing
/// the TCP checksum. Cheap when the segment has no SACK option (the common case).
fn strip_sack(packet: &mut [u8]) {
    // Fast path: no options, or just the timestamps the way Linux lays them out.
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    if let Some(tcp) = packet.get(ihl..ihl + 24) {
        let doff = usize::from(tcp[12] >> 4) * 4;
        if doff <= 20 || (doff == 32 && tcp[20..24] == [1, 1, 8, 10]) {
            return;
        }
    }
    let mut ip = Ipv4Packet::new_unchecked(&mut packet[..]);
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let mut tcp = TcpPacket::new_unchecked(&mut ip.payload_mut()[..]);
    if tcp.header_len() > 20 && tcp.strip_sack_blocks() {
        tcp.fill_checksum(src, dst);
    }
}

/// The client address a reply is addressed to, and the target it came from.
pub fn response_key(
    client_ip: Ipv4Addr,
    client_port: u16,
    target_ip: Ipv4Addr,
    target_port: u16,
) -> FlowKey {
    FlowKey {
        client_ip,
        client_port,
        target_ip,
        target_port,
    }
}

#[cfg(test)]
mod tests;
