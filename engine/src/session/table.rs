//! The session table: every replayed session of one worker, keyed by [`FlowKey`]. One owner,
//! no locks, no allocation after [`SessionTable::new`].
//!
//! Layout (all sized from [`SessionConfig`] when the table is made):
//! - an open-addressing index: a power-of-two array of `u32` slots (entry number plus a hash
//!   tag) with linear probing and backward-shift deletion, at most half full;
//! - a dense slab of fixed-size [`Session`] entries (104 bytes) with a free list;
//! - one 8-byte [`Link`] per entry, beside the slab, that files the session in exactly one
//!   list: a bucket of the hierarchical timer wheel while it is busy (handshake pending or
//!   segments queued), or one of three FIFOs while it is idle (established with nothing
//!   queued: one FIFO for sessions that exchanged data, which expire after `keepalive`, one for
//!   those that did not, which expire after `timeout`) or closed (lingering). An idle session's
//!   only deadline is its last reply plus a constant, so each FIFO is in deadline order and is
//!   its own timer queue, and its head is the oldest idle session: eviction takes the head of
//!   the closed FIFO, else the older of the two idle heads, in O(1);
//! - the segment pool (`pool.rs`) that holds queued client packets.
//!
//! Timers are lazy in one direction: a busy session is moved in the wheel only when its
//! deadline comes earlier; when it moves later (the common case: every ACK re-arms the RTO),
//! the wheel wakes the session at the old deadline, it finds nothing due and is filed again.
//!
//! Bursts: [`SessionTable::on_client_burst`], [`SessionTable::on_response_burst`] and
//! [`SessionTable::get_batch`] hash each key 8 items ahead and prefetch its index slot, and
//! prefetch the entry (and link) 4 items ahead, so the cache misses of a burst overlap instead
//! of being paid one after another.

use super::index::FlowIndex;
use super::lists::{Link, Lists, NIL};
use super::module::SessionModule;
use super::pool::{SegmentPool, Stored};
use super::prefetch::prefetch;
use super::wheel::{Wheel, READY, WHEEL_LISTS};
use super::{
    fabricate_syn, ClientSegment, Ctx, Limits, Output, Place, Response, Session, SessionConfig,
    SessionStats, Tick, Verdict, FAKE_SYN, RTO_ARMED,
};
use crate::flow::{FlowHasher, FlowKey};
use crate::wire::tcp::resegment;
use crate::wire::{Ipv4Packet, TcpFlags, TcpPacket};
use std::fmt;
use std::time::Duration;

/// Which sessions [`SessionTable::evict_one`] may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victims {
    /// Room for a new session: closed ones, then idle ones that never exchanged data. A
    /// session that exchanged data is never given up for a newcomer, so a flood of spoofed
    /// SYNs (sessions that never carry data) sheds only its own kind and, once the table is
    /// full of them and of busy sessions, new sessions are refused (`table_full`) while the
    /// real ones carry on.
    NoData,
    /// Memory pressure (`shed`): any idle session, the oldest first.
    AnyIdle,
}

/// A new session is refused (`table_full`) once fewer than 1/`POOL_RESERVE_DIVISOR` of the
/// segment pool's slots are free: the rest is kept for the data of sessions already replaying.
const POOL_RESERVE_DIVISOR: usize = 4;
/// Idle sessions that exchanged data, oldest first.
const IDLE_KEPT: usize = WHEEL_LISTS;
/// Idle sessions that sent no data yet, oldest first.
const IDLE_FRESH: usize = WHEEL_LISTS + 1;
/// Closed (lingering) sessions, oldest first.
const CLOSED: usize = WHEEL_LISTS + 2;
/// Lists in all.
const LISTS: usize = WHEEL_LISTS + 3;
/// How many items ahead the burst calls load table entries (index slots twice as far).
const AHEAD: usize = 4;

/// The hashes of the items a burst call has looked ahead at.
#[derive(Default)]
struct HashRing([u64; 4 * AHEAD]);

impl HashRing {
    #[inline]
    fn put(&mut self, i: usize, hash: u64) {
        self.0[i % (4 * AHEAD)] = hash;
    }

    #[inline]
    fn peek(&self, i: usize) -> u64 {
        self.0[i % (4 * AHEAD)]
    }
}

/// One captured client packet for [`SessionTable::on_client_burst`]: what
/// [`SessionTable::on_client_packet`] takes.
#[derive(Debug, Clone, Copy)]
pub struct ClientPacket<'a> {
    /// The target-facing key.
    pub key: FlowKey,
    /// The packet from its IPv4 header on, already rewritten to `key`.
    pub packet: &'a [u8],
    /// Its parsed fields.
    pub seg: ClientSegment,
}

/// What a table's structures take (see [`SessionTable::memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableMemory {
    /// Sessions the table is sized for.
    pub max_sessions: usize,
    /// Sessions in the table now.
    pub sessions: usize,
    /// Slots of the index.
    pub index_slots: usize,
    /// Bytes of the index.
    pub index_bytes: usize,
    /// Bytes of one session entry (`size_of::<Session>()`).
    pub entry_bytes: usize,
    /// Bytes of one entry's list link.
    pub link_bytes: usize,
    /// Bytes of the segment pool's buffers (allocated once; pages are touched when used).
    pub pool_bytes: usize,
    /// Slots of the segment pool.
    pub pool_slots: usize,
    /// Pool slots in use.
    pub pool_in_use: usize,
}

impl TableMemory {
    /// Table memory per session at full capacity: index slots plus entry plus link, the
    /// segment pool excluded (it is per queued packet, not per session).
    pub fn bytes_per_session(&self) -> f64 {
        self.index_bytes as f64 / self.max_sessions.max(1) as f64
            + (self.entry_bytes + self.link_bytes) as f64
    }
}

/// All sessions of one worker: an open-addressing index over a slab of compact [`Session`]
/// entries, a hierarchical timer wheel plus FIFOs of idle and closed sessions (eviction of
/// the oldest idle one when full), and a segment pool for queued packets; everything is
/// allocated by [`SessionTable::new`] and nothing after. See [`SessionTable::memory`].
pub struct SessionTable {
    config: SessionConfig,
    limits: Limits,
    index: FlowIndex,
    sessions: Vec<Session>,
    lists: Lists,
    wheel: Wheel,
    /// First free entry (free entries are chained through their link's `next`).
    free: u32,
    max_sessions: usize,
    /// Closed (lingering) sessions.
    closed: usize,
    pool: SegmentPool,
    stats: SessionStats,
    scratch: Vec<u8>,
    /// The latest `now` seen, in ms.
    now_ms: u64,
    /// The protocol module, if any.
    module: Option<Box<dyn SessionModule>>,
    /// The index's hash, keyed at random per table (captured 4-tuples are chosen by the
    /// network: see [`FlowHasher`]).
    hasher: FlowHasher,
}

impl fmt::Debug for SessionTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionTable")
            .field("sessions", &self.len())
            .field("closed", &self.closed)
            .field("max_sessions", &self.max_sessions)
            .field("pool_in_use", &self.pool.in_use())
            .finish()
    }
}

/// The IP + TCP header length and the payload length of an IPv4/TCP packet.
fn tcp_parts(packet: &[u8]) -> Option<(usize, usize)> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some((ip.header_len() + tcp.header_len(), tcp.payload_len()))
}

/// The payload of an IPv4/TCP packet (empty when it is not one).
fn payload_of(packet: &[u8]) -> &[u8] {
    tcp_parts(packet).map_or(&[], |(headers, len)| &packet[headers..headers + len])
}

/// Builds into `buf` a copy of `packet` (IPv4/TCP, headers and options kept) whose payload is
/// `payload`, placed just before `seg`'s first byte; returns its parsed segment.
fn with_payload(
    packet: &[u8],
    seg: &ClientSegment,
    payload: &[u8],
    buf: &mut Vec<u8>,
) -> Option<ClientSegment> {
    let (headers, _) = tcp_parts(packet)?;
    if headers + payload.len() > usize::from(u16::MAX) {
        return None;
    }
    let ident = Ipv4Packet::new_unchecked(packet).ident();
    let seq = seg.seq.add((payload.len() as u32).wrapping_neg());
    let flags = TcpFlags::ACK | TcpFlags::PSH;
    resegment(&packet[..headers], seq, ident, flags, payload, buf);
    Some(ClientSegment {
        seq,
        flags,
        payload_len: payload.len() as u32,
        ..*seg
    })
}

