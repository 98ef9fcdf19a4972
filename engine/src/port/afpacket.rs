//! Capture on Linux interfaces through an AF_PACKET socket with a TPACKET_V3 receive ring.
//!
//! A capture covers one interface (Ethernet frames), every interface, or a list of them
//! ([`Scope`]; IPv4 packets from the network header on, whatever each interface's link layer).
//!
//! The kernel writes frames into a ring of fixed-size blocks shared with us by `mmap`; a block
//! belongs to user space once the kernel marks it `TP_STATUS_USER` (full, or retired after
//! [`AfPacketConfig::frame_timeout_ms`]) and goes back when we write `TP_STATUS_KERNEL`.
//! [`AfPacketRx::rx_burst`] lends frames straight out of the ring: no copy, no allocation.
//!
//! A pcap filter expression is compiled to classic BPF by libpcap and attached to the socket,
//! so the kernel drops what we do not want before it reaches the ring.
//!
//! ```text
//!  block 0                     block 1                         block N-1
//! +-----------+-----+-----+---+-----------+-----+-----+---+   +-----------+---
//! | block desc| pkt | pkt |...| block desc| pkt | pkt |...|...| block desc| ...
//! +-----------+-----+-----+---+-----------+-----+-----+---+   +-----------+---
//!   status: KERNEL or USER      pkt = tpacket3_hdr, then the frame at tp_mac
//! ```
#![allow(unsafe_code)]

use std::cell::Cell;
use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, Ordering};

use super::dedup::Dedup;
use super::{Frame, LinkType, PortStats, RxPort};

/// `TPACKET_V3` from `<linux/if_packet.h>` (`enum tpacket_versions`: V1 = 0, V2 = 1, V3 = 2).
const TPACKET_V3: libc::c_int = 2;
/// Size of a frame slot as the kernel accounts it; V3 packs frames of any size, this value only
/// has to satisfy the kernel's ring checks (aligned, at least a header, divides the block).
const RING_FRAME_SIZE: u32 = 2048;
/// Largest block we accept (the kernel allocates each block contiguously).
const MAX_BLOCK_SIZE: u32 = 1 << 27;
/// Size of `struct tpacket3_hdr`.
const TPACKET3_HDR_LEN: usize = 48;
/// `BPF_RET | BPF_K`: the classic BPF "return constant" instruction.
const BPF_RET_K: u16 = 0x06;

// Offsets inside `struct tpacket_block_desc` (version, offset_to_priv, then tpacket_hdr_v1).
const BLOCK_STATUS: usize = 8;
const BLOCK_NUM_PKTS: usize = 12;
const BLOCK_FIRST_PKT: usize = 16;
// Offsets inside `struct tpacket3_hdr`.
const PKT_NEXT_OFFSET: usize = 0;
const PKT_SEC: usize = 4;
const PKT_NSEC: usize = 8;
const PKT_SNAPLEN: usize = 12;
const PKT_LEN: usize = 16;
const PKT_MAC: usize = 24;

/// Why a port could not be opened. Each message names the cause and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The interface does not exist (in this network namespace).
    #[error("interface {0} not found (check `ip link`; is it in another network namespace?)")]
    InterfaceNotFound(String),
    /// The interface name cannot be an interface name.
    #[error("invalid interface name {0:?}")]
    BadInterfaceName(String),
    /// The process lacks the privilege the socket needs.
    #[error("{0} needs root or CAP_NET_RAW (run as root or `setcap cap_net_raw,cap_net_admin+ep` on the binary)")]
    Permission(&'static str),
    /// libpcap rejected the capture filter expression.
    #[error("bad capture filter '{filter}': {message}")]
    BadFilter {
        /// The expression as given.
        filter: String,
        /// What libpcap said.
        message: String,
    },
    /// A configuration value is out of range.
    #[error("bad port configuration: {0}")]
    BadConfig(String),
    /// The kernel could not allocate the receive ring.
    #[error("cannot allocate the AF_PACKET ring of {bytes} bytes: {source} (lower block_size or block_count)")]
    RingAlloc {
        /// Bytes requested.
        bytes: u64,
        /// The OS error.
        source: io::Error,
    },
    /// Another system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The call and what it was for.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl PortError {
    /// Wraps the last OS error of a failed call, mapping EPERM/EACCES to [`PortError::Permission`].
    pub(crate) fn last_os(op: &'static str, what: &'static str) -> PortError {
        let source = io::Error::last_os_error();
        match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => PortError::Permission(what),
            _ => PortError::Os { op, source },
        }
    }
}

