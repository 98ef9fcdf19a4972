//! Real-path tests of the AF_PACKET capture port and the raw IP transmit port, over a veth pair
//! between the root network namespace and a namespace each test creates.
//!
//! Topology (one per test; names carry the process id and a per-test index so parallel runs
//! never collide, and a guard deletes them even when the test panics):
//!
//! ```text
//!   root namespace                          namespace tcrpN<pid>x<i>
//!   tcrp<pid>a<i> 10.250.P.(4i+1)/30  <--veth-->  tcrp<pid>b<i> 10.250.P.(4i+2)/30
//!   RawIpTx (SO_BINDTODEVICE a)                   AfPacketRx (opened from a thread that setns'd)
//! ```
//!
//! The capture side lives in its own namespace so the kernel cannot short-cut the packets
//! through local delivery: they really cross the veth. Static neighbour entries on both sides
//! mean no ARP is involved. Needs root; without it the tests print a note and pass, unless
//! `CI=true`, where they fail.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use engine::port::afpacket::{AfPacketConfig, AfPacketRx, FanoutMode, PortError};
use engine::port::rawsock::{RawIpConfig, RawIpTx};
use engine::port::{Frame, RxPort, TxBatch, TxPort};

const MATCH_PORT: u16 = 5555;
const OTHER_PORT: u16 = 6666;
const CLIENT_PORT: u16 = 40_000;
const ETHERNET_HEADER: usize = 14;

static NEXT_INDEX: AtomicU32 = AtomicU32::new(0);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when the real-path tests can run here; panics under `CI=true` when they cannot.
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
        "they need root (CAP_NET_ADMIN and CAP_NET_RAW) to create namespaces and raw sockets"
    };
    assert!(
        !ci,
        "{test}: cannot run real-path port tests under CI=true: {why}"
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

/// A veth pair, one end in a fresh namespace; removed on drop.
struct Veth {
    namespace: String,
    /// Root-namespace end (transmit side).
    a: String,
    /// Namespace end (capture side).
    b: String,
    a_addr: [u8; 4],
    b_addr: [u8; 4],
}

impl Veth {
    fn new() -> Veth {
        let pid = std::process::id();
        let index = NEXT_INDEX.fetch_add(1, Ordering::Relaxed);
        assert!(index < 64, "too many topologies in one test process");
        let third = (pid % 256) as u8;
        let base = (index * 4) as u8;
        let veth = Veth {
            namespace: format!("tcrpN{pid}x{index}"),
            a: format!("tcrp{pid}a{index}"),
            b: format!("tcrp{pid}b{index}"),
            a_addr: [10, 250, third, base + 1],
            b_addr: [10, 250, third, base + 2],
        };
        assert!(
            veth.a.len() < 16 && veth.b.len() < 16,
            "interface names too long"
        );
        // The guard exists before the first resource does: a failed step below still cleans up.
        run(&["ip", "netns", "add", &veth.namespace]);
        run(&[
            "ip", "link", "add", &veth.a, "type", "veth", "peer", "name", &veth.b,
        ]);
        run(&["ip", "link", "set", &veth.b, "netns", &veth.namespace]);
        let a_cidr = format!("{}/30", dotted(veth.a_addr));
        let b_cidr = format!("{}/30", dotted(veth.b_addr));
        run(&["ip", "addr", "add", &a_cidr, "dev", &veth.a]);
        run(&["ip", "link", "set", &veth.a, "up"]);
        veth.ns(&["ip", "addr", "add", &b_cidr, "dev", &veth.b]);
        veth.ns(&["ip", "link", "set", &veth.b, "up"]);
        veth.ns(&["ip", "link", "set", "lo", "up"]);
        veth.offloads_off();
        let a_mac = run(&["cat", &format!("/sys/class/net/{}/address", veth.a)]);
        let b_mac = veth.ns(&["cat", &format!("/sys/class/net/{}/address", veth.b)]);
        run(&[
            "ip",
            "neigh",
            "replace",
            &dotted(veth.b_addr),
            "lladdr",
            b_mac.trim(),
            "dev",
            &veth.a,
            "nud",
            "permanent",
        ]);
        veth.ns(&[
            "ip",
            "neigh",
            "replace",
            &dotted(veth.a_addr),
            "lladdr",
            a_mac.trim(),
            "dev",
            &veth.b,
            "nud",
            "permanent",
        ]);
        veth
    }

    /// Runs a command inside the namespace.
    fn ns(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.namespace];
        full.extend_from_slice(args);
        run(&full)
    }

    fn offloads_off(&self) {
        let features = [
            "tx", "off", "sg", "off", "tso", "off", "gso", "off", "gro", "off",
        ];
        let has_ethtool = Command::new("ethtool").arg("--version").output().is_ok();
        if !has_ethtool {
            eprintln!("note: ethtool missing (apt-get install -y ethtool); offloads stay on");
            return;
        }
        let mut a = vec!["ethtool", "-K", &self.a];
        a.extend_from_slice(&features);
        let _ = Command::new(a[0]).args(&a[1..]).output();
        let mut b = vec![
            "ip",
            "netns",
            "exec",
            &self.namespace,
            "ethtool",
            "-K",
            &self.b,
        ];
        b.extend_from_slice(&features);
        let _ = Command::new(b[0]).args(&b[1..]).output();
    }

    /// Opens a capture on the namespace end, from a thread that entered the namespace (the
    /// socket stays in that namespace and can be used from any thread afterwards).
    fn capture(&self, mut config: AfPacketConfig) -> AfPacketRx {
        config.interface = self.b.clone();
        in_namespace(&self.namespace, move || AfPacketRx::open(&config))
            .unwrap_or_else(|e| panic!("AfPacketRx::open: {e}"))
    }

    /// A raw transmit socket bound to the root-namespace end.
    fn transmitter(&self) -> RawIpTx {
        let config = RawIpConfig {
            bind_device: Some(self.a.clone()),
            ..RawIpConfig::default()
        };
        RawIpTx::open(&config).unwrap_or_else(|e| panic!("RawIpTx::open: {e}"))
    }

    /// An IPv4/TCP packet from a to b.
    fn packet(&self, dport: u16, seq: u32, payload_len: usize) -> Vec<u8> {
        tcp_packet(
            self.a_addr,
            self.b_addr,
            CLIENT_PORT,
            dport,
            seq,
            payload_len,
        )
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting one end deletes its peer too, wherever it is.
        let _ = Command::new("ip").args(["link", "del", &self.a]).output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .output();
    }
}

