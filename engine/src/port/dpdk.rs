//! DPDK poll-mode ports (cargo feature `dpdk`): the Environment Abstraction Layer, mbuf pools,
//! ports with several RX/TX queues, and [`RxPort`]/[`TxPort`] over them.
//!
//! ```text
//!  Eal::init(&EalConfig)            once per process: rte_eal_init (hugepages, vdevs, PCI)
//!    └─ DpdkPort::open(&eal, &PortConfig)   device by name; its Mempool; RSS; start; next hop
//!         ├─ port.rx_queue(QueueId(i)) -> DpdkRx   RxPort: rte_eth_rx_burst, frames lent, freed
//!         └─ port.tx_queue(QueueId(i)) -> DpdkTx   TxPort: IPv4 in, Ethernet prepended, checksums
//! ```
//!
//! Ownership: [`Eal`], [`Mempool`] and [`DpdkPort`] are cheap handles over reference-counted
//! state; a port keeps its pool and the EAL alive, and each queue handle keeps its port alive, so
//! nothing can be torn down under a worker. The last handle stops and closes the device, frees
//! the pool (unless mbufs are still out, which then leaks it and skips `rte_eal_cleanup` rather
//! than leave them dangling), and finally runs `rte_eal_cleanup`.
//!
//! Threads: each queue has one owner ([`DpdkPort::rx_queue`] hands it out once). Queues work
//! from any thread; a thread that calls [`Eal::register_thread`] first gets an lcore id and so
//! the per-lcore mempool cache.
//!
//! Network namespaces: `net_af_packet` and `net_af_xdp` virtual devices open their kernel
//! interface in the network namespace of the process **when `rte_eal_init` runs**; start the
//! process in the namespace (`ip netns exec NS prog`) or `setns` before [`Eal::init`].
//!
//! Transmit follows raw-socket `IP_HDRINCL` semantics: packets handed in are IPv4 packets whose
//! header checksum may be zero; [`DpdkTx`] sets the total length and the header checksum (by the
//! device when it offers `RTE_ETH_TX_OFFLOAD_IPV4_CKSUM`, in software otherwise), and the TCP
//! checksum too when [`PortConfig::tcp_checksum`] asks for it. The Ethernet header carries the
//! port's MAC and the next hop's, configured ([`NextHop::Mac`]) or resolved by ARP on the port at
//! open ([`NextHop::Arp`]) and kept fresh from the ARP traffic the port's queue 0 receives.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dpdk_sys as sys;

use super::{Frame, PortStats, RxPort, TxBatch, TxPort};
use crate::wire::checksum;
use crate::wire::ethernet::{self, ETHERTYPE_ARP, ETHERTYPE_IPV4};

/// Most mbufs one `rte_eth_rx_burst`/`rte_eth_tx_burst` call handles.
pub const BURST: usize = 64;
/// Most queues per direction a port may have here (queue ownership is a 64-bit mask).
pub const MAX_QUEUES: u16 = 64;
/// Length of the symmetric RSS key DPDK devices take by default (Toeplitz, 40 bytes).
pub const RSS_KEY_LEN: usize = 40;
/// How many times a transmit burst that made no progress is retried before the rest is dropped.
const TX_RETRIES: u32 = 8;
/// Interval between ARP requests while resolving the next hop.
const ARP_RETRY: Duration = Duration::from_millis(200);
/// Default data room of an mbuf: `RTE_MBUF_DEFAULT_BUF_SIZE` (2048 + 128 headroom).
pub const DEFAULT_DATA_ROOM: u16 = 2048 + 128;

// ---------------------------------------------------------------------------------------------
// Ids and addresses

/// A DPDK ethdev port id. `Debug` prints `port0`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u16);

/// A queue index on one port. `Debug` prints `q0`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u16);

/// An EAL logical core id. `Debug` prints `lcore0`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LcoreId(pub u32);

impl fmt::Debug for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "port{}", self.0)
    }
}

impl fmt::Debug for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "q{}", self.0)
    }
}

impl fmt::Debug for LcoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lcore{}", self.0)
    }
}

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// An Ethernet address. Displays and parses as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    fn to_u64(self) -> u64 {
        let mut bytes = [0u8; 8];
        bytes[..6].copy_from_slice(&self.0);
        u64::from_le_bytes(bytes)
    }

    fn from_u64(value: u64) -> MacAddr {
        let bytes = value.to_le_bytes();
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&bytes[..6]);
        MacAddr(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for MacAddr {
    type Err = DpdkError;

    /// Parses `aa:bb:cc:dd:ee:ff` (or with `-` separators).
    fn from_str(text: &str) -> Result<MacAddr, DpdkError> {
        let bad =
            || DpdkError::BadConfig(format!("bad MAC address {text:?} (want aa:bb:cc:dd:ee:ff)"));
        let mut mac = [0u8; 6];
        let mut parts = text.split([':', '-']);
        for byte in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(mac))
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Why DPDK could not be brought up or used. Each message names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DpdkError {
    /// EAL needs hugepages (and, unless in-memory, a mounted hugetlbfs) and finds none.
    #[error("no hugepages: {detail}; {fix}")]
    NoHugepages {
        /// What is missing.
        detail: String,
        /// What to do about it.
        fix: &'static str,
    },
    /// `rte_eal_init` already ran in this process (DPDK allows it once).
    #[error(
        "DPDK's EAL was already initialised in this process and cannot be again (even after \
         cleanup): share the Eal handle (it is Clone), or start another process"
    )]
    AlreadyInitialized,
    /// `rte_eal_init` failed for another reason; EAL's own log above says more.
    #[error("rte_eal_init failed: {message} (rte_errno {errno}); EAL arguments: {args}")]
    EalInit {
        /// `rte_errno`.
        errno: i32,
        /// `rte_strerror(rte_errno)` and our reading of it.
        message: String,
        /// The EAL command line we passed.
        args: String,
    },
    /// A virtual device names a kernel interface that does not exist in this namespace.
    #[error(
        "vdev {vdev:?}: interface {interface:?} not found in this network namespace (check `ip \
         link`; af_packet/af_xdp vdevs bind the interface in the namespace the process is in at \
         Eal::init: run it under `ip netns exec NS`)"
    )]
    VdevInterfaceNotFound {
        /// The `--vdev` argument.
        vdev: String,
        /// Its `iface=` value.
        interface: String,
    },
    /// No DPDK port has this name.
    #[error(
        "DPDK device {name:?} not found (ports EAL probed: {available}); give it to EAL as a \
         virtual device (EalConfig::vdevs, e.g. \"net_af_packet0,iface=eth0\", then open \
         \"net_af_packet0\") or as a PCI device bound to vfio-pci (EalConfig::pci_allow, e.g. \
         \"0000:01:00.0\", then open \"0000:01:00.0\"; see `dpdk-devbind.py --status`)"
    )]
    DeviceNotFound {
        /// The name asked for.
        name: String,
        /// The names of the ports that exist, comma-separated (or `none`).
        available: String,
    },
    /// A configuration value is out of range or contradicts another.
    #[error("bad DPDK configuration: {0}")]
    BadConfig(String),
    /// An ethdev call failed.
    #[error("{op} failed on {port} ({device}): {message} (error {code})")]
    Device {
        /// The call.
        op: &'static str,
        /// The port.
        port: PortId,
        /// The device name.
        device: String,
        /// The negative errno DPDK returned.
        code: i32,
        /// `rte_strerror` of it.
        message: String,
    },
    /// The mbuf pool could not be created.
    #[error(
        "cannot create mempool {name:?} of {mbufs} mbufs x {data_room} bytes: {message}; reserve \
         more hugepages (scripts/hugepages.sh reserve N) or lower the queue or descriptor counts"
    )]
    MempoolCreate {
        /// The pool name.
        name: String,
        /// mbufs asked for.
        mbufs: u32,
        /// Data room per mbuf.
        data_room: u16,
        /// `rte_strerror(rte_errno)`.
        message: String,
    },
    /// The queue is already owned by another handle.
    #[error("{port} {queue:?} ({direction}) is already taken: each queue has one owner")]
    QueueTaken {
        /// The port.
        port: PortId,
        /// The queue.
        queue: QueueId,
        /// `rx` or `tx`.
        direction: &'static str,
    },
    /// Nobody answered the ARP requests for the next hop.
    #[error(
        "no ARP reply from {ip} on {port} within {waited_ms} ms: check the next-hop address, the \
         link and that the next hop is on the port's segment, or configure its MAC (NextHop::Mac)"
    )]
    ArpTimeout {
        /// The next hop.
        ip: Ipv4Addr,
        /// The port.
        port: PortId,
        /// How long we tried.
        waited_ms: u64,
    },
}

fn strerror(code: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local NUL-terminated string
    // for any value; we copy it out at once.
    unsafe { CStr::from_ptr(sys::rte_strerror(code.abs())) }
        .to_string_lossy()
        .into_owned()
}

fn rte_errno() -> i32 {
    // SAFETY: reads the calling thread's rte_errno; no preconditions.
    unsafe { sys::dpdk_sys_errno() }
}

// ---------------------------------------------------------------------------------------------
// EAL

/// How EAL gets its memory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MemoryMode {
    /// Hugepages from a mounted hugetlbfs, with EAL's runtime files under `/var/run/dpdk/PREFIX`
    /// (`--file-prefix`, default `rte`; give each concurrent DPDK process its own).
    Hugepages {
        /// `--file-prefix`.
        file_prefix: Option<String>,
    },
    /// Hugepages, no runtime files and no shared config (`--in-memory`): several processes
    /// never collide and hugetlbfs need not be mounted (pages are mapped anonymously), but
    /// pages must still be reserved.
    #[default]
    InMemory,
    /// Ordinary memory (`--no-huge`, with `-m` megabytes): for small tests on machines without
    /// hugepages. Slower, and not every driver accepts it; af_packet does.
    NoHuge {
        /// `-m`: megabytes EAL may use.
        megabytes: u32,
    },
}

/// How to start EAL. Every field becomes an EAL command-line argument (see [`EalConfig::args`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EalConfig {
    /// `argv[0]`: names the process in EAL's log (default `tcpcopy`).
    pub program: String,
    /// `-l`: the lcores, e.g. `"0"` or `"0-1"`. `None`: the first CPU the process may run on.
    pub lcores: Option<String>,
    /// `-n`: memory channels (a hint; `None` lets EAL decide).
    pub memory_channels: Option<u32>,
    /// `--vdev` devices, e.g. `"net_af_packet0,iface=eth0"` or `"net_af_xdp0,iface=eth1"`.
    pub vdevs: Vec<String>,
    /// `-a`: PCI devices to probe, e.g. `"0000:01:00.0"` (bound to vfio-pci beforehand).
    pub pci_allow: Vec<String>,
    /// `--no-pci`: skip the PCI bus (virtual devices only). Ignored when `pci_allow` is set.
    pub no_pci: bool,
    /// Hugepages, in-memory, or no hugepages at all.
    pub memory: MemoryMode,
    /// `--huge-dir`: the hugetlbfs mount to use (default: any mounted one).
    pub huge_dir: Option<PathBuf>,
    /// `--log-level`, e.g. `"warning"`, `"*:debug"`, `"pmd.net.af_packet:info"` (default `warning`).
    pub log_level: Option<String>,
    /// Keep EAL's telemetry socket (default false: `--no-telemetry`).
    pub telemetry: bool,
    /// More EAL arguments, passed last, verbatim.
    pub extra_args: Vec<String>,
    /// Leave the thread that calls [`Eal::init`] pinned to the main lcore's CPU, as EAL does
    /// (default false: its previous CPU affinity is restored, so threads it spawns later are not
    /// all confined to one CPU; pin workers explicitly instead).
    pub pin_main_thread: bool,
}