/// Builds the context of a session event from the table's fields.
macro_rules! ctx {
    ($self:ident, $out:expr, $now:expr) => {
        Ctx {
            limits: &$self.limits,
            stats: &mut $self.stats,
            pool: &mut $self.pool,
            scratch: &mut $self.scratch,
            out: &mut *$out,
            now: Tick::from_duration($now),
            now_us: $now.as_micros() as u32,
        }
    };
}

impl SessionTable {
    /// An empty table; allocates the index, the entries and the segment pool for the
    /// configured capacity (pages are touched as they are used).
    pub fn new(config: SessionConfig) -> SessionTable {
        let max_sessions = config.max_sessions.clamp(1, (1 << 31) - 2);
        SessionTable {
            limits: Limits::new(&config),
            index: FlowIndex::new(max_sessions),
            sessions: Vec::with_capacity(max_sessions),
            lists: Lists::new(max_sessions, LISTS),
            wheel: Wheel::new(0),
            free: NIL,
            max_sessions,
            closed: 0,
            pool: SegmentPool::new(config.pool_small_segments, config.pool_segments),
            stats: SessionStats::default(),
            scratch: Vec::with_capacity(1 << 16),
            now_ms: 0,
            module: None,
            hasher: FlowHasher::random(),
            config,
        }
    }

    /// The hash of `key` in this table's index.
    #[inline]
    fn hash(&self, key: &FlowKey) -> u64 {
        self.hasher.hash(key)
    }

    /// Installs a protocol module (see [`SessionModule`]).
    pub fn set_module(&mut self, module: Box<dyn SessionModule>) {
        self.module = Some(module);
    }

    /// The protocol module, if any.
    pub fn module(&self) -> Option<&dyn SessionModule> {
        self.module.as_deref()
    }

    /// The configuration in force.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Appends the key of every open session (not closed, not free) to `out`: what must be
    /// routed to this tcpcopy (an intercept that restarted knows none of it).
    pub fn open_keys(&self, out: &mut Vec<FlowKey>) {
        out.extend(
            self.sessions
                .iter()
                .filter(|s| s.place() != Place::Free && !s.is_closed())
                .map(|s| s.key),
        );
    }

    /// Sessions in the table (lingering closed ones included).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when the table holds no session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions not yet over.
    pub fn active(&self) -> usize {
        self.len() - self.closed
    }

    /// The counters.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Segment pool slots in use (queued client packets; a chained packet takes several).
    pub fn pool_in_use(&self) -> usize {
        self.pool.in_use()
    }

    /// What the table's structures take.
    pub fn memory(&self) -> TableMemory {
        TableMemory {
            max_sessions: self.max_sessions,
            sessions: self.len(),
            index_slots: self.index.slots(),
            index_bytes: self.index.bytes(),
            entry_bytes: std::mem::size_of::<Session>(),
            link_bytes: std::mem::size_of::<Link>(),
            pool_bytes: self.pool.bytes(),
            pool_slots: self.pool.capacity(),
            pool_in_use: self.pool.in_use(),
        }
    }

    #[inline]
    fn find(&self, hash: u64, key: &FlowKey) -> Option<(usize, u32)> {
        let sessions = &self.sessions;
        self.index.find(hash, key, |e| sessions[e as usize].key)
    }

    /// The session for `key`, if any.
    pub fn get(&self, key: &FlowKey) -> Option<&Session> {
        self.find(self.hash(key), key)
            .map(|(_, e)| &self.sessions[e as usize])
    }

    /// Looks up a burst of keys at once: `found[i]` becomes the session of `keys[i]`. The
    /// loads of later keys are started while earlier ones are looked up (index slots 8 keys
    /// ahead, entries 4 ahead), so their cache misses overlap.
    ///
    /// # Panics
    /// When `found` is shorter than `keys`.
    pub fn get_batch<'a>(&'a self, keys: &[FlowKey], found: &mut [Option<&'a Session>]) {
        assert!(found.len() >= keys.len(), "found shorter than keys");
        let mut ring = HashRing::default();
        self.prime(&mut ring, keys.len(), |i| &keys[i]);
        for (i, key) in keys.iter().enumerate() {
            let hash = ring.peek(i);
            self.prefetch_ahead(&mut ring, i, keys.len(), |j| &keys[j]);
            found[i] = self
                .find(hash, key)
                .map(|(_, e)| &self.sessions[e as usize]);
        }
    }

    /// Hints the CPU to load what handling `key` will touch first (its index slot).
    #[inline]
    pub fn prefetch(&self, key: &FlowKey) {
        self.index.prefetch(self.hash(key));
    }

