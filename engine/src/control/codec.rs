//! The control channel's byte formats, identical to the C tools' (spec §2.2–§2.4):
//!
//! * tcpcopy → intercept: [`ClientMessage`], 14 packed bytes
//!   (`clt_ip(4) clt_port(2) type(2) target_ip(4) target_port(2)`, all big-endian); the first
//!   message on every connection is the version hello (all zero but `type = 6`).
//! * intercept → tcpcopy: fixed-size response records ([`RecordFormat`]: 64 bytes, or 192 with
//!   up to 128 payload bytes), each the first 20 bytes of the captured IPv4 header followed by the
//!   TCP header with options (at most 44 bytes) at record offset 20, zero-padded; sent either in
//!   count-prefixed batches or bare ([`Framing`]).
//!
//! Sans-IO: the stream decoders accept the TCP byte stream in arbitrary chunks and never panic on
//! garbage; anything malformed comes back as a [`CodecError`].
//!
//! ```text
//!  msg_clt_t (14 bytes)                      msg_server_t (64 or 192 bytes)
//!  0        4      6      8        12    14   0            20               20+min(doff*4,44)
//!  +--------+------+------+--------+------+   +------------+----------------+-----------+-----+
//!  |clt_ip  |port  |type  |tgt_ip  |port  |   | IPv4 hdr   | TCP hdr + opts | [payload] | 0.. |
//!  +--------+------+------+--------+------+   | (20 bytes) | (<= 44 bytes)  | (<= 128)  |     |
//!                                             +------------+----------------+-----------+-----+
//! ```

use std::fmt;
use std::net::Ipv4Addr;

use crate::flow::FlowKey;

/// Size of a tcpcopy → intercept message (`MSG_CLT_SIZE`).
pub const CLIENT_MESSAGE_LEN: usize = 14;
/// The protocol version carried in the hello's type field (`INTERNAL_VERSION`).
pub const INTERNAL_VERSION: u16 = 6;
/// Record size of the default build (`MSG_SERVER_SIZE`).
pub const HEADER_RECORD_LEN: usize = 64;
/// Record size of the payload build (`--with-resp-payload`).
pub const PAYLOAD_RECORD_LEN: usize = 192;
/// Records per combined batch, default build (`COMB_MAX_NUM`).
pub const MAX_BATCH_HEADER: usize = 16;
/// Records per combined batch, payload build.
pub const MAX_BATCH_PAYLOAD: usize = 6;
/// Largest response payload a payload record carries (`MAX_PAYLOAD_LEN`).
pub const MAX_PAYLOAD_LEN: usize = 128;
/// Most TCP header bytes (20 + 24 option bytes) copied into a record.
pub const MAX_TCP_HEADER_COPY: usize = 44;
/// Offset of the TCP header inside a record, whatever the IP header length says.
pub const RECORD_TCP_OFFSET: usize = 20;
/// Capacity of [`ResponseHeader`]'s option buffer (the most a TCP header can hold).
pub const MAX_OPTIONS_LEN: usize = 40;
/// Length of the count prefix of a combined batch.
pub const BATCH_COUNT_LEN: usize = 2;

const IPV4_MIN_HEADER: usize = 20;
const TCP_MIN_HEADER: usize = 20;
const PROTOCOL_TCP: u8 = 6;

/// Why bytes were not accepted by the codec. Each variant's text is its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The packet is shorter than the headers it claims to hold.
    #[error("truncated packet: {have} bytes, need at least {need}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// The IP version field is not 4.
    #[error("not IPv4 (version {0})")]
    NotIpv4(u8),
    /// The IPv4 header length (IHL × 4) is below 20 bytes.
    #[error("IPv4 header length {0} is below 20 bytes")]
    BadIpHeaderLength(usize),
    /// The IP protocol is not TCP.
    #[error("not TCP (IP protocol {0})")]
    NotTcp(u8),
    /// The TCP data offset (doff × 4) is below 20 bytes.
    #[error("TCP header length {0} is below 20 bytes")]
    BadTcpHeaderLength(usize),
    /// The output buffer cannot hold one record.
    #[error("output buffer of {have} bytes is too short for a {need}-byte record")]
    BufferTooShort {
        /// Record size.
        need: usize,
        /// Buffer size.
        have: usize,
    },
    /// A record has neither of the two record sizes (or not the configured one).
    #[error("record of {have} bytes, expected {expected}")]
    BadRecordLength {
        /// The expected size.
        expected: usize,
        /// The size given.
        have: usize,
    },
    /// A combined batch announced 0 records or more than the format allows; the stream is out
    /// of step and the connection must be dropped.
    #[error("batch count {count} is outside 1..={max}")]
    BadBatchCount {
        /// The count read.
        count: u16,
        /// The most the format allows.
        max: usize,
    },
    /// The first message on a connection was not the version hello (non-zero client address):
    /// the peer speaks the pre-hello protocol.
    #[error("peer too old: first message names client {ip}:{port} instead of the version hello")]
    PeerTooOld {
        /// Client IP of the offending first message.
        ip: Ipv4Addr,
        /// Client port of the offending first message.
        port: u16,
    },
    /// The decoder already failed on this stream; it accepts nothing more.
    #[error("stream decoder already failed")]
    Failed,
}

/// The type field of a [`ClientMessage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// The version hello (`INTERNAL_VERSION` = 6).
    Hello,
    /// Register a route for a replayed session (`CLIENT_ADD` = 1).
    ClientAdd,
    /// Remove a route (`CLIENT_DEL` = 2; the C tcpcopy never sends it).
    ClientDel,
    /// Any other value (the C intercept logs "unknown msg type" and ignores it).
    Other(u16),
}

impl MessageType {
    /// The wire value.
    pub const fn to_u16(self) -> u16 {
        match self {
            MessageType::Hello => INTERNAL_VERSION,
            MessageType::ClientAdd => 1,
            MessageType::ClientDel => 2,
            MessageType::Other(v) => v,
        }
    }

    /// The type a wire value names.
    pub const fn from_u16(value: u16) -> MessageType {
        match value {
            INTERNAL_VERSION => MessageType::Hello,
            1 => MessageType::ClientAdd,
            2 => MessageType::ClientDel,
            v => MessageType::Other(v),
        }
    }
}

impl From<u16> for MessageType {
    fn from(value: u16) -> Self {
        MessageType::from_u16(value)
    }
}

impl From<MessageType> for u16 {
    fn from(value: MessageType) -> Self {
        value.to_u16()
    }
}

/// A tcpcopy → intercept message (`msg_clt_t`, 14 bytes packed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientMessage {
    /// Client IP as replayed (after `-c`).
    pub client_ip: Ipv4Addr,
    /// Client port as replayed (after `-f`/`-n`).
    pub client_port: u16,
    /// Message type.
    pub kind: MessageType,
    /// Target server IP.
    pub target_ip: Ipv4Addr,
    /// Target server port.
    pub target_port: u16,
}

impl ClientMessage {
    /// The version hello: all zero but `type = 6`.
    pub const fn hello() -> ClientMessage {
        ClientMessage {
            client_ip: Ipv4Addr::UNSPECIFIED,
            client_port: 0,
            kind: MessageType::Hello,
            target_ip: Ipv4Addr::UNSPECIFIED,
            target_port: 0,
        }
    }

    /// A message of type `kind` for the session `key`.
    pub const fn for_flow(key: FlowKey, kind: MessageType) -> ClientMessage {
        ClientMessage {
            client_ip: key.client_ip,
            client_port: key.client_port,
            kind,
            target_ip: key.target_ip,
            target_port: key.target_port,
        }
    }

    /// `CLIENT_ADD` for the session `key` (sent before its SYN).
    pub const fn add(key: FlowKey) -> ClientMessage {
        ClientMessage::for_flow(key, MessageType::ClientAdd)
    }

    /// `CLIENT_DEL` for the session `key`.
    pub const fn del(key: FlowKey) -> ClientMessage {
        ClientMessage::for_flow(key, MessageType::ClientDel)
    }

    /// The session this message names.
    pub const fn flow_key(&self) -> FlowKey {
        FlowKey {
            client_ip: self.client_ip,
            client_port: self.client_port,
            target_ip: self.target_ip,
            target_port: self.target_port,
        }
    }