impl Default for EalConfig {
    fn default() -> EalConfig {
        EalConfig {
            program: "tcpcopy".to_owned(),
            lcores: None,
            memory_channels: None,
            vdevs: Vec::new(),
            pci_allow: Vec::new(),
            no_pci: false,
            memory: MemoryMode::default(),
            huge_dir: None,
            log_level: Some("warning".to_owned()),
            telemetry: false,
            extra_args: Vec::new(),
            pin_main_thread: false,
        }
    }
}

impl EalConfig {
    /// The EAL command line this configuration stands for, `argv[0]` first.
    ///
    /// # Errors
    /// [`DpdkError::BadConfig`] for contradictions (e.g. a file prefix in in-memory mode).
    pub fn args(&self) -> Result<Vec<String>, DpdkError> {
        let mut args = vec![self.program.clone()];
        args.push("-l".to_owned());
        args.push(match &self.lcores {
            Some(l) if l.trim().is_empty() => {
                return Err(DpdkError::BadConfig(
                    "lcores is empty (e.g. \"0\" or \"0-1\")".into(),
                ))
            }
            Some(l) => l.clone(),
            None => first_allowed_cpu().to_string(),
        });
        if let Some(n) = self.memory_channels {
            if n == 0 || n > 32 {
                return Err(DpdkError::BadConfig(format!(
                    "memory_channels {n} must be 1..=32"
                )));
            }
            args.push("-n".to_owned());
            args.push(n.to_string());
        }
        for vdev in &self.vdevs {
            if vdev.trim().is_empty() {
                return Err(DpdkError::BadConfig("an empty vdev".into()));
            }
            args.push(format!("--vdev={vdev}"));
        }
        for pci in &self.pci_allow {
            args.push("-a".to_owned());
            args.push(pci.clone());
        }
        if self.no_pci && self.pci_allow.is_empty() {
            args.push("--no-pci".to_owned());
        }
        match &self.memory {
            MemoryMode::Hugepages { file_prefix } => {
                if let Some(prefix) = file_prefix {
                    if prefix.is_empty() || prefix.contains('/') {
                        return Err(DpdkError::BadConfig(format!(
                            "file_prefix {prefix:?} must be a plain non-empty name"
                        )));
                    }
                    args.push(format!("--file-prefix={prefix}"));
                }
                // Unlink the hugepage files once mapped: the pages go back to the kernel when
                // the process ends, however it ends (no secondary processes, which we never use).
                args.push("--huge-unlink".to_owned());
            }
            MemoryMode::InMemory => args.push("--in-memory".to_owned()),
            MemoryMode::NoHuge { megabytes } => {
                if *megabytes == 0 {
                    return Err(DpdkError::BadConfig("NoHuge megabytes must be > 0".into()));
                }
                args.push("--no-huge".to_owned());
                args.push("-m".to_owned());
                args.push(megabytes.to_string());
                // No hugepages means no shared config either.
                args.push("--no-shconf".to_owned());
            }
        }
        if let Some(dir) = &self.huge_dir {
            if matches!(self.memory, MemoryMode::NoHuge { .. }) {
                return Err(DpdkError::BadConfig(
                    "huge_dir makes no sense with NoHuge".into(),
                ));
            }
            args.push(format!("--huge-dir={}", dir.display()));
        }
        if let Some(level) = &self.log_level {
            args.push(format!("--log-level={level}"));
        }
        if !self.telemetry {
            args.push("--no-telemetry".to_owned());
        }
        args.extend(self.extra_args.iter().cloned());
        Ok(args)
    }
}

fn first_allowed_cpu() -> usize {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t and the size passed is its size.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc == 0 {
        for cpu in 0..libc::CPU_SETSIZE as usize {
            // SAFETY: `cpu` is below CPU_SETSIZE and `set` is initialised.
            if unsafe { libc::CPU_ISSET(cpu, &set) } {
                return cpu;
            }
        }
    }
    0
}

/// Set once `rte_eal_init` has been called in this process (successfully or not: DPDK does not
/// support a second call either way).
static EAL_CLAIMED: AtomicBool = AtomicBool::new(false);

struct EalInner {
    args: Vec<String>,
    main_lcore: LcoreId,
    /// EAL's runtime folder (`/var/run/dpdk/PREFIX` for root), removed after cleanup.
    runtime_dir: PathBuf,
    /// EAL wrote its runtime files there (hugepage mode): ours to remove. Otherwise only the
    /// empty folder EAL may create is removed.
    owns_runtime_files: bool,
}

impl Drop for EalInner {
    fn drop(&mut self) {
        // SAFETY: the last handle is gone: every port, pool and mbuf that referred to EAL memory
        // has been released (a pool with mbufs still out keeps a leaked handle instead).
        unsafe {
            sys::rte_eal_cleanup();
        }
        // The primary process is gone from DPDK's point of view: its runtime files (shared
        // config, memseg arrays, multi-process socket) serve nobody. Best effort.
        if !self.owns_runtime_files {
            let _ = std::fs::remove_dir(&self.runtime_dir);
            return;
        }
        if let Ok(entries) = std::fs::read_dir(&self.runtime_dir) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&self.runtime_dir);
    }
}

/// Where EAL keeps its runtime files for `prefix` (as `eal_create_runtime_dir` decides).
fn runtime_dir(prefix: &str) -> PathBuf {
    // SAFETY: getuid has no preconditions.
    let base = if unsafe { libc::getuid() } == 0 {
        PathBuf::from("/var/run")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
    };
    base.join("dpdk").join(prefix)
}

/// The running EAL. Cloning is cheap; `rte_eal_cleanup` runs when the last clone, port and pool
/// are gone. See the module docs.
#[derive(Clone)]
pub struct Eal(Arc<EalInner>);

impl fmt::Debug for Eal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Eal")
            .field("args", &self.0.args)
            .field("main_lcore", &self.0.main_lcore)
            .finish()
    }
}

impl Eal {
    /// Starts EAL: checks what would make `rte_eal_init` fail obscurely (hugepages, the
    /// interfaces of af_packet/af_xdp vdevs), then calls it once for the process.
    ///
    /// # Errors
    /// [`DpdkError::NoHugepages`], [`DpdkError::VdevInterfaceNotFound`],
    /// [`DpdkError::AlreadyInitialized`] on a second call, [`DpdkError::BadConfig`],
    /// [`DpdkError::EalInit`] for what EAL itself rejects.
    pub fn init(config: &EalConfig) -> Result<Eal, DpdkError> {
        let args = config.args()?;
        if EAL_CLAIMED.load(Ordering::Acquire) {
            return Err(DpdkError::AlreadyInitialized);
        }
        check_vdev_interfaces(&config.vdevs)?;
        check_hugepages(&config.memory, config.huge_dir.as_deref(), Path::new("/"))?;
        let c_args: Vec<CString> = args
            .iter()
            .map(|a| {
                CString::new(a.as_str()).map_err(|_| {
                    DpdkError::BadConfig(format!("EAL argument {a:?} holds a NUL byte"))
                })
            })
            .collect::<Result<_, _>>()?;
        if EAL_CLAIMED.swap(true, Ordering::AcqRel) {
            return Err(DpdkError::AlreadyInitialized);
        }
        // EAL may keep pointers into argv and permutes it: give it storage that lives forever
        // (one small allocation per process).
        let argv: &mut [*mut libc::c_char] = Vec::leak(
            c_args
                .into_iter()
                .map(CString::into_raw)
                .chain(std::iter::once(ptr::null_mut()))
                .collect(),
        );
        let argc = (argv.len() - 1) as libc::c_int;
        // SAFETY: cpu_set_t is plain data; sched_getaffinity(0) fills it for this thread.
        let mut affinity: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `affinity` is a live cpu_set_t and the size passed is its size.
        let have_affinity = unsafe {
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut affinity)
        } == 0;
        // SAFETY: argv holds argc valid NUL-terminated strings followed by NULL, leaked so they
        // outlive EAL; this is the only rte_eal_init call of the process (EAL_CLAIMED).
        let rc = unsafe { sys::rte_eal_init(argc, argv.as_mut_ptr()) };
        if rc < 0 {
            let errno = rte_errno();
            return Err(eal_init_error(errno, &args, &config.memory));
        }
        if have_affinity && !config.pin_main_thread {
            // SAFETY: restores this thread's own earlier affinity mask.
            unsafe {
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &affinity);
            }
        }
        // SAFETY: EAL is initialised.
        let main_lcore = LcoreId(unsafe { sys::rte_get_main_lcore() });
        let prefix = match &config.memory {
            MemoryMode::Hugepages {
                file_prefix: Some(prefix),
            } => prefix.as_str(),
            _ => "rte",
        };
        Ok(Eal(Arc::new(EalInner {
            args,
            main_lcore,
            runtime_dir: runtime_dir(prefix),
            owns_runtime_files: matches!(config.memory, MemoryMode::Hugepages { .. }),
        })))
    }

    /// The EAL command line in force.
    pub fn args(&self) -> &[String] {
        &self.0.args
    }

    /// The main lcore (the thread that called [`Eal::init`]).
    pub fn main_lcore(&self) -> LcoreId {
        self.0.main_lcore
    }

    /// The calling thread's lcore id, `None` for a thread EAL does not know (see
    /// [`Eal::register_thread`]).
    pub fn current_lcore(&self) -> Option<LcoreId> {
        // SAFETY: reads a thread-local; EAL is initialised.
        let id = unsafe { sys::rte_lcore_id() };
        (id != sys::LCORE_ID_ANY).then_some(LcoreId(id))
    }

    /// Number of lcores EAL runs.
    pub fn lcore_count(&self) -> u32 {
        // SAFETY: EAL is initialised.
        unsafe { sys::rte_lcore_count() }
    }

    /// Gives the calling (non-EAL) thread an lcore id, so mempool operations from it use a
    /// per-lcore cache instead of the shared ring. Idempotent for a registered thread.
    ///
    /// # Errors
    /// [`DpdkError::BadConfig`] when EAL has no free lcore slot (`RTE_MAX_LCORE`).
    pub fn register_thread(&self) -> Result<LcoreId, DpdkError> {
        if let Some(id) = self.current_lcore() {
            return Ok(id);
        }
        // SAFETY: EAL is initialised; registers the calling thread only.
        let rc = unsafe { sys::rte_thread_register() };
        match self.current_lcore() {
            Some(id) if rc == 0 => Ok(id),
            _ => Err(DpdkError::BadConfig(format!(
                "rte_thread_register failed: {}",
                strerror(rte_errno())
            ))),
        }
    }

    /// The DPDK release the engine was built against, e.g. `22.11.11`.
    pub fn version() -> &'static str {
        sys::DPDK_VERSION
    }
}

fn eal_init_error(errno: i32, args: &[String], memory: &MemoryMode) -> DpdkError {
    let joined = args.join(" ");
    let hugepage_problem = !matches!(memory, MemoryMode::NoHuge { .. })
        && (errno == libc::EACCES || errno == libc::ENOMEM);
    if errno == libc::EALREADY {
        return DpdkError::AlreadyInitialized;
    }
    if hugepage_problem {
        return DpdkError::NoHugepages {
            detail: format!(
                "rte_eal_init could not get its memory ({}; EAL arguments: {joined})",
                strerror(errno)
            ),
            fix: "run scripts/hugepages.sh reserve 512 (and stop other DPDK processes that hold \
                  the pages)",
        };
    }
    let reading = match errno {
        libc::ENODEV | libc::ENOTSUP => {
            "a device could not be probed: check the vdev arguments and PCI addresses (vfio-pci \
             bound?)"
        }
        libc::EINVAL => "EAL rejected an argument",
        libc::EPROTO => "EAL could not read the CPU topology (lcores outside the machine?)",
        _ => "see EAL's log above",
    };
    DpdkError::EalInit {
        errno,
        message: format!("{}: {reading}", strerror(errno)),
        args: joined,
    }
}