/// How a fanout group spreads frames over its sockets (`PACKET_FANOUT` mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FanoutMode {
    /// By the IPv4 TCP/UDP *source port* through a classic BPF program
    /// (`PACKET_FANOUT_CBPF`): member `i` of `workers` gets the frames whose source port `p`
    /// has [`crate::flow::port_shard`]`(p, workers) == i`. The same function computed in user
    /// space names the owner of a flow from its reply alone (even after `-c` changed the
    /// client address). Members must join in order: the kernel numbers them as they join.
    PortShard {
        /// Number of members (workers) in the group.
        workers: u16,
    },
    /// By flow hash: both directions of a connection land on the same socket (`PACKET_FANOUT_HASH`).
    #[default]
    Hash,
    /// Round robin (`PACKET_FANOUT_LB`).
    LoadBalance,
    /// By the CPU that received the frame (`PACKET_FANOUT_CPU`).
    Cpu,
    /// By the NIC receive queue (`PACKET_FANOUT_QM`).
    QueueMapping,
}

impl FanoutMode {
    fn raw(self) -> u32 {
        match self {
            FanoutMode::Hash => libc::PACKET_FANOUT_HASH,
            FanoutMode::LoadBalance => libc::PACKET_FANOUT_LB,
            FanoutMode::Cpu => libc::PACKET_FANOUT_CPU,
            FanoutMode::QueueMapping => libc::PACKET_FANOUT_QM,
            FanoutMode::PortShard { .. } => libc::PACKET_FANOUT_CBPF,
        }
    }
}

/// The classic BPF program of [`FanoutMode::PortShard`]: returns
/// `((src_port * 0x9E3779B1) >> 16) % workers` with 32-bit wrapping arithmetic, exactly
/// [`crate::flow::port_shard`]. The kernel runs fanout programs on received frames with the
/// data starting at the network header (the link header, VLAN tags included, is already
/// pulled), so offsets are relative to the IPv4 header; the capture filter has already
/// selected IPv4 TCP.
pub fn port_shard_program(workers: u16) -> Vec<libc::sock_filter> {
    const LDX_B_MSH: u16 = (libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH) as u16;
    const LD_H_IND: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_IND) as u16;
    const MUL_K: u16 = (libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K) as u16;
    const RSH_K: u16 = (libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K) as u16;
    const MOD_K: u16 = (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16;
    const RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;
    let op = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    vec![
        op(LDX_B_MSH, 0),                     // X = IPv4 header length
        op(LD_H_IND, 0),                      // A = source port
        op(MUL_K, 0x9E37_79B1),               // golden-ratio mix
        op(RSH_K, 16),                        //
        op(MOD_K, u32::from(workers.max(1))), // member index
        op(RET_A, 0),
    ]
}

/// Which interfaces a capture covers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Scope {
    /// [`AfPacketConfig::interface`] alone, frames from the link-layer header on (Ethernet).
    #[default]
    Interface,
    /// Every interface, as the C tcpcopy's raw socket sees them: the socket is bound to no
    /// interface and to the IPv4 protocol, so the kernel hands it each IPv4 packet once, where
    /// the IP layer takes it (after bridge, VLAN and bond processing: a frame that crossed a
    /// bridge port and the bridge is seen once, on the bridge), never a packet this host sends.
    /// Frames start at the IPv4 header ([`LinkType::RawIp`]).
    AllInterfaces,
    /// These interfaces (at most [`MAX_INTERFACES`]): each one's IPv4 packets, as a capture on
    /// it alone sees them (bridge ports included), from the IPv4 header on. A packet seen on two
    /// listed interfaces (a bridge and its port) within a few milliseconds is handed over once
    /// ([`super::dedup`]; counted in [`PortStats::rx_duplicates`]).
    Interfaces(Vec<String>),
}

/// Most interfaces a [`Scope::Interfaces`] list may name (as the C tools' `-i` list).
pub const MAX_INTERFACES: usize = 32;

