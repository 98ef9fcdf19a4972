//! The control channel over UDP (a tcpcopy-rs extension; the C tools speak only TCP): batches
//! of route messages and response records in datagrams, each with a sequence number so loss is
//! counted, reordering tolerated and replays rejected, and nothing waits behind a lost
//! datagram (no head-of-line blocking).
//!
//! # Datagram layout (all integers big-endian)
//!
//! ```text
//!   0   2  magic "TU" (54 55)
//!   2   1  version 2 (version 1 had no tally; the two do not talk: a datagram of the other
//!             version is rejected and counted)
//!   3   1  kind: 1 HELLO (tcpcopy -> intercept), 2 HELLO_ACK (intercept -> tcpcopy),
//!               3 MESSAGES (tcpcopy -> intercept), 4 RECORDS (intercept -> tcpcopy)
//!   4   1  flags: 0x01 MAC: a 16-byte tag ends the datagram (authentication on)
//!                 0x02 KEYED: HELLO of an established session (sent with its epoch and
//!                      sequence, MAC'd with the session key); without it a HELLO opens one
//!                 0x04 PAYLOAD: RECORDS hold 192-byte records (else 64)
//!   5   1  count: messages or records in the body
//!   6   2  zero
//!   8   8  session: tcpcopy's random id for this intercept (chosen when tcpcopy starts)
//!  16   8  epoch: the first 8 bytes of intercept's nonce Ni for the session; 0 in an
//!             opening HELLO
//!  24   8  sequence: per session and direction, from 1; 0 in an opening HELLO
//!  32   .  body:
//!             HELLO      32 bytes: Nc, tcpcopy's nonce for this session (16), tally (16)
//!             HELLO_ACK  48 bytes: Ni (16), then Nc echoed (16), tally (16)
//!             MESSAGES   count x 14 bytes: msg_clt_t exactly as on TCP (CLIENT_ADD/DEL)
//!             RECORDS    count x 64 (or 192) bytes: msg_server_t exactly as on TCP
//!   .  16  (flag MAC) HMAC-SHA256 tag truncated to 16 bytes over all bytes before it (the
//!             tally included); keys in [`auth`](crate::control::auth)
//!
//!  tally (a [`Tally`]; zero in an opening HELLO, ignored there):
//!   0   8  items: messages (tcpcopy) or records (intercept) in the datagrams of this session
//!             numbered before this one and handed to the socket
//!   8   8  skipped: sequence numbers of this session used by datagrams that the socket then
//!             refused (so the receiver does not count them lost on the way)
//! ```
//!
//! A datagram is at most [`MAX_DATAGRAM`] bytes (1472: one Ethernet frame, no IP fragments):
//! up to 22 records of 64 bytes, 7 of 192, or 101 messages.
//!
//! # Exchange
//!
//! tcpcopy sends HELLO (Nc) to each intercept until a HELLO_ACK echoing Nc arrives; then the
//! session `(session, Ni)` is up: it sends a KEYED HELLO at once and every keepalive interval,
//! and MESSAGES as routes come and go. intercept answers every HELLO with a HELLO_ACK, learns
//! tcpcopy's address from the session's datagrams (only authenticated ones when authentication
//! is on) and sends RECORDS there. tcpcopy counts an intercept down when nothing came back for
//! a few keepalive intervals and starts over with a new Nc; intercept forgets a tcpcopy it has
//! not heard from for its peer timeout (its routes go, as when a TCP connection closes). A
//! restarted intercept does not know the session: it answers the next KEYED HELLO with a new
//! Ni, and tcpcopy takes up the new session.
//!
//! # Loss accounting
//!
//! Each end keeps a [`Ledger`] per session. A datagram takes the next sequence number only
//! when the socket takes it (sent, or queued while the socket is full); one the socket then
//! refuses is reported in the tally as *skipped*. The receiver's [`SeqWindow`] counts a
//! sequence number above the highest seen as having skipped the ones between (lost); one that
//! fills a gap later un-counts it (reordered); one already seen (a duplicate or a replay),
//! older than the window, or implausibly far ahead ([`MAX_SEQ_JUMP`]) is dropped.
//!
//! A gap shows only when a later datagram arrives, so the keepalives close the tail: a KEYED
//! HELLO or HELLO_ACK carries the next sequence number of its sender (every earlier one is
//! then accounted for) and its tally. tcpcopy sends a KEYED HELLO every keepalive interval
//! ([`Keepalive`]) and intercept answers each with a HELLO_ACK, so datagrams lost at the end of
//! a burst are counted within one keepalive interval plus the one-way delay (intercept's
//! count of lost MESSAGES) or the round trip (tcpcopy's count of lost RECORDS); each
//! keepalive lost as well adds an interval. The tally also gives the items lost: the peer's
//! `items` less the items received ([`Ledger::items_lost`]). What the receiving socket itself
//! dropped (its buffer full) is read from the kernel and reported apart from what was lost on
//! the way (see [`rxdrops`](crate::control::rxdrops)).

use std::fmt;
use std::time::{Duration, Instant};

use crate::control::auth::{MacKey, NONCE_LEN, UDP_MAC_LEN};
use crate::control::codec::{RecordFormat, CLIENT_MESSAGE_LEN};

/// Magic of every datagram.
pub const UDP_MAGIC: [u8; 2] = *b"TU";
/// Version byte (2: HELLO and HELLO_ACK end with a [`Tally`]).
pub const UDP_VERSION: u8 = 2;
/// Length of the datagram header.
pub const UDP_HEADER_LEN: usize = 32;
/// Largest datagram sent (1500-byte MTU minus IPv4 and UDP headers).
pub const MAX_DATAGRAM: usize = 1472;
/// Flag: a 16-byte MAC ends the datagram.
pub const FLAG_MAC: u8 = 0x01;
/// Flag: a HELLO of an established session.
pub const FLAG_KEYED: u8 = 0x02;
/// Flag: RECORDS hold 192-byte records.
pub const FLAG_PAYLOAD: u8 = 0x04;
/// Length of the [`Tally`] that ends HELLO and HELLO_ACK bodies.
pub const TALLY_LEN: usize = 16;
/// Length of a HELLO body (Nc, tally).
pub const HELLO_BODY_LEN: usize = NONCE_LEN + TALLY_LEN;
/// Length of a HELLO_ACK body (Ni, Nc, tally).
pub const HELLO_ACK_BODY_LEN: usize = 2 * NONCE_LEN + TALLY_LEN;
/// Sequence numbers a [`SeqWindow`] remembers below the highest.
pub const SEQ_WINDOW: u64 = 128;
/// Largest step above the highest sequence number a [`SeqWindow`] accepts: a peer that lost
/// this many datagrams in a row is counted down long before, so a larger step is forged or
/// corrupt, and refusing it keeps a hostile peer from pushing the window to `u64::MAX` (where
/// nothing newer could follow).
pub const MAX_SEQ_JUMP: u64 = 1 << 24;