/// The `iface=` value of an af_packet or af_xdp vdev argument.
fn vdev_interface(vdev: &str) -> Option<&str> {
    let mut parts = vdev.split(',');
    let driver = parts.next()?.trim();
    if !(driver.starts_with("net_af_packet") || driver.starts_with("net_af_xdp")) {
        return None;
    }
    parts.find_map(|kv| kv.trim().strip_prefix("iface="))
}

fn check_vdev_interfaces(vdevs: &[String]) -> Result<(), DpdkError> {
    for vdev in vdevs {
        let Some(interface) = vdev_interface(vdev) else {
            continue;
        };
        let missing = match CString::new(interface) {
            // SAFETY: `name` is a valid NUL-terminated string for the call.
            Ok(name) => (unsafe { libc::if_nametoindex(name.as_ptr()) }) == 0,
            Err(_) => true,
        };
        if missing {
            return Err(DpdkError::VdevInterfaceNotFound {
                vdev: vdev.clone(),
                interface: interface.to_owned(),
            });
        }
    }
    Ok(())
}

/// Free hugepages per page size in kB, from `ROOT/sys/kernel/mm/hugepages`.
fn free_hugepages(root: &Path) -> Vec<(u64, u64)> {
    let mut sizes = Vec::new();
    let Ok(dir) = std::fs::read_dir(root.join("sys/kernel/mm/hugepages")) else {
        return sizes;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(kb) = name
            .to_str()
            .and_then(|n| n.strip_prefix("hugepages-"))
            .and_then(|n| n.strip_suffix("kB"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let free = std::fs::read_to_string(entry.path().join("free_hugepages"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0);
        sizes.push((kb, free));
    }
    sizes.sort_unstable();
    sizes
}

/// hugetlbfs mounts as (mount point, page size in kB) from a `/proc/mounts` text; a mount
/// without `pagesize=` has the default size `default_kb`.
fn hugetlbfs_mounts(mounts: &str, default_kb: u64) -> Vec<(PathBuf, u64)> {
    mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 4 || fields[2] != "hugetlbfs" {
                return None;
            }
            let kb = fields[3]
                .split(',')
                .find_map(|o| o.strip_prefix("pagesize="))
                .and_then(parse_size_kb)
                .unwrap_or(default_kb);
            Some((PathBuf::from(fields[1].replace("\\040", " ")), kb))
        })
        .collect()
}

/// `2M`, `1024M`, `1G`, `2048k` -> kB.
fn parse_size_kb(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let number: u64 = number.parse().ok()?;
    match unit.to_ascii_lowercase().as_str() {
        "k" | "kb" => Some(number),
        "m" | "mb" => Some(number * 1024),
        "g" | "gb" => Some(number * 1024 * 1024),
        _ => None,
    }
}

/// Fails with [`DpdkError::NoHugepages`] when EAL would find no memory: no free hugepages, or
/// (outside in-memory mode) no hugetlbfs mounted for a size that has free pages. `root` is `/`
/// except in tests.
fn check_hugepages(
    memory: &MemoryMode,
    huge_dir: Option<&Path>,
    root: &Path,
) -> Result<(), DpdkError> {
    if matches!(memory, MemoryMode::NoHuge { .. }) {
        return Ok(());
    }
    let sizes = free_hugepages(root);
    let with_free: Vec<u64> = sizes
        .iter()
        .filter(|(_, f)| *f > 0)
        .map(|(kb, _)| *kb)
        .collect();
    if with_free.is_empty() {
        return Err(DpdkError::NoHugepages {
            detail: "no free hugepages of any size (/sys/kernel/mm/hugepages/*/free_hugepages \
                     are all 0)"
                .to_owned(),
            fix: "run scripts/hugepages.sh reserve 512 (or, for a small test, MemoryMode::NoHuge)",
        });
    }
    if matches!(memory, MemoryMode::InMemory) && huge_dir.is_none() {
        return Ok(());
    }
    let meminfo = std::fs::read_to_string(root.join("proc/meminfo")).unwrap_or_default();
    let default_kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Hugepagesize:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(2048);
    let mounts_text = std::fs::read_to_string(root.join("proc/mounts")).unwrap_or_default();
    let mounts = hugetlbfs_mounts(&mounts_text, default_kb);
    let usable: Vec<&(PathBuf, u64)> = mounts
        .iter()
        .filter(|(dir, kb)| with_free.contains(kb) && huge_dir.is_none_or(|d| d == dir))
        .collect();
    if usable.is_empty() {
        let detail = match huge_dir {
            Some(dir) => format!(
                "{} is not a mounted hugetlbfs with free pages (hugetlbfs mounts: {:?})",
                dir.display(),
                mounts
            ),
            None if mounts.is_empty() => "no hugetlbfs is mounted".to_owned(),
            None => format!(
                "no hugetlbfs mount has a page size with free pages (mounts: {mounts:?}, free \
                 sizes in kB: {with_free:?})"
            ),
        };
        return Err(DpdkError::NoHugepages {
            detail,
            fix: "run scripts/hugepages.sh reserve 512 (it mounts hugetlbfs too), or use \
                  in-memory mode (MemoryMode::InMemory needs no mount)",
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mempool and Mbuf

/// What a pool must hold; [`MempoolSizing::mbufs`] turns it into a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MempoolSizing {
    /// Receive queues drawing from the pool.
    pub rx_queues: u16,
    /// Descriptors per receive queue.
    pub rx_descriptors: u16,
    /// Transmit queues sending mbufs of the pool.
    pub tx_queues: u16,
    /// Descriptors per transmit queue.
    pub tx_descriptors: u16,
    /// mbufs one burst holds in the application ([`BURST`]).
    pub burst: u16,
    /// lcores with a per-lcore cache.
    pub lcores: u16,
    /// Per-lcore cache size.
    pub cache_size: u32,
    /// mbufs the application keeps beyond a burst (packets buffered by sessions, ARP, ...).
    pub session_buffers: u32,
}

impl MempoolSizing {
    /// The pool size:
    ///
    /// ```text
    /// n = rx_queues × rx_descriptors        every RX descriptor holds an mbuf
    ///   + tx_queues × tx_descriptors        every TX descriptor may hold one until completion
    ///   + (rx_queues + tx_queues) × burst   the bursts the application holds
    ///   + lcores × cache_size               per-lcore caches may hide that many
    ///   + session_buffers                   what the application keeps
    /// ```
    /// rounded up to `2^k − 1` (DPDK's pool ring holds `2^k − 1` best), at least 1023.
    pub fn mbufs(&self) -> u32 {
        let n = u64::from(self.rx_queues) * u64::from(self.rx_descriptors)
            + u64::from(self.tx_queues) * u64::from(self.tx_descriptors)
            + (u64::from(self.rx_queues) + u64::from(self.tx_queues)) * u64::from(self.burst)
            + u64::from(self.lcores) * u64::from(self.cache_size)
            + u64::from(self.session_buffers);
        let rounded = (n + 1).next_power_of_two() - 1;
        u32::try_from(rounded.max(1023)).unwrap_or(u32::MAX)
    }
}

struct MempoolInner {
    pool: NonNull<sys::rte_mempool>,
    name: String,
    mbufs: u32,
    data_room: u16,
    eal: Eal,
}

// SAFETY: rte_mempool is a multi-producer/multi-consumer structure meant to be shared between
// threads; the pointer is only freed in Drop, when no handle is left.
unsafe impl Send for MempoolInner {}
// SAFETY: as above; every operation through a shared reference is thread-safe in DPDK.
unsafe impl Sync for MempoolInner {}

impl Drop for MempoolInner {
    fn drop(&mut self) {
        // SAFETY: the pool pointer is valid until freed below.
        let in_use = unsafe { sys::rte_mempool_in_use_count(self.pool.as_ptr()) };
        if in_use == 0 {
            // SAFETY: no handle and no mbuf of the pool is left.
            unsafe { sys::rte_mempool_free(self.pool.as_ptr()) };
        } else {
            // mbufs are still out (held by a caller): freeing the pool, or cleaning up EAL,
            // would leave them dangling. Leak both instead.
            std::mem::forget(self.eal.clone());
        }
    }
}

/// A pool of packet buffers (`rte_pktmbuf_pool_create`). Cloning is cheap.
#[derive(Clone)]
pub struct Mempool(Arc<MempoolInner>);

impl fmt::Debug for Mempool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mempool")
            .field("name", &self.0.name)
            .field("mbufs", &self.0.mbufs)
            .field("data_room", &self.0.data_room)
            .field("available", &self.available())
            .finish()
    }
}

impl Mempool {
    /// Creates a pool of `mbufs` buffers with `data_room` bytes each (headroom included; at
    /// least [`DEFAULT_DATA_ROOM`] for standard frames), a per-lcore cache of `cache_size`, on
    /// NUMA node `socket` (`None`: any).
    ///
    /// # Errors
    /// [`DpdkError::BadConfig`] for a bad name or sizes, [`DpdkError::MempoolCreate`] when DPDK
    /// has not the memory (or the name is taken).
    pub fn new(
        eal: &Eal,
        name: &str,
        mbufs: u32,
        cache_size: u32,
        data_room: u16,
        socket: Option<i32>,
    ) -> Result<Mempool, DpdkError> {
        // RTE_MEMPOOL_NAMESIZE is 26 (memzone name minus the "MP_" prefix).
        if name.is_empty() || name.len() > 24 || name.contains('\0') {
            return Err(DpdkError::BadConfig(format!(
                "mempool name {name:?} must be 1..=24 bytes"
            )));
        }
        if mbufs == 0 || cache_size > 512 || cache_size > mbufs / 2 {
            return Err(DpdkError::BadConfig(format!(
                "mempool of {mbufs} mbufs with cache {cache_size}: need mbufs > 0, cache <= 512 \
                 and <= mbufs / 2"
            )));
        }
        if usize::from(data_room) < sys::RTE_PKTMBUF_HEADROOM as usize + ethernet::HEADER_LEN {
            return Err(DpdkError::BadConfig(format!(
                "mbuf data room {data_room} too small"
            )));
        }
        let c_name = CString::new(name).map_err(|_| DpdkError::BadConfig(name.to_owned()))?;
        // SAFETY: EAL is initialised (we hold it); the name is a valid C string for the call.
        let pool = unsafe {
            sys::rte_pktmbuf_pool_create(
                c_name.as_ptr(),
                mbufs,
                cache_size,
                0,
                data_room,
                socket.unwrap_or(sys::SOCKET_ID_ANY),
            )
        };
        let Some(pool) = NonNull::new(pool) else {
            return Err(DpdkError::MempoolCreate {
                name: name.to_owned(),
                mbufs,
                data_room,
                message: strerror(rte_errno()),
            });
        };
        Ok(Mempool(Arc::new(MempoolInner {
            pool,
            name: name.to_owned(),
            mbufs,
            data_room,
            eal: eal.clone(),
        })))
    }

    /// Buffers in the pool.
    pub fn capacity(&self) -> u32 {
        self.0.mbufs
    }

    /// Buffers free right now (in the pool's ring and the per-lcore caches).
    pub fn available(&self) -> u32 {
        // SAFETY: the pool is alive while we hold it.
        unsafe { sys::rte_mempool_avail_count(self.0.pool.as_ptr()) }
    }

    /// Data room of each buffer (headroom included).
    pub fn data_room(&self) -> u16 {
        self.0.data_room
    }

    fn as_ptr(&self) -> *mut sys::rte_mempool {
        self.0.pool.as_ptr()
    }
}

/// One packet buffer; returns to its pool on drop. Only the first segment's bytes are visible.
#[repr(transparent)]
pub struct Mbuf(NonNull<sys::rte_mbuf>);

// SAFETY: an mbuf has one owner (this value); DPDK lets any thread free or send it.
unsafe impl Send for Mbuf {}

impl fmt::Debug for Mbuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mbuf")
            .field("len", &self.len())
            .field("pkt_len", &self.pkt_len())
            .finish()
    }
}