    /// Whether the client address is all zero, as a hello's must be.
    pub fn has_hello_address(&self) -> bool {
        self.client_ip.is_unspecified() && self.client_port == 0
    }

    /// The 14 wire bytes.
    pub fn encode(&self) -> [u8; CLIENT_MESSAGE_LEN] {
        let mut b = [0u8; CLIENT_MESSAGE_LEN];
        b[0..4].copy_from_slice(&self.client_ip.octets());
        b[4..6].copy_from_slice(&self.client_port.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_u16().to_be_bytes());
        b[8..12].copy_from_slice(&self.target_ip.octets());
        b[12..14].copy_from_slice(&self.target_port.to_be_bytes());
        b
    }

    /// The message in 14 wire bytes (every bit pattern is a message).
    pub fn decode(bytes: &[u8; CLIENT_MESSAGE_LEN]) -> ClientMessage {
        ClientMessage {
            client_ip: Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]),
            client_port: u16::from_be_bytes([bytes[4], bytes[5]]),
            kind: MessageType::from_u16(u16::from_be_bytes([bytes[6], bytes[7]])),
            target_ip: Ipv4Addr::new(bytes[8], bytes[9], bytes[10], bytes[11]),
            target_port: u16::from_be_bytes([bytes[12], bytes[13]]),
        }
    }
}

/// The response record variant; both sides must agree (there is no negotiation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RecordFormat {
    /// 64-byte records: IP header + TCP header with options (default build).
    #[default]
    Header64,
    /// 192-byte records that also carry response payloads of 1..=128 bytes
    /// (intercept `--with-resp-payload`, tcpcopy with a payload module).
    Payload192,
}

impl RecordFormat {
    /// Size of one record.
    pub const fn record_len(self) -> usize {
        match self {
            RecordFormat::Header64 => HEADER_RECORD_LEN,
            RecordFormat::Payload192 => PAYLOAD_RECORD_LEN,
        }
    }

    /// Most records in one combined batch (`COMB_MAX_NUM`).
    pub const fn max_batch(self) -> usize {
        match self {
            RecordFormat::Header64 => MAX_BATCH_HEADER,
            RecordFormat::Payload192 => MAX_BATCH_PAYLOAD,
        }
    }

    /// The format whose records are `len` bytes long.
    pub const fn from_record_len(len: usize) -> Option<RecordFormat> {
        match len {
            HEADER_RECORD_LEN => Some(RecordFormat::Header64),
            PAYLOAD_RECORD_LEN => Some(RecordFormat::Payload192),
            _ => None,
        }
    }
}

/// How records are laid out on the stream; both sides must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Framing {
    /// Batches: big-endian `u16` count (1..=max batch) then that many records (default build).
    #[default]
    Combined,
    /// Bare records back to back (`--disable-combined`).
    Plain,
}

impl Framing {
    /// Largest encoded batch in bytes for `format`.
    pub const fn max_batch_bytes(self, format: RecordFormat) -> usize {
        let records = format.max_batch() * format.record_len();
        match self {
            Framing::Combined => BATCH_COUNT_LEN + records,
            Framing::Plain => records,
        }
    }
}

/// Builds one response record from a captured IPv4 packet (starting at the IP header) into
/// `out[..format.record_len()]`, the way the C intercept does: the first 20 IP header bytes as
/// they are (`ihl` and `tot_len` untouched, IP options dropped), the TCP header with options
/// (at most 44 bytes) at record offset 20, zeros after. In [`RecordFormat::Payload192`] a
/// payload of 1..=128 bytes (length from `tot_len`) is copied right after the TCP header
/// (offset `20 + doff*4`) if it fits in the record; a longer one is not copied. If the capture
/// was cut short (snap length) before the end of the payload, no payload is copied either.
///
/// # Errors
/// [`CodecError`] when `out` is too short or the packet is not a well-formed IPv4/TCP packet
/// holding its full TCP header (up to the 44 copied bytes).
pub fn encode_record(
    ip_packet: &[u8],
    format: RecordFormat,
    out: &mut [u8],
) -> Result<(), CodecError> {
    let record_len = format.record_len();
    if out.len() < record_len {
        return Err(CodecError::BufferTooShort {
            need: record_len,
            have: out.len(),
        });
    }
    let p = ip_packet;
    if p.len() < IPV4_MIN_HEADER {
        return Err(CodecError::Truncated {
            need: IPV4_MIN_HEADER,
            have: p.len(),
        });
    }
    let version = p[0] >> 4;
    if version != 4 {
        return Err(CodecError::NotIpv4(version));
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    if ihl < IPV4_MIN_HEADER {
        return Err(CodecError::BadIpHeaderLength(ihl));
    }
    if p[9] != PROTOCOL_TCP {
        return Err(CodecError::NotTcp(p[9]));
    }
    if p.len() < ihl + TCP_MIN_HEADER {
        return Err(CodecError::Truncated {
            need: ihl + TCP_MIN_HEADER,
            have: p.len(),
        });
    }
    let doff = usize::from(p[ihl + 12] >> 4) * 4;
    if doff < TCP_MIN_HEADER {
        return Err(CodecError::BadTcpHeaderLength(doff));
    }
    let copy = doff.min(MAX_TCP_HEADER_COPY);
    if p.len() < ihl + copy {
        return Err(CodecError::Truncated {
            need: ihl + copy,
            have: p.len(),
        });
    }
    let out = &mut out[..record_len];
    out.fill(0);
    out[..IPV4_MIN_HEADER].copy_from_slice(&p[..IPV4_MIN_HEADER]);
    out[RECORD_TCP_OFFSET..RECORD_TCP_OFFSET + copy].copy_from_slice(&p[ihl..ihl + copy]);
    if format == RecordFormat::Payload192 {
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        let payload_len = total.saturating_sub(ihl + doff);
        let at = RECORD_TCP_OFFSET + doff;
        let from = ihl + doff;
        if (1..=MAX_PAYLOAD_LEN).contains(&payload_len)
            && at + payload_len <= record_len
            && from + payload_len <= p.len()
        {
            out[at..at + payload_len].copy_from_slice(&p[from..from + payload_len]);
        }
    }
    Ok(())
}

/// The decoded, validated response record tcpcopy consumes: the header fields of one packet
/// the target sent, its TCP options and (payload format) its short payload.
///
/// `Copy` and allocation-free so it can travel through the rings to the workers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// IP source: the target server.
    pub src_ip: Ipv4Addr,
    /// IP destination: the (replayed) client.
    pub dst_ip: Ipv4Addr,
    /// TCP source port (target side).
    pub src_port: u16,
    /// TCP destination port (client side).
    pub dst_port: u16,
    /// TCP sequence number.
    pub seq: u32,
    /// TCP acknowledgment number.
    pub ack: u32,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, URG 0x20, …).
    pub flags: u8,
    /// TCP window (unscaled).
    pub window: u16,
    /// IP total length of the original packet.
    pub ip_total_len: u16,
    /// IP header length of the original packet (`ihl * 4`; options were not carried).
    pub ip_header_len: u8,
    /// TCP header length (`doff * 4`).
    pub tcp_header_len: u8,
    /// Response payload length: `tot_len - ihl*4 - doff*4`, saturating.
    pub payload_len: u16,
    options: [u8; MAX_OPTIONS_LEN],
    options_len: u8,
    payload: [u8; MAX_PAYLOAD_LEN],
    payload_copied: u8,
}

impl ResponseHeader {
    /// FIN flag bit.
    pub const FIN: u8 = 0x01;
    /// SYN flag bit.
    pub const SYN: u8 = 0x02;
    /// RST flag bit.
    pub const RST: u8 = 0x04;
    /// PSH flag bit.
    pub const PSH: u8 = 0x08;
    /// ACK flag bit.
    pub const ACK: u8 = 0x10;
    /// URG flag bit.
    pub const URG: u8 = 0x20;