    /// Hashes the first keys of a burst and starts loading their index slots and entries.
    #[inline]
    fn prime<'k>(&self, ring: &mut HashRing, n: usize, key: impl Fn(usize) -> &'k FlowKey) {
        for j in 0..n.min(2 * AHEAD) {
            let hash = self.hash(key(j));
            ring.put(j, hash);
            self.index.prefetch(hash);
        }
        for j in 0..n.min(AHEAD) {
            self.prefetch_entry(ring.peek(j));
        }
    }

    /// While item `i` of `n` is handled: hash item `i + 2 * AHEAD` and start loading its
    /// index slot; start loading the entry of item `i + AHEAD` (its slot is there by now).
    #[inline]
    fn prefetch_ahead<'k>(
        &self,
        ring: &mut HashRing,
        i: usize,
        n: usize,
        key: impl Fn(usize) -> &'k FlowKey,
    ) {
        let j = i + 2 * AHEAD;
        if j < n {
            let hash = self.hash(key(j));
            ring.put(j, hash);
            self.index.prefetch(hash);
        }
        if i + AHEAD < n {
            self.prefetch_entry(ring.peek(i + AHEAD));
        }
    }

    /// Starts loading the entry (and its link) that the index most likely holds for `hash`.
    #[inline]
    fn prefetch_entry(&self, hash: u64) {
        if let Some(e) = self.index.candidate(hash) {
            if let Some(session) = self.sessions.get(e as usize) {
                prefetch(session);
                prefetch(&self.lists.entries[e as usize]);
            }
        }
    }

    /// Handles one captured client segment whose packet (`packet`, from the IPv4 header on)
    /// has already been rewritten to the target-facing `key`.
    pub fn on_client_packet(
        &mut self,
        key: FlowKey,
        packet: &[u8],
        seg: &ClientSegment,
        now: Duration,
        out: &mut dyn Output,
    ) {
        self.on_client_hashed(self.hash(&key), key, packet, seg, now, out);
    }

    /// Handles a burst of captured client segments, in order, as
    /// [`SessionTable::on_client_packet`] would one by one, loading the table entries of
    /// later packets while earlier ones are handled.
    pub fn on_client_burst(
        &mut self,
        burst: &[ClientPacket<'_>],
        now: Duration,
        out: &mut dyn Output,
    ) {
        let mut ring = HashRing::default();
        self.prime(&mut ring, burst.len(), |i| &burst[i].key);
        for (i, p) in burst.iter().enumerate() {
            let hash = ring.peek(i);
            self.prefetch_ahead(&mut ring, i, burst.len(), |j| &burst[j].key);
            self.on_client_hashed(hash, p.key, p.packet, &p.seg, now, out);
        }
    }

    fn on_client_hashed(
        &mut self,
        hash: u64,
        key: FlowKey,
        packet: &[u8],
        seg: &ClientSegment,
        now: Duration,
        out: &mut dyn Output,
    ) {
        self.now_ms = now.as_millis() as u64;
        if seg.flags.contains(TcpFlags::SYN) {
            self.on_client_syn(hash, key, packet, seg, now, out);
            return;
        }
        let Some((pos, idx)) = self.find(hash, &key) else {
            if self.start_mid_stream(hash, key, packet, seg, 0, now, out) {
                self.stats.mid_stream_created += 1;
            }
            return;
        };
        let session = &self.sessions[idx as usize];
        if session.is_closed()
            && self.limits.mid_stream
            && seg.payload_len > 0
            && !seg.flags.intersects(TcpFlags::RST | TcpFlags::SYN)
            && !seg.seq.before(session.snd_nxt)
            && session.restarts() < self.limits.max_reconstructions
        {
            // New data on a session the target ended (reset, or closed while the online
            // server kept the connection): rebuild it with a fabricated handshake.
            let restarts = session.restarts() + 1;
            self.remove_entry(idx, Some(pos), out);
            if self.start_mid_stream(hash, key, packet, seg, restarts, now, out) {
                self.stats.reconstructed += 1;
            }
            return;
        }
        let session = &mut self.sessions[idx as usize];
        if let Some(module) = self.module.as_deref_mut() {
            if seg.payload_len > 0 && !seg.seq.before(session.queued_end) {
                let offset = seg.seq.diff(session.client_isn.add(1)).max(0) as u32;
                let from_syn = !session.has(FAKE_SYN);
                module.client_payload(&key, offset, from_syn, payload_of(packet));
            }
        }
        let before = (session.last_response_at, session.is_closed());
        let mut cx = ctx!(self, out, now);
        let verdict = session.on_client(packet, seg, &mut cx);
        self.settle(idx, verdict, before, out);
    }

    /// A client segment of a session we have no entry for: captured mid-stream (tcpcopy
    /// started while the connection was open, or the SYN was lost on capture). With payload
    /// and mid-stream replay on, the session starts with a fabricated SYN just before the
    /// segment's first byte, and the segment waits for the handshake (spec §3.5). Returns true
    /// when a session was started.
    #[allow(clippy::too_many_arguments)]
    fn start_mid_stream(
        &mut self,
        hash: u64,
        key: FlowKey,
        packet: &[u8],
        seg: &ClientSegment,
        restarts: u8,
        now: Duration,
        out: &mut dyn Output,
    ) -> bool {
        if !self.limits.mid_stream
            || seg.payload_len == 0
            || seg.flags.intersects(TcpFlags::RST | TcpFlags::SYN)
        {
            self.stats.client_no_session += 1;
            return false;
        }
        let mut prefix: Option<Vec<u8>> = None;
        if let Some(module) = self.module.as_deref_mut() {
            if !module.accept_mid_stream(&key, payload_of(packet)) {
                self.stats.module_vetoed += 1;
                return false;
            }
            prefix = module.mid_stream_prefix(&key).filter(|p| !p.is_empty());
        }
        let prefix_len = prefix.as_ref().map_or(0, |p| p.len() as u32);
        let mut syn = std::mem::take(&mut self.scratch);
        let syn_seg = fabricate_syn(
            packet,
            seg.seq.add(u32::MAX).add(prefix_len.wrapping_neg()),
            self.limits.fake_syn_mss,
            &mut syn,
        );
        let created = match syn_seg {
            Some(syn_seg) => {
                let before = self.stats.created;
                self.on_client_syn(hash, key, &syn, &syn_seg, now, out);
                self.stats.created > before
            }
            None => false,
        };
        self.scratch = syn;
        let found = if created { self.find(hash, &key) } else { None };
        let Some((_, idx)) = found else {
            self.stats.client_no_session += 1;
            return false;
        };
        let session = &mut self.sessions[idx as usize];
        session.flags |= FAKE_SYN;
        session.set_restarts(restarts);
        let before = (session.last_response_at, session.is_closed());
        let mut cx = ctx!(self, out, now);
        let mut verdict = Verdict::Keep;
        if let Some(prefix) = prefix {
            // The module's bytes go first, just before the captured data.
            let mut buf = Vec::with_capacity(packet.len() + prefix.len());
            if let Some(pseg) = with_payload(packet, seg, &prefix, &mut buf) {
                cx.stats.module_prefixes += 1;
                verdict = session.on_client(&buf, &pseg, &mut cx);
            }
        }
        if verdict == Verdict::Keep {
            verdict = session.on_client(packet, seg, &mut cx);
        }
        self.settle(idx, verdict, before, out);
        true
    }

    fn on_client_syn(
        &mut self,
        hash: u64,
        key: FlowKey,
        packet: &[u8],
        seg: &ClientSegment,
        now: Duration,
        out: &mut dyn Output,
    ) {
        if seg.flags.contains(TcpFlags::ACK) {
            return; // A SYN-ACK from the client side: not a session we replay.
        }
        if let Some((pos, idx)) = self.find(hash, &key) {
            let old = &mut self.sessions[idx as usize];
            if old.client_isn == seg.seq && !old.is_closed() {
                self.stats.client_syn_retransmits += 1;
                return;
            }
            if old.is_closed() {
                self.stats.port_reuse_replaced += 1;
            } else {
                // The client reused the 4-tuple while we still replay the old session:
                // end the old one at the target so the new SYN is not taken as its duplicate.
                let mut cx = ctx!(self, out, now);
                old.reset_target(&mut cx);
                self.stats.port_reuse_resets += 1;
            }
            self.remove_entry(idx, Some(pos), out);
        }
        if self.len() >= self.max_sessions && !self.evict_one(now, out, Victims::NoData) {
            self.stats.table_full += 1;
            return;
        }
        // Every new session holds its SYN in the pool until the target answers. A flood of
        // spoofed SYNs (never answered, each kept for its retransmissions) would take every
        // slot long before the table fills, and the real sessions' requests would then find
        // no room: the last quarter of the pool is kept for data of sessions already replaying.
        // (Evicting would not help: idle and closed sessions hold no slots.)
        let free = self.pool.capacity() - self.pool.in_use();
        if free < self.pool.capacity() / POOL_RESERVE_DIVISOR {
            self.stats.table_full += 1;
            return;
        }
        let Some((id, stored)) =
            self.pool
                .alloc(packet, seg.seq, seg.seq_len(), seg.flags, seg.ack)
        else {
            self.stats.pool_exhausted += 1;
            return;
        };
        if stored == Stored::Chained {
            self.stats.chained_segments += 1;
        }
        let tick = Tick::from_duration(now);
        let mut session = Session::new(key, seg, tick);
        out.register(key);
        session.queued_bytes = self.pool.len(id) as u32;
        session.push_back(id, &mut self.pool);
        session.queued_end = seg.seq.add(1);
        {
            let mut cx = ctx!(self, out, now);
            session.send_segment(id, false, &mut cx);
        }
        session.queue.sent = 1;
        session.queue.unsent = NIL;
        session.snd_nxt = seg.seq.add(1);
        session.alarm = tick.add(self.limits.rto(0));
        session.flags |= RTO_ARMED;
        session.last_send_at = tick;
        self.stats.created += 1;
        self.stats.sent_syn += 1;
        self.stats.sent_segments += 1;
        let idx = self.alloc_entry(session);
        self.index.insert(hash, idx);
        self.file(idx, false);
    }

    /// Handles one reply of the target relayed by intercept.
    pub fn on_response(&mut self, resp: &Response, now: Duration, out: &mut dyn Output) {
        self.on_response_hashed(self.hash(&resp.key), resp, now, out);
    }

    /// Handles a burst of replies, in order, as [`SessionTable::on_response`] would one by
    /// one, loading the table entries of later replies while earlier ones are handled.
    pub fn on_response_burst(
        &mut self,
        responses: &[Response],
        now: Duration,
        out: &mut dyn Output,
    ) {
        let mut ring = HashRing::default();
        self.prime(&mut ring, responses.len(), |i| &responses[i].key);
        for (i, resp) in responses.iter().enumerate() {
            let hash = ring.peek(i);
            self.prefetch_ahead(&mut ring, i, responses.len(), |j| &responses[j].key);
            self.on_response_hashed(hash, resp, now, out);
        }
    }

    fn on_response_hashed(
        &mut self,
        hash: u64,
        resp: &Response,
        now: Duration,
        out: &mut dyn Output,
    ) {
        self.now_ms = now.as_millis() as u64;
        let Some((_, idx)) = self.find(hash, &resp.key) else {
            self.stats.response_no_session += 1;
            return;
        };
        let session = &mut self.sessions[idx as usize];
        let before = (session.last_response_at, session.is_closed());
        let mut cx = ctx!(self, out, now);
        let verdict = session.on_response(resp, &mut cx);
        self.settle(idx, verdict, before, out);
    }

    /// Runs due timers: at most `budget` sessions. Returns how many ran.
    pub fn run_timers(&mut self, now: Duration, budget: usize, out: &mut dyn Output) -> usize {
        self.now_ms = now.as_millis() as u64;
        let tick = Tick::from_duration(now);
        {
            let Self {
                wheel,
                lists,
                sessions,
                now_ms,
                ..
            } = self;
            let now_ms = *now_ms;
            wheel.advance(lists, now_ms, |e| {
                widen(now_ms, sessions[e as usize].scheduled)
            });
        }
        let mut ran = 0;
        while ran < budget {
            let Some(idx) = self.lists.front(READY).or_else(|| self.due_idle(tick)) else {
                break;
            };
            self.unfile(idx);
            ran += 1;
            let session = &mut self.sessions[idx as usize];
            let before = (session.last_response_at, session.is_closed());
            let mut cx = ctx!(self, out, now);
            let verdict = session.on_timer(&mut cx);
            self.settle(idx, verdict, before, out);
        }
        ran
    }

    /// The head of a FIFO whose deadline has come.
    fn due_idle(&self, now: Tick) -> Option<u32> {
        [CLOSED, IDLE_KEPT, IDLE_FRESH]
            .into_iter()
            .find_map(|list| {
                let idx = self.lists.front(list)?;
                now.reached(self.fifo_deadline(list, idx)).then_some(idx)
            })
    }

    /// The deadline of a session in one of the FIFOs.
    fn fifo_deadline(&self, list: usize, idx: u32) -> Tick {
        let session = &self.sessions[idx as usize];
        match list {
            CLOSED => session.alarm,
            IDLE_KEPT => session.last_response_at.add(self.limits.keepalive),
            _ => session.last_response_at.add(self.limits.timeout),
        }
    }

    /// The earliest pending deadline, for the caller's idle wait (for sessions deep in the
    /// timer wheel, the start of their bucket: a lower bound).
    pub fn next_deadline(&self) -> Option<Duration> {
        let mut best = self.wheel.next_deadline(&self.lists);
        for list in [CLOSED, IDLE_KEPT, IDLE_FRESH] {
            if let Some(idx) = self.lists.front(list) {
                let at = widen(self.now_ms, self.fifo_deadline(list, idx));
                best = Some(best.map_or(at, |b| b.min(at)));
            }
        }
        best.map(Duration::from_millis)
    }

    /// Ends every open session at the target (an RST each) and empties the table: what a
    /// clean stop owes the target.
    pub fn shutdown(&mut self, now: Duration, out: &mut dyn Output) {
        for idx in 0..self.sessions.len() {
            let session = &mut self.sessions[idx];
            if session.place() == Place::Free {
                continue;
            }
            let key = session.key;
            let mut cx = ctx!(self, out, now);
            if !session.is_closed() {
                session.reset_target(&mut cx);
                session.close(&mut cx);
            }
            session.free_queue(cx.pool);
            out.unregister(key);
            self.stats.removed += 1;
        }
        self.sessions.clear();
        self.lists.entries.clear();
        self.lists.clear_heads();
        self.wheel.clear();
        self.index.clear();
        self.free = NIL;
        self.closed = 0;
    }

    /// Sheds up to `count` sessions to relieve memory pressure, as a full table would: the
    /// oldest idle ones, closed ones first, each still open one reset at the target (counted in
    /// [`SessionStats::evicted`]). Busy sessions are kept. Returns how many were shed.
    pub fn shed(&mut self, count: usize, now: Duration, out: &mut dyn Output) -> usize {
        let mut shed = 0;
        while shed < count && self.evict_one(now, out, Victims::AnyIdle) {
            shed += 1;
        }
        shed
    }

    /// Evicts the oldest idle session of `victims` (closed ones first), resetting it at the
    /// target when it is still open. False when there is none.
    fn evict_one(&mut self, now: Duration, out: &mut dyn Output, victims: Victims) -> bool {
        let victim = self.lists.front(CLOSED).or_else(|| {
            let kept = match victims {
                Victims::AnyIdle => self.lists.front(IDLE_KEPT),
                Victims::NoData => None,
            };
            match (kept, self.lists.front(IDLE_FRESH)) {
                (Some(a), Some(b)) => {
                    let (ta, tb) = (
                        self.sessions[a as usize].last_response_at,
                        self.sessions[b as usize].last_response_at,
                    );
                    Some(if tb.reached(ta) { a } else { b })
                }
                (a, b) => a.or(b),
            }
        });
        let Some(idx) = victim else {
            return false;
        };
        let session = &mut self.sessions[idx as usize];
        if !session.is_closed() {
            let mut cx = ctx!(self, out, now);
            session.reset_target(&mut cx);
        }
        self.stats.evicted += 1;
        self.remove_entry(idx, None, out);
        true
    }

    fn alloc_entry(&mut self, session: Session) -> u32 {
        if self.free != NIL {
            let idx = self.free;
            self.free = self.lists.entries[idx as usize].next;
            self.lists.entries[idx as usize] = Link::UNLINKED;
            self.sessions[idx as usize] = session;
            idx
        } else {
            self.sessions.push(session);
            self.lists.entries.push(Link::UNLINKED);
            (self.sessions.len() - 1) as u32
        }
    }

    /// Removes a session: out of its list, its queue back to the pool, out of the index,
    /// its entry freed, CLIENT_DEL sent.
    fn remove_entry(&mut self, idx: u32, pos: Option<usize>, out: &mut dyn Output) {
        self.unfile(idx);
        let session = &mut self.sessions[idx as usize];
        let key = session.key;
        if session.is_closed() {
            self.closed -= 1;
        }
        session.free_queue(&mut self.pool);
        session.set_place(Place::Free);
        let pos = match pos {
            Some(pos) => pos,
            None => {
                self.find(self.hash(&key), &key)
                    .expect("a live session is indexed")
                    .0
            }
        };
        let sessions = &self.sessions;
        let hasher = self.hasher;
        self.index
            .remove_at(pos, |e| hasher.hash(&sessions[e as usize].key));
        self.lists.entries[idx as usize] = Link {
            prev: NIL,
            next: self.free,
        };
        self.free = idx;
        self.stats.removed += 1;
        out.unregister(key);
    }

    /// After an event: removes the session or files it where it now belongs.
    fn settle(&mut self, idx: u32, verdict: Verdict, before: (Tick, bool), out: &mut dyn Output) {
        let (last_response_at, was_closed) = before;
        let session = &self.sessions[idx as usize];
        if !was_closed && session.is_closed() {
            self.closed += 1;
        }
        match verdict {
            Verdict::Remove => self.remove_entry(idx, None, out),
            Verdict::Keep => {
                let touched = session.last_response_at != last_response_at;
                self.file(idx, touched);
            }
        }
    }

    /// Takes a session out of whatever list holds it.
    fn unfile(&mut self, idx: u32) {
        let session = &mut self.sessions[idx as usize];
        match session.place() {
            Place::Wheel => self.wheel.remove(&mut self.lists, idx),
            Place::IdleKept | Place::IdleFresh | Place::Closed => {
                self.lists.unlink(idx);
            }
            Place::None | Place::Free => {}
        }
        session.set_place(Place::None);
    }

    /// Files a session in the wheel (busy) or the FIFO of its kind (idle, closed). `touched`:
    /// a reply arrived, so an idle session moves to the back of its FIFO.
    fn file(&mut self, idx: u32, touched: bool) {
        let session = &mut self.sessions[idx as usize];
        let want = session.wanted_place();
        let have = session.place();
        if want == have {
            match want {
                Place::Wheel => {
                    let deadline = session.deadline(&self.limits);
                    if session.scheduled.reached(deadline) && session.scheduled != deadline {
                        // Earlier than filed: move. (Later: the wheel wakes it early, lazily.)
                        self.wheel.remove(&mut self.lists, idx);
                        session.scheduled = deadline;
                        let when = widen(self.now_ms, deadline);
                        self.wheel.insert(&mut self.lists, idx, when);
                    }
                }
                Place::IdleKept | Place::IdleFresh if touched => {
                    self.lists.unlink(idx);
                    let list = if want == Place::IdleKept {
                        IDLE_KEPT
                    } else {
                        IDLE_FRESH
                    };
                    self.lists.push_back(list, idx);
                }
                _ => {}
            }
            return;
        }
        if have != Place::None {
            self.unfile(idx);
        }
        let session = &mut self.sessions[idx as usize];
        match want {
            Place::Wheel => {
                let deadline = session.deadline(&self.limits);
                session.scheduled = deadline;
                let when = widen(self.now_ms, deadline);
                self.wheel.insert(&mut self.lists, idx, when);
            }
            Place::IdleKept => self.lists.push_back(IDLE_KEPT, idx),
            Place::IdleFresh => self.lists.push_back(IDLE_FRESH, idx),
            Place::Closed => self.lists.push_back(CLOSED, idx),
            Place::None | Place::Free => unreachable!("wanted_place is a list"),
        }
        session.set_place(want);
    }
}

