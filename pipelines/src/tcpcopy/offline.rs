//! Offline replay (`--pcap FILE`, spec §5): an [`RxPort`] that reads a pcap or pcapng capture
//! file and releases its packets on the capture's own schedule, so the worker replays a
//! recorded day as if it were live.
//!
//! - **Formats**: pcap (both byte orders, µs and ns timestamps) and pcapng (any number of
//!   sections and interfaces, `if_tsresol` honoured), parsed with the `pcap-file` crate's
//!   slice parsers over a reused buffer, so a stop is located to the byte.
//! - **Link types**: every frame is handed out as Ethernet II, which is what the worker parses.
//!   Ethernet (1) as is; Linux cooked SLL (113) and SLL2 (276), raw IP (12, 14, 101, 228) and
//!   BSD loopback (0, 108) get a synthetic Ethernet header. Anything else is refused at open,
//!   naming the link type.
//! - **Filter**: the capture filter (`-F`, default made from `-x`) runs in user space
//!   ([`SoftFilter`]) on the normalised frame. Only matching packets drive timing and reach the
//!   worker; the others are skipped without pause.
//! - **Timing**: matching packet `k` is due at `start + (ts_k - ts_first - collapsed_k) / a`,
//!   where `start` is when the first matching packet was read, `a` is `-a`, and `collapsed_k`
//!   sums the gaps between consecutive matching packets longer than `-I` (each such gap is
//!   collapsed to zero, once). A timestamp that goes backwards counts as a zero gap. A
//!   `timerfd` armed at the next due instant is the port's wait fd, so the worker sleeps until
//!   then (sub-millisecond release precision, no spinning).
//! - **Rounds** (`-T`): a round ends when the file is read to the end *and* the consumer
//!   reports that nothing is in flight ([`RxPort::consumer_idle`]; the tcpcopy worker: no
//!   active session), or a tail timeout after the end of the file passes. The next round
//!   reopens the file; after the last one [`RxPort::finished`] turns true.
//! - **Damage**: packets cut by the snap length (`caplen < len`) are counted and dropped. A
//!   truncated or corrupt file replays what precedes the damage; the log says where reading
//!   stopped (byte offset, packet number, what was wrong).
//!
//! Conscious departures from the C tool (spec §5): every packet is released at its own due
//! time (not one packet early, not on a 10 ms tick); a long gap is collapsed once (the C tool
//! may add it several times); rounds end on idleness or a short tail, not after a fixed 120 s;
//! `-a` below 1 slows the replay down (the C tool raises it to 1); SLL2, raw IP and loopback
//! captures are accepted (the C tool rejects raw IP and mis-parses unknown link types).

#![allow(unsafe_code)]

use engine::port::afpacket::PortError;
use engine::port::filter::SoftFilter;
use engine::port::{Frame, PortStats, RxPort};
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgParser};
use pcap_file::{DataLink, Endianness, PcapError};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, IsTerminal as _, Read, Write as _};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default `--offline-tail-s`: how long a round waits after the end of the file for the last
/// sessions to finish.
pub const DEFAULT_TAIL: Duration = Duration::from_secs(5);
/// Smallest accepted `-a`.
pub const MIN_ACCELERATION: f64 = 0.01;
/// Largest accepted `-a`.
pub const MAX_ACCELERATION: f64 = 1_000_000.0;
/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Bytes read from the file at a time.
const READ_CHUNK: usize = 1 << 20;
/// Largest record (pcap) or block (pcapng) accepted; a longer one means the file is corrupt.
const MAX_RECORD: usize = 16 << 20;
/// The largest pcap record length libpcap accepts whatever the header's snap length says.
const MAX_SNAPLEN: u32 = 262_144;
/// Destination MAC of the synthetic Ethernet header (locally administered).
const SYNTHETIC_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// Source MAC of the synthetic Ethernet header when the capture has none.
const SYNTHETIC_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
/// `AF_INET` as written in DLT_NULL / DLT_LOOP headers (the same on every OS).
const AF_INET: u32 = 2;

/// The source of "now" for the release schedule; [`OfflineRx::open`] uses [`Instant::now`],
/// tests pass a virtual clock.
pub type Clock = Box<dyn Fn() -> Instant + Send>;

/// What an offline replay needs, already validated by the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct OfflineConfig {
    /// The pcap or pcapng file (`--pcap`).
    pub path: PathBuf,
    /// Capture filter (pcap syntax) selecting the packets to replay (`-F`, default made from `-x`).
    pub filter: String,
    /// Speed-up factor (`-a`): 2.0 replays twice as fast, 0.5 at half speed.
    pub acceleration: f64,
    /// `-I`: gaps between consecutive matching packets longer than this are skipped.
    pub idle_gap: Option<Duration>,
    /// `-T`: how many times the file is replayed, at least 1.
    pub rounds: u32,
    /// `--offline-tail-s`: how long a round waits after the end of the file for the consumer to
    /// become idle before the next round starts (or the replay ends) anyway.
    pub tail: Duration,
    /// Redraw a progress line on stderr every half second (only sensible on a terminal).
    pub progress: bool,
}

impl OfflineConfig {
    /// A replay of `path` selecting with `filter`, at capture speed, once, with the default tail;
    /// progress shown when stderr is a terminal.
    pub fn new(path: impl Into<PathBuf>, filter: impl Into<String>) -> OfflineConfig {
        OfflineConfig {
            path: path.into(),
            filter: filter.into(),
            acceleration: 1.0,
            idle_gap: None,
            rounds: 1,
            tail: DEFAULT_TAIL,
            progress: io::stderr().is_terminal(),
        }
    }

    /// Checks the numbers.
    ///
    /// # Errors
    /// [`OfflineError::BadSetting`] naming the flag and the accepted form.
    pub fn validate(&self) -> Result<(), OfflineError> {
        if !(MIN_ACCELERATION..=MAX_ACCELERATION).contains(&self.acceleration) {
            return Err(OfflineError::BadSetting(format!(
                "bad -a value {}: the acceleration is a number from {MIN_ACCELERATION} (100x slower) \
                 to {MAX_ACCELERATION}, e.g. -a 10 for ten times the capture's speed",
                self.acceleration
            )));
        }
        if self.rounds == 0 {
            return Err(OfflineError::BadSetting(
                "bad -T value 0: the number of replays is at least 1, e.g. -T 3".into(),
            ));
        }
        Ok(())
    }
}

/// Why an offline replay cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The file cannot be opened or read.
    #[error("cannot read the capture file {path}: {error}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// The file does not start like a pcap or pcapng file.
    #[error("{path} is not a pcap or pcapng capture file ({detail})")]
    NotCapture {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        detail: String,
    },
    /// The file header or the first blocks are damaged.
    #[error("{path}: damaged capture file header: {detail}")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The capture's link type cannot be turned into Ethernet frames.
    #[error(
        "{path}: unsupported link type {code} ({name}); offline replay reads Ethernet (1), Linux \
         cooked SLL (113) and SLL2 (276), raw IP (12, 14, 101, 228) and BSD loopback (0, 108) \
         captures (convert others with editcap or record with tcpdump -i <interface>)"
    )]
    UnsupportedLink {
        /// The file.
        path: PathBuf,
        /// The LINKTYPE_ value.
        code: u32,
        /// Its name.
        name: String,
    },
    /// The capture filter does not compile.
    #[error(transparent)]
    Filter(#[from] PortError),
    /// A setting is out of range.
    #[error("{0}")]
    BadSetting(String),
    /// The release timer cannot be created.
    #[error("cannot create the offline release timer (timerfd): {0}")]
    Timer(io::Error),
}

/// What an offline replay counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OfflineStats {
    /// Rounds completed.
    pub rounds: u32,
    /// Packet records read from the file (all rounds).
    pub read: u64,
    /// Packets handed to the consumer.
    pub packets: u64,
    /// Bytes handed to the consumer (normalised frames).
    pub bytes: u64,
    /// Packets the capture filter did not select (skipped without pause).
    pub not_matching: u64,
    /// Packets cut by the snap length (`caplen < len`), dropped.
    pub cut_short: u64,
    /// Packets whose link header could not be turned into Ethernet (too short, unknown family).
    pub undecodable: u64,
    /// pcapng packets of an interface with an unsupported (or undeclared) link type.
    pub unsupported_link: u64,
    /// Capture time skipped by `-I`, nanoseconds.
    pub collapsed_ns: u64,
    /// Packets whose timestamp jumped more than [`MAX_PLAUSIBLE_GAP`] past the packets before
    /// them (a damaged record): replayed at once, and the schedule goes on from the packets
    /// around them instead of waiting for that far future.
    pub damaged_timestamps: u64,
    /// Rounds that ended by the tail timeout with the consumer still busy.
    pub tail_timeouts: u32,
    /// Rounds that ended early at a truncated or corrupt part of the file.
    pub stopped_early: u32,
}

/// The link layer of a capture, as far as normalising to Ethernet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Ethernet,
    Sll,
    Sll2,
    RawIp,
    /// DLT_NULL: 4-byte address family in the writer's byte order.
    Null,
    /// DLT_LOOP: 4-byte address family in network byte order.
    Loop,
}

impl Link {
    fn from_code(code: u32) -> Option<Link> {
        Some(match code {
            1 => Link::Ethernet,
            113 => Link::Sll,
            276 => Link::Sll2,
            12 | 14 | 101 | 228 => Link::RawIp,
            0 => Link::Null,
            108 => Link::Loop,
            _ => return None,
        })
    }
}