    /// Decodes one record (64 or 192 bytes; the size says which format). The TCP header is
    /// read at record offset 20 whatever the IP header length says (spec Appendix B.3).
    ///
    /// # Errors
    /// [`CodecError::BadRecordLength`] for any other size, and the header errors of
    /// [`encode_record`] for a record that does not hold IPv4/TCP headers.
    pub fn parse(record: &[u8]) -> Result<ResponseHeader, CodecError> {
        let Some(format) = RecordFormat::from_record_len(record.len()) else {
            return Err(CodecError::BadRecordLength {
                expected: HEADER_RECORD_LEN,
                have: record.len(),
            });
        };
        let r = record;
        let version = r[0] >> 4;
        if version != 4 {
            return Err(CodecError::NotIpv4(version));
        }
        let ihl = usize::from(r[0] & 0x0f) * 4;
        if ihl < IPV4_MIN_HEADER {
            return Err(CodecError::BadIpHeaderLength(ihl));
        }
        if r[9] != PROTOCOL_TCP {
            return Err(CodecError::NotTcp(r[9]));
        }
        let t = &r[RECORD_TCP_OFFSET..];
        let doff = usize::from(t[12] >> 4) * 4;
        if doff < TCP_MIN_HEADER {
            return Err(CodecError::BadTcpHeaderLength(doff));
        }
        let ip_total_len = u16::from_be_bytes([r[2], r[3]]);
        let payload_len = usize::from(ip_total_len).saturating_sub(ihl + doff);
        let carried = doff.min(MAX_TCP_HEADER_COPY) - TCP_MIN_HEADER;
        let mut options = [0u8; MAX_OPTIONS_LEN];
        options[..carried].copy_from_slice(&t[TCP_MIN_HEADER..TCP_MIN_HEADER + carried]);
        let mut payload = [0u8; MAX_PAYLOAD_LEN];
        let mut payload_copied = 0u8;
        if format == RecordFormat::Payload192 {
            let at = RECORD_TCP_OFFSET + doff;
            if (1..=MAX_PAYLOAD_LEN).contains(&payload_len) && at + payload_len <= r.len() {
                payload[..payload_len].copy_from_slice(&r[at..at + payload_len]);
                payload_copied = payload_len as u8;
            }
        }
        Ok(ResponseHeader {
            src_ip: Ipv4Addr::new(r[12], r[13], r[14], r[15]),
            dst_ip: Ipv4Addr::new(r[16], r[17], r[18], r[19]),
            src_port: u16::from_be_bytes([t[0], t[1]]),
            dst_port: u16::from_be_bytes([t[2], t[3]]),
            seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
            ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
            flags: t[13],
            window: u16::from_be_bytes([t[14], t[15]]),
            ip_total_len,
            ip_header_len: ihl as u8,
            tcp_header_len: doff as u8,
            payload_len: payload_len as u16,
            options,
            options_len: carried as u8,
            payload,
            payload_copied,
        })
    }

    /// The session this response belongs to: client = (destination ip, destination port),
    /// target = (source ip, source port).
    pub fn flow_key(&self) -> FlowKey {
        FlowKey {
            client_ip: self.dst_ip,
            client_port: self.dst_port,
            target_ip: self.src_ip,
            target_port: self.src_port,
        }
    }

    /// Whether SYN is set.
    pub fn is_syn(&self) -> bool {
        self.flags & Self::SYN != 0
    }

    /// Whether FIN is set.
    pub fn is_fin(&self) -> bool {
        self.flags & Self::FIN != 0
    }

    /// Whether RST is set.
    pub fn is_rst(&self) -> bool {
        self.flags & Self::RST != 0
    }

    /// Whether ACK is set.
    pub fn has_ack(&self) -> bool {
        self.flags & Self::ACK != 0
    }

    /// The TCP option bytes carried (at most 24: the C intercept copies 44 header bytes).
    pub fn options(&self) -> &[u8] {
        &self.options[..usize::from(self.options_len)]
    }

    /// The response payload: only in the payload format and when it was 1..=128 bytes long;
    /// empty otherwise (check [`payload_len`](Self::payload_len) for the real length).
    pub fn payload(&self) -> &[u8] {
        &self.payload[..usize::from(self.payload_copied)]
    }

    /// The timestamps option `(TSval, TSecr)`, if present and well formed.
    pub fn timestamps(&self) -> Option<(u32, u32)> {
        let v = find_option(self.options(), 8, 10)?;
        Some((
            u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
            u32::from_be_bytes([v[4], v[5], v[6], v[7]]),
        ))
    }

    /// The window scale option's shift count, if present.
    pub fn window_scale(&self) -> Option<u8> {
        find_option(self.options(), 3, 3).map(|v| v[0])
    }

    /// The MSS option, if present.
    pub fn mss(&self) -> Option<u16> {
        find_option(self.options(), 2, 4).map(|v| u16::from_be_bytes([v[0], v[1]]))
    }
}

impl fmt::Debug for ResponseHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} > {}:{} flags {:#04x} seq {} ack {} win {} len {}",
            self.src_ip,
            self.src_port,
            self.dst_ip,
            self.dst_port,
            self.flags,
            self.seq,
            self.ack,
            self.window,
            self.payload_len
        )?;
        if self.options_len > 0 {
            write!(f, " opts {:02x?}", self.options())?;
        }
        if self.payload_copied > 0 {
            write!(f, " payload {} bytes", self.payload_copied)?;
        }
        Ok(())
    }
}

/// The value of TCP option `kind` if present with total length `len`.
fn find_option(options: &[u8], kind: u8, len: usize) -> Option<&[u8]> {
    let mut i = 0;
    while i < options.len() {
        match options[i] {
            0 => return None,
            1 => i += 1,
            k => {
                let l = usize::from(*options.get(i + 1)?);
                if l < 2 || i + l > options.len() {
                    return None;
                }
                if k == kind {
                    return (l == len).then(|| &options[i + 2..i + l]);
                }
                i += l;
            }
        }
    }
    None
}

/// Splits intercept's byte stream into records, whatever the chunking of the reads.
#[derive(Debug, Clone)]
pub struct RecordDecoder {
    format: RecordFormat,
    framing: Framing,
    partial: [u8; PAYLOAD_RECORD_LEN],
    partial_len: usize,
    count: [u8; BATCH_COUNT_LEN],
    count_len: usize,
    remaining: usize,
    failed: bool,
}

impl RecordDecoder {
    /// A decoder at the start of a stream.
    pub fn new(format: RecordFormat, framing: Framing) -> RecordDecoder {
        RecordDecoder {
            format,
            framing,
            partial: [0; PAYLOAD_RECORD_LEN],
            partial_len: 0,
            count: [0; BATCH_COUNT_LEN],
            count_len: 0,
            remaining: 0,
            failed: false,
        }
    }

    /// Forgets any partial input (for a new connection).
    pub fn reset(&mut self) {
        *self = RecordDecoder::new(self.format, self.framing);
    }

    /// Whether the decoder sits between records (and, combined, between batches).
    pub fn is_idle(&self) -> bool {
        self.partial_len == 0 && self.count_len == 0 && self.remaining == 0
    }

    /// Consumes `bytes` and calls `on_record` with every complete record (exactly
    /// `format.record_len()` bytes); returns how many were delivered.
    ///
    /// # Errors
    /// [`CodecError::BadBatchCount`] on a combined count of 0 or above the format's maximum
    /// (records before it were delivered); afterwards every call fails with
    /// [`CodecError::Failed`]. The caller drops the connection.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        mut on_record: impl FnMut(&[u8]),
    ) -> Result<usize, CodecError> {
        if self.failed {
            return Err(CodecError::Failed);
        }
        let record_len = self.format.record_len();
        let mut delivered = 0;
        loop {
            if self.framing == Framing::Combined && self.remaining == 0 {
                while self.count_len < BATCH_COUNT_LEN {
                    let Some((&b, rest)) = bytes.split_first() else {
                        return Ok(delivered);
                    };
                    self.count[self.count_len] = b;
                    self.count_len += 1;
                    bytes = rest;
                }
                self.count_len = 0;
                let count = u16::from_be_bytes(self.count);
                let max = self.format.max_batch();
                if count == 0 || usize::from(count) > max {
                    self.failed = true;
                    return Err(CodecError::BadBatchCount { count, max });
                }
                self.remaining = usize::from(count);
            }
            if bytes.is_empty() {
                return Ok(delivered);
            }
            if self.partial_len == 0 && bytes.len() >= record_len {
                on_record(&bytes[..record_len]);
                bytes = &bytes[record_len..];
            } else {
                let take = (record_len - self.partial_len).min(bytes.len());
                self.partial[self.partial_len..self.partial_len + take]
                    .copy_from_slice(&bytes[..take]);
                self.partial_len += take;
                bytes = &bytes[take..];
                if self.partial_len < record_len {
                    return Ok(delivered);
                }
                self.partial_len = 0;
                on_record(&self.partial[..record_len]);
            }
            delivered += 1;
            self.remaining = self.remaining.saturating_sub(1);
        }
    }
}

