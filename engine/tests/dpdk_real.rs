//! Real-path tests of the DPDK ports (`--features dpdk`, as root): EAL up on hugepages (or in
//! memory), a `net_af_packet` virtual device over one end of a veth pair, frames in and packets
//! out checked byte for byte at the other end, and the failures that must be immediate and
//! clear (no hugepages, a missing device, a second EAL init).
//!
//! How DPDK runs in a namespace: EAL can start once per process, and an af_packet vdev binds its
//! interface in the network namespace the process is in when `rte_eal_init` runs. So every DPDK
//! side is a **child process**: this test binary re-executed under `ip netns exec NS` with
//! `--ignored --exact dpdk_child --nocapture` and `TCPCOPY_DPDK_CHILD=<mode>`; the `dpdk_child`
//! test is ignored in a normal run and fails when that variable is not set. The child talks back on stdout (`READY`, `FRAME <hex>`,
//! `STATS ...`), prints `error: <message>` and exits 1 on failure, like a CLI would. The peer
//! side (frame injection, capture) runs in the test process from threads that `setns` into the
//! peer namespace.
//!
//! ```text
//!   namespace tdpD<pid>x<i>                         namespace tdpP<pid>x<i>
//!   tdp<pid>d<i> (no IP)  <------- veth ------->  tdp<pid>p<i> 10.251.P.(4i+2)/30
//!   child: EAL --vdev=net_af_packet0,iface=tdp..d  AF_PACKET injector, AfPacketRx capture
//!          DpdkRx / DpdkTx on net_af_packet0       kernel answers ARP for its address
//! ```
//!
//! Hugepages: when fewer than 64 pages of 2 MiB are free or no hugetlbfs is mounted, the test
//! reserves them with `scripts/hugepages.sh` (own state folder and mount) and releases them at
//! the end; tests hold a lock so reservations never overlap. Needs root; without it the tests
//! print a note and pass, unless `CI=true`, where they fail.
#![cfg(feature = "dpdk")]

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use engine::port::afpacket::{AfPacketConfig, AfPacketRx};
use engine::port::dpdk::{
    Eal, EalConfig, MacAddr, MemoryMode, NextHop, PortConfig, QueueId, TcpChecksum,
};
use engine::port::{RxPort, TxBatch, TxPort};

const CHILD_ENV: &str = "TCPCOPY_DPDK_CHILD";
/// EtherType of the frames the peer injects (IEEE local experimental), so stray kernel frames
/// (IPv6 ND, ...) are told apart.
const TEST_ETHERTYPE: u16 = 0x88b5;
const UDP_PORT: u16 = 9999;
/// Polls a child or the capture makes before giving up (each sleeps 1 ms when idle).
const POLL_BUDGET: u32 = 20_000;

static NEXT_INDEX: AtomicU32 = AtomicU32::new(0);
/// One test at a time: hugepage reservations and child processes must not overlap.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when the tests can run here; panics under `CI=true` when they cannot.
fn can_run(test: &str) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let tools = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if is_root() && tools {
        return true;
    }
    let why = if is_root() {
        "the `ip` tool (iproute2) is missing: apt-get install -y iproute2"
    } else {
        "they need root (namespaces, hugepages, AF_PACKET)"
    };
    assert!(
        !ci,
        "{test}: cannot run DPDK real-path tests under CI=true: {why}"
    );
    eprintln!("note: skipping {test}: {why}");
    false
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn hugetlbfs_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"))
        .map(str::to_owned)
        .collect()
}

fn free_2m_pages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// Hugepages for the test: reserved by `scripts/hugepages.sh` with a private state folder and
/// mount when the machine has too few, released on drop.
struct Hugepages {
    state_dir: Option<PathBuf>,
    mount: PathBuf,
}

impl Hugepages {
    fn ensure() -> Hugepages {
        let script = repo_root().join("scripts/hugepages.sh");
        let state_dir = PathBuf::from(format!(
            "/run/tcpcopy-hugepages-test-{}",
            std::process::id()
        ));
        let mount = PathBuf::from(format!("/dev/hugepages-tcpcopy-test{}", std::process::id()));
        if free_2m_pages() >= 64 && !hugetlbfs_mounts().is_empty() {
            return Hugepages {
                state_dir: None,
                mount,
            };
        }
        let out = Command::new("bash")
            .arg(&script)
            .args(["reserve", "128"])
            .env("HUGEPAGES_STATE_DIR", &state_dir)
            .env("HUGEPAGES_MOUNT", &mount)
            .output()
            .expect("run scripts/hugepages.sh");
        assert!(
            out.status.success(),
            "hugepages.sh reserve 128 failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Hugepages {
            state_dir: Some(state_dir),
            mount,
        }
    }
}