fn dotted(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

/// Runs `f` on a new thread that has joined network namespace `name`.
fn in_namespace<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{name}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: `file` is an open namespace file for the duration of the call; setns only
        // changes this (fresh, about to end) thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

fn checksum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn checksum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A complete IPv4/TCP packet (PSH|ACK) with correct IP and TCP checksums; the payload bytes
/// are derived from `seq` so every packet differs.
fn tcp_packet(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    seq: u32,
    payload_len: usize,
) -> Vec<u8> {
    let total = 40 + payload_len;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[4..6].copy_from_slice(&(1 + (seq % 60_000) as u16).to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let ip_sum = checksum_fold(checksum_add(0, &p[..20]));
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let t = 20;
    p[t..t + 2].copy_from_slice(&sport.to_be_bytes());
    p[t + 2..t + 4].copy_from_slice(&dport.to_be_bytes());
    p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    p[t + 8..t + 12].copy_from_slice(&1u32.to_be_bytes());
    p[t + 12] = 5 << 4;
    p[t + 13] = 0x18;
    p[t + 14..t + 16].copy_from_slice(&65_535u16.to_be_bytes());
    for (i, b) in p[40..].iter_mut().enumerate() {
        *b = (seq as usize + i) as u8;
    }
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src);
    pseudo[4..8].copy_from_slice(&dst);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&((total - 20) as u16).to_be_bytes());
    let tcp_sum = checksum_fold(checksum_add(checksum_add(0, &pseudo), &p[t..]));
    p[t + 16..t + 18].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

#[derive(Debug, Clone)]
struct Captured {
    data: Vec<u8>,
    wire_len: usize,
    timestamp_ns: u64,
}

impl Captured {
    fn ip(&self) -> &[u8] {
        &self.data[ETHERNET_HEADER..]
    }
    fn sport(&self) -> u16 {
        u16::from_be_bytes([self.ip()[20], self.ip()[21]])
    }
    fn dport(&self) -> u16 {
        u16::from_be_bytes([self.ip()[22], self.ip()[23]])
    }
    fn seq(&self) -> u32 {
        u32::from_be_bytes([self.ip()[24], self.ip()[25], self.ip()[26], self.ip()[27]])
    }
}

fn wait_readable(fd: RawFd) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the outcome does not matter, the caller polls the ring again.
    unsafe {
        libc::poll(&mut pfd, 1, 50);
    }
}