impl Drop for Mbuf {
    fn drop(&mut self) {
        // SAFETY: we own the mbuf (nothing else frees it: into_raw forgets self).
        unsafe { sys::rte_pktmbuf_free(self.0.as_ptr()) }
    }
}

impl Mbuf {
    /// Takes an empty buffer from `pool`; `None` when the pool is exhausted.
    pub fn alloc(pool: &Mempool) -> Option<Mbuf> {
        // SAFETY: the pool is alive; the result is checked for NULL.
        NonNull::new(unsafe { sys::rte_pktmbuf_alloc(pool.as_ptr()) }).map(Mbuf)
    }

    /// Wraps a raw mbuf, taking ownership.
    ///
    /// # Safety
    /// `raw` must be a valid mbuf that nothing else owns or frees, whose pool outlives it.
    pub unsafe fn from_raw(raw: NonNull<sys::rte_mbuf>) -> Mbuf {
        Mbuf(raw)
    }

    /// Gives up ownership without freeing (the caller hands it to DPDK, which frees it).
    pub fn into_raw(self) -> NonNull<sys::rte_mbuf> {
        let raw = self.0;
        std::mem::forget(self);
        raw
    }

    fn raw(&self) -> &sys::rte_mbuf {
        // SAFETY: we own a valid mbuf for as long as `self` lives.
        unsafe { self.0.as_ref() }
    }

    /// Bytes in the first segment.
    pub fn len(&self) -> usize {
        usize::from(self.raw().data_len)
    }

    /// True when the first segment holds no data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the whole packet (all segments).
    pub fn pkt_len(&self) -> usize {
        self.raw().pkt_len as usize
    }

    /// The first segment's bytes.
    pub fn data(&self) -> &[u8] {
        let m = self.raw();
        // SAFETY: buf_addr + data_off .. + data_len lies inside the mbuf's buffer, which we own
        // and which nobody writes while we hold `&self`.
        unsafe {
            std::slice::from_raw_parts(
                m.buf_addr.cast::<u8>().add(usize::from(m.data_off)),
                usize::from(m.data_len),
            )
        }
    }

    /// The first segment's bytes, writable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `data`, and `&mut self` makes the access exclusive.
        unsafe {
            let m = self.0.as_mut();
            std::slice::from_raw_parts_mut(
                m.buf_addr.cast::<u8>().add(usize::from(m.data_off)),
                usize::from(m.data_len),
            )
        }
    }

    /// Grows the data at the end by `len` bytes and returns them (uninitialised contents from
    /// earlier use; write them all); `None` when the tailroom is too small.
    pub fn append(&mut self, len: usize) -> Option<&mut [u8]> {
        let len16 = u16::try_from(len).ok()?;
        // SAFETY: we own the mbuf; rte_pktmbuf_append returns NULL or a pointer to `len` bytes
        // inside the buffer that now belong to the data.
        let start = unsafe { sys::rte_pktmbuf_append(self.0.as_ptr(), len16) };
        let start = NonNull::new(start.cast::<u8>())?;
        // SAFETY: `len` bytes at `start` are inside our buffer and exclusively ours.
        Some(unsafe { std::slice::from_raw_parts_mut(start.as_ptr(), len) })
    }

    /// Grows the data at the front by `len` bytes and returns them; `None` when the headroom
    /// is too small.
    pub fn prepend(&mut self, len: usize) -> Option<&mut [u8]> {
        let len16 = u16::try_from(len).ok()?;
        // SAFETY: as in `append`, at the front.
        let start = unsafe { sys::rte_pktmbuf_prepend(self.0.as_ptr(), len16) };
        let start = NonNull::new(start.cast::<u8>())?;
        // SAFETY: `len` bytes at `start` are inside our buffer and exclusively ours.
        Some(unsafe { std::slice::from_raw_parts_mut(start.as_ptr(), len) })
    }

    /// Asks the device to compute checksums on transmit: ORs `flags` (`RTE_MBUF_F_TX_*`) into
    /// the offload flags and sets the header lengths.
    pub fn set_tx_offload(&mut self, flags: u64, l2_len: u16, l3_len: u16, l4_len: u16) {
        // SAFETY: we own the mbuf; the helper writes only its offload fields.
        unsafe { sys::dpdk_sys_mbuf_set_tx_offload(self.0.as_ptr(), flags, l2_len, l3_len, l4_len) }
    }

    /// Transmit offload flags set so far.
    pub fn tx_offload_flags(&self) -> u64 {
        self.raw().ol_flags
    }
}

// ---------------------------------------------------------------------------------------------
// Ports

/// Where transmitted frames go on the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NextHop {
    /// Receive only: [`DpdkPort::tx_queue`] refuses.
    #[default]
    None,
    /// This destination MAC.
    Mac(MacAddr),
    /// Resolve `ip` by ARP on the port at open (requests from `source`, or `0.0.0.0` as an ARP
    /// probe), waiting at most `timeout_ms`; later ARP traffic from `ip` seen on the port's
    /// queue 0 updates it.
    Arp {
        /// The next hop's address.
        ip: Ipv4Addr,
        /// Sender address of our requests.
        source: Option<Ipv4Addr>,
        /// How long to wait for a reply (requests are repeated every 200 ms).
        timeout_ms: u32,
    },
}

/// Whether [`DpdkTx`] touches the TCP checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcpChecksum {
    /// Leave it as handed in (the pipeline computed it, as for a raw socket).
    #[default]
    AsGiven,
    /// Compute it: by the device when it offers `RTE_ETH_TX_OFFLOAD_TCP_CKSUM`, in software
    /// otherwise.
    Compute,
}

/// How to open a [`DpdkPort`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// The device name: a vdev (`net_af_packet0`) or a PCI address (`0000:01:00.0`).
    pub device: String,
    /// Receive queues (default 1). With more than one, RSS with a symmetric key spreads flows
    /// when the device supports it (both directions of a flow land on the same queue).
    pub rx_queues: u16,
    /// Transmit queues (default 1).
    pub tx_queues: u16,
    /// Descriptors per receive queue (default 1024; the device may adjust).
    pub rx_descriptors: u16,
    /// Descriptors per transmit queue (default 1024; the device may adjust).
    pub tx_descriptors: u16,
    /// Put the port in promiscuous mode (default true: a mirror port sees foreign MACs).
    pub promiscuous: bool,
    /// Set this MTU (default: the device's).
    pub mtu: Option<u16>,
    /// Destination MAC of transmitted frames.
    pub next_hop: NextHop,
    /// TCP checksum on transmit.
    pub tcp_checksum: TcpChecksum,
    /// mbufs the application keeps beyond bursts, for the pool size ([`MempoolSizing`]).
    pub session_buffers: u32,
    /// Per-lcore mempool cache (default 256).
    pub mempool_cache: u32,
    /// Data room per mbuf (default [`DEFAULT_DATA_ROOM`]; raise it for jumbo frames).
    pub data_room: u16,
    /// How long `open` waits for the link to come up (default 3000 ms; 0: not at all).
    pub link_wait_ms: u32,
}

impl Default for PortConfig {
    fn default() -> PortConfig {
        PortConfig {
            device: String::new(),
            rx_queues: 1,
            tx_queues: 1,
            rx_descriptors: 1024,
            tx_descriptors: 1024,
            promiscuous: true,
            mtu: None,
            next_hop: NextHop::None,
            tcp_checksum: TcpChecksum::AsGiven,
            session_buffers: 0,
            mempool_cache: 256,
            data_room: DEFAULT_DATA_ROOM,
            link_wait_ms: 3000,
        }
    }
}

/// What `open` found and chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// The driver, e.g. `net_af_packet`.
    pub driver: String,
    /// Receive queues configured.
    pub rx_queues: u16,
    /// Transmit queues configured.
    pub tx_queues: u16,
    /// Descriptors per receive queue, after the device's adjustment.
    pub rx_descriptors: u16,
    /// Descriptors per transmit queue, after the device's adjustment.
    pub tx_descriptors: u16,
    /// RSS is on (more than one RX queue and the device supports it).
    pub rss: bool,
    /// The device computes IPv4 header checksums on transmit.
    pub tx_ipv4_checksum_offload: bool,
    /// The device computes TCP checksums on transmit.
    pub tx_tcp_checksum_offload: bool,
    /// NUMA node of the device (`None`: unknown).
    pub socket: Option<i32>,
}

/// Link state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    /// Link up.
    pub up: bool,
    /// Speed in Mbit/s (0: unknown).
    pub speed_mbps: u32,
    /// Full duplex.
    pub full_duplex: bool,
}

/// The device's own counters (`rte_eth_stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceStats {
    /// Frames received.
    pub ipackets: u64,
    /// Frames sent.
    pub opackets: u64,
    /// Bytes received.
    pub ibytes: u64,
    /// Bytes sent.
    pub obytes: u64,
    /// Frames dropped by the device because the RX queues were full.
    pub imissed: u64,
    /// Erroneous frames received.
    pub ierrors: u64,
    /// Frames the device failed to send.
    pub oerrors: u64,
    /// Frames dropped for want of an mbuf.
    pub rx_nombuf: u64,
}

/// "Next hop MAC known" flag in [`PortShared::next_hop_mac`] (bit 48, above the address).
const MAC_KNOWN: u64 = 1 << 48;

struct PortShared {
    id: PortId,
    name: String,
    mac: MacAddr,
    info: PortInfo,
    tcp_checksum: TcpChecksum,
    /// The next hop's MAC | MAC_KNOWN, or 0.
    next_hop_mac: AtomicU64,
    /// The next hop's address when it is learned by ARP.
    next_hop_ip: Option<Ipv4Addr>,
    rx_taken: AtomicU64,
    tx_taken: AtomicU64,
    // Dropped after the device is closed (field order), then the EAL handle inside it.
    mempool: Mempool,
}

impl Drop for PortShared {
    fn drop(&mut self) {
        // SAFETY: no queue handle is left (each holds an Arc of this); stop and close release
        // the descriptors' mbufs back to the pool before the pool goes.
        unsafe {
            sys::rte_eth_dev_stop(self.id.0);
            sys::rte_eth_dev_close(self.id.0);
        }
    }
}

impl PortShared {
    fn device_error(&self, op: &'static str, code: i32) -> DpdkError {
        DpdkError::Device {
            op,
            port: self.id,
            device: self.name.clone(),
            code,
            message: strerror(code),
        }
    }

    fn next_hop(&self) -> Option<MacAddr> {
        let v = self.next_hop_mac.load(Ordering::Relaxed);
        (v & MAC_KNOWN != 0).then(|| MacAddr::from_u64(v))
    }

    fn set_next_hop(&self, mac: MacAddr) {
        self.next_hop_mac
            .store(mac.to_u64() | MAC_KNOWN, Ordering::Relaxed);
    }

    fn device_stats(&self) -> Result<DeviceStats, DpdkError> {
        let mut s = sys::rte_eth_stats::default();
        // SAFETY: the port is started and `s` is a live rte_eth_stats.
        let rc = unsafe { sys::rte_eth_stats_get(self.id.0, &mut s) };
        if rc != 0 {
            return Err(self.device_error("rte_eth_stats_get", rc));
        }
        Ok(DeviceStats {
            ipackets: s.ipackets,
            opackets: s.opackets,
            ibytes: s.ibytes,
            obytes: s.obytes,
            imissed: s.imissed,
            ierrors: s.ierrors,
            oerrors: s.oerrors,
            rx_nombuf: s.rx_nombuf,
        })
    }
}

/// An open, started DPDK port. Cloning is cheap; the device stops and closes when the last
/// clone and queue handle are gone.
#[derive(Clone)]
pub struct DpdkPort(Arc<PortShared>);

impl fmt::Debug for DpdkPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpdkPort")
            .field("id", &self.0.id)
            .field("device", &self.0.name)
            .field("mac", &self.0.mac)
            .field("info", &self.0.info)
            .field("next_hop", &self.0.next_hop())
            .finish()
    }
}