/// The kind of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatagramKind {
    /// tcpcopy opens or keeps up a session.
    Hello,
    /// intercept answers a HELLO.
    HelloAck,
    /// tcpcopy's route messages.
    Messages,
    /// intercept's response records.
    Records,
}

impl DatagramKind {
    /// The wire value.
    pub const fn to_u8(self) -> u8 {
        match self {
            DatagramKind::Hello => 1,
            DatagramKind::HelloAck => 2,
            DatagramKind::Messages => 3,
            DatagramKind::Records => 4,
        }
    }

    /// The kind of a wire value.
    pub const fn from_u8(v: u8) -> Option<DatagramKind> {
        match v {
            1 => Some(DatagramKind::Hello),
            2 => Some(DatagramKind::HelloAck),
            3 => Some(DatagramKind::Messages),
            4 => Some(DatagramKind::Records),
            _ => None,
        }
    }

    /// Size of one body item (message or record) for `format`; the HELLO bodies are one item.
    pub const fn item_len(self, format: RecordFormat) -> usize {
        match self {
            DatagramKind::Hello => HELLO_BODY_LEN,
            DatagramKind::HelloAck => HELLO_ACK_BODY_LEN,
            DatagramKind::Messages => CLIENT_MESSAGE_LEN,
            DatagramKind::Records => format.record_len(),
        }
    }

    /// Most items in one datagram (with room for the MAC whether or not it is used).
    pub const fn max_items(self, format: RecordFormat) -> usize {
        match self {
            DatagramKind::Hello | DatagramKind::HelloAck => 1,
            _ => {
                let n = (MAX_DATAGRAM - UDP_HEADER_LEN - UDP_MAC_LEN) / self.item_len(format);
                if n > 255 {
                    255
                } else {
                    n
                }
            }
        }
    }
}

/// Why a datagram was rejected. Each variant's text is its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UdpError {
    /// Shorter than the header (plus the MAC).
    #[error("datagram of {0} bytes is too short")]
    TooShort(usize),
    /// Not this protocol.
    #[error("not a control datagram (magic {0:02x?})")]
    BadMagic([u8; 2]),
    /// Another version of this protocol.
    #[error("control datagram version {0} is not supported")]
    BadVersion(u8),
    /// Unknown kind byte.
    #[error("unknown datagram kind {0}")]
    BadKind(u8),
    /// The body length does not match the count and the kind.
    #[error("datagram body of {have} bytes, expected {expected}")]
    BadLength {
        /// Bytes expected.
        expected: usize,
        /// Bytes present.
        have: usize,
    },
    /// A MAC was expected and is absent, or is present and not expected.
    #[error("datagram authentication mismatch: MAC flag {present}, expected {expected}")]
    MacPresence {
        /// Whether the datagram carries a MAC.
        present: bool,
        /// Whether one was expected.
        expected: bool,
    },
    /// The MAC does not verify: forged, corrupted, or from another session or secret.
    #[error("datagram MAC does not verify")]
    BadMac,
    /// Records of the other size.
    #[error("datagram carries records of the other format")]
    FormatMismatch,
}

/// The header fields of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramHeader {
    /// Kind.
    pub kind: DatagramKind,
    /// Flags (`FLAG_*`).
    pub flags: u8,
    /// Items in the body.
    pub count: u8,
    /// tcpcopy's session id.
    pub session: u64,
    /// The session epoch (first 8 bytes of Ni), 0 in an opening HELLO.
    pub epoch: u64,
    /// Sequence number, 0 in an opening HELLO.
    pub seq: u64,
}

impl DatagramHeader {
    /// The 32 header bytes.
    pub fn encode(&self) -> [u8; UDP_HEADER_LEN] {
        let mut b = [0u8; UDP_HEADER_LEN];
        b[..2].copy_from_slice(&UDP_MAGIC);
        b[2] = UDP_VERSION;
        b[3] = self.kind.to_u8();
        b[4] = self.flags;
        b[5] = self.count;
        b[8..16].copy_from_slice(&self.session.to_be_bytes());
        b[16..24].copy_from_slice(&self.epoch.to_be_bytes());
        b[24..32].copy_from_slice(&self.seq.to_be_bytes());
        b
    }

    /// Whether the KEYED flag is set.
    pub fn is_keyed(&self) -> bool {
        self.flags & FLAG_KEYED != 0
    }
}

/// A checked view of a received datagram: header parsed, body length consistent with kind and
/// count, MAC present exactly when expected (not yet verified: see [`verify`](Self::verify)).
#[derive(Clone, Copy)]
pub struct Datagram<'a> {
    /// The header.
    pub header: DatagramHeader,
    bytes: &'a [u8],
    body: &'a [u8],
    item_len: usize,
    mac: bool,
}

impl fmt::Debug for Datagram<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Datagram({:?}, {} body bytes)",
            self.header,
            self.body.len()
        )
    }
}

