//! The control channel over UDP (a tcpcopy-rs extension; the C tools speak only TCP): batches
//! of route messages and response records in datagrams, each with a sequence number so loss is
//! counted, reordering tolerated and replays rejected, and nothing waits behind a lost
//! datagram (no head-of-line blocking).
//!
//! # Datagram layout (all integers big-endian)
//!
//! ```text
//!   0   2  magic "TU" (54 55)
//!   2   1  version 1
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
//!             HELLO      16 bytes: Nc, tcpcopy's nonce for this session
//!             HELLO_ACK  32 bytes: Ni (16), then Nc echoed (16)
//!             MESSAGES   count x 14 bytes: msg_clt_t exactly as on TCP (CLIENT_ADD/DEL)
//!             RECORDS    count x 64 (or 192) bytes: msg_server_t exactly as on TCP
//!   .  16  (flag MAC) HMAC-SHA256 tag truncated to 16 bytes over all bytes before it; keys
//!             in [`auth`](crate::control::auth)
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
//! Each receiver keeps a [`SeqWindow`] per session: a sequence number above the highest seen
//! counts the skipped ones as lost; one that fills a gap later un-counts it (reordered); one
//! already seen (a duplicate or a replay) or older than the window is dropped.

use std::fmt;

use crate::control::auth::{MacKey, NONCE_LEN, UDP_MAC_LEN};
use crate::control::codec::{RecordFormat, CLIENT_MESSAGE_LEN};

/// Magic of every datagram.
pub const UDP_MAGIC: [u8; 2] = *b"TU";
/// Version byte.
pub const UDP_VERSION: u8 = 1;
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
/// Length of a HELLO body.
pub const HELLO_BODY_LEN: usize = NONCE_LEN;
/// Length of a HELLO_ACK body.
pub const HELLO_ACK_BODY_LEN: usize = 2 * NONCE_LEN;
/// Sequence numbers a [`SeqWindow`] remembers below the highest.
pub const SEQ_WINDOW: u64 = 128;

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
        let second = (self.body.len() >= 2 * NONCE_LEN).then(|| {
            let mut s = [0u8; NONCE_LEN];
            s.copy_from_slice(&self.body[NONCE_LEN..2 * NONCE_LEN]);
            s
        });
        (first, second)
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
    /// Duplicates and too-old numbers dropped.
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
            self.rejected += 1;
            return SeqVerdict::TooOld;
        }
        if seq > self.highest {
            let skipped = seq - self.highest - 1;
            let shift = seq - self.highest;
            self.seen = if shift >= 128 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest = seq;
            self.lost += skipped;
            return SeqVerdict::New { skipped };
        }
        let back = self.highest - seq;
        if back >= SEQ_WINDOW {
            self.rejected += 1;
            return SeqVerdict::TooOld;
        }
        let bit = 1u128 << back;
        if self.seen & bit != 0 {
            self.rejected += 1;
            return SeqVerdict::Duplicate;
        }
        self.seen |= bit;
        self.lost = self.lost.saturating_sub(1);
        self.reordered += 1;
        SeqVerdict::Late
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
        let mut out = Vec::new();
        encode_single(
            DatagramKind::Hello,
            (0x0102_0304_0506_0708, 0, 0, 0),
            &nc,
            None,
            &mut out,
        );
        let mut expected = vec![0x54, 0x55, 0x01, 0x01, 0x00, 0x01, 0x00, 0x00];
        expected.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        expected.extend_from_slice(&[0; 8]);
        expected.extend_from_slice(&[0; 8]);
        expected.extend_from_slice(&[0xaa; 16]);
        assert_eq!(out, expected);
        let d = Datagram::parse(&out, false, RecordFormat::Header64).unwrap();
        assert_eq!(d.header.kind, DatagramKind::Hello);
        assert_eq!(d.header.session, 0x0102_0304_0506_0708);
        assert_eq!(d.nonces(), (nc, None));
        assert!(!d.header.is_keyed());

        let secret = Secret::new(b"0123456789abcdef-lab-secret").unwrap();
        let key = secret.udp_hello_key();
        encode_single(
            DatagramKind::Hello,
            (0x0102_0304_0506_0708, 0, 0, 0),
            &nc,
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
        encode_single(
            DatagramKind::HelloAck,
            (9, 0x2222_2222_2222_2222, 1, 0),
            &body,
            None,
            &mut out,
        );
        let mut expected = vec![0x54, 0x55, 0x01, 0x02, 0x00, 0x01, 0x00, 0x00];
        expected.extend_from_slice(&9u64.to_be_bytes());
        expected.extend_from_slice(&[0x22; 8]);
        expected.extend_from_slice(&1u64.to_be_bytes());
        expected.extend_from_slice(&body);
        assert_eq!(out, expected);
        let d = Datagram::parse(&out, false, RecordFormat::Header64).unwrap();
        assert_eq!(d.nonces(), ([0x22; 16], Some([0x11; 16])));
        assert_eq!(epoch_of(&[0x22; 16]), d.header.epoch);
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
        let mut expected = vec![0x54, 0x55, 0x01, 0x03, 0x00, 0x02, 0x00, 0x00];
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
            let mut expected = vec![0x54, 0x55, 0x01, 0x04, flag, 0x01, 0x00, 0x00];
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
        encode_single(DatagramKind::Hello, (1, 0, 0, 0), &[0; 16], None, &mut out);
        let mut b = out.clone();
        b[0] = b'X';
        assert!(matches!(
            Datagram::parse(&b, false, f),
            Err(UdpError::BadMagic(_))
        ));
        let mut b = out.clone();
        b[2] = 2;
        assert_eq!(
            Datagram::parse(&b, false, f).unwrap_err(),
            UdpError::BadVersion(2)
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
                expected: 16,
                have: 17
            })
        ));
        let mut b = out.clone();
        b[3] = 4;
        b[5] = 3;
        assert!(matches!(
            Datagram::parse(&b, false, f),
            Err(UdpError::BadLength { expected: 192, .. })
        ));
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
        let bytes = hex("5455 0103 0001 0000 0000 0000 0000 0007 2222 2222 2222 2222
             0000 0000 0000 0002 0a00 0001 9c40 0001 0a00 0002 1f90");
        let d = Datagram::parse(&bytes, false, RecordFormat::Header64).unwrap();
        assert_eq!(d.header.kind, DatagramKind::Messages);
        let (first, second) = d.nonces();
        assert_eq!(first[..14], bytes[32..]);
        assert_eq!(first[14..], [0, 0]);
        assert_eq!(second, None);
        let empty =
            hex("5455 0103 0000 0000 0000 0000 0000 0007 2222 2222 2222 2222 0000 0000 0000 0002");
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
}
