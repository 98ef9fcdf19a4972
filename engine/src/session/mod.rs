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

mod table;

pub use table::SessionTable;

use crate::flow::FlowKey;
use crate::wire::tcp::TcpRepr;
use crate::wire::{Ipv4Packet, SeqNum, TcpFlags, TcpPacket};
use std::collections::VecDeque;
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
    /// Retransmissions of one segment before the session is given up.
    pub max_retries: u32,
    /// `-t`: a session whose target sent nothing for this long is reset and removed when it
    /// still has something to send or has not sent data yet.
    pub timeout: Duration,
    /// `-k`: an idle session that has exchanged data is kept this long after the last reply.
    pub keepalive: Duration,
    /// How long a closed session lingers to absorb late duplicates before it is removed.
    pub linger: Duration,
    /// Most client segments one session may queue (sent-unacknowledged plus held).
    pub max_queued_segments: usize,
    /// Most payload bytes one session may queue.
    pub max_queued_bytes: usize,
    /// Most sessions in one table; new SYNs beyond it are dropped and counted.
    pub max_sessions: usize,
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
    /// New SYNs dropped because the table was full.
    pub table_full: u64,
    /// Client segments with no session (captured mid-stream; replayed in a later version).
    pub client_no_session: u64,
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
    /// SYN-ACKs whose acknowledgement did not match our SYN (answered with RST).
    pub bad_synack: u64,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// SYN sent, waiting for the target's SYN-ACK.
    SynSent,
    /// Handshake done.
    Established,
    /// Over (both FINs, an RST, a timeout): lingering until `linger_until`.
    Closed,
}

/// One queued client segment: the packet as it will be sent (addresses already rewritten).
#[derive(Debug)]
struct Segment {
    seq: SeqNum,
    seq_len: u32,
    flags: TcpFlags,
    online_ack: SeqNum,
    packet: Vec<u8>,
}

impl Segment {
    fn end(&self) -> SeqNum {
        self.seq.add(self.seq_len)
    }
}

/// One replayed connection.
#[derive(Debug)]
pub struct Session {
    key: FlowKey,
    state: State,
    client_isn: SeqNum,
    syn_window_scale: Option<u8>,
    syn_timestamps: bool,
    /// The online server's first sequence byte (its ISN + 1), from the client's first ACK.
    online_base: Option<SeqNum>,
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
    /// Queued segments in sequence order: `queue[..sent]` are sent and not yet acknowledged.
    queue: VecDeque<Segment>,
    sent: usize,
    queued_bytes: usize,
    /// End of the highest queued client sequence (to recognise client retransmissions).
    queued_end: SeqNum,
    /// Target window in bytes (scaled).
    peer_window: u32,
    peer_window_scale: u8,
    timestamps_on: bool,
    ts_recent: u32,
    ts_val: u32,
    client_window: u16,
    ip_ident: u16,
    client_fin_sent: bool,
    target_fin: bool,
    sent_data: bool,
    created_at: Duration,
    last_response_at: Duration,
    last_send_at: Duration,
    rto: Duration,
    rto_deadline: Option<Duration>,
    retries: u32,
    /// Duplicate ACKs in a row (fast retransmit at 3).
    dupacks: u32,
    /// Retransmitting holes: each partial ACK retransmits the next unacknowledged segment.
    recovering: bool,
    linger_until: Duration,
    /// Deadline this session is filed under in the table's timer heap.
    scheduled: Option<Duration>,
}

/// Scratch space for fabricated packets, reused across calls.
#[derive(Debug, Default)]
pub struct Scratch {
    buf: Vec<u8>,
}

/// What the table should do with a session after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Keep,
    Remove,
}