/// What a [`MessageDecoder::feed`] call saw besides the messages it delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MessageFeed {
    /// Messages delivered (the hello is not one of them).
    pub messages: usize,
    /// The version number of the hello, when this call completed it.
    pub hello_version: Option<u16>,
}

impl MessageFeed {
    /// Whether the hello carried a version other than [`INTERNAL_VERSION`]: the C intercept
    /// only warns about it and carries on.
    pub fn unexpected_version(&self) -> bool {
        matches!(self.hello_version, Some(v) if v != INTERNAL_VERSION)
    }
}

/// Splits tcpcopy's byte stream into 14-byte messages, checking the hello first.
#[derive(Debug, Clone, Default)]
pub struct MessageDecoder {
    buf: [u8; CLIENT_MESSAGE_LEN],
    len: usize,
    hello_seen: bool,
    failed: bool,
}

impl MessageDecoder {
    /// A decoder at the start of a connection (expecting the hello).
    pub fn new() -> MessageDecoder {
        MessageDecoder::default()
    }

    /// Whether the hello has been received.
    pub fn hello_seen(&self) -> bool {
        self.hello_seen
    }

    /// Consumes `bytes`; the first message must be the hello (client address all zero), every
    /// later one goes to `on_message` (whatever its type; unknown types are for the caller to
    /// log and ignore).
    ///
    /// # Errors
    /// [`CodecError::PeerTooOld`] when the first message has a non-zero client address; the
    /// connection is unusable (the C intercept tears it down). Then [`CodecError::Failed`].
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        mut on_message: impl FnMut(ClientMessage),
    ) -> Result<MessageFeed, CodecError> {
        if self.failed {
            return Err(CodecError::Failed);
        }
        let mut info = MessageFeed::default();
        while !bytes.is_empty() {
            let take = (CLIENT_MESSAGE_LEN - self.len).min(bytes.len());
            self.buf[self.len..self.len + take].copy_from_slice(&bytes[..take]);
            self.len += take;
            bytes = &bytes[take..];
            if self.len < CLIENT_MESSAGE_LEN {
                break;
            }
            self.len = 0;
            let message = ClientMessage::decode(&self.buf);
            if self.hello_seen {
                info.messages += 1;
                on_message(message);
            } else if message.has_hello_address() {
                self.hello_seen = true;
                info.hello_version = Some(message.kind.to_u16());
            } else {
                self.failed = true;
                return Err(CodecError::PeerTooOld {
                    ip: message.client_ip,
                    port: message.client_port,
                });
            }
        }
        Ok(info)
    }
}

/// Gathers records into one batch in the chosen framing (combined: count prefix, at most
/// `format.max_batch()` records; plain: bare records, the same cap for write coalescing).
#[derive(Debug, Clone)]
pub struct BatchEncoder {
    format: RecordFormat,
    framing: Framing,
    buf: Vec<u8>,
    count: usize,
}

impl BatchEncoder {
    /// An empty batch (the buffer is allocated once, at its largest size).
    pub fn new(format: RecordFormat, framing: Framing) -> BatchEncoder {
        BatchEncoder {
            format,
            framing,
            buf: Vec::with_capacity(framing.max_batch_bytes(format)),
            count: 0,
        }
    }

    /// Records in the batch.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the batch holds the most records it may.
    pub fn is_full(&self) -> bool {
        self.count >= self.format.max_batch()
    }

    /// Bytes `push(record)` would add now (a record, plus the count prefix on a new combined
    /// batch).
    pub fn push_cost(&self) -> usize {
        let prefix = if self.count == 0 && self.framing == Framing::Combined {
            BATCH_COUNT_LEN
        } else {
            0
        };
        prefix + self.format.record_len()
    }

    /// Appends one record; `Ok(true)` when the batch is now full and must be taken.
    ///
    /// # Errors
    /// [`CodecError::BadRecordLength`] if `record` is not one record of the format, or the
    /// batch is already full (reported as the batch size).
    pub fn push(&mut self, record: &[u8]) -> Result<bool, CodecError> {
        let record_len = self.format.record_len();
        if record.len() != record_len {
            return Err(CodecError::BadRecordLength {
                expected: record_len,
                have: record.len(),
            });
        }
        if self.is_full() {
            return Err(CodecError::BadBatchCount {
                count: (self.count + 1) as u16,
                max: self.format.max_batch(),
            });
        }
        if self.count == 0 {
            self.buf.clear();
            if self.framing == Framing::Combined {
                self.buf.extend_from_slice(&[0, 0]);
            }
        }
        self.buf.extend_from_slice(record);
        self.count += 1;
        if self.framing == Framing::Combined {
            self.buf[..BATCH_COUNT_LEN].copy_from_slice(&(self.count as u16).to_be_bytes());
        }
        Ok(self.is_full())
    }

    /// The encoded batch so far (empty if no record).
    pub fn bytes(&self) -> &[u8] {
        if self.count == 0 {
            &[]
        } else {
            &self.buf
        }
    }

    /// Starts a new batch (after [`bytes`](Self::bytes) were taken).
    pub fn clear(&mut self) {
        self.count = 0;
        self.buf.clear();
    }