/// The symmetric Toeplitz key: `0x6d5a` repeated. With it the hash of (src, dst) equals that
/// of (dst, src), so both directions of a connection land on the same queue.
pub fn symmetric_rss_key(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| if i % 2 == 0 { 0x6d } else { 0x5a })
        .collect()
}

fn port_names() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: EAL is initialised; rte_eth_find_next returns RTE_MAX_ETHPORTS past the last.
    let mut id = unsafe { sys::rte_eth_find_next(0) };
    while u32::from(id) < sys::RTE_MAX_ETHPORTS {
        let mut buf = [0 as libc::c_char; sys::RTE_ETH_NAME_MAX_LEN as usize];
        // SAFETY: `buf` has RTE_ETH_NAME_MAX_LEN bytes, as the call requires.
        if unsafe { sys::rte_eth_dev_get_name_by_port(id, buf.as_mut_ptr()) } == 0 {
            // SAFETY: the call wrote a NUL-terminated name into `buf`.
            names.push(
                unsafe { CStr::from_ptr(buf.as_ptr()) }
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        // SAFETY: as above.
        id = unsafe { sys::rte_eth_find_next(id + 1) };
    }
    names
}

impl DpdkPort {
    /// Opens the device named `config.device`: configures its queues (RSS with a symmetric key
    /// when there are several RX queues and the device has RSS; checksum offloads it offers),
    /// creates its mbuf pool ([`MempoolSizing`]), starts it, waits for the link (bounded by
    /// `link_wait_ms`) and resolves the next hop when asked to.
    ///
    /// # Errors
    /// [`DpdkError::DeviceNotFound`] naming the device and the ports that exist,
    /// [`DpdkError::BadConfig`], [`DpdkError::MempoolCreate`], [`DpdkError::Device`] for a failed
    /// ethdev call, [`DpdkError::ArpTimeout`].
    pub fn open(eal: &Eal, config: &PortConfig) -> Result<DpdkPort, DpdkError> {
        let c_name = CString::new(config.device.as_str())
            .map_err(|_| DpdkError::BadConfig(format!("device name {:?}", config.device)))?;
        let mut raw_id = 0u16;
        // SAFETY: EAL is initialised; the name is a valid C string; raw_id is written on success.
        let rc = unsafe { sys::rte_eth_dev_get_port_by_name(c_name.as_ptr(), &mut raw_id) };
        if rc != 0 || config.device.is_empty() {
            let names = port_names();
            return Err(DpdkError::DeviceNotFound {
                name: config.device.clone(),
                available: if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                },
            });
        }
        let id = PortId(raw_id);
        for (what, n) in [
            ("rx_queues", config.rx_queues),
            ("tx_queues", config.tx_queues),
        ] {
            if n == 0 || n > MAX_QUEUES {
                return Err(DpdkError::BadConfig(format!(
                    "{what} {n} must be 1..={MAX_QUEUES}"
                )));
            }
        }
        if config.rx_descriptors == 0 || config.tx_descriptors == 0 {
            return Err(DpdkError::BadConfig("descriptor counts must be > 0".into()));
        }

        let fail = |op: &'static str, code: i32| DpdkError::Device {
            op,
            port: id,
            device: config.device.clone(),
            code,
            message: strerror(code),
        };

        let mut dev_info = sys::rte_eth_dev_info::default();
        // SAFETY: the port id is valid; dev_info is a live struct the call fills.
        let rc = unsafe { sys::rte_eth_dev_info_get(id.0, &mut dev_info) };
        if rc != 0 {
            return Err(fail("rte_eth_dev_info_get", rc));
        }
        let driver = if dev_info.driver_name.is_null() {
            String::new()
        } else {
            // SAFETY: a non-NULL driver name is a static NUL-terminated string of the driver.
            unsafe { CStr::from_ptr(dev_info.driver_name) }
                .to_string_lossy()
                .into_owned()
        };
        if config.rx_queues > dev_info.max_rx_queues || config.tx_queues > dev_info.max_tx_queues {
            return Err(DpdkError::BadConfig(format!(
                "{} ({driver}) has at most {} RX and {} TX queues; asked for {} and {} (for \
                 net_af_packet, add qpairs=N to the vdev)",
                config.device,
                dev_info.max_rx_queues,
                dev_info.max_tx_queues,
                config.rx_queues,
                config.tx_queues
            )));
        }

        let mut conf = sys::rte_eth_conf::default();
        let key_len = match dev_info.hash_key_size {
            0 => RSS_KEY_LEN,
            n => usize::from(n),
        };
        // Read by rte_eth_dev_configure only (copied into the device); lives until then.
        let mut rss_key = symmetric_rss_key(key_len);
        let wanted_hf = sys::DPDK_SYS_RSS_IP | sys::DPDK_SYS_RSS_TCP | sys::DPDK_SYS_RSS_UDP;
        let rss_hf = wanted_hf & dev_info.flow_type_rss_offloads;
        let rss = config.rx_queues > 1 && rss_hf != 0;
        if rss {
            conf.rxmode.mq_mode = sys::RTE_ETH_MQ_RX_RSS;
            conf.rx_adv_conf.rss_conf.rss_key = rss_key.as_mut_ptr();
            conf.rx_adv_conf.rss_conf.rss_key_len = key_len as u8;
            conf.rx_adv_conf.rss_conf.rss_hf = rss_hf;
        }
        let capa = dev_info.tx_offload_capa;
        let ip_offload = capa & sys::DPDK_SYS_TX_OFFLOAD_IPV4_CKSUM != 0;
        let tcp_offload = config.tcp_checksum == TcpChecksum::Compute
            && capa & sys::DPDK_SYS_TX_OFFLOAD_TCP_CKSUM != 0;
        if ip_offload {
            conf.txmode.offloads |= sys::DPDK_SYS_TX_OFFLOAD_IPV4_CKSUM;
        }
        if tcp_offload {
            conf.txmode.offloads |= sys::DPDK_SYS_TX_OFFLOAD_TCP_CKSUM;
        }
        // Every mbuf comes from one pool with refcount 1: the driver may free them fast.
        if capa & sys::DPDK_SYS_TX_OFFLOAD_MBUF_FAST_FREE != 0 {
            conf.txmode.offloads |= sys::DPDK_SYS_TX_OFFLOAD_MBUF_FAST_FREE;
        }
        if let Some(mtu) = config.mtu {
            conf.rxmode.mtu = u32::from(mtu);
        }
        // SAFETY: valid port, conf is a live struct; the key it points to outlives the call.
        let rc =
            unsafe { sys::rte_eth_dev_configure(id.0, config.rx_queues, config.tx_queues, &conf) };
        drop(rss_key);
        if rc != 0 {
            return Err(fail("rte_eth_dev_configure", rc));
        }
        let (mut rxd, mut txd) = (config.rx_descriptors, config.tx_descriptors);
        // SAFETY: valid, configured port; the counts are live u16s the call may lower or raise.
        let rc = unsafe { sys::rte_eth_dev_adjust_nb_rx_tx_desc(id.0, &mut rxd, &mut txd) };
        if rc != 0 {
            return Err(fail("rte_eth_dev_adjust_nb_rx_tx_desc", rc));
        }
        // SAFETY: valid port.
        let socket = match unsafe { sys::rte_eth_dev_socket_id(id.0) } {
            s if s < 0 => None,
            s => Some(s),
        };

        let sizing = MempoolSizing {
            rx_queues: config.rx_queues,
            rx_descriptors: rxd,
            tx_queues: config.tx_queues,
            tx_descriptors: txd,
            burst: BURST as u16,
            lcores: u16::try_from(eal.lcore_count()).unwrap_or(u16::MAX),
            cache_size: config.mempool_cache,
            session_buffers: config.session_buffers,
        };
        let mbufs = sizing.mbufs();
        let mempool = Mempool::new(
            eal,
            &format!("tcpcopy_p{}", id.0),
            mbufs,
            config.mempool_cache.min(mbufs / 2),
            config.data_room,
            socket,
        )?;
        let socket_arg = socket.map_or(sys::SOCKET_ID_ANY as u32, |s| s as u32);
        for q in 0..config.rx_queues {
            // SAFETY: valid configured port; NULL rxconf means the device defaults; the pool
            // outlives the port (the port holds it).
            let rc = unsafe {
                sys::rte_eth_rx_queue_setup(id.0, q, rxd, socket_arg, ptr::null(), mempool.as_ptr())
            };
            if rc != 0 {
                return Err(fail("rte_eth_rx_queue_setup", rc));
            }
        }
        let mut txconf = dev_info.default_txconf;
        txconf.offloads = conf.txmode.offloads;
        for q in 0..config.tx_queues {
            // SAFETY: valid configured port; txconf is a live struct for the call.
            let rc = unsafe { sys::rte_eth_tx_queue_setup(id.0, q, txd, socket_arg, &txconf) };
            if rc != 0 {
                return Err(fail("rte_eth_tx_queue_setup", rc));
            }
        }
        // From here on the port must be closed on error: PortShared's Drop does it.
        let mut mac = sys::rte_ether_addr::default();
        // SAFETY: valid port; `mac` is a live rte_ether_addr.
        let rc = unsafe { sys::rte_eth_macaddr_get(id.0, &mut mac) };
        if rc != 0 {
            // SAFETY: configured, not started: close it.
            unsafe { sys::rte_eth_dev_close(id.0) };
            return Err(fail("rte_eth_macaddr_get", rc));
        }
        let shared = Arc::new(PortShared {
            id,
            name: config.device.clone(),
            mac: MacAddr(mac.addr_bytes),
            info: PortInfo {
                driver,
                rx_queues: config.rx_queues,
                tx_queues: config.tx_queues,
                rx_descriptors: rxd,
                tx_descriptors: txd,
                rss,
                tx_ipv4_checksum_offload: ip_offload,
                tx_tcp_checksum_offload: tcp_offload,
                socket,
            },
            tcp_checksum: config.tcp_checksum,
            next_hop_mac: AtomicU64::new(match config.next_hop {
                NextHop::Mac(m) => m.to_u64() | MAC_KNOWN,
                _ => 0,
            }),
            next_hop_ip: match config.next_hop {
                NextHop::Arp { ip, .. } => Some(ip),
                _ => None,
            },
            rx_taken: AtomicU64::new(0),
            tx_taken: AtomicU64::new(0),
            mempool,
        });
        if config.promiscuous {
            // SAFETY: valid port.
            let rc = unsafe { sys::rte_eth_promiscuous_enable(id.0) };
            if rc != 0 && rc != -libc::ENOTSUP {
                return Err(shared.device_error("rte_eth_promiscuous_enable", rc));
            }
        }
        // SAFETY: valid, configured port with every queue set up.
        let rc = unsafe { sys::rte_eth_dev_start(id.0) };
        if rc != 0 {
            return Err(shared.device_error("rte_eth_dev_start", rc));
        }
        let port = DpdkPort(shared);
        port.wait_link(Duration::from_millis(u64::from(config.link_wait_ms)));
        if let NextHop::Arp {
            ip,
            source,
            timeout_ms,
        } = config.next_hop
        {
            let mac = port.resolve_arp(
                ip,
                source.unwrap_or(Ipv4Addr::UNSPECIFIED),
                Duration::from_millis(u64::from(timeout_ms)),
            )?;
            port.0.set_next_hop(mac);
        }
        Ok(port)
    }

    #[allow(clippy::disallowed_methods)] // set-up path, not the worker loop
    fn wait_link(&self, limit: Duration) {
        let start = Instant::now();
        while !self.link().up && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The port id.
    pub fn id(&self) -> PortId {
        self.0.id
    }

    /// The device name it was opened by.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The port's MAC address (source of transmitted frames).
    pub fn mac(&self) -> MacAddr {
        self.0.mac
    }

    /// What `open` found and chose.
    pub fn info(&self) -> &PortInfo {
        &self.0.info
    }

    /// The port's mbuf pool.
    pub fn mempool(&self) -> &Mempool {
        &self.0.mempool
    }

    /// The next hop's MAC, when configured or learned.
    pub fn next_hop(&self) -> Option<MacAddr> {
        self.0.next_hop()
    }

    /// The link state now (does not wait).
    pub fn link(&self) -> LinkState {
        let mut link = sys::rte_eth_link::default();
        // SAFETY: valid port; `link` is a live struct the call fills.
        let rc = unsafe { sys::rte_eth_link_get_nowait(self.0.id.0, &mut link) };
        if rc != 0 {
            return LinkState {
                up: false,
                speed_mbps: 0,
                full_duplex: false,
            };
        }
        // SAFETY: `link` is initialised; the helpers read its bitfields.
        let (up, full) = unsafe {
            (
                sys::dpdk_sys_link_status(&link) != 0,
                sys::dpdk_sys_link_duplex(&link) != 0,
            )
        };
        LinkState {
            up,
            speed_mbps: link.link_speed,
            full_duplex: full,
        }
    }

    /// The device's counters.
    ///
    /// # Errors
    /// [`DpdkError::Device`] when the driver cannot report them.
    pub fn device_stats(&self) -> Result<DeviceStats, DpdkError> {
        self.0.device_stats()
    }

    /// Takes receive queue `queue`; it is given out once until the handle is dropped.
    ///
    /// # Errors
    /// [`DpdkError::BadConfig`] for a queue the port does not have, [`DpdkError::QueueTaken`].
    pub fn rx_queue(&self, queue: QueueId) -> Result<DpdkRx, DpdkError> {
        self.claim(queue, &self.0.rx_taken, self.0.info.rx_queues, "rx")?;
        Ok(DpdkRx {
            port: Arc::clone(&self.0),
            queue,
            mbufs: vec![ptr::null_mut(); BURST],
            stats: PortStats::default(),
        })
    }

    /// Takes transmit queue `queue`; it is given out once until the handle is dropped.
    ///
    /// # Errors
    /// [`DpdkError::BadConfig`] for a queue the port does not have or when the port has no
    /// next hop ([`NextHop::None`]), [`DpdkError::QueueTaken`].
    pub fn tx_queue(&self, queue: QueueId) -> Result<DpdkTx, DpdkError> {
        let Some(_) = self.0.next_hop() else {
            return Err(DpdkError::BadConfig(format!(
                "{} ({}) has no next hop for transmitted frames: set PortConfig::next_hop to \
                 NextHop::Mac or NextHop::Arp",
                self.0.id, self.0.name
            )));
        };
        self.claim(queue, &self.0.tx_taken, self.0.info.tx_queues, "tx")?;
        Ok(DpdkTx {
            port: Arc::clone(&self.0),
            queue,
            pending: Vec::with_capacity(BURST),
            pending_len: Vec::with_capacity(BURST),
            stats: PortStats::default(),
        })
    }

    fn claim(
        &self,
        queue: QueueId,
        taken: &AtomicU64,
        count: u16,
        direction: &'static str,
    ) -> Result<(), DpdkError> {
        if queue.0 >= count {
            return Err(DpdkError::BadConfig(format!(
                "{} has {count} {direction} queues; {queue:?} does not exist",
                self.0.id
            )));
        }
        let bit = 1u64 << queue.0;
        if taken.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return Err(DpdkError::QueueTaken {
                port: self.0.id,
                queue,
                direction,
            });
        }
        Ok(())
    }

    /// Resolves `target` by ARP on this port: sends a request (sender `source`, which may be
    /// `0.0.0.0` for an ARP probe) every 200 ms on TX queue 0 and watches RX queue 0 for the
    /// answer, at most `timeout`. Frames other than the answer read meanwhile are dropped, so
    /// call it before traffic matters (as `open` does). Needs RX and TX queue 0 free.
    ///
    /// # Errors
    /// [`DpdkError::QueueTaken`] when a queue 0 is owned, [`DpdkError::ArpTimeout`].
    #[allow(clippy::disallowed_methods)] // set-up path, not the worker loop
    pub fn resolve_arp(
        &self,
        target: Ipv4Addr,
        source: Ipv4Addr,
        timeout: Duration,
    ) -> Result<MacAddr, DpdkError> {
        let mut rx = self.rx_queue(QueueId(0))?;
        self.claim(QueueId(0), &self.0.tx_taken, self.0.info.tx_queues, "tx")?;
        let release_tx = ReleaseBit(&self.0.tx_taken, 1);
        let request = arp_request(self.0.mac, source, target);
        let start = Instant::now();
        let mut last_sent: Option<Instant> = None;
        let mut found = None;
        while found.is_none() {
            if last_sent.is_none_or(|t| t.elapsed() >= ARP_RETRY) {
                if start.elapsed() >= timeout {
                    break;
                }
                self.send_raw_frame(QueueId(0), &request);
                last_sent = Some(Instant::now());
            }
            let mut n = 0;
            // The sink only records; rx_burst cannot fail for a valid queue.
            let _ = rx.rx_burst(BURST, &mut |frame| {
                n += 1;
                if let Some((ip, mac)) = arp_sender(frame.data) {
                    if ip == target && found.is_none() {
                        found = Some(mac);
                    }
                }
            });
            if n == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        drop(release_tx);
        found.ok_or(DpdkError::ArpTimeout {
            ip: target,
            port: self.0.id,
            waited_ms: start.elapsed().as_millis() as u64,
        })
    }

    /// Sends one ready-made frame on `queue` (set-up traffic such as ARP); false when no mbuf
    /// was free or the device did not take it.
    fn send_raw_frame(&self, queue: QueueId, frame: &[u8]) -> bool {
        let Some(mut mbuf) = Mbuf::alloc(&self.0.mempool) else {
            return false;
        };
        let Some(room) = mbuf.append(frame.len()) else {
            return false;
        };
        room.copy_from_slice(frame);
        let mut raw = [mbuf.into_raw().as_ptr()];
        // SAFETY: valid started port and queue (claimed by the caller); one valid mbuf.
        let sent = unsafe { sys::rte_eth_tx_burst(self.0.id.0, queue.0, raw.as_mut_ptr(), 1) };
        if sent == 0 {
            // SAFETY: the device did not take it: it is still ours, free it once.
            unsafe { sys::rte_pktmbuf_free(raw[0]) };
        }
        sent == 1
    }
}