/// A tick as an absolute ms time near `now_ms` (ticks wrap at 2^32 ms).
fn widen(now_ms: u64, tick: Tick) -> u64 {
    let delta = i64::from(tick.0.wrapping_sub(now_ms as u32) as i32);
    (now_ms as i64 + delta).max(0) as u64
}

#[cfg(test)]
impl SessionTable {
    /// Checks the table's invariants: every live entry indexed under its key and filed in
    /// exactly the list its place names, counts right, pool slots all owned by queues.
    fn check(&self) {
        let mut live = 0;
        let mut closed = 0;
        let mut queued = 0;
        for (idx, session) in self.sessions.iter().enumerate() {
            if session.place() == Place::Free {
                continue;
            }
            live += 1;
            closed += usize::from(session.is_closed());
            queued += session.queued();
            let found = self
                .find(self.hash(&session.key), &session.key)
                .map(|(_, e)| e);
            assert_eq!(found, Some(idx as u32), "{:?} indexed", session.key);
            assert_eq!(session.place(), session.wanted_place(), "{:?}", session.key);
        }
        assert_eq!(live, self.len());
        assert_eq!(closed, self.closed);
        assert_eq!(queued, self.pool.in_use(), "pool slots owned by queues");
        let mut filed = 0;
        for list in 0..LISTS {
            for idx in self.lists.iter(list) {
                filed += 1;
                let want = match list {
                    IDLE_KEPT => Place::IdleKept,
                    IDLE_FRESH => Place::IdleFresh,
                    CLOSED => Place::Closed,
                    _ => Place::Wheel,
                };
                assert_eq!(self.sessions[idx as usize].place(), want, "list {list}");
            }
        }
        assert_eq!(filed, live, "every session in exactly one list");
    }
}