/// Reads frames `max` at a time until `want` have arrived or about 10 s have passed (a bound
/// against hangs, not a timing assertion). Checks every call honours `max`.
fn receive(rx: &mut AfPacketRx, want: usize, max: usize) -> Vec<Captured> {
    let mut out = Vec::new();
    for _ in 0..200 {
        if out.len() >= want {
            break;
        }
        let n = rx
            .rx_burst(max, &mut |f: Frame<'_>| {
                out.push(Captured {
                    data: f.data.to_vec(),
                    wire_len: f.wire_len,
                    timestamp_ns: f.timestamp_ns,
                });
            })
            .expect("rx_burst");
        assert!(n <= max, "rx_burst returned {n} frames with max {max}");
        if n == 0 {
            wait_readable(rx.wait_fd().expect("afpacket has a wait fd"));
        }
    }
    out
}

/// Whatever is ready now, appended to `out`; returns how many.
fn receive_now(rx: &mut AfPacketRx, out: &mut Vec<Captured>) -> usize {
    rx.rx_burst(1024, &mut |f: Frame<'_>| {
        out.push(Captured {
            data: f.data.to_vec(),
            wire_len: f.wire_len,
            timestamp_ns: f.timestamp_ns,
        });
    })
    .expect("rx_burst")
}

fn small_ring(filter: &str) -> AfPacketConfig {
    AfPacketConfig {
        filter: Some(filter.to_owned()),
        block_size: 1 << 16,
        block_count: 8,
        ..AfPacketConfig::default()
    }
}

fn send_all(tx: &mut RawIpTx, packets: &[Vec<u8>]) -> usize {
    let mut batch = TxBatch::new(packets.len());
    for p in packets {
        assert!(batch.push(p));
    }
    let sent = tx.tx_burst(&mut batch).expect("tx_burst");
    assert!(batch.is_empty(), "tx_burst must clear the batch");
    sent
}

#[test]
fn filter_passes_matching_frames_with_exact_bytes() {
    if !can_run("filter_passes_matching_frames_with_exact_bytes") {
        return;
    }
    let veth = Veth::new();
    let mut rx = veth.capture(small_ring("tcp and dst port 5555"));
    let mut tx = veth.transmitter();

    let packets: Vec<Vec<u8>> = (0..21u32)
        .map(|i| {
            let port = if i % 2 == 0 { MATCH_PORT } else { OTHER_PORT };
            veth.packet(port, i, 20 + i as usize)
        })
        .collect();
    assert_eq!(send_all(&mut tx, &packets), packets.len());
    let matching: Vec<&Vec<u8>> = packets.iter().step_by(2).collect();
    let mut got = receive(&mut rx, matching.len(), 64);
    assert_eq!(
        got.len(),
        matching.len(),
        "not every matching frame arrived"
    );

    // A marker sent afterwards: once it is in, anything else the filter let through would be too.
    let marker = veth.packet(MATCH_PORT, 1000, 8);
    assert_eq!(send_all(&mut tx, std::slice::from_ref(&marker)), 1);
    let rest = receive(&mut rx, 1, 64);
    assert_eq!(
        rest.len(),
        1,
        "marker frame missing or extra frames: {rest:?}"
    );
    assert_eq!(rest[0].ip(), &marker[..]);

    got.sort_by_key(Captured::seq);
    for (frame, sent) in got.iter().zip(&matching) {
        assert_eq!(frame.dport(), MATCH_PORT);
        assert_eq!(&frame.data[12..14], &[0x08, 0x00], "ethertype IPv4");
        assert_eq!(
            frame.ip(),
            &sent[..],
            "captured bytes differ from sent bytes"
        );
        assert_eq!(frame.wire_len, frame.data.len());
        assert!(frame.timestamp_ns > 1_600_000_000 * 1_000_000_000);
    }

    let stats = rx.stats();
    let bytes: usize = got.iter().chain(&rest).map(|f| f.data.len()).sum();
    assert_eq!(stats.rx_packets, (matching.len() + 1) as u64);
    assert_eq!(stats.rx_bytes, bytes as u64);
    assert_eq!(stats.rx_dropped, 0);
    let tx_stats = tx.stats();
    assert_eq!(tx_stats.tx_packets, packets.len() as u64 + 1);
    assert_eq!(tx_stats.tx_errors, 0);
    let sent_bytes: usize = packets.iter().map(Vec::len).sum::<usize>() + marker.len();
    assert_eq!(tx_stats.tx_bytes, sent_bytes as u64);
}