impl<'a> Datagram<'a> {
    /// Checks `bytes` as a datagram of this protocol. `authenticated` says whether a MAC must
    /// be present; `format` is the record format expected in RECORDS.
    ///
    /// # Errors
    /// A [`UdpError`] naming the first problem.
    pub fn parse(
        bytes: &'a [u8],
        authenticated: bool,
        format: RecordFormat,
    ) -> Result<Datagram<'a>, UdpError> {
        if bytes.len() < UDP_HEADER_LEN {
            return Err(UdpError::TooShort(bytes.len()));
        }
        if bytes[..2] != UDP_MAGIC {
            return Err(UdpError::BadMagic([bytes[0], bytes[1]]));
        }
        if bytes[2] != UDP_VERSION {
            return Err(UdpError::BadVersion(bytes[2]));
        }
        let kind = DatagramKind::from_u8(bytes[3]).ok_or(UdpError::BadKind(bytes[3]))?;
        let flags = bytes[4];
        let count = bytes[5];
        let mac = flags & FLAG_MAC != 0;
        if mac != authenticated {
            return Err(UdpError::MacPresence {
                present: mac,
                expected: authenticated,
            });
        }
        if kind == DatagramKind::Records
            && (flags & FLAG_PAYLOAD != 0) != (format == RecordFormat::Payload192)
        {
            return Err(UdpError::FormatMismatch);
        }
        let tail = if mac { UDP_MAC_LEN } else { 0 };
        if bytes.len() < UDP_HEADER_LEN + tail {
            return Err(UdpError::TooShort(bytes.len()));
        }
        let body = &bytes[UDP_HEADER_LEN..bytes.len() - tail];
        let item_len = kind.item_len(format);
        let expected = match kind {
            DatagramKind::Hello | DatagramKind::HelloAck => item_len,
            _ => usize::from(count) * item_len,
        };
        if body.len() != expected {
            return Err(UdpError::BadLength {
                expected,
                have: body.len(),
            });
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i..i + 8]);
            u64::from_be_bytes(b)
        };
        Ok(Datagram {
            header: DatagramHeader {
                kind,
                flags,
                count,
                session: u64_at(8),
                epoch: u64_at(16),
                seq: u64_at(24),
            },
            bytes,
            body,
            item_len,
            mac,
        })
    }

    /// Whether the datagram's MAC verifies under `key` (true when it carries none).
    pub fn verify(&self, key: &MacKey) -> bool {
        if !self.mac {
            return true;
        }
        let split = self.bytes.len() - UDP_MAC_LEN;
        key.verify16(&self.bytes[..split], &self.bytes[split..])
    }

    /// The body.
    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The body items (messages or records), each exactly one item long.
    pub fn items(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.body.chunks_exact(self.item_len)
    }

    /// The HELLO's Nc, or the HELLO_ACK's `(Ni, Nc)`. A datagram of another kind carries no
    /// nonce: its first body bytes come back, zero-padded (a body shorter than a nonce, such as
    /// one 14-byte message, is not a reason to panic).
    pub fn nonces(&self) -> ([u8; NONCE_LEN], Option<[u8; NONCE_LEN]>) {
        let mut first = [0u8; NONCE_LEN];
        let n = NONCE_LEN.min(self.body.len());
        first[..n].copy_from_slice(&self.body[..n]);
        let second = (self.header.kind == DatagramKind::HelloAck
            && self.body.len() >= 2 * NONCE_LEN)
            .then(|| {
                let mut s = [0u8; NONCE_LEN];
                s.copy_from_slice(&self.body[NONCE_LEN..2 * NONCE_LEN]);
                s
            });
        (first, second)
    }

    /// The tally of a HELLO or HELLO_ACK (its last [`TALLY_LEN`] body bytes); `None` for
    /// MESSAGES and RECORDS.
    pub fn tally(&self) -> Option<Tally> {
        match self.header.kind {
            DatagramKind::Hello | DatagramKind::HelloAck if self.body.len() >= TALLY_LEN => {
                let mut b = [0u8; TALLY_LEN];
                b.copy_from_slice(&self.body[self.body.len() - TALLY_LEN..]);
                Some(Tally::decode(&b))
            }
            _ => None,
        }
    }
}

/// What one end has sent in a session, as of the keepalive (HELLO or HELLO_ACK) carrying it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Items (messages or records) in the datagrams numbered before the keepalive and handed
    /// to the socket.
    pub items: u64,
    /// Sequence numbers used by datagrams the socket then refused (never sent).
    pub skipped: u64,
}

impl Tally {
    /// The [`TALLY_LEN`] wire bytes.
    pub fn encode(&self) -> [u8; TALLY_LEN] {
        let mut b = [0u8; TALLY_LEN];
        b[..8].copy_from_slice(&self.items.to_be_bytes());
        b[8..].copy_from_slice(&self.skipped.to_be_bytes());
        b
    }

    /// The tally of [`TALLY_LEN`] wire bytes.
    pub fn decode(b: &[u8; TALLY_LEN]) -> Tally {
        let mut items = [0u8; 8];
        let mut skipped = [0u8; 8];
        items.copy_from_slice(&b[..8]);
        skipped.copy_from_slice(&b[8..]);
        Tally {
            items: u64::from_be_bytes(items),
            skipped: u64::from_be_bytes(skipped),
        }
    }

    /// This tally made plausible for a keepalive numbered `seq`: no more numbers skipped than
    /// were used before it, no more than 255 items per datagram (a hostile peer cannot make
    /// the counters derived from it larger than its own sequence numbers allow).
    pub fn clamped(self, seq: u64) -> Tally {
        let before = seq.saturating_sub(1);
        Tally {
            items: self.items.min(before.saturating_mul(255)),
            skipped: self.skipped.min(before),
        }
    }
}

/// The epoch of nonce `ni`: its first 8 bytes, big-endian (never 0: a zero is made 1).
pub fn epoch_of(ni: &[u8; NONCE_LEN]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&ni[..8]);
    u64::from_be_bytes(b).max(1)
}

/// Builds datagrams of one kind: items are appended after a header slot, and
/// [`finish`](Self::finish) fills in the header and the MAC. Allocated once.
#[derive(Debug, Clone)]
pub struct DatagramBuilder {
    kind: DatagramKind,
    format: RecordFormat,
    buf: Vec<u8>,
    count: usize,
    max: usize,
}

impl DatagramBuilder {
    /// An empty builder for `kind` datagrams (record size from `format`).
    pub fn new(kind: DatagramKind, format: RecordFormat) -> DatagramBuilder {
        let mut buf = Vec::with_capacity(MAX_DATAGRAM);
        buf.resize(UDP_HEADER_LEN, 0);
        DatagramBuilder {
            kind,
            format,
            buf,
            count: 0,
            max: kind.max_items(format),
        }
    }

    /// Items held.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether no item is held.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether no further item fits.
    pub fn is_full(&self) -> bool {
        self.count >= self.max
    }

    /// Most items per datagram.
    pub fn capacity(&self) -> usize {
        self.max
    }