fn link_name(code: u32) -> String {
    match DataLink::from(code) {
        DataLink::Unknown(_) => "unknown".to_string(),
        known => format!("{known:?}"),
    }
}

fn ethertype_by_version(ip: &[u8]) -> Option<u16> {
    match ip.first().map(|b| b >> 4) {
        Some(4) => Some(ETHERTYPE_IPV4),
        Some(6) => Some(ETHERTYPE_IPV6),
        _ => None,
    }
}

/// Turns one captured packet into an Ethernet II frame. `Ok(false)`: `data` already is one;
/// `Ok(true)`: the frame was written to `out`. `Err(())`: the link header is undecodable.
fn normalise(link: Link, data: &[u8], out: &mut Vec<u8>) -> Result<bool, ()> {
    let (src, ethertype, payload): ([u8; 6], u16, &[u8]) = match link {
        Link::Ethernet => return Ok(false),
        Link::RawIp => (SYNTHETIC_SRC, ethertype_by_version(data).ok_or(())?, data),
        Link::Null | Link::Loop => {
            let header: [u8; 4] = data.get(..4).ok_or(())?.try_into().map_err(|_| ())?;
            let payload = &data[4..];
            let family_is_inet = match link {
                Link::Loop => u32::from_be_bytes(header) == AF_INET,
                _ => u32::from_le_bytes(header) == AF_INET || u32::from_be_bytes(header) == AF_INET,
            };
            let ethertype = if family_is_inet {
                ETHERTYPE_IPV4
            } else {
                // Every IPv6 family number (10, 24, 28, 30) means IPv6; anything else is not IP.
                match ethertype_by_version(payload) {
                    Some(ETHERTYPE_IPV6) => ETHERTYPE_IPV6,
                    _ => return Err(()),
                }
            };
            (SYNTHETIC_SRC, ethertype, payload)
        }
        Link::Sll => {
            // packet type(2) ARPHRD(2) address length(2) address(8) protocol(2)
            let header = data.get(..16).ok_or(())?;
            let halen = u16::from_be_bytes([header[4], header[5]]);
            let mut src = SYNTHETIC_SRC;
            if halen == 6 {
                src.copy_from_slice(&header[6..12]);
            }
            (
                src,
                u16::from_be_bytes([header[14], header[15]]),
                &data[16..],
            )
        }
        Link::Sll2 => {
            // protocol(2) reserved(2) ifindex(4) ARPHRD(2) packet type(1) address length(1) address(8)
            let header = data.get(..20).ok_or(())?;
            let mut src = SYNTHETIC_SRC;
            if header[11] == 6 {
                src.copy_from_slice(&header[12..18]);
            }
            (src, u16::from_be_bytes([header[0], header[1]]), &data[20..])
        }
    };
    out.clear();
    out.extend_from_slice(&SYNTHETIC_DST);
    out.extend_from_slice(&src);
    out.extend_from_slice(&ethertype.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(true)
}

/// The release schedule of one round: pure arithmetic on capture timestamps, `now` passed in.
#[derive(Debug, Clone)]
struct Schedule {
    acceleration: f64,
    idle_gap_ns: Option<u64>,
    /// When the round's first matching packet was read, and the wall clock then.
    start: Option<(Instant, u64)>,
    /// The first matching packet's capture timestamp (ns).
    first_ts: u64,
    /// The latest capture timestamp seen so far (ns).
    latest_ts: u64,
    /// Capture time since the first matching packet, gaps longer than `-I` removed (ns).
    virtual_ns: u64,
    collapsed_ns: u64,
    /// Records with an implausible forward jump (see [`OfflineStats::damaged_timestamps`]).
    damaged: u64,
}

impl Schedule {
    fn new(acceleration: f64, idle_gap: Option<Duration>) -> Schedule {
        Schedule {
            acceleration,
            idle_gap_ns: idle_gap.map(|g| g.as_nanos().min(u128::from(u64::MAX)) as u64),
            start: None,
            first_ts: 0,
            latest_ts: 0,
            virtual_ns: 0,
            collapsed_ns: 0,
            damaged: 0,
        }
    }

    /// Forgets the round (a new one starts with its first matching packet).
    fn reset(&mut self) {
        self.start = None;
        self.first_ts = 0;
        self.latest_ts = 0;
        self.virtual_ns = 0;
    }

    /// Capture time from the round's first matching packet to its latest one.
    fn capture_span(&self) -> Duration {
        Duration::from_nanos(self.latest_ts.saturating_sub(self.first_ts))
    }

    /// How long the round's schedule lasts (the span without collapsed gaps, divided by `-a`).
    fn scheduled(&self) -> Duration {
        Duration::from_nanos((self.virtual_ns as f64 / self.acceleration).round() as u64)
    }

    /// The instant the next matching packet, captured at `ts_ns`, is due, and the same as Unix
    /// time in nanoseconds. `now`: when it was read.
    fn due(&mut self, ts_ns: u64, now: Instant) -> (Instant, u64) {
        let Some((start, start_unix)) = self.start else {
            let unix = unix_now_ns();
            self.start = Some((now, unix));
            self.first_ts = ts_ns;
            self.latest_ts = ts_ns;
            return (now, unix);
        };
        let gap = ts_ns.saturating_sub(self.latest_ts);
        if gap > MAX_PLAUSIBLE_GAP.as_nanos() as u64 {
            // One damaged record must not stall the rest of the file for years: it goes out
            // now and does not move the schedule.
            self.damaged += 1;
            let offset_ns = (self.virtual_ns as f64 / self.acceleration).round() as u64;
            let due = start
                .checked_add(Duration::from_nanos(offset_ns))
                .unwrap_or(start);
            return (due.max(now), start_unix.saturating_add(offset_ns));
        }
        self.latest_ts = self.latest_ts.max(ts_ns);
        if self.idle_gap_ns.is_some_and(|limit| gap > limit) {
            self.collapsed_ns += gap;
        } else {
            self.virtual_ns += gap;
        }
        // Float to integer casts saturate; integral nanoseconds keep exact schedules exact.
        let offset_ns = (self.virtual_ns as f64 / self.acceleration).round() as u64;
        let due = start
            .checked_add(Duration::from_nanos(offset_ns))
            .unwrap_or(start);
        (due, start_unix.saturating_add(offset_ns))
    }
}

/// The longest forward jump between packets that is taken as real idle time (one day): a
/// longer one is a damaged timestamp (see [`OfflineStats::damaged_timestamps`]); `-I` collapses
/// shorter gaps.
pub const MAX_PLAUSIBLE_GAP: Duration = Duration::from_secs(24 * 3600);

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Timestamp resolution of a pcapng interface (`if_tsresol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TsUnit {
    /// 10^-n seconds.
    Decimal(u8),
    /// 2^-n seconds.
    Binary(u8),
}

impl TsUnit {
    fn from_option(value: u8) -> TsUnit {
        if value & 0x80 == 0 {
            TsUnit::Decimal(value)
        } else {
            TsUnit::Binary(value & 0x7f)
        }
    }

    fn to_ns(self, raw: u64) -> u64 {
        let ns: u128 = match self {
            TsUnit::Decimal(n) if n <= 9 => u128::from(raw) * 10u128.pow(u32::from(9 - n)),
            TsUnit::Decimal(n) => u128::from(raw) / 10u128.pow(u32::from(n - 9).min(38)),
            TsUnit::Binary(n) => (u128::from(raw) * 1_000_000_000) >> n.min(127),
        };
        ns.min(u128::from(u64::MAX)) as u64
    }
}

/// A pcapng interface: how to read its packets.
#[derive(Debug, Clone, Copy)]
struct Interface {
    link: Result<Link, u32>,
    ts_unit: TsUnit,
    snaplen: u32,
}

enum Format {
    Pcap {
        big_endian: bool,
        nanos: bool,
        link: Link,
        snaplen: u32,
    },
    PcapNg {
        parser: Box<PcapNgParser>,
        interfaces: Vec<Interface>,
    },
}

impl std::fmt::Debug for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Format::Pcap { link, snaplen, .. } => f
                .debug_struct("Pcap")
                .field("link", link)
                .field("snaplen", snaplen)
                .finish(),
            Format::PcapNg { interfaces, .. } => f
                .debug_struct("PcapNg")
                .field("interfaces", interfaces)
                .finish(),
        }
    }
}

/// One packet record, its bytes at `data` in the reader's buffer.
#[derive(Debug, Clone)]
struct Record {
    /// Capture time (ns since the epoch); `None` for pcapng simple packets (no timestamp).
    ts_ns: Option<u64>,
    orig_len: u32,
    data: Range<usize>,
    link: Result<Link, u32>,
}

/// The outcome of parsing at the current position.
enum Parsed {
    Packet {
        consumed: usize,
        record: Record,
    },
    /// A block that carries no packet (it may declare an interface).
    Other {
        consumed: usize,
    },
    Incomplete,
    Corrupt(String),
}

/// Where and why reading stopped before the end of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stop {
    offset: u64,
    packet: u64,
    error: String,
}

enum Next {
    Packet(Record),
    End,
    Stopped(Stop),
}

/// A capture file read sequentially through one reusable buffer.
struct CaptureReader {
    path: PathBuf,
    file: File,
    size: u64,
    format: Format,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// File offset of `buf[0]`.
    base: u64,
    at_eof: bool,
    /// Packet records read so far (the number of the next one, minus one).
    records: u64,
}

impl std::fmt::Debug for CaptureReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureReader")
            .field("path", &self.path)
            .field("offset", &self.offset())
            .field("records", &self.records)
            .finish()
    }
}

impl CaptureReader {
    fn open(path: &Path) -> Result<CaptureReader, OfflineError> {
        let open_err = |error| OfflineError::Open {
            path: path.to_owned(),
            error,
        };
        let file = File::open(path).map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        let mut reader = CaptureReader {
            path: path.to_owned(),
            file,
            size,
            format: Format::Pcap {
                big_endian: false,
                nanos: false,
                link: Link::Ethernet,
                snaplen: 0,
            },
            buf: vec![0; READ_CHUNK],
            pos: 0,
            end: 0,
            base: 0,
            at_eof: false,
            records: 0,
        };
        while reader.end < 28 && !reader.at_eof {
            reader.fill().map_err(open_err)?;
        }
        let head_len = reader.end;
        let not_capture = |detail: String| OfflineError::NotCapture {
            path: path.to_owned(),
            detail,
        };
        let bad_header = |detail: String| OfflineError::BadHeader {
            path: path.to_owned(),
            detail,
        };
        let Some(&[m0, m1, m2, m3]) = reader.buf[..head_len].get(..4) else {
            return Err(not_capture(format!("only {head_len} bytes long")));
        };
        match [m0, m1, m2, m3] {
            [0xa1, 0xb2, 0xc3, 0xd4]
            | [0xd4, 0xc3, 0xb2, 0xa1]
            | [0xa1, 0xb2, 0x3c, 0x4d]
            | [0x4d, 0x3c, 0xb2, 0xa1] => {
                let head = &reader.buf[..head_len];
                let (rest, header) =
                    pcap_file::pcap::PcapHeader::from_slice(head).map_err(|e| {
                        bad_header(match e {
                            PcapError::IncompleteBuffer => {
                                format!("the 24-byte pcap header is cut at {} bytes", head.len())
                            }
                            other => other.to_string(),
                        })
                    })?;
                let code = u32::from(header.datalink);
                let link = Link::from_code(code).ok_or_else(|| OfflineError::UnsupportedLink {
                    path: path.to_owned(),
                    code,
                    name: link_name(code),
                })?;
                reader.pos = head.len() - rest.len();
                reader.format = Format::Pcap {
                    big_endian: header.endianness == Endianness::Big,
                    nanos: header.ts_resolution == pcap_file::TsResolution::NanoSecond,
                    link,
                    snaplen: header.snaplen,
                };
            }
            [0x0a, 0x0d, 0x0d, 0x0a] => {
                let (rest, parser) = loop {
                    match PcapNgParser::new(&reader.buf[..reader.end]) {
                        Ok((rest, parser)) => break (rest.len(), parser),
                        Err(PcapError::IncompleteBuffer) if !reader.at_eof => {
                            if reader.end == reader.buf.len() {
                                return Err(bad_header(
                                    "the section header block is implausibly long".into(),
                                ));
                            }
                            reader.fill().map_err(open_err)?;
                        }
                        Err(PcapError::IncompleteBuffer) => {
                            return Err(bad_header(format!(
                                "the section header block is cut at {} bytes",
                                reader.end
                            )))
                        }
                        Err(e) => return Err(bad_header(e.to_string())),
                    }
                };
                reader.pos = reader.end - rest;
                reader.format = Format::PcapNg {
                    parser: Box::new(parser),
                    interfaces: Vec::new(),
                };
                reader.check_pcapng_links()?;
            }
            other => {
                return Err(not_capture(format!(
                    "it starts with {:02x} {:02x} {:02x} {:02x}",
                    other[0], other[1], other[2], other[3]
                )))
            }
        }
        Ok(reader)
    }

    /// Reads the pcapng blocks before the first packet (interface declarations) and refuses
    /// the file when no declared interface has a supported link type.
    fn check_pcapng_links(&mut self) -> Result<(), OfflineError> {
        loop {
            match self.parse() {
                Parsed::Other { consumed } => self.pos += consumed,
                Parsed::Incomplete if !self.at_eof && self.end - self.pos < MAX_RECORD => {
                    self.fill().map_err(|error| OfflineError::Open {
                        path: self.path.clone(),
                        error,
                    })?;
                }
                // A packet, the end, or damage: the packet loop deals with it.
                _ => break,
            }
        }
        let Format::PcapNg { interfaces, .. } = &self.format else {
            return Ok(());
        };
        let unsupported: Vec<u32> = interfaces.iter().filter_map(|i| i.link.err()).collect();
        if !interfaces.is_empty() && interfaces.iter().all(|i| i.link.is_err()) {
            let code = unsupported[0];
            return Err(OfflineError::UnsupportedLink {
                path: self.path.clone(),
                code,
                name: link_name(code),
            });
        }
        for code in unsupported {
            tracing::warn!(
                "{}: an interface has the unsupported link type {code} ({}); its packets are skipped",
                self.path.display(),
                link_name(code)
            );
        }
        Ok(())
    }

    /// File offset of the next unread byte.
    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Moves the unread bytes to the front and reads more (growing the buffer for a long
    /// record). Sets `at_eof` when the file has no more.
    fn fill(&mut self) -> io::Result<()> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.base += self.pos as u64;
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.end == self.buf.len() {
            let grown = (self.buf.len() * 2).min(MAX_RECORD + READ_CHUNK);
            self.buf.resize(grown, 0);
        }
        loop {
            match self.file.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.at_eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Parses what starts at `pos` (records nothing, advances nothing).
    fn parse(&mut self) -> Parsed {
        let avail = &self.buf[self.pos..self.end];
        match &mut self.format {
            Format::Pcap {
                big_endian,
                nanos,
                link,
                snaplen,
            } => parse_pcap(avail, *big_endian, *nanos, *link, *snaplen, self.pos),
            Format::PcapNg { parser, interfaces } => {
                parse_pcapng(avail, parser, interfaces, self.pos)
            }
        }
    }

    /// The next packet record, the end of the file, or where reading stopped.
    fn next(&mut self) -> Next {
        loop {
            let parsed = self.parse();
            let stop = |reader: &CaptureReader, error: String| {
                Next::Stopped(Stop {
                    offset: reader.offset(),
                    packet: reader.records + 1,
                    error,
                })
            };
            match parsed {
                Parsed::Packet { consumed, record } => {
                    self.pos += consumed;
                    self.records += 1;
                    return Next::Packet(record);
                }
                Parsed::Other { consumed } => self.pos += consumed,
                Parsed::Incomplete => {
                    let unread = self.end - self.pos;
                    if self.at_eof {
                        if unread == 0 {
                            return Next::End;
                        }
                        return stop(
                            self,
                            format!(
                                "the file ends {unread} bytes into a record (truncated capture)"
                            ),
                        );
                    }
                    if unread > MAX_RECORD {
                        return stop(self, format!("a record longer than {MAX_RECORD} bytes"));
                    }
                    if let Err(e) = self.fill() {
                        return stop(self, format!("read error: {e}"));
                    }
                }
                Parsed::Corrupt(error) => return stop(self, error),
            }
        }
    }

    fn data(&self, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    fn format_name(&self) -> &'static str {
        match self.format {
            Format::Pcap { .. } => "pcap",
            Format::PcapNg { .. } => "pcapng",
        }
    }
}

/// Byte range of `inner` inside `outer` (a sub-slice), shifted by `base`.
fn range_in(outer: &[u8], inner: &[u8], base: usize) -> Range<usize> {
    let start = (inner.as_ptr() as usize).saturating_sub(outer.as_ptr() as usize);
    base + start..base + start + inner.len()
}

fn parse_pcap(
    avail: &[u8],
    big_endian: bool,
    nanos: bool,
    link: Link,
    snaplen: u32,
    base: usize,
) -> Parsed {
    let Some(header) = avail.get(..16) else {
        return Parsed::Incomplete;
    };
    let field = |i: usize| {
        let bytes = [header[i], header[i + 1], header[i + 2], header[i + 3]];
        if big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        }
    };
    let (ts_sec, ts_frac, incl_len, orig_len) = (field(0), field(4), field(8), field(12));
    // libpcap's rule: a record longer than the snap length (or 256 KiB) is damage.
    if incl_len > snaplen.max(MAX_SNAPLEN) {
        return Parsed::Corrupt(format!(
            "record length {incl_len} exceeds the snap length {snaplen} (corrupt record header)"
        ));
    }
    let Some(data) = avail.get(16..16 + incl_len as usize) else {
        return Parsed::Incomplete;
    };
    let frac_ns = if nanos {
        u64::from(ts_frac)
    } else {
        u64::from(ts_frac) * 1000
    };
    Parsed::Packet {
        consumed: 16 + incl_len as usize,
        record: Record {
            ts_ns: Some((u64::from(ts_sec) * 1_000_000_000).saturating_add(frac_ns)),
            orig_len,
            data: range_in(avail, data, base),
            link: Ok(link),
        },
    }
}

/// Reads a block's length field, to refuse absurd lengths before buffering them.
fn pcapng_block_len(avail: &[u8], section_big_endian: bool) -> Option<u32> {
    let head = avail.get(..12)?;
    let big = if head[..4] == [0x0a, 0x0d, 0x0d, 0x0a] {
        // A section header: its byte-order magic decides.
        head[8..12] == [0x1a, 0x2b, 0x3c, 0x4d]
    } else {
        section_big_endian
    };
    let bytes = [head[4], head[5], head[6], head[7]];
    Some(if big {
        u32::from_be_bytes(bytes)
    } else {
        u32::from_le_bytes(bytes)
    })
}

fn parse_pcapng(
    avail: &[u8],
    parser: &mut PcapNgParser,
    interfaces: &mut Vec<Interface>,
    base: usize,
) -> Parsed {
    let big = parser.section().endianness == Endianness::Big;
    if let Some(len) = pcapng_block_len(avail, big) {
        if len as usize > MAX_RECORD {
            return Parsed::Corrupt(format!(
                "block length {len} is implausible (corrupt block header)"
            ));
        }
    }
    let (rest, block) = match parser.next_block(avail) {
        Ok(parsed) => parsed,
        Err(PcapError::IncompleteBuffer) => return Parsed::Incomplete,
        Err(e) => return Parsed::Corrupt(format!("bad pcapng block: {e}")),
    };
    let consumed = avail.len() - rest.len();
    let interface = |id: u32| {
        interfaces.get(id as usize).copied().unwrap_or(Interface {
            link: Err(u32::MAX),
            ts_unit: TsUnit::Decimal(6),
            snaplen: 0,
        })
    };
    let record = match block {
        Block::SectionHeader(_) => {
            interfaces.clear();
            return Parsed::Other { consumed };
        }
        Block::InterfaceDescription(idb) => {
            let code = u32::from(idb.linktype);
            let ts_unit = idb
                .options
                .iter()
                .find_map(|o| match o {
                    InterfaceDescriptionOption::IfTsResol(v) => Some(TsUnit::from_option(*v)),
                    _ => None,
                })
                .unwrap_or(TsUnit::Decimal(6));
            interfaces.push(Interface {
                link: Link::from_code(code).ok_or(code),
                ts_unit,
                snaplen: idb.snaplen,
            });
            return Parsed::Other { consumed };
        }
        Block::EnhancedPacket(epb) => {
            let iface = interface(epb.interface_id);
            // pcap-file 2 stores the raw timestamp units as nanoseconds; rescale by if_tsresol.
            let raw = epb.timestamp.as_nanos().min(u128::from(u64::MAX)) as u64;
            Record {
                ts_ns: Some(iface.ts_unit.to_ns(raw)),
                orig_len: epb.original_len,
                data: range_in(avail, &epb.data, base),
                link: iface.link,
            }
        }
        Block::Packet(pb) => {
            let iface = interface(u32::from(pb.interface_id));
            Record {
                ts_ns: Some(iface.ts_unit.to_ns(pb.timestamp)),
                orig_len: pb.original_len,
                data: range_in(avail, &pb.data, base),
                link: iface.link,
            }
        }
        Block::SimplePacket(spb) => {
            let iface = interface(0);
            // The block holds min(original length, snap length) bytes plus padding.
            let mut len = spb.data.len().min(spb.original_len as usize);
            if iface.snaplen > 0 {
                len = len.min(iface.snaplen as usize);
            }
            Record {
                ts_ns: None,
                orig_len: spb.original_len,
                data: range_in(avail, &spb.data[..len], base),
                link: iface.link,
            }
        }
        _ => return Parsed::Other { consumed },
    };
    Parsed::Packet { consumed, record }
}

/// The ports of an offline tcpcopy: the file replay and a raw IP socket (pinned to
/// `output_interface` when given).
///
/// # Errors
/// The file or filter (named), the raw sockets, or the dispatcher thread (several workers:
/// see [`super::dispatch`]).
pub fn open_ports(
    config: &OfflineConfig,
    output_interface: Option<&str>,
    workers: usize,
) -> anyhow::Result<crate::ports::OpenedPorts> {
    use anyhow::Context as _;
    use engine::port::rawsock::{RawIpConfig, RawIpTx};
    let capture = OfflineRx::open(config)?;
    tracing::info!(
        "offline: replaying {} ({:.1} MB, {}) at -a {} with -I {} ms, {} round(s), tail {} s",
        config.path.display(),
        capture.reader.size as f64 / 1e6,
        capture.reader.format_name(),
        config.acceleration,
        config.idle_gap.map_or(0, |g| g.as_millis()),
        config.rounds,
        config.tail.as_secs_f64(),
    );
    let mut tx: Vec<Box<dyn engine::port::TxPort>> = Vec::with_capacity(workers.max(1));
    for _ in 0..workers.max(1) {
        let transmit = RawIpTx::open(&RawIpConfig {
            bind_device: output_interface.map(str::to_owned),
            ..RawIpConfig::default()
        })
        .context("cannot open the raw IP socket that sends to the target")?;
        tx.push(Box::new(transmit));
    }
    if workers <= 1 {
        return Ok(crate::ports::OpenedPorts {
            rx: vec![Box::new(capture)],
            tx,
            keep: None,
            register_thread: None,
        });
    }
    // One ordered stream for several workers: a dispatcher hands each frame to the worker
    // that owns its session (by client port, as replies are handed out).
    let (rx, dispatcher) = super::dispatch::split(Box::new(capture), workers)
        .context("cannot start the capture file's dispatcher thread")?;
    Ok(crate::ports::OpenedPorts {
        rx,
        tx,
        keep: Some(Box::new(dispatcher)),
        register_thread: None,
    })
}

/// A one-shot monotonic timer whose fd becomes readable when it expires.
#[derive(Debug)]
struct Timer {
    fd: OwnedFd,
}

impl Timer {
    fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create takes no pointers; the result is checked below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Timer { fd })
    }

    /// Expires once, `after` from now (at least 1 ns; zero would disarm).
    fn arm(&self, after: Duration) {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: a valid timerfd and a valid itimerspec; the old value is not asked for.
        let _ =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }

    /// Consumes an expiry so the fd stops being readable.
    fn drain(&self) {
        let mut ticks = [0u8; 8];
        // SAFETY: reads at most 8 bytes into an 8-byte buffer from a non-blocking timerfd.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                ticks.as_mut_ptr().cast::<libc::c_void>(),
                ticks.len(),
            )
        };
    }
}

/// The next matching packet, read but not yet due.
#[derive(Debug, Clone)]
struct Pending {
    due: Instant,
    unix_ns: u64,
    /// The frame is in `scratch` (normalised), else at `range` in the reader's buffer.
    in_scratch: bool,
    range: Range<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading and releasing packets.
    Reading,
    /// The file is read; waiting for the consumer to become idle or the tail to pass.
    Draining { since: Instant },
    /// Every round is done.
    Finished,
}

/// The progress line's state.
#[derive(Debug)]
struct Progress {
    enabled: bool,
    shown: bool,
    last: Option<(Instant, u64)>,
}

/// An [`RxPort`] replaying a capture file (see the module documentation).
pub struct OfflineRx {
    config: OfflineConfig,
    filter: SoftFilter,
    clock: Clock,
    reader: CaptureReader,
    schedule: Schedule,
    pending: Option<Pending>,
    scratch: Vec<u8>,
    phase: Phase,
    /// The round being played, from 1.
    round: u32,
    round_started: Instant,
    round_packets: u64,
    replay_started: Instant,
    /// The consumer said it is idle since the end of the file was reached.
    consumer_idle: bool,
    /// `rx_burst` was called at least once.
    polled: bool,
    /// Timestamp of the last packet record (for pcapng simple packets, which have none).
    last_ts: u64,
    stats: OfflineStats,
    port: PortStats,
    timer: Timer,
    armed_for: Option<Instant>,
    progress: Progress,
}

impl std::fmt::Debug for OfflineRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfflineRx")
            .field("path", &self.config.path)
            .field("round", &self.round)
            .field("phase", &self.phase)
            .field("stats", &self.stats)
            .finish()
    }
}

impl OfflineRx {
    /// Opens `config.path` and compiles `config.filter`; releases on the real clock.
    ///
    /// # Errors
    /// [`OfflineError`]: the file cannot be read, is not a capture, has an unsupported link
    /// type; the filter does not compile; a setting is out of range.
    pub fn open(config: &OfflineConfig) -> Result<OfflineRx, OfflineError> {
        OfflineRx::open_with_clock(config, Box::new(Instant::now))
    }

    /// [`OfflineRx::open`] with another clock (tests: a virtual one).
    ///
    /// # Errors
    /// As [`OfflineRx::open`].
    pub fn open_with_clock(
        config: &OfflineConfig,
        clock: Clock,
    ) -> Result<OfflineRx, OfflineError> {
        config.validate()?;
        let filter = SoftFilter::compile(&config.filter)?;
        let reader = CaptureReader::open(&config.path)?;
        let timer = Timer::new().map_err(OfflineError::Timer)?;
        let now = clock();
        Ok(OfflineRx {
            config: config.clone(),
            filter,
            clock,
            reader,
            schedule: Schedule::new(config.acceleration, config.idle_gap),
            pending: None,
            scratch: Vec::with_capacity(2048),
            phase: Phase::Reading,
            round: 1,
            round_started: now,
            round_packets: 0,
            replay_started: now,
            consumer_idle: false,
            polled: false,
            last_ts: 0,
            stats: OfflineStats::default(),
            port: PortStats::default(),
            timer,
            armed_for: None,
            progress: Progress {
                enabled: config.progress,
                shown: false,
                last: None,
            },
        })
    }

    /// When the next packet is due (`None`: none read yet, or the file is done).
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.as_ref().map(|p| p.due)
    }

    /// The counters so far.
    pub fn offline_stats(&self) -> OfflineStats {
        let mut stats = self.stats;
        stats.collapsed_ns = self.schedule.collapsed_ns;
        stats.damaged_timestamps = self.schedule.damaged;
        stats
    }

    /// The one-line summary logged when the replay is complete.
    pub fn summary(&self) -> String {
        let s = self.offline_stats();
        let elapsed = (self.clock)().saturating_duration_since(self.replay_started);
        let mut line = format!(
            "offline replay complete: rounds={} packets={} read={} not-matching={} cut-short={} \
             undecodable={} unsupported-link={} skipped-idle={:.3}s damaged-timestamps={} \
             tail-timeouts={} stopped-early={} elapsed={:.3}s",
            s.rounds,
            s.packets,
            s.read,
            s.not_matching,
            s.cut_short,
            s.undecodable,
            s.unsupported_link,
            s.collapsed_ns as f64 / 1e9,
            s.damaged_timestamps,
            s.tail_timeouts,
            s.stopped_early,
            elapsed.as_secs_f64(),
        );
        if elapsed > Duration::ZERO {
            let _ = write!(
                line,
                " rate={:.0}pkt/s",
                s.packets as f64 / elapsed.as_secs_f64()
            );
        }
        line
    }

    /// Reads records until a matching one is pending, or the round's file is done.
    fn read_next(&mut self, now: Instant) {
        while self.pending.is_none() && self.phase == Phase::Reading {
            let record = match self.reader.next() {
                Next::Packet(record) => record,
                Next::End => {
                    self.end_of_file(now);
                    return;
                }
                Next::Stopped(stop) => {
                    self.stats.stopped_early += 1;
                    if self.stats.stopped_early == 1 {
                        self.clear_progress();
                        tracing::warn!(
                            "offline: {}: stopped reading at byte offset {} (packet {}): {}; \
                             replaying the {} packet records before it",
                            self.config.path.display(),
                            stop.offset,
                            stop.packet,
                            stop.error,
                            stop.packet - 1
                        );
                    }
                    self.end_of_file(now);
                    return;
                }
            };
            self.stats.read += 1;
            let ts = record.ts_ns.unwrap_or(self.last_ts);
            self.last_ts = ts;
            let data = self.reader.data(record.data.clone());
            if (data.len() as u64) < u64::from(record.orig_len) {
                self.stats.cut_short += 1;
                continue;
            }
            let Ok(link) = record.link else {
                self.stats.unsupported_link += 1;
                continue;
            };
            let Ok(in_scratch) = normalise(link, data, &mut self.scratch) else {
                self.stats.undecodable += 1;
                continue;
            };
            let frame = if in_scratch { &self.scratch[..] } else { data };
            if !self.filter.matches(frame) {
                self.stats.not_matching += 1;
                continue;
            }
            let (due, unix_ns) = self.schedule.due(ts, now);
            self.pending = Some(Pending {
                due,
                unix_ns,
                in_scratch,
                range: record.data,
            });
        }
    }

    fn end_of_file(&mut self, now: Instant) {
        self.phase = Phase::Draining { since: now };
        self.consumer_idle = false;
    }

    /// Ends the round when the consumer is idle or the tail has passed; starts the next one.
    fn maybe_end_round(&mut self, now: Instant) {
        let Phase::Draining { since } = self.phase else {
            return;
        };
        let tail_passed = now.saturating_duration_since(since) >= self.config.tail;
        if !self.consumer_idle && !tail_passed {
            return;
        }
        self.stats.rounds += 1;
        if !self.consumer_idle {
            self.stats.tail_timeouts += 1;
        }
        self.clear_progress();
        tracing::info!(
            "offline round {}/{} done: {} packets in {:.3} s (capture span {:.3} s, scheduled \
             {:.3} s){}",
            self.round,
            self.config.rounds,
            self.round_packets,
            // From the first matching packet (the round's start when there was none).
            since
                .saturating_duration_since(self.schedule.start.map_or(self.round_started, |s| s.0))
                .as_secs_f64(),
            self.schedule.capture_span().as_secs_f64(),
            self.schedule.scheduled().as_secs_f64(),
            if self.consumer_idle {
                String::new()
            } else {
                format!(
                    "; sessions still active {} s after the end of the file (--offline-tail-s)",
                    self.config.tail.as_secs_f64()
                )
            }
        );
        if self.round >= self.config.rounds {
            self.phase = Phase::Finished;
            tracing::info!("{}", self.summary());
            return;
        }
        match CaptureReader::open(&self.config.path) {
            Ok(reader) => {
                self.reader = reader;
                self.schedule.reset();
                self.round += 1;
                self.round_started = now;
                self.round_packets = 0;
                self.phase = Phase::Reading;
            }
            Err(e) => {
                tracing::error!("offline: cannot reopen for round {}: {e}", self.round + 1);
                self.phase = Phase::Finished;
                tracing::info!("{}", self.summary());
            }
        }
    }

    fn clear_progress(&mut self) {
        if self.progress.shown {
            self.progress.shown = false;
            let _ = io::stderr().write_all(b"\n");
        }
    }

    fn draw_progress(&mut self, now: Instant) {
        if !self.progress.enabled {
            return;
        }
        let (last_at, last_packets) = *self.progress.last.get_or_insert((now, self.stats.packets));
        let interval = now.saturating_duration_since(last_at);
        if interval < PROGRESS_EVERY {
            return;
        }
        let rate = (self.stats.packets - last_packets) as f64 / interval.as_secs_f64();
        self.progress.last = Some((now, self.stats.packets));
        let percent = if self.reader.size > 0 {
            100.0 * self.reader.offset() as f64 / self.reader.size as f64
        } else {
            100.0
        };
        let state = match self.phase {
            Phase::Draining { since } => format!(
                "end of file, sessions open for {:.0} s",
                now.saturating_duration_since(since).as_secs_f64()
            ),
            _ => format!("{rate:.0} pkt/s"),
        };
        let line = format!(
            "\roffline round {}/{}: {percent:5.1}% of {:.1} MB, {} packets, {state}   ",
            self.round,
            self.config.rounds,
            self.reader.size as f64 / 1e6,
            self.stats.packets,
        );
        let _ = io::stderr().write_all(line.as_bytes());
        self.progress.shown = true;
    }
}

impl RxPort for OfflineRx {
    fn rx_burst(&mut self, max: usize, sink: &mut dyn FnMut(Frame<'_>)) -> io::Result<usize> {
        let now = (self.clock)();
        if !self.polled {
            // The replay starts with the consumer's first poll, not at open.
            self.polled = true;
            self.replay_started = now;
            self.round_started = now;
        }
        if self.armed_for.is_some_and(|at| at <= now) {
            self.timer.drain();
            self.armed_for = None;
        }
        self.maybe_end_round(now);
        let mut handed = 0;
        while handed < max {
            self.read_next(now);
            let Some(pending) = &self.pending else {
                break;
            };
            if pending.due > now {
                if self.armed_for != Some(pending.due) {
                    self.timer.arm(pending.due.saturating_duration_since(now));
                    self.armed_for = Some(pending.due);
                }
                break;
            }
            let data = if pending.in_scratch {
                &self.scratch[..]
            } else {
                self.reader.data(pending.range.clone())
            };
            sink(Frame {
                data,
                wire_len: data.len(),
                timestamp_ns: pending.unix_ns,
            });
            self.port.rx_packets += 1;
            self.port.rx_bytes += data.len() as u64;
            self.stats.packets += 1;
            self.stats.bytes += data.len() as u64;
            self.round_packets += 1;
            self.pending = None;
            handed += 1;
        }
        if self.phase == Phase::Finished {
            self.clear_progress();
        } else {
            self.draw_progress(now);
        }
        Ok(handed)
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.timer.fd.as_raw_fd())
    }

    fn stats(&self) -> PortStats {
        self.port
    }

    fn consumer_idle(&mut self, idle: bool) {
        if matches!(self.phase, Phase::Draining { .. }) {
            self.consumer_idle = idle;
        }
    }

    fn finished(&self) -> bool {
        self.phase == Phase::Finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter, RawPcapPacket};
    use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
    use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionBlock;
    use pcap_file::pcapng::blocks::simple_packet::SimplePacketBlock;
    use pcap_file::pcapng::PcapNgWriter;
    use pcap_file::TsResolution;
    use std::borrow::Cow;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    const FILTER: &str = "tcp and ((dst port 80))";

    /// An IPv4/TCP packet from 10.77.0.10:`sport` to 10.77.0.20:`dport` with `payload` bytes.
    fn ip_packet(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
        let total = 20 + 20 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 77, 0, 10]);
        p[16..20].copy_from_slice(&[10, 77, 0, 20]);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[32] = 0x50;
        p[33] = 0x18;
        p
    }

    fn ethernet(ip: &[u8]) -> Vec<u8> {
        let mut f = vec![
            0x02, 0x77, 0, 0, 0, 0x14, 0x02, 0x77, 0, 0, 0, 0x0a, 0x08, 0x00,
        ];
        f.extend_from_slice(ip);
        f
    }

    /// A virtual clock: the returned function reads it; `advance` moves it.
    #[derive(Clone)]
    struct VirtualClock {
        base: Instant,
        offset_ns: Arc<AtomicU64>,
    }

    impl VirtualClock {
        fn new() -> VirtualClock {
            VirtualClock {
                base: Instant::now(),
                offset_ns: Arc::new(AtomicU64::new(0)),
            }
        }
        fn clock(&self) -> Clock {
            let (base, offset) = (self.base, self.offset_ns.clone());
            Box::new(move || base + Duration::from_nanos(offset.load(Ordering::SeqCst)))
        }
        fn advance(&self, by: Duration) {
            self.offset_ns
                .fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
        }
        fn elapsed(&self) -> Duration {
            Duration::from_nanos(self.offset_ns.load(Ordering::SeqCst))
        }
    }

    /// A directory of its own for one test, removed when dropped.
    struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir() -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tcpcopy-offline-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes a pcap file: (timestamp, captured bytes, original length) per packet.
    fn write_pcap(
        path: &Path,
        link: DataLink,
        endianness: Endianness,
        packets: &[(Duration, Vec<u8>, u32)],
    ) {
        let header = PcapHeader {
            datalink: link,
            endianness,
            ts_resolution: TsResolution::MicroSecond,
            ..PcapHeader::default()
        };
        let mut w = PcapWriter::with_header(File::create(path).unwrap(), header).unwrap();
        for (ts, data, orig) in packets {
            w.write_packet(&PcapPacket::new(*ts, *orig, data)).unwrap();
        }
    }

    fn pcap_of(dir: &Path, name: &str, frames: &[(Duration, Vec<u8>)]) -> PathBuf {
        let path = dir.join(name);
        let packets: Vec<_> = frames
            .iter()
            .map(|(t, f)| (*t, f.clone(), f.len() as u32))
            .collect();
        write_pcap(&path, DataLink::ETHERNET, Endianness::Little, &packets);
        path
    }

    fn config(path: &Path) -> OfflineConfig {
        OfflineConfig {
            progress: false,
            ..OfflineConfig::new(path, FILTER)
        }
    }

    /// Drains every frame the port hands out without moving the clock.
    fn drain(port: &mut OfflineRx) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while port
            .rx_burst(64, &mut |f| out.push(f.data.to_vec()))
            .unwrap()
            > 0
        {}
        out
    }

    /// Runs a whole replay on the virtual clock, stepping to each due instant; returns each
    /// frame with the virtual time it was released at. The consumer is idle at once.
    fn replay(port: &mut OfflineRx, clock: &VirtualClock) -> Vec<(Duration, Vec<u8>)> {
        let mut out = Vec::new();
        for _ in 0..100_000 {
            if port.finished() {
                return out;
            }
            let at = clock.elapsed();
            port.rx_burst(64, &mut |f| out.push((at, f.data.to_vec())))
                .unwrap();
            port.consumer_idle(true);
            match port.next_due() {
                Some(due) => {
                    let now = clock.base + clock.elapsed();
                    clock.advance(due.saturating_duration_since(now));
                }
                None => clock.advance(Duration::from_millis(1)),
            }
        }
        panic!("the replay did not finish");
    }

    #[test]
    fn ethernet_pcap_is_replayed_as_is_and_filtered() {
        let dir = temp_dir();
        let request = ethernet(&ip_packet(40000, 80, 10));
        let reply = ethernet(&ip_packet(80, 40000, 10));
        let path = pcap_of(
            &dir,
            "eth.pcap",
            &[
                (Duration::from_secs(1), request.clone()),
                (Duration::from_secs(1), reply),
                (Duration::from_secs(1), request.clone()),
            ],
        );
        let mut port = OfflineRx::open(&config(&path)).unwrap();
        let frames = drain(&mut port);
        assert_eq!(frames, vec![request.clone(), request]);
        let s = port.offline_stats();
        assert_eq!((s.read, s.packets, s.not_matching), (3, 2, 1));
        assert_eq!(port.stats().rx_packets, 2);
    }

    #[test]
    fn every_link_type_becomes_ethernet() {
        let dir = temp_dir();
        let ip = ip_packet(40000, 80, 5);
        let mut sll = vec![
            0, 0, 0, 1, 0, 6, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0, 0, 0x08, 0x00,
        ];
        sll.extend_from_slice(&ip);
        let mut sll2 = vec![0x08, 0x00, 0, 0, 0, 0, 0, 2, 0, 1, 0, 6];
        sll2.extend_from_slice(&[0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0, 0]);
        sll2.extend_from_slice(&ip);
        let mut null_le = 2u32.to_le_bytes().to_vec();
        null_le.extend_from_slice(&ip);
        let mut null_be = 2u32.to_be_bytes().to_vec();
        null_be.extend_from_slice(&ip);
        let mut loop_ = 2u32.to_be_bytes().to_vec();
        loop_.extend_from_slice(&ip);
        let cases: Vec<(u32, Vec<u8>, [u8; 6])> = vec![
            (113, sll, [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]),
            (276, sll2, [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]),
            (12, ip.clone(), SYNTHETIC_SRC),
            (14, ip.clone(), SYNTHETIC_SRC),
            (101, ip.clone(), SYNTHETIC_SRC),
            (228, ip.clone(), SYNTHETIC_SRC),
            (0, null_le, SYNTHETIC_SRC),
            (0, null_be, SYNTHETIC_SRC),
            (108, loop_, SYNTHETIC_SRC),
        ];
        for (code, data, src) in cases {
            for endianness in [Endianness::Little, Endianness::Big] {
                let path = dir.join(format!("link{code}.pcap"));
                write_pcap(
                    &path,
                    DataLink::from(code),
                    endianness,
                    &[(Duration::ZERO, data.clone(), data.len() as u32)],
                );
                let mut port = OfflineRx::open(&config(&path)).unwrap();
                let frames = drain(&mut port);
                assert_eq!(frames.len(), 1, "link type {code}");
                let f = &frames[0];
                assert_eq!(&f[..6], &SYNTHETIC_DST, "link type {code}");
                assert_eq!(&f[6..12], &src, "link type {code}");
                assert_eq!(&f[12..14], &[0x08, 0x00], "link type {code}");
                assert_eq!(&f[14..], &ip[..], "link type {code}");
            }
        }
    }

    #[test]
    fn undecodable_link_headers_are_counted() {
        let dir = temp_dir();
        let path = dir.join("null.pcap");
        let mut other_family = 99u32.to_le_bytes().to_vec();
        other_family.extend_from_slice(&ip_packet(1, 80, 0));
        write_pcap(
            &path,
            DataLink::NULL,
            Endianness::Little,
            &[
                (Duration::ZERO, vec![2, 0], 2),
                (
                    Duration::ZERO,
                    other_family.clone(),
                    other_family.len() as u32,
                ),
            ],
        );
        let mut port = OfflineRx::open(&config(&path)).unwrap();
        assert!(drain(&mut port).is_empty());
        assert_eq!(port.offline_stats().undecodable, 2);
    }

    #[test]
    fn unsupported_link_type_is_refused_at_open_by_name() {
        let dir = temp_dir();
        let path = dir.join("radiotap.pcap");
        write_pcap(
            &path,
            DataLink::IEEE802_11_RADIOTAP,
            Endianness::Little,
            &[],
        );
        let e = OfflineRx::open(&config(&path)).unwrap_err().to_string();
        assert!(
            e.contains("unsupported link type 127") && e.contains("RADIOTAP"),
            "{e}"
        );
        let ng = dir.join("radiotap.pcapng");
        let mut w = PcapNgWriter::new(File::create(&ng).unwrap()).unwrap();
        w.write_pcapng_block(InterfaceDescriptionBlock::new(DataLink::Unknown(999), 0))
            .unwrap();
        drop(w);
        let e = OfflineRx::open(&config(&ng)).unwrap_err().to_string();
        assert!(e.contains("unsupported link type 999"), "{e}");
    }

    #[test]
    fn cut_short_packets_are_counted_and_dropped() {
        let dir = temp_dir();
        let full = ethernet(&ip_packet(40000, 80, 100));
        let path = dir.join("cut.pcap");
        write_pcap(
            &path,
            DataLink::ETHERNET,
            Endianness::Little,
            &[
                (Duration::ZERO, full[..60].to_vec(), full.len() as u32),
                (Duration::ZERO, full.clone(), full.len() as u32),
            ],
        );
        let mut port = OfflineRx::open(&config(&path)).unwrap();
        assert_eq!(drain(&mut port), vec![full.clone()]);
        assert_eq!(port.offline_stats().cut_short, 1);
        // A snap length below the packet length (orig_len > snaplen) is no damage either.
        let small = dir.join("snap96.pcap");
        let header = PcapHeader {
            snaplen: 96,
            ..PcapHeader::default()
        };
        let mut w = PcapWriter::with_header(File::create(&small).unwrap(), header).unwrap();
        w.write_raw_packet(&RawPcapPacket {
            ts_sec: 0,
            ts_frac: 0,
            incl_len: 96,
            orig_len: 1500,
            data: Cow::Borrowed(&[0u8; 96]),
        })
        .unwrap();
        drop(w);
        let mut port = OfflineRx::open(&config(&small)).unwrap();
        assert!(drain(&mut port).is_empty());
        assert_eq!(port.offline_stats().cut_short, 1);
        assert_eq!(port.offline_stats().stopped_early, 0);
    }

    #[test]
    fn pcapng_with_resolutions_and_simple_packets() {
        let dir = temp_dir();
        let path = dir.join("mixed.pcapng");
        let frame = ethernet(&ip_packet(40000, 80, 3));
        let mut w = PcapNgWriter::new(File::create(&path).unwrap()).unwrap();
        // Interface 0: default resolution (µs); interface 1: ns; interface 2: unsupported.
        w.write_pcapng_block(InterfaceDescriptionBlock::new(DataLink::ETHERNET, 0))
            .unwrap();
        let mut ns = InterfaceDescriptionBlock::new(DataLink::RAW, 0);
        ns.options.push(InterfaceDescriptionOption::IfTsResol(9));
        w.write_pcapng_block(ns).unwrap();
        w.write_pcapng_block(InterfaceDescriptionBlock::new(DataLink::Unknown(147), 0))
            .unwrap();
        let epb = |iface: u32, raw_units: u64, data: &[u8]| EnhancedPacketBlock {
            interface_id: iface,
            // pcap-file writes the Duration's nanoseconds as the raw units.
            timestamp: Duration::from_nanos(raw_units),
            original_len: data.len() as u32,
            data: Cow::Owned(data.to_vec()),
            options: vec![],
        };
        let ip = ip_packet(40000, 80, 3);
        w.write_pcapng_block(epb(0, 1_000_000, &frame)).unwrap(); // 1 s in µs
        w.write_pcapng_block(epb(1, 1_500_000_000, &ip)).unwrap(); // 1.5 s in ns
        w.write_pcapng_block(epb(2, 1_600_000, &frame)).unwrap(); // unsupported
        w.write_pcapng_block(SimplePacketBlock {
            original_len: frame.len() as u32,
            data: Cow::Owned(frame.clone()),
        })
        .unwrap();
        w.write_pcapng_block(epb(0, 3_000_000, &frame)).unwrap(); // 3 s
        drop(w);
        let clock = VirtualClock::new();
        let mut port = OfflineRx::open_with_clock(&config(&path), clock.clock()).unwrap();
        let released = replay(&mut port, &clock);
        let times: Vec<u64> = released.iter().map(|(t, _)| t.as_millis() as u64).collect();
        // 1 s, 1.5 s, the simple packet at the previous record's timestamp (1.6 s), 3 s.
        assert_eq!(times, vec![0, 500, 600, 2000]);
        assert!(released.iter().all(|(_, f)| f[14..] == ip[..]));
        assert_eq!(port.offline_stats().unsupported_link, 1);
    }

    #[test]
    fn schedule_follows_the_capture_with_acceleration_and_idle_gaps() {
        let dir = temp_dir();
        let frame = ethernet(&ip_packet(40000, 80, 1));
        let other = ethernet(&ip_packet(80, 40000, 1));
        let ms = Duration::from_millis;
        let path = pcap_of(
            &dir,
            "timing.pcap",
            &[
                (ms(10_000), frame.clone()),
                (ms(10_100), frame.clone()),
                (ms(10_150), other.clone()), // not matching: no pause, no timing
                (ms(15_100), frame.clone()), // a 5 s gap
                (ms(15_050), frame.clone()), // backwards: a zero gap
                (ms(15_400), frame.clone()),
            ],
        );
        let run = |acceleration: f64, idle_gap: Option<Duration>| {
            let clock = VirtualClock::new();
            let cfg = OfflineConfig {
                acceleration,
                idle_gap,
                ..config(&path)
            };
            let mut port = OfflineRx::open_with_clock(&cfg, clock.clock()).unwrap();
            let times: Vec<u64> = replay(&mut port, &clock)
                .iter()
                .map(|(t, _)| t.as_millis() as u64)
                .collect();
            let spans = (port.schedule.capture_span(), port.schedule.scheduled());
            (times, port.offline_stats(), spans)
        };
        assert_eq!(run(1.0, None).0, vec![0, 100, 5100, 5100, 5400]);
        assert_eq!(run(10.0, None).0, vec![0, 10, 510, 510, 540]);
        assert_eq!(run(0.5, None).0, vec![0, 200, 10200, 10200, 10800]);
        assert_eq!(run(10.0, None).2, (ms(5400), ms(540)));
        let (times, stats, spans) = run(1.0, Some(ms(1000)));
        assert_eq!(times, vec![0, 100, 100, 100, 400]);
        assert_eq!(spans, (ms(5400), ms(400)));
        assert_eq!(stats.collapsed_ns, 5_000_000_000);
        assert_eq!(stats.not_matching, 1);
        // The gap is collapsed once, in capture time, whatever -a is.
        assert_eq!(run(2.0, Some(ms(1000))).0, vec![0, 50, 50, 50, 200]);
    }

    #[test]
    fn one_far_future_timestamp_does_not_stall_the_rest() {
        let dir = temp_dir();
        let frame = ethernet(&ip_packet(40000, 80, 1));
        let ms = Duration::from_millis;
        // Microsecond pcap timestamps are 32-bit seconds: 40 years ahead still fits.
        let far = ms(10_000) + Duration::from_secs(40 * 365 * 24 * 3600);
        let path = pcap_of(
            &dir,
            "damaged.pcap",
            &[
                (ms(10_000), frame.clone()),
                (ms(10_100), frame.clone()),
                (far, frame.clone()), // a damaged record, 40 years ahead
                (ms(10_300), frame.clone()),
                (ms(10_400), frame.clone()),
            ],
        );
        let clock = VirtualClock::new();
        let mut port = OfflineRx::open_with_clock(&config(&path), clock.clock()).unwrap();
        let times: Vec<u64> = replay(&mut port, &clock)
            .iter()
            .map(|(t, _)| t.as_millis() as u64)
            .collect();
        assert_eq!(times, vec![0, 100, 100, 300, 400]);
        assert_eq!(port.offline_stats().damaged_timestamps, 1);
        assert!(port.summary().contains("damaged-timestamps=1"));
    }

    #[test]
    fn packets_wait_for_their_due_time_and_the_timer_is_armed() {
        let dir = temp_dir();
        let frame = ethernet(&ip_packet(40000, 80, 1));
        let path = pcap_of(
            &dir,
            "due.pcap",
            &[
                (Duration::from_millis(0), frame.clone()),
                (Duration::from_millis(50), frame.clone()),
            ],
        );
        let clock = VirtualClock::new();
        let mut port = OfflineRx::open_with_clock(&config(&path), clock.clock()).unwrap();
        assert_eq!(port.rx_burst(64, &mut |_| {}).unwrap(), 1);
        assert_eq!(port.rx_burst(64, &mut |_| {}).unwrap(), 0);
        let due = port.next_due().unwrap();
        assert_eq!(due - (clock.base), Duration::from_millis(50));
        assert!(port.wait_fd().is_some());
        clock.advance(Duration::from_millis(49));
        assert_eq!(port.rx_burst(64, &mut |_| {}).unwrap(), 0);
        clock.advance(Duration::from_millis(1));
        assert_eq!(port.rx_burst(64, &mut |_| {}).unwrap(), 1);
        assert!(!port.finished());
    }

    #[test]
    fn rounds_wait_for_the_consumer_or_the_tail() {
        let dir = temp_dir();
        let frame = ethernet(&ip_packet(40000, 80, 1));
        let path = pcap_of(
            &dir,
            "rounds.pcap",
            &[(Duration::ZERO, frame.clone()), (Duration::ZERO, frame)],
        );
        let clock = VirtualClock::new();
        let cfg = OfflineConfig {
            rounds: 3,
            tail: Duration::from_secs(5),
            ..config(&path)
        };
        let mut port = OfflineRx::open_with_clock(&cfg, clock.clock()).unwrap();
        assert_eq!(port.rx_burst(64, &mut |_| {}).unwrap(), 2);
        // The consumer is busy: no new round, until it is idle.
        port.consumer_idle(false);
        clock.advance(Duration::from_secs(1));
        assert_eq!(port.rx_burst(64, &mut |_| {}).unwrap(), 0);
        port.consumer_idle(true);
        assert_eq!(port.rx_burst(64, &mut |_| {}).unwrap(), 2);
        // Round 2: busy until the tail passes.
        port.consumer_idle(false);
        clock.advance(Duration::from_millis(4999));
        assert_eq!(port.rx_burst(64, &mut |_| {}).unwrap(), 0);
        clock.advance(Duration::from_millis(1));
        assert_eq!(port.rx_burst(64, &mut |_| {}).unwrap(), 2);
        assert!(!port.finished());
        port.consumer_idle(true);
        assert_eq!(port.rx_burst(64, &mut |_| {}).unwrap(), 0);
        assert!(port.finished());
        let s = port.offline_stats();
        assert_eq!((s.rounds, s.packets, s.tail_timeouts), (3, 6, 1));
        assert!(
            port.summary().contains("rounds=3 packets=6"),
            "{}",
            port.summary()
        );
    }

    #[test]
    fn an_idle_report_from_before_the_end_does_not_end_the_round() {
        let dir = temp_dir();
        let frame = ethernet(&ip_packet(40000, 80, 1));
        let path = pcap_of(&dir, "stale.pcap", &[(Duration::ZERO, frame)]);
        let clock = VirtualClock::new();
        let cfg = OfflineConfig {
            rounds: 2,
            ..config(&path)
        };
        let mut port = OfflineRx::open_with_clock(&cfg, clock.clock()).unwrap();
        port.consumer_idle(true);
        assert_eq!(port.rx_burst(64, &mut |_| {}).unwrap(), 1);
        // The frame was handed out with the end of the file: the old report does not count.
        assert_eq!(port.rx_burst(64, &mut |_| {}).unwrap(), 0);
        assert_eq!(port.offline_stats().rounds, 0);
        port.consumer_idle(true);
        assert_eq!(port.rx_burst(64, &mut |_| {}).unwrap(), 1);
        assert_eq!(port.offline_stats().rounds, 1);
    }

    #[test]
    fn a_truncated_file_replays_what_precedes_the_cut() {
        let dir = temp_dir();
        let frames: Vec<(Duration, Vec<u8>)> = (0..10)
            .map(|i| (Duration::ZERO, ethernet(&ip_packet(40000 + i, 80, 50))))
            .collect();
        let path = pcap_of(&dir, "whole.pcap", &frames);
        let bytes = std::fs::read(&path).unwrap();
        let record = 16 + frames[0].1.len();
        // Cut inside the 8th record's data, and inside the 4th record's header.
        for (cut, whole) in [(24 + 7 * record + 20, 7u64), (24 + 3 * record + 5, 3)] {
            let cut_path = dir.join(format!("cut{cut}.pcap"));
            std::fs::write(&cut_path, &bytes[..cut]).unwrap();
            let mut port = OfflineRx::open(&config(&cut_path)).unwrap();
            assert_eq!(drain(&mut port).len() as u64, whole);
            port.consumer_idle(true);
            port.rx_burst(64, &mut |_| {}).unwrap();
            assert!(port.finished());
            assert_eq!(port.offline_stats().stopped_early, 1);
            // Where it stopped: the record after the whole ones.
            let mut reader = CaptureReader::open(&cut_path).unwrap();
            for _ in 0..whole {
                assert!(matches!(reader.next(), Next::Packet(_)));
            }
            let Next::Stopped(stop) = reader.next() else {
                panic!("no stop");
            };
            assert_eq!(stop.offset, (24 + whole as usize * record) as u64);
            assert_eq!(stop.packet, whole + 1);
            assert!(stop.error.contains("truncated"), "{}", stop.error);
        }
    }

    #[test]
    fn a_corrupt_record_length_stops_reading_there() {
        let dir = temp_dir();
        let frames: Vec<(Duration, Vec<u8>)> = (0..4)
            .map(|i| (Duration::ZERO, ethernet(&ip_packet(40000 + i, 80, 50))))
            .collect();
        let path = pcap_of(&dir, "corrupt.pcap", &frames);
        let mut bytes = std::fs::read(&path).unwrap();
        let record = 16 + frames[0].1.len();
        let at = 24 + 2 * record + 8;
        bytes[at..at + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let mut reader = CaptureReader::open(&path).unwrap();
        assert!(matches!(reader.next(), Next::Packet(_)));
        assert!(matches!(reader.next(), Next::Packet(_)));
        let Next::Stopped(stop) = reader.next() else {
            panic!("no stop");
        };
        assert_eq!((stop.offset, stop.packet), ((24 + 2 * record) as u64, 3));
        assert!(
            stop.error.contains("exceeds the snap length"),
            "{}",
            stop.error
        );
        let mut port = OfflineRx::open(&config(&path)).unwrap();
        assert_eq!(drain(&mut port).len(), 2);
    }

    #[test]
    fn garbage_is_refused_or_stops_without_panicking() {
        let dir = temp_dir();
        let path = dir.join("garbage.pcap");
        std::fs::write(&path, b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let e = OfflineRx::open(&config(&path)).unwrap_err().to_string();
        assert!(e.contains("not a pcap or pcapng"), "{e}");
        std::fs::write(&path, b"").unwrap();
        let e = OfflineRx::open(&config(&path)).unwrap_err().to_string();
        assert!(e.contains("0 bytes"), "{e}");
        std::fs::write(&path, [0xd4, 0xc3, 0xb2, 0xa1, 2, 0]).unwrap();
        let e = OfflineRx::open(&config(&path)).unwrap_err().to_string();
        assert!(e.contains("cut at 6 bytes"), "{e}");
        let e = OfflineRx::open(&config(&dir.join("missing.pcap")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read the capture file"), "{e}");
        // Valid headers followed by pseudo-random bytes: whatever happens, no panic.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect()
        };
        let good_pcap = std::fs::read(pcap_of(
            &dir,
            "seed.pcap",
            &[(Duration::ZERO, ethernet(&ip_packet(1, 80, 1)))],
        ))
        .unwrap();
        let ng_path = dir.join("seed.pcapng");
        let mut w = PcapNgWriter::new(File::create(&ng_path).unwrap()).unwrap();
        w.write_pcapng_block(InterfaceDescriptionBlock::new(DataLink::ETHERNET, 0))
            .unwrap();
        drop(w);
        let good_ng = std::fs::read(&ng_path).unwrap();
        for round in 0..300 {
            let mut bytes = if round % 2 == 0 {
                good_pcap[..24].to_vec()
            } else {
                good_ng.clone()
            };
            let len = 1 + round * 7;
            bytes.extend(random(len));
            let path = dir.join("fuzz.bin");
            std::fs::write(&path, &bytes).unwrap();
            let cfg = OfflineConfig {
                acceleration: MAX_ACCELERATION,
                filter: "".into(),
                ..config(&path)
            };
            let clock = VirtualClock::new();
            if let Ok(mut port) = OfflineRx::open_with_clock(&cfg, clock.clock()) {
                let _ = replay(&mut port, &clock);
                assert!(port.finished(), "round {round}");
            }
        }
    }

    /// A pcap and a pcapng file with a few packets of every kind the reader knows.
    fn sample_files(dir: &Path) -> (Vec<u8>, Vec<u8>) {
        let frames: Vec<(Duration, Vec<u8>)> = (0..6)
            .map(|i| {
                (
                    Duration::from_millis(i * 3),
                    ethernet(&ip_packet(40000 + i as u16, 80, 20)),
                )
            })
            .collect();
        let pcap = std::fs::read(pcap_of(dir, "sample.pcap", &frames)).unwrap();
        let ng_path = dir.join("sample.pcapng");
        let mut w = PcapNgWriter::new(File::create(&ng_path).unwrap()).unwrap();
        let mut idb = InterfaceDescriptionBlock::new(DataLink::ETHERNET, 0);
        idb.options.push(InterfaceDescriptionOption::IfTsResol(9));
        w.write_pcapng_block(idb).unwrap();
        w.write_pcapng_block(InterfaceDescriptionBlock::new(DataLink::LINUX_SLL, 0))
            .unwrap();
        for (i, (ts, frame)) in frames.iter().enumerate() {
            w.write_pcapng_block(EnhancedPacketBlock {
                interface_id: 0,
                timestamp: *ts,
                original_len: frame.len() as u32,
                data: Cow::Owned(frame.clone()),
                options: vec![],
            })
            .unwrap();
            if i == 2 {
                w.write_pcapng_block(SimplePacketBlock {
                    original_len: frame.len() as u32,
                    data: Cow::Owned(frame.clone()),
                })
                .unwrap();
            }
        }
        drop(w);
        (pcap, std::fs::read(&ng_path).unwrap())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]
        /// Damaged files (bytes overwritten, the file cut anywhere) never panic: they are
        /// refused at open, or replay to the end.
        #[test]
        fn damaged_files_never_panic(
            ng in proptest::bool::ANY,
            edits in proptest::collection::vec((0usize..2048, proptest::num::u8::ANY), 0..12),
            cut in 0usize..4096,
        ) {
            let dir = temp_dir();
            let (pcap, pcapng) = sample_files(&dir);
            let mut bytes = if ng { pcapng } else { pcap };
            for (at, value) in edits {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            bytes.truncate(cut.max(1));
            let path = dir.join("damaged.bin");
            std::fs::write(&path, &bytes).unwrap();
            let cfg = OfflineConfig {
                acceleration: MAX_ACCELERATION,
                filter: "".into(),
                rounds: 2,
                ..config(&path)
            };
            let clock = VirtualClock::new();
            if let Ok(mut port) = OfflineRx::open_with_clock(&cfg, clock.clock()) {
                let _ = replay(&mut port, &clock);
                proptest::prop_assert!(port.finished());
            }
        }
    }

    #[test]
    fn bad_settings_name_the_flag() {
        let dir = temp_dir();
        let path = pcap_of(&dir, "s.pcap", &[]);
        for (cfg, flag) in [
            (
                OfflineConfig {
                    acceleration: 0.0,
                    ..config(&path)
                },
                "-a",
            ),
            (
                OfflineConfig {
                    rounds: 0,
                    ..config(&path)
                },
                "-T",
            ),
        ] {
            let e = OfflineRx::open(&cfg).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad {flag} value")), "{e}");
        }
        let e = OfflineRx::open(&OfflineConfig {
            filter: "tcp and bogus".into(),
            ..config(&path)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("bad capture filter"), "{e}");
    }

    #[test]
    fn an_empty_capture_finishes_every_round() {
        let dir = temp_dir();
        let path = pcap_of(&dir, "empty.pcap", &[]);
        let clock = VirtualClock::new();
        let cfg = OfflineConfig {
            rounds: 2,
            ..config(&path)
        };
        let mut port = OfflineRx::open_with_clock(&cfg, clock.clock()).unwrap();
        assert!(replay(&mut port, &clock).is_empty());
        assert_eq!(port.offline_stats().rounds, 2);
    }

    #[test]
    fn ts_units() {
        assert_eq!(TsUnit::Decimal(6).to_ns(1_500_000), 1_500_000_000);
        assert_eq!(TsUnit::Decimal(9).to_ns(7), 7);
        assert_eq!(TsUnit::Decimal(12).to_ns(7_000), 7);
        assert_eq!(TsUnit::Binary(10).to_ns(1024), 1_000_000_000);
        assert_eq!(TsUnit::from_option(0x83), TsUnit::Binary(3));
        assert_eq!(TsUnit::Decimal(0).to_ns(u64::MAX), u64::MAX);
    }
}