#[test]
fn rx_burst_respects_max_and_resumes_inside_a_block() {
    if !can_run("rx_burst_respects_max_and_resumes_inside_a_block") {
        return;
    }
    let veth = Veth::new();
    let mut rx = veth.capture(small_ring("tcp and dst port 5555"));
    let mut tx = veth.transmitter();
    let packets: Vec<Vec<u8>> = (0..10u32).map(|i| veth.packet(MATCH_PORT, i, 30)).collect();
    assert_eq!(send_all(&mut tx, &packets), 10);

    assert_eq!(
        rx.rx_burst(0, &mut |_| panic!("max 0 lent a frame"))
            .unwrap(),
        0
    );
    let got = receive(&mut rx, 10, 3);
    assert_eq!(got.len(), 10);
    let mut seqs: Vec<u32> = got.iter().map(Captured::seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..10).collect::<Vec<_>>(), "frames lost or repeated");
    for frame in &got {
        assert_eq!(frame.ip(), &packets[frame.seq() as usize][..]);
    }
    assert_eq!(rx.stats().rx_packets, 10);
}

#[test]
fn sendmmsg_burst_of_64_all_arrive() {
    if !can_run("sendmmsg_burst_of_64_all_arrive") {
        return;
    }
    let veth = Veth::new();
    // Default ring geometry (1 MiB x 64 blocks).
    let mut rx = veth.capture(AfPacketConfig {
        filter: Some("tcp and dst port 5555".to_owned()),
        ..AfPacketConfig::default()
    });
    let mut tx = veth.transmitter();
    let packets: Vec<Vec<u8>> = (0..64u32)
        .map(|i| veth.packet(MATCH_PORT, i, 100))
        .collect();
    assert_eq!(send_all(&mut tx, &packets), 64);
    let got = receive(&mut rx, 64, 1024);
    assert_eq!(got.len(), 64);
    let mut seen = [false; 64];
    for frame in &got {
        let seq = frame.seq() as usize;
        assert!(!seen[seq], "frame {seq} twice");
        seen[seq] = true;
        assert_eq!(frame.ip(), &packets[seq][..]);
    }
    let stats = rx.stats();
    assert_eq!((stats.rx_packets, stats.rx_dropped), (64, 0));
    assert_eq!(tx.stats().tx_packets, 64);
}

#[test]
fn per_packet_send_errors_are_counted_and_skipped() {
    if !can_run("per_packet_send_errors_are_counted_and_skipped") {
        return;
    }
    let veth = Veth::new();
    let mut rx = veth.capture(small_ring("tcp and dst port 5555"));
    let mut tx = veth.transmitter();
    // The middle packet exceeds the veth MTU (1500) with DF set: EMSGSIZE for it alone.
    let packets = vec![
        veth.packet(MATCH_PORT, 0, 10),
        veth.packet(MATCH_PORT, 1, 2000),
        veth.packet(MATCH_PORT, 2, 10),
    ];
    assert_eq!(send_all(&mut tx, &packets), 2);
    let stats = tx.stats();
    assert_eq!((stats.tx_packets, stats.tx_errors), (2, 1));
    let got = receive(&mut rx, 2, 64);
    let mut seqs: Vec<u32> = got.iter().map(Captured::seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, vec![0, 2]);
}