/// Clears a queue bit on drop.
struct ReleaseBit<'a>(&'a AtomicU64, u64);

impl Drop for ReleaseBit<'_> {
    fn drop(&mut self) {
        self.0.fetch_and(!self.1, Ordering::AcqRel);
    }
}

// ---------------------------------------------------------------------------------------------
// ARP

/// Length of an ARP frame for IPv4 over Ethernet (no padding).
pub const ARP_FRAME_LEN: usize = 42;

/// An ARP request (broadcast) from `mac`/`source` asking for `target`.
pub fn arp_request(mac: MacAddr, source: Ipv4Addr, target: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    let mut frame = [0u8; ARP_FRAME_LEN];
    ethernet::emit_header(
        &mut frame[..ethernet::HEADER_LEN],
        MacAddr::BROADCAST.0,
        mac.0,
        ETHERTYPE_ARP,
    );
    let arp = &mut frame[ethernet::HEADER_LEN..];
    arp[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    arp[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    arp[8..14].copy_from_slice(&mac.0);
    arp[14..18].copy_from_slice(&source.octets());
    // target hardware address stays zero
    arp[24..28].copy_from_slice(&target.octets());
    frame
}

/// The sender (address, MAC) of an ARP frame for IPv4 over Ethernet, request or reply (both
/// tell who has which address); `None` for anything else.
pub fn arp_sender(frame: &[u8]) -> Option<(Ipv4Addr, MacAddr)> {
    if frame.len() < ARP_FRAME_LEN {
        return None;
    }
    if u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_ARP {
        return None;
    }
    let arp = &frame[ethernet::HEADER_LEN..];
    let htype = u16::from_be_bytes([arp[0], arp[1]]);
    let ptype = u16::from_be_bytes([arp[2], arp[3]]);
    let op = u16::from_be_bytes([arp[6], arp[7]]);
    if htype != 1 || ptype != ETHERTYPE_IPV4 || arp[4] != 6 || arp[5] != 4 || !(op == 1 || op == 2)
    {
        return None;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&arp[8..14]);
    let ip = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    (!ip.is_unspecified()).then_some((ip, MacAddr(mac)))
}

// ---------------------------------------------------------------------------------------------
// Receive

/// A receive queue of a [`DpdkPort`]: [`RxPort`] over `rte_eth_rx_burst`.
///
/// Each frame is lent straight out of its mbuf (first segment; [`Frame::wire_len`] is the whole
/// packet) and the burst's mbufs are freed together after the callback returns (or panics).
/// Queue 0 also watches ARP traffic from a next hop resolved by ARP and keeps its MAC current.
pub struct DpdkRx {
    port: Arc<PortShared>,
    queue: QueueId,
    /// `BURST` slots for rte_eth_rx_burst, allocated once.
    mbufs: Vec<*mut sys::rte_mbuf>,
    stats: PortStats,
}

// SAFETY: the raw pointers in `mbufs` are only meaningful during one rx_burst call (mbufs are
// freed before it returns); the queue has one owner (this value), and DPDK lets any thread poll
// a queue as long as only one does.
unsafe impl Send for DpdkRx {}

impl fmt::Debug for DpdkRx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpdkRx")
            .field("port", &self.port.id)
            .field("queue", &self.queue)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Drop for DpdkRx {
    fn drop(&mut self) {
        self.port
            .rx_taken
            .fetch_and(!(1u64 << self.queue.0), Ordering::AcqRel);
    }
}

/// Frees the first `n` mbufs of a burst when dropped (after the sink, or while unwinding).
struct BurstGuard<'a> {
    mbufs: &'a mut [*mut sys::rte_mbuf],
    n: usize,
}

impl Drop for BurstGuard<'_> {
    fn drop(&mut self) {
        if self.n > 0 {
            // SAFETY: the first n entries are mbufs rte_eth_rx_burst gave us, not freed yet;
            // the frames lent from them are out of scope.
            unsafe { sys::rte_pktmbuf_free_bulk(self.mbufs.as_mut_ptr(), self.n as u32) };
        }
    }
}

fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live timespec; CLOCK_REALTIME always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

impl DpdkRx {
    /// The port this queue belongs to.
    pub fn port_id(&self) -> PortId {
        self.port.id
    }

    /// The queue index.
    pub fn queue(&self) -> QueueId {
        self.queue
    }
}