/// Settings of an [`AfPacketRx`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfPacketConfig {
    /// The interface to capture on, e.g. `eth0` (with [`Scope::Interface`]).
    pub interface: String,
    /// Which interfaces the capture covers (default: `interface` alone).
    pub scope: Scope,
    /// A pcap filter expression (`tcp and dst port 80`); `None` captures everything.
    pub filter: Option<String>,
    /// Bytes per ring block; a multiple of the page size (default 1 MiB).
    pub block_size: u32,
    /// Blocks in the ring (default 64).
    pub block_count: u32,
    /// Milliseconds after which the kernel hands over a block that is not full (default 1).
    pub frame_timeout_ms: u32,
    /// Skip frames this host sends out of the interface (`PACKET_IGNORE_OUTGOING`, Linux 4.20+;
    /// default true).
    pub ignore_outgoing: bool,
    /// Join fanout group `id` with this mode (for several capture workers on one interface).
    /// IP fragments are reassembled for hashing (`PACKET_FANOUT_FLAG_DEFRAG`).
    pub fanout: Option<(u16, FanoutMode)>,
    /// Put the interface in promiscuous mode while the socket is open (default false).
    pub promiscuous: bool,
    /// Bytes kept per frame (default 262144: whole frames, even GRO-merged ones).
    pub snaplen: u32,
}

impl Default for AfPacketConfig {
    fn default() -> AfPacketConfig {
        AfPacketConfig {
            interface: String::new(),
            scope: Scope::Interface,
            filter: None,
            // Blocks retire on a 1 ms timeout, so at moderate rates each block holds little:
            // 1024 blocks of 64 KiB (64 MiB) ride out about a second of a stalled reader.
            block_size: 1 << 16,
            block_count: 1024,
            frame_timeout_ms: 1,
            ignore_outgoing: true,
            fanout: None,
            promiscuous: false,
            snaplen: 262_144,
        }
    }
}

/// Compiles a pcap filter expression for Ethernet frames into classic BPF instructions for
/// `SO_ATTACH_FILTER`. Every "accept" return is capped at `snaplen`.
///
/// The `pcap` crate compiles (`Capture::dead(..).compile(..)`) but keeps the fields of its
/// `BpfInstruction` private; its `Display` prints exactly `code jt jf k`, so we read the four
/// numbers back from that text. This needs no unsafe code and no second declaration of libpcap's
/// ABI; if a later crate version changes the text, compiling fails with an error rather than
/// producing a wrong filter.
///
/// # Errors
/// [`PortError::BadFilter`] with libpcap's message.
pub fn compile_filter(expression: &str, snaplen: u32) -> Result<Vec<libc::sock_filter>, PortError> {
    compile_filter_for(expression, snaplen, LinkType::Ethernet)
}

/// `DLT_RAW` on Linux: packets that start with the IP header (libpcap checks the version).
const DLT_RAW: i32 = 12;

/// [`compile_filter`] for frames of `link` type.
///
/// # Errors
/// [`PortError::BadFilter`] with libpcap's message (e.g. `ether host` on raw IP frames).
pub fn compile_filter_for(
    expression: &str,
    snaplen: u32,
    link: LinkType,
) -> Result<Vec<libc::sock_filter>, PortError> {
    let bad = |message: String| PortError::BadFilter {
        filter: expression.to_owned(),
        message,
    };
    let linktype = match link {
        LinkType::Ethernet => pcap::Linktype::ETHERNET,
        LinkType::RawIp => pcap::Linktype(DLT_RAW),
    };
    let dead = pcap::Capture::dead(linktype).map_err(|e| bad(e.to_string()))?;
    let program = dead
        .compile(expression, true)
        .map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::with_capacity(program.get_instructions().len());
    for instruction in program.get_instructions() {
        let text = instruction.to_string();
        let mut fields = text.split_ascii_whitespace();
        let mut next = || fields.next().and_then(|f| f.parse::<u64>().ok());
        let parsed = (next(), next(), next(), next());
        let (Some(code), Some(jt), Some(jf), Some(k)) = parsed else {
            return Err(bad(format!("unexpected BPF instruction text {text:?}")));
        };
        let (Ok(code), Ok(jt), Ok(jf), Ok(k)) = (
            u16::try_from(code),
            u8::try_from(jt),
            u8::try_from(jf),
            u32::try_from(k),
        ) else {
            return Err(bad(format!("BPF instruction out of range {text:?}")));
        };
        let k = if code == BPF_RET_K && k != 0 {
            k.min(snaplen)
        } else {
            k
        };
        out.push(libc::sock_filter { code, jt, jf, k });
    }
    if out.is_empty() {
        return Err(bad("libpcap produced an empty program".to_owned()));
    }
    Ok(out)
}