#[test]
fn ignore_outgoing_hides_own_frames() {
    if !can_run("ignore_outgoing_hides_own_frames") {
        return;
    }
    let veth = Veth::new();
    let filter = "tcp and port 5555";
    // Both captures on the root-namespace end, where our packets are outgoing and the
    // namespace's RST replies (5555 -> client, nobody listens) are incoming.
    let mut own_hidden = AfPacketRx::open(&AfPacketConfig {
        interface: veth.a.clone(),
        ..small_ring(filter)
    })
    .unwrap();
    let mut own_seen = AfPacketRx::open(&AfPacketConfig {
        interface: veth.a.clone(),
        ignore_outgoing: false,
        ..small_ring(filter)
    })
    .unwrap();
    let mut tx = veth.transmitter();
    let packets: Vec<Vec<u8>> = (0..5u32).map(|i| veth.packet(MATCH_PORT, i, 0)).collect();
    assert_eq!(send_all(&mut tx, &packets), 5);

    // Each RST follows the packet that caused it, so once all RSTs are in, any outgoing frame
    // the socket accepted would have been read before them.
    let hidden = receive(&mut own_hidden, 5, 64);
    assert_eq!(hidden.len(), 5, "expected the 5 RST replies: {hidden:?}");
    assert!(
        hidden.iter().all(|f| f.sport() == MATCH_PORT),
        "PACKET_IGNORE_OUTGOING let an outgoing frame through"
    );
    let seen = receive(&mut own_seen, 10, 64);
    assert_eq!(seen.len(), 10);
    assert_eq!(seen.iter().filter(|f| f.dport() == MATCH_PORT).count(), 5);
}

#[test]
fn full_ring_counts_kernel_drops() {
    if !can_run("full_ring_counts_kernel_drops") {
        return;
    }
    let veth = Veth::new();
    // Two 4 KiB blocks hold far fewer than 64 frames of 300 bytes.
    let mut rx = veth.capture(AfPacketConfig {
        filter: Some("tcp and dst port 5555".to_owned()),
        block_size: 4096,
        block_count: 2,
        ..AfPacketConfig::default()
    });
    let mut tx = veth.transmitter();
    let packets: Vec<Vec<u8>> = (0..64u32)
        .map(|i| veth.packet(MATCH_PORT, i, 260))
        .collect();
    assert_eq!(send_all(&mut tx, &packets), 64);

    // Read nothing until the kernel reports drops, then drain: every frame is either read or
    // counted as dropped.
    for _ in 0..200 {
        if rx.stats().rx_dropped > 0 {
            break;
        }
        wait_readable(rx.wait_fd().unwrap());
    }
    let mut received = 0u64;
    for _ in 0..200 {
        let stats = rx.stats();
        if received + stats.rx_dropped >= 64 {
            break;
        }
        let n = rx.rx_burst(64, &mut |_| {}).unwrap();
        received += n as u64;
        if n == 0 {
            wait_readable(rx.wait_fd().unwrap());
        }
    }
    let stats = rx.stats();
    assert!(stats.rx_dropped > 0, "a full ring must drop: {stats:?}");
    assert!(received > 0);
    assert_eq!(received + stats.rx_dropped, 64, "{stats:?}");
    assert_eq!(stats.rx_packets, received);
}