#[cfg(test)]
mod tests {
    use super::super::Pacing;
    use super::*;
    use crate::wire::tcp::{emit_ipv4_tcp, TcpRepr};
    use crate::wire::SeqNum;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::net::{Ipv4Addr, SocketAddrV4};

    #[derive(Debug, Default)]
    struct Rec {
        sent: Vec<Vec<u8>>,
        registered: Vec<FlowKey>,
        unregistered: Vec<FlowKey>,
        latencies: Vec<Duration>,
    }

    impl Output for Rec {
        fn transmit(&mut self, packet: &[u8]) {
            self.sent.push(packet.to_vec());
        }
        fn register(&mut self, key: FlowKey) {
            self.registered.push(key);
        }
        fn unregister(&mut self, key: FlowKey) {
            self.unregistered.push(key);
        }
        fn reply_latency(&mut self, latency: Duration) {
            self.latencies.push(latency);
        }
    }

    impl Rec {
        /// (destination port... the client port, flags, seq) of each sent packet; clears.
        fn take(&mut self) -> Vec<(u16, TcpFlags, u32)> {
            self.sent
                .drain(..)
                .map(|p| {
                    let ip = crate::wire::Ipv4Packet::new_checked(&p[..]).unwrap();
                    let tcp = crate::wire::TcpPacket::new_checked(ip.payload()).unwrap();
                    (tcp.src_port(), tcp.flags(), tcp.seq_number().0)
                })
                .collect()
        }
    }

    const ISN: u32 = 1000;
    const T_ISN: u32 = 500_000;
    const PA: TcpFlags = TcpFlags(0x18);