    /// Appends one item; `Ok(true)` when the datagram is now full.
    ///
    /// # Errors
    /// `Err(())` if `item` has the wrong size or the datagram is full (nothing appended).
    #[allow(clippy::result_unit_err)]
    pub fn push(&mut self, item: &[u8]) -> Result<bool, ()> {
        if item.len() != self.kind.item_len(self.format) || self.is_full() {
            return Err(());
        }
        self.buf.extend_from_slice(item);
        self.count += 1;
        Ok(self.is_full())
    }

    /// Writes the header (`count` filled in; PAYLOAD flag for 192-byte records; MAC flag and
    /// trailer when `key` is given) and returns the finished datagram. Call
    /// [`clear`](Self::clear) before building the next one.
    pub fn finish(
        &mut self,
        session: u64,
        epoch: u64,
        seq: u64,
        extra_flags: u8,
        key: Option<&MacKey>,
    ) -> &[u8] {
        let mut flags = extra_flags;
        if key.is_some() {
            flags |= FLAG_MAC;
        }
        if self.kind == DatagramKind::Records && self.format == RecordFormat::Payload192 {
            flags |= FLAG_PAYLOAD;
        }
        let header = DatagramHeader {
            kind: self.kind,
            flags,
            count: self.count as u8,
            session,
            epoch,
            seq,
        };
        self.buf
            .truncate(UDP_HEADER_LEN + self.count * self.kind.item_len(self.format));
        self.buf[..UDP_HEADER_LEN].copy_from_slice(&header.encode());
        if let Some(key) = key {
            let tag = key.tag16(&self.buf);
            self.buf.extend_from_slice(&tag);
        }
        &self.buf
    }

    /// Empties the builder.
    pub fn clear(&mut self) {
        self.buf.truncate(UDP_HEADER_LEN);
        self.count = 0;
    }
}

/// Encodes a whole single-item datagram (HELLO or HELLO_ACK) into `out`.
pub fn encode_single(
    kind: DatagramKind,
    header: (u64, u64, u64, u8),
    body: &[u8],
    key: Option<&MacKey>,
    out: &mut Vec<u8>,
) {
    let (session, epoch, seq, mut flags) = header;
    if key.is_some() {
        flags |= FLAG_MAC;
    }
    let h = DatagramHeader {
        kind,
        flags,
        count: 1,
        session,
        epoch,
        seq,
    };
    out.clear();
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(body);
    if let Some(key) = key {
        let tag = key.tag16(out);
        out.extend_from_slice(&tag);
    }
}

/// What [`SeqWindow::accept`] made of a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// Above everything seen; `skipped` numbers between were not seen (provisionally lost).
    New {
        /// Sequence numbers jumped over.
        skipped: u64,
    },
    /// Fills a gap below the highest (it was counted lost, now it is reordered).
    Late,
    /// Already seen: a duplicate or a replay. Drop it.
    Duplicate,
    /// Older than the window: cannot be told from a replay. Drop it.
    TooOld,
    /// More than [`MAX_SEQ_JUMP`] above the highest: forged or corrupt. Drop it.
    TooFar,
}

impl SeqVerdict {
    /// Whether the datagram is to be used.
    pub fn accepted(self) -> bool {
        matches!(self, SeqVerdict::New { .. } | SeqVerdict::Late)
    }
}

/// Loss, reordering and replay accounting of one session's sequence numbers (RFC 4303-style
/// sliding window of [`SEQ_WINDOW`]). Sequence numbers start at 1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqWindow {
    highest: u64,
    /// Bit `i` set: `highest - i` was seen (bit 0 is `highest` itself).
    seen: u128,
    /// Numbers currently counted lost (skipped and not seen since).
    pub lost: u64,
    /// Numbers that arrived after a higher one.
    pub reordered: u64,
    /// Duplicates, too-old and too-far numbers dropped.
    pub rejected: u64,
}

impl SeqWindow {
    /// A window that has seen nothing.
    pub fn new() -> SeqWindow {
        SeqWindow::default()
    }

    /// The highest number seen (0 before the first).
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Records `seq` (call only after the datagram's MAC verified) and updates the counters.
    pub fn accept(&mut self, seq: u64) -> SeqVerdict {
        if seq == 0 {
            self.rejected = self.rejected.saturating_add(1);
            return SeqVerdict::TooOld;
        }
        if seq > self.highest {
            let shift = seq - self.highest;
            if shift > MAX_SEQ_JUMP {
                self.rejected = self.rejected.saturating_add(1);
                return SeqVerdict::TooFar;
            }
            let skipped = shift - 1;
            self.seen = if shift >= 128 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest = seq;
            self.lost = self.lost.saturating_add(skipped);
            return SeqVerdict::New { skipped };
        }
        let back = self.highest - seq;
        if back >= SEQ_WINDOW {
            self.rejected = self.rejected.saturating_add(1);
            return SeqVerdict::TooOld;
        }
        let bit = 1u128 << back;
        if self.seen & bit != 0 {
            self.rejected = self.rejected.saturating_add(1);
            return SeqVerdict::Duplicate;
        }
        self.seen |= bit;
        self.lost = self.lost.saturating_sub(1);
        self.reordered = self.reordered.saturating_add(1);
        SeqVerdict::Late
    }
}

/// The sequence numbers and loss accounting of one session at one end, both directions
/// (sans-IO: the caller does the sending). Sending: [`next_seq`](Self::next_seq) numbers a
/// datagram, [`commit`](Self::commit) once the socket took it (sent or queued),
/// [`abandon`](Self::abandon) if a queued one was then refused; [`tally`](Self::tally) goes
/// into each keepalive. Receiving: [`accept`](Self::accept) for MESSAGES and RECORDS,
/// [`accept_keepalive`](Self::accept_keepalive) for HELLO and HELLO_ACK (their tally).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Highest sequence number used.
    sent: u64,
    items_sent: u64,
    skipped: u64,
    /// The peer's sequence numbers.
    pub window: SeqWindow,
    items_received: u64,
    peer: Tally,
}

impl Ledger {
    /// A ledger with nothing sent or received.
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// The number of the next datagram; `None` once the numbers are used up (2^64 - 1
    /// datagrams: the session must start over).
    pub fn next_seq(&self) -> Option<u64> {
        self.sent.checked_add(1)
    }

    /// The datagram numbered [`next_seq`](Self::next_seq) was taken by the socket (sent or
    /// queued), with `items` messages or records.
    pub fn commit(&mut self, items: u64) {
        self.sent = self.sent.saturating_add(1);
        self.items_sent = self.items_sent.saturating_add(items);
    }