#[test]
fn fanout_group_keeps_each_flow_on_one_socket() {
    if !can_run("fanout_group_keeps_each_flow_on_one_socket") {
        return;
    }
    let veth = Veth::new();
    let group = (std::process::id() % 60_000) as u16;
    let config = AfPacketConfig {
        fanout: Some((group, FanoutMode::Hash)),
        ..small_ring("tcp and dst port 5555")
    };
    let mut first = veth.capture(config.clone());
    let mut second = veth.capture(config);
    let mut tx = veth.transmitter();
    // 8 flows (source ports) x 4 packets.
    let packets: Vec<Vec<u8>> = (0..32u32)
        .map(|i| {
            let sport = CLIENT_PORT + (i % 8) as u16;
            tcp_packet(veth.a_addr, veth.b_addr, sport, MATCH_PORT, i, 16)
        })
        .collect();
    assert_eq!(send_all(&mut tx, &packets), 32);
    let mut a = Vec::new();
    let mut b = Vec::new();
    for _ in 0..200 {
        if a.len() + b.len() >= 32 {
            break;
        }
        let n = receive_now(&mut first, &mut a) + receive_now(&mut second, &mut b);
        if n == 0 {
            wait_readable(first.wait_fd().unwrap());
        }
    }
    assert_eq!(a.len() + b.len(), 32, "fanout lost or repeated frames");
    for frame in &a {
        assert!(
            b.iter().all(|other| other.sport() != frame.sport()),
            "flow {} split across sockets",
            frame.sport()
        );
    }
}