/// `program` preceded by a check that the packet is IPv4 and arrived on one of `ifindexes`
/// (classic BPF ancillary loads of `skb->protocol` and `skb->dev->ifindex`); other packets are
/// refused before `program` runs.
fn on_interfaces_only(program: &[libc::sock_filter], ifindexes: &[u32]) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ancillary = |field: libc::c_int| (libc::SKF_AD_OFF + field) as u32;
    let n = ifindexes.len();
    let mut out = Vec::with_capacity(program.len() + n + 4);
    let insn = |code: u16, jt: usize, jf: usize, k: u32| libc::sock_filter {
        code,
        jt: jt as u8,
        jf: jf as u8,
        k,
    };
    out.push(insn(LD_W_ABS, 0, 0, ancillary(libc::SKF_AD_PROTOCOL)));
    // Not IPv4: jump over the interface load and checks to the refusal.
    out.push(insn(JEQ_K, 0, n + 1, libc::ETH_P_IP as u32));
    out.push(insn(LD_W_ABS, 0, 0, ancillary(libc::SKF_AD_IFINDEX)));
    for (i, &ifindex) in ifindexes.iter().enumerate() {
        // A match jumps over the remaining checks and the refusal, into `program`.
        out.push(insn(JEQ_K, n - i, 0, ifindex));
    }
    out.push(insn(BPF_RET_K, 0, 0, 0));
    out.extend_from_slice(program);
    out
}

/// The index of interface `name`.
fn interface_index(name: &str) -> Result<u32, PortError> {
    let c_name = CString::new(name).map_err(|_| PortError::BadInterfaceName(name.to_owned()))?;
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(PortError::BadInterfaceName(name.to_owned()));
    }
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if ifindex == 0 {
        return Err(PortError::InterfaceNotFound(name.to_owned()));
    }
    Ok(ifindex)
}

/// The mmapped ring; unmapped on drop.
struct Ring {
    base: NonNull<u8>,
    len: usize,
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what mmap returned and nothing borrows the mapping
        // once the ring is dropped (frames are only lent inside `rx_burst`).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// Where `rx_burst` stopped inside a user-owned block.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// Offset of the next packet header from the block start.
    offset: usize,
    /// Packets left in the block.
    remaining: u32,
}

/// An AF_PACKET TPACKET_V3 capture socket with its receive ring. See the module docs.
pub struct AfPacketRx {
    // Field order matters: the ring is unmapped before the socket closes.
    ring: Ring,
    fd: OwnedFd,
    block_size: usize,
    block_count: usize,
    /// The block to read next.
    block: usize,
    /// Position inside `block` when it is partly consumed.
    cursor: Option<Cursor>,
    interface: String,
    rx_packets: u64,
    rx_bytes: u64,
    /// Kernel drops read so far (`PACKET_STATISTICS` resets on every read).
    dropped: Cell<u64>,
    /// Blocks whose contents did not make sense (never seen; counted instead of trusted).
    bad_blocks: u64,
    /// How frames start (Ethernet for one interface, raw IPv4 otherwise).
    link: LinkType,
    /// Packets seen on two listed interfaces ([`Scope::Interfaces`] only).
    dedup: Option<Dedup>,
    duplicates: u64,
}

// SAFETY: the ring pointer is owned by this value alone (the mapping is private to the socket
// we own), nothing is tied to the creating thread, and `&mut self` serialises every access to
// the ring; moving the whole value to another thread is sound.
unsafe impl Send for AfPacketRx {}

impl std::fmt::Debug for AfPacketRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfPacketRx")
            .field("interface", &self.interface)
            .field("fd", &self.fd.as_raw_fd())
            .field("block_size", &self.block_size)
            .field("block_count", &self.block_count)
            .field("block", &self.block)
            .finish_non_exhaustive()
    }
}