    /// Appends the encoded batch to `out`, starts a new one, and returns its record count.
    pub fn finish_into(&mut self, out: &mut Vec<u8>) -> usize {
        let n = self.count;
        out.extend_from_slice(self.bytes());
        self.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::SocketAddrV4;

    fn key(c: [u8; 4], cp: u16, t: [u8; 4], tp: u16) -> FlowKey {
        FlowKey::new(
            SocketAddrV4::new(c.into(), cp),
            SocketAddrV4::new(t.into(), tp),
        )
    }

    /// A SYN-ACK captured on lo (tcpdump -x): 127.0.0.1:48765 > 127.0.0.1:34482,
    /// options mss 65495, sackOK, TS val 3149294093 ecr 2026046460, nop, wscale 10.
    const SYN_ACK: [u8; 60] = [
        0x45, 0x00, 0x00, 0x3c, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0x3c, 0xba, 0x7f, 0x00, 0x00,
        0x01, 0x7f, 0x00, 0x00, 0x01, 0xbe, 0x7d, 0x86, 0xb2, 0x15, 0x74, 0xf2, 0xfa, 0x1d, 0xf1,
        0x92, 0x16, 0xa0, 0x12, 0xff, 0xcb, 0xfe, 0x30, 0x00, 0x00, 0x02, 0x04, 0xff, 0xd7, 0x04,
        0x02, 0x08, 0x0a, 0xbb, 0xb6, 0x6a, 0x0d, 0x78, 0xc3, 0x03, 0xfc, 0x01, 0x03, 0x03, 0x0a,
    ];

    fn golden_syn_ack_record() -> [u8; 64] {
        let mut r = [0u8; 64];
        r[..60].copy_from_slice(&SYN_ACK);
        r
    }

    /// 10.0.0.2:8080 > 10.0.0.1:40000, ACK|PSH, doff 5, with `payload_len` bytes 0..n.
    fn data_packet(payload_len: usize) -> Vec<u8> {
        let total = 40 + payload_len;
        let mut p = vec![
            0x45,
            0x00,
            (total >> 8) as u8,
            total as u8,
            0x12,
            0x34,
            0x40,
            0x00,
            0x40,
            0x06,
            0x00,
            0x00,
            10,
            0,
            0,
            2,
            10,
            0,
            0,
            1, // IP
            0x1f,
            0x90,
            0x9c,
            0x40,
            0x00,
            0x00,
            0x10,
            0x00,
            0x00,
            0x00,
            0x20,
            0x00,
            0x50,
            0x18,
            0x01,
            0xf5,
            0x00,
            0x00,
            0x00,
            0x00, // TCP
        ];
        p.extend((0..payload_len).map(|i| i as u8));
        p
    }

    #[test]
    fn hello_golden() {
        let b = ClientMessage::hello().encode();
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0x00, 0x06, 0, 0, 0, 0, 0, 0]);
        assert_eq!(ClientMessage::decode(&b), ClientMessage::hello());
        assert_eq!(ClientMessage::decode(&b).kind, MessageType::Hello);
    }

    #[test]
    fn client_add_golden() {
        let k = key([10, 0, 0, 1], 40000, [10, 0, 0, 2], 8080);
        let b = ClientMessage::add(k).encode();
        assert_eq!(
            b,
            [0x0a, 0x00, 0x00, 0x01, 0x9c, 0x40, 0x00, 0x01, 0x0a, 0x00, 0x00, 0x02, 0x1f, 0x90]
        );
        let m = ClientMessage::decode(&b);
        assert_eq!(m.kind, MessageType::ClientAdd);
        assert_eq!(m.flow_key(), k);
    }

    #[test]
    fn client_del_golden() {
        let k = key([10, 0, 0, 1], 40000, [10, 0, 0, 2], 8080);
        let b = ClientMessage::del(k).encode();
        assert_eq!(
            b,
            [0x0a, 0x00, 0x00, 0x01, 0x9c, 0x40, 0x00, 0x02, 0x0a, 0x00, 0x00, 0x02, 0x1f, 0x90]
        );
        assert_eq!(ClientMessage::decode(&b), ClientMessage::del(k));
    }

    #[test]
    fn other_type_round_trips() {
        let mut b = ClientMessage::hello().encode();
        b[6] = 0x01;
        b[7] = 0x02;
        let m = ClientMessage::decode(&b);
        assert_eq!(m.kind, MessageType::Other(0x0102));
        assert_eq!(m.encode(), b);
        assert_eq!(u16::from(MessageType::from(7)), 7);
    }

    #[test]
    fn syn_ack_record_golden() {
        let mut out = [0xaau8; 64];
        encode_record(&SYN_ACK, RecordFormat::Header64, &mut out).unwrap();
        assert_eq!(out, golden_syn_ack_record());
        let h = ResponseHeader::parse(&out).unwrap();
        assert_eq!(h.src_ip, Ipv4Addr::LOCALHOST);
        assert_eq!(h.src_port, 48765);
        assert_eq!(h.dst_port, 34482);
        assert_eq!(h.seq, 359_985_914);
        assert_eq!(h.ack, 502_370_838);
        assert_eq!(h.flags, ResponseHeader::SYN | ResponseHeader::ACK);
        assert!(h.is_syn() && h.has_ack() && !h.is_rst() && !h.is_fin());
        assert_eq!(h.window, 65483);
        assert_eq!(h.ip_total_len, 60);
        assert_eq!(h.ip_header_len, 20);
        assert_eq!(h.tcp_header_len, 40);
        assert_eq!(h.payload_len, 0);
        assert_eq!(h.options().len(), 20);
        assert_eq!(h.mss(), Some(65495));
        assert_eq!(h.timestamps(), Some((3_149_294_093, 2_026_046_460)));
        assert_eq!(h.window_scale(), Some(10));
        assert!(h.payload().is_empty());
        assert_eq!(
            h.flow_key(),
            key([127, 0, 0, 1], 34482, [127, 0, 0, 1], 48765)
        );
        assert!(format!("{h:?}").contains("seq 359985914"));
    }

    #[test]
    fn ip_options_record_puts_tcp_at_20() {
        // ihl = 6: router alert option 94 04 00 00, then a 20-byte TCP header with 6 bytes of
        // payload (tot_len 50).
        let packet: [u8; 50] = [
            0x46, 0x00, 0x00, 0x32, 0x00, 0x01, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 10, 0, 0, 2,
            10, 0, 0, 1, 0x94, 0x04, 0x00, 0x00, // IP + options
            0x1f, 0x90, 0x9c, 0x40, 0x00, 0x00, 0x00, 0x64, 0x00, 0x00, 0x00, 0xc8, 0x50, 0x11,
            0x02, 0x00, 0x00, 0x00, 0x00, 0x00, // TCP FIN|ACK
            b'a', b'b', b'c', b'd', b'e', b'f',
        ];
        let mut out = [0u8; 64];
        encode_record(&packet, RecordFormat::Header64, &mut out).unwrap();
        let mut expected = [0u8; 64];
        expected[..20].copy_from_slice(&[
            0x46, 0x00, 0x00, 0x32, 0x00, 0x01, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 10, 0, 0, 2,
            10, 0, 0, 1,
        ]);
        expected[20..40].copy_from_slice(&[
            0x1f, 0x90, 0x9c, 0x40, 0x00, 0x00, 0x00, 0x64, 0x00, 0x00, 0x00, 0xc8, 0x50, 0x11,
            0x02, 0x00, 0x00, 0x00, 0x00, 0x00,
        ]);
        assert_eq!(out, expected);
        let h = ResponseHeader::parse(&out).unwrap();
        assert_eq!(h.ip_header_len, 24);
        assert_eq!(h.seq, 100);
        assert_eq!(h.ack, 200);
        assert!(h.is_fin());
        assert_eq!(h.payload_len, 6);
        assert_eq!(h.options(), &[] as &[u8]);
        assert_eq!(h.timestamps(), None);
    }

    #[test]
    fn payload_record_with_short_payload() {
        let p = data_packet(5);
        let mut out = [0u8; 192];
        encode_record(&p, RecordFormat::Payload192, &mut out).unwrap();
        let mut expected = [0u8; 192];
        expected[..45].copy_from_slice(&[
            0x45, 0x00, 0x00, 0x2d, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 10, 0, 0, 2,
            10, 0, 0, 1, 0x1f, 0x90, 0x9c, 0x40, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x20, 0x00,
            0x50, 0x18, 0x01, 0xf5, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04,
        ]);
        assert_eq!(out, expected);
        let h = ResponseHeader::parse(&out).unwrap();
        assert_eq!(h.payload_len, 5);
        assert_eq!(h.payload(), &[0, 1, 2, 3, 4]);
        // The same packet in the 64-byte format carries no payload.
        let mut small = [0u8; 64];
        encode_record(&p, RecordFormat::Header64, &mut small).unwrap();
        assert_eq!(small[..40], expected[..40]);
        assert!(small[40..].iter().all(|&b| b == 0));
        let h = ResponseHeader::parse(&small).unwrap();
        assert_eq!(h.payload_len, 5);
        assert!(h.payload().is_empty());
    }

    #[test]
    fn payload_record_with_long_payload_copies_nothing() {
        let p = data_packet(200);
        let mut out = [0u8; 192];
        encode_record(&p, RecordFormat::Payload192, &mut out).unwrap();
        let mut expected = [0u8; 192];
        expected[..40].copy_from_slice(&[
            0x45, 0x00, 0x00, 0xf0, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 10, 0, 0, 2,
            10, 0, 0, 1, 0x1f, 0x90, 0x9c, 0x40, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x20, 0x00,
            0x50, 0x18, 0x01, 0xf5, 0x00, 0x00, 0x00, 0x00,
        ]);
        assert_eq!(out, expected);
        let h = ResponseHeader::parse(&out).unwrap();
        assert_eq!(h.payload_len, 200);
        assert!(h.payload().is_empty());
    }

    #[test]
    fn payload_cut_by_snaplen_is_not_copied() {
        let mut p = data_packet(100);
        p.truncate(70);
        let mut out = [0u8; 192];
        encode_record(&p, RecordFormat::Payload192, &mut out).unwrap();
        assert!(out[40..].iter().all(|&b| b == 0));
    }

    #[test]
    fn encode_rejects_garbage() {
        let mut out = [0u8; 64];
        assert_eq!(
            encode_record(&[0x45; 10], RecordFormat::Header64, &mut out),
            Err(CodecError::Truncated { need: 20, have: 10 })
        );
        let mut p = SYN_ACK;
        p[0] = 0x65;
        assert_eq!(
            encode_record(&p, RecordFormat::Header64, &mut out),
            Err(CodecError::NotIpv4(6))
        );
        p[0] = 0x44;
        assert_eq!(
            encode_record(&p, RecordFormat::Header64, &mut out),
            Err(CodecError::BadIpHeaderLength(16))
        );
        p = SYN_ACK;
        p[9] = 17;
        assert_eq!(
            encode_record(&p, RecordFormat::Header64, &mut out),
            Err(CodecError::NotTcp(17))
        );
        p = SYN_ACK;
        p[32] = 0x40;
        assert_eq!(
            encode_record(&p, RecordFormat::Header64, &mut out),
            Err(CodecError::BadTcpHeaderLength(16))
        );
        assert_eq!(
            encode_record(&SYN_ACK[..50], RecordFormat::Header64, &mut out),
            Err(CodecError::Truncated { need: 60, have: 50 })
        );
        let mut short = [0u8; 63];
        assert_eq!(
            encode_record(&SYN_ACK, RecordFormat::Header64, &mut short),
            Err(CodecError::BufferTooShort { need: 64, have: 63 })
        );
        assert!(matches!(
            ResponseHeader::parse(&[0u8; 63]),
            Err(CodecError::BadRecordLength { have: 63, .. })
        ));
        assert_eq!(
            ResponseHeader::parse(&[0u8; 64]),
            Err(CodecError::NotIpv4(0))
        );
    }

    #[test]
    fn max_tcp_header_is_cut_to_44_bytes() {
        // doff = 15 (60 bytes): 40 option bytes, only 24 of them carried.
        let mut p = vec![
            0x45, 0x00, 0x00, 0x50, 0, 0, 0x40, 0, 0x40, 0x06, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
        ];
        p.extend_from_slice(&[
            0x1f, 0x90, 0x9c, 0x40, 0, 0, 0, 1, 0, 0, 0, 2, 0xf0, 0x12, 0xff, 0xff, 0, 0, 0, 0,
        ]);
        p.extend_from_slice(&[1; 40]);
        let mut out = [0u8; 192];
        encode_record(&p, RecordFormat::Payload192, &mut out).unwrap();
        assert_eq!(&out[40..64], &[1; 24]);
        assert!(out[64..].iter().all(|&b| b == 0));
        let h = ResponseHeader::parse(&out).unwrap();
        assert_eq!(h.tcp_header_len, 60);
        assert_eq!(h.options(), &[1; 24]);
        assert_eq!(h.payload_len, 0);
    }

    fn combined_two() -> Vec<u8> {
        let mut second = golden_syn_ack_record();
        second[24..28].copy_from_slice(&[0, 0, 0, 9]); // another seq
        let mut expected = vec![0x00, 0x02];
        expected.extend_from_slice(&golden_syn_ack_record());
        expected.extend_from_slice(&second);
        expected
    }

    /// Every record variant in every framing, both directions: bytes written by hand, the
    /// encoder must produce them and the decoder must give the records back.
    #[test]
    fn every_format_and_framing_golden_both_ways() {
        // A 192-byte record: the data packet with a 5-byte payload (see
        // payload_record_with_short_payload), and a 64-byte one: the SYN-ACK.
        let mut p192 = [0u8; 192];
        p192[..45].copy_from_slice(&[
            0x45, 0x00, 0x00, 0x2d, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 10, 0, 0, 2,
            10, 0, 0, 1, 0x1f, 0x90, 0x9c, 0x40, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x20, 0x00,
            0x50, 0x18, 0x01, 0xf5, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04,
        ]);
        let p64 = golden_syn_ack_record();
        let cases: [(RecordFormat, &[u8]); 2] = [
            (RecordFormat::Header64, &p64),
            (RecordFormat::Payload192, &p192),
        ];
        for (format, rec) in cases {
            let mut encoded = vec![0u8; format.record_len()];
            let packet = if format == RecordFormat::Header64 {
                SYN_ACK.to_vec()
            } else {
                data_packet(5)
            };
            encode_record(&packet, format, &mut encoded).unwrap();
            assert_eq!(encoded, rec, "{format:?} record");
            for framing in [Framing::Combined, Framing::Plain] {
                // Three records: 00 03 | r r r (combined) or r r r (plain).
                let mut expected = Vec::new();
                if framing == Framing::Combined {
                    expected.extend_from_slice(&[0x00, 0x03]);
                }
                for _ in 0..3 {
                    expected.extend_from_slice(rec);
                }
                let mut enc = BatchEncoder::new(format, framing);
                for _ in 0..3 {
                    enc.push(rec).unwrap();
                }
                let mut out = Vec::new();
                assert_eq!(enc.finish_into(&mut out), 3);
                assert_eq!(out, expected, "{format:?} {framing:?} encode");
                let mut dec = RecordDecoder::new(format, framing);
                let mut got = Vec::new();
                for chunk in expected.chunks(7) {
                    dec.feed(chunk, |r| got.push(r.to_vec())).unwrap();
                }
                assert_eq!(got, vec![rec.to_vec(); 3], "{format:?} {framing:?} decode");
                assert!(dec.is_idle());
                let h = ResponseHeader::parse(&got[0]).unwrap();
                if format == RecordFormat::Payload192 {
                    assert_eq!(h.payload(), &[0, 1, 2, 3, 4]);
                } else {
                    assert_eq!(h.mss(), Some(65495));
                }
            }
        }
    }

    #[test]
    fn combined_batch_golden() {
        let expected = combined_two();
        let mut enc = BatchEncoder::new(RecordFormat::Header64, Framing::Combined);
        assert_eq!(enc.push_cost(), 66);
        assert!(!enc.push(&expected[2..66]).unwrap());
        assert_eq!(enc.push_cost(), 64);
        assert!(!enc.push(&expected[66..]).unwrap());
        assert_eq!(enc.count(), 2);
        let mut out = Vec::new();
        assert_eq!(enc.finish_into(&mut out), 2);
        assert_eq!(out, expected);
        assert!(enc.is_empty());
        assert!(enc.bytes().is_empty());
    }

    #[test]
    fn plain_framing_golden() {
        let rec = golden_syn_ack_record();
        let mut enc = BatchEncoder::new(RecordFormat::Header64, Framing::Plain);
        assert_eq!(enc.push_cost(), 64);
        enc.push(&rec).unwrap();
        enc.push(&rec).unwrap();
        let mut out = Vec::new();
        enc.finish_into(&mut out);
        let mut expected = rec.to_vec();
        expected.extend_from_slice(&rec);
        assert_eq!(out, expected);

        let mut dec = RecordDecoder::new(RecordFormat::Header64, Framing::Plain);
        let mut got = Vec::new();
        for b in &out {
            dec.feed(std::slice::from_ref(b), |r| got.push(r.to_vec()))
                .unwrap();
        }
        assert_eq!(got, vec![rec.to_vec(), rec.to_vec()]);
        assert!(dec.is_idle());
    }

    #[test]
    fn batch_encoder_fills_up() {
        let rec = golden_syn_ack_record();
        let mut enc = BatchEncoder::new(RecordFormat::Header64, Framing::Combined);
        for i in 0..16 {
            assert_eq!(enc.push(&rec).unwrap(), i == 15);
        }
        assert!(enc.is_full());
        assert!(enc.push(&rec).is_err());
        assert_eq!(&enc.bytes()[..2], &[0, 16]);
        assert_eq!(enc.bytes().len(), 2 + 16 * 64);
        assert!(enc.push(&rec[..10]).is_err());
        let mut enc = BatchEncoder::new(RecordFormat::Payload192, Framing::Combined);
        let big = [0u8; 192];
        for i in 0..6 {
            assert_eq!(enc.push(&big).unwrap(), i == 5);
        }
        assert_eq!(
            enc.bytes().len(),
            Framing::Combined.max_batch_bytes(RecordFormat::Payload192)
        );
        assert_eq!(enc.bytes().len(), 1154);
    }

    #[test]
    fn combined_decoder_byte_at_a_time() {
        let stream = combined_two();
        let mut dec = RecordDecoder::new(RecordFormat::Header64, Framing::Combined);
        let mut got = Vec::new();
        let mut total = 0;
        for b in &stream {
            total += dec
                .feed(std::slice::from_ref(b), |r| got.push(r.to_vec()))
                .unwrap();
        }
        assert_eq!(total, 2);
        assert_eq!(got[0], &stream[2..66]);
        assert_eq!(got[1], &stream[66..]);
        assert!(dec.is_idle());
        // All at once, twice in a row.
        let mut twice = stream.clone();
        twice.extend_from_slice(&stream);
        got.clear();
        assert_eq!(dec.feed(&twice, |r| got.push(r.to_vec())).unwrap(), 4);
        assert_eq!(got[3], &stream[66..]);
    }

    #[test]
    fn combined_decoder_rejects_bad_counts() {
        let mut dec = RecordDecoder::new(RecordFormat::Header64, Framing::Combined);
        assert_eq!(
            dec.feed(&[0, 0], |_| {}),
            Err(CodecError::BadBatchCount { count: 0, max: 16 })
        );
        assert_eq!(dec.feed(&[0, 1], |_| {}), Err(CodecError::Failed));
        let mut dec = RecordDecoder::new(RecordFormat::Header64, Framing::Combined);
        assert!(matches!(
            dec.feed(&[0, 17], |_| {}),
            Err(CodecError::BadBatchCount { .. })
        ));
        let mut dec = RecordDecoder::new(RecordFormat::Payload192, Framing::Combined);
        assert!(matches!(
            dec.feed(&[0, 7], |_| {}),
            Err(CodecError::BadBatchCount { count: 7, max: 6 })
        ));
        // A good record before the bad count is still delivered.
        let mut dec = RecordDecoder::new(RecordFormat::Header64, Framing::Combined);
        let mut stream = vec![0, 1];
        stream.extend_from_slice(&golden_syn_ack_record());
        stream.extend_from_slice(&[0xff, 0xff]);
        let mut n = 0;
        assert!(dec.feed(&stream, |_| n += 1).is_err());
        assert_eq!(n, 1);
        dec.reset();
        assert!(dec.feed(&stream[..10], |_| {}).is_ok());
    }

    #[test]
    fn message_decoder_byte_at_a_time() {
        let k = key([10, 0, 0, 1], 40000, [10, 0, 0, 2], 8080);
        let mut stream = ClientMessage::hello().encode().to_vec();
        stream.extend_from_slice(&ClientMessage::add(k).encode());
        stream.extend_from_slice(&ClientMessage::del(k).encode());
        let mut dec = MessageDecoder::new();
        let mut got = Vec::new();
        let mut hello = None;
        for b in &stream {
            let info = dec.feed(std::slice::from_ref(b), |m| got.push(m)).unwrap();
            if info.hello_version.is_some() {
                hello = info.hello_version;
                assert!(!info.unexpected_version());
            }
        }
        assert_eq!(hello, Some(6));
        assert!(dec.hello_seen());
        assert_eq!(got, vec![ClientMessage::add(k), ClientMessage::del(k)]);
        // The C way: 8 bytes, then 6, then whole messages.
        let mut dec = MessageDecoder::new();
        got.clear();
        dec.feed(&stream[..8], |m| got.push(m)).unwrap();
        let info = dec.feed(&stream[8..], |m| got.push(m)).unwrap();
        assert_eq!(info.messages, 2);
        assert_eq!(info.hello_version, Some(6));
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn message_decoder_hello_checks() {
        let mut hello = ClientMessage::hello().encode();
        hello[7] = 5;
        let mut dec = MessageDecoder::new();
        let info = dec.feed(&hello, |_| {}).unwrap();
        assert!(info.unexpected_version());
        assert_eq!(info.hello_version, Some(5));

        let k = key([10, 0, 0, 1], 40000, [10, 0, 0, 2], 8080);
        let mut dec = MessageDecoder::new();
        let mut n = 0;
        assert_eq!(
            dec.feed(&ClientMessage::add(k).encode(), |_| n += 1),
            Err(CodecError::PeerTooOld {
                ip: Ipv4Addr::new(10, 0, 0, 1),
                port: 40000
            })
        );
        assert_eq!(n, 0);
        assert_eq!(dec.feed(&hello, |_| {}), Err(CodecError::Failed));
    }

    fn arb_message() -> impl Strategy<Value = ClientMessage> {
        (
            any::<u32>(),
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
            any::<u16>(),
        )
            .prop_map(|(ci, cp, t, ti, tp)| ClientMessage {
                client_ip: ci.into(),
                client_port: cp,
                kind: MessageType::from_u16(t),
                target_ip: ti.into(),
                target_port: tp,
            })
    }

    /// A random IPv4/TCP packet: (bytes, ihl, doff, payload length).
    fn arb_packet() -> impl Strategy<Value = (Vec<u8>, usize, usize, usize)> {
        (
            5usize..=15,
            5usize..=15,
            0usize..300,
            any::<[u8; 20]>(),
            any::<[u8; 20]>(),
        )
            .prop_flat_map(|(ihl_w, doff_w, plen, ip, tcp)| {
                let ihl = ihl_w * 4;
                let doff = doff_w * 4;
                proptest::collection::vec(any::<u8>(), (ihl - 20) + (doff - 20) + plen).prop_map(
                    move |rest| {
                        let mut p = ip.to_vec();
                        p[0] = 0x40 | ihl_w as u8;
                        p[9] = 6;
                        let total = (ihl + doff + plen) as u16;
                        p[2..4].copy_from_slice(&total.to_be_bytes());
                        p.extend_from_slice(&rest[..ihl - 20]);
                        let mut t = tcp.to_vec();
                        t[12] = (doff_w as u8) << 4 | (t[12] & 0x0f);
                        p.extend_from_slice(&t);
                        p.extend_from_slice(&rest[ihl - 20..]);
                        (p, ihl, doff, plen)
                    },
                )
            })
    }

    proptest! {
        #[test]
        fn message_round_trip(m in arb_message()) {
            prop_assert_eq!(ClientMessage::decode(&m.encode()), m);
        }

        #[test]
        fn record_round_trip(
            (p, ihl, doff, plen) in arb_packet(),
            payload in any::<bool>(),
        ) {
            let format = if payload { RecordFormat::Payload192 } else { RecordFormat::Header64 };
            let mut out = vec![0u8; format.record_len()];
            encode_record(&p, format, &mut out).unwrap();
            let h = ResponseHeader::parse(&out).unwrap();
            let t = &p[ihl..];
            prop_assert_eq!(h.src_ip.octets(), [p[12], p[13], p[14], p[15]]);
            prop_assert_eq!(h.dst_ip.octets(), [p[16], p[17], p[18], p[19]]);
            prop_assert_eq!(h.src_port, u16::from_be_bytes([t[0], t[1]]));
            prop_assert_eq!(h.dst_port, u16::from_be_bytes([t[2], t[3]]));
            prop_assert_eq!(h.seq, u32::from_be_bytes([t[4], t[5], t[6], t[7]]));
            prop_assert_eq!(h.ack, u32::from_be_bytes([t[8], t[9], t[10], t[11]]));
            prop_assert_eq!(h.flags, t[13]);
            prop_assert_eq!(h.window, u16::from_be_bytes([t[14], t[15]]));
            prop_assert_eq!(usize::from(h.ip_header_len), ihl);
            prop_assert_eq!(usize::from(h.tcp_header_len), doff);
            prop_assert_eq!(usize::from(h.payload_len), plen);
            let carried = doff.min(44) - 20;
            prop_assert_eq!(h.options(), &t[20..20 + carried]);
            let expect_payload = payload && (1..=128).contains(&plen) && 20 + doff + plen <= 192;
            if expect_payload {
                prop_assert_eq!(h.payload(), &p[ihl + doff..]);
            } else {
                prop_assert!(h.payload().is_empty());
            }
            // The same record through a combined stream, in random-ish chunks.
            let mut enc = BatchEncoder::new(format, Framing::Combined);
            enc.push(&out).unwrap();
            let mut stream = Vec::new();
            enc.finish_into(&mut stream);
            let mut dec = RecordDecoder::new(format, Framing::Combined);
            let mut got = Vec::new();
            for chunk in stream.chunks(1 + plen % 7) {
                dec.feed(chunk, |r| got.push(r.to_vec())).unwrap();
            }
            prop_assert_eq!(got, vec![out.clone()]);
            // Option getters never panic.
            let _ = (h.timestamps(), h.window_scale(), h.mss(), format!("{h:?}"));
        }

        #[test]
        fn garbage_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            chunk in 1usize..300,
        ) {
            for format in [RecordFormat::Header64, RecordFormat::Payload192] {
                for framing in [Framing::Combined, Framing::Plain] {
                    let mut dec = RecordDecoder::new(format, framing);
                    for c in bytes.chunks(chunk) {
                        let _ = dec.feed(c, |r| {
                            assert_eq!(r.len(), format.record_len());
                            if let Ok(h) = ResponseHeader::parse(r) {
                                let _ = (h.timestamps(), h.window_scale(), h.mss(), h.payload());
                            }
                        });
                    }
                }
                let mut out = vec![0u8; format.record_len()];
                let _ = encode_record(&bytes, format, &mut out);
            }
            let mut dec = MessageDecoder::new();
            for c in bytes.chunks(chunk) {
                let _ = dec.feed(c, |_| {});
            }
            let _ = ResponseHeader::parse(&bytes);
            if bytes.len() >= 64 {
                let _ = ResponseHeader::parse(&bytes[..64]);
            }
        }

        /// Hostile records: a real SYN-ACK record whose IHL and data offset sit anywhere in
        /// 0..=15, whose Total Length lies (0..=65535), in both sizes. `parse` refuses exactly
        /// the reference's cases with its error, and what it accepts carries no more option or
        /// payload bytes than the record holds.
        #[test]
        fn lying_record_headers(ihl in 0u8..16, doff in 0u8..16, total in any::<u16>(),
                                payload_format in any::<bool>(), fill in any::<u8>(),
                                protocol in prop::sample::select(vec![6u8, 17, 0])) {
            let len = if payload_format { PAYLOAD_RECORD_LEN } else { HEADER_RECORD_LEN };
            let mut record = golden_syn_ack_record().to_vec();
            record.resize(len, fill);
            record[0] = 0x40 | ihl;
            record[2..4].copy_from_slice(&total.to_be_bytes());
            record[9] = protocol;
            record[RECORD_TCP_OFFSET + 12] = doff << 4;
            let ihl = usize::from(ihl) * 4;
            let doff = usize::from(doff) * 4;
            let expected = if ihl < 20 {
                Err(CodecError::BadIpHeaderLength(ihl))
            } else if protocol != 6 {
                Err(CodecError::NotTcp(protocol))
            } else if doff < 20 {
                Err(CodecError::BadTcpHeaderLength(doff))
            } else {
                Ok(())
            };
            match ResponseHeader::parse(&record) {
                Ok(h) => {
                    prop_assert_eq!(expected, Ok(()));
                    prop_assert_eq!(h.options(), &record[40..20 + doff.min(44)]);
                    let payload_len = usize::from(total).saturating_sub(ihl + doff);
                    prop_assert_eq!(usize::from(h.payload_len), payload_len);
                    let carried = payload_format && (1..=128).contains(&payload_len)
                        && 20 + doff + payload_len <= len;
                    prop_assert_eq!(h.payload(), if carried { &record[20 + doff..20 + doff + payload_len] } else { &[][..] });
                    let _ = (h.timestamps(), h.window_scale(), h.mss(), format!("{h:?}"));
                }
                Err(e) => prop_assert_eq!(Err(e), expected),
            }
            // Any other size is refused for its size.
            for cut in [0, 1, 20, 63, 65, 191, 193] {
                let mut other = record.clone();
                other.resize(cut, 0);
                let refused = matches!(ResponseHeader::parse(&other),
                    Err(CodecError::BadRecordLength { have, .. }) if have == cut);
                prop_assert!(refused);
            }
        }

        /// `encode_record` on captured packets whose IHL, data offset and Total Length lie, cut
        /// at every byte: refused by reason (the reference below), never a panic.
        #[test]
        fn encode_record_refuses_by_reason((p, _, _, _) in arb_packet(), ihl in 0u8..16,
                                           doff in 0u8..16, total in any::<u16>(),
                                           payload in any::<bool>()) {
            let mut p = p;
            p[0] = 0x40 | ihl;
            p[2..4].copy_from_slice(&total.to_be_bytes());
            let ihl = usize::from(ihl) * 4;
            if p.len() > ihl + 12 {
                p[ihl + 12] = doff << 4;
            }
            let format = if payload { RecordFormat::Payload192 } else { RecordFormat::Header64 };
            for cut in 0..=p.len() {
                let buf = &p[..cut];
                let expected = (|| {
                    if cut < 20 {
                        return Err(CodecError::Truncated { need: 20, have: cut });
                    }
                    if ihl < 20 {
                        return Err(CodecError::BadIpHeaderLength(ihl));
                    }
                    if cut < ihl + 20 {
                        return Err(CodecError::Truncated { need: ihl + 20, have: cut });
                    }
                    let doff = usize::from(buf[ihl + 12] >> 4) * 4;
                    if doff < 20 {
                        return Err(CodecError::BadTcpHeaderLength(doff));
                    }
                    if cut < ihl + doff.min(44) {
                        return Err(CodecError::Truncated { need: ihl + doff.min(44), have: cut });
                    }
                    Ok(())
                })();
                let mut out = vec![0u8; format.record_len()];
                prop_assert_eq!(encode_record(buf, format, &mut out), expected);
                if expected.is_ok() {
                    prop_assert!(ResponseHeader::parse(&out).is_ok());
                }
            }
        }

        /// A combined stream whose batch counts lie (0, fewer or more records than follow,
        /// above the maximum), fed in chunks of any size: the decoder delivers exactly what a
        /// whole-buffer reading of the stream delivers and fails at the same count, typed.
        #[test]
        fn lying_batch_counts(batches in proptest::collection::vec((0u16..20, 0usize..4), 1..6),
                              chunk in 1usize..200, payload in any::<bool>()) {
            let format = if payload { RecordFormat::Payload192 } else { RecordFormat::Header64 };
            let record_len = format.record_len();
            let mut stream = Vec::new();
            let mut n = 0u8;
            for (count, records) in batches {
                stream.extend_from_slice(&count.to_be_bytes());
                for _ in 0..records {
                    n = n.wrapping_add(1);
                    stream.resize(stream.len() + record_len, n);
                }
            }
            // The reference: the whole stream at once.
            let mut expected = Vec::new();
            let mut expected_error = None;
            let mut pos = 0;
            'stream: while pos + 2 <= stream.len() {
                let count = u16::from_be_bytes([stream[pos], stream[pos + 1]]);
                if count == 0 || usize::from(count) > format.max_batch() {
                    expected_error = Some(CodecError::BadBatchCount { count, max: format.max_batch() });
                    break;
                }
                pos += 2;
                for _ in 0..count {
                    if pos + record_len > stream.len() {
                        break 'stream;
                    }
                    expected.push(stream[pos..pos + record_len].to_vec());
                    pos += record_len;
                }
            }
            let mut decoder = RecordDecoder::new(format, Framing::Combined);
            let mut got = Vec::new();
            let mut error = None;
            for c in stream.chunks(chunk) {
                if let Err(e) = decoder.feed(c, |r| got.push(r.to_vec())) {
                    error = Some(e);
                    break;
                }
            }
            prop_assert_eq!(got, expected);
            prop_assert_eq!(error, expected_error);
            if error.is_some() {
                prop_assert_eq!(decoder.feed(&[0, 1], |_| {}), Err(CodecError::Failed));
            }
        }

        #[test]
        fn random_records_parse_without_panic(record in proptest::collection::vec(any::<u8>(), 192)) {
            let _ = ResponseHeader::parse(&record).map(|h| (h.timestamps(), h.window_scale(), h.mss()));
            let _ = ResponseHeader::parse(&record[..64]).map(|h| (h.timestamps(), h.window_scale(), h.mss()));
        }
    }
}