impl RxPort for DpdkRx {
    /// Polls the queue once. The frames of one burst share one timestamp (the wall clock when
    /// the burst was read; DPDK devices do not timestamp by default).
    fn rx_burst(&mut self, max: usize, sink: &mut dyn FnMut(Frame<'_>)) -> io::Result<usize> {
        let want = max.min(BURST) as u16;
        if want == 0 {
            return Ok(0);
        }
        // SAFETY: valid started port; this value owns the queue; `mbufs` has BURST >= want slots.
        let n = usize::from(unsafe {
            sys::rte_eth_rx_burst(self.port.id.0, self.queue.0, self.mbufs.as_mut_ptr(), want)
        });
        if n == 0 {
            return Ok(0);
        }
        let guard = BurstGuard {
            mbufs: &mut self.mbufs[..],
            n,
        };
        let now = realtime_ns();
        let watch_arp = self.queue.0 == 0 && self.port.next_hop_ip.is_some();
        for &raw in &guard.mbufs[..n] {
            // SAFETY: rte_eth_rx_burst filled the first n slots with valid mbufs we own until
            // the guard frees them; the slice does not outlive this iteration.
            let (data, wire_len) = unsafe {
                let m = &*raw;
                (
                    std::slice::from_raw_parts(
                        m.buf_addr.cast::<u8>().add(usize::from(m.data_off)),
                        usize::from(m.data_len),
                    ),
                    m.pkt_len as usize,
                )
            };
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += wire_len as u64;
            if watch_arp {
                if let Some((ip, mac)) = arp_sender(data) {
                    if Some(ip) == self.port.next_hop_ip {
                        self.port.set_next_hop(mac);
                    }
                }
            }
            sink(Frame {
                data,
                wire_len,
                timestamp_ns: now,
            });
        }
        drop(guard);
        Ok(n)
    }

    /// `None`: a poll-mode queue has no file descriptor.
    fn wait_fd(&self) -> Option<RawFd> {
        None
    }

    /// Frames and bytes this queue handed over; queue 0 adds the device's drops
    /// (`imissed + ierrors + rx_nombuf`) to `rx_dropped`, so summing all queues counts them once.
    fn stats(&self) -> PortStats {
        let mut stats = self.stats;
        if self.queue.0 == 0 {
            if let Ok(d) = self.port.device_stats() {
                stats.rx_dropped += d.imissed + d.ierrors + d.rx_nombuf;
            }
        }
        stats
    }
}

// ---------------------------------------------------------------------------------------------
// Transmit

/// What [`prepare_ipv4`] decided for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    /// IPv4 header length.
    pub header_len: usize,
    /// TCP header length when the TCP checksum is left to the device, else 0.
    pub tcp_header_len: usize,
    /// `RTE_MBUF_F_TX_*` flags the mbuf needs.
    pub offload_flags: u64,
}