fn setsockopt<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
    op: &'static str,
) -> Result<(), PortError> {
    let len = libc::socklen_t::try_from(mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX);
    // SAFETY: `value` points to a live `T` of `len` bytes for the duration of the call; the
    // kernel only reads it.
    let rc = unsafe { libc::setsockopt(fd, level, name, ptr::from_ref(value).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(PortError::last_os(op, "AF_PACKET"))
    }
}

fn attach_filter(fd: RawFd, program: &[libc::sock_filter]) -> Result<(), PortError> {
    let len = u16::try_from(program.len()).map_err(|_| {
        PortError::BadConfig(format!(
            "filter of {} instructions is too long",
            program.len()
        ))
    })?;
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_ptr().cast_mut(),
    };
    setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_ATTACH_FILTER,
        &fprog,
        "setsockopt(SO_ATTACH_FILTER)",
    )
}

impl AfPacketRx {
    /// Opens a capture on `config.interface`.
    ///
    /// The socket is created with protocol 0, so the kernel delivers nothing to it until it is
    /// bound; the filter is attached before the bind. No frame that fails the filter can reach
    /// the ring, which closes the classic race where frames arrive between `socket()` and
    /// `SO_ATTACH_FILTER` (libpcap works around it with a drop-all filter and a drain; here there
    /// is nothing to drain).
    ///
    /// # Errors
    /// [`PortError`] naming the cause: a missing interface, a bad filter, missing privilege,
    /// an invalid ring size, or a failed system call.
    pub fn open(config: &AfPacketConfig) -> Result<AfPacketRx, PortError> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = u32::try_from(page).unwrap_or(4096).max(1);
        if config.block_size < page
            || (config.block_size / page) * page != config.block_size
            || config.block_size > MAX_BLOCK_SIZE
        {
            return Err(PortError::BadConfig(format!(
                "block_size {} must be a multiple of the page size {page} and at most {MAX_BLOCK_SIZE}",
                config.block_size
            )));
        }
        if config.block_size < RING_FRAME_SIZE {
            return Err(PortError::BadConfig(format!(
                "block_size {} is too small",
                config.block_size
            )));
        }
        if config.block_count == 0 || config.block_count > 65_536 {
            return Err(PortError::BadConfig(format!(
                "block_count {} must be between 1 and 65536",
                config.block_count
            )));
        }
        if config.snaplen == 0 {
            return Err(PortError::BadConfig("snaplen must be positive".to_owned()));
        }

        // Validate what needs no privilege first, so these errors come out even for non-root.
        let link = match config.scope {
            Scope::Interface => LinkType::Ethernet,
            Scope::AllInterfaces | Scope::Interfaces(_) => LinkType::RawIp,
        };
        let mut program = match &config.filter {
            Some(expression) => compile_filter_for(expression, config.snaplen, link)?,
            None => vec![libc::sock_filter {
                code: BPF_RET_K,
                jt: 0,
                jf: 0,
                k: config.snaplen,
            }],
        };
        // The interface the socket is bound to (0: all), the protocol it takes, its name.
        let (ifindex, protocol, display) = match &config.scope {
            Scope::Interface => (
                interface_index(&config.interface)?,
                libc::ETH_P_ALL,
                config.interface.clone(),
            ),
            Scope::AllInterfaces => (0, libc::ETH_P_IP, "any".to_owned()),
            Scope::Interfaces(names) => {
                if names.is_empty() || names.len() > MAX_INTERFACES {
                    return Err(PortError::BadConfig(format!(
                        "{} interfaces listed: give 1..={MAX_INTERFACES}",
                        names.len()
                    )));
                }
                let ifindexes = names
                    .iter()
                    .map(|name| interface_index(name))
                    .collect::<Result<Vec<u32>, PortError>>()?;
                program = on_interfaces_only(&program, &ifindexes);
                (0, libc::ETH_P_ALL, names.join(","))
            }
        };
        let ifindex = libc::c_int::try_from(ifindex)
            .map_err(|_| PortError::BadConfig(format!("interface index {ifindex} out of range")))?;
        let kind = match link {
            LinkType::Ethernet => libc::SOCK_RAW,
            LinkType::RawIp => libc::SOCK_DGRAM,
        };

        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, kind | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(PortError::last_os("socket(AF_PACKET)", "AF_PACKET"));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sock = fd.as_raw_fd();