impl Drop for Hugepages {
    fn drop(&mut self) {
        let Some(state_dir) = &self.state_dir else {
            return;
        };
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/hugepages.sh"))
            .arg("release")
            .env("HUGEPAGES_STATE_DIR", state_dir)
            .env("HUGEPAGES_MOUNT", &self.mount)
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            other => eprintln!("warning: hugepages.sh release failed: {other:?}"),
        }
    }
}

/// A veth pair between two fresh namespaces: the DPDK end (no IP) and the peer end.
struct Topology {
    dpdk_ns: String,
    peer_ns: String,
    dpdk_if: String,
    peer_if: String,
    peer_ip: Ipv4Addr,
    /// Address the DPDK side uses as the source of its packets and ARP requests.
    dpdk_ip: Ipv4Addr,
    dpdk_mac: MacAddr,
    peer_mac: MacAddr,
}

impl Topology {
    fn new() -> Topology {
        let pid = std::process::id();
        let index = NEXT_INDEX.fetch_add(1, Ordering::Relaxed);
        assert!(index < 60, "too many topologies in one test process");
        let third = (pid % 256) as u8;
        let base = (index * 4) as u8;
        let mut t = Topology {
            dpdk_ns: format!("tdpD{pid}x{index}"),
            peer_ns: format!("tdpP{pid}x{index}"),
            dpdk_if: format!("tdp{pid}d{index}"),
            peer_if: format!("tdp{pid}p{index}"),
            dpdk_ip: Ipv4Addr::new(10, 251, third, base + 1),
            peer_ip: Ipv4Addr::new(10, 251, third, base + 2),
            dpdk_mac: MacAddr::default(),
            peer_mac: MacAddr::default(),
        };
        assert!(t.dpdk_if.len() < 16 && t.peer_if.len() < 16);
        // The guard exists before the first resource: a failed step still cleans up.
        run(&["ip", "netns", "add", &t.dpdk_ns]);
        run(&["ip", "netns", "add", &t.peer_ns]);
        run(&[
            "ip", "link", "add", &t.dpdk_if, "netns", &t.dpdk_ns, "type", "veth", "peer", "name",
            &t.peer_if, "netns", &t.peer_ns,
        ]);
        for (ns, ifname) in [(&t.dpdk_ns, &t.dpdk_if), (&t.peer_ns, &t.peer_if)] {
            // No IPv6 chatter (DAD, MLD) on the wire the tests read.
            let _ = Command::new("ip")
                .args(["netns", "exec", ns, "sysctl", "-qw"])
                .arg(format!("net.ipv6.conf.{ifname}.disable_ipv6=1"))
                .output();
            let _ = Command::new("ip")
                .args(["netns", "exec", ns, "ethtool", "-K", ifname])
                .args([
                    "tx", "off", "sg", "off", "tso", "off", "gso", "off", "gro", "off",
                ])
                .output();
            run(&["ip", "-n", ns, "link", "set", ifname, "up"]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let peer_cidr = format!("{}/30", t.peer_ip);
        run(&[
            "ip", "-n", &t.peer_ns, "addr", "add", &peer_cidr, "dev", &t.peer_if,
        ]);
        t.dpdk_mac = t.mac(&t.dpdk_ns, &t.dpdk_if);
        t.peer_mac = t.mac(&t.peer_ns, &t.peer_if);
        t
    }

    fn mac(&self, ns: &str, ifname: &str) -> MacAddr {
        run(&[
            "ip",
            "netns",
            "exec",
            ns,
            "cat",
            &format!("/sys/class/net/{ifname}/address"),
        ])
        .trim()
        .parse()
        .expect("interface MAC")
    }

    fn vdev(&self) -> String {
        format!("net_af_packet0,iface={}", self.dpdk_if)
    }

    /// Starts this test binary as a DPDK child in the DPDK namespace.
    fn child(&self, mode: &str, env: &[(&str, String)]) -> Child {
        let exe = std::env::current_exe().expect("current_exe");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.dpdk_ns])
            .arg(exe)
            .args([
                "--ignored",
                "--exact",
                "dpdk_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, mode)
            .env("DPDK_VDEV", self.vdev())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        command.spawn().expect("spawn DPDK child")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.dpdk_ns, &self.peer_ns] {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).output();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `f` on a new thread that has joined network namespace `name`.
fn in_namespace<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{name}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: `file` is an open namespace file for the call; setns changes only this fresh
        // thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

/// An AF_PACKET socket bound to an interface, for injecting whole frames.
struct Injector {
    fd: libc::c_int,
    ifindex: libc::c_int,
}

impl Injector {
    fn open(ns: &str, ifname: &str) -> Injector {
        let ifname = ifname.to_owned();
        in_namespace(ns, move || {
            let name = std::ffi::CString::new(ifname.clone()).unwrap();
            // SAFETY: valid C string for the call.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as libc::c_int;
            assert!(ifindex > 0, "no interface {ifname}");
            // SAFETY: plain socket(2); checked below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    i32::from((libc::ETH_P_ALL as u16).to_be()),
                )
            };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            Injector { fd, ifindex }
        })
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `addr` are live for the call; lengths are theirs.
        let rc = unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.fd) };
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// A test frame of `len` bytes to `dst`: EtherType 0x88b5, then the index and a pattern.
fn test_frame(dst: MacAddr, src: MacAddr, index: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(&index.to_be_bytes());
    for (i, b) in f[18..].iter_mut().enumerate() {
        *b = (index as usize * 7 + i) as u8;
    }
    f
}

/// An IPv4/UDP packet (or TCP when `tcp`) from `src` to `dst` with zero IP checksum, zero total
/// length and (for TCP) zero TCP checksum: what the DPDK transmit path must complete.
fn raw_packet(src: Ipv4Addr, dst: Ipv4Addr, index: u32, payload: usize, tcp: bool) -> Vec<u8> {
    let l4 = if tcp { 20 } else { 8 };
    let mut p = vec![0u8; 20 + l4 + payload];
    p[0] = 0x45;
    p[4..6].copy_from_slice(&(index as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = if tcp { 6 } else { 17 };
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&40_000u16.to_be_bytes());
    p[22..24].copy_from_slice(&UDP_PORT.to_be_bytes());
    if tcp {
        p[24..28].copy_from_slice(&index.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x18;
        p[34..36].copy_from_slice(&1024u16.to_be_bytes());
    } else {
        p[24..26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    }
    for (i, b) in p[20 + l4..].iter_mut().enumerate() {
        *b = (index as usize + i) as u8;
    }
    p
}

fn checksum_ok(data: &[u8], initial: u32) -> bool {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

/// Reads the child's stdout line by line until `READY` (returning it), or panics with its
/// output when it exits first.
fn wait_ready(child: &mut Child) -> (String, BufReader<std::process::ChildStdout>) {
    let mut reader = BufReader::new(child.stdout.take().expect("child stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).expect("read child stdout");
        if n == 0 {
            let status = child.wait().expect("wait child");
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("DPDK child exited ({status}) before READY:\n{err}");
        }
        // libtest prints `test dpdk_child ... ` without a newline before the child's output.
        if let Some(at) = line.find("READY ") {
            return (line[at..].trim().to_owned(), reader);
        }
    }
}

/// Collects the rest of the child's output and its exit status.
fn finish(
    mut child: Child,
    mut reader: BufReader<std::process::ChildStdout>,
) -> (Vec<String>, String, std::process::ExitStatus) {
    let mut out = String::new();
    reader.read_to_string(&mut out).expect("read child stdout");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().expect("wait child");
    (out.lines().map(str::to_owned).collect(), err, status)
}

/// Runs a child that should fail at once; returns (exit status, stderr).
fn run_failing_child(command: &mut Command) -> (std::process::ExitStatus, String) {
    let out = command.output().expect("run DPDK child");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn stat(lines: &[String], key: &str) -> u64 {
    lines
        .iter()
        .filter(|l| l.starts_with("STATS "))
        .flat_map(|l| l.split_whitespace())
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {lines:?}"))
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn rx_frames_arrive_with_exact_bytes() {
    if !can_run("rx_frames_arrive_with_exact_bytes") {
        return;
    }
    let _serial = serial();
    let _pages = Hugepages::ensure();
    let mounts_before = hugetlbfs_mounts();
    let topo = Topology::new();
    const COUNT: u32 = 200;
    let prefix = format!("tcrx{}", std::process::id());
    let mut child = topo.child(
        "rx",
        &[
            ("DPDK_MEMORY", format!("prefix:{prefix}")),
            ("DPDK_COUNT", COUNT.to_string()),
        ],
    );
    let (ready, reader) = wait_ready(&mut child);
    assert!(
        ready.contains(&topo.dpdk_mac.to_string()),
        "{ready} vs {}",
        topo.dpdk_mac
    );

    let injector = Injector::open(&topo.peer_ns, &topo.peer_if);
    let mut sent = Vec::new();
    for i in 0..COUNT {
        // 60..=1514 bytes, to the DPDK port's MAC and to a foreign one (promiscuous).
        let len = 60 + (i as usize * 37) % (1514 - 60 + 1);
        let dst = if i % 3 == 0 {
            MacAddr([2, 0, 0, 0xaa, 0xbb, 0xcc])
        } else {
            topo.dpdk_mac
        };
        let frame = test_frame(dst, topo.peer_mac, i, len);
        injector.send(&frame);
        sent.push(frame);
    }
    let (lines, err, status) = finish(child, reader);
    assert!(
        status.success(),
        "child failed ({status}): {err}\n{lines:?}"
    );
    let received: Vec<Vec<u8>> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("FRAME "))
        .map(unhex)
        .collect();
    assert_eq!(received.len(), COUNT as usize, "stderr: {err}");
    // Exact bytes and order.
    for (i, (got, want)) in received.iter().zip(&sent).enumerate() {
        assert_eq!(got, want, "frame {i} differs");
    }
    assert!(stat(&lines, "rx_packets") >= u64::from(COUNT));
    assert!(stat(&lines, "rx_bytes") >= sent.iter().map(|f| f.len() as u64).sum::<u64>());
    assert!(stat(&lines, "ipackets") >= u64::from(COUNT));
    assert_eq!(stat(&lines, "rx_dropped"), 0);
    // The child's runtime files went with it; the mounts are as they were.
    assert_eq!(hugetlbfs_mounts(), mounts_before);
}

/// How a transmit test is set up.
enum TxCase {
    /// net_af_packet0 over the veth, next hop configured; capture at the peer.
    ConfiguredMac,
    /// net_af_packet0 over the veth, next hop resolved by ARP; capture at the peer.
    Arp,
    /// net_tap0 (a device with IPv4/TCP checksum offload) creating tap `iface` in the DPDK
    /// namespace; capture on that tap, opened once the child created it.
    Tap { iface: String },
}

fn tx_test(mode_env: Vec<(&str, String)>, case: TxCase) {
    let _serial = serial();
    let _pages = Hugepages::ensure();
    let topo = Topology::new();
    const COUNT: u32 = 300;
    let filter = format!("ip and src host {}", topo.dpdk_ip);
    let capture_on = |ns: &str, iface: &str| {
        let config = AfPacketConfig {
            interface: iface.to_owned(),
            filter: Some(filter.clone()),
            ..AfPacketConfig::default()
        };
        in_namespace(ns, move || AfPacketRx::open(&config))
            .unwrap_or_else(|e| panic!("AfPacketRx::open: {e}"))
    };

    let mut env = mode_env;
    env.push(("DPDK_COUNT", COUNT.to_string()));
    env.push(("DPDK_SRC_IP", topo.dpdk_ip.to_string()));
    env.push(("DPDK_DST_IP", topo.peer_ip.to_string()));
    match &case {
        TxCase::Arp => env.push(("DPDK_ARP_IP", topo.peer_ip.to_string())),
        TxCase::ConfiguredMac => env.push(("DPDK_NEXT_HOP_MAC", topo.peer_mac.to_string())),
        TxCase::Tap { iface } => {
            env.push(("DPDK_NEXT_HOP_MAC", topo.peer_mac.to_string()));
            env.push(("DPDK_VDEV", format!("net_tap0,iface={iface}")));
            env.push(("DPDK_DEVICE", "net_tap0".to_owned()));
            env.push(("DPDK_WAIT_GO", "1".to_owned()));
        }
    }
    // Capture at the peer before the child sends anything; on the tap once it exists.
    let mut capture = match &case {
        TxCase::Tap { .. } => None,
        _ => Some(capture_on(&topo.peer_ns, &topo.peer_if)),
    };
    let mut child = topo.child("tx", &env);
    let (ready, reader) = wait_ready(&mut child);
    assert!(
        ready.contains(&format!("next_hop={}", topo.peer_mac)),
        "{ready}: next hop should be {}",
        topo.peer_mac
    );
    let source_mac: MacAddr = ready
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("mac="))
        .expect("mac= in READY")
        .parse()
        .expect("READY mac");
    if let TxCase::Tap { iface } = &case {
        assert!(
            ready.contains("ip_offload=true tcp_offload=true"),
            "{ready}"
        );
        capture = Some(capture_on(&topo.dpdk_ns, iface));
        let mut stdin = child.stdin.take().expect("child stdin");
        std::io::Write::write_all(&mut stdin, b"GO\n").expect("write GO");
    } else {
        assert_eq!(
            source_mac, topo.dpdk_mac,
            "af_packet port MAC is the interface's"
        );
        assert!(ready.contains("ip_offload=false"), "{ready}");
    }
    let mut capture = capture.expect("capture");
    let (lines, err, status) = finish(child, reader);
    assert!(
        status.success(),
        "child failed ({status}): {err}\n{lines:?}"
    );
    assert_eq!(stat(&lines, "tx_packets"), u64::from(COUNT), "{lines:?}");
    assert_eq!(stat(&lines, "tx_errors"), 0, "{lines:?}");
    assert!(stat(&lines, "opackets") >= u64::from(COUNT), "{lines:?}");

    let mut seen = HashSet::new();
    let mut polls = 0;
    while seen.len() < COUNT as usize && polls < POLL_BUDGET {
        polls += 1;
        let n = capture
            .rx_burst(64, &mut |frame| {
                let f = frame.data;
                assert_eq!(&f[..6], &topo.peer_mac.0, "destination MAC");
                assert_eq!(&f[6..12], &source_mac.0, "source MAC");
                assert_eq!(&f[12..14], &[0x08, 0x00]);
                let ip = &f[14..];
                let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
                assert!(checksum_ok(&ip[..20], 0), "IPv4 header checksum");
                let index = u32::from(u16::from_be_bytes([ip[4], ip[5]]));
                let tcp = ip[9] == 6;
                let payload = 10 + (index as usize * 13) % 1400;
                let mut want = raw_packet(topo.dpdk_ip, topo.peer_ip, index, payload, tcp);
                assert_eq!(total, want.len(), "total length filled in");
                // What DPDK filled in, copied into the expectation; the rest must be exact.
                want[2..4].copy_from_slice(&ip[2..4]);
                want[10..12].copy_from_slice(&ip[10..12]);
                if tcp {
                    want[36..38].copy_from_slice(&ip[36..38]);
                    let mut pseudo = Vec::new();
                    pseudo.extend_from_slice(&ip[12..20]);
                    pseudo.extend_from_slice(&[0, 6]);
                    pseudo.extend_from_slice(&((total - 20) as u16).to_be_bytes());
                    let initial = pseudo
                        .chunks(2)
                        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                        .sum();
                    assert!(
                        checksum_ok(&ip[20..total], initial),
                        "TCP checksum of {index}"
                    );
                }
                assert_eq!(&ip[..total], &want[..], "packet {index}");
                seen.insert(index);
            })
            .expect("capture");
        if n == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    assert_eq!(seen.len(), COUNT as usize, "packets seen at the peer");
}

#[test]
fn tx_packets_reach_the_peer_with_configured_mac() {
    if !can_run("tx_packets_reach_the_peer_with_configured_mac") {
        return;
    }
    tx_test(
        vec![("DPDK_MEMORY", "inmemory".to_owned())],
        TxCase::ConfiguredMac,
    );
}

#[test]
fn tx_checksum_offload_on_a_tap_device() {
    if !can_run("tx_checksum_offload_on_a_tap_device") {
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "/dev/net/tun missing under CI=true"
        );
        eprintln!("note: skipping tx_checksum_offload_on_a_tap_device: no /dev/net/tun");
        return;
    }
    let iface = format!("tdt{}", std::process::id());
    tx_test(
        vec![("DPDK_MEMORY", "inmemory".to_owned())],
        TxCase::Tap { iface },
    );
}

#[test]
fn tx_next_hop_resolved_by_arp() {
    if !can_run("tx_next_hop_resolved_by_arp") {
        return;
    }
    let prefix = format!("tcarp{}", std::process::id());
    tx_test(
        vec![("DPDK_MEMORY", format!("prefix:{prefix}"))],
        TxCase::Arp,
    );
}

#[test]
fn missing_hugepages_fail_at_once_with_the_fix() {
    if !can_run("missing_hugepages_fail_at_once_with_the_fix") {
        return;
    }
    let _serial = serial();
    let mounts_before = hugetlbfs_mounts();
    // A mount namespace without any hugetlbfs: EAL (not in-memory) has no hugepages to use.
    let exe = std::env::current_exe().expect("current_exe");
    let script = "for m in $(awk '$3 == \"hugetlbfs\" { print $2 }' /proc/mounts); do umount \"$m\" || exit 3; done; exec \"$@\"";
    let mut command = Command::new("unshare");
    command
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&exe)
        .args([
            "--ignored",
            "--exact",
            "dpdk_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "init")
        .env("DPDK_MEMORY", "prefix:tcnohuge")
        .env("DPDK_VDEV", "net_null0")
        .stdin(Stdio::null());
    let (status, err) = run_failing_child(&mut command);
    assert_eq!(status.code(), Some(1), "exit status; stderr: {err}");
    assert!(err.contains("error: no hugepages"), "{err}");
    assert!(err.contains("scripts/hugepages.sh reserve 512"), "{err}");
    assert_eq!(hugetlbfs_mounts(), mounts_before, "nothing left mounted");
}

#[test]
fn missing_device_fails_at_once_naming_it() {
    if !can_run("missing_device_fails_at_once_naming_it") {
        return;
    }
    let _serial = serial();
    let _pages = Hugepages::ensure();
    let topo = Topology::new();
    // A device EAL was not given.
    let mut child = topo.child(
        "open",
        &[
            ("DPDK_MEMORY", "inmemory".to_owned()),
            ("DPDK_DEVICE", "net_af_packet7".to_owned()),
        ],
    );
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "stderr: {err}");
    assert!(
        err.contains("DPDK device \"net_af_packet7\" not found"),
        "{err}"
    );
    assert!(
        err.contains("net_af_packet0"),
        "names the ports that exist: {err}"
    );
    assert!(
        err.contains("net_af_packet0,iface=eth0") && err.contains("0000:01:00.0"),
        "{err}"
    );

    // A vdev over an interface that is not in the namespace.
    let mut child = topo.child(
        "open",
        &[
            ("DPDK_MEMORY", "inmemory".to_owned()),
            ("DPDK_VDEV", "net_af_packet0,iface=nosuch0".to_owned()),
        ],
    );
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("interface \"nosuch0\" not found"), "{err}");
}

#[test]
fn eal_once_per_process_and_queues_once_per_owner() {
    if !can_run("eal_once_per_process_and_queues_once_per_owner") {
        return;
    }
    let _serial = serial();
    let _pages = Hugepages::ensure();
    let topo = Topology::new();
    let vdev = format!("net_af_packet0,iface={},qpairs=2", topo.dpdk_if);
    let child = topo.child(
        "api",
        &[
            ("DPDK_MEMORY", "inmemory".to_owned()),
            ("DPDK_VDEV", vdev),
            ("DPDK_QUEUES", "2".to_owned()),
        ],
    );
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("API OK"), "{stdout}\n{stderr}");
}

// ---------------------------------------------------------------------------------------------
// The child side

/// Entry point of the DPDK child processes, which the tests above run with `--ignored --exact
/// dpdk_child` and the mode in the environment. Ignored in a normal run (it checks nothing by
/// itself); run without a mode it fails.
#[test]
#[ignore = "the DPDK child processes' entry point: the tests of this file run it"]
fn dpdk_child() {
    let mode = std::env::var(CHILD_ENV).unwrap_or_else(|_| {
        panic!("dpdk_child runs only as a child process: {CHILD_ENV} is not set")
    });
    let code = match child::run(&mode) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    };
    std::process::exit(code);
}

mod child {
    use super::*;
    use engine::port::dpdk::{DpdkError, DpdkPort};
    use std::io::Write;

    type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

    fn env(name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }

    fn eal_config() -> EalConfig {
        let memory = match env("DPDK_MEMORY").as_deref() {
            Some("inmemory") | None => MemoryMode::InMemory,
            Some("nohuge") => MemoryMode::NoHuge { megabytes: 256 },
            Some(other) => MemoryMode::Hugepages {
                file_prefix: other.strip_prefix("prefix:").map(str::to_owned),
            },
        };
        EalConfig {
            program: "dpdk_real".to_owned(),
            vdevs: env("DPDK_VDEV").into_iter().collect(),
            no_pci: true,
            memory,
            log_level: Some("error".to_owned()),
            ..EalConfig::default()
        }
    }

    fn port_config() -> PortConfig {
        let queues = env("DPDK_QUEUES").map_or(1, |q| q.parse().expect("DPDK_QUEUES"));
        PortConfig {
            device: env("DPDK_DEVICE").unwrap_or_else(|| "net_af_packet0".to_owned()),
            rx_queues: queues,
            tx_queues: queues,
            rx_descriptors: 512,
            tx_descriptors: 512,
            next_hop: match (env("DPDK_NEXT_HOP_MAC"), env("DPDK_ARP_IP")) {
                (Some(mac), _) => NextHop::Mac(mac.parse().expect("DPDK_NEXT_HOP_MAC")),
                (None, Some(ip)) => NextHop::Arp {
                    ip: ip.parse().expect("DPDK_ARP_IP"),
                    source: env("DPDK_SRC_IP").map(|s| s.parse().expect("DPDK_SRC_IP")),
                    timeout_ms: 5000,
                },
                _ => NextHop::None,
            },
            tcp_checksum: TcpChecksum::Compute,
            ..PortConfig::default()
        }
    }

    fn count() -> u32 {
        env("DPDK_COUNT").and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    fn say(line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    pub fn run(mode: &str) -> Result<()> {
        match mode {
            "init" => {
                Eal::init(&eal_config())?;
                say("INIT OK");
                Ok(())
            }
            "open" => {
                let eal = Eal::init(&eal_config())?;
                DpdkPort::open(&eal, &port_config())?;
                say("OPEN OK");
                Ok(())
            }
            "rx" => rx(),
            "tx" => tx(),
            "api" => api(),
            other => Err(format!("unknown child mode {other}").into()),
        }
    }

    fn stats_line(port: &DpdkPort, stats: engine::port::PortStats) -> Result<String> {
        let d = port.device_stats()?;
        Ok(format!(
            "STATS rx_packets={} rx_bytes={} rx_dropped={} tx_packets={} tx_bytes={} \
             tx_errors={} ipackets={} opackets={} imissed={} ierrors={} oerrors={} rx_nombuf={}",
            stats.rx_packets,
            stats.rx_bytes,
            stats.rx_dropped,
            stats.tx_packets,
            stats.tx_bytes,
            stats.tx_errors,
            d.ipackets,
            d.opackets,
            d.imissed,
            d.ierrors,
            d.oerrors,
            d.rx_nombuf
        ))
    }

    fn rx() -> Result<()> {
        let eal = Eal::init(&eal_config())?;
        let port = DpdkPort::open(&eal, &port_config())?;
        let mut rx = port.rx_queue(QueueId(0))?;
        say(&format!(
            "READY mac={} link_up={}",
            port.mac(),
            port.link().up
        ));
        let want = count() as usize;
        let mut frames = Vec::new();
        let mut polls = 0;
        while frames.len() < want && polls < POLL_BUDGET {
            polls += 1;
            let n = rx.rx_burst(64, &mut |frame| {
                assert_eq!(frame.data.len(), frame.wire_len);
                if frame.data.len() >= 14 && frame.data[12..14] == TEST_ETHERTYPE.to_be_bytes() {
                    frames.push(frame.data.to_vec());
                }
            })?;
            if n == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        for f in &frames {
            say(&format!("FRAME {}", hex(f)));
        }
        say(&stats_line(&port, rx.stats())?);
        Ok(())
    }

    fn tx() -> Result<()> {
        let eal = Eal::init(&eal_config())?;
        let port = DpdkPort::open(&eal, &port_config())?;
        let mut tx = port.tx_queue(QueueId(0))?;
        let next_hop = port.next_hop().map(|m| m.to_string()).unwrap_or_default();
        say(&format!(
            "READY mac={} next_hop={next_hop} ip_offload={} tcp_offload={}",
            port.mac(),
            port.info().tx_ipv4_checksum_offload,
            port.info().tx_tcp_checksum_offload
        ));
        if env("DPDK_WAIT_GO").is_some() {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
        }
        let src: Ipv4Addr = env("DPDK_SRC_IP").ok_or("DPDK_SRC_IP")?.parse()?;
        let dst: Ipv4Addr = env("DPDK_DST_IP").ok_or("DPDK_DST_IP")?.parse()?;
        let mut batch = TxBatch::new(32);
        let total = count();
        let mut sent = 0;
        for i in 0..total {
            let payload = 10 + (i as usize * 13) % 1400;
            assert!(batch.push(&raw_packet(src, dst, i, payload, i % 2 == 0)));
            if batch.is_full() || i + 1 == total {
                sent += tx.tx_burst(&mut batch)?;
                // Pace a little: the af_packet ring of the vdev is small.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        say(&format!("SENT {sent}"));
        // Let the device counters settle (af_packet counts at send time already).
        say(&stats_line(&port, tx.stats())?);
        Ok(())
    }

    fn api() -> Result<()> {
        let eal = Eal::init(&eal_config())?;
        // A second init, with the first alive and after it is gone.
        match Eal::init(&eal_config()) {
            Err(DpdkError::AlreadyInitialized) => {}
            other => return Err(format!("second init: {other:?}").into()),
        }
        let port = DpdkPort::open(&eal, &port_config())?;
        let rx = port.rx_queue(QueueId(0))?;
        match port.rx_queue(QueueId(0)) {
            Err(DpdkError::QueueTaken { .. }) => {}
            other => return Err(format!("second rx_queue(0): {other:?}").into()),
        }
        drop(rx);
        let _rx = port.rx_queue(QueueId(0))?;
        // Two queue pairs (af_packet spreads them by its own PACKET_FANOUT; it has no RSS).
        let info = port.info().clone();
        assert_eq!((info.rx_queues, info.tx_queues), (2, 2), "{info:?}");
        assert!(!info.rss, "{info:?}");
        let _rx1 = port.rx_queue(QueueId(1))?;
        match port.rx_queue(QueueId(2)) {
            Err(DpdkError::BadConfig(_)) => {}
            other => return Err(format!("rx_queue(2) of 2: {other:?}").into()),
        }
        drop(_rx1);
        // EAL pinned this thread to its lcore; Eal::init gave the old affinity back.
        // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a live cpu_set_t of the size passed.
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        // SAFETY: `set` is initialised.
        let cpus = unsafe { libc::CPU_COUNT(&set) };
        let online = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(cpus as usize, online, "affinity restored after EAL init");
        match port.tx_queue(QueueId(0)) {
            Err(DpdkError::BadConfig(m)) if m.contains("next hop") => {}
            other => return Err(format!("tx_queue without next hop: {other:?}").into()),
        }
        // Mbufs: alloc, append, prepend, data, free on drop (the pool gets them back).
        let pool = port.mempool().clone();
        let before = pool.available();
        {
            let mut m = engine::port::dpdk::Mbuf::alloc(&pool).ok_or("alloc")?;
            m.append(4).ok_or("append")?.copy_from_slice(b"data");
            m.prepend(2).ok_or("prepend")?.copy_from_slice(b"<<");
            assert_eq!(m.data(), b"<<data");
            m.data_mut()[0] = b'>';
            assert_eq!(m.data(), b"><data");
            assert_eq!(m.pkt_len(), 6);
            assert!(pool.available() < before);
        }
        assert_eq!(pool.available(), before);
        let lcore = eal.register_thread()?;
        assert_eq!(eal.current_lcore(), Some(lcore));
        say(&format!(
            "API OK dpdk={} port={:?} info={:?} lcore={lcore:?}",
            Eal::version(),
            port.id(),
            port.info()
        ));
        drop(_rx);
        drop(port);
        drop(eal);
        match Eal::init(&eal_config()) {
            Err(DpdkError::AlreadyInitialized) => {}
            other => return Err(format!("init after cleanup: {other:?}").into()),
        }
        Ok(())
    }
}