    /// A committed datagram with `items` was then refused by the socket: its number is
    /// reported as skipped and its items as never sent.
    pub fn abandon(&mut self, items: u64) {
        self.skipped = self.skipped.saturating_add(1);
        self.items_sent = self.items_sent.saturating_sub(items);
    }

    /// What this end has sent, for the next keepalive.
    pub fn tally(&self) -> Tally {
        Tally {
            items: self.items_sent,
            skipped: self.skipped,
        }
    }

    /// Highest sequence number used (datagrams numbered so far).
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Records the sequence number of a MESSAGES or RECORDS datagram with `items` (call only
    /// after its MAC verified); its items count as received when it is accepted.
    pub fn accept(&mut self, seq: u64, items: u64) -> SeqVerdict {
        let verdict = self.window.accept(seq);
        if verdict.accepted() {
            self.items_received = self.items_received.saturating_add(items);
        }
        verdict
    }

    /// Records the sequence number of a keepalive (KEYED HELLO or HELLO_ACK) and, when it is
    /// the newest datagram yet, its sender's tally: every number below it is now accounted
    /// for (received or lost) and the items lost are known.
    pub fn accept_keepalive(&mut self, seq: u64, tally: Tally) -> SeqVerdict {
        let verdict = self.window.accept(seq);
        if matches!(verdict, SeqVerdict::New { .. }) {
            self.peer = tally.clamped(seq);
        }
        verdict
    }

    /// The peer's datagrams lost on the way to this end's socket or dropped by it: gaps in
    /// its sequence numbers, less the numbers it reported skipped.
    pub fn lost(&self) -> u64 {
        self.window.lost.saturating_sub(self.peer.skipped)
    }

    /// Items (messages or records) the peer sent, as of its latest keepalive, that never
    /// arrived here (their datagrams lost).
    pub fn items_lost(&self) -> u64 {
        self.peer.items.saturating_sub(self.items_received)
    }

    /// Items received in accepted datagrams.
    pub fn items_received(&self) -> u64 {
        self.items_received
    }

    /// The peer's latest tally.
    pub fn peer_tally(&self) -> Tally {
        self.peer
    }
}

/// When the next keepalive is due (sans-IO: `now` is passed in). A session's keepalives are
/// what bound the time a loss at the tail of a burst stays uncounted: see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    interval: Duration,
    next: Instant,
}

impl Keepalive {
    /// The first keepalive is due at `now + interval` (at least 1 ms).
    pub fn new(now: Instant, interval: Duration) -> Keepalive {
        let interval = interval.max(Duration::from_millis(1));
        Keepalive {
            interval,
            next: now + interval,
        }
    }

    /// Whether a keepalive is due at `now`; if so the next one is scheduled an interval later.
    pub fn due(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        self.next = now + self.interval;
        true
    }