impl Session {
    fn new(key: FlowKey, syn: &ClientSegment, now: Duration, config: &SessionConfig) -> Session {
        Session {
            key,
            state: State::SynSent,
            client_isn: syn.seq,
            syn_window_scale: syn.window_scale,
            syn_timestamps: syn.timestamps.is_some(),
            online_base: None,
            target_base: SeqNum(0),
            pace_credit: 0,
            rcv_nxt: SeqNum(0),
            snd_una: syn.seq,
            snd_nxt: syn.seq,
            queue: VecDeque::new(),
            sent: 0,
            queued_bytes: 0,
            queued_end: syn.seq,
            peer_window: 0,
            peer_window_scale: 0,
            timestamps_on: false,
            ts_recent: 0,
            ts_val: syn.timestamps.map_or(0, |t| t.0),
            client_window: syn.window,
            ip_ident: 0,
            client_fin_sent: false,
            target_fin: false,
            sent_data: false,
            created_at: now,
            last_response_at: now,
            last_send_at: now,
            rto: config.rto_initial,
            rto_deadline: None,
            retries: 0,
            dupacks: 0,
            recovering: false,
            linger_until: now,
            scheduled: None,
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
        self.queue.len()
    }

    /// Queues a captured client segment (SYN excluded) and sends what may be sent.
    #[allow(clippy::too_many_arguments)]
    fn on_client(
        &mut self,
        packet: &[u8],
        seg: &ClientSegment,
        now: Duration,
        config: &SessionConfig,
        stats: &mut SessionStats,
        out: &mut dyn Output,
        scratch: &mut Scratch,
    ) -> Verdict {
        if self.state == State::Closed {
            return Verdict::Keep;
        }
        if seg.flags.contains(TcpFlags::ACK) && self.online_base.is_none() {
            self.online_base = Some(seg.ack);
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
            stats.client_acks_absorbed += 1;
            return Verdict::Keep;
        }
        let end = seg.seq.add(seq_len);
        if !is_rst && self.is_duplicate(seg.seq, end) {
            stats.client_retransmits += 1;
            return Verdict::Keep;
        }
        if self.queue.len() >= config.max_queued_segments
            || self.queued_bytes + packet.len() > config.max_queued_bytes
        {
            stats.queue_full += 1;
            return Verdict::Keep;
        }
        let segment = Segment {
            seq: seg.seq,
            seq_len,
            flags: seg.flags,
            online_ack: seg.ack,
            packet: packet.to_vec(),
        };
        // In sequence order: captures can reorder, and a segment lost before the capture point
        // comes back later as the client's retransmission, behind data we already sent.
        let mut at = self.queue.len();
        let floor = if is_rst { self.sent } else { 0 };
        while at > floor && self.queue[at - 1].seq.after(seg.seq) {
            at -= 1;
        }
        self.queued_bytes += segment.packet.len();
        self.queue.insert(at, segment);
        if end.after(self.queued_end) {
            self.queued_end = end;
        }
        if at < self.sent {
            // It fills a hole in what the target has: send it now, whatever the pacing.
            self.sent += 1;
            stats.client_hole_fills += 1;
            if self.state == State::Established {
                self.send_segment(at, false, out);
                stats.sent_segments += 1;
                stats.sent_data += 1;
                self.last_send_at = now;
            }
        }
        self.pump(now, config, stats, out, scratch)
    }

    /// True when `[seq, end)` was already acknowledged by the target or is queued already
    /// (a client retransmission of something we have).
    fn is_duplicate(&self, seq: SeqNum, end: SeqNum) -> bool {
        if self.state != State::SynSent && !end.after(self.snd_una) {
            return true;
        }
        if end.after(self.queued_end) {
            return false;
        }
        let len = end.diff(seq).max(0) as u32;
        for queued in self.queue.iter().rev() {
            if queued.seq == seq {
                return queued.seq_len >= len;
            }
            if queued.seq.before(seq) {
                break;
            }
        }
        false
    }

    /// Sends every queued segment that pacing and the target's window allow.
    fn pump(
        &mut self,
        now: Duration,
        config: &SessionConfig,
        stats: &mut SessionStats,
        out: &mut dyn Output,
        scratch: &mut Scratch,
    ) -> Verdict {
        if self.state != State::Established {
            return Verdict::Keep;
        }
        while self.sent < self.queue.len() {
            let seg = &self.queue[self.sent];
            if config.pacing == Pacing::WaitForResponse && !self.paced_ok(seg) {
                break;
            }
            let in_flight = self.snd_nxt.diff(self.snd_una).max(0) as u32;
            if seg.seq_len > 0 && self.sent > 0 && in_flight + seg.seq_len > self.peer_window {
                break;
            }
            let is_rst = seg.flags.contains(TcpFlags::RST);
            let is_fin = seg.flags.contains(TcpFlags::FIN);
            let has_data = seg.seq_len > u32::from(is_fin);
            let end = seg.end();
            self.send_segment(self.sent, is_rst, out);
            stats.sent_segments += 1;
            if has_data {
                stats.sent_data += 1;
                self.sent_data = true;
            }
            self.last_send_at = now;
            if is_rst {
                stats.sent_rst += 1;
                stats.client_resets += 1;
                self.close(now, config);
                return Verdict::Keep;
            }
            if is_fin {
                stats.sent_fin += 1;
                self.client_fin_sent = true;
            }
            if end.after(self.snd_nxt) {
                self.snd_nxt = end;
            }
            self.sent += 1;
            if self.rto_deadline.is_none() {
                self.rto_deadline = Some(now + self.rto);
            }
        }
        let _ = scratch;
        Verdict::Keep
    }

    /// True when the target has sent as many response bytes as the online server had when the
    /// client sent `seg` (less what the silence rule wrote off).
    fn paced_ok(&self, seg: &Segment) -> bool {
        if !seg.flags.contains(TcpFlags::ACK) {
            return true;
        }
        let Some(base) = self.online_base else {
            return true;
        };
        let needed = seg.online_ack.diff(base).max(0) as u32;
        let have = self.rcv_nxt.diff(self.target_base).max(0) as u32;
        needed <= have.saturating_add(self.pace_credit)
    }

    /// Writes queued segment `index` out with the current acknowledgement and timestamps.
    fn send_segment(&mut self, index: usize, reset: bool, out: &mut dyn Output) {
        let rcv_nxt = self.rcv_nxt;
        let snd_nxt = self.snd_nxt;
        let timestamps_on = self.timestamps_on;
        let ts_recent = self.ts_recent;
        let mut ts_max = self.ts_val;
        let seg = &mut self.queue[index];
        {
            let mut ip = Ipv4Packet::new_unchecked(&mut seg.packet[..]);
            self.ip_ident = ip.ident();
            let mut tcp = TcpPacket::new_unchecked(&mut ip.payload_mut()[..]);
            if tcp.flags().contains(TcpFlags::ACK) {
                tcp.rewrite_ack_number(rcv_nxt);
            }
            if reset && seg.seq.before(snd_nxt) {
                // An RST must fall inside the target's window: send it at our next byte.
                tcp.set_seq_number(snd_nxt);
                seg.seq = snd_nxt;
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
            let mut ip = Ipv4Packet::new_unchecked(&mut seg.packet[..]);
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            let mut tcp = TcpPacket::new_unchecked(&mut ip.payload_mut()[..]);
            tcp.fill_checksum(src, dst);
        }
        strip_sack(&mut seg.packet);
        out.transmit(&seg.packet);
        self.ts_val = ts_max;
    }

    /// Builds and sends a fabricated segment from the client's side.
    fn fabricate(
        &mut self,
        flags: TcpFlags,
        seq: SeqNum,
        stats: &mut SessionStats,
        out: &mut dyn Output,
        scratch: &mut Scratch,
    ) {
        self.ip_ident = self.ip_ident.wrapping_add(1);
        let with_ts = self.timestamps_on && !flags.contains(TcpFlags::RST);
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
        scratch.buf.clear();
        crate::wire::tcp::emit_ipv4_tcp(
            &mut scratch.buf,
            self.key.client_ip,
            self.key.target_ip,
            self.ip_ident,
            64,
            &repr,
            &[],
        );
        out.transmit(&scratch.buf);
        if flags.contains(TcpFlags::RST) {
            stats.sent_rst += 1;
        } else {
            stats.sent_acks += 1;
        }
    }

    /// Sends an RST at our next sequence byte (teardown of a session still open at the target).
    fn reset_target(
        &mut self,
        stats: &mut SessionStats,
        out: &mut dyn Output,
        scratch: &mut Scratch,
    ) {
        if self.state == State::SynSent {
            // The target knows at most our SYN; an RST with the SYN's next sequence ends it.
            let seq = self.client_isn.add(1);
            self.fabricate(TcpFlags::RST, seq, stats, out, scratch);
        } else {
            let seq = self.snd_nxt;
            self.fabricate(TcpFlags::RST | TcpFlags::ACK, seq, stats, out, scratch);
        }
    }

    fn close(&mut self, now: Duration, config: &SessionConfig) {
        self.state = State::Closed;
        self.linger_until = now + config.linger;
        self.rto_deadline = None;
    }

    /// Handles one reply of the target.
    fn on_response(
        &mut self,
        resp: &Response,
        now: Duration,
        config: &SessionConfig,
        stats: &mut SessionStats,
        out: &mut dyn Output,
        scratch: &mut Scratch,
    ) -> Verdict {
        stats.responses += 1;
        if resp.payload_len > 0 {
            stats.response_data += 1;
        }
        if resp.flags.contains(TcpFlags::RST) {
            if self.state != State::Closed {
                stats.target_resets += 1;
                self.close(now, config);
            }
            return Verdict::Keep;
        }
        if self.state == State::Closed {
            // Late data or FIN of a finished session: reset it at the target so nothing stays
            // half-open there; pure ACKs are ignored.
            if resp.payload_len > 0 || resp.flags.contains(TcpFlags::FIN) {
                self.fabricate(TcpFlags::RST, resp.ack, stats, out, scratch);
            }
            return Verdict::Keep;
        }
        if resp.flags.contains(TcpFlags::SYN) {
            return self.on_synack(resp, now, config, stats, out, scratch);
        }
        if self.state == State::SynSent {
            // Not a SYN-ACK while we wait for one: a stale segment of an older connection.
            self.fabricate(TcpFlags::RST, resp.ack, stats, out, scratch);
            return Verdict::Keep;
        }
        self.last_response_at = now;
        self.peer_window = u32::from(resp.window) << self.peer_window_scale;
        if self.timestamps_on {
            if let Some((tsval, _)) = resp.timestamps {
                self.ts_recent = tsval;
            }
        }
        let advanced = resp.ack.after(self.snd_una);
        self.on_ack(resp.ack, now, config);
        if self.sent > 0 {
            let duplicate = !advanced
                && resp.ack == self.snd_una
                && resp.payload_len == 0
                && !resp.flags.contains(TcpFlags::FIN);
            if duplicate {
                self.dupacks += 1;
            }
            // Fast retransmit on the third duplicate ACK; while recovering, every partial
            // ACK retransmits the next hole at once (one per round trip, not per RTO).
            if (duplicate && self.dupacks == 3) || (advanced && self.recovering) {
                self.recovering = true;
                stats.retransmits += 1;
                self.send_segment(0, false, out);
                self.last_send_at = now;
            }
        } else {
            self.recovering = false;
        }
        if advanced {
            self.dupacks = 0;
        }
        let mut ack_now = false;
        if resp.payload_len > 0 || resp.flags.contains(TcpFlags::FIN) {
            let data_end = resp.seq.add(resp.payload_len);
            if !resp.seq.after(self.rcv_nxt) {
                if data_end.after(self.rcv_nxt) {
                    self.rcv_nxt = data_end;
                }
                if resp.flags.contains(TcpFlags::FIN)
                    && data_end == self.rcv_nxt
                    && !self.target_fin
                {
                    self.rcv_nxt = self.rcv_nxt.add(1);
                    self.target_fin = true;
                }
            }
            // In order, a retransmission or beyond a gap: acknowledge what we have either way
            // (a duplicate ACK makes the target retransmit what is missing).
            ack_now = true;
        }
        let sent_before = self.snd_nxt;
        let sent_count = stats.sent_segments;
        let verdict = self.pump(now, config, stats, out, scratch);
        if self.state == State::Closed {
            return verdict;
        }
        if ack_now && stats.sent_segments == sent_count && sent_before == self.snd_nxt {
            let seq = self.snd_nxt;
            self.fabricate(TcpFlags::ACK, seq, stats, out, scratch);
        }
        if self.target_fin && self.client_fin_sent && self.snd_una == self.snd_nxt {
            stats.closed += 1;
            self.close(now, config);
        }
        verdict
    }

    fn on_synack(
        &mut self,
        resp: &Response,
        now: Duration,
        config: &SessionConfig,
        stats: &mut SessionStats,
        out: &mut dyn Output,
        scratch: &mut Scratch,
    ) -> Verdict {
        let expected_ack = self.client_isn.add(1);
        if !resp.flags.contains(TcpFlags::ACK) || resp.ack != expected_ack {
            stats.bad_synack += 1;
            self.fabricate(TcpFlags::RST, resp.ack, stats, out, scratch);
            return Verdict::Keep;
        }
        self.last_response_at = now;
        if self.state == State::SynSent {
            stats.established += 1;
            self.state = State::Established;
            self.target_base = resp.seq.add(1);
            self.rcv_nxt = self.target_base;
            self.snd_una = expected_ack;
            self.snd_nxt = expected_ack;
            // The SYN is acknowledged: drop it from the queue.
            if let Some(front) = self.queue.front() {
                if front.flags.contains(TcpFlags::SYN) {
                    let syn = self.queue.pop_front().expect("front exists");
                    self.queued_bytes -= syn.packet.len();
                    self.sent = self.sent.saturating_sub(1);
                }
            }
            if let (Some(_), Some(scale)) = (self.syn_window_scale, resp.window_scale) {
                self.peer_window_scale = scale.min(14);
            }
            self.peer_window = u32::from(resp.window);
            if self.syn_timestamps {
                if let Some((tsval, _)) = resp.timestamps {
                    self.timestamps_on = true;
                    self.ts_recent = tsval;
                }
            }
            self.rto = config.rto_initial;
            self.rto_deadline = None;
            self.retries = 0;
        }
        // Third handshake ACK (again, if the SYN-ACK was retransmitted because ours was lost).
        let seq = self.snd_una;
        self.fabricate(TcpFlags::ACK, seq, stats, out, scratch);
        self.pump(now, config, stats, out, scratch)
    }

    /// The target acknowledged up to `ack`: forget what it has.
    fn on_ack(&mut self, ack: SeqNum, now: Duration, config: &SessionConfig) {
        if !ack.after(self.snd_una) || ack.after(self.snd_nxt) {
            return;
        }
        self.snd_una = ack;
        while self.sent > 0 {
            let front = &self.queue[0];
            if front.end().after(ack) {
                break;
            }
            let seg = self.queue.pop_front().expect("sent > 0");
            self.queued_bytes -= seg.packet.len();
            self.sent -= 1;
        }
        self.retries = 0;
        self.rto = config.rto_initial;
        self.rto_deadline = if self.sent > 0 {
            Some(now + self.rto)
        } else {
            None
        };
    }

    /// The next moment this session needs [`Session::on_timer`].
    fn deadline(&self, config: &SessionConfig) -> Duration {
        if self.state == State::Closed {
            return self.linger_until;
        }
        let mut next = self.last_response_at.max(self.created_at) + config.timeout;
        if self.sent_data && self.queue.is_empty() {
            next = self.last_response_at + config.keepalive;
        }
        if let Some(rto) = self.rto_deadline {
            next = next.min(rto);
        }
        if self.state == State::Established && self.sent < self.queue.len() {
            next = next.min(self.last_response_at.max(self.last_send_at) + config.pace_idle);
        }
        next
    }

    /// Runs the timers that are due.
    fn on_timer(
        &mut self,
        now: Duration,
        config: &SessionConfig,
        stats: &mut SessionStats,
        out: &mut dyn Output,
        scratch: &mut Scratch,
    ) -> Verdict {
        if self.state == State::Closed {
            return if now >= self.linger_until {
                Verdict::Remove
            } else {
                Verdict::Keep
            };
        }
        // Retransmission.
        if let Some(deadline) = self.rto_deadline {
            if now >= deadline {
                if self.retries >= config.max_retries {
                    stats.gave_up += 1;
                    self.reset_target(stats, out, scratch);
                    self.close(now, config);
                    return Verdict::Keep;
                }
                self.retries += 1;
                self.rto = (self.rto * 2).min(config.rto_max);
                self.rto_deadline = Some(now + self.rto);
                if self.state == State::SynSent {
                    // The route may have been lost with an intercept connection: register again.
                    out.register(self.key);
                }
                if self.sent > 0 {
                    stats.retransmits += 1;
                    self.recovering = self.state == State::Established;
                    self.send_segment(0, false, out);
                } else {
                    self.rto_deadline = None;
                }
            }
        }
        // Silence rule: the target's answer was shorter than the online one.
        if self.state == State::Established
            && config.pacing == Pacing::WaitForResponse
            && self.sent < self.queue.len()
            && now >= self.last_response_at.max(self.last_send_at) + config.pace_idle
        {
            let seg = &self.queue[self.sent];
            if !self.paced_ok(seg) {
                let base = self.online_base.unwrap_or(seg.online_ack);
                let needed = seg.online_ack.diff(base).max(0) as u32;
                let have = self.rcv_nxt.diff(self.target_base).max(0) as u32;
                self.pace_credit = needed.saturating_sub(have);
                stats.pace_releases += 1;
            }
            self.pump(now, config, stats, out, scratch);
            if self.state == State::Closed {
                return Verdict::Keep;
            }
        }
        // Session timeout (-t) and keep-alive (-k).
        let silent = now.saturating_sub(self.last_response_at.max(self.created_at));
        let idle_ok = self.sent_data && self.queue.is_empty();
        if (silent >= config.timeout && !idle_ok) || silent >= config.keepalive {
            stats.timed_out += 1;
            self.reset_target(stats, out, scratch);
            self.close(now, config);
        }
        Verdict::Keep
    }
}

/// Overwrites SACK blocks (which name the online server's sequence space) with NOPs, fixing
/// the TCP checksum. Cheap when the segment has no SACK option (the common case).
fn strip_sack(packet: &mut [u8]) {
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