/// Makes `packet` (an IPv4 packet, `IP_HDRINCL`-style) ready to send: sets the total length to
/// the packet's length, then the header checksum (zero and an offload flag when `ip_offload`,
/// computed otherwise), and, when `tcp` is [`TcpChecksum::Compute`] for an unfragmented TCP
/// packet, the TCP checksum (the pseudo-header sum and an offload flag when `tcp_offload`, the
/// full checksum otherwise). `None` for what is not a valid IPv4 packet.
pub fn prepare_ipv4(
    packet: &mut [u8],
    ip_offload: bool,
    tcp: TcpChecksum,
    tcp_offload: bool,
) -> Option<Prepared> {
    if packet.len() < 20 || packet.len() > usize::from(u16::MAX) || packet[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    if header_len < 20 || header_len > packet.len() {
        return None;
    }
    let total = packet.len() as u16;
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    packet[10..12].copy_from_slice(&[0, 0]);
    let mut prepared = Prepared {
        header_len,
        tcp_header_len: 0,
        offload_flags: 0,
    };
    if ip_offload {
        prepared.offload_flags |= sys::RTE_MBUF_F_TX_IPV4 | sys::RTE_MBUF_F_TX_IP_CKSUM;
    } else {
        let sum = checksum::checksum(&packet[..header_len]);
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
    let segment_len = packet.len() - header_len;
    if tcp == TcpChecksum::Compute && packet[9] == 6 && !fragment && segment_len >= 20 {
        let tcp_header_len = usize::from(packet[header_len + 12] >> 4) * 4;
        let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        let pseudo = checksum::pseudo_header(src, dst, 6, segment_len as u16);
        let at = header_len + 16;
        if tcp_offload && (20..=segment_len).contains(&tcp_header_len) {
            // DPDK's contract: the field holds the folded, uncomplemented pseudo-header sum.
            packet[at..at + 2].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
            prepared.tcp_header_len = tcp_header_len;
            prepared.offload_flags |= sys::RTE_MBUF_F_TX_IPV4 | sys::RTE_MBUF_F_TX_TCP_CKSUM;
        } else {
            packet[at..at + 2].copy_from_slice(&[0, 0]);
            let sum = !checksum::fold(checksum::sum(&packet[header_len..], pseudo));
            packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        }
    }
    Some(prepared)
}

/// A transmit queue of a [`DpdkPort`]: [`TxPort`] for IPv4 packets.
///
/// Each packet is copied into an mbuf behind an Ethernet header (port MAC -> next hop), made
/// ready by [`prepare_ipv4`] and sent with `rte_eth_tx_burst` in bursts of [`BURST`]. What the
/// device does not take after a few retries without progress is freed once and counted in
/// [`PortStats::tx_errors`], as are invalid packets and packets when the pool is empty.
pub struct DpdkTx {
    port: Arc<PortShared>,
    queue: QueueId,
    /// mbufs built and not yet handed to the device (capacity BURST, reused).
    pending: Vec<Mbuf>,
    /// IP length of each pending packet, for the byte counter.
    pending_len: Vec<usize>,
    stats: PortStats,
}

impl fmt::Debug for DpdkTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpdkTx")
            .field("port", &self.port.id)
            .field("queue", &self.queue)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Drop for DpdkTx {
    fn drop(&mut self) {
        self.port
            .tx_taken
            .fetch_and(!(1u64 << self.queue.0), Ordering::AcqRel);
    }
}

impl DpdkTx {
    /// The port this queue belongs to.
    pub fn port_id(&self) -> PortId {
        self.port.id
    }

    /// The queue index.
    pub fn queue(&self) -> QueueId {
        self.queue
    }

    /// Builds the mbuf for one packet; `None` (counted by the caller) when the packet is not
    /// IPv4, does not fit an mbuf, or the pool is empty.
    fn build(&self, packet: &[u8], dst: MacAddr) -> Option<Mbuf> {
        let mut mbuf = Mbuf::alloc(&self.port.mempool)?;
        let frame = mbuf.append(ethernet::HEADER_LEN + packet.len())?;
        ethernet::emit_header(
            &mut frame[..ethernet::HEADER_LEN],
            dst.0,
            self.port.mac.0,
            ETHERTYPE_IPV4,
        );
        let ip = &mut frame[ethernet::HEADER_LEN..];
        ip.copy_from_slice(packet);
        let info = &self.port.info;
        let prepared = prepare_ipv4(
            ip,
            info.tx_ipv4_checksum_offload,
            self.port.tcp_checksum,
            info.tx_tcp_checksum_offload,
        )?;
        if prepared.offload_flags != 0 {
            mbuf.set_tx_offload(
                prepared.offload_flags,
                ethernet::HEADER_LEN as u16,
                prepared.header_len as u16,
                prepared.tcp_header_len as u16,
            );
        }
        Some(mbuf)
    }

    /// Hands the pending mbufs to the device; what it does not take is freed and counted.
    fn flush(&mut self) -> usize {
        let n = self.pending.len();
        let mut sent = 0;
        let mut stalls = 0;
        while sent < n && stalls < TX_RETRIES {
            // SAFETY: Mbuf is repr(transparent) over NonNull<rte_mbuf>, so the tail of
            // `pending` is an array of n - sent valid mbuf pointers; the device takes
            // ownership of the first k it reports, which we forget below without freeing.
            let k = usize::from(unsafe {
                sys::rte_eth_tx_burst(
                    self.port.id.0,
                    self.queue.0,
                    self.pending
                        .as_mut_ptr()
                        .add(sent)
                        .cast::<*mut sys::rte_mbuf>(),
                    (n - sent) as u16,
                )
            });
            sent += k;
            stalls = if k == 0 { stalls + 1 } else { 0 };
        }
        for mbuf in self.pending.drain(..sent) {
            // The device owns it now (and frees it after sending).
            let _ = mbuf.into_raw();
        }
        self.stats.tx_packets += sent as u64;
        self.stats.tx_bytes += self.pending_len[..sent].iter().sum::<usize>() as u64;
        // Unsent: freed exactly once here, by Mbuf's Drop.
        self.stats.tx_errors += self.pending.len() as u64;
        self.pending.clear();
        self.pending_len.clear();
        sent
    }
}

impl TxPort for DpdkTx {
    fn tx_burst(&mut self, batch: &mut TxBatch) -> io::Result<usize> {
        let Some(dst) = self.port.next_hop() else {
            self.stats.tx_errors += batch.len() as u64;
            batch.clear();
            return Ok(0);
        };
        let mut sent = 0;
        for packet in batch.packets() {
            match self.build(packet, dst) {
                Some(mbuf) => {
                    self.pending.push(mbuf);
                    self.pending_len.push(packet.len());
                }
                None => self.stats.tx_errors += 1,
            }
            if self.pending.len() == BURST {
                sent += self.flush();
            }
        }
        if !self.pending.is_empty() {
            sent += self.flush();
        }
        batch.clear();
        Ok(sent)
    }

    /// Packets and bytes this queue sent and its errors; queue 0 adds the device's `oerrors`.
    fn stats(&self) -> PortStats {
        let mut stats = self.stats;
        if self.queue.0 == 0 {
            if let Ok(d) = self.port.device_stats() {
                stats.tx_errors += d.oerrors;
            }
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_debug_short() {
        assert_eq!(format!("{:?}", PortId(0)), "port0");
        assert_eq!(format!("{:?}", QueueId(3)), "q3");
        assert_eq!(format!("{:?}", LcoreId(12)), "lcore12");
        assert_eq!(PortId(7).to_string(), "port7");
    }

    #[test]
    fn mac_parse_print_roundtrip() {
        let mac: MacAddr = "02:00:5e:10:ab:FF".parse().unwrap();
        assert_eq!(mac.0, [2, 0, 0x5e, 0x10, 0xab, 0xff]);
        assert_eq!(mac.to_string(), "02:00:5e:10:ab:ff");
        assert_eq!(MacAddr::from_u64(mac.to_u64()), mac);
        assert!("02:00:5e:10:ab".parse::<MacAddr>().is_err());
        assert!("02:00:5e:10:ab:ff:00".parse::<MacAddr>().is_err());
        assert!("02:00:5e:10:ab:gg".parse::<MacAddr>().is_err());
    }

    #[test]
    fn eal_args() {
        let config = EalConfig {
            lcores: Some("0-1".into()),
            memory_channels: Some(4),
            vdevs: vec!["net_af_packet0,iface=eth0".into()],
            no_pci: true,
            memory: MemoryMode::Hugepages {
                file_prefix: Some("tc1".into()),
            },
            huge_dir: Some("/dev/hugepages-tcpcopy".into()),
            ..EalConfig::default()
        };
        assert_eq!(
            config.args().unwrap(),
            [
                "tcpcopy",
                "-l",
                "0-1",
                "-n",
                "4",
                "--vdev=net_af_packet0,iface=eth0",
                "--no-pci",
                "--file-prefix=tc1",
                "--huge-unlink",
                "--huge-dir=/dev/hugepages-tcpcopy",
                "--log-level=warning",
                "--no-telemetry"
            ]
        );
        let in_memory = EalConfig {
            lcores: Some("1".into()),
            pci_allow: vec!["0000:01:00.0".into()],
            no_pci: true,
            log_level: None,
            telemetry: true,
            ..EalConfig::default()
        };
        assert_eq!(
            in_memory.args().unwrap(),
            ["tcpcopy", "-l", "1", "-a", "0000:01:00.0", "--in-memory"]
        );
        let no_huge = EalConfig {
            lcores: Some("0".into()),
            memory: MemoryMode::NoHuge { megabytes: 256 },
            ..EalConfig::default()
        };
        let args = no_huge.args().unwrap();
        assert!(args.windows(3).any(|w| w == ["--no-huge", "-m", "256"]));
        let bad = EalConfig {
            memory: MemoryMode::Hugepages {
                file_prefix: Some("a/b".into()),
            },
            ..EalConfig::default()
        };
        assert!(matches!(bad.args(), Err(DpdkError::BadConfig(_))));
    }

    #[test]
    fn vdev_interfaces() {
        assert_eq!(vdev_interface("net_af_packet0,iface=eth0"), Some("eth0"));
        assert_eq!(
            vdev_interface("net_af_xdp1, start_queue=0, iface=veth9"),
            Some("veth9")
        );
        assert_eq!(vdev_interface("net_null0"), None);
        assert_eq!(vdev_interface("net_tap0,iface=dtap0"), None);
        let err = check_vdev_interfaces(&["net_af_packet0,iface=nosuchif0".into()]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("nosuchif0") && text.contains("ip netns exec"),
            "{text}"
        );
        check_vdev_interfaces(&["net_af_packet0,iface=lo".into()]).unwrap();
    }

    /// A fake root with `sys/kernel/mm/hugepages` and `proc/{meminfo,mounts}`.
    struct FakeRoot(PathBuf);

    impl FakeRoot {
        fn new(tag: &str, free_2m: u64, mounts: &str) -> FakeRoot {
            let dir =
                std::env::temp_dir().join(format!("tcpcopy-huge-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let pages = dir.join("sys/kernel/mm/hugepages/hugepages-2048kB");
            std::fs::create_dir_all(&pages).unwrap();
            std::fs::create_dir_all(dir.join("sys/kernel/mm/hugepages/hugepages-1048576kB"))
                .unwrap();
            std::fs::write(pages.join("free_hugepages"), format!("{free_2m}\n")).unwrap();
            std::fs::write(
                dir.join("sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages"),
                "0\n",
            )
            .unwrap();
            std::fs::create_dir_all(dir.join("proc")).unwrap();
            std::fs::write(dir.join("proc/meminfo"), "Hugepagesize:       2048 kB\n").unwrap();
            std::fs::write(dir.join("proc/mounts"), mounts).unwrap();
            FakeRoot(dir)
        }
    }

    impl Drop for FakeRoot {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn hugepage_checks() {
        let hugepages = MemoryMode::Hugepages { file_prefix: None };
        let none = FakeRoot::new("none", 0, "");
        let err = check_hugepages(&hugepages, None, &none.0).unwrap_err();
        assert!(err.to_string().starts_with("no hugepages: "), "{err}");
        assert!(
            err.to_string().contains("scripts/hugepages.sh reserve 512"),
            "{err}"
        );
        assert!(check_hugepages(&MemoryMode::InMemory, None, &none.0).is_err());
        check_hugepages(&MemoryMode::NoHuge { megabytes: 64 }, None, &none.0).unwrap();

        let unmounted = FakeRoot::new("unmounted", 64, "proc /proc proc rw 0 0\n");
        let err = check_hugepages(&hugepages, None, &unmounted.0).unwrap_err();
        assert!(err.to_string().contains("no hugetlbfs is mounted"), "{err}");
        assert!(err.to_string().contains("in-memory"), "{err}");
        check_hugepages(&MemoryMode::InMemory, None, &unmounted.0).unwrap();

        let wrong_size = FakeRoot::new(
            "1g",
            64,
            "nodev /dev/huge1g hugetlbfs rw,relatime,pagesize=1024M 0 0\n",
        );
        assert!(check_hugepages(&hugepages, None, &wrong_size.0).is_err());

        let good = FakeRoot::new(
            "good",
            64,
            "nodev /dev/hugepages-tcpcopy hugetlbfs rw,relatime,pagesize=2M 0 0\n\
             hugetlbfs /dev/hugepages hugetlbfs rw,relatime 0 0\n",
        );
        check_hugepages(&hugepages, None, &good.0).unwrap();
        check_hugepages(&hugepages, Some(Path::new("/dev/hugepages")), &good.0).unwrap();
        let err = check_hugepages(&hugepages, Some(Path::new("/mnt/nope")), &good.0).unwrap_err();
        assert!(err.to_string().contains("/mnt/nope"), "{err}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size_kb("2M"), Some(2048));
        assert_eq!(parse_size_kb("1024M"), Some(1 << 20));
        assert_eq!(parse_size_kb("1G"), Some(1 << 20));
        assert_eq!(parse_size_kb("2048k"), Some(2048));
        assert_eq!(parse_size_kb("2"), None);
        assert_eq!(parse_size_kb("xM"), None);
    }

    #[test]
    fn mempool_formula() {
        let sizing = MempoolSizing {
            rx_queues: 2,
            rx_descriptors: 1024,
            tx_queues: 2,
            tx_descriptors: 1024,
            burst: 64,
            lcores: 2,
            cache_size: 256,
            session_buffers: 1000,
        };
        // 2048 + 2048 + 256 + 512 + 1000 = 5864 -> 8191
        assert_eq!(sizing.mbufs(), 8191);
        let tiny = MempoolSizing {
            rx_queues: 1,
            rx_descriptors: 64,
            tx_queues: 1,
            tx_descriptors: 64,
            burst: 32,
            lcores: 1,
            cache_size: 0,
            session_buffers: 0,
        };
        assert_eq!(tiny.mbufs(), 1023);
        // Exactly 2^k - 1 stays.
        let exact = MempoolSizing {
            session_buffers: 4095 - 192,
            ..tiny
        };
        assert_eq!(exact.mbufs(), 4095);
    }

    #[test]
    fn rss_key_is_symmetric_pattern() {
        let key = symmetric_rss_key(RSS_KEY_LEN);
        assert_eq!(key.len(), 40);
        assert!(key.chunks(2).all(|p| p == [0x6d, 0x5a]));
        assert_eq!(symmetric_rss_key(52).len(), 52);
    }

    /// Toeplitz hash (the RSS function) over `input` with `key`.
    fn toeplitz(key: &[u8], input: &[u8]) -> u32 {
        let mut result = 0u32;
        let mut window = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
        for (i, byte) in input.iter().enumerate() {
            for bit in 0..8 {
                if byte & (0x80 >> bit) != 0 {
                    result ^= window;
                }
                let next_key_bit = key.get(i + 4).map_or(0, |k| (k >> (7 - bit)) & 1);
                window = (window << 1) | u32::from(next_key_bit);
            }
        }
        result
    }

    #[test]
    fn symmetric_key_hashes_both_directions_alike() {
        let key = symmetric_rss_key(RSS_KEY_LEN);
        let tuple = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16| {
            let mut v = Vec::new();
            v.extend_from_slice(&src);
            v.extend_from_slice(&dst);
            v.extend_from_slice(&sport.to_be_bytes());
            v.extend_from_slice(&dport.to_be_bytes());
            v
        };
        for (a, b, pa, pb) in [
            ([10, 0, 0, 1], [10, 0, 0, 2], 40000u16, 80u16),
            ([192, 168, 1, 77], [8, 8, 4, 4], 5353, 53),
            ([172, 16, 9, 200], [10, 77, 0, 30], 61000, 8080),
        ] {
            assert_eq!(
                toeplitz(&key, &tuple(a, b, pa, pb)),
                toeplitz(&key, &tuple(b, a, pb, pa))
            );
        }
        // The classic Microsoft key is not symmetric: the test can tell.
        let ms: Vec<u8> = vec![
            0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3,
            0x8f, 0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3,
            0x80, 0x30, 0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
        ];
        let t1 = tuple([66, 9, 149, 187], [161, 142, 100, 80], 2794, 1766);
        let t2 = tuple([161, 142, 100, 80], [66, 9, 149, 187], 1766, 2794);
        assert_eq!(toeplitz(&ms, &t1), 0x51cc_c178); // RSS spec verification vector
        assert_ne!(toeplitz(&ms, &t1), toeplitz(&ms, &t2));
    }

    #[test]
    fn arp_request_and_sender() {
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let frame = arp_request(mac, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let expected = "ffffffffffff020000000001\
                        0806 0001 0800 06 04 0001 020000000001 0a000001 000000000000 0a000002";
        let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected.replace(' ', ""));
        // The request names its sender.
        assert_eq!(arp_sender(&frame), Some((Ipv4Addr::new(10, 0, 0, 1), mac)));
        // A reply from 10.0.0.2 (as Linux sends it, padded to 60 bytes).
        let mut reply = frame.to_vec();
        reply[..6].copy_from_slice(&mac.0);
        reply[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        reply[20..22].copy_from_slice(&2u16.to_be_bytes());
        reply[22..28].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        reply[28..32].copy_from_slice(&[10, 0, 0, 2]);
        reply[32..38].copy_from_slice(&mac.0);
        reply[38..42].copy_from_slice(&[10, 0, 0, 1]);
        reply.resize(60, 0);
        assert_eq!(
            arp_sender(&reply),
            Some((Ipv4Addr::new(10, 0, 0, 2), MacAddr([2, 0, 0, 0, 0, 2])))
        );
        // Probes (sender 0.0.0.0), short frames and IPv4 frames are not answers.
        let probe = arp_request(mac, Ipv4Addr::UNSPECIFIED, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(arp_sender(&probe), None);
        assert_eq!(arp_sender(&reply[..41]), None);
        let mut ip = reply.clone();
        ip[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        assert_eq!(arp_sender(&ip), None);
    }

    fn tcp_packet() -> Vec<u8> {
        // 10.0.0.1:40000 -> 10.0.0.2:80, SYN, 4 bytes payload; total length and both checksums
        // zero, as a pipeline may hand it over.
        let mut p = vec![
            0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, // IP
            0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0,
            0, // TCP
        ];
        p.extend_from_slice(b"ping");
        p
    }

    #[test]
    fn prepare_software_checksums() {
        let mut p = tcp_packet();
        let prepared = prepare_ipv4(&mut p, false, TcpChecksum::Compute, false).unwrap();
        assert_eq!(prepared.offload_flags, 0);
        assert_eq!(prepared.header_len, 20);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 44);
        let view = crate::wire::ipv4::Ipv4Packet::new_checked(&p[..]).unwrap();
        assert!(view.verify_checksum());
        let tcp = crate::wire::tcp::TcpPacket::new_checked(&p[20..]).unwrap();
        assert!(tcp.verify_checksum(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)));
        // AsGiven leaves the TCP checksum alone.
        let mut q = tcp_packet();
        q[36] = 0xab;
        q[37] = 0xcd;
        prepare_ipv4(&mut q, false, TcpChecksum::AsGiven, true).unwrap();
        assert_eq!(&q[36..38], &[0xab, 0xcd]);
        assert!(crate::wire::ipv4::Ipv4Packet::new_checked(&q[..])
            .unwrap()
            .verify_checksum());
    }

    #[test]
    fn prepare_offloaded_checksums() {
        let mut p = tcp_packet();
        let prepared = prepare_ipv4(&mut p, true, TcpChecksum::Compute, true).unwrap();
        let flags =
            sys::RTE_MBUF_F_TX_IPV4 | sys::RTE_MBUF_F_TX_IP_CKSUM | sys::RTE_MBUF_F_TX_TCP_CKSUM;
        assert_eq!(prepared.offload_flags, flags);
        assert_eq!(prepared.tcp_header_len, 20);
        assert_eq!(&p[10..12], &[0, 0]);
        // The TCP field holds the pseudo-header sum; adding the segment's sum completes it.
        let partial = u16::from_be_bytes([p[36], p[37]]);
        let pseudo = checksum::pseudo_header(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            6,
            24,
        );
        assert_eq!(partial, checksum::fold(pseudo));
        let mut soft = tcp_packet();
        prepare_ipv4(&mut soft, false, TcpChecksum::Compute, false).unwrap();
        let mut check = p[20..].to_vec();
        check[16..18].copy_from_slice(&[0, 0]);
        assert_eq!(
            !checksum::fold(checksum::sum(&check, pseudo)),
            u16::from_be_bytes([soft[36], soft[37]])
        );
    }

    #[test]
    fn prepare_rejects_non_ipv4() {
        assert!(prepare_ipv4(&mut [0x45; 19], false, TcpChecksum::AsGiven, false).is_none());
        let mut v6 = tcp_packet();
        v6[0] = 0x60;
        assert!(prepare_ipv4(&mut v6, false, TcpChecksum::AsGiven, false).is_none());
        let mut long_ihl = tcp_packet();
        long_ihl[0] = 0x4f; // 60-byte header in a 44-byte packet
        assert!(prepare_ipv4(&mut long_ihl[..40], false, TcpChecksum::AsGiven, false).is_none());
    }
}