#[test]
fn port_shard_fanout_sends_each_port_to_its_computed_owner() {
    if !can_run("port_shard_fanout_sends_each_port_to_its_computed_owner") {
        return;
    }
    let veth = Veth::new();
    let group = (std::process::id() % 60_000) as u16 + 1;
    let config = AfPacketConfig {
        fanout: Some((group, FanoutMode::PortShard { workers: 3 })),
        ..small_ring("tcp and dst port 5555")
    };
    // Members are numbered in join order: member i must get port_shard(port) == i.
    let mut members: Vec<AfPacketRx> = (0..3).map(|_| veth.capture(config.clone())).collect();
    let mut tx = veth.transmitter();
    let ports: Vec<u16> = (0..60u16).map(|i| 32768 + 2 * i).collect();
    let packets: Vec<Vec<u8>> = ports
        .iter()
        .enumerate()
        .map(|(i, &sport)| tcp_packet(veth.a_addr, veth.b_addr, sport, MATCH_PORT, i as u32, 16))
        .collect();
    assert_eq!(send_all(&mut tx, &packets), packets.len());
    let mut got: Vec<Vec<Captured>> = vec![Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..300 {
        if got.iter().map(Vec::len).sum::<usize>() >= packets.len() {
            break;
        }
        let n: usize = members
            .iter_mut()
            .zip(got.iter_mut())
            .map(|(m, g)| receive_now(m, g))
            .sum();
        if n == 0 {
            wait_readable(members[0].wait_fd().unwrap());
        }
    }
    assert_eq!(
        got.iter().map(Vec::len).sum::<usize>(),
        packets.len(),
        "fanout lost frames"
    );
    for (member, frames) in got.iter().enumerate() {
        assert!(
            !frames.is_empty(),
            "member {member} got nothing: the ports should spread"
        );
        for frame in frames {
            assert_eq!(
                engine::flow::port_shard(frame.sport(), 3),
                member,
                "port {}",
                frame.sport()
            );
        }
    }
}

#[test]
fn missing_interface_error_names_it() {
    // No privilege needed: the interface is looked up before any socket is opened.
    let name = format!("tcrpmiss{}", std::process::id() % 100_000);
    let err = AfPacketRx::open(&AfPacketConfig {
        interface: name.clone(),
        ..AfPacketConfig::default()
    })
    .unwrap_err();
    assert!(matches!(err, PortError::InterfaceNotFound(ref n) if *n == name));
    assert!(
        err.to_string()
            .contains(&format!("interface {name} not found")),
        "{err}"
    );
    let err = RawIpTx::open(&RawIpConfig {
        bind_device: Some(name.clone()),
        ..RawIpConfig::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains(&name), "{err}");
}

#[test]
fn bad_filter_error_quotes_it() {
    let err = AfPacketRx::open(&AfPacketConfig {
        interface: "lo".into(),
        filter: Some("tcp and dst prot 80".into()),
        ..AfPacketConfig::default()
    })
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("bad capture filter 'tcp and dst prot 80': "),
        "{err}"
    );
}

#[test]
fn snaplen_cuts_frames_and_no_filter_takes_all() {
    if !can_run("snaplen_cuts_frames_and_no_filter_takes_all") {
        return;
    }
    let veth = Veth::new();
    let mut cut = veth.capture(AfPacketConfig {
        snaplen: 54,
        ..small_ring("tcp and dst port 5555")
    });
    let mut everything = veth.capture(AfPacketConfig {
        filter: None,
        ..small_ring("unused")
    });
    let mut tx = veth.transmitter();
    let packets: Vec<Vec<u8>> = (0..4u32).map(|i| veth.packet(MATCH_PORT, i, 100)).collect();
    assert_eq!(send_all(&mut tx, &packets), 4);
    let got = receive(&mut cut, 4, 64);
    assert_eq!(got.len(), 4);
    for frame in &got {
        assert_eq!(frame.data.len(), 54, "snaplen not applied");
        assert_eq!(frame.wire_len, ETHERNET_HEADER + 140);
        assert_eq!(frame.ip(), &packets[frame.seq() as usize][..40]);
    }
    // Without a filter the capture also sees the namespace's own traffic (RSTs, maybe IPv6),
    // but it must include our four packets.
    let mut ours = 0;
    for _ in 0..200 {
        if ours == 4 {
            break;
        }
        let mut frames = Vec::new();
        if receive_now(&mut everything, &mut frames) == 0 {
            wait_readable(everything.wait_fd().unwrap());
        }
        ours += frames
            .iter()
            .filter(|f| f.data.len() >= ETHERNET_HEADER + 40 && f.data[12..14] == [8, 0])
            .filter(|f| f.dport() == MATCH_PORT && packets.iter().any(|p| f.ip() == &p[..]))
            .count();
    }
    assert_eq!(ours, 4);
}

/// Frames into the namespace cross its veth end and then a bridge that end is a port of (the
/// address lives on the bridge), so the kernel sees each one on two interfaces. A capture on
/// every interface hands each packet over once, raw IP, and never the namespace's own output;
/// a capture listing both interfaces hands each over once and counts the copy it left out; a
/// capture on the port alone sees Ethernet frames, as before.
#[test]
fn capture_scopes_see_a_bridged_frame_once_and_never_own_output() {
    use engine::port::afpacket::Scope;
    use engine::port::LinkType;
    if !can_run("capture_scopes_see_a_bridged_frame_once_and_never_own_output") {
        return;
    }
    let veth = Veth::new();
    let bridge = format!("{}br", veth.b);
    let bridge = bridge.replace("tcrp", "tb");
    assert!(bridge.len() < 16, "{bridge}");
    let b_mac = veth
        .ns(&["cat", &format!("/sys/class/net/{}/address", veth.b)])
        .trim()
        .to_owned();
    let a_mac = run(&["cat", &format!("/sys/class/net/{}/address", veth.a)])
        .trim()
        .to_owned();
    let b_cidr = format!("{}/30", dotted(veth.b_addr));
    veth.ns(&["ip", "link", "add", &bridge, "type", "bridge"]);
    veth.ns(&["ip", "link", "set", &bridge, "address", &b_mac]);
    veth.ns(&["ip", "addr", "del", &b_cidr, "dev", &veth.b]);
    veth.ns(&["ip", "link", "set", &veth.b, "master", &bridge]);
    veth.ns(&["ip", "addr", "add", &b_cidr, "dev", &bridge]);
    veth.ns(&["ip", "link", "set", &bridge, "up"]);
    let a_ip = dotted(veth.a_addr);
    veth.ns(&[
        "ip",
        "neigh",
        "replace",
        &a_ip,
        "lladdr",
        &a_mac,
        "dev",
        &bridge,
        "nud",
        "permanent",
    ]);

    let filter = format!("tcp and dst port {MATCH_PORT}");
    let open = |scope: Scope| {
        let config = AfPacketConfig {
            scope,
            ..small_ring(&filter)
        };
        let config = AfPacketConfig {
            interface: veth.b.clone(),
            ..config
        };
        in_namespace(&veth.namespace, move || AfPacketRx::open(&config))
            .unwrap_or_else(|e| panic!("AfPacketRx::open: {e}"))
    };
    let mut all = open(Scope::AllInterfaces);
    let mut listed = open(Scope::Interfaces(vec![veth.b.clone(), bridge.clone()]));
    let mut port_only = open(Scope::Interface);
    assert_eq!(all.link_type(), LinkType::RawIp);
    assert_eq!(listed.link_type(), LinkType::RawIp);
    assert_eq!(port_only.link_type(), LinkType::Ethernet);
    assert_eq!(all.interface(), "any");
    assert_eq!(listed.interface(), format!("{},{bridge}", veth.b));

    // The namespace's own output to the same port: no capture may hand it over.
    let mut own = in_namespace(&veth.namespace, || RawIpTx::open(&RawIpConfig::default()))
        .unwrap_or_else(|e| panic!("RawIpTx::open in the namespace: {e}"));
    let outgoing: Vec<Vec<u8>> = (0..5u32)
        .map(|i| tcp_packet(veth.b_addr, veth.a_addr, 41_000, MATCH_PORT, i, 10))
        .collect();
    assert_eq!(send_all(&mut own, &outgoing), outgoing.len());

    let mut tx = veth.transmitter();
    let packets: Vec<Vec<u8>> = (0..10u32)
        .map(|i| veth.packet(MATCH_PORT, 100 + i, 30 + i as usize))
        .collect();
    assert_eq!(send_all(&mut tx, &packets), packets.len());
    let got_all = receive(&mut all, packets.len(), 64);
    let got_listed = receive(&mut listed, packets.len(), 64);
    let got_port = receive(&mut port_only, packets.len(), 64);
    // A marker: once it is in, any extra copy sent before it would be in too.
    let marker = veth.packet(MATCH_PORT, 5000, 8);
    assert_eq!(send_all(&mut tx, std::slice::from_ref(&marker)), 1);
    let mut expected = packets.clone();
    expected.push(marker.clone());
    for (name, rx, mut got) in [
        ("every interface", &mut all, got_all),
        ("both listed", &mut listed, got_listed),
    ] {
        got.extend(receive(rx, 1, 64));
        let data: Vec<Vec<u8>> = got.iter().map(|f| f.data.clone()).collect();
        assert_eq!(data, expected, "{name}: each packet once, raw IP, in order");
    }
    let mut got_port = got_port;
    got_port.extend(receive(&mut port_only, 1, 64));
    let ip: Vec<&[u8]> = got_port.iter().map(Captured::ip).collect();
    let want: Vec<&[u8]> = expected.iter().map(Vec::as_slice).collect();
    assert_eq!(ip, want, "the port alone: Ethernet frames");
    assert_eq!(all.stats().rx_packets, expected.len() as u64);
    assert_eq!(all.stats().rx_duplicates, 0);
    assert_eq!(listed.stats().rx_packets, expected.len() as u64);
    assert_eq!(
        listed.stats().rx_duplicates,
        expected.len() as u64,
        "the bridge's copy of each frame is counted"
    );
}

/// A list naming an interface that does not exist is refused with its name; so is an empty or
/// too long list.
#[test]
fn interface_list_errors_name_the_cause() {
    use engine::port::afpacket::{Scope, MAX_INTERFACES};
    let err = AfPacketRx::open(&AfPacketConfig {
        scope: Scope::Interfaces(vec!["lo".into(), "tcrpnone1".into()]),
        ..AfPacketConfig::default()
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("interface tcrpnone1 not found"),
        "{err}"
    );
    for names in [vec![], vec!["lo".to_owned(); MAX_INTERFACES + 1]] {
        let err = AfPacketRx::open(&AfPacketConfig {
            scope: Scope::Interfaces(names),
            ..AfPacketConfig::default()
        })
        .unwrap_err();
        assert!(matches!(err, PortError::BadConfig(_)), "{err}");
    }
}