        setsockopt(
            sock,
            libc::SOL_PACKET,
            libc::PACKET_VERSION,
            &TPACKET_V3,
            "setsockopt(PACKET_VERSION, TPACKET_V3)",
        )?;
        attach_filter(sock, &program)?;
        if config.ignore_outgoing {
            let one: libc::c_int = 1;
            setsockopt(
                sock,
                libc::SOL_PACKET,
                libc::PACKET_IGNORE_OUTGOING,
                &one,
                "setsockopt(PACKET_IGNORE_OUTGOING) (needs Linux 4.20+)",
            )?;
        }

        let req = libc::tpacket_req3 {
            tp_block_size: config.block_size,
            tp_block_nr: config.block_count,
            tp_frame_size: RING_FRAME_SIZE,
            tp_frame_nr: (config.block_size / RING_FRAME_SIZE) * config.block_count,
            tp_retire_blk_tov: config.frame_timeout_ms,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        let ring_bytes = u64::from(config.block_size) * u64::from(config.block_count);
        if let Err(err) = setsockopt(
            sock,
            libc::SOL_PACKET,
            libc::PACKET_RX_RING,
            &req,
            "setsockopt(PACKET_RX_RING)",
        ) {
            return Err(match err {
                PortError::Os { source, .. } if source.raw_os_error() == Some(libc::ENOMEM) => {
                    PortError::RingAlloc {
                        bytes: ring_bytes,
                        source,
                    }
                }
                other => other,
            });
        }
        let len = usize::try_from(ring_bytes).map_err(|_| {
            PortError::BadConfig(format!("ring of {ring_bytes} bytes is too large"))
        })?;
        // SAFETY: mapping the ring the kernel just set up on our socket, at a kernel-chosen
        // address; the result is checked against MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                sock,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(PortError::RingAlloc {
                bytes: ring_bytes,
                source: io::Error::last_os_error(),
            });
        }
        let Some(base) = NonNull::new(base.cast::<u8>()) else {
            return Err(PortError::BadConfig("mmap returned a null ring".to_owned()));
        };
        let ring = Ring { base, len };

        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as libc::c_ushort;
        addr.sll_protocol = (protocol as u16).to_be();
        addr.sll_ifindex = ifindex;
        // SAFETY: `addr` is a valid sockaddr_ll and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                sock,
                ptr::from_ref(&addr).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let source = io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::ENODEV) {
                return Err(PortError::InterfaceNotFound(display));
            }
            return Err(PortError::Os {
                op: "bind(AF_PACKET) to the interface",
                source,
            });
        }

        if config.promiscuous && ifindex != 0 {
            let mreq = libc::packet_mreq {
                mr_ifindex: ifindex,
                mr_type: libc::PACKET_MR_PROMISC as libc::c_ushort,
                mr_alen: 0,
                mr_address: [0; 8],
            };
            setsockopt(
                sock,
                libc::SOL_PACKET,
                libc::PACKET_ADD_MEMBERSHIP,
                &mreq,
                "setsockopt(PACKET_ADD_MEMBERSHIP, promiscuous)",
            )?;
        }
        if let Some((group, mode)) = config.fanout {
            // A fanout group has its own outgoing switch: PACKET_IGNORE_OUTGOING on the socket
            // does not reach the group's shared hook.
            const FLAG_IGNORE_OUTGOING: u32 = 0x4000; // PACKET_FANOUT_FLAG_IGNORE_OUTGOING
            let mut flags = libc::PACKET_FANOUT_FLAG_DEFRAG;
            if config.ignore_outgoing {
                flags |= FLAG_IGNORE_OUTGOING;
            }
            let arg = (u32::from(group) | ((mode.raw() | flags) << 16)) as libc::c_int;
            setsockopt(sock, libc::SOL_PACKET, libc::PACKET_FANOUT, &arg, "setsockopt(PACKET_FANOUT) (is the interface up? do all group members use the same mode?)")?;
            if let FanoutMode::PortShard { workers } = mode {
                let program = port_shard_program(workers);
                let fprog = libc::sock_fprog {
                    len: program.len() as u16,
                    filter: program.as_ptr().cast_mut(),
                };
                setsockopt(
                    sock,
                    libc::SOL_PACKET,
                    libc::PACKET_FANOUT_DATA,
                    &fprog,
                    "setsockopt(PACKET_FANOUT_DATA, port-shard program)",
                )?;
            }
        }

        Ok(AfPacketRx {
            ring,
            fd,
            block_size: config.block_size as usize,
            block_count: config.block_count as usize,
            block: 0,
            cursor: None,
            interface: display,
            rx_packets: 0,
            rx_bytes: 0,
            dropped: Cell::new(0),
            bad_blocks: 0,
            link,
            dedup: matches!(config.scope, Scope::Interfaces(_)).then(Dedup::default),
            duplicates: 0,
        })
    }

    /// The interface this port captures on (`any` for every interface, or the list `a,b`).
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Blocks handed back unread because their layout made no sense (should stay 0).
    pub fn bad_blocks(&self) -> u64 {
        self.bad_blocks
    }

    /// Pointer to the start of block `index`.
    fn block_ptr(&self, index: usize) -> *mut u8 {
        debug_assert!(index < self.block_count);
        // SAFETY: index < block_count, so the offset stays inside the mapping of
        // block_size * block_count bytes.
        unsafe { self.ring.base.as_ptr().add(index * self.block_size) }
    }

    /// The status word of block `index`, shared with the kernel.
    fn block_status(&self, index: usize) -> &AtomicU32 {
        // SAFETY: the block descriptor starts every block, which is page aligned, so the u32 at
        // offset 8 is aligned and inside the mapping; the kernel only accesses it atomically
        // (smp_wmb/flush_dcache + store), and the mapping outlives `&self`.
        unsafe { AtomicU32::from_ptr(self.block_ptr(index).add(BLOCK_STATUS).cast::<u32>()) }
    }

    /// Reads a u32 at `offset` of block `index`; the caller checked `offset + 4 <= block_size`.
    fn read_u32(&self, index: usize, offset: usize) -> u32 {
        debug_assert!(offset + 4 <= self.block_size);
        // SAFETY: in bounds of the block per the caller's check; the block is owned by user
        // space (TP_STATUS_USER seen with Acquire), so the kernel does not write it meanwhile.
        unsafe { ptr::read_unaligned(self.block_ptr(index).add(offset).cast::<u32>()) }
    }

    fn read_u16(&self, index: usize, offset: usize) -> u16 {
        debug_assert!(offset + 2 <= self.block_size);
        // SAFETY: as in `read_u32`.
        unsafe { ptr::read_unaligned(self.block_ptr(index).add(offset).cast::<u16>()) }
    }

    /// Gives the current block back to the kernel and moves to the next.
    fn release_block(&mut self) {
        self.block_status(self.block)
            .store(libc::TP_STATUS_KERNEL, Ordering::Release);
        self.block = (self.block + 1) % self.block_count;
        self.cursor = None;
    }

    /// Reads and resets the kernel's drop counter, adding it to `dropped`.
    fn poll_kernel_drops(&self) {
        // SAFETY: tpacket_stats_v3 is plain data; all-zero is valid.
        let mut st: libc::tpacket_stats_v3 = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
        // SAFETY: `st` is writable for `len` bytes and `len` is a valid in/out length.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                ptr::from_mut(&mut st).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            self.dropped
                .set(self.dropped.get() + u64::from(st.tp_drops));
        }
    }
}