    /// When the next keepalive is due.
    pub fn deadline(&self) -> Instant {
        self.next
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::auth::Secret;
    use crate::wire::ethernet::tests::hex;

    #[test]
    fn capacities() {
        assert_eq!(DatagramKind::Records.max_items(RecordFormat::Header64), 22);
        assert_eq!(DatagramKind::Records.max_items(RecordFormat::Payload192), 7);
        assert_eq!(
            DatagramKind::Messages.max_items(RecordFormat::Header64),
            101
        );
        const {
            assert!(32 + 22 * 64 + 16 <= MAX_DATAGRAM);
            assert!(32 + 7 * 192 + 16 <= MAX_DATAGRAM);
            assert!(32 + 101 * 14 + 16 <= MAX_DATAGRAM);
        }
    }

    #[test]
    fn hello_golden_plain_and_authenticated() {
        let nc = [0xaa; 16];
        let mut body = nc.to_vec();
        body.extend_from_slice(&[0; 16]);
        let mut out = Vec::new();
        encode_single(
            DatagramKind::Hello,
            (0x0102_0304_0506_0708, 0, 0, 0),
            &body,
            None,
            &mut out,
        );
        let mut expected = vec![0x54, 0x55, 0x02, 0x01, 0x00, 0x01, 0x00, 0x00];
        expected.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        expected.extend_from_slice(&[0; 8]);
        expected.extend_from_slice(&[0; 8]);
        expected.extend_from_slice(&[0xaa; 16]);
        expected.extend_from_slice(&[0; 16]);
        assert_eq!(out, expected);
        let d = Datagram::parse(&out, false, RecordFormat::Header64).unwrap();
        assert_eq!(d.header.kind, DatagramKind::Hello);
        assert_eq!(d.header.session, 0x0102_0304_0506_0708);
        assert_eq!(d.nonces(), (nc, None));
        assert_eq!(d.tally(), Some(Tally::default()));
        assert!(!d.header.is_keyed());

        let secret = Secret::new(b"0123456789abcdef-lab-secret").unwrap();
        let key = secret.udp_hello_key();
        encode_single(
            DatagramKind::Hello,
            (0x0102_0304_0506_0708, 0, 0, 0),
            &body,
            Some(&key),
            &mut out,
        );
        expected[4] = FLAG_MAC;
        let tag = key.tag16(&expected);
        expected.extend_from_slice(&tag);
        assert_eq!(out, expected);
        let d = Datagram::parse(&out, true, RecordFormat::Header64).unwrap();
        assert!(d.verify(&key));
        assert!(!d.verify(&secret.udp_session_keys(1, &nc, &nc).0));
        // Expecting no MAC: refused, and the other way round.
        assert_eq!(
            Datagram::parse(&out, false, RecordFormat::Header64).unwrap_err(),
            UdpError::MacPresence {
                present: true,
                expected: false
            }
        );
    }

    #[test]
    fn hello_ack_golden() {
        let mut out = Vec::new();
        let mut body = vec![0x22; 16];
        body.extend_from_slice(&[0x11; 16]);
        let tally = Tally {
            items: 0x0102,
            skipped: 3,
        };
        body.extend_from_slice(&tally.encode());
        encode_single(
            DatagramKind::HelloAck,
            (9, 0x2222_2222_2222_2222, 7, 0),
            &body,
            None,
            &mut out,
        );
        let mut expected = vec![0x54, 0x55, 0x02, 0x02, 0x00, 0x01, 0x00, 0x00];
        expected.extend_from_slice(&9u64.to_be_bytes());
        expected.extend_from_slice(&[0x22; 8]);
        expected.extend_from_slice(&7u64.to_be_bytes());
        expected.extend_from_slice(&[0x22; 16]);
        expected.extend_from_slice(&[0x11; 16]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x01, 0x02]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 3]);
        assert_eq!(out, expected);
        let d = Datagram::parse(&out, false, RecordFormat::Header64).unwrap();
        assert_eq!(d.nonces(), ([0x22; 16], Some([0x11; 16])));
        assert_eq!(d.tally(), Some(tally));
        assert_eq!(epoch_of(&[0x22; 16]), d.header.epoch);
        // The tally is covered by the MAC like every other byte.
        let secret = Secret::new(b"0123456789abcdef-lab-secret").unwrap();
        let (_, down) = secret.udp_session_keys(9, &[0x11; 16], &[0x22; 16]);
        encode_single(
            DatagramKind::HelloAck,
            (9, 0x2222_2222_2222_2222, 7, 0),
            &body,
            Some(&down),
            &mut out,
        );
        let mut forged = out.clone();
        forged[32 + 32 + 7] ^= 0xff; // items
        assert!(Datagram::parse(&out, true, RecordFormat::Header64)
            .unwrap()
            .verify(&down));
        assert!(!Datagram::parse(&forged, true, RecordFormat::Header64)
            .unwrap()
            .verify(&down));
        // A version-1 HELLO_ACK (no tally) is refused by its version byte.
        let mut v1 = expected[..32 + 32].to_vec();
        v1[2] = 1;
        assert_eq!(
            Datagram::parse(&v1, false, RecordFormat::Header64).unwrap_err(),
            UdpError::BadVersion(1)
        );
    }

    #[test]
    fn messages_golden() {
        let add = [
            0x0a, 0x00, 0x00, 0x01, 0x9c, 0x40, 0x00, 0x01, 0x0a, 0x00, 0x00, 0x02, 0x1f, 0x90,
        ];
        let del = [
            0x0a, 0x00, 0x00, 0x01, 0x9c, 0x40, 0x00, 0x02, 0x0a, 0x00, 0x00, 0x02, 0x1f, 0x90,
        ];
        let mut b = DatagramBuilder::new(DatagramKind::Messages, RecordFormat::Header64);
        assert!(!b.push(&add).unwrap());
        assert!(!b.push(&del).unwrap());
        assert!(b.push(&[0; 13]).is_err());
        let out = b.finish(5, 7, 3, 0, None).to_vec();
        let mut expected = vec![0x54, 0x55, 0x02, 0x03, 0x00, 0x02, 0x00, 0x00];
        expected.extend_from_slice(&5u64.to_be_bytes());
        expected.extend_from_slice(&7u64.to_be_bytes());
        expected.extend_from_slice(&3u64.to_be_bytes());
        expected.extend_from_slice(&add);
        expected.extend_from_slice(&del);
        assert_eq!(out, expected);
        let d = Datagram::parse(&out, false, RecordFormat::Header64).unwrap();
        let items: Vec<&[u8]> = d.items().collect();
        assert_eq!(items, vec![&add[..], &del[..]]);
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn records_golden_both_formats_with_mac() {
        let secret = Secret::new(b"0123456789abcdef-lab-secret").unwrap();
        let (_, down) = secret.udp_session_keys(5, &[1; 16], &[2; 16]);
        for (format, flag) in [
            (RecordFormat::Header64, 0x01),
            (RecordFormat::Payload192, 0x05),
        ] {
            let rec = vec![0x45; format.record_len()];
            let mut b = DatagramBuilder::new(DatagramKind::Records, format);
            b.push(&rec).unwrap();
            let out = b
                .finish(5, 0x0202_0202_0202_0202, 1, 0, Some(&down))
                .to_vec();
            let mut expected = vec![0x54, 0x55, 0x02, 0x04, flag, 0x01, 0x00, 0x00];
            expected.extend_from_slice(&5u64.to_be_bytes());
            expected.extend_from_slice(&[2; 8]);
            expected.extend_from_slice(&1u64.to_be_bytes());
            expected.extend_from_slice(&rec);
            let tag = down.tag16(&expected);
            expected.extend_from_slice(&tag);
            assert_eq!(out, expected);
            let d = Datagram::parse(&out, true, format).unwrap();
            assert!(d.verify(&down));
            assert_eq!(d.items().count(), 1);
            assert_eq!(d.tally(), None);
            // A flipped bit anywhere fails the MAC.
            let mut bad = out.clone();
            bad[40] ^= 1;
            assert!(!Datagram::parse(&bad, true, format).unwrap().verify(&down));
            // The other record size is refused.
            let other = if format == RecordFormat::Header64 {
                RecordFormat::Payload192
            } else {
                RecordFormat::Header64
            };
            assert_eq!(
                Datagram::parse(&out, true, other).unwrap_err(),
                UdpError::FormatMismatch
            );
        }
    }

    #[test]
    fn builder_fills_up() {
        let mut b = DatagramBuilder::new(DatagramKind::Records, RecordFormat::Header64);
        for i in 0..22 {
            assert_eq!(b.push(&[0; 64]).unwrap(), i == 21);
        }
        assert!(b.push(&[0; 64]).is_err());
        let len = b.finish(1, 1, 1, 0, None).len();
        assert_eq!(len, 32 + 22 * 64);
    }

    #[test]
    fn parse_rejects_garbage() {
        let f = RecordFormat::Header64;
        assert_eq!(
            Datagram::parse(&[0; 10], false, f).unwrap_err(),
            UdpError::TooShort(10)
        );
        let mut out = Vec::new();
        encode_single(DatagramKind::Hello, (1, 0, 0, 0), &[0; 32], None, &mut out);
        let mut b = out.clone();
        b[0] = b'X';
        assert!(matches!(
            Datagram::parse(&b, false, f),
            Err(UdpError::BadMagic(_))
        ));
        let mut b = out.clone();
        b[2] = 1;
        assert_eq!(
            Datagram::parse(&b, false, f).unwrap_err(),
            UdpError::BadVersion(1)
        );
        let mut b = out.clone();
        b[3] = 9;
        assert_eq!(
            Datagram::parse(&b, false, f).unwrap_err(),
            UdpError::BadKind(9)
        );
        let mut b = out.clone();
        b.push(0);
        assert!(matches!(
            Datagram::parse(&b, false, f),
            Err(UdpError::BadLength {
                expected: 32,
                have: 33
            })
        ));
        let mut b = out.clone();
        b[3] = 4;
        b[5] = 3;
        assert!(matches!(
            Datagram::parse(&b, false, f),
            Err(UdpError::BadLength { expected: 192, .. })
        ));
        // A version-1 HELLO (16-byte body) under version 2 is too short.
        let mut b = out[..48].to_vec();
        assert!(matches!(
            Datagram::parse(&b, false, f),
            Err(UdpError::BadLength {
                expected: 32,
                have: 16
            })
        ));
        b[2] = 1;
        assert_eq!(
            Datagram::parse(&b, false, f).unwrap_err(),
            UdpError::BadVersion(1)
        );
        assert_eq!(
            Datagram::parse(&out, true, f).unwrap_err(),
            UdpError::MacPresence {
                present: false,
                expected: true
            }
        );
    }

    /// Found by the `control_datagram` fuzz target: `nonces` of a MESSAGES datagram with one
    /// 14-byte message (body shorter than a nonce) panicked in `copy_from_slice`.
    #[test]
    fn nonces_of_a_short_body_do_not_panic() {
        let bytes = hex("5455 0203 0001 0000 0000 0000 0000 0007 2222 2222 2222 2222
             0000 0000 0000 0002 0a00 0001 9c40 0001 0a00 0002 1f90");
        let d = Datagram::parse(&bytes, false, RecordFormat::Header64).unwrap();
        assert_eq!(d.header.kind, DatagramKind::Messages);
        let (first, second) = d.nonces();
        assert_eq!(first[..14], bytes[32..]);
        assert_eq!(first[14..], [0, 0]);
        assert_eq!(second, None);
        let empty =
            hex("5455 0203 0000 0000 0000 0000 0000 0007 2222 2222 2222 2222 0000 0000 0000 0002");
        let d = Datagram::parse(&empty, false, RecordFormat::Header64).unwrap();
        assert_eq!(d.nonces(), ([0; NONCE_LEN], None));
    }

    #[test]
    fn window_counts_loss_reorder_and_replay() {
        let mut w = SeqWindow::new();
        assert_eq!(w.accept(1), SeqVerdict::New { skipped: 0 });
        assert_eq!(w.accept(2), SeqVerdict::New { skipped: 0 });
        assert_eq!(w.accept(5), SeqVerdict::New { skipped: 2 });
        assert_eq!(w.lost, 2);
        assert_eq!(w.accept(4), SeqVerdict::Late);
        assert_eq!((w.lost, w.reordered), (1, 1));
        assert_eq!(w.accept(4), SeqVerdict::Duplicate);
        assert_eq!(w.accept(5), SeqVerdict::Duplicate);
        assert_eq!(w.accept(0), SeqVerdict::TooOld);
        assert_eq!(w.accept(1000), SeqVerdict::New { skipped: 994 });
        assert_eq!(w.accept(3), SeqVerdict::TooOld);
        assert_eq!(w.accept(1000 - 127), SeqVerdict::Late);
        assert_eq!(w.accept(1000 - 128), SeqVerdict::TooOld);
        assert_eq!(w.lost, 1 + 994 - 1);
        assert_eq!(w.rejected, 5);
        // A jump of the window's size or more clears it.
        assert_eq!(w.accept(2000), SeqVerdict::New { skipped: 999 });
        assert_eq!(w.accept(1999), SeqVerdict::Late);
        assert_eq!(w.highest(), 2000);
    }

    #[test]
    fn window_against_reference() {
        // A deterministic shuffle with drops: the window's loss count equals what a set says.
        let mut w = SeqWindow::new();
        let mut state = 12345u64;
        let mut seen = std::collections::BTreeSet::new();
        let mut order: Vec<u64> = (1..=5000).collect();
        for i in 0..order.len() {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let j = (i + (state >> 33) as usize % 8).min(order.len() - 1);
            order.swap(i, j);
        }
        for seq in order {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if (state >> 40).is_multiple_of(50) {
                continue; // dropped
            }
            assert!(w.accept(seq).accepted());
            seen.insert(seq);
        }
        let max = *seen.iter().max().unwrap();
        assert_eq!(w.lost, max - seen.len() as u64);
    }

    #[test]
    fn window_refuses_implausible_jumps_and_never_wedges() {
        let mut w = SeqWindow::new();
        assert_eq!(w.accept(1), SeqVerdict::New { skipped: 0 });
        // A forged number near the end of the space is refused, and the session goes on.
        assert_eq!(w.accept(u64::MAX), SeqVerdict::TooFar);
        assert_eq!(w.accept(2 + MAX_SEQ_JUMP), SeqVerdict::TooFar);
        assert_eq!(w.accept(2), SeqVerdict::New { skipped: 0 });
        assert_eq!(
            w.accept(2 + MAX_SEQ_JUMP),
            SeqVerdict::New {
                skipped: MAX_SEQ_JUMP - 1
            }
        );
        assert_eq!(w.rejected, 2);
        // At the very top of the space (unreachable in practice: 2^40 jumps of the largest
        // size) the counters saturate and nothing panics.
        let mut w = SeqWindow {
            highest: u64::MAX - 3,
            seen: 1,
            lost: u64::MAX - 1,
            reordered: u64::MAX,
            rejected: u64::MAX,
        };
        assert_eq!(w.accept(u64::MAX), SeqVerdict::New { skipped: 2 });
        assert_eq!(w.lost, u64::MAX);
        assert_eq!(w.accept(u64::MAX), SeqVerdict::Duplicate);
        assert_eq!(w.accept(u64::MAX - 1), SeqVerdict::Late);
        assert_eq!((w.reordered, w.rejected), (u64::MAX, u64::MAX));
        // A sender whose numbers are used up says so instead of wrapping.
        let mut l = Ledger::new();
        l.sent = u64::MAX - 1;
        assert_eq!(l.next_seq(), Some(u64::MAX));
        l.commit(u64::MAX);
        l.commit(5);
        assert_eq!(l.next_seq(), None);
        assert_eq!(l.tally().items, u64::MAX);
    }

    #[test]
    fn a_hostile_tally_is_clamped() {
        let t = Tally {
            items: u64::MAX,
            skipped: u64::MAX,
        };
        assert_eq!(
            t.clamped(11),
            Tally {
                items: 2550,
                skipped: 10
            }
        );
        assert_eq!(t.clamped(0), Tally::default());
        assert_eq!(t.clamped(u64::MAX).skipped, u64::MAX - 1);
        let mut l = Ledger::new();
        assert!(l.accept(1, 3).accepted());
        assert!(l.accept_keepalive(2, t).accepted());
        // The peer claims 255 items per datagram and one skipped number: bounded by its seq.
        assert_eq!(l.items_lost(), 255 - 3);
        assert_eq!(l.lost(), 0);
    }

    /// One end sending to another on a virtual clock: datagrams of `items` each, some lost.
    struct Pair {
        now: Instant,
        sender: Ledger,
        keepalive: Keepalive,
        receiver: Ledger,
    }

    impl Pair {
        fn new(interval: Duration) -> Pair {
            let now = Instant::now();
            Pair {
                now,
                sender: Ledger::new(),
                keepalive: Keepalive::new(now, interval),
                receiver: Ledger::new(),
            }
        }

        /// A data datagram; `arrives` says whether the path delivers it.
        fn data(&mut self, items: u64, arrives: bool) {
            let seq = self.sender.next_seq().unwrap();
            self.sender.commit(items);
            if arrives {
                assert!(self.receiver.accept(seq, items).accepted());
            }
        }

        /// Moves the clock by `step`, sending the keepalive if it is due.
        fn tick(&mut self, step: Duration, arrives: bool) -> bool {
            self.now += step;
            if !self.keepalive.due(self.now) {
                return false;
            }
            let seq = self.sender.next_seq().unwrap();
            let tally = self.sender.tally();
            self.sender.commit(0);
            if arrives {
                assert!(self.receiver.accept_keepalive(seq, tally).accepted());
            }
            true
        }
    }

    #[test]
    fn a_tail_loss_is_counted_within_one_keepalive_interval() {
        let interval = Duration::from_millis(1000);
        let step = Duration::from_millis(10);
        for n in 1..=5u64 {
            let mut p = Pair::new(interval);
            // A burst of 10 datagrams of 101 messages; the last `n` are lost.
            let t0 = p.now;
            for i in 0..10 {
                p.data(101, i < 10 - n);
            }
            // Silent: no later datagram, so nothing is seen yet.
            assert_eq!((p.receiver.lost(), p.receiver.items_lost()), (0, 0));
            let mut counted_at = None;
            while p.now < t0 + 3 * interval {
                p.tick(step, true);
                if counted_at.is_none() && p.receiver.lost() == n {
                    counted_at = Some(p.now);
                }
            }
            // Exactly `n` lost, their messages too, by the first keepalive (virtual time).
            assert_eq!(p.receiver.lost(), n);
            assert_eq!(p.receiver.items_lost(), 101 * n);
            assert_eq!(p.receiver.items_received(), 101 * (10 - n));
            assert!(counted_at.unwrap() <= t0 + interval, "{n}");
        }
    }

    #[test]
    fn a_lost_keepalive_delays_the_count_by_one_interval() {
        let interval = Duration::from_millis(1000);
        let mut p = Pair::new(interval);
        let t0 = p.now;
        for i in 0..4 {
            p.data(22, i < 2);
        }
        // The first keepalive is lost too.
        assert!(p.tick(interval, false));
        assert_eq!(p.receiver.lost(), 0);
        assert!(!p.tick(interval / 2, true));
        assert!(p.tick(interval / 2, true));
        assert_eq!(p.now, t0 + 2 * interval);
        // Two records datagrams and the first keepalive.
        assert_eq!(p.receiver.lost(), 3);
        assert_eq!(p.receiver.items_lost(), 44);
    }

    #[test]
    fn skipped_numbers_are_not_lost_on_the_way() {
        let mut p = Pair::new(Duration::from_millis(20));
        p.data(5, true);
        // Numbered and queued, then refused by the socket: the sender abandons it.
        let seq = p.sender.next_seq().unwrap();
        p.sender.commit(7);
        p.sender.abandon(7);
        assert_eq!(seq, 2);
        p.data(5, true);
        // The receiver sees a gap before the keepalive says it was never sent.
        assert_eq!(p.receiver.lost(), 1);
        p.tick(Duration::from_millis(20), true);
        assert_eq!(p.receiver.lost(), 0);
        assert_eq!(p.receiver.items_lost(), 0);
        assert_eq!(
            p.sender.tally(),
            Tally {
                items: 10,
                skipped: 1
            }
        );
    }

    #[test]
    fn ledger_against_reference() {
        // Deterministic drops, reordering and skipped numbers: once the last keepalive is in,
        // the receiver's counts equal the reference's.
        let mut state = 99u64;
        let mut rand = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        };
        let mut sender = Ledger::new();
        let mut receiver = Ledger::new();
        let mut in_flight: Vec<(u64, u64, Option<Tally>)> = Vec::new();
        let (mut dropped, mut dropped_items) = (0u64, 0u64);
        for i in 0..20_000u64 {
            let seq = sender.next_seq().unwrap();
            let keepalive = i % 97 == 96 || i == 19_999;
            let items = if keepalive { 0 } else { 1 + rand() % 101 };
            let tally = keepalive.then(|| sender.tally());
            sender.commit(items);
            if !keepalive && rand() % 200 == 0 {
                sender.abandon(items); // refused by the socket after numbering
                continue;
            }
            if rand() % 50 == 0 && i != 19_999 {
                dropped += 1;
                dropped_items += items;
                continue;
            }
            in_flight.push((seq, items, tally));
            // Deliver with a little reordering.
            if in_flight.len() > 4 || i == 19_999 {
                let k = (rand() as usize) % in_flight.len();
                let last = in_flight.len() - 1;
                in_flight.swap(k, last);
                while let Some((seq, items, tally)) = in_flight.pop() {
                    match tally {
                        Some(t) => assert!(receiver.accept_keepalive(seq, t).accepted()),
                        None => assert!(receiver.accept(seq, items).accepted()),
                    }
                }
            }
        }
        // The last datagram was a keepalive delivered last-but-reordered: one more to close.
        let seq = sender.next_seq().unwrap();
        assert!(receiver.accept_keepalive(seq, sender.tally()).accepted());
        assert_eq!(receiver.lost(), dropped);
        assert_eq!(receiver.items_lost(), dropped_items);
    }
}