    fn key(port: u16) -> FlowKey {
        FlowKey::new(
            SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), port),
            SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 2), 80),
        )
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn packet(port: u16, flags: TcpFlags, seq: u32, payload: &[u8]) -> (Vec<u8>, ClientSegment) {
        let k = key(port);
        let repr = TcpRepr {
            src_port: port,
            dst_port: 80,
            seq: SeqNum(seq),
            ack: SeqNum(if flags.contains(TcpFlags::ACK) {
                7001
            } else {
                0
            }),
            flags,
            window: 1000,
            mss: None,
            window_scale: None,
            sack_permitted: false,
            timestamps: None,
            payload_len: payload.len(),
        };
        let mut buf = Vec::new();
        emit_ipv4_tcp(&mut buf, k.client_ip, k.target_ip, 1, 64, &repr, payload);
        let seg = ClientSegment::parse(&buf).unwrap();
        (buf, seg)
    }

    fn response(port: u16, flags: TcpFlags, seq: u32, ack: u32, len: u32) -> Response {
        Response {
            key: key(port),
            seq: SeqNum(seq),
            ack: SeqNum(ack),
            flags,
            window: 65535,
            payload_len: len,
            timestamps: None,
            window_scale: None,
        }
    }

    fn syn(t: &mut SessionTable, out: &mut Rec, port: u16, isn: u32, now: Duration) {
        let (p, s) = packet(port, TcpFlags::SYN, isn, b"");
        t.on_client_packet(key(port), &p, &s, now, out);
    }

    fn synack(t: &mut SessionTable, out: &mut Rec, port: u16, isn: u32, now: Duration) {
        let r = response(port, TcpFlags::SYN | TcpFlags::ACK, T_ISN, isn + 1, 0);
        t.on_response(&r, now, out);
    }

    fn data(t: &mut SessionTable, out: &mut Rec, port: u16, seq: u32, len: usize, now: Duration) {
        let (p, s) = packet(port, PA, seq, &vec![b'x'; len]);
        t.on_client_packet(key(port), &p, &s, now, out);
    }

    fn small(max_sessions: usize) -> SessionConfig {
        SessionConfig {
            max_sessions,
            pool_segments: 64,
            pool_small_segments: 256,
            ..SessionConfig::default()
        }
    }

    #[test]
    fn entry_is_compact() {
        assert_eq!(std::mem::size_of::<Session>(), 104);
        assert_eq!(std::mem::size_of::<Link>(), 8);
        let t = SessionTable::new(SessionConfig {
            max_sessions: 1_000_000,
            pool_segments: 0,
            pool_small_segments: 0,
            ..SessionConfig::default()
        });
        let m = t.memory();
        assert_eq!(m.index_slots, 1 << 21);
        assert!(m.bytes_per_session() <= 128.0, "{}", m.bytes_per_session());
    }

    #[test]
    fn sessions_are_found_removed_and_their_entries_reused() {
        let mut t = SessionTable::new(SessionConfig {
            linger: ms(0),
            ..small(64)
        });
        let mut out = Rec::default();
        for port in 0..64 {
            syn(&mut t, &mut out, port, ISN, ms(1));
        }
        assert_eq!(t.len(), 64);
        t.check();
        // A target RST closes; with no linger the next timer run removes (backward shift).
        for port in (0..64).step_by(3) {
            t.on_response(&response(port, TcpFlags::RST, 0, 0, 0), ms(2), &mut out);
        }
        assert_eq!(t.active(), 64 - 22);
        t.run_timers(ms(2), usize::MAX, &mut out);
        assert_eq!(t.len(), 64 - 22);
        t.check();
        for port in 0..64 {
            assert_eq!(t.get(&key(port)).is_some(), port % 3 != 0, "port {port}");
        }
        // Freed entries are taken again; the entry array does not grow.
        let entries = t.sessions.len();
        for port in 100..122 {
            syn(&mut t, &mut out, port, ISN, ms(3));
        }
        assert_eq!(t.len(), 64);
        assert_eq!(t.sessions.len(), entries);
        t.check();
        assert_eq!(t.stats().removed, 22);
    }

    #[test]
    fn full_table_evicts_the_oldest_idle_session() {
        // Without mid-stream replay a target RST closes a session (instead of rebuilding it).
        let mut t = SessionTable::new(SessionConfig {
            mid_stream: false,
            ..small(3)
        });
        let mut out = Rec::default();
        for (i, port) in [1u16, 2, 3].into_iter().enumerate() {
            syn(&mut t, &mut out, port, ISN, ms(i as u64));
            synack(&mut t, &mut out, port, ISN, ms(i as u64));
        }
        // Session 1 answers again (a window update): now session 2 is the oldest idle one.
        t.on_response(
            &response(1, TcpFlags::ACK, T_ISN + 1, ISN + 1, 0),
            ms(5),
            &mut out,
        );
        // Session 3 has a request in flight: busy, not idle.
        data(&mut t, &mut out, 3, ISN + 1, 10, ms(6));
        out.take();
        syn(&mut t, &mut out, 4, ISN, ms(7));
        let sent = out.take();
        assert_eq!(
            sent,
            vec![
                (2, TcpFlags::RST | TcpFlags::ACK, ISN + 1),
                (4, TcpFlags::SYN, ISN)
            ],
            "the evicted session is reset at the target, then the new SYN goes out"
        );
        assert_eq!(out.unregistered, vec![key(2)]);
        assert_eq!(t.stats().evicted, 1);
        assert!(t.get(&key(2)).is_none() && t.get(&key(4)).is_some());
        t.check();
        // A closed session goes first, without an RST (it is over at the target already).
        t.on_response(&response(3, TcpFlags::RST, 0, 0, 0), ms(8), &mut out);
        syn(&mut t, &mut out, 5, ISN, ms(9));
        assert_eq!(out.take(), vec![(5, TcpFlags::SYN, ISN)]);
        assert!(t.get(&key(3)).is_none());
        assert_eq!(t.stats().evicted, 2);
        t.check();
        // Then session 1 (idle); then nothing is idle: the SYN is dropped.
        syn(&mut t, &mut out, 6, ISN, ms(10));
        assert!(t.get(&key(1)).is_none());
        syn(&mut t, &mut out, 7, ISN, ms(11));
        assert!(t.get(&key(7)).is_none());
        assert_eq!((t.stats().evicted, t.stats().table_full), (3, 1));
        assert_eq!(
            t.pool_in_use(),
            3,
            "the three SYNs in flight; nothing leaked"
        );
        t.check();
    }

    /// A SYN the target never answers is retransmitted until the session gives up, but its
    /// route is registered only twice (with the SYN and once more at the first retry): a flood
    /// of unanswered SYNs does not multiply the control channel's load by the retries.
    #[test]
    fn an_unanswered_syn_is_registered_twice_whatever_its_retries() {
        let mut t = SessionTable::new(small(4));
        let mut out = Rec::default();
        syn(&mut t, &mut out, 1, ISN, ms(0));
        let mut at = 0;
        while t.get(&key(1)).is_some_and(|s| !s.is_closed()) && at < 120_000 {
            at += 100;
            t.run_timers(ms(at), 1024, &mut out);
        }
        let syns = out
            .take()
            .iter()
            .filter(|(_, f, _)| f.contains(TcpFlags::SYN))
            .count();
        assert!(syns >= 4, "the SYN was retransmitted ({syns} sent)");
        assert!(t.stats().gave_up >= 1);
        assert_eq!(out.registered, vec![key(1), key(1)]);
    }

    #[test]
    fn new_sessions_never_evict_one_that_exchanged_data() {
        let mut t = SessionTable::new(SessionConfig {
            mid_stream: false,
            ..small(3)
        });
        let mut out = Rec::default();
        // Session 1 exchanged a request and its answer, long ago: idle, with data.
        syn(&mut t, &mut out, 1, ISN, ms(0));
        synack(&mut t, &mut out, 1, ISN, ms(0));
        data(&mut t, &mut out, 1, ISN + 1, 10, ms(1));
        t.on_response(
            &response(1, TcpFlags::ACK | TcpFlags::PSH, T_ISN + 1, ISN + 11, 20),
            ms(2),
            &mut out,
        );
        // A flood: SYNs that are answered but never carry data fill the rest and keep coming.
        for port in 100u16..140 {
            syn(&mut t, &mut out, port, ISN, ms(1000 + u64::from(port)));
            synack(&mut t, &mut out, port, ISN, ms(1000 + u64::from(port)));
        }
        assert!(
            t.get(&key(1)).is_some(),
            "the session with data survives the flood"
        );
        assert_eq!(t.stats().evicted, 38, "flood sessions shed their own kind");
        // Only flood sessions were reset at the target.
        assert!(out.unregistered.iter().all(|k| *k != key(1)));
        // With no session without data left idle, a newcomer is refused, not given a slot.
        data(&mut t, &mut out, 139, ISN + 1, 5, ms(3000));
        data(&mut t, &mut out, 138, ISN + 1, 5, ms(3000));
        syn(&mut t, &mut out, 200, ISN, ms(3001));
        assert!(t.get(&key(200)).is_none());
        assert_eq!(t.stats().table_full, 1);
        assert!(t.get(&key(1)).is_some());
        // Memory pressure may still shed it (the oldest idle session).
        out.take();
        assert_eq!(t.shed(1, ms(3002), &mut out), 1);
        assert!(t.get(&key(1)).is_none());
        t.check();
    }

    #[test]
    fn shed_takes_idle_sessions_oldest_first_and_keeps_busy_ones() {
        let mut t = SessionTable::new(SessionConfig {
            mid_stream: false,
            ..small(8)
        });
        let mut out = Rec::default();
        for port in 1u16..=4 {
            syn(&mut t, &mut out, port, ISN, ms(u64::from(port)));
            synack(&mut t, &mut out, port, ISN, ms(u64::from(port)));
        }
        // Session 4 has a request in flight: busy.
        data(&mut t, &mut out, 4, ISN + 1, 10, ms(6));
        out.take();
        assert_eq!(t.shed(2, ms(7), &mut out), 2);
        assert_eq!(
            out.take(),
            vec![
                (1, TcpFlags::RST | TcpFlags::ACK, ISN + 1),
                (2, TcpFlags::RST | TcpFlags::ACK, ISN + 1)
            ],
            "the two oldest idle sessions are reset at the target"
        );
        assert_eq!(out.unregistered, vec![key(1), key(2)]);
        assert!(t.get(&key(3)).is_some() && t.get(&key(4)).is_some());
        t.check();
        // Only session 3 is idle: asking for more sheds what there is.
        assert_eq!(t.shed(10, ms(8), &mut out), 1);
        assert_eq!(t.shed(10, ms(9), &mut out), 0);
        assert_eq!((t.len(), t.stats().evicted), (1, 3));
        assert!(t.get(&key(4)).is_some(), "the busy session stays");
        t.check();
    }

    /// A flood of SYNs that are never answered cannot take the pool's reserve: new sessions
    /// are refused (`table_full`) once a quarter of the slots is left, and an established
    /// session's requests still find room.
    #[test]
    fn unanswered_syns_leave_the_pool_reserve_to_real_sessions() {
        let config = SessionConfig {
            pool_small_segments: 12,
            pool_segments: 4,
            ..small(64)
        };
        let mut t = SessionTable::new(config);
        let mut out = Rec::default();
        syn(&mut t, &mut out, 1, ISN, ms(0));
        synack(&mut t, &mut out, 1, ISN, ms(1));
        // 16 slots (the real session's SYN was acknowledged): a SYN gets in while at least 4
        // are free, so 13 do and 3 stay free.
        for port in 100..140 {
            syn(&mut t, &mut out, port, ISN, ms(2));
        }
        assert_eq!(t.len(), 1 + 13);
        assert_eq!(t.stats().table_full, 40 - 13);
        assert_eq!((t.stats().pool_exhausted, t.pool_in_use()), (0, 13));
        // The real session's next requests are queued from the reserve.
        for i in 0..3 {
            data(&mut t, &mut out, 1, ISN + 1 + 10 * i, 10, ms(3));
        }
        assert_eq!(t.stats().pool_exhausted, 0);
        assert_eq!(t.get(&key(1)).unwrap().queued(), 3);
        t.check();
    }

    #[test]
    fn pool_exhaustion_is_counted_and_handled_like_a_full_queue() {
        let config = SessionConfig {
            pool_small_segments: 2,
            pool_segments: 1,
            pacing: Pacing::NoWait,
            ..small(8)
        };
        let mut t = SessionTable::new(config);
        let mut out = Rec::default();
        syn(&mut t, &mut out, 1, ISN, ms(0));
        synack(&mut t, &mut out, 1, ISN, ms(1));
        data(&mut t, &mut out, 1, ISN + 1, 10, ms(2));
        data(&mut t, &mut out, 1, ISN + 11, 10, ms(2));
        data(&mut t, &mut out, 1, ISN + 21, 10, ms(2)); // falls back to the 2 KiB slot
        data(&mut t, &mut out, 1, ISN + 31, 10, ms(2));
        assert_eq!(t.stats().pool_exhausted, 1);
        assert_eq!(t.get(&key(1)).unwrap().queued(), 3);
        // A new SYN cannot be queued either: no session.
        syn(&mut t, &mut out, 2, ISN, ms(3));
        assert!(t.get(&key(2)).is_none());
        assert_eq!(t.stats().pool_exhausted, 2);
        t.check();
        // The target acknowledges: slots come back, the client's retransmission gets in.
        let ack = response(1, TcpFlags::ACK, T_ISN + 1, ISN + 31, 0);
        t.on_response(&ack, ms(4), &mut out);
        assert_eq!(t.pool_in_use(), 0);
        data(&mut t, &mut out, 1, ISN + 31, 10, ms(5));
        assert_eq!(t.get(&key(1)).unwrap().queued(), 1);
        t.check();
    }

    #[test]
    fn timer_churn_does_not_grow_memory() {
        let config = SessionConfig {
            pacing: Pacing::NoWait,
            rto_initial: ms(30),
            ..small(128)
        };
        let mut t = SessionTable::new(config);
        let mut out = Rec::default();
        for port in 0..100 {
            syn(&mut t, &mut out, port, ISN, ms(0));
            synack(&mut t, &mut out, port, ISN, ms(0));
        }
        let memory = t.memory();
        let entries = (t.sessions.capacity(), t.lists.entries.capacity());
        let mut seq = vec![ISN + 1; 100];
        for round in 0..2000u64 {
            let now = ms(1 + round / 4);
            for port in 0..100u16 {
                let p = usize::from(port);
                data(&mut t, &mut out, port, seq[p], 20, now);
                seq[p] += 20;
                // Every other round the target acknowledges: the RTO moves later, or goes.
                if (round + u64::from(port)) % 2 == 0 {
                    let ack = response(port, TcpFlags::ACK, T_ISN + 1, seq[p], 0);
                    t.on_response(&ack, now, &mut out);
                }
            }
            t.run_timers(now, usize::MAX, &mut out);
            out.sent.clear();
        }
        assert_eq!(
            TableMemory {
                pool_in_use: 0,
                ..t.memory()
            },
            memory
        );
        assert_eq!((t.sessions.capacity(), t.lists.entries.capacity()), entries);
        assert_eq!(t.len(), 100);
        t.check();
    }

    #[test]
    fn reply_latency_is_reported_once_per_request() {
        let mut t = SessionTable::new(small(8));
        let mut out = Rec::default();
        syn(&mut t, &mut out, 1, ISN, ms(0));
        synack(&mut t, &mut out, 1, ISN, ms(1));
        let us = Duration::from_micros;
        data(&mut t, &mut out, 1, ISN + 1, 10, us(10_000));
        data(&mut t, &mut out, 1, ISN + 11, 10, us(10_100));
        let reply = response(1, PA, T_ISN + 1, ISN + 21, 100);
        t.on_response(&reply, us(10_250), &mut out);
        let more = response(1, PA, T_ISN + 101, ISN + 21, 100);
        t.on_response(&more, us(10_400), &mut out);
        assert_eq!(
            out.latencies,
            vec![us(250)],
            "from the first request byte sent"
        );
        // The client's next request (it acknowledged 200 response bytes).
        let (p, mut s) = packet(1, PA, ISN + 21, b"next");
        s.ack = SeqNum(7001 + 200);
        t.on_client_packet(key(1), &p, &s, us(20_000), &mut out);
        let reply = response(1, PA, T_ISN + 201, ISN + 25, 10);
        t.on_response(&reply, us(21_000), &mut out);
        assert_eq!(out.latencies, vec![us(250), us(1000)]);
    }

    #[test]
    fn bursts_and_batches_match_one_by_one() {
        let config = SessionConfig {
            pacing: Pacing::NoWait,
            ..small(64)
        };
        let mut one = SessionTable::new(config.clone());
        let mut burst = SessionTable::new(config);
        let (mut out1, mut out2) = (Rec::default(), Rec::default());
        for port in 0..40 {
            for (t, out) in [(&mut one, &mut out1), (&mut burst, &mut out2)] {
                syn(t, out, port, ISN, ms(0));
                synack(t, out, port, ISN, ms(0));
            }
        }
        let packets: Vec<(FlowKey, Vec<u8>, ClientSegment)> = (0..100u32)
            .map(|i| {
                let port = (i * 7 % 45) as u16; // some with no session
                let (p, s) = packet(port, PA, ISN + 1 + i * 8, b"abcdefgh");
                (key(port), p, s)
            })
            .collect();
        for (k, p, s) in &packets {
            one.on_client_packet(*k, p, s, ms(1), &mut out1);
        }
        let batch: Vec<ClientPacket<'_>> = packets
            .iter()
            .map(|(key, packet, seg)| ClientPacket {
                key: *key,
                packet,
                seg: *seg,
            })
            .collect();
        burst.on_client_burst(&batch, ms(1), &mut out2);
        assert_eq!(out1.sent, out2.sent);
        assert_eq!(one.stats(), burst.stats());
        let keys: Vec<FlowKey> = (0..50).map(key).collect();
        let mut found = vec![None; keys.len()];
        burst.get_batch(&keys, &mut found);
        for (k, f) in keys.iter().zip(&found) {
            assert_eq!(f.map(|s| s.key()), burst.get(k).map(|s| s.key()));
        }
        // The five ports with no session started mid-stream (a fabricated SYN each).
        assert_eq!(found.iter().filter(|f| f.is_some()).count(), 45);
        assert_eq!(burst.stats().mid_stream_created, 5);
    }

    #[test]
    fn shutdown_resets_frees_and_the_table_is_reusable() {
        let mut t = SessionTable::new(small(8));
        let mut out = Rec::default();
        for port in 0..8 {
            syn(&mut t, &mut out, port, ISN, ms(0));
        }
        synack(&mut t, &mut out, 3, ISN, ms(1));
        data(&mut t, &mut out, 3, ISN + 1, 10, ms(1));
        out.take();
        t.shutdown(ms(2), &mut out);
        assert_eq!(out.take().len(), 8, "one RST each");
        assert_eq!((t.len(), t.pool_in_use(), t.active()), (0, 0, 0));
        assert_eq!(t.next_deadline(), None);
        syn(&mut t, &mut out, 1, ISN, ms(3));
        assert_eq!(t.len(), 1);
        t.check();
    }

    /// Sequence numbers of the session's queue, head first.
    fn queue_seqs(t: &SessionTable, port: u16) -> Vec<u32> {
        let s = t.get(&key(port)).unwrap();
        let mut out = Vec::new();
        let mut id = s.queue.head;
        while id != NIL {
            out.push(t.pool.seq(id).0);
            id = t.pool.next(id);
        }
        assert_eq!(out.len(), s.queued());
        out
    }

    #[test]
    fn reordered_segments_are_queued_in_sequence_order() {
        let mut t = SessionTable::new(small(8));
        let mut out = Rec::default();
        syn(&mut t, &mut out, 1, ISN, ms(0));
        // Held behind the handshake: captured out of order, with a duplicate.
        for seq in [ISN + 21, ISN + 1, ISN + 31, ISN + 11, ISN + 11] {
            data(&mut t, &mut out, 1, seq, 10, ms(1));
        }
        assert_eq!(t.stats().client_retransmits, 1);
        assert_eq!(
            queue_seqs(&t, 1),
            vec![ISN, ISN + 1, ISN + 11, ISN + 21, ISN + 31]
        );
        out.take();
        synack(&mut t, &mut out, 1, ISN, ms(2));
        let sent: Vec<u32> = out.take().iter().map(|p| p.2).collect();
        assert_eq!(sent, vec![ISN + 1, ISN + 1, ISN + 11, ISN + 21, ISN + 31]);
        // A client RST goes behind what was sent, whatever its sequence number.
        let (p, s) = packet(1, TcpFlags::RST | TcpFlags::ACK, ISN + 5, b"");
        t.on_client_packet(key(1), &p, &s, ms(3), &mut out);
        let sent = out.take();
        assert_eq!(sent.len(), 1);
        assert!(sent[0].1.contains(TcpFlags::RST));
        assert_eq!(sent[0].2, ISN + 41, "at our next byte");
        assert!(t.get(&key(1)).unwrap().is_closed());
        assert_eq!(t.pool_in_use(), 0, "a closed session holds no slots");
        t.check();
    }

    #[test]
    fn packets_beyond_a_slot_are_chained_and_sent_whole() {
        let config = SessionConfig {
            rto_initial: ms(100),
            ..small(8)
        };
        let mut t = SessionTable::new(config);
        let mut out = Rec::default();
        syn(&mut t, &mut out, 1, ISN, ms(0));
        synack(&mut t, &mut out, 1, ISN, ms(0));
        out.take();
        let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let (p, s) = packet(1, PA, ISN + 1, &payload);
        t.on_client_packet(key(1), &p, &s, ms(1), &mut out);
        assert_eq!(t.stats().chained_segments, 1);
        assert_eq!(t.pool_in_use(), 3);
        let check = |sent: &[u8]| {
            let ip = crate::wire::Ipv4Packet::new_checked(sent).unwrap();
            assert!(ip.verify_checksum());
            let tcp = crate::wire::TcpPacket::new_checked(ip.payload()).unwrap();
            assert!(tcp.verify_checksum(ip.src_addr(), ip.dst_addr()));
            assert_eq!(tcp.payload(), &payload[..]);
            assert_eq!(tcp.ack_number(), SeqNum(T_ISN + 1));
        };
        check(&out.sent[0]);
        out.sent.clear();
        // Not acknowledged: the retransmission is whole too.
        t.run_timers(ms(101), usize::MAX, &mut out);
        assert_eq!(out.sent.len(), 1);
        check(&out.sent[0]);
        let ack = response(1, TcpFlags::ACK, T_ISN + 1, ISN + 5001, 0);
        t.on_response(&ack, ms(102), &mut out);
        assert_eq!(t.pool_in_use(), 0);
        t.check();
    }

    #[test]
    fn the_synack_window_is_not_scaled() {
        let config = SessionConfig {
            pacing: Pacing::NoWait,
            ..small(8)
        };
        let mut t = SessionTable::new(config);
        let mut out = Rec::default();
        // The client offers window scaling, the target answers with scale 7 and window 100.
        let k = key(1);
        let repr = TcpRepr {
            src_port: 1,
            dst_port: 80,
            seq: SeqNum(ISN),
            ack: SeqNum(0),
            flags: TcpFlags::SYN,
            window: 1000,
            mss: None,
            window_scale: Some(7),
            sack_permitted: false,
            timestamps: None,
            payload_len: 0,
        };
        let mut p = Vec::new();
        emit_ipv4_tcp(&mut p, k.client_ip, k.target_ip, 1, 64, &repr, &[]);
        let s = ClientSegment::parse(&p).unwrap();
        t.on_client_packet(k, &p, &s, ms(0), &mut out);
        let mut r = response(1, TcpFlags::SYN | TcpFlags::ACK, T_ISN, ISN + 1, 0);
        r.window = 100;
        r.window_scale = Some(7);
        t.on_response(&r, ms(1), &mut out);
        out.take();
        for i in 0..3 {
            data(&mut t, &mut out, 1, ISN + 1 + 60 * i, 60, ms(2));
        }
        assert_eq!(
            out.take().len(),
            1,
            "100 bytes of window: one 60-byte segment"
        );
        // The next reply's window is scaled: 100 << 7 bytes.
        let r = response(1, TcpFlags::ACK, T_ISN + 1, ISN + 1, 100);
        t.on_response(&r, ms(3), &mut out);
        let seqs: Vec<u32> = out.take().iter().map(|p| p.2).collect();
        assert_eq!(seqs, vec![ISN + 61, ISN + 121], "both go in 12800 bytes");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Syn(u16),
        SynAck(u16),
        Reset(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u16..40).prop_map(Op::Syn),
            (0u16..40).prop_map(Op::SynAck),
            (0u16..40).prop_map(Op::Reset),
        ]
    }

    proptest! {
        /// The table against a model: a set of keys with the order in which they became (or
        /// were last heard from as) idle, for eviction.
        #[test]
        fn behaves_like_a_model(ops in proptest::collection::vec(op(), 1..300)) {
            const MAX: usize = 24;
            let mut t = SessionTable::new(SessionConfig { linger: ms(0), ..small(MAX) });
            let mut out = Rec::default();
            let mut present: HashSet<u16> = HashSet::new();
            let mut syn_sent: HashSet<u16> = HashSet::new();
            let mut idle: Vec<u16> = Vec::new();
            let mut isn = 1u32;
            for (step, op) in ops.iter().enumerate() {
                let now = ms(step as u64 + 1);
                match *op {
                    Op::Syn(p) => {
                        isn += 1000;
                        syn(&mut t, &mut out, p, isn, now);
                        if present.contains(&p) {
                            idle.retain(|&q| q != p);
                            syn_sent.insert(p);
                        } else if present.len() < MAX {
                            present.insert(p);
                            syn_sent.insert(p);
                        } else if !idle.is_empty() {
                            let victim = idle.remove(0);
                            present.remove(&victim);
                            present.insert(p);
                            syn_sent.insert(p);
                        }
                    }
                    Op::SynAck(p) => {
                        let Some(s) = t.get(&key(p)) else { continue };
                        let isn = s.client_isn.0;
                        synack(&mut t, &mut out, p, isn, now);
                        syn_sent.remove(&p);
                        idle.retain(|&q| q != p);
                        idle.push(p);
                    }
                    Op::Reset(p) => {
                        t.on_response(&response(p, TcpFlags::RST, 0, 0, 0), now, &mut out);
                        present.remove(&p);
                        syn_sent.remove(&p);
                        idle.retain(|&q| q != p);
                    }
                }
                t.run_timers(now, usize::MAX, &mut out);
                t.check();
                for p in 0..40 {
                    prop_assert_eq!(t.get(&key(p)).is_some(), present.contains(&p), "port {}", p);
                }
                prop_assert_eq!(t.len(), present.len());
                prop_assert_eq!(t.pool_in_use(), syn_sent.len());
            }
        }
    }
}