impl RxPort for AfPacketRx {
    fn rx_burst(&mut self, max: usize, sink: &mut dyn FnMut(Frame<'_>)) -> io::Result<usize> {
        let mut count = 0;
        while count < max {
            let cursor = match self.cursor {
                Some(cursor) => cursor,
                None => {
                    let status = self.block_status(self.block).load(Ordering::Acquire);
                    if status & libc::TP_STATUS_USER == 0 {
                        break;
                    }
                    let remaining = self.read_u32(self.block, BLOCK_NUM_PKTS);
                    let offset = self.read_u32(self.block, BLOCK_FIRST_PKT) as usize;
                    if remaining == 0 {
                        self.release_block();
                        continue;
                    }
                    Cursor { offset, remaining }
                }
            };
            // Check the header lies inside the block before reading it.
            if cursor.offset < BLOCK_FIRST_PKT + 4
                || cursor.offset + TPACKET3_HDR_LEN > self.block_size
            {
                self.bad_blocks += 1;
                self.release_block();
                continue;
            }
            let at = cursor.offset;
            let next = self.read_u32(self.block, at + PKT_NEXT_OFFSET) as usize;
            let sec = self.read_u32(self.block, at + PKT_SEC);
            let nsec = self.read_u32(self.block, at + PKT_NSEC);
            let snaplen = self.read_u32(self.block, at + PKT_SNAPLEN) as usize;
            let wire_len = self.read_u32(self.block, at + PKT_LEN) as usize;
            let mac = self.read_u16(self.block, at + PKT_MAC) as usize;
            let start = at + mac;
            if mac < TPACKET3_HDR_LEN || start.saturating_add(snaplen) > self.block_size {
                self.bad_blocks += 1;
                self.release_block();
                continue;
            }
            // SAFETY: [start, start + snaplen) lies inside block `self.block` (checked above),
            // which user space owns until `release_block`; the slice lives only for this call of
            // `sink` and the ring outlives it.
            let data = unsafe {
                std::slice::from_raw_parts(self.block_ptr(self.block).add(start), snaplen)
            };
            let timestamp_ns = u64::from(sec) * 1_000_000_000 + u64::from(nsec);
            let duplicate = self
                .dedup
                .as_mut()
                .is_some_and(|dedup| dedup.is_duplicate(data, timestamp_ns));
            if duplicate {
                self.duplicates += 1;
            } else {
                sink(Frame {
                    data,
                    wire_len,
                    timestamp_ns,
                });
                count += 1;
                self.rx_packets += 1;
                self.rx_bytes += snaplen as u64;
            }

            if cursor.remaining <= 1 {
                self.release_block();
            } else if next == 0 {
                // More packets announced but no link to them: do not guess.
                self.bad_blocks += 1;
                self.release_block();
            } else {
                self.cursor = Some(Cursor {
                    offset: at + next,
                    remaining: cursor.remaining - 1,
                });
            }
        }
        Ok(count)
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn stats(&self) -> PortStats {
        self.poll_kernel_drops();
        PortStats {
            rx_packets: self.rx_packets,
            rx_bytes: self.rx_bytes,
            rx_dropped: self.dropped.get(),
            rx_duplicates: self.duplicates,
            ..PortStats::default()
        }
    }

    fn link_type(&self) -> LinkType {
        self.link
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_compiles_and_caps_snaplen() {
        let program = compile_filter("tcp and dst port 5555", 1500).unwrap();
        assert!(program.len() > 3);
        let rets: Vec<u32> = program
            .iter()
            .filter(|i| i.code == BPF_RET_K)
            .map(|i| i.k)
            .collect();
        assert!(rets.contains(&0));
        assert!(rets.contains(&1500));
        assert!(rets.iter().all(|&k| k == 0 || k == 1500));
    }

    #[test]
    fn bad_filter_names_expression() {
        let err = compile_filter("tcp and xyz", 65535).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("bad capture filter 'tcp and xyz': "),
            "{text}"
        );
    }

    #[test]
    fn missing_interface_is_named() {
        let config = AfPacketConfig {
            interface: "tcrpnone0".into(),
            ..AfPacketConfig::default()
        };
        let err = AfPacketRx::open(&config).unwrap_err();
        assert!(matches!(err, PortError::InterfaceNotFound(_)));
        assert!(
            err.to_string().contains("interface tcrpnone0 not found"),
            "{err}"
        );
    }

    #[test]
    fn bad_sizes_rejected() {
        let config = AfPacketConfig {
            interface: "lo".into(),
            block_size: 1000,
            ..AfPacketConfig::default()
        };
        assert!(matches!(
            AfPacketRx::open(&config),
            Err(PortError::BadConfig(_))
        ));
        let config = AfPacketConfig {
            interface: "lo".into(),
            block_count: 0,
            ..AfPacketConfig::default()
        };
        assert!(matches!(
            AfPacketRx::open(&config),
            Err(PortError::BadConfig(_))
        ));
        let config = AfPacketConfig {
            interface: "a\0b".into(),
            ..AfPacketConfig::default()
        };
        assert!(matches!(
            AfPacketRx::open(&config),
            Err(PortError::BadInterfaceName(_))
        ));
    }

    #[test]
    fn fanout_modes_map_to_kernel_values() {
        assert_eq!(FanoutMode::default(), FanoutMode::Hash);
        assert_eq!(FanoutMode::Hash.raw(), 0);
        assert_eq!(FanoutMode::LoadBalance.raw(), 1);
        assert_eq!(FanoutMode::Cpu.raw(), 2);
        assert_eq!(FanoutMode::QueueMapping.raw(), 5);
    }
}
